"""CRC-32C (Castagnoli), as used by every checksummed VHDX structure.

MS-VHDX 2.2.2 / 2.2.3 / 2.3.1: the checksum is computed over the structure with
its own 4-byte checksum field set to zero, and stored little-endian.
"""

from __future__ import annotations

import crcmod.predefined

# crcmod ships a C implementation; mkCrcFun picks it when available.
crc32c = crcmod.predefined.mkCrcFun("crc-32c")
"""``crc32c(data, crc=0) -> int``; the check value of ``b"123456789"`` is 0xE3069283."""

_ZERO4 = b"\0\0\0\0"


def checksum_of(buf: bytes | bytearray | memoryview, crc_offset: int = 4) -> int:
    """CRC-32C of ``buf`` with the 4 bytes at ``crc_offset`` taken as zero."""
    mv = memoryview(buf)
    crc = crc32c(mv[:crc_offset])
    crc = crc32c(_ZERO4, crc)
    return crc32c(mv[crc_offset + 4:], crc)


def stored_checksum(buf: bytes | bytearray | memoryview, crc_offset: int = 4) -> int:
    return int.from_bytes(bytes(memoryview(buf)[crc_offset:crc_offset + 4]), "little")


def verify(buf: bytes | bytearray | memoryview, crc_offset: int = 4) -> bool:
    return checksum_of(buf, crc_offset) == stored_checksum(buf, crc_offset)


def seal(buf: bytearray, crc_offset: int = 4) -> bytearray:
    """Compute and store the checksum of ``buf`` in place; returns ``buf``."""
    buf[crc_offset:crc_offset + 4] = checksum_of(buf, crc_offset).to_bytes(4, "little")
    return buf
