"""Convert both ways: VHD/AVHD chains -> VHDX (dynamic, fixed), VHDX/AVHDX chains
-> VHD (fixed, dynamic, --azure), round trips with identical content checked by
the project's reader, qemu-img and libvhdi; sources never change."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pytest
from vhd_helpers import (
    cli,
    disk_sha,
    file_sha,
    libvhdi_bytes,
    qemu_verify,
    require_tool,
    vhd_expected,
)

import vhdx
from vhdx.vhd import VhdFile
from vhdx.vhd import structures as VS

MiB = 1 << 20



@pytest.fixture
def avhd_chain(tmp_path):
    """base.vhd <- s1.avhd <- s2.avhd with data at odd places, and the model."""
    size = 7 * MiB + 3 * 512
    rng = random.Random(5)
    model = bytearray(size)
    paths = [tmp_path / "base.vhd", tmp_path / "s1.avhd", tmp_path / "s2.avhd"]
    vhdx.create(paths[0], size, block_size=1 * MiB)
    for i, p in enumerate(paths):
        if i:
            vhdx.create(p, parent=paths[i - 1])
        with vhdx.open(p, "r+") as d:
            for _ in range(12):
                off = rng.randrange(size - 1)
                n = min(rng.randrange(1, 200_000), size - off)
                b = rng.randbytes(n)
                d.write_at(off, b)
                model[off:off + n] = b
    return paths, bytes(model)


def test_avhd_chain_to_vhdx_and_back(avhd_chain, tmp_path) -> None:
    paths, model = avhd_chain
    before = {p: file_sha(p) for p in paths}
    for vtype in ("dynamic", "fixed"):
        vx = tmp_path / f"flat-{vtype}.vhdx"
        cli("convert", paths[-1], vx, "--type", vtype)
        with vhdx.open(vx) as d:
            assert d.read_at(0, d.size) == model
        for otype in ("fixed", "dynamic"):
            back = tmp_path / f"back-{vtype}-{otype}.vhd"
            cli("convert", vx, back, "--type", otype)
            with vhdx.open(back) as d:
                assert d.size == len(model) and d.read_at(0, d.size) == model
                assert d.chain[0].type_name == otype
            qemu_verify(back, model, tmp_path)  # qemu-img check's substitute (no vpc checker)
            lv = libvhdi_bytes([back])  # standalone, fully marked blocks: no bitmap bug
            if lv is not None:
                assert lv == model
    assert {p: file_sha(p) for p in paths} == before


def test_vhd_to_vhd_and_raw(avhd_chain, tmp_path) -> None:
    paths, model = avhd_chain
    out = tmp_path / "flat.vhd"
    cli("convert", paths[-1], out)
    with vhdx.open(out) as d:
        assert d.read_at(0, d.size) == model
    raw = tmp_path / "flat.raw"
    cli("convert", paths[-1], raw)
    assert raw.read_bytes() == model
    cli("convert", raw, tmp_path / "fromraw.vhd", "--type", "fixed")
    with vhdx.open(tmp_path / "fromraw.vhd") as d:
        assert d.read_at(0, d.size) == model
    cli("convert", paths[-1], out, rc=1)  # exists
    p = cli("convert", paths[-1], tmp_path / "x.avhd", rc=2)  # a usage error
    assert "standalone" in p.stderr


def test_fixture_to_vhdx_keeps_hash(shared_dir, fixture_file, tmp_path) -> None:
    images = vhd_expected(shared_dir)
    for rel in ("vhd/dissect-dynamic.vhd.gz", "vhd/dissect-fixed.vhd.gz", "vhd/dfvfs-fat-differential.vhd.gz"):
        src = fixture_file(rel)
        args = ["--parent", fixture_file(images[rel]["parent"])] if "parent" in images[rel] else []
        out = tmp_path / (Path(rel).name.split(".")[0] + ".vhdx")
        cli("convert", src, out, *args)
        assert cli("hash", out).stdout.split()[0] == images[rel]["sha256"]
        require_tool("qemu-img")
        info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(out)],
                                         capture_output=True, text=True, check=True).stdout)
        assert info["format"] == "vhdx" and info["virtual-size"] == images[rel]["virtual_size"]


def test_azure(tmp_path) -> None:
    size = 3 * MiB + 1024  # not a whole MiB: rounded up
    src = tmp_path / "src.vhdx"
    vhdx.create(src, size)
    data = random.Random(1).randbytes(5000)
    with vhdx.open(src, "r+") as d:
        d.write_at(size - 5000, data)
    out = tmp_path / "azure.vhd"
    cli("convert", src, out, "--azure")
    vsize = 4 * MiB
    assert out.stat().st_size == vsize + 512
    with VhdFile(out) as f:
        ft = f.footer
        assert f.type_name == "fixed" and ft.current_size == ft.original_size == vsize
        assert (ft.cylinders, ft.heads, ft.sectors_per_track) == VS.chs_geometry(vsize)
        assert ft.data_offset == VS.NO_DATA_OFFSET and ft.features == 2 and ft.version == 0x00010000
        assert bytes(ft.creator_os) == b"Wi2k" and not f.warnings
    raw = out.read_bytes()
    assert raw[size - 5000:size] == data and raw[size:vsize] == bytes(vsize - size)
    with vhdx.open(out) as d:
        assert d.size == vsize
    cli("convert", src, tmp_path / "a2.vhd", "--azure", "--type", "dynamic", rc=2)  # usage


def test_fixed_vhd_conversion_is_sparse(tmp_path) -> None:
    src = tmp_path / "big.vhdx"
    vhdx.create(src, 256 * MiB)
    with vhdx.open(src, "r+") as d:
        d.write_at(100 * MiB, b"\x01" * MiB)
    out = tmp_path / "big.vhd"
    cli("convert", src, out, "--type", "fixed")
    assert out.stat().st_size == 256 * MiB + 512
    with vhdx.open(src) as s:
        data = sum(e.length for e in s.extents() if e.kind == "data")
    assert data < 64 * MiB
    assert out.stat().st_blocks * 512 <= data + MiB  # only data extents were copied
    # ... and inside them only what the source file holds: the 1 MiB written, not
    # the rest of its block (a hole of the VHDX file, read as zeros).
    assert out.stat().st_blocks * 512 <= 2 * MiB < data
    with vhdx.open(out) as d, vhdx.open(src) as s:
        assert disk_sha(d) == disk_sha(s)


def test_fixed_convert_batches_cover_every_range_once() -> None:
    import random

    from vhdx.vhd import convert as C

    rng = random.Random(11)
    for _ in range(50):
        ranges, pos = [], 0
        for _ in range(rng.randrange(0, 40)):
            n = rng.choice([512, 4096, MiB, 63 * MiB, 130 * MiB])
            ranges.append((rng.randrange(1 << 40), pos, n))
            pos += n + rng.choice([0, 512])
        groups = list(C._batches(ranges))
        assert all(sum(n for *_, n in g) <= C.BATCH_BYTES and 0 < len(g) <= C.BATCH for g in groups)
        # The pieces, in order, are each input range cut into contiguous parts.
        pieces = iter([r for g in groups for r in g])
        for so, do, n in ranges:
            while n:
                pso, pdo, pn = next(pieces)
                assert (pso, pdo) == (so, do) and 0 < pn <= n
                so, do, n = so + pn, do + pn, n - pn
        assert next(pieces, None) is None


def test_fixed_convert_reports_progress_as_it_goes(tmp_path) -> None:
    src = tmp_path / "s.vhdx"
    vhdx.create(src, 256 * MiB)
    with vhdx.open(src, "r+") as d:
        for off in range(0, 200 * MiB, 8 * MiB):
            d.write_at(off, b"\x5a" * MiB)
    seen: list[int] = []
    from vhdx.vhd.convert import convert_to_vhd

    convert_to_vhd(src, tmp_path / "o.vhd", type="fixed", progress=seen.append)
    assert len(seen) >= 2 and seen == sorted(seen)
    with vhdx.open(src) as s, vhdx.open(tmp_path / "o.vhd") as o:
        assert seen[-1] == sum(e.length for e in s.extents() if e.kind == "data")
        assert disk_sha(o) == disk_sha(s)
