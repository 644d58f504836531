"""The benchmarks, declared once each: where the data lives, how a row becomes a prompt, how an answer is
found and graded. The runner (vllm_eval8.py) never branches on a benchmark's name; adding one means
adding one `BenchSpec` (plus its row function) to `BENCHMARKS` below.

Every benchmark loads from the hub through `datasets`, or offline from `data_file` (jsonl / json /
parquet in the dataset's own schema; for benchmarks with parts - MMMLU locales, AIME years - the path
may contain `{part}`). Details and choices are documented in docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import pickle
import random
import re
import zlib
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import extractors
import graders
import sandbox
from graders import Graded, JudgeConfig

__all__ = ["Sample", "Graded", "BenchSpec", "Source", "BENCHMARKS", "load_samples", "grade_output",
           "grade_many", "grading_environment", "source_info", "decode_lcb_tests"]


@dataclass(frozen=True)
class Sample:
    id: str
    bench: str
    messages: tuple
    gold: object
    meta: dict
    group: str | None = None


@dataclass(frozen=True)
class Source:
    """One dataset part to load: MMMLU has one per locale, AIME one per year, the rest exactly one."""
    part: str | None
    dataset: str
    config: str | None
    split: str
    revision: str | None = None
    hub_files: tuple = ()  # load these repo files with the generic json builder (LCB's jsonl releases)


@dataclass(frozen=True)
class BenchSpec:
    name: str
    description: str
    dataset: str
    config: str | None
    split: str
    default_n: int | None  # None = every row
    fields: dict  # role -> candidate column names in the dataset's own schema (first present wins)
    prompt: Callable  # (row fields..., options) -> user message text; called by make_sample
    make_sample: Callable  # (spec, row, index, source, options) -> Sample | None (None = skip the row)
    extract: Callable  # (output) -> str | None; what a log shows as "extracted"
    grade: Callable  # (sample, output) -> Graded
    dataset_revision: str | None = None
    options: tuple = ()  # benchmark-specific load_samples options (checked: a typo fails early)
    sources: Callable | None = None  # (spec, options) -> [Source]; None = one Source from the fields above
    n_is_per_part: bool = False
    needs_sandbox: bool = False  # grading executes model code (grade_many checks the sandbox works first)


COMMON_OPTIONS = ("dataset", "config", "split", "revision")


def column(spec: BenchSpec, row: dict, role: str, default=None):
    for name in spec.fields[role]:
        if name in row and row[name] is not None:
            return row[name]
    return default


def _message(text: str) -> tuple:
    return ({"role": "user", "content": text},)


# ------------------------------------------------------------------------------------ multiple choice

def _options_block(options: list) -> str:
    return "\n".join(f"{extractors.LETTERS[i]}. {str(opt).strip()}" for i, opt in enumerate(options))


def mc_prompt(question: str, options: list, subject: str | None = None, marker_line: str | None = None) -> str:
    letters = ", ".join(extractors.LETTERS[: len(options)])
    head = f"The following is a multiple choice question about {subject}.\n\n" if subject else ""
    finish = marker_line or 'The answer is (X)'
    return (f"{head}Question: {question.strip()}\n\nOptions:\n{_options_block(options)}\n\n"
            f"Think step by step, then finish with a line of the form \"{finish}\" where X is one of {letters}.")


def _mmlu_pro_sample(spec, row, index, source, options):
    opts = list(column(spec, row, "options"))
    answer_index = column(spec, row, "answer_index")
    if answer_index is None:
        answer_index = extractors.LETTERS.index(str(column(spec, row, "answer")).strip())
    answer_index = int(answer_index)
    kept = [i for i, o in enumerate(opts) if str(o).strip() != "N/A"]  # MMLU-Pro pads with "N/A"
    if answer_index not in kept:
        raise ValueError(f"mmlu_pro row {index}: gold option {answer_index} is missing or 'N/A'")
    shown = [opts[i] for i in kept]
    category = column(spec, row, "category", "unknown")
    qid = column(spec, row, "id", index)
    return Sample(id=f"mmlu_pro/{qid}", bench=spec.name,
                  messages=_message(spec.prompt(column(spec, row, "question"), shown, subject=category)),
                  gold=extractors.LETTERS[kept.index(answer_index)],
                  meta={"category": category, "n_options": len(shown), "src": column(spec, row, "src")},
                  group=category)


def _grade_mc(sample: Sample, output: str) -> Graded:
    letters = extractors.LETTERS[: sample.meta["n_options"]]
    return graders.grade_choice(sample.gold, output, letters)


def gpqa_permutation(seed: int, record_id: str) -> list:
    """Display order of the four answers, as indices into [correct, wrong1, wrong2, wrong3].
    Seeded per question so it is stable across runs and machines (str seeds hash with SHA-512)."""
    order = [0, 1, 2, 3]
    random.Random(f"gpqa:{seed}:{record_id}").shuffle(order)
    return order


def _gpqa_sample(spec, row, index, source, options):
    answers = [column(spec, row, role) for role in ("correct", "wrong1", "wrong2", "wrong3")]
    if any(a is None for a in answers):
        raise ValueError(f"gpqa row {index}: missing one of the four answer columns")
    rid = str(column(spec, row, "id", index))
    seed = int(options.get("_seed", 0))
    order = gpqa_permutation(seed, rid)
    shown = [str(answers[k]).strip() for k in order]
    return Sample(id=f"gpqa/{rid}", bench=spec.name,
                  messages=_message(spec.prompt(str(column(spec, row, "question")), shown)),
                  gold=extractors.LETTERS[order.index(0)],
                  meta={"permutation": order, "permutation_seed": seed, "n_options": 4,
                        "domain": column(spec, row, "domain"), "subdomain": column(spec, row, "subdomain")},
                  group=column(spec, row, "domain"))


MMMLU_LOCALES = tuple(extractors.LOCALE_ANSWER_MARKERS)


def mmmlu_prompt(question: str, options: list, locale: str) -> str:
    marker = extractors.LOCALE_ANSWER_MARKERS[locale][0]
    sep = " : " if locale == "FR_FR" else ("：" if locale in ("ZH_CN", "JA_JP") else ": ")
    return mc_prompt(question, options, marker_line=f"{marker}{sep}X")


def _mmmlu_sources(spec, options):
    locales = options.get("locales") or MMMLU_LOCALES
    locales = (locales,) if isinstance(locales, str) else tuple(locales)
    bad = [loc for loc in locales if loc not in MMMLU_LOCALES]
    if bad:
        raise ValueError(f"mmmlu: unknown locale(s) {bad}; choose from {list(MMMLU_LOCALES)}")
    return [Source(loc, options.get("dataset", spec.dataset), loc, options.get("split", spec.split),
                   options.get("revision", spec.dataset_revision)) for loc in locales]


def _mmmlu_sample(spec, row, index, source, options):
    locale = source.part
    opts = [column(spec, row, r) for r in ("A", "B", "C", "D")]
    rid = column(spec, row, "id", index)
    return Sample(id=f"mmmlu/{locale}/{rid}", bench=spec.name,
                  messages=_message(spec.prompt(str(column(spec, row, "question")), opts, locale)),
                  gold=str(column(spec, row, "answer")).strip(),
                  meta={"locale": locale, "subject": column(spec, row, "subject"), "n_options": 4},
                  group=locale)


# ---------------------------------------------------------------------------------------------- math

def math_prompt(problem: str, integer_answer: bool = False) -> str:
    extra = " The answer is an integer between 0 and 999 inclusive." if integer_answer else ""
    return (f"Solve the following problem. Reason step by step, and put your final answer within "
            f"\\boxed{{}}.{extra}\n\n{problem.strip()}")


def _math500_sample(spec, row, index, source, options):
    uid = column(spec, row, "id", index)
    return Sample(id=f"math500/{uid}", bench=spec.name,
                  messages=_message(spec.prompt(column(spec, row, "problem"))),
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
    return Sample(id=f"aime/{source.part}/{pid}", bench=spec.name,
                  messages=_message(spec.prompt(str(column(spec, row, "problem")), integer_answer=True)),
                  gold=str(int(str(column(spec, row, "answer")).strip())),
                  meta={"year": source.part}, group=source.part)


# ---------------------------------------------------------------------------------------------- code

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
                  messages=_message(spec.prompt(str(column(spec, row, "question")), starter)),
                  gold={"public_test_cases": column(spec, row, "public_tests"),
                        "private_test_cases": column(spec, row, "private_tests"), "func_name": func_name},
                  meta={"release": options.get("release", "release_v6"), "date_window": [lo, hi],
                        "contest_date": date, "platform": column(spec, row, "platform"),
                        "difficulty": column(spec, row, "difficulty"), "title": column(spec, row, "title"),
                        "testtype": public[0].get("testtype") if public else ("functional" if func_name else "stdin"),
                        "timeout_s": float(options.get("timeout_s", 6.0))},
                  group=column(spec, row, "difficulty"))


def _code_limits(sample: Sample) -> sandbox.SandboxLimits:
    return sandbox.SandboxLimits(timeout_s=float(sample.meta.get("timeout_s", 6.0)),
                                 memory_mb=int(sample.meta.get("memory_mb", 2048)))


def _grade_lcb(sample: Sample, output: str) -> Graded:
    tests = decode_lcb_tests(sample.gold["public_test_cases"]) + decode_lcb_tests(sample.gold["private_test_cases"])
    if not tests:
        return Graded(None, False, False, {"error": "sample has no test cases"})
    return graders.grade_code_tests(tests, sample.gold.get("func_name"), output, _code_limits(sample))


def humaneval_prompt(prompt: str) -> str:
    return ("Complete the following Python function. Reply with the complete function (including the "
            f"signature and any imports it needs) in one ```python code block.\n\n```python\n{prompt.rstrip()}\n```")


def _humaneval_sample(spec, row, index, source, options):
    prompt, entry = column(spec, row, "prompt"), column(spec, row, "entry_point")
    tid = column(spec, row, "id", index)
    return Sample(id=f"humaneval/{str(tid).split('/')[-1]}", bench=spec.name,
                  messages=_message(spec.prompt(prompt)),
                  gold={"prompt": prompt, "test": column(spec, row, "test"), "entry_point": entry},
                  meta={"task_id": tid, "timeout_s": float(options.get("timeout_s", 10.0))})


def _grade_humaneval(sample: Sample, output: str) -> Graded:
    """The prompt goes first (its imports and helpers), the model's function redefines the stub."""
    g = sample.gold
    return graders.grade_code_program((g["prompt"], f"{g['test']}\n\ncheck({g['entry_point']})\n"), output,
                                      _code_limits(sample))


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
                  messages=_message(spec.prompt(str(column(spec, row, "task")), tests)),
                  gold={"setup": setup, "tests": tests},
                  meta={"config": "sanitized" if "test_imports" in row else "full", "timeout_s": float(options.get("timeout_s", 10.0))})


def _grade_mbpp(sample: Sample, output: str) -> Graded:
    g = sample.gold
    return graders.grade_code_program((g["setup"], "\n".join(g["tests"]) + "\n"), output, _code_limits(sample))


# ----------------------------------------------------------------------------------------------- HLE

def hle_prompt(question: str, answer_type: str) -> str:
    kind = "the letter of your chosen option" if answer_type == "multipleChoice" else "your final answer, as short as possible"
    return (f"{question.strip()}\n\nAnswer the question above. End your response with exactly these three lines:\n"
            f"Explanation: <your reasoning in brief>\nAnswer: <{kind}>\nConfidence: <0% to 100%>")


def hle_judge(options: dict) -> JudgeConfig | None:
    url = options.get("judge_url") or os.environ.get("MOE_LOWBIT_HLE_JUDGE_URL")
    if not url or url == "none":
        return None
    model = options.get("judge_model") or os.environ.get("MOE_LOWBIT_HLE_JUDGE_MODEL")
    if not model:
        raise ValueError("hle: a judge URL was given but no judge model; set judge_model= or MOE_LOWBIT_HLE_JUDGE_MODEL")
    return JudgeConfig(url=url, model=model,
                       api_key_env=options.get("judge_api_key_env", "MOE_LOWBIT_JUDGE_API_KEY"))


def _mc_letters_in(question: str) -> str:
    found = re.findall(r"^\s*\(?([A-Z])[.)]\s", question, re.MULTILINE)
    letters = "".join(dict.fromkeys(found))
    return letters if len(letters) >= 2 else "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _hle_sample(spec, row, index, source, options):
    if str(column(spec, row, "image", "") or "").strip():
        return None  # text-only evaluation: rows with an image are skipped
    answer_type = str(column(spec, row, "answer_type"))
    if answer_type not in ("exactMatch", "multipleChoice"):
        raise ValueError(f"hle row {index}: unknown answer_type {answer_type!r}")
    question = str(column(spec, row, "question"))
    judge = hle_judge(options)
    return Sample(id=f"hle/{column(spec, row, 'id', index)}", bench=spec.name,
                  messages=_message(spec.prompt(question, answer_type)),
                  gold=str(column(spec, row, "answer")).strip(),
                  meta={"answer_type": answer_type, "category": column(spec, row, "category"),
                        "question": question, "letters": _mc_letters_in(question) if answer_type == "multipleChoice" else None,
                        "judge": None if judge is None else {"url": judge.url, "model": judge.model,
                                                             "api_key_env": judge.api_key_env}},
                  group=column(spec, row, "category"))


def _grade_hle(sample: Sample, output: str) -> Graded:
    j = sample.meta.get("judge")
    judge = JudgeConfig(j["url"], j["model"], j.get("api_key_env", "MOE_LOWBIT_JUDGE_API_KEY")) if j else None
    return graders.grade_hle(sample.gold, sample.meta["answer_type"], sample.meta["question"], output, judge,
                             letters=sample.meta.get("letters") or extractors.LETTERS)


def _extract_hle(output: str) -> str | None:
    return extractors.extract_final_line(output)


# ------------------------------------------------------------------------------------------ registry

BENCHMARKS: dict = {spec.name: spec for spec in (
    BenchSpec("mmlu_pro", "MMLU-Pro: 10-option multiple choice, 14 categories",
              "TIGER-Lab/MMLU-Pro", None, "test", 1000,
              {"id": ("question_id",), "question": ("question",), "options": ("options",), "answer": ("answer",),
               "answer_index": ("answer_index",), "category": ("category",), "src": ("src",)},
              mc_prompt, _mmlu_pro_sample, extractors.extract_choice, _grade_mc),
    BenchSpec("gpqa", "GPQA diamond: 4-option graduate science, options shuffled per question",
              "Idavidrein/gpqa", "gpqa_diamond", "train", None,
              {"id": ("Record ID",), "question": ("Question",), "correct": ("Correct Answer",),
               "wrong1": ("Incorrect Answer 1",), "wrong2": ("Incorrect Answer 2",), "wrong3": ("Incorrect Answer 3",),
               "domain": ("High-level domain",), "subdomain": ("Subdomain",)},
              mc_prompt, _gpqa_sample, extractors.extract_choice, _grade_mc),
    BenchSpec("mmmlu", "MMMLU: MMLU professionally translated into 14 languages; grouped per locale",
              "openai/MMMLU", None, "test", 100,
              {"id": ("Unnamed: 0", "__index_level_0__"), "question": ("Question",), "A": ("A",), "B": ("B",),
               "C": ("C",), "D": ("D",), "answer": ("Answer",), "subject": ("Subject",)},
              mmmlu_prompt, _mmmlu_sample, extractors.extract_choice, _grade_mc,
              options=("locales",), sources=_mmmlu_sources, n_is_per_part=True),
    BenchSpec("math500", "MATH-500: last \\boxed{} answer, equivalence by math-verify",
              "HuggingFaceH4/MATH-500", None, "test", None,
              {"id": ("unique_id",), "problem": ("problem",), "answer": ("answer",), "subject": ("subject",),
               "level": ("level",)},
              math_prompt, _math500_sample, extractors.extract_math_answer,
              lambda s, o: graders.grade_math(s.gold, o)),
    BenchSpec("aime", "AIME 2024/2025/2026: integer answers 0-999, one part per year",
              "per-year (AIME_DATASETS)", None, "train", None,
              {"id": ("id", "problem_idx", "ID"), "problem": ("problem", "Problem", "question"),
               "answer": ("answer", "Answer")},
              math_prompt, _aime_sample, extractors.extract_integer,
              lambda s, o: graders.grade_integer(s.gold, o),
              options=("years", "aime_datasets"), sources=_aime_sources, n_is_per_part=True),
    BenchSpec("lcb", "LiveCodeBench code generation (lite), stdin and functional problems",
              "livecodebench/code_generation_lite", None, "train", None,
              {"id": ("question_id",), "title": ("question_title",), "question": ("question_content",),
               "platform": ("platform",), "date": ("contest_date",), "starter_code": ("starter_code",),
               "difficulty": ("difficulty",), "public_tests": ("public_test_cases",),
               "private_tests": ("private_test_cases",), "metadata": ("metadata",)},
              lcb_prompt, _lcb_sample, extractors.extract_code, _grade_lcb,
              options=("release", "date_from", "date_to", "timeout_s"), sources=_lcb_sources, needs_sandbox=True),
    BenchSpec("humaneval", "HumanEval: 164 functions, graded by their unit tests",
              "openai/openai_humaneval", None, "test", None,
              {"id": ("task_id",), "prompt": ("prompt",), "test": ("test",), "entry_point": ("entry_point",)},
              humaneval_prompt, _humaneval_sample, extractors.extract_code, _grade_humaneval,
              options=("timeout_s",), needs_sandbox=True),
    BenchSpec("mbpp", "MBPP sanitized (test split, 257): functions graded by their asserts",
              "google-research-datasets/mbpp", "sanitized", "test", None,
              {"id": ("task_id",), "task": ("prompt", "text"), "tests": ("test_list",),
               "setup": ("test_imports", "test_setup_code")},
              mbpp_prompt, _mbpp_sample, extractors.extract_code, _grade_mbpp,
              options=("timeout_s",), needs_sandbox=True),
    BenchSpec("hle", "Humanity's Last Exam, text-only, no tools; judge optional",
              "cais/hle", None, "test", None,
              {"id": ("id",), "question": ("question",), "answer": ("answer",), "answer_type": ("answer_type",),
               "image": ("image",), "category": ("category",)},
              hle_prompt, _hle_sample, _extract_hle, _grade_hle,
              options=("judge_url", "judge_model", "judge_api_key_env")),
)}


# ------------------------------------------------------------------------------------------- loading

def default_source(spec: BenchSpec, options: dict) -> list:
    return [Source(None, options.get("dataset", spec.dataset), options.get("config", spec.config),
                   options.get("split", spec.split), options.get("revision", spec.dataset_revision))]


def read_rows(path: str | Path) -> list:
    """Rows of a local file in the dataset's own schema: .jsonl, .json (a list, or {"rows": [...]}), .parquet."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data_file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        return data["rows"] if isinstance(data, dict) else data
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise ValueError(f"data_file {path}: unsupported suffix {suffix!r}; use .jsonl, .json or .parquet")


def hub_rows(source: Source, columns: set | None = None) -> list:
    """Rows from the Hugging Face hub (needs network or a warm HF cache). Only `columns` are kept, so
    image columns (HLE) are never decoded and big unused text fields never held."""
    if source.hub_files:
        # LCB: plain jsonl files, read line by line (rows are up to tens of MB; no arrow schema inference).
        from huggingface_hub import hf_hub_download

        rows = []
        for name in source.hub_files:
            path = hf_hub_download(source.dataset, name, repo_type="dataset", revision=source.revision)
            rows.extend(read_rows(path))
        return rows
    import datasets

    ds = datasets.load_dataset(source.dataset, source.config, split=source.split, revision=source.revision)
    if columns:
        ds = ds.select_columns([c for c in ds.column_names if c in columns])
    return [dict(row) for row in ds]


def select_subset(items: list, n: int | None, seed: int) -> list:
    """A seeded random subset of size n, kept in dataset order; nested (the n=50 subset contains n=20's)."""
    if n is None or n >= len(items):
        return list(items)
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return [items[i] for i in sorted(order[:n])]


def _check_options(spec: BenchSpec, options: dict) -> None:
    allowed = set(COMMON_OPTIONS) | set(spec.options)
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"{spec.name}: unknown option(s) {unknown}; this benchmark takes {sorted(allowed)}")


def load_samples(bench: str, n: int | None = None, data_file: str | None = None, seed: int = 0,
                 **options) -> list:
    """Samples of one benchmark: from `data_file` when given (offline), else from the hub.

    n=None uses the spec's default_n (None = all rows); for benchmarks with parts (MMMLU locales, AIME
    years) n counts per part. The subset is a deterministic function of (rows, n, seed).
    """
    if bench not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {bench!r}; known: {sorted(BENCHMARKS)}")
    spec = BENCHMARKS[bench]
    _check_options(spec, options)
    if n is not None and n <= 0:
        raise ValueError(f"n must be a positive count or None (spec default), got {n}")
    n = spec.default_n if n is None else n
    opts = {**options, "_seed": seed}
    samples = []
    for source in (spec.sources or default_source)(spec, options):
        if data_file:
            path = str(data_file).replace("{part}", source.part or "")
            rows = read_rows(path)
        else:
            rows = hub_rows(source, {c for names in spec.fields.values() for c in names})
        part = [s for i, row in enumerate(rows) if (s := spec.make_sample(spec, row, i, source, opts)) is not None]
        if spec.n_is_per_part:
            part = select_subset(part, n, seed)
        samples.extend(part)
    if not spec.n_is_per_part:
        samples = select_subset(samples, n, seed)
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ValueError(f"{bench}: sample ids are not unique (e.g. {dup}); the data has duplicate id columns")
    return samples


def source_info(bench: str, data_file: str | None = None, **options) -> dict:
    """What load_samples reads, for provenance: hub ids/configs/revisions, or local files with sha256."""
    import provenance

    spec = BENCHMARKS[bench]
    _check_options(spec, options)
    out = []
    for source in (spec.sources or default_source)(spec, options):
        if data_file:
            path = str(data_file).replace("{part}", source.part or "")
            out.append({"part": source.part, "data_file": path, "sha256": provenance.sha256_file(Path(path))})
        else:
            out.append({"part": source.part, "dataset": source.dataset, "config": source.config,
                        "split": source.split, "revision": source.revision or "latest",
                        "files": list(source.hub_files) or None})
    return {"bench": bench, "sources": out, "options": {k: v for k, v in options.items()}}


# ------------------------------------------------------------------------------------------- grading

def grade_output(sample: Sample, output: str) -> Graded:
    """Grade one output. Never raises: a grader failure is a wrong answer with the error in detail."""
    try:
        if not isinstance(output, str):
            return graders.no_answer(error=f"output is {type(output).__name__}, not str")
        return BENCHMARKS[sample.bench].grade(sample, output)
    except Exception as exc:  # last line of defence: one bad sample must not stop a whole eval
        return Graded(None, False, False, {"error": f"grader crashed: {type(exc).__name__}: {str(exc)[:300]}"})


def grading_environment(benches) -> dict:
    """Call once before an eval: raises if a code benchmark is asked for and no sandbox can run here
    (rather than scoring every program wrong), and returns what to record in the results' provenance."""
    out = {"math_verify": _math_verify_version()}
    if any(BENCHMARKS[b].needs_sandbox for b in benches):
        out["sandbox"] = sandbox.detect_isolation().describe()
    return out


def _math_verify_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("math-verify")
    except metadata.PackageNotFoundError:
        return None  # graders fall back to sympy; detail["method"] says so per sample


def _grade_pair(pair):
    return grade_output(*pair)


def grade_many(samples, outputs, workers: int | None = None, progress: bool = True) -> list:
    """grade_output over many samples in parallel worker processes (spawned: safe next to torch/vLLM, and
    each worker's main thread keeps math-verify's timeouts working). Order is preserved."""
    samples, outputs = list(samples), list(outputs)
    if len(samples) != len(outputs):
        raise ValueError(f"grade_many: {len(samples)} samples but {len(outputs)} outputs")
    workers = (os.cpu_count() or 1) if workers is None else int(workers)
    grading_environment({s.bench for s in samples if s.bench in BENCHMARKS})
    pairs = list(zip(samples, outputs))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(pairs), desc="grading", unit="sample")
    results = []
    try:
        if workers <= 1 or len(pairs) <= 1:
            for pair in pairs:
                results.append(_grade_pair(pair))
                bar and bar.update(1)
            return results
        import multiprocessing

        try:
            with ProcessPoolExecutor(max_workers=min(workers, len(pairs)),
                                     mp_context=multiprocessing.get_context("spawn")) as pool:
                for graded in pool.map(_grade_pair, pairs, chunksize=max(1, len(pairs) // (8 * workers))):
                    results.append(graded)
                    bar and bar.update(1)
        except BrokenProcessPool:
            results = results + [_grade_pair(p) for p in pairs[len(results):]]  # a worker died: finish serially
        return results
    finally:
        if bar is not None:
            bar.close()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="List the benchmarks, or load one and print its first prompts "
                                             "(a quick check that a data file or hub id is readable).")
    ap.add_argument("bench", nargs="?", help=f"one of {sorted(BENCHMARKS)}; omit to list them")
    ap.add_argument("--n", type=int, default=3)
    ap.add_argument("--data-file")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not args.bench:
        for spec in BENCHMARKS.values():
            print(f"{spec.name:10s} {spec.dataset}:{spec.config or '-'}:{spec.split}  n={spec.default_n or 'all'}  "
                  f"{spec.description}")
        return
    for s in load_samples(args.bench, n=args.n, data_file=args.data_file, seed=args.seed):
        print(json.dumps({"id": s.id, "group": s.group, "prompt": s.messages[-1]["content"][:400]}, ensure_ascii=False))


if __name__ == "__main__":
    main()
