"""Merge a trained OPD adapter into the student's SOURCE weights and requantize on the student's grid:
W_new = Q_s(W_source + scaling * B A), with the scales s (and zero-points) fixed at the student's build
and stored in the adapter, i.e. exactly the training forward's weights.

The output is a dequantized checkpoint with the student's exact tensor names, shapes, dtypes and shard
files (each shard's header bytes are reused verbatim); every tensor that is not a LoRA target is copied
byte for byte from the student, so nothing outside the adapted roles moves and the non-expert weights
stay quantized (not the BF16 teacher's). The footprint is recomputed from the output's headers with the
student's recipe and must equal the student's; the check is recorded in `_opd_merge.json` and the
output's `_ptq_meta.json` (the student's, plus an `opd` section).

    python src/distill/merge_adapter.py --run RUN_DIR --out MERGED_DIR [--student DIR] [--source DIR]
"""
from __future__ import annotations

import argparse
import json
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import atomic_io
import footprint
import model_adapters
import opd_data
import provenance
from opd_data import OpdInputError

if TYPE_CHECKING:
    import torch

MERGE_RECORD = "_opd_merge.json"


def read_header(path: Path) -> tuple[bytes, dict]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        raw = f.read(n)
    return struct.pack("<Q", n) + raw, {k: v for k, v in json.loads(raw).items() if k != "__metadata__"}


def student_shards(student: Path) -> list[Path]:
    index = student / "model.safetensors.index.json"
    if index.is_file():
        return [student / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return sorted(student.glob("*.safetensors"))


def merged_model_state(run: Path, student: Path, source: Path, adapter_cfg: dict) -> dict[str, torch.Tensor]:
    """In-memory (transformers) state of the merged student: the student's, with targets = Q_s(W + BA)."""
    import lora_quant
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    tensors = load_file(str(run / "adapter.safetensors"))
    meta = opd_data.read_student_meta(student)
    recipe = lora_quant.recipe_from_meta(meta)
    config = opd_data.read_config(student, "student")
    src = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32)
    src_params = dict(src.named_parameters())
    targets = lora_quant.choose_targets([(n, tuple(p.shape)) for n, p in src_params.items()], config, recipe,
                                        tuple(adapter_cfg["roles"]))
    names = {t.name for t in targets}
    if names != {t["name"] for t in adapter_cfg["targets"]}:
        raise OpdInputError(f"the adapter in {run} was trained on other targets than the recipe gives now "
                            f"({len(names)} vs {len(adapter_cfg['targets'])}); retrain it")
    model = AutoModelForCausalLM.from_pretrained(str(student), dtype=torch.bfloat16)
    params = dict(model.named_parameters())
    for t in targets:
        merged = lora_quant.merged_weight(src_params[t.name].detach(), tensors[f"{t.name}::A"], tensors[f"{t.name}::B"],
                                          adapter_cfg["scaling"], tensors[f"{t.name}::scales"], t.axis, t.spec,
                                          params[t.name].dtype, tensors.get(f"{t.name}::zeros"))
        with torch.no_grad():
            params[t.name].copy_(merged)
    del src, src_params
    return model


def write_like_student(model, student: Path, out: Path, roles: tuple[str, ...], config: dict) -> dict:
    """Save through transformers (its on-disk names, e.g. per-expert tensors), then rewrite into the
    student's exact shard layout: adapted-role tensors from the save, all others from the student."""
    import torch
    from safetensors import safe_open

    adapter = model_adapters.adapter_for(config)
    stats = {"tensors": 0, "replaced": 0, "changed": 0, "copied_from_student": 0}
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".merge-") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        saved = {}
        for f in Path(tmp).glob("*.safetensors"):
            with safe_open(str(f), "pt") as h:
                for k in h.keys():
                    saved[k] = (f, h.get_slice(k).get_dtype(), tuple(h.get_slice(k).get_shape()))
        for shard in student_shards(student):
            header_bytes, header = read_header(shard)
            order = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
            with atomic_io.writing(out / shard.name, "wb") as dst, safe_open(str(shard), "pt") as src:
                dst.write(header_bytes)
                for name, info in order:
                    stats["tensors"] += 1
                    role = adapter.classify(name, info["shape"])
                    mine = src.get_tensor(name)
                    if role.role.value in roles and role.quantizable:
                        if name not in saved:
                            raise OpdInputError(f"merged save has no tensor {name} (the student's on-disk name); "
                                                f"transformers wrote {sorted(saved)[:3]}...")
                        f, dtype, shape = saved[name]
                        with safe_open(str(f), "pt") as h:
                            new = h.get_tensor(name)
                        if tuple(new.shape) != tuple(info["shape"]) or new.dtype != mine.dtype:
                            raise OpdInputError(f"merged {name}: {new.dtype} {list(new.shape)} but the student has "
                                                f"{mine.dtype} {info['shape']}")
                        stats["replaced"] += 1
                        stats["changed"] += int(not torch.equal(new, mine))
                        mine = new
                    else:
                        stats["copied_from_student"] += 1
                    dst.write(mine.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return stats


def footprint_of(ckpt: Path, recipe, config: dict) -> dict:
    """Footprint recomputed from the checkpoint's own headers with the recipe (footprint.summarize)."""
    adapter = model_adapters.adapter_for(config)
    tallies: dict[str, footprint.RoleTally] = {}
    for shard in student_shards(ckpt):
        _, header = read_header(shard)
        for name, info in header.items():
            tr = adapter.classify(name, info["shape"])
            spec = recipe.spec_for(tr, info["dtype"] in footprint.FLOAT_DTYPES, len(info["shape"]))
            tallies.setdefault(tr.role.value, footprint.RoleTally()).add(info["shape"], info["dtype"], spec, tr.axis)
    return footprint.summarize(tallies)


def layout(ckpt: Path) -> dict:
    return {shard.name: {k: [v["dtype"], v["shape"]] for k, v in read_header(shard)[1].items()}
            for shard in student_shards(ckpt)}


def merge(run: str | Path, out: str | Path, student: str | None = None, source: str | None = None,
          force: bool = False, argv=None) -> dict:
    import lora_quant
    t0 = time.perf_counter()
    run, out = Path(run), Path(out)
    cfg_path = run / "adapter_config.json"
    if not cfg_path.is_file() or not (run / "adapter.safetensors").is_file():
        raise OpdInputError(f"{run} holds no finished adapter (adapter_config.json + adapter.safetensors); "
                            f"finish opd_train_fsdp.py first")
    adapter_cfg = json.loads(cfg_path.read_text())
    student_dir = Path(student or adapter_cfg["student"])
    meta = opd_data.read_student_meta(student_dir)
    if provenance.sha256_file(student_dir / opd_data.PTQ_META) != adapter_cfg["student_meta_sha256"]:
        raise OpdInputError(f"student {student_dir} is not the one the adapter was trained on (its _ptq_meta.json changed)")
    source_dir = Path(source or adapter_cfg["source"])
    if out.exists() and any(out.iterdir()):
        if not force:
            raise OpdInputError(f"--out {out} is not empty; choose an empty directory or pass --force")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    config = opd_data.read_config(student_dir, "student")
    model = merged_model_state(run, student_dir, source_dir, adapter_cfg)
    stats = write_like_student(model, student_dir, out, tuple(adapter_cfg["roles"]), config)
    del model
    for f in student_dir.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name not in (opd_data.PTQ_META, MERGE_RECORD):
            shutil.copyfile(f, out / f.name)
    recipe = lora_quant.recipe_from_meta(meta)
    fp_before, fp_after = footprint_of(student_dir, recipe, config), footprint_of(out, recipe, config)
    same_layout = layout(student_dir) == layout(out)
    same_footprint = fp_before["total"] == fp_after["total"]
    if not (same_layout and same_footprint):
        raise OpdInputError(f"merged checkpoint in {out} differs from the student: layout same={same_layout}, "
                            f"footprint same={same_footprint}")
    record = {"format": "moe-lowbit/opd-merge/1", "run": str(run), "student": str(student_dir),
              "source": str(source_dir), "adapter": {k: adapter_cfg[k] for k in ("rank", "alpha", "roles", "recipe")},
              "targets": len(adapter_cfg["targets"]), "tensors": stats, "same_names_shapes_dtypes_shards": same_layout,
              "footprint_before": fp_before["total"], "footprint_after": fp_after["total"],
              "same_footprint": same_footprint, "seconds": time.perf_counter() - t0,
              "provenance": provenance.record(argv=argv)}
    atomic_io.write_json(out / MERGE_RECORD, record)
    atomic_io.write_json(out / opd_data.PTQ_META, {**meta, "opd": record})  # last: marks the merge complete
    return record


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="merge_adapter.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="opd_train_fsdp.py run dir (adapter.safetensors + adapter_config.json)")
    ap.add_argument("--out", required=True, help="output checkpoint dir (empty or new)")
    ap.add_argument("--student", help="student dir (default: the one recorded in the adapter)")
    ap.add_argument("--source", help="the student's BF16 source (default: the one recorded in the adapter)")
    ap.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    args = ap.parse_args(argv)
    import lora_quant

    try:
        rec = merge(args.run, args.out, args.student, args.source, args.force,
                    argv=sys.argv if argv is None else [sys.argv[0], *argv])
    except (OpdInputError, lora_quant.LoraTargetError) as e:
        print(f"merge_adapter: error: {e}", file=sys.stderr)
        return 2
    t = rec["tensors"]
    print(f"merge_adapter: {t['replaced']} tensors requantized ({t['changed']} changed), {t['copied_from_student']} "
          f"copied; names/shapes/dtypes/shards identical: {rec['same_names_shapes_dtypes_shards']}; footprint "
          f"{rec['footprint_after']['packed_bytes']:.0f} B == before: {rec['same_footprint']} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
