"""Pieces of a merge that do not depend on the image format (VHDX and VHD).

:class:`RangeMover` queues the data a merge moves into its target (copies from
the files above it, zero fills), coalesces adjacent ranges, and moves them in
chunks through the C engine (:func:`vhdx.native.copy_ranges`: FICLONERANGE,
copy_file_range, read/write) when the target is a plain file, or through the
target's storage otherwise (the tests' recording storages see every byte).
After each chunk the copied ranges' writeback is started, so the final fsync
finds little left. Byte and method counts go into a merge summary.

The format engines keep what differs (which blocks, which metadata, in which
order); this module sits in the merge layer below both (docs/DESIGN.md).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Protocol

from . import native
from .storage import DeferredSyncStorage, FileStorage

METHOD_NAMES = {native.CLONE: "clone", native.COPY_FILE_RANGE: "copy_file_range",
                native.READ_WRITE: "read_write", native.FALLOCATE: "fallocate",
                native.WRITE_ZEROS: "write_zeros", native.NONE: "none"}
CHUNK_BYTES = 64 << 20  # moved per round of C calls, then progress and a chance to cancel


class _Source(Protocol):
    @property
    def fd(self) -> int: ...


class _Storage(Protocol):
    def pwrite(self, offset: int, data: bytes) -> object: ...


class _Summary(Protocol):
    bytes_cloned: int
    bytes_copied: int
    bytes_zeroed: int
    ranges_by_method: dict[str, int]


def is_plain_file(storage: object) -> bool:
    """True for exactly a file storage (subclasses, such as recorders, must see
    every write, so the C engine may not bypass them)."""
    return type(storage) in (FileStorage, DeferredSyncStorage)


def start_writeback(fd: int, ranges: Sequence[tuple[int, int, int]], methods: Sequence[int]) -> None:
    """Start writing back the destination side of copied (not cloned) ranges.
    POSIX_FADV_DONTNEED starts writeback on Linux and drops only pages that are
    already clean, which a merge does not reread; it is advice, so errors pass."""
    fadvise = getattr(os, "posix_fadvise", None)
    if fadvise is None:
        return
    spans: list[list[int]] = []
    for (_, dst, n), m in zip(ranges, methods):
        if m == native.CLONE or n <= 0:
            continue
        if spans and spans[-1][1] == dst:
            spans[-1][1] += n
        else:
            spans.append([dst, dst + n])
    try:
        for lo, hi in spans:
            fadvise(fd, lo, hi - lo, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass  # the caller's fsync writes everything anyway


class RangeMover:
    """Queue copies and zero fills into ``storage``; :meth:`run` moves them.

    ``sources`` are the files copied from (anything with an ``fd``), indexed as
    in :meth:`copy`; ``read(src, offset, length)`` serves the storage path.
    """

    def __init__(self, storage: object, sources: Sequence[_Source], summary: _Summary, *,
                 allow_clone: bool = True, read: Callable[[int, int, int], bytes] | None = None) -> None:
        self.storage = storage
        self.sources = sources
        self.summary = summary
        self.allow_clone = allow_clone
        self.native = is_plain_file(storage)
        self._read = read or (lambda src, off, n: os.pread(self.sources[src].fd, n, off))
        self.copies: dict[int, list[tuple[int, int, int]]] = {}
        self.zeros: list[tuple[int, int]] = []
        self.queued = 0  # bytes waiting in copies + zeros

    def copy(self, src: int, src_off: int, dst_off: int, length: int) -> None:
        self.queued += length
        batch = self.copies.setdefault(src, [])
        if batch and batch[-1][0] + batch[-1][2] == src_off and batch[-1][1] + batch[-1][2] == dst_off:
            s, d, n = batch[-1]
            batch[-1] = (s, d, n + length)
        else:
            batch.append((src_off, dst_off, length))

    def zero(self, dst_off: int, length: int) -> None:
        self.queued += length
        if self.zeros and sum(self.zeros[-1]) == dst_off:
            self.zeros[-1] = (self.zeros[-1][0], self.zeros[-1][1] + length)
        else:
            self.zeros.append((dst_off, length))

    def _count(self, lengths: Sequence[int], methods: Sequence[int]) -> None:
        sm = self.summary
        for n, m in zip(lengths, methods):
            name = METHOD_NAMES.get(m, str(m))
            sm.ranges_by_method[name] = sm.ranges_by_method.get(name, 0) + 1
            if m == native.CLONE:
                sm.bytes_cloned += n
            elif m in (native.FALLOCATE, native.WRITE_ZEROS):
                sm.bytes_zeroed += n
            else:
                sm.bytes_copied += n

    def run(self) -> None:
        """Move everything queued (no barrier: the caller's commit flushes)."""
        st = self.storage
        fd = getattr(st, "fd", -1)
        for src, ranges in self.copies.items():
            if self.native:
                methods = native.copy_ranges(self.sources[src].fd, fd, ranges, allow_clone=self.allow_clone)
                st.note_external_write()  # type: ignore[attr-defined]  # a FileStorage (is_plain_file)
                start_writeback(fd, ranges, methods)
            else:
                methods = []
                for s, d, n in ranges:
                    st.pwrite(d, self._read(src, s, n))  # type: ignore[attr-defined]
                    methods.append(native.READ_WRITE)
            self._count([n for _, _, n in ranges], methods)
        if self.zeros:
            if self.native:
                zm = native.zero_ranges(fd, self.zeros)
                st.note_external_write()  # type: ignore[attr-defined]
            else:
                zm = []
                for d, n in self.zeros:
                    st.pwrite(d, bytes(n))  # type: ignore[attr-defined]
                    zm.append(native.WRITE_ZEROS)
            self._count([n for _, n in self.zeros], zm)
        self.copies.clear()
        self.zeros.clear()
        self.queued = 0
