"""Images read from file objects (a zip member, an in-memory buffer, an open
file) and a lone checkpoint file inspected without its parent."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import random
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import vhdx
from vhdx.image import ImageFile

from builder import build_chain, random_spec
from test_fixtures import IMAGES, file_state, make_zero_parent

MiB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent
LONE = "dissect.hypervisor/differencing.avhdx.gz"


def _chain(tmp_path: Path, depth: int = 3):
    rng = random.Random(depth)
    specs = [random_spec(rng, name=f"s{k}", virtual_size=6 * MiB, block_size=MiB, lss=512,
                         differencing=k > 0, density=0.8) for k in range(depth)]
    return build_chain(tmp_path, specs)


def _sha(disk) -> str:  # noqa: ANN001
    disk.seek(0)
    return hashlib.file_digest(disk, "sha256").hexdigest()


def test_chain_from_file_objects_and_a_zip(tmp_path: Path) -> None:
    chain = _chain(tmp_path)
    with vhdx.open(chain.top, parents=chain.parents) as disk:
        want = _sha(disk)
        assert want == hashlib.sha256(chain.expected()).hexdigest()
    # Open files: read through duplicates of their descriptors (the C path).
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(open(p, "rb")) for p in chain.paths]
        handles[0].seek(123)
        with vhdx.open(handles[0], parents=handles[1:]) as disk:
            assert disk._native is not None
            assert _sha(disk) == want
            assert disk.chain[0].path == str(chain.top)
        assert handles[0].tell() == 123 and not handles[0].closed  # untouched, still the caller's
    # In-memory objects: no descriptor, read through readinto/seek.
    bufs = [io.BytesIO(Path(p).read_bytes()) for p in chain.paths]
    with vhdx.open(bufs[0], parents=bufs[1:]) as disk:
        assert disk._native is None
        assert _sha(disk) == want
        assert disk.read_at(4096, 8192) == chain.expected()[4096:12288]
    # A zip: the top file and its parents as stored members, found through an opener.
    zpath = tmp_path / "evidence.zip"
    with zipfile.ZipFile(zpath, "w", compression=zipfile.ZIP_STORED) as z:
        for p in chain.paths:
            z.write(p, f"case1/{Path(p).name}")
    with zipfile.ZipFile(zpath) as z:
        def opener(name: str):  # noqa: ANN202
            try:
                return z.open(name)
            except KeyError:
                return None

        top = z.open(f"case1/{chain.top.name}")
        with vhdx.open(top, opener=opener) as disk:
            assert [f.path for f in disk.chain][0] == f"case1/{chain.top.name}"
            assert len(disk.chain) == 3
            assert _sha(disk) == want


def test_file_object_opens_are_read_only(tmp_path: Path) -> None:
    chain = _chain(tmp_path, 1)
    with open(chain.top, "rb") as fh:
        with pytest.raises(vhdx.InvalidArgumentError):
            vhdx.open(fh, "r+")
    with pytest.raises(vhdx.InvalidArgumentError):
        vhdx.open(object())


def test_opener_that_finds_nothing(tmp_path: Path) -> None:
    chain = _chain(tmp_path, 2)
    with pytest.raises(vhdx.ParentNotFoundError, match="opener"):
        vhdx.open(io.BytesIO(chain.top.read_bytes()), opener=lambda name: None)


def test_own_extents_of_a_generated_child(tmp_path: Path) -> None:
    """ImageFile.extents() of a child against what its bytes read over a zero
    parent: "data" ranges read the file at their offsets, "zero" ranges zeros."""
    chain = _chain(tmp_path, 2)
    with ImageFile(chain.top) as img:
        ext = img.extents()
        raw = Path(chain.top).read_bytes()
    assert ext[0].offset == 0 and sum(e.length for e in ext) == img.virtual_size
    assert all(a.offset + a.length == b.offset for a, b in zip(ext, ext[1:]))
    with vhdx.open(chain.top, parents=chain.parents) as disk:
        for e in ext:
            got = disk.read_at(e.offset, e.length)
            if e.kind == "data":
                assert got == raw[e.file_offset:e.file_offset + e.length]
            elif e.kind == "zero":
                assert got == bytes(e.length)


@pytest.fixture
def lone(fixture_file, tmp_path: Path) -> Path:  # noqa: ANN001
    path = fixture_file(LONE)
    assert path.stat().st_size == IMAGES[LONE]["expanded_size"]
    return path


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vhdx", *args], capture_output=True, text=True, cwd=ROOT)


def test_lone_real_checkpoint_info_and_own_map(lone: Path, tmp_path: Path) -> None:
    info = IMAGES[LONE]
    before = file_state(lone)
    with pytest.raises(vhdx.ParentNotFoundError):
        vhdx.open(lone)
    p = _cli("info", str(lone), "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert "parent not found" in out["parent_missing"]
    assert out["chain"][0]["parent_locator"]["parent_linkage"] == info["parent_locator"]["parent_linkage"]
    assert any("content reads need the parent" in w for w in out["warnings"])
    p = _cli("info", str(lone))
    assert p.returncode == 0 and "content reads need the parent" in p.stderr and str(lone) in p.stdout
    p = _cli("map", "--own", "--json", str(lone))
    assert p.returncode == 0, p.stderr
    own = json.loads(p.stdout)["extents"]
    # The own map against a read over an all-zero parent: data ranges are the
    # file's bytes at their offsets, everything else reads zeros there.
    zero_parent = make_zero_parent(tmp_path, info)
    raw = lone.read_bytes()
    with vhdx.open(lone, parents=[zero_parent]) as disk:
        held = 0
        rng = random.Random(5)
        for e in own:
            if e["kind"] == "data":
                got = disk.read_at(e["offset"], e["length"])
                assert got == raw[e["file_offset"]:e["file_offset"] + e["length"]]
                held += e["length"]
            else:  # GiB-long zero runs: probe both ends and a random MiB inside
                n = min(e["length"], MiB)
                for off in (e["offset"], e["offset"] + e["length"] - n,
                            e["offset"] + rng.randrange(0, e["length"] - n + 1)):
                    assert disk.read_at(off, n) == bytes(n)
        assert held > 0
        assert len(own) > 2
    assert file_state(lone) == before
