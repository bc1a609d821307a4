"""Convert any chain (VHDX/AVHDX, VHD/AVHD) or a raw image into a new standalone VHD.

Fixed output: ``OUT.part`` is made sparse at its final size and only the
source's data extents are copied, through the project's copy engine
(:func:`vhdx.native.copy_ranges`: reflink clone where the file system can,
``copy_file_range`` otherwise), so holes stay holes; then the footer. Dynamic
output: a new dynamic VHD written through :class:`VhdWritableDisk` with its
barriers deferred to one fsync before the rename (nobody sees ``OUT.part``),
fed by :func:`vhdx.convert._copy` (read-ahead thread; all-zero 1 MiB pieces
are skipped, so all-zero blocks stay unallocated).

``azure=True`` (``--azure``): what Azure accepts for an uploaded disk - a fixed
VHD whose virtual size is a whole number of MiB (rounded up; the added tail
reads as zeros), Current Size = Original Size = that size, the spec's CHS for it
(rounded down, as Windows and Azure's own exports store), Data Offset all ones,
Features 0x2, version 1.0, creator host "Wi2k", no footer copy at offset 0 and
a file size of N MiB + 512 bytes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import InvalidArgumentError, OutputExistsError, VhdxError, converts_os_errors
from ..fdio import fsync_dir, pwrite_all
from ..storage import DeferredSyncStorage
from . import structures as S
from .create import create_vhd, footer_for

__all__ = ["convert_to_vhd"]

MiB = 1 << 20


def _one_arg(progress: Callable[[int], None] | None) -> Callable[[int, int], None] | None:
    """vhdx.convert._copy reports (done, total); this module's callers take done only."""
    return None if progress is None else (lambda done, _total: progress(done))


def _open_source(source: str, parents: Sequence[str | os.PathLike[str]] | None,
                 search_dirs: Sequence[str | os.PathLike[str]], ignore_linkage: bool,
                 ignore_checksums: bool) -> tuple[Any, int | None]:
    """(disk or None, raw fd or None) for ``source``."""
    from ..convert import is_vhdx_file
    from ..disk import open as open_disk
    from .disk import open_vhd
    from .file import is_vhd_file

    if is_vhd_file(source):
        return open_vhd(source, parents=parents, search_dirs=search_dirs, ignore_linkage=ignore_linkage,
                        ignore_checksums=ignore_checksums), None
    if is_vhdx_file(source):
        return open_disk(source, parents=parents, search_dirs=search_dirs, ignore_linkage=ignore_linkage), None
    if parents:
        raise InvalidArgumentError(f"{source}: a raw image has no parents")
    return None, os.open(source, os.O_RDONLY | getattr(os, "O_BINARY", 0))


@converts_os_errors
def convert_to_vhd(source: str | os.PathLike[str], output: str | os.PathLike[str], *,
                   type: str = "dynamic", block_size: int | None = None, azure: bool = False,  # noqa: A002
                   parents: Sequence[str | os.PathLike[str]] | None = None,
                   search_dirs: Sequence[str | os.PathLike[str]] = (), ignore_linkage: bool = False,
                   ignore_checksums: bool = False, force: bool = False,
                   progress: Callable[[int], None] | None = None) -> str:
    """Write ``source`` as a new standalone VHD at ``output``; returns ``output``."""
    from ..convert import _copy, raw_data_ranges
    from ..native import copy_ranges

    source, output = os.fspath(source), os.fspath(output)
    if azure:
        type = "fixed"  # noqa: A001 - the public keyword
    if type not in ("dynamic", "fixed"):
        raise InvalidArgumentError(f"type must be 'dynamic' or 'fixed', not {type!r}")
    if os.path.exists(output) and not force:
        raise OutputExistsError(os.fspath(output), "already exists (use --force to overwrite)")
    if os.path.exists(output) and os.path.samefile(source, output):
        raise VhdxError(f"{output}: is the source")
    tmp = output + ".part"
    if os.path.exists(tmp):
        os.unlink(tmp)
    disk, raw_fd = _open_source(source, parents, search_dirs, ignore_linkage, ignore_checksums)
    try:
        if disk is not None:
            for f in disk.chain:
                if os.path.exists(output) and os.path.samefile(output, f.path):
                    raise VhdxError(f"{output}: is part of the chain being read")
            size = disk.size
            extents = [e for e in disk.extents() if e.kind == "data"]
            ranges = [(e.offset, e.length) for e in extents]
            readinto = disk.readinto_at
        else:
            assert raw_fd is not None  # _open_source gives a disk or a raw descriptor
            raw_size = os.fstat(raw_fd).st_size
            if raw_size == 0:
                raise InvalidArgumentError(f"{source}: empty file")
            size = -(-raw_size // S.SECTOR) * S.SECTOR
            ranges = list(raw_data_ranges(raw_fd, raw_size))
            extents = None

            def readinto(off: int, mv: memoryview, _fd: int = raw_fd) -> int:
                return os.preadv(_fd, [mv], off)
        vsize = -(-size // MiB) * MiB if azure else size
        if type == "fixed":
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.ftruncate(fd, vsize + S.FOOTER_SIZE)
                done = 0
                if extents is not None and any(getattr(f, "overlay", None) for f in disk.chain):
                    # A replayed log patches reads in memory: copy through the reader.
                    _copy(iter(ranges), readinto, lambda off, mv: pwrite_all(fd, mv, off), _one_arg(progress))
                elif extents is not None:
                    by_src: dict[int, list[tuple[int, int, int]]] = {}
                    for e in extents:
                        by_src.setdefault(e.source, []).append((e.file_offset, e.offset, e.length))
                    for src, rs in by_src.items():
                        for i in range(0, len(rs), 4096):  # progress between batches
                            batch = rs[i:i + 4096]
                            copy_ranges(disk.chain[src].fd, fd, batch)
                            done += sum(r[2] for r in batch)
                            if progress:
                                progress(done)
                else:
                    assert raw_fd is not None
                    copy_ranges(raw_fd, fd, [(o, o, n) for o, n in ranges])
                    if progress:
                        progress(sum(n for _, n in ranges))
                footer = footer_for(vsize, S.TYPE_FIXED, _new_id(), exact_chs=azure)
                pwrite_all(fd, footer, vsize)
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                os.unlink(tmp)
                raise
            os.close(fd)
        else:
            from .writer import VhdWritableDisk

            create_vhd(tmp, vsize, type="dynamic", block_size=block_size)
            try:
                storage = DeferredSyncStorage.open(tmp)
                assert isinstance(storage, DeferredSyncStorage)  # open() is the base class's
                out = VhdWritableDisk(tmp, storage=storage, dependents=False)  # a new file

                def write(off: int, mv: memoryview) -> None:
                    out.write_at(off, mv)

                try:
                    _copy(iter(ranges), readinto, write, _one_arg(progress))
                    storage.sync()
                finally:
                    out.close()
            except BaseException:
                os.unlink(tmp)
                raise
        os.replace(tmp, output)
        fsync_dir(output)
    finally:
        if disk is not None:
            disk.close()
        if raw_fd is not None:
            os.close(raw_fd)
    return output


def _new_id() -> bytes:
    import uuid

    return uuid.uuid4().bytes_le
