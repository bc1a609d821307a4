"""vhdx.locator: parent-locator paths written (relative, \\\\?\\ absolute, UNC) and read back.

The expected strings are the forms MS-VHDX 2.6.2.6 and Win32 file namespaces
define (``\\\\?\\C:\\...``, ``\\\\?\\UNC\\server\\share\\...``) and Hyper-V writes
(``.\\name`` for a sibling); the file-system tests check the round trip against
real files instead of against the implementation's own output.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import vhdx
from vhdx import locator as L
from vhdx.hyperv.winpath import parse_winpath

MiB = 1 << 20


# --- writing -------------------------------------------------------------------------
def test_absolute_win32_path_drive_letter_unc_and_prefixed():
    assert L.absolute_win32_path("C:\\VMs\\base.vhdx", windows=True) == "\\\\?\\C:\\VMs\\base.vhdx"
    assert L.absolute_win32_path("\\\\srv\\share\\d\\base.vhdx", windows=True) == \
        "\\\\?\\UNC\\srv\\share\\d\\base.vhdx"
    # already in the file namespace: not prefixed twice
    assert L.absolute_win32_path("\\\\?\\D:\\x.vhdx", windows=True) == "\\\\?\\D:\\x.vhdx"
    # a POSIX host keeps the path's shape behind the prefix
    assert L.absolute_win32_path("/vm/disks/base.vhdx", windows=False) == "\\\\?\\\\vm\\disks\\base.vhdx"


def test_windows_path_forms():
    assert L.windows_path("C:\\VMs\\a.vhd", windows=True) == "C:\\VMs\\a.vhd"
    assert L.windows_path("/vm/a.vhd", windows=False) == "\\vm\\a.vhd"


def test_relative_path_sibling_child_folder_and_dotdot(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "c").mkdir()
    assert L.relative_path(tmp_path / "a" / "child.avhdx", tmp_path / "a" / "base.vhdx") == ".\\base.vhdx"
    assert L.relative_path(tmp_path / "a" / "child.avhdx", tmp_path / "a" / "b" / "base.vhdx") == \
        ".\\b\\base.vhdx"
    assert L.relative_path(tmp_path / "a" / "b" / "child.avhdx", tmp_path / "c" / "base.vhdx") == \
        "..\\..\\c\\base.vhdx"
    # a sibling whose name starts with two dots is not a climb
    assert L.relative_path(tmp_path / "a" / "child.avhdx", tmp_path / "a" / "..base.vhdx") == ".\\..base.vhdx"


# --- reading -------------------------------------------------------------------------
@pytest.mark.parametrize("value, plain", [
    ("\\\\?\\C:\\VMs\\base.vhdx", "C:\\VMs\\base.vhdx"),
    ("\\\\?\\UNC\\srv\\share\\base.vhdx", "\\\\srv\\share\\base.vhdx"),
    ("\\\\?\\unc\\srv\\share\\base.vhdx", "\\\\srv\\share\\base.vhdx"),  # any case of UNC
    ("C:\\VMs\\base.vhdx", "C:\\VMs\\base.vhdx"),
    ("\\\\srv\\share\\base.vhdx", "\\\\srv\\share\\base.vhdx"),
])
def test_strip_win32_prefix(value, plain):
    assert L.strip_win32_prefix(value) == plain


def test_win32_to_local_maps_only_this_projects_posix_form():
    assert L.win32_to_local("\\\\?\\\\vm\\base.vhdx", windows=False) == "/vm/base.vhdx"
    for foreign in ("\\\\?\\C:\\VMs\\base.vhdx", "\\\\?\\UNC\\srv\\share\\b.vhdx",
                    "\\\\?\\Volume{0b1c2d3e-0000-0000-0000-000000000000}\\b.vhdx", "C:\\b.vhdx"):
        assert L.win32_to_local(foreign, windows=False) is None
    assert L.win32_to_local("\\\\?\\C:\\b.vhdx", windows=True) == "\\\\?\\C:\\b.vhdx"
    # what is written on a POSIX host maps back to the same file
    assert L.win32_to_local(L.absolute_win32_path("/vm/x y/b.vhdx", windows=False), windows=False) == \
        "/vm/x y/b.vhdx"


def test_candidate_paths_order_names_and_nul():
    loc = {"relative_path": "..\\old\\base.vhdx",
           "volume_path": "\\\\?\\Volume{0b1c2d3e-0000-0000-0000-000000000000}\\VMs\\base.vhdx",
           "absolute_win32_path": "\\\\?\\UNC\\srv\\share\\VMs\\other.vhdx"}
    posix = L.candidate_paths("/ev/kids/child.avhdx", loc, ["/more"], windows=False)
    assert posix == ["/ev/old/base.vhdx", "/ev/kids/base.vhdx", "/more/base.vhdx",
                     "/ev/kids/other.vhdx", "/more/other.vhdx"]
    win = L.candidate_paths("/ev/kids/child.avhdx", loc, [], windows=True)
    # Windows: the volume path keeps its prefix (it only works with it), the UNC one loses it
    assert win[1:3] == [loc["volume_path"], "\\\\srv\\share\\VMs\\other.vhdx"]
    assert L.candidate_paths("/ev/c.avhdx", {"relative_path": "a\0b.vhdx"}, windows=False) == []


def test_opener_candidates():
    loc = {"relative_path": "..\\p\\base.vhdx", "absolute_win32_path": "\\\\?\\UNC\\s\\sh\\base2.vhdx"}
    assert L.opener_candidates("zip/kids/child.avhdx", loc) == [
        "zip/p/base.vhdx", "zip/kids/base.vhdx", "base.vhdx", "zip/kids/base2.vhdx", "base2.vhdx"]


def test_vhd_and_hyperv_read_prefixes_the_same_way():
    for raw in ("\\\\?\\UNC\\srv\\Share\\VMs\\a.vhdx", "\\\\?\\unc\\srv\\Share\\VMs\\a.vhdx"):
        wp = parse_winpath(raw)
        assert (wp.kind, wp.drive, wp.parts) == ("unc", "\\\\srv\\share", ["VMs", "a.vhdx"])
    wp = parse_winpath("\\\\?\\C:\\VMs\\a.vhdx")
    assert (wp.kind, wp.drive, wp.parts) == ("drive", "C", ["VMs", "a.vhdx"])
    assert parse_winpath("\\\\?\\volume{0b1c2d3e-0000-0000-0000-000000000000}\\a.vhdx").kind == "device"


# --- against real files ------------------------------------------------------------------
def test_a_child_in_another_folder_finds_its_parent_by_the_written_locator(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "kids" / "deep").mkdir(parents=True)
    base = vhdx.create(tmp_path / "base" / "b.vhdx", 4 * MiB)
    child = tmp_path / "kids" / "deep" / "c.avhdx"
    vhdx.create(child, parent=base)
    with vhdx.ImageFile(child) as img:
        loc = dict(img.parent_locator or {})
    assert loc["relative_path"] == "..\\..\\base\\b.vhdx"
    assert os.path.samefile(L.resolve_relative(child, loc["relative_path"]), base)
    if os.name != "nt":
        local = L.win32_to_local(loc["absolute_win32_path"])
        assert local is not None and os.path.samefile(local, base)
    # the chain opens through the locator alone, from another working directory
    cwd = os.getcwd()
    try:
        os.chdir(Path(tmp_path / "kids"))
        with vhdx.open(child) as d:
            assert [os.path.realpath(f.path) for f in d.chain] == [os.path.realpath(child),
                                                                   os.path.realpath(base)]
    finally:
        os.chdir(cwd)
