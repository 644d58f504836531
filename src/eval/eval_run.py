"""One eval run: load samples, resume from the JSONL, generate what is missing, grade in the pool while
the engine runs, append+fsync every graded sample at once, then summarize and write <tag>.json.

The same code for every backend (vllm / hf / openai / replay): prompts, extraction and grading do not
depend on what generated the text. The summary math lives in results_schema.py, the gate in
results_official.py.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
import json
import os
import sys
import threading
import time
from typing import Callable, Mapping, Sequence

import atomic_io
import bench_registry
import backend_base
import backend_registry
import eval_fingerprint
import mm_eval
import mm_images
import results_official
import provenance
import eval_resume
import results_schema
from eval_config import EvalConfig, config_for_record
from eval_identity import generation_config
from eval_grading import GradingPool, default_grade_fn, default_grade_workers
from eval_resume import ResumeMismatch


def load_all_samples(cfg: EvalConfig) -> tuple[list, dict]:
    """Samples of every benchmark in order, plus per-benchmark dataset provenance."""
    unknown = [b for b in cfg.benchmarks if b not in bench_registry.BENCHMARKS]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; known: {sorted(bench_registry.BENCHMARKS)}")
    samples, datasets = [], {}
    for bench in cfg.benchmarks:
        options = dict(cfg.bench_options.get(bench, {}))
        data_file = cfg.data_files.get(bench)
        got = bench_registry.load_samples(bench, n=cfg.n_for(bench), data_file=data_file, seed=cfg.data_seed,
                                          **options)
        if not got:
            raise ValueError(f"{bench}: no samples loaded (data_file={data_file!r}, n={cfg.n_for(bench)})")
        spec = bench_registry.BENCHMARKS[bench]
        source = bench_registry.source_info(bench, data_file, **options)
        if spec.needs_sandbox and cfg.allow_weak_sandbox:  # the grading workers read it from each sample
            got = [dataclasses.replace(s, meta={**s.meta, "allow_weak_sandbox": True}) for s in got]
        datasets[bench] = {"dataset": options.get("dataset", spec.dataset), "config": options.get("config", spec.config),
                           "split": options.get("split", spec.split),
                           # what load_dataset was asked for (an override included); None = a local data file
                           "revision": None if data_file else options.get("revision", spec.dataset_revision),
                           # part -> sha256 of each local file read (provenance keeps this, not the source block)
                           "data_file_sha256": ({str(x.get("part") or bench): x.get("sha256") for x in source["sources"]}
                                                if data_file else None),
                           "n_requested": cfg.n_for(bench),
                           "default_n": spec.default_n, "n": len(got), "data_seed": cfg.data_seed,
                           "ids_sha256": results_schema.ids_hash(s.id for s in got),
                           **({"images_sha256": results_schema.ids_hash(i.get("sha256") or "missing" for s in got
                                                                        for i in s.meta["images"]),
                               "n_images": sum(len(s.meta["images"]) for s in got)}
                              if any(mm_images.has_images(s) for s in got) else {}),
                           "source": source}
        samples.extend(got)
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        raise ValueError("sample ids collide across benchmarks; bench ids must carry their bench prefix")
    return samples, datasets


def _generation_of(rec: Mapping) -> dict:
    gen = {"output": rec["output"], "finish_reason": rec["finish_reason"], "tokens": rec["tokens"]}
    if rec.get("input_error") is not None:
        gen["input_error"] = rec["input_error"]
    if rec.get("reasoning") is not None:
        gen["reasoning"] = rec["reasoning"]
    return gen


def _graded_as(sample, generation: Mapping):
    """The sample as the graders must see it: one the engine refused at run time (prompt with its images
    over the context) carries that reason like an unreadable image does, so it is scored wrong with it
    (and never gets an official scorer's random-guess fallback), also when it is graded again."""
    reason = generation.get("input_error")
    if reason is None or (isinstance(sample.meta, dict) and sample.meta.get("input_error")):
        return mm_images.without_pixels(sample)
    return mm_images.without_pixels(dataclasses.replace(sample, meta={**sample.meta, "input_error": str(reason)}))


def _status(robust, official) -> str:
    statuses = {bench_registry.grade_status(robust), bench_registry.grade_status(official) if official else "ok"}
    for s in (results_schema.GRADER_ERROR, results_schema.JUDGE_ERROR):
        if s in statuses:
            return s
    return "ok"


def _verdict(rec: Mapping) -> tuple:
    return bool(rec.get("correct")), bool(rec.get("official_correct"))


def official_scorer_info(bench: str) -> dict:
    o = bench_registry.BENCHMARKS[bench].official
    return {"name": o.name, "source": o.source, "exact": o.exact}


def grading_environment(cfg: EvalConfig) -> dict:
    """What grades this run (math-verify version, sandbox tier and the mechanisms that bound a program's
    memory here, docs/BENCHMARKS.md), checked before any generation."""
    env = bench_registry.grading_environment(cfg.benchmarks, allow_weak_sandbox=cfg.allow_weak_sandbox)
    if "sandbox" in env:
        import sandbox
        import sandbox_memory

        iso, limits = sandbox.detect_isolation(allow_weak=cfg.allow_weak_sandbox), sandbox.SandboxLimits()
        env["sandbox_memory"] = sandbox_memory.mechanisms(iso.strong, iso.seccomp, limits.workdir_mb,
                                                          limits.file_size_mb, iso.cgroup_parent or None)
    return env


def check_results_dir(path) -> None:
    """Refuse an unwritable results dir in one line, before any sample or engine is loaded."""
    import tempfile
    from pathlib import Path

    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as err:
        raise ValueError(f"results dir {path} is not writable ({err.strerror or err}); "
                         "pass --results-dir to a writable directory") from None


@dataclass
class Resumed:
    """What a resumed JSONL gives this run: trusted records (truncation re-applied), the records of other
    benchmarks, torn lines dropped, and the stored verdicts to grade again (their old verdicts kept)."""
    trusted: dict
    others: list
    torn: int
    truncation_fixed: int
    regrade: list
    before: dict


@dataclass
class Progress:
    """The generate-and-grade phase's result: every record by id and where the time went."""
    records: dict
    backend: backend_base.Backend | None = None
    backend_init_s: float = 0.0
    gen_s: float = 0.0
    prep_s: float = 0.0
    grade_s: float = 0.0
    write_s: float = 0.0


def resume(cfg: EvalConfig, samples: list, jsonl_path, gen_cfg: dict, cfg_hash: str, fingerprint: str,
           regrade_all: bool) -> Resumed:
    """Read the JSONL back: keep what this identity made, re-apply the truncation rule, pick what to re-grade."""
    by_id = {s.id: s for s in samples}
    try:
        trusted, others, torn = eval_resume.read_resumable(jsonl_path, by_id, gen_cfg, cfg_hash)
    except ResumeMismatch as err:
        if not cfg.restart:
            raise ResumeMismatch(f"{err}. Refusing to mix generations: use a new --tag, or pass --restart to move "
                                 f"{jsonl_path.name} aside and start fresh") from None
        stale = jsonl_path.with_name(f"{jsonl_path.name}.stale-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
        os.replace(jsonl_path, stale)
        print(f"eval: {err}; moved it to {stale.name}, starting fresh", file=sys.stderr)
        trusted, others, torn = {}, [], 0
    rederived = {sid: eval_resume.reapply_truncation(rec) for sid, rec in trusted.items()}
    truncation_fixed = sum(rederived[sid]["correct"] != rec["correct"] for sid, rec in trusted.items())
    regrade = [s for s in samples
               if s.id in rederived and (regrade_all or eval_resume.needs_regrade(rederived[s.id], fingerprint))]
    missing = [s.id for s in samples if s.id not in rederived]
    if regrade_all and missing:
        raise ValueError(f"--regrade {cfg.tag}: {len(missing)} sample(s) have no stored generation in {jsonl_path} "
                         f"(first: {missing[0]}); finish the run before auditing it")
    if rederived or torn:
        print(f"vllm_eval8: resuming {cfg.tag}: {len(rederived)} finished samples reused"
              + (f", {len(regrade)} of them graded again" if regrade else "")
              + (f", truncation rule re-applied to {truncation_fixed}" if truncation_fixed else "")
              + (f", {torn} incomplete line(s) dropped" if torn else ""), file=sys.stderr)
    return Resumed(rederived, others, torn, truncation_fixed, regrade,
                   {s.id: _verdict(rederived[s.id]) for s in regrade})


def generate_and_grade(cfg: EvalConfig, samples: list, res: Resumed, jsonl_path, cfg_hash: str, fingerprint: str,
                       backend: backend_base.Backend | None, grade_fn: Callable) -> Progress:
    """Generate what is missing and grade it (and what needs re-grading) as it streams in; every graded
    sample is fsynced to the JSONL before the next, so a kill loses nothing graded."""
    todo = [s for s in samples if s.id not in res.trusted]
    unusable = [s for s in todo if s.meta.get("input_error")]  # unreadable image: scored with its reason
    todo = [s for s in todo if not s.meta.get("input_error")]
    out = Progress(dict(res.trusted), backend)
    if not (todo or res.regrade or unusable):
        return out
    own_backend, lock = backend is None, threading.Lock()
    pool = stream = bar = None
    log = eval_resume.SampleLog(jsonl_path)
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=len(samples), initial=len(res.trusted) - len(res.regrade), desc=f"eval {cfg.tag}",
                   unit="sample")

    def on_graded(sample, generation, robust, official):
        t_w = time.perf_counter()
        rec = results_schema.sample_record(sample, generation, robust, cfg_hash, official, _status(robust, official))
        rec["grader_fingerprint"] = fingerprint
        log.append([rec])  # fsynced before it returns: a kill after this line loses nothing graded
        with lock:
            out.records[sample.id] = rec
            out.write_s += time.perf_counter() - t_w
            if bar is not None:
                bar.update(1)

    try:
        workers = default_grade_workers() if cfg.grade_workers is None else int(cfg.grade_workers)
        probes = [mm_images.without_pixels(s) for s in {s.bench: s for s in reversed(todo or res.regrade or unusable)}.values()]
        pool = GradingPool(min(workers, len(todo) + len(res.regrade) + len(unusable)), on_graded, grade_fn, probes)
        for sample in res.regrade:
            pool.submit(_graded_as(sample, res.trusted[sample.id]), _generation_of(res.trusted[sample.id]))
        for sample in unusable:
            pool.submit(mm_images.without_pixels(sample), mm_eval.input_error_generation(sample.meta["input_error"]))
        if todo:
            t0 = time.perf_counter()
            if own_backend:
                out.backend = backend_registry.make_backend(cfg)
            out.backend_init_s = time.perf_counter() - t0
            stream = iter(out.backend.stream(todo))
            while True:
                t_g = time.perf_counter()
                try:
                    index, generation = next(stream)
                except StopIteration:
                    out.gen_s += time.perf_counter() - t_g
                    break
                out.gen_s += time.perf_counter() - t_g
                pool.submit(_graded_as(todo[index], generation), generation)
        pool.drain()
    except BaseException:
        # Interrupted (Ctrl-C, backend error): grades already arrived are on disk; finish the ones in flight.
        if pool is not None:
            try:
                pool.drain()
            except BaseException as err:  # do not mask the original error
                print(f"vllm_eval8: could not log the last graded samples: {err}", file=sys.stderr)
        raise
    finally:
        if hasattr(stream, "close"):
            stream.close()  # run the backend's clean-up now (abort queued requests), not at GC
        if pool is not None:
            pool.close()
            out.grade_s = pool.grade_s
        log.close()
        if bar is not None:
            bar.close()
        out.prep_s = out.backend.prep_seconds() if out.backend is not None else 0.0
        if own_backend and out.backend is not None:
            out.backend.close()
    return out


def run_eval(cfg: EvalConfig, backend: backend_base.Backend | None = None, argv: Sequence[str] | None = None,
             grade_fn: Callable = default_grade_fn, regrade_all: bool = False) -> dict:
    """Run (or resume) one evaluation and write <results_dir>/<tag>.json + .jsonl; returns the JSON dict.

    `backend` may be passed in (tests, or to reuse a loaded engine across tags); it is then not closed
    here. Otherwise the backend named by cfg is built only if some sample still needs generating.
    `grade_fn(sample, output) -> (robust, official)` must be a module-level function (the pool pickles it).
    regrade_all: re-grade every stored generation (the audit behind --regrade); the generation config is
    taken from the JSONL's header, and a sample without a stored generation is an error (no engine runs).
    """
    if backend is not None and backend.name != cfg.backend:
        raise ValueError(f"run_eval got a {backend.name!r} backend but cfg.backend is {cfg.backend!r}; "
                         "the config hash must describe the backend that generates")
    t_start, start_utc = time.perf_counter(), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    json_path, jsonl_path = cfg.results_paths()
    check_results_dir(json_path.parent)
    t0 = time.perf_counter()
    samples, datasets = load_all_samples(cfg)
    load_s = time.perf_counter() - t0
    mm_eval.refuse_text_only(cfg, samples)  # before any engine starts: a model that cannot see is named
    if regrade_all:  # the run as it was generated, whatever the model path holds today
        head = eval_resume.read_header(jsonl_path)
        gen_cfg, cfg_hash = head.get("generation") or {}, str(head.get("config_hash"))
    else:
        gen_cfg = generation_config(cfg)
        cfg_hash = results_schema.config_hash(gen_cfg)
    fingerprint = eval_fingerprint.grader_fingerprint()
    grading_env = {**grading_environment(cfg), "grader_fingerprint": fingerprint}
    res = resume(cfg, samples, jsonl_path, gen_cfg, cfg_hash, fingerprint, regrade_all)
    # Rewrite before appending: drops a torn last line so the next append starts on a fresh line.
    eval_resume.rewrite(jsonl_path, eval_resume.header(gen_cfg, cfg_hash, "graded", fingerprint),
                       [*res.trusted.values(), *res.others])
    prog = generate_and_grade(cfg, samples, res, jsonl_path, cfg_hash, fingerprint, backend, grade_fn)
    ordered = [prog.records[s.id] for s in samples]
    by_bench = {b: results_schema.apply_official_guesses([r for r in ordered if r["bench"] == b]) for b in cfg.benchmarks}
    ordered = [r for b in cfg.benchmarks for r in by_bench[b]]
    eval_resume.rewrite(jsonl_path, eval_resume.header(gen_cfg, cfg_hash, "sample", fingerprint), [*ordered, *res.others])
    after = {r["id"]: r for r in ordered}
    changed = [sid for sid in res.before if _verdict(after[sid]) != res.before[sid]]
    if changed:
        print(f"vllm_eval8: {len(changed)} verdict(s) changed on re-grading: {', '.join(changed[:10])}"
              + (" ..." if len(changed) > 10 else ""), file=sys.stderr)
    doc = {"schema": results_schema.SCHEMA_VERSION, "tag": cfg.tag, "role": cfg.role, "reference_tag": cfg.reference_tag,
           "official_model": cfg.official_model, "model": cfg.model, "model_path": cfg.model_path,
           "backend": cfg.backend, "generation": gen_cfg, "config_hash": cfg_hash, "samples_file": jsonl_path.name,
           "grading": grading_env,
           "benchmarks": {b: {**results_schema.summarize_bench(by_bench[b], official_scorer_info(b)),
                              "dataset": datasets[b]} for b in cfg.benchmarks}}
    doc["gate"] = results_official.gate_for_result(doc)
    end_utc = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    gen_only = max(prog.gen_s - prog.prep_s, 0.0)
    wall = time.perf_counter() - t_start
    harness = wall - prog.backend_init_s - gen_only
    generated = len([s for s in samples if s.id not in res.trusted and not s.meta.get("input_error")])
    doc["resumed"] = {"reused": len(res.trusted), "generated": generated, "torn_lines_dropped": res.torn,
                      "regraded": len(res.regrade), "verdicts_changed": len(changed),
                      "truncation_reapplied": res.truncation_fixed}
    doc["timing"] = {"start_utc": start_utc, "end_utc": end_utc, "wall_s": wall, "load_samples_s": load_s,
                     "backend_init_s": prog.backend_init_s, "generate_s": gen_only, "prompt_render_s": prog.prep_s,
                     "grade_wait_s": prog.grade_s, "write_s": prog.write_s, "harness_s": harness,
                     "harness_overhead_pct": 100.0 * harness / gen_only if gen_only > 0 else None}
    doc["provenance"] = provenance.record(
        argv=argv, config_hash=cfg_hash, eval_config=config_for_record(cfg),
        backend_info=prog.backend.identity() if prog.backend is not None else None,
        datasets={b: {k: v for k, v in d.items() if k != "source"} for b, d in datasets.items()},
        start_utc=start_utc, end_utc=end_utc)
    text = provenance.redact(json.dumps(doc, indent=1, ensure_ascii=False, default=str, allow_nan=False))
    atomic_io.write_text(json_path, text + "\n")
    return json.loads(text)


def format_summary(doc: Mapping) -> str:
    sandbox_line = (doc.get("grading") or {}).get("sandbox")
    lines = [f"{doc['tag']}  ({doc['backend']}, {doc['model']})" + (f"  sandbox: {sandbox_line}" if sandbox_line else ""),
             f"{'benchmark':<10} {'n':>5} {'acc':>7} {'95% CI':>17} {'acc_off':>8} {'differ':>7} {'acc_fin':>8} "
             f"{'trunc':>6} {'no_ans':>7} {'tok_med':>8} {'gate':>18}"]
    warnings = []
    for bench, b in doc["benchmarks"].items():
        ci = "[%.1f, %.1f]" % tuple(b["ci95"]) if b["ci95"] else "-"
        fin = "-" if b["acc_finished"] is None else f"{b['acc_finished']:.1f}"
        off = "-" if b.get("acc_official") is None else f"{b['acc_official']:.1f}"
        differ = "-" if b.get("disagreement") is None else f"{b['disagreement']:.1f}"
        lines.append(f"{bench:<10} {b['n']:>5} {b['acc']:>7.1f} {ci:>17} {off:>8} {differ:>7} {fin:>8} "
                     f"{b['trunc']:>6.1f} {b['no_answer']:>7.1f} {b['tokens_median']:>8.0f} "
                     f"{doc['gate'][bench]['status']:>18}")
        errs = b.get("grade_errors") or {}
        if any(errs.values()):
            warnings.append(f"WARNING {bench}: {errs.get('grader_error', 0)} grader error(s), "
                            f"{errs.get('judge_error', 0)} judge error(s); see grade_detail in {doc['samples_file']}")
    return "\n".join(lines + warnings)
