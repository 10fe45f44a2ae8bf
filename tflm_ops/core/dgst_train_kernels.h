/* dgst-tf on-device training kernels: the portable C99 cores.
 *
 * No TFLM types, no allocation, no I/O. Layouts follow TFLite: activations NHWC with
 * batch 1 (so [H][W][C]), Conv2D filters OHWI ([C_out][K_h][K_w][C_in]), depthwise filters
 * [1][K_h][K_w][C] (multiplier 1). int8 activations carry a per-tensor zero point; int8
 * weights are symmetric per output channel (W_bar, zero point 0); biases int32 (b_bar).
 *
 * The training step's error signal between layers ("dy") is int8 with a per-tensor scale
 * chosen each step from its max |value| (dgst_quantize_grad_s8). Gradient accumulators are
 * int32. Float is used only where an MCU uses its FPU: per-channel scale factors of the
 * update and the loss gradient.
 *
 * Rounding everywhere: round half away from zero (C99 roundf / lroundf semantics).
 */
#ifndef DGST_TRAIN_KERNELS_H_
#define DGST_TRAIN_KERNELS_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Geometry of a 2-D convolution (batch 1). Padding is explicit: TFLite SAME padding is
 * expressed as pad_top/pad_left (extra bottom/right padding is implied by the sizes). */
typedef struct {
  int32_t in_h, in_w;        /* input spatial size */
  int32_t out_h, out_w;      /* output spatial size */
  int32_t kernel_h, kernel_w;
  int32_t stride_h, stride_w;
  int32_t dilation_h, dilation_w;
  int32_t pad_top, pad_left;
} dgst_conv_geometry;

/* Loss gradient of softmax cross-entropy on dequantized logits:
 * p = softmax(scale * (logits - zero_point)); grad[i] = p[i] - (i == label).
 * Returns the loss (-log p[label]). */
float dgst_softmax_xent_grad(const int8_t* logits, int32_t classes, float scale,
                             int32_t zero_point, int32_t label, float* grad);

/* Quantize a float gradient to int8 with a per-tensor symmetric scale:
 * *scale = max|g| / 127 (1.0f if all zero); out[i] = clamp(round(g[i] / *scale), -127, 127).
 * out is written from the last element to the first, so it may start >= 3 * (n - 1) bytes
 * into g's memory (computed in place). */
void dgst_quantize_grad_s8(const float* g, int32_t n, int8_t* out, float* scale);

/* dgst_quantize_grad_s8 of the [pixels][channels] tensor x[p][c] = g[c] * factor masked by
 * mask (1 bit per element, NULL for none), without materializing x: the gradient of a
 * global average pooling's input (factor = 1 / pixels). */
void dgst_quantize_broadcast_grad_s8(const float* g, int32_t pixels, int32_t channels,
                                     float factor, const uint8_t* mask, int8_t* out,
                                     float* scale);

/* Weight gradient of a Conv2D for the kept input channels only.
 * x_kept: the saved input activation, only the k kept channels, [in_h][in_w][k].
 * dy: [out_h][out_w][c_out]. grad (int32, overwritten): [c_out][kernel_h][kernel_w][k],
 * grad[o][i][j][c] = sum over output pixels of dy[oy][ox][o] * (x_kept[iy][ix][c] - x_zero_point),
 * iy = oy*stride_h - pad_top + i*dilation_h (likewise ix); out-of-range taps contribute 0. */
void dgst_conv2d_weight_grad_s8(const dgst_conv_geometry* g, const int8_t* x_kept, int32_t k,
                                int32_t x_zero_point, const int8_t* dy, int32_t c_out,
                                int32_t* grad);

/* Weight gradient of a depthwise conv (multiplier 1) for the kept channels `kept[0..k)`.
 * x_kept: [in_h][in_w][k] (channel j of it is channel kept[j] of the layer);
 * dy: [out_h][out_w][channels]; grad (int32, overwritten): [kernel_h][kernel_w][k]. */
void dgst_depthwise_weight_grad_s8(const dgst_conv_geometry* g, const int8_t* x_kept,
                                   const int32_t* kept, int32_t k, int32_t x_zero_point,
                                   const int8_t* dy, int32_t channels, int32_t* grad);

/* Bias gradient: grad[o] = sum over pixels of dy[..][o] (int32, overwritten). */
void dgst_bias_grad_s8(const int8_t* dy, int32_t pixels, int32_t channels, int32_t* grad);

/* Input gradient of a Conv2D (the transposed convolution), float accumulation:
 * dx[iy][ix][c] = dy_scale * sum_{o,i,j} weight_scale[o] * dy[oy][ox][o] * w[o][i][j][c]
 * over the (oy, ox, i, j) that map to (iy, ix). dx: float [in_h][in_w][c_in], overwritten. */
void dgst_conv2d_input_grad_s8(const dgst_conv_geometry* g, const int8_t* dy, float dy_scale,
                               const int8_t* w, const float* weight_scale, int32_t c_in,
                               int32_t c_out, float* dx);

/* Input gradient of a depthwise conv (multiplier 1), same conventions; dx overwritten. */
void dgst_depthwise_input_grad_s8(const dgst_conv_geometry* g, const int8_t* dy,
                                  float dy_scale, const int8_t* w, const float* weight_scale,
                                  int32_t channels, float* dx);

/* Backward of an int8 elementwise activation y = f(x) (swish, hard-swish, sigmoid):
 * dx[i] = g[i] * table[x[i] + 128], table[q + 128] = f'(s * (q - z)) for the codes q of the
 * saved int8 input x (its scale s, zero point z). dx may be g (in place). */
void dgst_activation_grad_f32(const float* g, const int8_t* x, const float* table, int32_t n,
                              float* dx);

/* ReLU / ReLU6 derivative from a 1-bit mask: g[i] = bit i of mask ? g[i] : 0.
 * Bit i is (mask[i >> 3] >> (i & 7)) & 1. */
void dgst_apply_mask_f32(float* g, const uint8_t* mask, int32_t n);

/* Build the 1-bit mask of an int8 ReLU/ReLU6 output y: set where lo < y < hi
 * (lo = zero point of real 0, hi = code of real 6, or 127 for plain ReLU). */
void dgst_build_mask_s8(const int8_t* y, int32_t n, int8_t lo, int8_t hi, uint8_t* mask);

/* Gather the kept channels of a channels-last activation [pixels][channels] into
 * out [pixels][k]: out[p][j] = x[p][kept[j]] (kept in range; the saved input of a layer whose
 * weights are updated for k input channels only). */
void dgst_gather_channels_s8(const int8_t* x, int32_t pixels, int32_t channels,
                             const int32_t* kept, int32_t k, int8_t* out);

/* Its inverse over rows of a channels-last tensor: out[r][c] = base[r][c], then
 * out[r][kept[j]] = src[r][j] (src [rows][k]). Assembles the full kernel of a layer whose RAM
 * holds only the weights of its kept input channels (kept in range). */
void dgst_scatter_channels_s8(const int8_t* base, const int8_t* src, int32_t rows,
                              int32_t channels, const int32_t* kept, int32_t k, int8_t* out);

/* Dynamic channel selection, evaluated on device at the start of each step; kept[0..k) is
 * written in increasing order.
 * DGSU selection (Li & Chang 2024; policies "traversal" and "magnitude"): scores from
 * dgst_channel_scores_s8, ranked by dgst_select_ranked. Integer importance, identical on
 * device, in NumPy and in the Keras int8 simulation:
 *   score[c] = sum_o m[o] * sum_t w[o][t][c]^2   (w [c_out][taps][c_in], int64)
 *   score[c] = m[c] * sum_t w[t][c]^2            (depthwise: w [taps][c_in])
 * m[o] = round(2^16 * s[o]^2 / max s^2) (int32, from the weight scales s, fixed at export).
 * dgst_select_ranked: with `visited` (a bitmask of c_in bits, bit c of byte c / 8, updated in
 * place; "traversal"): if every channel is visited the mask is cleared (a new sweep); rank
 * not-yet-visited channels first, then visited; within a group by score descending; ties
 * to the lower index; keep the first k and mark them visited. visited = NULL ("magnitude"):
 * top-k by score. `scores` (c_in values, >= 0) is consumed (overwritten).
 * Window ("window"): the k channels starting at (step * k) mod c_in, wrapping.
 * Float magnitude (format of graphs with float weight scales): the k channels with the
 * largest sum_o (weight_scale[o] * w[o][t][c])^2; norms: caller scratch of c_in floats. */
void dgst_channel_scores_s8(const int8_t* w, const int32_t* multiplier, int32_t c_out,
                            int32_t taps, int32_t c_in, int32_t depthwise, int64_t* scores);
void dgst_select_ranked(int64_t* scores, int32_t c_in, int32_t k, uint8_t* visited,
                        int32_t* kept);
/* The same with active = 0 for a layer the layer schedule leaves out this step: a finished
 * sweep still restarts and the choice is the same, but nothing is marked visited. */
void dgst_select_ranked_scheduled(int64_t* scores, int32_t c_in, int32_t k, uint8_t* visited,
                                  int32_t active, int32_t* kept);

/* Layer schedule (DGSU's stage-aware layer choice, layers_per_step = per_step): 1 if
 * weight-updated layer `layer` (0-based of `layers`, execution order, classifier excluded)
 * updates its weights at step `step`, else 0:
 *   active <=> (layer - step * per_step) mod layers < per_step   (mod >= 0; 1 if
 *   per_step >= layers). The definition, and why: dgst_tf.tflm_ops.reference.layer_active.
 * `step` is the graph's uint32 step counter (sgd/step); needs layers >= 1, per_step >= 1. */
int32_t dgst_layer_active(uint32_t step, int32_t layer, int32_t layers, int32_t per_step);
void dgst_select_window(int32_t step, int32_t c_in, int32_t k, int32_t* kept);
void dgst_select_magnitude_s8(const int8_t* w, const float* weight_scale, int32_t c_out,
                              int32_t taps, int32_t c_in, int32_t depthwise, int32_t k,
                              float* norms, int32_t* kept);

/* In-place SGD update with Quantization-Aware Scaling of int8 weights of the kept input
 * channels. For output channel o: factor_o = lr * x_scale * dy_scale / weight_scale[o];
 * w[o][i][j][kept[c]] = clamp(w - round(factor_o * grad[o][i][j][c]), -127, 127).
 * w: [c_out][kernel_h][kernel_w][c_in] in RAM; grad as from dgst_conv2d_weight_grad_s8. */
void dgst_sgd_qas_update_conv_s8(int8_t* w, int32_t c_out, int32_t kernel_h, int32_t kernel_w,
                                 int32_t c_in, const int32_t* kept, int32_t k,
                                 const int32_t* grad, float lr, float x_scale, float dy_scale,
                                 const float* weight_scale);

/* Same for a depthwise filter [1][kernel_h][kernel_w][channels]; channel kept[c] uses
 * factor = lr * x_scale * dy_scale / weight_scale[kept[c]]. */
void dgst_sgd_qas_update_depthwise_s8(int8_t* w, int32_t kernel_h, int32_t kernel_w,
                                      int32_t channels, const int32_t* kept, int32_t k,
                                      const int32_t* grad, float lr, float x_scale,
                                      float dy_scale, const float* weight_scale);

/* Stochastic rounding of the same steps (rounding="stochastic"): with the float step
 * s = clamp(factor * grad, -1024, 1024) of the functions above,
 *   w = clamp(w + floor((u - s)), -127, 127),  u = (h >> 8) * 2^-24 in [0, 1),
 *   h = mix32(key ^ index), key = mix32(mix32(seed ^ stream * 0x9E3779B9) ^ step)
 * (u - s in float32; mix32 and the key: dgst_internal.h). E[floor(u - s)] = -s, so the
 * update is unbiased and steps smaller than one LSB accumulate in expectation instead of
 * rounding to zero every step (Gupta et al. 2015, "Deep Learning with Limited Numerical
 * Precision"; Lin et al. 2022 report int8 SGD losing accuracy). u is a hash of the
 * element's coordinates, not a stored state: no SRAM. index = the element's index in the
 * full kernel layout: conv ((o * kernel_h + i) * kernel_w + j) * index_c_in + channel,
 * depthwise (i * kernel_w + j) * index_c_in + channel, Dense o * index_c_in + channel, with
 * channel = index_channels[c] (NULL: kept[c]) and index_c_in (0: c_in), so an update of a
 * compact copy of the kept channels draws the same u as one of the full kernel. */
typedef struct {
  uint32_t seed;   /* the export's seed */
  uint32_t stream; /* the layer's id */
  uint32_t step;   /* the training step, 0 for the first */
  const int32_t* index_channels; /* [k] or NULL */
  int32_t index_c_in;            /* or 0 */
} dgst_stochastic_rounding;

void dgst_sgd_qas_update_conv_sr_s8(int8_t* w, int32_t c_out, int32_t kernel_h,
                                    int32_t kernel_w, int32_t c_in, const int32_t* kept,
                                    int32_t k, const int32_t* grad, float lr, float x_scale,
                                    float dy_scale, const float* weight_scale,
                                    const dgst_stochastic_rounding* sr);

void dgst_sgd_qas_update_depthwise_sr_s8(int8_t* w, int32_t kernel_h, int32_t kernel_w,
                                         int32_t channels, const int32_t* kept, int32_t k,
                                         const int32_t* grad, float lr, float x_scale,
                                         float dy_scale, const float* weight_scale,
                                         const dgst_stochastic_rounding* sr);

/* The 32 hash bits h of one element (for testing the PRNG against its other definitions). */
uint32_t dgst_stochastic_rounding_bits(uint32_t seed, uint32_t stream, uint32_t step,
                                       uint32_t index);

/* Bias update with QAS: b[o] -= round(lr * dy_scale * grad[o] / (weight_scale[o] * x_scale)). */
void dgst_sgd_qas_update_bias_s32(int32_t* b, int32_t channels, const int32_t* grad, float lr,
                                  float x_scale, float dy_scale, const float* weight_scale);

/* ---- Forward: a frozen block computed row by row (dgst_fused_block_s8) ---------------- */

/* One int8 convolution stage with TFLite's per-channel requantization:
 * out[c] = clamp(MultiplyByQuantizedMultiplier(acc + bias[c], multiplier[c], shift[c])
 *                + output_offset, act_min, act_max), acc = sum (x + input_offset) * w. */
typedef struct {
  const int8_t* weights;      /* conv OHWI [C_out][K_h][K_w][C_in]; depthwise [1][K_h][K_w][C] */
  const int32_t* bias;        /* [C_out] */
  const int32_t* multiplier;  /* [C_out], as TFLite's QuantizeMultiplier */
  const int32_t* shift;       /* [C_out], positive = left shift */
  int32_t input_offset;       /* minus the input zero point */
  int32_t output_offset;      /* the output zero point */
  int32_t act_min, act_max;   /* fused activation range in output codes */
} dgst_requant_params;

/* The depthwise kernel height the forward depthwise convolutions support (their tap-row
 * table is on the stack). */
#define DGST_DEPTHWISE_MAX_KERNEL_H 16
#define DGST_FUSED_BLOCK_MAX_DW_H DGST_DEPTHWISE_MAX_KERNEL_H

/* conv (K_h x K_w, any stride, pad top/left) -> depthwise (multiplier 1, kernel height at
 * most DGST_FUSED_BLOCK_MAX_DW_H) -> 1x1 projection, batch 1, no dilation.
 * in: [in_h][in_w][in_c]; conv output ("mid"): [mid_h][mid_w][mid_c]; out: [out_h][out_w][out_c]. */
typedef struct {
  int32_t in_h, in_w, in_c;
  int32_t mid_h, mid_w, mid_c;
  int32_t out_h, out_w, out_c;
  int32_t conv_h, conv_w, conv_stride_h, conv_stride_w, conv_pad_top, conv_pad_left;
  int32_t dw_h, dw_w, dw_stride_h, dw_stride_w, dw_pad_top, dw_pad_left;
} dgst_fused_block_geometry;

/* Bytes of caller scratch (4-byte aligned) dgst_fused_block_s8 needs:
 * dw_h rows of the conv output, one row of the depthwise output, dw_h row tags and mid_c
 * int32 accumulators. */
int32_t dgst_fused_block_scratch_bytes(const dgst_fused_block_geometry* g);

/* y = project(depthwise(conv(x))), each stage requantized to int8 as TFLite does. */
void dgst_fused_block_s8(const dgst_fused_block_geometry* g, const dgst_requant_params* conv,
                         const dgst_requant_params* dw, const dgst_requant_params* project,
                         const int8_t* x, int8_t* y, void* scratch);

/* ---- Forward: one int8 convolution, requantization constants from the caller --------- */

/* y = TFLite's int8 per-channel CONV_2D of x (reference kernel arithmetic, bit for bit) with
 * the multipliers and shifts of `p` (constants in flash, not arena op data); dilation 1
 * (g->dilation_* are ignored). x [in_h][in_w][in_c], p->weights OHWI
 * [out_c][kernel_h][kernel_w][in_c], y [out_h][out_w][out_c]. */
void dgst_conv2d_s8(const dgst_conv_geometry* g, int32_t in_c, int32_t out_c,
                    const dgst_requant_params* p, const int8_t* x, int8_t* y);

/* The same for DEPTHWISE_CONV_2D with multiplier 1 and kernel height at most
 * DGST_DEPTHWISE_MAX_KERNEL_H: p->weights [1][kernel_h][kernel_w][channels]; acc: caller
 * scratch of `channels` int32. */
void dgst_depthwise_conv2d_s8(const dgst_conv_geometry* g, int32_t channels,
                              const dgst_requant_params* p, const int8_t* x, int8_t* y,
                              int32_t* acc);

#ifdef __cplusplus
}
#endif

#endif /* DGST_TRAIN_KERNELS_H_ */
