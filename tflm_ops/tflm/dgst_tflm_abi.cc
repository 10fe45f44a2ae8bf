// =================================================================================
//  ABI GLUE for the pip TFLM interpreter (see dgst_tflm_abi.h): appending a custom op to
//  the interpreter's MicroMutableOpResolver<200>, plus the small checks every kernel uses.
//  With -DDGST_TFLM_TREE (inside a TFLM source tree) only the kernel helpers are compiled:
//  the resolver surgery and the layout probe are pip-mode only.
// =================================================================================
#include "dgst_tflm_abi.h"

#include <cstring>

#if !defined(DGST_TFLM_TREE)
#include <cxxabi.h>

#include <typeinfo>
#endif

// Pip mode: the redeclared types of namespace tflite::micro; tree mode: TFLM's global C
// types (tflite::micro then only holds GetEvalInput/GetEvalOutput).
using namespace tflite::micro;

#if !defined(DGST_TFLM_TREE)
namespace dgst_tflm {
namespace {

constexpr const char* kResolverTypeName = "N6tflite5micro22MicroMutableOpResolverILj200EEE";

// True if the polymorphic object's dynamic type is, or derives (single inheritance) from,
// MicroMutableOpResolver<200u>: read its vtable's type_info and walk up the bases.
bool IsMutableOpResolver200(const void* object) {
  const void* const* vtable = *static_cast<const void* const* const*>(object);
  if (vtable == nullptr) return false;
  const std::type_info* type = static_cast<const std::type_info*>(vtable[-1]);
  for (int depth = 0; type != nullptr && depth < 8; ++depth) {
    if (std::strcmp(type->name(), kResolverTypeName) == 0) return true;
    auto* single = dynamic_cast<const abi::__si_class_type_info*>(type);
    if (single == nullptr) return false;
    type = single->__base_type;
  }
  return false;
}

}  // namespace

bool AddCustomOp(void* resolver, const char* name, const Kernel& kernel) {
  if (resolver == nullptr || !IsMutableOpResolver200(resolver)) {
    MicroPrintf("dgst-tflm: cannot register %s: the resolver is not a "
                "tflite::micro::MicroMutableOpResolver<200> (this library is built for "
                "tflite-micro==0.dev20261023182759; rerun tests/test_tflm_abi.py)", name);
    return false;
  }
  auto* base = static_cast<unsigned char*>(resolver);
  auto* records = reinterpret_cast<TFLMRegistration*>(base + kResolverRecordsOffset);
  auto* count = reinterpret_cast<unsigned int*>(base + kResolverCountOffset);
  if (*count > kResolverOpCount) {
    MicroPrintf("dgst-tflm: cannot register %s: resolver count %u exceeds %u (layout "
                "mismatch)", name, *count, static_cast<unsigned>(kResolverOpCount));
    return false;
  }
  for (unsigned int i = 0; i < *count; ++i) {
    const TFLMRegistration& r = records[i];
    if (r.builtin_code == kBuiltinCustom && r.custom_name != nullptr &&
        std::strcmp(r.custom_name, name) == 0) {
      if (r.invoke == kernel.invoke && r.prepare == kernel.prepare) return true;
      MicroPrintf("dgst-tflm: custom op %s is already registered with other kernels", name);
      return false;
    }
  }
  if (*count == kResolverOpCount) {
    MicroPrintf("dgst-tflm: cannot register %s: the resolver already holds %u ops", name,
                static_cast<unsigned>(kResolverOpCount));
    return false;
  }
  TFLMRegistration& r = records[*count];
  r.init = kernel.init;
  r.free = nullptr;
  r.prepare = kernel.prepare;
  r.invoke = kernel.invoke;
  r.reset = kernel.reset;
  r.builtin_code = kBuiltinCustom;
  r.custom_name = name;  // must outlive the resolver: callers pass string literals
  *count += 1;
  return true;
}

}  // namespace dgst_tflm
#endif  // !DGST_TFLM_TREE

namespace dgst_tflm {

bool ReadOptions(const char* op, const char* buffer, size_t length, int32_t* out,
                 int32_t count) {
  const size_t expected = static_cast<size_t>(count) * sizeof(int32_t);
  if (buffer == nullptr || length != expected) {
    MicroPrintf("%s: custom options must be %d little-endian int32 words (%u bytes, word 0 = "
                "format version 1), got %u bytes", op, static_cast<int>(count),
                static_cast<unsigned>(expected), static_cast<unsigned>(length));
    return false;
  }
  std::memcpy(out, buffer, expected);  // the flatbuffer vector need not be 4-byte aligned
  if (out[0] != 1) {
    MicroPrintf("%s: custom options format version %d is not supported (expected 1)", op,
                static_cast<int>(out[0]));
    return false;
  }
  return true;
}

bool ReadVersionOnlyOptions(const char* op, const char* buffer, size_t length) {
  int32_t version[1];
  return length == 0 || ReadOptions(op, buffer, length, version, 1);
}

void* AllocatePersistent(TfLiteContext* context, size_t bytes) {
  return MicroContextAllocatePersistentBuffer(context, bytes);
}

float FloatFromBits(int32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

const char* TypeName(int type) {
  switch (type) {
    case kTfLiteFloat32: return "float32";
    case kTfLiteInt32: return "int32";
    case kTfLiteUInt8: return "uint8";
    case kTfLiteInt64: return "int64";
    case kTfLiteBool: return "bool";
    case kTfLiteInt16: return "int16";
    case kTfLiteInt8: return "int8";
    default: return "other";
  }
}

int Rank(const TfLiteEvalTensor* tensor) {
  return tensor->dims == nullptr ? 0 : tensor->dims->size;
}

int Dim(const TfLiteEvalTensor* tensor, int i) {
  const int rank = Rank(tensor);
  if (i < 0) i += rank;
  return (i < 0 || i >= rank) ? 0 : tensor->dims->data[i];
}

bool KeptInRange(const char* op, const int32_t* kept, int32_t k, int32_t channels) {
  for (int32_t c = 0; c < k; ++c) {
    if (kept[c] < 0 || kept[c] >= channels) {
      MicroPrintf("%s: kept[%d] = %d is not a channel index in [0, %d)", op,
                  static_cast<int>(c), static_cast<int>(kept[c]), static_cast<int>(channels));
      return false;
    }
  }
  return true;
}

int NumElements(const TfLiteEvalTensor* tensor) {
  int n = 1;
  for (int i = 0; i < Rank(tensor); ++i) n *= tensor->dims->data[i];
  return n;
}

bool CheckArity(const char* op, const TfLiteNode* node, int inputs, int outputs) {
  const int have_in = node->inputs == nullptr ? 0 : node->inputs->size;
  const int have_out = node->outputs == nullptr ? 0 : node->outputs->size;
  if (have_in != inputs || have_out != outputs) {
    MicroPrintf("%s: expected %d inputs and %d outputs, the node has %d and %d", op, inputs,
                outputs, have_in, have_out);
    return false;
  }
  return true;
}

namespace {

bool CheckTensor(const char* op, const char* what, const TfLiteEvalTensor* t, int type,
                 int rank) {
  if (t == nullptr) {
    MicroPrintf("%s: %s is missing", op, what);
    return false;
  }
  if (static_cast<int>(t->type) != type) {
    MicroPrintf("%s: %s must be %s, got %s (type %d)", op, what, TypeName(type),
                TypeName(t->type), static_cast<int>(t->type));
    return false;
  }
  if (rank >= 0 && Rank(t) != rank) {
    MicroPrintf("%s: %s must have rank %d, got rank %d", op, what, rank, Rank(t));
    return false;
  }
  return true;
}

}  // namespace

const TfLiteEvalTensor* CheckedInput(const char* op, const char* what, TfLiteContext* context,
                                     TfLiteNode* node, int index, int type, int rank) {
  const TfLiteEvalTensor* t = tflite::micro::GetEvalInput(context, node, index);
  return CheckTensor(op, what, t, type, rank) ? t : nullptr;
}

TfLiteEvalTensor* CheckedOutput(const char* op, const char* what, TfLiteContext* context,
                                TfLiteNode* node, int index, int type, int rank) {
  TfLiteEvalTensor* t = tflite::micro::GetEvalOutput(context, node, index);
  return CheckTensor(op, what, t, type, rank) ? t : nullptr;
}

}  // namespace dgst_tflm

#if !defined(DGST_TFLM_TREE)
// Compile-time layout facts, exported for tests/test_tflm_abi.py to compare with the wheel,
// in this order: sizeof(TFLMRegistration), its free, prepare, invoke, reset, builtin_code and
// custom_name offsets, the resolver's records and count offsets, TfLiteNode's inputs,
// outputs, user_data, custom_initial_data and custom_initial_data_size offsets,
// TfLiteEvalTensor's dims and type offsets.
DGST_TFLM_EXPORT void DgstTflmAbiLayout(int64_t* out, int32_t n) {
  const int64_t facts[] = {
      static_cast<int64_t>(sizeof(TFLMRegistration)),
      static_cast<int64_t>(offsetof(TFLMRegistration, free)),
      static_cast<int64_t>(offsetof(TFLMRegistration, prepare)),
      static_cast<int64_t>(offsetof(TFLMRegistration, invoke)),
      static_cast<int64_t>(offsetof(TFLMRegistration, reset)),
      static_cast<int64_t>(offsetof(TFLMRegistration, builtin_code)),
      static_cast<int64_t>(offsetof(TFLMRegistration, custom_name)),
      static_cast<int64_t>(dgst_tflm::kResolverRecordsOffset),
      static_cast<int64_t>(dgst_tflm::kResolverCountOffset),
      static_cast<int64_t>(offsetof(TfLiteNode, inputs)),
      static_cast<int64_t>(offsetof(TfLiteNode, outputs)),
      static_cast<int64_t>(offsetof(TfLiteNode, user_data)),
      static_cast<int64_t>(offsetof(TfLiteNode, custom_initial_data)),
      static_cast<int64_t>(offsetof(TfLiteNode, custom_initial_data_size)),
      static_cast<int64_t>(offsetof(TfLiteEvalTensor, dims)),
      static_cast<int64_t>(offsetof(TfLiteEvalTensor, type)),
  };
  for (int32_t i = 0; i < n && i < static_cast<int32_t>(sizeof(facts) / sizeof(facts[0])); ++i)
    out[i] = facts[i];
}
#endif  // !DGST_TFLM_TREE
