"""Official scoring: on 2,100 real MMLU-Pro generations (three public models, TIGER-AI-Lab's released
outputs), our official mode must agree with the benchmark's own scorer on >= 99.9 % of verdicts.

The reference (tests/mmlu_pro_reference.py) is written from the published definition (TIGER-AI-Lab/MMLU-Pro evaluate_from_local.py:
three re.search stages, then save_res' guess: random seeded 12345 once, one randint per unanswered
question in file order). It shares no code with answer_cascades / bench_mc, which build the sample
(N/A options dropped, gold letter remapped) and run the cascade table the way a real eval does.
"""
import json
import random
from pathlib import Path

import pytest

import bench_cascades
from mmlu_pro_reference import reference_scores
import bench_registry
import results_schema
from bench_spec import Source

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mmlu_pro_real_outputs_sample.jsonl"


@pytest.fixture(scope="module")
def real_rows():
    if not DATA.is_file():
        pytest.skip(f"{DATA} not present (the shared real-generation sample)")
    return [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]


def _ours(rows):
    """Per row (official record, robust verdict): samples built by the mmlu_pro spec, graded the way the
    grading pool grades, records made and the run's guesses drawn by the code a real eval uses (one run
    per model)."""
    spec = bench_registry.BENCHMARKS["mmlu_pro"]
    located = [(f"{DATA}:{i + 1}", row) for i, row in enumerate(rows)]
    samples = bench_registry.make_samples(spec, located, Source(None, spec.dataset, None, "test"), {"_seed": 0})
    runs = {}
    for s, r in zip(samples, rows):
        robust, official = bench_registry.grade_both(s, r["generated_text"])
        gen = {"output": r["generated_text"], "finish_reason": "stop", "tokens": 1}
        runs.setdefault(r["model"], []).append((results_schema.sample_record(s, gen, robust, "h", official), robust))
    out = {}
    for model, pairs in runs.items():
        recs = results_schema.apply_official_guesses([rec for rec, _ in pairs])
        out.update({(model, rec["id"]): (rec, robust) for rec, (_, robust) in zip(recs, pairs)})
    return [out[(r["model"], f"mmlu_pro/{r['question_id']}")] for r in rows]


def test_official_mode_agrees_with_the_tiger_lab_scorer_on_real_generations(real_rows):
    ref = reference_scores(real_rows)
    ours = _ours(real_rows)
    assert len(ours) == len(ref) == 2100
    per_model = {}
    for row, (pred, ok), (official, _robust) in zip(real_rows, ref, ours):
        agree = per_model.setdefault(row["model"], [0, 0, 0])
        agree[0] += 1
        agree[1] += official["official_correct"] == ok
        if pred is not None:  # every letter the official cascade finds, ours finds too
            assert official["official_extracted"] == pred, (row["question_id"], row["model"])
        else:
            agree[2] += 1  # the guesses
    total = sum(a[1] for a in per_model.values()) / len(ref)
    assert total >= 0.999, per_model
    for model, (n, same, _) in per_model.items():
        assert same / n >= 0.995, (model, same, n)


def test_the_robust_cascade_differs_from_the_official_one_and_both_are_reported(real_rows):
    ours = _ours(real_rows)
    differ = sum(rec["official_correct"] != rob.correct for rec, rob in ours)
    assert differ > 0  # not the same rule (first vs last "answer is", case, the guess, </think>, ...)
    assert all(rec["graded_correct"] == rob.correct for rec, rob in ours)  # both verdicts land in the record


def test_stage_order_first_match_case_sensitive_and_guess():
    c = bench_cascades.MMLU_PRO_OFFICIAL
    # first "answer is" wins, and only lower-case "answer is" counts
    assert bench_cascades.run_cascade(c, "the answer is (B). Wait, the answer is (C)").letter == "B"
    assert bench_cascades.run_cascade(c, "The Answer Is (C) ... so, Answer: D").stage == "stage2"
    assert bench_cascades.run_cascade(c, "I pick D over E for sure").letter == "E"
    assert bench_cascades.run_cascade(c, "no letters here, sorry").stage == "none"
    recs = [{"gold": "A", "official_guess": {"options": 10}, "official_correct": False} for _ in range(2000)]
    guessed = bench_cascades.stream_guesses(recs, 12345)
    again = bench_cascades.stream_guesses(recs, 12345)
    assert guessed == again and {r["official_stage"] for r in guessed} == {"guess"}
    assert 150 < sum(r["official_correct"] for r in guessed) < 250  # uniform over the shown options
    want = random.Random(12345)
    assert [r["official_extracted"] for r in guessed[:5]] == ["ABCDEFGHIJ"[want.randint(0, 9)] for _ in range(5)]


def test_gpqa_official_parser_takes_each_pattern_once():
    c = bench_cascades.GPQA_OFFICIAL
    assert bench_cascades.run_cascade(c, "so the answer is (C)").letter == "C"
    # the first "(x)" is not a letter: that pattern is done; no later pattern matches -> no answer
    assert bench_cascades.run_cascade(c, "see (i) and (B)").letter is None
    assert bench_cascades.run_cascade(c, "Answer: (D)").stage == "stage2"


def test_math_official_scorer_is_math_verify_on_the_whole_output():
    import bench_math
    from bench_spec import Sample

    s = Sample(id="math500/x", bench="math500", messages=(), gold="\\frac{1}{2}", meta={})
    g = bench_math.grade_math_verify_whole_output(s, "We get 0.5, i.e. $\\boxed{\\dfrac12}$.")
    assert g.correct and g.detail["scorer"] == "math-verify"
    assert not bench_math.grade_math_verify_whole_output(s, "The answer is $\\boxed{3}$").correct


@pytest.mark.parametrize("text, want", [
    ("Reasoning...\n**Answer: B**", "B"),  # markdown stripped first
    ("الإجابة: ب", "B"),  # Arabic letters map to A-D
    ("উত্তর: ড", "C"),  # Bengali
    ("答案：Ｄ", "D"),  # full-width
    ("Réponse : A", "A"),
    ("Answer: $\\boxed{C}$", "C"),
    ("Answer: E ... Answer: A", "A"),  # the regex needs A-D right after the marker
    ("Respuesta: B\nAnswer: C", "C"),  # markers are tried in the table's order, English first
    ("answer: c", None),  # (?i) finds it, but 'c' is not the gold letter: no valid answer
    ("I think it is B", None),  # no marker, no answer (no guessing in simple-evals)
])
def test_mmmlu_official_is_simple_evals_marker_table(text, want):
    assert bench_cascades.run_cascade(bench_cascades.MMMLU_OFFICIAL, text).letter == want


def test_mmmlu_official_markers_are_the_published_list():
    m = bench_cascades.MMMLU_MARKERS
    assert len(m) == 42 and m[0] == "Answer\\s*:" and m[1].endswith("\u200b" * 6)  # the Korean invisible one
    assert "الإجابة الصحيحة هي:" in m and "Jibu\\s*:" in m and m[-1] == "Àṣàyàn\\s*:"
