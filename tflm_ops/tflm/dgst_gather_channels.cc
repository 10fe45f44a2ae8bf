// DGST_GATHER_CHANNELS: keep only the selected channels of an int8 activation (the saved
// input of a layer whose weights are updated for k input channels), in the forward pass.
//
//   inputs:  0 x     int8  [..., channels]   channels last (e.g. [1, H, W, C])
//            1 kept  int32 [k]               channel indices (runtime: a constant for a static
//                                            selection, a variable for a dynamic one)
//   outputs: 0 out   int8  [..., k]          same leading dimensions as x
//   custom options: none, or the int32 array [1] (format version).
// Calls dgst_gather_channels_s8 from tflm_ops/core.
#include "../core/dgst_train_kernels.h"
#include "dgst_tflm_abi.h"

namespace {

using namespace tflite::micro;
using namespace dgst_tflm;

constexpr const char* kOp = "DGST_GATHER_CHANNELS";
constexpr int kXTensor = 0;
constexpr int kKeptTensor = 1;
constexpr int kOutTensor = 0;  // output

struct OpData {
  bool options_ok;
  int32_t pixels, channels, k;
};

void* Init(TfLiteContext* context, const char* buffer, size_t length) {
  return InitVersionOnly<OpData>(kOp, context, buffer, length);
}

TfLiteStatus Prepare(TfLiteContext* context, TfLiteNode* node) {
  auto* data = PreparedOpData<OpData>(node);
  if (data == nullptr) return kTfLiteError;
  NodeTensorChecker check(kOp, context, node, 2, 1);
  const TfLiteEvalTensor* x = check.Input("input 0 (x)", kXTensor, kTfLiteInt8, -1);
  const TfLiteEvalTensor* kept = check.Input("input 1 (kept)", kKeptTensor, kTfLiteInt32, 1);
  const TfLiteEvalTensor* out = check.Output("output 0 (out)", kOutTensor, kTfLiteInt8, -1);
  if (!check.ok()) return kTfLiteError;
  data->channels = Dim(x, -1);
  data->k = Dim(kept, 0);
  bool ok = Rank(x) >= 1 && Rank(out) == Rank(x) && Dim(out, -1) == data->k &&
            data->k >= 1 && data->k <= data->channels;
  for (int i = 0; ok && i + 1 < Rank(x); ++i) ok = Dim(out, i) == Dim(x, i);
  if (!ok) {
    MicroPrintf("%s: output 0 (out) must have x's shape with the last dimension %d (the "
                "length of kept, 1..%d); got rank %d with last dimension %d (x rank %d)",
                kOp, static_cast<int>(data->k), static_cast<int>(data->channels), Rank(out),
                Dim(out, -1), Rank(x));
    return kTfLiteError;
  }
  data->pixels = data->channels > 0 ? NumElements(x) / data->channels : 0;
  return kTfLiteOk;
}

TfLiteStatus Eval(TfLiteContext* context, TfLiteNode* node) {
  const auto* data = static_cast<const OpData*>(node->user_data);
  const auto* kept =
      static_cast<const int32_t*>(GetEvalInput(context, node, kKeptTensor)->data.data);
  if (!KeptInRange(kOp, kept, data->k, data->channels)) return kTfLiteError;
  dgst_gather_channels_s8(
      static_cast<const int8_t*>(GetEvalInput(context, node, kXTensor)->data.data),
      data->pixels, data->channels, kept, data->k,
      static_cast<int8_t*>(GetEvalOutput(context, node, kOutTensor)->data.data));
  return kTfLiteOk;
}

}  // namespace

DGST_REGISTER_OP(DGST_GATHER_CHANNELS, Init, Prepare, Eval, nullptr);
