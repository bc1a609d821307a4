"""Parent lookup and chain validation (issue: Reader, item 5)."""

from __future__ import annotations

import os
import shutil
import threading
import uuid
from dataclasses import replace

import pytest

import vhdx
from vhdx import structures as S
from vhdx.locator import candidate_paths

from builder import FULLY, NOT_PRESENT, PARTIAL, Block, ImageSpec, build_chain, build_image

MiB = S.MiB


def _spec(name: str, size: int = 4 * MiB, **kw) -> ImageSpec:  # noqa: ANN003
    return ImageSpec(virtual_size=size, block_size=1 * MiB, name=name, **kw)


def _chain(tmp_path, depth: int = 2, **kw):  # noqa: ANN001, ANN003, ANN202
    specs = [_spec("base", blocks={0: Block(FULLY), 2: Block(FULLY)}, seed=1, **kw)]
    for d in range(1, depth):
        specs.append(_spec(f"child{d}", blocks={0: Block(PARTIAL), 1: Block(FULLY)}, seed=10 + d, **kw))
    return build_chain(tmp_path, specs)


def test_relative_path_lookup_reads_ground_truth(tmp_path):
    chain = _chain(tmp_path, depth=3)
    with vhdx.open(chain.top) as disk:
        assert [os.path.basename(f.path) for f in disk.chain] == [p.name for p in chain.paths]
        assert disk.read_at(0, disk.size) == chain.expected()


def test_explicit_parents_override_lookup(tmp_path):
    chain = _chain(tmp_path, depth=3)
    other = tmp_path / "elsewhere"
    other.mkdir()
    moved = [other / p.name for p in chain.parents]
    for src, dst in zip(chain.parents, moved):
        shutil.move(src, dst)
    with pytest.raises(vhdx.ParentNotFoundError):
        vhdx.open(chain.top)
    with vhdx.open(chain.top, parents=moved) as disk:
        assert disk.read_at(0, disk.size) == chain.expected()


def test_search_dirs_by_name_and_by_guid(tmp_path):
    chain = _chain(tmp_path, depth=2)
    other = tmp_path / "store"
    other.mkdir()
    # Same name in a search directory.
    shutil.move(chain.parents[0], other / chain.parents[0].name)
    with vhdx.open(chain.top, search_dirs=[other]) as disk:
        assert disk.read_at(0, disk.size) == chain.expected()
    # Renamed: found by scanning the directory for a matching DataWriteGuid.
    os.rename(other / chain.parents[0].name, other / "renamed.vhdx")
    with vhdx.open(chain.top, search_dirs=[other]) as disk:
        assert disk.chain[1].path.endswith("renamed.vhdx")
        assert disk.read_at(0, disk.size) == chain.expected()


def test_windows_absolute_path_maps_to_basename_beside_child():
    loc = {"parent_linkage": "{%s}" % uuid.uuid4(),
           "absolute_win32_path": "C:\\VMs\\Disks\\base.vhdx",
           "volume_path": "\\\\?\\Volume{0eba351e-5634-46d6-a8cf-4ddc2d6ac0b9}\\Disks\\base.vhdx"}
    paths = candidate_paths("/evidence/child.avhdx", loc, ["/more"])
    assert "/evidence/base.vhdx" in paths and "/more/base.vhdx" in paths
    assert all("\\" not in p for p in paths) or os.name == "nt"


def test_linkage_mismatch_fails_closed_and_override_works(tmp_path):
    chain = _chain(tmp_path, depth=2)
    base = chain.images[1]
    # Rewrite the parent's headers with another DataWriteGuid: the child is stale.
    from builder import rewrite_headers

    rewrite_headers(base.path, base.plan, data_write_guid=uuid.uuid4())
    with pytest.raises(vhdx.ParentMismatchError, match="parent_linkage"):
        vhdx.open(chain.top)
    with vhdx.open(chain.top, ignore_linkage=True) as disk:
        assert disk.read_at(0, disk.size) == chain.expected()
        assert any("linkage" in w for w in disk.warnings)


def test_parent_linkage2_is_accepted_but_zero_never_matches(tmp_path):
    base = build_image(tmp_path, _spec("base", blocks={0: Block(FULLY)}))
    # Child whose parent_linkage is stale but whose linkage2 names the parent (mid-merge state).
    from vhdx.layout import ParentInfo, plan_layout, write_new_image

    for linkage2, ok in ((base.data_write_guid, True), (S.ZERO_GUID, False)):
        info = ParentInfo(uuid.uuid4(), relative_path=".\\base.vhdx", parent_linkage2=linkage2)
        path = tmp_path / f"child-{ok}.avhdx"
        write_new_image(path, plan_layout(4 * MiB, 1 * MiB, parent=info))
        if ok:
            with vhdx.open(path) as disk:
                assert disk.read_at(0, 1 * MiB) == base.blocks[0].data
        else:
            with pytest.raises(vhdx.ParentMismatchError):
                vhdx.open(path)


def test_logical_sector_size_mismatch_is_refused(tmp_path):
    base = build_image(tmp_path, _spec("base", logical_sector_size=4096))
    child = build_image(tmp_path, replace(_spec("child"), suffix=".avhdx"), parent=base)
    # The child was built as 512 over a 4096 parent.
    with pytest.raises(vhdx.ParentMismatchError, match="sector size"):
        vhdx.open(child.path)
    with pytest.raises(vhdx.ParentMismatchError):
        vhdx.open(child.path, ignore_linkage=True)


def test_cycle_is_refused(tmp_path):
    a_guid, b_guid = uuid.uuid4(), uuid.uuid4()
    from vhdx.layout import ParentInfo, plan_layout, write_new_image

    write_new_image(tmp_path / "a.avhdx", plan_layout(
        4 * MiB, 1 * MiB, parent=ParentInfo(b_guid, relative_path="b.avhdx"), data_write_guid=a_guid))
    write_new_image(tmp_path / "b.avhdx", plan_layout(
        4 * MiB, 1 * MiB, parent=ParentInfo(a_guid, relative_path="a.avhdx"), data_write_guid=b_guid))
    with pytest.raises(vhdx.ParentMismatchError, match="loops"):
        vhdx.open(tmp_path / "a.avhdx")


def test_self_parent_is_not_accepted(tmp_path):
    from vhdx.layout import ParentInfo, plan_layout, write_new_image

    g = uuid.uuid4()
    write_new_image(tmp_path / "a.avhdx", plan_layout(
        4 * MiB, 1 * MiB, parent=ParentInfo(g, relative_path="a.avhdx"), data_write_guid=g))
    with pytest.raises(vhdx.VhdxError):
        vhdx.open(tmp_path / "a.avhdx")


def test_absurd_depth_is_refused(tmp_path, monkeypatch):
    chain = _chain(tmp_path, depth=4)
    import vhdx.chain as ch

    monkeypatch.setattr(ch, "MAX_CHAIN_DEPTH", 2)
    with pytest.raises(vhdx.ParentMismatchError, match="deeper"):
        ch.open_chain(chain.top, max_depth=2)
    with vhdx.open(chain.top) as disk:  # the default limit is far above 4
        assert len(disk.chain) == 4


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_lookup_never_opens_non_regular_files(tmp_path):
    chain = _chain(tmp_path, depth=2)
    parent = chain.parents[0]
    parent.unlink()
    os.mkfifo(parent)  # a FIFO where the parent should be: opening it would block
    result: list[BaseException | None] = []

    def attempt() -> None:
        try:
            vhdx.open(chain.top)
            result.append(None)
        except BaseException as e:  # noqa: BLE001
            result.append(e)

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "lookup blocked on a FIFO"
    assert isinstance(result[0], vhdx.ParentNotFoundError)
    with pytest.raises(vhdx.InvalidArgumentError):
        vhdx.open(parent)  # and the top-level open refuses it without blocking


def test_child_larger_than_parent_reads_zeros_past_parent_end(tmp_path):
    base = build_image(tmp_path, _spec("base", size=2 * MiB, blocks={0: Block(FULLY), 1: Block(FULLY)}))
    child = build_image(tmp_path, replace(_spec("child", size=5 * MiB, blocks={4: Block(NOT_PRESENT)}),
                                          suffix=".avhdx"), parent=base)
    with vhdx.open(child.path) as disk:
        data = disk.read_at(0, disk.size)
    assert data[:2 * MiB] == base.blocks[0].data + base.blocks[1].data
    assert data[2 * MiB:] == bytes(3 * MiB)
    kinds = {(e.offset, e.kind) for e in vhdx.open(child.path).extents()}
    assert (2 * MiB, "zero") in kinds


def test_extent_map_names_the_supplying_file(tmp_path):
    chain = _chain(tmp_path, depth=3)
    expected = chain.expected()
    with vhdx.open(chain.top) as disk:
        extents = disk.extents()
        assert sum(e.length for e in extents) == disk.size
        pos = 0
        for e in extents:
            assert e.offset == pos
            pos += e.length
            if e.kind == "data":
                img = disk.chain[e.source]
                assert os.pread(img.fd, e.length, e.file_offset) == expected[e.offset:e.offset + e.length]
            else:
                assert expected[e.offset:e.offset + e.length] == bytes(e.length)


def test_read_at_is_thread_safe(tmp_path):
    chain = _chain(tmp_path, depth=3)
    expected = chain.expected()
    import random

    errors: list[str] = []
    with vhdx.open(chain.top) as disk:
        def worker(seed: int) -> None:
            rng = random.Random(seed)
            for _ in range(300):
                off = rng.randrange(disk.size)
                n = rng.randrange(1, 300_000)
                if disk.read_at(off, n) != expected[off:off + n]:
                    errors.append(f"{off}+{n}")

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []
