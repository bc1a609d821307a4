"""Damaged and hostile files: vhdx.open + a full read must either raise a
vhdx.VhdxError (never another exception, never hang) or return data.

Where the format has redundancy the data must be right: a single damaged header
(the other one is identical but for the sequence number) must not change what
is read; a damaged region-table copy or file identifier may raise or must read
right; a truncated file may raise or must read right. Damage to unprotected
structures (BAT, metadata, bitmaps, log) may give any data of a sane size.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from builder import (
    FULLY,
    PARTIAL,
    ZERO,
    Block,
    BuiltChain,
    DirtyLog,
    ImageSpec,
    build_chain,
    peek,
    poke,
    rewrite_headers,
)
from vhdx import structures as s
from vhdx.crc import seal
from vhdx.layout import build_region_table

MiB = 1 << 20
TIMEOUT = 20


class Hang(Exception):  # noqa: N818 - the symptom under test, not an error of the library
    pass


@contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    def handler(signum, frame):  # noqa: ANN001
        raise Hang(f"no result within {seconds}s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


LAST_WARNINGS: list[str] = []


def attempt(vhdx_mod, chain: BuiltChain) -> bytes | Exception:
    """Open + full read; returns the bytes or the VhdxError. Anything else fails.
    The open's ``disk.warnings`` are left in LAST_WARNINGS."""
    LAST_WARNINGS.clear()
    try:
        with time_limit(TIMEOUT):
            with vhdx_mod.open(chain.top, parents=chain.parents or None) as disk:
                LAST_WARNINGS.extend(disk.warnings)
                size = disk.size
                assert 0 < size <= s.MAX_VIRTUAL_SIZE
                out = bytearray()
                step = 4 * MiB
                for off in range(0, min(size, 64 * MiB), step):  # bounded for hostile sizes
                    out += disk.read_at(off, min(step, size - off))
                disk.extents(0, min(size, 64 * MiB))
                return bytes(out)
    except vhdx_mod.VhdxError as e:
        return e
    except Hang:
        pytest.fail("reader hung")


# --- victims ---------------------------------------------------------------------------
def _victims(tmp: Path) -> dict[str, BuiltChain]:
    rng = random.Random(5)
    out: dict[str, BuiltChain] = {}
    d = tmp / "dyn"
    d.mkdir()
    out["dynamic"] = build_chain(d, [ImageSpec(
        virtual_size=4 * MiB, name="dyn", seed=1,
        blocks={0: Block(FULLY), 1: Block(ZERO), 3: Block(FULLY)})])
    d = tmp / "chain"
    d.mkdir()
    out["chain"] = build_chain(d, [
        ImageSpec(virtual_size=4 * MiB, name="base", seed=2, blocks={b: Block(FULLY) for b in range(4)}),
        ImageSpec(virtual_size=4 * MiB, name="child", seed=3,
                  blocks={0: Block(PARTIAL), 2: Block(FULLY), 3: Block(PARTIAL)})])
    d = tmp / "dirty"
    d.mkdir()
    out["dirty"] = build_chain(d, [ImageSpec(
        virtual_size=4 * MiB, name="dirty", seed=4, blocks={0: Block(FULLY), 2: Block(FULLY)},
        dirty_log=DirtyLog(entries=3, start=MiB - 8192, log_guid=uuid.UUID(int=rng.getrandbits(128))))])
    return out


@pytest.fixture(scope="module")
def victims(tmp_path_factory) -> dict[str, BuiltChain]:
    return _victims(tmp_path_factory.mktemp("victims"))


def _structures(chain: BuiltChain) -> dict[str, tuple[Path, int, int, str]]:
    """name -> (file, offset, length, strictness) of each structure of the top file."""
    img = chain.images[0]
    plan = img.plan
    p = img.path
    md = plan.metadata_offset
    n_items = 6 if plan.parent else 5
    last_item = max(o + n for o, n in plan.metadata_item_offsets.values())
    st: dict[str, tuple[Path, int, int, str]] = {
        "file_identifier": (p, 0, 520, "right_or_error"),
        "header1": (p, s.HEADER_OFFSETS[0], 80, "right"),
        "header2": (p, s.HEADER_OFFSETS[1], 80, "right"),
        "region_table1": (p, s.REGION_TABLE_OFFSETS[0], 80, "right_or_error"),
        "region_table2": (p, s.REGION_TABLE_OFFSETS[1], 80, "right_or_error"),
        "metadata_table": (p, md, 32 + 32 * n_items, "any"),
        "metadata_items": (p, md + 65536, last_item - 65536, "any"),
        "bat": (p, plan.bat_offset, plan.bat_entry_count * 8, "any"),
    }
    if plan.parent:
        o, n = plan.metadata_item_offsets["parent_locator"]
        st["parent_locator"] = (p, md + o, n, "any")
    if img.spec.dirty_log is not None:
        st["log"] = (p, plan.log_offset, plan.log_length, "log")
    sb = [raw & s.BAT_OFFSET_MASK for idx, raw in img.bat.items()
          if idx % (plan.chunk_ratio + 1) == plan.chunk_ratio and raw & 7 == s.SB_BLOCK_PRESENT]
    if sb:
        st["sector_bitmap"] = (p, sb[0], 4096, "any")
    for k, parent in enumerate(chain.images[1:], start=1):
        st[f"parent{k}_header2"] = (parent.path, s.HEADER_OFFSETS[1], 80, "right")
        st[f"parent{k}_bat"] = (parent.path, parent.plan.bat_offset, parent.plan.bat_entry_count * 8, "any")
    return st


def _judge(result: bytes | Exception, truth: bytes, strictness: str, what: str) -> None:
    if strictness == "right":
        assert result == truth, f"{what}: {result!r:.200}"
    elif strictness == "right_or_error":
        assert isinstance(result, Exception) or result == truth, f"{what}: wrong data"
    else:
        assert isinstance(result, (bytes, Exception))


def _offsets(rng: random.Random, length: int, limit: int) -> list[int]:
    if length <= limit:
        return list(range(length))
    return sorted(rng.sample(range(length), limit))


@pytest.mark.parametrize("victim", ["dynamic", "chain", "dirty"])
def test_bit_flips(vhdx_mod, victims, victim: str) -> None:
    _bit_flips(vhdx_mod, victims, victim, 120)


@pytest.mark.soak
@pytest.mark.parametrize("victim", ["dynamic", "chain", "dirty"])
def test_bit_flips_soak(vhdx_mod, victims, victim: str) -> None:
    for _ in range(8):
        _bit_flips(vhdx_mod, victims, victim, 2000)


def _bit_flips(vhdx_mod, victims, victim: str, limit: int) -> None:
    chain = victims[victim]
    truth = chain.expected()
    assert attempt(vhdx_mod, chain) == truth  # the undamaged image reads right
    rng = random.Random(f"{victim}:{limit}:{random.random() if limit > 120 else 0}")
    for name, (path, off, length, strict) in _structures(chain).items():
        if name == "log":
            # only the used part of the ring matters; sample it
            used = [o for o in range(0, length, 512) if any(peek(path, off + o, 512))]
            positions = sorted(rng.sample(used, min(limit // 2, len(used))))
            positions = [p + rng.randrange(512) for p in positions]
        else:
            positions = _offsets(rng, length, limit)
        for pos in positions:
            orig = peek(path, off + pos, 1)
            poke(path, off + pos, bytes([orig[0] ^ (1 << rng.randrange(8))]))
            try:
                _judge(attempt(vhdx_mod, chain), truth, strict, f"{name}+{pos}")
            finally:
                poke(path, off + pos, orig)
    assert attempt(vhdx_mod, chain) == truth


@pytest.mark.parametrize("victim", ["dynamic", "chain", "dirty"])
def test_truncation(vhdx_mod, victims, victim: str) -> None:
    chain = victims[victim]
    truth = chain.expected()
    rng = random.Random(victim)
    for img in chain.images:
        path = img.path
        size = path.stat().st_size
        keep = path.read_bytes()
        points = {0, 7, 520, 65536 + 40, 131072 + 4095, 196608 + 100, 262144 + 65535, MiB, MiB + 4096,
                  2 * MiB + 100, 2 * MiB + 65536 + 20, 3 * MiB + 8, 4 * MiB, size - 1, size - 4096, size - MiB}
        points |= {rng.randrange(size) for _ in range(12)}
        last_block = max((raw & s.BAT_OFFSET_MASK) for raw in img.bat.values())
        for cut in sorted(p for p in points if 0 <= p < size):
            with open(path, "r+b") as fh:
                fh.truncate(cut)
            try:
                r = attempt(vhdx_mod, chain)
                if cut >= last_block and not isinstance(r, Exception) and r != truth:
                    # a partial *last* block is tolerated with a warning (FORMAT.md §10 policy)
                    assert LAST_WARNINGS, f"{path.name} cut at {cut}: wrong data and no warning"
                else:
                    assert isinstance(r, Exception) or r == truth, f"{path.name} cut at {cut}: wrong data"
            finally:
                with open(path, "r+b") as fh:
                    fh.write(keep)
        assert path.read_bytes() == keep


# --- hostile values (valid CRCs, absurd contents) ------------------------------------------
def _fresh(tmp_path: Path, **kw) -> BuiltChain:
    spec = ImageSpec(virtual_size=4 * MiB, name="h", seed=9, blocks={0: Block(FULLY), 2: Block(FULLY)}, **kw)
    return build_chain(tmp_path, [spec])


def _set_region_tables(path: Path, entries) -> None:
    rt = build_region_table(entries)
    for off in s.REGION_TABLE_OFFSETS:
        poke(path, off, rt)


def _must_fail(vhdx_mod, chain: BuiltChain, exc=None) -> None:
    """The open must fail with exactly ``exc`` (not a subclass, not a sibling)."""
    r = attempt(vhdx_mod, chain)
    assert isinstance(r, Exception), "hostile image was accepted"
    if exc is not None:
        assert type(r) is exc, repr(r)
        assert str(chain.top) in str(r) or any(str(p) in str(r) for p in chain.paths), repr(r)


def _bat(offset: int, length: int = MiB) -> tuple:
    """A required BAT region entry."""
    return (s.BAT_REGION_GUID, offset, length, 1)


def _md(plan, offset: int | None = None) -> tuple:
    """A required metadata region entry, where the layout put it unless ``offset``."""
    return (s.METADATA_REGION_GUID, plan.metadata_offset if offset is None else offset, MiB, 1)


HOSTILE_REGIONS: list[tuple[str, Callable]] = [
    ("bat_past_eof", lambda p: [_bat(1 << 40), _md(p)]),
    ("bat_too_small", lambda p: [_bat(p.bat_offset, 0), _md(p)]),
    ("bat_huge_len", lambda p: [_bat(p.bat_offset, 0xFFF00000), _md(p)]),
    ("bat_over_metadata", lambda p: [_bat(p.metadata_offset), _md(p)]),
    ("bat_in_header", lambda p: [_bat(0), _md(p)]),
    ("bat_over_log", lambda p: [_bat(p.log_offset), _md(p)]),
    ("unaligned", lambda p: [_bat(p.bat_offset + 4096), _md(p)]),
    ("missing_bat", lambda p: [_md(p)]),
    ("duplicate_bat", lambda p: [_bat(p.bat_offset), _bat(p.bat_offset), _md(p)]),
    ("unknown_required", lambda p: [_bat(p.bat_offset), _md(p), (uuid.UUID(int=99), 64 * MiB, MiB, 1)]),
    ("metadata_past_eof", lambda p: [_bat(p.bat_offset), _md(p, 1 << 44)]),
]


@pytest.mark.parametrize("name,entries", HOSTILE_REGIONS, ids=[h[0] for h in HOSTILE_REGIONS])
def test_hostile_region_table(vhdx_mod, tmp_path: Path, name: str, entries) -> None:
    chain = _fresh(tmp_path)
    _set_region_tables(chain.top, entries(chain.images[0].plan))
    exc = vhdx_mod.UnsupportedFeatureError if name == "unknown_required" else vhdx_mod.CorruptImageError
    _must_fail(vhdx_mod, chain, exc)


def test_unknown_optional_region_is_ignored(vhdx_mod, tmp_path: Path) -> None:
    chain = _fresh(tmp_path)
    p = chain.images[0].plan
    with open(chain.top, "r+b") as fh:
        fh.truncate(fh.seek(0, 2) + MiB)
    end = chain.top.stat().st_size - MiB
    _set_region_tables(chain.top, [(s.BAT_REGION_GUID, p.bat_offset, MiB, 1),
                                   (s.METADATA_REGION_GUID, p.metadata_offset, MiB, 1),
                                   (uuid.UUID(int=98), end, MiB, 0)])
    assert attempt(vhdx_mod, chain) == chain.expected()


def test_region_table_entry_count_huge(vhdx_mod, tmp_path: Path) -> None:
    chain = _fresh(tmp_path)
    for off in s.REGION_TABLE_OFFSETS:
        rt = bytearray(peek(chain.top, off, 65536))
        rt[8:12] = (0xFFFFFFFF).to_bytes(4, "little")
        poke(chain.top, off, bytes(seal(rt)))
    _must_fail(vhdx_mod, chain, vhdx_mod.CorruptImageError)


def _metadata_mutation(chain: BuiltChain, fn: Callable[[bytearray], None]) -> None:
    plan = chain.images[0].plan
    md = bytearray(peek(chain.top, plan.metadata_offset, plan.metadata_length))
    fn(md)
    poke(chain.top, plan.metadata_offset, bytes(md))


def _entry(md: bytearray, guid: uuid.UUID) -> int:
    n = int.from_bytes(md[10:12], "little")
    for i in range(n):
        if md[32 + 32 * i:48 + 32 * i] == guid.bytes_le:
            return 32 + 32 * i
    raise KeyError(guid)


def _item(md: bytearray, guid: uuid.UUID) -> int:
    return int.from_bytes(md[_entry(md, guid) + 16:_entry(md, guid) + 20], "little")


def _put(md: bytearray, pos: int, value: int, n: int) -> None:
    md[pos:pos + n] = value.to_bytes(n, "little")


HOSTILE_METADATA: list[tuple[str, Callable[[bytearray], None]]] = [
    ("entry_count_huge", lambda md: _put(md, 10, 0xFFFF, 2)),
    ("entry_count_zero", lambda md: _put(md, 10, 0, 2)),
    ("item_offset_huge", lambda md: _put(md, _entry(md, s.FILE_PARAMETERS_GUID) + 16, 0xFFFFFFF0, 4)),
    ("item_length_huge", lambda md: _put(md, _entry(md, s.VIRTUAL_DISK_SIZE_GUID) + 20, 0xFFFFFFFF, 4)),
    ("item_in_table", lambda md: _put(md, _entry(md, s.VIRTUAL_DISK_SIZE_GUID) + 16, 0x100, 4)),
    ("items_overlap", lambda md: _put(md, _entry(md, s.VIRTUAL_DISK_SIZE_GUID) + 16,
                                      _item(md, s.FILE_PARAMETERS_GUID) + 4, 4)),
    ("wrong_item_size", lambda md: _put(md, _entry(md, s.LOGICAL_SECTOR_SIZE_GUID) + 20, 2, 4)),
    ("unknown_required_item", lambda md: md.__setitem__(slice(_entry(md, s.PHYSICAL_SECTOR_SIZE_GUID),
                                                              _entry(md, s.PHYSICAL_SECTOR_SIZE_GUID) + 16),
                                                        uuid.UUID(int=77).bytes_le)),
    ("virtual_size_zero", lambda md: _put(md, _item(md, s.VIRTUAL_DISK_SIZE_GUID), 0, 8)),
    ("virtual_size_huge", lambda md: _put(md, _item(md, s.VIRTUAL_DISK_SIZE_GUID), (1 << 64) - 512, 8)),
    ("virtual_size_unaligned", lambda md: _put(md, _item(md, s.VIRTUAL_DISK_SIZE_GUID), 4 * MiB - 100, 8)),
    ("virtual_size_past_bat", lambda md: _put(md, _item(md, s.VIRTUAL_DISK_SIZE_GUID), 1 << 45, 8)),
    ("block_size_zero", lambda md: _put(md, _item(md, s.FILE_PARAMETERS_GUID), 0, 4)),
    ("block_size_odd", lambda md: _put(md, _item(md, s.FILE_PARAMETERS_GUID), 3 * MiB, 4)),
    ("block_size_huge", lambda md: _put(md, _item(md, s.FILE_PARAMETERS_GUID), 1 << 31, 4)),
    ("lss_1024", lambda md: _put(md, _item(md, s.LOGICAL_SECTOR_SIZE_GUID), 1024, 4)),
    ("pss_0", lambda md: _put(md, _item(md, s.PHYSICAL_SECTOR_SIZE_GUID), 0, 4)),
    ("has_parent_without_locator", lambda md: _put(md, _item(md, s.FILE_PARAMETERS_GUID) + 4, 2, 4)),
    ("bad_signature", lambda md: md.__setitem__(slice(0, 8), b"metadatX")),
]


@pytest.mark.parametrize("name,fn", HOSTILE_METADATA, ids=[h[0] for h in HOSTILE_METADATA])
def test_hostile_metadata(vhdx_mod, tmp_path: Path, name: str, fn) -> None:
    chain = _fresh(tmp_path)
    _metadata_mutation(chain, fn)
    exc = vhdx_mod.UnsupportedFeatureError if name == "unknown_required_item" else vhdx_mod.CorruptImageError
    _must_fail(vhdx_mod, chain, exc)


def _bat_entries(tmp_path: Path, entries: dict[int, int], **kw) -> BuiltChain:
    spec = ImageSpec(virtual_size=4 * MiB, name="b", seed=3,
                     blocks={0: Block(FULLY), 1: Block(FULLY), 2: Block(FULLY)}, **kw)
    chain = build_chain(tmp_path, [spec])
    plan = chain.images[0].plan
    for idx, raw in entries.items():
        poke(chain.top, plan.bat_offset + 8 * idx, raw.to_bytes(8, "little"))
    return chain


def _block_off(chain: BuiltChain, b: int) -> int:
    return chain.images[0].bat[b] & s.BAT_OFFSET_MASK


HOSTILE_BAT: list[tuple[str, Callable[[BuiltChain], dict[int, int]]]] = [
    ("offset_past_eof", lambda c: {1: s.bat_entry(FULLY, 1 << 40)}),
    ("offset_max", lambda c: {1: 0xFFFFFFFFFFF00006}),
    ("overlapping_blocks", lambda c: {1: s.bat_entry(FULLY, _block_off(c, 0))}),
    ("block_over_bat", lambda c: {1: s.bat_entry(FULLY, c.images[0].plan.bat_offset)}),
    ("block_over_metadata", lambda c: {1: s.bat_entry(FULLY, c.images[0].plan.metadata_offset)}),
    ("block_in_header", lambda c: {1: s.bat_entry(FULLY, 0)}),
    ("reserved_state_4", lambda c: {1: s.bat_entry(4, _block_off(c, 1))}),
    ("reserved_state_5", lambda c: {3: 5}),
    ("partial_in_dynamic", lambda c: {1: s.bat_entry(PARTIAL, _block_off(c, 1))}),
]


@pytest.mark.parametrize("name,fn", HOSTILE_BAT, ids=[h[0] for h in HOSTILE_BAT])
def test_hostile_bat(vhdx_mod, tmp_path: Path, name: str, fn) -> None:
    chain = _bat_entries(tmp_path, {})
    plan = chain.images[0].plan
    for idx, raw in fn(chain).items():
        poke(chain.top, plan.bat_offset + 8 * idx, raw.to_bytes(8, "little"))
    _must_fail(vhdx_mod, chain, vhdx_mod.CorruptImageError)


def test_partial_without_sector_bitmap(vhdx_mod, tmp_path: Path) -> None:
    base = ImageSpec(virtual_size=4 * MiB, name="base", blocks={0: Block(FULLY)})
    child = ImageSpec(virtual_size=4 * MiB, name="child", blocks={0: Block(PARTIAL)},
                      sb_states={0: s.SB_BLOCK_NOT_PRESENT})
    _must_fail(vhdx_mod, build_chain(tmp_path, [base, child]), vhdx_mod.CorruptImageError)


def test_sb_entry_past_eof(vhdx_mod, tmp_path: Path) -> None:
    base = ImageSpec(virtual_size=4 * MiB, name="base", blocks={0: Block(FULLY)})
    child = ImageSpec(virtual_size=4 * MiB, name="child", blocks={0: Block(PARTIAL)})
    chain = build_chain(tmp_path, [base, child])
    img = chain.images[0]
    sb = img.plan.chunk_ratio
    poke(img.path, img.plan.bat_offset + 8 * sb, s.bat_entry(s.SB_BLOCK_PRESENT, 1 << 40).to_bytes(8, "little"))
    _must_fail(vhdx_mod, chain, vhdx_mod.CorruptImageError)


# --- headers ------------------------------------------------------------------------------
def test_both_headers_bad(vhdx_mod, tmp_path: Path) -> None:
    chain = _fresh(tmp_path)
    for off in s.HEADER_OFFSETS:
        poke(chain.top, off + 100, b"\x01")  # reserved byte; CRC now wrong
    _must_fail(vhdx_mod, chain, vhdx_mod.CorruptImageError)


@pytest.mark.parametrize("field,value,exc", [
    ("version", 2, "CorruptImageError"),  # a header with Version != 1 is invalid (FORMAT.md §2.1)
    ("log_version", 1, "UnsupportedFeatureError"),
    ("log_offset", 0, "CorruptImageError"),
    ("log_length", 3 * MiB // 2, "CorruptImageError"),
    ("log_offset", 1 << 50, "CorruptImageError"),
    ("log_length", 0, "CorruptImageError"),  # LogGuid set, no region: was a ZeroDivisionError
])
def test_hostile_header_fields(vhdx_mod, tmp_path: Path, field: str, value: int, exc) -> None:
    chain = _fresh(tmp_path, dirty_log=DirtyLog(entries=1, stale=0))
    plan = chain.images[0].plan
    hdr = s.Header.parse(peek(chain.top, s.HEADER_OFFSETS[1], 4096))
    kw = dict(log_guid=hdr.log_guid, **{field: value})
    rewrite_headers(chain.top, plan, **kw)
    _must_fail(vhdx_mod, chain, getattr(vhdx_mod, exc) if exc else None)


def test_equal_sequence_numbers(vhdx_mod, tmp_path: Path) -> None:
    from vhdx.layout import build_header

    chain = _fresh(tmp_path)
    plan = chain.images[0].plan
    same = build_header(5, plan.file_write_guid, plan.data_write_guid)
    for off in s.HEADER_OFFSETS:
        poke(chain.top, off, same)
    assert attempt(vhdx_mod, chain) == chain.expected()  # identical: accepted (Disk2VHD)
    poke(chain.top, s.HEADER_OFFSETS[1], build_header(5, plan.file_write_guid, uuid.uuid4()))
    _must_fail(vhdx_mod, chain, vhdx_mod.CorruptImageError)


# --- log ------------------------------------------------------------------------------
def _log_entry_mutation(tmp_path: Path, fn: Callable[[bytearray], None], reseal: bool = True) -> BuiltChain:
    chain = _fresh(tmp_path, dirty_log=DirtyLog(entries=1, stale=0, start=0))
    plan = chain.images[0].plan
    length = int.from_bytes(peek(chain.top, plan.log_offset + 8, 4), "little")
    e = bytearray(peek(chain.top, plan.log_offset, length))
    fn(e)
    if reseal:
        seal(e)
    poke(chain.top, plan.log_offset, bytes(e))
    return chain


# (name, mutation, outcome): None = the entry is not valid (FORMAT.md §6.2), so no
# entry carries the LogGuid and the log reads as empty (stale contents, a warning);
# else the exact class raised for a valid entry whose fields cannot be replayed.
HOSTILE_LOG: list[tuple[str, Callable[[bytearray], None], str | None]] = [
    ("entry_length_huge", lambda e: _put(e, 8, 0xFFFFF000, 4), None),
    ("entry_length_zero", lambda e: _put(e, 8, 0, 4), None),
    ("tail_past_log", lambda e: _put(e, 12, 0x7FFFF000, 4), None),
    ("descriptor_count_huge", lambda e: _put(e, 24, 0xFFFFFFFF, 4), None),
    ("sequence_zero", lambda e: _put(e, 16, 0, 8), None),
    ("flushed_offset_past_eof", lambda e: _put(e, 48, 1 << 50, 8), "CorruptImageError"),
    ("descriptor_offset_huge", lambda e: _put(e, 64 + 16, (1 << 62) & ~4095, 8), "CorruptImageError"),
    ("descriptor_into_header_section", lambda e: _put(e, 64 + 16, 0, 8), "CorruptImageError"),
    ("descriptor_bad_signature", lambda e: e.__setitem__(slice(64, 68), b"dexc"), None),
    ("data_sector_bad_sequence", lambda e: _put(e, 4096 + 4, 0xDEAD, 4), None),
]


@pytest.mark.parametrize("name,fn,outcome", HOSTILE_LOG, ids=[h[0] for h in HOSTILE_LOG])
def test_hostile_log(vhdx_mod, tmp_path: Path, name: str, fn, outcome: str | None) -> None:
    chain = _log_entry_mutation(tmp_path, fn)
    if outcome is not None:
        _must_fail(vhdx_mod, chain, getattr(vhdx_mod, outcome))
        return
    r = attempt(vhdx_mod, chain)
    assert not isinstance(r, Exception), repr(r)
    assert r != chain.expected()
    assert LAST_WARNINGS, f"{name}: invalid log silently ignored"
    assert "holds no entry" in LAST_WARNINGS[0]


def test_log_guid_without_entries_reads_stale(vhdx_mod, tmp_path: Path) -> None:
    """FORMAT.md §6.4 (step 4 caveat): LogGuid set but no CRC-valid entry carrying it -> empty log."""
    chain = _fresh(tmp_path)
    rewrite_headers(chain.top, chain.images[0].plan, log_guid=uuid.uuid4())
    r = attempt(vhdx_mod, chain)
    assert r == chain.expected()
    assert any("holds no entry" in w for w in LAST_WARNINGS)


def test_log_valid_but_incomplete_sequence_fails(vhdx_mod, tmp_path: Path) -> None:
    """CRC-valid entries with the LogGuid but no complete sequence: must fail."""
    def point_tail_elsewhere(e: bytearray) -> None:
        _put(e, 12, 0x80000, 4)  # Tail at an offset holding no entry of the sequence

    chain = _log_entry_mutation(tmp_path, point_tail_elsewhere)
    _must_fail(vhdx_mod, chain, vhdx_mod.CorruptImageError)


# --- chains -----------------------------------------------------------------------------
def test_cyclic_parent_chain(vhdx_mod, tmp_path: Path) -> None:
    """a.avhdx -> b.avhdx -> a.avhdx, linkage GUIDs consistent: must not loop."""
    from vhdx.layout import ParentInfo, plan_layout, write_new_image

    ga, gb = uuid.uuid4(), uuid.uuid4()
    for name, own, other in (("a", ga, gb), ("b", gb, ga)):
        rel = ".\\" + ("b" if name == "a" else "a") + ".avhdx"
        plan = plan_layout(4 * MiB, MiB, parent=ParentInfo(other, relative_path=rel), data_write_guid=own)
        write_new_image(tmp_path / f"{name}.avhdx", plan)
    with time_limit(TIMEOUT):
        with pytest.raises(vhdx_mod.ParentMismatchError, match="loops back"):
            vhdx_mod.open(tmp_path / "a.avhdx")
        with pytest.raises(vhdx_mod.ParentMismatchError, match="loops back"):
            vhdx_mod.open(tmp_path / "a.avhdx", parents=[tmp_path / "b.avhdx", tmp_path / "a.avhdx"])


def test_self_parent(vhdx_mod, tmp_path: Path) -> None:
    from vhdx.layout import ParentInfo, plan_layout, write_new_image

    g = uuid.uuid4()
    write_new_image(tmp_path / "s.avhdx", plan_layout(4 * MiB, MiB, parent=ParentInfo(g, relative_path=".\\s.avhdx"),
                                                      data_write_guid=g))
    with time_limit(TIMEOUT):
        # the file itself is never taken for its own parent: no other candidate
        with pytest.raises(vhdx_mod.ParentNotFoundError) as info:
            vhdx_mod.open(tmp_path / "s.avhdx")
        assert type(info.value) is vhdx_mod.ParentNotFoundError


def test_parent_sector_size_mismatch(vhdx_mod, tmp_path: Path) -> None:
    base = ImageSpec(virtual_size=4 * MiB, name="base", logical_sector_size=4096)
    chain = build_chain(tmp_path, [base])
    from vhdx.layout import ParentInfo, plan_layout, write_new_image

    plan = plan_layout(4 * MiB, MiB, 512,
                       parent=ParentInfo(chain.images[0].data_write_guid, relative_path=".\\base.vhdx"))
    write_new_image(tmp_path / "c.avhdx", plan)
    with pytest.raises(vhdx_mod.ParentMismatchError):
        vhdx_mod.open(tmp_path / "c.avhdx", parents=[chain.top])


def test_not_a_vhdx(vhdx_mod, tmp_path: Path) -> None:
    for name, data in (("empty", b""), ("short", b"vhdxfile"), ("zeros", bytes(2 * MiB)),
                       ("random", random.Random(1).randbytes(3 * MiB))):
        p = tmp_path / name
        p.write_bytes(data)
        with pytest.raises(vhdx_mod.CorruptImageError) as info:
            vhdx_mod.open(p)
        assert type(info.value) is vhdx_mod.CorruptImageError and str(p) in str(info.value)
    with pytest.raises(vhdx_mod.ImageNotFoundError) as info:
        vhdx_mod.open(tmp_path / "does-not-exist.vhdx")
    assert info.value.errno == errno.ENOENT and info.value.filename == str(tmp_path / "does-not-exist.vhdx")
    os.mkdir(tmp_path / "dir.vhdx")
    with pytest.raises(vhdx_mod.TargetKindError):
        vhdx_mod.open(tmp_path / "dir.vhdx")
