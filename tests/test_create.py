"""vhdx.create / `vhdx create`: new fixed, dynamic and differencing disks, checked by
qemu-img, libvhdi and dissect against a ground-truth buffer."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import uuid

import pytest

import vhdx
from vhdx import structures as S
from vhdx.create import parse_size
from vhdx.image import ImageFile

import oracles

MiB = S.MiB


def run(*args: str, rc: int = 0) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "vhdx.cli", *map(str, args)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == rc, (p.returncode, p.stdout, p.stderr)
    if rc:
        assert p.stderr.count("\n") == 1 and p.stderr.startswith("vhdx: error: "), p.stderr
    return p


def scribble(disk, gt: bytearray, rng: random.Random, n: int = 12, zeros: bool = True) -> None:  # noqa: ANN001
    """Random writes (unaligned, block-crossing) and zeroes on ``disk``, mirrored in ``gt``."""
    size = len(gt)
    for _ in range(n):
        off = rng.randrange(size)
        ln = min(size - off, rng.choice([1, 511, 4096, 70000, 3 * MiB // 2, 2 * MiB + 17]))
        if zeros and rng.random() < 0.2:
            disk.write_zeroes_at(off, ln)
            gt[off:off + ln] = bytes(ln)
        else:
            data = rng.randbytes(ln)
            disk.write_at(off, data)
            gt[off:off + ln] = data
        if rng.random() < 0.3:
            disk.flush()


def discard_model(gt: bytearray, off: int, ln: int, bs: int, fixed: bool) -> None:
    """What a discard does: whole blocks (the last one up to the disk's end) read
    zeros; partial edges are left alone, except on a fixed disk (zeros written)."""
    if fixed:
        gt[off:off + ln] = bytes(ln)
        return
    end = off + ln
    b = -(-off // bs) * bs
    while b < end:
        be = min(b + bs, len(gt))
        if be <= end:
            gt[b:be] = bytes(be - b)
        b += bs


# --- sizes -------------------------------------------------------------------------
@pytest.mark.parametrize("text,value", [("512", 512), ("1K", 1024), ("64M", 64 * MiB), ("3g", 3 << 30),
                                        ("2T", 2 << 40), ("10MiB", 10 * MiB), (" 7 G ", 7 << 30)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "M", "1.5G", "-1M", "12Q", "0x10"])
def test_parse_size_rejects(text):
    with pytest.raises(vhdx.InvalidArgumentError):
        parse_size(text)


@pytest.mark.parametrize("kw,match", [
    (dict(size=65 << 40), "64 TiB"), (dict(size=1000), "multiple of the logical sector"),
    (dict(size=MiB, block_size=3 * MiB), "power of two"), (dict(size=MiB, block_size=512 * MiB), "power of two"),
    (dict(size=MiB, logical_sector_size=1024), "512 or 4096"), (dict(size=MiB, type="sparse"), "dynamic"),
    (dict(size=0), "> 0")])
def test_limits_are_enforced(tmp_path, kw, match):
    with pytest.raises(vhdx.InvalidArgumentError, match=match):
        vhdx.create(tmp_path / "x.vhdx", **kw)
    assert not (tmp_path / "x.vhdx").exists()


def test_refuses_to_overwrite(tmp_path):
    p = tmp_path / "a.vhdx"
    p.write_bytes(b"precious")
    with pytest.raises(vhdx.VhdxError, match="already exists"):
        vhdx.create(p, 8 * MiB)
    assert p.read_bytes() == b"precious"


# --- layout of a new file ----------------------------------------------------------
@pytest.mark.parametrize("kind", ["dynamic", "fixed"])
def test_new_image_layout(tmp_path, kind):
    p = vhdx.create(tmp_path / "a.vhdx", 40 * MiB, type=kind, block_size=8 * MiB)
    img = ImageFile(p)
    try:
        assert img.creator == f"vhdx {vhdx.__version__}"
        hs = img.header_section
        assert {r.name: (r.file_offset % MiB, r.length % MiB, r.required) for r in hs.regions} == \
            {"BAT": (0, 0, True), "metadata": (0, 0, True)}
        assert hs.header.log_offset % MiB == 0 and hs.header.log_length >= MiB
        assert not hs.header.log_dirty and not img.warnings
        assert img.is_fixed == (kind == "fixed") and not img.has_parent
        states = {info.state for _, info in img.allocated_blocks()}
        assert states == ({S.PAYLOAD_BLOCK_FULLY_PRESENT} if kind == "fixed" else set())
        for _, info in img.allocated_blocks():
            assert info.file_offset % MiB == 0
    finally:
        img.close()
    assert oracles.qemu_info(p)["virtual-size"] == 40 * MiB if oracles.have_qemu() else True


def test_differencing_takes_identity_from_parent(tmp_path):
    base = vhdx.create(tmp_path / "base.vhdx", 24 * MiB, logical_sector_size=4096, physical_sector_size=512)
    sub = tmp_path / "snaps"
    sub.mkdir()
    child = vhdx.create(sub / "c1.avhdx", parent=base)
    with vhdx.open(base) as b, vhdx.open(child) as c:
        assert c.size == b.size == 24 * MiB
        assert (c.logical_sector_size, c.physical_sector_size) == (4096, 512)
        assert c.virtual_disk_id == b.virtual_disk_id
        assert c.data_write_guid != b.data_write_guid
        loc = c.parent_locator
        assert uuid.UUID(loc["parent_linkage"].strip("{}")) == b.data_write_guid
        assert loc["relative_path"] == "..\\base.vhdx"
        assert loc["absolute_win32_path"].startswith("\\\\?\\")
        assert loc["absolute_win32_path"].endswith("\\base.vhdx")
        assert [os.path.basename(f.path) for f in c.chain] == ["c1.avhdx", "base.vhdx"]
        assert c.creator.startswith("vhdx ")
    sibling = vhdx.create(tmp_path / "c2.avhdx", parent=base)
    with vhdx.open(sibling) as c:
        assert c.parent_locator["relative_path"] == ".\\base.vhdx"
    with pytest.raises(vhdx.InvalidArgumentError, match="parent's size"):
        vhdx.create(tmp_path / "c3.avhdx", 8 * MiB, parent=base)
    with pytest.raises(vhdx.InvalidArgumentError, match="fixed"):
        vhdx.create(tmp_path / "c4.avhdx", parent=base, type="fixed")


# --- qemu-img: check + read back ------------------------------------------------------
@pytest.mark.parametrize("kind", ["dynamic", "fixed"])
@pytest.mark.parametrize("bs_mib", [1, 2, 8, 32])
def test_qemu_checks_and_reads_written_images(tmp_path, kind, bs_mib):
    oracles.require_qemu()
    size = 40 * MiB + 4096 * 3  # last block partial
    p = vhdx.create(tmp_path / "a.vhdx", size, type=kind, block_size=bs_mib * MiB)
    gt = bytearray(size)
    rng = random.Random(bs_mib * 7 + len(kind))
    with vhdx.open(p, "r+") as d:
        scribble(d, gt, rng, n=14)
        n = min(size, 2 * bs_mib * MiB)
        d.write_zeroes_at(0, n, discard=True)
        discard_model(gt, 0, n, bs_mib * MiB, kind == "fixed")
    r = oracles.qemu_check(p)
    assert r.returncode == 0 and "No errors were found" in r.stdout, r.stdout + r.stderr
    assert oracles.qemu_raw_bytes(p) == gt
    with vhdx.open(p) as d:
        assert d.read_at(0, size) == gt


# --- libvhdi + dissect: every kind ----------------------------------------------------
def _build_chain(tmp_path, depth: int, lss: int, seed: int, aligned: bool = True):  # noqa: ANN202
    """Base + ``depth`` children made by vhdx.create(parent=...) and WritableDisk.

    ``aligned``: children get writes aligned to 8 sectors and one block size, as
    Hyper-V writes them (whole bitmap bytes, FORMAT.md §5.4); otherwise writes are
    unaligned (sector-granular bitmap runs) and block sizes alternate per level.
    """
    rng = random.Random(seed)
    size = 12 * MiB + lss * 8
    paths = [vhdx.create(tmp_path / "base.vhdx", size, block_size=MiB, logical_sector_size=lss)]
    gt = bytearray(size)
    with vhdx.open(paths[0], "r+") as d:
        scribble(d, gt, rng, n=8)
    unit = 8 * lss if aligned else 1
    for level in range(1, depth + 1):
        paths.append(vhdx.create(tmp_path / f"snap{level}.avhdx", parent=paths[-1],
                                 block_size=MiB if aligned else (2 * MiB if level % 2 else 4 * MiB)))
        with vhdx.open(paths[-1], "r+") as d:
            # No write_zeroes in children: libvhdi reads ZERO blocks of a child from the
            # parent (FORMAT.md §5.2 footnote 2); vhdx and dissect are checked on zeroes elsewhere.
            for _ in range(12):
                off = rng.randrange(size // unit) * unit
                ln = rng.choice([1, 100, lss + 3, 70000, 3 * MiB // 2])
                ln = min(size - off, -(-ln // unit) * unit)
                data = rng.randbytes(ln)
                d.write_at(off, data)
                gt[off:off + ln] = data
                if rng.random() < 0.3:
                    d.flush()
    return list(reversed(paths)), bytes(gt)


@pytest.mark.parametrize("lss", [512, 4096])
@pytest.mark.parametrize("depth", [0, 1, 2, 3, 4])
def test_peers_read_chains_exactly(tmp_path, depth, lss):
    chain, gt = _build_chain(tmp_path, depth, lss, seed=depth * 10 + lss)
    with vhdx.open(chain[0]) as d:
        assert len(d.chain) == depth + 1
        assert d.read_at(0, d.size) == gt
        if depth:
            assert any(i.state == S.PAYLOAD_BLOCK_PARTIALLY_PRESENT for _, i in d.chain[0].allocated_blocks())
    if oracles.have_libvhdi():
        assert oracles.libvhdi_bytes(chain) == gt
    if oracles.have_dissect():
        assert oracles.dissect_bytes(chain) == gt
    if not (oracles.have_libvhdi() or oracles.have_dissect()):
        pytest.skip("neither libvhdi nor dissect is installed")


@pytest.mark.parametrize("lss", [512, 4096])
def test_libvhdi_reads_unaligned_chains_with_mixed_block_sizes(tmp_path, lss):
    """Sector-granular bitmap runs and block sizes that differ between levels (both
    legal, FORMAT.md §5.4, §8.1). dissect 3.21 is not asked: its read_sectors lets a read
    that starts mid-block run past the block's end with the same BAT entry, and it
    reads ``ceil(count / 8)`` bitmap bytes from a bit offset inside the first byte
    (one byte short for unaligned runs), so it misreads such chains."""
    oracles.require_libvhdi()
    chain, gt = _build_chain(tmp_path, 3, lss, seed=99 + lss, aligned=False)
    with vhdx.open(chain[0]) as d:
        assert len({f.block_size for f in d.chain}) == 3
        assert d.read_at(0, d.size) == gt
    assert oracles.libvhdi_bytes(chain) == gt


@pytest.mark.parametrize("lss", [512, 4096])
def test_peers_read_fixed_and_dynamic(tmp_path, lss):
    for kind in ("fixed", "dynamic"):
        p = vhdx.create(tmp_path / f"{kind}.vhdx", 10 * MiB, type=kind, block_size=2 * MiB,
                        logical_sector_size=lss)
        gt = bytearray(10 * MiB)
        with vhdx.open(p, "r+") as d:
            scribble(d, gt, random.Random(lss), n=10)
        if oracles.have_libvhdi():
            assert oracles.libvhdi_bytes([p]) == gt
        if oracles.have_dissect():
            assert oracles.dissect_bytes([p]) == gt
        if oracles.have_qemu() and lss == 512:  # qemu-img refuses 4096-byte sectors (ENOTSUP)
            assert oracles.qemu_check(p).returncode == 0


def test_dissect_reads_zeroed_child_blocks(tmp_path):
    oracles.require_dissect()
    base = vhdx.create(tmp_path / "b.vhdx", 6 * MiB, block_size=MiB)
    with vhdx.open(base, "r+") as d:
        d.write_at(0, b"\xaa" * (6 * MiB))
    child = vhdx.create(tmp_path / "c.avhdx", parent=base, block_size=MiB)
    with vhdx.open(child, "r+") as d:
        d.write_zeroes_at(MiB, 2 * MiB)
        d.write_zeroes_at(4 * MiB + 512, 1024)
    gt = bytearray(b"\xaa" * (6 * MiB))
    gt[MiB:3 * MiB] = bytes(2 * MiB)
    gt[4 * MiB + 512:4 * MiB + 1536] = bytes(1024)
    assert oracles.dissect_bytes([child, base]) == gt


# --- CLI ----------------------------------------------------------------------------
def test_cli_create(tmp_path):
    a = tmp_path / "a.vhdx"
    run("create", a, "--size", "20M", "--block-size", "2M", "--logical-sector-size", "4096")
    with vhdx.open(a) as d:
        assert (d.size, d.block_size, d.logical_sector_size) == (20 * MiB, 2 * MiB, 4096)
    f = tmp_path / "f.vhdx"
    run("create", f, "--size", "8M", "--type", "fixed", "--physical-sector-size", "512")
    with vhdx.open(f) as d:
        assert d.top.is_fixed and d.physical_sector_size == 512
    c = tmp_path / "c.avhdx"
    run("create", c, "--parent", a)
    with vhdx.open(c) as d:
        assert d.size == 20 * MiB and len(d.chain) == 2 and d.logical_sector_size == 4096
    if oracles.have_qemu():
        assert oracles.qemu_check(f).returncode == 0
    before = a.read_bytes()
    run("create", a, "--size", "1M", rc=1)                       # exists
    assert a.read_bytes() == before
    run("create", tmp_path / "b.vhdx", "--size", "1Q", rc=2)       # bad size: usage
    run("create", tmp_path / "b.vhdx", "--size", "65T", rc=1)      # limit
    run("create", tmp_path / "b.vhdx", "--size", "8M", "--block-size", "3M", rc=1)
    run("create", tmp_path / "b.vhdx", rc=2)                       # neither size nor parent
    run("create", tmp_path / "b.vhdx", "--parent", a, "--size", "1G", rc=2)
    run("create", tmp_path / "b.vhdx", "--parent", tmp_path / "nope.vhdx", rc=1)
    p = subprocess.run([sys.executable, "-m", "vhdx.cli", "create", tmp_path / "b.vhdx", "--size", "8M",
                        "--logical-sector-size", "1024"], capture_output=True, text=True)
    assert p.returncode == 2 and "invalid choice" in p.stderr
    assert not (tmp_path / "b.vhdx").exists()
