// DGST_SELECT_CHANNELS: the dynamic channel selection of a weight-updated layer, evaluated
// on device at the start of every training step.
//
//   inputs:  0 w             int8 weights, as the layer uses them (usually the variable):
//                              kind 0: [c_out, kh, kw, c_in] (OHWI) or Dense [c_out, c_in]
//                              kind 1: depthwise [1, kh, kw, channels]
//            1 importance    int32 [c_out] (depthwise: [channels]): the integer score
//                            multipliers m (traversal, magnitude); or float32 weight scales
//                            (magnitude with float norms, graphs written before m existed;
//                            unused by window)
//            2 state         a variable updated in place, persisting across Invokes:
//                              traversal: uint8 [ceil(c_in / 8)], the visited bitmask
//                              window: int32 [1], the step counter (mod c_in)
//                              magnitude: omitted (-1)
//            3 step          traversal with a layer schedule only: the int32 [1] variable
//                            sgd/step (dgst_layer_schedule.h)
//   outputs: 0 kept          int32 [k]: the channels to update this step, increasing
//   custom options (little-endian int32 x 3, or x 6 with a layer schedule):
//     [1 (format version), policy (0 window, 1 magnitude, 2 traversal), kind (0 conv/dense,
//      1 depthwise)(, layer, layers, per_step)]
// A layer the schedule leaves out this step gets the same choice, marked nowhere.
// traversal (DGSU, Li & Chang 2024): unvisited channels first, then by integer importance
// (ties: lower index); a sweep restarts once all are visited. magnitude: top-k importance of
// the current (updated) weights. window: k channels from (step * k) mod c_in. Formulas in
// dgst_train_kernels.h. Scratch (arena, non-persistent): c_in int64 scores (float32 norms
// for the float magnitude). Policy 0 keeps the meaning it had as "traversal" in older graphs.
#include "../core/dgst_train_kernels.h"
#include "dgst_layer_schedule.h"
#include "dgst_tflm_abi.h"

namespace {

using namespace tflite::micro;
using namespace dgst_tflm;

constexpr const char* kOp = "DGST_SELECT_CHANNELS";
constexpr int kWeightsTensor = 0;
constexpr int kImportanceTensor = 1;
constexpr int kStateTensor = 2;  // a variable: visited bitmask (traversal) or step (window)
constexpr int kStepTensor = 3;   // with a layer schedule: sgd/step
constexpr int kKeptTensor = 0;  // output
constexpr int32_t kOptionWords = 3;
enum Policy { kWindow = 0, kMagnitude = 1, kTraversal = 2 };

struct OpData {
  bool options_ok;
  LayerSchedule schedule;  // in the padding after options_ok
  int32_t policy, kind;
  int32_t c_out, taps, c_in, k;
  bool float_scale;  // magnitude from float32 weight scales (older graphs)
  int scratch;
};

void* Init(TfLiteContext* context, const char* buffer, size_t length) {
  auto* data = NewOpData<OpData>(context);
  if (data == nullptr) return nullptr;
  int32_t o[kOptionWords];
  const bool scheduled = length == sizeof(int32_t) * (kOptionWords + kScheduleWords);
  data->options_ok =
      ReadOptions(kOp, buffer, scheduled ? sizeof(int32_t) * kOptionWords : length, o,
                  kOptionWords) &&
      ReadLayerSchedule(kOp, buffer, length, kOptionWords, &data->schedule);
  if (!data->options_ok) return data;
  data->policy = o[1];
  data->kind = o[2];
  data->scratch = -1;
  if (o[1] < kWindow || o[1] > kTraversal || o[2] < 0 || o[2] > 1) {
    MicroPrintf("%s: invalid options: policy %d (0 window, 1 magnitude, 2 traversal), kind %d (0 "
                "conv/dense, 1 depthwise)", kOp, static_cast<int>(o[1]), static_cast<int>(o[2]));
    data->options_ok = false;
  }
  if (data->schedule.on() && o[1] != kTraversal) {
    MicroPrintf("%s: a layer schedule needs policy 2 (traversal), got policy %d", kOp,
                static_cast<int>(o[1]));
    data->options_ok = false;
  }
  return data;
}

// The state variable of traversal (the visited bitmask) or window (the step counter).
bool CheckState(NodeTensorChecker& check, const OpData* data) {
  if (data->policy == kMagnitude) return true;
  const bool window = data->policy == kWindow;
  const TfLiteEvalTensor* state =
      check.Input(window ? "input 2 (step)" : "input 2 (visited)", kStateTensor,
                  window ? kTfLiteInt32 : kTfLiteUInt8, -1);
  if (!check.ok()) return false;
  const int want = window ? 1 : (data->c_in + 7) / 8;
  if (NumElements(state) != want) {
    MicroPrintf("%s: input 2 (%s) must be a variable of %d values, has %d", kOp,
                window ? "step" : "visited bitmask", want, NumElements(state));
    return false;
  }
  return true;
}

TfLiteStatus Prepare(TfLiteContext* context, TfLiteNode* node) {
  auto* data = PreparedOpData<OpData>(node);
  if (data == nullptr) return kTfLiteError;
  NodeTensorChecker check(kOp, context, node, data->schedule.on() ? 4 : 3, 1);
  const TfLiteEvalTensor* w = check.Input("input 0 (w)", kWeightsTensor, kTfLiteInt8, -1);
  const TfLiteEvalTensor* kept = check.Output("output 0 (kept)", kKeptTensor, kTfLiteInt32, 1);
  if (!check.ok()) return kTfLiteError;
  const TfLiteEvalTensor* importance = GetEvalInput(context, node, kImportanceTensor);
  data->float_scale = importance != nullptr && importance->type == kTfLiteFloat32;
  if (data->policy == kTraversal && data->float_scale) {
    MicroPrintf("%s: traversal needs int32 importance multipliers (input 1), got float32", kOp);
    return kTfLiteError;
  }
  importance = check.Input("input 1 (importance)", kImportanceTensor,
                           data->float_scale ? kTfLiteFloat32 : kTfLiteInt32, 1);
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
  if (Dim(importance, 0) != data->c_out || data->k < 1 || data->k > data->c_in) {
    MicroPrintf("%s: input 1 must have %d values (has %d) and kept 1..%d channels (has %d)",
                kOp, static_cast<int>(data->c_out), Dim(importance, 0),
                static_cast<int>(data->c_in), static_cast<int>(data->k));
    return kTfLiteError;
  }
  if (!CheckState(check, data)) return kTfLiteError;
  if (data->schedule.on() && !CheckStepInput(kOp, &check, kStepTensor)) return kTfLiteError;
  if (data->policy == kWindow) return kTfLiteOk;
  const size_t bytes = static_cast<size_t>(data->c_in) *
                       (data->float_scale ? sizeof(float) : sizeof(int64_t));
  if (MicroContextRequestScratchBufferInArena(context, bytes, &data->scratch) != kTfLiteOk) {
    MicroPrintf("%s: cannot get a scratch buffer of %d bytes", kOp, static_cast<int>(bytes));
    return kTfLiteError;
  }
  return kTfLiteOk;
}

TfLiteStatus Eval(TfLiteContext* context, TfLiteNode* node) {
  const auto* data = static_cast<const OpData*>(node->user_data);
  auto* kept = static_cast<int32_t*>(GetEvalOutput(context, node, kKeptTensor)->data.data);
  if (data->policy == kWindow) {
    auto* step = static_cast<int32_t*>(GetEvalInput(context, node, kStateTensor)->data.data);
    int32_t s = *step;
    if (s < 0 || s >= data->c_in) s = 0;  // a fresh or damaged counter restarts the sweep
    dgst_select_window(s, data->c_in, data->k, kept);
    *step = (s + 1) % data->c_in;
    return kTfLiteOk;
  }
  const auto* w =
      static_cast<const int8_t*>(GetEvalInput(context, node, kWeightsTensor)->data.data);
  const void* importance = GetEvalInput(context, node, kImportanceTensor)->data.data;
  void* scratch = MicroContextGetScratchBuffer(context, data->scratch);
  if (data->float_scale) {
    dgst_select_magnitude_s8(w, static_cast<const float*>(importance), data->c_out, data->taps,
                             data->c_in, data->kind == 1, data->k,
                             static_cast<float*>(scratch), kept);
    return kTfLiteOk;
  }
  auto* scores = static_cast<int64_t*>(scratch);
  dgst_channel_scores_s8(w, static_cast<const int32_t*>(importance), data->c_out, data->taps,
                         data->c_in, data->kind == 1, scores);
  uint8_t* visited = data->policy == kTraversal
      ? static_cast<uint8_t*>(GetEvalInput(context, node, kStateTensor)->data.data) : nullptr;
  dgst_select_ranked_scheduled(scores, data->c_in, data->k, visited,
                               LayerActive(context, node, kStepTensor, data->schedule), kept);
  return kTfLiteOk;
}

}  // namespace

DGST_REGISTER_OP(DGST_SELECT_CHANNELS, Init, Prepare, Eval, nullptr);
