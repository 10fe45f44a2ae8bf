/* Two-slot power-cut-safe state store in flash: format and rules in weight_store.h. */
#include "weight_store.h"

#include <string.h>

uint32_t ws_crc32(uint32_t crc, const void* data, uint32_t bytes) {
  const uint8_t* p = (const uint8_t*)data;
  uint32_t i;
  int bit;
  crc = ~crc;
  for (i = 0; i < bytes; ++i) {
    crc ^= p[i];
    for (bit = 0; bit < 8; ++bit) crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1u)));
  }
  return ~crc;
}

static uint32_t round_up(uint32_t n, uint32_t unit) { return (n + unit - 1u) / unit * unit; }

static int is_power_of_two(uint32_t n) { return n != 0u && (n & (n - 1u)) == 0u; }

uint32_t ws_slot_sectors(uint32_t sector_bytes, uint32_t program_bytes,
                         uint32_t payload_bytes) {
  uint64_t used;
  if (!is_power_of_two(program_bytes) || program_bytes < WS_RECORD_BYTES ||
      program_bytes > WS_MAX_PROGRAM_BYTES || sector_bytes % program_bytes != 0u) {
    return 0u;
  }
  used = (uint64_t)program_bytes + round_up(payload_bytes, program_bytes);
  return (uint32_t)((used + sector_bytes - 1u) / sector_bytes);
}

static uint32_t slot_offset(const ws_store* store, int slot) {
  return (uint32_t)slot * store->slot_sectors * store->flash->sector_bytes;
}

static uint32_t get32(const uint8_t* p) {
  return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void put32(uint8_t* p, uint32_t v) {
  p[0] = (uint8_t)v;
  p[1] = (uint8_t)(v >> 8);
  p[2] = (uint8_t)(v >> 16);
  p[3] = (uint8_t)(v >> 24);
}

/* CRC of `bytes` bytes of flash at `offset`, read through a small buffer. */
static int flash_crc(const ws_flash* flash, uint32_t offset, uint32_t bytes, uint32_t* crc) {
  uint8_t buffer[64];
  *crc = 0u;
  while (bytes > 0u) {
    const uint32_t n = bytes < sizeof(buffer) ? bytes : (uint32_t)sizeof(buffer);
    if (flash->read(flash->ctx, offset, buffer, n) != 0) return WS_ERR_FLASH;
    *crc = ws_crc32(*crc, buffer, n);
    offset += n;
    bytes -= n;
  }
  return WS_OK;
}

/* Read and check slot `slot`'s record and payload into store->slots[slot]. */
static int scan_slot(ws_store* store, int slot) {
  const ws_flash* flash = store->flash;
  const uint32_t base = slot_offset(store, slot);
  const uint32_t capacity = store->slot_sectors * flash->sector_bytes - flash->program_bytes;
  ws_slot* info = &store->slots[slot];
  uint8_t record[WS_RECORD_BYTES];
  uint32_t crc;
  memset(info, 0, sizeof(*info));
  if (flash->read(flash->ctx, base, record, WS_RECORD_BYTES) != 0) return WS_ERR_FLASH;
  if (get32(record) != WS_MAGIC || get32(record + 4) != WS_VERSION ||
      get32(record + 28) != ws_crc32(0u, record, 28u) || get32(record + 16) > capacity) {
    return WS_OK;
  }
  if (flash_crc(flash, base + flash->program_bytes, get32(record + 16), &crc) != WS_OK) {
    return WS_ERR_FLASH;
  }
  info->valid = crc == get32(record + 20);
  info->sequence = get32(record + 8);
  info->layout = get32(record + 12);
  info->payload_bytes = get32(record + 16);
  info->steps = get32(record + 24);
  return WS_OK;
}

/* a is newer than b in serial-number order */
static int newer(uint32_t a, uint32_t b) { return (int32_t)(a - b) > 0; }

int ws_open(ws_store* store, const ws_flash* flash, uint32_t layout, uint32_t payload_bytes) {
  int slot;
  memset(store, 0, sizeof(*store));
  store->flash = flash;
  store->layout = layout;
  store->payload_bytes = payload_bytes;
  store->newest = -1;
  store->slot_sectors = ws_slot_sectors(flash->sector_bytes, flash->program_bytes,
                                        payload_bytes);
  if (store->slot_sectors == 0u || 2u * store->slot_sectors > flash->sectors) {
    return WS_ERR_CONFIG;
  }
  for (slot = 0; slot < 2; ++slot) {
    const int status = scan_slot(store, slot);
    if (status != WS_OK) return status;
    if (store->slots[slot].valid &&
        (store->newest < 0 ||
         newer(store->slots[slot].sequence, store->slots[store->newest].sequence))) {
      store->newest = slot;
    }
  }
  return WS_OK;
}

static uint32_t total_bytes(const ws_segment* segments, uint32_t count) {
  uint32_t i, total = 0u;
  for (i = 0; i < count; ++i) total += segments[i].bytes;
  return total;
}

int ws_load(ws_store* store, const ws_segment* segments, uint32_t count) {
  const ws_flash* flash = store->flash;
  const ws_slot* info;
  uint32_t offset, i;
  if (total_bytes(segments, count) != store->payload_bytes) return WS_ERR_CONFIG;
  if (store->newest < 0) return 0;
  info = &store->slots[store->newest];
  if (info->layout != store->layout || info->payload_bytes != store->payload_bytes) return 0;
  offset = slot_offset(store, store->newest) + flash->program_bytes;
  for (i = 0; i < count; ++i) {
    if (segments[i].bytes > 0u &&
        flash->read(flash->ctx, offset, segments[i].data, segments[i].bytes) != 0) {
      return WS_ERR_FLASH;
    }
    offset += segments[i].bytes;
  }
  return 1;
}

/* Program the segments as whole program units from `offset` (the last one 0xFF-padded). */
static int program_payload(ws_store* store, uint32_t offset, const ws_segment* segments,
                           uint32_t count, uint32_t* crc) {
  const ws_flash* flash = store->flash;
  uint8_t unit[WS_MAX_PROGRAM_BYTES];
  uint32_t fill = 0u, i;
  *crc = 0u;
  for (i = 0; i < count; ++i) {
    const uint8_t* data = (const uint8_t*)segments[i].data;
    uint32_t left = segments[i].bytes;
    *crc = ws_crc32(*crc, data, left);
    while (left > 0u) {
      const uint32_t room = flash->program_bytes - fill;
      const uint32_t n = left < room ? left : room;
      memcpy(unit + fill, data, n);
      fill += n;
      data += n;
      left -= n;
      if (fill == flash->program_bytes) {
        if (flash->program(flash->ctx, offset, unit, fill) != 0) return WS_ERR_FLASH;
        ++store->commit_programs;
        offset += fill;
        fill = 0u;
      }
    }
  }
  if (fill > 0u) {
    memset(unit + fill, 0xFF, flash->program_bytes - fill);
    if (flash->program(flash->ctx, offset, unit, flash->program_bytes) != 0) {
      return WS_ERR_FLASH;
    }
    ++store->commit_programs;
  }
  return WS_OK;
}

int ws_commit(ws_store* store, const ws_segment* segments, uint32_t count, uint32_t steps) {
  const ws_flash* flash = store->flash;
  const int target = store->newest == 0 ? 1 : 0;
  const uint32_t base = slot_offset(store, target);
  const uint32_t sequence = store->newest < 0 ? 1u : store->slots[store->newest].sequence + 1u;
  uint8_t record[WS_MAX_PROGRAM_BYTES];
  uint32_t crc, s;
  int status;
  if (total_bytes(segments, count) != store->payload_bytes) return WS_ERR_CONFIG;
  store->commit_erases = 0u;
  store->commit_programs = 0u;
  for (s = 0; s < store->slot_sectors; ++s) {
    if (flash->erase(flash->ctx, (uint32_t)target * store->slot_sectors + s) != 0) {
      return WS_ERR_FLASH;
    }
    ++store->commit_erases;
  }
  status = program_payload(store, base + flash->program_bytes, segments, count, &crc);
  if (status != WS_OK) return status;
  memset(record, 0xFF, flash->program_bytes);
  put32(record, WS_MAGIC);
  put32(record + 4, WS_VERSION);
  put32(record + 8, sequence);
  put32(record + 12, store->layout);
  put32(record + 16, store->payload_bytes);
  put32(record + 20, crc);
  put32(record + 24, steps);
  put32(record + 28, ws_crc32(0u, record, 28u));
  if (flash->program(flash->ctx, base, record, flash->program_bytes) != 0) return WS_ERR_FLASH;
  ++store->commit_programs;
  status = scan_slot(store, target);
  if (status != WS_OK) return status;
  if (!store->slots[target].valid || store->slots[target].sequence != sequence) {
    return WS_ERR_VERIFY;
  }
  store->newest = target;
  return WS_OK;
}
