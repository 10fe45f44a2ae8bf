// DGST_CONV2D: TFLite's int8 per-channel CONV_2D or DEPTHWISE_CONV_2D (multiplier 1, dilation
// 1), bit-identical to the builtin op, whose requantization multipliers and shifts are a
// constant input (flash) instead of per-op data the builtin computes into the arena at Prepare
// (8 bytes per output channel: 35 KB for the training part of MobileNetV2-0.35). The training
// export replaces its builtin convolutions by it (dgst_conv2d_s8 / dgst_depthwise_conv2d_s8).
//
//   inputs:  0 x        int8  [1, in_h, in_w, in_c]
//            1 weights  int8  conv [out_c, k_h, k_w, in_c]; depthwise [1, k_h, k_w, in_c]
//            2 bias     int32 [out_c]          (a constant, or a variable being trained)
//            3 requant  int32 [2, out_c]       rows: TFLite's QuantizeMultiplier multiplier
//                                              and shift of x_scale * w_scale[c] / y_scale
//   outputs: 0 y        int8  [1, out_h, out_w, out_c]   (depthwise: out_c = in_c)
//   custom options (little-endian int32 x 12):
//     [1 (format version), kind (0 conv, 1 depthwise), stride_h, stride_w, pad_top, pad_left,
//      zero points of x and y, act_min, act_max (the fused activation's range in y codes),
//      then the builtin op's padding and fused activation codes (not used here: they let the
//      exporter give an inference graph its builtin op back)]
#include "../core/dgst_train_kernels.h"
#include "dgst_tflm_abi.h"
#include "dgst_tflm_geometry.h"

namespace {

using namespace tflite::micro;
using namespace dgst_tflm;

constexpr const char* kOp = "DGST_CONV2D";
constexpr int32_t kOptionWords = 12;
constexpr int32_t kConv = 0;
constexpr int32_t kDepthwise = 1;
constexpr int kXTensor = 0;
constexpr int kWeightsTensor = 1;
constexpr int kBiasTensor = 2;
constexpr int kRequantTensor = 3;
constexpr int kYTensor = 0;  // output

struct OpData {
  bool options_ok;
  int32_t kind;
  dgst_conv_geometry geometry;
  int32_t in_c, out_c;
  int32_t x_zero_point, y_zero_point, act_min, act_max;
  int scratch;  // depthwise: out_c int32 accumulators
};

void* Init(TfLiteContext* context, const char* buffer, size_t length) {
  auto* data = NewOpData<OpData>(context);
  if (data == nullptr) return nullptr;
  int32_t o[kOptionWords];
  data->options_ok = ReadOptions(kOp, buffer, length, o, kOptionWords);
  if (!data->options_ok) return data;
  data->kind = o[1];
  dgst_conv_geometry& g = data->geometry;
  g.stride_h = o[2];
  g.stride_w = o[3];
  g.dilation_h = g.dilation_w = 1;
  g.pad_top = o[4];
  g.pad_left = o[5];
  data->x_zero_point = o[6];
  data->y_zero_point = o[7];
  data->act_min = o[8];
  data->act_max = o[9];
  const bool ok = (o[1] == kConv || o[1] == kDepthwise) && o[2] >= 1 && o[3] >= 1 &&
                  o[4] >= 0 && o[5] >= 0 && o[6] >= -128 && o[6] <= 127 && o[7] >= -128 &&
                  o[7] <= 127 && o[8] >= -128 && o[8] <= o[9] && o[9] <= 127;
  if (!ok) {
    MicroPrintf("%s: invalid options: kind %d (0 conv, 1 depthwise), stride %dx%d (must be "
                ">= 1), padding %d,%d (must be >= 0), zero points %d %d (int8), activation "
                "range [%d, %d] (int8, min <= max)", kOp, o[1], o[2], o[3], o[4], o[5], o[6],
                o[7], o[8], o[9]);
    data->options_ok = false;
  }
  return data;
}

// The weights, bias and requant shapes of the op's kind; prints what is wrong otherwise.
bool CheckParameters(const OpData& data, const TfLiteEvalTensor* w, const TfLiteEvalTensor* b,
                     const TfLiteEvalTensor* q) {
  const int32_t out_c = data.out_c;
  const bool weights_ok =
      data.kind == kDepthwise
          ? Dim(w, 0) == 1 && Dim(w, 3) == data.in_c && out_c == data.in_c &&
                Dim(w, 1) <= DGST_DEPTHWISE_MAX_KERNEL_H
          : Dim(w, 0) == out_c && Dim(w, 3) == data.in_c;
  if (!weights_ok) {
    MicroPrintf("%s: input 1 (weights) [%d, %d, %d, %d] does not fit x with %d and y with %d "
                "channels (%s)", kOp, Dim(w, 0), Dim(w, 1), Dim(w, 2), Dim(w, 3),
                static_cast<int>(data.in_c), static_cast<int>(out_c),
                data.kind == kDepthwise
                    ? "depthwise: [1, k_h, k_w, channels], y channels = x channels, k_h <= 16"
                    : "conv: [y channels, k_h, k_w, x channels]");
    return false;
  }
  if (Dim(b, 0) != out_c || Dim(q, 0) != 2 || Dim(q, 1) != out_c) {
    MicroPrintf("%s: input 2 (bias) must have shape [%d] and input 3 (requant: multiplier, "
                "shift) [2, %d]; got [%d] and [%d, %d]", kOp, static_cast<int>(out_c),
                static_cast<int>(out_c), Dim(b, 0), Dim(q, 0), Dim(q, 1));
    return false;
  }
  return true;
}

TfLiteStatus Prepare(TfLiteContext* context, TfLiteNode* node) {
  auto* data = PreparedOpData<OpData>(node);
  if (data == nullptr) return kTfLiteError;
  NodeTensorChecker check(kOp, context, node, 4, 1);
  const TfLiteEvalTensor* x = check.Input("input 0 (x)", kXTensor, kTfLiteInt8, 4);
  const TfLiteEvalTensor* w = check.Input("input 1 (weights)", kWeightsTensor, kTfLiteInt8, 4);
  const TfLiteEvalTensor* b = check.Input("input 2 (bias)", kBiasTensor, kTfLiteInt32, 1);
  const TfLiteEvalTensor* q = check.Input("input 3 (requant)", kRequantTensor, kTfLiteInt32, 2);
  const TfLiteEvalTensor* y = check.Output("output 0 (y)", kYTensor, kTfLiteInt8, 4);
  if (!check.ok()) return kTfLiteError;
  if (!CheckBatchOne(kOp, x, y)) return kTfLiteError;
  dgst_conv_geometry& g = data->geometry;
  g.in_h = Dim(x, 1);
  g.in_w = Dim(x, 2);
  g.out_h = Dim(y, 1);
  g.out_w = Dim(y, 2);
  g.kernel_h = Dim(w, 1);
  g.kernel_w = Dim(w, 2);
  data->in_c = Dim(x, 3);
  data->out_c = Dim(y, 3);
  if (!CheckParameters(*data, w, b, q) || !CheckGeometry(kOp, g)) return kTfLiteError;
  if (data->kind == kDepthwise &&
      MicroContextRequestScratchBufferInArena(
          context, sizeof(int32_t) * static_cast<size_t>(data->out_c), &data->scratch) !=
          kTfLiteOk) {
    MicroPrintf("%s: cannot get a scratch buffer of %d int32", kOp,
                static_cast<int>(data->out_c));
    return kTfLiteError;
  }
  return kTfLiteOk;
}

TfLiteStatus Eval(TfLiteContext* context, TfLiteNode* node) {
  const auto* data = static_cast<const OpData*>(node->user_data);
  const auto* requant =
      static_cast<const int32_t*>(GetEvalInput(context, node, kRequantTensor)->data.data);
  dgst_requant_params p;
  p.weights = static_cast<const int8_t*>(GetEvalInput(context, node, kWeightsTensor)->data.data);
  p.bias = static_cast<const int32_t*>(GetEvalInput(context, node, kBiasTensor)->data.data);
  p.multiplier = requant;
  p.shift = requant + data->out_c;
  p.input_offset = -data->x_zero_point;
  p.output_offset = data->y_zero_point;
  p.act_min = data->act_min;
  p.act_max = data->act_max;
  const auto* x = static_cast<const int8_t*>(GetEvalInput(context, node, kXTensor)->data.data);
  auto* y = static_cast<int8_t*>(GetEvalOutput(context, node, kYTensor)->data.data);
  if (data->kind == kDepthwise) {
    dgst_depthwise_conv2d_s8(&data->geometry, data->out_c, &p, x, y,
                             static_cast<int32_t*>(
                                 MicroContextGetScratchBuffer(context, data->scratch)));
  } else {
    dgst_conv2d_s8(&data->geometry, data->in_c, data->out_c, &p, x, y);
  }
  return kTfLiteOk;
}

}  // namespace

DGST_REGISTER_OP(DGST_CONV2D, Init, Prepare, Eval, nullptr);
