"""Prefill / decode speed of GGUFs with llama-bench (the cached llama.cpp build). Prints a markdown table.

    python tests/bench/gguf_speed.py OUT/x-BF16.gguf OUT/x-IQ3_XXS.gguf [-p 512] [-n 128] [-t 16] [--ngl 99]
        [--n-cpu-moe 20]

Figures are llama-bench's own (mean +/- sd over -r repetitions). They depend on the box; compare only
numbers taken on the same machine, with nothing else running.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import bench_paths  # tests/bench/ is on the path of a script run from it

ROOT = bench_paths.use_project_modules()

import llamacpp_server  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf", nargs="+")
    ap.add_argument("-p", type=int, default=512, help="prompt tokens (prefill test)")
    ap.add_argument("-n", type=int, default=128, help="generated tokens (decode test)")
    ap.add_argument("-t", type=int, default=os.cpu_count(), help="threads")
    ap.add_argument("-r", type=int, default=3, help="repetitions")
    ap.add_argument("--ngl", default=None, help="GPU layers (llama-bench -ngl)")
    ap.add_argument("--n-cpu-moe", type=int, default=None)
    ap.add_argument("--llama-cpp", default=None)
    args = ap.parse_args(argv)
    prefix = Path(args.llama_cpp) if args.llama_cpp else llamacpp_server.default_prefix(ROOT)
    binary = llamacpp_server.find_binary(prefix, "llama-bench")
    print(f"| model | size GiB | prefill pp{args.p} tok/s | decode tg{args.n} tok/s |")
    print("|---|---|---|---|")
    for path in args.gguf:
        cmd = [str(binary), "-m", path, "-p", str(args.p), "-n", str(args.n), "-t", str(args.t), "-r", str(args.r),
               "-o", "json"]
        if args.ngl is not None:
            cmd += ["-ngl", str(args.ngl)]
        if args.n_cpu_moe is not None:
            cmd += ["--n-cpu-moe", str(args.n_cpu_moe)]
        print(f"[gguf_speed] + {' '.join(cmd)}", file=sys.stderr, flush=True)
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr[-2000:], file=sys.stderr)
            return 1
        runs = json.loads(out.stdout)
        pp = next(r for r in runs if r.get("n_prompt", 0) > 0 and r.get("n_gen", 0) == 0)
        tg = next(r for r in runs if r.get("n_gen", 0) > 0 and r.get("n_prompt", 0) == 0)
        print(f"| {Path(path).name} | {Path(path).stat().st_size / 2**30:.3f} | "
              f"{pp['avg_ts']:.1f} ± {pp['stddev_ts']:.1f} | {tg['avg_ts']:.1f} ± {tg['stddev_ts']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
