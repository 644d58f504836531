"""What one eval run depends on: the EvalConfig dataclass, the one source (tool_config) of its command-line
flags, EVAL_* environment names, configs/eval.env keys, --help text and defaults. The identity of what
generates (the config hash) is eval_identity.py.

Precedence, lowest first: default < recipe (configs/eval.env through pipelines/eval.sh) < EVAL_<OPTION> <
--option. An unknown EVAL_* key is an error that names it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import backend_registry
import tool_config
from tool_config import option

# Budget = how long a model may think. max_model_len leaves 8k tokens of prompt room; fewer concurrent
# sequences at the longer budget keep the KV cache from thrashing.
BUDGETS = {
    "32k": {"max_new_tokens": 32768, "max_model_len": 40960, "max_num_seqs": 256},
    "64k": {"max_new_tokens": 65536, "max_model_len": 73728, "max_num_seqs": 128},
}
ROLES = ("teacher", "quant", "baseline")
SEED_MODES = ("engine", "request")
# vllm.LLM arguments the runner sets from its own flags; --engine-arg may not override them
RESERVED_ENGINE_ARGS = frozenset({"model", "tensor_parallel_size", "max_model_len", "gpu_memory_utilization",
                                  "max_num_seqs", "dtype", "seed", "enforce_eager"})
COMPANION_ENV = ("EVAL_GGUF", "EVAL_MMPROJ")  # llamacpp_eval8's own EVAL_ names


# ------------------------------------------------------------------------------ structured values
def _opt_int(value: str) -> int | None:
    return None if str(value).strip().lower() in ("", "none", "default") else int(value)


def _opt_bool(value: str) -> bool | None:
    v = str(value).strip().lower()
    return None if v in ("", "auto", "none") else tool_config.parse_bool(v, "on|off|auto")


def _words(text) -> tuple:
    """'a,b' -> ('a', 'b'), each once, in order."""
    return tuple(dict.fromkeys(b.strip() for b in str(text).split(",") if b.strip()))


def _bench_map(items: Sequence[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"{item!r} must look like BENCH=VALUE")
        bench, value = item.split("=", 1)
        out[bench.strip()] = value.strip()
    return out


def _parse_n(items: Sequence[str]) -> dict:
    """'40' (every benchmark) and 'gpqa=198' (one) -> {bench: n}, the default under '*'."""
    out = {}
    for item in items:
        for part in str(item).split(","):
            part = part.strip()
            if part:
                bench, sep, value = part.rpartition("=")
                out[bench.strip() if sep else "*"] = int(value)
    return out


def _parse_options(items: Sequence[str]) -> dict:
    """BENCH.KEY=VALUE; VALUE is JSON if it parses, a comma list becomes a tuple, else a string."""
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        bench, dot, name = key.partition(".")
        if not sep or not dot:
            raise ValueError(f"{item!r} must look like BENCH.KEY=VALUE, e.g. mmmlu.locales=FR_FR,ZH_CN")
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = tuple(v.strip() for v in value.split(",")) if "," in value else value
        out.setdefault(bench, {})[name] = parsed
    return out


def parse_engine_args(items: Sequence[str]) -> dict:
    """KEY=VALUE -> {key: JSON value, or the string}; keys in vllm's snake_case."""
    out = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier():
            raise ValueError(f"--engine-arg {item!r} must look like KEY=VALUE, e.g. enable_expert_parallel=true")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value.strip()
    return out


def visible_gpu_count() -> int:
    """GPUs this process sees (CUDA_VISIBLE_DEVICES honoured); 0 without CUDA. Looked up at call time, so a
    test can stub it (monkeypatch eval_config.visible_gpu_count)."""
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        return 0


# ----------------------------------------------------------------------------------------- config
OPENAI = "openai backend: "


@dataclass(frozen=True)
class EvalConfig:
    """Everything one eval run depends on. Defaults equal configs/eval.env (a test keeps them in sync)."""
    model: str = option("", "checkpoint dir / hub id (vllm, hf) or served model name (openai)")
    tag: str = option("", "result name: <results-dir>/<tag>.json and .jsonl")
    benchmarks: tuple = option(("mmlu_pro", "gpqa", "mmmlu", "lcb", "hle"), "comma list of bench8_loaders "
                               "benchmarks (default: the five gated axes)", parse=_words)
    backend: str = option("vllm", f"one of {backend_registry.BACKENDS} (eval.sh: also llamacpp)")
    budget: str = option("32k", f"one of {sorted(BUDGETS)}: max new tokens / max model len / max seqs")
    n: Mapping = option(None, "samples: '40' for every benchmark, 'mmlu_pro=150' for one; repeatable",
                        parse=_parse_n, repeat=True, factory=dict)
    n_default: int | None = option(None, "the n of every benchmark --n does not name", internal=True)
    data_files: Mapping = option(None, "offline data file in the dataset's schema, BENCH=PATH; repeatable",
                                 parse=_bench_map, repeat=True, flag="--data-file", factory=dict)
    bench_options: Mapping = option(None, "load_samples option BENCH.KEY=VALUE, e.g. mmmlu.locales=FR_FR,ZH_CN; "
                                    "repeatable (env: ';'-separated)", parse=_parse_options, repeat=True, sep=";",
                                    flag="--option", legacy=("EVAL_OPTIONS",), factory=dict)
    data_seed: int = option(0, "seed of the subset / option permutation")
    thinking: bool = option(True, "enable_thinking passed to the chat template")
    temperature: float = option(0.6, "sampling temperature (0 = greedy)")
    top_p: float = option(0.95, "nucleus sampling p")
    top_k: int = option(20, "top-k sampling")
    seed: int = option(0, "sampling seed (per-sample seeds derive from it)")
    max_new_tokens: int | None = option(None, "override the budget's max new tokens", parse=_opt_int)
    max_model_len: int | None = option(None, "override the budget's max model length (vllm)", parse=_opt_int)
    max_num_seqs: int | None = option(None, "override the budget's concurrent sequences (vllm)", parse=_opt_int)
    tensor_parallel_size: int | None = option(None, "vllm tensor parallel size (default: every visible GPU)",
                                              parse=_opt_int)
    engine_args: Mapping = option(None, "vllm: extra vllm.LLM argument KEY=VALUE (VALUE parsed as JSON when it "
                                  "parses, e.g. enable_expert_parallel=true, kv_cache_dtype=fp8); repeatable; hashed "
                                  "into the run identity (env: ';'-separated)", parse=parse_engine_args, repeat=True,
                                  sep=";", flag="--engine-arg", factory=dict)
    seed_mode: str = option("engine", "vllm: engine (one engine-level seed: batched sampler; a full rerun "
                            "reproduces) or request (a seed per sample: batch-independent, but vLLM samples request "
                            "by request)", choices=SEED_MODES)
    gpu_memory_utilization: float = option(0.90, "vllm GPU memory fraction")
    dtype: str = option("auto", "model dtype (auto, bfloat16, float32)")
    enforce_eager: bool | None = option(None, "on|off|auto (auto: on for gemma models)", parse=_opt_bool)
    hf_batch_size: int = option(8, "hf backend batch size")
    base_url: str = option("http://127.0.0.1:8000/v1", OPENAI + "server base URL")
    served_model_name: str | None = option(None, OPENAI + "model name the server expects (default: model)", kind=str)
    model_path: str | None = option(None, OPENAI + "checkpoint/GGUF the server runs (fingerprint)", kind=str)
    mmproj_path: str | None = option(None, "llamacpp: the vision projector GGUF, for the fingerprint", kind=str)
    api_key_env: str = option("OPENAI_API_KEY", OPENAI + "NAME of the env var holding the key (never stored)")
    concurrency: int = option(16, OPENAI + "concurrent requests")
    request_timeout_s: float = option(3600.0, OPENAI + "per-request timeout")
    max_retries: int = option(5, OPENAI + "retries with exponential backoff")
    replay_file: str | None = option(None, "replay backend: JSONL of {id, output, finish_reason}", kind=str)
    results_dir: str = option("results/vllm_eval", "where <tag>.json/.jsonl go", path=True)
    role: str | None = option(None, f"one of {ROLES}, for RESULTS.md", kind=str)
    reference_tag: str | None = option(None, "teacher tag this run is compared with in RESULTS.md", kind=str)
    official_model: str | None = option(None, "gate-table model key (default: inferred from --model)", kind=str)
    restart: bool = option(False, "move a JSONL made under another config aside instead of refusing")
    grade_workers: int | None = option(None, "grading processes (0 = inline; default: cores, max 8)", parse=_opt_int)
    allow_weak_sandbox: bool = option(False, "code benchmarks: run even when the sandbox lacks full isolation "
                                             "(the tier is recorded in the results)")
    progress: bool = option(True, "progress bar")

    def __post_init__(self):
        if "*" in self.n:  # `--n 40`: the default of every benchmark not named
            object.__setattr__(self, "n_default", self.n["*"])
            object.__setattr__(self, "n", {k: v for k, v in self.n.items() if k != "*"})
        if not self.model:
            raise ValueError("missing --model (or EVAL_MODEL)")
        if not self.tag or any(c in self.tag for c in "/\\ ") or self.tag.startswith("."):
            raise ValueError(f"tag {self.tag!r} must be a plain file stem (no slashes/spaces), e.g. qwen35-bf16")
        if self.backend == "llamacpp":
            raise ValueError("backend 'llamacpp' starts llama-server itself: run it through pipelines/eval.sh "
                             "--backend llamacpp or python -m llamacpp_eval8 (--gguf, --mmproj)")
        if self.backend not in backend_registry.BACKENDS:
            raise ValueError(f"backend {self.backend!r} unknown; choose one of {backend_registry.BACKENDS}")
        if self.budget not in BUDGETS:
            raise ValueError(f"budget {self.budget!r} unknown; choose one of {sorted(BUDGETS)}")
        if self.role is not None and self.role not in ROLES:
            raise ValueError(f"role {self.role!r} unknown; choose one of {ROLES} (or leave it unset)")
        if not self.benchmarks:
            raise ValueError("no benchmarks given; pass e.g. --benchmarks mmlu_pro,gpqa")
        if self.seed_mode not in SEED_MODES:
            raise ValueError(f"seed_mode {self.seed_mode!r} unknown; choose one of {SEED_MODES}")
        clash = sorted(set(self.engine_args) & RESERVED_ENGINE_ARGS)
        if clash:
            raise ValueError(f"--engine-arg {clash[0]}: has its own flag (--{clash[0].replace('_', '-')}); use that")
        if not 0.0 <= self.temperature <= 5.0 or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"sampling out of range: temperature={self.temperature} top_p={self.top_p}")

    def resolved_max_new_tokens(self) -> int:
        return int(self.max_new_tokens or BUDGETS[self.budget]["max_new_tokens"])

    def resolved_max_model_len(self) -> int:
        return int(self.max_model_len or BUDGETS[self.budget]["max_model_len"])

    def resolved_max_num_seqs(self) -> int:
        return int(self.max_num_seqs or BUDGETS[self.budget]["max_num_seqs"])

    def resolved_tensor_parallel_size(self) -> int:
        """The TP vLLM gets: the flag, else every GPU this process sees (min 1); recorded with the results."""
        return int(self.tensor_parallel_size or max(1, visible_gpu_count()))

    def n_for(self, bench: str) -> int | None:
        return self.n.get(bench, self.n_default)

    def results_paths(self) -> tuple[Path, Path]:
        base = Path(self.results_dir)
        return base / f"{self.tag}.json", base / f"{self.tag}.jsonl"


# -------------------------------------------------------------------------------------------- CLI
TOOL = tool_config.Tool("vllm_eval8", "EVAL_", EvalConfig)


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    parser = tool_config.build_parser(dataclasses.replace(TOOL, description=description or __doc__), extra=[
        (("--default-recipe",), {"default": None, "help": "the recipe when none is named (pipelines/eval.sh: "
                                 "configs/eval.env; EVAL_CONFIG, the old name of EVAL_RECIPE, still works)"}),
        (("--no-progress",), {"action": "store_true", "help": "no progress bar"}),
        (("--dry-run",), {"action": "store_true", "help": "print the resolved engine arguments, data, n per "
                          "benchmark and what the gate can decide at that n; exit"})])
    return parser


def config_from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> EvalConfig:
    """Flags > EVAL_* environment > recipe > EvalConfig defaults (tool_config's rule)."""
    env = dict(os.environ if environ is None else environ)
    if env.get("EVAL_CONFIG") and not env.get("EVAL_RECIPE"):
        print("vllm_eval8: EVAL_CONFIG is deprecated; use EVAL_RECIPE", file=sys.stderr)
        env["EVAL_RECIPE"] = env["EVAL_CONFIG"]
    env.pop("EVAL_CONFIG", None)
    if getattr(args, "no_progress", False):
        args = argparse.Namespace(**{**vars(args), "progress": "off"})
    try:
        return tool_config.resolve(TOOL, args, env, default_recipe=getattr(args, "default_recipe", None),
                                   known_env=COMPANION_ENV)
    except tool_config.ConfigError as e:
        raise ValueError(str(e)) from None


def config_for_record(cfg: EvalConfig) -> dict:
    rec = dataclasses.asdict(cfg)
    rec["benchmarks"] = list(cfg.benchmarks)
    if cfg.backend == "vllm":
        rec["tensor_parallel_size"] = cfg.resolved_tensor_parallel_size()
    return rec
