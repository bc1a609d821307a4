"""Errors (issue 10 item 5): every exception class is declared in vhdx/errors.py; an
OS failure (EIO, ENOSPC, EROFS, EACCES on open/read/write/fsync) leaves every
operation as VhdxIOError with errno and file name; "output exists" is
OutputExistsError; writes to a disk opened read-only are ReadOnlyError. Each for
VHDX and VHD.

Failures are real where the machine allows it (a read-only bind mount, a full
tmpfs: root only, skipped otherwise) and injected where it cannot (an os function
replaced for one file's descriptor, a file object whose readinto fails); the C
read path is switched off for injected reads, since it calls pread itself.
"""

from __future__ import annotations

import errno
import hashlib
import importlib
import inspect
import io
import os
import pkgutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import vhdx
from vhdx import errors as E
from vhdx import check_chain  # both formats (vhdx.formats routes by signature)
from vhdx.convert import convert_to_raw, convert_to_vhdx

MiB = 1 << 20
FORMATS = ["vhdx", "vhd"]
# Private control-flow signals that never leave their module, allowed outside errors.py:
# the NBD connection loop's "peer gone" and the CLI's SIGTERM-as-KeyboardInterrupt.
PRIVATE_SIGNALS = {"vhdx.nbd._Disconnect", "vhdx.cli._Terminated"}


def _digest(p: Path) -> str:
    with open(p, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _image(d: Path, fmt: str, name: str = "base") -> Path:
    """An 8 MiB dynamic disk with 3 MiB of data, made by the project's writer."""
    p = Path(vhdx.create(d / f"{name}.{fmt}", 8 * MiB))
    with vhdx.open(p, "r+") as w:
        w.write_at(0, b"\x11" * 3 * MiB)
    return p


def _child(parent: Path) -> Path:
    c = Path(vhdx.create(parent.with_name("child." + ("avhdx" if parent.suffix == ".vhdx" else "avhd")),
                         parent=parent))
    with vhdx.open(c, "r+") as w:
        w.write_at(4 * MiB, b"\x22" * MiB)
    return c


def _assert_io(e: BaseException, err: int, path: Path | str) -> None:
    """Exactly VhdxIOError, errno and file name kept, the file named in str()."""
    assert type(e) is E.VhdxIOError, repr(e)
    assert e.errno == err, (e.errno, err)
    assert e.filename == os.fspath(path), (e.filename, path)
    assert str(e).startswith(f"{os.fspath(path)}: ")


def _fail_for(monkeypatch: pytest.MonkeyPatch, name: str, path: Path, err: int,
              when: Callable[..., bool] = lambda *a: True) -> None:
    """``os.<name>`` fails with ``err`` on descriptors open on ``path`` (others pass)."""
    orig = getattr(os, name)
    st = os.stat(path)
    ident = (st.st_dev, st.st_ino)

    def failing(fd: int, *a: object, **k: object) -> object:
        try:
            s = os.fstat(fd)
            mine = (s.st_dev, s.st_ino) == ident
        except OSError:
            mine = False
        if mine and when(*a):
            raise OSError(err, os.strerror(err))
        return orig(fd, *a, **k)

    monkeypatch.setattr(os, name, failing)


def _python_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Disks opened from now on read in Python (the C reader calls pread itself)."""
    import vhdx.native

    monkeypatch.setattr(vhdx.native, "HAVE_CHAIN_READER", False)
    # VHD's Python path still gathers bitmap runs in C: make that Python too.
    monkeypatch.setattr(vhdx.native, "gather_read", vhdx.native._py_gather_read)


def _fail_reads(monkeypatch: pytest.MonkeyPatch, path: Path, err: int) -> None:
    _python_reads(monkeypatch)
    _fail_for(monkeypatch, "pread", path, err)
    _fail_for(monkeypatch, "preadv", path, err)


def _mount(args: list[str], target: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount")
    target.mkdir(exist_ok=True)
    if subprocess.run(["mount", *args, str(target)], capture_output=True).returncode:
        pytest.skip(f"cannot mount {' '.join(args)} here")
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], capture_output=True)


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(writable source folder, the same folder bind-mounted read-only)."""
    src = tmp_path / "src"
    src.mkdir()
    yield from ((src, m) for m in _mount(["--bind", "-o", "ro", str(src)], tmp_path / "ro"))


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs."""
    yield from _mount(["-t", "tmpfs", "-o", "size=4m", "tmpfs"], tmp_path / "small")


# --- where the classes live ------------------------------------------------------------------
def _package_modules() -> list[str]:
    names = ["vhdx"]
    for info in pkgutil.walk_packages(vhdx.__path__, "vhdx."):
        if not info.name.rsplit(".", 1)[-1].startswith("_"):  # compiled extensions
            names.append(info.name)
    return names


def test_every_exception_class_is_declared_in_errors_py() -> None:
    found, elsewhere = [], []
    for name in _package_modules():
        mod = importlib.import_module(name)
        for obj in vars(mod).values():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == name:
                found.append(obj)
                if name != "vhdx.errors" and f"{name}.{obj.__qualname__}" not in PRIVATE_SIGNALS:
                    elsewhere.append(f"{name}.{obj.__qualname__}")
    assert elsewhere == [], f"exception classes outside vhdx/errors.py: {elsewhere}"
    assert len([c for c in found if c.__module__ == "vhdx.errors"]) >= 25


def test_moved_classes_keep_their_old_names() -> None:
    from vhdx import log_writer, native

    assert log_writer.LogFullError is E.LogFullError and issubclass(E.LogFullError, E.InvalidArgumentError)
    assert log_writer.LogWriterFailedError is E.LogWriterFailedError
    assert issubclass(E.LogWriterFailedError, E.VhdxError)
    assert native.NativeFallbackError is E.NativeFallbackError  # the C reader's "redo it in Python"
    assert issubclass(E.NativeFallbackError, E.VhdxError)


def test_the_boundary_keeps_errno_and_prefers_the_os_file_name(tmp_path: Path) -> None:
    with pytest.raises(E.VhdxIOError) as info:
        with E.os_errors(tmp_path / "op"):
            raise OSError(errno.EIO, "Input/output error")
    _assert_io(info.value, errno.EIO, tmp_path / "op")
    assert isinstance(info.value.__cause__, OSError)
    with pytest.raises(E.VhdxIOError) as info:
        with E.os_errors(tmp_path / "op", "flush"):
            os.open(tmp_path / "missing" / "x", os.O_RDONLY)
    _assert_io(info.value, errno.ENOENT, tmp_path / "missing" / "x")  # the OS's own name wins
    assert "flush: " in str(info.value)
    with pytest.raises(E.ChecksumError):  # a VhdxError passes through unchanged
        with E.os_errors(tmp_path / "op"):
            raise E.ChecksumError("x")
    with pytest.raises(BrokenPipeError) as pinfo:  # the pipe's reader left: not a file's failure
        with E.os_errors(tmp_path / "op"):
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")
    assert type(pinfo.value) is BrokenPipeError


def _assert_opens_fail(p: Path, err: int) -> None:
    """Opening ``p`` read-only and writable both fail with VhdxIOError(err) naming it."""
    for mode in ("r", "r+"):
        with pytest.raises(E.VhdxIOError) as info:
            vhdx.open(p, mode)
        _assert_io(info.value, err, p)


# --- open and read ---------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_open_fails_with_eio(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    p = _image(tmp_path, fmt)
    _fail_reads(monkeypatch, p, errno.EIO)
    _assert_opens_fail(p, errno.EIO)


@pytest.mark.parametrize("fmt", FORMATS)
def test_open_fails_with_eacces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    p = _image(tmp_path, fmt)
    orig = os.open

    def refusing(path: object, *a: object, **k: object) -> int:
        if os.fspath(path) == os.fspath(p):
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(p))
        return orig(path, *a, **k)

    monkeypatch.setattr(os, "open", refusing)
    _assert_opens_fail(p, errno.EACCES)


@pytest.mark.parametrize("fmt", FORMATS)
def test_reads_fail_with_eio(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    p = _image(tmp_path, fmt)
    before = _digest(p)
    _python_reads(monkeypatch)
    reads: list[Callable[[vhdx.VirtualDisk], object]] = [
        lambda d: d.read_at(0, 3 * MiB), lambda d: d.read(3 * MiB),
        lambda d: d.readinto(bytearray(3 * MiB)), lambda d: d.readinto_at(0, bytearray(3 * MiB)),
        lambda d: hashlib.file_digest(d, "sha256")]
    for read in reads:
        with vhdx.open(p) as disk:  # the open reads fine; the data reads fail
            with monkeypatch.context() as m:
                _fail_for(m, "pread", p, errno.EIO)
                _fail_for(m, "preadv", p, errno.EIO)
                with pytest.raises(E.VhdxIOError) as info:
                    read(disk)
        _assert_io(info.value, errno.EIO, p)
    monkeypatch.undo()
    assert _digest(p) == before


def test_file_object_whose_readinto_fails(tmp_path: Path) -> None:
    """A VHDX given as a file object (VHD file objects are not probed for the VHD
    signature, so only VHDX applies): the object's OSError keeps its errno."""
    p = _image(tmp_path, "vhdx")

    class Failing(io.RawIOBase):
        def __init__(self) -> None:
            self.f = open(p, "rb")  # noqa: SIM115 - closed by close()

        def readable(self) -> bool:
            return True

        def seekable(self) -> bool:
            return True

        def seek(self, pos: int, whence: int = 0) -> int:
            return self.f.seek(pos, whence)

        def readinto(self, b) -> int:  # noqa: ANN001
            if self.f.tell() >= 3 * MiB + 1:  # past the metadata: the payload
                raise OSError(errno.EIO, "Input/output error")
            return self.f.readinto(b)

        def close(self) -> None:
            self.f.close()
            super().close()

    src = Failing()
    try:
        with vhdx.open(src) as disk:
            with pytest.raises(E.VhdxIOError) as info:
                disk.read_at(0, 3 * MiB)
            name = disk.path
    finally:
        src.close()
    _assert_io(info.value, errno.EIO, name)  # named as the open names the object


@pytest.mark.parametrize("fmt", FORMATS)
def test_check_fails_with_eio(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    p = _image(tmp_path, fmt)
    _fail_reads(monkeypatch, p, errno.EIO)
    with pytest.raises(E.VhdxIOError) as info:
        check_chain(p)
    _assert_io(info.value, errno.EIO, p)


@pytest.mark.parametrize("fmt", FORMATS)
def test_convert_read_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    """The source's payload cannot be read: the conversion names the source and
    leaves no output (nor a temporary file) behind."""
    p = _image(tmp_path, fmt)
    with vhdx.open(p) as disk:
        data_at = next(e.file_offset for e in disk.extents() if e.kind == "data")
    _python_reads(monkeypatch)
    for call in ("pread", "preadv"):
        _fail_for(monkeypatch, call, p, errno.EIO, lambda _n, off: data_at <= off < data_at + MiB)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for convert, out in ((convert_to_raw, out_dir / "o.raw"), (convert_to_vhdx, out_dir / "o.vhdx")):
        with pytest.raises(E.VhdxIOError) as info:
            convert(p, out)
        _assert_io(info.value, errno.EIO, p)
    if fmt == "vhd":
        from vhdx.vhd.convert import convert_to_vhd

        with pytest.raises(E.VhdxIOError) as info:
            convert_to_vhd(p, out_dir / "o.vhd")
        _assert_io(info.value, errno.EIO, p)
    assert os.listdir(out_dir) == []


# --- write, flush, close ---------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("call,err", [("pwrite", errno.ENOSPC), ("pwrite", errno.EIO), ("fsync", errno.EIO)])
def test_writes_fail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str, call: str, err: int) -> None:
    p = _image(tmp_path, fmt)
    with vhdx.open(p, "r+") as w:
        _fail_for(monkeypatch, call, p, err)
        with pytest.raises(E.VhdxIOError) as info:
            w.write_at(5 * MiB, b"\x22" * MiB)
            w.flush()
        monkeypatch.undo()
    _assert_io(info.value, err, p)


@pytest.mark.parametrize("fmt", FORMATS)
def test_close_fails_with_eio(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    p = _image(tmp_path, fmt)
    w = vhdx.open(p, "r+")
    w.write_at(5 * MiB, b"\x22" * MiB)
    _fail_for(monkeypatch, "fsync", p, errno.EIO)
    with pytest.raises(E.VhdxIOError) as info:
        w.close()
    _assert_io(info.value, errno.EIO, p)


@pytest.mark.parametrize("fmt", FORMATS)
def test_disk_full(small_fs: Path, fmt: str) -> None:
    """A real ENOSPC: a dynamic disk written past what a 4 MiB tmpfs holds."""
    p = Path(vhdx.create(small_fs / f"big.{fmt}", 64 * MiB))
    with pytest.raises(E.VhdxIOError) as info:
        with vhdx.open(p, "r+") as w:
            for k in range(8):
                w.write_at(k * 4 * MiB, os.urandom(MiB))
    _assert_io(info.value, errno.ENOSPC, p)


@pytest.mark.parametrize("fmt", FORMATS)
def test_create_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    p = tmp_path / f"new.{fmt}"
    orig = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "Input/output error"))
                        if os.path.samefile(f"/proc/self/fd/{fd}", p) else orig(fd))
    with pytest.raises(E.VhdxIOError) as info:
        vhdx.create(p, 8 * MiB)
    _assert_io(info.value, errno.EIO, p)


# --- read-only file systems --------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_read_only_file_system(read_only_dir: tuple[Path, Path], fmt: str) -> None:
    src, ro = read_only_dir
    _child(_image(src, fmt))
    base = ro / f"base.{fmt}"
    child = ro / ("child." + ("avhdx" if fmt == "vhdx" else "avhd"))
    before = {n: _digest(src / n) for n in os.listdir(src)}
    with vhdx.open(child) as d:  # reading is fine
        assert d.read_at(4 * MiB, 4) == b"\x22" * 4
    with pytest.raises(E.VhdxIOError) as info:
        vhdx.open(base, "r+")
    _assert_io(info.value, errno.EROFS, base)
    with pytest.raises(E.VhdxIOError) as info:
        vhdx.create(ro / f"new.{fmt}", 8 * MiB)
    _assert_io(info.value, errno.EROFS, ro / f"new.{fmt}")
    for convert, out in ((convert_to_raw, ro / "out.raw"), (convert_to_vhdx, ro / "out.vhdx")):
        with pytest.raises(E.VhdxIOError) as info:
            convert(base, out)
        assert info.value.errno == errno.EROFS and info.value.filename == str(out)
    # a VHDX merge refuses in its preflight (NotWritableError); a VHD merge meets the EROFS
    if fmt == "vhdx":
        with pytest.raises(E.NotWritableError) as minfo:
            vhdx.merge(child)
        assert type(minfo.value) is E.NotWritableError and str(child) in str(minfo.value)
    else:
        with pytest.raises(E.VhdxIOError) as info:
            vhdx.merge(child)
        _assert_io(info.value, errno.EROFS, base)
    assert {n: _digest(src / n) for n in os.listdir(src)} == before


@pytest.mark.parametrize("fmt", FORMATS)
def test_merge_read_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    child = _child(_image(tmp_path, fmt))
    _fail_reads(monkeypatch, child, errno.EIO)
    with pytest.raises(E.VhdxIOError) as info:
        vhdx.merge(child)
    _assert_io(info.value, errno.EIO, child)


@pytest.mark.parametrize("op", ["compact", "relink"])
def test_maintenance_read_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, op: str) -> None:
    """compact and relink (VHDX only) behind the same boundary."""
    child = _child(_image(tmp_path, "vhdx"))
    before = _digest(child)
    _fail_reads(monkeypatch, child, errno.EIO)
    with pytest.raises(E.VhdxIOError) as info:
        vhdx.compact(child) if op == "compact" else vhdx.relink(child, fix_paths=True)
    _assert_io(info.value, errno.EIO, child)
    monkeypatch.undo()
    assert _digest(child) == before


def test_merge_write_failure_is_operation_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A merge stopped part-way says what state the chain is in (OperationFailedError),
    errno kept."""
    base = _image(tmp_path, "vhdx")
    child = _child(base)
    _fail_for(monkeypatch, "pwrite", base, errno.EIO)
    with pytest.raises(E.OperationFailedError) as info:
        vhdx.merge(child)
    assert type(info.value) is E.OperationFailedError and info.value.errno == errno.EIO
    assert str(child) in str(info.value)


# --- output exists ----------------------------------------------------------------------------
def _assert_exists(e: BaseException, path: Path) -> None:
    assert type(e) is E.OutputExistsError, repr(e)
    assert e.errno == errno.EEXIST and e.filename == os.fspath(path)
    assert isinstance(e, FileExistsError) and str(e).startswith(f"{path}: already exists")


@pytest.mark.parametrize("fmt", FORMATS)
def test_output_exists(tmp_path: Path, fmt: str) -> None:
    p = _image(tmp_path, fmt)
    other = tmp_path / f"other.{fmt}"
    other.write_bytes(b"keep")
    with pytest.raises(E.OutputExistsError) as info:
        vhdx.create(p, 8 * MiB)
    _assert_exists(info.value, p)
    for convert in (convert_to_raw, convert_to_vhdx):
        with pytest.raises(E.OutputExistsError) as info:
            convert(p, other)
        _assert_exists(info.value, other)
    if fmt == "vhd":
        from vhdx.vhd.convert import convert_to_vhd

        with pytest.raises(E.OutputExistsError) as info:
            convert_to_vhd(p, other)
        _assert_exists(info.value, other)
    assert other.read_bytes() == b"keep"


def test_serve_socket_path_exists(tmp_path: Path) -> None:
    from vhdx.nbd import NbdServer

    path = tmp_path / "not-a-socket"
    path.write_bytes(b"")
    with pytest.raises(E.OutputExistsError) as info:
        NbdServer._claim_socket_path(str(path))
    _assert_exists(info.value, path)


# --- read-only disks --------------------------------------------------------------------------
WRITES: list[tuple[str, Callable[[vhdx.VirtualDisk], object]]] = [
    ("write", lambda d: d.write(b"x" * 512)),
    ("writelines", lambda d: d.writelines([b"x" * 512])),
    ("truncate", lambda d: d.truncate(0)),
    ("write_at", lambda d: d.write_at(0, b"x" * 512)),
    ("write_zeroes_at", lambda d: d.write_zeroes_at(0, 512)),
    ("resize", lambda d: d.resize(16 * MiB)),
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name,op", WRITES, ids=[w[0] for w in WRITES])
def test_read_only_disk_refuses_writes(tmp_path: Path, fmt: str, name: str, op) -> None:  # noqa: ANN001
    p = _image(tmp_path, fmt)
    before = _digest(p)
    with vhdx.open(p) as disk:
        assert not disk.writable()
        with pytest.raises(E.ReadOnlyError) as info:
            op(disk)
        assert type(info.value) is E.ReadOnlyError and isinstance(info.value, io.UnsupportedOperation)
        assert str(p) in str(info.value) and "read-only" in str(info.value)
        assert disk.read_at(0, 4) == b"\x11" * 4  # still usable
    assert _digest(p) == before


@pytest.mark.parametrize("fmt", FORMATS)
def test_writable_disk_write_and_truncate(tmp_path: Path, fmt: str) -> None:
    """The file-like write() writes at the position on both formats; truncate() is
    not a resize and says so (not "read-only")."""
    p = _image(tmp_path, fmt)
    with vhdx.open(p, "r+") as w:
        assert w.writable()
        w.seek(MiB + 512)
        assert w.write(b"\x33" * 512) == 512 and w.tell() == MiB + 1024
        with pytest.raises(io.UnsupportedOperation) as info:
            w.truncate(0)
        assert not isinstance(info.value, E.ReadOnlyError) and "resize" in str(info.value)
    with vhdx.open(p) as d:
        assert d.read_at(MiB, 1024) == b"\x11" * 512 + b"\x33" * 512


# --- the CLI's one line -----------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_cli_names_the_file_on_an_io_error(read_only_dir: tuple[Path, Path], fmt: str) -> None:
    _src, ro = read_only_dir
    out = ro / f"new.{fmt}"
    r = subprocess.run([sys.executable, "-m", "vhdx", "create", str(out), "--size", "8M"],
                       capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"vhdx: error: {out}: "), r.stderr
    assert "Read-only file system" in lines[0] and "Traceback" not in r.stderr
