"""Block Allocation Table: geometry (chunk ratio, entry index math) and the table.

Followed: MS-VHDX 2.5 (BAT), 2.5.1 (entry), 2.5.1.1/2.5.1.2 (states) and the
entry-count formulas of 2.5 as checked in ref §5.3 (not the bad transcription
of ref §11.1). Validation per ref §10 rows 10-12.
"""

from __future__ import annotations

import sys
from array import array
from dataclasses import dataclass

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


Table = memoryview | array
"""The decoded BAT: indexable u64 entries (a ``memoryview`` cast to 'Q' on
little-endian hosts, so the table is held once, in the buffer it was read into)."""


def decode_table(raw: bytearray, count: int) -> Table:
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


def iter_nonzero(table: Table, chunk_ratio: int | None = None,  # noqa: ANN201
                 spans: Spans | None = None):
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


def _iter_span(table: Table, chunk_ratio: int | None, lo: int, hi: int):  # noqa: ANN202
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
    index: int
    message: str
    fatal: bool


def validate_table(table: Table, geo: Geometry, file_size: int,
                   reserved_spans: list[tuple[int, int, str]],
                   entry_spans: Spans | None = None) -> list[BatProblem]:
    """Every problem of the table (ref §10 rows 11-12), fatal or not.

    ``reserved_spans`` are the (start, end, name) file ranges of the header
    section, log and regions, which no block may overlap; ``entry_spans`` are
    the ``spans`` of :func:`iter_nonzero`.
    """
    problems: list[BatProblem] = []
    spans: list[tuple[int, int, int]] = []  # start, end, index
    cr1 = geo.chunk_ratio + 1
    bs = geo.block_size
    for i, e in iter_nonzero(table, geo.chunk_ratio, entry_spans):
        state = e & S.BAT_STATE_MASK
        off = e & S.BAT_OFFSET_MASK
        is_sb = i % cr1 == geo.chunk_ratio
        if e & S.BAT_RESERVED_MASK:
            problems.append(BatProblem(i, "reserved bits are set", False))
        if is_sb:
            if state not in (S.SB_BLOCK_NOT_PRESENT, S.SB_BLOCK_PRESENT):
                problems.append(BatProblem(i, f"invalid sector bitmap state {state}", True))
                continue
            if state == S.SB_BLOCK_PRESENT:
                if not geo.has_parent:
                    problems.append(BatProblem(i, "sector bitmap marked present in a disk without parent", False))
                spans.append((off, off + S.SECTOR_BITMAP_BLOCK_SIZE, i))
            continue
        if state not in _VALID_PAYLOAD_STATES:
            problems.append(BatProblem(i, f"reserved payload state {state}", True))
            continue
        if state == S.PAYLOAD_BLOCK_PARTIALLY_PRESENT and not geo.has_parent:
            problems.append(BatProblem(i, "PARTIALLY_PRESENT block in a disk without parent", True))
            continue
        if state in _ALLOCATED_PAYLOAD_STATES or off:
            # UNDEFINED/UNMAPPED may keep an offset; it still counts as in use (ref §5.1).
            block = geo.block_of_index(i)
            if block >= geo.payload_blocks:
                if state in _ALLOCATED_PAYLOAD_STATES:
                    problems.append(BatProblem(i, "allocated entry beyond the virtual disk", False))
                continue
            spans.append((off, off + bs, i))
    for start, end, i in spans:
        if start < S.HEADER_SECTION_SIZE:
            problems.append(BatProblem(i, f"block at {start:#x} overlaps the header section", True))
        elif start >= file_size:
            problems.append(BatProblem(i, f"block at {start:#x} lies past the end of the file ({file_size:#x})", True))
        elif end > file_size:
            # A short last block is tolerated by peers (QEMU); reads past EOF give zeros.
            problems.append(BatProblem(i, f"block at {start:#x} extends past the end of the file", False))
    allspans = sorted([(s, e, f"BAT entry {i}") for s, e, i in spans] + list(reserved_spans))
    for (s1, e1, n1), (s2, _e2, n2) in zip(allspans, allspans[1:]):
        if s2 < e1:
            problems.append(BatProblem(-1, f"{n1} at {s1:#x} overlaps {n2} at {s2:#x}", True))
    return problems


def raise_fatal(problems: list[BatProblem]) -> None:
    for p in problems:
        if p.fatal:
            where = f"BAT entry {p.index}: " if p.index >= 0 else "BAT: "
            raise CorruptImageError(where + p.message)
