"""Packaging as a new user meets it: the sdist, the version, the optional and
stable-ABI extensions, ``python -m vhdx``.

Default suite (quick): the sdist built from a copy of the tracked tree holds every
file the build and the tests need, its metadata is the SPDX form; the version is
written once; a missing C extension gives one warning and the pure-Python paths
read the same bytes; ``_fastread`` is declared and built for the limited API.

Opt-in (``--run-soak``): the sdist installed into fresh venvs, once with a
compiler and once with ``CC=/bin/false``, and tests run FROM the unpacked sdist
against each installed package. conftest.py puts the unpacked root first on
sys.path (and CLI tests run with that root as cwd), so the unpacked ``vhdx/`` is
moved aside first: only the installed package can then be imported.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest

import vhdx
from vhdx import _version, native

from builder import build_chain, random_spec

REPO_ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
# What neither the sdist nor a copy of the tree carries: build products, caches, images.
_IGNORE = shutil.ignore_patterns(".git", "build", "dist", "work", "__pycache__", "*.pyc", "*.so", "*.o",
                                 "*.egg-info", ".hypothesis", ".pytest_cache", "test_native", "_native.c",
                                 "*.vhdx", "*.avhdx", "*.vhd")
# The files without which the sdist cannot build or its tests cannot run.
_ESSENTIAL = ["setup.py", "pyproject.toml", "MANIFEST.in", "LICENSE", "README.md",
              "csrc/build_native.py", "csrc/vhdx_native.h", "csrc/vhdx_native.c", "csrc/vhdx_fastread.c",
              "csrc/test_native.c", "csrc/sanitize.sh", "tests/conftest.py", "tests/builder.py",
              "tests/oracles.py", "tests/shims/eio_shim.c", "vhdx/_version.py", "vhdx/py.typed",
              "docs/DESIGN.md", "docs/FORMAT.md", "bench/bench_entry.py", "fixtures/make_samples.py"]
_BLOCK_NATIVE = (  # run first in a child interpreter: the extension "is not installed"
    "import sys\n"
    "class _Block:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name in ('vhdx._native', 'vhdx._fastread'):\n"
    "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
    "        return None\n"
    "sys.meta_path.insert(0, _Block())\n")
_WARNING = re.compile(r"^vhdx\.native:0: RuntimeWarning: the vhdx C extension \(vhdx\._native\) is not available",
                      re.M)


def _setuptools_version() -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", importlib.metadata.version("setuptools"))[:2])


def _tracked_files() -> list[str] | None:
    """The repository's tracked files (what a clean checkout holds), or None without git."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return [p for p in out.stdout.decode().split("\0") if p and (REPO_ROOT / p).is_file()]


def build_sdist(out_dir: Path) -> Path:
    """Build the sdist from a copy of the tree (the build writes egg-info next to
    the sources; the repository is left alone), without build isolation (offline)."""
    pytest.importorskip("build")
    if _setuptools_version() < (77,):
        pytest.skip(f"setuptools {importlib.metadata.version('setuptools')} < 77 cannot read the SPDX "
                    "licence metadata (pip install 'setuptools>=77', part of the test extra)")
    src = out_dir / "src"
    shutil.copytree(REPO_ROOT, src, ignore=_IGNORE)
    r = subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(out_dir),
                        str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (sdist,) = out_dir.glob("vhdx-*.tar.gz")
    return sdist


@pytest.fixture(scope="module")
def sdist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_sdist(tmp_path_factory.mktemp("sdist"))


def _members(sdist: Path) -> tuple[str, dict[str, bytes]]:
    """(top folder, {relative path: bytes}) of the sdist."""
    with tarfile.open(sdist) as tf:
        files = {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()}  # type: ignore[union-attr]
    top = {name.split("/", 1)[0] for name in files}
    assert len(top) == 1, top
    (root,) = top
    return root, {name.split("/", 1)[1]: data for name, data in files.items()}


# --------------------------------------------------------------------------
# default suite
# --------------------------------------------------------------------------


def test_sdist_holds_build_and_test_files(sdist: Path) -> None:
    root, files = _members(sdist)
    assert root == f"vhdx-{vhdx.__version__}"
    missing = [p for p in _ESSENTIAL if p not in files]
    assert not missing, f"sdist lacks {missing}"
    tracked = _tracked_files()
    if tracked is not None:  # every tracked file but the CI and git plumbing travels
        lacking = sorted(p for p in tracked if not p.startswith((".ci/", ".git")) and p not in files)
        assert not lacking, f"tracked files missing from the sdist: {lacking}"
    assert any(p.startswith("tests/fuzz/corpus/") for p in files)
    assert any(p.startswith("tests/fuzz/regressions/") for p in files)
    junk = [p for p in files if p.endswith((".so", ".pyc", ".o")) or p.startswith(("bench/work/", "build/"))]
    assert not junk, f"build products in the sdist: {junk}"
    # the sources are the tree's, byte for byte
    for p in ("csrc/vhdx_native.h", "csrc/build_native.py", "tests/conftest.py", "vhdx/native.py"):
        assert files[p] == (REPO_ROOT / p).read_bytes(), p


def test_sdist_metadata_is_spdx_and_versioned(sdist: Path) -> None:
    _, files = _members(sdist)
    meta = files["PKG-INFO"].decode()
    headers = [line for line in meta.split("\n\n", 1)[0].splitlines()]
    assert "License-Expression: Apache-2.0" in headers
    assert "License-File: LICENSE" in headers
    assert not any(h.startswith("Classifier: License ::") for h in headers)
    assert not any(h.startswith("License: ") for h in headers)  # the legacy field is gone
    assert f"Version: {_version.__version__}" in headers
    assert files["LICENSE"] == (REPO_ROOT / "LICENSE").read_bytes()


def test_version_written_once() -> None:
    assert vhdx.__version__ is _version.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", vhdx.__version__)
    with open(REPO_ROOT / "pyproject.toml", "rb") as fh:
        project = tomllib.load(fh)
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "vhdx._version.__version__"}
    assert project["project"]["license"] == "Apache-2.0"
    assert project["project"]["license-files"] == ["LICENSE"]
    assert "build" in project["project"]["optional-dependencies"]["test"]
    # no other file of the package spells the version out
    spelled = [p.name for p in (REPO_ROOT / "vhdx").rglob("*.py")
               if p.name != "_version.py" and re.search(r"""__version__\s*=\s*['"]""", p.read_text())]
    assert not spelled, spelled


def test_python_m_vhdx_version() -> None:
    r = subprocess.run([sys.executable, "-m", "vhdx", "--version"], cwd=REPO_ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"vhdx {_version.__version__}"


def test_fastread_targets_the_limited_api() -> None:
    sys.path.insert(0, str(REPO_ROOT / "csrc"))
    try:
        import build_native
    finally:
        sys.path.remove(str(REPO_ROOT / "csrc"))
    ext = build_native.fastread_extension()
    assert ext.py_limited_api is True
    assert ("Py_LIMITED_API", hex(0x030B0000)) in ext.define_macros
    with open(REPO_ROOT / "pyproject.toml", "rb") as fh:
        assert ">=3.11" in tomllib.load(fh)["project"]["requires-python"]  # the limited API version
    assert 'py_limited_api": "cp311"' in (REPO_ROOT / "setup.py").read_text()
    if native._fastread is not None and os.name == "posix":
        assert native._fastread.__file__.endswith(".abi3.so"), native._fastread.__file__
    if native.HAVE_NATIVE and os.name == "posix":
        assert native._ext.__file__.endswith(".abi3.so"), native._ext.__file__


def test_every_native_function_has_a_python_twin() -> None:
    """An install without a compiler needs a Python path for every C entry point:
    each public function of vhdx.native dispatches between ``_c_NAME`` and
    ``_py_NAME`` (tests/test_native.py compares the two); the chain reader's
    Python twin is VirtualDisk's own read path (tests/test_native_read.py)."""
    import inspect

    functions = [n for n in native.__all__ if inspect.isfunction(getattr(native, n))]
    assert functions, native.__all__
    lacking = [n for n in functions if not (callable(getattr(native, f"_py_{n}", None))
                                            and callable(getattr(native, f"_c_{n}", None)))]
    assert not lacking, f"native functions without a _py_/_c_ pair: {lacking}"
    classes = [n for n in native.__all__ if inspect.isclass(getattr(native, n))]
    assert set(classes) <= {"ChainLevel", "ChainReader", "NativeFallbackError"}, classes
    assert isinstance(native.HAVE_CHAIN_READER, bool)


def test_missing_extension_one_warning_same_bytes(tmp_path: Path) -> None:
    """Without the extension: one warning per process (however often the module is
    imported, whatever the warning filter), HAVE_NATIVE False, and the pure-Python
    read path gives the builder's bytes; with VHDX_NO_NATIVE=1 no warning."""
    rng = random.Random(11)
    specs = [random_spec(rng, name="p0", virtual_size=3 * MiB, block_size=MiB, lss=512, differencing=False),
             random_spec(rng, name="p1", virtual_size=3 * MiB, block_size=MiB, lss=512, differencing=True)]
    chain = build_chain(tmp_path, specs)
    truth = hashlib.sha256(chain.expected()).hexdigest()
    with vhdx.open(chain.top, parents=chain.parents) as disk:  # this process: C path when built
        here = hashlib.sha256(disk.read_at(0, disk.size)).hexdigest()
    assert here == truth
    code = _BLOCK_NATIVE + (
        "import hashlib, importlib, warnings\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    warnings.simplefilter('always')\n"
        "    import vhdx\n"
        "    from vhdx import native\n"
        "    importlib.import_module('vhdx.native'); import vhdx.disk\n"
        "    assert native.HAVE_NATIVE is False and native.HAVE_CHAIN_READER is False\n"
        "    assert native._fastread is None\n"
        "    d = vhdx.open(sys.argv[1], parents=sys.argv[2:])\n"
        "    assert d._native is None\n"
        "    print(hashlib.sha256(d.read_at(0, d.size)).hexdigest())\n"
        "    assert native.bitmap_runs(b'\\x0f', 2, 4) == [(0, 2, True), (2, 2, False)]\n"
        "print(len(seen), *[f'{w.category.__name__}|{w.message}' for w in seen], sep='\\n')\n")
    args = [sys.executable, "-c", code, str(chain.top), *map(str, chain.parents)]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    env.pop("VHDX_NO_NATIVE", None)
    r = subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    digest, count, *messages = r.stdout.splitlines()
    assert digest == truth
    assert count == "1", messages
    assert messages[0].startswith("RuntimeWarning|the vhdx C extension (vhdx._native) is not available")
    # disabled on purpose: nothing to warn about
    r = subprocess.run(args, cwd=REPO_ROOT, env=dict(env, VHDX_NO_NATIVE="1"), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[:2] == [truth, "0"]


def test_missing_extension_cli_one_line(tmp_path: Path) -> None:
    """The CLI in an install without the extension: its output plus exactly one
    warning line on stderr (no source line under it), and the filter documented
    in the README silences it."""
    spec = random_spec(random.Random(4), name="c", virtual_size=2 * MiB, block_size=MiB, lss=512,
                       differencing=False)
    chain = build_chain(tmp_path, [spec])
    code = _BLOCK_NATIVE + "import runpy; runpy.run_module('vhdx', run_name='__main__')\n"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    env.pop("VHDX_NO_NATIVE", None)
    env.pop("PYTHONWARNINGS", None)
    args = [sys.executable, "-c", code, "hash", str(chain.top)]
    r = subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert hashlib.sha256(chain.expected()).hexdigest() in r.stdout
    assert r.stderr.count("\n") == 1 and _WARNING.match(r.stderr), r.stderr
    r = subprocess.run(args, cwd=REPO_ROOT, env=dict(env, PYTHONWARNINGS="ignore::RuntimeWarning:vhdx.native"),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stderr == "", r.stderr


# --------------------------------------------------------------------------
# opt-in: the sdist installed into fresh venvs, tests run from the unpacked sdist
# --------------------------------------------------------------------------

# Run from the unpacked sdist against each installed package (about 3 min each).
_WITH_C_TESTS = ["tests/test_native.py", "tests/test_native_read.py", "tests/test_chain.py",
                 "tests/test_cli.py", "tests/test_fuzz.py", "tests/test_create.py", "tests/test_structures.py"]
_NO_C_TESTS = ["tests/test_native.py", "tests/test_chain.py", "tests/test_differential.py",
               "tests/test_vhd_read.py", "tests/test_cli.py"]


def _venv(path: Path) -> Path:
    """A venv that sees the base interpreter's packages (the dependencies, offline)
    and uses them for the build too: no pip or setuptools of its own (a 3.11 venv
    would bring setuptools 65, too old for the SPDX licence)."""
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(path)],
                   check=True, timeout=300)
    py = path / "bin" / "python"
    r = subprocess.run([str(py), "-c", "import importlib.metadata as m; print(m.version('setuptools'))"],
                       capture_output=True, text=True, check=True)
    if tuple(int(x) for x in re.findall(r"\d+", r.stdout)[:1]) < (77,):
        # (the base interpreter is older than this one's environment: fetch a newer one)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "setuptools>=77"], check=True, timeout=600)
    return py


def _install(py: Path, sdist: Path, **env: str) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([str(py), "-m", "pip", "install", "-v", "--no-build-isolation", "--no-deps",
                        "--no-index", str(sdist)], capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", **env))
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return r


def _unpack_without_sources(sdist: Path, where: Path) -> Path:
    with tarfile.open(sdist) as tf:
        tf.extractall(where, filter="data")
    (root,) = where.iterdir()
    shutil.move(root / "vhdx", where / "vhdx-source-aside")  # the tests may only find the installed one
    return root


def _run_tests(py: Path, root: Path, tests: list[str], **env: str) -> None:
    full = {k: v for k, v in os.environ.items() if k not in ("VHDX_SOAK", "VHDX_NO_NATIVE", "PYTHONPATH")}
    r = subprocess.run([str(py), "-c", "import vhdx; print(vhdx.__file__)"], cwd=root, env=full,
                       capture_output=True, text=True, check=True)
    assert Path(r.stdout.strip()).is_relative_to(py.parent.parent), r.stdout  # the venv's copy
    r = subprocess.run([str(py), "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], cwd=root,
                       env=dict(full, **env), capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert re.search(r"\d+ passed", r.stdout), r.stdout[-2000:]


@pytest.mark.soak
def test_sdist_installs_and_its_tests_pass(sdist: Path, tmp_path: Path) -> None:
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    py = _venv(tmp_path / "venv")
    _install(py, sdist)
    site = py.parent.parent / "lib"
    built = sorted(p.name for p in site.rglob("vhdx/_*.so"))
    assert built == ["_fastread.abi3.so", "_native.abi3.so"], built
    r = subprocess.run([str(py), "-m", "vhdx", "--version"], cwd=tmp_path, capture_output=True, text=True,
                       check=True)
    assert r.stdout.strip() == f"vhdx {_version.__version__}" and r.stderr == ""
    # one wheel for every CPython >= 3.11 of the platform
    wheels = tmp_path / "wheels"
    subprocess.run([str(py), "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-index", "-w",
                    str(wheels), str(sdist)], capture_output=True, text=True, check=True, timeout=900)
    (wheel,) = wheels.glob("vhdx-*.whl")
    assert "-cp311-abi3-" in wheel.name, wheel.name
    _run_tests(py, _unpack_without_sources(sdist, tmp_path / "unpacked"), _WITH_C_TESTS)


@pytest.mark.soak
def test_sdist_installs_without_a_compiler(sdist: Path, tmp_path: Path) -> None:
    py = _venv(tmp_path / "venv")
    r = _install(py, sdist, CC="/bin/false")
    log = r.stdout + r.stderr
    for ext in ("vhdx._native", "vhdx._fastread"):
        assert f"WARNING: vhdx: building the C extension {ext} failed" in log
    assert not list((py.parent.parent / "lib").rglob("vhdx/_*.so"))
    r = subprocess.run([str(py), "-c", "import vhdx.native as n; print(n.HAVE_NATIVE)"], cwd=tmp_path,
                       capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False" and len(_WARNING.findall(r.stderr)) == 1, r.stderr
    # The CLI tests count stderr lines: the documented filter keeps the warning out of them.
    _run_tests(py, _unpack_without_sources(sdist, tmp_path / "unpacked"), _NO_C_TESTS,
               PYTHONWARNINGS="ignore::RuntimeWarning:vhdx.native")
