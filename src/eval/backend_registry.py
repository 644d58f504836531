"""Where generations come from: vLLM in-process, transformers, an OpenAI-compatible server, or a replay.

Every backend takes the same `Sample` objects (same chat messages) and returns the same record per
sample, ``{"output": str, "finish_reason": "stop" | "length" | ..., "tokens": int}``, so prompting,
extraction and grading stay identical whatever produced the text. ``tokens`` counts generated tokens
including the end-of-sequence token (vLLM's convention). Backends also *stream*: ``stream(samples)``
yields ``(index, generation)`` as each sample finishes, which lets the runner log and grade while the
engine keeps generating, and lets a killed run keep everything that had finished.

The backends: backend_vllm, backend_hf (text and vision), backend_openai, backend_replay; this module
names them and builds the one an EvalConfig asks for.
"""
from __future__ import annotations

from backend_base import Backend, Sampling

BACKENDS = ("vllm", "hf", "openai", "replay")


def _wants_images(cfg) -> bool:
    import mm_eval

    return bool(mm_eval.image_benchmarks(cfg.benchmarks))


def make_backend(cfg) -> Backend:
    """Build the backend an EvalConfig names (duck-typed so this module does not import the runner)."""
    sampling = Sampling(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, seed=cfg.seed,
                        max_new_tokens=cfg.resolved_max_new_tokens(), thinking=cfg.thinking)
    if cfg.backend == "vllm":
        from backend_vllm import VllmBackend

        return VllmBackend(cfg.model, sampling, tensor_parallel_size=cfg.resolved_tensor_parallel_size(),
                           max_model_len=cfg.resolved_max_model_len(),
                           gpu_memory_utilization=cfg.gpu_memory_utilization,
                           max_num_seqs=cfg.resolved_max_num_seqs(), dtype=cfg.dtype,
                           enforce_eager=cfg.enforce_eager, engine_seed=cfg.seed, engine_args=cfg.engine_args,
                           seed_mode=cfg.seed_mode)
    if cfg.backend == "hf" and _wants_images(cfg):
        from backend_hf import HfVisionBackend

        return HfVisionBackend(cfg.model, sampling, dtype=cfg.dtype, max_context=cfg.max_model_len)
    if cfg.backend == "hf":
        from backend_hf import HfBackend

        return HfBackend(cfg.model, sampling, batch_size=cfg.hf_batch_size, dtype=cfg.dtype)
    if cfg.backend == "openai":
        from backend_openai import OpenAIBackend

        return OpenAIBackend(cfg.served_model_name or cfg.model, sampling, base_url=cfg.base_url,
                             api_key_env=cfg.api_key_env, concurrency=cfg.concurrency,
                             timeout_s=cfg.request_timeout_s, max_retries=cfg.max_retries)
    if cfg.backend == "replay":
        if not cfg.replay_file:
            raise ValueError("--backend replay needs --replay-file PATH (the <tag>.jsonl of an earlier run)")
        from backend_replay import ReplayBackend

        return ReplayBackend(cfg.replay_file)
    raise ValueError(f"unknown backend {cfg.backend!r}; choose one of {BACKENDS}")
