"""Tiny random-weight HF checkpoints built from configs, for tests that need a real model on disk.

Every family the quantizer supports gets a config small enough to build, save and load in about a
second, with dims chosen so some contraction axes are NOT multiples of 128 (hidden 160 = 128 + 32,
expert intermediate 96 < 128): tail groups are exercised everywhere.

`build_tiny_checkpoint(model_type, out_dir, **overrides)` writes a checkpoint the way transformers'
`save_pretrained` does (for the qwen2_moe/mixtral-style families that means per-expert 2-D tensors,
because transformers 5 reverse-converts its fused experts on save; gpt_oss and qwen3_5 write fused 3-D),
and can rewrite the experts into the other on-disk layout (`expert_layout="fused"` / `"per_expert"`)
so both forms are covered.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

TINY_VOCAB = 512
_TEXT = dict(hidden_size=160, intermediate_size=200, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=40, vocab_size=TINY_VOCAB, max_position_embeddings=256,
             tie_word_embeddings=False)
_MOE = dict(moe_intermediate_size=96, num_experts=4, num_experts_per_tok=2)
_LINEAR_ATTN = dict(linear_conv_kernel_dim=4, linear_key_head_dim=32, linear_value_head_dim=32,
                    linear_num_key_heads=2, linear_num_value_heads=4, layer_types=["linear_attention", "full_attention"])

# Per model_type: config kwargs on top of _TEXT (None = drop that key; the family has no such field).
TINY_CONFIGS: dict[str, dict] = {
    "llama": {},
    "mistral": {},
    "qwen2": {"head_dim": None},
    "qwen3": {},
    "gemma3_text": {"sliding_window": 64},
    "phi3": {"head_dim": None, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2},
    "qwen3_moe": {**_MOE, "decoder_sparse_step": 1},
    "qwen2_moe": {**_MOE, "shared_expert_intermediate_size": 112, "decoder_sparse_step": 1, "head_dim": None},
    "olmoe": {"num_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 96, "head_dim": None},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 96},
    "deepseek_v3": {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 96,
                    "n_shared_experts": 1, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1,
                    "q_lora_rank": 64, "kv_lora_rank": 48, "qk_rope_head_dim": 16, "qk_nope_head_dim": 24,
                    "v_head_dim": 40, "head_dim": None},
    "deepseek_v2": {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 96,
                    "n_shared_experts": 1, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1,
                    "q_lora_rank": 64, "kv_lora_rank": 48, "qk_rope_head_dim": 16, "qk_nope_head_dim": 24,
                    "v_head_dim": 40, "head_dim": None},
    "gpt_oss": {"num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 96, "head_dim": 40,
                "sliding_window": 64, "layer_types": ["sliding_attention", "full_attention"]},
    "qwen3_next": {**_MOE, **_LINEAR_ATTN, "shared_expert_intermediate_size": 112, "decoder_sparse_step": 1},
    "qwen3_5_text": {**_LINEAR_ATTN},
    "qwen3_5_moe_text": {**_MOE, **_LINEAR_ATTN, "shared_expert_intermediate_size": 112},
}
_VISION = dict(depth=1, hidden_size=64, intermediate_size=96, num_heads=2, patch_size=8, spatial_merge_size=2,
               temporal_patch_size=2, out_hidden_size=160, num_position_embeddings=64)
# Multimodal wrappers: model_type -> (text model_type, class name); vision config from _VISION.
MULTIMODAL = {
    "qwen3_5_moe": ("qwen3_5_moe_text", "Qwen3_5MoeForConditionalGeneration"),
    "qwen3_5": ("qwen3_5_text", "Qwen3_5ForConditionalGeneration"),
}
TINY_FAMILIES = tuple(TINY_CONFIGS) + tuple(MULTIMODAL)

# Per-expert 2-D names <-> fused 3-D names (fused [E, out, in]: gate_up = cat(gate, up) along out).
_PER_EXPERT = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<idx>\d+)\.(?P<proj>gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$")
_FUSED = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<proj>gate_up_proj|down_proj)$")
_GATE_UP_NAMES = {"gate_proj": ("gate", "up"), "up_proj": ("gate", "up"), "w1": ("gate", "up"), "w3": ("gate", "up")}


def tiny_config(model_type: str, **overrides):
    """The transformers config object for a tiny `model_type` (overrides go to the text config)."""
    from transformers import AutoConfig

    if model_type in MULTIMODAL:
        text_type, _ = MULTIMODAL[model_type]
        text = _text_kwargs(text_type, overrides)
        return AutoConfig.for_model(model_type, text_config={"model_type": text_type, **text},
                                    vision_config=dict(_VISION), tie_word_embeddings=False)
    return AutoConfig.for_model(model_type, **_text_kwargs(model_type, overrides))


def _text_kwargs(model_type: str, overrides: dict) -> dict:
    if model_type not in TINY_CONFIGS:
        raise ValueError(f"no tiny config for model_type {model_type!r}; known: {sorted(TINY_FAMILIES)}")
    merged = {**_TEXT, **TINY_CONFIGS[model_type], **overrides}
    return {k: v for k, v in merged.items() if v is not None}


def tiny_model(model_type: str, seed: int = 0, dtype: torch.dtype = torch.bfloat16, **overrides):
    """A randomly initialised tiny model (deterministic for a given seed)."""
    import transformers

    config = tiny_config(model_type, **overrides)
    torch.manual_seed(seed)
    if model_type in MULTIMODAL:
        model = getattr(transformers, MULTIMODAL[model_type][1])._from_config(config, dtype=dtype)
    else:
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    _perturb_protected(model, seed)
    return model.eval()


def _perturb_protected(model, seed: int) -> None:
    """Norm weights init to 0/1 constants; randomise them so a bit-identity check means something."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and p.is_floating_point():
                p.add_(0.05 * torch.randn(p.shape, generator=gen).to(p.dtype))


def build_tiny_checkpoint(model_type: str, out_dir, *, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                          max_shard_size: str | int | None = None, expert_layout: str = "native",
                          tokenizer_dir=None, byte_tokenizer: bool = False, **overrides) -> Path:
    """Write a tiny random `model_type` checkpoint to `out_dir` and return its path.

    expert_layout: "native" (what save_pretrained writes), "fused" ([E, out, in] 3-D experts) or
    "per_expert" (`experts.N.{gate,up,down}_proj.weight` 2-D). tokenizer_dir: copy its tokenizer /
    chat-template files in (its vocab must fit `vocab_size`, pass vocab_size= to match).
    byte_tokenizer: write a 258-token byte-level tokenizer (fits TINY_VOCAB), for tests that tokenize text.
    """
    if expert_layout not in ("native", "fused", "per_expert"):
        raise ValueError(f"expert_layout must be native|fused|per_expert, got {expert_layout!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = tiny_model(model_type, seed=seed, dtype=dtype, **overrides)
    model.save_pretrained(out, max_shard_size=max_shard_size or "5GB")
    if expert_layout != "native":
        state = _read_checkpoint(out)
        state = fuse_experts(state) if expert_layout == "fused" else split_experts(state)
        write_checkpoint(state, out, max_shard_bytes=_parse_size(max_shard_size))
    if byte_tokenizer:
        write_byte_tokenizer(out)
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            if f.is_file() and (f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template",
                                                   "added_tokens"))):
                shutil.copy2(f, out / f.name)
    return out


def write_byte_tokenizer(out: Path) -> None:
    """A byte-level tokenizer: ids 0..255 are the bytes, 256 <s>, 257 </s> (no merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab.update({"<s>": 256, "</s>": 257})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(Path(out) / "tokenizer.json"))
    (Path(out) / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}))


def _parse_size(size) -> int | None:
    if size is None or isinstance(size, int):
        return size
    m = re.fullmatch(r"(\d+)\s*(KB|MB|GB|B)", str(size).upper())
    if not m:
        raise ValueError(f"max_shard_size must look like '300KB', got {size!r}")
    return int(m.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[m.group(2)]


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(f))
    return state


def fuse_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert 2-D -> fused 3-D: gate_up_proj [E, 2I, H] = cat(gate, up) on dim 1; down_proj [E, H, I]."""
    groups: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    out = {}
    for name, t in state.items():
        m = _PER_EXPERT.match(name)
        if not m:
            out[name] = t
            continue
        kind = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up"}.get(m["proj"], "down")
        groups.setdefault(m["prefix"], {}).setdefault(kind, {})[int(m["idx"])] = t
    for prefix, kinds in groups.items():
        stack = {k: torch.stack([v[i] for i in sorted(v)]) for k, v in kinds.items()}
        out[f"{prefix}.gate_up_proj"] = torch.cat([stack["gate"], stack["up"]], dim=1).contiguous()
        out[f"{prefix}.down_proj"] = stack["down"].contiguous()
    return out


def split_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fused 3-D [E, out, in] -> per-expert 2-D `experts.N.{gate,up,down}_proj.weight`."""
    out = {}
    for name, t in state.items():
        m = _FUSED.match(name)
        if not m or t.ndim != 3:
            out[name] = t
            continue
        for e in range(t.shape[0]):
            if m["proj"] == "down_proj":
                out[f"{m['prefix']}.{e}.down_proj.weight"] = t[e].clone()
            else:
                gate, up = t[e].chunk(2, dim=0)
                out[f"{m['prefix']}.{e}.gate_proj.weight"] = gate.clone()
                out[f"{m['prefix']}.{e}.up_proj.weight"] = up.clone()
    return out


def write_checkpoint(state: dict[str, torch.Tensor], out: Path, max_shard_bytes: int | None = None) -> None:
    """Replace the safetensors files in `out` with `state`, sharded greedily in name order."""
    from safetensors.torch import save_file

    for f in list(out.glob("*.safetensors")) + list(out.glob("model.safetensors.index.json")):
        f.unlink()
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(state):
        nbytes = state[name].numel() * state[name].element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = state[name]
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], out / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True))
