"""Wall time per student of the allocation study (fidelity_study.run_study) on embedded:smollm2-moe.

Runs the study's own code path on a few strategies at one budget and prints, per student, the plan, the
assembly from the once-quantized layers and the scoring against the cached teacher, next to the one-off
costs (load, probe, teacher forward, fake-quant of every layer at every level) and the box's load
average, which on a shared CPU box moves these figures more than any code change. The teacher forward
runs once (its cache is built in a fresh temporary root, so it is measured too), never per student.

    python tests/bench/bench_moe_study.py [--strategies uniform,asal,inverse] [--eval-tokens 2048] [--ctx 128]
        [--dtype bfloat16] [--batch 4]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded:smollm2-moe")
    ap.add_argument("--strategies", default="uniform,asal,inverse")
    ap.add_argument("--budget", type=float, default=None, help="effective bits (default: the study's lower one)")
    ap.add_argument("--levels", default="2,3,4")
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--probe-tokens", type=int, default=2048)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default)")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    import fidelity_study

    strategies = [s for s in args.strategies.split(",") if s]
    levels = [float(x) for x in args.levels.split(",")]
    load_before = os.getloadavg()
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-moe-study-") as cache_root:
        study = fidelity_study.run_study(args.model, strategies, None if args.budget is None else [args.budget], levels,
                                    args.eval_tokens, args.probe_tokens, args.ctx, cache_root=cache_root,
                                    log=lambda m: None, dtype=args.dtype, batch=args.batch)
    wall = time.time() - t0
    budget = study["budgets"][0]
    rows = [r for r in study["results"] if r["budget_bits"] == budget]
    t = study["timing_s"]
    ev = study["eval_text"]
    print(f"model {args.model}, {ev['n_scored_tokens']} held-out tokens ({ev['n_windows']} x {ev['ctx']}), "
          f"dtype {args.dtype} (fp32 head), batch {args.batch}, threads {torch.get_num_threads()}")
    print(f"load average before {tuple(round(x, 2) for x in load_before)}, after {t['load_average']}")
    print(f"once: load {t['load']} s, probe {t['probe']} s, teacher forward {t['teacher']} s, "
          f"fake-quant of every layer at {levels} {t['quantize_levels']} s")
    for r in rows:
        plan = r["seconds"] - r["build_seconds"] - r["score_seconds"]
        print(f"student {r['strategy']:>9} @ {budget}: {r['seconds']:.2f} s = plan {plan:.2f} + assembly "
              f"{r['build_seconds']:.3f} + score {r['score_seconds']:.2f}")
    per = sum(r["seconds"] for r in rows) / len(rows)
    print(f"per student: {per:.2f} s ({per / max(t['teacher'], 1e-9):.2f}x the teacher forward over the same "
          f"tokens); total {wall:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
