"""Hostile VHDs: truncated and bit-flipped at many offsets (footer, footer copy,
dynamic header, BAT, sector bitmaps, parent locators), absurd table, block and
size fields with valid checksums. Opening and reading the whole disk must give a
VhdxError or data of the right size (the right data where the other footer copy
saves it), within bounded time and memory; no other exception escapes."""

from __future__ import annotations

import random
import shutil
import time
import tracemalloc
from pathlib import Path

import pytest
from vhd_helpers import make_zero_fixed_parent, qemu_create_vpc, qemu_io_write

import vhdx
from vhdx.errors import VhdxError
from vhdx.vhd import VhdFile
from vhdx.vhd import structures as VS

MiB = 1 << 20
TIME_LIMIT = 5.0
MEM_LIMIT = 64 * MiB


def _read_all(path: Path, parents=None):
    """(data or None, exception or None) after opening and reading everything."""
    try:
        with vhdx.open(path, parents=parents) as disk:
            out = bytearray()
            pos = 0
            while pos < disk.size:
                b = disk.read_at(pos, 4 * MiB)
                assert b, "short read inside the disk"
                out += b
                pos += len(b)
            assert len(out) == disk.size
            return bytes(out), None
    except VhdxError as e:
        return None, e


def _bounded(path: Path, parents=None):
    tracemalloc.start()
    t0 = time.monotonic()
    try:
        res = _read_all(path, parents)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert time.monotonic() - t0 < TIME_LIMIT, path
    assert peak < MEM_LIMIT, (path, peak)
    return res


@pytest.fixture(scope="module")
def bases(tmp_path_factory, fixture_file):
    """Small images of each kind: Windows dynamic, QEMU dynamic with data, a real
    Windows differencing disk (partial bitmap, locators) over a zero parent."""
    d = tmp_path_factory.mktemp("hostile-bases")
    out = {}
    out["win-dynamic"] = (Path(fixture_file("vhd/dissect-dynamic.vhd.gz")), None)
    writes = [(0, 3 * MiB, 7), (4 * MiB, 4096, 9)]
    own = Path(vhdx.create(d / "own.vhd", 5 * MiB))
    with vhdx.open(own, "r+") as w:
        for off, n, pat in writes:
            w.write_at(off, bytes([pat]) * n)
    out["own-dynamic"] = (own, None)
    if shutil.which("qemu-img") and shutil.which("qemu-io"):  # a second writer's layout
        q = d / "qemu.vhd"
        qemu_create_vpc(q, 5 * MiB, "dynamic")
        qemu_io_write(q, writes)
        out["qemu-dynamic"] = (q, None)
    child = Path(fixture_file("vhd/dfvfs-fat-differential.vhd.gz"))
    with VhdFile(child) as f:
        zero = d / "zero.vhd"
        make_zero_fixed_parent(zero, f.virtual_size, f.parent_unique_id)
    out["win-differencing"] = (child, [zero])
    out["fixed"] = (Path(fixture_file("vhd/imhex-win10-fixed-3M.vhd.gz")), None)
    return out


def _regions(path: Path) -> dict[str, tuple[int, int]]:
    """Byte ranges of each structure of ``path`` (from the project's own parse)."""
    with VhdFile(path) as f:
        size = f.file_size
        r = {"footer": (size - 512, size)}
        if f.is_fixed:
            return r
        r["footer copy"] = (0, 512)
        r["header"] = (f.header_offset, f.header_offset + 1024)
        r["bat"] = (f.table_offset, f.table_offset + 4 * f.blocks)
        bms = [(o, o + f.bitmap_size) for _, o in f.allocated_blocks()]
        if bms:
            r["bitmap"] = bms[0]
        locs = [(x["data_offset"], x["data_offset"] + x["data_length"]) for x in f.locators]
        if locs:
            r["locator data"] = locs[0]
            r["locator entries"] = (f.header_offset + 576, f.header_offset + 576 + 48)
        return r


def test_bit_flips_everywhere(bases, tmp_path) -> None:
    rng = random.Random(12)
    n = 0
    for name, (src, parents) in bases.items():
        good, err = _read_all(src, parents)
        assert err is None
        for region, (lo, hi) in _regions(src).items():
            offsets = sorted(set([lo, hi - 1] + [rng.randrange(lo, hi) for _ in range(6)]))
            for off in offsets:
                for reseal in (False, True):
                    p = tmp_path / f"{name}.vhd"
                    shutil.copyfile(src, p)
                    img = bytearray(p.read_bytes())
                    img[off] ^= 1 << rng.randrange(8)
                    if reseal:  # make the checksums right again: structural checks must catch it
                        fs = len(img) - 512
                        img[fs:] = VS.seal(img[fs:], VS.FOOTER_CHECKSUM_OFFSET)
                        if region != "fixed" and "footer copy" in _regions(src):
                            img[:512] = VS.seal(img[:512], VS.FOOTER_CHECKSUM_OFFSET)
                            with VhdFile(src) as f:
                                h = f.header_offset
                            img[h:h + 1024] = VS.seal(img[h:h + 1024], VS.HEADER_CHECKSUM_OFFSET)
                    p.write_bytes(img)
                    data, err = _bounded(p, parents)
                    n += 1
                    if not reseal and region in ("footer", "footer copy") and name != "fixed":
                        # the other footer copy saves it
                        assert err is None and data == good, (name, region, off)
                    if data is not None and region == "header" and not reseal:  # checksummed
                        pytest.fail(f"{name}: a flip in the {region} at {off} went unnoticed")
    assert n >= 150


def test_truncation_at_many_offsets(bases, tmp_path) -> None:
    n = 0
    for name, (src, parents) in bases.items():
        good, _ = _read_all(src, parents)
        size = src.stat().st_size
        rng = random.Random(size)
        cuts = sorted(set([0, 1, 511, 512, 513, 1536, 2048, 4096, size - 512, size - 511, size - 1]
                          + [rng.randrange(size) for _ in range(30)]))
        for cut in cuts:
            p = tmp_path / f"cut-{name}.vhd"
            with open(src, "rb") as fi, open(p, "wb") as fo:
                fo.write(fi.read(cut))
            data, _err = _bounded(p, parents)
            n += 1
            if data is not None:
                assert data == good, (name, cut)  # only the footer may be lost, never data
    assert n >= 100


def _resealed(src: Path, dst: Path, footer: dict | None = None, header: dict | None = None) -> None:
    img = bytearray(src.read_bytes())
    f = VS.Footer.parse(bytes(img[-512:]))
    if footer:
        obj = {k: v for k, v in dict(f).items() if not k.startswith("_")}
        obj.update(footer)
        raw = VS.build_footer(**obj)
        img[-512:] = raw
        if f.disk_type != VS.TYPE_FIXED:
            img[:512] = raw
    if header:
        h0 = f.data_offset
        h = VS.DynamicHeader.parse(bytes(img[h0:h0 + 1024]))
        obj = {k: v for k, v in dict(h).items() if not k.startswith("_") and k != "cookie"}
        obj["locators"] = [{k: v for k, v in dict(x).items() if not k.startswith("_")} for x in h.locators]
        obj.update(header)
        img[h0:h0 + 1024] = VS.build_header(**obj)
    dst.write_bytes(img)


# (footer change, header change, exact class raised; None: opens and reads). Sizes past
# the 2040 GiB VHD limit and unknown types/versions are refused as unsupported; fields
# that contradict the file (alignment, offsets outside it, tables too short) are corrupt.
ABSURD = [
    ({"current_size": (1 << 64) - 512}, None, "UnsupportedFeatureError"),
    ({"current_size": 0xFF000000 * 512 + 512}, None, "UnsupportedFeatureError"),
    ({"current_size": 1000}, None, "CorruptImageError"),
    ({"disk_type": 5}, None, "UnsupportedFeatureError"),
    ({"disk_type": 2}, None, "CorruptImageError"),
    ({"version": 0x00020000}, None, "UnsupportedFeatureError"),
    ({"data_offset": (1 << 63)}, None, "CorruptImageError"),
    ({"data_offset": 513}, None, "CorruptImageError"),
    (None, {"max_table_entries": 0xFFFFFFFF}, None),  # more entries than needed: only those are read
    (None, {"max_table_entries": 0}, "CorruptImageError"),
    (None, {"block_size": 0x80000000}, "CorruptImageError"),
    (None, {"block_size": 0}, "CorruptImageError"),
    (None, {"block_size": 3 * 512}, "CorruptImageError"),
    (None, {"block_size": 512}, "CorruptImageError"),
    (None, {"table_offset": (1 << 64) - 512}, "CorruptImageError"),
    (None, {"table_offset": 0}, "CorruptImageError"),
    (None, {"version": 0x00020000}, "UnsupportedFeatureError"),
]


@pytest.mark.parametrize("footer,header,exc", ABSURD)
def test_absurd_fields_with_valid_checksums(bases, tmp_path, footer, header, exc) -> None:
    for name in ("win-dynamic", "win-differencing"):
        src, parents = bases[name]
        p = tmp_path / "absurd.vhd"
        _resealed(src, p, footer, header)
        _data, err = _bounded(p, parents)
        if exc is None:
            assert err is None, (name, err)
            continue
        assert type(err) is getattr(vhdx, exc), (name, repr(err))
        assert str(p) in str(err)


def test_absurd_locators_and_names(bases, tmp_path) -> None:
    src, parents = bases["win-differencing"]
    with VhdFile(src) as f:
        locs = [{k: v for k, v in dict(x).items() if not k.startswith("_")} for x in f.header.locators]
    for change in ({"data_length": 0xFFFFFFFF}, {"data_offset": (1 << 64) - 1}, {"data_length": 3},
                   {"platform_code": b"XXXX"}, {"data_length": 1 << 20}):
        bad = [dict(locs[0], **change), dict(locs[1], **change)] + locs[2:]
        p = tmp_path / "loc.vhd"
        _resealed(src, p, header={"locators": bad, "parent_unicode_name": "\uffff".encode("utf-16-be") * 256})
        _data, err = _bounded(p, parents)  # explicit parent: locators only warn
        assert err is None, change
        with vhdx.open(p, parents=parents) as disk:
            assert any("locator" in w for w in disk.warnings)


def test_sparse_file_with_a_huge_table(tmp_path) -> None:
    """A sparse file can be as large as its fields claim without holding data: a
    2040 GiB disk of 512-byte blocks would need a 16 GiB BAT in memory."""
    p = tmp_path / "huge.vhd"
    size = 0xFF000000 * 512
    footer = VS.build_footer(current_size=size, original_size=size, disk_type=VS.TYPE_DYNAMIC, data_offset=512)
    header = VS.build_header(table_offset=1536, max_table_entries=size // 512, block_size=512)
    end = 1536 + 4 * (size // 512)
    with open(p, "wb") as fh:
        fh.write(footer + header)
        fh.truncate(end)
        fh.seek(end)
        fh.write(footer)
    _, err = _bounded(p)
    assert err is not None and "BAT entries" in str(err)
    assert type(err) is vhdx.UnsupportedFeatureError, repr(err)  # an implementation limit, not corruption
