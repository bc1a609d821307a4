"""Crash-safe metadata path: header updates, log entries, replay into the file.

Sections cited as "FORMAT.md §n" are those of docs/FORMAT.md; "MS-VHDX n.n"
those of the specification.

Rules implemented here (FORMAT.md §7 checklist):

* headers are only ever written by the two-slot procedure of FORMAT.md §2.2
  (:meth:`LogWriter._update_header`), never through the log;
* the first header update of a writable session generates the session's
  FileWriteGuid; the same value is kept until :meth:`LogWriter.close`;
* a new non-zero LogGuid is made current (header update, flushed) before any log
  byte is written, followed by an empty entry at log offset 0 whose Tail points to
  itself (FORMAT.md §6.5 step 1);
* every metadata change is one log entry: write -> flush -> apply (FORMAT.md §6.5
  step 2); the apply is made durable by the next barrier, which always comes
  before the next entry is written (that entry's pre-write flush) and before
  LogGuid is cleared (close), so Tail = own offset stays true for every entry
  while one fsync per transaction is saved; the new entry never overwrites the
  previous head entry;
* DataWriteGuid changes only through :meth:`LogWriter.mark_data_changed`, at most
  once per session, and never on replay (FORMAT.md §2.2, §6.4 step 11);
* a clean close sets LogGuid = 0 (FORMAT.md §6.5 step 3);
* a writable open of a dirty file replays the active sequence into the file first
  (FORMAT.md §6.4 steps 6-11).
"""

from __future__ import annotations

import secrets
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from . import headers as H
from . import log as LOG
from . import structures as S
from .crc import seal
from .errors import CorruptImageError, InvalidArgumentError, LogFullError, LogWriterFailedError
from .storage import Storage

__all__ = [
    "LogWriter",
    "LogFullError",
    "LogWriterFailedError",
    "ReplayReport",
    "build_log_entry",
    "entry_sector_count",
    "descriptor_sector_count",
]

SECTOR = S.LOG_SECTOR_SIZE  # 4 KiB: log sectors, update granularity
MiB = S.MiB
_ZERO_CHUNK = bytes(MiB)

# Byte ranges the log must never target: the file identifier (first 64 KiB is
# write-once, FORMAT.md §1.1/§7 rule 1) and both header slots (never logged, FORMAT.md §2.2).
_FORBIDDEN_LOW = S.REGION_TABLE_OFFSETS[0]  # 192 KiB: region tables are logged


def _round_up(x: int, a: int) -> int:
    return -(-x // a) * a


def _round_down(x: int, a: int) -> int:
    return x // a * a


def descriptor_sector_count(descriptor_count: int) -> int:
    """D = ceil((DescriptorCount + 2) / 128): header + descriptors (FORMAT.md §6.1)."""
    return max(1, -(-(descriptor_count + 2) // S.DESCRIPTORS_PER_SECTOR))


def entry_sector_count(data_count: int, zero_count: int = 0) -> int:
    """Sectors of an entry with that many data and zero descriptors: D + N."""
    return descriptor_sector_count(data_count + zero_count) + data_count


# --------------------------------------------------------------------------------
# entry construction (FORMAT.md §6.1)
# --------------------------------------------------------------------------------
def build_log_entry(
    *,
    sequence: int,
    tail: int,
    log_guid: uuid.UUID,
    flushed_file_offset: int,
    last_file_offset: int,
    data: Sequence[tuple[int, bytes]] = (),
    zeros: Sequence[tuple[int, int]] = (),
) -> bytearray:
    """Bytes of one log entry, CRC sealed over the whole entry (FORMAT.md §6.1).

    ``zeros`` are (file_offset, length) zero descriptors; ``data`` are
    (file_offset, 4096 bytes) data descriptors. Zero descriptors come first in
    descriptor order, so a data sector inside a zeroed range wins on replay.
    EntryLength is exactly (D + N) * 4096 (FORMAT.md §6.1, §11.20).
    """
    if sequence <= 0 or sequence >= 1 << 64:
        raise InvalidArgumentError(f"log sequence number {sequence} out of range")
    count = len(data) + len(zeros)
    d = descriptor_sector_count(count)
    n = len(data)
    buf = bytearray((d + n) * SECTOR)
    buf[0:64] = S.build(S.LogEntryHeader, dict(
        checksum=0,
        entry_length=len(buf),
        tail=tail,
        sequence_number=sequence,
        descriptor_count=count,
        reserved=0,
        log_guid=log_guid,
        flushed_file_offset=flushed_file_offset,
        last_file_offset=last_file_offset,
    ))
    # Descriptors are contiguous from byte 64: 126 fill the first sector and
    # 128 each later one, 64 + 32 * 126 == 4096 (FORMAT.md §6.1).
    pos = 64
    for off, length in zeros:
        buf[pos:pos + 32] = S.build(S.ZeroDescriptor, dict(
            reserved=0, zero_length=length, file_offset=off, sequence_number=sequence))
        pos += 32
    seq_hi, seq_lo = sequence >> 32, sequence & 0xFFFFFFFF
    for i, (off, update) in enumerate(data):
        if len(update) != SECTOR:
            raise InvalidArgumentError(f"log update at {off:#x} is not 4096 bytes")
        buf[pos:pos + 32] = S.build(S.DataDescriptor, dict(
            trailing_bytes=update[4092:4096], leading_bytes=update[0:8],
            file_offset=off, sequence_number=sequence))
        pos += 32
        sp = (d + i) * SECTOR
        buf[sp:sp + SECTOR] = S.build(S.DataSector, dict(
            sequence_high=seq_hi, data=update[8:4092], sequence_low=seq_lo))
    return seal(buf)


# --------------------------------------------------------------------------------
# current header (FORMAT.md §2.1) via vhdx/headers.py, as a mutable field dict
# --------------------------------------------------------------------------------
@dataclass
class _HeaderState:
    slot: int                       # 0 -> 64 KiB, 1 -> 128 KiB
    fields: dict[str, Any]          # Header fields as accepted by structures.Header


_HEADER_FIELDS = ("sequence_number", "file_write_guid", "data_write_guid", "log_guid",
                  "log_version", "version", "log_length", "log_offset")


def _read_current_header(storage: Storage) -> _HeaderState:
    """Both headers read, the current one chosen by headers.choose_header (FORMAT.md §2.1)."""
    hs = [H.parse_header(storage.pread(off, S.HEADER_SIZE), i)
          for i, off in enumerate(S.HEADER_OFFSETS)]
    cur = H.choose_header(hs)
    H.validate_log_fields(cur)
    return _HeaderState(cur.slot, {k: getattr(cur, k) for k in _HEADER_FIELDS})


# --------------------------------------------------------------------------------
# the writer
# --------------------------------------------------------------------------------
@dataclass
class ReplayReport:
    """What :meth:`LogWriter.replay` did."""

    entries: int = 0               # entries replayed (tail .. head)
    sectors_written: int = 0       # 4 KiB data updates applied
    zero_bytes: int = 0            # bytes zeroed by zero descriptors
    extended_to: int | None = None  # new file size if LastFileOffset extended it
    empty_log: bool = False        # LogGuid set but no CRC-valid entry (FORMAT.md §6.4 step 4 caveat)
    warnings: list[str] = field(default_factory=list)


def _new_guid_factory() -> uuid.UUID:
    return uuid.uuid4()


class LogWriter:
    """Session-level owner of the headers and the log of one writable file.

    Typical use::

        lw = LogWriter.open(storage)            # replays a dirty log (FORMAT.md §6.4)
        lw.mark_data_changed()                  # before user-visible changes
        ... write payload directly ...
        lw.transaction({bat_sector_off: new_4k_image})
        lw.close()                              # LogGuid = 0

    The session (new FileWriteGuid, new LogGuid, initial entry) starts lazily on
    the first :meth:`transaction`, :meth:`mark_data_changed` or :meth:`begin`, so
    opening for writing and only reading changes nothing.
    """

    def __init__(
        self,
        storage: Storage,
        *,
        guid_factory: Callable[[], uuid.UUID] = _new_guid_factory,
        first_sequence: int | None = None,
    ) -> None:
        self.storage = storage
        self._guid = guid_factory
        self._first_sequence = first_sequence
        self._hdr = _read_current_header(storage)
        h = self._hdr.fields
        self.log_offset: int = h["log_offset"]
        self.log_length: int = h["log_length"]
        if (self.log_offset % MiB or self.log_offset < MiB or self.log_length % MiB
                or self.log_length == 0):
            raise CorruptImageError(
                f"log region {self.log_offset:#x}+{self.log_length:#x} is not 1 MiB aligned")
        self._session_fwg: uuid.UUID | None = None
        self._data_changed = False
        self._session_open = False   # LogGuid set and initial entry durable
        self._head_pos = 0
        self._head_len = 0
        self._seq = 0
        self.header_updates = 0      # count of single-slot header writes (tests)
        self._failed: BaseException | None = None

    # ---- construction -------------------------------------------------------
    @classmethod
    def open(cls, storage: Storage, **kwargs: Any) -> "LogWriter":
        """Writable open: read headers and replay a dirty log into the file.
        ``kwargs`` are the constructor's keyword arguments."""
        lw = cls(storage, **kwargs)
        if lw.needs_replay:
            lw.replay()
        return lw

    # ---- header state ---------------------------------------------------------
    @property
    def header(self) -> dict[str, Any]:
        """Fields of the current header (a copy)."""
        return dict(self._hdr.fields)

    @property
    def current_slot(self) -> int:
        return self._hdr.slot

    @property
    def file_write_guid(self) -> uuid.UUID:
        guid: uuid.UUID = self._hdr.fields["file_write_guid"]
        return guid

    @property
    def data_write_guid(self) -> uuid.UUID:
        guid: uuid.UUID = self._hdr.fields["data_write_guid"]
        return guid

    @property
    def log_guid(self) -> uuid.UUID:
        guid: uuid.UUID = self._hdr.fields["log_guid"]
        return guid

    @property
    def needs_replay(self) -> bool:
        return self.log_guid != S.ZERO_GUID and not self._session_open

    @property
    def session_open(self) -> bool:
        return self._session_open

    @property
    def max_entry_length(self) -> int:
        """Largest entry a transaction may need: LogLength - 4 KiB (FORMAT.md §6.5 step 2)."""
        return self.log_length - SECTOR

    @property
    def sequence(self) -> int:
        """Sequence number of the newest entry written (0 before the session starts):
        it changes exactly when an entry became durable."""
        return self._seq

    @property
    def failed(self) -> bool:
        """True once an I/O error poisoned the session (see LogWriterFailedError)."""
        return self._failed is not None

    @contextmanager
    def _io(self) -> Iterator[None]:
        """Run a write sequence; any error leaves the writer unusable.

        After a failed write or fsync the durable state is unknown (an entry may be
        committed but not applied), so the session must not go on writing entries
        whose Tail claims earlier ones were applied, nor clear LogGuid on close.
        """
        if self._failed is not None:
            raise LogWriterFailedError(
                f"an earlier write failed ({self._failed!r}); reopen the file to replay its log")
        try:
            yield
        except BaseException as e:
            self._failed = e
            raise

    def _nonzero_guid(self) -> uuid.UUID:
        g = self._guid()
        while g == S.ZERO_GUID:
            g = self._guid()
        return g

    def _update_header(self, **changes: object) -> None:
        """Two-slot header update, done twice (FORMAT.md §2.2 procedure steps 1-6).

        The session's FileWriteGuid is generated by the first update and then kept.
        """
        if self._session_fwg is None:
            self._session_fwg = self._nonzero_guid()
        for _ in range(2):
            cur = self._hdr
            new = dict(cur.fields)
            new.update(changes)
            new["file_write_guid"] = self._session_fwg
            new["sequence_number"] = cur.fields["sequence_number"] + 1
            if new["sequence_number"] >= 1 << 64:
                raise CorruptImageError("header sequence number overflow")
            raw = bytearray(S.build(S.Header, dict(new, checksum=0)))
            seal(raw)                                          # CRC over 4 KiB (step 3)
            target = 1 - cur.slot                              # non-current slot (step 4)
            self.storage.pwrite(S.HEADER_OFFSETS[target], raw)
            self.storage.flush()                               # step 5
            self._hdr = _HeaderState(target, new)              # now current (step 6)
            self.header_updates += 1

    # ---- session ----------------------------------------------------------------
    def begin(self) -> None:
        """Start the write session (idempotent), FORMAT.md §6.5 step 1.

        Header update with the session FileWriteGuid and a new non-zero LogGuid
        (plus a new DataWriteGuid when started by :meth:`mark_data_changed`),
        then an empty entry at log offset 0 with Tail = 0, flushed.
        """
        self._begin()

    def _begin(self, **header_changes: object) -> None:
        if self._session_open:
            return
        if self.log_guid != S.ZERO_GUID:
            raise InvalidArgumentError("log is dirty: replay() before starting a session")
        with self._io():
            self._start_session(header_changes)

    def _start_session(self, header_changes: dict[str, object]) -> None:
        # Nothing may be pending: the durable size goes into FlushedFileOffset.
        if self.storage.dirty:
            self.storage.flush()
        new_log_guid = self._nonzero_guid()
        # FORMAT.md §7 rule 4: LogGuid is current (flushed, both slots) before any log write
        self._update_header(log_guid=new_log_guid, **header_changes)
        seq = self._first_sequence
        if seq is None:
            seq = secrets.randbits(62) | 1
        size = self.storage.size()
        entry = build_log_entry(
            sequence=seq, tail=0, log_guid=new_log_guid,
            flushed_file_offset=_round_down(size, MiB),
            last_file_offset=_round_up(size, MiB))
        self._write_ring(0, entry)
        self.storage.flush()
        self._head_pos, self._head_len, self._seq = 0, len(entry), seq
        self._session_open = True

    def mark_data_changed(self, guid: uuid.UUID | None = None) -> None:
        """New DataWriteGuid before the first user-visible change (FORMAT.md §2.2, §7 rule 3).

        Once per session; later calls do nothing. Flushed before returning. When
        the session has not started yet, the new DataWriteGuid rides on the
        session-start header update (one update instead of two). ``guid`` imposes
        the value: the merge engine announces it to the child first (FORMAT.md §8.3).
        """
        if self._data_changed:
            return
        if guid is not None and guid == S.ZERO_GUID:
            raise InvalidArgumentError("DataWriteGuid cannot be zero")
        new = guid or self._nonzero_guid()
        if not self._session_open:
            self._begin(data_write_guid=new)
        else:
            with self._io():
                self._update_header(data_write_guid=new)
        self._data_changed = True

    def close(self) -> None:
        """Clean close: header update with LogGuid = 0 (FORMAT.md §6.5 step 3).

        After a failed write (:attr:`failed`) nothing is written: LogGuid stays set
        so that the next writable open replays the log.
        """
        if self._session_open and self._failed is None:
            with self._io():
                if self.storage.dirty:
                    self.storage.flush()
                self._update_header(log_guid=S.ZERO_GUID)
        self._session_open = False

    # ---- transactions -------------------------------------------------------------
    def _check_target(self, off: int, length: int) -> None:
        if off % SECTOR or length <= 0 or length % SECTOR:
            raise InvalidArgumentError(
                f"log update {off:#x}+{length:#x} is not 4 KiB aligned")
        if off < _FORBIDDEN_LOW:
            raise InvalidArgumentError(
                f"log update at {off:#x} targets the file identifier or a header (FORMAT.md §2.2)")
        lo, hi = self.log_offset, self.log_offset + self.log_length
        if off < hi and off + length > lo:
            raise InvalidArgumentError(f"log update at {off:#x} overlaps the log itself")

    def transaction(
        self,
        updates: Mapping[int, bytes] | Iterable[tuple[int, bytes]],
        zeros: Iterable[tuple[int, int]] = (),
        *,
        last_file_offset: int | None = None,
        flushed_file_offset: int | None = None,
    ) -> int:
        """Apply ``updates`` atomically through one log entry (FORMAT.md §6.5 step 2).

        ``updates`` maps 4 KiB-aligned file offsets to their full new 4 KiB image;
        ``zeros`` are (offset, length) ranges (4 KiB multiples) to zero. On replay
        the zero ranges apply first, then the data sectors. Order of work:
        flush pending writes (payload must be durable before the entry that
        references it, FORMAT.md §7 rule 5c; this also makes the previous entry's apply
        durable) -> write entry -> flush -> apply. The entry is committed when this
        returns; its apply becomes durable at the next barrier (the next entry,
        :meth:`close`, or the storage's flush). A crash before then replays it.

        ``last_file_offset`` defaults to the file size (or the end of the highest
        update) rounded up to 1 MiB; the file is extended to it on apply exactly as
        replay would. ``flushed_file_offset`` may lower the logged durable size
        (FORMAT.md §7 rule 8, before a shrink). Returns the entry's sequence number.
        """
        items = sorted(updates.items() if isinstance(updates, Mapping) else updates)
        data: list[tuple[int, bytes]] = []
        seen: set[int] = set()
        for off, buf in items:
            buf = bytes(buf)
            if len(buf) != SECTOR:
                raise InvalidArgumentError(f"log update at {off:#x} is {len(buf)} bytes, not 4096")
            self._check_target(off, SECTOR)
            if off in seen:
                raise InvalidArgumentError(f"duplicate log update at {off:#x}")
            seen.add(off)
            data.append((off, buf))
        zlist = [(int(o), int(n)) for o, n in zeros]
        for off, length in zlist:
            self._check_target(off, length)
        if not data and not zlist:
            return self._seq
        need = entry_sector_count(len(data), len(zlist)) * SECTOR
        if need > self.max_entry_length:
            raise LogFullError(
                f"update needs a {need} byte log entry; the log holds at most "
                f"{self.max_entry_length} (enlarge the log)")

        self.begin()
        with self._io():
            return self._transaction(data, zlist, need, last_file_offset, flushed_file_offset)

    def _transaction(self, data: list[tuple[int, bytes]], zlist: list[tuple[int, int]], need: int,
                     last_file_offset: int | None, flushed_file_offset: int | None) -> int:
        if self.storage.dirty:
            self.storage.flush()                          # FORMAT.md §7 rule 5c
        size = self.storage.size()                        # durable now
        end = max([size] + [o + SECTOR for o, _ in data] + [o + n for o, n in zlist])
        last = _round_up(end if last_file_offset is None else max(last_file_offset, end), MiB)
        flushed = _round_down(size, MiB)
        if flushed_file_offset is not None:
            flushed = min(flushed, _round_down(flushed_file_offset, MiB))

        pos = (self._head_pos + self._head_len) % self.log_length
        if need > self.log_length - self._head_len:
            # FORMAT.md §6.5 step 2: the entry would overwrite the previous head. First
            # make an empty entry (Tail = itself) the durable head.
            seq = self._seq + 1
            empty = build_log_entry(
                sequence=seq, tail=pos, log_guid=self.log_guid,
                flushed_file_offset=flushed, last_file_offset=_round_up(size, MiB))
            self._write_ring(pos, empty)
            self.storage.flush()
            self._head_pos, self._head_len, self._seq = pos, SECTOR, seq
            pos = (pos + SECTOR) % self.log_length

        seq = self._seq + 1
        entry = build_log_entry(
            sequence=seq, tail=pos, log_guid=self.log_guid,
            flushed_file_offset=flushed, last_file_offset=last, data=data, zeros=zlist)
        assert len(entry) == need
        self._write_ring(pos, entry)
        self.storage.flush()                              # entry durable: committed
        self._head_pos, self._head_len, self._seq = pos, need, seq
        self._apply([(o, None, n) for o, n in zlist] + [(o, b, SECTOR) for o, b in data], last)
        # No barrier here: the next entry's pre-write flush (or close's) covers the
        # apply, so the entry stays replayable until then (module docstring).
        return seq

    def _write_ring(self, pos: int, entry: bytes | bytearray) -> None:
        """Write an entry at log-relative ``pos``, wrapping at the log end (FORMAT.md §6.1)."""
        first = min(len(entry), self.log_length - pos)
        self.storage.pwrite(self.log_offset + pos, memoryview(entry)[:first])
        if first < len(entry):
            self.storage.pwrite(self.log_offset, memoryview(entry)[first:])

    def _apply(self, updates: Sequence[tuple[int, bytes | None, int]], last_file_offset: int) -> None:
        """Write updates in descriptor order; coalesce adjacent data sectors."""
        run_off, run = -1, bytearray()
        for off, buf, length in updates:
            if buf is not None and run and off == run_off + len(run):
                run += buf
                continue
            if run:
                self.storage.pwrite(run_off, run)
                run_off, run = -1, bytearray()
            if buf is None:
                self._zero(off, length)
            else:
                run_off, run = off, bytearray(buf)
        if run:
            self.storage.pwrite(run_off, run)
        if self.storage.size() < last_file_offset:
            self.storage.truncate(last_file_offset)      # FORMAT.md §6.4 step 8

    def _zero(self, off: int, length: int) -> None:
        """Make [off, off+length) read zeros, writing only inside the file: past its
        end it reads zeros already (the LastFileOffset extension keeps it so).
        A plain file gets fallocate(ZERO_RANGE) where the file system has it."""
        end = min(off + length, self.storage.size())
        if end <= off:
            return
        from .storage import DeferredSyncStorage, FileStorage

        st = self.storage
        if isinstance(st, FileStorage) and type(st) in (FileStorage, DeferredSyncStorage):
            from . import native

            native.zero_ranges(st.fd, [(off, end - off)])
            st.note_external_write()
            return
        done = off
        while done < end:  # recording storages (tests) see every write
            n = min(len(_ZERO_CHUNK), end - done)
            self.storage.pwrite(done, memoryview(_ZERO_CHUNK)[:n])
            done += n

    # ---- replay -------------------------------------------------------------------
    def replay(self) -> ReplayReport:
        """Replay a dirty log into the file (FORMAT.md §6.4 steps 1-11).

        Header update with the session FileWriteGuid keeping LogGuid, apply the
        active sequence from the head's Tail entry, extend to LastFileOffset,
        flush, then a header update with LogGuid = 0. DataWriteGuid is kept.
        """
        if self.log_guid == S.ZERO_GUID or self._session_open:
            return ReplayReport()                                   # step 1
        with self._io():
            return self._replay()

    def _replay(self) -> ReplayReport:
        report = ReplayReport()
        log_guid = self.log_guid
        # steps 2-3 were checked by headers.validate_log_fields on open; a log cut
        # short by EOF reads as zeros there (as in the reader's vhdx.log._Ring)
        log = self.storage.pread(self.log_offset, self.log_length)
        size = self.storage.size()
        plan = LOG.plan_replay(log, self.log_length, log_guid, size, self.log_offset)  # steps 4-5
        report.warnings.extend(plan.warnings)
        if plan.empty:
            # Caveat of step 4: crash between the LogGuid header update and the
            # first durable entry; nothing was modified in place.
            report.empty_log = True
            self._update_header(log_guid=S.ZERO_GUID)
            return report
        self._update_header()                                      # step 6: new FWG, same LogGuid
        self._apply([(u.file_offset, u.data, u.length) for u in plan.updates], 0)   # step 7
        report.entries = len(plan.entries)
        for u in plan.updates:
            if u.data is None:
                report.zero_bytes += u.length
            else:
                report.sectors_written += 1
        if self.storage.size() < plan.last_file_offset:             # step 8
            self.storage.truncate(plan.last_file_offset)
            report.extended_to = plan.last_file_offset
        self.storage.flush()                                       # step 9
        self._update_header(log_guid=S.ZERO_GUID)                  # step 10 (step 11: DWG kept)
        return report
