// DGST_SELECT_CHANNELS: the dynamic channel selection of a weight-updated layer, evaluated
// on device at the start of every training step (a DGSU-style policy).
//
//   inputs:  0 w             int8 weights, as the layer uses them (usually the variable):
//                              kind 0: [c_out, kh, kw, c_in] (OHWI) or Dense [c_out, c_in]
//                              kind 1: depthwise [1, kh, kw, channels]
//            1 weight_scale  float32 [c_out] (depthwise: [channels])
//            2 step          int32 [1], a variable: the step counter of the traversal,
//                            incremented (mod c_in) in place; omitted (-1) for magnitude
//   outputs: 0 kept          int32 [k]: the channels to update this step, increasing
//   custom options (little-endian int32 x 3):
//     [1 (format version), policy (0 traversal, 1 magnitude), kind (0 conv/dense,
//      1 depthwise)]
// traversal: window of k channels from (step * k) mod c_in (wrapping): every channel is
// visited once every ceil(c_in / k) steps. magnitude: top-k L2 norm of the current (updated)
// weights, so the choice follows training. Magnitude needs a scratch buffer of c_in floats
// (arena, non-persistent). Calls dgst_select_traversal / dgst_select_magnitude_s8.
#include "../core/dgst_train_kernels.h"
#include "dgst_tflm_abi.h"

namespace {

using namespace tflite::micro;
using namespace dgst_tflm;

constexpr const char* kOp = "DGST_SELECT_CHANNELS";
constexpr int kWeightsTensor = 0;
constexpr int kWeightScaleTensor = 1;
constexpr int kStepTensor = 2;  // traversal policy: the step counter (a variable)
constexpr int kKeptTensor = 0;  // output
constexpr int32_t kOptionWords = 3;
enum Policy { kTraversal = 0, kMagnitude = 1 };

struct OpData {
  bool options_ok;
  int32_t policy, kind;
  int32_t c_out, taps, c_in, k;
  int scratch;
};

void* Init(TfLiteContext* context, const char* buffer, size_t length) {
  auto* data = NewOpData<OpData>(context);
  if (data == nullptr) return nullptr;
  int32_t o[kOptionWords];
  data->options_ok = ReadOptions(kOp, buffer, length, o, kOptionWords);
  if (!data->options_ok) return data;
  data->policy = o[1];
  data->kind = o[2];
  data->scratch = -1;
  if (o[1] < kTraversal || o[1] > kMagnitude || o[2] < 0 || o[2] > 1) {
    MicroPrintf("%s: invalid options: policy %d (0 traversal, 1 magnitude), kind %d (0 "
                "conv/dense, 1 depthwise)", kOp, static_cast<int>(o[1]), static_cast<int>(o[2]));
    data->options_ok = false;
  }
  return data;
}

TfLiteStatus Prepare(TfLiteContext* context, TfLiteNode* node) {
  auto* data = PreparedOpData<OpData>(node);
  if (data == nullptr) return kTfLiteError;
  NodeTensorChecker check(kOp, context, node, 3, 1);
  const TfLiteEvalTensor* w = check.Input("input 0 (w)", kWeightsTensor, kTfLiteInt8, -1);
  const TfLiteEvalTensor* ws =
      check.Input("input 1 (weight_scale)", kWeightScaleTensor, kTfLiteFloat32, 1);
  const TfLiteEvalTensor* kept = check.Output("output 0 (kept)", kKeptTensor, kTfLiteInt32, 1);
  if (!check.ok()) return kTfLiteError;
  const int rank = Rank(w);
  if (data->kind == 1 ? (rank != 4 || Dim(w, 0) != 1) : (rank != 4 && rank != 2)) {
    MicroPrintf("%s: input 0 (w) must be %s, got rank %d", kOp,
                data->kind == 1 ? "[1, kh, kw, channels]" : "[c_out, kh, kw, c_in] or "
                "[c_out, c_in]", rank);
    return kTfLiteError;
  }
  data->c_in = Dim(w, -1);
  data->c_out = data->kind == 1 ? data->c_in : Dim(w, 0);
  data->taps = rank == 4 ? Dim(w, 1) * Dim(w, 2) : 1;
  data->k = Dim(kept, 0);
  if (Dim(ws, 0) != data->c_out || data->k < 1 || data->k > data->c_in) {
    MicroPrintf("%s: weight_scale must have %d values (has %d) and kept 1..%d channels (has %d)",
                kOp, static_cast<int>(data->c_out), Dim(ws, 0), static_cast<int>(data->c_in),
                static_cast<int>(data->k));
    return kTfLiteError;
  }
  if (data->policy == kTraversal) {
    const TfLiteEvalTensor* step = check.Input("input 2 (step)", kStepTensor, kTfLiteInt32, -1);
    if (!check.ok()) return kTfLiteError;
    if (NumElements(step) != 1) {
      MicroPrintf("%s: input 2 (step) must hold one int32 (a variable tensor)", kOp);
      return kTfLiteError;
    }
  } else if (MicroContextRequestScratchBufferInArena(
                 context, static_cast<size_t>(data->c_in) * sizeof(float), &data->scratch) !=
             kTfLiteOk) {
    MicroPrintf("%s: cannot get a scratch buffer of %d floats", kOp, static_cast<int>(data->c_in));
    return kTfLiteError;
  }
  return kTfLiteOk;
}

TfLiteStatus Eval(TfLiteContext* context, TfLiteNode* node) {
  const auto* data = static_cast<const OpData*>(node->user_data);
  auto* kept = static_cast<int32_t*>(GetEvalOutput(context, node, kKeptTensor)->data.data);
  if (data->policy == kTraversal) {
    auto* step = static_cast<int32_t*>(GetEvalInput(context, node, kStepTensor)->data.data);
    int32_t s = *step;
    if (s < 0 || s >= data->c_in) s = 0;  // a fresh or damaged counter restarts the sweep
    dgst_select_traversal(s, data->c_in, data->k, kept);
    *step = (s + 1) % data->c_in;
    return kTfLiteOk;
  }
  auto* norms = static_cast<float*>(MicroContextGetScratchBuffer(context, data->scratch));
  dgst_select_magnitude_s8(
      static_cast<const int8_t*>(GetEvalInput(context, node, kWeightsTensor)->data.data),
      static_cast<const float*>(GetEvalInput(context, node, kWeightScaleTensor)->data.data),
      data->c_out, data->taps, data->c_in, data->kind == 1, data->k, norms,
                           kept);
  return kTfLiteOk;
}

}  // namespace

DGST_REGISTER_OP(DGST_SELECT_CHANNELS, Init, Prepare, Eval, nullptr);
