"""tests/bench/gguf_export_vs_llamacpp.py's own arithmetic: per-window KL and top-1 recovered from
llama-perplexity's running means (what the paired intervals are computed from)."""
import sys
from pathlib import Path

import pytest

sys.path.append(str(Path(__file__).resolve().parents[1] / "tests" / "bench"))  # last: tests/bench/ shadows src names

import gguf_export_vs_llamacpp as bench  # noqa: E402

LOG = """chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence              Δp RMS            Same top p
   1      12.1234 ±    1.2345       0.01234 ±        nan       0.05000 ±        nan     3.456 ±    nan %    90.000 ±    nan %
   2      12.1234 ±    1.2345       0.01234 ±    0.00100       0.06000 ±    0.00100     3.456 ±  0.123 %    85.000 ±  1.000 %
   3      12.1234 ±    1.2345      -0.01234 ±    0.00100       0.10000 ±    0.00100     3.456 ±  0.123 %    90.000 ±  1.000 %
"""


def test_per_window_values_from_running_means(tmp_path):
    log = tmp_path / "kld.log"
    log.write_text(LOG)
    kl, top = bench.per_window(log)
    assert kl == pytest.approx([0.05, 0.07, 0.18])
    assert top == pytest.approx([0.90, 0.80, 1.00])


def test_plan_like_gives_every_routed_expert_its_stacked_tensors_type(tmp_path):
    """llama.cpp types one stacked `*_exps` tensor per layer and projection; our plan must give each expert's
    disk tensor that type's bits (a miss would leave the expert at the role default: other bytes than theirs)."""
    import json

    import embedded_model

    teacher = embedded_model.smollm2_moe_dir()
    types = {"blk.0.ffn_gate_exps.weight": "Q5_0", "blk.3.ffn_down_exps.weight": "Q8_0",
             "blk.0.attn_q.weight": "Q3_K", "output.weight": "Q8_0", "token_embd.weight": "Q8_0"}
    plan = json.loads(bench.plan_like(bench.MODELS["smollm2-moe"], types, teacher, tmp_path, "Q4_K_M").read_text())
    assert plan["tensors"] == {
        **{f"model.layers.0.mlp.experts.{e}.gate_proj.weight": 4 for e in range(8)},
        **{f"model.layers.3.mlp.experts.{e}.down_proj.weight": 8 for e in range(8)},
        "model.layers.0.self_attn.q_proj.weight": 3, "lm_head.weight": 8}


def test_report_names_both_sides_sizes():
    row = {"bits_per_weight": 4.0, "file_bytes": 2_000_000, "kl_mean": 0.1, "kl_mean_stderr": 0.01, "top1_agree": 0.9}
    doc = {"model": "smollm2-moe", "config": {"chunks": 2, "ctx": 512, "calib_tokens": 1024},
           "types": {"122B_MIX": {"ours": row, "theirs": {**row, "file_bytes": 3_000_000, "kl_mean": 0.2},
                                  "kl_ratio": 0.5, "paired_kl": {"mean": -0.1, "lo": -0.2, "hi": -0.05},
                                  "paired_top1": {"mean": 0.0, "lo": -0.01, "hi": 0.01}}}}
    text = bench.report(doc)
    assert "SmolLM2-MoE fixture" in text and "| 122B mix (ours) vs IQ3_XXS recipe (llama.cpp) |" in text
    assert "| 2.0 / 3.0 |" in text
