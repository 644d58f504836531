"""Evaluate one model on the benchmarks of bench8_loaders, resumably, and write results/vllm_eval/<tag>.json.

One runner for every backend (vllm / hf / openai / replay): the prompts, extraction and grading are the
same code whatever generated the text. Each finished sample is appended (and flushed) to <tag>.jsonl as
soon as it is graded, so a killed run resumes without regenerating it; a JSONL line is reused only when
it is complete and its prompt hash and generation config hash match this run (a changed config is
refused with a message, or moved aside with --restart). The summary math lives in results_schema.py.

    python -m vllm_eval8 --model PATH --tag qwen-bf16 --benchmarks mmlu_pro,gpqa --n 40 --n gpqa=198
    python -m vllm_eval8 compare results/vllm_eval/A.json results/vllm_eval/B.json

Every option also reads an environment variable EVAL_<OPTION> (e.g. EVAL_TEMPERATURE); the command line
wins over the environment, which wins over the built-in defaults (kept equal to configs/eval.env).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import eval_backends
import official_scores
import provenance
import results_schema

# Budget = how long a model may think. max_model_len leaves 8k tokens of prompt room; fewer concurrent
# sequences at the longer budget keep the KV cache from thrashing.
BUDGETS = {
    "32k": {"max_new_tokens": 32768, "max_model_len": 40960, "max_num_seqs": 256},
    "64k": {"max_new_tokens": 65536, "max_model_len": 73728, "max_num_seqs": 128},
}
ROLES = ("teacher", "quant", "baseline")


class ResumeMismatch(RuntimeError):
    """The results JSONL on disk was produced under a different config or prompt; reusing it would lie."""


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
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.90
    dtype: str = "auto"
    enforce_eager: bool | None = None  # None = automatic (on for gemma*)
    hf_batch_size: int = 8
    base_url: str = "http://127.0.0.1:8000/v1"
    served_model_name: str | None = None  # openai: the name the server knows the model by (default: model)
    model_path: str | None = None  # openai: the checkpoint/GGUF the server runs, for the fingerprint
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
    progress: bool = True

    def __post_init__(self):
        if not self.tag or any(c in self.tag for c in "/\\ ") or self.tag.startswith("."):
            raise ValueError(f"tag {self.tag!r} must be a plain file stem (no slashes/spaces), e.g. qwen35-bf16")
        if self.backend not in eval_backends.BACKENDS:
            raise ValueError(f"backend {self.backend!r} unknown; choose one of {eval_backends.BACKENDS}")
        if self.budget not in BUDGETS:
            raise ValueError(f"budget {self.budget!r} unknown; choose one of {sorted(BUDGETS)}")
        if self.role is not None and self.role not in ROLES:
            raise ValueError(f"role {self.role!r} unknown; choose one of {ROLES} (or leave it unset)")
        if not self.benchmarks:
            raise ValueError("no benchmarks given; pass e.g. --benchmarks mmlu_pro,gpqa")
        if not 0.0 <= self.temperature <= 5.0 or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"sampling out of range: temperature={self.temperature} top_p={self.top_p}")

    def resolved_max_new_tokens(self) -> int:
        return int(self.max_new_tokens or BUDGETS[self.budget]["max_new_tokens"])

    def resolved_max_model_len(self) -> int:
        return int(self.max_model_len or BUDGETS[self.budget]["max_model_len"])

    def resolved_max_num_seqs(self) -> int:
        return int(self.max_num_seqs or BUDGETS[self.budget]["max_num_seqs"])

    def n_for(self, bench: str) -> int | None:
        return self.n.get(bench, self.n_default)

    def results_paths(self) -> tuple[Path, Path]:
        base = Path(self.results_dir)
        return base / f"{self.tag}.json", base / f"{self.tag}.jsonl"


# ------------------------------------------------------------------------------------- identities
def model_fingerprint(path: str | None) -> dict | None:
    """Cheap identity of a local checkpoint (config + weight file names/sizes) or GGUF (size + head hash).

    Hashing 200+ GB of weights per eval is not affordable; config and shard sizes catch the usual mix-up
    (wrong directory, half-copied shards). None for a hub id or a server-side name.
    """
    if not path:
        return None
    p = Path(path)
    if p.is_file():
        return {"kind": "file", "size": p.stat().st_size,
                "sha256_first_64MiB": provenance.sha256_file(p, limit_bytes=64 << 20)}
    if p.is_dir():
        config = p / "config.json"
        weights = sorted((f.name, f.stat().st_size) for f in p.iterdir()
                         if f.suffix in (".safetensors", ".gguf", ".bin") and f.is_file())
        return {"kind": "dir", "config_sha256": provenance.sha256_file(config) if config.is_file() else None,
                "weights_sha256": provenance.sha256_json(weights), "n_weight_files": len(weights)}
    return None


def backend_identity(cfg: EvalConfig) -> dict:
    """The part of the backend that changes generations, computable without loading the model."""
    if cfg.backend == "vllm":
        eager = eval_backends.default_enforce_eager(cfg.model) if cfg.enforce_eager is None else cfg.enforce_eager
        return {"backend": "vllm", "dtype": cfg.dtype, "enforce_eager": eager,
                "max_model_len": cfg.resolved_max_model_len(), "tensor_parallel_size": cfg.tensor_parallel_size}
    if cfg.backend == "hf":
        return {"backend": "hf", "dtype": cfg.dtype}
    if cfg.backend == "openai":
        return {"backend": "openai", "served_model_name": cfg.served_model_name or cfg.model}
    if not cfg.replay_file or not Path(cfg.replay_file).is_file():
        raise FileNotFoundError(f"--backend replay needs an existing --replay-file, got {cfg.replay_file!r}")
    return {"backend": "replay", "replay_sha256": provenance.sha256_file(Path(cfg.replay_file))}


def generation_config(cfg: EvalConfig) -> dict:
    """Everything that changes what is generated; its hash guards resume."""
    return {"model": cfg.model, "model_fingerprint": model_fingerprint(cfg.model_path or cfg.model),
            **backend_identity(cfg), "thinking": cfg.thinking, "temperature": cfg.temperature,
            "top_p": cfg.top_p, "top_k": cfg.top_k, "seed": cfg.seed,
            "max_new_tokens": cfg.resolved_max_new_tokens(), "budget": cfg.budget}


# ------------------------------------------------------------------------------------------ samples
def load_all_samples(cfg: EvalConfig) -> tuple[list, dict]:
    """Samples of every benchmark in order, plus per-benchmark dataset provenance."""
    import bench8_loaders

    unknown = [b for b in cfg.benchmarks if b not in bench8_loaders.BENCHMARKS]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; known: {sorted(bench8_loaders.BENCHMARKS)}")
    samples, datasets = [], {}
    for bench in cfg.benchmarks:
        options = dict(cfg.bench_options.get(bench, {}))
        data_file = cfg.data_files.get(bench)
        got = bench8_loaders.load_samples(bench, n=cfg.n_for(bench), data_file=data_file, seed=cfg.data_seed,
                                          **options)
        if not got:
            raise ValueError(f"{bench}: no samples loaded (data_file={data_file!r}, n={cfg.n_for(bench)})")
        spec = bench8_loaders.BENCHMARKS[bench]
        datasets[bench] = {"dataset": spec.dataset, "config": spec.config, "split": spec.split,
                           "revision": spec.dataset_revision, "n_requested": cfg.n_for(bench),
                           "default_n": spec.default_n, "n": len(got), "data_seed": cfg.data_seed,
                           "ids_sha256": results_schema.ids_hash(s.id for s in got),
                           "source": bench8_loaders.source_info(bench, data_file, **options)}
        samples.extend(got)
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        raise ValueError("sample ids collide across benchmarks; bench8_loaders ids must carry their bench prefix")
    return samples, datasets


# ------------------------------------------------------------------------------------- JSONL (resume)
def _header(gen_cfg: dict, cfg_hash: str) -> dict:
    return {"header": {"schema": results_schema.SCHEMA_VERSION, "config_hash": cfg_hash, "generation": gen_cfg}}


def _config_diff(old: Mapping, new: Mapping) -> str:
    keys = sorted(set(old) | set(new))
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)) or "(unknown)"


def read_resumable(path: Path, samples_by_id: Mapping, gen_cfg: dict, cfg_hash: str) -> tuple[dict, list, int]:
    """(trusted records by id, records of samples not in this run, torn lines skipped).

    Raises ResumeMismatch when the file was written under another generation config, or a sample's
    prompt changed: mixing those with new generations would make the result describe no single setup.
    """
    trusted, others, torn = {}, [], 0
    if not path.exists():
        return trusted, others, torn
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                torn += 1
                continue
            if isinstance(rec, dict) and "header" in rec:
                old = rec["header"].get("generation", {})
                if rec["header"].get("config_hash") != cfg_hash:
                    raise ResumeMismatch(f"{path} was generated with a different config ({_config_diff(old, gen_cfg)})")
                continue
            if not results_schema.is_complete_record(rec):
                torn += 1
                continue
            if rec["config_hash"] != cfg_hash:
                raise ResumeMismatch(f"{path}: sample {rec['id']!r} was generated with config {rec['config_hash']}, "
                                     f"this run is {cfg_hash}")
            sample = samples_by_id.get(rec["id"])
            if sample is None:
                others.append(rec)
            elif rec["prompt_hash"] != results_schema.prompt_hash(sample.messages):
                raise ResumeMismatch(f"{path}: the prompt of {rec['id']!r} changed since it was generated "
                                     "(new dataset revision or prompt builder)")
            else:
                trusted[rec["id"]] = rec
    return trusted, others, torn


def write_jsonl_atomic(path: Path, header: dict, records: Sequence[Mapping]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in (header, *records):
            f.write(json.dumps(rec, ensure_ascii=False, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------- grading
class Grader:
    """Grades finished samples off the engine's critical path: a persistent pool of spawned processes
    (each grades in its main thread, so math-verify's SIGALRM timeouts work), or inline when workers=0."""

    def __init__(self, workers: int, probes: Sequence = ()):
        import bench8_loaders

        self.grade_output = bench8_loaders.grade_output
        self.pool = None
        probes = [s for s in probes if not s.meta.get("judge")]  # never call a remote judge to warm up
        if workers > 0:
            import multiprocessing

            self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
            for _ in range(workers):  # start the workers and load the graders' imports while generation runs
                self.pool.submit(warm_up, probes)
        elif probes:
            threading.Thread(target=warm_up, args=(probes,), daemon=True).start()
        self.pending: dict = {}  # future -> (sample, generation)
        self.ready: list = []  # (sample, generation, graded) not yet taken
        self.grade_s = 0.0  # time this process spent grading or waiting for grades

    def submit(self, sample, generation) -> None:
        if self.pool is not None:
            try:
                self.pending[self.pool.submit(self.grade_output, sample, generation["output"])] = (sample, generation)
                return
            except (BrokenProcessPool, RuntimeError):
                self._fall_back_inline()
        t0 = time.perf_counter()
        self.ready.append((sample, generation, self.grade_output(sample, generation["output"])))
        self.grade_s += time.perf_counter() - t0

    def _fall_back_inline(self) -> None:
        print("vllm_eval8: grading pool broke; grading the rest in this process", file=sys.stderr)
        pending, self.pending = self.pending, {}
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.pool = None
        for future, (sample, generation) in pending.items():
            graded = None
            if future.done() and not future.cancelled() and future.exception() is None:
                graded = future.result()
            self.ready.append((sample, generation, graded or self.grade_output(sample, generation["output"])))

    def take(self, wait: bool = False) -> list:
        """Graded triples available now (all of them, when wait)."""
        if self.pending:
            t0 = time.perf_counter()
            try:
                for future in [f for f in self.pending if wait or f.done()]:
                    sample, generation = self.pending.pop(future)
                    self.ready.append((sample, generation, future.result()))
            except BrokenProcessPool:
                self._fall_back_inline()
            self.grade_s += time.perf_counter() - t0
        out, self.ready = self.ready, []
        return out

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None


WARM_UP_OUTPUT = "The answer is (A).\nAnswer: A\n\\boxed{1}"


def warm_up(probes: Sequence) -> None:
    """Grade a throw-away answer once per benchmark so lazy imports (math-verify, sympy) happen off the
    critical path; the verdicts are discarded."""
    import bench8_loaders

    for sample in probes:
        bench8_loaders.grade_output(sample, WARM_UP_OUTPUT)


def default_grade_workers() -> int:
    return min(8, os.cpu_count() or 1)


# -------------------------------------------------------------------------------------------- run
def run_eval(cfg: EvalConfig, backend: eval_backends.Backend | None = None, argv: Sequence[str] | None = None) -> dict:
    """Run (or resume) one evaluation and write <results_dir>/<tag>.json + .jsonl; returns the JSON dict.

    `backend` may be passed in (tests, or to reuse a loaded engine across tags); it is then not closed
    here. Otherwise the backend named by cfg is built only if some sample still needs generating.
    """
    if backend is not None and backend.name != cfg.backend:
        raise ValueError(f"run_eval got a {backend.name!r} backend but cfg.backend is {cfg.backend!r}; "
                         "the config hash must describe the backend that generates")
    t_start, start_utc = time.perf_counter(), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    json_path, jsonl_path = cfg.results_paths()
    json_path.parent.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    samples, datasets = load_all_samples(cfg)
    load_s = time.perf_counter() - t0
    by_id = {s.id: s for s in samples}
    gen_cfg = generation_config(cfg)
    cfg_hash = results_schema.config_hash(gen_cfg)
    header = _header(gen_cfg, cfg_hash)

    try:
        trusted, others, torn = read_resumable(jsonl_path, by_id, gen_cfg, cfg_hash)
    except ResumeMismatch as err:
        if not cfg.restart:
            raise ResumeMismatch(f"{err}. Refusing to mix generations: use a new --tag, or pass --restart to move "
                                 f"{jsonl_path.name} aside and start fresh") from None
        stale = jsonl_path.with_name(f"{jsonl_path.name}.stale-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
        os.replace(jsonl_path, stale)
        print(f"vllm_eval8: {err}; moved it to {stale.name}, starting fresh", file=sys.stderr)
        trusted, others, torn = {}, [], 0
    if trusted or torn:
        print(f"vllm_eval8: resuming {cfg.tag}: {len(trusted)} finished samples reused"
              + (f", {torn} incomplete line(s) dropped" if torn else ""), file=sys.stderr)
    # Rewrite before appending: drops a torn last line so the next append starts on a fresh line.
    write_jsonl_atomic(jsonl_path, header, [*trusted.values(), *others])

    todo = [s for s in samples if s.id not in trusted]
    own_backend = backend is None
    backend_init_s = gen_s = prep_s = write_s = 0.0
    records = dict(trusted)
    grader = stream = None
    if todo:
        t0 = time.perf_counter()
        if own_backend:
            backend = eval_backends.make_backend(cfg)
        backend_init_s = time.perf_counter() - t0
        workers = default_grade_workers() if cfg.grade_workers is None else int(cfg.grade_workers)
        probes = list({s.bench: s for s in reversed(todo)}.values())
        grader = Grader(min(workers, len(todo)), probes)
        bar = None
        if cfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=len(samples), initial=len(trusted), desc=f"eval {cfg.tag}", unit="sample")
        try:
            with open(jsonl_path, "a", encoding="utf-8") as log:

                def write(triples):
                    nonlocal write_s
                    t_w = time.perf_counter()
                    for sample, generation, graded in triples:
                        rec = results_schema.sample_record(sample, generation, graded, cfg_hash)
                        rec["grade_detail"] = graded.detail
                        log.write(json.dumps(rec, ensure_ascii=False, default=str) + "\n")
                        records[sample.id] = rec
                    log.flush()
                    write_s += time.perf_counter() - t_w
                    if bar is not None:
                        bar.update(len(triples))

                stream = iter(backend.stream(todo))
                try:
                    while True:
                        t_g = time.perf_counter()
                        try:
                            index, generation = next(stream)
                        except StopIteration:
                            gen_s += time.perf_counter() - t_g
                            break
                        gen_s += time.perf_counter() - t_g
                        grader.submit(todo[index], generation)
                        ready = grader.take()
                        if ready:
                            write(ready)
                except BaseException:
                    # Interrupted (Ctrl-C, backend error): keep every generation that already came back.
                    try:
                        write(grader.take(wait=True))
                    except Exception as err:  # do not mask the original error
                        print(f"vllm_eval8: could not log the last graded samples: {err}", file=sys.stderr)
                    raise
                write(grader.take(wait=True))
        finally:
            if hasattr(stream, "close"):
                stream.close()  # run the backend's clean-up now (abort queued requests), not at GC
            if grader is not None:
                grader.close()
            if bar is not None:
                bar.close()
            prep_s = backend.prep_seconds() if backend is not None else 0.0
            if own_backend and backend is not None:
                backend.close()

    ordered = [records[s.id] for s in samples]
    write_jsonl_atomic(jsonl_path, header, [*ordered, *others])
    benchmarks = {}
    for bench in cfg.benchmarks:
        block = results_schema.summarize_bench([r for r in ordered if r["bench"] == bench])
        block["dataset"] = datasets[bench]
        benchmarks[bench] = block
    doc = {
        "schema": results_schema.SCHEMA_VERSION,
        "tag": cfg.tag,
        "role": cfg.role,
        "reference_tag": cfg.reference_tag,
        "official_model": cfg.official_model,
        "model": cfg.model,
        "model_path": cfg.model_path,
        "backend": cfg.backend,
        "generation": gen_cfg,
        "config_hash": cfg_hash,
        "samples_file": jsonl_path.name,
        "benchmarks": benchmarks,
    }
    doc["gate"] = official_scores.gate_for_result(doc)
    end_utc = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    gen_only = max(gen_s - prep_s, 0.0)
    wall = time.perf_counter() - t_start
    harness = wall - backend_init_s - gen_only
    doc["resumed"] = {"reused": len(trusted), "generated": len(todo), "torn_lines_dropped": torn}
    doc["timing"] = {"start_utc": start_utc, "end_utc": end_utc, "wall_s": wall, "load_samples_s": load_s,
                     "backend_init_s": backend_init_s, "generate_s": gen_only, "prompt_render_s": prep_s,
                     "grade_wait_s": grader.grade_s if grader else 0.0, "write_s": write_s,
                     "harness_s": harness,
                     "harness_overhead_pct": 100.0 * harness / gen_only if gen_only > 0 else None}
    doc["provenance"] = provenance.record(
        argv=argv, config_hash=cfg_hash, eval_config=_config_for_record(cfg),
        backend_info=backend.identity() if backend is not None else None,
        datasets={b: {k: v for k, v in d.items() if k != "source"} for b, d in datasets.items()},
        start_utc=start_utc, end_utc=end_utc)
    text = provenance.redact(json.dumps(doc, indent=1, ensure_ascii=False, default=str, allow_nan=False))
    tmp = json_path.with_name(json_path.name + ".tmp")
    tmp.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp, json_path)
    return json.loads(text)


def _config_for_record(cfg: EvalConfig) -> dict:
    rec = dataclasses.asdict(cfg)
    rec["benchmarks"] = list(cfg.benchmarks)
    return rec


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
    ("--tensor-parallel-size", "tensor_parallel_size", int, "vllm tensor parallel size"),
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm_eval8", description=__doc__,
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
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


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
    values["progress"] = not args.no_progress
    missing = [k for k in ("model", "tag") if not values.get(k)]
    if missing:
        raise ValueError(f"missing {', '.join('--' + m for m in missing)} (or EVAL_{missing[0].upper()})")
    return EvalConfig(**values)


def format_summary(doc: Mapping) -> str:
    lines = [f"{doc['tag']}  ({doc['backend']}, {doc['model']})",
             f"{'benchmark':<10} {'n':>5} {'acc':>7} {'95% CI':>17} {'acc_fin':>8} {'trunc':>6} {'no_ans':>7} "
             f"{'tok_med':>8} {'gate':>18}"]
    for bench, b in doc["benchmarks"].items():
        ci = "[%.1f, %.1f]" % tuple(b["ci95"]) if b["ci95"] else "-"
        fin = "-" if b["acc_finished"] is None else f"{b['acc_finished']:.1f}"
        lines.append(f"{bench:<10} {b['n']:>5} {b['acc']:>7.1f} {ci:>17} {fin:>8} {b['trunc']:>6.1f} "
                     f"{b['no_answer']:>7.1f} {b['tokens_median']:>8.0f} {doc['gate'][bench]['status']:>18}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "compare":
        import compare

        return compare.main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        doc = run_eval(cfg, argv=[sys.argv[0], *argv])
    except (ValueError, FileNotFoundError, ResumeMismatch) as err:
        print(f"vllm_eval8: {provenance.redact(str(err))}", file=sys.stderr)
        return 2
    print(format_summary(doc))
    print(f"wrote {cfg.results_paths()[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
