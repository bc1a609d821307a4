"""Partition tables (vhdx/partitions.py): MBR with logical partitions and GPT, made
by sfdisk / sgdisk and compared with what those tools report; hostile tables built
from the module's own construct declarations."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
from diskimg import RawDisk, have, raw_to_chain, sh
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vhdx
from vhdx.errors import CorruptImageError, PartitionTableError, VhdxError
from vhdx.partitions import MAX_LOGICAL, GptEntry, GptHeader, Mbr, read_partitions

MiB = 1 << 20
needs_sfdisk = pytest.mark.skipif(not have("sfdisk"), reason="sfdisk (util-linux) not installed")
needs_sgdisk = pytest.mark.skipif(not have("sgdisk"), reason="sgdisk (gdisk) not installed")

MBR_SCRIPT = """label: dos
unit: sectors
1 : start=2048, size=16384, type=83, bootable
2 : start=18432, size=61440, type=5
3 : start=79872, size=8192, type=7
4 : start=88064, size=8192, type=c
5 : start=20480, size=8192, type=83
6 : start=30720, size=8192, type=82
7 : start=40960, size=16384, type=b
"""


def _blank(path: Path, size: int = 64 * MiB) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def _sfdisk_json(target: Path | str) -> dict:
    return json.loads(sh("sfdisk", "--json", target))["partitiontable"]


def _as_tool_rows(parts, lss: int) -> list[tuple]:
    """Our partitions in sfdisk's terms: (number, start sector, sectors)."""
    return [(p.number, p.offset // lss, p.length // lss) for p in parts]


def _sfdisk_rows(table: dict) -> list[tuple]:
    return sorted((int(re.search(r"(\d+)$", p["node"]).group(1)), p["start"], p["size"])
                  for p in table["partitions"])


@pytest.fixture
def mbr_raw(tmp_path: Path) -> Path:
    if not have("sfdisk"):
        pytest.skip("sfdisk not installed")
    raw = _blank(tmp_path / "mbr.raw")
    sh("sfdisk", "-q", raw, input=MBR_SCRIPT)
    return raw


@pytest.fixture
def gpt_raw(tmp_path: Path) -> Path:
    if not have("sgdisk"):
        pytest.skip("sgdisk not installed")
    raw = _blank(tmp_path / "gpt.raw")
    sh("sgdisk", "-n", "1:2048:+20M", "-c", "1:alpha", "-t", "1:8300",
       "-n", "3:0:+10M", "-c", "3:gamma \u03b3", "-t", "3:0700", "-A", "3:set:2", raw)
    return raw


# --- agreement with the tools -------------------------------------------------------
@needs_sfdisk
def test_mbr_with_logical_partitions_matches_sfdisk(mbr_raw: Path) -> None:
    warnings: list[str] = []
    parts = read_partitions(RawDisk(mbr_raw), warnings)
    table = _sfdisk_json(mbr_raw)
    assert table["label"] == "dos" and not warnings
    assert _as_tool_rows(parts, 512) == _sfdisk_rows(table)
    tool = {int(re.search(r"(\d+)$", p["node"]).group(1)): p for p in table["partitions"]}
    for p in parts:
        assert p.scheme == "mbr" and p.type == int(tool[p.number]["type"], 16)
        assert p.bootable == bool(tool[p.number].get("bootable"))
        assert p.container == (p.type == 5)
        assert p.name == "" and p.guid is None
    assert [p.number for p in parts if not p.container] == [1, 3, 4, 5, 6, 7]


@needs_sfdisk
@needs_sgdisk
def test_gpt_matches_sfdisk_and_sgdisk(gpt_raw: Path) -> None:
    warnings: list[str] = []
    parts = read_partitions(RawDisk(gpt_raw), warnings)
    assert not warnings
    table = _sfdisk_json(gpt_raw)
    assert _as_tool_rows(parts, 512) == _sfdisk_rows(table)
    tool = {int(re.search(r"(\d+)$", p["node"]).group(1)): p for p in table["partitions"]}
    for p in parts:
        t = tool[p.number]
        assert (p.type, p.guid, p.name) == (t["type"], t["uuid"], t["name"])
        assert p.bootable == ("LegacyBIOSBootable" in t.get("attrs", ""))
    # sgdisk -p: "Number Start (sector) End (sector) Size Code Name"; entry 2 stays empty.
    rows = re.findall(r"^\s+(\d+)\s+(\d+)\s+(\d+)\s+[\d.]+ \S+\s+[0-9A-F]{4}\s+(.*)$",
                      sh("sgdisk", "-p", gpt_raw), re.MULTILINE)
    assert [(int(n), int(a), int(b) - int(a) + 1, name) for n, a, b, name in rows] == \
        [(p.number, p.offset // 512, p.length // 512, p.name) for p in parts]
    assert [p.number for p in parts] == [1, 3]


@needs_sgdisk
def test_partitions_through_a_vhdx_chain_and_vhdx_info(gpt_raw: Path, tmp_path: Path) -> None:
    want = read_partitions(RawDisk(gpt_raw))
    top = raw_to_chain(gpt_raw, tmp_path, depth=2)[0]
    with vhdx.open(top) as disk:
        assert disk.partitions() == want
        assert disk.partitions() == want and not disk.warnings
    run = [sys.executable, "-m", "vhdx", "info", str(top)]
    root = Path(__file__).resolve().parent.parent
    info = json.loads(subprocess.run(run + ["--json"], capture_output=True, text=True, cwd=root,
                                     check=True).stdout)
    assert info["partitions"] == [p.to_dict() for p in want]
    text = subprocess.run(run, capture_output=True, text=True, cwd=root, check=True).stdout
    assert "partitions (gpt):" in text and "'gamma \u03b3' bootable" in text


def test_gpt_on_4096_byte_sectors_matches_sfdisk(tmp_path: Path) -> None:
    """sfdisk writes a GPT through a 4096-byte-sector loop device; our reader, told
    the sector size, agrees with what sfdisk reads back from the device."""
    if os.geteuid() != 0 or not have("losetup", "sfdisk") or not os.path.exists("/dev/loop-control"):
        pytest.skip("needs root, losetup and loop devices")
    raw = _blank(tmp_path / "g4k.raw")
    try:
        dev = sh("losetup", "-f", "--show", "-b", "4096", raw).strip()
    except AssertionError as e:
        pytest.skip(f"no loop device: {e}")
    try:
        sh("sfdisk", "-q", "--no-reread", "--no-tell-kernel", dev,
           input="label: gpt\nstart=256, size=4096, name=one\nsize=2048, type=L, name=two\n")
        table = _sfdisk_json(dev)
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)
    assert table["sectorsize"] == 4096
    parts = read_partitions(RawDisk(raw, 4096))
    assert _as_tool_rows(parts, 4096) == _sfdisk_rows(table)
    assert [p.name for p in parts] == ["one", "two"]
    # The same table inside a 4096-byte-sector VHDX.
    top = raw_to_chain(raw, tmp_path, logical_sector_size=4096)[0]
    with vhdx.open(top) as disk:
        assert disk.logical_sector_size == 4096 and disk.partitions() == parts
    # Read as 512-byte sectors the table is not where a GPT must be: no GPT.
    with pytest.raises(PartitionTableError):
        read_partitions(RawDisk(raw, 512))


# --- hostile tables ---------------------------------------------------------------
def _entry(status: int = 0, type_: int = 0, lba: int = 0, sectors: int = 0) -> dict:
    return {"status": status, "chs_first": bytes(3), "type": type_, "chs_last": bytes(3),
            "lba_first": lba, "sectors": sectors}


def _mbr(*entries: dict) -> bytes:
    ents = list(entries) + [_entry()] * (4 - len(entries))
    return Mbr.build({"bootstrap": bytes(440), "disk_signature": 0x1234, "reserved": bytes(2),
                      "entries": ents, "signature": b"\x55\xaa"})


class BufDisk:
    def __init__(self, size: int, lss: int = 512) -> None:
        self.buf = bytearray(size)
        self.size = size
        self.logical_sector_size = lss
        self.reads = 0

    def put(self, offset: int, data: bytes) -> None:
        self.buf[offset:offset + len(data)] = data

    def read_at(self, offset: int, size: int) -> bytes:
        self.reads += 1
        return bytes(self.buf[offset:offset + size])


def test_cyclic_ebr_chain_stops_with_a_warning() -> None:
    d = BufDisk(16 * MiB)
    d.put(0, _mbr(_entry(0, 0x05, 2048, 16384)))
    # EBR 1 (at the container start) -> EBR 2 -> EBR 1 again.
    d.put(2048 * 512, _mbr(_entry(0, 0x83, 63, 100), _entry(0, 0x05, 4096, 2048)))
    d.put((2048 + 4096) * 512, _mbr(_entry(0, 0x83, 63, 100), _entry(0, 0x05, 0, 2048)))
    w: list[str] = []
    parts = read_partitions(d, w)
    assert [p.number for p in parts] == [1, 5, 6]
    assert parts[1].offset == (2048 + 63) * 512 and parts[2].offset == (2048 + 4096 + 63) * 512
    assert any("loops" in x for x in w)


def test_endless_ebr_chain_is_bounded() -> None:
    n = MAX_LOGICAL + 40
    d = BufDisk((2048 + 8 * (n + 1)) * 512 + MiB)
    d.put(0, _mbr(_entry(0, 0x0F, 2048, 8 * (n + 1))))
    for i in range(n):
        d.put((2048 + 8 * i) * 512, _mbr(_entry(0, 0x83, 1, 7), _entry(0, 0x05, 8 * (i + 1), 8)))
    w: list[str] = []
    t0 = time.monotonic()
    parts = read_partitions(d, w)
    assert time.monotonic() - t0 < 5
    assert len(parts) == 1 + MAX_LOGICAL and parts[-1].number == 4 + MAX_LOGICAL
    assert any(str(MAX_LOGICAL) in x for x in w)
    assert d.reads <= MAX_LOGICAL + 2


def test_mbr_entries_past_the_end_are_dropped_or_truncated() -> None:
    d = BufDisk(8 * MiB)
    sectors = d.size // 512
    d.put(0, _mbr(_entry(0x80, 0x83, 2048, 2048), _entry(0, 0x83, sectors + 10, 100),
                  _entry(0, 0x07, sectors - 100, 1000)))
    w: list[str] = []
    parts = read_partitions(d, w)
    assert [(p.number, p.length) for p in parts] == [(1, 2048 * 512), (3, 100 * 512)]
    assert parts[0].bootable
    assert any("partition 2" in x and "ignored" in x for x in w)
    assert any("partition 3" in x and "truncated" in x for x in w)


def test_boot_sector_and_blank_disk_have_no_table() -> None:
    d = BufDisk(MiB)
    assert read_partitions(d) == []  # no 55AA
    d.put(0, _mbr(_entry(0x80, 0x83, 1, 10)))
    d.buf[446] = 0x33  # a boot indicator that no table has: a volume boot sector
    assert read_partitions(d) == []


def _gpt(d: BufDisk, entries: list[dict], count: int = 128, entry_size: int = 128,
         **header) -> None:
    """Protective MBR, primary and backup GPT built from the module's declarations."""
    lss = d.logical_sector_size
    last = d.size // lss - 1
    d.put(0, _mbr(_entry(0, 0xEE, 1, min(last, 0xFFFFFFFF))))
    array = bytearray(count * entry_size)
    for i, e in enumerate(entries):
        array[i * entry_size:i * entry_size + 128] = GptEntry.build(e)
    array_sectors = -(-len(array) // lss)
    for my, alt, arr_lba in ((1, last, 2), (last, 1, last - array_sectors)):
        h = {"revision": 0x10000, "header_size": 92, "header_crc32": 0, "reserved": 0,
             "my_lba": my, "alternate_lba": alt, "first_usable_lba": 2 + array_sectors,
             "last_usable_lba": last - array_sectors - 1, "disk_guid": bytes(range(16)),
             "entries_lba": arr_lba, "entry_count": count, "entry_size": entry_size,
             "entries_crc32": zlib.crc32(array)}
        h.update(header)
        raw = bytearray(GptHeader.build(h))
        raw[16:20] = zlib.crc32(raw).to_bytes(4, "little")
        d.put(my * lss, bytes(raw))
        d.put(arr_lba * lss, bytes(array))


def _gentry(first: int, last: int, name: str = "x") -> dict:
    return {"type_guid": bytes([1] * 16), "unique_guid": bytes([2] * 16), "first_lba": first,
            "last_lba": last, "attributes": 0, "name": name.encode("utf-16-le").ljust(72, b"\0")}


@pytest.mark.parametrize("lss", [512, 4096])
def test_gpt_damaged_primary_falls_back_to_the_backup(lss: int) -> None:
    d = BufDisk(32 * MiB, lss)
    unused = dict(_gentry(0, 0), type_guid=bytes(16))  # entry 2 empty: numbers keep the gap
    _gpt(d, [_gentry(64, 127, "a"), unused, _gentry(256, 511, "c")])
    good = read_partitions(d)
    assert [(p.number, p.offset, p.length, p.name) for p in good] == \
        [(1, 64 * lss, 64 * lss, "a"), (3, 256 * lss, 256 * lss, "c")]
    d.buf[lss + 40] ^= 1  # header CRC now wrong
    w: list[str] = []
    assert read_partitions(d, w) == good
    assert any("header CRC32 mismatch" in x and "backup" in x for x in w)
    d.buf[lss + 40] ^= 1
    d.buf[2 * lss + 5] ^= 1  # primary entry array CRC wrong
    w = []
    assert read_partitions(d, w) == good and any("entry array" in x for x in w)


def test_gpt_both_headers_bad_raises_partition_table_error() -> None:
    d = BufDisk(8 * MiB)
    _gpt(d, [_gentry(64, 127)])
    d.buf[512 + 40] ^= 1
    d.buf[d.size - 512 + 40] ^= 1
    with pytest.raises(PartitionTableError, match="GPT unusable") as ei:
        read_partitions(d)
    assert isinstance(ei.value, CorruptImageError) and isinstance(ei.value, VhdxError)


@pytest.mark.parametrize("count,size,why", [
    (0xFFFFFFFF, 128, "exceed"), (1 << 20, 128, "exceed"), (4, 100, "entry size"),
    (4, 0, "entry size"), (128, 1 << 20, "entry size")])
def test_gpt_absurd_entry_geometry_is_refused_cheaply(count: int, size: int, why: str) -> None:
    d = BufDisk(8 * MiB)
    _gpt(d, [], count=4)
    for lba in (1, d.size // 512 - 1):  # both headers claim the absurd geometry (CRC valid)
        raw = bytearray(d.buf[lba * 512:lba * 512 + 92])
        raw[80:84] = count.to_bytes(4, "little")
        raw[84:88] = size.to_bytes(4, "little")
        raw[16:20] = b"\0\0\0\0"
        raw[16:20] = zlib.crc32(raw).to_bytes(4, "little")
        d.put(lba * 512, bytes(raw))
    with pytest.raises(PartitionTableError, match=why):
        read_partitions(d)
    assert d.reads <= 4


def test_gpt_bad_entries_are_skipped_or_truncated() -> None:
    d = BufDisk(8 * MiB)
    last = d.size // 512 - 1
    _gpt(d, [_gentry(100, 50), _gentry(last + 5, last + 10), _gentry(last - 20, last + 100),
             _gentry(40, 40)])
    w: list[str] = []
    parts = read_partitions(d, w)
    assert [(p.number, p.offset // 512, p.length // 512) for p in parts] == [(3, last - 20, 21), (4, 40, 1)]
    assert len(w) == 3


def test_gpt_entry_array_past_the_end_is_refused() -> None:
    d = BufDisk(8 * MiB)
    _gpt(d, [_gentry(64, 127)], entries_lba=(8 * MiB) // 512 + 10)
    with pytest.raises(PartitionTableError, match="outside the disk"):
        read_partitions(d)


def test_hostile_table_in_vhdx_info_is_a_warning_not_a_failure(tmp_path: Path) -> None:
    raw = tmp_path / "bad.raw"
    d = BufDisk(8 * MiB)
    _gpt(d, [_gentry(64, 127)])
    d.buf[512 + 40] ^= 1
    d.buf[d.size - 512 + 40] ^= 1
    raw.write_bytes(bytes(d.buf))
    top = raw_to_chain(raw, tmp_path)[0]
    p = subprocess.run([sys.executable, "-m", "vhdx", "info", "--json", str(top)], capture_output=True,
                       text=True, cwd=Path(__file__).resolve().parent.parent, check=False)
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert info["partitions"] == [] and any("GPT unusable" in w for w in info["warnings"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzzed_tables_give_partitions_or_partition_table_error(data: st.DataObject) -> None:
    """Random mutations of valid MBR/EBR/GPT sectors: a list within the disk or
    PartitionTableError, never anything else."""
    lss = data.draw(st.sampled_from([512, 4096]))
    d = BufDisk(4 * MiB, lss)
    if data.draw(st.booleans()):
        _gpt(d, [_gentry(64, 127), _gentry(200, 300)], count=data.draw(st.integers(0, 256)))
        hot = [(0, 512), (lss, lss + 92), (2 * lss, 2 * lss + 512), (d.size - lss, d.size - lss + 92)]
    else:
        d.put(0, _mbr(_entry(0x80, 0x83, 8, 100), _entry(0, 0x05, 200, 4000)))
        d.put(200 * lss, _mbr(_entry(0, 0x83, 2, 10), _entry(0, 0x05, 300, 50)))
        d.put(500 * lss, _mbr(_entry(0, 0x83, 2, 10)))
        hot = [(446, 512), (200 * lss + 446, 200 * lss + 512), (500 * lss + 446, 500 * lss + 512)]
    for _ in range(data.draw(st.integers(1, 12))):
        lo, hi = data.draw(st.sampled_from(hot))
        d.buf[data.draw(st.integers(lo, hi - 1))] = data.draw(st.integers(0, 255))
    try:
        parts = read_partitions(d, [])
    except PartitionTableError:
        return
    for p in parts:
        assert 0 <= p.offset and p.length > 0 and p.offset + p.length <= d.size
        assert p.to_dict()["number"] == p.number


@needs_sfdisk
def test_real_fixtures_agree_with_sfdisk_over_qemu_img(expected: dict, fixture_file, tmp_path: Path) -> None:
    """Every standalone fixture: our partitions equal sfdisk's reading of the raw disk
    that qemu-img (an independent VHDX reader) extracts."""
    if not have("qemu-img"):
        pytest.skip("qemu-img not installed")
    checked = 0
    for rel, info in sorted(expected["images"].items()):
        if info.get("has_parent") or info.get("log_replay_required"):
            continue  # no parent to read through; qemu-img refuses a pending log
        src = fixture_file(rel)
        raw = tmp_path / "disk.raw"
        sh("qemu-img", "convert", "-O", "raw", src, raw, timeout=300)
        try:
            with vhdx.open(src) as disk:
                parts = disk.partitions()
                assert not disk.warnings, (rel, disk.warnings)
            p = subprocess.run(["sfdisk", "--json", str(raw)], capture_output=True, text=True, check=False)
            if p.returncode or not p.stdout.strip():
                assert parts == [], (rel, parts)  # sfdisk sees no table either
            else:
                table = json.loads(p.stdout)["partitiontable"]
                assert _as_tool_rows(parts, table["sectorsize"]) == _sfdisk_rows(table), rel
                assert all(pt.scheme == ("gpt" if table["label"] == "gpt" else "mbr") for pt in parts)
            checked += 1
        finally:
            raw.unlink()
    assert checked
