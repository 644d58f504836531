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


def seeded_guess(seed: int, sample_id: str, n_options: int) -> int:
    """Index of a uniform random option, a function of (seed, sample id) only.

    MMLU-Pro's script seeds Python's random once (12345) and draws in its own iteration order; a
    resumable, parallel harness has no such order, so the draw is seeded per sample instead. The
    expectation (1 / n_options) is the same; which few questions the guess hits can differ.
    """
    return random.Random(f"{seed}:{sample_id}").randrange(n_options)


def run_cascade(cascade: Cascade, text: str | None, sample_id: str = "", n_options: int = 0) -> CascadeAnswer:
    text = text if isinstance(text, str) else ""
    for i, stage in enumerate(cascade.stages, start=1):
        letter = _stage_letter(stage, text, cascade.valid)
        if letter is not None:
            return CascadeAnswer(letter, f"stage{i}")
    if cascade.fallback == "seeded_guess" and n_options > 0:
        return CascadeAnswer("ABCDEFGHIJKLMNOP"[seeded_guess(cascade.guess_seed, sample_id, n_options)], "guess")
    return CascadeAnswer(None, "none")


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
