"""``vhdx mount`` for real: FUSE, loop devices and ext4, on a 3-deep chain.

The disk is made by sgdisk (GPT, two partitions) and mkfs.ext4 (partition 1,
known files) as a raw file, the ground truth, then written into a chain of three
files through the project's writer. Needs root, /dev/fuse, fusermount3, mfusepy
and the tools; skips cleanly otherwise.
"""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from diskimg import have, make_ext4_gpt, raw_to_chain

ROOT = Path(__file__).resolve().parent.parent
FILES = {"hello.txt": b"hello from a checkpoint chain\n",
         "dir/data.bin": random.Random(8).randbytes(300_000),
         "dir/empty": b""}


def _fuse_usable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (loop mounts)"
    if not os.path.exists("/dev/fuse") or not have("fusermount3"):
        return "needs /dev/fuse and fusermount3 (apt install fuse3)"
    if not have("sgdisk", "mkfs.ext4", "mount", "umount", "losetup"):
        return "needs sgdisk, mkfs.ext4, mount, losetup"
    if not os.path.exists("/dev/loop-control"):
        return "needs loop devices"
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError) as e:
        return f"needs mfusepy ({e})"
    return None


needs_fuse = pytest.mark.skipif(_fuse_usable() is not None, reason=str(_fuse_usable()))


def vhdx_cli(*args: str | Path, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "vhdx", *map(str, args)], cwd=ROOT, capture_output=True,
                       text=True, timeout=timeout, check=False)
    if check:
        assert p.returncode == 0, (args, p.returncode, p.stdout, p.stderr)
    return p


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _mounted(mp: Path) -> bool:
    real = os.path.realpath(mp)
    with open("/proc/self/mountinfo") as fh:
        return any(line.split()[4] == real for line in fh)


class Mounts:
    """Every mount a test makes, undone in reverse order at teardown."""

    def __init__(self) -> None:
        self.stack: list[tuple[str, Path]] = []

    def fuse(self, *args: str | Path, mp: Path) -> subprocess.CompletedProcess:
        p = vhdx_cli("mount", *args, mp)
        self.stack.append(("fuse", mp))
        return p

    def loop(self, image: Path, mp: Path, opts: str) -> None:
        subprocess.run(["mount", "-o", opts, str(image), str(mp)], check=True, capture_output=True)
        self.stack.append(("loop", mp))

    def umount(self, mp: Path) -> None:
        kind = next(k for k, m in self.stack if m == mp)
        self.stack.remove((kind, mp))
        if kind == "loop":
            subprocess.run(["umount", str(mp)], check=True, capture_output=True)
        else:
            vhdx_cli("umount", mp)

    def cleanup(self) -> None:
        for kind, mp in reversed(self.stack):
            if _mounted(mp):
                if kind == "loop":
                    subprocess.run(["umount", "-l", str(mp)], check=False)
                else:
                    subprocess.run(["fusermount3", "-u", "-z", str(mp)], check=False)


@pytest.fixture
def mounts():
    m = Mounts()
    yield m
    m.cleanup()


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("mountdisk")
    raw = d / "truth.raw"
    make_ext4_gpt(raw, FILES)
    chain = raw_to_chain(raw, d, stem="disk", depth=3)
    return {"raw": raw, "chain": chain, "top": chain[0], "dir": d}


def _digests(paths: list[Path]) -> dict[str, str]:
    return {p.name: _sha(p) for p in paths}


def _check_files(root: Path) -> None:
    for name, data in FILES.items():
        assert (root / name).read_bytes() == data, name


@needs_fuse
def test_readonly_mount_shows_disk_and_partitions(disk: dict, mounts: Mounts, tmp_path: Path) -> None:
    import vhdx

    before = _digests(disk["chain"])
    mp, fs = tmp_path / "mp", tmp_path / "fs"
    mp.mkdir()
    fs.mkdir()
    mounts.fuse(disk["top"], mp=mp)
    assert sorted(os.listdir(mp)) == ["disk.p1.raw", "disk.p2.raw", "disk.raw"]
    with vhdx.open(disk["top"]) as d:
        parts = d.partitions()
        extents = d.extents()
        size = d.size
    whole = mp / "disk.raw"
    assert whole.stat().st_size == size == disk["raw"].stat().st_size
    # The whole disk hashes as `vhdx hash` says, and as the raw ground truth.
    want = vhdx_cli("hash", disk["top"]).stdout.split()[0]
    assert _sha(whole) == want == _sha(disk["raw"])
    # st_blocks (and so du) counts what the chain holds, not the virtual size.
    data = sum(e.length for e in extents if e.kind == "data")
    assert whole.stat().st_blocks == -(-data // 512) and data < size // 2
    du = int(subprocess.run(["du", "-B1", str(whole)], capture_output=True, text=True,
                            check=True).stdout.split()[0])
    assert du == whole.stat().st_blocks * 512
    # Each partition file is its window of the disk.
    raw = disk["raw"].read_bytes()
    for p in parts:
        f = mp / f"disk.p{p.number}.raw"
        assert f.stat().st_size == p.length
        assert f.read_bytes() == raw[p.offset:p.offset + p.length]
    # Read-only: opening for writing fails, nothing changes.
    with pytest.raises(OSError) as ei:
        os.close(os.open(whole, os.O_RDWR))
    assert ei.value.errno == errno.EROFS
    mounts.loop(mp / "disk.p1.raw", fs, "ro,loop")
    _check_files(fs)
    mounts.umount(fs)
    mounts.umount(mp)
    assert not _mounted(mp)
    assert _digests(disk["chain"]) == before


@needs_fuse
def test_write_to_lands_in_the_new_child_only(disk: dict, mounts: Mounts, tmp_path: Path) -> None:
    before = _digests(disk["chain"])
    mp, fs = tmp_path / "mp", tmp_path / "fs"
    mp.mkdir()
    fs.mkdir()
    new = tmp_path / "exam.avhdx"
    mounts.fuse(disk["top"], "--write-to", new, mp=mp)
    assert new.exists()
    assert os.access(mp / "disk.p1.raw", os.W_OK)
    mounts.loop(mp / "disk.p1.raw", fs, "loop")
    note = random.Random(5).randbytes(2 << 20)
    (fs / "written.bin").write_bytes(note)
    (fs / "hello.txt").write_bytes(b"changed\n")
    mounts.umount(fs)
    mounts.umount(mp)
    assert _digests(disk["chain"]) == before  # the chain's files are byte-identical
    check = json.loads(vhdx_cli("check", new, "--json").stdout)
    assert check["clean"], check
    info = json.loads(vhdx_cli("info", new, "--json").stdout)
    assert [c["path"] for c in info["chain"]][1:] == [str(p) for p in disk["chain"]]
    assert info["chain"][0]["log"]["dirty"] is False  # closed cleanly by the unmount
    # Mounted again (read-only, the new chain): the written files are there.
    mounts.fuse(new, mp=mp)
    assert sorted(os.listdir(mp)) == ["exam.p1.raw", "exam.p2.raw", "exam.raw"]
    # The file system written through the child is consistent (e2fsck, read-only check).
    fsck = subprocess.run(["e2fsck", "-fn", str(mp / "exam.p1.raw")], capture_output=True, text=True,
                          check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    # du shows the allocation the 2 MiB file added (ext4 put it in space the old chain never held).
    import vhdx

    with vhdx.open(disk["top"]) as d:
        old_data = sum(e.length for e in d.extents() if e.kind == "data")
    assert (mp / "exam.raw").stat().st_blocks * 512 - old_data >= 1 << 20
    mounts.loop(mp / "exam.p1.raw", fs, "ro,loop")
    assert (fs / "written.bin").read_bytes() == note
    assert (fs / "hello.txt").read_bytes() == b"changed\n"
    assert (fs / "dir/data.bin").read_bytes() == FILES["dir/data.bin"]
    mounts.umount(fs)
    mounts.umount(mp)
    # And the old chain still shows the old contents.
    mounts.fuse(disk["top"], mp=mp)
    mounts.loop(mp / "disk.p1.raw", fs, "ro,loop")
    _check_files(fs)
    assert not (fs / "written.bin").exists()
    mounts.umount(fs)
    mounts.umount(mp)
    assert _digests(disk["chain"]) == before


@needs_fuse
def test_concurrent_reads_and_allow_other(disk: dict, mounts: Mounts, tmp_path: Path) -> None:
    mp = tmp_path / "mp"
    mp.mkdir()
    mounts.fuse(disk["top"], "--allow-other", mp=mp)
    with open("/proc/self/mountinfo") as fh:
        line = next(x for x in fh if x.split()[4] == os.path.realpath(mp))
    assert "allow_other" in line and "fuse.vhdx" in line
    raw = disk["raw"].read_bytes()
    errors: list[str] = []

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        # O_DIRECT-free but uncached reads: each thread opens its own descriptor.
        fd = os.open(mp / "disk.raw", os.O_RDONLY)
        try:
            for _ in range(60):
                off = rng.randrange(0, len(raw) - 1)
                n = rng.choice([512, 4096, 65536, 1 << 20])
                if os.pread(fd, n, off) != raw[off:off + n]:
                    errors.append(f"{off}+{n}")
        finally:
            os.close(fd)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    mounts.umount(mp)


@needs_fuse
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_unmounts_and_closes_a_written_child(disk: dict, tmp_path: Path, sig: int) -> None:
    mp = tmp_path / "mp"
    mp.mkdir()
    new = tmp_path / "sig.avhdx"
    p = subprocess.Popen([sys.executable, "-m", "vhdx", "mount", "-f", str(disk["top"]), str(mp),
                          "--write-to", str(new)], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not _mounted(mp):
            assert p.poll() is None and time.monotonic() < deadline, p.stderr.read() if p.stderr else ""
            time.sleep(0.05)
        with open(mp / "disk.raw", "r+b") as f:
            f.seek(5 << 20)
            f.write(b"signal-test" * 100)
        p.send_signal(sig)
        assert p.wait(30) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        if _mounted(mp):
            subprocess.run(["fusermount3", "-u", "-z", str(mp)], check=False)
    assert not _mounted(mp)
    info = json.loads(vhdx_cli("info", new, "--json").stdout)
    assert info["chain"][0]["log"]["dirty"] is False
    import vhdx

    with vhdx.open(new) as d:
        assert d.read_at(5 << 20, 1100) == b"signal-test" * 100


@needs_fuse
def test_mount_errors_are_one_line(disk: dict, tmp_path: Path) -> None:
    p = vhdx_cli("mount", disk["top"], tmp_path / "missing", check=False)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "not a directory" in p.stderr
    p = vhdx_cli("umount", tmp_path, check=False)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "not a FUSE mount point" in p.stderr
    existing = tmp_path / "exists.avhdx"
    existing.write_bytes(b"x")
    (tmp_path / "mp").mkdir()
    p = vhdx_cli("mount", disk["top"], tmp_path / "mp", "--write-to", existing, check=False)
    assert p.returncode == 1 and "already exists" in p.stderr and existing.read_bytes() == b"x"
    assert not _mounted(tmp_path / "mp")


def test_missing_fuse_binding_names_what_to_install(tmp_path: Path) -> None:
    import vhdx

    img = vhdx.create(tmp_path / "d.vhdx", 8 << 20)
    code = ("import sys; sys.modules['mfusepy'] = None; from vhdx.cli import main; "
            f"sys.exit(main(['mount', {str(img)!r}, {str(tmp_path)!r}]))")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=60, check=False)
    assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith("vhdx: error: ") and "pip install 'vhdx[mount]'" in p.stderr
    assert "apt install fuse3" in p.stderr


FLAKY_SERVER = """
import sys
import vhdx
from vhdx.errors import CorruptImageError
from vhdx.mount import serve

import time

top, mp, bad, delay = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])


class Flaky:
    \"\"\"A real disk whose MiB at ``bad`` fails to read, as a damaged block would, and
    whose reads beyond 16 MiB take ``delay`` seconds (a slow device; sleeping, like
    the C reader, releases the GIL).\"\"\"

    def __init__(self, disk):
        self.disk = disk

    def __getattr__(self, name):
        return getattr(self.disk, name)

    def readinto_at(self, offset, buf):
        if offset < bad + (1 << 20) and offset + len(buf) > bad:
            raise CorruptImageError(f"{top}: simulated damaged block")
        if offset >= 16 << 20:
            time.sleep(delay)
        return self.disk.readinto_at(offset, buf)


with vhdx.open(top) as d:
    serve(Flaky(d), mp, "disk", on_ready=lambda: print("ready", flush=True))
print("stopped", flush=True)
"""


def _flaky_server(disk: dict, mp: Path, bad: int, delay: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", FLAKY_SERVER, str(disk["top"]), str(mp), str(bad),
                             str(delay)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@needs_fuse
def test_reads_are_served_concurrently(disk: dict, tmp_path: Path) -> None:
    """Four uncached reads of a slow region at once take about one read's time."""
    mp = tmp_path / "mp"
    mp.mkdir()
    delay = 0.5
    p = _flaky_server(disk, mp, 1 << 40, delay)
    try:
        assert p.stdout.readline() == "ready\n"
        raw = disk["raw"].read_bytes()
        got: dict[int, bytes] = {}

        def read(i: int) -> None:
            fd = os.open(mp / "disk.raw", os.O_RDONLY | os.O_DIRECT)
            try:
                buf = mmap.mmap(-1, 65536)
                os.preadv(fd, [buf], (17 + i) << 20)
                got[i] = buf[:]
            finally:
                os.close(fd)

        threads = [threading.Thread(target=read, args=(i,)) for i in range(4)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        elapsed = time.monotonic() - t0
        assert all(got[i] == raw[(17 + i) << 20:((17 + i) << 20) + 65536] for i in range(4))
        assert elapsed < 2.5 * delay, elapsed  # serial service would take 4 x delay
        subprocess.run(["fusermount3", "-u", str(mp)], check=True)
        assert p.wait(30) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        if _mounted(mp):
            subprocess.run(["fusermount3", "-u", "-z", str(mp)], check=False)


@needs_fuse
def test_a_failing_read_is_eio_and_the_server_keeps_serving(disk: dict, tmp_path: Path) -> None:
    mp = tmp_path / "mp"
    mp.mkdir()
    bad = 8 << 20
    p = _flaky_server(disk, mp, bad, 0)
    try:
        assert p.stdout.readline() == "ready\n"
        raw = disk["raw"].read_bytes()
        fd = os.open(mp / "disk.raw", os.O_RDONLY | os.O_DIRECT)
        try:
            with pytest.raises(OSError) as ei:
                os.preadv(fd, [mmap.mmap(-1, 4096)], bad)
            assert ei.value.errno == errno.EIO
            buf = mmap.mmap(-1, 1 << 20)
            assert os.preadv(fd, [buf], 0) == 1 << 20 and buf[:] == raw[:1 << 20]  # still serving
        finally:
            os.close(fd)
        subprocess.run(["fusermount3", "-u", str(mp)], check=True)
        out, err = p.communicate(timeout=30)
        assert p.returncode == 0 and out == "stopped\n", err
        assert "Traceback" not in err
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        if _mounted(mp):
            subprocess.run(["fusermount3", "-u", "-z", str(mp)], check=False)


@needs_fuse
def test_unusable_partition_table_leaves_the_whole_disk_and_a_warning(mounts: Mounts, tmp_path: Path) -> None:
    raw = tmp_path / "bad.raw"
    with open(raw, "wb") as f:
        f.truncate(16 << 20)
    subprocess.run(["sgdisk", "-n", "1:2048:+4M", str(raw)], check=True, capture_output=True)
    with open(raw, "r+b") as f:  # break both GPT headers' CRCs
        for off in (512 + 40, (16 << 20) - 512 + 40):
            f.seek(off)
            b = f.read(1)
            f.seek(off)
            f.write(bytes([b[0] ^ 1]))
    top = raw_to_chain(raw, tmp_path, stem="bad")[0]
    mp = tmp_path / "mp"
    mp.mkdir()
    p = mounts.fuse(top, mp=mp)
    assert os.listdir(mp) == ["bad.raw"]
    assert p.stderr.startswith("vhdx: warning: partition table: GPT unusable")
    assert (mp / "bad.raw").read_bytes() == raw.read_bytes()
    mounts.umount(mp)


# --- the operations themselves, without FUSE ---------------------------------------------
def _fs_over_new_disk(tmp_path: Path, writable: bool):
    import vhdx
    from vhdx.mount import DiskFS, MountFile

    base = vhdx.create(tmp_path / "base.vhdx", 8 << 20, block_size=1 << 20)
    with vhdx.open(base, "r+") as d:
        d.write_at(0, random.Random(3).randbytes(8 << 20))
    if writable:
        child = vhdx.create(tmp_path / "child.avhdx", parent=base, block_size=1 << 20)
        disk = vhdx.open(child, "r+")
    else:
        disk = vhdx.open(base)
    files = [MountFile("d.raw", 0, disk.size), MountFile("d.p1.raw", 1 << 20, 3 << 20)]
    return DiskFS(disk, files, writable=writable), disk


def _fi(index: int, flags: int = os.O_RDONLY):
    from types import SimpleNamespace

    return SimpleNamespace(fh=index, flags=flags, direct_io=0, keep_cache=0)


def test_operations_read_only(tmp_path: Path) -> None:
    fs, disk = _fs_over_new_disk(tmp_path, writable=False)
    try:
        with pytest.raises(OSError) as ei:
            fs.open("/d.raw", _fi(0, os.O_RDWR))
        assert ei.value.errno == errno.EROFS
        fi = _fi(0)
        fs.open("/d.p1.raw", fi)
        assert fi.fh == 1 and fi.keep_cache == 1 and fi.direct_io == 0
        buf = bytearray(4096)
        assert fs.read_into(memoryview(buf), (3 << 20) - 100, 1) == 100  # clipped at the partition's end
        assert bytes(buf[:100]) == disk.read_at((4 << 20) - 100, 100)
        assert fs.read_into(memoryview(buf), 3 << 20, 1) == 0
        for call in (lambda: fs.write("/d.raw", b"x", 0, _fi(0)), lambda: fs.truncate("/d.raw", 0),
                     lambda: fs.fallocate("/d.raw", 0, 0, 1, _fi(0))):
            with pytest.raises(OSError) as ei:
                call()
            assert ei.value.errno == errno.EROFS
        assert fs.getattr("/d.raw")["st_blocks"] * 512 == 8 << 20
        with pytest.raises(OSError) as ei:
            fs.getattr("/nope")
        assert ei.value.errno == errno.ENOENT
    finally:
        disk.close()


def test_operations_writable(tmp_path: Path) -> None:
    import vhdx.mount as M

    fs, disk = _fs_over_new_disk(tmp_path, writable=True)
    try:
        fi = _fi(0, os.O_RDWR)
        fs.open("/d.p1.raw", fi)
        assert fi.direct_io == 1
        assert fs.getattr("/d.raw")["st_blocks"] * 512 == 8 << 20  # all from the base
        # Writes are clipped at the partition's end, then refused.
        beyond = disk.read_at(4 << 20, 1)
        assert fs.write(None, memoryview(b"ab"), (3 << 20) - 1, _fi(1)) == 1
        with pytest.raises(OSError) as ei:
            fs.write(None, memoryview(b"ab"), 3 << 20, _fi(1))
        assert ei.value.errno == errno.ENOSPC
        assert disk.read_at((4 << 20) - 1, 2) == b"a" + beyond
        # A punched hole reads zeros exactly; whole blocks inside become unmapped (no data).
        fs.fallocate("/d.raw", M.FALLOC_FL_PUNCH_HOLE | M.FALLOC_FL_KEEP_SIZE, 1000, (3 << 20) - 500, _fi(0))
        before, after = disk.read_at(0, 1000), disk.read_at((3 << 20) + 500, 1000)
        assert disk.read_at(1000, (3 << 20) - 500) == bytes((3 << 20) - 500)
        assert before != bytes(1000) and after != bytes(1000)
        kinds = {e.kind for e in disk.extents(1 << 20, 2 << 20)}
        assert kinds == {"zero"}
        fs.fallocate("/d.raw", M.FALLOC_FL_ZERO_RANGE, 5 << 20, 4096, _fi(0))
        assert disk.read_at(5 << 20, 4096) == bytes(4096)
        assert fs.fallocate("/d.raw", 0, 0, 4096, _fi(0)) == 0  # preallocation: nothing to do
        with pytest.raises(OSError) as ei:
            fs.fallocate("/d.raw", 0x08, 0, 4096, _fi(0))  # FALLOC_FL_COLLAPSE_RANGE
        assert ei.value.errno == errno.EOPNOTSUPP
        assert fs.truncate("/d.raw", 8 << 20) == 0
        with pytest.raises(OSError) as ei:
            fs.truncate("/d.raw", 0)
        assert ei.value.errno == errno.EPERM
        # st_blocks follows: two whole blocks (2 MiB) no longer hold data. (The refresh
        # is rate-limited to 10x its own cost; lift that so the test does not wait.)
        fs._blocks_every = 0.0
        assert fs.getattr("/d.raw")["st_blocks"] * 512 == (8 << 20) - (2 << 20)
        assert fs.fsync("/d.raw", 0, _fi(0)) == 0
    finally:
        disk.close()


def test_libfuse_failure_is_one_line_and_removes_the_unused_child(tmp_path: Path) -> None:
    """The server reports a failed mount (with libfuse's own message) to the waiting
    command, and a --write-to child that never served is removed."""
    if not os.path.exists("/dev/fuse"):
        pytest.skip("needs /dev/fuse")
    pytest.importorskip("mfusepy")
    import vhdx

    img = vhdx.create(tmp_path / "d.vhdx", 8 << 20)
    new = tmp_path / "w.avhdx"
    code = f"""
import os, sys
import vhdx.mount as M

def failing(mfusepy):
    def run(*args, **kwargs):
        os.write(2, b"fuse: simulated: bad mount point\\n")
        raise RuntimeError(4)
    return run

M._fuse_class = failing
from vhdx.cli import main
sys.exit(main(["mount", {str(img)!r}, {str(tmp_path)!r}, "--write-to", {str(new)!r}]))
"""
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=60, check=False)
    assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
    assert "FUSE mount failed" in p.stderr and "fuse: simulated: bad mount point" in p.stderr
    assert not new.exists()


@needs_fuse
def test_mbr_logical_partitions_get_linux_numbers(mounts: Mounts, tmp_path: Path) -> None:
    if not have("sfdisk"):
        pytest.skip("needs sfdisk")
    raw = tmp_path / "mbr.raw"
    with open(raw, "wb") as f:
        f.truncate(24 << 20)
        f.seek(0)
        f.write(random.Random(4).randbytes(24 << 20))  # every partition holds distinct data
    subprocess.run(["sfdisk", "-q", str(raw)], check=True, capture_output=True,
                   input=b"label: dos\n1 : start=2048, size=8192, type=83\n"
                         b"2 : start=10240, size=30720, type=5\n"
                         b"5 : start=12288, size=4096, type=83\n6 : start=18432, size=8192, type=7\n")
    top = raw_to_chain(raw, tmp_path, stem="mbr", depth=2)[0]
    mp = tmp_path / "mp"
    mp.mkdir()
    mounts.fuse(top, mp=mp)
    # The extended container (2) is not a file; logical ones count from 5, as /dev/sdaN would.
    assert sorted(os.listdir(mp)) == ["mbr.p1.raw", "mbr.p5.raw", "mbr.p6.raw", "mbr.raw"]
    data = raw.read_bytes()
    for name, start, sectors in (("mbr.p1.raw", 2048, 8192), ("mbr.p5.raw", 12288, 4096),
                                 ("mbr.p6.raw", 18432, 8192)):
        assert (mp / name).read_bytes() == data[start * 512:(start + sectors) * 512], name
    mounts.umount(mp)
