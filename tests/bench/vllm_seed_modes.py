"""vLLM seeding: per-request seeds against one engine seed, through the eval's own VllmBackend.

    python tests/bench/vllm_seed_modes.py MODEL_DIR [--prompts 64 --max-tokens 64 --tp 1]

For each seed mode (engine, request) it builds a fresh VllmBackend twice, samples the same prompts at the
eval's sampling settings (temperature 0.6, top-p 0.95, top-k 20), and prints the generation wall time and
whether the two fresh engines gave identical text (reproducibility). The speed difference it measures is
the CPU sampler's (forward_cpu draws one seed per seeded request); on CUDA a per-request seed also turns
off FlashInfer's batched top-k/top-p sampling (vllm/v1/sample/ops/topk_topp_sampler.py, forward_cuda), which
this CPU box cannot show.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import bench_paths  # tests/bench/ is on the path of a script run from it

ROOT = bench_paths.use_project_modules()

import backend_base

import backend_vllm
from bench_spec import Sample  # noqa: E402


def run(model: str, mode: str, samples, max_tokens: int, tp: int) -> tuple[float, list[str]]:
    sampling = backend_base.Sampling(temperature=0.6, top_p=0.95, top_k=20, seed=0, max_new_tokens=max_tokens,
                                      thinking=False)
    backend = backend_vllm.VllmBackend(model, sampling, tensor_parallel_size=tp, max_model_len=256,
                                        max_num_seqs=len(samples), enforce_eager=True, seed_mode=mode)
    try:
        t0 = time.perf_counter()
        out = backend.generate(samples)
        return time.perf_counter() - t0, [g["output"] for g in out]
    finally:
        backend.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--tp", type=int, default=1)
    a = ap.parse_args(argv)
    samples = [Sample(id=f"p{i}", bench="bench", messages=({"role": "user", "content": f"Count to {i} in words."},),
                      gold=None, meta={}) for i in range(a.prompts)]
    report = {}
    for mode in ("engine", "request"):
        (s1, t1), (s2, t2) = run(a.model, mode, samples, a.max_tokens, a.tp), run(a.model, mode, samples, a.max_tokens, a.tp)
        report[mode] = {"generate_s": [round(s1, 2), round(s2, 2)], "reproducible": t1 == t2,
                        "distinct_outputs": len(set(t1))}
        print(f"{mode:<8} generate {s1:.2f} s / {s2:.2f} s; two fresh engines identical: {t1 == t2}")
    print(json.dumps({"prompts": a.prompts, "max_tokens": a.max_tokens, "tp": a.tp, **report}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
