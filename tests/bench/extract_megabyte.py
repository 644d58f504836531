"""Wall time of every extractor and answer cascade on 1 MB adversarial outputs (target < 1 s each, the
issue's figure). tests/test_bench_extract.py asserts the linear growth that cannot flake under load; this
prints the absolute times.

    python tests/bench/extract_megabyte.py [--size-mb 1] [--repeat 3]
"""
from __future__ import annotations

import argparse
import os

import bench_paths  # tests/bench/ is on the path of a script run from it

ROOT = bench_paths.use_project_modules()

from test_bench_extract import MB, adversarial, best_time, extractors  # noqa: E402  (one set of inputs)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mb", type=float, default=1.0, help="size of each adversarial output")
    ap.add_argument("--repeat", type=int, default=3, help="runs per pair; the best is kept")
    args = ap.parse_args(argv)
    inputs, fns = adversarial(int(args.size_mb * MB)), extractors()
    print(f"load {os.getloadavg()[0]:.1f}; {len(inputs)} inputs x {len(fns)} extractors, "
          f"{args.size_mb:g} MB each, best of {args.repeat}")
    worst = (0.0, "", "")
    for name, text in inputs.items():
        times = {fname: best_time(fn, text, args.repeat) for fname, fn in fns.items()}
        fname, seconds = max(times.items(), key=lambda kv: kv[1])
        print(f"{name:<26} slowest {fname:<22} {seconds * 1e3:8.1f} ms")
        worst = max(worst, (seconds, name, fname))
    seconds, name, fname = worst
    print(f"worst: {fname} on {name}: {seconds * 1e3:.1f} ms ({'<' if seconds < 1 else '>='} 1 s target)")


if __name__ == "__main__":
    main()
