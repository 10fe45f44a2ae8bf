// Training-step firmware for QEMU mps2-an500 (Cortex-M7) / mps2-an386 (Cortex-M4): the
// exported training .tflite in flash, run by TFLM's MicroInterpreter with the dgst ops
// (dgst_tflm::AddDgstTrainOps) and the builtins the model uses (model_ops.h). Each Invoke
// is one training step; the weights are variable tensors, so they persist across steps.
//
// Semihosting files, in QEMU's working directory:
//   inputs.bin   per step, the bytes of every model input in order (until end of file)
//   outputs.bin  per step, the bytes of every model output in order (loss, logits, the
//                trainable tensors, ...)
//   flash.bin    the flash region of the weight store (weight_store.h: two slots of the
//                training state, train_state.h), NOR flash simulated by flash_file.h: kept
//                across runs, so a run is a boot of the device; created erased if missing
//   flash_fault.txt  optional, "W B": lose power after flash write W (B > 0: during it, with
//                its first B bytes written)
//   state.bin    written at boot when a state was loaded from flash: its bytes
// At boot the newest valid state in flash replaces the initial weights; after the steps
// (if any), the state is committed to flash. A model without variable tensors (an inference
// model) has no state: no flash.bin, "store none".
// stdout: "arena_used_bytes N", one "output I type T bytes B dims D0,D1,..." line per
// output, one "state_tensor I bytes B" line per state tensor, "store slot_sectors N
// sector_bytes N program_bytes N layout N", "store loaded slot S sequence Q steps T" (or "store
// empty", "store other_layout", "store none"), one "step S instructions N" line per Invoke
// (QEMU -icount shift=6), "steps N", "store commit slot S sequence Q steps T erases E programs
// P", one "op NAME invokes N instructions M" line per operator type (op_profiler.h, summed
// over the steps), "stack_bytes N", and "done". Exit status: 0 ok, 2 bad model,
// 3 AllocateTensors failed, 4 file error, 5 Invoke failed, 6 flash error or power cut
// ("power_cut after_write W").
//
// Built by `make -C tflm_ops tflm-firmware MODEL=...` (model_data.cc and model_ops.h are
// written by `python -m dgst_tf.tflm_ops.cortex_m embed`).
#include <stdint.h>
#include <stdio.h>

#include "dgst_train_ops.h"
#include "flash_file.h"
#include "mcu_support.h"
#include "model_ops.h"
#include "op_profiler.h"
#include "tensorflow/lite/micro/cortex_m_generic/debug_log_callback.h"
#include "tensorflow/lite/micro/micro_interpreter.h"
#include "tensorflow/lite/micro/micro_mutable_op_resolver.h"
#include "tensorflow/lite/schema/schema_generated.h"
#include "train_state.h"

#ifndef DGST_ARENA_BYTES
#define DGST_ARENA_BYTES (128 * 1024)
#endif
// The weight store's flash geometry: STM32F746's small sectors (32 KB), 256-byte programs.
#ifndef DGST_FLASH_SECTOR_BYTES
#define DGST_FLASH_SECTOR_BYTES (32 * 1024)
#endif
#ifndef DGST_FLASH_PROGRAM_BYTES
#define DGST_FLASH_PROGRAM_BYTES 256
#endif

extern "C" const unsigned char dgst_model_data[];
extern "C" void __libc_init_array(void);

// Linking with -nostartfiles: newlib's __libc_init_array calls _init, C++ objects with
// static storage need __dso_handle.
extern "C" void _init(void) {}
extern "C" void _fini(void) {}
void* __dso_handle = nullptr;

namespace {

alignas(16) uint8_t tensor_arena[DGST_ARENA_BYTES];

void LogToStdout(const char* s) { fputs(s, stdout); }

// The model's builtins (model_ops.h: DGST_MODEL_BUILTINS(X) calls X(AddConv2D) ...) plus
// the dgst ops.
using Resolver = tflite::MicroMutableOpResolver<DGST_MODEL_BUILTIN_COUNT +
                                               dgst_tflm::kNumDgstTrainOps>;

bool AddOps(Resolver& resolver) {
#define DGST_ADD_BUILTIN(method) \
  if (resolver.method() != kTfLiteOk) return false;
  DGST_MODEL_BUILTINS(DGST_ADD_BUILTIN)
#undef DGST_ADD_BUILTIN
  return dgst_tflm::AddDgstTrainOps(resolver) == kTfLiteOk;
}

void DescribeOutputs(tflite::MicroInterpreter& interpreter) {
  for (size_t i = 0; i < interpreter.outputs_size(); ++i) {
    const TfLiteTensor* t = interpreter.output(i);
    printf("output %u type %d bytes %u dims ", static_cast<unsigned>(i),
           static_cast<int>(t->type), static_cast<unsigned>(t->bytes));
    for (int d = 0; d < t->dims->size; ++d) printf(d ? ",%d" : "%d", t->dims->data[d]);
    printf("\n");
  }
}

// Reads one step's inputs; 1 = read, 0 = end of file before the step, -1 = truncated.
int ReadInputs(tflite::MicroInterpreter& interpreter, FILE* f) {
  for (size_t i = 0; i < interpreter.inputs_size(); ++i) {
    TfLiteTensor* t = interpreter.input(i);
    const size_t got = fread(t->data.raw, 1, t->bytes, f);
    if (got == 0 && i == 0) return 0;
    if (got != t->bytes) return -1;
  }
  return 1;
}

bool WriteOutputs(tflite::MicroInterpreter& interpreter, FILE* f) {
  for (size_t i = 0; i < interpreter.outputs_size(); ++i) {
    const TfLiteTensor* t = interpreter.output(i);
    if (fwrite(t->data.raw, 1, t->bytes, f) != t->bytes) return false;
  }
  return true;
}

int RunSteps(tflite::MicroInterpreter& interpreter, int* steps) {
  FILE* in = fopen("inputs.bin", "rb");
  FILE* out = fopen("outputs.bin", "wb");
  if (in == nullptr || out == nullptr) {
    printf("error: cannot open inputs.bin / outputs.bin (semihosting)\n");
    return 4;
  }
  int step = 0;
  for (;; ++step) {
    const int read = ReadInputs(interpreter, in);
    if (read == 0) break;
    if (read < 0) {
      printf("error: inputs.bin ends inside step %d\n", step);
      return 4;
    }
    dgst_timer_start();
    const uint32_t t0 = dgst_timer_read();
    DGST_FENCE();
    const TfLiteStatus status = interpreter.Invoke();
    DGST_FENCE();
    const uint32_t t1 = dgst_timer_read();
    if (status != kTfLiteOk) {
      printf("error: Invoke failed at step %d\n", step);
      return 5;
    }
    printf("step %d instructions %lu\n", step,
           static_cast<unsigned long>(dgst_ticks_to_instructions(t0, t1)));
    if (!WriteOutputs(interpreter, out)) {
      printf("error: writing outputs.bin failed at step %d\n", step);
      return 4;
    }
  }
  fclose(in);
  if (fclose(out) != 0) return 4;
  printf("steps %d\n", step);
  *steps = step;
  return 0;
}

// The persistent training state: flash.bin (a power cut from flash_fault.txt) and the store.
struct Persistence {
  dgst_state::TrainState state;
  flash_file flash;
  ws_store store;
  uint32_t steps = 0;  // training steps of the loaded state
};

int PowerCutOr(const Persistence& p, int status, const char* what) {
  if (p.flash.dead) {
    printf("power_cut after_write %lu\n", static_cast<unsigned long>(p.flash.writes));
  } else {
    printf("error: %s failed (%d)\n", what, status);
  }
  return 6;
}

// flash.bin, sized for two slots of the state, with the power cut of flash_fault.txt.
int OpenFlash(Persistence& p) {
  const uint32_t slot_sectors = ws_slot_sectors(DGST_FLASH_SECTOR_BYTES,
                                                DGST_FLASH_PROGRAM_BYTES, p.state.bytes());
  if (flash_file_open(&p.flash, "flash.bin", DGST_FLASH_SECTOR_BYTES,
                      DGST_FLASH_PROGRAM_BYTES, 2 * slot_sectors) != 0) {
    printf("error: cannot open flash.bin (semihosting) of %lu sectors\n",
           static_cast<unsigned long>(2 * slot_sectors));
    return 4;
  }
  unsigned long after = 0, torn_bytes = 0;
  if (FILE* fault = fopen("flash_fault.txt", "r")) {
    if (fscanf(fault, "%lu %lu", &after, &torn_bytes) < 1) after = 0;
    fclose(fault);
    flash_file_cut_power(&p.flash, static_cast<uint32_t>(after),
                         static_cast<uint32_t>(torn_bytes));
  }
  printf("store slot_sectors %lu sector_bytes %d program_bytes %d layout %lu\n",
         static_cast<unsigned long>(slot_sectors), DGST_FLASH_SECTOR_BYTES,
         DGST_FLASH_PROGRAM_BYTES, static_cast<unsigned long>(p.state.layout()));
  return 0;
}

bool WriteState(const dgst_state::TrainState& state, const char* path) {
  FILE* out = fopen(path, "wb");
  bool ok = out != nullptr;
  for (uint32_t i = 0; ok && i < state.count(); ++i) {
    const ws_segment& s = state.segments()[i];
    ok = fwrite(s.data, 1, s.bytes, out) == s.bytes;
  }
  return out != nullptr && fclose(out) == 0 && ok;
}

// Loads the newest valid state into the variables (0), or leaves the initial ones.
int LoadState(const tflite::Model* model, const dgst_state::Interpreter& interpreter,
              dgst_state::StateResolver& resolver, Persistence& p) {
  if (!p.state.Collect(model, interpreter)) {
    printf("error: cannot list the variable tensors (at most DGST_MAX_STATE_TENSORS = %d)\n",
           DGST_MAX_STATE_TENSORS);
    return 2;
  }
  for (uint32_t i = 0; i < p.state.count(); ++i) {
    printf("state_tensor %d bytes %lu\n", p.state.tensor(i),
           static_cast<unsigned long>(p.state.segments()[i].bytes));
  }
  if (p.state.count() == 0) {
    printf("store none\n");
    return 0;
  }
  int status = OpenFlash(p);
  if (status != 0) return status;
  status = ws_open(&p.store, &p.flash.flash, p.state.layout(), p.state.bytes());
  if (status == WS_OK) status = ws_load(&p.store, p.state.segments(), p.state.count());
  if (status < 0) return PowerCutOr(p, status, "loading the state");
  if (status == 0) {
    printf(p.store.newest < 0 ? "store empty\n" : "store other_layout\n");
    return 0;
  }
  const ws_slot& slot = p.store.slots[p.store.newest];
  p.steps = slot.steps;
  resolver.KeepRestored();
  printf("store loaded slot %d sequence %lu steps %lu\n", p.store.newest,
         static_cast<unsigned long>(slot.sequence), static_cast<unsigned long>(slot.steps));
  return WriteState(p.state, "state.bin") ? 0 : 4;
}

int CommitState(Persistence& p, int steps) {
  const uint32_t total = p.steps + static_cast<uint32_t>(steps);
  const int status = ws_commit(&p.store, p.state.segments(), p.state.count(), total);
  if (status != WS_OK) return PowerCutOr(p, status, "committing the state");
  printf("store commit slot %d sequence %lu steps %lu erases %lu programs %lu\n",
         p.store.newest, static_cast<unsigned long>(p.store.slots[p.store.newest].sequence),
         static_cast<unsigned long>(total), static_cast<unsigned long>(p.store.commit_erases),
         static_cast<unsigned long>(p.store.commit_programs));
  return 0;
}

}  // namespace

int main(void) {
  __libc_init_array();
  RegisterDebugLogCallback(LogToStdout);
  printf("dgst training firmware (%s, arena %u bytes)\n", DGST_CPU_NAME,
         static_cast<unsigned>(DGST_ARENA_BYTES));
  const tflite::Model* model = tflite::GetModel(dgst_model_data);
  if (model->version() != TFLITE_SCHEMA_VERSION) {
    printf("error: model schema version %lu, TFLM expects %d\n",
           static_cast<unsigned long>(model->version()), TFLITE_SCHEMA_VERSION);
    return 2;
  }
  static Resolver ops;
  if (!AddOps(ops)) {
    printf("error: resolver too small\n");
    return 2;
  }
  static dgst_state::StateResolver resolver(ops);
  static dgst_profile::OpProfiler profiler;
  static dgst_state::Interpreter interpreter(model, resolver, tensor_arena,
                                             sizeof(tensor_arena), nullptr, &profiler);
  if (interpreter.AllocateTensors() != kTfLiteOk) {
    printf("error: AllocateTensors failed (arena %u bytes; raise ARENA_BYTES)\n",
           static_cast<unsigned>(sizeof(tensor_arena)));
    return 3;
  }
  printf("arena_used_bytes %u\n", static_cast<unsigned>(interpreter.arena_used_bytes()));
  DescribeOutputs(interpreter);
  static Persistence persistence;
  int status = LoadState(model, interpreter, resolver, persistence);
  int steps = 0;
  if (status == 0) status = RunSteps(interpreter, &steps);
  if (status == 0 && steps > 0 && persistence.state.count() > 0) {
    status = CommitState(persistence, steps);
  }
  profiler.Print();
  if (flash_file_close(&persistence.flash) != 0 && status == 0) status = 4;
  printf("stack_bytes %u\n",
         static_cast<unsigned>(reinterpret_cast<uintptr_t>(&_estack) - dgst_stack_low_water()));
  if (status == 0) printf("done\n");
  fflush(stdout);
  return status;
}
