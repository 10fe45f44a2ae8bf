/* A frozen inverted-residual block, conv -> depthwise -> 1x1 projection, computed row by
 * row: only dw_h rows of the conv output and one row of the depthwise output exist at a
 * time, never the whole expanded activation (e.g. 64x64x48 int8 = 192 KB in MobileNetV2-0.35
 * at 128x128). Each stage is one row of a single convolution (conv2d_forward.c: TFLite's
 * int8 per-channel arithmetic of the reference kernels), so the block's output equals the
 * three builtin ops' output bit for bit. */
#include "dgst_internal.h"

int32_t dgst_fused_block_scratch_bytes(const dgst_fused_block_geometry* g) {
  return (int32_t)sizeof(int32_t) * (g->dw_h + g->mid_c) + g->dw_h * g->mid_w * g->mid_c +
         g->out_w * g->mid_c;
}

/* The three stages as single convolutions: the conv over x, the depthwise over the conv
 * output, the projection as a 1x1 conv over one row of the depthwise output. */
static void stage_geometries(const dgst_fused_block_geometry* g, dgst_conv_geometry* conv,
                             dgst_conv_geometry* dw, dgst_conv_geometry* project) {
  const dgst_conv_geometry c = {g->in_h, g->in_w, g->mid_h, g->mid_w, g->conv_h, g->conv_w,
                                g->conv_stride_h, g->conv_stride_w, 1, 1, g->conv_pad_top,
                                g->conv_pad_left};
  const dgst_conv_geometry d = {g->mid_h, g->mid_w, g->out_h, g->out_w, g->dw_h, g->dw_w,
                                g->dw_stride_h, g->dw_stride_w, 1, 1, g->dw_pad_top,
                                g->dw_pad_left};
  const dgst_conv_geometry p = {1, g->out_w, 1, g->out_w, 1, 1, 1, 1, 1, 1, 0, 0};
  *conv = c;
  *dw = d;
  *project = p;
}

void dgst_fused_block_s8(const dgst_fused_block_geometry* geometry,
                         const dgst_requant_params* conv, const dgst_requant_params* dw,
                         const dgst_requant_params* project, const int8_t* x, int8_t* y,
                         void* scratch) {
  const dgst_fused_block_geometry g = *geometry;
  const int32_t row_bytes = g.mid_w * g.mid_c;
  int32_t* row_of_slot = (int32_t*)scratch; /* which conv-output row each ring slot holds */
  int32_t* acc = row_of_slot + g.dw_h;       /* depthwise accumulators of one pixel */
  int8_t* ring = (int8_t*)(acc + g.mid_c);
  int8_t* dw_row = ring + g.dw_h * row_bytes;
  dgst_conv_geometry conv_g, dw_g, project_g;
  int32_t s, oy, ky;
  stage_geometries(geometry, &conv_g, &dw_g, &project_g);
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
        dgst_conv2d_row_s8(&conv_g, g.in_c, g.mid_c, conv, x, r, ring + slot * row_bytes);
        row_of_slot[slot] = r;
      }
      rows[ky] = ring + slot * row_bytes;
    }
    dgst_depthwise_conv2d_row_s8(&dw_g, g.mid_c, dw, rows, oy, acc, dw_row);
    dgst_conv2d_row_s8(&project_g, g.mid_c, g.out_c, project, dw_row, 0,
                       y + oy * g.out_w * g.out_c);
  }
}
