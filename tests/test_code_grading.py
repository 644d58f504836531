"""Code graders end to end through the real sandbox: a program passes only when the test runner itself
reports success after the last assertion, never because of how it exits."""
import pytest

import bench_grade
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
    graded = bench_grade.grade_code_program(HUMANEVAL_PARTS, fenced(EXIT_ZERO_FORGERIES[name]), LIMITS)
    assert graded.correct is False and not graded.no_answer, graded
    assert graded.detail["passed"] == 0 and graded.detail["error"]
    assert graded.detail["isolation"].startswith("bwrap")


def test_issue_one_liner_is_wrong():
    assert bench_grade.grade_code_program(("", "assert False"), "```python\nimport sys\nsys.exit(0)\n```",
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
    graded = bench_grade.grade_code_program(HUMANEVAL_PARTS, fenced(code), LIMITS)
    assert graded.correct, graded
    assert graded.detail == {"passed": 1, "total": 1, "isolation": graded.detail["isolation"]}


def test_wrong_humaneval_program_names_the_failure():
    graded = bench_grade.grade_code_program(HUMANEVAL_PARTS, fenced("def add(a, b):\n    return a - b\n"), LIMITS)
    assert not graded.correct and "AssertionError" in graded.detail["error"]


def test_mbpp_program_passes_and_fails_on_its_asserts():
    good = bench_grade.grade_code_program(MBPP_PARTS, fenced("def hyp(a, b):\n    return math.sqrt(a * a + b * b)\n"),
                                      LIMITS)
    bad = bench_grade.grade_code_program(MBPP_PARTS, fenced("def hyp(a, b):\n    return a + b\n"), LIMITS)
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
    graded = bench_grade.grade_code_tests(STDIN_TESTS, None, fenced(code), LIMITS)
    assert graded.correct is correct, graded


def test_functional_programs_are_judged_by_the_returned_value():
    tests = [{"input": "[2, 7, 11, 15]\n9", "output": "[0, 1]", "testtype": "functional"}]
    ok = ("class Solution:\n    def twoSum(self, nums: List[int], target: int) -> List[int]:\n"
          "        seen = {}\n        for i, x in enumerate(nums):\n"
          "            if target - x in seen:\n                return [seen[target - x], i]\n"
          "            seen[x] = i\n")
    assert bench_grade.grade_code_tests(tests, "twoSum", fenced(ok), LIMITS).correct
    forged = "import os\nos._exit(0)\n"
    assert not bench_grade.grade_code_tests(tests, "twoSum", fenced(forged), LIMITS).correct


def test_weak_tier_is_recorded_in_the_detail():
    weak = [c for c in sandbox.candidate_isolations(False, sandbox.sandbox_pythons()[-1:]) if c.kind == "plain"][0]
    graded = bench_grade.grade_code_program(HUMANEVAL_PARTS, fenced("def add(a, b):\n    return a + b\n"), LIMITS,
                                        isolation=weak)
    assert graded.correct and graded.detail["weak_sandbox"] is True
    assert graded.detail["isolation"].startswith("WEAK SANDBOX")


# ------------------------------------------------------------------ forgeries against the tests themselves
# Each is a wrong answer (add returns 0 unless it can learn or fake the expected value). The tests run in
# another process than the candidate, so none of them may pass.

SETTRACE_SWAP_CHECK = '''
import sys
def add(a, b):
    return 0
def _tracer(frame, event, arg):
    g = frame.f_globals
    if "check" in g and not getattr(g["check"], "_moe_forged", False):
        noop = lambda candidate: None
        noop._moe_forged = True
        g["check"] = noop
    return _tracer
sys.settrace(_tracer)
f = sys._getframe()
while f is not None:
    f.f_trace = _tracer
    f = f.f_back
'''

SETTRACE_JUMP_ASSERTS = '''
import sys
def hyp(a, b):
    return 0
def _jump(frame, event, arg):
    if event == "line" and frame.f_code.co_name == "<module>":
        try:
            import linecache
            line = linecache.getline(frame.f_code.co_filename, frame.f_lineno)
        except Exception:
            line = ""
        if line.lstrip().startswith("assert"):
            try:
                frame.f_lineno = frame.f_lineno + 1
            except ValueError:
                pass
    return _jump
sys.settrace(_jump)
f = sys._getframe()
while f is not None:
    f.f_trace = _jump
    f = f.f_back
'''

ALWAYS_EQUAL = '''
class _Yes:
    def __eq__(self, other):
        return True
    def __ne__(self, other):
        return False
    __hash__ = object.__hash__
def add(a, b):
    return _Yes()
'''

INT_SUBCLASS = '''
class _Any(int):
    def __eq__(self, other):
        return True
    __hash__ = int.__hash__
def add(a, b):
    return _Any(0)
'''

# Looks for "assert candidate(2, 3) == 5"-style lines wherever it can read: its own files, every /proc
# entry it can open, the frames above it and every string the garbage collector knows.
READ_OWN_TESTS = r'''
import gc, glob, os, re, sys
_PAT = re.compile(r"candidate\((-?\d+),\s*(-?\d+)\)\s*==\s*(-?\d+)")
_table = {}
def _scan(text):
    for a, b, want in _PAT.findall(text if isinstance(text, str) else ""):
        _table[(int(a), int(b))] = int(want)
for path in glob.glob("/harness/*") + glob.glob("/sandbox/*") + glob.glob("/tmp/*") \
        + glob.glob("/proc/*/cmdline") + glob.glob("/proc/*/environ") + glob.glob("/proc/self/fd/*"):
    try:
        with open(path, "rb") as fh:
            _scan(fh.read(1 << 20).decode("utf-8", "replace"))
    except OSError:
        pass
for fd in range(3, 256):
    try:
        os.lseek(fd, 0, 0)
    except OSError:
        pass
    try:
        _scan(os.pread(fd, 1 << 20, 0).decode("utf-8", "replace"))
    except OSError:
        pass
f = sys._getframe()
while f is not None:
    for v in list(f.f_globals.values()) + list(f.f_locals.values()):
        _scan(v)
    f = f.f_back
for obj in gc.get_objects():
    if isinstance(obj, dict):
        for v in list(obj.values()):
            _scan(v)
def add(a, b):
    return _table.get((a, b), 0)
'''

# Finds the launcher's nonce (its fds, its frames) and posts it to every fd it can write, then fails.
POST_NONCE_THEN_FAIL = r'''
import os, sys
_found = []
for fd in range(3, 256):
    try:
        data = os.read(fd, 256)
    except OSError:
        continue
    if data:
        _found.append(data)
f = sys._getframe()
while f is not None:
    for k in ("nonce_fd", "report_fd"):
        if k in f.f_locals:
            _found.append(str(f.f_locals[k]).encode())
    f = f.f_back
for fd in range(3, 256):
    for data in _found:
        try:
            os.write(fd, b"R" + data)
        except OSError:
            pass
def add(a, b):
    return a - b
'''

TEST_FORGERIES = {"settrace swaps check": (HUMANEVAL_PARTS, SETTRACE_SWAP_CHECK),
                  "settrace jumps the asserts": (("import math", "assert hyp(3, 4) == 5.0\nassert hyp(6, 8) == 10.0\n"),
                                                 SETTRACE_JUMP_ASSERTS),
                  "always-equal object": (HUMANEVAL_PARTS, ALWAYS_EQUAL),
                  "int subclass": (HUMANEVAL_PARTS, INT_SUBCLASS),
                  "reads its own tests": (HUMANEVAL_PARTS, READ_OWN_TESTS),
                  "posts the nonce then fails": (HUMANEVAL_PARTS, POST_NONCE_THEN_FAIL)}


@pytest.mark.parametrize("name", sorted(TEST_FORGERIES))
def test_forgeries_of_the_tests_score_wrong(name):
    parts, code = TEST_FORGERIES[name]
    graded = bench_grade.grade_code_program(parts, fenced(code), LIMITS)
    assert graded.correct is False and graded.detail["passed"] == 0 and graded.detail["error"], graded.detail


@pytest.mark.parametrize("name", ["settrace swaps check", "always-equal object", "reads its own tests"])
def test_the_same_forgeries_win_when_tests_share_the_candidates_process(name):
    """Control: in one process (the old layout) each forgery passes, so the tests above can fail."""
    parts, code = TEST_FORGERIES[name]
    result = sandbox.run_python(bench_grade.code_program(parts, code), limits=LIMITS, run_name=bench_grade.TEST_PROGRAM_NAME)
    assert result.completed, result.stderr[-500:]


def test_values_cross_with_their_exact_types():
    parts = ("", "assert type(f()) is tuple and f() == (1, [2.5, None], {'k': {3}}, b'x', True)\n"
                 "assert type(f()[1][0]) is float and type(f()[3]) is bytes\n")
    ok = "def f():\n    return (1, [2.5, None], {'k': {3}}, b'x', True)\n"
    assert bench_grade.grade_code_program(parts, fenced(ok), LIMITS).correct
    gen = "def f():\n    return (x for x in (1,))\n"
    wrong = bench_grade.grade_code_program(parts, fenced(gen), LIMITS)
    assert not wrong.correct and "cannot cross" in wrong.detail["error"]


def test_a_call_that_stalls_is_cut_at_the_call_timeout():
    stall = "def add(a, b):\n    while True:\n        pass\n"
    start = __import__("time").monotonic()
    graded = bench_grade.grade_code_program(HUMANEVAL_PARTS, fenced(stall), sandbox.SandboxLimits(timeout_s=2.0))
    assert not graded.correct and __import__("time").monotonic() - start < 15


def test_a_prompt_helper_stays_trusted_code_in_the_test_process():
    """HumanEval/32-style: the tests call the prompt's own helper; a candidate redefining it to lie cannot
    change what the tests compute, and only the stub is proxied."""
    import sandbox_calls

    prompt = ("def poly(xs, x):\n    return sum(c * x ** i for i, c in enumerate(xs))\n\n"
              "def find_zero(xs):\n    \"\"\"A zero of poly(xs).\"\"\"\n")
    tests = "def check(candidate):\n    assert abs(poly([-6, 1], candidate([-6, 1]))) < 1e-6\n\ncheck(find_zero)\n"
    assert sandbox_calls.entry_points(tests, prompt) == ["find_zero"]
    honest = "def find_zero(xs):\n    return -xs[0] / xs[1]\n"
    liar = "def poly(xs, x):\n    return 0\n\ndef find_zero(xs):\n    return 123.0\n"
    assert bench_grade.grade_code_program((prompt, tests), fenced(honest), LIMITS).correct
    assert not bench_grade.grade_code_program((prompt, tests), fenced(liar), LIMITS).correct


GRADING_MODULES = ("bench_grade.py", "bench_extract.py", "sandbox.py", "sandbox_exec.py", "sandbox_launcher.py",
                   "sandbox_memory.py", "sandbox_calls.py", "sandbox_wire.py")


def test_forgeries_score_wrong_and_honest_code_passes_under_an_unprivileged_grader():
    """The same forgeries, graded by a grader running as uid 65534 (setpriv when this test runs as root,
    else the current non-root user): the sandbox then builds its namespaces unprivileged."""
    import json
    import os
    import shutil
    import subprocess
    import tempfile
    from pathlib import Path

    python = "/usr/bin/python3"
    if not os.path.exists(python):
        pytest.skip("no /usr/bin/python3 for the unprivileged grader")
    stage = Path(tempfile.mkdtemp(prefix="moe-grade-nobody-", dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None))
    try:
        stage.chmod(0o755)
        for name in GRADING_MODULES:
            shutil.copyfile(Path(bench_grade.__file__).with_name(name), stage / name)
            (stage / name).chmod(0o644)
        cases = {name: [list(parts), fenced(code), False] for name, (parts, code) in TEST_FORGERIES.items()}
        cases["honest"] = [list(HUMANEVAL_PARTS), fenced("def add(a, b):\n    return a + b\n"), True]
        script = (f"import json, os, sys\nsys.path.insert(0, {str(stage)!r})\nimport bench_grade, sandbox\n"
                  f"cases = json.loads({json.dumps(cases)!r})\nlimits = sandbox.SandboxLimits(timeout_s=5.0)\n"
                  "out = {'uid': os.getuid()}\n"
                  "for name, (parts, answer, _) in cases.items():\n"
                  "    g = bench_grade.grade_code_program(tuple(parts), answer, limits)\n"
                  "    out[name] = [g.correct, g.detail.get('isolation', '')[:5]]\n"
                  "print(json.dumps(out))\n")
        (stage / "grade.py").write_text(script)
        (stage / "grade.py").chmod(0o644)
        prefix = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"] if os.geteuid() == 0 else []
        proc = subprocess.run([*prefix, python, "-I", str(stage / "grade.py")], capture_output=True, text=True,
                              timeout=300, env={"PATH": "/usr/bin:/bin", "HOME": str(stage)}, cwd=str(stage))
        assert proc.returncode == 0, proc.stderr[-2000:]
        report = json.loads(proc.stdout)
        assert report.pop("uid") != 0
        assert report == {name: [want, "bwrap"] for name, (_p, _a, want) in cases.items()}, report
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def test_exceptions_cross_as_their_builtin_type():
    """A test that expects the function to raise still works across the two processes; a missing
    function is a NameError in the tests."""
    parts = ("", "try:\n    pick({}, 'k')\n    raise AssertionError('no KeyError')\nexcept KeyError:\n    pass\n"
                 "assert pick({'k': 1}, 'k') == 1\n")
    assert bench_grade.grade_code_program(parts, fenced("def pick(d, k):\n    return d[k]\n"), LIMITS).correct
    missing = bench_grade.grade_code_program(parts, fenced("def other(d, k):\n    return 1\n"), LIMITS)
    assert not missing.correct and "NameError" in missing.detail["error"]


def test_the_test_process_runs_the_prefix_without_the_stubs_and_their_imports():
    """The stubs' annotations are why a HumanEval prompt imports typing; the test process (whose stubs the
    proxies replace) skips them and those imports, keeps every line number, and keeps what tests or
    helpers use."""
    import sandbox_calls

    prompt = ("from typing import List\nimport math\nimport hashlib as h\n\n\n"
              "def poly(xs: list, x: float):\n    return sum(c * math.pow(x, i) for i, c in enumerate(xs))\n\n\n"
              "def find_zero(xs: List[float]):\n    \"\"\"A zero of poly(xs).\n    \"\"\"\n")
    tests = "def check(candidate):\n    assert h.md5(b'').hexdigest()\n    assert candidate([1.0])\n"
    names = sandbox_calls.entry_points(tests + "check(find_zero)\n", prompt)
    assert names == ["find_zero"]
    out = sandbox_calls.prefix_for_tests(prompt, names, tests)
    assert out.count("\n") == prompt.count("\n")
    assert "typing" not in out and "def find_zero" not in out
    assert "import math" in out and "import hashlib as h" in out and "def poly" in out
    # two statements on a line: kept as it is
    assert sandbox_calls.prefix_for_tests("import os; import sys\n", [], "") == "import os; import sys\n"
    assert sandbox_calls.prefix_for_tests("from __future__ import annotations\n", [], "") == \
        "from __future__ import annotations\n"


def test_a_stub_importing_above_its_docstring_is_still_the_entry_point():
    """HumanEval/115's prompt imports math inside the function, above the docstring: still a stub, so the
    tests reach the candidate (with names derived, as MBPP-style callers do) and the canonical code passes."""
    import sandbox_calls

    prompt = "def ceil_sum(xs, c):\n    import math\n    \"\"\"Sum of ceil(x / c).\"\"\"\n"
    tests = "def check(candidate):\n    assert candidate([3, 4], 2) == 4\n\ncheck(ceil_sum)\n"
    assert sandbox_calls.entry_points(tests, prompt) == ["ceil_sum"]
    code = prompt + "    return sum(math.ceil(x / c) for x in xs)\n"
    assert bench_grade.grade_code_program((prompt, tests), fenced(code), LIMITS).correct
