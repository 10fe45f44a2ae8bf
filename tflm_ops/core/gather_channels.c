/* Gather the kept channels of a channels-last int8 activation: the saved input of a
 * sparsely updated layer holds only its k kept input channels.
 * out[p][j] = x[p][kept[j]] for every pixel p. kept must be in range (the caller checks). */
#include "dgst_train_kernels.h"

void dgst_gather_channels_s8(const int8_t* x, int32_t pixels, int32_t channels,
                             const int32_t* kept, int32_t k, int8_t* out) {
  int32_t p, j;
  for (p = 0; p < pixels; ++p, x += channels, out += k) {
    for (j = 0; j < k; ++j) out[j] = x[kept[j]];
  }
}
