"""Graders: one function per answer kind, from (gold, model output) to a `Graded` verdict.

Kept apart from the benchmark specs so each can be tested on its own; none of them raises on any output
string (the spec layer wraps them once more as a last line of defence). Code is only ever executed
through `sandbox.run_python`.
"""
from __future__ import annotations

import json
import math
import os
import re
import secrets
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import bench_extract
import sandbox


@dataclass(frozen=True)
class Graded:
    extracted: str | None  # what the extractor found (None = no answer)
    correct: bool
    no_answer: bool
    detail: dict = field(default_factory=dict)


def no_answer(**detail) -> Graded:
    return Graded(None, False, True, dict(detail))


# ---------------------------------------------------------------- multiple choice / integers / strings

def grade_choice(gold_letter: str, output: str, letters: str, markers: tuple = bench_extract.ALL_ANSWER_MARKERS) -> Graded:
    got = bench_extract.extract_choice(output, letters=letters, markers=markers)
    if got is None:
        return no_answer()
    return Graded(got, got == gold_letter, False, {})


def grade_integer(gold: str, output: str) -> Graded:
    """AIME: integers compared as integers, so "033" == "33"; a non-integer final answer is no answer."""
    got = bench_extract.extract_integer(output)
    if got is None:
        raw = bench_extract.extract_math_answer(output)
        return no_answer(**({"non_integer_answer": raw[:200]} if raw else {}))
    try:
        want = int(str(gold).strip())
    except ValueError:
        return Graded(got, False, False, {"error": f"gold answer {gold!r} is not an integer"})
    return Graded(got, int(got) == want, False, {})


# ---------------------------------------------------------------------------------------- math

def _math_verify_equal(gold: str, pred: str) -> bool:
    from math_verify import parse, verify

    # math-verify's timeouts use SIGALRM, which only works in the main thread; elsewhere run without.
    limit = 5 if threading.current_thread() is threading.main_thread() else None
    gold_parsed = parse("\\boxed{" + gold + "}", parsing_timeout=limit)
    pred_parsed = parse("\\boxed{" + pred + "}", parsing_timeout=limit)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=limit))


def _sympy_equal(gold: str, pred: str) -> bool:
    """Fallback where math-verify is missing: plain-LaTeX numbers and simple expressions only."""
    import sympy

    def to_expr(s: str):
        s = re.sub(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}", r"((\1)/(\2))", s)
        s = s.replace("\\left", "").replace("\\right", "").replace("\\cdot", "*").replace("^", "**")
        s = re.sub(r"\\sqrt\{([^{}]*)\}", r"sqrt(\1)", s).replace("\\pi", "pi").replace("{", "(").replace("}", ")")
        return sympy.sympify(s)

    try:
        return bool(sympy.simplify(to_expr(gold) - to_expr(pred)) == 0)
    except Exception:  # sympy raises a zoo of types on malformed input
        return False


def math_equal(gold: str, pred: str) -> tuple:
    """(equal, method). Identical normalized strings short-cut; then math-verify (sympy where missing)."""
    if bench_extract.normalize_free_text(gold) == bench_extract.normalize_free_text(pred):
        return True, "string"
    try:
        import math_verify  # noqa: F401
    except ImportError:
        return _sympy_equal(gold, pred), "sympy_fallback"
    try:
        return _math_verify_equal(gold, pred), "math_verify"
    except Exception as exc:  # math-verify wraps sympy; a crash there is "not shown equal", not a grader bug
        return False, f"math_verify_error: {type(exc).__name__}"


def grade_math(gold: str, output: str) -> Graded:
    got = bench_extract.extract_math_answer(output)
    if got is None:
        return no_answer()
    equal, method = math_equal(str(gold), got)
    return Graded(got, equal, False, {"method": method})


# ---------------------------------------------------------------------------------------- code

CODE_PRELUDE = (
    "import sys, math, re, string, heapq, bisect, itertools, functools, collections, random\n"
    "from typing import *\nfrom collections import *\nfrom heapq import *\nfrom bisect import *\n"
    "from itertools import *\nfrom functools import *\nsys.setrecursionlimit(1 << 16)\n"
)


def _float_close(a, b) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6)


def values_match(got, want) -> bool:
    """Tolerant structural equality: lists == tuples, floats within 1e-6, ints == equal floats."""
    if isinstance(got, bool) or isinstance(want, bool):
        return got == want
    if isinstance(got, (int, float)) and isinstance(want, (int, float)):
        return _float_close(float(got), float(want))
    if isinstance(got, (list, tuple)) and isinstance(want, (list, tuple)):
        return len(got) == len(want) and all(values_match(g, w) for g, w in zip(got, want))
    if isinstance(got, dict) and isinstance(want, dict):
        return got.keys() == want.keys() and all(values_match(got[k], want[k]) for k in got)
    return got == want


def _token_match(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return _float_close(float(a), float(b))
    except ValueError:
        return False


def stdout_matches(got: str, want: str) -> bool:
    """Line by line, trailing whitespace and trailing blank lines ignored; tokens equal or floats within 1e-6."""
    g = [line.rstrip() for line in got.rstrip().splitlines()]
    w = [line.rstrip() for line in want.rstrip().splitlines()]
    if g == w:
        return True
    if len(g) != len(w):
        return False
    for gl, wl in zip(g, w):
        gt, wt = gl.split(), wl.split()
        if len(gt) != len(wt) or not all(_token_match(x, y) for x, y in zip(gt, wt)):
            return False
    return True


def _functional_program(code: str, func_name: str, marker: str) -> str:
    """Solution code, then a call of Solution().func(*args) (or a top-level func) on JSON args from stdin;
    the result is printed after a per-run random marker so the program's own prints cannot pose as it."""
    return (CODE_PRELUDE + code + "\n\n"
            "def _moe_call():\n"
            "    import json as _json, sys as _sys\n"
            "    _args = [_json.loads(_l) for _l in _sys.stdin.read().split('\\n') if _l.strip()]\n"
            f"    _cls = globals().get('Solution')\n"
            f"    _fn = getattr(_cls(), {func_name!r}) if _cls is not None else globals()[{func_name!r}]\n"
            "    _res = _fn(*_args)\n"
            "    _sys.stdout.flush()\n"
            f"    _sys.stdout.write('\\n' + {marker!r} + '\\n' + _json.dumps(_res, default=repr) + '\\n')\n"
            "_moe_call()\n")


def _short(result: sandbox.RunResult) -> str:
    tail = (result.stderr or "").strip().splitlines()[-1:] or [""]
    return f"{result.status}: {tail[0][:300]}"


def run_test_cases(code: str, tests: list, func_name: str | None, limits: sandbox.SandboxLimits,
                   isolation: sandbox.Isolation | None = None) -> dict:
    """All tests must pass; stops at the first failure. tests: [{"input", "output", "testtype"}].
    The verdict is the output compared with the expected one, so an exit code cannot forge it."""
    passed = 0
    iso = isolation or sandbox.isolation_for(limits)
    base = {"total": len(tests), "isolation": iso.describe(), **({} if iso.strong else {"weak_sandbox": True})}
    for i, test in enumerate(tests):
        functional = test.get("testtype") == "functional"
        if functional:
            if not func_name:
                return {"passed": passed, **base, "error": "functional test but no func_name in metadata"}
            marker = "@@moe-result-" + secrets.token_hex(8)
            result = sandbox.run_python(_functional_program(code, func_name, marker), stdin=test["input"],
                                        limits=limits, isolation=iso)
            ok = False
            if result.ok and marker in result.stdout:
                payload = result.stdout.rsplit(marker, 1)[1].strip()
                try:
                    ok = values_match(json.loads(payload), json.loads(test["output"]))
                except (ValueError, RecursionError):
                    ok = False
        else:
            result = sandbox.run_python(CODE_PRELUDE + code, stdin=test["input"], limits=limits, isolation=iso)
            ok = result.ok and stdout_matches(result.stdout, test["output"])
        if not ok:
            err = _short(result) if not result.ok else "wrong answer"
            return {"passed": passed, **base, "failed_test": i, "error": err}
        passed += 1
    return {"passed": passed, **base}


def grade_code_tests(tests: list, func_name: str | None, output: str, limits: sandbox.SandboxLimits,
                     isolation: sandbox.Isolation | None = None) -> Graded:
    code = bench_extract.extract_code(output)
    if code is None:
        return no_answer()
    detail = run_test_cases(code, tests, func_name, limits, isolation)
    return Graded(code, detail["passed"] == detail["total"] and "error" not in detail, False, detail)


TEST_PROGRAM_NAME = "__moe_program__"  # not "__main__": the official harness execs the program as a module


def code_program(program_parts: tuple, code: str) -> str:
    """HumanEval/MBPP: prefix (prompt or setup) + model code + the assertions, as one program."""
    prefix, suffix = program_parts
    return prefix + "\n" + code + "\n\n" + suffix


def grade_code_program(program_parts: tuple, output: str, limits: sandbox.SandboxLimits,
                       isolation: sandbox.Isolation | None = None, names: tuple | None = None) -> Graded:
    """HumanEval/MBPP in two processes (sandbox_calls): the candidate (prefix + its code) serves calls;
    the tests (prefix + test code) run in another sandbox and reach the candidate's `names` (default: the
    names the tests use that only the candidate defines) through proxies that carry plain data only.
    Passes only when the test process ran to its end and exited cleanly, and the candidate did not die or
    stall in a call. As in the official harness, an `if __name__ == "__main__":` block in the answer does
    not run."""
    import sandbox_calls

    code = bench_extract.extract_code(output)
    if code is None:
        return no_answer()
    prefix, tests = program_parts
    iso = isolation or sandbox.isolation_for(limits)
    try:
        names = list(names) if names is not None else sandbox_calls.entry_points(tests, prefix)
    except SyntaxError as exc:
        return Graded(code, False, False, {"status": "grader_error", "error": f"test code does not parse: {exc}"})
    test, cand = sandbox_calls.run_checked(prefix + "\n" + code + "\n", prefix, tests, names, limits, iso,
                                           run_name=TEST_PROGRAM_NAME)
    # The candidate ends by being stopped once the tests are done (or, having answered, by itself);
    # cut by its own limits it is a failure even if the tests somehow completed.
    died = cand is None or cand.status in ("timeout", "output_limit", "sandbox_error")
    passed = bool(test.ok and test.completed and not died)
    detail = {"passed": int(passed), "total": 1, "isolation": iso.describe(),
              **({} if iso.strong else {"weak_sandbox": True})}
    if not passed:
        if not (test.ok and test.completed):
            detail["error"] = _short(test) if not test.ok else "exited before the tests finished"
        else:
            detail["error"] = f"{sandbox_calls.CALL_FAILED}: the candidate process ended with " + \
                (cand.status if cand is not None else "no run")
    return Graded(code, passed, False, detail)


# ---------------------------------------------------------------------------------------- HLE

@dataclass(frozen=True)
class JudgeConfig:
    """An OpenAI-compatible chat endpoint used as HLE's answer judge. The key is read from the
    environment variable named here at call time and never stored in a sample or result."""
    url: str
    model: str
    api_key_env: str = "MOE_LOWBIT_JUDGE_API_KEY"
    timeout_s: float = 120.0

    def describe(self) -> str:
        return f"{self.model}@{self.url}"


JUDGE_PROMPT = (
    "You are grading an answer to an exam question. Decide only whether the response's final answer "
    "means the same as the correct answer (allow trivial formatting differences and, for numbers, small "
    "rounding differences; do not solve the question yourself).\n\n"
    "[question]\n{question}\n\n[response]\n{response}\n\n[correct answer]\n{correct}\n\n"
    "Reply in exactly this form:\nextracted_final_answer: <the response's final answer, or None>\n"
    "correct: <yes or no>"
)


def ask_judge(judge: JudgeConfig, question: str, response: str, correct: str) -> tuple:
    """(correct, extracted_by_judge). Raises on transport errors or an unparseable verdict."""
    body = {"model": judge.model, "temperature": 0.0, "max_tokens": 512,
            "messages": [{"role": "user", "content": JUDGE_PROMPT.format(
                question=question, response=response[-20000:], correct=correct)}]}
    headers = {"Content-Type": "application/json"}
    key = os.environ.get(judge.api_key_env) or os.environ.get("OPENAI_API_KEY")
    if key:
        headers["Authorization"] = f"Bearer {key}"
    url = judge.url.rstrip("/")
    url = url if url.endswith("/chat/completions") else url + "/chat/completions"
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    with urllib.request.urlopen(req, timeout=judge.timeout_s) as resp:
        text = json.loads(resp.read().decode())["choices"][0]["message"]["content"] or ""
    verdict = re.findall(r"correct\s*[:：]\s*\**\s*(yes|no)", text, re.IGNORECASE)
    if not verdict:
        raise ValueError(f"judge reply has no 'correct: yes|no': {text[:200]!r}")
    extracted = re.findall(r"extracted_final_answer\s*[:：]\s*(.+)", text)
    return verdict[-1].lower() == "yes", (extracted[-1].strip() if extracted else None)


def grade_hle(gold: str, answer_type: str, question: str, output: str, judge: JudgeConfig | None,
              letters: str = bench_extract.LETTERS) -> Graded:
    """With a judge: the judge decides (both answer types), as HLE is scored officially. Without one:
    multipleChoice by the answer letter, exactMatch by normalized string equality; detail says which."""
    seg = bench_extract.final_segment(output)
    if answer_type == "multipleChoice":
        got = bench_extract.extract_choice(output, letters=letters, markers=("Answer", "Final Answer", "Exact Answer"))
    else:
        got = bench_extract.extract_final_line(output)
    if seg is None or not seg.strip():
        return no_answer(judge=judge.describe() if judge else "none", graded_by="none")
    if judge is not None:
        try:
            ok, judge_extracted = ask_judge(judge, question, seg, gold)
            return Graded(got if got is not None else judge_extracted, ok,
                          got is None and judge_extracted in (None, "None"),
                          {"judge": judge.describe(), "graded_by": "judge"})
        except (OSError, ValueError, KeyError, IndexError, urllib.error.URLError) as exc:
            judge_error = f"{type(exc).__name__}: {str(exc)[:200]}"
        fallback = {"judge": judge.describe(), "judge_error": judge_error}
    else:
        fallback = {"judge": "none"}
    if got is None:
        return no_answer(**fallback, graded_by="none")
    if answer_type == "multipleChoice":
        return Graded(got, got == str(gold).strip(), False, {**fallback, "graded_by": "letter_match"})
    equal = bench_extract.normalize_free_text(got) == bench_extract.normalize_free_text(str(gold))
    return Graded(got, equal, False, {**fallback, "graded_by": "normalized_string_match"})
