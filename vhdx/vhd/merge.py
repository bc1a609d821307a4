"""Merging differencing VHD / AVHD chains (``vhdx merge`` on .avhd files).

Modes, as for VHDX (:func:`vhdx.merge`): the child into its parent in place
(default), the child and every file up to ``into`` folded into that ancestor,
or ``output``: the chain flattened into a new standalone VHD or VHDX (the
converter's path; the originals stay untouched).

In place. The files above the target ("upper") are resolved newest-first with
the reader's own resolver, restricted to their allocated blocks; every sector
they define is copied into the target (marked all-zero sectors too: they hide
older data, vhd.md §11) through the C copy engine (:func:`vhdx.native.copy_ranges`:
clone / copy_file_range / read-write). Until the upper files are removed they
mask every sector the merge writes, so the chain reads the same at every instant
and the target's own ordering only has to keep that file valid
(:meth:`VhdWritableDisk.prepare_masked`: bitmaps and BAT entries of up to
PREPARE_BLOCKS blocks behind two barriers, BAT entries of consecutive blocks in
one write). The data then moves in 64 MiB rounds through the VHDX merge
engine's mover (``merge_engine._Mover``: the C copy engine, coalesced ranges,
writeback started behind each round, so the last fsync overlaps the copy), with
progress and cancellation between rounds; the target is flushed, children of the
merged child are re-pointed to the target (Parent Unique ID, time stamp, name and
locators, one 1 KiB header write), and only then are the merged files deleted.
An interrupted merge is completed by running it again (the copies are
idempotent). VHD cannot record that a target changed (its Unique Id stays), so
other children of the target or of an intermediate (siblings, other checkpoint
branches) are refused unless ``force``: they would silently read merged data.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence

from ..dependents import search_folders
from ..errors import (
    CancelledError,
    DependentDisksError,
    InvalidArgumentError,
    OutputExistsError,
    UnsupportedFeatureError,
    VhdxError,
)
from ..fdio import fsync_dir
from ..merge_engine import CHUNK_BYTES, MergeSummary, ProgressFn
from ..merge_engine import RangeMover  # the VHDX engine's data mover, shared (see _move)
from ..storage import Storage
from ..writer import lock_exclusive
from . import structures as S
from .chain import find_vhd_linked, open_chain
from .create import parent_fields
from .disk import VhdDisk
from .file import VhdFile

PathLike = str | os.PathLike[str]
# Target blocks whose bitmaps and BAT entries are prepared per pair of barriers
# (all of a 16 GiB merge of 2 MiB blocks): the barriers then find the target
# clean, and the data moves after them in CHUNK_BYTES rounds with writeback
# started behind each, so the final fsync overlaps the copy instead of
# following it.
PREPARE_BLOCKS = 8192


def merge_vhd(child: PathLike, into: PathLike | None = None, output: PathLike | None = None, *,
              dry_run: bool = False, keep: bool = False, force: bool = False,
              progress: ProgressFn | None = None, parents: Sequence[PathLike] | None = None,
              search_dirs: Sequence[PathLike] = (), ignore_linkage: bool = False,
              storage_factory: Callable[[str], Storage] | None = None) -> MergeSummary:
    """Merge the VHD chain of ``child``; see the module docstring. ``storage_factory``
    (tests) supplies the Storage the target is written through."""
    t0 = time.monotonic()
    if output is not None:
        if into is not None:
            raise InvalidArgumentError("give either an ancestor to merge into or an output, not both")
        return _flatten(child, os.fspath(output), dry_run, progress, parents, search_dirs, ignore_linkage, t0)
    chain, warnings = open_chain(child, parents, search_dirs, ignore_linkage)
    try:
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
        return _merge_into(chain, k, dry_run, keep, force, progress, search_dirs, storage_factory,
                           t0, warnings)
    finally:
        for f in chain:
            f.close()


def _bytes_done(progress: ProgressFn | None, total: int) -> Callable[[int], None] | None:
    """A one-argument progress callback over ``progress(done, total)``."""
    if progress is None:
        return None

    def report(done: int) -> None:
        progress(done, total)

    return report


def _flatten(child: PathLike, output: str, dry_run: bool, progress: ProgressFn | None,
             parents: Sequence[PathLike] | None, search_dirs: Sequence[PathLike], ignore_linkage: bool,
             t0: float) -> MergeSummary:
    from .disk import open_vhd as open_disk

    with open_disk(child, parents=parents, search_dirs=search_dirs, ignore_linkage=ignore_linkage) as d:
        files = [f.path for f in d.chain]
        data = sum(e.length for e in d.extents() if e.kind == "data")
        warnings = list(d.warnings)
    summary = MergeSummary("flatten", output, files, dry_run, warnings=warnings)
    if os.path.exists(output):
        raise OutputExistsError(os.fspath(output))
    if not dry_run:
        bar = (lambda done, *_: progress(done, data)) if progress else None
        if output.lower().endswith((".vhdx", ".avhdx")):
            from ..convert import convert_to_vhdx, disk_source

            src = disk_source(os.fspath(child), open_disk(child, parents=parents, search_dirs=search_dirs,
                                                          ignore_linkage=ignore_linkage))
            try:
                convert_to_vhdx(src, output, progress=bar)
            finally:
                src.close()
        else:
            from .convert import convert_to_vhd

            convert_to_vhd(child, output, parents=parents, search_dirs=search_dirs, ignore_linkage=ignore_linkage,
                           progress=_bytes_done(progress, data))
    summary.bytes_copied = data
    summary.seconds = time.monotonic() - t0
    return summary


def _plan(upper_disk: VhdDisk, upper: list[VhdFile],
          target: VhdFile) -> Iterator[tuple[int, list[tuple[int, int, int, int]]]]:
    """Per target block: [(virtual offset, length, upper index, file offset)] defined above."""
    size = upper_disk.size
    bs = target.block_size if not target.is_fixed else 2 * 1024 * 1024
    blocks: set[int] = set()
    for f in upper:
        for b, _ in f.allocated_blocks():
            lo, hi = b * f.block_size, min(size, (b + 1) * f.block_size)
            blocks.update(range(lo // bs, -(-hi // bs)))
    for tb in sorted(blocks):
        start = tb * bs
        n = min(bs, size - start)
        if n <= 0:
            continue
        segs = [(start + pos, ln, src, foff) for pos, ln, src, foff in upper_disk.segments(start, n) if src >= 0]
        if segs:
            yield tb, segs


def _merge_into(chain: list[VhdFile], k: int, dry_run: bool, keep: bool, force: bool,
                progress: ProgressFn | None, search_dirs: Sequence[PathLike],
                storage_factory: Callable[[str], Storage] | None, t0: float,
                warnings: list[str]) -> MergeSummary:
    from .writer import VhdWritableDisk

    top, target = chain[0], chain[k]
    upper = chain[:k]
    summary = MergeSummary("in-place" if k == 1 else "into-ancestor", target.path,
                           [f.path for f in upper], dry_run, warnings=list(warnings))
    for f in upper:
        if f.footer.saved_state:
            raise UnsupportedFeatureError(f"{f.path}: the disk is in a saved state; refusing to merge it")
    if top.virtual_size != target.virtual_size:
        raise UnsupportedFeatureError(f"the child's virtual size ({top.virtual_size}) differs from the "
                                      f"target's ({target.virtual_size}); VHD merges need equal sizes")
    dirs = search_folders([f.path for f in chain], search_dirs)
    paths = [f.path for f in chain]
    dependents = find_vhd_linked(dirs, {f.unique_id: f.path for f in chain[1:k + 1]}, paths)
    children = find_vhd_linked(dirs, {top.unique_id: top.path}, paths)
    if dependents:
        names = ", ".join(f"{p} (child of {q})" for p, q in dependents)
        if not force:
            raise DependentDisksError(f"other disks depend on the merge target and would be corrupted: "
                                      f"{names}; merge or delete them first, or use --force")
        summary.invalidated = [p for p, _ in dependents]
    summary.repointed = [p for p, _ in children]
    upper_disk = VhdDisk(list(upper), [])  # type: ignore[arg-type]  # shares the VhdFiles ``chain`` owns
    plan = list(_plan(upper_disk, upper, target))
    total = sum(ln for _, segs in plan for _, ln, _, _ in segs)
    if dry_run:
        summary.blocks_changed = len(plan)
        summary.bytes_copied = total
        summary.seconds = time.monotonic() - t0
        return summary
    for f in upper:  # no writer may change what is being merged (LockedError otherwise)
        lock_exclusive(f.fd, f.path)
    done = 0
    target_path = target.path
    target.close()  # its reader's lock would refuse the writer below (the plan is made)
    storage = storage_factory(target_path) if storage_factory else None
    with VhdWritableDisk(target_path, parents=None if k + 1 >= len(chain) else [f.path for f in chain[k + 1:]],
                         storage=storage, dependents=False) as t:  # dependents: checked above
        mover = RangeMover(t.storage, upper, summary, True)  # type: ignore[arg-type]  # duck-typed: .storage, .fd, .read_file
        bs = t.top.block_size
        for i in range(0, len(plan), PREPARE_BLOCKS):
            batch = plan[i:i + PREPARE_BLOCKS]
            where: dict[int, int | None]
            if t.top.is_fixed:
                where = {tb: None for tb, _ in batch}
            else:
                wanted = {tb: [((v - tb * bs) // S.SECTOR, ln // S.SECTOR) for v, ln, _, _ in segs]
                          for tb, segs in batch}
                where = dict(t.prepare_masked(wanted))
            for tb, segs in batch:
                base = where[tb]
                for v, ln, src, foff in segs:
                    mover.copy(src, foff, v if base is None else base + v - tb * bs, ln)
                summary.blocks_changed += 1
                if mover.queued >= CHUNK_BYTES:
                    done = _move(mover, t, done, total, progress)
            done = _move(mover, t, done, total, progress)
        t.storage.flush()  # the target is durable before anything stops masking it
    for path in summary.repointed:
        repoint(path, target_path)
    if not keep:
        for f in upper:
            os.unlink(f.path)
            summary.deleted.append(f.path)
        fsync_dir(target_path)
    summary.seconds = time.monotonic() - t0
    return summary


def _move(mover: RangeMover, t: object, done: int, total: int, progress: ProgressFn | None) -> int:
    """Move what ``mover`` holds; report progress; cancel (after a flush) when asked."""
    done += mover.queued
    mover.run()
    if progress is not None and progress(done, total) is False:
        t.flush()  # type: ignore[attr-defined]
        raise CancelledError("merge cancelled; run it again to complete it")
    return done


def repoint(child_path: str, parent_path: str) -> None:
    """Make ``child_path`` a child of ``parent_path``: Parent Unique ID, time stamp,
    Unicode name and the W2ku/W2ru locator data, in the slots and space it has."""
    from ..storage import FileStorage

    with VhdFile(parent_path) as p:
        fields = parent_fields(child_path, p)
    with VhdFile(child_path) as c:
        h = c.header
        hoff = c.header_offset
        locs = []
        writes = []
        for ent in h.locators:
            d = {k: v for k, v in dict(ent).items() if not k.startswith("_")}
            code = bytes(ent.platform_code)
            value = {S.PLATFORM_W2KU: fields["w2ku"], S.PLATFORM_W2RU: fields["w2ru"]}.get(code)
            if value is not None:
                data = value.encode("utf-16-le")
                room = ent.data_space if ent.data_space >= 512 else ent.data_space * S.SECTOR
                if len(data) > room:
                    raise VhdxError(f"{child_path}: no room for the new parent path in locator {code!r}")
                d["data_length"] = len(data)
                writes.append((ent.data_offset, data))
            elif code != S.PLATFORM_NONE:
                d = dict(d, platform_code=S.PLATFORM_NONE, data_space=0, data_length=0, data_offset=0)
            locs.append(d)
        obj = {k: v for k, v in dict(h).items() if not k.startswith("_") and k != "cookie"}
        name = fields["name"]
        if len(name) > S.MAX_PARENT_NAME_UNITS:
            name = os.path.basename(parent_path)
        obj.update(parent_unique_id=fields["unique_id"], parent_timestamp=fields["timestamp"],
                   parent_unicode_name=name.encode("utf-16-be").ljust(512, b"\0")[:512], locators=locs)
        header = S.build_header(**obj)
    st = FileStorage.open(child_path, writable=True)
    try:
        lock_exclusive(st.fd, child_path)  # a VM running on the child refuses the rewrite
        for off, data in writes:  # locator data first: unused until the header names it
            st.pwrite(off, data)
        st.flush()
        st.pwrite(hoff, header)
        st.flush()
    finally:
        st.close()
