// What the convolution-gradient kernels share (as tflite-micro's conv_common.cc does for
// CONV_2D): the custom options of the weight-gradient ops (DGST_CONV2D_WEIGHT_GRAD,
// DGST_DEPTHWISE_WEIGHT_GRAD) and of the input-gradient ops (DGST_CONV2D_INPUT_GRAD,
// DGST_DEPTHWISE_INPUT_GRAD), and the tensors of the input-gradient ops, which have the
// same inputs and output, and the per-node data and Init of all four. Header-only; every
// function is inline.
#ifndef DGST_CONV_GRAD_COMMON_H_
#define DGST_CONV_GRAD_COMMON_H_

#include "../core/dgst_train_kernels.h"
#include "dgst_layer_schedule.h"
#include "dgst_tflm_abi.h"
#include "dgst_tflm_geometry.h"

namespace dgst_tflm {

// [1 (format version), stride_h, stride_w, dilation_h, dilation_w, pad_top, pad_left]
constexpr int32_t kInputGradOptionWords = 7;
// The same, then x_zero_point (then, optionally, the layer schedule words).
constexpr int32_t kWeightGradOptionWords = 8;

// The input-gradient ops' tensors.
constexpr int kInputGradDyTensor = 0;           // int8 [1, out_h, out_w, c_out]
constexpr int kInputGradDyScaleTensor = 1;      // float32 [1]
constexpr int kInputGradWeightsTensor = 2;      // int8, the layer's filter
constexpr int kInputGradWeightScaleTensor = 3;  // float32 [c_out]
constexpr int kInputGradDxTensor = 0;           // output: float32 [1, in_h, in_w, c_in]

// The per-node data of all four ops. in_channels / out_channels: c_in and c_out of an
// input gradient (both the channels for depthwise); for a weight gradient the k kept input
// channels and dy's channels. x_zero_point and schedule (dgst_layer_schedule.h; off unless
// the options have its words): weight gradients only.
struct ConvGradOpData {
  bool options_ok;
  LayerSchedule schedule;  // in the padding after options_ok: no arena bytes
  int32_t x_zero_point, in_channels, out_channels;
  dgst_conv_geometry geometry;
};

// Options of an input-gradient op -> geometry (strides, dilations, leading padding).
inline bool ReadInputGradOptions(const char* op, const char* buffer, size_t length,
                                 dgst_conv_geometry* g) {
  int32_t o[kInputGradOptionWords];
  return ReadOptions(op, buffer, length, o, kInputGradOptionWords) &&
         GeometryFromOptions(op, o, g);
}

// Options of a weight-gradient op -> geometry and the saved input's zero point (int8).
inline bool ReadWeightGradOptions(const char* op, const char* buffer, size_t length,
                                  dgst_conv_geometry* g, int32_t* x_zero_point,
                                  LayerSchedule* schedule) {
  int32_t o[kWeightGradOptionWords];
  const size_t own = sizeof(int32_t) * kWeightGradOptionWords;
  if (!ReadOptions(op, buffer, length == own + sizeof(int32_t) * kScheduleWords ? own : length,
                   o, kWeightGradOptionWords) ||
      !GeometryFromOptions(op, o, g) ||
      !ReadLayerSchedule(op, buffer, length, kWeightGradOptionWords, schedule))
    return false;
  if (o[7] < -128 || o[7] > 127) {
    MicroPrintf("%s: invalid options: x_zero_point %d must be in [-128, 127]", op,
                static_cast<int>(o[7]));
    return false;
  }
  *x_zero_point = o[7];
  return true;
}

// Init of an input-gradient op: the node's ConvGradOpData with the geometry options read.
inline void* InitInputGrad(const char* op, DGST_TFLM_TYPE(TfLiteContext) * context,
                           const char* buffer, size_t length) {
  auto* data = NewOpData<ConvGradOpData>(context);
  if (data == nullptr) return nullptr;
  data->options_ok = ReadInputGradOptions(op, buffer, length, &data->geometry);
  return data;
}

// Init of a weight-gradient op: geometry and x_zero_point read from the options.
inline void* InitWeightGrad(const char* op, DGST_TFLM_TYPE(TfLiteContext) * context,
                            const char* buffer, size_t length) {
  auto* data = NewOpData<ConvGradOpData>(context);
  if (data == nullptr) return nullptr;
  data->options_ok = ReadWeightGradOptions(op, buffer, length, &data->geometry,
                                           &data->x_zero_point, &data->schedule);
  return data;
}

// The tensors of an input-gradient op in Prepare, arity and types checked; dy, w and dx must
// have rank `rank` (-1: any). Returns false (after an error naming `op`) otherwise.
struct InputGradTensors {
  const DGST_TFLM_TYPE(TfLiteEvalTensor) * dy, *dy_scale, *w, *weight_scale, *dx;
};

inline bool CheckedInputGradTensors(const char* op, DGST_TFLM_TYPE(TfLiteContext) * context,
                                    DGST_TFLM_TYPE(TfLiteNode) * node, int rank,
                                    InputGradTensors* t) {
  using namespace ::tflite::micro;  // the kTfLite* types in pip mode (global in TFLM)
  NodeTensorChecker check(op, context, node, 4, 1);
  t->dy = check.Input("input 0 (dy)", kInputGradDyTensor, kTfLiteInt8, rank);
  t->dy_scale = check.Input("input 1 (dy_scale)", kInputGradDyScaleTensor, kTfLiteFloat32, -1);
  t->w = check.Input("input 2 (w)", kInputGradWeightsTensor, kTfLiteInt8, rank);
  t->weight_scale =
      check.Input("input 3 (weight_scale)", kInputGradWeightScaleTensor, kTfLiteFloat32, 1);
  t->dx = check.Output("output 0 (dx)", kInputGradDxTensor, kTfLiteFloat32, rank);
  return check.ok();
}

// The data of an input-gradient op's tensors in Eval.
struct InputGradData {
  const int8_t* dy;
  float dy_scale;
  const int8_t* w;
  const float* weight_scale;
  float* dx;
};

inline InputGradData GetInputGradData(const DGST_TFLM_TYPE(TfLiteContext) * context,
                                      const DGST_TFLM_TYPE(TfLiteNode) * node) {
  using ::tflite::micro::GetEvalInput;
  InputGradData d;
  d.dy = static_cast<const int8_t*>(GetEvalInput(context, node, kInputGradDyTensor)->data.data);
  d.dy_scale =
      *static_cast<const float*>(GetEvalInput(context, node, kInputGradDyScaleTensor)->data.data);
  d.w = static_cast<const int8_t*>(GetEvalInput(context, node, kInputGradWeightsTensor)->data.data);
  d.weight_scale = static_cast<const float*>(
      GetEvalInput(context, node, kInputGradWeightScaleTensor)->data.data);
  d.dx = static_cast<float*>(
      ::tflite::micro::GetEvalOutput(context, node, kInputGradDxTensor)->data.data);
  return d;
}

}  // namespace dgst_tflm

#endif  // DGST_CONV_GRAD_COMMON_H_
