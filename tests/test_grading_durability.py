"""Durability of graded samples: a SIGKILL during grading loses none of them, a crashed grading worker
re-grades its sample, grader failures are their own counted category, invalid Unicode is stored and graded.

Generation is replayed (tests/test_vllm_eval8.py's fixture); grading goes through the real pool with
grade functions from tests/grading_hooks.py (the real graders, slowed or crashing on purpose).
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

import results_schema
import vllm_eval8
from test_vllm_eval8 import DATA, OPTIONS, fixture_cfg, write_replay

ROOT = Path(__file__).resolve().parents[1]

DRIVER = """
import json, sys
import grading_hooks, vllm_eval8
cfg = vllm_eval8.EvalConfig(**json.loads(sys.argv[1]))
vllm_eval8.run_eval(cfg, grade_fn=grading_hooks.slow_grade)
"""


def _records(jsonl: Path) -> list:
    out = []
    for line in jsonl.read_text(encoding="utf-8").splitlines()[1:]:
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def test_sigkill_during_grading_then_rerun_reuses_every_graded_sample(tmp_path):
    replay, samples = write_replay(tmp_path, fixture_cfg(tmp_path))
    clean = vllm_eval8.run_eval(fixture_cfg(tmp_path / "clean", replay_file=str(replay)))
    killed = tmp_path / "killed"
    cfg = dict(model="replayed-model", tag="run", backend="replay", benchmarks=["mmlu_pro", "gpqa", "mmmlu"],
               data_files=DATA, bench_options={"mmmlu": {"locales": list(OPTIONS["mmmlu"]["locales"])}},
               results_dir=str(killed / "vllm_eval"), grade_workers=2, progress=False, replay_file=str(replay))
    env = {**os.environ, "GRADING_HOOK_DELAY_S": "0.4", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in ("src/quant", "src/eval", "tests"))}
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(cfg)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    jsonl = killed / "vllm_eval" / "run.jsonl"
    workers = []
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if jsonl.exists() and len(_records(jsonl)) >= 3:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-2000:]!r}"
        workers = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGKILL)  # generation is over (replay); the pool is still grading
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    on_disk = _records(jsonl)
    assert 3 <= len(on_disk) < len(samples), "kill must land while grading is still in progress"
    # the grading workers die with the process that started them
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, f"grading workers outlived a SIGKILLed parent: {[p.pid for p in alive]}"
    head = json.loads(jsonl.read_text().splitlines()[0])["header"]
    assert head["record_order"] == "graded"

    rerun_cfg = fixture_cfg(killed, replay_file=str(replay))
    resumed = vllm_eval8.run_eval(rerun_cfg)
    assert resumed["resumed"]["reused"] == len({r["id"] for r in on_disk})  # every graded sample reused
    assert resumed["resumed"]["generated"] == len(samples) - len(on_disk)
    assert results_schema.without_volatile(resumed) == results_schema.without_volatile(clean)
    assert jsonl.read_text() == (tmp_path / "clean" / "vllm_eval" / "run.jsonl").read_text()


def test_a_crashed_grading_worker_regrades_its_sample(tmp_path, monkeypatch, capfd):
    import grading_hooks

    replay, samples = write_replay(tmp_path, fixture_cfg(tmp_path))
    clean = vllm_eval8.run_eval(fixture_cfg(tmp_path / "clean", replay_file=str(replay)))
    marker = tmp_path / "crashed-once"
    monkeypatch.setenv("GRADING_HOOK_CRASH_ID", samples[5].id)
    monkeypatch.setenv("GRADING_HOOK_MARKER", str(marker))
    doc = vllm_eval8.run_eval(fixture_cfg(tmp_path / "crash", replay_file=str(replay), grade_workers=2),
                              grade_fn=grading_hooks.crash_once_grade)
    assert marker.exists()  # the worker really died on that sample ...
    assert "re-grading" in capfd.readouterr().err
    assert results_schema.without_volatile(doc) == results_schema.without_volatile(clean)  # ... and it was re-graded


def test_a_sample_that_kills_every_worker_is_a_counted_grader_error(tmp_path, monkeypatch):
    import grading_hooks

    replay, samples = write_replay(tmp_path, fixture_cfg(tmp_path))
    monkeypatch.setenv("GRADING_HOOK_CRASH_ID", samples[0].id)
    doc = vllm_eval8.run_eval(fixture_cfg(tmp_path, replay_file=str(replay), grade_workers=2),
                              grade_fn=grading_hooks.always_crash_grade)
    block = doc["benchmarks"][samples[0].bench]
    assert block["grade_errors"]["grader_error"] == 1 and block["official"]["n_grader_error"] == 1
    rec = next(r for r in _records(tmp_path / "vllm_eval" / "run.jsonl") if r["id"] == samples[0].id)
    assert rec["grade_status"] == "grader_error" and "again when graded alone" in rec["grade_detail"]["error"]
    assert doc["gate"][samples[0].bench]["excluded_grader_errors"] == 1


@pytest.mark.parametrize("workers", [0, 2])
def test_grader_failures_are_their_own_category_and_regraded_on_rerun(tmp_path, monkeypatch, workers):
    import grading_hooks

    replay, samples = write_replay(tmp_path, fixture_cfg(tmp_path))
    clean = vllm_eval8.run_eval(fixture_cfg(tmp_path / "clean", replay_file=str(replay)))
    target = samples[0]  # designed as a right answer
    monkeypatch.setenv("GRADING_HOOK_RAISE_ID", target.id)
    cfg = fixture_cfg(tmp_path / "bug", replay_file=str(replay), grade_workers=workers)
    doc = vllm_eval8.run_eval(cfg, grade_fn=grading_hooks.raising_grade)
    block = doc["benchmarks"][target.bench]
    assert block["grade_errors"] == {"grader_error": 1, "judge_error": 0}
    assert block["paired"]["grader_error"][0] == 1
    assert "grader error" in vllm_eval8.format_summary(doc)
    # the fixed grader, rerun: the generation is reused, only the failed grade is redone
    again = vllm_eval8.run_eval(cfg)
    assert again["resumed"] == {"reused": len(samples), "generated": 0, "torn_lines_dropped": 0, "regraded": 1,
                              "verdicts_changed": 1, "truncation_reapplied": 0}
    assert results_schema.without_volatile(again)["benchmarks"] == results_schema.without_volatile(clean)["benchmarks"]


def test_a_lone_surrogate_is_stored_escaped_and_graded(tmp_path):
    cfg0 = fixture_cfg(tmp_path)
    samples, _ = vllm_eval8.load_all_samples(cfg0)
    lines = []
    for i, s in enumerate(samples):
        text = f"Thinking \ud83d... the answer is ({s.gold})" if i == 1 else f"The answer is ({s.gold})"
        lines.append(json.dumps({"id": s.id, "output": text, "finish_reason": "stop", "tokens": 3}))
    replay = tmp_path / "replay.jsonl"
    replay.write_text("\n".join(lines) + "\n")
    doc = vllm_eval8.run_eval(fixture_cfg(tmp_path, replay_file=str(replay)))
    jsonl = tmp_path / "vllm_eval" / "run.jsonl"
    raw = jsonl.read_bytes()
    raw.decode("utf-8")  # the file is valid UTF-8 ...
    assert b"\\ud83d" in raw  # ... with the surrogate escaped
    rec = next(r for r in _records(jsonl) if r["id"] == samples[1].id)
    assert rec["output"].startswith("Thinking \ud83d") and rec["correct"] is True
    assert doc["benchmarks"][samples[1].bench]["acc"] == 100.0
    assert vllm_eval8.run_eval(fixture_cfg(tmp_path, replay_file=str(replay)))["resumed"]["reused"] == len(samples)


def test_an_unstorable_record_names_its_sample(tmp_path):
    import eval_resume

    with eval_resume.SampleLog(tmp_path / "x.jsonl") as log, pytest.raises(ValueError, match="'gpqa/rec7'"):
        log.append([{"id": "gpqa/rec7", "output": "x", "tokens": float("nan")}])


@pytest.mark.parametrize("workers", [0, 1])
def test_a_sample_over_its_grading_budget_is_wrong_with_grade_timeout_and_the_run_goes_on(tmp_path, monkeypatch,
                                                                                       workers):
    import grading_hooks
    from eval_grading import GradingPool

    samples, _ = vllm_eval8.load_all_samples(fixture_cfg(tmp_path))
    samples = samples[:4]
    monkeypatch.setenv("GRADING_HOOK_STALL_ID", samples[1].id)
    got = {}
    pool = GradingPool(workers, lambda s, g, robust, official: got.__setitem__(s.id, robust),
                       grading_hooks.stall_one_grade, budget_s=1.5)
    start = time.monotonic()
    try:
        for s in samples:
            pool.submit(s, {"output": f"The answer is ({s.gold})", "finish_reason": "stop", "tokens": 3})
        pool.drain()
    finally:
        pool.close()
    assert time.monotonic() - start < 60
    stalled = got.pop(samples[1].id)
    assert stalled.correct is False and stalled.detail["reason"] == "grade_timeout"
    assert len(got) == 3 and all(g.correct for g in got.values())  # the others were graded, right
