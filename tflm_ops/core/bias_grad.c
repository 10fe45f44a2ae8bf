/* Bias gradient: grad[o] = sum over pixels of dy[p][o] (int32).
 *
 * Channel blocks of 4 accumulate in registers over all pixels (one 4-byte load per pixel).
 * With the DSP extension SXTAB16 adds two sign-extended bytes into two 16-bit lanes per
 * instruction; 256 pixels of int8 cannot overflow a lane (|sum| <= 128 * 256 = 32768 and
 * -32768 is representable, +32512 at most), so the lanes are flushed every 256 pixels. */
#include <string.h>

#include "dgst_internal.h"
#include "dgst_train_kernels.h"

void dgst_bias_grad_s8(const int8_t* dy, int32_t pixels, int32_t channels, int32_t* grad) {
  int32_t o, p;
  for (o = 0; o + 4 <= channels; o += 4) {
    int32_t a0 = 0, a1 = 0, a2 = 0, a3 = 0, p0;
    for (p0 = 0; p0 < pixels; p0 += 256) {
      const int32_t n = pixels - p0 < 256 ? pixels - p0 : 256;
      const int8_t* d = dy + p0 * channels + o;
      const int8_t* const d_end = d + n * channels;
#if DGST_USE_ARM_DSP
      int32_t s02 = 0, s13 = 0;
      while (d != d_end) {
        uint32_t w;
        memcpy(&w, d, 4);
        s02 = __sxtab16(s02, (int32_t)w);
        s13 = dgst_sxtab16_ror8(s13, w);
        d += channels;
      }
      a0 += (int16_t)(s02 & 0xFFFF);
      a2 += (int16_t)((uint32_t)s02 >> 16);
      a1 += (int16_t)(s13 & 0xFFFF);
      a3 += (int16_t)((uint32_t)s13 >> 16);
#else
      while (d != d_end) {
        a0 += d[0];
        a1 += d[1];
        a2 += d[2];
        a3 += d[3];
        d += channels;
      }
#endif
    }
    grad[o] = a0;
    grad[o + 1] = a1;
    grad[o + 2] = a2;
    grad[o + 3] = a3;
  }
  for (; o < channels; ++o) {
    int32_t a = 0;
    const int8_t* d = dy + o;
    for (p = 0; p < pixels; ++p, d += channels) a += *d;
    grad[o] = a;
  }
}
