"""VHD opens lock as VHDX opens do (vhdx/locking.py: readers shared, writers
exclusive, ``force_share`` takes nothing), QEMU sees the same locks, and "r+" on
a VHD that other VHDs depend on is refused unless forced (dependents found by
their Parent Unique ID, whatever their names)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from vhd_helpers import file_sha

import vhdx
from vhdx.errors import DependentDisksError, LockedError
from vhdx.vhd.disk import open_vhd
from vhdx.vhd.writer import VhdWritableDisk

MiB = 1 << 20


def _chain(tmp_path):
    base, child = tmp_path / "base.vhd", tmp_path / "snap.avhd"
    vhdx.create(base, 4 * MiB)
    with vhdx.open(base, "r+") as w:
        w.write_at(0, b"\x5a" * MiB)
    vhdx.create(child, parent=base)
    return base, child


def test_readers_share_writers_exclude(tmp_path) -> None:
    base, child = _chain(tmp_path)
    with vhdx.open(child) as a, vhdx.open(child) as b:  # two readers
        assert a.read_at(0, 16) == b.read_at(0, 16) == b"\x5a" * 16
        with pytest.raises(LockedError, match="snap.avhd"):
            vhdx.open(child, "r+")
    with vhdx.open(child, "r+") as w:
        with pytest.raises(LockedError, match="snap.avhd"):
            vhdx.open(child)
        with pytest.raises(LockedError, match="snap.avhd"):
            vhdx.open(child, "r+")
        w.write_at(0, b"\x01" * 512)
        # qemu-img -U: inspection of a disk in use, no lock taken
        with open_vhd(child, force_share=True) as r:
            assert r.read_at(0, 512) == b"\x01" * 512
    with vhdx.open(child) as r:  # the writer's lock went with it
        assert r.read_at(0, 512) == b"\x01" * 512


def test_a_reader_keeps_a_merge_off(tmp_path) -> None:
    base, child = _chain(tmp_path)
    with vhdx.open(child, "r+") as w:
        w.write_at(MiB, b"\x02" * 4096)
    before = file_sha(base)
    with vhdx.open(child):
        with pytest.raises(LockedError):
            vhdx.merge(child)
    assert file_sha(base) == before and child.exists()
    vhdx.merge(child)
    with vhdx.open(base) as d:
        assert d.read_at(MiB, 4096) == b"\x02" * 4096


def test_force_share_is_for_reads_only(tmp_path) -> None:
    base, _ = _chain(tmp_path)
    from vhdx.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError):
        vhdx.open(base, "r+", force_share=True)


@pytest.mark.skipif(shutil.which("qemu-io") is None, reason="qemu-io not installed")
def test_qemu_sees_our_locks(tmp_path) -> None:
    base = tmp_path / "q.vhd"
    vhdx.create(base, 4 * MiB)
    with vhdx.open(base):
        r = subprocess.run(["qemu-io", "-f", "vpc", "-c", "write 0 512", str(base)],
                           capture_output=True, text=True)
        assert r.returncode != 0 and "lock" in (r.stdout + r.stderr).lower()
    with vhdx.open(base, "r+"):
        r = subprocess.run(["qemu-io", "-r", "-f", "vpc", "-c", "read 0 512", str(base)],
                           capture_output=True, text=True)
        assert r.returncode != 0 and "lock" in (r.stdout + r.stderr).lower()
    r = subprocess.run(["qemu-io", "-f", "vpc", "-c", "write 0 512", str(base)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_writing_a_parent_is_refused(tmp_path) -> None:
    base, child = _chain(tmp_path)
    renamed = tmp_path / "kept.bak"  # found by content, not by name
    child.rename(renamed)
    before = file_sha(base)
    with pytest.raises(DependentDisksError, match="kept.bak"):
        vhdx.open(base, "r+")
    with pytest.raises(DependentDisksError):
        VhdWritableDisk(base)
    assert file_sha(base) == before
    with vhdx.open(base, "r+", force=True) as w:
        assert any("kept.bak" in x and "invalid" in x for x in w.warnings)
    renamed.unlink()
    with vhdx.open(base, "r+") as w:  # no child left: no refusal
        w.write_at(0, b"\x03" * 512)
