"""The first GPU run: the figures the 122B path rests on, in one JSON, in under 8 minutes on one H100.

    bash tests/bench/gpu_check.sh [--out FILE]      # GPU 0
    bash tests/bench/gpu_check.sh --cpu             # the same script at reduced size, here (a test runs it)

Needs only what the device image has (CUDA torch, transformers, numba, triton): no vLLM, no network, no
venv. Each part is timed with device synchronization, records its shapes, and on failure records the error
instead of ending the run, so one JSON always comes back:
* clip: moe_quant.quantize_tensor (3 bits, g128, 16-step search) on a bf16 expert slice -> GB/s of weights;
* gptq: gptq.gptq_batched on the real gate_up [256, 2048, 3072] (contracting 3072) and down [256, 3072, 1024]
  (contracting 1024) in bf16, against a per-expert loop on a slice (extrapolated), with the codes compared;
* gdn_forward: one Qwen3.5 linear-attention decoder layer (real dims, 256 experts) forward at 8k tokens,
  with the fla kernels when installed (skipped with the reason when not, and the torch fallback timed at 1k);
* fsdp2_step: opd_train_fsdp under torchrun, world size 1 (nccl; gloo with --cpu), on a tiny qwen3_moe fixture.
sizing.load_costs reads the JSON (`--costs FILE`): its "costs" block holds the measured rates.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import bench_paths  # tests/bench/ is on the path of a script run from it

ROOT = bench_paths.use_project_modules()

import torch  # noqa: E402

SIZES = {  # full: the 122B's shapes; cpu: the same code at a size this 2-core box runs in about a minute
    "full": dict(experts=256, hidden=3072, inter=1024, loop_experts=8, clip_experts=32, tokens=8192, fallback_tokens=1024),
    "cpu": dict(experts=4, hidden=384, inter=128, loop_experts=2, clip_experts=2, tokens=256, fallback_tokens=64),
}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def part(name: str, results: dict, fn) -> None:
    """Run one part; its figures, or its error, go into results[name]."""
    t0 = time.perf_counter()
    try:
        results[name] = {"status": "ok", **fn()}
    except Exception as e:  # a failing part must not cost the other parts' figures
        results[name] = {"status": "error", "error": f"{type(e).__name__}: {e}"[:2000],
                         "traceback": traceback.format_exc()[-3000:]}
    results[name]["wall_s"] = round(time.perf_counter() - t0, 3)
    if torch.cuda.is_available():
        results[name]["peak_gpu_GB"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.empty_cache()
    print(f"gpu_check: {name}: {results[name]['status']} in {results[name]['wall_s']:.1f} s", file=sys.stderr)


def check_clip(size: dict, device: str) -> dict:
    import moe_quant

    spec = moe_quant.QuantSpec(bits=3.0, group=128, clip_steps=16, clip_lo=0.65, grid="sym")
    w = torch.randn(size["clip_experts"], 2 * size["inter"], size["hidden"], device=device).to(torch.bfloat16)
    moe_quant.quantize_tensor(w[:1], spec)  # warm-up (kernel compile)
    _, s = timed(lambda: moe_quant.quantize_tensor(w, spec), device)
    return {"shape": list(w.shape), "seconds": s, "GB_per_s": w.numel() * 2 / s / 1e9,
            "s_per_gparam": s / w.numel() * 1e9}


def random_hessian(e: int, k: int, device: str, rank: int = 256) -> torch.Tensor:
    """[E, K, K] SPD fp32: low rank + a ridge (cheap to make at K = 3072, like a real H conditioned by damping)."""
    a = torch.randn(e, k, min(rank, k), device=device)
    h = a @ a.transpose(1, 2) / a.shape[-1]
    h.diagonal(dim1=-2, dim2=-1).add_(0.1)
    return h


def gptq_one(e: int, r: int, k: int, loop: int, device: str) -> dict:
    import gptq
    import moe_quant

    spec = moe_quant.QuantSpec(bits=3.0, group=128, clip_steps=16, clip_lo=0.65, grid="full")
    w = (torch.randn(e, r, k, device=device) * 0.02).to(torch.bfloat16)
    h = random_hessian(e, k, device)
    gptq.gptq_batched(w[:1, :128], h[:1], spec)  # warm-up
    batched, s_batched = timed(lambda: gptq.gptq_batched(w, h, spec), device)
    codes = batched[0][:loop].clone()
    del batched
    looped, s_loop = timed(lambda: [gptq.gptq_batched(w[i:i + 1], h[i:i + 1], spec)[0] for i in range(loop)], device)
    same = torch.cat(looped).eq(codes).float().mean().item()
    flops = e * (k**3 + 2 * r * k * k)
    return {"shape": [e, r, k], "batched_s": s_batched, "loop_s_per_expert": s_loop / loop,
            "loop_s_extrapolated": s_loop / loop * e, "speedup": s_loop / loop * e / s_batched,
            "codes_equal_fraction": same, "gflops_batched": flops / s_batched / 1e9}


def check_gptq(size: dict, device: str) -> dict:
    e, h, i = size["experts"], size["hidden"], size["inter"]
    gate_up = gptq_one(e, 2 * i, h, size["loop_experts"], device)
    torch.cuda.empty_cache() if device.startswith("cuda") else None
    down = gptq_one(e, h, i, size["loop_experts"], device)
    return {"gate_up": gate_up, "down": down, "layer_s": gate_up["batched_s"] + down["batched_s"],
            "gflops": (gate_up["gflops_batched"] * gate_up["batched_s"] + down["gflops_batched"] * down["batched_s"])
            / (gate_up["batched_s"] + down["batched_s"])}


def gdn_layer(size: dict, device: str):
    from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as m
    from transformers.models.qwen3_5_moe.configuration_qwen3_5_moe import Qwen3_5MoeTextConfig

    full = size["hidden"] == 3072
    cfg = Qwen3_5MoeTextConfig(hidden_size=size["hidden"], num_hidden_layers=1, layer_types=["linear_attention"],
                               num_experts=size["experts"], num_experts_per_tok=8 if full else 2,
                               moe_intermediate_size=size["inter"], shared_expert_intermediate_size=size["inter"],
                               linear_num_key_heads=16 if full else 2, linear_num_value_heads=64 if full else 4,
                               linear_key_head_dim=128 if full else 32, linear_value_head_dim=128 if full else 32,
                               num_attention_heads=32 if full else 4, num_key_value_heads=2, head_dim=256 if full else 32,
                               vocab_size=1024)
    with torch.device(device):
        layer = m.Qwen3_5MoeDecoderLayer(cfg, layer_idx=0).to(torch.bfloat16).eval()
        rope = m.Qwen3_5MoeTextRotaryEmbedding(cfg)
    return layer, rope


def check_gdn(size: dict, device: str) -> dict:
    fla = importlib.util.find_spec("fla") is not None
    conv = importlib.util.find_spec("causal_conv1d") is not None
    layer, rope = gdn_layer(size, device)
    n = size["tokens"] if fla else size["fallback_tokens"]
    x = torch.randn(1, n, size["hidden"], device=device, dtype=torch.bfloat16)
    pos = torch.arange(n, device=device)[None, None].expand(3, 1, n)  # multimodal rope: (t, h, w) position rows
    with torch.no_grad():
        pe = rope(x, pos)
        layer(x[:, :16], position_embeddings=rope(x[:, :16], pos[..., :16]))  # warm-up (triton autotune when fla)
        _, s = timed(lambda: layer(x, position_embeddings=pe), device)
    out = {"fla": fla, "causal_conv1d": conv, "tokens": n, "seconds": s, "tokens_per_s": n / s}
    if not fla:
        out.update(status_note=f"skipped at {size['tokens']} tokens: flash-linear-attention is not installed "
                               f"(transformers' torch fallback timed at {n} tokens instead)")
    return out


def check_fsdp(device: str, workdir: Path) -> dict:
    import opd_data
    import opd_score
    import quant_save
    import tiny_models
    import atomic_io

    src = tiny_models.build_tiny_checkpoint("qwen3_moe", workdir / "src", byte_tokenizer=True)
    teacher = tiny_models.build_tiny_checkpoint("qwen3_moe", workdir / "teacher", seed=1, byte_tokenizer=True)
    student = workdir / "student"
    assert quant_save.main(["--model", str(src), "--out", str(student), "--clip-steps", "4", "--no-progress"]) == 0
    rollouts = workdir / "rollouts.jsonl"
    jsonl = opd_data.ResumableJsonl(rollouts, opd_data.header_for("opd-rollouts", {"model": "gpu_check", "seed": 0}))
    jsonl.open(fresh=True)
    g = torch.Generator().manual_seed(0)
    jsonl.append([{"key": f"p{i}", "prompt_ids": [256] + torch.randint(0, 256, (4,), generator=g).tolist(),
                   "n_sampled": 1, "n_truncated": 0,
                   "samples": [{"completion_ids": torch.randint(0, 256, (12,), generator=g).tolist(), "text": "",
                                "finish_reason": "stop", "n_tokens": 12}]} for i in range(4)])
    atomic_io.write_json(opd_data.complete_marker(rollouts), {"prompts": 4})
    scores = workdir / "scores"
    opd_score.score(opd_score.ScoreConfig(teacher=str(teacher), rollouts=(str(rollouts),), out=str(scores),
                                          student=str(student), k=8, device=device))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(ROOT / d) for d in ("src/quant", "src/eval", "src/distill")),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           str(ROOT / "src/distill/opd_train_fsdp.py"), "--student", str(student), "--scores", str(scores),
           "--out", str(workdir / "run"), "--steps", "2", "--batch-seqs", "2", "--micro-seqs", "2", "--rank", "4",
           "--lora-roles", "routed_expert,attention", "--device", "cuda" if device.startswith("cuda") else "cpu",
           "--no-progress"]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        raise RuntimeError(f"torchrun exit {res.returncode}: {res.stderr[-1500:]}")
    log = json.loads((workdir / "run" / "train_log.json").read_text())
    return {"backend": "nccl" if device.startswith("cuda") else "gloo", "world_size": 1,
            "seconds": time.perf_counter() - t0, "steps": log["steps"], "losses": log["losses"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="run on the CPU at reduced size (the test mode)")
    ap.add_argument("--out", help="JSON to write (default $OUT/gpu_check.json, else results/gpu_check/<device>.json)")
    ap.add_argument("--parts", default="clip,gptq,gdn_forward,fsdp2_step", help="comma list of parts to run")
    a = ap.parse_args(argv)
    device = "cpu" if a.cpu else "cuda:0"
    if not a.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible; run with --cpu for the reduced CPU mode", file=sys.stderr)
        return 2
    size = SIZES["cpu" if a.cpu else "full"]
    name = "cpu" if a.cpu else torch.cuda.get_device_name(0).replace(" ", "_")
    out = Path(a.out or (Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT")
                         else ROOT / "results" / "gpu_check" / f"{name}.json"))
    results: dict = {}
    wanted = set(a.parts.split(","))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for key, fn in (("clip", lambda: check_clip(size, device)), ("gptq", lambda: check_gptq(size, device)),
                        ("gdn_forward", lambda: check_gdn(size, device)),
                        ("fsdp2_step", lambda: check_fsdp(device, Path(tmp)))):
            if key in wanted:
                part(key, results, fn)
    costs = {}
    if results.get("clip", {}).get("status") == "ok":
        costs["clip_s_per_gparam"] = results["clip"]["s_per_gparam"]
    if results.get("gptq", {}).get("status") == "ok":
        costs["gptq_gflops"] = results["gptq"]["gflops"]
    if not a.cpu:
        costs["gpu_mem_bytes"] = torch.cuda.get_device_properties(0).total_memory
    doc = {"name": f"gpu_check-{name}", "device": name, "size": size, "mode": "cpu" if a.cpu else "full",
           "torch": torch.__version__, "cuda": torch.version.cuda, "total_s": time.perf_counter() - t0,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "source": f"MEASURED by tests/bench/gpu_check.py on {name} (clip, gptq rates; the rest from the h100 table)",
           "costs": costs, "parts": results}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    print(f"gpu_check: wrote {out} ({doc['total_s']:.0f} s)", file=sys.stderr)
    return 0 if all(r["status"] == "ok" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
