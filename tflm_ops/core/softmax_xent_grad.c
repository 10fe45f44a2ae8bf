/* Softmax cross-entropy on dequantized int8 logits and its gradient:
 * p = softmax(scale * (logits - zero_point)); grad[i] = p[i] - (i == label);
 * returns -log p[label]. Numerically stable: the max logit is subtracted first (the zero
 * point cancels), so expf never overflows. */
#include <math.h>

#include "dgst_train_kernels.h"

float dgst_softmax_xent_grad(const int8_t* logits, int32_t classes, float scale,
                             int32_t zero_point, int32_t label, float* grad) {
  int32_t i, mx = logits[0];
  float sum = 0.0f, inv;
  (void)zero_point; /* cancels in the softmax: scale * (l - zp) - scale * (max - zp) */
  for (i = 1; i < classes; ++i) mx = logits[i] > mx ? logits[i] : mx;
  for (i = 0; i < classes; ++i) {
    const float e = expf(scale * (float)(logits[i] - mx));
    grad[i] = e;
    sum += e;
  }
  inv = 1.0f / sum;
  for (i = 0; i < classes; ++i) grad[i] *= inv;
  grad[label] -= 1.0f;
  /* -log p[label] = log(sum) - scale * (logits[label] - max) */
  return logf(sum) - scale * (float)(logits[label] - mx);
}
