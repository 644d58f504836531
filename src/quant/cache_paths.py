"""The three roots every stage writes under, decided by one rule (base layer: imports nothing of ours).

* cache   $MOE_LOWBIT_CACHE, else $XDG_CACHE_HOME/moe-lowbit, else ~/.cache/moe-lowbit: venvs, embedded
          models, teacher caches, llama.cpp builds (reusable, keyed by version);
* scratch $MOE_LOWBIT_SCRATCH, else <cache>/scratch: per-run work that can be deleted after the run;
* models  $MOE_LOWBIT_MODELS, else <repo>/models: quantized outputs when the user names no OUT.

env.sh exports the same rule for the shell; a process started without env.sh gets the same answer here.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

REPO_ROOT = Path(__file__).resolve().parents[2]


def _env(environ: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if environ is None else environ


def cache_root(environ: Mapping[str, str] | None = None) -> Path:
    env = _env(environ)
    if env.get("MOE_LOWBIT_CACHE"):
        return Path(env["MOE_LOWBIT_CACHE"]).expanduser()
    xdg = env.get("XDG_CACHE_HOME") or os.path.join(env.get("HOME") or os.path.expanduser("~"), ".cache")
    return Path(xdg).expanduser() / "moe-lowbit"


def cache_dir(name: str, environ: Mapping[str, str] | None = None) -> Path:
    """<cache>/NAME: one sub-directory per kind of cached thing (embedded, fidelity, smoke_models, ...)."""
    return cache_root(environ) / name


def scratch_root(environ: Mapping[str, str] | None = None) -> Path:
    env = _env(environ)
    return Path(env["MOE_LOWBIT_SCRATCH"]).expanduser() if env.get("MOE_LOWBIT_SCRATCH") else cache_root(env) / "scratch"


def models_root(environ: Mapping[str, str] | None = None) -> Path:
    env = _env(environ)
    return Path(env["MOE_LOWBIT_MODELS"]).expanduser() if env.get("MOE_LOWBIT_MODELS") else REPO_ROOT / "models"
