"""Hypothesis: random small images/chains vs ground truth, random (unaligned)
reads, and the io.RawIOBase semantics of VirtualDisk (seek/tell/read/readinto)."""

from __future__ import annotations

import io
import random
import tempfile
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from builder import DirtyLog, build_chain, random_spec

MiB = 1 << 20
COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@st.composite
def chain_descriptions(draw):
    seed = draw(st.integers(0, 1 << 30))
    lss = draw(st.sampled_from([512, 4096]))
    depth = draw(st.integers(1, 3))
    rng = random.Random(seed)
    specs = []
    for k in range(depth):
        bs = draw(st.sampled_from([MiB, 2 * MiB, 4 * MiB]))
        # sizes deliberately not block multiples (any LSS multiple up to ~9 MiB)
        vsize = draw(st.integers(1, 9 * MiB // lss)) * lss
        specs.append(random_spec(rng, name=f"p{k}", virtual_size=vsize, block_size=bs, lss=lss,
                                 differencing=k > 0, density=draw(st.floats(0.0, 1.0))))
    for spec in specs:  # a pending log at any level of the chain
        if draw(st.integers(0, 2)) == 0:
            spec.dirty_log = DirtyLog(entries=draw(st.integers(1, 4)),
                                      start=draw(st.sampled_from([0, 4096, MiB - 4096, MiB - 12288])))
    return specs


def _ranges(size: int):
    return st.lists(st.tuples(st.integers(0, size + 4096), st.integers(0, 2 * MiB + 1000)), min_size=1, max_size=12)


def _check_chain(vhdx_mod, specs, data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory(prefix="vhdx-prop-") as d:
        chain = build_chain(d, specs)
        truth = chain.expected()
        with vhdx_mod.open(chain.top, parents=chain.parents) as disk:
            assert disk.size == len(truth)
            assert disk.read_at(0, disk.size) == truth
            for off, n in data.draw(_ranges(disk.size)):
                assert disk.read_at(off, n) == truth[off:off + n]
                buf = bytearray(n)
                got = disk.readinto_at(off, buf)
                assert got == len(truth[off:off + n])
                assert bytes(buf[:got]) == truth[off:off + n]


@settings(max_examples=30, **COMMON)
@given(chain_descriptions(), st.data())
def test_random_chains(vhdx_mod, specs, data) -> None:
    _check_chain(vhdx_mod, specs, data)


@pytest.mark.soak
@settings(max_examples=1500, **COMMON)
@given(chain_descriptions(), st.data())
def test_random_chains_soak(vhdx_mod, specs, data) -> None:
    _check_chain(vhdx_mod, specs, data)


@settings(max_examples=20, **COMMON)
@given(chain_descriptions(), st.data())
def test_io_semantics(vhdx_mod, specs, data) -> None:
    with tempfile.TemporaryDirectory(prefix="vhdx-io-") as d:
        chain = build_chain(d, specs)
        truth = chain.expected()
        size = len(truth)
        with vhdx_mod.open(chain.top, parents=chain.parents) as disk:
            assert isinstance(disk, io.RawIOBase)
            assert disk.readable() and disk.seekable()
            assert disk.tell() == 0
            pos = 0
            for _ in range(data.draw(st.integers(1, 15))):
                op = data.draw(st.sampled_from(["seek_set", "seek_cur", "seek_end", "read", "readinto", "readall"]))
                if op == "seek_set":
                    target = data.draw(st.integers(0, size + 10000))
                    assert disk.seek(target) == target
                    pos = target
                elif op == "seek_cur":
                    delta = data.draw(st.integers(-pos, 10000))
                    pos += delta
                    assert disk.seek(delta, io.SEEK_CUR) == pos
                elif op == "seek_end":
                    delta = data.draw(st.integers(-size, 100))
                    pos = size + delta
                    assert disk.seek(delta, io.SEEK_END) == pos
                elif op == "read":
                    n = data.draw(st.integers(0, 3 * MiB))
                    assert disk.read(n) == truth[pos:pos + n]
                    pos = max(pos, min(pos + n, size))
                elif op == "readinto":
                    n = data.draw(st.integers(0, 3 * MiB))
                    buf = bytearray(n)
                    got = disk.readinto(memoryview(buf))
                    assert bytes(buf[:got]) == truth[pos:pos + n]
                    pos = max(pos, min(pos + n, size))
                else:
                    assert disk.read() == truth[pos:]
                    pos = max(pos, size)
                assert disk.tell() == pos
        assert disk.closed


def test_read_at_arguments(vhdx_mod, tmp_path) -> None:
    specs = [random_spec(random.Random(1), name="a", virtual_size=3 * MiB + 512, block_size=MiB,
                         lss=512, differencing=False)]
    chain = build_chain(tmp_path, specs)
    truth = chain.expected()
    with vhdx_mod.open(chain.top) as disk:
        assert disk.read_at(disk.size, 10) == b""
        assert disk.read_at(disk.size + 12345, 10) == b""
        assert disk.read_at(disk.size - 3, 10) == truth[-3:]
        assert disk.read_at(5, 0) == b""
        with pytest.raises(ValueError):  # InvalidArgumentError is a ValueError
            disk.read_at(-1, 10)
        with pytest.raises(ValueError):
            disk.read_at(0, -1)
        with pytest.raises((ValueError, OSError)):
            disk.seek(-1)
        # position is independent of read_at
        disk.seek(100)
        disk.read_at(0, 1000)
        assert disk.tell() == 100
    with pytest.raises(ValueError):
        disk.read(1)


def test_read_at_threads(vhdx_mod, tmp_path) -> None:
    rng = random.Random(7)
    specs = [random_spec(rng, name="t0", virtual_size=8 * MiB, block_size=MiB, lss=512, differencing=False),
             random_spec(rng, name="t1", virtual_size=8 * MiB, block_size=MiB, lss=512, differencing=True)]
    chain = build_chain(tmp_path, specs)
    truth = chain.expected()
    jobs = [(rng.randrange(8 * MiB), rng.randrange(1, 300000)) for _ in range(400)]
    with vhdx_mod.open(chain.top, parents=chain.parents) as disk:
        with ThreadPoolExecutor(4) as ex:
            results = list(ex.map(lambda j: disk.read_at(*j), jobs))
    for (off, n), got in zip(jobs, results):
        assert got == truth[off:off + n]
