"""OPD speed: training tokens/s with 1 and 2 processes (torchrun, FSDP2) and the scorer's tokens/s.

Runs on the artifacts of a finished `bash pipelines/distill.sh --smoke` (its work dir holds the student,
rollouts and scores); every figure is measured here, in fresh temp dirs, and printed + written to
results/opd/bench_opd.json.

    python bench/bench_opd.py [--work DIR] [--steps 3] [--batch-seqs 8] [--threads 1] [--device cpu|cuda] [--nprocs 1,2]

On this shared CPU box the figures depend on the load of other jobs as much as on the code: each one
is printed with the 1-minute load average before and after it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / d) for d in ("src/quant", "src/eval", "src/distill")]

import atomic_io  # noqa: E402
import provenance  # noqa: E402


def env(threads: int) -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(str(ROOT / d) for d in ("src/quant", "src/eval", "src/distill"))
    e["OMP_NUM_THREADS"] = str(threads)
    return e


def bench_train(work: Path, nproc: int, steps: int, batch: int, roles: str, device: str, threads: int,
                tmp: Path) -> dict:
    """`steps` optimizer steps of `batch` rollouts, one micro-batch per rank (the smoke's layout)."""
    out = tmp / f"train{nproc}"
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
           if nproc > 1 or device == "cuda" else [sys.executable])
    cmd += [str(ROOT / "src/distill/opd_train_fsdp.py"), "--student", str(work / "student"), "--scores",
            str(work / "scores_student"), "--out", str(out), "--steps", str(steps), "--batch-seqs", str(batch),
            "--micro-seqs", str(batch // nproc), "--lora-roles", roles, "--rank", "8", "--device", device,
            "--no-progress", "--save-every", str(steps)]
    load0 = os.getloadavg()[0]
    subprocess.run(cmd, check=True, env=env(threads), capture_output=True)
    log = json.loads((out / "train_log.json").read_text())
    steady = log["step_seconds"][1:] or log["step_seconds"]  # step 1 pays for warm-up
    tokens_per_step = log["tokens_trained"] / max(log["steps"], 1)
    return {"nproc": nproc, "threads_per_proc": threads, "steps": log["steps"], "tokens": log["tokens_trained"],
            "tokens_per_s_all_steps": log["tokens_per_s"],
            "tokens_per_s_after_step1": tokens_per_step / (sum(steady) / len(steady)),
            "wall_s_per_step_median": log["wall_s_per_step_median"], "loadavg_1min": [load0, os.getloadavg()[0]]}


def bench_score(work: Path, device: str, threads: int, tmp: Path) -> dict:
    index = json.loads((work / "scores_student" / "index.json").read_text())
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    subprocess.run([sys.executable, str(ROOT / "src/distill/opd_score.py"), "--teacher", index["teacher"]["dir"],
                    "--rollouts", index["rollouts"][0]["file"], "--out", str(tmp / "scores"), "--device", device],
                   check=True, env=env(threads), capture_output=True)
    wall = time.perf_counter() - t0
    fresh = json.loads((tmp / "scores" / "index.json").read_text())
    return {"tokens": fresh["tokens"], "tokens_per_s_scoring": fresh["tokens_per_s_this_run"],
            "tokens_per_s_incl_load": fresh["tokens"] / wall, "k": fresh["k"], "threads": threads,
            "loadavg_1min": [load0, os.getloadavg()[0]]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    base = os.environ.get("MOE_LOWBIT_SCRATCH") or str(Path.home() / ".cache/moe-lowbit/scratch")
    ap.add_argument("--work", type=Path, default=Path(base) / "opd" / "opd_smoke", help="distill.sh --smoke work dir")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch-seqs", type=int, default=8, help="rollouts per step (split over the processes)")
    ap.add_argument("--lora-roles", default="routed_expert")
    ap.add_argument("--threads", type=int, default=1, help="OpenMP threads per process (OMP_NUM_THREADS)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--nprocs", default="1,2")
    ap.add_argument("--out", type=Path, default=ROOT / "results/opd/bench_opd.json")
    args = ap.parse_args(argv)
    if not (args.work / "scores_student" / "index.json").is_file():
        print(f"bench_opd: {args.work} holds no finished smoke (run bash pipelines/distill.sh --smoke first)",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        train = [bench_train(args.work, int(n), args.steps, args.batch_seqs, args.lora_roles, args.device, args.threads,
                             Path(tmp)) for n in args.nprocs.split(",")]
        score = bench_score(args.work, args.device, args.threads, Path(tmp))
    print(f"{'nproc':>5} {'threads':>7} {'steps':>5} {'tokens':>7} {'train tok/s':>12} {'after step 1':>13} {'s/step':>7} "
          f"{'load avg':>12}")
    for r in train:
        print(f"{r['nproc']:>5} {r['threads_per_proc']:>7} {r['steps']:>5} {r['tokens']:>7} {r['tokens_per_s_all_steps']:>12.1f} "
              f"{r['tokens_per_s_after_step1']:>13.1f} {r['wall_s_per_step_median']:>7.2f} "
              f"{r['loadavg_1min'][0]:>5.1f}->{r['loadavg_1min'][1]:<5.1f}")
    print(f"scorer (HF teacher, k={score['k']}): {score['tokens_per_s_scoring']:.1f} tok/s scoring, "
          f"{score['tokens_per_s_incl_load']:.1f} tok/s including model load ({score['tokens']} tokens, "
          f"load average {score['loadavg_1min'][0]:.1f}->{score['loadavg_1min'][1]:.1f})")
    atomic_io.write_json(args.out, {"device": args.device, "train": train, "score": score,
                                    "provenance": provenance.record(argv=sys.argv)})
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
