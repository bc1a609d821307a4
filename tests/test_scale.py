"""Hostile and huge images cost what their data needs, not what their fields claim.

Each case of issue 13 item 10 and issue 14 item 6 runs the real command in a
fresh interpreter that reports its own CPU time and peak resident memory
(VmHWM), so the bounds are the process's, not the test runner's; CPU time,
not wall time, keeps them meaningful on a loaded machine. The bounds were set
at about three times what was measured (figures in each test), far below the
cost before the change (also in each test).

The run-based resolvers are also checked against the per-block ones they
replace (the read path's ``_resolve``, entry-by-entry BAT scans) on random
chains built with the ground-truth builder.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import subprocess
import sys
import uuid
from array import array
from pathlib import Path

import pytest
from builder import (
    FULLY,
    Block,
    DirtyLog,
    ImageSpec,
    build_chain,
    build_log_entry,
    poke,
    rewrite_headers,
)

import vhdx
from vhdx import structures as S
from vhdx.disk import VirtualDisk
from vhdx.image import ImageFile
from vhdx.layout import ParentInfo, plan_layout, write_new_image

MiB = S.MiB
GiB = S.GiB
TiB = S.TiB
REPO = Path(__file__).resolve().parent.parent

_RUNNER = r"""
import json, os, sys, time
from vhdx.cli import main
t = time.process_time()
try:
    rc = main(json.loads(sys.argv[1]))
except SystemExit as e:
    rc = e.code
cpu = time.process_time() - t
hwm = 0
with open("/proc/self/status") as f:
    for line in f:
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) * 1024
with open(os.environ["VHDX_MEASURE_OUT"], "w") as f:
    json.dump({"rc": rc, "cpu": cpu, "hwm": hwm}, f)
"""


def measure(tmp_path: Path, *argv: object) -> dict:
    """Run ``vhdx ARGV`` in a fresh interpreter: rc, stdout, stderr, cpu (s), hwm (bytes)."""
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs /proc/self/status (VmHWM)")
    out = tmp_path / f"measure-{uuid.uuid4().hex}.json"
    p = subprocess.run([sys.executable, "-c", _RUNNER, json.dumps([str(a) for a in argv])],
                       cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "VHDX_MEASURE_OUT": str(out)})
    assert out.exists(), p.stderr[-2000:]
    r = json.loads(out.read_text())
    out.unlink()
    r.update(stdout=p.stdout, stderr=p.stderr)
    return r


def one_line_error(r: dict, path: Path, needle: str) -> None:
    assert r["rc"] != 0
    assert "Traceback" not in r["stderr"]
    lines = r["stderr"].splitlines()
    assert len(lines) == 1 and lines[0].startswith("vhdx: error: "), r["stderr"]
    assert str(path) in lines[0] and needle in lines[0], lines[0]


def sha(path: Path) -> str:
    """Digest of the file's size, data extents and their bytes (holes read zeros
    and are not read: a 3 GiB sparse log is hashed in milliseconds)."""
    from vhdx.fdio import data_extents

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        h.update(size.to_bytes(8, "little"))
        try:
            extents = data_extents(fh.fileno(), 0, size)
        except OSError:
            extents = [(0, size)]
        for a, b in extents:
            h.update(f"{a}:{b}".encode())
            fh.seek(a)
            while a < b:
                chunk = fh.read(min(8 * MiB, b - a))
                h.update(chunk)
                a += len(chunk)
    return h.hexdigest()


# --- strings from the file ------------------------------------------------------------------
def _child_with_locator(d: Path, **locator: str) -> tuple[Path, Path]:
    """base.vhdx and child.avhdx linked to it, with these parent locator strings."""
    base = d / "base.vhdx"
    vhdx.create(base, 64 * MiB)
    with vhdx.open(base) as disk:
        guid = disk.data_write_guid
    child = d / "child.avhdx"
    write_new_image(child, plan_layout(64 * MiB, 2 * MiB, parent=ParentInfo(guid, **locator)))
    return child, base


def test_nul_in_a_locator_path_is_one_line(tmp_path):
    """Before: ``ValueError: embedded null byte`` and a 30-line traceback from
    info/check/map (os.stat saw the string)."""
    child, _base = _child_with_locator(tmp_path, relative_path=".\\ba\0se.vhdx",
                                       absolute_win32_path="C:\\vms\\ba\0se.vhdx")
    before = sha(child)
    with pytest.raises(vhdx.CorruptImageError, match="NUL"):
        vhdx.open(child)
    for cmd in ("info", "map", "hash"):
        one_line_error(measure(tmp_path, cmd, child), child, "NUL")
    r = measure(tmp_path, "check", child)
    assert r["rc"] != 0 and "Traceback" not in r["stderr"] and "NUL" in r["stdout"]
    assert sha(child) == before


def test_a_terminating_nul_in_a_locator_is_dropped(tmp_path):
    """Some producers count a terminating NUL in the string: the path still works."""
    child, base = _child_with_locator(tmp_path, relative_path=".\\base.vhdx\0")
    with vhdx.open(child) as d:
        assert d.parent_locator["relative_path"] == ".\\base.vhdx"
        assert os.path.samefile(d.chain[1].path, base)


def test_dirty_header_with_log_length_zero(tmp_path):
    """Before: ``ZeroDivisionError: integer modulo by zero`` (the ring had no length)."""
    c = build_chain(tmp_path, [ImageSpec(virtual_size=4 * MiB, name="ll0", blocks={0: Block(FULLY)})])
    rewrite_headers(c.top, c.images[0].plan, log_guid=uuid.uuid4(), log_length=0)
    with pytest.raises(vhdx.CorruptImageError, match="LogLength is 0"):
        vhdx.open(c.top)
    one_line_error(measure(tmp_path, "info", c.top), c.top, "LogLength is 0")


# --- a BAT full of errors -------------------------------------------------------------------
def test_4m_entries_past_eof_is_one_finding(tmp_path):
    """4 TiB, 1 MiB blocks, all 4,194,304 payload entries FULLY_PRESENT past EOF.
    Before: info 21 s / 2.4 GiB, check 17 s, map 12 s. Measured after: 0.6-0.7 s
    CPU, 58 MiB (the CLI itself is about 25 MiB)."""
    path = tmp_path / "eof.vhdx"
    vhdx.create(path, 4 * TiB, block_size=MiB)
    with ImageFile(path) as img:
        geo, bat_off, fsize = img.geometry, img.header_section.bat_region.file_offset, img.file_size
    cr = geo.chunk_ratio
    table = array("Q", [S.bat_entry(FULLY, (fsize // MiB + 16) * MiB)]) * geo.total_entries
    table[cr::cr + 1] = array("Q", bytes(8 * len(range(cr, geo.total_entries, cr + 1))))
    poke(path, bat_off, table.tobytes())
    del table
    before = sha(path)
    with pytest.raises(vhdx.CorruptImageError, match=r"past the end of the file .*and 4194303 more entries"):
        vhdx.open(path)
    for cmd in ("info", "map"):
        r = measure(tmp_path, cmd, path)
        one_line_error(r, path, "4194303 more entries")
        assert r["cpu"] < 2.5 and r["hwm"] < 160 * MiB, r
    r = measure(tmp_path, "check", path, "--json")
    report = json.loads(r["stdout"])
    assert r["rc"] != 0 and [f["severity"] for f in report["findings"]] == ["error"]
    assert "4194303 more entries" in report["findings"][0]["message"]
    assert r["cpu"] < 2.5 and r["hwm"] < 160 * MiB, r
    assert sha(path) == before


def test_many_warnings_are_one_warning(tmp_path):
    """A non-fatal problem in every entry (reserved bits) is one warning with a count,
    not a list of a million strings."""
    path = tmp_path / "res.vhdx"
    vhdx.create(path, TiB, block_size=MiB)
    with ImageFile(path) as img:
        geo, bat_off = img.geometry, img.header_section.bat_region.file_offset
    cr = geo.chunk_ratio
    table = array("Q", [S.PAYLOAD_BLOCK_ZERO | 1 << 12]) * geo.total_entries
    table[cr::cr + 1] = array("Q", bytes(8 * len(range(cr, geo.total_entries, cr + 1))))
    poke(path, bat_off, table.tobytes())
    with vhdx.open(path) as d:
        bat_warnings = [w for w in d.warnings if "reserved bits" in w]
        assert len(bat_warnings) == 1
        assert f"and {geo.payload_blocks - 1} more entries" in bat_warnings[0]
        assert d.read_at(123 * MiB, 4096) == bytes(4096)


# --- logs -----------------------------------------------------------------------------------
def _sparse_dirty_log(tmp_path: Path, log_gib: int) -> tuple[Path, bytes]:
    """A small image whose (sparse) log region of ``log_gib`` GiB, marked dirty, holds
    one entry in its middle: it sets block 1 FULLY_PRESENT at a fresh offset."""
    c = build_chain(tmp_path, [ImageSpec(virtual_size=8 * MiB, name=f"log{log_gib}",
                                         blocks={0: Block(FULLY)}, seed=log_gib)])
    img = c.images[0]
    size = img.path.stat().st_size
    data = random.Random(log_gib).randbytes(MiB)
    poke(img.path, size, data)  # block 1's data, at the end of the file
    log_off = size + MiB
    log_len = log_gib * GiB
    os.truncate(img.path, log_off + log_len)
    sector = bytearray(S.LOG_SECTOR_SIZE)
    geo = img.plan.geometry
    for b, raw in ((0, img.bat[geo.payload_index(0)]), (1, S.bat_entry(FULLY, size))):
        sector[8 * geo.payload_index(b):8 * geo.payload_index(b) + 8] = raw.to_bytes(8, "little")
    guid = uuid.uuid4()
    pos = log_len // 2 + 8192
    fsz = log_off + log_len
    poke(img.path, log_off + pos, build_log_entry(7, pos, guid, [("data", img.plan.bat_offset, bytes(sector))],
                                                  fsz, fsz))
    rewrite_headers(img.path, img.plan, log_guid=guid, log_offset=log_off, log_length=log_len)
    return img.path, data


@pytest.mark.parametrize("log_gib", [1, 3])
def test_sparse_dirty_log_is_read_entry_by_entry(tmp_path, log_gib):
    """Before: the whole region was read (1 GiB: 5.8 s / 1.1 GiB; 3 GiB: 23 s /
    5.2 GiB). Measured after: 0.1 s CPU, 26 MiB."""
    path, data = _sparse_dirty_log(tmp_path, log_gib)
    before = sha(path)
    with vhdx.open(path) as d:
        assert d.chain[0].log_replayed
        assert d.read_at(MiB, MiB) == data  # the logged BAT change is applied in memory
    r = measure(tmp_path, "info", "--json", path)
    assert r["rc"] == 0, r["stderr"]
    assert json.loads(r["stdout"])["chain"][0]["log"]["entries_replayed"] == 1
    assert r["cpu"] < 2.0 and r["hwm"] < 100 * MiB, r
    assert sha(path) == before


def test_many_descriptors_replay_in_n_log_n(tmp_path):
    """One CRC-valid entry of 12,000 data descriptors, then 12,000 zero descriptors
    over separate sectors elsewhere. The overlay used to rescan every data sector
    and every zero range per zero descriptor (quadratic: 11 s CPU here); now
    1.6 s CPU (parsing 24,000 descriptors)."""
    c = build_chain(tmp_path, [ImageSpec(virtual_size=8 * MiB, name="mix", blocks={0: Block(FULLY)})])
    img = c.images[0]
    size = img.path.stat().st_size
    log_off = -(-size // MiB) * MiB
    log_len = 64 * MiB
    area = log_off + log_len  # the replay's target range, past the log: no structure there
    n = 12000
    rng = random.Random(3)
    data = [rng.randbytes(4096) for _ in range(n)]
    descs = [("data", area + k * 4096, data[k]) for k in range(n)]
    zero_at = area + n * 4096 + 4096
    descs += [("zero", zero_at + 2 * k * 4096, 4096) for k in range(n)]
    fsz = zero_at + 2 * n * 4096
    os.truncate(img.path, fsz)
    poke(img.path, zero_at, b"\xff" * (2 * n * 4096))  # what the zero descriptors clear
    guid = uuid.uuid4()
    poke(img.path, log_off, build_log_entry(9, 0, guid, descs, fsz, fsz))
    rewrite_headers(img.path, img.plan, log_guid=guid, log_offset=log_off, log_length=log_len)
    r = measure(tmp_path, "info", "--json", img.path)
    assert r["rc"] == 0, r["stderr"]
    assert json.loads(r["stdout"])["chain"][0]["log"]["entries_replayed"] == 1
    assert r["cpu"] < 3.0 and r["hwm"] < 250 * MiB, r
    with ImageFile(img.path) as f:
        assert f.read_file(area + 4096 * 1234, 4096) == data[1234]
        assert f.read_file(zero_at + 2 * 77 * 4096, 8192) == bytes(4096) + b"\xff" * 4096


def test_overlay_equals_replaying_the_updates_in_order():
    from vhdx.log import Overlay, Update

    sector = S.LOG_SECTOR_SIZE
    size = 64 * sector
    for seed in range(200):
        rng = random.Random(seed)
        ups = []
        for _ in range(rng.randint(0, 40)):
            off = rng.randrange(60) * sector
            if rng.random() < 0.5:
                ups.append(Update(off, sector, rng.randbytes(sector)))
            else:
                ups.append(Update(off, min(rng.randrange(6) * sector, size - off), None))
        ref = bytearray(b"\xee" * size)
        for u in ups:
            ref[u.file_offset:u.end] = bytes(u.length) if u.data is None else u.data
        ov = Overlay(ups)
        for _ in range(10):
            a = rng.randrange(size)
            b = rng.randrange(a, size + 1)
            buf = bytearray(b"\xee" * size)
            if ov.touches(a, b - a):
                ov.patch(a, memoryview(buf)[a:b])
            assert buf[a:b] == ref[a:b], (seed, a, b)


def test_log_scan_without_hole_reports(tmp_path, monkeypatch):
    """Where SEEK_DATA is refused every sector is looked at, chunk by chunk: same plan."""
    import vhdx.image as image_mod

    path, data = _sparse_dirty_log(tmp_path, 1)

    def refuse(fd, start, end):  # noqa: ANN001, ANN202
        raise OSError(errno.EINVAL, "SEEK_DATA unsupported")

    monkeypatch.setattr(image_mod, "data_extents", refuse)
    with vhdx.open(path) as d:
        assert d.chain[0].log_replayed and d.read_at(MiB, MiB) == data


@pytest.mark.parametrize("seed", range(4))
def test_log_reader_equals_the_whole_region_plan(tmp_path, seed):
    """Builder dirty logs (entries wrapping the ring's end, stale entries of other
    LogGuids): the chunked reader with hole extents plans what the plan over the
    region's bytes plans."""
    from vhdx import log as LOG

    rng = random.Random(seed)
    spec = ImageSpec(virtual_size=16 * MiB, name=f"d{seed}", seed=seed,
                     blocks={b: Block(FULLY) for b in range(16) if rng.random() < 0.5},
                     dirty_log=DirtyLog(entries=rng.randint(1, 4), start=rng.choice([0, MiB - 8192, 4096 * 37]),
                                        stale=rng.randint(0, 3), log_guid=uuid.UUID(int=rng.getrandbits(128))))
    c = build_chain(tmp_path, [spec])
    plan_ref = None
    with ImageFile(c.top) as img:
        h = img.header
        whole = img._pread(h.log_offset, h.log_length)
        plan_ref = LOG.plan_replay(whole, h.log_length, h.log_guid, img.file_size)
        got = img.replay
        assert [(e.offset, e.sequence_number) for e in got.entries] == \
            [(e.offset, e.sequence_number) for e in plan_ref.entries]
        assert got.updates == plan_ref.updates and got.entries
    assert vhdx.open(c.top).read_at(0, 16 * MiB) == c.expected()


# --- huge sparse chains -----------------------------------------------------------------------
def _big_chain(d: Path, size: int, data_mib: int, seed: int = 0) -> tuple[Path, dict[int, bytes]]:
    """base (dynamic, empty) + child holding ``data_mib`` MiB spread over ``size``."""
    rng = random.Random(seed)
    vhdx.create(d / "base.vhdx", size)
    vhdx.create(d / "child.avhdx", parent=d / "base.vhdx")
    written = {}
    with vhdx.open(d / "child.avhdx", "r+") as disk:
        for _ in range(data_mib):
            off = rng.randrange(size // MiB) * MiB
            written[off] = rng.randbytes(MiB)
            disk.write_at(off, written[off])
    return d / "child.avhdx", written


def test_map_of_a_64tib_child_holding_4mib(tmp_path):
    """Before: past 30 s (every block resolved). Measured after: 0.1 s CPU, 27 MiB."""
    child, written = _big_chain(tmp_path, 64 * TiB, 4)
    r = measure(tmp_path, "map", "--json", child)
    assert r["rc"] == 0, r["stderr"]
    assert r["cpu"] < 2.0 and r["hwm"] < 100 * MiB, r
    ext = json.loads(r["stdout"])["extents"]
    data = sorted((e["offset"], e["length"]) for e in ext if e["kind"] == "data")
    assert data == sorted((o, MiB) for o in written)  # no two draws touch (64 TiB apart)
    assert sum(e["length"] for e in ext) == 64 * TiB
    assert all(e["kind"] in ("data", "unallocated") for e in ext)
    for cmd in ("info", "check"):
        r = measure(tmp_path, cmd, child)
        assert r["rc"] == 0 and r["cpu"] < 2.0 and r["hwm"] < 100 * MiB, r


def _max_file_size(d: Path, want: int) -> int:
    """``want``, or 15 TiB where the file system cannot hold a file that large (ext4)."""
    probe = d / "probe"
    try:
        with open(probe, "wb") as fh:
            fh.truncate(want)
        return want
    except OSError as e:
        if e.errno != errno.EFBIG:
            raise
        return 15 * TiB
    finally:
        probe.unlink(missing_ok=True)


def test_convert_of_a_64tib_child_holding_1mib(tmp_path):
    """Raw, sparse, driven by the extent map. Before: 183 s / 665 MiB (64 TiB; 15 TiB:
    past 60 s). Measured after: 0.2 s CPU, 32 MiB."""
    size = _max_file_size(tmp_path, 64 * TiB)
    child, written = _big_chain(tmp_path, size, 1, seed=1)
    out = tmp_path / "out.raw"
    r = measure(tmp_path, "convert", child, out)
    assert r["rc"] == 0, r["stderr"]
    assert r["cpu"] < 3.0 and r["hwm"] < 100 * MiB, r
    assert out.stat().st_size == size
    assert out.stat().st_blocks * 512 <= 8 * MiB  # sparse: the data, not the size
    (off, data), = written.items()
    with open(out, "rb") as fh:
        fh.seek(off)
        assert fh.read(MiB) == data
        fh.seek(off - 4096)
        assert fh.read(4096) == bytes(4096)


def _discarded_child(d: Path, size: int) -> Path:
    """base (dynamic) + child whose every payload entry is ZERO or UNMAPPED (chunks
    alternate), as a guest mkfs with discard leaves it; BAT written directly."""
    vhdx.create(d / "base.vhdx", size)
    child = d / "child.avhdx"
    vhdx.create(child, parent=d / "base.vhdx")
    with ImageFile(child) as img:
        geo, bat_off = img.geometry, img.header_section.bat_region.file_offset
    cr = geo.chunk_ratio
    chunks = [array("Q", [st] * cr + [0]).tobytes() for st in (S.PAYLOAD_BLOCK_ZERO, S.PAYLOAD_BLOCK_UNMAPPED)]
    with open(child, "r+b") as fh:
        fh.seek(bat_off)
        for c in range(geo.total_entries // (cr + 1)):
            fh.write(chunks[c % 2])
    return child


def test_fully_discarded_16tib_child(tmp_path):
    """Before: merge 17-27 s / 1,180 MiB, info/check 22-24 s (here 12 s CPU each).
    Measured after: info/check 0.9 s CPU, merge 1.5 s CPU; 93 MiB with a 64 MiB BAT."""
    child = _discarded_child(tmp_path, 16 * TiB)
    bat_bytes = 64 * MiB
    r = measure(tmp_path, "info", "--json", child)
    assert r["rc"] == 0, r["stderr"]
    blocks = json.loads(r["stdout"])["chain"][0]["blocks"]
    assert blocks == {"ZERO": 4194304, "UNMAPPED": 4194304, "NOT_PRESENT": 0}
    assert r["cpu"] < 4.0 and r["hwm"] < 100 * MiB + bat_bytes, r
    r = measure(tmp_path, "check", child)
    assert r["rc"] == 0 and r["cpu"] < 4.0 and r["hwm"] < 100 * MiB + bat_bytes, r
    r = measure(tmp_path, "merge", "--dry-run", child)
    assert r["rc"] == 0 and r["cpu"] < 5.0 and r["hwm"] < 100 * MiB + bat_bytes, r
    assert "blocks changed 0" in r["stdout"]
    r = measure(tmp_path, "merge", child)
    assert r["rc"] == 0, r["stderr"]
    assert r["cpu"] < 6.0 and r["hwm"] < 100 * MiB + bat_bytes, r
    assert not child.exists()
    with vhdx.open(tmp_path / "base.vhdx") as d:  # the base read zeros before and after
        assert [e.kind for e in d.extents()] == ["unallocated"]


def test_discarded_child_over_data_zeroes_it(tmp_path):
    """The run-based plan still changes what must change: a discarded child over a
    parent with data merges into a parent that reads zeros (ZERO entries)."""
    d = tmp_path
    vhdx.create(d / "base.vhdx", 256 * MiB)
    with vhdx.open(d / "base.vhdx", "r+") as disk:
        disk.write_at(40 * MiB, b"\xaa" * (3 * MiB))
        disk.write_at(200 * MiB, b"\xbb" * 4096)
    child = _discarded_child_small(d)
    with vhdx.open(child) as disk:
        assert disk.read_at(0, 256 * MiB) == bytes(256 * MiB)
    summary = vhdx.merge(child)
    assert summary.blocks_changed == 2
    with vhdx.open(d / "base.vhdx") as disk:
        assert disk.read_at(0, 256 * MiB) == bytes(256 * MiB)
        assert {e.kind for e in disk.extents()} <= {"zero", "unallocated"}


def _discarded_child_small(d: Path) -> Path:
    child = d / "child.avhdx"
    vhdx.create(child, parent=d / "base.vhdx")
    with ImageFile(child) as img:
        geo, bat_off = img.geometry, img.header_section.bat_region.file_offset
    t = array("Q", bytes(8 * geo.total_entries))
    for b in range(geo.payload_blocks):
        t[geo.payload_index(b)] = S.PAYLOAD_BLOCK_ZERO if b % 3 else S.PAYLOAD_BLOCK_UNMAPPED
    poke(child, bat_off, t.tobytes())
    return child


# --- the run-based resolvers against the per-block ones -------------------------------------
@pytest.mark.parametrize("seed", range(12))
def test_segments_by_runs_equal_the_per_block_resolver(tmp_path, seed):
    from test_merge import random_chain

    rng = random.Random(seed)
    chain = random_chain(tmp_path, rng, rng.randint(1, 3), rng.choice([512, 4096]))
    with vhdx.open(chain.top) as disk:
        assert isinstance(disk, VirtualDisk)
        size = disk.size
        cuts = [(0, size)] + [(o, rng.randrange(1, size - o + 1))
                              for o in (rng.randrange(size) // 512 * 512 for _ in range(20))]
        for off, n in cuts:
            ref: list = []
            disk._resolve(0, off, n, off, ref)
            assert disk.segments(off, n) == ref, (off, n)
        ext = disk.extents()
        assert sum(e.length for e in ext) == size
        data = bytearray(size)
        for e in ext:  # the map reproduces the content
            if e.kind == "data":
                data[e.offset:e.offset + e.length] = disk.chain[e.source].read_file(e.file_offset, e.length)
        assert bytes(data) == chain.expected()


@pytest.mark.parametrize("seed", range(6))
def test_payload_runs_and_state_counts(tmp_path, seed):
    """payload_runs against the BAT read entry by entry, over random sub-ranges."""
    from test_merge import random_chain

    rng = random.Random(100 + seed)
    chain = random_chain(tmp_path, rng, 2, 512)
    for path in chain.paths:
        with ImageFile(path) as img:
            geo = img.geometry
            per_block = [img.bat[geo.payload_index(b)] for b in range(geo.payload_blocks)]
            for first, stop in [(0, None)] + [tuple(sorted(rng.sample(range(geo.payload_blocks + 1), 2)))
                                               for _ in range(5)]:
                expect = per_block[first:stop]
                got = [0] * len(expect)
                for b, n, e in img.payload_runs(first, stop):
                    assert e != 0 and n > 0
                    for k in range(b, b + n):
                        got[k - first] = e
                assert got == expect
            counts = img.block_state_counts()
            assert sum(counts.values()) == geo.payload_blocks
            for st, n in counts.items():
                assert n == sum(1 for e in per_block if e & 7 == st)


# --- space an interrupted merge left --------------------------------------------------------
def test_check_reports_the_tail_an_interrupted_merge_left(tmp_path):
    """A merge killed after moving data but before its commit leaves allocated,
    unreferenced blocks at the end of the target: a leak (not corruption), with its
    size; the chain still reads as before, and rerunning the merge completes it."""
    from vhdx.check import check_chain

    d = tmp_path
    vhdx.create(d / "base.vhdx", 64 * MiB, block_size=MiB)
    vhdx.create(d / "child.avhdx", parent=d / "base.vhdx", block_size=MiB)
    with vhdx.open(d / "child.avhdx", "r+") as disk:
        disk.write_at(8 * MiB, random.Random(7).randbytes(6 * MiB))
    with vhdx.open(d / "child.avhdx") as disk:
        expected = disk.read_at(0, disk.size)
    base_size = (d / "base.vhdx").stat().st_size
    assert check_chain(d / "base.vhdx").findings == []
    # Move (and report) every block, never commit by time, and die at the first report:
    # the data is in the target's new blocks, the BAT change that exposes it is not.
    kill = ("import os, sys, vhdx, vhdx.merge_engine as ME\n"
            "ME.CHUNK_BYTES = 1 << 20\nME.BATCH_SECONDS = 1e9\n"
            "vhdx.merge(sys.argv[1], progress=lambda done, total: os._exit(9))\n")
    p = subprocess.run([sys.executable, "-c", kill, str(d / "child.avhdx")], cwd=REPO, timeout=120)
    assert p.returncode == 9
    grown = (d / "base.vhdx").stat().st_size - base_size
    assert grown > 0
    report = check_chain(d / "base.vhdx")
    leaks = [f for f in report.findings if f.severity == "leak"]
    # The log entry the merge wrote first (its new DataWriteGuid) is pending too.
    assert len(leaks) == 1 and all("unapplied" in f.message for f in report.findings if f not in leaks)
    assert report.leaked_bytes == grown
    assert leaks[0].message == \
        f"{grown} bytes unused at the end of {d / 'base.vhdx'} (an interrupted merge?)"
    r = measure(tmp_path, "check", "--json", d / "base.vhdx")
    assert json.loads(r["stdout"])["leaked_bytes"] == grown
    with vhdx.open(d / "child.avhdx") as disk:
        assert disk.read_at(0, disk.size) == expected
    vhdx.merge(d / "child.avhdx")  # rerunning completes it
    with vhdx.open(d / "base.vhdx") as disk:
        assert disk.read_at(0, disk.size) == expected


def test_no_leak_reported_for_padding_or_whole_files(tmp_path):
    """Less than a MiB past the last structure (Disk2VHD pads 512 bytes) is no leak,
    nor is a file that ends at its last block."""
    from vhdx.check import check_chain

    c = build_chain(tmp_path, [ImageSpec(virtual_size=8 * MiB, name="pad", blocks={0: Block(FULLY)})])
    assert check_chain(c.top).findings == []
    with open(c.top, "ab") as fh:
        fh.write(bytes(512))
    assert check_chain(c.top).findings == []
    with open(c.top, "ab") as fh:
        fh.write(bytes(MiB))
    report = check_chain(c.top)
    assert [(f.severity, report.leaked_bytes) for f in report.findings] == [("leak", MiB)]
