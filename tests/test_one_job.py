"""Issue 10, "one job per module": the jobs moved into one module each stay there.

Walks the package's syntax trees (not its text, so comments and docstrings may
still name things): a second SEEK_DATA walk, a second copy of the Win32 path
prefixes, a test double in production code or library work back in the CLI
fails here.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "vhdx"


@functools.lru_cache(maxsize=1)
def _trees() -> dict[str, ast.Module]:
    return {p.relative_to(PKG.parent).as_posix(): ast.parse(p.read_text(encoding="utf-8"))
            for p in sorted(PKG.rglob("*.py"))}


def _strings(tree: ast.Module) -> list[str]:
    """String constants that are not docstrings."""
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs]


def test_the_data_extent_walk_is_only_in_fdio():
    users = sorted(name for name, tree in _trees().items()
                   if any(isinstance(n, ast.Attribute) and n.attr in ("SEEK_DATA", "SEEK_HOLE")
                          for n in ast.walk(tree)) or "SEEK_HOLE" in _strings(tree))
    assert users == ["vhdx/fdio.py"]


def test_win32_path_prefixes_are_only_in_the_locator_module():
    def prefix(s: str) -> bool:
        # \\?\GLOBALROOT names a device (hyperv/winpath.py refuses it), not a locator form
        return (s.startswith("\\\\?\\") and not s.upper().startswith("\\\\?\\GLOBALROOT")) \
            or s.upper() == "UNC\\"

    users = sorted(name for name, tree in _trees().items() if any(prefix(s) for s in _strings(tree)))
    assert users == ["vhdx/locator.py"]


def test_production_code_names_no_test_double():
    for name, tree in _trees().items():
        names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        names |= {n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
        assert not names & {"RecordingStorage", "MemoryStorage", "JournalOp", "inner"}, name


def test_the_cli_replays_no_log_itself():
    cli = _trees()["vhdx/cli.py"]
    imported = {a.name for n in ast.walk(cli) if isinstance(n, ast.ImportFrom) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(cli) if isinstance(n, ast.ImportFrom)}
    assert not imported & {"log", "log_writer", "LogWriter", "plan_replay", "storage", "FileStorage"}
