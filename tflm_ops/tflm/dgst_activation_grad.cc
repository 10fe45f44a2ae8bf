// DGST_ACTIVATION_GRAD: the backward of an int8 elementwise activation y = f(x) that TFLite
// computes with builtin ops (swish: LOGISTIC + MUL; hard-swish: HARD_SWISH; sigmoid:
// LOGISTIC), from the activation's saved int8 input and a 256-entry derivative table.
//
//   inputs:  0 g      float32 (any shape)   the gradient of the activation's real output
//            1 x      int8    (n elements)  the activation's input codes (forward pass)
//            2 table  float32 [256]         table[q + 128] = f'(s * (q - z)) for input code q
//                                           (s, z: x's scale and zero point; export time)
//   outputs: 0 dx     float32 (n elements)  dx[i] = g[i] * table[x[i] + 128]
//   custom options: none, or the int32 array [1] (format version).
// Calls dgst_activation_grad_f32 from tflm_ops/core.
#include "../core/dgst_train_kernels.h"
#include "dgst_tflm_abi.h"

namespace {

using namespace tflite::micro;
using namespace dgst_tflm;

constexpr const char* kOp = "DGST_ACTIVATION_GRAD";
constexpr int kGTensor = 0;
constexpr int kXTensor = 1;
constexpr int kTableTensor = 2;
constexpr int kDxTensor = 0;  // output
constexpr int kTableSize = 256;

struct OpData {
  bool options_ok;
  int32_t n;
};

void* Init(TfLiteContext* context, const char* buffer, size_t length) {
  return InitVersionOnly<OpData>(kOp, context, buffer, length);
}

TfLiteStatus Prepare(TfLiteContext* context, TfLiteNode* node) {
  auto* data = PreparedOpData<OpData>(node);
  if (data == nullptr) return kTfLiteError;
  NodeTensorChecker check(kOp, context, node, 3, 1);
  const TfLiteEvalTensor* g = check.Input("input 0 (g)", kGTensor, kTfLiteFloat32, -1);
  const TfLiteEvalTensor* x = check.Input("input 1 (x)", kXTensor, kTfLiteInt8, -1);
  const TfLiteEvalTensor* table =
      check.Input("input 2 (table)", kTableTensor, kTfLiteFloat32, 1);
  const TfLiteEvalTensor* dx = check.Output("output 0 (dx)", kDxTensor, kTfLiteFloat32, -1);
  if (!check.ok()) return kTfLiteError;
  data->n = NumElements(g);
  if (Dim(table, 0) != kTableSize) {
    MicroPrintf("%s: input 2 (table) must have %d entries (one per int8 code), got %d", kOp,
                kTableSize, Dim(table, 0));
    return kTfLiteError;
  }
  if (NumElements(x) != data->n || NumElements(dx) != data->n) {
    MicroPrintf("%s: input 1 (x) and output 0 (dx) must have the %d elements of input 0 (g), "
                "got %d and %d", kOp, static_cast<int>(data->n), NumElements(x),
                NumElements(dx));
    return kTfLiteError;
  }
  return kTfLiteOk;
}

TfLiteStatus Eval(TfLiteContext* context, TfLiteNode* node) {
  const auto* data = static_cast<const OpData*>(node->user_data);
  dgst_activation_grad_f32(
      static_cast<const float*>(GetEvalInput(context, node, kGTensor)->data.data),
      static_cast<const int8_t*>(GetEvalInput(context, node, kXTensor)->data.data),
      static_cast<const float*>(GetEvalInput(context, node, kTableTensor)->data.data),
      data->n, static_cast<float*>(GetEvalOutput(context, node, kDxTensor)->data.data));
  return kTfLiteOk;
}

}  // namespace

DGST_REGISTER_OP(DGST_ACTIVATION_GRAD, Init, Prepare, Eval, nullptr);
