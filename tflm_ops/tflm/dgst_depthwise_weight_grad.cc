// DGST_DEPTHWISE_WEIGHT_GRAD: weight gradient of a depthwise conv (multiplier 1) for the
// kept channels only.
//
//   inputs:  0 x_kept int8  [1, in_h, in_w, k]   saved input, kept channels only
//            1 kept   int32 [k]                  the layer channels they are (runtime)
//            2 dy     int8  [1, out_h, out_w, channels]
//   outputs: 0 grad   int32 [kh, kw, k]
//   custom options (little-endian int32 x 8):
//     [1 (format version), stride_h, stride_w, dilation_h, dilation_w, pad_top, pad_left,
//      x_zero_point]
// grad[i][j][c] = sum_{oy,ox} dy[oy][ox][kept[c]] * (x_kept[iy][ix][c] - x_zero_point).
// Calls dgst_depthwise_weight_grad_s8 from tflm_ops/core.
#include "../core/dgst_train_kernels.h"
#include "dgst_tflm_abi.h"
#include "dgst_tflm_geometry.h"

namespace {

using namespace tflite::micro;
using namespace dgst_tflm;

constexpr const char* kOp = "DGST_DEPTHWISE_WEIGHT_GRAD";
constexpr int32_t kOptionWords = 8;

struct OpData {
  bool options_ok;
  int32_t x_zero_point, k, channels;
  dgst_conv_geometry geometry;
};

void* Init(TfLiteContext* context, const char* buffer, size_t length) {
  auto* data = static_cast<OpData*>(MicroContextAllocatePersistentBuffer(context, sizeof(OpData)));
  if (data == nullptr) return nullptr;
  int32_t o[kOptionWords];
  data->options_ok = ReadOptions(kOp, buffer, length, o, kOptionWords) &&
                     GeometryFromOptions(kOp, o, &data->geometry);
  if (data->options_ok && (o[7] < -128 || o[7] > 127)) {
    MicroPrintf("%s: invalid options: x_zero_point %d must be in [-128, 127]", kOp,
                static_cast<int>(o[7]));
    data->options_ok = false;
  }
  if (data->options_ok) data->x_zero_point = o[7];
  return data;
}

TfLiteStatus Prepare(TfLiteContext* context, TfLiteNode* node) {
  auto* data = static_cast<OpData*>(node->user_data);
  if (data == nullptr || !data->options_ok) return kTfLiteError;
  if (!CheckArity(kOp, node, 3, 1)) return kTfLiteError;
  const TfLiteEvalTensor* x =
      CheckedInput(kOp, "input 0 (x_kept)", context, node, 0, kTfLiteInt8, 4);
  const TfLiteEvalTensor* kept =
      CheckedInput(kOp, "input 1 (kept)", context, node, 1, kTfLiteInt32, 1);
  const TfLiteEvalTensor* dy = CheckedInput(kOp, "input 2 (dy)", context, node, 2, kTfLiteInt8, 4);
  const TfLiteEvalTensor* grad =
      CheckedOutput(kOp, "output 0 (grad)", context, node, 0, kTfLiteInt32, 3);
  if (x == nullptr || kept == nullptr || dy == nullptr || grad == nullptr) return kTfLiteError;
  data->k = Dim(x, 3);
  data->channels = Dim(dy, 3);
  if (Dim(x, 0) != 1 || Dim(dy, 0) != 1 || Dim(kept, 0) != data->k ||
      Dim(grad, 2) != data->k || data->k > data->channels) {
    MicroPrintf("%s: need batch 1, kept [k] and grad [kh, kw, k] with k = %d (the channels of "
                "x_kept, at most dy's %d); got kept [%d], grad [%d, %d, %d]", kOp,
                static_cast<int>(data->k), static_cast<int>(data->channels), Dim(kept, 0),
                Dim(grad, 0), Dim(grad, 1), Dim(grad, 2));
    return kTfLiteError;
  }
  dgst_conv_geometry& g = data->geometry;
  g.in_h = Dim(x, 1);
  g.in_w = Dim(x, 2);
  g.out_h = Dim(dy, 1);
  g.out_w = Dim(dy, 2);
  g.kernel_h = Dim(grad, 0);
  g.kernel_w = Dim(grad, 1);
  return CheckGeometry(kOp, g) ? kTfLiteOk : kTfLiteError;
}

TfLiteStatus Eval(TfLiteContext* context, TfLiteNode* node) {
  const auto* data = static_cast<const OpData*>(node->user_data);
  const TfLiteEvalTensor* x = GetEvalInput(context, node, 0);
  const auto* kept = static_cast<const int32_t*>(GetEvalInput(context, node, 1)->data.data);
  const TfLiteEvalTensor* dy = GetEvalInput(context, node, 2);
  TfLiteEvalTensor* grad = GetEvalOutput(context, node, 0);
  if (!KeptInRange(kOp, kept, data->k, data->channels)) return kTfLiteError;
  dgst_depthwise_weight_grad_s8(&data->geometry, static_cast<const int8_t*>(x->data.data), kept,
                                data->k, data->x_zero_point,
                                static_cast<const int8_t*>(dy->data.data), data->channels,
                                static_cast<int32_t*>(grad->data.data));
  return kTfLiteOk;
}

}  // namespace

DGST_REGISTER_OP(DGST_DEPTHWISE_WEIGHT_GRAD, Init, Prepare, Eval, nullptr);
