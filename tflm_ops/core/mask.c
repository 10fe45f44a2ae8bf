/* 1-bit ReLU / ReLU6 derivative masks: building one from an int8 output and applying it.
 * Bit i is (mask[i >> 3] >> (i & 7)) & 1. Bits past n in the last byte are written as 0. */
#include <string.h>

#include "dgst_internal.h"
#include "dgst_train_kernels.h"

/* Bytes of a word that are 0 or 1 (byte i at bit 8i) -> 4 bits (byte i at bit i). The
 * product's top byte collects byte i * 2^(8i) * 2^(24-7i) = bit 24+i; no other partial
 * product reaches bits 24-31 or carries into them. */
static inline uint32_t gather_4_bits(uint32_t bytes01) {
  return (bytes01 * 0x01020408u) >> 24;
}

/* Mask bits of 4 consecutive int8 values (the word of their 4 bytes). */
static inline uint32_t bits4(uint32_t y4, int32_t lo, int32_t hi) {
#if DGST_USE_ARM_DSP
  /* SSUB8 sets the GE flag of byte i where y_i - c_i >= 0; SEL keeps bytes where set. */
  const uint32_t lo1 = 0x01010101u * (uint8_t)(lo + 1), hi1 = 0x01010101u * (uint8_t)(hi - 1);
  uint32_t r;
  (void)__ssub8((int32_t)y4, (int32_t)lo1); /* GE: y > lo */
  r = __sel(0x01010101u, 0u);
  (void)__ssub8((int32_t)hi1, (int32_t)y4); /* GE: y < hi */
  r = __sel(r, 0u);
  return gather_4_bits(r);
#else
  /* lo < y < hi  <=>  (unsigned)(y - lo - 1) < (unsigned)(hi - lo - 1): one compare */
  const uint32_t span = (uint32_t)(hi - lo - 1);
  const int32_t y0 = (int8_t)(y4 & 0xFFu), y1 = (int8_t)((y4 >> 8) & 0xFFu);
  const int32_t y2 = (int8_t)((y4 >> 16) & 0xFFu), y3 = (int8_t)(y4 >> 24);
  return (uint32_t)((uint32_t)(y0 - lo - 1) < span) |
         ((uint32_t)((uint32_t)(y1 - lo - 1) < span) << 1) |
         ((uint32_t)((uint32_t)(y2 - lo - 1) < span) << 2) |
         ((uint32_t)((uint32_t)(y3 - lo - 1) < span) << 3);
#endif
}

void dgst_build_mask_s8(const int8_t* y, int32_t n, int8_t lo, int8_t hi, uint8_t* mask) {
  const int32_t full = n >> 3, bytes = (n + 7) >> 3;
  int32_t b, r;
  if ((int32_t)hi - (int32_t)lo < 2) { /* no int8 value strictly between: all zero */
    for (b = 0; b < bytes; ++b) mask[b] = 0;
    return;
  }
  for (b = 0; b < full; ++b, y += 8) {
    uint32_t w0, w1;
    memcpy(&w0, y, 4);
    memcpy(&w1, y + 4, 4);
    mask[b] = (uint8_t)(bits4(w0, lo, hi) | (bits4(w1, lo, hi) << 4));
  }
  if (n & 7) {
    uint32_t m = 0;
    for (r = 0; r < (n & 7); ++r) m |= (uint32_t)(y[r] > lo && y[r] < hi) << r;
    mask[full] = (uint8_t)m;
  }
}

/* g[i] keeps its bits where the mask bit is set and becomes +0.0f elsewhere: an AND of the
 * float's bits with 0 or ~0 (no branch, no float compare). */
/* Element i of the 8 at g: its float bits ANDed with 0 or ~0 (bit i of m). */
#define DGST_MASK_ONE(i)                   \
  do {                                     \
    uint32_t v_;                           \
    memcpy(&v_, g + (i), 4);               \
    v_ &= 0u - ((m >> (i)) & 1u);          \
    memcpy(g + (i), &v_, 4);               \
  } while (0)

void dgst_apply_mask_f32(float* g, const uint8_t* mask, int32_t n) {
  const int32_t full = n >> 3;
  int32_t b, i;
  for (b = 0; b < full; ++b, g += 8) {
    const uint32_t m = mask[b];
    DGST_MASK_ONE(0);
    DGST_MASK_ONE(1);
    DGST_MASK_ONE(2);
    DGST_MASK_ONE(3);
    DGST_MASK_ONE(4);
    DGST_MASK_ONE(5);
    DGST_MASK_ONE(6);
    DGST_MASK_ONE(7);
  }
  for (i = 0; i < (n & 7); ++i) {
    if (!((mask[full] >> i) & 1u)) g[i] = 0.0f;
  }
}
