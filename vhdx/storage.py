"""The I/O seam every writer goes through.

A :class:`Storage` is a byte-addressed file with explicit durability barriers.
:class:`FileStorage` maps it onto an OS file descriptor; :class:`RecordingStorage`
forwards to another storage and keeps an ordered journal of every mutating call,
which the power-loss simulator (tests/powerloss.py) replays at arbitrary cut points.

``flush()`` is the "flush" of FORMAT.md §7 rule 10: ``os.fsync`` (``F_FULLFSYNC`` on
macOS, where plain fsync does not flush the drive cache). Writers must issue one at
every flush point of §6.5 / §7 and rely on nothing else for ordering.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from .errors import ImageNotFoundError, InvalidArgumentError, VhdxIOError

__all__ = [
    "Storage",
    "FileStorage",
    "DeferredSyncStorage",
    "fsync_dir",
    "RecordingStorage",
    "JournalOp",
    "MemoryStorage",
    "open_storage",
]


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


def _fsync(fd: int) -> None:
    """Full durability barrier for ``fd`` (FORMAT.md §7 rule 10)."""
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
        if offset < 0 or size < 0:
            raise InvalidArgumentError(f"bad read range {offset}+{size}")
        parts = []
        while size > 0:
            try:
                chunk = os.pread(self.fd, size, offset)
            except OSError as e:
                raise VhdxIOError.from_os(e, self.path, f"read failed at {offset:#x}") from None
            if not chunk:
                break
            parts.append(chunk)
            offset += len(chunk)
            size -= len(chunk)
        return b"".join(parts)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if offset < 0:
            raise InvalidArgumentError(f"bad write offset {offset}")
        self._check_writable()
        mv = memoryview(data).cast("B")
        self._dirty = True
        try:
            while len(mv):
                n = os.pwrite(self.fd, mv, offset)
                mv = mv[n:]
                offset += n
        except OSError as e:  # ENOSPC, EIO, ...: still an OSError, errno kept
            raise VhdxIOError.from_os(e, self.path, f"write failed at {offset:#x}") from None

    def note_external_write(self) -> None:
        """Something wrote through :attr:`fd` directly (the C copy engine): the
        next barrier must not be skipped as clean."""
        self._dirty = True

    def flush(self) -> None:
        try:
            _fsync(self.fd)
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
            _fsync(self.fd)
        except OSError as e:
            raise VhdxIOError.from_os(e, self.path, "flush (fsync) failed") from None


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


def open_storage(path: str | os.PathLike[str], writable: bool = True) -> FileStorage:
    """Shorthand for :meth:`FileStorage.open`."""
    return FileStorage.open(path, writable)


class MemoryStorage:
    """:class:`Storage` over a ``bytearray`` (tests, in-memory recovery checks).

    ``flush()`` only counts calls; the buffer is shared, not copied.
    """

    def __init__(self, buf: bytearray | bytes | None = None, *, writable: bool = True) -> None:
        self.buf = buf if isinstance(buf, bytearray) else bytearray(buf or b"")
        self.writable = writable
        self.flushes = 0
        self._dirty = False

    @property
    def dirty(self) -> bool:
        return self._dirty

    def pread(self, offset: int, size: int) -> bytes:
        if offset < 0 or size < 0:
            raise InvalidArgumentError(f"bad read range {offset}+{size}")
        return bytes(self.buf[offset:offset + size])

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if offset < 0:
            raise InvalidArgumentError(f"bad write offset {offset}")
        self._check_writable()
        mv = memoryview(data).cast("B")
        if offset > len(self.buf):
            self.buf.extend(bytes(offset - len(self.buf)))
        self.buf[offset:offset + len(mv)] = mv
        self._dirty = True

    def flush(self) -> None:
        self.flushes += 1
        self._dirty = False

    def size(self) -> int:
        return len(self.buf)

    def truncate(self, size: int) -> None:
        if size < 0:
            raise InvalidArgumentError(f"bad size {size}")
        self._check_writable()
        if size < len(self.buf):
            del self.buf[size:]
        else:
            self.buf.extend(bytes(size - len(self.buf)))
        self._dirty = True

    def close(self) -> None:
        pass

    def _check_writable(self) -> None:
        if not self.writable:
            from .errors import ReadOnlyError

            raise ReadOnlyError("storage is opened read-only")


@dataclass(frozen=True)
class JournalOp:
    """One mutating call seen by :class:`RecordingStorage`.

    ``kind`` is ``"write"`` (``offset``, ``data``), ``"truncate"`` (``offset`` = new
    size) or ``"flush"``; ``"mark"`` entries carry a test label in ``label`` and never
    touch the file.
    """

    kind: Literal["write", "truncate", "flush", "mark"]
    offset: int = 0
    data: bytes = b""
    label: object = None


class RecordingStorage:
    """Forwards to ``inner`` and journals every pwrite/truncate/flush in order.

    ``mark(label)`` appends a label without I/O, so a test can find the journal
    positions where its high-level steps begin and end.
    """

    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self.journal: list[JournalOp] = []

    @property
    def dirty(self) -> bool:
        return self.inner.dirty

    def pread(self, offset: int, size: int) -> bytes:
        return self.inner.pread(offset, size)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        payload = bytes(data)
        self.inner.pwrite(offset, payload)
        self.journal.append(JournalOp("write", offset, payload))

    def flush(self) -> None:
        self.inner.flush()
        self.journal.append(JournalOp("flush"))

    def size(self) -> int:
        return self.inner.size()

    def truncate(self, size: int) -> None:
        self.inner.truncate(size)
        self.journal.append(JournalOp("truncate", size))

    def close(self) -> None:
        self.inner.close()

    def mark(self, label: object) -> None:
        self.journal.append(JournalOp("mark", label=label))
