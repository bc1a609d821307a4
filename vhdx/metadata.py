"""Metadata region: the table, the system items and the parent locator.

Followed: MS-VHDX 2.6 (metadata region), 2.6.2 (system items) and 2.6.2.6
(parent locator); validation per FORMAT.md §4 and §10 row 7-9. Items are located
through the table's offsets only: producers place them differently (FORMAT.md §4).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from construct import Construct

from . import structures as S
from .errors import CorruptImageError, UnsupportedFeatureError

ReadFn = Callable[[int, int], bytes]


@dataclass(frozen=True)
class MetadataItem:
    item_id: uuid.UUID
    offset: int  # relative to the metadata region
    length: int
    flags: int
    data: bytes = field(repr=False)

    @property
    def is_user(self) -> bool:
        return bool(self.flags & S.MD_IS_USER)

    @property
    def is_virtual_disk(self) -> bool:
        return bool(self.flags & S.MD_IS_VIRTUAL_DISK)

    @property
    def is_required(self) -> bool:
        return bool(self.flags & S.MD_IS_REQUIRED)

    @property
    def name(self) -> str:
        if self.is_user:
            return f"user:{self.item_id}"
        return S.SYSTEM_ITEM_NAMES.get(self.item_id, str(self.item_id))


@dataclass
class Metadata:
    block_size: int
    leave_block_allocated: bool
    has_parent: bool
    virtual_size: int
    virtual_disk_id: uuid.UUID
    logical_sector_size: int
    physical_sector_size: int
    parent_locator: dict[str, str] | None
    items: list[MetadataItem]

    def item(self, item_id: uuid.UUID, is_user: bool = False) -> MetadataItem | None:
        for it in self.items:
            if it.item_id == item_id and it.is_user == is_user:
                return it
        return None


def parse_parent_locator(data: bytes) -> dict[str, str]:
    """Decode a parent locator item (MS-VHDX 2.6.2.6); offsets are item-relative."""
    hdr_size = S.ParentLocatorHeader.sizeof()
    if len(data) < hdr_size:
        raise CorruptImageError("parent locator is truncated")
    h = S.parse(S.ParentLocatorHeader, data[:hdr_size], "parent locator")
    if h.locator_type != S.VHDX_PARENT_LOCATOR_TYPE:
        raise UnsupportedFeatureError(f"unknown parent locator type {h.locator_type}")
    n = h.key_value_count
    table_end = hdr_size + n * S.ParentLocatorEntry.sizeof()
    if table_end > len(data):
        raise CorruptImageError("parent locator entry table runs past the item")
    loc = S.parse(S.ParentLocator, data[:table_end], "parent locator")
    out: dict[str, str] = {}
    for e in loc.entries:
        spans = ((e.key_offset, e.key_length), (e.value_offset, e.value_length))
        strings = []
        for off, ln in spans:
            if off == 0 or ln == 0 or ln % 2 or off + ln > len(data):
                raise CorruptImageError("parent locator entry has an invalid offset or length")
            try:
                strings.append(data[off:off + ln].decode("utf-16-le"))
            except UnicodeDecodeError:
                raise CorruptImageError("parent locator entry is not valid UTF-16") from None
        # Strings from the file reach system calls as paths: a NUL inside one would
        # make them raise (ValueError) instead of failing the lookup. A terminating
        # NUL (counted in the length by some producers) is dropped.
        key, value = (x.rstrip("\0") for x in strings)
        if "\0" in key or "\0" in value:
            raise CorruptImageError(f"parent locator entry {key.replace(chr(0), '?')!r} holds a NUL character")
        if key in out:
            raise CorruptImageError(f"parent locator key {key!r} appears twice")
        out[key] = value
    return out


def _u(struct: Construct, item: MetadataItem, field_name: str) -> Any:
    size = struct.sizeof()
    if item.length != size:
        raise CorruptImageError(f"metadata item {item.name} has length {item.length}, expected {size}")
    return getattr(S.parse(struct, item.data, f"metadata item {item.name}"), field_name)


def parse_metadata(read: ReadFn, region_length: int) -> Metadata:
    """Parse the metadata region through ``read(region_relative_offset, size)``."""
    if region_length < S.METADATA_TABLE_SIZE:
        raise CorruptImageError("metadata region is smaller than its 64 KiB table")
    table = read(0, S.METADATA_TABLE_SIZE)
    if len(table) < S.METADATA_TABLE_SIZE:
        raise CorruptImageError("metadata table is truncated")
    if table[:8] != S.SIG_METADATA:
        raise CorruptImageError("metadata table has a bad signature")
    t = S.parse(S.MetadataTable, table, "metadata table")

    items: list[MetadataItem] = []
    seen: set[tuple[uuid.UUID, bool]] = set()
    spans: list[tuple[int, int, str]] = []
    user_count = 0
    for e in t.entries:
        is_user = bool(e.flags & S.MD_IS_USER)
        user_count += is_user
        key = (e.item_id, is_user)
        if key in seen:
            raise CorruptImageError(f"metadata item {e.item_id} listed twice")
        seen.add(key)
        if e.length > S.MAX_METADATA_ITEM_SIZE:
            raise CorruptImageError(f"metadata item {e.item_id} is larger than 1 MiB")
        if e.length:
            if e.offset < S.METADATA_TABLE_SIZE or e.offset + e.length > region_length:
                raise CorruptImageError(f"metadata item {e.item_id} lies outside the metadata region")
            spans.append((e.offset, e.offset + e.length, str(e.item_id)))
            data = read(e.offset, e.length)
            if len(data) < e.length:
                raise CorruptImageError(f"metadata item {e.item_id} is truncated")
        else:
            data = b""
        item = MetadataItem(e.item_id, e.offset, e.length, e.flags, data)
        if not is_user and e.item_id not in S.SYSTEM_ITEM_NAMES and item.is_required:
            raise UnsupportedFeatureError(f"unknown required metadata item {e.item_id}")
        items.append(item)
    if user_count > S.MAX_USER_METADATA_ENTRIES:
        raise CorruptImageError("more than 1024 user metadata items")
    spans.sort()
    for (s1, e1, n1), (s2, _e2, n2) in zip(spans, spans[1:]):
        if s2 < e1:
            raise CorruptImageError(f"metadata items {n1} and {n2} overlap")

    system = {it.item_id: it for it in items if not it.is_user}
    for guid in (S.FILE_PARAMETERS_GUID, S.VIRTUAL_DISK_SIZE_GUID, S.VIRTUAL_DISK_ID_GUID,
                 S.LOGICAL_SECTOR_SIZE_GUID, S.PHYSICAL_SECTOR_SIZE_GUID):
        if guid not in system:
            raise CorruptImageError(f"required metadata item {S.SYSTEM_ITEM_NAMES[guid]} is missing")

    fp_item = system[S.FILE_PARAMETERS_GUID]
    if fp_item.length != S.FileParameters.sizeof():
        raise CorruptImageError("file parameters item has the wrong length")
    fp = S.parse(S.FileParameters, fp_item.data, "file parameters")
    block_size = fp.block_size
    if not (S.MIN_BLOCK_SIZE <= block_size <= S.MAX_BLOCK_SIZE) or block_size & (block_size - 1):
        raise CorruptImageError(f"block size {block_size} is not a power of two between 1 and 256 MiB")
    has_parent = bool(fp.flags & S.FP_HAS_PARENT)
    # HasParent makes LeaveBlockAllocated meaningless (2.6.2.1).
    leave = bool(fp.flags & S.FP_LEAVE_BLOCK_ALLOCATED) and not has_parent

    vsize = _u(S.VirtualDiskSize, system[S.VIRTUAL_DISK_SIZE_GUID], "virtual_disk_size")
    disk_id = _u(S.VirtualDiskId, system[S.VIRTUAL_DISK_ID_GUID], "virtual_disk_id")
    lss = _u(S.LogicalSectorSize, system[S.LOGICAL_SECTOR_SIZE_GUID], "logical_sector_size")
    pss = _u(S.PhysicalSectorSize, system[S.PHYSICAL_SECTOR_SIZE_GUID], "physical_sector_size")
    if lss not in S.SECTOR_SIZES:
        raise CorruptImageError(f"logical sector size {lss} is not 512 or 4096")
    if pss not in S.SECTOR_SIZES:
        raise CorruptImageError(f"physical sector size {pss} is not 512 or 4096")
    if vsize == 0 or vsize % lss or vsize > S.MAX_VIRTUAL_SIZE:
        raise CorruptImageError(f"virtual disk size {vsize} is invalid")

    locator = None
    pl_item = system.get(S.PARENT_LOCATOR_GUID)
    if has_parent:
        if pl_item is None:
            raise CorruptImageError("differencing disk without a parent locator")
        locator = parse_parent_locator(pl_item.data)
        if "parent_linkage" not in locator:
            raise CorruptImageError("parent locator has no parent_linkage")
    return Metadata(block_size, leave, has_parent, vsize, disk_id, lss, pss, locator, items)
