/*
 * vhdx_native.h - hot paths of the vhdx reader and merge engine.
 *
 * SPDX-License-Identifier: Apache-2.0
 *
 * Plain C99. Every function is self-contained, never touches Python, and
 * reports failure through its return value so the cffi caller (which runs
 * these with the GIL released) can turn it into the right exception.
 *
 * Return convention for the int-returning functions:
 *   0                  success
 *   > 0                an errno value from a failed system call
 *   VHDX_EARG (-1)     an argument is out of range (bad range / segment);
 *                      nothing was read or written for that batch
 * "*failed" (when present) receives the index of the range/segment that
 * caused a non-zero return.
 *
 * Range/segment lists are packed int64 arrays, 3 values per entry, so a
 * whole batch crosses the FFI boundary as one pointer.
 */
#ifndef VHDX_NATIVE_H
#define VHDX_NATIVE_H

#include <stddef.h>
#include <stdint.h>

#define VHDX_EARG (-1)
/* vhdx_reader_read: the read needs something only the Python path does
 * (a corrupt BAT/bitmap entry to report, an offset past int64). Nothing
 * useful is in the buffer; the caller must redo the read its own way. */
#define VHDX_EFALLBACK (-2)

/* Method codes reported per range by vhdx_copy_ranges / vhdx_zero_ranges. */
#define VHDX_M_NONE 0            /* zero-length range: nothing to do */
#define VHDX_M_CLONE 1           /* FICLONERANGE (shared extents) */
#define VHDX_M_COPY_FILE_RANGE 2 /* copy_file_range(2) */
#define VHDX_M_READ_WRITE 3      /* pread/pwrite through a bounce buffer */
#define VHDX_M_FALLOCATE 4       /* fallocate(FALLOC_FL_ZERO_RANGE) */
#define VHDX_M_WRITE_ZEROS 5     /* pwrite from a zero buffer */

/* Flags for vhdx_copy_ranges. */
#define VHDX_ALLOW_CLONE 1
#define VHDX_ALLOW_COPY_FILE_RANGE 2

/* Non-zero when the I/O functions are implemented on this platform
 * (POSIX pread/pwrite available). bitmap_runs always works. */
int vhdx_native_io_supported(void);

/*
 * Runs of equal bits of an LSB-first bitmap (bit i = byte i>>3, bit i&7)
 * over [start_bit, start_bit + nbits).
 * Writes at most max_runs runs into out as (relative start, length, value)
 * int64 triples and only ever emits complete runs, so a caller can resume at
 * start_bit + *consumed and the runs stay coalesced across calls.
 * Returns 0 or VHDX_EARG when the range does not lie inside bm_len bytes.
 */
int vhdx_bitmap_runs(const uint8_t *bm, size_t bm_len, uint64_t start_bit,
                     uint64_t nbits, int64_t *out, size_t max_runs,
                     size_t *nruns, uint64_t *consumed);

/*
 * segs: nsegs triples (buf_offset, file_offset, length). All segments are
 * bounds-checked before any I/O. Bytes past the file's EOF are zero-filled.
 */
int vhdx_gather_read(int fd, uint8_t *buf, size_t buf_len,
                     const int64_t *segs, size_t nsegs, size_t *failed);

/*
 * ranges: n triples (src_offset, dst_offset, length). methods[i] receives the
 * VHDX_M_* code used for range i. Source bytes past its EOF are written to
 * the destination as zeros.
 */
int vhdx_copy_ranges(int src_fd, int dst_fd, const int64_t *ranges, size_t n,
                     int flags, int32_t *methods, size_t *failed);

/* ranges: n pairs (offset, length). methods[i] receives VHDX_M_FALLOCATE,
 * VHDX_M_WRITE_ZEROS or VHDX_M_NONE. */
int vhdx_zero_ranges(int fd, const int64_t *ranges, size_t n,
                     int32_t *methods, size_t *failed);

/*
 * Chain reader: the whole read path of a virtual disk (MS-VHDX 2.5.1.1) over
 * a chain of files, child first. One call resolves a virtual range through
 * the BATs and sector bitmaps and fills the caller's buffer with pread and
 * memset, no Python involved, so it can run with the GIL released.
 *
 * Semantics (identical to vhdx/disk.py's resolver): FULLY_PRESENT reads the
 * file; PARTIALLY_PRESENT reads bitmap-1 sectors from this file and defers
 * bitmap-0 sectors to the parent; NOT_PRESENT defers to the parent (zeros at
 * the end of the chain); every other state reads zeros; a level's virtual
 * size ends it (zeros past it). File bytes past EOF read as zeros.
 *
 * The reader keeps pointers to the BATs (not copies): they must stay alive
 * and may be updated in place between reads. Sector-bitmap bytes are cached
 * per level when cache_bitmaps is set; vhdx_reader_invalidate drops them.
 * Reads may run concurrently from several threads (the cache is locked).
 */
typedef struct vhdx_rlevel {
    int fd;
    int cache_bitmaps;     /* 0: this file may change; read its bits each time */
    const uint64_t *bat;   /* decoded BAT entries, host byte order */
    uint64_t bat_entries;
    uint64_t virtual_size;
    uint64_t block_size;   /* power of two, >= 8 sectors */
    uint64_t chunk_ratio;  /* 2^23 * sector_size / block_size, >= 1 */
    uint32_t sector_size;  /* logical sector size, a power of two >= 512 */
} vhdx_rlevel;

typedef struct vhdx_reader vhdx_reader;

/* Copies the level descriptions. Returns 0, VHDX_EARG (bad geometry; *out
 * NULL), ENOMEM or ENOSYS (no POSIX I/O here). */
int vhdx_reader_new(const vhdx_rlevel *levels, size_t nlevels,
                    vhdx_reader **out);
void vhdx_reader_free(vhdx_reader *r);
/* Forget every cached sector bitmap (after the files' bitmaps changed). */
void vhdx_reader_invalidate(vhdx_reader *r);
/* Fill buf with the virtual bytes at offset: min(len, virtual size - offset)
 * bytes (0 at or past the end; the rest of buf is left alone). Returns that
 * count, or -1 with *err (if err is not NULL) set to an errno from a failed
 * read, VHDX_EARG (NULL reader or buffer, offset + len past INT64_MAX) or
 * VHDX_EFALLBACK; *err is left alone on success. */
int64_t vhdx_reader_read(vhdx_reader *r, uint64_t offset, uint8_t *buf,
                         size_t len, int *err);

/*
 * The same reader over a chain of legacy VHD / AVHD files (docs/vhd.md): the
 * BAT holds big-endian sector numbers on disk, given here decoded to host
 * order (0xFFFFFFFF: unused); an allocated block's MSB-first sector bitmap
 * (whole sectors) precedes its data. A fixed level maps 1:1. Read, free and
 * invalidate with the vhdx_reader_* functions above; the BATs are kept by
 * pointer, as there.
 */
typedef struct vhdx_vhd_level {
    int fd;
    int cache_bitmaps;
    int fixed;             /* 1: fixed disk (bat, block_size unused) */
    const uint32_t *bat;   /* BAT entries, host order */
    uint64_t bat_entries;
    uint64_t virtual_size; /* a multiple of 512 */
    uint64_t block_size;   /* power of two, 512 .. 2^31 */
} vhdx_vhd_level;

int vhdx_vhd_reader_new(const vhdx_vhd_level *levels, size_t nlevels,
                        vhdx_reader **out);

/* Bytes of [offset, offset+length) that are mapped, and of those, shared
 * (FIEMAP_EXTENT_SHARED). Linux only; ENOSYS elsewhere. */
int vhdx_fiemap_shared(int fd, int64_t offset, int64_t length,
                       uint64_t *shared, uint64_t *mapped);

#endif /* VHDX_NATIVE_H */
