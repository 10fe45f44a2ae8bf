/* Straightforward reference loop of the Conv2D weight gradient (same contract and results
 * as dgst_conv2d_weight_grad_s8): a bounds check and full index arithmetic per
 * multiply-accumulate. Kept to measure what the optimized loop order saves on the MCU. */
#include "dgst_internal.h"
#include "dgst_train_kernels.h"

void dgst_conv2d_weight_grad_s8_ref(const dgst_conv_geometry* g, const int8_t* x_kept,
                                    int32_t k, int32_t x_zero_point, const int8_t* dy,
                                    int32_t c_out, int32_t* grad) {
  int32_t o, i, j, c, oy, ox;
  for (o = 0; o < c_out; ++o) {
    for (i = 0; i < g->kernel_h; ++i) {
      for (j = 0; j < g->kernel_w; ++j) {
        for (c = 0; c < k; ++c) {
          int32_t acc = 0;
          for (oy = 0; oy < g->out_h; ++oy) {
            for (ox = 0; ox < g->out_w; ++ox) {
              const int32_t iy = oy * g->stride_h - g->pad_top + i * g->dilation_h;
              const int32_t ix = ox * g->stride_w - g->pad_left + j * g->dilation_w;
              if (iy < 0 || iy >= g->in_h || ix < 0 || ix >= g->in_w) continue;
              acc += dy[(oy * g->out_w + ox) * c_out + o] *
                     (x_kept[(iy * g->in_w + ix) * k + c] - x_zero_point);
            }
          }
          grad[((o * g->kernel_h + i) * g->kernel_w + j) * k + c] = acc;
        }
      }
    }
  }
}
