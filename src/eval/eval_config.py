"""What one eval run depends on: the EvalConfig dataclass, its command-line flags and EVAL_* environment
variables (one table, so they cannot drift), and the identity of what generates (the config hash).

Every option reads EVAL_<OPTION> (e.g. EVAL_TEMPERATURE); the command line wins over the environment,
which wins over the built-in defaults (kept equal to configs/eval.env by a test).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import eval_backends
import provenance

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


@dataclass(frozen=True)
class EvalConfig:
    """Everything one eval run depends on. Defaults equal configs/eval.env (a test keeps them in sync)."""
    model: str
    tag: str
    benchmarks: tuple = ("mmlu_pro", "gpqa", "mmmlu", "lcb", "hle")  # the five gated axes
    backend: str = "vllm"
    budget: str = "32k"
    n: Mapping = field(default_factory=dict)  # bench -> count; missing bench -> n_default
    n_default: int | None = None  # None = the benchmark's default_n (bench8_loaders)
    data_files: Mapping = field(default_factory=dict)  # bench -> local file (offline), may contain {part}
    bench_options: Mapping = field(default_factory=dict)  # bench -> {option: value} for load_samples
    data_seed: int = 0  # which subset / option permutation load_samples picks
    thinking: bool = True
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 20
    seed: int = 0
    max_new_tokens: int | None = None  # None = from budget
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    tensor_parallel_size: int | None = None  # vllm: None = every visible GPU (resolved_tensor_parallel_size)
    engine_args: Mapping = field(default_factory=dict)  # vllm: extra vllm.LLM(**kwargs), in the run identity
    seed_mode: str = "engine"  # vllm: engine = one engine seed (batched sampler); request = a seed per sample
    gpu_memory_utilization: float = 0.90
    dtype: str = "auto"
    enforce_eager: bool | None = None  # None = automatic (on for gemma*)
    hf_batch_size: int = 8
    base_url: str = "http://127.0.0.1:8000/v1"
    served_model_name: str | None = None  # openai: the name the server knows the model by (default: model)
    model_path: str | None = None  # openai: the checkpoint/GGUF the server runs, for the fingerprint
    mmproj_path: str | None = None  # openai via llamacpp_eval8: the vision projector GGUF, for the fingerprint
    api_key_env: str = "OPENAI_API_KEY"  # name of the env var holding the key; the key is never stored
    concurrency: int = 16
    request_timeout_s: float = 3600.0
    max_retries: int = 5
    replay_file: str | None = None
    results_dir: str = "results/vllm_eval"
    role: str | None = None  # teacher | quant | baseline, for RESULTS.md
    reference_tag: str | None = None  # the teacher tag a quant/baseline is compared against
    official_model: str | None = None  # gate-table key; None = inferred from the model name
    restart: bool = False  # move a mismatching JSONL aside instead of refusing
    grade_workers: int | None = None  # grading processes; 0 = inline in this process; None = cores (max 8)
    allow_weak_sandbox: bool = False  # code benchmarks: accept a sandbox tier without full isolation (recorded)
    progress: bool = True

    def __post_init__(self):
        if not self.tag or any(c in self.tag for c in "/\\ ") or self.tag.startswith("."):
            raise ValueError(f"tag {self.tag!r} must be a plain file stem (no slashes/spaces), e.g. qwen35-bf16")
        if self.backend == "llamacpp":
            raise ValueError("backend 'llamacpp' starts llama-server itself: run it through pipelines/eval.sh "
                             "--backend llamacpp or python -m llamacpp_eval8 (--gguf, --mmproj)")
        if self.backend not in eval_backends.BACKENDS:
            raise ValueError(f"backend {self.backend!r} unknown; choose one of {eval_backends.BACKENDS}")
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


# ------------------------------------------------------------------------------------- identities
SAMPLE_BLOCKS = 32  # content blocks read from each big weight file for its fingerprint
SAMPLE_BLOCK_BYTES = 256 << 10
FULL_HASH_BYTES = 64 << 20  # smaller files are hashed whole


def sampled_sha256(path: Path, blocks: int = SAMPLE_BLOCKS, block_bytes: int = SAMPLE_BLOCK_BYTES) -> str:
    """sha256 over the size and `blocks` evenly spaced blocks (head and tail included) of a file.

    Names and sizes alone cannot tell two checkpoints of one layout apart (a re-quantized or merged
    student has the teacher's shard sizes), and hashing every byte of a 245 GB model per eval is not
    affordable. A requantization or an adapter merge rewrites tensors all through a shard, so blocks
    spread over the file see it; reading 8 MiB per shard costs well under a second.
    """
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    if size <= FULL_HASH_BYTES:
        h.update(bytes.fromhex(provenance.sha256_file(path)))
        return h.hexdigest()
    span = size - block_bytes
    with open(path, "rb") as f:
        for i in range(blocks):
            f.seek(span * i // (blocks - 1))
            h.update(f.read(block_bytes))
    return h.hexdigest()


def model_fingerprint(path: str | None) -> dict | None:
    """Identity of a local checkpoint (config + sampled weight content) or GGUF (size + head hash).

    It guards resume: generations of one checkpoint are never reused for another one at the same path.
    None for a hub id or a server-side name.
    """
    if not path:
        return None
    p = Path(path)
    if p.is_file():
        return {"kind": "file", "size": p.stat().st_size,
                "sha256_first_64MiB": provenance.sha256_file(p, limit_bytes=64 << 20),
                "sampled_sha256": sampled_sha256(p)}
    if p.is_dir():
        config = p / "config.json"
        weights = sorted((f.name, f.stat().st_size, sampled_sha256(f)) for f in p.iterdir()
                         if f.suffix in (".safetensors", ".gguf", ".bin") and f.is_file())
        return {"kind": "dir", "config_sha256": provenance.sha256_file(config) if config.is_file() else None,
                "weights_sampled_sha256": provenance.sha256_json(weights), "n_weight_files": len(weights)}
    return None


def backend_identity(cfg: EvalConfig) -> dict:
    """The part of the backend that changes generations, computable without loading the model."""
    if cfg.backend == "vllm":
        eager = eval_backends.default_enforce_eager(cfg.model) if cfg.enforce_eager is None else cfg.enforce_eager
        ident = {"backend": "vllm", "dtype": cfg.dtype, "enforce_eager": eager,
                 "max_model_len": cfg.resolved_max_model_len(), "tensor_parallel_size": cfg.resolved_tensor_parallel_size(),
                 "seed_mode": cfg.seed_mode}
        if cfg.engine_args:  # only when set, so runs without them keep their config hash
            ident["engine_args"] = dict(sorted(cfg.engine_args.items()))
        return ident
    if cfg.backend == "hf":
        # a set --max-model-len caps the hf context too (image prompts past it are input errors)
        return {"backend": "hf", "dtype": cfg.dtype, **({"max_model_len": cfg.max_model_len} if cfg.max_model_len else {})}
    if cfg.backend == "openai":
        ident = {"backend": "openai", "served_model_name": cfg.served_model_name or cfg.model}
        if cfg.mmproj_path:  # only when set, so text-only config hashes stay what they were
            ident["mmproj_fingerprint"] = model_fingerprint(cfg.mmproj_path)
        return ident
    if not cfg.replay_file or not Path(cfg.replay_file).is_file():
        raise FileNotFoundError(f"--backend replay needs an existing --replay-file, got {cfg.replay_file!r}")
    return {"backend": "replay", "replay_sha256": provenance.sha256_file(Path(cfg.replay_file))}


def generation_config(cfg: EvalConfig) -> dict:
    """Everything that changes what is generated; its hash guards resume."""
    return {"model": cfg.model, "model_fingerprint": model_fingerprint(cfg.model_path or cfg.model),
            **backend_identity(cfg), "thinking": cfg.thinking, "temperature": cfg.temperature,
            "top_p": cfg.top_p, "top_k": cfg.top_k, "seed": cfg.seed,
            "max_new_tokens": cfg.resolved_max_new_tokens(), "budget": cfg.budget}


# -------------------------------------------------------------------------------------------- CLI
def _on_off(value: str) -> bool:
    v = str(value).strip().lower()
    if v in ("on", "true", "1", "yes"):
        return True
    if v in ("off", "false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected on|off, got {value!r}")


def _opt_int(value: str) -> int | None:
    return None if str(value).strip().lower() in ("", "none", "default") else int(value)


def _opt_bool(value: str) -> bool | None:
    return None if str(value).strip().lower() in ("", "auto", "none") else _on_off(value)


def _bench_map(items: Sequence[str], what: str) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"{what} {item!r} must look like BENCH=VALUE")
        bench, value = item.split("=", 1)
        out[bench.strip()] = value.strip()
    return out


def _parse_n(items: Sequence[str]) -> tuple[int | None, dict]:
    default, per = None, {}
    for item in items:
        for part in str(item).split(","):
            part = part.strip()
            if not part:
                continue
            if "=" in part:
                bench, value = part.split("=", 1)
                per[bench.strip()] = int(value)
            else:
                default = int(part)
    return default, per


def _parse_options(items: Sequence[str]) -> dict:
    """--option BENCH.KEY=VALUE; VALUE is JSON if it parses, a comma list becomes a tuple, else a string."""
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        bench, dot, name = key.partition(".")
        if not sep or not dot:
            raise ValueError(f"--option {item!r} must look like BENCH.KEY=VALUE, e.g. mmmlu.locales=FR_FR,ZH_CN")
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = tuple(v.strip() for v in value.split(",")) if "," in value else value
        out.setdefault(bench, {})[name] = parsed
    return out


# (flag, EvalConfig field, converter, help). Each reads EVAL_<FIELD upper> from the environment.
_SCALAR_OPTIONS = (
    ("--model", "model", str, "checkpoint dir / hub id (vllm, hf) or served model name (openai)"),
    ("--tag", "tag", str, "result name: <results-dir>/<tag>.json and .jsonl"),
    ("--backend", "backend", str, f"one of {eval_backends.BACKENDS}"),
    ("--budget", "budget", str, f"one of {sorted(BUDGETS)}: max new tokens / max model len / max seqs"),
    ("--thinking", "thinking", _on_off, "on|off: enable_thinking passed to the chat template"),
    ("--temperature", "temperature", float, "sampling temperature (0 = greedy)"),
    ("--top-p", "top_p", float, "nucleus sampling p"),
    ("--top-k", "top_k", int, "top-k sampling"),
    ("--seed", "seed", int, "sampling seed (per-sample seeds derive from it)"),
    ("--data-seed", "data_seed", int, "seed of the subset / option permutation"),
    ("--max-new-tokens", "max_new_tokens", _opt_int, "override the budget's max new tokens"),
    ("--max-model-len", "max_model_len", _opt_int, "override the budget's max model length (vllm)"),
    ("--max-num-seqs", "max_num_seqs", _opt_int, "override the budget's concurrent sequences (vllm)"),
    ("--tensor-parallel-size", "tensor_parallel_size", _opt_int, "vllm tensor parallel size (default: all GPUs)"),
    ("--seed-mode", "seed_mode", str, "vllm: engine (one engine-level seed: batched sampler; a full rerun "
     "reproduces) or request (a seed per sample: batch-independent, but vLLM samples request by request)"),
    ("--gpu-memory-utilization", "gpu_memory_utilization", float, "vllm GPU memory fraction"),
    ("--dtype", "dtype", str, "model dtype (auto, bfloat16, float32)"),
    ("--enforce-eager", "enforce_eager", _opt_bool, "on|off|auto (auto: on for gemma models)"),
    ("--hf-batch-size", "hf_batch_size", int, "hf backend batch size"),
    ("--base-url", "base_url", str, "openai backend: server base URL, e.g. http://127.0.0.1:8000/v1"),
    ("--served-model-name", "served_model_name", str, "openai backend: model name the server expects"),
    ("--model-path", "model_path", str, "openai backend: checkpoint/GGUF the server runs (fingerprint)"),
    ("--api-key-env", "api_key_env", str, "openai backend: NAME of the env var holding the API key"),
    ("--concurrency", "concurrency", int, "openai backend: concurrent requests"),
    ("--request-timeout-s", "request_timeout_s", float, "openai backend: per-request timeout"),
    ("--max-retries", "max_retries", int, "openai backend: retries with exponential backoff"),
    ("--replay-file", "replay_file", str, "replay backend: JSONL of {id, output, finish_reason}"),
    ("--results-dir", "results_dir", str, "where <tag>.json/.jsonl go"),
    ("--role", "role", str, f"one of {ROLES}, for RESULTS.md"),
    ("--reference-tag", "reference_tag", str, "teacher tag this run is compared with in RESULTS.md"),
    ("--official-model", "official_model", str, "gate-table model key (default: inferred from --model)"),
    ("--grade-workers", "grade_workers", _opt_int, "grading processes (0 = inline; default: cores, max 8)"),
)


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm_eval8", description=description or __doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, name, _conv, help_text in _SCALAR_OPTIONS:
        parser.add_argument(flag, dest=name, default=None, help=f"{help_text} [env EVAL_{name.upper()}]")
    parser.add_argument("--benchmarks", default=None, help="comma list of bench8_loaders benchmarks [env EVAL_BENCHMARKS]")
    parser.add_argument("--n", action="append", default=None,
                        help="samples: '40' for every benchmark, 'mmlu_pro=150' for one; repeatable [env EVAL_N]")
    parser.add_argument("--data-file", action="append", default=None, metavar="BENCH=PATH",
                        help="offline data file in the dataset's schema; repeatable [env EVAL_DATA_FILES]")
    parser.add_argument("--option", action="append", default=None, metavar="BENCH.KEY=VALUE",
                        help="load_samples option, e.g. mmmlu.locales=FR_FR,ZH_CN; repeatable [env EVAL_OPTIONS]")
    parser.add_argument("--restart", action="store_true", default=None,
                        help="move a JSONL made under another config aside instead of refusing")
    parser.add_argument("--allow-weak-sandbox", action="store_true", default=None,
                        help="code benchmarks: run even when the sandbox lacks full isolation (the tier is recorded "
                             "in the results) [env EVAL_ALLOW_WEAK_SANDBOX]")
    parser.add_argument("--engine-arg", action="append", default=None, metavar="KEY=VALUE",
                        help="vllm: extra vllm.LLM argument (VALUE parsed as JSON when it parses, e.g. "
                             "enable_expert_parallel=true, kv_cache_dtype=fp8); repeatable; hashed into the run "
                             "identity [env EVAL_ENGINE_ARGS, ';'-separated]")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved engine arguments, data, n per "
                                                              "benchmark and what the gate can decide at that n; exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def visible_gpu_count() -> int:
    """GPUs this process sees (CUDA_VISIBLE_DEVICES honoured), 0 without CUDA; tests stub it (monkeypatch)."""
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        return 0


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


def config_from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> EvalConfig:
    """Command line > EVAL_* environment > EvalConfig defaults."""
    env = os.environ if environ is None else environ
    values: dict = {}
    for _flag, name, conv, _help in _SCALAR_OPTIONS:
        raw = getattr(args, name)
        if raw is None and env.get(f"EVAL_{name.upper()}", "") != "":
            raw = env[f"EVAL_{name.upper()}"]
        if raw is not None:
            try:
                values[name] = conv(raw)
            except (ValueError, argparse.ArgumentTypeError) as err:
                raise ValueError(f"bad value {raw!r} for {name}: {err}") from None

    def listish(cli, env_key):
        if cli is not None:
            return list(cli)
        raw = env.get(env_key, "")
        return [x for x in raw.split(",") if x.strip()] if raw else []

    benches = args.benchmarks if args.benchmarks is not None else env.get("EVAL_BENCHMARKS", "")
    if benches:
        values["benchmarks"] = tuple(b.strip() for b in benches.split(",") if b.strip())
    n_default, n_per = _parse_n(listish(args.n, "EVAL_N"))
    values.update(n_default=n_default, n=n_per)
    values["data_files"] = _bench_map(listish(args.data_file, "EVAL_DATA_FILES"), "--data-file")
    opts = args.option if args.option is not None else [x for x in env.get("EVAL_OPTIONS", "").split(";") if x.strip()]
    values["bench_options"] = _parse_options(opts)
    values["restart"] = bool(args.restart) or env.get("EVAL_RESTART", "") in ("1", "on", "true")
    values["allow_weak_sandbox"] = (bool(getattr(args, "allow_weak_sandbox", None))
                                    or env.get("EVAL_ALLOW_WEAK_SANDBOX", "") in ("1", "on", "true"))
    values["progress"] = not args.no_progress
    engine = args.engine_arg if getattr(args, "engine_arg", None) is not None else [
        x for x in env.get("EVAL_ENGINE_ARGS", "").split(";") if x.strip()]
    values["engine_args"] = parse_engine_args(engine)
    missing = [k for k in ("model", "tag") if not values.get(k)]
    if missing:
        raise ValueError(f"missing {', '.join('--' + m for m in missing)} (or EVAL_{missing[0].upper()})")
    return EvalConfig(**values)


def config_for_record(cfg: EvalConfig) -> dict:
    rec = dataclasses.asdict(cfg)
    rec["benchmarks"] = list(cfg.benchmarks)
    if cfg.backend == "vllm":
        rec["tensor_parallel_size"] = cfg.resolved_tensor_parallel_size()
    return rec
