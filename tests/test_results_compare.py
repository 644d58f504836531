"""Paired comparison: McNemar and bootstrap against hand-computable cases; unpaired inputs refused."""
import json
import math
from fractions import Fraction
from pathlib import Path

import pytest

import results_compare
import results_schema

FIX = Path(__file__).resolve().parent / "fixtures" / "bench"


def _block(ids, correct, truncated=None):
    truncated = truncated or [0] * len(ids)
    records = [{"id": i, "correct": bool(c), "finish_reason": "length" if t else "stop", "no_answer": False,
                "tokens": 5, "group": None} for i, c, t in zip(ids, correct, truncated)]
    return results_schema.summarize_bench(records)


def _doc(tag, benches):
    return {"schema": results_schema.SCHEMA_VERSION, "tag": tag, "model": "m", "generation": {},
            "benchmarks": benches}


def test_mcnemar_exact_matches_hand_computation():
    # b=5, c=1: P(X<=1 | Bin(6, 1/2)) = (1 + 6) / 64; two-sided = 14/64.
    assert results_compare.mcnemar_exact_p(5, 1) == pytest.approx(14 / 64)
    assert results_compare.mcnemar_exact_p(1, 5) == pytest.approx(14 / 64)
    # b=3, c=3 is the most balanced outcome: p capped at 1.
    assert results_compare.mcnemar_exact_p(3, 3) == 1.0
    assert results_compare.mcnemar_exact_p(0, 0) == 1.0
    # b=10, c=0: 2 * 1/1024.
    assert results_compare.mcnemar_exact_p(10, 0) == pytest.approx(2 / 1024)


def test_bootstrap_two_questions_by_hand():
    # diffs [+1, 0]: resampled means are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4,
    # so the 2.5 % and 97.5 % percentiles are 0 and 100 points.
    lo, hi = results_compare.paired_bootstrap_ci([0, 1], [1, 1], n_boot=4000, seed=0)
    assert (lo, hi) == (0.0, 100.0)


def test_bootstrap_constant_difference_collapses():
    assert results_compare.paired_bootstrap_ci([0] * 7, [1] * 7) == (100.0, 100.0)
    assert results_compare.paired_bootstrap_ci([1, 0, 1], [1, 0, 1]) == (0.0, 0.0)


def _binomial_quantile(n, p, q):
    cdf = 0.0
    for k in range(n + 1):
        cdf += math.comb(n, k) * p ** k * (1 - p) ** (n - k)
        if cdf >= q:
            return k
    return n


def test_bootstrap_matches_exact_binomial_quantiles():
    # diffs in {0, +1} with 30 of 100 at +1: the bootstrap mean is Binomial(100, 0.3) / 100 exactly.
    a, b = [0] * 100, [1] * 30 + [0] * 70
    lo, hi = results_compare.paired_bootstrap_ci(a, b, n_boot=40_000, seed=1)
    assert abs(lo - _binomial_quantile(100, 0.3, 0.025)) <= 1.0
    assert abs(hi - _binomial_quantile(100, 0.3, 0.975)) <= 1.0


def test_bootstrap_is_seeded():
    a, b = [1, 0, 1, 0, 1, 1, 0, 0] * 5, [1, 1, 0, 0, 1, 1, 1, 0] * 5
    assert results_compare.paired_bootstrap_ci(a, b, seed=3) == results_compare.paired_bootstrap_ci(a, b, seed=3)


def test_compare_bench_counts_and_reordering():
    ids = ["q1", "q2", "q3", "q4", "q5"]
    a = _block(ids, [1, 1, 1, 0, 0])
    # B lists the same questions in another order: q1 wrong, q4 right, others as A.
    b = _block(list(reversed(ids)), list(reversed([0, 1, 1, 1, 0])))
    r = results_compare.compare_bench(a, b, name="x")
    assert r["only_a_correct"] == 1 and r["only_b_correct"] == 1
    assert r["delta"] == 0.0 and r["p_mcnemar"] == 1.0 and r["n"] == 5


def _exact_two_sided(b, c):
    """Reference without scipy: the binomial tail as an exact Fraction, built term by term from the
    ratio C(m, i+1) / C(m, i) = (m - i) / (i + 1)."""
    m, k = b + c, min(b, c)
    term, tail = Fraction(1, 2 ** m), Fraction(0)
    for i in range(k + 1):
        tail += term
        term = term * (m - i) / (i + 1)
    return min(Fraction(1), 2 * tail)


@pytest.mark.parametrize("b, c", [(2400, 2600), (2450, 2550), (2300, 2700), (1, 4999), (0, 5000), (2500, 2500),
                                  (600, 500), (1023, 1)])
def test_mcnemar_exact_for_thousands_of_discordant_pairs(b, c):
    # 2.0 ** m overflowed at m >= 1024; a full MMLU-Pro compare has that many discordant pairs.
    want = _exact_two_sided(b, c)
    got = results_compare.mcnemar_exact_p(b, c)
    assert got == pytest.approx(float(want), rel=1e-12, abs=0.0)
    assert results_compare.mcnemar_exact_p(c, b) == got


def test_mcnemar_m5000_near_the_normal_approximation():
    # b=2400, c=2600: z = (2400.5 - 2500) / sqrt(1250) = -2.814; two-sided normal p = 0.00489.
    assert results_compare.mcnemar_exact_p(2400, 2600) == pytest.approx(0.00489, rel=0.02)
    assert results_compare.mcnemar_exact_p(2500, 2500) == 1.0


def _replay_doc(tmp_path, tag, outputs):
    """A results JSON produced by the real runner (replay backend) from designed generations."""
    import vllm_eval8

    cfg = vllm_eval8.EvalConfig(model="m", tag=tag, backend="replay", benchmarks=("mmlu_pro",),
                                data_files={"mmlu_pro": str(FIX / "mmlu_pro.jsonl")},
                                results_dir=str(tmp_path / "vllm_eval"), grade_workers=0, progress=False)
    samples, _ = vllm_eval8.load_all_samples(cfg)
    replay = tmp_path / f"{tag}.replay.jsonl"
    replay.write_text("".join(json.dumps({"id": s.id, "output": f"The answer is ({s.gold})", "finish_reason": fr,
                                          "tokens": 7}) + "\n" for s, fr in zip(samples, outputs)))
    import dataclasses

    return vllm_eval8.run_eval(dataclasses.replace(cfg, replay_file=str(replay)))


def test_truncated_answers_count_as_wrong_in_the_comparison(tmp_path):
    # Both runs write the right letter for all 4 questions; B was cut off by the budget on two of them.
    # The runner's truncation rule (not this test) must turn those into wrong answers.
    a = _replay_doc(tmp_path, "teacher", ["stop"] * 4)
    b = _replay_doc(tmp_path, "quant", ["stop", "length", "stop", "length"])
    assert a["benchmarks"]["mmlu_pro"]["acc"] == 100.0 and b["benchmarks"]["mmlu_pro"]["acc"] == 50.0
    assert b["benchmarks"]["mmlu_pro"]["acc_finished"] == 100.0
    r = results_compare.compare_results(a, b)["benchmarks"]["mmlu_pro"]
    assert r["delta"] == -50.0 and (r["only_a_correct"], r["only_b_correct"]) == (2, 0)
    assert r["p_mcnemar"] == pytest.approx(0.5)


def test_grader_errors_are_left_out_of_the_pairing():
    ids = ["q1", "q2", "q3"]
    a = _block(ids, [1, 1, 1])
    b = _block(ids, [1, 0, 0])
    b["paired"]["grader_error"] = [0, 1, 0]  # q2's grader crashed on B: no verdict, not a wrong answer
    r = results_compare.compare_bench(a, b)
    assert r["n"] == 2 and r["excluded_grader_errors"] == 1 and r["only_a_correct"] == 1


def test_unpaired_inputs_are_refused(tmp_path, capsys):
    a = _doc("teacher", {"gpqa": _block(["q1", "q2", "q3"], [1, 0, 1])})
    b = _doc("quant", {"gpqa": _block(["q1", "q2", "q9"], [1, 0, 1])})
    with pytest.raises(results_compare.UnpairedError, match="different samples"):
        results_compare.compare_results(a, b)
    c = _doc("other", {"mmlu_pro": _block(["m1"], [1])})
    with pytest.raises(results_compare.UnpairedError, match="not in both"):
        results_compare.compare_results(a, c)
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(b))
    assert results_compare.main([str(pa), str(pb)]) == 2
    assert "refused" in capsys.readouterr().err


def test_cli_prints_paired_table(tmp_path, capsys):
    ids = [f"q{i}" for i in range(6)]
    a = _doc("teacher", {"gpqa": _block(ids, [1, 1, 1, 1, 1, 0])})
    b = _doc("quant", {"gpqa": _block(ids, [0, 0, 0, 0, 0, 1])})
    pa, pb, out = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "cmp.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(b))
    assert results_compare.main([str(pa), str(pb), "--json", str(out)]) == 0
    r = json.loads(out.read_text())["benchmarks"]["gpqa"]
    assert r["delta"] == pytest.approx(100 * (1 / 6 - 5 / 6))
    assert r["p_mcnemar"] == pytest.approx(14 / 64)
    assert "gpqa" in capsys.readouterr().out
