/* Backward of an int8 elementwise activation (swish, hard-swish, sigmoid) through a 256-entry
 * derivative table indexed by the activation's saved int8 input code: the table holds f'(x)
 * at each dequantized input x = s * (q - z), computed at export time from the input's
 * quantization, so the device does one load and one float multiply per element. */
#include "dgst_train_kernels.h"

void dgst_activation_grad_f32(const float* g, const int8_t* x, const float* table, int32_t n,
                              float* dx) {
  int32_t i;
  for (i = 0; i < n; ++i) dx[i] = g[i] * table[(int32_t)x[i] + 128];
}
