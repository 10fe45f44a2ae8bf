/* Depthwise (multiplier 1) weight gradient for the kept channels (int8 x int8 -> int32).
 *
 * grad[i][j][c] = sum over output pixels of dy[oy][ox][kept[c]] * (x_kept[iy][ix][c] - zp).
 *
 * Per tap the valid output pixels form a rectangle (computed once, no per-element bounds
 * checks); over it 2 kept channels are accumulated at a time: x_kept's two channels are
 * adjacent bytes, dy's are gathered at kept[c] and kept[c + 1]. On cores with the DSP
 * extension, maps of at most 25 pixels with at most 9 taps (the late blocks sparse training
 * updates) take 4 kept channels at a time packed once for all taps (small_map_weight_grad);
 * stride-1 "same" 3-wide kernels on maps of at most 36 pixels slide their three taps along
 * the rows instead (slide_weight_grad), larger maps up to 32 pixels wide strip by strip of
 * output rows (strip_weight_grad). */
#include <string.h>

#include "dgst_internal.h"
#include "dgst_train_kernels.h"

/* The DSP tap loops stay functions of their own: inlined into the packing loops, GCC spills
 * their accumulators. */
#if defined(__GNUC__)
#define DGST_NOINLINE_DW __attribute__((noinline))
#else
#define DGST_NOINLINE_DW
#endif

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

#if DGST_USE_ARM_DSP
/* ---- 3-wide "same" kernels at horizontal stride 1 (MobileNet's stride-1 depthwise, pad 1,
 * out_w == in_w) on small maps. 4 kept channels at a time are packed once into two planes of
 * int16 lanes, (c, c + 2) and (c + 1, c + 3) per pixel: x with the zero point subtracted, dy
 * gathered at kept[]. A tap row i pairs dy row oy with x row oy * stride_h + i - pad_top;
 * along that row pair the three taps slide together: dy word ox meets x words ox - 1, ox,
 * ox + 1 (only those inside the row), so per output pixel 2 loads feed up to 6 SMLABB /
 * SMLATT (3 taps x 2 channels) into accumulators held over the whole tap row. Rows of 3 at
 * stride 1 run as straight code over consecutive rows, a 3x3 map (MobileNetV2's last blocks
 * at 96x96) as one straight block per plane. Cortex-M7: 3.4 instructions per MAC for
 * MobileNetV2-1.0's block_16 at 96x96 (all 960 channels; 3.9 with 19), 8.0 before. */
#define SLIDE_X_WORDS 36 /* x words of one plane: in_h x in_w (stack: 4 planes, 576 B) */
#define SLIDE_D_WORDS 36 /* dy words of one plane: out_h x out_w */
#define SLIDE_MAX_KH 7

/* A 3-wide "same" kernel at horizontal stride 1: the three taps slide along the rows. */
static int32_t slides(const dgst_conv_geometry* g) {
  return g->kernel_w == 3 && g->stride_w == 1 && g->dilation_w == 1 && g->dilation_h == 1 &&
         g->kernel_h <= SLIDE_MAX_KH && g->pad_left == 1 && g->out_w == g->in_w &&
         g->in_w >= 2;
}

static int32_t slide_fits(const dgst_conv_geometry* g) {
  return slides(g) && g->in_h * g->in_w <= SLIDE_X_WORDS &&
         g->out_h * g->out_w <= SLIDE_D_WORDS;
}

/* The row pairs of tap row i: `rows` of them from dy word d_first and x word x_first. */
typedef struct {
  int32_t rows, d_first, x_first;
} slide_tap_row;

/* The packed planes of a group and where its sums go: plane p's bottom lanes' channel to
 * lo[p][(i * 3 + j) * k], its top lanes' to hi[p][(i * 3 + j) * hk[p]] (hk 0: a sink). */
typedef struct {
  int32_t x[2][SLIDE_X_WORDS], d[2][SLIDE_D_WORDS];
  slide_tap_row taps[SLIDE_MAX_KH];
  int32_t kh, out_w, x_step, k, planes;
  int32_t* lo[2];
  int32_t* hi[2];
  int32_t hk[2];
} slide_group;

/* 3 taps x the 2 channels of a plane word. */
#define SLIDE_MAC3(d_, p_, q_, r_) \
  do {                             \
    a0 = __smlabb(d_, p_, a0);     \
    b0 = __smlatt(d_, p_, b0);     \
    a1 = __smlabb(d_, q_, a1);     \
    b1 = __smlatt(d_, q_, b1);     \
    a2 = __smlabb(d_, r_, a2);     \
    b2 = __smlatt(d_, r_, b2);     \
  } while (0)

/* A row pair (x at pixel 0): the first and last dy words meet only the 2 taps inside the
 * row, no product with the padding is computed. */
#define SLIDE_ROW()                                                  \
  do {                                                               \
    const int32_t* dp = d;                                           \
    const int32_t* xp = x + 2;                                       \
    const int32_t* const d_last = d + out_w - 1;                     \
    int32_t xm, xc = x[0], xn = x[1], dd = *dp++;                    \
    a1 = __smlabb(dd, xc, a1);                                       \
    b1 = __smlatt(dd, xc, b1);                                       \
    a2 = __smlabb(dd, xn, a2);                                       \
    b2 = __smlatt(dd, xn, b2);                                       \
    while (dp != d_last) {                                           \
      xm = xc;                                                       \
      xc = xn;                                                       \
      xn = *xp++;                                                    \
      dd = *dp++;                                                    \
      SLIDE_MAC3(dd, xm, xc, xn);                                    \
    }                                                                \
    dd = *dp;                                                        \
    a0 = __smlabb(dd, xc, a0);                                       \
    b0 = __smlatt(dd, xc, b0);                                       \
    a1 = __smlabb(dd, xn, a1);                                       \
    b1 = __smlatt(dd, xn, b1);                                       \
  } while (0)

/* acc += row pair (dy words d_[0..2], x words x_[0..2]) of rows of 3. */
#define SLIDE_ROW3(d_, x_)                                  \
  do {                                                      \
    const int32_t x0 = (x_)[0], x1 = (x_)[1], x2 = (x_)[2]; \
    int32_t dd = (d_)[0];                                   \
    a1 = __smlabb(dd, x0, a1), b1 = __smlatt(dd, x0, b1);   \
    a2 = __smlabb(dd, x1, a2), b2 = __smlatt(dd, x1, b2);   \
    dd = (d_)[1];                                           \
    SLIDE_MAC3(dd, x0, x1, x2);                             \
    dd = (d_)[2];                                           \
    a0 = __smlabb(dd, x1, a0), b0 = __smlatt(dd, x1, b0);   \
    a1 = __smlabb(dd, x2, a1), b1 = __smlatt(dd, x2, b1);   \
  } while (0)

#define SLIDE_STORE3(lo_, hi_)                                   \
  do {                                                           \
    (lo_)[0] = a0, (lo_)[k] = a1, (lo_)[2 * k] = a2;             \
    (hi_)[0] = b0, (hi_)[hk] = b1, (hi_)[2 * hk] = b2;           \
    a0 = a1 = a2 = b0 = b1 = b2 = 0;                             \
  } while (0)

/* acc += row pair (dy words d_[0..3], x words x_[0..3]) of rows of 4. */
#define SLIDE_ROW4(d_, x_)                                  \
  do {                                                      \
    const int32_t x0 = (x_)[0], x1 = (x_)[1], x2 = (x_)[2]; \
    int32_t dd = (d_)[0], x3;                               \
    a1 = __smlabb(dd, x0, a1), b1 = __smlatt(dd, x0, b1);   \
    a2 = __smlabb(dd, x1, a2), b2 = __smlatt(dd, x1, b2);   \
    dd = (d_)[1];                                           \
    SLIDE_MAC3(dd, x0, x1, x2);                             \
    dd = (d_)[2];                                           \
    x3 = (x_)[3];                                           \
    SLIDE_MAC3(dd, x1, x2, x3);                             \
    dd = (d_)[3];                                           \
    a0 = __smlabb(dd, x2, a0), b0 = __smlatt(dd, x2, b0);   \
    a1 = __smlabb(dd, x3, a1), b1 = __smlatt(dd, x3, b1);   \
  } while (0)

/* Both planes of a group, rows of W (3 or 4) pixels at stride 1: the row pairs of a tap row
 * are consecutive in both planes, each one straight block (SLIDE_ROW3 / SLIDE_ROW4). */
#define SLIDE_GROUP_W(W)                                                \
  static DGST_NOINLINE_DW void slide_group_w##W(const slide_group* sg) { \
    const int32_t k = sg->k;                                            \
    int32_t p;                                                          \
    for (p = 0; p < sg->planes; ++p) {                                  \
      const slide_tap_row* t = sg->taps;                                \
      const slide_tap_row* const t_end = t + sg->kh;                    \
      const int32_t hk = sg->hk[p];                                     \
      int32_t* lo = sg->lo[p];                                          \
      int32_t* hi = sg->hi[p];                                          \
      for (; t != t_end; ++t, lo += 3 * k, hi += 3 * hk) {              \
        int32_t a0 = 0, a1 = 0, a2 = 0, b0 = 0, b1 = 0, b2 = 0;         \
        const int32_t* d = sg->d[p] + t->d_first;                       \
        const int32_t* x = sg->x[p] + t->x_first;                       \
        const int32_t* const d_end = d + W * t->rows;                   \
        for (; d != d_end; d += W, x += W) SLIDE_ROW##W(d, x);          \
        SLIDE_STORE3(lo, hi);                                           \
      }                                                                 \
    }                                                                   \
  }
SLIDE_GROUP_W(3)
SLIDE_GROUP_W(4)

/* Both planes of a group on a 3x3 map (3x3 kernel, stride 1, pad 1: MobileNetV2's last
 * blocks at 96x96), every tap row as straight code: tap row 1 pairs dy row r with x row r,
 * tap row 0 dy rows 1, 2 with x rows 0, 1, tap row 2 dy rows 0, 1 with x rows 1, 2. */
static DGST_NOINLINE_DW void slide_group_3x3(const slide_group* sg) {
  const int32_t k = sg->k;
  int32_t p;
  for (p = 0; p < sg->planes; ++p) {
    const int32_t* const d = sg->d[p];
    const int32_t* const x = sg->x[p];
    const int32_t hk = sg->hk[p];
    int32_t* const lo = sg->lo[p];
    int32_t* const hi = sg->hi[p];
    int32_t a0 = 0, a1 = 0, a2 = 0, b0 = 0, b1 = 0, b2 = 0;
    SLIDE_ROW3(d + 3, x);
    SLIDE_ROW3(d + 6, x + 3);
    SLIDE_STORE3(lo, hi);
    SLIDE_ROW3(d, x);
    SLIDE_ROW3(d + 3, x + 3);
    SLIDE_ROW3(d + 6, x + 6);
    SLIDE_STORE3(lo + 3 * k, hi + 3 * hk);
    SLIDE_ROW3(d, x + 3);
    SLIDE_ROW3(d + 3, x + 6);
    SLIDE_STORE3(lo + 6 * k, hi + 6 * hk);
  }
}

/* Both planes of a group, any row length and stride_h. */
static DGST_NOINLINE_DW void slide_group_any(const slide_group* sg) {
  const int32_t k = sg->k, out_w = sg->out_w, x_step = sg->x_step;
  int32_t p, i;
  for (p = 0; p < sg->planes; ++p) {
    const int32_t hk = sg->hk[p];
    int32_t* lo = sg->lo[p];
    int32_t* hi = sg->hi[p];
    for (i = 0; i < sg->kh; ++i, lo += 3 * k, hi += 3 * hk) {
      int32_t a0 = 0, a1 = 0, a2 = 0, b0 = 0, b1 = 0, b2 = 0, row;
      const int32_t* d = sg->d[p] + sg->taps[i].d_first;
      const int32_t* x = sg->x[p] + sg->taps[i].x_first;
      for (row = sg->taps[i].rows; row > 0; --row, d += out_w, x += x_step) SLIDE_ROW();
      lo[0] = a0, lo[k] = a1, lo[2 * k] = a2;
      hi[0] = b0, hi[hk] = b1, hi[2 * hk] = b2;
    }
  }
}

/* Packs kept channels [c, c + nc) of x and dy into the planes. With nc < 4 the missing
 * lanes hold whatever (the next pixel's x, dy of kept[c]): their sums go to the sink. x is
 * read 4 bytes at a time except where that would read past x_kept's end. */
static void slide_pack(slide_group* sg, const dgst_conv_geometry* g, const int8_t* x_kept,
                       const int32_t* kept, int32_t k, int32_t c, int32_t nc, int32_t zp,
                       const int8_t* dy, int32_t channels) {
  const int32_t in_pixels = g->in_h * g->in_w, out_pixels = g->out_h * g->out_w;
  const int32_t zp2 = (int32_t)(((uint32_t)zp & 0xFFFFu) | ((uint32_t)zp << 16));
  const int32_t k0 = kept[c], k1 = nc > 1 ? kept[c + 1] : k0;
  const int32_t k2 = nc > 2 ? kept[c + 2] : k0, k3 = nc > 3 ? kept[c + 3] : k0;
  /* pixels whose 4 bytes from channel c lie inside x_kept ([in_pixels][k]) */
  const int32_t words =
      nc == 4 ? in_pixels
              : dgst_max_i32(0, dgst_min_i32(in_pixels, (in_pixels * k - 4 - c) / k + 1));
  const int8_t* xp = x_kept + c;
  const int8_t* dp = dy;
  int32_t* const xa = sg->x[0];
  int32_t* const xb = sg->x[1];
  int32_t* const da = sg->d[0];
  int32_t* const db = sg->d[1];
  int32_t p;
  for (p = 0; p < words; ++p, xp += k) {
    uint32_t w;
    memcpy(&w, xp, 4);
    xa[p] = __ssub16(__sxtb16((int32_t)w), zp2);  /* (x0, x2) - zp */
    xb[p] = __ssub16(dgst_sxtb16_ror8(w), zp2);   /* (x1, x3) - zp */
  }
  for (; p < in_pixels; ++p, xp += k) {
    int32_t v[4] = {0, 0, 0, 0}, cc;
    for (cc = 0; cc < nc; ++cc) v[cc] = xp[cc] - zp;
    xa[p] = dgst_pkhbt(v[0], v[2]);
    xb[p] = dgst_pkhbt(v[1], v[3]);
  }
  for (p = 0; p < out_pixels; ++p, dp += channels) {
    da[p] = dgst_pkhbt(dp[k0], dp[k2]);
    db[p] = dgst_pkhbt(dp[k1], dp[k3]);
  }
}

static void slide_weight_grad(const dgst_conv_geometry* g, const int8_t* x_kept,
                              const int32_t* kept, int32_t k, int32_t zp, const int8_t* dy,
                              int32_t channels, int32_t* grad) {
  slide_group sg;
  int32_t sink[3];
  const int32_t w3 = g->out_w == 3 && g->stride_h == 1;
  const int32_t w4 = g->out_w == 4 && g->stride_h == 1;
  const int32_t map3x3 = w3 && g->in_h == 3 && g->out_h == 3 && g->kernel_h == 3 &&
                         g->pad_top == 1;
  int32_t i, c;
  sg.kh = g->kernel_h;
  sg.out_w = g->out_w;
  sg.x_step = g->stride_h * g->in_w;
  sg.k = k;
  for (i = 0; i < g->kernel_h; ++i) {
    int32_t lo, hi;
    dgst_out_range(i - g->pad_top, g->stride_h, g->in_h, g->out_h, &lo, &hi);
    sg.taps[i].rows = hi - lo;
    sg.taps[i].d_first = lo * g->out_w;
    sg.taps[i].x_first = (lo * g->stride_h + i - g->pad_top) * g->in_w;
    if (sg.taps[i].rows == 0) sg.taps[i].d_first = sg.taps[i].x_first = 0;
  }
  for (c = 0; c < k; c += 4) {
    const int32_t nc = dgst_min_i32(4, k - c);
    slide_pack(&sg, g, x_kept, kept, k, c, nc, zp, dy, channels);
    sg.planes = nc > 1 ? 2 : 1;
    sg.lo[0] = grad + c;
    sg.lo[1] = grad + c + 1;
    sg.hi[0] = nc > 2 ? grad + c + 2 : sink;
    sg.hi[1] = nc > 3 ? grad + c + 3 : sink;
    sg.hk[0] = nc > 2 ? k : 0;
    sg.hk[1] = nc > 3 ? k : 0;
    if (map3x3)
      slide_group_3x3(&sg);
    else if (w3)
      slide_group_w3(&sg);
    else if (w4)
      slide_group_w4(&sg);
    else
      slide_group_any(&sg);
  }
}

/* ---- The sliding 3-wide taps on maps larger than the planes above (up to 32 pixels a row,
 * e.g. 16x16 and 24x24 stride-1 depthwise layers): strip by strip of output rows, one plane
 * (2 kept channels) at a time so that the buffers stay small: a strip's dy rows and the x
 * rows its taps read are packed, and its sums are added to the gradient, zeroed first
 * (integer sums: the strips' order cannot change a bit). x rows shared by two strips are
 * packed twice. */
#define STRIP_X_WORDS 96 /* x words of a strip: 3 rows of 32 (stack: 640 B with dy) */
#define STRIP_D_WORDS 64 /* dy words of a strip */

/* Output rows per strip, 0 if the kernel is not a sliding one or a row does not fit. */
static int32_t strip_rows(const dgst_conv_geometry* g) {
  int32_t rows;
  if (!slides(g)) return 0;
  rows = dgst_min_i32(g->out_h, STRIP_D_WORDS / g->out_w);
  while (rows > 0 &&
         dgst_min_i32(g->in_h, (rows - 1) * g->stride_h + g->kernel_h) * g->in_w > STRIP_X_WORDS)
    --rows;
  return rows;
}

/* One plane: 2 kept channels of a strip's x and dy as the int16 lanes of a word. */
typedef struct {
  int32_t x[STRIP_X_WORDS], d[STRIP_D_WORDS];
} strip_plane;

/* Packs kept channels a and b = a + 1 (b < 0: none, its lane 0) of x pixels [x_first,
 * x_end) and dy pixels [d_first, d_end). */
static void strip_pack(strip_plane* pl, const int8_t* x_kept, int32_t k, int32_t a, int32_t b,
                       int32_t ka, int32_t kb, int32_t zp, const int8_t* dy, int32_t channels,
                       int32_t x_first, int32_t x_end, int32_t d_first, int32_t d_end) {
  const int8_t* xp = x_kept + x_first * k;
  const int8_t* dp = dy + d_first * channels;
  int32_t* xw = pl->x;
  int32_t* dw = pl->d;
  int32_t p;
  if (b == a + 1) { /* adjacent bytes: one halfword load, as tile_2 */
    const int32_t zp2 = (int32_t)(((uint32_t)zp & 0xFFFFu) | ((uint32_t)zp << 16));
    for (p = x_first; p < x_end; ++p, xp += k) {
      uint16_t xh;
      memcpy(&xh, xp + a, 2);
      *xw++ = __ssub16(__sxtb16((int32_t)((uint32_t)xh | ((uint32_t)xh << 8))), zp2);
    }
    for (p = d_first; p < d_end; ++p, dp += channels) *dw++ = dgst_pkhbt(dp[ka], dp[kb]);
  } else { /* the last of an odd k */
    for (p = x_first; p < x_end; ++p, xp += k) *xw++ = dgst_pkhbt(xp[a] - zp, 0);
    for (p = d_first; p < d_end; ++p, dp += channels) *dw++ = dgst_pkhbt(dp[ka], 0);
  }
}

/* a + b mod 2^32, as the accumulators' SMLA wrap: a strip's sums add up to the map's. */
static inline int32_t add_wrapping(int32_t a, int32_t b) {
  return (int32_t)((uint32_t)a + (uint32_t)b);
}

/* Adds a strip's sums of one plane: channel a's to lo[(i * 3 + j) * k], b's to hi[...]
 * (hk 0: a sink). */
static DGST_NOINLINE_DW void strip_sums(const strip_plane* pl, const slide_tap_row* taps,
                                        int32_t kh, int32_t out_w, int32_t x_step, int32_t k,
                                        int32_t* lo, int32_t* hi, int32_t hk) {
  int32_t i;
  for (i = 0; i < kh; ++i, lo += 3 * k, hi += 3 * hk) {
    int32_t a0 = 0, a1 = 0, a2 = 0, b0 = 0, b1 = 0, b2 = 0, row;
    const int32_t* d = pl->d + taps[i].d_first;
    const int32_t* x = pl->x + taps[i].x_first;
    for (row = taps[i].rows; row > 0; --row, d += out_w, x += x_step) SLIDE_ROW();
    lo[0] = add_wrapping(lo[0], a0), lo[k] = add_wrapping(lo[k], a1);
    lo[2 * k] = add_wrapping(lo[2 * k], a2);
    hi[0] = add_wrapping(hi[0], b0), hi[hk] = add_wrapping(hi[hk], b1);
    hi[2 * hk] = add_wrapping(hi[2 * hk], b2);
  }
}

/* The tap rows of output rows [oy0, oy1) in a strip packed from x row x_row0. */
static void strip_taps(slide_tap_row* taps, const dgst_conv_geometry* g, int32_t oy0,
                       int32_t oy1, int32_t x_row0) {
  int32_t i;
  for (i = 0; i < g->kernel_h; ++i) {
    int32_t lo, hi;
    dgst_out_range(i - g->pad_top, g->stride_h, g->in_h, g->out_h, &lo, &hi);
    lo = dgst_max_i32(lo, oy0);
    hi = dgst_min_i32(hi, oy1);
    taps[i].rows = dgst_max_i32(hi - lo, 0);
    taps[i].d_first = taps[i].rows ? (lo - oy0) * g->out_w : 0;
    taps[i].x_first = taps[i].rows ? (lo * g->stride_h + i - g->pad_top - x_row0) * g->in_w : 0;
  }
}

static DGST_NOINLINE_DW void strip_weight_grad(const dgst_conv_geometry* g,
                                               const int8_t* x_kept, const int32_t* kept,
                                               int32_t k, int32_t zp, const int8_t* dy,
                                               int32_t channels, int32_t* grad) {
  strip_plane pl;
  slide_tap_row taps[SLIDE_MAX_KH];
  int32_t sink[3] = {0, 0, 0};
  const int32_t strip = strip_rows(g), x_step = g->stride_h * g->in_w;
  int32_t oy0, a;
  memset(grad, 0, sizeof(int32_t) * (size_t)(g->kernel_h * 3 * k));
  for (oy0 = 0; oy0 < g->out_h; oy0 += strip) {
    const int32_t oy1 = dgst_min_i32(oy0 + strip, g->out_h);
    const int32_t x_row0 = dgst_max_i32(0, oy0 * g->stride_h - g->pad_top);
    const int32_t x_row1 =
        dgst_min_i32(g->in_h, (oy1 - 1) * g->stride_h + g->kernel_h - g->pad_top);
    strip_taps(taps, g, oy0, oy1, x_row0);
    for (a = 0; a < k; a += 2) {
      const int32_t b = a + 1 < k ? a + 1 : -1;
      strip_pack(&pl, x_kept, k, a, b, kept[a], b >= 0 ? kept[b] : 0, zp, dy, channels,
                 x_row0 * g->in_w, x_row1 * g->in_w, oy0 * g->out_w, oy1 * g->out_w);
      strip_sums(&pl, taps, g->kernel_h, g->out_w, x_step, k, grad + a,
                 b >= 0 ? grad + b : sink, b >= 0 ? k : 0);
    }
  }
}
#endif

void dgst_depthwise_weight_grad_s8(const dgst_conv_geometry* g, const int8_t* x_kept,
                                   const int32_t* kept, int32_t k, int32_t x_zero_point,
                                   const int8_t* dy, int32_t channels, int32_t* grad) {
  const int32_t kh = g->kernel_h, kw = g->kernel_w;
  int32_t i, j;
#if DGST_USE_ARM_DSP
  if (slide_fits(g)) {
    slide_weight_grad(g, x_kept, kept, k, x_zero_point, dy, channels, grad);
    return;
  }
  if (small_map(g)) {
    small_map_weight_grad(g, x_kept, kept, k, x_zero_point, dy, channels, grad);
    return;
  }
  if (strip_rows(g) > 0) {
    strip_weight_grad(g, x_kept, kept, k, x_zero_point, dy, channels, grad);
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
