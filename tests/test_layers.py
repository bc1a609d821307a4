"""The layer order of docs/DESIGN.md, enforced on every module of ``vhdx/``.

The ONE table is docs/DESIGN.md's module table: each row names a layer (a blank
layer cell continues the row above) and modules (backticked ``vhdx/...py`` files,
or a ``vhdx/pkg/`` folder for every module in it not listed on its own). Rows
come bottom layer first. Every import of every module (ast: top-level,
function-local and ``TYPE_CHECKING`` ones) must point to a module of the same
layer or a lower one, and every module must be in the table (and every module
the table names must exist).

Rules the walk applies (docs/DESIGN.md says the same):
- ``TYPE_CHECKING``-only imports obey the layer order too (a lower module that
  names a higher one's class still knows it: use a Protocol), but they never run,
  so they take no part in the cycle check.
- Runtime imports (top-level and function-local) form no cycle, inside a layer
  included.
- Importing ``vhdx.pkg.mod`` runs ``vhdx/pkg/__init__.py`` first (when the
  importer is outside ``pkg``), so that is an import of the package too. The root
  ``vhdx/__init__.py`` is the exception: it is the public face, always loaded
  before any submodule, so no submodule's import can run it partway.
- ``from . import name`` where ``name`` is no module imports the package itself.
- The compiled extensions (``vhdx._native``, ``vhdx._fastread``, built from
  csrc/) sit in the layer of ``vhdx/native.py``.
"""

from __future__ import annotations

import ast
import functools
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "vhdx"
EXTENSIONS = ("vhdx._native", "vhdx._fastread")
# Runtime cycles that the block-map rewrite (issue 10, item 1: writer.py, resize.py,
# compact.py) removes; listed so that they cannot grow unnoticed and so that the
# entry must go once the cycle is gone (the test fails on a stale entry).
KNOWN_CYCLES: set[frozenset[str]] = set()  # none left; an entry must name a cycle that exists


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported module (or package)
    line: int
    runtime: bool  # False: only under ``if TYPE_CHECKING:``


# --- the table ------------------------------------------------------------------
def read_table(design: str) -> tuple[list[str], dict[str, int], dict[str, int]]:
    """(layer names bottom first, {module path: layer index}, {folder: layer index})
    from the module table of docs/DESIGN.md."""
    layers: list[str] = []
    files: dict[str, int] = {}
    folders: dict[str, int] = {}
    rows = [ln for ln in design.splitlines() if ln.startswith("|")]
    header = next(i for i, ln in enumerate(rows) if re.match(r"\|\s*layer\s*\|\s*module", ln))
    for ln in rows[header + 2:]:
        cells = [c.strip() for c in ln.strip().strip("|").split("|")]
        if len(cells) < 3:
            break
        if cells[0]:
            layers.append(cells[0])
        assert layers, f"the first row of the table names no layer: {ln}"
        for name in re.findall(r"`(vhdx/[^`\s]*)`", cells[1]):
            where = folders if name.endswith("/") else files
            assert name not in files and name not in folders, f"{name} is listed twice"
            where[name] = len(layers) - 1
    return layers, files, folders


def layer_of(path: str, files: dict[str, int], folders: dict[str, int]) -> int | None:
    """The layer of the module at ``path`` (``vhdx/x/y.py``), None when unlisted."""
    if path in files:
        return files[path]
    best = None
    for folder, layer in folders.items():
        if path.startswith(folder) and (best is None or len(folder) > len(best[0])):
            best = (folder, layer)
    return None if best is None else best[1]


# --- the imports ----------------------------------------------------------------
def module_name(path: str) -> str:
    """``vhdx/vhd/file.py`` -> ``vhdx.vhd.file``; ``vhdx/vhd/__init__.py`` -> ``vhdx.vhd``."""
    parts = path[:-3].split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


@functools.lru_cache(maxsize=None)  # the tests walk the same sources again with one edit each
def imports_of(path: str, source: str, modules: frozenset[str]) -> tuple[Import, ...]:
    """Every import of package modules in ``source`` (the module at ``path``)."""
    name = module_name(path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    out: list[Import] = []

    def add(target: str, line: int, runtime: bool) -> None:
        if target == PACKAGE or target.startswith(PACKAGE + "."):
            out.append(Import(name, target, line, runtime))

    def visit(node: ast.AST, runtime: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, False)
            for child in node.orelse:
                visit(child, runtime)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno, runtime)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for alias in node.names:
                sub = f"{mod}.{alias.name}"
                # ``from pkg import mod`` imports a module; ``from pkg import attr`` the package
                add(sub if sub in modules else mod, node.lineno, runtime)
        for child in ast.iter_child_nodes(node):
            visit(child, runtime)

    visit(ast.parse(source, path), True)
    return tuple(out)


def with_package_inits(imp: Import, modules: frozenset[str]) -> list[Import]:
    """``imp`` and the imports of the subpackages it runs first (not the root, not
    the importer's own packages, which are loaded already)."""
    out = [imp]
    parts = imp.target.split(".")
    for i in range(2, len(parts)):
        pkg = ".".join(parts[:i])
        if pkg in modules and not (imp.source == pkg or imp.source.startswith(pkg + ".")):
            out.append(Import(imp.source, pkg, imp.line, imp.runtime))
    return out


def check_layers(sources: dict[str, str], design: str) -> list[str]:
    """Every problem of ``sources`` ({``vhdx/...py``: text}) against the table."""
    layers, files, folders = read_table(design)
    problems: list[str] = []
    for listed in files:
        if listed not in sources:
            problems.append(f"{listed}: in docs/DESIGN.md's table but no such module")
    for folder in folders:
        if not any(p.startswith(folder) for p in sources):
            problems.append(f"{folder}: in docs/DESIGN.md's table but no module in it")
    by_name = {module_name(p): p for p in sources}
    modules = frozenset(by_name) | frozenset(EXTENSIONS)
    layer: dict[str, int] = {}
    for path in sources:
        got = layer_of(path, files, folders)
        if got is None:
            problems.append(f"{path}: not in docs/DESIGN.md's module table")
        else:
            layer[module_name(path)] = got
    native = layer.get("vhdx.native")
    for ext in EXTENSIONS:
        if native is not None:
            layer[ext] = native
    graph: dict[str, set[str]] = {m: set() for m in by_name}
    for path, text in sources.items():
        for first in imports_of(path, text, modules):
            for imp in with_package_inits(first, modules):
                if imp.target == imp.source or imp.target not in modules:
                    continue  # a module's own name, or a name that is no module of ours
                if imp.target == PACKAGE:
                    problems.append(f"{path}:{imp.line}: imports the package root "
                                    "(the public face sits above every module: import the module itself)")
                    continue
                src, dst = layer.get(imp.source), layer.get(imp.target)
                if src is not None and dst is not None and dst > src:
                    kind = "" if imp.runtime else " (TYPE_CHECKING)"
                    problems.append(f"{path}:{imp.line}: {imp.source} ({layers[src]}) imports "
                                    f"{imp.target} ({layers[dst]}){kind}: up the layer order")
                if imp.runtime and imp.target in graph:
                    graph[imp.source].add(imp.target)
    found = {frozenset(c) for c in cycles(graph)}
    for cycle in sorted(found - KNOWN_CYCLES, key=sorted):
        problems.append("import cycle: " + " <-> ".join(sorted(cycle)))
    for stale in KNOWN_CYCLES - found:
        problems.append("KNOWN_CYCLES lists a cycle that is gone (remove it): " + " <-> ".join(sorted(stale)))
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan) and the
    modules that import themselves."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:  # recursion depth <= number of modules (~70)
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                out.append(comp)

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def package_sources() -> dict[str, str]:
    return {p.relative_to(REPO).as_posix(): p.read_text(encoding="utf-8")
            for p in sorted((REPO / PACKAGE).rglob("*.py"))}


def design_text() -> str:
    return (REPO / "docs" / "DESIGN.md").read_text(encoding="utf-8")


# --- the tests ------------------------------------------------------------------
def test_every_module_obeys_the_layer_order() -> None:
    problems = check_layers(package_sources(), design_text())
    assert not problems, "\n".join(problems)


def test_the_table_has_the_layers_of_the_design() -> None:
    layers, files, _ = read_table(design_text())
    # The order the project decided (issue 10): the formats' common code, then the
    # legacy format built on it, Hyper-V, the format dispatch, the front ends.
    for low, high in [("declarations", "native"), ("native", "one file"), ("one file", "chains"),
                      ("chains", "block map and writers"), ("block map and writers", "merge and tools"),
                      ("merge and tools", "legacy VHD"), ("legacy VHD", "Hyper-V"),
                      ("Hyper-V", "format dispatch"), ("format dispatch", "front ends")]:
        assert layers.index(low) < layers.index(high), (low, high)
    assert files["vhdx/formats.py"] == layers.index("format dispatch")


@pytest.fixture()
def real() -> tuple[dict[str, str], str]:
    return package_sources(), design_text()


def test_fails_on_an_upward_function_local_import(real) -> None:
    sources, design = real
    sources["vhdx/errors.py"] += "\n\ndef _late():\n    from .cli import main\n    return main\n"
    problems = check_layers(sources, design)
    assert any("vhdx.errors (declarations) imports vhdx.cli (front ends)" in p for p in problems), problems
    # ... and the same import from the top of a front end is fine
    sources, design = package_sources(), design_text()
    sources["vhdx/nbd.py"] += "\n\ndef _late():\n    from .errors import VhdxError\n    return VhdxError\n"
    assert check_layers(sources, design) == []


def test_fails_on_an_upward_type_checking_import_but_not_on_its_cycle(real) -> None:
    sources, design = real
    sources["vhdx/image.py"] += ("\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                 "    from .writer import WritableDisk\n")
    problems = check_layers(sources, design)
    assert any("vhdx.image (one file) imports vhdx.writer" in p and "TYPE_CHECKING" in p
               for p in problems), problems
    assert not any("cycle" in p for p in problems), problems


def test_fails_on_a_cycle_inside_one_layer(real) -> None:
    sources, design = real
    # chain -> disk is allowed (one layer); disk imports chain already: a cycle
    sources["vhdx/chain.py"] += "\n\ndef _late():\n    from .disk import VirtualDisk\n    return VirtualDisk\n"
    problems = check_layers(sources, design)
    assert any(p.startswith("import cycle:") and "vhdx.chain" in p and "vhdx.disk" in p
               for p in problems), problems


def test_fails_on_a_module_missing_from_the_table_and_a_stale_row(real) -> None:
    sources, design = real
    sources["vhdx/newthing.py"] = '"""A module nobody listed."""\n'
    del sources["vhdx/progress.py"]
    sources["vhdx/cli.py"] = sources["vhdx/cli.py"].replace("from .progress", "from .errors")
    problems = check_layers(sources, design)
    assert "vhdx/newthing.py: not in docs/DESIGN.md's module table" in problems
    assert "vhdx/progress.py: in docs/DESIGN.md's table but no such module" in problems


def test_fails_on_a_subpackage_init_run_from_below(real) -> None:
    sources, design = real
    # vhd/structures.py imports nothing above the declarations, but importing it
    # from outside runs vhdx/vhd/__init__.py (the legacy VHD layer) first.
    sources["vhdx/chain.py"] += "\n\ndef _late():\n    from .vhd import structures\n    return structures\n"
    problems = check_layers(sources, design)
    assert any("vhdx.chain (chains) imports vhdx.vhd (legacy VHD)" in p for p in problems), problems


def test_fails_on_the_package_root(real) -> None:
    sources, design = real
    sources["vhdx/create.py"] += "\n\ndef _late():\n    from . import __version__\n    return __version__\n"
    problems = check_layers(sources, design)
    assert any(p.startswith("vhdx/create.py:") and "package root" in p for p in problems), problems


def test_design_api_block_names_every_public_name() -> None:
    import vhdx

    text = design_text()
    block = text[text.index("## Public API"):]
    block = block[:block.index("\n## ", 4)]
    missing = [n for n in vhdx.__all__ if not re.search(rf"\b{re.escape(n)}\b", block)]
    assert not missing, f"docs/DESIGN.md's API block does not name {missing}"
    # open()'s signature as the code has it: every parameter, both modes
    import inspect

    for param in inspect.signature(vhdx.open).parameters:
        assert re.search(rf"\b{param}\b", block), f"open() parameter {param} missing from the API block"
    assert 'ReadMode = Literal["r", "rb"]' in block and 'WriteMode = Literal["r+", "r+b", "rb+"]' in block
    # every name the block takes from vhdx exists
    for name in re.findall(r"vhdx\.([A-Za-z_]\w*)", block):
        assert hasattr(vhdx, name) or name in ("vhd", "formats", "locking", "partitions", "dependents"), name
