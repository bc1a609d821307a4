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
state change of ref §8.3's table; sectors the upper chain leaves undefined keep
the target's own content.

Crash safety (ref §8.3, MS-VHDX 2.6.2.6.3 footnote): a new DataWriteGuid G' for
the target is first stored as ``parent_linkage2`` in the file directly above it,
then put in the target's header; from then on the upper chain still opens on
the target. Every sector the merge changes in the target is masked by the upper
chain, payload is durable before the logged BAT / bitmap change that exposes
it, so the chain reads the same at every instant and running the merge again
completes it. Files are deleted only after the target is durable.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

from . import native
from . import structures as S
from .bat import Geometry, iter_nonzero
from .chain import IMAGE_SUFFIXES, accepted_linkages, open_chain
from .disk import ZERO, VirtualDisk
from .errors import (
    CancelledError,
    DependentDisksError,
    InvalidArgumentError,
    UnsupportedFeatureError,
    VhdxError,
)
from .image import ImageFile
from .storage import DeferredSyncStorage, FileStorage, Storage, fsync_dir
from .writer import WritableDisk, lock_exclusive

ProgressFn = Callable[[int, int], object]
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

    def to_dict(self) -> dict:
        d = asdict(self)
        d["bytes_moved"] = self.bytes_moved
        d["throughput"] = self.throughput
        return d


# --- planning ------------------------------------------------------------------------
def defined_ranges(upper: Sequence[ImageFile], size: int) -> list[tuple[int, int]]:
    """Sorted, merged virtual ranges in which any upper file has a non-NOT_PRESENT block,
    plus the ranges past a smaller upper file's end (which read zeros there)."""
    spans: list[tuple[int, int]] = []
    for img in upper:
        geo = img.geometry
        bs = geo.block_size
        # Every non-zero payload entry matters here: ZERO/UNDEFINED/UNMAPPED define zeros.
        for i, e in iter_nonzero(img.bat, spans=img.bat_spans):
            if geo.is_sb_index(i) or e & S.BAT_STATE_MASK == S.PAYLOAD_BLOCK_NOT_PRESENT:
                continue
            block = geo.block_of_index(i)
            if block < geo.payload_blocks:
                spans.append((block * bs, min(size, (block + 1) * bs)))
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


def plan_blocks(upper_disk: VirtualDisk, ranges: list[tuple[int, int]], block_size: int):  # noqa: ANN201
    """Yield a :class:`BlockPlan` for every target block that the upper chain touches."""
    current: BlockPlan | None = None
    size = upper_disk.size
    for start, end in ranges:
        pos = start
        while pos < end:
            block = pos // block_size
            bstart = block * block_size
            bend = min(bstart + block_size, size)
            n = min(end, bend) - pos
            if current is None or current.block != block:
                if current is not None:
                    _finish(current)
                    yield current
                current = BlockPlan(block, bstart, bend - bstart, [], [], False)
            for rel, length, src, foff in upper_disk.segments(pos, n):
                v = pos + rel
                if src >= 0:
                    current.data.append((v, length, src, foff))
                elif src == ZERO:
                    current.zeros.append((v, length))
            pos += n
    if current is not None:
        _finish(current)
        yield current


def _finish(p: BlockPlan) -> None:
    covered = sum(n for _, n, _, _ in p.data) + sum(n for _, n in p.zeros)
    p.fully_defined = covered == p.length


# --- dependents (siblings) -------------------------------------------------------------
def find_dependents(dirs: Sequence[str], guids: dict[uuid.UUID, str],
                    exclude: Sequence[str]) -> list[tuple[str, str]]:
    """(path, parent path) of every image in ``dirs`` that links to one of ``guids``
    (DataWriteGuid -> path of the file that has it), other than ``exclude``."""
    found: list[tuple[str, str]] = []
    seen: set[tuple[int, int]] = set()
    excluded = set()
    for p in exclude:
        try:
            st = os.stat(p)
            excluded.add((st.st_dev, st.st_ino))
        except OSError:
            pass
    for d in dict.fromkeys(dirs):
        try:
            names = sorted(os.listdir(d))
        except OSError:
            continue
        for name in names:
            if not name.lower().endswith(IMAGE_SUFFIXES):
                continue
            path = os.path.join(d, name)
            try:
                st = os.stat(path)
            except OSError:
                continue
            ident = (st.st_dev, st.st_ino)
            if ident in excluded or ident in seen:
                continue
            seen.add(ident)
            try:
                with ImageFile(path) as img:
                    links = accepted_linkages(img.parent_locator or {}) if img.has_parent else set()
            except VhdxError:
                continue
            for g in links:
                if g in guids:
                    found.append((path, guids[g]))
                    break
    return found


# --- execution helpers ---------------------------------------------------------------------
class _Mover:
    """Copies and zero-fills into the target, through the C engine when the target's
    storage is a plain file (else through the storage, so tests can record it)."""

    def __init__(self, target: WritableDisk, upper: Sequence[ImageFile], summary: MergeSummary,
                 allow_clone: bool) -> None:
        self.target = target
        self.upper = upper
        self.summary = summary
        self.allow_clone = allow_clone
        # Exactly a plain file (subclasses, such as the tests' recorders, see every write).
        self.native = type(target.storage) in (FileStorage, DeferredSyncStorage)
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
        st = self.target.storage
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


def _advise_dontneed(fadvise: Callable, fd: int, ranges: list[tuple[int, int, int]],
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


def _apply_block(t: WritableDisk, p: BlockPlan, mover: _Mover | None, summary: MergeSummary) -> None:
    """Merge one block per ref §8.3's table (``mover`` None: dry run, count only)."""
    img = t.image
    geo = img.geometry
    lss = geo.logical_sector_size
    idx = geo.payload_index(p.block)
    # Planning past the end of a target that the merge will grow: the new blocks
    # will be ZERO in a differencing target and NOT_PRESENT in a base (resize.py).
    e = img.bat[idx] if idx < len(img.bat) else (S.PAYLOAD_BLOCK_ZERO if img.has_parent else 0)
    state = e & S.BAT_STATE_MASK
    foff = e & S.BAT_OFFSET_MASK
    has_data = bool(p.data)
    summary.blocks_changed += 1

    def fill(base: int, zero_existing: bool) -> None:
        for v, n, src, soff in p.data:
            if mover:
                mover.copy(src, soff, base + v - p.start, n)
            else:
                summary.bytes_copied += n
        if zero_existing:
            for v, n in p.zeros:
                if mover:
                    mover.zero(base + v - p.start, n)
                else:
                    summary.bytes_zeroed += n

    def set_entry(state_: int, offset: int) -> None:
        if mover:
            t._set_entry(idx, S.bat_entry(state_, offset))

    def set_defined_bits() -> None:
        if not mover:
            return
        for v, n, *_ in p.data:
            t._set_bits(p.block, (v - p.start) // lss, n // lss)
        for v, n in p.zeros:
            t._set_bits(p.block, (v - p.start) // lss, n // lss)

    if state == S.PAYLOAD_BLOCK_FULLY_PRESENT:
        if p.fully_defined and not has_data and not img.is_fixed:
            set_entry(S.PAYLOAD_BLOCK_ZERO, 0)  # whole block zero: no data to write
        else:
            fill(foff, True)
    elif state == S.PAYLOAD_BLOCK_PARTIALLY_PRESENT:
        if p.fully_defined and not has_data:
            set_entry(S.PAYLOAD_BLOCK_ZERO, 0)
        else:
            fill(foff, True)
            if p.fully_defined:
                set_entry(S.PAYLOAD_BLOCK_FULLY_PRESENT, foff)
            else:
                set_defined_bits()
    elif state == S.PAYLOAD_BLOCK_NOT_PRESENT and img.has_parent:
        if p.fully_defined and not has_data:
            set_entry(S.PAYLOAD_BLOCK_ZERO, 0)  # never NOT_PRESENT: it would expose the parent
        else:
            new = t._allocate(geo.block_size) if mover else 0
            fill(new, False)  # a fresh block reads zeros already
            if p.fully_defined:
                set_entry(S.PAYLOAD_BLOCK_FULLY_PRESENT, new)
            else:
                if mover:
                    t._ensure_sb(p.block // geo.chunk_ratio)
                set_entry(S.PAYLOAD_BLOCK_PARTIALLY_PRESENT, new)
                set_defined_bits()
    else:
        # NOT_PRESENT in a base, ZERO, UNDEFINED, UNMAPPED: the block reads zeros, so
        # only data matters; a fresh block zero-fills everything else.
        if not has_data:
            summary.blocks_changed -= 1
            return
        new = t._allocate(geo.block_size) if mover else 0
        fill(new, False)
        set_entry(S.PAYLOAD_BLOCK_FULLY_PRESENT, new)


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


def _relative_locator_path(child: str, parent: str) -> str:
    rel = os.path.relpath(parent, os.path.dirname(os.path.abspath(child)))
    rel = rel.replace(os.sep, "\\")
    return rel if rel.startswith("..") else ".\\" + rel


# --- the engine ------------------------------------------------------------------------------
def merge(child: str | os.PathLike[str], into: str | os.PathLike[str] | None = None,
          output: str | os.PathLike[str] | None = None, *, dry_run: bool = False,
          keep: bool = False, force: bool = False, progress: ProgressFn | None = None,
          parents: Sequence[str | os.PathLike[str]] | None = None,
          search_dirs: Sequence[str | os.PathLike[str]] = (), ignore_linkage: bool = False,
          allow_clone: bool = True,
          storage_factory: Callable[[str], Storage] | None = None) -> MergeSummary:
    """Merge ``child`` into its parent (or ``into``), or flatten it into ``output``.

    Returns a :class:`MergeSummary`. Refuses, naming them, when other disks depend
    on what the merge changes (siblings of the child), unless ``force``.
    ``storage_factory`` (tests) supplies the Storage for every file written.
    """
    t0 = time.monotonic()
    chain, warnings = open_chain(child, parents, search_dirs, ignore_linkage)
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
        return _merge_into(chain, k, dry_run, keep, force, progress, search_dirs,
                           allow_clone, storage_factory, t0, warnings)
    finally:
        for f in chain:
            f.close()


def _execute(t: WritableDisk, upper_disk: VirtualDisk, upper: list[ImageFile], summary: MergeSummary,
             dry_run: bool, progress: ProgressFn | None, allow_clone: bool) -> None:
    ranges = defined_ranges(upper, upper_disk.size)
    total = sum(e - s for s, e in ranges)
    mover = None if dry_run else _Mover(t, upper, summary, allow_clone)
    done = pending = 0
    committed = time.monotonic()
    for p in plan_blocks(upper_disk, ranges, t.image.geometry.block_size):
        _apply_block(t, p, mover, summary)
        pending += p.length
        if mover is None:
            report = pending >= PLAN_REPORT_BYTES
        else:
            report = mover.queued >= CHUNK_BYTES or t._commit_due()
            if report:
                mover.run()
            if t._commit_due() or time.monotonic() - committed >= BATCH_SECONDS:
                mover.run()
                t._commit()
                committed = time.monotonic()
                report = True
        if report:
            done += pending
            pending = 0
            if progress is not None and progress(done, total) is False:
                raise CancelledError("merge cancelled; run it again to complete it")
    if mover is not None:
        mover.run()
        # The transaction's pre-write barrier makes the payload durable before the
        # logged change that exposes it (ref §7 rule 5c).
        t._commit()
    if progress is not None:
        progress(total, total)


def _merge_into(chain: list[ImageFile], k: int, dry_run: bool, keep: bool, force: bool,
                progress: ProgressFn | None, search_dirs: Sequence, allow_clone: bool,
                storage_factory: Callable[[str], Storage] | None, t0: float,
                warnings: list[str]) -> MergeSummary:
    top, target, above = chain[0], chain[k], chain[k - 1]
    upper = chain[:k]
    summary = MergeSummary("in-place" if k == 1 else "into-ancestor", target.path,
                           [f.path for f in upper], dry_run, warnings=list(warnings))
    if top.virtual_size < target.virtual_size:
        # Hyper-V never makes a child smaller than its parent; dropping the target's
        # tail would need a shrink that discards data, which this engine refuses.
        raise UnsupportedFeatureError(
            f"the child's virtual size ({top.virtual_size}) is smaller than the target's "
            f"({target.virtual_size}); merging would discard the target's tail")

    # Who else depends on what changes: the target and the intermediates (their
    # children other than our chain would read merged data); children of the
    # merged child are re-pointed to the target instead.
    dirs = [os.path.dirname(os.path.abspath(f.path)) for f in chain] + [os.fspath(d) for d in search_dirs]
    changed = {f.data_write_guid: f.path for f in chain[1:k + 1]}
    dependents = find_dependents(dirs, changed, [f.path for f in chain])
    children = find_dependents(dirs, {top.data_write_guid: top.path}, [f.path for f in chain])
    if dependents:
        names = ", ".join(f"{p} (child of {q})" for p, q in dependents)
        if not force:
            raise DependentDisksError(
                f"other disks depend on the merge target and would be corrupted: {names}; "
                "merge or delete them first, or use --force")
        summary.invalidated = [p for p, _ in dependents]
    summary.repointed = [p for p, _ in children]

    if dry_run:
        upper_disk = VirtualDisk(upper)  # shares the ImageFiles, which ``chain`` owns
        _execute(_PlanOnly(target), upper_disk, upper, summary, True, progress, allow_clone)
        summary.seconds = time.monotonic() - t0
        return summary

    for f in upper[:-1]:
        lock_exclusive(f.fd, f.path)
    mk = (lambda p: storage_factory(p)) if storage_factory else (lambda p: None)
    # Resuming an interrupted merge: if the target already carries the GUID the file
    # above names as linkage2, keep it. A fresh one would first replace linkage2 and a
    # crash right then would leave that file linked to neither of the target's GUIDs.
    from .chain import parse_linkage

    previous = parse_linkage((above.parent_locator or {}).get("parent_linkage2"))
    new_guid = previous if previous == target.data_write_guid else uuid.uuid4()
    target_path = target.path
    # Writable opens are standalone: metadata edits and whole-sector merges never
    # read through parents, and each BAT is then held once (ref: bench/RESULTS.md).
    # The read plan will use the writable open's parse of ``above``, and the target
    # is reopened writable; their read-only opens (and the ancestors, not needed any
    # more) are closed first so that no BAT is ever held twice (peak memory).
    above.close()
    for f in chain[k:]:
        f.close()
    # 1. linkage2 = G' in the file directly above the target (its DataWriteGuid kept).
    with WritableDisk(above.path, standalone=True, storage=mk(above.path)) as a:
        upper[-1] = a.image
        upper_disk = VirtualDisk(upper)
        a.update_parent_locator({"parent_linkage2": "{%s}" % new_guid})
        # 2. the target's header takes G'; 3. blocks and metadata through its log.
        with WritableDisk(target_path, standalone=True, storage=mk(target_path)) as t:
            t.log.mark_data_changed(new_guid)
            if t.size < top.virtual_size:
                # The target takes the child's size (an IsVirtualDisk item); one logged
                # change, new blocks ZERO in a differencing target (ref §8.3).
                t.resize(top.virtual_size)
                summary.warnings.append(f"target grew to the child's virtual size {top.virtual_size}")
            _execute(t, upper_disk, upper, summary, False, progress, allow_clone)
            _sync_virtual_disk_items(t, top, summary)
            t.flush()
    # 4. children of the merged child now hang directly off the target.
    for path in summary.repointed:
        with WritableDisk(path, standalone=True, storage=mk(path)) as c:
            c.update_parent_locator({
                "parent_linkage": "{%s}" % new_guid, "parent_linkage2": None,
                "relative_path": _relative_locator_path(path, target_path),
                "absolute_win32_path": "\\\\?\\" + os.path.abspath(target_path).replace("/", "\\"),
                "volume_path": None})
    # 5. the merged files go only now that the target is durable.
    if not keep:
        for f in upper:
            os.unlink(f.path)
            summary.deleted.append(f.path)
        fsync_dir(target_path)
    summary.seconds = time.monotonic() - t0
    return summary


class _PlanOnly:
    """Stand-in for a WritableDisk in a dry run: the target's block states, no writes."""

    def __init__(self, image: object) -> None:
        self.image = image


class _EmptyImage:
    """Block states of a brand-new empty dynamic disk, for planning a flatten."""

    has_parent = False
    is_fixed = False

    def __init__(self, geometry: "Geometry") -> None:
        self.geometry = geometry
        self.bat = _ZeroBat()


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
        _execute(_PlanOnly(_EmptyImage(geo)), upper_disk, chain, summary, True, progress, allow_clone)
        summary.seconds = time.monotonic() - t0
        return summary
    # Created exclusively under an unpredictable name: a planted OUT.part symlink
    # (CWE-59) is never opened, let alone written through.
    fd, tmp = fileio.create_temp(output)
    try:
        with os.fdopen(os.dup(fd), "w+b") as fh:
            write_new_image(fh, plan)
        # Invisible until renamed: one fsync before the rename (DeferredSyncStorage).
        # The descriptor is kept: reopening the name could open a swapped-in file.
        if storage_factory:
            os.close(fd)
            storage = storage_factory(tmp)
        else:
            storage = DeferredSyncStorage(fd)
            storage.path = output  # messages name the output, not the hidden temp
        fd = -1
        with WritableDisk(tmp, storage=storage) as t:
            t.log.mark_data_changed()
            _execute(t, upper_disk, chain, summary, False, progress, allow_clone)
            t.flush()
            t.log.close()
            if isinstance(storage, DeferredSyncStorage):
                storage.sync()
        os.replace(tmp, output)
        fsync_dir(output)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        fileio.discard_temp(tmp)
        raise
    summary.seconds = time.monotonic() - t0
    return summary
