#!/usr/bin/env python3
"""NBD benchmark: ``qemu-img convert -O raw`` from ``vhdx serve`` against the same
from ``qemu-nbd -r -f vhdx``, both on Unix sockets, serving one qemu-made dynamic VHDX.

    python3 bench/bench_nbd.py [--size 1536M] [--block-size 32M] [--density 0.6]
                               [--runs 5] [--dir DIR] [--out-dir DIR] [--json OUT]

The image is made by ``qemu-img create -f vhdx`` and filled with ``qemu-io``
(a byte pattern per written block; ``--density`` of the blocks, chosen with a fixed
seed), then read once so both servers serve it from the page cache. The two
servers run side by side for the whole measurement; each round converts through
one and then the other (the order alternates per round); the best of ``--runs``
rounds is reported, with throughput as virtual bytes per second (GB = 1e9 bytes).
The outputs of both servers are compared byte for byte with qemu-img's own
conversion of the image. The raw outputs go to ``--out-dir`` (default /dev/shm when
it exists, so the target's disk speed does not enter the figure) and are removed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper()
    return int(t[:-1]) * units[t[-1]] if t[-1] in units else int(t)


def make_image(path: Path, size: int, block: int, density: float, seed: int = 8) -> int:
    """A qemu-made dynamic VHDX with ``density`` of its blocks written; returns data bytes."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "vhdx", "-o", f"block_size={block}",
                    str(path), str(size)], check=True)
    rng = random.Random(seed)
    blocks = [b for b in range(size // block) if rng.random() < density]
    cmds: list[str] = []
    for b in blocks:
        cmds += ["-c", f"write -P {1 + b % 255} {b * block} {block}"]
    for i in range(0, len(cmds), 64):  # bounded command lines
        subprocess.run(["qemu-io", "-f", "vhdx", *cmds[i:i + 64], str(path)], check=True,
                       stdout=subprocess.DEVNULL)
    return len(blocks) * block


def wait_socket(path: Path, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited early with {proc.returncode}: {proc.args}")
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(str(path))
            return
        except OSError:
            time.sleep(0.05)
        finally:
            s.close()
    raise SystemExit(f"{path}: server did not listen within {timeout} s")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def convert(uri: str, out: Path) -> float:
    if out.exists():
        out.unlink()
    t0 = time.perf_counter()
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(out)], check=True)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1536M")
    ap.add_argument("--block-size", default="32M")
    ap.add_argument("--density", type=float, default=0.6)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dir", help="work directory for the image and sockets (default: a new temp dir)")
    ap.add_argument("--out-dir", help="where the converted raw files go (default /dev/shm if present)")
    ap.add_argument("--json", metavar="OUT", help="also write the raw timings as JSON")
    args = ap.parse_args()
    for tool in ("qemu-img", "qemu-io", "qemu-nbd"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found (Debian qemu-utils)")

    size, block = parse_size(args.size), parse_size(args.block_size)
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="vhdx-bench-nbd-"))
    work.mkdir(parents=True, exist_ok=True)
    out_dir = Path(args.out_dir) if args.out_dir else (
        Path("/dev/shm") if os.path.isdir("/dev/shm") else work)
    tag = f"vhdx-bench-nbd-{os.getpid()}"
    image = work / "qemu-dynamic.vhdx"
    if image.exists():
        image.unlink()
    data = make_image(image, size, block, args.density)
    with open(image, "rb") as fh:  # into the page cache
        while fh.read(8 << 20):
            pass
    ref = out_dir / f"{tag}-ref.raw"
    subprocess.run(["qemu-img", "convert", "-f", "vhdx", "-O", "raw", str(image), str(ref)], check=True)
    want = sha256(ref)
    ref.unlink()

    s_vhdx, s_qemu = work / "vhdx.sock", work / "qemu.sock"
    servers = {
        "vhdx serve": subprocess.Popen([sys.executable, "-m", "vhdx", "serve", str(image), "--socket", str(s_vhdx)],
                                       cwd=ROOT, stdout=subprocess.DEVNULL),
        "qemu-nbd -r": subprocess.Popen(["qemu-nbd", "-r", "-f", "vhdx", "-k", str(s_qemu), "--persistent",
                                         "--shared=4", str(image)]),
    }
    uris = {"vhdx serve": f"nbd+unix:///?socket={s_vhdx}", "qemu-nbd -r": f"nbd+unix:///?socket={s_qemu}"}
    times: dict[str, list[float]] = {k: [] for k in servers}
    try:
        wait_socket(s_vhdx, servers["vhdx serve"])
        wait_socket(s_qemu, servers["qemu-nbd -r"])
        names = list(servers)
        for name in names:  # warm-up, and the correctness check
            out = out_dir / f"{tag}.raw"
            convert(uris[name], out)
            got = sha256(out)
            out.unlink()
            if got != want:
                raise SystemExit(f"{name}: converted image differs from qemu-img's own conversion")
        for r in range(args.runs):
            for name in (names if r % 2 == 0 else names[::-1]):
                out = out_dir / f"{tag}.raw"
                times[name].append(convert(uris[name], out))
                out.unlink()
    finally:
        for p in servers.values():
            p.send_signal(signal.SIGTERM)
        for p in servers.values():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        for f in out_dir.glob(f"{tag}*"):
            f.unlink()

    best = {k: min(v) for k, v in times.items()}
    print(f"image: qemu-img-made dynamic VHDX, {size / 2**30:g} GiB, {block >> 20} MiB blocks, "
          f"{data / size:.0%} of it written; best of {args.runs}; GB = 1e9 bytes of virtual disk")
    print()
    print("| server | best s | GB/s | vs qemu-nbd |")
    print("|---|---|---|---|")
    for name in servers:
        print(f"| {name} | {best[name]:.3f} | {size / best[name] / 1e9:.2f} | "
              f"{best['qemu-nbd -r'] / best[name]:.2f}x |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"size": size, "block_size": block, "data_bytes": data, "runs": args.runs,
                       "times": times, "best": best, "python": platform.python_version(),
                       "machine": platform.machine()}, fh, indent=1)
    if not args.dir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
