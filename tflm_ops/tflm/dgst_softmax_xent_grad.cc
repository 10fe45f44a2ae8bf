// DGST_SOFTMAX_XENT_GRAD: softmax cross-entropy loss of int8 logits and its gradient.
//
//   inputs:  0 logits int8    [1, classes] (or [classes])
//            1 label  int32   [1] (or [1, 1])   the true class (runtime, range-checked)
//   outputs: 0 grad   float32 [1, classes] (same element count as logits): p - onehot
//            1 loss   float32 [1]: -log p[label]
//   custom options (little-endian int32 x 3):
//     [1 (format version), scale (float32 bits), zero_point]   of the logits
// p = softmax(scale * (logits - zero_point)). Calls dgst_softmax_xent_grad from tflm_ops/core.
#include "../core/dgst_train_kernels.h"
#include "dgst_tflm_abi.h"

namespace {

using namespace tflite::micro;
using namespace dgst_tflm;

constexpr const char* kOp = "DGST_SOFTMAX_XENT_GRAD";
constexpr int kLogitsTensor = 0;
constexpr int kLabelTensor = 1;
constexpr int kGradTensor = 0;  // outputs
constexpr int kLossTensor = 1;
constexpr int32_t kOptionWords = 3;

struct OpData {
  bool options_ok;
  float scale;
  int32_t zero_point, classes;
};

void* Init(TfLiteContext* context, const char* buffer, size_t length) {
  auto* data = NewOpData<OpData>(context);
  if (data == nullptr) return nullptr;
  int32_t o[kOptionWords];
  data->options_ok = ReadOptions(kOp, buffer, length, o, kOptionWords);
  if (!data->options_ok) return data;
  data->scale = FloatFromBits(o[1]);
  data->zero_point = o[2];
  if (!(data->scale > 0.0f) || o[2] < -128 || o[2] > 127) {
    MicroPrintf("%s: invalid options: logits scale %f (must be > 0), zero point %d (must be "
                "in [-128, 127])", kOp, static_cast<double>(data->scale), static_cast<int>(o[2]));
    data->options_ok = false;
  }
  return data;
}

TfLiteStatus Prepare(TfLiteContext* context, TfLiteNode* node) {
  auto* data = PreparedOpData<OpData>(node);
  if (data == nullptr) return kTfLiteError;
  NodeTensorChecker check(kOp, context, node, 2, 2);
  const TfLiteEvalTensor* logits = check.Input("input 0 (logits)", kLogitsTensor, kTfLiteInt8, -1);
  const TfLiteEvalTensor* label = check.Input("input 1 (label)", kLabelTensor, kTfLiteInt32, -1);
  const TfLiteEvalTensor* grad = check.Output("output 0 (grad)", kGradTensor, kTfLiteFloat32, -1);
  const TfLiteEvalTensor* loss = check.Output("output 1 (loss)", kLossTensor, kTfLiteFloat32, -1);
  if (!check.ok()) return kTfLiteError;
  data->classes = NumElements(logits);
  if (data->classes < 1 || Dim(logits, -1) != data->classes || NumElements(label) != 1 ||
      NumElements(grad) != data->classes || NumElements(loss) != 1) {
    MicroPrintf("%s: need logits [1, classes], label [1], grad with as many elements as the "
                "logits and loss [1]; got %d logits (last dim %d), %d labels, %d grads, %d "
                "losses", kOp, static_cast<int>(data->classes), Dim(logits, -1),
                NumElements(label), NumElements(grad), NumElements(loss));
    return kTfLiteError;
  }
  return kTfLiteOk;
}

TfLiteStatus Eval(TfLiteContext* context, TfLiteNode* node) {
  const auto* data = static_cast<const OpData*>(node->user_data);
  const TfLiteEvalTensor* logits = GetEvalInput(context, node, kLogitsTensor);
  const int32_t label =
      *static_cast<const int32_t*>(GetEvalInput(context, node, kLabelTensor)->data.data);
  if (label < 0 || label >= data->classes) {
    MicroPrintf("%s: label %d is not a class index in [0, %d)", kOp, static_cast<int>(label),
                static_cast<int>(data->classes));
    return kTfLiteError;
  }
  auto* grad = static_cast<float*>(GetEvalOutput(context, node, kGradTensor)->data.data);
  auto* loss = static_cast<float*>(GetEvalOutput(context, node, kLossTensor)->data.data);
  *loss = dgst_softmax_xent_grad(static_cast<const int8_t*>(logits->data.data), data->classes,
                                 data->scale, data->zero_point, label, grad);
  return kTfLiteOk;
}

}  // namespace

DGST_REGISTER_OP(DGST_SOFTMAX_XENT_GRAD, Init, Prepare, Eval, nullptr);
