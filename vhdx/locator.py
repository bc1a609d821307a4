"""Parent-locator paths: the one place that writes them and turns them into host paths.

Writing (FORMAT.md §4.2): ``relative_path`` is the parent
relative to the child's folder in Windows form (``.\\base.vhdx`` for a sibling,
as Hyper-V writes it; ``..\\old\\base.vhdx``); ``absolute_win32_path`` carries
the ``\\\\?\\`` prefix (``\\\\?\\UNC\\server\\share\\...`` for a share). On a
POSIX host the absolute path is the POSIX path with ``/`` turned into ``\\``
behind the prefix (``/vm/base.vhdx`` -> ``\\\\?\\\\vm\\base.vhdx``): Windows
cannot use it, every reader falls back to the file name, and the relative
path, tried first, works everywhere. VHD's W2ku / Parent Unicode Name take the
plain absolute form (:func:`windows_path`).

Reading (FORMAT.md §4.2, §8.2): the entries are untrusted strings. A relative
entry is resolved against the child's folder with ``\\`` read as ``/``;
absolute entries are used as they are only on Windows (and a POSIX path only
where a tool wrote one), elsewhere they contribute their file name, looked up
beside the child and in the search folders. A NUL names no file.
"""

from __future__ import annotations

import ntpath
import os
import posixpath
from collections.abc import Iterable
from typing import Literal

__all__ = ["relative_path", "absolute_win32_path", "windows_path", "strip_win32_prefix", "is_volume_path",
           "win32_to_local", "resolve_relative", "host_candidates", "candidate_paths", "opener_candidates"]

PathLike = str | os.PathLike[str]
EntryKind = Literal["relative", "absolute", "posix"]
_WINDOWS = os.name == "nt"
_PREFIX, _UNC = "\\\\?\\", "\\\\?\\UNC\\"


# --- writing ------------------------------------------------------------------------------
def relative_path(child: PathLike, parent: PathLike) -> str | None:
    """``relative_path`` for ``parent`` seen from ``child``'s folder, in Windows form;
    None when there is none (Windows: another drive)."""
    try:
        rel = os.path.relpath(os.path.abspath(parent), os.path.dirname(os.path.abspath(child)))
    except ValueError:  # ntpath.relpath across drives
        return None
    rel = rel.replace(os.sep, "\\").replace("/", "\\")
    # "..\\x" climbs; "..x.vhdx" is a sibling whose name starts with dots.
    if rel != ".." and not rel.startswith("..\\"):
        rel = ".\\" + rel  # what Hyper-V writes for a sibling (FORMAT.md §4.2)
    return rel


def absolute_win32_path(path: PathLike, *, windows: bool = _WINDOWS) -> str:
    """``absolute_win32_path`` for ``path`` (FORMAT.md §4.2: ``\\\\?\\`` prefix;
    ``\\\\?\\UNC\\`` for a share). ``windows`` says whose path it is (the host's by
    default); off Windows the POSIX path keeps its shape behind the prefix."""
    if not windows:
        return _PREFIX + os.path.abspath(path).replace("/", "\\")
    p = ntpath.abspath(os.fspath(path))
    if p.startswith(_PREFIX):  # already a Win32 file namespace path
        return p
    if p.startswith("\\\\"):  # \\server\share\...
        return _UNC + p[2:]
    return _PREFIX + p


def windows_path(path: PathLike, *, windows: bool = _WINDOWS) -> str:
    """The plain absolute Windows form of ``path`` (VHD's W2ku, Parent Unicode Name)."""
    if windows:
        return ntpath.abspath(os.fspath(path))
    return os.path.abspath(path).replace("/", "\\")


# --- reading --------------------------------------------------------------------------------
def strip_win32_prefix(value: str) -> str:
    """``value`` without its Win32 file-namespace prefix: ``\\\\?\\UNC\\s\\sh\\x`` ->
    ``\\\\s\\sh\\x``, ``\\\\?\\C:\\x`` -> ``C:\\x`` (any case of ``UNC``)."""
    if value[:8].upper() == _UNC.upper():
        return "\\\\" + value[8:]
    if value.startswith(_PREFIX):
        return value[4:]
    return value


def is_volume_path(value: str) -> bool:
    """True for ``\\\\?\\Volume{GUID}\\...`` (usable only with its prefix, on Windows)."""
    return value[:11].upper() == "\\\\?\\VOLUME{"


def win32_to_local(value: str, *, windows: bool = _WINDOWS) -> str | None:
    """The host path an absolute entry names, if it names one here.

    On Windows the value itself (``\\\\?\\`` paths are native). Elsewhere only the
    form this project writes for POSIX paths (``\\\\?\\`` + the path with ``\\``
    separators, no drive letter) maps back; a drive letter or a share never does.
    """
    if windows:
        return value
    if value[:8].upper() == _UNC.upper() or not value.startswith(_PREFIX):
        return None
    rest = value[4:]
    if not rest.startswith("\\"):
        return None  # a drive letter or a volume: meaningless here
    return rest.replace("\\", "/")


def resolve_relative(child: PathLike, rel: str) -> str:
    """The host path a relative entry names: against ``child``'s folder, ``\\`` read as ``/``."""
    child_dir = os.path.dirname(os.path.abspath(child))
    return os.path.normpath(os.path.join(child_dir, *rel.replace("\\", "/").split("/")))


def _name(value: str) -> str:
    return ntpath.basename(strip_win32_prefix(value))


def host_candidates(child: PathLike, entries: Iterable[tuple[EntryKind, str]],
                    search_dirs: Iterable[PathLike] = (), *, windows: bool = _WINDOWS) -> list[str]:
    """Host paths to try for a parent, in the order of ``entries`` (kind, value), then
    each entry's file name beside the child and in ``search_dirs``.

    ``relative``: resolved against the child's folder. ``absolute``: a Windows path,
    used as it is on Windows (without its prefix, unless it is a volume path) and by
    a POSIX host only when it already is a POSIX path. ``posix``: a host path (a
    ``file://`` locator), used as it is.
    """
    child_dir = os.path.dirname(os.path.abspath(child))
    out: list[str] = []
    names: list[str] = []
    for kind, value in entries:
        if not value:
            continue
        if kind == "relative":
            out.append(resolve_relative(child, value))
            names.append(_name(value))
        elif kind == "posix":
            out.append(value)
            names.append(posixpath.basename(value))
        else:
            if windows:
                out.append(value if is_volume_path(value) else strip_win32_prefix(value))
            elif value.startswith("/"):
                out.append(value)
            names.append(_name(value))
    for name in dict.fromkeys(n for n in names if n and n not in (".", "..")):
        out.append(os.path.join(child_dir, name))
        out.extend(os.path.join(os.fspath(d), name) for d in search_dirs)
    # A NUL cannot be in a path: such an entry names no file (and the OS calls
    # would raise ValueError). Found by fuzzing.
    return [p for p in dict.fromkeys(out) if "\0" not in p]


def _vhdx_entries(locator: dict[str, str]) -> list[tuple[EntryKind, str]]:
    """A VHDX locator's path entries in the lookup order of FORMAT.md §4.2."""
    return [("relative", locator.get("relative_path") or ""),
            ("absolute", locator.get("volume_path") or ""),
            ("absolute", locator.get("absolute_win32_path") or "")]


def candidate_paths(child_path: PathLike, locator: dict[str, str],
                    search_dirs: Iterable[PathLike] = (), *, windows: bool = _WINDOWS) -> list[str]:
    """Where a VHDX child's parent may be: ``relative_path``, ``volume_path``,
    ``absolute_win32_path`` (FORMAT.md §4.2), then their file names beside the
    child and in ``search_dirs`` (:func:`host_candidates`)."""
    return host_candidates(child_path, _vhdx_entries(locator), search_dirs, windows=windows)


def opener_candidates(child_name: str, locator: dict[str, str]) -> list[str]:
    """Names to ask a caller's opener for, in the locator's order: ``relative_path``
    resolved against the child's name (``/`` separators), then the file names of
    the absolute paths beside the child, then those names alone."""
    base = posixpath.dirname(child_name.replace("\\", "/"))
    out: list[str] = []
    names: list[str] = []
    for kind, value in _vhdx_entries(locator):
        if not value:
            continue
        if kind == "relative":
            out.append(posixpath.normpath(posixpath.join(base, value.replace("\\", "/"))))
        names.append(_name(value))
    for name in dict.fromkeys(n for n in names if n and n not in (".", "..")):
        out.append(posixpath.join(base, name) if base else name)
        out.append(name)
    return [p for p in dict.fromkeys(out) if "\0" not in p]
