"""Convert a raw image or any VHDX/AVHDX chain into a new standalone VHDX.

Sparse and fast: only data is read (``VirtualDisk.extents()`` for VHDX sources,
``SEEK_DATA``/``SEEK_HOLE`` for raw files), in large chunks; all-zero 1 MiB
pieces are never written, so all-zero blocks stay unallocated (NOT_PRESENT in a
dynamic output, sparse holes inside a fixed one). The output is built as
``OUT.part`` through :class:`vhdx.writer.WritableDisk` (payload in place, BAT
changes committed in large batches through the log) and renamed over ``OUT``
only once complete and flushed. Sources are opened read-only.
"""

from __future__ import annotations

import os
from typing import Callable, Iterator

from . import structures as S
from .create import create
from .errors import InvalidArgumentError, VhdxError
from .storage import DeferredSyncStorage, fsync_dir
from .vhd.file import is_vhd_file

__all__ = ["convert_to_vhdx", "is_vhdx_file", "raw_data_ranges"]

CHUNK = 32 * S.MiB
PIECE = S.MiB  # zero-detection granularity (the file-allocation unit)
_ZERO_PIECE = bytes(PIECE)


def is_vhdx_file(path: str | os.PathLike[str]) -> bool:
    with open(path, "rb") as fh:
        return fh.read(8) == S.SIG_FILE


def raw_data_ranges(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of the data of a raw file, holes skipped where the OS tells."""
    seek_data, seek_hole = getattr(os, "SEEK_DATA", None), getattr(os, "SEEK_HOLE", None)
    if seek_data is None:
        yield 0, size
        return
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, seek_data)
        except OSError:  # ENXIO: no data after pos
            return
        if start >= size:
            return
        end = min(size, os.lseek(fd, start, seek_hole))
        yield start, end - start
        pos = end


def _chunks(ranges: Iterator[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """(offset, length) pieces of at most CHUNK, aligned to PIECE after the first."""
    for start, length in ranges:
        pos, end = start, start + length
        while pos < end:
            n = min(CHUNK - pos % PIECE, end - pos)
            yield pos, n
            pos += n


def _copy(ranges: Iterator[tuple[int, int]], readinto: Callable[[int, memoryview], int],
          write: Callable[[int, memoryview], None], progress: Callable[[int], None] | None) -> None:
    """Read ahead in a thread (reads release the GIL) while this thread checks for
    zeros and writes: reading and writing overlap, as with two queues in a pipeline."""
    import queue
    import threading

    free: queue.Queue = queue.Queue()
    full: queue.Queue = queue.Queue()
    for _ in range(3):
        free.put(bytearray(CHUNK))
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
                progress(done)
    finally:
        stop.set()
        free.put(bytearray(0))  # unblock the reader if it waits for a buffer
        t.join()


def convert_to_vhdx(source: str | os.PathLike[str], output: str | os.PathLike[str], *,
                    type: str = "dynamic", block_size: int | None = None,  # noqa: A002
                    parents=None, search_dirs=(), ignore_linkage: bool = False,  # noqa: ANN001
                    force: bool = False, progress: Callable[[int], None] | None = None,
                    ignore_checksums: bool = False) -> str:
    """Write ``source`` (raw file, VHDX/AVHDX or VHD/AVHD chain) as a new VHDX at ``output``.

    A raw source whose size is not a multiple of 512 is padded with zeros to the
    next sector. Returns ``output``.
    """
    from .disk import open as open_disk
    from .writer import WritableDisk

    source, output = os.fspath(source), os.fspath(output)
    if os.path.exists(output) and not force:
        raise VhdxError(f"{output}: already exists (use --force to overwrite)")
    if os.path.exists(output) and os.path.samefile(source, output):
        raise VhdxError(f"{output}: is the source")
    tmp = output + ".part"
    if os.path.exists(tmp):
        os.unlink(tmp)
    src_disk = None
    src_fd = None
    try:
        if is_vhdx_file(source) or is_vhd_file(source):
            src_disk = open_disk(source, parents=parents, search_dirs=search_dirs,
                                 ignore_linkage=ignore_linkage, ignore_checksums=ignore_checksums)
            for f in src_disk.chain:
                if os.path.exists(output) and os.path.samefile(output, f.path):
                    raise VhdxError(f"{output}: is part of the chain being read")
            size, lss, pss = src_disk.size, src_disk.logical_sector_size, src_disk.physical_sector_size
            ranges = [(e.offset, e.length) for e in src_disk.extents() if e.kind == "data"]
            readinto = src_disk.readinto_at
        else:
            if parents:
                raise InvalidArgumentError(f"{source}: a raw image has no parents")
            src_fd = os.open(source, os.O_RDONLY | getattr(os, "O_BINARY", 0))
            raw_size = os.fstat(src_fd).st_size
            if raw_size == 0:
                raise InvalidArgumentError(f"{source}: empty file")
            size, lss, pss = -(-raw_size // 512) * 512, 512, 4096
            ranges = list(raw_data_ranges(src_fd, raw_size))

            def readinto(off: int, mv: memoryview, _fd: int = src_fd) -> int:
                n = os.preadv(_fd, [mv], off)
                return n

        create(tmp, size, type=type, block_size=block_size, logical_sector_size=lss,
               physical_sector_size=pss)
        storage = None
        try:
            # OUT.part is invisible until renamed: one fsync before the rename stands
            # for every intermediate flush (see DeferredSyncStorage).
            storage = DeferredSyncStorage.open(tmp)
            with WritableDisk(tmp, storage=storage) as out:
                _copy(iter(ranges), readinto, out.write_at, progress)
                out.flush()
                out.log.close()
                storage.sync()
        except BaseException:
            os.unlink(tmp)
            raise
        finally:
            if storage is not None:
                storage.close()  # passed in, so the writer leaves it open (and locked)
        os.replace(tmp, output)
        fsync_dir(output)
    finally:
        if src_disk is not None:
            src_disk.close()
        if src_fd is not None:
            os.close(src_fd)
    return output
