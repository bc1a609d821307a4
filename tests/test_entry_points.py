"""Every public read entry point of a disk against ``readinto_at`` and the
builder's ground truth: ``read(n)`` (any n, -1, None), ``readall()``,
``read_at``, ``readinto``, ``readinto_at``, and what the standard library builds
on them (``io.BufferedReader``, ``hashlib.file_digest``, ``shutil.copyfileobj``).

Images: dynamic, fixed, differencing chains of 1-3 levels (every block state),
and a dirty-log image, whose reads take the Python overlay path.
"""

from __future__ import annotations

import hashlib
import io
import random
import shutil
import tempfile
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vhdx
from vhdx import native

from builder import DirtyLog, build_chain, random_spec

MiB = 1 << 20
COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@st.composite
def chains(draw):  # noqa: ANN001, ANN201
    rng = random.Random(draw(st.integers(0, 1 << 30)))
    lss = draw(st.sampled_from([512, 4096]))
    kind = draw(st.sampled_from(["dynamic", "fixed", "chain", "dirty"]))
    depth = draw(st.integers(2, 3)) if kind == "chain" else 1
    specs = []
    for k in range(depth):
        spec = random_spec(rng, name=f"e{k}", virtual_size=draw(st.integers(1, 7 * MiB // lss)) * lss,
                           block_size=draw(st.sampled_from([MiB, 2 * MiB])), lss=lss,
                           differencing=k > 0, density=draw(st.floats(0.2, 1.0)))
        specs.append(spec)
    if kind == "fixed":
        specs[0].fixed = True
        specs[0].blocks.clear()  # a fixed disk's blocks are all present
    if kind == "dirty":
        specs[0].dirty_log = DirtyLog(entries=2)
    return kind, specs


def _reference(disk: vhdx.VirtualDisk) -> bytes:
    buf = bytearray(disk.size)
    assert disk.readinto_at(0, buf) == disk.size
    return bytes(buf)


@settings(max_examples=30, **COMMON)
@given(chains(), st.data())
def test_entry_points_equal_readinto_at(case, data) -> None:
    kind, specs = case
    with tempfile.TemporaryDirectory(prefix="vhdx-entry-") as d:
        chain = build_chain(d, specs)
        truth = chain.expected()
        with vhdx.open(chain.top, parents=chain.parents) as disk:
            if kind == "dirty":
                assert disk._native_read is None  # the overlay path is the Python one
            elif native.HAVE_CHAIN_READER:
                assert disk._native_read is not None
            size = disk.size
            ref = _reference(disk)
            assert ref == truth
            ranges = data.draw(st.lists(st.tuples(st.integers(0, size + 4096), st.integers(0, 3 * MiB)),
                                        min_size=1, max_size=12))
            for off, n in ranges + [(0, size), (size - 1, 10), (size, 5), (size + 10, 1)]:
                want = ref[off:off + n]
                assert disk.read_at(off, n) == want
                buf = bytearray(n)
                got = disk.readinto_at(off, buf)
                assert bytes(buf[:got]) == want
                disk.seek(off)
                assert disk.read(n) == want
                assert disk.tell() == off + len(want)
                disk.seek(off)
                mv = memoryview(bytearray(n))
                got = disk.readinto(mv)
                assert bytes(mv[:got]) == want and disk.tell() == off + got
            off = ranges[0][0]
            disk.seek(off)
            assert disk.read() == ref[off:]
            disk.seek(off)
            assert disk.read(None) == ref[off:]
            disk.seek(off)
            assert disk.readall() == ref[off:]
            assert disk.read(10) == b""  # at the end
            # A random walk of small and odd read sizes through the stream API.
            disk.seek(0)
            out = bytearray()
            while True:
                chunk = disk.read(data.draw(st.integers(1, 300_000)))
                if not chunk:
                    break
                out += chunk
            assert out == ref
            # The standard library's doors.
            disk.seek(0)
            assert hashlib.file_digest(disk, "sha256").hexdigest() == hashlib.sha256(ref).hexdigest()
            disk.seek(0)
            sink = io.BytesIO()
            shutil.copyfileobj(disk, sink, data.draw(st.sampled_from([4096, 65536, MiB, 3 * MiB + 7])))
            assert sink.getvalue() == ref
            disk.seek(0)
            br = io.BufferedReader(disk, buffer_size=data.draw(st.sampled_from([512, 8192, MiB])))
            first = br.read(1000)
            br.seek(off)
            assert first == ref[:1000] and br.read() == ref[off:]


def test_read_argument_errors(tmp_path) -> None:  # noqa: ANN001
    chain = build_chain(tmp_path, [random_spec(random.Random(1), name="a", virtual_size=2 * MiB,
                                               block_size=MiB, lss=512, differencing=False)])
    disk = vhdx.open(chain.top)
    with pytest.raises(vhdx.InvalidArgumentError):
        disk.read_at(-1, 10)
    with pytest.raises(vhdx.InvalidArgumentError):
        disk.read_at(0, -5)
    assert disk.read_at(disk.size, 10) == b"" and disk.read_at(1 << 62, 10) == b""
    disk.close()
    with pytest.raises(ValueError):
        disk.read_at(0, 10)
    with pytest.raises(ValueError):
        disk.read(10)


def test_threads_read_the_same_bytes(tmp_path) -> None:  # noqa: ANN001
    """Concurrent read_at/readinto_at from several threads (GIL released in C)."""
    specs = [random_spec(random.Random(7 + k), name=f"t{k}", virtual_size=6 * MiB, block_size=MiB,
                         lss=512, differencing=k > 0) for k in range(2)]
    chain = build_chain(tmp_path, specs)
    truth = chain.expected()
    errors: list[str] = []
    with vhdx.open(chain.top, parents=chain.parents) as disk:
        def work(seed: int) -> None:
            rng = random.Random(seed)
            buf = bytearray(4096)
            for _ in range(3000):
                off = rng.randrange(0, disk.size - 4096)
                if rng.random() < 0.5:
                    if disk.read_at(off, 4096) != truth[off:off + 4096]:
                        errors.append(f"read_at {off}")
                else:
                    disk.readinto_at(off, buf)
                    if buf != truth[off:off + 4096]:
                        errors.append(f"readinto_at {off}")

        threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
