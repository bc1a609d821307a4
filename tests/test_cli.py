"""The ``vhdx`` command line: outputs checked against the library and ground truth."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import vhdx
from vhdx import structures as S

from builder import FULLY, PARTIAL, ZERO, Block, ImageSpec, build_chain, poke

MiB = S.MiB


def run(*args: str, check_rc: int | None = 0) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "vhdx.cli", *map(str, args)],
                       capture_output=True, text=True, timeout=300)
    if check_rc is not None:
        assert p.returncode == check_rc, (p.returncode, p.stdout, p.stderr)
    return p


@pytest.fixture
def chain(tmp_path):  # noqa: ANN201
    specs = [ImageSpec(virtual_size=6 * MiB, block_size=1 * MiB, name="base", seed=3,
                       blocks={0: Block(FULLY), 3: Block(FULLY), 5: Block(ZERO)}),
             ImageSpec(virtual_size=6 * MiB, block_size=1 * MiB, name="child", seed=4,
                       blocks={0: Block(PARTIAL), 1: Block(FULLY), 3: Block(ZERO)})]
    return build_chain(tmp_path, specs)


def _digests(paths) -> dict:  # noqa: ANN001
    return {str(p): hashlib.sha256(open(p, "rb").read()).hexdigest() for p in paths}


def test_hash_matches_ground_truth_and_leaves_inputs_unchanged(chain):
    before = _digests(chain.paths)
    for algo in ("sha256", "sha1", "md5"):
        p = run("hash", chain.top, "--algorithm", algo)
        want = hashlib.new(algo, chain.expected()).hexdigest()
        assert p.stdout == f"{want}  {chain.top}\n"
        assert p.stderr == ""  # no progress bar when not on a terminal
    assert _digests(chain.paths) == before


def test_info_json_describes_the_chain(chain):
    info = json.loads(run("info", chain.top, "--json").stdout)
    assert info["virtual_size"] == 6 * MiB
    assert [c["path"] for c in info["chain"]] == [str(p) for p in chain.paths]
    top, base = info["chain"]
    assert top["type"] == "differencing" and base["type"] == "dynamic"
    assert top["parent_locator"]["parent_linkage"].strip("{}") == base["data_write_guid"]
    assert top["blocks"]["PARTIALLY_PRESENT"] == 1 and top["blocks"]["FULLY_PRESENT"] == 1
    assert base["blocks"]["ZERO"] == 1 and base["log"]["dirty"] is False
    text = run("info", chain.top).stdout
    assert "differencing" in text and str(chain.parents[0]) in text


def test_map_json_agrees_with_reads(chain):
    m = json.loads(run("map", chain.top, "--json").stdout)
    expected = chain.expected()
    pos = 0
    for e in m["extents"]:
        assert e["offset"] == pos
        pos += e["length"]
        seg = expected[e["offset"]:e["offset"] + e["length"]]
        if e["kind"] == "data":
            with open(e["file"], "rb") as f:
                f.seek(e["file_offset"])
                assert f.read(e["length"]) == seg
        else:
            assert seg == bytes(len(seg))
    assert pos == 6 * MiB
    assert {e["kind"] for e in m["extents"]} >= {"data", "zero", "unallocated"}


def test_convert_writes_sparse_raw(chain, tmp_path):
    out = tmp_path / "out.raw"
    run("convert", chain.top, out)
    assert out.read_bytes() == chain.expected()
    st = os.stat(out)
    assert st.st_blocks * 512 < st.st_size  # holes where the chain has no data
    p = run("convert", chain.top, out, check_rc=1)  # refuses to overwrite
    assert "already exists" in p.stderr and "Traceback" not in p.stderr
    run("convert", chain.top, out, "--force")


def test_check_clean_then_corrupt(chain):
    p = run("check", chain.top)
    assert "clean" in p.stdout
    report = json.loads(run("check", chain.top, "--json").stdout)
    assert report["clean"] is True and len(report["files"]) == 2
    # Point the base's block 3 at its block 0: two blocks overlap.
    base = chain.images[1]
    geo = base.plan.geometry
    e0 = base.bat[geo.payload_index(0)]
    poke(base.path, base.plan.bat_offset + 8 * geo.payload_index(3), e0.to_bytes(8, "little"))
    p = run("check", chain.top, check_rc=2)  # 2: corruption found (qemu-img check's code)
    assert "overlaps" in p.stdout
    p = run("hash", chain.top, check_rc=1)
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("vhdx: error:")


@pytest.mark.parametrize("args,rc", [
    (["info", "/nonexistent.vhdx"], 1),
    (["hash", "/dev/null"], 1),
    (["bogus"], 2),
    (["hash"], 2),
])
def test_errors_are_one_line(args, rc):
    p = run(*args, check_rc=rc)
    assert "Traceback" not in p.stderr
    if rc == 1:
        assert p.stderr.count("\n") == 1


def test_not_a_vhdx(tmp_path):
    f = tmp_path / "x.vhdx"
    f.write_bytes(b"\0" * 4096)
    p = run("info", f, check_rc=1)
    assert "not a VHDX" in p.stderr


def test_missing_parent_message_names_the_options(chain):
    chain.parents[0].unlink()
    p = run("hash", chain.top, check_rc=1)
    assert "--parent" in p.stderr and p.stderr.count("\n") == 1
    # info still describes the lone file, saying why the rest is missing
    p = run("info", chain.top)
    assert "--parent" in p.stderr and "content reads need the parent" in p.stderr
    assert str(chain.top) in p.stdout
    p = run("check", chain.top, check_rc=2)
    assert "parent not found" in p.stdout


def test_dirty_log_fixture_info_and_check(fixture_file):
    path = fixture_file("discutils/vhdx-log-replay.vhdx.gz")
    before = _digests([path])
    info = json.loads(run("info", path, "--json").stdout)
    log = info["chain"][0]["log"]
    assert log["dirty"] and log["replayed_in_memory"] and log["entries_replayed"] == 2
    p = run("check", path, check_rc=3)  # 3: only warnings
    assert "unapplied" in p.stdout
    assert _digests([path]) == before
    with vhdx.open(path) as d:
        assert run("hash", path).stdout.split()[0] == hashlib.file_digest(d, "sha256").hexdigest()


def test_readme_first_command_flow(tmp_path):
    """The README's first line: make the samples, merge the newest checkpoint, info."""
    import re

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    first = re.search(r"```sh\n(.*)\n", readme).group(1)
    assert "make_samples.py" in first and "vhdx merge fixtures/sample-grandchild.avhdx" in first
    script = Path(__file__).resolve().parent.parent / "fixtures" / "make_samples.py"
    subprocess.run([sys.executable, str(script), "--out", str(tmp_path)], check=True, capture_output=True)
    gc, child = tmp_path / "sample-grandchild.avhdx", tmp_path / "sample-child.avhdx"
    before = run("hash", gc).stdout.split()[0]
    out = run("merge", gc).stdout
    assert "merged" in out and not gc.exists()
    assert run("hash", child).stdout.split()[0] == before
    info = json.loads(run("info", child, "--json").stdout)
    assert info["chain"][0]["log"]["dirty"] is False and len(info["chain"]) == 2
    run("check", child)


def test_bad_header_copy_falls_back_with_a_visible_warning(chain):
    base = chain.images[1]
    want = run("hash", base.path).stdout.split()[0]
    poke(base.path, S.HEADER_OFFSETS[1] + 100, b"\xff")  # header 2 (the current one) corrupt
    info = json.loads(run("info", base.path, "--json").stdout)
    assert info["chain"][0]["current_header"] == 1
    assert any("header 2 is invalid" in w for w in info["chain"][0]["warnings"])
    assert "header 2 is invalid" in run("info", base.path).stderr  # warnings: stderr
    assert run("hash", base.path).stdout.split()[0] == want
    p = run("check", base.path, check_rc=3)  # only warnings
    assert "header 2 is invalid" in p.stdout


def test_progress_bar_draws_on_a_terminal_only():
    import io
    import time

    from vhdx.progress import Progress

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty, pipe = Tty(), io.StringIO()
    for stream in (tty, pipe):
        bar = Progress(4 << 20, "hash", stream=stream)
        time.sleep(0.15)  # redraws are throttled to ~10 a second
        bar(1 << 20)
        bar(4 << 20)  # the last update is always drawn
        bar.close()
    drawn = tty.getvalue()
    assert "hash" in drawn and "100%" in drawn and "25%" in drawn and "4.00M" in drawn
    assert pipe.getvalue() == ""
