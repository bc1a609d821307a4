"""The merge engine (issue: Merge engine).

Every merge is checked against what the chain read before it started: by the
project's reader, by libvhdi where it applies, by `vhdx check` and, for 512-byte
base targets, by `qemu-img check`.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import vhdx
from vhdx import structures as S
from vhdx.check import check_chain
from vhdx.merge_engine import merge
from vhdx.storage import FileStorage
from storages import JournalOp

from powerloss import MODES, crash_image
from builder import (FULLY, NOT_PRESENT, PARTIAL, UNDEFINED, UNMAPPED, ZERO, Block, ImageSpec,
                     build_chain)

MiB = S.MiB
ALL_STATES = [FULLY, PARTIAL, ZERO, NOT_PRESENT, UNDEFINED, UNMAPPED]


def random_chain(d: Path, rng: random.Random, depth: int, lss: int, *, size: int | None = None,
                 fixed_base: bool | None = None):  # noqa: ANN201
    """A random chain, base first: every block state, mixed block sizes."""
    size = size or rng.choice([8, 12]) * MiB + rng.choice([0, lss * 5])
    specs = []
    for i in range(depth):
        bs = rng.choice([1, 2, 4]) * MiB
        states = ALL_STATES if i else [FULLY, ZERO, NOT_PRESENT, UNDEFINED, UNMAPPED]
        blocks = {b: Block(st) for b in range(-(-size // bs)) if (st := rng.choice(states)) != NOT_PRESENT}
        fixed = (rng.random() < 0.3) if fixed_base is None else fixed_base
        specs.append(ImageSpec(virtual_size=size, block_size=bs, logical_sector_size=lss, name=f"l{i}",
                               blocks=blocks, seed=rng.randrange(1 << 30), fixed=(i == 0 and fixed)))
    return build_chain(d, specs)


def read_all(path: Path, **kw) -> bytes:  # noqa: ANN003
    with vhdx.open(path, **kw) as disk:
        return disk.read_at(0, disk.size)


def digests(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


def libvhdi_read(paths: list[Path], size: int) -> bytes | None:
    try:
        import pyvhdi
    except ImportError:
        return None
    files = []
    for p in paths:
        f = pyvhdi.file()
        f.open(str(p))
        files.append(f)
    for child, parent in zip(files, files[1:]):
        child.set_parent(parent)
    return files[0].read_buffer_at_offset(size, 0)


def _has_zeroish_diff_blocks(path: Path) -> bool:
    with vhdx.ImageFile(path) as img:
        return img.has_parent and any(
            info.state in (S.PAYLOAD_BLOCK_ZERO, S.PAYLOAD_BLOCK_UNDEFINED, S.PAYLOAD_BLOCK_UNMAPPED)
            for _, info in img.allocated_blocks())


def assert_clean(path: Path) -> None:
    report = check_chain(path)
    assert report.clean, [f.message for f in report.findings]


@pytest.mark.parametrize("seed", range(24))
def test_random_chains_all_modes(tmp_path, seed):
    rng = random.Random(seed)
    depth = rng.randint(2, 4)
    lss = rng.choice([512, 4096])
    chain = random_chain(tmp_path, rng, depth, lss)
    expected = chain.expected()
    assert read_all(chain.top) == expected
    mode = ("inplace", "into", "flatten")[seed % 3]
    if mode == "flatten":
        out = tmp_path / "flat.vhdx"
        before = digests(tmp_path)
        s = merge(chain.top, output=out)
        after = digests(tmp_path)
        del after["flat.vhdx"]
        assert after == before, "flatten modified its sources"
        target, target_chain = out, [out]
    else:
        k = 1 if mode == "inplace" else rng.randint(1, depth - 1)
        target = chain.images[k].path
        target_chain = [i.path for i in chain.images[k:]]
        s = merge(chain.top, into=target if mode == "into" else None)
        assert s.deleted == [str(p) for p in chain.paths[:k]]
        assert all(not p.exists() for p in chain.paths[:k])
    assert read_all(target) == expected
    assert_clean(target)
    # libvhdi reads ZERO/UNDEFINED/UNMAPPED blocks of differencing files from the
    # parent (FORMAT.md §5.2 fn 2): it is an oracle wherever no differencing file of the
    # target's chain holds such a block.
    if not any(_has_zeroish_diff_blocks(p) for p in target_chain):
        lv = libvhdi_read(target_chain, len(expected))
        if lv is not None:
            assert lv == expected
    if len(target_chain) == 1 and lss == 512 and shutil.which("qemu-img"):
        r = subprocess.run(["qemu-img", "check", str(target)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
    assert s.blocks_changed >= 0 and s.seconds > 0


@pytest.mark.parametrize("lss", [512, 4096])
def test_dry_run_writes_nothing_and_predicts_the_work(tmp_path, lss):
    rng = random.Random(lss)
    chain = random_chain(tmp_path, rng, 3, lss)
    before = digests(tmp_path)
    dry = merge(chain.top, dry_run=True)
    assert digests(tmp_path) == before
    assert dry.dry_run and not dry.deleted
    real = merge(chain.top)
    assert (dry.blocks_changed, dry.bytes_copied + dry.bytes_cloned, dry.bytes_zeroed) == \
        (real.blocks_changed, real.bytes_copied + real.bytes_cloned, real.bytes_zeroed)
    flat = merge(chain.images[1].path, output=tmp_path / "x.vhdx", dry_run=True)
    assert not (tmp_path / "x.vhdx").exists() and flat.dry_run


def test_keep_leaves_a_working_child_via_linkage2(tmp_path):
    chain = random_chain(tmp_path, random.Random(7), 3, 512)
    expected = chain.expected()
    s = merge(chain.top, keep=True)
    assert s.deleted == []
    assert read_all(chain.top) == expected  # the child still opens on the merged parent
    with vhdx.open(chain.top) as d:
        loc = d.parent_locator
    assert loc["parent_linkage2"].strip("{}") == str(vhdx.open(chain.images[1].path).data_write_guid)
    assert read_all(chain.images[1].path) == expected


def test_siblings_refuse_without_changing_a_byte(tmp_path):
    chain = random_chain(tmp_path, random.Random(3), 2, 512)
    base = chain.images[1]
    from builder import build_image

    sib = build_image(tmp_path, ImageSpec(virtual_size=base.spec.virtual_size, block_size=MiB,
                                          name="sibling", suffix=".avhdx",
                                          blocks={0: Block(PARTIAL)}, seed=99), parent=base)
    sibling_view = read_all(sib.path)
    before = digests(tmp_path)
    with pytest.raises(vhdx.DependentDisksError, match="sibling"):
        merge(chain.top)
    assert digests(tmp_path) == before
    s = merge(chain.top, force=True)
    assert s.invalidated == [str(sib.path)]
    with pytest.raises(vhdx.ParentMismatchError):
        vhdx.open(sib.path)  # its parent changed under it, as --force warned
    assert sibling_view != read_all(sib.path, ignore_linkage=True)


def test_children_of_the_merged_child_are_repointed(tmp_path):
    chain = random_chain(tmp_path, random.Random(11), 3, 512)
    # Merge the middle file into the base: the top file is the merged file's child.
    expected = chain.expected()
    middle = chain.images[1].path
    s = merge(middle)
    assert s.repointed == [str(chain.top)]
    assert not middle.exists()
    with vhdx.open(chain.top) as d:
        assert len(d.chain) == 2 and d.chain[1].path == str(chain.images[2].path)
        assert d.read_at(0, d.size) == expected
        assert "parent_linkage2" not in d.parent_locator


def test_locks_keep_a_merge_off_a_chain_being_written(tmp_path):
    chain = random_chain(tmp_path, random.Random(5), 2, 512)
    with vhdx.open(chain.images[1].path, "r+", force=True):  # a parent: forced
        with pytest.raises(vhdx.LockedError):
            merge(chain.top)
    expected = chain.expected()
    assert read_all(chain.top) == expected  # nothing changed


def test_progress_and_cancel(tmp_path, monkeypatch):
    import vhdx.merge_engine as M

    monkeypatch.setattr(M, "CHUNK_BYTES", 1 * MiB)
    chain = random_chain(tmp_path, random.Random(21), 2, 512, size=16 * MiB)
    expected = chain.expected()
    calls = []
    with pytest.raises(vhdx.CancelledError):
        merge(chain.top, keep=True, progress=lambda done, total: calls.append((done, total)) or False)
    assert len(calls) == 1 and 0 < calls[0][0] <= calls[0][1]
    assert read_all(chain.top) == expected  # interrupted: still reads as before
    seen = []
    merge(chain.top, progress=lambda d, t: seen.append((d, t)))
    assert seen[-1][0] == seen[-1][1] and [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert read_all(chain.images[1].path) == expected


# --- power cuts --------------------------------------------------------------------------
class _SharedRecorder(FileStorage):
    """A FileStorage that appends every mutating call to a journal shared by all files."""

    def __init__(self, path: str, journal: list) -> None:
        super().__init__(os.open(path, os.O_RDWR))
        self.path = os.path.basename(path)
        self.journal = journal

    def pwrite(self, offset, data) -> None:  # noqa: ANN001
        data = bytes(data)
        super().pwrite(offset, data)
        self.journal.append((self.path, JournalOp("write", offset, data)))

    def truncate(self, size: int) -> None:
        super().truncate(size)
        self.journal.append((self.path, JournalOp("truncate", size)))

    def flush(self) -> None:
        super().flush()
        self.journal.append((self.path, JournalOp("flush")))


def _crash_state(originals: dict[str, bytes], journal: list, cut: int, rng: random.Random) -> dict[str, bytes]:
    """Files as a power cut after ``cut`` journal ops could leave them: per file, all
    its ops up to its own last flush before the cut, plus those of the later writes
    that the drawn mode lets land (none, all, a prefix, a subset, torn or reordered
    4 KiB pieces, torn 512-byte pieces)."""
    return {name: bytes(crash_image(data, [op for p, op in journal[:cut] if p == name],
                                    rng.choice(MODES), rng))
            for name, data in originals.items()}


def _power_cut_campaign(tmp_path: Path, seed: int, cuts: int, rerun_every: int) -> int:
    rng = random.Random(seed)
    src = tmp_path / "src"
    src.mkdir(parents=True)
    depth = rng.randint(2, 3)
    chain = random_chain(src, rng, depth, rng.choice([512, 4096]), size=6 * MiB, fixed_base=False)
    expected = chain.expected()
    originals = {p.name: p.read_bytes() for p in src.iterdir()}
    journal: list = []
    work = tmp_path / "rec"
    shutil.copytree(src, work)
    into = chain.images[-1].path.name if depth == 3 and seed % 2 else None
    import vhdx.merge_engine as M

    saved = M.CHUNK_BYTES, M.BATCH_SECONDS
    if seed % 3 == 0:  # many small chunks, each committed: cuts between commits
        M.CHUNK_BYTES, M.BATCH_SECONDS = 256 << 10, 0.0
    try:
        merge(work / chain.top.name, into=work / into if into else None, keep=True,
              storage_factory=lambda p: _SharedRecorder(p, journal))
    finally:
        M.CHUNK_BYTES, M.BATCH_SECONDS = saved
    assert read_all(work / chain.top.name) == expected
    checked = 0
    # Drawn with replacement: one cut point with other pending subsets is another crash.
    points = sorted(rng.randrange(len(journal) + 1) for _ in range(cuts))
    for n, cut in enumerate(points):
        crash = tmp_path / f"c{n}"
        crash.mkdir()
        for name, data in _crash_state(originals, journal, cut, rng).items():
            (crash / name).write_bytes(data)
        top = crash / chain.top.name
        assert read_all(top) == expected, f"seed {seed} cut {cut}/{len(journal)}"
        report = check_chain(top)
        assert not report.errors, (cut, [f.message for f in report.errors])
        if n % rerun_every == 0:  # running the merge again completes it
            merge(top, into=crash / into if into else None)
            target = crash / (into or chain.images[1].path.name)
            assert read_all(target) == expected
            assert_clean(target)
        shutil.rmtree(crash)
        checked += 1
    return checked


def test_power_cuts_during_merges(tmp_path):
    """≥ 500 simulated power cuts at random points of random merges."""
    total = 0
    for seed in range(10):
        total += _power_cut_campaign(tmp_path / f"s{seed}", seed, cuts=52, rerun_every=6)
    assert total >= 500


@pytest.mark.soak
def test_power_cuts_soak(tmp_path):
    for seed in range(100, 160):
        _power_cut_campaign(tmp_path / f"s{seed}", seed, cuts=200, rerun_every=3)


# --- block clone on XFS ------------------------------------------------------------------
from test_native import xfs_dir  # noqa: E402,F401 - the module-scoped XFS reflink mount


def test_clone_path_on_xfs_matches_copy_path(xfs_dir, tmp_path):  # noqa: F811
    d = xfs_dir / "merge-clone"
    d.mkdir()
    specs = [ImageSpec(virtual_size=16 * MiB, block_size=2 * MiB, name="base", seed=1,
                       blocks={0: Block(FULLY), 1: Block(FULLY)}),
             ImageSpec(virtual_size=16 * MiB, block_size=2 * MiB, name="child", seed=2,
                       blocks={2: Block(FULLY), 3: Block(FULLY), 4: Block(PARTIAL), 0: Block(FULLY)})]
    chain = build_chain(d, specs)
    copy_dir = tmp_path / "copy"
    shutil.copytree(d, copy_dir)
    expected = chain.expected()
    s = merge(chain.top)
    # The three fully-present blocks are cloned whole; the partially-present one has
    # runs of 512-byte sectors, which are not clone-aligned, so it is copied.
    assert s.bytes_cloned == 3 * 2 * MiB, s
    assert s.bytes_copied > 0
    assert read_all(chain.images[1].path) == expected
    # The copy path (no clone) gives identical results.
    s2 = merge(copy_dir / chain.top.name, allow_clone=False)
    assert s2.bytes_cloned == 0
    assert read_all(copy_dir / chain.images[1].path.name) == expected


def test_clone_extents_shared_while_child_kept(xfs_dir):  # noqa: F811
    from vhdx.native import fiemap_shared

    d = xfs_dir / "merge-keep"
    d.mkdir()
    specs = [ImageSpec(virtual_size=8 * MiB, block_size=2 * MiB, name="base", seed=1, blocks={}),
             ImageSpec(virtual_size=8 * MiB, block_size=2 * MiB, name="child", seed=2,
                       blocks={0: Block(FULLY), 1: Block(FULLY), 3: Block(FULLY)})]
    chain = build_chain(d, specs)
    expected = chain.expected()
    s = merge(chain.top, keep=True)
    assert s.bytes_cloned == 3 * 2 * MiB
    with vhdx.open(chain.images[1].path) as disk:
        shared = mapped = 0
        for e in disk.extents():
            if e.kind == "data":
                sh, mp = fiemap_shared(disk.chain[0].fd, e.file_offset, e.length)
                shared, mapped = shared + sh, mapped + mp
        assert disk.read_at(0, disk.size) == expected
    assert shared == mapped == 3 * 2 * MiB  # every merged byte shares its extent with the child


@pytest.mark.parametrize("depth", [2, 3])
def test_child_larger_than_target_grows_it(tmp_path, depth):
    """The target takes the child's virtual size; the grown area reads what the chain
    read there (zeros past the old end), also over a differencing target whose own
    parent is larger still (NOT_PRESENT there would expose it; FORMAT.md §8.3)."""
    sizes = [9 * MiB, 5 * MiB, 7 * MiB][:depth] if depth == 3 else [5 * MiB, 7 * MiB]
    specs = [ImageSpec(virtual_size=sz, block_size=MiB, name=f"l{i}", seed=40 + i,
                       blocks={b: Block(FULLY) for b in range(0, -(-sz // MiB), 2)})
             for i, sz in enumerate(sizes)]
    # The top file leaves its last blocks NOT_PRESENT so the grown range must fall
    # through to the target's zeros, not to the larger base.
    specs[-1].blocks = {0: Block(PARTIAL), 1: Block(FULLY)}
    chain = build_chain(tmp_path, specs)
    expected = chain.expected()
    dry = merge(chain.top, dry_run=True)
    s = merge(chain.top)
    assert (dry.blocks_changed, dry.bytes_copied) == (s.blocks_changed, s.bytes_copied)
    target = chain.images[1].path
    with vhdx.open(target) as d:
        assert d.size == sizes[-1]
        assert d.read_at(0, d.size) == expected
    assert_clean(target)


def test_child_smaller_than_target_is_refused(tmp_path):
    specs = [ImageSpec(virtual_size=6 * MiB, block_size=MiB, name="base", blocks={0: Block(FULLY)}),
             ImageSpec(virtual_size=4 * MiB, block_size=MiB, name="child", blocks={1: Block(FULLY)})]
    chain = build_chain(tmp_path, specs)
    before = digests(tmp_path)
    with pytest.raises(vhdx.UnsupportedFeatureError, match="smaller"):
        merge(chain.top)
    assert digests(tmp_path) == before


def test_kill_9_of_the_cli_at_random_times(tmp_path):
    """kill -9 of `vhdx merge` at random instants: the chain reads as before, `vhdx
    check` finds no errors, and running the merge again completes it."""
    import signal
    import time

    rng = random.Random(1234)
    outcomes = {"interrupted": 0, "finished": 0}
    duration = None
    for i in range(9):
        d = tmp_path / f"k{i}"
        d.mkdir()
        specs = [ImageSpec(virtual_size=96 * MiB, block_size=MiB, name="base", seed=i,
                           blocks={b: Block(FULLY) for b in range(0, 96, 3)}),
                 ImageSpec(virtual_size=96 * MiB, block_size=MiB, name="child", seed=100 + i,
                           blocks={b: Block(rng.choice([FULLY, PARTIAL, ZERO])) for b in range(96)})]
        chain = build_chain(d, specs)
        expected = chain.expected()
        t0 = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "vhdx.cli", "merge", str(chain.top)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if duration is None:  # the first run measures how long a whole merge takes
            proc.wait()
            duration = time.monotonic() - t0
        else:
            time.sleep(rng.uniform(0.2, 1.0) * duration)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        base = chain.images[1].path
        if chain.top.exists():
            outcomes["interrupted"] += 1
            assert read_all(chain.top) == expected
            assert not check_chain(chain.top).errors
            subprocess.run([sys.executable, "-m", "vhdx.cli", "merge", str(chain.top)], check=True,
                           capture_output=True)
        else:
            outcomes["finished"] += 1
        assert read_all(base) == expected
        assert_clean(base)
    assert outcomes["interrupted"] >= 2, outcomes


def test_merge_commits_before_the_log_fills(tmp_path, monkeypatch):
    """With room for only a few sectors per log entry, the merge commits early and
    often (as it must with blocks scattered over many chunks) and stays exact."""
    import vhdx.writer as W

    monkeypatch.setattr(W, "_PENDING_HEADROOM", 251)  # 1 MiB log: 4 sectors per entry
    commits = []
    real = W.WritableDisk._commit

    def counting(self):  # noqa: ANN001, ANN202
        if self._pending_bat or self._pending_sb:
            commits.append(len(self._pending_bat_sectors) + len(self._pending_sb))
        return real(self)

    monkeypatch.setattr(W.WritableDisk, "_commit", counting)
    # A differencing target with 4 MiB blocks (1 KiB of bitmap each) under a child
    # that is partially present everywhere: the bitmap changes span 16 sectors.
    size = 64 * MiB
    specs = [ImageSpec(virtual_size=size, block_size=4 * MiB, name="base", seed=1,
                       blocks={b: Block(FULLY) for b in range(0, 16, 3)}),
             ImageSpec(virtual_size=size, block_size=4 * MiB, name="target", seed=2, blocks={}),
             ImageSpec(virtual_size=size, block_size=MiB, name="top", seed=3,
                       blocks={b: Block(PARTIAL) for b in range(64)})]
    chain = build_chain(tmp_path, specs)
    expected = chain.expected()
    merge(chain.top)
    assert len(commits) >= 2 and max(commits) <= 4 + 18  # one entry of 7 sectors without the limit
    assert read_all(chain.images[1].path) == expected
    assert_clean(chain.images[1].path)


TARGET_KINDS = ["dynamic", "fixed", "differencing"]


@pytest.mark.parametrize("lss", [512, 4096])
@pytest.mark.parametrize("kind", TARGET_KINDS)
def test_every_child_state_over_every_target_state(tmp_path, kind, lss):
    """The whole matrix of FORMAT.md §8.3: each child block state over each target block
    state, for base, fixed and differencing targets; the target must then read
    exactly what the chain read (and a differencing target's own parent must never
    show through where the child defined zeros)."""
    child_states = ALL_STATES
    target_states = [FULLY] if kind == "fixed" else (
        ALL_STATES if kind == "differencing" else [FULLY, ZERO, NOT_PRESENT, UNDEFINED, UNMAPPED])
    n = 0
    for ts in target_states:
        for cs in child_states:
            d = tmp_path / f"{ts}-{cs}"
            d.mkdir()
            specs = []
            if kind == "differencing":  # a grandparent full of data under the target
                specs.append(ImageSpec(virtual_size=3 * MiB, block_size=MiB, logical_sector_size=lss,
                                       name="gp", seed=1, blocks={b: Block(FULLY) for b in range(3)}))
            target_blocks = {b: Block(ts) for b in range(3) if ts != NOT_PRESENT}
            if kind == "fixed":
                target_blocks = {}
            specs.append(ImageSpec(virtual_size=3 * MiB, block_size=MiB, logical_sector_size=lss,
                                   name="target", seed=2, blocks=target_blocks, fixed=kind == "fixed"))
            specs.append(ImageSpec(virtual_size=3 * MiB, block_size=MiB, logical_sector_size=lss,
                                   name="child", seed=3,
                                   blocks={1: Block(cs)} if cs != NOT_PRESENT else {}))
            chain = build_chain(d, specs)
            expected = chain.expected()
            merge(chain.top)
            target = chain.images[1].path
            assert read_all(target) == expected, (kind, ts, cs)
            assert_clean(target)
            n += 1
    assert n == len(target_states) * len(child_states)


def test_two_merges_are_kept_off_the_same_chain(tmp_path):
    """A merge holds the file above the target writable for its whole run; a second
    merge of the same chain finds it locked and changes nothing."""
    chain = random_chain(tmp_path, random.Random(9), 2, 512)
    expected = chain.expected()
    from vhdx.writer import WritableDisk

    with WritableDisk(chain.top, standalone=True):  # what a running merge holds
        before = digests(tmp_path)
        with pytest.raises(vhdx.LockedError):
            merge(chain.top)
        assert digests(tmp_path) == before
    merge(chain.top)
    assert read_all(chain.images[1].path) == expected
