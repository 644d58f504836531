"""Paired comparison of two eval results over the same samples (e.g. quant vs its BF16 teacher).

Two runs on the same questions are compared per question, not as two independent accuracies: the
paired bootstrap interval of the accuracy difference and McNemar's exact test use the fact that most
questions are answered the same way by both models, which makes the comparison far tighter than the
two separate Wilson intervals suggest. Inputs over different sample-id sets are refused, since any
"delta" between them would mix model change with question change. A question whose grader crashed
on either side is left out of the pairing (counted as excluded_grader_errors), never scored as wrong.

    python -m results_compare A.json B.json        # delta = B - A, e.g. teacher.json quant.json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

import atomic_io
import results_schema

DEFAULT_BOOTSTRAP = 10_000


class UnpairedError(ValueError):
    """The two results do not score the same samples, so a paired comparison is meaningless."""


def mcnemar_exact_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts (b: only A right, c: only B right).

    Under H0 each discordant pair is a fair coin, so p = P(Binomial(b+c, 1/2) as extreme as observed),
    doubled and capped at 1. Exact (not chi-square) because discordant counts are often small here.
    Computed in integers (the binomial coefficients summed exactly, one correctly rounded division at the
    end), so it holds for any m: a full MMLU-Pro compare has thousands of discordant pairs.
    """
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b} c={c}")
    m = b + c
    if m == 0:
        return 1.0
    k = min(b, c)
    if 2 * k >= m:
        return 1.0
    term, tail = 1, 1  # C(m, 0)
    for i in range(k):
        term = term * (m - i) // (i + 1)  # C(m, i + 1), exact
        tail += term
    return min(1.0, (2 * tail) / (1 << m))


def paired_bootstrap_ci(correct_a: Sequence[int], correct_b: Sequence[int], n_boot: int = DEFAULT_BOOTSTRAP,
                        seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of mean(B - A) in percentage points, resampling questions.

    Per-question differences take only the values -1, 0, +1, so resampling n questions with
    replacement is exactly a multinomial draw of how many of each value are picked; drawing those
    counts directly gives the same distribution in O(n_boot) memory instead of O(n_boot * n).
    """
    a = np.asarray(correct_a, dtype=np.int64)
    b = np.asarray(correct_b, dtype=np.int64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired vectors must be 1-D and equal length, got {a.shape} and {b.shape}")
    n = a.size
    if n == 0:
        return (math.nan, math.nan)
    diff = b - a
    probs = np.array([(diff == -1).sum(), (diff == 0).sum(), (diff == 1).sum()], dtype=np.float64) / n
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, probs, size=n_boot)
    means = (counts[:, 2] - counts[:, 0]) / n
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha], method="inverted_cdf")
    return (100.0 * float(lo), 100.0 * float(hi))


def compare_bench(block_a: Mapping, block_b: Mapping, n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0,
                  name: str = "?") -> dict:
    """Delta (B - A), paired bootstrap 95 % interval and McNemar p for one benchmark's blocks."""
    pa, pb = block_a["paired"], block_b["paired"]
    if list(pa["ids"]) != list(pb["ids"]):
        ids_a, ids_b = set(pa["ids"]), set(pb["ids"])
        if ids_a != ids_b:
            raise UnpairedError(
                f"benchmark {name!r}: the two results score different samples "
                f"({len(ids_a - ids_b)} only in A, {len(ids_b - ids_a)} only in B, {len(ids_a & ids_b)} shared); "
                "rerun both with the same --n / --data-file / dataset revision so the sample ids match")
        order = {sid: i for i, sid in enumerate(pb["ids"])}
        correct_b = [pb["correct"][order[sid]] for sid in pa["ids"]]
    else:
        correct_b = list(pb["correct"])
    correct_a = list(pa["correct"])
    errors_a = list(pa.get("grader_error") or [0] * len(correct_a))
    errors_b = list(pb.get("grader_error") or [0] * len(correct_b))
    if list(pa["ids"]) != list(pb["ids"]) and pb.get("grader_error"):
        order = {sid: i for i, sid in enumerate(pb["ids"])}
        errors_b = [pb["grader_error"][order[sid]] for sid in pa["ids"]]
    keep = [i for i in range(len(correct_a)) if not errors_a[i] and not errors_b[i]]
    excluded = len(correct_a) - len(keep)
    correct_a = [correct_a[i] for i in keep]
    correct_b = [correct_b[i] for i in keep]
    n = len(correct_a)
    only_a = sum(1 for x, y in zip(correct_a, correct_b) if x and not y)
    only_b = sum(1 for x, y in zip(correct_a, correct_b) if y and not x)
    acc_a = 100.0 * sum(correct_a) / n if n else math.nan
    acc_b = 100.0 * sum(correct_b) / n if n else math.nan
    lo, hi = paired_bootstrap_ci(correct_a, correct_b, n_boot=n_boot, seed=seed)
    return {"n": n, "acc_a": acc_a, "acc_b": acc_b, "delta": acc_b - acc_a, "ci95": [lo, hi],
            "ci_method": f"paired percentile bootstrap, {n_boot} resamples, seed {seed}",
            "only_a_correct": only_a, "only_b_correct": only_b,
            "p_mcnemar": mcnemar_exact_p(only_a, only_b),
            "excluded_grader_errors": excluded}


def compare_results(doc_a: Mapping, doc_b: Mapping, benchmarks: Sequence[str] | None = None,
                    n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> dict:
    """Per-benchmark paired comparison of two results JSONs; refuses any benchmark whose ids differ."""
    results_schema.check_result(doc_a)
    results_schema.check_result(doc_b)
    shared = [b for b in doc_a["benchmarks"] if b in doc_b["benchmarks"]]
    wanted = list(benchmarks) if benchmarks else shared
    missing = [b for b in wanted if b not in shared]
    if missing or not wanted:
        raise UnpairedError(
            f"benchmarks {missing or '(none shared)'} are not in both results "
            f"(A {doc_a['tag']!r}: {sorted(doc_a['benchmarks'])}, B {doc_b['tag']!r}: {sorted(doc_b['benchmarks'])})")
    return {"a": doc_a["tag"], "b": doc_b["tag"],
            "benchmarks": {b: compare_bench(doc_a["benchmarks"][b], doc_b["benchmarks"][b], n_boot, seed, b)
                           for b in wanted}}


def format_table(comparison: Mapping) -> str:
    lines = [f"delta = B - A   A={comparison['a']}   B={comparison['b']}",
             f"{'benchmark':<12} {'n':>6} {'A %':>7} {'B %':>7} {'delta':>7} {'95% CI (paired)':>18} "
             f"{'A-only':>7} {'B-only':>7} {'McNemar p':>10}"]
    for bench, r in comparison["benchmarks"].items():
        lines.append(f"{bench:<12} {r['n']:>6} {r['acc_a']:>7.2f} {r['acc_b']:>7.2f} {r['delta']:>+7.2f} "
                     f"{'[%+.2f, %+.2f]' % tuple(r['ci95']):>18} {r['only_a_correct']:>7} "
                     f"{r['only_b_correct']:>7} {r['p_mcnemar']:>10.4g}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path, help="results JSON A (reference, e.g. the BF16 teacher)")
    parser.add_argument("b", type=Path, help="results JSON B (e.g. the quant); delta = B - A")
    parser.add_argument("--benchmarks", default=None, help="comma list; default: every benchmark in both")
    parser.add_argument("--n-boot", type=int, default=DEFAULT_BOOTSTRAP, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--json", type=Path, default=None, help="also write the comparison here")
    args = parser.parse_args(argv)
    docs = []
    for path in (args.a, args.b):
        if not path.is_file():
            parser.error(f"no results file at {path}; run src/eval/vllm_eval8.py first")
        docs.append(json.loads(path.read_text()))
    try:
        comparison = compare_results(docs[0], docs[1], args.benchmarks.split(",") if args.benchmarks else None,
                                     n_boot=args.n_boot, seed=args.seed)
    except UnpairedError as err:
        print(f"compare: refused: {err}", file=sys.stderr)
        return 2
    print(format_table(comparison))
    if args.json:
        atomic_io.write_json(args.json, comparison, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
