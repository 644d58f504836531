"""`eval.sh --dry-run`: what a run would do, before it loads a model or a dataset.

Prints the exact vllm.LLM arguments (TP, --engine-arg), the seeding, the run identity (the generation
config and its hash, the key resume checks), and per benchmark: the data it reads, the n it takes and what
the equivalence gate can decide at that n. The gate validates only when the Wilson 95 % interval fits inside
official +- 2 pt, so at a given n it can validate nothing if even a perfect match has a wider interval, and it
can only fail a harness that is off by more than about the interval's half-width.
"""
from __future__ import annotations

import json

import bench_registry
import backend_vllm
import results_official
import provenance
from eval_config import EvalConfig
from eval_identity import generation_config

GENERIC_ACC = 0.8  # the accuracy the gate arithmetic assumes where no official score exists


def gate_at_n(model_key: str | None, bench: str, n: int | None, thinking: bool) -> str:
    """What the gate can decide with n samples, at the official accuracy (a perfect reproduction)."""
    official = results_official.OFFICIAL_SCORES.get(model_key or "", {}).get(bench)
    p = (official / 100.0) if official is not None else GENERIC_ACC
    tol = results_official.TOLERANCE_PT
    need = results_official.n_needed(p, 100.0 * p, tol, "validated")
    if not n:
        return f"n = all rows; validating needs n >= {need}"
    lo, hi = results_official.wilson_bounds(p, n)
    half = (hi - lo) / 2
    verdict = "can validate" if n >= (need or 0) else f"cannot validate (needs n >= {need})"
    where = (f"official {official:.1f}" if official is not None and thinking
             else "no official number: gate says no-official-number; arithmetic at 80%")
    return f"{where}: CI +-{half:.1f} pt at n={n} -> {verdict}; fails only a harness off by > ~{half:.1f} pt"


def describe(cfg: EvalConfig) -> str:
    gen = generation_config(cfg)
    lines = [f"eval dry run: {cfg.model} -> {cfg.results_paths()[0]} (backend {cfg.backend})"]
    if cfg.backend == "vllm":
        eager = backend_vllm.default_enforce_eager(cfg.model) if cfg.enforce_eager is None else cfg.enforce_eager
        kwargs = backend_vllm.vllm_engine_kwargs(cfg.model, cfg.resolved_tensor_parallel_size(), cfg.resolved_max_model_len(),
                                                  cfg.gpu_memory_utilization, cfg.resolved_max_num_seqs(), cfg.dtype,
                                                  cfg.seed, eager, cfg.engine_args)
        lines.append(f"engine args: vllm.LLM(**{json.dumps(kwargs, sort_keys=True)})")
        lines.append(f"seeding: {cfg.seed_mode}" + (" (engine seed only: batched sampler)" if cfg.seed_mode == "engine"
                                                    else " (a seed per sample: vLLM's per-request sampler path)"))
    lines.append(f"run identity (config_hash {provenance.sha256_json(gen)[:16]}): {json.dumps(gen, sort_keys=True)}")
    key = results_official.official_model_key(cfg.model, cfg.official_model)
    lines.append(f"gate model: {key or 'none (not a carded model name; pass --official-model)'}")
    tokens = 0
    for bench in cfg.benchmarks:
        spec = bench_registry.BENCHMARKS.get(bench)
        if spec is None:
            raise ValueError(f"unknown benchmark {bench!r}; known: {sorted(bench_registry.BENCHMARKS)}")
        opts = cfg.bench_options.get(bench, {})
        data = cfg.data_files.get(bench) or (f"{opts.get('dataset', spec.dataset)}:{opts.get('config', spec.config) or '-'}"
                                             f":{opts.get('split', spec.split)}@{opts.get('revision', spec.dataset_revision)}")
        n = cfg.n_for(bench) if cfg.n_for(bench) is not None else spec.default_n
        tokens += (n or 0) * cfg.resolved_max_new_tokens()
        lines.append(f"  {bench:<12} n={n or 'all':<6} data={data}")
        lines.append(f"  {'':<12} gate: {gate_at_n(key, bench, n, cfg.thinking)}")
    lines.append(f"new tokens at most: {tokens:,} ({cfg.resolved_max_new_tokens():,} per sample)")
    if cfg.backend == "vllm":
        lines.append(sizing_lines(cfg, tokens))
    return "\n".join(lines)


def sizing_lines(cfg: EvalConfig, tokens: int) -> str:
    """GPU memory per device and time from the checkpoint's headers (a local directory only: no network)."""
    from pathlib import Path

    if not Path(cfg.model).is_dir():
        return "sizing: --model is not a local directory; size a hub id with quantize.sh --dry-run (headers only)"
    import sizing
    import sizing_run

    source = sizing_run.open_headers(cfg.model)
    dev = sizing_run.devices_for("cuda", None)
    costs = sizing_run.costs_for(dev, None)
    weights = sum(t.end - t.start for s in source.shards for t in s.tensors)
    stages = sizing.eval_stages(weights, cfg.resolved_tensor_parallel_size(), cfg.gpu_memory_utilization,
                                sizing.with_gpu_memory(costs, dev), costs, tokens)
    return sizing.format_stages(stages, dev, costs)
