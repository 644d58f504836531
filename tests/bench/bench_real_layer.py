"""A one-layer checkpoint with the 122B's exact dims, and a calibrated (gptq) build of it, batched against
unbatched: wall time, peak RSS, the routed experts' quantization calls and their batch sizes, grid check, and
whether every scattered expert equals its unbatched build bit for bit.

The checkpoint (random bf16 weights, made here): Qwen3.5-MoE text, hidden 3072, one Gated-DeltaNet layer
(16 key / 64 value heads of 128), 256 routed experts of intermediate 1024 stored per expert as on the hub
(`mlp.experts.N.{gate,up,down}_proj.weight`), a 1024 shared expert, vocab 248320 with an untied lm_head (~8 GB).

    python tests/bench/bench_real_layer.py make DIR            # write the checkpoint
    python tests/bench/bench_real_layer.py make DIR --experts 16 --vocab 8192   # a slice: the same expert shapes
    python tests/bench/bench_real_layer.py run DIR [--tokens 4096] [--modes 0,1] [--json OUT.json]
    python tests/bench/bench_real_layer.py slice [--experts 16 --rows 3072 --cols 1024] [--json OUT.json]   # one kind
    python tests/bench/bench_real_layer.py table OUT.json ...   # the rows of docs/SIZING.md's real-layer table

`run` builds with `quant_save --method gptq --expert-batch N` for each N of --modes (0 = batched, auto chunk;
1 = one call per expert tensor) under `/usr/bin/time -v` (peak RSS = its "Maximum resident set size"), one
build at a time; wrap it in `flock /tmp/moe_heavy.lock` on a shared box.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_paths import use_project_modules

ROOT = use_project_modules()
DIMS = dict(hidden_size=3072, num_hidden_layers=1, layer_types=["linear_attention"], num_experts=256,
            num_experts_per_tok=8, moe_intermediate_size=1024, shared_expert_intermediate_size=1024,
            vocab_size=248320, tie_word_embeddings=False, linear_num_key_heads=16, linear_num_value_heads=64,
            linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4, num_attention_heads=32,
            num_key_value_heads=2, head_dim=256, max_position_embeddings=4096)
FUSED = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<proj>gate_up_proj|down_proj)$")
SHARD_BYTES = 2 << 30


def _byte_tokenizer(out: Path) -> None:
    """Ids 0..255 are bytes, 256 / 257 are <s> / </s>: calibration text tokenizes without a 248k vocab file."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={**{c: i for i, c in enumerate(symbols)}, "<s>": 256, "</s>": 257}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                           "bos_token": "<s>", "eos_token": "</s>"}))


def _disk_tensors(name: str, shape):
    """(disk name, shape) of one in-memory parameter: fused experts become per-expert 2-D tensors."""
    m = FUSED.match(name)
    if not m:
        return [(name, tuple(shape))]
    e, rows, cols = shape
    if m["proj"] == "down_proj":
        return [(f"{m['prefix']}.{i}.down_proj.weight", (rows, cols)) for i in range(e)]
    return [(f"{m['prefix']}.{i}.{p}_proj.weight", (rows // 2, cols)) for i in range(e) for p in ("gate", "up")]


def make(out: Path, seed: int = 0, **overrides) -> None:
    import torch
    import transformers
    from accelerate import init_empty_weights
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    cfg = transformers.AutoConfig.for_model("qwen3_5_moe_text", **{**DIMS, **overrides})
    with init_empty_weights():
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    cfg.save_pretrained(out)
    _byte_tokenizer(out)
    gen = torch.Generator().manual_seed(seed)
    weight_map, shard, size, n = {}, {}, 0, 0

    def flush():
        nonlocal shard, size, n
        if shard:
            fname = f"model-{n:05d}.safetensors"
            save_file(shard, str(out / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
            shard, size, n = {}, 0, n + 1

    for pname, p in model.named_parameters():
        for disk, shape in _disk_tensors(pname, p.shape):
            if len(shape) == 1:
                t = 1.0 + 0.05 * torch.randn(shape, generator=gen)
            else:
                t = torch.randn(shape, generator=gen) * (shape[-1] ** -0.5)
            shard[disk] = t.to(torch.bfloat16)
            size += shard[disk].numel() * 2
            if size >= SHARD_BYTES:
                flush()
    flush()
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum((out / f).stat().st_size for f in set(weight_map.values()))},
         "weight_map": weight_map}, indent=1))
    print(f"wrote {out}: {len(weight_map)} tensors in {n} shards")


def _build(model: Path, out: Path, tokens: int, expert_batch: int) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "src" / d) for d in ("quant", "eval", "distill")] + [os.environ.get("PYTHONPATH", "")])}
    cmd = ["/usr/bin/time", "-v", sys.executable, str(ROOT / "src/quant/quant_save.py"), "--model", str(model),
           "--out", str(out), "--method", "gptq", "--calib", "pydoc-topics", "--calib-tokens", str(tokens),
           "--calib-ctx", "512", "--expert-batch", str(expert_batch), "--no-progress", "--force"]
    load0, t0 = os.getloadavg(), time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    cpu = re.search(r"User time \(seconds\): ([\d.]+)\s+System time \(seconds\): ([\d.]+)", proc.stderr)
    rec = {"expert_batch": expert_batch, "rc": proc.returncode, "wall_s": round(wall, 1),
           "cpu_s": round(float(cpu.group(1)) + float(cpu.group(2)), 1) if cpu else None,
           "peak_rss_GB": round(int(rss.group(1)) / 2**20, 2) if rss else None,
           "loadavg_1m_start_end": [round(load0[0], 2), round(os.getloadavg()[0], 2)], "nproc": os.cpu_count()}
    if proc.returncode != 0:
        rec["stderr_tail"] = proc.stderr[-2000:]
        return rec
    meta = json.loads((out / "_ptq_meta.json").read_text())
    rec["stage_seconds"] = meta["timings"]["calibration_stage_seconds"]
    rec["calls"] = {m: r.get("calls") for m, r in meta["experts"].items()}
    rec["shards_sha256"] = {f: s["output"]["sha256"] for f, s in meta["shards"].items()}
    return rec


def _grid_ok(out: Path, bits: float = 3.0, group: int = 128, experts=(0, 77, 255)) -> bool:
    """Every group of a few routed experts' outputs holds at most 2^bits distinct values (the grid's levels)."""
    from safetensors import safe_open

    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    for e in experts:
        for proj in ("gate_proj", "up_proj", "down_proj"):
            name = next(n for n in index if n.endswith(f".experts.{e}.{proj}.weight"))
            with safe_open(str(out / index[name]), framework="pt") as st:
                w = st.get_tensor(name).float()
            groups = w.reshape(w.shape[0], -1, group)
            levels = max(len(set(g.tolist())) for g in groups.reshape(-1, group)[::97])
            if levels > 2 ** bits:
                return False
    return True


def run(model: Path, tokens: int, modes: list[int], json_out: str | None) -> None:
    results = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        for mode in modes:
            out = Path(tmp) / f"out-{mode}"
            rec = _build(model, out, tokens, mode)
            if rec["rc"] == 0:
                rec["grid_ok"] = _grid_ok(out)
            print(json.dumps(rec), flush=True)
            results.append(rec)
    ok = [r for r in results if r["rc"] == 0]
    same = None
    if len(ok) > 1:
        same = all(r["shards_sha256"] == ok[0]["shards_sha256"] for r in ok)
        print(f"batched and unbatched outputs bit-identical: {same}")
    for r in results:
        print(f"expert_batch={r['expert_batch']}: rc {r['rc']}  wall {r['wall_s']} s  peak RSS {r['peak_rss_GB']} GB")
    if json_out:
        Path(json_out).write_text(json.dumps({"tokens": tokens, "dims": DIMS, "runs": results,
                                              "bit_identical": same if len(ok) > 1 else "-"}, indent=1))


def slice_bench(experts: int, rows: int, cols: int, tokens: int, reuse: bool = True) -> dict:
    """One projection kind of `experts` experts quantized with gptq as one [E, R, K] call and as E single calls
    (what a build with --expert-batch 0 / 1 does per chunk): wall time of each, and bit-identity."""
    import torch

    import dataclasses

    import build_plan
    import layer_io
    import model_adapters
    import weight_quant
    from ckpt_source import TensorEntry

    malloc_reuse = reuse and layer_io.reuse_freed_memory()  # as the calibrated CPU build does

    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(experts, rows, cols, generator=gen) * cols ** -0.5).to(torch.bfloat16)
    x = torch.randn(experts, tokens, cols, generator=gen)
    h = x.transpose(1, 2) @ x / tokens
    recipe = model_adapters.Recipe(method="gptq")
    role = model_adapters.TensorRole(model_adapters.Role.ROUTED_EXPERT, axis=-1)
    plan = build_plan.TensorPlan(TensorEntry("e", "BF16", (rows, cols), 0, 0), role, recipe.spec_for(role, True, 2))
    plan3 = dataclasses.replace(plan, role=dataclasses.replace(role, axis=-1))
    weight_quant.quantize_weight("warm-up", w[:1], plan3, recipe, hessian=h[:1], compare_clip=True)  # numba JIT
    t0, c0 = time.perf_counter(), time.process_time()
    batched = weight_quant.quantize_weight("stack", w, plan3, recipe, hessian=h, compare_clip=True).dequant
    t_batched, c_batched = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    single = [weight_quant.quantize_weight(f"e{e}", w[e], plan, recipe, hessian=h[e], compare_clip=True).dequant
              for e in range(experts)]
    t_single, c_single = time.perf_counter() - t0, time.process_time() - c0
    same = all(torch.equal(batched[e], single[e]) for e in range(experts))
    print(f"{experts} experts of [{rows}, {cols}] (gptq, {tokens} tokens of H): one [E, R, K] call {t_batched:.1f} s "
          f"wall / {c_batched:.1f} s CPU, {experts} single calls {t_single:.1f} s wall / {c_single:.1f} s CPU; "
          f"bit-identical: {same} (CPU time: all threads of this process; wall depends on the box's load)")
    return {"experts": experts, "rows": rows, "cols": cols, "tokens": tokens, "bit_identical": same,
            "batched": {"wall_s": round(t_batched, 1), "cpu_s": round(c_batched, 1)},
            "single": {"wall_s": round(t_single, 1), "cpu_s": round(c_single, 1)},
            "malloc_reuse": malloc_reuse, "loadavg_1m": round(os.getloadavg()[0], 2), "nproc": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def table(paths: list[str]) -> str:
    """Markdown rows for docs/SIZING.md from the JSON files `run --json` and `slice --json` wrote."""
    lines = ["| what | mode | wall | CPU | peak RSS | calls x batch | bit-identical | load avg (2 cores) |",
             "|---|---|---|---|---|---|---|---|"]
    recs = [json.loads(Path(path).read_text()) for path in paths]
    builds = [r["shards_sha256"] for rec in recs for r in rec.get("runs", []) if r["rc"] == 0]
    across = all(b == builds[0] for b in builds) if len(builds) > 1 else "-"  # runs from separate files too
    for rec in recs:
        if "runs" in rec:
            same = across
            for r in rec["runs"]:
                calls = [f"{k}: {v['calls']} x {sorted(set(v['batch_sizes']))}" for m in (r.get("calls") or {}).values()
                         for k, v in (m or {}).items()]
                mode = "batched (auto chunk)" if r["expert_batch"] == 0 else f"--expert-batch {r['expert_batch']}"
                lines.append(f"| full layer, {rec['tokens']} tokens | {mode} | {r['wall_s']} s | {r.get('cpu_s', '-')} s "
                             f"| {r['peak_rss_GB']} GiB | {'; '.join(calls) or '-'} | {same} "
                             f"| {r.get('loadavg_1m_start_end', '-')} |" if r["rc"] == 0 else
                             f"| full layer, {rec['tokens']} tokens | {mode} | failed rc {r['rc']} | | | | | |")
        else:
            shape = f"{rec['experts']} x [{rec['rows']}, {rec['cols']}]" + ("" if rec.get("malloc_reuse") else ", mmap per block")
            for mode, key in (("one [E, R, K] call", "batched"), (f"{rec['experts']} single calls", "single")):
                lines.append(f"| slice {shape}, gptq | {mode} | {rec[key]['wall_s']} s | {rec[key]['cpu_s']} s | - | - "
                             f"| {rec['bit_identical']} | {rec['loadavg_1m']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make", help="write the one-layer real-shape checkpoint")
    m.add_argument("dir")
    m.add_argument("--experts", type=int, default=DIMS["num_experts"], help="routed experts (default the 122B's 256)")
    m.add_argument("--vocab", type=int, default=DIMS["vocab_size"], help="vocabulary (default the 122B's 248320)")
    r = sub.add_parser("run", help="calibrated builds of it, batched and unbatched")
    r.add_argument("dir")
    r.add_argument("--tokens", type=int, default=4096)
    r.add_argument("--modes", default="0,1", help="--expert-batch values, one build each (0 batched, 1 unbatched)")
    r.add_argument("--json", help="also write the figures here")
    sl = sub.add_parser("slice", help="one projection kind of a few experts: one batched call against single calls")
    sl.add_argument("--experts", type=int, default=16)
    sl.add_argument("--rows", type=int, default=3072, help="output rows (3072: down_proj; 1024: gate or up)")
    sl.add_argument("--cols", type=int, default=1024, help="contraction (1024: down_proj; 3072: gate or up)")
    sl.add_argument("--tokens", type=int, default=2048)
    sl.add_argument("--json", help="also write the figures here")
    sl.add_argument("--no-reuse", action="store_true", help="leave glibc's mmap per large block (the old default)")
    t = sub.add_parser("table", help="markdown rows for docs/SIZING.md from JSON files of run / slice")
    t.add_argument("json", nargs="+")
    args = ap.parse_args(argv)
    if args.cmd == "table":
        print(table(args.json))
    elif args.cmd == "slice":
        rec = slice_bench(args.experts, args.rows, args.cols, args.tokens, not args.no_reuse)
        if args.json:
            Path(args.json).write_text(json.dumps(rec, indent=1))
    elif args.cmd == "make":
        make(Path(args.dir), num_experts=args.experts, vocab_size=args.vocab)
    else:
        run(Path(args.dir), args.tokens, [int(x) for x in args.modes.split(",")], args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
