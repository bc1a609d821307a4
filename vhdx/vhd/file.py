"""One legacy VHD / AVHD file opened read-only (:class:`VhdFile`).

Parses the footer (end copy, 511-byte variant, copy at offset 0 with fallback),
the dynamic header, the BAT and the parent locators, and answers "which sectors
of block b are in this file". Every bound of vhd.md §10 is enforced before memory
is allocated or a byte is read, so a hostile file costs at most a bounded BAT
read. Parents are found in :mod:`vhdx.vhd.chain`.
"""

from __future__ import annotations

import bisect
import os
import re
import sys
import threading
import uuid
from array import array
from collections.abc import Iterator
from typing import Any

from ..errors import (
    ChecksumError,
    CorruptImageError,
    UnsupportedFeatureError,
    VhdxError,
)
from ..fdio import open_regular_file, pread_into
from ..image import Extent, ExtentKind, append_own_extent
from ..locking import lock_image
from ..native import bitmap_runs
from . import structures as S

# Runs of one block's sector bitmap: (first sector in block, sector count, present).
Runs = list[tuple[int, int, bool]]

_RUN_CACHE_BLOCKS = 4096
_NOT_FF = re.compile(rb"[^\xff]")
NOMINAL_FIXED_BLOCK = 2 * 1024 * 1024  # a fixed VHD has no blocks; reported for block-wise callers


def _vhd_time(ts: int) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(ts + S.EPOCH_OFFSET, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _pread(fd: int, offset: int, size: int, path: str) -> bytes:
    buf = bytearray(size)
    pread_into(fd, memoryview(buf), offset, path)
    return bytes(buf)


def footer_candidates(fd: int, file_size: int, path: str) -> list[tuple[str, int, bytes]]:
    """(where, offset, 512 bytes) of every place a footer may be: the end (512, then
    the pre-2004 511-byte variant, vhd.md §2.1) and the copy at offset 0."""
    out = []
    if file_size >= S.FOOTER_SIZE:
        out.append(("end", file_size - 512, _pread(fd, file_size - 512, 512, path)))
    if file_size >= 511:
        tail = _pread(fd, file_size - 511, 511, path)
        if tail[:8] == S.COOKIE_FOOTER:
            out.append(("end (511 bytes)", file_size - 511, tail + b"\0"))
    if file_size >= S.FOOTER_SIZE:
        out.append(("copy at offset 0", 0, _pread(fd, 0, 512, path)))
    return out


def is_vhd_fd(fd: int, path: str = "") -> bool:
    """True when the file carries a VHD footer at its end or a footer copy at 0."""
    size = os.fstat(fd).st_size
    return any(b[:8] == S.COOKIE_FOOTER for _, _, b in footer_candidates(fd, size, path))


def is_vhd_file(path: str | os.PathLike[str]) -> bool:
    """Detect a VHD by signature ("conectix" at EOF-512/EOF-511 or at 0), never by name.
    Anything but a path (an open file object) is not probed: False."""
    if not isinstance(path, (str, bytes, os.PathLike)):
        return False
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except (OSError, ValueError):
        return False
    try:
        import stat

        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        if os.pread(fd, 8, 0) == b"vhdxfile":
            return False
        return is_vhd_fd(fd, os.fspath(path))
    finally:
        os.close(fd)


def _skip_unused(raw: bytes, b: int, n: int) -> int:
    """First entry at or after ``b`` that is not 0xFFFFFFFF (n when none): one
    byte search for a byte other than 0xFF, realigned to its entry."""
    pos = 4 * b
    while pos < 4 * n:
        m = _NOT_FF.search(raw, pos)
        if m is None:
            return n
        e = m.start() // 4
        if raw[4 * e:4 * e + 4] != b"\xff\xff\xff\xff":
            return e
        pos = 4 * (e + 1)
    return n


def _checksum_ok(raw: bytes, off: int) -> bool:
    return int.from_bytes(raw[off:off + 4], "big") == S.checksum(raw, off)


class VhdFile:
    """A single fixed, dynamic or differencing VHD (or .avhd), read-only.

    ``ignore_checksums`` accepts a file whose footer copies and dynamic header all
    fail their checksums (forensic use; a warning is recorded instead). An own
    descriptor (``fd`` None) takes a reader's lock (:mod:`vhdx.locking`: LockedError
    while a writer, vhdx or QEMU, holds the file) unless ``force_share``.
    """

    logical_sector_size = S.SECTOR
    physical_sector_size = S.SECTOR
    overlay = None  # no log: nothing patches reads (the VHDX reader's attribute)

    def __init__(self, path: str | os.PathLike[str], fd: int | None = None, *,
                 ignore_checksums: bool = False, force_share: bool = False) -> None:
        self.path = os.fspath(path)
        self._owns_fd = fd is None
        self.fd = open_regular_file(path) if fd is None else fd
        self.ignore_checksums = ignore_checksums
        self.warnings: list[str] = []
        self._runs: dict[int, Runs] = {}
        self.parent_unique_id: bytes | None = None
        self.parent_locator: dict[str, str] | None = None
        self.header: Any = None  # construct container of the dynamic header (None: fixed)
        self._lock = threading.Lock()
        try:
            if fd is None:  # an own descriptor takes a reader's lock, as ImageFile does
                lock_image(self.fd, self.path, write=False, force_share=force_share)
            self._load()
        except BaseException:
            self.close()
            raise

    # --- parsing -----------------------------------------------------------------
    def _load(self) -> None:
        self.file_size = os.fstat(self.fd).st_size
        if self.file_size < S.FOOTER_SIZE:
            raise CorruptImageError(f"{self.path}: {self.file_size} bytes is too small for a VHD")
        self._choose_footer()
        f = self.footer
        if f.version >> 16 != 1:
            raise UnsupportedFeatureError(f"{self.path}: VHD format version {f.version:#010x} (only 1.x exists)")
        if f.disk_type not in S.TYPE_NAMES:
            raise UnsupportedFeatureError(f"{self.path}: VHD disk type {f.disk_type} is not fixed, dynamic "
                                          "or differencing")
        self.disk_type = f.disk_type
        self.virtual_size = f.current_size
        if self.virtual_size % S.SECTOR:
            raise CorruptImageError(f"{self.path}: current size {self.virtual_size} is not a multiple of 512")
        self.unique_id = bytes(f.unique_id)
        self.creator_app = bytes(f.creator_app)
        self.chs_size = f.cylinders * f.heads * f.sectors_per_track * S.SECTOR
        if self.disk_type == S.TYPE_FIXED:
            self._load_fixed()
        else:
            self._load_dynamic()

    def _choose_footer(self) -> None:
        """Footer policy (vhd.md §2.1): the end copy when its checksum holds, else the copy
        at offset 0 (dynamic/differencing only), else with ``ignore_checksums`` the
        first copy carrying the cookie; each fallback leaves a warning."""
        cands = footer_candidates(self.fd, self.file_size, self.path)
        valid: list[tuple[str, int, bytes, Any]] = []
        cookie_only: list[tuple[str, int, bytes, Any]] = []
        for where, off, raw in cands:
            if raw[:8] != S.COOKIE_FOOTER:
                continue
            fields = S.Footer.parse(raw)
            if where.startswith("copy") and fields.disk_type not in (S.TYPE_DYNAMIC, S.TYPE_DIFFERENCING):
                continue  # offset 0 of a fixed disk is guest data, never a footer
            (valid if _checksum_ok(raw, S.FOOTER_CHECKSUM_OFFSET) else cookie_only).append((where, off, raw, fields))
        if not valid and not cookie_only:
            raise CorruptImageError(f"{self.path}: no VHD footer ('conectix') at the end of the file or at offset 0")
        if valid:
            where, off, raw, fields = valid[0]
            if where.startswith("copy"):
                self.warnings.append("the footer at the end of the file is missing or fails its checksum; "
                                     "using the copy at offset 0")
            for w2, _, raw2, _ in valid[1:]:
                if raw2 != raw:
                    self.warnings.append(f"the footer {w2} differs from the {where} footer (the latter is used)")
            for w2, _, _, _ in cookie_only:
                if not (w2.startswith("copy") and where.startswith("copy")):
                    self.warnings.append(f"the footer {w2} fails its checksum (the {where} footer is used)")
            if fields.disk_type != S.TYPE_FIXED and not any(
                    c[0].startswith("copy") for c in valid + cookie_only):
                self.warnings.append("the footer copy at offset 0 is missing")
        else:
            where, off, raw, fields = cookie_only[0]
            if not self.ignore_checksums:
                raise ChecksumError(f"{self.path}: every VHD footer copy fails its checksum "
                                    "(open with ignore_checksums / --ignore-checksums to read it anyway)")
            self.warnings.append(f"every footer copy fails its checksum; using the {where} footer "
                                 "because checksums are ignored")
        self.footer, self.footer_raw, self.footer_where = fields, raw, where
        # Where the file's data may end: the end footer's position, whichever copy won.
        self.footer_offset = next((o for w, o, r in cands if w.startswith("end") and r[:8] == S.COOKIE_FOOTER),
                                  self.file_size)

    def _load_fixed(self) -> None:
        self.block_size = NOMINAL_FIXED_BLOCK
        self.header = None
        self.bat = array("I")
        self.max_table_entries = 0
        self.bitmap_size = 0
        self.locators: list[dict[str, Any]] = []
        self.parent_locator = None
        self.parent_unique_id = None
        self.parent_timestamp = 0
        self.parent_name = ""
        if self.footer.data_offset not in (S.NO_DATA_OFFSET, 0xFFFFFFFF):
            self.warnings.append(f"fixed disk with Data Offset {self.footer.data_offset:#x} (expected all ones)")
        if self.footer_offset < self.virtual_size:
            raise CorruptImageError(f"{self.path}: fixed VHD of {self.virtual_size} bytes but only "
                                    f"{self.footer_offset} bytes of data (truncated?)")
        if self.footer_offset > self.virtual_size:
            self.warnings.append(f"{self.footer_offset - self.virtual_size} bytes between the data and the footer")

    def _load_dynamic(self) -> None:
        f = self.footer
        limit = self.footer_offset
        if self.virtual_size > S.MAX_VIRTUAL_SIZE:
            raise UnsupportedFeatureError(f"{self.path}: virtual size {self.virtual_size} exceeds the "
                                          "2040 GiB limit of dynamic VHDs")
        hoff = f.data_offset
        if hoff < 512 or hoff % 512 or hoff + S.HEADER_SIZE > limit:
            raise CorruptImageError(f"{self.path}: dynamic header offset {hoff:#x} is outside the file")
        raw = _pread(self.fd, hoff, S.HEADER_SIZE, self.path)
        if raw[:8] != S.COOKIE_HEADER:
            raise CorruptImageError(f"{self.path}: no dynamic disk header ('cxsparse') at {hoff:#x}")
        if not _checksum_ok(raw, S.HEADER_CHECKSUM_OFFSET):
            if not self.ignore_checksums:
                raise ChecksumError(f"{self.path}: the dynamic disk header fails its checksum "
                                    "(open with ignore_checksums / --ignore-checksums to read it anyway)")
            self.warnings.append("the dynamic disk header fails its checksum; used because checksums are ignored")
        h = S.DynamicHeader.parse(raw)
        self.header, self.header_offset, self.header_raw = h, hoff, raw
        if h.version != S.VERSION:
            raise UnsupportedFeatureError(f"{self.path}: dynamic header version {h.version:#010x}")
        bs = h.block_size
        if bs < S.SECTOR or bs & (bs - 1) or bs > S.MAX_BLOCK_SIZE:
            raise CorruptImageError(f"{self.path}: block size {bs} is not a power of two between 512 and "
                                    f"{S.MAX_BLOCK_SIZE}")
        self.block_size = bs
        self.sectors_per_block = bs // S.SECTOR
        self.bitmap_size = S.bitmap_bytes(bs)
        self.blocks = -(-self.virtual_size // bs)
        self.max_table_entries = h.max_table_entries
        if h.max_table_entries < self.blocks:
            raise CorruptImageError(f"{self.path}: BAT has {h.max_table_entries} entries but the disk "
                                    f"needs {self.blocks}")
        if self.blocks > S.MAX_BAT_ENTRIES:
            raise UnsupportedFeatureError(f"{self.path}: {self.blocks} blocks of {bs} bytes exceed the "
                                          f"limit of {S.MAX_BAT_ENTRIES} BAT entries")
        toff = h.table_offset
        if toff % 512 or toff < 512 or toff + 4 * self.blocks > limit:
            raise CorruptImageError(f"{self.path}: BAT at {toff:#x} with {self.blocks} entries lies outside the file")
        self.table_offset = toff
        bat = array("I")
        bat.frombytes(_pread(self.fd, toff, 4 * self.blocks, self.path))
        if bat.itemsize != 4:
            raise VhdxError("this platform has no 32-bit array type")
        if sys.byteorder == "little":
            bat.byteswap()  # entries are big-endian (vhd.md §5.1)
        self.bat = bat
        self._validate_bat(limit)
        self._load_parent_fields(h)

    def _validate_bat(self, limit: int) -> None:
        """Every allocated block (bitmap + data) must lie inside the file, after the
        header and the BAT (vhd.md §10)."""
        span = self.bitmap_size + self.block_size
        meta_end = max(self.header_offset + S.HEADER_SIZE, self.table_offset + 4 * self.blocks)
        meta_start = min(self.header_offset, self.table_offset)
        for b, e in enumerate(self.bat):
            if e == S.UNUSED:
                continue
            off = e * S.SECTOR
            if off + span > limit:
                raise CorruptImageError(f"{self.path}: BAT entry {b} puts the block at {off:#x}, past the "
                                        f"end of the data ({limit:#x}; truncated?)")
            if off < 512 or (off < meta_end and off + span > meta_start):
                raise CorruptImageError(f"{self.path}: BAT entry {b} puts the block at {off:#x}, over the "
                                        "footer copy, header or BAT")

    def _load_parent_fields(self, h: Any) -> None:  # h: the parsed DynamicHeader container
        self.parent_unique_id = bytes(h.parent_unique_id) if self.disk_type == S.TYPE_DIFFERENCING else None
        self.parent_timestamp = h.parent_timestamp
        name = bytes(h.parent_unicode_name)
        units = [name[i:i + 2] for i in range(0, len(name), 2)]
        end = next((i for i, u in enumerate(units) if u == b"\0\0"), len(units))
        self.parent_name = b"".join(units[:min(end, S.MAX_PARENT_NAME_UNITS)]).decode("utf-16-be", "replace")
        self.locators = []
        loc: dict[str, str] = {}
        for slot, ent in enumerate(h.locators):
            code = bytes(ent.platform_code)
            if code == S.PLATFORM_NONE:
                continue
            info = {"slot": slot, "code": code.decode("latin-1"), "data_space": ent.data_space,
                    "data_length": ent.data_length, "data_offset": ent.data_offset, "value": None}
            self.locators.append(info)
            problem = self._locator_problem(code, ent)
            if problem:
                info["problem"] = problem
                if self.disk_type == S.TYPE_DIFFERENCING:
                    self.warnings.append(f"parent locator {slot} ({info['code']!r}): {problem}; ignored")
                continue
            data = _pread(self.fd, ent.data_offset, ent.data_length, self.path)
            value = self._decode_locator(code, data)
            if value is None or "\0" in value:
                info["problem"] = "undecodable or contains NUL"
                self.warnings.append(f"parent locator {slot} ({info['code']!r}) holds no usable path; ignored")
                continue
            info["value"] = value
            loc.setdefault(info["code"].strip(), value)
        if self.parent_name:
            loc["parent_unicode_name"] = self.parent_name
        self.parent_locator = loc if self.disk_type == S.TYPE_DIFFERENCING else None

    def _locator_problem(self, code: bytes, ent: Any) -> str | None:  # ent: a parsed locator entry
        if code not in S.PLATFORM_CODES:
            return f"unknown platform code {code!r}"
        if ent.data_length == 0:
            return "empty"
        if ent.data_length > S.MAX_LOCATOR_LENGTH:
            return f"length {ent.data_length} exceeds {S.MAX_LOCATOR_LENGTH}"
        if ent.data_offset + ent.data_length > self.file_size:
            return f"data at {ent.data_offset:#x}+{ent.data_length} lies outside the file"
        if code in (S.PLATFORM_W2RU, S.PLATFORM_W2KU) and ent.data_length % 2:
            return "odd length for a UTF-16 string"
        return None

    @staticmethod
    def _decode_locator(code: bytes, data: bytes) -> str | None:
        if code in (S.PLATFORM_W2RU, S.PLATFORM_W2KU):
            # UTF-16LE without terminator (vhd.md §6); unpaired surrogates are replaced.
            return data.decode("utf-16-le", "replace").rstrip("\0")
        if code in (S.PLATFORM_WI2R, S.PLATFORM_WI2K):
            return data.decode("latin-1").rstrip("\0")
        if code == S.PLATFORM_MACX:
            return data.decode("utf-8", "replace").rstrip("\0")
        return None  # Mac alias records are opaque

    # --- properties ----------------------------------------------------------------
    @property
    def type_name(self) -> str:
        return S.TYPE_NAMES[self.disk_type]

    @property
    def is_fixed(self) -> bool:
        return bool(self.disk_type == S.TYPE_FIXED)

    @property
    def has_parent(self) -> bool:
        return bool(self.disk_type == S.TYPE_DIFFERENCING)

    @property
    def creator(self) -> str:
        f = self.footer
        app = self.creator_app.decode("latin-1").rstrip("\0 ")
        return f"{app} {f.creator_version >> 16}.{f.creator_version & 0xFFFF}"

    @property
    def virtual_disk_id(self) -> uuid.UUID:
        """The Unique Id as Windows displays it (GUID structure, vhd.md §0)."""
        return uuid.UUID(bytes_le=self.unique_id)

    data_write_guid = virtual_disk_id  # VHD linkage identity: the same Unique Id

    @property
    def closed(self) -> bool:
        return self.fd < 0

    # --- blocks --------------------------------------------------------------------
    def block_offset(self, block: int) -> int | None:
        """File offset of block ``block``'s sector bitmap, or None when unallocated."""
        if block >= len(self.bat):
            return None
        e = self.bat[block]
        return None if e == S.UNUSED else e * S.SECTOR

    def allocated_blocks(self) -> Iterator[tuple[int, int]]:
        """(block, bitmap file offset) of every allocated block, in BAT order."""
        for b, e in enumerate(self.bat):
            if e != S.UNUSED:
                yield b, e * S.SECTOR

    def pread_into(self, mv: memoryview, offset: int) -> None:
        """Fill ``mv`` from file ``offset`` (zeros past EOF), as ImageFile does."""
        pread_into(self.fd, mv, offset, self.path)

    def read_file(self, offset: int, size: int) -> bytes:
        """``size`` bytes of the file (zeros past EOF), as ImageFile.read_file."""
        return _pread(self.fd, offset, size, self.path)

    def read_bitmap(self, block: int) -> bytes:
        off = self.block_offset(block)
        if off is None:
            return bytes(self.bitmap_size)
        return _pread(self.fd, off, self.bitmap_size, self.path)

    def block_runs(self, block: int) -> Runs:
        """Runs of the sector bitmap of allocated block ``block`` (MSB-first, vhd.md §5.2)."""
        runs = self._runs.get(block)
        if runs is None:
            spb = self.sectors_per_block
            bm = self.read_bitmap(block)
            used = (spb + 7) // 8
            if bm.count(0xFF, 0, used) == used:
                runs = [(0, spb, True)]
            else:
                runs = bitmap_runs(bm[:used].translate(S.BIT_REVERSE), 0, spb)
            with self._lock:
                if len(self._runs) >= _RUN_CACHE_BLOCKS:
                    self._runs.clear()
                self._runs[block] = runs
        return runs

    def forget_block(self, block: int) -> None:
        """Drop the cached runs of ``block`` (a writer changed its bitmap)."""
        self._runs.pop(block, None)

    def allocated_runs(self) -> Iterator[tuple[int, int]]:
        """(first block, count) of the runs of allocated blocks, in BAT order; the
        table is scanned with byte searches for unused entries, so the Python
        work follows the runs, not the entries."""
        raw = self.bat.tobytes()  # host order; only 0xFFFFFFFF matters here
        unused = b"\xff" * 4
        n = len(self.bat)
        b = 0
        while b < n:
            if raw[4 * b:4 * b + 4] == unused:
                b = _skip_unused(raw, b, n)  # a run of unused entries in one search
                if b >= n:
                    break
            e = b
            while e < n and raw[4 * e:4 * e + 4] != unused:
                e += 1
            yield b, e - b
            b = e

    def extents(self) -> list[Extent]:
        """What this file holds by itself over the whole virtual disk, by runs, as
        :meth:`vhdx.ImageFile.extents`: "data" (sectors this file defines, with
        their file offset; ``source`` 0 is this file) and "unallocated" (unused
        blocks and bitmap-0 sectors: the parent's bytes, or zeros without one).
        VHD has no "zero" state (vhd.md §5). Needs no parent: the changed-block
        map of a lone .avhd."""
        size = self.virtual_size
        out: list[Extent] = []

        def emit(off: int, length: int, kind: ExtentKind, foff: int | None) -> None:
            append_own_extent(out, off, length, kind, foff)

        if self.is_fixed:
            emit(0, size, "data", 0)
            return out
        bs, pos = self.block_size, 0
        for first, count in self.allocated_runs():
            emit(pos, first * bs - pos, "unallocated", None)
            for b in range(first, first + count):
                start, end = b * bs, min((b + 1) * bs, size)
                data = self.bat[b] * S.SECTOR + self.bitmap_size
                for s0, n, present in self.block_runs(b):
                    lo, hi = start + s0 * S.SECTOR, min(start + (s0 + n) * S.SECTOR, end)
                    emit(lo, hi - lo, "data" if present else "unallocated",
                         data + s0 * S.SECTOR if present else None)
            pos = min((first + count) * bs, size)
        emit(pos, size - pos, "unallocated", None)
        return out

    def sector_present(self, block: int, sector: int) -> bool:
        runs = self.block_runs(block)
        return runs[bisect.bisect_right(runs, (sector, 1 << 62, True)) - 1][2]

    # --- description -----------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """What ``vhdx info --json`` prints for this file."""
        f = self.footer
        d = {
            "path": self.path, "format": "vhd", "type": self.type_name, "creator": self.creator,
            "creator_app": self.creator_app.decode("latin-1"),
            "creator_os": bytes(f.creator_os).decode("latin-1"),
            "file_size": self.file_size, "virtual_size": self.virtual_size,
            "original_size": f.original_size,
            "chs": [f.cylinders, f.heads, f.sectors_per_track], "chs_size": self.chs_size,
            "block_size": 0 if self.is_fixed else self.block_size,
            "logical_sector_size": 512, "physical_sector_size": 512,
            "unique_id": self.unique_id.hex(), "virtual_disk_id": str(self.virtual_disk_id),
            "timestamp": f.timestamp, "timestamp_utc": _vhd_time(f.timestamp),
            "features": f.features, "saved_state": f.saved_state, "footer_used": self.footer_where,
            "warnings": list(self.warnings),
        }
        if not self.is_fixed:
            d.update({"header_offset": self.header_offset, "table_offset": self.table_offset,
                      "max_table_entries": self.max_table_entries,
                      "blocks": {"allocated": sum(c for _, c in self.allocated_runs()), "total": self.blocks}})
        if self.has_parent:
            d.update({"parent_unique_id": (self.parent_unique_id or b"").hex(),
                      "parent_timestamp": self.parent_timestamp, "parent_unicode_name": self.parent_name,
                      "parent_locators": self.locators, "parent_locator": self.parent_locator})
        return d

    def close(self) -> None:
        if self.fd >= 0 and self._owns_fd:
            os.close(self.fd)
        self.fd = -1
        self._runs = {}

    def __enter__(self) -> VhdFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<VhdFile {self.path!r} {self.type_name} size={self.virtual_size}>"
