"""OPD on calibrated and planned students through the packed store: the grid is read from `_ptq_store/` (no
scale search), a gptq student trains and merges into a NEW store whose dequantized view and GGUF export verify
bit for bit, the footprint is unchanged, a bits-plan student trains on its per-tensor bits, and an awq student
trains and merges through its stored input scale.

Fixture: the tiny random qwen3_moe (SmolLM2 tokenizer) with its routers scaled x1000 (random init leaves them
~1e-6, fp16-subnormal, which a GGUF F16 router cannot hold exactly), built with gptq on Q4_0's grid (full
4-bit, group 32) and emitted as dequant + gguf; scores from a second random model on random rollouts.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def scaled_router_source(src: Path, dst: Path) -> Path:
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            t = load_file(str(f))
            save_file({k: (v * 1000 if k.endswith("mlp.gate.weight") else v).contiguous() for k, v in t.items()},
                      str(dst / f.name), metadata={"format": "pt"})
        elif f.is_file():
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


IDS = torch.tensor([[1, 200, 3000, 45, 9, 777, 12, 5]])


def scored_student(root: Path, source: Path, teacher: Path, build_args: list[str]) -> Path:
    """root/student built from `source` by quant_save `build_args` (calibrated on docs/OPD.md), and root/scores:
    `teacher`'s top-k over 8 random rollouts (the trainer's input)."""
    import opd_score
    import quant_save
    from test_opd_train import write_rollouts

    student = root / "student"
    assert quant_save.main(["--model", str(source), "--out", str(student), *build_args, "--calib-file",
                            str(ROOT / "docs" / "OPD.md"), "--calib-tokens", "1024", "--calib-ctx", "64",
                            "--no-progress"]) == 0
    write_rollouts(root / "rollouts.jsonl", 8, seed=0)
    opd_score.score(opd_score.ScoreConfig(teacher=str(teacher), rollouts=(str(root / "rollouts.jsonl"),),
                                          out=str(root / "scores"), student=str(student), k=8))
    return student


def assert_fixed_grids_give_the_student(student: Path, roles, dtype=torch.bfloat16):
    """Q(W) on each target's grid read from the store is the student's weight, bit for bit (W: the training base);
    returns (root, targets, mods) of the built student."""
    import opd_model
    from transformers import AutoModelForCausalLM

    root, targets, mods = opd_model.build_student(student, None, roles, 4, 8.0, 0, torch.float32)
    want = dict(AutoModelForCausalLM.from_pretrained(str(student), dtype=dtype).named_parameters())
    params = dict(root.lm.named_parameters())
    for t in targets:
        owner, _, attr = t.name.rpartition(".")
        w = params[f"{owner}.parametrizations.{attr}.original"].detach()
        got = mods[t.name].grid.quantize_(w.float().clone()).to(dtype)
        assert torch.equal(got.view(torch.int16), want[t.name].view(torch.int16)), t.name
    return root, targets, mods


def trained_and_merged_logits(student: Path, run: Path, merged: Path, roles):
    """(the training forward with run's adapter, the merged checkpoint, the student) logits on IDS, fp32."""
    import opd_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    root, _, mods = opd_model.build_student(student, None, roles, 4, 8.0, 0, torch.float32)
    ad = load_file(str(run / "adapter.safetensors"))
    with torch.no_grad():
        for name, m in mods.items():
            m.A.copy_(ad[f"{name}::A"])
            m.B.copy_(ad[f"{name}::B"])
        return tuple(m(input_ids=IDS).logits for m in (
            root.lm, AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval(),
            AutoModelForCausalLM.from_pretrained(str(student), dtype=torch.float32).eval()))


@pytest.fixture(scope="module")
def gptq_setup(smollm2_dir, tmp_path_factory):
    import smoke_models

    root = tmp_path_factory.mktemp("opd_store")
    source = scaled_router_source(smoke_models.tiny_moe_dir(smollm2_dir, seed=0, log=lambda m: None), root / "source")
    teacher = smoke_models.tiny_moe_dir(smollm2_dir, seed=1, log=lambda m: None)
    student = scored_student(root, source, teacher, ["--method", "gptq", "--grid", "full", "--group", "32",
                                                     "--expert-bits", "4", "--linear-bits", "4", "--emit", "dequant,gguf"])
    return {"root": root, "source": source, "student": student, "scores": root / "scores"}


def train(s, student, out, steps="3"):
    import opd_train_fsdp

    assert opd_train_fsdp.main(["--student", str(student), "--scores", str(s["scores"]), "--out", str(out),
                                "--steps", steps, "--batch-seqs", "4", "--micro-seqs", "1", "--lr", "5e-2", "--rank", "4",
                                "--alpha", "8", "--lora-roles", "routed_expert,attention", "--no-progress"]) == 0


def test_gptq_student_grid_comes_from_the_store_without_a_scale_search(gptq_setup, monkeypatch):
    import moe_quant
    from transformers import AutoModelForCausalLM

    def no_search(*a, **k):
        raise AssertionError("a scale search ran")

    monkeypatch.setattr(moe_quant, "quantize_tensor", no_search)
    # W = the student's decoded weight, and Q_s(W) on the stored grid is the student, bit for bit
    root, _, _ = assert_fixed_grids_give_the_student(gptq_setup["student"], ("routed_expert", "attention"))
    student = AutoModelForCausalLM.from_pretrained(str(gptq_setup["student"]), dtype=torch.float32)
    with torch.no_grad():
        a = root.lm(input_ids=IDS).logits
        b = student(input_ids=IDS).logits
    assert torch.allclose(a, b, atol=1e-4)


def test_merged_gptq_student_is_a_new_store_that_verifies_and_exports_to_gguf(gptq_setup, tmp_path):
    import merge_adapter
    import ptq_meta

    run, merged = tmp_path / "run", tmp_path / "merged"
    train(gptq_setup, gptq_setup["student"], run)
    rec = merge_adapter.merge(run, merged)
    assert rec["same_footprint"] and rec["tensors"]["changed"] > 0 and rec["tensors"]["copied_from_student"] > 0
    before, after = (ptq_meta.read_meta(d).data for d in (gptq_setup["student"], merged))
    assert after["store"]["effective_bits_quantized"] == before["store"]["effective_bits_quantized"]
    assert after["store"]["bytes"] == before["store"]["bytes"]
    assert after["store"]["files"] != before["store"]["files"]  # new codes
    assert set(after["exports"]) == {"dequant", "gguf"}
    assert after["exports"]["gguf"]["verified"]["ok"] and after["exports"]["dequant"]["verified"]["ok"]
    for export in (merged, merged / "gguf"):
        p = subprocess.run([sys.executable, "-m", "verify_export", str(merged), str(export), "--no-record",
                            "--no-progress"], capture_output=True, text=True, cwd=ROOT / "src" / "quant")
        assert p.returncode == 0 and "OK" in p.stdout + p.stderr, p.stderr[-2000:]
    # the merged model's logits are the training forward's with the trained adapter
    trained, got, stu = trained_and_merged_logits(gptq_setup["student"], run, merged, ("routed_expert", "attention"))
    assert torch.allclose(trained, got, atol=1e-4)
    assert not torch.allclose(stu, got, atol=1e-4)


def test_bits_plan_student_trains_on_its_per_tensor_bits(gptq_setup, tmp_path):
    import opd_grid
    import quant_save

    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"format": "moe-lowbit/bits-plan/1", "strategy": "test", "budget_bits": None,
                                "tensors": {"model.layers.0.mlp.experts.0.up_proj.weight": 4.0,
                                            "model.layers.1.mlp.experts.1.down_proj.weight": 6.0}}))
    student = tmp_path / "planned"
    assert quant_save.main(["--model", str(gptq_setup["source"]), "--out", str(student), "--clip-steps", "4",
                            "--bits-plan", str(plan), "--no-progress"]) == 0
    store = opd_grid.open_student_store(student)
    import lora_quant
    import opd_model

    root, targets, mods = opd_model.build_student(student, gptq_setup["source"], ("routed_expert",), 4, 8.0, 0,
                                                  torch.float32)
    grid = mods["model.layers.0.mlp.experts.gate_up_proj"].grid
    assert isinstance(grid.hi, torch.Tensor) and set(grid.hi.unique().tolist()) == {3.0, 7.0}  # 3-bit and 4-bit slices
    assert store.specs("model.layers.0.mlp.experts.0.up_proj.weight")["model.layers.0.mlp.experts.0.up_proj.weight"]["bits"] == 4.0
    run = tmp_path / "run"
    train(gptq_setup, student, run, steps="2")
    import merge_adapter

    rec = merge_adapter.merge(run, tmp_path / "merged")
    assert rec["same_footprint"] and rec["tensors"]["changed"] > 0
    merged = opd_grid.open_student_store(tmp_path / "merged")
    for key, info in merged.specs("model.layers.1.mlp.experts.1.down_proj.weight").items():
        assert info["bits"] == 6.0  # the plan's bits survive the merge
    assert lora_quant.recipe_from_meta(json.loads((student / "_ptq_meta.json").read_text())).method == "clip"


def test_a_store_less_student_is_refused_in_one_line(gptq_setup, tmp_path):
    import opd_data
    import opd_grid

    old = tmp_path / "old"
    old.mkdir()
    for f in gptq_setup["student"].iterdir():
        if f.is_file():
            (old / f.name).write_bytes(f.read_bytes())
    meta = json.loads((old / "_ptq_meta.json").read_text())
    meta.pop("store")
    (old / "_ptq_meta.json").write_text(json.dumps(meta))
    with pytest.raises(opd_data.OpdInputError, match="no packed store.*rebuild it"):
        opd_grid.open_student_store(old)


@pytest.fixture(scope="module")
def awq_student(gptq_setup):
    """An awq build of the same source (its store holds each matrix's per-input-channel scale, `in_scale`)."""
    import quant_save

    student = gptq_setup["root"] / "awq_student"
    assert quant_save.main(["--model", str(gptq_setup["source"]), "--out", str(student), "--method", "awq",
                            "--grid", "full", "--group", "32", "--expert-bits", "4", "--linear-bits", "4",
                            "--calib-file", str(ROOT / "docs" / "OPD.md"), "--calib-tokens", "1024",
                            "--calib-ctx", "64", "--no-progress"]) == 0
    return student


def test_awq_student_trains_on_its_stored_input_scale(gptq_setup, awq_student):
    """Q_s(W) with the stored scales AND the stored input scale is the awq student bit for bit; a fused gate_up
    keeps one input scale per half (its gate and up were two disk tensors); without the input scale it is not."""
    from transformers import AutoModelForCausalLM

    root, targets, mods = assert_fixed_grids_give_the_student(awq_student, ("routed_expert", "attention"))
    assert all(mods[t.name].grid.in_scale is not None for t in targets)
    assert any(mods[t.name].grid.in_scale.shape[-3] == 2 for t in targets)  # the routed experts' fused gate_up
    t = targets[0]
    grid = mods[t.name].grid
    owner, _, attr = t.name.rpartition(".")
    w = dict(root.lm.named_parameters())[f"{owner}.parametrizations.{attr}.original"].detach()
    want = dict(AutoModelForCausalLM.from_pretrained(str(awq_student), dtype=torch.bfloat16).named_parameters())
    grid.in_scale = None  # the same grid without s: no longer the student
    assert not torch.equal(grid.quantize_(w.float().clone()).to(torch.bfloat16), want[t.name])


def test_merged_awq_student_is_the_training_forward(gptq_setup, awq_student, tmp_path):
    """Train, merge: a new store of the same footprint whose dequantized view verifies, and whose logits are the
    training forward's with the trained adapter (the merge re-rounds onto Q(x * s) / s exactly as training)."""
    import merge_adapter
    from safetensors.torch import load_file

    run, merged = tmp_path / "run", tmp_path / "merged"
    train(gptq_setup, awq_student, run)
    assert "::in_scale" in " ".join(load_file(str(run / "adapter.safetensors")))
    rec = merge_adapter.merge(run, merged)
    assert rec["same_footprint"] and rec["tensors"]["changed"] > 0
    p = subprocess.run([sys.executable, "-m", "verify_export", str(merged), str(merged), "--no-record", "--no-progress"],
                       capture_output=True, text=True, cwd=ROOT / "src" / "quant")
    assert p.returncode == 0 and "OK" in p.stdout + p.stderr, p.stderr[-2000:]
    trained, got, stu = trained_and_merged_logits(awq_student, run, merged, ("routed_expert", "attention"))
    assert torch.allclose(trained, got, atol=1e-4)
    assert not torch.allclose(stu, got, atol=1e-4)


def test_a_recipe_with_role_bits_reads_back():
    """The meta stores role_bits as {role: bits} (gptq_122b.env's embed=8,lm_head=8): the recipe reader accepts it."""
    import ptq_store

    rec = ptq_store.recipe_of({"recipe": {"method": "gptq", "grid": "full", "role_bits": {"embed": 8.0, "lm_head": 8.0}}})
    assert rec.role_bits == (("embed", 8.0), ("lm_head", 8.0)) and rec.calibrated
