// =================================================================================
//  ABI GLUE for the pip TFLM interpreter: tflite-micro==0.dev20261023182759, x86-64.
// =================================================================================
// The wheel ships no C/C++ headers, so the few TFLM types the kernels touch are declared
// here with the layout of that build (read from the wheel's `_runtime.so`: its exported
// symbols and the code of its own RegisterOp / GetEvalInput). Nothing is linked at build
// time: the functions below are resolved when the library is loaded, from the wheel's
// `_runtime.so` (loaded RTLD_GLOBAL first).
//
// tests/test_tflm_abi.py checks every assumption of this file against the wheel (exported
// symbols, the resolver's record array and count, the TFLMRegistration layout as written by
// the wheel's own tflite::micro::RegisterOp, the TfLiteNode inputs/outputs offsets as read
// by its GetEvalInput/GetEvalOutput) before any kernel test. Do not change a layout here
// without rerunning it; a different TFLM build needs a new copy of this file.
//
// In this build the C types live in namespace tflite::micro (it matters for C++ name
// mangling) and TfLiteContext's classic function pointers must not be called: use the
// exported functions declared below.
//
// TFLM SOURCE-TREE MODE: compiled with -DDGST_TFLM_TREE inside a TensorFlow Lite Micro tree,
// this header includes TFLM's own headers instead of the redeclarations below, the kernel
// helpers of namespace dgst_tflm work on the real types, and DGST_REGISTER_OP defines
// `TFLMRegistration* tflite::Register_<OP>()` (declared in dgst_train_ops.h) for
// MicroMutableOpResolver::AddCustom. The resolver surgery and the layout probe of
// dgst_tflm_abi.cc exist only in the pip mode.
#ifndef DGST_TFLM_ABI_H_
#define DGST_TFLM_ABI_H_

#include <stddef.h>
#include <stdint.h>

#if defined(DGST_TFLM_TREE)
// =================================================================== TFLM source-tree mode
#include "tensorflow/lite/c/common.h"
#include "tensorflow/lite/micro/kernels/kernel_util.h"
#include "tensorflow/lite/micro/micro_common.h"
#include "tensorflow/lite/micro/micro_context.h"
#include "tensorflow/lite/micro/micro_log.h"

// The kernels say `using namespace tflite::micro; using namespace dgst_tflm;` and then use
// TfLiteContext, TfLiteNode, TfLiteEvalTensor, kTfLite* (global C types in TFLM),
// GetEvalInput/GetEvalOutput (tflite::micro), MicroPrintf (global) and the MicroContext*
// wrappers (namespace tflite), made visible here.
namespace dgst_tflm {
using ::tflite::MicroContextAllocatePersistentBuffer;
using ::tflite::MicroContextGetScratchBuffer;
using ::tflite::MicroContextRequestScratchBufferInArena;
}  // namespace dgst_tflm

#else  // !DGST_TFLM_TREE
// =================================================================== pip-wheel ABI mode
namespace tflite {
namespace micro {

enum TfLiteStatus { kTfLiteOk = 0, kTfLiteError = 1 };

// The values of TfLiteType used by the kernels (the enum is int-sized).
enum TfLiteType {
  kTfLiteNoType = 0,
  kTfLiteFloat32 = 1,
  kTfLiteInt32 = 2,
  kTfLiteUInt8 = 3,
  kTfLiteInt64 = 4,
  kTfLiteBool = 6,
  kTfLiteInt16 = 7,
  kTfLiteInt8 = 9,
};

struct TfLiteContext;  // opaque: only passed back to exported functions

struct TfLiteIntArray {
  int size;
  int data[];  // flexible array member (a GCC extension in C++; the layout of C)
};

// TF_LITE_STATIC_MEMORY build: no temporaries, no delegate fields.
struct TfLiteNode {
  TfLiteIntArray* inputs;         // offset 0
  TfLiteIntArray* outputs;        // offset 8
  TfLiteIntArray* intermediates;  // offset 16
  void* user_data;                // offset 24: what init() returned
  void* builtin_data;             // offset 32
  const void* custom_initial_data;  // offset 40: the op's custom_options bytes
  int custom_initial_data_size;     // offset 48
};

// TFLM's TfLitePtrUnion has one pointer member per type; the kernels use only `.data`.
union TfLitePtrUnion {
  void* data;
};

struct TfLiteEvalTensor {
  TfLitePtrUnion data;
  TfLiteIntArray* dims;
  TfLiteType type;
};

// 56 bytes. builtin_code 32 = BuiltinOperator_CUSTOM.
struct TFLMRegistration {
  void* (*init)(TfLiteContext* context, const char* buffer, size_t length);
  void (*free)(TfLiteContext* context, void* buffer);
  TfLiteStatus (*prepare)(TfLiteContext* context, TfLiteNode* node);
  TfLiteStatus (*invoke)(TfLiteContext* context, TfLiteNode* node);
  void (*reset)(TfLiteContext* context, void* buffer);
  int32_t builtin_code;
  const char* custom_name;
};

// Exported by _runtime.so (`nm -D -C`). Optional inputs (index -1) give nullptr.
const TfLiteEvalTensor* GetEvalInput(const TfLiteContext* context, const TfLiteNode* node,
                                     int index);
TfLiteEvalTensor* GetEvalOutput(const TfLiteContext* context, const TfLiteNode* node,
                                int index);
void* MicroContextAllocatePersistentBuffer(TfLiteContext* context, size_t bytes);
TfLiteStatus MicroContextRequestScratchBufferInArena(TfLiteContext* context, size_t bytes,
                                                     int* buffer_index);
void* MicroContextGetScratchBuffer(TfLiteContext* context, int buffer_index);

}  // namespace micro
}  // namespace tflite

// Exported by _runtime.so in the global namespace (C++ linkage); prints to stderr.
void MicroPrintf(const char* format, ...);

// ---------------------------------------------------------------------------------
// The resolver: MicroMutableOpResolver<200> (the interpreter passes a PythonOpsResolver,
// which derives from it): a vtable pointer, 200 TFLMRegistration records, then the
// `unsigned int` record count. AddCustom is inline in TFLM and not exported, so
// dgst_tflm::AddCustomOp appends the record itself (after checking the object's RTTI).
// ---------------------------------------------------------------------------------
namespace dgst_tflm {

constexpr size_t kResolverOpCount = 200;
constexpr size_t kResolverRecordsOffset = sizeof(void*);
constexpr size_t kResolverCountOffset =
    kResolverRecordsOffset + kResolverOpCount * sizeof(tflite::micro::TFLMRegistration);
constexpr int32_t kBuiltinCustom = 32;

static_assert(sizeof(tflite::micro::TFLMRegistration) == 56, "TFLMRegistration is 56 bytes");
static_assert(offsetof(tflite::micro::TFLMRegistration, builtin_code) == 40, "builtin_code");
static_assert(offsetof(tflite::micro::TFLMRegistration, custom_name) == 48, "custom_name");
static_assert(offsetof(tflite::micro::TfLiteNode, user_data) == 24, "TfLiteNode::user_data");
static_assert(sizeof(tflite::micro::TfLiteEvalTensor) == 24, "TfLiteEvalTensor");
static_assert(kResolverCountOffset == 11208, "MicroMutableOpResolver<200> count offset");

// The kernel functions of one custom op (reset and free may be null).
struct Kernel {
  void* (*init)(tflite::micro::TfLiteContext*, const char*, size_t);
  tflite::micro::TfLiteStatus (*prepare)(tflite::micro::TfLiteContext*,
                                         tflite::micro::TfLiteNode*);
  tflite::micro::TfLiteStatus (*invoke)(tflite::micro::TfLiteContext*,
                                        tflite::micro::TfLiteNode*);
  void (*reset)(tflite::micro::TfLiteContext*, void*);
};

// Append `name` -> `kernel` to the resolver. Returns false (after MicroPrintf) if the object
// is not a MicroMutableOpResolver<200>, the resolver is full, or `name` is already
// registered with other functions. Registering the same op twice is a no-op.
bool AddCustomOp(void* resolver, const char* name, const Kernel& kernel);

}  // namespace dgst_tflm

#endif  // DGST_TFLM_TREE

#if defined(DGST_TFLM_TREE)
#define DGST_TFLM_TYPE(name) ::name
#else
#define DGST_TFLM_TYPE(name) ::tflite::micro::name
#endif

namespace dgst_tflm {

// ----------------------------------------------------------------- kernel helpers (both modes)
// Compile-time string equality: DGST_REGISTER_OP checks that the op's kOp is its OP_NAME.
constexpr bool SameName(const char* a, const char* b) {
  return *a == *b && (*a == '\0' || SameName(a + 1, b + 1));
}

// Custom options of every dgst op: a little-endian int32 array whose word 0 is the format
// version (1); floats are stored as their IEEE-754 float32 bit patterns. Copies `count`
// words into `out` and checks length and version; prints an error naming `op` otherwise.
bool ReadOptions(const char* op, const char* buffer, size_t length, int32_t* out,
                 int32_t count);
float FloatFromBits(int32_t bits);

const char* TypeName(int type);
// Runtime channel selections are checked in Eval before any read or write: every kept[c]
// must be in [0, channels); prints the first bad entry naming `op` otherwise.
bool KeptInRange(const char* op, const int32_t* kept, int32_t k, int32_t channels);
int NumElements(const DGST_TFLM_TYPE(TfLiteEvalTensor)* tensor);
int Rank(const DGST_TFLM_TYPE(TfLiteEvalTensor)* tensor);
int Dim(const DGST_TFLM_TYPE(TfLiteEvalTensor)* tensor, int i);  // i < 0 counts from the end

// MicroContextAllocatePersistentBuffer of either mode.
void* AllocatePersistent(DGST_TFLM_TYPE(TfLiteContext)* context, size_t bytes);

// Node arity check with a message naming the op.
bool CheckArity(const char* op, const DGST_TFLM_TYPE(TfLiteNode)* node, int inputs,
                int outputs);
// Fetch input/output `index`, require it to exist and have `type` and `rank` (-1: any).
const DGST_TFLM_TYPE(TfLiteEvalTensor)* CheckedInput(const char* op, const char* what,
                                                    DGST_TFLM_TYPE(TfLiteContext)* context,
                                                    DGST_TFLM_TYPE(TfLiteNode)* node, int index,
                                                    int type, int rank);
DGST_TFLM_TYPE(TfLiteEvalTensor)* CheckedOutput(const char* op, const char* what,
                                               DGST_TFLM_TYPE(TfLiteContext)* context,
                                               DGST_TFLM_TYPE(TfLiteNode)* node, int index,
                                               int type, int rank);

// Custom options that carry only the format version: none, or the int32 array [1].
bool ReadVersionOnlyOptions(const char* op, const char* buffer, size_t length);

// Every op's per-node data is a struct OpData whose first member is `bool options_ok`, set
// by Init. NewOpData allocates it zeroed (persistent arena memory; nullptr when out of
// memory).
template <typename OpData>
OpData* NewOpData(DGST_TFLM_TYPE(TfLiteContext) * context) {
  auto* data = static_cast<OpData*>(AllocatePersistent(context, sizeof(OpData)));
  if (data != nullptr) *data = OpData{};
  return data;
}

// The whole Init of an op whose custom options carry only the format version.
template <typename OpData>
void* InitVersionOnly(const char* op, DGST_TFLM_TYPE(TfLiteContext) * context,
                      const char* buffer, size_t length) {
  OpData* data = NewOpData<OpData>(context);
  if (data != nullptr) data->options_ok = ReadVersionOnlyOptions(op, buffer, length);
  return data;
}

// The node's OpData in Prepare, or nullptr when Init failed or its options were invalid
// (Init has printed why).
template <typename OpData>
OpData* PreparedOpData(DGST_TFLM_TYPE(TfLiteNode) * node) {
  auto* data = static_cast<OpData*>(node->user_data);
  return data != nullptr && data->options_ok ? data : nullptr;
}

// Prepare's tensor checks, as every op does them: the node's arity first, then each input
// and output fetched and checked for its type and rank (-1: any), with an error naming the
// op for every tensor that is wrong. After an arity error no tensor is fetched.
//   NodeTensorChecker check(kOp, context, node, /*inputs=*/2, /*outputs=*/1);
//   const TfLiteEvalTensor* x = check.Input("input 0 (x)", kXTensor, kTfLiteInt8, -1);
//   TfLiteEvalTensor* out = check.Output("output 0 (out)", kOutTensor, kTfLiteInt8, -1);
//   if (!check.ok()) return kTfLiteError;
class NodeTensorChecker {
 public:
  NodeTensorChecker(const char* op, DGST_TFLM_TYPE(TfLiteContext) * context,
                    DGST_TFLM_TYPE(TfLiteNode) * node, int inputs, int outputs)
      : op_(op), context_(context), node_(node),
        arity_ok_(CheckArity(op, node, inputs, outputs)), ok_(arity_ok_) {}

  const DGST_TFLM_TYPE(TfLiteEvalTensor) * Input(const char* what, int index, int type,
                                                 int rank) {
    return Kept(arity_ok_ ? CheckedInput(op_, what, context_, node_, index, type, rank)
                          : nullptr);
  }
  DGST_TFLM_TYPE(TfLiteEvalTensor) * Output(const char* what, int index, int type, int rank) {
    return Kept(arity_ok_ ? CheckedOutput(op_, what, context_, node_, index, type, rank)
                          : nullptr);
  }
  // True while the arity and every tensor fetched so far are right.
  bool ok() const { return ok_; }

 private:
  template <typename Tensor>
  Tensor* Kept(Tensor* tensor) {
    ok_ = ok_ && tensor != nullptr;
    return tensor;
  }

  const char* op_;
  DGST_TFLM_TYPE(TfLiteContext) * context_;
  DGST_TFLM_TYPE(TfLiteNode) * node_;
  bool arity_ok_, ok_;
};

}  // namespace dgst_tflm

// Every op file ends with DGST_REGISTER_OP(<OP NAME>, Init, Prepare, Eval, Reset) (Reset
// may be nullptr), after its anonymous namespace, where kOp is the op name string.
//   pip mode:  extern "C" bool DgstRegister_<OP NAME>(void* resolver), exported; the
//              interpreter finds it by dlsym when listed in custom_op_registerers.
//   tree mode: TFLMRegistration* tflite::Register_<OP NAME>(), for
//              resolver.AddCustom("<OP NAME>", tflite::Register_<OP NAME>()).
#define DGST_TFLM_EXPORT extern "C" __attribute__((visibility("default")))

#if defined(DGST_TFLM_TREE)
// The registration is built at file scope (where Init/Prepare/Eval/Reset of the op's
// anonymous namespace are found) and kept in a function-local static.
#define DGST_REGISTER_OP(OP_NAME, INIT, PREPARE, EVAL, RESET)                          \
  static TFLMRegistration DgstMakeRegistration_##OP_NAME() {                           \
    return ::tflite::micro::RegisterOp(INIT, PREPARE, EVAL, /*free=*/nullptr, RESET); \
  }                                                                                    \
  namespace tflite {                                                                   \
  TFLMRegistration* Register_##OP_NAME();                                              \
  TFLMRegistration* Register_##OP_NAME() {                                             \
    static TFLMRegistration registration = DgstMakeRegistration_##OP_NAME();           \
    return &registration;                                                              \
  }                                                                                    \
  }  /* namespace tflite */                                                            \
  static_assert(::dgst_tflm::SameName(kOp, #OP_NAME), "kOp must be " #OP_NAME)
#else
#define DGST_REGISTER_OP(OP_NAME, INIT, PREPARE, EVAL, RESET)                            \
  DGST_TFLM_EXPORT bool DgstRegister_##OP_NAME(void* resolver) {                         \
    return ::dgst_tflm::AddCustomOp(resolver, kOp,                                       \
                                    ::dgst_tflm::Kernel{INIT, PREPARE, EVAL, RESET});    \
  }                                                                                      \
  static_assert(::dgst_tflm::SameName(kOp, #OP_NAME), "kOp must be " #OP_NAME)
#endif

#endif  // DGST_TFLM_ABI_H_
