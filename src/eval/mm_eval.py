"""Image questions through the common harness: the checks and the HF backend that multimodal runs need.

The runner (eval_run) is the same for text and images; this module adds what only images need:

* ``refuse_text_only(cfg, samples)``: before anything is generated, a model that cannot see is refused,
  naming it (config.json without a vision tower; a llama-server without --mmproj);
* ``input_error_generation``: a sample whose image could not be read, or whose prompt with its images
  does not fit the context, is not sent; it is recorded with ``finish_reason: "input_error"`` and the
  reason, and scored wrong;
* ``HfVisionBackend``: transformers' processor (image preprocessing + the family's chat template) and
  ``generate``, one sample at a time; the preprocessing time is reported apart from generation
  (bench/bench_mm_preprocess.py).

vLLM and OpenAI-compatible servers (llama-server --mmproj) take the same samples as base64 ``image_url``
parts (mm_images.openai_messages), built in eval_backends.
"""
from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import mm_images
import results_schema
from backend_base import Backend, Sampling

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


def context_error(prompt_tokens: int, image_tokens: int, limit: int) -> str | None:
    """The reason a prompt cannot run in a context of `limit` tokens (None when it fits with room for one
    generated token)."""
    if prompt_tokens < limit:
        return None
    return (f"prompt is {prompt_tokens} tokens ({image_tokens} of them image tokens), which does not fit the "
            f"context of {limit} tokens; the image is too large for this context (raise --max-model-len or "
            "lower the processor's max_pixels)")


def load_processor(model: str):
    """AutoProcessor; where torchvision is missing (the CPU test venv), the same processor class built with
    the PIL image processor and no video processor (these benchmarks send no video)."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(model)
    except ImportError as err:
        if "torchvision" not in str(err).lower():
            raise
    import transformers
    from transformers import AutoTokenizer

    folder = Path(model)
    pre = json.loads((folder / "preprocessor_config.json").read_text(encoding="utf-8"))
    proc_cfg = folder / "processor_config.json"
    proc_name = json.loads(proc_cfg.read_text(encoding="utf-8")).get("processor_class") if proc_cfg.is_file() else None
    image_name = pre.get("image_processor_type", "")
    image_cls = getattr(transformers, image_name if image_name.endswith("Pil") else image_name + "Pil", None)
    proc_cls = getattr(transformers, proc_name or "", None)
    if image_cls is None or proc_cls is None:
        raise RuntimeError(f"{model}: AutoProcessor needs torchvision here, and no PIL fallback is known for "
                           f"{image_name!r} / {proc_name!r}; pip install torchvision matching torch")

    class WithoutVideo(proc_cls):
        def check_argument_for_proper_class(self, name, arg):
            if name == "video_processor" and arg is None:
                return None
            return super().check_argument_for_proper_class(name, arg)

    template = folder / "chat_template.jinja"
    tok = AutoTokenizer.from_pretrained(model)
    return WithoutVideo(image_processor=image_cls.from_pretrained(model), tokenizer=tok, video_processor=None,
                        chat_template=template.read_text(encoding="utf-8") if template.is_file() else tok.chat_template)


class HfVisionBackend(Backend):
    """transformers AutoProcessor + AutoModelForImageTextToText, one sample per generate call.

    One at a time because image batches of different sizes pad poorly and CPU checks gain nothing from
    batching; greedy decoding is then fully deterministic (the kill-and-resume test relies on it).
    """

    name = "hf"

    def __init__(self, model: str, sampling: Sampling, dtype: str = "auto", device: str | None = None,
                 max_context: int | None = None, threads: int | None = None):
        import torch
        from transformers import AutoModelForImageTextToText

        if threads:
            torch.set_num_threads(int(threads))
        self.torch, self.sampling = torch, sampling
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        torch_dtype = (torch.bfloat16 if self.device == "cuda" else torch.float32) if dtype == "auto" else getattr(torch, dtype)
        self.dtype = str(torch_dtype).replace("torch.", "")
        self.processor = load_processor(model)
        self.model = AutoModelForImageTextToText.from_pretrained(model, dtype=torch_dtype).to(self.device).eval()
        text_cfg = getattr(self.model.config, "text_config", self.model.config)
        self.max_context = int(max_context or getattr(text_cfg, "max_position_embeddings", 0) or 1 << 30)
        tok = self.processor.tokenizer
        eos = self.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, (list, tuple)) else [eos]
        self.eos_ids = {int(e) for e in eos if e is not None} | ({int(tok.eos_token_id)} if tok.eos_token_id is not None else set())
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.image_token_id = getattr(self.model.config, "image_token_id", None)
        self._prep_s = 0.0
        self.prep_per_image: list = []  # seconds of processor work per sample with images (bench)

    def inputs(self, sample):
        """The processor's tensors for one sample (chat template + pixel preprocessing)."""
        messages, images = mm_images.hf_messages(sample)
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                  enable_thinking=self.sampling.thinking)
        kwargs = {"images": images} if images else {}
        return self.processor(text=[text], return_tensors="pt", **kwargs), len(images)

    def _one(self, sample) -> dict:
        torch, s = self.torch, self.sampling
        t0 = time.perf_counter()
        enc, n_images = self.inputs(sample)
        dt = time.perf_counter() - t0
        self._prep_s += dt
        if n_images:
            self.prep_per_image.append(dt / n_images)
        ids = enc["input_ids"]
        n_prompt = int(ids.shape[1])
        n_image = int((ids == self.image_token_id).sum()) if self.image_token_id is not None else 0
        reason = context_error(n_prompt, n_image, self.max_context)
        if reason:
            return input_error_generation(reason)
        budget = min(s.max_new_tokens, self.max_context - n_prompt)
        kwargs = dict(max_new_tokens=budget, pad_token_id=self.pad_id, do_sample=s.temperature > 0)
        if s.temperature > 0:
            kwargs.update(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k)
            torch.manual_seed(results_schema.sample_seed(s.seed, sample.id))
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        with torch.no_grad():
            out = self.model.generate(**enc.to(self.device), **kwargs)
        row = out[0, n_prompt:].tolist()
        stop_at = next((i for i, t in enumerate(row) if t in self.eos_ids), None)
        if stop_at is None:
            kept, reason = row, ("length" if len(row) >= budget else "stop")
        else:
            kept, reason = row[:stop_at + 1], "stop"
        return {"output": self.processor.tokenizer.decode(kept, skip_special_tokens=True), "finish_reason": reason,
                "tokens": len(kept)}

    def stream(self, samples):
        for i, sample in enumerate(samples):
            yield i, self._one(sample)

    def identity(self):
        return {"backend": self.name, "dtype": self.dtype, "processor": "AutoProcessor", "max_context": self.max_context}

    def prep_seconds(self):
        return self._prep_s
