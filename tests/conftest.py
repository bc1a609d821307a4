"""Shared pytest fixtures: the shared fixture directory, a decompression cache,
markers ``slow`` / ``soak`` (soak is opt-in: ``--run-soak`` or ``VHDX_SOAK=1``)."""

from __future__ import annotations

import bz2
import gzip
import json
import os
import shutil
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:  # make ``import builder`` / ``import oracles`` work
    sys.path.insert(0, str(TESTS_DIR))
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-soak", action="store_true", default=False,
                     help="run the long randomized soak tests")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: longer tests (still run by default)")
    config.addinivalue_line("markers", "soak: long randomized runs, opt-in (--run-soak / VHDX_SOAK=1)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-soak") or os.environ.get("VHDX_SOAK") == "1":
        return
    skip = pytest.mark.skip(reason="soak test: pass --run-soak or set VHDX_SOAK=1")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)


def find_shared_dir() -> Path | None:
    env = os.environ.get("VHDX_SHARED")
    cand = Path(env) if env else REPO_ROOT.parent / "shared"
    return cand if (cand / "fixtures" / "expected.json").is_file() else None


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared`` next to the repo (or ``$VHDX_SHARED``); skips when absent."""
    d = find_shared_dir()
    if d is None:
        pytest.skip("shared fixtures not found: set VHDX_SHARED or place them at ../shared")
    return d


@pytest.fixture(scope="session")
def expected(shared_dir: Path) -> dict:
    """The parsed ``fixtures/expected.json`` (``images`` keyed by relative path)."""
    with open(shared_dir / "fixtures" / "expected.json") as fh:
        return json.load(fh)


def decompress(src: Path, dest_dir: Path) -> Path:
    """Expand ``.gz`` / ``.bz2`` / ``.zip`` (first member) into ``dest_dir``."""
    name = src.name
    for ext, opener in ((".gz", gzip.open), (".bz2", bz2.open)):
        if name.endswith(ext):
            out = dest_dir / name[: -len(ext)]
            with opener(src, "rb") as fi, open(out, "wb") as fo:
                shutil.copyfileobj(fi, fo, 8 << 20)
            return out
    if name.endswith(".zip"):
        with zipfile.ZipFile(src) as z:
            member = z.namelist()[0]
            out = dest_dir / Path(member).name
            with z.open(member) as fi, open(out, "wb") as fo:
                shutil.copyfileobj(fi, fo, 8 << 20)
            return out
    out = dest_dir / name
    shutil.copyfile(src, out)
    return out


@pytest.fixture(scope="session")
def fixture_file(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``fixture_file("discutils/swap.vhdx.gz") -> Path`` of a decompressed copy.

    Each fixture is expanded once per session into its own directory (copy
    semantics: the original under shared/ is never touched). Tests must not
    modify the returned file; copy it first if they need to.
    """
    cache: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("fixtures")

    def get(rel: str) -> Path:
        if rel not in cache:
            src = shared_dir / "fixtures" / rel
            if not src.is_file():
                pytest.skip(f"fixture {rel} not present in {shared_dir}")
            d = root / rel.replace("/", "__")
            d.mkdir()
            cache[rel] = decompress(src, d)
        return cache[rel]

    return get


def vhdx_available() -> bool:
    try:
        import vhdx
    except ImportError:
        return False
    return hasattr(vhdx, "open")


@pytest.fixture
def vhdx_mod():
    """The ``vhdx`` package, skipping when the read API is not there yet."""
    if not vhdx_available():
        pytest.skip("vhdx.open is not implemented yet")
    import vhdx

    return vhdx
