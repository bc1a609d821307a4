"""The container parser on files from tests/hvs_builder.py, checked against
dissect.hypervisor (an independent reader) and against the tree the builder was given:
every value type, file objects, a chained object table, insertion order that differs
from the physical order, gaps in insertion sequences, the multimap API."""

from __future__ import annotations

import hvs_builder as B
import pytest

from vhdx.hyperv import open_config
from vhdx.hyperv import structures as S


def _tree() -> list:
    return [B.N("configuration",
                B.N("types", B.V("i", -(2**63)), B.V("u", 2**64 - 1, type=S.VT_UINT), B.V("d", 3.25),
                    B.V("s", "héllo wörld ☃"), B.V("e", ""), B.V("a", b"\0\1\2"), B.V("t", True), B.V("f", False),
                    B.N("empty")),
                B.N("fo", B.V("big", bytes(range(256)) * 40, file_object=True),
                    B.V("text", "long text " * 300, file_object=True)),
                B.N("dup", B.V("x", 1)), B.N("dup", B.V("x", 2)), B.N("dup", B.V("x", 3), B.N("dup", B.V("y", 4))),
                *[B.N(f"n{i}", B.V("pad", "p" * 200)) for i in range(25)])]


def _expected(items: list):
    """The builder's own tree in the shape of ``Key.to_dict()``."""
    out: dict = {}
    counts: dict = {}
    for it in items:
        counts[it.name] = counts.get(it.name, 0) + 1
    for it in items:
        v = _expected(it.children) if isinstance(it, B.N) else it.value
        if counts[it.name] > 1:
            out.setdefault(it.name, []).append(v)
        else:
            out[it.name] = v
    return out


@pytest.mark.parametrize("kw", [{}, {"reverse_physical": True, "insertion_gap": 7},
                                {"chain_objects": True}, {"table_size": 0x2000}])
def test_round_trip(tmp_path, kw):
    p = tmp_path / "t.vmcx"
    b = B.write(p, _tree(), **kw)
    cfg = open_config(p)
    assert cfg.to_dict() == _expected(_tree())
    assert cfg.warnings == [] and cfg.orphans == []
    assert len(cfg.tables) == len(b.layout["tables"]) >= (1 if kw.get("table_size") else 2)
    conf = cfg.get("configuration")
    assert [k.name for k in conf.children][:5] == ["types", "fo", "dup", "dup", "dup"]
    assert cfg.get("configuration/dup[3]/x").value == 3 and cfg.get("configuration/dup[3]/dup/y").value == 4
    assert cfg.get("configuration/dup[4]") is None and cfg.get("configuration/dup[0]") is None
    t = cfg.get("configuration/types")
    assert [(k.name, k.type_name) for k in t.children] == [
        ("i", "int"), ("u", "uint"), ("d", "double"), ("s", "string"), ("e", "string"), ("a", "array"),
        ("t", "bool"), ("f", "bool"), ("empty", "node")]
    assert t.next_insertion == 9 * kw.get("insertion_gap", 1) + 1 and t.child("empty").next_insertion == 0
    paths = [p for p, _ in cfg.root.walk()]
    assert len(paths) == len(set(paths)) == cfg.stats()["keys"]
    assert "configuration/dup[2]/x" in paths
    lazy = open_config(p, load_file_objects=False)
    ref = lazy.get("configuration/fo/big").value
    assert ref.length == 256 * 40 and (ref.offset, 0x1000 * 3) in [(o, s) for o, s in b.layout["file_objects"]]


def test_dissect_reads_the_builder_files_the_same(tmp_path):
    hv = pytest.importorskip("dissect.hypervisor.descriptor.hyperv")
    tree = [B.N("configuration", *[it for it in _tree()[0].children if it.name != "dup"])]
    for kw in ({}, {"reverse_physical": True, "insertion_gap": 3}, {"chain_objects": True}):
        p = tmp_path / "d.vmcx"
        B.write(p, tree, **kw)
        with open(p, "rb") as fh:
            theirs = hv.HyperVFile(fh).as_dict()
        assert open_config(p).to_dict() == theirs


def test_dirty_log_round_trip(tmp_path):
    old = [B.N("configuration", B.V("name", "before"), B.N("gone", B.V("x", 1)))]
    p = tmp_path / "dirty.vmcx"
    b = B.write(p, _tree(), dirty_from=old)
    assert b.layout["active"]
    data = p.read_bytes()
    cfg = open_config(p)
    assert cfg.log.replayed and cfg.to_dict() == _expected(_tree())
    assert open_config(p, replay=False).to_dict() == _expected(old)
    assert p.read_bytes() == data  # replayed in memory only


def test_dump_without_file_objects(tmp_path, capsys):
    import json

    from vhdx import cli

    p = tmp_path / "saved.vmrs"
    b = B.write(p, B.runtime_tree(True, ram_blocks=2), chain_objects=True)
    assert cli.main(["config", "dump", str(p), "--json", "--no-file-objects"]) == 0
    out = json.loads(capsys.readouterr().out)
    refs = [k["value"] for k in out["keys"] if k["path"].startswith("savedstate/RamBlock")]
    assert refs == [{"file_object": o, "length": 64 << 10} for o, _ in b.layout["file_objects"]]
    assert cli.main(["config", "dump", str(p), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tree"]["savedstate"]["RamBlock1"] == (bytes([1]) * (64 << 10)).hex()
