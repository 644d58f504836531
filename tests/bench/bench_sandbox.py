"""Grading overhead per code program: the current checker against the one before it, in the same run.

Tiers, each grading the same correct HumanEval-style program `--runs` times, interleaved round by round so
machine load hits every tier alike:

* the floor: the same program in a bare `python -I` subprocess (no sandbox);
* one process, no seccomp: prompt + answer + tests in one bubblewrap process, through today's run_python
  (the previous checker's design on today's launcher: the strictest "before");
* one process + seccomp: the same with the memory filter of sandbox_memory (its cost alone);
* now: bench_grade.grade_code_program: candidate and tests in two bubblewrap processes, seccomp in both;
* with --baseline-ref REV (or --baseline-src DIR): the grader of that commit, e.g. `--baseline-ref c3c281a^`,
  the checker before issue 22 (one process, no seccomp, its own launcher), run in a worker process of its own
  and timed in the same rounds: the "before" as it was.

With --humaneval FILE (HumanEval.jsonl or .jsonl.gz), it then grades every canonical solution in it through
the one-process tier and through now, interleaved: all must pass, and the median per-program times on the
real prompts (typing imports, helpers) are printed with their ratio.

Prints the median and p90 wall time per program and the ratios now / before (target <= 1.2), with the
load average before and after (a loaded machine stretches every tier; compare ratios, not times).

    python tests/bench/bench_sandbox.py [--runs 40] [--baseline-ref c3c281a^] [--humaneval HumanEval.jsonl.gz]
"""
from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_paths  # tests/bench/ is on the path of a script run from it

ROOT = bench_paths.use_project_modules()

import bench_grade  # noqa: E402
import sandbox  # noqa: E402

PARTS = ('def add(a, b):\n    """Sum."""\n',
         "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
         "    assert candidate(10, 32) == 42\n\ncheck(add)\n")
CODE = "def add(a, b):\n    return a + b\n"
ANSWER = f"```python\n{CODE}```"
FLOOR, SINGLE, SINGLE_SECCOMP, NOW = ("bare python -I subprocess (no sandbox, the floor)",
                                      "one bwrap process, no seccomp (today's launcher)",
                                      "one bwrap process + seccomp filter",
                                      "now: two bwrap processes + seccomp (candidate | tests)")


def single_process_grade(parts: tuple, code: str, limits: sandbox.SandboxLimits, iso: sandbox.Isolation) -> bool:
    """The checker before the two-process one: prompt + answer + tests in one process, passed when the
    launcher's epilogue reports the nonce."""
    result = sandbox.run_python(bench_grade.code_program(parts, code), limits=limits, isolation=iso,
                                run_name=bench_grade.TEST_PROGRAM_NAME)
    return result.completed


def bare_python(python: str) -> bool:
    program = bench_grade.code_program(PARTS, CODE)
    return subprocess.run([python, "-I", "-B", "-c", program], capture_output=True).returncode == 0


WORKER = """
import os, sys, time
sys.path.insert(0, sys.argv[1])
import sandbox
bench_grade = __import__("bench_grade" if os.path.exists(sys.argv[1] + "/bench_grade.py") else "graders")
parts, answer = eval(sys.argv[2])
limits, iso = sandbox.SandboxLimits(timeout_s=10), sandbox.detect_isolation()
print("ready", flush=True)
for _ in sys.stdin:
    start = time.perf_counter()
    ok = bench_grade.grade_code_program(parts, answer, limits, isolation=iso).correct
    print(time.perf_counter() - start, ok, flush=True)
"""


def baseline_worker(src: str) -> subprocess.Popen:
    """Another checkout's grader in its own process (its modules share names with ours; PYTHONPATH, which
    names ours, is left out)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.Popen([sys.executable, "-c", WORKER, src, repr((PARTS, ANSWER))], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    if proc.stdout.readline().strip() != "ready":
        sys.exit(f"bench_sandbox: the grader in {src} did not start")
    return proc


def checkout_src(rev: str, into: str) -> str:
    """src/eval of commit `rev` of this repository, unpacked under `into`."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src/eval"], capture_output=True)
    if archive.returncode != 0:
        sys.exit(f"bench_sandbox: git archive {rev}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", into], input=archive.stdout, check=True)
    return str(Path(into, "src", "eval"))


def timed_by(proc: subprocess.Popen) -> tuple:
    proc.stdin.write("go\n")
    proc.stdin.flush()
    seconds, ok = proc.stdout.readline().split()
    return float(seconds), ok == "True"


def summary(times: dict) -> None:
    print(f"{'tier':<58} {'median ms':>10} {'p90 ms':>8}")
    for name, samples in times.items():
        print(f"{name:<58} {statistics.median(samples) * 1e3:>10.1f} "
              f"{statistics.quantiles(samples, n=10)[-1] * 1e3:>8.1f}")


def humaneval_problems(path: str) -> list:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def bench_humaneval(path: str, limits: sandbox.SandboxLimits, now_iso, single_iso) -> None:
    """Every canonical solution through one process and through now, interleaved; all must pass."""
    times = {SINGLE: [], NOW: []}
    failed = []
    for p in humaneval_problems(path):
        parts = (p["prompt"], f"{p['test']}\n\ncheck({p['entry_point']})\n")
        code = p["prompt"] + p["canonical_solution"]
        start = time.perf_counter()
        ok_single = single_process_grade(parts, code, limits, single_iso)
        times[SINGLE].append(time.perf_counter() - start)
        start = time.perf_counter()
        ok_now = bench_grade.grade_code_program(parts, f"```python\n{code}\n```", limits, isolation=now_iso,
                                                names=(p["entry_point"],)).correct  # as bench_code grades it
        times[NOW].append(time.perf_counter() - start)
        failed += [(p["task_id"], tier) for tier, ok in ((SINGLE, ok_single), (NOW, ok_now)) if not ok]
    n = len(times[NOW])
    print(f"\nHumanEval canonical solutions ({path}): {n} problems, "
          f"{n - sum(1 for _, t in failed if t == NOW)}/{n} pass now, "
          f"{n - sum(1 for _, t in failed if t == SINGLE)}/{n} in one process")
    summary(times)
    print(f"per-program time on HumanEval, now / one process: "
          f"{statistics.median(times[NOW]) / statistics.median(times[SINGLE]):.2f}x")
    if failed:
        sys.exit(f"bench_sandbox: canonical solutions scored wrong: {failed[:10]}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=30, help="programs graded per tier")
    ap.add_argument("--baseline-ref", help="a commit of this repository whose grader is timed in the same rounds")
    ap.add_argument("--baseline-src", help="src/eval of another checkout, timed in the same rounds")
    ap.add_argument("--humaneval", help="HumanEval.jsonl[.gz]: grade every canonical solution both ways")
    args = ap.parse_args(argv)
    limits = sandbox.SandboxLimits(timeout_s=10)
    now_iso = sandbox.detect_isolation()
    single_iso = dataclasses.replace(now_iso, seccomp=False)
    load_before = os.getloadavg()
    tiers = {
        FLOOR: lambda: bare_python(now_iso.python),
        SINGLE: lambda: single_process_grade(PARTS, CODE, limits, single_iso),
        SINGLE_SECCOMP: lambda: single_process_grade(PARTS, CODE, limits, now_iso),
        NOW: lambda: bench_grade.grade_code_program(PARTS, ANSWER, limits, isolation=now_iso).correct,
    }
    with tempfile.TemporaryDirectory(prefix="bench-sandbox-") as tmp:
        src = checkout_src(args.baseline_ref, tmp) if args.baseline_ref else args.baseline_src
        worker = baseline_worker(src) if src else None
        base_name = f"before: the grader of {args.baseline_ref or src}"
        if worker is not None:
            tiers[base_name] = None
        times = {name: [] for name in tiers}
        for _ in range(args.runs):
            for name, grade in tiers.items():
                if grade is None:
                    seconds, ok = timed_by(worker)
                else:
                    start = time.perf_counter()
                    ok = grade()
                    seconds = time.perf_counter() - start
                times[name].append(seconds)
                if not ok:
                    sys.exit(f"bench_sandbox: {name} scored a correct program wrong")
        if worker is not None:
            worker.stdin.close()
            worker.wait()
    print(f"machine: {os.cpu_count()} cpus, uid {os.geteuid()}, load average (1/5/15 min) before "
          f"{'/'.join(f'{x:.1f}' for x in load_before)}, after {'/'.join(f'{x:.1f}' for x in os.getloadavg())}; "
          f"{args.runs} programs per tier; isolation: {now_iso.describe()}")
    summary(times)
    now = statistics.median(times[NOW])
    print(f"per-program time now / one process on today's launcher: {now / statistics.median(times[SINGLE]):.2f}x "
          "(target <= 1.2x)")
    if worker is not None:
        print(f"per-program time now / {base_name}: {now / statistics.median(times[base_name]):.2f}x (target <= 1.2x)")
    if args.humaneval:
        bench_humaneval(args.humaneval, limits, now_iso, single_iso)


if __name__ == "__main__":
    main()
