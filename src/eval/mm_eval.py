"""Image questions through the common harness: the checks and the HF backend that multimodal runs need.

The runner (eval_run) is the same for text and images; this module adds what only images need:

* ``refuse_text_only(cfg, samples)``: before anything is generated, a model that cannot see is refused,
  naming it (config.json without a vision tower; a llama-server without --mmproj);
* ``input_error_generation``: a sample whose image could not be read, or whose prompt with its images
  does not fit the context, is not sent; it is recorded with ``finish_reason: "input_error"`` and the
  reason, and scored wrong;
* the transformers vision backend is backend_hf.HfVisionBackend.

vLLM and OpenAI-compatible servers (llama-server --mmproj) take the same samples as base64 ``image_url``
parts (mm_images.openai_messages), built in backend_vllm and backend_openai.
"""
from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import mm_images

INPUT_ERROR = "input_error"
VISION_CONFIG_KEYS = ("vision_config", "vision_tower", "mm_vision_tower", "visual")


def input_error_generation(reason: str) -> dict:
    return {"output": "", "finish_reason": INPUT_ERROR, "tokens": 0, "input_error": str(reason)}


def image_benchmarks(benchmarks) -> list:
    import bench_registry

    return [b for b in benchmarks if bench_registry.BENCHMARKS[b].extra.get("modality") == "image"]


def model_sees_images(model: str) -> tuple[bool | None, str]:
    """(True/False, why) from a local checkpoint's config.json; (None, why) when it cannot be told."""
    path = Path(str(model))
    cfg_path = path / "config.json" if path.is_dir() else None
    if cfg_path is None or not cfg_path.is_file():
        return None, f"{model} is not a local checkpoint folder with a config.json"
    config = json.loads(cfg_path.read_text(encoding="utf-8"))
    if any(config.get(k) for k in VISION_CONFIG_KEYS):
        return True, "config.json has a vision tower"
    return False, (f"config.json (model_type={config.get('model_type')!r}, architectures="
                   f"{config.get('architectures')}) has no vision tower ({'/'.join(VISION_CONFIG_KEYS)})")


def server_sees_images(base_url: str, timeout_s: float = 10.0) -> tuple[bool | None, str]:
    """llama-server's /props says whether a projector is loaded (modalities.vision); other servers: None."""
    root = base_url.rstrip("/")
    root = root[:-3] if root.endswith("/v1") else root
    try:
        with urllib.request.urlopen(root + "/props", timeout=timeout_s) as response:
            props = json.loads(response.read().decode("utf-8"))
    except Exception as err:  # not a llama-server, or no /props: cannot tell, the server will say
        return None, f"{root}/props unavailable ({type(err).__name__})"
    vision = (props.get("modalities") or {}).get("vision")
    if vision is None:
        return None, f"{root}/props has no modalities field"
    return bool(vision), f"{root}/props modalities.vision={vision}"


def refuse_text_only(cfg, samples) -> None:
    """Raise before generating when image questions would go to a model that cannot see them."""
    if cfg.backend == "replay" or not any(mm_images.has_images(s) for s in samples):
        return
    benches = image_benchmarks(cfg.benchmarks)
    if cfg.backend == "openai":
        sees, why = server_sees_images(cfg.base_url)
        name = cfg.served_model_name or cfg.model
    else:
        sees, why = model_sees_images(cfg.model)
        name = cfg.model
    if sees is False:
        raise ValueError(f"model {name} is text-only ({why}); {', '.join(benches)} ask image questions. "
                         "Use a vision-language checkpoint (for llama-server: pass --mmproj), or drop "
                         f"{', '.join(benches)} from --benchmarks")
