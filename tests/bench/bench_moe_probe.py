"""Probe cost vs a plain forward over the same tokens (target <= 1.3x), on embedded:smollm2-moe.

Both sides run the same windows in one process, alternating, best of --repeats; the probe side is
moe_probe.probe_model (hooks on every router, accumulation on the device, one host copy at the end).
Prints the figures; the allocation study's wall time per student is printed by tests/bench/bench_moe_study.py
(split into plan, assembly and scoring) and by moe_study.py itself (results/moe_study/study.json "timing_s").

    python tests/bench/bench_moe_probe.py [--model embedded:smollm2-moe] [--tokens 4096] [--ctx 256] [--repeats 3]
"""
from __future__ import annotations

import argparse
import sys
import time

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded:smollm2-moe")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: on a shared 2-core box one thread ran this model's forward "
                         "5-13x faster than two; 0 = torch's default)")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    import moe_probe
    import moefy_fit
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = moe_probe.resolve_source(args.model).root
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, device_map=args.device).eval()
    windows = moe_probe.calibration_windows(tok, moefy_fit.pydoc_topics_text(held_out=False), args.tokens, args.ctx)
    dev = model.get_input_embeddings().weight.device

    @torch.no_grad()
    def plain():
        for b in range(0, windows.shape[0], args.batch):
            model(input_ids=windows[b: b + args.batch].to(dev), use_cache=False)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    plain()  # warm-up
    t_plain, t_probe = [], []
    for _ in range(args.repeats):
        sync(); t0 = time.perf_counter(); plain(); sync(); t_plain.append(time.perf_counter() - t0)
        t0 = time.perf_counter(); moe_probe.probe_model(model, windows, args.batch); sync()
        t_probe.append(time.perf_counter() - t0)
    p, q = min(t_plain), min(t_probe)
    print(f"model {args.model}, {windows.numel()} tokens, ctx {args.ctx}, batch {args.batch}, device {args.device}")
    print(f"plain forward: {p:.2f} s (best of {args.repeats}: {', '.join(f'{t:.2f}' for t in t_plain)})")
    print(f"probe pass:    {q:.2f} s (best of {args.repeats}: {', '.join(f'{t:.2f}' for t in t_probe)})")
    print(f"probe / plain: {q / p:.3f}x (target <= 1.3x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
