/* Conv2D input gradient (the transposed convolution), float accumulation.
 *
 * dx[iy][ix][c] = dy_scale * sum over (o, i, j, oy, ox) mapping to (iy, ix) of
 *                 weight_scale[o] * dy[oy][ox][o] * w[o][i][j][c]
 *
 * Scatter form: for each tap (i, j) the output pixels whose input is inside the image form
 * a rectangle (computed once per tap). A register tile of 4 output x 4 input channels of
 * scaled weights (ws[o] * w[o][i][j][c], 16 floats converted once per tap and tile) is
 * applied to every pixel of the rectangle: 4 dy conversions feed 16 multiply-accumulates
 * into 4 dx values, and no weight is converted inside the pixel loop.
 *
 * Summation order (fixed, so results are reproducible bit for bit, see reference.py):
 * dx starts at 0; for each tap in (i, j) order, for each output channel o in ascending
 * order: dx += (ws[o] * (float)w[o][i][j][c]) * (float)dy[oy][ox][o]; finally
 * dx = dy_scale * dx. Build without FP contraction (-ffp-contract=off) to keep it; on Arm
 * VFP the multiply-adds are single non-fused VMLA instructions (dgst_mac_f32). */
#include "dgst_internal.h"
#include "dgst_train_kernels.h"

/* Over the rectangle r (dy0: its first dy pixel, dx0: the input pixel that one reads, both
 * channel 0), output channels o..o+3 (weights wt[q * w_o_stride + c..c+3], scales ws[0..3])
 * into dx channels c..c+3. */
static void scatter_4x4(const dgst_tap_rect* r, const int8_t* dy0, float* dx0,
                        const int8_t* wt, int32_t w_o_stride, const float* ws, int32_t o,
                        int32_t c) {
  const int8_t* w0 = wt;
  const int8_t* w1 = wt + w_o_stride;
  const int8_t* w2 = wt + 2 * w_o_stride;
  const int8_t* w3 = wt + 3 * w_o_stride;
  /* wQC: output channel o+Q, input channel c+C */
  const float w00 = ws[0] * (float)w0[0], w01 = ws[0] * (float)w0[1];
  const float w02 = ws[0] * (float)w0[2], w03 = ws[0] * (float)w0[3];
  const float w10 = ws[1] * (float)w1[0], w11 = ws[1] * (float)w1[1];
  const float w12 = ws[1] * (float)w1[2], w13 = ws[1] * (float)w1[3];
  const float w20 = ws[2] * (float)w2[0], w21 = ws[2] * (float)w2[1];
  const float w22 = ws[2] * (float)w2[2], w23 = ws[2] * (float)w2[3];
  const float w30 = ws[3] * (float)w3[0], w31 = ws[3] * (float)w3[1];
  const float w32 = ws[3] * (float)w3[2], w33 = ws[3] * (float)w3[3];
  const int32_t dy_col = r->dy_col, dx_col = r->in_col;
  int32_t row;
  for (row = 0; row < r->rows; ++row) {
    const int8_t* d = dy0 + row * r->dy_row + o;
    float* x = dx0 + row * r->in_row + c;
    const int8_t* const d_end = d + r->cols * dy_col;
    while (d != d_end) {
      const float d0 = (float)d[0], d1 = (float)d[1], d2 = (float)d[2], d3 = (float)d[3];
      float a0 = x[0], a1 = x[1], a2 = x[2], a3 = x[3];
      a0 = dgst_mac_f32(a0, w00, d0);
      a1 = dgst_mac_f32(a1, w01, d0);
      a2 = dgst_mac_f32(a2, w02, d0);
      a3 = dgst_mac_f32(a3, w03, d0);
      a0 = dgst_mac_f32(a0, w10, d1);
      a1 = dgst_mac_f32(a1, w11, d1);
      a2 = dgst_mac_f32(a2, w12, d1);
      a3 = dgst_mac_f32(a3, w13, d1);
      a0 = dgst_mac_f32(a0, w20, d2);
      a1 = dgst_mac_f32(a1, w21, d2);
      a2 = dgst_mac_f32(a2, w22, d2);
      a3 = dgst_mac_f32(a3, w23, d2);
      a0 = dgst_mac_f32(a0, w30, d3);
      a1 = dgst_mac_f32(a1, w31, d3);
      a2 = dgst_mac_f32(a2, w32, d3);
      a3 = dgst_mac_f32(a3, w33, d3);
      x[0] = a0;
      x[1] = a1;
      x[2] = a2;
      x[3] = a3;
      d += dy_col;
      x += dx_col;
    }
  }
}

/* Output channels o..o+n_o-1 (n_o <= 4) into one dx channel c (tails). */
static void scatter_nx1(const dgst_tap_rect* r, const int8_t* dy0, float* dx0,
                        const int8_t* wt, int32_t w_o_stride, const float* ws, int32_t o,
                        int32_t n_o, int32_t c) {
  float wf[4];
  int32_t q, row;
  for (q = 0; q < n_o; ++q) wf[q] = ws[q] * (float)wt[q * w_o_stride];
  for (row = 0; row < r->rows; ++row) {
    const int8_t* d = dy0 + row * r->dy_row + o;
    float* x = dx0 + row * r->in_row + c;
    const int8_t* const d_end = d + r->cols * r->dy_col;
    while (d != d_end) {
      float a = *x;
      for (q = 0; q < n_o; ++q) a = dgst_mac_f32(a, wf[q], (float)d[q]);
      *x = a;
      d += r->dy_col;
      x += r->in_col;
    }
  }
}

/* A tap that sees one output pixel (dense layers as 1x1 convs on a 1x1 image): the weights
 * are used once each, so they are converted on the fly, 4 output channels per pass. */
static void scatter_pixel(const int8_t* d, const int8_t* wt, int32_t w_o_stride,
                          const float* ws, int32_t c_out, int32_t c_in, float* x) {
  int32_t o, c;
  for (o = 0; o + 4 <= c_out; o += 4) {
    const int8_t* w0 = wt + o * w_o_stride;
    const int8_t* w1 = w0 + w_o_stride;
    const int8_t* w2 = w1 + w_o_stride;
    const int8_t* w3 = w2 + w_o_stride;
    const float s0 = ws[o], s1 = ws[o + 1], s2 = ws[o + 2], s3 = ws[o + 3];
    const float d0 = (float)d[o], d1 = (float)d[o + 1], d2 = (float)d[o + 2];
    const float d3 = (float)d[o + 3];
    for (c = 0; c < c_in; ++c) {
      float a = x[c];
      a = dgst_mac_f32(a, s0 * (float)w0[c], d0);
      a = dgst_mac_f32(a, s1 * (float)w1[c], d1);
      a = dgst_mac_f32(a, s2 * (float)w2[c], d2);
      a = dgst_mac_f32(a, s3 * (float)w3[c], d3);
      x[c] = a;
    }
  }
  for (; o < c_out; ++o) {
    const int8_t* w0 = wt + o * w_o_stride;
    const float s0 = ws[o], d0 = (float)d[o];
    for (c = 0; c < c_in; ++c) x[c] = dgst_mac_f32(x[c], s0 * (float)w0[c], d0);
  }
}

void dgst_conv2d_input_grad_s8(const dgst_conv_geometry* g, const int8_t* dy, float dy_scale,
                               const int8_t* w, const float* weight_scale, int32_t c_in,
                               int32_t c_out, float* dx) {
  const int32_t kh = g->kernel_h, kw = g->kernel_w;
  const int32_t w_o_stride = kh * kw * c_in;
  const int32_t n = g->in_h * g->in_w * c_in;
  int32_t i, j, e;
  for (e = 0; e < n; ++e) dx[e] = 0.0f;
  for (i = 0; i < kh; ++i) {
    for (j = 0; j < kw; ++j) {
      const dgst_tap_rect r = dgst_tap_rect_at(g, i, j, c_out, c_in);
      const int8_t* const wt = w + (i * kw + j) * c_in;
      const int8_t* const dy0 = dy + r.dy_offset;
      float* const dx0 = dx + r.in_offset;
      int32_t o, c;
      if (r.rows == 0) continue; /* tap never inside the image */
      if (r.rows * r.cols == 1) {
        scatter_pixel(dy0, wt, w_o_stride, weight_scale, c_out, c_in, dx0);
        continue;
      }
      for (o = 0; o + 4 <= c_out; o += 4) {
        const int8_t* const wo = wt + o * w_o_stride;
        for (c = 0; c + 4 <= c_in; c += 4)
          scatter_4x4(&r, dy0, dx0, wo + c, w_o_stride, weight_scale + o, o, c);
        for (; c < c_in; ++c)
          scatter_nx1(&r, dy0, dx0, wo + c, w_o_stride, weight_scale + o, o, 4, c);
      }
      if (o < c_out) {
        const int8_t* const wo = wt + o * w_o_stride;
        for (c = 0; c < c_in; ++c)
          scatter_nx1(&r, dy0, dx0, wo + c, w_o_stride, weight_scale + o, o, c_out - o, c);
      }
    }
  }
  for (e = 0; e < n; ++e) dx[e] = dy_scale * dx[e];
}
