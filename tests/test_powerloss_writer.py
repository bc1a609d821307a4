"""Power-loss simulation of WritableDisk workloads (writes, zeroes, discards,
flushes, reopens and resizes) on dynamic, fixed and differencing disks.

Every pwrite / truncate / flush goes through a RecordingStorage. A power cut at
journal position ``c`` keeps every op up to the last flush before ``c`` plus a
subset of the later ones (modes of tests/powerloss.py: none, all, prefix, random
subset, torn 4 KiB pieces, torn + reordered, and a suffix of the unflushed ops). Each crash image must:

* open read-only with ``vhdx.open`` (the log replayed in memory) and with
  ``vhdx.open(..., "r+")`` on a copy (the log replayed into the file), both reading
  the same bytes;
* pass ``vhdx.check.check_chain`` with no error (and, after the writable open and
  close, with no finding at all);
* have a virtual size one of the sizes the workload had between its last
  completed ``flush()`` and the cut;
* read, byte for byte, the data as of that last completed ``flush()``, except
  where an operation issued after it wrote: there a byte reads the old value or a
  value one of those operations wrote, never anything else.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

import vhdx
from vhdx import structures as S
from vhdx.check import check_chain
from vhdx.storage import FileStorage
from storages import RecordingStorage
from vhdx.writer import WritableDisk

from powerloss import MODES, _apply_op, cut_states, pending_subset

MiB = S.MiB
# tests/powerloss.py's modes, plus "suffix": only the last k unflushed ops landed
# (what a device that reorders writes leaves when it persisted the newest first).
ALL_MODES = (*MODES, "suffix")


@dataclass
class Op:
    kind: str              # write | zero | discard | resize | flush
    start: int             # journal index of its first op
    end: int = 0           # journal index past its last op
    offset: int = 0
    data: bytes | None = None  # bytes written (None: zeros over [offset, offset+length))
    length: int = 0
    size_after: int = 0
    snapshot: bytes | None = None  # ground truth after a flush


@dataclass
class Workload:
    dir: Path
    name: str
    base: bytes            # the file before the workload
    journal: list
    ops: list[Op]
    initial: bytes
    initial_size: int
    block_size: int
    fixed: bool
    stats: dict = field(default_factory=dict)


def _make(dirpath: Path, kind: str, rng: random.Random) -> tuple[Path, bytearray]:
    size = 8 * MiB
    if kind == "differencing":
        base = vhdx.create(dirpath / "base.vhdx", size, block_size=MiB)
        with vhdx.open(base, "r+") as b:
            pat = rng.randbytes(size)
            b.write_at(0, pat)
        return Path(vhdx.create(dirpath / "crash.avhdx", parent=base, block_size=MiB)), bytearray(pat)
    p = Path(vhdx.create(dirpath / "crash.vhdx", size, type=kind, block_size=MiB))
    return p, bytearray(size)


def record(dirpath: Path, kind: str, seed: int, n_ops: int) -> Workload:
    rng = random.Random(seed)
    path, gt = _make(dirpath, kind, rng)
    base = path.read_bytes()
    initial = bytes(gt)
    rec = RecordingStorage(FileStorage.open(path))
    guids = lambda: uuid.UUID(int=rng.getrandbits(128))  # noqa: E731
    disk = WritableDisk(path, storage=rec, guid_factory=guids)
    ops: list[Op] = []
    fixed = kind == "fixed"
    bs = MiB
    stats = {"writes": 0, "resizes": 0, "reopens": 0, "flushes": 0}
    for _ in range(n_ops):
        size = len(gt)
        what = rng.choices(["write", "zero", "discard", "flush", "resize", "reopen"], [8, 2, 1, 3, 1, 1])[0]
        op = Op(what, len(rec.journal))
        if what == "write":
            off = rng.randrange(size)
            ln = min(size - off, rng.choice([1, 300, 4096, 5000, 64 * 1024, MiB, MiB + 4097]))
            data = rng.randbytes(ln)
            disk.write_at(off, data)
            gt[off:off + ln] = data
            op.offset, op.data, op.length = off, data, ln
            stats["writes"] += 1
        elif what in ("zero", "discard"):
            off = rng.randrange(size)
            ln = min(size - off, rng.choice([512, 4096, MiB, 2 * MiB + 512]))
            disk.write_zeroes_at(off, ln, discard=what == "discard")
            if what == "discard" and not fixed:
                # Only whole blocks change (to zeros); edges are left alone.
                lo = -(-off // bs) * bs
                hi = off + ln if off + ln == size else (off + ln) // bs * bs
                off, ln = lo, max(0, hi - lo)
            gt[off:off + ln] = bytes(ln)
            op.offset, op.length = off, ln
        elif what == "resize":
            new = rng.choice([6 * MiB, 7 * MiB + 512, 9 * MiB, 10 * MiB + 4096, 12 * MiB])
            if new < size and any(gt[new:]):
                disk.write_zeroes_at(new, size - new)  # make the cut range empty first
                gt[new:] = bytes(size - new)
                op.kind = "zero"
                op.offset, op.length = new, size - new
                op.end = len(rec.journal)
                op.size_after = len(gt)
                ops.append(op)
                op = Op("resize", len(rec.journal))
            disk.resize(new)
            if new < size:
                op.offset, op.length = new, size - new  # cut range: zeros
                del gt[new:]
            else:
                gt.extend(bytes(new - size))
            stats["resizes"] += 1
        elif what == "flush":
            disk.flush()
            op.snapshot = bytes(gt)
            stats["flushes"] += 1
        else:  # reopen: close (a flush) and a new session
            disk.close()
            op.kind = "flush"
            op.snapshot = bytes(gt)
            disk = WritableDisk(path, storage=rec, guid_factory=guids)
            stats["reopens"] += 1
        op.end = len(rec.journal)
        op.size_after = len(gt)
        ops.append(op)
    op = Op("flush", len(rec.journal))
    disk.close()
    op.end, op.size_after, op.snapshot = len(rec.journal), len(gt), bytes(gt)
    ops.append(op)
    rec.inner.close()
    return Workload(dirpath, path.name, base, rec.journal, ops, initial, 8 * MiB, bs, fixed, stats)


class Checker:
    def __init__(self, wl: Workload) -> None:
        self.wl = wl
        self.crash = wl.dir / wl.name
        suffix = os.path.splitext(wl.name)[1]
        self.copy = wl.dir / f"crash-rw{suffix}"

    def check(self, img: bytearray, cut: int, durable: int) -> None:
        wl = self.wl
        # Last flush() whose ops are all durable, and the ops issued after it.
        snap, snap_size = wl.initial, wl.initial_size
        later: list[Op] = []
        for op in wl.ops:
            if op.kind == "flush" and op.end <= durable:
                snap, snap_size, later = op.snapshot, op.size_after, []
            elif op.start < cut:
                later.append(op)
        sizes = {snap_size} | {op.size_after for op in later if op.kind == "resize"}
        self.crash.write_bytes(img)
        with vhdx.open(self.crash) as d:
            size = d.size
            got = d.read_at(0, size)
        assert size in sizes, (size, sizes)
        g = np.frombuffer(got, dtype=np.uint8)
        ref = np.zeros(size, dtype=np.uint8)
        n = min(size, len(snap))
        ref[:n] = np.frombuffer(snap, dtype=np.uint8)[:n]
        ok = g == ref
        for op in later:
            if op.kind in ("write", "zero", "discard", "resize") and op.length:
                a, b = op.offset, min(size, op.offset + op.length)
                if a >= b:
                    continue
                if op.data is None:
                    ok[a:b] |= g[a:b] == 0
                else:
                    ok[a:b] |= g[a:b] == np.frombuffer(op.data, dtype=np.uint8)[:b - a]
        if not ok.all():
            bad = int(np.argmin(ok))
            by = [(o.kind, o.offset, o.length) for o in later if o.offset <= bad < o.offset + o.length]
            raise AssertionError(f"cut {cut} (durable {durable}): byte {bad:#x} reads {g[bad]:#x}, "
                                 f"flushed {ref[bad]:#x}, written later by {by}")
        rep = check_chain(self.crash)
        assert not rep.errors, [f.message for f in rep.errors]
        shutil.copyfile(self.crash, self.copy)
        with vhdx.open(self.copy, "r+") as d:   # replays the log into the file
            assert d.size == size and d.read_at(0, size) == got
        rep = check_chain(self.copy)
        assert rep.clean, [f.message for f in rep.findings]
        with vhdx.open(self.copy) as d:
            assert d.read_at(0, size) == got


def simulate(wl: Workload, rng: random.Random, modes_per_cut: int, max_cuts: int | None = None) -> int:
    ops = wl.journal
    n = len(ops)
    cuts = list(range(n + 1))
    if max_cuts is not None and len(cuts) > max_cuts:
        cuts = sorted(rng.sample(cuts, max_cuts))
    checker = Checker(wl)
    done = 0
    for cut, durable, durable_img, pending in cut_states(wl.base, ops, cuts):
        modes = ["none"] if not pending else rng.sample(ALL_MODES, min(modes_per_cut, len(ALL_MODES)))
        for mode in modes:
            img = bytearray(durable_img)
            if mode == "suffix":  # the device kept only the latest writes
                chosen = pending[rng.randrange(len(pending)):]
            else:
                chosen = pending_subset(pending, mode, rng)
            for op in chosen:
                _apply_op(img, op)
            try:
                checker.check(img, cut, durable)
            except Exception as e:
                raise AssertionError(f"{wl.name} cut={cut}/{n} mode={mode}: {e}") from e
            done += 1
    return done


def _tmp() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


@pytest.fixture
def fast_dir():  # noqa: ANN201
    d = tempfile.mkdtemp(prefix="vhdx-pl-", dir=_tmp())
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


CUTS_SEEN: dict[str, int] = {}


@pytest.mark.parametrize("kind,seed,n_ops", [("dynamic", 1, 48), ("differencing", 2, 50),
                                             ("fixed", 3, 48), ("dynamic", 4, 48)])
def test_power_loss_during_writer_workloads(fast_dir, kind, seed, n_ops):
    wl = record(fast_dir, kind, seed, n_ops)
    assert wl.stats["writes"] >= 3
    done = simulate(wl, random.Random(seed * 1000), modes_per_cut=2)
    CUTS_SEEN[f"{kind}-{seed}"] = done
    # Together the four workloads simulate well over 1000 power cuts.
    assert done >= 200, (done, len(wl.journal), wl.stats)


def test_power_loss_total_cuts():
    """Runs after the parametrized cases (file order): their sum is >= 1000."""
    if len(CUTS_SEEN) < 4:
        pytest.skip("run with the workload tests")
    assert sum(CUTS_SEEN.values()) >= 1000, CUTS_SEEN


@pytest.mark.soak
@pytest.mark.parametrize("seed", range(10, 22))
def test_power_loss_soak(fast_dir, seed):
    kind = ["dynamic", "differencing", "fixed"][seed % 3]
    wl = record(fast_dir, kind, seed, 40)
    simulate(wl, random.Random(seed), modes_per_cut=3)
