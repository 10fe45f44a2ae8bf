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

struct OpData {
  bool options_ok;
  int32_t n;         // elements of dy
  int32_t channels;  // broadcast mode: elements of g; 0 otherwise
};

void* Init(TfLiteContext* context, const char* buffer, size_t length) {
  auto* data = static_cast<OpData*>(MicroContextAllocatePersistentBuffer(context, sizeof(OpData)));
  if (data == nullptr) return nullptr;
  int32_t options[1];
  data->options_ok = length == 0 || ReadOptions(kOp, buffer, length, options, 1);
  data->n = 0;
  return data;
}

TfLiteStatus Prepare(TfLiteContext* context, TfLiteNode* node) {
  auto* data = static_cast<OpData*>(node->user_data);
  if (data == nullptr || !data->options_ok) return kTfLiteError;
  const bool broadcast = node->inputs != nullptr && node->inputs->size == 3;
  if (!CheckArity(kOp, node, broadcast ? 3 : 2, 2)) return kTfLiteError;
  const TfLiteEvalTensor* g =
      CheckedInput(kOp, "input 0 (g)", context, node, 0, kTfLiteFloat32, -1);
  const TfLiteEvalTensor* dy =
      CheckedOutput(kOp, "output 0 (dy)", context, node, 0, kTfLiteInt8, -1);
  const TfLiteEvalTensor* scale =
      CheckedOutput(kOp, "output 1 (dy_scale)", context, node, 1, kTfLiteFloat32, -1);
  if (g == nullptr || dy == nullptr || scale == nullptr) return kTfLiteError;
  data->n = NumElements(broadcast ? dy : g);
  data->channels = 0;
  if (broadcast) {
    const TfLiteEvalTensor* factor =
        CheckedInput(kOp, "input 2 (factor)", context, node, 2, kTfLiteFloat32, -1);
    if (factor == nullptr) return kTfLiteError;
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
  if (GetEvalInput(context, node, 1) != nullptr) {
    const TfLiteEvalTensor* mask =
        CheckedInput(kOp, "input 1 (mask)", context, node, 1, kTfLiteUInt8, 1);
    if (mask == nullptr) return kTfLiteError;
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
  auto* g = static_cast<float*>(GetEvalInput(context, node, 0)->data.data);
  const TfLiteEvalTensor* mask = GetEvalInput(context, node, 1);
  if (data->channels > 0) {
    const float factor = *static_cast<const float*>(GetEvalInput(context, node, 2)->data.data);
    dgst_quantize_broadcast_grad_s8(
        g, data->n / data->channels, data->channels, factor,
        mask == nullptr ? nullptr : static_cast<const uint8_t*>(mask->data.data),
        static_cast<int8_t*>(GetEvalOutput(context, node, 0)->data.data),
        static_cast<float*>(GetEvalOutput(context, node, 1)->data.data));
    return kTfLiteOk;
  }
  if (mask != nullptr) dgst_apply_mask_f32(g, static_cast<const uint8_t*>(mask->data.data), data->n);
  dgst_quantize_grad_s8(g, data->n, static_cast<int8_t*>(GetEvalOutput(context, node, 0)->data.data),
                        static_cast<float*>(GetEvalOutput(context, node, 1)->data.data));
  return kTfLiteOk;
}

}  // namespace

DGST_REGISTER_OP(DGST_QUANTIZE_GRAD, Init, Prepare, Eval, nullptr);
