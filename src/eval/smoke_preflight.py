"""The smoke's preflight: probe the machine (CUDA, hub), check every output path is writable and has room,
and refuse a broken earlier quantized checkpoint - before any step spends minutes."""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import threading
import urllib.error
import urllib.request
from pathlib import Path

import provenance
import ptq_meta

from smoke_plan import (
    FALLBACKS, Facts, Plan, REPO_ROOT, SRC_DIRS, SmokeConfig, SmokeError)


# -------------------------------------------------------------------------------------------- probes
def cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def hub_reachable(timeout_s: float) -> tuple[bool, str]:
    """One HEAD request to the hub endpoint; any HTTP answer (even 4xx) counts as reachable.

    Run in a daemon thread joined with a deadline: urllib's timeout does not cover DNS resolution,
    which can hang far longer on a box with no network."""
    url = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/") + "/api/models?limit=1"
    answer: list = []

    def attempt():
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout_s):
                answer.append((True, "ok"))
        except urllib.error.HTTPError:
            answer.append((True, "answered"))
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            answer.append((False, f"{url}: {getattr(e, 'reason', e)}"))

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(timeout_s)
    return answer[0] if answer else (False, f"{url}: no answer within {timeout_s:g} s")


def probe_facts(cfg: SmokeConfig) -> Facts:
    offline_env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")
    exists = cfg.model not in FALLBACKS and Path(cfg.model).expanduser().exists()
    cuda = cuda_available()
    needs_hub = (not exists and cfg.model not in FALLBACKS) or cfg.data != "offline"
    reachable, detail = None, ""
    if needs_hub and cuda and not offline_env:  # no GPU or offline env already decide; skip the wait
        reachable, detail = hub_reachable(cfg.hub_timeout_s)
    return Facts(cuda=cuda, hub_offline_env=offline_env, hub_reachable=reachable, hub_detail=detail,
                 model_exists=exists)


# ------------------------------------------------------------------------------------- I/O helpers
def child_env(plan: Plan) -> dict:
    """The steps' environment: our module dirs on PYTHONPATH, no EVAL_* leaking in from a sourced recipe
    (every eval knob is passed as a flag), the hub switched off in offline mode."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVAL_")}
    paths = [str(REPO_ROOT / d) for d in SRC_DIRS]
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    if not plan.use_hub_data and plan.mode != "hub":
        env["HF_HUB_OFFLINE"] = "1"
        env["HF_DATASETS_OFFLINE"] = "1"
    return env


def check_writable(path: Path, what: str, env_name: str) -> None:
    """Create `path` and write a probe file in it; a read-only, full or odd path fails here, named."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".smoke-probe-") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        hint = ("the disk is full: free space there or point it at a larger disk" if e.errno == 28 else
                "choose a writable directory")
        raise SmokeError(f"cannot write the {what} at {path} ({e.strerror or e}); fix: {hint} "
                         f"({env_name}=DIR)", step="preflight") from None


def check_free_space(path: Path, need_bytes: int, what: str, env_name: str) -> None:
    free = shutil.disk_usage(path).free
    if free < need_bytes:
        raise SmokeError(f"the {what} at {path} needs about {need_bytes / 2**20:,.0f} MiB but only "
                         f"{free / 2**20:,.0f} MiB are free; fix: free space there or set {env_name} to a larger "
                         f"disk", step="preflight")


def checkpoint_bytes(model_dir: Path) -> int:
    return sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))


def fidelity_cache_bytes(cfg: SmokeConfig, vocab: int) -> int:
    windows = math.ceil(cfg.fidelity_tokens / (cfg.fidelity_ctx - 1))
    return windows * (cfg.fidelity_ctx - 1) * vocab * 2  # fp16 full-vocabulary teacher log-probs


def verify_quant_output(qdir: Path) -> str | None:
    """None when `qdir` holds no build or a build whose shards still hash as its meta says; else why not.

    quant_save reuses a complete build by its recipe and source fingerprint; the smoke additionally refuses
    to reuse one whose output files were damaged since (truncated copy, disk error)."""
    if not ptq_meta.has_meta(qdir):
        return None
    try:
        shards = ptq_meta.read_meta(qdir, require_complete=False).shards
    except ptq_meta.MetaError as e:
        return f"unreadable _ptq_meta.json ({e})"
    for name, info in shards.items():
        f = qdir / name
        if not f.is_file():
            return f"missing shard {name}"
        if f.stat().st_size != info["output"]["bytes"] or provenance.sha256_file(f) != info["output"]["sha256"]:
            return f"shard {name} does not match its recorded size/sha256"
    return None


def invalidate_broken_quant(qdir: Path, log) -> str | None:
    """Make a damaged earlier build look incomplete (drop its meta) so quant_save rewrites every shard."""
    broken = verify_quant_output(qdir)
    if broken:
        log(f"[smoke] the quantized checkpoint at {qdir} is broken ({broken}); rebuilding it")
        ptq_meta.meta_path(qdir).unlink()
    return broken


def bits_plan_misfit(plan_path: Path, teacher_dir: Path) -> str | None:
    """Why a bits plan cannot apply to this teacher (it names tensors the checkpoint lacks), else None.

    A plan is measured on one model (configs/plans/smollm2_smoke.json on the embedded SmolLM2); the smoke
    runs other models too (the hub model on a GPU box), which then get the recipe's uniform bits. A plan
    file that is missing or not JSON, or a checkpoint quant_save cannot read, is left to quant_save, whose
    error names it."""
    import ckpt_source

    try:
        planned = json.loads(Path(plan_path).read_text()).get("tensors") or {}
    except (OSError, ValueError, AttributeError):
        return None
    try:
        source = ckpt_source.open_source(str(teacher_dir), headers_only=True)
    except ckpt_source.BuildError:
        return None  # an unreadable checkpoint: quant_save's step names it
    have = {t.name for shard in source.shards for t in shard.tensors}
    missing = sorted(set(planned) - have)
    if not missing:
        return None
    return f"it names {len(missing)} tensor(s) the teacher {Path(teacher_dir).name} lacks (e.g. {missing[0]})"
