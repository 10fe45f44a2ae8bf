// DGST_CONV2D_WEIGHT_GRAD: weight gradient of a Conv2D for the kept input channels only.
//
//   inputs:  0 x_kept int8  [1, in_h, in_w, k]     saved input, kept channels only
//            (Dense layers: x_kept [1, k], dy [1, c_out], grad [c_out, k])
//            1 dy     int8  [1, out_h, out_w, c_out]
//   outputs: 0 grad   int32 [c_out, kernel_h, kernel_w, k]   (OHWI, like TFLite filters)
//   custom options (little-endian int32 x 8):
//     [1 (format version), stride_h, stride_w, dilation_h, dilation_w, pad_top, pad_left,
//      x_zero_point]
// The kernel size comes from the grad shape; bottom/right padding is implied by the sizes.
// grad[o][i][j][c] = sum_{oy,ox} dy[oy][ox][o] * (x[iy][ix][c] - x_zero_point),
// iy = oy*stride_h - pad_top + i*dilation_h (taps outside the input contribute 0).
// Calls dgst_conv2d_weight_grad_s8 from tflm_ops/core.
#include "../core/dgst_train_kernels.h"
#include "dgst_tflm_abi.h"
#include "dgst_tflm_geometry.h"

namespace {

using namespace tflite::micro;
using namespace dgst_tflm;

constexpr const char* kOp = "DGST_CONV2D_WEIGHT_GRAD";
constexpr int32_t kOptionWords = 8;

struct OpData {
  bool options_ok;
  int32_t x_zero_point, k, c_out;
  dgst_conv_geometry geometry;
};

void* Init(TfLiteContext* context, const char* buffer, size_t length) {
  auto* data = static_cast<OpData*>(MicroContextAllocatePersistentBuffer(context, sizeof(OpData)));
  if (data == nullptr) return nullptr;
  int32_t o[kOptionWords];
  data->options_ok = ReadOptions(kOp, buffer, length, o, kOptionWords);
  if (!data->options_ok) return data;
  dgst_conv_geometry& g = data->geometry;
  g.stride_h = o[1];
  g.stride_w = o[2];
  g.dilation_h = o[3];
  g.dilation_w = o[4];
  g.pad_top = o[5];
  g.pad_left = o[6];
  data->x_zero_point = o[7];
  if (g.stride_h < 1 || g.stride_w < 1 || g.dilation_h < 1 || g.dilation_w < 1 ||
      g.pad_top < 0 || g.pad_left < 0 || o[7] < -128 || o[7] > 127) {
    MicroPrintf("%s: invalid options: stride %dx%d, dilation %dx%d (must be >= 1), padding "
                "top %d left %d (must be >= 0), x_zero_point %d (must be in [-128, 127])",
                kOp, o[1], o[2], o[3], o[4], o[5], o[6], o[7]);
    data->options_ok = false;
  }
  return data;
}

TfLiteStatus Prepare(TfLiteContext* context, TfLiteNode* node) {
  auto* data = static_cast<OpData*>(node->user_data);
  if (data == nullptr || !data->options_ok) return kTfLiteError;
  if (!CheckArity(kOp, node, 2, 1)) return kTfLiteError;
  const TfLiteEvalTensor* x =
      CheckedInput(kOp, "input 0 (x_kept)", context, node, 0, kTfLiteInt8, -1);
  const TfLiteEvalTensor* dy = CheckedInput(kOp, "input 1 (dy)", context, node, 1, kTfLiteInt8, -1);
  const TfLiteEvalTensor* grad =
      CheckedOutput(kOp, "output 0 (grad)", context, node, 0, kTfLiteInt32, -1);
  if (x == nullptr || dy == nullptr || grad == nullptr) return kTfLiteError;
  if (Dim(x, 0) != 1 || Dim(dy, 0) != 1) {
    MicroPrintf("%s: batch size must be 1, got x_kept batch %d and dy batch %d", kOp, Dim(x, 0),
                Dim(dy, 0));
    return kTfLiteError;
  }
  dgst_conv_geometry& g = data->geometry;
  // Rank 4 (Conv2D) or rank 2 (Dense: x_kept [1, k], dy [1, c_out], grad [c_out, k]).
  if (!ActivationView(kOp, "input 0 (x_kept)", x, &g.in_h, &g.in_w, &data->k) ||
      !ActivationView(kOp, "input 1 (dy)", dy, &g.out_h, &g.out_w, &data->c_out))
    return kTfLiteError;
  if (Rank(grad) != Rank(x) || Rank(dy) != Rank(x)) {
    MicroPrintf("%s: x_kept, dy and grad must all have rank 4 (Conv2D) or all rank 2 (Dense), "
                "got %d, %d and %d", kOp, Rank(x), Rank(dy), Rank(grad));
    return kTfLiteError;
  }
  g.kernel_h = Rank(grad) == 4 ? Dim(grad, 1) : 1;
  g.kernel_w = Rank(grad) == 4 ? Dim(grad, 2) : 1;
  if (Dim(grad, 0) != data->c_out || Dim(grad, -1) != data->k) {
    MicroPrintf("%s: output 0 (grad) must have shape [c_out=%d, kh, kw, k=%d], got [%d, %d, %d, "
                "%d]", kOp, static_cast<int>(data->c_out), static_cast<int>(data->k),
                Dim(grad, 0), Dim(grad, 1), Dim(grad, 2), Dim(grad, 3));
    return kTfLiteError;
  }
  if (!CheckGeometry(kOp, g)) {
    return kTfLiteError;
  }
  return kTfLiteOk;
}

TfLiteStatus Eval(TfLiteContext* context, TfLiteNode* node) {
  const auto* data = static_cast<const OpData*>(node->user_data);
  const TfLiteEvalTensor* x = GetEvalInput(context, node, 0);
  const TfLiteEvalTensor* dy = GetEvalInput(context, node, 1);
  TfLiteEvalTensor* grad = GetEvalOutput(context, node, 0);
  dgst_conv2d_weight_grad_s8(&data->geometry, static_cast<const int8_t*>(x->data.data), data->k,
                             data->x_zero_point, static_cast<const int8_t*>(dy->data.data),
                             data->c_out, static_cast<int32_t*>(grad->data.data));
  return kTfLiteOk;
}

}  // namespace

DGST_REGISTER_OP(DGST_CONV2D_WEIGHT_GRAD, Init, Prepare, Eval, nullptr);
