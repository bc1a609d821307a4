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

from ..check import CheckReport, Finding, Severity, walk_chain
from ..errors import ChecksumError, VhdxError, VhdxIOError
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
        except VhdxIOError:  # the storage failed: no verdict on the file, say so
            raise
        except VhdxError:
            return None
    except VhdxIOError:  # the storage failed: no verdict on the file, say so
        raise
    except VhdxError as e:
        report.findings.append(Finding(path, "error", str(e)))
        return None


def _check_file(f: VhdFile, report: CheckReport) -> None:
    def add(sev: Severity, msg: str) -> None:
        report.findings.append(Finding(f.path, sev, msg))

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
        if f is None:
            report.files.append(current)
            return report

        def open_parent(child: VhdFile, warnings: list[str]) -> VhdFile | None:
            # Found leniently (a bad checksum must not hide the parent), then reopened
            # by _open, which reports the checksum problems as findings.
            lenient = (VhdFile(explicit.pop(0), ignore_checksums=True) if explicit
                       else find_parent(child, search_dirs, True, True))
            found = lenient.path
            lenient.close()
            parent = _open(found, report)
            if parent is None:
                report.files.append(found)
            return parent

        walk_chain(report, f, _check_file, open_parent,
                   lambda c, p, w: check_parent(c, p, ignore_linkage, w), opened)
        return report
    finally:
        for o in opened:
            o.close()
