"""Who depends on a disk: its children, found by content, not by name.

Any operation that changes a disk's content or size (merge into it, resize,
writes through ``vhdx.open(..., "r+")``, compact, relink) invalidates every
differencing disk whose parent linkage names the disk's DataWriteGuid. Such
children are looked for in the folder of every file involved, in those folders'
subfolders one level down (Hyper-V keeps checkpoints in a ``Snapshots`` or
per-VM folder) and in the caller's search directories. A candidate is any
regular file that starts with the VHDX file identifier, whatever its name or
case (``.avhdx.bak``, no suffix, ``.AVHD``).
"""

from __future__ import annotations

import os
import stat
import uuid
from typing import Callable, Iterable, Iterator, Sequence

from . import structures as S
from .errors import DependentDisksError, VhdxError

PathLike = str | os.PathLike[str]

# A folder with more entries than this is not scanned past it: the scan must stay
# bounded on a directory an attacker (or a download folder) filled.
MAX_ENTRIES_PER_DIR = 100_000
MAX_SUBFOLDERS = 1_000  # per chain folder: Hyper-V keeps a handful (Snapshots, per-VM folders)


def search_folders(paths: Iterable[PathLike], search_dirs: Iterable[PathLike] = ()) -> list[str]:
    """The folders of ``paths``, their subfolders one level down, then ``search_dirs``."""
    out: list[str] = []
    for p in paths:
        d = os.path.dirname(os.path.abspath(os.fspath(p)))
        out.append(d)
        subs = 0
        try:
            with os.scandir(d) as it:
                for n, entry in enumerate(it):
                    if n >= MAX_ENTRIES_PER_DIR or subs >= MAX_SUBFOLDERS:
                        break
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            out.append(entry.path)
                            subs += 1
                    except OSError:
                        continue
        except OSError:
            continue
    out += [os.path.abspath(os.fspath(d)) for d in search_dirs]
    return list(dict.fromkeys(out))


def _looks_like_vhdx(path: str) -> bool:
    """A regular file that starts with the VHDX file identifier signature."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size < S.HEADER_SECTION_SIZE:
            return False
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    try:
        return os.pread(fd, 8, 0) == S.SIG_FILE
    except OSError:
        return False
    finally:
        os.close(fd)


def _identities(paths: Iterable[PathLike]) -> set[tuple[int, int]]:
    out = set()
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            continue
        out.add((st.st_dev, st.st_ino))
    return out


def find_linked(folders: Sequence[str], guids: dict[uuid.UUID, str],
                exclude: Iterable[PathLike] = ()) -> list[tuple[str, str, uuid.UUID]]:
    """(path, parent path, linked GUID) of every image in ``folders`` whose
    parent_linkage or parent_linkage2 names one of ``guids`` (DataWriteGuid ->
    path of the disk that has it), other than the files in ``exclude``."""
    from .chain import accepted_linkages
    from .image import ImageFile

    found: list[tuple[str, str, uuid.UUID]] = []
    for path in scan_files(folders, exclude):
        if not _looks_like_vhdx(path):
            continue
        try:
            # Only the locator is needed: never blocked by a running VM's lock.
            with ImageFile(path, force_share=True) as img:
                links = accepted_linkages(img.parent_locator or {}) if img.has_parent else set()
        except VhdxError:
            continue
        for g in sorted(links, key=str):
            if g in guids:
                found.append((path, guids[g], g))
                break
    return found


def scan_files(folders: Sequence[str], exclude: Iterable[PathLike] = ()) -> Iterator[str]:
    """Every regular file of ``folders`` (sorted by name, at most
    MAX_ENTRIES_PER_DIR per folder, each file once whatever its links), other
    than ``exclude``: the candidates a format's child search probes."""
    excluded = _identities(exclude)
    seen: set[tuple[int, int]] = set()
    for d in folders:
        try:
            with os.scandir(d) as it:
                names = sorted(e.name for _, e in zip(range(MAX_ENTRIES_PER_DIR), it))
        except OSError:
            continue
        for name in names:
            path = os.path.join(d, name)
            try:
                st = os.stat(path)
            except OSError:
                continue
            ident = (st.st_dev, st.st_ino)
            if ident in excluded or ident in seen or not stat.S_ISREG(st.st_mode):
                continue
            seen.add(ident)
            yield path


def find_children(image_path: PathLike, search_dirs: Sequence[PathLike] = (), *,
                  exclude: Iterable[PathLike] = (), chain: Iterable[PathLike] = ()) -> list[str]:
    """Paths of the differencing disks whose linkage names ``image_path``'s
    current DataWriteGuid (its children), searched beside it and beside the
    files of its ``chain`` (its ancestors), one folder level down, and in
    ``search_dirs``; ``exclude`` lists files to leave out."""
    from .image import ImageFile

    path = os.fspath(image_path)
    with ImageFile(path, force_share=True) as img:
        guid = img.data_write_guid
    folders = search_folders([path, *chain], search_dirs)
    return [p for p, _, _ in find_linked(folders, {guid: path}, [path, *exclude])]


def refuse_if_children(image_path: PathLike, operation: str, search_dirs: Sequence[PathLike] = (), *,
                       force: bool = False, exclude: Iterable[PathLike] = (),
                       chain: Iterable[PathLike] = (),
                       find: Callable[..., list[str]] | None = None) -> list[str]:
    """Raise DependentDisksError naming ``image_path``'s children, unless ``force``;
    returns the children (those that ``operation`` invalidates when forced).
    ``operation`` completes "OPERATION would corrupt ..." ("resizing", "compacting").
    ``find`` replaces :func:`find_children` (same arguments) for another format
    (legacy VHD: :func:`vhdx.vhd.chain.find_vhd_children`)."""
    children = (find or find_children)(image_path, search_dirs, exclude=exclude, chain=chain)
    if children and not force:
        raise DependentDisksError(
            f"{os.fspath(image_path)}: {operation} would corrupt the disks that depend on it: "
            f"{', '.join(children)}; merge or delete them first, or use --force")
    return children


def invalidated_note(children: Sequence[str]) -> str:
    """What to tell the user after a forced change: which children are now invalid."""
    return ("now invalid (their parent changed under them; their data no longer reads "
            "correctly): " + ", ".join(children))
