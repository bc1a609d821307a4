"""The recipes of docs/forensics.md, run as written.

Each test takes its code block out of the document (the ``## Mount`` shell block,
the ``## pytsk3`` Python block), sets only the variables the text says to set,
and runs it on generated disks: ext4 (mkfs.ext4 -d) and NTFS (mkntfs + ntfscp)
in GPT partitions made by sgdisk, written into VHDX chains by the writer.
"""

from __future__ import annotations

import ast
import contextlib
import io
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from diskimg import have, make_ext4_gpt, raw_to_chain, sh

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "forensics.md"
FILES = {"hello.txt": b"hello from a checkpoint chain\n",
         "dir/data.bin": random.Random(8).randbytes(200_000),
         "notes.txt": b"one\ntwo\n"}


def recipe(section: str, lang: str) -> str:
    """The first ``lang`` code block under ``## section`` of docs/forensics.md."""
    text = DOC.read_text(encoding="utf-8")
    m = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert m, f"no section {section!r} in {DOC}"
    block = re.search(rf"^```{lang}\n(.*?)^```", m.group(1), re.MULTILINE | re.DOTALL)
    assert block, f"no {lang} block in section {section!r}"
    return block.group(1)


def set_var(code: str, name: str, value: str, fmt: str) -> str:
    """Replace the recipe's one assignment of ``name`` (the text tells readers to)."""
    new, n = re.subn(rf"^{name} ?= ?.*$", fmt.format(name=name, value=value), code, count=1, flags=re.MULTILINE)
    assert n == 1, f"{name} is not assigned in the recipe"
    return new


def _ntfs_gpt(raw: Path, files: dict[str, bytes]) -> None:
    """GPT with one NTFS partition (mkntfs), files copied in with ntfscp (no mount)."""
    with open(raw, "wb") as f:
        f.truncate(40 << 20)
    sh("sgdisk", "-n", "1:2048:+30M", "-t", "1:0700", "-c", "1:ntfs", raw)
    part = raw.parent / "ntfs.part"
    with open(part, "wb") as f:
        f.truncate(30 << 20)
    sh("mkntfs", "-F", "-Q", "-q", "-L", "evidence", part)
    for name, data in files.items():
        src = raw.parent / ("src-" + name.replace("/", "_"))
        src.write_bytes(data)
        sh("ntfscp", "-q", part, src, "/" + name)
    with open(part, "rb") as fi, open(raw, "r+b") as fo:
        fo.seek(2048 * 512)
        shutil.copyfileobj(fi, fo)
    part.unlink()


@pytest.mark.parametrize("fstype", ["ext4", "ntfs"])
def test_pytsk3_recipe(tmp_path: Path, fstype: str) -> None:
    pytest.importorskip("pytsk3")
    if not have("sgdisk") or not have("mkfs.ext4" if fstype == "ext4" else "mkntfs"):
        pytest.skip(f"needs sgdisk and {fstype} tools")
    raw = tmp_path / "disk.raw"
    files = FILES if fstype == "ext4" else {k: v for k, v in FILES.items() if "/" not in k}
    if fstype == "ext4":
        make_ext4_gpt(raw, files)
    else:
        if not have("ntfscp"):
            pytest.skip("needs ntfscp (ntfs-3g)")
        _ntfs_gpt(raw, files)
    top = raw_to_chain(raw, tmp_path, stem="disk", depth=2)[0]
    code = set_var(recipe("pytsk3", "python"), "IMAGE", repr(str(top)), "{name} = {value}")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(DOC), "exec"), {"__name__": "recipe"})  # noqa: S102 - the documented recipe
    listed = {}
    for line in out.getvalue().splitlines():
        m = re.fullmatch(r"p(\d+) (\S+) (\d+) (.*)", line)
        assert m, line
        listed[m.group(2)] = (int(m.group(1)), int(m.group(3)), ast.literal_eval(m.group(4)))
    for name, data in files.items():
        assert listed.get("/" + name) == (1, len(data), data[:16]), (name, listed)


def test_mount_recipe(tmp_path: Path) -> None:
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse") or not os.path.exists("/dev/loop-control"):
        pytest.skip("needs root, /dev/fuse and loop devices")
    if not have("fusermount3", "sgdisk", "mkfs.ext4", "sha256sum"):
        pytest.skip("needs fusermount3, sgdisk, mkfs.ext4")
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError) as e:
        pytest.skip(f"needs mfusepy: {e}")
    raw = tmp_path / "truth.raw"
    make_ext4_gpt(raw, FILES)
    top = raw_to_chain(raw, tmp_path, stem="disk", depth=3)[0]
    mp, fs = tmp_path / "vhdx", tmp_path / "evidence"
    code = recipe("Mount", "sh")
    for name, value in (("IMAGE", top), ("MP", mp), ("FS", fs)):
        code = set_var(code, name, f"'{value}'", "{name}={value}")
    # `vhdx` is this checkout's CLI, whatever is on PATH.
    prelude = f"set -euo pipefail\nvhdx() {{ '{sys.executable}' -m vhdx \"$@\"; }}\n"
    try:
        p = subprocess.run(["bash", "-c", prelude + code], cwd=ROOT, capture_output=True, text=True,
                           timeout=300, check=False)
    finally:
        for m in (fs, mp):  # only if the recipe failed half-way
            if os.path.ismount(m):
                subprocess.run(["umount", "-l", str(m)], check=False)
    assert p.returncode == 0, p.stderr
    want = subprocess.run([sys.executable, "-m", "vhdx", "hash", str(top)], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout.split()[0]
    assert f"{want}  {mp}/disk.raw" in p.stdout
    assert re.search(r"\bdisk\.p1\.raw\b", p.stdout) and re.search(r"\bdisk\.p2\.raw\b", p.stdout)
    for name in ("hello.txt", "dir", "lost+found"):
        assert re.search(rf" {re.escape(name)}$", p.stdout, re.MULTILINE), (name, p.stdout)
    assert not os.path.ismount(mp) and not os.path.ismount(fs)


def _run_python(code: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(DOC), "exec"), {})  # noqa: S102 - the documented recipe itself
    return out.getvalue()


def test_hashing_recipes(tmp_path: Path) -> None:
    """The two Python blocks of the Hashing section: a chain by path, then the
    same chain from a zip through an opener; both print the builder's hash."""
    import hashlib
    import zipfile

    from builder import build_chain, random_spec

    rng = random.Random(11)
    specs = [random_spec(rng, name=f"h{k}", virtual_size=5 << 20, block_size=1 << 20, lss=512,
                         differencing=k > 0) for k in range(3)]
    chain = build_chain(tmp_path, specs)
    want = hashlib.sha256(chain.expected()).hexdigest()
    text = DOC.read_text(encoding="utf-8")
    m = re.search(r"^## Hashing\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    blocks = re.findall(r"^```python\n(.*?)^```", m.group(1), re.MULTILINE | re.DOTALL)
    assert len(blocks) == 2
    first = set_var(blocks[0], "IMAGE", repr(str(chain.top)), "{name} = {value}")
    assert _run_python(first).split() == [want, str(len(chain.expected()))]
    zpath = tmp_path / "evidence.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        for p in chain.paths:
            z.write(p, f"case1/{p.name}")
    second = set_var(blocks[1], "ZIP, MEMBER", f"{str(zpath)!r}, 'case1/{chain.top.name}'", "{name} = {value}")
    assert _run_python(second).split() == [want]
