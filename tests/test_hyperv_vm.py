"""VM folders with checkpoint trees, made of real disk chains (the project's writer) and
HyperVStorage configs (tests/hvs_builder.py): ``vm show`` / ``vm scan`` report the tree,
"Now" and the lingering files exactly; ``vm clean`` folds the unowned link and every
remaining configuration's drives read as before; dry runs and read-only commands
change no byte.

The layout follows hyperv.md §6: ``<C:>/Hyper-V/<VM>/{Virtual Machines,Snapshots,Virtual Hard
Disks}``; configs name disks by their Windows path ``C:\\Hyper-V\\...`` and the tests map
``C:`` with ``--root``.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import subprocess
import sys
import uuid
from pathlib import Path

import hvs_builder as B

import vhdx
from vhdx import cli

MiB = 1 << 20
SIZE = 4 * MiB
REPO = Path(__file__).resolve().parent.parent
T0 = datetime.datetime(2024, 5, 1, 9, 0, tzinfo=datetime.timezone.utc)


def _id(n: int) -> str:
    return str(uuid.UUID(int=0xC0FFEE00 << 96 | n)).upper()


class Host:
    """A copied host volume: ``root`` plays ``C:\\``."""

    def __init__(self, tmp: Path, vm: str = "VM1", base: str | None = None) -> None:
        self.root = tmp / "C"
        self.vm = vm
        self.base_dir = self.root / (base or f"Hyper-V/{vm}")
        for d in ("Virtual Machines", "Snapshots", "Virtual Hard Disks"):
            (self.base_dir / d).mkdir(parents=True, exist_ok=True)
        self.vhd = self.base_dir / "Virtual Hard Disks"
        self.layer = 0

    def win(self, p: Path) -> str:
        return "C:\\" + str(p.relative_to(self.root)).replace("/", "\\")

    def disk(self, name: str, parent: Path | None = None) -> Path:
        """A disk with a write of its own, so that every layer changes what the chain reads."""
        p = self.vhd / name
        vhdx.create(p, None if parent else SIZE, parent=parent)
        self.layer += 1
        with vhdx.open(p, "r+") as d:
            d.write_at((self.layer % 4) * MiB + 512 * self.layer, bytes([self.layer]) * 4096)
        return p

    def vm_config(self, vm_id: str, ide=(), scsi=(), **kw) -> Path:
        p = self.base_dir / "Virtual Machines" / f"{vm_id}.vmcx"
        B.write(p, B.vm_tree(self.vm, vm_id, ide=[self.win(x) for x in ide],
                             scsi=[self.win(x) for x in scsi], created=T0, **kw))
        return p

    def checkpoint(self, cp_id: str, name: str, minutes: int, ide=(), scsi=(), saved: bool | None = None) -> Path:
        p = self.base_dir / "Snapshots" / f"{cp_id}.vmcx"
        B.write(p, B.vm_tree(name, cp_id, ide=[self.win(x) for x in ide], scsi=[self.win(x) for x in scsi],
                             created=T0 + datetime.timedelta(minutes=minutes)))
        if saved is not None:  # a saved state keeps RAM in file objects, here behind a chained object table
            B.write(p.with_suffix(".vmrs"), B.runtime_tree(saved, ram_blocks=3 if saved else 0),
                    chain_objects=saved)
        return p

    def files(self) -> list[Path]:
        return sorted(p for p in self.root.rglob("*") if p.is_file())


def _sha_files(paths) -> dict:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def _disk_hash(path: Path) -> str:
    with vhdx.open(path) as d:
        return hashlib.sha256(d.read_at(0, d.size)).hexdigest()


def _show(host: Host, target: Path | None = None, capsys=None, cmd: str = "show") -> dict:
    assert cli.main(["vm", cmd, str(target or host.base_dir), "--root", f"C:={host.root}", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _tree(vm: dict) -> list:
    """The checkpoint tree as (name, [children]) with "Now" as a name."""
    def conv(nodes):
        return [(n["name"], conv(n["children"])) for n in nodes]
    return conv(vm["tree"])


def _rel(host: Host, paths) -> list[str]:
    return sorted(str(Path(p).relative_to(host.root)) for p in paths)


# --- scenarios ------------------------------------------------------------------------------
def test_linear_tree(tmp_path, capsys):
    h = Host(tmp_path)
    base = h.disk("d.vhdx")
    a1 = h.disk(f"d_{_id(11)}.avhdx", base)
    a2 = h.disk(f"d_{_id(12)}.avhdx", a1)
    now = h.disk(f"d_{_id(13)}.avhdx", a2)
    cfg = h.vm_config(_id(1), scsi=[now])
    B.write(cfg.with_suffix(".vmrs"), B.runtime_tree(True))  # the VM itself is saved
    h.checkpoint(_id(101), "VM1 - A", 1, scsi=[base], saved=True)
    h.checkpoint(_id(102), "VM1 - B", 2, scsi=[a1], saved=False)
    h.checkpoint(_id(103), "VM1 - C", 3, scsi=[a2])
    before = _sha_files(h.files())
    for target in (cfg, h.base_dir, tmp_path):  # a .vmcx, a VM folder, a folder of VMs
        out = _show(h, target, capsys)
        assert len(out["vms"]) == 1 and out["errors"] == [] and out["unattributed_checkpoint_configs"] == []
        vm = out["vms"][0]
        assert _tree(vm) == [("VM1 - A", [("VM1 - B", [("VM1 - C", [("Now", [])])])])]
        assert vm["now"] == {"parent": _id(103), "parent_source": "disk chains", "saved_state": True,
                             "saved_state_note": f"{_id(1)}.vmrs holds savedstate"}
        cps = {c["name"]: c for c in vm["checkpoints"]}
        assert {n: (c["saved_state"], c["type"]) for n, c in cps.items()} == \
            {"VM1 - A": (True, "unknown"), "VM1 - B": (False, "unknown"), "VM1 - C": (False, "unknown")}
        assert cps["VM1 - B"]["created"] == "2024-05-01T09:02:00.000000Z"
        assert cps["VM1 - A"]["frozen_disks"][0]["chain"][0]["path"] == str(base)
        # the drive's whole chain, as ``vhdx info`` resolves it
        assert [c["path"] for c in vm["drives"][0]["chain"]] == [str(now), str(a2), str(a1), str(base)]
        assert vm["lingering"] == {"orphan_differencing_disks": [], "unowned_chain_links": [],
                                   "pending_merge": False}
        assert vm["unresolved"] == [] and vm["findings"] == []
    assert _sha_files(h.files()) == before


def test_branched_tree_with_two_children(tmp_path, capsys):
    """A: base. B (after A) and C (after applying A) are both children of A; D follows B;
    Now hangs off C."""
    h = Host(tmp_path)
    base = h.disk("d.vhdx")
    a1 = h.disk("d_a1.avhdx", base)      # written after A, frozen by B
    a2 = h.disk("d_a2.avhdx", a1)        # frozen by D
    b1 = h.disk("d_b1.avhdx", base)      # after applying A, frozen by C
    now = h.disk("d_now.avhdx", b1)
    h.vm_config(_id(1), ide=[now])
    h.checkpoint(_id(101), "A", 1, ide=[base])
    h.checkpoint(_id(102), "B", 2, ide=[a1])
    h.checkpoint(_id(104), "D", 3, ide=[a2])
    h.checkpoint(_id(103), "C", 4, ide=[b1])
    vm = _show(h, capsys=capsys)["vms"][0]
    assert _tree(vm) == [("A", [("B", [("D", [])]), ("C", [("Now", [])])])]
    assert {c["name"]: c["parent"] for c in vm["checkpoints"]} == \
        {"A": None, "B": _id(101), "C": _id(101), "D": _id(102)}
    assert vm["lingering"]["unowned_chain_links"] == [] and vm["lingering"]["orphan_differencing_disks"] == []


def test_two_disks_agree(tmp_path, capsys):
    h = Host(tmp_path)
    ide0 = h.disk("sys.vhdx")
    scsi0 = h.disk("data.vhdx")
    i1, s1 = h.disk("sys_1.avhdx", ide0), h.disk("data_1.avhdx", scsi0)
    i2, s2 = h.disk("sys_2.avhdx", i1), h.disk("data_2.avhdx", s1)
    h.vm_config(_id(1), ide=[i2], scsi=[s2])
    h.checkpoint(_id(101), "first", 1, ide=[ide0], scsi=[scsi0])
    h.checkpoint(_id(102), "second", 2, ide=[i1], scsi=[s1])
    vm = _show(h, capsys=capsys)["vms"][0]
    assert _tree(vm) == [("first", [("second", [("Now", [])])])]
    assert [(d["slot"], len(d["chain"])) for d in vm["drives"]] == [("IDE 0:0", 3), ("SCSI 0:0", 3)]
    assert vm["findings"] == []


def test_slots_that_disagree_are_reported(tmp_path, capsys):
    h = Host(tmp_path)
    x, y = h.disk("x.vhdx"), h.disk("y.vhdx")
    x1, y1 = h.disk("x_1.avhdx", x), h.disk("y_1.avhdx", y)
    h.vm_config(_id(1), ide=[x1], scsi=[y1])
    h.checkpoint(_id(101), "P", 1, ide=[x], scsi=[y1])  # its SCSI disk is not in the Now chain's past
    h.checkpoint(_id(102), "Q", 2, ide=[x1], scsi=[y])
    vm = _show(h, capsys=capsys)["vms"][0]
    assert any("drive slots disagree" in f for f in vm["findings"])

    def names(nodes):
        return [n for name, kids in nodes for n in [name, *names(kids)]]
    assert sorted(names(_tree(vm))) == ["Now", "P", "Q"]  # every checkpoint placed exactly once


def test_removed_checkpoint_leaves_an_unowned_link_and_clean_folds_it(tmp_path, capsys):
    """base <- u0 <- u <- k <- now: the configs of the checkpoints that froze base, u0 and u
    are gone (a backup product's recovery checkpoints); K froze k. One merge folds the run
    u, u0 into base."""
    h = Host(tmp_path)
    base = h.disk("d.vhdx")
    u0 = h.disk(f"d_{_id(20)}.avhdx", base)
    u = h.disk(f"d_{_id(21)}.avhdx", u0)
    k = h.disk(f"d_{_id(22)}.avhdx", u)
    now = h.disk(f"d_{_id(23)}.avhdx", k)
    cfg = h.vm_config(_id(1), scsi=[now])
    cp = h.checkpoint(_id(101), "K", 1, scsi=[k])
    vm = _show(h, capsys=capsys)["vms"][0]
    assert _tree(vm) == [("K", [("Now", [])])]
    links = vm["lingering"]["unowned_chain_links"]
    assert [(link["path"], link["on_running_chain"], link["children"]) for link in links] == \
        sorted([(str(u), True, [str(k)]), (str(u0), True, [str(u)])])
    assert vm["lingering"]["orphan_differencing_disks"] == []

    drives = {"now": _disk_hash(now), "K": _disk_hash(k)}
    configs = _sha_files([cfg, cp])
    before = _sha_files(h.files())
    argv = ["vm", "clean", str(h.base_dir), "--root", f"C:={h.root}", "--json"]
    assert cli.main(argv + ["--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert [(s["links"], s["target"], s["child"], s["refused"], s["done"]) for s in plan["steps"]] == \
        [([str(u), str(u0)], str(base), str(k), None, False)]
    assert _sha_files(h.files()) == before  # the dry run changed no byte

    assert cli.main(argv) == 0
    done = json.loads(capsys.readouterr().out)
    assert [(s["done"], s["merge"]["deleted"], s["merge"]["repointed"]) for s in done["steps"]] == \
        [(True, [str(u), str(u0)], [str(k)])]
    assert done["failed"] == [] and done["verified"] == [str(cfg)]
    assert not u.exists() and not u0.exists()
    assert {"now": _disk_hash(now), "K": _disk_hash(k)} == drives  # every drive reads as before
    assert _sha_files([cfg, cp]) == configs  # no configuration written
    vm = _show(h, capsys=capsys)["vms"][0]
    assert vm["lingering"]["unowned_chain_links"] == []
    assert [c["path"] for c in vm["drives"][0]["chain"]] == [str(now), str(k), str(base)]
    assert _tree(vm) == [("K", [("Now", [])])]


def test_clean_refuses_links_it_must_not_fold(tmp_path, capsys):
    """k <- u2 <- now: folding u2 into k would change checkpoint K; u3 has two children."""
    h = Host(tmp_path)
    k = h.disk("d.vhdx")
    u2 = h.disk("d_u2.avhdx", k)
    now = h.disk("d_now.avhdx", u2)
    h.vm_config(_id(1), scsi=[now])
    h.checkpoint(_id(101), "K", 1, scsi=[k])
    # a second VM: base2 <- u3 <- {now2, other}: a link with two children
    h2 = Host(tmp_path, "VM2")
    base2 = h2.disk("e.vhdx")
    u3 = h2.disk("e_u3.avhdx", base2)
    now2 = h2.disk("e_now.avhdx", u3)
    other = h2.disk("e_other.avhdx", u3)
    h2.vm_config(_id(2), ide=[now2])
    h2.checkpoint(_id(201), "O", 1, ide=[other])
    before = _sha_files(h.files() + h2.files())
    assert cli.main(["vm", "clean", str(tmp_path), "--root", f"C:={h.root}", "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    steps = {tuple(s["links"]): s for s in out["steps"]}
    assert set(steps) == {(str(u2),), (str(u3),)}
    assert "frozen disk of checkpoint" in steps[(str(u2),)]["refused"]
    assert "several children" in steps[(str(u3),)]["refused"]
    assert not any(s["done"] for s in out["steps"])
    assert _sha_files(h.files() + h2.files()) == before


def test_orphan_avhdx_and_scan(tmp_path, capsys):
    h = Host(tmp_path)
    base = h.disk("d.vhdx")
    now = h.disk("d_now.avhdx", base)
    left = h.disk(f"d_{_id(31)}.avhdx", base)        # discarded state left behind
    stray = h.disk(f"d_{_id(32)}.avhdx", left)       # and its child
    loose = h.disk("spare.vhdx")                     # a disk nobody uses
    loose_child = h.disk("spare_1.avhdx", loose)
    h.vm_config(_id(1), ide=[now])
    h.checkpoint(_id(101), "A", 1, ide=[base])
    before = _sha_files(h.files())
    vm = _show(h, capsys=capsys)["vms"][0]
    orphans = {o["path"]: o["parent"] for o in vm["lingering"]["orphan_differencing_disks"]}
    assert orphans == {str(left): str(base), str(stray): str(left), str(loose_child): str(loose)}
    assert vm["lingering"]["unowned_chain_links"] == []
    scan = _show(h, tmp_path, capsys, cmd="scan")
    groups = {tuple(g["files"]): g["hangs_off"] for g in scan["unreferenced_disks"]}
    assert groups == {(str(left), str(stray)): str(base), (str(loose), str(loose_child)): None}
    assert _sha_files(h.files()) == before


def test_pending_merge_is_reported_and_blocks_clean(tmp_path, capsys):
    h = Host(tmp_path)
    base = h.disk("d.vhdx")
    u = h.disk("d_u.avhdx", base)
    now = h.disk("d_now.avhdx", u)
    h.vm_config(_id(1), ide=[now], merge_pending=True)
    vm = _show(h, capsys=capsys)["vms"][0]
    assert vm["lingering"]["pending_merge"] is True
    assert [x["path"] for x in vm["lingering"]["unowned_chain_links"]] == [str(u)]
    assert cli.main(["vm", "clean", str(h.base_dir), "--root", f"C:={h.root}", "--json"]) == 1
    assert "merge is pending" in json.loads(capsys.readouterr().out)["steps"][0]["refused"]
    assert u.exists()


def test_active_replay_log_is_applied(tmp_path, capsys):
    """The VM config's tables still name the old disk; its active replay log has the new
    pages. Only a reader that replays (in memory) sees the current drive."""
    h = Host(tmp_path)
    base = h.disk("d.vhdx")
    now = h.disk("d_now.avhdx", base)
    p = h.base_dir / "Virtual Machines" / f"{_id(1)}.vmcx"
    new = B.vm_tree("VM1", _id(1), ide=[h.win(now)], created=T0)
    old = B.vm_tree("VM1 (old)", _id(1), ide=[h.win(base)], created=T0)
    built = B.write(p, new, dirty_from=old)
    assert built.layout["active"]
    h.checkpoint(_id(101), "A", 1, ide=[base])
    before = _sha_files(h.files())
    vm = _show(h, capsys=capsys)["vms"][0]
    assert vm["vm"]["name"] == "VM1"
    assert vm["drives"][0]["chain"][0]["path"] == str(now)
    assert _tree(vm) == [("A", [("Now", [])])]
    assert cli.main(["config", "dump", str(p), "--no-replay", "--json"]) == 0
    stale = json.loads(capsys.readouterr().out)
    assert stale["tree"]["configuration"]["properties"]["name"] == "VM1 (old)"
    assert _sha_files(h.files()) == before


def test_windows_paths_mapping_and_unresolved(tmp_path, capsys):
    h = Host(tmp_path)
    base = h.disk("Disk.vhdx")
    # Case differs from the files on disk; one path points nowhere; one is a device path.
    p = h.base_dir / "Virtual Machines" / f"{_id(1)}.vmcx"
    B.write(p, B.vm_tree("VM1", _id(1), ide=[h.win(base).upper(), r"D:\nowhere\x.vhdx", r"\\.\PhysicalDrive0"],
                         created=T0))
    vm = _show(h, capsys=capsys)["vms"][0]
    d0 = vm["drives"][0]
    assert d0["resolution"]["how"] == "root" and d0["chain"][0]["path"] == str(base)
    unresolved = {u["windows_path"]: u["problem"] for u in vm["unresolved"]}
    assert set(unresolved) == {r"D:\nowhere\x.vhdx", r"\\.\PhysicalDrive0"}
    assert "device path" in unresolved[r"\\.\PhysicalDrive0"]
    # Without --root the file name is looked up beside the config and in Virtual Hard Disks.
    assert cli.main(["vm", "show", str(p), "--json"]) == 0
    vm = json.loads(capsys.readouterr().out)["vms"][0]
    assert vm["drives"][0]["resolution"]["how"] == "Virtual Hard Disks"


def test_cli_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.vmcx"
    bad.write_bytes(b"\x14\x20\x28\x01" + bytes(0x3000))
    for args in (["config", "dump", str(bad)], ["vm", "show", str(bad)], ["config", "dump", str(tmp_path / "no")]):
        p = subprocess.run([sys.executable, "-m", "vhdx", *args], check=False, capture_output=True, text=True,
                           cwd=REPO, timeout=120)
        assert p.returncode == 1, p
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("vhdx: error: ") and args[-1] in lines[0], p.stderr


def test_host_registry_and_a_shared_snapshot_folder(tmp_path, capsys):
    """The default location holds two VMs whose checkpoints share one Snapshots folder;
    data.vmcx also registers a VM stored elsewhere and one whose files are gone."""
    hv = "ProgramData/Microsoft/Windows/Hyper-V"
    two, three = Host(tmp_path, "Two", hv), Host(tmp_path, "Three", hv)
    one = Host(tmp_path, "One", "VMs/One")
    b2, b3, b1 = two.disk("two.vhdx"), three.disk("three.vhdx"), one.disk("one.vhdx")
    n2, n3 = two.disk("two_1.avhdx", b2), three.disk("three_1.avhdx", b3)
    c1 = one.vm_config(_id(1), scsi=[b1])
    two.vm_config(_id(2), scsi=[n2])
    three.vm_config(_id(3), ide=[n3])
    two.checkpoint(_id(201), "Two - A", 1, scsi=[b2])
    three.checkpoint(_id(301), "Three - A", 2, ide=[b3])
    reg = B.N("Configurations", B.V("FormatVersion", 2), B.V("RegID", _id(9)), B.N("VirtualMachines", *[
        B.V(f"_{g}_", w) for g, w in ((_id(1), one.win(c1)), (_id(2), "C:\\" + hv.replace("/", "\\")
                                                                  + f"\\Virtual Machines\\{_id(2)}.vmcx"),
                                        (_id(4), r"C:\Gone\Virtual Machines\gone.vmcx"))]),
                 B.N("VirtualMachinesCache"), B.N("ResourceTypes"))
    B.write(two.base_dir / "data.vmcx", [reg])
    out = _show(two, two.base_dir, capsys)
    vms = {v["vm"]["name"]: v for v in out["vms"]}
    assert set(vms) == {"One", "Two", "Three"}
    assert [c["name"] for c in vms["Two"]["checkpoints"]] == ["Two - A"]
    assert [c["name"] for c in vms["Three"]["checkpoints"]] == ["Three - A"]
    assert _tree(vms["Three"]) == [("Three - A", [("Now", [])])]
    assert out["unattributed_checkpoint_configs"] == []
    assert [h["virtual_machines"][_id(1)] for h in out["hosts"]] == [one.win(c1)]
    assert [u["vm"] for u in out["registry_unresolved"]] == [_id(4)]
    # one VM's disks are never another's orphans, though they share the folders
    assert all(not v["lingering"]["orphan_differencing_disks"] for v in vms.values())


def test_clean_of_one_vm_respects_its_neighbours(tmp_path, capsys):
    """Two VMs of one folder share a base disk; cleaning one of them must not fold into
    the base, which the other VM's chain also uses (the merge engine names it)."""
    hv = "Hyper-V/Shared"
    a, b = Host(tmp_path, "A", hv), Host(tmp_path, "B", hv)
    base = a.disk("base.vhdx")
    u = a.disk("a_u.avhdx", base)
    now_a = a.disk("a_now.avhdx", u)
    now_b = b.disk("b_now.avhdx", base)
    cfg_a = a.vm_config(_id(1), ide=[now_a])
    b.vm_config(_id(2), ide=[now_b])
    before = _sha_files(a.files())
    assert cli.main(["vm", "clean", str(cfg_a), "--root", f"C:={a.root}", "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert [s["links"] for s in out["steps"]] == [[str(u)]]
    assert str(now_b) in out["steps"][0]["refused"]
    assert _sha_files(a.files()) == before


def test_parent_in_another_folder_found_through_root(tmp_path, capsys):
    """The child's relative locator path no longer fits (the parent sits on another
    volume copy); its absolute Windows path, mapped through --root, finds the parent."""
    from vhdx.writer import WritableDisk

    h = Host(tmp_path)
    other = h.root / "Base"
    other.mkdir()
    base = other / "base.vhdx"
    vhdx.create(base, SIZE)
    now = h.disk("d_now.avhdx", base)
    with WritableDisk(str(now), standalone=True) as w:
        w.update_parent_locator({"relative_path": ".\\base.vhdx", "volume_path": None,
                                 "absolute_win32_path": "C:\\Base\\BASE.VHDX"})
    h.vm_config(_id(1), ide=[now])
    before = _sha_files(h.files())
    vm = _show(h, capsys=capsys)["vms"][0]
    assert [c["path"] for c in vm["drives"][0]["chain"]] == [str(now), str(base)]
    assert cli.main(["vm", "show", str(h.base_dir), "--json"]) == 0  # without --root: reported, not guessed
    vm = json.loads(capsys.readouterr().out)["vms"][0]
    assert vm["drives"][0]["chain"] is None and "parent not found" in vm["drives"][0]["error"]
    assert _sha_files(h.files()) == before


def test_relative_arguments(tmp_path, capsys, monkeypatch):
    h = Host(tmp_path)
    base = h.disk("d.vhdx")
    now = h.disk("d_now.avhdx", base)
    h.vm_config(_id(1), ide=[now])
    h.checkpoint(_id(101), "A", 1, ide=[base])
    monkeypatch.chdir(tmp_path)
    assert cli.main(["vm", "show", "C/Hyper-V", "--root", "C:=C", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert _tree(out["vms"][0]) == [("A", [("Now", [])])] and out["unattributed_checkpoint_configs"] == []


def test_unreadable_config_in_a_folder(tmp_path, capsys):
    h = Host(tmp_path)
    now = h.disk("d.vhdx")
    h.vm_config(_id(1), ide=[now])
    bad = h.base_dir / "Virtual Machines" / f"{_id(2)}.vmcx"
    bad.write_bytes(bytes(0x4000))
    assert cli.main(["vm", "show", str(tmp_path), "--root", f"C:={h.root}", "--json"]) == 1
    cap = capsys.readouterr()
    out = json.loads(cap.out)
    assert [v["vm"]["name"] for v in out["vms"]] == ["VM1"]
    assert [e["path"] for e in out["errors"]] == [str(bad)]
    assert cap.err.count("\n") == 1 and cap.err.startswith(f"vhdx: error: {bad}: ")
