"""Fresh images from vhdx.layout: structure, limits, and acceptance by peer readers."""

from __future__ import annotations

import io
import os
import uuid
from pathlib import Path

import pytest

import oracles
from vhdx import crc
from vhdx import structures as s
from vhdx.errors import InvalidArgumentError
from vhdx.layout import ParentInfo, build_bat, plan_layout, write_new_image

MiB = s.MiB

# (virtual_size, block_size, lss, pss, fixed)
COMBOS = [
    (64 * MiB, None, 512, 4096, False),
    (10 * MiB, 2 * MiB, 512, 4096, True),
    (5 * MiB + 4096, 1 * MiB, 4096, 4096, False),
    (3 * MiB + 512, 1 * MiB, 512, 512, True),
    (100 * MiB, 32 * MiB, 512, 4096, True),
    (7 * MiB, 256 * MiB, 512, 512, False),
    (33 * MiB, 8 * MiB, 4096, 512, True),
    (4096, 1 * MiB, 4096, 4096, False),
    (512, 1 * MiB, 512, 512, True),
]


def _read_u64s(path: Path, off: int, n: int) -> list[int]:
    with open(path, "rb") as fh:
        fh.seek(off)
        raw = fh.read(8 * n)
    return [int.from_bytes(raw[i:i + 8], "little") for i in range(0, len(raw), 8)]


def _make(tmp_path: Path, combo, name: str = "d.vhdx") -> tuple[Path, object]:
    vs, bs, lss, pss, fixed = combo
    plan = plan_layout(vs, bs, lss, pss, fixed, creator="test_layout")
    p = tmp_path / name
    write_new_image(p, plan)
    return p, plan


@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}-{c[3]}-{'fixed' if c[4] else 'dyn'}")
def test_structure(tmp_path: Path, combo) -> None:
    p, plan = _make(tmp_path, combo)
    raw = p.read_bytes()
    assert len(raw) == plan.file_size == os.path.getsize(p)
    assert raw[:8] == b"vhdxfile"
    assert s.FileIdentifier.parse(raw[:520]).creator == "test_layout"
    # headers: seq 1 and 2, identical otherwise, CRC valid, log empty
    hs = []
    for off in s.HEADER_OFFSETS:
        h = raw[off:off + 4096]
        assert crc.verify(h)
        hs.append(s.Header.parse(h))
    assert [h.sequence_number for h in hs] == [1, 2]
    for h in hs:
        assert h.log_guid == s.ZERO_GUID and h.log_version == 0 and h.version == 1
        assert (h.log_offset, h.log_length) == (MiB, MiB)
        assert h.data_write_guid == plan.data_write_guid != s.ZERO_GUID
        assert h.file_write_guid == plan.file_write_guid != s.ZERO_GUID
    # both region tables identical, valid, required
    rts = [raw[off:off + 65536] for off in s.REGION_TABLE_OFFSETS]
    assert rts[0] == rts[1] and crc.verify(rts[0])
    rt = s.RegionTable.parse(rts[0])
    regions = {e.guid: (e.file_offset, e.length, e.required) for e in rt.entries}
    assert regions[s.METADATA_REGION_GUID] == (2 * MiB, MiB, 1)
    bat_off, bat_len, req = regions[s.BAT_REGION_GUID]
    assert (bat_off, req) == (3 * MiB, 1) and bat_len % MiB == 0 and bat_len >= plan.bat_entry_count * 8
    # everything 1 MiB aligned, non-overlapping, payload after the BAT
    spans = sorted([(MiB, MiB), (2 * MiB, MiB), (bat_off, bat_len)])
    for (a, la), (b, _) in zip(spans, spans[1:]):
        assert a % MiB == 0 and a + la <= b
    assert plan.payload_offset == bat_off + bat_len
    # log region zero
    assert not any(raw[MiB:2 * MiB])
    # metadata flags per FORMAT.md §4.1, items from 64 KiB
    md = raw[2 * MiB:3 * MiB]
    t = s.MetadataTable.parse(md)
    flags = {e.item_id: e.flags for e in t.entries}
    assert flags == {s.FILE_PARAMETERS_GUID: 4, s.VIRTUAL_DISK_SIZE_GUID: 6, s.VIRTUAL_DISK_ID_GUID: 6,
                     s.LOGICAL_SECTOR_SIZE_GUID: 6, s.PHYSICAL_SECTOR_SIZE_GUID: 6}
    assert min(e.offset for e in t.entries) == 65536
    item = {e.item_id: md[e.offset:e.offset + e.length] for e in t.entries}
    fp = s.FileParameters.parse(item[s.FILE_PARAMETERS_GUID])
    vs, bs, lss, pss, fixed = combo
    assert fp.block_size == (bs or 32 * MiB) and fp.flags == (1 if fixed else 0)
    assert s.PhysicalSectorSize.parse(item[s.PHYSICAL_SECTOR_SIZE_GUID]).physical_sector_size == pss
    # BAT: fixed -> every payload entry FULLY_PRESENT, contiguous; dynamic -> zeros
    ents = _read_u64s(p, bat_off, bat_len // 8)
    cr = plan.chunk_ratio
    pay = [ents[b + b // cr] for b in range(plan.payload_blocks)]
    if fixed:
        assert pay == [plan.payload_offset + b * plan.block_size | 6 for b in range(plan.payload_blocks)]
        assert sum(1 for e in ents if e) == plan.payload_blocks
        assert plan.file_size == plan.payload_offset + plan.payload_blocks * plan.block_size
    else:
        assert not any(ents)
    assert build_bat(plan) == raw[bat_off:bat_off + bat_len]


def test_bat_entry_counts() -> None:
    # FORMAT.md §9: 10 GiB, 32 MiB blocks
    assert plan_layout(10 << 30, 32 * MiB).bat_entry_count == 322
    assert plan_layout(10 << 30, 32 * MiB, 4096).bat_entry_count == 320
    par = ParentInfo(uuid.uuid4(), relative_path=".\\p.vhdx")
    assert plan_layout(10 << 30, 32 * MiB, 512, parent=par).bat_entry_count == 387
    assert plan_layout(10 << 30, 32 * MiB, 4096, parent=par).bat_entry_count == 1025
    assert plan_layout(8 << 30, 2 * MiB, 512, parent=par).bat_entry_count == 4098  # HV differencing.avhdx
    # maximum size stays addressable
    big = plan_layout(s.MAX_VIRTUAL_SIZE, 1 * MiB, 512, parent=par)
    assert big.bat_length % MiB == 0 and big.bat_length >= big.bat_entry_count * 8


def test_defaults() -> None:
    assert plan_layout(MiB).block_size == 32 * MiB
    par = ParentInfo(uuid.uuid4(), relative_path=".\\p.vhdx")
    assert plan_layout(MiB, parent=par).block_size == 2 * MiB
    a, b = plan_layout(MiB), plan_layout(MiB)
    assert len({a.data_write_guid, b.data_write_guid, a.file_write_guid, b.file_write_guid,
                a.virtual_disk_id, b.virtual_disk_id}) == 6


def test_deterministic_guids(tmp_path: Path) -> None:
    g = [uuid.UUID(int=i + 1) for i in range(3)]
    for name in ("a", "b"):
        plan = plan_layout(4 * MiB, MiB, file_write_guid=g[0], data_write_guid=g[1], virtual_disk_id=g[2])
        write_new_image(tmp_path / name, plan)
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()


@pytest.mark.parametrize("kwargs", [
    dict(virtual_size=0), dict(virtual_size=-512), dict(virtual_size=1000),
    dict(virtual_size=512, logical_sector_size=4096), dict(virtual_size=s.MAX_VIRTUAL_SIZE + 4096),
    dict(virtual_size=MiB, block_size=3 * MiB), dict(virtual_size=MiB, block_size=512 * 1024),
    dict(virtual_size=MiB, block_size=512 * MiB), dict(virtual_size=MiB, logical_sector_size=1024),
    dict(virtual_size=MiB, physical_sector_size=2048), dict(virtual_size=MiB, creator="x" * 257),
    dict(virtual_size=MiB, fixed=True, parent=ParentInfo(uuid.uuid4(), relative_path="p")),
    dict(virtual_size=MiB, parent=ParentInfo(uuid.uuid4())),
    dict(virtual_size=MiB, parent=ParentInfo(s.ZERO_GUID, relative_path="p")),
    dict(virtual_size=1.5 * MiB),
])
def test_invalid_arguments(kwargs: dict) -> None:
    with pytest.raises(InvalidArgumentError):
        plan_layout(**kwargs)


def test_limits_accepted() -> None:
    plan_layout(s.MAX_VIRTUAL_SIZE, 256 * MiB, 4096, fixed=False)
    plan_layout(512, MiB)


def test_write_to_file_object(tmp_path: Path) -> None:
    plan = plan_layout(3 * MiB, MiB, fixed=True)
    buf = io.BytesIO(b"junk" * 1000000)
    write_new_image(buf, plan)
    p = tmp_path / "x.vhdx"
    write_new_image(p, plan)
    assert buf.getvalue() == p.read_bytes()


def test_differencing_layout(tmp_path: Path) -> None:
    base = plan_layout(8 * MiB, MiB)
    write_new_image(tmp_path / "base.vhdx", base)
    par = ParentInfo(base.data_write_guid, relative_path=".\\base.vhdx",
                     absolute_win32_path="\\\\?\\C:\\x\\base.vhdx", volume_path="\\\\?\\Volume{1}\\base.vhdx")
    child = plan_layout(8 * MiB, parent=par)
    write_new_image(tmp_path / "child.avhdx", child)
    raw = (tmp_path / "child.avhdx").read_bytes()
    md = raw[2 * MiB:3 * MiB]
    t = s.MetadataTable.parse(md)
    ent = {e.item_id: e for e in t.entries}
    assert ent[s.PARENT_LOCATOR_GUID].flags == s.MD_IS_REQUIRED
    fp = s.FileParameters.parse(md[ent[s.FILE_PARAMETERS_GUID].offset:][:8])
    assert fp.flags == s.FP_HAS_PARENT
    e = ent[s.PARENT_LOCATOR_GUID]
    loc = md[e.offset:e.offset + e.length]
    pl = s.ParentLocator.parse(loc)
    kv = {loc[x.key_offset:x.key_offset + x.key_length].decode("utf-16-le"):
          loc[x.value_offset:x.value_offset + x.value_length].decode("utf-16-le") for x in pl.entries}
    assert kv == {"parent_linkage": "{%s}" % base.data_write_guid, "relative_path": ".\\base.vhdx",
                  "absolute_win32_path": "\\\\?\\C:\\x\\base.vhdx", "volume_path": "\\\\?\\Volume{1}\\base.vhdx"}
    # items do not overlap
    spans = sorted((x.offset, x.offset + x.length) for x in t.entries)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    # peers: dissect reads zeros over a zero base. (libvhdi is not asked: with SB entries
    # NOT_PRESENT it reads the file header as a sector bitmap, see the report.)
    oracles.require_dissect()
    assert oracles.dissect_bytes([tmp_path / "child.avhdx", tmp_path / "base.vhdx"]) == bytes(8 * MiB)


@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}-{'fixed' if c[4] else 'dyn'}")
def test_peers_read_zeros(tmp_path: Path, combo) -> None:
    p, plan = _make(tmp_path, combo)
    zeros = bytes(plan.virtual_size)
    if oracles.have_libvhdi():
        assert oracles.libvhdi_size(p) == plan.virtual_size
        assert oracles.libvhdi_bytes([p]) == zeros
    if oracles.have_dissect():
        assert oracles.dissect_bytes([p]) == zeros
    if oracles.have_qemu() and plan.logical_sector_size == 512:  # qemu: 4 KiB sectors unsupported
        r = oracles.qemu_check(p)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "No errors" in r.stdout
        assert oracles.qemu_info(p)["virtual-size"] == plan.virtual_size
        assert oracles.qemu_raw_bytes(p) == zeros


@pytest.mark.parametrize("size", [10 << 30, 2 << 40])
def test_large_sparse_dynamic(tmp_path: Path, size: int) -> None:
    p, plan = _make(tmp_path, (size, MiB, 512, 4096, False))
    assert os.path.getsize(p) < 64 * MiB
    if oracles.have_qemu():
        r = oracles.qemu_check(p)
        assert r.returncode == 0, r.stderr
        assert oracles.qemu_info(p)["virtual-size"] == size
    if oracles.have_libvhdi():
        assert oracles.libvhdi_size(p) == size


def test_reader_sees_fresh_images(tmp_path: Path, vhdx_mod) -> None:
    for i, combo in enumerate(COMBOS):
        p, plan = _make(tmp_path, combo, f"r{i}.vhdx")
        with vhdx_mod.open(p) as disk:
            assert disk.size == plan.virtual_size
            assert disk.block_size == plan.block_size
            assert disk.logical_sector_size == plan.logical_sector_size
            assert disk.physical_sector_size == plan.physical_sector_size
            assert disk.data_write_guid == plan.data_write_guid
            assert disk.virtual_disk_id == plan.virtual_disk_id
            assert disk.parent_locator is None
            assert disk.read_at(0, disk.size) == bytes(plan.virtual_size)
            kinds = {e.kind for e in disk.extents()}
            assert kinds == ({"data"} if plan.fixed else {"unallocated"})
            assert sum(e.length for e in disk.extents()) == plan.virtual_size
