"""tests/bench/quant_methods_matrix.py's pure parts: the Pareto answer for a llama.cpp point, the generated findings,
the docs block, and the KL over llama-perplexity's positions taken from moe_eval's forward."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.append(str(Path(__file__).resolve().parents[1] / "tests" / "bench"))  # last: tests/bench/ shadows src/quant names

import moe_eval  # noqa: E402
import fidelity_cache  # noqa: E402
import quant_methods_kl as qkl  # noqa: E402
import quant_methods_report as rep  # noqa: E402


def ours(name, bpw, kl, **opts):
    o = {"method": name.split("_")[0], "linear_bits": 4.0, "role_bits": "embed=8", "group": 128, "grid": "sym", **opts}
    return {"name": name, "kind": "ours", "method": o["method"], "bpw": bpw, "kl": kl, "kl_all": 2 * kl, "options": o}


REF = {"name": "llama.cpp IQ3_XXS (IQ3 recipe)", "kind": "llamacpp", "method": "IQ3_XXS", "bpw": 5.0, "kl": 0.2}


def test_answer_yes_picks_the_lowest_kl_that_fits():
    a = rep.answer(REF, [ours("clip_a", 4.9, 0.19), ours("gptq_a", 4.8, 0.15), ours("gptq_big", 6.0, 0.01)])
    assert a["yes"] and a["best"]["name"] == "gptq_a"
    assert "**yes**" in rep.answer_line(REF, a)


def test_answer_no_says_by_how_much_and_the_smallest_that_reaches():
    a = rep.answer(REF, [ours("gptq_a", 4.9, 0.3), ours("gptq_g32", 5.4, 0.1), ours("gptq_g64", 5.2, 0.18)])
    assert not a["yes"] and a["best"]["name"] == "gptq_a"
    assert a["kl_ratio"] == pytest.approx(1.5)
    assert a["smallest_reaching"]["name"] == "gptq_g64"  # smaller than g32, also below the ref's KL
    line = rep.answer_line(REF, a)
    assert "**no**" in line and "1.50x" in line and "+0.20 bpw" in line


def test_answer_edge_cases():
    assert rep.answer(REF, [ours("x", 5.0, 0.2)])["yes"]  # <= on both axes
    none_fit = rep.answer(REF, [ours("x", 5.01, 0.01)])
    assert none_fit["best"] is None and "none of our measured builds" in rep.answer_line(REF, none_fit)
    never = rep.answer(REF, [ours("x", 4.0, 0.5)])
    assert "at any size" in rep.answer_line(REF, never)


def test_findings_acceptance_lines():
    rows = [ours("clip_int4_g128_emb8", 5.0, 0.6), ours("gptq_int4_g128_emb8", 5.0, 0.2),
            ours("clip_int3_g128_emb8", 4.0, 6.0, linear_bits=3.0), ours("gptq_int3_g128_emb8", 4.0, 2.5, linear_bits=3.0),
            ours("gptq_int3_g32_emb8", 4.3, 1.0, linear_bits=3.0, group=32)]
    text = "\n".join(rep.findings(rows))
    assert "int4 g128 sym body" in text and "3.0x lower; target KL <= 0.25: holds" in text
    assert "2.4x lower; target >= 3x lower than clip: not reached" in text
    assert "gptq int3, groups: g128 4.00 bpw KL 2.5000, g32 4.30 bpw KL 1.0000" in text


def test_the_shipped_recipe_is_a_row_with_its_own_options(tmp_path, monkeypatch):
    """recipe_row reads configs/smoke.env as bash does (its bits plan included, the caller's env ignored);
    the +embed8 variant builds from a copy of the plan with only the embedding changed."""
    import importlib.util
    import json

    path = Path(__file__).resolve().parents[1] / "tests" / "bench" / "quant_methods_matrix.py"  # src/quant has a quant_methods too
    spec = importlib.util.spec_from_file_location("bench_quant_methods", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    monkeypatch.setenv("GROUP", "128")  # a caller's stray recipe variable must not leak into the measured row
    name, opts = bench.recipe_row(bench.SMOKE_RECIPE)
    env = bench.SMOKE_RECIPE.read_text()
    assert name == "recipe_smoke" and opts["method"] == "gptq" and opts["act_order"] is True
    assert f'\nGROUP={opts["group"]}\n' in env and opts["group"] != 128
    assert (bench.ROOT / opts["bits_plan"]).is_file() and opts["bits_plan"] in env
    assert bench.configs()[-2] == (name, opts)
    variant, vopts = bench.configs()[-1]
    assert variant == "recipe_smoke+embed8" and vopts == {**opts, "plan_overrides": {"model.embed_tokens.weight": 8}}
    assert bench.build_plan_file(tmp_path, name, opts) == bench.ROOT / opts["bits_plan"]
    shipped = json.loads((bench.ROOT / opts["bits_plan"]).read_text())["tensors"]
    changed = json.loads(bench.build_plan_file(tmp_path, variant, vopts).read_text())["tensors"]
    assert shipped["model.embed_tokens.weight"] != 8 and changed == {**shipped, "model.embed_tokens.weight": 8}
    with pytest.raises(SystemExit, match="does not plan"):
        bench.build_plan_file(tmp_path, "bad", {**opts, "plan_overrides": {"lm_head.weight": 8}})


def test_recipe_rows_answer_and_are_named_in_the_table():
    rows_doc = {"ours": {"recipe_smoke+embed8": {"options": {"method": "gptq", "linear_bits": 4.0, "bits_plan": "p.json"},
                                          "bpw": 4.9, "bpw_body": 4.5, "kl_lp_positions": 0.15,
                                          "kl_lp_positions_stderr": 0.01, "kl": 0.16, "kl_stderr": 0.01, "top1": 0.9,
                                          "wall_s": 10.0}},
                "llamacpp": {"IQ3_XXS": {"bits_per_weight": 5.0, "bits_per_weight_without_embed_output": 4.1,
                                         "kl": 0.2, "kl_stderr": 0.01, "top1": 0.8}},
                "text": {"n_windows": 1, "ctx": 8, "kind": "t"}, "calib_tokens": 8}
    text = rep.table(rows_doc)
    assert "recipe_smoke+embed8 = `configs/smoke.env`: method gptq, linear_bits 4.0, bits_plan p.json" in text
    assert "**yes**: recipe_smoke+embed8 at 4.90 bpw" in text


def test_replace_block_keeps_the_rest():
    doc = f"head\n{rep.BEGIN}\nold\n{rep.END}\ntail\n"
    assert rep.replace_block(doc, "new") == f"head\n{rep.BEGIN}\nnew\n{rep.END}\ntail\n"
    assert rep.replace_block("x", "new").endswith(f"{rep.BEGIN}\nnew\n{rep.END}\n")


def _fixture(tmp_path, n=3, ctx=16, vocab=40):
    g = torch.Generator().manual_seed(0)
    table = torch.randn(vocab, vocab, generator=g)
    noise = 0.3 * torch.randn(vocab, vocab, generator=g)
    teacher = lambda tokens: table[tokens]  # noqa: E731  logits depend on the current token only
    student = lambda tokens: (table + noise)[tokens]  # noqa: E731
    cfg = moe_eval.FidelityConfig(ctx=ctx, max_tokens=n * ctx, add_bos=False, cache_root=str(tmp_path), token_chunk=5,
                              vocab_chunk=16)
    windows = moe_eval.TokenWindows(torch.randint(0, vocab, (n, ctx), generator=g))
    cache = fidelity_cache.build_teacher_cache(lambda: teacher, "toy-teacher", windows, cfg)
    return teacher, student, cfg, windows, cache


def test_tap_from_position_0_equals_moe_eval(tmp_path):
    _, student, cfg, windows, cache = _fixture(tmp_path)
    tap = qkl.PositionTap(student, windows, cache, cfg, first=0)
    s = moe_eval.score_student(tap, windows, cache, cfg)
    assert tap.kl == pytest.approx(s["per_window"]["kl"], rel=1e-6)
    assert tap.summary()["kl_mean"] == pytest.approx(s["kl_mean"], rel=1e-6)


def test_tap_second_half_matches_a_direct_kl(tmp_path):
    teacher, student, cfg, windows, cache = _fixture(tmp_path)
    first = qkl.lp_first_position(cfg.ctx)
    tap = qkl.PositionTap(student, windows, cache, cfg, first)
    moe_eval.score_student(tap, windows, cache, cfg)
    for i in range(windows.tokens.shape[0]):
        t = torch.log_softmax(teacher(windows.tokens[i])[:-1][first:].double(), -1)
        q = torch.log_softmax(student(windows.tokens[i])[:-1][first:].double(), -1)
        direct = (t.exp() * (t - q)).sum(-1).mean()
        assert tap.kl[i] == pytest.approx(float(direct), rel=2e-3)  # teacher cached in fp16
    assert tap.n_tokens == windows.tokens.shape[0] * (cfg.ctx - 1 - first)


def test_tap_refuses_windows_out_of_order(tmp_path):
    _, student, cfg, windows, cache = _fixture(tmp_path)
    tap = qkl.PositionTap(student, windows, cache, cfg, first=2)
    with pytest.raises(RuntimeError, match="not window 0"):
        tap(windows.tokens[1])
    with pytest.raises(ValueError, match="outside"):
        qkl.PositionTap(student, windows, cache, cfg, first=cfg.ctx)
