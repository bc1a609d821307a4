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
