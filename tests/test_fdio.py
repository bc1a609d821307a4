"""vhdx.fdio: the positional I/O loops, the data-extent walk and their errors."""

from __future__ import annotations

import errno
import os

import pytest

from vhdx import fdio
from vhdx.errors import ImageNotFoundError, InvalidArgumentError, VhdxIOError

MiB = 1 << 20


def test_pread_is_short_only_at_eof_and_pread_into_fills_zeros(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"abcdef")
    fd = os.open(p, os.O_RDONLY)
    try:
        assert fdio.pread(fd, 2, 100) == b"cdef"
        buf = bytearray(b"\xff" * 8)
        fdio.pread_into(fd, memoryview(buf), 4, str(p))
        assert bytes(buf) == b"ef" + bytes(6)
    finally:
        os.close(fd)


def test_pwrite_all_retries_short_writes_and_refuses_no_progress(tmp_path, monkeypatch):
    p = tmp_path / "f"
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o600)
    real = os.pwrite
    calls = []

    def one_byte(f: int, data: memoryview, off: int) -> int:
        calls.append(off)
        return real(f, bytes(data[:1]), off)

    try:
        monkeypatch.setattr(os, "pwrite", one_byte)
        fdio.pwrite_all(fd, b"hello", 10)
        assert calls == [10, 11, 12, 13, 14]
        monkeypatch.setattr(os, "pwrite", lambda f, d, o: 0)
        with pytest.raises(OSError) as raw:
            fdio.pwrite_all(fd, b"x", 0)
        assert raw.value.errno == errno.EIO and not isinstance(raw.value, VhdxIOError)
        with pytest.raises(VhdxIOError) as named:
            fdio.pwrite_all(fd, b"x", 0x2000, "out.raw")
        assert named.value.errno == errno.EIO and named.value.filename == "out.raw"
        assert "0x2000" in str(named.value)
    finally:
        monkeypatch.undo()
        os.close(fd)
    assert p.read_bytes() == bytes(10) + b"hello"


def test_a_read_error_keeps_errno_and_names_the_file(tmp_path):
    fd = os.open(tmp_path, os.O_RDONLY)  # a directory: pread fails with EISDIR
    try:
        with pytest.raises(VhdxIOError) as e:
            fdio.pread(fd, 0, 10, "dir")
        assert e.value.errno == errno.EISDIR and e.value.filename == "dir"
        with pytest.raises(VhdxIOError):
            fdio.pread_into(fd, memoryview(bytearray(4)), 0, "dir")
    finally:
        os.close(fd)


def test_data_extents_finds_the_written_ranges(tmp_path):
    p = tmp_path / "sparse"
    with open(p, "wb") as fh:
        fh.truncate(16 * MiB)
        for off in (2 * MiB, 9 * MiB):
            fh.seek(off)
            fh.write(b"\x01" * MiB)
    fd = os.open(p, os.O_RDONLY)
    try:
        try:
            ext = fdio.data_extents(fd, 0, 16 * MiB)
        except OSError:
            pytest.skip("this file system cannot tell holes")
        if ext == [(0, 16 * MiB)]:
            pytest.skip("this file system reports no holes")
        # Every written byte lies in an extent (file systems may round extents up).
        for off in (2 * MiB, 9 * MiB):
            assert any(lo <= off and off + MiB <= hi for lo, hi in ext), ext
        assert not any(lo <= 5 * MiB < hi for lo, hi in ext)  # never written: a hole
        # bounded by [start, end)
        assert fdio.data_extents(fd, 4 * MiB, 8 * MiB) == []
        assert all(4 * MiB <= lo < hi <= 10 * MiB for lo, hi in fdio.data_extents(fd, 4 * MiB, 10 * MiB))
    finally:
        os.close(fd)


@pytest.mark.parametrize("seed", range(8))
def test_only_data_keeps_every_byte_a_copy_into_zeros_needs(tmp_path, seed):
    """Copying only_data's ranges into a zero file gives what copying the whole
    ranges gives, for random holes and random (overlapping, unsorted) ranges."""
    import random

    rng = random.Random(seed)
    size = 8 * MiB
    p = tmp_path / "src"
    content = bytearray(size)
    with open(p, "wb") as fh:
        fh.truncate(size)
        for _ in range(rng.randrange(1, 6)):
            off, n = rng.randrange(0, size - 65536) // 4096 * 4096, rng.randrange(1, 16) * 65536
            data = rng.randbytes(min(n, size - off))
            fh.seek(off)
            fh.write(data)
            content[off:off + len(data)] = data
    ranges = []  # destinations never overlap (a disk's extents); sources may
    dst = 0
    for _ in range(rng.randrange(1, 12)):
        so = rng.randrange(0, size - 1)
        n = rng.randrange(1, min(MiB, size - so) + 1)
        dst += rng.randrange(0, 65536)
        ranges.append((so, dst, n))
        dst += n
    rng.shuffle(ranges)
    fd = os.open(p, os.O_RDONLY)
    try:
        kept = fdio.only_data(fd, ranges)
    finally:
        os.close(fd)
    want, got = bytearray(dst), bytearray(dst)
    for so, do, n in ranges:
        want[do:do + n] = content[so:so + n]
    for so, do, n in kept:
        assert n > 0 and any(a <= so and so + n <= a + m and do - so == d - a for a, d, m in ranges)
        got[do:do + n] = content[so:so + n]
    assert got == want
    assert sum(n for _, _, n in kept) <= sum(n for _, _, n in ranges)


def test_only_data_drops_the_holes(tmp_path):
    p = tmp_path / "f"
    with open(p, "wb") as fh:
        fh.truncate(8 * MiB)
        fh.seek(4 * MiB)
        fh.write(b"\x07" * MiB)
    fd = os.open(p, os.O_RDONLY)
    try:
        if fdio.data_extents(fd, 0, 8 * MiB) == [(0, 8 * MiB)]:
            pytest.skip("this file system reports no holes")
        kept = fdio.only_data(fd, [(0, 16 * MiB, 8 * MiB)])
    finally:
        os.close(fd)
    assert sum(n for _, _, n in kept) < 2 * MiB
    assert all(so - 0 == do - 16 * MiB for so, do, _ in kept)
    assert any(so <= 4 * MiB and 5 * MiB <= so + n for so, _, n in kept)


def test_only_data_leaves_a_device_or_an_unknowing_file_alone(tmp_path, monkeypatch):
    fd = os.open("/dev/zero", os.O_RDONLY)
    try:
        assert fdio.only_data(fd, [(0, 0, 4096)]) == [(0, 0, 4096)]
    finally:
        os.close(fd)
    p = tmp_path / "f"
    p.write_bytes(b"x" * 8192)
    monkeypatch.setattr(fdio, "data_extents", lambda *a: (_ for _ in ()).throw(OSError(errno.EOPNOTSUPP, "no")))
    fd = os.open(p, os.O_RDONLY)
    try:
        assert fdio.only_data(fd, [(0, 0, 8192)]) == [(0, 0, 8192)]
    finally:
        os.close(fd)


def test_open_regular_file_refuses_other_kinds(tmp_path):
    with pytest.raises(ImageNotFoundError):
        fdio.open_regular_file(tmp_path / "nope")
    with pytest.raises(InvalidArgumentError, match="not a regular file"):
        fdio.open_regular_file(tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(InvalidArgumentError, match="not a regular file"):  # and no hang on open
        fdio.open_regular_file(fifo)


def test_fsync_and_fsync_dir(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"x")
    fd = os.open(p, os.O_RDWR)
    try:
        fdio.fsync(fd)
        assert fdio.device_size(fd) == 1  # a regular file: st_size
    finally:
        os.close(fd)
    fdio.fsync_dir(p)  # best effort: never raises
    fdio.fsync_dir(tmp_path / "missing" / "f")
