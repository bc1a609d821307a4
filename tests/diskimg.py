"""Test helpers: raw disk images made by real tools (sfdisk, sgdisk, mkfs), moved
into VHDX files and chains through the project's writer.

The raw file is the ground truth: a chain built from it must read back as it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import vhdx

CHUNK = 1 << 20


class RawDisk:
    """The ``read_at`` / ``size`` / ``logical_sector_size`` face of a raw file."""

    def __init__(self, path: str | os.PathLike[str], logical_sector_size: int = 512) -> None:
        self._data = Path(path).read_bytes()
        self.size = len(self._data)
        self.logical_sector_size = logical_sector_size

    def read_at(self, offset: int, size: int) -> bytes:
        return self._data[offset:offset + size]


def nonzero_chunks(raw: str | os.PathLike[str], chunk: int = CHUNK) -> list[tuple[int, bytes]]:
    out = []
    with open(raw, "rb") as f:
        off = 0
        while data := f.read(chunk):
            if data.count(0) != len(data):
                out.append((off, data))
            off += len(data)
    return out


def raw_to_chain(raw: str | os.PathLike[str], directory: str | os.PathLike[str], stem: str = "disk",
                 depth: int = 1, logical_sector_size: int = 512,
                 block_size: int = 2 << 20) -> list[Path]:
    """Write ``raw`` into a new chain of ``depth`` files: the data chunks are dealt
    round-robin over the levels, so every level supplies part of the disk. The top
    is ``<stem>.vhdx`` (depth 1) or ``<stem>.avhdx``, its ancestors ``<stem>-<level>``.
    Returns the paths, top first."""
    directory = Path(directory)
    size = os.path.getsize(raw)
    chunks = nonzero_chunks(raw)
    paths: list[Path] = []
    for level in range(depth):
        name = stem if level == depth - 1 else f"{stem}-{level}"
        p = directory / (name + (".vhdx" if level == 0 else ".avhdx"))
        if level == 0:
            vhdx.create(p, size, block_size=block_size, logical_sector_size=logical_sector_size)
        else:
            vhdx.create(p, parent=paths[-1])
        with vhdx.open(p, "r+") as disk:
            for i, (off, data) in enumerate(chunks):
                if i % depth == level:
                    disk.write_at(off, data)
        paths.append(p)
    return paths[::-1]


def have(*tools: str) -> bool:
    return all(shutil.which(t) for t in tools)


def sh(*args: str | os.PathLike[str], input: str | None = None,  # noqa: A002 - subprocess.run's name
       timeout: float = 120) -> str:
    p = subprocess.run([str(a) for a in args], input=input, capture_output=True, text=True,
                       timeout=timeout, check=False)
    if p.returncode:
        raise AssertionError(f"{args[0]} failed ({p.returncode}): {p.stderr.strip()}")
    return p.stdout


def make_ext4_gpt(raw: str | os.PathLike[str], files: dict[str, bytes], size: int = 48 << 20) -> None:
    """A raw disk with a GPT of two partitions (sgdisk) and an ext4 (mkfs.ext4 -d,
    no loop device needed) holding ``files`` in partition 1."""
    raw = Path(raw)
    with open(raw, "wb") as f:
        f.truncate(size)
    sh("sgdisk", "-n", "1:2048:+24M", "-c", "1:data", "-t", "1:8300",
       "-n", "2:0:+8M", "-c", "2:spare", "-t", "2:0700", raw)
    src = raw.parent / (raw.name + ".content")
    src.mkdir()
    for name, data in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    part = raw.parent / (raw.name + ".p1")
    with open(part, "wb") as f:
        f.truncate(24 << 20)
    sh("mkfs.ext4", "-q", "-F", "-E", "root_owner=0:0", "-d", src, part)
    with open(part, "rb") as fi, open(raw, "r+b") as fo:
        fo.seek(2048 * 512)
        shutil.copyfileobj(fi, fo)
    part.unlink()
    shutil.rmtree(src)
