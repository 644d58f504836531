"""Store write overhead: wall time of a quant_save build that writes the packed store (this tree) against the
same build by a tree from before the store existed (dequantized shards only), same model and recipe.

    python tests/bench/store_overhead.py [--model embedded:smollm2] [--baseline-rev df31b8d] [--repeats 3] [--json OUT]

The baseline tree is `git archive REV src` into a temp dir (nothing in the repo changes). Runs alternate
(baseline, store, baseline, ...) so drift on a shared machine hits both; the figure is min / min and the
median ratio. Target: <= 1.15x.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def resolve_model(model: str) -> str:
    if model.startswith("embedded:"):
        out = subprocess.run([sys.executable, str(ROOT / "src/quant/embedded_model.py"), model], check=True,
                             capture_output=True, text=True, env=_env(ROOT)).stdout
        return out.strip().splitlines()[-1]
    return model


def _env(tree: Path) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(str(tree / "src" / d) for d in ("quant", "eval", "distill"))}


def timed_build(tree: Path, model: str, out: Path, recipe: list[str]) -> float:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(tree / "src/quant/quant_save.py"), "--model", model, "--out", str(out),
                    "--no-progress", *recipe], check=True, env=_env(tree), capture_output=True)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="embedded:smollm2")
    ap.add_argument("--baseline-rev", default="df31b8d", help="a commit from before the store (dequant only)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--recipe", default="--expert-bits 3 --linear-bits 4 --group 32",
                    help="quant_save flags used by both builds")
    ap.add_argument("--json", help="write the figures here as JSON")
    args = ap.parse_args(argv)
    model = resolve_model(args.model)
    recipe = args.recipe.split()
    with tempfile.TemporaryDirectory(prefix="store_overhead_") as tmp:
        tmp = Path(tmp)
        base = tmp / "baseline"
        base.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.baseline_rev, "src"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
        times = {"baseline": [], "store": []}
        for _ in range(args.repeats):
            times["baseline"].append(timed_build(base, model, tmp / "out_base", recipe))
            times["store"].append(timed_build(ROOT, model, tmp / "out_store", recipe))
        meta = json.loads((tmp / "out_store" / "_ptq_meta.json").read_text())
    ratio_min = min(times["store"]) / min(times["baseline"])
    ratio_med = statistics.median(s / b for s, b in zip(times["store"], times["baseline"]))
    result = {"model": args.model, "recipe": args.recipe, "baseline_rev": args.baseline_rev, "seconds": times,
              "ratio_min": ratio_min, "ratio_median_paired": ratio_med, "target": 1.15,
              "store_bytes": meta["store"]["bytes"], "dequant_bytes": meta["exports"]["dequant"]["bytes"],
              "effective_bits_on_disk": meta["store"]["effective_bits_quantized"]}
    print(f"store overhead on {args.model} ({args.recipe}): baseline min {min(times['baseline']):.2f} s, with store "
          f"min {min(times['store']):.2f} s -> x{ratio_min:.3f} (median paired x{ratio_med:.3f}; target <= 1.15); "
          f"store {meta['store']['bytes'] / 2**20:.1f} MiB beside {meta['exports']['dequant']['bytes'] / 2**20:.1f} MiB "
          f"dequantized")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
