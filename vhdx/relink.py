"""Point a differencing disk at its parent's new location (``Set-VHD -ParentPath``).

Two jobs, one rule: the child's parent locator item (MS-VHDX 2.6.2.6) is rewritten
through the child's log (:meth:`WritableDisk.update_parent_locator`, one log
entry), so a crash leaves either the old or the new locator, never a torn one.
The child's DataWriteGuid is kept: the parent locator is the one metadata item
whose change is not user-visible (MS-VHDX 2.2.2), so the child's own children
stay linked.

* ``relink(child, parent)``: the new parent must be the same disk the child was
  made on (its DataWriteGuid equals ``parent_linkage`` or a non-zero
  ``parent_linkage2``), have the child's logical sector size, and not lead back
  to the child (a cycle). ``ignore_id_mismatch`` accepts another parent and sets
  ``parent_linkage`` to its DataWriteGuid (Microsoft's ``-IgnoreIdMismatch``), with
  a warning: the child's sectors were written over different contents.
* ``relink(child, fix_paths=True, search_dirs=...)``: the chain is opened the way
  every read-only command opens it (locator, ``parents``, ``search_dirs``); every
  file whose stored paths do not lead to the parent it was opened with gets its
  stale entries rewritten (MS-VHDX 2.6.2.6.3: an implementation updates stale
  entries after a successful open; here only on request, read-only opens never
  write).

Paths written: ``relative_path`` in Windows form relative to the child's folder
(``.\\base.vhdx``, ``..\\old\\base.vhdx``) and ``absolute_win32_path`` in the
spec's ``\\\\?\\`` form (see :func:`vhdx.create.parent_info_for`). A
``volume_path`` that no longer leads to the parent is dropped; every other key
is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

from .chain import accepted_linkages, find_parent, open_chain
from .create import parent_info_for
from .errors import (
    InvalidArgumentError,
    ParentMismatchError,
    ParentNotFoundError,
    VhdxError,
)
from .errors import converts_os_errors
from .image import ImageFile
from .locator import resolve_relative, win32_to_local
from .storage import Storage

__all__ = ["relink", "RelinkSummary", "LocatorChange", "register"]

PathLike = str | os.PathLike[str]
StorageFactory = Callable[[str], Storage]


@dataclass
class LocatorChange:
    """One file's parent locator before and after."""

    path: str
    parent: str
    old: dict[str, str]
    new: dict[str, str]

    @property
    def changed(self) -> dict[str, tuple[str | None, str | None]]:
        """key -> (old value, new value) for every key that differs."""
        keys = dict.fromkeys([*self.old, *self.new])
        return {k: (self.old.get(k), self.new.get(k)) for k in keys if self.old.get(k) != self.new.get(k)}


@dataclass
class RelinkSummary:
    mode: str  # "parent" | "fix-paths"
    dry_run: bool
    changes: list[LocatorChange] = field(default_factory=list)  # files rewritten (or that would be)
    unchanged: list[str] = field(default_factory=list)  # files whose locator already held
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for c, out in zip(self.changes, d["changes"]):
            out["changed"] = {k: {"old": o, "new": n} for k, (o, n) in c.changed.items()}
        return d


# --- which stored paths still hold ------------------------------------------------------
def _same(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _holds(key: str, value: str, child: str, parent: str) -> bool:
    """True when locator entry ``key`` = ``value`` of ``child`` leads to ``parent``."""
    if key == "relative_path":
        return _same(resolve_relative(child, value), parent)
    local = win32_to_local(value)
    return local is not None and _same(local, parent)


def new_locator(child: str, parent: ImageFile, old: dict[str, str], *,
                only_stale: bool, relink_id: bool) -> dict[str, str]:
    """The locator ``child`` gets when ``parent`` is its parent.

    ``only_stale`` keeps path entries that already lead to ``parent``;
    ``relink_id`` sets ``parent_linkage`` to the parent's DataWriteGuid.
    """
    info = parent_info_for(child, parent)
    fresh = {"relative_path": info.relative_path, "absolute_win32_path": info.absolute_win32_path}
    out = dict(old)
    if relink_id:
        out["parent_linkage"] = "{%s}" % parent.data_write_guid
    for key, value in fresh.items():
        if value is None:
            continue
        if only_stale and key in old and _holds(key, old[key], child, parent.path):
            continue
        out[key] = value
    vp = old.get("volume_path")
    if vp is not None and not _holds("volume_path", vp, child, parent.path):
        del out["volume_path"]
    return out


# --- checks --------------------------------------------------------------------------------
def _identity(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _check_new_parent(child: ImageFile, parent: ImageFile, ignore_id_mismatch: bool,
                      hints: Sequence[PathLike], search_dirs: Sequence[PathLike],
                      warnings: list[str]) -> bool:
    """Refuse a parent that cannot serve ``child``; returns True when the linkage must
    be rewritten (``ignore_id_mismatch`` and another DataWriteGuid)."""
    if parent.logical_sector_size != child.logical_sector_size:
        raise ParentMismatchError(
            f"{parent.path}: logical sector size {parent.logical_sector_size} differs from "
            f"{child.path}'s {child.logical_sector_size}")
    # No cycle: walk the new parent's own chain as far as it can be found.
    me = _identity(child.path)
    walk: list[ImageFile] = []
    try:
        cur = parent
        explicit = [os.fspath(h) for h in hints]
        while True:
            if _identity(cur.path) == me:
                raise ParentMismatchError(
                    f"{parent.path}: making it the parent of {child.path} would create a cycle "
                    f"(it is {child.path} or descends from it)")
            if not cur.has_parent or len(walk) > 256:
                break
            try:
                nxt = ImageFile(explicit.pop(0)) if explicit else find_parent(cur, search_dirs, True, [])
            except ParentNotFoundError:
                warnings.append(f"{cur.path}: its own parent was not found, so the chain below it "
                                "is unchecked (relink it too)")
                break
            walk.append(nxt)
            cur = nxt
    finally:
        for f in walk:
            f.close()
    links = accepted_linkages(child.parent_locator or {})
    if parent.data_write_guid in links:
        return False
    msg = (f"{parent.path}: DataWriteGuid {parent.data_write_guid} matches neither parent_linkage "
           f"nor parent_linkage2 of {child.path} "
           f"({', '.join(str(g) for g in sorted(links, key=str)) or 'none set'})")
    if not ignore_id_mismatch:
        raise ParentMismatchError(msg + "; it is not the disk the child was made on "
                                  "(override with --ignore-id-mismatch)")
    warnings.append(msg + "; linked anyway (--ignore-id-mismatch): the child's contents may not "
                    "match this parent")
    return True


def _refuse_if_children(child: str, search_dirs: Sequence[PathLike], force: bool,
                        warnings: list[str]) -> None:
    """A relink to another disk (``ignore_id_mismatch``) changes what the child's own
    children read while their linkage still holds: refuse, naming them, unless forced."""
    from .dependents import refuse_if_children

    found = refuse_if_children(child, "relinking it to another disk", search_dirs, force=force)
    if found:
        warnings.append(f"{', '.join(found)} now read{'s' if len(found) == 1 else ''} through a "
                        "different parent (--force)")


# --- the API -----------------------------------------------------------------------------
@converts_os_errors
def relink(child: PathLike, parent: PathLike | None = None, *, fix_paths: bool = False,
           parents: Sequence[PathLike] | None = None, search_dirs: Sequence[PathLike] = (),
           ignore_linkage: bool = False, ignore_id_mismatch: bool = False, dry_run: bool = False,
           force: bool = False, storage_factory: StorageFactory | None = None) -> RelinkSummary:
    """Rewrite the parent locator of ``child`` (to ``parent``), or with ``fix_paths``
    the stale locator paths of every file of its chain (module docstring).

    ``parents`` are explicit parents (immediate first): with ``fix_paths`` they open
    the chain; with ``parent`` they stand for the new parent's own ancestors in the
    cycle check. ``force`` lets ``ignore_id_mismatch`` relink a disk that has
    children of its own (they then read through the other parent).
    ``storage_factory`` (tests) supplies the Storage of every file written. Raises
    :class:`ParentMismatchError` naming the mismatch, before any byte is written.
    """
    child = os.fspath(child)
    if fix_paths == (parent is not None):
        raise InvalidArgumentError("give either a new parent or fix_paths (--fix-paths), not both or neither")
    if fix_paths:
        if ignore_id_mismatch:
            raise InvalidArgumentError("--ignore-id-mismatch applies to relinking to a new parent only")
        summary = RelinkSummary("fix-paths", dry_run)
        plan = _plan_fix_paths(child, parents, search_dirs, ignore_linkage, summary)
    else:
        assert parent is not None
        summary = RelinkSummary("parent", dry_run)
        plan = _plan_parent(child, os.fspath(parent), parents or (), search_dirs,
                            ignore_id_mismatch, force, summary)
    summary.changes = plan
    if not dry_run:
        for change in plan:
            _write_locator(change, storage_factory)
    return summary


def _plan_parent(child: str, parent: str, hints: Sequence[PathLike], search_dirs: Sequence[PathLike],
                 ignore_id_mismatch: bool, force: bool, summary: RelinkSummary) -> list[LocatorChange]:
    with ImageFile(child) as c:
        if not c.has_parent:
            raise InvalidArgumentError(f"{child}: not a differencing disk (it has no parent to relink)")
        with ImageFile(parent) as p:
            relink_id = _check_new_parent(c, p, ignore_id_mismatch, hints, search_dirs, summary.warnings)
            old = dict(c.parent_locator or {})
            new = new_locator(child, p, old, only_stale=False, relink_id=relink_id)
    if relink_id:
        _refuse_if_children(child, search_dirs, force, summary.warnings)
    if new == old:
        summary.unchanged.append(child)
        return []
    return [LocatorChange(child, parent, old, new)]


def _plan_fix_paths(child: str, parents: Sequence[PathLike] | None, search_dirs: Sequence[PathLike],
                    ignore_linkage: bool, summary: RelinkSummary) -> list[LocatorChange]:
    chain, warnings = open_chain(child, parents, search_dirs, ignore_linkage)
    summary.warnings += warnings
    plan: list[LocatorChange] = []
    try:
        for f, p in zip(chain, chain[1:]):
            old = dict(f.parent_locator or {})
            new = new_locator(f.path, p, old, only_stale=True, relink_id=False)
            if new == old:
                summary.unchanged.append(f.path)
            else:
                plan.append(LocatorChange(f.path, p.path, old, new))
    finally:
        for f in chain:
            f.close()
    return plan


def _write_locator(change: LocatorChange, storage_factory: StorageFactory | None) -> None:
    from .writer import WritableDisk

    storage = storage_factory(change.path) if storage_factory else None
    try:
        with WritableDisk(change.path, standalone=True, storage=storage) as d:
            # The file may have changed since it was planned (another writer between our
            # read-only open and the lock): apply the delta to what is there now.
            current = dict(d.image.parent_locator or {})
            if current != change.old:
                raise VhdxError(f"{change.path}: its parent locator changed while relinking; run it again")
            d.update_parent_locator({k: n for k, (_, n) in change.changed.items()})
    finally:
        if storage is not None:  # made here through the factory: ours to close (and unlock)
            storage.close()


# --- the command -------------------------------------------------------------------------
def _print_change(c: LocatorChange, verb: str) -> None:
    """The whole locator: changed keys as old -> new, the others as kept."""
    print(f"{c.path}: {verb} parent {c.parent}")
    changed = c.changed
    for k in dict.fromkeys([*c.old, *c.new]):
        if k in changed:
            o, n = changed[k]
            print(f"  {k}: {o if o is not None else '(none)'} -> {n if n is not None else '(removed)'}")
        else:
            print(f"  {k}: {c.old[k]} (kept)")


def cmd_relink(args: argparse.Namespace) -> int:
    if args.fix_paths:
        summary = relink(args.image, fix_paths=True, parents=args.parent, search_dirs=args.search_dir,
                         ignore_linkage=args.ignore_linkage, dry_run=args.dry_run)
    else:
        if not args.parent:
            raise InvalidArgumentError(f"{args.image}: give the new parent with --parent NEWPARENT, "
                                       "or --fix-paths")
        summary = relink(args.image, args.parent[0], parents=args.parent[1:], search_dirs=args.search_dir,
                         ignore_id_mismatch=args.ignore_id_mismatch, dry_run=args.dry_run,
                         force=args.force)
    for w in summary.warnings:
        print(f"vhdx: warning: {w}", file=sys.stderr)
    if args.json:
        json.dump(summary.to_dict(), sys.stdout, indent=1)
        print()
        return 0
    verb = "would link to" if summary.dry_run else "linked to"
    for c in summary.changes:
        _print_change(c, verb)
    for p in summary.unchanged:
        print(f"{p}: locator already correct")
    return 0


def register(subparsers: Any, chain_options: Callable[[argparse.ArgumentParser], None]) -> None:
    s = subparsers.add_parser(
        "relink", help="point a differencing disk at its moved parent (Set-VHD -ParentPath)",
        description="Rewrite the parent locator of IMAGE through its log: with --parent NEWPARENT "
                    "link it to that file (its DataWriteGuid must match the child's linkage); "
                    "with --fix-paths rewrite the stale paths of every file of the chain to "
                    "where its parents were found (--parent, --search-dir).")
    chain_options(s)
    s.add_argument("--fix-paths", action="store_true",
                   help="rewrite stale locator paths of the whole chain to where the parents were found")
    s.add_argument("--ignore-id-mismatch", action="store_true",
                   help="link to a parent with another DataWriteGuid and take it as the new linkage")
    s.add_argument("--force", action="store_true",
                   help="with --ignore-id-mismatch: relink even though other disks are children of IMAGE")
    s.add_argument("--dry-run", action="store_true", help="show the old and new locator, write nothing")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_relink)

