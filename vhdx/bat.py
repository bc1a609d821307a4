"""Block Allocation Table: geometry (chunk ratio, entry index math) and the table.

Followed: MS-VHDX 2.5 (BAT), 2.5.1 (entry), 2.5.1.1/2.5.1.2 (states) and the
entry-count formulas of 2.5 as checked in FORMAT.md §5.3 (not the bad transcription
of FORMAT.md §11). Validation per FORMAT.md §10 rows 10-12.
"""

from __future__ import annotations

import bisect
import mmap
import sys
from array import array
from dataclasses import dataclass
from collections.abc import Iterator
from typing import Callable, Sequence, TypeAlias

from . import structures as S
from .errors import CorruptImageError

_VALID_PAYLOAD_STATES = frozenset((0, 1, 2, 3, 6, 7))
_ALLOCATED_PAYLOAD_STATES = frozenset((6, 7))


@dataclass(frozen=True)
class Geometry:
    """Where each block's BAT entry and sector bitmap bits live."""

    virtual_size: int
    block_size: int
    logical_sector_size: int
    has_parent: bool

    @property
    def chunk_ratio(self) -> int:
        return (S.SECTORS_PER_CHUNK * self.logical_sector_size) // self.block_size

    @property
    def payload_blocks(self) -> int:
        return -(-self.virtual_size // self.block_size)

    @property
    def sector_bitmap_blocks(self) -> int:
        return -(-self.payload_blocks // self.chunk_ratio)

    @property
    def total_entries(self) -> int:
        pb, cr = self.payload_blocks, self.chunk_ratio
        if self.has_parent:
            return self.sector_bitmap_blocks * (cr + 1)
        return pb + (pb - 1) // cr

    @property
    def sectors_per_block(self) -> int:
        return self.block_size // self.logical_sector_size

    @property
    def bitmap_bytes_per_block(self) -> int:
        return self.sectors_per_block // 8

    @property
    def chunk_size(self) -> int:
        return S.SECTORS_PER_CHUNK * self.logical_sector_size

    def payload_index(self, block: int) -> int:
        return block + block // self.chunk_ratio

    def sb_index(self, chunk: int) -> int:
        return chunk * (self.chunk_ratio + 1) + self.chunk_ratio

    def is_sb_index(self, index: int) -> bool:
        return index % (self.chunk_ratio + 1) == self.chunk_ratio

    def block_of_index(self, index: int) -> int:
        """Payload block number of a payload entry index."""
        return index - index // (self.chunk_ratio + 1)

    def bitmap_slice(self, block: int) -> tuple[int, int]:
        """(byte offset inside the chunk's SB block, byte length) of ``block``'s bits."""
        n = self.bitmap_bytes_per_block
        return (block % self.chunk_ratio) * n, n

    def block_length(self, block: int) -> int:
        """Bytes of virtual disk covered by ``block`` (the last one may be short)."""
        return min(self.block_size, self.virtual_size - block * self.block_size)


Table: TypeAlias = "memoryview | array[int]"  # a string: array is not subscriptable at run time before 3.12
"""The decoded BAT: indexable u64 entries (a ``memoryview`` cast to 'Q' on
little-endian hosts, so the table is held once, in the buffer it was read into)."""


def decode_table(raw: bytearray | mmap.mmap, count: int) -> Table:
    """The first ``count`` u64 LE entries of ``raw``, without copying where possible."""
    if sys.byteorder == "big":
        table = array("Q")
        table.frombytes(bytes(raw[:count * 8]))
        table.byteswap()
        return table
    return memoryview(raw)[:count * 8].cast("Q")


_SCAN_STRIDE = 8192  # entries examined at once (64 KiB)
_ZERO_STRIDE = bytes(_SCAN_STRIDE * 8)
_PLAIN_STATES = bytes((0, 1, 2, 3))  # no data in this file, offset 0: nothing to check


Spans = list[tuple[int, int]]
"""Entry index ranges [start, end) outside which a table is known to be all zero
(the BAT's holes in the file, ``ImageFile.bat_spans``); None means "anywhere"."""


def normalize_spans(spans: Spans, n: int) -> Spans:
    """``spans`` clipped to [0, n), sorted, overlapping or touching ones merged."""
    out: Spans = []
    for s, e in sorted(spans):
        s, e = max(0, s), min(n, e)
        if s >= e:
            continue
        if out and s <= out[-1][1]:
            if e > out[-1][1]:
                out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


def iter_nonzero(table: Table, chunk_ratio: int | None = None,
                 spans: Spans | None = None) -> Iterator[tuple[int, int]]:
    """(index, entry) of every non-zero entry, skipping all-zero stretches fast.

    With ``spans``, only those index ranges are examined (the rest is known to be
    zero): a 64 TiB BAT whose file holds a few pages costs a few pages.

    With ``chunk_ratio``, payload entries holding a bare NOT_PRESENT, UNDEFINED,
    ZERO or UNMAPPED state (no offset, no reserved bits) are skipped as well,
    stretch by stretch; sector-bitmap slots are always yielded when non-zero,
    since states 1-3 are invalid there. The comparisons run in C over strided
    views, so a huge unallocated BAT costs a few memcmp per 64 KiB.
    """
    n = len(table)
    for lo, hi in ([(0, n)] if spans is None else normalize_spans(spans, n)):
        yield from _iter_span(table, chunk_ratio, lo, hi)


def _iter_span(table: Table, chunk_ratio: int | None, lo: int, hi: int) -> Iterator[tuple[int, int]]:
    raw = memoryview(table).cast("B") if isinstance(table, memoryview) else None
    for base in range(lo, hi, _SCAN_STRIDE):
        end = min(base + _SCAN_STRIDE, hi)
        if raw is not None:
            count = end - base
            seg = raw[base * 8:end * 8]
            if seg == _ZERO_STRIDE[:count * 8]:
                continue
            if chunk_ratio and not seg[0::8].tobytes().translate(None, _PLAIN_STATES) and all(
                    seg[k::8] == _ZERO_STRIDE[:count] for k in range(1, 8)):
                cr1 = chunk_ratio + 1
                first_sb = base + (chunk_ratio - base % cr1) % cr1
                yield from ((i, table[i]) for i in range(first_sb, end, cr1) if table[i])
                continue
        for i in range(base, end):
            e = table[i]
            if e:
                yield i, e


def encode_table(table: Table) -> bytes:
    if sys.byteorder == "big":
        table = array("Q", table)
        table.byteswap()
    return bytes(memoryview(table).cast("B"))


@dataclass
class BatProblem:
    """One kind of problem of the table: the first entry that has it, and how many do.

    A hostile table can hold millions of bad entries; they make one finding with
    a count, never one object per entry.
    """

    index: int  # first entry with the problem; -1 for the table as a whole
    message: str
    fatal: bool
    count: int = 1

    def describe(self) -> str:
        where = f"BAT entry {self.index}: " if self.index >= 0 else "BAT: "
        more = ""
        if self.count > 1:
            more = f" (and {self.count - 1} more entr{'y' if self.count == 2 else 'ies'} like it)"
        return where + self.message + more


class _Problems:
    """Problems keyed by kind; the first occurrence keeps its index and message."""

    def __init__(self) -> None:
        self.by_kind: dict[str, BatProblem] = {}

    def add(self, kind: str, index: int, message: str, fatal: bool, count: int = 1) -> None:
        p = self.by_kind.get(kind)
        if p is None:
            self.by_kind[kind] = BatProblem(index, message, fatal, count)
            return
        p.count += count
        if 0 <= index < p.index:  # strides check bitmap slots first: keep the lowest entry
            p.index, p.message = index, message

    @property
    def fatal(self) -> bool:
        return any(p.fatal for p in self.by_kind.values())


# Byte tables for the per-stride scans (bytes.translate runs in C over strided views).
_LOW3 = bytes(b & 7 for b in range(256))  # byte 0 -> state
_HIGH5 = bytes(1 if b >> 3 else 0 for b in range(256))  # byte 0: reserved bits 3..7
_NONZERO = bytes(1 if b else 0 for b in range(256))  # byte 1: reserved bits 8..15
_LOW4 = bytes(1 if b & 15 else 0 for b in range(256))  # byte 2: reserved bits 16..19
_HIGH4 = bytes(1 if b >> 4 else 0 for b in range(256))  # byte 2: offset bits 20..23


def validate_table(table: Table, geo: Geometry, file_size: int,
                   reserved_spans: list[tuple[int, int, str]],
                   entry_spans: Spans | None = None) -> list[BatProblem]:
    """Every kind of problem of the table (FORMAT.md §10 rows 11-12), fatal or not.

    ``reserved_spans`` are the (start, end, name) file ranges of the header
    section, log and regions, which no block may overlap; ``entry_spans`` are
    the ``spans`` of :func:`iter_nonzero`.

    Cost: byte scans in C per 64 KiB of table where the file holds entries;
    entries are compared raw (an entry's offset bits order it by file offset),
    so the only Python loop per entry is the overlap check over the sorted
    entries that place a block in the file. Each kind of problem is one
    :class:`BatProblem` with a count.
    """
    out = _Problems()
    n = len(table)
    # Payload slots past the last payload block (a differencing disk's last chunk)
    # have rules of their own; fewer than a chunk of them: entry by entry.
    limit = min(n, geo.payload_index(geo.payload_blocks - 1) + 1)
    placed = _Placed()
    raw = memoryview(table).cast("B") if isinstance(table, memoryview) else None
    for lo, hi in ([(0, n)] if entry_spans is None else normalize_spans(entry_spans, n)):
        for base in range(lo, min(hi, limit), _SCAN_STRIDE):
            end = min(base + _SCAN_STRIDE, hi, limit)
            if raw is None:
                _check_entries(table, geo, base, end, file_size, out, placed)
            else:
                _check_stride(table, raw, geo, base, end, file_size, out, placed)
        if hi > limit:
            _check_entries(table, geo, max(lo, limit), hi, file_size, out, placed)
    if not out.fatal:
        # Skipped once the table is known to be unusable: the open fails anyway,
        # and sorting the entries is the costly part.
        _check_overlaps(table, geo, placed, reserved_spans, out, entry_spans)
    return list(out.by_kind.values())


class _Placed:
    """Raw entries that place a block in the file: payload blocks (block_size
    long) and sector bitmaps (1 MiB), kept apart because their sizes differ."""

    def __init__(self) -> None:
        self.payload = array("Q")
        self.sb = array("Q")


_UNIT = 1 << 20  # entries below this have no offset; offsets are in MiB units


def _check_stride(table: Table, raw: memoryview, geo: Geometry, base: int, end: int,
                  file_size: int, out: _Problems, placed: _Placed) -> None:
    """What :func:`_check_entries` does, for a stride of a little-endian table, by
    byte scans and C-speed list operations."""
    count = end - base
    seg = raw[base * 8:end * 8]
    if seg == _ZERO_STRIDE[:count * 8]:
        return
    cr = geo.chunk_ratio
    cr1 = cr + 1
    k0 = (cr - base % cr1) % cr1  # first sector-bitmap slot, relative to base
    b0 = seg[0::8].tobytes()
    reserved = (int.from_bytes(b0.translate(_HIGH5), "little")
                | int.from_bytes(seg[1::8].tobytes().translate(_NONZERO), "little")
                | int.from_bytes(seg[2::8].tobytes().translate(_LOW4), "little"))
    if reserved:
        flags = reserved.to_bytes(count, "little")
        out.add("reserved", base + flags.index(1), "reserved bits are set", False, flags.count(1))
        b0 = b0.translate(_LOW3)
    for i in range(base + k0, end, cr1):  # sector bitmap slots: a few per stride
        e = table[i]
        if e:
            _check_sb_entry(i, e, geo, file_size, out, placed)
    states = bytearray(b0)
    del states[k0::cr1]  # payload slots only, in index order

    def index_of(p: int) -> int:  # table index of payload slot p of this stride
        if p < k0:
            return base + p
        q = p - k0
        return base + k0 + 1 + q + q // cr

    pos: list[int] | None = None  # payload slots of ``used`` (None: all of them)
    if not states.translate(None, _PLAIN_STATES):
        if not (seg[2::8].tobytes().translate(_HIGH4).strip(b"\0")
                or any(seg[k::8] != _ZERO_STRIDE[:count] for k in range(3, 8))):
            return  # no data states, no offsets: a discarded or untouched stretch
        vals = _payload_entries(table, base, end, k0, cr1)
        # UNDEFINED/UNMAPPED may keep an offset; it still counts as in use (FORMAT.md §5.1).
        pos = [p for p, v in enumerate(vals) if v >= _UNIT]
        used = [vals[p] for p in pos]
    else:
        for bad in (4, 5):
            k = states.count(bad)
            if k:
                out.add(f"state{bad}", index_of(states.index(bad)), f"reserved payload state {bad}", True, k)
        k = states.count(7)
        if k and not geo.has_parent:
            out.add("partial", index_of(states.index(7)),
                    "PARTIALLY_PRESENT block in a disk without parent", True, k)
        vals = _payload_entries(table, base, end, k0, cr1)
        if states.count(6) == len(states):
            used = vals  # fully allocated: the common case of a real image
        else:
            ok7 = geo.has_parent
            pos = [p for p, (s, v) in enumerate(zip(states, vals))
                   if (v >= _UNIT or s >= 6) and s != 4 and s != 5 and (ok7 or s != 7)]
            used = [vals[p] for p in pos]
    if used:
        _check_placed(used, (lambda j: index_of(j)) if pos is None else (lambda j: index_of(pos[j])),
                      geo.block_size, file_size, out)
        if not out.fatal:  # the overlap check will not run otherwise
            placed.payload.extend(used)


def _payload_entries(table: Table, base: int, end: int, k0: int, cr1: int) -> list[int]:
    """The payload slots' entries of [base, end) (sector-bitmap slots removed)."""
    vals = table[base:end].tolist()
    del vals[k0::cr1]
    return vals


def _check_placed(used: list[int], index_of: Callable[[int], int], block_size: int,
                  file_size: int, out: _Problems) -> None:
    """Bounds of the payload blocks of raw entries ``used`` (an entry below _UNIT:
    allocated without an offset); ``index_of(j)`` is the table index of ``used[j]``."""
    past = -(-file_size // S.MiB) * _UNIT  # entries from here start at or past EOF
    ext = max(1, (file_size - block_size) // S.MiB + 1) * _UNIT  # from here they run past EOF
    lo, hi = min(used), max(used)
    bad: Sequence[int]
    if lo < _UNIT:
        bad = [j for j, v in enumerate(used) if v < _UNIT]
        out.add("header", index_of(bad[0]), "block at 0x0 overlaps the header section", True, len(bad))
    if hi >= past:
        bad = range(len(used)) if lo >= past else [j for j, v in enumerate(used) if v >= past]
        out.add("past_eof", index_of(bad[0]),
                f"block at {used[bad[0]] & S.BAT_OFFSET_MASK:#x} lies past the end of the file "
                f"({file_size:#x})", True, len(bad))
    if hi >= ext and lo < past:
        bad = [j for j, v in enumerate(used) if ext <= v < past]
        if bad:
            # A short last block is tolerated by peers (QEMU); reads past EOF give zeros.
            out.add("extends", index_of(bad[0]),
                    f"block at {used[bad[0]] & S.BAT_OFFSET_MASK:#x} extends past the end of the file",
                    False, len(bad))


def _check_sb_entry(i: int, e: int, geo: Geometry, file_size: int, out: _Problems,
                    placed: _Placed) -> None:
    state = e & S.BAT_STATE_MASK
    if state not in (S.SB_BLOCK_NOT_PRESENT, S.SB_BLOCK_PRESENT):
        out.add("sb_state", i, f"invalid sector bitmap state {state}", True)
    elif state == S.SB_BLOCK_PRESENT:
        if not geo.has_parent:
            out.add("sb_no_parent", i, "sector bitmap marked present in a disk without parent", False)
        _check_placed([e], lambda _j: i, S.SECTOR_BITMAP_BLOCK_SIZE, file_size, out)
        placed.sb.append(e & S.BAT_OFFSET_MASK)


def _check_entries(table: Table, geo: Geometry, lo: int, hi: int, file_size: int,
                   out: _Problems, placed: _Placed) -> None:
    """Entry by entry, the rules themselves (a big-endian table, and the slots past
    the last payload block)."""
    cr1 = geo.chunk_ratio + 1
    used: list[int] = []
    where: list[int] = []
    for i in range(lo, hi):
        e = table[i]
        if not e:
            continue
        state = e & S.BAT_STATE_MASK
        off = e & S.BAT_OFFSET_MASK
        if e & S.BAT_RESERVED_MASK:
            out.add("reserved", i, "reserved bits are set", False)
        if i % cr1 == geo.chunk_ratio:
            _check_sb_entry(i, e, geo, file_size, out, placed)
            continue
        if state not in _VALID_PAYLOAD_STATES:
            out.add(f"state{state}", i, f"reserved payload state {state}", True)
            continue
        if state == S.PAYLOAD_BLOCK_PARTIALLY_PRESENT and not geo.has_parent:
            out.add("partial", i, "PARTIALLY_PRESENT block in a disk without parent", True)
            continue
        if state in _ALLOCATED_PAYLOAD_STATES or off:
            # UNDEFINED/UNMAPPED may keep an offset; it still counts as in use (FORMAT.md §5.1).
            if geo.block_of_index(i) >= geo.payload_blocks:
                if state in _ALLOCATED_PAYLOAD_STATES:
                    out.add("beyond", i, "allocated entry beyond the virtual disk", False)
                continue
            used.append(e)
            where.append(i)
    if used:
        _check_placed(used, where.__getitem__, geo.block_size, file_size, out)
        placed.payload.extend(used)


_MAP_MAX_UNITS = 1 << 26  # files up to 64 TiB are checked with a byte per MiB


def _check_overlaps(table: Table, geo: Geometry, placed: _Placed,
                    reserved_spans: list[tuple[int, int, str]], out: _Problems,
                    entry_spans: Spans | None) -> None:
    """No two blocks, and no block and a reserved range, share a byte.

    Blocks start on MiB units, so a map of one byte per MiB of the file finds
    overlaps in one pass in any order (a real image's allocation order follows
    its guest's writes); beyond 64 TiB of file the entries are sorted instead.
    """
    bs_units = geo.block_size >> 20
    top = max([(max(placed.payload) >> 20) + bs_units if placed.payload else 0,
               (max(placed.sb) >> 20) + 1 if placed.sb else 0]
              + [-(-e // S.MiB) for _s, e, _n in reserved_spans])
    if top <= _MAP_MAX_UNITS:
        _overlaps_by_map(table, geo, placed, reserved_spans, out, entry_spans, top)
    else:
        _overlaps_by_sort(table, geo, placed, reserved_spans, out, entry_spans)


def _overlaps_by_map(table: Table, geo: Geometry, placed: _Placed,
                     reserved_spans: list[tuple[int, int, str]], out: _Problems,
                     entry_spans: Spans | None, top: int) -> None:
    bs_units = geo.block_size >> 20
    owner = bytearray(top)  # per MiB: 0 free, 1 reserved range, 2 block
    for start, end, _name in reserved_spans:
        if start >= S.HEADER_SECTION_SIZE:  # blocks at offset 0 were reported already
            owner[start >> 20:-(-end // S.MiB)] = b"\1" * (-(-end // S.MiB) - (start >> 20))
    clashes: list[tuple[int, int]] = []  # (unit, size in units) of the first block that hit something
    count = _mark(owner, placed.payload, bs_units, clashes) + _mark(owner, placed.sb, 1, clashes)
    del owner
    if clashes:
        _report_clash(table, geo, placed, reserved_spans, out, entry_spans, clashes[0], count)


def _mark(owner: bytearray, entries: array[int], size: int, clashes: list[tuple[int, int]]) -> int:
    """Mark the ``size`` MiB units of each block of ``entries`` (raw entries or
    offsets) in ``owner``; returns how many found a unit taken already."""
    count = 0
    if size == 1:
        for e in entries:
            u = e >> 20
            if owner[u]:
                count += 1
                if not clashes:
                    clashes.append((u, 1))
            owner[u] = 2
        return count
    mark, free = b"\2" * size, bytes(size)
    for e in entries:
        u = e >> 20
        if owner[u:u + size] != free:
            count += 1
            if not clashes:
                clashes.append((u, size))
        owner[u:u + size] = mark
    return count


def _report_clash(table: Table, geo: Geometry, placed: _Placed,
                  reserved_spans: list[tuple[int, int, str]], out: _Problems,
                  entry_spans: Spans | None, clash: tuple[int, int], count: int) -> None:
    """Name what the block at ``clash`` overlaps (error path: linear scans)."""
    u, size = clash
    lo, hi = u << 20, (u + size) << 20
    is_sb = size == 1 and (geo.block_size != S.MiB or u << 20 in placed.sb)
    me = _entry_at(table, geo, lo, is_sb, entry_spans)
    for start, end, name in sorted(reserved_spans):
        if start >= S.HEADER_SECTION_SIZE and start < hi and end > lo:
            (a, na), (b, nb) = sorted(((lo, f"BAT entry {me}"), (start, name)))
            out.add(f"reserved:{name}", -1, f"{na} at {a:#x} overlaps {nb} at {b:#x}", True, count)
            return
    bs = geo.block_size
    for arr, length, sb in ((placed.payload, bs, False), (placed.sb, S.MiB, True)):
        for e in arr:
            off = e & S.BAT_OFFSET_MASK
            if off < hi and off + length > lo:
                other = _entry_at(table, geo, off, sb, entry_spans)
                if other == me:
                    if off != lo or sb != is_sb:
                        continue
                    other = _entry_at(table, geo, off, sb, entry_spans, after=me)
                    if other < 0:
                        continue
                (a, ia), (b, ib) = sorted(((off, other), (lo, me)))
                out.add("overlap", -1, f"BAT entry {ia} at {a:#x} overlaps BAT entry {ib} at {b:#x}",
                        True, count)
                return
    out.add("overlap", -1, f"BAT entry {me} at {lo:#x} overlaps another block", True, count)


def _overlaps_by_sort(table: Table, geo: Geometry, placed: _Placed,
                      reserved_spans: list[tuple[int, int, str]], out: _Problems,
                      entry_spans: Spans | None) -> None:
    bs = geo.block_size
    # Raw entries sort by file offset (the state and reserved bits sit below it).
    pay = sorted(placed.payload)
    sbs = sorted(placed.sb)
    first: tuple[int, bool, int, bool] | None = None  # (offset, is bitmap) of the first pair
    count = 0
    prev = -bs
    for e in pay:  # equal sizes: each block need only clear its predecessor
        off = e & S.BAT_OFFSET_MASK
        if off - prev < bs:
            count += 1
            first = first or (prev, False, off, False)
        prev = off
    prev = -S.MiB
    for off in sbs:
        if off - prev < S.MiB:
            count += 1
            first = first or (prev, True, off, True)
        prev = off
    for off in sbs:  # a sector bitmap against the payload blocks around it
        j = bisect.bisect_left(pay, off - bs + _UNIT)  # first block that may reach it
        if j < len(pay) and pay[j] & S.BAT_OFFSET_MASK < off + S.MiB:
            count += 1
            b = pay[j] & S.BAT_OFFSET_MASK
            first = first or ((b, False, off, True) if b <= off else (off, True, b, False))
    if first is not None:
        a, a_sb, b, b_sb = first
        ia, ib = _entry_at(table, geo, a, a_sb, entry_spans), _entry_at(table, geo, b, b_sb, entry_spans)
        if ia == ib:  # two entries with the same offset and kind: the second one
            ib = _entry_at(table, geo, b, b_sb, entry_spans, after=ia)
        out.add("overlap", -1, f"BAT entry {ia} at {a:#x} overlaps BAT entry {ib} at {b:#x}", True, count)
    for start, end, name in sorted(reserved_spans):
        if start < S.HEADER_SECTION_SIZE:
            continue  # the header section: blocks at offset 0 were reported already
        for arr, size, is_sb in ((pay, bs, False), (sbs, S.MiB, True)):
            j = bisect.bisect_left(arr, start - size + _UNIT)  # first that may reach start
            if j < len(arr) and arr[j] & S.BAT_OFFSET_MASK < end:
                b = arr[j] & S.BAT_OFFSET_MASK
                i = _entry_at(table, geo, b, is_sb, entry_spans)
                lo_, hi_ = sorted(((b, f"BAT entry {i}"), (start, name)))
                out.add(f"reserved:{name}", -1, f"{lo_[1]} at {lo_[0]:#x} overlaps {hi_[1]} at {hi_[0]:#x}",
                        True)
                break


def _entry_at(table: Table, geo: Geometry, offset: int, sb: bool, spans: Spans | None,
              after: int = -1) -> int:
    """Index of the first payload (or sector-bitmap) entry after ``after`` placing a
    block at ``offset`` (error paths only: one scan)."""
    cr1 = geo.chunk_ratio + 1
    for i, e in iter_nonzero(table, spans=spans):
        if i > after and e & S.BAT_OFFSET_MASK == offset and (i % cr1 == geo.chunk_ratio) == sb:
            return i
    return -1


def raise_fatal(problems: list[BatProblem]) -> None:
    for p in problems:
        if p.fatal:
            raise CorruptImageError(p.describe())
