"""One VHDX/AVHDX file opened read-only.

:class:`ImageFile` parses the header section, replays a dirty log into an
in-memory overlay (never onto the file), parses the metadata and the BAT, and
answers "where does this block live". It knows nothing about parents; chains
are built in chain.py.
"""

from __future__ import annotations

import bisect
import mmap
import os
import stat
import threading
import uuid
from array import array
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Literal, NoReturn, Protocol, Sequence, SupportsIndex

from . import structures as S
from .bat import (
    Geometry,
    Spans,
    Table,
    decode_table,
    iter_nonzero,
    normalize_spans,
    raise_fatal,
    validate_table,
)
from .errors import (CorruptImageError, InvalidArgumentError, NotCopyableError, VhdxError, VhdxIOError, naming)
from .fdio import data_extents, open_regular_file, pread_into
from .headers import Header, HeaderSection, read_header_section
from .log import Overlay, ReplayPlan, plan_replay
from .metadata import Metadata, parse_metadata

# Runs of one block's sector bitmap: (first sector in block, sector count, present).
Runs = list[tuple[int, int, bool]]

_RUN_CACHE_BLOCKS = 4096
_SPARSE_BAT_MIN = 1 << 20  # smaller BATs are read whole: one pread beats the seeks


class ReadableObject(Protocol):
    """What an image can be read from besides a path: ``readinto`` and ``seek``."""

    def readinto(self, buffer: Any) -> int | None: ...

    def seek(self, offset: int, whence: int = ...) -> int: ...


class ObjectSource:
    """Positional reads over a file-like object that has no usable descriptor
    (a member of a zip, a file inside an E01 through pyewf, a file of a file
    system exposed by pytsk3 or dissect). The object's position is shared
    state, so reads are serialised by a lock; the caller keeps owning it."""

    def __init__(self, obj: ReadableObject) -> None:
        self.obj = obj
        self._lock = threading.Lock()
        with self._lock:
            self.size = obj.seek(0, os.SEEK_END)

    def pread_into(self, mv: memoryview, offset: int) -> int:
        """Fill ``mv`` from ``offset``; returns the bytes read (short at EOF)."""
        n = len(mv)
        got = 0
        with self._lock:
            self.obj.seek(offset)
            readinto = getattr(self.obj, "readinto", None)
            while got < n:
                if readinto is not None:
                    k = readinto(mv[got:])
                else:  # read-only objects such as pytsk3's expose read(n) only
                    b = getattr(self.obj, "read")(n - got)
                    k = len(b)
                    mv[got:got + k] = b
                if not k:
                    break
                got += k
        return got


def object_name(obj: object) -> str:
    """A readable name for a file object: its ``name`` when that is a path."""
    name = getattr(obj, "name", None)
    if isinstance(name, (str, os.PathLike)):
        return os.fspath(name)
    return f"<{type(obj).__name__} object>"


def _descriptor_of(obj: object) -> int | None:
    """A private duplicate of ``obj``'s descriptor when it is a regular file (so
    the C read path serves it and its own position is never moved), else None."""
    try:
        fd: int = getattr(obj, "fileno")()  # AttributeError when it has none: caught below
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.dup(fd)
    except (AttributeError, OSError, ValueError, TypeError):  # io.UnsupportedOperation is an OSError
        return None


ExtentKind = Literal["data", "zero", "unallocated"]  # what an Extent's bytes are


@dataclass(frozen=True)
class Extent:
    """A run of the virtual disk with one origin."""

    offset: int
    length: int
    kind: ExtentKind
    source: int | None  # index into VirtualDisk.chain for data, else None
    file_offset: int | None = None  # where the data lies in that file

    def to_dict(self, chain: Sequence[_Named] | None = None) -> dict[str, Any]:
        d: dict[str, Any] = {"offset": self.offset, "length": self.length, "kind": self.kind}
        if self.source is not None:
            d["source"] = self.source
            d["file_offset"] = self.file_offset
            if chain is not None:
                d["file"] = chain[self.source].path
        return d


class _Named(Protocol):
    """What :meth:`Extent.to_dict` needs of a chain's file (VHDX or VHD): its path."""

    @property
    def path(self) -> str: ...


def append_own_extent(out: list[Extent], off: int, length: int, kind: ExtentKind, foff: int | None) -> None:
    """Append a run of a file's own extent map (``source`` 0 = the file, when
    ``foff`` is given), merged into the previous run when it continues it
    (VHDX and VHD ``extents()``)."""
    if length <= 0:
        return
    if out:
        last = out[-1]
        if last.kind == kind and last.offset + last.length == off and (
                foff is None or (last.file_offset is not None and last.file_offset + last.length == foff)):
            out[-1] = Extent(last.offset, last.length + length, kind, last.source, last.file_offset)
            return
    out.append(Extent(off, length, kind, 0 if foff is not None else None, foff))


_RUN_STRIDE = 1 << 16  # entries listed at once by payload_runs (512 KiB of table)


def _groups(vals: list[int], block: int) -> Iterator[tuple[int, int, int]]:
    """(block, count, entry) of the runs of equal values of ``vals`` (payload entries
    of consecutive blocks from ``block``)."""
    i, n = 0, len(vals)
    while i < n:
        v = vals[i]
        j = i + 1
        while j < n and vals[j] == v:
            j += 1
        yield block + i, j - i, v
        i = j


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

    def __copy__(self) -> NoReturn:
        raise self._refuse("copied")

    def __deepcopy__(self, memo: dict[int, Any]) -> NoReturn:
        raise self._refuse("copied")

    def __reduce_ex__(self, protocol: SupportsIndex) -> NoReturn:
        raise self._refuse("pickled")


class ImageFile(NotCopyable):
    """A single VHDX or AVHDX file, read-only. Thread-safe for reads."""

    def __init__(self, path: str | os.PathLike[str] | ReadableObject, fd: int | None = None, *,
                 force_share: bool = False) -> None:
        """Open ``path``; with ``fd``, parse through that descriptor instead (the
        writer passes its read-write one) and leave closing it to the caller.

        ``path`` may also be an open binary file object: a regular file behind it
        is read through a duplicate of its descriptor (its position untouched),
        anything else with ``readinto``/``seek`` through those (read-only, and
        the caller keeps owning and closing the object).

        An own descriptor takes a reader's lock (:mod:`vhdx.locking`) unless
        ``force_share``; LockedError when a writer (vhdx or QEMU) holds the file.
        """
        self.source: ObjectSource | None = None
        self._closed = False
        if isinstance(path, (str, os.PathLike)):
            self.path = os.fspath(path)
            self._owns_fd = fd is None
            self.fd = open_regular_file(path) if fd is None else fd
        else:
            self.path = object_name(path)
            dup = _descriptor_of(path)
            self._owns_fd = dup is not None
            if dup is not None:
                self.fd = dup
            else:
                if not (hasattr(path, "seek") and (hasattr(path, "readinto") or hasattr(path, "read"))):
                    raise InvalidArgumentError(
                        f"{self.path}: not a path or a binary file object (needs readinto or read, and seek)")
                try:
                    self.source = ObjectSource(path)
                except OSError as e:
                    raise VhdxIOError.from_os(e, self.path, "cannot seek") from None
                except ValueError as e:
                    raise VhdxError(f"{self.path}: cannot seek: {e}") from None
                self.fd = -1  # no descriptor: every read goes through self.source
        try:
            if fd is None and self.fd >= 0:
                from .locking import lock_image

                lock_image(self.fd, self.path, write=False, force_share=force_share)
            self._load()
        except VhdxError as e:
            self.close()
            raise naming(e, self.path) from None
        except BaseException:
            self.close()
            raise

    # --- opening ---------------------------------------------------------------
    def _load(self) -> None:
        self.file_size = self.source.size if self.source is not None else os.fstat(self.fd).st_size
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
            # Entry by entry through a few chunks, holes skipped: never the whole region.
            try:
                ext = [(a - h.log_offset, b - h.log_offset) for a, b in data_extents(
                    self.fd, h.log_offset, min(h.log_offset + h.log_length, self.file_size))]
            except OSError:  # the file system cannot tell: every sector is looked at
                ext = None
            plan = plan_replay(lambda off, n: self._pread(h.log_offset + off, n), h.log_length,
                               h.log_guid, self.file_size, h.log_offset, ext)
            self.replay = plan
            self.warnings += plan.warnings
            self.overlay = Overlay(plan.updates)
            rt_lo = S.REGION_TABLE_OFFSETS[0]
            if self.overlay.touches(rt_lo, S.REGION_TABLE_OFFSETS[1] + S.REGION_TABLE_SIZE - rt_lo):
                # A logged region-table change (a resize that moved the BAT): the
                # regions are those the replayed log leaves (MS-VHDX 2.3.3).
                hs = read_header_section(self.read_file)
                self.header_section = hs
        # Replay may extend the file (FORMAT.md §6.4 steps 7-8); reads past EOF give zeros.
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
                                           self.reserved_spans(), self.bat_spans)
        raise_fatal(self.bat_problems)
        self.warnings += [p.describe() for p in self.bat_problems]
        self._runs: dict[int, Runs] = {}
        self._lock = threading.Lock()
        self._norm: Spans = []
        self._norm_key: tuple[int, int, int, int] | None = None

    def reserved_spans(self) -> list[tuple[int, int, str]]:
        """(start, end, name) of the header section, the log and every region."""
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
        if nbytes < _SPARSE_BAT_MIN or not hasattr(os, "SEEK_DATA") or self.source is not None:
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
            self.pread_into(mv[start - offset:stop - offset], start)
            byte_spans.append((start - offset, stop - offset))
        for sec in self.overlay.data_sectors_in(offset, nbytes):
            byte_spans.append((max(sec, offset) - offset, min(sec + S.LOG_SECTOR_SIZE, offset + nbytes) - offset))
        if self.overlay.touches(offset, nbytes):
            self.overlay.patch(offset, mv)
        del mv
        table = decode_table(mem, count)
        return table, [(s // 8, -(-e // 8)) for s, e in byte_spans]

    def _normalized_spans(self) -> Spans:
        """``bat_spans`` sorted and merged, cached until a writer notes an entry."""
        key = (id(self.bat_spans), len(self.bat_spans), id(self.bat), len(self.bat))
        if self._norm_key != key:
            self._norm = normalize_spans(self.bat_spans, len(self.bat))
            self._norm_key = key
        return self._norm

    def note_bat_entry(self, index: int) -> None:
        """A writer set entry ``index``: later scans must look at it."""
        spans = self.bat_spans
        if not spans or not (spans[-1][0] <= index < spans[-1][1]):
            spans.append((index, index + 1))

    def forget_block_runs(self, blocks: Iterable[int]) -> None:
        """A writer changed these blocks' entries or bitmaps: drop their cached runs."""
        with self._lock:
            for block in blocks:
                self._runs.pop(block, None)

    # --- raw file access ---------------------------------------------------------
    def pread_into(self, mv: memoryview, offset: int) -> None:
        """Fill ``mv`` with the file's raw bytes at ``offset`` (zeros past EOF; no overlay)."""
        src = self.source
        if src is None:
            pread_into(self.fd, mv, offset, self.path)
            return
        if self._closed:
            raise ValueError("I/O operation on a closed image")
        try:
            got = src.pread_into(mv, offset)
        except OSError as e:
            raise VhdxIOError.from_os(e, self.path, f"read failed at {offset:#x}") from None
        except ValueError as e:
            raise VhdxError(f"{self.path}: read failed at {offset:#x}: {e}") from None
        if got < len(mv):
            mv[got:] = bytes(len(mv) - got)

    def identity(self) -> tuple[object, ...]:
        """What tells two opened files apart (device and inode, or the object)."""
        if self.source is not None:
            return ("object", id(self.source.obj))
        st = os.fstat(self.fd)
        return st.st_dev, st.st_ino

    def _pread(self, offset: int, size: int) -> bytes:
        if self.source is not None:
            buf = bytearray(size)
            got = self.source.pread_into(memoryview(buf), offset) if not self._closed else 0
            return bytes(buf[:got])
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
        self.pread_into(mv, offset)
        if self.overlay.touches(offset, len(buf)):
            self.overlay.patch(offset, mv)
        return buf

    # --- properties --------------------------------------------------------------
    @property
    def creator(self) -> str:
        return self.header_section.creator

    @property
    def header(self) -> Header:
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

    def extents(self) -> list[Extent]:
        """What this file holds by itself, over the whole virtual disk: "data"
        (with its file offset; ``source`` 0 is this file), "zero" (ZERO, UNMAPPED
        or UNDEFINED blocks: zeros that hide any parent) and "unallocated" (not
        held here: a parent's bytes, or zeros at the end of a chain).

        Needs no parent, so it works on a lone checkpoint file: the changed-block
        map of a differencing disk. Costs time in proportion to the runs of
        equal entries the file holds (:meth:`payload_runs`), not to the virtual size.
        """
        size, bs, lss = self.virtual_size, self.block_size, self.logical_sector_size
        out: list[Extent] = []

        def emit(off: int, length: int, kind: ExtentKind, foff: int | None) -> None:
            append_own_extent(out, off, length, kind, foff)

        pos = 0
        for block, count, entry in self.payload_runs():
            start = block * bs
            end = min((block + count) * bs, size)
            emit(pos, start - pos, "unallocated", None)
            st, foff = entry & S.BAT_STATE_MASK, entry & S.BAT_OFFSET_MASK
            if st == S.PAYLOAD_BLOCK_FULLY_PRESENT:  # runs of equal entries: one block each
                emit(start, end - start, "data", foff)
            elif st == S.PAYLOAD_BLOCK_PARTIALLY_PRESENT:
                for first, n, present in self.block_runs(block):
                    lo = start + first * lss
                    hi = min(lo + n * lss, end)
                    if present:
                        emit(lo, hi - lo, "data", foff + first * lss)
                    else:
                        emit(lo, hi - lo, "unallocated", None)
            elif st == S.PAYLOAD_BLOCK_NOT_PRESENT:
                emit(start, end - start, "unallocated", None)
            else:  # ZERO, UNMAPPED, UNDEFINED: a run of any length costs one step
                emit(start, end - start, "zero", None)
            pos = end
        emit(pos, size - pos, "unallocated", None)
        return out

    def payload_runs(self, first: int = 0, stop: int | None = None) -> Iterator[tuple[int, int, int]]:
        """``(block, count, entry)`` for every run of consecutive payload blocks in
        [first, stop) whose BAT entries are equal and non-zero, in block order
        (NOT_PRESENT entries, 0, are the gaps between runs).

        Costs a byte comparison per 64 KiB of table where the file holds entries,
        plus C-speed list work per entry there, plus Python work per change of
        entry: a 16 TiB disk whose entries all read ZERO is a handful of runs.
        """
        geo = self.geometry
        stop = geo.payload_blocks if stop is None else min(stop, geo.payload_blocks)
        if first >= stop:
            return
        cr = geo.chunk_ratio
        lo_idx, hi_idx = first + first // cr, stop - 1 + (stop - 1) // cr + 1
        norm = self._normalized_spans()
        j = max(0, bisect.bisect_right(norm, (lo_idx, 1 << 62)) - 1)
        spans = []
        while j < len(norm) and norm[j][0] < hi_idx:
            a, b = norm[j]
            if b > lo_idx:
                spans.append((max(a, lo_idx), min(b, hi_idx)))
            j += 1
        table = self.bat
        cr1 = cr + 1
        run_block = run_count = run_entry = 0
        for lo, hi in spans:
            for base in range(lo, hi, _RUN_STRIDE):
                end = min(base + _RUN_STRIDE, hi)
                vals = table[base:end].tolist() if isinstance(table, memoryview) else list(table[base:end])
                k0 = (cr - base % cr1) % cr1  # first sector-bitmap slot, relative to base
                del vals[k0::cr1]
                if not vals:
                    continue
                b = geo.block_of_index(base + (1 if k0 == 0 else 0))
                v0 = vals[0]
                if vals.count(v0) == len(vals):  # one entry all along: one step
                    groups: Iterator[tuple[int, int, int]] = iter(((b, len(vals), v0),))
                else:
                    groups = _groups(vals, b)
                for gb, gn, e in groups:
                    if run_count and e == run_entry and gb == run_block + run_count:
                        run_count += gn
                        continue
                    if run_count and run_entry:
                        yield run_block, run_count, run_entry
                    run_block, run_count, run_entry = gb, gn, e
        if run_count and run_entry:
            yield run_block, run_count, run_entry

    def allocation_end(self) -> int:
        """End of the last byte a structure uses (header section, log, regions,
        payload blocks, sector bitmaps), rounded up to 1 MiB: the file need not be
        longer. A max per span of the table, in C: no per-entry Python work."""
        end = max(e for _s, e, _n in self.reserved_spans())
        geo = self.geometry
        cr, cr1 = geo.chunk_ratio, geo.chunk_ratio + 1
        table = self.bat
        for lo, hi in normalize_spans(self.bat_spans, len(table)):
            for base in range(lo, hi, _RUN_STRIDE):
                stop = min(base + _RUN_STRIDE, hi)
                vals = table[base:stop].tolist() if isinstance(table, memoryview) else list(table[base:stop])
                k0 = (cr - base % cr1) % cr1
                sb = vals[k0::cr1]
                del vals[k0::cr1]
                if vals and max(vals) >= 1 << 20:
                    end = max(end, (max(vals) & S.BAT_OFFSET_MASK) + geo.block_size)
                present = [e for e in sb if e & S.BAT_STATE_MASK == S.SB_BLOCK_PRESENT]
                if present:
                    end = max(end, (max(present) & S.BAT_OFFSET_MASK) + S.SECTOR_BITMAP_BLOCK_SIZE)
        return -(-end // S.MiB) * S.MiB

    def block_state_counts(self) -> dict[int, int]:
        """Payload blocks per BAT state (NOT_PRESENT included), by runs."""
        counts: dict[int, int] = {}
        total = 0
        for _b, n, e in self.payload_runs():
            st = e & S.BAT_STATE_MASK
            counts[st] = counts.get(st, 0) + n
            total += n
        counts[S.PAYLOAD_BLOCK_NOT_PRESENT] = (counts.get(S.PAYLOAD_BLOCK_NOT_PRESENT, 0)
                                               + self.geometry.payload_blocks - total)
        return counts

    # --- lifetime ------------------------------------------------------------------
    def close(self) -> None:
        if self.fd >= 0 and self._owns_fd:
            os.close(self.fd)
        self.fd = -1
        self._closed = True
        self.source = None  # the caller owns the object; only our reference goes
        # Release the BAT and caches now, not when the last reference goes: a merge
        # keeps closed ImageFiles in its lists while it parses the same files again.
        self.bat = array("Q")  # empty
        self.bat_spans = []
        self._runs = {}

    def __del__(self) -> None:
        # Like io.FileIO: an image dropped without close() (``ImageFile(p).creator``)
        # must not keep its descriptor, nor the lock taken on it, for the process's life.
        if getattr(self, "_owns_fd", False) and getattr(self, "fd", -1) >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1

    @property
    def closed(self) -> bool:
        return self._closed or (self.fd < 0 and self.source is None)

    def __enter__(self) -> "ImageFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<ImageFile {self.path!r} size={self.virtual_size} block={self.block_size}>"
