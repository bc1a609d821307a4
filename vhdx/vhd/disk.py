"""The virtual disk seen through a VHD / AVHD chain: :class:`VhdDisk`.

A :class:`vhdx.VirtualDisk` whose resolution follows the VHD rules (vhd.md §7): a
fixed file maps 1:1; a dynamic or differencing block is unallocated (parent,
else zeros) or allocated, in which case each sector's bit in the MSB-first
sector bitmap says "this file" (1) or "parent / zeros" (0). Past a parent's
end the disk reads zeros. Everything above resolution (positional reads, the
block-map cache, gather reads, extents, the stream API) is the VHDX disk's.

Reads go through the C chain reader with VHD levels
(:class:`vhdx.vhd.native_read.VhdChainReader`: one call per read, GIL
released) when the extension is built; the Python resolver below is the
reference and the fallback: one pread per run of one source, reads split over
many bitmap runs through :func:`vhdx.native.gather_read`.
"""

from __future__ import annotations

import bisect
import os
import uuid
from collections.abc import Sequence

from .. import native
from ..disk import UNALLOCATED, ZERO, Segment, VirtualDisk, _emit
from ..errors import InvalidArgumentError
from . import structures as S
from .file import VhdFile
from .native_read import VhdChainReader

PathLike = str | os.PathLike[str]


class VhdDisk(VirtualDisk):
    """A read-only virtual disk over a chain of VHD/AVHD files (child first)."""

    chain: list[VhdFile]  # type: ignore[assignment]

    def _refresh(self) -> None:
        self._size = self.chain[0].virtual_size
        self._maps: dict[int, tuple[list[int], list[Segment]]] = {}
        top = self.chain[0]
        # The block-map cache of VirtualDisk keys on the top file's block size.
        self._levels = [(top.virtual_size, top.block_size)]  # type: ignore[list-item]
        self._fds = [f.fd for f in self.chain]
        reader = self._make_native()
        self._native = reader.fast if reader is not None else None
        self._native_read = reader.read if reader is not None else None
        self._reader = reader

    def _make_native(self) -> VhdChainReader | None:
        """The C read path over VHD levels, or None (no extension, a closed file)."""
        if not native.HAVE_CHAIN_READER or any(f.closed or f.fd < 0 for f in self.chain):
            return None
        try:  # a writer changes its top file's bitmaps between reads
            return VhdChainReader(self.chain, cache_top=not self.writable())
        except (ValueError, OSError, TypeError, BufferError, NotImplementedError):
            return None  # the Python resolver handles it

    # --- properties --------------------------------------------------------------
    @property
    def top(self) -> VhdFile:  # type: ignore[override]
        return self.chain[0]

    @property
    def format(self) -> str:
        return "vhd"

    @property
    def physical_sector_size(self) -> int:
        return S.SECTOR

    @property
    def virtual_disk_id(self) -> uuid.UUID:
        return self.top.virtual_disk_id

    @property
    def data_write_guid(self) -> uuid.UUID:
        return self.top.virtual_disk_id

    @property
    def unique_id(self) -> bytes:
        return self.top.unique_id

    # --- resolution --------------------------------------------------------------
    def _resolve(self, level: int, offset: int, length: int, base: int, out: list[Segment]) -> None:
        img = self.chain[level]
        end = offset + length
        vsize = img.virtual_size
        if offset >= vsize:
            _emit(out, offset - base, length, ZERO, 0)
            return
        tail_start = min(end, vsize)
        has_parent = level + 1 < len(self.chain)
        if img.is_fixed:
            _emit(out, offset - base, tail_start - offset, level, offset)
        else:
            bs = img.block_size
            bat = img.bat
            bm = img.bitmap_size
            pos = offset
            while pos < tail_start:
                block = pos // bs
                bstart = block * bs
                n = min(tail_start, bstart + bs) - pos
                e = bat[block]
                if e == S.UNUSED:
                    if has_parent:
                        self._resolve(level + 1, pos, n, base, out)
                    else:
                        _emit(out, pos - base, n, UNALLOCATED, 0)
                else:
                    data = e * S.SECTOR + bm
                    runs = img.block_runs(block)
                    if len(runs) == 1 and runs[0][2]:
                        _emit(out, pos - base, n, level, data + pos - bstart)
                    else:
                        self._resolve_bitmap_runs(level, runs, bstart, data, pos, n, base, has_parent, out)
                pos += n
        if tail_start < end:
            _emit(out, tail_start - base, end - tail_start, ZERO, 0)

    def segments(self, offset: int, length: int) -> list[Segment]:
        """As :meth:`VirtualDisk.segments`, resolved block by block through the VHD BAT."""
        out: list[Segment] = []
        if length > 0:
            self._resolve(0, offset, length, offset, out)
        return out

    def _resolve_bitmap_runs(self, level: int, runs: list[tuple[int, int, bool]], bstart: int, data: int,
                             pos: int, n: int, base: int, has_parent: bool, out: list[Segment]) -> None:
        rel, rel_end = pos - bstart, pos - bstart + n
        i = bisect.bisect_right(runs, (rel // S.SECTOR, 1 << 62, True)) - 1
        while rel < rel_end:
            s, cnt, present = runs[i]
            run_end = min((s + cnt) * S.SECTOR, rel_end)
            if present:
                _emit(out, bstart + rel - base, run_end - rel, level, data + rel)
            elif has_parent:
                self._resolve(level + 1, bstart + rel, run_end - rel, base, out)
            else:
                _emit(out, bstart + rel - base, run_end - rel, UNALLOCATED, 0)
            rel = run_end
            i += 1

    def _locate(self, offset: int, size: int) -> tuple[int, int]:
        """Single source of [offset, offset+size) or (-3, 0) (see VirtualDisk)."""
        end = offset + size
        for level, img in enumerate(self.chain):
            vsize = img.virtual_size
            if end > vsize:
                return (ZERO, 0) if offset >= vsize else (-3, 0)
            if img.is_fixed:
                return level, offset
            bs = img.block_size
            block = offset // bs
            bstart = block * bs
            if end > bstart + bs:
                return -3, 0
            e = img.bat[block]
            if e == S.UNUSED:
                continue
            runs = img.block_runs(block)
            rel = offset - bstart
            if len(runs) == 1:
                if runs[0][2]:
                    return level, e * S.SECTOR + img.bitmap_size + rel
                continue
            s0, cnt, present = runs[bisect.bisect_right(runs, (rel // S.SECTOR, 1 << 62, True)) - 1]
            if end - bstart > (s0 + cnt) * S.SECTOR:
                return -3, 0
            if present:
                return level, e * S.SECTOR + img.bitmap_size + rel
        return UNALLOCATED, 0

    def __repr__(self) -> str:
        return f"<VhdDisk {self.path!r} size={self.size} chain={len(self.chain)}>"


def open_vhd(path: PathLike, mode: str = "r", *, parents: Sequence[PathLike] | None = None,
             search_dirs: Sequence[PathLike] = (), ignore_linkage: bool = False,
             ignore_checksums: bool = False, force_share: bool = False) -> VhdDisk:
    """Open a VHD/AVHD and its chain read-only (``vhdx.open`` routes here by
    signature and builds a :class:`vhdx.vhd.writer.VhdWritableDisk` for "r+").
    Locks and ``force_share`` as for VHDX."""
    if mode not in ("r", "rb"):
        raise InvalidArgumentError(f"mode {mode!r} is not supported here (vhdx.open opens 'r+')")
    from .chain import open_chain

    chain, warnings = open_chain(path, parents, search_dirs, ignore_linkage, ignore_checksums,
                                 force_share=force_share)
    return VhdDisk(chain, warnings)  # type: ignore[arg-type]
