/* Depthwise (multiplier 1) input gradient.
 *
 * dx[iy][ix][c] = dy_scale * sum over (i, j, oy, ox) mapping to (iy, ix) of
 *                 weight_scale[c] * dy[oy][ox][c] * w[i][j][c]
 *
 * Gather form: for each input pixel the taps that read it are found (an arithmetic
 * progression per axis, computed once per row and once per column: no per-element bounds
 * checks) and listed as (dy offset, w offset) pairs; then 4 channels at a time are
 * accumulated exactly in int32 registers over that list (one loop, whatever the kernel
 * shape; kernels with more than DGST_DW_LIST_TAPS taps walk the two axes instead). Only
 * then is the float scale applied:
 *   dx = dy_scale * (weight_scale[c] * (float)acc)
 * (exact integer sum, then two float multiplies: reproducible bit for bit). */
#include <string.h>

#include "dgst_internal.h"
#include "dgst_train_kernels.h"

/* Taps listed per input pixel (on the stack: 8 bytes each); 25 covers 5x5 kernels. */
#ifndef DGST_DW_LIST_TAPS
#define DGST_DW_LIST_TAPS 25
#endif

/* a[0..3] += d[0..3] * wp[0..3]: 4 channels of one tap (two SMLAs per pair of lanes on DSP
 * cores). Inlined into the loops, so the sums stay in registers. */
static inline void mac4_s8(const int8_t* d, const int8_t* wp, int32_t* a0, int32_t* a1,
                           int32_t* a2, int32_t* a3) {
#if DGST_USE_ARM_DSP
  uint32_t dw, ww;
  int32_t d02, w02, d13, w13;
  memcpy(&dw, d, 4);
  memcpy(&ww, wp, 4);
  d02 = __sxtb16((int32_t)dw);
  w02 = __sxtb16((int32_t)ww);
  d13 = dgst_sxtb16_ror8(dw);
  w13 = dgst_sxtb16_ror8(ww);
  *a0 = __smlabb(d02, w02, *a0);
  *a2 = __smlatt(d02, w02, *a2);
  *a1 = __smlabb(d13, w13, *a1);
  *a3 = __smlatt(d13, w13, *a3);
#else
  *a0 += d[0] * wp[0];
  *a1 += d[1] * wp[1];
  *a2 += d[2] * wp[2];
  *a3 += d[3] * wp[3];
#endif
}

/* dy[.. + c .. c+3] * w[.. + c .. c+3] over the listed taps into a[0..3]. */
static void dot4_listed(const int8_t* dy, const int8_t* w, const int32_t* taps, int32_t n,
                        int32_t* acc) {
  int32_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
  const int32_t* const end = taps + 2 * n;
  for (; taps != end; taps += 2) {
    mac4_s8(dy + taps[0], w + taps[1], &a0, &a1, &a2, &a3);
  }
  acc[0] = a0;
  acc[1] = a1;
  acc[2] = a2;
  acc[3] = a3;
}

void dgst_depthwise_input_grad_s8(const dgst_conv_geometry* g, const int8_t* dy,
                                  float dy_scale, const int8_t* w, const float* weight_scale,
                                  int32_t channels, float* dx) {
  const int32_t C = channels, kw = g->kernel_w;
  int32_t iy, ix;
  for (iy = 0; iy < g->in_h; ++iy) {
    const dgst_tap_walk wy = dgst_walk_taps(iy, g->pad_top, g->stride_h, g->dilation_h,
                                            g->kernel_h, g->out_h);
    /* per tap step along y: dy moves up out_step rows, w down tap_step rows */
    const int32_t dy_step_y = wy.out_step * g->out_w * C, w_step_y = wy.tap_step * kw * C;
    for (ix = 0; ix < g->in_w; ++ix) {
      const dgst_tap_walk wx = dgst_walk_taps(ix, g->pad_left, g->stride_w, g->dilation_w,
                                              kw, g->out_w);
      const int32_t dy_step_x = wx.out_step * C, w_step_x = wx.tap_step * C;
      float* const out = dx + (iy * g->in_w + ix) * C;
      int32_t od = 0, ow = 0, c; /* offsets of the first tap's dy pixel and w tap */
      const int32_t ny = wx.count > 0 ? wy.count : 0, nx = wx.count;
      if (ny > 0) {
        od = (wy.out0 * g->out_w + wx.out0) * C;
        ow = (wy.tap0 * kw + wx.tap0) * C;
      }
      if (ny * nx <= DGST_DW_LIST_TAPS) {
        int32_t taps[2 * DGST_DW_LIST_TAPS];
        int32_t n = 0, m, q;
        for (m = 0; m < ny; ++m) {
          for (q = 0; q < nx; ++q, ++n) {
            taps[2 * n] = od - m * dy_step_y - q * dy_step_x;
            taps[2 * n + 1] = ow + m * w_step_y + q * w_step_x;
          }
        }
        for (c = 0; c + 4 <= C; c += 4) {
          int32_t a[4];
          dot4_listed(dy + c, w + c, taps, n, a);
          out[c] = dy_scale * (weight_scale[c] * (float)a[0]);
          out[c + 1] = dy_scale * (weight_scale[c + 1] * (float)a[1]);
          out[c + 2] = dy_scale * (weight_scale[c + 2] * (float)a[2]);
          out[c + 3] = dy_scale * (weight_scale[c + 3] * (float)a[3]);
        }
        for (; c < C; ++c) {
          int32_t a = 0, t;
          for (t = 0; t < n; ++t) a += dy[taps[2 * t] + c] * w[taps[2 * t + 1] + c];
          out[c] = dy_scale * (weight_scale[c] * (float)a);
        }
        continue;
      }
      /* offsets, not pointers: after the last tap they may point before dy (never read) */
      for (c = 0; c + 4 <= C; c += 4) {
        int32_t a0 = 0, a1 = 0, a2 = 0, a3 = 0, m, n;
        int32_t odr = od + c, owr = ow + c;
        for (m = 0; m < ny; ++m, odr -= dy_step_y, owr += w_step_y) {
          int32_t odx = odr, owx = owr;
          for (n = 0; n < nx; ++n, odx -= dy_step_x, owx += w_step_x)
            mac4_s8(dy + odx, w + owx, &a0, &a1, &a2, &a3);
        }
        out[c] = dy_scale * (weight_scale[c] * (float)a0);
        out[c + 1] = dy_scale * (weight_scale[c + 1] * (float)a1);
        out[c + 2] = dy_scale * (weight_scale[c + 2] * (float)a2);
        out[c + 3] = dy_scale * (weight_scale[c + 3] * (float)a3);
      }
      for (; c < C; ++c) {
        int32_t a = 0, m, n;
        int32_t odr = od + c, owr = ow + c;
        for (m = 0; m < ny; ++m, odr -= dy_step_y, owr += w_step_y) {
          int32_t odx = odr, owx = owr;
          for (n = 0; n < nx; ++n, odx -= dy_step_x, owx += w_step_x) a += dy[odx] * w[owx];
        }
        out[c] = dy_scale * (weight_scale[c] * (float)a);
      }
    }
  }
}
