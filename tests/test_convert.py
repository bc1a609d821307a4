"""`vhdx convert SRC OUT.vhdx`: raw or VHDX chain -> new standalone VHDX, sparse."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest

import vhdx
from vhdx import structures as S
from vhdx.check import check_chain
from vhdx.convert import convert_to_vhdx

import oracles
from builder import FULLY, PARTIAL, ZERO, Block, ImageSpec, build_chain
from test_create import run

MiB = S.MiB


def _sha(p) -> str:  # noqa: ANN001
    return hashlib.sha256(open(p, "rb").read()).hexdigest()


def _sparse_raw(path, size: int, seed: int) -> bytes:  # noqa: ANN001
    rng = random.Random(seed)
    buf = bytearray(size)
    with open(path, "wb") as fh:
        fh.truncate(size)
        for _ in range(6):
            off = rng.randrange(size)
            data = rng.randbytes(min(size - off, rng.choice([1, 4096, 300000, 3 * MiB])))
            fh.seek(off)
            fh.write(data)
            buf[off:off + len(data)] = data
    return bytes(buf)


@pytest.mark.parametrize("kind", ["dynamic", "fixed"])
@pytest.mark.parametrize("bs_mib", [1, 2, 32])
def test_raw_to_vhdx(tmp_path, kind, bs_mib):
    src = tmp_path / "disk.raw"
    size = 48 * MiB + 4096
    gt = _sparse_raw(src, size, seed=bs_mib)
    before = _sha(src)
    out = tmp_path / "out.vhdx"
    run("convert", src, out, "--type", kind, "--block-size", f"{bs_mib}M")
    assert _sha(src) == before and not list(tmp_path.glob("*.part"))  # no temp left
    with vhdx.open(out) as d:
        assert d.size == size and d.block_size == bs_mib * MiB and d.top.is_fixed == (kind == "fixed")
        assert d.read_at(0, size) == gt
        if kind == "dynamic":
            # Sparse: exactly the blocks holding non-zero bytes are allocated.
            bs = bs_mib * MiB
            want = {b for b in range(-(-size // bs)) if any(gt[b * bs:(b + 1) * bs])}
            assert {b for b, _ in d.top.allocated_blocks()} == want
            assert os.path.getsize(out) <= 4 * MiB + bs_mib * MiB + len(want) * bs
    assert check_chain(out).clean
    if oracles.have_qemu():
        r = oracles.qemu_check(out)
        assert r.returncode == 0, r.stdout + r.stderr
        assert oracles.qemu_raw_bytes(out) == gt


def test_raw_size_is_padded_to_a_sector(tmp_path):
    src = tmp_path / "odd.img"
    src.write_bytes(b"\x01" * 1000)
    out = convert_to_vhdx(src, tmp_path / "odd.vhdx")
    with vhdx.open(out) as d:
        assert d.size == 1024 and d.read_at(0, 1024) == b"\x01" * 1000 + bytes(24)


def test_chain_to_vhdx(tmp_path):
    specs = [ImageSpec(virtual_size=10 * MiB, block_size=1 * MiB, name="base", seed=5,
                       blocks={0: Block(FULLY), 3: Block(FULLY), 5: Block(ZERO), 7: Block(FULLY)}),
             ImageSpec(virtual_size=10 * MiB, block_size=2 * MiB, name="child", seed=6,
                       blocks={0: Block(PARTIAL), 2: Block(FULLY), 3: Block(ZERO)})]
    chain = build_chain(tmp_path, specs)
    before = {p: _sha(p) for p in chain.paths}
    out = tmp_path / "flat.vhdx"
    run("convert", chain.top, out, "--block-size", "1M")
    assert {p: _sha(p) for p in chain.paths} == before
    with vhdx.open(out) as d:
        assert len(d.chain) == 1 and not d.top.has_parent
        assert d.read_at(0, d.size) == chain.expected()
    if oracles.have_libvhdi():
        assert oracles.libvhdi_bytes([out]) == chain.expected()
    if oracles.have_qemu():
        assert oracles.qemu_check(out).returncode == 0
        assert oracles.qemu_raw_bytes(out) == chain.expected()
    # Chain options: the parent given explicitly after moving it away.
    other = tmp_path / "elsewhere"
    other.mkdir()
    moved = other / chain.parents[0].name
    os.rename(chain.parents[0], moved)
    run("convert", chain.top, tmp_path / "flat2.vhdx", rc=1)
    run("convert", chain.top, tmp_path / "flat2.vhdx", "--parent", moved)
    with vhdx.open(tmp_path / "flat2.vhdx") as d:
        assert d.read_at(0, d.size) == chain.expected()


def test_convert_cli_errors(tmp_path):
    src = tmp_path / "a.raw"
    _sparse_raw(src, 4 * MiB, 1)
    out = tmp_path / "o.vhdx"
    out.write_bytes(b"keep")
    run("convert", src, out, rc=1)                                # exists
    assert out.read_bytes() == b"keep"
    run("convert", src, out, "--force")                           # replaced
    with vhdx.open(out) as d:
        assert d.size == 4 * MiB
    run("convert", tmp_path / "missing.raw", tmp_path / "m.vhdx", rc=1)
    run("convert", src, tmp_path / "b.vhdx", "--block-size", "3M", rc=1)
    assert not (tmp_path / "b.vhdx").exists() and not list(tmp_path.glob("*.part"))
    run("convert", out, tmp_path / "x.raw", "--type", "fixed", rc=2)  # VHDX-only options: usage
    run("convert", out, tmp_path / "x.raw")                           # raw output as before
    assert (tmp_path / "x.raw").read_bytes() == Path(src).read_bytes()
