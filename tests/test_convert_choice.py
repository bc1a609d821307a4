"""vhdx.convert.check_output / convert: the output-format choice and refusals that
used to live in the CLI, called as a library."""

from __future__ import annotations

import hashlib

import pytest

import vhdx
from vhdx.convert import check_output, convert
from vhdx.errors import OutputExistsError, UsageError

MiB = 1 << 20


@pytest.mark.parametrize("name, fmt", [("a.raw", "raw"), ("a.IMG", "raw"), ("a.vhdx", "vhdx"),
                                       ("a.avhdx", "vhdx"), ("a.vhd", "vhd"), ("-", "raw")])
def test_format_from_the_name(tmp_path, name, fmt):
    out = name if name == "-" else str(tmp_path / name)
    assert check_output(out) == fmt


def test_refusals_before_any_source_is_opened(tmp_path):
    with pytest.raises(UsageError, match="stdout"):
        check_output("-", "vhdx")
    with pytest.raises(UsageError, match="--type and --block-size"):
        check_output(str(tmp_path / "a.raw"), type="fixed")
    with pytest.raises(UsageError, match="--azure"):
        check_output(str(tmp_path / "a.vhdx"), azure=True)
    with pytest.raises(UsageError, match="QCOW2"):
        check_output(str(tmp_path / "a.qcow2"))
    with pytest.raises(UsageError, match="unknown format"):
        check_output(str(tmp_path / "a"), "qcow2")
    (tmp_path / "x.raw").write_bytes(b"keep")
    with pytest.raises(OutputExistsError):
        check_output(str(tmp_path / "x.raw"))
    assert check_output(str(tmp_path / "x.raw"), force=True) == "raw"
    assert (tmp_path / "x.raw").read_bytes() == b"keep"  # a check writes nothing


def test_convert_writes_the_format_the_name_says(tmp_path):
    src = tmp_path / "src.raw"
    data = bytes(range(256)) * (4 * MiB // 256)
    src.write_bytes(data)
    out = convert(src, tmp_path / "o.vhdx", block_size=MiB)
    with vhdx.open(out) as d:
        assert d.read_at(0, d.size) == data and d.block_size == MiB
    raw = convert(out, tmp_path / "back.img")
    with open(raw, "rb") as fh:
        assert hashlib.sha256(fh.read()).digest() == hashlib.sha256(data).digest()
    with pytest.raises(UsageError, match="convert_to_vhd"):
        convert(src, tmp_path / "o.vhd")
    assert not (tmp_path / "o.vhd").exists()
