"""relink (Set-VHD -ParentPath): new parent with linkage checks, --fix-paths, power cuts.

Ground truth: the chain's bytes as the project's reader read them before the move,
cross-checked with libvhdi following the locator paths it reads itself.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import vhdx
from vhdx import structures as S
from vhdx.check import check_chain
from vhdx.image import ImageFile
from vhdx.storage import FileStorage
from storages import RecordingStorage
from vhdx.writer import WritableDisk

import oracles
from powerloss import MODES, crash_image

MiB = S.MiB
REPO = Path(__file__).resolve().parent.parent


def run(*args: object, rc: int = 0) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "vhdx.cli", *map(str, args)], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == rc, (r.returncode, r.stdout, r.stderr)
    return r


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_digests(*dirs: Path) -> dict[str, str]:
    return {str(p): sha(p.read_bytes()) for d in dirs for p in sorted(d.iterdir()) if p.is_file()}


def read_all(path: Path, **kw: object) -> bytes:
    with vhdx.open(path, **kw) as d:  # type: ignore[arg-type]
        return d.read_at(0, d.size)


def make_chain(d: Path, lss: int = 512, seed: int = 1) -> tuple[Path, Path, Path, bytes]:
    """base <- mid <- top in ``d``, each with its own data; returns paths and the bytes."""
    rng = random.Random(seed)
    d.mkdir(parents=True, exist_ok=True)
    base = Path(vhdx.create(d / "base.vhdx", 8 * MiB, block_size=MiB, logical_sector_size=lss))
    with vhdx.open(base, "r+") as w:
        w.write_at(0, rng.randbytes(5 * MiB))
    mid = Path(vhdx.create(d / "mid.avhdx", parent=base, block_size=MiB))
    with vhdx.open(mid, "r+") as w:
        w.write_at(MiB + lss, rng.randbytes(2 * MiB))
    top = Path(vhdx.create(d / "top.avhdx", parent=mid, block_size=MiB))
    with vhdx.open(top, "r+") as w:
        w.write_at(3 * MiB + 3 * lss, rng.randbytes(MiB))
        w.write_at(6 * MiB, rng.randbytes(4096))
    return base, mid, top, read_all(top)


def moved_chain(tmp_path: Path) -> tuple[Path, Path, Path, bytes]:
    """The chain of :func:`make_chain` with mid and base moved to two other folders."""
    base, mid, top, data = make_chain(tmp_path / "vm")
    (tmp_path / "d1").mkdir()
    (tmp_path / "d2").mkdir()
    new_mid, new_base = tmp_path / "d1" / mid.name, tmp_path / "d2" / base.name
    shutil.move(mid, new_mid)
    shutil.move(base, new_base)
    return new_base, new_mid, top, data


def win32_to_posix(value: str) -> Path:
    """Independent decoding of the ``\\\\?\\`` + backslash form written on POSIX."""
    assert value.startswith("\\\\?\\"), value
    return Path(value[4:].replace("\\", "/"))


def libvhdi_follow(top: Path) -> bytes:
    """libvhdi reads the chain following the parent file names libvhdi itself
    reads from each locator (only the opening is ours)."""
    import pyvhdi

    paths = [top]
    while True:
        f = pyvhdi.file()
        f.open(str(paths[-1]))
        try:
            name = f.get_parent_filename()
        finally:
            f.close()
        if not name:
            break
        paths.append(win32_to_posix(name))
        assert paths[-1].is_file(), (paths[-1], name)
    return oracles.libvhdi_bytes(paths)


def assert_windows_form(loc: dict[str, str]) -> None:
    for key in ("relative_path", "absolute_win32_path"):
        assert "\\" in loc[key] and "/" not in loc[key], (key, loc[key])
    assert loc["absolute_win32_path"].startswith("\\\\?\\")


def test_relink_moved_chain(tmp_path):
    base, mid, top, data = moved_chain(tmp_path)
    with pytest.raises(vhdx.ParentNotFoundError):
        vhdx.open(top)
    dwg_top = ImageFile(top).data_write_guid
    s1 = vhdx.relink(top, mid)
    assert any("its own parent was not found" in w for w in s1.warnings)  # mid is still stale
    s2 = vhdx.relink(mid, base)
    assert [c.path for c in s1.changes + s2.changes] == [str(top), str(mid)]
    assert read_all(top) == data
    with ImageFile(top) as t, ImageFile(mid) as m:
        assert t.data_write_guid == dwg_top  # the locator is not user-visible data
        assert_windows_form(t.parent_locator)
        assert_windows_form(m.parent_locator)
        assert t.parent_locator["relative_path"] == "..\\d1\\mid.avhdx"
        assert m.parent_locator["relative_path"] == "..\\d2\\base.vhdx"
        assert win32_to_posix(t.parent_locator["absolute_win32_path"]) == mid
    for p in (top, mid):
        assert check_chain(p).clean
    if oracles.have_libvhdi():
        assert sha(libvhdi_follow(top)) == sha(data)


def test_fix_paths_with_search_dirs(tmp_path):
    base, mid, top, data = moved_chain(tmp_path)
    dirs = [tmp_path / "d1", tmp_path / "d2"]
    before = file_digests(tmp_path / "vm", *dirs)
    dry = vhdx.relink(top, fix_paths=True, search_dirs=dirs, dry_run=True)
    assert [c.path for c in dry.changes] == [str(top), str(mid)]
    assert file_digests(tmp_path / "vm", *dirs) == before  # a dry run writes nothing
    with pytest.raises(vhdx.ParentNotFoundError):
        vhdx.open(top)
    s = vhdx.relink(top, fix_paths=True, search_dirs=dirs)
    assert [c.new for c in s.changes] == [c.new for c in dry.changes]
    assert read_all(top) == data
    again = vhdx.relink(top, fix_paths=True)  # nothing stale now, and no options needed
    assert not again.changes and again.unchanged == [str(top), str(mid)]
    if oracles.have_libvhdi():
        assert sha(libvhdi_follow(top)) == sha(data)


def test_fix_paths_keeps_entries_that_hold(tmp_path):
    base, mid, top, data = make_chain(tmp_path / "vm")
    # Only the absolute path of top is stale when the whole folder moves.
    shutil.move(tmp_path / "vm", tmp_path / "moved")
    top, mid = tmp_path / "moved" / top.name, tmp_path / "moved" / mid.name
    old = ImageFile(top).parent_locator
    s = vhdx.relink(top, fix_paths=True)
    assert {k for c in s.changes for k in c.changed} == {"absolute_win32_path"}
    new = ImageFile(top).parent_locator
    assert new["relative_path"] == old["relative_path"] == ".\\mid.avhdx"
    assert win32_to_posix(new["absolute_win32_path"]) == mid
    assert read_all(top) == data


def test_volume_path_dropped_other_keys_kept(tmp_path):
    base, mid, top, data = moved_chain(tmp_path)
    with WritableDisk(top, standalone=True) as w:
        w.update_parent_locator({"volume_path": "\\\\?\\Volume{0d3ab8f2-0000-0000-0000-100000000000}\\vm\\mid.avhdx",
                                 "custom_key": "kept"})
    vhdx.relink(top, mid)
    loc = ImageFile(top).parent_locator
    assert "volume_path" not in loc and loc["custom_key"] == "kept"


def test_wrong_parent_refused_then_ignore_id_mismatch(tmp_path):
    base, mid, top, data = moved_chain(tmp_path)
    other = Path(vhdx.create(tmp_path / "d1" / "other.vhdx", 8 * MiB, block_size=MiB))
    with vhdx.open(other, "r+") as w:
        w.write_at(0, b"\x5a" * MiB)
    before = file_digests(tmp_path / "vm", tmp_path / "d1", tmp_path / "d2")
    with pytest.raises(vhdx.ParentMismatchError, match="matches neither parent_linkage"):
        vhdx.relink(top, other)
    r = run("relink", top, "--parent", other, rc=1)
    assert r.stderr.count("\n") == 1 and "DataWriteGuid" in r.stderr and str(other) in r.stderr
    assert file_digests(tmp_path / "vm", tmp_path / "d1", tmp_path / "d2") == before
    r = run("relink", top, "--parent", other, "--ignore-id-mismatch")
    assert "warning" in r.stderr and "may not match" in r.stderr
    with ImageFile(top) as t, ImageFile(other) as o:
        assert t.parent_locator["parent_linkage"] == "{%s}" % o.data_write_guid
    with vhdx.open(top) as d:  # links now, without --ignore-linkage
        assert d.chain[1].path == str(other)
        got = d.read_at(0, d.size)
    assert got[:MiB] == b"\x5a" * MiB and got != data


def test_sector_size_and_cycles_refused(tmp_path):
    base, mid, top, data = make_chain(tmp_path / "vm")
    other4k = Path(vhdx.create(tmp_path / "k.vhdx", 8 * MiB, logical_sector_size=4096))
    before = file_digests(tmp_path / "vm")
    with pytest.raises(vhdx.ParentMismatchError, match="logical sector size"):
        vhdx.relink(top, other4k, ignore_id_mismatch=True)
    with pytest.raises(vhdx.ParentMismatchError, match="cycle"):
        vhdx.relink(mid, top, ignore_id_mismatch=True)   # top descends from mid
    with pytest.raises(vhdx.ParentMismatchError, match="cycle"):
        vhdx.relink(top, top, ignore_id_mismatch=True)
    with pytest.raises(vhdx.InvalidArgumentError, match="not a differencing disk"):
        vhdx.relink(base, mid)
    assert file_digests(tmp_path / "vm") == before


def test_cli_dry_run_and_json(tmp_path):
    base, mid, top, data = moved_chain(tmp_path)
    before = file_digests(tmp_path / "vm")
    r = run("relink", top, "--parent", mid, "--dry-run")
    assert "would link" in r.stdout and "relative_path: .\\mid.avhdx -> ..\\d1\\mid.avhdx" in r.stdout
    assert "parent_linkage: {" in r.stdout and "(kept)" in r.stdout  # the whole locator is shown
    assert file_digests(tmp_path / "vm") == before
    r = run("relink", top, "--parent", mid, "--json")
    out = json.loads(r.stdout)
    assert out["mode"] == "parent" and out["changes"][0]["new"]["relative_path"] == "..\\d1\\mid.avhdx"
    assert out["changes"][0]["changed"]["relative_path"]["old"] == ".\\mid.avhdx"
    r = run("relink", mid, "--fix-paths", "--search-dir", tmp_path / "d2")
    assert "linked to" in r.stdout
    assert read_all(top) == data
    run("relink", top, rc=1)  # neither --parent nor --fix-paths


# --- power cuts -------------------------------------------------------------------------------
def test_power_cuts_during_relink(tmp_path):
    """>= 200 crash images of relinks: the child opens with the old or the new
    locator, never a broken one, and reads the same data."""
    base, mid, top, data = moved_chain(tmp_path)
    vhdx.relink(mid, base)
    journals: list[RecordingStorage] = []

    def factory(path: str) -> RecordingStorage:
        rec = RecordingStorage(FileStorage.open(path))
        journals.append(rec)
        return rec

    original = top.read_bytes()
    old_loc = ImageFile(top).parent_locator
    vhdx.relink(top, mid, storage_factory=factory)
    new_loc = ImageFile(top).parent_locator
    assert old_loc != new_loc
    journal = journals[0].journal
    assert sum(op.kind == "flush" for op in journal) >= 3
    rng = random.Random(7)
    crash = tmp_path / "d1" / "crash.avhdx"  # beside mid, so both locators resolve mid
    seen = {"old": 0, "new": 0}
    n = 0
    cuts = list(range(len(journal) + 1))
    while n < 220:
        cut = cuts[n % len(cuts)] if n < len(cuts) else rng.randrange(len(journal) + 1)
        mode = MODES[n % len(MODES)] if n >= len(cuts) else "none"
        img = crash_image(original, journal[:cut], mode, rng)
        crash.write_bytes(img)
        with ImageFile(crash) as f:
            loc = f.parent_locator
        assert loc in (old_loc, new_loc), (cut, mode, loc)
        seen["old" if loc == old_loc else "new"] += 1
        assert read_all(crash, parents=[mid, base]) == data
        if loc == new_loc:
            with vhdx.open(crash) as d:  # no options: the new locator leads to mid
                assert d.chain[1].path == str(mid)
        if n % 5 == 0:
            assert not check_chain(crash, [mid, base]).errors
        n += 1
    assert seen["old"] and seen["new"], seen


def test_ignore_id_mismatch_refuses_when_the_child_has_children(tmp_path):
    """Another parent under a disk changes what its children read: refused, named."""
    base, mid, top, data = make_chain(tmp_path / "vm")
    other = Path(vhdx.create(tmp_path / "vm" / "other.vhdx", 8 * MiB, block_size=MiB))
    before = file_digests(tmp_path / "vm")
    with pytest.raises(vhdx.DependentDisksError, match="top.avhdx"):
        vhdx.relink(mid, other, ignore_id_mismatch=True)
    assert file_digests(tmp_path / "vm") == before
    s = vhdx.relink(mid, other, ignore_id_mismatch=True, force=True)
    assert any("top.avhdx" in w for w in s.warnings)
    with ImageFile(mid) as m:
        assert m.parent_locator["relative_path"] == ".\\other.vhdx"
