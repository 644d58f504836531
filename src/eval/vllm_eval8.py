"""Evaluate one model on the benchmarks of bench8_loaders, resumably, and write results/vllm_eval/<tag>.json.

One runner for every backend (vllm / hf / openai / replay; llamacpp serves a GGUF through llama-server):
the prompts, extraction and grading are the same code whatever generated the text. Each sample is appended
and fsynced to <tag>.jsonl the moment it is graded, so a killed run resumes without regenerating it; a
stored generation is reused only for the same prompt and generation identity, and its verdict is re-derived
when the graders changed. Each benchmark is scored twice: our robust cascade (acc) and the benchmark's
own official scorer (acc_official, what the validation gate uses).

    python -m vllm_eval8 --model PATH --tag qwen-bf16 --benchmarks mmlu_pro,gpqa --n 40 --n gpqa=198
    python -m vllm_eval8 --model M --tag T --tensor-parallel-size 4 --engine-arg enable_expert_parallel=true --dry-run
    python -m vllm_eval8 --regrade TAG          (re-grade a finished run from its generations; no engine)
    python -m vllm_eval8 compare results/vllm_eval/A.json results/vllm_eval/B.json

Every option is also EVAL_<OPTION> in the environment (eval_config: one dataclass is the source of flags,
environment names, recipe keys and defaults). The pieces: eval_config (the config), eval_identity (the
run identity), eval_run (the run and the summary), eval_resume (the JSONL), eval_grading (the grading pool).
"""
from __future__ import annotations

import argparse
import dataclasses  # noqa: F401  (callers use vllm_eval8.dataclasses.replace)
import os
import sys
from typing import Sequence

from eval_config import (BUDGETS, ROLES, EvalConfig, build_parser, config_for_record,  # noqa: F401  (the API)
                         config_from_args)
from eval_identity import backend_identity, generation_config, model_fingerprint  # noqa: F401
from eval_run import format_summary, grading_environment, load_all_samples, run_eval  # noqa: F401
from eval_grading import GradingPool, default_grade_fn, default_grade_workers, warm_up  # noqa: F401
from eval_resume import ResumeMismatch, read_resumable  # noqa: F401


def requested_backend(argv: Sequence[str]) -> str | None:
    """The backend the command line (the last --backend, as argparse takes it) or EVAL_BACKEND asks for."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--backend", default=None)
    known, _ = pre.parse_known_args(list(argv))
    return known.backend or os.environ.get("EVAL_BACKEND") or None


def main(argv: Sequence[str] | None = None) -> int:
    """The harness CLI: `compare`, `--regrade TAG`, `--backend llamacpp` (llama-server) or one run."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "compare":
        import results_compare

        return results_compare.main(argv[1:])
    if any(a == "--regrade" or a.startswith("--regrade=") for a in argv):
        import results_regrade

        return results_regrade.main(argv)
    if requested_backend(argv) == "llamacpp":
        import llamacpp_eval8

        return llamacpp_eval8.main(argv)
    import provenance

    args = build_parser(__doc__).parse_args(argv)
    try:
        cfg = config_from_args(args)
        if args.dry_run:
            import eval_dryrun

            print(eval_dryrun.describe(cfg))
            return 0
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # once, here: vLLM on a CPU box needs a KV size (GiB)
        doc = run_eval(cfg, argv=[sys.argv[0], *argv])
    except (ValueError, FileNotFoundError, ResumeMismatch, RuntimeError) as err:
        print(f"vllm_eval8: {provenance.redact(str(err))}", file=sys.stderr)
        return 2
    print(format_summary(doc))
    print(f"wrote {cfg.results_paths()[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
