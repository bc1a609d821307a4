"""Create new VHDX / AVHDX files: fixed, dynamic, or differencing (a checkpoint).

The layout comes from :mod:`vhdx.layout` (Hyper-V-like: log 1 MiB @ 1 MiB,
metadata 1 MiB @ 2 MiB, BAT @ 3 MiB, everything 1 MiB aligned, region and
metadata flags as FORMAT.md §3 / §4.1 require); limits are enforced there
(:func:`vhdx.layout.plan_layout`), not here.

A differencing disk takes from its parent (FORMAT.md §8.3 "Forking a new child"): the
virtual size, both sector sizes and the Virtual Disk ID (IsVirtualDisk items);
its ``parent_linkage`` is the parent's current DataWriteGuid and its locator
holds ``relative_path`` and ``absolute_win32_path`` as :mod:`vhdx.locator` writes
them (``.\\name.vhdx`` for a sibling; the ``\\\\?\\`` form).
"""

from __future__ import annotations

import os
import re

from . import fileio
from . import structures as S
from .errors import InvalidArgumentError, OutputDirectoryError, OutputExistsError, VhdxIOError
from .errors import converts_os_errors
from .image import ImageFile
from .locator import absolute_win32_path, relative_path
from .layout import LayoutPlan, ParentInfo, plan_layout, write_new_image
from .fdio import fsync_dir

__all__ = ["create", "plan_new", "parse_size", "creator_string", "parent_info_for"]

VHD_NAMES = (".vhd", ".avhd")  # a new file's name chooses the legacy format (vhdx.create)
_SUFFIXES = {"": 1, "K": S.KiB, "M": S.MiB, "G": S.GiB, "T": S.TiB}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """``"64M"`` -> 67108864. Suffixes K, M, G, T are binary (KiB, MiB, ...);
    ``KB``/``KiB`` spellings are accepted too. Plain numbers are bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    m = _SIZE_RE.match(str(text))
    if not m:
        raise InvalidArgumentError(f"bad size {text!r} (use a number with an optional K, M, G or T suffix)")
    return int(m.group(1)) * _SUFFIXES[m.group(2).upper()]


def creator_string() -> str:
    from ._version import __version__

    return f"vhdx {__version__}"


def parent_info_for(child_path: str | os.PathLike[str], parent: ImageFile) -> ParentInfo:
    """The locator a new child of ``parent`` gets (linkage = parent's DataWriteGuid)."""
    child_path, ppath = os.fspath(child_path), parent.path
    return ParentInfo(parent.data_write_guid, relative_path=relative_path(child_path, ppath),
                      absolute_win32_path=absolute_win32_path(ppath))


def plan_new(path: str | os.PathLike[str], size: int | str | None = None, *, type: str = "dynamic",  # noqa: A002
             block_size: int | str | None = None, logical_sector_size: int = 512,
             physical_sector_size: int = 4096,
             parent: str | os.PathLike[str] | None = None) -> LayoutPlan:
    """The layout :func:`create` would write at ``path`` (same arguments), validated."""
    path = os.fspath(path)
    try:
        return _plan_new(path, size, type, block_size, logical_sector_size, physical_sector_size, parent)
    except InvalidArgumentError as e:
        if path in str(e):
            raise
        raise InvalidArgumentError(f"{path}: {e}") from None  # layout limits name no file


def _plan_new(path: str, size: int | str | None, type: str, block_size: int | str | None,  # noqa: A002
              logical_sector_size: int, physical_sector_size: int,
              parent: str | os.PathLike[str] | None) -> LayoutPlan:
    if type not in ("dynamic", "fixed"):
        raise InvalidArgumentError(f"{path}: the type must be dynamic or fixed, not {type!r}")
    bs = parse_size(block_size) if block_size is not None else None
    if parent is not None:
        if type == "fixed":
            raise InvalidArgumentError(f"{path}: a differencing disk cannot be fixed")
        pimg = ImageFile(parent)
        try:
            vsize = pimg.virtual_size
            if size is not None and parse_size(size) != vsize:
                raise InvalidArgumentError(
                    f"{path}: a differencing disk has its parent's size ({vsize} bytes); "
                    "resize it after creating it")
            return plan_layout(vsize, bs, pimg.logical_sector_size, pimg.physical_sector_size,
                               parent=parent_info_for(path, pimg), creator=creator_string(),
                               virtual_disk_id=pimg.virtual_disk_id)
        finally:
            pimg.close()
    if size is None:
        raise InvalidArgumentError(f"{path}: a size is needed (or a parent)")
    return plan_layout(parse_size(size), bs, logical_sector_size, physical_sector_size,
                       fixed=type == "fixed", creator=creator_string())


@converts_os_errors
def create(path: str | os.PathLike[str], size: int | str | None = None, *, type: str = "dynamic",  # noqa: A002
           block_size: int | str | None = None, logical_sector_size: int = 512,
           physical_sector_size: int = 4096,
           parent: str | os.PathLike[str] | None = None) -> str:
    """Create a new VHDX/AVHDX file at ``path`` and return the path.

    ``type`` is ``"dynamic"`` or ``"fixed"``; with ``parent`` the new file is a
    differencing disk of that parent (``size`` then must be None or equal to the
    parent's size, and the sector sizes come from the parent). Never overwrites:
    an existing ``path`` raises :class:`OutputExistsError`; nor follows a symlink.
    """
    path = os.fspath(path)
    if path.lower().endswith(VHD_NAMES):  # vhdx.create (vhdx/formats.py) makes those
        raise InvalidArgumentError(f"{path}: a VHDX cannot take a VHD name (.vhd, .avhd)")
    plan = plan_new(path, size, type=type, block_size=block_size,
                    logical_sector_size=logical_sector_size,
                    physical_sector_size=physical_sector_size, parent=parent)
    if type == "fixed":
        from .preflight import check_space

        check_space(os.path.dirname(os.path.abspath(path)), plan.file_size, "creating a fixed disk", path)
    # O_EXCL with O_CREAT fails on any existing name, a symlink included (it is
    # never followed); O_NOFOLLOW says so where O_EXCL alone might not (NFSv2).
    flags = (os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
             | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
    try:
        fd = os.open(path, flags, 0o644)
    except FileExistsError:
        raise OutputExistsError(path, "already exists (refusing to overwrite)") from None
    except FileNotFoundError:
        raise OutputDirectoryError(path) from None
    except OSError as e:
        raise VhdxIOError.from_os(e, path) from None
    try:
        with os.fdopen(fd, "w+b") as fh:
            write_new_image(fh, plan)
            fh.flush()
            if type == "fixed":
                fileio.allocate(fh.fileno(), plan.file_size, path)
            os.fsync(fh.fileno())
    except BaseException:
        try:
            os.unlink(path)
        except OSError:
            pass
        raise
    fsync_dir(path)
    return path
