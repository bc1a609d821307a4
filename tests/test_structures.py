"""Round trips of every construct declaration, real libvhdi fragments, CRC-32C."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhdx import crc
from vhdx import structures as s
from vhdx.errors import CorruptImageError, InvalidArgumentError

guids = st.uuids(version=None) | st.builds(lambda b: uuid.UUID(bytes_le=b), st.binary(min_size=16, max_size=16))
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, 0xFFFFFFFFFFFFFFFF)


# --- CRC-32C ---------------------------------------------------------------------
def test_crc32c_check_value() -> None:
    assert crc.crc32c(b"123456789") == 0xE3069283


def test_crc32c_is_not_zlib_crc32() -> None:
    import zlib

    assert crc.crc32c(b"123456789") != zlib.crc32(b"123456789")


@given(st.binary(min_size=8, max_size=300), st.data())
def test_checksum_ignores_stored_field(buf: bytes, data: st.DataObject) -> None:
    off = data.draw(st.integers(0, len(buf) - 4))
    a = bytearray(buf)
    crc.seal(a, off)
    assert crc.verify(a, off)
    assert crc.stored_checksum(a, off) == crc.checksum_of(buf, off)
    zeroed = bytes(a[:off]) + b"\0\0\0\0" + bytes(a[off + 4:])
    assert crc.checksum_of(a, off) == crc.crc32c(zeroed)
    # any other single-bit change breaks it
    pos = data.draw(st.integers(0, len(a) - 1).filter(lambda p: not off <= p < off + 4))
    a[pos] ^= 1 << data.draw(st.integers(0, 7))
    assert not crc.verify(a, off)


def test_crc_incremental_matches_whole() -> None:
    data = bytes(range(256)) * 17
    assert crc.crc32c(data[100:], crc.crc32c(data[:100])) == crc.crc32c(data)


# --- generic round trips ---------------------------------------------------------------
def _roundtrip(struct, value: dict) -> dict:
    raw = s.build(struct, value)
    parsed = struct.parse(raw)
    assert s.build(struct, parsed) == raw
    return parsed


@given(st.text(max_size=255).filter(lambda t: "\0" not in t))
def test_file_identifier(creator: str) -> None:
    raw = s.build(s.FileIdentifier, dict(creator=creator))
    assert len(raw) == 520 and raw[:8] == b"vhdxfile"
    assert s.FileIdentifier.parse(raw).creator == creator


@given(u64, guids, guids, guids, u16, u16, u32, u64)
def test_header(seq, fwg, dwg, lg, lv, ver, ll, lo) -> None:
    p = _roundtrip(s.Header, dict(checksum=0, sequence_number=seq, file_write_guid=fwg,
                                  data_write_guid=dwg, log_guid=lg, log_version=lv, version=ver,
                                  log_length=ll, log_offset=lo))
    assert (p.sequence_number, p.file_write_guid, p.data_write_guid, p.log_guid) == (seq, fwg, dwg, lg)
    raw = s.build(s.Header, p)
    assert len(raw) == 4096 and raw[:4] == b"head"
    assert raw[32:48] == dwg.bytes_le  # mixed-endian GUID on disk


@given(st.lists(st.tuples(guids, u64, u32, u32), max_size=20))
def test_region_table(entries) -> None:
    p = _roundtrip(s.RegionTable, dict(
        header=dict(checksum=0, entry_count=len(entries), reserved=0),
        entries=[dict(guid=g, file_offset=o, length=n, required=r) for g, o, n, r in entries]))
    assert [(e.guid, e.file_offset, e.length, e.required) for e in p.entries] == entries


def test_region_table_entry_count_limit() -> None:
    raw = s.build(s.RegionTableHeader, dict(checksum=0, entry_count=2048, reserved=0))
    with pytest.raises(CorruptImageError) as info:
        s.parse(s.RegionTable, raw.ljust(65536, b"\0"), "region table")
    assert type(info.value) is CorruptImageError


@given(st.lists(st.tuples(guids, u32, u32, u32), max_size=20))
def test_metadata_table(entries) -> None:
    p = _roundtrip(s.MetadataTable, dict(
        header=dict(reserved=0, entry_count=len(entries)),
        entries=[dict(item_id=g, offset=o, length=n, flags=f, reserved=0) for g, o, n, f in entries]))
    assert [(e.item_id, e.offset, e.length, e.flags) for e in p.entries] == entries


def test_metadata_table_entry_count_limit() -> None:
    raw = s.build(s.MetadataTableHeader, dict(reserved=0, entry_count=2048))
    with pytest.raises(CorruptImageError) as info:
        s.parse(s.MetadataTable, raw.ljust(65536, b"\0"), "metadata table")
    assert type(info.value) is CorruptImageError


@given(u32, u32, st.integers(1, s.MAX_VIRTUAL_SIZE), guids, st.sampled_from([512, 4096]))
def test_system_items(bs, flags, size, disk_id, sector) -> None:
    assert _roundtrip(s.FileParameters, dict(block_size=bs, flags=flags)) == dict(block_size=bs, flags=flags)
    assert s.VirtualDiskSize.parse(s.build(s.VirtualDiskSize, dict(virtual_disk_size=size))).virtual_disk_size == size
    assert s.VirtualDiskId.parse(s.build(s.VirtualDiskId, dict(virtual_disk_id=disk_id))).virtual_disk_id == disk_id
    assert len(s.build(s.LogicalSectorSize, dict(logical_sector_size=sector))) == 4
    assert len(s.build(s.PhysicalSectorSize, dict(physical_sector_size=sector))) == 4
    for g, st_ in s.SYSTEM_ITEM_STRUCTS.items():
        assert g in s.SYSTEM_ITEM_NAMES and st_.sizeof() in (4, 8, 16)


@given(st.dictionaries(st.text(min_size=1, max_size=20).filter(lambda t: "\0" not in t),
                       st.text(min_size=1, max_size=60).filter(lambda t: "\0" not in t),
                       min_size=1, max_size=6))
def test_parent_locator(pairs: dict[str, str]) -> None:
    raw = s.build_parent_locator(pairs)
    p = s.ParentLocator.parse(raw)
    assert p.header.locator_type == s.VHDX_PARENT_LOCATOR_TYPE
    assert p.header.key_value_count == len(pairs)
    got = {}
    for e in p.entries:
        assert e.key_offset >= 20 + 12 * len(pairs)
        got[raw[e.key_offset:e.key_offset + e.key_length].decode("utf-16-le")] = \
            raw[e.value_offset:e.value_offset + e.value_length].decode("utf-16-le")
    assert got == pairs


def test_parent_locator_rejects_empty_value() -> None:
    with pytest.raises(InvalidArgumentError) as info:  # a caller's mistake; also a ValueError
        s.build_parent_locator({"relative_path": ""})
    assert type(info.value) is InvalidArgumentError and isinstance(info.value, ValueError)


@given(st.sampled_from(sorted(s.PAYLOAD_STATE_NAMES)), st.integers(0, (1 << 44) - 1))
def test_bat_entry_bitstruct_matches_integer_encoding(state: int, mb: int) -> None:
    raw_int = s.bat_entry(state, mb << 20)
    raw = raw_int.to_bytes(8, "little")
    p = s.BatEntry.parse(raw)
    assert (p.state, p.file_offset_mb, p.reserved) == (state, mb, 0)
    assert s.BatEntry.build(dict(state=state, file_offset_mb=mb, reserved=0)) == raw
    assert s.BatEntryRaw.parse(raw) == raw_int
    assert raw_int & s.BAT_STATE_MASK == state and raw_int & s.BAT_OFFSET_MASK == mb << 20


def test_bat_entry_known_value() -> None:
    # FORMAT.md §5.1: FULLY_PRESENT at 8 MiB
    assert s.bat_entry(s.PAYLOAD_BLOCK_FULLY_PRESENT, 8 * s.MiB) == 0x800006


@given(u32, u32, u64, u32, guids, u64, u64)
def test_log_structures(length, tail, seq, count, guid, flushed, last) -> None:
    p = _roundtrip(s.LogEntryHeader, dict(checksum=0, entry_length=length, tail=tail, sequence_number=seq,
                                          descriptor_count=count, reserved=0, log_guid=guid,
                                          flushed_file_offset=flushed, last_file_offset=last))
    assert p.log_guid == guid and p.sequence_number == seq
    z = _roundtrip(s.ZeroDescriptor, dict(reserved=0, zero_length=flushed, file_offset=last, sequence_number=seq))
    assert z.zero_length == flushed
    d = _roundtrip(s.DataDescriptor, dict(trailing_bytes=b"abcd", leading_bytes=b"01234567",
                                          file_offset=last, sequence_number=seq))
    assert d.leading_bytes == b"01234567"
    sec = _roundtrip(s.DataSector, dict(sequence_high=seq >> 32, data=bytes(4084), sequence_low=seq & 0xFFFFFFFF))
    assert (sec.sequence_high << 32) | sec.sequence_low == seq


@pytest.mark.parametrize("struct,size", [(s.Header, 4096), (s.LogEntryHeader, 64), (s.ZeroDescriptor, 32),
                                         (s.DataDescriptor, 32), (s.DataSector, 4096),
                                         (s.RegionTableHeader, 16), (s.RegionTableEntry, 32),
                                         (s.MetadataTableHeader, 32), (s.MetadataTableEntry, 32),
                                         (s.ParentLocatorHeader, 20), (s.ParentLocatorEntry, 12)])
def test_sizes(struct, size: int) -> None:
    assert struct.sizeof() == size


@pytest.mark.parametrize("struct,sig", [(s.Header, b"head"), (s.LogEntryHeader, b"loge"),
                                        (s.ZeroDescriptor, b"zero"), (s.DataDescriptor, b"desc"),
                                        (s.DataSector, b"data"), (s.FileIdentifier, b"vhdxfile"),
                                        (s.RegionTable, b"regi"), (s.MetadataTable, b"metadata")])
def test_bad_signature_is_corrupt_image_error(struct, sig: bytes) -> None:
    raw = bytearray(70000)
    raw[:len(sig)] = sig
    s.parse(struct, raw, "x")  # the right signature parses
    raw[0] ^= 0x20
    with pytest.raises(CorruptImageError) as info:
        s.parse(struct, raw, "x")
    assert type(info.value) is CorruptImageError


def test_truncated_input_is_corrupt_image_error() -> None:
    with pytest.raises(CorruptImageError) as info:
        s.parse(s.Header, b"head" + bytes(100), "header")
    assert type(info.value) is CorruptImageError


def test_guid_byte_order() -> None:
    # FORMAT.md §0: the BAT region GUID's on-disk bytes
    assert s.BAT_REGION_GUID.bytes_le == bytes.fromhex("6677C22D23F600429D64115E9BFD4A08")
    assert s.METADATA_REGION_GUID.bytes_le == bytes.fromhex("06A27C8B90479A4BB8FE575F050F886E")


# --- libvhdi's real fragments (SOURCES.md §5) -------------------------------------------
FRAGMENT_SHA256 = {
    "file_identifier.1": "1c949b29cb1d8d3e786e9d24fbc9b862dc8fe9569fd58dd62348119a842e6276",
    "image_header.1": "d0e8c1bbdbb28c001548bd9fec5832167309d4a9d878c0304aef3cbe56a51bad",
    "region_table.1": "aeb53f908ab7403d893734efc2c0a9a39ea6bafd65f977f2dddd19bbbf01de5c",
    "region_table_header.1": "524a8ba1d553f4de8849d1c415ebf3272c832d47443c3960601ed65d4230aa46",
    "region_table_entry.1": "66db6dc02ddea341588f68c5eb9c03f585d2477e5ea26891ef9b6b4bad3444e1",
    "metadata_table_header.1": "596924effd737ab26c0984731fbb4e37a365c1e31efe994aaf813100a5bbf046",
    "metadata_table_entry.1": "6b8b46061c0f808326ac9b550c1bcc118151c5a623eee67a29c995c7636b22da",
    "parent_locator_header.1": "ce6f7b42d28a78f7311670ecbbb6743acc60f821587f3222bde37390ea830a3f",
    "parent_locator_entry.1": "94c04526a5a20381e741925fa7eb211e7042e813027273ea802ecc806a0961e3",
}


@pytest.fixture
def fragment(shared_dir: Path):
    def get(name: str) -> bytes:
        p = shared_dir / "fixtures" / "libvhdi-structs" / name
        if not p.is_file():
            pytest.skip(f"{name} missing")
        raw = p.read_bytes()
        assert hashlib.sha256(raw).hexdigest() == FRAGMENT_SHA256[name]
        return raw
    return get


def test_fragment_file_identifier(fragment) -> None:
    raw = fragment("file_identifier.1")
    p = s.FileIdentifier.parse(raw)
    assert p.creator == "Microsoft Windows 10.0.19041.0"
    assert s.build(s.FileIdentifier, p) == raw


def test_fragment_image_header(fragment) -> None:
    raw = fragment("image_header.1")
    assert crc.verify(raw)
    p = s.Header.parse(raw)
    assert p.sequence_number == 6 and p.log_guid == s.ZERO_GUID and p.version == 1 and p.log_version == 0
    assert (p.log_offset, p.log_length) == (s.MiB, s.MiB)
    assert s.build(s.Header, p) == raw


def test_fragment_region_table(fragment) -> None:
    raw = fragment("region_table.1")
    p = s.RegionTable.parse(raw)
    got = {e.guid: (e.file_offset, e.length, e.required) for e in p.entries}
    assert got == {s.BAT_REGION_GUID: (3 * s.MiB, s.MiB, 1), s.METADATA_REGION_GUID: (2 * s.MiB, s.MiB, 1)}
    assert s.build(s.RegionTable, p) == raw
    hdr = fragment("region_table_header.1")
    assert hdr == raw[:16] and s.build(s.RegionTableHeader, s.RegionTableHeader.parse(hdr)) == hdr
    ent = fragment("region_table_entry.1")
    pe = s.RegionTableEntry.parse(ent)
    assert pe.guid == s.BAT_REGION_GUID and s.build(s.RegionTableEntry, pe) == ent


def test_fragment_metadata(fragment) -> None:
    hdr = fragment("metadata_table_header.1")
    ph = s.MetadataTableHeader.parse(hdr)
    assert ph.entry_count == 5 and s.build(s.MetadataTableHeader, ph) == hdr
    ent = fragment("metadata_table_entry.1")
    pe = s.MetadataTableEntry.parse(ent)
    assert (pe.item_id, pe.offset, pe.length, pe.flags) == (s.FILE_PARAMETERS_GUID, 0x10000, 8, s.MD_IS_REQUIRED)
    assert s.build(s.MetadataTableEntry, pe) == ent


def test_fragment_parent_locator(fragment) -> None:
    hdr = fragment("parent_locator_header.1")
    ph = s.ParentLocatorHeader.parse(hdr)
    assert ph.locator_type == s.VHDX_PARENT_LOCATOR_TYPE and ph.key_value_count == 5
    assert s.build(s.ParentLocatorHeader, ph) == hdr
    ent = fragment("parent_locator_entry.1")
    pe = s.ParentLocatorEntry.parse(ent)
    assert (pe.key_offset, pe.key_length, pe.value_offset, pe.value_length) == (80, 28, 108, 76)
    assert s.build(s.ParentLocatorEntry, pe) == ent


# --- layout.py output parses with the same declarations ---------------------------------
@settings(max_examples=25, deadline=None)
@given(st.integers(1, 1 << 20).map(lambda n: n * 4096), st.sampled_from([1, 2, 32, 256]).map(lambda m: m * s.MiB),
       st.sampled_from([512, 4096]), st.booleans())
def test_layout_structures_parse(vsize: int, bs: int, lss: int, diff: bool) -> None:
    from vhdx import layout

    parent = layout.ParentInfo(uuid.uuid4(), relative_path=".\\p.vhdx") if diff else None
    plan = layout.plan_layout(vsize, bs, lss, parent=parent)
    h = layout.build_header(2, plan.file_write_guid, plan.data_write_guid)
    assert crc.verify(h) and s.Header.parse(h).data_write_guid == plan.data_write_guid
    rt = layout.build_region_table([(s.BAT_REGION_GUID, plan.bat_offset, plan.bat_length, True)])
    assert len(rt) == 65536 and crc.verify(rt)
    md = layout.build_metadata_region(plan)
    t = s.MetadataTable.parse(md)
    assert t.header.entry_count == (6 if diff else 5)
    items = {e.item_id: md[e.offset:e.offset + e.length] for e in t.entries}
    assert all(e.offset >= 65536 for e in t.entries)
    assert s.FileParameters.parse(items[s.FILE_PARAMETERS_GUID]).block_size == bs
    assert s.VirtualDiskSize.parse(items[s.VIRTUAL_DISK_SIZE_GUID]).virtual_disk_size == vsize
    assert s.LogicalSectorSize.parse(items[s.LOGICAL_SECTOR_SIZE_GUID]).logical_sector_size == lss
    assert (s.PARENT_LOCATOR_GUID in items) == diff
