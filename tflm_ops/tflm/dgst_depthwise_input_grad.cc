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
#include "dgst_conv_grad_common.h"
#include "dgst_tflm_abi.h"
#include "dgst_tflm_geometry.h"

namespace {

using namespace tflite::micro;
using namespace dgst_tflm;

constexpr const char* kOp = "DGST_DEPTHWISE_INPUT_GRAD";

using OpData = ConvGradOpData;  // in_channels = out_channels = the channels

void* Init(TfLiteContext* context, const char* buffer, size_t length) {
  return InitInputGrad(kOp, context, buffer, length);
}

TfLiteStatus Prepare(TfLiteContext* context, TfLiteNode* node) {
  auto* data = PreparedOpData<OpData>(node);
  if (data == nullptr) return kTfLiteError;
  InputGradTensors t;
  if (!CheckedInputGradTensors(kOp, context, node, 4, &t)) return kTfLiteError;
  const TfLiteEvalTensor *dy = t.dy, *w = t.w, *ws = t.weight_scale, *dx = t.dx;
  const int32_t c = Dim(dy, 3);
  if (Dim(dy, 0) != 1 || Dim(dx, 0) != 1 || Dim(w, 0) != 1 || Dim(w, 3) != c ||
      Dim(dx, 3) != c || Dim(ws, 0) != c || NumElements(t.dy_scale) != 1) {
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
  data->in_channels = data->out_channels = c;
  return CheckGeometry(kOp, g) ? kTfLiteOk : kTfLiteError;
}

TfLiteStatus Eval(TfLiteContext* context, TfLiteNode* node) {
  const auto* data = static_cast<const OpData*>(node->user_data);
  const InputGradData d = GetInputGradData(context, node);
  dgst_depthwise_input_grad_s8(&data->geometry, d.dy, d.dy_scale, d.w, d.weight_scale,
                               data->in_channels, d.dx);
  return kTfLiteOk;
}

}  // namespace

DGST_REGISTER_OP(DGST_DEPTHWISE_INPUT_GRAD, Init, Prepare, Eval, nullptr);
