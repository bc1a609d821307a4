"""The vhdx command line.

Every command that opens an image takes the same chain options. Exit codes are
qemu-img's: 0 success, 1 error, 2 wrong usage (check: 2 corruption, 3 only
warnings or leaks). A failure prints one line to stderr naming the file, never a
traceback; warnings raised when opening go to stderr (and into --json).
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import re
import shlex
import signal
import sys
from typing import TYPE_CHECKING, Any, Callable, NoReturn, Protocol, Sequence, cast

from ._version import __version__
from . import structures as S
from .create import parse_size
from .disk import VirtualDisk
from .errors import ImageNotFoundError, InvalidArgumentError, ParentNotFoundError, UsageError, VhdxError
from .formats import check_chain, open as open_disk
from .image import ImageFile
from .progress import Progress, clear_all, configure as configure_progress, human_size as _human

CHUNK = 4 << 20

if TYPE_CHECKING:
    from .partitions import Partition
    from .vhd.file import VhdFile


class _Resizable(Protocol):
    def resize(self, size: int) -> object: ...


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line and exit 2, like every usage error."""

    def error(self, message: str) -> "NoReturn":
        clear_all()
        self.exit(2, f"vhdx: error: {message} (see '{self.prog} --help')\n")


def _size_arg(text: str) -> int:
    """argparse type for SIZE options: bad values are usage errors (exit 2)."""
    try:
        n = parse_size(text)
    except InvalidArgumentError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"size {text!r} must be more than 0")
    return n


def _warn(warnings: Sequence[str]) -> None:
    """Open-time warnings, one line each on stderr (stdout stays the command's output)."""
    for w in warnings:
        print(f"vhdx: warning: {w}", file=sys.stderr)


def _chain_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", help="VHDX or AVHDX file")
    p.add_argument("--parent", action="append", default=[], metavar="PATH",
                   help="parent file, immediate parent first (repeatable)")
    p.add_argument("--search-dir", action="append", default=[], metavar="DIR",
                   help="directory to look for parents in (repeatable)")
    p.add_argument("--ignore-linkage", action="store_true",
                   help="accept parents whose DataWriteGuid does not match the child's linkage")
    p.add_argument("--confine", action="append", default=None, metavar="DIR",
                   help="look for parents only inside this folder tree (repeatable; for services "
                        "handling uploaded checkpoints)")
    p.add_argument("--force-share", action="store_true",
                   help="read without taking locks, e.g. the disks of a running VM (as qemu-img -U); "
                        "what is read may be inconsistent")
    p.add_argument("--ignore-checksums", action="store_true",
                   help="VHD only: read files whose footer copies and header all fail their checksums")


def _open(args: argparse.Namespace) -> VirtualDisk:
    disk = open_disk(args.image, parents=args.parent, search_dirs=args.search_dir,
                     ignore_linkage=args.ignore_linkage, confine=getattr(args, "confine", None),
                     force_share=getattr(args, "force_share", False),
                     ignore_checksums=getattr(args, "ignore_checksums", False))
    _warn(disk.warnings)
    return disk


def _guid(g: Any) -> str:
    return str(g)


def image_info(img: ImageFile) -> dict[str, Any]:
    hs = img.header_section
    md = img.metadata
    geo = img.geometry
    states = {S.PAYLOAD_STATE_NAMES.get(st, str(st)): n for st, n in img.block_state_counts().items()}
    return {
        "path": img.path,
        "creator": img.creator,
        "file_size": img.file_size,
        "type": "differencing" if md.has_parent else ("fixed" if md.leave_block_allocated else "dynamic"),
        "virtual_size": md.virtual_size,
        "block_size": md.block_size,
        "logical_sector_size": md.logical_sector_size,
        "physical_sector_size": md.physical_sector_size,
        "virtual_disk_id": _guid(md.virtual_disk_id),
        "data_write_guid": _guid(img.data_write_guid),
        "file_write_guid": _guid(img.file_write_guid),
        "current_header": hs.header.slot + 1,
        "headers": [None if h is None else {
            "slot": h.slot + 1, "sequence_number": h.sequence_number,
            "file_write_guid": _guid(h.file_write_guid), "data_write_guid": _guid(h.data_write_guid),
            "log_guid": _guid(h.log_guid), "log_offset": h.log_offset, "log_length": h.log_length,
        } for h in hs.headers],
        "region_table_copy": hs.region_table_slot + 1,
        "regions": [{"name": r.name, "guid": _guid(r.guid), "file_offset": r.file_offset,
                     "length": r.length, "required": r.required} for r in hs.regions],
        "metadata": [{"name": it.name, "offset": it.offset, "length": it.length,
                      "user": it.is_user, "virtual_disk": it.is_virtual_disk,
                      "required": it.is_required} for it in md.items],
        "parent_locator": md.parent_locator,
        "chunk_ratio": geo.chunk_ratio,
        "bat_entries": geo.total_entries,
        "blocks": states,
        "log": {
            "log_guid": _guid(hs.header.log_guid),
            "dirty": hs.header.log_dirty,
            "replayed_in_memory": img.log_replayed,
            "entries_replayed": len(img.replay.entries) if img.replay else 0,
        },
        "warnings": list(img.warnings),
    }


class _LoneImage:
    """An image whose parent is absent, shown alone (its own headers, locator
    and ranges): what `info` and `map --own` can still say of a seized checkpoint."""

    def __init__(self, img: "ImageFile | VhdFile", missing: str) -> None:
        self.chain = [img]
        self.size = img.virtual_size
        self.missing = missing
        self.warnings = [f"{img.path}: {w}" for w in img.warnings] + [
            f"{missing}; shown alone: content reads need the parent"]

    def partitions(self) -> "list[Partition]":
        return []  # the partition table is content: it needs the parent

    def __enter__(self) -> "_LoneImage":
        return self

    def __exit__(self, *exc: object) -> None:
        self.chain[0].close()


def _open_or_alone(args: argparse.Namespace) -> "VirtualDisk | _LoneImage":
    try:
        return _open(args)
    except ParentNotFoundError as e:
        if args.parent:
            raise
        from .vhd.file import VhdFile, is_vhd_file

        lone: ImageFile | VhdFile
        if is_vhd_file(args.image):
            lone = VhdFile(args.image, ignore_checksums=getattr(args, "ignore_checksums", False))
        else:
            lone = ImageFile(args.image, force_share=getattr(args, "force_share", False))
        alone = _LoneImage(lone, str(e))
        _warn(alone.warnings)
        return alone


def cmd_info(args: argparse.Namespace) -> int:
    with _open_or_alone(args) as disk:
        # A VHD file describes itself (vhdx.vhd.file.VhdFile.info).
        chain = [img.info() if hasattr(img, "info") else image_info(img) for img in disk.chain]
        try:
            parts = [p.to_dict() for p in disk.partitions()]
        except VhdxError as e:  # an unreadable table must not hide the rest of the report
            parts = []
            disk.warnings.append(f"partition table: {e}")
            _warn([f"partition table: {e}"])
        if args.json:
            out = {"virtual_size": disk.size, "chain": chain, "partitions": parts,
                   "warnings": disk.warnings}
            if isinstance(disk, _LoneImage):
                out["parent_missing"] = disk.missing
            json.dump(out, sys.stdout, indent=1)
            print()
            return 0
        for depth, f in enumerate(chain):
            print(f"{'  ' * depth}{f['path']}")
            ind = "  " * depth + "  "
            if f.get("format") == "vhd":
                from .vhd.report import info_lines

                for line in info_lines(f):
                    print(ind + line)
                continue
            print(f"{ind}type {f['type']}, virtual size {_human(f['virtual_size'])} ({f['virtual_size']} bytes), "
                  f"block size {_human(f['block_size'])}, "
                  f"sectors {f['logical_sector_size']}/{f['physical_sector_size']}")
            print(f"{ind}creator {f['creator']!r}, file size {f['file_size']}")
            print(f"{ind}disk id {f['virtual_disk_id']}, data write guid {f['data_write_guid']}")
            print(f"{ind}header {f['current_header']} current; " + ", ".join(
                "header %d %s" % (i + 1, "invalid" if h is None else f"seq {h['sequence_number']}")
                for i, h in enumerate(f["headers"])))
            print(f"{ind}regions: " + ", ".join(f"{r['name']} @{r['file_offset']:#x}+{r['length']:#x}"
                                                for r in f["regions"]))
            print(f"{ind}blocks: " + ", ".join(f"{k} {v}" for k, v in sorted(f["blocks"].items()) if v))
            log = f["log"]
            state = ("clean" if not log["dirty"] else
                     f"dirty, {log['entries_replayed']} entries replayed in memory")
            print(f"{ind}log: {state}")
            if f["parent_locator"]:
                for k, v in f["parent_locator"].items():
                    print(f"{ind}parent {k}: {v}")
        if parts:
            print(f"partitions ({parts[0]['scheme']}):")
        for p in parts:
            extra = "".join((f" {p['name']!r}" if p["name"] else "", " bootable" if p["bootable"] else "",
                             " extended" if p["container"] else ""))
            print(f"  {p['number']:>3}: @{p['offset']:#x}+{p['length']:#x} ({_human(p['length'])}) "
                  f"type {p['type']}{extra}")
    return 0


def cmd_map(args: argparse.Namespace) -> int:
    if args.own:  # only what the top file holds itself: needs no parent
        from .vhd.file import VhdFile, is_vhd_file

        own = (VhdFile(args.image, ignore_checksums=getattr(args, "ignore_checksums", False),
                       force_share=getattr(args, "force_share", False)) if is_vhd_file(args.image)
               else ImageFile(args.image, force_share=getattr(args, "force_share", False)))
        with own as img:
            extents = img.extents()
            if args.json:
                json.dump({"virtual_size": img.virtual_size, "file": img.path, "own": True,
                           "extents": [e.to_dict([img]) for e in extents]}, sys.stdout, indent=1)
                print()
                return 0
            print(f"{'offset':>18} {'length':>18}  kind         file offset")
            for e in extents:
                where = f"@{e.file_offset:#x}" if e.file_offset is not None else ""
                print(f"{e.offset:#18x} {e.length:#18x}  {e.kind:<12} {where}")
        return 0
    with _open(args) as disk:
        extents = disk.extents()
        if args.json:
            json.dump({"virtual_size": disk.size, "files": [f.path for f in disk.chain],
                       "extents": [e.to_dict(disk.chain) for e in extents],
                       "warnings": disk.warnings}, sys.stdout, indent=1)
            print()
            return 0
        print(f"{'offset':>18} {'length':>18}  kind         source")
        for e in extents:
            src = f"{disk.chain[e.source].path} @{e.file_offset:#x}" if e.source is not None else ""
            print(f"{e.offset:#18x} {e.length:#18x}  {e.kind:<12} {src}")
    return 0


def copy_disk(disk: VirtualDisk, sink: Callable[[int, memoryview], None],
              progress: Callable[[int], None] | None = None, skip_holes: bool = False) -> None:
    """Feed the whole virtual disk to ``sink(offset, data)`` in large chunks."""
    buf = bytearray(CHUNK)
    mv = memoryview(buf)
    zeros = bytes(CHUNK)
    ranges = ([(e.offset, e.length) for e in disk.extents() if e.kind == "data"]
              if skip_holes else [(0, disk.size)])
    done = 0
    for start, length in ranges:
        pos, end = start, start + length
        while pos < end:
            n = disk.readinto_at(pos, mv[:min(CHUNK, end - pos)])
            chunk = mv[:n]
            if not (skip_holes and chunk == zeros[:n]):
                sink(pos, chunk)
            pos += n
            done += n
            if progress:
                progress(done)


def _missing_bytes(warnings: Sequence[str]) -> list[str]:
    """The warnings saying that data lies past the end of a file (read as zeros)."""
    return [w for w in warnings if "past the end" in w]


def cmd_hash(args: argparse.Namespace) -> int:
    with _open(args) as disk:
        missing = _missing_bytes(disk.warnings)
        if missing:
            print(f"vhdx: warning: {args.image}: the hash covers data missing from a truncated file "
                  "(read as zeros); it is not the hash of the original disk", file=sys.stderr)
        if args.strict and disk.warnings:
            raise VhdxError(f"{args.image}: not hashed: {len(disk.warnings)} warning(s) when opening "
                            "(--strict)")
        h = hashlib.new(args.algorithm)
        bar = Progress(disk.size, "hash")
        copy_disk(disk, lambda _off, data: h.update(data), bar)
        bar.close()
        print(f"{h.hexdigest()}  {args.image}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .convert import check_output, convert
    from .formats import open_source

    fmt = check_output(args.output, args.format, type=args.type, block_size=args.block_size,
                       azure=args.azure, force=args.force)
    if fmt == "vhd":  # legacy VHD output (vhdx/vhd/convert.py)
        if args.output.lower().endswith(".avhd"):
            raise UsageError(f"{args.output}: a converted disk is standalone; name it .vhd")
        if args.azure and args.type == "dynamic":
            raise UsageError(f"{args.output}: --azure makes a fixed VHD; drop --type dynamic")
    with open_source(args.image, parents=args.parent, search_dirs=args.search_dir,
                     ignore_linkage=args.ignore_linkage,
                     ignore_checksums=getattr(args, "ignore_checksums", False)) as src:
        _warn(src.warnings)
        bar = Progress(src.data_bytes, "convert")
        try:
            if fmt == "vhd":
                from .vhd.convert import convert_to_vhd

                convert_to_vhd(src, args.output, type=args.type or "dynamic",
                               block_size=parse_size(args.block_size) if args.block_size else None,
                               azure=args.azure, force=args.force, progress=bar)
            else:
                convert(src, args.output, format=fmt, type=args.type, block_size=args.block_size,
                        force=args.force, progress=bar)
        finally:
            bar.close()
    return 0


def cmd_create(args: argparse.Namespace) -> int:
    from .formats import create

    if args.parent and (args.size or args.type or args.logical_sector_size or args.physical_sector_size):
        raise UsageError(f"{args.output}: --parent takes the size, type and sector sizes from the parent; "
                         "use only --block-size with it")
    if not args.parent and not args.size:
        raise UsageError(f"{args.output}: --size or --parent is required")
    kw = {}
    if args.logical_sector_size:
        kw["logical_sector_size"] = args.logical_sector_size
    if args.physical_sector_size:
        kw["physical_sector_size"] = args.physical_sector_size
    create(args.output, parse_size(args.size) if args.size else None, type=args.type or "dynamic",
           block_size=parse_size(args.block_size) if args.block_size else None,
           parent=args.parent, **kw)
    return 0


def cmd_resize(args: argparse.Namespace) -> int:
    from .dependents import invalidated_note, refuse_if_children

    size = parse_size(args.size)
    if args.force_share:
        raise VhdxError(f"{args.image}: --force-share is for read-only commands")
    # Children of a resized disk fail their linkage check and cannot be merged.
    children = refuse_if_children(args.image, "resizing", args.search_dir, force=args.force)
    with open_disk(args.image, "r+", parents=args.parent, search_dirs=args.search_dir,
                   ignore_linkage=args.ignore_linkage, confine=args.confine, force=True) as disk:
        cast(_Resizable, disk).resize(size)  # mode "r+": a writable disk (VHDX or VHD)
    if children:
        print(f"vhdx: warning: {args.image}: resized with --force; its children are "
              + invalidated_note(children), file=sys.stderr)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    if args.dry_run and not args.repair:
        raise UsageError(f"{args.image}: --dry-run needs --repair")
    if not os.path.lexists(args.image):  # nothing to check: an error (1), not corruption (2)
        raise ImageNotFoundError(args.image)
    if args.repair and args.force_share:
        raise UsageError(f"{args.image}: --repair writes; it cannot be combined with --force-share")
    if args.repair:
        from .repair import repair

        # With --json the report is the only thing on stdout.
        print(repair(args.image, dry_run=args.dry_run).describe(), file=sys.stderr if args.json else sys.stdout)
        if args.dry_run:
            return 0
    report = check_chain(args.image, args.parent, args.search_dir, args.ignore_linkage,
                         confine=args.confine, force_share=args.force_share)
    if args.json:
        json.dump(report.to_dict(), sys.stdout, indent=1)
        print()
    else:
        for f in report.findings:
            print(f"{f.severity}: {f.file}: {f.message}")
        n_err, n_warn = len(report.errors), len(report.findings) - len(report.errors)
        state = "clean" if report.clean else f"{n_err} error(s), {n_warn} warning(s)"
        print(f"{len(report.files)} file(s), {report.blocks_checked} blocks checked: {state}")
    # qemu-img check's codes: 2 corruption, 3 only leaks / warnings.
    return 0 if report.clean else (2 if report.errors else 3)


def cmd_merge(args: argparse.Namespace) -> int:
    from .formats import merge

    if args.into and args.output:
        raise UsageError(f"{args.image}: give either --into or --output, not both")
    bar = Progress(0, "dry run" if args.dry_run else "merge")
    if args.force_share:
        raise VhdxError(f"{args.image}: --force-share is for read-only commands")
    summary = merge(args.image, into=args.into, output=args.output, dry_run=args.dry_run,
                    keep=args.keep, force=args.force, progress=bar, parents=args.parent,
                    search_dirs=args.search_dir, ignore_linkage=args.ignore_linkage,
                    confine=args.confine)
    bar.close()
    _warn(summary.warnings)
    if args.json:
        d = summary.to_dict()
        if summary.dry_run:
            d["would_delete"] = [] if summary.mode == "flatten" or args.keep else list(summary.merged)
        json.dump(d, sys.stdout, indent=1)
        print()
        return 0
    if summary.mode == "completion":
        print("completed an earlier merge whose target is already done")
        for p in summary.deleted:
            print(f"  deleted {p}")
        return 0
    verb = "would merge" if summary.dry_run else "merged"
    print(f"{verb} {', '.join(summary.merged)} into {summary.target} ({summary.mode})")
    print(f"  blocks changed {summary.blocks_changed}; cloned {_human(summary.bytes_cloned)}, "
          f"copied {_human(summary.bytes_copied)}, zeroed {_human(summary.bytes_zeroed)}")
    if not summary.dry_run:
        print(f"  {summary.seconds:.2f} s, {_human(int(summary.throughput))}/s")
    for p in summary.repointed:
        print(f"  {'would re-point' if summary.dry_run else 're-pointed'} {p} to {summary.target}")
    for p in summary.deleted:
        print(f"  deleted {p}")
    if summary.dry_run and not args.keep and summary.mode != "flatten":
        for p in summary.merged:
            print(f"  would delete {p}")
    for p in summary.invalidated:
        print(f"  warning: {p} is now invalid: its parent changed under it (--force); "
              "its data no longer reads correctly")
    for w in summary.warnings:
        print(f"  note: {w}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="vhdx", description=__doc__.splitlines()[0],
                epilog="Exit codes: 0 success, 1 error, 2 wrong usage (check: 2 corruption, 3 warnings).")
    p.add_argument("--version", action="version", version=f"vhdx {__version__}")
    _output_options(p, argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("info", help="describe the whole chain: headers, regions, metadata, log")
    _chain_options(s)
    s.add_argument("--json", action="store_true", help="print the description as JSON")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("map", help="extent map: where every virtual byte comes from")
    _chain_options(s)
    s.add_argument("--json", action="store_true", help="print the map as JSON")
    s.add_argument("--own", action="store_true",
                   help="only the ranges IMAGE holds itself, with their file offsets (the changed-block "
                        "map of a checkpoint); needs no parent")
    s.set_defaults(func=cmd_map)

    s = sub.add_parser("hash", help="hash the virtual disk")
    _chain_options(s)
    s.add_argument("--algorithm", choices=("sha256", "sha1", "md5"), default="sha256",
                   help="hash algorithm (default sha256)")
    s.add_argument("--strict", action="store_true",
                   help="fail (exit 1) instead of hashing when opening raised any warning, "
                        "such as data missing from a truncated file")
    s.set_defaults(func=cmd_hash)

    s = sub.add_parser("convert", help="write the virtual disk to a raw image, a block device or a new VHDX",
                       description="Write the virtual disk (or a raw image or block device) to OUTPUT. "
                       "The format comes from --format or the name: .raw/.img/.bin raw, .vhdx/.avhdx "
                       "a standalone VHDX, .vhd/.avhd VHD; - streams raw bytes to stdout. A block "
                       "device OUTPUT is written in place (raw; --force needed).")
    _chain_options(s)
    s.add_argument("output", help="output file, block device, or - for stdout")
    s.add_argument("--format", choices=("raw", "vhdx", "vhd"),
                   help="output format (default: from the output name)")
    s.add_argument("--force", action="store_true",
                   help="overwrite an existing output file or block device")
    s.add_argument("--type", choices=("dynamic", "fixed"), help="VHDX output type (default dynamic)")
    s.add_argument("--block-size", metavar="SIZE", type=_size_arg, help="VHDX output block size (default 32M)")
    s.add_argument("--azure", action="store_true",
                   help="VHD output as Azure accepts it: fixed, size rounded up to a whole MiB")
    s.set_defaults(func=cmd_convert)

    s = sub.add_parser("create", help="create a new fixed, dynamic or differencing disk")
    s.add_argument("output", help="new .vhdx or .avhdx file (never overwritten)")
    s.add_argument("--size", metavar="SIZE", type=_size_arg,
                   help="virtual size, e.g. 64G (suffixes K, M, G, T)")
    s.add_argument("--type", choices=("dynamic", "fixed"), help="disk type (default dynamic)")
    s.add_argument("--block-size", metavar="SIZE", type=_size_arg,
                   help="block size (default 32M, 2M for differencing disks)")
    s.add_argument("--logical-sector-size", type=int, choices=(512, 4096),
                   help="logical sector size in bytes (default 512)")
    s.add_argument("--physical-sector-size", type=int, choices=(512, 4096),
                   help="physical sector size in bytes (default 4096)")
    s.add_argument("--parent", metavar="PARENT", help="make a differencing disk (checkpoint) of PARENT")
    s.set_defaults(func=cmd_create)

    s = sub.add_parser("resize", help="grow (or shrink, if the cut range is empty) a disk")
    _chain_options(s)
    s.add_argument("--size", metavar="SIZE", type=_size_arg, required=True,
                   help="new virtual size (K, M, G, T)")
    s.add_argument("--force", action="store_true",
                   help="resize even though other disks depend on this one (they become invalid)")
    s.set_defaults(func=cmd_resize)

    s = sub.add_parser("check", help="validate every file of the chain",
                       description="Validate every file of the chain. Exit codes: 0 clean, "
                       "2 corruption found, 3 only warnings or leaks, 1 the check itself failed.")
    _chain_options(s)
    s.add_argument("--json", action="store_true", help="print the report as JSON")
    s.add_argument("--repair", action="store_true",
                   help="WRITES to IMAGE: first replay its dirty log into the file, then check")
    s.add_argument("--dry-run", action="store_true",
                   help="with --repair: report what the replay would change, write nothing")
    s.set_defaults(func=cmd_check)

    s = sub.add_parser("merge", help="merge a checkpoint into its parent or an ancestor, or flatten a chain",
                       description="Merge IMAGE into its parent (or --into an ancestor): the merged "
                       "files are deleted afterwards unless --keep. With --output, flatten the chain "
                       "into a new standalone VHDX instead and change nothing.")
    _chain_options(s)
    s.add_argument("--into", metavar="ANCESTOR",
                   help="fold the chain down to this ancestor (default: the parent); also names a "
                        "target outside the child's folder, which is refused otherwise")
    s.add_argument("--output", metavar="NEW.vhdx", help="flatten the chain into a new standalone VHDX instead")
    s.add_argument("--dry-run", action="store_true",
                   help="report what would be cloned, copied and zeroed, and which files would be "
                        "deleted or re-pointed; write nothing")
    s.add_argument("--keep", action="store_true",
                   help="keep the merged files (by default they are deleted after the merge)")
    s.add_argument("--force", action="store_true",
                   help="merge even though other disks depend on the target (they become invalid)")
    s.add_argument("--json", action="store_true", help="print the summary as JSON")
    s.set_defaults(func=cmd_merge)
    _register_extra_commands(sub)
    for cmd in sub.choices.values():
        if "--quiet" not in cmd._option_string_actions:
            _output_options(cmd, argparse.SUPPRESS)
        _fill_help(cmd)
    return p


def _fill_help(p: argparse.ArgumentParser) -> None:
    """Options every command spells alike get their help text here when a command
    module left it out, so that --help documents every option (nested commands too)."""
    common = {"--json": "print the result as JSON"}
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for nested in a.choices.values():
                _fill_help(nested)
        elif not a.help and len(a.option_strings) == 1 and a.option_strings[0] in common:
            a.help = common[a.option_strings[0]]


def _output_options(p: argparse.ArgumentParser, default: object) -> None:
    """--quiet / --progress, accepted before or after the command name."""
    taken = p._option_string_actions
    g = p.add_mutually_exclusive_group()
    g.add_argument(*[o for o in ("-q", "--quiet") if o not in taken], action="store_true",
                   default=default, dest="quiet", help="no progress bar")
    if "--progress" not in taken:
        g.add_argument("--progress", action="store_true", default=default,
                       help="draw the progress bar even when stderr is not a terminal")


# Commands that live in their own modules: each module has
# ``register(subparsers, chain_options)`` adding its subcommands, whose ``func``
# takes the parsed arguments and returns the exit code.
_COMMAND_MODULES = (
    "vhdx.nbd",          # serve
    "vhdx.mount",        # mount, umount
    "vhdx.hyperv.cli",   # vm show/scan/clean, config dump
    "vhdx.relink",       # relink
    "vhdx.compact",      # compact
)


def _own_module(name: str) -> bool:
    """True when command module ``name`` exists in this very package directory.

    An editable install elsewhere can make ``vhdx.x`` resolve to another copy of
    the package; mixing modules of two copies breaks at import, so a command
    whose module lives elsewhere is treated as not part of this build.
    """
    import importlib.util

    sub = ".".join(name.split(".")[:2])  # vhdx.hyperv for vhdx.hyperv.cli (imports nothing of it)
    try:
        spec = importlib.util.find_spec(sub)
    except (ImportError, ValueError):
        return False
    if spec is None:
        return False
    where = spec.origin or next(iter(spec.submodule_search_locations or []), "")
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.abspath(where).startswith(here + os.sep)


def _register_extra_commands(sub: Any) -> None:
    import importlib

    for name in _COMMAND_MODULES:
        if not _own_module(name):
            continue  # that command is not part of this build
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is not None and (name == e.name or name.startswith(e.name + ".")):
                continue  # that command is not part of this build
            raise
        mod.register(sub, _chain_options)


# Python names in library messages, as the CLI spells them.
_CLI_WORDS = [
    (re.compile(r"\bvirtual_size\b"), "--size"), (re.compile(r"\bblock_size\b"), "--block-size"),
    (re.compile(r"\blogical_sector_size\b"), "--logical-sector-size"),
    (re.compile(r"\bphysical_sector_size\b"), "--physical-sector-size"),
    (re.compile(r"\bparent\.data_write_guid\b"), "the parent's DataWriteGuid"),
    (re.compile(r"must be > 0"), "must be more than 0"),
    (re.compile(r"``|`"), "'"),
]


def _one_line(msg: str) -> str:
    for rx, word in _CLI_WORDS:
        msg = rx.sub(word, msg)
    return " ".join(msg.split())  # one line, whatever the message held


def _resume_hint(args: argparse.Namespace, argv: Sequence[str]) -> str:
    """What is true after an interruption, and which command completes the job."""
    again = shlex.join(["vhdx", *argv])
    cmd = getattr(args, "command", None)
    if cmd == "merge" and not getattr(args, "dry_run", False):
        if getattr(args, "output", None):
            return f"the chain is intact and no output was written; run '{again}' to flatten it"
        return (f"the chain is intact (every disk reads as before); run '{again}' "
                "to complete the merge")
    if cmd == "convert":
        return f"the source is unchanged and no output was written; run '{again}' to convert"
    if cmd == "create":
        return f"no disk was created; run '{again}' to create it"
    if cmd in ("resize", "compact", "relink"):
        return f"every change is crash-safe and the disk reads consistently; run '{again}' to complete it"
    if cmd == "check" and getattr(args, "repair", False):
        return f"the log replay is crash-safe; run '{again}' to complete it"
    return "nothing was changed"


class _Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C (cleanup runs, one line, no traceback)."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    old_mode = configure_progress(False if getattr(args, "quiet", False) else
                                  True if getattr(args, "progress", False) else None)
    try:
        old_term = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (an embedding program): leave SIGTERM alone
        old_term = None
    try:
        rc: int = args.func(args)
        return rc
    except KeyboardInterrupt as e:
        clear_all()
        what = "terminated" if isinstance(e, _Terminated) else "interrupted"
        print(f"vhdx: {what}: {_resume_hint(args, argv)}", file=sys.stderr)
        return 143 if isinstance(e, _Terminated) else 130
    except UsageError as e:
        clear_all()
        print(f"vhdx: error: {_one_line(str(e))} (see 'vhdx {args.command} --help')", file=sys.stderr)
        return 2
    except VhdxError as e:
        clear_all()
        hint = ""
        if getattr(e, "errno", None) == errno.ENOSPC and "nothing was written" not in str(e):
            hint = "; the inputs are unchanged: free some space and run the command again"
        print(f"vhdx: error: {_name_file(args, _one_line(str(e)))}{hint}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # Output closed early (| head): not an error worth a traceback.
        clear_all()
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as e:
        clear_all()
        where = f"{e.filename}: " if e.filename else f"{getattr(args, 'image', None) or ''}: ".lstrip(": ")
        print(f"vhdx: error: {where}{_one_line(e.strerror or str(e))}", file=sys.stderr)
        return 1
    except MemoryError:
        clear_all()
        print(f"vhdx: error: {_subject(args)}: out of memory", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - the promise is one line, never a traceback
        if os.environ.get("VHDX_DEBUG"):
            raise
        clear_all()
        print(f"vhdx: error: {_subject(args)}: internal error ({type(e).__name__}: "
              f"{_one_line(str(e))}); please report it (VHDX_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 1
    finally:
        configure_progress(old_mode)  # main() may run again in this process (tests, embedders)
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)


def _name_file(args: argparse.Namespace, msg: str) -> str:
    """``msg``, prefixed with the command's file unless it already names a file."""
    names = [v for k in ("image", "output", "child", "parent", "into")
             for v in ([getattr(args, k, None)] if not isinstance(getattr(args, k, None), list)
                       else getattr(args, k)) if isinstance(v, str) and v]
    if any(n in msg for n in names) or re.match(r"^\S*[/\\]\S*: ", msg):
        return msg
    return f"{_subject(args)}: {msg}"


def _subject(args: argparse.Namespace) -> str:
    """The file a command is about, for messages that have no file of their own."""
    for name in ("image", "output", "child"):
        v = getattr(args, name, None)
        if isinstance(v, str):
            return v
    return str(getattr(args, "command", "vhdx"))


if __name__ == "__main__":
    sys.exit(main())
