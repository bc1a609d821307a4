"""What a lone VHD / .avhd holds by itself (``VhdFile.extents()``, ``vhdx map
--own``): checked on the real Windows differencing fixture, whose parent is not
public, by rebuilding the virtual disk from the extents alone (data extents
read from the file, the rest from a parent) and comparing with the SHA-256s
expected.json lists (over an all-zero parent, and over the synthetic parent),
and on chains the project writes against a model of the written sectors."""

from __future__ import annotations

import hashlib
import json
import random

import pytest
from vhd_helpers import file_sha, vhd_expected

import vhdx
from vhdx.cli import main as cli_main
from vhdx.vhd.file import VhdFile

LONE = "vhd/dfvfs-fat-differential.vhd.gz"
KiB, MiB = 1024, 1 << 20


def _rebuild(path, extents, size: int, parent: bytes) -> bytes:
    out = bytearray(parent[:size].ljust(size, b"\0"))
    with open(path, "rb") as fh:
        for e in extents:
            if e.kind == "data":
                fh.seek(e.file_offset)
                out[e.offset:e.offset + e.length] = fh.read(e.length)
    return bytes(out)


def test_lone_differencing_fixture(fixture_file, shared_dir) -> None:
    meta = vhd_expected(shared_dir)[LONE]
    path = fixture_file(LONE)
    before = file_sha(path)
    with VhdFile(path) as f:
        assert f.has_parent
        ext = f.extents()
        size = f.virtual_size
    assert size == meta["virtual_size"]
    # the extents tile the disk, in order, without gaps
    assert ext[0].offset == 0 and sum(e.length for e in ext) == size
    assert all(a.offset + a.length == b.offset for a, b in zip(ext, ext[1:]))
    assert {e.kind for e in ext} == {"data", "unallocated"}
    zero = _rebuild(path, ext, size, bytes(size))
    assert hashlib.sha256(zero).hexdigest() == meta["sha256_over_zero_parent"]
    parent_path = fixture_file(meta["parent"])  # a fixed VHD: its first `size` bytes are the disk
    with open(parent_path, "rb") as fh:
        parent = fh.read(size)
    assert hashlib.sha256(_rebuild(path, ext, size, parent)).hexdigest() == meta["sha256"]
    assert file_sha(path) == before


def test_map_own_cli_on_the_lone_fixture(fixture_file, capsys) -> None:
    path = fixture_file(LONE)
    before = file_sha(path)
    assert cli_main(["map", "--own", "--json", str(path)]) == 0
    doc = json.loads(capsys.readouterr().out)
    with VhdFile(path) as f:
        assert doc["extents"] == [e.to_dict([f]) for e in f.extents()]
    assert doc["own"] is True and doc["virtual_size"] == expected_size(path)
    assert file_sha(path) == before


def expected_size(path) -> int:
    with VhdFile(path) as f:
        return f.virtual_size


@pytest.mark.parametrize("block", [4 * KiB, 512 * KiB, 2 * MiB])
def test_extents_follow_the_written_sectors(tmp_path, block: int) -> None:
    size = 6 * MiB + 3 * 512
    base, child = tmp_path / "b.vhd", tmp_path / "c.avhd"
    vhdx.create(base, size, block_size=block)
    vhdx.create(child, parent=base)
    rng = random.Random(block)
    written = bytearray(size // 512)
    with vhdx.open(child, "r+") as w:
        for _ in range(40):
            s = rng.randrange(size // 512)
            n = min(rng.choice([1, 3, 64, 1000]), size // 512 - s)
            w.write_at(s * 512, rng.randbytes(n * 512))
            written[s:s + n] = b"\1" * n
    with VhdFile(child) as f:
        ext = f.extents()
    got = bytearray(size // 512)
    for e in ext:
        if e.kind == "data":
            got[e.offset // 512:(e.offset + e.length) // 512] = b"\1" * (e.length // 512)
    assert got == written
    with vhdx.open(child) as d:  # data extents hold what the disk reads there
        for e in ext:
            if e.kind == "data":
                with open(child, "rb") as fh:
                    fh.seek(e.file_offset)
                    assert fh.read(e.length) == d.read_at(e.offset, e.length)


def test_fixed_and_empty_dynamic(tmp_path) -> None:
    fixed, dyn = tmp_path / "f.vhd", tmp_path / "d.vhd"
    vhdx.create(fixed, 3 * MiB, type="fixed")
    vhdx.create(dyn, 2000 * 1024 * MiB)  # a 2000 GiB table with nothing in it
    with VhdFile(fixed) as f:
        assert [(e.offset, e.length, e.kind, e.file_offset) for e in f.extents()] == [(0, 3 * MiB, "data", 0)]
    with VhdFile(dyn) as f:
        assert [(e.offset, e.length, e.kind) for e in f.extents()] == [(0, f.virtual_size, "unallocated")]
        assert list(f.allocated_runs()) == []


