"""The OPD memory model on the 122B (Qwen3.5-122B-A10B) built on the meta device, and the dry run's contract."""
import os
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

import opd_memory
from model_adapters import Recipe

ROOT = Path(__file__).resolve().parents[1]
QWEN35_122B = {"model_type": "qwen3_5_moe_text", "hidden_size": 3072, "num_hidden_layers": 48, "num_experts": 256,
               "moe_intermediate_size": 1024, "shared_expert_intermediate_size": 1024, "vocab_size": 248320,
               "num_attention_heads": 32, "num_key_value_heads": 2, "head_dim": 256, "num_experts_per_tok": 8,
               "full_attention_interval": 4}


def shipped_env() -> dict:
    """configs/opd.env's values, as distill.sh sources them (a clean environment)."""
    out = subprocess.run(["bash", "-c", f"set -a; source {ROOT / 'configs/opd.env'}; env"], capture_output=True,
                         text=True, env={"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}, check=True)
    return dict(line.split("=", 1) for line in out.stdout.splitlines() if line.startswith("OPD_"))


@pytest.fixture(scope="module")
def inv_122b():
    env = shipped_env()
    recipe = Recipe(expert_bits=float(env["OPD_EXPERT_BITS"]), linear_bits=float(env["OPD_LINEAR_BITS"]),
                    group=int(env["OPD_GROUP"]))
    return opd_memory.inventory_from_config(QWEN35_122B, tuple(env["OPD_LORA_ROLES"].split(",")), recipe,
                                            int(env["OPD_RANK"])), env


def test_122b_inventory_is_the_real_model(inv_122b):
    inv, _ = inv_122b
    assert 115e9 < inv.total < 130e9  # the 122B, counted by transformers on the meta device
    assert inv.n_layers == 48 and inv.vocab == 248320 and inv.hidden == 3072
    assert len(inv.target_numels) == 96  # gate_up + down of routed experts, 48 layers
    assert inv.largest_expert == 2048 * 3072


def test_shipped_opd_env_fits_4x80gb_on_the_122b(inv_122b):
    inv, env = inv_122b
    o = opd_memory.Options(world=4, tp=4, gpu_gib=80.0,
                           micro_tokens=int(env["OPD_MICRO_SEQS"]) * (int(env["OPD_MAX_NEW_TOKENS"]) + 1024))
    steps = opd_memory.plan(inv, o)
    assert steps["gen-student"]["fits"] and steps["score"]["fits"], opd_memory.format_plan(steps, o)
    if not steps["train"]["fits"]:  # the 122B's frozen shard (56 GiB) + replicated grid + gathered units: ~85 GiB
        fix = opd_memory.suggest(inv, o)
        assert fix == "--cpu-offload", opd_memory.format_plan(steps, o)
        assert opd_memory.plan(inv, replace(o, cpu_offload=True))["train"]["fits"]
    # and the model is not vacuous: replicated frozen weights (245 GB BF16) do not fit one card
    bad = replace(o, shard_frozen=False)
    assert not opd_memory.plan(inv, bad)["train"]["fits"]
    assert bad.shard_frozen is False and opd_memory.plan(inv, bad)["train"]["frozen_weights"] > 200
    # without activation checkpointing 48 layers' working sets at 32k tokens do not fit either
    assert not opd_memory.plan(inv, replace(o, checkpoint_layers=False, micro_tokens=32768))["train"]["fits"]


def _distill(env_extra: dict, *args):
    env = {**os.environ, **shipped_env(), **env_extra,
           "PYTHONPATH": os.pathsep.join(str(ROOT / d) for d in ("src/quant", "src/eval", "src/distill"))}
    return subprocess.run(["python", "-m", "distill_run", *args], cwd=ROOT, env=env, capture_output=True, text=True)


def test_dry_run_prints_every_steps_peak_for_the_122b_on_4x80gb(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps(QWEN35_122B))
    out = _distill({"OPD_TEACHER": str(tmp_path), "OPD_STUDENT": "", "OPD_DEVICE": "cuda", "OPD_NPROC": "4",
                    "OPD_BATCH_SEQS": "8", "OPD_TENSOR_PARALLEL_SIZE": "4"}, "--dry-run")
    assert out.returncode == 0, out.stderr[-2000:]
    for step in ("gen-student", "score", "train", "merge"):
        assert f"  {step} " in out.stdout
    assert "4 ranks x 80 GiB" in out.stdout and "48 layers, vocab 248320" in out.stdout
    assert "training fits" in out.stdout or "try --cpu-offload" in out.stdout
    with_offload = _distill({"OPD_TEACHER": str(tmp_path), "OPD_STUDENT": "", "OPD_DEVICE": "cuda", "OPD_NPROC": "4",
                             "OPD_BATCH_SEQS": "8", "OPD_CPU_OFFLOAD": "1"}, "--dry-run")
    assert "training fits" in with_offload.stdout, with_offload.stdout


def test_every_bad_value_is_named_in_one_error_before_step_1():
    out = _distill({"OPD_LOSS": "kl", "OPD_RANK": "0", "OPD_NPROC": "3", "OPD_ENGINE_ARG": "oops",
                    "OPD_PROMPTS": "no/such.jsonl", "OPD_LR": "fast"}, "--dry-run")
    assert out.returncode == 2
    err = out.stderr.strip().splitlines()[-1]
    for name in ("OPD_LOSS", "OPD_RANK", "OPD_BATCH_SEQS", "OPD_ENGINE_ARG", "OPD_PROMPTS", "OPD_LR"):
        assert name in err, err


def test_a_k_grid_students_grid_is_counted_as_kfixedgrid_holds_it():
    # gguf:K at the 122B: routed experts Q3_K (rows 3072 and 1024: 256 divides both), held as fp32 d per 256
    # weights + int8 sub-scales per 16 (20 B per super-block), not fp32 scales per sub-block (128 B)
    recipe = Recipe(expert_bits=3.0, linear_bits=4.0, group=256, grid="gguf:K")
    inv = opd_memory.inventory_from_config(QWEN35_122B, ("routed_expert",), recipe, 8)
    assert inv.grid_bytes == sum(inv.target_numels) // 256 * 20
    flat = Recipe(expert_bits=3.0, linear_bits=4.0, group=128)
    inv_flat = opd_memory.inventory_from_config(QWEN35_122B, ("routed_expert",), flat, 8)
    o = opd_memory.Options(world=4)
    k_gib, flat_gib = (opd_memory.train_peak(i, o)["grid"] for i in (inv, inv_flat))
    assert k_gib <= flat_gib, (k_gib, flat_gib)  # no more than g128's fp32 scale + divisor (test_opd_kgrid: held bytes)
    assert k_gib * 6 < sum(inv.target_numels) / 16 * 8 / 2**30  # fp32 S and divisor per sub-block: ~54 GiB
