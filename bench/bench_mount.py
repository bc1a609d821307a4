#!/usr/bin/env python3
"""Sequential reads through ``vhdx mount`` against libvhdi's ``vhdimount``.

The image is made by qemu-img (``convert -O vhdx -o subformat=dynamic``) from a
sparse raw file in which ~60 % of the 32 MiB blocks hold pseudo-random data, so
both FUSE servers read the same qemu-made dynamic VHDX. Each measured pass
mounts afresh (the FUSE file's page cache starts empty, as for a user who has
just mounted), runs ``dd if=FILE of=/dev/null bs=1M`` and unmounts; the VHDX file
itself is in the host page cache for both (read once before). The servers
alternate, the order reversed every other repetition. Rows:

* ``dd bs=1M``: what a user sees (kernel page cache and readahead in the path);
* ``dd bs=1M iflag=direct``: the same reads as uncached 1 MiB requests.

Both files' SHA-256 are compared with ``vhdx hash`` at the end.

Usage (root, /dev/fuse, qemu-img, vhdimount from Debian libvhdi-utils):
    python3 bench/bench_mount.py [--size-gib 1] [--reps 5] [--json OUT] [--dir DIR]
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
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MiB = 1 << 20
BLOCK = 32 * MiB
ROWS = {"dd bs=1M": [], "dd bs=1M iflag=direct": ["iflag=direct"]}


def make_image(work: Path, size_gib: int) -> Path:
    img = work / f"qemu-dynamic-{size_gib}g.vhdx"
    if img.exists():
        return img
    raw = work / "src.raw"
    rng = random.Random(0x60)
    with open(raw, "wb") as f:
        f.truncate(size_gib << 30)
        for b in range((size_gib << 30) // BLOCK):
            if rng.random() < 0.6:
                f.seek(b * BLOCK)
                f.write(rng.randbytes(BLOCK))
    tmp = img.with_suffix(".part")
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vhdx",
                    "-o", f"subformat=dynamic,block_size={BLOCK}", str(raw), str(tmp)], check=True)
    raw.unlink()
    tmp.rename(img)
    return img


def vhdx_cli(*args: str) -> str:
    return subprocess.run([sys.executable, "-m", "vhdx", *args], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout


class VhdxMount:
    name = "vhdx mount"

    def __init__(self, img: Path, mp: Path) -> None:
        self.img, self.mp = img, mp
        self.file = mp / (img.stem + ".raw")

    def mount(self) -> None:
        vhdx_cli("mount", str(self.img), str(self.mp))

    def umount(self) -> None:
        vhdx_cli("umount", str(self.mp))


class Vhdimount:
    name = "vhdimount"

    def __init__(self, img: Path, mp: Path) -> None:
        self.img, self.mp = img, mp
        self.file = mp / "vhdi1"

    def mount(self) -> None:
        subprocess.run(["vhdimount", str(self.img), str(self.mp)], check=True, capture_output=True)
        deadline = time.monotonic() + 30
        while not self.file.exists():  # vhdimount daemonizes before it serves
            if time.monotonic() > deadline:
                raise RuntimeError("vhdimount did not come up")
            time.sleep(0.02)

    def umount(self) -> None:
        tool = shutil.which("fusermount") or "fusermount3"
        subprocess.run([tool, "-u", str(self.mp)], check=True, capture_output=True)
        time.sleep(0.2)  # let the daemon exit before the next mount


def dd(path: Path, extra: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=1M", *extra], check=True, capture_output=True)
    return time.perf_counter() - t0


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gib", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dir", type=Path, default=HERE / "work" / "mount")
    ap.add_argument("--json", type=Path, help="write the raw per-pass times here")
    args = ap.parse_args()
    for tool in ("qemu-img", "vhdimount", "dd"):
        if not shutil.which(tool):
            sys.exit(f"bench_mount: {tool} not found")
    args.dir.mkdir(parents=True, exist_ok=True)
    img = make_image(args.dir, args.size_gib)
    size = args.size_gib << 30
    with open(img, "rb") as f:  # both servers read it from the page cache
        while f.read(16 * MiB):
            pass
    tmp = Path(tempfile.mkdtemp(prefix="bench-mount-"))
    servers = []
    for cls in (VhdxMount, Vhdimount):
        mp = tmp / cls.__name__
        mp.mkdir()
        servers.append(cls(img, mp))
    times: dict[str, dict[str, list[float]]] = {row: {s.name: [] for s in servers} for row in ROWS}
    try:
        for rep in range(args.reps):
            order = servers if rep % 2 == 0 else servers[::-1]
            for row, extra in ROWS.items():
                for s in order:
                    s.mount()
                    try:
                        times[row][s.name].append(dd(s.file, extra))
                    finally:
                        s.umount()
        digests = {}
        for s in servers:
            s.mount()
            try:
                digests[s.name] = sha256(s.file)
            finally:
                s.umount()
    finally:
        for s in servers:
            if os.path.ismount(s.mp):
                subprocess.run(["fusermount3", "-u", "-z", str(s.mp)], check=False)
        shutil.rmtree(tmp, ignore_errors=True)
    want = vhdx_cli("hash", str(img)).split()[0]
    print(f"image: {img.name}, {args.size_gib} GiB virtual, qemu-img dynamic 32 MiB blocks, "
          f"{img.stat().st_size / MiB:.0f} MiB file; {args.reps} passes each, median (best)\n")
    print("| read | vhdx mount | vhdimount | ratio (median) |")
    print("|---|---|---|---|")
    def fmt(t: list[float]) -> str:
        return f"{size / statistics.median(t) / 1e6:.0f} MB/s ({size / min(t) / 1e6:.0f})"

    for row in ROWS:
        a, b = times[row]["vhdx mount"], times[row]["vhdimount"]
        print(f"| {row} | {fmt(a)} | {fmt(b)} | {statistics.median(b) / statistics.median(a):.2f}x |")
    ok = all(d == want for d in digests.values())
    print(f"\nSHA-256 equal to `vhdx hash`: {'yes' if ok else digests}")
    if args.json:
        args.json.write_text(json.dumps({"image": str(img), "size": size, "times": times,
                                         "digests": digests, "vhdx_hash": want}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
