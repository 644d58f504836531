"""A student on llama.cpp's K grids (quant_save --grid gguf:K, gptq) through OPD: the fixed grid read from its store
reproduces the student bit for bit (Q3_K routed experts, Q4_K attention, the Q4_0 fallback of a row 256 does not
divide), training moves codes, the merge writes a new store on the same d / sub-scales / sub-mins whose GGUF export
verifies exactly, and a zero adapter merges to the very same codes.

Fixture: a tiny random qwen3_moe (SmolLM2 tokenizer) with hidden 256 and expert width 160, so gate/up rows (256) are
Q3_K and down_proj rows (160) take Q3_K's fallback Q4_0; scores from a second random model on random rollouts.
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_opd_store import assert_fixed_grids_give_the_student, scored_student, trained_and_merged_logits

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
DIMS = dict(hidden_size=256, intermediate_size=256, moe_intermediate_size=160, num_experts=4, num_experts_per_tok=2,
            decoder_sparse_step=1, norm_topk_prob=True, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=64, max_position_embeddings=2048, tie_word_embeddings=False)


def tiny_k_moe(tokenizer_dir: Path, out: Path, seed: int) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    src = json.loads((tokenizer_dir / "config.json").read_text())
    cfg = AutoConfig.for_model("qwen3_moe", vocab_size=int(src["vocab_size"]), bos_token_id=src.get("bos_token_id"),
                               eos_token_id=src.get("eos_token_id"), **DIMS)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(str(out))
    for f in tokenizer_dir.iterdir():
        if f.is_file() and f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copyfile(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def kgrid_setup(smollm2_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("opd_kgrid")
    source, teacher = tiny_k_moe(smollm2_dir, root / "source", 0), tiny_k_moe(smollm2_dir, root / "teacher", 1)
    student = scored_student(root, source, teacher, ["--method", "gptq", "--grid", "gguf:K", "--group", "256",
                                                     "--expert-bits", "3", "--linear-bits", "4", "--emit", "dequant,gguf"])
    return {"root": root, "student": student, "scores": root / "scores"}


ROLES = ("routed_expert", "attention")


def test_k_grid_student_trains_and_merges_onto_the_same_grid_with_a_verified_gguf(kgrid_setup, tmp_path):
    import merge_adapter
    import opd_grid
    import opd_kgrid
    import opd_train_fsdp
    import ptq_meta
    from safetensors.torch import load_file, save_file

    student = kgrid_setup["student"]
    store = opd_grid.open_student_store(student)
    grids = {i["grid"] for n in store.names() for i in store.specs(n).values() if i["kind"] == "quant"}
    assert {"gguf:Q3_K", "gguf:Q4_K", "full"} <= grids  # K types and the fallback's legacy blocks
    # Q(W) on the grid read from the store is the student, bit for bit, on every target
    _, targets, mods = assert_fixed_grids_give_the_student(student, ROLES)
    assert {type(mods[t.name].grid).__name__ for t in targets} == {"KFixedGrid", "FixedGrid"}
    assert isinstance(mods["model.layers.0.mlp.experts.gate_up_proj"].grid, opd_kgrid.KFixedGrid)

    run = tmp_path / "run"
    assert opd_train_fsdp.main(["--student", str(student), "--scores", str(kgrid_setup["scores"]), "--out", str(run),
                                "--steps", "2", "--batch-seqs", "4", "--micro-seqs", "2", "--lr", "5e-2", "--rank", "4",
                                "--alpha", "8", "--lora-roles", ",".join(ROLES), "--no-progress"]) == 0
    rec = merge_adapter.merge(run, tmp_path / "merged")
    assert rec["same_footprint"] and rec["tensors"]["changed"] > 0
    merged_store = opd_grid.open_student_store(tmp_path / "merged")
    k_changed = 0
    for name in store.names():
        for key, (info, parts) in store.entries(name).items():
            if opd_kgrid.entry_type(info) is None:
                continue
            new = merged_store.entries(name)[key][1]
            for p in ("scales", "dmin", "sub_scales", "sub_mins"):  # the grid itself is the student's
                assert (p in parts) == (p in new) and (p not in parts or torch.equal(parts[p], new[p])), (key, p)
            k_changed += int(not torch.equal(parts["codes"], new["codes"]))
    assert k_changed > 0  # codes moved on the K grid, not only on the fallback
    meta = ptq_meta.read_meta(tmp_path / "merged").data
    assert meta["exports"]["gguf"]["verified"]["ok"] and meta["exports"]["dequant"]["verified"]["ok"]
    p = subprocess.run([sys.executable, "-m", "verify_export", str(tmp_path / "merged"), str(tmp_path / "merged" / "gguf"),
                        "--no-record", "--no-progress"], capture_output=True, text=True, cwd=ROOT / "src" / "quant")
    assert p.returncode == 0 and "OK" in p.stdout + p.stderr, p.stderr[-2000:]
    # the merged model's logits are the training forward's with the trained adapter
    trained, got, before = trained_and_merged_logits(student, run, tmp_path / "merged", ROLES)
    ad = load_file(str(run / "adapter.safetensors"))
    assert torch.allclose(trained, got, atol=1e-4) and not torch.allclose(before, got, atol=1e-4)
    assert "model.layers.0.mlp.experts.gate_up_proj::sub_scales" in ad  # the adapter records the fixed K grid
    # a zero adapter: every code stays the student's
    zero_run = tmp_path / "zero_run"
    shutil.copytree(run, zero_run)
    ad = load_file(str(zero_run / "adapter.safetensors"))
    save_file({k: (torch.zeros_like(v) if k.endswith("::B") else v) for k, v in ad.items()}, str(zero_run / "adapter.safetensors"))
    rec0 = merge_adapter.merge(zero_run, tmp_path / "merged0", emit=("dequant",))
    assert rec0["tensors"]["changed"] == 0 and rec0["tensors"]["replaced"] > 0
    assert ptq_meta.read_meta(tmp_path / "merged0").data["store"]["files"] == ptq_meta.read_meta(student).data["store"]["files"]
