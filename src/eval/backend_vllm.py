"""vLLM in-process: one engine for the whole run, every sample of every benchmark batched into it.

Sampling is seeded per sample (``results_schema.sample_seed``) on OpenAI servers and on vLLM with
``seed_mode="request"``, so a sample's tokens do not depend on which batch it ran in (a resumed run equals
an uninterrupted one). vLLM 0.32 turns any per-request seed into a per-request torch.Generator, which drops
FlashInfer's batched top-k/top-p sampler and draws noise request by request (v1/sample/ops/
topk_topp_sampler.py: forward_cuda, random_sample); so vLLM defaults to ``seed_mode="engine"``: one seed
for the engine (``LLM(seed=...)``), the batched sampler, and a whole run that reproduces when rerun with
the same config and sample order (a resumed run draws its remaining samples from a fresh engine stream).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Mapping

from backend_base import Backend, Sampling, chat_messages


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
