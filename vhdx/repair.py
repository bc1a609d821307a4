"""Log repair: replay a dirty log of one VHDX/AVHDX into the file (FORMAT.md §6.4).

``vhdx.repair(path)`` is what ``vhdx check --repair`` runs; ``dry_run=True`` plans
the replay and reports what it would write without opening anything for
writing. A clean file is never opened for writing either: an image on
read-only media (or held read-only by another tool) repairs to "clean".
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from . import log as LOG
from .errors import VhdxError, naming
from .headers import read_header_section
from .log_writer import LogWriter
from .storage import FileStorage
from .writer import lock_exclusive

__all__ = ["repair", "RepairSummary"]

RepairState = Literal["clean", "empty", "replayed"]


@dataclass(frozen=True)
class RepairSummary:
    """What :func:`repair` did (or, with ``dry_run``, would do).

    ``state``: ``"clean"`` (no dirty log, nothing written), ``"empty"`` (LogGuid
    set but no valid entry: only the headers change) or ``"replayed"``.
    ``sectors_differ`` is counted by a dry run only (sectors whose logged data
    differs from the file's); ``extended_to`` is the new file size when the
    replay extends the file (FORMAT.md §6.4 step 8), else None; ``file_size``
    the size a dry run found.
    """

    path: str
    dry_run: bool
    state: RepairState
    entries: int = 0
    sectors_written: int = 0
    sectors_differ: int | None = None
    zero_bytes: int = 0
    extended_to: int | None = None
    file_size: int | None = None  # the size a dry run found

    def describe(self) -> str:
        """One line for a person, naming the file."""
        p = self.path
        if self.state == "clean":
            return f"{p}: log is clean, nothing to replay"
        if self.state == "empty":
            return (f"{p}: would clear an empty log (LogGuid set, no entry); no data changes" if self.dry_run
                    else f"{p}: cleared an empty log (LogGuid set, no entry)")
        entries = f"{self.entries} log entr{'y' if self.entries == 1 else 'ies'}"
        if self.dry_run:
            ext = (f", extend the file from {self.file_size} to {self.extended_to} bytes"
                   if self.extended_to is not None else "")
            return (f"{p}: would replay {entries}: {self.sectors_written} sector(s) written "
                    f"({self.sectors_differ} differ from the file), {self.zero_bytes} byte(s) zeroed{ext}; "
                    "headers updated (new FileWriteGuid, LogGuid cleared)")
        ext = f", file extended to {self.extended_to} bytes" if self.extended_to else ""
        return (f"{p}: replayed {entries}: {self.sectors_written} sector(s) written, "
                f"{self.zero_bytes} byte(s) zeroed{ext}")


def _plan(path: str) -> RepairSummary:
    """The dry run: parse the log read-only and compare each logged sector with the file."""
    st = FileStorage.open(path, writable=False)
    try:
        h = read_header_section(st.pread).header
        if not h.log_dirty:
            return RepairSummary(path, True, "clean")
        size = st.size()
        plan = LOG.plan_replay(st.pread(h.log_offset, h.log_length), h.log_length, h.log_guid, size,
                               h.log_offset)
        if plan.empty:
            return RepairSummary(path, True, "empty")
        data = [u for u in plan.updates if u.data is not None]
        differ = sum(1 for u in data if st.pread(u.file_offset, u.length).ljust(u.length, b"\0") != u.data)
        return RepairSummary(
            path, True, "replayed", entries=len(plan.entries), sectors_written=len(data),
            sectors_differ=differ, zero_bytes=sum(u.length for u in plan.updates if u.data is None),
            extended_to=plan.last_file_offset if plan.last_file_offset > size else None,
            file_size=size)
    finally:
        st.close()


def repair(path: str | os.PathLike[str], *, dry_run: bool = False) -> RepairSummary:
    """Replay the dirty log of the VHDX/AVHDX at ``path`` into the file.

    Takes the writer's exclusive locks (``LockedError`` while another program
    holds the file). A file whose log is clean is opened read-only only and
    left untouched.
    """
    path = os.fspath(path)
    if dry_run:
        return _plan(path)
    ro = FileStorage.open(path, writable=False)
    try:
        clean = not read_header_section(ro.pread).header.log_dirty
    finally:
        ro.close()
    if clean:
        return RepairSummary(path, False, "clean")
    st = FileStorage.open(path, writable=True)
    try:
        lock_exclusive(st.fd, path)
        lw = LogWriter(st)
        if not lw.needs_replay:  # replayed by someone else between the two opens
            return RepairSummary(path, False, "clean")
        try:
            r = lw.replay()
        except VhdxError as e:
            raise naming(e, path) from None
        return RepairSummary(path, False, "empty" if r.empty_log else "replayed", entries=r.entries,
                             sectors_written=r.sectors_written, zero_bytes=r.zero_bytes,
                             extended_to=r.extended_to)
    finally:
        st.close()
