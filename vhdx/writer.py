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
from typing import Any, Callable, Sequence

from . import structures as S
from .blockmap import BlockMap
from .chain import open_parents
from .disk import VirtualDisk
from .errors import InvalidArgumentError, ReadOnlyError, VhdxError, naming
from .image import Extent, ImageFile
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
        # Commit before a log entry could outgrow the log (FORMAT.md §6.5 step 2).
        self.blocks = BlockMap(img, storage, self.log,
                               max_pending=self.log.max_entry_length // SECTOR - _PENDING_HEADROOM)

    # --- state ---------------------------------------------------------------------
    @property
    def image(self) -> ImageFile:
        return self.chain[0]

    @property
    def parent_disk(self) -> VirtualDisk | None:
        """The parent chain as one disk (None for a base disk or a standalone open)."""
        return self._parent

    def writable(self) -> bool:
        return not self.closed

    # The pending sets by their old names (tests/test_merge.py counts commits by them).
    @property
    def _pending_bat(self) -> frozenset[int]:
        return self.blocks.pending_entries

    @property
    def _pending_bat_sectors(self) -> frozenset[int]:
        return self.blocks.pending_bat_sectors

    @property
    def _pending_sb(self) -> frozenset[int]:
        return self.blocks.pending_bitmap_sectors

    def reload(self) -> None:
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
        self.blocks.rebind(img)

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
            e = self.blocks.payload_entry(block)
            state = e & S.BAT_STATE_MASK
            n = min(end, (pos // lss + 1) * lss) - pos  # at most to the end of this sector
            if state == S.PAYLOAD_BLOCK_FULLY_PRESENT or (
                    state == S.PAYLOAD_BLOCK_PARTIALLY_PRESENT and self.blocks.bit(block, (pos - bstart) // lss)):
                out += self.storage.pread((e & S.BAT_OFFSET_MASK) + pos - bstart, n).ljust(n, b"\0")
            elif state in (S.PAYLOAD_BLOCK_NOT_PRESENT, S.PAYLOAD_BLOCK_PARTIALLY_PRESENT) and (
                    self._parent or self._standalone):
                self._need_parents()
                assert self._parent is not None  # standalone opens refused just above
                out += self._parent.read_at(pos, n).ljust(n, b"\0")
            else:
                out += bytes(n)
            pos += n
        return bytes(out)

    def _need_parents(self) -> None:
        if self._standalone:
            raise InvalidArgumentError(f"{self.image.path} was opened without its parents")

    def readinto_at(self, offset: int, buffer: Any) -> int:
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
            if self.blocks.commit_due():
                self._commit()
        return len(mv)

    def _write_block(self, block: int, bstart: int, pos: int, chunk: memoryview) -> None:
        img = self.image
        bm = self.blocks
        geo = img.geometry
        lss = geo.logical_sector_size
        e = bm.payload_entry(block)
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
            buf: bytes | bytearray | memoryview = chunk
            if (a, b) != (pos, pos + n):
                buf = bytearray(self._read_current(a, pos - a)) + chunk + self._read_current(pos + n, b - pos - n)
            if state == S.PAYLOAD_BLOCK_NOT_PRESENT:
                foff = bm.allocate(geo.block_size)
                bm.ensure_bitmap(block // geo.chunk_ratio)
                bm.set_payload(block, S.PAYLOAD_BLOCK_PARTIALLY_PRESENT, foff)
            self.storage.pwrite(foff + a - bstart, buf)
            bm.set_bits(block, (a - bstart) // lss, (b - a) // lss)
            return
        if state == S.PAYLOAD_BLOCK_PARTIALLY_PRESENT:  # whole-block overwrite
            self.storage.pwrite(foff, chunk)
            bm.set_payload(block, S.PAYLOAD_BLOCK_FULLY_PRESENT, foff)
            return
        # NOT_PRESENT (no parent, or whole block), ZERO, UNDEFINED, UNMAPPED: the rest of
        # the block reads zeros now and in the fresh allocation.
        new = bm.allocate(geo.block_size)
        self.storage.pwrite(new + pos - bstart, chunk)
        bm.set_payload(block, S.PAYLOAD_BLOCK_FULLY_PRESENT, new)

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
                self.blocks.set_payload(block, state)
            elif not discard or img.is_fixed:
                done = 0
                while done < n:
                    k = min(len(_ZERO_CHUNK), n - done)
                    self._write_block(block, bstart, pos + done, memoryview(_ZERO_CHUNK)[:k])
                    done += k
            pos += n
            if self.blocks.commit_due():
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
    def write(self, data: Any) -> int:
        n = self.write_at(self._pos, data)
        self._pos += n
        return n

    # --- durability ------------------------------------------------------------------
    def _commit(self) -> None:
        """Log and apply every pending BAT / sector-bitmap change in one entry."""
        if self.blocks.commit():
            self._maps.clear()  # resolved block maps describe the old state

    def commit(self) -> None:
        """Log the pending block-map changes now (one log entry; its pre-write barrier
        makes the payload written so far durable first). No fsync of its own."""
        self._commit()

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


def open_writable(path: str | os.PathLike[str], **kwargs: Any) -> WritableDisk:
    """``vhdx.open(path, "r+")``."""
    return WritableDisk(path, **kwargs)


__all__ = ["WritableDisk", "open_writable", "ReadOnlyError"]
