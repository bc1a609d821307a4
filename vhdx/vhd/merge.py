"""Merging differencing VHD / AVHD chains (``vhdx merge`` on .avhd files).

Modes, as for VHDX (:func:`vhdx.merge`): the child into its parent in place
(default), the child and every file up to ``into`` folded into that ancestor,
or ``output``: the chain flattened into a new standalone VHD or VHDX (the
converter's path; the originals stay untouched).

In place. The files above the target ("upper") are resolved newest-first with
the reader's own resolver, restricted to their allocated blocks; every sector
they define is copied into the target (marked all-zero sectors too: they hide
older data, ref §11) through the C copy engine (:func:`vhdx.native.copy_ranges`:
clone / copy_file_range / read-write). Until the upper files are removed they
mask every sector the merge writes, so the chain reads the same at every instant
and the target's own ordering only has to keep that file valid
(:meth:`VhdWritableDisk.prepare_masked`); the target is flushed, children of the
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
from collections.abc import Callable, Sequence

from .. import native
from ..errors import (
    CancelledError,
    DependentDisksError,
    InvalidArgumentError,
    UnsupportedFeatureError,
    VhdxError,
)
from ..merge_engine import MergeSummary
from ..fdio import fsync_dir
from . import structures as S
from .chain import VHD_SUFFIXES, open_chain
from .create import parent_fields
from .disk import VhdDisk
from .file import VhdFile

ProgressFn = Callable[[int, int], object]
PathLike = str | os.PathLike[str]
BATCH_BLOCKS = 256  # blocks prepared per pair of barriers
_METHODS = {native.CLONE: "clone", native.COPY_FILE_RANGE: "copy_file_range",
            native.READ_WRITE: "read_write", native.NONE: "none"}


def find_vhd_dependents(dirs: Sequence[str], ids: dict[bytes, str], exclude: Sequence[str]) -> list[tuple[str, str]]:
    """(path, parent path) of every VHD in ``dirs`` whose Parent Unique ID is one of
    ``ids`` (Unique Id -> path), other than ``exclude``."""
    excluded = set()
    for p in exclude:
        try:
            st = os.stat(p)
            excluded.add((st.st_dev, st.st_ino))
        except OSError:
            pass
    found, seen = [], set()
    for d in dict.fromkeys(dirs):
        try:
            names = sorted(os.listdir(d))
        except OSError:
            continue
        for name in names:
            if not name.lower().endswith(VHD_SUFFIXES):
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
                with VhdFile(path, ignore_checksums=True) as f:
                    puid = f.parent_unique_id
            except VhdxError:
                continue
            if puid is not None and puid in ids:
                found.append((path, ids[puid]))
    return found


def merge_vhd(child: PathLike, into: PathLike | None = None, output: PathLike | None = None, *,
              dry_run: bool = False, keep: bool = False, force: bool = False,
              progress: ProgressFn | None = None, parents: Sequence[PathLike] | None = None,
              search_dirs: Sequence[PathLike] = (), ignore_linkage: bool = False,
              storage_factory: Callable[[str], object] | None = None) -> MergeSummary:
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


def _flatten(child: PathLike, output: str, dry_run: bool, progress: ProgressFn | None,
             parents, search_dirs, ignore_linkage: bool, t0: float) -> MergeSummary:
    from ..disk import open as open_disk

    with open_disk(child, parents=parents, search_dirs=search_dirs, ignore_linkage=ignore_linkage) as d:
        files = [f.path for f in d.chain]
        data = sum(e.length for e in d.extents() if e.kind == "data")
        warnings = list(d.warnings)
    summary = MergeSummary("flatten", output, files, dry_run, warnings=warnings)
    if os.path.exists(output):
        raise VhdxError(f"{output}: already exists")
    if not dry_run:
        bar = (lambda done, *_: progress(done, data)) if progress else None
        if output.lower().endswith((".vhdx", ".avhdx")):
            from ..convert import convert_to_vhdx

            convert_to_vhdx(child, output, parents=parents, search_dirs=search_dirs,
                            ignore_linkage=ignore_linkage, progress=bar)
        else:
            from .convert import convert_to_vhd

            convert_to_vhd(child, output, parents=parents, search_dirs=search_dirs,
                           ignore_linkage=ignore_linkage, progress=bar)
    summary.bytes_copied = data
    summary.seconds = time.monotonic() - t0
    return summary


def _plan(upper_disk: VhdDisk, upper: list[VhdFile], target: VhdFile):
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
                progress: ProgressFn | None, search_dirs: Sequence, storage_factory, t0: float,
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
    dirs = [os.path.dirname(os.path.abspath(f.path)) for f in chain] + [os.fspath(d) for d in search_dirs]
    paths = [f.path for f in chain]
    dependents = find_vhd_dependents(dirs, {f.unique_id: f.path for f in chain[1:k + 1]}, paths)
    children = find_vhd_dependents(dirs, {top.unique_id: top.path}, paths)
    if dependents:
        names = ", ".join(f"{p} (child of {q})" for p, q in dependents)
        if not force:
            raise DependentDisksError(f"other disks depend on the merge target and would be corrupted: "
                                      f"{names}; merge or delete them first, or use --force")
        summary.invalidated = [p for p, _ in dependents]
    summary.repointed = [p for p, _ in children]
    upper_disk = VhdDisk(list(upper), [])  # shares the VhdFiles, which ``chain`` owns
    plan = list(_plan(upper_disk, upper, target))
    total = sum(ln for _, segs in plan for _, ln, _, _ in segs)
    if dry_run:
        summary.blocks_changed = len(plan)
        summary.bytes_copied = total
        summary.seconds = time.monotonic() - t0
        return summary
    from ..writer import lock_exclusive

    for f in upper:  # no writer may change what is being merged (LockedError otherwise)
        lock_exclusive(f.fd, f.path)
    storage = storage_factory(target.path) if storage_factory else None
    done = 0
    target_path = target.path
    with VhdWritableDisk(target_path, parents=None if k + 1 >= len(chain) else [f.path for f in chain[k + 1:]],
                         storage=storage) as t:
        out_fd = getattr(t.storage, "fd", None)
        for i in range(0, len(plan), BATCH_BLOCKS):
            batch = plan[i:i + BATCH_BLOCKS]
            where: dict[int, int | None]
            if t.top.is_fixed:
                where = {tb: None for tb, _ in batch}
            else:
                bs = t.top.block_size
                wanted = {tb: [((v - tb * bs) // S.SECTOR, ln // S.SECTOR) for v, ln, _, _ in segs]
                          for tb, segs in batch}
                where = dict(t.prepare_masked(wanted))
            by_src: dict[int, list[tuple[int, int, int]]] = {}
            for tb, segs in batch:
                for v, ln, src, foff in segs:
                    dst = v if where[tb] is None else where[tb] + v - tb * t.top.block_size
                    by_src.setdefault(src, []).append((foff, dst, ln))
            for src, ranges in by_src.items():
                if out_fd is None:  # a test storage without a descriptor: plain writes
                    for foff, dst, ln in ranges:
                        t.storage.pwrite(dst, os.pread(upper[src].fd, ln, foff))
                        summary.bytes_copied += ln
                    continue
                methods = native.copy_ranges(upper[src].fd, out_fd, ranges)
                for (_, _, ln), m in zip(ranges, methods):
                    name = _METHODS.get(m, str(m))
                    summary.ranges_by_method[name] = summary.ranges_by_method.get(name, 0) + 1
                    if m == native.CLONE:
                        summary.bytes_cloned += ln
                    else:
                        summary.bytes_copied += ln
            if out_fd is not None and hasattr(t.storage, "note_external_write"):
                t.storage.note_external_write()  # the copy engine wrote past the storage
            summary.blocks_changed += len(batch)
            done += sum(ln for _, segs in batch for _, ln, _, _ in segs)
            if progress is not None and progress(done, total) is False:
                t.flush()
                raise CancelledError("merge cancelled; run it again to complete it")
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
        for off, data in writes:  # locator data first: unused until the header names it
            st.pwrite(off, data)
        st.flush()
        st.pwrite(hoff, header)
        st.flush()
    finally:
        st.close()
