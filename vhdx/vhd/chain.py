"""Differencing VHD / AVHD chains: finding, validating and opening parents.

Linkage (vhd.md §8.3): the parent's footer Unique Id must equal the child's Parent
Unique ID, compared as raw bytes (producers disagree on GUID byte order); a
Parent Time Stamp that matches neither the parent's footer Time Stamp nor its
file mtime is only a warning (Windows writes 0). Candidates are tried in the
order of vhd.md §6: W2ru (relative to the child), W2ku, the Parent Unicode Name,
the deprecated single-byte Wi2r/Wi2k and MacX; absolute Windows paths only
contribute their file name off Windows. A VHDX found where a VHD parent should
be is refused: Hyper-V chains never mix the formats.
"""

from __future__ import annotations

import ntpath
import os
from collections.abc import Iterable, Sequence
from urllib.parse import unquote, urlparse

from ..chain import _is_regular
from ..chain import _scan_dirs as scan_image_dirs
from ..dependents import scan_files, search_folders
from ..errors import LockedError, ParentMismatchError, ParentNotFoundError, VhdxError
from ..locator import EntryKind, host_candidates
from . import structures as S
from .file import VhdFile, is_vhd_file

MAX_CHAIN_DEPTH = 256
VHD_SUFFIXES = (".vhd", ".avhd")
PathLike = str | os.PathLike[str]


def _is_vhdx(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(8) == b"vhdxfile"
    except OSError:
        return False


def mixed_chain_error(child: str, parent: str, child_fmt: str = "VHD", parent_fmt: str = "VHDX") -> ParentMismatchError:
    return ParentMismatchError(
        f"{child}: a {child_fmt} differencing disk cannot have the {parent_fmt} parent {parent} "
        "(mixed VHD/VHDX chains are not supported; convert the whole chain to one format)")


def candidate_paths(child: VhdFile, search_dirs: Iterable[PathLike] = ()) -> list[str]:
    """Where the parent of ``child`` may be, most specific first (the path rules
    are :func:`vhdx.locator.host_candidates`'; the platform codes are VHD's)."""
    loc: dict[str, str] = child.parent_locator or {}
    entries: list[tuple[EntryKind, str]] = [("relative", loc.get("W2ru", "")), ("absolute", loc.get("W2ku", ""))]
    name = loc.get("parent_unicode_name")
    if name:
        entries.append(("absolute" if ntpath.isabs(name) or name.startswith("/") else "relative", name))
    entries += [("relative", loc.get("Wi2r", "")), ("absolute", loc.get("Wi2k", ""))]
    if loc.get("MacX"):
        u = urlparse(loc["MacX"])
        if u.scheme == "file":
            entries.append(("posix", unquote(u.path)))
    return host_candidates(child.path, entries, search_dirs)


def _scan_dirs(search_dirs: Iterable[PathLike]) -> list[str]:
    return scan_image_dirs(search_dirs, VHD_SUFFIXES)


def check_parent(child: VhdFile, parent: VhdFile, ignore_linkage: bool, warnings: list[str]) -> None:
    """Raise ParentMismatchError unless ``parent`` may serve ``child``."""
    if parent.unique_id != child.parent_unique_id:
        msg = (f"{parent.path} is not the parent of {child.path}: its Unique Id {parent.unique_id.hex()} "
               f"differs from the child's Parent Unique ID {(child.parent_unique_id or b'').hex()}")
        if not ignore_linkage:
            raise ParentMismatchError(msg + " (override with ignore_linkage / --ignore-linkage)")
        warnings.append(msg + "; accepted because linkage checks are disabled")
    ts = child.parent_timestamp
    if ts:
        try:
            mtime = int(os.fstat(parent.fd).st_mtime) - S.EPOCH_OFFSET
        except OSError:
            mtime = None
        if ts not in (parent.footer.timestamp, mtime):
            warnings.append(f"{child.path}: Parent Time Stamp {ts} matches neither the parent's footer "
                            f"time stamp nor its modification time (the parent may have changed)")
    if parent.virtual_size < child.virtual_size:
        warnings.append(f"{parent.path}: parent is smaller ({parent.virtual_size} bytes) than the child "
                        f"({child.virtual_size}); the rest reads as zeros")


def find_parent(child: VhdFile, search_dirs: Sequence[PathLike], ignore_linkage: bool,
                ignore_checksums: bool = False, force_share: bool = False) -> VhdFile:
    """Locate and open the parent of ``child``."""
    tried: list[str] = []
    mismatched: list[str] = []
    vhdx_found: list[str] = []
    candidates = candidate_paths(child, search_dirs)
    extra = [p for p in _scan_dirs(search_dirs) if p not in candidates]
    for path in candidates + extra:
        listed = path in candidates
        if not _is_regular(path) or os.path.samefile(path, child.path):
            if listed:
                tried.append(path)
            continue
        if _is_vhdx(path):
            if listed:
                vhdx_found.append(path)
            continue
        try:
            parent = VhdFile(path, ignore_checksums=ignore_checksums, force_share=force_share)
        except LockedError:
            raise  # the parent is found but in use: say so, not "not found"
        except VhdxError as e:
            if listed:
                tried.append(f"{path} ({e})")
            continue
        if parent.unique_id == child.parent_unique_id or (ignore_linkage and listed):
            return parent
        if listed:
            mismatched.append(path)
        parent.close()
    if mismatched:
        raise ParentMismatchError(
            f"{child.path}: found {', '.join(mismatched)} but its Unique Id differs from the child's "
            f"Parent Unique ID {(child.parent_unique_id or b'').hex()} (override with --ignore-linkage)")
    if vhdx_found:
        raise mixed_chain_error(child.path, vhdx_found[0])
    where = "; ".join(tried) if tried else "no usable parent locator or name"
    raise ParentNotFoundError(f"{child.path}: parent not found (tried: {where}); "
                              "give it with --parent or --search-dir")


def open_chain(path: PathLike, parents: Sequence[PathLike] | None = None,
               search_dirs: Sequence[PathLike] = (), ignore_linkage: bool = False,
               ignore_checksums: bool = False, max_depth: int = MAX_CHAIN_DEPTH,
               top: VhdFile | None = None, force_share: bool = False) -> tuple[list[VhdFile], list[str]]:
    """Open ``path`` (or use ``top``) and every ancestor, child first; (chain, warnings).
    Every file opened here takes a reader's lock unless ``force_share``."""
    own_top = top is None
    if top is None:
        top = VhdFile(path, ignore_checksums=ignore_checksums, force_share=force_share)
    chain = [top]
    warnings: list[str] = []
    explicit = [os.fspath(p) for p in (parents or ())]
    try:
        seen = {top.unique_id}
        idents = {_identity(top)}
        while chain[-1].has_parent:
            cur = chain[-1]
            if len(chain) > max_depth:
                raise ParentMismatchError(f"chain is deeper than {max_depth} files; refusing")
            if explicit:
                p = explicit.pop(0)
                if _is_vhdx(p):
                    raise mixed_chain_error(cur.path, p)
                parent = VhdFile(p, ignore_checksums=ignore_checksums, force_share=force_share)
            else:
                parent = find_parent(cur, search_dirs, ignore_linkage, ignore_checksums, force_share)
            try:
                check_parent(cur, parent, ignore_linkage, warnings)
                ident = _identity(parent)
                if ident in idents or (parent.unique_id in seen and not ignore_linkage):
                    raise ParentMismatchError(f"{parent.path}: parent chain loops back onto itself")
            except VhdxError:
                parent.close()
                raise
            idents.add(ident)
            seen.add(parent.unique_id)
            chain.append(parent)
        if explicit:
            warnings.append(f"{len(explicit)} extra parent(s) given but the chain ends at {chain[-1].path}")
        out = []
        for f in chain:
            out += [f"{f.path}: {w}" for w in f.warnings]
        return chain, out + warnings
    except BaseException:
        for f in chain:
            if f is not top or own_top:
                f.close()
        raise


def _identity(f: VhdFile) -> tuple[int, int]:
    st = os.fstat(f.fd)
    return st.st_dev, st.st_ino


def find_vhd_linked(folders: Sequence[str], ids: dict[bytes, str],
                    exclude: Iterable[PathLike] = ()) -> list[tuple[str, str]]:
    """(path, parent path) of every VHD in ``folders`` (by signature, whatever its
    name) whose Parent Unique ID is one of ``ids`` (Unique Id -> path), other
    than ``exclude``: the VHD counterpart of :func:`vhdx.dependents.find_linked`."""
    found = []
    for path in scan_files(folders, exclude):
        if not is_vhd_file(path):
            continue
        try:
            # Only the header is needed: never blocked by a running VM's lock.
            with VhdFile(path, ignore_checksums=True, force_share=True) as f:
                puid = f.parent_unique_id
        except VhdxError:
            continue
        if puid is not None and puid in ids:
            found.append((path, ids[puid]))
    return found


def find_vhd_children(image_path: PathLike, search_dirs: Sequence[PathLike] = (), *,
                      exclude: Iterable[PathLike] = (), chain: Iterable[PathLike] = ()) -> list[str]:
    """Paths of the differencing VHDs whose Parent Unique ID is ``image_path``'s
    Unique Id, searched where :func:`vhdx.dependents.find_children` searches
    (``find=`` of :func:`vhdx.dependents.refuse_if_children`)."""
    path = os.fspath(image_path)
    with VhdFile(path, ignore_checksums=True, force_share=True) as f:
        uid = f.unique_id
    folders = search_folders([path, *chain], search_dirs)
    return [p for p, _ in find_vhd_linked(folders, {uid: path}, [path, *exclude])]
