"""Hostile HyperVStorage files: every structure truncated or bit-flipped at many offsets
gives a VhdxError or exactly the original data, never another exception, a hang or
unbounded memory; structural edits with re-sealed CRCs (cycles, bad parents, oversized
lengths, chained tables, torn logs) are refused or reported.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import hvs_builder as B
import pytest

from vhdx.errors import ConfigChecksumError, CorruptConfigError, VhdxError
from vhdx.hyperv import open_config
from vhdx.hyperv import structures as S
from vhdx.hyperv.vm import config_kind, read_host_registry, read_vm_config

TESTS = Path(__file__).resolve().parent
PER_OPEN_SECONDS = 2.0


def _sample_tree() -> list:
    """Two key tables, repeated sibling names, every value type, a file object."""
    tree = B.vm_tree("Corrupt Me", "12345678-1234-1234-1234-123456789ABC",
                     ide=[r"C:\VMs\a.vhdx"], scsi=[r"C:\VMs\b.avhdx", r"C:\VMs\c.avhdx"])
    metrics = B.N("metrics", *[B.N("devicetype", B.V("guid", f"g{i}"), B.V("n", i)) for i in range(3)])
    tree[0].children += [metrics, B.N("values", B.V("u", 2**63, type=S.VT_UINT), B.V("d", -2.5),
                                      B.V("blob", bytes(range(256)) * 12, file_object=True))]
    tree[0].children += [B.N(f"pad{i}", B.V("s", "x" * 150)) for i in range(30)]
    return tree


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> tuple[bytes, dict]:
    b = B.build(_sample_tree(), insertion_gap=2, reverse_physical=True)
    assert len(b.layout["tables"]) >= 2
    return b.data, b.layout


def _open(path: Path, strict: bool = True):
    t = time.monotonic()
    try:
        cfg = open_config(path, strict=strict)
        if config_kind(cfg) == "host":
            read_host_registry(cfg)
        else:
            read_vm_config(cfg)  # the semantic layer type-checks what it reads
        return cfg
    finally:
        assert time.monotonic() - t < PER_OPEN_SECONDS


def _check(path: Path, data: bytes, want: dict, what: str) -> str:
    path.write_bytes(data)
    try:
        cfg = _open(path)
    except VhdxError:
        _salvage(path)
        return "error"
    except Exception as e:  # pragma: no cover - the assertion is the report
        raise AssertionError(f"{what}: {type(e).__name__}: {e}") from e
    assert cfg.to_dict() == want, f"{what}: parsed without error but to different data"
    return "same"


def _salvage(path: Path) -> None:
    try:
        _open(path, strict=False)
    except VhdxError:
        pass


def _regions(layout: dict, size: int) -> dict[str, tuple[int, int]]:
    r = {"header 0": (0, S.FILE_HEADER_SIZE), "header 1": (0x1000, S.FILE_HEADER_SIZE),
         "object table": (0x2000, 0x1000), "log header": (layout["log"], 0x22 + 28 * 8)}
    for i, (off, n) in enumerate(layout["tables"]):
        r[f"key table {i + 1}"] = (off, n)
    # File objects are raw value bytes with no checksum in the format (hyperv.md §2.8): a flip
    # there is a different value, read faithfully, so they are not a corruption target.
    return r


def _mutations(data: bytes, regions: dict, flips_per_region: int, seed: int):
    rnd = random.Random(seed)
    for name, (off, n) in regions.items():
        n = max(1, min(n, len(data) - off))
        for _ in range(flips_per_region):
            pos = off + rnd.randrange(n)
            bit = rnd.randrange(8)
            buf = bytearray(data)
            buf[pos] ^= 1 << bit
            yield f"{name}: bit {bit} of {pos:#x}", bytes(buf)


def _run_all(tmp_path: Path, data: bytes, regions: dict, flips: int, truncations: int, seed: int) -> dict:
    p = tmp_path / "m.vmcx"
    p.write_bytes(data)
    want = open_config(p).to_dict()
    outcome = {"error": 0, "same": 0}
    for what, buf in _mutations(data, regions, flips, seed):
        outcome[_check(p, buf, want, what)] += 1
    cuts = sorted(set(random.Random(seed).sample(range(len(data)), min(truncations, len(data))))
                  | {0, 3, 0x2D, 0x1000, 0x2000, 0x2008, 0x3000, 0x300A, len(data) - 1})
    for n in cuts:
        outcome[_check(p, data[:n], want, f"truncated to {n:#x}")] += 1
    return outcome


def test_builder_file_flips_and_truncations(tmp_path, sample):
    data, layout = sample
    out = _run_all(tmp_path, data, _regions(layout, len(data)), 25, 80, seed=1)
    # header-copy flips fall back to the other copy; flips in slack or free space change nothing
    assert out["error"] > 100 and out["same"] > 10, out


@pytest.mark.parametrize("rel", ["dissect.hypervisor/test.vmcx", "dissect.hypervisor/test.VMRS",
                                 "dissect.target/data.vmcx"])
def test_real_file_flips_and_truncations(tmp_path, fixture_file, rel):
    src = fixture_file(rel)  # a session copy; the original is never touched
    data = src.read_bytes()
    cfg = open_config(src)
    layout = {"log": cfg.log.offset, "tables": [(t.offset, t.size) for t in cfg.tables]}
    out = _run_all(tmp_path, data, _regions(layout, len(data)), 8, 25, seed=2)
    assert out["error"] > 30, out


def _edit(data: bytes, layout: dict, name: str, fn) -> bytes:
    """Apply ``fn(buf, entry_offset)`` to the key entry called ``name`` and re-seal."""
    buf = bytearray(data)
    off = next(o for o, _n, nm in layout["entries"] if nm == name)
    fn(buf, off)
    return bytes(B.reseal(buf))


def _set(buf: bytearray, off: int, fmt_size: int, value: int) -> None:
    buf[off:off + fmt_size] = value.to_bytes(fmt_size, "little")


def _raises(tmp_path: Path, data: bytes, cls=CorruptConfigError, match: str | None = None):
    p = tmp_path / "e.vmcx"
    p.write_bytes(data)
    with pytest.raises(cls, match=match) as info:
        _open(p)
    assert type(info.value) is cls, repr(info.value)  # exactly: not a subclass (checksum vs structure)
    _salvage(p)
    return p


def test_reseal_is_a_no_op_on_a_valid_file(sample):
    data, _ = sample
    assert bytes(B.reseal(data)) == data


def test_structural_edits(tmp_path, sample):
    data, layout = sample
    cfg_off = next(o for o, _n, nm in layout["entries"] if nm == "configuration")
    props_off = next(o for o, _n, nm in layout["entries"] if nm == "properties")
    t0 = layout["tables"][0][0]

    # configuration made a child of its own child: a cycle, never attached
    def cycle(buf, off):
        tbl, rel = divmod(props_off - 0x3000, 0x1000)
        _set(buf, off + 6, 2, tbl + 1)
        _set(buf, off + 8, 4, rel)
    p = _raises(tmp_path, _edit(data, layout, "configuration", cycle), match="not attached")
    salv = open_config(p, strict=False)
    assert salv.root.children == [] and len(salv.orphans) == sum(1 for e in layout["entries"])

    # parent offset into the middle of an entry
    def mid(buf, off):
        _set(buf, off + 8, 4, int.from_bytes(buf[off + 8:off + 12], "little") + 3)
    _raises(tmp_path, _edit(data, layout, "name", mid), match="not attached")
    # parent is a value, not a node
    name_off = next(o for o, _n, nm in layout["entries"] if nm == "name")

    def to_value(buf, off):
        tbl, rel = divmod(name_off - 0x3000, 0x1000)
        _set(buf, off + 6, 2, tbl + 1)
        _set(buf, off + 8, 4, rel)
    _raises(tmp_path, _edit(data, layout, "global_id", to_value), match="not attached")

    # string length prefix 0x7FFFFFF0: refused, not clamped
    def huge(buf, off):
        _set(buf, off + 21 + len(b"name\0"), 4, 0x7FFFFFF0)
    _raises(tmp_path, _edit(data, layout, "name", huge), match="does not fit")

    # odd UTF-16 length: kept as bytes and flagged, the semantic layer ignores it
    def odd(buf, off):
        v = off + 21 + len(b"name\0")
        _set(buf, v, 4, int.from_bytes(buf[v:v + 4], "little") - 1)
    p = tmp_path / "odd.vmcx"
    p.write_bytes(_edit(data, layout, "name", odd))
    cfg = open_config(p)
    k = cfg.get("configuration/properties/name")
    assert isinstance(k.value, bytes) and k.invalid
    vm = read_vm_config(cfg)
    assert vm.name is None and any("properties/name" in w for w in vm.warnings)

    # a boolean where a string is expected (the semantic-layer crash of hyperv.md §5.2):
    # a valid container, so it parses; the VM layer reports the drive's path as absent
    p.write_bytes(_edit(data, layout, "pathname", lambda buf, off: _set(buf, off, 1, S.VT_BOOL)))
    cfg = open_config(p)
    assert isinstance(cfg.get("configuration/_83f8638b-8dca-4152-9eda-2ca8b33039b4_/controller0/drive0/pathname")
                      .value, bool)
    vm = read_vm_config(cfg)
    assert vm.drives[0].pathname == "" and any("pathname: expected str" in w for w in vm.warnings)

    # entry size 0 in the middle of a table: warned in salvage mode, orphans reported
    def zero_size(buf, off):
        _set(buf, off + 2, 4, 0)
    _raises(tmp_path, _edit(data, layout, "properties", zero_size), match="not attached")
    # entry size beyond the table, value type 2 and 0x33, name without NUL
    _raises(tmp_path, _edit(data, layout, "version", lambda b, o: _set(b, o + 2, 4, 0x10000)), match="out of bounds")
    for t in (2, 0, 0x33):
        _raises(tmp_path, _edit(data, layout, "version", lambda b, o, t=t: _set(b, o, 1, t)))
    _raises(tmp_path, _edit(data, layout, "version", lambda b, o: _set(b, o + 20, 1, 200)))

    # key table with an index of 0 / a second live copy of index 1 (the newer one wins)
    buf = bytearray(data)
    _set(buf, t0 + 2, 2, 0)
    _raises(tmp_path, bytes(B.reseal(buf)))

    # object table: absurd count, object past EOF, a type-1 chain that loops onto itself
    buf = bytearray(data)
    _set(buf, 0x2004, 4, 0xFFFFFFFF)
    _raises(tmp_path, bytes(B.reseal(buf)), match="do not fit")
    slot = 0x2008
    buf = bytearray(data)
    _set(buf, slot + 13, 4, 0x7FFFFFFF)
    _raises(tmp_path, bytes(B.reseal(buf)), match="out of bounds")
    buf = bytearray(data)
    free = 0x2008 + 18 * 20  # an empty slot
    buf[free:free + 18] = S.ObjectTableEntry.build({"type": S.OBJ_TABLE, "offset": 0x2000, "size": 0x1000, "flags": 1})
    _raises(tmp_path, bytes(B.reseal(buf)), match="loop")

    # file-object pointer naming no file object
    def bad_ptr(buf, off):
        v = off + 21 + len(b"blob\0")
        _set(buf, v + 4, 8, 0x3000)
    _raises(tmp_path, _edit(data, layout, "blob", bad_ptr), match="names no file object")

    # depth: a chain of 200 nested nodes is refused as too deep
    deep = B.N("n0")
    cur = deep
    for i in range(1, 200):
        nxt = B.N(f"n{i}")
        cur.children.append(nxt)
        cur = nxt
    _raises(tmp_path, B.build([deep]).data, match="deeper")
    assert cfg_off  # used above through the layout


def test_header_choice_and_log_checks(tmp_path, sample):
    data, _layout = sample
    p = tmp_path / "h.vmcx"
    want = None
    # copy 1 newer (u16 serial arithmetic across the wrap) -> copy 1 is used
    for seqs, slot in (((7, 6), 0), ((6, 7), 1), ((65535, 0), 1), ((0, 65535), 0)):
        p.write_bytes(B.build(_sample_tree(), sequences=seqs).data)
        cfg = open_config(p)
        want = want or cfg.to_dict()
        assert cfg.header.slot == slot and cfg.to_dict() == want
    # a bad copy 0 falls back to copy 1, with a warning
    buf = bytearray(data)
    buf[0x1A] ^= 1  # the log offset (CRC now fails)
    p.write_bytes(buf)
    cfg = open_config(p)
    assert cfg.header.slot == 1 and any("header 1" in w for w in cfg.warnings)
    # both bad
    buf[0x101A] ^= 1
    _raises(tmp_path, bytes(buf), ConfigChecksumError)
    # not a HyperVStorage file at all
    _raises(tmp_path, b"vhdxfile" + bytes(5000), match="not a HyperVStorage")
    # a CRC-valid header whose log lies past the end: the other copy is used
    buf = bytearray(data)
    _set(buf, 0x1A, 8, 1 << 40)
    buf[0:0x2E] = S.crc32_seal(bytearray(buf[0:0x2E]), 4)
    p.write_bytes(buf)
    assert open_config(p).header.slot == 1
    # active log entries: bad entry CRC, data CRC, target inside the headers, data past the log
    old = B.vm_tree("old", "12345678-1234-1234-1234-123456789ABC")
    dirty = B.build(_sample_tree(), dirty_from=old)
    lo = dirty.layout["log"]
    p.write_bytes(dirty.data)
    assert open_config(p).log.replayed
    e0 = lo + S.LOG_HEADER_SIZE
    for field_off, value, match in ((0, 0x10, "inside the file headers"), (12, 0x10, "outside the log"),
                                    (8, 1 << 30, "outside the log")):
        buf = bytearray(dirty.data)
        _set(buf, e0 + field_off, 8 if field_off == 0 else 4, value)
        _raises(tmp_path, bytes(B.reseal(buf)), match=match)
    buf = bytearray(dirty.data)
    buf[lo + 0x1000] ^= 0xFF  # the data of entry 0, CRCs not re-sealed
    _raises(tmp_path, bytes(buf), ConfigChecksumError, match="data CRC")
    p.write_bytes(bytes(buf))
    stale = open_config(p, replay=False)  # the explicit, flagged read of the un-replayed file
    assert stale.get("configuration/properties/name").value == "old" and stale.warnings
    # active > max entries
    buf = bytearray(dirty.data)
    _set(buf, lo + 8, 4, 1000)
    _raises(tmp_path, bytes(B.reseal(buf)), match="more than the maximum")


def test_input_file_is_never_written(tmp_path, sample):
    data, _ = sample
    p = tmp_path / "ro.vmcx"
    p.write_bytes(data)
    p.chmod(0o444)
    st = p.stat()
    open_config(p)
    assert p.read_bytes() == data and p.stat().st_mtime_ns == st.st_mtime_ns


def _run_fuzz(tmp_path: Path, seconds: int, rss_mb: int) -> subprocess.CompletedProcess:
    pytest.importorskip("atheris")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    p = subprocess.run([sys.executable, str(TESTS / "fuzz" / "fuzz_hyperv.py"), f"-max_total_time={seconds}",
                        f"-rss_limit_mb={rss_mb}", f"-artifact_prefix={tmp_path}/", str(corpus)],
                       check=False, capture_output=True, text=True,
                       timeout=seconds * 3 + 120)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def test_fuzz_target_runs_briefly(tmp_path):
    """The atheris target (tests/fuzz/fuzz_hyperv.py) for a few seconds in the default suite."""
    p = _run_fuzz(tmp_path, 2, 1024)
    assert "Done" in p.stderr or "DONE" in p.stderr


@pytest.mark.soak
def test_fuzz_target_soak(tmp_path):
    _run_fuzz(tmp_path, 300, 2048)


def test_chained_object_table_limits(tmp_path):
    b = B.build(_sample_tree(), chain_objects=True)
    data = b.data
    assert open_config_bytes(tmp_path, data).stats()["keys"] > 40
    slot = 0x2008  # the root's only slot: the type-1 pointer
    for size in (4, 2 << 20):
        buf = bytearray(data)
        buf[slot + 13:slot + 17] = size.to_bytes(4, "little")
        _raises(tmp_path, bytes(B.reseal(buf)), match="out of bounds")
    # the chained table points back at itself
    chained = int.from_bytes(data[slot + 5:slot + 13], "little")
    buf = bytearray(data)
    p = chained + S.OBJECT_TABLE_HEADER_SIZE + 18 * 50
    buf[p:p + 18] = S.ObjectTableEntry.build({"type": S.OBJ_TABLE, "offset": chained, "size": 0x1000, "flags": 1})
    buf[p:p + 18] = S.crc32_seal(bytearray(buf[p:p + 18]), S.OBJECT_ENTRY_CRC_OFFSET)
    _raises(tmp_path, bytes(buf), match="loop")


def open_config_bytes(tmp_path: Path, data: bytes):
    p = tmp_path / "c.vmcx"
    p.write_bytes(data)
    return open_config(p)


@pytest.mark.soak
def test_mutation_soak(tmp_path, sample):
    data, layout = sample
    chained = B.build(_sample_tree(), chain_objects=True)
    regions = {**_regions(chained.layout, len(chained.data)),
               "chained object table": (chained.layout["chained_object_table"], 0x1000)}
    for seed in range(int(os.environ.get("VHDX_HYPERV_SOAK_SEEDS", "20"))):
        _run_all(tmp_path, data, _regions(layout, len(data)), 200, 400, seed=seed)
        _run_all(tmp_path, chained.data, regions, 100, 100, seed=seed)
