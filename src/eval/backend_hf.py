"""transformers backends: HfBackend (causal LMs, batched generate) and HfVisionBackend (AutoProcessor +
AutoModelForImageTextToText, one sample per generate; image preprocessing timed apart from generation,
tests/bench/bench_mm_preprocess.py). Thread counts are the entry point's to set, never a backend's.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import mm_images
import results_schema
from backend_base import Backend, Sampling
from mm_eval import input_error_generation


class HfBackend(Backend):
    """transformers generate, batched with left padding; for CPU and small checks.

    Greedy (temperature 0) is batch-independent up to float noise. With sampling, torch's generator is
    seeded per batch from the batch's sample ids: reproducible for the same batches, but a resumed run
    (different batches) draws different tokens for the samples it still has to do.
    """

    name = "hf"

    def __init__(self, model: str, sampling: Sampling, batch_size: int = 8, dtype: str = "auto",
                 device: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.sampling = sampling
        self.batch_size = max(1, int(batch_size))
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype == "auto":
            torch_dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        else:
            torch_dtype = getattr(torch, dtype)
        self.dtype = str(torch_dtype).replace("torch.", "")
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype).to(self.device).eval()
        eos = self.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, (list, tuple)) else [eos]
        self.eos_ids = {int(e) for e in eos if e is not None} | {int(self.tokenizer.eos_token_id)}
        self._prep_s = 0.0

    def render(self, sample) -> str:
        return self.tokenizer.apply_chat_template(list(sample.messages), tokenize=False,
                                                  add_generation_prompt=True,
                                                  enable_thinking=self.sampling.thinking)

    def _batch(self, batch) -> list[dict]:
        torch, s = self.torch, self.sampling
        t0 = time.perf_counter()
        enc = self.tokenizer([self.render(x) for x in batch], return_tensors="pt", padding=True,
                             add_special_tokens=False).to(self.device)
        self._prep_s += time.perf_counter() - t0
        kwargs = dict(max_new_tokens=s.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
                      do_sample=s.temperature > 0)
        if s.temperature > 0:
            kwargs.update(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k)
            torch.manual_seed(results_schema.sample_seed(s.seed, "\x00".join(x.id for x in batch)))
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        with torch.no_grad():
            out = self.model.generate(**enc, **kwargs)
        new = out[:, enc["input_ids"].shape[1]:].tolist()
        results = []
        for row in new:
            stop_at = next((i for i, t in enumerate(row) if t in self.eos_ids), None)
            if stop_at is None:
                kept, reason = row, ("length" if len(row) >= s.max_new_tokens else "stop")
            else:
                kept, reason = row[:stop_at + 1], "stop"
            results.append({"output": self.tokenizer.decode(kept, skip_special_tokens=True),
                            "finish_reason": reason, "tokens": len(kept)})
        return results

    def stream(self, samples):
        for start in range(0, len(samples), self.batch_size):
            for offset, gen in enumerate(self._batch(samples[start:start + self.batch_size])):
                yield start + offset, gen

    def identity(self):
        return {"backend": self.name, "dtype": self.dtype, "batch_size": self.batch_size}

    def prep_seconds(self):
        return self._prep_s


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
                 max_context: int | None = None):
        import torch
        from transformers import AutoModelForImageTextToText

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
