"""Safety of the commands around the core (issue 13): targets by kind, planted
symlinks, one-line errors with qemu-img's exit codes, warnings that travel,
the error hierarchy of the public API, interruption, --help.

Ground truth is ``tests/builder.py`` (an independent writer with its own
expected bytes); every check that an input is unchanged hashes it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
import shutil
import signal
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

import vhdx
from vhdx import errors as E
from vhdx import structures as S

from builder import FULLY, PARTIAL, ZERO, Block, ImageSpec, build_chain, build_image

MiB = S.MiB
REPO = Path(__file__).resolve().parent.parent


def run(*args: object, rc: int | None = 0, timeout: float = 120, **kw) -> subprocess.CompletedProcess:  # noqa: ANN003
    p = subprocess.run([sys.executable, "-m", "vhdx", *map(str, args)], cwd=REPO,
                       capture_output=True, timeout=timeout, **kw)
    if rc is not None:
        assert p.returncode == rc, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
    return p


def run_in_process(*args: object) -> subprocess.CompletedProcess:
    """``vhdx.cli.main(args)`` with stdout/stderr captured: what a subprocess would
    see, at a fraction of the start-up cost (for long tables of cases)."""
    import contextlib
    import io

    from vhdx import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main([str(a) for a in args])
        except SystemExit as e:  # argparse: --help, usage errors
            code = e.code if isinstance(e.code, int) else 1
    return subprocess.CompletedProcess(list(args), code, out.getvalue().encode(), err.getvalue().encode())


def sha(path: object) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:  # type: ignore[arg-type]
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def one_error_line(p: subprocess.CompletedProcess, name: object, warnings: bool = False) -> str:
    """stderr is exactly one line, an error naming ``name``, no traceback (with
    ``warnings``, after the open-time warning lines)."""
    err = p.stderr.decode()
    if warnings:
        lines = err.splitlines(keepends=True)
        assert all(w.startswith("vhdx: warning: ") for w in lines[:-1]), err
        err = lines[-1]
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith("vhdx: error: ") and "Traceback" not in err, err
    assert str(name) in err, (name, err)
    return err


@pytest.fixture
def chain(tmp_path):  # noqa: ANN001, ANN201
    specs = [ImageSpec(virtual_size=6 * MiB, block_size=1 * MiB, name="base", seed=11,
                       blocks={0: Block(FULLY), 3: Block(FULLY), 5: Block(ZERO)}),
             ImageSpec(virtual_size=6 * MiB, block_size=1 * MiB, name="child", seed=12,
                       blocks={0: Block(PARTIAL), 1: Block(FULLY), 3: Block(ZERO)})]
    return build_chain(tmp_path, specs)


# --- loop devices --------------------------------------------------------------------
def _can_loop() -> bool:
    return (os.geteuid() == 0 and shutil.which("losetup") is not None
            and os.path.exists("/dev/loop-control"))


@pytest.fixture
def loopdev(tmp_path):  # noqa: ANN001, ANN201
    """A factory: loopdev(size, fill) -> /dev/loopN over a file of ``size`` bytes
    filled with ``fill`` (a bytes pattern); detached in teardown."""
    if not _can_loop():
        pytest.skip("needs root, losetup and /dev/loop-control")
    made: list[str] = []

    def make(size: int, fill: bytes = b"\xa5") -> str:
        backing = tmp_path / f"loop{len(made)}.img"
        with open(backing, "wb") as fh:
            fh.write((fill * (size // len(fill) + 1))[:size])
        p = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True)
        if p.returncode != 0:
            pytest.skip(f"losetup failed: {p.stderr.strip()}")
        dev = p.stdout.strip()
        made.append(dev)
        return dev

    yield make
    for dev in made:
        subprocess.run(["losetup", "-d", dev], capture_output=True)


def _read_dev(dev: str, n: int) -> bytes:
    fd = os.open(dev, os.O_RDONLY)
    try:
        out = bytearray()
        while len(out) < n:
            chunk = os.pread(fd, n - len(out), len(out))
            if not chunk:
                break
            out += chunk
        return bytes(out)
    finally:
        os.close(fd)


# --- 1. targets by kind ---------------------------------------------------------------
def test_convert_to_regular_file_new_and_forced(chain, tmp_path):
    want = chain.expected()
    before = [sha(p) for p in chain.paths]
    out = tmp_path / "out.raw"
    run("convert", chain.top, out)
    assert out.read_bytes() == want
    out.write_bytes(b"old")
    one_error_line(run("convert", chain.top, out, rc=1), out)  # exists: refused
    assert out.read_bytes() == b"old"
    run("convert", chain.top, out, "--force")
    assert out.read_bytes() == want
    assert [sha(p) for p in chain.paths] == before
    assert not list(tmp_path.glob("*.part"))


@pytest.mark.parametrize("kind", ["chardev", "fifo", "directory", "socket"])
def test_convert_refuses_special_targets_and_they_survive(chain, tmp_path, kind):
    import socket

    target = tmp_path / f"target-{kind}"
    sock = None
    if kind == "chardev":
        if os.geteuid() != 0:
            pytest.skip("mknod of a character device needs root")
        os.mknod(target, stat.S_IFCHR | 0o600, os.makedev(1, 3))  # what /dev/null is
    elif kind == "fifo":
        os.mkfifo(target)
    elif kind == "directory":
        target.mkdir()
    else:
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(target))
    mode = os.lstat(target).st_mode
    try:
        for fmt in ("raw", "vhdx", "vhd"):
            for force in ((), ("--force",)):
                p = run("convert", chain.top, target, "--format", fmt, *force, rc=1, timeout=30)
                err = one_error_line(p, target)
                assert "regular file" in err
                assert os.lstat(target).st_mode == mode  # the node survives, same kind
    finally:
        if sock is not None:
            sock.close()
    assert not list(tmp_path.glob("*.part"))


def test_convert_writes_a_block_device_in_place(chain, tmp_path, loopdev):
    want = chain.expected()
    dev = loopdev(8 * MiB, b"\xa5\x5a")  # larger than the disk, full of old bytes
    st = os.stat(dev)
    one_error_line(run("convert", chain.top, dev, rc=1), dev)  # needs --force
    assert _read_dev(dev, 8 * MiB)[:16] == b"\xa5\x5a" * 8
    run("convert", chain.top, dev, "--force")
    got = _read_dev(dev, 8 * MiB)
    assert got[:len(want)] == want  # holes of the chain read zeros, not the old bytes
    assert got[len(want):] == (b"\xa5\x5a" * (MiB))[:8 * MiB - len(want)]  # past the disk: untouched
    st2 = os.stat(dev)
    assert stat.S_ISBLK(st2.st_mode) and st2.st_rdev == st.st_rdev  # still the device node
    # VHDX onto a device is refused (a VHDX file grows; a device does not).
    one_error_line(run("convert", chain.top, dev, "--format", "vhdx", "--force", rc=1), dev)
    one_error_line(run("convert", chain.top, dev, "--format", "vhd", "--force", rc=1), dev)  # so is VHD
    assert stat.S_ISBLK(os.stat(dev).st_mode)
    assert _read_dev(dev, 8 * MiB)[:len(want)] == want  # neither refusal wrote a byte


def test_convert_refuses_a_too_small_block_device_without_writing(chain, loopdev):
    dev = loopdev(4 * MiB)  # the disk is 6 MiB
    before = hashlib.sha256(_read_dev(dev, 4 * MiB)).hexdigest()
    err = one_error_line(run("convert", chain.top, dev, "--force", rc=1), dev)
    assert "4194304" in err and "6291456" in err
    assert hashlib.sha256(_read_dev(dev, 4 * MiB)).hexdigest() == before


def test_p2v_from_a_block_device(tmp_path, loopdev):
    import random

    rng = random.Random(5)
    dev = loopdev(6 * MiB, b"\0")
    data = bytearray(6 * MiB)
    for off in (0, 2 * MiB + 4096, 5 * MiB):
        data[off:off + 300000] = rng.randbytes(300000)
    fd = os.open(dev, os.O_WRONLY)
    try:
        os.pwrite(fd, bytes(data), 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    out = tmp_path / "p2v.vhdx"
    run("convert", dev, out)
    with vhdx.open(out) as d:
        assert d.size == 6 * MiB  # from the device, not st_size (0)
        assert d.read_at(0, d.size) == bytes(data)
    raw = tmp_path / "p2v.raw"
    run("convert", dev, raw)
    assert raw.read_bytes() == bytes(data)
    for kind in ("fixed", "dynamic"):
        vhd = tmp_path / f"p2v-{kind}.vhd"
        run("convert", dev, vhd, "--type", kind)
        with vhdx.open(vhd) as d:
            assert d.size == 6 * MiB and d.read_at(0, d.size) == bytes(data)
        if kind == "fixed":  # the device's all-zero MiBs stay holes (3 of its 6 hold data)
            assert os.stat(vhd).st_blocks * 512 <= 4 * MiB
    assert stat.S_ISBLK(os.stat(dev).st_mode)


# --- planted temp names (CWE-59) ----------------------------------------------------------
def _plant(folder: Path, out_name: str, victim: Path) -> list[Path]:
    links = [folder / f"{out_name}.part", folder / f".{out_name}.part"]
    for link in links:
        link.symlink_to(victim)
    return links


@pytest.mark.parametrize("victim_kind", ["file", "parent"])
@pytest.mark.parametrize("how", ["convert-raw", "convert-vhdx", "convert-vhd", "convert-fixed-vhd", "flatten"])
def test_planted_part_symlinks_are_never_written_through(chain, tmp_path, victim_kind, how):
    if victim_kind == "file":
        victim = tmp_path / "victim.bin"
        victim.write_bytes(b"precious" * 1000)
    else:
        victim = chain.parents[0]  # the chain's own parent
    before = [sha(victim)] + [sha(p) for p in chain.paths]
    name = {"convert-raw": "o.raw", "convert-vhdx": "o.vhdx", "convert-vhd": "o.vhd",
            "convert-fixed-vhd": "o.vhd", "flatten": "o.vhdx"}[how]
    links = _plant(tmp_path, name, victim)
    if how == "flatten":
        run("merge", chain.top, "--output", tmp_path / name)
    elif how == "convert-fixed-vhd":
        run("convert", chain.top, tmp_path / name, "--type", "fixed")
    else:
        run("convert", chain.top, tmp_path / name)
    assert [sha(victim)] + [sha(p) for p in chain.paths] == before
    assert all(link.is_symlink() for link in links)
    if how == "convert-raw":
        assert (tmp_path / name).read_bytes() == chain.expected()
    else:
        with vhdx.open(tmp_path / name) as d:
            assert d.read_at(0, d.size) == chain.expected()


def test_create_never_follows_a_planted_output_symlink(chain, tmp_path):
    victim = chain.parents[0]
    before = sha(victim)
    link = tmp_path / "new.vhdx"
    link.symlink_to(victim)
    one_error_line(run("create", link, "--size", "8M", rc=1), link)
    dangling = tmp_path / "dangling.vhdx"
    dangling.symlink_to(tmp_path / "nowhere.vhdx")
    one_error_line(run("create", dangling, "--size", "8M", rc=1), dangling)
    assert not (tmp_path / "nowhere.vhdx").exists()
    assert sha(victim) == before and link.is_symlink()


def test_create_temp_skips_a_planted_exact_name(tmp_path, monkeypatch):
    """Even a symlink planted under the very name chosen is not opened."""
    from vhdx import fileio

    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    names = iter(["aaaa", "bbbb"])
    monkeypatch.setattr(fileio.secrets, "token_hex", lambda n: next(names))
    (tmp_path / ".out.raw.aaaa.part").symlink_to(victim)
    fd, tmp = fileio.create_temp(tmp_path / "out.raw")
    try:
        os.write(fd, b"new")
    finally:
        os.close(fd)
    assert tmp.endswith(".out.raw.bbbb.part") and victim.read_bytes() == b"keep"


# --- 7. output formats ---------------------------------------------------------------------
def test_convert_format_from_name_or_option(chain, tmp_path):
    want = chain.expected()
    for name in ("a.img", "a.bin"):
        run("convert", chain.top, tmp_path / name)
        assert (tmp_path / name).read_bytes() == want
    run("convert", chain.top, tmp_path / "noext", "--format", "raw")
    assert (tmp_path / "noext2").exists() is False and (tmp_path / "noext").read_bytes() == want
    run("convert", chain.top, tmp_path / "x.avhdx")
    with vhdx.open(tmp_path / "x.avhdx") as d:
        assert d.read_at(0, d.size) == want and len(d.chain) == 1
    err = one_error_line(run("convert", chain.top, tmp_path / "vm.qcow2", rc=2), "vm.qcow2")
    assert "vhdx serve" in err and "qemu-img convert" in err
    one_error_line(run("convert", chain.top, tmp_path / "vm.weird", rc=2), "vm.weird")
    one_error_line(run("convert", chain.top, tmp_path / "noext2", rc=2), "noext2")
    assert not (tmp_path / "vm.qcow2").exists() and not (tmp_path / "noext2").exists()


def test_convert_dash_streams_raw_to_stdout(chain, tmp_path):
    before = [sha(p) for p in chain.paths]
    p = run("convert", chain.top, "-")
    assert p.stdout == chain.expected() and p.stderr == b""
    assert not (REPO / "-").exists() and not (tmp_path / "-").exists()
    assert [sha(p) for p in chain.paths] == before


def test_vhd_output_is_one_line_until_supported(chain, tmp_path):
    from vhdx.cli import _own_module

    if _own_module("vhdx.vhd"):
        pytest.skip("this build has a VHD package; its own tests cover VHD output")
    one_error_line(run("convert", chain.top, tmp_path / "a.vhd", rc=1), "a.vhd")
    assert not (tmp_path / "a.vhd").exists()


# --- 3. warnings travel ------------------------------------------------------------------
@pytest.fixture
def truncated(tmp_path):  # noqa: ANN001, ANN201
    """A base whose last allocated block is cut short by 64 KiB (reads zeros there)."""
    img = build_image(tmp_path, ImageSpec(virtual_size=4 * MiB, block_size=1 * MiB, name="trunc", seed=7,
                                          blocks={0: Block(FULLY), 2: Block(FULLY)}))
    last = max(v & S.BAT_OFFSET_MASK for v in img.bat.values())  # the last block's offset
    assert os.path.getsize(img.path) >= last + MiB
    os.truncate(img.path, last + MiB - 65536)
    return img.path


def test_hash_map_convert_warn_about_missing_bytes(truncated, tmp_path):
    before = sha(truncated)
    p = run("hash", truncated)
    err = p.stderr.decode()
    assert "past the end" in err and "truncated" in err and err.startswith("vhdx: warning: ")
    one_error_line(run("hash", truncated, "--strict", rc=1), truncated, warnings=True)
    assert p.stdout.decode().split()[0] == hashlib.sha256(vhdx.open(truncated).read_at(0, 4 * MiB)).hexdigest()
    p = run("map", truncated, "--json")
    assert "past the end" in p.stderr.decode()
    assert any("past the end" in w for w in json.loads(p.stdout)["warnings"])
    assert any("past the end" in w for w in json.loads(run("info", truncated, "--json").stdout)["warnings"])
    for out in ("t.raw", "t.vhd"):
        p = run("convert", truncated, tmp_path / out)
        assert "past the end" in p.stderr.decode()
    assert sha(truncated) == before


def test_ignore_linkage_warning_travels(tmp_path):
    base = build_image(tmp_path, ImageSpec(virtual_size=4 * MiB, name="b", seed=1, blocks={0: Block(FULLY)}))
    child = build_image(tmp_path, ImageSpec(virtual_size=4 * MiB, name="c", suffix=".avhdx", seed=2,
                                            parent_linkage=uuid.UUID(int=99),
                                            blocks={1: Block(FULLY)}), parent=base)
    one_error_line(run("hash", child.path, rc=1), child.path)
    for cmd in (("hash",), ("map",), ("convert", tmp_path / "o.raw")):
        p = run(*cmd[:1], child.path, *cmd[1:], "--ignore-linkage")
        assert "linkage" in p.stderr.decode() and "vhdx: warning: " in p.stderr.decode(), cmd
    p = run("map", child.path, "--ignore-linkage", "--json")
    assert any("linkage" in w for w in json.loads(p.stdout)["warnings"])
    one_error_line(run("hash", child.path, "--ignore-linkage", "--strict", rc=1), child.path, warnings=True)


# --- 8. exit codes and one-line errors, table-driven ----------------------------------------
def _error_table(tmp: Path, top: Path, base: Path) -> list[tuple[list, int, str]]:
    (tmp / "text.vhdx").write_text("not a disk\n")
    (tmp / "exists.vhdx").write_bytes(b"x")
    (tmp / "adir").mkdir()
    os.mkfifo(tmp / "fifo.vhdx")
    m = str(tmp / "missing.vhdx")
    return [
        (["info", m], 1, m),
        (["map", m], 1, m),
        (["hash", m], 1, m),
        (["check", m], 1, m),
        (["merge", m], 1, m),
        (["resize", m, "--size", "8M"], 1, m),
        (["convert", m, tmp / "o.raw"], 1, m),
        (["info", tmp / "text.vhdx"], 1, "text.vhdx"),
        (["merge", "/etc/passwd"], 1, "/etc/passwd"),
        (["info", tmp / "adir"], 1, "adir"),
        (["info", tmp / "fifo.vhdx"], 1, "fifo.vhdx"),
        (["convert", tmp / "fifo.vhdx", tmp / "o.raw"], 1, "fifo.vhdx"),
        (["info", top, "--parent", m], 1, m),
        (["merge", base], 1, str(base)),                                 # no parent to merge into
        (["merge", top, "--output", tmp / "exists.vhdx"], 1, "exists.vhdx"),
        (["merge", top, "--output", tmp / "nodir" / "x.vhdx"], 1, "x.vhdx"),
        (["merge", top, "--into", base, "--output", tmp / "y.vhdx"], 2, str(top)),
        (["convert", top, tmp / "exists.vhdx"], 1, "exists.vhdx"),
        (["convert", top, tmp / "adir", "--format", "raw"], 1, "adir"),
        (["convert", top, tmp / "nodir" / "o.raw"], 1, "o.raw"),
        (["convert", top, tmp / "o.raw", "--type", "fixed"], 2, "o.raw"),
        (["convert", top, tmp / "o.qcow2"], 2, "o.qcow2"),
        (["convert", top, "-", "--format", "vhdx"], 2, "-: only raw"),
        (["convert", top, tmp / "o.vhdx", "--block-size", "3M"], 1, "o.vhdx"),
        (["convert", top, tmp / "o.raw", "--block-size", "zz"], 2, "--block-size"),
        (["create", tmp / "exists.vhdx", "--size", "8M"], 1, "exists.vhdx"),
        (["create", tmp / "nodir" / "n.vhdx", "--size", "8M"], 1, "n.vhdx"),
        (["create", tmp / "n.vhdx"], 2, "n.vhdx"),
        (["create", tmp / "n.vhdx", "--size", "0"], 2, "--size"),
        (["create", tmp / "n.vhdx", "--size", "12Q"], 2, "--size"),
        (["create", tmp / "n.vhdx", "--size", "65T"], 1, "n.vhdx"),
        (["create", tmp / "n.vhdx", "--size", "8M", "--block-size", "3M"], 1, "n.vhdx"),
        (["create", tmp / "n.vhdx", "--parent", m], 1, m),
        (["create", tmp / "n.vhdx", "--parent", base, "--size", "1G"], 2, "n.vhdx"),
        (["create", tmp / "n.vhdx", "--size", "1000"], 1, "n.vhdx"),    # not a sector multiple
        (["check", top, "--dry-run"], 2, str(top)),
        (["resize", base, "--size", "100T"], 1, str(base)),
        (["resize", base], 2, "--size"),
        (["nosuchcommand"], 2, "nosuchcommand"),
        (["info"], 2, "image"),
        (["hash", top, "--algorithm", "crc"], 2, "--algorithm"),
    ]


def test_every_cli_error_is_one_line_with_the_right_code(chain, tmp_path):
    work = tmp_path / "w"
    work.mkdir()
    before = [sha(p) for p in chain.paths]
    for args, code, name in _error_table(work, chain.top, chain.parents[0]):
        p = run_in_process(*args)
        assert p.returncode == code, (args, p.returncode, p.stderr)
        one_error_line(p, name)
        assert p.stdout == b"", (args, p.stdout)
    assert [sha(p) for p in chain.paths] == before
    assert not (work / "n.vhdx").exists() and not (work / "o.raw").exists()
    assert not list(work.glob("*.part")) and not (work / "nodir").exists()


def test_messages_use_option_names_not_python_names(tmp_path):
    p = run("create", tmp_path / "n.vhdx", "--size", "8M", "--block-size", "512M", rc=1)
    err = one_error_line(p, "n.vhdx")
    assert "block_size" not in err and "--block-size" in err
    p = run("create", tmp_path / "m.vhdx", "--size", "100T", rc=1)
    err = one_error_line(p, "m.vhdx")
    assert "virtual_size" not in err and "--size" in err


def test_check_exit_codes_follow_qemu_img(chain):
    from builder import poke

    run("check", chain.top, rc=0)
    base = chain.images[1]
    # An invalid header copy: a warning only (the other copy is used).
    poke(base.path, S.HEADER_OFFSETS[1] + 100, b"\xff")
    assert "warning" in run("check", base.path, rc=3).stdout.decode()
    # Two blocks pointing at one offset: corruption.
    geo = base.plan.geometry
    e0 = base.bat[geo.payload_index(0)]
    poke(base.path, base.plan.bat_offset + 8 * geo.payload_index(3), e0.to_bytes(8, "little"))
    assert "error" in run("check", base.path, rc=2).stdout.decode()
    assert "3 only" in run("check", "--help").stdout.decode().replace("\n", " ").replace("  ", " ") or \
        "3 only warnings" in " ".join(run("check", "--help").stdout.decode().split())


# --- 9. the public API's error hierarchy ---------------------------------------------------
def test_api_errors_are_vhdx_errors_with_stdlib_bases(chain, tmp_path):
    with pytest.raises(E.ImageNotFoundError) as ei:
        vhdx.open(tmp_path / "missing.vhdx")
    assert isinstance(ei.value, FileNotFoundError) and isinstance(ei.value, E.VhdxError)
    assert ei.value.errno == 2 and ei.value.filename == str(tmp_path / "missing.vhdx")
    with pytest.raises(E.OutputDirectoryError) as ei:
        vhdx.merge(chain.top, output=tmp_path / "nodir" / "x.vhdx")
    assert isinstance(ei.value, FileNotFoundError)
    (tmp_path / "taken.vhdx").write_bytes(b"")
    with pytest.raises(E.OutputExistsError):
        vhdx.merge(chain.top, output=tmp_path / "taken.vhdx")
    with pytest.raises(E.OutputExistsError):
        vhdx.create(tmp_path / "taken.vhdx", 8 * MiB)
    with pytest.raises(E.OutputDirectoryError):
        vhdx.create(tmp_path / "nodir" / "y.vhdx", 8 * MiB)
    with vhdx.open(chain.top) as d:
        with pytest.raises(E.ReadOnlyError) as ei:
            d.write(b"x")
        assert str(chain.top) in str(ei.value)
        import io

        assert isinstance(ei.value, io.UnsupportedOperation)


def test_open_disks_refuse_copies_and_pickles(chain):
    want = chain.expected()
    with vhdx.open(chain.top) as d:
        for attempt in (copy.copy, copy.deepcopy, pickle.dumps):
            with pytest.raises(E.NotCopyableError):
                attempt(d)
        for attempt in (copy.copy, copy.deepcopy, pickle.dumps):
            with pytest.raises(TypeError):
                attempt(d.chain[0])
        # The original still reads its own bytes (the bug: a closed copy's fds).
        with open(chain.parents[0], "rb"):  # would reuse a freed descriptor number
            assert d.read_at(0, d.size) == want


# --- 5. interruption ------------------------------------------------------------------------
def test_sigterm_clears_the_bar_and_says_one_line(tmp_path):
    big = tmp_path / "big.vhdx"
    vhdx.create(big, 256 * S.GiB)  # empty: hashing it reads zeros for a long while
    p = subprocess.Popen([sys.executable, "-m", "vhdx", "hash", str(big), "--progress"], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    import select

    # Wait for the bar (the handler is installed before it is drawn), however slow
    # the machine is, then a little more so that the hash is under way.
    assert select.select([p.stderr], [], [], 60)[0], "no progress bar within 60 s"
    first = os.read(p.stderr.fileno(), 65536)
    time.sleep(0.3)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 143, err
    text = (first + err).decode()
    assert "\r" in text  # the bar was drawn ...
    last = text.split("\r")[-1]
    assert last.startswith("vhdx: terminated: ") and last.count("\n") == 1, text[-300:]
    assert text.split("\r")[-2].strip() == ""  # ... and cleared before the message
    assert out == b""


def test_interrupted_merge_says_how_to_finish_and_the_rerun_completes(chain, monkeypatch, capsys):
    from vhdx import cli, progress

    want = chain.expected()
    calls = {"n": 0}
    real = progress.Progress.__call__

    def interrupting(self, done, total=None):  # noqa: ANN001, ANN202
        real(self, done, total)
        if total and done >= total and not calls["n"]:  # all blocks written, nothing finished
            calls["n"] += 1
            raise KeyboardInterrupt

    monkeypatch.setattr(progress.Progress, "__call__", interrupting)
    argv = ["merge", str(chain.top), "--progress"]
    assert cli.main(argv) == 130
    err = capsys.readouterr().err
    last = err.split("\r")[-1]
    assert last.startswith("vhdx: interrupted: the chain is intact") and last.count("\n") == 1, err
    assert f"run 'vhdx merge {chain.top} --progress'" in last
    with vhdx.open(chain.top) as d:  # the chain reads as before
        assert d.read_at(0, d.size) == want
    monkeypatch.setattr(progress.Progress, "__call__", real)
    assert cli.main(argv) == 0  # the command it names completes the job
    assert not chain.top.exists()
    with vhdx.open(chain.parents[0]) as d:
        assert d.read_at(0, d.size) == want


def test_merge_dry_run_lists_files_it_would_delete_and_repoint(tmp_path):
    specs = [ImageSpec(virtual_size=4 * MiB, name="gc", suffix=".avhdx", seed=3, blocks={0: Block(FULLY)}),
             ImageSpec(virtual_size=4 * MiB, name="c", suffix=".avhdx", seed=2, blocks={1: Block(FULLY)}),
             ImageSpec(virtual_size=4 * MiB, name="b", seed=1, blocks={2: Block(FULLY)})]
    ch = build_chain(tmp_path, specs)
    mid = ch.paths[1]
    before = [sha(p) for p in ch.paths]
    out = run("merge", mid, "--dry-run").stdout.decode()
    assert f"would delete {mid}" in out
    assert f"would re-point {ch.top} to {ch.paths[2]}" in out
    d = json.loads(run("merge", mid, "--dry-run", "--json").stdout)
    assert d["would_delete"] == [str(mid)] and d["repointed"] == [str(ch.top)]
    assert "would delete" not in run("merge", mid, "--dry-run", "--keep").stdout.decode()
    assert [sha(p) for p in ch.paths] == before


# --- 6 and 12. progress options and --help -----------------------------------------------------
def test_quiet_and_progress_everywhere(chain, tmp_path):
    p = run("hash", chain.top, "--progress")
    assert "hash" in p.stderr.decode() and "\r" in p.stderr.decode()
    assert run("--progress", "hash", chain.top).stderr != b""
    assert run("hash", chain.top, "--quiet").stderr == b""
    assert run("-q", "convert", chain.top, tmp_path / "q.raw").stderr == b""
    p = run("hash", chain.top, "--quiet", "--progress", rc=2)
    one_error_line(p, "--progress")


def _all_parsers():  # noqa: ANN202
    import argparse

    from vhdx.cli import build_parser

    root = build_parser()
    yield "vhdx", root
    for action in root._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                for a in sub._actions:  # nested commands (vm show, ...)
                    if isinstance(a, argparse._SubParsersAction):
                        yield from ((f"{name} {n}", s) for n, s in a.choices.items())


def test_every_option_has_help_without_markup():
    import argparse

    core = {"info", "map", "hash", "convert", "create", "resize", "check", "merge"}
    for name, parser in _all_parsers():
        for a in parser._actions:
            if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if a.option_strings or name in core:  # every option; positionals of the core commands
                assert a.help and a.help.strip(), (name, a.option_strings or a.dest)
        text = parser.format_help()
        assert "``" not in text and ":class:" not in text and "**" not in text, name


def test_help_says_what_merge_deletes_and_what_repair_writes():
    merge = " ".join(run("merge", "--help").stdout.decode().split())
    assert "deleted" in merge and "unless --keep" in merge
    check = " ".join(run("check", "--help").stdout.decode().split())
    assert "--repair WRITES" in check.replace("--repair  WRITES", "--repair WRITES") or "WRITES to IMAGE" in check


@pytest.mark.parametrize("name", ["o.raw", "o.vhdx", "o.vhd", "fixed.vhd"])
def test_interrupted_convert_leaves_no_temp_and_keeps_the_old_output(chain, tmp_path, monkeypatch, capsys, name):
    from vhdx import cli, progress

    out = tmp_path / name
    out.write_bytes(b"previous output")

    def interrupting(self, done, total=None):  # noqa: ANN001, ANN202
        raise KeyboardInterrupt

    monkeypatch.setattr(progress.Progress, "__call__", interrupting)
    extra = ["--type", "fixed"] if name.startswith("fixed") else []
    assert cli.main(["convert", str(chain.top), str(out), "--force", *extra]) == 130
    last = capsys.readouterr().err.split("\r")[-1]
    assert last.startswith("vhdx: interrupted: the source is unchanged and no output was written")
    assert f"run 'vhdx convert {chain.top} {out} {' '.join(['--force', *extra])}'" in last
    assert out.read_bytes() == b"previous output"
    assert not list(tmp_path.glob("*.part"))


def test_storage_os_errors_keep_errno_and_name_the_file(tmp_path):
    import errno

    from vhdx.storage import FileStorage

    p = tmp_path / "ro.bin"
    p.write_bytes(b"x" * 4096)
    st = FileStorage(os.open(p, os.O_RDONLY))  # writable=True over a read-only descriptor
    st.path = str(p)
    try:
        with pytest.raises(E.VhdxIOError) as ei:
            st.pwrite(0, b"y")
        assert isinstance(ei.value, OSError) and ei.value.errno == errno.EBADF
        assert str(ei.value).startswith(f"{p}: write failed at 0x0")
    finally:
        st.close()
    with pytest.raises(E.ImageNotFoundError) as ei:
        FileStorage.open(tmp_path / "absent.bin")
    assert ei.value.errno == errno.ENOENT and str(tmp_path / "absent.bin") in str(ei.value)
    with pytest.raises(FileNotFoundError):
        vhdx.open(tmp_path / "absent.vhdx", "r+")
    d = tmp_path / "adir"
    d.mkdir()
    with pytest.raises(E.VhdxIOError) as ei:  # EISDIR: an OSError that names the folder
        FileStorage.open(d)
    assert ei.value.errno == errno.EISDIR and str(d) in str(ei.value)


def test_convert_refuses_a_mounted_block_device(chain, tmp_path, loopdev):
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("mkfs.ext4 not installed")
    dev = loopdev(16 * MiB, b"\0")
    subprocess.run(["mkfs.ext4", "-q", "-F", dev], check=True, capture_output=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    # Read-only: nothing writes the device meanwhile, and O_EXCL still sees it held.
    if subprocess.run(["mount", "-o", "ro", dev, str(mnt)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount here")
    try:
        before = hashlib.sha256(_read_dev(dev, 16 * MiB)).hexdigest()
        err = one_error_line(run("convert", chain.top, dev, "--force", rc=1), dev)
        assert "in use" in err
        assert hashlib.sha256(_read_dev(dev, 16 * MiB)).hexdigest() == before
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_convert_refuses_up_front_when_the_output_cannot_fit(tmp_path, loopdev):
    """A small loop-mounted file system: the numbers in one line, nothing written."""
    import random

    if shutil.which("mkfs.ext4") is None:
        pytest.skip("mkfs.ext4 not installed")
    dev = loopdev(24 * MiB, b"\0")
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", dev], check=True, capture_output=True)
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", dev, str(mnt)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount here")
    try:
        src = tmp_path / "big.raw"
        src.write_bytes(random.Random(3).randbytes(40 * MiB))  # more than the file system holds
        free = os.statvfs(mnt).f_bavail
        for name in ("o.raw", "o.vhdx", "o.vhd"):
            err = one_error_line(run("convert", src, mnt / name, rc=1), mnt / name)
            import re

            m = re.search(r"needs up to (\d+) bytes, .* has (\d+) free", err)
            assert "not enough space" in err and m, err
            assert int(m.group(1)) >= 40 * MiB and int(m.group(2)) == free * os.statvfs(mnt).f_frsize
            assert not (mnt / name).exists()
            assert [p.name for p in mnt.iterdir()] == ["lost+found"]
            assert os.statvfs(mnt).f_bavail == free
        # Past the check (as when something else fills the disk meanwhile): ENOSPC
        # mid-way is one line naming the output, and every byte is given back.
        for name in ("o.raw", "o.vhdx", "o.vhd", "fixed.vhd"):
            p = subprocess.run(
                [sys.executable, "-c", "import sys, vhdx.fileio as f, vhdx.cli as c; "
                 "f.check_free_space = lambda *a: None; sys.exit(c.main(sys.argv[1:]))",
                 "convert", str(src), str(mnt / name), *(["--type", "fixed"] if name.startswith("fixed") else [])],
                cwd=REPO, capture_output=True, timeout=120)
            assert p.returncode == 1
            err = one_error_line(p, mnt / name)
            assert "No space left on device" in err and "run the command again" in err
            assert [q.name for q in mnt.iterdir()] == ["lost+found"]
            assert os.statvfs(mnt).f_bavail == free
        small = tmp_path / "small.raw"
        small.write_bytes(random.Random(4).randbytes(2 * MiB))
        run("convert", small, mnt / "ok.raw")  # what fits is written
        assert (mnt / "ok.raw").read_bytes() == small.read_bytes()
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_eio_while_reading_a_source_is_one_line_and_leaves_nothing(tmp_path, loopdev):
    """A device-mapper device whose 64 KiB at 4 MiB fail every read (dm 'error')."""
    if shutil.which("dmsetup") is None or not os.path.exists("/dev/mapper/control"):
        pytest.skip("needs dmsetup and device-mapper")
    dev = loopdev(8 * MiB, b"\x11")
    name = f"vhdx-test-{uuid.uuid4().hex[:12]}"
    sec = 512
    table = (f"0 {4 * MiB // sec} linear {dev} 0\n"
             f"{4 * MiB // sec} {65536 // sec} error\n"
             f"{(4 * MiB + 65536) // sec} {(4 * MiB - 65536) // sec} linear {dev} {(4 * MiB + 65536) // sec}\n")
    if subprocess.run(["dmsetup", "create", name], input=table.encode(), capture_output=True).returncode:
        pytest.skip("dmsetup create failed")
    bad = f"/dev/mapper/{name}"
    try:
        for out in (tmp_path / "p.vhdx", tmp_path / "p.raw", tmp_path / "p.vhd"):
            err = one_error_line(run("convert", bad, out, rc=1), bad)
            assert "Input/output error" in err and "read failed" in err
            assert not out.exists() and not list(tmp_path.glob("*.part"))
    finally:
        subprocess.run(["dmsetup", "remove", name], capture_output=True)


@pytest.fixture(scope="module")
def eio_shim(tmp_path_factory):  # noqa: ANN001, ANN201
    """tests/shims/eio_shim.c built for LD_PRELOAD (skips without a C compiler)."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler for the EIO shim")
    so = tmp_path_factory.mktemp("shim") / "eio_shim.so"
    p = subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", str(so),
                        str(REPO / "tests" / "shims" / "eio_shim.c"), "-ldl"], capture_output=True, text=True)
    if p.returncode:
        pytest.skip(f"cannot build the EIO shim: {p.stderr.strip()[:200]}")
    return so


def test_eio_at_many_offsets_is_one_line_naming_the_file(chain, tmp_path, eio_shim):
    """Reads of a chain file fail at headers, BAT, metadata and every payload block
    in turn: each command answers one line naming that file; nothing is left."""
    before = [sha(p) for p in chain.paths]
    # Where reads really happen: the header of each file (at open) and the first
    # sector of every data extent (hash and convert read all data).
    cases = [(os.path.realpath(p), S.HEADER_OFFSETS[0]) for p in chain.paths]
    with vhdx.open(chain.top) as d:
        cases += [(os.path.realpath(d.chain[e.source].path), e.file_offset)
                  for e in d.extents() if e.kind == "data"]
    assert len(cases) >= 8
    cmds = [("convert", "{out}.raw"), ("convert", "{out}.vhdx"), ("hash",), ("convert", "{out}.vhd")]
    for i, (path, offset) in enumerate(cases):
        env = dict(os.environ, LD_PRELOAD=str(eio_shim), VHDX_EIO_PATH=path,
                   VHDX_EIO_OFFSET=str(offset), VHDX_EIO_LENGTH="512")
        cmd = cmds[i % len(cmds)]
        out = tmp_path / f"out{i}"
        args = [cmd[0], chain.top] + [a.format(out=out) for a in cmd[1:]]
        p = run(*args, rc=None, env=env)
        assert p.returncode == 1, (args, offset, p.stderr)
        err = one_error_line(p, path)
        assert "Input/output error" in err, err
        assert not list(tmp_path.glob("out*")) and not list(tmp_path.glob(".out*"))
    # Without the fault everything works, and no input changed.
    assert run("hash", chain.top).stdout.split()[0].decode() == hashlib.sha256(chain.expected()).hexdigest()
    assert [sha(p) for p in chain.paths] == before


def test_progress_bar_fits_a_narrow_terminal_and_shows_eta(tmp_path):
    """On a 60-column terminal every redraw fits the line (no wrapping), and the bar
    carries bytes done/total, rate and ETA."""
    import re
    import fcntl
    import pty
    import select
    import struct
    import termios

    img = tmp_path / "e.vhdx"
    vhdx.create(img, 2 * S.GiB)  # empty: hashing it is quick but long enough to redraw
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 60, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    p = subprocess.Popen([sys.executable, "-m", "vhdx", "hash", str(img)], cwd=REPO, env=env,
                         stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL)
    os.close(slave)
    seen = b""
    try:
        while True:
            r, _, _ = select.select([master], [], [], 60)
            if not r:
                break
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
    finally:
        p.wait(timeout=120)
        os.close(master)
    assert p.returncode == 0
    frames = [f for f in seen.decode(errors="replace").split("\r") if f.strip()]
    assert frames, seen[:200]
    assert all(len(f.rstrip("\n")) <= 60 for f in frames), max(frames, key=len)
    # e.g. "hash:  40%|###  | 819M/2.00G [00:01<00:01, 560MB/s]"
    shown = re.compile(r"\d+%.*\| *[\d.]+[kMG]?/2\.00G \[\d\d:\d\d<\d\d:\d\d, *[\d.]+[kMG]?B/s\]")
    assert any(shown.search(f) for f in frames), frames[:4]


def test_an_unexpected_exception_is_one_line_unless_debugging(chain, monkeypatch, capsys):
    from vhdx import cli

    def boom(args):  # noqa: ANN001, ANN202
        raise RuntimeError("something\nunforeseen")

    real = cli.build_parser

    def parser():  # noqa: ANN202
        p = real()
        for a in p._actions:
            if hasattr(a, "choices") and isinstance(a.choices, dict) and "info" in a.choices:
                a.choices["info"].set_defaults(func=boom)
        return p

    monkeypatch.setattr(cli, "build_parser", parser)
    monkeypatch.delenv("VHDX_DEBUG", raising=False)
    assert cli.main(["info", str(chain.top)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(chain.top) in err and "internal error (RuntimeError" in err
    monkeypatch.setenv("VHDX_DEBUG", "1")
    with pytest.raises(RuntimeError):
        cli.main(["info", str(chain.top)])


def test_a_closed_pipe_is_quiet(chain):
    for args in (["convert", str(chain.top), "-"], ["map", str(chain.top)]):
        p = subprocess.Popen([sys.executable, "-m", "vhdx", *args], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert len(p.stdout.read(10)) == 10
        p.stdout.close()  # like `| head -c 10`
        err = p.stderr.read()
        p.wait(timeout=60)
        assert err == b"", err  # no traceback, no "Exception ignored"


def test_nul_in_a_locator_path_is_one_line(chain):
    """The issue's crafted case (a NUL inside relative_path, checksums valid): info,
    map and hash answer one line; check reports it; no traceback anywhere."""
    from vhdx.writer import WritableDisk

    # The writer lays the crafted locator down, then its own re-parse refuses it
    # (the file now holds what an attacker would craft, checksums valid).
    with pytest.raises(vhdx.CorruptImageError, match="NUL"):
        with WritableDisk(chain.top, standalone=True) as w:
            w.update_parent_locator({"relative_path": ".\\ba\0se.vhdx",
                                     "absolute_win32_path": "\\\\?\\C:\\x\\ba\0se.vhdx"})
    for cmd in ("map", "hash"):
        one_error_line(run(cmd, chain.top, rc=1), chain.top)
    p = run("info", chain.top, rc=None)  # may describe the lone file instead (exit 0)
    assert b"Traceback" not in p.stderr and p.returncode in (0, 1)
    if p.returncode:
        one_error_line(p, chain.top)
    p = run("check", chain.top, rc=2)
    assert b"NUL" in p.stdout and b"Traceback" not in p.stderr
