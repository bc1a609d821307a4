"""The block map of one writable VHDX file: allocation, BAT entries, sector bitmaps.

:class:`BlockMap` is the one owner of a writable file's block-map state: where a
new block goes (the end of the file, 1 MiB aligned, which reads zeros), what each
BAT entry says (payload states of FORMAT.md §5.2, sector-bitmap entries of §5.4),
which sector-bitmap bits are set, and how changes become durable: they
accumulate in memory and :meth:`BlockMap.commit` logs them as one log entry
(:mod:`vhdx.log_writer`, FORMAT.md §6.5), whose pre-write barrier makes every
payload written before it durable first (FORMAT.md §7 rule 5). Until a commit the
file's on-disk BAT still describes the old contents.

The writer (:mod:`vhdx.writer`), resize, merge and compact change blocks only
through this API. :class:`RecordingBlockMap` has the same API over a read-only
target and records what it would do (a dry run); :func:`merge_action` is the
merge's per-block decision, a pure function of the upper chain's coverage of a
block and the target block's state (FORMAT.md §8.3).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from . import structures as S
from .bat import Geometry, Table
from .errors import VhdxError

if TYPE_CHECKING:  # pragma: no cover
    from .image import ImageFile
    from .log_writer import LogWriter
    from .storage import Storage

__all__ = ["BlockMap", "RecordingBlockMap", "DryRunRecord", "Upper", "Action", "merge_action",
           "classify_upper"]

SECTOR = S.LOG_SECTOR_SIZE
MiB = S.MiB
_ALLOCATED = (S.PAYLOAD_BLOCK_FULLY_PRESENT, S.PAYLOAD_BLOCK_PARTIALLY_PRESENT)


def _align_up(n: int, a: int) -> int:
    return -(-n // a) * a


class TargetImage(Protocol):
    """What a block map reads of its file: the geometry, the table, the kind."""

    @property
    def geometry(self) -> Geometry: ...

    @property
    def bat(self) -> Table: ...

    @property
    def has_parent(self) -> bool: ...

    @property
    def is_fixed(self) -> bool: ...


# --- the merge's block-state decision (pure) ------------------------------------------------
class Upper(enum.Enum):
    """What the files above a merge target define inside one target block.

    The upper chain is resolved per sector (FORMAT.md §8.1): a FULLY_PRESENT child
    block defines data everywhere, a PARTIALLY_PRESENT one its bit-1 sectors,
    ZERO / UNDEFINED / UNMAPPED blocks (and the range past a smaller child's end)
    define zeros, NOT_PRESENT defines nothing. Block sizes may differ along a
    chain, so a target block may be covered only in part.
    """

    NOTHING = "nothing"          # no sector defined: the target keeps the block
    ZEROS = "zeros"              # every sector defined, all as zeros
    DATA = "data"                # every sector defined, some with data
    SOME_ZEROS = "some zeros"    # some sectors defined, all of them zeros
    SOME_DATA = "some data"      # some sectors defined, some with data

    @property
    def whole(self) -> bool:
        return self in (Upper.ZEROS, Upper.DATA)

    @property
    def has_data(self) -> bool:
        return self in (Upper.DATA, Upper.SOME_DATA)


def classify_upper(defined: int, length: int, has_data: bool) -> Upper:
    """The :class:`Upper` case of a block with ``defined`` of its ``length`` bytes defined."""
    if defined <= 0:
        return Upper.NOTHING
    if defined >= length:
        return Upper.DATA if has_data else Upper.ZEROS
    return Upper.SOME_DATA if has_data else Upper.SOME_ZEROS


class Action(enum.Enum):
    """What the merge does to one target block.

    In-place actions write the upper data into the block the target already has
    and write zeros over its old bytes where the upper chain defines zeros; ``NEW_*``
    actions take a fresh block, which reads zeros, so only data is written. No
    action ever makes a block NOT_PRESENT or UNMAPPED: in a differencing target
    that would expose the target's own parent (FORMAT.md §8.3).
    """

    LEAVE = "leave"                  # nothing changes
    SET_ZERO = "set zero"            # entry ZERO (offset 0), nothing written
    WRITE = "write in place"         # existing block, state kept (FULLY_PRESENT)
    WRITE_FULL = "write, full"       # existing PARTIALLY_PRESENT block becomes FULLY_PRESENT
    WRITE_BITS = "write, set bits"   # existing PARTIALLY_PRESENT block, defined sectors' bits set
    NEW_FULL = "new block, full"     # fresh block, data copied, FULLY_PRESENT
    NEW_PARTIAL = "new block, bits"  # fresh block + bitmap, PARTIALLY_PRESENT, defined bits set

    @property
    def in_place(self) -> bool:
        return self in (Action.WRITE, Action.WRITE_FULL, Action.WRITE_BITS)

    @property
    def allocates(self) -> bool:
        return self in (Action.NEW_FULL, Action.NEW_PARTIAL)


def merge_action(upper: Upper, state: int, *, has_parent: bool, fixed: bool) -> Action:
    """The merge's decision for one target block (FORMAT.md §8.3), without I/O.

    ``state`` is the target block's payload state (FORMAT.md §5.2), ``has_parent``
    whether the target is a differencing disk (NOT_PRESENT then reads its parent,
    not zeros), ``fixed`` whether it keeps every block allocated (no ZERO entries:
    zeros are written in place). The result makes the target read the upper
    chain's sectors where it defines them and its own old sectors elsewhere,
    with the least writing: no data is written where a state can say "zeros",
    and no fresh block is taken where the target has one.
    """
    if upper is Upper.NOTHING:
        return Action.LEAVE
    if state == S.PAYLOAD_BLOCK_FULLY_PRESENT:
        if upper is Upper.ZEROS and not fixed:
            return Action.SET_ZERO  # whole block zero: no data to write
        return Action.WRITE
    if state == S.PAYLOAD_BLOCK_PARTIALLY_PRESENT:
        if upper is Upper.ZEROS:
            return Action.SET_ZERO
        return Action.WRITE_FULL if upper.whole else Action.WRITE_BITS
    if state == S.PAYLOAD_BLOCK_NOT_PRESENT and has_parent:
        # Reads the target's parent: sectors the upper chain leaves undefined must keep
        # doing so, so a partial coverage becomes a bitmap, never a zero-filled block.
        if upper is Upper.ZEROS:
            return Action.SET_ZERO  # never NOT_PRESENT: it would expose the parent
        return Action.NEW_FULL if upper.whole else Action.NEW_PARTIAL
    # NOT_PRESENT in a base, ZERO, UNDEFINED, UNMAPPED: the block reads zeros (FORMAT.md
    # §5.2), so zeros change nothing and data gets a fresh block, FULLY_PRESENT (its
    # undefined sectors read the zeros they read before).
    return Action.NEW_FULL if upper.has_data else Action.LEAVE


# --- the block map ----------------------------------------------------------------------------
class BlockMap:
    """Block allocation, BAT entries and sector bitmaps of one writable file.

    ``image`` is the file's parse (its ``bat`` table is updated in place, so reads
    through the image see every change at once), ``storage`` its writable storage,
    ``log`` its :class:`~vhdx.log_writer.LogWriter`. ``max_pending`` is how many
    4 KiB sectors (BAT and bitmap) may wait for a commit before :meth:`commit_due`
    says so: one log entry must carry them all. Not thread-safe.
    """

    def __init__(self, image: "ImageFile", storage: "Storage", log: "LogWriter", *,
                 max_pending: int) -> None:
        self.storage = storage
        self.log = log
        self.max_pending = max(1, max_pending)
        self._end = -1  # found on the first allocation: a metadata edit never scans the BAT
        self.rebind(image)

    # --- the file -----------------------------------------------------------------------
    def rebind(self, image: "ImageFile") -> None:
        """Follow a new parse of the file (after a layout change: size, BAT location).

        Pending changes are dropped (the caller committed them first); the
        allocation end only ever grows, unless :meth:`forget_end` was called.
        """
        self.image = image
        self.geometry = image.geometry
        self._bat_offset = image.header_section.bat_region.file_offset
        if not isinstance(image.bat, memoryview):
            raise VhdxError("writing is supported on little-endian hosts only")
        self._raw = memoryview(image.bat).cast("B")
        self._entries: set[int] = set()
        self._bat_sectors: set[int] = set()
        self._bitmaps: dict[int, bytearray] = {}  # 4 KiB file offset -> sector image
        self._stale: set[int] = set()  # blocks whose cached bitmap runs are out of date
        if self._end >= 0:
            self._end = max(self._end, self._scan_end())

    def _scan_end(self) -> int:
        img = self.image
        end = max(self.storage.size(), img.logical_size, img.allocation_end())
        return _align_up(end, MiB)

    def forget_end(self) -> None:
        """The file was cut: find the allocation end from the file again when needed."""
        self._end = -1

    # --- reading the current state (pending changes included) ---------------------------
    def entry(self, index: int) -> int:
        """The raw BAT entry ``index`` as it is now."""
        return int(self.image.bat[index])

    def payload_entry(self, block: int) -> int:
        """The raw payload entry of virtual block ``block``."""
        return self.entry(self.geometry.payload_index(block))

    def bit(self, block: int, sector: int) -> bool:
        """Sector-bitmap bit of ``sector`` in PARTIALLY_PRESENT ``block``."""
        geo = self.geometry
        sb = self.entry(geo.sb_index(block // geo.chunk_ratio)) & S.BAT_OFFSET_MASK
        start, _ = geo.bitmap_slice(block)
        byte = sb + start + sector // 8
        sec = self._bitmaps.get(byte & ~(SECTOR - 1))
        value = sec[byte % SECTOR] if sec is not None else self._read_byte(byte)
        return bool(value >> (sector % 8) & 1)

    def _read_byte(self, offset: int) -> int:
        data = self.storage.pread(offset, 1)
        return data[0] if data else 0

    def _bitmap_sector(self, file_offset: int) -> bytearray:
        sec = self._bitmaps.get(file_offset)
        if sec is None:
            sec = bytearray(self.storage.pread(file_offset, SECTOR).ljust(SECTOR, b"\0"))
            self._bitmaps[file_offset] = sec
        return sec

    # --- changing it ------------------------------------------------------------------------
    def allocate(self, size: int) -> int:
        """A fresh 1 MiB-aligned range of ``size`` bytes at the end of the file.

        It reads zeros (the file is extended with ``truncate``) and nothing
        references it until an entry set here is committed (FORMAT.md §7 rule 5).
        """
        if self._end < 0:
            self._end = self._scan_end()
        off = self._end
        self._end = off + _align_up(size, MiB)
        self._extend(self._end)
        return off

    def _extend(self, end: int) -> None:
        if self.storage.size() < end:
            self.storage.truncate(end)

    def set_entry(self, index: int, value: int) -> None:
        """Set raw BAT entry ``index`` (payload or sector-bitmap); logged on commit."""
        self.image.bat[index] = value
        self.image.note_bat_entry(index)
        self._entries.add(index)
        self._bat_sectors.add((self._bat_offset + 8 * index) // SECTOR)
        if not self.geometry.is_sb_index(index):
            self._stale.add(self.geometry.block_of_index(index))

    def set_payload(self, block: int, state: int, offset: int = 0) -> None:
        """Set the payload entry of ``block`` to ``state`` at file ``offset``."""
        self.set_entry(self.geometry.payload_index(block), S.bat_entry(state, offset))

    def ensure_bitmap(self, chunk: int) -> int:
        """File offset of ``chunk``'s sector-bitmap block, allocated when absent (a
        fresh one reads zeros: no bit set, FORMAT.md §5.4)."""
        idx = self.geometry.sb_index(chunk)
        e = self.entry(idx)
        if e & S.BAT_STATE_MASK == S.SB_BLOCK_PRESENT:
            return e & S.BAT_OFFSET_MASK
        off = self.allocate(S.SECTOR_BITMAP_BLOCK_SIZE)
        self.set_entry(idx, S.bat_entry(S.SB_BLOCK_PRESENT, off))
        return off

    def set_bits(self, block: int, first: int, count: int) -> None:
        """Set bits [first, first+count) of ``block``'s slice of its chunk's bitmap
        (the bitmap block is allocated when absent)."""
        self._change_bits(block, first, count, True)

    def clear_bits(self, block: int, first: int, count: int) -> None:
        """Clear bits [first, first+count) of ``block``; nothing when its chunk has no bitmap."""
        geo = self.geometry
        if self.entry(geo.sb_index(block // geo.chunk_ratio)) & S.BAT_STATE_MASK != S.SB_BLOCK_PRESENT:
            return
        self._change_bits(block, first, count, False)

    def _change_bits(self, block: int, first: int, count: int, value: bool) -> None:
        if count <= 0:
            return
        geo = self.geometry
        sb = self.ensure_bitmap(block // geo.chunk_ratio)
        start, _ = geo.bitmap_slice(block)
        base = (sb + start) * 8  # absolute bit address in the file
        lo, hi = base + first, base + first + count
        while lo < hi:
            sector_off = (lo // 8) & ~(SECTOR - 1)
            sec = self._bitmap_sector(sector_off)
            sec_hi = min(hi, (sector_off + SECTOR) * 8)
            _set_bit_range(sec, lo - sector_off * 8, sec_hi - sector_off * 8, value)
            lo = sec_hi
        self._stale.add(block)

    # --- commits ----------------------------------------------------------------------------
    @property
    def pending(self) -> bool:
        """True when changes wait for a commit."""
        return bool(self._entries or self._bitmaps)

    @property
    def pending_entries(self) -> frozenset[int]:
        """BAT entry indices changed since the last commit."""
        return frozenset(self._entries)

    @property
    def pending_bat_sectors(self) -> frozenset[int]:
        """4 KiB BAT sectors (file offset // 4096) the next commit logs."""
        return frozenset(self._bat_sectors)

    @property
    def pending_bitmap_sectors(self) -> frozenset[int]:
        """File offsets of the 4 KiB bitmap sectors the next commit logs."""
        return frozenset(self._bitmaps)

    def commit_due(self) -> bool:
        """True when the pending sectors near what one log entry can carry."""
        return len(self._bat_sectors) + len(self._bitmaps) > self.max_pending

    def commit(self) -> bool:
        """Log and apply every pending change as one entry; False when none was pending.

        The log entry's pre-write barrier makes every payload byte written so far
        durable before the entry that exposes it (FORMAT.md §7 rule 5).
        """
        if not self.pending:
            return False
        raw = self._raw
        bat_end = self._bat_offset + len(raw)
        updates: dict[int, bytes] = {}
        for sector_no in self._bat_sectors:
            sector = sector_no * SECTOR
            lo, hi = max(sector, self._bat_offset), min(sector + SECTOR, bat_end)
            buf = bytearray(self.storage.pread(sector, SECTOR).ljust(SECTOR, b"\0"))
            buf[lo - sector:hi - sector] = raw[lo - self._bat_offset:hi - self._bat_offset]
            updates[sector] = bytes(buf)
        for off, sec in self._bitmaps.items():
            updates[off] = bytes(sec)
        self.log.transaction(updates)
        self._forget_pending()
        return True

    def discard(self) -> None:
        """Forget uncommitted changes (after a failure; the in-memory table keeps
        them, so the disk must be closed without a commit)."""
        self._forget_pending()

    def _forget_pending(self) -> None:
        self._entries.clear()
        self._bat_sectors.clear()
        self._bitmaps.clear()
        self.image.forget_block_runs(self._stale)
        self._stale.clear()


def _set_bit_range(sec: bytearray, b0: int, b1: int, value: bool) -> None:
    """Set or clear bits [b0, b1) of ``sec`` (least significant bit first, FORMAT.md §5.4):
    whole bytes in one slice assignment, edge bits one by one."""
    while b0 < b1 and b0 % 8:
        _one_bit(sec, b0, value)
        b0 += 1
    full = (b1 - b0) // 8
    sec[b0 // 8:b0 // 8 + full] = (b"\xff" if value else b"\0") * full
    b0 += full * 8
    while b0 < b1:
        _one_bit(sec, b0, value)
        b0 += 1


def _one_bit(sec: bytearray, bit: int, value: bool) -> None:
    if value:
        sec[bit // 8] |= 1 << (bit % 8)
    else:
        sec[bit // 8] &= ~(1 << (bit % 8)) & 0xFF


# --- the dry run --------------------------------------------------------------------------------
@dataclass
class DryRunRecord:
    """What a :class:`RecordingBlockMap` was asked to do."""

    entries: dict[int, int] = field(default_factory=dict)  # payload entries set, by new state
    bytes_allocated: int = 0       # fresh blocks (payload and bitmap), 1 MiB aligned
    bitmap_blocks: int = 0         # sector-bitmap blocks that would be allocated
    bits_set: int = 0
    bits_cleared: int = 0
    commits: int = 0               # log entries the changes would take


class RecordingBlockMap(BlockMap):
    """The block-map API over a read-only target that records instead of writing.

    Allocations hand out offsets past the file's end without growing it, entries
    and bits are counted in :attr:`record` (payload entries are not kept: the
    merge sets each block once, so a dry run over millions of blocks stays
    small), commits are counted. Sector-bitmap entries are kept, because later
    blocks of the same chunk ask for the bitmap again. ``grown`` is the virtual
    size the target would have by then: entries past its table read as a grow
    would make them (ZERO in a differencing target, NOT_PRESENT in a base).
    """

    def __init__(self, image: TargetImage, *, grown: int | None = None) -> None:
        # Deliberately not BlockMap.__init__: no storage, no log, nothing to bind.
        self.image = image  # type: ignore[assignment]  # read through TargetImage only
        self.geometry = image.geometry
        if grown is not None and grown > self.geometry.virtual_size:
            self.geometry = Geometry(grown, self.geometry.block_size,
                                     self.geometry.logical_sector_size, self.geometry.has_parent)
        self._target = image
        self.max_pending = 1 << 62
        self.record = DryRunRecord()
        self._sb: dict[int, int] = {}
        self._entries = set()
        self._bat_sectors = set()
        self._bitmaps = {}
        self._stale = set()
        self._end = -1

    def rebind(self, image: "ImageFile") -> None:  # pragma: no cover - nothing to follow
        raise VhdxError("a dry run's block map does not follow layout changes")

    def _scan_end(self) -> int:
        target = self._target
        end = getattr(target, "allocation_end", None)
        return _align_up(max(getattr(target, "file_size", 0), end() if end else 0), MiB)

    def entry(self, index: int) -> int:
        if index in self._sb:
            return self._sb[index]
        bat, geo = self._target.bat, self.geometry
        sb = geo.is_sb_index(index)
        if index < len(bat) and (sb or geo.block_of_index(index) < self._target.geometry.payload_blocks):
            return int(bat[index])
        if sb:
            return 0
        # A block past the target's end, which the merge grows first (vhdx/resize.py).
        return S.PAYLOAD_BLOCK_ZERO if self._target.has_parent else S.PAYLOAD_BLOCK_NOT_PRESENT

    def bit(self, block: int, sector: int) -> bool:
        raise VhdxError("a dry run's block map does not read sector bitmaps")

    def _extend(self, end: int) -> None:
        pass  # nothing is written

    def allocate(self, size: int) -> int:
        self.record.bytes_allocated += _align_up(size, MiB)
        return super().allocate(size)

    def set_entry(self, index: int, value: int) -> None:
        if self.geometry.is_sb_index(index):
            self._sb[index] = value
            self.record.bitmap_blocks += 1
            return
        state = value & S.BAT_STATE_MASK
        self.record.entries[state] = self.record.entries.get(state, 0) + 1
        self._bat_sectors.add(index)  # pending, so that commit() counts an entry

    def _change_bits(self, block: int, first: int, count: int, value: bool) -> None:
        if count <= 0:
            return
        self.ensure_bitmap(block // self.geometry.chunk_ratio)
        if value:
            self.record.bits_set += count
        else:
            self.record.bits_cleared += count
        self._bat_sectors.add(-1)  # bitmap sectors pending

    def commit_due(self) -> bool:
        return False

    def commit(self) -> bool:
        if not self._bat_sectors:
            return False
        self._bat_sectors.clear()
        self.record.commits += 1
        return True

    def discard(self) -> None:
        self._bat_sectors.clear()

    @property
    def pending(self) -> bool:
        return bool(self._bat_sectors)
