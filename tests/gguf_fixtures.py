"""Helpers for the `llamacpp` tests: the cached llama.cpp build, a tiny qwen3_5_moe checkpoint that
llama.cpp's converter accepts, calibration text, and packed GGUFs cached on disk between test runs.

Packed outputs are cached under $MOE_LOWBIT_CACHE/test-gguf/<name>-<key>, where the key hashes every
input that changes the result (pack script, gguf_pack/types/source.py, recipe, configs/gguf.env, the model builder
arguments), so a change to any of them repacks instead of testing a stale file.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import cache_paths

ROOT = Path(__file__).resolve().parents[1]

# Dims are multiples of 256 so IQ3_XXS applies to every expert row (no fallback on the target arch).
TINY_QWEN35_MOE = dict(hidden_size=256, moe_intermediate_size=256, shared_expert_intermediate_size=256,
                       head_dim=64, num_attention_heads=4, num_key_value_heads=2, linear_key_head_dim=64,
                       linear_value_head_dim=64, vocab_size=49152)

CALIB_PROSE = """\
Every spring the river below the mill rose over its banks and spread across the low meadows, leaving a
thin layer of dark silt that the farmers welcomed. The miller measured the height of the water each
morning with a painted pole and wrote the number in a notebook next to the price of flour and the names
of the carters who had come to collect sacks. Over forty years the notebook filled six volumes, and his
granddaughter later used them to show that the floods had grown both earlier and larger.
A small observatory stood on the hill above the village. On clear nights the schoolteacher opened its
dome and let the older pupils take turns at the telescope, pointing it at Jupiter and its moons, at the
rings of Saturn, and at a faint smudge that she said was another galaxy, so far away that its light had
left it before there were any people to see it. The pupils recorded what they saw in careful drawings.
The railway reached the valley late, long after the towns on the coast had their stations. When it came,
the timetable changed the rhythm of daily life: letters arrived twice a day instead of twice a week,
fresh fish could be sold inland before it spoiled, and young people could travel to the city for work
and still come home for the harvest. Some of the older residents complained about the noise of the
engines, but they too rode the train to the market on Thursdays.
"""


def cache_root() -> Path:
    return cache_paths.cache_root()


def llama_cpp_prefix() -> Path:
    """The cached llama.cpp build (built by pipelines/install_llamacpp.sh on first use, ~6+ min)."""
    proc = subprocess.run(["bash", str(ROOT / "pipelines" / "install_llamacpp.sh")], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"pipelines/install_llamacpp.sh failed:\n{proc.stderr[-3000:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


def llama_perplexity_runs(model: Path, tmp: Path) -> subprocess.CompletedProcess:
    """llama-perplexity over a little prose with GGUF `model` (2 chunks of 128): proof llama.cpp loads and runs it."""
    text = tmp / "t.txt"
    text.write_text(CALIB_PROSE * 4)
    ppl = llama_cpp_prefix() / "bin" / "llama-perplexity"
    return subprocess.run([str(ppl), "-m", str(model), "-f", str(text), "-c", "128", "--chunks", "2", "-t", "2"],
                          capture_output=True, text=True, timeout=300)


def corrupt_copy(export_dir: Path, dst: Path, tensor: str, offset: int, edit) -> Path:
    """A copy of a GGUF export directory in `dst` whose byte `offset` of tensor `tensor`'s data is `edit(byte)`."""
    import gguf

    dst.mkdir()
    for f in export_dir.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    t = next(t for t in gguf.GGUFReader(str(dst / "model.gguf")).tensors if t.name == tensor)
    raw = bytearray((dst / "model.gguf").read_bytes())
    pos = int(t.data_offset) + offset
    raw[pos] = edit(raw[pos])
    (dst / "model.gguf").write_bytes(bytes(raw))
    return dst


def calibration_file(path: Path, repeats: int = 6) -> Path:
    """Plain text for llama-imatrix: the prose above, repeated with numbered paragraphs (~3k tokens)."""
    path.write_text("\n\n".join(f"Section {i + 1}.\n{CALIB_PROSE}" for i in range(repeats)), encoding="utf-8")
    return path


def build_tiny_qwen35_moe(out_dir: Path, tokenizer_dir: Path) -> Path:
    """A random qwen3_5_moe (vision tower included) with the SmolLM2 tokenizer.

    The converter identifies a BPE tokenizer by hashing its encodings, so the tokenizer must behave as
    SmolLM2's does. tokenizer_config.json pins `tokenizer_class` so transformers loads the tokenizer the
    files describe instead of the class it would pick from the model config (qwen3_5_moe -> the Qwen
    tokenizer, whose pre-tokenizer rewrites a foreign vocabulary and would not be recognized).
    """
    import tiny_models

    out = tiny_models.build_tiny_checkpoint("qwen3_5_moe", out_dir, tokenizer_dir=tokenizer_dir, **TINY_QWEN35_MOE)
    tok_cfg_path = out / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text()) if tok_cfg_path.is_file() else {}
    tok_cfg["tokenizer_class"] = "TokenizersBackend"
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=1))
    # what a real Qwen3.5 checkpoint ships for its vision tower; the mmproj converter reads it
    vision = json.loads((out / "config.json").read_text())["vision_config"]
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Qwen2VLImageProcessor", "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "patch_size": vision["patch_size"], "merge_size": vision["spatial_merge_size"],
        "temporal_patch_size": vision["temporal_patch_size"]}, indent=1))
    return out


def packable_checkpoint(model_dir: Path) -> Path:
    """The checkpoint to pack: model_dir itself, or (embedded SmolLM2, whose tokenizer.json transformers
    rebuilt with byte_fallback) its byte-level BPE view, exactly as `MODEL=embedded:smollm2` resolves."""
    import gguf_source

    if gguf_source.tokenizer_conflict(model_dir):
        return gguf_source.byte_level_bpe_view(model_dir, model_dir.parent / (model_dir.name + "-bpe-view"))
    return model_dir


PACK_MODULES = ("gguf_pack.py", "gguf_types.py", "gguf_source.py", "gguf_convert.py", "gguf_run.py")  # a change repacks


def _key(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(Path(p).read_bytes() if isinstance(p, Path) else str(p).encode())
    return h.hexdigest()[:12]


def pack_env(model_dir: Path, out_dir: Path, calib: Path, prefix: Path, **env) -> dict:
    return {**os.environ, "GGUF_MODEL": str(model_dir), "GGUF_OUT": str(out_dir), "GGUF_CALIB_FILE": str(calib),
            "GGUF_IMATRIX_CHUNKS": "4", "GGUF_IMATRIX_CTX": "128", "GGUF_THREADS": str(os.cpu_count() or 2),
            "LLAMA_CPP": str(prefix), **{("GGUF_" + k if k != "LLAMA_CPP" else k): str(v) for k, v in env.items()}}


def run_pack(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "pipelines" / "pack_gguf.sh")], capture_output=True, text=True,
                          env=env, cwd=ROOT)


def packed(name: str, model_dir: Path, prefix: Path, base_type: str = "IQ3_XXS", **env) -> tuple[Path, dict]:
    """(output dir, meta JSON) of pack_gguf.sh on model_dir, reused while its inputs are unchanged."""
    model_dir = packable_checkpoint(model_dir)
    key = _key(ROOT / "pipelines" / "pack_gguf.sh", *(ROOT / "src" / "quant" / f for f in PACK_MODULES),
               ROOT / "configs" / "gguf.env", ROOT / "configs" / "gguf_tensor_types_iq3.txt",
               ROOT / "configs" / "gguf_tensor_types_q3k.txt", model_dir / "config.json", base_type,
               sorted(env.items()), str(prefix))
    out = cache_root() / "test-gguf" / f"{name}-{key}"
    meta_path = out / f"{name}-{base_type}.meta.json"
    if meta_path.is_file():
        return out, json.loads(meta_path.read_text())
    out.mkdir(parents=True, exist_ok=True)
    calib = calibration_file(out / "calib.txt")
    proc = run_pack(pack_env(model_dir, out, calib, prefix, NAME=name, BASE_TYPE=base_type, **env))
    if proc.returncode != 0:
        raise RuntimeError(f"pack_gguf.sh failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return out, json.loads(meta_path.read_text())
