// DGST_SGD_QAS_UPDATE: in-place SGD step with Quantization-Aware Scaling on a trainable
// tensor held in the arena (a variable tensor, see DGST_VARIABLE_INIT).
//
//   inputs:  0 param         variable, updated in place:
//                              kind 0 (conv):      int8  [c_out, kh, kw, c_in]  (OHWI),
//                                                  or [c_out, c_in] (Dense; grad [c_out, k])
//                              kind 1 (depthwise): int8  [1, kh, kw, channels]
//                              kind 2 (bias):      int32 [channels]
//            1 grad          int32: conv [c_out, kh, kw, k], depthwise [kh, kw, k],
//                            bias [channels] (as from DGST_*_GRAD)
//            2 kept          int32 [k]: the updated input channels, in range and
//                            increasing by convention (a runtime tensor: the selection may
//                            change every step); omitted (-1) for bias
//            3 weight_scale  float32 [c_out] / [channels]: per-channel weight scales s_w
//            4 dy_scale      float32 [1]: the step's output-gradient scale (runtime)
//            5 step          int32 [1] variable: the training step counter sgd/step
//                            (stochastic rounding or a layer schedule; else omitted (-1))
//            6 index_channels  int32 [k]: the channels of the full kernel the kept ones are
//                            (stochastic rounding of a compact copy; else omitted (-1))
//   outputs: none
//   custom options (little-endian int32 x 4, x 9 with the rounding words, x 12 with a layer
//   schedule too):
//     [1 (format version), kind, lr (float32 bits), x_scale (float32 bits)
//      (, rounding (0 nearest, 1 stochastic), seed, stream, index_c_in, advance_step
//       (, layer, layers, per_step))]
// A layer the schedule (dgst_layer_schedule.h; weights only) leaves out this step keeps its
// weights; the op with advance_step = 1 still counts the step.
// Step (tflm_ops/core/sgd_qas_update.c): W_bar -= round(lr*x_scale*dy_scale/s_w[o] * grad),
// clamped to [-127, 127]; b_bar -= round(lr*dy_scale*grad/(s_w[o]*x_scale)). Stochastic
// rounding (weights only): W_bar = clamp(W_bar + floor(u - step), -127, 127), u from the
// hash of (seed, stream, *step, index in the full kernel of index_c_in channels); the op
// with advance_step = 1 (the graph's last reader of the step) then increments *step.
#include "../core/dgst_train_kernels.h"
#include "dgst_layer_schedule.h"
#include "dgst_tflm_abi.h"

namespace {

using namespace tflite::micro;
using namespace dgst_tflm;

constexpr const char* kOp = "DGST_SGD_QAS_UPDATE";
constexpr int kParamTensor = 0;  // updated in place (a variable)
constexpr int kGradTensor = 1;
constexpr int kKeptTensor = 2;  // omitted (-1) for a bias
constexpr int kWeightScaleTensor = 3;
constexpr int kDyScaleTensor = 4;
constexpr int kStepTensor = 5;           // stochastic rounding or a layer schedule
constexpr int kIndexChannelsTensor = 6;  // optional
constexpr int32_t kOptionWords = 4;
constexpr int32_t kRoundingOptionWords = 9;
enum Kind { kConv = 0, kDepthwise = 1, kBias = 2 };
enum Rounding { kNearest = 0, kStochastic = 1 };

struct OpData {
  bool options_ok;
  LayerSchedule schedule;  // in the padding after options_ok: no arena bytes
  int32_t kind;
  float lr, x_scale;
  int32_t rounding, seed, stream, index_c_in, advance_step;
  int32_t c_out, kernel_h, kernel_w, c_in, k;  // c_in: channels for depthwise and bias
};

// Stochastic rounding or a layer schedule read the step counter (input 5).
bool ReadsStep(const OpData* data) {
  return data->rounding == kStochastic || data->schedule.on();
}

void* Init(TfLiteContext* context, const char* buffer, size_t length) {
  auto* data = NewOpData<OpData>(context);
  if (data == nullptr) return nullptr;
  int32_t o[kRoundingOptionWords] = {0};
  const size_t rounding_bytes = sizeof(int32_t) * kRoundingOptionWords;
  const bool scheduled = length == rounding_bytes + sizeof(int32_t) * kScheduleWords;
  const bool rounding_words = scheduled || length == rounding_bytes;
  data->options_ok =
      ReadOptions(kOp, buffer, scheduled ? rounding_bytes : length, o,
                  rounding_words ? kRoundingOptionWords : kOptionWords) &&
      ReadLayerSchedule(kOp, buffer, length, kRoundingOptionWords, &data->schedule);
  if (!data->options_ok) return data;
  data->kind = o[1];
  data->lr = FloatFromBits(o[2]);
  data->x_scale = FloatFromBits(o[3]);
  data->rounding = o[4];
  data->seed = o[5];
  data->stream = o[6];
  data->index_c_in = o[7];
  data->advance_step = o[8];
  if (data->rounding < kNearest || data->rounding > kStochastic || data->index_c_in < 0 ||
      (data->rounding == kStochastic && data->kind == kBias)) {
    MicroPrintf("%s: invalid options: rounding %d (0 nearest, 1 stochastic; weights only), "
                "index_c_in %d", kOp, static_cast<int>(o[4]), static_cast<int>(o[7]));
    data->options_ok = false;
  }
  if (data->schedule.on() && data->kind == kBias) {
    MicroPrintf("%s: a bias update has no layer schedule (biases train every step)", kOp);
    data->options_ok = false;
  }
  if (data->advance_step && !ReadsStep(data)) {
    MicroPrintf("%s: advance_step needs the step counter (stochastic rounding or a layer "
                "schedule)", kOp);
    data->options_ok = false;
  }
  if (data->kind < kConv || data->kind > kBias || !(data->x_scale > 0.0f) ||
      !(data->lr >= 0.0f)) {
    MicroPrintf("%s: invalid options: kind %d (0 conv, 1 depthwise, 2 bias), lr %f (must be "
                ">= 0), x_scale %f (must be > 0)", kOp, static_cast<int>(o[1]),
                static_cast<double>(data->lr), static_cast<double>(data->x_scale));
    data->options_ok = false;
  }
  return data;
}

bool ShapeIs(const TfLiteEvalTensor* t, int rank, const int* dims) {
  if (Rank(t) != rank) return false;
  for (int i = 0; i < rank; ++i)
    if (Dim(t, i) != dims[i]) return false;
  return true;
}

// The step counter and the optional index channels of stochastic rounding.
TfLiteStatus PrepareRounding(TfLiteContext* context, TfLiteNode* node,
                             NodeTensorChecker* check, int k) {
  if (!CheckStepInput(kOp, check, kStepTensor)) return kTfLiteError;
  if (GetEvalInput(context, node, kIndexChannelsTensor) == nullptr) return kTfLiteOk;
  const TfLiteEvalTensor* index_channels = check->Input(
      "input 6 (index_channels)", kIndexChannelsTensor, kTfLiteInt32, 1);
  if (!check->ok()) return kTfLiteError;
  if (Dim(index_channels, 0) != k) {
    MicroPrintf("%s: input 6 (index_channels) must have the %d entries of kept, got %d", kOp,
                k, Dim(index_channels, 0));
    return kTfLiteError;
  }
  return kTfLiteOk;
}

TfLiteStatus Prepare(TfLiteContext* context, TfLiteNode* node) {
  auto* data = PreparedOpData<OpData>(node);
  if (data == nullptr) return kTfLiteError;
  const bool bias = data->kind == kBias;
  NodeTensorChecker check(kOp, context, node, ReadsStep(data) ? 7 : 5, 0);
  const TfLiteEvalTensor* param =
      check.Input("input 0 (param)", kParamTensor, bias ? kTfLiteInt32 : kTfLiteInt8, -1);
  const TfLiteEvalTensor* grad = check.Input("input 1 (grad)", kGradTensor, kTfLiteInt32, -1);
  const TfLiteEvalTensor* scale =
      check.Input("input 3 (weight_scale)", kWeightScaleTensor, kTfLiteFloat32, 1);
  const TfLiteEvalTensor* dy_scale =
      check.Input("input 4 (dy_scale)", kDyScaleTensor, kTfLiteFloat32, -1);
  if (!check.ok()) return kTfLiteError;
  // bias rank 1; depthwise rank 4; conv rank 4, or rank 2 for a Dense layer [c_out, c_in]
  // (then grad is [c_out, k]: a 1x1 conv).
  const int param_rank = Rank(param);
  if ((bias && param_rank != 1) || (data->kind == kDepthwise && param_rank != 4) ||
      (data->kind == kConv && param_rank != 4 && param_rank != 2)) {
    MicroPrintf("%s: input 0 (param) has rank %d; kind %d needs rank %s", kOp, param_rank,
                static_cast<int>(data->kind),
                bias ? "1" : (data->kind == kConv ? "4 (or 2 for Dense)" : "4"));
    return kTfLiteError;
  }
  if (NumElements(dy_scale) != 1) {
    MicroPrintf("%s: input 4 (dy_scale) must hold one value, got %d", kOp,
                NumElements(dy_scale));
    return kTfLiteError;
  }
  const TfLiteEvalTensor* kept = GetEvalInput(context, node, kKeptTensor);
  if (bias) {
    if (kept != nullptr) {
      MicroPrintf("%s: input 2 (kept) must be omitted (-1) for a bias update", kOp);
      return kTfLiteError;
    }
    data->c_out = data->c_in = Dim(param, 0);
    data->k = data->c_in;
    const int want[1] = {data->c_in};
    if (!ShapeIs(grad, 1, want) || Dim(scale, 0) != data->c_in) {
      MicroPrintf("%s: bias of %d channels needs grad [%d] and weight_scale [%d], got rank-%d "
                  "grad and weight_scale [%d]", kOp, static_cast<int>(data->c_in),
                  static_cast<int>(data->c_in), static_cast<int>(data->c_in), Rank(grad),
                  Dim(scale, 0));
      return kTfLiteError;
    }
    return kTfLiteOk;
  }
  kept = check.Input("input 2 (kept)", kKeptTensor, kTfLiteInt32, 1);
  if (!check.ok()) return kTfLiteError;
  if (ReadsStep(data) && PrepareRounding(context, node, &check, Dim(kept, 0)) != kTfLiteOk)
    return kTfLiteError;
  data->k = Dim(kept, 0);
  data->kernel_h = param_rank == 4 ? Dim(param, 1) : 1;
  data->kernel_w = param_rank == 4 ? Dim(param, 2) : 1;
  if (data->kind == kConv) {
    data->c_out = Dim(param, 0);
    data->c_in = Dim(param, -1);
    const int want4[4] = {data->c_out, data->kernel_h, data->kernel_w, data->k};
    const int want2[2] = {data->c_out, data->k};
    const int* want = want4;
    if (param_rank == 4 ? !ShapeIs(grad, 4, want4) : !ShapeIs(grad, 2, want2)) {
      MicroPrintf("%s: conv grad must have shape [%d, %d, %d, %d] (c_out, kh, kw, k), got "
                  "rank %d [%d, %d, ...]", kOp, want[0], want[1], want[2], want[3], Rank(grad),
                  Dim(grad, 0), Dim(grad, 1));
      return kTfLiteError;
    }
  } else {
    if (Dim(param, 0) != 1) {
      MicroPrintf("%s: depthwise param must have shape [1, kh, kw, channels], got first "
                  "dimension %d", kOp, Dim(param, 0));
      return kTfLiteError;
    }
    data->c_in = Dim(param, 3);
    data->c_out = data->c_in;
    const int want[3] = {data->kernel_h, data->kernel_w, data->k};
    if (!ShapeIs(grad, 3, want)) {
      MicroPrintf("%s: depthwise grad must have shape [%d, %d, %d] (kh, kw, k), got rank %d",
                  kOp, want[0], want[1], want[2], Rank(grad));
      return kTfLiteError;
    }
  }
  if (data->k > data->c_in || Dim(scale, 0) != data->c_out) {
    MicroPrintf("%s: %d kept channels of %d, weight_scale [%d] for %d output channels", kOp,
                static_cast<int>(data->k), static_cast<int>(data->c_in), Dim(scale, 0),
                static_cast<int>(data->c_out));
    return kTfLiteError;
  }
  return kTfLiteOk;
}

// The gradient, the weight scales and dy's scale, as every update reads them.
struct Gradient {
  const int32_t* grad;
  const float* weight_scale;
  float dy_scale;
};

Gradient GetGradient(TfLiteContext* context, TfLiteNode* node) {
  return {static_cast<const int32_t*>(GetEvalInput(context, node, kGradTensor)->data.data),
          static_cast<const float*>(GetEvalInput(context, node, kWeightScaleTensor)->data.data),
          *static_cast<const float*>(GetEvalInput(context, node, kDyScaleTensor)->data.data)};
}

TfLiteStatus EvalStochastic(TfLiteContext* context, TfLiteNode* node, const OpData* data,
                            int8_t* w, const int32_t* kept, const Gradient& g) {
  const auto* step =
      static_cast<const int32_t*>(GetEvalInput(context, node, kStepTensor)->data.data);
  const TfLiteEvalTensor* channels = GetEvalInput(context, node, kIndexChannelsTensor);
  const int32_t index_c_in = data->index_c_in > 0 ? data->index_c_in : data->c_in;
  dgst_stochastic_rounding sr = {static_cast<uint32_t>(data->seed),
                                 static_cast<uint32_t>(data->stream),
                                 static_cast<uint32_t>(*step), nullptr, index_c_in};
  if (channels != nullptr) {
    sr.index_channels = static_cast<const int32_t*>(channels->data.data);
    if (!KeptInRange(kOp, sr.index_channels, data->k, index_c_in)) return kTfLiteError;
  }
  if (data->kind == kConv) {
    dgst_sgd_qas_update_conv_sr_s8(w, data->c_out, data->kernel_h, data->kernel_w, data->c_in,
                                   kept, data->k, g.grad, data->lr, data->x_scale, g.dy_scale,
                                   g.weight_scale, &sr);
  } else {
    dgst_sgd_qas_update_depthwise_sr_s8(w, data->kernel_h, data->kernel_w, data->c_in, kept,
                                        data->k, g.grad, data->lr, data->x_scale, g.dy_scale,
                                        g.weight_scale, &sr);
  }
  return kTfLiteOk;
}

TfLiteStatus UpdateWeights(TfLiteContext* context, TfLiteNode* node, const OpData* data,
                           int8_t* w) {
  const auto* kept =
      static_cast<const int32_t*>(GetEvalInput(context, node, kKeptTensor)->data.data);
  if (!KeptInRange(kOp, kept, data->k, data->c_in)) return kTfLiteError;
  const Gradient g = GetGradient(context, node);
  if (data->rounding == kStochastic) return EvalStochastic(context, node, data, w, kept, g);
  if (data->kind == kConv) {
    dgst_sgd_qas_update_conv_s8(w, data->c_out, data->kernel_h, data->kernel_w, data->c_in,
                                kept, data->k, g.grad, data->lr, data->x_scale, g.dy_scale,
                                g.weight_scale);
  } else {
    dgst_sgd_qas_update_depthwise_s8(w, data->kernel_h, data->kernel_w, data->c_in, kept,
                                     data->k, g.grad, data->lr, data->x_scale, g.dy_scale,
                                     g.weight_scale);
  }
  return kTfLiteOk;
}

// The last reader of the step counter counts the step.
void AdvanceStep(TfLiteContext* context, TfLiteNode* node, const OpData* data) {
  if (!data->advance_step) return;
  auto* step = static_cast<int32_t*>(GetEvalInput(context, node, kStepTensor)->data.data);
  // wraps like the uint32 step of the hash (int32 overflow would be undefined)
  *step = static_cast<int32_t>(static_cast<uint32_t>(*step) + 1u);
}

TfLiteStatus Eval(TfLiteContext* context, TfLiteNode* node) {
  const auto* data = static_cast<const OpData*>(node->user_data);
  const TfLiteEvalTensor* param = GetEvalInput(context, node, kParamTensor);
  if (data->kind == kBias) {
    const Gradient g = GetGradient(context, node);
    dgst_sgd_qas_update_bias_s32(static_cast<int32_t*>(param->data.data), data->c_in, g.grad,
                                 data->lr, data->x_scale, g.dy_scale, g.weight_scale);
    return kTfLiteOk;
  }
  if (LayerActive(context, node, kStepTensor, data->schedule) &&
      UpdateWeights(context, node, data, static_cast<int8_t*>(param->data.data)) != kTfLiteOk)
    return kTfLiteError;
  AdvanceStep(context, node, data);
  return kTfLiteOk;
}

}  // namespace

DGST_REGISTER_OP(DGST_SGD_QAS_UPDATE, Init, Prepare, Eval, nullptr);
