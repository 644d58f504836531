"""The validation gate: each status reachable, and only by the documented rule."""
import pytest

import official_scores as osc


def test_validated_within_tolerance():
    g = osc.gate_status("Qwen3.5-122B-A10B", "mmlu_pro", correct=870, n=1000)
    assert g["status"] == "validated" and g["official"] == 86.7 and g["delta"] == pytest.approx(0.3)


def test_failed_gate_outside_tolerance():
    g = osc.gate_status("Qwen3.5-122B-A10B", "mmlu_pro", correct=840, n=1000)
    assert g["status"] == "failed-gate" and g["delta"] == pytest.approx(-2.7)


def test_boundary_is_inclusive():
    # 88.7 - 86.7 = 2.0 exactly: within tolerance.
    assert osc.gate_status("Qwen3.5-122B-A10B", "mmlu_pro", correct=887, n=1000)["status"] == "validated"


def test_small_n_is_not_decidable_even_when_on_target():
    g = osc.gate_status("gemma-4-26B-A4B", "gpqa", correct=33, n=40)  # 82.5 %, right on 82.3
    assert g["status"] == "n-too-small" and g["half_width"] > osc.MAX_HALF_WIDTH_PT


def test_full_gpqa_diamond_is_large_enough():
    # GPQA-Diamond has 198 questions; at ~86 % the Wilson half-width is about 4.9 pt.
    g = osc.gate_status("Qwen3.5-122B-A10B", "gpqa", correct=172, n=198)
    assert g["status"] == "validated" and g["half_width"] < osc.MAX_HALF_WIDTH_PT


def test_no_official_number_cases():
    assert osc.gate_status("Qwen3.5-122B-A10B", "math500", 90, 100)["status"] == "no-official-number"
    assert osc.gate_status(None, "gpqa", 90, 100)["status"] == "no-official-number"
    off = osc.gate_status("Qwen3.5-122B-A10B", "hle", 253, 1000, thinking=False)
    assert off["status"] == "no-official-number" and "thinking" in off["reason"]


def test_model_key_matching_is_strict_for_quants():
    assert osc.official_model_key("/models/Qwen/Qwen3.5-122B-A10B/") == "Qwen3.5-122B-A10B"
    assert osc.official_model_key("google/gemma-4-26B-A4B-it") == "gemma-4-26B-A4B"
    assert osc.official_model_key("/models/Qwen3.5-122B-A10B-w3g128") is None
    assert osc.official_model_key("/models/quant", explicit="qwen3.5-122b-a10b") == "Qwen3.5-122B-A10B"
    with pytest.raises(ValueError, match="not in the gate table"):
        osc.official_model_key("x", explicit="Llama-9")


def test_gate_for_result_uses_thinking_and_model():
    doc = {"model": "/m/gemma-4-26B-A4B-it", "generation": {"thinking": True},
           "benchmarks": {"mmmlu": {"correct": 863, "n": 1000}, "aime": {"correct": 1, "n": 2}}}
    gates = osc.gate_for_result(doc)
    assert gates["mmmlu"]["status"] == "validated" and gates["aime"]["status"] == "no-official-number"


def test_table_prints(capsys):
    assert osc.main([]) == 0
    out = capsys.readouterr().out
    assert "86.7" in out and "gemma-4-26B-A4B" in out
