"""The five real HyperVStorage files report what docs/hyperv.md §9
measured on them, every CRC verifies (the parser is strict), and the key tree agrees
with dissect.hypervisor, an independent reader, wherever dissect's dict model can
hold it."""

from __future__ import annotations

import hashlib
import json

import pytest

from vhdx import cli
from vhdx.hyperv import open_config
from vhdx.hyperv.vm import config_kind, read_host_registry, read_vm_config

# hyperv.md §9, the sample files as measured byte by byte (and read alike by dissect):
# size, header sequences (copy 0, copy 1), log offset+size, key tables, entries (free),
# keys, nodes, values, root key.
FIXTURES = {
    "dissect.hypervisor/test.vmcx": (81920, (25, 24), (0xA000, 0x9000), 8, 411, 2, 409, 106, 303, "configuration"),
    "dissect.hypervisor/test.VMRS": (45092, (7, 6), (0x8000, 0x4000), 2, 114, 1, 113, 23, 90, "configuration"),
    "dissect.target/993F7B33-6057-4D1E-A1FE-A1A1D77BE974.vmcx":
        (65536, (23, 22), (0x8000, 0x7000), 6, 341, 3, 338, 87, 251, "configuration"),
    "dissect.target/EC04F346-DB96-4700-AF5B-77B3C56C38BD.vmcx":
        (81920, (25, 24), (0xA000, 0x9000), 8, 411, 2, 409, 106, 303, "configuration"),
    "dissect.target/data.vmcx": (49246, (105, 104), (0x9000, 0x5000), 3, 43, 4, 39, 4, 35, "Configurations"),
}

# hyperv.md §9, second table: name, id, generation, version, created, drives (label, type, pathname)
VMS = {
    "dissect.hypervisor/test.vmcx": (
        "Other Location", "282874FC-59D6-4F30-BC04-5FDD909C82E0", 1, 2304, "2021-08-22T21:41:00.717226Z",
        [("IDE 0:0", "VHD", r"C:\Users\Public\Documents\Hyper-V\Virtual Hard Disks\Other Location.vhdx"),
         ("IDE 0:1", "NONE", ""), ("IDE 1:0", "ISO", ""), ("IDE 1:1", "NONE", ""), ("floppy 0:0", "VFD", "")],
        37),
    "dissect.target/EC04F346-DB96-4700-AF5B-77B3C56C38BD.vmcx": (
        "Default Generation 1", "EC04F346-DB96-4700-AF5B-77B3C56C38BD", 1, 2304, "2023-02-17T17:03:06.232140Z",
        [("IDE 0:0", "VHD", r"C:\Disks\Default Generation 1.vhdx"), ("IDE 0:1", "NONE", ""),
         ("IDE 1:0", "ISO", ""), ("IDE 1:1", "NONE", ""), ("floppy 0:0", "VFD", "")], 37),
    "dissect.target/993F7B33-6057-4D1E-A1FE-A1A1D77BE974.vmcx": (
        "Default Generation 2", "993F7B33-6057-4D1E-A1FE-A1A1D77BE974", 2, 2304, "2023-02-17T17:03:30.381010Z",
        [("SCSI 0:0", "VHD", r"C:\Disks\Default Generation 2.vhdx")], 27),
}


@pytest.fixture
def fixture_path(shared_dir):
    # Opened in place (never copied): the parser is read-only and the test proves it.
    def get(rel: str):
        p = shared_dir / "fixtures" / rel
        if not p.is_file():
            pytest.skip(f"fixture {rel} not present")
        return p
    return get


def _sha(p) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.parametrize("rel", sorted(FIXTURES))
def test_container_counts_and_every_crc(rel, fixture_path):
    size, seqs, log, ntables, entries, free, keys, nodes, values, root = FIXTURES[rel]
    p = fixture_path(rel)
    before = _sha(p)
    cfg = open_config(p)  # strict: any CRC mismatch of a live structure raises
    assert cfg.file_size == size
    assert tuple(h.sequence for h in cfg.headers) == seqs  # both copies verify
    assert cfg.header.slot == 0
    assert (cfg.log.offset, cfg.log.size, cfg.log.active, cfg.log.replayed) == (*log, 0, False)
    assert [t.index for t in cfg.tables] == list(range(1, ntables + 1))
    st = cfg.stats()
    assert (st["entries"], st["free_entries"], st["keys"], st["nodes"], st["values"]) == \
        (entries, free, keys, nodes, values)
    assert st["orphans"] == 0 and cfg.warnings == []
    assert [k.name for k in cfg.root.children] == [root]
    assert _sha(p) == before


@pytest.mark.parametrize("rel", sorted(FIXTURES))
def test_tree_agrees_with_dissect(rel, fixture_path):
    hv = pytest.importorskip("dissect.hypervisor.descriptor.hyperv")
    p = fixture_path(rel)
    cfg = open_config(p)
    with open(p, "rb") as fh:
        theirs = hv.HyperVFile(fh).as_dict()

    # dissect keeps a dict: for a repeated sibling name the entry stored last wins.
    def lossy(key):
        if not key.is_node:
            return key.value
        out = {}
        for c in sorted(key.children, key=lambda k: (k.table, k.offset)):
            out[c.name] = lossy(c)
        return out

    assert lossy(cfg.root) == theirs
    if rel.endswith("test.VMRS"):
        # ... which hides 89 of the 113 keys (hyperv.md §2.9); the multimap keeps them all.
        def count(d):
            return sum(1 + (count(v) if isinstance(v, dict) else 0) for v in d.values())
        assert count(theirs) == 24 and cfg.stats()["keys"] == 113
        metrics = cfg.get("configuration/global_settings/metrics")
        assert [k.name for k in metrics.children] == ["devicetype"] * 3
        per_type = [len(dt.get("deviceinstance").children_named("metric")) for dt in metrics.children]
        assert per_type == [1, 3, 6]
        flagged = [k for _, k in cfg.root.walk() if k.flags]
        assert len(flagged) == 16 and {k.name for k in flagged} == {"guid", "typecode"}
        assert all(f.flags == 0x02 for f in flagged)
    else:
        assert cfg.to_dict() == theirs  # no repeated names: the multimap's dict view is dissect's


@pytest.mark.parametrize("rel", sorted(VMS))
def test_vm_semantics(rel, fixture_path):
    name, vm_id, gen, version, created, drives, manifest = VMS[rel]
    cfg = open_config(fixture_path(rel))
    assert config_kind(cfg) == "vm"
    vm = read_vm_config(cfg)
    assert (vm.name, vm.id, vm.logical_id, vm.generation, vm.version, vm.version_text, vm.created) == \
        (name, vm_id, vm_id, gen, version, "9.0", created)
    assert sorted((d.label, d.type, d.pathname) for d in vm.drives) == sorted(drives)
    assert vm.manifest_size == manifest
    assert (vm.checkpoint_list_size, vm.checkpoint_type_policy, vm.automatic_checkpoints,
            vm.disk_merge_pending) == (0, 3, False, False)
    assert vm.guest_state_path == rf"C:\Hyper-V\EasyToFind\Virtual Machines\{vm_id}.vmgs"
    assert vm.warnings == []
    if rel.endswith("993F7B33-6057-4D1E-A1FE-A1A1D77BE974.vmcx"):
        assert vm.drives[0].controller_id == "dbcf5442-5b2e-4471-9b01-8aa4c5d0d011"
    if rel.endswith("test.vmcx"):  # its SCSI controller 73e0f0c5-... has no drives
        scsi = [c for c in vm.controllers if c["bus"] == "SCSI"]
        assert len(scsi) == 1 and scsi[0]["id"].startswith("73e0f0c5") and scsi[0]["drives"] == 0


def test_runtime_state_file(fixture_path):
    cfg = open_config(fixture_path("dissect.hypervisor/test.VMRS"))
    assert config_kind(cfg) == "runtime"
    vm = read_vm_config(cfg)
    assert vm.name is None and vm.version == 2304 and vm.drives == []


def test_host_registry(fixture_path):
    cfg = open_config(fixture_path("dissect.target/data.vmcx"))
    assert config_kind(cfg) == "host"
    reg = read_host_registry(cfg)
    want = {guid: folder + "\\Virtual Machines\\" + guid + ".vmcx" for guid, folder in (
        ("EC04F346-DB96-4700-AF5B-77B3C56C38BD", r"C:\Hyper-V\EasyToFind"),
        ("993F7B33-6057-4D1E-A1FE-A1A1D77BE974", r"C:\Hyper-V\EasyToFind"),
        ("A5B56431-CA94-482A-B70A-F1F2B12373BE", r"C:\VM\Other Generation 1"),
        ("4C57771A-3230-4B92-B029-D63F96518E70", r"C:\VM\Other Generation 2"),
    )}
    assert reg.vms == want
    assert len(reg.cache) == 4 and len(reg.resource_types) == 25 and reg.format_version == 2
    assert all(p.startswith("C:\\ProgramData\\Microsoft\\Windows\\Hyper-V\\Virtual Machines Cache\\")
               for p in reg.cache.values())


def test_dump_and_show_cli_are_read_only(fixture_path, capsys):
    paths = [fixture_path(r) for r in sorted(FIXTURES)]
    before = {p: _sha(p) for p in paths}
    for p in paths:
        assert cli.main(["config", "dump", str(p), "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["stats"]["keys"] == FIXTURES[str(p.relative_to(p.parents[1]))][6]
        assert len(out["keys"]) == out["stats"]["keys"]
        assert cli.main(["config", "dump", str(p)]) == 0
        text = capsys.readouterr().out
        assert f"{FIXTURES[str(p.relative_to(p.parents[1]))][6]} keys" in text
    for d in {p.parent for p in paths}:
        assert cli.main(["vm", "show", str(d), "--json"]) == 0
        inv = json.loads(capsys.readouterr().out)
        assert inv["errors"] == []
    assert cli.main(["vm", "scan", str(paths[0].parents[1]), "--json"]) == 0
    scan = json.loads(capsys.readouterr().out)
    assert sorted(v["vm"]["name"] for v in scan["vms"]) == sorted(v[0] for v in VMS.values())
    # The drives' disks are not part of the fixtures: each is reported, never guessed.
    assert all(v["unresolved"] and v["drives"][0]["chain"] is None for v in scan["vms"])
    assert {p: _sha(p) for p in paths} == before


def test_stale_key_tables_in_free_space_are_never_read(fixture_path):
    """data.vmcx keeps old key-table copies in a free object (hyperv.md §2.4: index 2 sequence 15
    at 0x5000, index 1 sequence 29 at 0x6000); only the object table's live tables count."""
    from vhdx.hyperv import structures as S

    p = fixture_path("dissect.target/data.vmcx")
    cfg = open_config(p)
    assert [(t.index, t.offset) for t in cfg.tables] == [(1, 0x3000), (2, 0x7000), (3, 0x8000)]
    assert [t.sequence for t in cfg.tables[:2]] == [33, 33]
    raw = p.read_bytes()
    stale = [S.KeyTableHeader.parse(raw[o:o + 10]) for o in (0x5000, 0x6000)]
    assert [(h.signature, h.index, h.sequence) for h in stale] == [(2, 2, 15), (2, 1, 29)]
    assert (S.OBJ_FREE, 0x4000, 0x3000) in cfg.objects


def test_real_configs_placed_on_a_copied_volume(fixture_file, tmp_path, capsys):
    """The real data.vmcx and VM configs arranged as on their host (the paths they name),
    with disks made by the project's writer at the drives' paths: the registry leads to
    both VMs through --root, their drives resolve, the two VMs whose files are absent are
    reported, and no input changes."""
    import shutil

    import vhdx

    c = tmp_path / "C"
    hv = c / "ProgramData/Microsoft/Windows/Hyper-V"
    vms = c / "Hyper-V/EasyToFind/Virtual Machines"
    for d in (hv, vms, c / "Disks"):
        d.mkdir(parents=True)
    shutil.copyfile(fixture_file("dissect.target/data.vmcx"), hv / "data.vmcx")
    for g in ("EC04F346-DB96-4700-AF5B-77B3C56C38BD", "993F7B33-6057-4D1E-A1FE-A1A1D77BE974"):
        shutil.copyfile(fixture_file(f"dissect.target/{g}.vmcx"), vms / f"{g}.vmcx")
    for n in (1, 2):
        vhdx.create(c / "Disks" / f"Default Generation {n}.vhdx", 4 << 20)
    files = sorted(p for p in c.rglob("*") if p.is_file())
    before = {p: _sha(p) for p in files}
    assert cli.main(["vm", "show", str(hv), "--root", f"C:={c}", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    got = {v["vm"]["name"]: v for v in out["vms"]}
    assert set(got) == {"Default Generation 1", "Default Generation 2"}
    for n, v in ((1, got["Default Generation 1"]), (2, got["Default Generation 2"])):
        (drive,) = v["drives"]
        assert drive["resolution"]["how"] == "root"
        assert [f["path"] for f in drive["chain"]] == [str(c / "Disks" / f"Default Generation {n}.vhdx")]
        assert _tree(v) == [("Now", [])] and v["unresolved"] == []
    assert sorted(u["vm"] for u in out["registry_unresolved"]) == [
        "4C57771A-3230-4B92-B029-D63F96518E70", "A5B56431-CA94-482A-B70A-F1F2B12373BE"]
    assert {p: _sha(p) for p in files} == before


def _tree(vm: dict) -> list:
    def conv(nodes):
        return [(n["name"], conv(n["children"])) for n in nodes]
    return conv(vm["tree"])
