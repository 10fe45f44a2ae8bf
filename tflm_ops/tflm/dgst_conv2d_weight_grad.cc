// DGST_CONV2D_WEIGHT_GRAD: weight gradient of a Conv2D for the kept input channels only.
//
//   inputs:  0 x_kept int8  [1, in_h, in_w, k]     saved input, kept channels only
//            (Dense layers: x_kept [1, k], dy [1, c_out], grad [c_out, k])
//            1 dy     int8  [1, out_h, out_w, c_out]
//            2 step   int32 [1] variable sgd/step: with a layer schedule only
//   outputs: 0 grad   int32 [c_out, kernel_h, kernel_w, k]   (OHWI, like TFLite filters)
//   custom options (little-endian int32 x 8, or x 11 with a layer schedule):
//     [1 (format version), stride_h, stride_w, dilation_h, dilation_w, pad_top, pad_left,
//      x_zero_point(, layer, layers, per_step)]
// A layer the schedule leaves out this step computes nothing (dgst_layer_schedule.h).
// The kernel size comes from the grad shape; bottom/right padding is implied by the sizes.
// grad[o][i][j][c] = sum_{oy,ox} dy[oy][ox][o] * (x[iy][ix][c] - x_zero_point),
// iy = oy*stride_h - pad_top + i*dilation_h (taps outside the input contribute 0).
// Calls dgst_conv2d_weight_grad_s8 from tflm_ops/core.
#include "../core/dgst_train_kernels.h"
#include "dgst_conv_grad_common.h"
#include "dgst_tflm_abi.h"
#include "dgst_tflm_geometry.h"

namespace {

using namespace tflite::micro;
using namespace dgst_tflm;

constexpr const char* kOp = "DGST_CONV2D_WEIGHT_GRAD";
constexpr int kXKeptTensor = 0;
constexpr int kDyTensor = 1;
constexpr int kStepTensor = 2;  // with a layer schedule
constexpr int kGradTensor = 0;  // output

using OpData = ConvGradOpData;  // in_channels = k (kept), out_channels = c_out

void* Init(TfLiteContext* context, const char* buffer, size_t length) {
  return InitWeightGrad(kOp, context, buffer, length);
}

TfLiteStatus Prepare(TfLiteContext* context, TfLiteNode* node) {
  auto* data = PreparedOpData<OpData>(node);
  if (data == nullptr) return kTfLiteError;
  NodeTensorChecker check(kOp, context, node, data->schedule.on() ? 3 : 2, 1);
  const TfLiteEvalTensor* x = check.Input("input 0 (x_kept)", kXKeptTensor, kTfLiteInt8, -1);
  const TfLiteEvalTensor* dy = check.Input("input 1 (dy)", kDyTensor, kTfLiteInt8, -1);
  const TfLiteEvalTensor* grad = check.Output("output 0 (grad)", kGradTensor, kTfLiteInt32, -1);
  if (!check.ok()) return kTfLiteError;
  if (data->schedule.on() && !CheckStepInput(kOp, &check, kStepTensor)) return kTfLiteError;
  if (Dim(x, 0) != 1 || Dim(dy, 0) != 1) {
    MicroPrintf("%s: batch size must be 1, got x_kept batch %d and dy batch %d", kOp, Dim(x, 0),
                Dim(dy, 0));
    return kTfLiteError;
  }
  dgst_conv_geometry& g = data->geometry;
  // Rank 4 (Conv2D) or rank 2 (Dense: x_kept [1, k], dy [1, c_out], grad [c_out, k]).
  int32_t& k = data->in_channels;
  int32_t& c_out = data->out_channels;
  if (!ActivationView(kOp, "input 0 (x_kept)", x, &g.in_h, &g.in_w, &k) ||
      !ActivationView(kOp, "input 1 (dy)", dy, &g.out_h, &g.out_w, &c_out))
    return kTfLiteError;
  if (Rank(grad) != Rank(x) || Rank(dy) != Rank(x)) {
    MicroPrintf("%s: x_kept, dy and grad must all have rank 4 (Conv2D) or all rank 2 (Dense), "
                "got %d, %d and %d", kOp, Rank(x), Rank(dy), Rank(grad));
    return kTfLiteError;
  }
  g.kernel_h = Rank(grad) == 4 ? Dim(grad, 1) : 1;
  g.kernel_w = Rank(grad) == 4 ? Dim(grad, 2) : 1;
  if (Dim(grad, 0) != c_out || Dim(grad, -1) != k) {
    MicroPrintf("%s: output 0 (grad) must have shape [c_out=%d, kh, kw, k=%d], got [%d, %d, %d, "
                "%d]", kOp, static_cast<int>(c_out), static_cast<int>(k),
                Dim(grad, 0), Dim(grad, 1), Dim(grad, 2), Dim(grad, 3));
    return kTfLiteError;
  }
  return CheckGeometry(kOp, g) ? kTfLiteOk : kTfLiteError;
}

TfLiteStatus Eval(TfLiteContext* context, TfLiteNode* node) {
  const auto* data = static_cast<const OpData*>(node->user_data);
  if (!LayerActive(context, node, kStepTensor, data->schedule)) return kTfLiteOk;
  const TfLiteEvalTensor* x = GetEvalInput(context, node, kXKeptTensor);
  const TfLiteEvalTensor* dy = GetEvalInput(context, node, kDyTensor);
  TfLiteEvalTensor* grad = GetEvalOutput(context, node, kGradTensor);
  dgst_conv2d_weight_grad_s8(&data->geometry, static_cast<const int8_t*>(x->data.data),
                             data->in_channels, data->x_zero_point,
                             static_cast<const int8_t*>(dy->data.data), data->out_channels,
                             static_cast<int32_t*>(grad->data.data));
  return kTfLiteOk;
}

}  // namespace

DGST_REGISTER_OP(DGST_CONV2D_WEIGHT_GRAD, Init, Prepare, Eval, nullptr);
