"""``vhdx check`` on VHD chains: clean on good files, findings for damaged footers,
headers, overlapping BAT entries, bad locators and broken linkage; the report has
the VHDX check's shape."""

from __future__ import annotations

import json
import shutil

from vhd_helpers import cli, file_sha, make_zero_fixed_parent

import vhdx
from vhdx import check_chain  # routes VHD (vhdx.check.check_chain is the VHDX checker)
from vhdx.vhd import VhdFile
from vhdx.vhd import structures as VS

MiB = 1 << 20



def test_clean_files_and_report_shape(tmp_path, fixture_file) -> None:
    base = tmp_path / "base.vhd"
    vhdx.create(base, 4 * MiB)
    kid = tmp_path / "kid.avhd"
    vhdx.create(kid, parent=base)
    with vhdx.open(kid, "r+") as d:
        d.write_at(MiB + 7, b"data")
    before = file_sha(kid)
    out = json.loads(cli("check", "--json", kid).stdout)
    vx = tmp_path / "x.vhdx"
    vhdx.create(vx, 4 * MiB)
    ref = json.loads(cli("check", "--json", vx).stdout)
    assert set(out) == set(ref) and out["clean"] and len(out["files"]) == 2
    assert out["blocks_checked"] == 4  # 2 + 2 blocks of 2 MiB
    assert file_sha(kid) == before
    for rel in ("vhd/dissect-dynamic.vhd.gz", "vhd/dissect-fixed.vhd.gz", "vhd/qemu-d2v-zerofilled.vhd.bz2"):
        assert check_chain(fixture_file(rel)).clean, rel


def test_findings(tmp_path, fixture_file) -> None:
    src = fixture_file("vhd/dissect-dynamic.vhd.gz")
    # 1. a bad footer copy at 0: warning (the end copy is used)
    p = tmp_path / "a.vhd"
    shutil.copyfile(src, p)
    with open(p, "r+b") as fh:
        fh.seek(200)
        fh.write(b"\x01")
    r = check_chain(p)
    assert not r.errors and any("copy at offset 0" in f.message for f in r.findings)
    # exit 3: warnings only (qemu-img check's codes)
    assert cli("check", p, rc=3).stdout.strip().endswith("0 error(s), 1 warning(s)")
    # 2. two BAT entries on the same block: error
    p = tmp_path / "b.vhd"
    shutil.copyfile(src, p)
    with VhdFile(p) as f:
        toff, e0 = f.table_offset, f.bat[0]
    with open(p, "r+b") as fh:
        fh.seek(toff + 4 * 2)
        fh.write(e0.to_bytes(4, "big"))
    r = check_chain(p)
    assert any("overlap" in f.message for f in r.errors)
    # 3. a header with a wrong checksum: error, the rest still checked
    p = tmp_path / "c.vhd"
    shutil.copyfile(src, p)
    with open(p, "r+b") as fh:
        fh.seek(512 + 900)
        fh.write(b"\x01")
    r = check_chain(p)
    assert any("checksum" in f.message for f in r.errors) and r.blocks_checked == 5
    # 4. a dynamic disk whose unmarked sectors hold data: warning
    p = tmp_path / "d.vhd"
    shutil.copyfile(src, p)
    with VhdFile(p) as f:
        bm_off = f.block_offset(0)
    with open(p, "r+b") as fh:
        fh.seek(bm_off)
        fh.write(b"\x7f")  # sector 0 of block 0 (non-zero MBR) becomes unmarked
    r = check_chain(p)
    assert any("not marked" in f.message for f in r.findings)


def test_linkage_and_locators(tmp_path, fixture_file) -> None:
    child = tmp_path / "c.vhd"
    shutil.copyfile(fixture_file("vhd/dfvfs-fat-differential.vhd.gz"), child)
    with VhdFile(child) as f:
        size, puid = f.virtual_size, f.parent_unique_id
    good = tmp_path / "fat-parent.vhd"
    make_zero_fixed_parent(good, size, puid)
    assert check_chain(child).clean  # found through W2ru
    wrong = tmp_path / "w.vhd"
    make_zero_fixed_parent(wrong, size, bytes(16))
    r = check_chain(child, parents=[wrong])
    assert any("Unique Id" in f.message for f in r.errors)
    assert check_chain(child, parents=[wrong], ignore_linkage=True).errors == []
    # a locator pointing outside the file: warning
    raw = bytearray(child.read_bytes())
    h = VS.DynamicHeader.parse(bytes(raw[512:1536]))
    obj = {k: v for k, v in dict(h).items() if not k.startswith("_") and k != "cookie"}
    locs = [{k: v for k, v in dict(x).items() if not k.startswith("_")} for x in h.locators]
    locs[0]["data_offset"] = 1 << 40
    obj["locators"] = locs
    raw[512:1536] = VS.build_header(**obj)
    child.write_bytes(raw)
    r = check_chain(child)
    assert not r.errors and any("locator 0" in f.message for f in r.findings)
    r = check_chain(tmp_path / "missing.vhd")
    assert r.errors
