/* On-device channel selection of a weight-updated layer (a dynamic DGSU-style policy),
 * evaluated at the start of every training step. No allocation: `norms` is caller scratch.
 *
 * traversal: step s keeps the window of k channels starting at (s * k) mod c_in (wrapping),
 *            so every channel is visited once every ceil(c_in / k) steps.
 * magnitude: the k channels with the largest L2 norm of the current weights
 *            sum_o (weight_scale[o] * w[o][..][c])^2 (ties: the lower index).
 * kept[] is returned in increasing order. */
#include "dgst_train_kernels.h"

static void sort_increasing(int32_t* a, int32_t n) {
  int32_t i, j;
  for (i = 1; i < n; ++i) {
    const int32_t v = a[i];
    for (j = i; j > 0 && a[j - 1] > v; --j) a[j] = a[j - 1];
    a[j] = v;
  }
}

void dgst_select_traversal(int32_t step, int32_t c_in, int32_t k, int32_t* kept) {
  const int32_t start = (int32_t)(((int64_t)step * k) % c_in);
  int32_t j;
  for (j = 0; j < k; ++j) kept[j] = (start + j) % c_in;
  sort_increasing(kept, k);
}

void dgst_select_magnitude_s8(const int8_t* w, const float* weight_scale, int32_t c_out,
                              int32_t taps, int32_t c_in, int32_t depthwise, int32_t k,
                              float* norms, int32_t* kept) {
  int32_t o, t, c, j;
  for (c = 0; c < c_in; ++c) norms[c] = 0.0f;
  if (depthwise) { /* w [taps][c_in], scale per channel */
    for (t = 0; t < taps; ++t)
      for (c = 0; c < c_in; ++c) {
        const float v = weight_scale[c] * (float)w[t * c_in + c];
        norms[c] += v * v;
      }
  } else { /* w [c_out][taps][c_in] */
    for (o = 0; o < c_out; ++o)
      for (t = 0; t < taps; ++t)
        for (c = 0; c < c_in; ++c) {
          const float v = weight_scale[o] * (float)w[(o * taps + t) * c_in + c];
          norms[c] += v * v;
        }
  }
  for (j = 0; j < k; ++j) { /* k passes of an arg-max; taken channels are marked -1 */
    int32_t best = -1;
    for (c = 0; c < c_in; ++c)
      if (norms[c] >= 0.0f && (best < 0 || norms[c] > norms[best])) best = c;
    kept[j] = best;
    norms[best] = -1.0f;
  }
  sort_increasing(kept, k);
}
