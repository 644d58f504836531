"""Every benchmark loads its fixture (the dataset's own schema) through data_file, builds prompts, and grades
known-correct and known-wrong reference answers the right way; loading and grading edge cases."""
import base64
import functools
import json
import pickle
import threading
import zlib
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bench8_loaders as bl

FIX = Path(__file__).parent / "fixtures" / "bench"


def load(bench, name, **kw):
    return bl.load_samples(bench, data_file=str(FIX / name), **kw)


def by_id(samples):
    return {s.id: s for s in samples}


def test_registry_is_complete_and_declarative():
    assert set(bl.BENCHMARKS) == {"mmlu_pro", "gpqa", "mmmlu", "math500", "aime", "lcb", "humaneval", "mbpp", "hle",
                                  "mmmu_pro", "math_vision"}
    for name, spec in bl.BENCHMARKS.items():
        assert spec.name == name and callable(spec.prompt) and callable(spec.grade) and callable(spec.extract)
        assert spec.split and spec.dataset


def test_unknown_bench_option_and_n_fail_early():
    with pytest.raises(ValueError, match="unknown benchmark"):
        bl.load_samples("mmlu", data_file=str(FIX / "mmlu_pro.jsonl"))
    with pytest.raises(ValueError, match="unknown option"):
        load("mmlu_pro", "mmlu_pro.jsonl", locales=["FR_FR"])
    with pytest.raises(ValueError, match="positive"):
        load("mmlu_pro", "mmlu_pro.jsonl", n=0)
    with pytest.raises(FileNotFoundError):
        bl.load_samples("math500", data_file=str(FIX / "missing.jsonl"))


def test_messages_are_user_chat_turns_and_json_serializable():
    for bench, name, kw in [("mmlu_pro", "mmlu_pro.jsonl", {}), ("lcb", "lcb.jsonl", {}),
                            ("hle", "hle.jsonl", {}), ("mbpp", "mbpp_sanitized.jsonl", {})]:
        for s in load(bench, name, **kw):
            assert s.messages[-1]["role"] == "user" and s.messages[-1]["content"].strip()
            json.dumps({"gold": s.gold, "meta": s.meta, "messages": s.messages})


# ------------------------------------------------------------------------------------- subsets

def test_subset_is_deterministic_nested_and_seeded():
    all4 = [s.id for s in load("mmlu_pro", "mmlu_pro.jsonl")]
    two = [s.id for s in load("mmlu_pro", "mmlu_pro.jsonl", n=2, seed=0)]
    three = [s.id for s in load("mmlu_pro", "mmlu_pro.jsonl", n=3, seed=0)]
    assert len(two) == 2 and two == [s.id for s in load("mmlu_pro", "mmlu_pro.jsonl", n=2, seed=0)]
    assert set(two) <= set(three) <= set(all4)
    assert two == [i for i in all4 if i in two]  # kept in dataset order
    seeds = {tuple(s.id for s in load("mmlu_pro", "mmlu_pro.jsonl", n=2, seed=k)) for k in range(8)}
    assert len(seeds) > 1


# -------------------------------------------------------------------------------- multiple choice

def test_mmlu_pro_prompt_gold_and_grading():
    s = by_id(load("mmlu_pro", "mmlu_pro.jsonl"))
    chem = s["mmlu_pro/70"]
    assert chem.gold == "D" and chem.group == "chemistry" and "D. Nitrogen" in chem.messages[0]["content"]
    assert "J. Ozone" in chem.messages[0]["content"]
    g = bl.grade_output(chem, "Nitrogen is ~78%. The answer is (D).")
    assert g.correct and g.extracted == "D" and not g.no_answer
    assert not bl.grade_output(chem, "The answer is (A)").correct
    none = bl.grade_output(chem, "I am not sure about this one.")
    assert none.no_answer and not none.correct and none.extracted is None
    # "N/A" padding is dropped: 5 real options, so F..J are not valid letters there
    cs = s["mmlu_pro/71"]
    assert cs.meta["n_options"] == 5 and "N/A" not in cs.messages[0]["content"]
    assert bl.grade_output(cs, "The answer is (F)").no_answer
    assert bl.grade_output(s["mmlu_pro/73"], "The answer is (I)").correct  # 'I' as the gold letter
    assert bl.grade_output(chem, "<think>The answer is (D)").no_answer  # truncated thought


def test_gpqa_permutation_is_seeded_recorded_and_gold_follows_it():
    a, b = load("gpqa", "gpqa_diamond.jsonl", seed=0), load("gpqa", "gpqa_diamond.jsonl", seed=0)
    assert [s.meta["permutation"] for s in a] == [s.meta["permutation"] for s in b]
    other = [s.meta["permutation"] for k in range(1, 6) for s in load("gpqa", "gpqa_diamond.jsonl", seed=k)]
    assert any(p != a[i % 3].meta["permutation"] for i, p in enumerate(other))
    rows = [json.loads(line) for line in (FIX / "gpqa_diamond.jsonl").read_text().splitlines()]
    for s, row in zip(a, rows):
        assert sorted(s.meta["permutation"]) == [0, 1, 2, 3]
        # the gold letter labels the correct answer's text in the prompt
        assert f"{s.gold}. {row['Correct Answer'].strip()}" in s.messages[0]["content"]
        assert bl.grade_output(s, f"Thus the answer is ({s.gold})").correct
        wrong = next(L for L in "ABCD" if L != s.gold)
        assert not bl.grade_output(s, f"Answer: {wrong}").correct


def test_mmmlu_locales_groups_and_localized_markers():
    samples = load("mmmlu", "mmmlu_{part}.jsonl", locales=["FR_FR", "ZH_CN", "ES_LA"])
    assert {s.group for s in samples} == {"FR_FR", "ZH_CN", "ES_LA"}
    s = by_id(samples)
    fr, zh, es = s["mmmlu/FR_FR/0"], s["mmmlu/ZH_CN/0"], s["mmmlu/ES_LA/0"]
    assert "Réponse : X" in fr.messages[0]["content"] and "答案：X" in zh.messages[0]["content"]
    assert bl.grade_output(fr, "Canberra est la capitale.\nRéponse : C").correct
    assert bl.grade_output(zh, "水是 H2O。\n答案：A").correct
    assert bl.grade_output(es, "Marte es rojo. Respuesta: D").correct
    assert not bl.grade_output(es, "Respuesta: A").correct
    with pytest.raises(ValueError, match="unknown locale"):
        load("mmmlu", "mmmlu_{part}.jsonl", locales=["XX_YY"])
    # n is per locale
    assert len(load("mmmlu", "mmmlu_{part}.jsonl", locales=["FR_FR", "ZH_CN"], n=1)) == 2


# ------------------------------------------------------------------------------------------- math

def test_math500_equivalence_via_math_verify():
    s = by_id(load("math500", "math500.jsonl"))
    frac, polar, root = s["math500/test/prealgebra/9001.json"], s["math500/test/precalculus/9003.json"], \
        s["math500/test/algebra/9004.json"]
    assert bl.grade_output(frac, "So the sum is $\\boxed{\\frac{5}{6}}$.").correct
    assert bl.grade_output(frac, "\\boxed{5/6}").correct
    g = bl.grade_output(frac, "\\boxed{\\frac{1}{6}}")
    assert not g.correct and not g.no_answer and g.detail["method"] == "math_verify"
    assert bl.grade_output(polar, "\\boxed{(3, \\pi/2)}").correct
    assert not bl.grade_output(polar, "\\boxed{(3, \\pi)}").correct
    assert bl.grade_output(root, "\\boxed{5\\sqrt{2}}").correct
    assert bl.grade_output(root, "first \\boxed{50} no wait \\boxed{\\sqrt{50}}").correct  # last box wins
    assert bl.grade_output(root, "<think>\\boxed{5\\sqrt{2}}").no_answer


def test_sympy_fallback_when_math_verify_missing(monkeypatch):
    import builtins

    import bench_grade

    real_import = builtins.__import__

    def no_math_verify(name, *a, **k):
        if name.startswith("math_verify"):
            raise ImportError("simulated: math-verify not installed")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_math_verify)
    assert bench_grade.math_equal("\\frac{5}{6}", "\\frac{10}{12}") == (True, "sympy_fallback")
    assert bench_grade.math_equal("\\frac{5}{6}", "\\frac{1}{6}") == (False, "sympy_fallback")


def test_aime_years_parts_and_integer_grading():
    samples = load("aime", "aime_{part}.jsonl", years=[2024, 2025])
    assert {s.group for s in samples} == {"2024", "2025"}
    s = by_id(samples)
    assert s["aime/2024/60"].gold == "24" and s["aime/2025/1"].gold == "25"
    assert bl.grade_output(s["aime/2024/60"], "The remainder is \\boxed{024}.").correct
    assert not bl.grade_output(s["aime/2024/60"], "\\boxed{25}").correct
    half = bl.grade_output(s["aime/2025/2"], "\\boxed{\\frac{1}{2}}")
    assert half.no_answer and not half.correct
    parquet = load("aime", "aime_2026.parquet", years=[2026])
    assert [p.id for p in parquet] == ["aime/2026/1", "aime/2026/2"]
    assert bl.grade_output(parquet[0], "$3^5 = \\boxed{243}$").correct
    with pytest.raises(ValueError, match="no dataset known"):
        bl.load_samples("aime", years=[1999])
    info = bl.source_info("aime", years=[2025], aime_datasets={"2025": "someone/aime25"})
    assert info["sources"][0]["dataset"] == "someone/aime25"


# ------------------------------------------------------------------------------------------- code

LCB_SUM_OK = "Read and add:\n```python\na, b = map(int, input().split())\nprint(a + b)\n```"
LCB_SUM_WRONG = "```python\na, b = map(int, input().split())\nprint(a * b)\n```"
LCB_TWOSUM_OK = ("```python\nclass Solution:\n    def twoSum(self, nums: List[int], target: int) -> List[int]:\n"
                 "        seen = {}\n        for i, x in enumerate(nums):\n            if target - x in seen:\n"
                 "                return (seen[target - x], i)\n            seen[x] = i\n```")  # a tuple: equal to the list
LCB_TWOSUM_WRONG = LCB_TWOSUM_OK.replace("return (seen[target - x], i)", "return [i, seen[target - x]]")
LCB_MEAN_OK = "```python\nn = int(input())\nxs = list(map(int, input().split()))\nprint(sum(xs) / n)   \n```"


def test_lcb_stdin_functional_tolerant_compare_and_meta():
    s = by_id(load("lcb", "lcb.jsonl"))
    add, two, mean = s["lcb/abc900_a"], s["lcb/9001"], s["lcb/9002A"]
    assert add.meta["release"] == "release_v6" and add.meta["testtype"] == "stdin"
    assert two.meta["testtype"] == "functional" and two.gold["func_name"] == "twoSum"
    assert "class Solution" in two.messages[0]["content"]
    g = bl.grade_output(add, LCB_SUM_OK)
    assert g.correct and g.detail["passed"] == g.detail["total"] == 3 and "isolation" in g.detail
    bad = bl.grade_output(add, LCB_SUM_WRONG)
    assert not bad.correct and bad.detail["passed"] == 0 and bad.detail["error"] == "wrong answer"
    assert bl.grade_output(two, LCB_TWOSUM_OK).correct
    assert not bl.grade_output(two, LCB_TWOSUM_WRONG).correct
    assert bl.grade_output(mean, LCB_MEAN_OK).correct  # 2.3333333333333335 vs 2.333333333, trailing spaces
    unclosed = "Here:\n```python\na, b = map(int, input().split())\nprint(a + b)\n"
    assert bl.grade_output(add, unclosed).correct
    assert bl.grade_output(add, "I would add the numbers.").no_answer
    crash = bl.grade_output(add, "```python\nraise SystemExit(input())\n```")
    assert not crash.correct and crash.detail["error"].startswith("error")


def test_lcb_date_window_and_release_files():
    window = load("lcb", "lcb.jsonl", date_from="2025-01-01", date_to="2025-04-30")
    assert [s.id for s in window] == ["lcb/9001"]
    assert window[0].meta["date_window"] == ["2025-01-01", "2025-04-30"]
    assert bl.lcb_release_files("release_v6") == bl.LCB_FILES
    assert bl.lcb_release_files("release_v2") == ("test.jsonl", "test2.jsonl")
    assert bl.lcb_release_files("v6") == ("test6.jsonl",)
    assert bl.lcb_release_files("v5_v6") == ("test5.jsonl", "test6.jsonl")
    with pytest.raises(ValueError, match="release"):
        bl.lcb_release_files("release_v9")


def test_lcb_private_tests_decode_and_refuse_code_in_pickles(tmp_path):
    tests = [{"input": "1\n", "output": "1\n", "testtype": "stdin"}]
    assert bl.decode_lcb_tests(bl.encode_lcb_tests(tests)) == tests
    assert bl.decode_lcb_tests(json.dumps(tests)) == tests
    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))

    evil = base64.b64encode(zlib.compress(pickle.dumps(Evil()))).decode()
    with pytest.raises(pickle.UnpicklingError, match="only plain types"):
        bl.decode_lcb_tests(evil)
    assert not marker.exists()


HE_RUNNING_MAX_OK = ("```python\nfrom typing import List\n\ndef running_max(xs: List[int]) -> List[int]:\n"
                     "    out = []\n    for x in xs:\n        out.append(x if not out else max(out[-1], x))\n"
                     "    return out\n```")
HE_BODY_ONLY = "```python\n    out, best = [], None\n    for x in xs:\n        best = x if best is None else max(best, x)\n" \
               "        out.append(best)\n    return out\n```"


def test_humaneval_reference_passes_and_wrong_fails():
    s = by_id(load("humaneval", "humaneval.jsonl"))
    rm, pal = s["humaneval/900"], s["humaneval/901"]
    assert "def running_max" in rm.messages[0]["content"]
    g = bl.grade_output(rm, HE_RUNNING_MAX_OK)
    assert g.correct and g.detail["passed"] == 1
    assert bl.grade_output(rm, HE_BODY_ONLY).correct  # a body continuing the prompt's stub also works
    assert not bl.grade_output(rm, "```python\ndef running_max(xs):\n    return xs\n```").correct
    assert bl.grade_output(pal, "```python\ndef is_palindrome_word(s):\n    return s.lower() == s.lower()[::-1]\n```").correct
    assert not bl.grade_output(pal, "```python\ndef is_palindrome_word(s):\n    return s == s[::-1]\n```").correct


def test_mbpp_sanitized_and_full():
    s = by_id(load("mbpp", "mbpp_sanitized.jsonl"))
    second, hyp = s["mbpp/9001"], s["mbpp/9002"]
    assert second.meta["config"] == "sanitized" and "assert second_largest([2, 1]) == 1" in second.messages[0]["content"]
    assert bl.grade_output(second, "```python\ndef second_largest(xs):\n    return sorted(set(xs))[-2]\n```").correct
    assert not bl.grade_output(second, "```python\ndef second_largest(xs):\n    return sorted(xs)[-2]\n```").correct
    assert bl.grade_output(hyp, "```python\ndef hyp(a, b):\n    return (a*a + b*b) ** 0.5\n```").correct  # test_imports
    full = load("mbpp", "mbpp_full.jsonl")[0]
    assert full.meta["config"] == "full"
    assert bl.grade_output(full, "```python\ndef count_vowels(s):\n    return sum(c in 'aeiou' for c in s.lower())\n```").correct
    assert not bl.grade_output(full, "```python\ndef count_vowels(s):\n    return 2\n```").correct


# -------------------------------------------------------------------------------------------- HLE

def test_hle_text_only_no_judge_string_match():
    s = by_id(load("hle", "hle.jsonl"))
    assert "hle/hlefix0003" not in s  # the image row is skipped
    prime, gas, author = s["hle/hlefix0001"], s["hle/hlefix0002"], s["hle/hlefix0004"]
    assert prime.meta["judge"] is None and gas.meta["letters"] == "ABCDE"
    g = bl.grade_output(author, "Explanation: Orwell wrote it.\nAnswer: **george orwell.**\nConfidence: 95%")
    assert g.correct and g.detail == {"judge": "none", "graded_by": "normalized_string_match"}
    assert not bl.grade_output(author, "Answer: Aldous Huxley").correct
    assert bl.grade_output(prime, "Explanation: 101 has no divisors.\nAnswer: 101\nConfidence: 99%").correct
    mc = bl.grade_output(gas, "Explanation: group 18.\nAnswer: B\nConfidence: 90%")
    assert mc.correct and mc.detail["graded_by"] == "letter_match"
    assert bl.grade_output(author, "<think>Answer: George Orwell").no_answer


class _FakeJudge(BaseHTTPRequestHandler):
    verdicts = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _FakeJudge.verdicts.append((body["model"], self.headers.get("Authorization")))
        prompt = body["messages"][0]["content"]
        if "[correct answer]\n101" in prompt:
            self.send_response(500)
            self.end_headers()
            return
        yes = "Eric Arthur Blair" in prompt
        reply = f"extracted_final_answer: x\ncorrect: {'yes' if yes else 'no'}"
        data = json.dumps({"choices": [{"message": {"content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_hle_judge_endpoint_decides_and_failures_fall_back(monkeypatch):
    server = HTTPServer(("127.0.0.1", 0), _FakeJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("MOE_LOWBIT_JUDGE_API_KEY", "sk-testjudgekey123")
    try:
        url = f"http://127.0.0.1:{server.server_port}/v1"
        s = by_id(load("hle", "hle.jsonl", judge_url=url, judge_model="judge-m"))
        author, prime = s["hle/hlefix0004"], s["hle/hlefix0001"]
        assert author.meta["judge"]["model"] == "judge-m" and "sk-" not in json.dumps(author.meta)
        g = bl.grade_output(author, "Answer: Eric Arthur Blair")  # a string match would say wrong
        assert g.correct and g.detail == {"judge": f"judge-m@{url}", "graded_by": "judge"}
        assert not bl.grade_output(author, "Answer: Aldous Huxley").correct
        assert _FakeJudge.verdicts[-1] == ("judge-m", "Bearer sk-testjudgekey123")
        failed = bl.grade_output(prime, "Answer: 101")  # the fake judge answers 500 here
        assert failed.correct and failed.detail["graded_by"] == "normalized_string_match"
        assert "judge_error" in failed.detail and failed.detail["judge"] == f"judge-m@{url}"
        assert bl.grade_status(failed) == bl.JUDGE_ERROR and bl.grade_status(g) == "ok"  # counted apart
    finally:
        server.shutdown()
    with pytest.raises(ValueError, match="judge model"):
        load("hle", "hle.jsonl", judge_url="http://127.0.0.1:1/v1")


def test_grading_environment_names_the_sandbox_and_fails_loudly(monkeypatch):
    env = bl.grading_environment(["lcb", "mmlu_pro"])
    assert env["sandbox"] and env["math_verify"]
    assert "sandbox" not in bl.grading_environment(["mmlu_pro"])

    asked = []

    def broken(allow_weak=False):
        asked.append(allow_weak)
        raise RuntimeError("no sandbox configuration can run Python here")

    import sandbox

    monkeypatch.setattr(sandbox, "detect_isolation", broken)
    with pytest.raises(RuntimeError, match="no sandbox"):
        bl.grading_environment(["humaneval"])
    with pytest.raises(RuntimeError, match="no sandbox"):
        bl.grading_environment(["humaneval"], allow_weak_sandbox=True)
    assert asked == [False, True]  # the weak tiers are asked for only when the user allowed them
    bl.grading_environment(["math500"])  # no code, no sandbox needed


def test_grade_output_never_raises_on_odd_inputs():
    chem = load("mmlu_pro", "mmlu_pro.jsonl")[0]
    assert bl.grade_output(chem, None).no_answer
    broken = bl.Sample(id="x", bench="math500", messages=(), gold=None, meta={})
    g = bl.grade_output(broken, "\\boxed{1}")
    assert not g.correct
    nobench = bl.Sample(id="y", bench="nope", messages=(), gold="A", meta={})
    assert "grader crashed" in bl.grade_output(nobench, "A").detail["error"]


@functools.lru_cache(maxsize=1)
def _fuzz_samples():
    return (load("mmlu_pro", "mmlu_pro.jsonl")[:2] + load("gpqa", "gpqa_diamond.jsonl")[:1]
            + load("mmmlu", "mmmlu_{part}.jsonl", locales=["ZH_CN"])[:1] + load("math500", "math500.jsonl")[:2]
            + load("aime", "aime_{part}.jsonl", years=[2025])[:1] + load("hle", "hle.jsonl")[:2])


PIECES = st.sampled_from(["<think>", "</think>", "\\boxed{", "}", "{", "The answer is (", ")", "Answer: ", "答案：",
                          "\\frac{1}{2}", "x^2", "```python\n", "```", "\n", " ", "A", "J", "24", "$", "\\", "∞", "\x00"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=200), st.lists(PIECES, max_size=30).map("".join)))
def test_fuzz_no_grader_raises(text):
    for sample in _fuzz_samples():
        g = bl.grade_output(sample, text)
        assert isinstance(g, bl.Graded) and isinstance(g.correct, bool)
        assert "grader crashed" not in str(g.detail.get("error", ""))
        assert not (g.correct and g.no_answer)


# ------------------------------------------------------------------ hub path (no network: the loader is faked)

def test_hub_path_asks_for_the_declared_dataset_config_split_revision(monkeypatch):
    import datasets

    calls = []
    rows = [json.loads(line) for line in (FIX / "hle.jsonl").read_text().splitlines()]

    def fake_load_dataset(path, name=None, split=None, revision=None):
        calls.append((path, name, split, revision))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    samples = bl.load_samples("hle", revision="abc123")
    assert calls == [("cais/hle", None, "test", "abc123")]
    assert [s.id for s in samples] == ["hle/hlefix0001", "hle/hlefix0002", "hle/hlefix0004"]
    calls.clear()
    monkeypatch.setattr(datasets, "load_dataset", lambda path, name=None, split=None, revision=None: (
        calls.append((path, name, split, revision)) or datasets.Dataset.from_list(
            [json.loads(line) for line in (FIX / f"mmmlu_{name}.jsonl").read_text().splitlines()])))
    mm = bl.load_samples("mmmlu", locales=["FR_FR", "ZH_CN"])
    assert calls == [("openai/MMMLU", "FR_FR", "test", None), ("openai/MMMLU", "ZH_CN", "test", None)]
    assert len(mm) == 4


def test_lcb_hub_release_reads_the_release_files(monkeypatch, tmp_path):
    import huggingface_hub

    lines = (FIX / "lcb.jsonl").read_text().splitlines()
    (tmp_path / "test.jsonl").write_text(lines[0] + "\n")
    (tmp_path / "test2.jsonl").write_text("\n".join(lines[1:]) + "\n")
    asked = []

    def fake_download(repo_id, filename, repo_type=None, revision=None):
        asked.append((repo_id, filename, repo_type, revision))
        return str(tmp_path / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    samples = bl.load_samples("lcb", release="release_v2", date_from="2025-05-01")
    assert asked == [("livecodebench/code_generation_lite", "test.jsonl", "dataset", None),
                     ("livecodebench/code_generation_lite", "test2.jsonl", "dataset", None)]
    assert [s.id for s in samples] == ["lcb/9002A"]
    assert samples[0].meta["release"] == "release_v2" and samples[0].meta["date_window"] == ["2025-05-01", None]


CODE_PIECES = st.sampled_from(["```python\n", "```\n", "print(1)\n", "input()\n", "import os\n", "while 1: pass\n",
                               "class Solution:\n    def twoSum(self, a, b):\n        return [0, 1]\n", "<think>",
                               "</think>", "raise SystemExit(3)\n", "\x00", "def running_max(xs): return xs\n"])


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(CODE_PIECES, max_size=8).map("".join))
def test_fuzz_no_code_grader_raises(text):
    for sample in _code_fuzz_samples():
        g = bl.grade_output(sample, text)
        assert isinstance(g.correct, bool) and "grader crashed" not in str(g.detail.get("error", ""))


@functools.lru_cache(maxsize=1)
def _code_fuzz_samples():
    short = {"timeout_s": 1.0}
    return (load("lcb", "lcb.jsonl", **short)[:2] + load("humaneval", "humaneval.jsonl", **short)[:1]
            + load("mbpp", "mbpp_sanitized.jsonl", **short)[:1])


# ------------------------------------------------------------------------ data-file errors name file/line/field
def test_data_file_errors_name_the_file_line_and_field(tmp_path):
    he = [json.loads(x) for x in (FIX / "humaneval.jsonl").read_text().splitlines()]
    rows = [dict(he[0]), {k: v for k, v in he[1].items() if k != "test"}]
    path = tmp_path / "he.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(bl.DataFileError, match=rf"{path}:2: humaneval row lacks required field\(s\) \['test'\]"):
        bl.load_samples("humaneval", data_file=str(path))
    rows[1] = {k: v for k, v in he[1].items() if k != "entry_point"}
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(bl.DataFileError, match=r"he.jsonl:2: .*\['entry_point'\]"):
        bl.load_samples("humaneval", data_file=str(path))

    mp = [json.loads(x) for x in (FIX / "mmlu_pro.jsonl").read_text().splitlines()]
    bad = tmp_path / "mp.jsonl"
    bad.write_text(json.dumps(mp[0]) + "\n" + json.dumps(list(mp[1].values())) + "\n")
    with pytest.raises(bl.DataFileError, match=r"mp.jsonl:2: mmlu_pro row is a list, expected an object"):
        bl.load_samples("mmlu_pro", data_file=str(bad))
    bad.write_text(json.dumps(mp[0]) + "\n\n" + '{"question_id": 9, "question": "x"' + "\n")
    with pytest.raises(bl.DataFileError, match=r"mp.jsonl:3: not a JSON object"):
        bl.load_samples("mmlu_pro", data_file=str(bad))
    no_index = {k: v for k, v in mp[0].items() if k != "answer_index"}
    bad.write_text(json.dumps({**no_index, "answer": "Z"}) + "\n")
    with pytest.raises(bl.DataFileError, match=r"mp.jsonl:1: mmlu_pro: ValueError: field 'answer' is 'Z'"):
        bl.load_samples("mmlu_pro", data_file=str(bad))
    js = tmp_path / "rows.json"
    js.write_text(json.dumps([mp[0], {"question": "q"}]))
    with pytest.raises(bl.DataFileError, match=r"rows.json row 1: mmlu_pro row lacks required field\(s\) \['options', 'answer'\]"):
        bl.load_samples("mmlu_pro", data_file=str(js))


def test_every_spec_declares_its_official_scorer():
    for spec in bl.BENCHMARKS.values():
        assert spec.official.name and spec.official.source, spec.name
    assert bl.BENCHMARKS["mmlu_pro"].official.name == "mmlu_pro/tiger-lab"
    assert bl.BENCHMARKS["gpqa"].official.name == "gpqa/idavidrein"
    assert bl.BENCHMARKS["math500"].official.name == "math-verify"
    assert bl.BENCHMARKS["humaneval"].official.grade is None  # the tests are the official rule
