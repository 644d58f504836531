"""Answer cascades as data: the benchmarks' own (official) multiple-choice scorers, one table entry each.

A cascade is an ordered list of regex stages. Each stage runs `re.search` (pick "first") or takes the last
of `re.finditer` (pick "last") on the whole output; if the captured letter is a valid one the stage has
answered, otherwise the next stage runs (a stage does not look for a second match). When no stage
answers, the cascade's fallback decides: "none" (no answer, scored wrong) or "seeded_guess" (a uniform
random option, seeded, as MMLU-Pro's script does). Every answer records which stage found it.

The regexes are the published definitions (docs/BENCHMARKS.md gives the sources). Our robust cascade
(bench_extract.extract_choice) is separate code; results report both, and how often they disagree.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    pattern: str
    flags: int = 0
    pick: str = "first"  # first | last
    group: int = 1


@dataclass(frozen=True)
class Cascade:
    name: str
    source: str
    stages: tuple
    valid: str  # letters a stage may return (independent of how many options a question shows)
    fallback: str = "none"  # none | seeded_guess
    guess_seed: int = 0
    text_replacements: tuple = ()  # (old, new) applied to the output, in order, before any stage
    letter_map: tuple = ()  # (old, new) applied to a captured letter, then stripped (script letters -> A-D)
    first_match_decides: bool = False  # a matching stage ends the cascade even when its letter is not valid


@dataclass(frozen=True)
class CascadeAnswer:
    letter: str | None
    stage: str  # "stage1".., "guess", or "none"


def _first_line_last_answer(text: str):
    """`re.search(r".*[aA]nswer:\\s*([A-J])", text)` in one pass: the search starts where the first line
    holding an occurrence starts, and the greedy `.*` then settles on that line's last occurrence."""
    line_end, found = None, None
    for m in _ANSWER_COLON.finditer(text):  # overlapping: a lookahead, so "answer: Answer: B" has two
        if line_end is None:
            line_end = text.find("\n", m.start())
        elif line_end != -1 and m.start() > line_end:
            break
        found = m
    return found


def _last_standalone_letter(text: str):
    """`re.search(r"\\b[A-J]\\b(?!.*\\b[A-J]\\b)", text, re.DOTALL)` in one pass: the last such letter."""
    found = None
    for found in _STANDALONE_LETTER.finditer(text):
        pass
    return found


_ANSWER_COLON = re.compile(r"(?=[aA]nswer:\s*+([A-J]))")
_STANDALONE_LETTER = re.compile(r"\b[A-J]\b")
# Published stages whose regex backtracks quadratically on long outputs -> a linear function giving the
# same match (tests compare both on real outputs). Keyed by (pattern, flags, group).
LINEAR_EQUIVALENTS = {(r".*[aA]nswer:\s*([A-J])", 0, 1): _first_line_last_answer,
                      (r"\b[A-J]\b(?!.*\b[A-J]\b)", re.DOTALL, 0): _last_standalone_letter}


def _stage_match(stage: Stage, text: str, cascade: "Cascade") -> tuple[bool, str | None]:
    """(matched, valid letter or None) of one stage."""
    linear = LINEAR_EQUIVALENTS.get((stage.pattern, stage.flags, stage.group))
    if linear is not None and stage.pick == "first":
        m = linear(text)
    elif stage.pick == "first":
        m = re.search(stage.pattern, text, stage.flags)
    else:
        m = None
        for m in re.finditer(stage.pattern, text, stage.flags):
            pass
    if m is None:
        return False, None
    got = m.group(stage.group) or ""
    for old, new in cascade.letter_map:
        got = got.replace(old, new)
    got = got.strip() if cascade.letter_map else got
    return True, (got if got and len(got) == 1 and got in cascade.valid else None)


def run_cascade(cascade: Cascade, text: str | None) -> CascadeAnswer:
    """The first stage that answers; ("none") when none does (the fallback is applied per run, below)."""
    text = text if isinstance(text, str) else ""
    for old, new in cascade.text_replacements:
        text = text.replace(old, new)
    for i, stage in enumerate(cascade.stages, start=1):
        matched, letter = _stage_match(stage, text, cascade)
        if letter is not None:
            return CascadeAnswer(letter, f"stage{i}")
        if matched and cascade.first_match_decides:
            return CascadeAnswer(None, f"stage{i}-invalid")
    return CascadeAnswer(None, "none")


def stream_guesses(records: list, seed: int) -> list:
    """MMLU-Pro's fallback over one run: Python's random seeded once (12345), one randint(0, n_options - 1)
    per unanswered question, in evaluation order. Applied to the records of one benchmark in sample order,
    every time a summary is made, so a resumed or re-graded run draws exactly the same guesses.

    Records to guess carry "official_guess": {"options": n}; returns new records with the guessed letter
    as official_extracted, official_stage "guess" and official_correct set against the gold letter.
    """
    rng = random.Random(seed)
    out = []
    for rec in records:
        guess = rec.get("official_guess")
        if guess:
            letter = "ABCDEFGHIJKLMNOP"[rng.randint(0, int(guess["options"]) - 1)]
            rec = {**rec, "official_extracted": letter, "official_stage": "guess",
                   "official_correct": letter == rec.get("gold")}
        out.append(rec)
    return out


# TIGER-AI-Lab/MMLU-Pro evaluate_from_local.py (extract_answer -> extract_again -> extract_final, then
# save_res' random guess over the shown options with seed 12345). Case-sensitive "answer is", first match.
MMLU_PRO_OFFICIAL = Cascade(
    name="mmlu_pro/tiger-lab",
    source="github.com/TIGER-AI-Lab/MMLU-Pro evaluate_from_local.py (extract_answer, extract_again, "
           "extract_final, save_res)",
    stages=(Stage(r"answer is \(?([A-J])\)?"),
            Stage(r".*[aA]nswer:\s*([A-J])"),
            Stage(r"\b[A-J]\b(?!.*\b[A-J]\b)", re.DOTALL, group=0)),
    valid="ABCDEFGHIJ", fallback="seeded_guess", guess_seed=12345)

# idavidrein/gpqa baselines (parse_sampled_answer): five patterns in order, first match of each, the
# captured character must be one of A-D; nothing found is wrong.
GPQA_OFFICIAL = Cascade(
    name="gpqa/idavidrein",
    source="github.com/idavidrein/gpqa baselines/run_baseline.py (parse_sampled_answer)",
    stages=tuple(Stage(p) for p in (r"answer is \((.)\)", r"Answer: \((.)\)", r"answer: \((.)\)",
                                    r"answer \((.)\)", r"\((.)\)")),
    valid="ABCD")

# openai/simple-evals (common.py + mmlu_eval.py, the MMMLU scorer): the response is stripped of markdown /
# LaTeX wrappers, then each language's "Answer:" marker is tried in this order; the first marker that
# matches decides (its letter mapped from Arabic / Bengali / full-width forms to A-D).
MMMLU_MARKERS = (
    "Answer\\s*:", "Answer\\s*:\u200b\u200b\u200b\u200b\u200b\u200b", "উত্তর\\s*:", "उत्तर\\s*:", "উত্তরঃ",
    "উত্তর\\s*:", "Antwort\\s*:", "답변\\s*:", "정답\\s*:", "답\\s*:", "答案\\s*：", "答案\\s*:", "答\\s*：",
    "答\\s*:", "答复\\s*：", "答曰\\s*：", "الإجابة:", "الجواب:", "إجابة:", "الإجابة النهائية:", "الإجابة الصحيحة:",
    "الإجابة الصحيحة هي:", "الإجابة هي:", "الجواب النهائي:", "Respuesta\\s*:", "Risposta\\s*:", "答え\\s*:",
    "答え\\s*：", "回答\\s*:", "回答\\s*：", "解答\\s*:", "Jawaban\\s*:", "Réponse\\s*:", "Resposta\\s*:",
    "Jibu\\s*:", "Idahun\\s*:", "Ìdáhùn\\s*:", "Idáhùn\\s*:", "A\u0300m\u1ecd\u0300na\u0300\\s*:", "Àdáhùn\\s*:", "A\u0300nu\u0301go\u0323\\s*:",
    "Àṣàyàn\\s*:")
MMMLU_LETTERS = "([A-D]|[أ-د]|[অ]|[ব]|[ড]|[ঢ]|[Ａ]|[Ｂ]|[Ｃ]|[Ｄ])"
MMMLU_OFFICIAL = Cascade(
    name="mmmlu/simple-evals",
    source="github.com/openai/simple-evals common.py (MULTILINGUAL_ANSWER_REGEXES, normalize_response, "
           "normalize_extracted_answer) and mmlu_eval.py",
    stages=tuple(Stage("(?i)" + marker + "[ \t]*" + MMMLU_LETTERS) for marker in MMMLU_MARKERS),
    valid="ABCD", first_match_decides=True,
    text_replacements=(("**", ""), ("$\\boxed{", ""), ("}$", ""), ("\\$", ""), ("$\\text{", ""), ("$", ""),
                       ("\\mathrm{", ""), ("\\{", ""), ("\\text", ""), ("\\(", ""), ("\\mathbf{", ""), ("{", ""),
                       ("\\boxed", "")),
    letter_map=(("أ", " A"), ("ب", " B"), ("ج", " C"), ("د", " D"), ("অ", " A"), ("ব", " B"), ("ড", " C"),
                ("ঢ", " D"), ("Ａ", " A"), ("Ｂ", " B"), ("Ｃ", " C"), ("Ｄ", " D")))
