// DGST_QUANTIZE_GRAD: the error signal between layers, float -> int8 with a per-tensor
// scale chosen this step (max|g| / 127), after an optional ReLU/ReLU6 derivative mask.
//
//   inputs:  0 g      float32 (any shape)   dL/dy in real units; when a mask is given it is
//                                           masked IN PLACE (g must have no other reader)
//            1 mask   uint8 [ceil(n / 8)]   optional (-1): 1 bit per element of g, as from
//                                           DGST_RELU_MASK
//            2 factor float32 [1]            optional: broadcast mode (the gradient of a global
//                                           average pooling's input, factor = 1 / pixels):
//                                           g holds one value per channel (C elements) and
//                                           dy[p][c] = quantized(g[c] * factor), masked; g is
//                                           not modified
//   outputs: 0 dy       int8 (same element count as g; broadcast mode: pixels x C)
//            1 dy_scale float32 [1]
//   custom options: none, or the int32 array [1] (format version).
// Calls dgst_apply_mask_f32 and dgst_quantize_grad_s8 (dgst_quantize_broadcast_grad_s8)
// from tflm_ops/core.
#include "../core/dgst_train_kernels.h"
#include "dgst_tflm_abi.h"

namespace {

using namespace tflite::micro;
using namespace dgst_tflm;

constexpr const char* kOp = "DGST_QUANTIZE_GRAD";
constexpr int kGTensor = 0;
constexpr int kMaskTensor = 1;    // optional
constexpr int kFactorTensor = 2;  // broadcast mode only
constexpr int kDyTensor = 0;      // outputs
constexpr int kDyScaleTensor = 1;

struct OpData {
  bool options_ok;
  int32_t n;         // elements of dy
  int32_t channels;  // broadcast mode: elements of g; 0 otherwise
};

void* Init(TfLiteContext* context, const char* buffer, size_t length) {
  return InitVersionOnly<OpData>(kOp, context, buffer, length);
}

TfLiteStatus Prepare(TfLiteContext* context, TfLiteNode* node) {
  auto* data = PreparedOpData<OpData>(node);
  if (data == nullptr) return kTfLiteError;
  const bool broadcast = node->inputs != nullptr && node->inputs->size == 3;
  NodeTensorChecker check(kOp, context, node, broadcast ? 3 : 2, 2);
  const TfLiteEvalTensor* g = check.Input("input 0 (g)", kGTensor, kTfLiteFloat32, -1);
  const TfLiteEvalTensor* dy = check.Output("output 0 (dy)", kDyTensor, kTfLiteInt8, -1);
  const TfLiteEvalTensor* scale =
      check.Output("output 1 (dy_scale)", kDyScaleTensor, kTfLiteFloat32, -1);
  if (!check.ok()) return kTfLiteError;
  data->n = NumElements(broadcast ? dy : g);
  data->channels = 0;
  if (broadcast) {
    const TfLiteEvalTensor* factor =
        check.Input("input 2 (factor)", kFactorTensor, kTfLiteFloat32, -1);
    if (!check.ok()) return kTfLiteError;
    data->channels = NumElements(g);
    if (NumElements(factor) != 1 || data->channels < 1 || Dim(dy, -1) != data->channels) {
      MicroPrintf("%s: broadcast mode needs input 2 (factor) with one element (has %d) and "
                  "dy's last dimension (%d) equal to the %d elements of g", kOp,
                  NumElements(factor), Dim(dy, -1), static_cast<int>(data->channels));
      return kTfLiteError;
    }
  }
  if (NumElements(dy) != data->n || NumElements(scale) != 1) {
    MicroPrintf("%s: output 0 (dy) must have the %d elements of g (has %d) and output 1 "
                "(dy_scale) one (has %d)", kOp, static_cast<int>(data->n), NumElements(dy),
                NumElements(scale));
    return kTfLiteError;
  }
  if (GetEvalInput(context, node, kMaskTensor) != nullptr) {
    const TfLiteEvalTensor* mask = check.Input("input 1 (mask)", kMaskTensor, kTfLiteUInt8, 1);
    if (!check.ok()) return kTfLiteError;
    if (Dim(mask, 0) != (data->n + 7) / 8) {
      MicroPrintf("%s: input 1 (mask) must have %d bytes (1 bit per element of g), got %d",
                  kOp, static_cast<int>((data->n + 7) / 8), Dim(mask, 0));
      return kTfLiteError;
    }
  }
  return kTfLiteOk;
}

TfLiteStatus Eval(TfLiteContext* context, TfLiteNode* node) {
  const auto* data = static_cast<const OpData*>(node->user_data);
  auto* g = static_cast<float*>(GetEvalInput(context, node, kGTensor)->data.data);
  const TfLiteEvalTensor* mask = GetEvalInput(context, node, kMaskTensor);
  auto* dy = static_cast<int8_t*>(GetEvalOutput(context, node, kDyTensor)->data.data);
  auto* dy_scale = static_cast<float*>(GetEvalOutput(context, node, kDyScaleTensor)->data.data);
  if (data->channels > 0) {
    const float factor =
        *static_cast<const float*>(GetEvalInput(context, node, kFactorTensor)->data.data);
    dgst_quantize_broadcast_grad_s8(
        g, data->n / data->channels, data->channels, factor,
        mask == nullptr ? nullptr : static_cast<const uint8_t*>(mask->data.data), dy, dy_scale);
    return kTfLiteOk;
  }
  if (mask != nullptr) {
    dgst_apply_mask_f32(g, static_cast<const uint8_t*>(mask->data.data), data->n);
  }
  dgst_quantize_grad_s8(g, data->n, dy, dy_scale);
  return kTfLiteOk;
}

}  // namespace

DGST_REGISTER_OP(DGST_QUANTIZE_GRAD, Init, Prepare, Eval, nullptr);
