"""Fuzzing (issue 13 item 11): the atheris targets in tests/fuzz/, their
regression inputs, and a quick structured sweep that runs by default.

The contract each target checks: every failure is a VhdxError; nothing else
escapes vhdx.open, reads, extents or check_chain. The long coverage-guided runs
are soak tests (opt-in); every input they found is kept in
tests/fuzz/regressions/ (``vhdx-*`` for the image target, ``parsers-*`` for the
raw parsers) and replayed here on every run.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parent / "fuzz"
sys.path.insert(0, str(FUZZ))

import harness  # noqa: E402
import parsers_target  # noqa: E402

REGRESSIONS = sorted((FUZZ / "regressions").glob("*"))
# The corpora the coverage-guided runs built (inputs that reached new code): small
# files, replayed by default so that every path they reached is checked each run.
# Stored one input per line, hex, in tests/fuzz/corpus/<target>.hex.
CORPUS = {t: [bytes.fromhex(line) for line in (FUZZ / "corpus" / f"{t}.hex").read_text().split()]
          if (FUZZ / "corpus" / f"{t}.hex").exists() else [] for t in ("vhdx", "parsers")}


@pytest.fixture(scope="module")
def runner(tmp_path_factory):  # noqa: ANN001, ANN201
    return harness.Runner(tmp_path_factory.mktemp("fuzz-seeds"))


def _seed_digests(r: harness.Runner) -> list[bytes]:
    return [s.path.read_bytes() for s in r.seeds]


def test_seeds_open_cleanly(runner):
    """The seeds themselves are valid images (else the edits explore nothing)."""
    for s in runner.seeds:
        harness.exercise(s.path, s.search_dir, True)
        with harness.vhdx.open(s.path, search_dirs=[s.search_dir]) as d:
            assert d.size > 0


@pytest.mark.parametrize("path", REGRESSIONS, ids=[p.name for p in REGRESSIONS])
def test_regression_inputs_stay_inside_the_error_hierarchy(runner, path):
    data = path.read_bytes()
    if path.name.startswith("parsers-"):
        parsers_target.one(data)
    else:
        before = _seed_digests(runner)
        runner.one(data)
        assert _seed_digests(runner) == before  # the harness restored its seed


def test_fuzz_corpora_stay_inside_the_error_hierarchy(runner):
    if not CORPUS["vhdx"] and not CORPUS["parsers"]:
        pytest.skip("no corpus stored")
    before = _seed_digests(runner)
    for data in CORPUS["vhdx"]:
        runner.one(data)
    for data in CORPUS["parsers"]:
        parsers_target.one(data)
    assert _seed_digests(runner) == before


def test_structured_sweep(runner):
    """A few hundred structured random edits, resealed or not, with check."""
    before = _seed_digests(runner)
    for data in harness.random_inputs(300, seed=1234):
        runner.one(data)
    for data in harness.random_inputs(300, seed=99):
        parsers_target.one(bytes([data[0] % 5]) + data[1:])
    assert _seed_digests(runner) == before


@pytest.mark.soak
@pytest.mark.parametrize("target", ["fuzz_parsers.py", "fuzz_vhdx.py"])
def test_coverage_guided_fuzzing_finds_nothing(tmp_path, target):
    """Each atheris target for a bounded time ($VHDX_FUZZ_SECONDS, default 120)."""
    if importlib.util.find_spec("atheris") is None:
        pytest.skip("atheris not installed")
    seconds = int(os.environ.get("VHDX_FUZZ_SECONDS", "120"))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    kind = "parsers" if target == "fuzz_parsers.py" else "vhdx"
    for p in REGRESSIONS:
        if p.name.startswith("parsers-") == (kind == "parsers"):
            (corpus / p.name).write_bytes(p.read_bytes())
    for i, data in enumerate(CORPUS[kind]):  # start where the stored runs stopped
        (corpus / f"stored-{i}").write_bytes(data)
    proc = subprocess.run(
        [sys.executable, str(FUZZ / target), f"-max_total_time={seconds}", "-timeout=10",
         "-rss_limit_mb=3072", f"-max_len={70000 if 'parsers' in target else 600}",
         f"-artifact_prefix={tmp_path}/", str(corpus)],
        capture_output=True, text=True, timeout=seconds + 300)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _run_vhd_target(tmp_path, *limit: str) -> subprocess.CompletedProcess:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    return subprocess.run(
        [sys.executable, str(FUZZ / "fuzz_vhd.py"), *limit, "-timeout=10", "-rss_limit_mb=3072",
         "-max_len=70000", f"-artifact_prefix={tmp_path}/", str(corpus)],
        capture_output=True, text=True, timeout=900)


def test_vhd_fuzz_target_runs_clean_briefly(tmp_path):
    """The VHD target (tests/fuzz/fuzz_vhd.py) over its seeds and 500 mutations:
    nothing but VhdxError escapes open, reads, extents and check."""
    if importlib.util.find_spec("atheris") is None:
        pytest.skip("atheris not installed")
    proc = _run_vhd_target(tmp_path, "-runs=500")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Done 500 runs" in proc.stderr


@pytest.mark.soak
def test_vhd_fuzz_target_finds_nothing(tmp_path):
    """The VHD target for a bounded time ($VHDX_FUZZ_SECONDS, default 120)."""
    if importlib.util.find_spec("atheris") is None:
        pytest.skip("atheris not installed")
    proc = _run_vhd_target(tmp_path, f"-max_total_time={int(os.environ.get('VHDX_FUZZ_SECONDS', '120'))}")
    assert proc.returncode == 0, proc.stderr[-4000:]
