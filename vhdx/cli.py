"""The ``vhdx`` command line.

Every command that opens an image takes the same chain options. Failures print
one line to stderr and exit non-zero: 1 for problems with the images or the
operation, 2 for wrong usage.
"""

from __future__ import annotations

import argparse
import builtins
import hashlib
import json
import os
import sys
from typing import Any, Callable, Sequence

from . import __version__
from . import structures as S
from .check import check_chain
from .create import parse_size
from .disk import VirtualDisk, open as open_disk
from .errors import ParentNotFoundError, VhdxError, naming
from .image import ImageFile
from .progress import Progress

CHUNK = 4 << 20


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
    return open_disk(args.image, parents=args.parent, search_dirs=args.search_dir,
                     ignore_linkage=args.ignore_linkage, confine=getattr(args, "confine", None),
                     force_share=getattr(args, "force_share", False),
                     ignore_checksums=getattr(args, "ignore_checksums", False))


def _guid(g: Any) -> str:
    return str(g)


def image_info(img) -> dict:  # noqa: ANN001 - ImageFile
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


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:g} {unit}" if unit == "B" else f"{n:.4g} {unit}"
        n /= 1024
    return str(n)


class _LoneImage:
    """An image whose parent is absent, shown alone (its own headers, locator
    and ranges): what `info` and `map --own` can still say of a seized checkpoint."""

    def __init__(self, img: ImageFile, missing: str) -> None:
        self.chain = [img]
        self.size = img.virtual_size
        self.missing = missing
        self.warnings = [f"{img.path}: {w}" for w in img.warnings] + [
            f"{missing}; shown alone: content reads need the parent"]

    def partitions(self) -> list:
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

        if is_vhd_file(args.image):
            lone = VhdFile(args.image, ignore_checksums=getattr(args, "ignore_checksums", False))
        else:
            lone = ImageFile(args.image, force_share=getattr(args, "force_share", False))
        return _LoneImage(lone, str(e))


def cmd_info(args: argparse.Namespace) -> int:
    with _open_or_alone(args) as disk:
        # A VHD file describes itself (vhdx.vhd.file.VhdFile.info).
        chain = [img.info() if hasattr(img, "info") else image_info(img) for img in disk.chain]
        try:
            parts = [p.to_dict() for p in disk.partitions()]
        except VhdxError as e:  # an unreadable table must not hide the rest of the report
            parts = []
            disk.warnings.append(f"partition table: {e}")
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
                  f"block size {_human(f['block_size'])}, sectors {f['logical_sector_size']}/{f['physical_sector_size']}")
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
        for w in disk.warnings:
            print(f"warning: {w}")
    return 0


def cmd_map(args: argparse.Namespace) -> int:
    if args.own:  # only what the top file holds itself: needs no parent
        with ImageFile(args.image, force_share=getattr(args, "force_share", False)) as img:
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
                       "extents": [e.to_dict(disk.chain) for e in extents]}, sys.stdout, indent=1)
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


def cmd_hash(args: argparse.Namespace) -> int:
    with _open(args) as disk:
        h = hashlib.new(args.algorithm)
        bar = Progress(disk.size, "hash")
        copy_disk(disk, lambda _off, data: h.update(data), bar)
        bar.close()
        print(f"{h.hexdigest()}  {args.image}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    out = args.output
    if out.lower().endswith((".vhd", ".avhd")) or args.azure:
        from .vhd.cli import cmd_convert_to_vhd

        return cmd_convert_to_vhd(args)
    if out.lower().endswith((".vhdx", ".avhdx")):
        return _convert_to_vhdx(args)
    if args.type or args.block_size:
        raise VhdxError(f"{out}: --type and --block-size apply to .vhdx/.avhdx outputs only")
    if os.path.exists(out) and not args.force:
        raise VhdxError(f"{out}: already exists (use --force to overwrite)")
    with _open(args) as disk:
        for f in disk.chain:
            if os.path.exists(out) and os.path.samefile(out, f.path):
                raise VhdxError(f"{out}: is part of the chain being read")
        tmp = out + ".part"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            data_bytes = sum(e.length for e in disk.extents() if e.kind == "data")
            bar = Progress(data_bytes, "convert")
            copy_disk(disk, lambda off, data: _pwrite_all(fd, data, off), bar, skip_holes=True)
            os.ftruncate(fd, disk.size)
            os.fsync(fd)
            bar.close()
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        os.replace(tmp, out)
    return 0


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def _convert_to_vhdx(args: argparse.Namespace) -> int:
    from .convert import convert_to_vhdx, is_vhdx_file, raw_data_ranges
    from .vhd.file import is_vhd_file

    src = args.image
    total = None
    if is_vhdx_file(src) or is_vhd_file(src):
        with _open(args) as disk:
            total = sum(e.length for e in disk.extents() if e.kind == "data")
    else:
        fd = os.open(src, os.O_RDONLY)
        try:
            total = sum(n for _, n in raw_data_ranges(fd, os.fstat(fd).st_size))
        finally:
            os.close(fd)
    bar = Progress(total, "convert")
    convert_to_vhdx(src, args.output, type=args.type or "dynamic",
                    block_size=parse_size(args.block_size) if args.block_size else None,
                    parents=args.parent, search_dirs=args.search_dir,
                    ignore_linkage=args.ignore_linkage, force=args.force, progress=bar,
                    ignore_checksums=args.ignore_checksums)
    bar.close()
    return 0


def cmd_create(args: argparse.Namespace) -> int:
    from .create import create

    if args.parent and (args.size or args.type or args.logical_sector_size or args.physical_sector_size):
        raise VhdxError("--parent takes the size, type and sector sizes from the parent; "
                        "use only --block-size with it")
    if not args.parent and not args.size:
        raise VhdxError("--size or --parent is required")
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
        disk.resize(size)
    if children:
        print(f"vhdx: warning: {args.image}: resized with --force; its children are "
              + invalidated_note(children), file=sys.stderr)
    return 0


def _repair(args: argparse.Namespace) -> None:
    """``check --repair``: replay a dirty log of IMAGE into the file (ref §6.4)."""
    from . import log as LOG
    from .headers import read_header_section
    from .log_writer import LogWriter
    from .storage import FileStorage
    from .writer import lock_exclusive

    path = args.image
    out = sys.stderr if args.json else sys.stdout
    print = lambda *a: builtins.print(*a, file=out)  # noqa: E731,A001 - keep --json output clean
    if args.dry_run:
        st = FileStorage.open(path, writable=False)
        try:
            hs = read_header_section(st.pread)
            h = hs.header
            if not h.log_dirty:
                print(f"{path}: log is clean, nothing to replay")
                return
            size = st.size()
            plan = LOG.plan_replay(st.pread(h.log_offset, h.log_length), h.log_length, h.log_guid, size,
                                   h.log_offset)
            if plan.empty:
                print(f"{path}: would clear an empty log (LogGuid set, no entry); no data changes")
                return
            changed = sum(1 for u in plan.updates if u.data is not None
                          and st.pread(u.file_offset, u.length).ljust(u.length, b"\0") != u.data)
            sectors = sum(1 for u in plan.updates if u.data is not None)
            zero_bytes = sum(u.length for u in plan.updates if u.data is None)
            ext = (f", extend the file from {size} to {plan.last_file_offset} bytes"
                   if plan.last_file_offset > size else "")
            print(f"{path}: would replay {len(plan.entries)} log entr{'y' if len(plan.entries) == 1 else 'ies'}: "
                  f"{sectors} sector(s) written ({changed} differ from the file), "
                  f"{zero_bytes} byte(s) zeroed{ext}; headers updated (new FileWriteGuid, LogGuid cleared)")
        finally:
            st.close()
        return
    # Nothing is opened for writing before the log is known to need it: a clean
    # image on read-only media (or held read-only by another tool) checks fine.
    ro = FileStorage.open(path, writable=False)
    try:
        clean = not read_header_section(ro.pread).header.log_dirty
    finally:
        ro.close()
    if clean:
        print(f"{path}: log is clean, nothing to replay")
        return
    st = FileStorage.open(path, writable=True)
    try:
        lock_exclusive(st.fd, path)
        lw = LogWriter(st)
        if not lw.needs_replay:
            print(f"{path}: log is clean, nothing to replay")
            return
        try:
            r = lw.replay()
        except VhdxError as e:
            raise naming(e, path) from None
        ext = f", file extended to {r.extended_to} bytes" if r.extended_to else ""
        if r.empty_log:
            print(f"{path}: cleared an empty log (LogGuid set, no entry)")
        else:
            print(f"{path}: replayed {r.entries} log entr{'y' if r.entries == 1 else 'ies'}: "
                  f"{r.sectors_written} sector(s) written, {r.zero_bytes} byte(s) zeroed{ext}")
    finally:
        st.close()


def cmd_check(args: argparse.Namespace) -> int:
    if args.dry_run and not args.repair:
        raise VhdxError("--dry-run needs --repair")
    if args.repair and args.force_share:
        raise VhdxError(f"{args.image}: --repair writes; it cannot be combined with --force-share")
    if args.repair:
        _repair(args)
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
    return 0 if report.clean else 1


def cmd_merge(args: argparse.Namespace) -> int:
    from .merge_engine import merge

    bar = Progress(0, "dry run" if args.dry_run else "merge")
    if args.force_share:
        raise VhdxError(f"{args.image}: --force-share is for read-only commands")
    summary = merge(args.image, into=args.into, output=args.output, dry_run=args.dry_run,
                    keep=args.keep, force=args.force, progress=bar, parents=args.parent,
                    search_dirs=args.search_dir, ignore_linkage=args.ignore_linkage,
                    confine=args.confine)
    bar.close()
    if args.json:
        json.dump(summary.to_dict(), sys.stdout, indent=1)
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
    p = argparse.ArgumentParser(prog="vhdx", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"vhdx {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("info", help="describe the whole chain: headers, regions, metadata, log")
    _chain_options(s)
    s.add_argument("--json", action="store_true")
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
    s.add_argument("--algorithm", choices=("sha256", "sha1", "md5"), default="sha256")
    s.set_defaults(func=cmd_hash)

    s = sub.add_parser("convert", help="write the virtual disk to a sparse raw file or a new standalone VHDX")
    _chain_options(s)
    s.add_argument("output", help="output file: .vhdx/.avhdx makes a new standalone VHDX, "
                   "anything else a sparse raw image")
    s.add_argument("--force", action="store_true", help="overwrite an existing output")
    s.add_argument("--type", choices=("dynamic", "fixed"), help="VHDX or VHD output type (default dynamic)")
    s.add_argument("--block-size", metavar="SIZE", help="output block size (default 32M for VHDX, 2M for VHD)")
    s.add_argument("--azure", action="store_true",
                   help="VHD output as Azure accepts it: fixed, size rounded up to a whole MiB")
    s.set_defaults(func=cmd_convert)

    s = sub.add_parser("create", help="create a new fixed, dynamic or differencing disk")
    s.add_argument("output", help="new .vhdx or .avhdx file (never overwritten)")
    s.add_argument("--size", metavar="SIZE", help="virtual size, e.g. 64G (suffixes K, M, G, T)")
    s.add_argument("--type", choices=("dynamic", "fixed"), help="default dynamic")
    s.add_argument("--block-size", metavar="SIZE", help="default 32M (2M for differencing disks)")
    s.add_argument("--logical-sector-size", type=int, choices=(512, 4096))
    s.add_argument("--physical-sector-size", type=int, choices=(512, 4096))
    s.add_argument("--parent", metavar="PARENT", help="make a differencing disk (checkpoint) of PARENT")
    s.set_defaults(func=cmd_create)

    s = sub.add_parser("resize", help="grow (or shrink, if the cut range is empty) a disk")
    _chain_options(s)
    s.add_argument("--size", metavar="SIZE", required=True, help="new virtual size (K, M, G, T)")
    s.add_argument("--force", action="store_true",
                   help="resize even though other disks depend on this one (they become invalid)")
    s.set_defaults(func=cmd_resize)

    s = sub.add_parser("check", help="validate every file of the chain; exit 0 only when clean")
    _chain_options(s)
    s.add_argument("--json", action="store_true")
    s.add_argument("--repair", action="store_true",
                   help="first replay a dirty log of IMAGE into the file")
    s.add_argument("--dry-run", action="store_true",
                   help="with --repair: report what the replay would change, write nothing")
    s.set_defaults(func=cmd_check)

    s = sub.add_parser("merge", help="merge a checkpoint into its parent or an ancestor, or flatten a chain")
    _chain_options(s)
    s.add_argument("--into", metavar="ANCESTOR",
                   help="fold the chain down to this ancestor (default: the parent); also names a "
                        "target outside the child's folder, which is refused otherwise")
    s.add_argument("--output", metavar="NEW.vhdx", help="flatten the chain into a new standalone VHDX instead")
    s.add_argument("--dry-run", action="store_true", help="report what would be cloned, copied and zeroed")
    s.add_argument("--keep", action="store_true", help="keep the merged files (they stay valid)")
    s.add_argument("--force", action="store_true",
                   help="merge even though other disks depend on the target (they become invalid)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_merge)
    _register_extra_commands(sub)
    return p


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


def _register_extra_commands(sub: Any) -> None:
    import importlib

    for name in _COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is not None and (name == e.name or name.startswith(e.name + ".")):
                continue  # that command is not part of this build
            raise
        mod.register(sub, _chain_options)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except VhdxError as e:
        print(f"vhdx: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("vhdx: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Output closed early (| head): not an error worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"vhdx: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
