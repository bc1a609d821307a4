"""Partition tables of a virtual disk: MBR (primary, extended and logical) and GPT.

Numbers follow Linux (block/partitions/msdos.c, efi.c), so ``<stem>.p<N>.raw``
of ``vhdx mount`` is the ``/dev/sdaN`` a kernel would show: MBR primaries are
1-4 by slot, logical partitions count from 5 in the order of the EBR chain; GPT
partitions are numbered by their entry index + 1 (empty entries leave gaps).
The extended container itself is listed (as sfdisk lists it) with
``Partition.container`` true.

GPT LBAs are logical sectors of the disk (512 or 4096 bytes). Both GPT CRCs
(header and entry array) are plain CRC-32 (UEFI 2.10 §5.3.2), not the CRC-32C
of VHDX structures. A damaged primary header falls back to the backup with a
warning. Hostile tables are bounded: an EBR chain stops at a loop, after 256
logical partitions or when it leaves the extended container; the entry array
is at most :data:`MAX_GPT_ARRAY` bytes; entries past the end of the disk are
dropped or truncated with a warning. Tables that cannot be used at all raise
:class:`~vhdx.errors.PartitionTableError`.
"""

from __future__ import annotations

import uuid
import zlib
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import construct as c
from construct import Array, Bytes, Const, Int8ul, Int32ul, Int64ul, Struct

from .errors import PartitionTableError
from .structures import Guid

__all__ = [
    "GPT_SIGNATURE",
    "MAX_GPT_ARRAY",
    "MAX_LOGICAL",
    "GptEntry",
    "GptHeader",
    "Mbr",
    "MbrEntry",
    "Partition",
    "read_partitions",
]

MBR_SIGNATURE = b"\x55\xaa"
GPT_SIGNATURE = b"EFI PART"
PROTECTIVE_TYPE = 0xEE
EXTENDED_TYPES = frozenset((0x05, 0x0F, 0x85))
MAX_LOGICAL = 256          # Linux's DISK_MAX_PARTS bounds the chain the same way
MAX_GPT_ARRAY = 8 << 20    # bytes; UEFI's minimum is 16 KiB, real tables stay far below this
GPT_ATTR_LEGACY_BOOTABLE = 1 << 2
ZERO_GUID = uuid.UUID(int=0)

# --- declarations ---------------------------------------------------------------
MbrEntry = Struct(
    "status" / Int8ul,           # 0x80: bootable
    "chs_first" / Bytes(3),
    "type" / Int8ul,
    "chs_last" / Bytes(3),
    "lba_first" / Int32ul,       # relative to the table's own reference point
    "sectors" / Int32ul,
)
assert MbrEntry.sizeof() == 16

Mbr = Struct(                    # the first 512 bytes of sector 0 (or of an EBR)
    "bootstrap" / Bytes(440),
    "disk_signature" / Int32ul,
    "reserved" / Bytes(2),
    "entries" / Array(4, MbrEntry),
    "signature" / Bytes(2),
)
assert Mbr.sizeof() == 512

GptHeader = Struct(
    "signature" / Const(GPT_SIGNATURE),
    "revision" / Int32ul,
    "header_size" / Int32ul,
    "header_crc32" / Int32ul,
    "reserved" / Int32ul,
    "my_lba" / Int64ul,
    "alternate_lba" / Int64ul,
    "first_usable_lba" / Int64ul,
    "last_usable_lba" / Int64ul,
    "disk_guid" / Guid,
    "entries_lba" / Int64ul,
    "entry_count" / Int32ul,
    "entry_size" / Int32ul,
    "entries_crc32" / Int32ul,
)
GPT_HEADER_MIN = GptHeader.sizeof()  # 92
assert GPT_HEADER_MIN == 92

GptEntry = Struct(
    "type_guid" / Guid,
    "unique_guid" / Guid,
    "first_lba" / Int64ul,
    "last_lba" / Int64ul,        # inclusive
    "attributes" / Int64ul,
    "name" / Bytes(72),          # UTF-16LE, NUL-padded
)
assert GptEntry.sizeof() == 128


class _Disk(Protocol):
    @property
    def size(self) -> int: ...

    @property
    def logical_sector_size(self) -> int: ...

    def read_at(self, offset: int, size: int) -> bytes: ...


PartitionScheme = Literal["mbr", "gpt"]


@dataclass(frozen=True)
class Partition:
    """One partition: where it lies on the virtual disk and what the table says of it."""

    number: int                  # as Linux numbers it (sdaN)
    offset: int                  # bytes from the start of the disk
    length: int                  # bytes
    scheme: PartitionScheme
    type: int | str              # MBR system id, or GPT type GUID (upper case, as sgdisk prints)
    name: str = ""               # GPT partition name
    guid: str | None = None      # GPT unique partition GUID
    bootable: bool = False       # MBR status 0x80, GPT attribute bit 2
    container: bool = False      # an MBR extended partition (holds the logical ones)

    def to_dict(self) -> dict[str, Any]:
        return {"number": self.number, "offset": self.offset, "length": self.length,
                "scheme": self.scheme,
                "type": self.type if isinstance(self.type, str) else f"{self.type:#04x}",
                "name": self.name, "guid": self.guid, "bootable": self.bootable,
                "container": self.container}


def _warn(warnings: list[str] | None, text: str) -> None:
    if warnings is not None:
        warnings.append(text)


def _read(disk: _Disk, offset: int, size: int) -> bytes:
    data = disk.read_at(offset, size)
    if len(data) < size:
        raise PartitionTableError(f"partition table at byte {offset} lies past the end of the disk")
    return data


def _parse(struct: c.Construct, data: bytes) -> Any:
    try:
        return struct.parse(data)
    except c.ConstructError:
        return None


def read_partitions(disk: _Disk, warnings: list[str] | None = None) -> list[Partition]:
    """The partitions of ``disk`` (anything with ``read_at``, ``size`` and
    ``logical_sector_size``), sorted by number; [] when sector 0 holds no table.

    Recoverable damage is reported by appending to ``warnings``; a table that
    cannot be read at all raises :class:`PartitionTableError`.
    """
    lss = disk.logical_sector_size
    if disk.size < 512:
        return []
    mbr = Mbr.parse(_read(disk, 0, 512))
    # Like Linux: a boot indicator other than 0 / 0x80 means sector 0 is no
    # partition table (a file system's boot sector, say).
    if mbr.signature != MBR_SIGNATURE or any(e.status not in (0, 0x80) for e in mbr.entries):
        return []
    if any(e.type == PROTECTIVE_TYPE for e in mbr.entries):
        return _read_gpt(disk, lss, warnings)
    return _read_mbr(disk, mbr, lss, warnings)


# --- MBR ---------------------------------------------------------------------------
def _place(disk: _Disk, number: int, start: int, length: int,
           warnings: list[str] | None) -> tuple[int, int] | None:
    """(offset, length) clipped to the disk, or None (with a warning) when it lies past it."""
    if start >= disk.size:
        _warn(warnings, f"partition {number} starts at byte {start}, past the end of the disk; ignored")
        return None
    if start + length > disk.size:
        _warn(warnings, f"partition {number} extends past the end of the disk; truncated")
        length = disk.size - start
    return start, length


def _read_mbr(disk: _Disk, mbr: Any, lss: int, warnings: list[str] | None) -> list[Partition]:
    out: list[Partition] = []
    extended: list[tuple[int, int]] = []
    for slot, e in enumerate(mbr.entries):
        if not e.sectors:  # Linux skips empty slots only, whatever their type
            continue
        number = slot + 1
        placed = _place(disk, number, e.lba_first * lss, e.sectors * lss, warnings)
        if placed is None:
            continue
        is_ext = e.type in EXTENDED_TYPES
        out.append(Partition(number, placed[0], placed[1], "mbr", e.type,
                             bootable=e.status == 0x80, container=is_ext))
        if is_ext:
            extended.append(placed)
    if extended:
        # Linux follows the first extended partition only (msdos.c).
        out.extend(_read_logical(disk, extended[0], lss, warnings))
    return sorted(out, key=lambda p: p.number)


def _read_logical(disk: _Disk, container: tuple[int, int], lss: int,
                  warnings: list[str] | None) -> list[Partition]:
    """The logical partitions of the EBR chain in ``container`` (offset, length)."""
    first, first_len = container
    out: list[Partition] = []
    seen: set[int] = set()
    ebr_at, ebr_len = first, first_len
    while True:
        if ebr_at in seen:
            _warn(warnings, f"extended partition: the EBR chain loops back to byte {ebr_at}; stopped")
            break
        if len(out) >= MAX_LOGICAL:
            _warn(warnings, f"extended partition: more than {MAX_LOGICAL} logical partitions; stopped")
            break
        seen.add(ebr_at)
        if ebr_at + 512 > disk.size or not first <= ebr_at < first + first_len:
            _warn(warnings, f"extended partition: EBR at byte {ebr_at} lies outside the container; stopped")
            break
        ebr = Mbr.parse(_read(disk, ebr_at, 512))
        if ebr.signature != MBR_SIGNATURE:
            if ebr_at != first:
                _warn(warnings, f"extended partition: EBR at byte {ebr_at} has no 55AA signature; stopped")
            break
        # Like Linux: every non-empty, non-extended entry is a logical partition,
        # the 3rd and 4th only when they fit (they often hold garbage).
        for i, e in enumerate(ebr.entries):
            if not e.sectors or e.type in EXTENDED_TYPES:
                continue
            start, length = ebr_at + e.lba_first * lss, e.sectors * lss
            if i >= 2 and (e.lba_first * lss + length > ebr_len or start + length > first + first_len):
                continue
            number = 5 + len(out)
            placed = _place(disk, number, start, length, warnings)
            if placed is not None:
                out.append(Partition(number, placed[0], placed[1], "mbr", e.type,
                                     bootable=e.status == 0x80))
            if len(out) >= MAX_LOGICAL:
                break
        link = next((e for e in ebr.entries if e.sectors and e.type in EXTENDED_TYPES), None)
        if link is None:
            break
        # The link's start is relative to the extended container, not to this EBR.
        ebr_at, ebr_len = first + link.lba_first * lss, link.sectors * lss
    return out


# --- GPT ---------------------------------------------------------------------------
def _gpt_header(disk: _Disk, lba: int, lss: int, which: str) -> tuple[Any, str | None]:
    """(parsed header, None) if the header at ``lba`` is valid, else (None, why)."""
    last_lba = disk.size // lss - 1
    if lba < 1 or lba > last_lba:
        return None, f"{which} GPT header LBA {lba} lies outside the disk"
    raw = _read(disk, lba * lss, lss)
    h = _parse(GptHeader, raw[:GPT_HEADER_MIN])
    if h is None:
        return None, f"{which} GPT header: no 'EFI PART' signature at LBA {lba}"
    if not GPT_HEADER_MIN <= h.header_size <= lss:
        return None, f"{which} GPT header: header size {h.header_size} is out of bounds"
    body = bytearray(raw[:h.header_size])
    body[16:20] = b"\0\0\0\0"
    if zlib.crc32(body) != h.header_crc32:
        return None, f"{which} GPT header: header CRC32 mismatch"
    if h.my_lba != lba:
        return None, f"{which} GPT header: it says it lies at LBA {h.my_lba}, found at {lba}"
    if h.entry_size < 128 or h.entry_size % 8 or h.entry_size > 1 << 16:
        return None, f"{which} GPT header: entry size {h.entry_size} is invalid"
    if h.entry_count * h.entry_size > MAX_GPT_ARRAY:
        return None, (f"{which} GPT header: {h.entry_count} entries of {h.entry_size} bytes "
                      f"exceed {MAX_GPT_ARRAY} bytes")
    array_sectors = -(-h.entry_count * h.entry_size // lss)
    if h.entries_lba < 1 or h.entries_lba + array_sectors - 1 > last_lba:
        return None, f"{which} GPT header: the entry array at LBA {h.entries_lba} lies outside the disk"
    if h.first_usable_lba > h.last_usable_lba + 1 or h.last_usable_lba > last_lba:
        return None, f"{which} GPT header: usable LBAs {h.first_usable_lba}-{h.last_usable_lba} are invalid"
    return h, None


def _gpt_entries(disk: _Disk, h: Any, lss: int, which: str) -> tuple[bytes | None, str | None]:
    raw = _read(disk, h.entries_lba * lss, h.entry_count * h.entry_size)
    if zlib.crc32(raw) != h.entries_crc32:
        return None, f"{which} GPT entry array: CRC32 mismatch"
    return raw, None


def _read_gpt(disk: _Disk, lss: int, warnings: list[str] | None) -> list[Partition]:
    last_lba = disk.size // lss - 1
    problems: list[str] = []
    chosen = None
    primary, why = _gpt_header(disk, 1, lss, "primary")
    if primary is not None:
        raw, why = _gpt_entries(disk, primary, lss, "primary")
        if raw is not None:
            chosen = (primary, raw)
    problems += [why] if why else []
    if chosen is None:
        # The backup normally sits on the last LBA; a valid primary may say otherwise.
        candidates = [last_lba]
        if primary is not None and primary.alternate_lba != last_lba:
            candidates.insert(0, primary.alternate_lba)
        for lba in candidates:
            backup, why = _gpt_header(disk, lba, lss, "backup")
            if backup is not None:
                raw, why = _gpt_entries(disk, backup, lss, "backup")
                if raw is not None:
                    chosen = (backup, raw)
                    break
            if why:
                problems.append(why)
        if chosen is None:
            raise PartitionTableError("GPT unusable: " + "; ".join(p for p in problems if p))
        _warn(warnings, f"{problems[0]}; using the backup GPT header at LBA {chosen[0].my_lba}")
    h, raw = chosen
    out: list[Partition] = []
    for i in range(h.entry_count):
        rec = raw[i * h.entry_size:i * h.entry_size + 128]
        e = GptEntry.parse(rec)
        if e.type_guid == ZERO_GUID:
            continue
        number = i + 1
        if e.last_lba < e.first_lba:
            _warn(warnings, f"GPT partition {number}: last LBA {e.last_lba} precedes first LBA "
                            f"{e.first_lba}; ignored")
            continue
        placed = _place(disk, number, e.first_lba * lss, (e.last_lba - e.first_lba + 1) * lss, warnings)
        if placed is None:
            continue
        name = bytes(e.name).decode("utf-16-le", "replace").split("\0", 1)[0]
        out.append(Partition(number, placed[0], placed[1], "gpt", str(e.type_guid).upper(), name,
                             str(e.unique_guid).upper(), bool(e.attributes & GPT_ATTR_LEGACY_BOOTABLE)))
    return out
