// DGST_RELU_MASK: the 1-bit derivative mask of an int8 ReLU / ReLU6 output, built in the
// forward pass so that the backward pass needs 1 bit per element instead of the activation.
//
//   inputs:  0 y     int8 (any shape)   the activation's output codes
//   outputs: 0 mask  uint8 [ceil(n / 8)]  bit i set where lo < y[i] < hi
//   custom options (little-endian int32 x 3):
//     [1 (format version), lo, hi]: lo = the code of real 0 (the zero point), hi = the code
//     of real 6 (ReLU6), or 127 for a plain ReLU (int8 saturation has derivative 0)
// Calls dgst_build_mask_s8 from tflm_ops/core.
#include "../core/dgst_train_kernels.h"
#include "dgst_tflm_abi.h"

namespace {

using namespace tflite::micro;
using namespace dgst_tflm;

constexpr const char* kOp = "DGST_RELU_MASK";
constexpr int kYTensor = 0;
constexpr int kMaskTensor = 0;  // output
constexpr int32_t kOptionWords = 3;

struct OpData {
  bool options_ok;
  int32_t lo, hi, n;
};

void* Init(TfLiteContext* context, const char* buffer, size_t length) {
  auto* data = NewOpData<OpData>(context);
  if (data == nullptr) return nullptr;
  int32_t o[kOptionWords];
  data->options_ok = ReadOptions(kOp, buffer, length, o, kOptionWords);
  if (!data->options_ok) return data;
  data->lo = o[1];
  data->hi = o[2];
  if (o[1] < -128 || o[1] > 127 || o[2] < -127 || o[2] > 127 || o[2] <= o[1]) {
    MicroPrintf("%s: invalid options: lo %d must be in [-128, 127], hi %d in (lo, 127]", kOp,
                static_cast<int>(o[1]), static_cast<int>(o[2]));
    data->options_ok = false;
  }
  return data;
}

TfLiteStatus Prepare(TfLiteContext* context, TfLiteNode* node) {
  auto* data = PreparedOpData<OpData>(node);
  if (data == nullptr) return kTfLiteError;
  NodeTensorChecker check(kOp, context, node, 1, 1);
  const TfLiteEvalTensor* y = check.Input("input 0 (y)", kYTensor, kTfLiteInt8, -1);
  const TfLiteEvalTensor* mask = check.Output("output 0 (mask)", kMaskTensor, kTfLiteUInt8, 1);
  if (!check.ok()) return kTfLiteError;
  data->n = NumElements(y);
  if (Dim(mask, 0) != (data->n + 7) / 8) {
    MicroPrintf("%s: output 0 (mask) must have %d bytes (1 bit per element of y), got %d", kOp,
                static_cast<int>((data->n + 7) / 8), Dim(mask, 0));
    return kTfLiteError;
  }
  return kTfLiteOk;
}

TfLiteStatus Eval(TfLiteContext* context, TfLiteNode* node) {
  const auto* data = static_cast<const OpData*>(node->user_data);
  const auto* y = static_cast<const int8_t*>(GetEvalInput(context, node, kYTensor)->data.data);
  auto* mask = static_cast<uint8_t*>(GetEvalOutput(context, node, kMaskTensor)->data.data);
  dgst_build_mask_s8(y, data->n, static_cast<int8_t>(data->lo), static_cast<int8_t>(data->hi),
                     mask);
  return kTfLiteOk;
}

}  // namespace

DGST_REGISTER_OP(DGST_RELU_MASK, Init, Prepare, Eval, nullptr);
