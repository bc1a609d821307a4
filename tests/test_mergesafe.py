"""Merge safety (issues 14 and 13): restarts from every phase, locks QEMU honours,
bounded log replay, confinement, dependents found by content, preconditions
before the first write, disk-full and I/O-error rollback.

Ground truth: chains built by tests/builder.py (contents computed from their
description, not read back), QEMU's own tools for the locks, statvfs and file
hashes for "nothing changed".
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import vhdx
from vhdx import structures as S
from vhdx.check import check_chain
from vhdx.merge_engine import merge

from builder import FULLY, PARTIAL, ZERO, Block, ImageSpec, build_chain, build_image, expected_chain

MiB = S.MiB
REPO = Path(__file__).resolve().parent.parent


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def digests(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): sha(p) for p in sorted(d.rglob("*")) if p.is_file()}


def read_all(path: Path, **kw) -> bytes:  # noqa: ANN003
    with vhdx.open(path, **kw) as disk:
        return disk.read_at(0, disk.size)


# The CLI of this tree only: an editable install of another checkout must not lend
# it subpackages (its import finder maps names this tree lacks to that checkout).
_CLI = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if not "
        "str(getattr(f, '__module__', '')).startswith('__editable__')]; "
        "from vhdx.cli import main; sys.exit(main(sys.argv[1:]))")
VHDX_CMD = [sys.executable, "-c", _CLI]


def cli(*args: str, **kw) -> subprocess.CompletedProcess:  # noqa: ANN003
    return subprocess.run([*VHDX_CMD, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120, **kw)


def one_line_error(r: subprocess.CompletedProcess, name: str) -> str:
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vhdx: error: ") and name in lines[0], r.stderr
    return lines[0]


def family(d: Path, size: int = 8 * MiB, grandchildren: int = 2, seed: int = 1):
    """base <- child <- gc0, gc1, ... (siblings of each other), all in ``d``.
    Returns (chain base..child, grandchildren images, expected view per grandchild)."""
    rng = random.Random(seed)
    nb = size // MiB
    specs = [ImageSpec(virtual_size=size, name="base", seed=seed,
                       blocks={b: Block(FULLY) for b in range(nb) if rng.random() < 0.6}),
             ImageSpec(virtual_size=size, name="child", seed=seed + 1,
                       blocks={b: Block(rng.choice([FULLY, PARTIAL, ZERO])) for b in range(nb)
                               if rng.random() < 0.7})]
    chain = build_chain(d, specs)
    child = chain.images[0]
    gcs = [build_image(d, ImageSpec(virtual_size=size, name=f"gc{i}", suffix=".avhdx", seed=seed + 10 + i,
                                    blocks={b: Block(PARTIAL) for b in range(nb) if rng.random() < 0.5}),
                       parent=child) for i in range(grandchildren)]
    views = [expected_chain([(g.spec, g.blocks)] + [(i.spec, i.blocks) for i in chain.images]) for g in gcs]
    return chain, gcs, views


def assert_family_merged(chain, gcs, views) -> None:  # noqa: ANN001
    base = chain.images[1].path
    assert not chain.top.exists()
    for g, view in zip(gcs, views):
        with vhdx.open(g.path) as d:
            assert [Path(f.path).name for f in d.chain] == [g.path.name, base.name]
            assert d.read_at(0, d.size) == view
            assert "parent_linkage2" not in d.parent_locator
    report = check_chain(gcs[0].path)
    assert report.clean, [f.message for f in report.findings]


# --- restart of the re-point phase ------------------------------------------------------
def test_rerun_after_an_interruption_between_two_repoints(tmp_path, monkeypatch):
    """A kill between re-pointing the first and the second grandchild: the rerun,
    without --force, recognises the re-pointed one and completes, no false warning."""
    chain, gcs, views = family(tmp_path)
    from vhdx.writer import WritableDisk

    real = WritableDisk.update_parent_locator
    calls = []

    def dying(self, changes):  # noqa: ANN001, ANN202
        if "relative_path" in changes:  # a re-point
            calls.append(self.image.path)
            if len(calls) == 2:
                raise KeyboardInterrupt  # stands for SIGKILL/SIGTERM at that instant
        return real(self, changes)

    monkeypatch.setattr(WritableDisk, "update_parent_locator", dying)
    with pytest.raises(KeyboardInterrupt):
        merge(chain.top)
    monkeypatch.setattr(WritableDisk, "update_parent_locator", real)
    assert chain.top.exists() and len(calls) == 2
    for g, view in zip(gcs, views):
        assert read_all(g.path) == view  # both read as before at this instant
    s = merge(chain.top)
    assert s.invalidated == [] and sorted(s.repointed) == sorted(str(g.path) for g in gcs)
    assert s.bytes_moved == 0  # the data phase was not redone
    assert_family_merged(chain, gcs, views)


def test_rerun_applies_a_repoint_left_in_the_log(tmp_path, monkeypatch):
    """Killed after a grandchild's re-point reached its log but before the apply:
    readers already see it re-pointed (the log is replayed in memory), and the rerun
    must leave that file clean too, not with a pending log entry."""
    chain, gcs, views = family(tmp_path)
    from vhdx.image import ImageFile
    from vhdx.log_writer import LogWriter
    from vhdx.writer import WritableDisk

    real_update, real_apply = WritableDisk.update_parent_locator, LogWriter._apply
    state = {"repoint": False}

    def marking(self, changes):  # noqa: ANN001, ANN202
        state["repoint"] = "relative_path" in changes
        return real_update(self, changes)

    def killed_before_apply(self, *a, **k):  # noqa: ANN002, ANN003, ANN202
        if state["repoint"]:
            raise KeyboardInterrupt  # the entry is durable, the file not yet updated
        return real_apply(self, *a, **k)

    monkeypatch.setattr(WritableDisk, "update_parent_locator", marking)
    monkeypatch.setattr(LogWriter, "_apply", killed_before_apply)
    with pytest.raises(KeyboardInterrupt):
        merge(chain.top)
    monkeypatch.setattr(WritableDisk, "update_parent_locator", real_update)
    monkeypatch.setattr(LogWriter, "_apply", real_apply)

    def dirty(p: Path) -> bool:
        with ImageFile(p) as img:
            return img.header.log_dirty

    assert [dirty(g.path) for g in gcs].count(True) == 1  # the state this test is about
    merge(chain.top)
    assert_family_merged(chain, gcs, views)
    assert not any(dirty(g.path) for g in gcs)


def _root_with(tool: str) -> None:
    if os.geteuid() != 0 or shutil.which(tool) is None:
        pytest.skip(f"needs root and {tool}")


def _chattr(flag: str, path: Path) -> bool:
    return subprocess.run(["chattr", flag, str(path)], capture_output=True).returncode == 0


def test_immutable_second_grandchild_refused_before_any_write_then_rerun(tmp_path):
    _root_with("chattr")
    chain, gcs, views = family(tmp_path)
    if not _chattr("+i", gcs[1].path):
        pytest.skip("file system without chattr +i")
    try:
        before = digests(tmp_path)
        r = cli("merge", str(chain.top))
        line = one_line_error(r, str(gcs[1].path))
        assert "immutable" in line
        assert digests(tmp_path) == before  # refused before the first write
    finally:
        _chattr("-i", gcs[1].path)
    r = cli("merge", str(chain.top))
    assert r.returncode == 0, r.stderr
    assert "no longer matches" not in r.stdout and "invalid" not in r.stdout
    assert_family_merged(chain, gcs, views)


def test_power_cuts_at_every_journal_position_of_the_repoint_phase(tmp_path):
    """Every cut after the target is complete (mark, re-points, before the deletes):
    the chain of every grandchild reads as before, and a rerun without --force
    completes the merge."""
    from test_merge import _crash_state, _SharedRecorder

    src = tmp_path / "src"
    src.mkdir()
    chain, gcs, views = family(src, size=4 * MiB, seed=5)
    originals = {p.name: p.read_bytes() for p in src.iterdir()}
    work = tmp_path / "rec"
    shutil.copytree(src, work)
    journal: list = []
    merge(work / chain.top.name, keep=True, storage_factory=lambda p: _SharedRecorder(p, journal))
    base = chain.images[1].path.name
    start = max(i for i, (name, _) in enumerate(journal) if name == base) + 1
    names = {name for name, _ in journal[start:]}
    assert names == {chain.top.name} | {g.path.name for g in gcs}  # mark, then re-points
    rng = random.Random(99)
    cuts = range(start, len(journal) + 1)
    assert len(cuts) >= 20, len(cuts)
    for cut in cuts:
        crash = tmp_path / f"c{cut}"
        crash.mkdir()
        for name, data in _crash_state(originals, journal, cut, rng).items():
            (crash / name).write_bytes(data)
        for g, view in zip(gcs, views):
            assert read_all(crash / g.path.name) == view, cut
        s = merge(crash / chain.top.name)
        assert s.invalidated == [], (cut, s.invalidated)
        moved = [crash / g.path.name for g in gcs]
        for p, view in zip(moved, views):
            with vhdx.open(p) as d:
                assert len(d.chain) == 2 and d.read_at(0, d.size) == view, cut
        assert not (crash / chain.top.name).exists()
        shutil.rmtree(crash)


def test_unlink_is_idempotent_and_a_completed_merge_is_not_redone(tmp_path, monkeypatch):
    """Deletion fails (here: interrupted after the first of two unlinks of an
    into-ancestor merge): the rerun only deletes what is left."""
    rng = random.Random(3)
    specs = [ImageSpec(virtual_size=4 * MiB, name=f"l{i}", seed=i,
                       blocks={b: Block(rng.choice([FULLY, PARTIAL])) for b in range(4)}) for i in range(3)]
    specs[0] = ImageSpec(virtual_size=4 * MiB, name="l0", seed=0, blocks={b: Block(FULLY) for b in range(4)})
    chain = build_chain(tmp_path, specs)
    expected = chain.expected()
    base = chain.images[2].path
    real = os.unlink
    seen = []

    def failing(p, *a, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        seen.append(str(p))
        if len(seen) == 2:
            raise PermissionError(13, "Permission denied", str(p))
        return real(p, *a, **kw)

    import vhdx.merge_engine as M

    monkeypatch.setattr(M.os, "unlink", failing)
    with pytest.raises(vhdx.VhdxIOError) as info:  # the OSError, errno and file name kept
        merge(chain.top, into=base)
    assert info.value.errno == errno.EACCES and info.value.filename == seen[1]
    monkeypatch.setattr(M.os, "unlink", real)
    assert seen[0] == str(chain.images[1].path)  # nearest the target first
    assert chain.top.exists() and not chain.images[1].path.exists()
    s = merge(chain.top, into=base)
    assert s.mode == "completion" and s.bytes_moved == 0
    assert not chain.top.exists()
    assert read_all(base) == expected


# --- preconditions ---------------------------------------------------------------------------
@pytest.fixture
def loop_fs(tmp_path):
    """An ext4 file system on a loop device, mounted under tmp_path; yields
    (mount point, remount(read_only))."""
    _root_with("losetup")
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("needs mkfs.ext4")
    img = tmp_path / "fs.img"
    with open(img, "wb") as f:
        f.truncate(64 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True, capture_output=True)
    r = subprocess.run(["losetup", "-f", "--show", str(img)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"no loop device: {r.stderr.strip()}")
    dev = r.stdout.strip()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        if subprocess.run(["mount", dev, str(mnt)], capture_output=True).returncode:
            pytest.skip("cannot mount a loop device here")

        def remount(ro: bool) -> None:
            subprocess.run(["mount", "-o", "remount," + ("ro" if ro else "rw"), str(mnt)], check=True)

        yield mnt, remount
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
        subprocess.run(["losetup", "-d", dev], capture_output=True)


def test_target_on_a_read_only_mount_is_refused_and_the_child_untouched(tmp_path, loop_fs):
    mnt, remount = loop_fs
    base = vhdx.create(mnt / "base.vhdx", 8 * MiB, block_size=MiB)
    with vhdx.open(base, "r+") as d:
        d.write_at(0, b"\x11" * (4 * MiB))
    child = vhdx.create(tmp_path / "child.avhdx", parent=base, block_size=MiB)
    with vhdx.open(child, "r+") as d:
        d.write_at(MiB, b"\x22" * (2 * MiB))
    remount(True)
    before = sha(Path(child))
    r = cli("merge", str(child), "--into", str(base))
    line = one_line_error(r, str(base))
    assert "read-only file system" in line
    assert sha(Path(child)) == before  # no linkage2, no FileWriteGuid change
    assert read_all(Path(child))[MiB:3 * MiB] == b"\x22" * (2 * MiB)


# --- dependents by content -------------------------------------------------------------------
def test_siblings_with_odd_names_are_found(tmp_path):
    chain, gcs, views = family(tmp_path, grandchildren=0)
    base = chain.images[1]
    (tmp_path / "sub").mkdir()
    odd = []
    for i, rel in enumerate(["s.avhdx.bak", "noext", "S2.AVHD", "sub/s3.avhdx"]):
        img = build_image(tmp_path, ImageSpec(virtual_size=base.spec.virtual_size, name=f"odd{i}",
                                              suffix=".avhdx", seed=50 + i, blocks={0: Block(FULLY)}),
                          parent=base)
        dest = tmp_path / rel
        os.replace(img.path, dest)
        odd.append(str(dest))
    (tmp_path / "notes.txt").write_text("vhdxfile? no")
    from vhdx.dependents import find_children

    assert sorted(find_children(base.path)) == sorted(odd + [str(chain.top)])
    assert sorted(find_children(base.path, exclude=[chain.top])) == sorted(odd)
    before = digests(tmp_path)
    with pytest.raises(vhdx.DependentDisksError) as e:
        merge(chain.top)
    for p in odd:
        assert p in str(e.value)
    assert digests(tmp_path) == before


def test_resize_and_writes_refuse_a_parent_with_children(tmp_path):
    base = vhdx.create(tmp_path / "base.vhdx", 8 * MiB, block_size=MiB)
    (tmp_path / "snap").mkdir()
    c1 = vhdx.create(tmp_path / "c1.avhdx", parent=base)
    c2 = vhdx.create(tmp_path / "snap" / "c2.avhdx", parent=base)
    before = digests(tmp_path)
    r = cli("resize", str(base), "--size", "16M")
    line = one_line_error(r, str(base))
    assert c1 in line and c2 in line
    with pytest.raises(vhdx.DependentDisksError, match="c2.avhdx"):
        vhdx.open(base, "r+")
    assert digests(tmp_path) == before
    with vhdx.open(base, "r+", force=True) as d:  # opened only: nothing written yet
        assert any(c1 in w and c2 in w and "invalid" in w for w in d.warnings)
    r = cli("resize", str(base), "--size", "16M", "--force")
    assert r.returncode == 0, r.stderr
    assert c1 in r.stderr and c2 in r.stderr and "invalid" in r.stderr
    assert "ignore-linkage" not in r.stderr + r.stdout


def test_merge_force_names_invalid_siblings_without_ignore_linkage_advice(tmp_path):
    chain, gcs, views = family(tmp_path, grandchildren=0)
    base = chain.images[1]
    (tmp_path / "snap").mkdir()
    sib = build_image(tmp_path / "snap", ImageSpec(virtual_size=base.spec.virtual_size, name="sib",
                                                   suffix=".avhdx", blocks={0: Block(FULLY)}), parent=base)
    r = cli("merge", str(chain.top))
    one_line_error(r, str(sib.path))
    r = cli("merge", str(chain.top), "--force")
    assert r.returncode == 0, r.stderr
    assert f"{sib.path} is now invalid" in r.stdout and "ignore-linkage" not in r.stdout


# --- confinement --------------------------------------------------------------------------------
def test_a_child_climbing_out_of_its_folder_is_not_merged_unless_named(tmp_path):
    vms = tmp_path / "vms"
    case = tmp_path / "incoming" / "case1"
    vms.mkdir()
    case.mkdir(parents=True)
    prod = vhdx.create(vms / "prod.vhdx", 8 * MiB, block_size=MiB)
    with vhdx.open(prod, "r+") as d:
        d.write_at(0, b"\x33" * MiB)
    evidence = vhdx.create(case / "evidence.avhdx", parent=prod, block_size=MiB)
    with vhdx.open(evidence, "r+") as d:
        d.write_at(0, b"\x66" * MiB)
        assert d.parent_locator["relative_path"].startswith("..\\..\\vms")
    before = digests(tmp_path)
    r = cli("merge", str(evidence))
    line = one_line_error(r, prod)
    assert "outside the folder" in line
    assert digests(tmp_path) == before
    # Services confine lookups: the parent is then not even found.
    with pytest.raises(vhdx.ParentNotFoundError, match="outside the confined"):
        vhdx.open(evidence, confine=[tmp_path / "incoming"])
    (case / "link.vhdx").symlink_to(prod)  # a symlink inside the tree leads outside: still refused
    with pytest.raises(vhdx.ParentNotFoundError):
        vhdx.open(evidence, confine=[tmp_path / "incoming"], search_dirs=[case])
    assert len(vhdx.open(evidence, confine=[tmp_path]).chain) == 2
    r = cli("merge", str(evidence), "--confine", str(tmp_path / "incoming"))
    one_line_error(r, str(evidence))
    r = cli("merge", str(evidence), "--into", prod)
    assert r.returncode == 0, r.stderr
    assert read_all(Path(prod))[:MiB] == b"\x66" * MiB


# --- locks that QEMU honours ------------------------------------------------------------------
def _qemu_io_holding(path: str, *extra: str) -> subprocess.Popen:
    """qemu-io with ``path`` open (read-write unless -r), kept open until stdin closes."""
    p = subprocess.Popen(["qemu-io", "-f", "vhdx", *extra, path], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    p.stdin.write("read 0 512\n")
    p.stdin.flush()
    line = ""
    deadline = time.monotonic() + 20
    while "bytes" not in line and time.monotonic() < deadline:
        line = p.stdout.readline()
        if not line and p.poll() is not None:
            raise AssertionError("qemu-io could not open the image")
    return p


def test_vhdx_refused_while_qemu_io_holds_the_image(tmp_path):
    if shutil.which("qemu-io") is None:
        pytest.skip("needs qemu-io")
    base = vhdx.create(tmp_path / "base.vhdx", 8 * MiB, block_size=MiB)
    child = vhdx.create(tmp_path / "child.avhdx", parent=base, block_size=MiB)
    with vhdx.open(child, "r+") as d:
        d.write_at(0, b"\x44" * MiB)
    before = digests(tmp_path)
    q = _qemu_io_holding(base)  # read-write, as a running VM holds its disk
    try:
        with pytest.raises(vhdx.LockedError, match="base.vhdx"):
            merge(child)
        r = cli("merge", str(child))
        assert "in use by another process" in one_line_error(r, base)
        with pytest.raises(vhdx.LockedError):
            vhdx.open(base)  # a reader: QEMU is writing it
        with vhdx.open(child, force_share=True) as d:  # as qemu-img -U
            assert d.read_at(0, MiB) == b"\x44" * MiB
        r = cli("info", str(base), "--force-share")
        assert r.returncode == 0, r.stderr
    finally:
        q.stdin.close()
        q.wait(timeout=20)
    assert digests(tmp_path) == before
    q = _qemu_io_holding(base, "-r")  # a read-only QEMU user: vhdx readers may share it
    try:
        assert read_all(Path(child))[:MiB] == b"\x44" * MiB
        with pytest.raises(vhdx.LockedError):
            merge(child)
    finally:
        q.stdin.close()
        q.wait(timeout=20)
    merge(child)
    assert read_all(Path(base))[:MiB] == b"\x44" * MiB


def test_qemu_refused_while_vhdx_holds_the_image(tmp_path):
    if shutil.which("qemu-io") is None or shutil.which("qemu-img") is None:
        pytest.skip("needs qemu-io and qemu-img")
    p = vhdx.create(tmp_path / "disk.vhdx", 8 * MiB, block_size=MiB)
    with vhdx.open(p, "r+") as d:
        d.write_at(0, b"\x55" * 4096)
        d.flush()
        r = subprocess.run(["qemu-io", "-f", "vhdx", "-c", "write -P 0x77 0 4096", p],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 and "lock" in (r.stdout + r.stderr).lower()
        r = subprocess.run(["qemu-img", "info", p], capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 and "lock" in r.stderr.lower()
        r = subprocess.run(["qemu-img", "info", "-U", p], capture_output=True, text=True, timeout=60)
        assert "lock" not in r.stderr.lower()  # -U passes our locks (it may still refuse a dirty log)
    with vhdx.open(p) as d:
        assert d.read_at(0, 4096) == b"\x55" * 4096  # QEMU's write never happened
        r = subprocess.run(["qemu-io", "-f", "vhdx", "-c", "write -P 0x77 0 4096", p],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 and "lock" in (r.stdout + r.stderr).lower()
        r = subprocess.run(["qemu-io", "-r", "-f", "vhdx", "-c", "read -P 0x55 0 4096", p],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout + r.stderr
        r = subprocess.run(["qemu-img", "info", p], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr  # readers share


# --- bounded replay ---------------------------------------------------------------------------
def _dirty_with_zero_descriptor(path: str, zero_off: int, zero_len: int, lfo: int | None = None) -> None:
    """A crash image: a CRC-valid log entry (the project's own log declarations)
    with one zero descriptor, never applied."""
    from vhdx.log_writer import LogWriter, build_log_entry
    from vhdx.storage import FileStorage

    st = FileStorage.open(path, writable=True)
    try:
        lw = LogWriter(st)
        lw.begin()  # LogGuid set, empty entry at log offset 0
        size = st.size()
        entry = build_log_entry(sequence=lw._seq + 1, tail=S.LOG_SECTOR_SIZE, log_guid=lw.log_guid,
                                flushed_file_offset=size // MiB * MiB,
                                last_file_offset=lfo if lfo is not None else -(-size // MiB) * MiB,
                                zeros=[(zero_off, zero_len)])
        lw._write_ring(S.LOG_SECTOR_SIZE, entry)
        st.flush()
    finally:
        st.close()  # no close of the log: LogGuid stays set, as after a crash


@pytest.mark.parametrize("lfo", [None, (1 << 48) - MiB])
def test_a_2_48_byte_zero_descriptor_is_reported_not_applied(tmp_path, lfo):
    p = vhdx.create(tmp_path / "z.vhdx", 16 * MiB, block_size=MiB)
    with vhdx.open(p, "r+") as d:
        d.write_at(0, b"\x99" * (16 * MiB))
    _dirty_with_zero_descriptor(p, 4 * MiB, (1 << 48) - 4 * MiB, lfo)
    size, before = os.path.getsize(p), sha(Path(p))
    for mode in ("r", "r+"):
        t0 = time.monotonic()
        with pytest.raises(vhdx.CorruptImageError, match="LastFileOffset|absurd"):
            vhdx.open(p, mode)
        assert time.monotonic() - t0 < 2  # reported, not 256 TiB of zeros
    r = cli("check", "--repair", p)
    assert r.returncode != 0 and "LastFileOffset" in r.stdout + r.stderr
    assert os.path.getsize(p) == size and sha(Path(p)) == before


def test_an_in_bounds_zero_descriptor_is_applied_inside_the_file_only(tmp_path):
    p = vhdx.create(tmp_path / "z.vhdx", 16 * MiB, block_size=MiB)
    with vhdx.open(p, "r+") as d:
        d.write_at(0, b"\x99" * (16 * MiB))
        foff = d.image.bat[d.image.geometry.payload_index(3)] & S.BAT_OFFSET_MASK
    size = os.path.getsize(p)
    # Zero one payload block and a range past EOF that LastFileOffset allows.
    end = -(-size // MiB) * MiB + 8 * MiB
    _dirty_with_zero_descriptor(p, foff, end - foff, lfo=end)
    with vhdx.open(p) as d:
        assert d.read_at(3 * MiB, MiB) == bytes(MiB)  # replayed in memory
    r = cli("check", "--repair", p)
    assert "replayed 1 log entr" in r.stdout, r.stdout + r.stderr
    with open(p, "rb") as f:
        f.seek(foff)
        assert f.read(MiB) == bytes(MiB)
    assert os.path.getsize(p) == end  # extended to LastFileOffset (FORMAT.md §6.4 step 8)
    assert os.stat(p).st_blocks * 512 <= size + MiB  # the tail past the old EOF stays a hole


def test_check_repair_of_a_clean_image_opens_nothing_for_writing(tmp_path, monkeypatch):
    p = vhdx.create(tmp_path / "c.vhdx", 8 * MiB)
    from vhdx import cli as C
    from vhdx.storage import FileStorage

    real = FileStorage.open.__func__
    modes = []

    def spy(cls, path, writable=True):  # noqa: ANN001, ANN202
        modes.append(writable)
        return real(cls, path, writable)

    monkeypatch.setattr(FileStorage, "open", classmethod(spy))
    monkeypatch.setattr(C, "_COMMAND_MODULES", ())  # only the built-in commands in-process
    assert C.main(["check", "--repair", p]) == 0
    assert modes and not any(modes)
    if os.geteuid() == 0 and shutil.which("chattr") and _chattr("+i", Path(p)):
        try:  # an immutable file cannot be opened for writing at all, even by root
            monkeypatch.undo()
            r = cli("check", "--repair", p)
            assert r.returncode == 0 and "clean" in r.stdout, r.stderr
        finally:
            _chattr("-i", Path(p))


def test_check_reports_an_interrupted_merge_and_how_to_finish_it(tmp_path):
    chain, gcs, views = family(tmp_path, grandchildren=0, size=16 * MiB)
    import vhdx.merge_engine as M

    saved = M.CHUNK_BYTES
    M.CHUNK_BYTES = MiB
    try:
        with pytest.raises(vhdx.CancelledError):
            merge(chain.top, progress=lambda done, total: False)
    finally:
        M.CHUNK_BYTES = saved
    r = cli("check", str(chain.top))
    assert "an interrupted merge" in r.stdout and f"vhdx merge {chain.top}" in r.stdout, r.stdout
    assert "--repair` applies" not in r.stdout
    merge(chain.top)
    assert read_all(chain.images[1].path) == chain.expected()
    assert "interrupted" not in cli("check", str(chain.images[1].path)).stdout


# --- disk full and I/O errors ------------------------------------------------------------------
@pytest.fixture
def small_fs(tmp_path):
    """A 64 MiB tmpfs under tmp_path (root only), unmounted afterwards."""
    _root_with("mount")
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _fill_chain(d: Path):  # noqa: ANN202
    """base (4 MiB of data) <- child (12 MiB of data where the base has none)."""
    specs = [ImageSpec(virtual_size=24 * MiB, name="base", seed=1, blocks={b: Block(FULLY) for b in range(4)}),
             ImageSpec(virtual_size=24 * MiB, name="child", seed=2,
                       blocks={b: Block(FULLY if b % 3 else PARTIAL) for b in range(4, 16)})]
    return build_chain(d, specs)


def _leave_free(mnt: Path, free: int) -> None:
    filler = mnt / "filler"
    filler.unlink(missing_ok=True)
    with open(filler, "wb") as f:
        f.write(b"\xff" * max(0, _free(mnt) - free))


@pytest.mark.parametrize("precheck", [True, False])
def test_disk_full_merge_refused_up_front_or_rolled_back(small_fs, precheck, monkeypatch):
    chain = _fill_chain(small_fs)
    expected = chain.expected()
    base = chain.images[1].path
    if not precheck:  # what the check protects against: the write path's own rollback
        import vhdx.preflight as P

        monkeypatch.setattr(P, "check_space", lambda *a, **k: None)
    outcomes = set()
    for free_mib in (1, 3, 6, 9):
        _leave_free(small_fs, free_mib * MiB)
        before, free_before = digests(small_fs), _free(small_fs)
        with pytest.raises((vhdx.InsufficientSpaceError, vhdx.OperationFailedError)) as e:
            merge(chain.top)
        outcomes.add(type(e.value).__name__)
        msg = str(e.value)
        assert str(base) in msg and "\n" not in msg
        if precheck:
            assert isinstance(e.value, vhdx.InsufficientSpaceError) and "nothing was changed" in msg
            assert digests(small_fs) == before
        else:
            assert "No space left" in msg and f"vhdx merge {chain.top}" in msg
        assert read_all(chain.top) == expected  # the chain reads as before
        assert os.path.getsize(base) <= chain.images[1].plan.file_size + 4 * MiB
        # Back to what it was, but for the log pages the two sessions wrote (4 KiB each).
        assert _free(small_fs) >= free_before - 256 * 1024
        assert not check_chain(chain.top).errors
        assert sorted(p.name for p in small_fs.iterdir()) == ["base.vhdx", "child.avhdx", "filler"]
    assert outcomes == {"InsufficientSpaceError" if precheck else "OperationFailedError"}
    (small_fs / "filler").unlink()
    merge(chain.top)  # with room again, the same merge completes
    assert read_all(base) == expected


@pytest.mark.parametrize("precheck", [True, False])
def test_disk_full_flatten_leaves_no_partial_output(small_fs, precheck, monkeypatch):
    chain = _fill_chain(small_fs)
    expected = chain.expected()
    if not precheck:
        import vhdx.preflight as P

        monkeypatch.setattr(P, "check_space", lambda *a, **k: None)
    for free_mib in (2, 8, 14):
        _leave_free(small_fs, free_mib * MiB)
        before, free_before = digests(small_fs), _free(small_fs)
        out = small_fs / "flat.vhdx"
        with pytest.raises((vhdx.InsufficientSpaceError, vhdx.OperationFailedError)) as e:
            merge(chain.top, output=out)
        assert str(out) in str(e.value)
        assert not out.exists() and not Path(str(out) + ".part").exists()
        assert digests(small_fs) == before
        assert _free(small_fs) == free_before
    (small_fs / "filler").unlink()
    merge(chain.top, output=small_fs / "flat.vhdx")
    assert read_all(small_fs / "flat.vhdx") == expected


_EIO_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <fcntl.h>
#include <sys/types.h>

/* Fails writes into the file named by $EIO_PATH that reach past $EIO_OFFSET. */
static int hit(int fd, long long off, long long n) {
    const char *want = getenv("EIO_PATH");
    char link[64], path[4096];
    if (!want || off + n <= atoll(getenv("EIO_OFFSET"))) return 0;
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t k = readlink(link, path, sizeof path - 1);
    if (k < 0) return 0;
    path[k] = 0;
    return strcmp(path, want) == 0;
}
#define NEXT(name) static __typeof__(name) *real; if (!real) real = dlsym(RTLD_NEXT, #name)
ssize_t pwrite64(int fd, const void *b, size_t n, off_t off) {
    NEXT(pwrite64); if (hit(fd, off, n)) { errno = EIO; return -1; } return real(fd, b, n, off);
}
ssize_t pwrite(int fd, const void *b, size_t n, off_t off) {
    NEXT(pwrite); if (hit(fd, off, n)) { errno = EIO; return -1; } return real(fd, b, n, off);
}
ssize_t copy_file_range(int in, off_t *oin, int out, off_t *oout, size_t n, unsigned f) {
    NEXT(copy_file_range);
    if (oout && hit(out, *oout, n)) { errno = EIO; return -1; }
    return real(in, oin, out, oout, n, f);
}
int fallocate64(int fd, int mode, off_t off, off_t n) {
    NEXT(fallocate64); if (hit(fd, off, n)) { errno = EIO; return -1; } return real(fd, mode, off, n);
}
int fallocate(int fd, int mode, off_t off, off_t n) {
    NEXT(fallocate); if (hit(fd, off, n)) { errno = EIO; return -1; } return real(fd, mode, off, n);
}
"""


@pytest.fixture(scope="module")
def eio_shim(tmp_path_factory):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or sys.platform != "linux":
        pytest.skip("needs a C compiler on Linux")
    d = tmp_path_factory.mktemp("shim")
    (d / "eio.c").write_text(_EIO_SHIM)
    r = subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", str(d / "eio.so"), str(d / "eio.c"), "-ldl"],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot build the EIO shim: {r.stderr[:200]}")
    return d / "eio.so"


def test_eio_mid_merge_one_line_naming_the_file_chain_intact(tmp_path, eio_shim):
    base_plan_end = None
    for n, frac in enumerate((0.0, 0.35, 0.7)):
        d = tmp_path / f"e{n}"
        d.mkdir()
        chain = _fill_chain(d)
        expected = chain.expected()
        base = chain.images[1].path
        base_plan_end = chain.images[1].plan.file_size
        # Past the base's initial layout: the payload the merge writes into new blocks.
        offset = base_plan_end + int(frac * 12 * MiB)
        env = dict(os.environ, LD_PRELOAD=str(eio_shim), EIO_PATH=str(base), EIO_OFFSET=str(offset))
        r = cli("merge", str(chain.top), env=env)
        line = one_line_error(r, str(base))
        assert "Input/output error" in line and f"vhdx merge {chain.top}" in line
        assert "Traceback" not in r.stderr
        assert read_all(chain.top) == expected
        assert not check_chain(chain.top).errors
        r = cli("merge", str(chain.top))  # the fault gone, the same merge completes
        assert r.returncode == 0, r.stderr
        assert read_all(base) == expected


def test_fixed_disks_are_allocated_and_refused_without_room(small_fs):
    p = vhdx.create(small_fs / "f.vhdx", 16 * MiB, type="fixed")
    assert os.stat(p).st_blocks * 512 >= os.path.getsize(p)  # really allocated, not sparse
    free = _free(small_fs)
    with pytest.raises(vhdx.InsufficientSpaceError, match="big.vhdx"):
        vhdx.create(small_fs / "big.vhdx", 128 * MiB, type="fixed")
    assert not (small_fs / "big.vhdx").exists() and _free(small_fs) == free
    with vhdx.open(p) as d:
        assert d.read_at(0, MiB) == bytes(MiB)


def test_check_honours_force_share_and_confine(tmp_path):
    if shutil.which("qemu-io") is None:
        pytest.skip("needs qemu-io")
    p = vhdx.create(tmp_path / "vm.vhdx", 8 * MiB)
    q = _qemu_io_holding(p)
    try:
        assert "in use by another process" in cli("check", p).stdout
        r = cli("check", p, "--force-share")
        assert r.returncode == 0 and "clean" in r.stdout, r.stdout + r.stderr
        one_line_error(cli("check", p, "--repair", "--force-share"), p)
    finally:
        q.stdin.close()
        q.wait(timeout=20)
    (tmp_path / "sub").mkdir()
    child = vhdx.create(tmp_path / "sub" / "c.avhdx", parent=p)
    r = cli("check", child, "--confine", str(tmp_path / "sub"))
    assert r.returncode != 0 and "outside the confined" in r.stdout
    assert cli("check", child, "--confine", str(tmp_path)).returncode == 0


def test_kill_9_at_random_instants_of_a_merge_with_grandchildren(tmp_path):
    """kill -9 of `vhdx merge` anywhere, re-pointing included: the grandchildren read
    as before, and rerunning the merge without --force completes it."""
    import signal

    rng = random.Random(77)
    durations: list[float] = []
    interrupted = 0
    for i in range(6):
        d = tmp_path / f"k{i}"
        d.mkdir()
        chain, gcs, views = family(d, size=24 * MiB, grandchildren=3, seed=i)
        t0 = time.monotonic()
        proc = subprocess.Popen([*VHDX_CMD, "merge", str(chain.top)], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if i < 2:  # two whole runs measure a warm merge (start-up included)
            proc.wait()
            durations.append(time.monotonic() - t0)
        else:  # any instant of the run; the re-point phase is its end
            time.sleep(rng.uniform(0.3, 0.95) * min(durations))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        if chain.top.exists():
            interrupted += 1
            for g, view in zip(gcs, views):
                assert read_all(g.path) == view
            r = cli("merge", str(chain.top))
            assert r.returncode == 0, r.stderr
            assert "invalid" not in r.stdout
        assert_family_merged(chain, gcs, views)
    assert interrupted >= 2


def test_writes_look_for_children_beside_every_file_of_the_chain(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    base = vhdx.create(tmp_path / "a" / "base.vhdx", 8 * MiB)
    mid = vhdx.create(tmp_path / "b" / "mid.avhdx", parent=base)
    other = vhdx.create(tmp_path / "a" / "other.avhdx", parent=mid)  # beside the base only
    before = digests(tmp_path)
    with pytest.raises(vhdx.DependentDisksError, match="other.avhdx"):
        vhdx.open(mid, "r+")
    assert digests(tmp_path) == before
    with vhdx.open(other, "r+") as d:  # a leaf: no children, writes allowed
        d.write_at(0, b"\x01" * 512)


def test_dry_run_lists_what_it_would_repoint_and_delete(tmp_path):
    chain, gcs, views = family(tmp_path, grandchildren=2)
    before = digests(tmp_path)
    r = cli("merge", str(chain.top), "--dry-run")
    assert r.returncode == 0, r.stderr
    for g in gcs:
        assert f"would re-point {g.path}" in r.stdout
    assert f"would delete {chain.top}" in r.stdout
    assert digests(tmp_path) == before
