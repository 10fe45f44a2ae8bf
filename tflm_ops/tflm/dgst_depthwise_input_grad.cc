// DGST_DEPTHWISE_INPUT_GRAD: input gradient of a depthwise conv (multiplier 1), in float
// (real units).
//
//   inputs:  0 dy            int8    [1, out_h, out_w, channels]
//            1 dy_scale      float32 [1]
//            2 w             int8    [1, kh, kw, channels] (constant or variable)
//            3 weight_scale  float32 [channels]
//   outputs: 0 dx            float32 [1, in_h, in_w, channels]
//   custom options (little-endian int32 x 7):
//     [1 (format version), stride_h, stride_w, dilation_h, dilation_w, pad_top, pad_left]
// A depthwise conv after an explicit PAD is differentiated as one conv on the unpadded
// input with pad_top/pad_left set. Calls dgst_depthwise_input_grad_s8 from tflm_ops/core.
#include "../core/dgst_train_kernels.h"
#include "dgst_tflm_abi.h"
#include "dgst_tflm_geometry.h"

namespace {

using namespace tflite::micro;
using namespace dgst_tflm;

constexpr const char* kOp = "DGST_DEPTHWISE_INPUT_GRAD";
constexpr int32_t kOptionWords = 7;

struct OpData {
  bool options_ok;
  int32_t channels;
  dgst_conv_geometry geometry;
};

void* Init(TfLiteContext* context, const char* buffer, size_t length) {
  auto* data = static_cast<OpData*>(MicroContextAllocatePersistentBuffer(context, sizeof(OpData)));
  if (data == nullptr) return nullptr;
  int32_t o[kOptionWords];
  data->options_ok = ReadOptions(kOp, buffer, length, o, kOptionWords) &&
                     GeometryFromOptions(kOp, o, &data->geometry);
  return data;
}

TfLiteStatus Prepare(TfLiteContext* context, TfLiteNode* node) {
  auto* data = static_cast<OpData*>(node->user_data);
  if (data == nullptr || !data->options_ok) return kTfLiteError;
  if (!CheckArity(kOp, node, 4, 1)) return kTfLiteError;
  const TfLiteEvalTensor* dy = CheckedInput(kOp, "input 0 (dy)", context, node, 0, kTfLiteInt8, 4);
  const TfLiteEvalTensor* dy_scale =
      CheckedInput(kOp, "input 1 (dy_scale)", context, node, 1, kTfLiteFloat32, -1);
  const TfLiteEvalTensor* w = CheckedInput(kOp, "input 2 (w)", context, node, 2, kTfLiteInt8, 4);
  const TfLiteEvalTensor* ws =
      CheckedInput(kOp, "input 3 (weight_scale)", context, node, 3, kTfLiteFloat32, 1);
  const TfLiteEvalTensor* dx =
      CheckedOutput(kOp, "output 0 (dx)", context, node, 0, kTfLiteFloat32, 4);
  if (dy == nullptr || dy_scale == nullptr || w == nullptr || ws == nullptr || dx == nullptr)
    return kTfLiteError;
  const int32_t c = Dim(dy, 3);
  if (Dim(dy, 0) != 1 || Dim(dx, 0) != 1 || Dim(w, 0) != 1 || Dim(w, 3) != c ||
      Dim(dx, 3) != c || Dim(ws, 0) != c || NumElements(dy_scale) != 1) {
    MicroPrintf("%s: need dy [1, oh, ow, C], w [1, kh, kw, C], dx [1, h, w, C], "
                "weight_scale [C] and dy_scale [1] with C = %d; got w [%d, %d, %d, %d], dx "
                "channels %d, weight_scale [%d], batch dy %d dx %d", kOp, static_cast<int>(c),
                Dim(w, 0), Dim(w, 1), Dim(w, 2), Dim(w, 3), Dim(dx, 3), Dim(ws, 0), Dim(dy, 0),
                Dim(dx, 0));
    return kTfLiteError;
  }
  dgst_conv_geometry& g = data->geometry;
  g.in_h = Dim(dx, 1);
  g.in_w = Dim(dx, 2);
  g.out_h = Dim(dy, 1);
  g.out_w = Dim(dy, 2);
  g.kernel_h = Dim(w, 1);
  g.kernel_w = Dim(w, 2);
  data->channels = c;
  return CheckGeometry(kOp, g) ? kTfLiteOk : kTfLiteError;
}

TfLiteStatus Eval(TfLiteContext* context, TfLiteNode* node) {
  const auto* data = static_cast<const OpData*>(node->user_data);
  const TfLiteEvalTensor* dy = GetEvalInput(context, node, 0);
  const TfLiteEvalTensor* dy_scale = GetEvalInput(context, node, 1);
  const TfLiteEvalTensor* w = GetEvalInput(context, node, 2);
  const TfLiteEvalTensor* ws = GetEvalInput(context, node, 3);
  TfLiteEvalTensor* dx = GetEvalOutput(context, node, 0);
  dgst_depthwise_input_grad_s8(&data->geometry, static_cast<const int8_t*>(dy->data.data),
                               *static_cast<const float*>(dy_scale->data.data),
                               static_cast<const int8_t*>(w->data.data),
                               static_cast<const float*>(ws->data.data), data->channels,
                               static_cast<float*>(dx->data.data));
  return kTfLiteOk;
}

}  // namespace

DGST_REGISTER_OP(DGST_DEPTHWISE_INPUT_GRAD, Init, Prepare, Eval, nullptr);
