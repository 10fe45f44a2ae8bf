// DGST_VARIABLE_INIT: copy a constant into a variable tensor once (after every interpreter
// init or reset), so that trainable weights start from their trained values.
//
// TFLM allocates variable tensors in the arena and resets them to zero (int8: the zero
// point); it never copies their flatbuffer data. Put this op first in the graph, before any
// op reads the variable.
//   inputs:  0 variable  (is_variable, any type)   destination, written on the first Eval
//            1 initial   (constant, same type and element count)
//   outputs: none
//   custom options: none, or the int32 array [1] (format version).
#include <string.h>

#include "dgst_tflm_abi.h"

namespace {

using namespace tflite::micro;
using namespace dgst_tflm;

constexpr const char* kOp = "DGST_VARIABLE_INIT";
constexpr int kVariableTensor = 0;
constexpr int kInitialTensor = 1;

struct OpData {
  bool options_ok;
  bool done;
  size_t bytes;
};

int ElementSize(int type) {
  switch (type) {
    case kTfLiteInt8: case kTfLiteUInt8: case kTfLiteBool: return 1;
    case kTfLiteInt16: return 2;
    case kTfLiteInt32: case kTfLiteFloat32: return 4;
    case kTfLiteInt64: return 8;
    default: return 0;
  }
}

void* Init(TfLiteContext* context, const char* buffer, size_t length) {
  return InitVersionOnly<OpData>(kOp, context, buffer, length);
}

void Reset(TfLiteContext*, void* buffer) {
  if (buffer != nullptr) static_cast<OpData*>(buffer)->done = false;  // variables were zeroed
}

TfLiteStatus Prepare(TfLiteContext* context, TfLiteNode* node) {
  auto* data = PreparedOpData<OpData>(node);
  if (data == nullptr) return kTfLiteError;
  if (!CheckArity(kOp, node, 2, 0)) return kTfLiteError;
  const TfLiteEvalTensor* variable = GetEvalInput(context, node, kVariableTensor);
  const TfLiteEvalTensor* initial = GetEvalInput(context, node, kInitialTensor);
  if (variable == nullptr || initial == nullptr) {
    MicroPrintf("%s: inputs 0 (variable) and 1 (initial) are required", kOp);
    return kTfLiteError;
  }
  const int size = ElementSize(variable->type);
  if (size == 0 || variable->type != initial->type ||
      NumElements(variable) != NumElements(initial)) {
    MicroPrintf("%s: input 1 (initial) must match input 0 (variable): got %s x %d and %s x %d "
                "(supported types: int8, uint8, int16, int32, int64, float32)", kOp,
                TypeName(initial->type), NumElements(initial), TypeName(variable->type),
                NumElements(variable));
    return kTfLiteError;
  }
  data->bytes = static_cast<size_t>(NumElements(variable)) * size;
  return kTfLiteOk;
}

TfLiteStatus Eval(TfLiteContext* context, TfLiteNode* node) {
  auto* data = static_cast<OpData*>(node->user_data);
  if (data->done) return kTfLiteOk;
  const TfLiteEvalTensor* variable = GetEvalInput(context, node, kVariableTensor);
  const TfLiteEvalTensor* initial = GetEvalInput(context, node, kInitialTensor);
  memcpy(variable->data.data, initial->data.data, data->bytes);
  data->done = true;
  return kTfLiteOk;
}

}  // namespace

DGST_REGISTER_OP(DGST_VARIABLE_INIT, Init, Prepare, Eval, Reset);
