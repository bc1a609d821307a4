"""The VHDX log: entry validation, the active sequence, and its replay plan.

Followed: MS-VHDX 2.3 (log entry structures, 2.3.3 log replay) as restated in
FORMAT.md §6.2-§6.4, including the reference's resolutions of the spec's ambiguities:
- the scan stops on ``tail <= old_tail`` (FORMAT.md §6.3 step 5, §11.18);
- replay starts at the head entry's Tail, not at the start of the scanned chain
  (FORMAT.md §6.4 step 7, §11.19);
- LogGuid set but no CRC-valid entry carrying it means a writer crashed between
  its header update and its first entry: the log is treated as empty with a
  warning (FORMAT.md §6.4 step 4 caveat); valid entries without a complete sequence
  are corruption.

This module never writes: the reader applies the plan as an in-memory
:class:`Overlay`; the writer applies the same plan to the file.
"""

from __future__ import annotations

import bisect
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

from . import structures as S
from .crc import checksum_of
from .errors import CorruptImageError

SECTOR = S.LOG_SECTOR_SIZE
# Beyond this a file offset named by the log cannot belong to a real image
# (64 TiB of payload plus metadata fits far below it); refuse hostile values.
MAX_FILE_OFFSET = 1 << 48
_ZERO_SECTOR = bytes(SECTOR)


@dataclass(frozen=True)
class Update:
    """One descriptor: ``data`` (4 KiB) at ``file_offset``, or zeros when ``data`` is None."""

    file_offset: int
    length: int
    data: bytes | None

    @property
    def end(self) -> int:
        return self.file_offset + self.length


@dataclass
class LogEntry:
    offset: int  # log-relative position of the entry
    sequence_number: int
    tail: int
    entry_length: int
    log_guid: uuid.UUID
    flushed_file_offset: int
    last_file_offset: int
    updates: list[Update]


@dataclass
class ReplayPlan:
    """What the active log sequence does to the file when replayed."""

    entries: list[LogEntry]  # tail entry .. head entry, in replay order
    updates: list[Update]
    last_file_offset: int  # the file must be at least this long afterwards
    flushed_file_offset: int  # the head entry's; a shorter file was truncated
    warnings: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.entries


ReadFn = Callable[[int, int], bytes]
"""``read(log_offset, size)``: bytes of the log region (zeros past the file's end)."""

_CHUNK = 1 << 20  # the ring is read in chunks of this size, a few kept at a time
_CHUNKS_KEPT = 4


class _Ring:
    """The log region, addressed modulo its length (entries may wrap), read on
    demand: a few 1 MiB chunks are kept, never the whole region (which may be
    4 GiB, most of it a hole). ``extents`` are the (start, end) log offsets that
    hold data (SEEK_DATA); elsewhere the log reads zeros and no entry can start."""

    def __init__(self, read: ReadFn, length: int,
                 extents: list[tuple[int, int]] | None = None) -> None:
        self._read = read
        self.length = length
        self.extents = [(0, length)] if extents is None else [
            (max(0, a), min(length, b)) for a, b in extents if a < min(length, b)]
        self._chunks: dict[int, bytes] = {}

    def _chunk(self, k: int) -> bytes:
        c = self._chunks.get(k)
        if c is None:
            lo = k * _CHUNK
            n = min(_CHUNK, self.length - lo)
            # Past EOF the log reads as zeros: such sectors simply never validate.
            c = self._read(lo, n).ljust(n, b"\0")
            if len(self._chunks) >= _CHUNKS_KEPT:
                self._chunks.pop(next(iter(self._chunks)))
            self._chunks[k] = c
        return c

    def read(self, offset: int, size: int) -> bytes:
        offset %= self.length
        out = []
        while size > 0:
            k, rel = divmod(offset, _CHUNK)
            c = self._chunk(k)
            piece = c[rel:rel + size]
            out.append(piece)
            size -= len(piece)
            offset = (offset + len(piece)) % self.length
        return out[0] if len(out) == 1 else b"".join(out)

    def next_signature(self, pos: int) -> int:
        """The first sector at or after ``pos`` (no wrap) that starts with an entry
        signature, or ``length``: holes are skipped whole, data chunk by chunk."""
        pos = -(-pos // SECTOR) * SECTOR
        for a, b in self.extents:
            if b <= pos:
                continue
            p = max(pos, -(-a // SECTOR) * SECTOR)
            while p < b:
                k, rel = divmod(p, _CHUNK)
                c = self._chunk(k)
                stop = min(len(c), b - k * _CHUNK)
                i = c.find(S.SIG_LOG_ENTRY, rel, stop + 3)
                while i >= 0 and i % SECTOR:  # at most one search per sector
                    i = c.find(S.SIG_LOG_ENTRY, i + SECTOR - i % SECTOR, stop + 3)
                if i >= 0:
                    return k * _CHUNK + i
                p = k * _CHUNK + len(c)
        return self.length


def _parse_entry(ring: _Ring, offset: int, log_guid: uuid.UUID, keep_data: bool = True) -> LogEntry | None:
    """The entry at ``offset`` if it satisfies every rule of FORMAT.md §6.2, else None.

    The cheap rules (header fields, descriptors, data-sector signatures) are
    checked before the checksum, which is the costly one. Without ``keep_data``
    the entry's updates are left out (the scan needs only its header fields).
    """
    head = ring.read(offset, 64)
    if head[:4] != S.SIG_LOG_ENTRY:
        return None
    h = S.LogEntryHeader.parse(head)
    ring_len = ring.length
    if (h.entry_length == 0 or h.entry_length % SECTOR or h.entry_length > ring_len
            or h.tail % SECTOR or h.tail >= ring_len or h.sequence_number == 0
            or h.log_guid != log_guid):
        return None
    count = h.descriptor_count
    desc_sectors = (count + 2 + 127) // 128
    if desc_sectors * SECTOR > h.entry_length:
        return None
    descs = ring.read(offset, desc_sectors * SECTOR)
    parsed: list[tuple[str, Any]] = []  # ("zero" | "data", the parsed descriptor)
    data_index = 0
    for i in range(count):
        d = descs[64 + 32 * i: 96 + 32 * i]
        sig = d[:4]
        if sig == S.SIG_ZERO:
            z = S.ZeroDescriptor.parse(d)
            if (z.sequence_number != h.sequence_number or z.file_offset % SECTOR
                    or z.zero_length % SECTOR):
                return None
            parsed.append(("zero", z))
        elif sig == S.SIG_DESC:
            dd = S.DataDescriptor.parse(d)
            if dd.sequence_number != h.sequence_number or dd.file_offset % SECTOR:
                return None
            if (desc_sectors + data_index + 1) * SECTOR > h.entry_length:
                return None
            parsed.append(("data", dd))
            data_index += 1
        else:
            return None
    for k in range(data_index):  # each data sector's signature and sequence, 8 bytes apiece
        sec = ring.read(offset + (desc_sectors + k) * SECTOR, 8)
        if sec[:4] != S.SIG_DATA or int.from_bytes(sec[4:8], "little") != h.sequence_number >> 32:
            return None
    raw = ring.read(offset, h.entry_length)
    if checksum_of(raw) != h.checksum:
        return None
    updates: list[Update] = []
    data_index = 0
    for kind, d in parsed:
        if kind == "zero":
            updates.append(Update(d.file_offset, d.zero_length, None))
            continue
        pos = (desc_sectors + data_index) * SECTOR
        data_index += 1
        ds = S.DataSector.parse(raw[pos:pos + SECTOR])
        if (ds.sequence_high << 32 | ds.sequence_low) != h.sequence_number:
            return None
        updates.append(Update(d.file_offset, SECTOR,
                              (d.leading_bytes + ds.data + d.trailing_bytes) if keep_data else None))
    return LogEntry(offset, h.sequence_number, h.tail, h.entry_length, h.log_guid,
                    h.flushed_file_offset, h.last_file_offset, updates if keep_data else [])


def _sequence_from(ring: _Ring, start: int, log_guid: uuid.UUID,
                   cache: dict[int, LogEntry | None]) -> list[LogEntry]:
    """The maximal run of valid, consecutive entries beginning at ``start``."""
    seq: list[LogEntry] = []
    pos = start
    used = 0
    while used < ring.length:
        if pos not in cache:
            cache[pos] = _parse_entry(ring, pos, log_guid, keep_data=False)
        e = cache[pos]
        if e is None or (seq and e.sequence_number != seq[-1].sequence_number + 1):
            break
        seq.append(e)
        used += e.entry_length
        pos = (pos + e.entry_length) % ring.length
        if pos == start:
            break
    return seq


def find_active_sequence(log_data: bytes | ReadFn, log_length: int, log_guid: uuid.UUID,
                         extents: list[tuple[int, int]] | None = None) -> tuple[list[LogEntry], bool]:
    """Active sequence per MS-VHDX 2.3.3 (FORMAT.md §6.3).

    ``log_data`` is the log region's bytes, or a ``read(log_offset, size)``
    function (then ``extents`` may name the log offsets holding data; holes are
    skipped). Returns ``(entries, any_valid)``: ``entries`` are those to replay
    (from the head's Tail entry to the head, with their updates), empty when no
    complete sequence exists; ``any_valid`` tells whether any CRC-valid entry
    carrying ``log_guid`` was seen at all.
    """
    ring = _Ring(_reader(log_data), log_length, extents)
    cache: dict[int, LogEntry | None] = {}  # header fields only: memory stays small
    candidate: list[LogEntry] = []
    tail = old_tail = ring.next_signature(0)
    while tail < log_length:
        seq = _sequence_from(ring, tail, log_guid, cache)
        complete = bool(seq) and any(e.offset == seq[-1].tail for e in seq)
        if complete and (not candidate or seq[-1].sequence_number > candidate[-1].sequence_number):
            candidate = seq
        if complete:
            tail = (seq[-1].offset + seq[-1].entry_length) % log_length
        else:
            # No entry can start where the signature is missing: skip to the next one.
            tail = ring.next_signature(tail + SECTOR) % log_length
        if tail <= old_tail:
            break
        old_tail = tail
    any_valid = any(e is not None for e in cache.values())
    if not candidate:
        return [], any_valid
    head_tail = candidate[-1].tail
    first = next(i for i, e in enumerate(candidate) if e.offset == head_tail)
    # Only the entries to replay are parsed again with their data.
    entries = []
    for e in candidate[first:]:
        full = _parse_entry(ring, e.offset, log_guid)
        if full is None:  # the file changed under us
            raise CorruptImageError("log entry changed while being read")
        entries.append(full)
    return entries, any_valid


# Below this the file identifier and both headers live: never a log target (FORMAT.md §2.2).
_FIRST_LOGGABLE = 192 * 1024


def entry_bounds_problem(e: LogEntry, log_offset: int | None = None,
                         log_length: int = 0) -> str | None:
    """Why an entry's descriptors reach where no valid entry may write, or None.

    Bounds come from the entry's own fields and the file layout (FORMAT.md §6.1): every
    descriptor lies inside LastFileOffset ("a size that contains every allocated
    structure"; QEMU writes the raw file length, hence the 1 MiB round-up), past
    the file identifier and headers, outside the log itself, and LastFileOffset
    below the absurd. Checked before anything is applied: a CRC-valid entry with
    a 2^48-byte zero descriptor is corrupt, not 256 TiB of work.
    """
    lfo = e.last_file_offset
    if lfo > MAX_FILE_OFFSET:
        return f"LastFileOffset {lfo:#x} is absurd"
    limit = -(-lfo // S.MiB) * S.MiB
    for u in e.updates:
        kind = "data" if u.data is not None else "zero"
        where = f"{kind} descriptor {u.file_offset:#x}+{u.length:#x}"
        if u.end > limit:
            return f"{where} reaches past the entry's LastFileOffset {lfo:#x}"
        if u.file_offset < _FIRST_LOGGABLE:
            return f"{where} targets the file identifier or a header"
        if log_offset is not None and u.file_offset < log_offset + log_length and u.end > log_offset:
            return f"{where} overlaps the log itself"
    return None


def _reader(log_data: bytes | ReadFn) -> ReadFn:
    if callable(log_data):
        return log_data
    data = log_data
    return lambda off, n: data[off:off + n]


def plan_replay(log_data: bytes | ReadFn, log_length: int, log_guid: uuid.UUID, file_size: int,
                log_offset: int | None = None, extents: list[tuple[int, int]] | None = None) -> ReplayPlan:
    """The replay plan of a dirty log (header LogGuid != 0), validated (FORMAT.md §6.4 steps 4-5).

    ``log_data``/``extents`` as for :func:`find_active_sequence`. Every entry of
    the active sequence is bounds-checked before anything is planned
    (:func:`entry_bounds_problem`); one out of bounds makes the log corrupt.
    """
    entries, any_valid = find_active_sequence(log_data, log_length, log_guid, extents)
    if not entries:
        if any_valid:
            raise CorruptImageError("log has entries for the current LogGuid but no complete sequence")
        return ReplayPlan([], [], 0, 0, [
            "header LogGuid is set but the log holds no entry for it; treating the log as empty"])
    for e in entries:
        problem = entry_bounds_problem(e, log_offset, log_length)
        if problem:
            raise CorruptImageError(f"log entry {e.sequence_number} (at log offset {e.offset:#x}) "
                                    f"is corrupt: {problem}; nothing was replayed")
    head = entries[-1]
    if file_size < head.flushed_file_offset:
        raise CorruptImageError(
            f"file is {file_size:#x} bytes but the log says at least {head.flushed_file_offset:#x} "
            "were flushed (truncated)")
    if head.last_file_offset > MAX_FILE_OFFSET:
        raise CorruptImageError(f"log LastFileOffset {head.last_file_offset:#x} is absurd")
    updates = [u for e in entries for u in e.updates]
    return ReplayPlan(entries, updates, head.last_file_offset, head.flushed_file_offset)


class Overlay:
    """The result of replaying a plan, kept in memory (MS-VHDX 2.3.3 footnote:
    a read-only open replays into memory). Later updates win over earlier ones.

    Built from the last update backwards, keeping only what no later update
    covers: the cost is O(n log n) in the updates, however a hostile entry
    interleaves zero and data descriptors.
    """

    def __init__(self, updates: Sequence[Update] = ()) -> None:
        self._sectors: dict[int, bytes] = {}
        covered = _Intervals()
        zeros = _Intervals()
        self.end = max((u.end for u in updates), default=0)  # highest byte touched
        for u in reversed(updates):
            start, end = u.file_offset, u.end
            if start == end:
                continue
            if u.data is not None:
                # Data and zero ranges are whole sectors: one is covered entirely or not at all.
                if not covered.covers(start):
                    self._sectors[start] = u.data
                    covered.add(start, end)
                continue
            for a, b in covered.gaps(start, end):
                zeros.add(a, b)
            covered.add(start, end)
        self._zeros = zeros.spans  # sorted, disjoint [start, end)
        self._zero_starts = [a for a, _ in self._zeros]
        self._sorted = sorted(self._sectors)
        self.lo = min([*self._sorted[:1], *self._zero_starts[:1]], default=0)

    def __bool__(self) -> bool:
        return bool(self._sectors or self._zeros)

    def touches(self, offset: int, size: int) -> bool:
        return bool(self) and offset < self.end and offset + size > self.lo

    def patch(self, offset: int, buf: memoryview) -> None:
        """Apply the overlay to ``buf``, which holds file bytes from ``offset``."""
        end = offset + len(buf)
        i = max(0, bisect.bisect_right(self._zero_starts, offset) - 1)
        while i < len(self._zeros) and self._zeros[i][0] < end:
            s, e = self._zeros[i]
            a, b = max(s, offset), min(e, end)
            if a < b:
                buf[a - offset:b - offset] = bytes(b - a)
            i += 1
        i = bisect.bisect_left(self._sorted, offset - SECTOR + 1)
        while i < len(self._sorted) and self._sorted[i] < end:
            k = self._sorted[i]
            data = self._sectors[k]
            a, b = max(k, offset), min(k + SECTOR, end)
            buf[a - offset:b - offset] = data[a - k:b - k]
            i += 1

    def data_sectors_in(self, offset: int, size: int) -> list[int]:
        """File offsets of the overlay's data sectors that overlap [offset, offset + size)."""
        i = bisect.bisect_left(self._sorted, offset - SECTOR + 1)
        j = bisect.bisect_left(self._sorted, offset + size)
        return self._sorted[i:j]

    def sectors(self) -> Iterator[tuple[int, bytes]]:
        for k in self._sorted:
            yield k, self._sectors[k]


class _Intervals:
    """Sorted, disjoint, non-touching [start, end) ranges."""

    def __init__(self) -> None:
        self.spans: list[tuple[int, int]] = []
        self._starts: list[int] = []

    def covers(self, pos: int) -> bool:
        i = bisect.bisect_right(self._starts, pos) - 1
        return i >= 0 and self.spans[i][1] > pos

    def gaps(self, start: int, end: int) -> list[tuple[int, int]]:
        """The parts of [start, end) not covered."""
        out = []
        i = max(0, bisect.bisect_right(self._starts, start) - 1)
        pos = start
        while i < len(self.spans) and self.spans[i][0] < end:
            s, e = self.spans[i]
            if s > pos:
                out.append((pos, s))
            pos = max(pos, e)
            i += 1
        if pos < end:
            out.append((pos, end))
        return out

    def add(self, start: int, end: int) -> None:
        i = bisect.bisect_left(self._starts, start)
        if i > 0 and self.spans[i - 1][1] >= start:  # joins the one before
            i -= 1
            start = self.spans[i][0]
        j = i
        while j < len(self.spans) and self.spans[j][0] <= end:  # swallows those it reaches
            end = max(end, self.spans[j][1])
            j += 1
        self.spans[i:j] = [(start, end)]
        self._starts[i:j] = [start]
