"""moe_probe (numbers equal a direct recomputation), moe_alloc (budgets, errors, plan format) and the study's
in-memory builder (per-expert bits on fused 3-D experts), on tiny random qwen2_moe checkpoints."""
from __future__ import annotations

import json
import math

import pytest
import torch

import footprint
import moe_alloc
import moe_probe
import moe_quant
import moe_study
from tiny_models import build_tiny_checkpoint, tiny_model


def _windows(n=3, ctx=24, vocab=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (n, ctx), generator=g)


def test_probe_matches_direct_recomputation():
    model = tiny_model("qwen2_moe", dtype=torch.float32).eval()
    windows = _windows()
    captured = {}
    hooks = []
    for layer, name, mod in moe_probe.find_routers(model):
        hooks.append(mod.register_forward_hook(
            lambda m, i, o, layer=layer: captured.setdefault(layer, []).append((i[0].detach(), o))))
    probe = moe_probe.probe_model(model, windows, batch=2)
    for h in hooks:
        h.remove()
    top_k = model.config.num_experts_per_tok
    assert len(probe["layers"]) == model.config.num_hidden_layers
    for st in probe["layers"]:
        calls = captured[st["layer"]]
        x = torch.cat([c[0].reshape(-1, c[0].shape[-1]) for c in calls])
        w = torch.cat([c[1][1].reshape(-1, top_k) for c in calls])
        ids = torch.cat([c[1][2].reshape(-1, top_k) for c in calls])
        assert sum(st["freq"]) == windows.numel() * top_k  # counts sum to tokens x top-k
        assert st["freq"] == torch.bincount(ids.flatten(), minlength=st["n_experts"]).tolist()
        assert math.isclose(sum(st["wmass"]), float(w.double().sum()), rel_tol=1e-9)  # masses = router weights
        mass = torch.zeros(st["n_experts"], dtype=torch.float64).index_add_(0, ids.flatten(), w.double().flatten())
        assert torch.allclose(torch.tensor(st["wmass"], dtype=torch.float64), mass, rtol=1e-6)
        norms = x.double().norm(dim=-1)
        asal = torch.zeros(st["n_experts"], dtype=torch.float64).index_add_(
            0, ids.flatten(), norms.repeat_interleave(top_k))
        assert torch.allclose(torch.tensor(st["asal"], dtype=torch.float64), asal, rtol=1e-5)
        co = torch.tensor(st["coact"])
        assert co.diagonal().tolist() == st["freq"] and torch.equal(co, co.T)
        share = torch.tensor(st["freq"], dtype=torch.float64) / sum(st["freq"])
        ent = float(-(share[share > 0] * share[share > 0].log()).sum() / math.log(st["n_experts"]))
        assert math.isclose(st["entropy_norm"], ent, rel_tol=1e-9)
        assert math.isclose(st["max_over_mean"], float(share.max() / share.mean()), rel_tol=1e-9)


def test_probe_refuses_a_dense_model(tmp_path, capsys):
    with pytest.raises(moe_probe.ProbeError, match="no routed experts"):
        moe_probe.attach(tiny_model("llama", dtype=torch.float32))
    ckpt = build_tiny_checkpoint("llama", tmp_path / "dense")
    text = tmp_path / "calib.txt"
    text.write_text("hello world " * 50)
    rc = moe_probe.main(["--model", str(ckpt), "--calib-file", str(text), "--tokens", "64",
                         "--out", str(tmp_path / "probe.json")])
    assert rc == 2 and "no routed experts" in capsys.readouterr().err
    assert not (tmp_path / "probe.json").exists()


def _fake_probe(units, seed=0):
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for (l, e) in units:
        layers.setdefault(l, []).append(e)
    out = []
    for l, es in sorted(layers.items()):
        n = len(es)
        freq = torch.randint(1, 100, (n,), generator=g).tolist()
        out.append({"layer": l, "n_experts": n, "freq": freq, "wmass": [f * 0.6 for f in freq],
                    "asal": torch.rand(n, generator=g).add(0.5).tolist()})
    return {"layers": out}


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_every_strategy_meets_its_budget(tmp_path, layout):
    ckpt = build_tiny_checkpoint("qwen2_moe", tmp_path / layout, expert_layout=layout)
    units = moe_alloc.expert_units(ckpt)
    assert len(units) == 2 * 4
    probe = _fake_probe(units)
    budget = moe_study.default_budgets(units, 128, "full")[1]  # the cost of uniform int3
    shapes = moe_alloc.read_shapes(ckpt)
    import model_adapters

    adapter = model_adapters.adapter_for(json.loads((ckpt / "config.json").read_text()))

    def axis_of(name, part):
        return -1

    for strategy in moe_alloc.STRATEGIES:
        plan = moe_alloc.make_plan(probe, ckpt, budget, strategy, [2, 3, 4])
        assert plan["format"] == moe_alloc.FORMAT and plan["strategy"] == strategy
        assert abs(plan["effective_bits"] - budget) <= 0.01
        moe_alloc.validate_plan(plan, shapes)
        assert abs(moe_alloc.plan_effective_bits(plan, shapes, axis_of) - plan["effective_bits"]) < 1e-9
        for name, bits in plan["tensors"].items():
            assert adapter.classify(name, shapes[name][0]).role == model_adapters.Role.ROUTED_EXPERT
            if layout == "fused":
                assert isinstance(bits, list) and len(bits) == shapes[name][0][0]
            else:
                assert isinstance(bits, (int, float))
    asal = moe_alloc.make_plan(probe, ckpt, budget, "asal", [2, 3, 4])
    inverse = moe_alloc.make_plan(probe, ckpt, budget, "inverse", [2, 3, 4])
    assert asal["tensors"] != inverse["tensors"]


def test_unreachable_budgets_and_foreign_tensors_are_refused(tmp_path):
    ckpt = build_tiny_checkpoint("qwen2_moe", tmp_path / "m")
    units = moe_alloc.expert_units(ckpt)
    probe = _fake_probe(units)
    with pytest.raises(moe_alloc.AllocError, match="below the lowest level"):
        moe_alloc.make_plan(probe, ckpt, 1.5, "asal", [2, 3, 4])
    with pytest.raises(moe_alloc.AllocError, match="above the highest level"):
        moe_alloc.make_plan(probe, ckpt, 4.6, "asal", [2, 3, 4])
    plan = moe_alloc.make_plan(probe, ckpt, moe_study.default_budgets(units, 128, "full")[1], "freq", [2, 3, 4])
    plan["tensors"]["model.layers.9.mlp.experts.0.down_proj.weight"] = 3
    with pytest.raises(moe_alloc.AllocError, match="lacks"):
        moe_alloc.validate_plan(plan, moe_alloc.read_shapes(ckpt))
    with pytest.raises(moe_alloc.AllocError, match="no routed-expert tensors"):
        moe_alloc.expert_units(build_tiny_checkpoint("llama", tmp_path / "dense"))
    assert moe_alloc.main(["--probe", str(tmp_path / "none.json"), "--model", str(ckpt), "--budget", "3",
                           "--strategy", "asal", "--out", str(tmp_path / "p.json")]) == 2


def test_builder_writes_per_expert_bits_into_fused_experts(tmp_path):
    """One expert slice at 4 bits, its neighbour at 2: each equals fake_quant of the source at its bits,
    and the plan's cost equals the footprint of what was built."""
    from transformers import AutoModelForCausalLM

    ckpt = build_tiny_checkpoint("qwen2_moe", tmp_path / "f", expert_layout="fused", dtype=torch.float32)
    units = moe_alloc.expert_units(ckpt)
    model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    builder = moe_study.StudentBuilder(model, 128, "full")
    bits = {k: 3.0 for k in units}
    bits[(0, 0)], bits[(0, 1)] = 4.0, 2.0
    plan = {"format": moe_alloc.FORMAT, "group": 128, "grid": "full",
            "tensors": moe_alloc.plan_tensors(units, bits)}
    assert moe_study.unit_bits(plan, units) == bits
    src = builder.source[0]
    builder.apply(bits)
    exp = builder.experts[0]
    for e, b in ((0, 4.0), (1, 2.0), (2, 3.0)):
        spec = moe_quant.QuantSpec(bits=b, group=128, grid="full")
        assert torch.equal(exp.gate_up_proj[e], moe_quant.fake_quant(src[0][e], spec, -1))
        assert torch.equal(exp.down_proj[e], moe_quant.fake_quant(src[1][e], spec, -1))
    assert not torch.equal(exp.gate_up_proj[0], src[0][0])
    assert len(torch.unique(exp.down_proj[1][0])) <= 4 * exp.down_proj.shape[-1] // 96 + 4  # 2-bit: few levels
    built = sum(footprint.packed_bits(tuple(p[e].shape), -1, moe_quant.QuantSpec(bits=bits[(l, e)], group=128,
                                                                                  grid="full"))
                for l, m in builder.experts.items() for e in range(m.gate_up_proj.shape[0])
                for p in (m.gate_up_proj, m.down_proj))
    params = sum(u.params for u in units.values())
    planned = sum(units[k].bits_at(b, 128, "full") for k, b in bits.items())
    assert math.isclose(built, planned) and built / params > 3.0
    builder.restore()
    assert torch.equal(exp.gate_up_proj, src[0])


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_plan_round_trips_through_quant_save_bits_plan(tmp_path, layout):
    """moe_alloc's plan -> quant_save --bits-plan: the built routed experts cost exactly the plan's effective
    bits (footprint.py on both sides), and each expert slice was quantized at its own planned bits."""
    import quant_save
    from safetensors.torch import load_file

    ckpt = build_tiny_checkpoint("qwen2_moe", tmp_path / "src", expert_layout=layout)
    units = moe_alloc.expert_units(ckpt)
    budget = moe_study.default_budgets(units, 128, "full")[1]
    plan = moe_alloc.make_plan(_fake_probe(units), ckpt, budget, "asal", [2, 3, 4])
    assert plan["experts_per_level"].get("2.0") and plan["experts_per_level"].get("4.0")
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(json.dumps(plan))
    meta = quant_save.build({"model": str(ckpt), "out": str(tmp_path / "out"), "progress": False,
                             "bits_plan": str(plan_path), "grid": "full", "group": 128, "clip_steps": 16,
                             "expert_bits": 3.0, "linear_bits": 4.0})
    experts = meta["footprint"]["roles"]["routed_expert"]
    assert math.isclose(experts["effective_bits"], plan["effective_bits"], rel_tol=1e-12)
    assert sorted(experts["bits"]) == [2.0, 3.0, 4.0]
    src = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        src.update(load_file(str(f)))
    out = {}
    for f in sorted((tmp_path / "out").glob("*.safetensors")):
        out.update(load_file(str(f)))
    bits = moe_study.unit_bits(plan, units)
    for (layer, e), b in bits.items():
        spec = moe_quant.QuantSpec(bits=b, group=128, grid="full")
        for name, shape, axis, fused in units[(layer, e)].parts:
            s = src[name][e] if fused else src[name]
            o = out[name][e] if fused else out[name]
            assert torch.equal(o, moe_quant.fake_quant(s, spec, axis)), (name, e, b)
