// The training state of a MicroInterpreter in flash: see train_state.h.
#include "train_state.h"

#include <string.h>

#include "tensorflow/lite/micro/memory_helpers.h"

namespace dgst_state {
namespace {

// One interpreter per firmware: the original DGST_VARIABLE_INIT and whether to skip it.
TfLiteStatus (*g_variable_init)(TfLiteContext*, TfLiteNode*) = nullptr;
bool g_restored = false;

TfLiteStatus VariableInitUnlessRestored(TfLiteContext* context, TfLiteNode* node) {
  return g_restored ? kTfLiteOk : g_variable_init(context, node);
}

uint32_t AddWord(uint32_t crc, uint32_t word) {
  const uint8_t bytes[4] = {static_cast<uint8_t>(word), static_cast<uint8_t>(word >> 8),
                            static_cast<uint8_t>(word >> 16),
                            static_cast<uint8_t>(word >> 24)};
  return ws_crc32(crc, bytes, 4);
}

}  // namespace

bool TrainState::Collect(const tflite::Model* model, const Interpreter& interpreter) {
  const auto* tensors = model->subgraphs()->Get(0)->tensors();
  count_ = bytes_ = layout_ = 0;
  for (uint32_t i = 0; tensors != nullptr && i < tensors->size(); ++i) {
    if (!tensors->Get(i)->is_variable()) continue;
    TfLiteEvalTensor* tensor = interpreter.Tensor(static_cast<int>(i));
    size_t length = 0;
    if (count_ == DGST_MAX_STATE_TENSORS || tensor == nullptr || tensor->data.raw == nullptr ||
        tflite::TfLiteEvalTensorByteLength(tensor, &length) != kTfLiteOk) {
      return false;
    }
    segments_[count_] = {tensor->data.raw, static_cast<uint32_t>(length)};
    tensors_[count_] = static_cast<int>(i);
    layout_ = AddWord(AddWord(AddWord(layout_, i), static_cast<uint32_t>(tensor->type)),
                      static_cast<uint32_t>(length));
    bytes_ += static_cast<uint32_t>(length);
    ++count_;
  }
  return true;
}

const TFLMRegistration* StateResolver::FindOp(const char* op) const {
  const TFLMRegistration* registration = ops_.FindOp(op);
  if (registration == nullptr || strcmp(op, "DGST_VARIABLE_INIT") != 0) return registration;
  variable_init_ = *registration;
  g_variable_init = registration->invoke;
  variable_init_.invoke = VariableInitUnlessRestored;
  return &variable_init_;
}

void StateResolver::KeepRestored() { g_restored = true; }

}  // namespace dgst_state
