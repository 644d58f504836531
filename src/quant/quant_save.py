"""The streaming PTQ builder: a HF checkpoint in, the same checkpoint with fake-quantized weights out.

The output has exactly the source's tensor names, shapes, dtypes and shard files, so anything that
loads the BF16 teacher (transformers, vLLM, the GGUF packer) loads the student unchanged, and the
evaluation measures precisely the weights a packer would store.

This module is the orchestration and the CLI; each concern has its own module:
* `ckpt_source`  reading the source (headers, index, hub) without loading it;
* `build_plan`   role, bits and spec of every tensor, the optional `--bits-plan`, the footprint;
* `calib_source` / `calib_stats`  calibration text -> windows -> per-layer, true-sequential statistics
  and the tensors quantized with them (only for methods that need them: wclip, gptq, awq);
* `shard_writer` streaming the output shards, per-shard resume records;
* `weight_quant` the method dispatch for one tensor (`moe_quant` / `quant_methods` hold the math).

Resumable and honest about completeness: every shard (and every calibrated layer) is checkpointed; a
rerun reuses only what matches this source + recipe + code + calibration and still hashes the same.
`_ptq_meta.json` is written last, so its presence means "complete", and a rerun re-verifies every
output shard's sha256 before it says so.

    python src/quant/quant_save.py --model DIR_OR_HUB_ID --out DIR [--expert-bits 3 --linear-bits 4 ...]
    python src/quant/quant_save.py --model DIR --out DIR --method gptq --calib-file calib.txt
    python src/quant/quant_save.py --model DIR --dry-run        # roles, bits, footprint; writes nothing
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import atomic_io
import build_plan
import calib_source
import footprint
import layer_io
import model_adapters
import provenance
import shard_writer
from ckpt_source import INDEX_NAME, BuildError, Source, check_out_dir, open_source, side_files  # noqa: F401 (API)
from model_adapters import Recipe
from shard_writer import quantize_shard, quantizer_sha256  # noqa: F401 (tests swap quant_save.quantize_shard)

META_NAME = "_ptq_meta.json"
META_FORMAT = "moe-lowbit/ptq-meta/2"
PROGRESS_DIR = ".ptq_progress"
RECIPE_FIELDS = tuple(f.name for f in dataclasses.fields(Recipe))


@dataclass(frozen=True)
class BuildConfig:
    model: str
    out: str | None = None
    recipe: Recipe = field(default_factory=Recipe)
    device: str = "cpu"
    revision: str | None = None
    dry_run: bool = False
    list_tensors: bool = False
    force: bool = False
    progress: bool = True
    calib_file: str | None = None
    calib_dataset: str | None = None
    calib: str | None = None  # "teacher-sample"
    calib_tokens: int = 32768
    calib_ctx: int = 512
    calib_batch: int = 8  # windows per forward in the calibration pass
    min_expert_tokens: int = 128  # experts with fewer routed tokens get blended statistics
    bits_plan: str | None = None
    expert_batch: int = 0  # routed experts per quantization call (0 = auto; 1 = one call per expert tensor)

    def calib_request(self) -> calib_source.CalibRequest:
        return calib_source.CalibRequest(file=self.calib_file, dataset=self.calib_dataset, kind=self.calib,
                                         tokens=self.calib_tokens, ctx=self.calib_ctx)


def as_config(args) -> BuildConfig:
    """Accepts a BuildConfig, an argparse Namespace or a dict (for bench scripts). Recipe fields may be given
    flat (`expert_bits=3, method="gptq"`) or as `recipe=Recipe(...)`."""
    if isinstance(args, BuildConfig):
        return args
    data = dict(vars(args) if isinstance(args, argparse.Namespace) else args)
    fields = {f.name for f in dataclasses.fields(BuildConfig)}
    unknown = set(data) - fields - set(RECIPE_FIELDS)
    if unknown:
        raise BuildError(f"unknown build options {sorted(unknown)}; known: {sorted(fields | set(RECIPE_FIELDS))}")
    flat = {k: data.pop(k) for k in RECIPE_FIELDS if k in data}
    if flat:
        base = data.pop("recipe", None) or Recipe()
        try:
            data["recipe"] = dataclasses.replace(base, **flat)
        except ValueError as e:
            raise BuildError(str(e)) from None
    return BuildConfig(**data)


def resolve_devices(device: str) -> list[str]:
    """cpu | cuda (every visible GPU; shards are split across them) | cuda:N."""
    if device == "cpu":
        return ["cpu"]
    if not re.fullmatch(r"cuda(:\d+)?", device):
        raise BuildError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    import torch

    if not torch.cuda.is_available():
        raise BuildError(f"--device {device}: CUDA is not available here; use --device cpu")
    if device == "cuda":
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if int(device.split(":")[1]) >= torch.cuda.device_count():
        raise BuildError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible")
    return [device]


# ------------------------------------------------------------------------------------------ build
def build(args) -> dict:
    """Quantize `cfg.model` into `cfg.out` (or just plan it, for dry runs); returns the meta dict."""
    cfg = as_config(args)
    t_start = time.perf_counter()
    recipe = cfg.recipe
    if not cfg.dry_run and not cfg.out:
        raise BuildError("--out is required (or pass --dry-run)")
    calib_req = cfg.calib_request()
    if recipe.calibrated and not calib_req.given and not cfg.dry_run:
        raise BuildError(f"--method {recipe.method} needs calibration text: pass --calib-file PATH, "
                         f"--calib-dataset ID[:split[:field]], --calib teacher-sample or --calib pydoc-topics")
    if calib_req.given and not recipe.calibrated:
        print(f"quant_save: note: --method {recipe.method} uses no calibration; the calibration source is ignored",
              file=sys.stderr)
    out = Path(cfg.out).expanduser() if cfg.out else None
    if out is not None and Path(cfg.model).expanduser().exists():
        check_out_dir(out, Path(cfg.model).expanduser())  # before any download or read
    devices = ["cpu"] if cfg.dry_run else resolve_devices(cfg.device)
    source = open_source(cfg.model, cfg.revision, headers_only=cfg.dry_run and not Path(cfg.model).exists())
    if out is not None:
        check_out_dir(out, source.root)
    bits_plan = build_plan.load_bits_plan(cfg.bits_plan) if cfg.bits_plan else None
    adapter, plans, unclassified = build_plan.plan_source(source, recipe, bits_plan)
    planned = footprint.summarize(build_plan.tally_plans(plans))
    if unclassified:
        print(f"quant_save: warning: {len(unclassified)} floating matrices have no role and stay unquantized, "
              f"e.g. {unclassified[:3]}", file=sys.stderr)
    if cfg.dry_run:
        build_plan.print_dry_run(source, adapter, plans, planned, recipe, cfg.list_tensors, bits_plan)
        return {"dry_run": True, "recipe": recipe.as_dict(), "adapter": adapter.name, "footprint": planned,
                "unclassified": unclassified, "bits_plan": bits_plan.record() if bits_plan else None}

    windows = calib_source.load_windows(calib_req, source.root) if recipe.calibrated else None
    calib_id = windows.identity if windows is not None else None
    plan_sha = bits_plan.sha256 if bits_plan else None
    quantizer = quantizer_sha256()
    fingerprint = source.fingerprint()
    identity = {"recipe": recipe.as_dict(), "quantizer_sha256": quantizer, "fingerprint_sha256": fingerprint,
                "calibration": calib_id, "bits_plan_sha256": plan_sha}
    existing = _existing_build(out, source, identity, cfg.force)
    if existing is not None:
        print(f"quant_save: {out} already holds this build (complete, every shard's sha256 verified); nothing to do",
              file=sys.stderr)
        return existing
    progress = out / PROGRESS_DIR
    progress.mkdir(parents=True, exist_ok=True)  # marks OUT as ours (an interrupted build resumes here)

    calib_out = None
    precomputed = shard_writer.Precomputed()
    if windows is not None:
        import calib_stats

        key = dict(identity, device=devices[0], batch_windows=cfg.calib_batch, min_expert_tokens=cfg.min_expert_tokens)
        ccfg = calib_stats.CalibConfig(windows, progress / "calib", key, device=devices[0], devices=tuple(devices),
                                       batch_windows=cfg.calib_batch, min_tokens=cfg.min_expert_tokens,
                                       progress=cfg.progress, expert_chunk=cfg.expert_batch)
        store = shard_writer.InPlaceShards(progress, out, source)  # calibrated tensors go straight into the shards
        calib_out = calib_stats.run_calibration(source, plans, recipe, ccfg, store)
        precomputed = shard_writer.Precomputed(calib_out.files)

    records: dict[str, dict] = {}
    resumed: list[str] = []
    todo = []
    for shard in source.shards:
        key = shard_writer.shard_record_key(shard, recipe, quantizer, calib_id, plan_sha)
        rec = shard_writer.load_done_record(progress, out, shard, key)
        if rec is None:
            todo.append((shard, key))
        else:
            records[shard.file] = rec
            resumed.append(shard.file)
    if resumed:
        print(f"quant_save: resuming: {len(resumed)}/{len(source.shards)} shards already done", file=sys.stderr)
    shard_writer.run_shards(todo, plans, out, progress, devices, records, cfg.progress, recipe, precomputed,
                            writer=lambda *a, **k: quantize_shard_hook()(*a, **k))

    copied = []
    for f in side_files(source.root):
        atomic_io.write_bytes(out / f.name, f.read_bytes())
        copied.append(f.name)
    if source.has_index:
        weight_map = {t.name: s.file for s in source.shards for t in s.tensors}
        total = sum(t.end - t.start for s in source.shards for t in s.tensors)
        atomic_io.write_json(out / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})

    meta = _meta(source, adapter, recipe, quantizer, fingerprint, unclassified, records, resumed, todo, devices,
                 copied, calib_out, windows, cfg, bits_plan, plans, t_start)
    atomic_io.write_json(out / META_NAME, meta)
    shutil.rmtree(progress, ignore_errors=True)
    print(footprint.format_table(meta["footprint"]), file=sys.stderr)
    print(f"quant_save: wrote {out} in {meta['timings']['total_seconds']:.1f} s", file=sys.stderr)
    return meta


def quantize_shard_hook():
    """The shard writer in use (looked up at call time, so a test can swap `quant_save.quantize_shard`)."""
    return sys.modules[__name__].quantize_shard


def _meta(source: Source, adapter, recipe: Recipe, quantizer, fingerprint, unclassified, records, resumed, todo,
          devices, copied, calib_out, windows, cfg: BuildConfig, bits_plan, plans, t_start) -> dict:
    tallies: dict[str, footprint.RoleTally] = {}
    for shard in source.shards:
        for role, d in records[shard.file]["tallies"].items():
            tallies.setdefault(role, footprint.RoleTally()).merge(footprint.RoleTally.from_dict(d))
    # calibrated tensors' errors come from the calibration pass (the writer only copied them)
    tensor_stats: dict[str, dict] = {}
    for shard in source.shards:
        tensor_stats.update(records[shard.file].get("tensor_stats") or {})
    if calib_out is not None:
        tensor_stats.update(calib_out.stats)
        role_of = {p.entry.name: p.role.role.value for rows in plans.values() for p in rows}
        for name, st in calib_out.stats.items():
            t = tallies.get(role_of.get(name))
            if t is not None:
                t.sq_err += st.get("sq_err") or 0.0
                t.sq_ref += st.get("sq_ref") or 0.0
    done_bytes = sum(records[s.file]["output"]["bytes"] for s, _ in todo)
    seconds = time.perf_counter() - t_start
    proxies = [(s.get("proxy"), s.get("proxy_clip")) for s in tensor_stats.values() if s.get("proxy") is not None]
    methods_used: dict[str, int] = {}
    for s in tensor_stats.values():
        methods_used[s["method"]] = methods_used.get(s["method"], 0) + 1
    calibration = None
    if windows is not None:
        calibration = {**windows.record, "min_expert_tokens": cfg.min_expert_tokens, "batch_windows": cfg.calib_batch,
                       "expert_rule": ("own H at >= min_expert_tokens routed tokens; below, lambda*own + "
                                       "(1-lambda)*pooled, lambda = tokens/min_expert_tokens; 0 tokens: pooled H"),
                       "true_sequential": True,
                       "proxy_total": sum(p for p, _ in proxies), "proxy_total_clip": sum(c for _, c in proxies
                                                                                          if c is not None)}
    meta = {
        "format": META_FORMAT,
        "complete": True,
        "source": {"model": source.label, "path": str(source.root), "revision": source.revision,
                   "model_type": source.config.get("model_type"), "fingerprint_sha256": fingerprint,
                   "shards": len(source.shards), "tensors": sum(len(s.tensors) for s in source.shards),
                   "bytes": sum(s.size for s in source.shards)},
        "adapter": {"name": adapter.name, "guessed": adapter.is_guess},
        "recipe": recipe.as_dict(),
        "method": recipe.method,
        "methods_applied": methods_used,
        "quantizer_sha256": quantizer,
        "calibration": calibration,
        "bits_plan": bits_plan.record() if bits_plan else None,
        "footprint": footprint.summarize(tallies),
        "unclassified": unclassified,
        "tensor_stats": dict(sorted(tensor_stats.items())),
        "experts": dict(sorted(calib_out.experts.items())) if calib_out is not None else {},
        "shards": {s.file: {"source": s.signature(), "output": records[s.file]["output"]} for s in source.shards},
        "index": INDEX_NAME if source.has_index else None,
        "copied_files": copied,
        "timings": {"total_seconds": seconds, "quantized_MB_per_s": done_bytes / 1e6 / max(seconds, 1e-9),
                    "calibration_seconds": calib_out.seconds if calib_out is not None else None,
                    "calibration_stage_seconds": ({k: round(v, 3) for k, v in calib_out.stage_seconds.items()}
                                                  if calib_out is not None else None),
                    "resumed_calibration_layers": calib_out.resumed_layers if calib_out is not None else 0,
                    "resumed_shards": resumed, "devices": devices,
                    "shards": {f: r.get("timing") for f, r in records.items() if f not in resumed}},
        "provenance": provenance.record(),
    }
    return meta


def _existing_build(out: Path, source: Source, identity: dict, force: bool):
    """The meta of a complete identical build in OUT (every shard re-hashed against the meta);
    refuses to overwrite anything else without --force."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise BuildError(f"--out {out} exists and is not a directory")
    meta_path = out / META_NAME
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            meta = {}
        calib = meta.get("calibration") or {}
        recorded = {"recipe": meta.get("recipe"), "quantizer_sha256": meta.get("quantizer_sha256"),
                    "fingerprint_sha256": meta.get("source", {}).get("fingerprint_sha256"),
                    "calibration": (f"{calib['tokens_sha256']}:{calib['ctx']}:{calib['windows']}" if calib else None),
                    "bits_plan_sha256": (meta.get("bits_plan") or {}).get("sha256")}
        same = recorded == identity
        shards = meta.get("shards", {})
        intact = same and all(_shard_intact(out / s.file, shards.get(s.file, {}).get("output", {}))
                              for s in source.shards)
        if same and intact:
            return meta
        if not force:
            what = ("this build, but some shard files are missing or their sha256 no longer matches the record"
                    if same else "a complete build of a different source/recipe/quantizer/calibration")
            raise BuildError(f"--out {out} holds {what}; pass --force to rebuild it or choose another --out")
        meta_path.unlink()  # from here on OUT no longer looks complete
        return None
    if any(out.iterdir()) and not (out / PROGRESS_DIR).is_dir() and not force:
        raise BuildError(f"--out {out} is not empty and holds no quant_save build; choose an empty directory "
                         f"(or pass --force to write into it)")
    return None


def output_sha256(meta: dict) -> str:
    """Identity of a build's output bytes: the shard sha256s its `_ptq_meta.json` recorded."""
    return provenance.sha256_json({k: v.get("output", {}).get("sha256") for k, v in sorted(meta["shards"].items())})


def _shard_intact(path: Path, record: dict) -> bool:
    return (path.is_file() and path.stat().st_size == record.get("bytes")
            and provenance.sha256_file(path) == record.get("sha256"))


# -------------------------------------------------------------------------------------------- CLI
def parse_args(argv=None) -> BuildConfig:
    ap = argparse.ArgumentParser(
        prog="quant_save.py",
        description="Fake-quantize a HF safetensors checkpoint by tensor role (routed experts at --expert-bits, "
                    "other linears at --linear-bits, routers/norms/vision kept), streaming one tensor at a time, "
                    "optionally with a calibrated method (gptq, awq, wclip) run layer by layer. The output keeps "
                    "the source's names, shapes, dtypes and shards.")
    ap.add_argument("--model", required=True, help="local checkpoint dir, or a hub id (owner/name)")
    ap.add_argument("--out", help="output dir (must not be inside the input); required unless --dry-run")
    ap.add_argument("--expert-bits", type=float, default=3.0, help="bits for routed experts (default 3)")
    ap.add_argument("--linear-bits", type=float, default=4.0,
                    help="bits for attention, linear attention, shared experts, dense MLP, embed, lm_head (default 4)")
    ap.add_argument("--mtp-bits", type=float, default=16.0, help="bits for multi-token-prediction weights (default 16)")
    ap.add_argument("--role-bits", default="",
                    help="override any role's bits: ROLE=BITS[,ROLE=BITS], e.g. embed=8,lm_head=8")
    ap.add_argument("--bits-plan", help="per-tensor (per-expert) bits JSON from moe_alloc.py (format "
                                        f"{build_plan.BITS_PLAN_FORMAT}); unlisted tensors keep their role bits")
    ap.add_argument("--method", default="clip", help=f"rounding method: {', '.join(model_adapters.METHODS)} "
                                                     "(default clip; wclip/gptq/awq need calibration text)")
    ap.add_argument("--grid", default="sym", help=f"code grid: {', '.join(model_adapters.GRIDS)} (default sym: "
                                                  "[-qmax, qmax]; full: all 2^b levels; asym: zero point)")
    ap.add_argument("--group", type=int, default=128, help="quantization group size along the input axis")
    ap.add_argument("--clip-steps", type=int, default=16, help="clip-ratio candidates in the MSE search (0 = absmax)")
    ap.add_argument("--clip-lo", type=float, default=0.65, help="smallest clip ratio searched")
    ap.add_argument("--damp", type=float, default=0.01, help="gptq: damping, as a fraction of mean diag(H)")
    ap.add_argument("--act-order", action="store_true", help="gptq: quantize columns in decreasing diag(H) order")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--calib-file", help="calibration text file (UTF-8)")
    src.add_argument("--calib-dataset", help="calibration hub dataset ID[:split[:field]] (default split train, "
                                             "field text), or ID:config:split:field")
    src.add_argument("--calib", choices=list(calib_source.NAMED_SOURCES),
                     help="teacher-sample: text sampled from the source model; pydoc-topics: the odd-numbered "
                          "topics of CPython's pydoc_data (offline)")
    ap.add_argument("--calib-tokens", type=int, default=32768, help="calibration tokens (default 32768)")
    ap.add_argument("--calib-ctx", type=int, default=512, help="calibration window length (default 512)")
    ap.add_argument("--calib-batch", type=int, default=8, help="windows per forward in the calibration pass")
    ap.add_argument("--min-expert-tokens", type=int, default=128,
                    help="routed experts with fewer calibration tokens get H blended with the layer's pooled H")
    ap.add_argument("--expert-batch", type=int, default=0, help="experts per calibrated call (0 auto, 1 unbatched)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda (all GPUs split the shards) | cuda:N")
    ap.add_argument("--revision", help="hub revision (branch, tag or commit) when --model is a hub id")
    ap.add_argument("--dry-run", action="store_true", help="print roles, bits and footprint; write nothing")
    ap.add_argument("--list-tensors", action="store_true", help="with --dry-run: one line per tensor")
    ap.add_argument("--force", action="store_true", help="overwrite an OUT holding another build or other files")
    ap.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bar")
    ns = vars(ap.parse_args(argv))
    return as_config(ns)


def main(argv=None) -> int:
    layer_io.limit_cpu_shape_caches(os.environ)  # before the calibration pass's first forward
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            build(parse_args(argv))
    except BuildError as e:
        print(f"quant_save: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permissions, a shard vanishing mid-run
        print(f"quant_save: error: {e.__class__.__name__}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("quant_save: interrupted; rerun the same command to resume from the completed shards", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
