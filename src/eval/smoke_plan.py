"""The smoke's plan: its config, the probed facts, and `plan_smoke`, a pure function of both that decides
what runs (hub model or offline fallback, data, device). No I/O here."""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from model_ref import HUB_ID
from tool_config import option


SCHEMA = "moe-lowbit/smoke/v1"
REPO_ROOT = Path(__file__).resolve().parents[2]
SRC_DIRS = ("src/quant", "src/eval", "src/distill")
EMBEDDED = "embedded:smollm2"
EMBEDDED_MOE = "embedded:smollm2-moe"  # real weights: SmolLM2 MoEfied into qwen2_moe (docs/SMOLLM2_MOE.md)
TINY_MOE = "tiny:qwen3_moe"  # random weights: plumbing tests only
FALLBACKS = (EMBEDDED, EMBEDDED_MOE, TINY_MOE)
MOE_FALLBACKS = (EMBEDDED_MOE, TINY_MOE)
STEPS = ("resolve", "preflight", "quantize", "eval-teacher", "eval-quant", "fidelity", "compare", "results-md")
QUANT_KNOBS = ("expert_bits", "linear_bits", "mtp_bits", "group", "clip_steps", "clip_lo", "method", "grid",
               "act_order", "role_bits", "bits_plan", "calib", "calib_tokens", "calib_ctx")  # from the quant recipe
SHIP_EXPORTS = ("compressed-tensors", "gguf")  # exports of the shipped int4 store the smoke can evaluate
PROMPT_ROOM = 1024  # tokens reserved for the prompt on top of max_new_tokens
EXIT_BAD_INPUT, EXIT_STEP_FAILED, EXIT_INTERRUPTED = 2, 1, 130


class SmokeError(RuntimeError):
    """A failure with a message that names the bad value and the fix; `step` says where it happened."""

    def __init__(self, message: str, step: str = "resolve", code: int = EXIT_BAD_INPUT):
        super().__init__(message)
        self.step, self.code = step, code


def _opt_int(value: str) -> int | None:
    return None if str(value).strip().lower() in ("", "all", "none") else int(value)


def _bench_files(items) -> dict:
    out = {}
    for item in items:
        bench, sep, path = str(item).partition("=")
        if not sep:
            raise ValueError(f"data file {item!r} must look like BENCH=PATH")
        out[bench.strip()] = path.strip()
    return out


def _benches(text) -> tuple:
    return tuple(dict.fromkeys(b.strip() for b in str(text).split(",") if b.strip()))


Q = "quant recipe: "  # the quant knobs come from SMOKE_QUANT_RECIPE (a configs/*.env quant recipe) unless set here


@dataclass(frozen=True)
class SmokeConfig:
    """Every knob of a smoke run (tool_config: flag --F, env SMOKE_F, recipe key F); defaults equal
    configs/smoke_eval.env (a test keeps them in sync); the quant knobs default to SMOKE_QUANT_RECIPE's."""

    kind: str = option("dense", "dense | moe (moe: experts at expert_bits)", choices=("dense", "moe"))
    model: str = option("Qwen/Qwen3.5-2B", "hub id, local checkpoint dir, embedded:smollm2 or tiny:qwen3_moe")
    offline_fallback: bool = option(True, "without GPU/hub, run the fallback model instead of failing")
    fallback_model: str = option(EMBEDDED, f"one of {FALLBACKS}")
    data: str = option("auto", "auto (hub benchmarks iff GPU + hub) | offline (configs/data/smoke) | hub")
    benchmarks: tuple = option(("mmlu_pro", "math500"), "comma list", parse=_benches)
    data_files: Mapping = option(None, "offline files, BENCH=PATH,BENCH=PATH (repo-relative ok)", parse=_bench_files,
                                 repeat=True, factory=lambda: {"mmlu_pro": "configs/data/smoke/mmlu_pro_easy.jsonl",
                                                               "math500": "configs/data/smoke/math500_easy.jsonl"})
    n: int | None = option(None, "offline samples per benchmark (empty/all = every shipped row)", parse=_opt_int)
    hub_n: int = option(50, "hub samples per benchmark")
    max_new_tokens: int = option(256, "offline generation budget")
    hub_max_new_tokens: int = option(2048, "hub generation budget")
    thinking: bool = option(False, "thinking mode (SmolLM2 has none; short smoke generations on GPU too)")
    temperature: float = option(0.0, "0 = greedy: the teacher/quant difference then comes from the weights only")
    tensor_parallel_size: int = option(1, "vLLM tensor parallel size", flag="--tp", legacy=("SMOKE_TP",))
    quant_recipe: str = option("configs/smoke.env", "the quant recipe (configs/*.env) the knobs below default to")
    expert_bits: float = option(3.0, Q + "routed-expert bits", legacy=("EXPERT_BITS",))
    linear_bits: float = option(4.0, Q + "bits of every other linear", legacy=("LINEAR_BITS",))
    mtp_bits: float = option(16.0, Q + "multi-token-prediction bits", legacy=("MTP_BITS",))
    group: int = option(128, Q + "group size", legacy=("GROUP",))
    clip_steps: int = option(8, Q + "clip-ratio candidates", legacy=("CLIP_STEPS",))
    clip_lo: float = option(0.65, Q + "smallest clip ratio", legacy=("CLIP_LO",))
    method: str = option("clip", Q + "clip | rtn | wclip | gptq | awq", legacy=("METHOD",))
    grid: str = option("sym", Q + "code grid: sym | full | asym", legacy=("GRID",))
    act_order: bool = option(False, Q + "gptq columns in decreasing diag(H) order", legacy=("ACT_ORDER",))
    role_bits: str = option("", Q + "per-role bits, ROLE=BITS[,ROLE=BITS] (e.g. embed=8)", legacy=("ROLE_BITS",))
    bits_plan: str = option("", Q + "per-tensor bits plan JSON (repo-relative ok)", legacy=("BITS_PLAN",))
    calib: str = option("", Q + "pydoc-topics | teacher-sample | a text file (calibrated methods)", legacy=("CALIB",))
    calib_tokens: int = option(0, Q + "calibration tokens (0 = quant_save's default)", legacy=("CALIB_TOKENS",))
    calib_ctx: int = option(512, Q + "calibration window length", legacy=("CALIB_CTX",))
    quant_device: str = option("auto", "auto (cuda when available, else cpu) | cpu | cuda | cuda:N")
    fidelity_text: str = option("configs/data/smoke/fidelity.txt", "offline fidelity text: a UTF-8 file (repo-relative "
                                "ok) or teacher-sample (sampling on CPU costs minutes)")
    hub_fidelity_text: str = option("teacher-sample", "hub-mode fidelity text: teacher-sample or a file")
    fidelity_tokens: int = option(2048, "tokens scored for PPL/KL/top-1")
    fidelity_ctx: int = option(128, "fidelity window length")
    results_dir: str = option("results", "results root (vllm_eval/, fidelity/, smoke/, RESULTS.md)")
    work_dir: str | None = option(None, "where quantized checkpoints go (default $MOE_LOWBIT_MODELS/smoke)", kind=str)
    hub_timeout_s: float = option(5.0, "bound of the hub reachability check")
    step_timeout_s: float = option(1800.0, "a step running longer is killed and named")
    resume: bool = option(False, "reuse finished generations of an identical earlier smoke (default: regenerate)")
    ship_exports: tuple = option(SHIP_EXPORTS, "exports of the shipped int4 store to build, verify and evaluate: "
                                 "compressed-tensors (vLLM's WNA16 kernels), gguf (llama-perplexity KLD); empty = none",
                                 parse=_benches)
    ship_group: int = option(32, "group of the shipped int4 store (32: both compressed-tensors W4A16 and GGUF Q4_0 "
                             "hold it)")
    compare_recipe: str = option("", "a second quant recipe (configs/*.env) built and evaluated as a comparison row")

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
        bad = [x for x in self.ship_exports if x not in SHIP_EXPORTS]
        if bad:
            raise SmokeError(f"SMOKE_SHIP_EXPORTS={','.join(self.ship_exports)}: {bad[0]!r} is not one of "
                             f"{','.join(SHIP_EXPORTS)} (empty for none)")
        if self.ship_group <= 0:
            raise SmokeError(f"ship_group must be > 0, got {self.ship_group}")


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
    if spec == EMBEDDED_MOE:
        return "smollm2-135m-moe"
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
    if cfg.kind == "dense" and spec in MOE_FALLBACKS or cfg.kind == "moe" and spec == EMBEDDED:
        raise SmokeError(f"SMOKE_KIND={cfg.kind} does not fit model {spec}: the dense smoke uses {EMBEDDED}, the "
                         f"MoE smoke {EMBEDDED_MOE} (or {TINY_MOE} for plumbing) (SMOKE_FALLBACK_MODEL)")
    use_hub_data = cfg.data == "hub" or (cfg.data == "auto" and not blocked and spec not in FALLBACKS)
    mode = "offline" if spec in FALLBACKS else ("hub" if kind == "hub" else "local")
    return Plan(mode=mode, reasons=reasons, teacher_spec=spec, slug=slug_of(spec),
                random_weights=spec == TINY_MOE, use_hub_data=use_hub_data,
                n=cfg.hub_n if use_hub_data else cfg.n,
                max_new_tokens=cfg.hub_max_new_tokens if use_hub_data else cfg.max_new_tokens,
                fidelity_text=cfg.hub_fidelity_text if use_hub_data else cfg.fidelity_text, device=device)


def recipe_slug(cfg: SmokeConfig, kind: str) -> str:
    """The quant's name: bits, group and clip steps, then whatever departs from the seed's recipe (method,
    grid, act-order, role bits, the bits plan's file name), then a short digest of the other build knobs
    (clip range, MTP bits, calibration, the plan's path) when they depart too, so two recipes never share a
    results file."""
    bits = f"e{cfg.expert_bits:g}l{cfg.linear_bits:g}" if kind == "moe" else f"w{cfg.linear_bits:g}"
    parts = [f"{bits}g{cfg.group}c{cfg.clip_steps}"]
    if cfg.method != "clip":
        parts.append(cfg.method + ("-ao" if cfg.act_order and cfg.method == "gptq" else ""))
    if cfg.grid != "sym":
        parts.append(cfg.grid)
    parts += [kv.replace("=", "").replace(".", "p") for kv in sorted(filter(None, cfg.role_bits.split(",")))]
    if cfg.bits_plan:
        parts.append("plan-" + Path(cfg.bits_plan).stem)
    hidden = ("clip_lo", "mtp_bits", "calib", "calib_tokens", "calib_ctx", "bits_plan")
    seed = SmokeConfig()
    if any(getattr(cfg, k) != getattr(seed, k) for k in hidden):
        knobs = json.dumps({k: getattr(cfg, k) for k in hidden}, sort_keys=True)
        parts.append(hashlib.sha256(knobs.encode()).hexdigest()[:6])
    return "-".join(parts)


def tags_for(plan: Plan, cfg: SmokeConfig) -> dict:
    prefix = "smoke" if cfg.kind == "dense" else "smoke_moe"
    base = f"{prefix}_{plan.slug}"
    return {"teacher": f"{base}_bf16", "quant": f"{base}_{recipe_slug(cfg, cfg.kind)}", "summary": base}
