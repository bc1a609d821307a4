#!/usr/bin/env python3
"""VHD benchmark: the project's VHD reader, merge and VHDX -> fixed VHD convert
against libvhdi (pyvhdi), qemu-img / qemu-io and cp, in the same run.

    python3 bench/bench_vhd.py [--quick] [--reps N] [--rand-ops N] [--keep] [--json OUT]

Images (built in bench/work/vhd-{full,small}/, deterministic, ``--quick`` = 1/8 size):
  dynamic  4 GiB dynamic VHD, 2 MiB blocks, 60 % of the blocks allocated (random data)
  chain    3-deep .avhd chain over a 4 GiB dynamic base (40 % allocated); each
           child rewrites 10 % of the blocks in runs of 8-1024 sectors (partial
           bitmaps)
  merge    a 2 GiB .avhd child fully written over an empty 2 GiB dynamic parent
  vhdx     the dynamic image's content as a 4 GiB dynamic VHDX (convert source)

Rows:
  seq1m    sequential 1 MiB reads over the whole virtual disk
  rand4k   random aligned 4 KiB reads (same seeded offsets for every reader)
  merge    ``vhdx merge child.avhd`` (in place, fsync and the child's deletion
           included) vs ``cp`` of the child file + fsync (``sync FILE``): the
           same bytes moved; also vs cp + sync + rm of the copy, and the merge's
           data phase alone (``keep=True``)
  convert  ``convert_to_vhd(SRC.vhdx, OUT.vhd, type="fixed")`` (what ``vhdx convert
           --type fixed`` runs, in process; it fsyncs the output) vs ``qemu-img
           convert -f vhdx -O vpc -o subformat=fixed,force_size``, alone (it
           leaves dirty pages behind) and followed by ``sync OUT``; qemu-img
           without -S 0 also skips zeros; the source is cached first and the
           two alternate who runs first

How readers are driven: vhdx through two doors, ``read_at`` (a new bytes object
per read, as libvhdi's ``read_buffer_at_offset`` returns) and ``readinto_at``
into one preallocated ``bytearray``; libvhdi ``read_buffer_at_offset`` with
``set_parent``; qemu ``qemu-img bench -f vpc`` for
seq1m (its own "Run completed in" time) and ``qemu-io -r`` with ``read`` lines on
stdin for rand4k (qemu-io's per-op times summed). qemu has no VHD parent support
(it opens a differencing VHD as a plain dynamic one), so its chain rows are n/a;
libvhdi's sector-bitmap bug (vhd.md §13) makes its chain *content* wrong, but its
speed is still a fair peer figure. Times are medians of ``--reps`` passes after
one warm-up pass; files are in the page cache. GB = 1e9 bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # measure this working tree

import vhdx  # noqa: E402

MiB = 1 << 20
BLOCK = 2 * MiB


def _fill(disk, rng: random.Random, blocks: list[int], runs: bool) -> None:  # noqa: ANN001
    for b in blocks:
        if runs:
            for _ in range(3):
                s = rng.randrange(BLOCK // 512 - 8)
                n = min(rng.choice([8, 64, 256, 1024]), BLOCK // 512 - s)
                disk.write_at(b * BLOCK + s * 512, rng.randbytes(n * 512))
        else:
            disk.write_at(b * BLOCK, rng.randbytes(BLOCK))


def build(work: Path, scale: int) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    manifest = work / "manifest.json"
    if manifest.exists():  # file names, resolved here (the work folder may have moved)
        m = json.loads(manifest.read_text())
        for k in ("dynamic", "chain"):
            m[k] = [str(work / Path(q).name) for q in m[k]]
        m["vhdx"] = str(work / Path(m["vhdx"]).name)
        return m
    from vhdx.storage import DeferredSyncStorage
    from vhdx.vhd.writer import VhdWritableDisk

    def writable(p: Path):  # noqa: ANN202 - no fsync per allocation while building
        return VhdWritableDisk(p, storage=DeferredSyncStorage.open(p))

    rng = random.Random(1)
    size = 4096 * MiB // scale
    nblocks = size // BLOCK
    dyn = work / "dynamic.vhd"
    vhdx.create(dyn, size)
    with writable(dyn) as d:
        _fill(d, rng, sorted(rng.sample(range(nblocks), nblocks * 6 // 10)), False)
    base = work / "base.vhd"
    vhdx.create(base, size)
    with writable(base) as d:
        _fill(d, rng, sorted(rng.sample(range(nblocks), nblocks * 4 // 10)), False)
    chain = [base]
    for i in range(3):
        c = work / f"snap{i}.avhd"
        vhdx.create(c, parent=chain[-1])
        with VhdWritableDisk(c, storage=DeferredSyncStorage.open(c)) as d:
            _fill(d, rng, sorted(rng.sample(range(nblocks), nblocks // 10)), True)
        chain.append(c)
    vx = work / "source.vhdx"
    from vhdx.convert import convert_to_vhdx

    convert_to_vhdx(dyn, vx)
    os.sync()
    m = {"size": size, "dynamic": [str(dyn)], "chain": [str(p) for p in reversed(chain)],
         "vhdx": str(vx), "merge_size": 2048 * MiB // scale}
    manifest.write_text(json.dumps(m))
    return m


def build_merge(work: Path, size: int) -> tuple[Path, Path]:
    from vhdx.storage import DeferredSyncStorage
    from vhdx.vhd.writer import VhdWritableDisk

    d = work / "merge"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    parent, child = d / "parent.vhd", d / "child.avhd"
    vhdx.create(parent, size)
    vhdx.create(child, parent=parent)
    rng = random.Random(2)
    with VhdWritableDisk(child, storage=DeferredSyncStorage.open(child)) as w:
        chunk = rng.randbytes(8 * MiB)
        for off in range(0, size, 8 * MiB):
            w.write_at(off, chunk[:min(8 * MiB, size - off)])
    os.sync()
    return parent, child


def open_reader(name: str, chain: list[str]):  # noqa: ANN201
    if name == "vhdx":
        disk = vhdx.open(chain[0], parents=chain[1:])
        return disk.size, disk.read_at, disk.close
    if name == "vhdx readinto":
        disk = vhdx.open(chain[0], parents=chain[1:])
        bufs: dict[int, bytearray] = {}

        def read_at(off: int, n: int) -> None:
            b = bufs.get(n) or bufs.setdefault(n, bytearray(n))
            disk.readinto_at(off, b)
        return disk.size, read_at, disk.close
    import pyvhdi

    files = []
    for p in chain:
        f = pyvhdi.file()
        f.open(p)
        files.append(f)
    for i in range(len(files) - 1):
        files[i].set_parent(files[i + 1])
    top = files[0]

    def read_at(off: int, n: int, _r=top.read_buffer_at_offset) -> None:  # noqa: ANN001
        _r(n, off)

    def close() -> None:
        for f in files:
            f.close()
    return top.get_media_size(), read_at, close


def time_reader(name: str, chain: list[str], row: str, offsets: list[int], reps: int) -> float:
    size, read_at, close = open_reader(name, chain)
    try:
        def one() -> float:
            t = time.perf_counter()
            if row == "seq1m":
                for off in range(0, size, MiB):
                    read_at(off, min(MiB, size - off))
            else:
                for off in offsets:
                    read_at(off, 4096)
            return time.perf_counter() - t
        one()
        return statistics.median(one() for _ in range(reps))
    finally:
        close()


def time_qemu(img: str, row: str, size: int, offsets: list[int], reps: int) -> float:
    out = []
    for _ in range(reps + 1):
        if row == "seq1m":
            r = subprocess.run(["qemu-img", "bench", "-f", "vpc", "-d", "1", "-c", str(size // MiB),
                                "-s", str(MiB), "-S", str(MiB), img], capture_output=True, text=True, check=True)
            out.append(float(re.search(r"Run completed in ([0-9.]+) seconds", r.stdout).group(1)))
        else:
            # -C prints "bytes,ops,time,bytes/s,ops/s" per read; time = bytes / rate
            cmds = "".join(f"read -C {o} 4k\n" for o in offsets)
            r = subprocess.run(["qemu-io", "-r", "-f", "vpc", img], input=cmds, capture_output=True,
                               text=True, check=True)
            rows = re.findall(r"(\d+),\d+,[0-9:.]+,([0-9.]+|inf),", r.stdout)
            if len(rows) != len(offsets):
                raise RuntimeError(f"qemu-io: parsed {len(rows)} of {len(offsets)} reads")
            out.append(sum(int(n) / float(bps) for n, bps in rows if bps != "inf" and float(bps)))
    return statistics.median(out[1:])


def timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int)
    ap.add_argument("--rand-ops", type=int)
    ap.add_argument("--json")
    a = ap.parse_args()
    scale = 8 if a.quick else 1
    reps = a.reps or (2 if a.quick else 5)
    nops = a.rand_ops or (5000 if a.quick else 50000)
    work = HERE / "work" / ("vhd-small" if a.quick else "vhd-full")
    m = build(work, scale)
    size = m["size"]
    rng = random.Random(4242)
    offsets = [rng.randrange(size // 4096) * 4096 for _ in range(nops)]
    results: dict = {}
    for img in ("dynamic", "chain"):
        for row in ("seq1m", "rand4k"):
            r = {}
            for rd in ("vhdx", "vhdx readinto", "libvhdi", "qemu"):
                try:
                    if rd == "qemu":
                        r[rd] = None if img == "chain" else time_qemu(m[img][0], row, size, offsets, reps)
                    else:
                        r[rd] = time_reader(rd, m[img], row, offsets, reps)
                except Exception as e:  # noqa: BLE001 - a peer missing shows as an error
                    r[rd] = f"error: {e}"
            results[f"{img}/{row}"] = r
    # merge vs cp (+fsync) of the same child file; and vs cp+sync+rm of the source
    # (the merge deletes the child it moved: on a file system mounted with
    # ``discard`` freeing a large file is a cost of its own). The data phase alone
    # is timed with --keep on a fresh pair.
    mt, kt, ct, rt = [], [], [], []
    for _ in range(max(1, reps // 2)):
        for keep in (False, True):
            parent, child = build_merge(work, m["merge_size"])
            if not keep:
                cp_dst = work / "merge" / "copy.bin"
                ct.append(timed(["cp", "--reflink=never", str(child), str(cp_dst)]) + timed(["sync", str(cp_dst)]))
                t = time.perf_counter()
                os.unlink(cp_dst)
                rt.append(time.perf_counter() - t)
                os.sync()
            t = time.perf_counter()
            vhdx.merge(child, keep=keep)
            (kt if keep else mt).append(time.perf_counter() - t)
    results["merge"] = {"vhdx": statistics.median(mt), "vhdx --keep": statistics.median(kt),
                        "cp+sync": statistics.median(ct), "rm": statistics.median(rt)}
    # VHDX -> fixed VHD
    out, qout = work / "out-fixed.vhd", work / "out-qemu.vhd"
    # Both start from a cached source (read once first) and alternate who goes
    # first. vhdx fsyncs its output before renaming it into place; qemu-img ends
    # with dirty pages still to write, so it is timed alone and with ``sync OUT``.
    from vhdx.vhd.convert import convert_to_vhd

    subprocess.run(["cat", m["vhdx"]], stdout=subprocess.DEVNULL, check=True)
    vt, qt, qs = [], [], []
    for i in range(max(1, reps // 2) * 2):
        for p in (out, qout):
            if p.exists():
                p.unlink()
        os.sync()
        for who in (("vhdx", "qemu") if i % 2 == 0 else ("qemu", "vhdx")):
            if who == "vhdx":
                t = time.perf_counter()
                convert_to_vhd(m["vhdx"], out, type="fixed")  # in process (qemu-img's start-up is ~20 ms)
                vt.append(time.perf_counter() - t)
            else:
                q = timed(["qemu-img", "convert", "-f", "vhdx", "-O", "vpc", "-o", "subformat=fixed,force_size",
                           m["vhdx"], str(qout)])
                qt.append(q)
                qs.append(q + timed(["sync", str(qout)]))
    results["convert"] = {"vhdx": statistics.median(vt), "qemu-img": statistics.median(qt),
                          "qemu-img+sync": statistics.median(qs)}
    print("| row | vhdx read_at | vhdx readinto (bytearray) | libvhdi | qemu | read_at vs fastest peer "
          "| readinto vs fastest peer |")
    print("|---|---|---|---|---|---|---|")
    for key, r in results.items():
        if key in ("merge", "convert"):
            continue
        img, row = key.split("/")
        vol = size if row == "seq1m" else nops * 4096

        def fmt(t) -> str:  # noqa: ANN001
            return "n/a" if t is None else (t if isinstance(t, str) else f"{vol / t / 1e9:.2f} GB/s")
        peers = [t for k, t in r.items() if not k.startswith("vhdx") and isinstance(t, float)]

        def ratio(t) -> str:  # noqa: ANN001
            return f"{min(peers) / t:.2f}x" if peers and isinstance(t, float) else "-"
        print(f"| {key} | {fmt(r['vhdx'])} | {fmt(r['vhdx readinto'])} | {fmt(r['libvhdi'])} | {fmt(r['qemu'])} "
              f"| {ratio(r['vhdx'])} | {ratio(r['vhdx readinto'])} |")
    mr = results["merge"]
    print(f"| merge {m['merge_size'] // MiB} MiB child | {mr['vhdx']:.2f} s | cp+sync {mr['cp+sync']:.2f} s | | "
          f"{mr['cp+sync'] / mr['vhdx']:.2f}x cp+sync, {(mr['cp+sync'] + mr['rm']) / mr['vhdx']:.2f}x cp+sync+rm |")
    print(f"| merge data phase (--keep) | {mr['vhdx --keep']:.2f} s | cp+sync {mr['cp+sync']:.2f} s | | "
          f"{mr['cp+sync'] / mr['vhdx --keep']:.2f}x cp+sync |")
    cr = results["convert"]
    print(f"| convert {size // MiB} MiB VHDX -> fixed VHD | {cr['vhdx']:.2f} s (fsync included) | | "
          f"qemu-img {cr['qemu-img']:.2f} s, +sync {cr['qemu-img+sync']:.2f} s | "
          f"{cr['qemu-img'] / cr['vhdx']:.2f}x qemu-img, {cr['qemu-img+sync'] / cr['vhdx']:.2f}x qemu-img+sync |")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
