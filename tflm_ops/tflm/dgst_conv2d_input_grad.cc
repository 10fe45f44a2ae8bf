// DGST_CONV2D_INPUT_GRAD: input gradient of a Conv2D (or Dense) layer, the transposed
// convolution, in float (real units: dL/dx for the real input).
//
//   inputs:  0 dy            int8    [1, out_h, out_w, c_out]  (Dense: [1, c_out])
//            1 dy_scale      float32 [1]     per-tensor scale of dy (DGST_QUANTIZE_GRAD)
//            2 w             int8    [c_out, kh, kw, c_in]     (Dense: [c_out, c_in]);
//                            constant or a variable tensor (read before its update)
//            3 weight_scale  float32 [c_out]  per-output-channel s_w
//   outputs: 0 dx            float32 [1, in_h, in_w, c_in]     (Dense: [1, c_in])
//   custom options (little-endian int32 x 7):
//     [1 (format version), stride_h, stride_w, dilation_h, dilation_w, pad_top, pad_left]
// dx[iy][ix][c] = dy_scale * sum weight_scale[o] * dy[oy][ox][o] * w[o][i][j][c] over the
// taps mapping to (iy, ix). Calls dgst_conv2d_input_grad_s8 from tflm_ops/core.
#include "../core/dgst_train_kernels.h"
#include "dgst_conv_grad_common.h"
#include "dgst_tflm_abi.h"
#include "dgst_tflm_geometry.h"

namespace {

using namespace tflite::micro;
using namespace dgst_tflm;

constexpr const char* kOp = "DGST_CONV2D_INPUT_GRAD";

using OpData = ConvGradOpData;  // in_channels = c_in, out_channels = c_out

void* Init(TfLiteContext* context, const char* buffer, size_t length) {
  return InitInputGrad(kOp, context, buffer, length);
}

TfLiteStatus Prepare(TfLiteContext* context, TfLiteNode* node) {
  auto* data = PreparedOpData<OpData>(node);
  if (data == nullptr) return kTfLiteError;
  InputGradTensors t;
  if (!CheckedInputGradTensors(kOp, context, node, -1, &t)) return kTfLiteError;
  const TfLiteEvalTensor *dy = t.dy, *w = t.w, *ws = t.weight_scale;
  dgst_conv_geometry& g = data->geometry;
  int32_t c_out, c_in;
  if (!ActivationView(kOp, "input 0 (dy)", dy, &g.out_h, &g.out_w, &c_out) ||
      !ActivationView(kOp, "output 0 (dx)", t.dx, &g.in_h, &g.in_w, &c_in))
    return kTfLiteError;
  if (Rank(w) != 4 && Rank(w) != 2) {
    MicroPrintf("%s: input 2 (w) must be [c_out, kh, kw, c_in] or [c_out, c_in], got rank %d",
                kOp, Rank(w));
    return kTfLiteError;
  }
  g.kernel_h = Rank(w) == 4 ? Dim(w, 1) : 1;
  g.kernel_w = Rank(w) == 4 ? Dim(w, 2) : 1;
  if (Dim(w, 0) != c_out || Dim(w, -1) != c_in || Dim(ws, 0) != c_out ||
      NumElements(t.dy_scale) != 1) {
    MicroPrintf("%s: w [%d, .., %d] and weight_scale [%d] must match dy's %d output and dx's "
                "%d input channels; dy_scale must hold 1 value (has %d)", kOp, Dim(w, 0),
                Dim(w, -1), Dim(ws, 0), static_cast<int>(c_out), static_cast<int>(c_in),
                NumElements(t.dy_scale));
    return kTfLiteError;
  }
  data->in_channels = c_in;
  data->out_channels = c_out;
  return CheckGeometry(kOp, g) ? kTfLiteOk : kTfLiteError;
}

TfLiteStatus Eval(TfLiteContext* context, TfLiteNode* node) {
  const auto* data = static_cast<const OpData*>(node->user_data);
  const InputGradData d = GetInputGradData(context, node);
  dgst_conv2d_input_grad_s8(&data->geometry, d.dy, d.dy_scale, d.w, d.weight_scale,
                            data->in_channels, data->out_channels, d.dx);
  return kTfLiteOk;
}

}  // namespace

DGST_REGISTER_OP(DGST_CONV2D_INPUT_GRAD, Init, Prepare, Eval, nullptr);
