"""Routed experts in our GGUF (gguf_experts.py): llama.cpp's converter stacks each layer's experts into one
`blk.N.ffn_{gate,up,down}_exps` tensor; the export writes it from the store's per-expert entries, the verifier
checks every expert against the store, and a one-element corruption in one expert's block is named.

Two real layouts: embedded:smollm2-moe (qwen2_moe, per-expert disk tensors, Q4_0 grid) and a tiny qwen3_5_moe
whose experts are fused on disk ([E, 2I, H] gate_up_proj, split by the converter into gate and up; K-quants).
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import gguf_fixtures as gf
import ptq_store
import quant_save

ROOT = Path(__file__).resolve().parents[1]
VERIFY = ROOT / "src" / "quant" / "verify_export.py"
ODD = "model.layers.0.mlp.experts.3.gate_proj.weight"  # the bits plan gives this one expert 8 bits (Q8_0)


@pytest.fixture(scope="module")
def moe_q4_0(tmp_path_factory):
    import embedded_model

    gf.llama_cpp_prefix()
    root = tmp_path_factory.mktemp("gguf_moe")
    plan = root / "plan.json"
    plan.write_text(json.dumps({"format": "moe-lowbit/bits-plan/1", "strategy": "test", "tensors": {ODD: 8}}))
    out = root / "q4_0"
    meta = quant_save.build({"model": str(embedded_model.smollm2_moe_dir()), "out": str(out), "progress": False,
                             "expert_bits": 4.0, "linear_bits": 4.0, "grid": "full", "group": 32,
                             "bits_plan": str(plan), "emit": "gguf"})
    return out, meta


def _map(out: Path) -> dict:
    return json.loads((out / "gguf" / "model.gguf.map.json").read_text())


def test_stacked_experts_are_written_from_the_store_and_every_expert_verified(moe_q4_0):
    out, meta = moe_q4_0
    ver = meta["exports"]["gguf"]["verified"]
    assert ver["ok"] and ver["tensors_checked"] == ver["tensors_in_store"] == meta["source"]["tensors"]
    tmap = _map(out)
    exps = {g: r for g, r in tmap.items() if "_exps" in g}
    assert len(exps) == 30 * 3
    q4 = {g: r for g, r in exps.items() if r["type"] == "Q4_0"}
    assert len(q4) == 89  # all but the stack holding the one 8-bit expert
    store = ptq_store.open_store(out)
    experts = sorted(n for n in store.names() if ".mlp.experts." in n)
    sources = sorted(ref["store"] for r in exps.values() for ref in r["experts"])
    assert sources == experts  # every expert of every stack, once, from the store
    down = exps["blk.7.ffn_down_exps.weight"]["experts"]
    assert [ref["store"] for ref in down] == [f"model.layers.7.mlp.experts.{e}.down_proj.weight" for e in range(8)]


def test_a_stack_whose_experts_differ_in_type_stays_bf16_with_the_types_named(moe_q4_0):
    out, _ = moe_q4_0
    rec = _map(out)["blk.0.ffn_gate_exps.weight"]
    assert rec["type"] == "BF16"
    assert "Q8_0: experts [3]" in rec["dense_because"] and "Q4_0: experts [0, 1, 2, 4, 5, 6, 7]" in rec["dense_because"]
    assert [ref["store"] for ref in rec["experts"]][3] == ODD  # still held to the store by the verifier (BF16 exact)


def test_llama_cpp_runs_the_moe_export(moe_q4_0, tmp_path):
    out, _ = moe_q4_0
    r = gf.llama_perplexity_runs(out / "gguf" / "model.gguf", tmp_path)
    assert r.returncode == 0 and "Final estimate: PPL" in r.stdout + r.stderr, (r.stdout + r.stderr)[-2000:]


def test_one_corrupted_element_of_one_expert_is_named(moe_q4_0, tmp_path):
    out, _ = moe_q4_0
    row_bytes = 128 // 32 * 18  # ffn_down: K = 128, Q4_0 blocks of 32 weights in 18 bytes
    # expert 5, row 0, first block, byte 2: the nibble of weight 0
    copy = gf.corrupt_copy(out / "gguf", tmp_path / "gguf", "blk.7.ffn_down_exps.weight", 5 * 576 * row_bytes + 2,
                         lambda b: (b & 0xF0) | ((b + 1) & 0x0F))
    r = subprocess.run([sys.executable, str(VERIFY), str(out), str(copy), "--no-progress", "--no-record"],
                       capture_output=True, text=True)
    assert r.returncode == 1, r.stderr
    assert "model.layers.7.mlp.experts.5.down_proj.weight" in r.stderr and "1 element(s) differ" in r.stderr, r.stderr
    assert "first at [0, 0]" in r.stderr, r.stderr


# ---------------------------------------------------- fused disk experts (Qwen3.5 layout), K-quants, bits plan
@pytest.fixture(scope="module")
def fused_k(smollm2_dir, tmp_path_factory):
    import tiny_models

    gf.llama_cpp_prefix()
    root = tmp_path_factory.mktemp("gguf_fused")
    src = gf.build_tiny_qwen35_moe(root / "src", smollm2_dir)
    state = {k: v for f in sorted(src.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    tiny_models.write_checkpoint(tiny_models.fuse_experts(state), src)  # Qwen3.5's own disk layout
    gate_up = "model.language_model.layers.0.mlp.experts.gate_up_proj"
    down1 = "model.language_model.layers.1.mlp.experts.down_proj"
    plan = root / "plan.json"  # per-expert bits for layer 1's down_proj: stored as `#E` entries, mixed types
    plan.write_text(json.dumps({"format": "moe-lowbit/bits-plan/1", "strategy": "test",
                                "tensors": {down1: [3, 3, 4, 3]}}))
    out = root / "q"
    meta = quant_save.build({"model": str(src), "out": str(out), "progress": False, "grid": "gguf:K", "group": 256,
                             "expert_bits": 3.0, "linear_bits": 4.0, "bits_plan": str(plan), "emit": "gguf"})
    return out, meta, gate_up, down1


def test_fused_experts_are_split_into_gate_and_up_and_verified(fused_k):
    out, meta, gate_up, down1 = fused_k
    store = ptq_store.open_store(out)
    assert list(store.specs(gate_up)) == [gate_up] and store.specs(gate_up)[gate_up]["shape"] == [4, 512, 256]
    assert sorted(store.specs(down1)) == [f"{down1}#{e}" for e in range(4)]  # the plan's per-expert entries
    tmap = _map(out)
    gate, up = tmap["blk.0.ffn_gate_exps.weight"], tmap["blk.0.ffn_up_exps.weight"]
    assert gate["type"] == up["type"] == "Q3_K"
    assert [(r["store"], r["lead"], r["row_range"]) for r in gate["experts"]] == [(gate_up, e, [0, 256]) for e in range(4)]
    assert [r["row_range"] for r in up["experts"]] == [[256, 512]] * 4
    assert tmap["blk.0.ffn_down_exps.weight"]["type"] == "Q3_K"
    mixed = tmap["blk.1.ffn_down_exps.weight"]
    assert mixed["type"] == "BF16" and "Q4_K: experts [2]" in mixed["dense_because"]
    assert [r["lead"] for r in mixed["experts"]] == [0, 1, 2, 3]
    checked = {n for n in store.names() if ".mlp.experts." in n}
    assert checked <= {r["store"] for rec in tmap.values() for r in rec.get("experts") or ()}
    assert meta["exports"]["gguf"]["verified"]["ok"]


def test_one_corrupted_code_in_a_fused_expert_is_named(fused_k, tmp_path):
    out, _, gate_up, _ = fused_k
    row_bytes = 110  # Q3_K: one 256-block per row (K = 256)
    # up half, expert 2, row 0: qs byte 0 holds the low two bits of weight 0 (Q3_K: hmask[32], then qs[64])
    copy = gf.corrupt_copy(out / "gguf", tmp_path / "gguf", "blk.0.ffn_up_exps.weight", 2 * 256 * row_bytes + 32,
                         lambda b: b ^ 0x01)
    r = subprocess.run([sys.executable, str(VERIFY), str(out), str(copy), "--no-progress", "--no-record"],
                       capture_output=True, text=True)
    assert r.returncode == 1, r.stderr
    assert gate_up in r.stderr and "element(s) differ" in r.stderr and "first at [2, 256, 0]" in r.stderr, r.stderr


def test_byte_slice_is_slice_leading_without_the_unpack(fused_k):
    """A [E, R, K] entry's expert i as a byte range of its bitstreams: the same parts as store_pack's unpacking
    slicer (which is E^2 work over a 256-expert stack), and None where a slice does not fill whole bytes."""
    import gguf_experts
    import store_pack

    out, _, gate_up, _ = fused_k
    (info, parts), = ptq_store.open_store(out).entries(gate_up).values()
    for i in range(info["shape"][0]):
        fast_info, fast = gguf_experts.byte_slice(info, parts, i)
        ref_info, ref = store_pack.slice_leading(info, parts, i)
        assert fast_info == ref_info and sorted(fast) == sorted(ref)
        assert all(torch.equal(fast[k], ref[k]) for k in ref), i
    # 2 experts of 1 x 5 three-bit codes: 15 bits each, 30 in all = 4 bytes, an even split that is still not a
    # byte range per expert (expert 1 starts at bit 15): only the bit count can tell
    odd = {**info, "shape": [2, 1, 5], "width": 3}
    assert gguf_experts.byte_slice(odd, {"codes": torch.zeros(4, dtype=torch.uint8),
                                         "scales": torch.ones(2, 1, 1, dtype=torch.float16)}, 0) is None
    aligned = {**info, "shape": [2, 1, 8], "width": 3}  # 24 bits each: whole bytes
    assert gguf_experts.byte_slice(aligned, {"codes": torch.zeros(6, dtype=torch.uint8),
                                             "scales": torch.ones(2, 1, 1, dtype=torch.float16)}, 1) is not None
