/* Depthwise (multiplier 1) weight gradient for the kept channels (int8 x int8 -> int32).
 *
 * grad[i][j][c] = sum over output pixels of dy[oy][ox][kept[c]] * (x_kept[iy][ix][c] - zp).
 *
 * Per tap the valid output pixels form a rectangle (computed once, no per-element bounds
 * checks); over it 2 kept channels are accumulated at a time: x_kept's two channels are
 * adjacent bytes, dy's are gathered at kept[c] and kept[c + 1]. */
#include <string.h>

#include "dgst_internal.h"
#include "dgst_train_kernels.h"

static void tile_2(const dgst_s8_rect* r, int32_t k0, int32_t k1, int32_t c, int32_t zp,
                   int32_t* a0_out, int32_t* a1_out) {
  int32_t a0 = 0, a1 = 0, row;
  const int32_t dy_col = r->dy_col, x_col = r->x_col;
#if DGST_USE_ARM_DSP
  const int32_t zp2 = (int32_t)(((uint32_t)zp & 0xFFFFu) | ((uint32_t)zp << 16));
#endif
  for (row = 0; row < r->rows; ++row) {
    const int8_t* d = r->dy + row * r->dy_row;
    const int8_t* xp = r->x + row * r->x_row + c;
    const int8_t* const d_end = d + r->cols * dy_col;
    while (d != d_end) {
#if DGST_USE_ARM_DSP
      uint16_t xh;
      int32_t x01;
      memcpy(&xh, xp, 2);
      /* bytes x0, x1 -> 16-bit lanes (x0 - zp, x1 - zp): SXTB16 takes bytes 0 and 2 */
      x01 = __ssub16(__sxtb16((int32_t)((uint32_t)xh | ((uint32_t)xh << 8))), zp2);
      a0 = __smlabb(x01, d[k0], a0);
      a1 = __smlatb(x01, d[k1], a1);
#else
      a0 += d[k0] * (xp[0] - zp);
      a1 += d[k1] * (xp[1] - zp);
#endif
      d += dy_col;
      xp += x_col;
    }
  }
  *a0_out = a0;
  *a1_out = a1;
}

static int32_t tile_1(const dgst_s8_rect* r, int32_t k0, int32_t c, int32_t zp) {
  int32_t a0 = 0, row;
  for (row = 0; row < r->rows; ++row) {
    const int8_t* d = r->dy + row * r->dy_row;
    const int8_t* xp = r->x + row * r->x_row + c;
    const int8_t* const d_end = d + r->cols * r->dy_col;
    while (d != d_end) {
      a0 += d[k0] * (*xp - zp);
      d += r->dy_col;
      xp += r->x_col;
    }
  }
  return a0;
}

void dgst_depthwise_weight_grad_s8(const dgst_conv_geometry* g, const int8_t* x_kept,
                                   const int32_t* kept, int32_t k, int32_t x_zero_point,
                                   const int8_t* dy, int32_t channels, int32_t* grad) {
  const int32_t kh = g->kernel_h, kw = g->kernel_w;
  int32_t i, j;
  for (i = 0; i < kh; ++i) {
    for (j = 0; j < kw; ++j) {
      const dgst_s8_rect r = dgst_s8_rect_at(g, i, j, dy, channels, x_kept, k);
      int32_t* const tap = grad + (i * kw + j) * k;
      int32_t c;
      for (c = 0; c + 2 <= k; c += 2)
        tile_2(&r, kept[c], kept[c + 1], c, x_zero_point, &tap[c], &tap[c + 1]);
      if (c < k) tap[c] = tile_1(&r, kept[c], c, x_zero_point);
    }
  }
}
