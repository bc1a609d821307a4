"""Change the virtual size of a writable disk (``WritableDisk.resize``).

Rules (FORMAT.md §2.2, §5.3, §7, §8.3 "Virtual size differences"):

* The Virtual Disk Size item and the BAT entries that become live change in ONE
  log entry, so a crash leaves either the old or the new size, never a mix.
* BAT entries only ever get appended (the chunk ratio depends only on the
  logical sector size and the block size). When the BAT region is too small, a
  new 1 MiB-aligned region is allocated at the end of the file, filled (old
  entries + new ones) and flushed while nothing references it, and then both
  region-table copies (64 KiB each, CRC over the whole table) switch to it in the
  same log entry as the size.
* Growing a differencing disk sets the new payload blocks ZERO, never
  NOT_PRESENT: the new range must read zeros even over a larger parent. The
  sectors past the old end inside the block that straddled it are zeroed too
  (for a differencing disk by a sector-bitmap write, never by exposing the parent).
* Growing a fixed disk (LeaveBlockAllocated = 1) allocates the new blocks
  FULLY_PRESENT at the end of the file; the file is extended with ``truncate``, so
  they read zeros (and stay sparse where the file system allows).
* Shrinking is allowed only when the cut range reads zeros through the whole
  chain; the entries of the blocks wholly past the new end are dropped. Entries
  past the new table end that do not fit the entry carrying the size follow it
  in further entries (invisible by then). Once the log session is closed
  (nothing can replay past the cut), the file is truncated after the last region
  or live block and dropped blocks below that end get their holes punched.
* DataWriteGuid changes (the virtual size is user-visible).

When a grow needs more BAT sectors than one log entry can carry (huge grows of a
differencing or fixed disk), the entries past the current end of the table are
written first through as many log entries as needed: readers ignore entries past
the live table, so a crash in between changes nothing visible; the final entry
then carries the size (and region tables) alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import structures as S
from .bat import Geometry, iter_nonzero
from .errors import InvalidArgumentError, VhdxError
from .layout import build_region_table

if TYPE_CHECKING:  # pragma: no cover
    from .writer import WritableDisk

SECTOR = S.LOG_SECTOR_SIZE
MiB = S.MiB
_BATCH_SECTORS = 160          # data sectors per log entry (a 1 MiB log holds 255)
_FINAL_BUDGET = 120           # BAT sectors allowed in the entry that changes the size
_COPY_CHUNK = 8 * MiB


def _align_up(n: int, a: int) -> int:
    return -(-n // a) * a


def _entries_bytes(geo: Geometry, first: int, stop: int, state: int, fixed_base: int | None,
                   block_size: int) -> bytearray:
    """Raw little-endian entries [first, stop) of a grown table: payload entries get
    ``state`` (FULLY_PRESENT at consecutive offsets from ``fixed_base`` for fixed
    disks), sector-bitmap entries 0."""
    out = bytearray((stop - first) * 8)
    if state == S.PAYLOAD_BLOCK_NOT_PRESENT or stop <= first:
        return out
    cr1 = geo.chunk_ratio + 1
    if fixed_base is None:
        # One chunk's pattern (payload entries, then the SB slot 0) repeated: a 64 TiB
        # grow of a differencing disk with 1 MiB blocks is 64 Mi entries.
        e = S.bat_entry(state).to_bytes(8, "little")
        phase = first % cr1
        out = bytearray(e * geo.chunk_ratio + bytes(8)) * ((phase + stop - first) // cr1 + 1)
        del out[:phase * 8]
        del out[(stop - first) * 8:]
        # Entries past the last payload block (inside the last chunk) stay 0.
        tail = geo.payload_index(geo.payload_blocks - 1) + 1
        for i in range(max(first, tail), stop):
            out[(i - first) * 8:(i - first + 1) * 8] = bytes(8)
        return out
    for i in range(first, stop):
        if i % cr1 == geo.chunk_ratio:
            continue
        block = geo.block_of_index(i)
        if block >= geo.payload_blocks:
            continue
        entry = S.bat_entry(S.PAYLOAD_BLOCK_FULLY_PRESENT, fixed_base)
        fixed_base += block_size
        out[(i - first) * 8:(i - first + 1) * 8] = entry.to_bytes(8, "little")
    return out


def _cut_is_zero(disk: "WritableDisk", start: int, end: int) -> bool:
    for ext in disk.extents(start, end - start):
        if ext.kind != "data":
            continue
        pos, stop = ext.offset, ext.offset + ext.length
        while pos < stop:
            n = min(_COPY_CHUNK, stop - pos)
            if disk.read_at(pos, n).count(0) != n:
                return False
            pos += n
    return True


def resize(disk: "WritableDisk", new_size: int) -> None:
    """Grow or shrink ``disk`` to ``new_size`` bytes (see the module docstring)."""
    if disk.closed:
        raise ValueError("I/O operation on closed disk")
    img = disk.image
    md = img.metadata
    lss = md.logical_sector_size
    if not isinstance(new_size, int) or isinstance(new_size, bool):
        raise InvalidArgumentError(f"size must be an int, not {type(new_size).__name__}")
    if new_size <= 0 or new_size % lss:
        raise InvalidArgumentError(f"size {new_size} is not a positive multiple of the logical sector size {lss}")
    if new_size > S.MAX_VIRTUAL_SIZE:
        raise InvalidArgumentError(f"size {new_size} exceeds the 64 TiB maximum")
    old_size = md.virtual_size
    if new_size == old_size:
        return
    disk.commit()
    bm = disk.blocks
    old_geo = img.geometry
    new_geo = Geometry(new_size, md.block_size, lss, md.has_parent)
    if new_size < old_size and not _cut_is_zero(disk, new_size, old_size):
        raise VhdxError(
            f"cannot shrink to {new_size} bytes: the range {new_size:#x}-{old_size:#x} holds data "
            "(zero it first)")
    lw = disk.log
    lw.mark_data_changed()  # the virtual size is user-visible (FORMAT.md §2.2)
    bs = md.block_size

    if new_size > old_size:
        # Sectors past the old end in the straddling block must read zeros.
        tail_block = old_size // bs
        if old_size % bs and tail_block < old_geo.payload_blocks:
            info = img.block(tail_block)
            wants_zeroing = info.state in (S.PAYLOAD_BLOCK_FULLY_PRESENT, S.PAYLOAD_BLOCK_PARTIALLY_PRESENT) or (
                info.state == S.PAYLOAD_BLOCK_NOT_PRESENT and img.has_parent)
            if wants_zeroing:
                bstart = tail_block * bs
                _zero_tail(disk, tail_block, old_size - bstart, min(new_size, bstart + bs) - old_size)
                disk.commit()  # entries past the old end are invisible until the size changes

    # Desired raw table bytes for the entries that change: [lo, hi).
    old_total, new_total = old_geo.total_entries, new_geo.total_entries
    fixed_base = None
    if new_size > old_size:
        lo, hi = old_total, new_total
        if img.is_fixed and not img.has_parent:
            state = S.PAYLOAD_BLOCK_FULLY_PRESENT
            first_new = sum(1 for i in range(lo, hi)
                            if i % (new_geo.chunk_ratio + 1) != new_geo.chunk_ratio
                            and new_geo.block_of_index(i) < new_geo.payload_blocks)
            fixed_base = bm.allocate(first_new * bs) if first_new else None
        elif img.has_parent:
            state = S.PAYLOAD_BLOCK_ZERO
        else:
            state = S.PAYLOAD_BLOCK_NOT_PRESENT
        # In the last old chunk of a differencing disk, entries past the old payload
        # blocks already exist (Total counts whole chunks): they change too.
        first_block = old_geo.payload_blocks
        lo = min(lo, new_geo.payload_index(first_block)) if first_block < new_geo.payload_blocks else lo
        desired = _entries_bytes(new_geo, lo, hi, state, fixed_base, bs)
        if img.has_parent:
            # Keep the live entries of this range (SB entries of old chunks).
            for i in range(lo, min(hi, old_total)):
                if old_geo.is_sb_index(i):
                    desired[(i - lo) * 8:(i - lo + 1) * 8] = img.bat[i].to_bytes(8, "little")
    else:
        # Drop every payload entry of a block wholly past the new end, and the SB
        # entries of chunks wholly past it.
        keep_blocks = new_geo.payload_blocks
        lo = new_geo.payload_index(keep_blocks) if keep_blocks < old_geo.payload_blocks else old_total
        hi = old_total
        desired = bytearray((hi - lo) * 8)
        for i in range(lo, hi):
            if old_geo.is_sb_index(i) and i < new_total:
                desired[(i - lo) * 8:(i - lo + 1) * 8] = img.bat[i].to_bytes(8, "little")

    bat_region = img.header_section.bat_region
    need_len = _align_up(new_total * 8, MiB)
    move = need_len > bat_region.length
    updates: dict[int, bytes] = {}
    zero_ranges: list[tuple[int, int]] = []
    after_data: list[tuple[int, bytes]] = []
    after_zero: list[tuple[int, int]] = []
    freed: list[tuple[int, int]] = []
    if new_size < old_size:
        freed = _dropped_allocations(img.bat, old_geo, lo, hi, desired)

    if move:
        new_off = bm.allocate(need_len)
        # Fill the new (unreferenced) region directly, then flush: like a new payload
        # block, it must be durable before the logged change that references it.
        old_raw = memoryview(img.bat).cast("B")
        keep = min(lo, old_total) * 8
        for pos in range(0, keep, _COPY_CHUNK):
            disk.storage.pwrite(new_off + pos, old_raw[pos:min(keep, pos + _COPY_CHUNK)])
        if any(desired):
            disk.storage.pwrite(new_off + lo * 8, desired)
        disk.storage.flush()
        regions = [(r.guid, new_off if r.guid == S.BAT_REGION_GUID else r.file_offset,
                    need_len if r.guid == S.BAT_REGION_GUID else r.length, r.required)
                   for r in img.header_section.regions]
        table = build_region_table(regions)
        for base in S.REGION_TABLE_OFFSETS:
            for k in range(0, S.REGION_TABLE_SIZE, SECTOR):
                updates[base + k] = table[k:k + SECTOR]
    else:
        bat_off = bat_region.file_offset
        a, b = bat_off + lo * 8, bat_off + hi * 8
        first_sec, end_sec = a & ~(SECTOR - 1), _align_up(b, SECTOR)
        changed: list[tuple[int, bytes]] = []
        for sec in range(first_sec, end_sec, SECTOR):
            cur = disk.storage.pread(sec, SECTOR).ljust(SECTOR, b"\0")
            new = bytearray(cur)
            s0, s1 = max(sec, a), min(sec + SECTOR, b)
            new[s0 - sec:s1 - sec] = desired[s0 - a:s1 - a]
            if bytes(new) != cur:
                changed.append((sec, bytes(new)))
        data_secs: list[tuple[int, bytes]] = []
        for sec, buf in changed:
            if buf.count(0) == SECTOR:
                if zero_ranges and zero_ranges[-1][0] + zero_ranges[-1][1] == sec:
                    zero_ranges[-1] = (zero_ranges[-1][0], zero_ranges[-1][1] + SECTOR)
                else:
                    zero_ranges.append((sec, SECTOR))
            else:
                data_secs.append((sec, buf))
        if new_size > old_size and (len(data_secs) > _FINAL_BUDGET or len(zero_ranges) > 60):
            # Entries past the live table: invisible until the size changes.
            for k in range(0, len(data_secs), _BATCH_SECTORS):
                lw.transaction(dict(data_secs[k:k + _BATCH_SECTORS]))
            for k in range(0, len(zero_ranges), 100):
                lw.transaction({}, zero_ranges[k:k + 100])
            data_secs, zero_ranges = [], []
        if new_size < old_size and (len(data_secs) > _FINAL_BUDGET or len(zero_ranges) > 60):
            # Entries wholly past the new table end are invisible once the size has
            # changed: they are dropped by later entries (a crash in between leaves
            # only invisible entries, which a later grow overwrites).
            split = _align_up(bat_off + new_total * 8, SECTOR)
            after_data = [(o, b) for o, b in data_secs if o >= split]
            data_secs = [(o, b) for o, b in data_secs if o < split]
            live_z: list[tuple[int, int]] = []
            for o, n in zero_ranges:
                if o + n <= split:
                    live_z.append((o, n))
                elif o >= split:
                    after_zero.append((o, n))
                else:
                    live_z.append((o, split - o))
                    after_zero.append((split, o + n - split))
            zero_ranges = live_z
        if len(data_secs) > _FINAL_BUDGET + 100 or len(zero_ranges) > 100:
            raise VhdxError("the size change needs more BAT sectors than one log entry holds")
        updates.update(data_secs)

    # The Virtual Disk Size item.
    item = md.item(S.VIRTUAL_DISK_SIZE_GUID)
    if item is None:  # required by every open (MS-VHDX 2.6.2.2)
        raise VhdxError(f"{img.path}: no Virtual Disk Size metadata item")
    md_off = img.header_section.metadata_region.file_offset
    pos = md_off + item.offset
    raw = S.build(S.VirtualDiskSize, dict(virtual_disk_size=new_size))
    for sec in range(pos & ~(SECTOR - 1), _align_up(pos + len(raw), SECTOR), SECTOR):
        sector_buf = bytearray(disk.storage.pread(sec, SECTOR).ljust(SECTOR, b"\0"))
        s0, s1 = max(sec, pos), min(sec + SECTOR, pos + len(raw))
        sector_buf[s0 - sec:s1 - sec] = raw[s0 - pos:s1 - pos]
        updates[sec] = bytes(sector_buf)

    lw.transaction(updates, zero_ranges)
    for k in range(0, len(after_data), _BATCH_SECTORS):
        lw.transaction(dict(after_data[k:k + _BATCH_SECTORS]))
    for k in range(0, len(after_zero), 100):
        lw.transaction({}, after_zero[k:k + 100])
    disk.reload()  # closes the log session: nothing can replay past a cut below
    if new_size < old_size:
        _give_back(disk, freed)


def _zero_tail(disk: "WritableDisk", block: int, rel: int, n: int) -> None:
    """Make [rel, rel+n) of ``block`` (sectors past the old end) read zeros.

    FULLY_PRESENT: zeros written in place. PARTIALLY_PRESENT: zeros written, their
    bits set. NOT_PRESENT in a differencing disk: a fresh block (it reads zeros)
    with only those sectors' bits set, so the rest keeps reading the parent.
    """
    bm = disk.blocks
    lss = bm.geometry.logical_sector_size
    e = bm.payload_entry(block)
    state, off = e & S.BAT_STATE_MASK, e & S.BAT_OFFSET_MASK
    if state == S.PAYLOAD_BLOCK_NOT_PRESENT:
        off = bm.allocate(bm.geometry.block_size)
        bm.ensure_bitmap(block // bm.geometry.chunk_ratio)
        bm.set_payload(block, S.PAYLOAD_BLOCK_PARTIALLY_PRESENT, off)
    else:
        disk.storage.pwrite(off + rel, bytes(n))
    if state != S.PAYLOAD_BLOCK_FULLY_PRESENT:
        bm.set_bits(block, rel // lss, n // lss)


def _dropped_allocations(bat: object, geo: Geometry, lo: int, hi: int,
                         desired: bytearray) -> list[tuple[int, int]]:
    """(offset, length) of the blocks whose entries in [lo, hi) the shrink clears."""
    out = []
    # Entries without an offset are skipped in C (a shrink from 64 TiB scans 64 Mi).
    for i, e in iter_nonzero(bat, geo.chunk_ratio, spans=[(lo, hi)]):  # type: ignore[arg-type]
        off = e & S.BAT_OFFSET_MASK
        if not off or int.from_bytes(desired[(i - lo) * 8:(i - lo + 1) * 8], "little"):
            continue
        state = e & S.BAT_STATE_MASK
        if geo.is_sb_index(i):
            if state == S.SB_BLOCK_PRESENT:
                out.append((off, S.SECTOR_BITMAP_BLOCK_SIZE))
        elif state in (S.PAYLOAD_BLOCK_FULLY_PRESENT, S.PAYLOAD_BLOCK_PARTIALLY_PRESENT):
            out.append((off, geo.block_size))
    return out


def _give_back(disk: "WritableDisk", freed: list[tuple[int, int]]) -> None:
    """After a shrink: cut the file after the last region or live block, and punch
    the dropped blocks that lie below that end (where the file system can)."""
    from .filespace import FileSpace, live_end

    img = disk.image
    end = live_end(img)
    space = FileSpace(disk.storage, img.fd)
    if disk.storage.size() > end:
        disk.storage.truncate(end)
        disk.storage.flush()
    for off, n in freed:
        if off < end:
            space.free(off, min(n, end - off))
    disk.blocks.forget_end()  # found again from the file as it now is
    disk.reload()
