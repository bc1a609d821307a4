"""Create new VHD / AVHD files: fixed, dynamic, or differencing.

Windows' layout (vhd.md §1.2): footer copy at 0, dynamic header at 512, BAT at
1536 padded with 0xFF to a 4 KiB boundary, parent locator data (differencing)
after it in 4 KiB-aligned slots, and each block's sector bitmap in the last
sector(s) before a 4 KiB boundary so block data is 4 KiB aligned. The footer
of a new dynamic disk sits where the next block's bitmap will go.

Geometry: Current Size is the size asked for (what Windows and Hyper-V expose).
CHS is the spec's geometry when it describes exactly that size; otherwise the
maximum 65535/16/255, which QEMU and Disk2vhd write so that CHS-trusting
readers (qemu-img 7.2) fall back to Current Size (vhd.md §2.3, §3).
A differencing child records the parent's footer Unique Id (raw bytes), the
parent's footer Time Stamp, the parent path as Parent Unicode Name (UTF-16BE)
and two locators: W2ku (absolute path) and W2ru (``.\\name`` relative to the
child), UTF-16LE, Platform Data Space in bytes (as Windows).
"""

from __future__ import annotations

import os
import time
import uuid
from typing import TYPE_CHECKING, Any

from ..locator import relative_path, windows_path  # the same locator rules as VHDX children
from .. import fileio
from ..errors import InvalidArgumentError, OutputDirectoryError, OutputExistsError, VhdxIOError
from ..fdio import fsync_dir, pwrite_all
from . import structures as S

if TYPE_CHECKING:  # the file reader is needed for annotations only
    from .file import VhdFile

__all__ = ["VHD_SUFFIXES", "create_vhd", "footer_for", "new_layout", "plan_new_dynamic", "write_layout"]

VHD_SUFFIXES = (".vhd", ".avhd")
DEFAULT_BLOCK_SIZE = 2 * 1024 * 1024
ALIGN = 4096
CREATOR_APP = b"vhdx"
CREATOR_VERSION = 0x00000001


def _align(n: int, a: int = ALIGN) -> int:
    return -(-n // a) * a


def now_timestamp() -> int:
    return max(0, int(time.time()) - S.EPOCH_OFFSET)


def geometry_for(size: int, exact_chs: bool = False) -> tuple[int, int, int]:
    """CHS for a new disk of ``size`` bytes (see the module docstring); ``exact_chs``
    always uses the spec's (rounded-down) geometry, as Windows and Azure do."""
    c, h, s = S.chs_geometry(size)
    if exact_chs or c * h * s * S.SECTOR == size:
        return c, h, s
    return 65535, 16, 255


def footer_for(size: int, disk_type: int, unique_id: bytes, *, data_offset: int | None = None,
               timestamp: int | None = None, exact_chs: bool = False,
               creator_app: bytes = CREATOR_APP, creator_version: int = CREATOR_VERSION) -> bytes:
    c, h, s = geometry_for(size, exact_chs)
    return S.build_footer(
        data_offset=S.NO_DATA_OFFSET if data_offset is None else data_offset,
        timestamp=now_timestamp() if timestamp is None else timestamp,
        creator_app=creator_app, creator_version=creator_version, creator_os=b"Wi2k",
        original_size=size, current_size=size, cylinders=c, heads=h, sectors_per_track=s,
        disk_type=disk_type, unique_id=unique_id)


def next_block_position(end: int, bitmap_size: int) -> tuple[int, int]:
    """(bitmap offset, data offset) of a block placed at or after ``end``: data on
    the next 4 KiB boundary that leaves room for the bitmap before it."""
    data = _align(end + bitmap_size)
    return data - bitmap_size, data


def check_size(size: int, fixed: bool) -> None:
    if size <= 0 or size % S.SECTOR:
        raise InvalidArgumentError(f"VHD size {size} must be a positive multiple of 512 bytes")
    if not fixed and size > S.MAX_VIRTUAL_SIZE:
        raise InvalidArgumentError(f"a dynamic VHD holds at most 2040 GiB, not {size} bytes")


def plan_new_dynamic(size: int, block_size: int,
                     parent: dict[str, Any] | None = None) -> tuple[list[tuple[int, bytes]], int]:
    """Writes (offset, bytes) of a new dynamic/differencing disk and its file size.

    ``parent``: ``unique_id`` (bytes), ``timestamp``, ``name`` (Parent Unicode
    Name), ``w2ku``, ``w2ru``.
    """
    if block_size < S.SECTOR or block_size & (block_size - 1) or block_size > S.MAX_BLOCK_SIZE:
        raise InvalidArgumentError(f"VHD block size {block_size} must be a power of two from 512 to 256 MiB")
    check_size(size, fixed=False)
    entries = -(-size // block_size)
    bat_off = 1536
    bat_end = _align(bat_off + 4 * entries)
    writes: list[tuple[int, bytes]] = []
    bat = b"\xff" * (bat_end - bat_off)  # unallocated entries and 0xFF padding (Windows)
    writes.append((bat_off, bat))
    pos = bat_end
    locators = []
    header_fields: dict[str, Any] = {}
    if parent is not None:
        for slot, (code, value) in enumerate(((S.PLATFORM_W2KU, parent["w2ku"]),
                                              (S.PLATFORM_W2RU, parent["w2ru"]))):
            data = value.encode("utf-16-le")
            space = max(ALIGN, _align(len(data)))
            locators.append(dict(platform_code=code, data_space=space, data_length=len(data),
                                 reserved=0, data_offset=pos))
            writes.append((pos, data))
            pos += space
        name = parent["name"]
        if len(name) > S.MAX_PARENT_NAME_UNITS:
            name = name.replace("\\", "/").rsplit("/", 1)[-1][:S.MAX_PARENT_NAME_UNITS]
        header_fields = dict(parent_unique_id=parent["unique_id"], parent_timestamp=parent["timestamp"],
                             parent_unicode_name=name.encode("utf-16-be").ljust(512, b"\0")[:512],
                             locators=locators)
    bm = S.bitmap_bytes(block_size)
    first_bitmap, _ = next_block_position(pos, bm)
    header = S.build_header(table_offset=bat_off, max_table_entries=entries, block_size=block_size,
                            **header_fields)
    writes.append((512, header))
    # The footer of the empty disk sits where the first block's bitmap will go.
    return writes, first_bitmap + S.FOOTER_SIZE


def parent_fields(child_path: str, parent: VhdFile) -> dict[str, Any]:
    return {"unique_id": parent.unique_id, "timestamp": parent.footer.timestamp,
            "name": windows_path(parent.path), "w2ku": windows_path(parent.path),
            "w2ru": relative_path(child_path, parent.path) or ""}  # "": another drive (Windows)


def create_vhd(path: str | os.PathLike[str], size: int | None = None, *, type: str = "dynamic",  # noqa: A002
               block_size: int | None = None, parent: str | os.PathLike[str] | None = None,
               unique_id: bytes | None = None, exact_chs: bool = False) -> str:
    """Create a new VHD/AVHD at ``path`` (never overwrites) and return the path.

    ``type`` "dynamic" or "fixed"; with ``parent`` (a VHD) a differencing disk of
    the parent's size. ``exact_chs`` writes the spec's rounded-down CHS even when
    it does not describe the size (Windows / Azure style).
    """
    from .file import VhdFile, is_vhd_file

    path = os.fspath(path)
    bs = block_size or DEFAULT_BLOCK_SIZE
    uid = unique_id or uuid.uuid4().bytes_le  # Windows stores GUID structures (vhd.md §0)
    if type not in ("dynamic", "fixed"):
        raise InvalidArgumentError(f"type must be 'dynamic' or 'fixed', not {type!r}")
    pinfo = None
    if parent is not None:
        if type == "fixed":
            raise InvalidArgumentError("a differencing disk cannot be fixed")
        if not is_vhd_file(parent):
            raise InvalidArgumentError(f"{os.fspath(parent)}: the parent of a VHD must be a VHD "
                                       "(mixed VHD/VHDX chains are not supported)")
        with VhdFile(parent) as p:
            if size is not None and size != p.virtual_size:
                raise InvalidArgumentError(f"a differencing disk has its parent's size ({p.virtual_size} bytes)")
            size = p.virtual_size
            pinfo = parent_fields(path, p)
    if size is None:
        raise InvalidArgumentError("a size is needed (or a parent)")
    writes, file_size = new_layout(size, type=type, block_size=bs, unique_id=uid, pinfo=pinfo,
                                   exact_chs=exact_chs)
    if type == "fixed":
        fileio.check_free_space(path, file_size, "a fixed VHD")
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
        write_layout(fd, writes, file_size, path)
        if type == "fixed":
            fileio.allocate(fd, file_size, path)  # really allocated, as Hyper-V makes them
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        fileio.discard_temp(path)
        raise
    os.close(fd)
    fsync_dir(path)
    return path


def new_layout(size: int, *, type: str, block_size: int, unique_id: bytes,  # noqa: A002
               pinfo: Any = None, exact_chs: bool = False) -> tuple[list[tuple[int, bytes]], int]:
    """(writes, file size) of a new VHD of ``size`` bytes: fixed, or dynamic /
    differencing (``pinfo``: the parent fields)."""
    check_size(size, fixed=type == "fixed")
    if type == "fixed":
        return [(size, footer_for(size, S.TYPE_FIXED, unique_id, exact_chs=exact_chs))], size + S.FOOTER_SIZE
    writes, file_size = plan_new_dynamic(size, block_size, pinfo)
    footer = footer_for(size, S.TYPE_DIFFERENCING if pinfo else S.TYPE_DYNAMIC, unique_id,
                        data_offset=512, exact_chs=exact_chs)
    return writes + [(0, footer), (file_size - S.FOOTER_SIZE, footer)], file_size


def write_layout(fd: int, writes: list[tuple[int, bytes]], file_size: int, path: str) -> None:
    """Lay a :func:`new_layout` into the empty file ``fd`` (sparse: what is not
    written reads as zeros); no fsync."""
    os.ftruncate(fd, file_size)
    for off, data in writes:
        pwrite_all(fd, data, off, path)
