/* A frozen inverted-residual block, conv -> depthwise -> 1x1 projection, computed row by
 * row: only dw_h rows of the conv output and one row of the depthwise output exist at a
 * time, never the whole expanded activation (e.g. 64x64x48 int8 = 192 KB in MobileNetV2-0.35
 * at 128x128). Each stage is TFLite's int8 per-channel convolution arithmetic (reference
 * kernels), so the block's output equals the three builtin ops' output bit for bit.
 * The dot products over channels use SMLAD on cores with the DSP extension. */
#include <string.h>

#include "dgst_internal.h"

/* sum_i (x[i] + x_offset) * w[i]: x + offset fits an int16 lane (|x + offset| <= 255). */
static inline int32_t dot_s8(const int8_t* x, int32_t x_offset, const int8_t* w, int32_t n) {
  int32_t acc = 0, i = 0;
#if DGST_USE_ARM_DSP
  const int32_t offset2 = (int32_t)(((uint32_t)(uint16_t)x_offset << 16) | (uint16_t)x_offset);
  for (; i + 4 <= n; i += 4) {
    uint32_t xv, wv;
    memcpy(&xv, x + i, 4);
    memcpy(&wv, w + i, 4);
    acc = __smlad(__sadd16(__sxtb16((int32_t)xv), offset2), __sxtb16((int32_t)wv), acc);
    acc = __smlad(__sadd16(dgst_sxtb16_ror8(xv), offset2), dgst_sxtb16_ror8(wv), acc);
  }
#endif
  for (; i < n; ++i) acc += (x[i] + x_offset) * w[i];
  return acc;
}

int32_t dgst_fused_block_scratch_bytes(const dgst_fused_block_geometry* g) {
  return (int32_t)sizeof(int32_t) * (g->dw_h + g->mid_c) + g->dw_h * g->mid_w * g->mid_c +
         g->out_w * g->mid_c;
}

static inline int8_t dgst_requantize_s8(int32_t acc, const dgst_requant_params* p, int32_t c) {
  int32_t v = dgst_multiply_by_quantized_multiplier(acc + p->bias[c], p->multiplier[c],
                                                    p->shift[c]) + p->output_offset;
  v = dgst_max_i32(v, p->act_min);
  return (int8_t)dgst_min_i32(v, p->act_max);
}

/* Row `r` of the first stage (a KxK convolution of x) into `row` [mid_w][mid_c]. The
 * geometry and parameters are copied into locals: int8 stores may alias any object, so
 * fields read through the pointers would be reloaded after every store. */
static void conv_row(const dgst_fused_block_geometry* geometry,
                     const dgst_requant_params* params, const int8_t* x, int32_t r,
                     int8_t* row) {
  const dgst_fused_block_geometry g = *geometry;
  const dgst_requant_params p = *params;
  const int32_t iy0 = r * g.conv_stride_h - g.conv_pad_top;
  const int32_t ky_lo = dgst_max_i32(0, -iy0), ky_hi = dgst_min_i32(g.conv_h, g.in_h - iy0);
  const int32_t filter = g.conv_h * g.conv_w * g.in_c;
  int32_t ox, oc, ky, kx;
  for (ox = 0; ox < g.mid_w; ++ox) {
    const int32_t ix0 = ox * g.conv_stride_w - g.conv_pad_left;
    const int32_t kx_lo = dgst_max_i32(0, -ix0);
    const int32_t kx_hi = dgst_min_i32(g.conv_w, g.in_w - ix0);
    int8_t* out = row + ox * g.mid_c;
    for (oc = 0; oc < g.mid_c; ++oc) {
      const int8_t* w = p.weights + oc * filter;
      int32_t acc = 0;
      for (ky = ky_lo; ky < ky_hi; ++ky) {
        for (kx = kx_lo; kx < kx_hi; ++kx) {
          acc += dot_s8(x + ((iy0 + ky) * g.in_w + ix0 + kx) * g.in_c, p.input_offset,
                        w + (ky * g.conv_w + kx) * g.in_c, g.in_c);
        }
      }
      out[oc] = dgst_requantize_s8(acc, &p, oc);
    }
  }
}

void dgst_fused_block_s8(const dgst_fused_block_geometry* geometry,
                         const dgst_requant_params* conv, const dgst_requant_params* dw_params,
                         const dgst_requant_params* project_params, const int8_t* x, int8_t* y,
                         void* scratch) {
  const dgst_fused_block_geometry g = *geometry;
  const dgst_requant_params dw = *dw_params, project = *project_params;
  const int32_t row_bytes = g.mid_w * g.mid_c;
  int32_t* row_of_slot = (int32_t*)scratch; /* which conv-output row each ring slot holds */
  int32_t* acc = row_of_slot + g.dw_h;       /* depthwise accumulators of one pixel */
  int8_t* ring = (int8_t*)(acc + g.mid_c);
  int8_t* dw_row = ring + g.dw_h * row_bytes;
  int32_t s, oy, ox, c, ky, kx, oc;
  for (s = 0; s < g.dw_h; ++s) row_of_slot[s] = -1;
  for (oy = 0; oy < g.out_h; ++oy) {
    const int32_t iy0 = oy * g.dw_stride_h - g.dw_pad_top;
    const int32_t ky_lo = dgst_max_i32(0, -iy0), ky_hi = dgst_min_i32(g.dw_h, g.mid_h - iy0);
    const int8_t* rows[DGST_FUSED_BLOCK_MAX_DW_H]; /* conv-output row of each tap row */
    /* the rows this output row reads are consecutive, so slot r % dw_h never holds a row
     * still needed when it is overwritten */
    for (ky = ky_lo; ky < ky_hi; ++ky) {
      const int32_t r = iy0 + ky, slot = r % g.dw_h;
      if (row_of_slot[slot] != r) {
        conv_row(geometry, conv, x, r, ring + slot * row_bytes);
        row_of_slot[slot] = r;
      }
      rows[ky] = ring + slot * row_bytes;
    }
    for (ox = 0; ox < g.out_w; ++ox) {
      const int32_t ix0 = ox * g.dw_stride_w - g.dw_pad_left;
      const int32_t kx_lo = dgst_max_i32(0, -ix0);
      const int32_t kx_hi = dgst_min_i32(g.dw_w, g.mid_w - ix0);
      int8_t* out = dw_row + ox * g.mid_c;
      for (c = 0; c < g.mid_c; ++c) acc[c] = 0;
      for (ky = ky_lo; ky < ky_hi; ++ky) {
        const int8_t* in = rows[ky] + ix0 * g.mid_c;
        const int8_t* w = dw.weights + ky * g.dw_w * g.mid_c;
        for (kx = kx_lo; kx < kx_hi; ++kx) {
          const int8_t* ip = in + kx * g.mid_c;
          const int8_t* wp = w + kx * g.mid_c;
          for (c = 0; c < g.mid_c; ++c) acc[c] += (ip[c] + dw.input_offset) * wp[c];
        }
      }
      for (c = 0; c < g.mid_c; ++c) out[c] = dgst_requantize_s8(acc[c], &dw, c);
    }
    for (ox = 0; ox < g.out_w; ++ox) {
      const int8_t* in = dw_row + ox * g.mid_c;
      int8_t* out = y + (oy * g.out_w + ox) * g.out_c;
      for (oc = 0; oc < g.out_c; ++oc) {
        out[oc] = dgst_requantize_s8(
            dot_s8(in, project.input_offset, project.weights + oc * g.mid_c, g.mid_c),
            &project, oc);
      }
    }
  }
}
