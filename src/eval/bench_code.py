"""Code benchmarks: LiveCodeBench (stdin and functional), HumanEval, MBPP; every program runs in the sandbox.

The graders (bench_grade.py) are the official rule here: a program passes only when the benchmark's own tests
pass, so the official scorer is the grader itself.
"""
from __future__ import annotations

import base64
import io
import json
import pickle
import re
import zlib

import bench_extract
import bench_grade
import sandbox
from bench_spec import BenchSpec, OfficialScorer, Sample, Source, column, user_message
from bench_grade import Graded


class _PlainUnpickler(pickle.Unpickler):
    """Plain data only: any pickle that names a class or function is refused, so decoding a dataset
    field can never run code."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: only plain types are allowed")


def decode_lcb_tests(field_value) -> list:
    """LCB test lists come as JSON text, or as base64(zlib(pickle(JSON text))) for the private ones."""
    if isinstance(field_value, list):
        return field_value
    text = str(field_value or "").strip()
    if not text:
        return []
    try:
        return json.loads(text)
    except ValueError:
        pass
    raw = _PlainUnpickler(io.BytesIO(zlib.decompress(base64.b64decode(text)))).load()
    return json.loads(raw) if isinstance(raw, (str, bytes)) else list(raw)


def encode_lcb_tests(tests: list) -> str:
    """The inverse of decode_lcb_tests' private form (used to write fixtures in the dataset's schema)."""
    return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(tests)))).decode()


LCB_FILES = ("test.jsonl", "test2.jsonl", "test3.jsonl", "test4.jsonl", "test5.jsonl", "test6.jsonl")


def lcb_release_files(release: str) -> tuple:
    """release_vN = all problems up to vN (cumulative, LCB's own convention); vN = only vN's new file;
    vA_vB = new files of vA..vB; release_latest = every file known here."""
    if release == "release_latest":
        return LCB_FILES
    m = re.fullmatch(r"release_v(\d+)|v(\d+)|v(\d+)_v(\d+)", release)
    if not m:
        raise ValueError(f"lcb: release {release!r} not understood; use release_vN, vN, vA_vB or release_latest")
    if m.group(1):
        lo, hi = 1, int(m.group(1))
    elif m.group(2):
        lo = hi = int(m.group(2))
    else:
        lo, hi = int(m.group(3)), int(m.group(4))
    if not 1 <= lo <= hi <= len(LCB_FILES):
        raise ValueError(f"lcb: release {release!r} outside v1..v{len(LCB_FILES)}")
    return LCB_FILES[lo - 1: hi]


def _lcb_sources(spec, options):
    release = options.get("release", "release_v6")
    return [Source(None, options.get("dataset", spec.dataset), None, "train", options.get("revision", spec.dataset_revision),
                   hub_files=lcb_release_files(release))]


def lcb_prompt(question: str, starter_code: str) -> str:
    if starter_code and starter_code.strip():
        fmt = ("Complete the following starter code; keep the class and method signature unchanged.\n\n"
               f"```python\n{starter_code.rstrip()}\n```")
    else:
        fmt = ("Write a complete Python program that reads the input from standard input and writes the answer "
               "to standard output (do not hard-code the sample tests).")
    return (f"Solve the following programming problem in Python.\n\n### Problem\n\n{question.strip()}\n\n"
            f"### Format\n\n{fmt}\n\nGive your final solution as one ```python code block at the end of your answer.")


def _lcb_sample(spec, row, index, source, options):
    date = str(column(spec, row, "date", "") or "")[:10]
    lo, hi = options.get("date_from"), options.get("date_to")
    if (lo and date < str(lo)) or (hi and date > str(hi)):
        return None
    meta_field = column(spec, row, "metadata", "{}")
    try:
        func_name = json.loads(meta_field).get("func_name") if isinstance(meta_field, str) else meta_field.get("func_name")
    except (ValueError, AttributeError):
        func_name = None
    starter = column(spec, row, "starter_code", "") or ""
    public = decode_lcb_tests(column(spec, row, "public_tests"))
    qid = column(spec, row, "id", index)
    return Sample(id=f"lcb/{qid}", bench=spec.name,
                  messages=user_message(spec.prompt(str(column(spec, row, "question")), starter)),
                  gold={"public_test_cases": column(spec, row, "public_tests"),
                        "private_test_cases": column(spec, row, "private_tests"), "func_name": func_name},
                  meta={"release": options.get("release", "release_v6"), "date_window": [lo, hi],
                        "contest_date": date, "platform": column(spec, row, "platform"),
                        "difficulty": column(spec, row, "difficulty"), "title": column(spec, row, "title"),
                        "testtype": public[0].get("testtype") if public else ("functional" if func_name else "stdin"),
                        "timeout_s": float(options.get("timeout_s", 6.0))},
                  group=column(spec, row, "difficulty"))


def _code_limits(sample: Sample) -> sandbox.SandboxLimits:
    """The sandbox limits of one sample; allow_weak_sandbox is set on the samples by the runner (the
    --allow-weak-sandbox flag), so the grading workers see the user's choice."""
    return sandbox.SandboxLimits(timeout_s=float(sample.meta.get("timeout_s", 6.0)),
                                 memory_mb=int(sample.meta.get("memory_mb", 2048)),
                                 allow_weak_sandbox=bool(sample.meta.get("allow_weak_sandbox", False)))


def grade_lcb(sample: Sample, output: str) -> Graded:
    tests = decode_lcb_tests(sample.gold["public_test_cases"]) + decode_lcb_tests(sample.gold["private_test_cases"])
    if not tests:
        return Graded(None, False, False, {"error": "sample has no test cases"})
    return bench_grade.grade_code_tests(tests, sample.gold.get("func_name"), output, _code_limits(sample))


def humaneval_prompt(prompt: str) -> str:
    return ("Complete the following Python function. Reply with the complete function (including the "
            f"signature and any imports it needs) in one ```python code block.\n\n```python\n{prompt.rstrip()}\n```")


def _humaneval_sample(spec, row, index, source, options):
    prompt, entry = column(spec, row, "prompt"), column(spec, row, "entry_point")
    tid = column(spec, row, "id", index)
    return Sample(id=f"humaneval/{str(tid).split('/')[-1]}", bench=spec.name,
                  messages=user_message(spec.prompt(prompt)),
                  gold={"prompt": prompt, "test": column(spec, row, "test"), "entry_point": entry},
                  meta={"task_id": tid, "timeout_s": float(options.get("timeout_s", 10.0))})


def grade_humaneval(sample: Sample, output: str) -> Graded:
    """The prompt goes first in both processes (its imports and helpers); the candidate's function
    redefines the stub, and the tests reach it through the entry point's proxy (sandbox_calls)."""
    g = sample.gold
    return bench_grade.grade_code_program((g["prompt"], f"{g['test']}\n\ncheck({g['entry_point']})\n"), output,
                                      _code_limits(sample), names=(g["entry_point"],))


def mbpp_prompt(task: str, tests: list) -> str:
    shown = "\n".join(tests)
    return (f"{task.strip()}\n\nYour code should pass these tests:\n\n```python\n{shown}\n```\n\n"
            "Reply with the Python code (function definitions and imports only, no tests) in one ```python code block.")


def _mbpp_sample(spec, row, index, source, options):
    tests = list(column(spec, row, "tests"))
    setup = column(spec, row, "setup", "") or ""
    if isinstance(setup, list):  # sanitized: test_imports is a list of import lines
        setup = "\n".join(setup)
    tid = column(spec, row, "id", index)
    return Sample(id=f"mbpp/{tid}", bench=spec.name,
                  messages=user_message(spec.prompt(str(column(spec, row, "task")), tests)),
                  gold={"setup": setup, "tests": tests},
                  meta={"config": "sanitized" if "test_imports" in row else "full", "timeout_s": float(options.get("timeout_s", 10.0))})


def grade_mbpp(sample: Sample, output: str) -> Graded:
    g = sample.gold
    return bench_grade.grade_code_program((g["setup"], "\n".join(g["tests"]) + "\n"), output, _code_limits(sample))


TESTS_ARE_OFFICIAL = OfficialScorer("unit-tests", "the benchmark's own tests, run in the sandbox (bench_grade.py)")

SPECS = (
    BenchSpec("lcb", "LiveCodeBench code generation (lite), stdin and functional problems",
              "livecodebench/code_generation_lite", None, "train", None,
              {"id": ("question_id",), "title": ("question_title",), "question": ("question_content",),
               "platform": ("platform",), "date": ("contest_date",), "starter_code": ("starter_code",),
               "difficulty": ("difficulty",), "public_tests": ("public_test_cases",),
               "private_tests": ("private_test_cases",), "metadata": ("metadata",)},
              lcb_prompt, _lcb_sample, bench_extract.extract_code, grade_lcb, official=TESTS_ARE_OFFICIAL,
              required=("question", "public_tests"),
              options=("release", "date_from", "date_to", "timeout_s"), sources=_lcb_sources, needs_sandbox=True),
    BenchSpec("humaneval", "HumanEval: 164 functions, graded by their unit tests",
              "openai/openai_humaneval", None, "test", None,
              {"id": ("task_id",), "prompt": ("prompt",), "test": ("test",), "entry_point": ("entry_point",)},
              humaneval_prompt, _humaneval_sample, bench_extract.extract_code, grade_humaneval,
              official=TESTS_ARE_OFFICIAL, required=("prompt", "test", "entry_point"),
              options=("timeout_s",), needs_sandbox=True),
    BenchSpec("mbpp", "MBPP sanitized (test split, 257): functions graded by their asserts",
              "google-research-datasets/mbpp", "sanitized", "test", None,
              {"id": ("task_id",), "task": ("prompt", "text"), "tests": ("test_list",),
               "setup": ("test_imports", "test_setup_code")},
              mbpp_prompt, _mbpp_sample, bench_extract.extract_code, grade_mbpp,
              official=TESTS_ARE_OFFICIAL, required=("task", "tests"),
              options=("timeout_s",), needs_sandbox=True),
)
