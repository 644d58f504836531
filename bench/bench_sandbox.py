"""Grading overhead per code program: bubblewrap (the default) against the old launcher tiers.

Each tier grades the same HumanEval-style program (a correct answer, so the whole program runs and
the epilogue reports) `--runs` times, one after another, and the script prints the median and p90
wall time per program, and how much of it is the sandbox (the same program run by a bare
`python -I` subprocess is the floor). Interleaved rounds, so machine load hits every tier alike.

    python bench/bench_sandbox.py [--runs 30]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src" / "eval"))

import graders  # noqa: E402
import sandbox  # noqa: E402

PARTS = ('def add(a, b):\n    """Sum."""\n',
         "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n\ncheck(add)\n")
ANSWER = "```python\ndef add(a, b):\n    return a + b\n```"


def tiers() -> dict:
    strong = sandbox.detect_isolation()
    out = {"bwrap (default)": strong}
    for iso in sandbox.candidate_isolations(os.geteuid() == 0, (strong.python,)):
        if iso.kind == "unshare" and "mountns" in iso.name:
            out["old default: unshare netns+pidns+mountns (weak now)"] = iso
        elif iso.kind == "plain":
            out["rlimits+audit hook only (weak)"] = iso
    return out


def bare_python_s(python: str) -> float:
    program = graders.code_program(PARTS, ANSWER[len("```python\n"):-3])
    start = time.perf_counter()
    subprocess.run([python, "-I", "-B", "-c", program], check=True, capture_output=True)
    return time.perf_counter() - start


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=30, help="programs graded per tier")
    args = ap.parse_args(argv)
    limits = sandbox.SandboxLimits(timeout_s=10)
    chosen = tiers()
    times = {name: [] for name in chosen}
    floor = []
    for _ in range(args.runs):
        floor.append(bare_python_s(chosen["bwrap (default)"].python))
        for name, iso in chosen.items():
            start = time.perf_counter()
            graded = graders.grade_code_program(PARTS, ANSWER, limits, isolation=iso)
            times[name].append(time.perf_counter() - start)
            if not graded.correct:
                sys.exit(f"bench_sandbox: {name} scored a correct program wrong: {graded.detail}")
    base = statistics.median(floor)
    print(f"machine: {os.cpu_count()} cpus, uid {os.geteuid()}, {args.runs} programs per tier")
    print(f"{'tier':<55} {'median ms':>10} {'p90 ms':>8} {'sandbox ms':>11}")
    print(f"{'bare python -I subprocess (no sandbox, the floor)':<55} {base * 1e3:>10.1f} "
          f"{statistics.quantiles(floor, n=10)[-1] * 1e3:>8.1f} {0.0:>11.1f}")
    for name, samples in times.items():
        med = statistics.median(samples)
        print(f"{name:<55} {med * 1e3:>10.1f} {statistics.quantiles(samples, n=10)[-1] * 1e3:>8.1f} "
              f"{(med - base) * 1e3:>11.1f}")


if __name__ == "__main__":
    main()
