// dgst-tf on-device training ops for a TensorFlow Lite Micro source tree (TFLM source-tree
// mode: the kernels tflm_ops/tflm/dgst_*.cc compiled with -DDGST_TFLM_TREE against TFLM's
// own headers; see tflm_ops/tflm/README.md, "In a TFLM source tree").
//
//   #include "dgst_train_ops.h"
//
//   static tflite::MicroMutableOpResolver<N> resolver;   // N >= builtins + kNumDgstTrainOps (16)
//   resolver.AddConv2D(); ...                             // the model's builtin ops
//   if (dgst_tflm::AddDgstTrainOps(resolver) != kTfLiteOk) { /* resolver too small */ }
//
// or register ops one by one, with the op names of the exported model:
//
//   resolver.AddCustom("DGST_BIAS_GRAD", tflite::Register_DGST_BIAS_GRAD());
//
// Each Register_* returns the same static registration on every call. Not used by the pip
// (host Python) build, which registers through DgstRegister_* instead. A complete example:
// tflm_ops/firmware/dgst_train_main.cc (resolver sized as the model's builtins +
// kNumDgstTrainOps; the library built by `make -C tflm_ops tflm-cortex-m7`).
#ifndef DGST_TRAIN_OPS_H_
#define DGST_TRAIN_OPS_H_

#include "tensorflow/lite/c/common.h"
#include "tensorflow/lite/micro/micro_common.h"

namespace tflite {

TFLMRegistration* Register_DGST_ACTIVATION_GRAD();
TFLMRegistration* Register_DGST_BIAS_GRAD();
TFLMRegistration* Register_DGST_CONV2D();
TFLMRegistration* Register_DGST_CONV2D_INPUT_GRAD();
TFLMRegistration* Register_DGST_CONV2D_WEIGHT_GRAD();
TFLMRegistration* Register_DGST_DEPTHWISE_INPUT_GRAD();
TFLMRegistration* Register_DGST_DEPTHWISE_WEIGHT_GRAD();
TFLMRegistration* Register_DGST_FUSED_BLOCK();
TFLMRegistration* Register_DGST_GATHER_CHANNELS();
TFLMRegistration* Register_DGST_QUANTIZE_GRAD();
TFLMRegistration* Register_DGST_RELU_MASK();
TFLMRegistration* Register_DGST_SCATTER_CHANNELS();
TFLMRegistration* Register_DGST_SELECT_CHANNELS();
TFLMRegistration* Register_DGST_SGD_QAS_UPDATE();
TFLMRegistration* Register_DGST_SOFTMAX_XENT_GRAD();
TFLMRegistration* Register_DGST_VARIABLE_INIT();

}  // namespace tflite

namespace dgst_tflm {

// Resolver slots AddDgstTrainOps uses.
constexpr unsigned int kNumDgstTrainOps = 16;

// AddCustom's all 16 dgst ops to `resolver` (a tflite::MicroMutableOpResolver<N>; a template
// so that this header needs no resolver header). Stops at, and returns, the first error
// (resolver full, or an op already added: AddCustom accepts each name once).
template <typename Resolver>
inline TfLiteStatus AddDgstTrainOps(Resolver& resolver) {
  struct Op {
    const char* name;
    TFLMRegistration* (*registration)();
  };
  const Op ops[kNumDgstTrainOps] = {
      {"DGST_VARIABLE_INIT", tflite::Register_DGST_VARIABLE_INIT},
      {"DGST_SELECT_CHANNELS", tflite::Register_DGST_SELECT_CHANNELS},
      {"DGST_FUSED_BLOCK", tflite::Register_DGST_FUSED_BLOCK},
      {"DGST_CONV2D", tflite::Register_DGST_CONV2D},
      {"DGST_RELU_MASK", tflite::Register_DGST_RELU_MASK},
      {"DGST_GATHER_CHANNELS", tflite::Register_DGST_GATHER_CHANNELS},
      {"DGST_SCATTER_CHANNELS", tflite::Register_DGST_SCATTER_CHANNELS},
      {"DGST_SOFTMAX_XENT_GRAD", tflite::Register_DGST_SOFTMAX_XENT_GRAD},
      {"DGST_ACTIVATION_GRAD", tflite::Register_DGST_ACTIVATION_GRAD},
      {"DGST_QUANTIZE_GRAD", tflite::Register_DGST_QUANTIZE_GRAD},
      {"DGST_CONV2D_INPUT_GRAD", tflite::Register_DGST_CONV2D_INPUT_GRAD},
      {"DGST_DEPTHWISE_INPUT_GRAD", tflite::Register_DGST_DEPTHWISE_INPUT_GRAD},
      {"DGST_BIAS_GRAD", tflite::Register_DGST_BIAS_GRAD},
      {"DGST_CONV2D_WEIGHT_GRAD", tflite::Register_DGST_CONV2D_WEIGHT_GRAD},
      {"DGST_DEPTHWISE_WEIGHT_GRAD", tflite::Register_DGST_DEPTHWISE_WEIGHT_GRAD},
      {"DGST_SGD_QAS_UPDATE", tflite::Register_DGST_SGD_QAS_UPDATE},
  };
  for (const Op& op : ops) {
    const TfLiteStatus status = resolver.AddCustom(op.name, op.registration());
    if (status != kTfLiteOk) return status;
  }
  return kTfLiteOk;
}

}  // namespace dgst_tflm

#endif  // DGST_TRAIN_OPS_H_
