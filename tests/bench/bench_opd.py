"""OPD figures on CPU: training tokens/s per rank and model-state RSS at world 1 and 2 (torchrun, gloo, FSDP2
with the frozen weights sharded), and the loss's peak memory per 1k tokens at a 248k vocabulary, chunked
(opd_loss.chunked_token_divergence) against unchunked (full [tokens, vocab] logits, the old path).

    python tests/bench/bench_opd.py [--work DIR] [--steps 2] [--nprocs 1,2] [--loss-tokens 512] [--skip-train]

Training runs on the layer-heavy fixture of tests/test_opd_sharded.py (32 layers x 64 experts, vocab 512:
decoder layers hold ~99 % of the weights, as in the 122B), built once into --work. Model-state RSS = peak RSS
minus the RSS after imports, before any load (both printed). The loss probe runs each variant in a fresh
process on a fake vocabulary of 248320 (hidden 256, random head) and reports peak RSS growth over the inputs.
On this shared CPU box the speeds depend on the load of other jobs: the 1-minute load average is printed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from bench_paths import use_project_modules

ROOT = use_project_modules()

import atomic_io  # noqa: E402
import provenance  # noqa: E402

VOCAB_122B = 248320


def bench_train(work: Path, nproc: int, steps: int) -> dict:
    import test_opd_sharded

    if not (work / "scores" / "index.json").is_file():
        test_opd_sharded.build_layer_heavy(work)
    out = work / f"bench-train-{nproc}"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    load0 = os.getloadavg()[0]
    log = test_opd_sharded.run_train({"student": work / "student", "scores": work / "scores"}, out, nproc, steps)
    m = log["memory"]
    steady = log["step_seconds"][1:] or log["step_seconds"]
    tokens_per_step = log["tokens_trained"] / max(log["steps"], 1)
    return {"nproc": nproc, "steps": log["steps"], "tokens": log["tokens_trained"],
            "tokens_per_s_per_rank": tokens_per_step / (sum(steady) / len(steady)) / nproc,
            "rss_after_imports_mib": m["rss_after_imports_mib"],
            "peak_rss_mib": [max(s[r] for s in m["peak_rss_mib_per_step"]) for r in range(nproc)],
            "model_state_mib": test_opd_sharded.model_state_mib(log), "losses": log["losses"],
            "loadavg_1min": [load0, os.getloadavg()[0]]}


def loss_probe(variant: str, tokens: int, hidden: int = 256, k: int = 20) -> dict:
    """One variant's forward + backward at a 248k vocab (run in its own process: ru_maxrss is per process)."""
    import torch

    import opd_dist
    import opd_loss

    torch.manual_seed(0)
    h = torch.randn(tokens, hidden, requires_grad=True)
    w = torch.randn(VOCAB_122B, hidden) * 0.05
    ids = torch.randint(0, VOCAB_122B, (tokens, k))
    t_lp = torch.log_softmax(torch.randn(tokens, k + 1), -1)
    base = opd_dist.rss_mib()
    if variant == "chunked":
        div = opd_loss.chunked_token_divergence(h, w, ids, t_lp[:, :k], t_lp[:, k])
    else:
        div = opd_loss.token_divergence(h @ w.T, ids, t_lp[:, :k], t_lp[:, k])
    div.sum().backward()
    peak = opd_dist.peak_rss_mib()
    return {"variant": variant, "tokens": tokens, "vocab": VOCAB_122B, "peak_growth_mib": peak - base,
            "peak_growth_mib_per_1k_tokens": (peak - base) * 1000 / tokens}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    base = os.environ.get("MOE_LOWBIT_SCRATCH") or str(Path.home() / ".cache/moe-lowbit/scratch")
    ap.add_argument("--work", type=Path, default=Path(base) / "opd" / "bench_layer_heavy")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--nprocs", default="1,2")
    ap.add_argument("--loss-tokens", type=int, default=512)
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "results/opd/bench_opd.json")
    ap.add_argument("--loss-probe", choices=["chunked", "full"], help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args(argv)
    if args.loss_probe:
        print(json.dumps(loss_probe(args.loss_probe, args.loss_tokens)))
        return 0
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    train = [] if args.skip_train else [bench_train(args.work, int(n), args.steps) for n in args.nprocs.split(",")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    loss = [json.loads(subprocess.run([sys.executable, __file__, "--loss-probe", v, "--loss-tokens",
                                       str(args.loss_tokens)], check=True, capture_output=True, text=True,
                                      env=env).stdout.strip().splitlines()[-1]) for v in ("chunked", "full")]
    for r in train:
        print(f"world {r['nproc']}: {r['tokens_per_s_per_rank']:.2f} train tok/s per rank; RSS after imports "
              f"{r['rss_after_imports_mib']} MiB, peak {r['peak_rss_mib']} MiB -> model state {r['model_state_mib']} "
              f"MiB per rank (load avg {r['loadavg_1min'][0]:.1f}->{r['loadavg_1min'][1]:.1f})")
    if len(train) == 2:
        print(f"model-state ratio world {train[1]['nproc']} / world {train[0]['nproc']}: "
              f"{max(train[1]['model_state_mib']) / train[0]['model_state_mib'][0]:.2f}")
    for r in loss:
        print(f"loss {r['variant']:>7}, vocab {r['vocab']}: peak +{r['peak_growth_mib']:.0f} MiB for {r['tokens']} "
              f"tokens = {r['peak_growth_mib_per_1k_tokens']:.0f} MiB per 1k tokens")
    atomic_io.write_json(args.out, {"train": train, "loss": loss, "provenance": provenance.record(argv=sys.argv)})
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
