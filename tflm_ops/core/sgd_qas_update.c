/* In-place SGD updates with Quantization-Aware Scaling (QAS) of int8 weights and int32
 * biases. With int gradients of the real-valued loss, g(W) = x_scale * dy_scale * grad,
 * W = weight_scale * W_bar, QAS's g(W_bar) * weight_scale^-2 gives the step
 *   W_bar -= lr * x_scale * dy_scale / weight_scale[o] * grad   (per output channel o)
 *   b_bar -= lr * dy_scale * grad / (weight_scale[o] * x_scale).
 * Float order (reproducible bit for bit): factor = ((lr * x_scale) * dy_scale) / ws[o];
 * step = round(factor * (float)grad) (half away from zero); w = clamp(w - step, -127, 127).
 * Steps are clamped to +-1024 (weights) before rounding; that cannot change a result,
 * since any |step| >= 254 saturates anyway.
 * The *_sr_* variants round stochastically instead: w = clamp(w + floor(u - step), -127, 127)
 * with u in [0, 1) from a counter-based hash of (seed, stream, step, index); unbiased, so
 * sub-LSB steps are not lost (see dgst_train_kernels.h). */
#include "dgst_internal.h"
#include "dgst_train_kernels.h"

static inline int8_t step_s8(int8_t w, float factor, int32_t grad) {
  const float s = dgst_clamp_f32(factor * (float)grad, -1024.0f, 1024.0f);
  const int32_t step = dgst_round_to_i32(s);
  int32_t v = (int32_t)w - step;
  v = v < -127 ? -127 : v;
  v = v > 127 ? 127 : v;
  return (int8_t)v;
}

/* floor(u - s) exactly for |s| <= 1024 (no libm): truncate, then step down if it rounded up. */
static inline int8_t sr_step_s8(int8_t w, float factor, int32_t grad, float u) {
  const float s = dgst_clamp_f32(factor * (float)grad, -1024.0f, 1024.0f);
  const float v = u - s;
  int32_t f = (int32_t)v;
  f -= ((float)f > v) ? 1 : 0;
  f += (int32_t)w;
  f = f < -127 ? -127 : f;
  f = f > 127 ? 127 : f;
  return (int8_t)f;
}

uint32_t dgst_stochastic_rounding_bits(uint32_t seed, uint32_t stream, uint32_t step,
                                       uint32_t index) {
  return dgst_mix32(dgst_sr_key(seed, stream, step) ^ index);
}

void dgst_sgd_qas_update_conv_sr_s8(int8_t* w, int32_t c_out, int32_t kernel_h,
                                    int32_t kernel_w, int32_t c_in, const int32_t* kept,
                                    int32_t k, const int32_t* grad, float lr, float x_scale,
                                    float dy_scale, const float* weight_scale,
                                    const dgst_stochastic_rounding* sr) {
  const int32_t taps = kernel_h * kernel_w;
  const float base = lr * x_scale * dy_scale;
  const uint32_t key = dgst_sr_key(sr->seed, sr->stream, sr->step);
  const int32_t* const index_channels = sr->index_channels ? sr->index_channels : kept;
  const uint32_t index_c_in = (uint32_t)(sr->index_c_in > 0 ? sr->index_c_in : c_in);
  int32_t o, t, c;
  for (o = 0; o < c_out; ++o) {
    const float factor = base / weight_scale[o];
    for (t = 0; t < taps; ++t) {
      int8_t* const wt = w + (o * taps + t) * c_in;
      const int32_t* const gt = grad + (o * taps + t) * k;
      const uint32_t row = (uint32_t)(o * taps + t) * index_c_in;
      for (c = 0; c < k; ++c) {
        const float u = dgst_sr_uniform(key, row + (uint32_t)index_channels[c]);
        wt[kept[c]] = sr_step_s8(wt[kept[c]], factor, gt[c], u);
      }
    }
  }
}

void dgst_sgd_qas_update_depthwise_sr_s8(int8_t* w, int32_t kernel_h, int32_t kernel_w,
                                         int32_t channels, const int32_t* kept, int32_t k,
                                         const int32_t* grad, float lr, float x_scale,
                                         float dy_scale, const float* weight_scale,
                                         const dgst_stochastic_rounding* sr) {
  const int32_t taps = kernel_h * kernel_w;
  const float base = lr * x_scale * dy_scale;
  const uint32_t key = dgst_sr_key(sr->seed, sr->stream, sr->step);
  const int32_t* const index_channels = sr->index_channels ? sr->index_channels : kept;
  const uint32_t index_c_in = (uint32_t)(sr->index_c_in > 0 ? sr->index_c_in : channels);
  int32_t t, c;
  for (c = 0; c < k; ++c) {
    const int32_t ch = kept[c];
    const float factor = base / weight_scale[ch];
    for (t = 0; t < taps; ++t) {
      const uint32_t index = (uint32_t)t * index_c_in + (uint32_t)index_channels[c];
      const float u = dgst_sr_uniform(key, index);
      int8_t* const wt = w + t * channels + ch;
      *wt = sr_step_s8(*wt, factor, grad[t * k + c], u);
    }
  }
}

void dgst_sgd_qas_update_conv_s8(int8_t* w, int32_t c_out, int32_t kernel_h, int32_t kernel_w,
                                 int32_t c_in, const int32_t* kept, int32_t k,
                                 const int32_t* grad, float lr, float x_scale, float dy_scale,
                                 const float* weight_scale) {
  const int32_t taps = kernel_h * kernel_w;
  const float base = lr * x_scale * dy_scale;
  int32_t o, t, c;
  for (o = 0; o < c_out; ++o) {
    const float factor = base / weight_scale[o];
    for (t = 0; t < taps; ++t) {
      int8_t* const wt = w + (o * taps + t) * c_in;
      const int32_t* const gt = grad + (o * taps + t) * k;
      for (c = 0; c < k; ++c) wt[kept[c]] = step_s8(wt[kept[c]], factor, gt[c]);
    }
  }
}

void dgst_sgd_qas_update_depthwise_s8(int8_t* w, int32_t kernel_h, int32_t kernel_w,
                                      int32_t channels, const int32_t* kept, int32_t k,
                                      const int32_t* grad, float lr, float x_scale,
                                      float dy_scale, const float* weight_scale) {
  const int32_t taps = kernel_h * kernel_w;
  const float base = lr * x_scale * dy_scale;
  int32_t t, c;
  for (c = 0; c < k; ++c) {
    const int32_t ch = kept[c];
    const float factor = base / weight_scale[ch];
    for (t = 0; t < taps; ++t) {
      int8_t* const wt = w + t * channels + ch;
      *wt = step_s8(*wt, factor, grad[t * k + c]);
    }
  }
}

void dgst_sgd_qas_update_bias_s32(int32_t* b, int32_t channels, const int32_t* grad, float lr,
                                  float x_scale, float dy_scale, const float* weight_scale) {
  const float base = lr * dy_scale;
  int32_t o;
  for (o = 0; o < channels; ++o) {
    /* |step| >= 2^32 saturates whatever b is; at or above 2^23 a float is an integer */
    const float v = dgst_clamp_f32(base * (float)grad[o] / (weight_scale[o] * x_scale),
                                   -4294967296.0f, 4294967296.0f);
    const int64_t step = (v >= 8388608.0f || v <= -8388608.0f) ? (int64_t)v
                                                               : (int64_t)dgst_round_to_i32(v);
    const int64_t r = (int64_t)b[o] - step;
    b[o] = r > INT32_MAX ? INT32_MAX : (r < INT32_MIN ? INT32_MIN : (int32_t)r);
  }
}
