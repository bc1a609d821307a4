/*
 * vhdx_native.c - hot paths of the vhdx reader and merge engine.
 *
 * SPDX-License-Identifier: Apache-2.0
 *
 * See vhdx_native.h for the contract. The code is plain C99; Linux-only
 * facilities (FICLONERANGE, copy_file_range, FALLOC_FL_ZERO_RANGE,
 * FS_IOC_FIEMAP) are behind #ifdefs and degrade to portable fallbacks.
 */

/* Must precede every system header: 64-bit off_t on 32-bit hosts and the
 * GNU declarations (copy_file_range, fallocate) on Linux. */
#if defined(__linux__) && !defined(_GNU_SOURCE)
#define _GNU_SOURCE 1
#endif
#ifndef _FILE_OFFSET_BITS
#define _FILE_OFFSET_BITS 64
#endif

#include "vhdx_native.h"

#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>

#if defined(__unix__) || defined(__unix) || (defined(__APPLE__) && defined(__MACH__))
#define VHDX_POSIX 1
#include <fcntl.h>
#include <pthread.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>
#else
#define VHDX_POSIX 0
#endif

#if defined(__linux__)
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <sys/vfs.h>
#include <linux/fiemap.h>
#include <linux/fs.h>
#ifndef FALLOC_FL_ZERO_RANGE
#include <linux/falloc.h>
#endif
#endif

#ifndef ENOTSUP
#define ENOTSUP EOPNOTSUPP
#endif

/* Largest request handed to one read/write-type syscall. Linux caps single
 * transfers at 0x7ffff000 bytes anyway; staying below keeps ssize_t math
 * trivially safe on every platform. */
#define VHDX_IO_CHUNK ((size_t)1 << 30)
/* Bounce buffer for the pread/pwrite copy path: big enough to amortise the
 * syscalls, page aligned so O_DIRECT-ish file systems are happy. */
#define VHDX_RW_BUF ((size_t)4 << 20)
/* Zero buffer for vhdx_zero_ranges' pwrite fallback. */
#define VHDX_ZERO_BUF ((size_t)1 << 20)

int vhdx_native_io_supported(void) { return VHDX_POSIX; }

/* ------------------------------------------------------------------------ */
/* bitmap_runs                                                               */
/* ------------------------------------------------------------------------ */

static unsigned ctz64(uint64_t x) /* x != 0 */
{
#if defined(__GNUC__) || defined(__clang__)
    return (unsigned)__builtin_ctzll(x);
#else
    unsigned n = 0;
    while (!(x & 1u)) {
        x >>= 1;
        n++;
    }
    return n;
#endif
}

/* 8 bytes as a little-endian word: bit i of the result is bit i&7 of byte
 * i>>3, which is exactly the VHDX sector-bitmap bit order. memcpy avoids
 * unaligned-access and strict-aliasing UB; compilers turn it into one load. */
static uint64_t load_le64(const uint8_t *p)
{
#if defined(__BYTE_ORDER__) && defined(__ORDER_LITTLE_ENDIAN__) && \
    __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    uint64_t v;
    memcpy(&v, p, sizeof v);
    return v;
#else
    return (uint64_t)p[0] | (uint64_t)p[1] << 8 | (uint64_t)p[2] << 16 |
           (uint64_t)p[3] << 24 | (uint64_t)p[4] << 32 | (uint64_t)p[5] << 40 |
           (uint64_t)p[6] << 48 | (uint64_t)p[7] << 56;
#endif
}

/*
 * First bit index in [pos, end) whose value differs from `value`, or end.
 * Only bytes [pos>>3, ceil(end/8)) are read; the caller guarantees those lie
 * inside the bitmap. Long runs cost one 64-bit compare per 64 bits.
 */
static uint64_t next_diff(const uint8_t *bm, uint64_t pos, uint64_t end,
                          int value)
{
    const unsigned inv8 = value ? 0xFFu : 0u;
    const uint64_t inv64 = value ? ~(uint64_t)0 : 0u;
    uint64_t endbyte, bi, r;

    if (pos >= end)
        return end;
    endbyte = (end + 7) >> 3; /* exclusive bound of the bytes we may read */

    /* Leading partial byte: drop the bits below pos. */
    if (pos & 7) {
        unsigned b = ((bm[pos >> 3] ^ inv8) & (0xFFu << (pos & 7))) & 0xFFu;
        if (b) {
            r = (pos & ~(uint64_t)7) + ctz64(b);
            return r < end ? r : end;
        }
        pos = (pos | 7) + 1;
        if (pos >= end)
            return end;
    }

    bi = pos >> 3;
    /* Whole words. Bits of the final word beyond `end` may be inspected but
     * the result is clamped, and the bytes themselves are in bounds. */
    while (endbyte - bi >= 8) {
        uint64_t w = load_le64(bm + bi) ^ inv64;
        if (w) {
            r = bi * 8 + ctz64(w);
            return r < end ? r : end;
        }
        bi += 8;
    }
    while (bi < endbyte) {
        unsigned b = (bm[bi] ^ inv8) & 0xFFu;
        if (b) {
            r = bi * 8 + ctz64(b);
            return r < end ? r : end;
        }
        bi++;
    }
    return end;
}

int vhdx_bitmap_runs(const uint8_t *bm, size_t bm_len, uint64_t start_bit,
                     uint64_t nbits, int64_t *out, size_t max_runs,
                     size_t *nruns, uint64_t *consumed)
{
    /* Capped at INT64_MAX so every relative start/length fits an int64. */
    uint64_t total = (uint64_t)bm_len > (uint64_t)INT64_MAX / 8
                         ? (uint64_t)INT64_MAX
                         : (uint64_t)bm_len * 8;
    uint64_t pos, end;
    size_t k = 0;

    *nruns = 0;
    *consumed = 0;
    if (start_bit > total || nbits > total - start_bit)
        return VHDX_EARG;
    if (nbits == 0)
        return 0;
    if (max_runs == 0 || out == NULL || bm == NULL)
        return VHDX_EARG; /* no progress possible: refuse rather than spin */

    pos = start_bit;
    end = start_bit + nbits;
    while (pos < end && k < max_runs) {
        int v = (bm[pos >> 3] >> (pos & 7)) & 1;
        uint64_t nx = next_diff(bm, pos + 1, end, v);
        out[3 * k] = (int64_t)(pos - start_bit);
        out[3 * k + 1] = (int64_t)(nx - pos);
        out[3 * k + 2] = v;
        k++;
        pos = nx;
    }
    *nruns = k;
    *consumed = pos - start_bit;
    return 0;
}

/* ------------------------------------------------------------------------ */
/* range validation shared by the I/O functions                              */
/* ------------------------------------------------------------------------ */

/* a >= 0, b >= 0 and a + b does not overflow int64 (i.e. off_t). */
static inline int range_ok(int64_t a, int64_t b)
{
    return a >= 0 && b >= 0 && a <= INT64_MAX - b;
}

#if VHDX_POSIX

/* Every later off_t conversion relies on this. */
typedef char vhdx_off_t_is_64bit[sizeof(off_t) >= 8 ? 1 : -1];

/* ------------------------------------------------------------------------ */
/* low-level I/O loops                                                       */
/* ------------------------------------------------------------------------ */

/* Read up to len bytes at off, looping over short reads and EINTR; *got is
 * what was read before EOF. */
static int pread_upto(int fd, uint8_t *p, size_t len, int64_t off, size_t *got)
{
    size_t done = 0;
    while (done < len) {
        size_t want = len - done;
        ssize_t r;
        if (want > VHDX_IO_CHUNK)
            want = VHDX_IO_CHUNK;
        r = pread(fd, p + done, want, (off_t)(off + (int64_t)done));
        if (r < 0) {
            if (errno == EINTR)
                continue;
            *got = done;
            return errno;
        }
        if (r == 0)
            break; /* EOF */
        done += (size_t)r;
    }
    *got = done;
    return 0;
}

/* Write exactly len bytes at off, looping over short writes and EINTR. */
static int pwrite_full(int fd, const uint8_t *p, size_t len, int64_t off)
{
    size_t done = 0;
    while (done < len) {
        size_t want = len - done;
        ssize_t r;
        if (want > VHDX_IO_CHUNK)
            want = VHDX_IO_CHUNK;
        r = pwrite(fd, p + done, want, (off_t)(off + (int64_t)done));
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        if (r == 0)
            return EIO; /* no progress and no error: never loop forever */
        done += (size_t)r;
    }
    return 0;
}

static inline int fstat_size(int fd, int64_t *size)
{
    struct stat st;
    if (fstat(fd, &st) != 0)
        return errno ? errno : EIO;
    *size = (int64_t)st.st_size;
    return 0;
}

/* ------------------------------------------------------------------------ */
/* gather_read                                                               */
/* ------------------------------------------------------------------------ */

int vhdx_gather_read(int fd, uint8_t *buf, size_t buf_len,
                     const int64_t *segs, size_t nsegs, size_t *failed)
{
    size_t i;

    *failed = 0;
    /* Validate the whole batch first so a bad segment never leaves the
     * buffer half-filled. */
    for (i = 0; i < nsegs; i++) {
        int64_t bo = segs[3 * i], fo = segs[3 * i + 1], len = segs[3 * i + 2];
        if (!range_ok(fo, len) || bo < 0 || len < 0 ||
            (uint64_t)bo > (uint64_t)buf_len ||
            (uint64_t)len > (uint64_t)buf_len - (uint64_t)bo) {
            *failed = i;
            return VHDX_EARG;
        }
    }
    for (i = 0; i < nsegs; i++) {
        int64_t bo = segs[3 * i], fo = segs[3 * i + 1], len = segs[3 * i + 2];
        size_t got;
        int err;
        if (len == 0)
            continue;
        err = pread_upto(fd, buf + bo, (size_t)len, fo, &got);
        if (err) {
            *failed = i;
            return err;
        }
        /* Past EOF reads as zeros: a VHDX may end inside its last block. */
        if (got < (size_t)len)
            memset(buf + bo + got, 0, (size_t)len - got);
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* chain reader                                                              */
/* ------------------------------------------------------------------------ */

#define VHDX_STATE_MASK 7u
#define VHDX_OFFSET_MASK UINT64_C(0xFFFFFFFFFFF00000)
#define VHDX_FULLY_PRESENT 6u
#define VHDX_PARTIALLY_PRESENT 7u
#define VHDX_NOT_PRESENT 0u
#define VHDX_SB_PRESENT 6u
#define VHDX_SRC_ZERO (-1)
/* Bitmap bytes cached per level (direct-mapped by block number), and the
 * slot-count bounds: 1 MiB holds the bits of 2048 blocks of 2 MiB (4 GiB of
 * disk at 512-byte sectors) or 128 of 32 MiB; 256 MiB blocks (64 KiB of bits
 * each) still get 16 slots. Bits are allocated per slot on first use. */
#define VHDX_BM_CACHE_BYTES ((uint64_t)1 << 20)
#define VHDX_BM_SLOTS_MIN 16u
#define VHDX_BM_SLOTS_MAX 4096u
/* Segments resolved without touching the heap (a 1 MiB read of a chain with
 * 4 KiB bitmap runs needs more, then the array grows). */
#define VHDX_STACK_SEGS 32

struct bm_slot {
    uint64_t block;
    uint8_t *bits; /* bm_bytes, allocated on first use */
    int valid;
};

struct rlevel {
    vhdx_rlevel d;
    unsigned bs_shift;   /* log2(block_size) */
    uint64_t bm_bytes;   /* sector-bitmap bytes per block */
    uint64_t nslots;     /* 0 when bitmaps are not cached */
    struct bm_slot *slots;
    /* Legacy VHD levels (vhdx_vhd_reader_new); kind 0 is a VHDX level. */
    int kind;               /* VHDX_KIND_* */
    const uint32_t *vbat;   /* VHD BAT: sector numbers, host order */
    uint64_t bm_span;       /* VHD: bytes of bitmap before each block's data */
};

#define VHDX_KIND_VHDX 0
#define VHDX_KIND_VHD_FIXED 1
#define VHDX_KIND_VHD_DYNAMIC 2 /* dynamic or differencing */
#define VHDX_VHD_UNUSED UINT32_C(0xFFFFFFFF)

struct vhdx_reader {
    size_t nlevels;
    pthread_mutex_t lock; /* guards every level's slots */
    struct rlevel *lv;
};

/* One piece of the caller's buffer: zeros (src < 0) or bytes of a file. */
struct rseg {
    uint64_t bo, len, fo;
    int64_t src;
};

struct rctx {
    struct vhdx_reader *r;
    uint64_t base; /* virtual offset of buf[0] */
    struct rseg *segs;
    size_t n, cap;
    int locked;
    struct rseg stack[VHDX_STACK_SEGS];
};

static int is_pow2(uint64_t x) { return x && !(x & (x - 1)); }

/* A reader with nlevels zeroed levels, or NULL (out of memory). */
static struct vhdx_reader *reader_alloc(size_t nlevels)
{
    struct vhdx_reader *r = (struct vhdx_reader *)calloc(1, sizeof *r);
    if (!r)
        return NULL;
    r->lv = (struct rlevel *)calloc(nlevels, sizeof *r->lv);
    if (!r->lv || pthread_mutex_init(&r->lock, NULL) != 0) {
        free(r->lv);
        free(r);
        return NULL;
    }
    r->nlevels = nlevels;
    return r;
}

/* The bitmap cache slots of a level that caches (bm_bytes set): 0 or ENOMEM. */
static int level_cache_init(struct rlevel *lv)
{
    uint64_t k;
    if (!lv->d.cache_bitmaps)
        return 0;
    k = VHDX_BM_CACHE_BYTES / lv->bm_bytes;
    if (k < VHDX_BM_SLOTS_MIN)
        k = VHDX_BM_SLOTS_MIN;
    if (k > VHDX_BM_SLOTS_MAX)
        k = VHDX_BM_SLOTS_MAX;
    lv->slots = (struct bm_slot *)calloc((size_t)k, sizeof *lv->slots);
    if (!lv->slots)
        return ENOMEM;
    lv->nslots = k;
    return 0;
}

int vhdx_reader_new(const vhdx_rlevel *levels, size_t nlevels,
                    vhdx_reader **out)
{
    struct vhdx_reader *r;
    size_t i;

    *out = NULL;
    if (!levels || nlevels == 0 || nlevels > (size_t)1 << 20)
        return VHDX_EARG;
    for (i = 0; i < nlevels; i++) {
        const vhdx_rlevel *d = &levels[i];
        if (!is_pow2(d->block_size) || !is_pow2(d->sector_size) ||
            d->sector_size < 512 || d->sector_size > 4096 ||
            d->block_size < (uint64_t)d->sector_size * 8 ||
            d->chunk_ratio == 0 || d->virtual_size > (uint64_t)INT64_MAX ||
            (d->bat == NULL && d->bat_entries))
            return VHDX_EARG;
        /* The bits of one chunk's blocks fill one 1 MiB sector-bitmap block. */
        if (d->chunk_ratio > ((uint64_t)1 << 23) ||
            d->chunk_ratio * (d->block_size / d->sector_size / 8) != ((uint64_t)1 << 20))
            return VHDX_EARG;
    }
    r = reader_alloc(nlevels);
    if (!r)
        return ENOMEM;
    for (i = 0; i < nlevels; i++) {
        struct rlevel *lv = &r->lv[i];
        lv->d = levels[i];
        while (((uint64_t)1 << lv->bs_shift) < lv->d.block_size)
            lv->bs_shift++;
        lv->bm_bytes = lv->d.block_size / lv->d.sector_size / 8;
        if (level_cache_init(lv)) {
            vhdx_reader_free(r);
            return ENOMEM;
        }
    }
    *out = r;
    return 0;
}

void vhdx_reader_free(vhdx_reader *r)
{
    size_t i;
    uint64_t k;
    if (!r)
        return;
    for (i = 0; i < r->nlevels; i++) {
        for (k = 0; k < r->lv[i].nslots; k++)
            free(r->lv[i].slots[k].bits);
        free(r->lv[i].slots);
    }
    pthread_mutex_destroy(&r->lock);
    free(r->lv);
    free(r);
}

void vhdx_reader_invalidate(vhdx_reader *r)
{
    size_t i;
    uint64_t k;
    if (!r)
        return;
    pthread_mutex_lock(&r->lock);
    for (i = 0; i < r->nlevels; i++)
        for (k = 0; k < r->lv[i].nslots; k++)
            r->lv[i].slots[k].valid = 0;
    pthread_mutex_unlock(&r->lock);
}

/* Append a segment, merging it into the previous one when it continues it
 * in the buffer and (for file bytes) in the same file. */
static int emit(struct rctx *c, uint64_t pos, uint64_t len, int64_t src, uint64_t fo)
{
    uint64_t bo = pos - c->base;
    if (c->n) {
        struct rseg *last = &c->segs[c->n - 1];
        if (last->src == src && last->bo + last->len == bo &&
            (src < 0 || last->fo + last->len == fo)) {
            last->len += len;
            return 0;
        }
    }
    if (c->n == c->cap) {
        size_t cap = c->cap * 2;
        struct rseg *s;
        if (c->segs == c->stack) {
            s = (struct rseg *)malloc(cap * sizeof *s);
            if (s)
                memcpy(s, c->stack, c->n * sizeof *s);
        } else {
            s = (struct rseg *)realloc(c->segs, cap * sizeof *s);
        }
        if (!s)
            return ENOMEM;
        c->segs = s;
        c->cap = cap;
    }
    c->segs[c->n].bo = bo;
    c->segs[c->n].len = len;
    c->segs[c->n].src = src;
    c->segs[c->n].fo = fo;
    c->n++;
    return 0;
}

/* Read `len` bitmap bytes at `off`; zeros past EOF. */
static int read_bits(int fd, uint8_t *p, uint64_t len, uint64_t off)
{
    size_t got;
    int err;
    if (off > (uint64_t)INT64_MAX || !range_ok((int64_t)off, (int64_t)len))
        return VHDX_EFALLBACK;
    err = pread_upto(fd, p, (size_t)len, (int64_t)off, &got);
    if (err)
        return err;
    if (got < len)
        memset(p + got, 0, (size_t)(len - got));
    return 0;
}

/* Reverse the bit order of every byte (VHD's MSB-first bitmaps become the
 * LSB-first order next_diff scans). */
static void bit_reverse(uint8_t *p, uint64_t n)
{
    uint64_t i;
    for (i = 0; i < n; i++) {
        unsigned b = p[i];
        b = ((b & 0xF0u) >> 4) | ((b & 0x0Fu) << 4);
        b = ((b & 0xCCu) >> 2) | ((b & 0x33u) << 2);
        b = ((b & 0xAAu) >> 1) | ((b & 0x55u) << 1);
        p[i] = (uint8_t)b;
    }
}

/* The whole bitmap of `block` at level `lv` from the cache (loaded on a
 * miss). Takes the reader's lock on first use; resolve() releases it. The
 * pointer stays valid until the lock is released: only this level's lookups
 * could evict the slot, and the caller makes none while it uses the bits. */
static int cached_bits(struct rctx *c, struct rlevel *lv, uint64_t block,
                       uint64_t bm_off, const uint8_t **bits)
{
    struct bm_slot *s;
    int err;
    if (!c->locked) {
        pthread_mutex_lock(&c->r->lock);
        c->locked = 1;
    }
    s = &lv->slots[block % lv->nslots];
    if (!(s->valid && s->block == block)) {
        s->valid = 0;
        if (!s->bits) {
            s->bits = (uint8_t *)malloc((size_t)lv->bm_bytes);
            if (!s->bits)
                return ENOMEM;
        }
        err = read_bits(lv->d.fd, s->bits, lv->bm_bytes, bm_off);
        if (err)
            return err;
        if (lv->kind != VHDX_KIND_VHDX) /* VHD bitmaps are MSB-first */
            bit_reverse(s->bits, lv->bm_bytes);
        s->block = block;
        s->valid = 1;
    }
    *bits = s->bits;
    return 0;
}

static int resolve(struct rctx *c, size_t level, uint64_t off, uint64_t len);
static int resolve_vhd(struct rctx *c, size_t level, uint64_t off, uint64_t len);

/* Block-relative bytes [rel, rel_end) of `level` by the runs of its LSB-first
 * sector bits (bit 0 of `bits` = sector `bitbase`; sectors below s1 are
 * covered): 1 = this file's bytes at foff + rel, 0 = the parent's (zeros at
 * the end of the chain). */
static int bit_runs(struct rctx *c, size_t level, const uint8_t *bits, uint64_t bitbase,
                    uint64_t lss, uint64_t bstart, uint64_t foff, uint64_t rel,
                    uint64_t rel_end, uint64_t s1)
{
    int err = 0;
    while (!err && rel < rel_end) {
        uint64_t s = rel / lss - bitbase, nx, run_end;
        int v = (bits[s >> 3] >> (s & 7)) & 1;
        nx = next_diff(bits, s + 1, s1 - bitbase, v) + bitbase;
        run_end = nx * lss < rel_end ? nx * lss : rel_end;
        if (v)
            err = emit(c, bstart + rel, run_end - rel, (int64_t)level, foff + rel);
        else if (level + 1 < c->r->nlevels)
            err = resolve(c, level + 1, bstart + rel, run_end - rel);
        else
            err = emit(c, bstart + rel, run_end - rel, VHDX_SRC_ZERO, 0);
        rel = run_end;
    }
    return err;
}

/* [pos, pos+n) inside PARTIALLY_PRESENT `block` (data at foff) of `level`. */
static int resolve_partial(struct rctx *c, size_t level, uint64_t block,
                           uint64_t bstart, uint64_t foff, uint64_t pos, uint64_t n)
{
    struct rlevel *lv = &c->r->lv[level];
    const uint64_t lss = lv->d.sector_size, cr = lv->d.chunk_ratio;
    const uint64_t sbi = (block / cr) * (cr + 1) + cr;
    uint64_t rel = pos - bstart, rel_end = rel + n, s1, bitbase = 0, sb, bm_off;
    const uint8_t *bits;
    uint8_t *own = NULL;
    int err = 0;

    if (sbi >= lv->d.bat_entries)
        return VHDX_EFALLBACK;
    sb = lv->d.bat[sbi];
    if ((sb & VHDX_STATE_MASK) != VHDX_SB_PRESENT)
        return VHDX_EFALLBACK; /* corrupt: the Python path names it */
    bm_off = (sb & VHDX_OFFSET_MASK) + (block % cr) * lv->bm_bytes;
    s1 = (rel_end + lss - 1) / lss; /* sectors [rel/lss, s1) are touched */
    if (lv->nslots) {
        err = cached_bits(c, lv, block, bm_off, &bits);
    } else {
        /* Uncached: only the bytes holding the touched sectors' bits. */
        uint64_t b0 = rel / lss / 8, b1 = (s1 + 7) / 8;
        own = (uint8_t *)malloc((size_t)(b1 - b0));
        if (!own)
            return ENOMEM;
        err = read_bits(lv->d.fd, own, b1 - b0, bm_off + b0);
        bits = own;
        bitbase = b0 * 8;
    }
    if (!err)
        err = bit_runs(c, level, bits, bitbase, lss, bstart, foff, rel, rel_end, s1);
    free(own);
    return err;
}

/* Append the segments of virtual [off, off+len) as `level` sees it. */
static int resolve(struct rctx *c, size_t level, uint64_t off, uint64_t len)
{
    struct rlevel *lv = &c->r->lv[level];
    const uint64_t end = off + len, vsize = lv->d.virtual_size;
    const uint64_t bs = lv->d.block_size, cr = lv->d.chunk_ratio;
    uint64_t tail = end, pos = off;
    int err = 0;

    if (lv->kind != VHDX_KIND_VHDX)
        return resolve_vhd(c, level, off, len);
    if (end > vsize) {
        if (off >= vsize)
            return emit(c, off, len, VHDX_SRC_ZERO, 0);
        tail = vsize;
    }
    while (!err && pos < tail) {
        const uint64_t block = pos >> lv->bs_shift, bstart = block << lv->bs_shift;
        const uint64_t idx = block + block / cr;
        const uint64_t n = (tail < bstart + bs ? tail : bstart + bs) - pos;
        uint64_t e;
        unsigned state;
        if (idx >= lv->d.bat_entries)
            return VHDX_EFALLBACK;
        e = lv->d.bat[idx];
        state = (unsigned)(e & VHDX_STATE_MASK);
        /* Keep every file offset below INT64_MAX without overflow checks
         * further down (validated BATs never come near it). */
        if ((state == VHDX_FULLY_PRESENT || state == VHDX_PARTIALLY_PRESENT) &&
            (e & VHDX_OFFSET_MASK) > (uint64_t)INT64_MAX - bs)
            return VHDX_EFALLBACK;
        if (state == VHDX_FULLY_PRESENT)
            err = emit(c, pos, n, (int64_t)level, (e & VHDX_OFFSET_MASK) + (pos - bstart));
        else if (state == VHDX_PARTIALLY_PRESENT)
            err = resolve_partial(c, level, block, bstart, e & VHDX_OFFSET_MASK, pos, n);
        else if (state == VHDX_NOT_PRESENT && level + 1 < c->r->nlevels)
            err = resolve(c, level + 1, pos, n);
        else /* NOT_PRESENT at the end of the chain, ZERO, UNDEFINED, UNMAPPED */
            err = emit(c, pos, n, VHDX_SRC_ZERO, 0);
        pos += n;
    }
    if (!err && tail < end)
        err = emit(c, tail, end - tail, VHDX_SRC_ZERO, 0);
    return err;
}

/* [pos, pos+n) inside allocated VHD `block` (bitmap at bm_off) of `level`
 * (docs/vhd.md: a 1 bit is this file's sector, a 0 bit the parent's). */
static int resolve_vhd_bits(struct rctx *c, size_t level, uint64_t bstart,
                            uint64_t bm_off, uint64_t pos, uint64_t n, uint64_t block)
{
    struct rlevel *lv = &c->r->lv[level];
    const uint64_t foff = bm_off + lv->bm_span;
    uint64_t rel = pos - bstart, rel_end = rel + n, s1, bitbase = 0;
    const uint8_t *bits;
    uint8_t *own = NULL;
    int err = 0;

    s1 = (rel_end + 511) / 512; /* sectors [rel/512, s1) are touched */
    if (lv->nslots) {
        err = cached_bits(c, lv, block, bm_off, &bits);
    } else {
        uint64_t b0 = rel / 512 / 8, b1 = (s1 + 7) / 8;
        own = (uint8_t *)malloc((size_t)(b1 - b0));
        if (!own)
            return ENOMEM;
        err = read_bits(lv->d.fd, own, b1 - b0, bm_off + b0);
        if (!err)
            bit_reverse(own, b1 - b0);
        bits = own;
        bitbase = b0 * 8;
    }
    if (!err)
        err = bit_runs(c, level, bits, bitbase, 512, bstart, foff, rel, rel_end, s1);
    free(own);
    return err;
}

/* Virtual [off, off+len) as VHD `level` sees it: a fixed file maps 1:1; a
 * dynamic block is unused (parent, else zeros) or allocated (its bitmap
 * decides per sector); past the level's virtual size reads zeros. */
static int resolve_vhd(struct rctx *c, size_t level, uint64_t off, uint64_t len)
{
    struct rlevel *lv = &c->r->lv[level];
    const uint64_t end = off + len, vsize = lv->d.virtual_size, bs = lv->d.block_size;
    uint64_t tail = end, pos = off;
    int err = 0;

    if (end > vsize) {
        if (off >= vsize)
            return emit(c, off, len, VHDX_SRC_ZERO, 0);
        tail = vsize;
    }
    if (lv->kind == VHDX_KIND_VHD_FIXED) {
        err = emit(c, off, tail - off, (int64_t)level, off);
    } else {
        while (!err && pos < tail) {
            const uint64_t block = pos >> lv->bs_shift, bstart = block << lv->bs_shift;
            const uint64_t n = (tail < bstart + bs ? tail : bstart + bs) - pos;
            uint32_t e;
            if (block >= lv->d.bat_entries)
                return VHDX_EFALLBACK;
            e = lv->vbat[block];
            if (e == VHDX_VHD_UNUSED) {
                if (level + 1 < c->r->nlevels)
                    err = resolve(c, level + 1, pos, n);
                else
                    err = emit(c, pos, n, VHDX_SRC_ZERO, 0);
            } else {
                err = resolve_vhd_bits(c, level, bstart, (uint64_t)e * 512, pos, n, block);
            }
            pos += n;
        }
    }
    if (!err && tail < end)
        err = emit(c, tail, end - tail, VHDX_SRC_ZERO, 0);
    return err;
}

/* Geometry a VHD level must have (the Python side enforces vhd.md §10). */
static int vhd_level_ok(const vhdx_vhd_level *d)
{
    if (d->virtual_size > (uint64_t)INT64_MAX || d->virtual_size % 512)
        return 0;
    return d->fixed || (is_pow2(d->block_size) && d->block_size >= 512 &&
                        d->block_size <= ((uint64_t)1 << 31) && d->bat != NULL &&
                        d->bat_entries >= (d->virtual_size + d->block_size - 1) / d->block_size);
}

int vhdx_vhd_reader_new(const vhdx_vhd_level *levels, size_t nlevels,
                        vhdx_reader **out)
{
    size_t i, bad = !levels || nlevels == 0 || nlevels > (size_t)1 << 20;
    struct vhdx_reader *r;

    *out = NULL;
    for (i = 0; !bad && i < nlevels; i++)
        bad = !vhd_level_ok(&levels[i]);
    if (bad)
        return VHDX_EARG;
    r = reader_alloc(nlevels);
    if (!r)
        return ENOMEM;
    for (i = 0; i < nlevels; i++) {
        const vhdx_vhd_level *d = &levels[i];
        struct rlevel *lv = &r->lv[i];
        lv->d.fd = d->fd;
        lv->d.virtual_size = d->virtual_size;
        lv->d.sector_size = 512;
        lv->d.chunk_ratio = 1;
        if (d->fixed) {
            lv->kind = VHDX_KIND_VHD_FIXED;
            continue;
        }
        lv->kind = VHDX_KIND_VHD_DYNAMIC;
        lv->vbat = d->bat;
        lv->d.bat_entries = d->bat_entries;
        lv->d.block_size = d->block_size;
        while (((uint64_t)1 << lv->bs_shift) < d->block_size)
            lv->bs_shift++;
        /* Bits of the block's sectors, padded to whole sectors (docs/vhd.md). */
        lv->bm_bytes = (d->block_size / 512 + 7) / 8;
        lv->bm_span = (lv->bm_bytes + 511) / 512 * 512;
        lv->d.cache_bitmaps = d->cache_bitmaps;
        if (level_cache_init(lv)) {
            vhdx_reader_free(r);
            return ENOMEM;
        }
    }
    *out = r;
    return 0;
}

static int reader_fill(vhdx_reader *r, uint64_t offset, uint8_t *buf, uint64_t len)
{
    struct rctx c;
    size_t i;
    int err;

    c.r = r;
    c.base = offset;
    c.segs = c.stack;
    c.n = 0;
    c.cap = VHDX_STACK_SEGS;
    c.locked = 0;
    err = resolve(&c, 0, offset, len);
    if (c.locked)
        pthread_mutex_unlock(&r->lock);
    /* The I/O runs unlocked: concurrent reads overlap their syscalls. */
    for (i = 0; !err && i < c.n; i++) {
        const struct rseg *s = &c.segs[i];
        size_t got;
        if (s->src < 0) {
            memset(buf + s->bo, 0, (size_t)s->len);
            continue;
        }
        err = pread_upto(r->lv[s->src].d.fd, buf + s->bo, (size_t)s->len, (int64_t)s->fo, &got);
        if (!err && got < s->len) /* past EOF reads as zeros */
            memset(buf + s->bo + got, 0, (size_t)(s->len - got));
    }
    if (c.segs != c.stack)
        free(c.segs);
    return err;
}

int64_t vhdx_reader_read(vhdx_reader *r, uint64_t offset, uint8_t *buf,
                         size_t len, int *err)
{
    uint64_t n = len, vsize;
    int e;

    if (!r || (!buf && len) || offset > (uint64_t)INT64_MAX ||
        (uint64_t)len > (uint64_t)INT64_MAX - offset) {
        e = VHDX_EARG;
        goto fail;
    }
    vsize = r->lv[0].d.virtual_size;
    if (offset >= vsize)
        return 0;
    if (n > vsize - offset)
        n = vsize - offset;
    e = reader_fill(r, offset, buf, n);
    if (!e)
        return (int64_t)n;
fail:
    if (err)
        *err = e;
    return -1;
}

/* ------------------------------------------------------------------------ */
/* copy_ranges                                                               */
/* ------------------------------------------------------------------------ */

struct copy_ctx {
    int src, dst, flags;
    int clone_ok;      /* cleared once the fs pair refuses cloning */
    int cfr_ok;        /* cleared once copy_file_range is unusable */
    int clone_einval;  /* EINVALs on aligned ranges, see try_clone */
    int clone_success; /* at least one clone worked in this batch */
    uint64_t blksz;    /* destination fs block size, 0 = not yet known */
    uint8_t *buf;      /* bounce buffer, allocated on first use */
};

#if defined(__linux__) && defined(FICLONERANGE)
/* Block size that FICLONERANGE offsets must be multiples of: the destination
 * super block's s_blocksize, which statfs reports as f_bsize. */
static uint64_t dst_block_size(int fd)
{
    struct statfs sf;
    struct stat st;
    int r;
    do
        r = fstatfs(fd, &sf);
    while (r != 0 && errno == EINTR);
    if (r == 0 && sf.f_bsize > 0)
        return (uint64_t)sf.f_bsize;
    if (fstat(fd, &st) == 0 && st.st_blksize > 0)
        return (uint64_t)st.st_blksize;
    return 0;
}

/* 1 = cloned, 0 = not cloned (caller falls back). Clone failures are never
 * fatal: whatever real problem there is will be reported by the copy. */
static int try_clone(struct copy_ctx *c, int64_t so, int64_t dof, int64_t len)
{
    struct file_clone_range a;
    int r;

    if (c->blksz == 0) {
        c->blksz = dst_block_size(c->dst);
        if (c->blksz == 0) {
            c->clone_ok = 0;
            return 0;
        }
    }
    if ((uint64_t)so % c->blksz || (uint64_t)dof % c->blksz)
        return 0;
    if ((uint64_t)len % c->blksz) {
        /* The kernel only clones a partial final block when the range ends
         * at the source's EOF. It then shares the whole block, so we also
         * require that no destination data follows the range (otherwise
         * the tail of that block in the destination would be replaced by
         * the source's post-EOF bytes). */
        int64_t ssz = -1, dsz = INT64_MAX;
        if (fstat_size(c->src, &ssz) || so + len != ssz)
            return 0;
        if (fstat_size(c->dst, &dsz) || dof + len < dsz)
            return 0;
    }
    a.src_fd = c->src;
    a.src_offset = (uint64_t)so;
    a.src_length = (uint64_t)len; /* never 0 here: 0 would mean "to EOF" */
    a.dest_offset = (uint64_t)dof;
    do
        r = ioctl(c->dst, FICLONERANGE, &a);
    while (r != 0 && errno == EINTR); /* cloning the same range is idempotent */
    if (r == 0) {
        c->clone_success = 1;
        return 1;
    }
    if (errno == EINVAL) {
        /* Per-range reasons (overlap in one file, range beyond the source's
         * EOF, realtime-extent alignment) give EINVAL, so one EINVAL is no
         * verdict on the file system. Several on aligned ranges with no
         * success at all is: stop paying for the ioctl. */
        if (!c->clone_success && ++c->clone_einval >= 4)
            c->clone_ok = 0;
        return 0;
    }
    /* EOPNOTSUPP, ENOTTY, EXDEV, ENOSYS, EPERM, ETXTBSY, EBADF, ...: a
     * property of this source/destination pair, valid for the whole batch. */
    c->clone_ok = 0;
    return 0;
}
#endif

#if defined(__linux__) && defined(__GLIBC__) && \
    (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 27))
#define VHDX_CFR_LIBC 1 /* glibc wrapper: also lets tests interpose it */
#endif
#if defined(__linux__) && (defined(VHDX_CFR_LIBC) || defined(SYS_copy_file_range))
#define VHDX_HAVE_CFR 1
static ssize_t vhdx_cfr(int in, int64_t *oin, int out, int64_t *oout, size_t n)
{
#if defined(VHDX_CFR_LIBC)
    loff_t a = (loff_t)*oin, b = (loff_t)*oout;
    ssize_t r = copy_file_range(in, &a, out, &b, n, 0);
#else
    long long a = *oin, b = *oout; /* loff_t is 64-bit on every ABI */
    ssize_t r = (ssize_t)syscall(SYS_copy_file_range, in, &a, out, &b, n, 0u);
#endif
    if (r > 0) {
        *oin = (int64_t)a;
        *oout = (int64_t)b;
    }
    return r;
}
#else
#define VHDX_HAVE_CFR 0
#endif

/* pread/pwrite [*so, *so+*len) to *dof through the bounce buffer. Source
 * bytes past EOF are written as zeros. */
static int copy_rw(struct copy_ctx *c, int64_t so, int64_t dof, int64_t len)
{
    int eof = 0;
    if (c->buf == NULL) {
        void *p = NULL;
        int err = posix_memalign(&p, 4096, VHDX_RW_BUF);
        if (err)
            return err;
        c->buf = (uint8_t *)p;
    }
    while (len > 0) {
        size_t want = (uint64_t)len > VHDX_RW_BUF ? VHDX_RW_BUF : (size_t)len;
        size_t got = 0;
        int err;
        if (!eof) {
            err = pread_upto(c->src, c->buf, want, so, &got);
            if (err)
                return err;
            eof = got < want;
        }
        if (got < want)
            memset(c->buf + got, 0, want - got);
        err = pwrite_full(c->dst, c->buf, want, dof);
        if (err)
            return err;
        so += (int64_t)want;
        dof += (int64_t)want;
        len -= (int64_t)want;
    }
    return 0;
}

static int copy_one(struct copy_ctx *c, int64_t so, int64_t dof, int64_t len,
                    int32_t *method)
{
    if (len == 0) {
        *method = VHDX_M_NONE;
        return 0;
    }
#if defined(__linux__) && defined(FICLONERANGE)
    if ((c->flags & VHDX_ALLOW_CLONE) && c->clone_ok &&
        try_clone(c, so, dof, len)) {
        *method = VHDX_M_CLONE;
        return 0;
    }
#endif
#if VHDX_HAVE_CFR
    if ((c->flags & VHDX_ALLOW_COPY_FILE_RANGE) && c->cfr_ok) {
        while (len > 0) {
            size_t want = (uint64_t)len > VHDX_IO_CHUNK ? VHDX_IO_CHUNK : (size_t)len;
            ssize_t r = vhdx_cfr(c->src, &so, c->dst, &dof, want);
            if (r < 0) {
                int e = errno;
                if (e == EINTR)
                    continue;
                if (e == ENOSYS || e == EXDEV || e == EOPNOTSUPP || e == ENOTSUP) {
                    c->cfr_ok = 0; /* property of the fd pair / kernel */
                    break;
                }
                if (e == EINVAL)
                    break; /* may be per range, e.g. overlap within a file */
                return e;  /* EBADF (O_APPEND!), EIO, ENOSPC, ...: real errors */
            }
            if (r == 0)
                break; /* EOF, or a file system that lies (procfs): let
                          pread decide and zero-fill what is really past EOF */
            len -= (int64_t)r;
        }
        if (len == 0) {
            *method = VHDX_M_COPY_FILE_RANGE;
            return 0;
        }
    }
#endif
    /* Reported as READ_WRITE even if copy_file_range did a prefix: the
     * code names the slowest method that touched the range. */
    *method = VHDX_M_READ_WRITE;
    return copy_rw(c, so, dof, len);
}

int vhdx_copy_ranges(int src_fd, int dst_fd, const int64_t *ranges, size_t n,
                     int flags, int32_t *methods, size_t *failed)
{
    struct copy_ctx c;
    size_t i;
    int err = 0;

    *failed = 0;
    for (i = 0; i < n; i++) {
        int64_t so = ranges[3 * i], dof = ranges[3 * i + 1], len = ranges[3 * i + 2];
        methods[i] = VHDX_M_NONE;
        if (!range_ok(so, len) || !range_ok(dof, len)) {
            *failed = i;
            return VHDX_EARG;
        }
    }
    memset(&c, 0, sizeof c);
    c.src = src_fd;
    c.dst = dst_fd;
    c.flags = flags;
    c.clone_ok = 1;
    c.cfr_ok = 1;
    for (i = 0; i < n; i++) {
        err = copy_one(&c, ranges[3 * i], ranges[3 * i + 1], ranges[3 * i + 2],
                       &methods[i]);
        if (err) {
            *failed = i;
            break;
        }
    }
    free(c.buf);
    return err;
}

/* ------------------------------------------------------------------------ */
/* zero_ranges                                                               */
/* ------------------------------------------------------------------------ */

int vhdx_zero_ranges(int fd, const int64_t *ranges, size_t n,
                     int32_t *methods, size_t *failed)
{
    uint8_t *zbuf = NULL;
    int falloc_ok = 1;
    size_t i;
    int err = 0;

    (void)falloc_ok;
    *failed = 0;
    for (i = 0; i < n; i++) {
        methods[i] = VHDX_M_NONE;
        if (!range_ok(ranges[2 * i], ranges[2 * i + 1])) {
            *failed = i;
            return VHDX_EARG;
        }
    }
    for (i = 0; i < n && !err; i++) {
        int64_t off = ranges[2 * i], len = ranges[2 * i + 1];
        if (len == 0)
            continue;
#if defined(__linux__) && defined(FALLOC_FL_ZERO_RANGE)
        if (falloc_ok) {
            /* Without FALLOC_FL_KEEP_SIZE the file grows like pwrite would. */
            int r;
            do
                r = fallocate(fd, FALLOC_FL_ZERO_RANGE, (off_t)off, (off_t)len);
            while (r != 0 && errno == EINTR);
            if (r == 0) {
                methods[i] = VHDX_M_FALLOCATE;
                continue;
            }
            if (errno == EOPNOTSUPP || errno == ENOTSUP || errno == ENOSYS ||
                errno == ENODEV) {
                falloc_ok = 0; /* the file system can't: don't ask again */
            } else if (errno != EINVAL) {
                err = errno; /* ENOSPC, EIO, EPERM, EBADF...: pwrite won't fix it */
                *failed = i;
                break;
            }
        }
#endif
        if (zbuf == NULL) {
            zbuf = (uint8_t *)calloc(1, VHDX_ZERO_BUF);
            if (zbuf == NULL) {
                err = ENOMEM;
                *failed = i;
                break;
            }
        }
        methods[i] = VHDX_M_WRITE_ZEROS;
        while (len > 0) {
            size_t want = (uint64_t)len > VHDX_ZERO_BUF ? VHDX_ZERO_BUF : (size_t)len;
            err = pwrite_full(fd, zbuf, want, off);
            if (err) {
                *failed = i;
                break;
            }
            off += (int64_t)want;
            len -= (int64_t)want;
        }
    }
    free(zbuf);
    return err;
}

/* ------------------------------------------------------------------------ */
/* fiemap_shared                                                             */
/* ------------------------------------------------------------------------ */

int vhdx_fiemap_shared(int fd, int64_t offset, int64_t length,
                       uint64_t *shared, uint64_t *mapped)
{
    *shared = 0;
    *mapped = 0;
    if (!range_ok(offset, length))
        return VHDX_EARG;
#if defined(__linux__) && defined(FS_IOC_FIEMAP)
    {
        enum { NEXT = 128 };
        const size_t sz = sizeof(struct fiemap) + NEXT * sizeof(struct fiemap_extent);
        struct fiemap *fm;
        uint64_t pos = (uint64_t)offset, end = (uint64_t)offset + (uint64_t)length;
        int err = 0;

        if (length == 0)
            return 0;
        fm = (struct fiemap *)malloc(sz);
        if (fm == NULL)
            return ENOMEM;
        while (pos < end) {
            uint64_t next = pos;
            int last = 0, r;
            uint32_t k;
            memset(fm, 0, sz);
            fm->fm_start = pos;
            fm->fm_length = end - pos;
            fm->fm_flags = FIEMAP_FLAG_SYNC; /* map delalloc data too */
            fm->fm_extent_count = NEXT;
            do
                r = ioctl(fd, FS_IOC_FIEMAP, fm);
            while (r != 0 && errno == EINTR);
            if (r != 0) {
                err = errno;
                break;
            }
            if (fm->fm_mapped_extents == 0)
                break; /* nothing more mapped (hole up to the end) */
            for (k = 0; k < fm->fm_mapped_extents && k < NEXT; k++) {
                const struct fiemap_extent *e = &fm->fm_extents[k];
                uint64_t lo = e->fe_logical > pos ? e->fe_logical : pos;
                uint64_t eend = e->fe_logical + e->fe_length;
                uint64_t hi = eend < end ? eend : end;
                if (hi > lo) {
                    *mapped += hi - lo;
                    if (e->fe_flags & FIEMAP_EXTENT_SHARED)
                        *shared += hi - lo;
                }
                if (eend > next)
                    next = eend;
                if (e->fe_flags & FIEMAP_EXTENT_LAST)
                    last = 1;
            }
            if (last || next <= pos)
                break; /* done, or no progress: never spin */
            pos = next;
        }
        free(fm);
        return err;
    }
#else
    (void)fd;
    return ENOSYS;
#endif
}

#else /* !VHDX_POSIX: only bitmap_runs is native; Python falls back. */

int vhdx_gather_read(int fd, uint8_t *buf, size_t buf_len,
                     const int64_t *segs, size_t nsegs, size_t *failed)
{
    (void)fd; (void)buf; (void)buf_len; (void)segs; (void)nsegs;
    *failed = 0;
    return ENOSYS;
}

int vhdx_reader_new(const vhdx_rlevel *levels, size_t nlevels,
                    vhdx_reader **out)
{
    (void)levels; (void)nlevels;
    *out = NULL;
    return ENOSYS;
}

int vhdx_vhd_reader_new(const vhdx_vhd_level *levels, size_t nlevels,
                        vhdx_reader **out)
{
    (void)levels; (void)nlevels;
    *out = NULL;
    return ENOSYS;
}

void vhdx_reader_free(vhdx_reader *r) { (void)r; }

void vhdx_reader_invalidate(vhdx_reader *r) { (void)r; }

int64_t vhdx_reader_read(vhdx_reader *r, uint64_t offset, uint8_t *buf,
                         size_t len, int *err)
{
    (void)r; (void)offset; (void)buf; (void)len;
    if (err)
        *err = ENOSYS;
    return -1;
}

int vhdx_copy_ranges(int src_fd, int dst_fd, const int64_t *ranges, size_t n,
                     int flags, int32_t *methods, size_t *failed)
{
    (void)src_fd; (void)dst_fd; (void)ranges; (void)n; (void)flags; (void)methods;
    *failed = 0;
    return ENOSYS;
}

int vhdx_zero_ranges(int fd, const int64_t *ranges, size_t n,
                     int32_t *methods, size_t *failed)
{
    (void)fd; (void)ranges; (void)n; (void)methods;
    *failed = 0;
    return ENOSYS;
}

int vhdx_fiemap_shared(int fd, int64_t offset, int64_t length,
                       uint64_t *shared, uint64_t *mapped)
{
    (void)fd; (void)offset; (void)length;
    *shared = 0;
    *mapped = 0;
    return ENOSYS;
}

#endif /* VHDX_POSIX */
