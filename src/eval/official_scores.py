"""The validation gate: does our harness reproduce the model card's number for the BF16 teacher?

Quant-vs-teacher deltas are only worth reading on a benchmark where the harness (prompt, extraction,
grading, budget) is shown to reproduce the official score of the unquantized model. This module holds
the one table of official scores and the rule that turns a result into a gate status:

* ``no-official-number``  no official score for this (model, benchmark), or the run had thinking off
                          (the card numbers are thinking-mode numbers), or the model is not one of the
                          carded models (a quant is never matched implicitly: pass official_model);
* ``n-too-small``         the run's Wilson 95 % half-width exceeds MAX_HALF_WIDTH_PT, so a match or a
                          miss of 2 pt would be mostly sampling noise;
* ``validated``           |acc - official| <= TOLERANCE_PT (acc counts truncated answers as wrong,
                          as the cards do);
* ``failed-gate``         otherwise.

    python -m official_scores            # print the table and the rule
"""
from __future__ import annotations

import argparse
import sys
from pathlib import PurePath
from typing import Mapping, Sequence

import results_schema

TOLERANCE_PT = 2.0
MAX_HALF_WIDTH_PT = 7.0
STATUSES = ("validated", "failed-gate", "no-official-number", "n-too-small")

# Model-card scores (thinking mode), in percent, as quoted in issue #3. lcb = LiveCodeBench v6,
# gpqa = GPQA-Diamond.
OFFICIAL_SCORES: dict[str, dict[str, float]] = {
    "Qwen3.5-122B-A10B": {"mmlu_pro": 86.7, "gpqa": 86.6, "mmmlu": 86.7, "lcb": 78.9, "hle": 25.3},
    "gemma-4-26B-A4B": {"mmlu_pro": 82.6, "gpqa": 82.3, "mmmlu": 86.3, "lcb": 77.1, "hle": 8.7},
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


def gate_status(model_key: str | None, bench: str, correct: int, n: int, thinking: bool = True,
                tolerance: float = TOLERANCE_PT, max_half_width: float = MAX_HALF_WIDTH_PT) -> dict:
    """Gate verdict for one (model, benchmark) result; see the module docstring for the rule."""
    official = OFFICIAL_SCORES.get(model_key or "", {}).get(bench)
    acc = 100.0 * correct / n if n else None
    out = {"model": model_key, "official": official, "acc": acc, "delta": None, "tolerance": tolerance,
           "half_width": None, "max_half_width": max_half_width}
    if official is None or not thinking:
        return {**out, "status": "no-official-number",
                "reason": "thinking off: card numbers are thinking-mode" if official is not None and not thinking
                else "no official score for this model/benchmark"}
    lo, hi = results_schema.wilson_interval(correct, n) if n else (float("nan"), float("nan"))
    half = (hi - lo) / 2.0 if n else float("inf")
    out.update(delta=None if acc is None else acc - official, half_width=half)
    if not n or half > max_half_width:
        return {**out, "status": "n-too-small",
                "reason": f"95% half-width {half:.1f} pt > {max_half_width:.1f} pt; raise n"}
    if abs(acc - official) <= tolerance:
        return {**out, "status": "validated", "reason": f"|{acc:.1f} - {official:.1f}| <= {tolerance:.1f}"}
    return {**out, "status": "failed-gate", "reason": f"|{acc:.1f} - {official:.1f}| > {tolerance:.1f}"}


def gate_for_result(doc: Mapping) -> dict[str, dict]:
    """Gate verdict per benchmark of a results JSON (recomputed from the table, never trusted from disk)."""
    key = official_model_key(doc.get("model_path") or doc.get("model"), doc.get("official_model"))
    thinking = bool(doc.get("generation", {}).get("thinking", True))
    return {bench: gate_status(key, bench, block["correct"], block["n"], thinking)
            for bench, block in doc["benchmarks"].items()}


def format_table() -> str:
    benches = sorted({b for scores in OFFICIAL_SCORES.values() for b in scores})
    lines = ["model".ljust(20) + "".join(b.rjust(10) for b in benches)]
    for model, scores in OFFICIAL_SCORES.items():
        lines.append(model.ljust(20) + "".join(
            (f"{scores[b]:.1f}" if b in scores else "-").rjust(10) for b in benches))
    lines.append(f"tolerance {TOLERANCE_PT} pt; n-too-small when the Wilson 95% half-width > {MAX_HALF_WIDTH_PT} pt")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="official_scores", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)
    print(format_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
