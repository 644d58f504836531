"""Wall time of the full SmolLM2 gptq build, calibration included, with its stage breakdown (issue 8's
"SmolLM2 gptq build <= 2 min on this 2-core box").

    python tests/bench/bench_gptq_build.py [--calib-tokens 16384] [--calib-ctx 512] [--clip-steps 8] [--keep DIR]

Runs `src/quant/quant_save.py` in a fresh process on the embedded SmolLM2-135M-Instruct (`embedded:smollm2`,
the cached BF16 conversion) with `--method gptq --role-bits embed=8 --calib pydoc-topics`, into an empty
output dir, and prints: wall time of the process, its CPU time (user + sys of the child: on a shared box
the wall time depends on the load, the CPU time much less), the load average before and after, and the
per-stage seconds the calibration pass records in `_ptq_meta.json` (layer-0 inputs, statistics forwards,
quantization, the output forward, checkpoints, the head).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded:smollm2", help="checkpoint dir or embedded:NAME")
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--calib-ctx", type=int, default=512)
    ap.add_argument("--clip-steps", type=int, default=8)
    ap.add_argument("--extra", default="", help="more quant_save flags, e.g. '--act-order --group 64'")
    ap.add_argument("--keep", help="write the build here (default: a temp dir, deleted)")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "src" / d) for d in ("quant", "eval", "distill")] + [os.environ.get("PYTHONPATH", "")])}
    model = args.model
    if model.startswith("embedded:"):
        model = subprocess.run([sys.executable, str(ROOT / "src/quant/embedded_model.py")], env=env, check=True,
                               capture_output=True, text=True).stdout.strip().splitlines()[-1]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.keep) if args.keep else Path(tmp) / "out"
        cmd = [sys.executable, str(ROOT / "src/quant/quant_save.py"), "--model", model, "--out", str(out),
               "--method", "gptq", "--role-bits", "embed=8", "--calib", "pydoc-topics",
               "--calib-tokens", str(args.calib_tokens), "--calib-ctx", str(args.calib_ctx),
               "--clip-steps", str(args.clip_steps), "--no-progress", "--force", *args.extra.split()]
        load0 = os.getloadavg()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        load1 = os.getloadavg()
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        meta = json.loads((out / "_ptq_meta.json").read_text())
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    t = meta["timings"]
    stages = t.get("calibration_stage_seconds") or {}
    row = {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "cores": os.cpu_count(),
           "load_before": [round(x, 2) for x in load0], "load_after": [round(x, 2) for x in load1],
           "build_total_s": round(t["total_seconds"], 1), "calibration_s": round(t["calibration_seconds"], 1),
           "stages_s": stages, "calib_tokens": args.calib_tokens, "calib_ctx": args.calib_ctx,
           "clip_steps": args.clip_steps, "extra": args.extra}
    print(f"SmolLM2 gptq build (embed=8, pydoc-topics {args.calib_tokens} tokens x ctx {args.calib_ctx}, "
          f"clip steps {args.clip_steps}{', ' + args.extra if args.extra else ''})")
    print(f"  wall {wall:.1f} s (target <= 120 s)  cpu {cpu:.1f} s on {os.cpu_count()} cores  "
          f"load avg before {load0[0]:.2f} / after {load1[0]:.2f}")
    print(f"  inside quant_save: build {t['total_seconds']:.1f} s, calibration pass {t['calibration_seconds']:.1f} s")
    for k, v in sorted(stages.items(), key=lambda kv: -kv[1]):
        print(f"    {k:<14} {v:7.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
