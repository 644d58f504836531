"""The quant_save options a configs/*.env recipe sets, read by quant_config exactly as quantize.sh reads
it (the file alone: no environment), so a bench measures the file's own values and not whatever the
caller's environment happens to hold."""
from __future__ import annotations

import os
from pathlib import Path

import bench_paths  # tests/bench/ is on the path of a script run from it

bench_paths.use_project_modules()

import quant_config  # noqa: E402


def recipe_from_env(path: Path) -> dict:
    """quant_save.build options of the recipe at `path` (bits_plan: repo-relative as the recipe names it,
    "" if none; the caller resolves it)."""
    cfg = quant_config.from_recipe(Path(path).resolve(), environ={})
    missing = [k for k in ("method", "calib") if not getattr(cfg, k)]
    if missing:
        raise SystemExit(f"{path} does not set {', '.join(k.upper() for k in missing)}")
    plan = cfg.bits_plan or ""
    if plan and Path(plan).is_relative_to(quant_config.tool_config.cache_paths.REPO_ROOT):
        plan = os.path.relpath(plan, quant_config.tool_config.cache_paths.REPO_ROOT)
    return {"method": cfg.method, "grid": cfg.grid, "group": cfg.group, "linear_bits": cfg.linear_bits,
            "role_bits": cfg.role_bits, "bits_plan": plan, "act_order": cfg.act_order, "calib": cfg.calib,
            "calib_tokens": cfg.calib_tokens, "calib_ctx": cfg.calib_ctx, "clip_steps": cfg.clip_steps,
            "clip_lo": cfg.clip_lo}
