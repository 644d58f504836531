"""The validation gate: does our harness reproduce the model card's number for the BF16 teacher?

Quant-vs-teacher deltas are only worth reading on a benchmark where the harness (prompt, extraction,
grading, budget) is shown to reproduce the official score of the unquantized model. This module holds
the one table of official scores and the rule that turns a result into a gate status. The gate reads
the benchmark's *official* scorer (acc_official: the benchmark's own answer cascade, e.g. MMLU-Pro's
TIGER-Lab regexes with their seeded guess), with grader-error and judge-error samples left out.

It is an equivalence test on the Wilson 95 % interval [lo, hi] of that accuracy:

* ``validated``           the whole interval lies within official +- TOLERANCE_PT;
* ``failed-gate``         the official number lies outside the interval;
* ``undecided``           neither: the run is too small to tell (n_needed says how many samples would
                          decide it at the observed accuracy);
* ``no-official-number``  no official score for this (model, benchmark), or the run had thinking off
                          (the card numbers are thinking-mode numbers), or the model is not one of the
                          carded models (a quant is never matched implicitly: pass official_model).

Every verdict carries ``n_needed``: the smallest n at the observed accuracy for which the interval
would validate (when |acc - official| < tolerance) or fail (otherwise); None when no n can.

    python -m results_official            # print the table and the rule
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import PurePath
from typing import Mapping, Sequence

import results_schema

TOLERANCE_PT = 2.0
STATUSES = ("validated", "failed-gate", "undecided", "no-official-number")
N_SEARCH_MAX = 10 ** 9

# Model-card scores (thinking mode), in percent. Text axes as quoted in issue #3 (lcb = LiveCodeBench v6,
# gpqa = GPQA-Diamond). Image axes: mmmu_pro = the card's "MMMU-Pro" (Gemma: "MMMU Pro (vision)"), which
# our mmmu_pro reproduces as the mean of the standard-10 and vision settings; math_vision = "MathVision" /
# "MATH-Vision" on the full test split. OFFICIAL_SOURCES says where each number was read.
OFFICIAL_SCORES: dict[str, dict[str, float]] = {
    "Qwen3.5-122B-A10B": {"mmlu_pro": 86.7, "gpqa": 86.6, "mmmlu": 86.7, "lcb": 78.9, "hle": 25.3,
                          "mmmu_pro": 76.9, "math_vision": 86.2},
    "gemma-4-26B-A4B": {"mmlu_pro": 82.6, "gpqa": 82.3, "mmmlu": 86.3, "lcb": 77.1, "hle": 8.7,
                        "mmmu_pro": 73.8, "math_vision": 82.4},
}
_QWEN35_MEDIUM_CARD = ("Qwen3.5 medium-model card (Qwen/Qwen3.5-27B, shared table with a Qwen3.5-122B-A10B column), "
                       "'Vision Language' table, 'STEM and Puzzle' rows; read from the copy in "
                       "github.com/nerdpudding/llama_cpp models/documentation/CANDIDATES/README_Qwen3.5-27B-GGUF.md "
                       "@bdd0b6b (its language table's 122B column matches the issue #3 text numbers)")
_GEMMA4_CARD = ("Gemma 4 model card / Google blog benchmark table (26B A4B column: 'MMMU Pro' 73.8 %, 'MATH-Vision' "
                "82.4 %), as also quoted by the reference product README; read from the copy of the HF blog at "
                "git.sethpc.xyz/Seth/gemma4-research tooling/fine-tuning/huggingface-recipes/hf-blog-gemma4.md")
OFFICIAL_SOURCES: dict[tuple, str] = {
    **{(m, b): "model card, as quoted in issue #3" for m, scores in (
        ("Qwen3.5-122B-A10B", ("mmlu_pro", "gpqa", "mmmlu", "lcb", "hle")),
        ("gemma-4-26B-A4B", ("mmlu_pro", "gpqa", "mmmlu", "lcb", "hle"))) for b in scores},
    ("Qwen3.5-122B-A10B", "mmmu_pro"): _QWEN35_MEDIUM_CARD,
    ("Qwen3.5-122B-A10B", "math_vision"): _QWEN35_MEDIUM_CARD,
    ("gemma-4-26B-A4B", "mmmu_pro"): _GEMMA4_CARD,
    ("gemma-4-26B-A4B", "math_vision"): _GEMMA4_CARD,
}
# Checkpoint-name suffixes that still denote the carded (instruction-tuned, unquantized) model.
_SAME_MODEL_SUFFIXES = ("", "-it", "-instruct")


def official_model_key(model: str | None, explicit: str | None = None) -> str | None:
    """The OFFICIAL_SCORES key a result is gated against, or None.

    ``explicit`` (EvalConfig.official_model) wins and must be a table key. Otherwise the model path's
    last component must *be* a carded model name (case-insensitive, optional -it/-instruct suffix):
    a path like .../Qwen3.5-122B-A10B-w3 is a different model and is not matched.
    """
    if explicit:
        for key in OFFICIAL_SCORES:
            if key.lower() == explicit.lower():
                return key
        raise ValueError(f"official_model {explicit!r} is not in the gate table; known: {sorted(OFFICIAL_SCORES)}")
    if not model:
        return None
    name = PurePath(model.rstrip("/")).name.lower()
    for key in OFFICIAL_SCORES:
        if any(name == key.lower() + suffix for suffix in _SAME_MODEL_SUFFIXES):
            return key
    return None


def wilson_bounds(p: float, n: int, z: float = results_schema.Z_95) -> tuple[float, float]:
    """Wilson 95 % interval (percent) of an accuracy p (0..1) observed on n samples."""
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return 100.0 * max(0.0, centre - half), 100.0 * min(1.0, centre + half)


def _verdict(lo: float, hi: float, official: float, tolerance: float) -> str:
    if lo >= official - tolerance and hi <= official + tolerance:
        return "validated"
    if official < lo or official > hi:
        return "failed-gate"
    return "undecided"


def n_needed(p: float, official: float, tolerance: float, want: str) -> int | None:
    """Smallest n at which accuracy p (0..1) would give verdict `want`; None if no n reaches it."""
    ok = lambda n: _verdict(*wilson_bounds(p, n), official, tolerance) == want  # noqa: E731
    if not ok(N_SEARCH_MAX):
        return None
    lo, hi = 1, N_SEARCH_MAX  # the interval only shrinks with n, so the verdict, once reached, stays
    while lo < hi:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def gate_status(model_key: str | None, bench: str, correct: int, n: int, thinking: bool = True,
                tolerance: float = TOLERANCE_PT) -> dict:
    """Gate verdict for one (model, benchmark) result; see the module docstring for the rule."""
    official = OFFICIAL_SCORES.get(model_key or "", {}).get(bench)
    acc = 100.0 * correct / n if n else None
    out = {"model": model_key, "official": official, "acc": acc, "n": n, "delta": None, "tolerance": tolerance,
           "ci95": None, "n_needed": None, "rule": "equivalence: validated iff the Wilson 95% CI lies within "
                                                    "official +- tolerance; failed iff official lies outside it"}
    if official is None or not thinking:
        return {**out, "status": "no-official-number",
                "reason": "thinking off: card numbers are thinking-mode" if official is not None and not thinking
                else "no official score for this model/benchmark"}
    if not n:
        return {**out, "status": "undecided", "reason": "no graded samples"}
    lo, hi = results_schema.wilson_interval(correct, n)
    status = _verdict(lo, hi, official, tolerance)
    delta = acc - official
    target = "validated" if abs(delta) < tolerance else "failed-gate"
    need = n_needed(correct / n, official, tolerance, status if status != "undecided" else target)
    out.update(delta=delta, ci95=[lo, hi], n_needed=need)
    ci = f"CI [{lo:.1f}, {hi:.1f}]"
    if status == "validated":
        reason = f"{ci} within {official:.1f} +- {tolerance:.1f}"
    elif status == "failed-gate":
        reason = f"official {official:.1f} outside {ci}"
    else:
        goal = "validate" if target == "validated" else "fail"
        reason = (f"{ci} straddles {official:.1f} +- {tolerance:.1f}; "
                  + (f"~{need} samples at this accuracy would {goal}" if need else "no n decides at this accuracy"))
    return {**out, "status": status, "reason": reason}


def gate_for_result(doc: Mapping) -> dict[str, dict]:
    """Gate verdict per benchmark of a results JSON (recomputed from the table, never trusted from disk).

    Uses the official scorer's counts with grader-error samples left out; older JSONs without them fall
    back to acc."""
    key = official_model_key(doc.get("model_path") or doc.get("model"), doc.get("official_model"))
    thinking = bool(doc.get("generation", {}).get("thinking", True))
    out = {}
    for bench, block in doc["benchmarks"].items():
        off = block.get("official")
        if off and off.get("n_graded") is not None:
            g = gate_status(key, bench, off["correct_graded"], off["n_graded"], thinking)
            scorer = off.get("scorer") or {}
            g.update(scorer=scorer.get("name"), scorer_exact=scorer.get("exact"),
                     excluded_grader_errors=off.get("n_grader_error", 0) + off.get("n_judge_error", 0))
            if scorer.get("exact") is False and g["status"] != "no-official-number":
                g["reason"] += f" (scorer {scorer.get('name')} only approximates the official rule)"
        else:
            g = gate_status(key, bench, block["correct"], block["n"], thinking)
            g.update(scorer="robust", scorer_exact=False, excluded_grader_errors=0)
        g["official_source"] = OFFICIAL_SOURCES.get((key, bench))
        out[bench] = g
    return out


def format_table() -> str:
    benches = sorted({b for scores in OFFICIAL_SCORES.values() for b in scores})
    lines = ["model".ljust(20) + "".join(b.rjust(10) for b in benches)]
    for model, scores in OFFICIAL_SCORES.items():
        lines.append(model.ljust(20) + "".join(
            (f"{scores[b]:.1f}" if b in scores else "-").rjust(10) for b in benches))
    lines += [f"  {m} {b}: {src}" for (m, b), src in OFFICIAL_SOURCES.items() if b in ("mmmu_pro", "math_vision")]
    lines.append(f"tolerance {TOLERANCE_PT} pt; validated iff the Wilson 95% CI lies within official +- tolerance, "
                 "failed iff official lies outside the CI, else undecided")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="results_official", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)
    print(format_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
