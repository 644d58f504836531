"""Evaluate one model on the benchmarks of bench8_loaders, resumably, and write results/vllm_eval/<tag>.json.

One runner for every backend (vllm / hf / openai / replay): the prompts, extraction and grading are the
same code whatever generated the text. Each sample is appended and fsynced to <tag>.jsonl the moment it
is graded, so a killed run resumes without regenerating it; a JSONL line is reused only when it is
complete and its prompt hash and generation config hash match this run (a changed config is refused
with a message, or moved aside with --restart). Each benchmark is scored twice: our robust cascade (acc)
and the benchmark's own official scorer (acc_official, what the validation gate uses).

    python -m vllm_eval8 --model PATH --tag qwen-bf16 --benchmarks mmlu_pro,gpqa --n 40 --n gpqa=198
    python -m vllm_eval8 compare results/vllm_eval/A.json results/vllm_eval/B.json
    python -m vllm_eval8 --model M --tag T --tensor-parallel-size 4 --engine-arg enable_expert_parallel=true --dry-run

Every option also reads an environment variable EVAL_<OPTION> (e.g. EVAL_TEMPERATURE); the command line
wins over the environment, which wins over the built-in defaults (kept equal to configs/eval.env).

The code: eval_config (EvalConfig, flags, config hash), resume_log (the JSONL), grading_pool (the one
grading pool), eval_run (the run and the summary). This module re-exports them under the old name.
"""
from __future__ import annotations

import dataclasses  # noqa: F401  (callers use vllm_eval8.dataclasses.replace)
import sys

from eval_config import (BUDGETS, ROLES, EvalConfig, backend_identity, build_parser, config_for_record,  # noqa: F401
                         config_from_args, generation_config, model_fingerprint)
from eval_run import format_summary, grading_environment, load_all_samples, main, run_eval  # noqa: F401
from grading_pool import GradingPool, default_grade_fn, default_grade_workers, warm_up  # noqa: F401
from resume_log import ResumeMismatch, read_resumable  # noqa: F401



def cli(argv=None) -> int:
    """`--dry-run` prints what the run would do (eval_dryrun) and exits; anything else is eval_run.main."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--dry-run" not in argv or (argv and argv[0] == "compare"):
        return main(argv)
    import eval_dryrun
    import provenance

    try:
        print(eval_dryrun.describe(config_from_args(build_parser(__doc__).parse_args(argv))))
    except ValueError as err:
        print(f"vllm_eval8: {provenance.redact(str(err))}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
