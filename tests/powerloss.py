"""Power-loss simulator for the crash-safe write path (vhdx/log_writer.py).

A workload runs on a :class:`storages.RecordingStorage` over a real file copy
and records every pwrite / truncate / flush in order, plus ``mark`` labels around
each high-level step together with the metadata state the step leaves behind.

A *power cut* at journal position ``c`` (ops ``[0, c)`` were issued) keeps every
op up to the last flush before ``c`` and applies some subset of the ops issued
after that flush: none, all, a prefix, a random subset, a random subset of their
4 KiB pieces (torn writes), such pieces in random order (reordering device), or a
random subset of 512-byte pieces (sectors torn inside a header or log sector).

The reconstructed image is then opened by a reader and its metadata state must be
the state before or after the step in progress, and every step whose last flush
was durable must be visible (FORMAT.md §7: write -> flush -> apply -> flush).

The state is read twice: :func:`read_state_own` (vhdx.headers + vhdx.log replay
plan applied to an in-memory copy, then a tiny BAT decoder that also checks every
FULLY_PRESENT block's payload and the scratch sectors) and, when importable,
:func:`read_state_vhdx` (the public ``vhdx.open``: DataWriteGuid + virtual data).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import os
import random
import shutil
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from vhdx import structures as S
from vhdx import log as LOG
from vhdx.layout import plan_layout, write_new_image
from vhdx.log_writer import LogWriter, _read_current_header
from vhdx.storage import FileStorage
from storages import JournalOp, MemoryStorage, RecordingStorage

MiB = S.MiB
SECTOR = 4096

# --------------------------------------------------------------------------------
# base image and geometry
# --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    """Where things are in the base image (read from its region table)."""

    log_offset: int
    log_length: int
    bat_offset: int
    metadata_offset: int
    block_size: int
    blocks: int
    scratch_offset: int       # unused tail of the metadata region, safe to scribble on
    scratch_sectors: int

    @property
    def virtual_size(self) -> int:
        return self.blocks * self.block_size


def make_base_image(path: Path, virtual_size: int = 8 * MiB, block_size: int = MiB,
                    log_size: int = MiB, *, bat_first: bool = True) -> None:
    """A small dynamic VHDX laid out by the project's own vhdx.layout.

    ``bat_first`` moves the BAT in front of the metadata region (log, BAT,
    metadata: the order qemu-img uses) so the simulator sees both arrangements;
    ``False`` keeps vhdx.layout's own (Hyper-V-like) placement.
    """
    plan = plan_layout(virtual_size, block_size, 512, 4096)
    log_off = plan.log_offset
    first = log_off + log_size
    if bat_first:
        bat_off = first
        md_off = -(-(bat_off + plan.bat_length) // MiB) * MiB
        end = md_off + plan.metadata_length
    else:
        md_off = first
        bat_off = md_off + plan.metadata_length
        end = bat_off + plan.bat_length
    end = -(-end // MiB) * MiB
    write_new_image(path, dataclasses.replace(
        plan, log_length=log_size, bat_offset=bat_off, metadata_offset=md_off,
        payload_offset=end, file_size=end))


def read_geometry(img: bytes) -> Geometry:
    hdr = _read_current_header(MemoryStorage(img, writable=False)).fields
    rt = S.parse(S.RegionTable, img[S.REGION_TABLE_OFFSETS[0]:][:S.REGION_TABLE_SIZE], "region table")
    regions = {e.guid: (e.file_offset, e.length) for e in rt.entries}
    bat_off, _ = regions[S.BAT_REGION_GUID]
    md_off, md_len = regions[S.METADATA_REGION_GUID]
    mt = S.parse(S.MetadataTable, img[md_off:md_off + S.METADATA_TABLE_SIZE], "metadata table")
    items = {e.item_id: e for e in mt.entries}
    fp = items[S.FILE_PARAMETERS_GUID]
    block_size = S.FileParameters.parse(img[md_off + fp.offset:][:8]).block_size
    vs = items[S.VIRTUAL_DISK_SIZE_GUID]
    vsize = S.VirtualDiskSize.parse(img[md_off + vs.offset:][:8]).virtual_disk_size
    items_end = max(e.offset + e.length for e in mt.entries)
    scratch = max(256 * 1024, -(-items_end // SECTOR) * SECTOR)
    return Geometry(
        log_offset=hdr["log_offset"], log_length=hdr["log_length"],
        bat_offset=bat_off, metadata_offset=md_off, block_size=block_size,
        blocks=-(-vsize // block_size),
        scratch_offset=md_off + scratch, scratch_sectors=(md_len - scratch) // SECTOR)


# --------------------------------------------------------------------------------
# metadata state
# --------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetaState:
    data_write_guid: uuid.UUID
    bat: tuple[int, ...]      # raw payload BAT entries (blocks < CR, so no SB slots)
    scratch: bytes            # sha256 of the scratch sectors
    virtual: bytes            # sha256 over the per-block sha256 of the virtual disk

    def short(self) -> str:
        states = "".join("N.Z...F"[e & 7] if (e & 7) in (0, 2, 6) else "?" for e in self.bat)
        return (f"dwg={str(self.data_write_guid)[:8]} bat={states} scr={self.scratch.hex()[:8]} "
                f"virt={self.virtual.hex()[:8]}")


_ZERO_BLOCK_DIGEST: dict[int, bytes] = {}


def _zero_digest(block_size: int) -> bytes:
    if block_size not in _ZERO_BLOCK_DIGEST:
        _ZERO_BLOCK_DIGEST[block_size] = hashlib.sha256(bytes(block_size)).digest()
    return _ZERO_BLOCK_DIGEST[block_size]


def virtual_digest(block_digests: list[bytes]) -> bytes:
    return hashlib.sha256(b"".join(block_digests)).digest()


class CheckFailure(AssertionError):  # noqa: N818 - a failed check, raised as an assertion
    """A reconstructed image that a reader would refuse."""


def read_state_own(img: bytes | bytearray, geom: Geometry) -> tuple[MetaState, bytes]:
    """Open ``img`` the way a read-only reader does and return its state.

    Header choice (FORMAT.md §2.1), log replay into an in-memory copy (FORMAT.md §6.4 steps
    1-8, §6.4 step 12), BAT decode and reads of every FULLY_PRESENT block.
    Raises CheckFailure for anything a reader would refuse. Also returns the
    replayed image bytes.
    """
    buf = bytearray(img)
    try:
        hdr = _read_current_header(MemoryStorage(buf, writable=False)).fields
    except Exception as e:  # noqa: BLE001
        raise CheckFailure(f"header: {e}") from e
    if hdr["log_guid"] != S.ZERO_GUID:
        log = bytes(buf[hdr["log_offset"]:hdr["log_offset"] + hdr["log_length"]])
        if len(log) != hdr["log_length"]:
            raise CheckFailure("file ends inside the log")
        try:
            plan = LOG.plan_replay(log, hdr["log_length"], hdr["log_guid"], len(buf))
        except Exception as e:  # noqa: BLE001
            raise CheckFailure(f"log: {e}") from e
        for u in plan.updates:
            if u.end > len(buf):
                buf.extend(bytes(u.end - len(buf)))
            buf[u.file_offset:u.end] = u.data if u.data is not None else bytes(u.length)
        if not plan.empty and len(buf) < plan.last_file_offset:
            buf.extend(bytes(plan.last_file_offset - len(buf)))
    bat = []
    digests = []
    bs = geom.block_size
    for i in range(geom.blocks):
        e = int.from_bytes(buf[geom.bat_offset + 8 * i:geom.bat_offset + 8 * i + 8], "little")
        state, off = e & 7, e & S.BAT_OFFSET_MASK
        if e & S.BAT_RESERVED_MASK or state not in (0, 2, 6):
            raise CheckFailure(f"BAT[{i}] = {e:#x}: bad state or reserved bits")
        if state == 6:
            if off < MiB or off + bs > len(buf):
                raise CheckFailure(f"BAT[{i}] = {e:#x}: block outside the file")
            digests.append(hashlib.sha256(buf[off:off + bs]).digest())
        else:
            if off:
                raise CheckFailure(f"BAT[{i}] = {e:#x}: offset on a non-present block")
            digests.append(_zero_digest(bs))
        bat.append(e)
    scratch = hashlib.sha256(
        buf[geom.scratch_offset:geom.scratch_offset + geom.scratch_sectors * SECTOR]).digest()
    return MetaState(hdr["data_write_guid"], tuple(bat), scratch, virtual_digest(digests)), bytes(buf)


def vhdx_open() -> Callable | None:
    """``vhdx.open`` once the lead's reader has landed, else None."""
    try:
        mod = importlib.import_module("vhdx")
        importlib.import_module("vhdx.image")
    except ImportError:
        return None
    return getattr(mod, "open", None)


def read_state_vhdx(path: Path, geom: Geometry) -> tuple[uuid.UUID, bytes]:
    """(DataWriteGuid, virtual digest) as the project's reader sees ``path``."""
    opener = vhdx_open()
    assert opener is not None
    with opener(str(path)) as disk:
        bs = geom.block_size
        digests = [hashlib.sha256(disk.read_at(i * bs, bs)).digest() for i in range(geom.blocks)]
        return disk.data_write_guid, virtual_digest(digests)


def check_errors(path: Path) -> list[str] | None:
    """Errors ``vhdx check`` (vhdx.check.check_chain) reports, None if unavailable."""
    try:
        from vhdx.check import check_chain
    except ImportError:
        return None
    return [f.message for f in check_chain(str(path)).errors]


# --------------------------------------------------------------------------------
# workloads
# --------------------------------------------------------------------------------


@dataclass
class Step:
    label: str
    start: int            # journal index of the step's first op
    end: int              # journal index just past its last op
    after: MetaState


@dataclass
class Recording:
    base: bytes
    geom: Geometry
    journal: list[JournalOp]
    initial: MetaState
    steps: list[Step]
    final_image: bytes
    stats: dict = field(default_factory=dict)


class _Model:
    """Ground truth of what the workload has committed so far."""

    def __init__(self, base: bytes, geom: Geometry) -> None:
        self.geom = geom
        self.bat = [int.from_bytes(base[geom.bat_offset + 8 * i:][:8], "little") for i in range(geom.blocks)]
        self.block_digest = [_zero_digest(geom.block_size)] * geom.blocks
        self.scratch = bytearray(base[geom.scratch_offset:geom.scratch_offset + geom.scratch_sectors * SECTOR])
        self.dwg = _read_current_header(MemoryStorage(base, writable=False)).fields["data_write_guid"]
        assert all(e in (0, S.PAYLOAD_BLOCK_ZERO) for e in self.bat), "base image must read as zeros"

    def state(self) -> MetaState:
        return MetaState(self.dwg, tuple(self.bat), hashlib.sha256(self.scratch).digest(),
                         virtual_digest(self.block_digest))


def run_random_workload(path: Path, rng: random.Random, n_steps: int = 12,
                        big_updates: bool = True,
                        script: list[tuple[str, int]] | None = None) -> Recording:
    """Run a random (or ``script``ed: [(kind, size)]) workload on ``path`` through
    a RecordingStorage.

    Steps: allocate+write a block (payload, flush, logged BAT change), zero or
    unmap a block (logged BAT change), scratch-sector updates with data and zero
    descriptors (sizes crossing 126/254 descriptors and forcing ring wrap and the
    empty-entry step), close + reopen (new session). Blocks are always allocated
    at the end of the file and never reused (FORMAT.md §7 rule 7).
    """
    base = path.read_bytes()
    geom = read_geometry(base)
    model = _Model(base, geom)
    rec = RecordingStorage(FileStorage.open(path))
    steps: list[Step] = []
    stats = {"transactions": 0, "wraps": 0, "empty_entries": 0, "max_descriptors": 0, "sessions": 1}

    def step(label: str, fn: Callable[[], None]) -> None:
        start = len(rec.journal)
        fn()
        steps.append(Step(label, start, len(rec.journal), model.state()))

    def new_writer() -> LogWriter:  # deterministic GUIDs and sequence numbers per seed
        return LogWriter.open(rec, guid_factory=lambda: uuid.UUID(int=rng.getrandbits(128)),
                              first_sequence=rng.getrandbits(62) | 1)

    lw = new_writer()
    bs = geom.block_size
    bat_sector_off = geom.bat_offset  # all entries of this geometry live in sector 0

    def bat_sector() -> bytes:
        buf = bytearray(rec.pread(bat_sector_off, SECTOR))
        for i, e in enumerate(model.bat):
            buf[8 * i:8 * i + 8] = e.to_bytes(8, "little")
        return bytes(buf)

    def scratch_updates(k: int) -> tuple[dict[int, bytes], list[tuple[int, int]]]:
        """k data sectors (mostly contiguous) and maybe some zero ranges."""
        n = geom.scratch_sectors
        data: dict[int, bytes] = {}
        zeros: list[tuple[int, int]] = []
        if rng.random() < 0.3 and k < n - 8:
            # zero ranges first (replay applies zero descriptors before data)
            for _ in range(rng.choice([1, 2, 3, 130 if big_updates else 3])):
                zs = rng.randrange(n)
                zl = rng.randint(1, min(4, n - zs))
                zeros.append((geom.scratch_offset + zs * SECTOR, zl * SECTOR))
        k = min(k, n)
        start = rng.randrange(n - k + 1)
        idx = list(range(start, start + k))
        if k and rng.random() < 0.3:  # a few scattered ones
            idx = sorted(set(idx[: k // 2] + rng.sample(range(n), k - k // 2)))
        for s in idx:
            data[geom.scratch_offset + s * SECTOR] = rng.randbytes(SECTOR)
        return data, zeros

    def commit(updates: dict[int, bytes], zeros: list[tuple[int, int]]) -> None:
        before = (lw._head_pos, lw._seq)
        lw.transaction(updates, zeros)
        stats["transactions"] += 1
        stats["max_descriptors"] = max(stats["max_descriptors"], len(updates) + len(zeros))
        if lw._seq - before[1] == 2:
            stats["empty_entries"] += 1
        if lw._head_pos < before[0]:
            stats["wraps"] += 1
        for off, length in zeros:
            rel = off - geom.scratch_offset
            model.scratch[rel:rel + length] = bytes(length)
        for off, data in updates.items():
            rel = off - geom.scratch_offset
            if 0 <= rel < len(model.scratch):
                model.scratch[rel:rel + SECTOR] = data

    def scratch_size() -> int:
        return rng.choice([0, 0, 1, 3, 40, 125, 126, 127, 190] if big_updates else [0, 0, 1, 3, 20])

    plan = script or [(rng.choices(["write", "zero", "unmap", "scratch", "reopen"], [5, 1, 1, 2, 1])[0], 0)
                      for _ in range(n_steps)]
    for kind, arg in plan:
        if kind in ("write", "zero", "unmap") and not lw._data_changed:
            def mdc() -> None:
                lw.mark_data_changed()
                model.dwg = lw.data_write_guid
            step("mark_data_changed", mdc)
        if kind == "write":
            i = rng.randrange(geom.blocks)

            def write_block(i: int = i) -> None:
                end = -(-rec.size() // MiB) * MiB
                data = rng.randbytes(bs)
                rec.truncate(end + bs)                      # FORMAT.md §7 rule 5a
                rec.pwrite(end, data)                       # 5b
                ups, zs = scratch_updates(scratch_size())
                model.bat[i] = S.bat_entry(S.PAYLOAD_BLOCK_FULLY_PRESENT, end)
                ups[bat_sector_off] = bat_sector()
                commit(ups, zs)                             # 5c-5e
                model.block_digest[i] = hashlib.sha256(data).digest()
            step(f"write[{i}]", write_block)
        elif kind in ("zero", "unmap"):
            i = rng.randrange(geom.blocks)

            def drop_block(i: int = i, kind: str = kind) -> None:
                ups, zs = scratch_updates(scratch_size())
                st = S.PAYLOAD_BLOCK_ZERO if kind == "zero" else S.PAYLOAD_BLOCK_NOT_PRESENT
                model.bat[i] = S.bat_entry(st, 0)
                ups[bat_sector_off] = bat_sector()
                commit(ups, zs)
                model.block_digest[i] = _zero_digest(bs)
            step(f"{kind}[{i}]", drop_block)
        elif kind == "scratch":
            def scribble() -> None:
                k = arg or rng.choice([1, 60, 126, 127, 190] if big_updates else [1, 8])
                start = rng.randrange(geom.scratch_sectors - k + 1)
                ups = {geom.scratch_offset + (start + i) * SECTOR: rng.randbytes(SECTOR) for i in range(k)}
                zs: list[tuple[int, int]] = []
                if not arg:
                    ups, zs = scratch_updates(k)
                commit(ups, zs)
            step("scratch", scribble)
        else:
            def reopen() -> None:
                nonlocal lw
                lw.close()
                lw = new_writer()
                stats["sessions"] += 1
            step("reopen", reopen)
    step("close", lw.close)
    rec.close()
    initial = _Model(base, geom).state()
    return Recording(base, geom, rec.journal, initial, steps, path.read_bytes(), stats)


# --------------------------------------------------------------------------------
# crash reconstruction
# --------------------------------------------------------------------------------

MODES = ("none", "all", "prefix", "subset", "torn", "shuffled", "torn512")


def _apply_op(buf: bytearray, op: JournalOp) -> None:
    if op.kind == "write":
        end = op.offset + len(op.data)
        if end > len(buf):
            buf.extend(bytes(end - len(buf)))
        buf[op.offset:end] = op.data
    elif op.kind == "truncate":
        if op.offset < len(buf):
            del buf[op.offset:]
        else:
            buf.extend(bytes(op.offset - len(buf)))


def _pieces(op: JournalOp, unit: int = SECTOR) -> list[JournalOp]:
    """Split a write into ``unit``-aligned pieces (the device's atomic unit)."""
    if op.kind != "write":
        return [op]
    out = []
    pos, end = op.offset, op.offset + len(op.data)
    while pos < end:
        nxt = min(end, (pos // unit + 1) * unit)
        out.append(JournalOp("write", pos, op.data[pos - op.offset:nxt - op.offset]))
        pos = nxt
    return out


def pending_subset(pending: list[JournalOp], mode: str, rng: random.Random) -> list[JournalOp]:
    if mode == "none":
        return []
    if mode == "all":
        return list(pending)
    if mode == "prefix":
        return pending[:rng.randrange(len(pending) + 1)]
    if mode == "subset":
        return [op for op in pending if rng.random() < 0.5]
    # torn512: a device whose atomic unit is a 512-byte sector tears inside a 4 KiB
    # header or log sector; every such tear must fail that structure's CRC.
    unit = 512 if mode == "torn512" else SECTOR
    pieces = [p for op in pending for p in _pieces(op, unit)]
    keep = rng.choice((0.1, 0.5, 0.9))   # few, half or most of the sectors land
    chosen = [p for p in pieces if rng.random() < keep]
    if mode == "shuffled":
        rng.shuffle(chosen)
    return chosen


def cut_states(base: bytes, ops: list[JournalOp], cuts) -> Iterator[tuple[int, int, bytearray, list[JournalOp]]]:  # noqa: ANN001
    """For each cut (ascending): ``(cut, durable, image, pending)``.

    ``image`` holds ``base`` with every op up to the last flush before the cut
    applied (shared between cuts: copy it before changing it); ``pending`` are the
    writes and truncates issued after that flush, which a power cut may or may not
    have let reach the device.
    """
    image = bytearray(base)
    applied = 0
    last_flush = -1
    scanned = 0
    for cut in sorted(cuts):
        for i in range(scanned, cut):
            if ops[i].kind == "flush":
                last_flush = i
        scanned = max(scanned, cut)
        durable = last_flush + 1
        while applied < durable:
            _apply_op(image, ops[applied])
            applied += 1
        yield cut, durable, image, [op for op in ops[durable:cut] if op.kind not in ("flush", "mark")]


def crash_image(base: bytes, ops: list[JournalOp], mode: str, rng: random.Random) -> bytearray:
    """One file after a power cut at the end of ``ops``, ``mode`` choosing which of
    the writes after the last flush landed (see :func:`pending_subset`)."""
    for _cut, _durable, image, pending in cut_states(base, ops, [len(ops)]):
        img = bytearray(image)
        for op in pending_subset(pending, mode, rng):
            _apply_op(img, op)
        return img
    raise AssertionError("unreachable")


@dataclass
class Crash:
    cut: int          # ops [0, cut) were issued
    durable: int      # ops [0, durable) are on stable storage
    mode: str
    image: bytearray
    allowed: list[MetaState]
    lo: int           # allowed step range (0 = initial state)
    hi: int


def allowed_range(rec: Recording, cut: int, durable: int) -> tuple[int, int]:
    """Steps that must be visible (end <= durable) and may be (start < cut)."""
    lo = max([j + 1 for j, s in enumerate(rec.steps) if s.end <= durable], default=0)
    hi = max([j + 1 for j, s in enumerate(rec.steps) if s.start < cut], default=0)
    return lo, max(lo, hi)


def crashes(rec: Recording, rng: random.Random, max_cuts: int,
            modes_per_cut: int = 2) -> Iterator[Crash]:
    """Reconstructed images for up to ``max_cuts`` cut points (plus all/none)."""
    ops = [op for op in rec.journal if op.kind != "mark"]
    # Journal indices of steps are over rec.journal including marks; we record none,
    # so indices coincide.
    assert len(ops) == len(rec.journal)
    n = len(ops)
    cuts = set(range(n + 1))
    if len(cuts) > max_cuts:
        # always keep the positions around flushes, sample the rest
        flushes = [i for i, op in enumerate(ops) if op.kind == "flush"]
        around = set(flushes) | {i + 1 for i in flushes}
        around = set(rng.sample(sorted(around), min(len(around), max_cuts // 2)))
        rest = sorted(cuts - around)
        cuts = around | set(rng.sample(rest, min(len(rest), max_cuts - len(around))))
    states = [rec.initial] + [s.after for s in rec.steps]
    for cut, durable, durable_img, pending in cut_states(rec.base, ops, cuts):
        lo, hi = allowed_range(rec, cut, durable)
        allowed = states[lo:hi + 1]
        if not pending:
            chosen_modes = ["none"]
        else:
            chosen_modes = ["none", "all"] + rng.sample(MODES[2:], max(0, modes_per_cut - 2))
            if modes_per_cut < 2:
                chosen_modes = [rng.choice(MODES)]
        for mode in chosen_modes:
            img = bytearray(durable_img)
            for op in pending_subset(pending, mode, rng):
                _apply_op(img, op)
            yield Crash(cut, durable, mode, img, allowed, lo, hi)


def describe(rec: Recording, crash: Crash, got: MetaState) -> str:
    lines = [f"cut={crash.cut} durable={crash.durable} mode={crash.mode} allowed steps {crash.lo}..{crash.hi}",
             f"  got     {got.short()}"]
    states = [rec.initial] + [s.after for s in rec.steps]
    for j in range(max(0, crash.lo - 1), min(len(states), crash.hi + 2)):
        lbl = "initial" if j == 0 else rec.steps[j - 1].label
        lines.append(f"  S{j:<3} {lbl:<18} {states[j].short()}")
    return "\n".join(lines)


def qemu_check(path: Path) -> subprocess.CompletedProcess | None:
    """``qemu-img check`` of ``path`` as an extra oracle, None when qemu-img is absent."""
    if not have_qemu():
        return None
    return subprocess.run(["qemu-img", "check", "-f", "vhdx", str(path)],
                          capture_output=True, text=True)


def have_qemu() -> bool:
    return shutil.which("qemu-img") is not None


def tmp_dir_fast() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
