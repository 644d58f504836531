"""Grade functions for the durability tests: the real graders, slowed down or crashing on purpose.

They live in an importable module because the grading pool's spawned workers import them by name.
Behaviour is set through the environment (inherited by the workers): GRADING_HOOK_DELAY_S,
GRADING_HOOK_CRASH_ID + GRADING_HOOK_MARKER (crash once on that sample), GRADING_HOOK_RAISE_ID.
"""
import os
import time
from pathlib import Path

import eval_grading


def slow_grade(sample, output):
    time.sleep(float(os.environ.get("GRADING_HOOK_DELAY_S", "0.3")))
    return eval_grading.default_grade_fn(sample, output)


def crash_once_grade(sample, output):
    """Kill the worker process the first time it grades GRADING_HOOK_CRASH_ID (a segfault, an OOM kill)."""
    marker = Path(os.environ["GRADING_HOOK_MARKER"])
    if sample.id == os.environ.get("GRADING_HOOK_CRASH_ID") and not marker.exists():
        marker.write_text(str(os.getpid()))
        os._exit(3)
    return eval_grading.default_grade_fn(sample, output)


def always_crash_grade(sample, output):
    if sample.id == os.environ.get("GRADING_HOOK_CRASH_ID"):
        os._exit(3)
    return eval_grading.default_grade_fn(sample, output)


def raising_grade(sample, output):
    """A grader bug on one sample: must become a counted grader_error, not a wrong answer."""
    if sample.id == os.environ.get("GRADING_HOOK_RAISE_ID"):
        raise ZeroDivisionError("grader bug")
    return eval_grading.default_grade_fn(sample, output)


def stall_one_grade(sample, output):
    """One sample's grading never ends (a looping verifier); the others are graded normally."""
    if sample.id == os.environ.get("GRADING_HOOK_STALL_ID"):
        while True:
            time.sleep(0.05)
    return eval_grading.default_grade_fn(sample, output)
