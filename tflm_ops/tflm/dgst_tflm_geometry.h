// Helpers shared by the dgst convolution-gradient kernels (not ABI glue): reading the
// geometry words of the custom options and checking that tensor sizes describe a
// convolution. Header-only; every function is inline.
//
// Geometry options (after the version word): stride_h, stride_w, dilation_h, dilation_w,
// pad_top, pad_left. The kernel size comes from a weight/grad shape; bottom/right padding
// is implied by the sizes.
#ifndef DGST_TFLM_GEOMETRY_H_
#define DGST_TFLM_GEOMETRY_H_

#include "../core/dgst_train_kernels.h"
#include "dgst_tflm_abi.h"

namespace dgst_tflm {

// o[1..6] -> g (strides, dilations, leading padding); prints and returns false if invalid.
inline bool GeometryFromOptions(const char* op, const int32_t* o, dgst_conv_geometry* g) {
  g->stride_h = o[1];
  g->stride_w = o[2];
  g->dilation_h = o[3];
  g->dilation_w = o[4];
  g->pad_top = o[5];
  g->pad_left = o[6];
  if (o[1] < 1 || o[2] < 1 || o[3] < 1 || o[4] < 1 || o[5] < 0 || o[6] < 0) {
    MicroPrintf("%s: invalid options: stride %dx%d, dilation %dx%d (must be >= 1), padding "
                "top %d left %d (must be >= 0)", op, static_cast<int>(o[1]),
                static_cast<int>(o[2]), static_cast<int>(o[3]), static_cast<int>(o[4]),
                static_cast<int>(o[5]), static_cast<int>(o[6]));
    return false;
  }
  return true;
}

// The implied bottom (right) padding must be in (-stride, (kernel-1)*dilation], the top
// (left) padding at most (kernel-1)*dilation, or the sizes do not describe a convolution.
inline bool CheckConvAxis(const char* op, const char* axis, int32_t in, int32_t out,
                          int32_t kernel, int32_t stride, int32_t dilation, int32_t pad) {
  const int32_t extent = (kernel - 1) * dilation;
  const int32_t implied = (out - 1) * stride + extent + 1 - in - pad;
  if (in < 1 || out < 1 || kernel < 1 || pad > extent || implied <= -stride ||
      implied > extent) {
    MicroPrintf("%s: %s sizes are not a convolution: input %d, output %d, kernel %d, stride "
                "%d, dilation %d, leading padding %d (implied trailing padding %d)", op, axis,
                static_cast<int>(in), static_cast<int>(out), static_cast<int>(kernel),
                static_cast<int>(stride), static_cast<int>(dilation), static_cast<int>(pad),
                static_cast<int>(implied));
    return false;
  }
  return true;
}

inline bool CheckGeometry(const char* op, const dgst_conv_geometry& g) {
  return CheckConvAxis(op, "height", g.in_h, g.out_h, g.kernel_h, g.stride_h, g.dilation_h,
                       g.pad_top) &&
         CheckConvAxis(op, "width", g.in_w, g.out_w, g.kernel_w, g.stride_w, g.dilation_w,
                       g.pad_left);
}

// x and y of a forward op must have batch 1; prints both batch sizes otherwise.
inline bool CheckBatchOne(const char* op, const DGST_TFLM_TYPE(TfLiteEvalTensor)* x,
                          const DGST_TFLM_TYPE(TfLiteEvalTensor)* y) {
  if (Dim(x, 0) != 1 || Dim(y, 0) != 1) {
    MicroPrintf("%s: batch size must be 1, got x batch %d and y batch %d", op, Dim(x, 0),
                Dim(y, 0));
    return false;
  }
  return true;
}

// Spatial view of a batch-1 activation: rank 4 [1, H, W, C] or rank 2 [1, C] (a Dense
// layer's vector, H = W = 1). Returns false (after an error naming `what`) otherwise.
inline bool ActivationView(const char* op, const char* what,
                           const DGST_TFLM_TYPE(TfLiteEvalTensor)* t, int32_t* h, int32_t* w,
                           int32_t* c) {
  const int rank = Rank(t);
  if ((rank != 4 && rank != 2) || Dim(t, 0) != 1) {
    MicroPrintf("%s: %s must have shape [1, H, W, C] or [1, C] (batch 1), got rank %d with "
                "first dimension %d", op, what, rank, Dim(t, 0));
    return false;
  }
  *h = rank == 4 ? Dim(t, 1) : 1;
  *w = rank == 4 ? Dim(t, 2) : 1;
  *c = Dim(t, -1);
  return true;
}

}  // namespace dgst_tflm

#endif  // DGST_TFLM_GEOMETRY_H_
