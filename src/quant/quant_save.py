"""The streaming PTQ builder: a HF checkpoint in, the same checkpoint with fake-quantized weights out.

The output has exactly the source's tensor names, shapes, dtypes and shard files, so anything that
loads the BF16 teacher (transformers, vLLM, the GGUF packer) loads the student unchanged, and the
evaluation measures precisely the weights a packer would store.

This module is the orchestration and the CLI; each concern has its own module:
* `ckpt_source`  reading the source (headers, index, hub) without loading it;
* `build_plan`   role, bits and spec of every tensor, the optional `--bits-plan`, the footprint;
* `calib_source` / `calib_stats`  calibration text -> windows -> per-layer, true-sequential statistics
  and the tensors quantized with them (only for methods that need them: wclip, gptq, awq);
* `shard_writer` streaming the output shards and the packed store (`store_pack`), per-shard resume records;
* `weight_quant` the method dispatch for one tensor (`moe_quant` / `quant_methods` hold the math);
* `sizing_run`   disk/RAM/GPU/time of the build; refuses up front when it does not fit;
* `export_run`   the store's real bytes in the meta, then the `--emit` exports (dequant, compressed-tensors, gguf).

Resumable and honest about completeness: every shard (and every calibrated layer) is checkpointed; a
rerun reuses only what matches this source + recipe + code + calibration and still hashes the same.
`_ptq_meta.json` is written last, so its presence means "complete", and a rerun re-verifies every
output shard's sha256 before it says so.

    python src/quant/quant_save.py --model DIR_OR_HUB_ID --out DIR [--expert-bits 3 --linear-bits 4 ...]
    python src/quant/quant_save.py --model DIR --out DIR --method gptq --calib-file calib.txt
    python src/quant/quant_save.py --model DIR --dry-run        # roles, bits, footprint, sizing; writes nothing
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
import build_record
import calib_source
import footprint
import ptq_meta
import sizing_run
from ckpt_source import INDEX_NAME, BuildError, Source, check_out_dir, open_source, side_files  # noqa: F401 (API)
from model_adapters import Recipe

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
    max_disk: str | None = None  # sizing_run: preflight cap, --dry-run devices and cost table
    size_for: str | None = None
    costs: str | None = None
    emit: tuple = ("dequant",)  # exports of the store (export_run.EMITS)
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
    source, hub = sizing_run.open_for_sizing(open_source, cfg.model, cfg.revision, cfg.dry_run)  # hub: headers first
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
        sizing_run.size_build(cfg, source, plans, planned)
        return {"dry_run": True, "recipe": recipe.as_dict(), "adapter": adapter.name, "footprint": planned,
                "unclassified": unclassified, "bits_plan": bits_plan.record() if bits_plan else None}

    sizing_run.size_build(cfg, source, plans, planned, out)  # refuses in one line before any weight (or download)
    if hub:  # it fits: now download, and plan the downloaded files
        source = open_source(cfg.model, cfg.revision)
        adapter, plans, unclassified = build_plan.plan_source(source, recipe, bits_plan)
    windows = calib_source.load_windows(calib_req, source.root) if recipe.calibrated else None
    calib_id = windows.identity if windows is not None else None
    plan_sha = bits_plan.sha256 if bits_plan else None
    import export_run
    import shard_writer

    quantizer = shard_writer.quantizer_sha256()
    fingerprint = source.fingerprint()
    identity = {"recipe": recipe.as_dict(), "quantizer_sha256": quantizer, "fingerprint_sha256": fingerprint,
                "calibration": calib_id, "bits_plan_sha256": plan_sha, "emit": list(export_run.parse_emit(cfg.emit))}
    existing = build_record.existing_build(out, source, identity, cfg.force, PROGRESS_DIR)
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
        precomputed = shard_writer.Precomputed(calib_out.files, store.store_dir)

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

    copied = [f.name for f in side_files(source.root)]
    for f in side_files(source.root):
        atomic_io.write_bytes(out / f.name, f.read_bytes())
    if source.has_index:
        weight_map = {t.name: s.file for s in source.shards for t in s.tensors}
        total = sum(t.end - t.start for s in source.shards for t in s.tensors)
        atomic_io.write_json(out / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})

    meta = build_record.build_meta(source, adapter, recipe, quantizer, fingerprint, unclassified, records, resumed, todo, devices,
                 copied, calib_out, windows, cfg, bits_plan, plans, t_start)
    meta = export_run.finish(meta, records, out, identity["emit"])  # the store's record, then the exports
    atomic_io.write_json(ptq_meta.meta_path(out), meta)
    shutil.rmtree(progress, ignore_errors=True)
    print(footprint.format_table(meta["footprint"]), file=sys.stderr)
    print(f"quant_save: wrote {out} in {meta['timings']['total_seconds']:.1f} s", file=sys.stderr)
    return meta


def quantize_shard(*args, **kwargs):
    """Write one output shard (shard_writer's); a test swaps this name to simulate a crash mid-build."""
    import shard_writer

    return shard_writer.quantize_shard(*args, **kwargs)


def quantize_shard_hook():
    """The shard writer in use (looked up at call time, so a test can swap `quant_save.quantize_shard`)."""
    return sys.modules[__name__].quantize_shard


# -------------------------------------------------------------------------------------------- CLI
def build_parser():
    """quant_config's dataclass is the source of every flag (tool_config); run-only flags added here."""
    import quant_config
    import tool_config

    return tool_config.build_parser(quant_config.TOOL, extra=[
        (("--default-recipe",), {"default": None, "help": "the recipe when none is named (pipelines/quantize.sh "
                                 "passes configs/clip_122b.env and so also reads the old unprefixed names)"}),
        (("--no-progress",), {"dest": "no_progress", "action": "store_true", "help": "no tqdm bar"})])


def resolve_cli(argv=None):
    """Flags > QUANT_* env (> the old unprefixed names, through the pipeline only) > recipe > defaults."""
    import quant_config
    import tool_config

    args = build_parser().parse_args(argv)
    if args.no_progress:
        args.progress = "off"
    try:
        return tool_config.resolve(quant_config.TOOL, args, legacy=bool(args.default_recipe),
                                   default_recipe=args.default_recipe)
    except tool_config.ConfigError as e:
        raise BuildError(str(e)) from None


def to_build_config(qcfg) -> BuildConfig:
    import quant_config

    if not qcfg.model:
        raise BuildError("--model is required (a checkpoint dir, a hub id or embedded:NAME; env QUANT_MODEL)")
    values = {k: v for k, v in dataclasses.asdict(qcfg).items()
              if k not in quant_config.RUN_ONLY and k not in ("calib_file", "calib_dataset", "calib")}
    return as_config({**values, **qcfg.calib_source()})


def parse_args(argv=None) -> BuildConfig:
    return to_build_config(resolve_cli(argv))


def probe_plan(qcfg):
    """--probe: router statistics (moe_probe) -> a bits plan (moe_alloc) in OUT.probe/, each its own CLI in
    a child process (its memory returns when it ends); the build then takes that plan."""
    import step_runner

    if not qcfg.out:
        raise BuildError("--probe needs --out (the plan is written to OUT.probe/)")
    text = qcfg.probe_calib or qcfg.calib_file
    if not text:
        raise BuildError("--probe needs --probe-calib FILE (or --calib-file): the text the router is probed on")
    import quant_spec

    for level in (x for x in qcfg.alloc_levels.split(",") if x.strip()):  # before any pass: a plan it cannot use
        try:
            quant_spec.QuantSpec(bits=float(level), group=qcfg.group, grid=qcfg.grid)
        except ValueError as e:
            raise BuildError(f"--alloc-levels {qcfg.alloc_levels} --grid {qcfg.grid}: {e}") from None
    probe_dir = Path(str(qcfg.out) + ".probe")
    here = Path(__file__).resolve().parent
    device = qcfg.device.split(",")[0] if qcfg.device.startswith("cuda") else "cpu"
    probe = [sys.executable, here / "moe_probe.py", "--model", qcfg.model, "--calib-file", text, "--tokens",
             qcfg.probe_tokens, "--device", device, "--out", probe_dir / "probe.json", "--levels", qcfg.alloc_levels,
             "--grid", qcfg.grid, "--group", qcfg.group, "--budget", qcfg.alloc_budget,
             *(["--revision", qcfg.revision] if qcfg.revision else [])]  # streamed; the plan's knobs checked first
    alloc = [sys.executable, here / "moe_alloc.py", "--probe", probe_dir / "probe.json", "--budget",
             qcfg.alloc_budget, "--strategy", qcfg.alloc_strategy, "--levels", qcfg.alloc_levels, "--grid", qcfg.grid,
             "--group", qcfg.group, "--out", probe_dir / "plan.json"]  # costed on the grid the build uses
    steps = [("probe", probe), ("alloc", alloc)]
    probe_dir.mkdir(parents=True, exist_ok=True)
    for name, cmd in steps:
        if name == "alloc":  # the model dir the probe resolved (a hub id or embedded:NAME, downloaded once)
            cmd += ["--model", json.loads((probe_dir / "probe.json").read_text())["model"]]
        print(f"quant_save: {name}: {' '.join(map(str, cmd))}", file=sys.stderr, flush=True)
        try:
            step_runner.run_step(name, cmd, Path.cwd(), timeout_s=7 * 24 * 3600, echo=sys.stderr)
        except step_runner.StepFailed as e:
            raise BuildError(str(e)) from None
    return dataclasses.replace(qcfg, bits_plan=str(probe_dir / "plan.json"))


def main(argv=None) -> int:
    try:
        qcfg = resolve_cli(argv)  # --help answers here, before anything heavy is imported
        import layer_io

        layer_io.limit_cpu_shape_caches(os.environ)  # before the calibration pass's first forward
        if qcfg.device == "cpu" and qcfg.method in ("wclip", "gptq", "awq"):  # the calibrated build's
            # GB-sized temporaries; process-wide, so set here at the process edge, never by library code
            layer_io.reuse_freed_memory()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            build(to_build_config(probe_plan(qcfg) if qcfg.probe else qcfg))
    except (BuildError, sizing_run.SizingError) as e:
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
