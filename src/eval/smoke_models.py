"""The offline MoE for the MoE smoke: a tiny qwen3_moe with RANDOM weights and the SmolLM2 tokenizer.

Why it exists: an offline box has no MoE checkpoint, yet the expert path (routed-expert roles, 3-bit
experts, the fused/per-expert layouts) and vLLM's qwen3_moe loader must still be exercised. Random
weights make every accuracy meaningless: only the plumbing is being tested, and every caller says so.

The checkpoint is cached like the embedded model: written to a temp dir, a manifest of per-file sha256
added, then renamed; a reuse is trusted only if the manifest still matches (else rebuilt, with a note).

    python src/eval/smoke_models.py --tokenizer DIR [--cache DIR] [--seed 0]   # prints the checkpoint dir
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import cache_paths
import provenance
import verified_cache

FORMAT_VERSION = 1  # bump when the architecture below changes
TOKENIZER_PREFIXES = ("tokenizer", "special_tokens", "vocab", "merges", "chat_template", "added_tokens")


class SmokeModelError(RuntimeError):
    """A clear, user-facing failure (bad tokenizer dir, disk full)."""


def tiny_moe_config(vocab_size: int, bos_token_id: int | None, eos_token_id: int | None) -> dict:
    """qwen3_moe, 2 layers, 8 experts top-2. head_dim 64 (vLLM's CPU attention supports it); the expert
    width 96 is below the 128 quant group, so tail groups run on the expert path."""
    return dict(hidden_size=160, intermediate_size=200, moe_intermediate_size=96, num_experts=8,
                num_experts_per_tok=2, decoder_sparse_step=1, norm_topk_prob=True, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=vocab_size,
                max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=bos_token_id,
                eos_token_id=eos_token_id)


def default_cache_root() -> Path:
    return cache_paths.cache_dir("smoke_models")


def verify(ckpt: Path) -> str | None:
    """None if `ckpt` matches its manifest, else why it cannot be trusted."""
    return verified_cache.verify_dir(ckpt, FORMAT_VERSION)


def _write_tiny_moe(tokenizer_dir: Path, out: Path, seed: int) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    src_cfg = json.loads((tokenizer_dir / "config.json").read_text())
    config = AutoConfig.for_model("qwen3_moe", **tiny_moe_config(
        int(src_cfg["vocab_size"]), src_cfg.get("bos_token_id"), src_cfg.get("eos_token_id")))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(str(out))
    for f in tokenizer_dir.iterdir():
        if f.is_file() and f.name.startswith(TOKENIZER_PREFIXES):
            shutil.copyfile(f, out / f.name)
    gen = tokenizer_dir / "generation_config.json"
    if gen.is_file():
        shutil.copyfile(gen, out / gen.name)


def tiny_moe_dir(tokenizer_dir: Path, cache_root: Path | None = None, seed: int = 0, log=print) -> Path:
    """Path of the cached tiny random qwen3_moe for `tokenizer_dir`, building it first if needed."""
    tokenizer_dir = Path(tokenizer_dir)
    if not (tokenizer_dir / "config.json").is_file():
        raise SmokeModelError(f"tokenizer dir {tokenizer_dir} has no config.json (need its vocab size); pass the "
                              f"embedded SmolLM2 checkpoint dir")
    tok_files = sorted(f for f in tokenizer_dir.iterdir() if f.is_file() and f.name.startswith(TOKENIZER_PREFIXES))
    if not tok_files:
        raise SmokeModelError(f"tokenizer dir {tokenizer_dir} holds no tokenizer files")
    key = provenance.sha256_json({"v": FORMAT_VERSION, "seed": seed,
                                  "tokenizer": {f.name: provenance.sha256_file(f) for f in tok_files},
                                  "config": provenance.sha256_file(tokenizer_dir / "config.json")})[:12]
    root = Path(cache_root) if cache_root else default_cache_root()
    final = root / f"tiny-qwen3-moe-random-s{seed}-{key}"
    return verified_cache.cached_or_built(
        final, lambda tmp: _write_tiny_moe(tokenizer_dir, tmp, seed), FORMAT_VERSION,
        {"seed": seed, "random_weights": True}, "the tiny random-weight qwen3_moe", log, SmokeModelError)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Build (once, cached) a tiny RANDOM-weight qwen3_moe with a given "
                                             "tokenizer, for the offline MoE smoke; prints its directory.")
    ap.add_argument("--tokenizer", required=True, type=Path, help="checkpoint dir whose tokenizer/vocab to use")
    ap.add_argument("--cache", type=Path, default=None, help="cache root (default $MOE_LOWBIT_CACHE/smoke_models)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        print(tiny_moe_dir(args.tokenizer, args.cache, args.seed, log=lambda m: print(m, file=sys.stderr)))
    except SmokeModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
