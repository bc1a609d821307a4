"""Where outputs go: targets by kind, temporary files nobody can plant, block devices.

Every command that writes a new file (convert, flatten, create) goes through
here, so that three rules hold everywhere:

- A regular output is written to a temporary file created exclusively in the
  output's own folder (``O_CREAT | O_EXCL | O_NOFOLLOW`` under an unpredictable
  name), made durable, then renamed over the output. A name like ``OUT.part``
  is never opened: in a shared or group-writable folder someone could have
  planted it as a symlink to a file of theirs or to the chain's own parent
  (CWE-59), and the write would go through the link.
- A block device is written in place: opened without truncation (and with
  ``O_EXCL``, which Linux refuses while the device is mounted or otherwise held),
  its size checked first, never replaced by a regular file.
- A character device, FIFO, directory or socket is refused with one line.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from dataclasses import dataclass

from .errors import (
    InvalidArgumentError,
    OutputDirectoryError,
    OutputExistsError,
    TargetKindError,
    VhdxIOError,
)
from .fdio import device_size, fsync_dir, open_read_only

__all__ = ["Target", "inspect_output", "check_free_space", "allocate", "create_temp", "commit_temp", "discard_temp",
           "open_block_device", "open_source", "kind_name"]


def kind_name(mode: int) -> str:
    """What ``st_mode`` is, in words for a message."""
    for test, name in ((stat.S_ISREG, "a regular file"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISDIR, "a directory"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "a special file"


@dataclass(frozen=True)
class Target:
    """An output path and what it is: ``"new"`` (nothing there yet), ``"regular"``
    (an existing file, to be replaced) or ``"block"`` (a device, written in place)."""

    path: str
    kind: str


def inspect_output(path: str | os.PathLike[str], *, force: bool = False,
                   allow_block: bool = True,
                   exists_hint: str = "use --force to overwrite") -> Target:
    """Classify ``path`` as an output, refusing what must not be written.

    An existing regular file or block device needs ``force`` (``exists_hint``
    says what to do instead, for commands without that option). A symlink is
    followed to decide the kind (``/dev/vg/lv`` links to ``/dev/dm-N``), but a
    regular file behind a link is replaced by the rename, never written through.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise TargetKindError(f"{path}: is a dangling symbolic link; remove it or choose another name") from None
        if not os.path.isdir(folder):
            raise OutputDirectoryError(path) from None
        return Target(path, "new")
    except OSError as e:
        raise VhdxIOError.from_os(e, path) from None
    if stat.S_ISBLK(st.st_mode):
        if not allow_block:
            raise TargetKindError(f"{path}: is a block device; this output can only be a regular file")
        if not force:
            raise OutputExistsError(path, "is a block device; use --force to overwrite its contents")
        return Target(path, "block")
    if stat.S_ISREG(st.st_mode):
        if not force:
            raise OutputExistsError(path, f"already exists ({exists_hint})")
        return Target(path, "regular")
    raise TargetKindError(f"{path}: is {kind_name(st.st_mode)}; the output must be a regular file"
                          + (" or a block device" if allow_block else ""))


def check_free_space(final: str | os.PathLike[str], needed: int, what: str) -> None:
    """Refuse, with the numbers, when the output's file system cannot hold
    ``needed`` more bytes (statvfs; skipped where it cannot be asked)."""
    from .preflight import check_space

    final = os.fspath(final)
    check_space(os.path.dirname(os.path.abspath(final)), needed, what, final)


def allocate(fd: int, size: int, path: str) -> None:
    """Really allocate [0, size) of a new fixed disk, as Hyper-V does (a sparse
    "fixed" file would fail with ENOSPC inside the guest later). Where the file
    system cannot preallocate, the file stays sparse."""
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is None:
        return
    try:
        fallocate(fd, 0, size)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            return
        raise VhdxIOError.from_os(e, path, f"cannot allocate the fixed disk ({size} bytes)") from None


def create_temp(final: str | os.PathLike[str], mode: int = 0o644) -> tuple[int, str]:
    """Create an empty temporary file beside ``final``; returns (fd, path).

    The name is hidden and unpredictable (``.NAME.<random>.part``) and the open
    is exclusive and refuses symlinks, so nothing planted can be written through.
    """
    final = os.fspath(final)
    folder = os.path.dirname(os.path.abspath(final))
    base = os.path.basename(final)
    flags = (os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
             | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
    for _ in range(100):
        tmp = os.path.join(folder, f".{base}.{secrets.token_hex(6)}.part")
        try:
            return os.open(tmp, flags, mode), tmp
        except FileExistsError:
            continue
        except FileNotFoundError:
            raise OutputDirectoryError(final) from None
        except OSError as e:
            raise VhdxIOError.from_os(e, final, "cannot create a temporary file beside it") from None
    raise VhdxIOError(errno.EEXIST, "cannot create a temporary file beside it", final)


def commit_temp(tmp: str, final: str) -> None:
    """Rename the (already fsynced) ``tmp`` over ``final`` and make that durable."""
    try:
        os.replace(tmp, final)
    except OSError as e:
        discard_temp(tmp)
        raise VhdxIOError.from_os(e, final, "cannot rename the finished output into place") from None
    fsync_dir(final)


def discard_temp(tmp: str | None) -> None:
    """Remove a temporary file after a failure (best effort: the first error matters)."""
    if tmp is None:
        return
    try:
        os.unlink(tmp)
    except OSError:
        pass


def open_block_device(path: str, needed: int) -> int:
    """Open block device ``path`` for writing in place; refuse it if smaller than
    ``needed`` bytes. ``O_EXCL`` makes Linux refuse a device that is mounted or
    held by another exclusive user (EBUSY)."""
    flags = os.O_WRONLY | getattr(os, "O_CLOEXEC", 0) | os.O_EXCL
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise VhdxIOError(e.errno, "device is in use (mounted or held by another program)", path) from None
        raise VhdxIOError.from_os(e, path) from None
    try:
        if not stat.S_ISBLK(os.fstat(fd).st_mode):
            raise TargetKindError(f"{path}: changed while being opened")
        size = device_size(fd)
        if size < needed:
            raise InvalidArgumentError(
                f"{path}: the device holds {size} bytes, the disk needs {needed}; nothing was written")
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_source(path: str | os.PathLike[str]) -> tuple[int, int]:
    """Open a raw source read-only: a regular file or a block device (P2V).

    Returns (fd, size); the size of a device comes from the device, not st_size.
    Anything else (FIFO, character device, directory) is refused before opening,
    since opening a FIFO would block.
    """
    def refuse(name: str, mode: int) -> TargetKindError:
        return TargetKindError(f"{name}: is {kind_name(mode)}; a source must be a file or a block device")

    fd = open_read_only(path, lambda mode: stat.S_ISREG(mode) or stat.S_ISBLK(mode), refuse)
    return fd, device_size(fd)
