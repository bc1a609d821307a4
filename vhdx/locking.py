"""Image locks that other tools see: QEMU's byte-range locks beside ``flock``.

QEMU's file-posix driver announces what it does with an image through open file
description (OFD) byte-range locks, always shared (F_RDLCK), one byte per
permission bit: byte ``100 + i`` locked means "I hold permission i", byte
``200 + i`` locked means "I do not let others hold permission i". Before taking
a permission it tests (F_OFD_GETLK with F_WRLCK) that nobody locks ``200 + i``,
and before refusing one to others that nobody locks ``100 + i``. Bits (QEMU's
BLK_PERM_*): 0 consistent read, 1 write, 2 write-unchanged, 3 resize.

This module takes the same locks, so QEMU (qemu-img, qemu-io, qemu-nbd, a
running VM) and vhdx keep off each other's images:

* readers hold consistent-read and refuse write and resize to others (what
  ``qemu-img info`` does): a VM writing the image makes the reader fail, as
  qemu-img does without ``-U``;
* writers and merges hold consistent-read, write and resize and refuse write,
  write-unchanged and resize to others; consistent read stays shared so that
  ``qemu-img info -U`` can still inspect the file;
* ``force_share`` (``--force-share``, qemu-img's ``-U``) takes no lock at all:
  read-only inspection of a running VM's disks, at the reader's own risk.

OFD locks belong to one open file description: two opens of one file conflict
even inside one process, which is what keeps a merge off a disk this same
process has open for writing. Writers also keep their ``flock`` (older vhdx
versions honour only that). Where OFD locks do not exist (not Linux), only
``flock`` is taken.

Windows (design; no runner here): the same intent maps onto share modes given
to ``CreateFileW``: readers open with ``FILE_SHARE_READ`` only (a writer's open
then fails with ERROR_SHARING_VIOLATION, and the reader's fails while a writer
holds the file), writers and merges with ``FILE_SHARE_READ`` (inspection stays
possible, a second writer is refused), and ``force_share`` with
``FILE_SHARE_READ | FILE_SHARE_WRITE | FILE_SHARE_DELETE``. Hyper-V opens the
disks of a running VM without FILE_SHARE_WRITE, so the same refusal follows.
A sharing violation is reported as :class:`LockedError` naming the file.
"""

from __future__ import annotations

import errno
import os
import struct

from .errors import InvalidArgumentError, LockedError

PERM_BASE = 100
SHARED_BASE = 200
CONSISTENT_READ, WRITE, WRITE_UNCHANGED, RESIZE = 0x1, 0x2, 0x4, 0x8
_BITS = {CONSISTENT_READ: "consistent read", WRITE: "write", WRITE_UNCHANGED: "write unchanged",
         RESIZE: "resize"}
PERM_ALL = CONSISTENT_READ | WRITE | WRITE_UNCHANGED | RESIZE

READ_PERM, READ_UNSHARED = CONSISTENT_READ, WRITE | RESIZE
WRITE_PERM, WRITE_UNSHARED = CONSISTENT_READ | WRITE | RESIZE, WRITE | WRITE_UNCHANGED | RESIZE

# struct flock: short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid
_FLOCK = "@hhqqi4x"


def _ofd_cmds() -> tuple[int, int] | None:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return None
    setlk, getlk = getattr(fcntl, "F_OFD_SETLK", None), getattr(fcntl, "F_OFD_GETLK", None)
    return (setlk, getlk) if setlk is not None and getlk is not None else None


def _byte_lock(fd: int, cmd: int, kind: int, offset: int) -> bytes:
    import fcntl

    return fcntl.fcntl(fd, cmd, struct.pack(_FLOCK, kind, os.SEEK_SET, offset, 1, 0))


def _held_by_other(fd: int, getlk: int, offset: int) -> bool:
    """Does another open file description lock byte ``offset``? (QEMU's lock test.)"""
    import fcntl

    out = _byte_lock(fd, getlk, fcntl.F_WRLCK, offset)
    kind: int = struct.unpack(_FLOCK, out)[0]
    return kind != fcntl.F_UNLCK


def _busy(path: str, what: str) -> LockedError:
    return LockedError(f"{path}: in use by another process ({what}); stop it first, "
                       "or inspect read-only with --force-share")


def lock_image(fd: int, path: str, *, write: bool, force_share: bool = False) -> None:
    """Take the locks of a reader (``write`` False) or of a writer/merge on ``fd``.

    Raises :class:`LockedError` naming ``path`` when another process (QEMU or
    vhdx) holds a conflicting lock. Locks go away when the descriptor is closed.
    """
    if force_share:
        if write:
            raise InvalidArgumentError("force_share is for read-only opens")
        return
    if write:
        _flock(fd, path)
    cmds = _ofd_cmds()
    if cmds is None:
        return
    setlk, getlk = cmds
    perm, unshared = (WRITE_PERM, WRITE_UNSHARED) if write else (READ_PERM, READ_UNSHARED)
    import fcntl

    try:
        # Lock first, then test: a competitor doing the same in between then sees ours.
        for bit in _BITS:
            if perm & bit:
                _byte_lock(fd, setlk, fcntl.F_RDLCK, PERM_BASE + bit.bit_length() - 1)
            if unshared & bit:
                _byte_lock(fd, setlk, fcntl.F_RDLCK, SHARED_BASE + bit.bit_length() - 1)
        for bit, name in _BITS.items():
            i = bit.bit_length() - 1
            if perm & bit and _held_by_other(fd, getlk, SHARED_BASE + i):
                raise _busy(path, f"it does not share {name} permission")
            if unshared & bit and _held_by_other(fd, getlk, PERM_BASE + i):
                raise _busy(path, f"it holds {name} permission")
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            raise _busy(path, "a lock is held") from None
        if e.errno in (errno.EINVAL, errno.ENOLCK, errno.EOPNOTSUPP):
            return  # file system without byte-range locks: flock (writers) is all there is
        raise LockedError(f"{path}: cannot lock: {e.strerror}") from None
    except LockedError:
        unlock_image(fd)
        raise


def unlock_image(fd: int) -> None:
    """Drop this descriptor's byte-range locks (closing it does so too)."""
    cmds = _ofd_cmds()
    if cmds is None:
        return
    import fcntl

    for base in (PERM_BASE, SHARED_BASE):
        try:
            fcntl.fcntl(fd, cmds[0], struct.pack(_FLOCK, fcntl.F_UNLCK, os.SEEK_SET, base, 8, 0))
        except OSError:
            pass


def _flock(fd: int, path: str) -> None:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise LockedError(f"{path}: in use by another writer or merge") from None
