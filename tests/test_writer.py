"""WritableDisk: property tests against a ground-truth buffer, resize, header session
rules, and `vhdx check --repair` / `vhdx resize` on the command line."""

from __future__ import annotations

import hashlib
import json
import random
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vhdx
from vhdx import structures as S
from vhdx.check import check_chain
from vhdx.crc import verify
from vhdx.image import ImageFile

import oracles
from test_create import discard_model, run

MiB = S.MiB


# --- property tests --------------------------------------------------------------------
def _ops(max_size: int):  # noqa: ANN202
    off = st.integers(0, max_size - 1)
    return st.lists(st.one_of(
        st.tuples(st.just("write"), off, st.sampled_from([1, 7, 512, 4096, 5000, MiB, MiB + 513]), st.integers(0, 255)),
        st.tuples(st.just("zero"), off, st.sampled_from([1, 512, 4096, MiB, 3 * MiB]), st.booleans()),
        st.tuples(st.just("flush")),
        st.tuples(st.just("reopen")),
        st.tuples(st.just("resize"), st.integers(1, max_size // 512)),
    ), min_size=1, max_size=14)


def _run_ops(tmp_path, kind: str, ops: list) -> None:  # noqa: ANN001
    size, bs, lss = 3 * MiB + 1536, MiB, 512
    d = tmp_path / f"case-{random.getrandbits(40)}"
    d.mkdir()
    gt = bytearray(size)
    if kind == "differencing":
        base = vhdx.create(d / "base.vhdx", size, block_size=bs)
        with vhdx.open(base, "r+") as b:
            pat = bytes(range(256)) * (size // 256) + bytes(range(256))[:size % 256]
            b.write_at(0, pat)
            gt[:] = pat
        path = vhdx.create(d / "child.avhdx", parent=base, block_size=bs)
    else:
        path = vhdx.create(d / "a.vhdx", size, type=kind, block_size=bs)
    disk = vhdx.open(path, "r+")
    try:
        for op in ops:
            if op[0] == "write":
                _, off, ln, seed = op
                off = min(off, len(gt) - 1)
                ln = min(ln, len(gt) - off)
                data = bytes((seed + i * 31) & 0xFF for i in range(min(ln, 4096))) * (ln // 4096 + 1)
                data = data[:ln]
                disk.write_at(off, data)
                gt[off:off + ln] = data
            elif op[0] == "zero":
                _, off, ln, discard = op
                off = min(off, len(gt) - 1)
                ln = min(ln, len(gt) - off)
                disk.write_zeroes_at(off, ln, discard=discard)
                if discard:
                    discard_model(gt, off, ln, bs, kind == "fixed")
                else:
                    gt[off:off + ln] = bytes(ln)
            elif op[0] == "flush":
                disk.flush()
            elif op[0] == "reopen":
                disk.close()
                disk = vhdx.open(path, "r+")
            else:
                new = op[1] * lss
                if new < len(gt) and any(gt[new:]):
                    with pytest.raises(vhdx.VhdxError, match="holds data"):
                        disk.resize(new)
                else:
                    disk.resize(new)
                    del gt[new:]
                    gt.extend(bytes(new - len(gt)))
                assert disk.size == len(gt)
            assert disk.size == len(gt)
        assert disk.read_at(0, disk.size) == gt
    finally:
        disk.close()
    with vhdx.open(path) as ro:
        assert ro.read_at(0, ro.size) == gt
    report = check_chain(path)
    assert report.clean, [f.message for f in report.findings]


_few = settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
_many = settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("kind", ["dynamic", "fixed", "differencing"])
@_few
@given(ops=_ops(6 * MiB))
def test_random_operations_match_ground_truth(tmp_path_factory, kind, ops):
    _run_ops(tmp_path_factory.mktemp("prop"), kind, ops)


@pytest.mark.soak
@pytest.mark.parametrize("kind", ["dynamic", "fixed", "differencing"])
@_many
@given(ops=_ops(6 * MiB))
def test_random_operations_soak(tmp_path_factory, kind, ops):
    _run_ops(tmp_path_factory.mktemp("soak"), kind, ops)


# --- header session rules -----------------------------------------------------------------
def _headers(path):  # noqa: ANN001, ANN202
    img = ImageFile(path)
    try:
        return img.header_section.headers, img.header
    finally:
        img.close()


def test_session_guids(tmp_path):
    p = vhdx.create(tmp_path / "a.vhdx", 8 * MiB, block_size=MiB)
    _, h0 = _headers(p)
    with vhdx.open(p, "r+") as d:  # open + read only: nothing changes
        d.read_at(0, 4096)
    _, h1 = _headers(p)
    assert (h1.sequence_number, h1.file_write_guid, h1.data_write_guid) == \
        (h0.sequence_number, h0.file_write_guid, h0.data_write_guid)
    with vhdx.open(p, "r+") as d:
        d.write_at(0, b"x")
        d.write_at(MiB, b"y")
        d.flush()
        d.write_at(2 * MiB, b"z")
    _, h2 = _headers(p)
    assert h2.file_write_guid != h0.file_write_guid and h2.data_write_guid != h0.data_write_guid
    assert h2.sequence_number > h0.sequence_number and h2.log_guid == S.ZERO_GUID
    hs, _ = _headers(p)
    assert abs(hs[0].sequence_number - hs[1].sequence_number) == 1  # updated alternately
    with vhdx.open(p, "r+") as d:
        d.resize(16 * MiB)  # the size is user-visible: new DataWriteGuid
    _, h3 = _headers(p)
    assert h3.data_write_guid != h2.data_write_guid


# --- resize ------------------------------------------------------------------------
def _region_tables(path):  # noqa: ANN001, ANN202
    with open(path, "rb") as f:
        raw = f.read(S.REGION_TABLE_OFFSETS[1] + S.REGION_TABLE_SIZE)
    out = []
    for off in S.REGION_TABLE_OFFSETS:
        assert verify(raw[off:off + S.REGION_TABLE_SIZE])  # CRC over the whole 64 KiB
        out.append(bytes(raw[off:off + S.REGION_TABLE_SIZE]))
    return out


@pytest.mark.parametrize("kind", ["dynamic", "fixed", "differencing"])
def test_grow_moves_the_bat_when_needed(tmp_path, kind):
    if kind == "differencing":
        base = vhdx.create(tmp_path / "b.vhdx", 64 * MiB, block_size=MiB)
        p = vhdx.create(tmp_path / "c.avhdx", parent=base, block_size=MiB)
    else:
        p = vhdx.create(tmp_path / "a.vhdx", 64 * MiB, type=kind, block_size=MiB)
    target = 160 << 30 if kind != "fixed" else 130 << 30  # > 131072 entries: BAT region too small
    with vhdx.open(p, "r+") as d:
        d.write_at(5 * MiB - 3, b"abcdef")
        old_bat = d.image.header_section.bat_region
        d.resize(target)
        new_bat = d.image.header_section.bat_region
        assert new_bat.file_offset != old_bat.file_offset and new_bat.length > old_bat.length
        assert new_bat.file_offset % MiB == 0 and new_bat.length % MiB == 0
        d.write_at(target - 10, b"0123456789")
    t1, t2 = _region_tables(p)
    assert t1 == t2
    with vhdx.open(p) as d:
        assert d.size == target
        assert d.read_at(5 * MiB - 3, 6) == b"abcdef"
        assert d.read_at(target - 10, 10) == b"0123456789"
        assert d.read_at(100 << 30, 4096) == bytes(4096)
        img = d.chain[0]
        geo = img.geometry
        states = {img.block(b).state for b in (64, 1000, geo.payload_blocks - 2)}
        want = {"dynamic": S.PAYLOAD_BLOCK_NOT_PRESENT, "fixed": S.PAYLOAD_BLOCK_FULLY_PRESENT,
                "differencing": S.PAYLOAD_BLOCK_ZERO}[kind]
        assert states == {want}
    assert check_chain(p).clean
    if kind != "differencing" and oracles.have_qemu():
        r = oracles.qemu_check(p)
        assert r.returncode == 0, r.stdout + r.stderr


def test_grown_child_reads_zeros_over_larger_parent(tmp_path):
    base = vhdx.create(tmp_path / "b.vhdx", 8 * MiB, block_size=MiB)
    with vhdx.open(base, "r+") as b:
        b.write_at(0, b"\xee" * (8 * MiB))
    child = vhdx.create(tmp_path / "c.avhdx", parent=base, block_size=2 * MiB)
    with vhdx.open(child, "r+") as c:
        with pytest.raises(vhdx.VhdxError, match="holds data"):
            c.resize(3 * MiB)
        c.write_zeroes_at(3 * MiB - 1024, 5 * MiB + 1024)
        c.resize(3 * MiB - 1024)                 # cut range reads zeros: allowed
        c.resize(8 * MiB)                        # the parent beyond must not show through
        got = c.read_at(0, 8 * MiB)
    assert got == b"\xee" * (3 * MiB - 1024) + bytes(5 * MiB + 1024)
    with vhdx.open(child) as c:
        assert c.read_at(0, 8 * MiB) == got
    if oracles.have_dissect():
        assert oracles.dissect_bytes([child, base]) == got
    assert check_chain(child).clean


def test_shrink_drops_entries(tmp_path):
    p = vhdx.create(tmp_path / "a.vhdx", 16 * MiB, block_size=MiB)
    with vhdx.open(p, "r+") as d:
        d.write_at(0, b"k" * MiB)
        d.write_at(10 * MiB, b"q" * 100)
        with pytest.raises(vhdx.VhdxError, match="holds data"):
            d.resize(4 * MiB)
        d.write_zeroes_at(10 * MiB, 100)         # block stays allocated but reads zeros
        d.resize(4 * MiB)
    with vhdx.open(p) as d:
        assert d.size == 4 * MiB and d.read_at(0, MiB) == b"k" * MiB
        img = d.chain[0]
        assert [b for b, _ in img.allocated_blocks()] == [0]
    if oracles.have_qemu():
        assert oracles.qemu_check(p).returncode == 0
        assert oracles.qemu_raw_bytes(p) == b"k" * MiB + bytes(3 * MiB)


# --- CLI: resize, check --repair ---------------------------------------------------------
def test_cli_resize(tmp_path):
    p = tmp_path / "a.vhdx"
    run("create", p, "--size", "8M", "--block-size", "1M")
    with vhdx.open(p, "r+") as d:
        d.write_at(7 * MiB, b"tail")
    run("resize", p, "--size", "1G")
    with vhdx.open(p) as d:
        assert d.size == 1 << 30 and d.read_at(7 * MiB, 4) == b"tail"
    before = hashlib.sha256(p.read_bytes()).hexdigest()
    run("resize", p, "--size", "4M", rc=1)     # would cut data
    assert hashlib.sha256(p.read_bytes()).hexdigest() == before
    run("resize", p, "--size", "100T", rc=1)
    run("resize", p, "--size", "1000", rc=1)   # not a sector multiple
    run("resize", p, "--size", "8M")
    with vhdx.open(p) as d:
        assert d.size == 8 * MiB
    if oracles.have_qemu():
        assert oracles.qemu_check(p).returncode == 0


def _sha(path) -> str:  # noqa: ANN001
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_repair_real_hyperv_dirty_log(tmp_path, fixture_file, expected):
    rel = "discutils/vhdx-log-replay.vhdx.gz"
    src = fixture_file(rel)
    want = expected["images"][rel]
    p = tmp_path / "lr.vhdx"
    shutil.copyfile(src, p)
    before = _sha(p)
    out = run("check", p, "--repair", "--dry-run").stdout
    assert "would replay 2 log entries" in out and "2 sector(s)" in out
    assert _sha(p) == before                               # dry run: not one byte written
    assert _sha(src) == before
    r = run("check", p, "--repair")
    assert "replayed 2 log entries" in r.stdout and "clean" in r.stdout
    assert _sha(p) != before
    img = ImageFile(p)
    try:
        assert not img.header.log_dirty and not img.log_replayed
    finally:
        img.close()
    digest = run("hash", p).stdout.split()[0]
    assert digest == want["sha256_virtual_after_replay"]
    assert "log is clean" in run("check", p, "--repair").stdout
    if oracles.have_qemu():
        q = oracles.qemu_check(p)
        assert q.returncode == 0 and "No errors" in q.stdout, q.stdout + q.stderr
    info = json.loads(run("check", p, "--json", "--repair").stdout)  # messages go to stderr
    assert info["clean"]


def test_check_dry_run_needs_repair(tmp_path):
    p = tmp_path / "a.vhdx"
    run("create", p, "--size", "8M")
    run("check", p, "--dry-run", rc=2)  # a usage error


def test_standalone_open_edits_metadata_but_refuses_parent_reads(tmp_path):
    from builder import FULLY, PARTIAL, Block, ImageSpec, build_chain

    specs = [ImageSpec(virtual_size=4 * MiB, block_size=MiB, name="base", seed=1,
                       blocks={0: Block(FULLY), 1: Block(FULLY)}),
             ImageSpec(virtual_size=4 * MiB, block_size=MiB, name="child", seed=2,
                       blocks={0: Block(PARTIAL)})]
    chain = build_chain(tmp_path, specs)
    expected = chain.expected()
    with vhdx.open(chain.top, "r+") as full:
        assert len(full.chain) == 2
    from vhdx.writer import WritableDisk

    with WritableDisk(chain.top, standalone=True) as w:
        assert len(w.chain) == 1
        with pytest.raises(vhdx.InvalidArgumentError, match="without its parents"):
            w.read_at(0, 512)
        with pytest.raises(vhdx.InvalidArgumentError):
            w.write_at(MiB + 1, b"x")  # a partial sector over NOT_PRESENT needs the parent's bytes
        w.write_at(2 * MiB, bytes(range(256)) * 2)  # whole sectors need no parent
        w.update_parent_locator({"volume_path": "\\\\?\\Volume{00000000-0000-0000-0000-000000000000}\\x"})
    expected = expected[:2 * MiB] + bytes(range(256)) * 2 + expected[2 * MiB + 512:]
    with vhdx.open(chain.top) as d:
        assert d.read_at(0, d.size) == expected
        assert d.parent_locator["volume_path"].endswith("\\x")
