"""Multiple-choice benchmarks: MMLU-Pro (10 options), GPQA-Diamond (4, shuffled per question), MMMLU (14 locales).

Robust grading uses bench_extract.extract_choice; the official scorer is each benchmark's own cascade
(bench_cascades.py). Both verdicts land in every sample record.
"""
from __future__ import annotations

import random

import bench_cascades
import bench_extract
import bench_grade
from bench_spec import BenchSpec, OfficialScorer, Sample, Source, column, user_message
from bench_grade import Graded


def _options_block(options: list) -> str:
    return "\n".join(f"{bench_extract.LETTERS[i]}. {str(opt).strip()}" for i, opt in enumerate(options))


def mc_prompt(question: str, options: list, subject: str | None = None, marker_line: str | None = None) -> str:
    letters = ", ".join(bench_extract.LETTERS[: len(options)])
    head = f"The following is a multiple choice question about {subject}.\n\n" if subject else ""
    finish = marker_line or 'The answer is (X)'
    return (f"{head}Question: {question.strip()}\n\nOptions:\n{_options_block(options)}\n\n"
            f"Think step by step, then finish with a line of the form \"{finish}\" where X is one of {letters}.")


def grade_mc(sample: Sample, output: str) -> Graded:
    letters = bench_extract.LETTERS[: sample.meta["n_options"]]
    return bench_grade.grade_choice(sample.gold, output, letters)


def grade_cascade(cascade: bench_cascades.Cascade, sample: Sample, output: str) -> Graded:
    """A verdict from an official cascade; detail names the stage that answered (or 'guess')."""
    got = bench_cascades.run_cascade(cascade, output)
    detail = {"scorer": cascade.name, "stage": got.stage}
    if got.letter is None:
        if cascade.fallback == "seeded_guess":  # drawn per run, in order: bench_cascades.stream_guesses
            detail.update(guess_options=int(sample.meta["n_options"]), guess_seed=cascade.guess_seed)
        return Graded(None, False, True, detail)
    return Graded(got.letter, got.letter == sample.gold, False, detail)


def _official(cascade: bench_cascades.Cascade) -> OfficialScorer:
    return OfficialScorer(cascade.name, cascade.source, lambda s, o: grade_cascade(cascade, s, o))


# ------------------------------------------------------------------------------------------- MMLU-Pro
def _mmlu_pro_sample(spec, row, index, source, options):
    opts = list(column(spec, row, "options"))
    answer_index = column(spec, row, "answer_index")
    if answer_index is None:
        letter = str(column(spec, row, "answer", "")).strip()
        if letter not in bench_extract.LETTERS:
            raise ValueError(f"field 'answer' is {letter!r}, not one of {bench_extract.LETTERS}")
        answer_index = bench_extract.LETTERS.index(letter)
    answer_index = int(answer_index)
    kept = [i for i, o in enumerate(opts) if str(o).strip() != "N/A"]  # MMLU-Pro pads with "N/A"
    if answer_index not in kept:
        raise ValueError(f"field 'answer_index': gold option {answer_index} is missing or 'N/A'")
    shown = [opts[i] for i in kept]
    category = column(spec, row, "category", "unknown")
    qid = column(spec, row, "id", index)
    return Sample(id=f"mmlu_pro/{qid}", bench=spec.name,
                  messages=user_message(spec.prompt(column(spec, row, "question"), shown, subject=category)),
                  gold=bench_extract.LETTERS[kept.index(answer_index)],
                  meta={"category": category, "n_options": len(shown), "src": column(spec, row, "src")},
                  group=category)


# ----------------------------------------------------------------------------------------------- GPQA
def gpqa_permutation(seed: int, record_id: str) -> list:
    """Display order of the four answers, as indices into [correct, wrong1, wrong2, wrong3].
    Seeded per question so it is stable across runs and machines (str seeds hash with SHA-512)."""
    order = [0, 1, 2, 3]
    random.Random(f"gpqa:{seed}:{record_id}").shuffle(order)
    return order


def gpqa_prompt(question: str, options: list) -> str:
    """GPQA's own answer format is a parenthesised letter: "The answer is (X)" matches its parser."""
    return mc_prompt(question, options)


def _gpqa_sample(spec, row, index, source, options):
    answers = [column(spec, row, role) for role in ("correct", "wrong1", "wrong2", "wrong3")]
    rid = str(column(spec, row, "id", index))
    seed = int(options.get("_seed", 0))
    order = gpqa_permutation(seed, rid)
    shown = [str(answers[k]).strip() for k in order]
    return Sample(id=f"gpqa/{rid}", bench=spec.name,
                  messages=user_message(spec.prompt(str(column(spec, row, "question")), shown)),
                  gold=bench_extract.LETTERS[order.index(0)],
                  meta={"permutation": order, "permutation_seed": seed, "n_options": 4,
                        "domain": column(spec, row, "domain"), "subdomain": column(spec, row, "subdomain")},
                  group=column(spec, row, "domain"))


# ---------------------------------------------------------------------------------------------- MMMLU
MMMLU_LOCALES = tuple(bench_extract.LOCALE_ANSWER_MARKERS)


def mmmlu_prompt(question: str, options: list, locale: str) -> str:
    marker = bench_extract.LOCALE_ANSWER_MARKERS[locale][0]
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
                  messages=user_message(spec.prompt(str(column(spec, row, "question")), opts, locale)),
                  gold=str(column(spec, row, "answer")).strip(),
                  meta={"locale": locale, "subject": column(spec, row, "subject"), "n_options": 4},
                  group=locale)


SPECS = (
    BenchSpec("mmlu_pro", "MMLU-Pro: 10-option multiple choice, 14 categories",
              "TIGER-Lab/MMLU-Pro", None, "test", 1000,
              {"id": ("question_id",), "question": ("question",), "options": ("options",), "answer": ("answer",),
               "answer_index": ("answer_index",), "category": ("category",), "src": ("src",)},
              mc_prompt, _mmlu_pro_sample, bench_extract.extract_choice, grade_mc,
              official=_official(bench_cascades.MMLU_PRO_OFFICIAL), required=("question", "options", "answer")),
    BenchSpec("gpqa", "GPQA diamond: 4-option graduate science, options shuffled per question",
              "Idavidrein/gpqa", "gpqa_diamond", "train", None,
              {"id": ("Record ID",), "question": ("Question",), "correct": ("Correct Answer",),
               "wrong1": ("Incorrect Answer 1",), "wrong2": ("Incorrect Answer 2",), "wrong3": ("Incorrect Answer 3",),
               "domain": ("High-level domain",), "subdomain": ("Subdomain",)},
              gpqa_prompt, _gpqa_sample, bench_extract.extract_choice, grade_mc,
              official=_official(bench_cascades.GPQA_OFFICIAL),
              required=("question", "correct", "wrong1", "wrong2", "wrong3")),
    BenchSpec("mmmlu", "MMMLU: MMLU professionally translated into 14 languages; grouped per locale",
              "openai/MMMLU", None, "test", 100,
              {"id": ("Unnamed: 0", "__index_level_0__"), "question": ("Question",), "A": ("A",), "B": ("B",),
               "C": ("C",), "D": ("D",), "answer": ("Answer",), "subject": ("Subject",)},
              mmmlu_prompt, _mmmlu_sample, bench_extract.extract_choice, grade_mc,
              official=_official(bench_cascades.MMMLU_OFFICIAL),
              required=("question", "A", "B", "C", "D", "answer"),
              options=("locales",), sources=_mmmlu_sources, n_is_per_part=True),
)
