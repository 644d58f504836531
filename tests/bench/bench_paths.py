"""The one import path every bench script runs with (`python tests/bench/X.py`, or imported by a test).

The project's modules are bare names (src/quant, src/eval, src/distill, and tests/ for the fixture builders),
so they go first; tests/bench/ itself goes last, so a bench script's name can never shadow a project module.
Set once at each script's edge, the way env.sh sets PYTHONPATH for the pipelines.
"""
from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parents[1]
PROJECT_DIRS = ("src/quant", "src/eval", "src/distill", "tests")


def use_project_modules() -> Path:
    """Project module dirs first, tests/bench/ last on sys.path; returns the repository root."""
    first = [str(ROOT / d) for d in PROJECT_DIRS]
    rest = [p for p in sys.path if p not in first and Path(p or ".").resolve() != BENCH]
    sys.path[:] = first + rest + [str(BENCH)]
    return ROOT
