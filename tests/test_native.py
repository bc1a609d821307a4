"""Tests of vhdx.native: the C extension against the pure-Python reference.

Every I/O test runs both implementations ("c" when the extension is built,
and "py") and compares them with an in-memory model. The XFS tests need
root, mkfs.xfs and a working loop mount; they skip with the reason otherwise.
"""

from __future__ import annotations

import errno
import itertools
import os
import random
import shutil
import subprocess
import sys
from array import array
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhdx import native

REPO_ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20

# --------------------------------------------------------------------------
# implementations under test
# --------------------------------------------------------------------------

PY = SimpleNamespace(
    name="py",
    bitmap_runs=native._py_bitmap_runs,
    gather_read=native._py_gather_read,
    copy_ranges=native._py_copy_ranges,
    zero_ranges=native._py_zero_ranges,
    fiemap_shared=native._py_fiemap_shared,
)
C = SimpleNamespace(
    name="c",
    bitmap_runs=native._c_bitmap_runs,
    gather_read=native._c_gather_read,
    copy_ranges=native._c_copy_ranges,
    zero_ranges=native._c_zero_ranges,
    fiemap_shared=native._c_fiemap_shared,
)
needs_c = pytest.mark.skipif(not native.HAVE_NATIVE,
                             reason="vhdx._native not built (python3 csrc/build_native.py)")
IMPLS = [pytest.param(C, id="c", marks=needs_c), pytest.param(PY, id="py")]
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")


def naive_runs(bitmap: bytes, start: int, nbits: int) -> list[tuple[int, int, bool]]:
    """Per-bit expansion: the obviously-correct third opinion."""
    bits = [bool((bitmap[i >> 3] >> (i & 7)) & 1) for i in range(start, start + nbits)]
    out, pos = [], 0
    for value, group in itertools.groupby(bits):
        n = len(list(group))
        out.append((pos, n, value))
        pos += n
    return out


def all_runs(bitmap, start: int, nbits: int) -> list:
    """bitmap_runs of every available implementation, asserted equal."""
    ref = native._py_bitmap_runs(bitmap, start, nbits)
    if native.HAVE_NATIVE:
        assert native._c_bitmap_runs(bitmap, start, nbits) == ref
    return ref


# --------------------------------------------------------------------------
# module / build
# --------------------------------------------------------------------------


@needs_c
def test_constants_match_c_header() -> None:
    lib = native._ext.lib
    assert (lib.VHDX_M_NONE, lib.VHDX_M_CLONE, lib.VHDX_M_COPY_FILE_RANGE, lib.VHDX_M_READ_WRITE,
            lib.VHDX_M_FALLOCATE, lib.VHDX_M_WRITE_ZEROS) == (
        native.NONE, native.CLONE, native.COPY_FILE_RANGE, native.READ_WRITE,
        native.FALLOCATE, native.WRITE_ZEROS)
    assert native.bitmap_runs.__module__ == "vhdx.native"


def test_fallback_when_extension_disabled(tmp_path: Path) -> None:
    """VHDX_NO_NATIVE=1 gives HAVE_NATIVE False and a working pure-Python API."""
    code = (
        "import os\n"
        "from vhdx import native as n\n"
        "assert n.HAVE_NATIVE is False\n"
        "assert n.bitmap_runs(b'\\x0f', 2, 4) == [(0, 2, True), (2, 2, False)]\n"
        "fd = os.open(%r, os.O_RDWR | os.O_CREAT)\n"
        "os.write(fd, b'abc')\n"
        "b = bytearray(5); n.gather_read(fd, b, [(0, 1, 4)]); assert b == b'bc' + bytes(3), b\n"
        "assert n.copy_ranges(fd, fd, [(0, 10, 3)], allow_clone=False) in ([2], [3])\n"
        "print('fallback-ok')\n"
    ) % str(tmp_path / "f")
    env = dict(os.environ, VHDX_NO_NATIVE="1", PYTHONPATH=str(REPO_ROOT))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "fallback-ok" in r.stdout


# --------------------------------------------------------------------------
# bitmap_runs
# --------------------------------------------------------------------------

# Bitmaps made of stretches of 0x00 / 0xFF / noise, so word-skipping paths
# and run boundaries at every bit offset both get exercised.
_stretch = st.tuples(st.sampled_from([0x00, 0xFF, None]), st.integers(1, 40), st.binary(min_size=40, max_size=40))
bitmaps = st.one_of(
    st.binary(max_size=64),
    st.lists(_stretch, max_size=8).map(
        lambda parts: b"".join(bytes([v]) * n if v is not None else noise[:n] for v, n, noise in parts)),
)


@given(data=st.data(), bm=bitmaps)
@settings(max_examples=400, deadline=None)
def test_bitmap_runs_random(data, bm: bytes) -> None:
    total = len(bm) * 8
    start = data.draw(st.integers(0, total), label="start")
    nbits = data.draw(st.integers(0, total - start), label="nbits")
    runs = all_runs(bm, start, nbits)
    assert runs == naive_runs(bm, start, nbits)
    # structural properties, independently of the reference
    assert sum(n for _, n, _ in runs) == nbits
    assert all(a[2] != b[2] for a, b in zip(runs, runs[1:]))
    assert all(type(v) is bool for _, _, v in runs)


@given(bm=st.binary(min_size=1, max_size=300), flips=st.lists(st.integers(0, 2399), max_size=5))
@settings(max_examples=150, deadline=None)
def test_bitmap_runs_sparse_flips(bm: bytes, flips: list[int]) -> None:
    """Mostly-uniform bitmaps with a few flipped bits (the word-scan path)."""
    base = bytearray(bytes([0xFF if bm[0] & 1 else 0]) * len(bm))
    for f in flips:
        if f < len(base) * 8:
            base[f >> 3] ^= 1 << (f & 7)
    for start in (0, 1, 7, 8, 13):
        if start <= len(base) * 8:
            n = len(base) * 8 - start
            assert all_runs(bytes(base), start, n) == naive_runs(bytes(base), start, n)


def test_bitmap_runs_edges() -> None:
    assert all_runs(b"", 0, 0) == []
    assert all_runs(b"\xff", 8, 0) == []
    assert all_runs(b"\xa5", 0, 8) == [(0, 1, True), (1, 1, False), (2, 1, True), (3, 2, False),
                                       (5, 1, True), (6, 1, False), (7, 1, True)]
    # start not byte aligned, range ending mid byte
    assert all_runs(b"\xf0\x0f", 3, 10) == [(0, 1, False), (1, 8, True), (9, 1, False)]
    # run crossing many bytes then ending in the last bit
    bm = b"\x00" * 15 + b"\x80"
    assert all_runs(bm, 1, 127) == [(0, 126, False), (126, 1, True)]


@pytest.mark.parametrize("value", [0x00, 0xFF])
def test_bitmap_runs_full_sector_bitmap(value: int) -> None:
    bm = bytes([value]) * MiB  # one SB block: 2^23 sectors
    assert all_runs(bm, 0, 1 << 23) == [(0, 1 << 23, value == 0xFF)]
    assert all_runs(memoryview(bm)[1:], 3, (1 << 23) - 8 - 3) == [(0, (1 << 23) - 11, value == 0xFF)]
    other = bytearray(bm)
    other[-1] ^= 0x80
    assert all_runs(other, 0, 1 << 23) == [(0, (1 << 23) - 1, value == 0xFF),
                                          ((1 << 23) - 1, 1, value != 0xFF)]


def test_bitmap_runs_alternating() -> None:
    bm = b"\x55" * (1 << 15)  # 2^18 bits, every bit its own run
    runs = all_runs(bm, 0, 1 << 18)
    assert len(runs) == 1 << 18  # more than one C batch (65536 runs)
    assert runs[:3] == [(0, 1, True), (1, 1, False), (2, 1, True)]
    assert runs[-1] == ((1 << 18) - 1, 1, False)
    assert all(n == 1 for _, n, _ in runs)
    odd = all_runs(bm, 1, (1 << 18) - 2)
    assert odd[0] == (0, 1, False) and len(odd) == (1 << 18) - 2


@pytest.mark.parametrize("impl", IMPLS)
def test_bitmap_runs_buffer_types(impl) -> None:
    raw = bytes(range(256)) * 4
    want = naive_runs(raw, 5, 2000)
    for buf in (raw, bytearray(raw), memoryview(raw), array("B", raw), array("I", raw)):
        assert impl.bitmap_runs(buf, 5, 2000) == want
    # a slice starts the bit numbering at the slice
    assert impl.bitmap_runs(memoryview(raw)[10:20], 0, 80) == naive_runs(raw[10:20], 0, 80)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("start,nbits", [(0, 17), (17, 0), (9, 8), (-1, 1), (0, -1), (1 << 64, 1), (3, 1 << 64)])
def test_bitmap_runs_range_errors(impl, start: int, nbits: int) -> None:
    with pytest.raises(ValueError):
        impl.bitmap_runs(b"\x00\xff", start, nbits)


@pytest.mark.parametrize("impl", IMPLS)
def test_bitmap_runs_type_errors(impl) -> None:
    with pytest.raises(TypeError):
        impl.bitmap_runs(b"\x00", 0.0, 1)
    with pytest.raises(TypeError):
        impl.bitmap_runs("not a buffer", 0, 1)


# --------------------------------------------------------------------------
# gather_read
# --------------------------------------------------------------------------


@pytest.fixture
def data_file(tmp_path: Path):
    content = random.Random(1).randbytes(100_003)
    p = tmp_path / "data.bin"
    p.write_bytes(content)
    fd = os.open(p, os.O_RDONLY)
    yield fd, content
    os.close(fd)


def _model_gather(content: bytes, buf_len: int, segs, fill: int = 0xAA) -> bytearray:
    out = bytearray([fill]) * buf_len
    for bo, fo, n in segs:
        chunk = content[fo:fo + n]
        out[bo:bo + n] = chunk + bytes(n - len(chunk))
    return out


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("seed", range(12))
def test_gather_read_random(impl, seed: int, data_file) -> None:
    fd, content = data_file
    rng = random.Random(seed)
    buf_len = rng.randrange(1, 300_000)
    segs = []
    for _ in range(rng.randrange(0, 40)):
        n = rng.randrange(0, min(buf_len, 20_000) + 1)
        bo = rng.randrange(0, buf_len - n + 1)
        fo = rng.randrange(0, len(content) + 30_000)  # some past EOF
        segs.append((bo, fo, n))
    # later segments win where they overlap, as in the model
    buf = bytearray([0xAA]) * buf_len
    impl.gather_read(fd, buf, segs)
    assert buf == _model_gather(content, buf_len, segs)
    # the flat array form gives the same result
    buf2 = bytearray([0xAA]) * buf_len
    impl.gather_read(fd, buf2, array("q", itertools.chain.from_iterable(segs)))
    assert buf2 == buf


@pytest.mark.parametrize("impl", IMPLS)
def test_gather_read_eof_zero_fill_and_views(impl, data_file, tmp_path: Path) -> None:
    fd, content = data_file
    buf = bytearray([0xAA]) * 64
    view = memoryview(buf)[8:40]  # writes land inside the slice only
    impl.gather_read(fd, view, [(0, len(content) - 4, 12), (20, 5, 0)])
    assert buf[:8] == b"\xaa" * 8 and buf[20:] == b"\xaa" * 44
    assert buf[8:20] == content[-4:] + bytes(8)
    # an empty file is all zeros; a file object is accepted as fd
    (tmp_path / "empty").write_bytes(b"")
    with open(tmp_path / "empty", "rb") as f:
        b = bytearray(b"x" * 10)
        impl.gather_read(f, b, [(1, 0, 8)])
        assert b == b"x" + bytes(8) + b"x"
    # arrays of other item sizes are byte buffers
    a = array("I", [0xFFFFFFFF] * 4)
    impl.gather_read(fd, a, [(4, 0, 4)])
    assert a.tobytes()[4:8] == content[:4] and a[0] == 0xFFFFFFFF


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("seg", [(0, 0, 101), (100, 0, 1), (101, 0, 0), (-1, 0, 1), (0, -1, 1),
                                 (0, 0, -1), (0, (1 << 63) - 1, 2), (0, 1 << 63, 1)])
def test_gather_read_bounds(impl, seg, data_file) -> None:
    fd, _ = data_file
    buf = bytearray([0xAA]) * 100
    with pytest.raises(ValueError, match="segment 1"):
        impl.gather_read(fd, buf, [(0, 0, 10), seg])
    assert buf == bytearray([0xAA]) * 100  # validated before any I/O


@pytest.mark.parametrize("impl", IMPLS)
def test_gather_read_bad_args(impl, data_file) -> None:
    fd, _ = data_file
    with pytest.raises(TypeError):
        impl.gather_read(fd, b"read-only", [(0, 0, 1)])
    with pytest.raises(ValueError):
        impl.gather_read(fd, bytearray(10), [(0, 0)])
    with pytest.raises(ValueError):
        impl.gather_read(fd, bytearray(10), array("q", [0, 0]))
    with pytest.raises(OSError) as ei:
        impl.gather_read(-1, bytearray(10), [(0, 0, 0), (0, 0, 5)])
    assert ei.value.errno == errno.EBADF
    assert "segment 1" in str(ei.value)


@needs_c
def test_gather_read_releases_the_gil(tmp_path: Path) -> None:
    """While one long C call runs in a thread, the main thread keeps running."""
    import threading
    import time

    p = tmp_path / "sparse"
    with open(p, "wb") as f:
        f.truncate(64 * MiB)  # a hole: no disk I/O, page cache after first pass
    fd = os.open(p, os.O_RDONLY)
    buf = bytearray(64 * MiB)
    segs = [(0, 0, 64 * MiB)] * 16  # 1 GiB of copying in one call
    window = []

    def worker() -> None:
        t0 = time.perf_counter()
        C.gather_read(fd, buf, segs)
        window.extend((t0, time.perf_counter()))

    try:
        th = threading.Thread(target=worker)
        stamps = []
        th.start()
        while th.is_alive():
            stamps.append(time.perf_counter())
        th.join()
    finally:
        os.close(fd)
    t0, t1 = window
    inside = [t0] + [t for t in stamps if t0 < t < t1] + [t1]
    gap = max(b - a for a, b in zip(inside, inside[1:]))
    # Holding the GIL would leave one gap as long as the whole call.
    assert gap < max(0.02, (t1 - t0) / 4), (gap, t1 - t0, len(inside))


# --------------------------------------------------------------------------
# copy_ranges (on whatever /tmp is)
# --------------------------------------------------------------------------


def _model_copy(dst: bytearray, src: bytes, ranges) -> bytearray:
    for so, do, n in ranges:
        if n == 0:
            continue
        chunk = src[so:so + n]
        chunk += bytes(n - len(chunk))
        if do + n > len(dst):
            dst.extend(bytes(do + n - len(dst)))
        dst[do:do + n] = chunk
    return dst


def _random_ranges(rng: random.Random, src_len: int, count: int, align: int = 0):
    out = []
    for _ in range(count):
        if align:
            n = align * rng.randrange(0, 40)
            out.append((align * rng.randrange(0, src_len // align), align * rng.randrange(0, 400), n))
        else:
            n = rng.choice([0, rng.randrange(1, 70_000), rng.randrange(4 * MiB, 5 * MiB)])
            out.append((rng.randrange(0, src_len + 10_000), rng.randrange(0, 8 * MiB), n))
    return out


FLAG_COMBOS = [dict(allow_clone=c, allow_copy_file_range=f) for c in (True, False) for f in (True, False)]


def _open_pair(tmp: Path, content: bytes, dst_content: bytes = b""):
    (tmp / "src").write_bytes(content)
    (tmp / "dst").write_bytes(dst_content)
    return os.open(tmp / "src", os.O_RDONLY), os.open(tmp / "dst", os.O_RDWR)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("flags", FLAG_COMBOS,
                         ids=lambda f: f"clone={f['allow_clone']},cfr={f['allow_copy_file_range']}")
def test_copy_ranges_c_vs_py(tmp_path: Path, seed: int, flags) -> None:
    rng = random.Random(seed)
    src = rng.randbytes(6 * MiB + 1234)
    ranges = _random_ranges(rng, len(src), 10) + _random_ranges(rng, len(src), 5, align=4096)
    rng.shuffle(ranges)
    dst0 = rng.randbytes(rng.randrange(0, 3 * MiB))
    expect = bytes(_model_copy(bytearray(dst0), src, ranges))
    results = {}
    for impl in ([C] if native.HAVE_NATIVE else []) + [PY]:
        d = tmp_path / impl.name
        d.mkdir()
        s, t = _open_pair(d, src, dst0)
        try:
            methods = impl.copy_ranges(s, t, ranges, **flags)
        finally:
            os.close(s)
            os.close(t)
        assert (d / "dst").read_bytes() == expect
        assert len(methods) == len(ranges)
        for (_, _, n), m in zip(ranges, methods):
            if n == 0:
                assert m == native.NONE
            elif not flags["allow_clone"] and not flags["allow_copy_file_range"]:
                assert m == native.READ_WRITE
            elif not flags["allow_clone"]:
                assert m in (native.COPY_FILE_RANGE, native.READ_WRITE)
            else:
                assert m in (native.CLONE, native.COPY_FILE_RANGE, native.READ_WRITE)
        results[impl.name] = methods
    if "c" in results:  # same decisions on the same file system
        assert results["c"] == results["py"]


@pytest.mark.parametrize("impl", IMPLS)
def test_copy_ranges_past_source_eof(impl, tmp_path: Path) -> None:
    src = b"0123456789" * 1000
    s, t = _open_pair(tmp_path, src, b"\xee" * 50_000)
    try:
        methods = impl.copy_ranges(s, t, [(9_000, 100, 3_000), (20_000, 30_000, 100), (5, 5, 0)])
    finally:
        os.close(s)
        os.close(t)
    got = (tmp_path / "dst").read_bytes()
    assert got[100:1100] == src[9_000:] and got[1100:3100] == bytes(2000)
    assert got[30_000:30_100] == bytes(100) and got[:100] == b"\xee" * 100
    assert len(got) == 50_000 and methods[2] == native.NONE


@pytest.mark.parametrize("impl", IMPLS)
def test_copy_ranges_errors(impl, tmp_path: Path) -> None:
    s, t = _open_pair(tmp_path, b"x" * 100)
    try:
        for bad in [(0, -1, 1), (-1, 0, 1), (0, 0, -1), ((1 << 63) - 5, 0, 10), (0, 1 << 63, 1)]:
            with pytest.raises(ValueError, match="range 1"):
                impl.copy_ranges(s, t, [(0, 0, 10), bad])
        assert os.fstat(t).st_size == 0  # nothing copied before validation failed
        with pytest.raises(ValueError):
            impl.copy_ranges(s, t, [(0, 0)])
        with pytest.raises(OSError) as ei:
            impl.copy_ranges(s, -1, [(0, 0, 0), (0, 0, 10)])
        assert ei.value.errno == errno.EBADF and "range 1" in str(ei.value)
        with pytest.raises(OSError) as ei:
            impl.copy_ranges(s, s, [(0, 200, 10)], allow_clone=False, allow_copy_file_range=False)
        assert ei.value.errno == errno.EBADF  # src opened read-only
        assert impl.copy_ranges(s, t, []) == []
    finally:
        os.close(s)
        os.close(t)


# --------------------------------------------------------------------------
# zero_ranges / fiemap on /tmp
# --------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("seed", range(4))
def test_zero_ranges(impl, tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    content = bytearray(rng.randbytes(3 * MiB + 17))
    p = tmp_path / "z"
    p.write_bytes(content)
    ranges = [(rng.randrange(0, len(content) + 50_000),
               rng.choice([0, rng.randrange(1, 9000), rng.randrange(MiB, 2 * MiB)])) for _ in range(10)]
    ranges.append((4096, 8192))  # an aligned one, the fallocate-friendly case
    for off, n in ranges:
        if off + n > len(content) and n:
            content.extend(bytes(off + n - len(content)))
        content[off:off + n] = bytes(n)
    fd = os.open(p, os.O_RDWR)
    try:
        methods = impl.zero_ranges(fd, ranges)
    finally:
        os.close(fd)
    assert p.read_bytes() == content
    for (_, n), m in zip(ranges, methods):
        assert m in ((native.NONE,) if n == 0 else (native.FALLOCATE, native.WRITE_ZEROS))
    if impl is PY:
        assert set(methods) <= {native.NONE, native.WRITE_ZEROS}


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_ranges_errors(impl, tmp_path: Path) -> None:
    p = tmp_path / "z"
    p.write_bytes(b"abc")
    fd = os.open(p, os.O_RDWR)
    try:
        for bad in [(-1, 1), (0, -1), ((1 << 63) - 1, 1)]:
            with pytest.raises(ValueError, match="range 1"):
                impl.zero_ranges(fd, [(0, 1), bad])
        assert p.read_bytes() == b"abc"
        with pytest.raises(OSError) as ei:
            impl.zero_ranges(-1, [(0, 1)])
        assert ei.value.errno == errno.EBADF and "range 0" in str(ei.value)
    finally:
        os.close(fd)


@linux_only
@pytest.mark.parametrize("impl", IMPLS)
def test_fiemap_plain_file(impl, tmp_path: Path) -> None:
    p = tmp_path / "f"
    block = os.urandom(4096)
    with open(p, "wb") as f:  # 200 data blocks separated by holes
        for i in range(200):
            f.seek(i * 8192)
            f.write(block)
    fd = os.open(p, os.O_RDONLY)
    try:
        try:
            shared, mapped = impl.fiemap_shared(fd, 0, 200 * 8192)
        except OSError as e:
            if e.errno == errno.EOPNOTSUPP:
                pytest.skip("file system of tmp_path has no FIEMAP")
            raise
        assert (shared, mapped) == (0, 200 * 4096)
        assert impl.fiemap_shared(fd, 100, 8192) == (0, 4096)
        assert impl.fiemap_shared(fd, 4096, 4096) == (0, 0)  # a hole
        assert impl.fiemap_shared(fd, 0, 0) == (0, 0)
        with pytest.raises(ValueError):
            impl.fiemap_shared(fd, -1, 5)
    finally:
        os.close(fd)
    with pytest.raises(OSError):
        impl.fiemap_shared(-1, 0, 10)


def test_fiemap_not_linux(monkeypatch) -> None:
    monkeypatch.setattr(native, "_LINUX", False)
    with pytest.raises(NotImplementedError):
        native._py_fiemap_shared(0, 0, 1)


# --------------------------------------------------------------------------
# real XFS with reflink
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def xfs_dir(tmp_path_factory):
    """A 1 GiB sparse XFS image (reflink=1) loop-mounted for this module."""
    if not sys.platform.startswith("linux"):
        pytest.skip("XFS reflink tests need Linux")
    if os.geteuid() != 0:
        pytest.skip("XFS reflink tests need root (mount -o loop)")
    for tool in ("mkfs.xfs", "mount", "umount"):
        if shutil.which(tool) is None:
            pytest.skip(f"XFS reflink tests need {tool} (apt-get install xfsprogs)")
    base = tmp_path_factory.mktemp("xfs")
    img, mnt = base / "xfs.img", base / "mnt"
    mnt.mkdir()
    with open(img, "wb") as f:
        f.truncate(1 << 30)
    r = subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(img)], capture_output=True, text=True)
    if r.returncode:
        img.unlink()
        pytest.skip(f"mkfs.xfs -m reflink=1 failed: {r.stderr.strip()}")
    r = subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], capture_output=True, text=True)
    if r.returncode:
        img.unlink()
        pytest.skip(f"loop mount of the XFS image failed: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)]).returncode:
            subprocess.run(["umount", "-l", str(mnt)])
        img.unlink()


@pytest.fixture
def xfs_case(xfs_dir: Path, request):
    """A fresh sub-directory of the XFS mount per test."""
    d = xfs_dir / request.node.name.replace("/", "_").replace("[", "_").replace("]", "")
    d.mkdir()
    yield d
    shutil.rmtree(d)


def _xfs_src(d: Path, size: int = 8 * MiB + 3000) -> bytes:
    data = random.Random(size).randbytes(size)
    with open(d / "src", "wb") as f:
        f.write(data)
        os.fsync(f.fileno())
    return data


@pytest.mark.parametrize("impl", IMPLS)
def test_xfs_clone_aligned_shares_extents(impl, xfs_case: Path) -> None:
    src = _xfs_src(xfs_case)
    ranges = [(0, 0, MiB), (MiB, 4 * MiB, 2 * MiB), (4 * MiB, MiB, 64 * 1024), (12288, 7 * MiB, 4096)]
    s = os.open(xfs_case / "src", os.O_RDONLY)
    t = os.open(xfs_case / "dst", os.O_RDWR | os.O_CREAT)
    try:
        methods = impl.copy_ranges(s, t, ranges)
        assert methods == [native.CLONE] * 4
        shared, mapped = impl.fiemap_shared(t, 0, os.fstat(t).st_size)
        total = sum(n for _, _, n in ranges)
        assert mapped == total and shared == total, (shared, mapped)
        # each destination range individually, and the source side too
        for so, do, n in ranges:
            assert impl.fiemap_shared(t, do, n) == (n, n)
            assert impl.fiemap_shared(s, so, n) == (n, n)
        # C and Python agree on FIEMAP
        assert native._py_fiemap_shared(t, 0, 8 * MiB) == impl.fiemap_shared(t, 0, 8 * MiB)
    finally:
        os.close(s)
        os.close(t)
    assert (xfs_case / "dst").read_bytes() == bytes(_model_copy(bytearray(), src, ranges))


@pytest.mark.parametrize("impl", IMPLS)
def test_xfs_unaligned_falls_back_identically(impl, xfs_case: Path) -> None:
    src = _xfs_src(xfs_case)
    ranges = [(1, 0, MiB), (4096, 2 * MiB + 512, 8192), (8192, 3 * MiB, 4095), (0, 5 * MiB, 4096)]
    outputs = {}
    for name, flags in [("clone", {}), ("cfr", dict(allow_clone=False)),
                        ("rw", dict(allow_clone=False, allow_copy_file_range=False))]:
        s = os.open(xfs_case / "src", os.O_RDONLY)
        t = os.open(xfs_case / f"dst-{name}", os.O_RDWR | os.O_CREAT)
        try:
            methods = impl.copy_ranges(s, t, ranges, **flags)
        finally:
            os.close(s)
            os.close(t)
        if name == "clone":
            assert methods[:3] == [native.COPY_FILE_RANGE] * 3 or set(methods[:3]) <= {
                native.COPY_FILE_RANGE, native.READ_WRITE}
            assert methods[3] == native.CLONE  # the one aligned range
        elif name == "cfr":
            assert set(methods) <= {native.COPY_FILE_RANGE, native.READ_WRITE}
        else:
            assert methods == [native.READ_WRITE] * 4
        outputs[name] = (xfs_case / f"dst-{name}").read_bytes()
    expect = bytes(_model_copy(bytearray(), src, ranges))
    assert outputs["clone"] == outputs["cfr"] == outputs["rw"] == expect


@pytest.mark.parametrize("impl", IMPLS)
def test_xfs_plain_copy_not_shared(impl, xfs_case: Path) -> None:
    src = _xfs_src(xfs_case, 4 * MiB)
    s = os.open(xfs_case / "src", os.O_RDONLY)
    t = os.open(xfs_case / "dst", os.O_RDWR | os.O_CREAT)
    try:
        assert impl.copy_ranges(s, t, [(0, 0, 4 * MiB)], allow_clone=False,
                                allow_copy_file_range=False) == [native.READ_WRITE]
        assert impl.fiemap_shared(t, 0, 4 * MiB) == (0, 4 * MiB)
        assert impl.fiemap_shared(s, 0, 4 * MiB) == (0, 4 * MiB)
    finally:
        os.close(s)
        os.close(t)
    assert (xfs_case / "dst").read_bytes() == src


@pytest.mark.parametrize("impl", IMPLS)
def test_xfs_eof_tail_clone(impl, xfs_case: Path) -> None:
    src = _xfs_src(xfs_case, 2 * MiB + 1000)  # last block partial
    s = os.open(xfs_case / "src", os.O_RDONLY)
    t = os.open(xfs_case / "dst", os.O_RDWR | os.O_CREAT)
    u = os.open(xfs_case / "busy", os.O_RDWR | os.O_CREAT)
    try:
        # ends at the source's EOF, nothing after it in dst: clone allowed
        assert impl.copy_ranges(s, t, [(MiB, 0, MiB + 1000)]) == [native.CLONE]
        assert os.fstat(t).st_size == MiB + 1000
        # same range over existing destination data must not clobber its tail
        os.pwrite(u, b"\x77" * (3 * MiB), 0)
        m = impl.copy_ranges(s, u, [(MiB, 0, MiB + 1000)])
        assert m[0] != native.CLONE
    finally:
        os.close(s)
        os.close(t)
        os.close(u)
    assert (xfs_case / "dst").read_bytes() == src[MiB:]
    busy = (xfs_case / "busy").read_bytes()
    assert busy[:MiB + 1000] == src[MiB:] and busy[MiB + 1000:] == b"\x77" * (2 * MiB - 1000)


@pytest.mark.parametrize("impl", IMPLS)
def test_xfs_zero_over_clone_leaves_source(impl, xfs_case: Path) -> None:
    src = _xfs_src(xfs_case, 4 * MiB)
    s = os.open(xfs_case / "src", os.O_RDONLY)
    t = os.open(xfs_case / "dst", os.O_RDWR | os.O_CREAT)
    try:
        assert impl.copy_ranges(s, t, [(0, 0, 4 * MiB)]) == [native.CLONE]
        methods = impl.zero_ranges(t, [(MiB, MiB), (3 * MiB + 5, 100)])
        if impl is C:
            assert methods == [native.FALLOCATE] * 2  # XFS supports ZERO_RANGE
        shared, mapped = impl.fiemap_shared(t, 0, 4 * MiB)
        assert shared < 4 * MiB  # the zeroed part is no longer shared
    finally:
        os.close(s)
        os.close(t)
    assert (xfs_case / "src").read_bytes() == src
    want = bytearray(src)
    want[MiB:2 * MiB] = bytes(MiB)
    want[3 * MiB + 5:3 * MiB + 105] = bytes(100)
    assert (xfs_case / "dst").read_bytes() == want


@needs_c
def test_xfs_clone_refusal_cached_across_batch(xfs_case: Path, tmp_path: Path) -> None:
    """Cross-device (EXDEV) clone: one refusal, the rest of the batch copies."""
    src = _xfs_src(xfs_case, 2 * MiB)
    s = os.open(xfs_case / "src", os.O_RDONLY)
    t = os.open(tmp_path / "dst", os.O_RDWR | os.O_CREAT)  # other file system
    try:
        ranges = [(i * 65536, i * 65536, 65536) for i in range(32)]
        methods = C.copy_ranges(s, t, ranges)
        assert native.CLONE not in methods
        assert methods == PY.copy_ranges(s, t, ranges)
    finally:
        os.close(s)
        os.close(t)
    assert (tmp_path / "dst").read_bytes() == src
