"""What Hyper-V configuration files say about VMs, their drives and checkpoints.

Read (hyperv.md §4.1-§4.4): VM identity, drives of IDE, SCSI and floppy controllers,
data roots, checkpoint settings, the host registry ``data.vmcx``. Every value
is type-checked; a value of the wrong type is reported and treated as absent.

Derived (hyperv.md §4.5.2, §4.5.3), because the keys that name a checkpoint's parent
and type are not known: checkpoint configs are the ``<GUID>.vmcx`` files under
the snapshot root; each checkpoint's drives are its frozen disks; its parent is
the checkpoint whose frozen disk for the same drive slot is the nearest ancestor
in the parent-locator chain, and "Now" (the running config) hangs off the
checkpoint nearest to its current disks. The type is always "unknown".
Lingering disks: orphan differencing disks in the VM's folders, unowned chain
links (in use, but no checkpoint owns them) and a pending merge.
"""

from __future__ import annotations

import datetime
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ..chain import accepted_linkages, open_chain
from ..errors import VhdxError
from ..image import ImageFile
from .container import ConfigFile, Key, open_config
from .winpath import PathMapper, Resolution, lookup_ci

IDE_CLASS = "83f8638b-8dca-4152-9eda-2ca8b33039b4"
SCSI_CLASS = "d422512d-2bf2-4752-809d-7b82b5fcb1b4"
FLOPPY_CLASS = "8f0d2762-0b00-4e04-af4f-19010527cb93"
GUEST_STATE_CLASS = "917bd8cb-3bb6-4124-9383-b7d21ac07f79"
Bus = Literal["IDE", "SCSI", "floppy"]
ParentSource = Literal["disk chains", "creation time", "unknown"]  # where a checkpoint's parent came from
BUSES: dict[str, Bus] = {IDE_CLASS: "IDE", SCSI_CLASS: "SCSI", FLOPPY_CLASS: "floppy"}
DISK_TYPES = ("VHD",)  # drive types whose pathname is a virtual hard disk
DIFF_SUFFIXES = (".avhdx", ".avhd")
DISK_SUFFIXES = (".vhdx", ".avhdx")
MAX_WALK_ENTRIES = 200_000  # directory entries a discovery walk looks at
MAX_CHECKPOINTS = 500  # per VM
_GUID_NAME = re.compile(r"^_?\{?([0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12})\}?_?$")
_FILETIME_EPOCH = datetime.datetime(1601, 1, 1, tzinfo=datetime.timezone.utc)


def guid_of_name(name: str) -> str | None:
    """``_<guid>_`` / ``<GUID>.vmcx`` stem -> lower-case GUID text, or None."""
    m = _GUID_NAME.match(name)
    return m.group(1).lower() if m else None


def filetime(raw: Any) -> str | None:
    """An 8-byte FILETIME array value as ISO-8601 UTC (microseconds), or None."""
    if not isinstance(raw, bytes) or len(raw) != 8:
        return None
    ticks = int.from_bytes(raw, "little")
    try:
        t = _FILETIME_EPOCH + datetime.timedelta(microseconds=ticks // 10)
    except OverflowError:
        return None
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class _Typed:
    """Typed reads of a config tree; wrong types are noted and read as absent."""

    def __init__(self, cfg: ConfigFile, warnings: list[str]) -> None:
        self.cfg = cfg
        self.warnings = warnings

    def get(self, base: Key | None, path: str, want: type | tuple[type, ...]) -> Any:
        if base is None:
            return None
        k = base.get(path, ignore_case=True)
        if k is None:
            return None
        v = None if k.is_node else k.value
        if isinstance(v, bool) and want is int:
            v = None  # a bool is not the int the layer asked for
        if not isinstance(v, want):
            self.warnings.append(f"{path}: expected {getattr(want, '__name__', want)}, found "
                                 f"{'a node' if k.is_node else k.type_name}; ignored")
            return None
        return v


@dataclass
class Drive:
    bus: Bus
    controller_id: str  # the controller device's instance GUID
    controller: int
    location: int
    type: str
    pathname: str

    @property
    def slot(self) -> tuple[str, int, int]:
        return (self.controller_id, self.controller, self.location)

    @property
    def label(self) -> str:
        return f"{self.bus} {self.controller}:{self.location}"

    @property
    def is_disk(self) -> bool:
        return self.type.upper() in DISK_TYPES and bool(self.pathname)

    def to_dict(self) -> dict[str, Any]:
        return {"bus": self.bus, "controller_id": self.controller_id, "controller": self.controller,
                "location": self.location, "type": self.type, "pathname": self.pathname}


@dataclass
class VmConfig:
    """What one ``.vmcx`` (a VM's or a checkpoint's) says."""

    path: str
    name: str | None = None
    id: str | None = None
    logical_id: str | None = None
    type_id: str | None = None
    generation: int | None = None
    version: int | None = None
    created: str | None = None
    drives: list[Drive] = field(default_factory=list)
    guest_state_path: str | None = None
    data_root: str | None = None
    snapshot_data_root: str | None = None
    smart_paging_root: str | None = None
    checkpoint_list_size: int | None = None
    checkpoint_type_policy: int | None = None  # snapshots/user_type: a policy, not a checkpoint's type
    automatic_checkpoints: bool | None = None
    disk_merge_pending: bool | None = None
    manifest_size: int | None = None
    controllers: list[dict[str, Any]] = field(default_factory=list)  # bus, id, drive count
    warnings: list[str] = field(default_factory=list)

    @property
    def version_text(self) -> str | None:
        return None if self.version is None else f"{self.version >> 8}.{self.version & 0xFF}"

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "name": self.name, "id": self.id, "logical_id": self.logical_id,
                "type_id": self.type_id, "generation": self.generation, "version": self.version,
                "version_text": self.version_text, "created": self.created,
                "drives": [d.to_dict() for d in self.drives], "guest_state_path": self.guest_state_path,
                "data_root": self.data_root, "snapshot_data_root": self.snapshot_data_root,
                "smart_paging_root": self.smart_paging_root,
                "checkpoint_settings": {"list_size": self.checkpoint_list_size,
                                        "user_type": self.checkpoint_type_policy,
                                        "enable_automatic": self.automatic_checkpoints},
                "disk_merge_pending": self.disk_merge_pending, "manifest_size": self.manifest_size,
                "controllers": self.controllers, "warnings": self.warnings}


def config_kind(cfg: ConfigFile) -> str:
    """"host" (data.vmcx), "vm" (a VM or checkpoint configuration), "runtime" (.vmrs) or "other"."""
    top = cfg.top
    if top is None:
        return "other"
    if top.name == "Configurations":
        return "host"
    if top.name.casefold() == "configuration":
        return "vm" if top.get("properties/name", ignore_case=True) is not None else "runtime"
    if top.name.casefold() == "savedstate":
        return "runtime"
    return "other"


def _device_nodes(conf: Key) -> list[tuple[str, str, Key]]:
    """(class GUID, instance GUID, settings node) of every storage-controller-like device:
    from the manifest, and top-level nodes named after a known class (hyperv.md §4.2)."""
    out: list[tuple[str, str, Key]] = []
    seen: set[str] = set()
    manifest = conf.child("manifest", ignore_case=True)
    for vdev in (manifest.children if manifest is not None else []):
        if not vdev.is_node:
            continue
        dev, inst = vdev.value_at("device", ignore_case=True), vdev.value_at("instance", ignore_case=True)
        if not isinstance(dev, str) or not isinstance(inst, str):
            continue
        dev, inst = dev.strip("{}").lower(), inst.strip("{}").lower()
        node = conf.child(f"_{inst}_", ignore_case=True)
        if node is not None and node.is_node and inst not in seen:
            seen.add(inst)
            out.append((dev, inst, node))
    for node in conf.children:
        g = guid_of_name(node.name) if node.is_node else None
        if g and g not in seen and g in (IDE_CLASS, FLOPPY_CLASS, GUEST_STATE_CLASS):
            seen.add(g)
            out.append((g, g, node))
    return out


def read_vm_config(cfg: ConfigFile) -> VmConfig:
    vm = VmConfig(cfg.path)
    t = _Typed(cfg, vm.warnings)
    conf = cfg.get("configuration", ignore_case=True)
    if conf is None:
        vm.warnings.append("no 'configuration' key")
        return vm
    vm.name = t.get(conf, "properties/name", str)
    vm.id = t.get(conf, "properties/global_id", str)
    vm.logical_id = t.get(conf, "settings/global/logical_id", str)
    vm.type_id = t.get(conf, "properties/type_id", str)
    sub = t.get(conf, "properties/subtype", int)
    vm.generation = sub + 1 if sub in (0, 1) else None
    vm.version = t.get(conf, "properties/version", int)
    ct = t.get(conf, "properties/creation_time", bytes)
    vm.created = filetime(ct)
    vm.data_root = t.get(conf, "global_settings/data_root", str)
    vm.snapshot_data_root = t.get(conf, "global_settings/snapshots/data_root", str)
    vm.smart_paging_root = t.get(conf, "global_settings/slp_data_root", str)
    vm.checkpoint_list_size = t.get(conf, "global_settings/snapshots/list/size", int)
    vm.checkpoint_type_policy = t.get(conf, "global_settings/snapshots/user_type", int)
    vm.automatic_checkpoints = t.get(conf, "global_settings/snapshots/enable_automatic", bool)
    vm.disk_merge_pending = t.get(conf, "global_settings/disk_merge_pending", bool)
    vm.manifest_size = t.get(conf, "manifest/size", int)
    for cls, inst, node in _device_nodes(conf):
        if cls == GUEST_STATE_CLASS:
            vm.guest_state_path = t.get(node, "StateFilePath", str)
            continue
        bus = BUSES.get(cls)
        if bus is None:
            continue
        before = len(vm.drives)
        for ctl in node.children:
            m = re.fullmatch(r"controller(\d{1,3})", ctl.name, re.IGNORECASE)
            if not m or not ctl.is_node:
                continue
            for drv in ctl.children:
                d = re.fullmatch(r"drive(\d{1,3})", drv.name, re.IGNORECASE)
                if not d or not drv.is_node:
                    continue
                vm.drives.append(Drive(bus, inst, int(m.group(1)), int(d.group(1)),
                                       t.get(drv, "type", str) or "", t.get(drv, "pathname", str) or ""))
        vm.controllers.append({"bus": bus, "id": inst, "drives": len(vm.drives) - before})
    return vm


@dataclass
class HostRegistry:
    path: str
    format_version: int | None = None
    reg_id: str | None = None
    vms: dict[str, str] = field(default_factory=dict)  # VM GUID -> .vmcx path
    cache: dict[str, str] = field(default_factory=dict)
    resource_types: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "format_version": self.format_version, "reg_id": self.reg_id,
                "virtual_machines": self.vms, "virtual_machines_cache": self.cache,
                "resource_types": self.resource_types, "warnings": self.warnings}


def read_host_registry(cfg: ConfigFile) -> HostRegistry:
    reg = HostRegistry(cfg.path)
    t = _Typed(cfg, reg.warnings)
    top = cfg.get("Configurations")
    reg.format_version = t.get(top, "FormatVersion", int)
    reg.reg_id = t.get(top, "RegID", str)
    for section, out in (("VirtualMachines", reg.vms), ("VirtualMachinesCache", reg.cache),
                         ("ResourceTypes", reg.resource_types)):
        node = top.child(section) if top is not None else None
        for k in (node.children if node is not None else []):
            g = guid_of_name(k.name)
            if g and isinstance(k.value, str):
                out[g.upper()] = k.value
            else:
                reg.warnings.append(f"{section}/{k.name}: not a GUID-named path; ignored")
    return reg


# --- disks ------------------------------------------------------------------------------------
@dataclass
class DiskInfo:
    path: str
    ident: tuple[int, int]
    has_parent: bool
    data_write_guid: str
    linkages: list[str]
    virtual_size: int

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "differencing": self.has_parent, "data_write_guid": self.data_write_guid,
                "virtual_size": self.virtual_size}


def _ident(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


class DiskIndex:
    """Opens each disk once (read-only) and caches what the model needs."""

    def __init__(self, search_dirs: Sequence[str] = (), ignore_linkage: bool = False,
                 mapper: PathMapper | None = None) -> None:
        self.search_dirs = list(search_dirs)
        self.ignore_linkage = ignore_linkage
        self.mapper = mapper
        self._info: dict[tuple[int, int], DiskInfo | str] = {}
        self._chains: dict[tuple[int, int], tuple[list[DiskInfo] | None, str | None]] = {}

    @staticmethod
    def _describe(img: ImageFile) -> DiskInfo:
        links = sorted(str(g) for g in accepted_linkages(img.parent_locator or {})) if img.has_parent else []
        st = os.fstat(img.fd)
        return DiskInfo(img.path, (st.st_dev, st.st_ino), img.has_parent, str(img.data_write_guid),
                        links, img.virtual_size)

    def info(self, path: str) -> DiskInfo | str:
        """DiskInfo, or the error text when the file is not a readable VHDX."""
        try:
            ident = _ident(path)
        except OSError as e:
            return f"{path}: {e.strerror}"
        if ident not in self._info:
            try:
                with ImageFile(path) as img:
                    self._info[ident] = self._describe(img)
            except VhdxError as e:
                self._info[ident] = str(e)
        return self._info[ident]

    def _mapped_parent_dirs(self, path: str) -> list[str]:
        """Folders of the parents named by the locators' Windows paths, mapped through
        ``--root``: where a parent lives when its relative path no longer fits."""
        if self.mapper is None or not self.mapper.has_roots:
            return []
        out: list[str] = []
        cur: str | None = path
        seen: set[str] = set()
        while cur is not None and len(out) < 256 and os.path.realpath(cur) not in seen:
            seen.add(os.path.realpath(cur))
            try:
                with ImageFile(cur) as img:
                    loc = img.parent_locator if img.has_parent else None
            except VhdxError:
                break
            win = (loc or {}).get("absolute_win32_path")
            cur = self.mapper.map_path(win).local if win else None
            if cur is not None:
                out.append(os.path.dirname(cur))
        return out

    def chain(self, path: str) -> tuple[list[DiskInfo] | None, str | None]:
        """The whole chain of ``path`` (child first) as ``vhdx info`` resolves it."""
        try:
            ident = _ident(path)
        except OSError as e:
            return None, f"{path}: {e.strerror}"
        if ident not in self._chains:
            dirs = list(dict.fromkeys([os.path.dirname(os.path.abspath(path)), *self._mapped_parent_dirs(path),
                                       *self.search_dirs]))
            try:
                files, _warnings = open_chain(path, search_dirs=dirs, ignore_linkage=self.ignore_linkage)
            except VhdxError as e:
                self._chains[ident] = (None, str(e))
            else:
                try:
                    infos = [self._describe(f) for f in files]
                finally:
                    for f in files:
                        f.close()
                for i in infos:
                    self._info.setdefault(i.ident, i)
                self._chains[ident] = (infos, None)
        return self._chains[ident]


@dataclass
class DriveDisk:
    """One drive of a config: its pathname resolved locally and its whole chain."""

    drive: Drive
    resolution: Resolution
    chain: list[DiskInfo] | None = None
    error: str | None = None

    @property
    def top(self) -> DiskInfo | None:
        return self.chain[0] if self.chain else None

    def to_dict(self) -> dict[str, Any]:
        return {**self.drive.to_dict(), "slot": self.drive.label, "resolution": self.resolution.to_dict(),
                "chain": [d.to_dict() for d in self.chain] if self.chain is not None else None,
                "error": self.error}


@dataclass
class Checkpoint:
    id: str
    config: VmConfig
    disks: list[DriveDisk]
    saved_state: bool | None = None
    saved_state_note: str = ""
    parent: str | None = None  # checkpoint id, or None for a root
    parent_source: ParentSource = "unknown"
    type: str = "unknown"  # the type key is not known (hyperv.md §4.5.2 step 3)

    @property
    def name(self) -> str | None:
        return self.config.name

    @property
    def created(self) -> str | None:
        return self.config.created

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "created": self.created, "config": self.config.path,
                "config_id": self.config.id, "saved_state": self.saved_state,
                "saved_state_note": self.saved_state_note, "parent": self.parent,
                "parent_source": self.parent_source, "type": self.type,
                "frozen_disks": [d.to_dict() for d in self.disks]}


@dataclass
class Lingering:
    orphans: list[dict[str, Any]] = field(default_factory=list)
    unowned_links: list[dict[str, Any]] = field(default_factory=list)
    pending_merge: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"orphan_differencing_disks": self.orphans, "unowned_chain_links": self.unowned_links,
                "pending_merge": self.pending_merge}


@dataclass
class VmReport:
    config: VmConfig
    drives: list[DriveDisk]
    data_root: str | None  # local
    snapshot_root: str | None  # local folder holding Snapshots\
    checkpoints: list[Checkpoint] = field(default_factory=list)
    now_parent: str | None = None
    now_parent_source: ParentSource = "unknown"
    lingering: Lingering = field(default_factory=Lingering)
    unresolved: list[dict[str, Any]] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)
    saved_state: bool | None = None  # the running VM's own .vmrs holds a saved state
    saved_state_note: str = ""

    def referenced(self) -> set[tuple[int, int]]:
        """Disks a config names as a drive (running) or a frozen disk (checkpoints)."""
        out = set()
        for dd in self.drives + [d for c in self.checkpoints for d in c.disks]:
            if dd.top is not None:
                out.add(dd.top.ident)
        return out

    def chain_closure(self) -> dict[tuple[int, int], DiskInfo]:
        out: dict[tuple[int, int], DiskInfo] = {}
        for dd in self.drives + [d for c in self.checkpoints for d in c.disks]:
            for i in dd.chain or ():
                out.setdefault(i.ident, i)
        return out

    def tree(self) -> list[dict[str, Any]]:
        """Checkpoints as nested dicts (children by creation time); Now is a node too."""
        kids: dict[str | None, list[dict[str, Any]]] = {}
        for c in sorted(self.checkpoints, key=lambda c: (c.created or "", c.id)):
            kids.setdefault(c.parent, []).append({"id": c.id, "name": c.name, "created": c.created})
        kids.setdefault(self.now_parent, []).append({"id": "Now", "name": "Now", "created": None})

        placed: set[str] = set()

        def build(parent: str | None) -> list[dict[str, Any]]:
            out = []
            for n in kids.get(parent, []):
                if n["id"] in placed:
                    continue
                placed.add(n["id"])
                out.append({**n, "children": build(n["id"]) if n["id"] != "Now" else []})
            return out

        roots = build(None)
        # Slots that disagree can make a parent cycle, which no root reaches: show those too.
        for parent in list(kids):
            for n in kids[parent]:
                if n["id"] not in placed:
                    placed.add(n["id"])
                    roots.append({**n, "children": [], "note": "parent cycle (drive slots disagree)"})
        return roots

    def to_dict(self) -> dict[str, Any]:
        return {"vm": self.config.to_dict(), "data_root": self.data_root, "snapshot_root": self.snapshot_root,
                "drives": [d.to_dict() for d in self.drives],
                "checkpoints": [c.to_dict() for c in self.checkpoints],
                "now": {"parent": self.now_parent, "parent_source": self.now_parent_source,
                        "saved_state": self.saved_state, "saved_state_note": self.saved_state_note},
                "tree": self.tree(), "lingering": self.lingering.to_dict(),
                "unresolved": self.unresolved, "findings": self.findings}


# --- analysis ---------------------------------------------------------------------------------
def _resolve_drives(cfg: VmConfig, mapper: PathMapper, disks: DiskIndex, unresolved: list[dict[str, Any]],
                    who: str) -> list[DriveDisk]:
    out = []
    cdir = os.path.dirname(os.path.abspath(cfg.path))
    for d in cfg.drives:
        if not d.is_disk:
            continue
        res = mapper.resolve_file(d.pathname, cdir)
        dd = DriveDisk(d, res)
        if res.local is None:
            dd.error = f"not resolved: {res.problem}"
            unresolved.append({"config": cfg.path, "of": who, "slot": d.label, **res.to_dict()})
        else:
            dd.chain, dd.error = disks.chain(res.local)
        out.append(dd)
    return out


def _local_roots(vm: VmConfig, mapper: PathMapper, unresolved: list[dict[str, Any]]) -> tuple[str, str]:
    """(data root, snapshot root) as local folders (hyperv.md §4.3, §6)."""
    vmdir = os.path.dirname(os.path.abspath(vm.path))
    default = os.path.dirname(vmdir) if os.path.basename(vmdir).casefold() == "virtual machines" else vmdir
    roots = []
    for raw in (vm.data_root, vm.snapshot_data_root):
        local = default
        if raw:
            r = mapper.map_path(raw, want_dir=True)
            if r.local:
                local = r.local
            else:
                unresolved.append({"config": vm.path, "of": "data root", "slot": None, **r.to_dict(),
                                   "note": f"using {default}"})
        roots.append(local)
    return roots[0], roots[1]


def _saved_state(config_path: str) -> tuple[bool | None, str]:
    d, base = os.path.split(config_path)
    stem = os.path.splitext(base)[0]
    path, _ = lookup_ci(d, [stem + ".vmrs"])
    if path is None:
        return False, "no .vmrs"
    try:
        rt = open_config(path, load_file_objects=False)
    except VhdxError as e:
        return None, f"unreadable .vmrs: {e}"
    has = any(k.name.casefold() == "savedstate" for k in rt.root.children) or \
        rt.get("configuration/savedstate", ignore_case=True) is not None
    return has, f"{os.path.basename(path)} {'holds' if has else 'has no'} savedstate"


def _nearest(chain: list[DiskInfo] | None, frozen: dict[tuple[int, int], list[str]]) -> tuple[bool, list[str]]:
    """(answered, checkpoint ids owning the nearest proper ancestor) for one drive chain."""
    if not chain:
        return False, []
    for info in chain[1:]:
        if info.ident in frozen:
            return True, frozen[info.ident]
    return True, []


def _derive_parent(disks: list[DriveDisk], frozen: dict[tuple[str, int, int], dict[tuple[int, int], list[str]]],
                   what: str, findings: list[str]) -> tuple[bool, str | None]:
    """Vote over drive slots (hyperv.md §4.5.2 step 2); (answered, parent id or None = root)."""
    votes: dict[str | None, list[str]] = {}
    for dd in disks:
        answered, owners = _nearest(dd.chain, frozen.get(dd.drive.slot, {}))
        if not answered:
            continue
        if len(owners) > 1:
            findings.append(f"{what}, {dd.drive.label}: checkpoints {', '.join(owners)} freeze the same disk; "
                            "their order cannot be told from the disks")
        votes.setdefault(owners[0] if owners else None, []).append(dd.drive.label)
    if not votes:
        return False, None
    ranked = sorted(votes.items(), key=lambda kv: -len(kv[1]))
    if len(ranked) > 1:
        findings.append(f"{what}: drive slots disagree about the parent: " + "; ".join(
            f"{', '.join(slots)} -> {p or 'root'}" for p, slots in ranked) + f"; using {ranked[0][0] or 'root'}")
    return True, ranked[0][0]


def analyze_vm(vm: VmConfig, checkpoint_configs: Sequence[VmConfig], mapper: PathMapper,
               disks: DiskIndex) -> VmReport:
    unresolved: list[dict[str, Any]] = []
    data_root, snap_root = _local_roots(vm, mapper, unresolved)
    rep = VmReport(vm, _resolve_drives(vm, mapper, disks, unresolved, "Now"), data_root, snap_root)
    rep.unresolved = unresolved
    rep.saved_state, rep.saved_state_note = _saved_state(vm.path)
    if len(checkpoint_configs) > MAX_CHECKPOINTS:
        rep.findings.append(f"{len(checkpoint_configs)} checkpoint configurations; only the first "
                            f"{MAX_CHECKPOINTS} are read (Hyper-V allows 50)")
        checkpoint_configs = checkpoint_configs[:MAX_CHECKPOINTS]
    for cc in checkpoint_configs:
        cid = guid_of_name(os.path.splitext(os.path.basename(cc.path))[0]) or os.path.basename(cc.path)
        cid = cid.upper()
        if cc.id and cc.id.strip("{}").upper() != cid:
            rep.findings.append(f"checkpoint {cid}: properties/global_id is {cc.id}, not the file name's GUID")
        cp = Checkpoint(cid, cc, _resolve_drives(cc, mapper, disks, unresolved, f"checkpoint {cid}"))
        cp.saved_state, cp.saved_state_note = _saved_state(cc.path)
        rep.checkpoints.append(cp)
    # frozen[slot][disk identity] -> ids of the checkpoints freezing that disk
    frozen: dict[tuple[str, int, int], dict[tuple[int, int], list[str]]] = {}
    for cp in rep.checkpoints:
        for dd in cp.disks:
            if dd.top is not None:
                frozen.setdefault(dd.drive.slot, {}).setdefault(dd.top.ident, []).append(cp.id)
    by_time = sorted(rep.checkpoints, key=lambda c: (c.created or "", c.id))
    for cp in rep.checkpoints:
        answered, parent = _derive_parent(cp.disks, frozen, f"checkpoint {cp.id}", rep.findings)
        if answered:
            cp.parent, cp.parent_source = parent, "disk chains"
        elif not cp.disks and cp.created:
            earlier = [c for c in by_time if (c.created or "") < cp.created and c is not cp]
            cp.parent, cp.parent_source = (earlier[-1].id if earlier else None), "creation time"
    answered, parent = _derive_parent(rep.drives, frozen, "Now", rep.findings)
    if answered:
        rep.now_parent, rep.now_parent_source = parent, "disk chains"
    elif not rep.drives and by_time:
        rep.now_parent, rep.now_parent_source = by_time[-1].id, "creation time"
    for dd in rep.drives:
        if dd.top is not None:
            owners = frozen.get(dd.drive.slot, {}).get(dd.top.ident)
            if owners:
                rep.findings.append(f"Now, {dd.drive.label}: the running configuration writes to "
                                    f"{dd.top.path}, the frozen disk of checkpoint {', '.join(owners)}")
    for dd in rep.drives + [d for c in rep.checkpoints for d in c.disks]:
        if dd.error and dd.resolution.local:
            rep.findings.append(f"{dd.drive.label} ({dd.resolution.local}): chain not resolved: {dd.error}")
    return rep


def find_lingering(rep: VmReport, all_referenced: set[tuple[int, int]],
                   all_closure: dict[tuple[int, int], DiskInfo], disks: DiskIndex) -> None:
    """Fill ``rep.lingering`` (hyperv.md §4.5.3). ``all_*`` cover every VM known, so one
    VM's disks are never reported as another VM's orphans."""
    closure = rep.chain_closure()
    frozen = {dd.top.ident for c in rep.checkpoints for dd in c.disks if dd.top is not None}
    current = {dd.top.ident for dd in rep.drives if dd.top is not None}
    running = {i.ident for dd in rep.drives for i in dd.chain or ()}
    by_guid: dict[str, DiskInfo] = {i.data_write_guid: i for i in all_closure.values()}
    children: dict[tuple[int, int], list[str]] = {}
    folders = {os.path.dirname(i.path) for i in closure.values()}
    for d in (rep.data_root, rep.snapshot_root):
        if d:
            vhd, _ = lookup_ci(d, ["Virtual Hard Disks"])
            snaps, _ = lookup_ci(d, ["Snapshots"])
            folders.update(x for x in (vhd, snaps, d) if x and os.path.isdir(x))
    scanned: list[DiskInfo] = []
    unreadable: list[tuple[str, str]] = []
    for folder in sorted(folders):
        try:
            names = sorted(os.listdir(folder))
        except OSError:
            continue
        for n in names:
            p = os.path.join(folder, n)
            if not n.lower().endswith(DISK_SUFFIXES + DIFF_SUFFIXES) or not os.path.isfile(p):
                continue
            info = disks.info(p)
            if isinstance(info, DiskInfo):
                scanned.append(info)
            elif n.lower().endswith(DIFF_SUFFIXES):
                unreadable.append((p, info))
    for info in scanned:
        by_guid.setdefault(info.data_write_guid, info)
    for info in scanned:
        for g in info.linkages:
            parent = by_guid.get(g)
            if parent is not None and info.ident != parent.ident:
                children.setdefault(parent.ident, []).append(info.path)
    for p, why in unreadable:
        rep.lingering.orphans.append({"path": p, "parent": None, "note": f"not a readable VHDX: {why}"})
    for c in scanned:
        if not c.path.lower().endswith(DIFF_SUFFIXES) or c.ident in all_closure:
            continue
        parent = next((by_guid[g] for g in c.linkages if g in by_guid), None)
        if parent is None:
            note = "its parent was not found"
        elif parent.ident in all_closure:
            note = f"a child of {parent.path}, which a configuration still uses"
        else:
            note = f"a child of {parent.path}, itself unused"
        rep.lingering.orphans.append({"path": c.path, "parent": parent.path if parent else None, "note": note})
    for ident, info in closure.items():
        if not info.has_parent or ident in frozen or ident in current or ident in all_referenced:
            continue
        kids = sorted(set(children.get(ident, [])))
        rep.lingering.unowned_links.append({
            "path": info.path, "on_running_chain": ident in running, "children": kids,
            "note": ("no checkpoint configuration owns it (a removed or hidden checkpoint)"
                     + ("; several children: kept by Hyper-V, not mergeable" if len(kids) > 1 else ""))})
    rep.lingering.unowned_links.sort(key=lambda d: d["path"])
    rep.lingering.pending_merge = bool(rep.config.disk_merge_pending)


# --- discovery --------------------------------------------------------------------------------
@dataclass
class Inventory:
    vms: list[VmReport] = field(default_factory=list)
    context: list[VmReport] = field(default_factory=list)  # sibling VMs read to judge the shown one
    hosts: list[HostRegistry] = field(default_factory=list)
    unattributed: list[str] = field(default_factory=list)  # checkpoint configs no VM claims
    errors: list[dict[str, Any]] = field(default_factory=list)  # configs that could not be read
    registry_unresolved: list[dict[str, Any]] = field(default_factory=list)  # data.vmcx entries not found locally
    disks: DiskIndex | None = None

    def referenced(self) -> set[tuple[int, int]]:
        """Disks any configuration read (shown or context) names as a drive or frozen disk."""
        out: set[tuple[int, int]] = set()
        for v in self.vms + self.context:
            out |= v.referenced()
        return out

    def closure(self) -> dict[tuple[int, int], DiskInfo]:
        out: dict[tuple[int, int], DiskInfo] = {}
        for v in self.vms + self.context:
            out.update(v.chain_closure())
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"vms": [v.to_dict() for v in self.vms], "hosts": [h.to_dict() for h in self.hosts],
                "unattributed_checkpoint_configs": self.unattributed, "errors": self.errors,
                "registry_unresolved": self.registry_unresolved}


def walk_files(top: str, suffixes: tuple[str, ...]) -> list[str]:
    """Files below ``top`` whose names end in ``suffixes`` (any case); symbolic links to
    directories are not followed and the walk is bounded."""
    out, seen = [], 0
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames.sort()
        seen += len(dirnames) + len(filenames)
        if seen > MAX_WALK_ENTRIES:
            raise VhdxError(f"{top}: more than {MAX_WALK_ENTRIES} directory entries; name a smaller folder")
        out += [os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(suffixes)]
    return out


def _is_checkpoint_dir(path: str) -> bool:
    return os.path.basename(os.path.dirname(os.path.abspath(path))).casefold() == "snapshots"


def _skip_dir(path: str) -> bool:
    # The host's cached copies and resource types are not VMs of their own.
    name = os.path.basename(os.path.dirname(os.path.abspath(path))).casefold()
    return name in ("virtual machines cache", "resource types", "snapshots cache")


def inventory(path: str, mapper: PathMapper, search_dirs: Sequence[str] = (),
              ignore_linkage: bool = False) -> Inventory:
    """Every VM under ``path`` (a .vmcx, a VM folder or a folder of VMs), analysed."""
    disks = DiskIndex(search_dirs, ignore_linkage, mapper)
    inv = Inventory(disks=disks)
    single = os.path.isfile(path)
    if single:
        vm_paths = [os.path.abspath(path)]
        # Sibling VMs share the snapshot root and disk folders: read them as context.
        context = [p for p in walk_files(os.path.dirname(vm_paths[0]), (".vmcx",))
                   if os.path.dirname(p) == os.path.dirname(vm_paths[0]) and p != vm_paths[0]]
        found = vm_paths + context
    elif os.path.isdir(path):
        found = walk_files(os.path.abspath(path), (".vmcx",))
        vm_paths = []
    else:
        raise VhdxError(f"{path}: no such file or directory")
    vms: list[VmConfig] = []
    checkpoint_cfgs: dict[str, VmConfig] = {}
    queue = list(found)
    seen_paths = {os.path.realpath(p) for p in found}
    while queue:
        p = queue.pop(0)
        if _skip_dir(p):
            continue
        try:
            cfg = open_config(p)
        except VhdxError as e:
            if single and p == vm_paths[0]:
                raise
            inv.errors.append({"path": p, "error": str(e)})
            continue
        kind = config_kind(cfg)
        if kind == "host":
            reg = read_host_registry(cfg)
            inv.hosts.append(reg)
            if not single:
                # The registry names VMs stored anywhere on the host: follow them through --root.
                for g, win in reg.vms.items():
                    r = mapper.map_path(win)
                    if r.local is None:
                        inv.registry_unresolved.append({"registry": reg.path, "vm": g, **r.to_dict()})
                    elif os.path.realpath(r.local) not in seen_paths:
                        seen_paths.add(os.path.realpath(r.local))
                        queue.append(os.path.abspath(r.local))
        elif kind == "vm":
            if _is_checkpoint_dir(p) and not (single and p == vm_paths[0]):
                checkpoint_cfgs[p] = read_vm_config(cfg)
            else:
                vms.append(read_vm_config(cfg))
        elif single and p == vm_paths[0]:
            raise VhdxError(f"{p}: not a VM configuration (its top key is {cfg.top.name if cfg.top else 'missing'!r})")
    # Checkpoint configs under each VM's snapshot root, also when not found by the walk.
    claimed: set[str] = set()
    for vm in vms:
        _d, snap = _local_roots(vm, mapper, [])
        sdir, _ = lookup_ci(snap, ["Snapshots"])
        if sdir and os.path.isdir(sdir):
            for p in walk_files(sdir, (".vmcx",)):
                if os.path.dirname(p) == sdir and p not in checkpoint_cfgs:
                    try:
                        cfg = open_config(p)
                    except VhdxError as e:
                        inv.errors.append({"path": p, "error": str(e)})
                        continue
                    if config_kind(cfg) == "vm":
                        checkpoint_cfgs[p] = read_vm_config(cfg)
    candidates: dict[int, list[VmConfig]] = {i: [] for i in range(len(vms))}
    snapdirs = {}
    for i, vm in enumerate(vms):
        _d, snap = _local_roots(vm, mapper, [])
        snapdirs[i] = lookup_ci(snap, ["Snapshots"])[0]
    for p, cc in checkpoint_cfgs.items():
        owners = [i for i, d in snapdirs.items() if d and os.path.dirname(p) == d]
        if len(owners) > 1:
            owners = _owners_by_disks(cc, [vms[i] for i in owners], owners, mapper, disks)
        if len(owners) == 1:
            candidates[owners[0]].append(cc)
            claimed.add(p)
    inv.unattributed = sorted(set(checkpoint_cfgs) - claimed)
    keep = set(vm_paths) if single else None
    for i, vm in enumerate(vms):
        rep = analyze_vm(vm, sorted(candidates[i], key=lambda c: c.path), mapper, disks)
        inv.vms.append(rep)
    all_ref, all_closure = inv.referenced(), inv.closure()
    for rep in inv.vms:
        find_lingering(rep, all_ref - rep.referenced(), all_closure, disks)
    if keep is not None:
        inv.context = [r for r in inv.vms if os.path.abspath(r.config.path) not in keep]
        inv.vms = [r for r in inv.vms if os.path.abspath(r.config.path) in keep]
    return inv


def _owners_by_disks(cc: VmConfig, vms: list[VmConfig], idx: list[int], mapper: PathMapper,
                     disks: DiskIndex) -> list[int]:
    """Among VMs sharing a snapshot folder, those whose disk chains share a base disk with
    the checkpoint's frozen disks (no key says which VM a checkpoint belongs to)."""
    def bases(cfg: VmConfig) -> set[tuple[int, int]]:
        out = set()
        for dd in _resolve_drives(cfg, mapper, disks, [], ""):
            if dd.chain:
                out.add(dd.chain[-1].ident)
        return out

    mine = bases(cc)
    if not mine:
        return []
    return [i for i, vm in zip(idx, vms) if bases(vm) & mine]


def unreferenced_disks(top: str, inv: Inventory) -> list[dict[str, Any]]:
    """Every .vhdx/.avhdx below ``top`` that no configuration references (directly or as
    a parent of a referenced disk), grouped into chains by parent linkage."""
    assert inv.disks is not None
    closure = inv.closure()
    infos: list[DiskInfo] = []
    broken: list[dict[str, Any]] = []
    for p in walk_files(top, DISK_SUFFIXES):
        info = inv.disks.info(p)
        if isinstance(info, str):
            broken.append({"path": p, "error": info})
        elif info.ident not in closure:
            infos.append(info)
    by_guid = {i.data_write_guid: i for i in list(closure.values()) + infos}
    parent_of: dict[tuple[int, int], DiskInfo | None] = {}
    for i in infos:
        parent_of[i.ident] = next((by_guid[g] for g in i.linkages if g in by_guid and by_guid[g].ident != i.ident),
                                  None)
    groups: dict[tuple[int, int], dict[str, Any]] = {}
    for i in infos:
        root, depth, seen = i, 0, {i.ident}
        while True:
            up = parent_of.get(root.ident)
            if up is None or up.ident not in parent_of or up.ident in seen:
                break
            seen.add(up.ident)
            root, depth = up, depth + 1
        g = groups.setdefault(root.ident, {"files": [], "hangs_off": None, "parent_missing": False})
        g["files"].append((depth, i.path))
        if root is i:
            up = parent_of.get(i.ident)
            if up is not None:
                g["hangs_off"] = up.path  # a referenced disk
            elif i.has_parent:
                g["parent_missing"] = True
    out = []
    for g in groups.values():
        files = [p for _, p in sorted(g["files"])]
        out.append({"base": files[0], "files": files, "hangs_off": g["hangs_off"],
                    "parent_missing": g["parent_missing"]})
    out.sort(key=lambda g: g["base"])
    return out + [{"base": b["path"], "files": [b["path"]], "hangs_off": None, "parent_missing": False,
                   "error": b["error"]} for b in broken]


__all__ = [
    "Checkpoint",
    "DiskIndex",
    "Drive",
    "HostRegistry",
    "VmConfig",
    "VmReport",
    "analyze_vm",
    "config_kind",
    "find_lingering",
    "inventory",
    "read_host_registry",
    "read_vm_config",
    "unreferenced_disks",
]
