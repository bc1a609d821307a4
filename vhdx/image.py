"""One VHDX/AVHDX file opened read-only.

:class:`ImageFile` parses the header section, replays a dirty log into an
in-memory overlay (never onto the file), parses the metadata and the BAT, and
answers "where does this block live". It knows nothing about parents; chains
are built in chain.py.
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
import threading
import uuid
from dataclasses import dataclass
from typing import Iterator

from . import structures as S
from .bat import Geometry, Spans, Table, decode_table, iter_nonzero, raise_fatal, validate_table
from .errors import (CorruptImageError, ImageNotFoundError, InvalidArgumentError, NotCopyableError,
                     VhdxError, VhdxIOError)
from .headers import HeaderSection, read_header_section
from .log import Overlay, ReplayPlan, plan_replay
from .metadata import Metadata, parse_metadata

# Runs of one block's sector bitmap: (first sector in block, sector count, present).
Runs = list[tuple[int, int, bool]]

_RUN_CACHE_BLOCKS = 4096
_SPARSE_BAT_MIN = 1 << 20  # smaller BATs are read whole: one pread beats the seeks


def open_regular_file(path: str | os.PathLike[str]) -> int:
    """Open ``path`` read-only, refusing anything but a regular file.

    The type is checked before opening (a FIFO would block the open) and again
    on the descriptor (the path could have been swapped in between).
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ImageNotFoundError(os.fspath(path)) from None
    except OSError as e:
        raise VhdxIOError.from_os(e, os.fspath(path)) from None
    if not stat.S_ISREG(st.st_mode):
        raise InvalidArgumentError(f"{os.fspath(path)}: not a regular file")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        # O_NOATIME keeps even the access time of evidence unchanged where allowed.
        fd = os.open(path, flags | getattr(os, "O_NOATIME", 0))
    except PermissionError:
        try:
            fd = os.open(path, flags)
        except OSError as e:
            raise VhdxIOError.from_os(e, os.fspath(path)) from None
    except OSError as e:
        raise VhdxIOError.from_os(e, os.fspath(path)) from None
    st2 = os.fstat(fd)
    if not stat.S_ISREG(st2.st_mode) or (st2.st_dev, st2.st_ino) != (st.st_dev, st.st_ino):
        os.close(fd)
        raise InvalidArgumentError(f"{os.fspath(path)}: changed while being opened")
    return fd


def pread_into(fd: int, mv: memoryview, offset: int, path: str) -> None:
    """Fill ``mv`` from ``offset`` of ``fd``: short reads retried, zeros past EOF."""
    n = len(mv)
    try:
        got = os.preadv(fd, [mv], offset)
        while 0 < got < n:
            k = os.preadv(fd, [mv[got:]], offset + got)
            if k == 0:
                break
            got += k
    except OSError as e:
        raise VhdxIOError.from_os(e, path, f"read failed at {offset:#x}") from None
    if got < n:
        mv[got:] = bytes(n - got)


def data_extents(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    """[start, end) ranges of ``fd`` between ``start`` and ``end`` that hold data
    (SEEK_DATA / SEEK_HOLE); everything else reads zeros. OSError when the
    platform or file system cannot tell."""
    out: list[tuple[int, int]] = []
    pos = start
    while pos < end:
        try:
            s = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after pos
                break
            raise
        if s >= end:
            break
        h = min(os.lseek(fd, s, os.SEEK_HOLE), end)
        out.append((s, h))
        pos = h
    return out


@dataclass(frozen=True)
class BlockInfo:
    state: int
    file_offset: int  # 0 when the state has no data in this file


class NotCopyable:
    """Refuses copy.copy, copy.deepcopy and pickling of an object holding open
    descriptors: a copy would share them, and closing it would close them under
    the original, whose reads would then hit whatever file reuses the numbers."""

    path: str

    def _refuse(self, what: str) -> NotCopyableError:
        return NotCopyableError(f"{self.path}: an open disk cannot be {what}; open the file again")

    def __copy__(self) -> None:
        raise self._refuse("copied")

    def __deepcopy__(self, memo: dict) -> None:
        raise self._refuse("copied")

    def __reduce_ex__(self, protocol: object) -> None:
        raise self._refuse("pickled")


class ImageFile(NotCopyable):
    """A single VHDX or AVHDX file, read-only. Thread-safe for reads."""

    def __init__(self, path: str | os.PathLike[str], fd: int | None = None) -> None:
        """Open ``path``; with ``fd``, parse through that descriptor instead (the
        writer passes its read-write one) and leave closing it to the caller."""
        self.path = os.fspath(path)
        self._owns_fd = fd is None
        self.fd = open_regular_file(path) if fd is None else fd
        try:
            self._load()
        except VhdxError as e:
            self.close()
            # Parsers below know nothing of paths; a message must name its file.
            if self.path not in str(e) and type(e).__init__ is VhdxError.__init__:
                raise type(e)(f"{self.path}: {e}") from None
            raise
        except BaseException:
            self.close()
            raise

    # --- opening ---------------------------------------------------------------
    def _load(self) -> None:
        self.file_size = os.fstat(self.fd).st_size
        self.warnings: list[str] = []
        self.overlay = Overlay()
        self.replay: ReplayPlan | None = None

        hs = read_header_section(self._pread)
        self.header_section: HeaderSection = hs
        self.warnings += hs.warnings
        h = hs.header
        if h.log_length and h.log_offset + h.log_length > self.file_size:
            raise CorruptImageError("the log region lies past the end of the file")
        if h.log_dirty:
            log_data = self._pread(h.log_offset, h.log_length)
            plan = plan_replay(log_data, h.log_length, h.log_guid, self.file_size)
            self.replay = plan
            self.warnings += plan.warnings
            self.overlay = Overlay(plan.updates)
        # Replay may extend the file (ref §6.4 steps 7-8); reads past EOF give zeros.
        self.logical_size = max(self.file_size, self.overlay.end,
                                self.replay.last_file_offset if self.replay else 0)

        md_region = hs.metadata_region
        if md_region.file_offset + md_region.length > self.logical_size:
            raise CorruptImageError("the metadata region lies past the end of the file")
        self.metadata: Metadata = parse_metadata(
            lambda off, n: self.read_file(md_region.file_offset + off, n), md_region.length)
        md = self.metadata
        self.geometry = Geometry(md.virtual_size, md.block_size, md.logical_sector_size, md.has_parent)

        bat_region = hs.bat_region
        count = self.geometry.total_entries
        if count * 8 > bat_region.length:
            raise CorruptImageError(
                f"BAT region holds {bat_region.length // 8} entries, the disk needs {count}")
        if bat_region.file_offset + count * 8 > self.logical_size:
            raise CorruptImageError("the BAT lies past the end of the file")
        self.bat: Table
        self.bat_spans: Spans
        self.bat, self.bat_spans = self._read_bat(bat_region.file_offset, count)
        self.bat_problems = validate_table(self.bat, self.geometry, self.logical_size,
                                           self._reserved_spans(), self.bat_spans)
        raise_fatal(self.bat_problems)
        self.warnings += [f"BAT entry {p.index}: {p.message}" for p in self.bat_problems]
        self._runs: dict[int, Runs] = {}
        self._lock = threading.Lock()

    def _reserved_spans(self) -> list[tuple[int, int, str]]:
        hs = self.header_section
        spans = [(0, S.HEADER_SECTION_SIZE, "header section")]
        if hs.header.log_length:
            spans.append((hs.header.log_offset, hs.header.log_offset + hs.header.log_length, "log"))
        spans += [(r.file_offset, r.file_offset + r.length, f"region {r.name}") for r in hs.regions]
        return spans

    def _read_bat(self, offset: int, count: int) -> tuple[Table, Spans]:
        """The BAT, reading only the parts of it the file holds.

        A large BAT is mostly unwritten on a sparse file system (a 64 TiB disk with
        1 MiB blocks has a 512 MiB BAT, a few pages of it used): it goes into an
        anonymous mapping, whose untouched pages read zero and take no memory, and
        only the file's data extents (SEEK_DATA / SEEK_HOLE) are read into it. The
        returned spans (entry ranges) tell the scans where entries can be non-zero.
        """
        nbytes = count * 8
        if nbytes < _SPARSE_BAT_MIN or not hasattr(os, "SEEK_DATA"):
            buf = self.read_file_into(offset, bytearray(nbytes))
            return decode_table(buf, count), [(0, count)]
        end = min(offset + nbytes, self.file_size)
        try:
            extents = data_extents(self.fd, offset, end)
        except OSError:  # the platform or file system refuses SEEK_DATA: read it all
            extents = [(offset, end)] if offset < end else []
        try:
            mem = mmap.mmap(-1, nbytes)
        except (OSError, ValueError, OverflowError) as e:  # address space or overcommit limits
            raise VhdxError(f"{self.path}: cannot map a {nbytes} byte BAT: {e}") from None
        mv = memoryview(mem)
        byte_spans: list[tuple[int, int]] = []
        for start, stop in extents:
            pread_into(self.fd, mv[start - offset:stop - offset], start, self.path)
            byte_spans.append((start - offset, stop - offset))
        for sec in self.overlay.data_sectors_in(offset, nbytes):
            byte_spans.append((max(sec, offset) - offset, min(sec + S.LOG_SECTOR_SIZE, offset + nbytes) - offset))
        if self.overlay.touches(offset, nbytes):
            self.overlay.patch(offset, mv)
        del mv
        table = decode_table(mem, count)
        return table, [(s // 8, -(-e // 8)) for s, e in byte_spans]

    def note_bat_entry(self, index: int) -> None:
        """A writer set entry ``index``: later scans must look at it."""
        spans = self.bat_spans
        if not spans or not (spans[-1][0] <= index < spans[-1][1]):
            spans.append((index, index + 1))

    # --- raw file access ---------------------------------------------------------
    def _pread(self, offset: int, size: int) -> bytes:
        try:
            return os.pread(self.fd, size, offset)
        except OSError as e:
            raise VhdxIOError.from_os(e, self.path, f"read failed at {offset:#x}") from None

    def read_file(self, offset: int, size: int) -> bytes:
        """``size`` bytes of the file as replayed (overlay applied; zeros past EOF)."""
        return bytes(self.read_file_into(offset, bytearray(size)))

    def read_file_into(self, offset: int, buf: bytearray) -> bytearray:
        """Like :meth:`read_file`, straight into ``buf`` (no second copy of large tables)."""
        mv = memoryview(buf)
        pread_into(self.fd, mv, offset, self.path)
        if self.overlay.touches(offset, len(buf)):
            self.overlay.patch(offset, mv)
        return buf

    # --- properties --------------------------------------------------------------
    @property
    def creator(self) -> str:
        return self.header_section.creator

    @property
    def header(self):  # noqa: ANN201 - headers.Header
        return self.header_section.header

    @property
    def data_write_guid(self) -> uuid.UUID:
        return self.header.data_write_guid

    @property
    def file_write_guid(self) -> uuid.UUID:
        return self.header.file_write_guid

    @property
    def virtual_size(self) -> int:
        return self.metadata.virtual_size

    @property
    def block_size(self) -> int:
        return self.metadata.block_size

    @property
    def logical_sector_size(self) -> int:
        return self.metadata.logical_sector_size

    @property
    def physical_sector_size(self) -> int:
        return self.metadata.physical_sector_size

    @property
    def virtual_disk_id(self) -> uuid.UUID:
        return self.metadata.virtual_disk_id

    @property
    def has_parent(self) -> bool:
        return self.metadata.has_parent

    @property
    def is_fixed(self) -> bool:
        return self.metadata.leave_block_allocated

    @property
    def parent_locator(self) -> dict[str, str] | None:
        return self.metadata.parent_locator

    @property
    def log_replayed(self) -> bool:
        """True when a dirty log was replayed into the in-memory overlay."""
        return bool(self.replay and self.replay.entries)

    # --- blocks ------------------------------------------------------------------
    def block(self, block: int) -> BlockInfo:
        e = self.bat[self.geometry.payload_index(block)]
        return BlockInfo(e & S.BAT_STATE_MASK, e & S.BAT_OFFSET_MASK)

    def block_runs(self, block: int) -> Runs:
        """Sector runs of a PARTIALLY_PRESENT block's bitmap (cached, thread-safe)."""
        runs = self._runs.get(block)  # a dict lookup is atomic: no lock on hits
        if runs is not None:
            return runs
        geo = self.geometry
        chunk = block // geo.chunk_ratio
        sb = self.bat[geo.sb_index(chunk)]
        if sb & S.BAT_STATE_MASK != S.SB_BLOCK_PRESENT:
            raise CorruptImageError(
                f"{self.path}: block {block} is PARTIALLY_PRESENT but its sector bitmap is not present")
        start, length = geo.bitmap_slice(block)
        bits = self.read_file((sb & S.BAT_OFFSET_MASK) + start, length)
        from .native import bitmap_runs  # deferred: keeps import of the package cheap

        runs = bitmap_runs(bits, 0, geo.sectors_per_block)
        with self._lock:
            if len(self._runs) >= _RUN_CACHE_BLOCKS:
                self._runs.clear()  # bounded memory; recomputing runs is cheap
            self._runs[block] = runs
        return runs

    def allocated_blocks(self) -> Iterator[tuple[int, BlockInfo]]:
        """(block, info) for every payload block with a state other than NOT_PRESENT."""
        geo = self.geometry
        for i, e in iter_nonzero(self.bat, spans=self.bat_spans):
            if not geo.is_sb_index(i):
                block = geo.block_of_index(i)
                if block < geo.payload_blocks:
                    yield block, BlockInfo(e & S.BAT_STATE_MASK, e & S.BAT_OFFSET_MASK)

    # --- lifetime ------------------------------------------------------------------
    def close(self) -> None:
        if self.fd >= 0 and self._owns_fd:
            os.close(self.fd)
        self.fd = -1
        # Release the BAT and caches now, not when the last reference goes: a merge
        # keeps closed ImageFiles in its lists while it parses the same files again.
        self.bat = ()
        self.bat_spans = []
        self._runs = {}

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def __enter__(self) -> "ImageFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<ImageFile {self.path!r} size={self.virtual_size} block={self.block_size}>"
