"""The benchmarks, declared once each (the import name older code and tests use).

The code lives in: bench_spec (Sample, BenchSpec), bench_registry (the table, loading, grading entry
points), and one module per family: bench_mc (MMLU-Pro, GPQA, MMMLU), bench_math (MATH-500, AIME),
bench_code (LiveCodeBench, HumanEval, MBPP), bench_hle (HLE). docs/BENCHMARKS.md documents the choices.

    python -m bench8_loaders                 # list the benchmarks
    python -m bench8_loaders mmlu_pro --data-file rows.jsonl --n 3
"""
from __future__ import annotations

from bench_code import decode_lcb_tests, encode_lcb_tests, lcb_release_files, LCB_FILES  # noqa: F401
from bench_math import AIME_DATASETS  # noqa: F401
from bench_mc import MMMLU_LOCALES, gpqa_permutation, mc_prompt  # noqa: F401
from bench_registry import (BENCHMARKS, GRADER_ERROR, JUDGE_ERROR, grade_both, grade_official,  # noqa: F401
                            grade_output, grade_status, grading_environment, load_samples, main, read_rows,
                            select_subset, source_info)
from bench_spec import BenchSpec, DataFileError, OfficialScorer, Sample, Source  # noqa: F401
from bench_grade import Graded, JudgeConfig  # noqa: F401

if __name__ == "__main__":
    main()
