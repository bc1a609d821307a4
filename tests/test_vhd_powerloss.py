"""Simulated power cuts across VHD writes (tests/powerloss.py's machinery: every
pwrite/truncate/flush recorded, crash images rebuilt from the last durable flush
plus none/all/prefix/subset/torn/shuffled/torn512 subsets of what followed).

Workloads that only write sectors never written before in that file must read
exactly as before or as after some step the cut allows (block allocation and
differencing-bit updates are ordered so). Workloads that also overwrite data in
place are checked sector by sector: every sector reads as in one allowed state
(no VHD writer journals data; a torn overwrite leaves each sector old or new).
"""

from __future__ import annotations

import hashlib
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from powerloss import MODES, allowed_range, cut_states, pending_subset

import vhdx
from vhdx.errors import VhdxError
from vhdx.storage import FileStorage
from storages import RecordingStorage
from vhdx.vhd.writer import VhdWritableDisk

MiB = 1 << 20
SIZE = 4 * MiB
BLOCK = 512 * 1024


class Rec:
    def __init__(self, base: bytes, journal, steps, states) -> None:
        self.base, self.journal, self.steps, self.states = base, journal, steps, states


class _Step:
    def __init__(self, start: int, end: int) -> None:
        self.start, self.end = start, end


def _workload(path: Path, parents: list[Path] | None, initial: bytes, rng: random.Random,
              fresh_only: bool, n: int) -> Rec:
    base = path.read_bytes()
    rec = RecordingStorage(FileStorage.open(path), forward_fd=False)
    model = bytearray(initial)
    written = np.zeros(SIZE // 512, dtype=bool)
    states = [bytes(model)]
    steps = []
    disk = VhdWritableDisk(path, parents=parents, storage=rec)
    try:
        for _ in range(n):
            for _attempt in range(200):
                sec = rng.randrange(SIZE // 512)
                cnt = min(rng.choice([1, 3, 8, 64, 700, 1024, 1500]), SIZE // 512 - sec)
                if not fresh_only:
                    break
                # Strict workloads: one block per write (a write over two blocks is two
                # allocations, not atomic on any disk), never-written sectors only -
                # whole never-allocated blocks on a dynamic disk, whose in-place
                # writes are per-sector atomic only.
                spb = BLOCK // 512
                cnt = min(cnt, spb - sec % spb)
                lo_s, hi_s = (sec, sec + cnt) if parents else (sec // spb * spb, sec // spb * spb + spb)
                if not written[lo_s:hi_s].any():
                    break
            else:
                continue
            off, ln = sec * 512, cnt * 512
            if rng.random() < 0.2 and cnt > 1:  # sub-sector write (read-modify-write)
                off += rng.randrange(1, 300)
                ln = max(1, ln - 512)
            data = rng.randbytes(ln)
            start = len(rec.journal)
            disk.write_at(off, data)
            disk.flush()
            model[off:off + ln] = data
            written[off // 512:-(-(off + ln) // 512)] = True
            steps.append(_Step(start, len(rec.journal)))
            states.append(bytes(model))
        start = len(rec.journal)
        disk.close()
        steps.append(_Step(start, len(rec.journal)))
        states.append(bytes(model))
    finally:
        if not disk.closed:
            disk.close()
    return Rec(base, rec.journal, steps, states)


def _check_crashes(rec: Rec, path: Path, parents, rng: random.Random, max_cuts: int,
                   strict: bool) -> int:
    ops = rec.journal
    n = len(ops)
    cuts = sorted(rng.sample(range(n + 1), min(n + 1, max_cuts)))
    count = 0
    state_arrays = [np.frombuffer(s, dtype=np.uint8).reshape(-1, 512) for s in rec.states]
    digests = [hashlib.sha256(s).digest() for s in rec.states]
    for cut, durable, image, pending in cut_states(rec.base, ops, cuts):
        lo, hi = allowed_range(rec, cut, durable)  # type: ignore[arg-type]
        modes = ["none"] if not pending else ["none", "all", rng.choice(MODES[2:]), rng.choice(MODES[2:])]
        for mode in modes:
            img = bytearray(image)
            for op in pending_subset(pending, mode, rng):
                from powerloss import _apply_op
                _apply_op(img, op)
            path.write_bytes(img)
            try:
                with vhdx.open(path, parents=parents) as d:
                    got = d.read_at(0, d.size)
            except VhdxError as e:
                pytest.fail(f"cut {cut} ({mode}): the crash image does not open: {e}")
            count += 1
            if strict:
                assert hashlib.sha256(got).digest() in digests[lo:hi + 1], (cut, durable, mode, lo, hi)
            else:
                g = np.frombuffer(got, dtype=np.uint8).reshape(-1, 512)
                ok = np.zeros(len(g), dtype=bool)
                for st in state_arrays[lo:hi + 1]:
                    ok |= (g == st).all(axis=1)
                assert ok.all(), (cut, durable, mode, lo, hi, int((~ok).sum()))
            # and the crash image takes further writes
    return count


def _fast_tmp() -> str | None:
    import os
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


@pytest.mark.parametrize("kind,fresh_only", [("dynamic", True), ("differencing", True),
                                             ("dynamic", False), ("differencing", False)])
def test_power_cuts_during_vhd_writes(tmp_path, kind: str, fresh_only: bool) -> None:
    rng = random.Random(hash((kind, fresh_only)) & 0xFFFF)
    work = Path(tempfile.mkdtemp(dir=_fast_tmp()))
    try:
        parents = None
        initial = bytes(SIZE)
        if kind == "differencing":
            base = work / "base.vhd"
            vhdx.create(base, SIZE, block_size=BLOCK)
            m = bytearray(SIZE)
            with vhdx.open(base, "r+") as d:
                for _ in range(6):
                    off = rng.randrange(SIZE - 70000)
                    data = rng.randbytes(70000)
                    d.write_at(off, data)
                    m[off:off + 70000] = data
            initial = bytes(m)
            target = work / "child.avhd"
            vhdx.create(target, parent=base)
            parents = [base]
        else:
            target = work / "disk.vhd"
            vhdx.create(target, SIZE, block_size=BLOCK)
        rec = _workload(target, parents, initial, rng, fresh_only, n=14)
        crash = work / "crash.vhd"
        if kind == "differencing":
            crash = work / "crash.avhd"
        n = _check_crashes(rec, crash, parents, rng, max_cuts=60, strict=fresh_only)
        assert n >= 130  # 4 workloads: >= 520 crash images in all
        # a crash image stays writable: the last one takes a write and reads it back
        with vhdx.open(crash, "r+", parents=parents) as d:
            d.write_at(12345, b"after the crash")
        with vhdx.open(crash, parents=parents) as d:
            assert d.read_at(12345, 15) == b"after the crash"
    finally:
        shutil.rmtree(work, ignore_errors=True)
