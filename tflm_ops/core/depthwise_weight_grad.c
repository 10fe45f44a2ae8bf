/* Depthwise (multiplier 1) weight gradient for the kept channels (int8 x int8 -> int32).
 *
 * grad[i][j][c] = sum over output pixels of dy[oy][ox][kept[c]] * (x_kept[iy][ix][c] - zp).
 *
 * Per tap the valid output pixels form a rectangle (computed once, no per-element bounds
 * checks); over it 2 kept channels are accumulated at a time: x_kept's two channels are
 * adjacent bytes, dy's are gathered at kept[c] and kept[c + 1]. On cores with the DSP
 * extension, maps of at most 25 pixels with at most 9 taps (the late blocks sparse training
 * updates) take 4 kept channels at a time packed once for all taps (small_map_weight_grad):
 * 8.0 instructions per MAC on the Cortex-M7 for MobileNetV2-1.0's block_16 at 96x96 (3x3),
 * 10.6 before. */
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

#if DGST_USE_ARM_DSP
/* Small maps (the late blocks that sparse training updates, e.g. 3x3 at 96x96 input): every
 * dy and x value meets up to kh * kw taps, so 4 kept channels are packed once for the whole
 * map as int16 lanes, (c, c + 2) and (c + 1, c + 3) per pixel (x with the zero point
 * subtracted, dy gathered at kept[]), and each tap then costs LDRD + LDRD + 4 SMLABB/SMLATT
 * per pixel. The taps' rectangles are found once. */
#define SMALL_MAP_PIXELS 25
#define SMALL_MAP_TAPS 9

static int32_t small_map(const dgst_conv_geometry* g) {
  return g->in_h * g->in_w <= SMALL_MAP_PIXELS && g->out_h * g->out_w <= SMALL_MAP_PIXELS &&
         g->kernel_h * g->kernel_w <= SMALL_MAP_TAPS;
}

/* (a, b) as the int16 lanes of a word. */
static inline int32_t lanes(int32_t a, int32_t b) { return dgst_pkhbt(a, b); }

#define SMLA_XY(op_, a_, b_, acc_) __asm(op_ " %0, %1, %2, %0" : "+r"(acc_) : "r"(a_), "r"(b_))

/* A tap's rectangle in packed words (2 words a pixel). */
typedef struct {
  int32_t rows, cols, d_first, x_first, d_row, x_row, x_col;
} packed_rect;

/* acc += 4 products of one pixel: (d02, x02) lanes and (d13, x13) lanes. */
#define PIXEL(d_, x_)                       \
  do {                                      \
    const int32_t d02_ = (d_)[0], d13_ = (d_)[1]; \
    const int32_t x02_ = (x_)[0], x13_ = (x_)[1]; \
    SMLA_XY("smlabb", d02_, x02_, a0);      \
    SMLA_XY("smlatt", d02_, x02_, a2);      \
    SMLA_XY("smlabb", d13_, x13_, a1);      \
    SMLA_XY("smlatt", d13_, x13_, a3);      \
  } while (0)

/* Kept channels [c, c + nc) (nc <= 4; missing ones read as 0 and are not stored). */
static void small_map_group(const dgst_conv_geometry* g, const packed_rect* rects,
                            const int8_t* x_kept, const int32_t* kept, int32_t k, int32_t c,
                            int32_t nc, int32_t zp, const int8_t* dy, int32_t channels,
                            int32_t* grad) {
  int32_t xpk[2 * SMALL_MAP_PIXELS], dpk[2 * SMALL_MAP_PIXELS];
  const int32_t in_pixels = g->in_h * g->in_w, out_pixels = g->out_h * g->out_w;
  const int32_t taps = g->kernel_h * g->kernel_w;
  int32_t p, t;
  if (nc == 4) {
    const int32_t zp2 = (int32_t)(((uint32_t)zp & 0xFFFFu) | ((uint32_t)zp << 16));
    const int32_t k0 = kept[c], k1 = kept[c + 1], k2 = kept[c + 2], k3 = kept[c + 3];
    const int8_t* xp = x_kept + c;
    const int8_t* dp = dy;
    for (p = 0; p < in_pixels; ++p, xp += k) {
      uint32_t w;
      memcpy(&w, xp, 4);
      xpk[2 * p] = __ssub16(__sxtb16((int32_t)w), zp2);     /* (x0, x2) - zp */
      xpk[2 * p + 1] = __ssub16(dgst_sxtb16_ror8(w), zp2);  /* (x1, x3) - zp */
    }
    for (p = 0; p < out_pixels; ++p, dp += channels) {
      dpk[2 * p] = lanes(dp[k0], dp[k2]);
      dpk[2 * p + 1] = lanes(dp[k1], dp[k3]);
    }
  } else {
    int32_t cc, ch[4] = {0, 0, 0, 0};
    for (cc = 0; cc < nc; ++cc) ch[cc] = kept[c + cc];
    for (p = 0; p < in_pixels; ++p) {
      const int8_t* xp = x_kept + p * k + c;
      int32_t v[4] = {0, 0, 0, 0};
      for (cc = 0; cc < nc; ++cc) v[cc] = xp[cc] - zp;
      xpk[2 * p] = lanes(v[0], v[2]);
      xpk[2 * p + 1] = lanes(v[1], v[3]);
    }
    for (p = 0; p < out_pixels; ++p) {
      const int8_t* dp = dy + p * channels;
      int32_t v[4] = {0, 0, 0, 0};
      for (cc = 0; cc < nc; ++cc) v[cc] = dp[ch[cc]];
      dpk[2 * p] = lanes(v[0], v[2]);
      dpk[2 * p + 1] = lanes(v[1], v[3]);
    }
  }
  for (t = 0; t < taps; ++t) {
    const packed_rect* r = &rects[t];
    const int32_t* d_row = dpk + r->d_first;
    const int32_t* x_row = xpk + r->x_first;
    const int32_t x_col = r->x_col, cols = r->cols;
    int32_t a0 = 0, a1 = 0, a2 = 0, a3 = 0, row;
    int32_t* const out = grad + t * k + c;
    for (row = r->rows; row > 0; --row, d_row += r->d_row, x_row += r->x_row) {
      const int32_t* d = d_row;
      const int32_t* x = x_row;
      int32_t n = cols;
      for (; n >= 3; n -= 3, d += 6, x += 3 * x_col) { /* the usual 3 columns: no loop */
        PIXEL(d, x);
        PIXEL(d + 2, x + x_col);
        PIXEL(d + 4, x + 2 * x_col);
      }
      if (n == 2) {
        PIXEL(d, x);
        PIXEL(d + 2, x + x_col);
      } else if (n == 1) {
        PIXEL(d, x);
      }
    }
    out[0] = a0;
    if (nc > 1) out[1] = a1;
    if (nc > 2) out[2] = a2;
    if (nc > 3) out[3] = a3;
  }
}

static void small_map_weight_grad(const dgst_conv_geometry* g, const int8_t* x_kept,
                                  const int32_t* kept, int32_t k, int32_t zp, const int8_t* dy,
                                  int32_t channels, int32_t* grad) {
  packed_rect rects[SMALL_MAP_TAPS];
  int32_t i, j, c;
  for (i = 0; i < g->kernel_h; ++i) {
    for (j = 0; j < g->kernel_w; ++j) {
      const dgst_tap_rect t = dgst_tap_rect_at(g, i, j, 1, 1); /* in pixels */
      packed_rect* const r = &rects[i * g->kernel_w + j];
      r->rows = t.rows;
      r->cols = t.cols;
      r->d_first = 2 * t.dy_offset;
      r->x_first = 2 * t.in_offset;
      r->d_row = 2 * t.dy_row;
      r->x_row = 2 * t.in_row;
      r->x_col = 2 * t.in_col;
    }
  }
  for (c = 0; c < k; c += 4)
    small_map_group(g, rects, x_kept, kept, k, c, dgst_min_i32(4, k - c), zp, dy, channels,
                    grad);
}
#endif

void dgst_depthwise_weight_grad_s8(const dgst_conv_geometry* g, const int8_t* x_kept,
                                   const int32_t* kept, int32_t k, int32_t x_zero_point,
                                   const int8_t* dy, int32_t channels, int32_t* grad) {
  const int32_t kh = g->kernel_h, kw = g->kernel_w;
  int32_t i, j;
#if DGST_USE_ARM_DSP
  if (small_map(g)) {
    small_map_weight_grad(g, x_kept, kept, k, x_zero_point, dy, channels, grad);
    return;
  }
#endif
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
