// DGST_FUSED_BLOCK: a frozen conv -> depthwise -> 1x1 projection (an inverted-residual block
// of MobileNetV2 without its ADD, or the first conv with block 0) in one op that keeps only a
// few rows of the expanded activation (dgst_fused_block_s8). The exporter replaces the three
// builtin ops by it in front of the first updated layer; outputs are bit-identical.
// The requantization multipliers and shifts are constant inputs (flash), not per-op data.
//
//   inputs (int8 activations and weights; per stage one int32 [3, channels] tensor whose rows
//   are the bias, the multiplier and the shift: one tensor rather than three saves TFLM's
//   per-tensor structs):
//     0 x [1, in_h, in_w, in_c]
//     1 conv weights [mid_c, k_h, k_w, in_c]    2 conv requant [3, mid_c]
//     3 dw weights   [1, d_h, d_w, mid_c]       4 dw requant   [3, mid_c]
//     5 proj weights [out_c, 1, 1, mid_c]       6 proj requant [3, out_c]
//   outputs: 0 y [1, out_h, out_w, out_c]
//   custom options (little-endian int32 x 21):
//     [1 (format version), mid_h, mid_w, conv stride_h, stride_w, pad_top, pad_left,
//      dw stride_h, stride_w, pad_top, pad_left, zero points of x, conv output, dw output
//      and y, then act_min/act_max of the conv, the dw and the projection]
#include "../core/dgst_train_kernels.h"
#include "dgst_tflm_abi.h"
#include "dgst_tflm_geometry.h"

namespace {

using namespace tflite::micro;
using namespace dgst_tflm;

constexpr const char* kOp = "DGST_FUSED_BLOCK";
constexpr int32_t kOptionWords = 21;
constexpr int kStages = 3;
const char* const kStageNames[kStages] = {"conv", "depthwise", "projection"};
constexpr int kXTensor = 0;
constexpr int kYTensor = 0;  // output
// Stage s (0 conv, 1 depthwise, 2 projection) has its weights at input 1 + 2s and its
// requantization at input 2 + 2s.
constexpr int WeightsTensor(int stage) { return 1 + 2 * stage; }
constexpr int RequantTensor(int stage) { return 2 + 2 * stage; }

struct OpData {
  bool options_ok;
  dgst_fused_block_geometry geometry;
  int32_t zero_point[4];  // x, conv output, dw output, y
  int32_t act[kStages][2];
  int scratch;
};

void* Init(TfLiteContext* context, const char* buffer, size_t length) {
  auto* data = NewOpData<OpData>(context);
  if (data == nullptr) return nullptr;
  int32_t o[kOptionWords];
  data->options_ok = ReadOptions(kOp, buffer, length, o, kOptionWords);
  if (!data->options_ok) return data;
  dgst_fused_block_geometry& g = data->geometry;
  g.mid_h = o[1];
  g.mid_w = o[2];
  g.conv_stride_h = o[3];
  g.conv_stride_w = o[4];
  g.conv_pad_top = o[5];
  g.conv_pad_left = o[6];
  g.dw_stride_h = o[7];
  g.dw_stride_w = o[8];
  g.dw_pad_top = o[9];
  g.dw_pad_left = o[10];
  bool ok = o[1] >= 1 && o[2] >= 1 && o[3] >= 1 && o[4] >= 1 && o[5] >= 0 && o[6] >= 0 &&
            o[7] >= 1 && o[8] >= 1 && o[9] >= 0 && o[10] >= 0;
  for (int i = 0; i < 4; ++i) {
    data->zero_point[i] = o[11 + i];
    ok = ok && o[11 + i] >= -128 && o[11 + i] <= 127;
  }
  for (int s = 0; s < kStages; ++s) {
    data->act[s][0] = o[15 + 2 * s];
    data->act[s][1] = o[16 + 2 * s];
    ok = ok && o[15 + 2 * s] >= -128 && o[15 + 2 * s] <= o[16 + 2 * s] && o[16 + 2 * s] <= 127;
  }
  if (!ok) {
    MicroPrintf("%s: invalid options: conv output %dx%d, strides %dx%d and %dx%d (must be >= 1), "
                "paddings %d,%d and %d,%d (must be >= 0), zero points %d %d %d %d (int8), "
                "activation ranges [%d, %d] [%d, %d] [%d, %d] (int8, min <= max)", kOp, o[1],
                o[2], o[3], o[4], o[7], o[8], o[5], o[6], o[9], o[10], o[11], o[12], o[13], o[14],
                o[15], o[16], o[17], o[18], o[19], o[20]);
    data->options_ok = false;
  }
  return data;
}

// The weights (int8 rank 4) and requantization (int32 [3, channels]) of stage s.
bool CheckStage(TfLiteContext* context, TfLiteNode* node, int s, int32_t channels) {
  const int index = RequantTensor(s);
  if (CheckedInput(kOp, "weights", context, node, WeightsTensor(s), kTfLiteInt8, 4) == nullptr)
    return false;
  const TfLiteEvalTensor* q = CheckedInput(kOp, "requant", context, node, index, kTfLiteInt32, 2);
  if (q == nullptr) return false;
  if (Dim(q, 0) != 3 || Dim(q, 1) != channels) {
    MicroPrintf("%s: input %d (%s requant: bias, multiplier, shift) must have shape [3, %d], "
                "got [%d, %d]", kOp, index, kStageNames[s], static_cast<int>(channels),
                Dim(q, 0), Dim(q, 1));
    return false;
  }
  return true;
}

TfLiteStatus Prepare(TfLiteContext* context, TfLiteNode* node) {
  auto* data = PreparedOpData<OpData>(node);
  if (data == nullptr) return kTfLiteError;
  NodeTensorChecker check(kOp, context, node, 1 + 2 * kStages, 1);
  const TfLiteEvalTensor* x = check.Input("input 0 (x)", kXTensor, kTfLiteInt8, 4);
  const TfLiteEvalTensor* y = check.Output("output 0 (y)", kYTensor, kTfLiteInt8, 4);
  if (!check.ok()) return kTfLiteError;
  const TfLiteEvalTensor* w1 = GetEvalInput(context, node, WeightsTensor(0));
  const TfLiteEvalTensor* w2 = GetEvalInput(context, node, WeightsTensor(1));
  const TfLiteEvalTensor* w3 = GetEvalInput(context, node, WeightsTensor(2));
  if (w1 == nullptr || w2 == nullptr || w3 == nullptr || Rank(w1) != 4 || Rank(w2) != 4 ||
      Rank(w3) != 4) {
    MicroPrintf("%s: inputs 1, 3 and 5 (weights) must have rank 4", kOp);
    return kTfLiteError;
  }
  dgst_fused_block_geometry& g = data->geometry;
  g.in_h = Dim(x, 1);
  g.in_w = Dim(x, 2);
  g.in_c = Dim(x, 3);
  g.mid_c = Dim(w1, 0);
  g.conv_h = Dim(w1, 1);
  g.conv_w = Dim(w1, 2);
  g.dw_h = Dim(w2, 1);
  g.dw_w = Dim(w2, 2);
  g.out_h = Dim(y, 1);
  g.out_w = Dim(y, 2);
  g.out_c = Dim(y, 3);
  if (!CheckBatchOne(kOp, x, y)) return kTfLiteError;
  if (Dim(w1, 3) != g.in_c || Dim(w2, 0) != 1 || Dim(w2, 3) != g.mid_c ||
      Dim(w3, 0) != g.out_c || Dim(w3, 1) != 1 || Dim(w3, 2) != 1 || Dim(w3, 3) != g.mid_c) {
    MicroPrintf("%s: weight shapes do not chain: x has %d channels, conv [%d, %d, %d, %d], "
                "depthwise [%d, %d, %d, %d] (must be [1, kh, kw, %d]), projection [%d, %d, %d, "
                "%d] (must be [%d, 1, 1, %d])", kOp, static_cast<int>(g.in_c), Dim(w1, 0),
                Dim(w1, 1), Dim(w1, 2), Dim(w1, 3), Dim(w2, 0), Dim(w2, 1), Dim(w2, 2),
                Dim(w2, 3), static_cast<int>(g.mid_c), Dim(w3, 0), Dim(w3, 1), Dim(w3, 2),
                Dim(w3, 3), static_cast<int>(g.out_c), static_cast<int>(g.mid_c));
    return kTfLiteError;
  }
  if (g.dw_h > DGST_FUSED_BLOCK_MAX_DW_H) {
    MicroPrintf("%s: depthwise kernel height %d is above the supported %d", kOp,
                static_cast<int>(g.dw_h), DGST_FUSED_BLOCK_MAX_DW_H);
    return kTfLiteError;
  }
  if (!CheckStage(context, node, 0, g.mid_c) || !CheckStage(context, node, 1, g.mid_c) ||
      !CheckStage(context, node, 2, g.out_c))
    return kTfLiteError;
  if (!CheckConvAxis(kOp, "conv height", g.in_h, g.mid_h, g.conv_h, g.conv_stride_h, 1,
                     g.conv_pad_top) ||
      !CheckConvAxis(kOp, "conv width", g.in_w, g.mid_w, g.conv_w, g.conv_stride_w, 1,
                     g.conv_pad_left) ||
      !CheckConvAxis(kOp, "depthwise height", g.mid_h, g.out_h, g.dw_h, g.dw_stride_h, 1,
                     g.dw_pad_top) ||
      !CheckConvAxis(kOp, "depthwise width", g.mid_w, g.out_w, g.dw_w, g.dw_stride_w, 1,
                     g.dw_pad_left))
    return kTfLiteError;
  const int32_t bytes = dgst_fused_block_scratch_bytes(&g);
  if (MicroContextRequestScratchBufferInArena(context, static_cast<size_t>(bytes),
                                              &data->scratch) != kTfLiteOk) {
    MicroPrintf("%s: cannot get a scratch buffer of %d bytes", kOp, static_cast<int>(bytes));
    return kTfLiteError;
  }
  return kTfLiteOk;
}

TfLiteStatus Eval(TfLiteContext* context, TfLiteNode* node) {
  const auto* data = static_cast<const OpData*>(node->user_data);
  dgst_requant_params stage[kStages];
  for (int s = 0; s < kStages; ++s) {
    const TfLiteEvalTensor* q = GetEvalInput(context, node, RequantTensor(s));
    const auto* requant = static_cast<const int32_t*>(q->data.data);
    const int32_t channels = Dim(q, 1);
    stage[s].weights =
        static_cast<const int8_t*>(GetEvalInput(context, node, WeightsTensor(s))->data.data);
    stage[s].bias = requant;
    stage[s].multiplier = requant + channels;
    stage[s].shift = requant + 2 * channels;
    stage[s].input_offset = -data->zero_point[s];
    stage[s].output_offset = data->zero_point[s + 1];
    stage[s].act_min = data->act[s][0];
    stage[s].act_max = data->act[s][1];
  }
  dgst_fused_block_s8(&data->geometry, &stage[0], &stage[1], &stage[2],
                      static_cast<const int8_t*>(GetEvalInput(context, node, kXTensor)->data.data),
                      static_cast<int8_t*>(GetEvalOutput(context, node, kYTensor)->data.data),
                      MicroContextGetScratchBuffer(context, data->scratch));
  return kTfLiteOk;
}

}  // namespace

DGST_REGISTER_OP(DGST_FUSED_BLOCK, Init, Prepare, Eval, nullptr);
