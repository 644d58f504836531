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
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Mapping, Sequence

import provenance

from smoke_plan import (  # noqa: F401  (re-exported: `import smoke` is the public API)
    EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_STEP_FAILED,
    EMBEDDED, EMBEDDED_MOE, FALLBACKS, Facts, HUB_ID, MOE_FALLBACKS,
    PROMPT_ROOM, Plan, REPO_ROOT, SCHEMA, SRC_DIRS, STEPS,
    SmokeConfig, SmokeError, TINY_MOE, classify_model, hub_unusable_reasons, plan_smoke,
    recipe_slug, slug_of, tags_for)
from smoke_preflight import (  # noqa: F401  (re-exported: `import smoke` is the public API)
    check_free_space, check_writable, checkpoint_bytes, child_env, cuda_available, fidelity_cache_bytes,
    hub_reachable, invalidate_broken_quant, probe_facts, verify_quant_output)
from smoke_steps import (  # noqa: F401  (re-exported: `import smoke` is the public API)
    eval_cmd, explain_failure, fidelity_cmd, quantize_cmd, read_json, resolve_teacher,
    run_smoke, run_step, write_json_atomic)
from smoke_report import (  # noqa: F401  (re-exported: `import smoke` is the public API)
    _f, load_outputs, missing_numbers, render_table)


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
    ("--method", "method", str, "quantization method: clip | rtn | wclip | gptq | awq"),
    ("--grid", "grid", str, "code grid: sym | full | asym"),
    ("--act-order", "act_order", _on_off, "on|off: gptq columns in decreasing diag(H) order"),
    ("--role-bits", "role_bits", str, "per-role bits overrides, ROLE=BITS[,ROLE=BITS] (e.g. embed=8)"),
    ("--bits-plan", "bits_plan", str, "per-tensor bits plan JSON (quant_save --bits-plan; repo-relative ok)"),
    ("--calib", "calib", str, "calibration source: pydoc-topics | teacher-sample | a text file (calibrated methods)"),
    ("--calib-tokens", "calib_tokens", int, "calibration tokens (0 = quant_save's default)"),
    ("--calib-ctx", "calib_ctx", int, "calibration window length"),
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
