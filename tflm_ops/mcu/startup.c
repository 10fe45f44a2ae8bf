/* Minimal Cortex-M4/M7 startup for QEMU mps2-an386 / mps2-an500 with semihosting:
 * vector table, .data copy, .bss clear, FPU enable (CPACR), stack painting, newlib
 * semihosting (rdimon) initialisation, then main() and exit(). A fault ends QEMU with a
 * non-zero status (semihosting SYS_EXIT, "run-time error"). */
#include <stdint.h>
#include <stdlib.h>

#include "mcu_support.h"

extern uint32_t _sidata, _sdata, _edata, _sbss, _ebss, _sstack, _estack;
extern int main(void);
extern void initialise_monitor_handles(void);

void Reset_Handler(void);
void Fault_Handler(void);

/* SYS_EXIT with ADP_Stopped_RunTimeErrorUnknown: qemu-system-arm exits with status 1. */
void Fault_Handler(void) {
  static const uint32_t block[2] = {0x20023u, 1u};
  register uint32_t r0 __asm("r0") = 0x18u; /* SYS_EXIT */
  register const uint32_t* r1 __asm("r1") = block;
  __asm volatile("bkpt 0xab" : : "r"(r0), "r"(r1) : "memory");
  for (;;) {
  }
}

typedef void (*vector_t)(void);

/* Initial SP, reset, NMI, HardFault, MemManage, BusFault, UsageFault, 4 reserved, SVC,
 * DebugMon, reserved, PendSV, SysTick. No peripheral interrupts are enabled. */
__attribute__((section(".isr_vector"), used)) const vector_t dgst_vectors[16] = {
    (vector_t)(uintptr_t)&_estack, Reset_Handler, Fault_Handler, Fault_Handler,
    Fault_Handler, Fault_Handler, Fault_Handler, 0, 0, 0, 0, Fault_Handler, Fault_Handler, 0,
    Fault_Handler, Fault_Handler};

void Reset_Handler(void) {
  uint32_t* src = &_sidata;
  uint32_t* dst;
  for (dst = &_sdata; dst < &_edata;) *dst++ = *src++;
  for (dst = &_sbss; dst < &_ebss;) *dst++ = 0u;
  /* CP10 and CP11 full access: the FPU (-mfloat-abi=hard needs it before any float op) */
  *(volatile uint32_t*)0xE000ED88u |= 0xFu << 20;
  __asm volatile("dsb\n\tisb" ::: "memory");
  dgst_paint_stack();
  initialise_monitor_handles();
  exit(main());
}
