"""Answer cascades as data: the benchmarks' own (official) multiple-choice scorers, one table entry each.

A cascade is an ordered list of regex stages. Each stage runs `re.search` (pick "first") or takes the last
of `re.finditer` (pick "last") on the whole output; if the captured letter is a valid one the stage has
answered, otherwise the next stage runs (a stage does not look for a second match). When no stage
answers, the cascade's fallback decides: "none" (no answer, scored wrong) or "seeded_guess" (a uniform
random option, seeded, as MMLU-Pro's script does). Every answer records which stage found it.

The regexes are the published definitions (docs/BENCHMARKS.md gives the sources). Our robust cascade
(extractors.extract_choice) is separate code; results report both, and how often they disagree.
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


@dataclass(frozen=True)
class CascadeAnswer:
    letter: str | None
    stage: str  # "stage1".., "guess", or "none"


def _stage_letter(stage: Stage, text: str, valid: str) -> str | None:
    if stage.pick == "first":
        m = re.search(stage.pattern, text, stage.flags)
    else:
        m = None
        for m in re.finditer(stage.pattern, text, stage.flags):
            pass
    if m is None:
        return None
    got = m.group(stage.group)
    return got if got and got in valid else None


def run_cascade(cascade: Cascade, text: str | None) -> CascadeAnswer:
    """The first stage that answers; ("none") when none does (the fallback is applied per run, below)."""
    text = text if isinstance(text, str) else ""
    for i, stage in enumerate(cascade.stages, start=1):
        letter = _stage_letter(stage, text, cascade.valid)
        if letter is not None:
            return CascadeAnswer(letter, f"stage{i}")
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
