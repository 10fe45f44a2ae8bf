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

struct OpData {
  bool options_ok;
  int32_t pixels, channels;
};

void* Init(TfLiteContext* context, const char* buffer, size_t length) {
  auto* data = static_cast<OpData*>(MicroContextAllocatePersistentBuffer(context, sizeof(OpData)));
  if (data == nullptr) return nullptr;
  int32_t options[1];
  data->options_ok = length == 0 || ReadOptions(kOp, buffer, length, options, 1);
  data->pixels = data->channels = 0;
  return data;
}

TfLiteStatus Prepare(TfLiteContext* context, TfLiteNode* node) {
  auto* data = static_cast<OpData*>(node->user_data);
  if (data == nullptr || !data->options_ok) return kTfLiteError;
  if (!CheckArity(kOp, node, 1, 1)) return kTfLiteError;
  const TfLiteEvalTensor* dy = CheckedInput(kOp, "input 0 (dy)", context, node, 0, kTfLiteInt8, -1);
  const TfLiteEvalTensor* grad =
      CheckedOutput(kOp, "output 0 (grad)", context, node, 0, kTfLiteInt32, 1);
  if (dy == nullptr || grad == nullptr) return kTfLiteError;
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
  const TfLiteEvalTensor* dy = GetEvalInput(context, node, 0);
  TfLiteEvalTensor* grad = GetEvalOutput(context, node, 0);
  dgst_bias_grad_s8(static_cast<const int8_t*>(dy->data.data), data->pixels, data->channels,
                    static_cast<int32_t*>(grad->data.data));
  return kTfLiteOk;
}

}  // namespace

DGST_REGISTER_OP(DGST_BIAS_GRAD, Init, Prepare, Eval, nullptr);
