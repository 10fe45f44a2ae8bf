// DGST_DEPTHWISE_WEIGHT_GRAD: weight gradient of a depthwise conv (multiplier 1) for the
// kept channels only.
//
//   inputs:  0 x_kept int8  [1, in_h, in_w, k]   saved input, kept channels only
//            1 kept   int32 [k]                  the layer channels they are (runtime)
//            2 dy     int8  [1, out_h, out_w, channels]
//            3 step   int32 [1] variable sgd/step: with a layer schedule only
//   outputs: 0 grad   int32 [kh, kw, k]
//   custom options (little-endian int32 x 8, or x 11 with a layer schedule):
//     [1 (format version), stride_h, stride_w, dilation_h, dilation_w, pad_top, pad_left,
//      x_zero_point(, layer, layers, per_step)]
// A layer the schedule leaves out this step computes nothing (dgst_layer_schedule.h).
// grad[i][j][c] = sum_{oy,ox} dy[oy][ox][kept[c]] * (x_kept[iy][ix][c] - x_zero_point).
// Calls dgst_depthwise_weight_grad_s8 from tflm_ops/core.
#include "../core/dgst_train_kernels.h"
#include "dgst_conv_grad_common.h"
#include "dgst_tflm_abi.h"
#include "dgst_tflm_geometry.h"

namespace {

using namespace tflite::micro;
using namespace dgst_tflm;

constexpr const char* kOp = "DGST_DEPTHWISE_WEIGHT_GRAD";
constexpr int kXKeptTensor = 0;
constexpr int kKeptTensor = 1;
constexpr int kDyTensor = 2;
constexpr int kStepTensor = 3;  // with a layer schedule
constexpr int kGradTensor = 0;  // output

using OpData = ConvGradOpData;  // in_channels = k (kept), out_channels = the channels

void* Init(TfLiteContext* context, const char* buffer, size_t length) {
  return InitWeightGrad(kOp, context, buffer, length);
}

TfLiteStatus Prepare(TfLiteContext* context, TfLiteNode* node) {
  auto* data = PreparedOpData<OpData>(node);
  if (data == nullptr) return kTfLiteError;
  NodeTensorChecker check(kOp, context, node, data->schedule.on() ? 4 : 3, 1);
  const TfLiteEvalTensor* x = check.Input("input 0 (x_kept)", kXKeptTensor, kTfLiteInt8, 4);
  const TfLiteEvalTensor* kept = check.Input("input 1 (kept)", kKeptTensor, kTfLiteInt32, 1);
  const TfLiteEvalTensor* dy = check.Input("input 2 (dy)", kDyTensor, kTfLiteInt8, 4);
  const TfLiteEvalTensor* grad = check.Output("output 0 (grad)", kGradTensor, kTfLiteInt32, 3);
  if (!check.ok()) return kTfLiteError;
  if (data->schedule.on() && !CheckStepInput(kOp, &check, kStepTensor)) return kTfLiteError;
  const int32_t k = data->in_channels = Dim(x, 3);
  const int32_t channels = data->out_channels = Dim(dy, 3);
  if (Dim(x, 0) != 1 || Dim(dy, 0) != 1 || Dim(kept, 0) != k || Dim(grad, 2) != k ||
      k > channels) {
    MicroPrintf("%s: need batch 1, kept [k] and grad [kh, kw, k] with k = %d (the channels of "
                "x_kept, at most dy's %d); got kept [%d], grad [%d, %d, %d]", kOp,
                static_cast<int>(k), static_cast<int>(channels), Dim(kept, 0),
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
  if (!LayerActive(context, node, kStepTensor, data->schedule)) return kTfLiteOk;
  const TfLiteEvalTensor* x = GetEvalInput(context, node, kXKeptTensor);
  const auto* kept =
      static_cast<const int32_t*>(GetEvalInput(context, node, kKeptTensor)->data.data);
  const TfLiteEvalTensor* dy = GetEvalInput(context, node, kDyTensor);
  TfLiteEvalTensor* grad = GetEvalOutput(context, node, kGradTensor);
  if (!KeptInRange(kOp, kept, data->in_channels, data->out_channels)) return kTfLiteError;
  dgst_depthwise_weight_grad_s8(&data->geometry, static_cast<const int8_t*>(x->data.data), kept,
                                data->in_channels, data->x_zero_point,
                                static_cast<const int8_t*>(dy->data.data), data->out_channels,
                                static_cast<int32_t*>(grad->data.data));
  return kTfLiteOk;
}

}  // namespace

DGST_REGISTER_OP(DGST_DEPTHWISE_WEIGHT_GRAD, Init, Prepare, Eval, nullptr);
