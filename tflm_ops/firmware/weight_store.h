/* Trained weights that survive a power cut: a two-slot store in a flash region (plain C99,
 * no TFLM types). The caller describes its state as segments (the variable tensors of the
 * training graph: weights, biases, the visited bitmask, the step counter sgd/step).
 *
 *   ws_store store;
 *   ws_open(&store, &flash, layout_id, payload_bytes);   // scans both slots
 *   if (ws_load(&store, segments, n) == 1) ...          // newest valid slot -> segments
 *   ...train...
 *   ws_commit(&store, segments, n, steps);               // into the other slot
 *
 * Flash layout. The region is 2 slots of `slot_sectors` erase sectors each (the fewest that
 * hold one program unit for the header plus the payload); slot s starts at byte
 * s * slot_sectors * sector_bytes. In a slot, the first program unit holds the commit record
 * (the rest of that unit stays erased) and the payload starts at offset program_bytes,
 * padded with 0xFF to whole program units. The commit record is 8 little-endian uint32:
 *
 *   0 magic 0x53574744 ("DGWS")   1 format version (1)        2 sequence number
 *   3 layout id (the caller's)    4 payload bytes             5 CRC-32 of the payload
 *   6 steps (the caller's count)  7 CRC-32 of words 0..6
 *
 * (CRC-32: IEEE 802.3, reflected polynomial 0xEDB88320, the zlib crc32.)
 * A commit erases the slot that does not hold the newest valid state, programs the payload,
 * then programs the commit record last, with sequence = newest + 1. A slot is valid when its
 * record has the magic, version and record CRC and its payload has the recorded CRC; boot
 * loads the valid slot with the highest sequence (serial-number order, so the 32-bit
 * counter may wrap). A power cut at any point of a commit leaves the other slot intact and
 * the slot being written without a valid record, or with a complete one: the next boot
 * loads the complete old or the complete new state, never a mix. Each commit erases
 * slot_sectors sectors; the two slots alternate, so each sector is erased once every
 * two commits.
 */
#ifndef DGST_WEIGHT_STORE_H_
#define DGST_WEIGHT_STORE_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define WS_MAGIC 0x53574744u
#define WS_VERSION 1u
#define WS_RECORD_BYTES 32u
/* The largest program unit the store supports (its staging buffer is on the stack). */
#define WS_MAX_PROGRAM_BYTES 256u

enum {
  WS_OK = 0,
  WS_ERR_FLASH = -1,  /* the device reported an error (or lost power) */
  WS_ERR_CONFIG = -2, /* bad geometry, region too small, segments do not match */
  WS_ERR_VERIFY = -3  /* the committed slot does not read back valid */
};

/* A flash device: erase one sector (all bytes 0xFF), program a whole number of program units
 * at a program-unit aligned offset (bits can only go from 1 to 0), read any bytes. Offsets
 * are relative to the region's start. Each call returns 0 on success. */
typedef struct ws_flash {
  uint32_t sector_bytes;
  uint32_t program_bytes;
  uint32_t sectors; /* of the region */
  int (*erase)(void* ctx, uint32_t sector);
  int (*program)(void* ctx, uint32_t offset, const void* data, uint32_t bytes);
  int (*read)(void* ctx, uint32_t offset, void* data, uint32_t bytes);
  void* ctx;
} ws_flash;

/* One piece of the caller's state (a tensor's bytes). */
typedef struct ws_segment {
  void* data;
  uint32_t bytes;
} ws_segment;

/* A slot's commit record as found at open (valid: record and payload CRCs check). */
typedef struct ws_slot {
  int valid;
  uint32_t sequence;
  uint32_t layout;
  uint32_t payload_bytes;
  uint32_t steps;
} ws_slot;

typedef struct ws_store {
  const ws_flash* flash;
  uint32_t layout;
  uint32_t payload_bytes;
  uint32_t slot_sectors;
  ws_slot slots[2];
  int newest;              /* slot with the newest valid state, -1: none */
  uint32_t commit_erases;  /* device calls of the last commit */
  uint32_t commit_programs;
} ws_store;

/* CRC-32 (zlib's crc32: ws_crc32(0, data, n) == zlib.crc32(data)), chainable. */
uint32_t ws_crc32(uint32_t crc, const void* data, uint32_t bytes);

/* Sectors of one slot holding payload_bytes (0 if the geometry is invalid). */
uint32_t ws_slot_sectors(uint32_t sector_bytes, uint32_t program_bytes,
                         uint32_t payload_bytes);

/* Check the geometry and scan both slots. WS_ERR_CONFIG if the region cannot hold two slots
 * of payload_bytes. layout: the caller's id of what the payload holds (a slot of another
 * layout is never loaded). */
int ws_open(ws_store* store, const ws_flash* flash, uint32_t layout, uint32_t payload_bytes);

/* Copy the newest valid slot into the segments: 1 loaded, 0 nothing to load (empty store,
 * or the newest state has another layout), < 0 error. */
int ws_load(ws_store* store, const ws_segment* segments, uint32_t count);

/* Write the segments as the new newest state (the commit record last) and read it back.
 * steps: kept in the record (the caller's count of training steps). */
int ws_commit(ws_store* store, const ws_segment* segments, uint32_t count, uint32_t steps);

#ifdef __cplusplus
}
#endif

#endif /* DGST_WEIGHT_STORE_H_ */
