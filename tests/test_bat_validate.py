"""validate_table against the per-entry rules it implements with byte scans.

The reference below applies FORMAT.md §10 rows 11-12 one entry at a time (the
implementation before the scans were vectorized); random tables with every
state, reserved bits, offsets in and past the file, sector-bitmap slots inside
and across 64 KiB strides, must give the same kinds of problem, each with the
same first entry and the same count.
"""

from __future__ import annotations

import random
import re
from array import array

import pytest

import vhdx.bat as bat_mod
from vhdx import structures as S
from vhdx.bat import Geometry, validate_table

MiB = 1 << 20


def reference(table, geo: Geometry, file_size: int, reserved_spans) -> list[tuple[int, str, bool]]:
    """(index, message, fatal) per offending entry, entry by entry."""
    problems = []
    spans = []
    cr1 = geo.chunk_ratio + 1
    for i, e in enumerate(table):
        if not e:
            continue
        state, off = e & 7, e & S.BAT_OFFSET_MASK
        if e & S.BAT_RESERVED_MASK:
            problems.append((i, "reserved bits are set", False))
        if i % cr1 == geo.chunk_ratio:
            if state not in (0, 6):
                problems.append((i, f"invalid sector bitmap state {state}", True))
                continue
            if state == 6:
                if not geo.has_parent:
                    problems.append((i, "sector bitmap marked present in a disk without parent", False))
                spans.append((off, off + MiB, i))
            continue
        if state not in (0, 1, 2, 3, 6, 7):
            problems.append((i, f"reserved payload state {state}", True))
            continue
        if state == 7 and not geo.has_parent:
            problems.append((i, "PARTIALLY_PRESENT block in a disk without parent", True))
            continue
        if state in (6, 7) or off:
            if geo.block_of_index(i) >= geo.payload_blocks:
                if state in (6, 7):
                    problems.append((i, "allocated entry beyond the virtual disk", False))
                continue
            spans.append((off, off + (MiB if False else geo.block_size), i))
    for start, end, i in spans:
        if start < S.HEADER_SECTION_SIZE:
            problems.append((i, f"block at {start:#x} overlaps the header section", True))
        elif start >= file_size:
            problems.append((i, f"block at {start:#x} lies past the end of the file ({file_size:#x})", True))
        elif end > file_size:
            problems.append((i, f"block at {start:#x} extends past the end of the file", False))
    allspans = sorted([(s, e, f"BAT entry {i}") for s, e, i in spans] + list(reserved_spans))
    for (s1, e1, n1), (s2, _e2, n2) in zip(allspans, allspans[1:]):
        if s2 < e1:
            problems.append((-1, f"{n1} at {s1:#x} overlaps {n2} at {s2:#x}", True))
    return problems


_KINDS = [("reserved bits", "reserved"), ("invalid sector bitmap state", "sb_state"),
          ("marked present in a disk without", "sb_no_parent"), ("reserved payload state 4", "state4"),
          ("reserved payload state 5", "state5"), ("PARTIALLY_PRESENT block", "partial"),
          ("beyond the virtual disk", "beyond"), ("overlaps the header section", "header"),
          ("lies past the end", "past_eof"), ("extends past the end", "extends")]


def kind_of(message: str) -> str:
    for needle, kind in _KINDS:
        if needle in message:
            return kind
    return "overlap"


def random_table(rng: random.Random, geo: Geometry, file_size: int) -> array:
    n = geo.total_entries
    t = array("Q", bytes(8 * n))
    cr1 = geo.chunk_ratio + 1
    file_units = file_size // MiB
    bs_units = geo.block_size // MiB
    next_unit = 8
    density = rng.choice([0.01, 0.3, 1.0])
    mode = rng.choice(["clean", "overlap", "dirty", "dirty"])
    for i in range(n):
        if rng.random() > density:
            continue
        if i % cr1 == geo.chunk_ratio:
            state = rng.choice([0, 6, 6] + ([1, 2, 7] if mode == "dirty" else []))
            if state == 6:
                unit, next_unit = next_unit, next_unit + 1
            else:
                unit = 0
        else:
            states = [0, 1, 2, 3, 6, 6, 6] + ([7] if geo.has_parent else [])
            if mode == "dirty":
                states += [4, 5, 7]
            state = rng.choice(states)
            unit = 0
            if state >= 6 or (state in (1, 3) and rng.random() < 0.2):
                unit, next_unit = next_unit, next_unit + bs_units
        if mode == "overlap" and unit and rng.random() < 0.01:
            unit -= 1  # overlaps its predecessor (or a bitmap block)
        if mode == "dirty":
            r = rng.random()
            if r < 0.05:
                unit = 0
            elif r < 0.1:
                unit = file_units + rng.randrange(4)
            elif r < 0.15:
                unit = max(1, unit - 1)  # overlaps its predecessor
            elif r < 0.2:
                unit = file_units - rng.randrange(1, 3)  # runs past the end
        e = (unit << 20) | state
        if mode == "dirty" and rng.random() < 0.05:
            e |= rng.choice([1 << 3, 1 << 9, 1 << 19])
        t[i] = e
    return t


GEOMETRIES = [
    Geometry(300 * 1024 * MiB, 256 * MiB, 4096, True),  # chunk ratio 128: bitmap slots in every stride
    Geometry(300 * 1024 * MiB, 256 * MiB, 4096, False),
    Geometry(20 * 1024 * MiB, MiB, 512, True),  # chunk ratio 4096, a short last chunk
    Geometry(9 * 1024 * MiB + 512, 2 * MiB, 512, False),
    Geometry(200 * 1024 * MiB, 32 * MiB, 512, True),  # bitmap slots straddling stride ends
]


def compare(seed: int) -> set[str]:
    """Check one random table both ways; returns the kinds of problem it had."""
    rng = random.Random(seed)
    geo = GEOMETRIES[seed % len(GEOMETRIES)]
    file_size = rng.choice([64, 512, 4096]) * MiB * (geo.block_size // MiB)
    table = random_table(rng, geo, file_size)
    reserved = [(0, MiB, "header section"), (MiB, 2 * MiB, "log"), (2 * MiB, 3 * MiB, "region metadata"),
                (3 * MiB, 8 * MiB, "region BAT")]
    ref = reference(table, geo, file_size, reserved)
    views = [memoryview(table.tobytes()).cast("Q"), table]  # the byte-scan path and the per-entry one
    for view in views:
        got = validate_table(view, geo, file_size, reserved)
        by_kind = {kind_of(p.message): p for p in got}
        assert len(by_kind) == len(got), [p.message for p in got]  # one finding per kind
        expect: dict[str, list[tuple[int, str]]] = {}
        for i, msg, fatal in ref:
            expect.setdefault(kind_of(msg), []).append((i, msg))
        entry_fatal = any(f for i, _m, f in ref if i >= 0)
        for kind, items in expect.items():
            if kind == "overlap":
                if not entry_fatal:  # checked only while the table is still usable
                    assert "overlap" in by_kind, kind
                continue
            p = by_kind[kind]
            assert p.count == len(items), (kind, p.count, len(items))
            assert p.index == min(i for i, _ in items), kind
            assert p.message == dict(items)[p.index], kind
        for kind in by_kind:
            assert kind in expect, (kind, by_kind[kind].message)
    return {kind_of(m) for _i, m, _f in ref}


@pytest.mark.parametrize("overlaps_by", ["map", "sort"])
def test_same_findings_as_the_per_entry_rules(monkeypatch, overlaps_by):
    if overlaps_by == "sort":  # the path of files beyond 64 TiB
        monkeypatch.setattr(bat_mod, "_MAP_MAX_UNITS", 0)
    seen: set[str] = set()
    for seed in range(40):
        seen |= compare(seed)
    # The random tables reached every kind of problem (else the comparison proves little).
    assert seen == {k for _n, k in _KINDS} | {"overlap"}, seen


def test_spans_limit_the_scan():
    """Entries outside ``entry_spans`` are known zero; inside them every rule applies."""
    geo = Geometry(64 * 1024 * MiB, MiB, 512, False)
    t = array("Q", bytes(8 * geo.total_entries))
    t[40000] = (10 ** 6 << 20) | 6  # past the end of a 64 MiB file
    view = memoryview(t.tobytes()).cast("Q")
    got = validate_table(view, geo, 64 * MiB, [], [(39000, 41000)])
    assert [(p.index, p.fatal) for p in got] == [(40000, True)]
    assert validate_table(view, geo, 64 * MiB, [], [(0, 1000), (50000, 60000)]) == []


def test_a_bat_full_of_errors_is_one_finding_with_a_count():
    geo = Geometry(1 << 40, MiB, 512, False)  # 1 TiB: a million payload entries
    n = geo.total_entries
    cr1 = geo.chunk_ratio + 1
    t = array("Q", [0]) * n
    for i in range(n):
        if i % cr1 != geo.chunk_ratio:
            t[i] = ((1 << 30) + i) << 20 | 6 | 1 << 3  # past the end, and a reserved bit
    got = validate_table(memoryview(t.tobytes()).cast("Q"), geo, 64 * MiB, [])
    by = {kind_of(p.message): p for p in got}
    assert set(by) == {"past_eof", "reserved"}
    assert by["past_eof"].count == by["reserved"].count == geo.payload_blocks
    assert by["past_eof"].index == 0 and by["past_eof"].fatal and not by["reserved"].fatal
    assert re.search(r"and \d+ more entries like it", by["past_eof"].describe())


@pytest.mark.parametrize("overlaps_by", ["map", "sort"])
def test_overlap_messages_name_both_sides(monkeypatch, overlaps_by):
    if overlaps_by == "sort":
        monkeypatch.setattr(bat_mod, "_MAP_MAX_UNITS", 0)
    geo = Geometry(64 * MiB, 2 * MiB, 512, False)
    reserved = [(0, MiB, "header section"), (2 * MiB, 3 * MiB, "region metadata")]
    t = array("Q", bytes(8 * geo.total_entries))
    t[3] = S.bat_entry(6, 10 * MiB)
    t[7] = S.bat_entry(6, 11 * MiB)  # starts inside entry 3's block
    t[9] = S.bat_entry(6, 20 * MiB)
    got = validate_table(memoryview(t.tobytes()).cast("Q"), geo, 64 * MiB, reserved)
    assert [p.describe() for p in got] == ["BAT: BAT entry 3 at 0xa00000 overlaps BAT entry 7 at 0xb00000"]
    t[3] = S.bat_entry(6, MiB)  # its second MiB is the metadata region
    got = validate_table(memoryview(t.tobytes()).cast("Q"), geo, 64 * MiB, reserved)
    assert [p.describe() for p in got] == ["BAT: BAT entry 3 at 0x100000 overlaps region metadata at 0x200000"]
    t[3] = S.bat_entry(6, 30 * MiB)
    assert validate_table(memoryview(t.tobytes()).cast("Q"), geo, 64 * MiB, reserved) == []
