"""Writable VHDX/AVHDX disks: payload written in place, metadata through the log.

Followed: MS-VHDX 2.2.2 (header session rules, via log_writer), 2.3 (every
metadata change through the log), 2.5 (BAT states) and FORMAT.md §7 (write
ordering): new blocks are allocated 1 MiB-aligned at the end of the file, which
reads as zeros; payload is written (and flushed by the transaction) before the
logged BAT / sector-bitmap change that makes it visible.

Block transitions on a write (FORMAT.md §8.1 semantics preserved):
- FULLY_PRESENT: written in place;
- PARTIALLY_PRESENT: written in place, sector-bitmap bits set;
- NOT_PRESENT in a differencing disk, partial write: new block, only the written
  sectors present (PARTIALLY_PRESENT; the parent's data is never copied);
- any other case: new block, FULLY_PRESENT (the rest reads zeros, as before).

Metadata changes accumulate in memory and are committed as one log entry per
``flush()`` (or sooner when they would outgrow the log); until then the file's
on-disk BAT still describes the old contents, so a crash loses only unflushed
writes, never consistency.
"""

from __future__ import annotations

import os
import uuid
from typing import Callable, Sequence

from . import structures as S
from .bat import iter_nonzero
from .chain import open_parents
from .disk import Extent, VirtualDisk
from .errors import InvalidArgumentError, LockedError, ReadOnlyError, VhdxError, naming
from .image import ImageFile
from .log_writer import LogWriter
from .storage import FileStorage, Storage

SECTOR = S.LOG_SECTOR_SIZE
MiB = S.MiB
# Headroom (in 4 KiB log sectors) kept free for one more block's changes: a BAT sector,
# its chunk's SB entry sector and up to 16 bitmap sectors (256 MiB blocks), plus the
# entry's descriptor sectors.
_PENDING_HEADROOM = 24
_ZERO_CHUNK = bytes(4 * MiB)


def _align_up(n: int, a: int) -> int:
    return -(-n // a) * a


def storage_fd(storage: Storage) -> int:
    """The OS descriptor behind a storage: its ``fd`` (a wrapper forwards its inner one)."""
    fd = getattr(storage, "fd", None)
    if not isinstance(fd, int):
        raise InvalidArgumentError("the writer needs a file-backed storage")
    return fd


def lock_exclusive(fd: int, path: str) -> None:
    """A writer's locks (flock + QEMU's byte-range locks, :mod:`vhdx.locking`);
    LockedError when another holder (reader or writer, vhdx or QEMU) exists."""
    from .locking import lock_image

    lock_image(fd, path, write=True)


class WritableDisk(VirtualDisk):
    """A VHDX/AVHDX opened for writing (``vhdx.open(path, "r+")``).

    Reads see every write made so far. ``write_at``/``write_zeroes_at`` change the
    virtual disk; ``flush()`` makes everything durable; ``close()`` flushes and
    marks the log clean. Not thread-safe.

    ``standalone=True`` opens the file without its parents, for work that never
    reads through them (metadata edits, whole-sector merges): reads, and partial-
    sector writes that would need the parent's data, then raise.
    """

    def __init__(self, path: str | os.PathLike[str], *,
                 parents: Sequence[str | os.PathLike[str]] | None = None,
                 search_dirs: Sequence[str | os.PathLike[str]] = (),
                 ignore_linkage: bool = False, storage: Storage | None = None,
                 guid_factory: Callable[[], uuid.UUID] | None = None,
                 standalone: bool = False,
                 confine: Sequence[str | os.PathLike[str]] | None = None) -> None:
        path = os.fspath(path)
        own_storage = storage is None
        storage = storage if storage is not None else FileStorage.open(path, writable=True)
        try:
            fd = storage_fd(storage)
            lock_exclusive(fd, path)
            kwargs = {"guid_factory": guid_factory} if guid_factory else {}
            self.log = LogWriter.open(storage, **kwargs)  # replays a dirty log first (FORMAT.md §6.4)
            img = ImageFile(path, fd=fd)
            ancestors, warnings = ([], []) if standalone else open_parents(
                img, parents, search_dirs, ignore_linkage, confine=confine)
        except BaseException as e:
            if own_storage:
                storage.close()
            if isinstance(e, VhdxError):
                raise naming(e, path) from None
            raise
        self.storage = storage
        self._own_storage = own_storage
        super().__init__([img, *ancestors], [f"{path}: {w}" for w in img.warnings] + warnings)
        self._parent = VirtualDisk(ancestors) if ancestors else None
        self._standalone = standalone and img.has_parent
        bat_region = img.header_section.bat_region
        self._bat_offset = bat_region.file_offset
        self._bat_bytes = memoryview(img.bat).cast("B") if isinstance(img.bat, memoryview) else None
        if self._bat_bytes is None:
            raise VhdxError("writing is supported on little-endian hosts only")
        self._pending_bat: set[int] = set()
        self._pending_bat_sectors: set[int] = set()
        # Commit before a log entry could outgrow the log (FORMAT.md §6.5 step 2).
        self._max_pending = max(1, self.log.max_entry_length // SECTOR - _PENDING_HEADROOM)
        self._pending_sb: dict[int, bytearray] = {}  # 4 KiB file offset -> sector image
        self._runs_stale: set[int] = set()
        self._alloc_end = -1  # found on the first allocation: a metadata edit never scans the BAT

    # --- state ---------------------------------------------------------------------
    @property
    def image(self) -> ImageFile:
        return self.chain[0]

    def writable(self) -> bool:
        return not self.closed

    def _compute_alloc_end(self) -> int:
        img = self.image
        end = max(img.file_size, img.logical_size)
        for s, e, _ in img._reserved_spans():
            end = max(end, e)
        geo = img.geometry
        for i, entry in iter_nonzero(img.bat, spans=img.bat_spans):
            off = entry & S.BAT_OFFSET_MASK
            if off:
                size = S.SECTOR_BITMAP_BLOCK_SIZE if geo.is_sb_index(i) else geo.block_size
                end = max(end, off + size)
        return _align_up(end, MiB)

    def _allocate(self, size: int) -> int:
        """A fresh 1 MiB-aligned range at the end of the file, reading zeros (FORMAT.md §7 rule 5a, 9)."""
        if self._alloc_end < 0:
            self._alloc_end = self._compute_alloc_end()
        off = self._alloc_end
        self._alloc_end = off + _align_up(size, MiB)
        if self.storage.size() < self._alloc_end:
            self.storage.truncate(self._alloc_end)
        return off

    def _set_entry(self, index: int, value: int) -> None:
        self.image.bat[index] = value
        self.image.note_bat_entry(index)
        self._pending_bat.add(index)
        self._pending_bat_sectors.add((self._bat_offset + 8 * index) // SECTOR)

    def _commit_due(self) -> bool:
        """True when the pending metadata nears what one log entry can carry."""
        return len(self._pending_bat_sectors) + len(self._pending_sb) > self._max_pending

    def _reload_top(self) -> None:
        """Re-read the top file after a layout change (size, BAT location).

        The log session is closed first (LogGuid = 0, everything applied), so the new
        :class:`ImageFile` parses the file as it is; the next change starts a new
        session with the same FileWriteGuid (and no second DataWriteGuid).
        """
        self.log.close()
        old = self.chain[0]
        img = ImageFile(old.path, fd=old.fd)
        old.fd = -1  # borrowed descriptor: ImageFile.close() must not touch it
        old.close()
        self.chain[0] = img
        self._refresh()
        self._bat_offset = img.header_section.bat_region.file_offset
        self._bat_bytes = memoryview(img.bat).cast("B")
        self._pending_bat.clear()
        self._pending_bat_sectors.clear()
        self._pending_sb.clear()
        self._runs_stale.clear()
        if self._alloc_end >= 0:
            self._alloc_end = max(self._alloc_end, self._compute_alloc_end())

    def _sb_sector(self, file_offset: int) -> bytearray:
        sec = self._pending_sb.get(file_offset)
        if sec is None:
            sec = bytearray(self.storage.pread(file_offset, SECTOR).ljust(SECTOR, b"\0"))
            self._pending_sb[file_offset] = sec
        return sec

    def _ensure_sb(self, chunk: int) -> int:
        geo = self.image.geometry
        idx = geo.sb_index(chunk)
        e = self.image.bat[idx]
        if e & S.BAT_STATE_MASK == S.SB_BLOCK_PRESENT:
            return e & S.BAT_OFFSET_MASK
        off = self._allocate(S.SECTOR_BITMAP_BLOCK_SIZE)  # reads zeros: no bit set (FORMAT.md §7 rule 6)
        self._set_entry(idx, S.bat_entry(S.SB_BLOCK_PRESENT, off))
        return off

    def _bit(self, block: int, sector: int) -> bool:
        """Current sector-bitmap bit (pending state included) of a PARTIALLY_PRESENT block."""
        geo = self.image.geometry
        sb = self.image.bat[geo.sb_index(block // geo.chunk_ratio)] & S.BAT_OFFSET_MASK
        start, _ = geo.bitmap_slice(block)
        byte = sb + start + sector // 8
        sec = self._pending_sb.get(byte & ~(SECTOR - 1))
        value = sec[byte % SECTOR] if sec is not None else self.storage.pread(byte, 1)[0]
        return bool(value >> (sector % 8) & 1)

    def _set_bits(self, block: int, first: int, count: int) -> None:
        """Set bits [first, first+count) of ``block``'s slice of its chunk's sector bitmap."""
        geo = self.image.geometry
        sb = self._ensure_sb(block // geo.chunk_ratio)
        start, _ = geo.bitmap_slice(block)
        base = (sb + start) * 8  # absolute bit address in the file
        lo, hi = base + first, base + first + count
        while lo < hi:
            sector_off = (lo // 8) & ~(SECTOR - 1)
            sec = self._sb_sector(sector_off)
            sec_hi = min(hi, (sector_off + SECTOR) * 8)
            b0, b1 = lo - sector_off * 8, sec_hi - sector_off * 8
            # Whole bytes in one slice assignment; edge bits one by one.
            while b0 < b1 and b0 % 8:
                sec[b0 // 8] |= 1 << (b0 % 8)
                b0 += 1
            full = (b1 - b0) // 8
            sec[b0 // 8:b0 // 8 + full] = b"\xff" * full
            b0 += full * 8
            while b0 < b1:
                sec[b0 // 8] |= 1 << (b0 % 8)
                b0 += 1
            lo = sec_hi
        self._runs_stale.add(block)

    # --- reading the current contents (pending state included) ---------------------
    def _read_current(self, offset: int, size: int) -> bytes:
        """Virtual bytes as they are now, for read-modify-write of partial sectors."""
        img = self.image
        geo = img.geometry
        lss = geo.logical_sector_size
        out = bytearray()
        pos, end = offset, offset + size
        while pos < end:
            block = pos // geo.block_size
            bstart = block * geo.block_size
            e = img.bat[geo.payload_index(block)]
            state = e & S.BAT_STATE_MASK
            n = min(end, (pos // lss + 1) * lss) - pos  # at most to the end of this sector
            if state == S.PAYLOAD_BLOCK_FULLY_PRESENT or (
                    state == S.PAYLOAD_BLOCK_PARTIALLY_PRESENT and self._bit(block, (pos - bstart) // lss)):
                out += self.storage.pread((e & S.BAT_OFFSET_MASK) + pos - bstart, n).ljust(n, b"\0")
            elif state in (S.PAYLOAD_BLOCK_NOT_PRESENT, S.PAYLOAD_BLOCK_PARTIALLY_PRESENT) and (
                    self._parent or self._standalone):
                self._need_parents()
                out += self._parent.read_at(pos, n).ljust(n, b"\0")
            else:
                out += bytes(n)
            pos += n
        return bytes(out)

    def _need_parents(self) -> None:
        if self._standalone:
            raise InvalidArgumentError(f"{self.image.path} was opened without its parents")

    def readinto_at(self, offset: int, buffer) -> int:  # noqa: ANN001
        self._need_parents()
        self._commit()  # reads go through the committed on-disk state
        return super().readinto_at(offset, buffer)

    def read_at(self, offset: int, size: int) -> bytes:
        self._need_parents()
        self._commit()
        return super().read_at(offset, size)

    def extents(self, offset: int = 0, length: int | None = None) -> list[Extent]:
        # Pending sector bitmaps live in memory only; the map reads them from the file.
        self._commit()
        return super().extents(offset, length)

    # --- writing -------------------------------------------------------------------
    def _check_range(self, offset: int, length: int) -> None:
        if self.closed:
            raise ValueError("I/O operation on closed disk")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise InvalidArgumentError(
                f"write {offset:#x}+{length:#x} lies outside the virtual disk (size {self.size:#x})")

    def write_at(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        """Write ``data`` at virtual ``offset``; returns its length."""
        mv = memoryview(data).cast("B")
        self._check_range(offset, len(mv))
        if not len(mv):
            return 0
        self.log.mark_data_changed()  # new DataWriteGuid before the first visible change (FORMAT.md §7 rule 3)
        geo = self.image.geometry
        pos, end = offset, offset + len(mv)
        while pos < end:
            block = pos // geo.block_size
            bstart = block * geo.block_size
            n = min(end, bstart + geo.block_length(block)) - pos
            self._write_block(block, bstart, pos, mv[pos - offset:pos - offset + n])
            pos += n
            if self._commit_due():
                self._commit()
        return len(mv)

    def _write_block(self, block: int, bstart: int, pos: int, chunk: memoryview) -> None:
        img = self.image
        geo = img.geometry
        lss = geo.logical_sector_size
        idx = geo.payload_index(block)
        e = img.bat[idx]
        state = e & S.BAT_STATE_MASK
        foff = e & S.BAT_OFFSET_MASK
        n = len(chunk)
        if state == S.PAYLOAD_BLOCK_FULLY_PRESENT:
            self.storage.pwrite(foff + pos - bstart, chunk)
            return
        whole = pos == bstart and n == geo.block_length(block)
        deferring = state in (S.PAYLOAD_BLOCK_NOT_PRESENT, S.PAYLOAD_BLOCK_PARTIALLY_PRESENT) and img.has_parent
        if deferring and not whole:
            # Sector-granular: only the written sectors become present (PARTIALLY_PRESENT).
            a, b = pos // lss * lss, _align_up(pos + n, lss)
            if (a, b) != (pos, pos + n):
                buf = bytearray(self._read_current(a, pos - a)) + chunk + self._read_current(pos + n, b - pos - n)
            else:
                buf = chunk
            if state == S.PAYLOAD_BLOCK_NOT_PRESENT:
                foff = self._allocate(geo.block_size)
                self._ensure_sb(block // geo.chunk_ratio)
                self._set_entry(idx, S.bat_entry(S.PAYLOAD_BLOCK_PARTIALLY_PRESENT, foff))
            self.storage.pwrite(foff + a - bstart, buf)
            self._set_bits(block, (a - bstart) // lss, (b - a) // lss)
            return
        if state == S.PAYLOAD_BLOCK_PARTIALLY_PRESENT:  # whole-block overwrite
            self.storage.pwrite(foff, chunk)
            self._set_entry(idx, S.bat_entry(S.PAYLOAD_BLOCK_FULLY_PRESENT, foff))
            return
        # NOT_PRESENT (no parent, or whole block), ZERO, UNDEFINED, UNMAPPED: the rest of
        # the block reads zeros now and in the fresh allocation.
        new = self._allocate(geo.block_size)
        self.storage.pwrite(new + pos - bstart, chunk)
        self._set_entry(idx, S.bat_entry(S.PAYLOAD_BLOCK_FULLY_PRESENT, new))

    def write_zeroes_at(self, offset: int, length: int, *, discard: bool = False) -> None:
        """Make [offset, offset+length) read zeros.

        Whole blocks become ZERO (or UNMAPPED with ``discard``) without writing
        data; a fixed disk keeps its blocks and gets zeros written in place. The
        partial blocks at the edges get zeros written (``discard`` leaves them alone:
        a discard is advisory).
        """
        self._check_range(offset, length)
        if not length:
            return
        self.log.mark_data_changed()
        img = self.image
        geo = img.geometry
        pos, end = offset, offset + length
        while pos < end:
            block = pos // geo.block_size
            bstart = block * geo.block_size
            blen = geo.block_length(block)
            n = min(end, bstart + blen) - pos
            whole = pos == bstart and n == blen
            if whole and not img.is_fixed:
                state = S.PAYLOAD_BLOCK_UNMAPPED if discard else S.PAYLOAD_BLOCK_ZERO
                self._set_entry(geo.payload_index(block), S.bat_entry(state, 0))
                self._runs_stale.add(block)
            elif not discard or img.is_fixed:
                done = 0
                while done < n:
                    k = min(len(_ZERO_CHUNK), n - done)
                    self._write_block(block, bstart, pos + done, memoryview(_ZERO_CHUNK)[:k])
                    done += k
            pos += n
            if self._commit_due():
                self._commit()

    # --- metadata --------------------------------------------------------------------
    def update_metadata_items(self, changes: dict[tuple[uuid.UUID, bool], bytes]) -> None:
        """Replace the data of existing metadata items, through the log (MS-VHDX 2.6).

        Items keep their offsets when the new data fits; a longer one moves to free
        space after the last item. Only the 4 KiB sectors that change are logged.
        Does not rotate DataWriteGuid: callers changing user-visible items call
        ``self.log.mark_data_changed()`` themselves (FORMAT.md §2.2 exception for the
        parent locator).
        """
        img = self.image
        region = img.header_section.metadata_region
        items = list(img.metadata.items)
        keys = {(it.item_id, it.is_user): i for i, it in enumerate(items)}
        for key in changes:
            if key not in keys:
                raise InvalidArgumentError(f"metadata item {key[0]} does not exist")
        from .metadata import MetadataItem

        end = max([S.METADATA_TABLE_SIZE] + [it.offset + it.length for it in items if it.length])
        for key, data in changes.items():
            old = items[keys[key]]
            offset = old.offset
            if len(data) > old.length or not old.length:
                offset = _align_up(end, 8)
                end = offset + len(data)
                if end > region.length:
                    raise VhdxError("no room left in the metadata region for the updated item")
            items[keys[key]] = MetadataItem(old.item_id, offset, len(data), old.flags, bytes(data))
        table = S.build(S.MetadataTable, dict(
            header=dict(reserved=0, entry_count=len(items)),
            entries=[dict(item_id=it.item_id, offset=it.offset, length=it.length, flags=it.flags,
                          reserved=0) for it in items]))
        writes = [(0, table)] + [(it.offset, it.data) for key, it in
                                 ((k, items[keys[k]]) for k in changes)]
        sectors: dict[int, bytearray] = {}
        for rel, data in writes:
            pos = 0
            while pos < len(data):
                absolute = region.file_offset + rel + pos
                sector = absolute & ~(SECTOR - 1)
                if sector not in sectors:
                    sectors[sector] = bytearray(self.storage.pread(sector, SECTOR).ljust(SECTOR, b"\0"))
                k = min(len(data) - pos, sector + SECTOR - absolute)
                sectors[sector][absolute - sector:absolute - sector + k] = data[pos:pos + k]
                pos += k
        self._commit()
        self.log.transaction({off: bytes(buf) for off, buf in sectors.items()})
        img.metadata.items[:] = items
        if any(k == (S.PARENT_LOCATOR_GUID, False) for k in changes):
            from .metadata import parse_parent_locator

            img.metadata.parent_locator = parse_parent_locator(changes[(S.PARENT_LOCATOR_GUID, False)])

    def update_parent_locator(self, changes: dict[str, str | None]) -> dict[str, str]:
        """Set (or with None, remove) parent locator keys; returns the new locator."""
        img = self.image
        if not img.has_parent:
            raise InvalidArgumentError(f"{img.path} is not a differencing disk")
        pairs = dict(img.parent_locator or {})
        for k, v in changes.items():
            if v is None:
                pairs.pop(k, None)
            else:
                pairs[k] = v
        if "parent_linkage" not in pairs:
            raise InvalidArgumentError("parent_linkage cannot be removed")
        self.update_metadata_items({(S.PARENT_LOCATOR_GUID, False): S.build_parent_locator(pairs)})
        return pairs

    # --- io.RawIOBase --------------------------------------------------------------
    def write(self, data) -> int:  # noqa: ANN001
        n = self.write_at(self._pos, data)
        self._pos += n
        return n

    # --- durability ------------------------------------------------------------------
    def _commit(self) -> None:
        """Log and apply every pending BAT / sector-bitmap change in one entry."""
        if not self._pending_bat and not self._pending_sb:
            return
        img = self.image
        raw = self._bat_bytes
        bat_end = self._bat_offset + len(raw)
        updates: dict[int, bytes] = {}
        for idx in self._pending_bat:
            sector = (self._bat_offset + 8 * idx) & ~(SECTOR - 1)
            if sector in updates:
                continue
            lo, hi = max(sector, self._bat_offset), min(sector + SECTOR, bat_end)
            buf = bytearray(self.storage.pread(sector, SECTOR).ljust(SECTOR, b"\0"))
            buf[lo - sector:hi - sector] = raw[lo - self._bat_offset:hi - self._bat_offset]
            updates[sector] = bytes(buf)
        for off, sec in self._pending_sb.items():
            updates[off] = bytes(sec)
        self.log.transaction(updates)
        self._pending_bat.clear()
        self._pending_bat_sectors.clear()
        self._pending_sb.clear()
        with img._lock:
            for block in self._runs_stale:
                img._runs.pop(block, None)
        self._runs_stale.clear()
        self._maps.clear()  # resolved block maps describe the old state

    def resize(self, new_size: int) -> None:
        """Grow or shrink the virtual disk (see :mod:`vhdx.resize`); one logged change."""
        from .resize import resize

        resize(self, new_size)

    def flush(self) -> None:
        """Make every write so far durable (payload, then one logged metadata entry)."""
        if self.closed or self.chain[0].closed:
            return
        self._commit()
        if self.storage.dirty:  # nothing written since the last barrier: no fsync
            self.storage.flush()

    def close(self) -> None:
        if self.closed or self.chain[0].closed:
            return
        try:
            self.flush()
            self.log.close()  # clean close: LogGuid = 0 (FORMAT.md §6.5 step 3)
        finally:
            super().close()  # closes the ImageFiles (not the borrowed descriptor)
            if self._own_storage:
                self.storage.close()


def open_writable(path: str | os.PathLike[str], **kwargs) -> WritableDisk:  # noqa: ANN003
    """``vhdx.open(path, "r+")``."""
    return WritableDisk(path, **kwargs)


__all__ = ["WritableDisk", "open_writable", "ReadOnlyError"]
