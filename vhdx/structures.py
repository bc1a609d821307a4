"""construct declarations of every VHDX on-disk structure.

Declarations only: no I/O and no policy. The same objects parse and build, so
writers produce bytes from exactly what readers accept. Section numbers refer to
MS-VHDX (v20240423); "FORMAT.md §n" to docs/FORMAT.md.

All integers are little-endian. GUIDs are Microsoft mixed-endian and surface as
:class:`uuid.UUID` (``UUID(bytes_le=...)``), which maps 1:1 onto the raw bytes.
"""

from __future__ import annotations

import uuid
from typing import Any

import construct as c
from construct import (
    Adapter,
    Array,
    BitsInteger,
    BitStruct,
    Bytes,
    ByteSwapped,
    Const,
    Int16ul,
    Int32ul,
    Int64ul,
    Padding,
    PaddedString,
    Struct,
    this,
)

from .errors import CorruptImageError, InvalidArgumentError

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB

# --- layout constants (MS-VHDX 2.1, FORMAT.md §1) ---------------------------------
FILE_IDENTIFIER_OFFSET = 0
HEADER_OFFSETS = (64 * KiB, 128 * KiB)
REGION_TABLE_OFFSETS = (192 * KiB, 256 * KiB)
HEADER_SECTION_SIZE = 1 * MiB
HEADER_SIZE = 4 * KiB
REGION_TABLE_SIZE = 64 * KiB
METADATA_TABLE_SIZE = 64 * KiB
LOG_SECTOR_SIZE = 4 * KiB
SECTOR_BITMAP_BLOCK_SIZE = 1 * MiB
ALIGNMENT = 1 * MiB

MAX_REGION_ENTRIES = 2047
MAX_METADATA_ENTRIES = 2047
MAX_USER_METADATA_ENTRIES = 1024
MAX_METADATA_ITEM_SIZE = 1 * MiB
MIN_BLOCK_SIZE = 1 * MiB
MAX_BLOCK_SIZE = 256 * MiB
MAX_VIRTUAL_SIZE = 64 * TiB
SECTOR_SIZES = (512, 4096)
SECTORS_PER_CHUNK = 1 << 23  # bits in a 1 MiB sector bitmap block (2.5.1)

SIG_FILE = b"vhdxfile"
SIG_HEADER = b"head"
SIG_REGION = b"regi"
SIG_METADATA = b"metadata"
SIG_LOG_ENTRY = b"loge"
SIG_ZERO = b"zero"
SIG_DESC = b"desc"
SIG_DATA = b"data"


def _guid(s: str) -> uuid.UUID:
    return uuid.UUID(s)


ZERO_GUID = uuid.UUID(int=0)

# Region GUIDs (2.2.3.1)
BAT_REGION_GUID = _guid("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_REGION_GUID = _guid("8B7CA206-4790-4B9A-B8FE-575F050F886E")
KNOWN_REGIONS = {BAT_REGION_GUID: "BAT", METADATA_REGION_GUID: "metadata"}

# System metadata items (2.6.2)
FILE_PARAMETERS_GUID = _guid("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VIRTUAL_DISK_SIZE_GUID = _guid("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
VIRTUAL_DISK_ID_GUID = _guid("BECA12AB-B2E6-4523-93EF-C309E000C746")
LOGICAL_SECTOR_SIZE_GUID = _guid("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYSICAL_SECTOR_SIZE_GUID = _guid("CDA348C7-445D-4471-9CC9-E9885251C556")
PARENT_LOCATOR_GUID = _guid("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
VHDX_PARENT_LOCATOR_TYPE = _guid("B04AEFB7-D19E-4A81-B789-25B8E9445913")

SYSTEM_ITEM_NAMES = {
    FILE_PARAMETERS_GUID: "file_parameters",
    VIRTUAL_DISK_SIZE_GUID: "virtual_disk_size",
    VIRTUAL_DISK_ID_GUID: "virtual_disk_id",
    LOGICAL_SECTOR_SIZE_GUID: "logical_sector_size",
    PHYSICAL_SECTOR_SIZE_GUID: "physical_sector_size",
    PARENT_LOCATOR_GUID: "parent_locator",
}

# Metadata entry flags (2.6.1.2)
MD_IS_USER = 0x1
MD_IS_VIRTUAL_DISK = 0x2
MD_IS_REQUIRED = 0x4

# File parameter flags (2.6.2.1)
FP_LEAVE_BLOCK_ALLOCATED = 0x1
FP_HAS_PARENT = 0x2

# Region entry flag (2.2.3.2)
REGION_REQUIRED = 0x1

# BAT states (2.5.1.1, 2.5.1.2)
PAYLOAD_BLOCK_NOT_PRESENT = 0
PAYLOAD_BLOCK_UNDEFINED = 1
PAYLOAD_BLOCK_ZERO = 2
PAYLOAD_BLOCK_UNMAPPED = 3
PAYLOAD_BLOCK_FULLY_PRESENT = 6
PAYLOAD_BLOCK_PARTIALLY_PRESENT = 7
SB_BLOCK_NOT_PRESENT = 0
SB_BLOCK_PRESENT = 6

PAYLOAD_STATE_NAMES = {
    0: "NOT_PRESENT",
    1: "UNDEFINED",
    2: "ZERO",
    3: "UNMAPPED",
    6: "FULLY_PRESENT",
    7: "PARTIALLY_PRESENT",
}
SB_STATE_NAMES = {0: "NOT_PRESENT", 6: "PRESENT"}

BAT_STATE_MASK = 0x7
BAT_RESERVED_MASK = 0xFFFF8  # bits 3..19
BAT_OFFSET_MASK = 0xFFFFFFFFFFF00000


# --- adapters ----------------------------------------------------------------
class GuidAdapter(Adapter):  # type: ignore[misc]  # construct ships no type stubs: Adapter is Any
    """16 raw bytes (mixed-endian) <-> uuid.UUID."""

    def _decode(self, obj: bytes, context: Any, path: Any) -> uuid.UUID:
        return uuid.UUID(bytes_le=bytes(obj))

    def _encode(self, obj: uuid.UUID | bytes, context: Any, path: Any) -> bytes:
        return obj.bytes_le if isinstance(obj, uuid.UUID) else bytes(obj)


Guid = GuidAdapter(Bytes(16))


# --- 2.2.1 File type identifier -----------------------------------------------
FileIdentifier = Struct(
    "signature" / Const(SIG_FILE),
    "creator" / PaddedString(512, "utf_16_le"),
)

# --- 2.2.2 Header (4 KiB; checksum over all 4096 bytes) ------------------------
Header = Struct(
    "signature" / Const(SIG_HEADER),
    "checksum" / Int32ul,
    "sequence_number" / Int64ul,
    "file_write_guid" / Guid,
    "data_write_guid" / Guid,
    "log_guid" / Guid,
    "log_version" / Int16ul,
    "version" / Int16ul,
    "log_length" / Int32ul,
    "log_offset" / Int64ul,
    Padding(4016),
)
assert Header.sizeof() == HEADER_SIZE

# --- 2.2.3 Region table (64 KiB; checksum over all 65536 bytes) ----------------
RegionTableHeader = Struct(
    "signature" / Const(SIG_REGION),
    "checksum" / Int32ul,
    "entry_count" / Int32ul,
    "reserved" / Int32ul,
)

RegionTableEntry = Struct(
    "guid" / Guid,
    "file_offset" / Int64ul,
    "length" / Int32ul,
    "required" / Int32ul,
)

RegionTable = Struct(
    "header" / RegionTableHeader,
    c.Check(this.header.entry_count <= MAX_REGION_ENTRIES),
    "entries" / Array(this.header.entry_count, RegionTableEntry),
)

# --- 2.6.1 Metadata table (first 64 KiB of the metadata region) ----------------
MetadataTableHeader = Struct(
    "signature" / Const(SIG_METADATA),
    "reserved" / Int16ul,
    "entry_count" / Int16ul,
    Padding(20),
)

MetadataTableEntry = Struct(
    "item_id" / Guid,
    "offset" / Int32ul,
    "length" / Int32ul,
    "flags" / Int32ul,
    "reserved" / Int32ul,
)

MetadataTable = Struct(
    "header" / MetadataTableHeader,
    c.Check(this.header.entry_count <= MAX_METADATA_ENTRIES),
    "entries" / Array(this.header.entry_count, MetadataTableEntry),
)

# --- 2.6.2 System metadata items ------------------------------------------------
FileParameters = Struct(
    "block_size" / Int32ul,
    "flags" / Int32ul,
)
VirtualDiskSize = Struct("virtual_disk_size" / Int64ul)
VirtualDiskId = Struct("virtual_disk_id" / Guid)
LogicalSectorSize = Struct("logical_sector_size" / Int32ul)
PhysicalSectorSize = Struct("physical_sector_size" / Int32ul)

SYSTEM_ITEM_STRUCTS = {
    FILE_PARAMETERS_GUID: FileParameters,
    VIRTUAL_DISK_SIZE_GUID: VirtualDiskSize,
    VIRTUAL_DISK_ID_GUID: VirtualDiskId,
    LOGICAL_SECTOR_SIZE_GUID: LogicalSectorSize,
    PHYSICAL_SECTOR_SIZE_GUID: PhysicalSectorSize,
}

# --- 2.6.2.6 Parent locator ---------------------------------------------------
ParentLocatorHeader = Struct(
    "locator_type" / Guid,
    "reserved" / Int16ul,
    "key_value_count" / Int16ul,
)

ParentLocatorEntry = Struct(
    "key_offset" / Int32ul,
    "value_offset" / Int32ul,
    "key_length" / Int16ul,
    "value_length" / Int16ul,
)

ParentLocator = Struct(
    "header" / ParentLocatorHeader,
    "entries" / Array(this.header.key_value_count, ParentLocatorEntry),
)

# --- 2.5.1 BAT entry (u64: state bits 0-2, reserved 3-19, FileOffsetMB 20-63) --
# BitStruct reads most-significant bit first, so the LE u64 is byte-swapped first.
BatEntry = ByteSwapped(
    BitStruct(
        "file_offset_mb" / BitsInteger(44),
        "reserved" / BitsInteger(17),
        "state" / BitsInteger(3),
    )
)
BatEntryRaw = Int64ul  # bulk decoding of the table uses array('Q'), see bat.py

# --- 2.5.2 Sector bitmap block: 2^23 bits, LSB first, one per logical sector ----
SectorBitmapBlock = Bytes(SECTOR_BITMAP_BLOCK_SIZE)

# --- 2.3 Log ------------------------------------------------------------------
LogEntryHeader = Struct(
    "signature" / Const(SIG_LOG_ENTRY),
    "checksum" / Int32ul,
    "entry_length" / Int32ul,
    "tail" / Int32ul,
    "sequence_number" / Int64ul,
    "descriptor_count" / Int32ul,
    "reserved" / Int32ul,
    "log_guid" / Guid,
    "flushed_file_offset" / Int64ul,
    "last_file_offset" / Int64ul,
)
assert LogEntryHeader.sizeof() == 64

ZeroDescriptor = Struct(
    "signature" / Const(SIG_ZERO),
    "reserved" / Int32ul,
    "zero_length" / Int64ul,
    "file_offset" / Int64ul,
    "sequence_number" / Int64ul,
)

DataDescriptor = Struct(
    "signature" / Const(SIG_DESC),
    "trailing_bytes" / Bytes(4),
    "leading_bytes" / Bytes(8),
    "file_offset" / Int64ul,
    "sequence_number" / Int64ul,
)
assert ZeroDescriptor.sizeof() == DataDescriptor.sizeof() == 32

DataSector = Struct(
    "signature" / Const(SIG_DATA),
    "sequence_high" / Int32ul,
    "data" / Bytes(4084),
    "sequence_low" / Int32ul,
)
assert DataSector.sizeof() == LOG_SECTOR_SIZE

DESCRIPTORS_IN_FIRST_SECTOR = 126
DESCRIPTORS_PER_SECTOR = 128


# --- helpers ------------------------------------------------------------------
def parse(struct: c.Construct, data: bytes | bytearray | memoryview, what: str) -> Any:
    """Parse ``data`` with ``struct``; any construct failure becomes CorruptImageError."""
    try:
        return struct.parse(bytes(data))
    except c.ConstructError as e:
        raise CorruptImageError(f"{what}: {_first_line(e)}") from None


def build(struct: c.Construct, obj: Any) -> bytes:
    raw: bytes = struct.build(obj)
    return raw


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[-1] if text else type(e).__name__


def encode_locator_string(s: str) -> bytes:
    return s.encode("utf-16-le")


def build_parent_locator(pairs: dict[str, str]) -> bytes:
    """Build a VHDX parent locator item (2.6.2.6) from key/value strings.

    Offsets are relative to the start of the item; keys and values are packed
    after the entry table, as Hyper-V does.
    """
    header_len = ParentLocatorHeader.sizeof() + ParentLocatorEntry.sizeof() * len(pairs)
    blob = bytearray()
    entries = []
    pos = header_len
    for key, value in pairs.items():
        kb, vb = encode_locator_string(key), encode_locator_string(value)
        if not kb or not vb or len(kb) > 0xFFFF or len(vb) > 0xFFFF:
            raise InvalidArgumentError(f"parent locator entry {key!r} has an invalid length")
        entries.append(dict(key_offset=pos, value_offset=pos + len(kb),
                            key_length=len(kb), value_length=len(vb)))
        blob += kb + vb
        pos += len(kb) + len(vb)
    return build(ParentLocator, dict(
        header=dict(locator_type=VHDX_PARENT_LOCATOR_TYPE, reserved=0,
                    key_value_count=len(pairs)),
        entries=entries,
    )) + bytes(blob)


def bat_entry(state: int, file_offset: int = 0) -> int:
    """Raw u64 of a BAT entry: ``file_offset`` (a 1 MiB multiple) | ``state``."""
    return (file_offset & BAT_OFFSET_MASK) | (state & BAT_STATE_MASK)
