/* On-device channel selection of a weight-updated layer, evaluated at the start of every
 * training step. No allocation: `norms` / `scores` are caller scratch.
 *
 * DGSU (Li & Chang 2024), policy "traversal": channels not yet visited in the current sweep
 *   first, then the visited ones; within each group by integer importance descending; ties
 *   go to the lower index. The first k are kept and marked visited; a sweep ends (the mask
 *   is cleared at the start of the next step) once every channel was visited.
 * magnitude: the same ranking without the visited groups (top-k importance every step).
 * window: step s keeps the k channels from (s * k) mod c_in, wrapping.
 * Integer importance (so device, NumPy and Keras rank identically, no float rounding):
 *   score[c] = sum_o m[o] * sum_t w[o][t][c]^2      (conv/dense, int64)
 *   score[c] = m[c] * sum_t w[t][c]^2               (depthwise)
 * with m[o] = round(2^16 * s[o]^2 / max_o s[o]^2) from the weight scales, fixed at export.
 * kept[] is returned in increasing order.
 * Layer schedule (layers_per_step): dgst_layer_active, the rule of reference.layer_active. */
#include "dgst_train_kernels.h"

static void sort_increasing(int32_t* a, int32_t n) {
  int32_t i, j;
  for (i = 1; i < n; ++i) {
    const int32_t v = a[i];
    for (j = i; j > 0 && a[j - 1] > v; --j) a[j] = a[j - 1];
    a[j] = v;
  }
}

void dgst_select_window(int32_t step, int32_t c_in, int32_t k, int32_t* kept) {
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

void dgst_channel_scores_s8(const int8_t* w, const int32_t* multiplier, int32_t c_out,
                            int32_t taps, int32_t c_in, int32_t depthwise, int64_t* scores) {
  int32_t o, t, c;
  for (c = 0; c < c_in; ++c) scores[c] = 0;
  if (depthwise) { /* w [taps][c_in], one multiplier per channel */
    for (t = 0; t < taps; ++t)
      for (c = 0; c < c_in; ++c) scores[c] += (int64_t)w[t * c_in + c] * w[t * c_in + c];
    for (c = 0; c < c_in; ++c) scores[c] *= multiplier[c];
    return;
  }
  for (o = 0; o < c_out; ++o) { /* w [c_out][taps][c_in] */
    const int8_t* row = w + (int64_t)o * taps * c_in;
    for (c = 0; c < c_in; ++c) {
      int32_t sum = 0; /* <= taps * 127^2: no overflow for any kernel that fits an MCU */
      for (t = 0; t < taps; ++t) sum += (int32_t)row[t * c_in + c] * row[t * c_in + c];
      scores[c] += (int64_t)sum * multiplier[o];
    }
  }
}

static int32_t bit(const uint8_t* mask, int32_t c) { return (mask[c >> 3] >> (c & 7)) & 1; }

int32_t dgst_layer_active(uint32_t step, int32_t layer, int32_t layers, int32_t per_step) {
  int64_t offset;
  if (per_step >= layers) return 1;
  offset = ((int64_t)layer - ((int64_t)step * per_step) % layers) % layers;
  if (offset < 0) offset += layers;
  return offset < per_step;
}

void dgst_select_ranked(int64_t* scores, int32_t c_in, int32_t k, uint8_t* visited,
                        int32_t* kept) {
  dgst_select_ranked_scheduled(scores, c_in, k, visited, 1, kept);
}

void dgst_select_ranked_scheduled(int64_t* scores, int32_t c_in, int32_t k, uint8_t* visited,
                                  int32_t active, int32_t* kept) {
  int32_t c, j, all = 1;
  if (visited != 0) {
    for (c = 0; c < c_in && all; ++c) all = bit(visited, c);
    if (all) /* a finished sweep: start a new one */
      for (c = 0; c < (c_in + 7) / 8; ++c) visited[c] = 0;
  }
  for (j = 0; j < k; ++j) { /* k passes of an arg-max; taken channels are marked -1 */
    int32_t best = -1, best_fresh = 0;
    for (c = 0; c < c_in; ++c) {
      const int32_t fresh = visited != 0 && !bit(visited, c);
      if (scores[c] < 0) continue;
      if (best < 0 || fresh > best_fresh || (fresh == best_fresh && scores[c] > scores[best])) {
        best = c;
        best_fresh = fresh;
      }
    }
    kept[j] = best;
    scores[best] = -1;
  }
  sort_increasing(kept, k);
  if (visited != 0 && active)
    for (j = 0; j < k; ++j) visited[kept[j] >> 3] |= (uint8_t)(1u << (kept[j] & 7));
}
