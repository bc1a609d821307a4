"""Give a disk's unused space back (``Optimize-VHD``): drop, then pack, then truncate.

1. **Drop** (BAT and sector-bitmap changes through the log, MS-VHDX 2.5.1):
   in a base disk, FULLY_PRESENT blocks that read all zeros become ZERO; in a
   differencing disk, blocks whose bytes equal what the parent chain reads there
   become NOT_PRESENT (their bitmap bits cleared, so that a later partial write
   cannot expose stale bits), other all-zero blocks ZERO, and in PARTIALLY_PRESENT
   blocks every present sector equal to the parent's has its bit cleared (a block
   left without bits becomes NOT_PRESENT). Zero-state entries that still carry a
   file offset lose it. The virtual disk reads the same before and after, so the
   DataWriteGuid is kept and children of this disk stay linked.
2. **Pack**: the highest allocated block (payload or sector bitmap) moves into the
   lowest free 1 MiB-aligned gap below it that fits, until the highest one
   cannot move. Each move copies the block into space nothing references, and
   only then (after the barrier that the log transaction starts with) the logged
   BAT entry points at the copy, so a crash leaves the old or the new entry,
   both over the same bytes. A block's old place is never reused during the pack
   (every later block lies below it), so no copy overwrites a location a
   not-yet-durable entry still names. Old places get their holes punched once
   their move is committed (where the file system can).
3. **Truncate**: the log session is closed first (every entry applied, LogGuid =
   0) so that no replay can extend the file again, then the file is cut after
   the last region or block and the cut is flushed.

A crash anywhere leaves an image reading as before; running compact again
completes the work. Fixed disks are refused (every block is allocated by design).
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

from . import structures as S
from .bat import iter_nonzero
from .errors import UnsupportedFeatureError
from .errors import converts_os_errors
from .fdio import data_extents
from .filespace import FileSpace, align_up
from .image import ImageFile
from .storage import Storage

__all__ = ["compact", "CompactSummary", "plan_pack", "register"]

MiB = S.MiB
SECTOR = S.LOG_SECTOR_SIZE
PathLike = str | os.PathLike[str]
ProgressFn = Callable[[int, int], object]
_CHUNK = 4 * MiB
_ZEROS = bytes(_CHUNK)
# Commit the moved blocks' entries after this many bytes moved (or when a log entry
# would fill): each commit is one barrier plus one log entry.
_MOVE_BATCH = 1 << 30
_PRESENT = (S.PAYLOAD_BLOCK_FULLY_PRESENT, S.PAYLOAD_BLOCK_PARTIALLY_PRESENT)
_ZEROISH = (S.PAYLOAD_BLOCK_ZERO, S.PAYLOAD_BLOCK_UNMAPPED, S.PAYLOAD_BLOCK_UNDEFINED)


@dataclass
class CompactSummary:
    path: str
    dry_run: bool
    blocks_zeroed: int = 0        # all-zero blocks -> ZERO
    blocks_dropped: int = 0       # blocks equal to the parent's -> NOT_PRESENT
    sectors_dropped: int = 0      # bitmap bits cleared in PARTIALLY_PRESENT blocks
    blocks_moved: int = 0         # payload and sector-bitmap blocks packed down
    bytes_moved: int = 0
    bytes_punched: int = 0        # holes punched into freed places
    file_size_before: int = 0
    file_size_after: int = 0
    allocated_before: int = 0     # bytes the file system holds for the file
    allocated_after: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    @property
    def bytes_reclaimed(self) -> int:
        """Space given back: allocated bytes freed (file size cut in a dry run,
        which cannot predict the file system's allocation)."""
        if self.dry_run or not (self.allocated_before or self.allocated_after):
            return max(0, self.file_size_before - self.file_size_after)
        return max(0, self.allocated_before - self.allocated_after)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["bytes_reclaimed"] = self.bytes_reclaimed
        return d


# --- pack planning (pure) -------------------------------------------------------------------
def plan_pack(objects: Sequence[tuple[int, int, int]], reserved: Sequence[tuple[int, int]],
              ) -> tuple[list[tuple[int, int, int, int]], int]:
    """Moves that pack ``objects`` down, and the file end afterwards.

    ``objects`` are ``(offset, size, key)`` of allocated blocks, ``reserved`` the
    ``(start, end)`` spans that never move (headers, log, regions). Returns
    ``([(key, old_offset, new_offset, size)], new_end)``: the highest object first
    goes to the lowest 1 MiB-aligned free gap below it that fits, until the highest
    remaining one fits nowhere.
    """
    occupied = sorted([(s, e) for s, e in reserved] + [(o, o + n) for o, n, _ in objects])
    gaps: list[list[int]] = []  # [start, end), 1 MiB aligned, ascending
    pos = 0
    for s, e in occupied:
        a, b = align_up(pos), s // MiB * MiB
        if b > a:
            gaps.append([a, b])
        pos = max(pos, e)
    moves: list[tuple[int, int, int, int]] = []
    final: dict[int, tuple[int, int]] = {key: (o, n) for o, n, key in objects}
    for off, size, key in sorted(objects, reverse=True):
        g = None
        for cand in gaps:
            if cand[0] + size > off:
                break  # gaps ascend: none further up lies below this object
            if cand[1] - cand[0] >= size:
                g = cand
                break
        if g is None:
            break
        moves.append((key, off, g[0], size))
        final[key] = (g[0], size)
        g[0] += size
        gaps = [x for x in gaps if x[1] > x[0]]
    ends = [e for _, e in reserved] + [o + n for o, n in final.values()]
    return moves, align_up(max(ends, default=0))


# --- file-system helpers ----------------------------------------------------------------------
def _allocated(path: str) -> int:
    st = os.stat(path)
    return getattr(st, "st_blocks", 0) * 512


# --- the API -------------------------------------------------------------------------------------
@converts_os_errors
def compact(image: PathLike, *, dry_run: bool = False, progress: ProgressFn | None = None,
            parents: Sequence[PathLike] | None = None, search_dirs: Sequence[PathLike] = (),
            ignore_linkage: bool = False, storage: Storage | None = None) -> CompactSummary:
    """Reclaim the unused space of ``image`` (module docstring); returns a summary.

    A differencing disk is compared with its parent chain (found as for every
    open: locator, ``parents``, ``search_dirs``). ``dry_run`` reports what would be
    dropped and reclaimed and writes nothing. ``progress(done, total)`` is called
    with bytes scanned and moved. ``storage`` (tests) is the image's Storage.
    """
    from .writer import WritableDisk

    t0 = time.monotonic()
    path = os.fspath(image)
    summary = CompactSummary(path, dry_run)
    summary.file_size_before = os.path.getsize(path)
    summary.allocated_before = _allocated(path)
    if dry_run:
        from .disk import open as open_disk

        with open_disk(path, parents=parents, search_dirs=search_dirs, ignore_linkage=ignore_linkage) as disk:
            _refuse_fixed(disk.chain[0])
            _Compactor(disk, None, summary, progress).run()
        summary.seconds = time.monotonic() - t0
        return summary
    with ImageFile(path) as probe:  # a read-only parse first: a non-VHDX is never opened writable
        _refuse_fixed(probe)
    with WritableDisk(path, parents=parents, search_dirs=search_dirs, ignore_linkage=ignore_linkage,
                      storage=storage) as disk:
        _refuse_fixed(disk.image)
        summary.warnings += disk.warnings
        _Compactor(disk, disk, summary, progress).run()
    summary.file_size_after = os.path.getsize(path)
    summary.allocated_after = _allocated(path)
    summary.seconds = time.monotonic() - t0
    return summary


def _refuse_fixed(img: Any) -> None:
    if img.is_fixed:
        raise UnsupportedFeatureError(f"{img.path}: a fixed disk keeps every block allocated by design; "
                                      "convert it to a dynamic disk to reclaim space")


class _Compactor:
    """One compaction; ``w`` is the WritableDisk, or None in a dry run (``disk`` is
    then a read-only VirtualDisk and the decisions are only counted)."""

    def __init__(self, disk: Any, w: Any, summary: CompactSummary, progress: ProgressFn | None) -> None:
        self.disk = disk
        self.w = w
        self.img = disk.chain[0]
        self.geo = self.img.geometry
        self.sm = summary
        self.progress = progress
        self.parent: Any = None  # the parent chain's VirtualDisk (differencing disks)
        if len(disk.chain) > 1:
            self.parent = w.parent_disk if w is not None else _parent_view(disk)
        st = w.storage if w is not None else None
        self.io: Any = FileSpace(st, self.img.fd) if st is not None else None
        self.bat = list(self._entries())  # (index, entry) snapshot
        self.freed: list[tuple[int, int]] = []
        self.done = 0
        self.total = 0

    def _entries(self) -> Any:
        # Bare NOT_PRESENT / ZERO / UNMAPPED / UNDEFINED entries are skipped in C: the
        # snapshot holds only entries with an offset (bounded by the file's size), not
        # the 64 Mi ZERO entries of a grown 64 TiB differencing disk.
        return iter_nonzero(self.img.bat, self.geo.chunk_ratio, spans=self.img.bat_spans)

    # reading the image file itself
    def _pread(self, off: int, n: int) -> bytes:
        if self.w is not None:
            data: bytes = self.w.storage.pread(off, n).ljust(n, b"\0")
        else:
            data = self.img.read_file(off, n)
        return data

    def _tick(self, n: int) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(self.done, self.total)

    def run(self) -> None:
        geo = self.geo
        blocks = [(i, e) for i, e in self.bat if not geo.is_sb_index(i)
                  and geo.block_of_index(i) < geo.payload_blocks]
        self.total = sum(geo.block_length(geo.block_of_index(i)) for i, e in blocks
                         if e & S.BAT_STATE_MASK in _PRESENT)
        self.extents: list[tuple[int, int]] | None
        try:
            self.extents = data_extents(self.img.fd, 0, self.img.file_size)
        except OSError:  # holes cannot be told here: every block is read
            self.extents = None
        self.new_entries: dict[int, int] = {}
        for i, e in blocks:
            self._drop(i, e)
            if self.w is not None and self.w.blocks.commit_due():
                self.w.commit()
        if self.w is not None:
            self.w.commit()
            for off, n in self.freed:
                self.sm.bytes_punched += self.io.free(off, n)
        self._pack()

    # --- 1. drop ------------------------------------------------------------------------------
    def _set(self, index: int, entry: int) -> None:
        self.new_entries[index] = entry
        if self.w is not None:
            self.w.blocks.set_entry(index, entry)

    def _is_hole(self, off: int, n: int) -> bool:
        if self.extents is None:
            return False
        k = bisect.bisect_right(self.extents, (off, 1 << 62)) - 1
        for s, e in self.extents[max(k, 0):]:
            if s >= off + n:
                break
            if e > off:
                return False
        return True

    def _parent_read(self, v: int, m: int) -> bytes:
        """What the parent chain reads at [v, v+m): zeros past its end (a child may
        be larger than its parent)."""
        n = max(0, min(m, self.parent.size - v))
        return (self.parent.read_at(v, n) if n else b"").ljust(m, b"\0")

    def _equal_runs(self, foff: int, vstart: int, n: int, zero_only: bool) -> Any:
        """Yield (rel, length, equal) pieces of [0, n) of the block: equal means
        the file's bytes equal the parent's (or zeros with ``zero_only``)."""
        lss = self.geo.logical_sector_size
        for k in range(0, n, _CHUNK):
            m = min(_CHUNK, n - k)
            if self._is_hole(foff + k, m):
                mine = _ZEROS[:m]
            else:
                mine = self._pread(foff + k, m)
            other = _ZEROS[:m] if zero_only else self._parent_read(vstart + k, m)
            if mine == other:
                yield k, m, True
                continue
            mv, ov = memoryview(mine), memoryview(other)
            for s in range(0, m, lss):
                yield k + s, lss, mv[s:s + lss] == ov[s:s + lss]

    def _drop(self, index: int, entry: int) -> None:
        geo = self.geo
        state, foff = entry & S.BAT_STATE_MASK, entry & S.BAT_OFFSET_MASK
        if state in _ZEROISH:
            if foff:
                self._set(index, S.bat_entry(state, 0))  # the offset means nothing; drop it
            return
        if state not in _PRESENT:
            return
        block = geo.block_of_index(index)
        vstart = block * geo.block_size
        n = geo.block_length(block)
        diff = self.parent is not None
        if state == S.PAYLOAD_BLOCK_FULLY_PRESENT:
            if diff and all(eq for _, _, eq in _stop_on_false(self._equal_runs(foff, vstart, n, False))):
                self._clear_block_bits(block)
                self._set(index, S.bat_entry(S.PAYLOAD_BLOCK_NOT_PRESENT, 0))
                self.sm.blocks_dropped += 1
                self.freed.append((foff, geo.block_size))
            elif all(eq for _, _, eq in _stop_on_false(self._equal_runs(foff, vstart, n, True))):
                self._set(index, S.bat_entry(S.PAYLOAD_BLOCK_ZERO, 0))
                self.sm.blocks_zeroed += 1
                self.freed.append((foff, geo.block_size))
            self._tick(n)
            return
        # PARTIALLY_PRESENT (differencing disks only): present sectors equal to the parent's go.
        lss = geo.logical_sector_size
        keep = 0
        clear: list[tuple[int, int]] = []
        for first, count, present in self.img.block_runs(block):
            if not present:
                continue
            a = first * lss
            b = min((first + count) * lss, n)
            if a >= b:
                continue
            for rel, length, eq in self._equal_runs(foff + a, vstart + a, b - a, not diff):
                s = (a + rel) // lss
                if eq:
                    if clear and clear[-1][0] + clear[-1][1] == s:
                        clear[-1] = (clear[-1][0], clear[-1][1] + length // lss)
                    else:
                        clear.append((s, length // lss))
                else:
                    keep += 1
        if keep == 0:
            self._clear_block_bits(block)
            self._set(index, S.bat_entry(S.PAYLOAD_BLOCK_NOT_PRESENT, 0))
            self.sm.blocks_dropped += 1
            self.freed.append((foff, geo.block_size))
        elif clear:
            for s, c in clear:
                self._clear_bits(block, s, c)
                self.sm.sectors_dropped += c
        self._tick(n)

    def _clear_block_bits(self, block: int) -> None:
        geo = self.geo
        sb = self.img.bat[geo.sb_index(block // geo.chunk_ratio)]
        if sb & S.BAT_STATE_MASK == S.SB_BLOCK_PRESENT:
            self._clear_bits(block, 0, geo.sectors_per_block)

    def _clear_bits(self, block: int, first: int, count: int) -> None:
        """Clear bits [first, first+count) of ``block``'s slice of its sector bitmap
        (through the block map, logged on commit)."""
        if self.w is not None:
            self.w.blocks.clear_bits(block, first, count)

    # --- 2. pack, 3. truncate -------------------------------------------------------------------
    def _objects(self) -> list[tuple[int, int, int]]:
        geo = self.geo
        out = []
        for i, e in self.bat:
            e = self.new_entries.get(i, e)
            state, off = e & S.BAT_STATE_MASK, e & S.BAT_OFFSET_MASK
            if not off:
                continue
            if geo.is_sb_index(i):
                if state == S.SB_BLOCK_PRESENT:
                    out.append((off, S.SECTOR_BITMAP_BLOCK_SIZE, i))
            elif state in _PRESENT:
                out.append((off, geo.block_size, i))
        return out

    def _pack(self) -> None:
        reserved = [(s, e) for s, e, _ in self.img.reserved_spans()]
        objects = self._objects()
        moves, new_end = plan_pack(objects, reserved)
        self.total += sum(n for *_, n in moves)
        if self.w is None:
            self.sm.blocks_moved = len(moves)
            self.sm.bytes_moved = sum(n for *_, n in moves)
            self.sm.file_size_after = min(self.sm.file_size_before, new_end)  # predicted
            return
        w = self.w
        batch: list[tuple[int, int]] = []
        moved = 0
        for key, old, new, n in moves:
            self.io.copy(old, new, n)
            entry = self.new_entries.get(key, self.img.bat[key])
            w.blocks.set_entry(key, S.bat_entry(entry & S.BAT_STATE_MASK, new))
            batch.append((old, n))
            moved += n
            self.sm.blocks_moved += 1
            self.sm.bytes_moved += n
            self._tick(n)
            if moved >= _MOVE_BATCH or w.blocks.commit_due():
                self._commit_moves(batch)
                batch, moved = [], 0
        self._commit_moves(batch)
        # Nothing may replay past the cut: close the log session (all applied, LogGuid 0).
        w.flush()
        w.log.close()
        if w.storage.size() > new_end:
            w.storage.truncate(new_end)
            w.storage.flush()

    def _commit_moves(self, batch: list[tuple[int, int]]) -> None:
        self.w.commit()  # its first barrier makes the copies durable (FORMAT.md §7 rule 5)
        for old, n in batch:
            self.sm.bytes_punched += self.io.free(old, n)


def _stop_on_false(pieces: Any) -> Any:
    for p in pieces:
        yield p
        if not p[2]:
            return


def _parent_view(disk: Any) -> Any:
    from .disk import VirtualDisk

    return VirtualDisk(disk.chain[1:])


# --- the command ----------------------------------------------------------------------------------
def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def cmd_compact(args: argparse.Namespace) -> int:
    from .progress import Progress

    bar = Progress(0, "dry run" if args.dry_run else "compact")
    try:
        s = compact(args.image, dry_run=args.dry_run, progress=bar, parents=args.parent,
                    search_dirs=args.search_dir, ignore_linkage=args.ignore_linkage)
    finally:
        bar.close()
    if args.json:
        json.dump(s.to_dict(), sys.stdout, indent=1)
        print()
        return 0
    if s.dry_run:
        print(f"{s.path}: would drop {s.blocks_dropped} block(s) equal to the parent, zero "
              f"{s.blocks_zeroed} all-zero block(s), clear {s.sectors_dropped} sector bit(s), move "
              f"{s.blocks_moved} block(s) ({_human(s.bytes_moved)}); file {_human(s.file_size_before)} -> "
              f"{_human(s.file_size_after)}")
        return 0
    print(f"{s.path}: dropped {s.blocks_dropped} block(s) equal to the parent, zeroed {s.blocks_zeroed} "
          f"all-zero block(s), cleared {s.sectors_dropped} sector bit(s); moved {s.blocks_moved} "
          f"block(s) ({_human(s.bytes_moved)})")
    print(f"  file {_human(s.file_size_before)} -> {_human(s.file_size_after)}; "
          f"{_human(s.bytes_reclaimed)} reclaimed in {s.seconds:.2f} s")
    for warning in s.warnings:
        print(f"  note: {warning}")
    return 0


def register(subparsers: Any, chain_options: Callable[[argparse.ArgumentParser], None]) -> None:
    s = subparsers.add_parser(
        "compact", help="give unused space back: drop zero / parent-equal blocks, pack, truncate (Optimize-VHD)",
        description="Blocks that read all zeros (base disks) or what the parent reads "
                    "(differencing disks) are dropped through the log, the remaining blocks are "
                    "moved down into the gaps and the file is truncated; crash-safe at every step.")
    chain_options(s)
    s.add_argument("--dry-run", action="store_true", help="report what would be reclaimed, write nothing")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_compact)
