"""Writer benchmark: raw -> VHDX conversion against ``qemu-img convert -O vhdx`` in
the same run, and sequential 1 MiB / random 4 KiB writes on a dynamic image.

    python3 bench/bench_write.py [--dir DIR] [--size 4G] [--fill 0.6] [--repeat 2]

The raw source is sparse: ``fill`` of its 32 MiB-aligned slots hold random data
(os.urandom, one 32 MiB buffer reused with a per-slot prefix), the rest are holes.
Every conversion is verified (sha256 of the virtual disk through vhdx == sha256
of the raw file) outside the timed region. Page cache is not dropped (no root
needed); both tools read the same warm source and write to the same directory.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import vhdx  # noqa: E402
from vhdx.convert import convert_to_vhdx  # noqa: E402
from vhdx.create import parse_size  # noqa: E402

MiB = 1 << 20
SLOT = 32 * MiB


def make_raw(path: str, size: int, fill: float, seed: int = 1) -> int:
    rng = random.Random(seed)
    slots = size // SLOT
    chosen = sorted(rng.sample(range(slots), round(slots * fill)))
    blob = bytearray(os.urandom(SLOT))
    with open(path, "wb") as fh:
        fh.truncate(size)
        for s in chosen:
            blob[:16] = s.to_bytes(16, "little")
            os.pwrite(fh.fileno(), blob, s * SLOT)
        fh.flush()
        os.fsync(fh.fileno())
    return len(chosen) * SLOT


def sha_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(16 * MiB):
            h.update(chunk)
    return h.hexdigest()


def sha_vhdx(path: str) -> str:
    h = hashlib.sha256()
    with vhdx.open(path) as d:
        for off in range(0, d.size, 16 * MiB):
            h.update(d.read_at(off, min(16 * MiB, d.size - off)))
    return h.hexdigest()


def timed(fn) -> float:  # noqa: ANN001
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=None)
    ap.add_argument("--size", default="4G")
    ap.add_argument("--fill", type=float, default=0.6)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--skip-verify", action="store_true")
    a = ap.parse_args()
    size = parse_size(a.size)
    work = tempfile.mkdtemp(prefix="bench-write-", dir=a.dir)
    try:
        raw = os.path.join(work, "src.raw")
        t = timed(lambda: make_raw(raw, size, a.fill))
        print(f"source: {size / 2**30:.1f} GiB raw, {a.fill:.0%} random data in 32 MiB slots "
              f"(made in {t:.1f} s)")
        want = None if a.skip_verify else sha_file(raw)
        data_bytes = round(size // SLOT * a.fill) * SLOT
        rows = []
        for rep in range(a.repeat):
            for name in ("vhdx convert", "qemu-img convert -O vhdx"):
                out = os.path.join(work, f"out-{rep}-{name.split()[0]}.vhdx")
                if name.startswith("vhdx"):
                    dt = timed(lambda: convert_to_vhdx(raw, out))
                else:
                    dt = timed(lambda: subprocess.run(
                        ["qemu-img", "convert", "-f", "raw", "-O", "vhdx", "-o", "subformat=dynamic",
                         raw, out], check=True))
                    # qemu-img does not fsync its output; make the comparison fair.
                    dt += timed(lambda: _fsync(out))
                ok = "" if want is None else ("ok" if sha_vhdx(out) == want else "MISMATCH")
                rows.append((name, rep, dt, os.path.getsize(out), ok))
                print(f"  {name:<26} run {rep}: {dt:6.2f} s  {data_bytes / dt / MiB:7.0f} MiB/s of data  "
                      f"out {os.path.getsize(out) / MiB:.0f} MiB  {ok}")
                os.unlink(out)
        best = {n: min(r[2] for r in rows if r[0] == n) for n in ("vhdx convert", "qemu-img convert -O vhdx")}
        print(f"best: vhdx {best['vhdx convert']:.2f} s, qemu-img {best['qemu-img convert -O vhdx']:.2f} s "
              f"(ratio qemu/vhdx {best['qemu-img convert -O vhdx'] / best['vhdx convert']:.2f})")
        os.unlink(raw)

        # Writes on a dynamic image (32 MiB blocks, 512-byte sectors).
        img = os.path.join(work, "w.vhdx")
        vhdx.create(img, 2 << 30)
        buf = os.urandom(MiB)
        n_seq = 1024
        for label in ("sequential 1 MiB writes (new blocks), flush at end:",
                      "sequential 1 MiB overwrites (allocated):        "):
            with vhdx.open(img, "r+") as d:  # the second pass finds every block allocated
                t = time.perf_counter()
                for i in range(n_seq):
                    d.write_at(i * MiB, buf)
                d.flush()
                dt = time.perf_counter() - t
            print(f"{label} {n_seq / dt:8.0f} writes/s  {n_seq * MiB / dt / MiB:6.0f} MiB/s")
        rng = random.Random(2)
        small = os.urandom(4096)
        for label, span in (("allocated", 1 << 30), ("whole disk, allocating", 2 << 30)):
            n = 20000
            with vhdx.open(img, "r+") as d:
                t = time.perf_counter()
                for _ in range(n):
                    d.write_at(rng.randrange(span // 4096) * 4096, small)
                d.flush()
                dt = time.perf_counter() - t
            print(f"random 4 KiB writes ({label}), flush at end: {n / dt:8.0f} writes/s")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


if __name__ == "__main__":
    sys.exit(main())
