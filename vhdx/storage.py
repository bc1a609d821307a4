"""The I/O seam every writer goes through.

A :class:`Storage` is a byte-addressed file with explicit durability barriers.
:class:`FileStorage` maps it onto an OS file descriptor (the loops and barriers
are :mod:`vhdx.fdio`'s). Test doubles (an in-memory storage, a recording one
that the power-loss simulator replays at arbitrary cut points) live in
tests/storages.py; a writer that needs the descriptor asks for ``.fd``, so a
wrapper that forwards ``fd`` serves it too.

``flush()`` is the "flush" of FORMAT.md §7 rule 10: ``os.fsync`` (``F_FULLFSYNC`` on
macOS, where plain fsync does not flush the drive cache). Writers must issue one at
every flush point of §6.5 / §7 and rely on nothing else for ordering.
"""

from __future__ import annotations

import os
from typing import Protocol, runtime_checkable

from .errors import ImageNotFoundError, InvalidArgumentError, VhdxIOError
from .fdio import fsync, pread, pwrite_all

__all__ = ["Storage", "FileStorage", "DeferredSyncStorage", "open_storage"]


@runtime_checkable
class Storage(Protocol):
    """Minimal positional-I/O interface used by every writer."""

    def pread(self, offset: int, size: int) -> bytes:
        """Read up to ``size`` bytes at ``offset``; short only at end of file."""

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write all of ``data`` at ``offset`` (extends the file if needed)."""

    def flush(self) -> None:
        """Durability barrier: every earlier pwrite/truncate is on stable storage."""

    def size(self) -> int:
        """Current file length in bytes."""

    def truncate(self, size: int) -> None:
        """Set the file length; growth reads as zeros (FORMAT.md §7 rule 9)."""

    def close(self) -> None:
        """Release the underlying resource (does not flush)."""

    @property
    def dirty(self) -> bool:
        """True when a pwrite/truncate happened since the last flush()."""


def check_range(offset: int, size: int = 0) -> None:
    """The argument check every :class:`Storage` makes: no negative offset or size."""
    if offset < 0 or size < 0:
        raise InvalidArgumentError(f"bad range {offset}+{size}")


class FileStorage:
    """:class:`Storage` over an OS file descriptor (positional I/O, no shared offset)."""

    def __init__(self, fd: int, *, owns_fd: bool = True, writable: bool = True) -> None:
        self._fd: int | None = fd
        self.path: str | None = None  # for messages: OS errors become VhdxIOError naming it
        self._owns = owns_fd
        self.writable = writable
        self._dirty = False

    @classmethod
    def open(cls, path: str | os.PathLike[str], writable: bool = True) -> "FileStorage":
        """Open ``path`` (must exist) read-write or read-only."""
        flags = (os.O_RDWR if writable else os.O_RDONLY) | getattr(os, "O_BINARY", 0)
        try:
            st = cls(os.open(path, flags), owns_fd=True, writable=writable)
        except FileNotFoundError:
            raise ImageNotFoundError(os.fspath(path)) from None
        except OSError as e:
            raise VhdxIOError.from_os(e, os.fspath(path)) from None
        st.path = os.fspath(path)
        return st

    @property
    def fd(self) -> int:
        if self._fd is None:
            raise InvalidArgumentError("storage is closed")
        return self._fd

    @property
    def dirty(self) -> bool:
        return self._dirty

    def pread(self, offset: int, size: int) -> bytes:
        check_range(offset, size)
        try:
            return pread(self.fd, offset, size)
        except OSError as e:
            raise VhdxIOError.from_os(e, self.path, f"read failed at {offset:#x}") from None

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        check_range(offset)
        self._check_writable()
        self._dirty = True
        try:
            pwrite_all(self.fd, data, offset)
        except OSError as e:  # ENOSPC, EIO, ...: still an OSError, errno kept
            raise VhdxIOError.from_os(e, self.path, f"write failed at {offset:#x}") from None

    def note_external_write(self) -> None:
        """Something wrote through :attr:`fd` directly (the C copy engine): the
        next barrier must not be skipped as clean."""
        self._dirty = True

    def flush(self) -> None:
        try:
            fsync(self.fd)
        except OSError as e:
            raise VhdxIOError.from_os(e, self.path, "flush (fsync) failed") from None
        self._dirty = False

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def truncate(self, size: int) -> None:
        if size < 0:
            raise InvalidArgumentError(f"bad size {size}")
        self._check_writable()
        self._dirty = True
        try:
            os.ftruncate(self.fd, size)
        except OSError as e:
            raise VhdxIOError.from_os(e, self.path, f"cannot set the file size to {size}") from None

    def close(self) -> None:
        if self._fd is not None and self._owns:
            os.close(self._fd)
        self._fd = None

    def _check_writable(self) -> None:
        if not self.writable:
            from .errors import ReadOnlyError

            raise ReadOnlyError(f"{self.path}: opened read-only" if self.path else "storage is opened read-only")

    def __enter__(self) -> "FileStorage":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DeferredSyncStorage(FileStorage):
    """A :class:`FileStorage` whose ``flush()`` defers the fsync to :meth:`sync`.

    For files nobody can see until they are complete (a conversion or flatten
    writing ``OUT.part`` before renaming it): their intermediate durability points
    protect nothing, so one fsync before the rename replaces them all, as
    ``qemu-img convert`` does. Never use it on a file that already exists.
    """

    def flush(self) -> None:
        self._dirty = False

    def sync(self) -> None:
        try:
            fsync(self.fd)
        except OSError as e:
            raise VhdxIOError.from_os(e, self.path, "flush (fsync) failed") from None


def open_storage(path: str | os.PathLike[str], writable: bool = True) -> FileStorage:
    """Shorthand for :meth:`FileStorage.open`."""
    return FileStorage.open(path, writable)
