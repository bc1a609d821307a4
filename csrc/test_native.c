/*
 * test_native.c - standalone driver for vhdx_native.c, meant to run under
 * AddressSanitizer + UBSan (see sanitize.sh).
 *
 * SPDX-License-Identifier: Apache-2.0
 *
 * Linked with -Wl,--wrap=... for pread64, pwrite64, copy_file_range,
 * fallocate64, ioctl and posix_memalign, so it can inject short transfers,
 * EINTR and chosen errnos, and count how often each syscall is tried (e.g.
 * to prove that a refused clone is not retried for every range).
 *
 * Buffers handed to the library are malloc'd with their exact size, so any
 * out-of-bounds access is an ASan report.
 *
 * usage: test_native [REFLINK_DIR]
 *   REFLINK_DIR (optional) is a directory on a reflink-capable file system
 *   (XFS -m reflink=1, btrfs); the clone success paths are tested there.
 */
#define _GNU_SOURCE 1
#define _FILE_OFFSET_BITS 64

#include "vhdx_native.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <linux/fs.h>

static int g_fail, g_checks;
#define CHECK(c)                                                              \
    do {                                                                      \
        g_checks++;                                                           \
        if (!(c)) {                                                           \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #c); \
            g_fail++;                                                         \
        }                                                                     \
    } while (0)

/* ------------------------------------------------------------------------ */
/* fault injection via ld --wrap                                            */
/* ------------------------------------------------------------------------ */

static struct {
    int on;            /* injection applies only while set */
    size_t short_max;  /* cap every transfer at this many bytes (0 = off) */
    int eintr_every;   /* every Nth call fails with EINTR first (0 = off) */
    int cfr_errno;     /* copy_file_range fails with this (0 = real call) */
    int clone_errno;   /* FICLONERANGE fails with this (0 = real call) */
    int falloc_errno;  /* fallocate fails with this (0 = real call) */
    int memalign_fail; /* posix_memalign returns ENOMEM */
    long calls, n_clone, n_cfr, n_falloc, n_pread, n_pwrite;
} inj;

static void inj_reset(void) { memset(&inj, 0, sizeof inj); }

static int inj_eintr(void)
{
    if (inj.on && inj.eintr_every && (++inj.calls % inj.eintr_every) == 0) {
        errno = EINTR;
        return 1;
    }
    return 0;
}

static size_t inj_len(size_t n)
{
    return (inj.on && inj.short_max && n > inj.short_max) ? inj.short_max : n;
}

ssize_t __real_pread64(int fd, void *b, size_t n, off_t off);
ssize_t __wrap_pread64(int fd, void *b, size_t n, off_t off)
{
    if (inj.on)
        inj.n_pread++;
    if (inj_eintr())
        return -1;
    return __real_pread64(fd, b, inj_len(n), off);
}

ssize_t __real_pwrite64(int fd, const void *b, size_t n, off_t off);
ssize_t __wrap_pwrite64(int fd, const void *b, size_t n, off_t off)
{
    if (inj.on)
        inj.n_pwrite++;
    if (inj_eintr())
        return -1;
    return __real_pwrite64(fd, b, inj_len(n), off);
}

ssize_t __real_copy_file_range(int in, loff_t *oin, int out, loff_t *oout,
                               size_t n, unsigned flags);
ssize_t __wrap_copy_file_range(int in, loff_t *oin, int out, loff_t *oout,
                               size_t n, unsigned flags)
{
    if (inj.on) {
        inj.n_cfr++;
        if (inj.cfr_errno) {
            errno = inj.cfr_errno;
            return -1;
        }
    }
    if (inj_eintr())
        return -1;
    return __real_copy_file_range(in, oin, out, oout, inj_len(n), flags);
}

int __real_fallocate64(int fd, int mode, off_t off, off_t len);
int __wrap_fallocate64(int fd, int mode, off_t off, off_t len)
{
    if (inj.on) {
        inj.n_falloc++;
        if (inj.falloc_errno) {
            errno = inj.falloc_errno;
            return -1;
        }
    }
    if (inj_eintr())
        return -1;
    return __real_fallocate64(fd, mode, off, len);
}

int __real_ioctl(int fd, unsigned long req, ...);
int __wrap_ioctl(int fd, unsigned long req, ...)
{
    va_list ap;
    void *arg;
    va_start(ap, req);
    arg = va_arg(ap, void *);
    va_end(ap);
    if (inj.on && req == (unsigned long)FICLONERANGE) {
        inj.n_clone++;
        if (inj.clone_errno) {
            errno = inj.clone_errno;
            return -1;
        }
    }
    if (inj_eintr())
        return -1;
    return __real_ioctl(fd, req, arg);
}

int __real_posix_memalign(void **p, size_t a, size_t n);
int __wrap_posix_memalign(void **p, size_t a, size_t n)
{
    if (inj.on && inj.memalign_fail)
        return ENOMEM;
    return __real_posix_memalign(p, a, n);
}

/* ------------------------------------------------------------------------ */
/* helpers                                                                  */
/* ------------------------------------------------------------------------ */

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint64_t rnd(void)
{
    uint64_t x = rng_state; /* xorshift64 */
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return rng_state = x;
}
static uint64_t rnd_below(uint64_t n) { return n ? rnd() % n : 0; }

static const char *g_tmpdir = "/tmp";

static int make_file(const char *dir, char *path_out, size_t cap)
{
    int fd;
    snprintf(path_out, cap, "%s/vhdx_native_test_XXXXXX", dir);
    fd = mkstemp(path_out);
    if (fd < 0) {
        perror("mkstemp");
        exit(2);
    }
    unlink(path_out); /* anonymous: nothing to clean up on failure */
    return fd;
}

static int64_t file_size(int fd)
{
    struct stat st;
    if (fstat(fd, &st) != 0) {
        perror("fstat");
        exit(2);
    }
    return (int64_t)st.st_size;
}

static void write_all(int fd, const uint8_t *p, size_t n, off_t off)
{
    while (n) {
        ssize_t r = pwrite(fd, p, n, off);
        if (r <= 0) {
            perror("pwrite");
            exit(2);
        }
        p += r;
        n -= (size_t)r;
        off += r;
    }
}

/* Whole file content into a malloc'd buffer (exact size, may be 0). */
static uint8_t *read_file(int fd, size_t *len)
{
    int64_t sz = file_size(fd);
    uint8_t *p = (uint8_t *)malloc(sz ? (size_t)sz : 1);
    size_t done = 0;
    while (done < (size_t)sz) {
        ssize_t r = pread(fd, p + done, (size_t)sz - done, (off_t)done);
        if (r <= 0) {
            perror("pread");
            exit(2);
        }
        done += (size_t)r;
    }
    *len = (size_t)sz;
    return p;
}

static uint8_t *random_bytes(size_t n)
{
    uint8_t *p = (uint8_t *)malloc(n ? n : 1);
    size_t i;
    for (i = 0; i < n; i++)
        p[i] = (uint8_t)rnd();
    return p;
}

/* ------------------------------------------------------------------------ */
/* bitmap_runs                                                              */
/* ------------------------------------------------------------------------ */

static int bit_at(const uint8_t *bm, uint64_t i) { return (bm[i >> 3] >> (i & 7)) & 1; }

/* Runs via the library (resuming after max_runs) checked bit by bit. */
static void check_runs(const uint8_t *bm, size_t len, uint64_t start, uint64_t nbits,
                       size_t max_runs)
{
    int64_t *out = (int64_t *)malloc(3 * max_runs * sizeof(int64_t));
    uint64_t done = 0, expect_pos = 0;
    int prev_v = -1;
    size_t nr, k;
    uint64_t cons;
    int rc;

    while (done < nbits) {
        rc = vhdx_bitmap_runs(bm, len, start + done, nbits - done, out, max_runs, &nr, &cons);
        CHECK(rc == 0);
        CHECK(nr >= 1 && nr <= max_runs);
        CHECK(cons > 0);
        if (rc != 0 || nr == 0 || cons == 0)
            break;
        for (k = 0; k < nr; k++) {
            uint64_t s = (uint64_t)out[3 * k] + done, n = (uint64_t)out[3 * k + 1], b;
            int v = (int)out[3 * k + 2];
            CHECK(s == expect_pos);          /* contiguous */
            CHECK(n > 0);
            CHECK(v == 0 || v == 1);
            CHECK(v != prev_v);              /* coalesced, also across calls */
            for (b = 0; b < n; b++)
                if (bit_at(bm, start + s + b) != v) {
                    CHECK(!"bit value mismatch");
                    break;
                }
            /* maximal: the bit after the run (inside the range) differs */
            if (s + n < nbits)
                CHECK(bit_at(bm, start + s + n) != v);
            expect_pos = s + n;
            prev_v = v;
        }
        done += cons;
        CHECK(done == expect_pos);
    }
    CHECK(expect_pos == nbits);
    free(out);
}

static void test_bitmap_runs(void)
{
    size_t iter;
    int64_t out[3 * 4];
    size_t nr;
    uint64_t cons;
    uint8_t one = 0xA5;

    /* argument edge cases */
    CHECK(vhdx_bitmap_runs(NULL, 0, 0, 0, out, 4, &nr, &cons) == 0 && nr == 0 && cons == 0);
    CHECK(vhdx_bitmap_runs(&one, 1, 8, 0, out, 4, &nr, &cons) == 0 && nr == 0);
    CHECK(vhdx_bitmap_runs(&one, 1, 9, 0, out, 4, &nr, &cons) == VHDX_EARG);
    CHECK(vhdx_bitmap_runs(&one, 1, 0, 9, out, 4, &nr, &cons) == VHDX_EARG);
    CHECK(vhdx_bitmap_runs(&one, 1, 7, 2, out, 4, &nr, &cons) == VHDX_EARG);
    CHECK(vhdx_bitmap_runs(&one, 1, 1, UINT64_MAX, out, 4, &nr, &cons) == VHDX_EARG);
    CHECK(vhdx_bitmap_runs(&one, 1, UINT64_MAX, 1, out, 4, &nr, &cons) == VHDX_EARG);
    CHECK(vhdx_bitmap_runs(&one, 1, 0, 8, out, 0, &nr, &cons) == VHDX_EARG);
    /* 0xA5 = 1010 0101 LSB first: 1,0,1,0,0,1,0,1 */
    CHECK(vhdx_bitmap_runs(&one, 1, 2, 4, out, 4, &nr, &cons) == 0);
    CHECK(nr == 3 && cons == 4);
    CHECK(out[0] == 0 && out[1] == 1 && out[2] == 1);
    CHECK(out[3] == 1 && out[4] == 2 && out[5] == 0);
    CHECK(out[6] == 3 && out[7] == 1 && out[8] == 1);
    /* max_runs = 1: stops after a complete run */
    CHECK(vhdx_bitmap_runs(&one, 1, 3, 5, out, 1, &nr, &cons) == 0 && nr == 1 && cons == 2);

    /* random bitmaps: noise, and long runs with rare flips (word paths) */
    for (iter = 0; iter < 4000; iter++) {
        size_t len = (size_t)rnd_below(90), i;
        uint8_t *bm = (uint8_t *)malloc(len ? len : 1);
        int mode = (int)(iter % 3);
        uint64_t total = (uint64_t)len * 8, start, nbits;
        for (i = 0; i < len; i++) {
            if (mode == 0)
                bm[i] = (uint8_t)rnd();
            else
                bm[i] = (i == 0 || rnd_below(10)) ? (i ? bm[i - 1] : 0) : (uint8_t)~bm[i - 1];
        }
        if (mode == 2 && len) /* single flipped bit somewhere */
            bm[rnd_below(len)] ^= (uint8_t)(1u << rnd_below(8));
        start = rnd_below(total + 1);
        nbits = rnd_below(total - start + 1);
        check_runs(len ? bm : NULL, len, start, nbits, 1 + (size_t)rnd_below(4));
        check_runs(len ? bm : NULL, len, start, nbits, 1000);
        /* whole buffer; the last byte is read right at the allocation end */
        check_runs(len ? bm : NULL, len, 0, total, 7);
        free(bm);
    }

    /* a full 1 MiB sector bitmap (2^23 bits): all ones, all zeros */
    {
        size_t len = (size_t)1 << 20;
        uint8_t *bm = (uint8_t *)malloc(len);
        int64_t *big = (int64_t *)malloc(3 * 16 * sizeof(int64_t));
        memset(bm, 0xFF, len);
        CHECK(vhdx_bitmap_runs(bm, len, 0, (uint64_t)len * 8, big, 16, &nr, &cons) == 0);
        CHECK(nr == 1 && big[1] == (int64_t)len * 8 && big[2] == 1);
        memset(bm, 0, len);
        CHECK(vhdx_bitmap_runs(bm, len, 5, (uint64_t)len * 8 - 5, big, 16, &nr, &cons) == 0);
        CHECK(nr == 1 && big[1] == (int64_t)len * 8 - 5 && big[2] == 0);
        /* one set bit at the very end */
        bm[len - 1] = 0x80;
        CHECK(vhdx_bitmap_runs(bm, len, 0, (uint64_t)len * 8, big, 16, &nr, &cons) == 0);
        CHECK(nr == 2 && big[1] == (int64_t)len * 8 - 1 && big[3] == (int64_t)len * 8 - 1 &&
              big[4] == 1 && big[5] == 1);
        /* alternating bits: one run per bit */
        memset(bm, 0x55, 4096);
        check_runs(bm, 4096, 3, 4096 * 8 - 3, 1000);
        CHECK(vhdx_bitmap_runs(bm, 4096, 0, 64, big, 16, &nr, &cons) == 0 && nr == 16 && cons == 16);
        free(big);
        free(bm);
    }
}

/* ------------------------------------------------------------------------ */
/* gather_read                                                              */
/* ------------------------------------------------------------------------ */

static void test_gather_read(void)
{
    char path[512];
    int fd = make_file(g_tmpdir, path, sizeof path);
    const size_t fsz = 10007, blen = 30011;
    uint8_t *content = random_bytes(fsz);
    uint8_t *buf = (uint8_t *)malloc(blen), *expect = (uint8_t *)malloc(blen);
    int64_t segs[3 * 16];
    size_t failed, iter;
    int rc;

    write_all(fd, content, fsz, 0);

    for (iter = 0; iter < 600; iter++) {
        size_t n = (size_t)rnd_below(16), i;
        memset(buf, 0xAA, blen);
        memset(expect, 0xAA, blen);
        for (i = 0; i < n; i++) {
            /* non-overlapping buffer slots so the model is order-independent */
            size_t slot = blen / 16, len = (size_t)rnd_below(slot + 1);
            size_t bo = i * slot + (size_t)rnd_below(slot - len + 1);
            size_t fo = (size_t)rnd_below(fsz + 2000), j;
            segs[3 * i] = (int64_t)bo;
            segs[3 * i + 1] = (int64_t)fo;
            segs[3 * i + 2] = (int64_t)len;
            for (j = 0; j < len; j++)
                expect[bo + j] = fo + j < fsz ? content[fo + j] : 0;
        }
        inj_reset();
        inj.on = 1;
        inj.short_max = (iter % 3 == 1) ? 1 + (size_t)rnd_below(9) : 0;
        inj.eintr_every = (iter % 3 == 2) ? 2 : 0;
        rc = vhdx_gather_read(fd, buf, blen, segs, n, &failed);
        inj_reset();
        CHECK(rc == 0);
        CHECK(memcmp(buf, expect, blen) == 0);
    }

    /* bounds: nothing is read, nothing is written */
    {
        struct { int64_t bo, fo, len; size_t bad; } cases[] = {
            {0, 0, (int64_t)blen + 1, 0},
            {(int64_t)blen, 0, 1, 0},
            {(int64_t)blen + 1, 0, 0, 0},
            {-1, 0, 1, 0},
            {0, -1, 1, 0},
            {0, 0, -1, 0},
            {0, INT64_MAX, 2, 0},
            {1, 0, INT64_MAX, 0},
        };
        size_t c;
        for (c = 0; c < sizeof cases / sizeof cases[0]; c++) {
            int64_t s2[6] = {0, 0, 10, cases[c].bo, cases[c].fo, cases[c].len};
            memset(buf, 0xAA, blen);
            inj_reset();
            inj.on = 1;
            rc = vhdx_gather_read(fd, buf, blen, s2, 2, &failed);
            CHECK(rc == VHDX_EARG && failed == 1);
            CHECK(inj.n_pread == 0);
            CHECK(buf[0] == 0xAA);
            inj_reset();
        }
        /* empty segment exactly at the end of the buffer is fine */
        {
            int64_t s3[3] = {(int64_t)blen, 5, 0};
            CHECK(vhdx_gather_read(fd, buf, blen, s3, 1, &failed) == 0);
        }
        /* zero segments, zero-length buffer */
        CHECK(vhdx_gather_read(fd, NULL, 0, NULL, 0, &failed) == 0);
    }

    /* I/O error reports errno and the segment */
    {
        int64_t s4[6] = {0, 0, 10, 10, 0, 10};
        CHECK(vhdx_gather_read(-1, buf, blen, s4, 2, &failed) == EBADF && failed == 0);
        inj_reset();
    }

    /* empty ("short") file: everything zero-filled */
    {
        char p2[512];
        int efd = make_file(g_tmpdir, p2, sizeof p2);
        int64_t s5[3] = {3, 0, 100};
        memset(buf, 0xAA, blen);
        CHECK(vhdx_gather_read(efd, buf, blen, s5, 1, &failed) == 0);
        CHECK(buf[2] == 0xAA && buf[3] == 0 && buf[102] == 0 && buf[103] == 0xAA);
        close(efd);
    }
    free(content);
    free(buf);
    free(expect);
    close(fd);
}

/* ------------------------------------------------------------------------ */
/* chain reader                                                             */
/* ------------------------------------------------------------------------ */

#define TR_MIB ((uint64_t)1 << 20)
#define TR_MAXL 3
#define TR_OFFSET_MASK UINT64_C(0xFFFFFFFFFFF00000)

/* One model level: the file's bytes (also written to fd), its BAT, geometry. */
struct tr_level {
    int fd;
    uint8_t *file;
    size_t flen;
    uint64_t *bat;
    uint64_t nbat, vsize, bs, cr;
    uint32_t lss;
};

/* Byte at virtual `off` by the FORMAT.md §8.1 rules, straight from the model. */
static uint8_t tr_expect(const struct tr_level *lv, int n, uint64_t off)
{
    int L;
    for (L = 0; L < n; L++) {
        const struct tr_level *l = &lv[L];
        uint64_t block, e, fo;
        unsigned st;
        if (off >= l->vsize)
            return 0;
        block = off / l->bs;
        e = l->bat[block + block / l->cr];
        st = (unsigned)(e & 7);
        fo = (e & TR_OFFSET_MASK) + off % l->bs;
        if (st == 7) {
            uint64_t sb = l->bat[(block / l->cr) * (l->cr + 1) + l->cr] & TR_OFFSET_MASK;
            uint64_t bit = (off % l->bs) / l->lss;
            uint64_t byte = sb + (block % l->cr) * (l->bs / l->lss / 8) + bit / 8;
            int v = byte < l->flen ? (l->file[byte] >> (bit & 7)) & 1 : 0;
            if (!v)
                continue;
            st = 6;
        }
        if (st == 6)
            return fo < l->flen ? l->file[fo] : 0;
        if (st != 0)
            return 0;
    }
    return 0;
}

/* A random level: 1 MiB blocks (lss 512 -> chunk ratio 4096, so one sector
 * bitmap block covers everything), `nblocks` blocks, data blocks at 1 MiB
 * steps after a 1 MiB header area, the SB block last; the last data block may
 * be cut short by EOF. */
static void tr_make(struct tr_level *l, uint64_t vsize)
{
    uint64_t nblocks = (vsize + TR_MIB - 1) / TR_MIB, b, next = 1, sb_off;
    char path[512];
    l->lss = 512;
    l->bs = TR_MIB;
    l->cr = ((uint64_t)1 << 23) * l->lss / l->bs;
    l->vsize = vsize;
    l->nbat = l->cr + 1; /* blocks < chunk ratio: payload entries, then chunk 0's SB entry */
    l->bat = (uint64_t *)calloc((size_t)l->nbat, sizeof *l->bat);
    for (b = 0; b < nblocks; b++) {
        static const unsigned states[] = {0, 0, 1, 2, 3, 6, 6, 7, 7, 7};
        unsigned st = states[rnd_below(10)];
        uint64_t off = 0;
        if (st == 6 || st == 7)
            off = (next++) * TR_MIB;
        else if ((st == 1 || st == 3) && rnd_below(2))
            off = (next++) * TR_MIB; /* UNDEFINED/UNMAPPED may keep an offset */
        l->bat[b] = off | st;
    }
    sb_off = (next++) * TR_MIB;
    l->bat[l->cr] = sb_off | 6;
    l->flen = (size_t)(next * TR_MIB - (rnd_below(3) == 0 ? rnd_below(TR_MIB + 1) : 0));
    l->file = random_bytes(l->flen);
    /* bitmaps with runs of every length, including whole 0x00/0xFF stretches */
    if (sb_off < l->flen) {
        size_t i, end = l->flen < sb_off + TR_MIB ? l->flen : (size_t)(sb_off + TR_MIB);
        for (i = (size_t)sb_off; i < end; i++) {
            uint64_t k = rnd_below(4);
            l->file[i] = k == 0 ? 0x00 : k == 1 ? 0xFF : (uint8_t)rnd();
        }
    }
    l->fd = make_file(g_tmpdir, path, sizeof path);
    write_all(l->fd, l->file, l->flen, 0);
}

static void tr_free(struct tr_level *l)
{
    close(l->fd);
    free(l->file);
    free(l->bat);
}

static vhdx_reader *tr_reader(const struct tr_level *lv, int n, int cache)
{
    vhdx_rlevel d[TR_MAXL];
    vhdx_reader *r = NULL;
    int i, rc;
    for (i = 0; i < n; i++) {
        d[i].fd = lv[i].fd;
        d[i].cache_bitmaps = cache;
        d[i].bat = lv[i].bat;
        d[i].bat_entries = lv[i].nbat;
        d[i].virtual_size = lv[i].vsize;
        d[i].block_size = lv[i].bs;
        d[i].chunk_ratio = lv[i].cr;
        d[i].sector_size = lv[i].lss;
    }
    rc = vhdx_reader_new(d, (size_t)n, &r);
    CHECK(rc == 0 && r != NULL);
    return r;
}

/* Random reads (unaligned, crossing blocks and levels, past the end) against
 * the model, with short reads and EINTR injected on some rounds. */
static void tr_check_reads(vhdx_reader *r, const struct tr_level *lv, int n, int iters)
{
    const uint64_t vsize = lv[0].vsize;
    int it;
    for (it = 0; it < iters; it++) {
        uint64_t k = rnd_below(4);
        size_t len = k == 0 ? (size_t)rnd_below(600) : k == 1 ? 4096
                   : k == 2 ? (size_t)rnd_below(3 * TR_MIB) : (size_t)rnd_below(70000);
        uint64_t off = rnd_below(2) ? rnd_below(vsize + 5000) : rnd_below(vsize / 512 + 2) * 512;
        uint8_t *buf = (uint8_t *)malloc(len ? len : 1);
        uint64_t want = off >= vsize ? 0 : (len < vsize - off ? len : vsize - off), i;
        int err = 12345;
        int64_t got;
        memset(buf, 0xA5, len);
        inj_reset();
        inj.on = 1;
        inj.short_max = (it % 4 == 1) ? 1 + (size_t)rnd_below(5000) : 0;
        inj.eintr_every = (it % 4 == 2) ? 2 : 0;
        got = vhdx_reader_read(r, off, buf, len, &err);
        inj_reset();
        CHECK(got == (int64_t)want);
        CHECK(err == 12345); /* untouched on success */
        for (i = 0; i < want; i++)
            if (buf[i] != tr_expect(lv, n, off + i)) {
                fprintf(stderr, "reader mismatch: levels=%d off=%llu len=%zu at +%llu\n", n,
                        (unsigned long long)off, len, (unsigned long long)i);
                CHECK(!"reader byte mismatch");
                break;
            }
        for (; i < len; i++)
            if (buf[i] != 0xA5) {
                CHECK(!"reader wrote past the virtual size");
                break;
            }
        free(buf);
    }
}

struct tr_thread_arg {
    vhdx_reader *r;
    const struct tr_level *lv;
    int n, bad;
    uint64_t seed;
};

static void *tr_thread(void *p)
{
    struct tr_thread_arg *a = (struct tr_thread_arg *)p;
    uint64_t s = a->seed;
    uint8_t *buf = (uint8_t *)malloc(300000);
    int it;
    for (it = 0; it < 200; it++) {
        uint64_t off, len, i;
        s ^= s << 13; s ^= s >> 7; s ^= s << 17; /* own xorshift: rnd() is not thread-safe */
        off = s % a->lv[0].vsize;
        len = (s >> 32) % 300000;
        if (vhdx_reader_read(a->r, off, buf, (size_t)len, NULL) < 0)
            a->bad++;
        for (i = 0; i < len && off + i < a->lv[0].vsize; i += 97)
            if (buf[i] != tr_expect(a->lv, a->n, off + i)) {
                a->bad++;
                break;
            }
    }
    free(buf);
    return NULL;
}

static void test_reader(void)
{
    struct tr_level lv[TR_MAXL];
    int n, round;

    for (round = 0; round < 12; round++) {
        vhdx_reader *r, *ru;
        int i;
        n = 1 + (int)rnd_below(TR_MAXL);
        for (i = 0; i < n; i++) /* parents may be smaller or larger than the child */
            tr_make(&lv[i], (1 + rnd_below(6)) * TR_MIB - 512 * rnd_below(3));
        r = tr_reader(lv, n, 1);
        ru = tr_reader(lv, n, 0);
        tr_check_reads(r, lv, n, 60);
        tr_check_reads(ru, lv, n, 30);
        if (round < 3) { /* concurrent readers share one bitmap cache */
            pthread_t t[4];
            struct tr_thread_arg a[4];
            for (i = 0; i < 4; i++) {
                a[i].r = r; a[i].lv = lv; a[i].n = n; a[i].bad = 0;
                a[i].seed = rnd() | 1;
                pthread_create(&t[i], NULL, tr_thread, &a[i]);
            }
            for (i = 0; i < 4; i++) {
                pthread_join(t[i], NULL);
                CHECK(a[i].bad == 0);
            }
        }
        /* Flip the top level's bitmap bytes on disk: the caching reader keeps
         * its view until invalidated; the uncached one sees the change. */
        {
            uint64_t sb = lv[0].bat[lv[0].cr] & TR_OFFSET_MASK;
            if (sb + 256 * 6 <= lv[0].flen) {
                size_t j;
                for (j = 0; j < 256 * 6; j++)
                    lv[0].file[sb + j] = (uint8_t)~lv[0].file[sb + j];
                write_all(lv[0].fd, lv[0].file + sb, 256 * 6, (off_t)sb);
                tr_check_reads(ru, lv, n, 20);
                vhdx_reader_invalidate(r);
                tr_check_reads(r, lv, n, 20);
            }
        }
        vhdx_reader_free(r);
        vhdx_reader_free(ru);
        for (i = 0; i < n; i++)
            tr_free(&lv[i]);
    }

    /* argument and geometry checks, corrupt entries, I/O errors */
    {
        vhdx_rlevel d;
        vhdx_reader *r = (vhdx_reader *)1;
        uint8_t buf[4096];
        int err = 0;

        tr_make(&lv[0], 4 * TR_MIB);
        d.fd = lv[0].fd; d.cache_bitmaps = 1; d.bat = lv[0].bat; d.bat_entries = lv[0].nbat;
        d.virtual_size = lv[0].vsize; d.block_size = lv[0].bs; d.chunk_ratio = lv[0].cr;
        d.sector_size = lv[0].lss;

        CHECK(vhdx_reader_new(NULL, 1, &r) == VHDX_EARG && r == NULL);
        CHECK(vhdx_reader_new(&d, 0, &r) == VHDX_EARG && r == NULL);
        {
            vhdx_rlevel bad[7];
            int k;
            for (k = 0; k < 7; k++)
                bad[k] = d;
            bad[0].block_size = 3 * TR_MIB;        /* not a power of two */
            bad[1].sector_size = 1000;             /* not a power of two */
            bad[2].sector_size = 256;              /* too small */
            bad[3].chunk_ratio = 0;
            bad[4].chunk_ratio = 2048;             /* inconsistent with the geometry */
            bad[5].bat = NULL;                     /* entries without a table */
            bad[6].virtual_size = (uint64_t)INT64_MAX + 1;
            for (k = 0; k < 7; k++) {
                r = (vhdx_reader *)1;
                CHECK(vhdx_reader_new(&bad[k], 1, &r) == VHDX_EARG && r == NULL);
            }
        }
        CHECK(vhdx_reader_new(&d, 1, &r) == 0);
        CHECK(vhdx_reader_read(NULL, 0, buf, 10, &err) == -1 && err == VHDX_EARG);
        CHECK(vhdx_reader_read(r, 0, NULL, 10, &err) == -1 && err == VHDX_EARG);
        CHECK(vhdx_reader_read(r, 0, NULL, 0, &err) == 0);
        CHECK(vhdx_reader_read(r, (uint64_t)INT64_MAX + 1, buf, 1, &err) == -1 && err == VHDX_EARG);
        CHECK(vhdx_reader_read(r, (uint64_t)INT64_MAX - 5, buf, 10, &err) == -1 && err == VHDX_EARG);
        CHECK(vhdx_reader_read(r, lv[0].vsize, buf, 10, &err) == 0);
        CHECK(vhdx_reader_read(r, lv[0].vsize - 3, buf, 10, NULL) == 3);
        vhdx_reader_free(r);
        vhdx_reader_free(NULL);
        vhdx_reader_invalidate(NULL);

        /* a PARTIALLY_PRESENT block whose sector bitmap is not present */
        lv[0].bat[0] = (1 * TR_MIB) | 7;
        lv[0].bat[1] = (2 * TR_MIB) | 6;
        lv[0].bat[lv[0].cr] = 0;
        CHECK(vhdx_reader_new(&d, 1, &r) == 0);
        err = 0;
        CHECK(vhdx_reader_read(r, 100, buf, 10, &err) == -1 && err == VHDX_EFALLBACK);
        CHECK(vhdx_reader_read(r, TR_MIB, buf, 10, NULL) == 10); /* other blocks still read */
        vhdx_reader_free(r);
        /* a BAT shorter than the geometry needs */
        d.bat_entries = 2;
        lv[0].bat[3] = 6 | (2 * TR_MIB);
        CHECK(vhdx_reader_new(&d, 1, &r) == 0);
        CHECK(vhdx_reader_read(r, 3 * TR_MIB, buf, 10, &err) == -1 && err == VHDX_EFALLBACK);
        vhdx_reader_free(r);
        d.bat_entries = lv[0].nbat;
        /* a file offset near 2^64: no wrap-around, the caller takes over */
        lv[0].bat[1] = TR_OFFSET_MASK | 6;
        CHECK(vhdx_reader_new(&d, 1, &r) == 0);
        CHECK(vhdx_reader_read(r, TR_MIB + 5, buf, 10, &err) == -1 && err == VHDX_EFALLBACK);
        vhdx_reader_free(r);
        /* a failed pread reports its errno; so does a failed bitmap read */
        lv[0].bat[1] = (2 * TR_MIB) | 6;
        lv[0].bat[0] = (1 * TR_MIB) | 7;
        lv[0].bat[lv[0].cr] = (3 * TR_MIB) | 6;
        d.fd = -1;
        CHECK(vhdx_reader_new(&d, 1, &r) == 0);
        CHECK(vhdx_reader_read(r, TR_MIB, buf, 10, &err) == -1 && err == EBADF);
        CHECK(vhdx_reader_read(r, 0, buf, 10, &err) == -1 && err == EBADF);
        vhdx_reader_free(r);
        d.cache_bitmaps = 0;
        CHECK(vhdx_reader_new(&d, 1, &r) == 0);
        CHECK(vhdx_reader_read(r, 0, buf, 10, &err) == -1 && err == EBADF);
        vhdx_reader_free(r);
        tr_free(&lv[0]);
    }
}

/* ------------------------------------------------------------------------ */
/* copy_ranges                                                              */
/* ------------------------------------------------------------------------ */

/* Apply ranges to an in-memory model of dst (grows like the file). */
static uint8_t *model_copy(uint8_t *model, size_t *mlen, const uint8_t *src, size_t slen,
                           const int64_t *r, size_t n)
{
    size_t i, j;
    for (i = 0; i < n; i++) {
        size_t so = (size_t)r[3 * i], dof = (size_t)r[3 * i + 1], len = (size_t)r[3 * i + 2];
        if (len && dof + len > *mlen) {
            model = (uint8_t *)realloc(model, dof + len);
            memset(model + *mlen, 0, dof + len - *mlen);
            *mlen = dof + len;
        }
        for (j = 0; j < len; j++)
            model[dof + j] = so + j < slen ? src[so + j] : 0;
    }
    return model;
}

static void expect_file(int fd, const uint8_t *model, size_t mlen)
{
    size_t flen;
    uint8_t *got = read_file(fd, &flen);
    CHECK(flen == mlen);
    CHECK(flen == mlen && memcmp(got, model, mlen) == 0);
    free(got);
}

/* Random batch copy in `dir`, with given flags and injection setup. */
static void copy_round(const char *dir, int flags, int mode, int check_method)
{
    char p1[512], p2[512];
    int sfd = make_file(dir, p1, sizeof p1), dfd = make_file(dir, p2, sizeof p2);
    size_t slen = ((size_t)9 << 20) + 77, mlen = 0, i, failed, n = 12;
    uint8_t *src = random_bytes(slen), *model = NULL;
    int64_t r[3 * 12];
    int32_t methods[12];
    int rc;

    write_all(sfd, src, slen, 0);
    for (i = 0; i < n; i++) {
        int kind = (int)rnd_below(5);
        int64_t len;
        if (kind == 0) /* block aligned */
            len = (int64_t)(4096 * (1 + rnd_below(64)));
        else if (kind == 1) /* big: crosses the 4 MiB bounce buffer */
            len = (int64_t)((5u << 20) + rnd_below(100000));
        else if (kind == 2)
            len = 0;
        else
            len = (int64_t)rnd_below(70000);
        r[3 * i] = kind == 0 ? (int64_t)(4096 * rnd_below(2000)) : (int64_t)rnd_below(slen + 5000);
        r[3 * i + 1] = kind == 0 ? (int64_t)(4096 * rnd_below(3000)) : (int64_t)rnd_below(12u << 20);
        r[3 * i + 2] = len;
    }
    model = model_copy(model, &mlen, src, slen, r, n);

    inj_reset();
    inj.on = 1;
    if (mode == 1)
        inj.short_max = 1 + (size_t)rnd_below(5000);
    if (mode == 2)
        inj.eintr_every = 3;
    rc = vhdx_copy_ranges(sfd, dfd, r, n, flags, methods, &failed);
    inj_reset();
    CHECK(rc == 0);
    expect_file(dfd, model, mlen);
    for (i = 0; i < n; i++) {
        if (r[3 * i + 2] == 0)
            CHECK(methods[i] == VHDX_M_NONE);
        else if (check_method)
            CHECK(methods[i] == check_method);
        else
            CHECK(methods[i] >= VHDX_M_CLONE && methods[i] <= VHDX_M_READ_WRITE);
    }
    free(src);
    free(model);
    close(sfd);
    close(dfd);
}

static void test_copy_ranges(void)
{
    char p1[512], p2[512];
    int sfd, dfd, mode;
    size_t failed;
    int32_t methods[8];
    uint8_t *src;
    const size_t slen = 1 << 20;

    for (mode = 0; mode < 3; mode++) {
        copy_round(g_tmpdir, 0, mode, VHDX_M_READ_WRITE);
        copy_round(g_tmpdir, VHDX_ALLOW_COPY_FILE_RANGE, mode, 0);
        copy_round(g_tmpdir, VHDX_ALLOW_CLONE | VHDX_ALLOW_COPY_FILE_RANGE, mode, 0);
        copy_round(g_tmpdir, VHDX_ALLOW_CLONE, mode, 0);
    }

    sfd = make_file(g_tmpdir, p1, sizeof p1);
    dfd = make_file(g_tmpdir, p2, sizeof p2);
    src = random_bytes(slen);
    write_all(sfd, src, slen, 0);
    {
        int64_t al[3 * 6] = {0, 0, 4096, 4096, 8192, 8192, 65536, 65536, 4096,
                             0, 1 << 20, 65536, 8192, 0, 4096, 12288, 4096, 4096};
        int all = VHDX_ALLOW_CLONE | VHDX_ALLOW_COPY_FILE_RANGE;
        size_t i;

        /* refused clone (EOPNOTSUPP) is cached for the whole batch */
        inj_reset();
        inj.on = 1;
        inj.clone_errno = EOPNOTSUPP;
        CHECK(vhdx_copy_ranges(sfd, dfd, al, 6, all, methods, &failed) == 0);
        CHECK(inj.n_clone == 1);
        for (i = 0; i < 6; i++)
            CHECK(methods[i] == VHDX_M_COPY_FILE_RANGE);
        /* EINVAL is per range: retried, but given up after 4 in a row */
        inj_reset();
        inj.on = 1;
        inj.clone_errno = EINVAL;
        CHECK(vhdx_copy_ranges(sfd, dfd, al, 6, all, methods, &failed) == 0);
        CHECK(inj.n_clone == 4);
        /* unaligned ranges never reach the ioctl */
        {
            int64_t un[3 * 2] = {1, 0, 4096, 0, 4096, 4095};
            inj_reset();
            inj.on = 1;
            CHECK(vhdx_copy_ranges(sfd, dfd, un, 2, all, methods, &failed) == 0);
            CHECK(inj.n_clone == 0);
        }
        /* copy_file_range missing: cached, rest via read/write */
        inj_reset();
        inj.on = 1;
        inj.cfr_errno = ENOSYS;
        CHECK(vhdx_copy_ranges(sfd, dfd, al, 6, VHDX_ALLOW_COPY_FILE_RANGE, methods, &failed) == 0);
        CHECK(inj.n_cfr == 1);
        for (i = 0; i < 6; i++)
            CHECK(methods[i] == VHDX_M_READ_WRITE);
        /* EINVAL from copy_file_range: per range fallback, not cached */
        inj_reset();
        inj.on = 1;
        inj.cfr_errno = EINVAL;
        CHECK(vhdx_copy_ranges(sfd, dfd, al, 6, VHDX_ALLOW_COPY_FILE_RANGE, methods, &failed) == 0);
        CHECK(inj.n_cfr == 6);
        /* a real error stops the batch and names the range */
        inj_reset();
        inj.on = 1;
        inj.cfr_errno = EIO;
        CHECK(vhdx_copy_ranges(sfd, dfd, al, 6, VHDX_ALLOW_COPY_FILE_RANGE, methods, &failed) == EIO);
        CHECK(failed == 0);
        /* bounce buffer allocation failure */
        inj_reset();
        inj.on = 1;
        inj.memalign_fail = 1;
        CHECK(vhdx_copy_ranges(sfd, dfd, al, 6, 0, methods, &failed) == ENOMEM && failed == 0);
        inj_reset();
        /* the result is still right after all that */
        CHECK(vhdx_copy_ranges(sfd, dfd, al, 6, all, methods, &failed) == 0);
    }
    /* argument errors: nothing done */
    {
        int64_t bad[3 * 2] = {0, 0, 10, 0, -5, 10};
        int64_t ovf[3 * 1] = {INT64_MAX - 5, 0, 10};
        int64_t ovf2[3 * 1] = {0, INT64_MAX, 1};
        methods[0] = 77;
        inj_reset();
        inj.on = 1;
        CHECK(vhdx_copy_ranges(sfd, dfd, bad, 2, 0, methods, &failed) == VHDX_EARG && failed == 1);
        CHECK(vhdx_copy_ranges(sfd, dfd, ovf, 1, 0, methods, &failed) == VHDX_EARG && failed == 0);
        CHECK(vhdx_copy_ranges(sfd, dfd, ovf2, 1, 0, methods, &failed) == VHDX_EARG && failed == 0);
        CHECK(inj.n_pread == 0 && inj.n_pwrite == 0);
        inj_reset();
        CHECK(vhdx_copy_ranges(sfd, dfd, NULL, 0, 3, methods, &failed) == 0);
    }
    /* bad descriptors */
    {
        int64_t one[3] = {0, 0, 100}, two[6] = {0, 0, 0, 0, 0, 100};
        CHECK(vhdx_copy_ranges(sfd, -1, one, 1, 3, methods, &failed) == EBADF && failed == 0);
        CHECK(vhdx_copy_ranges(-1, dfd, two, 2, 0, methods, &failed) == EBADF && failed == 1);
        CHECK(methods[0] == VHDX_M_NONE);
    }
    free(src);
    close(sfd);
    close(dfd);
}

/* Clone paths on a reflink-capable file system. */
static void test_reflink(const char *dir)
{
    char p1[512], p2[512], p3[512];
    int sfd = make_file(dir, p1, sizeof p1), dfd = make_file(dir, p2, sizeof p2);
    int efd;
    size_t slen = ((size_t)4 << 20) + 1000, mlen = 0, failed;
    uint8_t *src = random_bytes(slen), *model = NULL;
    int32_t m[4];
    uint64_t shared, mapped;
    int all = VHDX_ALLOW_CLONE | VHDX_ALLOW_COPY_FILE_RANGE;
    int64_t r[3 * 4] = {0, 0, 1 << 20, 1 << 20, 2 << 20, 65536,
                        4096, (3 << 20) + 512, 8192, /* unaligned dst */
                        4 << 20, 8 << 20, 1000};     /* tail at source EOF */

    write_all(sfd, src, slen, 0);
    fsync(sfd);
    CHECK(vhdx_copy_ranges(sfd, dfd, r, 4, all, m, &failed) == 0);
    model = model_copy(model, &mlen, src, slen, r, 4);
    expect_file(dfd, model, mlen);
    CHECK(m[0] == VHDX_M_CLONE && m[1] == VHDX_M_CLONE);
    CHECK(m[2] == VHDX_M_COPY_FILE_RANGE || m[2] == VHDX_M_READ_WRITE);
    CHECK(m[3] == VHDX_M_CLONE); /* unaligned tail ending at EOF, dst grows */
    CHECK(vhdx_fiemap_shared(dfd, 0, 1 << 20, &shared, &mapped) == 0);
    CHECK(shared == 1 << 20 && mapped == 1 << 20);
    CHECK(vhdx_fiemap_shared(sfd, 0, (int64_t)slen, &shared, &mapped) == 0);
    CHECK(shared >= (1 << 20) + 65536 && mapped == slen);

    /* the EOF tail must not be cloned over existing destination data */
    efd = make_file(dir, p3, sizeof p3);
    {
        uint8_t *junk = random_bytes(3 << 20);
        int64_t t[3] = {4 << 20, 1 << 20, 1000};
        size_t elen = 3 << 20;
        write_all(efd, junk, elen, 0);
        CHECK(vhdx_copy_ranges(sfd, efd, t, 1, all, m, &failed) == 0);
        CHECK(m[0] != VHDX_M_CLONE);
        junk = model_copy(junk, &elen, src, slen, t, 1);
        expect_file(efd, junk, elen);
        free(junk);
    }
    close(efd);
    free(src);
    free(model);
    close(sfd);
    close(dfd);
}

/* ------------------------------------------------------------------------ */
/* zero_ranges                                                              */
/* ------------------------------------------------------------------------ */

static void zero_round(int falloc_errno, int expect_method, int mode)
{
    char p[512];
    int fd = make_file(g_tmpdir, p, sizeof p);
    size_t flen = ((size_t)3 << 20) + 333, mlen, i, failed, n = 10;
    uint8_t *model = random_bytes(flen);
    int64_t r[2 * 10];
    int32_t methods[10];

    write_all(fd, model, flen, 0);
    mlen = flen;
    for (i = 0; i < n; i++) {
        int64_t off = (int64_t)rnd_below(flen + 100000), len;
        len = (i % 4 == 0) ? 0 : (i % 4 == 1) ? (int64_t)((1u << 20) + rnd_below(2u << 20))
                                              : (int64_t)(1 + rnd_below(20000));
        r[2 * i] = off;
        r[2 * i + 1] = len;
        if (len && (size_t)(off + len) > mlen) {
            model = (uint8_t *)realloc(model, (size_t)(off + len));
            memset(model + mlen, 0, (size_t)(off + len) - mlen);
            mlen = (size_t)(off + len);
        }
        memset(model + off, 0, (size_t)len);
    }
    inj_reset();
    inj.on = 1;
    inj.falloc_errno = falloc_errno;
    if (mode == 1)
        inj.short_max = 1 + (size_t)rnd_below(4000);
    if (mode == 2)
        inj.eintr_every = 2;
    CHECK(vhdx_zero_ranges(fd, r, n, methods, &failed) == 0);
    if (falloc_errno == EOPNOTSUPP)
        CHECK(inj.n_falloc == 1); /* cached */
    if (falloc_errno == EINVAL)
        CHECK(inj.n_falloc == 7); /* retried for every non-empty range */
    inj_reset();
    expect_file(fd, model, mlen);
    for (i = 0; i < n; i++)
        CHECK(methods[i] == (r[2 * i + 1] ? expect_method : VHDX_M_NONE));
    free(model);
    close(fd);
}

static void test_zero_ranges(void)
{
    int mode;
    size_t failed;
    int32_t methods[2];
    char p[512];
    int fd;

    /* what /tmp supports natively: FALLOCATE on ext4/xfs, pwrite on tmpfs */
    {
        int probe = make_file(g_tmpdir, p, sizeof p);
        int64_t r[2] = {0, 4096};
        CHECK(vhdx_zero_ranges(probe, r, 1, methods, &failed) == 0);
        CHECK(methods[0] == VHDX_M_FALLOCATE || methods[0] == VHDX_M_WRITE_ZEROS);
        mode = methods[0];
        close(probe);
        zero_round(0, mode, 0);
    }
    for (mode = 0; mode < 3; mode++) {
        zero_round(EOPNOTSUPP, VHDX_M_WRITE_ZEROS, mode);
        zero_round(EINVAL, VHDX_M_WRITE_ZEROS, mode);
    }
    fd = make_file(g_tmpdir, p, sizeof p);
    {
        int64_t bad[4] = {0, 10, -1, 10}, ovf[2] = {INT64_MAX, 1}, ok[4] = {0, 10, 5, 0};
        CHECK(vhdx_zero_ranges(fd, bad, 2, methods, &failed) == VHDX_EARG && failed == 1);
        CHECK(vhdx_zero_ranges(fd, ovf, 1, methods, &failed) == VHDX_EARG && failed == 0);
        CHECK(file_size(fd) == 0);
        inj_reset();
        inj.on = 1;
        inj.falloc_errno = EIO; /* a real error is reported, not papered over */
        CHECK(vhdx_zero_ranges(fd, ok, 2, methods, &failed) == EIO && failed == 0);
        inj_reset();
        CHECK(vhdx_zero_ranges(-1, ok, 2, methods, &failed) == EBADF && failed == 0);
        CHECK(vhdx_zero_ranges(fd, NULL, 0, methods, &failed) == 0);
    }
    close(fd);
}

/* ------------------------------------------------------------------------ */
/* fiemap_shared                                                            */
/* ------------------------------------------------------------------------ */

static void test_fiemap(void)
{
    char p[512];
    int fd = make_file(g_tmpdir, p, sizeof p);
    uint64_t shared = 9, mapped = 9;
    uint8_t *blk = random_bytes(4096);
    int i, rc;

    /* 300 data blocks separated by holes: more extents than one ioctl
     * returns (128), so the continuation loop runs. */
    for (i = 0; i < 300; i++)
        write_all(fd, blk, 4096, (off_t)i * 8192);
    rc = vhdx_fiemap_shared(fd, 0, 300 * 8192, &shared, &mapped);
    if (rc == EOPNOTSUPP) {
        fprintf(stderr, "note: %s has no FIEMAP; fiemap checks skipped\n", g_tmpdir);
    } else {
        CHECK(rc == 0);
        CHECK(shared == 0 && mapped == 300 * 4096);
        /* window starting/ending mid-extent */
        CHECK(vhdx_fiemap_shared(fd, 100, 8192 * 2, &shared, &mapped) == 0);
        CHECK(mapped == (4096 - 100) + 4096 + 100 && shared == 0);
        /* a hole only */
        CHECK(vhdx_fiemap_shared(fd, 4096, 4096, &shared, &mapped) == 0 && mapped == 0);
        /* beyond EOF */
        CHECK(vhdx_fiemap_shared(fd, 10 << 20, 4096, &shared, &mapped) == 0 && mapped == 0);
    }
    CHECK(vhdx_fiemap_shared(fd, 0, 0, &shared, &mapped) == 0 && mapped == 0 && shared == 0);
    CHECK(vhdx_fiemap_shared(fd, -1, 10, &shared, &mapped) == VHDX_EARG);
    CHECK(vhdx_fiemap_shared(fd, INT64_MAX, 10, &shared, &mapped) == VHDX_EARG);
    CHECK(vhdx_fiemap_shared(-1, 0, 10, &shared, &mapped) == EBADF);
    free(blk);
    close(fd);
}

/* The VHD levels of the chain reader (vhdx_vhd_reader_new) against a
 * per-sector model: a differencing child (4 KiB blocks, 512-byte MSB-first
 * bitmaps before the data, BAT entries = bitmap sector numbers) over a fixed
 * parent shorter than the child, cached and uncached, plus the argument
 * checks. */
static void test_vhd_reader(void)
{
    enum { BS = 4096, SPB = BS / 512, NB = 24, VS = NB * BS - 3 * 512, PS = 40 * 1024 };
    char path[512];
    int cfd = make_file(g_tmpdir, path, sizeof path), pfd = make_file(g_tmpdir, path, sizeof path);
    static uint8_t parent[PS], model[VS], buf[VS + 4096], blk[512 + BS];
    uint32_t bat[NB];
    uint64_t next = 8; /* first bitmap sector */
    int b, i, pass;

    for (i = 0; i < PS; i++)
        parent[i] = (uint8_t)(rnd() | 1);
    write_all(pfd, parent, PS, 0);
    for (i = 0; i < VS; i++)
        model[i] = i < PS ? parent[i] : 0;
    for (b = 0; b < NB; b++) {
        int s;
        if (rnd_below(3) == 0) {
            bat[b] = 0xFFFFFFFFu;
            continue;
        }
        memset(blk, 0, sizeof blk);
        for (s = 0; s < SPB; s++) {
            int mark = (int)rnd_below(2);
            if (mark)
                blk[s / 8] |= (uint8_t)(0x80u >> (s % 8));
            memset(blk + 512 + s * 512, mark ? (int)(rnd() | 1) : 0, 512);
            if (mark && (uint64_t)b * BS + (uint64_t)s * 512 < VS)
                memcpy(model + b * BS + s * 512, blk + 512 + s * 512, 512);
        }
        bat[b] = (uint32_t)next;
        write_all(cfd, blk, sizeof blk, (off_t)(next * 512));
        next += (512 + BS) / 512;
    }
    for (pass = 0; pass < 2; pass++) {
        vhdx_vhd_level lv[2];
        vhdx_reader *r = NULL;
        int err = 0;
        memset(lv, 0, sizeof lv);
        lv[0].fd = cfd;
        lv[0].cache_bitmaps = pass;
        lv[0].bat = bat;
        lv[0].bat_entries = NB;
        lv[0].virtual_size = VS;
        lv[0].block_size = BS;
        lv[1].fd = pfd;
        lv[1].fixed = 1;
        lv[1].virtual_size = PS;
        CHECK(vhdx_vhd_reader_new(lv, 2, &r) == 0 && r != NULL);
        CHECK(vhdx_reader_read(r, 0, buf, VS + 4096, &err) == VS);
        CHECK(memcmp(buf, model, VS) == 0);
        for (i = 0; i < 300; i++) {
            uint64_t off = rnd_below(VS + 600), len = 1 + rnd_below(3 * BS);
            int64_t want = off >= VS ? 0 : (int64_t)(off + len > VS ? VS - off : len);
            CHECK(vhdx_reader_read(r, off, buf, (size_t)len, &err) == want);
            if (want > 0)
                CHECK(memcmp(buf, model + off, (size_t)want) == 0);
        }
        vhdx_reader_free(r);
    }
    {
        vhdx_vhd_level d;
        vhdx_reader *r = (vhdx_reader *)1;
        memset(&d, 0, sizeof d);
        d.fd = cfd;
        d.bat = bat;
        d.bat_entries = NB;
        d.virtual_size = VS;
        d.block_size = 3000; /* not a power of two */
        CHECK(vhdx_vhd_reader_new(&d, 1, &r) == VHDX_EARG && r == NULL);
        d.block_size = BS;
        d.bat_entries = NB - 1; /* too few entries for the size */
        CHECK(vhdx_vhd_reader_new(&d, 1, &r) == VHDX_EARG);
        d.bat_entries = NB;
        d.virtual_size = VS + 1; /* not whole sectors */
        CHECK(vhdx_vhd_reader_new(&d, 1, &r) == VHDX_EARG);
        CHECK(vhdx_vhd_reader_new(NULL, 1, &r) == VHDX_EARG);
        CHECK(vhdx_vhd_reader_new(&d, 0, &r) == VHDX_EARG);
    }
    close(cfd);
    close(pfd);
}

int main(int argc, char **argv)
{
    const char *t = getenv("TMPDIR");
    if (t && *t)
        g_tmpdir = t;
    CHECK(vhdx_native_io_supported() == 1);
    test_bitmap_runs();
    test_gather_read();
    test_reader();
    test_vhd_reader();
    test_copy_ranges();
    test_zero_ranges();
    test_fiemap();
    if (argc > 1) {
        test_reflink(argv[1]);
        printf("reflink tests ran in %s\n", argv[1]);
    } else {
        printf("reflink tests skipped (no REFLINK_DIR argument)\n");
    }
    printf("%d checks, %d failures\n", g_checks, g_fail);
    return g_fail ? 1 : 0;
}
