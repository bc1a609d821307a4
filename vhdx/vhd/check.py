"""``vhdx check`` for VHD / AVHD chains: the same report as for VHDX
(:class:`vhdx.check.CheckReport`), collecting every finding instead of stopping.

Checked per file: both footer copies (checksum, agreement), the dynamic header
checksum, BAT entries (inside the file, clear of the header and BAT, no two
blocks overlapping, none over locator data), sector bitmaps (a dynamic disk's
unmarked sectors must hold zeros, vhd.md §5.2), parent locators, saved state and
CHS; per link: Unique Id linkage and time stamp (the open path's own rules).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence

from ..check import CheckReport, Finding
from ..errors import ChecksumError, VhdxError
from . import structures as S
from .chain import check_parent, find_parent
from .file import VhdFile


def _open(path: str, report: CheckReport) -> VhdFile | None:
    try:
        return VhdFile(path)
    except ChecksumError as e:
        report.findings.append(Finding(path, "error", str(e)))
        try:
            return VhdFile(path, ignore_checksums=True)  # keep checking the rest
        except VhdxError:
            return None
    except VhdxError as e:
        report.findings.append(Finding(path, "error", str(e)))
        return None


def _check_file(f: VhdFile, report: CheckReport) -> None:
    add = lambda sev, msg: report.findings.append(Finding(f.path, sev, msg))
    for w in f.warnings:
        if "checksums are ignored" not in w:
            add("warning", w)
    if f.footer.saved_state:
        add("warning", "the disk is in a saved state (its VM was saved); do not merge or compact it")
    if f.creator_app in (b"vpc ", b"vs  ") and f.chs_size != f.virtual_size:
        add("warning", f"Virtual PC disk: CHS covers {f.chs_size} bytes, Current Size is {f.virtual_size} "
            "(the guest never saw the tail)")
    if f.is_fixed:
        return
    report.blocks_checked += f.blocks
    span = f.bitmap_size + f.block_size
    blocks = sorted((off, b) for b, off in f.allocated_blocks())
    for (a, ba), (b, bb) in itertools.pairwise(blocks):
        if b < a + span:
            add("error", f"BAT entries {ba} and {bb} overlap (blocks at {a:#x} and {b:#x})")
    locs = [(x["data_offset"], x["data_offset"] + x["data_length"], x["slot"]) for x in f.locators
            if not x.get("problem")]
    for off, b in blocks:
        for lo, hi, slot in locs:
            if off < hi and off + span > lo:
                add("error", f"BAT entry {b}: the block at {off:#x} overlaps parent locator {slot}'s data")
    for x in f.locators:
        if x.get("problem"):
            add("warning", f"parent locator {x['slot']}: {x['problem']}")
    if not f.has_parent and f.locators:
        add("warning", "a dynamic disk carries parent locators")
    if not f.has_parent:
        # Unmarked sectors of a dynamic disk must be zeros on disk (vhd.md §5.2).
        for b, off in f.allocated_blocks():
            runs = f.block_runs(b)
            if len(runs) == 1 and runs[0][2]:
                continue
            data = off + f.bitmap_size
            bad = 0
            for s, n, present in runs:
                if not present:
                    chunk = os.pread(f.fd, n * S.SECTOR, data + s * S.SECTOR)
                    if chunk.count(0) != len(chunk):
                        bad += 1
            if bad:
                add("warning", f"block {b}: sectors not marked in its bitmap hold non-zero data (read as zeros)")


def check_vhd_chain(path: str | os.PathLike[str], parents: Sequence[str | os.PathLike[str]] | None = None,
                    search_dirs: Sequence[str | os.PathLike[str]] = (),
                    ignore_linkage: bool = False) -> CheckReport:
    """Validate a VHD and every ancestor; never raises for problems in the files."""
    report = CheckReport()
    explicit = [os.fspath(p) for p in (parents or ())]
    opened: list[VhdFile] = []
    current = os.fspath(path)
    try:
        f = _open(current, report)
        report.files.append(current)
        while f is not None:
            opened.append(f)
            _check_file(f, report)
            if not f.has_parent:
                break
            if len(opened) > 256:
                report.findings.append(Finding(f.path, "error", "chain deeper than 256 files"))
                break
            warnings: list[str] = []
            try:
                if explicit:
                    parent = VhdFile(explicit.pop(0), ignore_checksums=True)
                else:
                    parent = find_parent(f, search_dirs, True, True)
            except VhdxError as e:
                report.findings.append(Finding(f.path, "error", f"parent: {e}"))
                break
            try:
                check_parent(f, parent, ignore_linkage, warnings)
            except VhdxError as e:
                report.findings.append(Finding(f.path, "error", str(e)))
            report.findings += [Finding(f.path, "warning", w) for w in warnings]
            if any(os.path.samestat(os.fstat(parent.fd), os.fstat(o.fd)) for o in opened):
                report.findings.append(Finding(f.path, "error", "parent chain loops back onto itself"))
                parent.close()
                break
            parent.close()
            f = _open(parent.path, report)
            report.files.append(parent.path)
        return report
    finally:
        for o in opened:
            o.close()
