"""Helpers shared by the VHD tests: fixture metadata, peers (qemu-img ``vpc``,
libvhdi, dissect) as oracles for VHD, file hashing, hand-built images."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from vhdx.vhd import structures as VS

MiB = 1 << 20
PathLike = str | os.PathLike[str]
REPO = Path(__file__).resolve().parent.parent


def cli(*args: object, rc: int | None = 0) -> subprocess.CompletedProcess:
    """``python -m vhdx ARGS`` from the repo root; asserts the exit code unless None."""
    p = subprocess.run([sys.executable, "-m", "vhdx", *map(str, args)], capture_output=True,
                       text=True, timeout=300, cwd=REPO, check=False)
    if rc is not None:
        assert p.returncode == rc, (p.returncode, p.stdout, p.stderr)
    return p


def vhd_expected(shared_dir: Path) -> dict:
    p = shared_dir / "fixtures" / "vhd" / "expected.json"
    if not p.is_file():
        pytest.skip("shared/fixtures/vhd/expected.json not present")
    with open(p) as fh:
        return json.load(fh)["images"]


def file_sha(path: PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for b in iter(lambda: fh.read(4 << 20), b""):
            h.update(b)
    return h.hexdigest()


def disk_sha(disk, chunk: int = 4 << 20) -> str:
    h = hashlib.sha256()
    buf = bytearray(chunk)
    pos = 0
    while pos < disk.size:
        n = disk.readinto_at(pos, memoryview(buf)[:min(chunk, disk.size - pos)])
        h.update(memoryview(buf)[:n])
        pos += n
    return h.hexdigest()


def disk_bytes(disk) -> bytes:
    return disk.read_at(0, disk.size)


def require_tool(name: str) -> None:
    if shutil.which(name) is None:
        pytest.skip(f"{name} is not installed")


def qemu_create_vpc(path: PathLike, size: int, subformat: str = "dynamic", force_size: bool = False) -> None:
    require_tool("qemu-img")
    opts = f"subformat={subformat}" + (",force_size=on" if force_size else "")
    subprocess.run(["qemu-img", "create", "-q", "-f", "vpc", "-o", opts, os.fspath(path), str(size)],
                   check=True, capture_output=True)


def qemu_io_write(path: PathLike, writes: Sequence[tuple[int, int, int]]) -> None:
    """``writes``: (offset, length, pattern byte) through qemu-io -f vpc."""
    require_tool("qemu-io")
    args = ["qemu-io", "-f", "vpc"]
    for off, ln, pat in writes:
        args += ["-c", f"write -q -P {pat} {off} {ln}"]
    subprocess.run(args + [os.fspath(path)], check=True, capture_output=True)


def qemu_raw(path: PathLike, tmp: Path) -> bytes:
    """The virtual disk as qemu-img converts it (``-f vpc``)."""
    require_tool("qemu-img")
    out = tmp / (Path(path).name + ".qemu.raw")
    subprocess.run(["qemu-img", "convert", "-f", "vpc", "-O", "raw", os.fspath(path), os.fspath(out)],
                   check=True, capture_output=True)
    data = out.read_bytes()
    out.unlink()
    return data


def qemu_verify(path: PathLike, truth: bytes, tmp: Path) -> None:
    """The strongest "qemu-img check clean" there is for VHD: ``qemu-img check``
    has no vpc checker (exit 63, "does not support checks", asserted here so a
    future qemu that gains one is noticed), so ``qemu-img info -f vpc`` must open
    the file (qemu's structural checks at open) and report its size, and
    ``qemu-img compare -f vpc -F raw`` must find it identical to ``truth``."""
    require_tool("qemu-img")
    p = os.fspath(path)
    chk = subprocess.run(["qemu-img", "check", "-f", "vpc", p], capture_output=True, text=True, check=False)
    assert chk.returncode == 63 and "support" in chk.stderr + chk.stdout, chk
    info = subprocess.run(["qemu-img", "info", "--output=json", "-f", "vpc", p],
                          capture_output=True, text=True, check=True)
    assert json.loads(info.stdout)["virtual-size"] == len(truth)
    raw = tmp / (Path(p).name + ".truth.raw")
    raw.write_bytes(truth)
    try:
        cmp = subprocess.run(["qemu-img", "compare", "-f", "vpc", "-F", "raw", p, os.fspath(raw)],
                             capture_output=True, text=True, check=False)
        assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    finally:
        raw.unlink()


def libvhdi_bytes(chain: Sequence[PathLike]) -> bytes | None:
    """Whole disk through libvhdi (parents set explicitly), None without pyvhdi.

    libvhdi 20260901 has a sector-bitmap bug (vhd.md §13: the shifted bitmap byte
    is not masked, so a 0 bit after a 1 bit in the same byte counts as present):
    on a differencing disk with a partial bitmap over a non-zero parent it
    returns the child's (zero) sectors instead of the parent's. Callers use it
    only where every bitmap byte is 0x00 or 0xFF, or where the hidden parent
    sectors are zero, and say so.
    """
    import importlib.util

    if importlib.util.find_spec("pyvhdi") is None:
        return None
    import oracles  # the same whole-disk read the VHDX tests use

    return oracles.libvhdi_bytes(chain)


def dissect_bytes(path: PathLike) -> bytes | None:
    """Whole disk through dissect.hypervisor (no parent support, bitmaps ignored)."""
    try:
        from dissect.hypervisor.disk.vhd import VHD
    except ImportError:
        return None
    with open(path, "rb") as fh:
        d = VHD(fh)
        d.seek(0)
        return d.read(d.size)


def make_zero_fixed_parent(path: PathLike, size: int, unique_id: bytes) -> None:
    """A sparse all-zero fixed VHD carrying ``unique_id`` (built by hand from the
    spec's footer layout, independent of the project's writer)."""
    c, h, s = VS.chs_geometry(size)
    footer = VS.build_footer(current_size=size, original_size=size, cylinders=c, heads=h,
                             sectors_per_track=s, disk_type=VS.TYPE_FIXED, unique_id=unique_id)
    with open(path, "wb") as fh:
        fh.truncate(size)
        fh.seek(size)
        fh.write(footer)


def tree_hashes(paths: Sequence[PathLike]) -> dict[str, str]:
    return {os.fspath(p): file_sha(p) for p in paths}
