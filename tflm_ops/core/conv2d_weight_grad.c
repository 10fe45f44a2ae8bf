/* Conv2D weight gradient for the kept input channels (int8 x int8 -> int32).
 *
 * grad[o][i][j][c] = sum over the output pixels of dy[oy][ox][o] * (x_kept[iy][ix][c] - zp).
 *
 * For each tap (i, j) the output pixels whose input is inside the image form a rectangle,
 * computed once per tap (no bounds check per element); when its rows follow each other in
 * memory (pointwise convs) they are walked as one long row. A dense layer (1x1 image) is an
 * outer product. Integer sums do not depend on their order, so every path below gives the
 * same bits.
 *
 * Plain C (every core without the DSP extension, and taps with rows shorter than 4 pixels):
 * a register tile of 4 output channels x 2 kept channels (8 int32 sums) per rectangle.
 * Cores with the DSP extension (Cortex-M4 / M7): SMLAD over pairs of output pixels with the
 * operands packed once into int16 lanes (see the section below); the outer product with
 * SMULBB / SMULTB. Instructions per MAC on the Cortex-M7 (benchmarks/mcu_kernels.py --real,
 * MobileNetV2-1.0 at 96x96, 3x3 maps): 1.8-1.9 for dense and 19-channel 1x1 layers, 1.96-1.97
 * with 3-6 kept channels, 2.3-2.8 for the classifier; the straightforward loop of
 * conv2d_weight_grad_ref.c takes about 25.
 */
#include <string.h>

#include "dgst_internal.h"
#include "dgst_train_kernels.h"

/* ---- 4x2 register tiles: taps with short rows, and every core without the DSP extension -- */

/* With the DSP paths the tiles stay functions of their own: inlined into one big loop nest,
 * GCC spills the accumulators of their inner loops. */
#if defined(__GNUC__) && DGST_USE_ARM_DSP
#define TILE static __attribute__((noinline)) void
#else
#define TILE static void
#endif

#if DGST_USE_ARM_DSP
/* One pixel of the 4x2 tile (odd pixel counts): dy bytes d0..d3 -> lanes (d0, d2), (d1, d3);
 * x bytes x0, x1 -> lanes (x0 - zp, x1 - zp) (SXTB16 takes bytes 0 and 2, hence the OR);
 * 8 x SMLA<x><y>. */
#define TILE_4X2_PIXEL(dptr, xptr)                                                   \
  do {                                                                               \
    uint32_t dw_;                                                                    \
    uint16_t xh_;                                                                    \
    int32_t d02_, d13_, x01_;                                                        \
    memcpy(&dw_, (dptr), 4);                                                         \
    memcpy(&xh_, (xptr), 2);                                                         \
    d02_ = __sxtb16((int32_t)dw_);                                                   \
    d13_ = dgst_sxtb16_ror8(dw_);                                                    \
    x01_ = __ssub16(__sxtb16((int32_t)((uint32_t)xh_ | ((uint32_t)xh_ << 8))), zp2); \
    a00 = __smlabb(d02_, x01_, a00);                                                 \
    a01 = __smlabt(d02_, x01_, a01);                                                 \
    a20 = __smlatb(d02_, x01_, a20);                                                 \
    a21 = __smlatt(d02_, x01_, a21);                                                 \
    a10 = __smlabb(d13_, x01_, a10);                                                 \
    a11 = __smlabt(d13_, x01_, a11);                                                 \
    a30 = __smlatb(d13_, x01_, a30);                                                 \
    a31 = __smlatt(d13_, x01_, a31);                                                 \
  } while (0)

/* Two pixels p, q of the 4x2 tile with dual MACs: SMLAD sums d_p * x_p + d_q * x_q, so both
 * operands are packed as (pixel p, pixel q) lanes: x from the 2 + 2 bytes
 * [xp0 xp1 xq0 xq1] by SXTB16 (bytes 0, 2) and SXTB16 ROR 8 (bytes 1, 3); dy by PKHBT /
 * PKHTB of the SXTB16 lanes of the two pixels' 4 bytes. 29 instructions for 16 MACs. */
#define TILE_4X2_PIXEL_PAIR(dptr, xptr)                                              \
  do {                                                                               \
    uint32_t dp_, dq_;                                                               \
    uint16_t xp_, xq_;                                                               \
    uint32_t xw_;                                                                    \
    int32_t x0_, x1_, p_, q_, lo_, hi_;                                              \
    memcpy(&dp_, (dptr), 4);                                                         \
    memcpy(&dq_, (dptr) + dy_col, 4);                                                \
    memcpy(&xp_, (xptr), 2);                                                         \
    memcpy(&xq_, (xptr) + x_col, 2);                                                 \
    xw_ = (uint32_t)xp_ | ((uint32_t)xq_ << 16);                                     \
    x0_ = __ssub16(__sxtb16((int32_t)xw_), zp2);  /* (xp0 - zp, xq0 - zp) */         \
    x1_ = __ssub16(dgst_sxtb16_ror8(xw_), zp2);   /* (xp1 - zp, xq1 - zp) */         \
    p_ = __sxtb16((int32_t)dp_);                  /* (dp0, dp2) */                   \
    q_ = __sxtb16((int32_t)dq_);                  /* (dq0, dq2) */                   \
    lo_ = dgst_pkhbt(p_, q_);                     /* (dp0, dq0) */                   \
    hi_ = dgst_pkhtb(p_, q_);                     /* (dp2, dq2) */                   \
    a00 = __smlad(lo_, x0_, a00);                                                    \
    a01 = __smlad(lo_, x1_, a01);                                                    \
    a20 = __smlad(hi_, x0_, a20);                                                    \
    a21 = __smlad(hi_, x1_, a21);                                                    \
    p_ = dgst_sxtb16_ror8(dp_);                   /* (dp1, dp3) */                   \
    q_ = dgst_sxtb16_ror8(dq_);                   /* (dq1, dq3) */                   \
    lo_ = dgst_pkhbt(p_, q_);                                                        \
    hi_ = dgst_pkhtb(p_, q_);                                                        \
    a10 = __smlad(lo_, x0_, a10);                                                    \
    a11 = __smlad(lo_, x1_, a11);                                                    \
    a30 = __smlad(hi_, x0_, a30);                                                    \
    a31 = __smlad(hi_, x1_, a31);                                                    \
  } while (0)
#endif

/* 4 output channels (o..o+3) x 2 kept channels (c, c+1). out: &grad[o][i][j][c]. */
TILE tile_4x2(const dgst_s8_rect* r, int32_t o, int32_t c, int32_t zp, int32_t* out,
                     int32_t out_o_stride) {
  int32_t a00 = 0, a01 = 0, a10 = 0, a11 = 0, a20 = 0, a21 = 0, a30 = 0, a31 = 0;
  const int32_t dy_col = r->dy_col, x_col = r->x_col, cols = r->cols;
  int32_t row;
#if DGST_USE_ARM_DSP
  const int32_t zp2 = (int32_t)(((uint32_t)zp & 0xFFFFu) | ((uint32_t)zp << 16));
#endif
  for (row = 0; row < r->rows; ++row) {
    const int8_t* d = r->dy + row * r->dy_row + o;
    const int8_t* xp = r->x + row * r->x_row + c;
#if DGST_USE_ARM_DSP
    int32_t p;
    for (p = cols >> 1; p > 0; --p) { /* 2 pixels per iteration */
      TILE_4X2_PIXEL_PAIR(d, xp);
      d += 2 * dy_col;
      xp += 2 * x_col;
    }
    if (cols & 1) TILE_4X2_PIXEL(d, xp);
#else
    const int8_t* const d_end = d + cols * dy_col;
    while (d != d_end) {
      const int32_t x0 = xp[0] - zp, x1 = xp[1] - zp;
      const int32_t d0 = d[0], d1 = d[1], d2 = d[2], d3 = d[3];
      a00 += d0 * x0;
      a01 += d0 * x1;
      a10 += d1 * x0;
      a11 += d1 * x1;
      a20 += d2 * x0;
      a21 += d2 * x1;
      a30 += d3 * x0;
      a31 += d3 * x1;
      d += dy_col;
      xp += x_col;
    }
#endif
  }
  out[0] = a00;
  out[1] = a01;
  out += out_o_stride;
  out[0] = a10;
  out[1] = a11;
  out += out_o_stride;
  out[0] = a20;
  out[1] = a21;
  out += out_o_stride;
  out[0] = a30;
  out[1] = a31;
}

/* 4 output channels x 1 kept channel (odd k). */
TILE tile_4x1(const dgst_s8_rect* r, int32_t o, int32_t c, int32_t zp, int32_t* out,
                     int32_t out_o_stride) {
  int32_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
  const int32_t dy_col = r->dy_col, x_col = r->x_col;
  int32_t row;
  for (row = 0; row < r->rows; ++row) {
    const int8_t* d = r->dy + row * r->dy_row + o;
    const int8_t* xp = r->x + row * r->x_row + c;
    const int8_t* const d_end = d + r->cols * dy_col;
    while (d != d_end) {
      const int32_t x0 = *xp - zp;
      a0 += d[0] * x0;
      a1 += d[1] * x0;
      a2 += d[2] * x0;
      a3 += d[3] * x0;
      d += dy_col;
      xp += x_col;
    }
  }
  out[0] = a0;
  out[out_o_stride] = a1;
  out[2 * out_o_stride] = a2;
  out[3 * out_o_stride] = a3;
}

/* 1 output channel x up to 2 kept channels (c_out not a multiple of 4). */
TILE tile_1xn(const dgst_s8_rect* r, int32_t o, int32_t c, int32_t n, int32_t zp,
                     int32_t* out) {
  int32_t a0 = 0, a1 = 0;
  const int32_t dy_col = r->dy_col, x_col = r->x_col;
  const int32_t second = n > 1; /* 0 or 1: reads x[c] twice when n == 1, result dropped */
  int32_t row;
  for (row = 0; row < r->rows; ++row) {
    const int8_t* d = r->dy + row * r->dy_row + o;
    const int8_t* xp = r->x + row * r->x_row + c;
    const int8_t* const d_end = d + r->cols * dy_col;
    while (d != d_end) {
      const int32_t d0 = *d;
      a0 += d0 * (xp[0] - zp);
      a1 += d0 * (xp[second] - zp);
      d += dy_col;
      xp += x_col;
    }
  }
  out[0] = a0;
  if (n > 1) out[1] = a1;
}

/* A tap that sees a single output pixel (dense layers run as 1x1 convs on a 1x1 image):
 * the gradient is the outer product dy[o] * (x[c] - zp). */
static void outer_product_plain(const int8_t* dy, const int8_t* x, int32_t k, int32_t zp,
                          int32_t c_out, int32_t* out, int32_t out_o_stride) {
  int32_t o, c;
  for (o = 0; o < c_out; ++o, out += out_o_stride) {
    const int32_t d = dy[o];
    for (c = 0; c + 4 <= k; c += 4) {
      out[c] = d * (x[c] - zp);
      out[c + 1] = d * (x[c + 1] - zp);
      out[c + 2] = d * (x[c + 2] - zp);
      out[c + 3] = d * (x[c + 3] - zp);
    }
    for (; c < k; ++c) out[c] = d * (x[c] - zp);
  }
}

/* One tap (r: its rectangle, tap: &grad[0][i][j][0]) with the register tiles: 4x2 (4x1 for
 * an odd k) over 4 output channels at a time, 1 x 2 for the last c_out % 4. */
#if defined(__GNUC__) /* inlined into the tap loop, GCC spills the tiles' registers */
__attribute__((noinline))
#endif
static void tap_tiles(const dgst_s8_rect* rect, int32_t k, int32_t zp, int32_t c_out,
                      int32_t* tap, int32_t out_o_stride) {
  /* a local copy: the tiles' int32 stores may alias *rect, not it (no reloads of its fields) */
  const dgst_s8_rect local = *rect;
  const dgst_s8_rect* const r = &local;
  int32_t o, c;
  if (r->rows * r->cols == 1) {
    outer_product_plain(r->dy, r->x, k, zp, c_out, tap, out_o_stride);
    return;
  }
  for (o = 0; o + 4 <= c_out; o += 4) {
    int32_t* const out = tap + o * out_o_stride;
    for (c = 0; c + 2 <= k; c += 2) tile_4x2(r, o, c, zp, out + c, out_o_stride);
    if (c < k) tile_4x1(r, o, c, zp, out + c, out_o_stride);
  }
  for (; o < c_out; ++o) {
    int32_t* const out = tap + o * out_o_stride;
    for (c = 0; c < k; c += 2) tile_1xn(r, o, c, k - c, zp, out + c);
  }
}

#if DGST_USE_ARM_DSP

/* ---- Cores with the DSP extension ------------------------------------------------------
 * The reduction runs over output pixels, so SMLAD (two MACs per instruction) needs both
 * operands packed as (pixel p, pixel q) int16 lanes. A tap's rectangle is cut into segments
 * of up to 2 * MAX_PAIRS pixels of one row. For a chunk of up to CHUNK_C kept channels x is
 * packed once per segment (zero point subtracted), in blocks of 4 channels. dy is packed for
 * a pair of output channels (2 LDRH + ORR + 2 SXTB16 per pixel pair): into a buffer shared
 * by the chunk's blocks when there are several (per pixel pair LDRD of the two dy words,
 * 2 LDRD of x words, 8 SMLAD: 16 MACs, unrolled 8 pairs at a time), on the fly when there is
 * one block (small k; the tile starts from the odd pixel with SMUAD; 6 channels run as two
 * 3-channel tiles), unrolled like the buffered tiles. An odd last pixel is a pair whose x
 * high lanes are 0. Stack: 320 + 96 bytes of packed operands. */
#define X_WORDS 80   /* packed x of one segment and chunk: pairs x channels */
#define MAX_PAIRS 12 /* pixel pairs per segment (packed dy of 2 channels: 2 words a pair) */
#define CHUNK_C 16   /* kept channels per chunk */

/* The segment: n pixels of one row, dy and x at the first (channel 0 of the chunk). */
typedef struct {
  const int8_t* dy;
  const int8_t* x;
  int32_t n, dy_col, x_col, zp, c_out, out_o_stride, accumulate;
} wgrad_segment;


/* dy bytes (p o, p o+1, q o, q o+1) -> (dy[p][o], dy[q][o]) in d0, (dy[p][o+1], dy[q][o+1])
 * in d1. */
#define PACK_DY_PAIR(dp_, dy_col_, d0_, d1_)                 \
  do {                                                       \
    uint16_t hp_, hq_;                                       \
    uint32_t w_;                                             \
    memcpy(&hp_, (dp_), 2);                                  \
    memcpy(&hq_, (dp_) + (dy_col_), 2);                      \
    w_ = (uint32_t)hp_ | ((uint32_t)hq_ << 16);              \
    d0_ = __sxtb16((int32_t)w_);                             \
    d1_ = dgst_sxtb16_ror8(w_);                              \
  } while (0)

#define MAC_2XN(NC, x_)                                                             \
  do {                                                                              \
    a0 = __smlad(d0, (x_)[0], a0), b0 = __smlad(d1, (x_)[0], b0);                   \
    if (NC > 1) a1 = __smlad(d0, (x_)[1], a1), b1 = __smlad(d1, (x_)[1], b1);       \
    if (NC > 2) a2 = __smlad(d0, (x_)[2], a2), b2 = __smlad(d1, (x_)[2], b2);       \
    if (NC > 3) a3 = __smlad(d0, (x_)[3], a3), b3 = __smlad(d1, (x_)[3], b3);       \
  } while (0)

/* The first products of a tile (SMUAD: no zeroed accumulators). */
#define MUL_2XN(NC, x_)                                                             \
  do {                                                                              \
    a0 = __smuad(d0, (x_)[0]), b0 = __smuad(d1, (x_)[0]);                           \
    if (NC > 1) a1 = __smuad(d0, (x_)[1]), b1 = __smuad(d1, (x_)[1]);               \
    if (NC > 2) a2 = __smuad(d0, (x_)[2]), b2 = __smuad(d1, (x_)[2]);               \
    if (NC > 3) a3 = __smuad(d0, (x_)[3]), b3 = __smuad(d1, (x_)[3]);               \
  } while (0)

#define STORE_2XN(NC) STORE_2XN_IF(NC, s->accumulate)
#define STORE_2XN_IF(NC, accumulate_)                                          \
  do {                                                                         \
    if (accumulate_) {                                                         \
      a0 += out[0], b0 += out_b[0];                                            \
      if (NC > 1) a1 += out[1], b1 += out_b[1];                                \
      if (NC > 2) a2 += out[2], b2 += out_b[2];                                \
      if (NC > 3) a3 += out[3], b3 += out_b[3];                                \
    }                                                                          \
    out[0] = a0, out_b[0] = b0;                                                \
    if (NC > 1) out[1] = a1, out_b[1] = b1;                                    \
    if (NC > 2) out[2] = a2, out_b[2] = b2;                                    \
    if (NC > 3) out[3] = a3, out_b[3] = b3;                                    \
  } while (0)

/* The pairs of a tile are unrolled 8 at a time, entered Duff-style by a switch on how many
 * are left: every load then has a constant offset and there is no loop counter, which keeps
 * the 8 accumulators, the operands and the pointers in the 14 registers. */
#define UNROLL_8(PAIR, left_)           \
  switch (left_) {                      \
    case 8: PAIR(7); /* fall through */ \
    case 7: PAIR(6); /* fall through */ \
    case 6: PAIR(5); /* fall through */ \
    case 5: PAIR(4); /* fall through */ \
    case 4: PAIR(3); /* fall through */ \
    case 3: PAIR(2); /* fall through */ \
    case 2: PAIR(1); /* fall through */ \
    case 1: PAIR(0); /* fall through */ \
    default: break;                     \
  }

/* Every output-channel pair (o, o + 1) x NC kept channels, dy packed on the fly (a chunk of
 * one block, or the last channels): xb: the block's packed words; out: &grad[0][i][j][c].
 * Each tile starts from its last pair (the odd pixel, if any) with SMUAD. */
#define ROWS_FLY(NC)                                                                      \
  TILE rows_fly_2x##NC(const wgrad_segment* seg, const int32_t* xb, int32_t* out) {       \
    const wgrad_segment local = *seg; /* the int32 stores may alias *seg, not local */     \
    const wgrad_segment* const s = &local;                                                \
    const int32_t dy_col = s->dy_col, n = s->n, stride = s->out_o_stride;                 \
    const int32_t dy2 = 2 * dy_col;                                                       \
    const int32_t* const xl = xb + ((n - 1) >> 1) * NC; /* the last pair's words */       \
    /* the last pair's dy: pixels n - 2, n - 1, or for odd n pixel n - 1 and (x's high     \
     * lanes being 0) any pixel in the segment */                                         \
    const int32_t last_p = (n & 1 ? n - 1 : n - 2) * dy_col;                              \
    const int32_t last_q = n & 1 ? (n > 1 ? -dy_col : 0) : dy_col;                        \
    const int8_t* d_base = s->dy;                                                         \
    int32_t o;                                                                            \
    if (s->accumulate) { /* later segments of a long row: the plain loop (less code) */   \
      FLY_TILES(NC, FLY_PAIRS_LOOP, 1)                                                    \
    } else {                                                                              \
      FLY_TILES(NC, FLY_PAIRS_UNROLLED, 0)                                                \
    }                                                                                     \
  }
/* The output-channel pairs of rows_fly_2xNC: each tile starts from its last pair with SMUAD,
 * PAIRS(NC) adds the other pairs, then the sums are stored (added to out when ACC). */
#define FLY_TILES(NC, PAIRS, ACC)                                                         \
  for (o = 0; o + 2 <= s->c_out; o += 2, d_base += 2, out += 2 * stride) {                \
    int32_t a0, a1 = 0, a2 = 0, a3 = 0, b0, b1 = 0, b2 = 0, b3 = 0, d0, d1, t;            \
    int32_t* const out_b = out + stride;                                                  \
    const int8_t* d = d_base;                                                             \
    const int32_t* x = xb;                                                                \
    PACK_DY_PAIR(d + last_p, last_q, d0, d1);                                             \
    MUL_2XN(NC, xl);                                                                      \
    PAIRS(NC)                                                                             \
    STORE_2XN_IF(NC, ACC);                                                                \
  }
/* The other pairs of a FLY_TILES tile one by one. */
#define FLY_PAIRS_LOOP(NC)                                                                \
  for (t = (n - 1) >> 1; t > 0; --t, x += NC, d += dy2) {                                 \
    PACK_DY_PAIR(d, dy_col, d0, d1);                                                      \
    MAC_2XN(NC, x);                                                                       \
  }
/* The other pairs of a FLY_TILES tile, unrolled. */
#define FLY_PAIRS_UNROLLED(NC)                                                            \
  for (t = (n - 1) >> 1; t > 8; t -= 8, x += 8 * NC, d += 8 * dy2)                        \
    UNROLL_8(FLY_PAIR_##NC, 8)                                                            \
  UNROLL_8(FLY_PAIR_##NC, t)
/* Pair i of the on-the-fly tiles (d, x: the first pair's). */
#define FLY_PAIR(NC, i)                                    \
  do {                                                     \
    PACK_DY_PAIR(d + (i) * dy2, dy_col, d0, d1);           \
    MAC_2XN(NC, x + (i) * NC);                             \
  } while (0)
#define FLY_PAIR_1(i) FLY_PAIR(1, i)
#define FLY_PAIR_2(i) FLY_PAIR(2, i)
#define FLY_PAIR_3(i) FLY_PAIR(3, i)
#define FLY_PAIR_4(i) FLY_PAIR(4, i)
ROWS_FLY(1)
ROWS_FLY(2)
ROWS_FLY(3)
ROWS_FLY(4)


/* Pair i of a group from the packed dy. */
#define BUF_PAIR(i)                                       \
  do {                                                    \
    const int32_t d0 = db[2 * (i)], d1 = db[2 * (i) + 1]; \
    MAC_2XN(4, x + 4 * (i));                              \
  } while (0)

/* Every output-channel pair x `blocks` blocks of 4 kept channels (block b's words at
 * xb + b * 4 * pairs): dy packed once per output-channel pair into a buffer, then per
 * block and pair LDRD of dy, 2 LDRD of x, 8 SMLAD. */
TILE rows_buf_2x4(const wgrad_segment* s, const int32_t* xb, int32_t blocks, int32_t* out) {
  int32_t dbuf[2 * MAX_PAIRS];
  const int32_t dy_col = s->dy_col, n = s->n, stride = s->out_o_stride;
  const int32_t pairs = (n + 1) >> 1;
  const int8_t* d_base = s->dy;
  int32_t o;
  for (o = 0; o + 2 <= s->c_out; o += 2, d_base += 2, out += 2 * stride) {
    const int8_t* d = d_base;
    int32_t* pk = dbuf;
    const int32_t* xblock = xb;
    int32_t b, t;
    for (t = n >> 1; t > 0; --t, d += 2 * dy_col, pk += 2) PACK_DY_PAIR(d, dy_col, pk[0], pk[1]);
    if (n & 1) pk[0] = d[0], pk[1] = d[1];
    for (b = 0; b < blocks; ++b, xblock += 4 * pairs) {
      int32_t a0 = 0, a1 = 0, a2 = 0, a3 = 0, b0 = 0, b1 = 0, b2 = 0, b3 = 0, left;
      const int32_t* db = dbuf;
      const int32_t* x = xblock;
      for (left = pairs; left > 8; left -= 8, db += 16, x += 32) UNROLL_8(BUF_PAIR, 8)
      UNROLL_8(BUF_PAIR, left)
      {
        int32_t* const out_a = out + 4 * b;
        int32_t* const out_b = out_a + stride;
        int32_t* const out = out_a; /* for STORE_2XN */
        STORE_2XN(4);
      }
    }
  }
}

/* The last output channel of an odd c_out x nc kept channels (d: &dy[first pixel][o]). */
static void dot_1xn(const int8_t* d, int32_t dy_col, int32_t n, const int32_t* xb, int32_t nc,
                    int32_t* out, int32_t accumulate) {
  int32_t cc, t;
  for (cc = 0; cc < nc; ++cc) {
    const int8_t* dp = d;
    int32_t acc = accumulate ? out[cc] : 0;
    for (t = 0; t < n >> 1; ++t, dp += 2 * dy_col)
      acc = __smlad(dgst_pkhbt(dp[0], dp[dy_col]), xb[t * nc + cc], acc);
    if (n & 1) acc = __smlad(dp[0], xb[t * nc + cc], acc);
    out[cc] = acc;
  }
}

/* The packed x of channels [0, nc) of the n pixels x, x + x_col, ...:
 * buf[t * nc + cc] = (x[2t][cc] - zp, x[2t + 1][cc] - zp); an odd last pixel has high
 * lanes 0, so whatever dy value meets them adds nothing. */
static void pack_x(const int8_t* x, int32_t x_col, int32_t n, int32_t nc, int32_t zp,
                   int32_t* buf) {
  int32_t t, cc;
  for (t = n >> 1; t > 0; --t, x += 2 * x_col)
    for (cc = 0; cc < nc; ++cc) *buf++ = dgst_pkhbt(x[cc] - zp, x[x_col + cc] - zp);
  if (n & 1)
    for (cc = 0; cc < nc; ++cc) *buf++ = (int32_t)((uint32_t)(x[cc] - zp) & 0xFFFFu);
}

/* Kept channels [0, cb) of the segment (out = &grad[0][i][j][c0]). */
TILE reduce_chunk(const wgrad_segment* s, int32_t cb, int32_t* out) {
  int32_t xbuf[X_WORDS];
  const int32_t pairs = (s->n + 1) >> 1;
  int32_t b;
  if (cb == 6) { /* two 2x3 tiles: fewer instructions than 2x4 + 2x2 */
    pack_x(s->x, s->x_col, s->n, 3, s->zp, xbuf);
    pack_x(s->x + 3, s->x_col, s->n, 3, s->zp, xbuf + 3 * pairs);
    rows_fly_2x3(s, xbuf, out);
    rows_fly_2x3(s, xbuf + 3 * pairs, out + 3);
    if (s->c_out & 1)
      for (b = 0; b < 6; b += 3)
        dot_1xn(s->dy + s->c_out - 1, s->dy_col, s->n, xbuf + b * pairs, 3,
                out + (s->c_out - 1) * s->out_o_stride + b, s->accumulate);
    return;
  }
  for (b = 0; b < cb; b += 4) /* blocks of 4 channels, each pair by pair */
    pack_x(s->x + b, s->x_col, s->n, dgst_min_i32(4, cb - b), s->zp, xbuf + b * pairs);
  const int32_t blocks = cb >> 2, rest = cb & 3;
  if (blocks > 1) rows_buf_2x4(s, xbuf, blocks, out);
  if (blocks == 1) rows_fly_2x4(s, xbuf, out);
  switch (rest) {
    case 3: rows_fly_2x3(s, xbuf + 4 * blocks * pairs, out + 4 * blocks); break;
    case 2: rows_fly_2x2(s, xbuf + 4 * blocks * pairs, out + 4 * blocks); break;
    case 1: rows_fly_2x1(s, xbuf + 4 * blocks * pairs, out + 4 * blocks); break;
    default: break;
  }
  if (s->c_out & 1) /* the last output channel */
    for (b = 0; b < cb; b += 4)
      dot_1xn(s->dy + s->c_out - 1, s->dy_col, s->n, xbuf + b * pairs, dgst_min_i32(4, cb - b),
              out + (s->c_out - 1) * s->out_o_stride + b, s->accumulate);
}

/* (bottom lane of a) * b and (top lane of a) * b into lo, hi: SMULBB, SMULTB. */
#define SMUL_BT(a_, b_, lo_, hi_) \
  __asm("smulbb %0, %2, %3\n\tsmultb %1, %2, %3" : "=&r"(lo_), "=&r"(hi_) : "r"(a_), "r"(b_))

/* A tap that sees a single output pixel (dense layers run as 1x1 convs on a 1x1 image):
 * the gradient is the outer product dy[o] * (x[c] - zp). 8 kept channels at a time are
 * held as 4 words of (x[c] - zp, x[c + 1] - zp) lanes: SMULBB / SMULTB per product, STRD
 * per two. */
TILE outer_product(const int8_t* dy, const int8_t* x, int32_t k, int32_t zp,
                          int32_t c_out, int32_t* out, int32_t out_o_stride) {
  const int32_t zp2 = (int32_t)(((uint32_t)zp & 0xFFFFu) | ((uint32_t)zp << 16));
  const int8_t* const dy_end = dy + c_out;
  int32_t c = 0;
  for (; c + 8 <= k; c += 8) {
    uint32_t lo, hi;
    int32_t e, f, g, h, x01, x23, x45, x67;
    const int8_t* d = dy;
    int32_t* p = out + c;
    memcpy(&lo, x + c, 4);
    memcpy(&hi, x + c + 4, 4);
    /* SXTB16 takes bytes 0, 2 and (ROR 8) 1, 3: repack as (c, c + 1), (c + 2, c + 3) */
    e = __ssub16(__sxtb16((int32_t)lo), zp2); /* (x0, x2) */
    f = __ssub16(dgst_sxtb16_ror8(lo), zp2);  /* (x1, x3) */
    g = __ssub16(__sxtb16((int32_t)hi), zp2); /* (x4, x6) */
    h = __ssub16(dgst_sxtb16_ror8(hi), zp2);  /* (x5, x7) */
    x01 = dgst_pkhbt(e, f);
    x23 = dgst_pkhtb(e, f);
    x45 = dgst_pkhbt(g, h);
    x67 = dgst_pkhtb(g, h);
    do {
      const int32_t v = *d++;
      int32_t r0, r1, r2, r3, r4, r5, r6, r7;
      SMUL_BT(x01, v, r0, r1);
      SMUL_BT(x23, v, r2, r3);
      SMUL_BT(x45, v, r4, r5);
      SMUL_BT(x67, v, r6, r7);
      p[0] = r0, p[1] = r1, p[2] = r2, p[3] = r3, p[4] = r4, p[5] = r5, p[6] = r6, p[7] = r7;
      p += out_o_stride;
    } while (d != dy_end);
  }
  for (; c + 2 <= k; c += 2) {
    const int32_t x01 = dgst_pkhbt(x[c] - zp, x[c + 1] - zp);
    const int8_t* d = dy;
    int32_t* p = out + c;
    do {
      const int32_t v = *d++;
      int32_t r0, r1;
      SMUL_BT(x01, v, r0, r1);
      p[0] = r0, p[1] = r1;
      p += out_o_stride;
    } while (d != dy_end);
  }
  if (c < k) {
    const int32_t xc = x[c] - zp;
    int32_t* p = out + c;
    int32_t o;
    for (o = 0; o < c_out; ++o, p += out_o_stride) *p = dy[o] * xc;
  }
}

void dgst_conv2d_weight_grad_s8(const dgst_conv_geometry* g, const int8_t* x_kept, int32_t k,
                                int32_t zp, const int8_t* dy, int32_t c_out, int32_t* grad) {
  const int32_t kh = g->kernel_h, kw = g->kernel_w;
  if (kh == 1 && kw == 1 && g->out_h * g->out_w == 1 && g->in_h * g->in_w == 1 &&
      g->pad_top == 0 && g->pad_left == 0) { /* a dense layer: skip the tap rectangle */
    outer_product(dy, x_kept, k, zp, c_out, grad, k);
    return;
  }
  const int32_t out_o_stride = kh * kw * k;
  int32_t i, j;
  for (i = 0; i < kh; ++i) {
    for (j = 0; j < kw; ++j) {
      const dgst_s8_rect r = dgst_s8_rect_at(g, i, j, dy, c_out, x_kept, k);
      int32_t* const tap = grad + (i * kw + j) * k;
      wgrad_segment s;
      int32_t row, chunk, seg;
      if (r.rows * r.cols == 1) {
        outer_product(r.dy, r.x, k, zp, c_out, tap, out_o_stride);
        continue;
      }
      if (r.cols < 8) { /* short rows (or a tap that only reads padding: gradient 0) */
        tap_tiles(&r, k, zp, c_out, tap, out_o_stride);
        continue;
      }
      /* chunks of CHUNK_C channels (dy packed once for 4 blocks) when a whole row fits
       * X_WORDS that way, else of 4 (longer segments, dy packed on the fly) */
      chunk = dgst_min_i32(k, CHUNK_C) * ((r.cols + 1) >> 1) <= X_WORDS ? CHUNK_C : 4;
      seg = chunk > 4 ? 2 * dgst_min_i32(MAX_PAIRS, X_WORDS / dgst_min_i32(k, chunk))
                      : 2 * (X_WORDS / dgst_min_i32(k, 4));
      s.dy_col = r.dy_col;
      s.x_col = r.x_col;
      s.zp = zp;
      s.c_out = c_out;
      s.out_o_stride = out_o_stride;
      s.accumulate = 0;
      for (row = 0; row < r.rows; ++row) {
        int32_t col, c0;
        for (col = 0; col < r.cols; col += seg, s.accumulate = 1) {
          s.n = dgst_min_i32(seg, r.cols - col);
          s.dy = r.dy + row * r.dy_row + col * r.dy_col;
          s.x = r.x + row * r.x_row + col * r.x_col;
          for (c0 = 0; c0 < k; c0 += chunk) {
            wgrad_segment cs = s;
            cs.x = s.x + c0;
            reduce_chunk(&cs, dgst_min_i32(chunk, k - c0), tap + c0);
          }
        }
      }
    }
  }
}

#else /* ---- portable C --------------------------------------------------------------- */
void dgst_conv2d_weight_grad_s8(const dgst_conv_geometry* g, const int8_t* x_kept, int32_t k,
                                int32_t x_zero_point, const int8_t* dy, int32_t c_out,
                                int32_t* grad) {
  const int32_t kh = g->kernel_h, kw = g->kernel_w;
  const int32_t out_o_stride = kh * kw * k; /* grad[o+1] - grad[o] */
  int32_t i, j;
  for (i = 0; i < kh; ++i) {
    for (j = 0; j < kw; ++j) {
      /* a tap never inside the image is an empty rectangle: gradient 0 */
      const dgst_s8_rect r = dgst_s8_rect_at(g, i, j, dy, c_out, x_kept, k);
      tap_tiles(&r, k, x_zero_point, c_out, grad + (i * kw + j) * k, out_o_stride);
    }
  }
}
#endif
