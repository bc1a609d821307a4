"""cffi (API, out-of-line) build script for the ``vhdx._native`` extension.

SPDX-License-Identifier: Apache-2.0

Two ways to use it:

* setuptools: ``setup(cffi_modules=["csrc/build_native.py:ffibuilder"])``.
  setuptools runs from the project root, so the paths below are relative.
* development: ``python3 csrc/build_native.py`` compiles in a temporary
  directory and drops ``vhdx/_native<EXT_SUFFIX>`` into the source tree, so
  ``from vhdx import _native`` works from the project root.

Out-of-line API mode releases the GIL around every C call by default; the
wrapper in ``vhdx/native.py`` relies on that for its batch I/O calls.
"""

from __future__ import annotations

import os
import sys

from cffi import FFI

CDEF = """
#define VHDX_EARG ...
#define VHDX_M_NONE ...
#define VHDX_M_CLONE ...
#define VHDX_M_COPY_FILE_RANGE ...
#define VHDX_M_READ_WRITE ...
#define VHDX_M_FALLOCATE ...
#define VHDX_M_WRITE_ZEROS ...
#define VHDX_ALLOW_CLONE ...
#define VHDX_ALLOW_COPY_FILE_RANGE ...

int vhdx_native_io_supported(void);
int vhdx_bitmap_runs(const uint8_t *bm, size_t bm_len, uint64_t start_bit,
                     uint64_t nbits, int64_t *out, size_t max_runs,
                     size_t *nruns, uint64_t *consumed);
int vhdx_gather_read(int fd, uint8_t *buf, size_t buf_len,
                     const int64_t *segs, size_t nsegs, size_t *failed);
int vhdx_copy_ranges(int src_fd, int dst_fd, const int64_t *ranges, size_t n,
                     int flags, int32_t *methods, size_t *failed);
int vhdx_zero_ranges(int fd, const int64_t *ranges, size_t n,
                     int32_t *methods, size_t *failed);
int vhdx_fiemap_shared(int fd, int64_t offset, int64_t length,
                       uint64_t *shared, uint64_t *mapped);
"""


def make_ffibuilder(root: str = "") -> FFI:
    """Return an FFI builder whose paths are relative to *root* ("" = cwd)."""
    csrc = os.path.join(root, "csrc")
    builder = FFI()
    builder.cdef(CDEF)
    builder.set_source(
        "vhdx._native",
        '#include "vhdx_native.h"',
        sources=[os.path.join(csrc, "vhdx_native.c")],
        include_dirs=[csrc],
    )
    return builder


# What setuptools' cffi_modules hook picks up.
ffibuilder = make_ffibuilder()


def _build_in_place() -> str:
    import sysconfig
    import tempfile

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    target = os.path.join(root, "vhdx", "_native" + suffix)
    with tempfile.TemporaryDirectory(prefix="vhdx-native-build-") as tmp:
        # cffi chdirs into tmpdir, hence absolute source paths here.
        out = make_ffibuilder(root).compile(tmpdir=tmp, target=target, verbose=True)
    return out


if __name__ == "__main__":
    print(_build_in_place())
    sys.exit(0)
