"""Differencing chains: finding, validating and opening the parents of a file.

Followed: MS-VHDX 2.6.2.6 (parent locator; lookup order relative_path,
volume_path, absolute_win32_path) and ref §8.2. A parent is accepted only when
its current DataWriteGuid equals ``parent_linkage`` or a non-zero
``parent_linkage2`` (ref §4.2: Hyper-V writes a zero linkage2 meaning unset),
and its logical sector size equals the child's.
"""

from __future__ import annotations

import ntpath
import os
import stat
import uuid
from typing import Iterable, Sequence

from . import structures as S
from .errors import ParentMismatchError, ParentNotFoundError, VhdxError
from .image import ImageFile

MAX_CHAIN_DEPTH = 256
"""Hyper-V allows far fewer checkpoints; deeper chains are refused as absurd."""

IMAGE_SUFFIXES = (".vhdx", ".avhdx")

PathLike = str | os.PathLike[str]


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


def _strip_win32_prefix(p: str) -> str:
    for prefix in ("\\\\?\\UNC\\", "\\\\?\\"):
        if p.startswith(prefix):
            return ("\\\\" if prefix.endswith("UNC\\") else "") + p[len(prefix):]
    return p


def candidate_paths(child_path: str, locator: dict[str, str],
                    search_dirs: Iterable[PathLike] = ()) -> list[str]:
    """Where the parent may be, in the order of MS-VHDX 2.6.2.6, then search dirs.

    Windows paths are mapped sensibly on other systems: ``relative_path`` is
    resolved with ``/`` separators against the child's directory; absolute
    Windows paths (meaningless off Windows) contribute their file name, looked
    up beside the child and in the search directories.
    """
    child_dir = os.path.dirname(os.path.abspath(child_path))
    out: list[str] = []
    names: list[str] = []
    rel = locator.get("relative_path")
    if rel:
        out.append(os.path.normpath(os.path.join(child_dir, *rel.replace("\\", "/").split("/"))))
        names.append(ntpath.basename(rel))
    for key in ("volume_path", "absolute_win32_path"):
        value = locator.get(key)
        if not value:
            continue
        if os.name == "nt" and (key == "absolute_win32_path" or value.startswith("\\\\?\\Volume")):
            out.append(value if key == "volume_path" else _strip_win32_prefix(value))
        names.append(ntpath.basename(_strip_win32_prefix(value)))
    for name in dict.fromkeys(n for n in names if n):
        out.append(os.path.join(child_dir, name))
        out.extend(os.path.join(os.fspath(d), name) for d in search_dirs)
    # A NUL cannot be in a path: such a locator entry names no file (and the OS
    # calls would raise ValueError). Found by fuzzing.
    return [p for p in dict.fromkeys(out) if "\0" not in p]


def _is_regular(path: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _scan_dirs(search_dirs: Iterable[PathLike]) -> list[str]:
    found = []
    for d in search_dirs:
        try:
            names = sorted(os.listdir(d))
        except OSError:
            continue
        found += [os.path.join(os.fspath(d), n) for n in names if n.lower().endswith(IMAGE_SUFFIXES)]
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


def find_parent(child: ImageFile, search_dirs: Sequence[PathLike], ignore_linkage: bool,
                warnings: list[str]) -> ImageFile:
    """Locate and open the parent of ``child`` through its locator."""
    locator = child.parent_locator or {}
    tried: list[str] = []
    mismatched: list[str] = []
    linkages = accepted_linkages(locator)
    candidates = candidate_paths(child.path, locator, search_dirs)
    # Last resort: any image in the search directories whose DataWriteGuid fits.
    extra = [p for p in _scan_dirs(search_dirs) if p not in candidates]
    for path in candidates + extra:
        if not _is_regular(path) or os.path.samefile(path, child.path):
            if path in candidates:
                tried.append(path)
            continue
        try:
            parent = ImageFile(path)
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


def open_parents(child: ImageFile, parents: Sequence[PathLike] | None = None,
                 search_dirs: Sequence[PathLike] = (), ignore_linkage: bool = False,
                 max_depth: int = MAX_CHAIN_DEPTH) -> tuple[list[ImageFile], list[str]]:
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
                parent = ImageFile(explicit.pop(0))
            else:
                parent = find_parent(current, search_dirs, ignore_linkage, warnings)
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


def open_chain(path: PathLike, parents: Sequence[PathLike] | None = None,
               search_dirs: Sequence[PathLike] = (), ignore_linkage: bool = False,
               max_depth: int = MAX_CHAIN_DEPTH) -> tuple[list[ImageFile], list[str]]:
    """Open ``path`` and all its ancestors, child first; returns (chain, warnings)."""
    top = ImageFile(path)
    try:
        ancestors, warnings = open_parents(top, parents, search_dirs, ignore_linkage, max_depth)
    except BaseException:
        top.close()
        raise
    return [top, *ancestors], [f"{top.path}: {w}" for w in top.warnings] + warnings


def _identity(f: ImageFile) -> tuple[int, int]:
    st = os.fstat(f.fd)
    return st.st_dev, st.st_ino
