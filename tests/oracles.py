"""Peer readers used as oracles: libvhdi (pyvhdi), dissect.hypervisor, qemu-img.

Every chain argument is child first (``[child, parent, grandparent, ...]``) and
parents are attached explicitly (no path resolution). ``require_*`` helpers skip
the calling test when a peer is missing. Peers do not replay the VHDX log.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pytest

CHUNK = 8 * 1024 * 1024
PathLike = str | os.PathLike[str]


def have_libvhdi() -> bool:
    try:
        import pyvhdi  # noqa: F401
    except ImportError:
        return False
    return True


def have_dissect() -> bool:
    try:
        import dissect.hypervisor.disk.vhdx  # noqa: F401
    except ImportError:
        return False
    return True


def have_qemu() -> bool:
    return shutil.which("qemu-img") is not None


def require_libvhdi() -> None:
    if not have_libvhdi():
        pytest.skip("libvhdi-python (pyvhdi) is not installed")


def require_dissect() -> None:
    if not have_dissect():
        pytest.skip("dissect.hypervisor is not installed")


def require_qemu() -> None:
    if not have_qemu():
        pytest.skip("qemu-img is not installed")


# --- libvhdi -------------------------------------------------------------------
def libvhdi_bytes(chain: Sequence[PathLike]) -> bytes:
    """Whole virtual disk through libvhdi with parents set explicitly."""
    import pyvhdi

    files = []
    try:
        for p in chain:
            f = pyvhdi.file()
            f.open(os.fspath(p))
            files.append(f)
        for i in range(len(files) - 2, -1, -1):
            files[i].set_parent(files[i + 1])
        top = files[0]
        size = top.get_media_size()
        top.seek_offset(0, os.SEEK_SET)
        out = bytearray()
        while len(out) < size:
            b = top.read_buffer(min(CHUNK, size - len(out)))
            if not b:
                break
            out += b
        return bytes(out)
    finally:
        for f in files:
            try:
                f.close()
            except Exception:  # noqa: BLE001 - best effort
                pass


def libvhdi_size(path: PathLike) -> int:
    import pyvhdi

    f = pyvhdi.file()
    f.open(os.fspath(path))
    try:
        return f.get_media_size()
    finally:
        f.close()


# --- dissect -------------------------------------------------------------------
def _dissect_open(chain: Sequence[PathLike]):
    import dissect.hypervisor.disk.vhdx as vhdx_mod

    parent_obj = None
    orig = vhdx_mod.open_parent
    try:
        for p in reversed(list(chain)):
            if parent_obj is not None:
                po = parent_obj
                vhdx_mod.open_parent = lambda path, locator, _po=po: _po
            else:
                vhdx_mod.open_parent = orig
            parent_obj = vhdx_mod.VHDX(Path(p))
    finally:
        vhdx_mod.open_parent = orig
    return parent_obj


def dissect_bytes(chain: Sequence[PathLike]) -> bytes:
    """Whole virtual disk through dissect.hypervisor with explicit parents."""
    v = _dissect_open(chain)
    v.seek(0)
    out = bytearray()
    while len(out) < v.size:
        b = v.read(min(CHUNK, v.size - len(out)))
        if not b:
            break
        out += b
    return bytes(out)


def dissect_size(path: PathLike) -> int:
    return _dissect_open([path]).size


# --- qemu ----------------------------------------------------------------------
def qemu_raw_bytes(path: PathLike) -> bytes:
    """``qemu-img convert -O raw`` of a non-differencing image, as bytes."""
    with tempfile.TemporaryDirectory(prefix="vhdx-qemu-") as d:
        out = os.path.join(d, "out.raw")
        r = subprocess.run(["qemu-img", "convert", "-f", "vhdx", "-O", "raw", os.fspath(path), out],
                           capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f"qemu-img convert failed: {r.stderr.strip()}")
        with open(out, "rb") as fh:
            return fh.read()


def qemu_check(path: PathLike) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", "check", "-f", "vhdx", os.fspath(path)],
                          capture_output=True, text=True, timeout=120)


def qemu_info(path: PathLike) -> dict:
    import json

    r = subprocess.run(["qemu-img", "info", "-f", "vhdx", "--output=json", os.fspath(path)],
                       capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise RuntimeError(f"qemu-img info failed: {r.stderr.strip()}")
    return json.loads(r.stdout)


# --- hashes --------------------------------------------------------------------
def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def libvhdi_sha256(chain: Sequence[PathLike]) -> str:
    return sha256(libvhdi_bytes(chain))


def dissect_sha256(chain: Sequence[PathLike]) -> str:
    return sha256(dissect_bytes(chain))


def qemu_sha256(path: PathLike) -> str:
    return sha256(qemu_raw_bytes(path))


def first_difference(a: bytes, b: bytes) -> int | None:
    """Offset of the first differing byte (or the shorter length), None if equal."""
    if a == b:
        return None
    n = min(len(a), len(b))
    step = 65536
    for base in range(0, n, step):
        if a[base:base + step] != b[base:base + step]:
            for k in range(base, min(base + step, n)):
                if a[k] != b[k]:
                    return k
    return n
