"""``vm clean``: fold unowned chain links into their parents with the merge engine.

An unowned link is a differencing disk that some configuration's chain still
runs through but that no checkpoint configuration owns (hyperv.md §4.5.3). A run of
consecutive unowned links is folded, with one ``vhdx.merge(top, into=parent)``,
into the disk below it; the disk above the run is re-pointed to that parent by
the engine and the folded files are deleted. Refused, per run, when the target
is a disk any configuration references (a drive or a frozen disk: folding would
change what that configuration sees), when a link or the target has other
children, or when the VM's configuration says a merge is pending. No
configuration file is ever written: the files configurations reference keep
their paths and their content (only the re-pointed child's parent locator
changes, as with ``vhdx merge`` of a middle disk).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from ..errors import VhdxError
from .vm import DiskInfo, Inventory, VmReport


@dataclass
class Step:
    vm: str
    links: list[str]  # the run, top (merge child) first
    target: str
    child: str
    refused: str | None = None
    summary: dict[str, Any] | None = None
    done: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"vm": self.vm, "links": self.links, "target": self.target, "child": self.child,
                "refused": self.refused, "done": self.done, "merge": self.summary}


@dataclass
class CleanReport:
    dry_run: bool
    steps: list[Step] = field(default_factory=list)
    verified: list[str] = field(default_factory=list)  # configs whose drives re-opened afterwards

    def to_dict(self) -> dict[str, Any]:
        return {"dry_run": self.dry_run, "steps": [s.to_dict() for s in self.steps], "verified": self.verified}


def _runs(rep: VmReport) -> list[tuple[list[DiskInfo], DiskInfo, DiskInfo]]:
    """(run top first, target, child above) for every run of unowned links in the VM's chains."""
    unowned = {u["path"] for u in rep.lingering.unowned_links}
    out, seen = [], set()
    for dd in rep.drives + [d for c in rep.checkpoints for d in c.disks]:
        chain = dd.chain or []
        i = 0
        while i < len(chain):
            if chain[i].path not in unowned:
                i += 1
                continue
            j = i
            while j < len(chain) and chain[j].path in unowned:
                j += 1
            key = tuple(x.ident for x in chain[i:j])
            if i > 0 and j < len(chain) and key not in seen:
                seen.add(key)
                out.append((chain[i:j], chain[j], chain[i - 1]))
            i = j
    return out


def _owner(inv: Inventory, ident: tuple[int, int]) -> str | None:
    for rep in inv.vms + inv.context:
        for dd in rep.drives:
            if dd.top is not None and dd.top.ident == ident:
                return f"a drive of VM {rep.config.name!r} ({rep.config.path})"
        for cp in rep.checkpoints:
            for dd in cp.disks:
                if dd.top is not None and dd.top.ident == ident:
                    return f"the frozen disk of checkpoint {cp.id} ({cp.config.path})"
    return None


def plan(inv: Inventory, search_dirs: list[str]) -> list[tuple[Step, DiskInfo, DiskInfo]]:
    from ..merge_engine import merge

    steps = []
    for rep in inv.vms:
        vm = f"{rep.config.name} ({rep.config.path})"
        for run, target, child in _runs(rep):
            s = Step(vm, [d.path for d in run], target.path, child.path)
            steps.append((s, run[0], target))
            owner = _owner(inv, target.ident)
            if rep.config.disk_merge_pending:
                s.refused = "the configuration says a disk merge is pending (Hyper-V finishes it itself)"
            elif owner:
                s.refused = (f"the target {target.path} is {owner}; folding into it would change it "
                             "(folding the other way, into the child, would delete a file a configuration "
                             "names, and configurations are never rewritten)")
            if s.refused:
                continue
            many = [u for u in rep.lingering.unowned_links if u["path"] in s.links and len(u["children"]) > 1]
            if many:
                s.refused = f"{many[0]['path']} has several children ({', '.join(many[0]['children'])})"
                continue
            try:
                summary = merge(run[0].path, into=target.path if len(run) > 1 else None, dry_run=True,
                                search_dirs=search_dirs)
            except VhdxError as e:
                s.refused = str(e)
                continue
            s.summary = summary.to_dict()
            rp = [os.path.realpath(p) for p in summary.repointed]
            if rp != [os.path.realpath(child.path)]:
                s.refused = (f"{run[0].path}: children found {summary.repointed or 'none'}, expected exactly "
                             f"{child.path}")
    return steps


def clean(inv: Inventory, search_dirs: list[str], dry_run: bool) -> CleanReport:
    """Plan every step, then (unless ``dry_run``) execute the ones not refused."""
    from ..merge_engine import merge

    dirs = list(dict.fromkeys([os.path.dirname(i.path) for i in inv.closure().values()] + list(search_dirs)))
    report = CleanReport(dry_run)
    planned = plan(inv, dirs)
    report.steps = [s for s, _, _ in planned]
    if dry_run:
        return report
    for s, top, target in planned:
        if s.refused:
            continue
        summary = merge(top.path, into=target.path if len(s.links) > 1 else None, search_dirs=dirs)
        s.summary, s.done = summary.to_dict(), True
    return report
