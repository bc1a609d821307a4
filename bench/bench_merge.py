"""Merge benchmark (issue 4): copy path vs ``cp --reflink=never``, clone path on XFS,
64 TiB scaling, peak RSS; every merge result verified against a ground truth.

    python3 bench/bench_merge.py [--quick] [--reps N] [--dir DIR] [--no-xfs] [--no-drop]
                                 [--profile] [--json OUT]

Chain: a dynamic parent (32 MiB blocks, half of the blocks of the changed region
present) and a differencing child (2 MiB blocks) with ``--full`` FULLY_PRESENT blocks
(default 1024 = 2 GiB) and ``--partial`` PARTIALLY_PRESENT blocks (default 256, about
half their sectors defined in alternating 4 KiB-granular runs = ~256 MiB defined),
spread at random over the first 4 GiB. Two virtual sizes with the same changes: 4 GiB
and 64 TiB. Images by ``bench/bench_merge_images.py`` (vhdx.layout + raw writes).

Every measured merge: a fresh byte copy of the pristine chain (``cp --reflink=never``),
``sync`` + drop page caches (root; cold run) unless ``--no-drop``, then
``vhdx.merge(child, keep=True, allow_clone=...)`` in a fresh subprocess that
reports the MergeSummary, its own wall time and its ``VmHWM``. After it, SHA-256 of the
merged parent through ``vhdx.open`` over the changed region is compared with the
ground truth computed from the description (and, for 64 TiB, the extent map beyond
the region must hold no data). Rows:

* ``ext4 copy``: allow_clone=False (copy_file_range on ext4 is a real in-kernel copy);
* ``ext4 read/write``: ``vhdx.native.copy_ranges`` monkeypatched in the worker to
  ``allow_copy_file_range=False`` (pread/pwrite only);
* ``cp``: ``cp --reflink=never`` of a plain file of exactly the bytes the merge copies,
  timed alone and followed by ``sync FILE`` (fsync: the merge makes its data durable);
* on a loop-mounted XFS with reflink: clone (allow_clone=True), allow_clone=False (whose
  copy_file_range may share extents on XFS) and forced read/write;
* 64 TiB ext4 copy (and 64 TiB XFS clone).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40


# --- worker (runs in a fresh process) ----------------------------------------------
def worker(args: dict) -> None:
    import vhdx.merge_engine as M
    import vhdx.native as N

    # Time spent inside the C copy calls and in fsync: what is left of a merge when
    # everything the engine adds around them is taken out (the floor of the row).
    acct: dict = {"copy_calls_s": 0.0, "fsync_s": 0.0, "fsyncs": 0, "fsync_sites": {}}
    orig = N.copy_ranges
    rw = args["mode"] == "rw"

    def copy_ranges(src, dst, ranges, *, allow_clone=True, allow_copy_file_range=True):  # noqa: ANN001, ANN202
        t0 = time.perf_counter()
        try:
            if rw:
                return orig(src, dst, ranges, allow_clone=False, allow_copy_file_range=False)
            return orig(src, dst, ranges, allow_clone=allow_clone, allow_copy_file_range=allow_copy_file_range)
        finally:
            acct["copy_calls_s"] += time.perf_counter() - t0

    N.copy_ranges = copy_ranges
    real_fsync = os.fsync

    def fsync(fd):  # noqa: ANN001, ANN202
        t0 = time.perf_counter()
        try:
            return real_fsync(fd)
        finally:
            acct["fsync_s"] += time.perf_counter() - t0
            acct["fsyncs"] += 1
            # Who asked for it (three callers up, file name included): the JSON then
            # says which phase each barrier belongs to.
            f, names = sys._getframe(1), []
            while f is not None and len(names) < 4:
                if not f.f_code.co_filename.endswith("storage.py"):
                    names.append(f"{os.path.basename(f.f_code.co_filename)}:{f.f_code.co_name}")
                f = f.f_back
            try:
                name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                name = "?"
            key = f"{name} " + " < ".join(names)
            acct["fsync_sites"][key] = acct["fsync_sites"].get(key, 0) + 1

    os.fsync = fsync
    allow_clone = args["mode"] == "clone"
    prof = None
    if args.get("profile"):
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    t = time.perf_counter()
    s = M.merge(args["child"], keep=True, allow_clone=allow_clone)
    wall = time.perf_counter() - t
    if prof is not None:
        prof.disable()
        prof.dump_stats(args["profile"])
    hwm = 0
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
    out = s.to_dict()
    out.update(wall=wall, vmhwm=hwm, **acct)
    print(json.dumps(out))


# --- helpers ----------------------------------------------------------------------------
def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True)


def _loadavg3() -> list[str]:
    with open("/proc/loadavg") as fh:
        return fh.read().split()[:3]


def loadavg() -> float:
    with open("/proc/loadavg") as fh:
        return float(fh.read().split()[0])


class Env:
    def __init__(self, drop: bool) -> None:
        self.drop = drop
        self.dropped = False
        self.loads: list[float] = []

    def cold(self) -> None:
        os.sync()
        if self.drop:
            try:
                with open("/proc/sys/vm/drop_caches", "w") as fh:
                    fh.write("3\n")
                self.dropped = True
            except OSError as e:
                print(f"# cannot drop caches ({e}); runs are warm", file=sys.stderr)
                self.drop = False
        self.loads.append(loadavg())


def fresh_copy(src_dir: str, dst_dir: str) -> str:
    if os.path.exists(dst_dir):
        shutil.rmtree(dst_dir)
    os.makedirs(dst_dir)
    for name in ("parent.vhdx", "child.avhdx"):
        sh("cp", "--reflink=never", "--sparse=always", os.path.join(src_dir, name),
           os.path.join(dst_dir, name))
    return os.path.join(dst_dir, "child.avhdx")


def run_merge(child: str, mode: str, profile: str | None = None) -> dict:
    args = {"child": child, "mode": mode, "profile": profile}
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(args)],
                       check=True, capture_output=True, text=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def verify(parent: str, layout, expected: str, virtual_size: int, chain_len: int = 1) -> str:  # noqa: ANN001
    """SHA-256 of the changed region of the merged parent == ground truth; for a huge
    disk also: no data extent beyond the region and zeros at sampled far offsets."""
    import hashlib

    import vhdx

    region = layout.recipe.region
    h = hashlib.sha256()
    buf = bytearray(16 * MiB)
    with vhdx.open(parent) as d:
        if len(d.chain) != chain_len:
            return f"FAIL (chain of {len(d.chain)} files, expected {chain_len})"
        for off in range(0, region, len(buf)):
            n = d.readinto_at(off, buf)
            h.update(memoryview(buf)[:n])
        if h.hexdigest() != expected:
            return f"FAIL (sha256 {h.hexdigest()[:12]} != {expected[:12]})"
        if virtual_size > region:
            data = [e for e in d.extents(region) if e.kind == "data"]
            if data:
                return f"FAIL ({len(data)} data extents beyond the changed region)"
            for k in range(1, 9):
                off = (virtual_size - MiB) * k // 8 // MiB * MiB
                if any(d.read_at(off, MiB)):
                    return f"FAIL (non-zero at {off})"
    return "ok"


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def fmt_rate(b: float, s: float) -> str:
    return f"{b / s / 1e9:.2f} GB/s" if s else "n/a"


# --- main -------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="1/8 of the data, 2 reps, 4 GiB XFS")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--dir", default=os.path.join(HERE, "work", "merge"))
    ap.add_argument("--no-xfs", action="store_true")
    ap.add_argument("--no-drop", action="store_true", help="do not drop page caches (warm runs)")
    ap.add_argument("--profile", action="store_true", help="cProfile one ext4 copy-path merge")
    ap.add_argument("--json", default=None)
    ap.add_argument("--keep-files", action="store_true")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(json.loads(a.worker))
        return 0

    from bench_merge_images import Recipe

    reps = a.reps or (2 if a.quick else 3)
    if a.quick:
        recipe = Recipe(region=512 * MiB, child_full=128, child_partial=32)
    else:
        recipe = Recipe(region=4 * GiB)
    small_size, huge_size = recipe.region, 64 * TiB
    layout = recipe.layout()
    env = Env(not a.no_drop)
    root = os.path.abspath(a.dir)
    os.makedirs(root, exist_ok=True)
    cleanup: list = []

    def clean() -> None:
        while cleanup:
            fn = cleanup.pop()
            try:
                fn()
            except Exception as e:  # noqa: BLE001
                print(f"# cleanup: {e}", file=sys.stderr)

    atexit.register(clean)
    if not a.keep_files:
        cleanup.append(lambda: shutil.rmtree(root, ignore_errors=True))

    facts = {
        "nproc": os.cpu_count(), "kernel": os.uname().release,
        "python": sys.version.split()[0], "fs": subprocess.run(
            ["stat", "-f", "-c", "%T", root], capture_output=True, text=True).stdout.strip(),
        "load_start": _loadavg3(),
    }
    print(f"# {facts}", file=sys.stderr)
    t0 = time.time()
    pristine = {}
    for name, vs in (("4g", small_size), ("64t", huge_size)):
        d = os.path.join(root, "pristine-" + name)
        shutil.rmtree(d, ignore_errors=True)
        layout.write_chain(d, vs)
        pristine[name] = d
    # The same changes, but the child's partially-present blocks hold only their
    # defined runs (holes elsewhere, as vhdx's own writer leaves them).
    if not a.no_xfs:
        import dataclasses

        d = os.path.join(root, "pristine-4g-sparse")
        shutil.rmtree(d, ignore_errors=True)
        dataclasses.replace(recipe, sparse_partial=True).layout().write_chain(d, small_size)
        pristine["4g-sparse"] = d
    cp_src = os.path.join(root, "cp-src.bin")
    cp_bytes = layout.write_cp_source(cp_src)
    expected = layout.expected_sha256()
    print(f"# images built in {time.time() - t0:.0f} s; defined bytes {layout.defined_bytes} "
          f"(cp file {cp_bytes}); expected sha256 {expected[:16]}", file=sys.stderr)
    # the pristine chains themselves must read the ground truth
    for name in pristine:
        v = verify(os.path.join(pristine[name], "child.avhdx"), layout, expected,
                   huge_size if name == "64t" else small_size, chain_len=2)
        if v != "ok":
            print(f"pristine {name} chain: {v}", file=sys.stderr)
            return 1

    rows: dict[str, list[dict]] = {}
    raw: dict = {"facts": facts, "recipe": vars(recipe), "defined_bytes": layout.defined_bytes}

    def measure(label: str, src: str, work: str, mode: str, vs: int) -> None:
        for i in range(reps):
            child = fresh_copy(src, work)
            env.cold()
            load = loadavg()
            r = run_merge(child, mode)
            r["verify"] = verify(os.path.join(work, "parent.vhdx"), layout, expected, vs)
            r["load"] = load
            if "XFS" in label:
                import vhdx.native as N

                fd = os.open(os.path.join(work, "parent.vhdx"), os.O_RDONLY)
                try:
                    r["shared"] = N.fiemap_shared(fd, 0, os.fstat(fd).st_size)
                finally:
                    os.close(fd)
            rows.setdefault(label, []).append(r)
            print(f"# {label} rep {i + 1}: {r['seconds']:.2f} s, {r['ranges_by_method']}, "
                  f"HWM {r['vmhwm'] / MiB:.0f} MiB, load {load}, verify {r['verify']}",
                  file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)

    # 1. ext4 (the checkout's file system): copy path, read/write path, cp
    work = os.path.join(root, "run")
    measure("4 GiB, ext4, copy path (allow_clone=False)", pristine["4g"], work, "copy", small_size)
    measure("4 GiB, ext4, forced read/write", pristine["4g"], work, "rw", small_size)
    cp_times, cp_sync_times = [], []
    for i in range(reps):
        dst = os.path.join(root, "cp-dst.bin")
        if os.path.exists(dst):
            os.unlink(dst)
        env.cold()
        t = time.perf_counter()
        sh("cp", "--reflink=never", cp_src, dst)
        t1 = time.perf_counter()
        sh("sync", dst)
        t2 = time.perf_counter()
        cp_times.append(t1 - t)
        cp_sync_times.append(t2 - t)
        os.unlink(dst)
        print(f"# cp rep {i + 1}: {t1 - t:.2f} s, +sync {t2 - t:.2f} s", file=sys.stderr)
    raw["cp"] = {"bytes": cp_bytes, "cp": cp_times, "cp_sync": cp_sync_times}
    # 3. scaling
    measure("64 TiB, ext4, copy path (allow_clone=False)", pristine["64t"], work, "copy", huge_size)

    # 2. XFS with reflink
    xfs_note = "not measured (--no-xfs)"
    if not a.no_xfs:
        img = os.path.join(root, "xfs.img")
        mnt = os.path.join(root, "xfs")
        try:
            os.makedirs(mnt, exist_ok=True)
            with open(img, "wb") as fh:
                fh.truncate((4 if a.quick else 12) * GiB)
            sh("mkfs.xfs", "-q", "-m", "reflink=1", img)
            sh("mount", "-o", "loop", img, mnt)
            xw = os.path.join(mnt, "run")
            measure("4 GiB, XFS reflink, clone path", pristine["4g"], xw, "clone", small_size)
            measure("4 GiB, XFS reflink, allow_clone=False", pristine["4g"], xw, "copy", small_size)
            measure("4 GiB, XFS reflink, forced read/write", pristine["4g"], xw, "rw", small_size)
            measure("64 TiB, XFS reflink, clone path", pristine["64t"], xw, "clone", huge_size)
            measure("4 GiB sparse child, XFS reflink, clone path", pristine["4g-sparse"], xw, "clone", small_size)
            measure("4 GiB sparse child, XFS reflink, forced read/write", pristine["4g-sparse"], xw, "rw",
                    small_size)
            xfs_note = "measured"
        except (OSError, subprocess.CalledProcessError) as e:
            xfs_note = f"not measured: {e}"
            print(f"# XFS: {xfs_note}", file=sys.stderr)
        finally:
            subprocess.run(["umount", mnt], check=False, stderr=subprocess.DEVNULL)
            shutil.rmtree(mnt, ignore_errors=True)
            if os.path.exists(img):
                os.unlink(img)

    prof_text = ""
    if a.profile:
        import io
        import pstats

        for name, vs in (("4g", small_size), ("64t", huge_size)):
            child = fresh_copy(pristine[name], work)
            env.cold()
            pf = os.path.join(root, f"merge-{name}.prof")
            r = run_merge(child, "copy", profile=pf)
            r["verify"] = verify(os.path.join(work, "parent.vhdx"), layout, expected, vs)
            s = io.StringIO()
            st = pstats.Stats(pf, stream=s)
            st.sort_stats("tottime").print_stats(15)
            st.sort_stats("cumulative").print_stats(25)
            prof_text += (f"== profiled {name} ext4 copy-path merge: {r['seconds']:.2f} s under cProfile, "
                          f"verify {r['verify']}\n" + s.getvalue())
        shutil.rmtree(work, ignore_errors=True)
    facts["load_end"] = _loadavg3()
    facts["load_at_runs"] = [min(env.loads), max(env.loads)] if env.loads else None

    # --- report ---------------------------------------------------------------------
    bat = {}
    for name, vs in (("4g", small_size), ("64t", huge_size)):
        from vhdx.layout import plan_layout
        bat[name] = (plan_layout(vs, recipe.parent_bs).bat_length
                     + plan_layout(vs, recipe.child_bs, parent=_dummy_parent()).bat_length)
    cold = "cold (page cache dropped before each run)" if env.dropped else "warm (page cache not dropped)"
    print(f"Runs: {reps} per row, median; {cold}. Changed data: {layout.defined_bytes / GiB:.3f} GiB "
          f"({len(layout.child_full)} full + {len(layout.child_partial)} partial 2 MiB blocks). "
          f"Load average at run starts: {facts['load_at_runs']}.\n")
    print("| row | merge time | throughput (moved / time) | ranges_by_method | cloned / copied / zeroed | "
          "in C copy calls / fsyncs (median) | peak RSS (VmHWM) | RSS limit (100 MiB + BATs) | verify |")
    print("|---|---|---|---|---|---|---|---|---|")
    med_s = {}
    for label, rs in rows.items():
        secs = [r["seconds"] for r in rs]
        m = med(secs)
        med_s[label] = m
        moved = rs[0]["bytes_moved"]
        hwm = max(r["vmhwm"] for r in rs)
        limit = 100 * MiB + bat["64t" if label.startswith("64") else "4g"]
        ok = "ok" if all(r["verify"] == "ok" for r in rs) else "; ".join(
            sorted({r["verify"] for r in rs if r["verify"] != "ok"}))
        meth = ", ".join(f"{k} {v}" for k, v in sorted(rs[0]["ranges_by_method"].items()))
        cz = (f"{rs[0]['bytes_cloned'] / MiB:.0f} / {rs[0]['bytes_copied'] / MiB:.0f} / "
              f"{rs[0]['bytes_zeroed'] / MiB:.0f} MiB")
        if "shared" in rs[0]:
            cz += f" (target FIEMAP-shared {rs[0]['shared'][0] / MiB:.0f} MiB)"
        fl = (f"{med([r['copy_calls_s'] for r in rs]):.3f} s / {rs[0]['fsyncs']} fsyncs "
              f"{med([r['fsync_s'] for r in rs]):.3f} s")
        print(f"| {label} | {m:.3f} s (min {min(secs):.3f}, max {max(secs):.3f}) | "
              f"{fmt_rate(moved, m)} | {meth} | {cz} | {fl} | {hwm / MiB:.0f} MiB | {limit / MiB:.0f} MiB "
              f"({'met' if hwm <= limit else 'NOT met'}) | {ok} |")
    cpm, cpsm = med(cp_times), med(cp_sync_times)
    print(f"| cp --reflink=never {cp_bytes / MiB:.0f} MiB file | {cpm:.2f} s "
          f"(min {min(cp_times):.2f}, max {max(cp_times):.2f}) | "
          f"{fmt_rate(cp_bytes, cpm)} | read/write 128 KiB | - | - | - | - | - |")
    print(f"| cp --reflink=never + sync FILE | {cpsm:.2f} s "
          f"(min {min(cp_sync_times):.2f}, max {max(cp_sync_times):.2f}) | "
          f"{fmt_rate(cp_bytes, cpsm)} | | - | - | - | - | - |")

    print("\n| target | measured | met? |\n|---|---|---|")
    c4 = "4 GiB, ext4, copy path (allow_clone=False)"
    rw4 = "4 GiB, ext4, forced read/write"
    moved = rows[c4][0]["bytes_moved"]
    mt = moved / med_s[c4]
    for lbl, base in (("cp+sync", cp_bytes / cpsm), ("cp alone (page cache)", cp_bytes / cpm)):
        r = mt / base
        print(f"| copy path >= 0.9x cp throughput ({lbl}) | {r:.2f}x | {'yes' if r >= 0.9 else 'no'} |")
    r = (rows[rw4][0]["bytes_moved"] / med_s[rw4]) / (cp_bytes / cpsm)
    print(f"| read/write copy path vs cp+sync (info) | {r:.2f}x | {'yes' if r >= 0.9 else 'no'} |")
    cl = "4 GiB, XFS reflink, clone path"
    if cl in med_s:
        for other in ("4 GiB, XFS reflink, forced read/write", "4 GiB, XFS reflink, allow_clone=False"):
            r = med_s[other] / med_s[cl]
            print(f"| clone >= 50x faster than copy ({other.split(', ')[-1]}) | {r:.1f}x | "
                  f"{'yes' if r >= 50 else 'no'} |")
    sc = "4 GiB sparse child, XFS reflink, clone path"
    if sc in med_s:
        r = med_s["4 GiB sparse child, XFS reflink, forced read/write"] / med_s[sc]
        print(f"| (info) sparse child: clone vs forced read/write | {r:.1f}x | {'yes' if r >= 50 else 'no'} |")
    h64 = "64 TiB, ext4, copy path (allow_clone=False)"
    r = med_s[h64] / med_s[c4]
    print(f"| 64 TiB merge within 1.5x of 4 GiB (ext4 copy path) | {r:.2f}x | {'yes' if r <= 1.5 else 'no'} |")
    h64c = "64 TiB, XFS reflink, clone path"
    if h64c in med_s and cl in med_s:
        r = med_s[h64c] / med_s[cl]
        print(f"| 64 TiB within 1.5x of 4 GiB (XFS clone path) | {r:.2f}x "
              f"({med_s[h64c]:.2f} s vs {med_s[cl]:.2f} s) | {'yes' if r <= 1.5 else 'no'} |")
    for lbl, key in (("4 GiB", "4g"), ("64 TiB", "64t")):
        hw = max(r["vmhwm"] for lb, rs in rows.items() if lb.startswith(lbl.split()[0]) for r in rs)
        lim = 100 * MiB + bat[key]
        print(f"| peak RSS {lbl} <= 100 MiB + BATs ({bat[key] / MiB:.0f} MiB) | {hw / MiB:.0f} MiB | "
              f"{'yes' if hw <= lim else 'no'} |")
    print(f"\nXFS: {xfs_note}. Machine: {facts}")
    if prof_text:
        print("\n```\n" + prof_text + "```")
    raw["rows"] = rows
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(raw, fh, indent=1, default=str)
    return 0


def _dummy_parent():  # noqa: ANN202
    import uuid

    from vhdx.layout import ParentInfo

    return ParentInfo(uuid.uuid4(), relative_path=".\\p.vhdx")


if __name__ == "__main__":
    sys.exit(main())
