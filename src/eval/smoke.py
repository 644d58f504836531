"""The smoke: the whole method, small, end to end - quantize a teacher, evaluate teacher AND quant through
vLLM on the same samples, measure fidelity, regenerate RESULTS.md, print one table, say SMOKE OK.

Why a separate orchestrator: every step already has its own CLI (quant_save.py, vllm_eval8, moe_eval.py,
results_md); the smoke runs exactly those, one subprocess per step (an engine's memory is returned
when its step ends, and a failing step is named with its own message), then prints a table read back
FROM the JSON files the steps wrote, so the numbers on screen are the numbers on disk.

Where it runs decides what it runs (`plan_smoke`, a pure function of the config and probed facts):
* a hub id (default Qwen/Qwen3.5-2B) on a box with CUDA and a reachable hub: that model, real hub
  benchmarks with small n;
* no CUDA, HF_HUB_OFFLINE=1 or an unreachable hub (bounded check): the offline fallback - the embedded
  SmolLM2-135M-Instruct (dense) or a tiny random-weight qwen3_moe (MoE smoke), evaluated on the smoke
  set shipped in configs/data/smoke (easy questions in the MMLU-Pro / MATH-500 schemas, same loaders/graders);
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
import quant_config
import tool_config

from smoke_plan import (  # noqa: F401  (re-exported: `import smoke` is the public API)
    EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_STEP_FAILED,
    EMBEDDED, EMBEDDED_MOE, FALLBACKS, Facts, HUB_ID, MOE_FALLBACKS,
    PROMPT_ROOM, Plan, QUANT_KNOBS, REPO_ROOT, SCHEMA, SRC_DIRS, STEPS,
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
TOOL = tool_config.Tool("smoke", "SMOKE_", SmokeConfig, __doc__)


def build_parser() -> argparse.ArgumentParser:
    return tool_config.build_parser(TOOL, extra=[
        (("--default-recipe",), {"default": None, "help": "the recipe when none is named (the pipelines pass "
                                 "theirs, and so the old unprefixed quant names are read too)"}),
        (("--plan",), {"action": "store_true", "help": "print the plan (mode, model, data, budget) and exit"})])


def config_from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> SmokeConfig:
    """tool_config's rule for the smoke's own knobs; the quant knobs not set there come from the quant
    recipe (SMOKE_QUANT_RECIPE, a configs/*.env that pipelines/quantize.sh reads the same way)."""
    env = os.environ if environ is None else environ
    pipeline = bool(getattr(args, "default_recipe", None))
    try:
        cfg = tool_config.resolve(TOOL, args, env, legacy=pipeline, default_recipe=getattr(args, "default_recipe", None))
        if not cfg.quant_recipe:
            return cfg
        given = {f for f in QUANT_KNOBS if getattr(args, f, None) is not None
                 or tool_config.env_given(_field(f), env, f"SMOKE_{f.upper()}")
                 or (pipeline and any(tool_config.env_given(_field(f), env, old) for old in _field(f).metadata["legacy"]))}
        recipe = tool_config.read_recipe(_repo_path(cfg.quant_recipe), env)
        quant_keys = {f.name.upper() for f in dataclasses.fields(quant_config.QuantConfig)}
        unknown = sorted(k for k in recipe if k not in quant_keys)
        if unknown:
            raise tool_config.ConfigError(f"{cfg.quant_recipe}:{recipe[unknown[0]][1]}: unknown quant key(s) {unknown}")
        values = {f: tool_config.convert(_field(f), recipe[f.upper()][0], f"{cfg.quant_recipe} {f.upper()}")
                  for f in QUANT_KNOBS if f not in given and f.upper() in recipe}
        return dataclasses.replace(cfg, **values)
    except (tool_config.ConfigError, ValueError) as e:
        raise SmokeError(str(e)) from None


def _field(name: str):
    return next(f for f in dataclasses.fields(SmokeConfig) if f.name == name)


def _repo_path(path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else REPO_ROOT / p


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
