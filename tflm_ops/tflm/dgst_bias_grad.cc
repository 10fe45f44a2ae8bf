// DGST_BIAS_GRAD: bias gradient of a conv/dense layer, grad[o] = sum over pixels of dy[..][o].
//
//   inputs:  0 dy    int8  [..., C]  (NHWC batch 1: [1, H, W, C]; any rank >= 1)
//   outputs: 0 grad  int32 [C]
//   custom options: none, or the int32 array [1] (format version).
// Calls dgst_bias_grad_s8 from tflm_ops/core.
#include "../core/dgst_train_kernels.h"
#include "dgst_tflm_abi.h"

namespace {

using namespace tflite::micro;
using namespace dgst_tflm;

constexpr const char* kOp = "DGST_BIAS_GRAD";
constexpr int kDyTensor = 0;
constexpr int kGradTensor = 0;  // output

struct OpData {
  bool options_ok;
  int32_t pixels, channels;
};

void* Init(TfLiteContext* context, const char* buffer, size_t length) {
  return InitVersionOnly<OpData>(kOp, context, buffer, length);
}

TfLiteStatus Prepare(TfLiteContext* context, TfLiteNode* node) {
  auto* data = PreparedOpData<OpData>(node);
  if (data == nullptr) return kTfLiteError;
  NodeTensorChecker check(kOp, context, node, 1, 1);
  const TfLiteEvalTensor* dy = check.Input("input 0 (dy)", kDyTensor, kTfLiteInt8, -1);
  const TfLiteEvalTensor* grad = check.Output("output 0 (grad)", kGradTensor, kTfLiteInt32, 1);
  if (!check.ok()) return kTfLiteError;
  if (Rank(dy) < 1) {
    MicroPrintf("%s: input 0 (dy) must have rank >= 1 (channels last)", kOp);
    return kTfLiteError;
  }
  data->channels = Dim(dy, -1);
  data->pixels = data->channels > 0 ? NumElements(dy) / data->channels : 0;
  if (Dim(grad, 0) != data->channels) {
    MicroPrintf("%s: output 0 (grad) must have shape [%d] (the channels of dy), got [%d]", kOp,
                static_cast<int>(data->channels), Dim(grad, 0));
    return kTfLiteError;
  }
  return kTfLiteOk;
}

TfLiteStatus Eval(TfLiteContext* context, TfLiteNode* node) {
  const auto* data = static_cast<const OpData*>(node->user_data);
  const TfLiteEvalTensor* dy = GetEvalInput(context, node, kDyTensor);
  TfLiteEvalTensor* grad = GetEvalOutput(context, node, kGradTensor);
  dgst_bias_grad_s8(static_cast<const int8_t*>(dy->data.data), data->pixels, data->channels,
                    static_cast<int32_t*>(grad->data.data));
  return kTfLiteOk;
}

}  // namespace

DGST_REGISTER_OP(DGST_BIAS_GRAD, Init, Prepare, Eval, nullptr);
