"""Humanity's Last Exam, text only: an LLM judge decides when one is configured (the official rule);
without a judge, letters for multiple choice and normalized string match for exact answers.
"""
from __future__ import annotations

import os
import re

import bench_extract
import bench_grade
from bench_spec import BenchSpec, OfficialScorer, Sample, column, user_message
from bench_grade import Graded, JudgeConfig


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
                  messages=user_message(spec.prompt(question, answer_type)),
                  gold=str(column(spec, row, "answer")).strip(),
                  meta={"answer_type": answer_type, "category": column(spec, row, "category"),
                        "question": question, "letters": _mc_letters_in(question) if answer_type == "multipleChoice" else None,
                        "judge": None if judge is None else {"url": judge.url, "model": judge.model,
                                                             "api_key_env": judge.api_key_env}},
                  group=column(spec, row, "category"))


def grade_hle(sample: Sample, output: str) -> Graded:
    j = sample.meta.get("judge")
    judge = JudgeConfig(j["url"], j["model"], j.get("api_key_env", "MOE_LOWBIT_JUDGE_API_KEY")) if j else None
    return bench_grade.grade_hle(sample.gold, sample.meta["answer_type"], sample.meta["question"], output, judge,
                             letters=sample.meta.get("letters") or bench_extract.LETTERS)


def extract_hle(output: str) -> str | None:
    return bench_extract.extract_final_line(output)


SPECS = (
    BenchSpec("hle", "Humanity's Last Exam, text-only, no tools; judge optional",
              "cais/hle", None, "test", None,
              {"id": ("id",), "question": ("question",), "answer": ("answer",), "answer_type": ("answer_type",),
               "image": ("image",), "category": ("category",)},
              hle_prompt, _hle_sample, extract_hle, grade_hle,
              official=OfficialScorer("llm-judge", "HLE's judge prompt decides (bench_grade.grade_hle); without a "
                                      "judge the string/letter fallback is not the official rule", exact=False),
              required=("question", "answer", "answer_type"),
              options=("judge_url", "judge_model", "judge_api_key_env")),
)
