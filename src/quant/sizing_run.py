"""Sizing at the edges: a checkpoint's headers -> `sizing` stages for quantize, pack, eval and distill; the
preflight a real build runs before reading a weight; and the `--dry-run` CLI the pipelines call.

    python src/quant/sizing_run.py --stage pack --model DIR_OR_HUB_ID [--size-for 4xH100] [--max-disk 500G]
    python src/quant/sizing_run.py --stage eval --model DIR --tensor-parallel-size 4 --n-tokens 5000000
    python src/quant/sizing_run.py --stage distill --model DIR --train-tokens 2000000

quant_save.py calls `quantize_sizing` for `--dry-run` and `preflight` for a real build.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import sizing
from sizing import Devices, SizingError


# Whether calib_stats hands a layer's per-expert tensors to GPTQ as one [E, R, K] call (issue 23, deliverable 1)
# or one call per disk tensor (B=1, the code this was written against). The per-call column loop is what the
# GPU time of the unbatched build is made of; flip this when the batched build lands.
BATCHED_EXPERT_GPTQ = True
# A calibrated build today writes each quantized tensor to .ptq_progress and again into the shards, and deletes
# the progress files only at the end: its disk peak is output + the quantized tensors. False once written once.
CALIBRATED_WRITES_TWICE = False


@dataclass(frozen=True)
class Sized:
    stages: list
    devices: Devices
    costs: sizing.CostTable
    what: str

    def table(self) -> str:
        return sizing.format_stages(self.stages, self.devices, self.costs)


def text_config(config: dict) -> dict:
    return {**config, **(config.get("text_config") or {})}


def devices_for(device: str, size_for: str | None) -> Devices:
    return Devices.parse(size_for) if size_for else sizing.visible_devices(device)


def costs_for(devices: Devices, costs: str | None) -> sizing.CostTable:
    return sizing.load_costs(costs or ("h100" if devices.kind == "gpu" else "cpu"))


def plan_tensors(plans) -> list[tuple]:
    """build_plan rows -> (name, shape, bytes, quantized, axis, routed) for sizing.model_work."""
    rows = []
    for shard_rows in plans.values():
        for p in shard_rows:
            t = p.entry
            rows.append((t.name, tuple(t.shape), t.end - t.start, p.quantized, p.role.axis if p.role.axis is not None
                         else -1, p.role.role.value == "routed_expert"))
    return rows


def quantize_sizing(source, plans, footprint_summary: dict, recipe, calib_tokens: int, device: str,
                    size_for: str | None = None, costs: str | None = None, downloading: bool = False,
                    batched: bool = BATCHED_EXPERT_GPTQ) -> Sized:
    """The build's stages from its plan. The output keeps the source's dtypes (fake-quant), so it is as
    large as the source; the packed store (footprint) is what a GGUF / compressed-tensors export holds."""
    cfg = text_config(source.config)
    dev = devices_for(device, size_for)
    table = costs_for(dev, costs)
    dev = sizing.with_gpu_memory(table, dev)
    tokens = calib_tokens if recipe.calibrated else 0
    work = sizing.model_work(plan_tensors(plans), tokens, int(cfg.get("num_experts_per_tok") or 1),
                             int(cfg.get("num_experts") or cfg.get("n_routed_experts") or cfg.get("num_local_experts") or 0))
    stages = sizing.quantize_stages(work, work.source_bytes, recipe.calibrated, tokens, int(cfg.get("hidden_size") or 0),
                                    dev, table, downloading, batched,
                                    quantized_bytes(plans) if recipe.calibrated and CALIBRATED_WRITES_TWICE else 0)
    return Sized(stages, dev, table, "this build")


def open_for_sizing(open_source, model: str, revision: str | None, dry_run: bool):
    """(source, download_pending): a hub id is opened from its remote headers first, so the build is sized and
    refused before a 245 GB download; where the headers cannot be fetched (offline, a cached snapshot) a real
    build opens the snapshot itself (downloading what is missing) and is sized before it reads a weight."""
    if Path(model).expanduser().exists():
        return open_source(model, revision), False
    try:
        return open_source(model, revision, headers_only=True), not dry_run
    except RuntimeError:
        if dry_run:
            raise
        return open_source(model, revision), False


def size_build(cfg, source, plans, planned: dict, out: Path | None = None) -> Sized:
    """quant_save's hook: with no OUT (a dry run) print the store line and the sizing table; with OUT,
    refuse in one line when the build does not fit (`preflight`)."""
    sized = quantize_sizing(source, plans, planned, cfg.recipe, cfg.calib_tokens, cfg.device, cfg.size_for,
                            cfg.costs, downloading=source.shards[0].path is None)
    if out is None:
        print(f"{store_line(planned)}\n{sized.table()}")
    else:
        preflight(sized, out, cfg.max_disk)
    return sized


def quantized_bytes(plans) -> int:
    return sum(p.entry.end - p.entry.start for rows in plans.values() for p in rows if p.quantized)


def store_line(summary: dict) -> str:
    """The recipe's packed store against the BF16 source (footprint counts every scale)."""
    t = summary["total"]
    return (f"store: {t['packed_GB']:.1f} GB packed ({t['effective_bits']:.3f} bits/weight incl. scales) vs "
            f"{t['source_GB']:.1f} GB BF16 = {t['packed_bytes'] / t['source_bytes']:.3f} of BF16 "
            f"(x{t['compression']:.2f} smaller); the fake-quant checkpoint itself keeps the BF16 size")


def preflight(sized: Sized, out: Path, max_disk: str | None) -> None:
    """Before any weight is read: refuse in one line if OUT's disk, the host RAM or a GPU is short."""
    existing = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file()) if Path(out).is_dir() else 0
    cap = sizing.parse_bytes(max_disk) if max_disk else None
    sizing.check_fit(sized.stages, sizing.free_disk(out, cap), sizing.available_ram(), sized.devices, sized.what,
                     existing)


def add_build_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--max-disk", help="disk the build may use (e.g. 500G); the real free space caps it too; the "
                                       "build refuses up front when it needs more")
    ap.add_argument("--size-for", help="with --dry-run: size for these devices instead of the visible ones "
                                       "(cpu, 4xH100, 8xH200, Nxgpu:GiB)")
    ap.add_argument("--costs", help="cost table: cpu (measured by tests/bench/sizing_costs.py), h100 (assumed) or a JSON "
                                    "file (e.g. tests/bench/gpu_check.sh's); default by device kind")


# --------------------------------------------------------------------------------------------- CLI
def open_headers(model: str):
    import ckpt_source

    return ckpt_source.open_source(model, None, headers_only=not Path(model).expanduser().exists())


def stage_sizing(args) -> Sized:
    source = open_headers(args.model)
    dev = devices_for(args.device, args.size_for)
    table = costs_for(dev, args.costs)
    dev = sizing.with_gpu_memory(table, dev)
    total = sum(t.end - t.start for s in source.shards for t in s.tensors)
    params = sum(_numel(t.shape) for s in source.shards for t in s.tensors)
    cfg = text_config(source.config)
    experts = int(cfg.get("num_experts") or cfg.get("n_routed_experts") or cfg.get("num_local_experts") or 0)
    routed = sum(_numel(t.shape) for s in source.shards for t in s.tensors if ".experts." in t.name
                 and not t.name.startswith("mtp."))
    active = params - routed + (routed * int(cfg.get("num_experts_per_tok") or 1) // experts if experts else routed)
    if args.stage == "pack":
        stages = sizing.pack_stages(total, params, args.gguf_bits, dev, table, args.imatrix_tokens, active)
    elif args.stage == "eval":
        tp = args.tensor_parallel_size or (dev.count if dev.kind == "gpu" else 1)
        stages = sizing.eval_stages(total, tp, args.gpu_memory_utilization, dev, table, args.n_tokens)
    else:
        stages = sizing.distill_stages(total, active, dev, table, args.train_tokens)
    return Sized(stages, dev, table, f"{args.stage} of {args.model}")


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="sizing_run.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage", required=True, choices=("pack", "eval", "distill"))
    ap.add_argument("--model", required=True, help="checkpoint dir or hub id (headers only are read)")
    ap.add_argument("--device", default="cuda", help="cpu | cuda (every visible GPU) | cuda:N")
    ap.add_argument("--out", help="where the stage writes (checked against --max-disk / free space)")
    ap.add_argument("--gguf-bits", type=float, default=3.3, help="pack: bits/weight of the low-bit GGUF")
    ap.add_argument("--imatrix-tokens", type=int, default=0, help="pack: tokens of the imatrix pass (0 = none)")
    ap.add_argument("--tensor-parallel-size", type=int, default=0, help="eval: TP (0 = every visible GPU)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--n-tokens", type=int, default=0, help="eval: new tokens at most (sum of n x max_new_tokens)")
    ap.add_argument("--train-tokens", type=int, default=1_000_000, help="distill: tokens trained on")
    ap.add_argument("--check", action="store_true", help="refuse (exit 2) when --out's disk or memory is short")
    add_build_args(ap)
    args = ap.parse_args(argv)
    try:
        sized = stage_sizing(args)
        print(sized.table())
        if args.check:
            preflight(sized, Path(args.out or "."), args.max_disk)
    except (SizingError, RuntimeError) as e:
        print(f"sizing: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
