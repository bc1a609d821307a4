"""Test builder: HyperVStorage files (.vmcx / .vmrs) from the project's own declarations.

Everything is produced with ``vhdx.hyperv.structures`` (the declarations the
parser reads with), laid out like the real fixtures (hyperv.md §2.1): two header pages,
the object table at 0x2000, 4 KiB key tables from 0x3000, file objects after
them, then the replay log. ``build(tree, dirty_from=old_tree)`` writes the *old*
tree's tables in place and puts the pages that differ into an **active** replay
log, the state of a file interrupted between logging and applying.

Also the VM-side helpers: ``vm_tree`` (a VM or checkpoint configuration with IDE
and SCSI drives) and ``runtime_tree`` (a .vmrs, optionally with ``savedstate``).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any

from vhdx.hyperv import structures as S

PAGE = S.PAGE
OBJECT_SLOTS = (PAGE - S.OBJECT_TABLE_HEADER_SIZE) // S.OBJECT_ENTRY_SIZE  # 227, as in every fixture


class N:
    """A node: ``N("configuration", V("x", 1), N("sub", ...))``."""

    def __init__(self, name: str, *children: N | V) -> None:
        self.name = name
        self.children = list(children)


class V:
    """A value; the type follows the Python type unless ``type`` is given."""

    def __init__(self, name: str, value: Any, type: int | None = None,  # noqa: A002 - Key.type's name
                 file_object: bool = False) -> None:
        self.name = name
        self.value = value
        self.file_object = file_object
        self.type = type if type is not None else (
            S.VT_BOOL if isinstance(value, bool) else S.VT_INT if isinstance(value, int) else
            S.VT_DOUBLE if isinstance(value, float) else S.VT_STRING if isinstance(value, str) else
            S.VT_ARRAY)


def _value_bytes(v: V) -> bytes:
    t = v.type
    if t == S.VT_INT:
        return S.IntValue.build(v.value)
    if t == S.VT_UINT:
        return S.UIntValue.build(v.value)
    if t == S.VT_DOUBLE:
        return S.DoubleValue.build(v.value)
    if t == S.VT_BOOL:
        return S.BoolValue.build(int(v.value))
    data = v.value.encode("utf-16-le") if isinstance(v.value, str) else bytes(v.value)
    return S.LengthPrefix.build(len(data)) + data


def payload_of(v: V) -> bytes:
    """The raw bytes a file object holds for ``v``."""
    return v.value.encode("utf-16-le") if isinstance(v.value, str) else bytes(v.value)


@dataclass
class _Entry:
    item: N | V
    parent: _Entry | None
    insertion: int
    next_insertion: int = 0  # nodes: 1 + the largest child insertion, 0 when childless
    size: int = 0
    table: int = 0  # index (1-based)
    offset: int = 0  # inside the table
    value: bytes = b""


@dataclass
class Built:
    data: bytes
    layout: dict = field(default_factory=dict)


def _entries(children: list, insertion_gap: int) -> list[_Entry]:
    out: list[_Entry] = []

    def walk(items: list, parent: _Entry | None) -> None:
        for i, it in enumerate(items, 1):
            e = _Entry(it, parent, i * insertion_gap)
            out.append(e)
            if isinstance(it, N):
                e.next_insertion = len(it.children) * insertion_gap + 1 if it.children else 0
                walk(it.children, e)

    walk(children, None)
    return out


def _encode(e: _Entry, fo_ptr: dict[int, tuple[int, int]]) -> bytes:
    it = e.item
    name = it.name.encode("utf-8") + b"\0"
    flags = 0
    if isinstance(it, N):
        vb = S.NodeValue.build({"change_sequence": 0, "next_insertion": e.next_insertion})
        t = S.VT_NODE
    elif it.file_object:
        length, off = fo_ptr[id(it)]
        vb = S.FileObjectPointer.build({"length": length, "offset": off})
        t, flags = it.type, S.FLAG_FILE_OBJECT
    else:
        vb, t = _value_bytes(it), it.type
    p = e.parent
    hdr = S.KeyEntryHeader.build({
        "type": t, "flags": flags, "size": e.size, "parent_table": p.table if p else 0,
        "parent_offset": p.offset if p else 0, "insertion": e.insertion, "name_length": len(name)})
    buf = bytearray(hdr + name + vb)
    S.crc32_seal(buf, S.KEY_ENTRY_CRC_OFFSET)
    return bytes(buf).ljust(e.size, b"\0")


def _free_entry(size: int) -> bytes:
    hdr = S.KeyEntryHeader.build({"type": S.VT_FREE, "flags": 0, "size": size, "parent_table": 0,
                                  "parent_offset": 0, "checksum": 0, "insertion": 0, "name_length": 0})
    return hdr + b"\xFD" * (size - len(hdr))


def _layout_tables(children: list, table_size: int, insertion_gap: int, reverse: bool) -> tuple[list[_Entry], int]:
    entries = _entries(children, insertion_gap)
    for e in entries:
        name = len(e.item.name.encode("utf-8")) + 1
        if isinstance(e.item, N):
            vsize = S.NodeValue.sizeof()
        elif e.item.file_object:
            vsize = S.FILE_OBJECT_POINTER_SIZE
        else:
            vsize = len(_value_bytes(e.item))
        e.size = S.KEY_ENTRY_HEADER_SIZE + name + vsize
        if e.size > table_size - S.KEY_TABLE_HEADER_SIZE:
            raise ValueError(f"{e.item.name}: entry of {e.size} bytes does not fit a table")
    order = list(reversed(entries)) if reverse else entries
    table, pos = 1, S.KEY_TABLE_HEADER_SIZE
    for e in order:
        left = table_size - pos
        # an entry must leave either nothing or room for a Free entry behind it
        if e.size > left or 0 < left - e.size < S.KEY_ENTRY_HEADER_SIZE:
            if 0 < left - e.size < S.KEY_ENTRY_HEADER_SIZE and e.size <= left:
                e.size = left  # absorb the tail as slack
            else:
                table, pos = table + 1, S.KEY_TABLE_HEADER_SIZE
        e.table, e.offset = table, pos
        pos += e.size
    return entries, table


def build(children: list, *, sequences: tuple[int, int] = (7, 6), table_size: int = PAGE,
          insertion_gap: int = 1, reverse_physical: bool = False, dirty_from: list | None = None,
          table_sequence: int = 3, chain_objects: bool = False) -> Built:
    """The bytes of a HyperVStorage file holding ``children`` (the top-level keys).

    ``dirty_from``: the file's tables hold that older tree, and an active replay log
    holds every page that differs, so only a reader that replays sees ``children``.
    """
    new = _image(children, sequences, table_size, insertion_gap, reverse_physical, table_sequence,
                 chain_objects=chain_objects)
    if dirty_from is None:
        return new
    old = _image(dirty_from, sequences, table_size, insertion_gap, reverse_physical, table_sequence - 1,
                 pad_to=new.layout["end"])
    if old.layout["end"] != new.layout["end"]:
        new = _image(children, sequences, table_size, insertion_gap, reverse_physical, table_sequence,
                     pad_to=old.layout["end"])
    end = new.layout["end"]
    pages = [off for off in range(S.ROOT_OBJECT_TABLE_OFFSET, end, PAGE)
             if new.data[off:off + PAGE] != old.data[off:off + PAGE]]
    return _with_log(old.data[:end], old.layout, [(off, new.data[off:off + PAGE]) for off in pages],
                     sequences)


def _image(children: list, sequences: tuple[int, int], table_size: int, insertion_gap: int,
           reverse: bool, table_sequence: int, pad_to: int = 0, chain_objects: bool = False) -> Built:
    entries, ntables = _layout_tables(children, table_size, insertion_gap, reverse)
    first = S.ROOT_OBJECT_TABLE_OFFSET + PAGE
    table_offsets = [first + i * table_size for i in range(ntables)]
    pos = first + ntables * table_size
    fo_ptr: dict[int, tuple[int, int]] = {}
    fo_objects: list[tuple[int, int, bytes]] = []
    for e in entries:
        if isinstance(e.item, V) and e.item.file_object:
            data = payload_of(e.item)
            size = max(PAGE, -(-len(data) // PAGE) * PAGE)
            fo_ptr[id(e.item)] = (len(data), pos)
            fo_objects.append((pos, size, data))
            pos += size
    chained_at = None
    if chain_objects:  # the root table only points at a second object table (type 1)
        chained_at, pos = pos, pos + PAGE
    end = max(pos, pad_to)
    buf = bytearray(end)
    tables = [bytearray(table_size) for _ in range(ntables)]
    used = [S.KEY_TABLE_HEADER_SIZE] * ntables
    for e in entries:
        tables[e.table - 1][e.offset:e.offset + e.size] = _encode(e, fo_ptr)
        used[e.table - 1] = max(used[e.table - 1], e.offset + e.size)
    entry_layout = []
    for i, t in enumerate(tables):
        th = bytearray(S.KeyTableHeader.build({"index": i + 1, "sequence": table_sequence}))
        t[:S.KEY_TABLE_HEADER_SIZE] = S.crc32_seal(th, S.KEY_TABLE_CRC_OFFSET)
        left = table_size - used[i]
        if left:
            t[used[i]:] = _free_entry(left)
        buf[table_offsets[i]:table_offsets[i] + table_size] = t
    for e in entries:
        entry_layout.append((table_offsets[e.table - 1] + e.offset, e.size, e.item.name))
    for off, size, data in fo_objects:
        buf[off:off + len(data)] = data
    slots = [(S.OBJ_KEY_TABLE, off, table_size) for off in table_offsets]
    slots += [(S.OBJ_FILE, off, size) for off, size, _ in fo_objects]
    if end > pos:
        slots.append((S.OBJ_FREE, pos, end - pos))
    if len(slots) > OBJECT_SLOTS:
        raise ValueError("object table full")
    if chained_at is not None:
        buf[chained_at:chained_at + PAGE] = _object_table(slots)
        slots = [(S.OBJ_TABLE, chained_at, PAGE)]
    buf[S.ROOT_OBJECT_TABLE_OFFSET:S.ROOT_OBJECT_TABLE_OFFSET + PAGE] = _object_table(slots)
    layout = {"tables": [(o, table_size) for o in table_offsets], "entries": entry_layout,
              "file_objects": [(o, s) for o, s, _ in fo_objects], "end": end,
              "object_table": S.ROOT_OBJECT_TABLE_OFFSET, "chained_object_table": chained_at}
    return _with_log(bytes(buf), layout, [], sequences)


def _object_table(slots: list[tuple[int, int, int]]) -> bytearray:
    ot = bytearray(PAGE)
    ot[:S.OBJECT_TABLE_HEADER_SIZE] = S.ObjectTableHeader.build({"count": OBJECT_SLOTS})
    for i in range(OBJECT_SLOTS):
        typ, off, size = slots[i] if i < len(slots) else (S.OBJ_EMPTY, 0, 0)
        ent = bytearray(S.ObjectTableEntry.build({"type": typ, "offset": off, "size": size,
                                                  "flags": 1 if i < len(slots) else 0}))
        S.crc32_seal(ent, S.OBJECT_ENTRY_CRC_OFFSET)
        p = S.OBJECT_TABLE_HEADER_SIZE + i * S.OBJECT_ENTRY_SIZE
        ot[p:p + S.OBJECT_ENTRY_SIZE] = ent
    return ot


def _with_log(body: bytes, layout: dict, active: list[tuple[int, bytes]], sequences: tuple[int, int]) -> Built:
    """Append the replay log (active entries given) and write both headers."""
    end = layout["end"]
    max_entries = (PAGE - S.LOG_HEADER_SIZE) // S.LOG_ENTRY_SIZE
    data_len = sum(len(d) for _, d in active)
    log_size = PAGE + max(PAGE, -(-data_len // PAGE) * PAGE)
    buf = bytearray(body[:end].ljust(end, b"\0")) + bytearray(PAGE + data_len)
    lh = bytearray(S.LogHeader.build({"active": len(active), "max_entries": max_entries}))
    S.crc32_seal(lh, 4)
    buf[end:end + S.LOG_HEADER_SIZE] = lh
    doff = PAGE
    for i, (target, data) in enumerate(active):
        ent = bytearray(S.LogEntry.build({"target": target, "length": len(data), "data_offset": doff,
                                          "data_checksum": S.crc32(data)}))
        S.crc32_seal(ent, S.LOG_ENTRY_CRC_OFFSET)
        p = end + S.LOG_HEADER_SIZE + i * S.LOG_ENTRY_SIZE
        buf[p:p + S.LOG_ENTRY_SIZE] = ent
        buf[end + doff:end + doff + len(data)] = data
        doff += len(data)
    for slot, seq in enumerate(sequences):
        h = bytearray(S.FileHeader.build({"sequence": seq, "log_offset": end, "log_size": log_size}))
        S.crc32_seal(h, 4)
        buf[S.HEADER_OFFSETS[slot]:S.HEADER_OFFSETS[slot] + len(h)] = h
    layout = dict(layout, log=end, log_size=log_size, active=[(t, len(d)) for t, d in active])
    return Built(bytes(buf), layout)


def write(path: Any, children: list, **kw: Any) -> Built:
    b = build(children, **kw)
    with open(path, "wb") as f:
        f.write(b.data)
    return b


# --- VM configurations --------------------------------------------------------------------------
IDE = "83f8638b-8dca-4152-9eda-2ca8b33039b4"
SCSI = "d422512d-2bf2-4752-809d-7b82b5fcb1b4"


def filetime_bytes(t: datetime.datetime) -> bytes:
    epoch = datetime.datetime(1601, 1, 1, tzinfo=datetime.timezone.utc)
    ticks = (t - epoch) // datetime.timedelta(microseconds=1) * 10
    return ticks.to_bytes(8, "little")


def vm_tree(name: str, vm_id: str, *, ide: list[str] = (), scsi: list[str] = (),  # type: ignore[assignment]
            scsi_id: str = "dbcf5442-5b2e-4471-9b01-8aa4c5d0d011", created: datetime.datetime | None = None,
            generation: int = 2, merge_pending: bool = False, snapshot_data_root: str | None = None,
            extra: list | None = None) -> list:
    """A VM (or checkpoint) configuration: IDE pathnames fill controller0/drive0,
    drive1, controller1/...; SCSI pathnames controller0/drive0.. of one controller."""
    created = created or datetime.datetime(2024, 5, 1, 12, 0, tzinfo=datetime.timezone.utc)
    manifest = [V("size", 2), V("version", 1)]
    devices = []
    if ide:
        manifest.append(N("vdev001", V("device", IDE), V("instance", IDE),
                          V("name", "Microsoft Emulated IDE Controller"), V("flags", 0)))
        ctl: dict[int, list] = {0: [], 1: []}
        for i, p in enumerate(ide):
            ctl[i // 2].append(N(f"drive{i % 2}", V("type", "VHD"), V("pathname", p)))
        devices.append(N(f"_{IDE}_", *[N(f"controller{c}", *ds) for c, ds in ctl.items()]))
    if scsi:
        manifest.append(N("vdev002", V("device", SCSI), V("instance", scsi_id),
                          V("name", "Synthetic SCSI Controller"), V("flags", 0)))
        devices.append(N(f"_{scsi_id}_", N("controller0", *[
            N(f"drive{i}", V("type", "VHD"), V("pathname", p)) for i, p in enumerate(scsi)])))
    gs = [N("snapshots", N("list", V("size", 0)), V("user_type", 3), V("enable_automatic", False)),
          V("disk_merge_pending", merge_pending)]
    if snapshot_data_root:
        gs[0].children.append(V("data_root", snapshot_data_root))
    conf = N("configuration",
             N("properties", V("name", name), V("global_id", vm_id), V("type_id", "Virtual Machines"),
               V("subtype", generation - 1), V("version", 2304), V("creation_time", filetime_bytes(created))),
             N("manifest", *manifest), *devices, N("global_settings", *gs), *(extra or []))
    return [conf]


def runtime_tree(saved: bool, ram_blocks: int = 0) -> list:
    """A .vmrs; with ``saved``, a ``savedstate`` key (hyperv.md §8) holding ``ram_blocks``
    64 KiB blocks as file objects (real ones hold 1 MiB blocks)."""
    top = [N("configuration", N("properties", V("version", 2304)))]
    if saved:
        blocks = [V(f"RamBlock{i}", bytes([i % 251]) * (64 << 10), file_object=True) for i in range(ram_blocks)]
        top.append(N("savedstate", V("type", "Snapshot"), V("VmVersion", 2304), *blocks))
    return top


# --- re-sealing (corruption tests, fuzzing) -------------------------------------------------------
def _entry_meaningful(t: bytes, pos: int) -> int | None:
    """Meaningful size of the key entry at ``pos`` the way the format defines it, or None."""
    if pos + S.KEY_ENTRY_HEADER_SIZE > len(t):
        return None
    h = S.KeyEntryHeader.parse(t[pos:pos + S.KEY_ENTRY_HEADER_SIZE])
    v = pos + S.KEY_ENTRY_HEADER_SIZE + h.name_length
    if h.flags & S.FLAG_FILE_OBJECT:
        n = S.FILE_OBJECT_POINTER_SIZE
    elif h.type in S.FIXED_VALUE_SIZES:
        n = S.FIXED_VALUE_SIZES[h.type]
    else:
        if v + 4 > len(t):
            return None
        n = 4 + int.from_bytes(t[v:v + 4], "little")
    m = S.KEY_ENTRY_HEADER_SIZE + h.name_length + n
    return m if pos + m <= len(t) else None


def reseal(data: bytes | bytearray) -> bytearray:
    """Recompute every CRC a parser would check (headers, log, object-table slots, key
    tables and their entries), so that a structural edit reaches the code behind the
    checksums. Best effort on garbage: it never raises."""
    buf = bytearray(data)
    try:
        for off in S.HEADER_OFFSETS:
            if off + S.FILE_HEADER_SIZE <= len(buf):
                buf[off:off + S.FILE_HEADER_SIZE] = S.crc32_seal(bytearray(buf[off:off + S.FILE_HEADER_SIZE]), 4)
        if len(buf) < S.FILE_HEADER_SIZE:
            return buf
        h = S.FileHeader.parse(bytes(buf[:S.FILE_HEADER_SIZE]))
        lo = h.log_offset
        if lo + S.LOG_HEADER_SIZE <= len(buf):
            lh = S.LogHeader.parse(bytes(buf[lo:lo + S.LOG_HEADER_SIZE]))
            for i in range(min(lh.active, 512)):
                p = lo + S.LOG_HEADER_SIZE + i * S.LOG_ENTRY_SIZE
                if p + S.LOG_ENTRY_SIZE > len(buf):
                    break
                e = S.LogEntry.parse(bytes(buf[p:p + S.LOG_ENTRY_SIZE]))
                d0 = lo + e.data_offset
                if d0 + e.length <= len(buf) and e.length < (1 << 24):
                    buf[p + 24:p + 28] = S.crc32(bytes(buf[d0:d0 + e.length])).to_bytes(4, "little")
                buf[p:p + S.LOG_ENTRY_SIZE] = S.crc32_seal(bytearray(buf[p:p + S.LOG_ENTRY_SIZE]),
                                                           S.LOG_ENTRY_CRC_OFFSET)
            buf[lo:lo + S.LOG_HEADER_SIZE] = S.crc32_seal(bytearray(buf[lo:lo + S.LOG_HEADER_SIZE]), 4)
        ot = S.ROOT_OBJECT_TABLE_OFFSET
        if ot + S.OBJECT_TABLE_HEADER_SIZE > len(buf):
            return buf
        count = S.ObjectTableHeader.parse(bytes(buf[ot:ot + 8])).count
        for i in range(min(count, OBJECT_SLOTS)):
            p = ot + S.OBJECT_TABLE_HEADER_SIZE + i * S.OBJECT_ENTRY_SIZE
            if p + S.OBJECT_ENTRY_SIZE > len(buf):
                break
            buf[p:p + S.OBJECT_ENTRY_SIZE] = S.crc32_seal(bytearray(buf[p:p + S.OBJECT_ENTRY_SIZE]),
                                                          S.OBJECT_ENTRY_CRC_OFFSET)
            e = S.ObjectTableEntry.parse(bytes(buf[p:p + S.OBJECT_ENTRY_SIZE]))
            if e.type != S.OBJ_KEY_TABLE or not e.flags or e.offset + min(e.size, 1 << 20) > len(buf):
                continue
            t0, tsize = e.offset, min(e.size, 1 << 20)
            if tsize < S.KEY_TABLE_HEADER_SIZE:
                continue
            buf[t0:t0 + 10] = S.crc32_seal(bytearray(buf[t0:t0 + 10]), S.KEY_TABLE_CRC_OFFSET)
            pos = S.KEY_TABLE_HEADER_SIZE
            table = buf[t0:t0 + tsize]
            while pos + S.KEY_ENTRY_HEADER_SIZE <= tsize:
                size = int.from_bytes(table[pos + 2:pos + 6], "little")
                if size < S.KEY_ENTRY_HEADER_SIZE or size > tsize - pos:
                    break
                if table[pos] != S.VT_FREE:
                    m = _entry_meaningful(bytes(table), pos)
                    if m is not None and m <= size:
                        table[pos:pos + m] = S.crc32_seal(bytearray(table[pos:pos + m]), S.KEY_ENTRY_CRC_OFFSET)
                pos += size
            buf[t0:t0 + tsize] = table
    except Exception:  # noqa: BLE001,S110 - garbage in, best effort out
        pass
    return buf
