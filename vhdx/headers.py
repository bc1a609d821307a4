"""The header section: file identifier, the two headers, the two region tables.

Policy (MS-VHDX 2.2; FORMAT.md §2.1, §3, §10):
- a header is valid when its signature, CRC-32C over 4 KiB and Version == 1 hold;
  the current one is the only valid one or the one with the greater sequence
  number; equal sequence numbers are accepted only when the two 4 KiB are
  byte-identical (Disk2VHD), slot 1 then counts as current;
- region table copy 1 is used when valid, else copy 2; a warning is recorded when
  a copy is bad or the two differ.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Callable

from construct import ConstructError

from . import structures as S
from .crc import verify
from .errors import ChecksumError, CorruptImageError, UnsupportedFeatureError

ReadFn = Callable[[int, int], bytes]
"""``read(offset, size) -> bytes`` (short at end of file)."""


@dataclass(frozen=True)
class Header:
    slot: int  # 0 or 1
    sequence_number: int
    file_write_guid: uuid.UUID
    data_write_guid: uuid.UUID
    log_guid: uuid.UUID
    log_version: int
    version: int
    log_length: int
    log_offset: int
    raw: bytes = field(repr=False)

    @property
    def log_dirty(self) -> bool:
        return self.log_guid != S.ZERO_GUID


@dataclass(frozen=True)
class Region:
    guid: uuid.UUID
    file_offset: int
    length: int
    required: bool

    @property
    def name(self) -> str:
        return S.KNOWN_REGIONS.get(self.guid, str(self.guid))


@dataclass
class HeaderSection:
    creator: str
    header: Header  # the current header
    headers: list[Header | None]  # per slot, None when invalid
    regions: list[Region]
    region_table_slot: int
    warnings: list[str]

    @property
    def bat_region(self) -> Region:
        return self._region(S.BAT_REGION_GUID)

    @property
    def metadata_region(self) -> Region:
        return self._region(S.METADATA_REGION_GUID)

    def _region(self, guid: uuid.UUID) -> Region:
        for r in self.regions:
            if r.guid == guid:
                return r
        raise CorruptImageError(f"region table has no {S.KNOWN_REGIONS[guid]} region")


def parse_file_identifier(buf: bytes) -> str:
    if len(buf) < 8 or buf[:8] != S.SIG_FILE:
        raise CorruptImageError("not a VHDX file (no 'vhdxfile' signature)")
    if len(buf) < 520:
        raise CorruptImageError("file identifier truncated")
    try:
        creator: str = S.FileIdentifier.parse(buf[:520]).creator
    except (UnicodeDecodeError, ConstructError):  # the creator is informational only
        return ""
    return creator


def parse_header(buf: bytes, slot: int) -> Header | None:
    """The header in ``buf`` if it is valid, else None."""
    if len(buf) < S.HEADER_SIZE or buf[:4] != S.SIG_HEADER or not verify(buf[:S.HEADER_SIZE]):
        return None
    h = S.parse(S.Header, buf[:S.HEADER_SIZE], f"header {slot + 1}")
    if h.version != 1:
        return None
    return Header(slot, h.sequence_number, h.file_write_guid, h.data_write_guid,
                  h.log_guid, h.log_version, h.version, h.log_length, h.log_offset,
                  bytes(buf[:S.HEADER_SIZE]))


def choose_header(headers: list[Header | None]) -> Header:
    """Current header per MS-VHDX 2.2.2.1 (+ the identical-headers exception)."""
    valid = [h for h in headers if h is not None]
    if not valid:
        raise CorruptImageError("no valid header (both header copies fail signature, checksum or version)")
    if len(valid) == 1:
        return valid[0]
    a, b = valid
    if a.sequence_number == b.sequence_number:
        if a.raw != b.raw:
            raise CorruptImageError("both headers are valid with the same sequence number but differ")
        return a
    return a if a.sequence_number > b.sequence_number else b


def parse_region_table(buf: bytes, slot: int) -> list[Region]:
    """Parse and validate one region table copy; raises CorruptImageError."""
    what = f"region table {slot + 1}"
    if len(buf) < S.REGION_TABLE_SIZE:
        raise CorruptImageError(f"{what} truncated")
    if buf[:4] != S.SIG_REGION:
        raise CorruptImageError(f"{what}: bad signature")
    if not verify(buf[:S.REGION_TABLE_SIZE]):
        raise ChecksumError(f"{what}: checksum mismatch")
    t = S.parse(S.RegionTable, buf[:S.REGION_TABLE_SIZE], what)
    regions = [Region(e.guid, e.file_offset, e.length, bool(e.required & S.REGION_REQUIRED))
               for e in t.entries]
    seen: set[uuid.UUID] = set()
    for r in regions:
        if r.guid in seen:
            raise CorruptImageError(f"{what}: region {r.name} listed twice")
        seen.add(r.guid)
    return regions


def validate_regions(regions: list[Region], header: Header, warnings: list[str]) -> None:
    """Region rules of MS-VHDX 2.2.3 (FORMAT.md §3, §10 rows 3, 6)."""
    for r in regions:
        if r.guid not in S.KNOWN_REGIONS:
            if r.required:
                raise UnsupportedFeatureError(f"unknown required region {r.guid}")
            warnings.append(f"ignoring unknown optional region {r.guid}")
        if r.file_offset % S.ALIGNMENT or r.file_offset < S.HEADER_SECTION_SIZE:
            raise CorruptImageError(f"region {r.name} at {r.file_offset:#x} is not 1 MiB aligned "
                                    "past the header section")
        if r.length == 0 or r.length % S.ALIGNMENT:
            raise CorruptImageError(f"region {r.name} length {r.length:#x} is not a non-zero multiple of 1 MiB")
    for guid in S.KNOWN_REGIONS:
        if not any(r.guid == guid for r in regions):
            raise CorruptImageError(f"region table has no {S.KNOWN_REGIONS[guid]} region")
    spans = [(r.file_offset, r.file_offset + r.length, f"region {r.name}") for r in regions]
    if header.log_length:
        spans.append((header.log_offset, header.log_offset + header.log_length, "log"))
    spans.sort()
    for (s1, e1, n1), (s2, e2, n2) in zip(spans, spans[1:]):
        if s2 < e1:
            raise CorruptImageError(f"{n1} overlaps {n2}")


def validate_log_fields(header: Header) -> None:
    """MS-VHDX 2.2.2 LogVersion/LogOffset/LogLength rules (FORMAT.md §6.4 steps 2-3)."""
    if header.log_version != 0 and header.log_dirty:
        raise UnsupportedFeatureError(f"log version {header.log_version} is not supported")
    if header.log_dirty and header.log_length == 0:
        # No region to hold the entries the LogGuid promises (and nothing to scan).
        raise CorruptImageError("header LogGuid is set but LogLength is 0")
    if header.log_length % S.ALIGNMENT:
        raise CorruptImageError(f"log length {header.log_length:#x} is not a multiple of 1 MiB")
    if header.log_dirty and header.log_length == 0:  # found by fuzzing: a replay would divide by it
        raise CorruptImageError("the log is marked dirty (LogGuid set) but its length is 0")
    if header.log_length and (header.log_offset % S.ALIGNMENT or header.log_offset < S.HEADER_SECTION_SIZE):
        raise CorruptImageError(f"log offset {header.log_offset:#x} is not 1 MiB aligned past the header section")


def read_header_section(read: ReadFn) -> HeaderSection:
    """Parse the first 1 MiB of a VHDX file through ``read``."""
    creator = parse_file_identifier(read(0, 520))
    warnings: list[str] = []
    headers = [parse_header(read(off, S.HEADER_SIZE), i) for i, off in enumerate(S.HEADER_OFFSETS)]
    header = choose_header(headers)
    for i, h in enumerate(headers):
        if h is None:
            warnings.append(f"header {i + 1} is invalid; using header {header.slot + 1}")
    validate_log_fields(header)

    tables: list[list[Region] | None] = []
    errors: list[str] = []
    for i, off in enumerate(S.REGION_TABLE_OFFSETS):
        try:
            tables.append(parse_region_table(read(off, S.REGION_TABLE_SIZE), i))
        except CorruptImageError as e:
            tables.append(None)
            errors.append(str(e))
    slot = 0 if tables[0] is not None else 1
    regions = tables[slot]
    if regions is None:
        raise CorruptImageError("no valid region table: " + "; ".join(errors))
    if errors:
        warnings.append(f"{errors[0]}; using region table {slot + 1}")
    elif tables[0] != tables[1]:
        warnings.append("region table copies differ; using copy 1")
    validate_regions(regions, header, warnings)
    return HeaderSection(creator, header, headers, regions, slot, warnings)
