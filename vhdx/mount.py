"""``vhdx mount`` / ``vhdx umount``: a virtual disk and its partitions as files (FUSE).

The mount point shows ``<stem>.raw``, the whole virtual disk, and
``<stem>.p<N>.raw`` for each partition (numbered as Linux numbers them; MBR
extended containers are left out), so ``mount -o ro,loop MP/disk.p1.raw /mnt``
needs no offset arithmetic. ``st_blocks`` counts only the bytes the chain holds,
so ``du`` shows allocation.

Read-only by default (mounted ``ro``; the page cache is kept across opens since
nothing can change). ``--write-to NEW.avhdx`` first creates NEW.avhdx as a new
differencing child of IMAGE and writes only into it, through the crash-safe
writer; the files then bypass the page cache (``direct_io``), because the disk
and partition files alias the same bytes and a cached page of one would go
stale on a write through the other.

libfuse 3 through mfusepy (``pip install 'vhdx[mount]'``), imported lazily. Reads
run on libfuse's worker threads straight into libfuse's buffer
(``readinto_at``: one C call, GIL released), so they are served concurrently.
Without ``--foreground`` the command forks a server and returns once the kernel
has asked it for its first request (FUSE_INIT); the server holds a lock that
``vhdx umount`` waits on, so when that returns the image is closed (and a
written child flushed and marked clean).
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import fcntl
import hashlib
import os
import signal
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import OutputExistsError, VhdxError

__all__ = ["DiskFS", "MountFile", "mount_files", "register", "serve"]

INSTALL_HINT = "pip install 'vhdx[mount]' and libfuse3 (Debian/Ubuntu: apt install fuse3)"
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
READAHEAD_KB = 4096  # read-only mounts, see _raise_readahead
_STBLOCKS_REFRESH = 2.0  # seconds between st_blocks recomputations while written


@dataclass(frozen=True)
class MountFile:
    """One file of the mount: a window [offset, offset+length) of the virtual disk."""

    name: str
    offset: int
    length: int


def mount_files(disk: Any, stem: str, warnings: list[str] | None = None) -> list[MountFile]:
    """``<stem>.raw`` and one ``<stem>.p<N>.raw`` per partition of ``disk``.

    A partition table that cannot be read leaves only the whole disk (and a warning).
    """
    from .partitions import read_partitions

    files = [MountFile(f"{stem}.raw", 0, disk.size)]
    try:
        parts = read_partitions(disk, warnings)
    except VhdxError as e:
        if warnings is not None:
            warnings.append(f"partition table: {e}")
        parts = []
    files += [MountFile(f"{stem}.p{p.number}.raw", p.offset, p.length) for p in parts if not p.container]
    return files


def _allocated(extents: list[Any], start: int, length: int) -> int:
    """Bytes of [start, start+length) that data extents cover."""
    end = start + length
    return sum(max(0, min(end, e.offset + e.length) - max(start, e.offset))
               for e in extents if e.kind == "data")


class DiskFS:
    """FUSE operations over one disk (mfusepy's operations protocol, ``raw_fi``).

    ``disk`` is a :class:`vhdx.VirtualDisk` (read-only; ``readinto_at`` is
    thread-safe, so reads take no lock) or a :class:`vhdx.writer.WritableDisk`
    (not thread-safe: every call on it holds one lock).
    """

    use_ns = True

    def __init__(self, disk: Any, files: list[MountFile], *, writable: bool = False,
                 on_init: Callable[[], None] | None = None) -> None:
        self.disk = disk
        self.files = files
        self.by_name = {"/" + f.name: i for i, f in enumerate(files)}
        self.writable = writable
        self.on_init = on_init
        # Every call on a writable disk holds this lock; reads of a read-only one take none.
        self._write_lock = threading.Lock()
        self.lock = self._write_lock if writable else None
        top = os.stat(disk.chain[0].path)
        self._times = {"st_atime": top.st_atime_ns, "st_mtime": top.st_mtime_ns, "st_ctime": top.st_ctime_ns}
        self._uid, self._gid = os.getuid(), os.getgid()
        self._blocks: list[int] = []
        self._blocks_at = self._blocks_every = 0.0
        self._written = False
        self._refresh_blocks()

    # --- helpers -------------------------------------------------------------------
    def _refresh_blocks(self) -> None:
        t0 = time.monotonic()
        extents = self.disk.extents()
        self._blocks = [-(-_allocated(extents, f.offset, f.length) // 512) for f in self.files]
        self._blocks_at = time.monotonic()
        # The map of a huge disk takes seconds (64 TiB: ~4 s): while written, refresh
        # it at most every 10x that, so it never costs more than ~10 % of the time.
        self._blocks_every = max(_STBLOCKS_REFRESH, 10 * (self._blocks_at - t0))
        self._written = False

    def _file(self, path: str) -> int:
        try:
            return self.by_name[path]
        except KeyError:
            raise _oserror(errno.ENOENT) from None

    # --- operations ----------------------------------------------------------------
    def init_with_config(self, conn: Any, config: Any) -> None:
        if config is not None:
            # Nothing but this process changes the files: cache attributes long when
            # read-only; written, st_blocks moves, so keep it fresh.
            ttl = 1.0 if self.writable else 3600.0
            config.attr_timeout = config.entry_timeout = ttl
            config.negative_timeout = ttl
        if self.on_init is not None:
            self.on_init()

    def getattr(self, path: str, fh: Any = None) -> dict[str, int]:
        if path == "/":
            return {"st_mode": stat.S_IFDIR | (0o755 if self.writable else 0o555), "st_nlink": 2,
                    "st_uid": self._uid, "st_gid": self._gid, **self._times}
        i = self._file(path)
        if self._written and time.monotonic() - self._blocks_at > self._blocks_every:
            with self._write_lock:  # only written disks set _written
                self.disk.flush()  # commits the pending map changes the extent map reads
                self._refresh_blocks()
        f = self.files[i]
        return {"st_mode": stat.S_IFREG | (0o644 if self.writable else 0o444), "st_nlink": 1,
                "st_size": f.length, "st_blocks": self._blocks[i], "st_blksize": 1 << 20,
                "st_uid": self._uid, "st_gid": self._gid, **self._times}

    def readdir(self, path: str, fh: Any) -> list[str]:
        if path != "/":
            raise _oserror(errno.ENOTDIR)
        return [".", "..", *(f.name for f in self.files)]

    def open(self, path: str, fi: Any) -> int:
        i = self._file(path)
        if fi.flags & os.O_ACCMODE != os.O_RDONLY and not self.writable:
            raise _oserror(errno.EROFS)
        fi.fh = i
        if self.writable:
            fi.direct_io = 1  # the files alias each other: no page cache (module docstring)
        else:
            fi.keep_cache = 1  # contents never change while mounted
        return 0

    def read(self, path: str, size: int, offset: int, fi: Any) -> bytes:
        """Fallback entry (the FUSE class below reads into libfuse's buffer instead)."""
        buf = bytearray(size)
        n = self.read_into(memoryview(buf), offset, fi.fh)
        return bytes(buf[:n])

    def read_into(self, mv: memoryview, offset: int, index: int) -> int:
        f = self.files[index]
        n = min(len(mv), f.length - offset)
        if n <= 0:
            return 0
        got: int
        if self.lock is None:
            got = self.disk.readinto_at(f.offset + offset, mv[:n] if n < len(mv) else mv)
            return got
        with self.lock:
            got = self.disk.readinto_at(f.offset + offset, mv[:n])
        return got

    def write(self, path: str | None, data: Any, offset: int, fi: Any) -> int:
        if not self.writable:
            raise _oserror(errno.EROFS)
        f: MountFile = self.files[fi.fh]
        n = min(len(data), f.length - offset)
        if n <= 0:
            raise _oserror(errno.ENOSPC)
        with self._write_lock:
            self.disk.write_at(f.offset + offset, memoryview(data)[:n])
            self._written = True
        return n

    def truncate(self, path: str, length: int, fh: Any = None) -> int:
        f = self.files[self._file(path)]
        if length == f.length:
            return 0
        raise _oserror(errno.EPERM if self.writable else errno.EROFS)  # the disk has a fixed size

    def fallocate(self, path: str, mode: int, offset: int, size: int, fi: Any) -> int:
        """Preallocation is a no-op (reads never fail for lack of space); punching a
        hole or zeroing a range makes it read zeros, whole blocks without data."""
        if not self.writable:
            raise _oserror(errno.EROFS)
        f = self.files[fi.fh]
        if offset < 0 or size <= 0 or offset + size > f.length:
            raise _oserror(errno.EINVAL)
        if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            raise _oserror(errno.EOPNOTSUPP)
        if not mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            return 0
        start, end = f.offset + offset, f.offset + offset + size
        with self._write_lock:
            if mode & FALLOC_FL_PUNCH_HOLE:
                # A punched hole must read zeros: the edges get zeros written and only
                # the whole blocks inside are discarded (UNMAPPED).
                bs = self.disk.block_size
                a, b = -(-start // bs) * bs, end // bs * bs
                if a < b:
                    self.disk.write_zeroes_at(a, b - a, discard=True)
                    for lo, hi in ((start, a), (b, end)):
                        if lo < hi:
                            self.disk.write_zeroes_at(lo, hi - lo)
                else:
                    self.disk.write_zeroes_at(start, end - start)
            else:
                self.disk.write_zeroes_at(start, end - start)
            self._written = True
        return 0

    def fsync(self, path: str, datasync: int, fi: Any) -> int:
        if self.writable:
            with self._write_lock:
                self.disk.flush()
        return 0

    def flush(self, path: str, fi: Any) -> int:
        return 0  # close() of a file; durability is fsync's job and the unmount's

    def statfs(self, path: str) -> dict[str, int]:
        total = self.files[0].length
        used = self._blocks[0] * 512
        return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": total // 4096,
                "f_bfree": max(0, total - used) // 4096 if self.writable else 0,
                "f_bavail": max(0, total - used) // 4096 if self.writable else 0,
                "f_files": len(self.files) + 1, "f_ffree": 0, "f_namemax": 255}


def _oserror(code: int) -> OSError:
    return OSError(code, os.strerror(code))


# --- libfuse through mfusepy ------------------------------------------------------------
_FUSE_CLASS: Any = None


def load_fuse() -> Any:
    """mfusepy over libfuse3 (preferred to libfuse2 when both are installed), or a
    VhdxError naming what to install."""
    if "mfusepy" not in sys.modules and "FUSE_LIBRARY_NAME" not in os.environ:
        from ctypes.util import find_library

        if find_library("fuse3"):
            os.environ["FUSE_LIBRARY_NAME"] = "fuse3"  # mfusepy would pick libfuse2 first
    try:
        import mfusepy
    except ImportError:
        raise VhdxError(f"vhdx mount needs mfusepy: {INSTALL_HINT}") from None
    except (OSError, AttributeError) as e:  # no usable libfuse shared library
        raise VhdxError(f"vhdx mount needs libfuse ({e}): {INSTALL_HINT}") from None
    return mfusepy


def _fuse_class(mfusepy: Any) -> Any:
    """mfusepy.FUSE whose read and write hand our operations libfuse's own buffer
    (mfusepy would copy through a bytes object both ways)."""
    global _FUSE_CLASS
    if _FUSE_CLASS is None:
        class _FUSE(mfusepy.FUSE):  # type: ignore[misc]  # mfusepy has no stubs: FUSE is Any
            def read(self, path: Any, buf: Any, size: int, offset: int, fip: Any) -> int:
                if not size:
                    return 0
                mv = memoryview((ctypes.c_ubyte * size).from_address(ctypes.addressof(buf.contents))).cast("B")
                ops: DiskFS = self.operations
                return ops.read_into(mv, offset, fip.contents.fh)

            def write(self, path: Any, buf: Any, size: int, offset: int, fip: Any) -> int:
                if not size:
                    return 0
                mv = memoryview((ctypes.c_ubyte * size).from_address(ctypes.addressof(buf.contents))).cast("B")
                ops: DiskFS = self.operations
                return ops.write(None, mv, offset, fip.contents)

            def _wrapper(self, func: Any, *args: Any, **kwargs: Any) -> Any:
                # A damaged image or a failed read is EIO to the reader, not a
                # logged traceback (mfusepy logs any other exception as EINVAL).
                return super()._wrapper(_eio(func), *args, **kwargs)

        _FUSE_CLASS = _FUSE
    return _FUSE_CLASS


def _eio(func: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (VhdxError, ValueError):  # ValueError: the disk was closed under a late request
            raise _oserror(errno.EIO) from None

    call.__name__ = func.__name__  # mfusepy tells init and getattr apart by name
    return call


def _escape_option(value: str) -> str:
    return value.replace("\\", "\\\\").replace(",", "\\,")


def serve(disk: Any, mountpoint: str, stem: str, *, writable: bool = False, allow_other: bool = False,
          on_ready: Callable[[], None] | None = None, warnings: list[str] | None = None) -> None:
    """Mount ``disk`` at ``mountpoint`` and serve it until unmounted (``fusermount3 -u``,
    SIGINT, SIGTERM, SIGHUP); blocks. ``on_ready`` runs once the kernel talks to us
    (FUSE_INIT); a failure before that raises VhdxError."""
    mfusepy = load_fuse()
    started = threading.Event()

    def after_init() -> None:
        if not writable:
            _raise_readahead(mountpoint)
        if on_ready is not None:
            on_ready()

    def init() -> None:
        started.set()
        # Off this thread: INIT must be answered before the mount point can be stat'ed.
        threading.Thread(target=after_init, name="vhdx-mount-ready", daemon=True).start()

    fs = DiskFS(disk, mount_files(disk, stem, warnings), writable=writable, on_init=init)
    opts: dict[str, Any] = {"fsname": _escape_option(os.path.abspath(disk.chain[0].path)),
                            "subtype": "vhdx", "default_permissions": True}
    if not writable:
        opts["ro"] = True
    if allow_other:
        opts["allow_other"] = True
    if (mfusepy.fuse_version_major, mfusepy.fuse_version_minor) >= (3, 12):
        # libfuse 3.12-3.14 warn about their own "unlimited" default on every start.
        opts["max_idle_threads"] = 10
    try:
        _fuse_class(mfusepy)(fs, mountpoint, foreground=True, raw_fi=True, **opts)
    except RuntimeError as e:
        # fuse_main_real reports a loop that ended with an error as non-zero (7 or
        # 8 by version), which is how a stop by SIGINT/SIGTERM/SIGHUP (handled by
        # libfuse) ends it too: once serving, that is a stop, not a failure.
        if not started.is_set():
            status = e.args[0] if e.args else None
            raise VhdxError(f"{mountpoint}: FUSE mount failed (libfuse status {status})") from None


def _raise_readahead(mountpoint: str) -> None:
    """Let the kernel read ahead :data:`READAHEAD_KB` on this mount (where allowed).

    FUSE mounts start at 128 KiB of readahead, so a cached sequential read goes
    out in 128 KiB requests, one Python call each; 4 MiB lets the kernel send its
    largest requests and keep several in flight on libfuse's worker threads
    (bench/bench_mount.py). Needs root (the bdi's sysfs file); otherwise a no-op.
    """
    try:
        dev = os.stat(mountpoint).st_dev
        with open(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb", "w") as fh:
            fh.write(str(READAHEAD_KB))
    except OSError:
        pass


# --- the lock `vhdx umount` waits on -------------------------------------------------------
def _lock_path(mountpoint: str) -> str:
    d = os.path.join(tempfile.gettempdir(), f"vhdx-mount-{os.getuid()}")
    os.makedirs(d, mode=0o700, exist_ok=True)
    st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        # A shared /tmp: someone else's directory (or a symlink) must not get our locks.
        raise VhdxError(f"{d}: not a private directory of this user; remove it")
    key = hashlib.sha256(os.path.realpath(mountpoint).encode("utf-8", "surrogateescape")).hexdigest()[:24]
    return os.path.join(d, key + ".lock")


def _hold_lock(mountpoint: str) -> int:
    fd = os.open(_lock_path(mountpoint), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise VhdxError(f"{mountpoint}: another vhdx mount is still serving this mount point") from None
    return fd


def _wait_for_server(mountpoint: str, timeout: float) -> bool:
    """True once no server holds the mount point's lock (or none ever did)."""
    path = _lock_path(mountpoint)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.05)
    finally:
        os.close(fd)


def fuse_mounts() -> dict[str, str]:
    """Mount point -> file system type of every FUSE mount (from /proc/self/mountinfo)."""
    out: dict[str, str] = {}
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as fh:
            for line in fh:
                left, _, right = line.partition(" - ")
                fields = left.split()
                fstype = right.split(" ", 1)[0]
                if len(fields) > 4 and fstype.startswith("fuse"):
                    out[_unescape_mountinfo(fields[4])] = fstype
    except OSError:
        pass
    return out


def _unescape_mountinfo(s: str) -> str:
    import re

    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


# --- CLI ------------------------------------------------------------------------------
def _open_for_mount(args: argparse.Namespace) -> Any:
    from .formats import open as open_disk

    chain_kw = {"parents": args.parent, "search_dirs": args.search_dir, "ignore_linkage": args.ignore_linkage}
    if not args.write_to:
        return open_disk(args.image, **chain_kw)
    from .formats import create

    new = args.write_to
    if os.path.exists(new):
        raise OutputExistsError(os.fspath(new), "already exists (--write-to makes a new differencing child)")
    # Check the whole chain opens before anything is created.
    open_disk(args.image, **chain_kw).close()
    create(new, parent=args.image)
    try:
        return open_disk(new, "r+", parents=[os.path.abspath(args.image), *args.parent],
                         search_dirs=args.search_dir, ignore_linkage=args.ignore_linkage)
    except BaseException:
        os.unlink(new)
        raise


def _check_mountpoint(mp: str) -> None:
    if not os.path.isdir(mp):
        raise VhdxError(f"{mp}: mount point is not a directory")
    if os.path.realpath(mp) in fuse_mounts():
        raise VhdxError(f"{mp}: something is already mounted there")
    if not os.path.exists("/dev/fuse"):
        raise VhdxError(f"/dev/fuse: missing (load the fuse kernel module; {INSTALL_HINT})")


def _error_text(e: BaseException) -> str:
    if isinstance(e, OSError) and not isinstance(e, VhdxError):
        where = f"{e.filename}: " if e.filename else ""
        return f"{where}{e.strerror or e}"
    return str(e)


def _run_server(args: argparse.Namespace, on_ready: Callable[[], None], warnings: list[str]) -> None:
    """Open, mount, serve until unmounted, close."""
    load_fuse()  # fail before anything is created
    lock_fd = _hold_lock(args.mountpoint)
    try:
        disk = _open_for_mount(args)
        ready = threading.Event()

        def started() -> None:
            ready.set()
            on_ready()

        sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        saved = {sig: signal.getsignal(sig) for sig in sigs}
        try:
            for sig in sigs:
                signal.signal(sig, signal.SIG_DFL)  # libfuse handles only default dispositions
            serve(disk, args.mountpoint, Path(args.image).stem, writable=bool(args.write_to),
                  allow_other=args.allow_other, on_ready=started, warnings=warnings)
        finally:
            for sig in sigs:  # a second Ctrl-C must not cut the close (the writer's final flush) short
                signal.signal(sig, signal.SIG_IGN)
            try:
                disk.close()  # a written child: flushed, its log marked clean
                if args.write_to and not ready.is_set():
                    os.unlink(args.write_to)  # never served: nothing was written to it
            finally:
                for sig, handler in saved.items():
                    signal.signal(sig, handler)
    finally:
        os.close(lock_fd)


def cmd_mount(args: argparse.Namespace) -> int:
    _check_mountpoint(args.mountpoint)
    warnings: list[str] = []
    if args.foreground:
        def ready() -> None:
            for w in warnings:
                print(f"vhdx: warning: {w}", file=sys.stderr)
            print(f"vhdx: serving {args.image} at {args.mountpoint} (Ctrl-C or vhdx umount to stop)",
                  file=sys.stderr)

        _run_server(args, ready, warnings)
        return 0
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the server
        os.close(r)
        _daemon_child(args, w, warnings)  # never returns
    os.close(w)
    msg = b""
    while chunk := os.read(r, 65536):
        msg += chunk
    os.close(r)
    text = msg.decode("utf-8", "replace")
    if text.startswith("ok\n"):
        for line in text[3:].splitlines():
            print(f"vhdx: warning: {line}", file=sys.stderr)
        return 0
    os.waitpid(pid, 0)
    raise VhdxError(text.strip() or f"{args.mountpoint}: the mount server exited before the mount was ready")


def _daemon_child(args: argparse.Namespace, w: int, warnings: list[str]) -> None:
    code = 1
    try:
        os.setsid()
        # A server must not keep its caller's directory busy: paths made absolute first.
        for name in ("image", "mountpoint", "write_to"):
            if getattr(args, name):
                setattr(args, name, os.path.abspath(getattr(args, name)))
        args.parent = [os.path.abspath(x) for x in args.parent]
        args.search_dir = [os.path.abspath(x) for x in args.search_dir]
        os.chdir("/")
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        # Until the mount is ready, libfuse's own messages (fusermount3 refusing
        # allow_other, say) are kept to report them; afterwards they go nowhere.
        errlog = tempfile.TemporaryFile()  # noqa: SIM115 - lives until os._exit
        os.dup2(errlog.fileno(), 2)
        told = []

        def ready() -> None:
            os.dup2(devnull, 2)
            os.write(w, ("ok\n" + "".join(x + "\n" for x in warnings)).encode())
            os.close(w)
            told.append(True)

        try:
            _run_server(args, ready, warnings)
            code = 0
        except BaseException as e:  # noqa: BLE001 - reported to the waiting parent
            if not told:
                errlog.seek(0)
                lines = [x for x in errlog.read().decode("utf-8", "replace").splitlines() if x.strip()]
                text = _error_text(e) + (f" ({lines[-1].strip()})" if lines else "")
                os.write(w, text.encode())
    finally:
        os._exit(code)


def cmd_umount(args: argparse.Namespace) -> int:
    import shutil
    import subprocess

    mp = args.mountpoint
    real = os.path.realpath(mp)
    fstype = fuse_mounts().get(real)
    if fstype is None:
        raise VhdxError(f"{mp}: not a FUSE mount point")
    if fstype != "fuse.vhdx":
        raise VhdxError(f"{mp}: mounted by something else ({fstype}), not vhdx mount")
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    cmd = [tool, "-u", real] if tool else ["umount", real]
    p = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if p.returncode:
        why = (p.stderr.strip().splitlines() or [f"{cmd[0]} failed"])[-1]
        raise VhdxError(f"{mp}: unmount failed: {why}")
    if not _wait_for_server(real, args.timeout):
        raise VhdxError(f"{mp}: unmounted, but the server has not finished closing the image "
                        f"after {args.timeout:g} s")
    return 0


def register(subparsers: Any, chain_options: Callable[[argparse.ArgumentParser], None]) -> None:
    p = subparsers.add_parser("mount", help="show the virtual disk and its partitions as files (FUSE)")
    chain_options(p)
    p.add_argument("mountpoint", help="an existing directory")
    p.add_argument("--write-to", metavar="NEW.avhdx",
                   help="make the files writable: every write goes to this new differencing child of IMAGE")
    p.add_argument("-f", "--foreground", action="store_true", help="serve in the foreground until unmounted")
    p.add_argument("--allow-other", action="store_true", help="let other users see the files (FUSE allow_other)")
    p.set_defaults(func=cmd_mount)
    u = subparsers.add_parser("umount", help="unmount a vhdx mount and wait until the image is closed")
    u.add_argument("mountpoint")
    u.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                   help="how long to wait for the server to close the image (default 60)")
    u.set_defaults(func=cmd_umount)
