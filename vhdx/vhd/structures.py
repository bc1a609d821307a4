"""construct declarations of the legacy VHD on-disk structures.

Declarations and pure helpers only (no I/O, no policy). Section numbers
("vhd.md §n") refer to the format notes of docs/vhd.md (the project's summary
of the 2006 Microsoft "Virtual Hard Disk Image Format Specification" and of
what real producers write). Every integer is big-endian;
GUIDs stay raw 16-byte strings (producers disagree on their byte order, vhd.md §0,
so linkage compares bytes, never parsed UUIDs).
"""

from __future__ import annotations

from typing import Any

from construct import Bytes, Const, Int8ub, Int16ub, Int32ub, Int64ub, Struct

from .. import structures as VS

SECTOR = 512
FOOTER_SIZE = 512
HEADER_SIZE = 1024
COOKIE_FOOTER = b"conectix"
COOKIE_HEADER = b"cxsparse"
VERSION = 0x00010000
UNUSED = 0xFFFFFFFF                 # BAT entry of an unallocated block
NO_DATA_OFFSET = 0xFFFFFFFFFFFFFFFF  # footer Data Offset of a fixed disk (vhd.md §2.4)
FEATURE_RESERVED = 0x2               # "must always be 1" (vhd.md §2)

TYPE_FIXED, TYPE_DYNAMIC, TYPE_DIFFERENCING = 2, 3, 4
TYPE_NAMES = {TYPE_FIXED: "fixed", TYPE_DYNAMIC: "dynamic", TYPE_DIFFERENCING: "differencing"}

# Seconds between the Unix epoch and the VHD epoch, 2000-01-01 00:00:00 UTC (vhd.md §0).
EPOCH_OFFSET = 946684800

# Limits against hostile files (vhd.md §10). QEMU's 2040 GiB bound for the virtual
# size; the block-size cap bounds bitmap buffers; the locator cap bounds reads.
MAX_VIRTUAL_SIZE = 0xFF000000 * SECTOR
MAX_BLOCK_SIZE = 256 * VS.MiB
MAX_LOCATOR_LENGTH = 64 * VS.KiB
# The BAT is held in memory: 2^24 entries (64 MiB) covers 2040 GiB with 128 KiB
# blocks; a sparse hostile file could otherwise ask for a 16 GiB table.
MAX_BAT_ENTRIES = 1 << 24
MAX_PARENT_NAME_UNITS = 256

# Parent locator platform codes (vhd.md §6), as 4-byte strings.
PLATFORM_NONE = b"\0\0\0\0"
PLATFORM_W2RU = b"W2ru"  # relative path, UTF-16LE
PLATFORM_W2KU = b"W2ku"  # absolute path, UTF-16LE
PLATFORM_WI2R = b"Wi2r"  # relative path, single-byte (deprecated)
PLATFORM_WI2K = b"Wi2k"  # absolute path, single-byte (deprecated)
PLATFORM_MAC = b"Mac "   # Mac OS alias record (opaque)
PLATFORM_MACX = b"MacX"  # file URL, UTF-8
PLATFORM_CODES = (PLATFORM_W2RU, PLATFORM_W2KU, PLATFORM_WI2R, PLATFORM_WI2K, PLATFORM_MAC, PLATFORM_MACX)

# Hard disk footer (vhd.md §2): 512 bytes at the end of every file, copy at 0 for
# dynamic and differencing disks.
Footer = Struct(
    "cookie" / Bytes(8),
    "features" / Int32ub,
    "version" / Int32ub,
    "data_offset" / Int64ub,
    "timestamp" / Int32ub,
    "creator_app" / Bytes(4),
    "creator_version" / Int32ub,
    "creator_os" / Bytes(4),
    "original_size" / Int64ub,
    "current_size" / Int64ub,
    "cylinders" / Int16ub,
    "heads" / Int8ub,
    "sectors_per_track" / Int8ub,
    "disk_type" / Int32ub,
    "checksum" / Int32ub,
    "unique_id" / Bytes(16),
    "saved_state" / Int8ub,
    "reserved" / Bytes(427),
)
FOOTER_CHECKSUM_OFFSET = 64
assert Footer.sizeof() == FOOTER_SIZE

# Parent locator entry (vhd.md §6): 8 of them in the dynamic header.
ParentLocatorEntry = Struct(
    "platform_code" / Bytes(4),
    "data_space" / Int32ub,    # bytes in real files (the spec says sectors)
    "data_length" / Int32ub,
    "reserved" / Int32ub,
    "data_offset" / Int64ub,
)
LOCATOR_ENTRY_SIZE = 24
assert ParentLocatorEntry.sizeof() == LOCATOR_ENTRY_SIZE

# Dynamic disk header (vhd.md §4): 1024 bytes at the footer's Data Offset.
DynamicHeader = Struct(
    "cookie" / Const(COOKIE_HEADER),
    "data_offset" / Int64ub,
    "table_offset" / Int64ub,
    "version" / Int32ub,
    "max_table_entries" / Int32ub,
    "block_size" / Int32ub,
    "checksum" / Int32ub,
    "parent_unique_id" / Bytes(16),
    "parent_timestamp" / Int32ub,
    "reserved1" / Int32ub,
    "parent_unicode_name" / Bytes(512),  # UTF-16BE (vhd.md §0)
    "locators" / ParentLocatorEntry[8],
    "reserved2" / Bytes(256),
)
HEADER_CHECKSUM_OFFSET = 36
assert DynamicHeader.sizeof() == HEADER_SIZE


def checksum(data: bytes | bytearray | memoryview, field_offset: int) -> int:
    """One's complement of the byte sum with the checksum field taken as zero (vhd.md §0)."""
    mv = memoryview(data)
    s = sum(mv) - sum(mv[field_offset:field_offset + 4])
    return ~s & 0xFFFFFFFF


def seal(data: bytes | bytearray, field_offset: int) -> bytes:
    """``data`` with its checksum field set to the right value."""
    buf = bytearray(data)
    buf[field_offset:field_offset + 4] = bytes(4)
    buf[field_offset:field_offset + 4] = checksum(buf, field_offset).to_bytes(4, "big")
    return bytes(buf)


def build_footer(**fields: Any) -> bytes:
    """A sealed 512-byte footer; ``fields`` as in :data:`Footer` (checksum ignored)."""
    obj = dict(cookie=COOKIE_FOOTER, features=FEATURE_RESERVED, version=VERSION,
               data_offset=NO_DATA_OFFSET, timestamp=0, creator_app=b"vhdx",
               creator_version=0x00010000, creator_os=b"Wi2k", original_size=0,
               current_size=0, cylinders=0, heads=0, sectors_per_track=0,
               disk_type=TYPE_FIXED, checksum=0, unique_id=bytes(16), saved_state=0,
               reserved=bytes(427))
    obj.update(fields)
    obj["checksum"] = 0
    return seal(Footer.build(obj), FOOTER_CHECKSUM_OFFSET)


def build_header(**fields: Any) -> bytes:
    """A sealed 1024-byte dynamic header; ``fields`` as in :data:`DynamicHeader`."""
    empty = dict(platform_code=PLATFORM_NONE, data_space=0, data_length=0, reserved=0, data_offset=0)
    obj: dict[str, Any] = dict(data_offset=NO_DATA_OFFSET, table_offset=0, version=VERSION,
               max_table_entries=0, block_size=2 * VS.MiB, checksum=0,
               parent_unique_id=bytes(16), parent_timestamp=0, reserved1=0,
               parent_unicode_name=bytes(512), locators=[empty] * 8, reserved2=bytes(256))
    obj.update(fields)
    locs = list(obj["locators"]) + [empty] * (8 - len(obj["locators"]))
    obj["locators"] = [dict(empty, **loc) for loc in locs]
    obj["checksum"] = 0
    return seal(DynamicHeader.build(obj), HEADER_CHECKSUM_OFFSET)


def chs_geometry(size: int) -> tuple[int, int, int]:
    """(cylinders, heads, sectors per track) for ``size`` bytes: the spec's
    appendix "CHS Calculation", which rounds down (vhd.md §2.3)."""
    sectors = min(size // SECTOR, 65535 * 16 * 255)
    if sectors >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = sectors // spt
    else:
        spt = 17
        cth = sectors // spt
        heads = max((cth + 1023) // 1024, 4)
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = sectors // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = sectors // spt
    return cth // heads, heads, spt


def bitmap_bytes(block_size: int) -> int:
    """Bytes a block's sector bitmap occupies on disk: one bit per sector, padded
    to a whole sector (vhd.md §5.2)."""
    used = (block_size // SECTOR + 7) // 8
    return (used + SECTOR - 1) // SECTOR * SECTOR


# MSB-first VHD bitmaps become LSB-first (the order vhdx.native.bitmap_runs
# reads) by reversing the bits of every byte (vhd.md §5.2).
BIT_REVERSE = bytes(int(f"{b:08b}"[::-1], 2) for b in range(256))
