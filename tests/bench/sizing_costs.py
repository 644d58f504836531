"""Measure the per-operation costs `sizing` projects from, on this machine, and write them as a cost table.

    python tests/bench/sizing_costs.py [--out results/sizing/cost_model_cpu.json] [--quick]

Each figure is one real call of the project's own code at a shape from the 122B's layers (smaller in the
expert count, never in the matrix dims that set the cost per weight):
* clip_s_per_gparam: moe_quant.quantize_tensor (3 bits, g128, 16-step search, sym grid) on a bf16
  [1024, 3072] expert matrix, seconds per 1e9 weights;
* gptq_gflops: gptq.gptq_batched on [E, 1024, 3072] bf16 (the gate/up shape) under a random SPD H, rated with
  the flop model E (K^3 + 2 R K^2) that sizing.model_work uses;
* hessian_gflops: fp32 x^T x for 4096 tokens of width 3072; forward_gflops: a bf16 [4096, 3072] x [3072, 2048]
  matmul (the expert gate/up forward);
* read_gbps / write_gbps: a 512 MB file written with fsync, then read after dropping it from the page cache;
* clip_ram_factor: peak RSS growth while quantizing a bf16 [8192, 3072] tensor, over its bytes (measured first,
  in a fresh process, so nothing earlier raised the peak).
The JSON carries the machine (CPU model, cores, torch threads) and the date; sizing.load_costs reads it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_paths  # tests/bench/ is on the path of a script run from it

ROOT = bench_paths.use_project_modules()

import torch  # noqa: E402

import gptq  # noqa: E402
import moe_quant  # noqa: E402

SPEC = moe_quant.QuantSpec(bits=3.0, group=128, clip_steps=16, clip_lo=0.65, grid="sym")


def timed(fn, repeat: int = 2) -> float:
    fn()  # warm-up (numba compile, allocator)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def ram_factor() -> float:
    """Run in a child process: peak RSS growth of one quantize_tensor call / the tensor's bytes."""
    w = torch.randn(8192, 3072).to(torch.bfloat16)
    moe_quant.quantize_tensor(w[:128], SPEC)  # compile the kernels before the baseline
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    moe_quant.quantize_tensor(w, SPEC)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return max(peak - base, 0) / (w.numel() * 2) + 1.0  # + the input tensor itself


def clip_rate() -> float:
    w = torch.randn(1024, 3072).to(torch.bfloat16)
    return timed(lambda: moe_quant.quantize_tensor(w, SPEC)) / w.numel() * 1e9


def gptq_rate(experts: int) -> float:
    e, r, k = experts, 1024, 3072
    w = torch.randn(e, r, k).to(torch.bfloat16)
    x = torch.randn(e, 4 * k, k)
    h = x.transpose(1, 2) @ x / x.shape[1]
    s = timed(lambda: gptq.gptq_batched(w, h, SPEC), repeat=1)
    return e * (k**3 + 2 * r * k * k) / s / 1e9


def matmul_rate(a_shape, b_shape, dtype) -> float:
    a, b = torch.randn(*a_shape).to(dtype), torch.randn(*b_shape).to(dtype)
    s = timed(lambda: a @ b, repeat=3)
    return 2 * a_shape[0] * a_shape[1] * b_shape[1] / s / 1e9


def disk_rates(directory: Path, size: int = 512 << 20) -> tuple[float, float]:
    data = os.urandom(1 << 20) * (size >> 20)
    with tempfile.NamedTemporaryFile(dir=directory, delete=False) as f:
        path = Path(f.name)
    try:
        t0 = time.perf_counter()
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        write = size / (time.perf_counter() - t0) / 1e9
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        t0 = time.perf_counter()
        with open(path, "rb") as f:
            while f.read(16 << 20):
                pass
        read = size / (time.perf_counter() - t0) / 1e9
    finally:
        path.unlink()
    return read, write


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "results" / "sizing" / "cost_model_cpu.json"))
    ap.add_argument("--experts", type=int, default=2, help="experts in the GPTQ batch (cost per expert is what counts)")
    ap.add_argument("--disk-dir", default=None, help="where to time disk I/O (default: the --out directory)")
    ap.add_argument("--ram-child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.ram_child:
        print(ram_factor())
        return 0
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    factor = float(subprocess.run([sys.executable, __file__, "--ram-child"], check=True, capture_output=True,
                                  text=True).stdout.strip().splitlines()[-1])
    costs = {"clip_ram_factor": round(factor, 2), "clip_s_per_gparam": round(clip_rate(), 2),
             "gptq_gflops": round(gptq_rate(a.experts), 2),
             "hessian_gflops": round(matmul_rate((3072, 4096), (4096, 3072), torch.float32), 2),
             "forward_gflops": round(matmul_rate((4096, 3072), (3072, 2048), torch.bfloat16), 2)}
    costs["read_gbps"], costs["write_gbps"] = (round(x, 3) for x in disk_rates(Path(a.disk_dir or out.parent)))
    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "torch": torch.__version__, "python": platform.python_version()}
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    doc = {"name": "cpu", "machine": machine, "date": when, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
           "source": (f"MEASURED by tests/bench/sizing_costs.py on {machine['cpu']} ({machine['cores']} cores, "
                      f"{machine['torch_threads']} torch threads), {when}; download rate assumed 0.25 GB/s"),
           "costs": {**costs, "download_gbps": 0.25}}
    out.write_text(json.dumps(doc, indent=1) + "\n")
    for k, v in costs.items():
        print(f"{k:<20}{v}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
