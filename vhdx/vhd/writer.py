"""Writing to a VHD / AVHD (``vhdx.open(path, "r+")``): :class:`VhdWritableDisk`.

Crash safety by ordering, without a journal (vhd.md §9). A fixed disk is written
in place. Allocating a block of a dynamic or differencing disk:

1. write the footer at its new position past the new block (the file grows;
   the hole between reads as zeros); barrier. The file still ends in a valid
   footer and the old one (if the new bitmap goes over it) is no longer needed.
2. write the block data, then the sector bitmap (dynamic: the whole block
   marked, its unwritten sectors are zero; differencing: only the sectors
   written); barrier.
3. write the 4-byte BAT entry (one sector write); barrier.

A power cut before 3 leaves the old disk plus unreferenced space; after it,
the new one. The issue text lists "block data, bitmap, BAT entry, then the
moved footer"; the footer moves first here because, in that order, a cut
after the bitmap overwrote the old footer would leave a file without an end
footer (readable only through the copy at offset 0, which libvhdi does not
use). The footer's content never changes on allocation, so its copy at 0 is
never rewritten.

Writing into an allocated block: data; then, for sectors not yet marked in a
differencing disk, barrier and set the bits (setting a bit first would expose
stale zeros over the parent after a cut). Partial-sector writes read the
current sector through the chain first.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence

from ..errors import (
    CorruptImageError,
    InvalidArgumentError,
    UnsupportedFeatureError,
    VhdxError,
)
from ..dependents import invalidated_note, refuse_if_children
from ..storage import FileStorage, Storage
from ..writer import lock_exclusive
from . import structures as S
from .create import next_block_position
from .disk import VhdDisk
from .file import VhdFile

PathLike = str | os.PathLike[str]
_ZERO_CHUNK = bytes(4 << 20)


def _set_bits(bm: bytearray, first: int, count: int) -> None:
    """Mark sectors [first, first+count) in an MSB-first bitmap."""
    end = first + count
    i = first
    while i < end and i & 7:
        bm[i >> 3] |= 0x80 >> (i & 7)
        i += 1
    full = (end - i) >> 3
    if full:
        bm[i >> 3:(i >> 3) + full] = b"\xff" * full
        i += full << 3
    while i < end:
        bm[i >> 3] |= 0x80 >> (i & 7)
        i += 1


class VhdWritableDisk(VhdDisk):
    """A VHD/AVHD opened for writing; parents stay read-only. Not thread-safe.

    ``storage`` replaces the file's own read-write storage (tests record every
    write and flush through a recording storage, tests/storages.py). The file is
    locked as a writer's (:mod:`vhdx.locking`), its parents as readers'. A disk
    that other VHDs depend on (children found by their Parent Unique ID,
    :func:`vhdx.dependents.refuse_if_children`) is refused with
    DependentDisksError unless ``force`` (``disk.warnings`` then names them);
    ``dependents=False`` skips the search (a merge checks its own; a new file
    has none).
    """

    def __init__(self, path: PathLike, *, parents: Sequence[PathLike] | None = None,
                 search_dirs: Sequence[PathLike] = (), ignore_linkage: bool = False,
                 storage: Storage | None = None, force: bool = False, dependents: bool = True) -> None:
        from .chain import find_vhd_children, open_chain

        self._storage = storage if storage is not None else FileStorage.open(path, writable=True)
        try:
            fd = getattr(self._storage, "fd", None)
            if isinstance(fd, int):
                lock_exclusive(fd, os.fspath(path))
            # Parsed through the writer's descriptor: a second open of our own would
            # take a reader's lock that the writer's lock refuses.
            top = VhdFile(path, fd=fd if isinstance(fd, int) else None)
            chain, warnings = open_chain(path, parents, search_dirs, ignore_linkage, top=top)
        except BaseException:
            self._storage.close()
            raise
        super().__init__(chain, warnings)  # type: ignore[arg-type]
        try:
            if dependents:
                children = refuse_if_children(path, "writing", search_dirs, force=force,
                                              chain=[f.path for f in chain[1:]], find=find_vhd_children)
                if children:
                    self.warnings.append(f"{os.fspath(path)}: opened with force; writes make its children "
                                         + invalidated_note(children))
            self._prepare()
        except BaseException:
            self.close()
            raise

    def writable(self) -> bool:
        return True

    def _prepare(self) -> None:
        top = self.top
        if top.footer.saved_state:
            raise VhdxError(f"{top.path}: the disk is in a saved state; refusing to write")
        self._footer = top.footer_raw
        if top.is_fixed:
            return
        self._spb = top.sectors_per_block
        self._bm = top.bitmap_size
        span = self._bm + top.block_size
        ends = [e * S.SECTOR + span for e in top.bat if e != S.UNUSED]
        starts = sorted(e * S.SECTOR for e in top.bat if e != S.UNUSED)
        if any(b - a < span for a, b in itertools.pairwise(starts)):
            raise CorruptImageError(f"{top.path}: blocks overlap; refusing to write (run vhdx check)")
        locs = [x["data_offset"] + x["data_length"] for x in top.locators if not x.get("problem")]
        meta_end = max([top.header_offset + S.HEADER_SIZE, top.table_offset + 4 * top.max_table_entries]
                       + locs + ends)
        # Next bitmap: where the footer is now when it follows everything (a file we
        # wrote, or Windows'), else past everything.
        self._next = max(meta_end, top.footer_offset if top.footer_where.startswith("end") else 0)
        if not top.footer_where.startswith("end") or top.footer_offset != top.file_size - S.FOOTER_SIZE:
            # The end footer was lost (a cut in another writer) or is the 511-byte
            # kind: put a full one at the end again before anything else.
            self._write_footer(max(self._next, top.file_size))
            self.warnings.append(f"{top.path}: the footer at the end of the file was rewritten")

    # --- low-level I/O -------------------------------------------------------------
    def _pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._storage.pwrite(offset, data)

    def _barrier(self) -> None:
        self._storage.flush()

    def _write_footer(self, offset: int) -> None:
        self._pwrite(offset, self._footer)
        self._barrier()
        top = self.top
        top.footer_offset = offset
        top.file_size = max(top.file_size, offset + S.FOOTER_SIZE)
        self._next = offset

    # --- writes --------------------------------------------------------------------
    def write_at(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        """Write ``data`` at virtual ``offset``; returns its length."""
        if self.closed:
            raise ValueError("I/O operation on closed disk")
        mv = memoryview(data).cast("B")
        n = len(mv)
        if offset < 0 or offset + n > self.size:
            raise InvalidArgumentError(f"write of {n} bytes at {offset} is outside the disk ({self.size} bytes)")
        if n == 0:
            return 0
        lo, hi = offset // S.SECTOR * S.SECTOR, -(-(offset + n) // S.SECTOR) * S.SECTOR
        if lo != offset or hi != offset + n:
            # Partial sectors: read what they hold now (through the chain) and patch.
            buf = bytearray(self.read_at(lo, hi - lo))
            buf[offset - lo:offset - lo + n] = mv
            mv, offset = memoryview(buf), lo
        self._write_sectors(offset, mv)
        return n

    def write_zeroes_at(self, offset: int, length: int) -> None:
        """Make [offset, offset+length) read zeros. Unallocated blocks of a dynamic
        disk already do and stay unallocated; a differencing disk stores the zeros
        (they must hide the parent)."""
        end = offset + length
        if offset < 0 or length < 0 or end > self.size:
            raise InvalidArgumentError(f"zero range {offset}+{length} is outside the disk")
        top = self.top
        pos = offset
        while pos < end:
            if not top.is_fixed and not top.has_parent:
                bs = top.block_size
                bend = min(end, (pos // bs + 1) * bs)
                if top.bat[pos // bs] == S.UNUSED:
                    pos = bend
                    continue
            else:
                bend = end
            k = min(bend - pos, len(_ZERO_CHUNK))
            self.write_at(pos, memoryview(_ZERO_CHUNK)[:k])
            pos += k

    def _write_sectors(self, offset: int, mv: memoryview) -> None:
        top = self.top
        if top.is_fixed:
            self._pwrite(offset, mv)
            return
        bs = top.block_size
        pos, end = offset, offset + len(mv)
        while pos < end:
            block = pos // bs
            bstart = block * bs
            k = min(end, bstart + bs) - pos
            piece = mv[pos - offset:pos - offset + k]
            if top.bat[block] == S.UNUSED:
                self._allocate(block, pos - bstart, piece)
            else:
                self._write_in_block(block, pos - bstart, piece)
            self._maps.pop(block, None)
            pos += k

    def _allocate(self, block: int, rel: int, piece: memoryview) -> None:
        top = self.top
        bitmap_off, data_off = next_block_position(self._next, self._bm)
        new_footer = data_off + top.block_size + 4096 - self._bm  # the next block's bitmap slot
        self._write_footer(new_footer)                            # 1. file grows, ends in a footer
        self._pwrite(data_off + rel, piece)                       # 2. data ...
        bm = bytearray(self._bm)
        if top.has_parent:
            _set_bits(bm, rel // S.SECTOR, len(piece) // S.SECTOR)
        else:
            _set_bits(bm, 0, self._spb)
        self._pwrite(bitmap_off, bm)                              # ... and its bitmap
        self._barrier()
        entry = bitmap_off // S.SECTOR
        self._pwrite(top.table_offset + 4 * block, entry.to_bytes(4, "big"))  # 3. reachable
        self._barrier()
        top.bat[block] = entry
        top.forget_block(block)

    def _write_in_block(self, block: int, rel: int, piece: memoryview) -> None:
        top = self.top
        base = top.bat[block] * S.SECTOR
        self._pwrite(base + self._bm + rel, piece)
        first, count = rel // S.SECTOR, len(piece) // S.SECTOR
        runs = top.block_runs(block)
        if all(present for s, n, present in runs if s < first + count and s + n > first):
            return
        if top.has_parent:
            self._barrier()  # the data must be durable before the bits expose it
        self._mark(block, base, [(first, count)])  # only the bitmap sectors that change

    # --- merge support ---------------------------------------------------------------
    def prepare_masked(self, wanted: dict[int, list[tuple[int, int]]]) -> dict[int, int]:
        """Make blocks ready to receive merged data; returns block -> data offset.

        ``wanted``: block -> sector runs [(first, count)] that will be written.
        Only for content masked by the files above (a merge): the chain reads the
        same whatever lands, so ordering only keeps this file valid - the new end
        footer and bitmaps are durable before the BAT entries that reach them (two
        barriers per call, not three per block). The caller writes the data and
        flushes before anything stops masking it.
        """
        top = self.top
        out: dict[int, int] = {}
        new: list[tuple[int, int, int]] = []  # (block, bitmap offset, data offset)
        nxt = self._next
        for block in sorted(wanted):
            e = top.bat[block]
            if e != S.UNUSED:
                out[block] = e * S.SECTOR + self._bm
                if top.has_parent:
                    self._mark(block, e * S.SECTOR, wanted[block])
                continue
            bitmap_off, data_off = next_block_position(nxt, self._bm)
            nxt = data_off + top.block_size
            new.append((block, bitmap_off, data_off))
            out[block] = data_off
        if not new:
            return out
        self._write_footer(nxt + 4096 - self._bm)
        for block, bitmap_off, _ in new:
            bm = bytearray(self._bm)
            if top.has_parent:
                for first, count in wanted[block]:
                    _set_bits(bm, first, count)
            else:
                _set_bits(bm, 0, self._spb)
            self._pwrite(bitmap_off, bm)
        self._barrier()
        run: list[int] = []  # consecutive blocks' entries go out as one write
        for j, (block, bitmap_off, _) in enumerate(new):
            entry = bitmap_off // S.SECTOR
            run.append(entry)
            top.bat[block] = entry
            top.forget_block(block)
            self._maps.pop(block, None)
            if j + 1 == len(new) or new[j + 1][0] != block + 1:
                first = block + 1 - len(run)
                self._pwrite(top.table_offset + 4 * first, b"".join(e.to_bytes(4, "big") for e in run))
                run = []
        return out

    def _mark(self, block: int, base: int, runs: list[tuple[int, int]]) -> None:
        bm = bytearray(self._storage.pread(base, self._bm).ljust(self._bm, b"\0"))
        old = bytes(bm)
        for first, count in runs:
            _set_bits(bm, first, count)
        for s in range(0, self._bm, S.SECTOR):
            if bm[s:s + S.SECTOR] != old[s:s + S.SECTOR]:
                self._pwrite(base + s, bm[s:s + S.SECTOR])
        self.top.forget_block(block)
        self._maps.pop(block, None)

    @property
    def storage(self) -> Storage:
        return self._storage

    # --- lifecycle -----------------------------------------------------------------
    def flush(self) -> None:
        if not self.closed:
            self._barrier()

    def close(self) -> None:
        if getattr(self, "_storage", None) is not None and not self.closed:
            try:
                self._barrier()
            finally:
                super().close()
                self._storage.close()
                self._storage = None  # type: ignore[assignment]  # closed: nothing to write through
        else:
            super().close()

    def resize(self, size: int) -> None:
        raise UnsupportedFeatureError(f"{self.path}: resizing a VHD is not supported")
