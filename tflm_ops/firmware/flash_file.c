/* NOR flash in a file with power-cut injection: see flash_file.h. */
#include "flash_file.h"

#include <string.h>

#define CHUNK 256u

static int seek(FILE* file, uint32_t offset) { return fseek(file, (long)offset, SEEK_SET); }

/* Write `bytes` erased bytes (0xFF) at `offset`. */
static int fill_erased(FILE* file, uint32_t offset, uint32_t bytes) {
  uint8_t ones[CHUNK];
  memset(ones, 0xFF, sizeof(ones));
  if (seek(file, offset) != 0) return -1;
  while (bytes > 0u) {
    const uint32_t n = bytes < CHUNK ? bytes : CHUNK;
    if (fwrite(ones, 1, n, file) != n) return -1;
    bytes -= n;
  }
  return fflush(file) == 0 ? 0 : -1;
}

/* Count write `writes + 1`; how many of `bytes` it may write before the power cut. */
static uint32_t begin_write(flash_file* f, uint32_t bytes) {
  ++f->writes;
  if (f->cut_after == 0u || f->writes < f->cut_after) return bytes;
  f->dead = 1;
  return f->torn_bytes > 0u && f->torn_bytes < bytes ? f->torn_bytes : bytes;
}

static int region_bytes(const flash_file* f, uint32_t offset, uint32_t bytes) {
  return offset <= f->flash.sectors * f->flash.sector_bytes &&
         bytes <= f->flash.sectors * f->flash.sector_bytes - offset;
}

static int flash_erase(void* ctx, uint32_t sector) {
  flash_file* f = (flash_file*)ctx;
  uint32_t n;
  if (f->dead || sector >= f->flash.sectors) return -1;
  ++f->erases;
  n = begin_write(f, f->flash.sector_bytes);
  return fill_erased(f->file, sector * f->flash.sector_bytes, n) == 0 && !f->dead ? 0 : -1;
}

static int flash_program(void* ctx, uint32_t offset, const void* data, uint32_t bytes) {
  flash_file* f = (flash_file*)ctx;
  const uint8_t* src = (const uint8_t*)data;
  uint8_t old[CHUNK];
  uint32_t n, i, done = 0u;
  const uint32_t unit = f->flash.program_bytes;
  if (f->dead || offset % unit != 0u || bytes % unit != 0u || !region_bytes(f, offset, bytes)) {
    return -1;
  }
  n = begin_write(f, bytes);
  while (done < n) {
    const uint32_t m = n - done < CHUNK ? n - done : CHUNK;
    if (seek(f->file, offset + done) != 0 || fread(old, 1, m, f->file) != m) return -1;
    for (i = 0; i < m; ++i) old[i] &= src[done + i];
    if (seek(f->file, offset + done) != 0 || fwrite(old, 1, m, f->file) != m) return -1;
    done += m;
  }
  return fflush(f->file) == 0 && !f->dead ? 0 : -1;
}

static int flash_read(void* ctx, uint32_t offset, void* data, uint32_t bytes) {
  flash_file* f = (flash_file*)ctx;
  if (f->dead || !region_bytes(f, offset, bytes)) return -1;
  if (seek(f->file, offset) != 0) return -1;
  return fread(data, 1, bytes, f->file) == bytes ? 0 : -1;
}

int flash_file_open(flash_file* f, const char* path, uint32_t sector_bytes,
                    uint32_t program_bytes, uint32_t sectors) {
  long size;
  const uint32_t total = sector_bytes * sectors;
  memset(f, 0, sizeof(*f));
  if (program_bytes == 0u || sector_bytes % program_bytes != 0u || sectors == 0u ||
      total / sectors != sector_bytes) {
    return -2;
  }
  f->flash.sector_bytes = sector_bytes;
  f->flash.program_bytes = program_bytes;
  f->flash.sectors = sectors;
  f->flash.erase = flash_erase;
  f->flash.program = flash_program;
  f->flash.read = flash_read;
  f->flash.ctx = f;
  f->file = fopen(path, "r+b");
  if (f->file == NULL) f->file = fopen(path, "w+b");
  if (f->file == NULL) return -1;
  if (fseek(f->file, 0L, SEEK_END) != 0 || (size = ftell(f->file)) < 0) return -1;
  if ((uint32_t)size >= total) return 0;
  return fill_erased(f->file, (uint32_t)size, total - (uint32_t)size);
}

void flash_file_cut_power(flash_file* f, uint32_t after, uint32_t torn_bytes) {
  f->cut_after = after;
  f->torn_bytes = torn_bytes;
}

int flash_file_close(flash_file* f) {
  int status = 0;
  if (f->file != NULL) status = fclose(f->file);
  f->file = NULL;
  return status == 0 ? 0 : -1;
}
