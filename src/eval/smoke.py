"""The smoke: the whole method, small, end to end - quantize a teacher, evaluate teacher AND quant through
vLLM on the same samples, measure fidelity, regenerate RESULTS.md, print one table, say SMOKE OK.

Why a separate orchestrator: every step already has its own CLI (quant_save.py, vllm_eval8, moe_eval.py,
make_results_md); the smoke runs exactly those, one subprocess per step (an engine's memory is returned
when its step ends, and a failing step is named with its own message), then prints a table read back
FROM the JSON files the steps wrote, so the numbers on screen are the numbers on disk.

Where it runs decides what it runs (`plan_smoke`, a pure function of the config and probed facts):
* a hub id (default Qwen/Qwen3.5-2B) on a box with CUDA and a reachable hub: that model, real hub
  benchmarks with small n;
* no CUDA, HF_HUB_OFFLINE=1 or an unreachable hub (bounded check): the offline fallback - the embedded
  SmolLM2-135M-Instruct (dense) or a tiny random-weight qwen3_moe (MoE smoke), evaluated on the smoke
  set shipped in data/smoke (easy questions in the MMLU-Pro / MATH-500 schemas, same loaders/graders);
* a local checkpoint dir: that model, offline data unless the hub is usable.

    python -m smoke --help            (pipelines/smoke.sh and smoke_moe.sh call this; docs/SMOKE.md)
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import provenance

SCHEMA = "moe-lowbit/smoke/v1"
REPO_ROOT = Path(__file__).resolve().parents[2]
SRC_DIRS = ("src/quant", "src/eval", "src/distill")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
EMBEDDED = "embedded:smollm2"
TINY_MOE = "tiny:qwen3_moe"
FALLBACKS = (EMBEDDED, TINY_MOE)
STEPS = ("resolve", "preflight", "quantize", "eval-teacher", "eval-quant", "fidelity", "compare", "results-md")
PROMPT_ROOM = 1024  # tokens reserved for the prompt on top of max_new_tokens
EXIT_BAD_INPUT, EXIT_STEP_FAILED, EXIT_INTERRUPTED = 2, 1, 130


class SmokeError(RuntimeError):
    """A failure with a message that names the bad value and the fix; `step` says where it happened."""

    def __init__(self, message: str, step: str = "resolve", code: int = EXIT_BAD_INPUT):
        super().__init__(message)
        self.step, self.code = step, code


@dataclass(frozen=True)
class SmokeConfig:
    """Every knob of a smoke run; defaults equal configs/smoke_eval.env (a test keeps them in sync)."""

    kind: str = "dense"  # dense | moe (moe: experts at expert_bits; offline fallback is a random tiny MoE)
    model: str = "Qwen/Qwen3.5-2B"  # hub id | local checkpoint dir | embedded:smollm2 | tiny:qwen3_moe
    offline_fallback: bool = True  # no GPU/hub -> run the fallback model instead of failing
    fallback_model: str = EMBEDDED
    data: str = "auto"  # auto (hub benchmarks iff GPU + hub) | offline (data/smoke) | hub
    benchmarks: tuple = ("mmlu_pro", "math500")
    data_files: Mapping = field(default_factory=lambda: {"mmlu_pro": "data/smoke/mmlu_pro_easy.jsonl",
                                                         "math500": "data/smoke/math500_easy.jsonl"})
    n: int | None = None  # offline samples per benchmark (None = every shipped row)
    hub_n: int = 50  # hub samples per benchmark
    max_new_tokens: int = 256  # offline generation budget
    hub_max_new_tokens: int = 2048
    thinking: bool = False  # SmolLM2 has no thinking mode; short smoke generations on GPU too
    temperature: float = 0.0  # greedy: the teacher/quant difference then comes from the weights only
    tensor_parallel_size: int = 1
    expert_bits: float = 3.0
    linear_bits: float = 4.0
    mtp_bits: float = 16.0
    group: int = 128
    clip_steps: int = 8
    clip_lo: float = 0.65
    quant_device: str = "auto"  # auto = cuda when available, else cpu
    fidelity_text: str = "data/smoke/fidelity.txt"  # offline: shipped text (sampling on CPU costs minutes)
    hub_fidelity_text: str = "teacher-sample"  # hub mode: text sampled from the teacher (cheap on a GPU)
    fidelity_tokens: int = 2048
    fidelity_ctx: int = 128
    results_dir: str = "results"
    work_dir: str | None = None  # quantized checkpoints; default $MOE_LOWBIT_MODELS/smoke
    hub_timeout_s: float = 5.0
    step_timeout_s: float = 1800.0
    resume: bool = False  # reuse finished generations of an earlier identical smoke (default: regenerate)

    def __post_init__(self):
        if self.kind not in ("dense", "moe"):
            raise SmokeError(f"SMOKE_KIND={self.kind!r}: choose dense or moe")
        if self.data not in ("auto", "offline", "hub"):
            raise SmokeError(f"SMOKE_DATA={self.data!r}: choose auto, offline or hub")
        if self.fallback_model not in FALLBACKS:
            raise SmokeError(f"SMOKE_FALLBACK_MODEL={self.fallback_model!r}: choose one of {FALLBACKS}")
        for name in ("hub_n", "max_new_tokens", "hub_max_new_tokens", "tensor_parallel_size", "group",
                     "fidelity_tokens", "fidelity_ctx"):
            if getattr(self, name) <= 0:
                raise SmokeError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.n is not None and self.n <= 0:
            raise SmokeError(f"SMOKE_N must be a positive count (or empty for every row), got {self.n}")
        if self.fidelity_ctx < 2 or self.fidelity_tokens < self.fidelity_ctx - 1:
            raise SmokeError(f"fidelity needs ctx >= 2 and tokens >= ctx-1, got ctx={self.fidelity_ctx} "
                             f"tokens={self.fidelity_tokens}")
        if not self.benchmarks:
            raise SmokeError("SMOKE_BENCHMARKS is empty; e.g. mmlu_pro,math500")


@dataclass(frozen=True)
class Facts:
    """What the machine offers, probed once (I/O lives in probe_facts)."""

    cuda: bool
    hub_offline_env: bool  # HF_HUB_OFFLINE set
    hub_reachable: bool | None  # None = not checked (not needed)
    hub_detail: str = ""
    model_exists: bool = False  # cfg.model is an existing local path


@dataclass(frozen=True)
class Plan:
    """What this smoke will run, decided before anything heavy happens."""

    mode: str  # hub | local | offline
    reasons: tuple  # why this mode (printed, recorded)
    teacher_spec: str  # hub id | local dir | embedded:smollm2 | tiny:qwen3_moe
    slug: str
    random_weights: bool
    use_hub_data: bool
    n: int | None
    max_new_tokens: int
    fidelity_text: str  # teacher-sample | a text file
    device: str  # cuda | cpu


# ----------------------------------------------------------------------------------------- planning
def classify_model(spec: str, exists: bool) -> str:
    """fallback | local | hub, or SmokeError naming the fix."""
    if spec in FALLBACKS:
        return "fallback"
    if exists:
        return "local"
    if spec.startswith(("/", ".", "~")) or not HUB_ID.match(spec):
        raise SmokeError(f"SMOKE_MODEL={spec}: no such checkpoint directory, and not a hub id (owner/name); fix: "
                         f"point SMOKE_MODEL at a Hugging Face checkpoint dir, use a hub id on a GPU box with the "
                         f"hub, or unset it for the offline default ({EMBEDDED})")
    return "hub"


def slug_of(spec: str) -> str:
    if spec == EMBEDDED:
        return "smollm2-135m-instruct"
    if spec == TINY_MOE:
        return "tiny-qwen3-moe-random"
    name = Path(spec.rstrip("/")).name if not HUB_ID.match(spec) or Path(spec).exists() else spec.split("/")[-1]
    return re.sub(r"[^a-z0-9.-]+", "-", name.lower()).strip("-.") or "model"


def hub_unusable_reasons(facts: Facts) -> list[str]:
    reasons = []
    if not facts.cuda:
        reasons.append("no CUDA GPU")
    if facts.hub_offline_env:
        reasons.append("HF_HUB_OFFLINE is set")
    if facts.hub_reachable is False:
        reasons.append(f"the hub is unreachable ({facts.hub_detail})")
    return reasons


def plan_smoke(cfg: SmokeConfig, facts: Facts) -> Plan:
    """Pure: which model, which data, which budget - or SmokeError naming the fix."""
    kind = classify_model(cfg.model, facts.model_exists)
    blocked = hub_unusable_reasons(facts)
    device = "cuda" if facts.cuda else "cpu"
    if cfg.data == "hub" and blocked:
        raise SmokeError(f"SMOKE_DATA=hub needs a GPU and the hub, but: {'; '.join(blocked)}; fix: SMOKE_DATA=auto "
                         f"(offline smoke set) or run on a GPU box with the hub")
    if kind == "hub" and blocked:
        if not cfg.offline_fallback:
            raise SmokeError(f"SMOKE_MODEL={cfg.model} needs a GPU and the hub, but: {'; '.join(blocked)}; and "
                             f"SMOKE_OFFLINE_FALLBACK=0 forbids the offline model. Fix: unset SMOKE_OFFLINE_FALLBACK "
                             f"(runs {cfg.fallback_model} offline), set SMOKE_MODEL to a local checkpoint dir, or run "
                             f"on a GPU box with the hub")
        spec, reasons = cfg.fallback_model, (f"offline fallback for {cfg.model}: " + "; ".join(blocked),)
    elif kind == "fallback":
        spec, reasons = cfg.model, (f"SMOKE_MODEL={cfg.model} (offline model)",)
    else:
        spec, reasons = cfg.model, (f"SMOKE_MODEL={cfg.model} ({kind})",)
    if cfg.kind == "dense" and spec == TINY_MOE or cfg.kind == "moe" and spec == EMBEDDED:
        raise SmokeError(f"SMOKE_KIND={cfg.kind} does not fit model {spec}: the dense smoke uses {EMBEDDED}, the "
                         f"MoE smoke {TINY_MOE} (SMOKE_FALLBACK_MODEL)")
    use_hub_data = cfg.data == "hub" or (cfg.data == "auto" and not blocked and spec not in FALLBACKS)
    mode = "offline" if spec in FALLBACKS else ("hub" if kind == "hub" else "local")
    return Plan(mode=mode, reasons=reasons, teacher_spec=spec, slug=slug_of(spec),
                random_weights=spec == TINY_MOE, use_hub_data=use_hub_data,
                n=cfg.hub_n if use_hub_data else cfg.n,
                max_new_tokens=cfg.hub_max_new_tokens if use_hub_data else cfg.max_new_tokens,
                fidelity_text=cfg.hub_fidelity_text if use_hub_data else cfg.fidelity_text, device=device)


def recipe_slug(cfg: SmokeConfig, kind: str) -> str:
    bits = f"e{cfg.expert_bits:g}l{cfg.linear_bits:g}" if kind == "moe" else f"w{cfg.linear_bits:g}"
    return f"{bits}g{cfg.group}c{cfg.clip_steps}"


def tags_for(plan: Plan, cfg: SmokeConfig) -> dict:
    prefix = "smoke" if cfg.kind == "dense" else "smoke_moe"
    base = f"{prefix}_{plan.slug}"
    return {"teacher": f"{base}_bf16", "quant": f"{base}_{recipe_slug(cfg, cfg.kind)}", "summary": base}


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
    meta_path = qdir / "_ptq_meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        shards = meta["shards"]
    except (OSError, ValueError, KeyError) as e:
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
        (qdir / "_ptq_meta.json").unlink()
    return broken


def run_step(name: str, cmd: Sequence[str], env: Mapping, timeout_s: float, log) -> list[str]:
    """Run one step's CLI, streaming its output to stderr; the tail is kept for the failure message.

    The child gets its own process group so a timeout or Ctrl-C ends it with everything it started
    (vLLM engine cores) and nothing else."""
    log(f"[smoke] {name}: {' '.join(str(c) for c in cmd)}")
    tail: collections.deque = collections.deque(maxlen=40)
    proc = subprocess.Popen([str(c) for c in cmd], env=dict(env), cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1,
                            start_new_session=True)
    timed_out = threading.Event()

    def kill_group():
        timed_out.set()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    timer = threading.Timer(timeout_s, kill_group)
    timer.start()
    try:
        for line in proc.stdout:
            sys.stderr.write(line)
            tail.append(line.rstrip("\n"))
        rc = proc.wait()
    except KeyboardInterrupt:
        kill_group()
        proc.wait()
        raise
    finally:
        timer.cancel()
    if timed_out.is_set():
        raise SmokeError(f"step {name} did not finish within {timeout_s:.0f} s; fix: raise SMOKE_STEP_TIMEOUT_S or "
                         f"lower SMOKE_N / SMOKE_MAX_NEW_TOKENS", step=name, code=EXIT_STEP_FAILED)
    if rc != 0:
        raise SmokeError(f"step {name} exited with {rc}: {explain_failure(list(tail))}", step=name,
                         code=EXIT_STEP_FAILED)
    return list(tail)


def explain_failure(tail: Sequence[str]) -> str:
    """The child's own error line (they all print one), plus a fix for the failures we recognise."""
    text = "\n".join(tail)
    hints = []
    if re.search(r"No space left on device|Errno 28|ENOSPC", text):
        hints.append("the disk is full: free space or set SMOKE_WORK_DIR / SMOKE_RESULTS_DIR / MOE_LOWBIT_CACHE "
                     "to a larger disk")
    if re.search(r"Read-only file system|Permission denied", text):
        hints.append("a directory is not writable: set SMOKE_WORK_DIR / SMOKE_RESULTS_DIR to a writable one")
    if re.search(r"out of memory|OutOfMemory|Cannot allocate memory", text, re.IGNORECASE):
        hints.append("out of memory: lower SMOKE_N / SMOKE_MAX_NEW_TOKENS or VLLM_CPU_KVCACHE_SPACE")
    errors = [l for l in tail if re.search(r"(error|Error|failed|refused|Traceback)", l)]
    shown = errors[-3:] if errors else list(tail)[-3:]
    msg = " | ".join(s.strip() for s in shown if s.strip()) or "(no output)"
    return msg + (f"; fix: {'; '.join(hints)}" if hints else "")


def read_json(path: Path, step: str) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SmokeError(f"step {step} wrote no readable JSON at {path}: {e}", step=step, code=EXIT_STEP_FAILED) from None


def write_json_atomic(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# -------------------------------------------------------------------------------------- commands
def quantize_cmd(teacher_dir: Path, qdir: Path, cfg: SmokeConfig, device: str, force: bool) -> list:
    cmd = [sys.executable, REPO_ROOT / "src/quant/quant_save.py", "--model", teacher_dir, "--out", qdir,
           "--expert-bits", f"{cfg.expert_bits:g}", "--linear-bits", f"{cfg.linear_bits:g}",
           "--mtp-bits", f"{cfg.mtp_bits:g}", "--group", cfg.group, "--clip-steps", cfg.clip_steps,
           "--clip-lo", f"{cfg.clip_lo:g}", "--device", device, "--no-progress"]
    return cmd + (["--force"] if force else [])


def eval_cmd(model_dir: Path, tag: str, role: str, plan: Plan, cfg: SmokeConfig, results_dir: Path,
             reference_tag: str | None) -> list:
    cmd = [sys.executable, "-m", "vllm_eval8", "--model", model_dir, "--tag", tag, "--role", role,
           "--backend", "vllm", "--benchmarks", ",".join(cfg.benchmarks),
           "--thinking", "on" if cfg.thinking else "off", "--temperature", f"{cfg.temperature:g}",
           "--seed", "0", "--data-seed", "0", "--max-new-tokens", plan.max_new_tokens,
           "--max-model-len", plan.max_new_tokens + PROMPT_ROOM, "--tensor-parallel-size", cfg.tensor_parallel_size,
           "--dtype", "auto", "--results-dir", results_dir / "vllm_eval", "--no-progress"]
    if plan.device == "cpu":
        cmd += ["--enforce-eager", "on"]  # torch.compile on CPU costs minutes for a two-minute eval
    if plan.n is not None:
        cmd += ["--n", plan.n]
    if not plan.use_hub_data:
        for bench in cfg.benchmarks:
            if bench not in cfg.data_files:
                raise SmokeError(f"offline benchmark {bench} has no data file; set SMOKE_DATA_FILES={bench}=PATH")
            cmd += ["--data-file", f"{bench}={REPO_ROOT / cfg.data_files[bench]}"]
    if reference_tag:
        cmd += ["--reference-tag", reference_tag]
    return cmd


def fidelity_cmd(teacher_dir: Path, qdir: Path, out: Path, cfg: SmokeConfig, plan: Plan) -> list:
    cmd = [sys.executable, REPO_ROOT / "src/eval/moe_eval.py", "--teacher", teacher_dir, "--student", qdir,
           "--out", out, "--ctx", cfg.fidelity_ctx, "--max-tokens", cfg.fidelity_tokens, "--device", plan.device]
    if plan.fidelity_text == "teacher-sample":
        return cmd + ["--text", "teacher-sample", "--n-tokens", cfg.fidelity_tokens, "--seed", "0"]
    path = Path(plan.fidelity_text)
    path = path if path.is_absolute() else REPO_ROOT / path
    if not path.is_file():
        raise SmokeError(f"fidelity text {plan.fidelity_text}: no such file; fix: set SMOKE_FIDELITY_TEXT (offline) / "
                         f"SMOKE_HUB_FIDELITY_TEXT (hub) to a UTF-8 text file or 'teacher-sample'", step="fidelity")
    return cmd + ["--text-file", path]


# ----------------------------------------------------------------------------------- the run itself
def resolve_teacher(plan: Plan, log) -> Path:
    """A local checkpoint dir for the teacher (converting / building / downloading as needed)."""
    import embedded_model

    try:
        if plan.teacher_spec == EMBEDDED:
            return embedded_model.smollm2_bf16_dir(log=log)
        if plan.teacher_spec == TINY_MOE:
            import smoke_models

            return smoke_models.tiny_moe_dir(embedded_model.smollm2_bf16_dir(log=log), log=log)
    except RuntimeError as e:  # EmbeddedModelError / SmokeModelError carry their own fix
        raise SmokeError(str(e)) from None
    if plan.mode == "hub":
        try:
            import huggingface_hub

            log(f"[smoke] downloading {plan.teacher_spec} from the hub (cached by huggingface_hub)")
            return Path(huggingface_hub.snapshot_download(
                plan.teacher_spec, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model",
                                                   "*.tiktoken", "*.py", "LICENSE*"]))
        except Exception as e:  # network, auth, missing repo: one line, with the fix
            first = provenance.redact(str(e)).splitlines()[0] if str(e) else type(e).__name__
            raise SmokeError(f"SMOKE_MODEL={plan.teacher_spec}: hub download failed ({first}); fix: check the id, "
                             f"HF_TOKEN for gated models, or use a local dir") from None
    path = Path(plan.teacher_spec).expanduser().resolve()
    if not (path / "config.json").is_file():
        raise SmokeError(f"SMOKE_MODEL={plan.teacher_spec}: {path} has no config.json; fix: point it at a Hugging "
                         f"Face checkpoint directory")
    return path


def run_smoke(cfg: SmokeConfig, log=lambda m: print(m, file=sys.stderr, flush=True),
              facts: Facts | None = None, argv=None) -> dict:
    """Run every step; returns the summary dict (also written to <results>/smoke/<tag>.json).

    Raises SmokeError (with .step) on the first failure; nothing after a failed step runs.
    """
    t_all = time.perf_counter()
    timings: dict[str, float] = {}
    notes: dict[str, str] = {}

    @contextlib.contextmanager
    def timed(name):
        """Time one step; an unexpected OS/data error inside it becomes a SmokeError naming the step."""
        log(f"[smoke] --- {name} ---")
        t0 = time.perf_counter()
        try:
            yield
        except SmokeError as e:
            if e.step == "resolve":  # raised by a helper that did not know which step called it
                e.step = name
            raise
        except OSError as e:
            hint = "; fix: free disk space or point SMOKE_WORK_DIR/SMOKE_RESULTS_DIR elsewhere" if e.errno == 28 else ""
            raise SmokeError(f"{type(e).__name__}: {e}{hint}", step=name, code=EXIT_STEP_FAILED) from e
        except (ValueError, KeyError, TypeError) as e:
            raise SmokeError(f"{type(e).__name__}: {e}", step=name, code=EXIT_STEP_FAILED) from e
        finally:
            timings[name] = time.perf_counter() - t0

    with timed("resolve"):
        facts = facts or probe_facts(cfg)
        plan = plan_smoke(cfg, facts)
        for r in plan.reasons:
            log(f"[smoke] mode {plan.mode}: {r}")
        if plan.random_weights:
            log("[smoke] NOTE: the offline MoE has RANDOM weights: only the plumbing is tested, accuracies mean nothing")
        teacher_dir = resolve_teacher(plan, log)
    tags = tags_for(plan, cfg)
    results = Path(cfg.results_dir)
    results = results if results.is_absolute() else REPO_ROOT / results
    work = Path(cfg.work_dir or os.path.join(os.environ.get("MOE_LOWBIT_MODELS", REPO_ROOT / "models"), "smoke"))
    qdir = work / f"{plan.slug}_{recipe_slug(cfg, cfg.kind)}"
    eval_dir = results / "vllm_eval"
    paths = {"teacher_eval": eval_dir / f"{tags['teacher']}.json", "quant_eval": eval_dir / f"{tags['quant']}.json",
             "fidelity": results / "fidelity" / f"{tags['summary']}.json",
             "summary": results / "smoke" / f"{tags['summary']}.json", "results_md": results / "RESULTS.md"}
    env = child_env(plan)
    quant_device = plan.device if cfg.quant_device == "auto" else cfg.quant_device

    with timed("preflight"):
        check_writable(results, "results dir", "SMOKE_RESULTS_DIR")
        check_writable(work, "quantized-checkpoint dir", "SMOKE_WORK_DIR")
        import moe_eval

        fcache = moe_eval.EvalConfig().cache_dir()
        check_writable(fcache, "fidelity teacher cache", "MOE_LOWBIT_CACHE")
        vocab = int(json.loads((teacher_dir / "config.json").read_text()).get("vocab_size")
                    or json.loads((teacher_dir / "config.json").read_text()).get("text_config", {}).get("vocab_size")
                    or 262144)
        check_free_space(work, int(checkpoint_bytes(teacher_dir) * 1.05) + (64 << 20), "quantized-checkpoint dir",
                         "SMOKE_WORK_DIR")
        check_free_space(fcache, fidelity_cache_bytes(cfg, vocab) + (16 << 20), "fidelity teacher cache",
                         "MOE_LOWBIT_CACHE")
        check_free_space(results, 16 << 20, "results dir", "SMOKE_RESULTS_DIR")
        stale = [paths["summary"], paths["fidelity"]]
        if not cfg.resume:
            stale += [eval_dir / f"{t}.{ext}" for t in (tags["teacher"], tags["quant"]) for ext in ("json", "jsonl")]
        for p in stale:
            p.unlink(missing_ok=True)  # this run's own outputs only: a failed step must not leave old numbers

    with timed("quantize"):
        broken = invalidate_broken_quant(qdir, log)
        before = (qdir / "_ptq_meta.json").stat().st_mtime_ns if (qdir / "_ptq_meta.json").is_file() else None
        # --force: qdir is the smoke's own output; an identical complete build is still reused by quant_save,
        # one made by another recipe / quantizer version is rebuilt instead of refused.
        run_step("quantize", quantize_cmd(teacher_dir, qdir, cfg, quant_device, force=True), env,
                 cfg.step_timeout_s, log)
        meta = read_json(qdir / "_ptq_meta.json", "quantize")
        after = (qdir / "_ptq_meta.json").stat().st_mtime_ns
        notes["quantize"] = "reused (verified)" if before is not None and before == after and not broken else "built"

    with timed("eval-teacher"):
        run_step("eval-teacher", eval_cmd(teacher_dir, tags["teacher"], "teacher", plan, cfg, results, None), env,
                 cfg.step_timeout_s, log)
        teacher_doc = read_json(paths["teacher_eval"], "eval-teacher")
    with timed("eval-quant"):
        run_step("eval-quant", eval_cmd(qdir, tags["quant"], "quant", plan, cfg, results, tags["teacher"]), env,
                 cfg.step_timeout_s, log)
        quant_doc = read_json(paths["quant_eval"], "eval-quant")
    with timed("fidelity"):
        run_step("fidelity", fidelity_cmd(teacher_dir, qdir, paths["fidelity"], cfg, plan), env,
                 cfg.step_timeout_s, log)
        read_json(paths["fidelity"], "fidelity")
    with timed("compare"):
        import compare

        try:
            comparison = compare.compare_results(teacher_doc, quant_doc)
        except (compare.UnpairedError, ValueError) as e:
            raise SmokeError(f"teacher and quant results cannot be paired: {e}", step="compare",
                             code=EXIT_STEP_FAILED) from None
    with timed("results-md"):
        run_step("results-md", [sys.executable, "-m", "make_results_md", "--results-dir", results], env,
                 cfg.step_timeout_s, log)

    summary = {
        "schema": SCHEMA,
        "kind": cfg.kind,
        "mode": plan.mode,
        "reasons": list(plan.reasons),
        "random_weights": plan.random_weights,
        "data": "hub" if plan.use_hub_data else "offline",
        "teacher": {"spec": plan.teacher_spec, "requested": cfg.model, "dir": str(teacher_dir), "slug": plan.slug},
        "quant": {"dir": str(qdir), "recipe": meta.get("recipe"), "build": notes["quantize"],
                  "footprint_total": meta["footprint"]["total"],
                  "footprint_roles": {role: {k: r.get(k) for k in ("bits", "effective_bits", "params", "rel_mse")}
                                      for role, r in meta["footprint"]["roles"].items()}},
        "tags": tags,
        "files": {k: os.path.relpath(v, results) for k, v in paths.items()},
        "comparison": comparison,
        "timings_s": {**timings, "total": time.perf_counter() - t_all},
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()},
        "provenance": provenance.record(argv=argv),
    }
    write_json_atomic(paths["summary"], summary)
    return summary


# --------------------------------------------------------------------------------------- the table
def load_outputs(summary_path: Path) -> dict:
    """The summary and every JSON it names, read back from disk (the table is printed from these)."""
    summary = json.loads(Path(summary_path).read_text(encoding="utf-8"))
    base = Path(summary_path).parent.parent
    docs = {"summary": summary}
    for key in ("teacher_eval", "quant_eval", "fidelity"):
        docs[key] = json.loads((base / summary["files"][key]).read_text(encoding="utf-8"))
    return docs


def _f(x, fmt: str) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def render_table(docs: Mapping) -> str:
    """Pure: the smoke table, every number formatted from the JSON dicts in `docs`."""
    s, t, q, fid = docs["summary"], docs["teacher_eval"], docs["quant_eval"], docs["fidelity"]
    st = fid["students"][0]
    fp = s["quant"]["footprint_total"]
    recipe = s["quant"]["recipe"] or {}
    lines = [f"SMOKE {s['kind']}  mode={s['mode']}  data={s['data']}  teacher={s['teacher']['spec']}",
             f"  why: {'; '.join(s['reasons'])}",
             f"  quant: {t['tag']} -> {q['tag']}  (linear {recipe.get('linear_bits')} bit, experts "
             f"{recipe.get('expert_bits')} bit, group {recipe.get('group')}, clip steps {recipe.get('clip_steps')}; "
             f"{s['quant']['build']})"]
    if s["random_weights"]:
        lines.append("  NOTE: RANDOM-WEIGHT MoE: only the plumbing is meaningful; no accuracy claim is made")
    lines += ["",
              f"{'benchmark':<10} {'n':>4} | {'teacher acc':>11} {'95% CI':>14} {'trunc':>6} | {'quant acc':>9} "
              f"{'95% CI':>14} {'trunc':>6} | {'delta':>7} {'paired 95% CI':>16} {'McNemar p':>9}"]
    for bench, c in s["comparison"]["benchmarks"].items():
        tb, qb = t["benchmarks"][bench], q["benchmarks"][bench]
        tci = "[%s, %s]" % (_f(tb["ci95"][0], ".1f"), _f(tb["ci95"][1], ".1f"))
        qci = "[%s, %s]" % (_f(qb["ci95"][0], ".1f"), _f(qb["ci95"][1], ".1f"))
        dci = "[%s, %s]" % (_f(c["ci95"][0], "+.1f"), _f(c["ci95"][1], "+.1f"))
        lines.append(f"{bench:<10} {tb['n']:>4} | {_f(tb['acc'], '.1f'):>11} {tci:>14} {_f(tb['trunc'], '.1f'):>6} | "
                     f"{_f(qb['acc'], '.1f'):>9} {qci:>14} {_f(qb['trunc'], '.1f'):>6} | {_f(c['delta'], '+.1f'):>7} "
                     f"{dci:>16} {_f(c['p_mcnemar'], '.3g'):>9}")
    ppl_iv = st["ppl_ratio_interval"]
    kl_iv = st["kl_mean_interval"]
    lines += ["",
              f"fidelity ({fid['text']['kind']}, {fid['text']['n_scored_tokens']} tokens, ctx {fid['text']['ctx']}): "
              f"PPL teacher {_f(st['ppl_teacher'], '.3f')} quant {_f(st['ppl_student'], '.3f')} "
              f"(ratio {_f(st['ppl_ratio'], '.4f')} [{_f(ppl_iv[0], '.4f')}, {_f(ppl_iv[1], '.4f')}]); "
              f"KL {_f(st['kl_mean'], '.5f')} [{_f(kl_iv[0], '.5f')}, {_f(kl_iv[1], '.5f')}] ({st['kl_kind']}); "
              f"top-1 {_f(st['top1_agree'], '.4f')}",
              f"footprint: effective bits {_f(fp['effective_bits'], '.3f')} (quantized tensors "
              f"{_f(fp['effective_bits_quantized'], '.3f')}); packed {_f(fp['packed_bytes'] / 2**20, '.1f')} MiB vs "
              f"source {_f(fp['source_bytes'] / 2**20, '.1f')} MiB (x{_f(fp['compression'], '.2f')})",
              "wall s: " + ", ".join(f"{k} {_f(v, '.1f')}" for k, v in s["timings_s"].items())]
    roles = s["quant"].get("footprint_roles") or {}
    if roles:
        lines.insert(-1, "per role: " + "; ".join(
            f"{role} {'/'.join(f'{b:g}' for b in r['bits'])} bit (eff {_f(r['effective_bits'], '.3f')}, rel MSE "
            f"{_f(r['rel_mse'], '.4f')})" for role, r in roles.items()))
    return "\n".join(lines)


def missing_numbers(docs: Mapping) -> list[str]:
    """Every number the table needs that a step failed to produce (None / NaN / absent)."""
    missing = []

    def need(value, what):
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            missing.append(what)

    s, st = docs["summary"], docs["fidelity"]["students"][0] if docs["fidelity"].get("students") else {}
    for bench, c in s["comparison"]["benchmarks"].items():
        for role, doc in (("teacher", docs["teacher_eval"]), ("quant", docs["quant_eval"])):
            block = doc["benchmarks"].get(bench, {})
            for key in ("acc", "trunc"):
                need(block.get(key), f"{role} {bench} {key}")
        need(c.get("delta"), f"{bench} delta")
        for i, v in enumerate(c.get("ci95") or [None, None]):
            need(v, f"{bench} paired interval[{i}]")
    for key in ("ppl_teacher", "ppl_student", "kl_mean", "top1_agree"):
        need(st.get(key), f"fidelity {key}")
    for key in ("effective_bits", "packed_bytes"):
        need(s["quant"]["footprint_total"].get(key), f"footprint {key}")
    for step in STEPS:
        need(s["timings_s"].get(step), f"wall time of {step}")
    return missing


# ---------------------------------------------------------------------------------------------- CLI
def _on_off(value: str) -> bool:
    v = str(value).strip().lower()
    if v in ("1", "on", "true", "yes"):
        return True
    if v in ("0", "off", "false", "no"):
        return False
    raise ValueError(f"expected on/off (1/0), got {value!r}")


def _opt_int(value: str) -> int | None:
    return None if str(value).strip().lower() in ("", "all", "none") else int(value)


def _bench_files(value: str) -> dict:
    out = {}
    for item in str(value).split(","):
        if item.strip():
            bench, sep, path = item.partition("=")
            if not sep:
                raise ValueError(f"data file {item!r} must look like BENCH=PATH")
            out[bench.strip()] = path.strip()
    return out


# (flag, SmokeConfig field, converter, help); each also reads SMOKE_<FIELD upper> from the environment
OPTIONS = (
    ("--kind", "kind", str, "dense | moe"),
    ("--model", "model", str, "hub id, local checkpoint dir, embedded:smollm2 or tiny:qwen3_moe"),
    ("--offline-fallback", "offline_fallback", _on_off, "on|off: without GPU/hub, run the fallback model"),
    ("--fallback-model", "fallback_model", str, f"one of {FALLBACKS}"),
    ("--data", "data", str, "auto | offline (data/smoke) | hub"),
    ("--benchmarks", "benchmarks", lambda v: tuple(b.strip() for b in v.split(",") if b.strip()), "comma list"),
    ("--data-files", "data_files", _bench_files, "offline files, BENCH=PATH,BENCH=PATH (repo-relative ok)"),
    ("--n", "n", _opt_int, "offline samples per benchmark (empty/all = every shipped row)"),
    ("--hub-n", "hub_n", int, "hub samples per benchmark"),
    ("--max-new-tokens", "max_new_tokens", int, "offline generation budget"),
    ("--hub-max-new-tokens", "hub_max_new_tokens", int, "hub generation budget"),
    ("--thinking", "thinking", _on_off, "on|off"),
    ("--temperature", "temperature", float, "0 = greedy"),
    ("--tp", "tensor_parallel_size", int, "vLLM tensor parallel size"),
    ("--expert-bits", "expert_bits", float, "routed-expert bits"),
    ("--linear-bits", "linear_bits", float, "bits of every other linear"),
    ("--mtp-bits", "mtp_bits", float, "multi-token-prediction bits"),
    ("--group", "group", int, "quant group size"),
    ("--clip-steps", "clip_steps", int, "clip-ratio candidates"),
    ("--clip-lo", "clip_lo", float, "smallest clip ratio"),
    ("--quant-device", "quant_device", str, "auto | cpu | cuda | cuda:N"),
    ("--fidelity-text", "fidelity_text", str, "offline fidelity text: a UTF-8 file (repo-relative ok) or teacher-sample"),
    ("--hub-fidelity-text", "hub_fidelity_text", str, "hub-mode fidelity text: teacher-sample or a file"),
    ("--fidelity-tokens", "fidelity_tokens", int, "tokens scored for PPL/KL/top-1"),
    ("--fidelity-ctx", "fidelity_ctx", int, "fidelity window length"),
    ("--results-dir", "results_dir", str, "results root (vllm_eval/, fidelity/, smoke/, RESULTS.md)"),
    ("--work-dir", "work_dir", str, "where quantized checkpoints go (default $MOE_LOWBIT_MODELS/smoke)"),
    ("--hub-timeout-s", "hub_timeout_s", float, "bound of the hub reachability check"),
    ("--step-timeout-s", "step_timeout_s", float, "a step running longer is killed and named"),
    ("--resume", "resume", _on_off, "on|off: reuse finished generations of an identical earlier smoke"),
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="smoke", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, name, _conv, help_text in OPTIONS:
        p.add_argument(flag, dest=name, default=None, help=f"{help_text} [env SMOKE_{name.upper()}]")
    p.add_argument("--plan", action="store_true", help="print the plan (mode, model, data, budget) and exit")
    return p


def config_from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> SmokeConfig:
    """Command line > SMOKE_* environment > SmokeConfig defaults."""
    env = os.environ if environ is None else environ
    values = {}
    for _flag, name, conv, _help in OPTIONS:
        raw = getattr(args, name)
        env_key = "SMOKE_TP" if name == "tensor_parallel_size" else f"SMOKE_{name.upper()}"
        if raw is None and env_key in env and (env[env_key] != "" or name == "n"):
            raw = env[env_key]
        if raw is not None:
            try:
                values[name] = conv(raw)
            except ValueError as e:
                raise SmokeError(f"bad value {raw!r} for {env_key} / {_flag}: {e}") from None
    return SmokeConfig(**values)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    step = "resolve"
    try:
        cfg = config_from_args(args)
        if args.plan:
            facts = probe_facts(cfg)
            plan = plan_smoke(cfg, facts)
            print(json.dumps({"plan": dataclasses.asdict(plan), "facts": dataclasses.asdict(facts),
                              "tags": tags_for(plan, cfg)}, indent=1))
            return 0
        summary = run_smoke(cfg, argv=[sys.argv[0], *argv])
        step = "table"
        results = Path(cfg.results_dir)
        results = results if results.is_absolute() else REPO_ROOT / results
        docs = load_outputs(results / summary["files"]["summary"])
    except SmokeError as e:
        print(f"SMOKE FAILED at step {e.step}: {provenance.redact(str(e))}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print(f"SMOKE INTERRUPTED during step {step}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (OSError, ValueError, KeyError) as e:
        print(f"SMOKE FAILED at step {step}: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_STEP_FAILED
    print(render_table(docs))
    missing = missing_numbers(docs)
    if missing:
        print(f"SMOKE FAILED: these numbers were not produced: {', '.join(missing)}", file=sys.stderr)
        return EXIT_STEP_FAILED
    print("SMOKE OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
