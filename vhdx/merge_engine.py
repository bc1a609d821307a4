"""The merge engine: apply or delete checkpoints offline.

Modes (``merge(child, into=None, output=None)``):
1. child into its parent, in place (Merge-VHD's default);
2. child and every file between it and ``into`` folded into that ancestor;
3. ``output``: the whole chain flattened into a new standalone VHDX;
4. ``dry_run``: the same plan, reported, nothing written.

How it works. The files above the target ("the upper chain") are resolved with
the reader's own resolver (:meth:`VirtualDisk.segments`), restricted to the
virtual ranges where any upper file has a block at all, so the work grows with
the changed data, not the virtual size. Each target block then gets the
upper-defined bytes (data copied or block-cloned by the C engine, zeros) and the
state change of FORMAT.md §8.3's table; sectors the upper chain leaves undefined keep
the target's own content.

Crash safety (FORMAT.md §8.3, MS-VHDX 2.6.2.6.3 footnote): a new DataWriteGuid G' for
the target is first stored as ``parent_linkage2`` in the file directly above it,
then put in the target's header; from then on the upper chain still opens on
the target. Every sector the merge changes in the target is masked by the upper
chain, payload is durable before the logged BAT / bitmap change that exposes
it, so the chain reads the same at every instant and running the merge again
completes it. Files are deleted only after the target is durable.
"""

from __future__ import annotations

import errno
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Sequence

from . import native
from . import structures as S
from .bat import Geometry
from .blockmap import Action, BlockMap, RecordingBlockMap, classify_upper, merge_action
from .chain import open_chain, parse_linkage
from .disk import ZERO, VirtualDisk
from .errors import (
    CancelledError,
    DependentDisksError,
    InvalidArgumentError,
    UnsupportedFeatureError,
    VhdxError,
)
from .errors import converts_os_errors
from .image import ImageFile
from .fdio import fsync_dir
from .locator import absolute_win32_path, relative_path
from .storage import DeferredSyncStorage, FileStorage, Storage
from .writer import WritableDisk, lock_exclusive, storage_fd

ProgressFn = Callable[[int, int], object]
PathLike = str | os.PathLike[str]
"""``progress(done_bytes, total_bytes)``; returning False cancels between batches."""

# Data moves in chunks (one C call per source file, then a progress report and a
# chance to cancel) of about CHUNK_BYTES; the target's metadata is committed (one
# barrier for the payload, one logged entry) after BATCH_SECONDS of moving, or
# earlier when the metadata would outgrow one log entry. Committing by time, not
# bytes, keeps the clone path (gigabytes per second) to one or two commits while a
# slow copy still exposes its progress durably every second.
CHUNK_BYTES = 64 << 20
BATCH_SECONDS = 1.0
PLAN_REPORT_BYTES = 1 << 30  # dry run: progress every this much planned
_METHOD_NAMES = {native.CLONE: "clone", native.COPY_FILE_RANGE: "copy_file_range",
                 native.READ_WRITE: "read_write", native.FALLOCATE: "fallocate",
                 native.WRITE_ZEROS: "write_zeros", native.NONE: "none"}


@dataclass
class MergeSummary:
    mode: str  # "in-place" | "into-ancestor" | "flatten"
    target: str
    merged: list[str]  # files whose blocks were folded into the target
    dry_run: bool = False
    blocks_changed: int = 0
    bytes_cloned: int = 0  # reported by FICLONERANGE
    bytes_copied: int = 0  # copy_file_range (which may share extents itself) or read/write
    bytes_zeroed: int = 0  # zeros written into existing target blocks
    ranges_by_method: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    deleted: list[str] = field(default_factory=list)
    repointed: list[str] = field(default_factory=list)  # children of the merged child, now on the target
    invalidated: list[str] = field(default_factory=list)  # dependents broken under --force
    warnings: list[str] = field(default_factory=list)

    @property
    def bytes_moved(self) -> int:
        return self.bytes_cloned + self.bytes_copied + self.bytes_zeroed

    @property
    def throughput(self) -> float:
        """Bytes per second of data moved (cloned + copied + zeroed)."""
        return self.bytes_moved / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["bytes_moved"] = self.bytes_moved
        d["throughput"] = self.throughput
        return d


# --- planning ------------------------------------------------------------------------
def defined_ranges(upper: Sequence[ImageFile], size: int) -> list[tuple[int, int]]:
    """Sorted, merged virtual ranges in which any upper file has a non-NOT_PRESENT block,
    plus the ranges past a smaller upper file's end (which read zeros there).
    Built from runs of equal entries: a fully discarded 16 TiB child is one range."""
    spans: list[tuple[int, int]] = []
    for img in upper:
        bs = img.geometry.block_size
        # Every non-zero payload entry matters here: ZERO/UNDEFINED/UNMAPPED define zeros.
        for block, n, e in img.payload_runs():
            if e & S.BAT_STATE_MASK != S.PAYLOAD_BLOCK_NOT_PRESENT:
                spans.append((block * bs, min(size, (block + n) * bs)))
        if img.virtual_size < size:
            spans.append((img.virtual_size, size))
    spans.sort()
    merged: list[tuple[int, int]] = []
    for s, e in spans:
        if s >= e:
            continue
        if merged and s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], e))
        else:
            merged.append((s, e))
    return merged


@dataclass
class BlockPlan:
    """What the upper chain defines inside one target block."""

    block: int
    start: int  # virtual offset of the block
    length: int  # bytes of the block inside the virtual disk
    data: list[tuple[int, int, int, int]]  # (virtual offset, length, upper index, file offset)
    zeros: list[tuple[int, int]]  # (virtual offset, length) defined as zeros
    fully_defined: bool


PLAN_PIECE = 1 << 34  # virtual bytes resolved at once by the plan (bounds the segment list)
_READS_ZERO = (S.PAYLOAD_BLOCK_UNDEFINED, S.PAYLOAD_BLOCK_ZERO, S.PAYLOAD_BLOCK_UNMAPPED)


def plan_blocks(upper_disk: VirtualDisk, ranges: list[tuple[int, int]], block_size: int,
                target: "ImageFile | _EmptyImage | None" = None) -> Iterator[BlockPlan]:
    """Yield a :class:`BlockPlan` for every target block that the upper chain touches.

    The upper chain is resolved piece by piece into runs (:meth:`VirtualDisk.segments`).
    With ``target`` (the target's ImageFile, or a stand-in with ``payload_runs``
    and ``has_parent``), target blocks that a run of zeros covers whole and that
    already read zeros with nothing to change are not yielded at all (they would
    plan nothing): a discarded 16 TiB child costs its runs, not its blocks.
    """
    current: BlockPlan | None = None
    size = upper_disk.size
    for start, end in ranges:
        for pstart in range(start, end, PLAN_PIECE):
            pend = min(end, pstart + PLAN_PIECE)
            for rel, length, src, foff in upper_disk.segments(pstart, pend - pstart):
                v, vend = pstart + rel, pstart + rel + length
                while v < vend:
                    block = v // block_size
                    bstart = block * block_size
                    bend = min(bstart + block_size, size)
                    if (target is not None and src == ZERO and v == bstart and vend >= bend
                            and (current is None or current.block != block)):
                        # Whole target blocks of zeros: only those with something to change.
                        stop = block + (min(vend, size) - bstart) // block_size
                        if min(vend, size) == size and size % block_size:
                            stop = -(-size // block_size)  # the short last block, covered whole
                        if current is not None:
                            _finish(current)
                            yield current
                            current = None
                        yield from _zero_blocks(target, block, stop, block_size, size)
                        v = min(vend, stop * block_size)
                        continue
                    if current is None or current.block != block:
                        if current is not None:
                            _finish(current)
                            yield current
                        current = BlockPlan(block, bstart, bend - bstart, [], [], False)
                    n = min(vend, bend) - v
                    if src >= 0:
                        current.data.append((v, n, src, foff + (v - pstart - rel)))
                    elif src == ZERO:
                        current.zeros.append((v, n))
                    v += n
    if current is not None:
        _finish(current)
        yield current


def _zero_blocks(target: "ImageFile | _EmptyImage", first: int, stop: int, block_size: int,
                 size: int) -> Iterator[BlockPlan]:
    """BlockPlans "all zeros" for the target blocks in [first, stop) that do not read
    zeros already by their own state: FULLY/PARTIALLY_PRESENT ones, and NOT_PRESENT
    ones of a differencing target (which would expose its parent otherwise)."""
    has_parent = target.has_parent

    def plan(b: int) -> BlockPlan:
        bstart = b * block_size
        n = min(block_size, size - bstart)
        return BlockPlan(b, bstart, n, [], [(bstart, n)], True)

    pos = first
    for b, n, e in target.payload_runs(first, stop):
        if has_parent:
            yield from (plan(k) for k in range(pos, b))  # NOT_PRESENT gap
        state = e & S.BAT_STATE_MASK
        if state in (S.PAYLOAD_BLOCK_FULLY_PRESENT, S.PAYLOAD_BLOCK_PARTIALLY_PRESENT) or (
                has_parent and state not in _READS_ZERO):
            yield from (plan(k) for k in range(b, b + n))
        pos = b + n
    if has_parent:
        yield from (plan(k) for k in range(pos, stop))


def _finish(p: BlockPlan) -> None:
    covered = sum(n for _, n, _, _ in p.data) + sum(n for _, n in p.zeros)
    p.fully_defined = covered == p.length


# --- execution helpers ---------------------------------------------------------------------
class _Mover:
    """Copies and zero-fills into the target, through the C engine when the target's
    storage is a plain file (else through the storage, so tests can record it)."""

    def __init__(self, storage: Storage, upper: Sequence[ImageFile], summary: MergeSummary,
                 allow_clone: bool) -> None:
        self.storage = storage
        self.upper = upper
        self.summary = summary
        self.allow_clone = allow_clone
        # Exactly a plain file (subclasses, such as the tests' recorders, see every write).
        self.native = type(storage) in (FileStorage, DeferredSyncStorage)
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
        self.zeros.append((dst_off, length))

    def run(self) -> None:
        """Move everything queued (no barrier: the commit flushes)."""
        st: Any = self.storage
        sm = self.summary
        for src, ranges in self.copies.items():
            img = self.upper[src]
            if self.native:
                methods = native.copy_ranges(img.fd, st.fd, ranges, allow_clone=self.allow_clone)
                st.note_external_write()
                _start_writeback(st.fd, ranges, methods)
            else:
                methods = []
                for s, d, n in ranges:
                    st.pwrite(d, img.read_file(s, n))
                    methods.append(native.READ_WRITE)
            for (_, _, n), m in zip(ranges, methods):
                name = _METHOD_NAMES.get(m, str(m))
                sm.ranges_by_method[name] = sm.ranges_by_method.get(name, 0) + 1
                if m == native.CLONE:
                    sm.bytes_cloned += n
                else:
                    sm.bytes_copied += n
        if self.zeros:
            if self.native:
                methods = native.zero_ranges(st.fd, self.zeros)
                st.note_external_write()
            else:
                methods = []
                for d, n in self.zeros:
                    st.pwrite(d, bytes(n))
                    methods.append(native.WRITE_ZEROS)
            for (_, n), m in zip(self.zeros, methods):
                name = _METHOD_NAMES.get(m, str(m))
                sm.ranges_by_method[name] = sm.ranges_by_method.get(name, 0) + 1
                sm.bytes_zeroed += n
        self.copies.clear()
        self.zeros.clear()
        self.queued = 0



# Public name: the VHD merge (vhdx/vhd/merge.py) moves its data through the same engine.
RangeMover = _Mover


class _CountingMover(_Mover):
    """The dry run's mover: counts what would be copied and zeroed, moves nothing."""

    def __init__(self, summary: MergeSummary) -> None:
        self.summary = summary
        self.queued = 0

    def copy(self, src: int, src_off: int, dst_off: int, length: int) -> None:
        self.summary.bytes_copied += length
        self.queued += length

    def zero(self, dst_off: int, length: int) -> None:
        self.summary.bytes_zeroed += length
        self.queued += length

    def run(self) -> None:
        self.queued = 0


def _start_writeback(fd: int, ranges: list[tuple[int, int, int]], methods: list[int]) -> None:
    """Start writing copied (not cloned) bytes back after each chunk, so that the
    commit's fsync finds little left and dirty pages never pile up for a whole
    second of copying. POSIX_FADV_DONTNEED starts writeback of the range on Linux
    (and drops only pages already clean, which we do not reread). Measured neutral
    to slightly better than leaving it all to the fsync (bench/RESULTS.md).
    """
    fadvise = getattr(os, "posix_fadvise", None)
    if fadvise is None:
        return
    try:
        _advise_dontneed(fadvise, fd, ranges, methods)
    except OSError:
        pass  # advice only: the commit's fsync writes everything anyway


def _advise_dontneed(fadvise: Callable[[int, int, int, int], None], fd: int, ranges: list[tuple[int, int, int]],
                     methods: list[int]) -> None:
    lo = hi = -1
    for (_, d, n), m in zip(ranges, methods):
        if m == native.CLONE:
            continue
        if d == hi:
            hi += n
            continue
        if hi > lo:
            fadvise(fd, lo, hi - lo, os.POSIX_FADV_DONTNEED)
        lo, hi = d, d + n
    if hi > lo:
        fadvise(fd, lo, hi - lo, os.POSIX_FADV_DONTNEED)


def _apply_block(bm: BlockMap, p: BlockPlan, mover: _Mover, summary: MergeSummary) -> None:
    """Merge one block: :func:`merge_action` decides, the block map and the mover do it."""
    geo = bm.geometry
    e = bm.payload_entry(p.block)
    foff = e & S.BAT_OFFSET_MASK
    covered = sum(n for _, n, _, _ in p.data) + sum(n for _, n in p.zeros)
    upper = classify_upper(covered, p.length, bool(p.data))
    img = bm.image
    action = merge_action(upper, e & S.BAT_STATE_MASK, has_parent=img.has_parent, fixed=img.is_fixed)
    if action is Action.LEAVE:
        return
    summary.blocks_changed += 1
    if action is Action.SET_ZERO:
        bm.set_payload(p.block, S.PAYLOAD_BLOCK_ZERO)
        return
    if action.allocates:
        foff = bm.allocate(geo.block_size)  # reads zeros: only data is written
    for v, n, src, soff in p.data:
        mover.copy(src, soff, foff + v - p.start, n)
    if action.in_place:
        for v, n in p.zeros:
            mover.zero(foff + v - p.start, n)
    if action in (Action.WRITE_FULL, Action.NEW_FULL):
        bm.set_payload(p.block, S.PAYLOAD_BLOCK_FULLY_PRESENT, foff)
    elif action is Action.NEW_PARTIAL:
        bm.ensure_bitmap(p.block // geo.chunk_ratio)
        bm.set_payload(p.block, S.PAYLOAD_BLOCK_PARTIALLY_PRESENT, foff)
    if action in (Action.WRITE_BITS, Action.NEW_PARTIAL):
        lss = geo.logical_sector_size
        for v, n, *_ in p.data:
            bm.set_bits(p.block, (v - p.start) // lss, n // lss)
        for v, n in p.zeros:
            bm.set_bits(p.block, (v - p.start) // lss, n // lss)


def _sync_virtual_disk_items(t: WritableDisk, top: ImageFile, summary: MergeSummary) -> None:
    """The target takes the child's IsVirtualDisk items (MS-VHDX 2.6.1.2)."""
    changes: dict[tuple[uuid.UUID, bool], bytes] = {}
    tgt = {(it.item_id, it.is_user): it for it in t.image.metadata.items}
    for it in top.metadata.items:
        if not it.is_virtual_disk:
            continue
        key = (it.item_id, it.is_user)
        cur = tgt.get(key)
        if cur is None:
            raise UnsupportedFeatureError(f"target lacks the virtual-disk metadata item {it.name}")
        if cur.data != it.data:
            if key == (S.VIRTUAL_DISK_SIZE_GUID, False):
                continue  # sizes are reconciled before the block merge
            changes[key] = it.data
    if changes:
        t.update_metadata_items(changes)
        summary.warnings.append("target took the child's metadata items: "
                                + ", ".join(tgt[k].name for k in changes))


# --- the engine ------------------------------------------------------------------------------
# Parent-locator key that the merged top file gets once the target holds everything
# merged (target durable, metadata synced): "{target's DataWriteGuid} {top's
# DataWriteGuid}". A rerun finding it (and the top unchanged since: same
# DataWriteGuid) skips the data phase and only re-points and deletes; `check` tells
# a finished merge from an interrupted one by it. Readers ignore unknown keys.
MERGED_MARK = "vhdx_merged_into"


def merged_mark(locator: dict[str, str] | None) -> tuple[uuid.UUID, uuid.UUID] | None:
    """(target GUID, top GUID) of a file's merge mark, or None."""
    parts = ((locator or {}).get(MERGED_MARK) or "").split()
    if len(parts) != 2:
        return None
    g, d = parse_linkage(parts[0]), parse_linkage(parts[1])
    return (g, d) if g and d else None


@converts_os_errors
def merge(child: str | os.PathLike[str], into: str | os.PathLike[str] | None = None,
          output: str | os.PathLike[str] | None = None, *, dry_run: bool = False,
          keep: bool = False, force: bool = False, progress: ProgressFn | None = None,
          parents: Sequence[str | os.PathLike[str]] | None = None,
          search_dirs: Sequence[str | os.PathLike[str]] = (), ignore_linkage: bool = False,
          allow_clone: bool = True,
          storage_factory: Callable[[str], Storage] | None = None,
          confine: Sequence[str | os.PathLike[str]] | None = None) -> MergeSummary:
    """Merge ``child`` into its parent (or ``into``), or flatten it into ``output``.

    Returns a :class:`MergeSummary`. Refuses, naming them, when other disks depend
    on what the merge changes (siblings of the child), unless ``force``; refuses a
    target outside ``child``'s folder unless the caller named it (``into``,
    ``parents``). Every precondition (files writable, not immutable, free space)
    is checked before the first write; an interrupted merge, in any phase, is
    completed by running the same merge again. ``confine`` restricts parent
    lookups to those folder trees. ``storage_factory`` (tests) supplies the
    Storage for every file written. (VHDX chains: :func:`vhdx.merge` routes VHD.)
    """
    t0 = time.monotonic()
    if output is None and not dry_run:
        done = _finish_deletions(os.fspath(child), search_dirs, confine, t0)
        if done is not None:
            return done
    chain, warnings = open_chain(child, parents, search_dirs, ignore_linkage, confine=confine)
    try:
        if output is not None:
            if into is not None:
                raise InvalidArgumentError("give either an ancestor to merge into or an output, not both")
            return _flatten(chain, os.fspath(output), dry_run, progress, allow_clone,
                            storage_factory, t0, warnings)
        if len(chain) < 2:
            raise InvalidArgumentError(f"{chain[0].path} has no parent to merge into")
        k = 1
        if into is not None:
            for i, f in enumerate(chain[1:], 1):
                if os.path.exists(into) and os.path.samefile(f.path, into):
                    k = i
                    break
            else:
                raise InvalidArgumentError(f"{os.fspath(into)} is not an ancestor of {chain[0].path}")
        named = [os.fspath(p) for p in ([into] if into is not None else []) + list(parents or ())]
        return _merge_into(chain, k, dry_run, keep, force, progress, search_dirs,
                           allow_clone, storage_factory, t0, warnings, named)
    finally:
        for f in chain:
            f.close()


def _finish_deletions(child: str, search_dirs: Sequence[PathLike], confine: Sequence[PathLike] | None,
                      t0: float) -> MergeSummary | None:
    """A rerun after the merge completed and its deletions began (the chain no
    longer opens): delete what is left. None when that is not the situation."""
    from .chain import find_parent
    from .errors import ParentNotFoundError

    try:
        top = ImageFile(child)
    except VhdxError:
        return None  # the normal path reports it
    files = [top]
    try:
        m = merged_mark(top.parent_locator) if top.has_parent else None
        if m is None or m[1] != top.data_write_guid:
            return None
        mark = m[0]
        cur = top
        while True:
            try:
                parent = find_parent(cur, search_dirs, False, [], confine=confine)
            except ParentNotFoundError:
                break  # a merged file below was deleted already: only deletions remain
            except VhdxError:
                return None
            if parent.data_write_guid == mark:
                parent.close()
                return None  # the target is reachable: the normal path finishes the job
            files.append(parent)
            cur = parent
        paths = [f.path for f in files]
    finally:
        for f in files:
            f.close()
    summary = MergeSummary("completion", "", paths)
    summary.warnings.append("an earlier run of this merge completed its target; "
                            "removed the merged files it left")
    for p in reversed(paths):  # the top file last: a rerun then still finds the rest
        _unlink(p)
    summary.deleted = paths
    summary.seconds = time.monotonic() - t0
    return summary


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass  # an interrupted run deleted it already
    fsync_dir(path)


def _planned_growth(upper: Sequence[ImageFile], target: "ImageFile | _EmptyImage", new_size: int) -> int:
    """Upper bound of the bytes the target file grows by: a fresh block for every
    target block that the upper files hold data for and the target does not,
    a sector-bitmap block per chunk when partial, plus the grown BAT."""
    geo = target.geometry
    bs = geo.block_size
    need: set[int] = set()
    for img in upper:
        g = img.geometry
        # By runs of equal entries: a discarded 16 TiB child (8M ZERO/UNMAPPED
        # entries) is a handful of steps, not a loop over every entry.
        for b0, count, e in img.payload_runs():
            if e & S.BAT_STATE_MASK not in (S.PAYLOAD_BLOCK_FULLY_PRESENT,
                                            S.PAYLOAD_BLOCK_PARTIALLY_PRESENT):
                continue
            b, last = b0, b0 + count - 1
            lo, hi = b * g.block_size // bs, -(-min(new_size, (last + 1) * g.block_size) // bs)
            for tb in range(lo, hi):
                idx = geo.payload_index(tb) if tb < geo.payload_blocks else -1
                st = target.bat[idx] & S.BAT_STATE_MASK if 0 <= idx < len(target.bat) else -1
                if st not in (S.PAYLOAD_BLOCK_FULLY_PRESENT, S.PAYLOAD_BLOCK_PARTIALLY_PRESENT):
                    need.add(tb)
    growth = len(need) * _align_up(bs, S.MiB)
    if target.has_parent:
        growth += len({b // geo.chunk_ratio for b in need}) * S.MiB
    if new_size > target.virtual_size:
        growth += _align_up(8 * (-(-new_size // bs)) * 2, S.MiB)  # BAT with its SB entries
    return growth + 2 * S.MiB  # header and log growth, allocation rounding


def _align_up(n: int, a: int) -> int:
    return -(-n // a) * a


def _writable(path: str) -> bool:
    from .errors import NotWritableError
    from .preflight import check_writable

    try:
        check_writable([path], "the merge")
    except NotWritableError:
        return False
    return True


def _in_folder(path: str, folder_of: str) -> bool:
    return (os.path.dirname(os.path.realpath(path))
            == os.path.dirname(os.path.realpath(folder_of)))


def _merge_into(chain: list[ImageFile], k: int, dry_run: bool, keep: bool, force: bool,
                progress: ProgressFn | None, search_dirs: Sequence[PathLike], allow_clone: bool,
                storage_factory: Callable[[str], Storage] | None, t0: float,
                warnings: list[str], named: Sequence[str] = ()) -> MergeSummary:
    from .dependents import find_linked, search_folders
    from .errors import ConfinementError
    from .preflight import check_removable, check_space, check_writable

    top, target, above = chain[0], chain[k], chain[k - 1]
    upper = chain[:k]
    summary = MergeSummary("in-place" if k == 1 else "into-ancestor", target.path,
                           [f.path for f in upper], dry_run, warnings=list(warnings))
    # Confinement: a crafted child's relative_path may climb out of its folder
    # (..\..\vms\prod.vhdx); only a target beside the child or named by the user is written.
    if not _in_folder(target.path, top.path) and not any(
            os.path.exists(p) and os.path.samefile(p, target.path) for p in named):
        raise ConfinementError(
            f"{target.path}: the merge target lies outside the folder of {top.path}; "
            "name it with --into or --parent to merge into it")
    if top.virtual_size < target.virtual_size:
        # Hyper-V never makes a child smaller than its parent; dropping the target's
        # tail would need a shrink that discards data, which this engine refuses.
        raise UnsupportedFeatureError(
            f"the child's virtual size ({top.virtual_size}) is smaller than the target's "
            f"({target.virtual_size}); merging would discard the target's tail")

    # Resuming an interrupted merge: the target already carries the GUID that the file
    # above names as linkage2 (a fresh one would first replace linkage2, and a crash
    # right then would leave that file linked to neither of the target's GUIDs).
    previous = parse_linkage((above.parent_locator or {}).get("parent_linkage2"))
    resuming = previous is not None and previous == target.data_write_guid
    new_guid: uuid.UUID = previous if resuming and previous is not None else uuid.uuid4()
    data_done = resuming and merged_mark(top.parent_locator) == (new_guid, top.data_write_guid)

    # Who else depends on what changes: the target and the intermediates (their
    # children other than our chain would read merged data); children of the merged
    # child are re-pointed to the target instead. Found by content in the chain's
    # folders, one level down, and the search dirs. A disk linked to the pending
    # GUID G' was re-pointed by the interrupted run: only this merge made G'.
    folders = search_folders([f.path for f in chain], search_dirs)
    changed = {f.data_write_guid: f.path for f in chain[1:k + 1]}
    if resuming:
        changed.pop(new_guid, None)
    linked = find_linked(folders, {**changed, top.data_write_guid: top.path},
                         [f.path for f in chain])
    dependents = [(p, q) for p, q, g in linked if g != top.data_write_guid]
    children = [p for p, _, g in linked if g == top.data_write_guid]
    finished: list[str] = []  # re-pointed by the interrupted run
    if resuming:
        done = find_linked(folders, {new_guid: target.path}, [f.path for f in chain])
        finished = [p for p, _, _ in done]
        summary.repointed = list(finished)
    if dependents:
        names = ", ".join(f"{p} (child of {q})" for p, q in dependents)
        if not force:
            raise DependentDisksError(
                f"other disks depend on the merge target and would be corrupted: {names}; "
                "merge or delete them first, or use --force")
        summary.invalidated = [p for p, _ in dependents]
    summary.repointed += children

    if dry_run:
        if data_done:
            summary.warnings.append("the merged data is in the target already; "
                                    "only re-pointing and deletions remain")
            summary.seconds = time.monotonic() - t0
            return summary
        upper_disk = VirtualDisk(upper)  # shares the ImageFiles, which ``chain`` owns
        _dry_run(target, upper_disk, upper, summary, progress, grown=top.virtual_size)
        summary.seconds = time.monotonic() - t0
        return summary

    # Everything that can refuse does so now, before the first byte is written.
    # With --keep an into-ancestor merge need not write the top file: its mark is
    # then best effort (a read-only kept top stays untouched).
    mark_top = not data_done and (not keep or k == 1 or _writable(top.path))
    writes = list(dict.fromkeys(([] if data_done else [above.path, target.path])
                                + ([top.path] if mark_top else []) + children))
    check_writable(writes, "the merge")
    if not keep:
        check_removable([f.path for f in upper], "the merge")
    if not data_done:
        check_space(target.path, _planned_growth(upper, target, top.virtual_size), "the merge")
    for f in upper[:-1]:
        lock_exclusive(f.fd, f.path)

    mark: dict[str, str | None] = {MERGED_MARK: f"{{{new_guid}}} {{{top.data_write_guid}}}"}

    def storage_of(path: str) -> Storage:
        return storage_factory(path) if storage_factory else FileStorage.open(path, writable=True)

    opened: list[Storage] = []
    try:
        # Children are opened (and locked) now: a VM holding one refuses the merge
        # before anything changed, not after the data phase.
        child_storage = {}
        for path in children:
            st = storage_of(path)
            opened.append(st)
            lock_exclusive(storage_fd(st), path)
            child_storage[path] = st
        target_path = target.path
        # Writable opens are standalone: metadata edits and whole-sector merges never
        # read through parents, and each BAT is then held once (ref: bench/RESULTS.md).
        # The read plan will use the writable open's parse of ``above``, and the target
        # is reopened writable; their read-only opens (and the ancestors, not needed any
        # more) are closed first so that no BAT is ever held twice (peak memory).
        above.close()
        for f in chain[k:]:
            f.close()
        if not data_done:
            # In-place (the top file is the one above the target): the mark goes into
            # the session that wrote linkage2, saving a session's start and clean close
            # (six fsyncs); it is still written only after the target is durable.
            _merge_data(upper, top, above.path, target_path, new_guid, summary, progress,
                        allow_clone, storage_of, mark if mark_top and k == 1 else None)
        for f in upper:
            f.close()  # reads are over; the mark below opens ``top`` for writing
        if mark_top and k > 1:
            st = storage_of(top.path)
            opened.append(st)
            with WritableDisk(top.path, standalone=True, storage=st) as w:
                w.update_parent_locator(mark)
        # 4. children of the merged child now hang directly off the target.
        for path in children:
            with WritableDisk(path, standalone=True, storage=child_storage[path]) as c:
                c.update_parent_locator({
                    "parent_linkage": "{%s}" % new_guid, "parent_linkage2": None,
                    "relative_path": relative_path(path, target_path),
                    "absolute_win32_path": absolute_win32_path(target_path),
                    "volume_path": None})
        # 4b. a child the interrupted run re-pointed may hold that change only in its
        # log (killed after the log's flush, before the apply): readers replay it in
        # memory, so it counts as re-pointed; apply it now, so that the family ends as
        # clean as after an uninterrupted merge.
        for path in finished:
            with ImageFile(path) as probe:
                dirty = probe.header.log_dirty
            if dirty:
                st = storage_of(path)
                opened.append(st)
                with WritableDisk(path, standalone=True, storage=st):
                    pass  # the writable open replays the log (FORMAT.md §6.4)
    except OSError as e:  # linkage2, mark or re-point: one line, and the way on
        raise _failure(e, target.path, top.path, "merge") from None
    finally:
        for st in opened:
            st.close()
    # 5. the merged files go only now that the target is durable; nearest the target
    # first, the top file last, so that a rerun still finds what is left (idempotent).
    if not keep:
        for f in reversed(upper):
            _unlink(f.path)
        summary.deleted = [f.path for f in upper]
    summary.seconds = time.monotonic() - t0
    return summary


def _merge_data(upper: list[ImageFile], top: ImageFile, above_path: str, target_path: str,
                new_guid: uuid.UUID, summary: MergeSummary, progress: ProgressFn | None,
                allow_clone: bool, storage_of: Callable[[str], Storage],
                mark: dict[str, str | None] | None = None) -> None:
    """Steps 1-3: linkage2 = G' above the target, G' in the target, then its blocks;
    then ``mark`` into the file above the target, in the same session."""
    st_a = storage_of(above_path)
    try:
        _merge_data_into(upper, top, above_path, target_path, new_guid, summary, progress,
                         allow_clone, storage_of, st_a, mark)
    finally:
        st_a.close()  # passed in, so the writers leave the storages open (and locked)


def _merge_data_into(upper: list[ImageFile], top: ImageFile, above_path: str, target_path: str,
                     new_guid: uuid.UUID, summary: MergeSummary, progress: ProgressFn | None,
                     allow_clone: bool, storage_of: Callable[[str], Storage], st_a: Storage,
                     mark: dict[str, str | None] | None) -> None:
    # The barriers of an in-place merge (17; bench_merge.py's JSON lists them by
    # call site), each one needed:
    # child, 9: session start, 3 (the header written to both slots, each flushed,
    #   FORMAT.md §2.2; the empty first entry, §6.5 step 1); linkage2's entry, 1
    #   (durable before the target takes G', else a crash leaves the child linked
    #   to neither GUID); the mark's entry, 2 (its pre-write barrier makes
    #   linkage2's apply durable, so the entry's Tail may be its own offset; then
    #   the entry itself, durable before any deletion); clean close, 3 (the apply
    #   durable before LogGuid = 0, then both header slots).
    # target, 8: session start with G', 3; each commit, 2 (payload durable before
    #   the entry exposing it, FORMAT.md §7 rule 5; the entry) - a clone-path merge
    #   commits once; clean close, 3.
    # Before, the mark took a session of its own on the child (+3 start, +3 close,
    # -1 pre-write barrier): 22.
    # 1. linkage2 = G' in the file directly above the target (its DataWriteGuid kept).
    with WritableDisk(above_path, standalone=True, storage=st_a) as a:
        upper[-1] = a.image
        upper_disk = VirtualDisk(upper)
        a.update_parent_locator({"parent_linkage2": "{%s}" % new_guid})
        st_t = storage_of(target_path)
        # 2. the target's header takes G'; 3. blocks and metadata through its log.
        try:
            t = WritableDisk(target_path, standalone=True, storage=st_t)
        except BaseException:
            st_t.close()
            raise
        state: dict[str, int | None] = {"size": st_t.size(), "seq": None}
        try:
            t.log.mark_data_changed(new_guid)
            if t.size < top.virtual_size:
                # The target takes the child's size (an IsVirtualDisk item); one logged
                # change, new blocks ZERO in a differencing target (FORMAT.md §8.3).
                t.resize(top.virtual_size)
                summary.warnings.append(f"target grew to the child's virtual size {top.virtual_size}")
            def committed() -> None:
                state["size"], state["seq"] = st_t.size(), t.log.sequence

            committed()
            _execute(t.blocks, t.commit, _Mover(st_t, upper, summary, allow_clone),
                     upper_disk, upper, summary, progress, committed)
            _sync_virtual_disk_items(t, top, summary)
            t.close()  # flush, then LogGuid = 0: the target is durable and clean
        except OSError as e:
            _roll_back(t, st_t, state)
            raise _failure(e, target_path, upper[0].path, "merge") from None
        except BaseException:
            _roll_back(t, st_t, state)
            raise
        finally:
            st_t.close()
        if mark is not None:
            # The target is durable and clean (closed above): the mark may say so. Its
            # log entry's pre-write barrier also makes linkage2's apply durable.
            a.update_parent_locator(mark)


def _roll_back(t: WritableDisk, st: Storage, state: dict[str, int | None]) -> None:
    """After a failure in the data phase: drop what no committed entry refers to.

    Uncommitted BAT changes are forgotten and the file is cut back to its size at
    the last commit (blocks allocated since are unreferenced), unless a log entry
    became durable in the failed step: its FlushedFileOffset may lie above, and
    the next writable open replays it. The chain reads as before either way: the
    upper chain masks every sector the target changed.
    """
    t.blocks.discard()
    try:
        size, seq = state["size"], state["seq"]
        if seq is not None and size is not None and t.log.sequence == seq and st.size() > size:
            st.truncate(size)
            st.flush()
    except OSError:
        pass  # the space stays allocated; `vhdx check` reports it
    try:
        t.close()
    except (OSError, VhdxError):
        pass


def _failure(e: OSError, target: str, child: str, operation: str,
             command: str | None = None) -> VhdxError:
    """One line for an I/O failure: the file, what stopped, the state, what to run."""
    from .errors import OperationFailedError

    what = e.strerror or str(e)
    where = e.filename if isinstance(e.filename, str) else target
    hint = " (free space)" if e.errno == errno.ENOSPC else ""
    if operation == "flatten":
        state, then = "the chain is unchanged and the partial output was removed", "run"
    else:
        state, then = "the chain is intact and reads as before", "run"
    return OperationFailedError(
        f"{where}: {operation} stopped: {what}; {state}; fix the cause{hint}, then {then} "
        f"`{command or f'vhdx merge {child}'}` again to complete it", e.errno)


def _execute(bm: BlockMap, commit: Callable[[], object], mover: _Mover, upper_disk: VirtualDisk,
             upper: list[ImageFile], summary: MergeSummary, progress: ProgressFn | None,
             committed: Callable[[], None] | None = None, report_bytes: int | None = None) -> None:
    """Plan and move every block through ``bm`` (a :class:`RecordingBlockMap` and a
    counting mover in a dry run); ``commit`` logs the pending changes, ``committed``
    is told after each (what a failure rolls back to). The mover runs (and progress
    is reported) every ``report_bytes`` queued, at a commit, and at the end."""
    ranges = defined_ranges(upper, upper_disk.size)
    total = sum(e - s for s, e in ranges)
    if report_bytes is None:
        report_bytes = CHUNK_BYTES  # read now: tests shrink it
    done = pending = 0
    last = time.monotonic()
    for p in plan_blocks(upper_disk, ranges, bm.geometry.block_size, bm.image):
        _apply_block(bm, p, mover, summary)
        pending += p.length
        due = bm.commit_due()
        report = mover.queued >= report_bytes or due
        if report:
            mover.run()
        if due or time.monotonic() - last >= BATCH_SECONDS:
            mover.run()
            commit()
            if committed is not None:
                committed()
            last = time.monotonic()
            report = True
        if report:
            done += pending
            pending = 0
            if progress is not None and progress(done, total) is False:
                raise CancelledError("merge cancelled; run it again to complete it")
    mover.run()
    # The transaction's pre-write barrier makes the payload durable before the
    # logged change that exposes it (FORMAT.md §7 rule 5).
    commit()
    if progress is not None:
        progress(total, total)


def _dry_run(target: Any, upper_disk: VirtualDisk, upper: list[ImageFile], summary: MergeSummary,
             progress: ProgressFn | None, grown: int | None = None) -> None:
    """The merge planned over a block map that records, with a mover that counts."""
    bm = RecordingBlockMap(target, grown=grown)
    _execute(bm, bm.commit, _CountingMover(summary), upper_disk, upper, summary, progress,
             report_bytes=PLAN_REPORT_BYTES)


class _EmptyImage:
    """Block states of a brand-new empty dynamic disk, for planning a flatten."""

    has_parent = False
    is_fixed = False

    def __init__(self, geometry: "Geometry") -> None:
        self.geometry = geometry
        self.virtual_size = geometry.virtual_size
        self.bat = _ZeroBat()

    def payload_runs(self, first: int = 0, stop: int | None = None) -> Iterator[tuple[int, int, int]]:
        return iter(())  # every block NOT_PRESENT


class _ZeroBat:
    def __getitem__(self, index: int) -> int:
        return 0

    def __len__(self) -> int:
        return 1 << 62


def _flatten(chain: list[ImageFile], output: str, dry_run: bool, progress: ProgressFn | None,
             allow_clone: bool, storage_factory: Callable[[str], Storage] | None, t0: float,
             warnings: list[str]) -> MergeSummary:
    from .layout import plan_layout, write_new_image

    from . import fileio

    top = chain[0]
    summary = MergeSummary("flatten", output, [f.path for f in chain], dry_run, warnings=list(warnings))
    # Refuses an existing output, a special file, a missing folder.
    fileio.inspect_output(output, allow_block=False, exists_hint="choose another name or remove it")
    plan = plan_layout(top.virtual_size, top.block_size, top.logical_sector_size,
                       top.physical_sector_size, virtual_disk_id=top.virtual_disk_id)
    upper_disk = VirtualDisk(chain)
    if dry_run:
        geo = Geometry(top.virtual_size, top.block_size, top.logical_sector_size, False)
        _dry_run(_EmptyImage(geo), upper_disk, chain, summary, progress)
        summary.seconds = time.monotonic() - t0
        return summary
    from .preflight import check_space

    geo = Geometry(top.virtual_size, top.block_size, top.logical_sector_size, False)
    empty = _EmptyImage(geo)
    folder = os.path.dirname(os.path.abspath(output))
    # The new file: what its layout writes (the rest stays sparse: headers, a log's
    # worth of entries, metadata, the BAT) plus a block for every block with data.
    layout = 2 * S.MiB + _align_up(8 * geo.total_entries, S.MiB)
    check_space(folder, layout + _planned_growth(chain, empty, top.virtual_size),
                "the flatten", output)
    # Created exclusively under an unpredictable name: a planted OUT.part symlink
    # (CWE-59) is never opened, let alone written through.
    fd, tmp = fileio.create_temp(output)
    storage = None
    try:
        with os.fdopen(os.dup(fd), "w+b") as fh:
            write_new_image(fh, plan)
        # Invisible until renamed: one fsync before the rename (DeferredSyncStorage).
        # The descriptor is kept: reopening the name could open a swapped-in file.
        if storage_factory:
            os.close(fd)
            fd = -1
            storage = storage_factory(tmp)
        else:
            storage = DeferredSyncStorage(fd)
            storage.path = output  # messages name the output, not the hidden temp
        fd = -1
        with WritableDisk(tmp, storage=storage) as t:
            t.log.mark_data_changed()
            _execute(t.blocks, t.commit, _Mover(t.storage, chain, summary, allow_clone),
                     upper_disk, chain, summary, progress)
            t.flush()
            t.log.close()
            if isinstance(storage, DeferredSyncStorage):
                storage.sync()
        storage.close()  # passed in, so the writer leaves it open (and locked)
        storage = None
        os.replace(tmp, output)
        fsync_dir(output)
    except BaseException as e:
        if storage is not None:
            storage.close()
        if fd >= 0:
            os.close(fd)
        fileio.discard_temp(tmp)
        if isinstance(e, OSError):
            raise _failure(e, output, top.path, "flatten",
                           f"vhdx merge {top.path} --output {output}") from None
        raise
    summary.seconds = time.monotonic() - t0
    return summary
