"""Image composer for bench/bench_merge.py: a dynamic parent and a differencing child
written with :mod:`vhdx.layout` plus raw pwrites of payload blocks, the sector
bitmap and the non-zero part of the BAT (the rest of a huge BAT stays a hole),
and an independent ground truth (SHA-256 of the virtual disk computed from the
description, never from the files).

The "changes" live in the first ``region`` bytes of the disk (the whole disk for
the 4 GiB case, the first 4 GiB of a 64 TiB disk for the scaling case): the same
recipe -> the same bytes, whatever the virtual size.
"""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass, field

from vhdx import structures as S
from vhdx.layout import ParentInfo, plan_layout, write_new_image

MiB = S.MiB
GiB = 1024 * MiB
POOL_SIZE = 96 * MiB
PAGE = 4096


@dataclass
class Recipe:
    region: int  # bytes of the disk that hold data (multiple of parent_bs)
    parent_bs: int = 32 * MiB
    child_bs: int = 2 * MiB
    parent_fill: float = 0.5  # fraction of parent blocks in the region that are present
    child_full: int = 1024  # FULLY_PRESENT child blocks
    child_partial: int = 256  # PARTIALLY_PRESENT child blocks (about half their sectors defined)
    seed: int = 7
    lss: int = 512
    # Write only the defined runs of partially-present blocks (the rest of the block
    # stays a hole, as this project's writer leaves it) instead of whole blocks.
    sparse_partial: bool = False

    def layout(self) -> "Layout":
        rng = random.Random(self.seed)
        pblocks = self.region // self.parent_bs
        present = sorted(rng.sample(range(pblocks), round(pblocks * self.parent_fill)))
        cblocks = self.region // self.child_bs
        chosen = rng.sample(range(cblocks), self.child_full + self.child_partial)
        full = sorted(chosen[:self.child_full])
        partial = sorted(chosen[self.child_full:])
        bitmaps = {b: _bitmap(rng, self.child_bs, self.lss) for b in partial}
        return Layout(self, present, full, partial, bitmaps)


def _bitmap(rng: random.Random, block_size: int, lss: int) -> list[tuple[int, int]]:
    """Defined runs (byte offset, length) of one block: alternating runs in 4 KiB
    granularity, each "ones" run followed by an equally long "zeros" run (~50 %)."""
    runs = []
    pos = rng.choice((0, PAGE * rng.choice((1, 2, 4))))  # start defined or not
    while pos < block_size:
        n = PAGE * rng.choice((1, 1, 2, 3, 4, 8, 16, 64))
        n = min(n, block_size - pos)
        runs.append((pos, n))
        pos += 2 * n
    return runs


@dataclass
class Layout:
    recipe: Recipe
    parent_present: list[int]
    child_full: list[int]
    child_partial: list[int]
    bitmaps: dict[int, list[tuple[int, int]]]
    _pool: bytes | None = field(default=None, repr=False)

    @property
    def pool(self) -> bytes:
        if self._pool is None:
            self._pool = random.Random(self.recipe.seed * 31 + 1).randbytes(POOL_SIZE)
        return self._pool

    @property
    def defined_bytes(self) -> int:
        """Bytes the child defines: what a merge copies."""
        r = self.recipe
        return len(self.child_full) * r.child_bs + sum(
            n for b in self.child_partial for _, n in self.bitmaps[b])

    def block_data(self, fid: int, block: int, n: int) -> bytes:
        """Deterministic, distinct content of a block: a pool slice with a 16-byte tag."""
        slots = (POOL_SIZE - n) // PAGE
        o = ((block * 2654435761 + fid * 40503) % slots) * PAGE
        tag = fid.to_bytes(8, "little") + block.to_bytes(8, "little")
        return tag + self.pool[o + 16:o + n]

    # --- files ----------------------------------------------------------------------
    def write_chain(self, directory: str, virtual_size: int) -> tuple[str, str]:
        r = self.recipe
        os.makedirs(directory, exist_ok=True)
        ppath = os.path.join(directory, "parent.vhdx")
        cpath = os.path.join(directory, "child.avhdx")
        pplan = plan_layout(virtual_size, r.parent_bs, r.lss)
        write_new_image(ppath, pplan)
        geo = pplan.geometry
        entries: dict[int, int] = {}
        off = pplan.payload_offset
        fd = os.open(ppath, os.O_RDWR)
        try:
            for b in self.parent_present:
                os.pwrite(fd, self.block_data(1, b, r.parent_bs), off)
                entries[geo.payload_index(b)] = S.bat_entry(S.PAYLOAD_BLOCK_FULLY_PRESENT, off)
                off += r.parent_bs
            _write_bat(fd, pplan.bat_offset, entries)
            os.fsync(fd)
        finally:
            os.close(fd)

        cplan = plan_layout(virtual_size, r.child_bs, r.lss,
                            parent=ParentInfo(pplan.data_write_guid, relative_path=".\\parent.vhdx",
                                              absolute_win32_path="\\\\?\\C:\\bench\\parent.vhdx"),
                            virtual_disk_id=pplan.virtual_disk_id)
        write_new_image(cpath, cplan)
        geo = cplan.geometry
        cr = geo.chunk_ratio
        spb_bytes = geo.bitmap_bytes_per_block
        entries = {}
        off = cplan.payload_offset
        sb: dict[int, bytearray] = {}
        sb_off: dict[int, int] = {}
        chunks = sorted({b // cr for b in self.child_full + self.child_partial})
        for c in chunks:  # only the chunks that hold changes get a sector bitmap block
            sb_off[c] = off
            sb[c] = bytearray(MiB)
            entries[geo.sb_index(c)] = S.bat_entry(S.SB_BLOCK_PRESENT, off)
            off += MiB
        fd = os.open(cpath, os.O_RDWR)
        try:
            full = set(self.child_full)
            for b in sorted(self.child_full + self.child_partial):
                data = self.block_data(2, b, r.child_bs)
                if r.sparse_partial and b not in full:
                    for ro, n in self.bitmaps[b]:
                        os.pwrite(fd, data[ro:ro + n], off + ro)
                else:
                    os.pwrite(fd, data, off)
                c, j = divmod(b, cr)
                sl = sb[c]
                if b in full:
                    state = S.PAYLOAD_BLOCK_FULLY_PRESENT
                    sl[j * spb_bytes:(j + 1) * spb_bytes] = b"\xff" * spb_bytes
                else:
                    state = S.PAYLOAD_BLOCK_PARTIALLY_PRESENT
                    for ro, n in self.bitmaps[b]:
                        first, count = ro // r.lss, n // r.lss
                        assert first % 8 == 0 and count % 8 == 0
                        base = j * spb_bytes + first // 8
                        sl[base:base + count // 8] = b"\xff" * (count // 8)
                entries[geo.payload_index(b)] = S.bat_entry(state, off)
                off += r.child_bs
            if os.fstat(fd).st_size < off:
                os.ftruncate(fd, off)  # the last block's unwritten tail
            for c in chunks:
                os.pwrite(fd, bytes(sb[c]), sb_off[c])
            _write_bat(fd, cplan.bat_offset, entries)
            os.fsync(fd)
        finally:
            os.close(fd)
        return ppath, cpath

    def write_cp_source(self, path: str) -> int:
        """A plain file of exactly ``defined_bytes`` bytes of the child's data."""
        r = self.recipe
        with open(path, "wb") as fh:
            for b in self.child_full:
                fh.write(self.block_data(2, b, r.child_bs))
            for b in self.child_partial:
                d = memoryview(self.block_data(2, b, r.child_bs))
                for ro, n in self.bitmaps[b]:
                    fh.write(d[ro:ro + n])
            fh.flush()
            os.fsync(fh.fileno())
        return os.path.getsize(path)

    # --- ground truth ---------------------------------------------------------------
    def expected_sha256(self) -> str:
        """SHA-256 of the virtual range [0, region) of the chain, from the description."""
        r = self.recipe
        h = hashlib.sha256()
        present = set(self.parent_present)
        full = set(self.child_full)
        partial = set(self.child_partial)
        per = r.parent_bs // r.child_bs
        zeros = bytes(r.child_bs)
        for pb in range(r.region // r.parent_bs):
            pdata = memoryview(self.block_data(1, pb, r.parent_bs)) if pb in present else None
            for k in range(per):
                b = pb * per + k
                under = pdata[k * r.child_bs:(k + 1) * r.child_bs] if pdata is not None else zeros
                if b in full:
                    h.update(self.block_data(2, b, r.child_bs))
                elif b in partial:
                    buf = bytearray(under)
                    cd = self.block_data(2, b, r.child_bs)
                    for ro, n in self.bitmaps[b]:
                        buf[ro:ro + n] = cd[ro:ro + n]
                    h.update(buf)
                else:
                    h.update(under)
        return h.hexdigest()


def _write_bat(fd: int, bat_offset: int, entries: dict[int, int]) -> None:
    if not entries:
        return
    lo, hi = min(entries), max(entries)
    buf = bytearray((hi - lo + 1) * 8)
    for i, e in entries.items():
        buf[(i - lo) * 8:(i - lo) * 8 + 8] = e.to_bytes(8, "little")
    os.pwrite(fd, bytes(buf), bat_offset + lo * 8)
