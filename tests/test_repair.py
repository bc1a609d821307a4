"""vhdx.repair (the library side of ``vhdx check --repair``): dry run, replay, clean files."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

import vhdx
from vhdx import log as LOG
from vhdx.headers import read_header_section
from vhdx.storage import FileStorage

import oracles

MiB = 1 << 20


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _crashed_copy(tmp_path: Path) -> tuple[Path, bytes]:
    """A file copied after a flush but before close: LogGuid set, entries in the log
    (as after a power loss). Returns it and the disk's content (a ground-truth buffer)."""
    p = Path(vhdx.create(tmp_path / "w.vhdx", 8 * MiB, block_size=MiB))
    want = bytearray(8 * MiB)
    with vhdx.open(p, "r+") as d:
        for off, b in ((0, 0x11), (3 * MiB + 4096, 0x22), (7 * MiB, 0x33)):
            d.write_at(off, bytes([b]) * 8192)
            want[off:off + 8192] = bytes([b]) * 8192
        d.flush()
        crashed = tmp_path / "crashed.vhdx"
        shutil.copyfile(p, crashed)
    return crashed, bytes(want)


def _updates(p: Path) -> list[LOG.Update]:
    st = FileStorage.open(p, writable=False)
    try:
        h = read_header_section(st.pread).header
        assert h.log_dirty
        plan = LOG.plan_replay(st.pread(h.log_offset, h.log_length), h.log_length, h.log_guid,
                               st.size(), h.log_offset)
        return [u for u in plan.updates if u.data is not None]
    finally:
        st.close()


def test_repair_of_a_clean_file_changes_nothing(tmp_path):
    p = Path(vhdx.create(tmp_path / "c.vhdx", 8 * MiB))
    before = _sha(p)
    for dry in (True, False):
        s = vhdx.repair(p, dry_run=dry)
        assert s.state == "clean" and s.entries == 0 and s.dry_run is dry
        assert "log is clean" in s.describe() and str(p) in s.describe()
    assert _sha(p) == before


def test_dry_run_counts_what_the_replay_then_does(tmp_path):
    p, want = _crashed_copy(tmp_path)
    data = _updates(p)
    # Undo one logged sector in the file, so that the replay has something to restore.
    victim = data[0]
    with open(p, "r+b") as fh:
        fh.seek(victim.file_offset)
        fh.write(bytes(b ^ 0xFF for b in victim.data))
    before = _sha(p)
    plan = vhdx.repair(p, dry_run=True)
    assert _sha(p) == before  # a dry run writes nothing
    assert plan.state == "replayed" and plan.entries >= 1
    assert plan.sectors_written == len(data)
    assert plan.sectors_differ is not None and 1 <= plan.sectors_differ <= len(data)
    assert f"would replay {plan.entries} log entr" in plan.describe()

    done = vhdx.repair(p)
    assert done.state == "replayed" and not done.dry_run
    assert (done.entries, done.sectors_written, done.zero_bytes) == (plan.entries, plan.sectors_written,
                                                                     plan.zero_bytes)
    assert _sha(p) != before
    with vhdx.ImageFile(p) as img:
        assert not img.header.log_dirty and not img.log_replayed
    with vhdx.open(p) as d:
        assert d.read_at(0, 8 * MiB) == want
    if oracles.have_libvhdi():  # an independent reader agrees with the ground truth
        assert oracles.libvhdi_bytes([p]) == want
    assert vhdx.repair(p).state == "clean"


def test_a_log_without_a_valid_entry_is_cleared_not_replayed(tmp_path):
    p, want = _crashed_copy(tmp_path)
    st = FileStorage.open(p, writable=False)
    h = read_header_section(st.pread).header
    st.close()
    # Every entry's checksum broken, the header's LogGuid kept: an "empty" dirty log
    # (FORMAT.md §6.4 step 4). The payload was applied before the copy was taken.
    with open(p, "r+b") as fh:
        fh.seek(h.log_offset)
        fh.write(b"\xA5" * h.log_length)
    before = _sha(p)
    plan = vhdx.repair(p, dry_run=True)
    assert plan.state == "empty" and "would clear an empty log" in plan.describe()
    assert _sha(p) == before
    done = vhdx.repair(p)
    assert done.state == "empty" and done.entries == 0 and "cleared an empty log" in done.describe()
    with vhdx.ImageFile(p) as img:
        assert not img.header.log_dirty
    with vhdx.open(p) as d:
        assert d.read_at(0, 8 * MiB) == want


def test_repair_refuses_a_missing_file(tmp_path):
    with pytest.raises(vhdx.ImageNotFoundError):
        vhdx.repair(tmp_path / "nope.vhdx")
