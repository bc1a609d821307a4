"""Every image in shared/fixtures/expected.json reads with its published SHA-256.

Hashing goes through ``hashlib.file_digest(disk, "sha256")`` (the VirtualDisk is
an io.RawIOBase) and, for one image, through ``shutil.copyfileobj`` into a raw
file. The differencing image is read over a generated all-zero parent made by
vhdx.layout whose DataWriteGuid equals the child's parent_linkage.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from pathlib import Path

import pytest

from conftest import find_shared_dir
from vhdx import structures as s
from vhdx.layout import plan_layout, write_new_image


def _expected_images() -> dict[str, dict]:
    d = find_shared_dir()
    if d is None:
        return {}
    with open(d / "fixtures" / "expected.json") as fh:
        return json.load(fh)["images"]


IMAGES = _expected_images()
BIG = 4 << 30


def _params() -> list:
    if not IMAGES:
        return [pytest.param(None, marks=pytest.mark.skip(reason="shared fixtures not found"))]
    return [pytest.param(k, marks=[pytest.mark.slow] if v["virtual_size"] >= BIG else [], id=k)
            for k, v in IMAGES.items()]


def make_zero_parent(directory: Path, info: dict) -> Path:
    """All-zero dynamic base whose DataWriteGuid is the child's parent_linkage."""
    linkage = uuid.UUID(info["parent_locator"]["parent_linkage"].strip("{}"))
    plan = plan_layout(info["virtual_size"], 32 * s.MiB, info["logical_sector_size"],
                       info["physical_sector_size"], data_write_guid=linkage,
                       virtual_disk_id=uuid.UUID(info["virtual_disk_id"]), creator="zero parent")
    path = directory / "zero-parent.vhdx"
    write_new_image(path, plan)
    return path


def file_state(path: Path) -> tuple[str, int]:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest(), path.stat().st_mtime_ns


@pytest.mark.parametrize("rel", _params())
def test_fixture_sha256(rel: str, fixture_file, vhdx_mod, tmp_path: Path) -> None:
    info = IMAGES[rel]
    path = fixture_file(rel)
    assert path.stat().st_size == info["expanded_size"]
    before = file_state(path)
    parents = None
    if info["has_parent"]:
        parents = [make_zero_parent(tmp_path, info)]
        want = info["sha256_virtual_over_zero_parent"]
    elif info["log_replay_required"]:
        want = info["sha256_virtual_after_replay"]
    else:
        want = info["sha256_virtual"]
    with vhdx_mod.open(path, parents=parents) as disk:
        assert disk.size == info["virtual_size"]
        assert disk.block_size == info["block_size"]
        assert disk.logical_sector_size == info["logical_sector_size"]
        assert disk.physical_sector_size == info["physical_sector_size"]
        assert disk.virtual_disk_id == uuid.UUID(info["virtual_disk_id"])
        assert disk.data_write_guid == uuid.UUID(info["data_write_guid"])
        assert disk.creator.rstrip("\0") == info["creator"]
        if info["parent_locator"] is None:
            assert disk.parent_locator is None
            assert len(disk.chain) == 1
        else:
            assert dict(disk.parent_locator) == info["parent_locator"]
            assert len(disk.chain) == 2
        got = hashlib.file_digest(disk, "sha256").hexdigest()
        assert disk.tell() == disk.size
    assert got == want
    if info["log_replay_required"]:
        assert got != info["sha256_virtual_without_replay"]
    assert file_state(path) == before, "reading modified the image"


def test_copyfileobj_to_raw(fixture_file, vhdx_mod, tmp_path: Path) -> None:
    rel = "coreos-hyperv/config2_base.vhdx.bz2"
    if rel not in IMAGES:
        pytest.skip("fixture not listed")
    out = tmp_path / "raw.img"
    with vhdx_mod.open(fixture_file(rel)) as disk, open(out, "wb") as fo:
        shutil.copyfileobj(disk, fo, 1 << 20)
    assert out.stat().st_size == IMAGES[rel]["virtual_size"]
    with open(out, "rb") as fh:
        assert hashlib.file_digest(fh, "sha256").hexdigest() == IMAGES[rel]["sha256_virtual"]


def test_extents_cover_disk_and_match_data(fixture_file, vhdx_mod) -> None:
    rel = "discutils/btrfs.vhdx.gz"
    if rel not in IMAGES:
        pytest.skip("fixture not listed")
    with vhdx_mod.open(fixture_file(rel)) as disk:
        ext = disk.extents()
        pos = 0
        for e in ext:
            assert e.offset == pos and e.length > 0
            assert e.kind in ("data", "zero", "unallocated")
            assert (e.source is None) == (e.kind != "data")
            pos += e.length
            if e.kind != "data":
                assert disk.read_at(e.offset, min(e.length, 1 << 20)) == bytes(min(e.length, 1 << 20))
        assert pos == disk.size
        kinds = {e.kind for e in ext}
        # btrfs.vhdx: FULLY_PRESENT 2, NOT_PRESENT 29, ZERO 1 (expected.json)
        assert kinds == {"data", "zero", "unallocated"}
        data_len = sum(e.length for e in ext if e.kind == "data")
        assert data_len == IMAGES[rel]["bat_payload_states"]["FULLY_PRESENT"] * IMAGES[rel]["block_size"]


def test_differencing_without_parent_fails(fixture_file, vhdx_mod, tmp_path: Path) -> None:
    rel = "dissect.hypervisor/differencing.avhdx.gz"
    if rel not in IMAGES:
        pytest.skip("fixture not listed")
    with pytest.raises(vhdx_mod.ParentNotFoundError):
        vhdx_mod.open(fixture_file(rel), search_dirs=[tmp_path])


def test_differencing_wrong_parent_linkage(fixture_file, vhdx_mod, tmp_path: Path) -> None:
    rel = "dissect.hypervisor/differencing.avhdx.gz"
    if rel not in IMAGES:
        pytest.skip("fixture not listed")
    info = dict(IMAGES[rel])
    info["parent_locator"] = dict(info["parent_locator"], parent_linkage="{%s}" % uuid.uuid4())
    bad_parent = make_zero_parent(tmp_path, info)
    with pytest.raises(vhdx_mod.ParentMismatchError):
        vhdx_mod.open(fixture_file(rel), parents=[bad_parent])
    # ignore_linkage accepts it and reads the same as over the right zero parent
    good_dir = tmp_path / "good"
    good_dir.mkdir()
    good_parent = make_zero_parent(good_dir, IMAGES[rel])
    span = 4 << 20  # block 0 is PARTIALLY_PRESENT in this image
    with vhdx_mod.open(fixture_file(rel), parents=[bad_parent], ignore_linkage=True) as disk:
        got = disk.read_at(0, span)
    with vhdx_mod.open(fixture_file(rel), parents=[good_parent]) as disk:
        assert got == disk.read_at(0, span)
    assert any(got)
