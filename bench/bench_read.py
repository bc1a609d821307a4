#!/usr/bin/env python3
"""Read benchmark: vhdx against libvhdi (pyvhdi), dissect.hypervisor and qemu.

    python3 bench/bench_read.py [--quick] [--reps N] [--rounds N] [--rand-ops N] [--only IMAGE,...]
                                [--readers vhdx,libvhdi,dissect,qemu] [--profile] [--json OUT]

Rows: sequential 1 MiB reads, sequential 64 KiB reads (both over the whole
virtual disk), random 4 KiB reads (aligned, seeded offsets, the same list for
every reader) and SHA-256 of the whole disk (1 MiB reads + hashlib), on the
images of bench/make_images.py (built on first use into bench/work/):
(a) 4 GiB dynamic ~60 % allocated, (b) 2 GiB fixed, (c) 3-deep differencing
chain (2 GiB). ``--quick`` uses the same recipes at 1/8 of the size and fewer
repetitions (a smoke test, not for the record).

Every (image, reader, row) runs in its own subprocess: one unmeasured warm-up
pass, then ``--reps`` measured passes, repeated for ``--rounds`` rounds that
interleave the readers (order reversed every other round); the median over all
measured passes is reported, plus the
process's peak RSS (VmHWM; ru_maxrss is inherited across fork+exec on Linux,
so it would report the driver's RSS). The image files are read once with plain
reads before anything is measured, so everything comes from the page cache.

How each reader is driven (see RESULTS.md):
  vhdx     vhdx.open(top, parents=[...]); readinto_at(off, preallocated buffer)
  libvhdi  pyvhdi.file + set_parent; read_buffer_at_offset(size, off)
  dissect  dissect.hypervisor.disk.vhdx.VHDX (parents given explicitly); seek + read
  ceiling  not a reader: per read one os.preadv of the whole size from the chain's
           largest file (or a zero fill where the disk has no data), i.e. the
           syscall + page-cache copy any reader pays, with no VHDX logic at all
  qemu     sequential: ``qemu-img bench -f vhdx -d 1 -s BS -S BS -c N`` (its own
           "Run completed in" time); random: ``qemu-io -r`` fed ``read -C off 4k``
           on stdin, per-op times from qemu-io's own statistics summed; SHA row:
           ``qemu-img convert -m 1 -n`` to a null-co target (read only, no hashing:
           an upper bound for qemu); differencing chains: n/a (unsupported).
Throughput is virtual bytes per second (GB = 1e9 bytes).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(ROOT))  # measure this working tree, whatever is installed

MiB = 1 << 20
KiB = 1 << 10
ROWS = ["seq1m", "seq64k", "rand4k", "sha256"]
ROW_TITLES = {"seq1m": "seq 1 MiB", "seq64k": "seq 64 KiB", "rand4k": "rand 4 KiB", "sha256": "SHA-256"}
READERS = ["vhdx", "libvhdi", "dissect", "qemu", "ceiling"]
NOT_PEERS = {"ceiling"}  # columns for reference, not compared as peers


# ------------------------------------------------------------------ readers (in the worker)
def open_reader(name: str, chain: list[str]):
    """Return (size, read_at(off, n) -> buffer-like, close)."""
    if name == "vhdx":
        import vhdx

        d = vhdx.open(chain[0], parents=chain[1:])
        bufs: dict[int, tuple[bytearray, memoryview]] = {}

        def read_at(off: int, n: int, _r=d.readinto_at, _b=bufs):
            ent = _b.get(n)
            if ent is None:
                ba = bytearray(n)
                ent = _b[n] = (ba, memoryview(ba))
            got = _r(off, ent[0])
            return ent[1] if got == n else ent[1][:got]

        return d.size, read_at, d.close
    if name == "vhdx-bytes":  # read_at returning bytes, like the peers
        import vhdx

        d = vhdx.open(chain[0], parents=chain[1:])
        return d.size, d.read_at, d.close
    if name == "libvhdi":
        import pyvhdi

        files = []
        for p in chain:
            f = pyvhdi.file()
            f.open(p)
            files.append(f)
        for i in range(len(files) - 2, -1, -1):
            files[i].set_parent(files[i + 1])
        top = files[0]
        rb = top.read_buffer_at_offset

        def close():
            for f in files:
                f.close()

        return top.get_media_size(), rb_adapter(rb), close
    if name == "dissect":
        import dissect.hypervisor.disk.vhdx as m

        parent = None
        orig = m.open_parent
        try:
            for p in reversed(chain):
                if parent is not None:
                    m.open_parent = lambda path, locator, _po=parent: _po
                parent = m.VHDX(Path(p))
        finally:
            m.open_parent = orig
        v = parent

        def read_at(off: int, n: int, _s=v.seek, _r=v.read):
            _s(off)
            return _r(n)

        return v.size, read_at, v.close
    if name == "ceiling":
        return open_ceiling(chain)
    raise ValueError(name)


def open_ceiling(chain: list[str]):
    """Not a reader: what the page cache allows. Each read is one ``os.preadv`` of
    the full size into a preallocated buffer, from the largest file of the chain at
    a page-aligned offset (wrapping around), when the first 4 KiB of the range hold
    data, else a zero fill; no mapping, no BAT, no bitmap, so the same syscall and
    copy per read as the leanest possible reader, at Python's per-call cost."""
    import vhdx

    d = vhdx.open(chain[0], parents=chain[1:])
    size = d.size
    data = bytearray(-(-size // 4096))  # 1 per 4 KiB unit that starts in a data extent
    for e in d.extents():
        if e.kind == "data":
            a, b = e.offset // 4096, -(-(e.offset + e.length) // 4096)
            data[a:b] = b"\x01" * (b - a)
    d.close()
    path = max(chain, key=os.path.getsize)
    fd = os.open(path, os.O_RDONLY)
    span = os.fstat(fd).st_size - MiB  # every read fits: reads are at most 1 MiB
    bufs: dict[int, tuple[memoryview, list, bytes]] = {}

    def read_at(off: int, n: int, _d=data, _b=bufs, _p=os.preadv, _fd=fd):
        ent = _b.get(n)
        if ent is None:
            mv = memoryview(bytearray(n))
            ent = _b[n] = (mv, [mv], bytes(n))
        if _d[off >> 12]:
            _p(_fd, ent[1], (off % span) & ~4095)
        else:
            ent[0][:] = ent[2]
        return ent[0]

    return size, read_at, lambda: os.close(fd)


def rb_adapter(rb):
    def read_at(off: int, n: int):
        return rb(n, off)
    return read_at


def rand_offsets(size: int, n: int, seed: int = 4242) -> list[int]:
    rng = random.Random(seed)
    top = size // 4096
    return [rng.randrange(top) * 4096 for _ in range(n)]


def run_pass(row: str, size: int, read_at, offsets: list[int]) -> tuple[int, int, str | None]:
    """One pass of ``row``; returns (bytes, ops, sha hex or None)."""
    if row == "rand4k":
        for off in offsets:
            read_at(off, 4096)
        return len(offsets) * 4096, len(offsets), None
    bs = 64 * KiB if row == "seq64k" else MiB
    h = hashlib.sha256() if row == "sha256" else None
    off = 0
    ops = 0
    while off < size:
        b = read_at(off, min(bs, size - off))
        if h is not None:
            h.update(b)
        off += len(b)
        ops += 1
        if not len(b):
            raise RuntimeError(f"short read at {off}")
    return off, ops, (h.hexdigest() if h else None)


def worker(cfg: dict) -> dict:
    chain, row, reps, reader = cfg["chain"], cfg["row"], cfg["reps"], cfg["reader"]
    size, read_at, close = open_reader(reader, chain)
    offsets = rand_offsets(size, cfg["rand_ops"]) if row == "rand4k" else []
    run_pass(row, size, read_at, offsets)  # warm-up
    times = []
    sha = None
    for _ in range(reps):
        t0 = time.perf_counter()
        nbytes, ops, sha = run_pass(row, size, read_at, offsets)
        times.append(time.perf_counter() - t0)
    close()
    return {"times": times, "bytes": nbytes, "ops": ops, "sha256": sha, "rss_kib": peak_rss_kib(),
            "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}


def peak_rss_kib() -> int:
    """Peak RSS of this process image: VmHWM (reset by execve, unlike ru_maxrss,
    which Linux carries over from the forking parent); ru_maxrss elsewhere."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def profile(chain: list[str], row: str, rand_ops: int, top_n: int = 15) -> str:
    import cProfile
    import io
    import pstats

    size, read_at, close = open_reader("vhdx", chain)
    offsets = rand_offsets(size, rand_ops) if row == "rand4k" else []
    run_pass(row, size, read_at, offsets)
    t0 = time.perf_counter()
    run_pass(row, size, read_at, offsets)
    plain = time.perf_counter() - t0
    pr = cProfile.Profile()
    pr.enable()
    run_pass(row, size, read_at, offsets)
    pr.disable()
    close()
    s = io.StringIO()
    st = pstats.Stats(pr, stream=s)
    total = st.total_tt
    rows = []
    for (fn, line, func), (cc, nc, tt, ct, _) in st.stats.items():
        rows.append((tt, ct, nc, f"{os.path.relpath(fn, ROOT) if fn.startswith(str(ROOT)) else fn}:{line}({func})"))
    rows.sort(reverse=True)
    out = [f"row={row} chain={[os.path.basename(c) for c in chain]} unprofiled pass {plain:.3f}s, "
           f"profiled {total:.3f}s",
           "| tottime % | cumtime % | calls | function |", "|---:|---:|---:|---|"]
    for tt, ct, nc, name in rows[:top_n]:
        out.append(f"| {100 * tt / total:.1f} | {100 * ct / total:.1f} | {nc} | `{name}` |")
    return "\n".join(out)


# ------------------------------------------------------------------ qemu (external processes)
def qemu_row(img: str, row: str, size: int, reps: int, rand_ops: int) -> dict:
    times: list[float] = []
    nbytes = size
    ops = 0
    for i in range(reps + 1):  # first is warm-up
        if row in ("seq1m", "seq64k"):
            bs = MiB if row == "seq1m" else 64 * KiB
            ops = -(-size // bs)
            r = subprocess.run(["qemu-img", "bench", "-f", "vhdx", "-d", "1", "-c", str(ops), "-s", str(bs),
                                "-S", str(bs), img], capture_output=True, text=True, check=True)
            t = float(re.search(r"Run completed in ([0-9.]+) seconds", r.stdout).group(1))
        elif row == "sha256":
            t0 = time.perf_counter()
            subprocess.run(["qemu-img", "convert", "-m", "1", "-n", "-f", "vhdx", img, "--target-image-opts",
                            f"driver=null-co,size={size},read-zeroes=off"], check=True, capture_output=True)
            t = time.perf_counter() - t0
            ops = 0
        else:
            offsets = rand_offsets(size, rand_ops)
            cmds = "".join(f"read -C {o} 4k\n" for o in offsets)
            r = subprocess.run(["qemu-io", "-r", "-f", "vhdx", img], input=cmds, capture_output=True, text=True,
                               check=True)
            t = 0.0
            n = 0
            for m in re.finditer(r"(\d+),(\d+),[0-9:.]+,([0-9.]+|inf),([0-9.]+|inf)", r.stdout):
                bps = float(m.group(3))
                t += int(m.group(1)) / bps if bps not in (0.0, float("inf")) else 0.0
                n += 1
            if n != rand_ops:
                raise RuntimeError(f"qemu-io: parsed {n} of {rand_ops} reads")
            ops = n
            nbytes = n * 4096
        if i:
            times.append(t)
    return {"times": times, "bytes": nbytes, "ops": ops, "sha256": None, "rss_kib": None}


# ------------------------------------------------------------------ driver
def images(quick: bool) -> dict[str, list[str]]:
    from make_images import make_all

    d = HERE / "work" / ("small" if quick else "full")
    man = make_all(d, small=quick)
    p = lambda k: str(d / man["images"][k]["name"])  # noqa: E731
    return {"dynamic": [p("dynamic")], "fixed": [p("fixed")],
            "chain": [p("child2"), p("child1"), p("base")]}, man


def warm_cache(paths: list[str]) -> None:
    for path in paths:
        with open(path, "rb", buffering=0) as fh:
            buf = bytearray(16 * MiB)
            while fh.readinto(buf):
                pass


def merge_rounds(prev: dict | None, res: dict | None) -> dict | None:
    """One reader's results over several rounds: all measured times, the highest
    peak RSS; an error or a changing digest wins."""
    if prev is None or res is None:
        return res
    if "error" in prev or "error" in res:
        return prev if "error" in prev else res
    out = dict(prev, times=prev["times"] + res["times"])
    if prev.get("rss_kib") or res.get("rss_kib"):
        out["rss_kib"] = max(prev.get("rss_kib") or 0, res.get("rss_kib") or 0)
    if prev.get("sha256") != res.get("sha256"):
        out["sha256"] = f"{prev.get('sha256')}|{res.get('sha256')}"  # shows up as a MISMATCH
    return out


def fmt_rate(res: dict | None, row: str) -> str:
    if res is None:
        return "n/a"
    if "error" in res:
        return "error"
    med = statistics.median(res["times"])
    if row == "rand4k":
        return f"{res['ops'] / med / 1000:.1f}k ops/s"
    return f"{res['bytes'] / med / 1e9:.2f} GB/s"


def rate(res: dict | None, row: str) -> float | None:
    if not res or "error" in res or not res["times"]:
        return None
    med = statistics.median(res["times"])
    return (res["ops"] if row == "rand4k" else res["bytes"]) / med if med > 0 else None


def machine() -> dict:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    vers = {}
    try:
        import pyvhdi

        vers["libvhdi"] = pyvhdi.get_version()
    except Exception as e:  # noqa: BLE001
        vers["libvhdi"] = f"unavailable ({e})"
    try:
        from importlib.metadata import version

        vers["dissect.hypervisor"] = version("dissect.hypervisor")
    except Exception:  # noqa: BLE001
        vers["dissect.hypervisor"] = "?"
    try:
        vers["qemu"] = subprocess.run(["qemu-img", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    except Exception as e:  # noqa: BLE001
        vers["qemu"] = f"unavailable ({e})"
    return {"nproc": os.cpu_count(), "cpu": cpu, "kernel": platform.release(),
            "python": platform.python_version(), "versions": vers}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1/8-size images, 3 reps, 20k random reads")
    ap.add_argument("--reps", type=int)
    ap.add_argument("--rounds", type=int, help="interleaved rounds per row (default 2, --quick 1); "
                    "a reader's median is over reps x rounds passes")
    ap.add_argument("--rand-ops", type=int)
    ap.add_argument("--only", help="comma list of dynamic,fixed,chain")
    ap.add_argument("--readers", default=",".join(READERS))
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--profile", action="store_true", help="also cProfile vhdx on rand4k and seq64k")
    ap.add_argument("--json", help="write raw results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(json.loads(a.worker))))
        return 0
    reps = a.reps or (3 if a.quick else 5)
    rounds = a.rounds or (1 if a.quick else 2)
    rand_ops = a.rand_ops or (20000 if a.quick else 100000)
    imgs, man = images(a.quick)
    if a.only:
        imgs = {k: v for k, v in imgs.items() if k in a.only.split(",")}
    readers = a.readers.split(",")
    rows = a.rows.split(",")
    warm_cache(sorted({p for ch in imgs.values() for p in ch}))
    results: dict = {}
    shas: dict = {}
    for key, chain in imgs.items():
        size = man["images"][{"dynamic": "dynamic", "fixed": "fixed", "chain": "child2"}[key]]["virtual_size"]
        for row in rows:
            # Rounds interleave the readers (order reversed every other round), so a
            # drift of the machine's speed (noisy neighbours, page-cache reclaim)
            # spreads over all readers instead of favouring whichever ran first.
            for rnd in range(rounds):
                for rd in (readers if rnd % 2 == 0 else readers[::-1]):
                    t0 = time.monotonic()
                    if rd == "qemu":
                        res = None if len(chain) > 1 else qemu_row(chain[0], row, size, reps, rand_ops)
                    else:
                        cfg = {"chain": chain, "row": row, "reps": reps, "reader": rd, "rand_ops": rand_ops}
                        r = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cfg)],
                                           capture_output=True, text=True)
                        if r.returncode:
                            res = {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "failed"}
                        else:
                            res = json.loads(r.stdout.strip().splitlines()[-1])
                    res = merge_rounds(results.get((key, row, rd)), res)
                    results[(key, row, rd)] = res
                    if res and res.get("sha256") and rd not in NOT_PEERS:
                        shas.setdefault(key, {})[rd] = res["sha256"]
                    print(f"# {key:8s} {row:7s} {rd:8s} round {rnd + 1}/{rounds} {fmt_rate(res, row):>16s}  "
                          f"({time.monotonic() - t0:.1f}s)", file=sys.stderr, flush=True)
    # table
    peers = [r for r in readers if r != "vhdx"]
    real = [p for p in peers if p not in NOT_PEERS]
    head = (["image", "row", "vhdx"] + peers + [f"vhdx/{p}" for p in peers]
            + (["vhdx/fastest peer"] if real else []) + ["vhdx peak RSS"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in imgs:
        bat = sum(man["images"][n]["bat_bytes"] for n in
                  ({"dynamic": ["dynamic"], "fixed": ["fixed"], "chain": ["child2", "child1", "base"]}[key]))
        for row in rows:
            v = results.get((key, row, "vhdx"))
            cells = [key, ROW_TITLES[row], fmt_rate(v, row)]
            cells += [fmt_rate(results.get((key, row, p)), row) for p in peers]
            vr = rate(v, row)
            for p in peers:
                pr = rate(results.get((key, row, p)), row)
                cells.append(f"{vr / pr:.2f}x" if vr and pr else "n/a")
            if real:
                # qemu's SHA row reads without hashing: not comparable, left out here
                comparable = [p for p in real if not (row == "sha256" and p == "qemu")] or real
                best = max((rate(results.get((key, row, p)), row) or 0, p) for p in comparable)
                cells.append(f"{vr / best[0]:.2f}x ({best[1]})" if vr and best[0] else "n/a")
            cells.append(f"{v['rss_kib'] / 1024:.0f} MiB (BAT {bat / MiB:.0f} MiB)" if v and v.get("rss_kib")
                         else "n/a")
            lines.append("| " + " | ".join(cells) + " |")
    print("\n".join(lines))
    print()
    for key, d in shas.items():
        agree = len(set(d.values())) == 1
        print(f"SHA-256 {key}: {'all readers agree' if agree else 'MISMATCH'}: "
              + ", ".join(f"{k}={v[:16]}" for k, v in d.items()))
    m = machine()
    print(f"\nmachine: nproc={m['nproc']} cpu={m['cpu']!r} kernel={m['kernel']} python={m['python']}")
    print(f"versions: {m['versions']}")
    print(f"reps={reps} x rounds={rounds} (median reported; 1 warm-up pass per round), random reads={rand_ops}, "
          f"images={'small (1/8)' if a.quick else 'full'}")
    if a.profile:
        print("\n## cProfile of vhdx (tottime = self time)\n")
        for key in ("dynamic", "chain"):
            if key in imgs:
                for row in ("rand4k", "seq64k"):
                    print(profile(imgs[key], row, rand_ops))
                    print()
    if a.json:
        Path(a.json).write_text(json.dumps({"results": {"|".join(k): v for k, v in results.items()},
                                            "machine": m, "reps": reps, "rounds": rounds,
                                            "rand_ops": rand_ops}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
