"""Writer gaps of issue 9: a shrink gives the space back, no log-full refusal on
changes the spec allows (1 GiB -> 64 TiB with a 1 MiB log, shrinks over huge
sparse tables), and merges of a child larger than its target."""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

import pytest

import vhdx
from vhdx import structures as S
from vhdx.check import check_chain
from vhdx.image import ImageFile
from vhdx.merge_engine import merge
from vhdx.storage import FileStorage
from storages import RecordingStorage
from vhdx.writer import WritableDisk

import oracles
from powerloss import MODES, crash_image, make_base_image

MiB, GiB, TiB = S.MiB, S.GiB, S.TiB


def qemu_clean(p: Path) -> None:
    if oracles.have_qemu():
        r = oracles.qemu_check(p)
        assert r.returncode == 0, r.stdout + r.stderr


def bat_first_create(p: Path, size: int, block_size: int, log_size: int = MiB) -> Path:
    """A dynamic disk laid out as qemu-img lays it out (log, then a 1 MiB BAT region
    hemmed in by the metadata region), built by vhdx.layout."""
    make_base_image(p, size, block_size, log_size, bat_first=True)
    return p


def log_length(p: Path) -> int:
    with ImageFile(p) as img:
        return img.header.log_length


# --- shrink --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["dynamic", "differencing"])
def test_shrink_truncates_the_file(tmp_path, kind):
    rng = random.Random(1)
    if kind == "differencing":
        base = Path(vhdx.create(tmp_path / "b.vhdx", 64 * MiB, block_size=MiB))
        p = Path(vhdx.create(tmp_path / "c.avhdx", parent=base, block_size=MiB))
    else:
        p = Path(vhdx.create(tmp_path / "a.vhdx", 64 * MiB, block_size=MiB))
    with vhdx.open(p, "r+") as d:
        for b in range(0, 64, 3):
            d.write_at(b * MiB, rng.randbytes(MiB))
        for b in range(30, 64, 3):   # blocks past the new end: allocated, zeros written
            d.write_at(b * MiB, bytes(MiB))
        d.write_zeroes_at(22 * MiB, 8 * MiB)
        keep = d.read_at(0, 22 * MiB)
        before = p.stat().st_size
        allocated = {b: d.image.block(b).file_offset for b in range(0, 22, 3)}
        d.resize(22 * MiB)
        after = p.stat().st_size
        d.write_at(21 * MiB, b"z" * 4096)  # still writable; allocation restarts at the end
    # The live blocks are the first ones allocated: the file ends right after them.
    assert after == max(allocated.values()) + MiB < before
    assert before - after >= 14 * MiB
    with vhdx.open(p) as d:
        got = d.read_at(0, d.size)
    assert d.size == 22 * MiB
    assert got[:21 * MiB] == keep[:21 * MiB] and got[21 * MiB:21 * MiB + 4096] == b"z" * 4096
    assert check_chain(p).clean
    if kind == "dynamic":
        qemu_clean(p)


def test_shrink_over_a_huge_sparse_table_completes(tmp_path):
    """200 ZERO entries in 200 BAT sectors past the new end: more than one log entry
    carries; they are dropped by entries after the size change, not refused."""
    p = Path(vhdx.create(tmp_path / "a.vhdx", 256 * GiB, block_size=MiB))
    with vhdx.open(p, "r+") as d:
        d.write_at(0, b"head" * 1024)
        for k in range(1, 201):
            d.write_zeroes_at(k * GiB, MiB)
        d.resize(512 * MiB)
    with vhdx.open(p) as d:
        assert d.size == 512 * MiB and d.read_at(0, 4096) == b"head" * 1024
    assert check_chain(p).clean
    qemu_clean(p)


# --- 1 GiB -> 64 TiB with a 1 MiB log ----------------------------------------------------------
@pytest.mark.parametrize("maker", ["vhdx", "bat-first"])
def test_grow_1g_to_64t_with_1m_log(tmp_path, maker):
    p = tmp_path / "g.vhdx"
    if maker == "bat-first":
        bat_first_create(p, GiB, 32 * MiB)
    else:
        vhdx.create(p, GiB, block_size=32 * MiB)
    assert log_length(p) == MiB
    with vhdx.open(p, "r+") as d:
        d.write_at(100 * MiB + 3, b"before")
        old_bat = d.image.header_section.bat_region
        d.resize(64 * TiB)
        assert d.image.header_section.bat_region.file_offset != old_bat.file_offset  # moved
        d.write_at(64 * TiB - 6, b"at end")
    with vhdx.open(p) as d:
        assert d.size == 64 * TiB
        assert d.read_at(100 * MiB + 3, 6) == b"before" and d.read_at(64 * TiB - 6, 6) == b"at end"
        assert d.read_at(40 * TiB, 4096) == bytes(4096)
    assert check_chain(p).clean
    qemu_clean(p)


@pytest.mark.parametrize("bs_mib,tib", [(32, 8), pytest.param(1, 64, marks=pytest.mark.soak)])
def test_grow_differencing_far(tmp_path, bs_mib, tib):
    """New entries are ZERO (the larger range must not show a parent), through a
    1 MiB log: 256 Ki of them; soak: 64 Mi (a 512 MiB table, minutes to open and check)."""
    base = Path(vhdx.create(tmp_path / "b.vhdx", GiB, block_size=32 * MiB))
    with vhdx.open(base, "r+") as w:
        w.write_at(GiB - 4096, b"\x77" * 4096)
    child = Path(vhdx.create(tmp_path / "c.avhdx", parent=base, block_size=bs_mib * MiB))
    with vhdx.open(child, "r+") as d:
        d.resize(tib * TiB)
    with vhdx.open(child) as d:
        assert d.size == tib * TiB
        assert d.read_at(GiB - 4096, 8192) == b"\x77" * 4096 + bytes(4096)
        assert d.read_at(tib * TiB - 4096, 4096) == bytes(4096)
    assert check_chain(child).clean


def test_power_cuts_during_grow_to_64t(tmp_path):
    """Every cut point of a 1 GiB -> 64 TiB grow (BAT moved, 1 MiB log), several
    landing modes each: the file opens at 1 GiB or 64 TiB with the data intact,
    checks clean, and after a writable open (log replay) qemu-img checks it clean."""
    src = tmp_path / "g.vhdx"
    vhdx.create(src, GiB, block_size=32 * MiB)
    with vhdx.open(src, "r+") as d:
        d.write_at(5 * MiB, b"payload!" * 512)
    original = src.read_bytes()
    rec = RecordingStorage(FileStorage.open(src))
    with WritableDisk(src, storage=rec) as d:
        d.resize(64 * TiB)
    rec.inner.close()
    journal = rec.journal
    rng = random.Random(5)
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    d = Path(tempfile.mkdtemp(prefix="vhdx-grow-", dir=shm))
    sizes = {"old": 0, "new": 0}
    try:
        crash = d / "crash.vhdx"
        n = 0
        for cut in range(len(journal) + 1):
            for mode in ("none", rng.choice(MODES[1:])):
                crash.write_bytes(crash_image(original, journal[:cut], mode, rng))
                with vhdx.open(crash) as v:
                    assert v.size in (GiB, 64 * TiB), (cut, mode, v.size)
                    assert v.read_at(5 * MiB, 4096) == b"payload!" * 512
                    sizes["old" if v.size == GiB else "new"] += 1
                assert not check_chain(crash).errors
                if n % 5 == 0:
                    with vhdx.open(crash, "r+"):
                        pass  # replays a dirty log into the file
                    assert check_chain(crash).clean
                    qemu_clean(crash)
                n += 1
    finally:
        shutil.rmtree(d, ignore_errors=True)
    assert sizes["old"] and sizes["new"] and n >= 30, (sizes, n)


# --- merge of a child larger than its target ---------------------------------------------------
def test_merge_child_grown_far_past_a_1m_log_target(tmp_path):
    """A checkpoint resized to 4 TiB merges into a 1 GiB base laid out as qemu-img
    does with a 1 MiB log: the base grows first (BAT moved), then the blocks merge."""
    base = bat_first_create(tmp_path / "base.vhdx", GiB, 32 * MiB)
    with vhdx.open(base, "r+") as w:
        w.write_at(0, b"\x11" * MiB)
        w.write_at(GiB - MiB, b"\x22" * MiB)
    child = Path(vhdx.create(tmp_path / "c.avhdx", parent=base, block_size=32 * MiB))
    with vhdx.open(child, "r+") as w:
        w.resize(4 * TiB)
        w.write_at(GiB - 4096, b"\x33" * 8192)         # straddles the old end
        w.write_at(3 * TiB + 17, b"far away")
    with vhdx.open(child) as c:
        want = {off: c.read_at(off, n) for off, n in
                ((0, MiB), (GiB - MiB, 2 * MiB), (3 * TiB, MiB), (4 * TiB - MiB, MiB))}
    s = merge(child)
    assert any("grew" in w for w in s.warnings)
    with vhdx.open(base) as b:
        assert b.size == 4 * TiB
        assert {off: b.read_at(off, len(v)) for off, v in want.items()} == want
    assert check_chain(base).clean
    qemu_clean(base)
