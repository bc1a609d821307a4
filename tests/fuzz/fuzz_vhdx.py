"""Coverage-guided fuzz target (atheris / libFuzzer) for vhdx.open, reads, extents
and check over edited seed images; see harness.py for the input format.

    python3 tests/fuzz/fuzz_vhdx.py -atheris_runs=1000000 -timeout=10 -rss_limit_mb=2048 CORPUS_DIR

A crash is any exception that is not a VhdxError (the traceback names it),
a hang is a run past -timeout, a blow-up past -rss_limit_mb. Every input that
found one goes into tests/fuzz/regressions/ and is replayed by tests/test_fuzz.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))

with atheris.instrument_imports(include=["vhdx"]):
    import harness

RUNNER = harness.Runner()


def TestOneInput(data: bytes) -> None:  # noqa: N802 - atheris' name
    RUNNER.one(data)


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
