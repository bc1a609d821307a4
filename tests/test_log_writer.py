"""Tests of vhdx/storage.py and vhdx/log_writer.py, including the power-loss simulator."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import uuid
from pathlib import Path

import pytest

from vhdx import structures as S
from vhdx.crc import checksum_of, seal, verify
import vhdx
from vhdx.errors import CorruptImageError, InvalidArgumentError, ReadOnlyError
from vhdx.layout import plan_layout, write_new_image
from vhdx import log as LOG
from vhdx.log_writer import (
    LogFullError,
    LogWriter,
    LogWriterFailedError,
    _read_current_header,
    build_log_entry,
    descriptor_sector_count,
    entry_sector_count,
)
from vhdx.storage import FileStorage
from storages import JournalOp, MemoryStorage, RecordingStorage

try:  # tests/ may or may not become a package
    from . import powerloss as PL
except ImportError:
    import powerloss as PL  # type: ignore[no-redef]
import oracles

MiB = S.MiB
SECTOR = 4096
LOG_REPLAY_FIXTURE = "discutils/vhdx-log-replay.vhdx.gz"


# --------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def base_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small dynamic disk built by vhdx.layout with the BAT before the metadata."""
    p = tmp_path_factory.mktemp("base") / "base.vhdx"
    PL.make_base_image(p)
    return p


@pytest.fixture(scope="session")
def layout_base_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same small disk in vhdx.layout's own (Hyper-V-like) placement."""
    p = tmp_path_factory.mktemp("layout") / "base.vhdx"
    write_new_image(p, plan_layout(8 * MiB, MiB, 512, 4096))
    return p


@pytest.fixture
def image(base_image: Path, tmp_path: Path) -> Path:
    p = tmp_path / "img.vhdx"
    shutil.copyfile(base_image, p)
    return p


@pytest.fixture
def geom(base_image: Path) -> PL.Geometry:
    return PL.read_geometry(base_image.read_bytes())


def _guids(seed: int = 1):
    rng = random.Random(seed)
    return lambda: uuid.UUID(int=rng.getrandbits(128))


def _raw_headers(path_or_buf) -> list[bytes]:
    buf = path_or_buf.read_bytes() if isinstance(path_or_buf, Path) else path_or_buf
    return [bytes(buf[o:o + SECTOR]) for o in S.HEADER_OFFSETS]


def _assert_consistent(p: Path) -> None:
    """``vhdx check`` finds no error; qemu-img check agrees when it is installed."""
    assert PL.check_errors(p) == []
    r = PL.qemu_check(p)
    if r is not None:
        assert r.returncode == 0, r.stdout + r.stderr


def _virtual_disk(p: Path) -> bytes:
    """The virtual disk as the project's reader returns it, compared with
    ``qemu-img convert`` when qemu-img is installed."""
    with vhdx.open(p) as d:
        data = d.read_at(0, d.size)
    if PL.have_qemu():
        assert oracles.qemu_raw_bytes(p) == data
    return data


def _log_writes(journal: list[JournalOp], geom: PL.Geometry) -> list[JournalOp]:
    lo, hi = geom.log_offset, geom.log_offset + geom.log_length
    return [op for op in journal if op.kind == "write" and lo <= op.offset < hi]


# --------------------------------------------------------------------------------
# storage
# --------------------------------------------------------------------------------
def test_file_storage_roundtrip_and_recording(tmp_path: Path) -> None:
    p = tmp_path / "f.bin"
    p.write_bytes(b"")
    fs = FileStorage.open(p)
    rec = RecordingStorage(fs)
    assert not rec.dirty
    rec.pwrite(5000, b"hello")
    assert rec.dirty and rec.size() == 5005
    assert rec.pread(4998, 10) == b"\0\0hello"
    rec.flush()
    assert not rec.dirty
    rec.truncate(8192)
    rec.mark("x")
    assert [op.kind for op in rec.journal] == ["write", "flush", "truncate", "mark"]
    assert rec.journal[0] == JournalOp("write", 5000, b"hello")
    assert rec.journal[2].offset == 8192 and rec.journal[3].label == "x"
    rec.close()
    assert p.stat().st_size == 8192
    ro = FileStorage.open(p, writable=False)
    with pytest.raises(ReadOnlyError, match=f"^{p}: opened read-only"):
        ro.pwrite(0, b"x")
    with pytest.raises(ReadOnlyError):
        ro.truncate(0)
    ro.close()
    assert p.stat().st_size == 8192


def test_storages_satisfy_the_protocol(tmp_path: Path) -> None:
    from vhdx.storage import Storage
    p = tmp_path / "f.bin"
    p.write_bytes(b"x")
    fs = FileStorage.open(p)
    assert all(isinstance(x, Storage) for x in (fs, MemoryStorage(), RecordingStorage(fs)))
    fs.close()


def test_memory_storage_matches_file_semantics() -> None:
    m = MemoryStorage()
    m.pwrite(10, b"abc")
    assert m.size() == 13 and m.pread(8, 100) == b"\0\0abc"
    m.truncate(4)
    assert m.pread(0, 100) == b"\0" * 4
    m.truncate(6)
    assert m.size() == 6 and m.dirty
    m.flush()
    assert not m.dirty and m.flushes == 1


# --------------------------------------------------------------------------------
# entry construction and validation (FORMAT.md §6.1, §6.2)
# --------------------------------------------------------------------------------
@pytest.mark.parametrize("count,expected", [(0, 1), (1, 1), (125, 1), (126, 1), (127, 2),
                                            (253, 2), (254, 2), (255, 3), (382, 3), (383, 4)])
def test_descriptor_sector_count(count: int, expected: int) -> None:
    assert descriptor_sector_count(count) == expected


def _parse_back(entry: bytes) -> tuple:
    h = S.LogEntryHeader.parse(entry[:64])
    descs = []
    for k in range(h.descriptor_count):
        raw = entry[64 + 32 * k:96 + 32 * k]
        descs.append(S.ZeroDescriptor.parse(raw) if raw[:4] == b"zero" else S.DataDescriptor.parse(raw))
    return h, descs


@pytest.mark.parametrize("n_data,n_zero", [(0, 0), (1, 0), (3, 2), (124, 0), (125, 1), (126, 0),
                                           (127, 0), (60, 194), (1, 254)])
def test_entry_parses_back_and_validates(n_data: int, n_zero: int) -> None:
    rng = random.Random(n_data * 1000 + n_zero)
    seq = (0x1234_5678 << 32) | 0x9ABC_DEF0
    guid = uuid.UUID(int=rng.getrandbits(128))
    data = [(MiB * 2 + i * SECTOR, rng.randbytes(SECTOR)) for i in range(n_data)]
    zeros = [(MiB * 3 + i * 2 * SECTOR, SECTOR * (1 + i % 3)) for i in range(n_zero)]
    entry = bytes(build_log_entry(sequence=seq, tail=0, log_guid=guid,
                                  flushed_file_offset=4 * MiB, last_file_offset=5 * MiB,
                                  data=data, zeros=zeros))
    d = descriptor_sector_count(n_data + n_zero)
    assert len(entry) == (d + n_data) * SECTOR == entry_sector_count(n_data, n_zero) * SECTOR
    h, descs = _parse_back(entry)
    assert (h.entry_length, h.tail, h.sequence_number, h.descriptor_count, h.log_guid) == \
           (len(entry), 0, seq, n_data + n_zero, guid)
    assert (h.flushed_file_offset, h.last_file_offset, h.reserved) == (4 * MiB, 5 * MiB, 0)
    # CRC covers the whole entry (data sectors included)
    assert checksum_of(entry) == h.checksum
    assert verify(entry)
    assert all(x.sequence_number == seq for x in descs)
    zd = [x for x in descs if x.signature == b"zero"]
    dd = [x for x in descs if x.signature == b"desc"]
    assert [(z.file_offset, z.zero_length) for z in zd] == zeros
    for i, (desc, (off, upd)) in enumerate(zip(dd, data)):
        sec = S.DataSector.parse(entry[(d + i) * SECTOR:(d + i + 1) * SECTOR])
        assert (sec.sequence_high, sec.sequence_low) == (0x1234_5678, 0x9ABC_DEF0)
        assert desc.file_offset == off
        assert bytes(desc.leading_bytes) + sec.data + bytes(desc.trailing_bytes) == upd
    # the reader's validator (vhdx.log) accepts it as a complete sequence on its
    # own (Tail = itself) and yields the same updates in descriptor order
    ring = entry + bytes(MiB - len(entry))
    entries, any_valid = LOG.find_active_sequence(ring, MiB, guid)
    assert any_valid and len(entries) == 1
    assert [(u.file_offset, u.data, u.length) for u in entries[0].updates] == \
           [(o, None, n) for o, n in zeros] + [(o, u, SECTOR) for o, u in data]
    # any flipped byte anywhere in the entry breaks it
    for pos in {0, 5, 40, len(entry) // 2, len(entry) - 1}:
        bad = bytearray(ring)
        bad[pos] ^= 0x40
        assert LOG.find_active_sequence(bytes(bad), MiB, guid)[0] == []
    assert LOG.find_active_sequence(ring, MiB, uuid.UUID(int=guid.int ^ 1)) == ([], False)


def test_entry_rejects_bad_update_size() -> None:
    with pytest.raises(InvalidArgumentError):
        build_log_entry(sequence=1, tail=0, log_guid=uuid.uuid4(), flushed_file_offset=0,
                        last_file_offset=0, data=[(MiB * 2, b"x" * 100)])
    with pytest.raises(InvalidArgumentError):
        build_log_entry(sequence=0, tail=0, log_guid=uuid.uuid4(), flushed_file_offset=0,
                        last_file_offset=0)


# --------------------------------------------------------------------------------
# header slots and session GUID rules (FORMAT.md §2.2, §6.5)
# --------------------------------------------------------------------------------
def test_open_clean_image_writes_nothing(image: Path) -> None:
    rec = RecordingStorage(FileStorage.open(image))
    before = image.read_bytes()
    lw = LogWriter.open(rec)
    lw.close()
    rec.close()
    assert rec.journal == [] and image.read_bytes() == before


def test_header_slots_alternate_with_rising_sequence(image: Path) -> None:
    rec = RecordingStorage(FileStorage.open(image))
    lw = LogWriter.open(rec, guid_factory=_guids())
    seq0, slot0 = lw.header["sequence_number"], lw.current_slot
    lw.begin()
    lw.mark_data_changed()
    lw.transaction({2 * MiB: bytes(SECTOR)})
    lw.close()
    hdr_writes = [op for op in rec.journal if op.kind == "write" and op.offset in S.HEADER_OFFSETS]
    assert len(hdr_writes) == 6 == lw.header_updates   # begin, mark_data_changed, close: twice each
    expected_slot = 1 - slot0
    for k, op in enumerate(hdr_writes):
        assert op.offset == S.HEADER_OFFSETS[expected_slot]       # the non-current slot
        assert len(op.data) == SECTOR and verify(op.data)          # CRC over 4 KiB
        h = S.Header.parse(op.data)
        assert h.sequence_number == seq0 + k + 1
        expected_slot = 1 - expected_slot
    # every header write is followed directly by a flush
    for i, op in enumerate(rec.journal):
        if op in hdr_writes:
            assert rec.journal[i + 1].kind == "flush"
    rec.close()
    raws = _raw_headers(image)
    hs = [S.Header.parse(r) for r in raws]
    assert all(verify(r) for r in raws)
    assert sorted(h.sequence_number for h in hs) == [seq0 + 5, seq0 + 6]
    assert all(h.log_guid == S.ZERO_GUID for h in hs)        # closed cleanly, both slots
    cur = _read_current_header(MemoryStorage(image.read_bytes()))
    assert cur.fields["sequence_number"] == seq0 + 6
    # a session started by mark_data_changed: LogGuid + DataWriteGuid in one update (x2)
    rec2 = RecordingStorage(FileStorage.open(image))
    lw2 = LogWriter.open(rec2)
    dwg = lw2.data_write_guid
    lw2.mark_data_changed()
    assert lw2.header_updates == 2 and lw2.session_open and lw2.data_write_guid != dwg
    assert lw2.log_guid != S.ZERO_GUID and lw2.header["sequence_number"] == seq0 + 8
    lw2.close()
    rec2.close()


def test_session_guid_rules(image: Path) -> None:
    st = FileStorage.open(image)
    lw = LogWriter.open(st, guid_factory=_guids(7))
    fwg0, dwg0 = lw.file_write_guid, lw.data_write_guid
    assert lw.log_guid == S.ZERO_GUID
    lw.begin()
    fwg1 = lw.file_write_guid
    assert fwg1 != fwg0 and lw.data_write_guid == dwg0
    assert lw.log_guid != S.ZERO_GUID
    g = lw.log_guid
    lw.transaction({2 * MiB + SECTOR: os.urandom(SECTOR)})       # layout-only change
    assert (lw.file_write_guid, lw.data_write_guid, lw.log_guid) == (fwg1, dwg0, g)
    lw.mark_data_changed()
    dwg1 = lw.data_write_guid
    assert dwg1 not in (dwg0, S.ZERO_GUID) and lw.file_write_guid == fwg1 and lw.log_guid == g
    n = lw.header_updates
    lw.mark_data_changed()                                        # once per session
    assert lw.header_updates == n and lw.data_write_guid == dwg1
    lw.transaction({2 * MiB: os.urandom(SECTOR)})
    assert lw.file_write_guid == fwg1 and lw.log_guid == g
    lw.close()
    assert lw.log_guid == S.ZERO_GUID and lw.file_write_guid == fwg1 and lw.data_write_guid == dwg1
    st.close()
    # on disk, then a second session: new FileWriteGuid, DataWriteGuid kept until marked
    st = FileStorage.open(image)
    lw2 = LogWriter.open(st, guid_factory=_guids(8))
    assert (lw2.file_write_guid, lw2.data_write_guid, lw2.log_guid) == (fwg1, dwg1, S.ZERO_GUID)
    lw2.transaction({2 * MiB: os.urandom(SECTOR)})
    assert lw2.file_write_guid not in (fwg0, fwg1) and lw2.data_write_guid == dwg1
    assert lw2.log_guid not in (S.ZERO_GUID, g)
    lw2.mark_data_changed()
    assert lw2.data_write_guid not in (dwg0, dwg1)
    lw2.close()
    st.close()


def test_session_start_sequence(image: Path, geom: PL.Geometry) -> None:
    """Header update (x2, flushed) before the first log byte; initial empty entry
    at log offset 0 with Tail = itself, flushed (FORMAT.md §6.5 step 1, §7 rule 4)."""
    rec = RecordingStorage(FileStorage.open(image))
    lw = LogWriter.open(rec, first_sequence=77)
    slot0 = lw.current_slot
    lw.begin()
    kinds = [(op.kind, op.offset) for op in rec.journal]
    assert kinds[:4] == [("write", S.HEADER_OFFSETS[1 - slot0]), ("flush", 0),
                         ("write", S.HEADER_OFFSETS[slot0]), ("flush", 0)]
    assert S.Header.parse(rec.journal[0].data).log_guid == lw.log_guid != S.ZERO_GUID
    assert kinds[4:] == [("write", geom.log_offset), ("flush", 0)]
    entry = rec.journal[4].data
    h = S.LogEntryHeader.parse(entry)
    assert (len(entry), h.entry_length, h.tail, h.descriptor_count, h.sequence_number) == (SECTOR, SECTOR, 0, 0, 77)
    assert h.log_guid == lw.log_guid and verify(entry)
    assert h.flushed_file_offset % MiB == 0 and h.last_file_offset % MiB == 0
    assert h.flushed_file_offset <= image.stat().st_size <= h.last_file_offset
    rec.close()


# --------------------------------------------------------------------------------
# transactions (FORMAT.md §6.5 step 2, §7)
# --------------------------------------------------------------------------------
def test_transaction_write_ordering(image: Path, geom: PL.Geometry) -> None:
    rec = RecordingStorage(FileStorage.open(image))
    lw = LogWriter.open(rec, first_sequence=10)
    lw.mark_data_changed()
    start = len(rec.journal)
    end = rec.size()
    rec.truncate(end + MiB)                         # allocate a block (rule 5a)
    payload = os.urandom(MiB)
    rec.pwrite(end, payload)                        # payload write (5b)
    bat = bytearray(rec.pread(geom.bat_offset, SECTOR))
    bat[0:8] = S.bat_entry(S.PAYLOAD_BLOCK_FULLY_PRESENT, end).to_bytes(8, "little")
    seq = lw.transaction({geom.bat_offset: bytes(bat)}, [(geom.scratch_offset, 2 * SECTOR)])
    assert seq == 11
    ops = rec.journal[start:]
    kinds = [op.kind for op in ops]
    # truncate, data, FLUSH (5c), log entry, FLUSH, apply (zero range, BAT); the
    # apply's barrier is the next one (next entry or close), tested below
    assert kinds == ["truncate", "write", "flush", "write", "flush", "write", "write"]
    assert ops[3].offset == geom.log_offset + SECTOR     # right after the initial entry
    h = S.LogEntryHeader.parse(ops[3].data)
    assert (h.sequence_number, h.tail, h.descriptor_count) == (11, SECTOR, 2)
    assert h.flushed_file_offset == end + MiB == h.last_file_offset  # durable size after 5c
    assert ops[5] == JournalOp("write", geom.scratch_offset, bytes(2 * SECTOR))
    assert ops[6] == JournalOp("write", geom.bat_offset, bytes(bat))
    # The next entry is written only after a barrier that makes this apply durable.
    mark = len(rec.journal)
    bat[8:16] = bytes(8)
    lw.transaction({geom.bat_offset: bytes(bat)})
    kinds = [op.kind for op in rec.journal[mark:]]
    assert kinds == ["flush", "write", "flush", "write"]
    # Close: the last apply is durable before the header clears LogGuid.
    mark = len(rec.journal)
    lw.close()
    ops = rec.journal[mark:]
    assert [op.kind for op in ops][:2] == ["flush", "write"]
    assert ops[1].offset in S.HEADER_OFFSETS
    rec.close()
    _assert_consistent(image)
    raw = _virtual_disk(image)
    assert raw[:MiB] == payload and raw[MiB:] == bytes(len(raw) - MiB)


def test_transaction_rejects_bad_targets(image: Path, geom: PL.Geometry) -> None:
    rec = RecordingStorage(FileStorage.open(image))
    lw = LogWriter.open(rec)
    bad = [
        ({0: bytes(SECTOR)}, ()),                                # file identifier
        ({S.HEADER_OFFSETS[0]: bytes(SECTOR)}, ()),              # header: never logged
        ({geom.bat_offset + 1: bytes(SECTOR)}, ()),              # unaligned
        ({geom.bat_offset: bytes(512)}, ()),                     # not 4 KiB
        ({geom.log_offset + SECTOR: bytes(SECTOR)}, ()),         # inside the log
        ({}, [(geom.scratch_offset, 100)]),                      # zero length not 4 KiB
        ({}, [(geom.log_offset - SECTOR, 2 * SECTOR)]),          # zero range into the log
    ]
    for ups, zs in bad:
        with pytest.raises(InvalidArgumentError):
            lw.transaction(ups, zs)
    assert rec.journal == []                                      # nothing touched
    rec.close()


def test_update_too_large_for_log(image: Path, geom: PL.Geometry) -> None:
    rec = RecordingStorage(FileStorage.open(image))
    lw = LogWriter.open(rec)
    n = geom.log_length // SECTOR - 2            # D=2 + N -> LogLength: does not fit
    ups = {geom.metadata_offset + 64 * 1024 + i * SECTOR: bytes(SECTOR) for i in range(n)}
    with pytest.raises(LogFullError):
        lw.transaction(ups)
    assert rec.journal == []
    # the largest one that fits (LogLength - 4 KiB) goes through
    del ups[max(ups)]
    lw.transaction(ups)
    lw.close()
    rec.close()


def _entries_in_journal(journal: list[JournalOp], geom: PL.Geometry) -> list[tuple[int, int, int]]:
    """(log position, length, seq) of each entry write, joining wrapped halves."""
    out: list[tuple[int, int, int]] = []
    pending: tuple[int, bytes] | None = None
    for op in journal:
        if op.kind != "write" or not (geom.log_offset <= op.offset < geom.log_offset + geom.log_length):
            if pending is not None:
                raise AssertionError("wrapped entry not written contiguously")
            continue
        if pending is not None:
            assert op.offset == geom.log_offset      # second half starts at log offset 0
            data = pending[1] + op.data
            pos = pending[0]
            pending = None
        else:
            pos, data = op.offset - geom.log_offset, op.data
            if data[:4] != b"loge":
                raise AssertionError("log write not starting with an entry")
            h = S.LogEntryHeader.parse(data[:64])
            if len(data) < h.entry_length:
                assert pos + len(data) == geom.log_length
                pending = (pos, data)
                continue
        h = S.LogEntryHeader.parse(data[:64])
        assert len(data) == h.entry_length
        out.append((pos, len(data), h.sequence_number))
    return out


def test_ring_wraps_and_never_overwrites_previous_head(image: Path, geom: PL.Geometry) -> None:
    rng = random.Random(5)
    rec = RecordingStorage(FileStorage.open(image))
    lw = LogWriter.open(rec, first_sequence=2**32 - 3)    # sequence crosses 2^32 too
    ring = geom.log_length
    last_updates: dict[int, bytes] = {}
    for _ in range(40):
        k = rng.choice([1, 5, 30, 90, 126, 127, 180])
        start = rng.randrange(geom.scratch_sectors - k + 1)
        last_updates = {geom.scratch_offset + (start + i) * SECTOR: rng.randbytes(SECTOR) for i in range(k)}
        lw.transaction(last_updates)
        # after every transaction the on-disk log's active sequence is exactly the head
        log = rec.pread(geom.log_offset, ring)
        entries, _ = LOG.find_active_sequence(log, ring, lw.log_guid)
        assert [e.sequence_number for e in entries] == [lw._seq]
        assert [(u.file_offset, u.data) for u in entries[0].updates] == sorted(last_updates.items())
        for o, b in last_updates.items():
            assert rec.pread(o, SECTOR) == b
    entries = _entries_in_journal(rec.journal, geom)
    assert entries[0][:2] == (0, SECTOR)                  # initial empty entry
    seqs = [e[2] for e in entries]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    wrapped = [e for e in entries if e[0] + e[1] > ring]
    assert wrapped, "no entry wrapped across the end of the log"
    empties = [e for e in entries[1:] if e[1] == SECTOR]
    assert empties, "the empty-entry step of FORMAT.md §6.5 never ran"

    def sectors(pos: int, length: int) -> set[int]:
        return {(pos + i) % ring for i in range(0, length, SECTOR)}
    for prev, cur in zip(entries, entries[1:]):
        assert cur[0] == (prev[0] + prev[1]) % ring          # appended at the head
        assert not sectors(*prev[:2]) & sectors(*cur[:2]), f"{cur} overwrote previous head {prev}"
    lw.close()
    rec.close()


def test_empty_entry_is_flushed_before_the_big_entry(image: Path, geom: PL.Geometry) -> None:
    rec = RecordingStorage(FileStorage.open(image))
    lw = LogWriter.open(rec, first_sequence=1)
    base = geom.scratch_offset
    lw.transaction({base + i * SECTOR: os.urandom(SECTOR) for i in range(10)})    # 12 sectors
    lw.transaction({base + i * SECTOR: os.urandom(SECTOR) for i in range(100)})   # head: 102 sectors
    mark = len(rec.journal)
    # needs 192 sectors; only 256 - 102 = 154 are outside the previous head
    lw.transaction({base + i * SECTOR: os.urandom(SECTOR) for i in range(190)})
    ops = rec.journal[mark:]
    log_ops = [(i, op) for i, op in enumerate(ops) if op.kind == "write" and op.offset >= geom.log_offset
               and op.offset < geom.log_offset + geom.log_length]
    first_i, first = log_ops[0]
    h = S.LogEntryHeader.parse(first.data[:64])
    assert len(first.data) == SECTOR and h.descriptor_count == 0 and h.tail == first.offset - geom.log_offset
    assert ops[first_i + 1].kind == "flush"
    assert S.LogEntryHeader.parse(log_ops[1][1].data[:64]).sequence_number == h.sequence_number + 1
    lw.close()
    rec.close()


class _FailingStorage(MemoryStorage):
    """Raises OSError on the n-th pwrite into [lo, hi)."""

    def __init__(self, buf: bytearray, lo: int, hi: int, nth: int = 1) -> None:
        super().__init__(buf)
        self.lo, self.hi, self.left = lo, hi, nth

    def pwrite(self, offset: int, data) -> None:  # noqa: ANN001
        if self.lo <= offset < self.hi:
            self.left -= 1
            if self.left == 0:
                raise OSError(5, "injected I/O error")
        super().pwrite(offset, data)


def test_io_error_after_commit_poisons_writer_and_keeps_log_dirty(base_image: Path, geom: PL.Geometry) -> None:
    buf = bytearray(base_image.read_bytes())
    # fail while applying in place: the entry is durable, the apply is not
    st = _FailingStorage(buf, geom.scratch_offset, geom.scratch_offset + MiB)
    lw = LogWriter.open(st, guid_factory=_guids(4))
    ups = {geom.scratch_offset + i * SECTOR: bytes([i + 1]) * SECTOR for i in range(4)}
    with pytest.raises(OSError):
        lw.transaction(ups)
    assert lw.failed
    with pytest.raises(LogWriterFailedError):
        lw.transaction({geom.scratch_offset: bytes(SECTOR)})
    with pytest.raises(LogWriterFailedError):
        lw.mark_data_changed()
    n = lw.header_updates
    lw.close()                                   # must not declare the log clean
    assert lw.header_updates == n
    hdr = _read_current_header(MemoryStorage(buf)).fields
    assert hdr["log_guid"] != S.ZERO_GUID
    # the next writable open replays the committed entry
    lw2 = LogWriter.open(MemoryStorage(buf))
    assert lw2.log_guid == S.ZERO_GUID
    for o, b in ups.items():
        assert buf[o:o + SECTOR] == b


def test_argument_errors_do_not_poison(image: Path, geom: PL.Geometry) -> None:
    st = FileStorage.open(image)
    lw = LogWriter.open(st)
    with pytest.raises(InvalidArgumentError):
        lw.transaction({geom.bat_offset + 1: bytes(SECTOR)})
    assert not lw.failed
    lw.transaction({geom.scratch_offset: bytes(SECTOR)})
    lw.close()
    st.close()


# --------------------------------------------------------------------------------
# replay (FORMAT.md §6.4)
# --------------------------------------------------------------------------------
def _crash_after_commit(image: Path, geom: PL.Geometry) -> tuple[bytes, dict[int, bytes]]:
    """Image bytes as they are right after a log entry's flush, before its apply."""
    base = image.read_bytes()
    rec = RecordingStorage(FileStorage.open(image))
    lw = LogWriter.open(rec, first_sequence=5)
    lw.mark_data_changed()
    ups = {geom.scratch_offset + i * SECTOR: os.urandom(SECTOR) for i in range(3)}
    lw.transaction(ups, [(geom.scratch_offset + 10 * SECTOR, 8 * SECTOR)])
    rec.close()
    flushes = [i for i, op in enumerate(rec.journal) if op.kind == "flush"]
    commit_flush = flushes[-1]            # the flush after the entry, before the apply
    img = bytearray(base)
    for op in rec.journal[:commit_flush + 1]:
        PL._apply_op(img, op)
    return bytes(img), ups


def test_replay_dirty_image(image: Path, geom: PL.Geometry) -> None:
    img, ups = _crash_after_commit(image, geom)
    for o, b in ups.items():
        assert img[o:o + SECTOR] != b                      # not applied yet
    image.write_bytes(img)
    before = _read_current_header(MemoryStorage(img)).fields
    assert before["log_guid"] != S.ZERO_GUID
    rec = RecordingStorage(FileStorage.open(image))
    lw = LogWriter(rec, guid_factory=_guids(3))
    assert lw.needs_replay
    rep = lw.replay()
    assert (rep.entries, rep.sectors_written, rep.zero_bytes, rep.empty_log) == (1, 3, 8 * SECTOR, False)
    # header update (FWG new, LogGuid kept) strictly before any other write
    first_writes = [op for op in rec.journal if op.kind == "write"][:2]
    assert [op.offset in S.HEADER_OFFSETS for op in first_writes] == [True, True]
    assert S.Header.parse(first_writes[0].data).log_guid == before["log_guid"]
    assert rec.journal[-1].kind == "flush"
    after = lw.header
    assert after["log_guid"] == S.ZERO_GUID
    assert after["file_write_guid"] != before["file_write_guid"]
    assert after["data_write_guid"] == before["data_write_guid"]          # not rotated (§6.4 step 11)
    assert after["sequence_number"] == before["sequence_number"] + 4
    lw.begin()                                      # same session: FileWriteGuid kept
    assert lw.file_write_guid == after["file_write_guid"] and lw.log_guid != S.ZERO_GUID
    lw.close()
    rec.close()
    out = image.read_bytes()
    for o, b in ups.items():
        assert out[o:o + SECTOR] == b
    assert out[geom.scratch_offset + 10 * SECTOR:][:8 * SECTOR] == bytes(8 * SECTOR)
    _assert_consistent(image)
    # replay is idempotent: a second open finds a clean log and writes nothing
    rec = RecordingStorage(FileStorage.open(image))
    assert not LogWriter.open(rec).needs_replay and rec.journal == []
    rec.close()


def test_replay_empty_window_clears_log_guid(image: Path, geom: PL.Geometry) -> None:
    """Crash after the session's LogGuid header update, before the initial entry
    was durable: no CRC-valid entry -> log treated as empty (FORMAT.md §6.4 step 4 caveat)."""
    rec = RecordingStorage(FileStorage.open(image))
    base = image.read_bytes()
    lw = LogWriter.open(rec)
    lw.begin()
    rec.close()
    img = bytearray(base)
    for op in rec.journal[:4]:                 # both header writes + flushes only
        PL._apply_op(img, op)
    st = MemoryStorage(img)
    lw = LogWriter(st)
    assert lw.needs_replay
    rep = lw.replay()
    assert rep.empty_log and rep.warnings and lw.log_guid == S.ZERO_GUID


def test_replay_refuses_incomplete_sequence_and_truncation(image: Path, geom: PL.Geometry) -> None:
    img, _ = _crash_after_commit(image, geom)
    hdr = _read_current_header(MemoryStorage(img)).fields
    # 1. point the head's Tail at a sector that is not an entry of its sequence
    bad = bytearray(img)
    log = geom.log_offset
    head_pos = log + SECTOR
    h = S.LogEntryHeader.parse(bad[head_pos:head_pos + 64])
    entry = bytearray(bad[head_pos:head_pos + h.entry_length])
    entry[12:16] = (200 * SECTOR).to_bytes(4, "little")
    seal(entry)
    bad[head_pos:head_pos + len(entry)] = entry
    bad[log:log + SECTOR] = bytes(SECTOR)        # and drop the initial entry
    with pytest.raises(CorruptImageError):
        LogWriter.open(MemoryStorage(bad))
    with pytest.raises(PL.CheckFailure):
        PL.read_state_own(bad, geom)
    # 2. file shorter than the head's FlushedFileOffset
    short = bytearray(img[:h.flushed_file_offset - MiB])
    assert len(short) > log + geom.log_length
    with pytest.raises(CorruptImageError, match="truncated"):
        LogWriter.open(MemoryStorage(short))
    assert hdr["log_guid"] != S.ZERO_GUID


def test_replay_hyperv_fixture(fixture_file, expected: dict, tmp_path: Path) -> None:
    want = expected["images"][LOG_REPLAY_FIXTURE]
    p = tmp_path / "replayed.vhdx"
    shutil.copyfile(fixture_file(LOG_REPLAY_FIXTURE), p)
    before = _read_current_header(MemoryStorage(p.read_bytes())).fields
    st = FileStorage.open(p)
    lw = LogWriter(st)
    rep = lw.replay()
    st.close()
    # active sequence = entries 0x5000 and 0x7000 (head Tail = 0x5000), one BAT sector each
    assert (rep.entries, rep.sectors_written, rep.zero_bytes) == (2, 2, 0)
    after = _read_current_header(MemoryStorage(p.read_bytes())).fields
    assert after["log_guid"] == S.ZERO_GUID
    assert after["data_write_guid"] == before["data_write_guid"] == uuid.UUID(want["data_write_guid"])
    assert after["file_write_guid"] != before["file_write_guid"]
    assert after["sequence_number"] == before["sequence_number"] + 4
    img = p.read_bytes()
    geom = PL.read_geometry(img)
    assert geom.block_size == want["block_size"]
    n = want["virtual_size"] // want["block_size"]
    states = [int.from_bytes(img[geom.bat_offset + 8 * i:][:8], "little") & 7 for i in range(n)]
    counts = {S.PAYLOAD_STATE_NAMES[s]: states.count(s) for s in set(states)}
    assert counts == {"FULLY_PRESENT": 1, "ZERO": 3, "NOT_PRESENT": 28}
    assert PL.check_errors(p) == []
    r = PL.qemu_check(p)
    if r is not None:
        assert r.returncode == 0 and "No errors" in r.stdout, r.stdout + r.stderr
    assert hashlib.sha256(_virtual_disk(p)).hexdigest() == want["sha256_virtual_after_replay"]
    # the untouched fixture reads differently (the replay mattered)
    assert want["sha256_virtual_without_replay"] != want["sha256_virtual_after_replay"]


# --------------------------------------------------------------------------------
# power-loss simulation
# --------------------------------------------------------------------------------
DEFAULT_SEEDS = list(range(8))
CUTS_PER_WORKLOAD = 80      # x ~2.5 modes -> ~190 simulated power cuts per workload


def _run_powerloss(base_image: Path, tmp_path: Path, seed: int, *, max_cuts: int, modes: int,
                   n_steps: int, recover_every: int, check_samples: int, nested: int,
                   reader_every: int = 1, check_every: int = 1) -> dict:
    rng = random.Random(seed)
    # a real file, on tmpfs when available (fsync there is cheap; the journal,
    # not the device, decides what survives a cut)
    path = Path(PL.tmp_dir_fast() or tmp_path) / f"vhdx-pl-wl-{os.getpid()}-{seed}.vhdx"
    shutil.copyfile(base_image, path)
    try:
        rec = PL.run_random_workload(path, rng, n_steps=n_steps)
        errs = PL.check_errors(path)
        r = PL.qemu_check(path)
    finally:
        path.unlink()
    geom = rec.geom
    # sanity: the finished workload is itself the final state and passes vhdx check
    # (and qemu-img check, when installed)
    final_state, _ = PL.read_state_own(rec.final_image, geom)
    assert final_state == rec.steps[-1].after
    assert errs == []
    if r is not None:
        assert r.returncode == 0, r.stdout + r.stderr
    opener = PL.vhdx_open()
    fast = PL.tmp_dir_fast() or str(tmp_path)
    counts = {"cuts": 0, "recoveries": 0, "qemu_checks": 0, "recovered_checks": 0,
              "nested_cuts": 0, "reader_checks": 0,
              "vhdx_checks": 0, "before": 0, "after": 0}
    checks_left = check_samples
    nested_left = nested
    for k, crash in enumerate(PL.crashes(rec, rng, max_cuts, modes)):
        counts["cuts"] += 1
        try:
            got, _ = PL.read_state_own(crash.image, geom)
        except PL.CheckFailure as e:
            raise AssertionError(f"seed {seed}: image does not open: {e}\n"
                                 + PL.describe(rec, crash, rec.initial)) from None
        assert got in crash.allowed, f"seed {seed}\n" + PL.describe(rec, crash, got)
        counts["before" if got == crash.allowed[0] else "after"] += 1
        if opener is not None and k % reader_every == 0:
            fp = Path(fast) / f"vhdx-pl-{os.getpid()}-{seed}.vhdx"
            fp.write_bytes(crash.image)
            try:
                dwg, virt = PL.read_state_vhdx(fp, geom)
                errs = PL.check_errors(fp) if k % check_every == 0 else None
            finally:
                fp.unlink()
            if errs is not None:
                assert errs == [], f"seed {seed}: vhdx check: {errs}\n" + PL.describe(rec, crash, got)
                counts["vhdx_checks"] += 1
            assert (dwg, virt) in {(s.data_write_guid, s.virtual) for s in crash.allowed}, \
                f"seed {seed}: vhdx.open disagrees\n" + PL.describe(rec, crash, got)
            counts["reader_checks"] += 1
        if k % recover_every == 0:
            # writable open: replay into the file, then a fresh session must work
            buf = bytearray(crash.image)
            st = MemoryStorage(buf)
            lw = LogWriter.open(st, guid_factory=_guids(k))
            assert lw.log_guid == S.ZERO_GUID and lw.data_write_guid == got.data_write_guid
            rstate, _ = PL.read_state_own(buf, geom)
            assert rstate == got, "writable replay disagrees with the read-only view"
            counts["recoveries"] += 1
            if nested_left > 0 and crash.image != buf:
                nested_left -= 1
                counts["nested_cuts"] += _nested_replay_cuts(crash.image, geom, got, rng)
            lw.transaction({geom.scratch_offset: bytes(SECTOR)})
            lw.close()
            if checks_left > 0 and st.size() > 0:
                checks_left -= 1
                fp = tmp_path / f"rec{seed}.vhdx"
                fp.write_bytes(buf)
                assert PL.check_errors(fp) == [], f"seed {seed}: recovered image"
                r = PL.qemu_check(fp)
                if r is not None:
                    assert r.returncode == 0, f"seed {seed}: {r.stdout}{r.stderr}"
                    counts["qemu_checks"] += 1
                counts["recovered_checks"] += 1
    counts.update({f"wl_{k}": v for k, v in rec.stats.items()})
    return counts


def _check_all_crashes(rec: PL.Recording, rng: random.Random, max_cuts: int, modes: int) -> int:
    n = 0
    for crash in PL.crashes(rec, rng, max_cuts, modes):
        try:
            got, _ = PL.read_state_own(crash.image, rec.geom)
        except PL.CheckFailure as e:
            raise AssertionError(f"image does not open: {e}\n" + PL.describe(rec, crash, rec.initial)) from None
        assert got in crash.allowed, PL.describe(rec, crash, got)
        n += 1
    return n


def test_power_loss_ring_pressure(base_image: Path, tmp_path: Path) -> None:
    """Many small entries, then big ones that must not overwrite the previous head:
    torn big entries leave older small entries intact, which must never be replayed."""
    path = tmp_path / "ring.vhdx"
    shutil.copyfile(base_image, path)
    rng = random.Random(99)
    script = [("scratch", 5)] * 20 + [("scratch", 190)] * 3 + [("scratch", 5), ("scratch", 190)]
    rec = PL.run_random_workload(path, rng, script=script)
    assert rec.stats["empty_entries"] >= 2 and rec.stats["wraps"] >= 1
    # every cut inside the big transactions, 4 torn/shuffled variants each
    big_start = rec.steps[20].start
    cuts = 0
    for crash in PL.crashes(rec, rng, max_cuts=10_000, modes_per_cut=6):
        if crash.cut < big_start:
            continue
        got, _ = PL.read_state_own(crash.image, rec.geom)
        assert got in crash.allowed, PL.describe(rec, crash, got)
        cuts += 1
    print(f"ring pressure: {cuts} cuts")
    assert cuts >= 100


def _nested_replay_cuts(img: bytes, geom: PL.Geometry, expected: PL.MetaState, rng: random.Random) -> int:
    """Power cuts during the replay itself: the state must never change."""
    inner = MemoryStorage(bytearray(img))
    rec = RecordingStorage(inner)
    LogWriter.open(rec, guid_factory=_guids(1))
    recording = PL.Recording(img, geom, rec.journal, expected, [], bytes(inner.buf))
    n = 0
    for crash in PL.crashes(recording, rng, max_cuts=12, modes_per_cut=3):
        got, _ = PL.read_state_own(crash.image, geom)
        assert got == expected, "crash during replay changed the state"
        n += 1
    return n


@pytest.mark.parametrize("seed", DEFAULT_SEEDS)
def test_power_loss(base_image: Path, layout_base_image: Path, tmp_path: Path, seed: int) -> None:
    """Even seeds: BAT before metadata (qemu-img's order); odd seeds: vhdx.layout's own."""
    base = layout_base_image if seed % 2 else base_image
    counts = _run_powerloss(base, tmp_path, seed, max_cuts=CUTS_PER_WORKLOAD, modes=3,
                            n_steps=12, recover_every=7, check_samples=2, nested=2)
    print(f"seed {seed}: {counts}")
    assert counts["cuts"] >= 130          # 8 seeds -> at least 1040 simulated cuts
    assert counts["before"] > 0 and counts["after"] > 0
    assert counts["recoveries"] >= 10 and counts["recovered_checks"] >= 1
    assert counts["qemu_checks"] == (counts["recovered_checks"] if PL.have_qemu() else 0)
    if PL.vhdx_open() is not None:
        assert counts["reader_checks"] == counts["cuts"]


@pytest.mark.soak
@pytest.mark.parametrize("seed", range(100, 120))
def test_power_loss_soak(base_image: Path, layout_base_image: Path, tmp_path: Path, seed: int) -> None:
    """Opt-in (conftest: --run-soak or VHDX_SOAK=1)."""
    base = layout_base_image if seed % 2 else base_image
    counts = _run_powerloss(base, tmp_path, seed, max_cuts=400, modes=4,
                            n_steps=30, recover_every=5, check_samples=4, nested=6)
    print(f"soak seed {seed}: {counts}")
    assert counts["cuts"] >= 400
