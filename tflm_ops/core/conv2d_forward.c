/* Forward int8 convolutions (KxK conv and depthwise, dilation 1) with TFLite's per-channel
 * requantization, the multipliers and shifts given by the caller: in a firmware they are
 * constants in flash, where TFLM's builtin CONV_2D / DEPTHWISE_CONV_2D compute them into
 * 8 bytes of arena per output channel at Prepare. The arithmetic is TFLite's reference int8
 * kernels' (padding taps skipped, requantization of acc + bias), so outputs are bit-identical.
 * Computed one output row at a time; the row functions are also the stages of
 * dgst_fused_block_s8. On cores with the DSP extension a 1x1 convolution runs one output
 * channel over the whole row (weights unpacked once into int16 lanes, the input offset folded
 * in as offset * sum(w), SMLAD per 2 MACs) and the depthwise 4 channels over the row (SMLABB /
 * SMLATT, accumulators in registers); both prepare each channel's requantization constants
 * once per row, and the requantization itself is SMLAL-based (requantize_fast), equal to
 * TFLite's double rounding bit for bit; where a channel's accumulator bound and shift allow,
 * it is 32-bit (SMMULR + rounding shift, requantize_short), and a 1x1 channel runs 2 pixels
 * at a time. Cortex-M7: 5.5 instructions per MAC for MobileNetV2-0.35's block_1 at 128x128
 * (dgst_fused_block_s8, benchmarks/mcu_kernels.py), 8.5 before.
 */
#include <string.h>

#include "dgst_internal.h"

/* The DSP stages stay functions of their own: inlined into the generic row loops, GCC spills
 * their registers. */
#if defined(__GNUC__)
#define DGST_NOINLINE __attribute__((noinline))
#else
#define DGST_NOINLINE
#endif

/* sum_i (x[i] + x_offset) * w[i]: x + offset fits an int16 lane (|x + offset| <= 255). */
static inline int32_t dot_s8(const int8_t* x, int32_t x_offset, const int8_t* w, int32_t n) {
  int32_t acc = 0, i = 0;
#if DGST_USE_ARM_DSP
  const int32_t offset2 = (int32_t)(((uint32_t)(uint16_t)x_offset << 16) | (uint16_t)x_offset);
  for (; i + 4 <= n; i += 4) {
    uint32_t xv, wv;
    memcpy(&xv, x + i, 4);
    memcpy(&wv, w + i, 4);
    acc = __smlad(__sadd16(__sxtb16((int32_t)xv), offset2), __sxtb16((int32_t)wv), acc);
    acc = __smlad(__sadd16(dgst_sxtb16_ror8(xv), offset2), dgst_sxtb16_ror8(wv), acc);
  }
#endif
  for (; i < n; ++i) acc += (x[i] + x_offset) * w[i];
  return acc;
}

/* TFLite's MultiplyByQuantizedMultiplier for one output channel, its constants prepared
 * once: (a * m + 2^30) >> 31 (floor) equals SaturatingRoundingDoublingHighMul's
 * truncated (a * m + nudge) / 2^31 for every a whenever m != INT32_MIN (for a * m < 0 both
 * are -floor((|a * m| + 2^30 - 1) / 2^31)), then RoundingDivideByPOT. */
typedef struct {
  int32_t bias, multiplier, left, right, mask, half, exact;
} requant_channel;

static inline requant_channel requant_channel_of(const dgst_requant_params* p, int32_t c) {
  requant_channel r;
  const int32_t shift = p->shift[c];
  r.bias = p->bias[c];
  r.multiplier = p->multiplier[c];
  r.left = shift > 0 ? shift : 0;
  r.right = shift > 0 ? 0 : -shift;
  r.mask = (int32_t)(((uint32_t)1 << r.right) - 1u);
  r.half = r.mask >> 1;
  r.exact = r.multiplier != INT32_MIN && r.right < 31;
  return r;
}

static inline int8_t requantize_fast(int32_t acc, const requant_channel* r, int32_t offset,
                                     int32_t act_min, int32_t act_max) {
  int32_t v;
  if (r->exact) {
    const int32_t a = (int32_t)((uint32_t)(acc + r->bias) << r->left);
    const int32_t high = (int32_t)(((int64_t)a * r->multiplier + (1 << 30)) >> 31);
    const int32_t threshold = r->half + (int32_t)((uint32_t)high >> 31);
    v = (high >> r->right) + ((high & r->mask) > threshold) + offset;
  } else {
    const int32_t shift = r->left > 0 ? r->left : -r->right;
    v = dgst_multiply_by_quantized_multiplier(acc + r->bias, r->multiplier, shift) + offset;
  }
  v = dgst_max_i32(v, act_min);
  return (int8_t)dgst_min_i32(v, act_max);
}

#if DGST_USE_ARM_DSP

/* The same requantization in 32-bit arithmetic, for a channel with right shift 1..21 and
 * |acc + bias| < 2^30 (requant_short_of checks a bound on it): with |2a| < 2^31,
 * SMMULR(2a, m) = (2am + 2^31) >> 32 = (am + 2^30) >> 31, the high product above; then
 * RoundingDivideByPOT plus the output offset is (h + 2^(right-1) - (h < 0) + offset << right)
 * >> right (round half away from zero, the offset a multiple of 2^right). */
typedef struct {
  int32_t multiplier, add, right;
} requant_short;

static inline int32_t smmulr(int32_t a, int32_t b) {
  int32_t r;
  __asm("smmulr %0, %1, %2" : "=r"(r) : "r"(a), "r"(b));
  return r;
}

/* Whether channel c takes requant_short when |acc| <= n_terms * 255 * 128 before the bias
 * (|x + input_offset| <= 255, |w| <= 128). */
static inline int32_t requant_short_of(const dgst_requant_params* p, int32_t c, int32_t n_terms,
                                       requant_short* r) {
  const int32_t shift = p->shift[c], bias = p->bias[c];
  const int64_t bound = (int64_t)n_terms * 255 * 128 + (bias < 0 ? -(int64_t)bias : bias);
  const int32_t right = shift <= -1 && shift >= -21 ? -shift : 0;
  r->multiplier = p->multiplier[c];
  r->right = right;
  r->add = 0;
  if (right == 0 || bound >= ((int64_t)1 << 30) || r->multiplier == INT32_MIN) return 0;
  r->add = (int32_t)(((uint32_t)1 << (right - 1)) + ((uint32_t)p->output_offset << right));
  return 1;
}

static inline int32_t requantize_short(int32_t acc, const requant_short* r) {
  const int32_t h = smmulr((int32_t)((uint32_t)acc << 1), r->multiplier);
  return (h + (h >> 31) + r->add) >> r->right;
}

static inline int8_t clamp_s8(int32_t v, int32_t act_min, int32_t act_max) {
  v = dgst_max_i32(v, act_min);
  return (int8_t)dgst_min_i32(v, act_max);
}

/* A 1x1 convolution of one row of n pixels (x: [n][in_c]) into row [n][out_c], one output
 * channel at a time over the whole row: its weights are unpacked once into int16 lanes
 * (c, c + 2), (c + 1, c + 3) per 4 channels, its requantization constants and the input
 * offset's share offset * sum(w) found once, then per pixel and 4 input channels
 * LDR + 2 SXTB16 of the input, LDRD of the weight lanes, 2 SMLAD. */
#define POINTWISE_MAX_C 128 /* input channels of the 1x1 path (weight lanes on the stack) */

/* The weights w[0..c4) of one output channel as int16 lanes (c, c + 2), (c + 1, c + 3) per 4
 * input channels. */
static inline void weight_lanes(const int8_t* w, int32_t c4, int32_t* lanes) {
  int32_t c;
  for (c = 0; c < c4; c += 4) {
    uint32_t v;
    memcpy(&v, w + c, 4);
    lanes[c / 2] = __sxtb16((int32_t)v);
    lanes[c / 2 + 1] = dgst_sxtb16_ror8(v);
  }
}

/* acc plus one pixel's products: its input channels x[0..c4) with the weight lanes
 * [l, lanes_end) of weight_lanes (per 4 channels LDR + 2 SXTB16, 2 SMLAD). */
static inline int32_t dot_lanes(const int8_t* x, const int32_t* l, const int32_t* lanes_end,
                                int32_t acc) {
  for (; l != lanes_end; l += 2, x += 4) {
    uint32_t v;
    memcpy(&v, x, 4);
    acc = __smlad(__sxtb16((int32_t)v), l[0], acc);
    acc = __smlad(dgst_sxtb16_ror8(v), l[1], acc);
  }
  return acc;
}

/* Output channel oc of a 1x1 row over n pixels: with in_c a multiple of 4 and requant_short,
 * 2 pixels at a time sharing the weight-lane loads, else TFLite's 64-bit requantization
 * (requantize_fast) pixel by pixel. */
static DGST_NOINLINE void pointwise_channel(const int8_t* x, int32_t n, int32_t in_c,
                                            int32_t out_c, const dgst_requant_params* p,
                                            int32_t oc, int8_t* out) {
  int32_t lanes[POINTWISE_MAX_C / 2];
  const int8_t* const w = p->weights + oc * in_c;
  const int32_t c4 = in_c & ~3, act_min = p->act_min, act_max = p->act_max;
  const int32_t* const lanes_end = lanes + c4 / 2;
  requant_short r;
  int32_t w_sum = 0, c;
  for (c = 0; c < in_c; ++c) w_sum += w[c];
  w_sum *= p->input_offset; /* sum (x + offset) * w = sum x * w + offset * sum w */
  weight_lanes(w, c4, lanes);
  if (c4 == in_c && requant_short_of(p, oc, in_c, &r)) {
    const int8_t* const x_end = x + (n & ~1) * in_c;
    const int32_t init = w_sum + p->bias[oc];
    for (; x != x_end; x += 2 * in_c, out += 2 * out_c) {
      const int32_t* l = lanes;
      const int8_t* xc = x;
      int32_t acc0 = init, acc1 = init;
      for (; l != lanes_end; l += 2, xc += 4) {
        uint32_t v0, v1;
        const int32_t w0 = l[0], w1 = l[1];
        memcpy(&v0, xc, 4);
        memcpy(&v1, xc + in_c, 4);
        acc0 = __smlad(__sxtb16((int32_t)v0), w0, acc0);
        acc1 = __smlad(__sxtb16((int32_t)v1), w0, acc1);
        acc0 = __smlad(dgst_sxtb16_ror8(v0), w1, acc0);
        acc1 = __smlad(dgst_sxtb16_ror8(v1), w1, acc1);
      }
      out[0] = clamp_s8(requantize_short(acc0, &r), act_min, act_max);
      out[out_c] = clamp_s8(requantize_short(acc1, &r), act_min, act_max);
    }
    if (n & 1)
      *out = clamp_s8(requantize_short(dot_lanes(x, lanes, lanes_end, init), &r), act_min,
                      act_max);
  } else {
    const requant_channel rq = requant_channel_of(p, oc);
    const int32_t out_offset = p->output_offset;
    int32_t px;
    for (px = 0; px < n; ++px, x += in_c, out += out_c) {
      int32_t acc = dot_lanes(x, lanes, lanes_end, w_sum);
      for (c = c4; c < in_c; ++c) acc += x[c] * w[c];
      *out = requantize_fast(acc, &rq, out_offset, act_min, act_max);
    }
  }
}

static DGST_NOINLINE void pointwise_row(const int8_t* x, int32_t n, int32_t in_c,
                                        int32_t out_c, const dgst_requant_params* p,
                                        int8_t* row) {
  int32_t oc;
  for (oc = 0; oc < out_c; ++oc) pointwise_channel(x, n, in_c, out_c, p, oc, row + oc);
}

#endif

/* The geometry and parameters are copied into locals: int8 stores may alias any object, so
 * fields read through the pointers would be reloaded after every store. */
void dgst_conv2d_row_s8(const dgst_conv_geometry* geometry, int32_t in_c, int32_t out_c,
                        const dgst_requant_params* params, const int8_t* x, int32_t r,
                        int8_t* row) {
  const dgst_conv_geometry g = *geometry;
  const dgst_requant_params p = *params;
  const int32_t iy0 = r * g.stride_h - g.pad_top;
  const int32_t ky_lo = dgst_max_i32(0, -iy0), ky_hi = dgst_min_i32(g.kernel_h, g.in_h - iy0);
  const int32_t filter = g.kernel_h * g.kernel_w * in_c;
  int32_t ox, oc, ky, kx;
#if DGST_USE_ARM_DSP
  if (g.kernel_h == 1 && g.kernel_w == 1 && g.stride_w == 1 && g.pad_left == 0 &&
      g.pad_top == 0 && in_c <= POINTWISE_MAX_C && g.out_w <= g.in_w && iy0 < g.in_h) {
    pointwise_row(x + iy0 * g.in_w * in_c, g.out_w, in_c, out_c, &p, row);
    return;
  }
#endif
  for (ox = 0; ox < g.out_w; ++ox) {
    const int32_t ix0 = ox * g.stride_w - g.pad_left;
    const int32_t kx_lo = dgst_max_i32(0, -ix0);
    const int32_t kx_hi = dgst_min_i32(g.kernel_w, g.in_w - ix0);
    int8_t* out = row + ox * out_c;
    for (oc = 0; oc < out_c; ++oc) {
      const int8_t* w = p.weights + oc * filter;
      int32_t acc = 0;
      for (ky = ky_lo; ky < ky_hi; ++ky) {
        for (kx = kx_lo; kx < kx_hi; ++kx) {
          acc += dot_s8(x + ((iy0 + ky) * g.in_w + ix0 + kx) * in_c, p.input_offset,
                        w + (ky * g.kernel_w + kx) * in_c, in_c);
        }
      }
      {
        const requant_channel rq = requant_channel_of(&p, oc);
        out[oc] = requantize_fast(acc, &rq, p.output_offset, p.act_min, p.act_max);
      }
    }
  }
}

#if DGST_USE_ARM_DSP
/* The first c4 channels of a depthwise output row, 4 at a time over the whole row (their
 * requantization constants found once): per pixel and tap LDR of x and of w, SXTB16 / SADD16
 * into (c, c + 2), (c + 1, c + 3) lanes, SMLABB / SMLATT into 4 accumulators in registers. */
static DGST_NOINLINE void depthwise_groups(const dgst_conv_geometry* g, int32_t channels,
                             const dgst_requant_params* p, const int8_t* const* rows,
                             int32_t ky_lo, int32_t ky_hi, int32_t c4, int32_t offset2,
                             int8_t* row) {
  const int32_t out_offset = p->output_offset, act_min = p->act_min, act_max = p->act_max;
  int32_t c, ox, ky, kx;
  for (c = 0; c < c4; c += 4) {
    const requant_channel r0 = requant_channel_of(p, c), r1 = requant_channel_of(p, c + 1);
    const requant_channel r2 = requant_channel_of(p, c + 2), r3 = requant_channel_of(p, c + 3);
    const int32_t taps = g->kernel_h * g->kernel_w;
    requant_short s0, s1, s2, s3;
    const int32_t short_rq = requant_short_of(p, c, taps, &s0) &
                             requant_short_of(p, c + 1, taps, &s1) &
                             requant_short_of(p, c + 2, taps, &s2) &
                             requant_short_of(p, c + 3, taps, &s3);
    for (ox = 0; ox < g->out_w; ++ox) {
      const int32_t ix0 = ox * g->stride_w - g->pad_left;
      const int32_t kx_lo = dgst_max_i32(0, -ix0);
      const int32_t kx_hi = dgst_min_i32(g->kernel_w, g->in_w - ix0);
      int8_t* const out = row + ox * channels + c;
      int32_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
      for (ky = ky_lo; ky < ky_hi; ++ky) {
        const int8_t* ip = rows[ky] + (ix0 + kx_lo) * channels + c;
        const int8_t* wp = p->weights + (ky * g->kernel_w + kx_lo) * channels + c;
        for (kx = kx_lo; kx < kx_hi; ++kx, ip += channels, wp += channels) {
          uint32_t xv, wv;
          int32_t x02, x13, w02, w13;
          memcpy(&xv, ip, 4);
          memcpy(&wv, wp, 4);
          x02 = __sadd16(__sxtb16((int32_t)xv), offset2);
          x13 = __sadd16(dgst_sxtb16_ror8(xv), offset2);
          w02 = __sxtb16((int32_t)wv);
          w13 = dgst_sxtb16_ror8(wv);
          a0 = __smlabb(x02, w02, a0);
          a2 = __smlatt(x02, w02, a2);
          a1 = __smlabb(x13, w13, a1);
          a3 = __smlatt(x13, w13, a3);
        }
      }
      if (short_rq) {
        out[0] = clamp_s8(requantize_short(a0 + r0.bias, &s0), act_min, act_max);
        out[1] = clamp_s8(requantize_short(a1 + r1.bias, &s1), act_min, act_max);
        out[2] = clamp_s8(requantize_short(a2 + r2.bias, &s2), act_min, act_max);
        out[3] = clamp_s8(requantize_short(a3 + r3.bias, &s3), act_min, act_max);
        continue;
      }
      out[0] = requantize_fast(a0, &r0, out_offset, act_min, act_max);
      out[1] = requantize_fast(a1, &r1, out_offset, act_min, act_max);
      out[2] = requantize_fast(a2, &r2, out_offset, act_min, act_max);
      out[3] = requantize_fast(a3, &r3, out_offset, act_min, act_max);
    }
  }
}
#endif

void dgst_depthwise_conv2d_row_s8(const dgst_conv_geometry* geometry, int32_t channels,
                                  const dgst_requant_params* params, const int8_t* const* rows,
                                  int32_t r, int32_t* acc, int8_t* row) {
  const dgst_conv_geometry g = *geometry;
  const dgst_requant_params p = *params;
  const int32_t iy0 = r * g.stride_h - g.pad_top;
  const int32_t ky_lo = dgst_max_i32(0, -iy0), ky_hi = dgst_min_i32(g.kernel_h, g.in_h - iy0);
  int32_t ox, c, ky, kx;
#if DGST_USE_ARM_DSP
  const int32_t c4 = channels & ~3;
  const int32_t offset2 = (int32_t)(((uint32_t)(uint16_t)p.input_offset << 16) |
                                    (uint16_t)p.input_offset);
#else
  const int32_t c4 = 0;
#endif
#if DGST_USE_ARM_DSP
  depthwise_groups(&g, channels, &p, rows, ky_lo, ky_hi, c4, offset2, row);
#endif
  for (ox = 0; ox < g.out_w; ++ox) {
    const int32_t ix0 = ox * g.stride_w - g.pad_left;
    const int32_t kx_lo = dgst_max_i32(0, -ix0);
    const int32_t kx_hi = dgst_min_i32(g.kernel_w, g.in_w - ix0);
    int8_t* out = row + ox * channels;
    if (c4 == channels) continue;
    for (c = c4; c < channels; ++c) acc[c] = 0;
    for (ky = ky_lo; ky < ky_hi; ++ky) {
      const int8_t* in = rows[ky] + ix0 * channels;
      const int8_t* w = p.weights + ky * g.kernel_w * channels;
      for (kx = kx_lo; kx < kx_hi; ++kx) {
        const int8_t* ip = in + kx * channels;
        const int8_t* wp = w + kx * channels;
        for (c = c4; c < channels; ++c) acc[c] += (ip[c] + p.input_offset) * wp[c];
      }
    }
    for (c = c4; c < channels; ++c) {
      const requant_channel rq = requant_channel_of(&p, c);
      out[c] = requantize_fast(acc[c], &rq, p.output_offset, p.act_min, p.act_max);
    }
  }
}

void dgst_conv2d_s8(const dgst_conv_geometry* g, int32_t in_c, int32_t out_c,
                    const dgst_requant_params* p, const int8_t* x, int8_t* y) {
  int32_t r;
  for (r = 0; r < g->out_h; ++r) {
    dgst_conv2d_row_s8(g, in_c, out_c, p, x, r, y + r * g->out_w * out_c);
  }
}

void dgst_depthwise_conv2d_s8(const dgst_conv_geometry* g, int32_t channels,
                              const dgst_requant_params* p, const int8_t* x, int8_t* y,
                              int32_t* acc) {
  const int32_t row_bytes = g->in_w * channels;
  const int8_t* rows[DGST_DEPTHWISE_MAX_KERNEL_H];
  int32_t r, ky;
  for (r = 0; r < g->out_h; ++r) {
    const int32_t iy0 = r * g->stride_h - g->pad_top;
    for (ky = 0; ky < g->kernel_h; ++ky) {
      const int32_t iy = iy0 + ky;
      rows[ky] = iy >= 0 && iy < g->in_h ? x + iy * row_bytes : x; /* x: never read */
    }
    dgst_depthwise_conv2d_row_s8(g, channels, p, rows, r, acc, y + r * g->out_w * channels);
  }
}
