"""Calibrated quantization methods: proxy loss against clip and speed, on real SmolLM2 statistics and on
fused expert tensors.

    python tests/bench/bench_quant_methods_speed.py smollm2 [--bits 4 3 --methods clip wclip gptq awq]
    python tests/bench/bench_quant_methods_speed.py experts [--preset cpu-small | --preset 122b --device cuda]
    python tests/bench/bench_quant_methods_speed.py starve          # the expert-aware rule, on routed SmolLM2 tokens

smollm2: runs calibration text (CPython's pydoc topics, odd topics; even topics are held out) through the
BF16 SmolLM2 with forward hooks, captures H = mean x x^T at the input of every linear of every layer, then
quantizes all 210 linears with each method and prints sum tr(dW H dW^T) relative to clip, on the
calibration H and on the held-out H, how many tensors lose to clip, and the wall/CPU time of each method.

experts: a fused gate_up and down tensor ([E, in, out], contraction axis 1) with per-expert correlated H;
times GPTQ batched over experts against a Python loop over (a subset of) experts and checks that both give
the same codes. Preset 122b is the Qwen3.5-122B layer shape in bf16 (a GPU job).

starve: experts see few tokens. A random-projection "router" sends each token to the top 1/8 of 8
directions; for one routed slice of layer inputs it compares, on held-out routed tokens, GPTQ with H from
n of the expert's own tokens, with the layer's pooled H, and blended (quant_methods.blend_expert_hessians).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

import bench_paths  # tests/bench/ is on the path of a script run from it

ROOT = bench_paths.use_project_modules()

import moe_quant as mq  # noqa: E402
import quant_methods as qm  # noqa: E402

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")
SHARED_INPUT = {"self_attn.k_proj": "self_attn.q_proj", "self_attn.v_proj": "self_attn.q_proj",
                "mlp.up_proj": "mlp.gate_proj"}


def split_texts() -> tuple[str, str]:
    """(calibration, held-out) text: pydoc topics, odd ones calibrate, even ones are held out."""
    from pydoc_data import topics

    items = [topics.topics[k] for k in sorted(topics.topics)]
    return "\n\n".join(items[1::2]), "\n\n".join(items[0::2])


def windows(tok, text: str, n: int, ctx: int) -> torch.Tensor:
    ids = tok(text, return_tensors="pt").input_ids[0]
    if ids.numel() < n * ctx:
        raise SystemExit(f"text has {ids.numel()} tokens, fewer than the {n} x {ctx} requested")
    return ids[: n * ctx].view(n, ctx)


@torch.no_grad()
def capture(model, ids: torch.Tensor, keep: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """{linear name: H (fp32 mean x x^T)} for the input of every hooked linear; `keep` names also return X."""
    sums, counts, kept, hooks = {}, {}, {}, []
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or ".layers." not in name:
            continue
        short = name.split(".layers.")[1].split(".", 1)[1]
        if short not in LINEARS or short in SHARED_INPUT:
            continue

        def hook(m, args, name=name):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + (x.T @ x).double()
            counts[name] = counts.get(name, 0) + x.shape[0]
            if name in keep:
                kept.setdefault(name, []).append(x.clone())
        hooks.append(mod.register_forward_pre_hook(hook))
    try:
        for row in ids:
            model(row[None])
    finally:
        for h in hooks:
            h.remove()
    hs = {k: (v / counts[k]).float() for k, v in sums.items()}
    return hs, {k: torch.cat(v) for k, v in kept.items()}


def load_smollm2(cache: Path | None, n_calib: int, n_eval: int, ctx: int, keep=()):
    import embedded_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = embedded_model.smollm2_bf16_dir(log=lambda *a: print(*a, file=sys.stderr))
    base = f"smollm2-{n_calib}x{ctx}-{n_eval}-"
    path = cache / f"{base}{'-'.join(keep) or 'none'}.pt" if cache else None
    blob = None
    for cand in sorted(cache.glob(base + "*.pt")) if cache and cache.is_dir() else []:
        loaded = torch.load(cand)
        if all(k in loaded["x_cal"] for k in keep):  # any cached capture that kept what we need
            blob = loaded
            break
    if blob is None:
        tok = AutoTokenizer.from_pretrained(str(ckpt))
        model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
        calib, held = split_texts()
        t0 = time.perf_counter()
        h_cal, x_cal = capture(model, windows(tok, calib, n_calib, ctx), keep)
        h_eval, x_eval = capture(model, windows(tok, held, n_eval, ctx), keep)
        print(f"captured H on {n_calib}x{ctx} calibration + {n_eval}x{ctx} held-out tokens in "
              f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
        weights = {n: p.detach().to(torch.bfloat16) for n, p in model.named_parameters()
                   if n.endswith(".weight") and any(n.endswith(l + ".weight") for l in LINEARS)}
        blob = {"h_cal": h_cal, "h_eval": h_eval, "x_cal": x_cal, "x_eval": x_eval, "weights": weights}
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(blob, path)
    return blob


def h_for(hs: dict, weight_name: str) -> torch.Tensor:
    mod = weight_name[: -len(".weight")]
    for short, src in SHARED_INPUT.items():
        if mod.endswith(short):
            mod = mod[: -len(short)] + src
    return hs[mod]


def timed(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def cmd_smollm2(args) -> None:
    blob = load_smollm2(args.cache, args.calib_windows, args.eval_windows, args.ctx)
    weights = blob["weights"]
    print(f"SmolLM2-135M: {len(weights)} linears; H from {args.calib_windows}x{args.ctx} calibration tokens "
          f"(pydoc odd topics), held-out H from {args.eval_windows}x{args.ctx} (even topics); grid {args.grid}, "
          f"g{args.group}; threads {torch.get_num_threads()}")
    print(f"{'bits':>4} {'method':>7} {'cal/clip':>9} {'held/clip':>10} {'worse':>6} {'worst':>7} {'wall s':>7} {'cpu s':>7}")
    for bits in args.bits:
        spec = mq.QuantSpec(bits, group=args.group, grid=args.grid)
        clip_cal = clip_eval = None
        for name in args.methods:
            method = qm.MethodSpec(name, act_order=args.act_order, awq_grid=args.awq_grid)
            cal = held = 0.0
            per = []
            wall = cpu = 0.0
            for wname, w in weights.items():
                hc, he = h_for(blob["h_cal"], wname), h_for(blob["h_eval"], wname)
                res, dt, dc = timed(lambda: qm.quantize_with_method(w, spec, method, hessian=hc))
                wall += dt
                cpu += dc
                pc, pe = qm.proxy_loss(w, res.dequant, hc), qm.proxy_loss(w, res.dequant, he)
                cal += pc
                held += pe
                per.append(pc)
            if name == "clip":
                clip_cal, clip_eval, clip_per = cal, held, per
            if clip_cal is None:
                raise SystemExit("put clip first in --methods: the others are reported relative to it")
            ratios = [a / b if b > 0 else 1.0 for a, b in zip(per, clip_per)]
            print(f"{bits:>4g} {name:>7} {cal / clip_cal:>9.3f} {held / clip_eval:>10.3f} "
                  f"{sum(r > 1 for r in ratios):>6} {max(ratios):>7.3f} {wall:>7.1f} {cpu:>7.1f}", flush=True)


def expert_case(e, k, n, seed, dtype, device):
    """[E, k, n] weights (contraction axis 1) and per-expert correlated H [E, k, k], made on `device`."""
    g = torch.Generator(device=device).manual_seed(seed)
    w = (torch.randn(e, k, n, generator=g, device=device) * 0.02).to(dtype)
    base = torch.randn(k, k, generator=g, device=device) / k ** 0.5 + torch.eye(k, device=device)
    h = torch.empty(e, k, k, device=device)
    tokens = max(256, k // 4)
    for e0 in range(0, e, 32):
        x = torch.randn(min(32, e - e0), tokens, k, generator=g, device=device) @ base
        h[e0:e0 + x.shape[0]] = x.transpose(1, 2) @ x / tokens + 0.05 * torch.eye(k, device=device)
    return w, h


def sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def cmd_experts(args) -> None:
    presets = {"cpu-small": [("gate_up", 16, 256, 512), ("down", 16, 512, 256)],
               "122b": [("gate_up", 256, 2048, 3072), ("down", 256, 3072, 1024)]}
    dtype = torch.bfloat16
    spec = mq.QuantSpec(args.bits, group=args.group, grid=args.grid)
    print(f"GPTQ on fused experts, {spec.grid} int{spec.bits:g} g{spec.group}, bf16, device {args.device}"
          + (" (torch path, as on GPU)" if args.torch_path or not args.device.startswith("cpu") else " (CPU kernel)")
          + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else f", {torch.get_num_threads()} threads"))
    for tname, e, k, n in presets[args.preset]:
        e = max(1, e // args.shrink_experts)
        w, h = expert_case(e, k, n, 0, dtype, args.device)
        method = qm.MethodSpec("gptq", act_order=args.act_order)
        run = lambda ww, hh: qm.quantize_with_method(ww, spec, method, axis=ww.ndim - 2, hessian=hh,  # noqa: E731
                                                     use_kernel=not args.torch_path)
        run(w[:1], h[:1])  # warm-up (kernels, numba compile)
        sync(args.device)
        res, dt_b, _ = timed(lambda: (run(w, h), sync(args.device))[0])
        loop_n = min(e, args.loop_experts)
        loop_codes = []

        def loop():
            for i in range(loop_n):
                loop_codes.append(run(w[i], h[i]).codes)
            sync(args.device)
        _, dt_l, _ = timed(loop)
        same = all(torch.equal(res.codes[i], c) for i, c in enumerate(loop_codes))
        frac = sum(float((res.codes[i] == c).float().mean()) for i, c in enumerate(loop_codes)) / loop_n
        est = dt_l * e / loop_n
        print(f"{tname:>8} [{e}, {k}, {n}]: batched {dt_b:.2f} s; per-expert loop {dt_l:.2f} s for {loop_n} experts "
              f"-> {est:.1f} s for {e} (x{est / dt_b:.1f}); codes {'identical' if same else f'{frac:.5f} equal'}",
              flush=True)
        del w, h, res


def cmd_starve(args) -> None:
    layer = args.layer
    keep = (f"model.layers.{layer}.mlp.gate_proj", f"model.layers.{layer}.mlp.down_proj")
    blob = load_smollm2(args.cache, args.calib_windows, args.eval_windows, args.ctx, keep)
    spec = mq.QuantSpec(args.bits, group=args.group, grid=args.grid)
    g = torch.Generator().manual_seed(0)
    print(f"Expert starvation, SmolLM2 layer {layer}, int{args.bits:g} g{args.group}: an 'expert' = the tokens a "
          f"random router sends to 1 of 8 directions (top-2 of 8); own H from n of its calibration tokens; pooled H "
          f"from all {blob['x_cal'][keep[0]].shape[0]} calibration tokens; score = tr(dW H dW^T) on the expert's "
          f"held-out tokens / clip's (lower is better)")
    rows = []
    for mod in keep:
        w = blob["weights"][mod + ".weight"]
        xc, xe = blob["x_cal"][mod], blob["x_eval"][mod]
        router = torch.randn(xc.shape[1], 8, generator=g)
        pooled = xc.T @ xc / xc.shape[0]
        for expert in range(args.experts):
            def routed(x):
                return x[((x @ router).topk(2, dim=1).indices == expert).any(dim=1)]
            own_all, held = routed(xc), routed(xe)
            h_held = held.T @ held / held.shape[0]
            clip = qm.proxy_loss(w, mq.quantize_tensor(w, spec).dequant, h_held)
            print(f"{mod.split('.', 3)[-1]} [{w.shape[0]}x{w.shape[1]}] expert {expert}: {own_all.shape[0]} calibration, "
                  f"{held.shape[0]} held-out tokens", flush=True)
            for n_tok in args.tokens:
                if n_tok > own_all.shape[0]:
                    continue
                x = own_all[torch.randperm(own_all.shape[0], generator=g)[:n_tok]]
                h_own = x.T @ x / n_tok
                candidates = [("own", h_own), ("pooled", pooled)]
                for t in args.min_tokens:
                    for rule in qm.BLEND_RULES:
                        candidates.append((f"{rule}{t}", qm.blend_expert_hessians(h_own[None], [n_tok], pooled, t, rule)[0][0]))
                scores = {}
                for label, hh in candidates:
                    for name in args.methods:
                        r = qm.quantize_with_method(w, spec, qm.MethodSpec(name), hessian=hh)
                        scores[f"{name}/{label}"] = qm.proxy_loss(w, r.dequant, h_held) / clip
                rows.append((n_tok, scores))
                print(f"    n={n_tok:>5}: " + " ".join(f"{k}={v:.3f}" for k, v in scores.items()), flush=True)
    print("mean over experts and linears (held-out proxy / clip):")
    for n_tok in args.tokens:
        sel = [sc for n, sc in rows if n == n_tok]
        if sel:
            print(f"  n={n_tok:>5}: " + " ".join(f"{k}={sum(s[k] for s in sel) / len(sel):.3f}" for k in sel[0]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("smollm2", "experts", "starve"):
        p = sub.add_parser(name)
        p.add_argument("--grid", default="sym", choices=mq.GRIDS)
        p.add_argument("--group", type=int, default=128)
        p.add_argument("--act-order", action="store_true")
        p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
        if name != "experts":
            p.add_argument("--calib-windows", type=int, default=16)
            p.add_argument("--eval-windows", type=int, default=8)
            p.add_argument("--ctx", type=int, default=512)
            p.add_argument("--cache", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "moe-lowbit-bench-h",
                           help="where captured statistics are kept between runs")
    s = sub.choices["smollm2"]
    s.add_argument("--bits", type=float, nargs="+", default=[4.0, 3.0])
    s.add_argument("--methods", nargs="+", default=["clip", "rtn", "wclip", "gptq", "awq"], choices=qm.METHODS)
    s.add_argument("--awq-grid", type=int, default=20)
    x = sub.choices["experts"]
    x.add_argument("--preset", default="cpu-small", choices=("cpu-small", "122b"))
    x.add_argument("--device", default="cpu")
    x.add_argument("--bits", type=float, default=3.0)
    x.add_argument("--loop-experts", type=int, default=8, help="experts timed in the per-expert loop (extrapolated)")
    x.add_argument("--torch-path", action="store_true", help="on CPU, run the device-generic torch path (what a GPU runs)")
    x.add_argument("--shrink-experts", type=int, default=1, help="divide the preset's expert count (a quick dry run)")
    st = sub.choices["starve"]
    st.add_argument("--layer", type=int, default=7)
    st.add_argument("--bits", type=float, default=3.0)
    st.add_argument("--tokens", type=int, nargs="+", default=[64, 256, 1024])
    st.add_argument("--min-tokens", type=int, nargs="+", default=[1024, 4096])
    st.add_argument("--experts", type=int, default=2)
    st.add_argument("--methods", nargs="+", default=["gptq"], choices=qm.METHODS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    {"smollm2": cmd_smollm2, "experts": cmd_experts, "starve": cmd_starve}[args.cmd](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
