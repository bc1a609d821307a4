"""Structural validation of every file of a chain (``vhdx check``).

Unlike opening, which stops at the first fatal problem, checking collects every
finding with a severity: ``error`` (the file is corrupt or unusable),
``warning`` (legal but needs attention: a pending log, a bad redundant copy,
a stale linkage), ``leak`` (space the file holds but no structure uses, as an
interrupted merge leaves it; harmless, reclaimable). A chain is clean when
there is neither an error nor a warning.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Literal, Protocol, Sequence, TypeVar

from . import structures as S
from .chain import check_parent, find_parent
from .errors import VhdxError, VhdxIOError
from .errors import converts_os_errors
from .image import ImageFile


Severity = Literal["error", "warning", "leak"]


@dataclass
class Finding:
    file: str
    severity: Severity
    message: str


@dataclass
class CheckReport:
    files: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    blocks_checked: int = 0
    leaked_bytes: int = 0  # sum over the leak findings

    @property
    def clean(self) -> bool:
        return not any(f.severity != "leak" for f in self.findings)

    @property
    def leaks(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "leak"]

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    def to_dict(self) -> dict[str, Any]:
        return {"clean": self.clean, "files": self.files, "blocks_checked": self.blocks_checked,
                "leaked_bytes": self.leaked_bytes, "findings": [asdict(f) for f in self.findings]}


def _check_file(img: ImageFile, report: CheckReport) -> None:
    def add(sev: Severity, msg: str) -> None:
        report.findings.append(Finding(img.path, sev, msg))

    for w in img.header_section.warnings:
        add("warning", w)
    if img.header.log_dirty:
        if img.replay is not None and img.log_replayed:
            n = len(img.replay.entries)
            add("warning", f"log holds {n} unapplied entr{'y' if n == 1 else 'ies'} (replayed in memory; "
                "`vhdx check --repair` applies them)")
        else:
            add("warning", "header LogGuid is set but the log is empty")
    for p in img.bat_problems:
        add("error" if p.fatal else "warning", p.describe())
    geo = img.geometry
    report.blocks_checked += geo.payload_blocks
    # PARTIALLY_PRESENT blocks need their chunk's sector bitmap (2.5.1.1).
    # By runs of equal entries: a 16 TiB disk of ZERO entries is a few runs.
    chunks_needing_sb = {c for b, n, e in img.payload_runs()
                         if e & S.BAT_STATE_MASK == S.PAYLOAD_BLOCK_PARTIALLY_PRESENT
                         for c in range(b // geo.chunk_ratio, (b + n - 1) // geo.chunk_ratio + 1)}
    for chunk in sorted(chunks_needing_sb):
        sb = img.bat[geo.sb_index(chunk)]
        if sb & S.BAT_STATE_MASK != S.SB_BLOCK_PRESENT:
            add("error", f"chunk {chunk} has PARTIALLY_PRESENT blocks but no sector bitmap")
    # Measured on the file as replayed (a pending log's BAT changes count as used).
    # Whole MiB only: producers pad the last sector (Disk2VHD leaves 512 bytes),
    # while an interrupted merge leaves whole allocated blocks.
    unused = img.file_size // S.MiB * S.MiB - img.allocation_end()
    if unused > 0:
        # Blocks allocated and never committed (a merge stopped before its commit),
        # or freed by one: a leak, not corruption.
        report.leaked_bytes += unused
        add("leak", f"{unused} bytes unused at the end of {img.path} (an interrupted merge?)")
    for item in img.metadata.items:
        if item.is_user and len(item.data) != item.length:
            add("error", f"metadata item {item.name} is truncated")


def _without_path(message: str, path: str) -> str:
    """``message`` without a leading "PATH: " (the finding names its file already)."""
    return message[len(path) + 2:] if message.startswith(path + ": ") else message


@converts_os_errors
def check_chain(path: str | os.PathLike[str], parents: Sequence[str | os.PathLike[str]] | None = None,
                search_dirs: Sequence[str | os.PathLike[str]] = (),
                ignore_linkage: bool = False, *, confine: Sequence[str | os.PathLike[str]] | None = None,
                force_share: bool = False) -> CheckReport:
    """Validate ``path`` and every ancestor; never raises for problems in the files.

    ``confine`` and ``force_share`` as for :func:`vhdx.open` (VHDX chains;
    :func:`vhdx.check_chain` routes a VHD to :mod:`vhdx.vhd.check`)."""
    report = CheckReport()
    explicit = list(parents or ())
    current = os.fspath(path)
    opened: list[ImageFile] = []
    try:
        try:
            img = ImageFile(current, force_share=force_share)
        except VhdxIOError:  # the storage failed: no verdict on the file, say so
            raise
        except VhdxError as e:
            report.files.append(current)
            report.findings.append(Finding(current, "error", _without_path(str(e), current)))
            return report

        def open_parent(child: ImageFile, warnings: list[str]) -> ImageFile:
            if explicit:
                return ImageFile(explicit.pop(0), force_share=force_share)
            return find_parent(child, search_dirs, True, warnings, confine=confine, force_share=force_share)

        # The open path's own rules (sector size, then linkage), as findings.
        walk_chain(report, img, _check_file, open_parent,
                   lambda c, p, w: check_parent(c, p, ignore_linkage, w), opened)
        _note_interrupted_merges(opened, report)
        return report
    finally:
        for f in opened:
            f.close()


class _ChainFile(Protocol):
    path: str
    fd: int

    @property
    def has_parent(self) -> bool: ...

    def close(self) -> None: ...


F = TypeVar("F", bound=_ChainFile)


def walk_chain(report: CheckReport, first: F, check_file: Callable[[F, CheckReport], None],
               open_parent: Callable[[F, list[str]], F | None],
               check_link: Callable[[F, F, list[str]], None], opened: list[F],
               max_depth: int = 256) -> None:
    """The chain walk of ``check`` for any format (VHDX here, VHD in
    :mod:`vhdx.vhd.check`): each file checked, each parent opened and its link
    checked, every problem a finding; ends at the base, at a parent that cannot
    be opened (``open_parent`` raising VhdxError, or None when it reported the
    problem itself), past ``max_depth`` files or at a loop. Files opened are
    appended to ``opened``; the caller closes them."""
    img = first
    while True:
        opened.append(img)
        report.files.append(img.path)
        check_file(img, report)
        if not img.has_parent:
            return
        if len(opened) > max_depth:
            report.findings.append(Finding(img.path, "error", f"chain deeper than {max_depth} files"))
            return
        warnings: list[str] = []
        try:
            parent = open_parent(img, warnings)
        except VhdxIOError:  # the storage failed: no verdict on the file, say so
            raise
        except VhdxError as e:
            report.findings.append(Finding(img.path, "error", f"parent: {e}"))
            return
        if parent is None:
            return
        try:
            check_link(img, parent, warnings)
        except VhdxIOError:  # the storage failed: no verdict on the file, say so
            raise
        except VhdxError as e:
            report.findings.append(Finding(img.path, "error", str(e)))
        report.findings += [Finding(img.path, "warning", w) for w in warnings]
        if any(os.path.samestat(os.fstat(parent.fd), os.fstat(o.fd)) for o in opened):
            report.findings.append(Finding(img.path, "error", "parent chain loops back onto itself"))
            parent.close()
            return
        img = parent


def _note_interrupted_merges(chain: list[ImageFile], report: CheckReport) -> None:
    """An unfinished merge is reported as one, with the command that completes it
    (rerunning the merge), instead of the generic --repair advice for its log."""
    from .chain import parse_linkage
    from .merge_engine import merged_mark

    for i, (child, parent) in enumerate(zip(chain, chain[1:])):
        pending = parse_linkage((child.parent_locator or {}).get("parent_linkage2"))
        if pending is None or pending != parent.data_write_guid:
            continue
        # The merge's top file is this one or a descendant in the chain; its mark
        # says the data phase finished (a --keep merge ends so, too).
        marks = [merged_mark(f.parent_locator) for f in chain[:i + 1]]
        if any(m is not None and m[0] == pending for m in marks):
            continue
        top = child.path  # merging it completes the job whichever merge was running
        for f in report.findings:
            if f.file == parent.path and "--repair" in f.message:
                f.message = f.message.replace("`vhdx check --repair` applies them",
                                              f"rerunning `vhdx merge {top}` applies them")
        report.findings.append(Finding(
            child.path, "warning",
            f"an interrupted merge into {parent.path} (the chain is intact and reads as "
            f"before); run `vhdx merge {top}` again to complete it (not `vhdx check --repair`)"))
