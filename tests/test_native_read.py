"""The C read path (vhdx.native.ChainReader behind VirtualDisk.readinto_at)
against the pure-Python resolver and the builder's ground truth.

Every comparison reads the same chain twice: through a disk whose native reader
is on and through one whose reader is switched off (``_native = None``, the
Python path that also serves as the fallback), plus the description-derived
truth of tests/builder.py.
"""

from __future__ import annotations

import errno
import os
import random
import tempfile
from array import array
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vhdx
from vhdx import native
from vhdx.errors import CorruptImageError

from builder import FULLY, PARTIAL, SB_NOT_PRESENT, Block, DirtyLog, ImageSpec, build_chain, random_spec

MiB = 1 << 20
COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
pytestmark = pytest.mark.skipif(not native.HAVE_CHAIN_READER,
                                reason="vhdx._native not built (python3 csrc/build_native.py)")


BACKENDS = [pytest.param(True, id="fastread",
                         marks=pytest.mark.skipif(native._fastread is None, reason="vhdx._fastread not built")),
            pytest.param(False, id="cffi")]


def _levels(disk):  # noqa: ANN001, ANN202
    return [native.ChainLevel(f.fd, f.bat, f.virtual_size, f.block_size, f.geometry.chunk_ratio,
                              f.logical_sector_size) for f in disk.chain]


def _open_trio(chain):  # noqa: ANN001, ANN202
    """Disks on the fastread entry (when built), on the cffi entry, and on Python."""
    fast = vhdx.open(chain.top, parents=chain.parents)
    viacffi = vhdx.open(chain.top, parents=chain.parents)
    viacffi._native = native.ChainReader(_levels(viacffi), use_fastread=False).fast
    slow = vhdx.open(chain.top, parents=chain.parents)
    slow._native = None
    return fast, viacffi, slow


@st.composite
def chains(draw):  # noqa: ANN001, ANN201
    """1-3 levels, mixed block sizes, sizes not block multiples, every BAT state."""
    rng = random.Random(draw(st.integers(0, 1 << 30)))
    lss = draw(st.sampled_from([512, 4096]))
    specs = []
    for k in range(draw(st.integers(1, 3))):
        specs.append(random_spec(rng, name=f"n{k}", virtual_size=draw(st.integers(1, 9 * MiB // lss)) * lss,
                                 block_size=draw(st.sampled_from([MiB, 2 * MiB, 4 * MiB])), lss=lss,
                                 differencing=k > 0, density=draw(st.floats(0.0, 1.0))))
    return specs


@settings(max_examples=40, **COMMON)
@given(chains(), st.data())
def test_native_matches_python_and_truth(specs, data) -> None:
    with tempfile.TemporaryDirectory(prefix="vhdx-nread-") as d:
        chain = build_chain(d, specs)
        truth = chain.expected()
        fast, viacffi, slow = _open_trio(chain)
        with fast, viacffi, slow:
            assert fast._native is not None
            size = fast.size
            ranges = data.draw(st.lists(st.tuples(st.integers(0, size + 4096), st.integers(0, 3 * MiB)),
                                        min_size=1, max_size=15))
            for off, n in ranges + [(0, size), (size - 1, 10), (size, 5)]:
                a, b, c = (bytearray(b"\xa5" * n) for _ in range(3))
                ga, gb, gc = fast.readinto_at(off, a), viacffi.readinto_at(off, b), slow.readinto_at(off, c)
                want = truth[off:off + n]
                assert ga == gb == gc == len(want)
                assert a == b == c
                assert a[:ga] == want
                assert a[ga:] == b"\xa5" * (n - ga)  # nothing written past the end


def test_logged_chain_uses_python_path(tmp_path) -> None:
    """A replayed log patches reads in Python only: no native reader then."""
    rng = random.Random(3)
    spec = random_spec(rng, name="dirty", virtual_size=4 * MiB, block_size=MiB, lss=512, differencing=False)
    spec.dirty_log = DirtyLog(entries=2)
    chain = build_chain(tmp_path, [spec])
    with vhdx.open(chain.top) as disk:
        assert disk._native is None
        assert disk.read_at(0, disk.size) == chain.expected()


@pytest.mark.parametrize("use_fastread", BACKENDS)
def test_buffer_kinds(tmp_path, use_fastread) -> None:
    rng = random.Random(5)
    specs = [random_spec(rng, name="b0", virtual_size=5 * MiB, block_size=MiB, lss=512, differencing=False),
             random_spec(rng, name="b1", virtual_size=5 * MiB, block_size=MiB, lss=512, differencing=True)]
    chain = build_chain(tmp_path, specs)
    truth = chain.expected()
    with vhdx.open(chain.top, parents=chain.parents) as disk:
        disk._native = native.ChainReader(_levels(disk), use_fastread=use_fastread).fast
        off = MiB - 1000
        # typed and sliced views: bytes land where the buffer's memory is
        arr = array("I", bytes(8000))
        assert disk.readinto_at(off, arr) == 8000
        assert arr.tobytes() == truth[off:off + 8000]
        big = bytearray(20000)
        assert disk.readinto_at(off, memoryview(big)[100:9100]) == 9000
        assert big[100:9100] == truth[off:off + 9000] and big[:100] == bytes(100) and not any(big[9100:])
        # non-contiguous: the C call refuses it, the Python path fills it
        strided = memoryview(bytearray(2000))[::2]
        assert disk.readinto_at(off, strided) == 1000
        assert bytes(strided) == truth[off:off + 1000]
        # read-only buffers are an error, not a silent write into bytes
        with pytest.raises(TypeError):
            disk.readinto_at(0, b"\0" * 16)
        with pytest.raises(ValueError):
            disk.readinto_at(-1, bytearray(4))
        with pytest.raises(ValueError):
            disk.readinto_at(-(1 << 70), bytearray(4))
        assert disk.readinto_at(disk.size + 5, bytearray(4)) == 0
        assert disk.readinto_at(1 << 70, bytearray(4)) == 0
        assert disk.readinto_at(0, bytearray()) == 0
        # the hot call itself: None means "take the Python path"
        fast = disk._native
        for off, buf in [(-1, bytearray(4)), (1 << 64, bytearray(4)), ("0", bytearray(4)),
                         (0, b"1234"), (0, strided), (0, 12), ((1 << 63) - 2, bytearray(4))]:
            assert fast(off, buf) is None
        assert fast(0, bytearray(4)) == 4 and fast(disk.size, bytearray(4)) == 0
    with pytest.raises(ValueError):
        disk.readinto_at(0, bytearray(4))  # closed


def test_chain_reader_arguments(tmp_path) -> None:
    spec = ImageSpec(virtual_size=3 * MiB, name="a", blocks={0: Block(FULLY), 2: Block(FULLY)})
    chain = build_chain(tmp_path, [spec])
    with vhdx.open(chain.top) as disk:
        f = disk.chain[0]
        lv = native.ChainLevel(f.fd, f.bat, f.virtual_size, f.block_size, f.geometry.chunk_ratio,
                               f.logical_sector_size)
        r = native.ChainReader([lv])
        buf = bytearray(5000)
        assert r.readinto(100, buf) == 5000
        assert buf == chain.expected()[100:5100]
        assert r.readinto(disk.size - 10, buf) == 10
        with pytest.raises(TypeError):
            r.readinto(0, b"0123")
        with pytest.raises(ValueError):
            r.readinto(-1, buf)
        with pytest.raises(ValueError):
            r.readinto(1 << 63, buf)
        with pytest.raises(ValueError):
            r.readinto((1 << 63) - 10, buf)  # offset + length past int64
        with pytest.raises(ValueError):
            native.ChainReader([lv._replace(block_size=3 * MiB)])
        with pytest.raises(ValueError):
            native.ChainReader([lv._replace(chunk_ratio=7)])
        with pytest.raises(ValueError):
            native.ChainReader([])
        r.invalidate()
        bad = native.ChainReader([lv._replace(fd=-1)])
        with pytest.raises(OSError) as ei:
            bad.readinto(0, buf)
        assert ei.value.errno == errno.EBADF


@pytest.mark.skipif(native._fastread is None, reason="vhdx._fastread not built")
def test_fastread_constructor_checks(tmp_path) -> None:
    spec = ImageSpec(virtual_size=3 * MiB, name="a", blocks={0: Block(FULLY)})
    chain = build_chain(tmp_path, [spec])
    with vhdx.open(chain.top) as disk:
        f = disk.chain[0]
        owner = f.bat.obj
        good = (f.fd, owner, 0, len(f.bat), f.virtual_size, f.block_size, f.geometry.chunk_ratio,
                f.logical_sector_size, True)
        chain_reader = native._fastread.ChainReader
        r = chain_reader([good])
        buf = bytearray(100)
        assert r.readinto(0, buf) == 100 and buf == chain.expected()[:100]
        r.invalidate()
        bad_cases = [
            ([], ValueError),                                   # no level
            ([good[:7]], TypeError),                            # neither a 9-tuple nor a VHD 8-tuple
            ([good, good[:8]], TypeError),                      # VHDX and VHD levels mixed
            ([good[:8], good], TypeError),
            ([list(good)], TypeError),
            ([(good[0], 12345, *good[2:])], TypeError),         # table without a buffer
            ([(good[0], owner, 4, *good[3:])], ValueError),     # misaligned entries
            ([(good[0], owner, 0, len(f.bat) + 1, *good[4:])], ValueError),  # past the buffer
            ([(*good[:5], 3 * MiB, *good[6:])], ValueError),    # block size not a power of two
            ([(*good[:6], 7, *good[7:])], ValueError),          # chunk ratio off the geometry
            ([(*good[:7], 1 << 40, good[8])], ValueError),      # sector size
        ]
        for levels, exc in bad_cases:
            with pytest.raises(exc):
                chain_reader(levels)
        with pytest.raises(TypeError):
            chain_reader([good], x=1)
        with pytest.raises(TypeError):
            r.readinto(0)


def test_corrupt_entry_falls_back_and_raises(tmp_path) -> None:
    """PARTIALLY_PRESENT without a present sector bitmap: the C reader hands the
    read back, and the Python path reports the corruption."""
    base = ImageSpec(virtual_size=4 * MiB, name="base", blocks={0: Block(FULLY), 1: Block(FULLY)})
    child = ImageSpec(virtual_size=4 * MiB, name="child", suffix=".avhdx",
                      blocks={0: Block(PARTIAL), 2: Block(FULLY)}, sb_states={0: SB_NOT_PRESENT})
    chain = build_chain(tmp_path, [base, child])
    with vhdx.open(chain.top, parents=chain.parents) as disk:
        assert disk._native is not None
        with pytest.raises(CorruptImageError):
            disk.readinto_at(100, bytearray(10))
        buf = bytearray(MiB)
        assert disk.readinto_at(MiB, buf) == MiB  # other blocks still read
        assert buf == chain.images[1].blocks[1].data[:MiB]


def test_concurrent_readinto(tmp_path) -> None:
    rng = random.Random(11)
    specs = [random_spec(rng, name=f"c{k}", virtual_size=12 * MiB, block_size=MiB, lss=512,
                         differencing=k > 0, density=0.9) for k in range(3)]
    chain = build_chain(tmp_path, specs)
    truth = chain.expected()
    jobs = [(rng.randrange(12 * MiB), rng.randrange(1, 400000)) for _ in range(600)]

    def job(j):  # noqa: ANN001, ANN202
        off, n = j
        buf = bytearray(n)
        got = disk.readinto_at(off, buf)
        return bytes(buf[:got])

    with vhdx.open(chain.top, parents=chain.parents) as disk:
        assert disk._native is not None
        with ThreadPoolExecutor(4) as ex:
            results = list(ex.map(job, jobs))
    for (off, n), got in zip(jobs, results):
        assert got == truth[off:off + n]


def test_writable_child_reads_fresh_bitmaps(tmp_path) -> None:
    """Reads interleaved with partial-block writes on a differencing disk: the top
    file's sector bitmaps change between reads, so they must not be served stale."""
    size = 4 * MiB
    base = vhdx.create(tmp_path / "base.vhdx", size, block_size=MiB)
    model = bytearray(os.urandom(size))
    with vhdx.open(base, "r+") as b:
        b.write_at(0, model)
    child = vhdx.create(tmp_path / "child.avhdx", parent=base, block_size=MiB)
    rng = random.Random(13)
    with vhdx.open(child, "r+") as disk:
        assert disk._native is not None
        for _ in range(60):
            off = rng.randrange(size - 1) // 512 * 512
            data = os.urandom(min(rng.choice([512, 4096, 20000]), size - off))
            disk.write_at(off, data)
            model[off:off + len(data)] = data
            for _ in range(3):
                lo = rng.randrange(size)
                n = rng.randrange(1, 300000)
                buf = bytearray(n)
                got = disk.readinto_at(lo, buf)
                assert buf[:got] == model[lo:lo + n]
    with vhdx.open(child) as ro:
        assert ro.read_at(0, size) == model


def test_no_native_environment(tmp_path) -> None:
    """VHDX_NO_NATIVE=1 keeps the whole package on the Python path."""
    import subprocess
    import sys

    spec = random_spec(random.Random(2), name="e", virtual_size=2 * MiB, block_size=MiB, lss=512,
                       differencing=False)
    chain = build_chain(tmp_path, [spec])
    code = ("import hashlib, sys, vhdx; d = vhdx.open(sys.argv[1]); assert d._native is None; "
            "print(hashlib.sha256(d.read_at(0, d.size)).hexdigest())")
    env = dict(os.environ, VHDX_NO_NATIVE="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", code, str(chain.top)], env=env, capture_output=True,
                         text=True, check=True).stdout.strip()
    import hashlib

    assert out == hashlib.sha256(chain.expected()).hexdigest()


def test_sparse_bat_chain(tmp_path) -> None:
    """Large BATs live in an anonymous mapping (ImageFile._read_bat): the reader
    exports that mapping, and a differencing child's partial blocks resolve."""
    tib = 1 << 40
    base = vhdx.create(tmp_path / "base.vhdx", 4 * tib, block_size=MiB)
    rng = random.Random(17)
    offs = sorted({0, 4 * tib - MiB, *(rng.randrange(4 * tib // MiB) * MiB for _ in range(5))})
    with vhdx.open(base, "r+") as b:
        for off in offs:
            b.write_at(off, rng.randbytes(MiB))
    child = vhdx.create(tmp_path / "child.avhdx", parent=base, block_size=MiB)
    with vhdx.open(child, "r+") as c:
        for off in offs[::2]:
            c.write_at(off + 4096 * rng.randrange(200), rng.randbytes(20000))
    fast = vhdx.open(child)
    slow = vhdx.open(child)
    slow._native = None
    with fast, slow:
        assert fast._native is not None
        assert isinstance(fast.chain[1].bat.obj, __import__("mmap").mmap)
        for off in offs:
            for lo, n in ((off - 3000, 8192), (off, MiB), (off + 5000, 300000)):
                lo = max(0, lo)
                a, b = bytearray(n), bytearray(n)
                assert fast.readinto_at(lo, a) == slow.readinto_at(lo, b)
                assert a == b
