"""Compact benchmark (issue 9): ``vhdx compact`` against ``qemu-img convert -O vhdx``.

    python3 bench/bench_compact.py [--quick] [--reps N] [--dir DIR] [--drop] [--json OUT]

Image: a dynamic VHDX of ``--size`` GiB (default 4) with 32 MiB blocks; ``--data``
GiB (default 2) of blocks hold pseudo-random data and ``--zeros`` GiB (default 1)
of blocks were written and then overwritten with zeros (allocated, reading zeros),
in a seeded random file order. Made by the project's writer (``vhdx.create`` and
``write_at``). ``--quick`` divides every size by 8.

Per repetition, the same run alternates:

* ``vhdx compact``: a fresh byte copy of the pristine image (``cp --reflink=never``,
  not timed), then ``python -m vhdx compact COPY`` in a fresh process: wall time and
  its peak RSS (the child's VmHWM, sampled). Compact makes its work durable
  (fsync at every commit and after the truncate).
* ``qemu-img convert -O vhdx``: the pristine image to a new file (a compacted copy:
  zero blocks are not written), wall time and peak RSS; then ``sync -f`` of the
  output timed separately, since qemu-img's default cache mode for the output
  does not flush (the row ``+sync`` adds it).

``--drop`` (root) drops the page cache before each timed command; the default is a
warm cache for both. Every compacted copy and every qemu output is checked once
against the pristine image's SHA-256 (through ``vhdx.open``) and the files' sizes are
reported.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
sys.path.insert(0, ROOT)

MiB = 1 << 20
GiB = 1 << 30


def make_image(path: str, size: int, data: int, zeros: int, bs: int, seed: int = 1) -> None:
    import vhdx

    rng = random.Random(seed)
    nblocks = size // bs
    kinds = ["data"] * (data // bs) + ["zero"] * (zeros // bs)
    blocks = rng.sample(range(nblocks), len(kinds))
    rng.shuffle(kinds)
    pattern = bytearray(os.urandom(bs))
    vhdx.create(path, size, block_size=bs)
    with vhdx.open(path, "r+") as d:
        for b, kind in zip(blocks, kinds):  # file order = this (random) order
            pattern[:8] = b.to_bytes(8, "little")
            d.write_at(b * bs, pattern)
        for b, kind in zip(blocks, kinds):
            if kind == "zero":
                d.write_at(b * bs, bytes(bs))


def digest(path: str) -> str:
    import vhdx

    h = hashlib.sha256()
    with vhdx.open(path) as d:
        for off in range(0, d.size, 64 * MiB):
            h.update(d.read_at(off, min(64 * MiB, d.size - off)))
    return h.hexdigest()


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def timed(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of ``cmd`` run as a child.

    The peak is the child's own VmHWM, sampled every 20 ms until it exits (VmHWM
    only grows; ``ru_maxrss`` would count the forked copy of this process).
    """
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL)
    peak = 0
    while p.poll() is None:
        try:
            with open(f"/proc/{p.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]) * 1024)
        except OSError:
            pass
        time.sleep(0.02)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed: {cmd}")
    return dt, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--size", type=float, default=4.0, help="virtual size, GiB")
    ap.add_argument("--data", type=float, default=2.0, help="GiB of data blocks")
    ap.add_argument("--zeros", type=float, default=1.0, help="GiB of zero-overwritten blocks")
    ap.add_argument("--block-mib", type=int, default=32)
    ap.add_argument("--dir", default=None, help="work directory (default: a temp dir under bench/)")
    ap.add_argument("--drop", action="store_true", help="drop the page cache before each timed command")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    div = 8 if a.quick else 1
    bs = a.block_mib * MiB
    size, data, zeros = (int(x * GiB / div) // bs * bs for x in (a.size, a.data, a.zeros))
    work = a.dir or tempfile.mkdtemp(prefix="compact-", dir=HERE)
    os.makedirs(work, exist_ok=True)
    pristine = os.path.join(work, "pristine.vhdx")
    try:
        t0 = time.perf_counter()
        if os.path.exists(pristine):
            os.unlink(pristine)
        make_image(pristine, size, data, zeros, bs)
        print(f"image: {size / GiB:g} GiB virtual, {data / GiB:g} GiB data, {zeros / GiB:g} GiB zero "
              f"blocks, {a.block_mib} MiB blocks, file {os.path.getsize(pristine) / GiB:.2f} GiB "
              f"(made in {time.perf_counter() - t0:.1f} s)", flush=True)
        truth = digest(pristine)
        rows: dict[str, list[float]] = {"vhdx compact": [], "qemu-img convert": [], "qemu-img convert +sync": []}
        rss: dict[str, int] = {"vhdx compact": 0, "qemu-img convert": 0}
        sizes: dict[str, int] = {}
        for rep in range(a.reps):
            copy = os.path.join(work, "copy.vhdx")
            out = os.path.join(work, "out.vhdx")
            for f in (copy, out):
                if os.path.exists(f):
                    os.unlink(f)
            subprocess.run(["cp", "--reflink=never", pristine, copy], check=True)
            os.sync()
            if a.drop:
                drop_caches()
            dt, peak = timed([sys.executable, "-m", "vhdx", "compact", copy])
            rows["vhdx compact"].append(dt)
            rss["vhdx compact"] = max(rss["vhdx compact"], peak)
            if a.drop:
                drop_caches()
            dt, peak = timed(["qemu-img", "convert", "-f", "vhdx", "-O", "vhdx", pristine, out])
            t1 = time.perf_counter()
            subprocess.run(["sync", "-f", out], check=True)
            rows["qemu-img convert"].append(dt)
            rows["qemu-img convert +sync"].append(dt + time.perf_counter() - t1)
            rss["qemu-img convert"] = max(rss["qemu-img convert"], peak)
            if rep == 0:
                for name, f in (("vhdx compact", copy), ("qemu-img convert", out)):
                    if digest(f) != truth:
                        raise SystemExit(f"{name}: the result does not read as the pristine image")
                    sizes[name] = os.path.getsize(f)
            print(f"rep {rep + 1}: compact {rows['vhdx compact'][-1]:.2f} s, qemu-img convert "
                  f"{rows['qemu-img convert'][-1]:.2f} s (+sync {rows['qemu-img convert +sync'][-1]:.2f} s)",
                  flush=True)
        med = {k: statistics.median(v) for k, v in rows.items()}
        print()
        print(f"| command | median s (of {a.reps}) | peak RSS | output file |")
        print("|---|---|---|---|")
        for k in rows:
            base = k.replace(" +sync", "")
            print(f"| {k} | {med[k]:.2f} | {rss[base] / MiB:.0f} MiB | {sizes.get(base, 0) / GiB:.2f} GiB |")
        print(f"\nspeed-up: {med['qemu-img convert'] / med['vhdx compact']:.2f}x vs convert, "
              f"{med['qemu-img convert +sync'] / med['vhdx compact']:.2f}x vs convert + sync; "
              f"pristine file {os.path.getsize(pristine) / GiB:.2f} GiB")
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"rows": rows, "median": med, "rss": rss, "sizes": sizes,
                           "args": vars(a)}, f, indent=1)
    finally:
        if not a.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
