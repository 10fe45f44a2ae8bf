// The training state of a MicroInterpreter kept in flash (weight_store.h): every variable
// tensor of subgraph 0 (trainable weights and biases, the on-device selection's visited
// bitmasks, the step counter sgd/step), in tensor-index order.
//
//   static dgst_state::StateResolver resolver(ops);   // the model's ops, then:
//   dgst_state::Interpreter interpreter(model, resolver, arena, size);
//   interpreter.AllocateTensors();
//   dgst_state::TrainState state;
//   state.Collect(model, interpreter);
//   ws_open(&store, &flash, state.layout(), state.bytes());
//   if (ws_load(&store, state.segments(), state.count()) == 1) resolver.KeepRestored();
//
// DGST_VARIABLE_INIT copies each trainable tensor's initial value into it on the first
// Invoke; once the state came from flash, StateResolver's DGST_VARIABLE_INIT does nothing.
#ifndef DGST_TRAIN_STATE_H_
#define DGST_TRAIN_STATE_H_

#include <stdint.h>

#include "tensorflow/lite/micro/micro_interpreter.h"
#include "tensorflow/lite/micro/micro_op_resolver.h"
#include "weight_store.h"

#ifndef DGST_MAX_STATE_TENSORS
#define DGST_MAX_STATE_TENSORS 160
#endif

namespace dgst_state {

// A MicroInterpreter that gives the eval tensor of any tensor index of subgraph 0 (TFLM
// keeps its context protected; variable tensors have their own arena memory, so their
// pointers stay valid after AllocateTensors).
class Interpreter : public tflite::MicroInterpreter {
 public:
  using tflite::MicroInterpreter::MicroInterpreter;
  TfLiteEvalTensor* Tensor(int index) const {
    return context().GetEvalTensor(&context(), index);
  }
};

class TrainState {
 public:
  // The variable tensors of subgraph 0 (after AllocateTensors); false if there are more
  // than DGST_MAX_STATE_TENSORS or one has no data.
  bool Collect(const tflite::Model* model, const Interpreter& interpreter);
  const ws_segment* segments() const { return segments_; }
  uint32_t count() const { return count_; }
  uint32_t bytes() const { return bytes_; }
  int tensor(uint32_t i) const { return tensors_[i]; }
  // CRC-32 of (tensor index, type, bytes) of every state tensor: a store written by another
  // model is not loaded.
  uint32_t layout() const { return layout_; }

 private:
  ws_segment segments_[DGST_MAX_STATE_TENSORS];
  int tensors_[DGST_MAX_STATE_TENSORS];
  uint32_t count_ = 0;
  uint32_t bytes_ = 0;
  uint32_t layout_ = 0;
};

// The ops of `ops`, with a DGST_VARIABLE_INIT that is skipped after KeepRestored().
class StateResolver : public tflite::MicroOpResolver {
 public:
  explicit StateResolver(const tflite::MicroOpResolver& ops) : ops_(ops) {}
  const TFLMRegistration* FindOp(tflite::BuiltinOperator op) const override {
    return ops_.FindOp(op);
  }
  const TFLMRegistration* FindOp(const char* op) const override;
  tflite::TfLiteBridgeBuiltinParseFunction GetOpDataParser(
      tflite::BuiltinOperator op) const override {
    return ops_.GetOpDataParser(op);
  }
  // The variables hold a restored state: DGST_VARIABLE_INIT must not overwrite them.
  void KeepRestored();

 private:
  const tflite::MicroOpResolver& ops_;
  mutable TFLMRegistration variable_init_ = {};
};

}  // namespace dgst_state

#endif  // DGST_TRAIN_STATE_H_
