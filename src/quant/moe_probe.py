"""One calibration pass with router hooks: how each layer's experts are used, as the allocator's input.

Per layer and routed expert: token frequency (top-k hits), router-weight mass (sum of the renormalised
routing weights), activation salience (sum of the L2 norm of the inputs routed to it), co-activation
(how often two experts share a token's top-k). Per layer: routing entropy of the expert shares
(normalised by log E: 1 = perfectly balanced, 0 = collapsed), the mean per-token router entropy, max/mean
share and the cold experts (< 10 % of the mean share).

Everything is accumulated on the model's device inside the hooks (bincount / index_add / one matmul); the
single device->host copy happens once at the end, so the probe costs about one plain forward. The pass is
`probe_stream`'s: one layer materialised at a time (bf16 by default), so memory is one layer whatever the depth.
The allocator's grid/levels/budget (`--levels --grid --group --budget`) are checked before the pass.

    python src/quant/moe_probe.py --model DIR|HUB_ID|embedded:NAME --calib-file F --tokens N --out probe.json
        [--ctx 512] [--device cpu|cuda] [--dtype bfloat16|float32] [--png-dir DIR] [--levels 2,3,4 --grid full]
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import atomic_io
from probe_stats import COLD_FRACTION, ProbeError, attach, find_routers, layer_stats, summarize  # noqa: F401

if TYPE_CHECKING:
    import torch

FORMAT = "moe-lowbit/probe/1"



def calibration_windows(tokenizer, text: str, n_tokens: int, ctx: int) -> torch.Tensor:
    """[n, ctx] windows of the text, BOS first (or EOS when there is no BOS); at most n_tokens."""
    import torch
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    per = ctx - (1 if start is not None else 0)
    n = min(len(ids) // per, math.ceil(n_tokens / ctx))
    if n < 1:
        raise ProbeError(f"the calibration text has {len(ids)} tokens, fewer than one window of {ctx}; "
                         f"lower --ctx or give more text")
    body = torch.tensor(ids[: n * per], dtype=torch.int64).reshape(n, per)
    if start is None:
        return body
    return torch.cat([torch.full((n, 1), start, dtype=torch.int64), body], dim=1)


def probe_model(model: torch.nn.Module, windows: torch.Tensor, batch: int = 4) -> dict:
    """Run the windows through the model with hooks; -> {"layers": [...], "summary": {...}}."""
    import torch
    with torch.no_grad():
        return _probe_model(model, windows, batch)


def _probe_model(model, windows, batch: int) -> dict:
    from tqdm import tqdm

    acc, handles = attach(model)
    dev = model.get_input_embeddings().weight.device
    top_k = int(getattr(model.config, "num_experts_per_tok", 0) or 0)
    try:
        for b in tqdm(range(0, windows.shape[0], batch), desc="probe", unit="batch"):
            model(input_ids=windows[b: b + batch].to(dev), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    layers = [{"layer": layer, **layer_stats(a, top_k)} for layer, a in sorted(acc.items())]
    return {"layers": layers, "summary": summarize(layers)}


def plot(probe: dict, png_dir: Path, stem: str) -> list[Path]:
    """Heatmap layer x expert share (relative to the mean) and entropy / max-over-mean per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = probe["layers"]
    rel = [[s * l["n_experts"] for s in l["share"]] for l in layers]
    fig, ax = plt.subplots(figsize=(max(4, 0.4 * layers[0]["n_experts"] + 2), max(3, 0.22 * len(layers) + 1)))
    im = ax.imshow(rel, aspect="auto", cmap="viridis")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title("routed token share / mean share")
    fig.colorbar(im, ax=ax)
    out = []
    for name, f in (("freq", fig),):
        p = png_dir / f"{stem}_{name}.png"
        with atomic_io.writing(p) as fh:
            f.savefig(fh, format="png", dpi=110, bbox_inches="tight")
        out.append(p)
        plt.close(f)
    fig, ax = plt.subplots(figsize=(6, 3))
    xs = [l["layer"] for l in layers]
    ax.plot(xs, [l["entropy_norm"] for l in layers], "o-", label="share entropy / log E")
    ax.plot(xs, [l["token_entropy_norm"] for l in layers], "s-", label="mean token router entropy / log E")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("layer")
    ax2 = ax.twinx()
    ax2.plot(xs, [l["max_over_mean"] for l in layers], "^:", color="C3", label="max/mean share")
    ax2.set_ylabel("max / mean share")
    fig.legend(loc="lower right", fontsize=7)
    p = png_dir / f"{stem}_entropy.png"
    with atomic_io.writing(p) as fh:
        fig.savefig(fh, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out + [p]


EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


def check_is_moe(model_dir: Path) -> None:
    """Fail before loading anything when the config names no routed experts (a dense model)."""
    import json

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    if not any(int(cfg.get(k) or 0) > 0 for k in EXPERT_COUNT_KEYS):
        raise ProbeError(f"{model_dir}: {cfg.get('model_type')} has no routed experts (config has none of "
                         f"{', '.join(EXPERT_COUNT_KEYS)}); the probe needs a Mixture-of-Experts model")


def resolve_source(spec: str, revision: str | None = None):
    """A checkpoint dir, a hub id (weights fetched, as quant_save does) or embedded:NAME -> ckpt_source.Source."""
    from ckpt_source import BuildError, open_source

    try:  # open_source resolves through model_ref, like every entry point
        source = open_source(spec, revision)
    except BuildError as e:
        raise ProbeError(str(e)) from None
    check_is_moe(source.root)
    return source


def check_alloc_args(levels: str | None, grid: str, group: int, budget: float | None) -> None:
    """The allocator's levels on its grid (and the budget within them), checked before any pass."""
    if not levels:
        return
    import moe_quant

    try:
        values = sorted(float(x) for x in levels.split(",") if x.strip())
        for b in values:
            moe_quant.QuantSpec(bits=b, group=group, grid=grid)
    except ValueError as e:
        raise ProbeError(f"--levels {levels} --grid {grid}: {e}") from None
    if not values:
        raise ProbeError("--levels names no bit level")
    if budget is not None and not values[0] <= budget <= values[-1]:
        raise ProbeError(f"--budget {budget} is outside the levels {values[0]:g}..{values[-1]:g}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Router statistics per layer and expert from one calibration "
                                             "pass, streamed one layer at a time (frequency, weight mass, "
                                             "activation salience, entropy, cold experts, co-activation) -> JSON "
                                             "+ PNG heatmaps.")
    ap.add_argument("--model", required=True, help="checkpoint dir, hub id or embedded:NAME (embedded:smollm2-moe)")
    ap.add_argument("--revision", help="hub revision when --model is a hub id")
    ap.add_argument("--calib-file", required=True, type=Path, help="UTF-8 calibration text")
    ap.add_argument("--tokens", type=int, default=16384, help="calibration tokens to run")
    ap.add_argument("--ctx", type=int, default=512, help="window length")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="forward dtype")
    ap.add_argument("--batch", type=int, default=4, help="windows per forward")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: on a shared 2-core box one thread ran this model's forward "
                         "5-13x faster than two; 0 = torch's default)")
    ap.add_argument("--levels", help="the allocator's bit levels, checked on --grid before the pass")
    ap.add_argument("--grid", default="full", help="the allocator's grid (checked with --levels)")
    ap.add_argument("--group", type=int, default=128, help="the allocator's group (checked with --levels)")
    ap.add_argument("--budget", type=float, help="the allocator's budget (checked against --levels)")
    ap.add_argument("--out", required=True, type=Path, help="probe JSON path")
    ap.add_argument("--png-dir", type=Path, default=None, help="where the heatmaps go (default: beside --out)")
    args = ap.parse_args(argv)
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        import importlib.util

        from transformers import AutoTokenizer

        import probe_stream
        import provenance

        check_alloc_args(args.levels, args.grid, args.group, args.budget)
        if not args.calib_file.is_file():
            raise ProbeError(f"--calib-file {args.calib_file} does not exist")
        if args.tokens < 1 or args.ctx < 2:
            raise ProbeError("--tokens must be >= 1 and --ctx >= 2")
        source = resolve_source(args.model, args.revision)
        tok = AutoTokenizer.from_pretrained(str(source.root))
        windows = calibration_windows(tok, args.calib_file.read_text(encoding="utf-8"), args.tokens, args.ctx)
        result = probe_stream.probe_source(source, windows, args.device, getattr(torch, args.dtype), args.batch)
    except ProbeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = {"format": FORMAT, "model": str(source.root), "model_spec": args.model,
              "calib_file": str(args.calib_file), "calib_sha256": provenance.sha256_file(args.calib_file),
              "tokens": int(windows.numel()), "ctx": args.ctx, "model_type": source.config.get("model_type"),
              "dtype": args.dtype, "streamed": True, "provenance": provenance.record(argv=argv), **result}
    atomic_io.write_json(args.out, result)
    pngs = (plot(result, args.png_dir or args.out.parent, args.out.stem)
            if importlib.util.find_spec("matplotlib") else [])
    s = result["summary"]
    print(f"{s['n_layers']} MoE layers: entropy {s['entropy_norm_mean']:.3f} (min {s['entropy_norm_min']:.3f}), "
          f"max/mean {s['max_over_mean_mean']:.2f} (max {s['max_over_mean_max']:.2f}), "
          f"{s['cold_experts']} cold / {s['total_experts']} experts -> {args.out} "
          + (" ".join(str(p) for p in pngs) if pngs else "(no matplotlib: no heatmaps)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
