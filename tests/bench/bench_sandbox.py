"""Grading overhead per code program: the current checker against the one before it, in the same run.

Tiers, each grading the same correct HumanEval-style program `--runs` times, interleaved round by round so
machine load hits every tier alike:

* before: one bubblewrap process running prompt + answer + tests, no seccomp filter (the previous checker);
* before + seccomp: the same, with the memory filter of sandbox_memory (its cost alone);
* now: bench_grade.grade_code_program: candidate and tests in two bubblewrap processes, seccomp in both;
* the floor: the same program in a bare `python -I` subprocess (no sandbox).

* with --baseline-src DIR: the grader of another checkout (e.g. `git archive <commit> src/eval | tar -x -C
  /tmp/base`, DIR = /tmp/base/src/eval), run in a worker process and timed in the same rounds.

Prints the median and p90 wall time per program and the ratio now / before (target <= 1.2).

    python tests/bench/bench_sandbox.py [--runs 30] [--baseline-src /tmp/base/src/eval]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src" / "eval"))

import bench_grade  # noqa: E402
import sandbox  # noqa: E402

PARTS = ('def add(a, b):\n    """Sum."""\n',
         "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
         "    assert candidate(10, 32) == 42\n\ncheck(add)\n")
CODE = "def add(a, b):\n    return a + b\n"
ANSWER = f"```python\n{CODE}```"


def single_process_grade(limits: sandbox.SandboxLimits, iso: sandbox.Isolation) -> bool:
    """The checker before the two-process one: prompt + answer + tests in one process, passed when the
    launcher's epilogue reports the nonce."""
    result = sandbox.run_python(bench_grade.code_program(PARTS, CODE), limits=limits, isolation=iso,
                                run_name=bench_grade.TEST_PROGRAM_NAME)
    return result.completed


def bare_python(python: str) -> bool:
    program = bench_grade.code_program(PARTS, CODE)
    return subprocess.run([python, "-I", "-B", "-c", program], capture_output=True).returncode == 0


WORKER = """
import sys, time
sys.path.insert(0, sys.argv[1])
import bench_grade, sandbox
parts, answer = eval(sys.argv[2])
limits, iso = sandbox.SandboxLimits(timeout_s=10), sandbox.detect_isolation()
print("ready", flush=True)
for _ in sys.stdin:
    start = time.perf_counter()
    ok = bench_grade.grade_code_program(parts, answer, limits, isolation=iso).correct
    print(time.perf_counter() - start, ok, flush=True)
"""


def baseline_worker(src: str) -> subprocess.Popen:
    """Another checkout's grader in its own process (its modules share names with ours)."""
    proc = subprocess.Popen([sys.executable, "-c", WORKER, src, repr((PARTS, ANSWER))], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    if proc.stdout.readline().strip() != "ready":
        sys.exit(f"bench_sandbox: the grader in {src} did not start")
    return proc


def timed_by(proc: subprocess.Popen) -> tuple:
    proc.stdin.write("go\n")
    proc.stdin.flush()
    seconds, ok = proc.stdout.readline().split()
    return float(seconds), ok == "True"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=30, help="programs graded per tier")
    ap.add_argument("--baseline-src", help="src/eval of another checkout, timed in the same rounds")
    args = ap.parse_args(argv)
    limits = sandbox.SandboxLimits(timeout_s=10)
    now_iso = sandbox.detect_isolation()
    before_iso = dataclasses.replace(now_iso, seccomp=False)
    tiers = {
        "bare python -I subprocess (no sandbox, the floor)": lambda: bare_python(now_iso.python),
        "before: one bwrap process, no seccomp": lambda: single_process_grade(limits, before_iso),
        "before + seccomp filter": lambda: single_process_grade(limits, now_iso),
        "now: two bwrap processes + seccomp (candidate | tests)":
            lambda: bench_grade.grade_code_program(PARTS, ANSWER, limits, isolation=now_iso).correct,
    }
    worker = baseline_worker(args.baseline_src) if args.baseline_src else None
    if worker is not None:
        tiers[f"baseline checkout ({args.baseline_src})"] = None
    times = {name: [] for name in tiers}
    for _ in range(args.runs):
        for name, grade in tiers.items():
            if grade is None:
                seconds, ok = timed_by(worker)
                times[name].append(seconds)
                if not ok:
                    sys.exit(f"bench_sandbox: {name} scored a correct program wrong")
                continue
            start = time.perf_counter()
            ok = grade()
            times[name].append(time.perf_counter() - start)
            if not ok:
                sys.exit(f"bench_sandbox: {name} scored a correct program wrong")
    print(f"machine: {os.cpu_count()} cpus, uid {os.geteuid()}, load {os.getloadavg()[0]:.1f}, "
          f"{args.runs} programs per tier; isolation: {now_iso.describe()}")
    print(f"{'tier':<58} {'median ms':>10} {'p90 ms':>8}")
    for name, samples in times.items():
        print(f"{name:<58} {statistics.median(samples) * 1e3:>10.1f} "
              f"{statistics.quantiles(samples, n=10)[-1] * 1e3:>8.1f}")
    before = statistics.median(times["before: one bwrap process, no seccomp"])
    now = statistics.median(times["now: two bwrap processes + seccomp (candidate | tests)"])
    print(f"per-program time now / before: {now / before:.2f}x (target <= 1.2x)")
    if worker is not None:
        worker.stdin.close()
        worker.wait()
        base = statistics.median(times[f"baseline checkout ({args.baseline_src})"])
        print(f"per-program time now / baseline checkout: {now / base:.2f}x")


if __name__ == "__main__":
    main()
