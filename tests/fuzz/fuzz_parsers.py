"""Coverage-guided fuzz target for the raw parsers, fed bytes directly (fast):
header section, metadata region, log replay planning, parent locator.

    python3 tests/fuzz/fuzz_parsers.py -atheris_runs=1000000 -timeout=10 CORPUS_DIR

Contract: VhdxError or success, nothing else.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

with atheris.instrument_imports(include=["vhdx"]):
    import parsers_target


def main() -> None:
    atheris.Setup(sys.argv, parsers_target.one)
    atheris.Fuzz()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
