/* Forward int8 convolutions (KxK conv and depthwise, dilation 1) with TFLite's per-channel
 * requantization, the multipliers and shifts given by the caller: in a firmware they are
 * constants in flash, where TFLM's builtin CONV_2D / DEPTHWISE_CONV_2D compute them into
 * 8 bytes of arena per output channel at Prepare. The arithmetic is TFLite's reference int8
 * kernels' (padding taps skipped, requantization of acc + bias), so outputs are bit-identical.
 * Computed one output row at a time; the row functions are also the stages of
 * dgst_fused_block_s8. The dot products over channels use SMLAD on cores with the DSP
 * extension. */
#include <string.h>

#include "dgst_internal.h"

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

static inline int8_t requantize_s8(int32_t acc, const dgst_requant_params* p, int32_t c) {
  int32_t v = dgst_multiply_by_quantized_multiplier(acc + p->bias[c], p->multiplier[c],
                                                    p->shift[c]) + p->output_offset;
  v = dgst_max_i32(v, p->act_min);
  return (int8_t)dgst_min_i32(v, p->act_max);
}

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
      out[oc] = requantize_s8(acc, &p, oc);
    }
  }
}

void dgst_depthwise_conv2d_row_s8(const dgst_conv_geometry* geometry, int32_t channels,
                                  const dgst_requant_params* params, const int8_t* const* rows,
                                  int32_t r, int32_t* acc, int8_t* row) {
  const dgst_conv_geometry g = *geometry;
  const dgst_requant_params p = *params;
  const int32_t iy0 = r * g.stride_h - g.pad_top;
  const int32_t ky_lo = dgst_max_i32(0, -iy0), ky_hi = dgst_min_i32(g.kernel_h, g.in_h - iy0);
  int32_t ox, c, ky, kx;
  for (ox = 0; ox < g.out_w; ++ox) {
    const int32_t ix0 = ox * g.stride_w - g.pad_left;
    const int32_t kx_lo = dgst_max_i32(0, -ix0);
    const int32_t kx_hi = dgst_min_i32(g.kernel_w, g.in_w - ix0);
    int8_t* out = row + ox * channels;
    for (c = 0; c < channels; ++c) acc[c] = 0;
    for (ky = ky_lo; ky < ky_hi; ++ky) {
      const int8_t* in = rows[ky] + ix0 * channels;
      const int8_t* w = p.weights + ky * g.kernel_w * channels;
      for (kx = kx_lo; kx < kx_hi; ++kx) {
        const int8_t* ip = in + kx * channels;
        const int8_t* wp = w + kx * channels;
        for (c = 0; c < channels; ++c) acc[c] += (ip[c] + p.input_offset) * wp[c];
      }
    }
    for (c = 0; c < channels; ++c) out[c] = requantize_s8(acc[c], &p, c);
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
