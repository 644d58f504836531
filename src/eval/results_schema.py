"""The eval results format and its summary math, in one place.

Everything that turns per-sample records into the numbers in a results JSON lives here, so the runner,
the paired comparison and RESULTS.md cannot disagree about what "acc" means:

* ``acc``           correct / n, where a truncated sample (finish_reason "length") counts as wrong;
* ``acc_finished``  correct / finished, over the samples that ended on their own;
* ``ci95``          Wilson score interval of ``acc`` (95 %, two-sided), in percentage points;
* ``trunc`` / ``no_answer`` rates, output-token mean and median, and, for grouped benchmarks
  (MMMLU locale, MMLU-Pro category), the same per group plus an unweighted macro average.

All rates are percentages (0..100) so they read next to model-card numbers. Pure functions only.
"""
from __future__ import annotations

import hashlib
import json
import math
import statistics
from typing import Iterable, Mapping, Sequence

SCHEMA_VERSION = 1
CI_METHOD = "wilson"
Z_95 = 1.959963984540054  # two-sided 95 % normal quantile
TRUNCATED = "length"
IMAGE_PROVENANCE_KEYS = ("field", "sha256", "bytes", "format", "width", "height", "error")
INPUT_ERROR = "input_error"  # the prompt could not be built or did not fit (image unreadable / too large)
GRADER_ERROR = "grader_error"
JUDGE_ERROR = "judge_error"
GRADE_STATUSES = ("ok", GRADER_ERROR, JUDGE_ERROR)

# Keys every per-sample JSONL line must carry to be trusted on resume.
SAMPLE_KEYS = ("id", "bench", "prompt_hash", "config_hash", "output", "finish_reason", "tokens",
               "extracted", "gold", "correct", "graded_correct", "no_answer", "group")
# Fields of a results JSON that legitimately differ between two runs of the same evaluation.
VOLATILE_KEYS = ("provenance", "timing", "resumed")


def prompt_hash(messages: Sequence[Mapping]) -> str:
    """Stable id of the exact chat prompt: a stored generation is reused only for the same prompt."""
    canonical = json.dumps(list(messages), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def config_hash(generation_config: Mapping) -> str:
    """Stable id of everything that changes what the model generates (model, backend, sampling, budget)."""
    canonical = json.dumps(dict(generation_config), sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def sample_seed(seed: int, sample_id: str) -> int:
    """Per-sample sampling seed: the same sample draws the same tokens whatever batch it lands in."""
    digest = hashlib.sha256(f"{seed}\x00{sample_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def ids_hash(ids: Iterable[str]) -> str:
    """Hash of the ordered sample-id list: two results with equal hashes scored the same samples."""
    return hashlib.sha256("\n".join(ids).encode("utf-8")).hexdigest()


def wilson_interval(correct: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion, in percent; (nan, nan) when n == 0.

    Wilson rather than the normal approximation because it stays inside [0, 100] and is honest at
    the small n and extreme accuracies (HLE ~ 10 %, MMLU-Pro ~ 85 %) this project reports.
    """
    if n < 0 or correct < 0 or correct > n:
        raise ValueError(f"wilson_interval needs 0 <= correct <= n, got correct={correct} n={n}")
    if n == 0:
        return (math.nan, math.nan)
    p = correct / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (100.0 * max(0.0, centre - half), 100.0 * min(1.0, centre + half))


GOLD_INLINE_CHARS = 4096


def compact_gold(gold):
    """Gold as stored per sample: inline when small; a hash for bulky golds (LCB test suites run to MBs)."""
    text = json.dumps(gold, sort_keys=True, ensure_ascii=False, default=str)
    if len(text) <= GOLD_INLINE_CHARS:
        return gold
    return {"sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(), "chars": len(text)}


def sample_record(sample, generation: Mapping, graded, cfg_hash: str, official=None, status: str = "ok") -> dict:
    """One JSONL line: what was asked (by hash), what came back, and how it was graded.

    ``correct`` applies the truncation rule (a cut-off answer is wrong); ``graded_correct`` is what the
    grader said about the text it was given, kept so the rule stays auditable. ``official_*`` is the
    benchmark's own scorer's verdict (None official = the grader is the official rule).
    ``grade_status`` is ok | grader_error | judge_error.
    """
    if status not in GRADE_STATUSES:
        raise ValueError(f"grade status {status!r} not one of {GRADE_STATUSES}")
    truncated = generation["finish_reason"] == TRUNCATED
    off = graded if official is None else official
    rec = {
        "id": sample.id,
        "bench": sample.bench,
        "group": sample.group,
        "prompt_hash": prompt_hash(sample.messages),
        "config_hash": cfg_hash,
        "output": generation["output"],
        "finish_reason": generation["finish_reason"],
        "tokens": int(generation.get("tokens") or 0),
        "extracted": graded.extracted,
        "gold": compact_gold(sample.gold),
        "graded_correct": bool(graded.correct),
        "correct": bool(graded.correct) and not truncated,
        "no_answer": bool(graded.no_answer),
        "grade_status": status,
        "official_extracted": off.extracted,
        "official_correct": bool(off.correct),
        "official_stage": (off.detail or {}).get("stage"),
        "grade_detail": graded.detail,
    }
    if (off.detail or {}).get("guess_options"):  # the official rule guesses; drawn per run in sample order
        rec["official_guess"] = {"options": int(off.detail["guess_options"]), "seed": int(off.detail["guess_seed"])}
    if generation.get("reasoning") is not None:
        rec["reasoning"] = generation["reasoning"]
    images = (sample.meta or {}).get("images") if isinstance(sample.meta, dict) else None
    if images:  # provenance of the pixels the prompt showed: hashes and sizes, never the bytes
        rec["images"] = [{k: v for k, v in info.items() if k in IMAGE_PROVENANCE_KEYS} for info in images]
    if generation.get("input_error") is not None:  # never sent / refused: the reason it is scored wrong
        rec["input_error"] = str(generation["input_error"])
    return rec


def apply_official_guesses(records: Sequence[Mapping]) -> list:
    """The official fallback guesses of one benchmark's records (in sample order); see
    bench_cascades.stream_guesses. Records without a pending guess are returned unchanged."""
    seeds = {r["official_guess"]["seed"] for r in records if r.get("official_guess")}
    if not seeds:
        return list(records)
    import bench_cascades

    return bench_cascades.stream_guesses(list(records), seeds.pop())


def is_complete_record(rec) -> bool:
    """A JSONL line is trusted only if it parsed to a dict holding every field with a sane type."""
    if not isinstance(rec, dict) or any(k not in rec for k in SAMPLE_KEYS):
        return False
    return (isinstance(rec["id"], str) and isinstance(rec["output"], str)
            and isinstance(rec["finish_reason"], str) and isinstance(rec["correct"], bool)
            and isinstance(rec["tokens"], int))


def _pct(k: int, n: int) -> float | None:
    return None if n == 0 else 100.0 * k / n


def _rate_block(records: Sequence[Mapping]) -> dict:
    n = len(records)
    correct = sum(1 for r in records if r["correct"])
    finished = [r for r in records if r["finish_reason"] not in (TRUNCATED, INPUT_ERROR)]
    correct_finished = sum(1 for r in finished if r["correct"])
    lo, hi = wilson_interval(correct, n)
    return {
        "n": n,
        "correct": correct,
        "acc": _pct(correct, n),
        "ci95": None if n == 0 else [lo, hi],
        "n_finished": len(finished),
        "acc_finished": _pct(correct_finished, len(finished)),
        "n_trunc": sum(1 for r in records if r["finish_reason"] == TRUNCATED),
        "trunc": _pct(sum(1 for r in records if r["finish_reason"] == TRUNCATED), n),
        "n_input_error": sum(1 for r in records if r["finish_reason"] == INPUT_ERROR),
        "n_no_answer": sum(1 for r in records if r["no_answer"]),
        "no_answer": _pct(sum(1 for r in records if r["no_answer"]), n),
    }


def _official_block(records: Sequence[Mapping], scorer: Mapping | None) -> dict:
    """The official scorer's counts; `*_graded` leave out samples without an official verdict: the
    grader crashed, or the judge failed (the fallback string match is not the official rule)."""
    n = len(records)
    correct = sum(1 for r in records if r.get("official_correct"))
    graded = [r for r in records if r.get("grade_status", "ok") == "ok"]
    correct_graded = sum(1 for r in graded if r.get("official_correct"))
    lo, hi = wilson_interval(correct_graded, len(graded)) if graded else (math.nan, math.nan)
    return {"scorer": dict(scorer) if scorer else None, "n": n, "correct": correct, "acc": _pct(correct, n),
            "n_graded": len(graded), "correct_graded": correct_graded, "acc_graded": _pct(correct_graded, len(graded)),
            "ci95_graded": None if not graded else [lo, hi],
            "n_grader_error": sum(1 for r in records if r.get("grade_status") == GRADER_ERROR),
            "n_judge_error": sum(1 for r in records if r.get("grade_status") == JUDGE_ERROR)}


def summarize_bench(records: Sequence[Mapping], official_scorer: Mapping | None = None) -> dict:
    """The per-benchmark block of a results JSON, from its per-sample records (in sample order).

    Includes ``paired``: the id / correct / truncated vectors that the paired comparison needs, so
    comparisons and RESULTS.md work from the JSON alone. ``official_scorer`` ({name, source, exact})
    names the benchmark's own scorer whose verdicts the records carry as ``official_correct``.
    """
    block = _rate_block(records)
    block["acc_robust"] = block["acc"]
    block["official"] = _official_block(records, official_scorer)
    block["acc_official"] = block["official"]["acc"]
    differ = sum(1 for r in records if bool(r.get("official_correct")) != bool(r.get("graded_correct")))
    block["disagreement"] = _pct(differ, len(records))
    block["n_disagree"] = differ
    block["grade_errors"] = {s: sum(1 for r in records if r.get("grade_status") == s) for s in (GRADER_ERROR, JUDGE_ERROR)}
    block["ci_method"] = CI_METHOD
    tokens = [int(r["tokens"]) for r in records]
    block["tokens_mean"] = statistics.fmean(tokens) if tokens else None
    block["tokens_median"] = statistics.median(tokens) if tokens else None
    groups: dict[str, list] = {}
    for r in records:
        if r.get("group") is not None:
            groups.setdefault(str(r["group"]), []).append(r)
    if groups:
        per_group = {g: _rate_block(rs) for g, rs in sorted(groups.items())}
        block["groups"] = per_group
        block["macro_acc"] = statistics.fmean(g["acc"] for g in per_group.values())
    block["paired"] = {
        "ids": [r["id"] for r in records],
        "correct": [1 if r["correct"] else 0 for r in records],
        "truncated": [1 if r["finish_reason"] == TRUNCATED else 0 for r in records],
        "grader_error": [1 if r.get("grade_status") == GRADER_ERROR else 0 for r in records],
    }
    return block


def without_volatile(doc: Mapping) -> dict:
    """The results JSON minus timing/provenance: what must match between a resumed and a clean run."""
    return {k: v for k, v in doc.items() if k not in VOLATILE_KEYS}


def check_result(doc: Mapping) -> None:
    """Fail early, naming the field, when a file is not a results JSON this code can read."""
    if not isinstance(doc, Mapping):
        raise ValueError(f"results JSON must be an object, got {type(doc).__name__}")
    if doc.get("schema") != SCHEMA_VERSION:
        raise ValueError(f"results JSON schema {doc.get('schema')!r} is not the supported {SCHEMA_VERSION}; "
                         "regenerate it with src/eval/vllm_eval8.py (or --backend replay on its JSONL)")
    for key in ("tag", "model", "benchmarks", "generation"):
        if key not in doc:
            raise ValueError(f"results JSON lacks {key!r}; it was not written by vllm_eval8.run_eval")
    for bench, block in doc["benchmarks"].items():
        paired = block.get("paired", {})
        if not (len(paired.get("ids", ())) == len(paired.get("correct", ())) == block.get("n")):
            raise ValueError(f"results JSON {doc['tag']!r} benchmark {bench!r}: paired vectors do not match n")
