/* Per-tensor symmetric int8 quantization of a float gradient (the inter-layer error
 * signal): *scale = max|g| / 127 (1.0f if all zero);
 * out[i] = clamp(round(g[i] / *scale), -127, 127), round half away from zero.
 * The division is kept (not a multiply by 127 / max) so that results match the contract
 * bit for bit. out is written from the last element to the first, each after its g[i] is
 * read, so out may lie in place at the end of g's memory (the training step's offline
 * memory plan puts it at >= 3 * (n - 1) bytes after g: out[i] then never overwrites a
 * g[j], j < i, still to be read). */
#include "dgst_internal.h"
#include "dgst_train_kernels.h"

void dgst_quantize_grad_s8(const float* g, int32_t n, int8_t* out, float* scale) {
  float m = 0.0f, s;
  int32_t i;
  for (i = 0; i < n; ++i) m = dgst_max_abs_f32(m, g[i]);
  s = m > 0.0f ? m / 127.0f : 1.0f;
  *scale = s;
  for (i = n - 1; i >= 0; --i) {
    const float q = dgst_clamp_f32(g[i] / s, -127.0f, 127.0f);
    out[i] = (int8_t)dgst_round_to_i32(q);
  }
}

/* The same for the gradient of a global average pooling's input, never materialized in
 * float: element (p, c) is g[c] * factor where bit p * channels + c of mask is set (mask may
 * be NULL), else +0.0f; scale and codes as dgst_quantize_grad_s8 of that tensor. */
void dgst_quantize_broadcast_grad_s8(const float* g, int32_t pixels, int32_t channels,
                                     float factor, const uint8_t* mask, int8_t* out,
                                     float* scale) {
  float m = 0.0f, s;
  int32_t p, c, i;
  for (p = 0, i = 0; p < pixels; ++p) {
    for (c = 0; c < channels; ++c, ++i) {
      if (mask == 0 || ((mask[i >> 3] >> (i & 7)) & 1u)) m = dgst_max_abs_f32(m, g[c] * factor);
    }
  }
  s = m > 0.0f ? m / 127.0f : 1.0f;
  *scale = s;
  for (p = 0, i = 0; p < pixels; ++p) {
    for (c = 0; c < channels; ++c, ++i) {
      const float v = (mask == 0 || ((mask[i >> 3] >> (i & 7)) & 1u)) ? g[c] * factor : 0.0f;
      out[i] = (int8_t)dgst_round_to_i32(dgst_clamp_f32(v / s, -127.0f, 127.0f));
    }
  }
}
