"""Resume re-derives verdicts: a grader change re-grades stored generations, the truncation rule is
re-applied from finish_reason, --regrade audits a finished run with no engine, and an unwritable results
dir is one line before anything loads."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import eval_fingerprint
import results_regrade
import results_schema
import vllm_eval8
from test_vllm_eval8 import fixture_cfg, write_replay

ROOT = Path(__file__).resolve().parents[1]


def _lines(path: Path) -> list:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def _write(path: Path, rows: list) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _run(tmp_path):
    replay, samples = write_replay(tmp_path, fixture_cfg(tmp_path))
    cfg = fixture_cfg(tmp_path / "run", replay_file=str(replay))
    return cfg, vllm_eval8.run_eval(cfg), samples


def test_fingerprint_covers_the_grading_code(tmp_path, monkeypatch):
    base = eval_fingerprint.grader_fingerprint()
    assert base == eval_fingerprint.grader_fingerprint() and len(base) == 16
    assert all(eval_fingerprint.module_source(m) for m in ("bench_extract", "bench_grade", "sandbox", "bench_code"))
    grader = tmp_path / "moe_test_grader.py"
    grader.write_text("def grade(x):\n    return x == 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    modules = ("bench_extract", "moe_test_grader")
    before = eval_fingerprint.grader_fingerprint(modules)
    grader.write_text("def grade(x):\n    return x == 2\n")  # a grader fix
    assert eval_fingerprint.grader_fingerprint(modules) != before


def test_resume_after_a_grader_change_regrades_and_counts_what_changed(tmp_path):
    cfg, clean, samples = _run(tmp_path)
    jsonl = Path(cfg.results_paths()[1])
    rows = _lines(jsonl)
    assert rows[0]["header"]["grader_fingerprint"] == clean["grading"]["grader_fingerprint"]
    # An old grader wrote these rows: a different fingerprint, and it scored two wrong answers right.
    flipped = []
    for r in rows[1:]:
        r["grader_fingerprint"] = "old-grader"
        if not r["graded_correct"] and r["finish_reason"] == "stop" and len(flipped) < 2:
            r["graded_correct"] = r["correct"] = r["official_correct"] = True
            flipped.append(r["id"])
    assert len(flipped) == 2
    _write(jsonl, rows)
    again = vllm_eval8.run_eval(cfg)
    assert again["resumed"]["generated"] == 0  # generations reused ...
    assert again["resumed"]["regraded"] == len(samples)  # ... every verdict recomputed
    assert again["resumed"]["verdicts_changed"] == 2
    assert results_schema.without_volatile(again)["benchmarks"] == results_schema.without_volatile(clean)["benchmarks"]


def test_resume_reapplies_the_truncation_rule(tmp_path):
    cfg, clean, samples = _run(tmp_path)
    jsonl = Path(cfg.results_paths()[1])
    rows = _lines(jsonl)
    cut = [r for r in rows[1:] if r["finish_reason"] == "length" and r["graded_correct"]]
    assert cut, "the fixture has truncated right answers"
    for r in cut:
        r["correct"] = True  # a truncated row left as correct
    _write(jsonl, rows)
    again = vllm_eval8.run_eval(cfg)
    assert again["resumed"]["truncation_reapplied"] == len(cut) and again["resumed"]["regraded"] == 0
    assert results_schema.without_volatile(again)["benchmarks"] == results_schema.without_volatile(clean)["benchmarks"]


def test_regrade_audits_a_hand_edited_run_without_an_engine(tmp_path, capsys):
    cfg, clean, samples = _run(tmp_path)
    jsonl = Path(cfg.results_paths()[1])
    rows = _lines(jsonl)
    edited = next(r for r in rows[1:] if not r["graded_correct"] and r["finish_reason"] == "stop")
    edited["graded_correct"] = edited["correct"] = edited["official_correct"] = True  # same fingerprint
    _write(jsonl, rows)
    os.remove(cfg.replay_file)  # nothing can generate: the audit must use the stored generations only
    assert vllm_eval8.main(["--regrade", cfg.tag, "--results-dir", cfg.results_dir]) == 0
    out = capsys.readouterr().out
    assert f"{edited['id']}: correct True -> False" in out and "1 verdict(s) changed" not in out  # two fields
    assert f"regrade {cfg.tag}: {len(samples)} stored generation(s) graded again, 2 verdict(s) changed" in out
    fixed = json.loads(Path(cfg.results_paths()[0]).read_text())
    assert fixed["benchmarks"] == clean["benchmarks"]


def test_regrade_of_a_missing_run_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "vllm_eval8", "--regrade", "nope", "--results-dir", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ})
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "nope.json does not exist" in proc.stderr


def _readonly_dir(tmp_path) -> tuple:
    """A results dir this process cannot write: a read-only bind mount when root (root ignores modes)."""
    target = tmp_path / "ro"
    target.mkdir()
    if os.geteuid() != 0:
        target.chmod(0o555)
        return target, []
    if shutil.which("unshare") is None:
        pytest.skip("root without unshare: no way to make a read-only dir")
    return target, ["unshare", "--mount", "--", "sh", "-c",
                    f"mount --bind -o ro {target} {target} && exec \"$@\"", "sh"]


def test_a_readonly_results_dir_is_one_line_before_anything_loads(tmp_path):
    target, wrap = _readonly_dir(tmp_path)
    cmd = [*wrap, sys.executable, "-m", "vllm_eval8", "--model", "m", "--tag", "t", "--backend", "replay",
           "--replay-file", str(tmp_path / "absent.jsonl"), "--benchmarks", "gpqa", "--results-dir", str(target / "x")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "is not writable" in proc.stderr and str(target / "x") in proc.stderr
    assert not (target / "x").exists()


def test_code_runs_record_the_memory_mechanisms_and_the_fingerprint(tmp_path):
    from test_vllm_eval8 import FIX

    base = dict(benchmarks=("humaneval",), data_files={"humaneval": str(FIX / "humaneval.jsonl")}, bench_options={})
    samples, _ = vllm_eval8.load_all_samples(fixture_cfg(tmp_path, **base))
    replay = tmp_path / "he.jsonl"
    replay.write_text("".join(json.dumps({"id": s.id, "output": "no code", "finish_reason": "stop"}) + "\n"
                              for s in samples))
    grading = vllm_eval8.run_eval(fixture_cfg(tmp_path, **base, replay_file=str(replay)))["grading"]
    assert grading["grader_fingerprint"] == eval_fingerprint.grader_fingerprint()
    assert any(m.startswith("seccomp(") for m in grading["sandbox_memory"]), grading
    assert any(m.startswith("tmpfs_workdir") for m in grading["sandbox_memory"])
