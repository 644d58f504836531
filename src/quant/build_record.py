"""What a finished build records (`_ptq_meta.json`: source, recipe, footprint, per-tensor stats, shards,
timings, provenance) and how a rerun recognizes it: an identical complete build is reused after every shard
is re-hashed; anything else in OUT is refused without --force."""
from __future__ import annotations

import time
from pathlib import Path

import footprint
import provenance
import ptq_meta
from ckpt_source import INDEX_NAME, BuildError, Source
from model_adapters import Recipe


def build_meta(source: Source, adapter, recipe: Recipe, quantizer, fingerprint, unclassified, records, resumed, todo,
          devices, copied, calib_out, windows, cfg, bits_plan, plans, t_start) -> dict:
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
                       "expert_rule": ("own H when an expert has >= min_expert_tokens routed tokens; below, "
                                       "lambda*own + (1-lambda)*pooled with lambda = tokens/min_expert_tokens; "
                                       "0 tokens: pooled H of every routed token of the layer"),
                       "true_sequential": True,
                       "proxy_total": sum(p for p, _ in proxies), "proxy_total_clip": sum(c for _, c in proxies
                                                                                          if c is not None)}
    meta = {
        "format": ptq_meta.META_PREFIX + "2",
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


def existing_build(out: Path, source: Source, identity: dict, force: bool, progress_dir: str):
    """The meta of a complete identical build in OUT (every shard re-hashed against the meta);
    refuses to overwrite anything else without --force."""
    import export_run

    if not out.exists():
        return None
    if not out.is_dir():
        raise BuildError(f"--out {out} exists and is not a directory")
    meta_path = ptq_meta.meta_path(out)
    if meta_path.is_file():
        try:
            meta = ptq_meta.read_dict(out) or {}
        except ptq_meta.MetaError:
            meta = {}
        calib = meta.get("calibration") or {}
        recorded = {"recipe": meta.get("recipe"), "quantizer_sha256": meta.get("quantizer_sha256"),
                    "fingerprint_sha256": meta.get("source", {}).get("fingerprint_sha256"),
                    "calibration": (f"{calib['tokens_sha256']}:{calib['ctx']}:{calib['windows']}" if calib else None),
                    "bits_plan_sha256": (meta.get("bits_plan") or {}).get("sha256"), "emit": meta.get("emit")}
        same = recorded == identity
        shards = meta.get("shards", {})
        intact = same and export_run.store_intact(out, meta) and ("dequant" not in identity["emit"] or all(
            _shard_intact(out / s.file, shards.get(s.file, {}).get("output", {})) for s in source.shards))
        if same and intact:
            return meta
        if not force:
            what = ("this build, but some shard files are missing or their sha256 no longer matches the record"
                    if same else "a complete build of a different source/recipe/quantizer/calibration")
            raise BuildError(f"--out {out} holds {what}; pass --force to rebuild it or choose another --out")
        meta_path.unlink()  # from here on OUT no longer looks complete
        return None
    if any(out.iterdir()) and not (out / progress_dir).is_dir() and not force:
        raise BuildError(f"--out {out} is not empty and holds no quant_save build; choose an empty directory "
                         f"(or pass --force to write into it)")
    return None


def output_sha256(meta: dict) -> str:  # identity of a build's output bytes: the shard sha256s its meta records
    return provenance.sha256_json({k: v.get("output", {}).get("sha256") for k, v in sorted(meta["shards"].items())})


def _shard_intact(path: Path, record: dict) -> bool:
    return path.is_file() and path.stat().st_size == record.get("bytes") and provenance.sha256_file(path) == record.get("sha256")
