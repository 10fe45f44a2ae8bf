/* A NOR flash simulated in a file, for the weight store on QEMU (the file is opened through
 * semihosting, so it survives a "reboot", i.e. the next QEMU run) and on the host (tests).
 * Plain C99 and stdio.
 *
 *   flash_file f;
 *   flash_file_open(&f, "flash.bin", 32768, 256, 2);    // 2 sectors of 32 KB, 256 B pages
 *   flash_file_cut_power(&f, 3, 0);                      // lose power after write 3
 *   ws_open(&store, &f.flash, layout, payload_bytes); ...
 *   flash_file_close(&f);
 *
 * NOR semantics: erase sets a sector to 0xFF, program can only clear bits (the new bytes are
 * ANDed into the old ones), programs are whole aligned program units. Every erase or
 * program call is one "write", numbered from 1 for each open. The power cut: after write
 * `after` completed (torn_bytes = 0), or in the middle of it (only its first torn_bytes
 * bytes programmed or erased, if the write is longer), the device is dead: every later call
 * fails and leaves the file alone. A missing file is created erased; a shorter one is
 * extended erased.
 */
#ifndef DGST_FLASH_FILE_H_
#define DGST_FLASH_FILE_H_

#include <stdint.h>
#include <stdio.h>

#include "weight_store.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct flash_file {
  ws_flash flash; /* geometry and the calls, for ws_open */
  FILE* file;
  uint32_t writes;    /* erase and program calls since open (the power-cut one included) */
  uint32_t erases;    /* erase calls since open */
  uint32_t cut_after; /* 0: no power cut */
  uint32_t torn_bytes;
  int dead;           /* the power was cut */
} flash_file;

/* 0 on success, -1 if the file cannot be opened or extended, -2 on a bad geometry. */
int flash_file_open(flash_file* f, const char* path, uint32_t sector_bytes,
                    uint32_t program_bytes, uint32_t sectors);

/* Lose power after write number `after` (>= 1; 0 cancels), or during it when torn_bytes > 0
 * (see above). */
void flash_file_cut_power(flash_file* f, uint32_t after, uint32_t torn_bytes);

/* 0 on success. */
int flash_file_close(flash_file* f);

#ifdef __cplusplus
}
#endif

#endif /* DGST_FLASH_FILE_H_ */
