"""The virtual disk seen through a whole chain, as a read-only ``io.RawIOBase``.

Read resolution follows MS-VHDX 2.5.1.1 / FORMAT.md §8.1: FULLY_PRESENT reads the
file, PARTIALLY_PRESENT reads per sector-bitmap run (bit 1 here, bit 0 from the
parent), NOT_PRESENT defers to the parent (zeros at the end of the chain),
ZERO / UNDEFINED / UNMAPPED read zeros (the spec's reading; libvhdi differs, ref
§5.2 footnote 2), and past a parent's end the disk reads zeros.

With the C extension built, ``readinto_at`` runs the whole read in one call of
:class:`vhdx.native.ChainReader` (same rules, GIL released, sector bitmaps
cached per level). The Python path below stays the reference and the fallback
(no extension, a replayed log's in-memory overlay, odd buffers, errors to
report): reads are resolved into segments first, coalescing neighbours that are
contiguous in one file, then filled straight into the caller's buffer.
"""

from __future__ import annotations

import bisect
import io
import os
import uuid
from typing import TYPE_CHECKING, Callable, Iterable, Literal, NoReturn, Sequence

from . import structures as S
from .errors import InvalidArgumentError, ReadOnlyError, VhdxError, VhdxIOError  # noqa: F401
from .errors import converts_os_errors
from .fdio import pread_into
from .image import Extent, ExtentKind, ImageFile, NotCopyable, ReadableObject

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

    from .native import ChainReader
    from .partitions import Partition

ReadMode = Literal["r", "rb"]
WriteMode = Literal["r+", "r+b", "rb+"]

ZERO = -1  # segment source: reads zeros because the chain defines zeros
UNALLOCATED = -2  # segment source: nothing in the chain ever wrote here

# (buffer offset, length, source: chain index or ZERO/UNALLOCATED, file offset)
Segment = list[int]  # [pos, length, source, file_offset]; a list so the last one can be extended in place

_ZEROS = memoryview(bytes(1 << 20))  # sliced without copying
_MAP_CACHE_BLOCKS = 64
_OFFSET_MASK = S.BAT_OFFSET_MASK


def _emit(out: list[Segment], pos: int, length: int, source: int, file_offset: int) -> None:
    if out:
        last = out[-1]
        if last[2] == source and last[0] + last[1] == pos and (
                source < 0 or last[3] + last[1] == file_offset):
            last[1] += length
            return
    out.append([pos, length, source, file_offset])


class VirtualDisk(NotCopyable, io.RawIOBase):
    """A read-only virtual disk over a chain of VHDX/AVHDX files (child first).

    ``read_at``/``readinto_at`` are safe to call from several threads at once;
    the stream position methods (``read``, ``seek``) are not shared-state safe.
    """

    def __init__(self, chain: list[ImageFile], warnings: list[str] | None = None) -> None:
        super().__init__()
        if not chain:
            raise InvalidArgumentError("empty chain")
        self.chain = chain
        self.warnings = list(warnings or [])
        self._pos = 0
        cls = type(self)
        self._direct = cls.readinto_at is VirtualDisk.readinto_at and cls.read_at is VirtualDisk.read_at
        self._refresh()
        from .native import gather_read

        self._gather = gather_read

    def _refresh(self) -> None:
        """Recompute what the read paths cache (after the chain's geometry changed)."""
        self._size = self.chain[0].virtual_size
        self._maps: dict[int, tuple[list[int], list[Segment]]] = {}
        # Per level, what the read fast path needs, without attribute lookups.
        self._levels = [(f.virtual_size, f.block_size, f.geometry.chunk_ratio,
                         f.logical_sector_size, f.bat, not f.overlay, f) for f in self.chain]
        self._fds = [f.fd for f in self.chain]
        reader = self._make_native()
        # (offset, buffer) -> bytes read, and (offset, size) -> bytes; None: take the Python path
        self._native: Callable[[int, WriteableBuffer], int | None] | None
        self._native_read: Callable[[int, int], bytes | None] | None
        self._native = reader.fast if reader is not None else None
        self._native_read = reader.read if reader is not None else None

    def _make_native(self) -> ChainReader | None:
        """The C read path (:class:`vhdx.native.ChainReader`), or None: no
        extension, or a file with a replayed log (its overlay patches reads, which
        only the Python path does)."""
        from .native import HAVE_CHAIN_READER, ChainLevel, ChainReader

        if not HAVE_CHAIN_READER or any(f.overlay or f.closed or f.fd < 0 for f in self.chain):
            return None  # (fd < 0: a file object without a descriptor, read in Python)
        # A writable disk changes its top file's sector bitmaps between reads.
        cache_top = not self.writable()
        try:
            reader = ChainReader([ChainLevel(f.fd, f.bat, f.virtual_size, f.block_size,
                                             f.geometry.chunk_ratio, f.logical_sector_size,
                                             cache_top or i > 0)
                                  for i, f in enumerate(self.chain)])
        except (ValueError, OSError, TypeError, BufferError):
            return None  # unusual geometry: the Python path handles it
        return reader

    # --- properties of the top file ----------------------------------------------
    @property
    def top(self) -> ImageFile:
        return self.chain[0]

    @property
    def size(self) -> int:
        return self._size

    @property
    def logical_sector_size(self) -> int:
        return self.top.logical_sector_size

    @property
    def physical_sector_size(self) -> int:
        return self.top.physical_sector_size

    @property
    def block_size(self) -> int:
        return self.top.block_size

    @property
    def virtual_disk_id(self) -> uuid.UUID:
        return self.top.virtual_disk_id

    @property
    def data_write_guid(self) -> uuid.UUID:
        return self.top.data_write_guid

    @property
    def creator(self) -> str:
        return self.top.creator

    @property
    def parent_locator(self) -> dict[str, str] | None:
        return self.top.parent_locator

    @property
    def path(self) -> str:  # type: ignore[override]  # NotCopyable's attribute, read-only here: the top's
        return self.top.path

    # --- resolution --------------------------------------------------------------
    def _resolve(self, level: int, offset: int, length: int, base: int, out: list[Segment]) -> None:
        """Append the segments of virtual range [offset, offset+length) at ``level``."""
        img = self.chain[level]
        end = offset + length
        vsize = img.virtual_size
        if end > vsize:
            if offset >= vsize:
                _emit(out, offset - base, length, ZERO, 0)
                return
            tail_start = vsize
        else:
            tail_start = end
        geo = img.geometry
        bs = geo.block_size
        cr = geo.chunk_ratio
        bat = img.bat
        has_parent = level + 1 < len(self.chain)
        pos = offset
        while pos < tail_start:
            block = pos // bs
            bstart = block * bs
            n = min(tail_start, bstart + bs) - pos
            e = bat[block + block // cr]
            state = e & 7
            if state == S.PAYLOAD_BLOCK_FULLY_PRESENT:
                _emit(out, pos - base, n, level, (e & S.BAT_OFFSET_MASK) + pos - bstart)
            elif state == S.PAYLOAD_BLOCK_PARTIALLY_PRESENT:
                self._resolve_partial(level, img, block, bstart, e & S.BAT_OFFSET_MASK, pos, n, base, out)
            elif state == S.PAYLOAD_BLOCK_NOT_PRESENT:
                if has_parent:
                    self._resolve(level + 1, pos, n, base, out)
                else:
                    _emit(out, pos - base, n, UNALLOCATED, 0)
            else:  # ZERO, UNDEFINED, UNMAPPED
                _emit(out, pos - base, n, ZERO, 0)
            pos += n
        if tail_start < end:
            _emit(out, tail_start - base, end - tail_start, ZERO, 0)

    def _resolve_partial(self, level: int, img: ImageFile, block: int, bstart: int, foff: int,
                         pos: int, n: int, base: int, out: list[Segment]) -> None:
        runs = img.block_runs(block)
        lss = img.logical_sector_size
        rel, rel_end = pos - bstart, pos - bstart + n
        i = bisect.bisect_right(runs, (rel // lss, 1 << 62, True)) - 1
        while rel < rel_end:
            s, cnt, present = runs[i]
            run_end = min((s + cnt) * lss, rel_end)
            if present:
                _emit(out, bstart + rel - base, run_end - rel, level, foff + rel)
            elif level + 1 < len(self.chain):
                self._resolve(level + 1, bstart + rel, run_end - rel, base, out)
            else:
                _emit(out, bstart + rel - base, run_end - rel, UNALLOCATED, 0)
            rel = run_end
            i += 1

    def _block_map(self, block: int) -> tuple[list[int], list[Segment]]:
        """The resolved segments of a whole top-level block, cached: sequential reads
        through a block whose sector bitmaps fragment it share one resolution."""
        cached = self._maps.get(block)
        if cached is None:
            bs = self._levels[0][1]
            start = block * bs
            segs: list[Segment] = []
            self._resolve(0, start, min(bs, self._size - start), start, segs)
            cached = ([seg[0] for seg in segs], segs)
            if len(self._maps) >= _MAP_CACHE_BLOCKS:
                self._maps.clear()  # bounded memory; a map is cheap to rebuild
            self._maps[block] = cached
        return cached

    def _mapped_segments(self, offset: int, length: int) -> list[Segment]:
        """Like :meth:`segments`, cut out of the cached block maps."""
        bs = self._levels[0][1]
        out: list[Segment] = []
        pos, end = offset, offset + length
        while pos < end:
            block = pos // bs
            bstart = block * bs
            rel, rel_end = pos - bstart, min(end, bstart + bs) - bstart
            starts, segs = self._block_map(block)
            i = bisect.bisect_right(starts, rel) - 1
            while i < len(segs) and segs[i][0] < rel_end:
                s0, n, src, foff = segs[i]
                a, b = max(s0, rel), min(s0 + n, rel_end)
                _emit(out, bstart + a - offset, b - a, src, foff + (a - s0) if src >= 0 else 0)
                i += 1
            pos = bstart + rel_end
        return out

    def segments(self, offset: int, length: int) -> list[Segment]:
        """Where [offset, offset+length) comes from: ``[pos, length, source,
        file_offset]`` lists (pos relative to ``offset``; source a chain index,
        ZERO or UNALLOCATED), neighbours coalesced. Costs time in proportion to
        the runs of equal BAT entries in the range, not to its size."""
        out: list[Segment] = []
        if length > 0:
            self._resolve_runs(0, offset, offset + length, offset, out)
        return out

    def _resolve_runs(self, level: int, lo: int, hi: int, base: int, out: list[Segment]) -> None:
        """:meth:`_resolve`'s rules applied to runs of equal entries (FORMAT.md §8.1):
        NOT_PRESENT stretches (the gaps between runs) go to the parent as one range."""
        if level == len(self.chain):
            _emit(out, lo - base, hi - lo, UNALLOCATED, 0)
            return
        img = self.chain[level]
        vsize = img.virtual_size
        if hi > vsize:
            if lo < vsize:
                self._resolve_runs(level, lo, vsize, base, out)
            lo = max(lo, vsize)
            _emit(out, lo - base, hi - lo, ZERO, 0)  # past this file's end: zeros
            return
        bs = img.block_size
        pos = lo
        b0, b1 = lo // bs, -(-hi // bs)
        runs: Iterable[tuple[int, int, int]]
        if b1 - b0 <= 8:  # a few blocks (a bitmap run's hole): direct lookups are cheaper
            bat, cr = img.bat, img.geometry.chunk_ratio
            runs = [(b, 1, e) for b in range(b0, b1) if (e := bat[b + b // cr])]
        else:
            runs = img.payload_runs(b0, b1)
        for block, n, e in runs:
            rs, re = max(lo, block * bs), min(hi, (block + n) * bs)
            if pos < rs:
                self._resolve_runs(level + 1, pos, rs, base, out)
            state = e & 7
            if state == S.PAYLOAD_BLOCK_FULLY_PRESENT:
                for b in range(block, block + n):  # n > 1 only if entries repeat an offset
                    a, z = max(rs, b * bs), min(re, (b + 1) * bs)
                    _emit(out, a - base, z - a, level, (e & _OFFSET_MASK) + a - b * bs)
            elif state == S.PAYLOAD_BLOCK_PARTIALLY_PRESENT:
                for b in range(block, block + n):  # the bitmap's holes: under one block each
                    a, z = max(rs, b * bs), min(re, (b + 1) * bs)
                    self._resolve_partial(level, img, b, b * bs, e & _OFFSET_MASK, a, z - a, base, out)
            elif state == S.PAYLOAD_BLOCK_NOT_PRESENT:  # state 0 with stray bits: still absent
                self._resolve_runs(level + 1, rs, re, base, out)
            else:  # ZERO, UNDEFINED, UNMAPPED
                _emit(out, rs - base, re - rs, ZERO, 0)
            pos = re
        if pos < hi:
            self._resolve_runs(level + 1, pos, hi, base, out)

    # --- positional reads (thread-safe) ----------------------------------------------
    def _locate(self, offset: int, size: int) -> tuple[int, int]:
        """Fast path: the single source of [offset, offset+size), if there is one.

        Returns (source, file_offset) with source a chain index or ZERO; (-3, 0)
        when the range has several sources and needs the general resolver.
        Most small reads (random 4 KiB) fall in one block of one file.
        """
        end = offset + size
        for level, (vsize, bs, cr, lss, bat, plain, img) in enumerate(self._levels):
            if end > vsize:
                return (ZERO, 0) if offset >= vsize else (-3, 0)
            block = offset // bs
            bstart = block * bs
            if end > bstart + bs:
                return -3, 0
            e = bat[block + block // cr]
            state = e & 7
            if state == 6:
                return (level, (e & _OFFSET_MASK) + offset - bstart) if plain else (-3, 0)
            if state == 7:
                runs = img.block_runs(block)
                rel = offset - bstart
                s0, cnt, present = runs[bisect.bisect_right(runs, (rel // lss, 1 << 62, True)) - 1]
                if end - bstart > (s0 + cnt) * lss:
                    return -3, 0
                if present:
                    return (level, (e & _OFFSET_MASK) + rel) if plain else (-3, 0)
            elif state != 0:
                return ZERO, 0
        return UNALLOCATED, 0

    def readinto_at(self, offset: int, buffer: WriteableBuffer) -> int:
        """Fill ``buffer`` from virtual ``offset``; returns bytes read (short at the end)."""
        fast = self._native
        # One C call resolves and reads the whole range (GIL released). Anything
        # unusual (a non-contiguous or read-only buffer, a negative offset, an I/O
        # error, a corrupt entry) gives None: the Python path below validates and raises.
        if fast is not None and (n := fast(offset, buffer)) is not None:
            return n
        mv = memoryview(buffer)
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        n = len(mv)
        if offset + n > self._size:
            n = max(0, self._size - offset)
            mv = mv[:n]
        if n and offset >= 0:
            src, foff = self._locate(offset, n)
            if src >= 0:
                fd = self._fds[src]
                if fd < 0:
                    self._pread_level(src, mv, foff)
                    return n
                try:
                    got = os.preadv(fd, [mv], foff)
                except OSError as e:
                    self._raise_read_error(src, e)
                if got < n:
                    pread_into(self._fds[src], mv[got:], foff + got, self.chain[src].path)
                return n
            if src != -3 and not self.closed:
                self._zero(mv, 0, n)
                return n
        if self.closed:
            raise ValueError("I/O operation on closed disk")
        if offset < 0:
            raise InvalidArgumentError(f"negative offset {offset}")
        if n == 0:
            return 0
        batches: dict[int, list[tuple[int, int, int]]] = {}
        for pos, length, src, foff in self._mapped_segments(offset, n):
            if src < 0:
                self._zero(mv, pos, length)
            else:
                batches.setdefault(src, []).append((pos, foff, length))
        for src, batch in batches.items():
            img = self.chain[src]
            if len(batch) >= 4 and img.fd >= 0:  # many runs (sector bitmaps): one C call, GIL released
                try:
                    self._gather(img.fd, mv, batch)
                except OSError as e:
                    raise VhdxIOError.from_os(e, img.path, "read failed") from None
            else:
                for pos, foff, length in batch:
                    img.pread_into(mv[pos:pos + length], foff)
            if img.overlay:
                for pos, foff, length in batch:
                    if img.overlay.touches(foff, length):
                        img.overlay.patch(foff, mv[pos:pos + length])
        return n

    @staticmethod
    def _zero(mv: memoryview, pos: int, length: int) -> None:
        end = pos + length
        while pos < end:
            k = min(len(_ZEROS), end - pos)
            mv[pos:pos + k] = _ZEROS[:k]
            pos += k

    def read_at(self, offset: int, size: int) -> bytes:
        """``size`` bytes from virtual ``offset`` (fewer at the end of the disk)."""
        # One C call builds the result at its final length and reads straight
        # into it (GIL released); None sends the read to the checks below.
        native = self._native_read
        if native is not None and (data := native(offset, size)) is not None:
            return data
        n = self._size - offset
        if size < n:
            n = size
        if 0 < n <= 1 << 20 and offset >= 0:
            # Fast path first: most small reads have one source; the checks below
            # cost as much as the lookup, so they run only when it fails.
            src, foff = self._locate(offset, n)
            if src >= 0 and self._fds[src] >= 0:
                try:
                    piece = os.pread(self._fds[src], n, foff)
                except OSError as e:
                    self._raise_read_error(src, e)
                return piece if len(piece) == n else piece + bytes(n - len(piece))
            if src < 0 and src != -3 and not self.closed:
                return bytes(n)
        if self.closed:
            raise ValueError("I/O operation on closed disk")
        if size < 0:
            raise InvalidArgumentError(f"negative size {size}")
        if offset < 0:
            raise InvalidArgumentError(f"negative offset {offset}")
        n = max(0, n)
        buf = bytearray(n)
        got = self.readinto_at(offset, buf)
        return bytes(buf) if got == n else bytes(buf[:got])

    def _pread_level(self, src: int, mv: memoryview, foff: int) -> None:
        if self.closed:
            raise ValueError("I/O operation on closed disk")
        self.chain[src].pread_into(mv, foff)

    def _raise_read_error(self, src: int, e: OSError) -> NoReturn:
        if self.closed:
            raise ValueError("I/O operation on closed disk") from None
        raise VhdxIOError.from_os(e, self.chain[src].path, "read failed") from None

    # --- io.RawIOBase ------------------------------------------------------------
    def readable(self) -> bool:
        return True

    def write(self, data: ReadableBuffer) -> int:
        """Write at the current position (``write_at``); ReadOnlyError on a disk
        opened read-only (``vhdx.open(path, "r+")`` opens it writable)."""
        if not self.writable():
            raise self._read_only()
        n = self.write_at(self._pos, memoryview(data))
        self._pos += n
        return n

    def truncate(self, size: int | None = None) -> int:
        """Refused: ReadOnlyError on a read-only disk; a writable one changes size
        with :meth:`resize` (a virtual disk has no end to cut at the position)."""
        if not self.writable():
            raise self._read_only()
        raise io.UnsupportedOperation("truncate: a virtual disk changes size with resize()")

    # The writing API of the writable subclasses, refused here by name rather than
    # with an AttributeError, so that "opened read-only" is what the caller learns.
    def write_at(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        raise self._read_only()

    def write_zeroes_at(self, offset: int, length: int) -> None:
        raise self._read_only()

    def resize(self, new_size: int) -> None:
        raise self._read_only()

    def _read_only(self) -> ReadOnlyError:
        return ReadOnlyError(f"{self.path}: opened read-only (open it with mode 'r+' to write)")

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        # Straight into the C reader when no subclass wraps readinto_at (a writable
        # disk commits first): one Python frame less per call of BufferedReader,
        # hashlib.file_digest or shutil.copyfileobj.
        fast = self._native
        if fast is not None and self._direct and (got := fast(self._pos, buffer)) is not None:
            self._pos += got
            return got
        got = self.readinto_at(self._pos, buffer)
        self._pos += got
        return got

    def read(self, size: int | None = -1) -> bytes:
        """Up to ``size`` bytes from the current position (all the rest for -1 or
        None). Overrides ``RawIOBase.read``, which would read into a temporary
        buffer and copy it: here the result is built once and filled in place."""
        if size is None or size < 0:
            return self.readall()
        native = self._native_read
        if native is None or not self._direct or (data := native(self._pos, size)) is None:
            data = self.read_at(self._pos, size)
        self._pos += len(data)
        return data

    def readall(self) -> bytes:
        """Everything from the current position to the end of the disk."""
        data = self.read_at(self._pos, max(0, self._size - self._pos))
        self._pos += len(data)
        return data

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            new = offset
        elif whence == io.SEEK_CUR:
            new = self._pos + offset
        elif whence == io.SEEK_END:
            new = self.size + offset
        else:
            raise InvalidArgumentError(f"invalid whence {whence}")
        if new < 0:
            raise InvalidArgumentError(f"negative seek position {new}")
        self._pos = new
        return new

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        if not self.closed:
            self._native = self._native_read = None
            for f in self.chain:
                f.close()
            self._fds = [-1] * len(self.chain)
        super().close()

    # --- maps --------------------------------------------------------------------
    def extents(self, offset: int = 0, length: int | None = None) -> list[Extent]:
        """The extent map of [offset, offset+length): where every byte comes from."""
        if length is None:
            length = self.size - offset
        out: list[Extent] = []
        # The resolver works by runs of equal entries, so a piece can be large; the
        # pieces only bound the segment list of a heavily fragmented disk.
        step = 1 << 40
        pos = offset
        end = min(offset + length, self.size)
        while pos < end:
            n = min(step, end - pos)
            for p, ln, src, foff in self.segments(pos, n):
                kind: ExtentKind = "data" if src >= 0 else ("zero" if src == ZERO else "unallocated")
                vo = pos + p
                if out:
                    last = out[-1]
                    if (last.kind == kind and last.source == (src if src >= 0 else None)
                            and last.offset + last.length == vo
                            and (src < 0 or (last.file_offset is not None
                                             and last.file_offset + last.length == foff))):
                        out[-1] = Extent(last.offset, last.length + ln, kind, last.source, last.file_offset)
                        continue
                out.append(Extent(vo, ln, kind, src if src >= 0 else None, foff if src >= 0 else None))
            pos += n
        return out

    def partitions(self) -> list[Partition]:
        """The MBR or GPT partitions of the disk (:func:`vhdx.partitions.read_partitions`);
        recoverable damage goes to :attr:`warnings`."""
        from .partitions import read_partitions

        found: list[str] = []
        parts = read_partitions(self, found)
        self.warnings += [w for w in found if w not in self.warnings]  # once, however often asked
        return parts

    def __repr__(self) -> str:
        return f"<VirtualDisk {self.path!r} size={self.size} chain={len(self.chain)}>"


@converts_os_errors
def open(path: str | os.PathLike[str] | ReadableObject, mode: ReadMode = "r", *,  # noqa: A001 - mirrors io.open
         parents: Sequence[str | os.PathLike[str] | ReadableObject] | None = None,
         search_dirs: Sequence[str | os.PathLike[str]] = (),
         ignore_linkage: bool = False, force_share: bool = False,
         confine: Sequence[str | os.PathLike[str]] | None = None,
         opener: Callable[[str], object] | None = None) -> VirtualDisk:
    """Open a VHDX/AVHDX file and its whole parent chain read-only.

    This is the VHDX reader below the writers; :func:`vhdx.open` (the format
    dispatch, :mod:`vhdx.formats`) adds VHD files and mode "r+", and documents
    the arguments. A dirty log is replayed in memory; no byte of any file is
    ever written.
    """
    if mode not in ("r", "rb"):
        raise InvalidArgumentError(f"mode {mode!r} is not supported here (vhdx.open opens 'r+')")
    from .chain import open_chain

    chain, warnings = open_chain(path, parents, search_dirs, ignore_linkage, opener=opener,
                                 confine=confine, force_share=force_share)
    return VirtualDisk(chain, warnings)
