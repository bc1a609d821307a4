"""The format dispatch (vhdx/formats.py): one entry point per job, routed by signature.

Images come from the project's own writers (``vhdx.create``); the VHD side is
read back with libvhdi elsewhere (tests/test_vhd_*), here only the routing is
under test: which class answers, which module refused, and that probing a file
changes nothing and never waits on a FIFO.
"""

from __future__ import annotations

import hashlib
import os
import threading

import pytest

import vhdx
from vhdx import formats
from vhdx.disk import VirtualDisk
from vhdx.errors import InvalidArgumentError, ParentMismatchError, VhdxError
from vhdx.vhd import VhdDisk
from vhdx.vhd.writer import VhdWritableDisk
from vhdx.writer import WritableDisk

MiB = 1 << 20


def sha(p) -> str:
    with open(p, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


@pytest.fixture()
def pair(tmp_path):
    vx, vh = tmp_path / "a.vhdx", tmp_path / "a.vhd"
    vhdx.create(vx, 4 * MiB)
    vhdx.create(vh, 4 * MiB)
    return vx, vh


def test_detect_by_signature_not_name(tmp_path, pair) -> None:
    vx, vh = pair
    before = {p: sha(p) for p in pair}
    assert formats.detect(vx) == "vhdx" and formats.detect(vh) == "vhd"
    # names lie: the signature decides
    swapped_vx, swapped_vh = tmp_path / "really-vhdx.vhd", tmp_path / "really-vhd.vhdx"
    swapped_vx.write_bytes(vx.read_bytes())
    swapped_vh.write_bytes(vh.read_bytes())
    assert formats.detect(swapped_vx) == "vhdx" and formats.detect(swapped_vh) == "vhd"
    raw = tmp_path / "raw.img"
    raw.write_bytes(bytes(MiB))
    assert formats.detect(raw) is None
    assert formats.detect(tmp_path / "missing.vhdx") is None  # the open names the problem
    assert formats.detect(tmp_path) is None  # a folder
    with open(vx, "rb") as fh:
        assert formats.detect(fh) is None  # file objects are not probed
    assert {p: sha(p) for p in pair} == before


def test_detect_never_waits_on_a_fifo(tmp_path) -> None:
    fifo = tmp_path / "f.vhdx"
    os.mkfifo(fifo)
    got: list[object] = []
    t = threading.Thread(target=lambda: got.append(formats.detect(fifo)), daemon=True)
    t.start()
    t.join(5)
    assert not t.is_alive() and got == [None]


def test_open_returns_each_formats_class(pair) -> None:
    vx, vh = pair
    with vhdx.open(vx) as d:
        assert type(d) is VirtualDisk
    with vhdx.open(vh) as d:
        assert type(d) is VhdDisk
    with vhdx.open(vx, "r+") as w:
        assert isinstance(w, WritableDisk)
        w.write_at(0, b"x" * 512)
    with vhdx.open(vh, "r+") as w:
        assert isinstance(w, VhdWritableDisk)
        w.write_at(0, b"y" * 512)
    with vhdx.open(vx) as d, vhdx.open(vh) as e:
        assert d.read_at(0, 512) == b"x" * 512 and e.read_at(0, 512) == b"y" * 512
    for mode in ("w", "a", "r+w"):
        with pytest.raises(InvalidArgumentError, match="not supported"):
            vhdx.open(vx, mode)  # type: ignore[call-overload]  # what the Literal refuses statically


def test_the_vhdx_reader_alone_knows_no_vhd_and_no_writer(pair) -> None:
    vx, vh = pair
    from vhdx.disk import open as open_vhdx

    with pytest.raises(InvalidArgumentError, match="r\\+"):
        open_vhdx(vx, "r+")  # type: ignore[arg-type]
    with pytest.raises(VhdxError):
        open_vhdx(vh)  # no routing below the dispatch: a VHD is no VHDX


def test_mixed_chains_refused_by_the_dispatch(tmp_path, pair) -> None:
    vx, vh = pair
    kid = tmp_path / "kid.avhdx"
    vhdx.create(kid, parent=vx)
    before = sha(kid), sha(vh)
    with pytest.raises(ParentMismatchError, match="mixed"):
        vhdx.open(kid, parents=[vh])
    with pytest.raises(ParentMismatchError, match="mixed"):
        vhdx.merge(kid, parents=[vh], dry_run=True)
    with pytest.raises(InvalidArgumentError, match="mixed"):
        vhdx.create(tmp_path / "k2.avhdx", parent=vh)
    assert (sha(kid), sha(vh)) == before
    # the VHDX writer underneath refuses a VHD name instead of making a VHDX called .vhd
    from vhdx.create import create as create_vhdx

    with pytest.raises(InvalidArgumentError, match="VHD name"):
        create_vhdx(tmp_path / "x.avhd", 4 * MiB)
    assert not (tmp_path / "x.avhd").exists()


def test_check_chain_and_merge_route_both_formats(tmp_path, pair) -> None:
    vx, vh = pair
    for base in pair:
        kid = tmp_path / ("k" + base.suffix.replace(".", ".a", 1))  # .avhdx / .avhd
        vhdx.create(kid, parent=base)
        with vhdx.open(kid, "r+") as w:
            w.write_at(MiB, b"z" * 4096)
        report = vhdx.check_chain(kid)
        assert report.clean and report.files == [str(kid), str(base)], report
        s = vhdx.merge(kid)
        assert s.target == str(base) and not kid.exists()
        with vhdx.open(base) as d:
            assert d.read_at(MiB, 4096) == b"z" * 4096
        # the VHDX checker alone does not take a VHD
        from vhdx.check import check_chain as check_vhdx

        assert check_vhdx(base).clean == (base == vx)


def test_open_source_reads_either_format(pair) -> None:
    vx, vh = pair
    for p in pair:
        with vhdx.open(p, "r+") as w:
            w.write_at(2 * MiB, b"q" * 512)
        with formats.open_source(p) as src:
            assert src.size == 4 * MiB and src.files == [str(p)]
            buf = bytearray(512)
            src.readinto(2 * MiB, memoryview(buf))
            assert bytes(buf) == b"q" * 512
