// DGST_SCATTER_CHANNELS: a full weight tensor assembled from the read-only one (flash) and the
// trained weights of the kept input channels (RAM), just before a conv or an input gradient
// reads it; the result is a temporary the TFLM planner reuses. The inverse of
// DGST_GATHER_CHANNELS.
//
//   inputs:  0 base  int8  [..., channels]   e.g. a conv kernel OHWI [C_out, KH, KW, C_in]
//            1 src   int8  [..., k]          same leading dimensions (the kept channels' values)
//            2 kept  int32 [k]               channel indices (range-checked in Eval)
//   outputs: 0 out   int8  shape of base: base with out[..., kept[j]] = src[..., j]
//   custom options: none, or the int32 array [1] (format version).
// Calls dgst_scatter_channels_s8 from tflm_ops/core.
#include "../core/dgst_train_kernels.h"
#include "dgst_tflm_abi.h"

namespace {

using namespace tflite::micro;
using namespace dgst_tflm;

constexpr const char* kOp = "DGST_SCATTER_CHANNELS";
constexpr int kBaseTensor = 0;
constexpr int kSrcTensor = 1;
constexpr int kKeptTensor = 2;
constexpr int kOutTensor = 0;  // output

struct OpData {
  bool options_ok;
  int32_t rows, channels, k;
};

void* Init(TfLiteContext* context, const char* buffer, size_t length) {
  return InitVersionOnly<OpData>(kOp, context, buffer, length);
}

TfLiteStatus Prepare(TfLiteContext* context, TfLiteNode* node) {
  auto* data = PreparedOpData<OpData>(node);
  if (data == nullptr) return kTfLiteError;
  NodeTensorChecker check(kOp, context, node, 3, 1);
  const TfLiteEvalTensor* base = check.Input("input 0 (base)", kBaseTensor, kTfLiteInt8, -1);
  const TfLiteEvalTensor* src = check.Input("input 1 (src)", kSrcTensor, kTfLiteInt8, -1);
  const TfLiteEvalTensor* kept = check.Input("input 2 (kept)", kKeptTensor, kTfLiteInt32, 1);
  const TfLiteEvalTensor* out = check.Output("output 0 (out)", kOutTensor, kTfLiteInt8, -1);
  if (!check.ok()) return kTfLiteError;
  data->channels = Dim(base, -1);
  data->k = Dim(kept, 0);
  bool ok = Rank(base) >= 1 && Rank(src) == Rank(base) && Rank(out) == Rank(base) &&
            Dim(src, -1) == data->k && data->k >= 1 && data->k <= data->channels;
  for (int i = 0; ok && i < Rank(base); ++i) {
    ok = Dim(out, i) == Dim(base, i) && (i + 1 == Rank(base) || Dim(src, i) == Dim(base, i));
  }
  if (!ok) {
    MicroPrintf("%s: input 1 (src) must have base's shape with the last dimension %d (the "
                "length of kept, 1..%d) and output 0 base's shape; got ranks %d, %d, %d and "
                "last dimensions %d, %d, %d", kOp, static_cast<int>(data->k),
                static_cast<int>(data->channels), Rank(base), Rank(src), Rank(out),
                Dim(base, -1), Dim(src, -1), Dim(out, -1));
    return kTfLiteError;
  }
  data->rows = data->channels > 0 ? NumElements(base) / data->channels : 0;
  return kTfLiteOk;
}

TfLiteStatus Eval(TfLiteContext* context, TfLiteNode* node) {
  const auto* data = static_cast<const OpData*>(node->user_data);
  const auto* kept =
      static_cast<const int32_t*>(GetEvalInput(context, node, kKeptTensor)->data.data);
  if (!KeptInRange(kOp, kept, data->k, data->channels)) return kTfLiteError;
  dgst_scatter_channels_s8(
      static_cast<const int8_t*>(GetEvalInput(context, node, kBaseTensor)->data.data),
      static_cast<const int8_t*>(GetEvalInput(context, node, kSrcTensor)->data.data), data->rows,
      data->channels, kept, data->k,
      static_cast<int8_t*>(GetEvalOutput(context, node, kOutTensor)->data.data));
  return kTfLiteOk;
}

}  // namespace

DGST_REGISTER_OP(DGST_SCATTER_CHANNELS, Init, Prepare, Eval, nullptr);
