"""The quant_save options a configs/*.env recipe sets, read the way pipelines read it (sourced by bash), so
a bench measures the file's own defaults and not whatever the caller's environment happens to hold."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

RECIPE_KEYS = ("METHOD", "GRID", "GROUP", "LINEAR_BITS", "ROLE_BITS", "BITS_PLAN", "ACT_ORDER", "CALIB",
               "CALIB_TOKENS", "CALIB_CTX", "CLIP_STEPS", "CLIP_LO")


def recipe_from_env(path: Path) -> dict:
    """quant_save.build options of the recipe at `path` (bits_plan: the file's BITS_PLAN as written, "" if
    none; a repo-relative path stays relative, the caller resolves it)."""
    env = {k: v for k, v in os.environ.items() if k not in RECIPE_KEYS}
    out = subprocess.run(["bash", "-c", 'set -a; source "$1" >/dev/null; env -0', "recipe_env",
                          str(Path(path).resolve())], env=env, capture_output=True, check=True).stdout.decode()
    seen = dict(kv.split("=", 1) for kv in out.split("\0") if "=" in kv)
    missing = [k for k in ("METHOD", "GROUP", "LINEAR_BITS", "CALIB") if not seen.get(k)]
    if missing:
        raise SystemExit(f"{path} does not set {', '.join(missing)}")
    return {"method": seen["METHOD"], "grid": seen.get("GRID") or "sym", "group": int(seen["GROUP"]),
            "linear_bits": float(seen["LINEAR_BITS"]), "role_bits": seen.get("ROLE_BITS", ""),
            "bits_plan": seen.get("BITS_PLAN", ""), "act_order": seen.get("ACT_ORDER", "off") in ("on", "1", "true", "yes"),  # as quantize.sh reads it
            "calib": seen["CALIB"], "calib_tokens": int(seen.get("CALIB_TOKENS") or 8192),
            "calib_ctx": int(seen.get("CALIB_CTX") or 512), "clip_steps": int(seen.get("CLIP_STEPS") or 16),
            "clip_lo": float(seen.get("CLIP_LO") or 0.65)}
