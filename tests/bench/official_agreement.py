"""Agreement of our two MMLU-Pro scorers with the benchmark's own on real generations (no model needed).

    python tests/bench/official_agreement.py [--data ../shared/data/mmlu_pro_real_outputs_sample.jsonl]

Prints, per model: how often official mode and the robust cascade give the same verdict as the TIGER-Lab
scorer (re-implemented from its definition in tests/mmlu_pro_reference.py), and how many answers were guesses.
"""
import argparse
import json
import sys
from pathlib import Path

import bench_paths  # tests/bench/ is on the path of a script run from it

ROOT = bench_paths.use_project_modules()

import bench_registry  # noqa: E402
import results_schema  # noqa: E402
from bench_spec import Source  # noqa: E402
from mmlu_pro_reference import reference_scores  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "mmlu_pro_real_outputs_sample.jsonl")
    args = ap.parse_args(argv)
    rows = [json.loads(line) for line in args.data.read_text(encoding="utf-8").splitlines() if line.strip()]
    spec = bench_registry.BENCHMARKS["mmlu_pro"]
    ref = reference_scores(rows)
    per = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        idx = [i for i, r in enumerate(rows) if r["model"] == model]
        located = [(f"{args.data}:{i + 1}", rows[i]) for i in idx]
        samples = bench_registry.make_samples(spec, located, Source(None, spec.dataset, None, "test"), {"_seed": 0})
        recs = []
        for s, i in zip(samples, idx):
            robust, official = bench_registry.grade_both(s, rows[i]["generated_text"])
            gen = {"output": rows[i]["generated_text"], "finish_reason": "stop", "tokens": 1}
            recs.append(results_schema.sample_record(s, gen, robust, "h", official))
        recs = results_schema.apply_official_guesses(recs)
        per[model] = (len(idx), sum(r["official_correct"] == ref[i][1] for r, i in zip(recs, idx)),
                      sum(r["graded_correct"] == ref[i][1] for r, i in zip(recs, idx)),
                      sum(ref[i][0] is None for i in idx))
    print(f"{'model':<26} {'n':>5} {'official %':>11} {'robust %':>9} {'guesses':>8}")
    for model, (n, off, rob, guesses) in per.items():
        print(f"{model:<26} {n:>5} {100 * off / n:>11.2f} {100 * rob / n:>9.2f} {guesses:>8}")
    n = sum(v[0] for v in per.values())
    print(f"{'all':<26} {n:>5} {100 * sum(v[1] for v in per.values()) / n:>11.2f} "
          f"{100 * sum(v[2] for v in per.values()) / n:>9.2f} {sum(v[3] for v in per.values()):>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
