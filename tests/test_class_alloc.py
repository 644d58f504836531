"""class_alloc: linear classes from names, the exhaustive budgeted choice (donors pay for upgrades, one
option per group, never over budget) and its plan built by quant_save on a tiny llama."""
from __future__ import annotations

import itertools
import json
import math

import pytest

import class_alloc
from class_alloc import Option
from tiny_models import build_tiny_checkpoint

NAMES = [f"model.layers.{i}.{blk}.{c}.weight" for i in (10, 2, 0) for blk, cs in
         (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", ("gate_proj", "up_proj", "down_proj")))
         for c in cs] + ["model.embed_tokens.weight", "model.layers.0.input_layernorm.weight", "model.norm.weight"]


def test_linear_classes_groups_by_projection_in_layer_order():
    classes = class_alloc.linear_classes(NAMES)
    assert sorted(classes) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert classes["down_proj"] == [f"model.layers.{i}.mlp.down_proj.weight" for i in (0, 2, 10)]
    assert all("norm" not in n and "embed" not in n for names in classes.values() for n in names)
    with pytest.raises(ValueError, match="no decoder-layer linear"):
        class_alloc.linear_classes(["model.embed_tokens.weight"])
    with_embed = class_alloc.tensor_classes(NAMES)  # the embedding is a class of its own, norms are not
    assert with_embed["embed"] == ["model.embed_tokens.weight"] and {**classes, "embed": with_embed["embed"]} == with_embed


def _brute(options, budget):
    best = None
    for r in range(len(options) + 1):
        for combo in itertools.combinations(options, r):
            groups = [o.group for o in combo]
            if len(set(groups)) != len(groups) or sum(o.delta_bpw for o in combo) > budget + 1e-9:
                continue
            kl = sum(o.delta_kl for o in combo)
            if best is None or kl < best - 1e-12:
                best = kl
    return best


OPTS = [Option("down_proj@6", "down_proj", -0.030, 0.20), Option("v_proj@6", "v_proj", -0.012, 0.03),
        Option("gate_proj@6", "gate_proj", -0.020, 0.20), Option("q_proj@6", "q_proj", +0.001, 0.08),
        Option("embed@6", "embed", +0.004, -0.42), Option("embed@5", "embed", +0.060, -0.63)]


def test_a_cheap_donor_pays_for_upgrades_at_the_same_footprint():
    """Same footprint: the 6-bit embedding frees 0.42 bpw; down+gate (0.40) beat the greedy-by-ratio pick
    v+down (0.23), and all three (0.43) do not fit; the 5-bit embedding costs more KL than it buys."""
    c = class_alloc.choose(OPTS, 0.0)
    assert {o.name for o in c.options} == {"embed@6", "down_proj@6", "gate_proj@6"}
    assert math.isclose(c.predicted_delta_kl, -0.046, abs_tol=1e-12)
    assert math.isclose(c.delta_bpw, -0.02, abs_tol=1e-12)
    assert class_alloc.choose(OPTS[:4], 0.0).options == ()  # no donor, no room: the base itself


def test_choice_is_optimal_never_over_budget_and_one_per_group():
    for budget in (-0.5, -0.2, 0.0, 0.01, 0.05, 0.25, 0.5):
        try:
            c = class_alloc.choose(OPTS, budget)
        except ValueError:
            assert _brute(OPTS, budget) is None
            continue
        assert c.delta_bpw <= budget + 1e-9
        groups = [o.group for o in c.options]
        assert len(groups) == len(set(groups))
        assert math.isclose(c.predicted_delta_kl, _brute(OPTS, budget), abs_tol=1e-12)
        assert "q_proj@6" not in {o.name for o in c.options}  # it only costs: never chosen


def test_no_fit_and_bad_options_are_errors():
    with pytest.raises(ValueError, match="no combination fits"):
        class_alloc.choose([Option("down_proj@6", "down_proj", -0.1, 0.2)], -0.1)
    with pytest.raises(ValueError, match="unique"):
        class_alloc.choose([OPTS[0], OPTS[0]], 1.0)
    with pytest.raises(ValueError, match="non-finite"):
        class_alloc.choose([Option("v_proj@6", "v_proj", float("nan"), 0.05)], -0.1)
    with pytest.raises(ValueError, match="unknown tensor classes"):
        class_alloc.plan_tensors(class_alloc.linear_classes(NAMES), {"w_proj": 6})


def test_plan_builds_through_quant_save(tmp_path):
    """quant_save --bits-plan with a class plan: the planned classes are quantized at their bits, every other
    linear at the recipe's, each tensor equal to moe_quant's fake-quant at that spec."""
    import torch

    import moe_quant
    import quant_save
    from safetensors.torch import load_file

    ckpt = build_tiny_checkpoint("llama", tmp_path / "src")
    src = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        src.update(load_file(str(f)))
    classes = class_alloc.linear_classes(src)
    planned = {"down_proj": 6, "v_proj": 8}
    plan = class_alloc.bits_plan(class_alloc.plan_tensors(classes, planned), "test", 32, "full")
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    meta = quant_save.build({"model": str(ckpt), "out": str(tmp_path / "out"), "progress": False, "group": 32,
                             "grid": "full", "linear_bits": 4.0, "clip_steps": 16,
                             "bits_plan": str(tmp_path / "plan.json")})
    assert meta["bits_plan"]["tensors"] == sum(len(classes[c]) for c in planned)
    out = {}
    for f in sorted((tmp_path / "out").glob("*.safetensors")):
        out.update(load_file(str(f)))
    for cls, names in classes.items():
        spec = moe_quant.QuantSpec(bits=planned.get(cls, 4), group=32, grid="full")
        for n in names:
            assert torch.equal(out[n], moe_quant.fake_quant(src[n], spec, -1)), (n, spec.bits)
