"""The C read path for VHD chains (csrc/vhdx_native.c ``vhdx_vhd_reader_new``,
vhdx/vhd/native_read.py) against the Python resolver of VhdDisk, which is the
reference: generated chains of fixed / dynamic bases and 0-3 differencing
children with random partial writes (bitmap runs of every length, blocks of
several sizes, odd virtual sizes), read at random offsets and lengths both
ways, plus the bitmap cache staying right while a writer changes the top file.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vhdx
from vhdx import native
from vhdx.vhd.disk import VhdDisk
from vhdx.vhd.writer import VhdWritableDisk

pytestmark = pytest.mark.skipif(not native.HAVE_CHAIN_READER, reason="no native chain reader here")

KiB = 1024


def _python_read(disk: VhdDisk, offset: int, size: int) -> bytes:
    """The same read with the C path switched off (the reference)."""
    fast, rd = disk._native, disk._native_read
    disk._native = disk._native_read = None
    try:
        return disk.read_at(offset, size)
    finally:
        disk._native, disk._native_read = fast, rd


def _build(tmp, rng: random.Random, base_kind: str, depth: int, size: int, block: int) -> list[str]:
    paths: list[str] = []
    for i in range(depth + 1):
        p = str(tmp / (f"c{i}.avhd" if i else "base.vhd"))
        if i:
            vhdx.create(p, parent=paths[-1])
        else:
            vhdx.create(p, size, type=base_kind, **({} if base_kind == "fixed" else {"block_size": block}))
        with vhdx.open(p, "r+", parents=list(reversed(paths))) as w:
            for _ in range(rng.randrange(1, 12)):
                sec = rng.randrange(size // 512)
                n = min(rng.choice([1, 2, 7, 64, 300, 2048]), size // 512 - sec)
                w.write_at(sec * 512, rng.randbytes(n * 512))
        paths.append(p)
    return list(reversed(paths))  # child first


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), base_kind=st.sampled_from(["fixed", "dynamic"]),
       depth=st.integers(0, 3), block=st.sampled_from([4 * KiB, 64 * KiB, 512 * KiB, 2048 * KiB]),
       sectors=st.integers(1, 6000))
def test_c_path_matches_python_resolver(tmp_path_factory, seed: int, base_kind: str, depth: int,
                                        block: int, sectors: int) -> None:
    tmp = tmp_path_factory.mktemp("chain")
    rng = random.Random(seed)
    size = sectors * 512
    chain = _build(tmp, rng, base_kind, depth, size, block)
    with vhdx.open(chain[0], parents=chain[1:]) as d:
        assert isinstance(d, VhdDisk)
        assert d._native is not None, "the C path must be in use for a plain chain"
        assert d.read_at(0, size + 4096) == _python_read(d, 0, size + 4096)
        for _ in range(40):
            off = rng.randrange(size + 1024)
            n = rng.choice([1, 511, 512, 4096, 70000, rng.randrange(1, size + 1)])
            assert d.read_at(off, n) == _python_read(d, off, n), (off, n)
            buf = bytearray(n)
            got = d.readinto_at(off, buf)
            want = _python_read(d, off, n)
            assert got == len(want) and bytes(buf[:got]) == want


def test_writer_reads_its_own_writes_through_the_c_path(tmp_path) -> None:
    """The top file's bits change under the reader: it must not serve stale ones."""
    base, child = tmp_path / "b.vhd", tmp_path / "c.avhd"
    vhdx.create(base, 8 << 20, block_size=512 * KiB)
    with vhdx.open(base, "r+") as w:
        w.write_at(0, b"\x11" * (8 << 20))
    vhdx.create(child, parent=base)
    rng = random.Random(7)
    model = bytearray(b"\x11" * (8 << 20))
    with VhdWritableDisk(child) as w:
        assert w._native is not None
        for _ in range(60):
            off = rng.randrange(0, (8 << 20) - 8192)
            data = rng.randbytes(rng.randrange(1, 8192))
            w.write_at(off, data)
            model[off:off + len(data)] = data
            lo = max(0, off - 1000)
            assert w.read_at(lo, 12000) == bytes(model[lo:lo + 12000])
    with vhdx.open(child) as d:
        assert d.read_at(0, 8 << 20) == bytes(model)
