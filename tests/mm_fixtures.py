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
