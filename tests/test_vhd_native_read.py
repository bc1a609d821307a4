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
from vhdx.vhd.native_read import VhdChainReader
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
        if native._fastread is not None:
            assert isinstance(d._reader._impl, native._fastread.ChainReader)
        cffi = VhdChainReader(d.chain, use_fastread=False)  # the other per-call entry
        assert cffi._impl is None
        assert d.read_at(0, size + 4096) == _python_read(d, 0, size + 4096)
        for _ in range(40):
            off = rng.randrange(size + 1024)
            n = rng.choice([1, 511, 512, 4096, 70000, rng.randrange(1, size + 1)])
            want = _python_read(d, off, n)
            assert d.read_at(off, n) == want, (off, n)
            assert cffi.read(off, n) == want, (off, n)
            buf = bytearray(n)
            got = d.readinto_at(off, buf)
            assert got == len(want) and bytes(buf[:got]) == want
            buf2 = bytearray(n)
            assert cffi.fast(off, buf2) == len(want) and bytes(buf2[:len(want)]) == want


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


def test_fastread_takes_vhd_levels_and_checks_them(tmp_path) -> None:
    """vhdx._fastread.ChainReader with VHD 8-tuples: reads as the reference; bad
    tables and geometry are refused at construction, never read through."""
    if native._fastread is None:
        pytest.skip("vhdx._fastread is not built here")
    p = tmp_path / "d.vhd"
    vhdx.create(p, 4 << 20, block_size=512 * KiB)
    with vhdx.open(p, "r+") as w:
        w.write_at(1000 * 512, random.Random(3).randbytes(300 * 512))
    with vhdx.open(p) as d:
        f = d.chain[0]
        good = (f.fd, f.bat, 0, len(f.bat), f.virtual_size, f.block_size, False, True)
        r = native._fastread.ChainReader([good])
        assert r.read(0, 4 << 20) == _python_read(d, 0, 4 << 20)
        assert r.read((4 << 20) - 10, 100) == _python_read(d, (4 << 20) - 10, 100)  # clipped
        for levels, exc in [
            ([(f.fd, f.bat, 2, *good[3:])], ValueError),                  # misaligned entries
            ([(f.fd, f.bat, 0, len(f.bat) + 1, *good[4:])], ValueError),  # past the buffer
            ([(*good[:5], 3 * 512 * KiB, *good[6:])], ValueError),        # block size not a power of two
            ([(*good[:3], 1, *good[4:])], ValueError),                    # too few entries for the size
            ([(f.fd, 12345, *good[2:])], TypeError),                      # table without a buffer
        ]:
            with pytest.raises(exc):
                native._fastread.ChainReader(levels)
