"""vhdx/blockmap.py: the merge's block decision over its whole table, the block map's
allocation / entries / bitmaps / commits on real files, and the recording dry run.

The decision table is checked against the meaning of the states (FORMAT.md §5.2,
§8.1, §8.3), not against a copy of the table: a small sector model reads a target
block before and after the action, and the result must read what the upper chain
defines where it defines something and what the target read before elsewhere.
Files are checked by reading them raw (tests/builder.py's peek and bitmap helpers).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import random
from pathlib import Path

import pytest

from vhdx import structures as S
from vhdx.blockmap import Action, RecordingBlockMap, Upper, classify_upper, merge_action
from vhdx.image import ImageFile
from vhdx.merge_engine import merge
from vhdx.writer import WritableDisk

from builder import (FULLY, NOT_PRESENT, PARTIAL, UNDEFINED, UNMAPPED, ZERO, Block, ImageSpec,
                     bitmap_bits, build_chain, peek)

MiB = S.MiB
ALL_STATES = [FULLY, PARTIAL, NOT_PRESENT, ZERO, UNDEFINED, UNMAPPED]
# Target kinds and the payload states each may hold (FORMAT.md §5.2: PARTIALLY_PRESENT
# is corrupt outside a differencing disk; a fixed disk keeps every block FULLY_PRESENT).
KINDS = {
    "base": (dict(has_parent=False, fixed=False), [FULLY, NOT_PRESENT, ZERO, UNDEFINED, UNMAPPED]),
    "fixed": (dict(has_parent=False, fixed=True), [FULLY]),
    "differencing": (dict(has_parent=True, fixed=False), ALL_STATES),
}
CELLS = [(u, kind, st) for kind, (_, states) in KINDS.items() for st in states for u in Upper]

# --- the sector model ----------------------------------------------------------------------
N = 4  # sectors per model block
PARENT, OWN, NEW = "parent", "own", "upper"
# What the upper chain defines per sector: None (nothing), 0 (zeros) or NEW (data).
COVER = {
    Upper.NOTHING: [None] * N,
    Upper.ZEROS: [0] * N,
    Upper.DATA: [0, NEW, NEW, 0],
    Upper.SOME_ZEROS: [None, 0, 0, None],
    Upper.SOME_DATA: [None, NEW, 0, None],
}
OLD_BITS = [1, 1, 0, 0]  # a PARTIALLY_PRESENT target block's own sectors


def read_block(state: int, has_parent: bool, payload: list[object], bits: list[int]) -> list[object]:
    """Per sector, what a block reads (FORMAT.md §5.2 / §8.1)."""
    if state == FULLY:
        return list(payload)
    if state == PARTIAL:
        return [payload[i] if bits[i] else PARENT for i in range(N)]
    if state == NOT_PRESENT and has_parent:
        return [PARENT] * N
    return [0] * N  # NOT_PRESENT in a base, ZERO, UNDEFINED, UNMAPPED


def old_block(state: int) -> tuple[list[object], list[int]]:
    return ([OWN] * N if state in (FULLY, PARTIAL) else [0] * N), (list(OLD_BITS) if state == PARTIAL else [0] * N)


def perform(action: Action, state: int, cover: list[object]) -> tuple[int, list[object], list[int], dict]:
    """The action as its documentation states it, on the model: (state, payload, bits, costs)."""
    payload, bits = old_block(state)
    costs = {"allocated": False, "written": 0, "zeros_written": 0}
    if action is Action.LEAVE:
        return state, payload, bits, costs
    if action is Action.SET_ZERO:
        return ZERO, [0] * N, [0] * N, costs
    if action.allocates:
        payload, bits = [0] * N, [0] * N  # a fresh block reads zeros
        costs["allocated"] = True
    for i, c in enumerate(cover):
        if c == NEW:
            payload[i] = NEW
            costs["written"] += 1
        elif c == 0 and action.in_place:
            payload[i] = 0
            costs["zeros_written"] += 1
    new_state = {Action.WRITE: state, Action.WRITE_FULL: FULLY, Action.WRITE_BITS: PARTIAL,
                 Action.NEW_FULL: FULLY, Action.NEW_PARTIAL: PARTIAL}[action]
    if action in (Action.WRITE_BITS, Action.NEW_PARTIAL):
        bits = [1 if cover[i] is not None else bits[i] for i in range(N)]
    return new_state, payload, bits, costs


def test_the_table_has_every_cell():
    assert len(CELLS) == len(Upper) * (5 + 1 + 6) == 60
    assert {merge_action(u, st, **KINDS[k][0]) for u, k, st in CELLS} == set(Action)


@pytest.mark.parametrize("upper,kind,state", CELLS,
                         ids=[f"{u.name}-{k}-{st}" for u, k, st in CELLS])
def test_merge_action_cell_means_what_the_spec_says(upper, kind, state):
    """Each cell: the target then reads the upper chain's sectors where it defines
    them and its own old sectors elsewhere, never exposes its parent where the upper
    chain defined something, and does no needless work."""
    flags, _ = KINDS[kind]
    has_parent, fixed = flags["has_parent"], flags["fixed"]
    action = merge_action(upper, state, **flags)
    cover = COVER[upper]
    before = read_block(state, has_parent, *old_block(state))
    new_state, payload, bits, costs = perform(action, state, cover)
    after = read_block(new_state, has_parent, payload, bits)
    want = [before[i] if cover[i] is None else cover[i] for i in range(N)]
    assert after == want, (action, after, want)
    # A state the target kind cannot hold is never produced; nothing becomes
    # NOT_PRESENT or UNMAPPED (FORMAT.md §8.3: that would expose a parent).
    assert new_state in KINDS[kind][1] or new_state in (FULLY, ZERO)
    assert new_state not in (NOT_PRESENT, UNMAPPED) or new_state == state
    if fixed:
        assert new_state == FULLY and not costs["allocated"]
    # No needless work: a block the target has is reused; zeros over a dynamic
    # block are a state, not written bytes; nothing is done when nothing changes.
    if state in (FULLY, PARTIAL):
        assert not costs["allocated"]
    if upper is Upper.ZEROS and not fixed:
        assert costs["written"] == costs["zeros_written"] == 0
    if after == before and (new_state, payload, bits) != (state, *old_block(state)):
        pytest.fail(f"{action} changes the block although it reads the same")
    if upper is Upper.NOTHING:
        assert action is Action.LEAVE


@pytest.mark.parametrize("state", [NOT_PRESENT, ZERO, UNDEFINED, UNMAPPED])
def test_format_8_3_sentences(state):
    """The rules FORMAT.md §8.3 spells out, cell by cell."""
    base = dict(has_parent=False, fixed=False)
    diff = dict(has_parent=True, fixed=False)
    # A PARTIALLY_PRESENT child over a block reading zeros: zero-filled, FULLY_PRESENT.
    if state != NOT_PRESENT:
        assert merge_action(Upper.SOME_DATA, state, **diff) is Action.NEW_FULL
    assert merge_action(Upper.SOME_DATA, state, **base) is Action.NEW_FULL
    # ... but over a differencing NOT_PRESENT block the rest must keep reading the parent.
    assert merge_action(Upper.SOME_DATA, NOT_PRESENT, **diff) is Action.NEW_PARTIAL
    # ZERO/UNDEFINED/UNMAPPED child blocks become ZERO, never NOT_PRESENT in a differencing parent.
    assert merge_action(Upper.ZEROS, NOT_PRESENT, **diff) is Action.SET_ZERO
    assert merge_action(Upper.ZEROS, FULLY, **diff) is Action.SET_ZERO
    # A FULLY_PRESENT child block replaces the parent's.
    assert merge_action(Upper.DATA, FULLY, **base) is Action.WRITE
    assert merge_action(Upper.DATA, PARTIAL, **diff) is Action.WRITE_FULL


def test_classify_upper():
    assert classify_upper(0, 4096, False) is Upper.NOTHING
    assert classify_upper(4096, 4096, False) is Upper.ZEROS
    assert classify_upper(4096, 4096, True) is Upper.DATA
    assert classify_upper(512, 4096, False) is Upper.SOME_ZEROS
    assert classify_upper(512, 4096, True) is Upper.SOME_DATA


# --- the block map on real files ----------------------------------------------------------------
def _diff_chain(tmp_path: Path):  # noqa: ANN202
    size = 16 * MiB
    bits = bytes([0x0F]) + bytes(MiB // 512 // 8 - 1)  # sectors 0-3 present
    specs = [ImageSpec(virtual_size=size, block_size=MiB, name="parent", seed=1,
                       blocks={b: Block(FULLY) for b in range(0, 16, 2)}),
             ImageSpec(virtual_size=size, block_size=MiB, name="child", seed=2,
                       blocks={0: Block(PARTIAL, bitmap=bits), 3: Block(FULLY)})]
    return build_chain(tmp_path, specs)


def _raw_entry(img, index: int) -> int:  # noqa: ANN001
    return int.from_bytes(peek(img.path, img.plan.bat_offset + 8 * index, 8), "little")


def test_allocation_entries_bits_and_commit(tmp_path):
    chain = _diff_chain(tmp_path)
    child = chain.images[0]
    cr = child.plan.chunk_ratio
    with WritableDisk(child.path, standalone=True) as w:
        bm = w.blocks
        end0 = os.path.getsize(child.path)
        a, b = bm.allocate(MiB), bm.allocate(3 * MiB // 2)
        assert a % MiB == 0 and a >= end0 and b == a + MiB  # aligned, past the end, no overlap
        assert w.storage.size() >= b + 2 * MiB and not bm.pending  # grown, nothing to log yet
        # A fresh NOT_PRESENT block becomes PARTIALLY_PRESENT with sectors 8-15 present.
        bm.set_payload(5, PARTIAL, a)
        bm.set_bits(5, 8, 8)
        assert [bm.bit(5, s) for s in (7, 8, 15, 16)] == [False, True, True, False]
        bm.clear_bits(0, 1, 2)  # block 0 keeps sectors 0 and 3
        assert [bm.bit(0, s) for s in range(5)] == [True, False, False, True, False]
        assert bm.pending and bm.pending_entries == {5}
        seq = w.log.sequence
        assert bm.commit() and not bm.pending and w.log.sequence > seq
        seq = w.log.sequence
        assert not bm.commit() and w.log.sequence == seq  # nothing pending: no entry
    # Read back raw: the entry and both bitmaps as committed.
    e = _raw_entry(child, 5 + 5 // cr)
    assert (e & S.BAT_STATE_MASK, e & S.BAT_OFFSET_MASK) == (PARTIAL, a)
    sb = _raw_entry(child, cr) & S.BAT_OFFSET_MASK
    per_block = MiB // 512 // 8
    assert bitmap_bits(peek(child.path, sb + 5 * per_block, 3), 20) == [0] * 8 + [1] * 8 + [0] * 4
    assert bitmap_bits(peek(child.path, sb, 1), 8) == [1, 0, 0, 1, 0, 0, 0, 0]


def test_discard_and_commit_due(tmp_path):
    chain = _diff_chain(tmp_path)
    child = chain.images[0]
    before = _raw_entry(child, 7)
    with WritableDisk(child.path, standalone=True) as w:
        bm = w.blocks
        bm.max_pending = 1
        bm.set_payload(7, ZERO)
        assert not bm.commit_due()  # one BAT sector
        bm.set_bits(0, 100, 1)  # plus a bitmap sector: more than one entry's budget
        assert bm.commit_due()
        bm.discard()
        assert not bm.pending and not bm.commit_due()
        w.image.bat[7] = before  # discard leaves the in-memory table alone (documented)
    assert _raw_entry(child, 7) == before


def test_recording_block_map_writes_nothing(tmp_path):
    chain = _diff_chain(tmp_path)
    child = chain.images[0]
    digest = hashlib.sha256(child.path.read_bytes()).hexdigest()
    size = os.path.getsize(child.path)
    with ImageFile(child.path) as img:
        bm = RecordingBlockMap(img, grown=32 * MiB)
        off = bm.allocate(MiB)
        assert off >= img.allocation_end() and bm.record.bytes_allocated == MiB
        bm.set_payload(9, FULLY, off)
        bm.set_payload(20, PARTIAL, bm.allocate(MiB))  # past the table: the grown part
        bm.set_bits(20, 0, 3)
        assert bm.payload_entry(24) == ZERO  # a grown differencing disk's new blocks
        assert bm.commit() and not bm.commit()
        r = bm.record
        assert r.entries == {FULLY: 1, PARTIAL: 1} and r.bits_set == 3 and r.commits == 1
        assert r.bitmap_blocks == 0  # block 20 lies in chunk 0, whose bitmap exists
    assert os.path.getsize(child.path) == size
    assert hashlib.sha256(child.path.read_bytes()).hexdigest() == digest


@pytest.mark.parametrize("seed", [1, 2])
def test_dry_run_reports_what_the_merge_does(tmp_path, seed):
    rng = random.Random(seed)
    size = 32 * MiB
    specs = [ImageSpec(virtual_size=size, block_size=2 * MiB, name="base", seed=seed,
                       blocks={b: Block(rng.choice([FULLY, ZERO, NOT_PRESENT])) for b in range(16)}),
             ImageSpec(virtual_size=size, block_size=MiB, name="top", seed=seed + 10,
                       blocks={b: Block(rng.choice(ALL_STATES)) for b in rng.sample(range(32), 20)})]
    chain = build_chain(tmp_path, specs)
    digests = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in chain.paths}
    dry = merge(chain.top, dry_run=True)
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in chain.paths} == digests
    real = merge(chain.top, keep=True)
    assert dry.dry_run and not real.dry_run
    assert (dry.blocks_changed, dry.bytes_copied, dry.bytes_zeroed) == (
        real.blocks_changed, real.bytes_copied + real.bytes_cloned, real.bytes_zeroed)
    assert dry.blocks_changed > 0


def test_merge_action_is_pure():
    """The decision is pure: the same inputs give the same action, whatever the order."""
    seen = [merge_action(u, st, **KINDS[k][0]) for u, k, st in CELLS]
    shuffled = list(CELLS)
    random.Random(3).shuffle(shuffled)
    again = {c: merge_action(c[0], c[2], **KINDS[c[1]][0]) for c in shuffled}
    assert seen == [again[c] for c in CELLS]
    assert len(set(itertools.chain(seen))) == len(Action)
