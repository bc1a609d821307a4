#!/usr/bin/env python3
"""Deterministic benchmark images for bench/bench_read.py.

Built with ``vhdx.layout`` (headers, regions, metadata, empty BAT) plus raw
pokes of payload blocks, sector bitmaps and the BAT, streaming block by block
(never more than one block in memory). Payload data is non-zero pseudo-random:
a 64 MiB seeded pool (numpy PCG64) XOR-ed with a per-block 64-bit key, so
every block is distinct and incompressible-looking; no dedup or zero detection
can help any reader.

Images (``--small`` divides every virtual size by 8, for smoke tests):

* ``dynamic.vhdx``  4 GiB dynamic, 32 MiB blocks, ~60 % of the blocks
  FULLY_PRESENT (random choice), the rest NOT_PRESENT.
* ``fixed.vhdx``    2 GiB fixed, 32 MiB blocks, every block written.
* ``base.vhdx`` <- ``child1.avhdx`` <- ``child2.avhdx``: a 3-deep chain,
  2 GiB virtual. base: dynamic, 32 MiB blocks, ~60 % present. children: 2 MiB
  blocks (Hyper-V checkpoint default), child1 touches ~40 % of its blocks,
  child2 ~25 %; of the touched blocks 1/3 are FULLY_PRESENT (bitmap bits all
  ones, as Hyper-V writes them) and 2/3 PARTIALLY_PRESENT with runs of present
  sectors in 4 KiB granularity (run lengths 4 KiB .. 256 KiB, alternating
  present / absent). Sector-bitmap blocks PRESENT for every chunk.

Usage: python3 bench/make_images.py [--dir bench/work] [--small] [--force]
Prints the image directory; a ``manifest.json`` there records what was built.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import uuid
import zlib
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from vhdx import structures as s  # noqa: E402
from vhdx.layout import ParentInfo, plan_layout, write_new_image  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
VERSION = 1  # bump when the recipe changes (forces a rebuild)

_POOL: np.ndarray | None = None


def pool() -> np.ndarray:
    global _POOL
    if _POOL is None:
        g = np.random.Generator(np.random.PCG64(0x5EED))
        _POOL = g.integers(1, 1 << 63, size=(64 * MiB) // 8, dtype=np.uint64)
    return _POOL


def block_data(key: int, size: int) -> bytes:
    """``size`` bytes (multiple of 8, <= 32 MiB) of pseudo-random data for ``key``."""
    p = pool()
    n = size // 8
    start = (key * 7919) % (len(p) - n + 1)
    k = np.uint64((key * 0x9E3779B97F4A7C15 + 1) & 0xFFFFFFFFFFFFFFFF)
    return (p[start:start + n] ^ k).tobytes()


def det_guid(name: str, what: str) -> uuid.UUID:
    return uuid.uuid5(uuid.NAMESPACE_URL, f"vhdx-bench:{VERSION}:{name}:{what}")


def _bitmap_runs(rng: random.Random, nsect: int, lss: int) -> bytes:
    """Sector bitmap (LSB-first) of alternating runs in 4 KiB granularity."""
    gran = 4096 // lss
    units = nsect // gran
    bits = np.zeros(nsect, dtype=np.uint8)
    val = rng.randrange(2)
    u = 0
    while u < units:
        ln = min(units - u, rng.choice((1, 1, 2, 3, 4, 8, 16, 32, 64)))
        if val:
            bits[u * gran:(u + ln) * gran] = 1
        u += ln
        val ^= 1
    return np.packbits(bits, bitorder="little").tobytes()


def build(path: Path, *, virtual_size: int, block_size: int, fixed: bool = False,
          density: float = 0.6, parent: dict | None = None, partial_frac: float = 0.0,
          seed: int = 0) -> dict:
    """Build one image; returns a manifest entry (incl. its DataWriteGuid)."""
    name = path.name
    pinfo = None
    if parent is not None:
        pinfo = ParentInfo(uuid.UUID(parent["data_write_guid"]), relative_path=".\\" + parent["name"],
                           absolute_win32_path="C:\\bench\\" + parent["name"])
    plan = plan_layout(virtual_size, block_size, 512, 4096, fixed, pinfo, "vhdx bench/make_images.py",
                       file_write_guid=det_guid(name, "fwg"), data_write_guid=det_guid(name, "dwg"),
                       virtual_disk_id=det_guid("disk", "vdid"))
    write_new_image(path, plan)
    geo = plan.geometry
    cr = plan.chunk_ratio
    rng = random.Random(f"{seed}:{name}")
    bat = bytearray(plan.bat_length)
    spb = block_size // 512
    slice_len = spb // 8
    sb: dict[int, bytearray] = {}
    differencing = parent is not None
    if differencing:
        sb = {c: bytearray(MiB) for c in range(plan.sector_bitmap_blocks)}
    counts = {"fully": 0, "partial": 0, "not_present": 0}
    next_free = plan.file_size
    with open(path, "r+b") as fh:
        for b in range(plan.payload_blocks):
            nbytes = min(block_size, virtual_size - b * block_size)
            if fixed:
                off = plan.fixed_block_offset(b)
                state = s.PAYLOAD_BLOCK_FULLY_PRESENT
            elif rng.random() < density:
                state = (s.PAYLOAD_BLOCK_PARTIALLY_PRESENT if rng.random() < partial_frac
                         else s.PAYLOAD_BLOCK_FULLY_PRESENT)
                off = next_free
                next_free += block_size
            else:
                state = s.PAYLOAD_BLOCK_NOT_PRESENT
                off = 0
            if state == s.PAYLOAD_BLOCK_NOT_PRESENT:
                counts["not_present"] += 1
            else:
                counts["fully" if state == s.PAYLOAD_BLOCK_FULLY_PRESENT else "partial"] += 1
                fh.seek(off)
                fh.write(block_data(seed * 1_000_003 + b + zlib.crc32(name.encode()) % 9973, nbytes))
            idx = geo.payload_index(b)
            bat[idx * 8:idx * 8 + 8] = s.bat_entry(state, off).to_bytes(8, "little")
            if differencing:
                chunk, j = divmod(b, cr)
                if state == s.PAYLOAD_BLOCK_PARTIALLY_PRESENT:
                    bits = _bitmap_runs(rng, spb, 512)
                elif state == s.PAYLOAD_BLOCK_FULLY_PRESENT:
                    bits = b"\xff" * slice_len
                else:
                    bits = None
                if bits:
                    sb[chunk][j * slice_len:(j + 1) * slice_len] = bits
        for chunk, img in sb.items():
            off = next_free
            next_free += MiB
            fh.seek(off)
            fh.write(img)
            idx = chunk * (cr + 1) + cr
            bat[idx * 8:idx * 8 + 8] = s.bat_entry(s.SB_BLOCK_PRESENT, off).to_bytes(8, "little")
        fh.seek(plan.bat_offset)
        fh.write(bat)
        fh.truncate(max(next_free, plan.file_size))
    return {"name": name, "virtual_size": virtual_size, "block_size": block_size, "fixed": fixed,
            "differencing": differencing, "data_write_guid": str(plan.data_write_guid),
            "bat_bytes": plan.bat_length, "file_size": os.path.getsize(path), **counts}


def make_all(directory: Path, small: bool = False, force: bool = False) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    man_path = directory / "manifest.json"
    div = 8 if small else 1
    want = {"version": VERSION, "small": small}
    if man_path.exists() and not force:
        man = json.loads(man_path.read_text())
        if all(man.get(k) == v for k, v in want.items()) and all(
                (directory / im["name"]).exists() for im in man["images"].values()):
            return man
    t0 = time.monotonic()
    images = {}
    images["dynamic"] = build(directory / "dynamic.vhdx", virtual_size=4 * GiB // div,
                              block_size=32 * MiB, density=0.6, seed=1)
    images["fixed"] = build(directory / "fixed.vhdx", virtual_size=2 * GiB // div,
                            block_size=32 * MiB, fixed=True, seed=2)
    base = build(directory / "base.vhdx", virtual_size=2 * GiB // div, block_size=32 * MiB,
                 density=0.6, seed=3)
    c1 = build(directory / "child1.avhdx", virtual_size=2 * GiB // div, block_size=2 * MiB,
               density=0.4, partial_frac=2 / 3, parent=base, seed=4)
    c2 = build(directory / "child2.avhdx", virtual_size=2 * GiB // div, block_size=2 * MiB,
               density=0.25, partial_frac=2 / 3, parent=c1, seed=5)
    images["base"], images["child1"], images["child2"] = base, c1, c2
    man = dict(want, images=images, build_seconds=round(time.monotonic() - t0, 1))
    man_path.write_text(json.dumps(man, indent=1))
    return man


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default=str(HERE / "work"))
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args()
    d = Path(a.dir) / ("small" if a.small else "full")
    man = make_all(d, a.small, a.force)
    print(json.dumps(man, indent=1))
    print(d)
    return 0


if __name__ == "__main__":
    sys.exit(main())
