"""cffi (API, out-of-line) build script for the ``vhdx._native`` extension.

SPDX-License-Identifier: Apache-2.0

Two ways to use it:

* setuptools: ``setup(cffi_modules=["csrc/build_native.py:ffibuilder"])``.
  setuptools runs from the project root, so the paths below are relative.
* development: ``python3 csrc/build_native.py`` compiles in a temporary
  directory and drops ``vhdx/_native.abi3.so`` and ``vhdx/_fastread.abi3.so``
  into the source tree (removing older builds under other suffixes), so both
  import from the project root.

It also defines :func:`fastread_extension`, the CPython extension
``vhdx._fastread`` (the chain reader's per-call entry, limited API 3.11), and
:func:`drop_stale`, both for setup.py.

Out-of-line API mode releases the GIL around every C call by default; the
wrapper in ``vhdx/native.py`` relies on that for its batch I/O calls.
"""

from __future__ import annotations

import os
import sys

from cffi import FFI

CDEF = """
#define VHDX_EARG ...
#define VHDX_EFALLBACK ...
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

typedef struct vhdx_rlevel {
    int fd;
    int cache_bitmaps;
    const uint64_t *bat;
    uint64_t bat_entries;
    uint64_t virtual_size;
    uint64_t block_size;
    uint64_t chunk_ratio;
    uint32_t sector_size;
} vhdx_rlevel;
typedef struct vhdx_reader vhdx_reader;
int vhdx_reader_new(const vhdx_rlevel *levels, size_t nlevels, vhdx_reader **out);
void vhdx_reader_free(vhdx_reader *r);
void vhdx_reader_invalidate(vhdx_reader *r);
int64_t vhdx_reader_read(vhdx_reader *r, uint64_t offset, uint8_t *buf, size_t len,
                         int *err);
typedef struct vhdx_vhd_level {
    int fd;
    int cache_bitmaps;
    int fixed;
    const uint32_t *bat;
    uint64_t bat_entries;
    uint64_t virtual_size;
    uint64_t block_size;
} vhdx_vhd_level;
int vhdx_vhd_reader_new(const vhdx_vhd_level *levels, size_t nlevels, vhdx_reader **out);
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
        libraries=_LIBS,
    )
    return builder


# The chain reader's lock (older glibc keeps pthread out of libc).
_LIBS = ["pthread"] if os.name == "posix" else []


# The limited API version _fastread is compiled against (3.11: the buffer
# protocol joined it), so its build is an ``.abi3.so`` usable by every later CPython.
FASTREAD_LIMITED_API = 0x030B0000


def fastread_extension(root: str = ""):  # noqa: ANN201 - setuptools.Extension
    """``vhdx._fastread``: the chain reader's per-call entry as a CPython type
    (csrc/vhdx_fastread.c; see there for why not cffi), on the stable ABI.
    Optional: without it ``vhdx.native`` calls the same C function through
    cffi, a little slower (setup.py's build_ext lets its build fail)."""
    from setuptools import Extension

    csrc = os.path.join(root, "csrc")
    return Extension("vhdx._fastread",
                     sources=[os.path.join(csrc, "vhdx_fastread.c"), os.path.join(csrc, "vhdx_native.c")],
                     include_dirs=[csrc], libraries=_LIBS, py_limited_api=True,
                     define_macros=[("Py_LIMITED_API", hex(FASTREAD_LIMITED_API))])


# What setuptools' cffi_modules hook picks up.
ffibuilder = make_ffibuilder()


def _build_in_place() -> str:
    import sysconfig
    import tempfile

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # cffi's generated C defines Py_LIMITED_API itself (release builds): the
    # same stable-ABI name setup.py gives it.
    suffix = ".abi3.so" if os.name == "posix" else (sysconfig.get_config_var("EXT_SUFFIX") or ".so")
    target = os.path.join(root, "vhdx", "_native" + suffix)
    with tempfile.TemporaryDirectory(prefix="vhdx-native-build-") as tmp:
        # cffi chdirs into tmpdir, hence absolute source paths here.
        out = make_ffibuilder(root).compile(tmpdir=tmp, target=target, verbose=True)
    drop_stale(out)
    return out + "\n" + _build_fastread_in_place(root)


def drop_stale(made: str) -> None:
    """Remove in-place builds of the same module under another suffix: the import
    system tries ``.cpython-3XX-*.so`` before ``.abi3.so``, so an older
    version-specific build would shadow the one just made."""
    folder, name = os.path.split(made)
    stem = name.split(".", 1)[0] + "."
    for other in os.listdir(folder):
        if other != name and other.startswith(stem) and other.endswith((".so", ".pyd")):
            os.remove(os.path.join(folder, other))


def _build_fastread_in_place(root: str) -> str:
    import tempfile

    from setuptools import Distribution

    cwd = os.getcwd()
    os.chdir(root)  # build_ext --inplace writes next to the package
    try:
        with tempfile.TemporaryDirectory(prefix="vhdx-fastread-build-") as tmp:
            dist = Distribution({"ext_modules": [fastread_extension()], "script_name": "build_native.py"})
            cmd = dist.get_command_obj("build_ext")
            cmd.inplace = True
            cmd.build_temp = tmp
            cmd.ensure_finalized()
            cmd.run()
            made = os.path.join(root, cmd.get_ext_filename("vhdx._fastread"))
    finally:
        os.chdir(cwd)
    drop_stale(made)
    return made


if __name__ == "__main__":
    print(_build_in_place())
    sys.exit(0)
