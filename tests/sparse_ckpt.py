"""A Qwen3.5-122B-A10B-shaped checkpoint made of sparse files: real headers, zero data, ~0 bytes on disk.

Sizing and preflight are judged at the real model's scale, and nobody can download 245 GB to test a dry
run. This writes what the hub repository looks like to every tool that reads headers only (ckpt_source,
build_plan, sizing): a `qwen3_5_moe` config.json with the real dims, ~5 GB safetensors shards whose headers
list every tensor with its real name, shape and dtype, and a model.safetensors.index.json. The data
section of each shard is a hole (`truncate`), so `ls -l` shows ~250 GB and `du` shows a few MB. Reading a
weight returns zeros; the tools under test must refuse or plan *before* they read one.

Dims: hidden 3072, 48 layers (a full-attention layer every 4th, Gated DeltaNet in the others: 16 key /
64 value heads of 128, conv kernel 4), 256 routed experts of 1024 stored per expert
(`experts.N.{gate,up,down}_proj.weight`, as on the hub), a 1024 shared expert with its gate, 32 query /
2 KV heads of 256 with the output gate (q_proj is 2 x 32 x 256 rows), vocab 248320 with an untied lm_head,
one MTP layer, and the 27-block vision tower (hidden 1152). Names follow the tiny `qwen3_5_moe` that
transformers 5.17 saves (tests/tiny_models.py; test_sizing checks the two agree).

    python tests/sparse_ckpt.py OUT_DIR [--layers 48]
"""
from __future__ import annotations

import argparse
import json
import math
import struct
import sys
from pathlib import Path

QWEN35_122B = dict(hidden_size=3072, num_hidden_layers=48, num_experts=256, num_experts_per_tok=8,
                   moe_intermediate_size=1024, shared_expert_intermediate_size=1024, vocab_size=248320,
                   num_attention_heads=32, num_key_value_heads=2, head_dim=256, linear_num_key_heads=16,
                   linear_num_value_heads=64, linear_key_head_dim=128, linear_value_head_dim=128,
                   linear_conv_kernel_dim=4, full_attention_interval=4, mtp_num_hidden_layers=1)
VISION_122B = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16,
                   temporal_patch_size=2, in_channels=3, spatial_merge_size=2, out_hidden_size=3072,
                   num_position_embeddings=2304)
SHARD_BYTES = 5 * 10**9
DTYPE_BYTES = {"BF16": 2, "F32": 4}


def layer_types(n_layers: int, interval: int) -> list[str]:
    return ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(n_layers)]


def decoder_layer(prefix: str, kind: str, c: dict) -> list[tuple[str, tuple, str]]:
    """(name, shape, dtype) of one decoder layer, in the hub's naming."""
    h, e_inter, s_inter = c["hidden_size"], c["moe_intermediate_size"], c["shared_expert_intermediate_size"]
    out = [(f"{prefix}.input_layernorm.weight", (h,), "BF16"), (f"{prefix}.post_attention_layernorm.weight", (h,), "BF16")]
    if kind == "linear_attention":
        kd = c["linear_num_key_heads"] * c["linear_key_head_dim"]
        vd = c["linear_num_value_heads"] * c["linear_value_head_dim"]
        nv = c["linear_num_value_heads"]
        la = f"{prefix}.linear_attn"
        out += [(f"{la}.in_proj_qkv.weight", (2 * kd + vd, h), "BF16"), (f"{la}.in_proj_z.weight", (vd, h), "BF16"),
                (f"{la}.in_proj_a.weight", (nv, h), "BF16"), (f"{la}.in_proj_b.weight", (nv, h), "BF16"),
                (f"{la}.conv1d.weight", (2 * kd + vd, 1, c["linear_conv_kernel_dim"]), "BF16"),
                (f"{la}.A_log", (nv,), "F32"), (f"{la}.dt_bias", (nv,), "BF16"),
                (f"{la}.norm.weight", (c["linear_value_head_dim"],), "F32"), (f"{la}.out_proj.weight", (h, vd), "BF16")]
    else:
        hd, nq, nkv = c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"]
        sa = f"{prefix}.self_attn"
        out += [(f"{sa}.q_proj.weight", (2 * nq * hd, h), "BF16"), (f"{sa}.k_proj.weight", (nkv * hd, h), "BF16"),
                (f"{sa}.v_proj.weight", (nkv * hd, h), "BF16"), (f"{sa}.o_proj.weight", (h, nq * hd), "BF16"),
                (f"{sa}.q_norm.weight", (hd,), "BF16"), (f"{sa}.k_norm.weight", (hd,), "BF16")]
    mlp = f"{prefix}.mlp"
    out += [(f"{mlp}.gate.weight", (c["num_experts"], h), "BF16"), (f"{mlp}.shared_expert_gate.weight", (1, h), "BF16")]
    for proj, shape in (("gate_proj", (s_inter, h)), ("up_proj", (s_inter, h)), ("down_proj", (h, s_inter))):
        out.append((f"{mlp}.shared_expert.{proj}.weight", shape, "BF16"))
    for e in range(c["num_experts"]):
        for proj, shape in (("gate_proj", (e_inter, h)), ("up_proj", (e_inter, h)), ("down_proj", (h, e_inter))):
            out.append((f"{mlp}.experts.{e}.{proj}.weight", shape, "BF16"))
    return out


def vision_tensors(v: dict) -> list[tuple[str, tuple, str]]:
    h, inter, merged = v["hidden_size"], v["intermediate_size"], v["hidden_size"] * v["spatial_merge_size"] ** 2
    out = [("model.visual.patch_embed.proj.weight", (h, v["in_channels"], v["temporal_patch_size"], v["patch_size"],
                                                     v["patch_size"]), "BF16"),
           ("model.visual.patch_embed.proj.bias", (h,), "BF16"), ("model.visual.pos_embed.weight",
                                                                  (v["num_position_embeddings"], h), "BF16")]
    for b in range(v["depth"]):
        p = f"model.visual.blocks.{b}"
        for name, shape in (("attn.qkv", (3 * h, h)), ("attn.proj", (h, h)), ("mlp.linear_fc1", (inter, h)),
                            ("mlp.linear_fc2", (h, inter)), ("norm1", None), ("norm2", None)):
            rows = shape[0] if shape else h
            if shape:
                out.append((f"{p}.{name}.weight", shape, "BF16"))
            else:
                out.append((f"{p}.{name}.weight", (h,), "BF16"))
            out.append((f"{p}.{name}.bias", (rows,), "BF16"))
    out += [("model.visual.merger.norm.weight", (h,), "BF16"), ("model.visual.merger.norm.bias", (h,), "BF16"),
            ("model.visual.merger.linear_fc1.weight", (merged, merged), "BF16"),
            ("model.visual.merger.linear_fc1.bias", (merged,), "BF16"),
            ("model.visual.merger.linear_fc2.weight", (v["out_hidden_size"], merged), "BF16"),
            ("model.visual.merger.linear_fc2.bias", (v["out_hidden_size"],), "BF16")]
    return out


def tensor_table(text: dict, vision: dict | None) -> list[tuple[str, tuple, str]]:
    """Every tensor of the checkpoint in hub order (embed, layers, norm, lm_head, mtp, vision)."""
    h, lm = text["hidden_size"], "model.language_model"
    kinds = text["layer_types"]
    out = [(f"{lm}.embed_tokens.weight", (text["vocab_size"], h), "BF16")]
    for i, kind in enumerate(kinds):
        out += decoder_layer(f"{lm}.layers.{i}", kind, text)
    out += [(f"{lm}.norm.weight", (h,), "BF16"), ("lm_head.weight", (text["vocab_size"], h), "BF16")]
    for m in range(text.get("mtp_num_hidden_layers", 0)):
        out += [("mtp.fc.weight", (h, 2 * h), "BF16"), ("mtp.pre_fc_norm_embedding.weight", (h,), "BF16"),
                ("mtp.pre_fc_norm_hidden.weight", (h,), "BF16"), ("mtp.norm.weight", (h,), "BF16")]
        out += decoder_layer(f"mtp.layers.{m}", "full_attention", text)
    if vision is not None:
        out += vision_tensors(vision)
    return out


def config_json(text: dict, vision: dict | None) -> dict:
    text_cfg = {"model_type": "qwen3_5_moe_text", "hidden_act": "silu", "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                "max_position_embeddings": 262144, "partial_rotary_factor": 0.25, "attn_output_gate": True, **text}
    cfg = {"architectures": ["Qwen3_5MoeForConditionalGeneration"], "model_type": "qwen3_5_moe",
           "tie_word_embeddings": False, "text_config": text_cfg}
    if vision is not None:
        cfg["vision_config"] = {"model_type": "qwen3_5_moe_vision", "hidden_act": "gelu_pytorch_tanh", **vision}
    return cfg


def write_sparse_checkpoint(out_dir, *, layers: int = 48, experts: int | None = None, vision: bool = True,
                            shard_bytes: int = SHARD_BYTES) -> Path:
    """Write the sparse checkpoint; returns its directory. `layers`/`experts` shrink it for quick tests."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = {**QWEN35_122B, "num_hidden_layers": layers}
    if experts is not None:
        text["num_experts"] = experts
    text["layer_types"] = layer_types(layers, text["full_attention_interval"])
    vis = dict(VISION_122B) if vision else None
    table = tensor_table(text, vis)
    shards: list[list] = [[]]
    size = 0
    for name, shape, dtype in table:
        nbytes = math.prod(shape) * DTYPE_BYTES[dtype]
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape, dtype, nbytes))
        size += nbytes
    weight_map, total = {}, 0
    for i, rows in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        header, pos = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, dtype, nbytes in rows:
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
            pos += nbytes
            weight_map[name] = fname
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
        with open(out / fname, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(8 + len(raw) + pos)  # the data: a hole, read back as zeros
        total += pos
    (out / "config.json").write_text(json.dumps(config_json(text, vis), indent=2))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}, indent=1))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="directory to write (sparse files: ~250 GB apparent, a few MB on disk)")
    ap.add_argument("--layers", type=int, default=48, help="decoder layers (default 48, the real model)")
    ap.add_argument("--experts", type=int, default=None, help="routed experts per layer (default 256)")
    ap.add_argument("--no-vision", action="store_true", help="leave out the vision tower")
    a = ap.parse_args(argv)
    out = write_sparse_checkpoint(a.out, layers=a.layers, experts=a.experts, vision=not a.no_vision)
    apparent = sum(p.stat().st_size for p in out.iterdir())
    on_disk = sum(p.stat().st_blocks * 512 for p in out.iterdir())
    print(f"{out}: {apparent / 1e9:.1f} GB apparent, {on_disk / 1e6:.1f} MB on disk")
    return 0


if __name__ == "__main__":
    sys.exit(main())
