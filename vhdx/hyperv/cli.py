"""``vhdx vm show|scan|clean`` and ``vhdx config dump``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import InvalidArgumentError, VhdxError

if TYPE_CHECKING:  # the commands import .vm lazily; the annotations only name its classes
    from .vm import Checkpoint, Inventory, VmReport


def jsonable(v: Any) -> Any:
    """Typed config values as JSON: bytes as hex, file-object references as dicts."""
    from .container import FileObjectRef

    if isinstance(v, bytes):
        return v.hex()
    if isinstance(v, FileObjectRef):
        return {"file_object": v.offset, "length": v.length}
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    return v


def _dump_json(obj: Any) -> None:
    json.dump(jsonable(obj), sys.stdout, indent=1)
    print()


def _vm_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", action="append", default=[], metavar="DIR",
                   help="where the host's volume is mounted or copied: DIR for any drive letter, "
                        "C:=DIR for one, \\\\server\\share=DIR for a share (repeatable)")
    p.add_argument("--search-dir", action="append", default=[], metavar="DIR",
                   help="directory to look for disks and parents in (repeatable)")
    p.add_argument("--json", action="store_true")


def _inventory(args: argparse.Namespace, path: str, ignore_linkage: bool = False) -> Inventory:
    from .vm import inventory
    from .winpath import PathMapper

    try:
        mapper = PathMapper(args.root, args.search_dir)
    except ValueError as e:
        raise InvalidArgumentError(str(e)) from None
    return inventory(path, mapper, args.search_dir, ignore_linkage)


def _print_tree(nodes: list[dict[str, Any]], checkpoints: dict[str, Checkpoint], indent: str) -> None:
    for n in nodes:
        if n["id"] == "Now":
            print(f"{indent}Now")
        else:
            c = checkpoints[n["id"]]
            saved = {True: "saved state", False: "no saved state", None: "saved state unknown"}[c.saved_state]
            src = "" if c.parent_source == "disk chains" else f", parent by {c.parent_source}"
            print(f"{indent}{c.name!r} {c.id}, created {c.created}, {saved}, type unknown{src}")
        _print_tree(n["children"], checkpoints, indent + "  ")


def _print_vm(rep: VmReport) -> None:
    v = rep.config
    print(f"VM {v.name!r} {v.id}, generation {v.generation}, configuration version {v.version_text}, "
          f"created {v.created}")
    print(f"  config {v.path}")
    print(f"  data root {rep.data_root}; checkpoint root {rep.snapshot_root}; "
          f"runtime state: {rep.saved_state_note}")
    print("  drives:")
    resolved = {id(dd.drive): dd for dd in rep.drives}
    for d in v.drives:
        print(f"    {d.label} {d.type or '?'} {d.pathname!r}" + (f" (controller {d.controller_id})"
                                                           if d.bus == "SCSI" else ""))
        dd = resolved.get(id(d))
        if dd is None:
            continue
        if dd.resolution.how and dd.resolution.how != "root":
            print(f"      found by file name ({dd.resolution.how}): {dd.resolution.local}")
        if dd.chain:
            for depth, f in enumerate(dd.chain):
                print(f"      {'  ' * depth}{f.path}{' (differencing)' if f.has_parent else ''}")
        else:
            print(f"      {dd.error}")
    cps = {c.id: c for c in rep.checkpoints}
    print(f"  checkpoints: {len(rep.checkpoints)} (tree derived from the disk chains; Now marked)")
    _print_tree(rep.tree(), cps, "    ")
    for c in rep.checkpoints:
        for dd in c.disks:
            print(f"    {c.id} {dd.drive.label} frozen disk: "
                  f"{dd.top.path if dd.top else dd.error}")
    lg = rep.lingering
    print(f"  lingering: {len(lg.unowned_links)} unowned chain link(s), {len(lg.orphans)} orphan(s), "
          f"pending merge {'yes' if lg.pending_merge else 'no'}")
    for u in lg.unowned_links:
        print(f"    unowned chain link {u['path']}: {u['note']}")
    for o in lg.orphans:
        print(f"    orphan differencing disk {o['path']}: {o['note']}")
    for u in rep.unresolved:
        print(f"  unresolved: {u['of']} {u['slot'] or ''} {u['windows_path']!r}: {u['problem']}")
    for note in rep.findings + v.warnings:
        print(f"  note: {note}")


def _print_inventory(inv: Inventory) -> None:
    for i, rep in enumerate(inv.vms):
        if i:
            print()
        _print_vm(rep)
    for h in inv.hosts:
        print(f"host registry {h.path}: format version {h.format_version}, {len(h.vms)} VM(s), "
              f"{len(h.cache)} cache entries, {len(h.resource_types)} resource types")
        for g, p in h.vms.items():
            print(f"  {g} {p}")
    for u in inv.registry_unresolved:
        print(f"registered VM {u['vm']} not found locally: {u['windows_path']!r}: {u['problem']}")
    for p in inv.unattributed:
        print(f"checkpoint configuration not attributed to a VM: {p}")
    for e in inv.errors:
        print(f"unreadable configuration: {e['error']}")


def _finish(inv: Inventory) -> int:
    if inv.errors:
        n = len(inv.errors)
        print(f"vhdx: error: {inv.errors[0]['error']}" + (f" (and {n - 1} more unreadable)" if n > 1 else ""),
              file=sys.stderr)
        return 1
    return 0


def cmd_vm_show(args: argparse.Namespace) -> int:
    inv = _inventory(args, args.path)
    if args.json:
        _dump_json(inv.to_dict())
    else:
        if not inv.vms and not inv.hosts:
            print(f"{args.path}: no VM configuration found")
        _print_inventory(inv)
    return _finish(inv)


def cmd_vm_scan(args: argparse.Namespace) -> int:
    from .vm import unreferenced_disks

    inv = _inventory(args, args.dir)
    groups = unreferenced_disks(args.dir, inv)
    if args.json:
        _dump_json({**inv.to_dict(), "unreferenced_disks": groups})
        return _finish(inv)
    _print_inventory(inv)
    print(f"\n{sum(len(g['files']) for g in groups)} disk file(s) that no configuration references, "
          f"in {len(groups)} chain(s):")
    for g in groups:
        extra = (f" (hangs off {g['hangs_off']})" if g["hangs_off"] else
                 " (its parent was not found)" if g["parent_missing"] else "")
        if g.get("error"):
            extra = f" (unreadable: {g['error']})"
        print(f"  chain {g['base']}{extra}")
        for p in g["files"][1:]:
            print(f"    {p}")
    return _finish(inv)


def cmd_vm_clean(args: argparse.Namespace) -> int:
    from .clean import clean

    inv = _inventory(args, args.path)
    if inv.errors:
        raise VhdxError(f"{inv.errors[0]['error']} (not cleaning while a configuration is unreadable)")
    report = clean(inv, args.search_dir, args.dry_run)
    failed = []
    if not args.dry_run and any(s.done for s in report.steps):
        after = _inventory(args, args.path)
        for rep in after.vms:
            for dd in rep.drives + [d for c in rep.checkpoints for d in c.disks]:
                if dd.chain is None:
                    failed.append(f"{rep.config.path} {dd.drive.label}: {dd.error}")
            report.verified.append(rep.config.path)
    if args.json:
        _dump_json({**report.to_dict(), "failed": failed})
    else:
        if not report.steps:
            print("no unowned chain links to fold")
        for s in report.steps:
            head = "will not fold" if s.refused else "would fold" if args.dry_run else "folded"
            print(f"{head} {', '.join(s.links)} into {s.target}; re-point {s.child} to it"
                  + (f"; delete {', '.join(s.links)}" if not s.refused else ""))
            if s.refused:
                print(f"  refused: {s.refused}")
            elif s.summary:
                print(f"  blocks changed {s.summary['blocks_changed']}")
        for p in report.verified:
            print(f"verified: every drive of {p} still opens")
    if failed:
        print(f"vhdx: error: {failed[0]}", file=sys.stderr)
        return 1
    return 1 if any(s.refused for s in report.steps) else 0


def cmd_config_dump(args: argparse.Namespace) -> int:
    from .container import open_config

    cfg = open_config(args.file, replay=not args.no_replay, strict=not args.salvage,
                      load_file_objects=not args.no_file_objects)
    h = cfg.header
    if args.json:
        _dump_json({
            "file": cfg.path, "file_size": cfg.file_size,
            "header": vars(h), "headers": [None if x is None else vars(x) for x in cfg.headers],
            "log": vars(cfg.log), "tables": [vars(t) for t in cfg.tables], "stats": cfg.stats(),
            "keys": [{"path": p, "type": k.type_name, "flags": k.flags, "value": k.value,
                      **({"invalid": k.invalid} if k.invalid else {})} for p, k in cfg.root.walk()],
            "tree": cfg.to_dict(), "orphans": [vars(o) for o in cfg.orphans], "warnings": cfg.warnings})
        return 0
    st = cfg.stats()
    print(f"{cfg.path}: HyperVStorage, format version {h.version:#06x}, header {h.slot + 1} current "
          f"(sequences {', '.join('invalid' if x is None else str(x.sequence) for x in cfg.headers)})")
    lg = cfg.log
    print(f"  replay log {lg.offset:#x}+{lg.size:#x}: {lg.active} active entries"
          + (", replayed in memory" if lg.replayed else ""))
    print(f"  {st['key_tables']} key tables, {st['entries']} entries ({st['free_entries']} free), "
          f"{st['keys']} keys ({st['nodes']} nodes, {st['values']} values)")
    for p, k in cfg.root.walk():
        if k.is_node:
            print(f"{p}/")
        else:
            v = jsonable(k.value)
            print(f"{p} = {k.type_name} {v!r}" + (f" ({k.invalid})" if k.invalid else ""))
    for o in cfg.orphans:
        print(f"orphan: {o.name!r} table {o.table} +{o.offset:#x}: {o.reason}")
    for w in cfg.warnings:
        print(f"warning: {w}")
    return 0


def register(subparsers: Any, chain_options: Callable[[argparse.ArgumentParser], None]) -> None:
    vm = subparsers.add_parser("vm", help="Hyper-V VMs offline: drives, checkpoints, lingering disks")
    vsub = vm.add_subparsers(dest="vm_command", required=True, metavar="SUBCOMMAND")
    s = vsub.add_parser("show", help="a VM (.vmcx, VM folder or folder of VMs): drives and chains, "
                                     "checkpoint tree, lingering disks")
    s.add_argument("path", help=".vmcx file, VM folder or folder of VMs")
    _vm_options(s)
    s.set_defaults(func=cmd_vm_show)
    s = vsub.add_parser("scan", help="every VM below DIR and every disk no configuration references")
    s.add_argument("dir")
    _vm_options(s)
    s.set_defaults(func=cmd_vm_scan)
    s = vsub.add_parser("clean", help="fold unowned chain links into their parents (never writes a config)")
    s.add_argument("path", help=".vmcx file, VM folder or folder of VMs")
    s.add_argument("--dry-run", action="store_true", help="list each step, change nothing")
    _vm_options(s)
    s.set_defaults(func=cmd_vm_clean)

    cfg = subparsers.add_parser("config", help="HyperVStorage files (.vmcx, .vmrs, data.vmcx)")
    csub = cfg.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    s = csub.add_parser("dump", help="the raw key tree of a .vmcx / .vmrs / data.vmcx")
    s.add_argument("file")
    s.add_argument("--json", action="store_true")
    s.add_argument("--no-replay", action="store_true",
                   help="read the tables as stored even when the replay log has active entries")
    s.add_argument("--no-file-objects", action="store_true",
                   help="do not load values kept in file objects (a saved state's RAM); show where they are")
    s.add_argument("--salvage", action="store_true",
                   help="report damaged object slots, tables and unattached keys as warnings, not errors")
    s.set_defaults(func=cmd_config_dump)
