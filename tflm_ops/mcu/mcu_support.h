/* Firmware support for the QEMU runs: instruction counting with the CMSDK APB timer0 and
 * stack painting. Only for tflm_ops/mcu (startup.c, harness.c, cmsis_nn_reference.c). */
#ifndef DGST_MCU_SUPPORT_H_
#define DGST_MCU_SUPPORT_H_

#include <stdint.h>

/* Instruction counting. QEMU runs with -icount shift=6: every instruction takes 2^6 ns of
 * virtual time, and timer0 (CMSDK APB timer at 0x40000000, 25 MHz: 40 ns per tick) is a
 * 32-bit down counter, so instructions = ticks * 40 / 64. QEMU models no caches or flash
 * wait states: these are instructions, not cycles. */
#define DGST_TIMER0 ((volatile uint32_t*)0x40000000u)
#define DGST_TIMER_CTRL 0
#define DGST_TIMER_VALUE 1
#define DGST_TIMER_RELOAD 2

static inline void dgst_timer_start(void) {
  DGST_TIMER0[DGST_TIMER_CTRL] = 0u;
  DGST_TIMER0[DGST_TIMER_RELOAD] = 0xFFFFFFFFu;
  DGST_TIMER0[DGST_TIMER_VALUE] = 0xFFFFFFFFu;
  DGST_TIMER0[DGST_TIMER_CTRL] = 1u; /* enable, no interrupt */
}

static inline uint32_t dgst_timer_read(void) { return DGST_TIMER0[DGST_TIMER_VALUE]; }

/* Ticks between two reads of the down counter -> instructions (rounded). */
static inline uint32_t dgst_ticks_to_instructions(uint32_t start, uint32_t end) {
  const uint64_t ticks = (uint32_t)(start - end);
  return (uint32_t)((ticks * 40u + 32u) / 64u);
}

/* Compiler fence: keeps the measured call between the two timer reads. */
#define DGST_FENCE() __asm volatile("" ::: "memory")

/* Runs `call` between two fenced timer reads: (instr) = its instructions, less `overhead`
 * (what two back-to-back reads count, dgst_timer_overhead). */
#define DGST_MEASURE(call, instr, overhead)                             \
  do {                                                                  \
    uint32_t t0_, t1_;                                                  \
    DGST_FENCE();                                                       \
    t0_ = dgst_timer_read();                                            \
    DGST_FENCE();                                                       \
    call;                                                               \
    DGST_FENCE();                                                       \
    t1_ = dgst_timer_read();                                            \
    DGST_FENCE();                                                       \
    (instr) = dgst_ticks_to_instructions(t0_, t1_) - (overhead);        \
  } while (0)

/* Instructions counted for two back-to-back fenced timer reads (the least of 8 tries): what
 * DGST_MEASURE subtracts. Call after dgst_timer_start. */
static inline uint32_t dgst_timer_overhead(void) {
  uint32_t i, instr, best = 0xFFFFFFFFu;
  for (i = 0; i < 8; ++i) {
    DGST_MEASURE((void)0, instr, 0u);
    if (instr < best) best = instr;
  }
  return best;
}

/* Stack painting: the stack section [_sstack, _estack) is filled with a pattern below the
 * current stack pointer; the lowest overwritten word after a call gives the peak. */
extern uint32_t _sstack, _estack;
#define DGST_STACK_PATTERN 0xC5AC4E11u

static inline uint32_t dgst_sp(void) {
  uint32_t sp;
  __asm volatile("mov %0, sp" : "=r"(sp));
  return sp;
}

/* Always inlined, so that it paints right up to the caller's own stack pointer. */
__attribute__((always_inline)) static inline void dgst_paint_stack(void) {
  volatile uint32_t* p = &_sstack;
  volatile uint32_t* const top = (volatile uint32_t*)(dgst_sp() - 8u);
  while (p < top) *p++ = DGST_STACK_PATTERN;
}

/* Address of the lowest stack word that no longer holds the pattern. */
static inline uintptr_t dgst_stack_low_water(void) {
  const volatile uint32_t* p = &_sstack;
  while (p < &_estack && *p == DGST_STACK_PATTERN) ++p;
  return (uintptr_t)p;
}

#endif /* DGST_MCU_SUPPORT_H_ */
