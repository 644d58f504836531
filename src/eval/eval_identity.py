"""The identity of what generates: fingerprints of the weights (sampled, so a 245 GB model costs well under a
second) and the backend and sampling settings that change generations. Its hash guards resume: a stored
generation is reused only for the same identity.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import backend_vllm
import provenance
from eval_config import EvalConfig

SAMPLE_BLOCKS = 32  # content blocks read from each big weight file for its fingerprint
SAMPLE_BLOCK_BYTES = 256 << 10
FULL_HASH_BYTES = 64 << 20  # smaller files are hashed whole


def sampled_sha256(path: Path, blocks: int = SAMPLE_BLOCKS, block_bytes: int = SAMPLE_BLOCK_BYTES) -> str:
    """sha256 over the size and `blocks` evenly spaced blocks (head and tail included) of a file.

    Names and sizes alone cannot tell two checkpoints of one layout apart (a re-quantized or merged
    student has the teacher's shard sizes), and hashing every byte of a 245 GB model per eval is not
    affordable. A requantization or an adapter merge rewrites tensors all through a shard, so blocks
    spread over the file see it; reading 8 MiB per shard costs well under a second.
    """
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    if size <= FULL_HASH_BYTES:
        h.update(bytes.fromhex(provenance.sha256_file(path)))
        return h.hexdigest()
    span = size - block_bytes
    with open(path, "rb") as f:
        for i in range(blocks):
            f.seek(span * i // (blocks - 1))
            h.update(f.read(block_bytes))
    return h.hexdigest()


def model_fingerprint(path: str | None) -> dict | None:
    """Identity of a local checkpoint (config + sampled weight content) or GGUF (size + head hash).

    It guards resume: generations of one checkpoint are never reused for another one at the same path.
    None for a hub id or a server-side name.
    """
    if not path:
        return None
    p = Path(path)
    if p.is_file():
        return {"kind": "file", "size": p.stat().st_size,
                "sha256_first_64MiB": provenance.sha256_file(p, limit_bytes=64 << 20),
                "sampled_sha256": sampled_sha256(p)}
    if p.is_dir():
        config = p / "config.json"
        weights = sorted((f.name, f.stat().st_size, sampled_sha256(f)) for f in p.iterdir()
                         if f.suffix in (".safetensors", ".gguf", ".bin") and f.is_file())
        return {"kind": "dir", "config_sha256": provenance.sha256_file(config) if config.is_file() else None,
                "weights_sampled_sha256": provenance.sha256_json(weights), "n_weight_files": len(weights)}
    return None


def backend_identity(cfg: EvalConfig) -> dict:
    """The part of the backend that changes generations, computable without loading the model."""
    if cfg.backend == "vllm":
        eager = backend_vllm.default_enforce_eager(cfg.model) if cfg.enforce_eager is None else cfg.enforce_eager
        ident = {"backend": "vllm", "dtype": cfg.dtype, "enforce_eager": eager,
                 "max_model_len": cfg.resolved_max_model_len(), "tensor_parallel_size": cfg.resolved_tensor_parallel_size(),
                 "seed_mode": cfg.seed_mode}
        if cfg.engine_args:  # only when set, so runs without them keep their config hash
            ident["engine_args"] = dict(sorted(cfg.engine_args.items()))
        return ident
    if cfg.backend == "hf":
        # a set --max-model-len caps the hf context too (image prompts past it are input errors)
        return {"backend": "hf", "dtype": cfg.dtype, **({"max_model_len": cfg.max_model_len} if cfg.max_model_len else {})}
    if cfg.backend == "openai":
        ident = {"backend": "openai", "served_model_name": cfg.served_model_name or cfg.model}
        if cfg.mmproj_path:  # only when set, so text-only config hashes stay what they were
            ident["mmproj_fingerprint"] = model_fingerprint(cfg.mmproj_path)
        return ident
    if not cfg.replay_file or not Path(cfg.replay_file).is_file():
        raise FileNotFoundError(f"--backend replay needs an existing --replay-file, got {cfg.replay_file!r}")
    return {"backend": "replay", "replay_sha256": provenance.sha256_file(Path(cfg.replay_file))}


def generation_config(cfg: EvalConfig) -> dict:
    """Everything that changes what is generated; its hash guards resume."""
    return {"model": cfg.model, "model_fingerprint": model_fingerprint(cfg.model_path or cfg.model),
            **backend_identity(cfg), "thinking": cfg.thinking, "temperature": cfg.temperature,
            "top_p": cfg.top_p, "top_k": cfg.top_k, "seed": cfg.seed,
            "max_new_tokens": cfg.resolved_max_new_tokens(), "budget": cfg.budget}

