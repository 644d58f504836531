"""The shape of one benchmark: what a sample is, where a dataset part lives, and the declarative spec.

The families (bench_mc, bench_math, bench_code, bench_hle) fill in `BenchSpec`s; bench_registry collects
them and loads rows. Nothing here does I/O.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

COMMON_OPTIONS = ("dataset", "config", "split", "revision")


class DataFileError(ValueError):
    """A data row that cannot become a sample; the message names the file, the line and the field."""


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
class OfficialScorer:
    """How the benchmark's own published code scores an output.

    `grade` is (sample, output) -> Graded; None means the spec's own grader *is* the official rule (unit
    tests, an LLM judge). The gate compares against model-card numbers, so it uses this scorer.
    """
    name: str
    source: str  # where the rule is published
    grade: Callable | None = None
    exact: bool = True  # False: no faithful re-implementation here; the gate says it used an approximation


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
    grade: Callable  # (sample, output) -> Graded: our robust cascade
    official: OfficialScorer  # the benchmark's own scoring rule (see OfficialScorer)
    required: tuple = ()  # roles every row must have; checked at load, the error names file/line/field
    dataset_revision: str | None = None
    options: tuple = ()  # benchmark-specific load_samples options (checked: a typo fails early)
    sources: Callable | None = None  # (spec, options) -> [Source]; None = one Source from the fields above
    n_is_per_part: bool = False
    needs_sandbox: bool = False  # grading executes model code (the sandbox is checked before the run)
    extra: dict = field(default_factory=dict)


def column(spec: BenchSpec, row: dict, role: str, default=None):
    for name in spec.fields[role]:
        if name in row and row[name] is not None:
            return row[name]
    return default


def missing_roles(spec: BenchSpec, row: dict) -> list:
    """Required roles absent from a row, as the column names the dataset would use."""
    return [spec.fields[role][0] for role in spec.required if column(spec, row, role) is None]


def user_message(text: str) -> tuple:
    return ({"role": "user", "content": text},)
