"""Test doubles of :class:`vhdx.storage.Storage` (they were in vhdx/storage.py).

:class:`MemoryStorage` keeps the file in a ``bytearray``; :class:`RecordingStorage`
forwards to another storage and keeps an ordered journal of every mutating call,
which the power-loss simulator (tests/powerloss.py) replays at arbitrary cut
points. Production code knows neither: a writer that needs a descriptor reads
``.fd``, which :class:`RecordingStorage` forwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from vhdx.errors import InvalidArgumentError, ReadOnlyError
from vhdx.storage import Storage, check_range

__all__ = ["MemoryStorage", "RecordingStorage", "JournalOp"]


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
        check_range(offset, size)
        return bytes(self.buf[offset:offset + size])

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        check_range(offset)
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

    def __init__(self, inner: Storage, *, forward_fd: bool = True) -> None:
        self.inner = inner
        self.journal: list[JournalOp] = []
        self._forward_fd = forward_fd

    @property
    def fd(self) -> int:
        """The inner storage's descriptor, for writers that need one (locks, the C
        copy engine; such copies are not journaled). ``forward_fd=False`` hides it,
        so a writer that can do without (the VHD writer and merge) sends every
        write through :meth:`pwrite`, where the journal sees it."""
        fd = getattr(self.inner, "fd", None) if self._forward_fd else None
        if not isinstance(fd, int):
            raise AttributeError("fd")  # hidden, or a MemoryStorage inside: no descriptor
        return fd

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
