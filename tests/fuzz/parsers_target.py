"""The raw-parser fuzz target's body (shared with tests/test_fuzz.py's replay).

Byte 0 picks the parser; the rest is its input. Checksummed structures are
resealed first (an attacker fixes the CRC), so the parser behind the check runs.
"""

from __future__ import annotations

import uuid

from vhdx import structures as S
from vhdx.crc import seal
from vhdx.errors import VhdxError
from vhdx.headers import parse_header, parse_region_table
from vhdx.log import plan_replay
from vhdx.metadata import parse_metadata, parse_parent_locator


def _pad(data: bytes, size: int) -> bytearray:
    return bytearray(data[:size].ljust(size, b"\0"))


def one(data: bytes) -> None:
    if len(data) < 2:
        return
    which, body = data[0] % 5, data[1:]
    try:
        if which == 0:
            parse_parent_locator(body)
        elif which == 1:
            region = _pad(body, 64 * 1024)
            parse_metadata(lambda off, n: bytes(region[off:off + n]), len(region))
        elif which == 2:
            buf = _pad(body, S.HEADER_SIZE)
            buf[0:4] = S.SIG_HEADER
            parse_header(bytes(seal(buf)), 0)
        elif which == 3:
            buf = _pad(body, S.REGION_TABLE_SIZE)
            buf[0:4] = S.SIG_REGION
            parse_region_table(bytes(seal(buf)), 0)
        else:
            # A log of 4 sectors whose first entry is resealed; GUID from the entry.
            log = _pad(body, 4 * 4096)
            length = int.from_bytes(log[8:12], "little")
            if log[0:4] == S.SIG_LOG_ENTRY and 4096 <= length <= len(log) and length % 4096 == 0:
                chunk = bytearray(log[:length])
                seal(chunk)
                log[:length] = chunk
            guid = uuid.UUID(bytes_le=bytes(log[16:32]))
            plan_replay(bytes(log), len(log), guid, 8 << 20)
    except VhdxError:
        pass
