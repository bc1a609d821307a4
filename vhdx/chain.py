"""Differencing chains: finding, validating and opening the parents of a file.

Followed: MS-VHDX 2.6.2.6 (parent locator; lookup order relative_path,
volume_path, absolute_win32_path) and FORMAT.md §8.2. A parent is accepted only when
its current DataWriteGuid equals ``parent_linkage`` or a non-zero
``parent_linkage2`` (FORMAT.md §4.2: Hyper-V writes a zero linkage2 meaning unset),
and its logical sector size equals the child's.
"""

from __future__ import annotations

import os
import stat
import uuid
from typing import Any, Callable, Iterable, Sequence

from . import structures as S
from .errors import LockedError, ParentMismatchError, ParentNotFoundError, VhdxError
from .image import ImageFile
from .locator import candidate_paths, opener_candidates

MAX_CHAIN_DEPTH = 256
"""Hyper-V allows far fewer checkpoints; deeper chains are refused as absurd."""

IMAGE_SUFFIXES = (".vhdx", ".avhdx")

PathLike = str | os.PathLike[str]
Opener = Callable[[str], Any]
"""``opener(name) -> file object | path | None``: how parents of images opened
from file objects are found (``name`` is a candidate from the parent locator)."""


def parse_linkage(value: str | None) -> uuid.UUID | None:
    """A locator GUID string (``{...}``, any case) or None when absent or malformed."""
    if not value:
        return None
    try:
        return uuid.UUID(value.strip().strip("{}"))
    except ValueError:
        return None


def accepted_linkages(locator: dict[str, str]) -> set[uuid.UUID]:
    out = set()
    for key in ("parent_linkage", "parent_linkage2"):
        g = parse_linkage(locator.get(key))
        if g is not None and g != S.ZERO_GUID:
            out.add(g)
    return out


def _is_regular(path: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _scan_dirs(search_dirs: Iterable[PathLike], suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> list[str]:
    """Image files (by name, any case) directly inside ``search_dirs``, sorted per folder."""
    found = []
    for d in search_dirs:
        try:
            names = sorted(os.listdir(d))
        except OSError:
            continue
        found += [os.path.join(os.fspath(d), n) for n in names if n.lower().endswith(suffixes)]
    return found


def check_parent(child: ImageFile, parent: ImageFile, ignore_linkage: bool, warnings: list[str]) -> None:
    """Raise ParentMismatchError unless ``parent`` may serve ``child``."""
    if parent.logical_sector_size != child.logical_sector_size:
        raise ParentMismatchError(
            f"{parent.path}: logical sector size {parent.logical_sector_size} differs from "
            f"the child's {child.logical_sector_size}")
    ok = parent.data_write_guid in accepted_linkages(child.parent_locator or {})
    if not ok:
        msg = (f"{parent.path} is not the parent of {child.path}: its DataWriteGuid "
               f"{parent.data_write_guid} matches neither parent_linkage nor parent_linkage2")
        if not ignore_linkage:
            raise ParentMismatchError(msg + " (the parent changed after the child was made; "
                                      "override with ignore_linkage / --ignore-linkage)")
        warnings.append(msg + "; accepted because linkage checks are disabled")


def within(path: str, confine: Sequence[PathLike] | None) -> bool:
    """True when ``path`` (symlinks resolved) lies inside one of the ``confine``
    trees (themselves resolved); always True without ``confine``."""
    if confine is None:
        return True
    real = os.path.realpath(path)
    for d in confine:
        root = os.path.realpath(os.fspath(d))
        if real == root or real.startswith(root.rstrip(os.sep) + os.sep):
            return True
    return False


def find_parent(child: ImageFile, search_dirs: Sequence[PathLike], ignore_linkage: bool,
                warnings: list[str], *, confine: Sequence[PathLike] | None = None,
                force_share: bool = False) -> ImageFile:
    """Locate and open the parent of ``child`` through its locator.

    With ``confine``, only files inside those folder trees are considered (a
    service handling uploaded checkpoints keeps lookups out of other trees)."""
    locator = child.parent_locator or {}
    tried: list[str] = []
    mismatched: list[str] = []
    linkages = accepted_linkages(locator)
    candidates = candidate_paths(child.path, locator, search_dirs)
    # Last resort: any image in the search directories whose DataWriteGuid fits.
    extra = [p for p in _scan_dirs(search_dirs) if p not in candidates]
    for path in candidates + extra:
        if not within(path, confine):
            if path in candidates:
                tried.append(f"{path} (outside the confined folders)")
            continue
        if not _is_regular(path) or os.path.samefile(path, child.path):
            if path in candidates:
                tried.append(path)
            continue
        try:
            parent = ImageFile(path, force_share=force_share)
        except LockedError:
            raise  # the parent is there, but in use: say so, not "not found"
        except VhdxError as e:
            if path in candidates:
                tried.append(f"{path} ({e})")
            continue
        if parent.data_write_guid in linkages or (ignore_linkage and path in candidates):
            return parent
        if path in candidates:
            mismatched.append(path)
        parent.close()
    if mismatched:
        raise ParentMismatchError(
            f"{child.path}: found {', '.join(mismatched)} but its DataWriteGuid matches neither "
            f"parent_linkage nor parent_linkage2 (override with --ignore-linkage)")
    where = "; ".join(tried) if tried else "no usable path in the parent locator"
    raise ParentNotFoundError(f"{child.path}: parent not found (tried: {where}); "
                              "give it with --parent or --search-dir")


def find_parent_with_opener(child: ImageFile, opener: Opener, ignore_linkage: bool,
                            force_share: bool = False) -> ImageFile:
    """Locate the parent of ``child`` through a caller's ``opener``."""
    locator = child.parent_locator or {}
    linkages = accepted_linkages(locator)
    tried: list[str] = []
    for name in opener_candidates(child.path, locator):
        try:
            obj = opener(name)
        except (OSError, KeyError, ValueError) as e:
            tried.append(f"{name} ({e.__class__.__name__})")
            continue
        if obj is None:
            tried.append(name)
            continue
        try:
            parent = ImageFile(obj, force_share=force_share)
        except VhdxError as e:
            tried.append(f"{name} ({e})")
            continue
        if parent.data_write_guid in linkages or ignore_linkage:
            return parent
        tried.append(f"{name} (DataWriteGuid {parent.data_write_guid} does not match)")
        parent.close()
    where = "; ".join(tried) if tried else "no usable path in the parent locator"
    raise ParentNotFoundError(f"{child.path}: parent not found through the opener (tried: {where})")


def open_parents(child: ImageFile, parents: Sequence[PathLike] | None = None,
                 search_dirs: Sequence[PathLike] = (), ignore_linkage: bool = False,
                 max_depth: int = MAX_CHAIN_DEPTH, *, opener: Opener | None = None,
                 confine: Sequence[PathLike] | None = None,
                 force_share: bool = False) -> tuple[list[ImageFile], list[str]]:
    """Open every ancestor of ``child`` (immediate parent first); returns (ancestors, warnings).

    ``parents`` (immediate parent first) are used before any lookup; ancestors
    beyond them are found through the locators. On error every file opened here
    is closed (``child`` stays open).
    """
    warnings: list[str] = []
    chain: list[ImageFile] = [child]
    explicit = list(parents or ())
    try:
        seen = {_identity(child)}
        while chain[-1].has_parent:
            current = chain[-1]
            if len(chain) > max_depth:
                raise ParentMismatchError(f"chain is deeper than {max_depth} files; refusing")
            if explicit:
                parent = ImageFile(explicit.pop(0), force_share=force_share)  # a VHD: vhdx.formats refuses it
            elif opener is not None:
                parent = find_parent_with_opener(current, opener, ignore_linkage, force_share)
            else:
                parent = find_parent(current, search_dirs, ignore_linkage, warnings,
                                     confine=confine, force_share=force_share)
            try:
                check_parent(current, parent, ignore_linkage, warnings)
            except VhdxError:
                parent.close()
                raise
            ident = _identity(parent)
            if ident in seen:
                parent.close()
                raise ParentMismatchError(f"{parent.path}: parent chain loops back onto itself")
            seen.add(ident)
            chain.append(parent)
        if explicit:
            warnings.append(f"{len(explicit)} extra parent(s) given but the chain ends at {chain[-1].path}")
        for f in chain[1:]:
            warnings += [f"{f.path}: {w}" for w in f.warnings]
        return chain[1:], warnings
    except BaseException:
        for f in chain[1:]:
            f.close()
        raise


def open_chain(path: PathLike | Any, parents: Sequence[PathLike | Any] | None = None,
               search_dirs: Sequence[PathLike] = (), ignore_linkage: bool = False,
               max_depth: int = MAX_CHAIN_DEPTH, *, opener: Opener | None = None,
               confine: Sequence[PathLike] | None = None,
               force_share: bool = False) -> tuple[list[ImageFile], list[str]]:
    """Open ``path`` (or a binary file object) and all its ancestors, child
    first; returns (chain, warnings).

    Every file takes a reader's lock unless ``force_share``; ``confine`` limits
    parent lookups to those folder trees (explicit ``parents`` are the caller's);
    ``opener`` finds the parents of file objects."""
    top = ImageFile(path, force_share=force_share)
    try:
        ancestors, warnings = open_parents(top, parents, search_dirs, ignore_linkage, max_depth,
                                           opener=opener, confine=confine, force_share=force_share)
    except BaseException:
        top.close()
        raise
    return [top, *ancestors], [f"{top.path}: {w}" for w in top.warnings] + warnings


def _identity(f: ImageFile) -> tuple[object, ...]:
    return f.identity()
