"""compact (Optimize-VHD): drop zero / parent-equal blocks and sector runs, pack, truncate.

Ground truth: the bytes the chain read before compacting (the project's reader,
and tests/builder.py's expected image for builder-made chains); libvhdi and
qemu-img (base disks) must read / check the compacted file the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import vhdx
from vhdx import structures as S
from vhdx.check import check_chain
from vhdx.compact import plan_pack
from vhdx.image import ImageFile
from vhdx.storage import FileStorage
from storages import RecordingStorage

import oracles
from builder import FULLY, NOT_PRESENT, PARTIAL, UNDEFINED, UNMAPPED, ZERO, Block, ImageSpec, build_chain
from powerloss import MODES, crash_image

MiB = S.MiB
REPO = Path(__file__).resolve().parent.parent


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def read_all(path: Path, **kw: object) -> bytes:
    with vhdx.open(path, **kw) as d:  # type: ignore[arg-type]
        return d.read_at(0, d.size)


def assert_clean(path: Path, parents: list[Path] | None = None, qemu: bool = True) -> None:
    rep = check_chain(path, parents)
    assert rep.clean, [f.message for f in rep.findings]
    if qemu and oracles.have_qemu():
        r = oracles.qemu_check(path)
        assert r.returncode == 0, r.stdout + r.stderr


def libvhdi_same(paths: list[Path], data: bytes) -> None:
    """libvhdi reads ``data``; in differencing files it reads the parent under ZERO
    and UNMAPPED blocks (a libvhdi divergence from MS-VHDX 2.5.1.1), so those blocks
    are compared through dissect.hypervisor instead."""
    masked: list[tuple[int, int]] = []
    for p in paths[:-1]:
        with ImageFile(p) as img:
            bs = img.block_size
            masked += [(b * bs, min(len(data), (b + 1) * bs)) for b, info in img.allocated_blocks()
                       if info.state in (S.PAYLOAD_BLOCK_ZERO, S.PAYLOAD_BLOCK_UNMAPPED)]
    if oracles.have_libvhdi():
        got = bytearray(oracles.libvhdi_bytes(paths))
        want = bytearray(data)
        for a, b in masked:
            got[a:b] = want[a:b] = bytes(b - a)
        assert sha(got) == sha(want)
    if masked and oracles.have_dissect():
        assert sha(oracles.dissect_bytes(paths)) == sha(data)


def make_base(d: Path, lss: int, rng: random.Random, blocks: int = 24, bs: int = MiB) -> tuple[Path, set[int]]:
    """Dynamic disk: data in most blocks, then some overwritten with zeros (a
    partially zero block too, which must stay). Returns the path and the zeroed blocks."""
    p = Path(vhdx.create(d / f"base{lss}.vhdx", blocks * bs, block_size=bs, logical_sector_size=lss))
    zeroed = {b for b in (1, 2, 7, 11, 12, 13, 20) if b < blocks}
    with vhdx.open(p, "r+") as w:
        for b in range(blocks):
            if b % 5 != 4:
                w.write_at(b * bs, rng.randbytes(bs))
        for b in zeroed:
            w.write_at(b * bs, bytes(bs))
        w.write_at(15 * bs, bytes(bs - lss))  # last sector keeps data
    return p, zeroed


@pytest.mark.parametrize("lss", [512, 4096])
def test_compact_base_disk(tmp_path, lss):
    p, zeroed = make_base(tmp_path, lss, random.Random(lss))
    data = read_all(p)
    size0 = p.stat().st_size
    dry = vhdx.compact(p, dry_run=True)
    assert p.stat().st_size == size0
    s = vhdx.compact(p)
    assert (dry.blocks_zeroed, dry.blocks_moved, dry.file_size_after) == (
        s.blocks_zeroed, s.blocks_moved, s.file_size_after)
    assert s.blocks_zeroed == len(zeroed)
    assert read_all(p) == data
    assert size0 - p.stat().st_size >= len(zeroed) * MiB
    # Allocation also moves with metadata sectors the log touches: allow 1 MiB of slack.
    assert s.bytes_reclaimed == s.allocated_before - s.allocated_after >= (len(zeroed) - 1) * MiB
    with ImageFile(p) as img:
        for b in zeroed:
            assert img.block(b).state == S.PAYLOAD_BLOCK_ZERO
        assert img.block(15).state == S.PAYLOAD_BLOCK_FULLY_PRESENT
    assert_clean(p, qemu=lss == 512)  # qemu opens 512-byte-sector VHDX only
    libvhdi_same([p], data)
    if lss == 512 and oracles.have_qemu():
        assert sha(oracles.qemu_raw_bytes(p)) == sha(data)
    again = vhdx.compact(p)  # nothing left to do
    assert (again.blocks_zeroed, again.blocks_moved) == (0, 0) and p.stat().st_size == s.file_size_after


@pytest.mark.parametrize("lss", [512, 4096])
def test_compact_differencing_disk(tmp_path, lss):
    rng = random.Random(lss + 1)
    base = Path(vhdx.create(tmp_path / "b.vhdx", 16 * MiB, block_size=MiB, logical_sector_size=lss))
    with vhdx.open(base, "r+") as w:
        w.write_at(0, rng.randbytes(12 * MiB))
    pdata = read_all(base)
    child = Path(vhdx.create(tmp_path / "c.avhdx", parent=base, block_size=MiB))
    with vhdx.open(child, "r+") as w:
        for b in range(0, 16):
            w.write_at(b * MiB, rng.randbytes(MiB))   # every block FULLY_PRESENT
        for b in (2, 5, 9):
            w.write_at(b * MiB, pdata[b * MiB:(b + 1) * MiB])   # equal to the parent again
        w.write_at(14 * MiB, bytes(MiB))                       # equal: the parent reads zeros there
        w.write_at(3 * MiB, bytes(MiB))                        # zeros over parent data: ZERO
    # A partial block: some sectors differ, a run equals the parent; another all equal.
    with vhdx.open(child, "r+") as w:
        w.write_zeroes_at(6 * MiB, MiB, discard=True)
    # (a discard made block 6 UNMAPPED; rebuild partial blocks on a fresh child)
    child2 = Path(vhdx.create(tmp_path / "c2.avhdx", parent=child, block_size=MiB))
    cdata = read_all(child)
    with vhdx.open(child2, "r+") as w:
        w.write_at(MiB + 7 * lss, rng.randbytes(3 * lss))
        w.write_at(MiB + 20 * lss, cdata[MiB + 20 * lss:MiB + 40 * lss])  # equal run
        w.write_at(4 * MiB + lss, cdata[4 * MiB + lss:4 * MiB + 9 * lss])  # whole block drops
    data1, data2 = read_all(child), read_all(child2)
    size1, size2 = child.stat().st_size, child2.stat().st_size
    s1 = vhdx.compact(child)
    assert s1.blocks_dropped == 4 and s1.blocks_zeroed == 1
    assert read_all(child) == data1 and read_all(child2) == data2
    assert size1 - child.stat().st_size >= 5 * MiB
    s2 = vhdx.compact(child2)
    assert s2.blocks_dropped == 1 and s2.sectors_dropped == 20
    assert read_all(child2) == data2
    assert size2 - child2.stat().st_size >= MiB
    with ImageFile(child) as c, ImageFile(child2) as c2:
        assert {c.block(b).state for b in (2, 5, 9, 14)} == {S.PAYLOAD_BLOCK_NOT_PRESENT}
        assert c.block(3).state == S.PAYLOAD_BLOCK_ZERO
        assert c2.block(4).state == S.PAYLOAD_BLOCK_NOT_PRESENT
        assert c2.block(1).state == S.PAYLOAD_BLOCK_PARTIALLY_PRESENT
    assert_clean(child2, qemu=False)
    libvhdi_same([child, base], data1)
    libvhdi_same([child2, child, base], data2)


@pytest.mark.parametrize("seed", [3, 4])
def test_compact_builder_chains_with_every_state(tmp_path, seed):
    """Builder-made chains (every block state, stale offsets on zero states, bitmap
    bits on FULLY blocks): compacting each file keeps the expected bytes."""
    rng = random.Random(seed)
    size = 12 * MiB
    specs = []
    for i in range(3):
        states = [FULLY, PARTIAL, ZERO, NOT_PRESENT, UNDEFINED, UNMAPPED] if i else [FULLY, ZERO, NOT_PRESENT]
        blocks = {}
        for b in range(12):
            st = rng.choice(states)
            if st != NOT_PRESENT:
                data = bytes(MiB) if st == FULLY and rng.random() < 0.3 else None
                blocks[b] = Block(st, data=data)
        specs.append(ImageSpec(virtual_size=size, block_size=MiB, name=f"l{i}", blocks=blocks,
                               seed=rng.randrange(1 << 30), suffix=".vhdx" if i == 0 else ".avhdx"))
    chain = build_chain(tmp_path, specs)
    expected = chain.expected()
    for k in (0, 1, 2):  # top first: its parent chain is unchanged when it is compared
        vhdx.compact(chain.images[k].path)
        assert read_all(chain.top) == expected, k
    for k in range(3):
        assert check_chain(chain.images[k].path).clean
    # (No peer reader here: the builder randomises the bitmap bits of FULLY blocks on
    # purpose, which libvhdi and dissect consult; its own expected image is the truth.)


def test_children_of_a_compacted_base_stay_linked(tmp_path):
    p, _ = make_base(tmp_path, 512, random.Random(9))
    child = Path(vhdx.create(tmp_path / "c.avhdx", parent=p))
    dwg = ImageFile(p).data_write_guid
    data = read_all(child)
    vhdx.compact(p)
    assert ImageFile(p).data_write_guid == dwg
    assert read_all(child) == data


def test_plan_pack_moves_top_blocks_into_the_lowest_gaps():
    reserved = [(0, 4 * MiB)]
    objs = [(4 * MiB, MiB, 1), (6 * MiB, 2 * MiB, 2), (9 * MiB, MiB, 3), (12 * MiB, MiB, 4)]
    moves, end = plan_pack(objs, reserved)
    # 4 -> 5 MiB gap; 3 (at 9) -> 8; 2 (2 MiB at 6) cannot go lower: stop.
    assert moves == [(4, 12 * MiB, 5 * MiB, MiB), (3, 9 * MiB, 8 * MiB, MiB)]
    assert end == 9 * MiB


def test_cli_compact_json_and_fixed_refused(tmp_path):
    p, zeroed = make_base(tmp_path, 512, random.Random(5))
    r = subprocess.run([sys.executable, "-m", "vhdx.cli", "compact", str(p), "--json"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["blocks_zeroed"] == len(zeroed)
    assert out["file_size_before"] - out["file_size_after"] >= len(zeroed) * MiB
    f = Path(vhdx.create(tmp_path / "f.vhdx", 4 * MiB, type="fixed"))
    before = sha(f.read_bytes())
    r = subprocess.run([sys.executable, "-m", "vhdx.cli", "compact", str(f)], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.startswith("vhdx: error: ") and "fixed" in r.stderr
    assert r.stderr.count("\n") == 1
    assert sha(f.read_bytes()) == before


# --- power cuts -------------------------------------------------------------------------------
@pytest.fixture
def fast_dir():  # noqa: ANN201
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    d = Path(tempfile.mkdtemp(prefix="vhdx-compact-", dir=shm))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("seed,lss", [(11, 512), *(pytest.param(s, sz, marks=pytest.mark.soak)
                                                   for s in (12, 13, 14) for sz in (512, 4096))])
def test_power_cuts_during_compact(fast_dir, seed, lss):
    """>= 300 crash images at every point of two compactions (a base with zero
    blocks, a child with parent-equal and partial blocks): each reads as before,
    checks clean, and (every few) a rerun completes and reads the same."""
    rng = random.Random(seed)
    base, _ = make_base(fast_dir, lss, rng, blocks=16)
    child = Path(vhdx.create(fast_dir / "c.avhdx", parent=base, block_size=MiB))
    pdata = read_all(base)
    with vhdx.open(child, "r+") as w:
        for b in range(0, 16, 2):
            w.write_at(b * MiB, rng.randbytes(MiB))
        w.write_at(4 * MiB, pdata[4 * MiB:5 * MiB])
        w.write_at(9 * MiB + lss, pdata[9 * MiB + lss:9 * MiB + 8 * lss])
        w.write_at(11 * MiB + lss, rng.randbytes(2 * lss))
        w.write_at(11 * MiB + 8 * lss, pdata[11 * MiB + 8 * lss:11 * MiB + 16 * lss])
    total = 0
    for target, parents in ((child, [base]), (base, [])):
        data = read_all(target, parents=parents)
        original = target.read_bytes()
        rec = RecordingStorage(FileStorage.open(target))
        s = vhdx.compact(target, storage=rec)
        rec.inner.close()
        assert s.blocks_moved and (s.blocks_dropped or s.blocks_zeroed)
        final = target.read_bytes()
        journal = rec.journal
        crash = fast_dir / ("crash" + target.suffix)
        cuts = list(range(len(journal) + 1))
        n = 0
        while n < max(160, len(cuts)):
            cut = cuts[n] if n < len(cuts) else rng.randrange(len(journal) + 1)
            mode = "none" if n < len(cuts) else MODES[n % len(MODES)]
            img = crash_image(original, journal[:cut], mode, rng)
            crash.write_bytes(img)
            try:
                assert read_all(crash, parents=parents) == data
                if n % 4 == 0:
                    rep = check_chain(crash, parents)
                    assert not rep.errors, [f.message for f in rep.errors]
                if n % 12 == 0:
                    vhdx.compact(crash, parents=parents)
                    assert read_all(crash, parents=parents) == data
                    assert crash.stat().st_size <= len(final)
                    assert check_chain(crash, parents).clean
            except Exception as e:
                raise AssertionError(f"{target.name} cut {cut}/{len(journal)} mode {mode}: {e}") from e
            n += 1
        total += n
        target.write_bytes(final)
    assert total >= 300


def test_compact_child_larger_than_its_parent(tmp_path):
    """Past the parent's end the chain reads zeros: zero blocks there are dropped."""
    base = Path(vhdx.create(tmp_path / "b.vhdx", 4 * MiB, block_size=MiB))
    with vhdx.open(base, "r+") as w:
        w.write_at(0, b"\x41" * 4 * MiB)
    child = Path(vhdx.create(tmp_path / "c.avhdx", parent=base, block_size=MiB))
    with vhdx.open(child, "r+") as w:
        w.resize(10 * MiB)
        w.write_at(5 * MiB, bytes(2 * MiB))          # zeros where the chain reads zeros
        w.write_at(8 * MiB, b"\x42" * MiB)
        w.write_at(3 * MiB, b"\x41" * MiB)           # equal to the parent
    data = read_all(child)
    s = vhdx.compact(child)
    assert s.blocks_dropped == 3 and read_all(child) == data
    assert check_chain(child).clean
    # Ground truth from the writes (libvhdi and dissect refuse to read past a parent's end).
    assert data == b"\x41" * 4 * MiB + bytes(4 * MiB) + b"\x42" * MiB + bytes(MiB)
