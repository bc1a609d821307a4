#!/usr/bin/env python3
"""Read entry points of a disk against libvhdi's nearest equivalents.

    python3 bench/bench_entry.py [--quick] [--reps N] [--rand-ops N] [--only IMAGE,...] [--json OUT]

Rows (each over the images of bench/make_images.py: 4 GiB dynamic, 2 GiB
fixed, 3-deep chain; ``--quick`` uses the 1/8-size set):

  row             vhdx                                   libvhdi (pyvhdi)
  readinto 1M     readinto(bytearray 1 MiB) loop         read_buffer(1 MiB)
  read 1M         read(1 MiB) loop                       read_buffer(1 MiB)
  read 64K        read(64 KiB) loop                      read_buffer(64 KiB)
  copyfileobj     shutil.copyfileobj(disk, null sink)    read_buffer(64 KiB) loop (copyfileobj's size)
  file_digest     hashlib.file_digest(disk, "sha256")    read_buffer(256 KiB) + sha256 (file_digest's size)
  buffered 64K    io.BufferedReader(disk).read(64 KiB)   read_buffer(64 KiB)
  read_at 4K      random read_at(off, 4096)              read_buffer_at_offset(4096, off)
  readinto_at 4K  random readinto_at(off, buf)           read_buffer_at_offset(4096, off)
  2 threads 4K    read_at from 2 threads (rate of both)  same, each thread its own pyvhdi handle
                  and its ratio to one thread            (libvhdi's calls hold the GIL)

Each (image, reader, row) runs in its own subprocess, readers alternating;
the best of ``--reps`` passes after one warm-up is reported (page cache warm).
Sequential rows: GB/s of virtual bytes; random rows: thousands of reads/s.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(ROOT))

MiB = 1 << 20
ROWS = ["readinto1m", "read1m", "read64k", "copyfileobj", "file_digest", "buffered64k",
        "read_at4k", "readinto_at4k", "threads2", "read_at4k_cold", "threads2_cold"]
TITLES = {"readinto1m": "readinto 1 MiB", "read1m": "read 1 MiB", "read64k": "read 64 KiB",
          "copyfileobj": "shutil.copyfileobj", "file_digest": "hashlib.file_digest",
          "buffered64k": "BufferedReader 64 KiB", "read_at4k": "random read_at 4 KiB",
          "readinto_at4k": "random readinto_at 4 KiB", "threads2": "2 threads read_at 4 KiB",
          "read_at4k_cold": "random read_at 4 KiB, cold cache",
          "threads2_cold": "2 threads read_at 4 KiB, cold cache"}
RANDOM_ROWS = {"read_at4k", "readinto_at4k", "threads2", "read_at4k_cold", "threads2_cold"}
COLD_OPS = 20_000  # cold reads go to the device: fewer of them


def drop_cache(chain: list[str]) -> None:
    """Evict the chain's files from the page cache (they are clean: read-only)."""
    import os

    for p in chain:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


class _Null:
    def write(self, b: bytes) -> int:
        return len(b)


def _offsets(size: int, n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(0, size // 4096) * 4096 for _ in range(n)]


def _open_libvhdi(chain: list[str]):
    import pyvhdi

    files = []
    for p in chain:
        f = pyvhdi.file()
        f.open(p)
        files.append(f)
    for i in range(len(files) - 2, -1, -1):
        files[i].set_parent(files[i + 1])
    return files


def _seq(read, size: int, n: int) -> int:
    total = 0
    while True:
        b = read(n)
        if not b:
            return total
        total += len(b)


def one_pass(reader: str, row: str, chain: list[str], rand_ops: int) -> tuple[float, int]:
    """(seconds, units): units are bytes for sequential rows, reads for random ones."""
    if row.endswith("_cold"):
        row, rand_ops = row[:-5], COLD_OPS
        drop_cache(chain)
    if reader == "vhdx":
        import vhdx

        disk = vhdx.open(chain[0], parents=chain[1:])
        size = disk.size
        offs = _offsets(size, rand_ops, 1)
        t = time.perf_counter()
        if row == "readinto1m":
            buf, got, total = bytearray(MiB), 1, 0
            while got:
                got = disk.readinto(buf)
                total += got
        elif row == "read1m":
            total = _seq(disk.read, size, MiB)
        elif row == "read64k":
            total = _seq(disk.read, size, 64 << 10)
        elif row == "copyfileobj":
            shutil.copyfileobj(disk, _Null())
            total = disk.tell()
        elif row == "file_digest":
            hashlib.file_digest(disk, "sha256")
            total = disk.tell()
        elif row == "buffered64k":
            total = _seq(io.BufferedReader(disk).read, size, 64 << 10)
        elif row == "read_at4k":
            r = disk.read_at
            for o in offs:
                r(o, 4096)
            total = len(offs)
        elif row == "readinto_at4k":
            r, buf = disk.readinto_at, bytearray(4096)
            for o in offs:
                r(o, buf)
            total = len(offs)
        elif row == "threads2":
            def work(part: list[int]) -> None:
                r = disk.read_at
                for o in part:
                    r(o, 4096)
            ts = [threading.Thread(target=work, args=(offs[k::2],)) for k in range(2)]
            t = time.perf_counter()
            for th in ts:
                th.start()
            for th in ts:
                th.join()
            total = len(offs)
        dt = time.perf_counter() - t
        disk.close()
        return dt, total
    files = _open_libvhdi(chain)
    top = files[0]
    size = top.get_media_size()
    offs = _offsets(size, rand_ops, 1)
    n = {"readinto1m": MiB, "read1m": MiB, "read64k": 64 << 10, "copyfileobj": 64 << 10,
         "file_digest": 256 << 10, "buffered64k": 64 << 10}.get(row)
    t = time.perf_counter()
    if n is not None:
        top.seek_offset(0, 0)
        h = hashlib.sha256() if row == "file_digest" else None
        total = 0
        rb = top.read_buffer
        while True:
            b = rb(n)
            if not b:
                break
            if h is not None:
                h.update(b)
            total += len(b)
    elif row in ("read_at4k", "readinto_at4k"):
        rb = top.read_buffer_at_offset
        for o in offs:
            rb(4096, o)
        total = len(offs)
    else:  # threads2: each thread its own handle chain (libvhdi handles are not shared)
        chains = [files, _open_libvhdi(chain)]

        def work(fs, part: list[int]) -> None:
            rb = fs[0].read_buffer_at_offset
            for o in part:
                rb(4096, o)
        ts = [threading.Thread(target=work, args=(chains[k], offs[k::2])) for k in range(2)]
        t = time.perf_counter()
        for th in ts:
            th.start()
        for th in ts:
            th.join()
        total = len(offs)
        for f in chains[1]:
            f.close()
    dt = time.perf_counter() - t
    for f in files:
        f.close()
    return dt, total


def worker(cfg: dict) -> dict:
    best = None
    units = 0
    for i in range(cfg["reps"] + 1):
        dt, units = one_pass(cfg["reader"], cfg["row"], cfg["chain"], cfg["rand_ops"])
        if i and (best is None or dt < best):
            best = dt
    return {"seconds": best, "units": units}


def rate(res: dict, row: str) -> float:
    return res["units"] / res["seconds"] / (1e3 if row in RANDOM_ROWS else 1e9)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rand-ops", type=int, default=200_000)
    ap.add_argument("--only", default="dynamic,fixed,chain")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(json.loads(a.worker))))
        return 0
    from bench_read import images, warm_cache

    imgs, _ = images(a.quick)
    results: dict = {}
    for name in a.only.split(","):
        chain = imgs[name]
        warm_cache(chain)
        for row in a.rows.split(","):
            for k, reader in enumerate(("vhdx", "libvhdi") if hash(row) % 2 else ("libvhdi", "vhdx")):
                cfg = dict(reader=reader, row=row, chain=chain, reps=a.reps, rand_ops=a.rand_ops)
                out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cfg)],
                                     capture_output=True, text=True)
                if out.returncode:
                    print(out.stderr, file=sys.stderr)
                    results.setdefault(name, {}).setdefault(row, {})[reader] = None
                    continue
                results.setdefault(name, {}).setdefault(row, {})[reader] = json.loads(out.stdout)
    for two, one in (("threads2", "read_at4k"), ("threads2_cold", "read_at4k_cold")):
        if two not in a.rows.split(","):
            continue  # else: the 1-thread vhdx rate the 2-thread row is compared with
        for name in a.only.split(","):
            r = results[name]
            if one not in r:
                cfg = dict(reader="vhdx", row=one, chain=imgs[name], reps=a.reps, rand_ops=a.rand_ops)
                out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cfg)],
                                     capture_output=True, text=True, check=True)
                r[one] = {"vhdx": json.loads(out.stdout)}
    print("| image | row | vhdx | libvhdi | vhdx/libvhdi |")
    print("|---|---|---|---|---|")
    for name, rows in results.items():
        for row, res in rows.items():
            v, lib = res.get("vhdx"), res.get("libvhdi")
            unit = "k/s" if row in RANDOM_ROWS else "GB/s"
            fv = f"{rate(v, row):.2f} {unit}" if v else "error"
            one = row.replace("threads2", "read_at4k")
            if row.startswith("threads2") and v and rows.get(one, {}).get("vhdx"):
                fv += f" ({rate(v, row) / rate(rows[one]['vhdx'], one):.2f}x 1 thread)"
            fl = f"{rate(lib, row):.2f} {unit}" if lib else ("-" if lib is None and "libvhdi" not in res else "error")
            ratio = f"{rate(v, row) / rate(lib, row):.2f}x" if v and lib else "-"
            print(f"| {name} | {TITLES[row]} | {fv} | {fl} | {ratio} |")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
