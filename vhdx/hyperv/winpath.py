"""Windows paths from Hyper-V configuration files, mapped onto a local copy.

Configs name files as the host saw them (``C:\\...``, ``\\\\server\\share\\...``,
``\\\\?\\C:\\...``). They are untrusted strings: they are never opened as given.
A path is looked up only inside directories the caller named: ``--root DIR``
(the folder where the VM's volume is mounted or copied; ``C:=DIR`` for one drive
letter, ``\\\\server\\share=DIR`` for a share), then by file name beside the
config, in ``Virtual Hard Disks`` beside it or one level up (dissect.target's
order), then in ``--search-dir``. Components are matched case-insensitively,
device paths and ``..`` are refused, and a result that leaves its root through a
symbolic link is refused. Every lookup records what it tried, so callers can
report each path that could not be resolved.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..locator import is_volume_path, strip_win32_prefix

_DRIVE = re.compile(r"^([A-Za-z]):[\\/]")
_DRIVE_ROOT = re.compile(r"^([A-Za-z]):=(.+)$")


@dataclass
class WinPath:
    """A parsed Windows path: ``kind`` is "drive", "unc", "relative" or "device"."""

    raw: str
    kind: str
    drive: str = ""  # upper-case letter for "drive"; "\\\\server\\share" (casefolded) for "unc"
    parts: list[str] = field(default_factory=list)
    problem: str | None = None

    @property
    def name(self) -> str:
        return self.parts[-1] if self.parts else ""


def parse_winpath(raw: str) -> WinPath:
    p = raw.strip()
    if p.startswith(("\\\\.\\", "//./")) or p.upper().startswith("\\\\?\\GLOBALROOT") or is_volume_path(p):
        return WinPath(raw, "device", problem="device path; never opened")
    p = strip_win32_prefix(p)
    kind, drive = "relative", ""
    if p.startswith(("\\\\", "//")):
        comps = [c for c in re.split(r"[\\/]", p[2:]) if c not in ("", ".")]
        if len(comps) < 2:
            return WinPath(raw, "unc", problem="UNC path without a share")
        kind, drive, comps = "unc", ("\\\\" + comps[0] + "\\" + comps[1]).casefold(), comps[2:]
    else:
        m = _DRIVE.match(p)
        if m:
            kind, drive, p = "drive", m.group(1).upper(), p[3:]
        elif re.match(r"^[A-Za-z]:", p):
            return WinPath(raw, "relative", problem="drive-relative path")
        comps = [c for c in re.split(r"[\\/]", p) if c not in ("", ".")]
    wp = WinPath(raw, kind, drive, comps)
    if ".." in comps:
        wp.problem = "path has '..' components"
    elif any("\0" in c or ":" in c for c in comps):
        wp.problem = "path has a NUL or ':' (alternate stream) in a component"
    return wp


@dataclass
class Resolution:
    """Where a config's Windows path was found locally, or why not."""

    windows_path: str
    local: str | None
    how: str | None = None  # "root", "beside config", "Virtual Hard Disks", "search dir"
    problem: str | None = None
    tried: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"windows_path": self.windows_path, "local": self.local, "how": self.how,
                "problem": self.problem, "tried": self.tried}


def lookup_ci(base: str, parts: Sequence[str]) -> tuple[str | None, str | None]:
    """``base/parts...`` with each component matched case-insensitively.

    Returns (path, None) or (None, why). An exact match wins; two names that
    differ only in case are ambiguous and reported, never picked at random.
    """
    cur = base
    for comp in parts:
        exact = os.path.join(cur, comp)
        if os.path.lexists(exact):
            cur = exact
            continue
        try:
            names = os.listdir(cur)
        except OSError:
            return None, f"{cur}: not a readable directory"
        want = comp.casefold()
        hits = [n for n in names if n.casefold() == want]
        if not hits:
            return None, f"{exact}: not found"
        if len(hits) > 1:
            return None, f"{exact}: ambiguous ({', '.join(sorted(hits))} differ only in case)"
        cur = os.path.join(cur, hits[0])
    return cur, None


def _inside(path: str, root: str) -> bool:
    rp, rr = os.path.realpath(path), os.path.realpath(root)
    return rp == rr or rp.startswith(rr.rstrip(os.sep) + os.sep)


def _is_file(path: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


class PathMapper:
    """Maps config paths onto local directories (``--root`` and ``--search-dir``)."""

    def __init__(self, roots: Sequence[str] = (), search_dirs: Sequence[str] = ()) -> None:
        self.any_drive: list[str] = []
        self.drives: dict[str, list[str]] = {}
        self.shares: dict[str, list[str]] = {}
        for spec in roots:
            m = _DRIVE_ROOT.match(spec)
            if m:
                self.drives.setdefault(m.group(1).upper(), []).append(m.group(2))
            elif spec.startswith("\\\\") and "=" in spec:
                share, _, d = spec.partition("=")
                wp = parse_winpath(share)
                if wp.kind != "unc" or wp.parts:
                    raise ValueError(f"{spec}: a share mapping is \\\\server\\share=DIR")
                self.shares.setdefault(wp.drive, []).append(d)
            else:
                self.any_drive.append(spec)
        self.search_dirs = [os.fspath(d) for d in search_dirs]

    @property
    def has_roots(self) -> bool:
        return bool(self.any_drive or self.drives or self.shares)

    def roots_for(self, wp: WinPath) -> list[str]:
        if wp.kind == "drive":
            return self.drives.get(wp.drive, []) + self.any_drive
        if wp.kind == "unc":
            return list(self.shares.get(wp.drive, []))
        return []

    def map_path(self, raw: str, want_dir: bool = False) -> Resolution:
        """Only the ``--root`` mapping of ``raw`` (a file, or a directory)."""
        wp = parse_winpath(raw)
        res = Resolution(raw, None)
        if wp.problem:
            res.problem = wp.problem
            return res
        for root in self.roots_for(wp):
            found, why = lookup_ci(root, wp.parts)
            res.tried.append(why or found or root)
            if found is None:
                continue
            if not _inside(found, root):
                res.tried[-1] = f"{found}: leaves {root} through a symbolic link; refused"
                continue
            if (os.path.isdir(found) if want_dir else _is_file(found)):
                res.local, res.how = found, "root"
                return res
        if not self.roots_for(wp):
            res.problem = ("no --root maps this path" if wp.kind != "relative"
                           else "relative path in the configuration")
        else:
            res.problem = "not found under --root"
        return res

    def resolve_file(self, raw: str, config_dir: str) -> Resolution:
        """A disk (or other file) named by a config: the mapping first, then by name."""
        res = self.map_path(raw)
        if res.local:
            return res
        wp = parse_winpath(raw)
        if wp.problem or not wp.name:
            return res
        mapped_problem = res.problem
        cands = [(config_dir, "beside config"),
                 (os.path.join(config_dir, "Virtual Hard Disks"), "Virtual Hard Disks"),
                 (os.path.join(os.path.dirname(config_dir), "Virtual Hard Disks"), "Virtual Hard Disks")]
        cands += [(d, "search dir") for d in self.search_dirs]
        for d, how in cands:
            parts = [wp.name] if how in ("beside config", "search dir") else []
            base: str | None = d
            if how == "Virtual Hard Disks":
                base, why = lookup_ci(os.path.dirname(d), [os.path.basename(d)])
                if base is None:
                    res.tried.append(why or d)
                    continue
                parts = [wp.name]
            assert base is not None
            found, why = lookup_ci(base, parts)
            res.tried.append(why or found or base)
            if found and _is_file(found) and _inside(found, base):
                res.local, res.how, res.problem = found, how, None
                if mapped_problem and self.has_roots:
                    res.how = f"{how} (the --root mapping failed: {mapped_problem})"
                return res
        res.problem = mapped_problem if self.has_roots else "not found beside the configuration or in --search-dir"
        return res
