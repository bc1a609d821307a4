"""Convert any chain (VHDX/AVHDX, VHD/AVHD), a raw image or a block device into
a new standalone VHD.

The output is written as a hidden temporary file beside it, created exclusively
(:func:`vhdx.fileio.create_temp`), fsynced, then renamed into place; free space
is checked first, and a failure removes the temporary file.

Fixed output: the temporary file is made sparse at its final size and only the
source's data is copied file to file through the project's copy engine
(:func:`vhdx.native.copy_ranges`: reflink clone where the file system can,
``copy_file_range`` otherwise). Holes of the source files inside data extents
(a VHDX block written sparsely) are left out too (:func:`vhdx.fdio.only_data`),
so holes stay holes and the output holds what the source holds, as qemu-img's
does. A source whose reads a replayed log patches goes through the reader.
Dynamic output: a new dynamic VHD written through :class:`VhdWritableDisk` with
its barriers deferred to one fsync before the rename (nobody sees the temporary
file), fed by :func:`vhdx.convert._copy` (read-ahead thread; all-zero 1 MiB
pieces are skipped, so all-zero blocks stay unallocated).

``azure=True`` (``--azure``): what Azure accepts for an uploaded disk - a fixed
VHD whose virtual size is a whole number of MiB (rounded up; the added tail
reads as zeros), Current Size = Original Size = that size, the spec's CHS for it
(rounded down, as Windows and Azure's own exports store), Data Offset all ones,
Features 0x2, version 1.0, creator host "Wi2k", no footer copy at offset 0 and
a file size of N MiB + 512 bytes.
"""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from .. import fileio
from ..convert import FileRanges, Source, _copy, open_source, refuse_self
from ..errors import InvalidArgumentError, VhdxIOError, converts_os_errors
from ..fdio import only_data, pwrite_all
from ..native import copy_ranges
from ..storage import DeferredSyncStorage
from . import structures as S
from .create import DEFAULT_BLOCK_SIZE, new_layout, write_layout

__all__ = ["convert_to_vhd"]

MiB = 1 << 20
BATCH = 4096  # ranges per copy_ranges call: progress and cancel between batches
BATCH_BYTES = 64 * MiB  # and bytes


def _one_arg(progress: Callable[[int], None] | None) -> Callable[[int, int], None] | None:
    """vhdx.convert._copy reports (done, total); this module's callers take done only."""
    return None if progress is None else (lambda done, _total: progress(done))


@converts_os_errors
def convert_to_vhd(source: str | os.PathLike[str] | Source, output: str | os.PathLike[str], *,
                   type: str = "dynamic", block_size: int | None = None, azure: bool = False,  # noqa: A002
                   parents: Sequence[Any] | None = None,
                   search_dirs: Sequence[str | os.PathLike[str]] = (), ignore_linkage: bool = False,
                   ignore_checksums: bool = False, force: bool = False,
                   progress: Callable[[int], None] | None = None) -> str:
    """Write ``source`` (a path, or an open :class:`vhdx.convert.Source`) as a new
    standalone VHD at ``output``, a regular file; returns ``output``.
    ``progress(bytes done)`` is called as the data is copied."""
    output = os.fspath(output)
    if azure:
        type = "fixed"  # noqa: A001 - the public keyword
    if type not in ("dynamic", "fixed"):
        raise InvalidArgumentError(f"{output}: the type must be dynamic or fixed, not {type!r}")
    target = fileio.inspect_output(output, force=force, allow_block=False)
    own = not isinstance(source, Source)
    src = source if isinstance(source, Source) else open_source(
        source, parents=parents, search_dirs=search_dirs, ignore_linkage=ignore_linkage,
        ignore_checksums=ignore_checksums)
    try:
        refuse_self(target.path, src)
        vsize = -(-src.size // MiB) * MiB if azure else src.size
        bs = block_size or DEFAULT_BLOCK_SIZE
        writes, file_size = new_layout(vsize, type=type, block_size=bs, unique_id=uuid.uuid4().bytes_le,
                                       exact_chs=azure)
        if type == "fixed":  # sparse: only the data is written
            needed = src.data_bytes + S.FOOTER_SIZE
        else:  # every block the data touches, with its sector bitmap, and the new file's tables
            blocks = sum(-(-(o + n) // bs) - o // bs for o, n in src.ranges)
            needed = file_size + blocks * (bs + 4096)
        fileio.check_free_space(output, needed, "the new VHD")
        fd, tmp = fileio.create_temp(output)
        try:
            if type == "fixed":
                write_layout(fd, writes, file_size, output)
                _copy_fixed(src, fd, output, progress)
                os.fsync(fd)
                os.close(fd)
            else:
                owned, fd = fd, -1  # the writer's storage owns it from here
                _write_dynamic(src, owned, tmp, output, writes, file_size, progress)
            fd = -1
        except BaseException:
            if fd >= 0:
                os.close(fd)
            fileio.discard_temp(tmp)
            raise
        fileio.commit_temp(tmp, output)
    finally:
        if own:
            src.close()
    return output


def _copy_fixed(src: Source, fd: int, output: str, progress: Callable[[int], None] | None) -> None:
    """The source's data at the same offsets of the sparse file ``fd``."""
    per_file: FileRanges | None = src.file_ranges()
    if per_file is None:  # reads patched in memory (a replayed log): through the reader
        def write(off: int, mv: memoryview) -> None:
            pwrite_all(fd, mv, off, output)

        _copy(iter(src.ranges), src.readinto, write, _one_arg(progress), src.data_bytes)
        return
    done = 0
    for sfd, spath, rs in per_file:
        for batch in _batches(rs):
            data = only_data(sfd, batch)
            try:
                copy_ranges(sfd, fd, data)
            except OSError as e:  # one call reads and writes: say which side most likely failed
                if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                    raise VhdxIOError.from_os(e, output, "writing the new VHD failed") from None
                raise VhdxIOError.from_os(e, spath, f"copying its data into {output} failed") from None
            done += sum(n for _, _, n in batch)
            if progress:
                progress(done)


def _batches(ranges: list[tuple[int, int, int]]) -> Iterator[list[tuple[int, int, int]]]:
    """Ranges in groups of at most BATCH entries or BATCH_BYTES bytes (a range
    larger than that is cut): progress and Ctrl-C between groups. (Starting
    writeback after each group, as the merge does, measured neutral here: 2.26 s
    against 2.12 s, medians of 8 alternated 4 GiB converts.)"""
    group: list[tuple[int, int, int]] = []
    size = 0
    for so, do, n in ranges:
        while n > 0:
            take = min(n, BATCH_BYTES - size)
            group.append((so, do, take))
            size += take
            so, do, n = so + take, do + take, n - take
            if size >= BATCH_BYTES or len(group) >= BATCH:
                yield group
                group, size = [], 0
    if group:
        yield group


def _write_dynamic(src: Source, fd: int, tmp: str, output: str, writes: list[tuple[int, bytes]],
                   file_size: int, progress: Callable[[int], None] | None) -> None:
    """A new dynamic VHD in the empty file ``fd`` (which this takes over), fed
    from ``src`` through the writer; all-zero pieces stay unallocated."""
    from .writer import VhdWritableDisk

    # Invisible until renamed: one fsync before the rename stands for every
    # intermediate flush (see DeferredSyncStorage).
    storage = DeferredSyncStorage(fd)
    storage.path = output  # messages name the output, not the hidden temporary file
    try:
        write_layout(fd, writes, file_size, output)
        with VhdWritableDisk(tmp, storage=storage, dependents=False) as out:  # a new file: no children
            _copy(iter(src.ranges), src.readinto, out.write_at, _one_arg(progress), src.data_bytes)
            out.flush()
            storage.sync()
    finally:
        storage.close()
