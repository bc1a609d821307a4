"""VHD writer: ``vhdx create OUT.vhd|.avhd``, Windows' layout, writes through the
API checked against an in-memory model and read back by qemu-img (fixed and
dynamic), libvhdi and dissect; differencing chains of depth 1-3."""

from __future__ import annotations

import json
import os
import random
import subprocess

import pytest
from vhd_helpers import (
    cli,
    dissect_bytes,
    file_sha,
    libvhdi_bytes,
    qemu_verify,
    qemu_raw,
)

import vhdx
from vhdx.errors import VhdxError
from vhdx.vhd import VhdFile
from vhdx.vhd import structures as VS

MiB = 1 << 20



def _random_writes(disk, model: bytearray, rng: random.Random, n: int, align: int = 1,
                   max_len: int = 300_000) -> None:
    size = len(model)
    for _ in range(n):
        off = rng.randrange(0, size) // align * align
        ln = max(align, min(rng.randrange(1, max_len) // align * align, size - off))
        data = rng.randbytes(ln)
        disk.write_at(off, data)
        model[off:off + ln] = data


@pytest.mark.parametrize("kind", ["fixed", "dynamic"])
def test_cli_create_layout_and_peers(tmp_path, kind: str) -> None:
    size = 9 * MiB + 5 * 512  # not a CHS size: max CHS is written, Current Size exact
    p = tmp_path / f"n-{kind}.vhd"
    cli("create", p, "--size", str(size), "--type", kind)
    cli("create", p, "--size", "1M", rc=1)  # never overwrites
    with VhdFile(p) as f:
        assert f.virtual_size == size and f.type_name == kind and not f.warnings
        assert (f.footer.cylinders, f.footer.heads, f.footer.sectors_per_track) == (65535, 16, 255)
        if kind == "dynamic":
            raw = p.read_bytes()
            assert raw[:512] == raw[-512:]                       # footer copy
            bat_end = f.table_offset + 4 * f.blocks
            assert raw[bat_end:4096] == b"\xff" * (4096 - bat_end)  # 0xFF padding to 4 KiB
            assert len(raw) % 4096 == 0
    info = subprocess.run(["qemu-img", "info", "--output=json", "-f", "vpc", str(p)],
                          capture_output=True, text=True, check=True)
    assert json.loads(info.stdout)["virtual-size"] == size
    rng = random.Random(3)
    model = bytearray(size)
    with vhdx.open(p, "r+") as disk:
        _random_writes(disk, model, rng, 40)
        disk.write_zeroes_at(MiB, 3 * MiB)
        model[MiB:4 * MiB] = bytes(3 * MiB)
        assert disk.read_at(0, size) == model
    with vhdx.open(p) as disk:
        assert disk.read_at(0, size) == model and not disk.warnings
    if kind == "dynamic":
        with VhdFile(p) as f:
            for _, off in f.allocated_blocks():
                assert (off + f.bitmap_size) % 4096 == 0          # data 4 KiB aligned
    qemu_verify(p, bytes(model), tmp_path)  # qemu-img check's substitute (no vpc checker)
    assert qemu_raw(p, tmp_path) == model
    lv = libvhdi_bytes([p])  # dynamic blocks are fully marked: libvhdi's bitmap bug cannot show
    if lv is not None:
        assert lv == model
    ds = dissect_bytes(p)
    if ds is not None:
        assert ds == model


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_differencing_chains(tmp_path, depth: int) -> None:
    size = 6 * MiB
    rng = random.Random(depth)
    base = tmp_path / "base.vhd"
    vhdx.create(base, size, block_size=512 * 1024)
    model = bytearray(size)
    with vhdx.open(base, "r+") as d:
        _random_writes(d, model, rng, 20, align=4096)
    paths = [base]
    for i in range(depth):
        child = tmp_path / f"snap{i}.avhd"
        cli("create", child, "--parent", paths[-1])
        with VhdFile(child) as f:
            with VhdFile(paths[-1]) as pf:
                assert f.parent_unique_id == pf.unique_id
            assert f.parent_locator["W2ru"] == f".\\{paths[-1].name}"
        # 4 KiB-aligned writes keep every bitmap byte 0x00 or 0xFF, where libvhdi's
        # masking bug cannot show (unaligned ones below are checked without it).
        with vhdx.open(child, "r+") as d:
            _random_writes(d, model, rng, 15, align=4096, max_len=100_000)
        paths.append(child)
    top = paths[-1]
    hashes = {p: file_sha(p) for p in paths}
    with vhdx.open(top) as d:  # parents found through the W2ru locators
        assert len(d.chain) == depth + 1
        assert d.read_at(0, size) == model
    lv = libvhdi_bytes(list(reversed(paths)))  # child first
    if lv is not None:
        assert lv == model
    assert {p: file_sha(p) for p in paths} == hashes
    # unaligned writes (partial bitmap bytes, partial sectors): the project only
    with vhdx.open(top, "r+") as d:
        _random_writes(d, model, rng, 30, align=1, max_len=5000)
    with vhdx.open(top) as d:
        assert d.read_at(0, size) == model


def test_create_errors(tmp_path) -> None:
    base = tmp_path / "b.vhd"
    vhdx.create(base, 2 * MiB)
    p = cli("create", tmp_path / "x.vhd", "--size", "1000", rc=1)
    assert p.stderr.startswith("vhdx: error:") and p.stderr.count("\n") == 1
    with pytest.raises(VhdxError):
        vhdx.create(tmp_path / "c.vhd", 4 * MiB, parent=base)  # size differs
    vx = tmp_path / "p.vhdx"
    vhdx.create(vx, 2 * MiB)
    with pytest.raises(VhdxError, match="mixed"):
        vhdx.create(tmp_path / "c2.avhd", parent=vx)
    with pytest.raises(VhdxError, match="mixed"):
        vhdx.create(tmp_path / "c3.avhdx", parent=base)
    with vhdx.open(base, "r+") as d, pytest.raises(VhdxError):
        d.write_at(2 * MiB - 10, bytes(20))


def test_fixed_and_empty_dynamic_match_windows_pattern(tmp_path, fixture_file) -> None:
    """An empty 10 MiB dynamic disk has the first-block position of the Windows
    fixture (bitmap at 7680, data at 8192): the footer sits at the next bitmap."""
    p = tmp_path / "e.vhd"
    vhdx.create(p, 10 * MiB)
    assert p.stat().st_size == 8192
    with VhdFile(fixture_file("vhd/dissect-dynamic.vhd.gz")) as win:
        first = min(off for _, off in win.allocated_blocks())
    with vhdx.open(p, "r+") as d:
        d.write_at(0, b"x" * 512)
    with VhdFile(p) as f:
        assert f.block_offset(0) == first
        assert f.bat[1] == VS.UNUSED


def test_fixed_create_allocates_and_checks_space_first(tmp_path, monkeypatch) -> None:
    """A fixed VHD is really allocated, as Hyper-V makes them; with too little free
    space the create is refused with the numbers and leaves nothing behind."""
    from vhdx import preflight

    p = tmp_path / "f.vhd"
    vhdx.create(p, 64 << 20, type="fixed")
    probe = tmp_path / "probe"
    with open(probe, "wb") as fh:
        try:
            os.posix_fallocate(fh.fileno(), 0, 1 << 20)
        except OSError:
            pytest.skip("this file system cannot preallocate")
    assert os.stat(p).st_blocks * 512 >= 64 << 20
    with vhdx.open(p) as d:
        assert d.read_at(0, 1 << 20) == bytes(1 << 20)  # allocated, still reads zeros
    monkeypatch.setattr(preflight, "free_bytes", lambda path: 1 << 20)
    q = tmp_path / "g.vhd"
    with pytest.raises(vhdx.InsufficientSpaceError, match=r"g\.vhd.*needs up to \d+ bytes"):
        vhdx.create(q, 64 << 20, type="fixed")
    assert not q.exists()
    vhdx.create(tmp_path / "d.vhd", 64 << 20)  # a dynamic disk grows later: no check
