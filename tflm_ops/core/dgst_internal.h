/* dgst-tf training kernels: helpers shared by the cores (not part of the public contract).
 *
 * Everything here is static inline, plain C99, and has no side effects. It also declares
 * the straightforward reference loop of the Conv2D weight gradient, which exists so that
 * its instruction count can be compared with the optimized kernel on the MCU.
 */
#ifndef DGST_INTERNAL_H_
#define DGST_INTERNAL_H_

#include <stdint.h>

#include "dgst_train_kernels.h"

/* Arm DSP / SIMD32 paths (Cortex-M4, M7, M33 ...); -DDGST_NO_DSP selects the plain C. */
#if defined(__ARM_FEATURE_DSP) && defined(__ARM_FEATURE_SIMD32) && !defined(DGST_NO_DSP)
#define DGST_USE_ARM_DSP 1
#include <arm_acle.h>
#else
#define DGST_USE_ARM_DSP 0
#endif

#ifdef __cplusplus
extern "C" {
#endif

#if DGST_USE_ARM_DSP
/* SXTB16 of the word rotated by 8 (bytes 1 and 3 -> two int16 lanes) in one instruction:
 * GCC 12 has no pattern folding the rotation into __sxtb16. */
static inline int32_t dgst_sxtb16_ror8(uint32_t v) {
  int32_t r;
  __asm("sxtb16 %0, %1, ror #8" : "=r"(r) : "r"(v));
  return r;
}

/* SXTAB16 with the byte operand rotated by 8: acc lanes += bytes 1 and 3. */
static inline int32_t dgst_sxtab16_ror8(int32_t acc, uint32_t v) {
  int32_t r;
  __asm("sxtab16 %0, %1, %2, ror #8" : "=r"(r) : "r"(acc), "r"(v));
  return r;
}

/* PKHBT: (bottom lane of a, bottom lane of b) -- GCC 12 has no pattern for it either. */
static inline int32_t dgst_pkhbt(int32_t a, int32_t b) {
  int32_t r;
  __asm("pkhbt %0, %1, %2, lsl #16" : "=r"(r) : "r"(a), "r"(b));
  return r;
}

/* PKHTB: (top lane of a, top lane of b). */
static inline int32_t dgst_pkhtb(int32_t a, int32_t b) {
  int32_t r;
  __asm("pkhtb %0, %2, %1, asr #16" : "=r"(r) : "r"(a), "r"(b));
  return r;
}
#endif

/* The straightforward loop nest of dgst_conv2d_weight_grad_s8 (same contract, same
 * results bit for bit): one bounds check per multiply-accumulate. For comparison only. */
void dgst_conv2d_weight_grad_s8_ref(const dgst_conv_geometry* g, const int8_t* x_kept,
                                    int32_t k, int32_t x_zero_point, const int8_t* dy,
                                    int32_t c_out, int32_t* grad);

/* One output row r of dgst_conv2d_s8 into row [out_w][out_c] (a stage of
 * dgst_fused_block_s8 too). */
void dgst_conv2d_row_s8(const dgst_conv_geometry* g, int32_t in_c, int32_t out_c,
                        const dgst_requant_params* p, const int8_t* x, int32_t r, int8_t* row);

/* One output row r of dgst_depthwise_conv2d_s8 into row [out_w][channels], reading input row
 * r * stride_h - pad_top + ky from rows[ky] (only the ky inside the input are read). */
void dgst_depthwise_conv2d_row_s8(const dgst_conv_geometry* g, int32_t channels,
                                  const dgst_requant_params* p, const int8_t* const* rows,
                                  int32_t r, int32_t* acc, int8_t* row);

/* floor(a / b) and ceil(a / b) for b > 0 and any sign of a. */
static inline int32_t dgst_floor_div(int32_t a, int32_t b) {
  int32_t q = a / b;
  return (a % b != 0 && a < 0) ? q - 1 : q;
}

static inline int32_t dgst_ceil_div(int32_t a, int32_t b) { return -dgst_floor_div(-a, b); }

static inline int32_t dgst_max_i32(int32_t a, int32_t b) { return a > b ? a : b; }

static inline int32_t dgst_min_i32(int32_t a, int32_t b) { return a < b ? a : b; }

/* Output indices o in [*lo, *hi) for which input index o * stride + tap_offset is inside
 * [0, in_size), where tap_offset = tap * dilation - pad. Empty ranges give *lo == *hi. */
static inline void dgst_out_range(int32_t tap_offset, int32_t stride, int32_t in_size,
                                  int32_t out_size, int32_t* lo, int32_t* hi) {
  int32_t l = dgst_max_i32(dgst_ceil_div(-tap_offset, stride), 0);
  int32_t h = dgst_min_i32(dgst_floor_div(in_size - 1 - tap_offset, stride) + 1, out_size);
  *lo = l;
  *hi = h > l ? h : l;
}

/* The output pixels that tap (i, j) pairs with an input pixel inside the image: a rectangle
 * of rows x cols pixels (0 x 0 when the tap only reads padding), found once per tap so that
 * the loops over it need no bounds checks. Offsets and steps count elements of dy (NHWC,
 * dy_channels per pixel) and of the input side (in_channels per pixel: x or dx). When the
 * rows follow each other in memory in both tensors (pointwise convs) the rectangle is one
 * long row. Shared by the Conv2D input gradient and both weight gradients. */
typedef struct {
  int32_t rows, cols;
  int32_t dy_offset, in_offset; /* the first pixel of dy and the input pixel it pairs with */
  int32_t dy_col, in_col;       /* steps between pixels of a row */
  int32_t dy_row, in_row;       /* steps between rows */
} dgst_tap_rect;

static inline dgst_tap_rect dgst_tap_rect_at(const dgst_conv_geometry* g, int32_t i, int32_t j,
                                             int32_t dy_channels, int32_t in_channels) {
  const int32_t off_y = i * g->dilation_h - g->pad_top, off_x = j * g->dilation_w - g->pad_left;
  int32_t oy_lo, oy_hi, ox_lo, ox_hi;
  dgst_tap_rect r;
  dgst_out_range(off_y, g->stride_h, g->in_h, g->out_h, &oy_lo, &oy_hi);
  dgst_out_range(off_x, g->stride_w, g->in_w, g->out_w, &ox_lo, &ox_hi);
  r.rows = oy_hi - oy_lo;
  r.cols = ox_hi - ox_lo;
  r.dy_col = dy_channels;
  r.in_col = g->stride_w * in_channels;
  r.dy_row = g->out_w * dy_channels;
  r.in_row = g->stride_h * g->in_w * in_channels;
  if (r.rows == 0 || r.cols == 0) {
    r.rows = r.cols = 0;
    r.dy_offset = r.in_offset = 0;
    return r;
  }
  r.dy_offset = (oy_lo * g->out_w + ox_lo) * dy_channels;
  r.in_offset = ((oy_lo * g->stride_h + off_y) * g->in_w + ox_lo * g->stride_w + off_x) *
                in_channels;
  if (r.rows > 1 && r.cols == g->out_w && r.in_row == r.cols * r.in_col) {
    r.cols *= r.rows;
    r.rows = 1;
  }
  return r;
}

/* The weight gradients' view of a tap rectangle: pointers to its first dy and x pixels
 * (channel 0), steps in bytes. */
typedef struct {
  const int8_t* dy;
  const int8_t* x;
  int32_t rows, cols;
  int32_t dy_col, x_col; /* byte steps between pixels of a row */
  int32_t dy_row, x_row; /* byte steps between rows */
} dgst_s8_rect;

static inline dgst_s8_rect dgst_s8_rect_at(const dgst_conv_geometry* g, int32_t i, int32_t j,
                                           const int8_t* dy, int32_t dy_channels,
                                           const int8_t* x, int32_t x_channels) {
  const dgst_tap_rect t = dgst_tap_rect_at(g, i, j, dy_channels, x_channels);
  dgst_s8_rect r;
  r.dy = dy + t.dy_offset;
  r.x = x + t.in_offset;
  r.rows = t.rows;
  r.cols = t.cols;
  r.dy_col = t.dy_col;
  r.x_col = t.in_col;
  r.dy_row = t.dy_row;
  r.x_row = t.in_row;
  return r;
}

/* The taps of one axis that read input index `in_idx`, as seen from the input side (for the
 * gather form of the input gradient): taps t = tap0 + n * tap_step with output index
 * o = out0 - n * out_step, for n in [0, count). in_idx = o * stride - pad + t * dilation. */
typedef struct {
  int32_t count, tap0, tap_step, out0, out_step;
} dgst_tap_walk;

static inline int32_t dgst_gcd(int32_t a, int32_t b) {
  while (b != 0) {
    int32_t t = a % b;
    a = b;
    b = t;
  }
  return a;
}

static inline dgst_tap_walk dgst_walk_taps(int32_t in_idx, int32_t pad, int32_t stride,
                                           int32_t dilation, int32_t kernel,
                                           int32_t out_size) {
  dgst_tap_walk w = {0, 0, 1, 0, 1};
  const int32_t base = in_idx + pad; /* o * stride = base - t * dilation */
  const int32_t step = stride / dgst_gcd(stride, dilation);
  int32_t first = -1, t;
  for (t = 0; t < step && t < kernel; ++t) {
    int32_t r = (base - t * dilation) % stride;
    if (r == 0) {
      first = t;
      break;
    }
  }
  if (first >= 0) {
    const int32_t o0 = (base - first * dilation) / stride; /* exact */
    const int32_t ostep = step * dilation / stride;      /* >= 1 */
    const int32_t m_lo = dgst_max_i32(0, dgst_ceil_div(o0 - out_size + 1, ostep));
    const int32_t m_hi = dgst_min_i32(dgst_floor_div(o0, ostep), (kernel - 1 - first) / step);
    if (m_hi >= m_lo) {
      w.count = m_hi - m_lo + 1;
      w.tap0 = first + m_lo * step;
      w.tap_step = step;
      w.out0 = o0 - m_lo * ostep;
      w.out_step = ostep;
    }
  }
  return w;
}

/* TFLite's fixed-point requantization (reference kernels, double rounding):
 * RoundingDivideByPOT(SaturatingRoundingDoublingHighMul(x << left, multiplier), right). */
static inline int32_t dgst_multiply_by_quantized_multiplier(int32_t x, int32_t multiplier,
                                                            int32_t shift) {
  const int32_t left = shift > 0 ? shift : 0, right = shift > 0 ? 0 : -shift;
  const int32_t a = (int32_t)((uint32_t)x << left);
  int32_t high, mask, remainder, threshold;
  if (a == INT32_MIN && multiplier == INT32_MIN) {
    high = INT32_MAX;
  } else {
    const int64_t ab = (int64_t)a * (int64_t)multiplier;
    const int64_t nudge = ab >= 0 ? (1 << 30) : (1 - (1 << 30));
    high = (int32_t)((ab + nudge) / ((int64_t)1 << 31));
  }
  mask = (int32_t)(((int64_t)1 << right) - 1);
  remainder = high & mask;
  threshold = (mask >> 1) + (high < 0 ? 1 : 0);
  return (high >> right) + (remainder > threshold ? 1 : 0);
}

/* Round half away from zero (C99 roundf) to int32, exact for |x| < 2^31. Callers clamp x
 * into range first. */
static inline int32_t dgst_round_to_i32(float x) {
#if defined(__ARM_FEATURE_DIRECTED_ROUNDING) || \
    (defined(__ARM_ARCH_7EM__) && defined(__ARM_FP) && (__ARM_FP & 8))
  /* Armv8 or Cortex-M7 with FPv5-D16 (the only v7E-M FPU with doubles): VRINTA. */
  return (int32_t)__builtin_roundf(x);
#else
  int32_t t = (int32_t)x;        /* truncation: a float-representable integer */
  float frac = x - (float)t;     /* exact */
  return t + (frac >= 0.5f) - (frac <= -0.5f);
#endif
}

/* acc + a * b with two roundings, exactly as written in C without contraction. On Arm VFP
 * one VMLA.F32 does that (it is not fused: product rounded, then sum rounded); GCC only
 * emits it when allowed to contract, and contraction would also allow the fused VFMA,
 * whose single rounding would break bit-exactness with the reference. */
static inline float dgst_mac_f32(float acc, float a, float b) {
#if defined(__ARM_FP) && (__ARM_FP & 4) && defined(__thumb2__) && !defined(DGST_NO_VMLA)
  __asm("vmla.f32 %0, %1, %2" : "+t"(acc) : "t"(a), "t"(b));
  return acc;
#else
  return acc + a * b;
#endif
}

/* max(m, |x|), ignoring a NaN x (VABS + VMAXNM on Cortex-M7). */
static inline float dgst_max_abs_f32(float m, float x) {
#if defined(__ARM_ARCH_7EM__) && defined(__ARM_FP) && (__ARM_FP & 8)
  return __builtin_fmaxf(m, __builtin_fabsf(x));
#else
  const float a = x < 0.0f ? -x : x;
  return a > m ? a : m;
#endif
}

/* Clamp a float to [lo, hi]; NaN becomes lo, so that the conversion that follows is
 * defined (two comparisons, no separate NaN test). */
static inline float dgst_clamp_f32(float x, float lo, float hi) {
#if defined(__ARM_ARCH_7EM__) && defined(__ARM_FP) && (__ARM_FP & 8)
  /* FPv5 (Cortex-M7): VMAXNM / VMINNM, IEEE maxNum / minNum: NaN -> lo as well */
  return __builtin_fminf(__builtin_fmaxf(x, lo), hi);
#else
  x = (x >= lo) ? x : lo;
  return (x <= hi) ? x : hi;
#endif
}

/* The counter-based PRNG of stochastic rounding (one definition; NumPy:
 * reference.stochastic_uniform_bits, TF: dgst_tf.training.qas.stochastic_uniform_bits).
 * A fixed 32-bit integer hash, so u depends only on (seed, stream, step, index): no
 * sequential state, any element can be drawn in any order. */
static inline uint32_t dgst_mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

/* The per-(seed, stream, step) key; the bits of an element are dgst_mix32(key ^ index). */
static inline uint32_t dgst_sr_key(uint32_t seed, uint32_t stream, uint32_t step) {
  return dgst_mix32(dgst_mix32(seed ^ (stream * 0x9E3779B9u)) ^ step);
}

/* u in [0, 1) with 24 random bits: exact in float32. */
static inline float dgst_sr_uniform(uint32_t key, uint32_t index) {
  return (float)(dgst_mix32(key ^ index) >> 8) * (1.0f / 16777216.0f);
}

#ifdef __cplusplus
}
#endif

#endif /* DGST_INTERNAL_H_ */
