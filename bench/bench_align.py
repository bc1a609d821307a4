#!/usr/bin/env python3
"""How the kernel's copy into user memory depends on where the destination sits
relative to the source page: 1 MiB ``preadv`` calls from a cached file into an
mmap'd buffer at several (destination offset, file offset) pairs, and the same
disk read through three doors (``read_at``'s new bytes object, ``readinto_at``
into a ``bytearray``, ``readinto_at`` into a page-aligned mmap buffer).

    python3 bench/bench_align.py IMAGE [--rounds N]

IMAGE is any disk vhdx.open reads (bench/bench_vhd.py's dynamic.vhd, say); its
file must hold at least 1 GiB + 8 KiB. GB = 1e9 bytes, best of three passes of
1000 reads per pair; the doors are medians of N passes over the whole disk.
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # measure this working tree

import vhdx  # noqa: E402

MiB = 1 << 20
PAIRS = [(0, 0), (8, 0), (16, 0), (32, 0), (48, 0), (0, 16), (0, 48), (16, 16), (16, 64), (16, 512)]


def pread_rate(fd: int, buf: memoryview, file_shift: int) -> float:
    best = 0.0
    for _ in range(3):
        t = time.perf_counter()
        for i in range(1000):
            os.preadv(fd, [buf], i * MiB + 4096 + file_shift)
        best = max(best, 1000 * MiB / (time.perf_counter() - t) / 1e9)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("image")
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    area = memoryview(mmap.mmap(-1, 2 * MiB))
    fd = os.open(a.image, os.O_RDONLY)
    for i in range(1001):  # into the page cache
        os.preadv(fd, [area[:MiB]], i * MiB)
    print("| destination offset | file offset | (dest - src) mod 4096 | GB/s |")
    print("|---|---|---|---|")
    for d, f in PAIRS:
        rate = pread_rate(fd, area[d:d + MiB], f)
        print(f"| +{d} | +{f} | {(d - f) % 4096} | {rate:.1f} |")
    os.close(fd)
    disk = vhdx.open(a.image)
    ba = bytearray(MiB)
    aligned = area[:MiB]

    def door(kind: str) -> float:
        t = time.perf_counter()
        if kind == "read_at":
            for off in range(0, disk.size, MiB):
                disk.read_at(off, MiB)
        else:
            buf = ba if kind == "readinto_at (bytearray)" else aligned
            for off in range(0, disk.size, MiB):
                disk.readinto_at(off, buf)
        return time.perf_counter() - t

    kinds = ["read_at", "readinto_at (bytearray)", "readinto_at (aligned mmap)"]
    times: dict[str, list[float]] = {k: [] for k in kinds}
    door(kinds[0])
    for _ in range(a.rounds):
        for k in kinds:
            times[k].append(door(k))
    ba_at = ctypes.addressof((ctypes.c_char * MiB).from_buffer(ba)) % 4096
    print(f"\n| door (1 MiB sequential over {disk.size // MiB} MiB) | GB/s (median of {a.rounds}) |")
    print("|---|---|")
    for k in kinds:
        print(f"| {k} | {disk.size / statistics.median(times[k]) / 1e9:.1f} |")
    print(f"\nthe bytearray's data sits at {ba_at} mod 4096")
    disk.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
