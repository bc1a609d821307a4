"""CRC-32C (Castagnoli), as used by every checksummed VHDX structure.

MS-VHDX 2.2.2 / 2.2.3 / 2.3.1: the checksum is computed over the structure with
its own 4-byte checksum field set to zero, and stored little-endian.
"""

from __future__ import annotations

import zlib
from typing import Callable

import crcmod.predefined

# crcmod ships a C implementation; mkCrcFun picks it when available.
crc32c = crcmod.predefined.mkCrcFun("crc-32c")
"""``crc32c(data, crc=0) -> int``; the check value of ``b"123456789"`` is 0xE3069283."""

crc32 = zlib.crc32
"""Standard CRC-32 (ISO-HDLC, zlib's): the HyperVStorage container (.vmcx/.vmrs) uses
it instead of CRC-32C; check value of ``b"123456789"`` is 0xCBF43926."""

CrcFn = Callable[..., int]

_ZERO4 = b"\0\0\0\0"


def checksum_of(buf: bytes | bytearray | memoryview, crc_offset: int = 4, fn: CrcFn = crc32c) -> int:
    """CRC-32C (or ``fn``) of ``buf`` with the 4 bytes at ``crc_offset`` taken as zero."""
    mv = memoryview(buf)
    crc = fn(mv[:crc_offset])
    crc = fn(_ZERO4, crc)
    return fn(mv[crc_offset + 4:], crc)


def stored_checksum(buf: bytes | bytearray | memoryview, crc_offset: int = 4) -> int:
    return int.from_bytes(bytes(memoryview(buf)[crc_offset:crc_offset + 4]), "little")


def verify(buf: bytes | bytearray | memoryview, crc_offset: int = 4, fn: CrcFn = crc32c) -> bool:
    return checksum_of(buf, crc_offset, fn) == stored_checksum(buf, crc_offset)


def seal(buf: bytearray, crc_offset: int = 4, fn: CrcFn = crc32c) -> bytearray:
    """Compute and store the checksum of ``buf`` in place; returns ``buf``."""
    buf[crc_offset:crc_offset + 4] = checksum_of(buf, crc_offset, fn).to_bytes(4, "little")
    return buf
