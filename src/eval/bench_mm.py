"""Multimodal benchmarks: MMMU-Pro (standard 10-option and vision settings) and MATH-Vision.

Images are decoded from the dataset (or read from paths beside a local data file), hashed, and placed
in the user message at the question's own markers (``<image 1>`` in MMMU-Pro, ``<image1>`` in
MATH-Vision); images without a marker go before the text, the order the Qwen-VL / Gemma cards use.
The family's chat template then puts its image tokens where it expects them (mm_images.hf_messages,
or the server's template for image_url parts). A row whose image is missing or corrupt becomes a
sample with ``meta["input_error"]``: it is not sent to the model and is scored wrong with that reason.

Grading is the text harness's: MMMU-Pro is a letter (robust: bench_extract.extract_choice; official: the
"Answer: X" cascade with MMMU's random-guess fallback); MATH-Vision is answer-type aware (a letter when
the question has options, else a value compared by math-verify).
"""
from __future__ import annotations

import ast
import re

import bench_extract
import bench_grade
import mm_images
from bench_cascades import Cascade, Stage
from bench_math import grade_math_verify_whole_output
from bench_mc import grade_cascade
from bench_spec import BenchSpec, OfficialScorer, Sample, Source, column
from bench_grade import Graded

MMMU_PRO_DATASET = "MMMU/MMMU_Pro"
# Pinned hub commits (datasets.load_dataset(..., revision=...); override with --option BENCH.revision=REF,
# recorded in provenance). No public eval framework pins one (lmms-eval's mmmu_pro_* / mathvision_* task
# yamls name only the repo), so these are read from the hub's own commit pages (docs/BENCHMARKS.md):
# MMMU_Pro cd9382d = the newest commit seen whose tree holds the "standard (10 options)", "standard (4
# options)" and "vision" configs (huggingface.co/datasets/MMMU/MMMU_Pro/tree/cd9382dd...). MathVision
# 14b5e86 = a README-only commit after the data upload ac21b30 (its configs/data/ folder was last changed by
# ac21b30: the test/testmini parquet the 2025-26 model cards evaluated), before the 2026 answer fixes.
MMMU_PRO_REVISION = "cd9382dd4f8fa7704aa1007f004bfa63aabde6fc"
MATH_VISION_REVISION = "14b5e86a95856c4231a056b82f658584eae2b309"
MMMU_PRO_CONFIGS = {"standard": "standard (10 options)", "vision": "vision"}
MMMU_PRO_IMAGE_FIELDS = tuple(f"image_{i}" for i in range(1, 8))
_MMMU_MARKER = re.compile(r"<image (\d+)>")
_MATHV_MARKER = re.compile(r"<image(\d+)>")

MMMU_PRO_OFFICIAL = Cascade(
    name="mmmu_pro/answer-line",
    source="github.com/MMMU-Benchmark/MMMU mmmu-pro (CoT prompt asks for a final 'Answer: X' line; "
           "unparsed responses get a random option, as MMMU's parse_multi_choice_response does)",
    stages=(Stage(r"[Aa]nswer:\s*\**\(?([A-J])\)?", pick="last"),
            Stage(r"\(([A-J])\)", pick="last"),
            Stage(r"\b[A-J]\b(?!.*\b[A-J]\b)", re.DOTALL, group=0)),
    valid="ABCDEFGHIJ", fallback="seeded_guess", guess_seed=42)


def _input_error_verdict(sample: Sample) -> Graded | None:
    reason = sample.meta.get("input_error")
    return None if not reason else Graded(None, False, True, {"input_error": reason})


def _guard_input(grade):
    """A sample whose input could not be built is wrong, with its reason in grade_detail."""
    def graded(sample, output):
        return _input_error_verdict(sample) or grade(sample, output)
    return graded


def _options_list(raw) -> list:
    """MMMU-Pro stores options as a Python-literal string ("['a', 'b']"); MATH-Vision as a list."""
    if raw is None:
        return []
    if isinstance(raw, str):
        raw = raw.strip()
        if not raw:
            return []
        value = ast.literal_eval(raw)
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"field 'options' is {type(value).__name__}, expected a list")
        return [str(v) for v in value]
    return [str(v) for v in raw]


def _options_block(options: list) -> str:
    return "\n".join(f"{bench_extract.LETTERS[i]}. {opt.strip()}" for i, opt in enumerate(options))


def _segments(text: str, marker: re.Pattern, shas: dict) -> list:
    """[("text"|"image", value)]: images at their markers; unreferenced images first."""
    used = {int(m.group(1)) for m in marker.finditer(text) if int(m.group(1)) in shas}
    out = [("image", shas[k]) for k in sorted(shas) if k not in used]
    pos = 0
    for m in marker.finditer(text):
        k = int(m.group(1))
        if k not in shas:
            continue
        out.append(("text", text[pos:m.start()]))
        out.append(("image", shas[k]))
        pos = m.end()
    out.append(("text", text[pos:]))
    return out


def _image_meta(cells: list, options: dict) -> tuple[dict, dict]:
    """({index: sha}, meta fields) of a row's image cells [(index, field, value)]."""
    infos, blobs, error = mm_images.load_images([(f, v) for _k, f, v in cells], options.get("_data_dir"))
    shas = {k: info["sha256"] for (k, _f, _v), info in zip(cells, infos) if info.get("sha256")}
    meta = {"images": infos, "image_data": tuple(blobs), "input_error": error}
    return shas, meta


# ------------------------------------------------------------------------------------------- MMMU-Pro
def mmmu_pro_prompt(question: str, options: list, setting: str) -> str:
    letters = ", ".join(bench_extract.LETTERS[: max(len(options), 1)])
    finish = (f"Think step by step, then end with a line of the form \"Answer: X\" where X is one of "
              f"{letters}.")
    if setting == "vision":
        return ("The image shows a multiple-choice question and its options. Read it and answer it.\n\n"
                + finish)
    return f"Question: {question.strip()}\n\nOptions:\n{_options_block(options)}\n\n{finish}"


def _mmmu_pro_sources(spec, options):
    settings = options.get("settings") or tuple(MMMU_PRO_CONFIGS)
    settings = (settings,) if isinstance(settings, str) else tuple(settings)
    bad = [s for s in settings if s not in MMMU_PRO_CONFIGS]
    if bad:
        raise ValueError(f"mmmu_pro: unknown setting(s) {bad}; choose from {list(MMMU_PRO_CONFIGS)}")
    return [Source(s, options.get("dataset", spec.dataset), MMMU_PRO_CONFIGS[s], options.get("split", spec.split),
                   options.get("revision", spec.dataset_revision)) for s in settings]


def _mmmu_pro_sample(spec, row, index, source, options):
    setting = source.part or "standard"
    opts = _options_list(column(spec, row, "options"))
    if not 2 <= len(opts) <= 10:
        raise ValueError(f"field 'options' has {len(opts)} entries; MMMU-Pro questions have 2-10")
    gold = str(column(spec, row, "answer", "")).strip()
    if gold not in bench_extract.LETTERS[: len(opts)]:
        raise ValueError(f"field 'answer' is {gold!r}, not one of the {len(opts)} option letters")
    qid = column(spec, row, "id", index)
    question = str(column(spec, row, "question", "") or "")
    if setting == "vision":
        cells = [(1, "image", column(spec, row, "image"))]
    else:
        cells = [(i, f, row.get(f)) for i, f in enumerate(MMMU_PRO_IMAGE_FIELDS, start=1) if row.get(f) is not None]
        wanted = {int(m.group(1)) for m in _MMMU_MARKER.finditer(question)}
        cells += [(k, f"image_{k}", None) for k in sorted(wanted - {c[0] for c in cells})]  # referenced, absent
        if not cells:
            cells = [(1, "image_1", None)]
    shas, meta = _image_meta(cells, options)
    text = spec.prompt(question, opts, setting)
    segments = [("image", shas[k]) for k in sorted(shas)] + [("text", text)] if setting == "vision" else \
        _segments(text, _MMMU_MARKER, shas)
    return Sample(id=f"mmmu_pro/{setting}/{qid}", bench=spec.name, messages=mm_images.user_content(segments),
                  gold=gold, meta={**meta, "setting": setting, "n_options": len(opts),
                                   "subject": column(spec, row, "subject")},
                  group=setting)


def _grade_letter(sample, output):
    return bench_grade.grade_choice(sample.gold, output, bench_extract.LETTERS[: sample.meta["n_options"]])


# ----------------------------------------------------------------------------------------- MATH-Vision
def math_vision_prompt(question: str, options: list) -> str:
    if options:
        return (f"{question.strip()}\n\nOptions:\n{_options_block(options)}\n\nReason step by step, and put "
                f"the letter of the correct option within \\boxed{{}}.")
    return f"{question.strip()}\n\nReason step by step, and put your final answer within \\boxed{{}}."


def _math_vision_sample(spec, row, index, source, options):
    opts = _options_list(column(spec, row, "options"))
    answer = str(column(spec, row, "answer", "")).strip()
    if opts:
        if answer not in bench_extract.LETTERS[: len(opts)]:
            raise ValueError(f"field 'answer' is {answer!r}, not one of the {len(opts)} option letters")
    elif not answer:
        raise ValueError("field 'answer' is empty")
    question = str(column(spec, row, "question"))
    cells = [(1, "decoded_image" if row.get("decoded_image") is not None else "image", column(spec, row, "image"))]
    shas, meta = _image_meta(cells, options)
    segments = _segments(spec.prompt(question, opts), _MATHV_MARKER, shas)
    qid = column(spec, row, "id", index)
    return Sample(id=f"math_vision/{qid}", bench=spec.name, messages=mm_images.user_content(segments),
                  gold=answer, meta={**meta, "answer_type": "choice" if opts else "free_form",
                                     "n_options": len(opts), "level": column(spec, row, "level"),
                                     "subject": column(spec, row, "subject")},
                  group=column(spec, row, "subject"))


def grade_math_vision(sample, output):
    if sample.meta["answer_type"] == "choice":
        return _grade_letter(sample, output)
    return bench_grade.grade_math(str(sample.gold), output)


def official_math_vision(sample, output):
    """MC: the boxed / stated option letter; free form: math-verify on the whole output."""
    if sample.meta["answer_type"] == "choice":
        return _grade_letter(sample, output)
    return grade_math_verify_whole_output(sample, output)


SPECS = (
    BenchSpec("mmmu_pro", "MMMU-Pro: standard 10-option + vision (question inside the image) settings; "
              "acc = mean over the two settings (the MMMU-Pro overall score)",
              MMMU_PRO_DATASET, MMMU_PRO_CONFIGS["standard"], "test", None,
              {"id": ("id",), "question": ("question",), "options": ("options",), "answer": ("answer",),
               "image": ("image",), "subject": ("subject",),
               **{f: (f,) for f in MMMU_PRO_IMAGE_FIELDS}},
              mmmu_pro_prompt, _mmmu_pro_sample, bench_extract.extract_choice, _guard_input(_grade_letter),
              official=OfficialScorer(MMMU_PRO_OFFICIAL.name, MMMU_PRO_OFFICIAL.source,
                                      _guard_input(lambda s, o: grade_cascade(MMMU_PRO_OFFICIAL, s, o)),
                                      exact=False),
              required=("options", "answer"), dataset_revision=MMMU_PRO_REVISION, options=("settings",),
              sources=_mmmu_pro_sources,
              n_is_per_part=True, extra={"modality": "image"}),
    BenchSpec("math_vision", "MATH-Vision: competition math with figures; option letter or free-form value "
              "(math-verify)", "MathLLMs/MathVision", None, "test", None,
              {"id": ("id",), "question": ("question",), "options": ("options",), "answer": ("answer",),
               "image": ("decoded_image", "image"), "level": ("level",), "subject": ("subject",)},
              math_vision_prompt, _math_vision_sample, bench_extract.extract_math_answer,
              _guard_input(grade_math_vision),
              official=OfficialScorer("math_vision/answer-type", "github.com/mathllm/MATH-V (multiple choice: "
                                      "the option letter; free form: value equality, here via math-verify)",
                                      _guard_input(official_math_vision), exact=False),
              required=("question", "answer"), dataset_revision=MATH_VISION_REVISION, extra={"modality": "image"}),
)

MULTIMODAL = tuple(s.name for s in SPECS)
