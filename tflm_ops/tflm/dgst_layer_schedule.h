// The layer schedule (layers_per_step) as the ops of one weight-updated layer see it:
// DGST_SELECT_CHANNELS (traversal), DGST_CONV2D_WEIGHT_GRAD, DGST_DEPTHWISE_WEIGHT_GRAD and
// DGST_SGD_QAS_UPDATE (weights). A scheduled op's custom options end with 3 more words
//   [layer (0-based), layers, per_step]
// and it reads the graph's int32 step counter (the variable sgd/step, advanced once per
// step by the last DGST_SGD_QAS_UPDATE) as one more input. When dgst_layer_active(step,
// layer, layers, per_step) is 0 the layer's weights are not updated this step: the weight
// gradient is not computed (its output is left unwritten; its only reader, the update,
// skips too), the update leaves the weights alone and the selection marks nothing visited.
// Header-only; every function is inline.
#ifndef DGST_LAYER_SCHEDULE_H_
#define DGST_LAYER_SCHEDULE_H_

#include <cstring>

#include "../core/dgst_train_kernels.h"
#include "dgst_tflm_abi.h"

namespace dgst_tflm {

constexpr int32_t kScheduleWords = 3;
// uint8 fields: they fit in the padding after an OpData's leading bool, so a schedule adds
// no arena bytes (persistent buffers are 16-byte aligned); hence at most 255 layers.
constexpr int32_t kMaxScheduledLayers = 255;

// Lives right after `bool options_ok` in an OpData; all zero (off) unless options set it.
struct LayerSchedule {
  uint8_t layer, layers, per_step;
  bool on() const { return layers != 0; }
};

// The option words that follow an op's own `words` of `length` bytes: absent (off) or the
// 3 schedule words, checked. Returns false after an error naming `op`.
inline bool ReadLayerSchedule(const char* op, const char* buffer, size_t length,
                              int32_t words, LayerSchedule* schedule) {
  *schedule = LayerSchedule{};
  if (length != sizeof(int32_t) * static_cast<size_t>(words + kScheduleWords)) return true;
  int32_t o[kScheduleWords];
  std::memcpy(o, buffer + sizeof(int32_t) * words, sizeof(o));
  if (o[1] < 1 || o[1] > kMaxScheduledLayers || o[0] < 0 || o[0] >= o[1] || o[2] < 1 ||
      o[2] >= o[1]) {
    MicroPrintf("%s: invalid layer schedule: layer %d of %d (at most %d), %d per step (need "
                "0 <= layer < layers and 1 <= per_step < layers)", op, static_cast<int>(o[0]),
                static_cast<int>(o[1]), static_cast<int>(kMaxScheduledLayers),
                static_cast<int>(o[2]));
    return false;
  }
  schedule->layer = static_cast<uint8_t>(o[0]);
  schedule->layers = static_cast<uint8_t>(o[1]);
  schedule->per_step = static_cast<uint8_t>(o[2]);
  return true;
}

// Prepare: the step counter input `index` is an int32 variable holding one value.
inline bool CheckStepInput(const char* op, NodeTensorChecker* check, int index) {
  using namespace ::tflite::micro;  // the kTfLite* types in pip mode (global in TFLM)
  const DGST_TFLM_TYPE(TfLiteEvalTensor)* step =
      check->Input("the step counter input", index, kTfLiteInt32, 1);
  if (!check->ok()) return false;
  if (NumElements(step) != 1) {
    MicroPrintf("%s: the step counter input %d must hold one int32, got %d", op, index,
                NumElements(step));
    return false;
  }
  return true;
}

// Eval: does the layer update its weights at the step in input `step_index`?
inline bool LayerActive(const DGST_TFLM_TYPE(TfLiteContext) * context,
                        const DGST_TFLM_TYPE(TfLiteNode) * node, int step_index,
                        const LayerSchedule& schedule) {
  if (!schedule.on()) return true;
  const auto* step = static_cast<const int32_t*>(
      ::tflite::micro::GetEvalInput(context, node, step_index)->data.data);
  return dgst_layer_active(static_cast<uint32_t>(*step), schedule.layer, schedule.layers,
                           schedule.per_step) != 0;
}

}  // namespace dgst_tflm

#endif  // DGST_LAYER_SCHEDULE_H_
