"""Convert a raw image or any VHDX/AVHDX chain into a new standalone VHDX or a raw image.

Sparse and fast: only data is read (``VirtualDisk.extents()`` for VHDX sources,
``SEEK_DATA``/``SEEK_HOLE`` for raw files), in large chunks; all-zero 1 MiB
pieces are never written, so all-zero blocks stay unallocated (NOT_PRESENT in a
dynamic output, sparse holes inside a fixed one or a raw file). A file output is
built in a temporary file that nobody can plant (:mod:`vhdx.fileio`), through
:class:`vhdx.writer.WritableDisk` for VHDX (payload in place, BAT changes
committed in large batches through the log), and renamed over the output only
once complete and flushed. A raw output can also be a block device (written in
place, holes zeroed) or ``-`` (stdout, every byte in order). Sources are opened
read-only; a raw source can be a block device (P2V).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from . import structures as S
from . import fileio
from .fdio import data_extents, pwrite_all, zero_range
from .create import plan_new
from .errors import InvalidArgumentError, UsageError, VhdxIOError
from .errors import converts_os_errors
from .layout import write_new_image
from .storage import DeferredSyncStorage

if TYPE_CHECKING:
    from .disk import VirtualDisk

__all__ = ["convert", "check_output", "convert_to_vhdx", "convert_to_raw", "open_source", "Source",
           "is_vhdx_file", "raw_data_ranges", "output_format", "refuse_self"]

CHUNK = 32 * S.MiB
PIECE = S.MiB  # zero-detection granularity (the file-allocation unit)
_ZERO_PIECE = bytes(PIECE)

PathLike = str | os.PathLike[str]
ProgressFn = Callable[[int, int], object]  # (bytes done, bytes in all)
ParentArg = Any  # a path or a readable file object, as vhdx.open takes them
FileRanges = list[tuple[int, str, list[tuple[int, int, int]]]]  # (fd, path, [(file offset, virtual offset, length)])


def is_vhdx_file(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` (a file or block device) starts with the VHDX signature."""
    fd, _ = fileio.open_source(path)
    try:
        return os.pread(fd, 8, 0) == S.SIG_FILE
    finally:
        os.close(fd)


def raw_data_ranges(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of the data of a raw file, holes skipped where the OS tells
    (the whole file where it cannot)."""
    try:
        extents = data_extents(fd, 0, size)
    except OSError:  # no SEEK_DATA here, or a file system that cannot tell holes
        extents = [(0, size)]
    for lo, hi in extents:
        yield lo, hi - lo


def _chunks(ranges: Iterator[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """(offset, length) pieces of at most CHUNK, aligned to PIECE after the first."""
    for start, length in ranges:
        pos, end = start, start + length
        while pos < end:
            n = min(CHUNK - pos % PIECE, end - pos)
            yield pos, n
            pos += n


def _copy(ranges: Iterator[tuple[int, int]], readinto: Callable[[int, memoryview], int],
          write: Callable[[int, memoryview], object],
          progress: Callable[[int, int], object] | None, total: int = 0) -> None:
    """Read ahead in a thread (reads release the GIL) while this thread checks for
    zeros and writes: reading and writing overlap, as with two queues in a pipeline."""
    import queue
    import threading

    free: queue.Queue[bytearray] = queue.Queue()
    full: queue.Queue[tuple[int, bytearray, int] | BaseException | None] = queue.Queue()
    # Buffers no larger than the data: a sparse disk holding 1 MiB copies with
    # 1 MiB buffers, not 3 x CHUNK (every piece lies inside the data, so fits).
    size = min(CHUNK, -(-total // PIECE) * PIECE) if total > 0 else CHUNK
    for _ in range(3):
        free.put(bytearray(size))
    stop = threading.Event()

    def reader() -> None:
        try:
            for pos, n in _chunks(ranges):
                buf = free.get()
                if stop.is_set():
                    return
                got = readinto(pos, memoryview(buf)[:n])
                full.put((pos, buf, got))
                if got < n:
                    break
            full.put(None)
        except BaseException as e:  # noqa: BLE001 - handed to the writer thread
            full.put(e)

    t = threading.Thread(target=reader, name="vhdx-convert-reader", daemon=True)
    t.start()
    done = 0
    try:
        while True:
            item = full.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            pos, buf, got = item
            mv = memoryview(buf)
            run_lo = None
            p = 0
            while p < got:  # write maximal runs of non-zero pieces
                q = min(got, p + PIECE - (pos + p) % PIECE)
                nonzero = buf.count(0, p, q) != q - p if buf[p] == 0 else True
                if nonzero and run_lo is None:
                    run_lo = p
                elif not nonzero and run_lo is not None:
                    write(pos + run_lo, mv[run_lo:p])
                    run_lo = None
                p = q
            if run_lo is not None:
                write(pos + run_lo, mv[run_lo:got])
            del mv
            free.put(buf)
            done += got
            if progress:
                progress(done, total)
    finally:
        stop.set()
        free.put(bytearray(0))  # unblock the reader if it waits for a buffer
        t.join()


# Output formats by file name; others are refused rather than written as raw bytes
# under a misleading name (qemu-img would then misread the file).
_EXTENSIONS = {".raw": "raw", ".img": "raw", ".bin": "raw", ".dd": "raw",
               ".vhdx": "vhdx", ".avhdx": "vhdx", ".vhd": "vhd", ".avhd": "vhd"}
_FOREIGN = {".qcow2": "QCOW2", ".qcow": "QCOW", ".vmdk": "VMDK", ".vdi": "VDI", ".qed": "QED"}
FORMATS = ("raw", "vhdx", "vhd")


def output_format(output: str, fmt: str | None = None) -> str:
    """The output format: ``fmt`` when given, else from the name (``-`` and block
    devices are raw). Unknown or foreign names raise :class:`UsageError`."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise UsageError(f"{output}: unknown format {fmt!r} (use raw, vhdx or vhd)")
        return fmt
    if output == "-":
        return "raw"
    ext = os.path.splitext(output)[1].lower()
    if ext in _EXTENSIONS:
        return _EXTENSIONS[ext]
    try:
        import stat

        if stat.S_ISBLK(os.stat(output).st_mode):
            return "raw"
    except OSError:
        pass
    if ext in _FOREIGN:
        raise UsageError(
            f"{output}: {_FOREIGN[ext]} output is not supported; serve the disk with 'vhdx serve' "
            f"and convert from its NBD address with 'qemu-img convert -O {ext[1:]}'")
    raise UsageError(f"{output}: cannot tell the output format from the name; "
                     "use --format raw, vhdx or vhd (or a .raw/.img, .vhdx or .vhd name)")


def check_output(output: str | os.PathLike[str], fmt: str | None = None, *, type: str | None = None,  # noqa: A002
                 block_size: int | str | None = None, azure: bool = False, force: bool = False) -> str:
    """The output's format (:func:`output_format`), after refusing what cannot be
    written, before the (maybe long) open of the source: a non-raw format to
    stdout (``-``), ``type``/``block_size`` for a raw output, ``azure`` for
    anything but VHD, and a wrong or existing target (:func:`fileio.inspect_output`)."""
    out = os.fspath(output)
    fmt = output_format(out, fmt)
    if out == "-" and fmt != "raw":
        raise UsageError(f"-: only raw bytes can be streamed to stdout, not {fmt.upper()}")
    if fmt == "raw" and (type or block_size):
        raise UsageError(f"{out}: --type and --block-size apply to VHDX and VHD outputs only")
    if azure and fmt != "vhd":
        raise UsageError(f"{out}: --azure makes a VHD; name the output .vhd or use --format vhd")
    if out != "-":
        fileio.inspect_output(out, force=force, allow_block=fmt == "raw")
    return fmt


class Source:
    """What a conversion reads: a VHDX/AVHDX chain, a raw file or a block device."""

    def __init__(self, path: str, size: int, lss: int, pss: int, ranges: list[tuple[int, int]],
                 readinto: Callable[[int, memoryview], int], warnings: list[str],
                 files: list[str], closer: Callable[[], None],
                 file_ranges: Callable[[], "FileRanges | None"] | None = None) -> None:
        self.path, self.size = path, size
        self.logical_sector_size, self.physical_sector_size = lss, pss
        self.ranges = ranges  # (offset, length) of the data; the rest reads zeros
        self.readinto = readinto
        self.warnings = warnings
        self.files = files  # every file read (to refuse writing over one of them)
        self._closer = closer
        self._file_ranges = file_ranges

    def file_ranges(self) -> "FileRanges | None":
        """Where the data lies in the files read: (fd, path, [(file offset,
        virtual offset, length)]) per file, for a file-to-file copy (copy_file_range,
        reflink); None when reads must go through :attr:`readinto` (a replayed
        log patches them in memory; a block device, whose zeros the reader
        leaves as holes)."""
        return self._file_ranges() if self._file_ranges else None

    @property
    def data_bytes(self) -> int:
        return sum(n for _, n in self.ranges)

    def close(self) -> None:
        self._closer()

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def disk_source(path: str, disk: VirtualDisk) -> Source:
    """A :class:`Source` reading an open disk (any format); closing it closes the disk."""
    try:
        extents = [e for e in disk.extents() if e.kind == "data"]
    except BaseException:
        disk.close()
        raise

    def file_ranges() -> FileRanges | None:
        by_file: dict[int, list[tuple[int, int, int]]] = {}
        for e in extents:
            if e.source is None or e.file_offset is None:
                return None
            f = disk.chain[e.source]
            if getattr(f, "overlay", None) or getattr(f, "fd", -1) < 0:
                return None
            by_file.setdefault(e.source, []).append((e.file_offset, e.offset, e.length))
        return [(disk.chain[i].fd, disk.chain[i].path, rs) for i, rs in by_file.items()]

    return Source(path, disk.size, disk.logical_sector_size, disk.physical_sector_size,
                  [(e.offset, e.length) for e in extents], disk.readinto_at, list(disk.warnings),
                  [f.path for f in disk.chain], disk.close, file_ranges)


# Formats built above this layer (vhdx/vhd/) open their files as a Source through
# this hook rather than by an upward import: vhdx.formats registers itself when
# the package is imported, so ``convert_to_raw(x.vhd, ...)`` reads the VHD chain
# instead of copying the container's bytes as if it were a raw image.
SOURCE_OPENERS: list[Callable[..., "Source | None"]] = []


def open_source(source: PathLike, *, parents: Sequence[ParentArg] | None = None,
                search_dirs: Sequence[PathLike] = (), ignore_linkage: bool = False,
                ignore_checksums: bool = False) -> Source:
    """Open ``source`` read-only for a conversion (VHDX chain, raw file or block
    device; formats above this layer, VHD, through :data:`SOURCE_OPENERS`;
    ``ignore_checksums`` is for those)."""
    from .disk import open as open_disk

    path = os.fspath(source)
    fd, size = fileio.open_source(path)
    try:
        vhdx_sig = os.pread(fd, 8, 0) == S.SIG_FILE
    except OSError as e:
        os.close(fd)
        raise VhdxIOError.from_os(e, path, "read failed") from None
    if vhdx_sig:
        os.close(fd)
        return disk_source(path, open_disk(path, parents=parents, search_dirs=search_dirs,
                                           ignore_linkage=ignore_linkage))
    for opener in SOURCE_OPENERS:
        other = opener(path, parents=parents, search_dirs=search_dirs, ignore_linkage=ignore_linkage,
                       ignore_checksums=ignore_checksums)
        if other is not None:
            os.close(fd)
            return other
    try:
        if parents:
            raise UsageError(f"{path}: a raw image has no parents (--parent applies to VHDX sources)")
        if size == 0:
            raise InvalidArgumentError(f"{path}: empty file")
        import stat

        device = stat.S_ISBLK(os.fstat(fd).st_mode)
        if device:
            # SEEK_DATA on a device node says nothing true about its contents
            # (Linux reports it as all hole): read it all; zero pieces stay sparse.
            ranges = [(0, size)]
        else:
            ranges = list(raw_data_ranges(fd, size))
    except BaseException:
        os.close(fd)
        raise

    def readinto(off: int, mv: memoryview, _fd: int = fd) -> int:
        try:
            return os.preadv(_fd, [mv], off)
        except OSError as e:
            raise VhdxIOError.from_os(e, path, f"read failed at {off:#x}") from None

    # A device is copied through the reader, whose all-zero pieces stay holes;
    # a file copies file to file (its holes are already left out of ``ranges``).
    return Source(path, -(-size // 512) * 512, 512, 4096, ranges, readinto, [], [path],
                  lambda: os.close(fd), None if device else lambda: [(fd, path, [(o, o, n) for o, n in ranges])])


def refuse_self(output: str, src: Source) -> None:
    """Refuse an output that is one of the files the source reads."""
    if not os.path.exists(output):
        return
    for f in src.files:
        if os.path.samefile(output, f):
            raise InvalidArgumentError(f"{output}: is part of the source being read")


@converts_os_errors
def convert_to_vhdx(source: PathLike | Source, output: PathLike, *,
                    type: str = "dynamic", block_size: int | None = None,  # noqa: A002
                    parents: Sequence[ParentArg] | None = None, search_dirs: Sequence[PathLike] = (),
                    ignore_linkage: bool = False, force: bool = False,
                    progress: ProgressFn | None = None, ignore_checksums: bool = False) -> str:
    """Write ``source`` (raw file, block device, VHDX/AVHDX or VHD/AVHD chain, or an open
    :class:`Source`) as a new standalone VHDX at ``output``; returns ``output``.

    A raw source whose size is not a multiple of 512 is padded with zeros to the
    next sector. ``output`` must be a regular file (or not exist yet).
    """
    from .writer import WritableDisk

    output = os.fspath(output)
    target = fileio.inspect_output(output, force=force, allow_block=False)
    own = not isinstance(source, Source)
    src = source if isinstance(source, Source) else open_source(
        source, parents=parents, search_dirs=search_dirs, ignore_linkage=ignore_linkage,
        ignore_checksums=ignore_checksums)
    try:
        refuse_self(target.path, src)
        plan = plan_new(output, src.size, type=type, block_size=block_size,
                        logical_sector_size=src.logical_sector_size,
                        physical_sector_size=src.physical_sector_size)
        # Upper bound of the growth: a fixed disk's whole file (its payload is laid
        # out up front, as Hyper-V allocates it); for a dynamic one, the source's
        # data rounded to whole blocks plus the new file's own structures.
        bs = plan.block_size
        blocks = sum(-(-(o + n) // bs) - o // bs for o, n in src.ranges)
        needed = plan.file_size if type == "fixed" else plan.file_size + blocks * bs
        fileio.check_free_space(output, needed, "the new VHDX")
        fd, tmp = fileio.create_temp(output)
        storage = None
        try:
            with os.fdopen(os.dup(fd), "w+b") as fh:
                write_new_image(fh, plan)
            # Invisible until renamed: one fsync before the rename stands for every
            # intermediate flush (see DeferredSyncStorage).
            storage = DeferredSyncStorage(fd)
            storage.path = output  # messages name the output, not the hidden temp
            fd = -1  # the storage owns it now
            with WritableDisk(tmp, storage=storage) as out:
                _copy(iter(src.ranges), src.readinto, out.write_at, progress, src.data_bytes)
                out.flush()
                out.log.close()
                storage.sync()
            storage.close()  # passed in, so the writer leaves it open (and locked)
            storage = None
        except BaseException:
            if storage is not None:
                storage.close()
            if fd >= 0:
                os.close(fd)
            fileio.discard_temp(tmp)
            raise
        fileio.commit_temp(tmp, output)
    finally:
        if own:
            src.close()
    return output


def _write_fd(fd: int, name: str) -> Callable[[int, memoryview], None]:
    def write(off: int, data: memoryview) -> None:
        pwrite_all(fd, data, off, name)
    return write


@converts_os_errors
def convert_to_raw(source: PathLike | Source, output: PathLike, *,
                   parents: Sequence[ParentArg] | None = None, search_dirs: Sequence[PathLike] = (),
                   ignore_linkage: bool = False, force: bool = False,
                   progress: ProgressFn | None = None, ignore_checksums: bool = False) -> str:
    """Write ``source`` as a raw image to ``output``: a sparse regular file, a block
    device (written in place, holes zeroed; ``force`` needed) or ``"-"`` (stdout)."""
    output = os.fspath(output)
    own = not isinstance(source, Source)
    if output == "-":
        target = fileio.Target("-", "stdout")
        if os.isatty(1):
            raise UsageError("-: refusing to write a disk image to a terminal; redirect or pipe stdout")
    else:
        target = fileio.inspect_output(output, force=force)
    src = source if isinstance(source, Source) else open_source(
        source, parents=parents, search_dirs=search_dirs, ignore_linkage=ignore_linkage,
        ignore_checksums=ignore_checksums)
    try:
        if target.kind == "stdout":
            _stream(src, progress)
        elif target.kind == "block":
            refuse_self(output, src)
            _to_block_device(src, output, progress)
        else:
            refuse_self(output, src)
            fileio.check_free_space(output, src.data_bytes, "the raw image")
            fd, tmp = fileio.create_temp(output)
            try:
                _copy(iter(src.ranges), src.readinto, _write_fd(fd, output), progress, src.data_bytes)
                try:
                    os.ftruncate(fd, src.size)
                    os.fsync(fd)
                except OSError as e:
                    raise VhdxIOError.from_os(e, output, "write failed") from None
            except BaseException:
                os.close(fd)
                fileio.discard_temp(tmp)
                raise
            os.close(fd)
            fileio.commit_temp(tmp, output)
    finally:
        if own:
            src.close()
    return output


def _to_block_device(src: Source, path: str, progress: Callable[[int, int], object] | None) -> None:
    fd = fileio.open_block_device(path, src.size)
    try:
        written: list[tuple[int, int]] = []
        write = _write_fd(fd, path)

        def record(off: int, data: memoryview) -> None:
            write(off, data)
            written.append((off, len(data)))

        _copy(iter(src.ranges), src.readinto, record, progress, src.data_bytes)
        # What was not written (holes, all-zero pieces) must read zeros: the device
        # holds whatever was there before.
        zeros = bytes(PIECE)
        pos = 0
        try:
            for off, n in written + [(src.size, 0)]:
                zero_range(fd, pos, off - pos, zeros)
                pos = off + n
            os.fsync(fd)
        except OSError as e:
            raise VhdxIOError.from_os(e, path, "write failed") from None
    finally:
        os.close(fd)


def _stream(src: Source, progress: Callable[[int, int], object] | None) -> None:
    """Every byte in order to stdout (a pipe cannot seek over holes)."""
    raw = os.fdopen(os.dup(1), "wb", buffering=0)

    class _All:  # a raw write may be short (a signal, a non-blocking pipe): loop
        @staticmethod
        def write(data: memoryview) -> None:
            while len(data):
                n = raw.write(data)
                data = data[n or 0:]

        close = staticmethod(raw.close)

    out = _All()
    buf = bytearray(CHUNK)
    mv = memoryview(buf)
    zeros = memoryview(bytes(CHUNK))
    try:
        pos = 0
        for off, n in src.ranges + [(src.size, 0)]:
            while pos < off:  # a hole
                k = min(CHUNK, off - pos)
                out.write(zeros[:k])
                pos += k
            end = off + n
            while pos < end:
                k = src.readinto(pos, mv[:min(CHUNK, end - pos)])
                if k <= 0:
                    break
                out.write(mv[:k])
                pos += k
            if progress:
                progress(pos, src.size)
    finally:
        del mv
        out.close()


def convert(source: str | os.PathLike[str] | Source, output: str | os.PathLike[str], *,
            format: str | None = None, type: str | None = None,  # noqa: A002
            block_size: int | None = None, parents: Sequence[ParentArg] | None = None,
            search_dirs: Sequence[PathLike] = (), ignore_linkage: bool = False,
            ignore_checksums: bool = False, force: bool = False,
            progress: ProgressFn | None = None) -> str:
    """Write ``source`` to ``output`` as a raw image or a VHDX, the format named by
    ``format`` or told by the output's name (:func:`check_output`; ``-`` streams
    raw bytes to stdout). VHD outputs are written by
    :func:`vhdx.vhd.convert.convert_to_vhd`; here they raise :class:`UsageError`."""
    out = os.fspath(output)
    fmt = check_output(out, format, type=type, block_size=block_size, force=force)
    if fmt == "vhd":
        raise UsageError(f"{out}: VHD outputs are written by vhdx.vhd.convert.convert_to_vhd")
    if fmt == "vhdx":
        return convert_to_vhdx(source, out, type=type or "dynamic", block_size=block_size, parents=parents,
                               search_dirs=search_dirs, ignore_linkage=ignore_linkage, force=force,
                               progress=progress, ignore_checksums=ignore_checksums)
    return convert_to_raw(source, out, parents=parents, search_dirs=search_dirs,
                          ignore_linkage=ignore_linkage, force=force, progress=progress,
                          ignore_checksums=ignore_checksums)
