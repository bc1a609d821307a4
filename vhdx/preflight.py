"""Checks made before an operation writes its first byte.

An operation that cannot finish must find out before it changes anything: a
merge that changed the child's linkage2 and then hit a read-only target left
work behind for nothing. Each check here only opens, stats and asks; none
writes.
"""

from __future__ import annotations

import errno
import os
import struct
from typing import Iterable

from .errors import InsufficientSpaceError, NotWritableError

# linux/fs.h: FS_IOC_GETFLAGS = _IOR('f', 1, long) (the kernel reads an int),
# FS_IMMUTABLE_FL, FS_APPEND_FL. Neither flag can be cleared by an open.
FS_IOC_GETFLAGS = 0x80086601
FS_IMMUTABLE_FL = 0x00000010
FS_APPEND_FL = 0x00000020


def inode_flags(path: str) -> int:
    """The file's inode flags (chattr), 0 where the platform cannot tell."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return 0
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return 0
    try:
        out = fcntl.ioctl(fd, FS_IOC_GETFLAGS, bytes(8))
        flags: int = struct.unpack("i", out[:4])[0]
    except OSError:
        return 0
    finally:
        os.close(fd)
    return flags


def _flag_problem(path: str) -> str | None:
    flags = inode_flags(path)
    if flags & FS_IMMUTABLE_FL:
        return "is immutable (chattr +i)"
    if flags & FS_APPEND_FL:
        return "is append-only (chattr +a)"
    return None


def check_writable(paths: Iterable[str], operation: str) -> None:
    """Refuse unless every file in ``paths`` can be opened for writing."""
    for path in paths:
        problem = _flag_problem(path)
        if problem is None:
            try:
                # An O_RDWR open writes nothing but meets every refusal a write
                # would: read-only mount (EROFS), permissions, ETXTBSY.
                fd = os.open(path, os.O_RDWR | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
                os.close(fd)
            except OSError as e:
                problem = ("is on a read-only file system" if e.errno == errno.EROFS
                           else f"cannot be opened for writing ({e.strerror})")
        if problem is None and not os.access(path, os.W_OK):
            problem = "is not writable (permissions)"
        if problem:
            raise NotWritableError(f"{path}: {problem}; {operation} needs to write it, "
                                   "nothing was changed")


def check_removable(paths: Iterable[str], operation: str) -> None:
    """Refuse unless every file in ``paths`` can be deleted afterwards."""
    for path in paths:
        problem = _flag_problem(path)
        folder = os.path.dirname(os.path.abspath(path))
        if problem is None:
            dflags = _flag_problem(folder)
            if dflags:
                problem = f"lies in a folder that {dflags.removeprefix('is ')}"
        if problem is None and _read_only_fs(folder):
            problem = "is on a read-only file system"
        if problem is None and not os.access(folder, os.W_OK | os.X_OK):
            problem = "lies in a folder that is not writable"
        if problem:
            raise NotWritableError(f"{path}: {problem}; {operation} deletes it at the end "
                                   "(use --keep to keep it), nothing was changed")


def _read_only_fs(path: str) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & getattr(os, "ST_RDONLY", 1))
    except (OSError, AttributeError):
        return False


def free_bytes(path: str) -> int | None:
    """Free bytes for unprivileged writers on the file system holding ``path``."""
    try:
        st = os.statvfs(path)
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize


def check_space(path: str, needed: int, operation: str, name: str | None = None) -> None:
    """Refuse when the file system of ``path`` (a file or folder) has less than
    ``needed`` bytes free; the message names ``name`` (default ``path``)."""
    free = free_bytes(path)
    if free is not None and needed > free:
        raise InsufficientSpaceError(
            f"{name or path}: not enough space for {operation}: it needs up to {needed} bytes, "
            f"{path} has {free} free ({needed / 2**20:.1f} MiB against {free / 2**20:.1f} MiB); "
            "free space first, nothing was changed")
