"""Read-only parser of the HyperVStorage key-value container (.vmcx, .vmrs, data.vmcx).

Procedure (hyperv.md §3): choose the current file header among the copies whose
signature and CRC-32 verify (u16 serial sequence); read the replay log header
and, when it has active entries, apply them to an in-memory overlay (never to
the file); walk the object table chain from 0x2000; take key tables *only* from
in-use type-2 objects (stale copies in free space are never looked at); verify
every live structure's CRC; link entries to their parents and order siblings by
insertion sequence, keeping repeated names (an ordered multimap). Every limit of
hyperv.md §5.1 is enforced, so hostile files cost bounded time and memory and fail
with :class:`~vhdx.errors.CorruptConfigError` subclasses.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import construct

from ..crc import crc32
from ..errors import ConfigChecksumError, CorruptConfigError, UnsupportedFeatureError
from ..fdio import open_regular_file, pread_into
from . import structures as S

MAX_OBJECT_TABLES = 1024
MAX_OBJECT_TABLE_SIZE = 1 << 20  # one chained table (the root one is a page)
MAX_OBJECT_TABLE_BYTES = 16 << 20  # all object tables together
MAX_KEY_TABLES = 65535
MAX_KEY_TABLE_SIZE = 16 << 20
MAX_TABLE_BYTES = 64 << 20  # all key tables together (real configs hold well under 1 MiB)
MAX_ENTRIES = 1_000_000
MAX_DEPTH = 128
MAX_REPLAY_BYTES = 64 << 20
MAX_LOG_PAST_EOF = 16 << 20  # replayed targets may extend the file by at most this
MAX_LOG_HEADER_AREA = 1 << 20
MAX_FILE_OBJECT = 64 << 20  # per value
MAX_FILE_OBJECT_TOTAL = 128 << 20
# One decoded key entry: (name, its parsed header, its value bytes, where it is for messages).
_Record = tuple[str, Any, bytes, str]


@dataclass
class FileObjectRef:
    """A value stored in a file object that was not loaded (``load_file_objects=False``)."""

    offset: int
    length: int

    def __repr__(self) -> str:
        return f"FileObjectRef(offset={self.offset:#x}, length={self.length})"


class Key:
    """One key of the tree: a node (children, in insertion order) or a typed value.

    Sibling names can repeat (test.VMRS has three ``devicetype`` nodes), so
    children are a list, never a dict; ``children_named`` returns every match.
    """

    __slots__ = (
        "change_sequence",
        "children",
        "flags",
        "insertion",
        "invalid",
        "name",
        "next_insertion",
        "offset",
        "table",
        "type",
        "value",
    )

    def __init__(self, name: str, type: int, value: Any = None, flags: int = 0,  # noqa: A002 - the attribute's name
                 insertion: int = 0, table: int = 0, offset: int = 0) -> None:
        self.name = name
        self.type = type
        self.value = value
        self.flags = flags
        self.insertion = insertion
        self.table = table
        self.offset = offset
        self.children: list[Key] = []
        self.change_sequence = 0
        self.next_insertion = 0
        self.invalid: str | None = None  # why a string value is kept as raw bytes

    @property
    def is_node(self) -> bool:
        return self.type == S.VT_NODE

    @property
    def type_name(self) -> str:
        return S.VALUE_TYPE_NAMES.get(self.type, str(self.type))

    def __iter__(self) -> Iterator[Key]:
        return iter(self.children)

    def __repr__(self) -> str:
        if self.is_node:
            return f"<Key {self.name!r} node, {len(self.children)} children>"
        return f"<Key {self.name!r} {self.type_name} {self.value!r}>"

    def children_named(self, name: str, ignore_case: bool = False) -> list[Key]:
        if ignore_case:
            n = name.casefold()
            return [c for c in self.children if c.name.casefold() == n]
        return [c for c in self.children if c.name == name]

    def child(self, name: str, ignore_case: bool = False) -> Key | None:
        """The first child named ``name``, or None."""
        found = self.children_named(name, ignore_case)
        return found[0] if found else None

    def get(self, path: str, ignore_case: bool = False) -> Key | None:
        """Follow ``a/b[2]/c`` (``[n]`` is 1-based among same-named siblings)."""
        key: Key | None = self
        for part in path.strip("/").split("/"):
            if key is None:
                return None
            index = 1
            if part.endswith("]") and "[" in part:
                part, _, num = part[:-1].rpartition("[")
                if not num.isdigit() or int(num) < 1:
                    return None
                index = int(num)
            found = key.children_named(part, ignore_case)
            key = found[index - 1] if len(found) >= index else None
        return key

    def value_at(self, path: str, default: Any = None, ignore_case: bool = False) -> Any:
        k = self.get(path, ignore_case)
        return default if k is None or k.is_node else k.value

    def _named(self, base: str) -> list[tuple[str, Key]]:
        counts: dict[str, int] = {}
        for c in self.children:
            counts[c.name] = counts.get(c.name, 0) + 1
        seen: dict[str, int] = {}
        items = []
        for c in self.children:
            seen[c.name] = seen.get(c.name, 0) + 1
            name = c.name if counts[c.name] == 1 else f"{c.name}[{seen[c.name]}]"
            items.append((f"{base}/{name}" if base else name, c))
        return items

    def walk(self, prefix: str = "") -> Iterator[tuple[str, Key]]:
        """Every descendant as ``(path, key)``, depth first in insertion order;
        repeated names carry ``[n]`` (1-based) so every path is unique."""
        stack = [iter(self._named(prefix))]
        while stack:
            try:
                path, k = next(stack[-1])
            except StopIteration:
                stack.pop()
                continue
            yield path, k
            if k.is_node:
                stack.append(iter(k._named(path)))

    def to_dict(self) -> Any:
        """Nodes become dicts in insertion order; a repeated name maps to a list of
        its occurrences (nothing is dropped); values stay typed (bytes for arrays)."""
        if not self.is_node:
            return self.value
        out: dict[str, Any] = {}
        counts: dict[str, int] = {}
        for c in self.children:
            counts[c.name] = counts.get(c.name, 0) + 1
        for c in self.children:
            v = c.to_dict()
            if counts[c.name] > 1:
                out.setdefault(c.name, []).append(v)
            else:
                out[c.name] = v
        return out


@dataclass
class HeaderInfo:
    slot: int
    sequence: int
    version: int
    alignment: int
    log_offset: int
    log_size: int
    log_header_size: int


@dataclass
class LogInfo:
    offset: int
    size: int
    active: int
    max_entries: int
    replayed: bool = False
    entries: list[tuple[int, int]] = field(default_factory=list)  # (target, length) applied


@dataclass
class TableInfo:
    index: int
    sequence: int
    offset: int
    size: int
    entries: int = 0
    free: int = 0


@dataclass
class Orphan:
    table: int
    offset: int
    name: str
    reason: str


class ConfigFile:
    """A parsed HyperVStorage file. ``root`` is the virtual root (name ``""``),
    whose children are the stored top-level keys (``configuration`` in VM
    configs and runtime files, ``Configurations`` in the host's data.vmcx)."""

    def __init__(self, path: str | os.PathLike[str], *, replay: bool = True, strict: bool = True,
                 load_file_objects: bool = True) -> None:
        self.path = os.fspath(path)
        self.strict = strict
        self.warnings: list[str] = []
        self.headers: list[HeaderInfo | None] = [None, None]
        self.header: HeaderInfo
        self.log: LogInfo
        self.objects: list[tuple[int, int, int]] = []  # in-use (type, offset, size)
        self.tables: list[TableInfo] = []
        self.orphans: list[Orphan] = []
        self.entries = 0
        self.free_entries = 0
        self.root = Key("", S.VT_NODE)
        self._overlay: list[tuple[int, bytes]] = []
        self._load_file_objects = load_file_objects
        self._file_object_bytes = 0
        fd = open_regular_file(self.path)
        try:
            self._fd = fd
            self.file_size = os.fstat(fd).st_size
            self._size = self.file_size
            self._parse(replay)
        finally:
            os.close(fd)
            self._fd = -1
            self._overlay = []  # everything is parsed; the replayed bytes are not needed any more

    # --- reading ------------------------------------------------------------------------
    def _err(self, msg: str, cls: type[CorruptConfigError] = CorruptConfigError) -> CorruptConfigError:
        return cls(f"{self.path}: {msg}")

    def _problem(self, msg: str, cls: type[CorruptConfigError] = CorruptConfigError) -> None:
        """A damaged structure: fatal in strict mode, a warning otherwise."""
        if self.strict:
            raise self._err(msg, cls)
        self.warnings.append(msg)

    def _read(self, offset: int, size: int, what: str) -> bytes:
        """Exactly ``size`` bytes at ``offset`` through the replay overlay."""
        if offset < 0 or size < 0 or offset + size > self._size:
            raise self._err(f"{what} at {offset:#x}+{size:#x} lies past the end of the file "
                            f"({self._size:#x} bytes)")
        buf = bytearray(size)
        pread_into(self._fd, memoryview(buf), offset, self.path)
        for t, data in self._overlay:
            s, e = max(t, offset), min(t + len(data), offset + size)
            if s < e:
                buf[s - offset:e - offset] = data[s - t:e - t]
        return bytes(buf)

    # --- structure ----------------------------------------------------------------------
    def _parse(self, replay: bool) -> None:
        try:
            self._parse_all(replay)
        except construct.ConstructError as e:  # defensive: every length is checked before parsing
            raise self._err(f"undecodable structure ({e})") from None

    def _parse_all(self, replay: bool) -> None:
        self._choose_header()
        self._read_log(replay)
        key_tables, file_objects = self._read_object_tables()
        records = self._read_key_tables(key_tables)
        self._build_tree(records, file_objects)

    def _choose_header(self) -> None:
        valid: list[HeaderInfo] = []
        for slot, off in enumerate(S.HEADER_OFFSETS):
            if off + S.FILE_HEADER_SIZE > self.file_size:
                self.warnings.append(f"header {slot + 1}: truncated")
                continue
            raw = self._read(off, S.FILE_HEADER_SIZE, "file header")
            h = S.FileHeader.parse(raw)
            if h.signature != S.FILE_SIGNATURE:
                self.warnings.append(f"header {slot + 1}: bad signature {h.signature:#010x}")
                continue
            if not S.crc32_ok(raw, 4):
                self.warnings.append(f"header {slot + 1}: CRC-32 mismatch")
                continue
            info = HeaderInfo(slot, h.sequence, h.version, h.alignment, h.log_offset, h.log_size,
                              h.log_header_size)
            self.headers[slot] = info
            valid.append(info)
        if not valid:
            if self.file_size < 4 or self._read(0, 4, "signature") != S.FILE_SIGNATURE.to_bytes(4, "little"):
                raise self._err("not a HyperVStorage file (no valid header signature)")
            raise self._err("neither file header verifies (signature and CRC-32)", ConfigChecksumError)
        if len(valid) == 2 and S.serial_newer(valid[1].sequence, valid[0].sequence):
            valid.reverse()
        problems: list[str] = []
        for h in valid:
            why = self._header_problem(h)
            if why is None:
                self.header = h
                for p in problems:
                    self.warnings.append(p)
                if h.version != S.FORMAT_VERSION:
                    self.warnings.append(f"format version {h.version:#06x} (only 0x0400 has been seen); "
                                         "reading it as 0x0400")
                return
            problems.append(f"header {h.slot + 1} (sequence {h.sequence}): {why}; not used")
        raise self._err("; ".join(problems))

    def _header_problem(self, h: HeaderInfo) -> str | None:
        if h.version < 0x0101:
            return f"format version {h.version:#06x} (WCHAR key names) is not supported"
        if h.version > 0xFFFF:
            return f"format version {h.version:#x} is not a known version"
        a = h.alignment
        if a < 0x1000 or a > 0x10000 or a & (a - 1):
            return f"data alignment {a:#x} is not a power of two in [0x1000, 0x10000]"
        if h.log_header_size < S.LOG_HEADER_SIZE + S.LOG_ENTRY_SIZE or h.log_header_size > MAX_LOG_HEADER_AREA:
            return f"replay log header area {h.log_header_size:#x} out of bounds"
        if h.log_offset < S.ROOT_OBJECT_TABLE_OFFSET + S.PAGE:
            return f"replay log offset {h.log_offset:#x} overlaps the headers or the object table"
        if h.log_offset + S.LOG_HEADER_SIZE > self.file_size:
            return f"replay log header at {h.log_offset:#x} lies past the end of the file"
        if h.log_size < h.log_header_size:
            return f"replay log size {h.log_size:#x} is smaller than its header area"
        return None

    def _read_log(self, replay: bool) -> None:
        h = self.header
        raw = self._read(h.log_offset, S.LOG_HEADER_SIZE, "replay log header")
        lh = S.LogHeader.parse(raw)
        if lh.signature != S.LOG_SIGNATURE:
            raise self._err(f"replay log header at {h.log_offset:#x}: bad signature {lh.signature:#010x}")
        if not S.crc32_ok(raw, 4):
            raise self._err(f"replay log header at {h.log_offset:#x}: CRC-32 mismatch", ConfigChecksumError)
        if lh.max_entries == 0 or S.LOG_HEADER_SIZE + S.LOG_ENTRY_SIZE * lh.max_entries > h.log_header_size:
            raise self._err(f"replay log: {lh.max_entries} entries do not fit its header area")
        if lh.active > lh.max_entries:
            raise self._err(f"replay log: {lh.active} active entries, more than the maximum {lh.max_entries}")
        self.log = LogInfo(h.log_offset, h.log_size, lh.active, lh.max_entries)
        if lh.active == 0:
            return  # stale slots are never applied (hyperv.md §2.10 rule 1)
        if not replay:
            self.warnings.append(f"replay log has {lh.active} active entries; NOT applied (replay disabled): "
                                 "the tables read may be torn")
            return
        table = self._read(h.log_offset + S.LOG_HEADER_SIZE, S.LOG_ENTRY_SIZE * lh.active, "replay log entries")
        overlay: list[tuple[int, bytes]] = []
        total = 0
        hint = " (torn replay log; replay=False / --no-replay reads the un-replayed file)"
        for i in range(lh.active):
            raw_e = table[i * S.LOG_ENTRY_SIZE:(i + 1) * S.LOG_ENTRY_SIZE]
            if not S.crc32_ok(raw_e, S.LOG_ENTRY_CRC_OFFSET):
                raise self._err(f"replay log entry {i}: CRC-32 mismatch" + hint, ConfigChecksumError)
            e = S.LogEntry.parse(raw_e)
            if e.data_offset < h.log_header_size or e.data_offset + e.length > h.log_size:
                raise self._err(f"replay log entry {i}: data {e.data_offset:#x}+{e.length:#x} outside the log" + hint)
            start = h.log_offset + e.data_offset
            if start + e.length > self.file_size:
                raise self._err(f"replay log entry {i}: data lies past the end of the file" + hint)
            total += e.length
            if total > MAX_REPLAY_BYTES:
                raise self._err(f"replay log: more than {MAX_REPLAY_BYTES} bytes to replay" + hint)
            if e.target < S.ROOT_OBJECT_TABLE_OFFSET:
                raise self._err(f"replay log entry {i}: target {e.target:#x} is inside the file headers" + hint)
            if e.target + e.length > self.file_size + MAX_LOG_PAST_EOF:
                raise self._err(f"replay log entry {i}: target {e.target:#x} far past the end of the file" + hint)
            data = self._read(start, e.length, "replay log data")
            if crc32(data) != e.data_checksum:
                raise self._err(f"replay log entry {i}: data CRC-32 mismatch" + hint, ConfigChecksumError)
            overlay.append((e.target, data))
            self.log.entries.append((e.target, e.length))
        # Redo semantics: the entries' data are the new bytes, applied in slot order.
        self._overlay = overlay
        self._size = max([self.file_size] + [t + len(d) for t, d in overlay])
        self.log.replayed = True

    def _read_sized(self, off: int, size: int, least: int, most: int, budget: list[int], cap: int,
                    what: str) -> bytes | None:
        """An object of ``least..most`` bytes, counted against ``budget`` (capped at ``cap``);
        None (a problem) when its size is out of bounds."""
        if size < least or size > most:
            self._problem(f"{what} at {off:#x}: size {size:#x} out of bounds")
            return None
        budget[0] += size
        if budget[0] > cap:
            raise self._err(f"{what}s exceed {cap} bytes together")
        return self._read(off, size, what)

    def _object_in_bounds(self, off: int, size: int) -> bool:
        return off >= S.ROOT_OBJECT_TABLE_OFFSET and size > 0 and off + size <= self._size

    def _read_object_tables(self) -> tuple[list[tuple[int, int]], dict[int, int]]:
        key_tables: list[tuple[int, int]] = []
        file_objects: dict[int, int] = {}
        pending = [(S.ROOT_OBJECT_TABLE_OFFSET, S.PAGE)]
        visited: set[int] = set()
        budget = [0]
        while pending:
            off, size = pending.pop(0)
            if off in visited:
                self._problem(f"object table at {off:#x} is chained twice (loop)")
                continue
            visited.add(off)
            if len(visited) > MAX_OBJECT_TABLES:
                raise self._err(f"more than {MAX_OBJECT_TABLES} chained object tables")
            raw = self._read_sized(off, size, S.OBJECT_TABLE_HEADER_SIZE, MAX_OBJECT_TABLE_SIZE, budget,
                                   MAX_OBJECT_TABLE_BYTES, "object table")
            if raw is None:
                continue
            hdr = S.ObjectTableHeader.parse(raw)
            if hdr.signature != S.OBJECT_TABLE_SIGNATURE:
                raise self._err(f"object table at {off:#x}: bad signature {hdr.signature:#010x}")
            if S.OBJECT_TABLE_HEADER_SIZE + S.OBJECT_ENTRY_SIZE * hdr.count > len(raw):
                raise self._err(f"object table at {off:#x}: {hdr.count} entries do not fit in {len(raw):#x} bytes")
            for slot in range(hdr.count):
                p = S.OBJECT_TABLE_HEADER_SIZE + slot * S.OBJECT_ENTRY_SIZE
                ent = raw[p:p + S.OBJECT_ENTRY_SIZE]
                where = f"object table at {off:#x} slot {slot}"
                if not S.crc32_ok(ent, S.OBJECT_ENTRY_CRC_OFFSET):
                    self._problem(f"{where}: CRC-32 mismatch", ConfigChecksumError)
                    continue
                e = S.ObjectTableEntry.parse(ent)
                if not e.flags:
                    continue
                if e.type in (S.OBJ_TABLE, S.OBJ_KEY_TABLE, S.OBJ_FILE):
                    if not self._object_in_bounds(e.offset, e.size):
                        self._problem(f"{where}: object {e.offset:#x}+{e.size:#x} out of bounds")
                        continue
                    self.objects.append((e.type, e.offset, e.size))
                if e.type == S.OBJ_TABLE:
                    pending.append((e.offset, e.size))
                elif e.type == S.OBJ_KEY_TABLE:
                    key_tables.append((e.offset, e.size))
                elif e.type == S.OBJ_FILE:
                    file_objects[e.offset] = e.size
                elif e.type == S.OBJ_FREE:
                    self.objects.append((e.type, e.offset, e.size))
                else:
                    self.warnings.append(f"{where}: object type {e.type} in use; not interpreted")
        return key_tables, file_objects

    def _read_key_tables(self, key_tables: list[tuple[int, int]]) -> dict[tuple[int, int], _Record]:
        if len(key_tables) > MAX_KEY_TABLES:
            raise self._err(f"{len(key_tables)} key tables (more than {MAX_KEY_TABLES})")
        chosen: dict[int, tuple[TableInfo, bytes]] = {}
        budget = [0]
        for off, size in key_tables:
            raw = self._read_sized(off, size, S.KEY_TABLE_HEADER_SIZE, MAX_KEY_TABLE_SIZE, budget,
                                   MAX_TABLE_BYTES, "key table")
            if raw is None:
                continue
            hdr = S.KeyTableHeader.parse(raw)
            if hdr.signature != S.KEY_TABLE_SIGNATURE:
                self._problem(f"key table at {off:#x}: bad signature {hdr.signature:#06x}")
                continue
            if not S.crc32_ok(raw[:S.KEY_TABLE_HEADER_SIZE], S.KEY_TABLE_CRC_OFFSET):
                self._problem(f"key table at {off:#x}: header CRC-32 mismatch", ConfigChecksumError)
                continue
            if hdr.index == 0:
                self._problem(f"key table at {off:#x}: index 0")
                continue
            info = TableInfo(hdr.index, hdr.sequence, off, size)
            old = chosen.get(hdr.index)
            if old is not None:
                newer = S.serial_newer(info.sequence, old[0].sequence)
                keep, drop = (info, old[0]) if newer else (old[0], info)
                self.warnings.append(f"key table index {hdr.index} has two live copies ({keep.offset:#x} "
                                     f"sequence {keep.sequence}, {drop.offset:#x} sequence {drop.sequence}); "
                                     "the newer is used")
                if not newer:
                    continue
            chosen[hdr.index] = (info, raw)
        records: dict[tuple[int, int], _Record] = {}
        for index in sorted(chosen):
            info, raw = chosen[index]
            self.tables.append(info)
            self._walk_table(info, raw, records)
        return records

    def _walk_table(self, info: TableInfo, raw: bytes, records: dict[tuple[int, int], _Record]) -> None:
        pos, end = S.KEY_TABLE_HEADER_SIZE, len(raw)
        where = f"key table {info.index} at {info.offset:#x}"
        while pos + S.KEY_ENTRY_HEADER_SIZE <= end:
            h = S.KeyEntryHeader.parse(raw[pos:pos + S.KEY_ENTRY_HEADER_SIZE])
            if h.size == 0:
                if any(raw[pos:]):
                    self.warnings.append(f"{where}: entry walk stops at a zero size at +{pos:#x}, "
                                         f"{end - pos} bytes left")
                return
            at = f"{where}, entry at +{pos:#x}"
            if h.size < S.KEY_ENTRY_HEADER_SIZE or h.size > end - pos:
                raise self._err(f"{at}: size {h.size:#x} out of bounds")
            self.entries += 1
            if self.entries > MAX_ENTRIES:
                raise self._err(f"more than {MAX_ENTRIES} key entries")
            if h.type == S.VT_FREE:
                self.free_entries += 1
                info.free += 1
                pos += h.size
                continue
            info.entries += 1
            rec = self._decode_entry(raw, pos, h, at)
            records[(info.index, pos)] = rec
            pos += h.size
        if any(raw[pos:]):
            self.warnings.append(f"{where}: {end - pos} trailing bytes after the last entry")

    def _decode_entry(self, raw: bytes, pos: int, h: Any, at: str) -> _Record:
        if h.type not in S.VALUE_TYPE_NAMES:
            raise self._err(f"{at}: unknown value type {h.type}")
        nl = h.name_length
        vpos = pos + S.KEY_ENTRY_HEADER_SIZE + nl
        room = pos + h.size - vpos
        if nl < 1 or room < 0:
            raise self._err(f"{at}: name length {nl} out of bounds")
        name_b = raw[pos + S.KEY_ENTRY_HEADER_SIZE:vpos]
        if name_b[-1] != 0 or 0 in name_b[:-1]:
            raise self._err(f"{at}: key name is not one NUL-terminated string")
        try:
            name = name_b[:-1].decode("utf-8")
        except UnicodeDecodeError:
            raise self._err(f"{at}: key name is not UTF-8") from None
        at = f"{at} ({name!r})"
        if h.flags & S.FLAG_FILE_OBJECT:
            vsize = S.FILE_OBJECT_POINTER_SIZE
        elif h.type in S.FIXED_VALUE_SIZES:
            vsize = S.FIXED_VALUE_SIZES[h.type]
        else:
            if room < 4:
                raise self._err(f"{at}: value length prefix past the entry")
            vsize = 4 + int.from_bytes(raw[vpos:vpos + 4], "little")
        if vsize > room:
            raise self._err(f"{at}: value of {vsize} bytes does not fit in the entry ({room} bytes left)")
        meaningful = S.KEY_ENTRY_HEADER_SIZE + nl + vsize
        if not S.crc32_ok(raw[pos:pos + meaningful], S.KEY_ENTRY_CRC_OFFSET):
            raise self._err(f"{at}: CRC-32 mismatch", ConfigChecksumError)
        return (name, h, bytes(raw[vpos:vpos + vsize]), at)

    # --- values and tree ------------------------------------------------------------------
    def _value(self, key: Key, h: Any, vb: bytes, file_objects: dict[int, int], at: str) -> None:
        t = h.type
        if h.flags & S.FLAG_FILE_OBJECT:
            ptr = S.FileObjectPointer.parse(vb)
            size = file_objects.get(ptr.offset)
            if size is None:
                raise self._err(f"{at}: file-object pointer {ptr.offset:#x} names no file object")
            if ptr.length > size or ptr.length > MAX_FILE_OBJECT:
                raise self._err(f"{at}: file-object length {ptr.length:#x} out of bounds")
            if t not in (S.VT_STRING, S.VT_ARRAY):
                raise UnsupportedFeatureError(f"{self.path}: {at}: a {key.type_name} value in a file object")
            if not self._load_file_objects:
                key.value = FileObjectRef(ptr.offset, ptr.length)
                return
            self._file_object_bytes += ptr.length
            if self._file_object_bytes > MAX_FILE_OBJECT_TOTAL:
                raise self._err(f"file objects exceed {MAX_FILE_OBJECT_TOTAL} bytes together "
                                "(open with load_file_objects=False / --no-file-objects)")
            data = self._read(ptr.offset, ptr.length, "file object")
        elif t in (S.VT_STRING, S.VT_ARRAY):
            data = vb[4:]
        if t == S.VT_NODE:
            n = S.NodeValue.parse(vb)
            key.change_sequence, key.next_insertion = n.change_sequence, n.next_insertion
        elif t == S.VT_INT:
            key.value = S.IntValue.parse(vb)
        elif t == S.VT_UINT:
            key.value = S.UIntValue.parse(vb)
        elif t == S.VT_DOUBLE:
            key.value = S.DoubleValue.parse(vb)
        elif t == S.VT_BOOL:
            key.value = S.BoolValue.parse(vb) != 0
        elif t == S.VT_ARRAY:
            key.value = data
        elif t == S.VT_STRING:
            if len(data) % 2:
                key.value, key.invalid = data, "odd UTF-16 byte length"
            else:
                try:
                    key.value = data.decode("utf-16-le")
                except UnicodeDecodeError:
                    key.value, key.invalid = data, "not valid UTF-16"
            if key.invalid:
                self.warnings.append(f"{at}: string value kept as raw bytes ({key.invalid})")

    def _build_tree(self, records: dict[tuple[int, int], _Record], file_objects: dict[int, int]) -> None:
        keys: dict[tuple[int, int], Key] = {}
        for loc, (name, h, vb, at) in records.items():
            k = Key(name, h.type, flags=h.flags, insertion=h.insertion, table=loc[0], offset=loc[1])
            self._value(k, h, vb, file_objects, at)
            keys[loc] = k
        children: dict[tuple[int, int], list[Key]] = {}
        orphans: list[Orphan] = []
        for loc, (name, h, _vb, _at) in records.items():
            parent = (h.parent_table, h.parent_offset)
            if parent != (0, 0):
                p = keys.get(parent)
                if p is None:
                    orphans.append(Orphan(*loc, name,
                                          f"parent {parent[0]}:{parent[1]:#x} is not the start of an entry"))
                    continue
                if not p.is_node:
                    orphans.append(Orphan(*loc, name, f"parent {p.name!r} is not a node"))
                    continue
            children.setdefault(parent, []).append(keys[loc])
        reached: set[tuple[int, int]] = set()
        stack: list[tuple[tuple[int, int], Key, int]] = [((0, 0), self.root, 0)]
        while stack:
            loc, node, depth = stack.pop()
            if depth > MAX_DEPTH:
                raise self._err(f"key tree deeper than {MAX_DEPTH} levels")
            kids = sorted(children.get(loc, ()), key=lambda k: (k.insertion, k.table, k.offset))
            node.children = kids
            for k in kids:
                reached.add((k.table, k.offset))
                if k.is_node:
                    stack.append(((k.table, k.offset), k, depth + 1))
        named = {(o.table, o.offset) for o in orphans}
        for loc, k in keys.items():
            if loc not in reached and loc not in named:
                orphans.append(Orphan(*loc, k.name, "not reachable from the root (cycle or orphaned parent)"))
        self.orphans = sorted(orphans, key=lambda o: (o.table, o.offset))
        if self.orphans:
            o = self.orphans[0]
            self._problem(f"{len(self.orphans)} key entries not attached to the tree (first: {o.name!r} "
                          f"in table {o.table} at +{o.offset:#x}: {o.reason})")

    # --- summaries ------------------------------------------------------------------------
    @property
    def top(self) -> Key | None:
        """The first top-level key (``configuration`` / ``Configurations``)."""
        return self.root.children[0] if self.root.children else None

    def get(self, path: str, ignore_case: bool = False) -> Key | None:
        return self.root.get(path, ignore_case)

    def value_at(self, path: str, default: Any = None, ignore_case: bool = False) -> Any:
        return self.root.value_at(path, default, ignore_case)

    def to_dict(self) -> dict[str, Any]:
        tree: dict[str, Any] = self.root.to_dict()  # the root is a node, so a dict
        return tree

    def stats(self) -> dict[str, int]:
        nodes = values = 0
        for _, k in self.root.walk():
            if k.is_node:
                nodes += 1
            else:
                values += 1
        return {"keys": nodes + values, "nodes": nodes, "values": values, "entries": self.entries,
                "free_entries": self.free_entries, "key_tables": len(self.tables),
                "orphans": len(self.orphans)}


def open_config(path: str | os.PathLike[str], *, replay: bool = True, strict: bool = True,
                load_file_objects: bool = True) -> ConfigFile:
    """Parse a HyperVStorage file read-only (not one byte of it is written).

    ``replay=False`` reads the file as stored even when its replay log has active
    entries (flagged in ``warnings``); ``strict=False`` turns damaged live
    structures (object-table slots, key-table headers, unattached entries) into
    warnings instead of errors; ``load_file_objects=False`` leaves values stored in
    file objects as :class:`FileObjectRef` (a saved-state .vmrs holds RAM there).
    """
    return ConfigFile(path, replay=replay, strict=strict, load_file_objects=load_file_objects)
