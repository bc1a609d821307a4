"""The format dispatch: the one module that knows both VHDX and legacy VHD.

``vhdx.open``, ``vhdx.create``, ``vhdx.check_chain``, ``vhdx.merge`` and the
conversion's source (:func:`open_source`) look at the file (its signature, never
its name; a file still to be made, by its name) and hand it to that format's own
modules: the VHDX ones (``disk``, ``writer``, ``create``, ``check``,
``merge_engine``, ``convert``) or ``vhdx/vhd/``, which builds on them. Nothing
below this module routes between the formats (docs/DESIGN.md, the layer table;
``tests/test_layers.py`` enforces it). Mode "r+" is built here too: the writers
sit above the read-only disk.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Literal, overload

from . import structures as S
from .check import CheckReport
from .check import check_chain as check_vhdx_chain
from . import convert as _convert
from .convert import Source, disk_source
from .convert import open_source as open_vhdx_source
from .create import VHD_NAMES, parse_size
from .create import create as create_vhdx
from .disk import ReadMode, VirtualDisk, WriteMode
from .disk import open as open_vhdx
from .errors import InvalidArgumentError, ParentMismatchError, VhdxError, converts_os_errors
from .image import ReadableObject
from .merge_engine import MergeSummary, ProgressFn
from .merge_engine import merge as merge_vhdx
from .storage import Storage

if TYPE_CHECKING:
    from .vhd.writer import VhdWritableDisk
    from .writer import WritableDisk

__all__ = ["DiskType", "Format", "check_chain", "create", "detect", "merge", "open", "open_source"]

PathArg = str | os.PathLike[str]
Format = Literal["vhdx", "vhd"]
DiskType = Literal["dynamic", "fixed"]


def detect(path: PathArg | ReadableObject) -> Format | None:
    """The format of the file at ``path`` by its signature (``vhdxfile`` at 0; a
    VHD footer at the end or its copy at 0), None for anything else. A file
    object is not probed: None."""
    if not isinstance(path, (str, os.PathLike)):
        return None
    from .vhd.file import is_vhd_file

    if is_vhd_file(path):  # says False for a VHDX (checks its signature first)
        return "vhd"
    try:  # O_NONBLOCK and the mode check: a FIFO is never waited on
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except (OSError, ValueError):  # missing, unreadable, a NUL in the name: the open says why
        return None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISREG(mode) or stat.S_ISBLK(mode):
            return "vhdx" if os.pread(fd, 8, 0) == S.SIG_FILE else None
        return None
    except OSError:
        return None
    finally:
        os.close(fd)


@contextmanager
def _no_vhd_parents(path: PathArg | ReadableObject,
                    parents: Sequence[PathArg | ReadableObject] | None) -> Iterator[None]:
    """A VHDX chain that fails to open with a VHD among ``parents`` names the real
    cause: mixed VHD/VHDX chains are not supported."""
    try:
        yield
    except VhdxError:
        for p in parents or ():
            if isinstance(p, (str, os.PathLike)) and detect(p) == "vhd":
                top = os.fspath(path) if isinstance(path, (str, os.PathLike)) else repr(path)
                raise ParentMismatchError(
                    f"{top}: a VHDX differencing disk cannot have the VHD parent {os.fspath(p)} "
                    "(mixed VHD/VHDX chains are not supported; convert the whole chain to one format)"
                ) from None
        raise


@overload
def open(path: PathArg | ReadableObject, mode: ReadMode = "r", *,  # noqa: A001 - mirrors io.open
         parents: Sequence[PathArg | ReadableObject] | None = None, search_dirs: Sequence[PathArg] = (),
         ignore_linkage: bool = False, force_share: bool = False, confine: Sequence[PathArg] | None = None,
         force: bool = False, opener: Callable[[str], object] | None = None,
         ignore_checksums: bool = False) -> VirtualDisk: ...


@overload
def open(path: PathArg, mode: WriteMode, *,  # noqa: A001
         parents: Sequence[PathArg | ReadableObject] | None = None, search_dirs: Sequence[PathArg] = (),
         ignore_linkage: bool = False, force_share: bool = False, confine: Sequence[PathArg] | None = None,
         force: bool = False, opener: Callable[[str], object] | None = None,
         ignore_checksums: bool = False) -> WritableDisk | VhdWritableDisk: ...


@converts_os_errors
def open(path: PathArg | ReadableObject, mode: ReadMode | WriteMode = "r", *,  # noqa: A001
         parents: Sequence[PathArg | ReadableObject] | None = None, search_dirs: Sequence[PathArg] = (),
         ignore_linkage: bool = False, force_share: bool = False, confine: Sequence[PathArg] | None = None,
         force: bool = False, opener: Callable[[str], object] | None = None,
         ignore_checksums: bool = False) -> VirtualDisk:
    """Open a virtual disk and its whole parent chain; ``mode`` "r" (default,
    read-only) or "r+" (writable top file; parents stay read-only).

    The format comes from the file's signature: VHDX/AVHDX opens as a
    :class:`vhdx.VirtualDisk` (:class:`vhdx.writer.WritableDisk` for "r+"), a
    legacy VHD/AVHD as a :class:`vhdx.vhd.VhdDisk` (``VhdWritableDisk``);
    ``ignore_checksums`` applies to VHD only.

    ``path`` may be an open binary file object (a regular file behind it is read
    through its descriptor, anything else through ``readinto``/``seek``; such
    opens are read-only, VHDX only). ``parents`` lists parent files or file
    objects explicitly (immediate parent first); otherwise parents are found
    through ``opener(name)`` when given (it returns a file object, a path, or
    None for each candidate name from the parent locator), else through the
    parent locator on the file system and ``search_dirs``, only inside the
    ``confine`` folder trees when given. A dirty log is replayed in memory; a
    read-only open never writes a byte. Files are locked as QEMU locks them
    (readers shared; :mod:`vhdx.locking`): LockedError while a writer holds one,
    unless ``force_share`` (read-only only, as qemu-img's ``-U``). "r+" refuses
    a VHDX that other disks depend on (DependentDisksError naming them,
    :mod:`vhdx.dependents`) unless ``force``; forced, ``disk.warnings`` names the
    children that the writes invalidate.
    """
    writable = mode in ("r+", "r+b", "rb+")
    if not writable and mode not in ("r", "rb"):
        raise InvalidArgumentError(f"mode {mode!r} is not supported (use 'r' or 'r+')")
    if detect(path) == "vhd":
        assert isinstance(path, (str, os.PathLike))  # detect() probes paths only
        if writable:
            if force_share:
                raise InvalidArgumentError("force_share is for read-only opens")
            from .vhd.writer import VhdWritableDisk

            return VhdWritableDisk(path, parents=parents, search_dirs=search_dirs,  # type: ignore[arg-type]
                                   ignore_linkage=ignore_linkage, force=force)  # (file objects: VhdFile refuses them)
        from .vhd.disk import open_vhd

        return open_vhd(path, parents=parents, search_dirs=search_dirs,  # type: ignore[arg-type]
                        ignore_linkage=ignore_linkage, ignore_checksums=ignore_checksums, force_share=force_share)
    with _no_vhd_parents(path, parents):
        if writable:
            if not isinstance(path, (str, os.PathLike)):
                raise InvalidArgumentError("file objects open read-only; give a path for mode 'r+'")
            if force_share:
                raise InvalidArgumentError("force_share is for read-only opens")
            return _open_writable(path, parents, search_dirs, ignore_linkage, confine, force)
        return open_vhdx(path, parents=parents, search_dirs=search_dirs, ignore_linkage=ignore_linkage,
                         force_share=force_share, confine=confine, opener=opener)


def _open_writable(path: PathArg, parents: Sequence[PathArg | ReadableObject] | None,
                   search_dirs: Sequence[PathArg], ignore_linkage: bool,
                   confine: Sequence[PathArg] | None, force: bool) -> WritableDisk:
    from .dependents import invalidated_note, refuse_if_children
    from .writer import WritableDisk

    # Opening writes nothing (a dirty log aside, whose replay keeps the content);
    # the chain's folders are known only once it is open.
    disk = WritableDisk(path, parents=parents, search_dirs=search_dirs,  # type: ignore[arg-type]
                        ignore_linkage=ignore_linkage, confine=confine)
    try:
        children = refuse_if_children(path, "writing", search_dirs, force=force,
                                      chain=[f.path for f in disk.chain[1:]])
    except BaseException:
        disk.close()
        raise
    if children:
        disk.warnings.append(f"{os.fspath(path)}: opened with force; writes make its children "
                             + invalidated_note(children))
    return disk


@converts_os_errors
def create(path: PathArg, size: int | str | None = None, *, type: DiskType = "dynamic",  # noqa: A002
           block_size: int | str | None = None, logical_sector_size: int = 512,
           physical_sector_size: int = 4096, parent: PathArg | None = None) -> str:
    """Create a new disk at ``path`` and return the path: a legacy VHD/AVHD when
    the name ends ``.vhd``/``.avhd`` (:mod:`vhdx.vhd.create`), else a VHDX/AVHDX
    (:func:`vhdx.create.create`).

    ``type`` is ``"dynamic"`` or ``"fixed"``; with ``parent`` the new file is a
    differencing disk of that parent (``size`` then must be None or equal to the
    parent's size, and the sector sizes come from the parent). Never overwrites:
    an existing ``path`` raises :class:`OutputExistsError`; nor follows a symlink.
    """
    path = os.fspath(path)
    if path.lower().endswith(VHD_NAMES):
        from .vhd.create import create_vhd

        if type not in ("dynamic", "fixed"):
            raise InvalidArgumentError(f"{path}: the type must be dynamic or fixed, not {type!r}")
        if logical_sector_size != 512:
            raise InvalidArgumentError(f"{path}: a VHD always has 512-byte sectors")
        bs = parse_size(block_size) if block_size is not None else None
        return create_vhd(path, parse_size(size) if size is not None else None, type=type,
                          block_size=bs, parent=parent)
    if parent is not None and detect(parent) == "vhd":
        raise InvalidArgumentError(f"{os.fspath(parent)}: the parent of a VHDX must be a VHDX "
                                   "(mixed VHD/VHDX chains are not supported; name the child .avhd)")
    return create_vhdx(path, size, type=type, block_size=block_size, logical_sector_size=logical_sector_size,
                       physical_sector_size=physical_sector_size, parent=parent)


@converts_os_errors
def check_chain(path: PathArg, parents: Sequence[PathArg] | None = None, search_dirs: Sequence[PathArg] = (),
                ignore_linkage: bool = False, *, confine: Sequence[PathArg] | None = None,
                force_share: bool = False) -> CheckReport:
    """Validate ``path`` and every ancestor (VHDX: :mod:`vhdx.check`; VHD:
    :mod:`vhdx.vhd.check`); never raises for problems in the files.
    ``confine`` and ``force_share`` as for :func:`open` (VHDX)."""
    if detect(path) == "vhd":
        from .vhd.check import check_vhd_chain

        return check_vhd_chain(path, parents, search_dirs, ignore_linkage)
    return check_vhdx_chain(path, parents, search_dirs, ignore_linkage, confine=confine, force_share=force_share)


@converts_os_errors
def merge(child: PathArg, into: PathArg | None = None, output: PathArg | None = None, *,
          dry_run: bool = False, keep: bool = False, force: bool = False, progress: ProgressFn | None = None,
          parents: Sequence[PathArg] | None = None, search_dirs: Sequence[PathArg] = (),
          ignore_linkage: bool = False, allow_clone: bool = True,
          storage_factory: Callable[[str], Storage] | None = None,
          confine: Sequence[PathArg] | None = None) -> MergeSummary:
    """Merge ``child`` into its parent (or ``into``), or flatten it into ``output``
    (VHDX: :func:`vhdx.merge_engine.merge`, which documents the arguments; VHD:
    :mod:`vhdx.vhd.merge`, where ``allow_clone`` and ``confine`` do not apply)."""
    if detect(child) == "vhd":
        from .vhd.merge import merge_vhd

        return merge_vhd(child, into, output, dry_run=dry_run, keep=keep, force=force, progress=progress,
                         parents=parents, search_dirs=search_dirs, ignore_linkage=ignore_linkage,
                         storage_factory=storage_factory)
    with _no_vhd_parents(child, parents):
        return merge_vhdx(child, into, output, dry_run=dry_run, keep=keep, force=force, progress=progress,
                          parents=parents, search_dirs=search_dirs, ignore_linkage=ignore_linkage,
                          allow_clone=allow_clone, storage_factory=storage_factory, confine=confine)


@converts_os_errors
def open_source(source: PathArg, *, parents: Sequence[PathArg] | None = None,
                search_dirs: Sequence[PathArg] = (), ignore_linkage: bool = False,
                ignore_checksums: bool = False) -> Source:
    """What a conversion reads (:class:`vhdx.convert.Source`): a VHDX or VHD chain,
    a raw file or a block device; ``ignore_checksums`` as for :func:`open`."""
    if detect(source) == "vhd":
        disk = open(source, parents=parents, search_dirs=search_dirs, ignore_linkage=ignore_linkage,
                    ignore_checksums=ignore_checksums)
        return disk_source(os.fspath(source), disk)
    with _no_vhd_parents(source, parents):
        return open_vhdx_source(source, parents=parents, search_dirs=search_dirs, ignore_linkage=ignore_linkage)


def _vhd_source(path: PathArg, *, parents: Sequence[PathArg] | None = None, search_dirs: Sequence[PathArg] = (),
                ignore_linkage: bool = False, ignore_checksums: bool = False) -> Source | None:
    """A VHD chain as a conversion source, or None for any other file (the hook
    :data:`vhdx.convert.SOURCE_OPENERS`)."""
    if detect(path) != "vhd":
        return None
    return open_source(path, parents=parents, search_dirs=search_dirs, ignore_linkage=ignore_linkage,
                       ignore_checksums=ignore_checksums)


_convert.SOURCE_OPENERS.append(_vhd_source)
