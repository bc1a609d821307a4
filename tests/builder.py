"""Test-only VHDX image composer with independent ground truth.

Builds arbitrary images on top of :mod:`vhdx.layout` by poking raw bytes (no
log, no writer): any BAT state per block, payload data, sector bitmaps
(LSB-first, FORMAT.md §5.4), differencing chains linked by DataWriteGuid, and an
optional dirty log whose replay produces the final BAT/SB contents.

Ground truth (:func:`expected_chain`) is computed from the *description*
(:class:`ImageSpec` + materialised data/bitmaps) with the FORMAT.md §8.1 rules, never
from the bytes written, so it checks both the reader and the builder:

* FULLY_PRESENT -> this file's data; PARTIALLY_PRESENT -> per-sector bit
  (1: this file, 0: parent); NOT_PRESENT -> parent; ZERO / UNDEFINED /
  UNMAPPED -> zeros; end of chain -> zeros; past the parent's end -> zeros.
"""

from __future__ import annotations

import os
import random
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

from vhdx import structures as s
from vhdx.crc import seal
from vhdx.layout import (
    LayoutPlan,
    ParentInfo,
    build_header,
    plan_layout,
    write_new_image,
)

NOT_PRESENT = s.PAYLOAD_BLOCK_NOT_PRESENT
UNDEFINED = s.PAYLOAD_BLOCK_UNDEFINED
ZERO = s.PAYLOAD_BLOCK_ZERO
UNMAPPED = s.PAYLOAD_BLOCK_UNMAPPED
FULLY = s.PAYLOAD_BLOCK_FULLY_PRESENT
PARTIAL = s.PAYLOAD_BLOCK_PARTIALLY_PRESENT
SB_NOT_PRESENT = s.SB_BLOCK_NOT_PRESENT
SB_PRESENT = s.SB_BLOCK_PRESENT
ZEROISH = (UNDEFINED, ZERO, UNMAPPED)
MiB = s.MiB
LOG_SECTOR = s.LOG_SECTOR_SIZE


# --- description -----------------------------------------------------------------
@dataclass
class Block:
    """One payload block. ``data``/``bitmap`` None -> seeded random when needed.

    ``data`` covers the block's in-range part (the last block may be short);
    ``bitmap`` is ``block_size // lss // 8`` bytes, LSB-first. ``file_offset``
    forces the location (also usable with UNDEFINED/UNMAPPED); ``raw_entry``
    overrides the whole 64-bit BAT entry (hostile images; no ground truth then).
    """

    state: int
    data: bytes | None = None
    bitmap: bytes | None = None
    file_offset: int | None = None
    raw_entry: int | None = None


@dataclass
class DirtyLog:
    """A pending log whose replay turns the on-disk (stale) BAT/SB into the final one.

    ``entries`` active entries (the first is Hyper-V's empty entry when > 1) start
    at log offset ``start`` (choose near the end to make them wrap); ``stale``
    CRC-valid entries carrying other LogGuids (and garbage BAT updates) are placed
    after them. ``garbage_zeroed`` BAT sectors past the used entries hold 0xFF
    garbage on disk, cleared by a zero descriptor.
    """

    log_guid: uuid.UUID | None = None
    entries: int = 2
    start: int = 0
    stale: int = 2
    garbage_zeroed: bool = True
    first_sequence: int = 0x1000


@dataclass
class ImageSpec:
    """Description of one image. ``blocks`` maps payload block number -> Block."""

    virtual_size: int
    block_size: int = 1 * MiB
    logical_sector_size: int = 512
    physical_sector_size: int = 4096
    fixed: bool = False
    blocks: dict[int, Block] = field(default_factory=dict)
    sb_states: dict[int, int] | None = None
    """chunk -> SB entry state; default: PRESENT for every chunk of a differencing
    image (Hyper-V-like and needed by libvhdi), NOT_PRESENT otherwise."""
    fully_bits: str = "random"
    """bitmap bits of FULLY_PRESENT blocks in a differencing image: ones|zeros|random
    (a spec reader must ignore them; libvhdi consults them)."""
    dirty_log: DirtyLog | None = None
    seed: int = 0
    name: str = "image"
    suffix: str = ".vhdx"
    creator: str = "vhdx tests/builder.py"
    data_write_guid: uuid.UUID | None = None
    file_write_guid: uuid.UUID | None = None
    virtual_disk_id: uuid.UUID | None = None
    parent_linkage: uuid.UUID | None = None
    """override of the child's parent_linkage (default: the parent's DataWriteGuid)."""

    @property
    def payload_blocks(self) -> int:
        return -(-self.virtual_size // self.block_size)

    @property
    def sectors_per_block(self) -> int:
        return self.block_size // self.logical_sector_size

    def in_range(self, block: int) -> int:
        """Bytes of ``block`` inside the virtual size."""
        lo = block * self.block_size
        return max(0, min(self.block_size, self.virtual_size - lo))


@dataclass
class BuiltImage:
    spec: ImageSpec
    path: Path
    plan: LayoutPlan
    data_write_guid: uuid.UUID
    blocks: dict[int, Block]
    """materialised blocks (data/bitmap filled in), used by the ground truth."""
    bat: dict[int, int]
    """BAT index -> raw entry as finally valid (after any log replay)."""


@dataclass
class BuiltChain:
    images: list[BuiltImage]
    """child first (like ``VirtualDisk.chain``)."""

    @property
    def paths(self) -> list[Path]:
        return [i.path for i in self.images]

    @property
    def top(self) -> Path:
        return self.images[0].path

    @property
    def parents(self) -> list[Path]:
        return [i.path for i in self.images[1:]]

    def expected(self) -> bytes:
        return expected_chain([(i.spec, i.blocks) for i in self.images])


# --- raw helpers (shared with fixtures/make_samples.py) --------------------------
def poke(path: str | os.PathLike[str], offset: int, data: bytes) -> None:
    """Overwrite ``data`` at ``offset`` (the file grows if needed)."""
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(data)


def peek(path: str | os.PathLike[str], offset: int, size: int) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(offset)
        return fh.read(size)


def bitmap_bits(bitmap: bytes, n: int) -> list[int]:
    """The first ``n`` bits of an LSB-first bitmap."""
    return [(bitmap[i >> 3] >> (i & 7)) & 1 for i in range(n)]


def bitmap_from_bits(bits: list[int]) -> bytes:
    out = bytearray(-(-len(bits) // 8))
    for i, b in enumerate(bits):
        if b:
            out[i >> 3] |= 1 << (i & 7)
    return bytes(out)


def payload_index(block: int, cr: int) -> int:
    """BAT index of payload block ``block`` (FORMAT.md §5.3)."""
    return block + block // cr


def sb_index(chunk: int, cr: int) -> int:
    return chunk * (cr + 1) + cr


def rewrite_headers(path: str | os.PathLike[str], plan: LayoutPlan, **fields: object) -> None:
    """Rewrite both headers (seq 1 and 2) with ``fields`` replaced (CRC recomputed)."""
    args = dict(file_write_guid=plan.file_write_guid, data_write_guid=plan.data_write_guid,
                log_offset=plan.log_offset, log_length=plan.log_length)
    args.update(fields)  # type: ignore[arg-type]
    for seq, off in enumerate(s.HEADER_OFFSETS, start=1):
        poke(path, off, build_header(seq, **args))  # type: ignore[arg-type]


def build_log_entry(sequence: int, tail: int, log_guid: uuid.UUID,
                    descriptors: list[tuple[str, int, bytes | int]],
                    flushed_file_offset: int, last_file_offset: int) -> bytes:
    """One log entry with CRC: descriptors are ("data", file_offset, 4096 bytes) or
    ("zero", file_offset, zero_length). EntryLength = (D + N) * 4096 (FORMAT.md §6.1).

    Kept apart from vhdx.log_writer.build_log_entry on purpose: test inputs may
    interleave zero and data descriptors in any order (the writer always puts
    zeros first), which exercises the reader's in-order replay."""
    n_desc = len(descriptors)
    d_sectors = max(1, -(-(n_desc + 2) // 128))
    data_sectors = [d for d in descriptors if d[0] == "data"]
    length = (d_sectors + len(data_sectors)) * LOG_SECTOR
    head = s.build(s.LogEntryHeader, dict(
        checksum=0, entry_length=length, tail=tail, sequence_number=sequence,
        descriptor_count=n_desc, reserved=0, log_guid=log_guid,
        flushed_file_offset=flushed_file_offset, last_file_offset=last_file_offset))
    descs = bytearray()
    sectors = bytearray()
    for kind, off, payload in descriptors:
        if kind == "zero":
            descs += s.build(s.ZeroDescriptor, dict(reserved=0, zero_length=payload,
                                                    file_offset=off, sequence_number=sequence))
        else:
            assert isinstance(payload, bytes) and len(payload) == LOG_SECTOR
            descs += s.build(s.DataDescriptor, dict(
                trailing_bytes=payload[4092:], leading_bytes=payload[:8], file_offset=off,
                sequence_number=sequence))
            sectors += s.build(s.DataSector, dict(
                sequence_high=sequence >> 32, data=payload[8:4092],
                sequence_low=sequence & 0xFFFFFFFF))
    buf = bytearray((head + bytes(descs)).ljust(d_sectors * LOG_SECTOR, b"\0") + bytes(sectors))
    assert len(buf) == length
    return bytes(seal(buf))


def write_log_ring(path: str | os.PathLike[str], plan: LayoutPlan, pos: int, entry: bytes) -> int:
    """Write ``entry`` at log-relative ``pos`` (wrapping); returns the next position."""
    n = plan.log_length
    first = min(len(entry), n - pos)
    poke(path, plan.log_offset + pos, entry[:first])
    if first < len(entry):
        poke(path, plan.log_offset, entry[first:])
    return (pos + len(entry)) % n


# --- building -------------------------------------------------------------------
def _materialise(spec: ImageSpec) -> dict[int, Block]:
    """Fill in seeded random data/bitmaps so the description is fully concrete."""
    rng = random.Random(f"{spec.seed}:{spec.name}")
    out: dict[int, Block] = {}
    nbits = spec.sectors_per_block
    for b in sorted(spec.blocks):
        if not 0 <= b < spec.payload_blocks:
            raise ValueError(f"block {b} outside the disk")
        blk = spec.blocks[b]
        data, bitmap = blk.data, blk.bitmap
        if blk.state in (FULLY, PARTIAL) and data is None:
            data = rng.randbytes(spec.in_range(b))
        if blk.state == PARTIAL and bitmap is None:
            bitmap = _random_bitmap(rng, nbits)
        if data is not None and len(data) != spec.in_range(b):
            raise ValueError(f"block {b}: data must be {spec.in_range(b)} bytes")
        if bitmap is not None and len(bitmap) != nbits // 8:
            raise ValueError(f"block {b}: bitmap must be {nbits // 8} bytes")
        out[b] = replace(blk, data=data, bitmap=bitmap)
    return out


def _random_bitmap(rng: random.Random, nbits: int) -> bytes:
    """Runs of ones and zeros of random lengths (sector granular, incl. odd bits)."""
    bits: list[int] = []
    val = rng.randrange(2)
    while len(bits) < nbits:
        bits += [val] * rng.choice((1, 1, 3, 7, 8, 9, 64, rng.randrange(1, nbits + 1)))
        val ^= 1
    return bitmap_from_bits(bits[:nbits])


def build_image(directory: str | os.PathLike[str], spec: ImageSpec,
                parent: BuiltImage | None = None) -> BuiltImage:
    """Write ``spec`` as ``directory/<name><suffix>``, a child of ``parent`` if given."""
    directory = Path(directory)
    path = directory / f"{spec.name}{spec.suffix}"
    pinfo = None
    if parent is not None:
        linkage = spec.parent_linkage or parent.data_write_guid
        pinfo = ParentInfo(linkage, relative_path=".\\" + parent.path.name,
                           absolute_win32_path="\\\\?\\C:\\vhdx-tests\\" + parent.path.name,
                           parent_linkage2=s.ZERO_GUID)
    plan = plan_layout(spec.virtual_size, spec.block_size, spec.logical_sector_size,
                       spec.physical_sector_size, spec.fixed, pinfo, spec.creator,
                       file_write_guid=spec.file_write_guid, data_write_guid=spec.data_write_guid,
                       virtual_disk_id=spec.virtual_disk_id)
    write_new_image(path, plan)
    blocks = _materialise(spec)
    cr = plan.chunk_ratio
    spb = spec.sectors_per_block
    slice_len = spb // 8
    next_free = plan.file_size
    bat: dict[int, int] = {}

    def alloc(size: int) -> int:
        nonlocal next_free
        off = next_free
        next_free += -(-size // MiB) * MiB
        return off

    # fixed disks: layout already made every block FULLY_PRESENT at its slot
    if spec.fixed:
        for b in range(plan.payload_blocks):
            bat[payload_index(b, cr)] = s.bat_entry(FULLY, plan.fixed_block_offset(b))
    # sector bitmap blocks
    differencing = parent is not None
    sb_states = spec.sb_states
    if sb_states is None:
        sb_states = {c: SB_PRESENT for c in range(plan.sector_bitmap_blocks)} if differencing else {}
    sb_offsets: dict[int, int] = {}
    for chunk, state in sorted(sb_states.items()):
        off = alloc(MiB) if state == SB_PRESENT else 0
        sb_offsets[chunk] = off
        bat[sb_index(chunk, cr)] = s.bat_entry(state, off)
    sb_rng = random.Random(f"{spec.seed}:{spec.name}:sb")
    sb_images: dict[int, bytearray] = {c: bytearray(MiB) for c, o in sb_offsets.items() if o}
    for b, blk in blocks.items():
        idx = payload_index(b, cr)
        off = blk.file_offset
        if off is None and blk.state in (FULLY, PARTIAL):
            off = plan.fixed_block_offset(b) if spec.fixed else alloc(spec.block_size)
        if off and blk.data is not None:
            poke(path, off, blk.data)
        bat[idx] = blk.raw_entry if blk.raw_entry is not None else s.bat_entry(blk.state, off or 0)
        chunk, j = divmod(b, cr)
        if chunk in sb_images:
            if blk.state == PARTIAL:
                bits = blk.bitmap
            elif blk.state == FULLY and differencing:
                bits = {"ones": b"\xff" * slice_len, "zeros": bytes(slice_len),
                        "random": sb_rng.randbytes(slice_len)}[spec.fully_bits]
            else:
                bits = None
            if bits:
                sb_images[chunk][j * slice_len:(j + 1) * slice_len] = bits
    for chunk, img in sb_images.items():
        poke(path, sb_offsets[chunk], bytes(img))
    # BAT
    bat_bytes = bytearray(plan.bat_length)
    for idx, raw in bat.items():
        bat_bytes[idx * 8:idx * 8 + 8] = (raw & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little")
    poke(path, plan.bat_offset, bytes(bat_bytes))
    with open(path, "r+b") as fh:
        size = os.fstat(fh.fileno()).st_size
        fh.truncate(max(size, next_free))
    if spec.dirty_log is not None:
        _make_dirty(path, plan, spec.dirty_log, bat_bytes, sb_offsets, sb_images, next_free)
    return BuiltImage(spec, path, plan, plan.data_write_guid, blocks, bat)


def _make_dirty(path: Path, plan: LayoutPlan, dl: DirtyLog, bat_bytes: bytearray,
                sb_offsets: dict[int, int], sb_images: dict[int, bytearray], file_size: int) -> None:
    """Replace logged sectors on disk by stale contents and log the final ones."""
    log_guid = dl.log_guid or uuid.uuid4()
    rng = random.Random(f"dirty:{log_guid}")
    descs: list[tuple[str, int, bytes | int]] = []
    used_sectors = 0
    for k in range(plan.bat_length // LOG_SECTOR):
        sector = bytes(bat_bytes[k * LOG_SECTOR:(k + 1) * LOG_SECTOR])
        if any(sector):
            used_sectors = k + 1
            off = plan.bat_offset + k * LOG_SECTOR
            descs.append(("data", off, sector))
            poke(path, off, bytes(LOG_SECTOR))  # stale: every entry NOT_PRESENT
    for chunk, img in sb_images.items():
        for k in range(MiB // LOG_SECTOR):
            sector = bytes(img[k * LOG_SECTOR:(k + 1) * LOG_SECTOR])
            if any(sector):
                off = sb_offsets[chunk] + k * LOG_SECTOR
                descs.append(("data", off, sector))
                poke(path, off, rng.randbytes(LOG_SECTOR))  # stale: garbage bits
    if dl.garbage_zeroed and (used_sectors + 2) * LOG_SECTOR <= plan.bat_length:
        off = plan.bat_offset + used_sectors * LOG_SECTOR
        poke(path, off, b"\xff" * (2 * LOG_SECTOR))
        descs.append(("zero", off, 2 * LOG_SECTOR))
    rng.shuffle(descs)  # descriptor order must not matter here (no overlaps)
    n = max(1, dl.entries)
    groups: list[list[tuple[str, int, bytes | int]]] = [[] for _ in range(n)]
    start_group = 1 if n > 1 else 0  # Hyper-V-like empty first entry
    for i, d in enumerate(descs):
        groups[start_group + i % (n - start_group)].append(d)
    pos = dl.start
    tail = dl.start
    seq = dl.first_sequence
    used = 0
    for g in groups:
        entry = build_log_entry(seq, tail, log_guid, g, file_size, file_size)
        pos = write_log_ring(path, plan, pos, entry)
        used += len(entry)
        seq += 1
    if used > plan.log_length:
        raise ValueError("dirty log does not fit in the log region")
    for k in range(dl.stale):
        garbage = [("data", plan.bat_offset, rng.randbytes(LOG_SECTOR))]
        other = uuid.UUID(int=rng.getrandbits(128), version=4)
        entry = build_log_entry(seq + 100 + k, pos, other, garbage, file_size, file_size)
        if used + len(entry) > plan.log_length:
            break
        pos = write_log_ring(path, plan, pos, entry)
        used += len(entry)
    rewrite_headers(path, plan, log_guid=log_guid)


def build_chain(directory: str | os.PathLike[str], specs: list[ImageSpec]) -> BuiltChain:
    """Build ``specs`` base first; each later spec is a child of the previous one."""
    built: list[BuiltImage] = []
    for i, spec in enumerate(specs):
        if i and spec.fixed:
            raise ValueError("a differencing image cannot be fixed")
        if i and spec.suffix == ".vhdx":
            spec = replace(spec, suffix=".avhdx")
        built.append(build_image(directory, spec, built[-1] if built else None))
    return BuiltChain(built[::-1])


# --- ground truth ----------------------------------------------------------------
def expected_image(spec: ImageSpec, blocks: dict[int, Block], parent: bytes | None) -> bytes:
    """Virtual contents of one image over ``parent`` contents (None = chain end)."""
    out = bytearray(spec.virtual_size)
    if parent is not None:
        n = min(len(parent), spec.virtual_size)
        out[:n] = parent[:n]
    lss = spec.logical_sector_size
    for b in range(spec.payload_blocks):
        blk = blocks.get(b)
        if blk is None:
            if spec.fixed:
                blk = Block(FULLY, data=bytes(spec.in_range(b)))
            else:
                continue
        if blk.raw_entry is not None:
            raise ValueError("no ground truth for raw BAT entries")
        lo, n = b * spec.block_size, spec.in_range(b)
        if blk.state == NOT_PRESENT:
            continue
        if blk.state in ZEROISH:
            out[lo:lo + n] = bytes(n)
        elif blk.state == FULLY:
            assert blk.data is not None
            out[lo:lo + n] = blk.data
        elif blk.state == PARTIAL:
            if parent is None:
                raise ValueError("PARTIALLY_PRESENT in a non-differencing image is invalid")
            assert blk.data is not None and blk.bitmap is not None
            _apply_bits(out, lo, n, lss, blk.data, blk.bitmap)
        else:
            raise ValueError(f"no ground truth for state {blk.state}")
    return bytes(out)


def _apply_bits(out: bytearray, lo: int, n: int, lss: int, data: bytes, bitmap: bytes) -> None:
    nsect = n // lss
    value = int.from_bytes(bitmap, "little")
    i = 0
    while i < nsect:
        if not (value >> i) & 1:
            i += 1
            continue
        j = i
        while j < nsect and (value >> j) & 1:
            j += 1
        out[lo + i * lss:lo + j * lss] = data[i * lss:j * lss]
        i = j


def expected_chain(images: list[tuple[ImageSpec, dict[int, Block]]]) -> bytes:
    """Contents of a chain given child first."""
    content: bytes | None = None
    for spec, blocks in reversed(images):
        content = expected_image(spec, blocks, content)
    assert content is not None
    return content


# --- random specs (property / differential tests) --------------------------------
def random_spec(rng: random.Random, *, name: str, virtual_size: int, block_size: int,
                lss: int, differencing: bool, states: tuple[int, ...] | None = None,
                density: float = 0.6, fully_bits: str = "random") -> ImageSpec:
    """A random description: each block gets a random state with probability ``density``."""
    if states is None:
        states = (FULLY, ZERO, UNDEFINED, UNMAPPED, NOT_PRESENT) + ((PARTIAL,) * 3 if differencing else ())
    spec = ImageSpec(virtual_size=virtual_size, block_size=block_size, logical_sector_size=lss,
                     name=name, seed=rng.randrange(1 << 30), fully_bits=fully_bits)
    for b in range(spec.payload_blocks):
        if rng.random() < density:
            spec.blocks[b] = Block(rng.choice(states))
    return spec


def expected_sources(images: list[BuiltImage]) -> list[tuple[str, int | None]]:
    """Per logical sector of the top image: ("data", chain index), ("zero", None)
    for ZERO, ("unallocated", None) for NOT_PRESENT at the chain end, or
    ("zeroish"/"beyond", None) for UNDEFINED/UNMAPPED and past a parent's end
    (read as zeros; a reader may call them zero or unallocated). Computed from
    the descriptions, not from the files."""
    top = images[0].spec
    lss = top.logical_sector_size
    out: list[tuple[str, int | None]] = []
    for sector in range(top.virtual_size // lss):
        off = sector * lss
        res: tuple[str, int | None] = ("unallocated", None)
        for level, img in enumerate(images):
            sp = img.spec
            if off >= sp.virtual_size:
                res = ("beyond", None)
                break
            b, within = divmod(off, sp.block_size)
            blk = img.blocks.get(b)
            if blk is None and sp.fixed:
                res = ("data", level)
                break
            st = blk.state if blk is not None else NOT_PRESENT
            if st == FULLY:
                res = ("data", level)
                break
            if st in ZEROISH:
                res = ("zero" if st == ZERO else "zeroish", None)
                break
            if st == PARTIAL:
                bit = within // lss
                assert blk is not None and blk.bitmap is not None
                if (blk.bitmap[bit >> 3] >> (bit & 7)) & 1:
                    res = ("data", level)
                    break
        out.append(res)
    return out
