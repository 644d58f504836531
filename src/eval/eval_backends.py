"""Where generations come from: vLLM in-process, transformers, an OpenAI-compatible server, or a replay.

Every backend takes the same `Sample` objects (same chat messages) and returns the same record per
sample, ``{"output": str, "finish_reason": "stop" | "length" | ..., "tokens": int}``, so prompting,
extraction and grading stay identical whatever produced the text. ``tokens`` counts generated tokens
including the end-of-sequence token (vLLM's convention). Backends also *stream*: ``stream(samples)``
yields ``(index, generation)`` as each sample finishes, which lets the runner log and grade while the
engine keeps generating, and lets a killed run keep everything that had finished.

Sampling is seeded per sample (``results_schema.sample_seed``) on OpenAI servers and on vLLM with
``seed_mode="request"``, so a sample's tokens do not depend on which batch it ran in (a resumed run equals
an uninterrupted one). vLLM 0.32 turns any per-request seed into a per-request torch.Generator, which drops
FlashInfer's batched top-k/top-p sampler and draws noise request by request (v1/sample/ops/
topk_topp_sampler.py: forward_cuda, random_sample); so vLLM defaults to ``seed_mode="engine"``: one seed
for the engine (``LLM(seed=...)``), the batched sampler, and a whole run that reproduces when rerun with
the same config and sample order (a resumed run draws its remaining samples from a fresh engine stream).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Mapping

import results_schema
from backend_base import Backend, Sampling, chat_messages  # noqa: F401  (re-exported)
from openai_backend import CONTEXT_WORDS, OpenAIBackend, ServerRefused  # noqa: F401  (re-exported)

BACKENDS = ("vllm", "hf", "openai", "replay")


# --------------------------------------------------------------------------------------------- vLLM
class VllmBackend(Backend):
    """vllm.LLM in this process; chat template applied by vLLM with enable_thinking in its kwargs."""

    name = "vllm"

    def __init__(self, model: str, sampling: Sampling, tensor_parallel_size: int = 1,
                 max_model_len: int | None = None, gpu_memory_utilization: float = 0.9,
                 max_num_seqs: int | None = None, dtype: str = "auto", enforce_eager: bool | None = None,
                 engine_seed: int = 0, engine_args: Mapping | None = None, seed_mode: str = "engine"):
        from vllm import LLM

        self.sampling = sampling
        self.per_request_seed = seed_mode == "request"
        self.enforce_eager = default_enforce_eager(model) if enforce_eager is None else enforce_eager
        self.engine_kwargs = vllm_engine_kwargs(model, tensor_parallel_size, max_model_len, gpu_memory_utilization,
                                                max_num_seqs, dtype, engine_seed, self.enforce_eager, engine_args)
        self.llm = LLM(**self.engine_kwargs)
        self._prep_s = 0.0

    def _params(self, sample):
        from vllm import SamplingParams

        s = self.sampling
        if s.temperature > 0:
            return SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                                  max_tokens=s.max_new_tokens,
                                  seed=s.seed_for(sample.id) if self.per_request_seed else None)
        return SamplingParams(temperature=0.0, max_tokens=s.max_new_tokens)

    def stream(self, samples):
        if not samples:
            return
        t0 = time.perf_counter()
        request_ids, refused = [], {}
        if not any(isinstance(s.meta, dict) and s.meta.get("images") for s in samples):
            request_ids = self._enqueue(samples)
        else:  # image prompts: one at a time, so the one that does not fit max_model_len is refused alone
            for i, sample in enumerate(samples):
                try:
                    request_ids.append(self._enqueue([sample])[0])
                except ValueError as err:
                    request_ids.append(None)
                    refused[i] = str(err)[:300]
        self._prep_s += time.perf_counter() - t0
        for i, reason in refused.items():
            yield i, {"output": "", "finish_reason": "input_error", "tokens": 0,
                      "input_error": f"vLLM refused the prompt: {reason}"}
        samples = [s for i, s in enumerate(samples) if i not in refused]
        positions = [i for i in range(len(request_ids)) if i not in refused]
        request_ids = [r for r in request_ids if r is not None]
        if not request_ids:
            return
        yield from ((positions[i], gen) for i, gen in self._collect(request_ids, len(samples)))

    def _enqueue(self, samples) -> list:
        return self.llm.enqueue_chat([chat_messages(s) for s in samples], [self._params(s) for s in samples],
                                     use_tqdm=False, chat_template_kwargs={"enable_thinking": self.sampling.thinking})

    def _collect(self, request_ids, n_samples):
        # enqueue_chat returns internal ids ("7-ab12cd"); finished outputs carry the external one ("7").
        index_of, internal_of = {}, {}
        for i, rid in enumerate(request_ids):
            index_of[rid] = index_of[rid.split("-", 1)[0]] = i
            internal_of[i] = rid
        engine = self.llm.llm_engine
        try:
            while internal_of and engine.has_unfinished_requests():
                for out in engine.step():
                    if not out.finished:
                        continue
                    if out.request_id not in index_of:
                        raise RuntimeError(f"vLLM returned request id {out.request_id!r} that this run did not "
                                           "enqueue; another caller is using the same LLM object concurrently")
                    index = index_of[out.request_id]
                    internal_of.pop(index, None)
                    completion = out.outputs[0]
                    yield index, {"output": completion.text, "finish_reason": str(completion.finish_reason),
                                  "tokens": len(completion.token_ids)}
            if internal_of:
                raise RuntimeError(f"vLLM engine stopped with {len(internal_of)} of {n_samples} requests unfinished")
        finally:
            if internal_of and self.llm is not None:  # interrupted: leave no orphan requests in a reused engine
                engine.abort_request(list(internal_of.values()), internal=True)

    def identity(self):
        return {"backend": self.name, "enforce_eager": self.enforce_eager}

    def prep_seconds(self):
        return self._prep_s

    def close(self):
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            shutdown = getattr(llm.llm_engine, "shutdown", None) or getattr(
                getattr(llm.llm_engine, "engine_core", None), "shutdown", None)
            if shutdown is not None:
                shutdown()
            del llm


def vllm_engine_kwargs(model, tensor_parallel_size=1, max_model_len=None, gpu_memory_utilization=0.9,
                       max_num_seqs=None, dtype="auto", seed=0, enforce_eager=False, engine_args=None) -> dict:
    """The exact vllm.LLM(**kwargs) of a run (what --dry-run prints): the runner's own flags + --engine-arg."""
    kwargs = dict(model=model, tensor_parallel_size=tensor_parallel_size, max_model_len=max_model_len,
                  gpu_memory_utilization=gpu_memory_utilization, dtype=dtype, seed=seed, enforce_eager=enforce_eager,
                  max_num_seqs=max_num_seqs or None, **dict(engine_args or {}))
    return {k: v for k, v in kwargs.items() if v is not None}


def default_enforce_eager(model: str) -> bool:
    """Gemma checkpoints get eager mode (CUDA graphs have misbehaved for them); others may compile."""
    return "gemma" in Path(str(model).rstrip("/")).name.lower()


# ----------------------------------------------------------------------------------------------- HF
class HfBackend(Backend):
    """transformers generate, batched with left padding; for CPU and small checks.

    Greedy (temperature 0) is batch-independent up to float noise. With sampling, torch's generator is
    seeded per batch from the batch's sample ids: reproducible for the same batches, but a resumed run
    (different batches) draws different tokens for the samples it still has to do.
    """

    name = "hf"

    def __init__(self, model: str, sampling: Sampling, batch_size: int = 8, dtype: str = "auto",
                 device: str | None = None, threads: int | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:  # process-wide: on a shared CPU box extra intra-op threads only contend
            torch.set_num_threads(int(threads))
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


# ------------------------------------------------------------------------------------------- replay
class ReplayMissing(ValueError):
    """The replay file lacks generations this run asks for (a different --n, benchmark set or data)."""


class ReplayBackend(Backend):
    """Re-grade saved generations (a JSONL of {id, output, finish_reason[, tokens]}) without a model.

    Used after an extractor fix, or to check that two backends grade identically. Lines without an
    ``id`` (the runner's header line) and lines that do not parse (a torn last line) are skipped.
    """

    name = "replay"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"replay file {self.path} does not exist; pass the <tag>.jsonl of an earlier run")
        self.generations: dict[str, dict] = {}
        import eval_text

        for n, line in enumerate(eval_text.utf8_lines(self.path), start=1):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(rec, Mapping) or "id" not in rec:
                continue
            if not isinstance(rec.get("output"), str) or not isinstance(rec.get("finish_reason"), str):
                raise ValueError(f"{self.path}:{n}: record {rec.get('id')!r} lacks a string output/finish_reason")
            gen = {"output": rec["output"], "finish_reason": rec["finish_reason"],
                   "tokens": int(rec.get("tokens") or 0)}
            if rec.get("reasoning") is not None:
                gen["reasoning"] = rec["reasoning"]
            self.generations[str(rec["id"])] = gen
        self.sha256 = hashlib.sha256(self.path.read_bytes()).hexdigest()

    def stream(self, samples):
        missing = [s.id for s in samples if s.id not in self.generations]
        if missing:
            raise ReplayMissing(f"replay file {self.path} has no generation for {len(missing)} of {len(samples)} "
                                f"samples (first: {missing[:3]}); replay the same benchmarks/--n/--data-file as "
                                "the original run")
        for i, sample in enumerate(samples):
            yield i, dict(self.generations[sample.id])

    def identity(self):
        return {"backend": self.name, "replay_sha256": self.sha256}


def _wants_images(cfg) -> bool:
    import mm_eval

    return bool(mm_eval.image_benchmarks(cfg.benchmarks))


def make_backend(cfg) -> Backend:
    """Build the backend an EvalConfig names (duck-typed so this module does not import the runner)."""
    sampling = Sampling(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, seed=cfg.seed,
                        max_new_tokens=cfg.resolved_max_new_tokens(), thinking=cfg.thinking)
    if cfg.backend == "vllm":
        return VllmBackend(cfg.model, sampling, tensor_parallel_size=cfg.resolved_tensor_parallel_size(),
                           max_model_len=cfg.resolved_max_model_len(),
                           gpu_memory_utilization=cfg.gpu_memory_utilization,
                           max_num_seqs=cfg.resolved_max_num_seqs(), dtype=cfg.dtype,
                           enforce_eager=cfg.enforce_eager, engine_seed=cfg.seed, engine_args=cfg.engine_args,
                           seed_mode=cfg.seed_mode)
    if cfg.backend == "hf" and _wants_images(cfg):
        import mm_eval

        return mm_eval.HfVisionBackend(cfg.model, sampling, dtype=cfg.dtype, max_context=cfg.max_model_len)
    if cfg.backend == "hf":
        return HfBackend(cfg.model, sampling, batch_size=cfg.hf_batch_size, dtype=cfg.dtype)
    if cfg.backend == "openai":
        return OpenAIBackend(cfg.served_model_name or cfg.model, sampling, base_url=cfg.base_url,
                             api_key_env=cfg.api_key_env, concurrency=cfg.concurrency,
                             timeout_s=cfg.request_timeout_s, max_retries=cfg.max_retries)
    if cfg.backend == "replay":
        if not cfg.replay_file:
            raise ValueError("--backend replay needs --replay-file PATH (the <tag>.jsonl of an earlier run)")
        return ReplayBackend(cfg.replay_file)
    raise ValueError(f"unknown backend {cfg.backend!r}; choose one of {BACKENDS}")
