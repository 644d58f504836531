"""Code graders end to end through the real sandbox: a program passes only when the test runner itself
reports success after the last assertion, never because of how it exits."""
import pytest

import graders
import sandbox

LIMITS = sandbox.SandboxLimits(timeout_s=5.0)

HUMANEVAL_PROMPT = ('def add(a: int, b: int) -> int:\n'
                    '    """Return the sum of a and b.\n    >>> add(2, 3)\n    5\n    """\n')
HUMANEVAL_TEST = ("def check(candidate):\n"
                  "    assert candidate(2, 3) == 5\n"
                  "    assert candidate(-1, 1) == 0\n"
                  "    assert candidate(10, 32) == 42\n")
HUMANEVAL_PARTS = (HUMANEVAL_PROMPT, f"{HUMANEVAL_TEST}\n\ncheck(add)\n")
MBPP_PARTS = ("import math", "assert hyp(3, 4) == 5.0\nassert hyp(6, 8) == 10.0\n")


def fenced(code: str) -> str:
    return f"Here you go.\n```python\n{code}```\n"


# Each is a wrong or empty answer that exits 0 (or never reaches the tests); the old grader, which
# counted exit code 0 as a pass, scored every one of them correct.
EXIT_ZERO_FORGERIES = {
    "sys.exit(0)": "import sys\nsys.exit(0)\n",
    "os._exit(0)": "import os\nos._exit(0)\n",
    "atexit os._exit": "import atexit, os\natexit.register(os._exit, 0)\ndef add(a, b):\n    return 0\n",
    "excepthook exits 0": ("import os, sys\nsys.excepthook = lambda *exc: os._exit(0)\n"
                           "def add(a, b):\n    return 0\n"),
    "exit() in a main block": "def add(a, b):\n    return 0\n\nif __name__ == '__main__':\n    exit()\n",
    "SystemExit at call time": "def add(a, b):\n    raise SystemExit(0)\n",
    "os._exit at call time": "import os\ndef add(a, b):\n    os._exit(0)\n",
    "fake pass line": "import sys\nprint('passed')\nsys.stdout.flush()\nimport os\nos._exit(0)\n",
}


@pytest.mark.parametrize("name", sorted(EXIT_ZERO_FORGERIES))
def test_exit_zero_forgeries_score_wrong(name):
    graded = graders.grade_code_program(HUMANEVAL_PARTS, fenced(EXIT_ZERO_FORGERIES[name]), LIMITS)
    assert graded.correct is False and not graded.no_answer, graded
    assert graded.detail["passed"] == 0 and graded.detail["error"]
    assert graded.detail["isolation"].startswith("bwrap")


def test_issue_one_liner_is_wrong():
    assert graders.grade_code_program(("", "assert False"), "```python\nimport sys\nsys.exit(0)\n```",
                                      sandbox.SandboxLimits()).correct is False


@pytest.mark.parametrize("code", [
    "def add(a, b):\n    return a + b\n",
    # a main block with examples, as models write them: it does not run, as in the official harness
    "def add(a, b):\n    return a + b\n\nif __name__ == '__main__':\n    print(add(1, 2))\n    exit()\n",
    # helpers, imports and a thread: still one honest program
    "import threading\n\ndef _sum(xs):\n    return sum(xs)\n\ndef add(a, b):\n"
    "    out = []\n    t = threading.Thread(target=lambda: out.append(_sum([a, b])))\n    t.start()\n    t.join()\n"
    "    return out[0]\n",
], ids=["plain", "main-block", "thread"])
def test_honest_humaneval_programs_pass(code):
    graded = graders.grade_code_program(HUMANEVAL_PARTS, fenced(code), LIMITS)
    assert graded.correct, graded
    assert graded.detail == {"passed": 1, "total": 1, "isolation": graded.detail["isolation"]}


def test_wrong_humaneval_program_names_the_failure():
    graded = graders.grade_code_program(HUMANEVAL_PARTS, fenced("def add(a, b):\n    return a - b\n"), LIMITS)
    assert not graded.correct and "AssertionError" in graded.detail["error"]


def test_mbpp_program_passes_and_fails_on_its_asserts():
    good = graders.grade_code_program(MBPP_PARTS, fenced("def hyp(a, b):\n    return math.sqrt(a * a + b * b)\n"),
                                      LIMITS)
    bad = graders.grade_code_program(MBPP_PARTS, fenced("def hyp(a, b):\n    return a + b\n"), LIMITS)
    assert good.correct and not bad.correct


STDIN_TESTS = [{"input": "2 3\n", "output": "5\n", "testtype": "stdin"},
               {"input": "40 2\n", "output": "42\n", "testtype": "stdin"}]


@pytest.mark.parametrize("code, correct", [
    ("a, b = map(int, input().split())\nprint(a + b)\n", True),
    # competitive-programming style: the answer, then exit(); stdout decides, as in LiveCodeBench
    ("import sys\ndef main():\n    a, b = map(int, sys.stdin.readline().split())\n    print(a + b)\n    exit()\n"
     "if __name__ == '__main__':\n    main()\n", True),
    ("import sys\nsys.exit(0)\n", False),
    ("a, b = map(int, input().split())\nprint(a * b)\n", False),
], ids=["plain", "main-exit", "exit-only", "wrong"])
def test_stdin_programs_are_judged_by_their_output(code, correct):
    graded = graders.grade_code_tests(STDIN_TESTS, None, fenced(code), LIMITS)
    assert graded.correct is correct, graded


def test_functional_programs_are_judged_by_the_returned_value():
    tests = [{"input": "[2, 7, 11, 15]\n9", "output": "[0, 1]", "testtype": "functional"}]
    ok = ("class Solution:\n    def twoSum(self, nums: List[int], target: int) -> List[int]:\n"
          "        seen = {}\n        for i, x in enumerate(nums):\n"
          "            if target - x in seen:\n                return [seen[target - x], i]\n"
          "            seen[x] = i\n")
    assert graders.grade_code_tests(tests, "twoSum", fenced(ok), LIMITS).correct
    forged = "import os\nos._exit(0)\n"
    assert not graders.grade_code_tests(tests, "twoSum", fenced(forged), LIMITS).correct


def test_weak_tier_is_recorded_in_the_detail():
    weak = [c for c in sandbox.candidate_isolations(False, sandbox.sandbox_pythons()[-1:]) if c.kind == "plain"][0]
    graded = graders.grade_code_program(HUMANEVAL_PARTS, fenced("def add(a, b):\n    return a + b\n"), LIMITS,
                                        isolation=weak)
    assert graded.correct and graded.detail["weak_sandbox"] is True
    assert graded.detail["isolation"].startswith("WEAK SANDBOX")
