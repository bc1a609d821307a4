"""File-descriptor helpers: the one place for positional I/O loops and barriers.

Every ``os.pread``/``os.pwrite`` loop, the data-extent walk (``SEEK_DATA`` /
``SEEK_HOLE``), the durability barriers (file and directory) and the
block-device size and zeroing ioctls live here, so that short reads, short
writes, EOF and errors are handled one way everywhere. Functions that take a
``path`` turn an ``OSError`` into a :class:`VhdxIOError` naming it (errno
kept); with ``path=None`` the ``OSError`` is left to the caller.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from typing import Callable

from .errors import ImageNotFoundError, TargetKindError, VhdxError, VhdxIOError

__all__ = ["open_read_only", "open_regular_file", "pread", "pread_into", "pwrite_all", "data_extents", "fsync",
           "fsync_dir", "device_size", "zero_range"]

_BLKGETSIZE64 = 0x80081272  # _IOR(0x12, 114, size_t): size of a block device in bytes
_BLKZEROOUT = 0x127F  # _IO(0x12, 127): zero a byte range; reads zeros afterwards, always
Buffer = bytes | bytearray | memoryview


def open_read_only(path: str | os.PathLike[str], accept: Callable[[int], bool] = stat.S_ISREG,
                   refuse: Callable[[str, int], VhdxError] | None = None) -> int:
    """Open ``path`` read-only when ``accept(st_mode)`` allows its kind (default:
    a regular file); ``refuse(name, st_mode)`` makes the error for another kind.

    The kind is checked before opening (a FIFO would block the open) and again
    on the descriptor (the path could have been swapped in between).
    """
    name = os.fspath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ImageNotFoundError(name) from None
    except OSError as e:
        raise VhdxIOError.from_os(e, name) from None
    if not accept(st.st_mode):
        raise (refuse(name, st.st_mode) if refuse is not None
               else TargetKindError(f"{name}: not a regular file"))
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        # O_NOATIME keeps even the access time of evidence unchanged where allowed.
        fd = os.open(path, flags | getattr(os, "O_NOATIME", 0))
    except PermissionError:
        try:
            fd = os.open(path, flags)
        except OSError as e:
            raise VhdxIOError.from_os(e, name) from None
    except OSError as e:
        raise VhdxIOError.from_os(e, name) from None
    st2 = os.fstat(fd)
    if stat.S_IFMT(st2.st_mode) != stat.S_IFMT(st.st_mode) or (st2.st_dev, st2.st_ino) != (st.st_dev, st.st_ino):
        os.close(fd)
        raise TargetKindError(f"{name}: changed while being opened")
    return fd


def open_regular_file(path: str | os.PathLike[str]) -> int:
    """Open the regular file ``path`` read-only (:func:`open_read_only`)."""
    return open_read_only(path)


def pread(fd: int, offset: int, size: int, path: str | None = None) -> bytes:
    """``size`` bytes at ``offset`` of ``fd``, short reads retried; short only at EOF."""
    parts = []
    try:
        while size > 0:
            chunk = os.pread(fd, size, offset)
            if not chunk:
                break
            parts.append(chunk)
            offset += len(chunk)
            size -= len(chunk)
    except OSError as e:
        if path is None:
            raise
        raise VhdxIOError.from_os(e, path, f"read failed at {offset:#x}") from None
    return b"".join(parts)


def pread_into(fd: int, mv: memoryview, offset: int, path: str | None) -> None:
    """Fill ``mv`` from ``offset`` of ``fd``: short reads retried, zeros past EOF."""
    n = len(mv)
    got = 0
    if n == 0:  # nothing to read: no call, so no error from it either
        return
    try:
        got = os.preadv(fd, [mv], offset)
        while 0 < got < n:
            k = os.preadv(fd, [mv[got:]], offset + got)
            if k == 0:
                break
            got += k
    except OSError as e:
        if path is None:
            raise
        raise VhdxIOError.from_os(e, path, f"read failed at {offset + got:#x}") from None
    if got < n:
        mv[got:] = bytes(n - got)


def pwrite_all(fd: int, data: Buffer, offset: int, path: str | None = None) -> None:
    """Write all of ``data`` at ``offset`` of ``fd`` (a write may be short: a signal,
    a full pipe); a write that makes no progress is EIO rather than a spin."""
    mv = memoryview(data).cast("B")
    try:
        while len(mv):
            n = os.pwrite(fd, mv, offset)
            if n <= 0:
                raise OSError(errno.EIO, "pwrite made no progress")
            mv, offset = mv[n:], offset + n
    except OSError as e:  # ENOSPC, EIO, ...: errno kept
        if path is None:
            raise
        raise VhdxIOError.from_os(e, path, f"write failed at {offset:#x}") from None


def data_extents(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    """(lo, hi) ranges of ``fd`` inside [start, end) that hold data (SEEK_DATA /
    SEEK_HOLE); everything else reads zeros. OSError when the platform or the
    file system cannot tell (the caller then reads everything)."""
    seek_data, seek_hole = getattr(os, "SEEK_DATA", None), getattr(os, "SEEK_HOLE", None)
    if seek_data is None or seek_hole is None:
        raise OSError(errno.EOPNOTSUPP, "SEEK_DATA is not available on this platform")
    out: list[tuple[int, int]] = []
    pos = start
    while pos < end:
        try:
            s = os.lseek(fd, pos, seek_data)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after pos
                break
            raise
        if s >= end:
            break
        h = min(os.lseek(fd, s, seek_hole), end)
        out.append((s, h))
        pos = h
    return out


def only_data(fd: int, ranges: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """The parts of copy ranges (file offset, destination offset, length) of
    ``fd`` that hold data: the rest reads zeros, so a copy into a new sparse file
    can leave it out. Unchanged where holes cannot be told (not a regular file,
    no SEEK_DATA): a device node reports itself as one hole."""
    if not ranges or not stat.S_ISREG(os.fstat(fd).st_mode):
        return ranges
    rs = sorted(ranges)
    try:
        data = data_extents(fd, rs[0][0], max(so + n for so, _, n in rs))
    except OSError:
        return ranges
    out: list[tuple[int, int, int]] = []
    j = 0
    for so, do, n in rs:
        end = so + n
        while j < len(data) and data[j][1] <= so:
            j += 1
        k = j
        while k < len(data) and data[k][0] < end:
            lo, hi = max(so, data[k][0]), min(end, data[k][1])
            out.append((lo, do + lo - so, hi - lo))
            k += 1
    return out


def fsync(fd: int) -> None:
    """Full durability barrier for ``fd`` (FORMAT.md §7 rule 10): ``F_FULLFSYNC``
    on macOS, where plain fsync does not flush the drive cache."""
    if sys.platform == "darwin":
        import fcntl

        full = getattr(fcntl, "F_FULLFSYNC", None)
        if full is not None:
            try:
                fcntl.fcntl(fd, full)
                return
            except OSError:  # not supported by this file system: fall back
                pass
    os.fsync(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a create, rename or unlink of ``path`` durable (fsync of its directory).

    Best effort: some file systems and platforms refuse to fsync a directory.
    """
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def device_size(fd: int) -> int:
    """Size in bytes of what ``fd`` opens: st_size for files, the device's size
    (BLKGETSIZE64, else seek to the end) for block devices, whose st_size is 0."""
    st = os.fstat(fd)
    if not stat.S_ISBLK(st.st_mode):
        return st.st_size
    try:
        import fcntl
        import struct

        size: int = struct.unpack("Q", fcntl.ioctl(fd, _BLKGETSIZE64, b"\0" * 8))[0]
        return size
    except (ImportError, OSError):
        return os.lseek(fd, 0, os.SEEK_END)


def zero_range(fd: int, offset: int, length: int, zeros: bytes) -> None:
    """Make [offset, offset+length) of block device ``fd`` read zeros.

    BLKZEROOUT first: the kernel guarantees zeros afterwards (by WRITE ZEROES,
    or by writing them), unlike a discard, which may leave old data readable.
    Where it is refused, ``zeros`` (a buffer of zero bytes) is written over it.
    """
    if length <= 0:
        return
    try:
        import fcntl
        import struct

        fcntl.ioctl(fd, _BLKZEROOUT, struct.pack("QQ", offset, length))
        return
    except (ImportError, OSError):
        pass
    mv = memoryview(zeros)
    end = offset + length
    while offset < end:
        n = min(len(mv), end - offset)
        pwrite_all(fd, mv[:n], offset)
        offset += n
