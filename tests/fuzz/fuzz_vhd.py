"""atheris fuzz target for legacy VHD/AVHD: ``vhdx.open`` (routed by signature),
whole reads, the extent map and ``check_chain``.

    python3 tests/fuzz/fuzz_vhd.py -atheris_runs=1000000 -timeout=10 -max_len=70000 CORPUS_DIR

Seeds are small files made by the project's own VHD writer (a dynamic disk with
4 KiB blocks, a fixed disk, and a differencing child whose parent sits beside
the input under the name its locator gives). The input is a whole file: byte 0
holds flags (1: reseal the footer, its copy and the dynamic header checksums
after libFuzzer's mutation, as an attacker would, so that edits reach the code
behind them; 2: the input is the differencing child; 4: run ``check_chain``
too), the rest is the file. Anything but a VhdxError is a crash.
"""

from __future__ import annotations

import os
import struct
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.dirname(os.path.dirname(HERE))]

import atheris  # noqa: E402 - after the sys.path set-up

with atheris.instrument_imports(include=["vhdx"]):
    import vhdx
    from vhdx.errors import VhdxError
    # Imported here, not lazily by vhdx.formats, so that they are instrumented too
    # (coverage guidance sees only modules imported inside this block).
    import vhdx.vhd.chain
    import vhdx.vhd.check
    import vhdx.vhd.disk
    import vhdx.vhd.file
    import vhdx.vhd.native_read  # noqa: F401

KiB = 1024
_TMP = tempfile.mkdtemp(prefix="fuzz_vhd_")
_PARENT = os.path.join(_TMP, "parent.vhd")
_PLAIN = os.path.join(_TMP, "input.vhd")
_CHILD = os.path.join(_TMP, "child.avhd")

# Checksum = ones' complement of the byte sum with the field itself zero
# (docs/vhd.md §2 footer, §4 dynamic header); field offsets within each structure.
_FOOTER, _FOOTER_SUM = 512, 64
_DYN_HEADER, _DYN_SUM = 1024, 36


def _seal(buf: bytearray, start: int, size: int, field: int) -> None:
    if start < 0 or start + size > len(buf):
        return
    buf[start + field:start + field + 4] = b"\0\0\0\0"
    total = sum(buf[start:start + size]) & 0xFFFFFFFF
    buf[start + field:start + field + 4] = struct.pack(">I", ~total & 0xFFFFFFFF)


def reseal(body: bytes) -> bytes:
    """The file with its footer, footer copy and dynamic header checksums made valid."""
    buf = bytearray(body)
    n = len(buf)
    _seal(buf, n - _FOOTER, _FOOTER, _FOOTER_SUM)
    if n >= 2 * _FOOTER and buf[:8] == b"conectix":
        _seal(buf, 0, _FOOTER, _FOOTER_SUM)
        (data_offset,) = struct.unpack(">Q", bytes(buf[16:24]))
        if data_offset < n:
            _seal(buf, data_offset, _DYN_HEADER, _DYN_SUM)
    return bytes(buf)


def seeds() -> list[tuple[int, bytes]]:
    """(flags, file) pairs, and the parent written beside the inputs."""
    out: list[tuple[int, bytes]] = []
    d = tempfile.mkdtemp(prefix="fuzz_vhd_seeds_")
    dyn = vhdx.create(os.path.join(d, "dyn.vhd"), 64 * KiB, block_size=4 * KiB)
    with vhdx.open(dyn, "r+") as w:
        w.write_at(0, b"\x11" * 4 * KiB)
        w.write_at(40 * KiB, b"\x22" * 1024)
    fixed = vhdx.create(os.path.join(d, "fixed.vhd"), 64 * KiB, type="fixed")
    with vhdx.open(fixed, "r+") as w:
        w.write_at(8 * KiB, b"\x33" * 512)
    parent = vhdx.create(_PARENT, 64 * KiB, block_size=4 * KiB)
    with vhdx.open(parent, "r+") as w:
        w.write_at(0, b"\x44" * 8 * KiB)
    child = vhdx.create(os.path.join(_TMP, "seed-child.avhd"), parent=parent)
    with vhdx.open(child, "r+") as w:
        w.write_at(4 * KiB + 512, b"\x55" * 512)
    for path, flags in ((dyn, 0), (fixed, 0), (child, 2)):
        with open(path, "rb") as f:
            body = f.read()
        out += [(flags, body), (flags | 1 | 4, body)]
    os.unlink(child)
    return out


def test_one_input(data: bytes) -> None:
    if not data:
        return
    flags, body = data[0], data[1:]
    if flags & 1:
        body = reseal(body)
    path = _CHILD if flags & 2 else _PLAIN
    with open(path, "wb") as f:
        f.write(body)
    try:
        with vhdx.open(path, search_dirs=[_TMP]) as disk:
            disk.read_at(0, min(disk.size, 1 << 20))
            disk.extents()
    except VhdxError:
        pass
    if flags & 4:
        try:
            vhdx.check_chain(path, search_dirs=[_TMP])  # reports; raises only VhdxError
        except VhdxError:
            pass


def main() -> None:
    args = list(sys.argv)
    corpus = [a for a in args[1:] if not a.startswith("-")]
    made = seeds()
    if corpus:
        for i, (flags, body) in enumerate(made):
            with open(os.path.join(corpus[0], f"seed{i}"), "wb") as f:
                f.write(bytes([flags]) + body)
    atheris.Setup(args, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
