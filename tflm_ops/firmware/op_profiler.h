// Instructions per operator type of a MicroInterpreter (QEMU -icount, CMSDK timer0: see
// tflm_ops/mcu/mcu_support.h), summed over every Invoke of the run.
//
//   static dgst_profile::OpProfiler profiler;
//   tflite::MicroInterpreter interpreter(model, ops, arena, size, nullptr, &profiler);
//   ... interpreter.Invoke() with timer0 running (dgst_timer_start) ...
//   profiler.Print();   // "op CONV_2D invokes 12 instructions 3456789" per operator type
//
// TFLM calls BeginEvent/EndEvent around every operator's Eval with the operator's name (the
// builtin's name, or the custom op's name) as the tag; the tags are static strings, so the
// pointer identifies the type. The timer reads add a few instructions per operator.
#ifndef DGST_OP_PROFILER_H_
#define DGST_OP_PROFILER_H_

#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "mcu_support.h"
#include "tensorflow/lite/micro/micro_profiler_interface.h"

#ifndef DGST_PROFILER_MAX_TYPES
#define DGST_PROFILER_MAX_TYPES 48
#endif

namespace dgst_profile {

class OpProfiler : public tflite::MicroProfilerInterface {
 public:
  uint32_t BeginEvent(const char* tag) override {
    const uint32_t slot = Slot(tag);
    started_ = dgst_timer_read();
    return slot;
  }

  void EndEvent(uint32_t slot) override {
    const uint32_t now = dgst_timer_read();
    if (slot >= count_) return;  // more operator types than DGST_PROFILER_MAX_TYPES
    types_[slot].invokes += 1;
    types_[slot].instructions += dgst_ticks_to_instructions(started_, now);
  }

  void Print() const {
    for (uint32_t i = 0; i < count_; ++i) {
      // newlib-nano's printf has no %llu: the count in two decimal parts
      const uint64_t n = types_[i].instructions;
      const unsigned long high = static_cast<unsigned long>(n / 1000000000u);
      const unsigned long low = static_cast<unsigned long>(n % 1000000000u);
      printf("op %s invokes %lu instructions ", types_[i].tag,
             static_cast<unsigned long>(types_[i].invokes));
      if (high) {
        printf("%lu%09lu\n", high, low);
      } else {
        printf("%lu\n", low);
      }
    }
    if (unprofiled_) {
      printf("op_events_unprofiled %lu\n", static_cast<unsigned long>(unprofiled_));
    }
  }

 private:
  struct Type {
    const char* tag;
    uint32_t invokes;
    uint64_t instructions;
  };

  uint32_t Slot(const char* tag) {
    for (uint32_t i = 0; i < count_; ++i) {
      if (types_[i].tag == tag || strcmp(types_[i].tag, tag) == 0) return i;
    }
    if (count_ == DGST_PROFILER_MAX_TYPES) {
      ++unprofiled_;
      return DGST_PROFILER_MAX_TYPES;
    }
    types_[count_] = {tag, 0, 0};
    return count_++;
  }

  Type types_[DGST_PROFILER_MAX_TYPES] = {};
  uint32_t count_ = 0;
  uint32_t unprofiled_ = 0;  // events of types beyond DGST_PROFILER_MAX_TYPES
  uint32_t started_ = 0;
};

}  // namespace dgst_profile

#endif  // DGST_OP_PROFILER_H_
