"""How fast every entry point answers --help (target < 0.3 s, without importing torch: the test
tests/test_entry_points.py checks the imports; this prints the wall times).

    python tests/bench/bench_help.py [--repeat 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import bench_paths  # tests/bench/ is on the path of a script run from it

ROOT = bench_paths.use_project_modules()

from test_entry_points import cli_modules, env  # noqa: E402  (one list of entry points)


def wall(cmd: list, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(cmd, capture_output=True, env=env(), check=False)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3, help="runs per entry point (the median is printed)")
    args = ap.parse_args(argv)
    rows = [(p.relative_to(ROOT), [sys.executable, str(p), "--help"]) for p in cli_modules()]
    rows += [(p.relative_to(ROOT), ["bash", str(p), "--help"]) for p in sorted((ROOT / "pipelines").glob("*.sh"))
             if p.name not in ("setup_venv.sh", "test.sh")]
    print(f"{'entry point':<42} {'--help s':>9}   (median of {args.repeat}; load average {os.getloadavg()[0]:.1f})")
    slow = 0
    for name, cmd in rows:
        s = wall(cmd, args.repeat)
        slow += s >= 0.3
        print(f"{str(name):<42} {s:9.3f}{'  SLOW' if s >= 0.3 else ''}")
    print(f"{len(rows) - slow}/{len(rows)} under 0.3 s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
