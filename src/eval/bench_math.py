"""Math benchmarks: MATH-500 and AIME 2024/2025/2026.

Robust grading takes the last \\boxed{} (or a final "answer is" line) and compares with math-verify; the
official scorer is math-verify itself run on the whole output, as HF's MATH-500 / lighteval setup does.
"""
from __future__ import annotations

import threading

import bench_extract
import bench_grade
from bench_spec import BenchSpec, OfficialScorer, Sample, Source, column, user_message
from bench_grade import Graded


def math_prompt(problem: str, integer_answer: bool = False) -> str:
    extra = " The answer is an integer between 0 and 999 inclusive." if integer_answer else ""
    return (f"Solve the following problem. Reason step by step, and put your final answer within "
            f"\\boxed{{}}.{extra}\n\n{problem.strip()}")


def grade_math_verify_whole_output(sample: Sample, output: str) -> Graded:
    """math-verify's own extraction on the whole output (its default LaTeX + expression configs), then
    verify(gold, prediction). Without math-verify installed the robust grader answers, and says so."""
    try:
        from math_verify import parse, verify
    except ImportError:
        g = bench_grade.grade_math(str(sample.gold), output)
        return Graded(g.extracted, g.correct, g.no_answer, {**g.detail, "scorer": "robust (math-verify missing)"})
    limit = 5 if threading.current_thread() is threading.main_thread() else None  # SIGALRM: main thread only
    gold = parse("\\boxed{" + str(sample.gold) + "}", parsing_timeout=limit)
    pred = parse(output, parsing_timeout=limit)
    if not pred:
        return Graded(None, False, True, {"scorer": "math-verify"})
    ok = bool(gold) and bool(verify(gold, pred, timeout_seconds=limit))
    return Graded(str(pred[-1])[:200], ok, False, {"scorer": "math-verify"})


MATH_VERIFY_OFFICIAL = OfficialScorer("math-verify", "github.com/huggingface/Math-Verify (parse + verify on the "
                                      "whole output; the HF MATH-500 / lighteval rule)", grade_math_verify_whole_output)


def _math500_sample(spec, row, index, source, options):
    uid = column(spec, row, "id", index)
    return Sample(id=f"math500/{uid}", bench=spec.name,
                  messages=user_message(spec.prompt(column(spec, row, "problem"))),
                  gold=str(column(spec, row, "answer")),
                  meta={"subject": column(spec, row, "subject"), "level": column(spec, row, "level")},
                  group=column(spec, row, "subject"))


AIME_DATASETS = {"2024": ("HuggingFaceH4/aime_2024", "train"),
                 "2025": ("MathArena/aime_2025", "train"),
                 "2026": ("MathArena/aime_2026", "train")}


def _aime_sources(spec, options):
    years = options.get("years") or tuple(AIME_DATASETS)
    years = (str(years),) if isinstance(years, (str, int)) else tuple(str(y) for y in years)
    overrides = {str(k): v for k, v in (options.get("aime_datasets") or {}).items()}
    out = []
    for year in years:
        if year not in AIME_DATASETS and year not in overrides:
            raise ValueError(f"aime: no dataset known for year {year}; pass aime_datasets={{'{year}': 'org/name'}}")
        dataset, split = AIME_DATASETS.get(year, (None, "train"))
        dataset = overrides.get(year, dataset)
        out.append(Source(year, dataset, None, options.get("split", split), options.get("revision")))
    return out


def _aime_sample(spec, row, index, source, options):
    pid = column(spec, row, "id", index)
    raw = str(column(spec, row, "answer")).strip()
    try:
        gold = str(int(raw))
    except ValueError:
        raise ValueError(f"field 'answer' is {raw!r}, not an integer") from None
    return Sample(id=f"aime/{source.part}/{pid}", bench=spec.name,
                  messages=user_message(spec.prompt(str(column(spec, row, "problem")), integer_answer=True)),
                  gold=gold, meta={"year": source.part}, group=source.part)


SPECS = (
    BenchSpec("math500", "MATH-500: last \\boxed{} answer, equivalence by math-verify",
              "HuggingFaceH4/MATH-500", None, "test", None,
              {"id": ("unique_id",), "problem": ("problem",), "answer": ("answer",), "subject": ("subject",),
               "level": ("level",)},
              math_prompt, _math500_sample, bench_extract.extract_math_answer,
              lambda s, o: bench_grade.grade_math(s.gold, o), official=MATH_VERIFY_OFFICIAL,
              required=("problem", "answer")),
    BenchSpec("aime", "AIME 2024/2025/2026: integer answers 0-999, one part per year",
              "per-year (AIME_DATASETS)", None, "train", None,
              {"id": ("id", "problem_idx", "ID"), "problem": ("problem", "Problem", "question"),
               "answer": ("answer", "Answer")},
              math_prompt, _aime_sample, bench_extract.extract_integer,
              lambda s, o: bench_grade.grade_integer(s.gold, o), official=MATH_VERIFY_OFFICIAL,
              required=("problem", "answer"),
              options=("years", "aime_datasets"), sources=_aime_sources, n_is_per_part=True),
)
