/* The inverse of dgst_gather_channels_s8: a channels-last tensor whose kept channels come
 * from a compact tensor and the others from a base. A weight-updated layer keeps only the
 * weights of its k kept input channels in RAM; the full kernel its conv reads is assembled
 * from the flash tensor and those just before use. kept must be in range (the caller checks). */
#include <string.h>

#include "dgst_train_kernels.h"

void dgst_scatter_channels_s8(const int8_t* base, const int8_t* src, int32_t rows,
                              int32_t channels, const int32_t* kept, int32_t k, int8_t* out) {
  int32_t r, j;
  for (r = 0; r < rows; ++r, base += channels, src += k, out += channels) {
    memcpy(out, base, (size_t)channels);
    for (j = 0; j < k; ++j) out[kept[j]] = src[j];
  }
}
