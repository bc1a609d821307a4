"""Hot paths of the reader and the merge engine, in C when available.

SPDX-License-Identifier: Apache-2.0

The C code (``csrc/vhdx_native.c``) is built by cffi as ``vhdx._native``.
When that module is missing (not built, or ``VHDX_NO_NATIVE=1`` is set) every
function falls back to a pure-Python implementation with the same semantics;
the ``_py_*`` functions are also the reference the tests compare C against.
A missing extension (an install without a C compiler) is said once per process,
as a ``RuntimeWarning`` at import; ``VHDX_NO_NATIVE=1`` asks for it, so is silent.
The chain reader has no Python twin here: :class:`vhdx.disk.VirtualDisk`'s own
read path is the fallback (``HAVE_CHAIN_READER`` tells which one runs).

Conventions shared by both implementations:

* file descriptors may be ints or objects with ``fileno()``;
* range lists are sequences of int tuples, or an ``array('q')`` already
  flattened (the fastest way to hand a large batch to C);
* an invalid range raises ``ValueError`` naming it, before any I/O;
* a failed system call raises ``OSError`` with its errno, naming the range.

The C calls run with the GIL released (cffi out-of-line API mode).
"""

from __future__ import annotations

import errno
import importlib
import os
import re
import struct
import sys
import warnings
from array import array
from typing import Any, Iterable, List, NamedTuple, Protocol, Sequence, Tuple, Union

from .errors import NativeFallbackError
from .fdio import pread, pread_into, pwrite_all

__all__ = [
    "HAVE_NATIVE",
    "NONE",
    "CLONE",
    "COPY_FILE_RANGE",
    "READ_WRITE",
    "FALLOCATE",
    "WRITE_ZEROS",
    "bitmap_runs",
    "gather_read",
    "HAVE_CHAIN_READER",
    "ChainLevel",
    "ChainReader",
    "NativeFallbackError",
    "copy_ranges",
    "zero_ranges",
    "fiemap_shared",
]

# Method codes returned per range (same values as VHDX_M_* in the C header).
NONE = 0  #: zero-length range, nothing done
CLONE = 1  #: FICLONERANGE: destination shares the source's extents
COPY_FILE_RANGE = 2  #: copy_file_range(2) (may itself reflink in the kernel)
READ_WRITE = 3  #: pread/pwrite through a bounce buffer
FALLOCATE = 4  #: fallocate(FALLOC_FL_ZERO_RANGE)
WRITE_ZEROS = 5  #: pwrite from a zero buffer


class _HasFileno(Protocol):
    def fileno(self) -> int: ...


FdLike = Union[int, _HasFileno]
Buffer = Any  # any object exporting a contiguous buffer (bytes, bytearray, memoryview, mmap...)
Ranges = Union[Sequence[Tuple[int, ...]], Iterable[Tuple[int, ...]], "array[int]"]
Run = Tuple[int, int, bool]

# Any: cffi's modules have no type information; None when not loaded.
_ext: Any
_fastread: Any
try:
    if os.environ.get("VHDX_NO_NATIVE"):
        raise ImportError("disabled by VHDX_NO_NATIVE")
    # import_module, not ``from . import``: its error names the module or the
    # loader's failure, where the other blames a circular import.
    _ext = importlib.import_module("._native", __package__)
except ImportError as _missing:
    _ext = None
    if not os.environ.get("VHDX_NO_NATIVE"):
        # One line on stderr (line 0: no source line under it), attributed to
        # this module: ``-W ignore::RuntimeWarning:vhdx.native`` silences it.
        warnings.warn_explicit(
            f"the vhdx C extension (vhdx._native) is not available ({_missing}); using the "
            "pure-Python paths: same results, slower reads and merges. Reinstall with a C "
            "compiler and the Python headers for the C paths.",
            RuntimeWarning, filename="vhdx.native", lineno=0, module="vhdx.native")
try:  # optional: the chain reader's cheap per-call entry (csrc/vhdx_fastread.c)
    if _ext is None:
        raise ImportError("no native extension")
    _fastread = importlib.import_module("._fastread", __package__)
except ImportError:
    _fastread = None

#: True when the C extension is loaded (bitmap_runs is then always native).
HAVE_NATIVE: bool = _ext is not None
# The I/O functions are stubs on non-POSIX builds; use Python there.
_NATIVE_IO: bool = bool(HAVE_NATIVE and _ext.lib.vhdx_native_io_supported())

_LINUX = sys.platform.startswith("linux")
_IO_CHUNK = 1 << 30
_RW_BUF = 4 << 20
_ZERO_BUF = 1 << 20
_BITMAP_RUN_BATCH = 1 << 16  # runs fetched from C per call
_FICLONERANGE = 0x4020940D  # _IOW(0x94, 13, struct file_clone_range)
_FS_IOC_FIEMAP = 0xC020660B  # _IOWR('f', 11, struct fiemap)
_FIEMAP_FLAG_SYNC = 0x1
_FIEMAP_EXTENT_LAST = 0x1
_FIEMAP_EXTENT_SHARED = 0x2000
_INT64_MAX = (1 << 63) - 1


# --------------------------------------------------------------------------
# argument helpers
# --------------------------------------------------------------------------


def _fileno(fd: FdLike) -> int:
    return fd if isinstance(fd, int) else fd.fileno()


def _pack(items: Ranges, width: int, what: str) -> "array[int]":
    """Flatten a range list into array('q'); width ints per entry."""
    if isinstance(items, array) and items.typecode == "q":
        if len(items) % width:
            raise ValueError(f"flat {what} array length {len(items)} is not a multiple of {width}")
        return items
    out = array("q")
    for i, item in enumerate(items):
        t = tuple(item)
        if len(t) != width:
            raise ValueError(f"{what} {i}: expected {width} integers, got {t!r}")
        try:
            out.extend(t)
        except OverflowError:
            raise ValueError(f"{what} {i}: {t!r} does not fit in int64") from None
    return out


def _entries(flat: "array[int]", width: int) -> List[Tuple[int, ...]]:
    it = iter(flat)
    return list(zip(*([it] * width)))


def _range_ok(a: int, b: int) -> bool:
    return a >= 0 and b >= 0 and a <= _INT64_MAX - b


def _oserror(code: int, what: str) -> OSError:
    return OSError(code, f"{os.strerror(code)} ({what})")


def _writable_view(buffer: Buffer) -> memoryview:
    mv = memoryview(buffer)
    if mv.readonly:
        raise TypeError("buffer must be writable")
    return mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv


# --------------------------------------------------------------------------
# bitmap_runs
# --------------------------------------------------------------------------


def _check_bitmap_range(nbytes: int, start_bit: int, nbits: int) -> Tuple[int, int]:
    import operator

    start_bit = operator.index(start_bit)
    nbits = operator.index(nbits)
    if start_bit < 0 or nbits < 0 or start_bit + nbits > nbytes * 8:
        raise ValueError(
            f"bit range [{start_bit}, {start_bit}+{nbits}) outside a bitmap of {nbytes * 8} bits"
        )
    return start_bit, nbits


def _byte_runs(b: int) -> Tuple[Tuple[int, bool], ...]:
    runs: List[List[Any]] = []
    for i in range(8):
        v = bool((b >> i) & 1)
        if runs and runs[-1][1] == v:
            runs[-1][0] += 1
        else:
            runs.append([1, v])
    return tuple((n, v) for n, v in runs)


_BYTE_RUNS = tuple(_byte_runs(b) for b in range(256))
# Uniform stretches are consumed as one match, so long runs cost O(1) Python.
_SEGMENTS = re.compile(rb"\x00+|\xff+|[\x01-\xfe]+")


def _py_bitmap_runs(bitmap: Buffer, start_bit: int, nbits: int) -> List[Run]:
    """Pure-Python reference for :func:`bitmap_runs`."""
    mv = memoryview(bitmap).cast("B")
    start_bit, nbits = _check_bitmap_range(mv.nbytes, start_bit, nbits)
    end = start_bit + nbits
    runs: List[List[Any]] = []  # [absolute start, length, value]

    def add(pos: int, n: int, v: bool) -> None:
        if runs and runs[-1][2] == v:
            runs[-1][1] += n
        else:
            runs.append([pos, n, v])

    pos = start_bit
    while pos < end and pos & 7:  # leading partial byte
        add(pos, 1, bool((mv[pos >> 3] >> (pos & 7)) & 1))
        pos += 1
    full_end = end & ~7
    if pos < full_end:
        data = bytes(mv[pos >> 3 : full_end >> 3])
        for m in _SEGMENTS.finditer(data):
            s, e = m.span()
            first = data[s]
            if first == 0 or first == 0xFF:
                add(pos + 8 * s, 8 * (e - s), first == 0xFF)
            else:
                bit = pos + 8 * s
                for byte in data[s:e]:
                    for n, v in _BYTE_RUNS[byte]:
                        add(bit, n, v)
                        bit += n
        pos = full_end
    while pos < end:  # trailing partial byte
        add(pos, 1, bool((mv[pos >> 3] >> (pos & 7)) & 1))
        pos += 1
    return [(s - start_bit, n, v) for s, n, v in runs]


def _c_bitmap_runs(bitmap: Buffer, start_bit: int, nbits: int) -> List[Run]:
    ffi, lib = _ext.ffi, _ext.lib
    cbuf = ffi.from_buffer("uint8_t[]", bitmap)
    start_bit, nbits = _check_bitmap_range(len(cbuf), start_bit, nbits)
    if nbits == 0:
        return []
    cap = min(nbits, _BITMAP_RUN_BATCH)
    out = ffi.new("int64_t[]", 3 * cap)
    nruns = ffi.new("size_t *")
    consumed = ffi.new("uint64_t *")
    result: List[Run] = []
    done = 0
    while done < nbits:
        rc = lib.vhdx_bitmap_runs(
            cbuf, len(cbuf), start_bit + done, nbits - done, out, cap, nruns, consumed
        )
        if rc != 0 or consumed[0] == 0:  # cannot happen after the check above
            raise ValueError(f"bitmap_runs: invalid range (rc={rc})")
        # zip/map over list slices build the tuples without a Python loop
        flat = ffi.unpack(out, 3 * nruns[0])
        starts: Iterable[int] = flat[0::3]
        if done:
            starts = map(done.__add__, starts)
        result.extend(zip(starts, flat[1::3], map(bool, flat[2::3])))
        done += consumed[0]
    return result


def bitmap_runs(bitmap: Buffer, start_bit: int, nbits: int) -> List[Run]:
    """Runs of equal bits of an LSB-first bitmap over ``[start_bit, start_bit+nbits)``.

    Bit *i* is bit ``i & 7`` of byte ``i >> 3`` (the VHDX sector-bitmap order).
    Returns coalesced ``(start, length, value)`` tuples, ``start`` relative to
    *start_bit*, that cover the range exactly (``[]`` for ``nbits == 0``).
    Raises ``ValueError`` if the range does not lie inside *bitmap*.
    """
    if HAVE_NATIVE:
        return _c_bitmap_runs(bitmap, start_bit, nbits)
    return _py_bitmap_runs(bitmap, start_bit, nbits)


# --------------------------------------------------------------------------
# gather_read
# --------------------------------------------------------------------------


def _bad_segment(i: int, seg: Tuple[int, ...], buf_len: int) -> ValueError:
    return ValueError(f"segment {i} {seg!r} (buf_offset, file_offset, length) "
                      f"invalid or outside a buffer of {buf_len} bytes")


def _py_gather_read(fd: FdLike, buffer: Buffer, segments: Ranges) -> None:
    """Pure-Python reference for :func:`gather_read`."""
    fd = _fileno(fd)
    mv = _writable_view(buffer)
    segs = _entries(_pack(segments, 3, "segment"), 3)
    n = mv.nbytes
    for i, (bo, fo, ln) in enumerate(segs):
        if not (_range_ok(fo, ln) and 0 <= bo <= n and ln <= n - bo):
            raise _bad_segment(i, (bo, fo, ln), n)
    for i, (bo, fo, ln) in enumerate(segs):
        try:
            pread_into(fd, mv[bo:bo + ln], fo, None)  # past EOF: zeros
        except OSError as e:
            raise _oserror(e.errno or errno.EIO, f"gather_read segment {i} {(bo, fo, ln)!r}") from None


def _c_gather_read(fd: FdLike, buffer: Buffer, segments: Ranges) -> None:
    ffi, lib = _ext.ffi, _ext.lib
    fd = _fileno(fd)
    if memoryview(buffer).readonly:
        raise TypeError("buffer must be writable")
    flat = _pack(segments, 3, "segment")
    cbuf = ffi.from_buffer("uint8_t[]", buffer, require_writable=True)
    failed = ffi.new("size_t *")
    rc = lib.vhdx_gather_read(fd, cbuf, len(cbuf), ffi.from_buffer("int64_t[]", flat),
                              len(flat) // 3, failed)
    buf_len = len(cbuf)
    ffi.release(cbuf)  # no export of a caller's memoryview left in a traceback (see _table_pointer)
    if rc == 0:
        return
    i = failed[0]
    seg = tuple(flat[3 * i : 3 * i + 3])
    if rc == lib.VHDX_EARG:
        raise _bad_segment(i, seg, buf_len)
    raise _oserror(rc, f"gather_read segment {i} {seg!r}")


def gather_read(fd: FdLike, buffer: Buffer, segments: Ranges) -> None:
    """Read ``(buf_offset, file_offset, length)`` segments of *fd* into *buffer*.

    Every segment is bounds-checked against the writable *buffer* before any
    I/O (``ValueError``). Short reads are retried; bytes past the file's EOF
    are **zero-filled** (the caller decides whether a short file is an error).
    A failed read raises ``OSError`` naming the segment; earlier segments are
    then already filled. The file position is not used or changed.
    """
    if _NATIVE_IO:
        _c_gather_read(fd, buffer, segments)
    else:
        _py_gather_read(fd, buffer, segments)


# --------------------------------------------------------------------------
# ChainReader
# --------------------------------------------------------------------------


class ChainLevel(NamedTuple):
    """What the C reader needs of one file of a chain (child first)."""

    fd: int
    bat: Any  #: decoded BAT: a memoryview cast to 'Q' or an array('Q'), host order
    virtual_size: int
    block_size: int
    chunk_ratio: int
    sector_size: int
    cache_bitmaps: bool = True  #: False when the file's bitmaps may change under the reader


def _table_owner(table: Buffer) -> Tuple[Any, int, int]:
    """(owner, byte offset, entries): the object that owns ``table``'s memory
    and where its uint64 entries lie in it.

    Why not export the memoryview itself: CPython's garbage collector may clear
    a memoryview that is part of a reference cycle while an export of it is
    still held (cffi's ``from_buffer``, a C ``Py_buffer``); releasing that export
    afterwards crashes the interpreter. A bytearray or array has no such state.
    """
    ffi = _ext.ffi
    owner = table.obj if isinstance(table, memoryview) and table.obj is not None else table
    probe = ffi.from_buffer("uint64_t[]", table)
    addr, entries = int(ffi.cast("uintptr_t", probe)), len(probe)
    ffi.release(probe)
    whole = ffi.from_buffer("uint8_t[]", owner)
    start, size = int(ffi.cast("uintptr_t", whole)), len(whole)
    ffi.release(whole)
    if not start <= addr or addr + 8 * entries > start + size:
        raise ValueError("the table's memory is not inside its owner's buffer")
    return owner, addr - start, entries


class ChainReader:
    """A chain's whole read path in C: BAT lookup, sector-bitmap runs, zero fill
    and pread straight into the caller's buffer, one call per read with the GIL
    released (``vhdx_reader_read``). Safe to use from several threads.

    The reader keeps the BAT buffers alive and sees in-place updates to them;
    it does not own the descriptors. Available only when the extension is built
    with POSIX I/O (:data:`HAVE_CHAIN_READER`).

    :attr:`fast` is the hot-path callable ``fast(offset, buffer) -> int | None``:
    the bytes filled, or None for "redo this read on the Python path" (odd
    buffer, I/O error, entry to report). It is ``vhdx._fastread``'s C method
    when that module is built, else a cffi-based equivalent (~0.3 us slower).
    :attr:`read` is ``read(offset, size) -> bytes | None`` (clipped at the end
    of the disk): with ``vhdx._fastread`` the bytes object is built once at its
    final length and filled in place; the cffi equivalent reads into a
    bytearray and copies.
    """

    __slots__ = ("_specs", "_ptr", "_keep", "_impl", "fast", "read")

    def __init__(self, levels: Sequence[ChainLevel], *, use_fastread: bool = True) -> None:
        if not _NATIVE_IO:
            raise NotImplementedError("the native chain reader is not available")
        self._specs = [(lv.fd, *_table_owner(lv.bat), lv.virtual_size, lv.block_size, lv.chunk_ratio,
                        lv.sector_size, bool(lv.cache_bitmaps)) for lv in levels]
        self._ptr: Any = None
        self._keep: List[Any] = []
        if use_fastread and _fastread is not None:
            self._impl = _fastread.ChainReader(self._specs)
            self.fast = self._impl.readinto
            self.read = self._impl.read
        else:
            self._impl = None
            self._cffi_reader()  # raises for a bad geometry, like the C type does
            self.fast = self._cffi_fast()
            self.read = self._cffi_read(self._specs[0][4] if self._specs else 0)

    _CONSTRUCTOR = "vhdx_reader_new"  #: the C function that builds the reader from the level array

    def _cffi_levels(self) -> Tuple[Any, List[Any]]:
        """The C level array for :attr:`_CONSTRUCTOR`, and what must stay alive with it."""
        ffi = _ext.ffi
        arr = ffi.new("vhdx_rlevel[]", len(self._specs))
        keep: List[Any] = [arr]
        for d, (fd, owner, off, entries, vsize, bs, cr, lss, cache) in zip(arr, self._specs):
            whole = ffi.from_buffer("uint8_t[]", owner)
            keep.append(whole)
            d.fd, d.cache_bitmaps, d.bat, d.bat_entries = fd, cache, ffi.cast("uint64_t *", whole + off), entries
            d.virtual_size, d.block_size, d.chunk_ratio, d.sector_size = vsize, bs, cr, lss
        return arr, keep

    def _cffi_reader(self) -> Any:
        """The cffi-side reader over the same levels (built on first use when
        ``vhdx._fastread`` serves the hot path: only :meth:`readinto` needs it)."""
        if self._ptr is not None:
            return self._ptr
        ffi, lib = _ext.ffi, _ext.lib
        arr, keep = self._cffi_levels()
        out = ffi.new("vhdx_reader **")
        rc = getattr(lib, self._CONSTRUCTOR)(arr, len(self._specs), out)
        if rc == lib.VHDX_EARG:
            raise ValueError("invalid chain geometry for the native reader")
        if rc:
            raise _oserror(rc, self._CONSTRUCTOR)
        self._keep = keep
        self._ptr = ffi.gc(out[0], lib.vhdx_reader_free)
        return self._ptr

    def _cffi_fast(self) -> Any:
        read, reader, from_buffer = _ext.lib.vhdx_reader_read, self._cffi_reader(), _ext.ffi.from_buffer
        u8, null = _ext.ffi.typeof("uint8_t[]"), _ext.ffi.NULL

        # The closure holds ``self``: the reader points into the tables ``_keep`` exports.
        def fast(offset: int, buffer: Buffer, _owner: "ChainReader" = self) -> int | None:
            try:
                if offset < 0:
                    return None
                cbuf = from_buffer(u8, buffer, True)
            except (TypeError, ValueError, BufferError):
                return None
            try:
                n = read(reader, offset, cbuf, len(cbuf), null)
            except (OverflowError, TypeError):  # offset past uint64, or not an int
                return None
            finally:
                del cbuf  # no export left in a traceback (see _table_owner)
            return n if n >= 0 else None

        return fast

    def _cffi_read(self, size: int) -> Any:
        fast = self.fast

        def read(offset: int, n: int) -> bytes | None:
            if offset < 0 or n < 0:
                return None
            n = min(n, max(0, size - offset))
            buf = bytearray(n)
            got = fast(offset, buf) if n else 0
            if got is None:
                return None
            return bytes(buf) if got == n else bytes(buf[:got])

        return read

    def readinto(self, offset: int, buffer: Buffer) -> int:
        """Fill ``buffer`` from virtual ``offset``; returns the bytes filled (short
        at the end of the disk). Raises ``OSError`` for a failed read,
        :class:`~vhdx.errors.NativeFallbackError`, ``ValueError`` (offset out of range) or
        ``TypeError`` (buffer not writable)."""
        ffi, lib = _ext.ffi, _ext.lib
        try:
            cbuf = ffi.from_buffer("uint8_t[]", buffer, require_writable=True)
        except BufferError:
            raise TypeError("buffer must be writable") from None
        if offset < 0 or offset > _INT64_MAX:
            raise ValueError(f"offset {offset} out of range")
        err = ffi.new("int *")
        n: int = lib.vhdx_reader_read(self._cffi_reader(), offset, cbuf, len(cbuf), err)
        size = len(cbuf)
        ffi.release(cbuf)  # no export left behind in a traceback (see _table_owner)
        if n >= 0:
            return n
        if err[0] == lib.VHDX_EFALLBACK:
            raise NativeFallbackError(f"read at {offset}")
        if err[0] == lib.VHDX_EARG:
            raise ValueError(f"read of {size} bytes at {offset} out of range")
        raise _oserror(err[0], f"read at {offset}")

    def invalidate(self) -> None:
        """Forget the cached sector bitmaps (after the files' bitmaps changed)."""
        if self._ptr is not None:
            _ext.lib.vhdx_reader_invalidate(self._ptr)
        if self._impl is not None:
            self._impl.invalidate()


#: True when :class:`ChainReader` can be built here.
HAVE_CHAIN_READER: bool = _NATIVE_IO


# --------------------------------------------------------------------------
# copy_ranges
# --------------------------------------------------------------------------


def _bad_range(i: int, r: Tuple[int, ...], fields: str) -> ValueError:
    return ValueError(f"range {i} {r!r} ({fields}) has a negative value or overflows int64")


class _PyCopier:
    """State of one batch, mirroring struct copy_ctx in the C code."""

    def __init__(self, src: int, dst: int, allow_clone: bool, allow_cfr: bool) -> None:
        self.src, self.dst = src, dst
        self.clone_ok = allow_clone and _LINUX
        self.cfr_ok = allow_cfr and hasattr(os, "copy_file_range")
        self.clone_einval = 0
        self.clone_success = False
        self.blksz = 0

    def try_clone(self, so: int, do: int, ln: int) -> bool:
        import fcntl

        if not self.blksz:
            try:
                self.blksz = os.fstatvfs(self.dst).f_bsize
            except OSError:
                self.blksz = 0
            if not self.blksz:
                self.blksz = os.fstat(self.dst).st_blksize
            if not self.blksz:
                self.clone_ok = False
                return False
        bs = self.blksz
        if so % bs or do % bs:
            return False
        if ln % bs:  # partial last block: only at source EOF, nothing after it in dst
            if so + ln != os.fstat(self.src).st_size or do + ln < os.fstat(self.dst).st_size:
                return False
        try:
            fcntl.ioctl(self.dst, _FICLONERANGE, struct.pack("=qQQQ", self.src, so, ln, do))
        except (OSError, ValueError) as e:  # ValueError: negative fd
            if getattr(e, "errno", None) == errno.EINVAL:
                if not self.clone_success:
                    self.clone_einval += 1
                    if self.clone_einval >= 4:
                        self.clone_ok = False
            else:
                self.clone_ok = False
            return False
        self.clone_success = True
        return True

    def copy_rw(self, so: int, do: int, ln: int) -> None:
        eof = False
        while ln > 0:
            want = min(ln, _RW_BUF)
            data = b"" if eof else pread(self.src, so, want)
            if len(data) < want:  # past the source's end: zeros, and no more reads
                eof = True
                data += bytes(want - len(data))
            pwrite_all(self.dst, data, do)
            so += want
            do += want
            ln -= want

    def copy_one(self, so: int, do: int, ln: int) -> int:
        if ln == 0:
            return NONE
        if self.clone_ok and self.try_clone(so, do, ln):
            return CLONE
        if self.cfr_ok:
            while ln > 0:
                try:
                    r = os.copy_file_range(self.src, self.dst, min(ln, _IO_CHUNK), so, do)
                except OSError as e:
                    if e.errno in (errno.ENOSYS, errno.EXDEV, errno.EOPNOTSUPP, errno.ENOTSUP):
                        self.cfr_ok = False
                        break
                    if e.errno == errno.EINVAL:
                        break
                    raise
                if r == 0:
                    break
                so, do, ln = so + r, do + r, ln - r
            if ln == 0:
                return COPY_FILE_RANGE
        self.copy_rw(so, do, ln)
        return READ_WRITE


_COPY_FIELDS = "src_offset, dst_offset, length"


def _py_copy_ranges(src_fd: FdLike, dst_fd: FdLike, ranges: Ranges, *,
                    allow_clone: bool = True, allow_copy_file_range: bool = True) -> List[int]:
    """Pure-Python reference for :func:`copy_ranges`."""
    rs = _entries(_pack(ranges, 3, "range"), 3)
    for i, (so, do, ln) in enumerate(rs):
        if not (_range_ok(so, ln) and _range_ok(do, ln)):
            raise _bad_range(i, (so, do, ln), _COPY_FIELDS)
    c = _PyCopier(_fileno(src_fd), _fileno(dst_fd), allow_clone, allow_copy_file_range)
    methods = []
    for i, (so, do, ln) in enumerate(rs):
        try:
            methods.append(c.copy_one(so, do, ln))
        except OSError as e:
            raise _oserror(e.errno or errno.EIO, f"copy_ranges range {i} {(so, do, ln)!r}") from None
    return methods


def _c_copy_ranges(src_fd: FdLike, dst_fd: FdLike, ranges: Ranges, *,
                   allow_clone: bool = True, allow_copy_file_range: bool = True) -> List[int]:
    ffi, lib = _ext.ffi, _ext.lib
    src, dst = _fileno(src_fd), _fileno(dst_fd)
    flat = _pack(ranges, 3, "range")
    n = len(flat) // 3
    flags = (lib.VHDX_ALLOW_CLONE if allow_clone else 0) | (
        lib.VHDX_ALLOW_COPY_FILE_RANGE if allow_copy_file_range else 0)
    methods = ffi.new("int32_t[]", max(n, 1))
    failed = ffi.new("size_t *")
    rc = lib.vhdx_copy_ranges(src, dst, ffi.from_buffer("int64_t[]", flat), n, flags,
                              methods, failed)
    if rc != 0:
        i = failed[0]
        r = tuple(flat[3 * i : 3 * i + 3])
        if rc == lib.VHDX_EARG:
            raise _bad_range(i, r, _COPY_FIELDS)
        raise _oserror(rc, f"copy_ranges range {i} {r!r}")
    codes: List[int] = ffi.unpack(methods, n)
    return codes


def copy_ranges(src_fd: FdLike, dst_fd: FdLike, ranges: Ranges, *,
                allow_clone: bool = True, allow_copy_file_range: bool = True) -> List[int]:
    """Copy ``(src_offset, dst_offset, length)`` ranges from *src_fd* to *dst_fd*.

    Per range, in order: ``FICLONERANGE`` (Linux; only for offsets that are
    multiples of the destination file system's block size and a length that
    is too, or that ends exactly at the source's EOF with no destination data
    after it), then ``copy_file_range``, then pread/pwrite through a 4 MiB
    buffer. A refused clone / copy_file_range is remembered for the rest of
    the batch. Returns one code per range: :data:`CLONE`,
    :data:`COPY_FILE_RANGE`, :data:`READ_WRITE`, or :data:`NONE` for a
    zero-length range. Source bytes past its EOF are written as zeros.
    Ranges must not overlap when both fds are the same file.

    Raises ``ValueError`` (bad range, before any I/O) or ``OSError`` naming
    the failed range; earlier ranges are then already copied.
    """
    if _NATIVE_IO:
        return _c_copy_ranges(src_fd, dst_fd, ranges, allow_clone=allow_clone,
                              allow_copy_file_range=allow_copy_file_range)
    return _py_copy_ranges(src_fd, dst_fd, ranges, allow_clone=allow_clone,
                           allow_copy_file_range=allow_copy_file_range)


# --------------------------------------------------------------------------
# zero_ranges
# --------------------------------------------------------------------------


def _py_zero_ranges(fd: FdLike, ranges: Ranges) -> List[int]:
    """Pure-Python reference for :func:`zero_ranges` (always pwrite)."""
    fd = _fileno(fd)
    rs = _entries(_pack(ranges, 2, "range"), 2)
    for i, (off, ln) in enumerate(rs):
        if not _range_ok(off, ln):
            raise _bad_range(i, (off, ln), "offset, length")
    zeros = memoryview(bytes(min(_ZERO_BUF, max((ln for _, ln in rs), default=0))))
    methods = []
    for i, (off, ln) in enumerate(rs):
        if ln == 0:
            methods.append(NONE)
            continue
        try:
            while ln > 0:
                n = min(ln, _ZERO_BUF)
                pwrite_all(fd, zeros[:n], off)
                off, ln = off + n, ln - n
        except OSError as e:
            raise _oserror(e.errno or errno.EIO, f"zero_ranges range {i} {rs[i]!r}") from None
        methods.append(WRITE_ZEROS)
    return methods


def _c_zero_ranges(fd: FdLike, ranges: Ranges) -> List[int]:
    ffi, lib = _ext.ffi, _ext.lib
    flat = _pack(ranges, 2, "range")
    n = len(flat) // 2
    methods = ffi.new("int32_t[]", max(n, 1))
    failed = ffi.new("size_t *")
    rc = lib.vhdx_zero_ranges(_fileno(fd), ffi.from_buffer("int64_t[]", flat), n, methods, failed)
    if rc != 0:
        i = failed[0]
        r = tuple(flat[2 * i : 2 * i + 2])
        if rc == lib.VHDX_EARG:
            raise _bad_range(i, r, "offset, length")
        raise _oserror(rc, f"zero_ranges range {i} {r!r}")
    codes: List[int] = ffi.unpack(methods, n)
    return codes


def zero_ranges(fd: FdLike, ranges: Ranges) -> List[int]:
    """Make the ``(offset, length)`` ranges of *fd* read as zeros.

    Uses ``fallocate(FALLOC_FL_ZERO_RANGE)`` where the file system supports
    it (Linux), otherwise pwrite from a zero buffer. Either way the file
    grows if a range ends past EOF. Returns one code per range:
    :data:`FALLOCATE`, :data:`WRITE_ZEROS` or :data:`NONE` (zero length).
    """
    if _NATIVE_IO:
        return _c_zero_ranges(fd, ranges)
    return _py_zero_ranges(fd, ranges)


# --------------------------------------------------------------------------
# fiemap_shared
# --------------------------------------------------------------------------

_FIEMAP_HDR = struct.Struct("=QQIIII")  # struct fiemap without the extents
_FIEMAP_EXT = struct.Struct("=QQQQQIIII")  # struct fiemap_extent
_FIEMAP_NEXT = 128


def _py_fiemap_shared(fd: FdLike, offset: int, length: int) -> Tuple[int, int]:
    """Pure-Python reference for :func:`fiemap_shared` (Linux)."""
    if not _LINUX:
        raise NotImplementedError("fiemap_shared needs Linux FS_IOC_FIEMAP")
    import fcntl

    fd = _fileno(fd)
    if not _range_ok(offset, length):
        raise ValueError(f"invalid range offset={offset} length={length}")
    pos, end = offset, offset + length
    shared = mapped = 0
    size = _FIEMAP_HDR.size + _FIEMAP_NEXT * _FIEMAP_EXT.size
    while pos < end:
        buf = bytearray(size)
        _FIEMAP_HDR.pack_into(buf, 0, pos, end - pos, _FIEMAP_FLAG_SYNC, 0, _FIEMAP_NEXT, 0)
        try:
            if fd < 0:  # fcntl raises ValueError for these; match the C path
                raise OSError(errno.EBADF, os.strerror(errno.EBADF))
            fcntl.ioctl(fd, _FS_IOC_FIEMAP, buf, True)
        except OSError as e:
            raise _oserror(e.errno or errno.EIO, f"fiemap_shared offset={offset} length={length}") from None
        count = _FIEMAP_HDR.unpack_from(buf, 0)[3]
        if count == 0:
            break
        nxt, last = pos, False
        for k in range(min(count, _FIEMAP_NEXT)):
            logical, _phys, ln, _r1, _r2, flags, _a, _b, _c = _FIEMAP_EXT.unpack_from(
                buf, _FIEMAP_HDR.size + k * _FIEMAP_EXT.size)
            lo, hi = max(logical, pos), min(logical + ln, end)
            if hi > lo:
                mapped += hi - lo
                if flags & _FIEMAP_EXTENT_SHARED:
                    shared += hi - lo
            nxt = max(nxt, logical + ln)
            last = last or bool(flags & _FIEMAP_EXTENT_LAST)
        if last or nxt <= pos:
            break
        pos = nxt
    return shared, mapped


def _c_fiemap_shared(fd: FdLike, offset: int, length: int) -> Tuple[int, int]:
    ffi, lib = _ext.ffi, _ext.lib
    if not _range_ok(offset, length):
        raise ValueError(f"invalid range offset={offset} length={length}")
    shared = ffi.new("uint64_t *")
    mapped = ffi.new("uint64_t *")
    rc = lib.vhdx_fiemap_shared(_fileno(fd), offset, length, shared, mapped)
    if rc == errno.ENOSYS and not _LINUX:
        raise NotImplementedError("fiemap_shared needs Linux FS_IOC_FIEMAP")
    if rc != 0:
        raise _oserror(rc, f"fiemap_shared offset={offset} length={length}")
    return shared[0], mapped[0]


def fiemap_shared(fd: FdLike, offset: int, length: int) -> Tuple[int, int]:
    """Return ``(shared_bytes, mapped_bytes)`` of ``[offset, offset+length)``.

    Uses ``FS_IOC_FIEMAP`` with ``FIEMAP_FLAG_SYNC``; *mapped* counts bytes
    backed by extents (holes excluded), *shared* those flagged
    ``FIEMAP_EXTENT_SHARED`` (e.g. after a reflink clone). Linux only:
    ``NotImplementedError`` elsewhere, ``OSError`` if the file system has no
    FIEMAP.
    """
    if _NATIVE_IO:
        return _c_fiemap_shared(fd, offset, length)
    return _py_fiemap_shared(fd, offset, length)
