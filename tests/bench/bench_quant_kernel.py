"""Throughput of the clip-search quantizer on expert-shaped bf16 weights (int3, g128, 16-step search).

Prints MB/s of bf16 input for the fused kernel (CPU: numba; CUDA: the torch path) and for the plain torch
reference loop, plus MB/s per CPU-second so a figure taken on a busy machine can still be read.
Issue target: >= 150 MB/s on this 2-core CPU; >= 400 GB/s on an H100.

    python tests/bench/bench_quant_kernel.py [--experts 8 --rows 1536 --cols 2048 --repeat 3 --device cpu]
"""
import argparse
import os
import time

import torch

import bench_paths  # tests/bench/ is on the path of a script run from it

bench_paths.use_project_modules()

import moe_quant as mq  # noqa: E402


def timed(fn, repeat):
    best_wall, best_cpu = float("inf"), float("inf")
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best_wall = min(best_wall, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    return best_wall, best_cpu


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--rows", type=int, default=1536)
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--bits", type=float, default=3.0)
    ap.add_argument("--clip-steps", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-reference", action="store_true", help="skip the slow torch reference loop")
    args = ap.parse_args(argv)

    g = torch.Generator().manual_seed(0)
    w = (torch.randn(args.experts, args.rows, args.cols, generator=g) * 0.02).to(torch.bfloat16).to(args.device)
    mb = w.numel() * 2 / 1e6
    spec = mq.QuantSpec(args.bits, group=128, clip_steps=args.clip_steps)
    mq.fake_quant(w[0, :8], spec)  # compile / warm up
    print(f"workload: {tuple(w.shape)} bf16 = {mb:.1f} MB, int{args.bits:g} g128 clip {args.clip_steps}, "
          f"device {args.device}, {os.cpu_count()} cpus, torch threads {torch.get_num_threads()}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    wall, cpu = timed(lambda: mq.fake_quant(w, spec), args.repeat)
    print(f"fused kernel : {mb / wall:8.1f} MB/s wall   {mb / cpu:8.1f} MB/s per CPU-second   (load avg {load:.1f})")
    if not args.skip_reference:
        small = w[:1]
        smb = small.numel() * 2 / 1e6
        wall, cpu = timed(lambda: mq.quantize_tensor(small, spec, use_kernel=False, return_codes=False), 1)
        print(f"torch loop   : {smb / wall:8.1f} MB/s wall   {smb / cpu:8.1f} MB/s per CPU-second")


if __name__ == "__main__":
    main()
