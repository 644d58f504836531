"""Image preprocessing overhead on the HF backend: processor time per image (chat template + pixel
decode/resize/normalize/patchify) against generation time per sample, on the rendered smoke set.

Target (issue 12): preprocessing <= 5 % of generation time. Without --model it builds the tiny random
qwen3_5_moe VLM of the tests (tests/mm_fixtures.py), whose generation is unrealistically cheap, so its
percentage is an upper bound of what a real VLM sees; pass --model for a real checkpoint.

    python tests/bench/bench_mm_preprocess.py [--model DIR] [--n 6] [--max-new-tokens 64] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import bench_paths  # tests/bench/ is on the path of a script run from it

ROOT = bench_paths.use_project_modules()

TARGET_PCT = 5.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bench_mm_preprocess", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a local VLM checkpoint (default: build the tiny test VLM)")
    ap.add_argument("--n", type=int, default=6, help="samples per benchmark (default 6)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    import torch

    import backend_base
    import backend_hf
    import bench_registry
    import mm_eval

    torch.set_num_threads(args.threads)  # once, by this entry point

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            import embedded_model
            import mm_fixtures

            model = str(mm_fixtures.build_tiny_vlm(Path(tmp) / "tiny-vlm", embedded_model.smollm2_bf16_dir()))
        smoke = ROOT / "configs" / "data" / "mm_smoke"
        samples = (bench_registry.load_samples("mmmu_pro", data_file=str(smoke / "mmmu_pro_{part}.jsonl"), n=args.n)
                   + bench_registry.load_samples("math_vision", data_file=str(smoke / "math_vision.jsonl"), n=args.n))
        sampling = backend_base.Sampling(temperature=0.0, max_new_tokens=args.max_new_tokens, thinking=False)
        backend = backend_hf.HfVisionBackend(model, sampling)
        backend._one(samples[0])  # warm-up (first-call kernel setup), not measured
        backend._prep_s, backend.prep_per_image = 0.0, []
        t0 = time.perf_counter()
        gens = [gen for _i, gen in backend.stream(samples)]
        wall = time.perf_counter() - t0
    prep = backend.prep_seconds()
    gen_s = wall - prep
    tokens = sum(g["tokens"] for g in gens)
    per_image = statistics.median(backend.prep_per_image) * 1e3
    pct = 100.0 * prep / gen_s if gen_s > 0 else float("nan")
    print(f"model {model if args.model else 'tiny random qwen3_5_moe VLM (tests/mm_fixtures.py)'}; "
          f"{len(samples)} samples, {len(backend.prep_per_image)} with images, {tokens} tokens generated")
    print(f"preprocessing: {prep:.2f} s total, median {per_image:.1f} ms per image")
    print(f"generation:    {gen_s:.2f} s total, {1e3 * gen_s / len(samples):.0f} ms per sample, "
          f"{tokens / gen_s:.1f} tok/s")
    print(f"overhead:      {pct:.2f} % of generation time (target <= {TARGET_PCT:.0f} %): "
          f"{'OK' if pct <= TARGET_PCT else 'OVER TARGET'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
