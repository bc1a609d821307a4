"""Windows paths from configs mapped onto a local copy: drive letters, shares, case,
refusals (device paths, '..', symbolic links out of the root), fallbacks by file name."""

from __future__ import annotations

import os

import pytest

from vhdx.hyperv.winpath import PathMapper, lookup_ci, parse_winpath


@pytest.mark.parametrize("raw,kind,drive,parts,problem", [
    (r"C:\Users\x\a.vhdx", "drive", "C", ["Users", "x", "a.vhdx"], None),
    (r"c:/Users//x/./a.vhdx", "drive", "C", ["Users", "x", "a.vhdx"], None),
    (r"\\?\D:\VMs\b.avhdx", "drive", "D", ["VMs", "b.avhdx"], None),
    (r"\\Srv\Share\d\a.vhdx", "unc", r"\\srv\share", ["d", "a.vhdx"], None),
    (r"\\?\UNC\srv\share\a.vhdx", "unc", r"\\srv\share", ["a.vhdx"], None),
    (r"\\.\PhysicalDrive0", "device", "", [], "device path"),
    (r"\\?\GLOBALROOT\Device\Harddisk0", "device", "", [], "device path"),
    (r"\\?\Volume{12345678-1234-1234-1234-123456789abc}\a.vhdx", "device", "", [], "device path"),
    (r"C:\a\..\..\etc\passwd", "drive", "C", ["a", "..", "..", "etc", "passwd"], "'..'"),
    (r"C:\a\b.vhdx:stream", "drive", "C", ["a", "b.vhdx:stream"], "alternate stream"),
    ("C:relative.vhdx", "relative", "", [], "drive-relative"),
    (r"\\server", "unc", "", [], "without a share"),
])
def test_parse(raw, kind, drive, parts, problem):
    wp = parse_winpath(raw)
    assert (wp.kind, wp.drive, wp.parts) == (kind, drive, parts)
    assert (wp.problem is None) if problem is None else (problem in wp.problem)


def _tree(root, *rels):
    for r in rels:
        p = root / r
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")


def test_roots_and_case(tmp_path):
    c, d, share = tmp_path / "c", tmp_path / "d", tmp_path / "share"
    _tree(c, "Hyper-V/Disks/Base.vhdx")
    _tree(d, "VMs/x.vhdx")
    _tree(share, "pool/y.avhdx")
    m = PathMapper([str(c), f"D:={d}", rf"\\srv\share={share}"])
    r = m.map_path(r"C:\HYPER-V\disks\base.VHDX")
    assert (r.local, r.how) == (str(c / "Hyper-V/Disks/Base.vhdx"), "root")
    assert m.map_path(r"D:\VMs\x.vhdx").local == str(d / "VMs/x.vhdx")  # D: mapping before the any-drive root
    assert m.map_path(r"E:\Hyper-V\Disks\Base.vhdx").local == str(c / "Hyper-V/Disks/Base.vhdx")
    assert m.map_path(r"\\SRV\Share\pool\y.avhdx").local == str(share / "pool/y.avhdx")
    r = m.map_path(r"\\other\share\pool\y.avhdx")
    assert r.local is None and "no --root" in r.problem
    r = m.map_path(r"C:\Hyper-V\Disks\missing.vhdx")
    assert r.local is None and r.problem == "not found under --root" and r.tried


def test_ambiguous_case_is_reported(tmp_path):
    _tree(tmp_path, "Ab/disk.vhdx", "aB/disk.vhdx")
    if os.path.samefile(tmp_path / "Ab", tmp_path / "aB"):
        pytest.skip("case-insensitive file system")
    assert lookup_ci(str(tmp_path), ["aB", "DISK.vhdx"]) == (str(tmp_path / "aB" / "disk.vhdx"), None)
    found, why = lookup_ci(str(tmp_path), ["AB", "disk.vhdx"])
    assert found is None and "ambiguous" in why and "Ab" in why and "aB" in why


def test_symlink_out_of_the_root_is_refused(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    _tree(outside, "secret.vhdx")
    root.mkdir()
    (root / "Disks").symlink_to(outside)
    r = PathMapper([str(root)]).map_path(r"C:\Disks\secret.vhdx")
    assert r.local is None and any("symbolic link" in t for t in r.tried)


def test_fallbacks_by_name(tmp_path):
    vm = tmp_path / "VM"
    _tree(vm, "Virtual Machines/x.vmcx", "Virtual Hard Disks/a.vhdx", "Virtual Machines/b.vhdx")
    _tree(tmp_path, "elsewhere/c.vhdx")
    m = PathMapper([], [str(tmp_path / "elsewhere")])
    cdir = str(vm / "Virtual Machines")
    assert m.resolve_file(r"C:\Nope\b.vhdx", cdir).how == "beside config"
    assert m.resolve_file(r"C:\Nope\a.vhdx", cdir).how == "Virtual Hard Disks"
    assert m.resolve_file(r"C:\Nope\c.vhdx", cdir).how == "search dir"
    r = m.resolve_file(r"C:\Nope\zzz.vhdx", cdir)
    assert r.local is None and len(r.tried) == 4
    r = m.resolve_file(r"\\.\PhysicalDrive0", cdir)
    assert r.local is None and "device" in r.problem and r.tried == []
