"""Harness overhead of vllm_eval8 on the vllm backend: everything that is not generation, as % of it.

Overhead = prompting (sample loading, chat-template rendering), extraction + grading on the critical
path, per-sample JSONL logging, summary and JSON writing. Generation = time inside the engine's step
loop. The engine is built before the timed call, so its start-up is excluded from both. Target: <= 2 %.

    python tests/bench/bench_harness_overhead.py                       # SmolLM2 on the fixture benchmarks
    python tests/bench/bench_harness_overhead.py --model PATH --max-new-tokens 1024 --grade-workers 0
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import bench_paths  # tests/bench/ is on the path of a script run from it

ROOT = bench_paths.use_project_modules()
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

FIX = ROOT / "tests" / "fixtures" / "bench"
DATA = {"mmlu_pro": str(FIX / "mmlu_pro.jsonl"), "gpqa": str(FIX / "gpqa_diamond.jsonl"),
        "mmmlu": str(FIX / "mmmlu_{part}.jsonl"), "math500": str(FIX / "math500.jsonl")}
OPTIONS = {"mmmlu": {"locales": ("FR_FR", "ZH_CN", "ES_LA")}}
TARGET_PCT = 2.0


def main(argv=None) -> int:
    import backend_registry
    import vllm_eval8

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint dir (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--benchmarks", default="mmlu_pro,gpqa,mmmlu,math500", help="fixture benchmarks to run")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--grade-workers", type=int, default=None, help="0 = inline; default: the runner's default")
    ap.add_argument("--enforce-eager", default="on", help="on|off (on: skip torch.compile on CPU)")
    args = ap.parse_args(argv)
    if args.model is None:
        import embedded_model

        args.model = str(embedded_model.smollm2_bf16_dir())
    benches = tuple(b for b in args.benchmarks.split(",") if b)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = vllm_eval8.EvalConfig(model=args.model, tag="overhead", backend="vllm", benchmarks=benches,
                                    data_files={b: DATA[b] for b in benches}, bench_options=OPTIONS,
                                    max_new_tokens=args.max_new_tokens, max_model_len=args.max_new_tokens + 1024,
                                    max_num_seqs=16, enforce_eager=args.enforce_eager == "on", results_dir=tmp,
                                    grade_workers=args.grade_workers, progress=False)
        t0 = time.perf_counter()
        backend = backend_registry.make_backend(cfg)
        init_s = time.perf_counter() - t0
        try:
            t0 = time.perf_counter()
            doc = vllm_eval8.run_eval(cfg, backend=backend)
            wall = time.perf_counter() - t0
        finally:
            backend.close()
    t = doc["timing"]
    gen = t["generate_s"]
    harness = wall - gen
    n = sum(b["n"] for b in doc["benchmarks"].values())
    tokens = sum(b["tokens_mean"] * b["n"] for b in doc["benchmarks"].values())
    pct = 100.0 * harness / gen
    print(f"model {args.model}")
    print(f"engine start (excluded): {init_s:.1f} s; samples {n}; generated tokens {tokens:.0f}; "
          f"grade workers {cfg.grade_workers if cfg.grade_workers is not None else vllm_eval8.default_grade_workers()}")
    print(f"generation {gen:.2f} s; harness {harness:.3f} s (load samples {t['load_samples_s']:.3f}, "
          f"prompt render {t['prompt_render_s']:.3f}, grade wait {t['grade_wait_s']:.3f}, write {t['write_s']:.3f})")
    print(f"harness overhead: {pct:.2f} % of generation wall time (target <= {TARGET_PCT:.0f} %): "
          f"{'OK' if pct <= TARGET_PCT else 'OVER TARGET'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
