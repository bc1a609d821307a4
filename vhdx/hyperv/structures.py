"""construct declarations of the HyperVStorage container (.vmcx, .vmrs, data.vmcx).

Declarations only: no I/O and no policy; the same objects parse (container.py)
and build (the test builder). "hyperv.md §n" is the project's docs/hyperv.md. All
integers are little-endian and every structure is packed. Checksums are the
standard CRC-32 (zlib), each taken with its own 4-byte field zeroed (hyperv.md §0).
"""

from __future__ import annotations

from construct import (
    Bytes,
    Construct,
    Default,
    Float64l,
    Int8ul,
    Int16ul,
    Int32ul,
    Int64sl,
    Int64ul,
    Struct,
)

from ..crc import checksum_of, crc32, seal, verify

# --- signatures and fixed places (hyperv.md §2.1-§2.10) ----------------------------------
FILE_SIGNATURE = 0x01282014
OBJECT_TABLE_SIGNATURE = 0x01110001
KEY_TABLE_SIGNATURE = 0x0002
LOG_SIGNATURE = 0x01110003
FORMAT_VERSION = 0x0400
HEADER_OFFSETS = (0x0000, 0x1000)
ROOT_OBJECT_TABLE_OFFSET = 0x2000
PAGE = 0x1000

# Object-table entry types (hyperv.md §2.4).
OBJ_EMPTY, OBJ_TABLE, OBJ_KEY_TABLE, OBJ_FILE, OBJ_FREE = 0, 1, 2, 3, 4

# Key-entry value types (hyperv.md §2.7) and flags (hyperv.md §2.6).
VT_FREE, VT_INT, VT_UINT, VT_DOUBLE, VT_STRING, VT_ARRAY, VT_BOOL, VT_NODE = 1, 3, 4, 5, 6, 7, 8, 9
VALUE_TYPE_NAMES = {VT_INT: "int", VT_UINT: "uint", VT_DOUBLE: "double", VT_STRING: "string",
                    VT_ARRAY: "array", VT_BOOL: "bool", VT_NODE: "node"}
FLAG_FILE_OBJECT = 0x01


def _sig(width: Construct, value: int) -> Construct:
    # A plain integer with a build default: the parser checks it itself so a bad
    # signature becomes a named error instead of a construct exception.
    return Default(width, value)


# --- 2.2 file header (two copies, 0x2E bytes used of a page) ------------------------
FileHeader = Struct(
    "signature" / _sig(Int32ul, FILE_SIGNATURE),
    "checksum" / Default(Int32ul, 0),
    "sequence" / Int16ul,
    "version" / Default(Int32ul, FORMAT_VERSION),
    "reserved" / Default(Bytes(8), bytes(8)),
    "alignment" / Default(Int32ul, PAGE),
    "log_offset" / Int64ul,
    "log_size" / Int64ul,
    "log_header_size" / Default(Int32ul, PAGE),
)
FILE_HEADER_SIZE = FileHeader.sizeof()
assert FILE_HEADER_SIZE == 0x2E

# --- 2.4 object table ----------------------------------------------------------------
ObjectTableHeader = Struct(
    "signature" / _sig(Int32ul, OBJECT_TABLE_SIGNATURE),
    "count" / Int32ul,
)
ObjectTableEntry = Struct(
    "type" / Int8ul,
    "checksum" / Default(Int32ul, 0),
    "offset" / Int64ul,
    "size" / Int32ul,
    "flags" / Int8ul,
)
OBJECT_TABLE_HEADER_SIZE = ObjectTableHeader.sizeof()
OBJECT_ENTRY_SIZE = ObjectTableEntry.sizeof()
OBJECT_ENTRY_CRC_OFFSET = 1
assert OBJECT_ENTRY_SIZE == 18

# --- 2.5 key table header ------------------------------------------------------------
KeyTableHeader = Struct(
    "signature" / _sig(Int16ul, KEY_TABLE_SIGNATURE),
    "index" / Int16ul,
    "sequence" / Int16ul,
    "checksum" / Default(Int32ul, 0),
)
KEY_TABLE_HEADER_SIZE = KeyTableHeader.sizeof()
KEY_TABLE_CRC_OFFSET = 6
assert KEY_TABLE_HEADER_SIZE == 10

# --- 2.6 key entry header; name and value follow ------------------------------------
KeyEntryHeader = Struct(
    "type" / Int8ul,
    "flags" / Int8ul,
    "size" / Int32ul,
    "parent_table" / Int16ul,
    "parent_offset" / Int32ul,
    "checksum" / Default(Int32ul, 0),
    "insertion" / Int32ul,
    "name_length" / Int8ul,
)
KEY_ENTRY_HEADER_SIZE = KeyEntryHeader.sizeof()
KEY_ENTRY_CRC_OFFSET = 12
assert KEY_ENTRY_HEADER_SIZE == 21

# --- 2.7 values (the bytes right after the name) -------------------------------------
IntValue = Int64sl
UIntValue = Int64ul
DoubleValue = Float64l
LengthPrefix = Int32ul  # string (UTF-16LE bytes) and array values: u32 length, then bytes
BoolValue = Int32ul
NodeValue = Struct(
    "change_sequence" / Int64ul,
    "next_insertion" / Int32ul,
)
FileObjectPointer = Struct(  # the value bytes when FLAG_FILE_OBJECT is set (hyperv.md §2.8)
    "length" / Int32ul,
    "offset" / Int64ul,
)
FIXED_VALUE_SIZES = {VT_INT: 8, VT_UINT: 8, VT_DOUBLE: 8, VT_BOOL: 4, VT_NODE: NodeValue.sizeof()}
FILE_OBJECT_POINTER_SIZE = FileObjectPointer.sizeof()

# --- 2.10 replay log -----------------------------------------------------------------
LogHeader = Struct(
    "signature" / _sig(Int32ul, LOG_SIGNATURE),
    "checksum" / Default(Int32ul, 0),
    "active" / Int32ul,
    "unknown1" / Default(Int8ul, 0),
    "max_entries" / Int32ul,
    "unknown2" / Default(Bytes(16), bytes(16)),
    "unknown3" / Default(Int8ul, 0),
)
LOG_HEADER_SIZE = LogHeader.sizeof()
assert LOG_HEADER_SIZE == 0x22
LogEntry = Struct(
    "target" / Int64ul,
    "length" / Int32ul,
    "data_offset" / Int32ul,  # relative to the log start
    "reserved" / Default(Int32ul, 0),
    "checksum" / Default(Int32ul, 0),
    "data_checksum" / Int32ul,
)
LOG_ENTRY_SIZE = LogEntry.sizeof()
LOG_ENTRY_CRC_OFFSET = 20
assert LOG_ENTRY_SIZE == 28


# Compiled once: the same declarations, parsed 3-4x faster (a config has ~400 entries).
FileHeader = FileHeader.compile()
ObjectTableHeader = ObjectTableHeader.compile()
ObjectTableEntry = ObjectTableEntry.compile()
KeyTableHeader = KeyTableHeader.compile()
KeyEntryHeader = KeyEntryHeader.compile()
NodeValue = NodeValue.compile()
FileObjectPointer = FileObjectPointer.compile()
LogHeader = LogHeader.compile()
LogEntry = LogEntry.compile()


# --- checksums and sequence numbers -------------------------------------------------
def crc32_of(buf: bytes | bytearray | memoryview, crc_offset: int) -> int:
    """CRC-32 (zlib's) of ``buf`` with the 4 bytes at ``crc_offset`` taken as zero."""
    return checksum_of(buf, crc_offset, crc32)


def crc32_ok(buf: bytes | bytearray | memoryview, crc_offset: int) -> bool:
    return verify(buf, crc_offset, crc32)


def crc32_seal(buf: bytearray, crc_offset: int) -> bytearray:
    """Store the CRC-32 of ``buf`` (its field zeroed) at ``crc_offset``; returns ``buf``."""
    return seal(buf, crc_offset, crc32)


def serial_newer(a: int, b: int) -> bool:
    """u16 serial arithmetic: is sequence ``a`` newer than ``b``? (hyperv.md §2.2)"""
    return 0 < (a - b) % 65536 < 32768
