"""The validation gate as an equivalence rule: validated / failed / undecided, each with the n that decides."""
import pytest

import results_official as osc
import results_schema

Q = "Qwen3.5-122B-A10B"


def test_validated_when_the_whole_interval_is_inside_the_tolerance():
    # 12,000 questions at 86.8 %: Wilson CI about [86.2, 87.4], inside 86.7 +- 2.
    g = osc.gate_status(Q, "mmlu_pro", correct=10416, n=12000)
    assert g["status"] == "validated" and g["official"] == 86.7 and g["delta"] == pytest.approx(0.1)
    lo, hi = g["ci95"]
    assert 84.7 <= lo and hi <= 88.7
    assert g["n_needed"] is not None and g["n_needed"] <= 12000


def test_on_target_but_too_few_samples_is_undecided_not_validated():
    # The old rule called this validated (|86.9 - 86.7| <= 2) although the CI spans ~+-2.1 pt.
    g = osc.gate_status(Q, "mmlu_pro", correct=869, n=1000)
    assert g["status"] == "undecided"
    lo, hi = g["ci95"]
    assert lo < 84.7 < hi or lo < 88.7 < hi
    # ... and it says how many samples would decide it: at 86.9 % that n validates.
    need = g["n_needed"]
    assert need > 1000
    assert osc.gate_status(Q, "mmlu_pro", correct=round(0.869 * need), n=need)["status"] in ("validated", "undecided")
    assert osc.gate_status(Q, "mmlu_pro", correct=round(0.869 * 2 * need), n=2 * need)["status"] == "validated"


def test_failed_when_the_official_number_is_outside_the_interval():
    g = osc.gate_status(Q, "mmlu_pro", correct=800, n=1000)  # 80.0 %, CI ~[77.4, 82.4]
    assert g["status"] == "failed-gate" and g["delta"] == pytest.approx(-6.7)
    assert g["ci95"][1] < 86.7 and g["n_needed"] <= 1000


def test_off_by_more_than_tolerance_but_not_significant_is_undecided_with_n_to_fail():
    g = osc.gate_status(Q, "gpqa", correct=165, n=198)  # 83.3 % vs 86.6: |delta| > 2, yet 86.6 is in the CI
    assert g["status"] == "undecided" and g["ci95"][0] < 86.6 < g["ci95"][1]
    assert g["n_needed"] > 198
    p = 165 / 198
    lo, hi = osc.wilson_bounds(p, g["n_needed"])
    assert hi < 86.6  # at that n the card number falls outside: a fail
    lo, hi = osc.wilson_bounds(p, g["n_needed"] - 1)
    assert hi >= 86.6  # and not one sample earlier


def test_full_gpqa_diamond_cannot_validate_a_2pt_tolerance():
    # 198 questions: the 95 % half-width is ~4.8 pt > 2 pt, so no score validates; far-off ones fail.
    statuses = {c: osc.gate_status(Q, "gpqa", correct=c, n=198)["status"] for c in range(150, 199)}
    assert "validated" not in statuses.values()
    assert statuses[171] == "undecided" and statuses[150] == "failed-gate"


def test_exact_match_can_never_fail():
    assert osc.n_needed(0.867, 86.7, 2.0, "failed-gate") is None
    assert osc.n_needed(0.867, 86.7, 2.0, "validated") > 1000


def test_wilson_bounds_match_the_results_schema_interval():
    assert osc.wilson_bounds(0.8, 10) == pytest.approx(results_schema.wilson_interval(8, 10))


def test_no_official_number_cases():
    assert osc.gate_status(Q, "math500", 90, 100)["status"] == "no-official-number"
    assert osc.gate_status(None, "gpqa", 90, 100)["status"] == "no-official-number"
    off = osc.gate_status(Q, "hle", 253, 1000, thinking=False)
    assert off["status"] == "no-official-number" and "thinking" in off["reason"]


def test_model_key_matching_is_strict_for_quants():
    assert osc.official_model_key("/models/Qwen/Qwen3.5-122B-A10B/") == Q
    assert osc.official_model_key("google/gemma-4-26B-A4B-it") == "gemma-4-26B-A4B"
    assert osc.official_model_key("/models/Qwen3.5-122B-A10B-w3g128") is None
    assert osc.official_model_key("/models/quant", explicit="qwen3.5-122b-a10b") == Q
    with pytest.raises(ValueError, match="not in the gate table"):
        osc.official_model_key("x", explicit="Llama-9")


def test_gate_for_result_uses_the_official_scorer_without_grader_errors():
    official = {"scorer": {"name": "mmlu_pro/tiger-lab", "exact": True}, "n_graded": 11990, "correct_graded": 10400,
                "n_grader_error": 10}
    doc = {"model": "/m/gemma-4-26B-A4B-it", "generation": {"thinking": True},
           "benchmarks": {"mmmlu": {"correct": 10000, "n": 12000, "official": {**official, "scorer": {
               "name": "mmmlu/robust", "exact": False}, "correct_graded": 10356}},
               "mmlu_pro": {"correct": 0, "n": 12000, "official": official},
               "aime": {"correct": 1, "n": 2}}}
    gates = osc.gate_for_result(doc)
    assert gates["mmlu_pro"]["n"] == 11990 and gates["mmlu_pro"]["excluded_grader_errors"] == 10
    assert gates["mmlu_pro"]["acc"] == pytest.approx(100 * 10400 / 11990)  # not the robust 0 %
    assert gates["mmmlu"]["status"] == "validated" and "approximates" in gates["mmmlu"]["reason"]
    assert gates["aime"]["status"] == "no-official-number"


def test_table_prints(capsys):
    assert osc.main([]) == 0
    out = capsys.readouterr().out
    assert "86.7" in out and "gemma-4-26B-A4B" in out and "undecided" in out


def test_judge_and_grader_errors_are_left_out_of_the_gate_but_counted():
    def rec(i, ok, status="ok"):
        return {"id": f"hle/{i}", "correct": ok, "graded_correct": ok, "official_correct": ok, "no_answer": False,
                "finish_reason": "stop", "tokens": 3, "group": None, "grade_status": status}

    records = [rec(i, i % 4 != 0) for i in range(1000)]
    records[0] = rec(0, True, "judge_error")  # judged by the string fallback: not the official rule
    records[1] = rec(1, False, "grader_error")
    block = results_schema.summarize_bench(records, {"name": "llm-judge", "exact": True})
    assert block["grade_errors"] == {"grader_error": 1, "judge_error": 1}
    assert block["official"]["n_graded"] == 998 and block["official"]["n"] == 1000
    doc = {"model": "/m/Qwen3.5-122B-A10B", "generation": {"thinking": True}, "benchmarks": {"hle": block}}
    g = osc.gate_for_result(doc)["hle"]
    assert g["n"] == 998 and g["excluded_grader_errors"] == 2


def test_image_axes_gate_against_card_numbers_with_their_source():
    for model in osc.OFFICIAL_SCORES:
        for bench in ("mmmu_pro", "math_vision"):
            assert bench in osc.OFFICIAL_SCORES[model] and "card" in osc.OFFICIAL_SOURCES[(model, bench)]
    assert "Vision Language" in osc.OFFICIAL_SOURCES[(Q, "mmmu_pro")]
    verdict = osc.gate_status(Q, "mmmu_pro", 3076, 4000)  # 76.9 % of 4000: the CI sits inside 76.9 +- 2
    assert verdict["status"] == "validated" and verdict["official"] == 76.9
    assert osc.gate_status(Q, "math_vision", 2000, 3040)["status"] == "failed-gate"  # 65.8 % vs 86.2
