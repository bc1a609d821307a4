"""Layout of a brand-new VHDX / AVHDX file (FORMAT.md §1, §2, §3, §4, §5).

Everything is built from the :mod:`vhdx.structures` declarations; this module
holds no I/O policy beyond "write a fresh file". The layout mimics Hyper-V
(FORMAT.md §1.2): log 1 MiB @ 1 MiB, metadata region 1 MiB @ 2 MiB, BAT @ 3 MiB
(rounded up to 1 MiB), payload blocks after the BAT, everything 1 MiB aligned.

Typical use::

    plan = plan_layout(virtual_size=64 * MiB)
    write_new_image("disk.vhdx", plan)

Defaults: ``block_size`` is 32 MiB for fixed/dynamic disks (Hyper-V's default)
and 2 MiB for differencing disks (what Hyper-V uses for checkpoints, FORMAT.md §2 of
SOURCES.md: the HV ``differencing.avhdx`` fixture has 2 MiB blocks).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from . import structures as s
from .bat import Geometry
from .crc import seal
from .errors import InvalidArgumentError

__all__ = [
    "ParentInfo",
    "LayoutPlan",
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_DIFF_BLOCK_SIZE",
    "DEFAULT_CREATOR",
    "plan_layout",
    "write_new_image",
    "build_file_identifier",
    "build_header",
    "build_region_table",
    "build_metadata_region",
    "build_bat",
    "metadata_items",
]

DEFAULT_BLOCK_SIZE = 32 * s.MiB
DEFAULT_DIFF_BLOCK_SIZE = 2 * s.MiB
DEFAULT_CREATOR = "vhdx (python)"

LOG_OFFSET = 1 * s.MiB
LOG_LENGTH = 1 * s.MiB
METADATA_OFFSET = 2 * s.MiB
METADATA_LENGTH = 1 * s.MiB
BAT_OFFSET = 3 * s.MiB
METADATA_ITEMS_START = 64 * s.KiB  # items are packed from here, like Hyper-V


# --- BAT geometry (vhdx.bat owns the formulas, FORMAT.md §5.3) -----------------------
def _geometry(virtual_size: int, block_size: int, logical_sector_size: int,
              differencing: bool) -> Geometry:
    return Geometry(virtual_size, block_size, logical_sector_size, differencing)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _align_up(n: int, a: int = s.ALIGNMENT) -> int:
    return _ceil_div(n, a) * a


# --- plan ---------------------------------------------------------------------
@dataclass(frozen=True)
class ParentInfo:
    """What a differencing file records about its parent (FORMAT.md §4.2).

    ``data_write_guid`` is the parent's current-header DataWriteGuid; it becomes
    the child's ``parent_linkage``. At least one path must be given.
    """

    data_write_guid: uuid.UUID
    relative_path: str | None = None
    absolute_win32_path: str | None = None
    volume_path: str | None = None
    parent_linkage2: uuid.UUID | None = None

    def locator_pairs(self) -> dict[str, str]:
        """Key/value pairs of the parent locator item, in Hyper-V's key order."""
        pairs = {"parent_linkage": "{%s}" % self.data_write_guid}
        if self.parent_linkage2 is not None:
            pairs["parent_linkage2"] = "{%s}" % self.parent_linkage2
        if self.relative_path:
            pairs["relative_path"] = self.relative_path
        if self.volume_path:
            pairs["volume_path"] = self.volume_path
        if self.absolute_win32_path:
            pairs["absolute_win32_path"] = self.absolute_win32_path
        return pairs


@dataclass(frozen=True)
class LayoutPlan:
    """Every offset and length of a new file, plus the identity GUIDs.

    All offsets are absolute file offsets in bytes. ``payload_offset`` is the first
    free 1 MiB-aligned byte after the regions (where the first payload block of a
    dynamic/differencing disk goes). ``file_size`` is the size of the initial file
    (for a fixed disk it includes every payload block).
    """

    virtual_size: int
    block_size: int
    logical_sector_size: int
    physical_sector_size: int
    fixed: bool
    parent: ParentInfo | None
    creator: str
    file_write_guid: uuid.UUID
    data_write_guid: uuid.UUID
    virtual_disk_id: uuid.UUID
    log_offset: int
    log_length: int
    metadata_offset: int
    metadata_length: int
    bat_offset: int
    bat_length: int
    chunk_ratio: int
    payload_blocks: int
    sector_bitmap_blocks: int
    bat_entry_count: int
    payload_offset: int
    file_size: int
    metadata_item_offsets: dict[str, tuple[int, int]] = field(default_factory=dict)
    """name -> (offset relative to the metadata region, length)."""

    @property
    def differencing(self) -> bool:
        return self.parent is not None

    @property
    def geometry(self) -> Geometry:
        """BAT geometry (:class:`vhdx.bat.Geometry`) of this file."""
        return _geometry(self.virtual_size, self.block_size, self.logical_sector_size,
                         self.differencing)

    def fixed_block_offset(self, block: int) -> int:
        """File offset of payload block ``block`` of a fixed disk (contiguous)."""
        return self.payload_offset + block * self.block_size


def _check_args(virtual_size: int, block_size: int, lss: int, pss: int, fixed: bool,
                parent: ParentInfo | None, creator: str) -> None:
    def bad(msg: str) -> InvalidArgumentError:
        return InvalidArgumentError(msg)

    for name, v in (("virtual_size", virtual_size), ("block_size", block_size),
                    ("logical_sector_size", lss), ("physical_sector_size", pss)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise bad(f"{name} must be an int, not {type(v).__name__}")
    if lss not in s.SECTOR_SIZES:
        raise bad(f"logical_sector_size must be 512 or 4096, not {lss}")
    if pss not in s.SECTOR_SIZES:
        raise bad(f"physical_sector_size must be 512 or 4096, not {pss}")
    if virtual_size <= 0:
        raise bad(f"virtual_size must be > 0, not {virtual_size}")
    if virtual_size % lss:
        raise bad(f"virtual_size {virtual_size} is not a multiple of the logical sector size {lss}")
    if virtual_size > s.MAX_VIRTUAL_SIZE:
        raise bad(f"virtual_size {virtual_size} exceeds the 64 TiB maximum")
    if not (s.MIN_BLOCK_SIZE <= block_size <= s.MAX_BLOCK_SIZE) or block_size & (block_size - 1):
        raise bad(f"block_size must be a power of two from 1 MiB to 256 MiB, not {block_size}")
    if fixed and parent is not None:
        raise bad("a differencing disk cannot be fixed")
    if parent is not None:
        if not isinstance(parent.data_write_guid, uuid.UUID):
            raise bad("parent.data_write_guid must be a uuid.UUID")
        if parent.data_write_guid == s.ZERO_GUID:
            raise bad("parent.data_write_guid must not be the zero GUID")
        if not (parent.relative_path or parent.absolute_win32_path or parent.volume_path):
            raise bad("the parent locator needs at least one path")
    if len(creator.encode("utf-16-le")) > 512:
        raise bad("creator is longer than 256 UTF-16 code units")


def plan_layout(
    virtual_size: int,
    block_size: int | None = None,
    logical_sector_size: int = 512,
    physical_sector_size: int = 4096,
    fixed: bool = False,
    parent: ParentInfo | None = None,
    creator: str = DEFAULT_CREATOR,
    *,
    file_write_guid: uuid.UUID | None = None,
    data_write_guid: uuid.UUID | None = None,
    virtual_disk_id: uuid.UUID | None = None,
) -> LayoutPlan:
    """Compute the layout of a new file; raises InvalidArgumentError on bad limits.

    ``block_size=None`` picks :data:`DEFAULT_BLOCK_SIZE` (32 MiB), or
    :data:`DEFAULT_DIFF_BLOCK_SIZE` (2 MiB) when ``parent`` is given. GUIDs default
    to fresh random values (pass them for deterministic output). A differencing
    child usually shares its parent's ``virtual_disk_id`` (FORMAT.md §8.3 "Forking").
    """
    if block_size is None:
        block_size = DEFAULT_DIFF_BLOCK_SIZE if parent is not None else DEFAULT_BLOCK_SIZE
    _check_args(virtual_size, block_size, logical_sector_size, physical_sector_size,
                fixed, parent, creator)
    geo = _geometry(virtual_size, block_size, logical_sector_size, parent is not None)
    cr = geo.chunk_ratio
    payload_blocks = geo.payload_blocks
    sb_blocks = geo.sector_bitmap_blocks
    entries = geo.total_entries
    bat_length = _align_up(entries * 8)
    payload_offset = BAT_OFFSET + bat_length
    file_size = payload_offset + (payload_blocks * block_size if fixed else 0)
    items = _item_layout(parent)
    return LayoutPlan(
        virtual_size=virtual_size,
        block_size=block_size,
        logical_sector_size=logical_sector_size,
        physical_sector_size=physical_sector_size,
        fixed=fixed,
        parent=parent,
        creator=creator,
        file_write_guid=file_write_guid or uuid.uuid4(),
        data_write_guid=data_write_guid or uuid.uuid4(),
        virtual_disk_id=virtual_disk_id or uuid.uuid4(),
        log_offset=LOG_OFFSET,
        log_length=LOG_LENGTH,
        metadata_offset=METADATA_OFFSET,
        metadata_length=METADATA_LENGTH,
        bat_offset=BAT_OFFSET,
        bat_length=bat_length,
        chunk_ratio=cr,
        payload_blocks=payload_blocks,
        sector_bitmap_blocks=sb_blocks,
        bat_entry_count=entries,
        payload_offset=payload_offset,
        file_size=file_size,
        metadata_item_offsets=items,
    )


def _item_layout(parent: ParentInfo | None) -> dict[str, tuple[int, int]]:
    """Hyper-V packing (SOURCES.md §4): +0 file parameters, +8 virtual size,
    +0x10 logical sector, +0x14 physical sector, +0x18 disk id, +0x28 locator."""
    base = METADATA_ITEMS_START
    out = {
        "file_parameters": (base + 0x00, 8),
        "virtual_disk_size": (base + 0x08, 8),
        "logical_sector_size": (base + 0x10, 4),
        "physical_sector_size": (base + 0x14, 4),
        "virtual_disk_id": (base + 0x18, 16),
    }
    if parent is not None:
        out["parent_locator"] = (base + 0x28, len(s.build_parent_locator(parent.locator_pairs())))
    return out


# --- structure builders ---------------------------------------------------------
def build_file_identifier(creator: str) -> bytes:
    """The 64 KiB file identifier slot (FORMAT.md §1.1)."""
    raw = s.build(s.FileIdentifier, dict(creator=creator))
    return raw.ljust(64 * s.KiB, b"\0")


def build_header(
    sequence_number: int,
    file_write_guid: uuid.UUID,
    data_write_guid: uuid.UUID,
    log_guid: uuid.UUID = s.ZERO_GUID,
    log_offset: int = LOG_OFFSET,
    log_length: int = LOG_LENGTH,
    log_version: int = 0,
    version: int = 1,
) -> bytes:
    """A 4 KiB header with its CRC-32C set (FORMAT.md §2)."""
    raw = bytearray(s.build(s.Header, dict(
        checksum=0, sequence_number=sequence_number, file_write_guid=file_write_guid,
        data_write_guid=data_write_guid, log_guid=log_guid, log_version=log_version,
        version=version, log_length=log_length, log_offset=log_offset,
    )))
    return bytes(seal(raw))


def build_region_table(entries: list[tuple[uuid.UUID, int, int, bool]]) -> bytes:
    """A 64 KiB region table with CRC from (guid, file_offset, length, required)."""
    raw = s.build(s.RegionTable, dict(
        header=dict(checksum=0, entry_count=len(entries), reserved=0),
        entries=[dict(guid=g, file_offset=o, length=n, required=int(bool(r)))
                 for g, o, n, r in entries],
    ))
    buf = bytearray(raw.ljust(s.REGION_TABLE_SIZE, b"\0"))
    return bytes(seal(buf))


def metadata_items(plan: LayoutPlan) -> list[tuple[uuid.UUID, str, bytes, int]]:
    """(item GUID, name, value bytes, flags) of every system item, in table order."""
    fp_flags = (s.FP_LEAVE_BLOCK_ALLOCATED if plan.fixed else 0) | \
        (s.FP_HAS_PARENT if plan.differencing else 0)
    vd = s.MD_IS_VIRTUAL_DISK | s.MD_IS_REQUIRED
    items = [
        (s.FILE_PARAMETERS_GUID, "file_parameters",
         s.build(s.FileParameters, dict(block_size=plan.block_size, flags=fp_flags)), s.MD_IS_REQUIRED),
        (s.VIRTUAL_DISK_SIZE_GUID, "virtual_disk_size",
         s.build(s.VirtualDiskSize, dict(virtual_disk_size=plan.virtual_size)), vd),
        (s.VIRTUAL_DISK_ID_GUID, "virtual_disk_id",
         s.build(s.VirtualDiskId, dict(virtual_disk_id=plan.virtual_disk_id)), vd),
        (s.LOGICAL_SECTOR_SIZE_GUID, "logical_sector_size",
         s.build(s.LogicalSectorSize, dict(logical_sector_size=plan.logical_sector_size)), vd),
        (s.PHYSICAL_SECTOR_SIZE_GUID, "physical_sector_size",
         s.build(s.PhysicalSectorSize, dict(physical_sector_size=plan.physical_sector_size)), vd),
    ]
    if plan.parent is not None:
        items.append((s.PARENT_LOCATOR_GUID, "parent_locator",
                      s.build_parent_locator(plan.parent.locator_pairs()), s.MD_IS_REQUIRED))
    return items


def build_metadata_region(plan: LayoutPlan) -> bytes:
    """The whole metadata region: table at 0, items packed from 64 KiB (FORMAT.md §4)."""
    region = bytearray(plan.metadata_length)
    entries = []
    for guid, name, value, flags in metadata_items(plan):
        off, length = plan.metadata_item_offsets[name]
        assert length == len(value)
        region[off:off + length] = value
        entries.append(dict(item_id=guid, offset=off, length=length, flags=flags, reserved=0))
    table = s.build(s.MetadataTable, dict(
        header=dict(reserved=0, entry_count=len(entries)), entries=entries))
    region[:len(table)] = table
    return bytes(region)


def build_bat(plan: LayoutPlan) -> bytes:
    """The initial BAT region (``bat_length`` bytes).

    All zero (NOT_PRESENT) for dynamic and differencing disks; for a fixed disk
    every payload entry is FULLY_PRESENT at ``fixed_block_offset`` and every
    sector-bitmap entry stays 0. Meant for moderate sizes; :func:`write_new_image`
    streams large fixed BATs instead.
    """
    out = bytearray(plan.bat_length)
    for idx, raw in _fixed_bat_entries(plan, 0, plan.payload_blocks):
        out[idx * 8:idx * 8 + 8] = raw.to_bytes(8, "little")
    return bytes(out)


def _fixed_bat_entries(plan: LayoutPlan, first: int, stop: int) -> Iterator[tuple[int, int]]:
    if not plan.fixed:
        return
    geo = plan.geometry
    for block in range(first, stop):
        yield geo.payload_index(block), s.bat_entry(s.PAYLOAD_BLOCK_FULLY_PRESENT,
                                               plan.fixed_block_offset(block))


# --- writer -------------------------------------------------------------------
def write_new_image(target: str | os.PathLike[str] | BinaryIO, plan: LayoutPlan) -> None:
    """Write the initial file described by ``plan``.

    ``target`` is a path (created or truncated) or a seekable, writable binary file
    object whose previous contents are discarded (it is truncated to 0 first).
    Unwritten ranges (log, BAT zeros, fixed payload) come from extending the file
    with ``truncate`` and so read as zeros and stay sparse. Header 1 gets sequence
    number 1 and header 2 sequence number 2, otherwise identical.
    """
    if isinstance(target, (str, bytes, os.PathLike)):
        with open(target, "w+b") as fh:
            _write(fh, plan)
            fh.flush()
            os.fsync(fh.fileno())
    else:
        _write(target, plan)
        target.flush()


def _extend(fh: BinaryIO, size: int) -> None:
    """Grow ``fh`` to ``size`` bytes of zeros (sparse on real files)."""
    fh.truncate(size)
    if fh.seek(0, os.SEEK_END) < size:  # e.g. io.BytesIO does not grow on truncate
        fh.seek(size - 1)
        fh.write(b"\0")


def _write(fh: BinaryIO, plan: LayoutPlan) -> None:
    fh.seek(0)
    fh.truncate(0)
    _extend(fh, plan.file_size)
    fh.seek(0)
    fh.write(build_file_identifier(plan.creator))
    for seq, off in enumerate(s.HEADER_OFFSETS, start=1):
        fh.seek(off)
        fh.write(build_header(seq, plan.file_write_guid, plan.data_write_guid,
                              log_offset=plan.log_offset, log_length=plan.log_length))
    table = build_region_table([
        (s.BAT_REGION_GUID, plan.bat_offset, plan.bat_length, True),
        (s.METADATA_REGION_GUID, plan.metadata_offset, plan.metadata_length, True),
    ])
    for off in s.REGION_TABLE_OFFSETS:
        fh.seek(off)
        fh.write(table)
    fh.seek(plan.metadata_offset)
    fh.write(build_metadata_region(plan))
    if plan.fixed:
        step = 1 << 16  # payload blocks per write burst
        for first in range(0, plan.payload_blocks, step):
            stop = min(first + step, plan.payload_blocks)
            ents = list(_fixed_bat_entries(plan, first, stop))
            lo, hi = ents[0][0], ents[-1][0]
            buf = bytearray((hi - lo + 1) * 8)
            for idx, raw in ents:
                buf[(idx - lo) * 8:(idx - lo) * 8 + 8] = raw.to_bytes(8, "little")
            fh.seek(plan.bat_offset + lo * 8)
            fh.write(buf)
