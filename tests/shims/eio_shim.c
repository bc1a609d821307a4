/* LD_PRELOAD shim for tests: positional reads of one file fail with EIO.
 *
 * VHDX_EIO_PATH   the file (its full path, as /proc/self/fd shows it)
 * VHDX_EIO_OFFSET first failing byte
 * VHDX_EIO_LENGTH failing bytes from there
 * A read whose range meets that window returns -1 / EIO, as a bad sector does.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

static int hits(int fd, off_t off, size_t len) {
    const char *want = getenv("VHDX_EIO_PATH");
    if (!want || len == 0) return 0;
    long long lo = atoll(getenv("VHDX_EIO_OFFSET") ? getenv("VHDX_EIO_OFFSET") : "0");
    long long n = atoll(getenv("VHDX_EIO_LENGTH") ? getenv("VHDX_EIO_LENGTH") : "0");
    if ((long long)off >= lo + n || (long long)off + (long long)len <= lo) return 0;
    char link[64], path[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t k = readlink(link, path, sizeof path - 1);
    if (k < 0) return 0;
    path[k] = 0;
    return strcmp(path, want) == 0;
}

static size_t iov_len(const struct iovec *iov, int cnt) {
    size_t t = 0;
    for (int i = 0; i < cnt; i++) t += iov[i].iov_len;
    return t;
}

#define WRAP_PREAD(name)                                                        \
    ssize_t name(int fd, void *buf, size_t len, off_t off) {                    \
        static ssize_t (*real)(int, void *, size_t, off_t);                     \
        if (!real) real = dlsym(RTLD_NEXT, #name);                              \
        if (hits(fd, off, len)) { errno = EIO; return -1; }                     \
        return real(fd, buf, len, off);                                         \
    }
WRAP_PREAD(pread)
WRAP_PREAD(pread64)

#define WRAP_PREADV(name)                                                       \
    ssize_t name(int fd, const struct iovec *iov, int cnt, off_t off) {         \
        static ssize_t (*real)(int, const struct iovec *, int, off_t);          \
        if (!real) real = dlsym(RTLD_NEXT, #name);                              \
        if (hits(fd, off, iov_len(iov, cnt))) { errno = EIO; return -1; }       \
        return real(fd, iov, cnt, off);                                         \
    }
WRAP_PREADV(preadv)
WRAP_PREADV(preadv64)

/* CPython's os.preadv calls preadv64v2 (glibc 2.26+). */
#define WRAP_PREADV2(name)                                                      \
    ssize_t name(int fd, const struct iovec *iov, int cnt, off_t off, int fl) { \
        static ssize_t (*real)(int, const struct iovec *, int, off_t, int);     \
        if (!real) real = dlsym(RTLD_NEXT, #name);                              \
        if (hits(fd, off, iov_len(iov, cnt))) { errno = EIO; return -1; }       \
        return real(fd, iov, cnt, off, fl);                                     \
    }
WRAP_PREADV2(preadv2)
WRAP_PREADV2(preadv64v2)
