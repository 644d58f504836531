"""The eval runner: summary math on real fixture samples, resume after a kill, config guards, CLI, secrets.

Fast tests generate nothing: they replay designed outputs through the replay backend (the same runner,
grading and logging path as a model run). The slow test kills a real `python -m vllm_eval8` subprocess
generating with SmolLM2 on the hf backend and checks the resumed result equals an uninterrupted one.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import backend_base

import backend_replay

import backend_vllm
import results_md
import results_schema
import vllm_eval8

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "bench"
DATA = {"mmlu_pro": str(FIX / "mmlu_pro.jsonl"), "gpqa": str(FIX / "gpqa_diamond.jsonl"),
        "mmmlu": str(FIX / "mmmlu_{part}.jsonl")}
OPTIONS = {"mmmlu": {"locales": ("FR_FR", "ZH_CN", "ES_LA")}}


def fixture_cfg(tmp_path, tag="run", **kw):
    base = dict(model="replayed-model", tag=tag, backend="replay", benchmarks=("mmlu_pro", "gpqa", "mmmlu"),
                data_files=DATA, bench_options=OPTIONS, results_dir=str(tmp_path / "vllm_eval"),
                grade_workers=0, progress=False)
    base.update(kw)
    return vllm_eval8.EvalConfig(**base)


def designed_output(i, sample):
    """Sample i: right answer, wrong answer, or no answer; every fourth one cut off by the budget."""
    wrong = "A" if sample.gold != "A" else "B"
    text = [f"Step by step... The answer is ({sample.gold})", f"Hmm. The answer is ({wrong})", "I am not sure."][i % 3]
    return {"id": sample.id, "output": text, "finish_reason": "length" if i % 4 == 3 else "stop", "tokens": 10 + i}


def write_replay(tmp_path, cfg):
    samples, _ = vllm_eval8.load_all_samples(cfg)
    path = tmp_path / "replay.jsonl"
    path.write_text("".join(json.dumps(designed_output(i, s)) + "\n" for i, s in enumerate(samples)))
    return path, samples


class CountingReplay(backend_replay.ReplayBackend):
    def __init__(self, path, stop_after=None):
        super().__init__(path)
        self.asked, self.stop_after = [], stop_after

    def stream(self, samples):
        self.asked.extend(s.id for s in samples)
        for k, item in enumerate(super().stream(samples)):
            if self.stop_after is not None and k == self.stop_after:
                raise KeyboardInterrupt("simulated kill")
            yield item


def test_summary_counts_truncation_as_wrong_and_breaks_down_groups(tmp_path):
    cfg0 = fixture_cfg(tmp_path)
    replay, samples = write_replay(tmp_path, cfg0)
    doc = vllm_eval8.run_eval(fixture_cfg(tmp_path, replay_file=str(replay)))
    expected = {}
    for i, s in enumerate(samples):
        out = designed_output(i, s)
        graded_right, truncated = i % 3 == 0, out["finish_reason"] == "length"
        expected.setdefault(s.bench, []).append((graded_right and not truncated, graded_right, truncated,
                                                 i % 3 == 2, s.group, out["tokens"]))
    for bench, rows in expected.items():
        b = doc["benchmarks"][bench]
        n = len(rows)
        finished = [r for r in rows if not r[2]]
        assert b["n"] == n and b["correct"] == sum(r[0] for r in rows)
        assert b["acc"] == pytest.approx(100 * sum(r[0] for r in rows) / n)
        assert b["acc_finished"] == pytest.approx(100 * sum(r[1] for r in finished) / len(finished))
        assert b["n_trunc"] == sum(r[2] for r in rows) and b["n_no_answer"] == sum(r[3] for r in rows)
        assert b["ci95"] == pytest.approx(list(results_schema.wilson_interval(b["correct"], n)))
        assert b["tokens_mean"] == pytest.approx(sum(r[5] for r in rows) / n)
        assert b["paired"]["ids"] == [s.id for s in samples if s.bench == bench]
    groups = doc["benchmarks"]["mmmlu"]["groups"]
    assert sorted(groups) == ["ES_LA", "FR_FR", "ZH_CN"]
    assert doc["benchmarks"]["mmmlu"]["macro_acc"] == pytest.approx(sum(g["acc"] for g in groups.values()) / 3)
    lines = (tmp_path / "vllm_eval" / "run.jsonl").read_text().splitlines()
    assert "header" in json.loads(lines[0]) and len(lines) == 1 + len(samples)
    rec = json.loads(lines[1 + 3])  # i=3: a right answer ... that was truncated
    assert rec["finish_reason"] == "length" and rec["correct"] is False
    assert rec["prompt_hash"] == results_schema.prompt_hash(samples[3].messages)
    assert doc["provenance"]["datasets"]["gpqa"]["n"] == 3 and doc["provenance"]["git_sha"]


def test_grading_pool_gives_the_same_result_as_inline(tmp_path):
    replay, _ = write_replay(tmp_path, fixture_cfg(tmp_path))
    inline = vllm_eval8.run_eval(fixture_cfg(tmp_path / "inline", replay_file=str(replay)))
    pooled = vllm_eval8.run_eval(fixture_cfg(tmp_path / "pool", replay_file=str(replay), grade_workers=2))
    assert results_schema.without_volatile(pooled) == results_schema.without_volatile(inline)
    assert ((tmp_path / "pool" / "vllm_eval" / "run.jsonl").read_text()
            == (tmp_path / "inline" / "vllm_eval" / "run.jsonl").read_text())


def test_wilson_interval_known_value():
    lo, hi = results_schema.wilson_interval(8, 10)  # textbook: 0.490 .. 0.943
    assert lo == pytest.approx(49.0, abs=0.05) and hi == pytest.approx(94.3, abs=0.05)
    assert results_schema.wilson_interval(0, 5)[0] == 0.0 and results_schema.wilson_interval(5, 5)[1] == 100.0


@pytest.mark.parametrize("grade_workers", [0, 2])
def test_killed_run_resumes_without_regenerating_and_matches_clean_run(tmp_path, grade_workers):
    """Interrupted after 4 generations: all 4 are logged (graded inline or in the pool), none redone."""
    replay, samples = write_replay(tmp_path, fixture_cfg(tmp_path))
    clean_dir, killed_dir = tmp_path / "clean", tmp_path / "killed"
    clean = vllm_eval8.run_eval(fixture_cfg(clean_dir, replay_file=str(replay)))

    cfg = fixture_cfg(killed_dir, replay_file=str(replay), grade_workers=grade_workers)
    with pytest.raises(KeyboardInterrupt):
        vllm_eval8.run_eval(cfg, backend=CountingReplay(replay, stop_after=4))
    jsonl = killed_dir / "vllm_eval" / "run.jsonl"
    done = [json.loads(x)["id"] for x in jsonl.read_text().splitlines()[1:]]
    assert len(done) == 4 and not (killed_dir / "vllm_eval" / "run.json").exists()
    with open(jsonl, "a") as f:  # a torn last line, as left by a kill in mid-write
        f.write('{"id": "gpqa/rec0", "output": "The ans')

    second = CountingReplay(replay)
    resumed = vllm_eval8.run_eval(cfg, backend=second)
    assert second.asked == [s.id for s in samples if s.id not in done]
    assert resumed["resumed"] == {"reused": 4, "generated": len(samples) - 4, "torn_lines_dropped": 1, "regraded": 0,
                                  "verdicts_changed": 0, "truncation_reapplied": 0}
    assert results_schema.without_volatile(resumed) == results_schema.without_volatile(clean)
    assert jsonl.read_text() == (clean_dir / "vllm_eval" / "run.jsonl").read_text()

    third = CountingReplay(replay)  # nothing left to do: no generation at all
    vllm_eval8.run_eval(cfg, backend=third)
    assert third.asked == []


def test_changed_config_is_refused_or_restarted(tmp_path):
    replay, _ = write_replay(tmp_path, fixture_cfg(tmp_path))
    vllm_eval8.run_eval(fixture_cfg(tmp_path, replay_file=str(replay)))
    other = tmp_path / "other.jsonl"
    other.write_text(replay.read_text().replace("I am not sure.", "Unsure."))
    with pytest.raises(vllm_eval8.ResumeMismatch, match="different config.*--restart"):
        vllm_eval8.run_eval(fixture_cfg(tmp_path, replay_file=str(other)))
    with pytest.raises(vllm_eval8.ResumeMismatch, match="thinking"):
        vllm_eval8.run_eval(fixture_cfg(tmp_path, replay_file=str(replay), thinking=False))
    doc = vllm_eval8.run_eval(fixture_cfg(tmp_path, replay_file=str(other), restart=True))
    assert doc["resumed"]["reused"] == 0
    assert list((tmp_path / "vllm_eval").glob("run.jsonl.stale-*"))


def test_changed_prompt_is_refused(tmp_path):
    data = tmp_path / "mmlu_pro.jsonl"
    data.write_text((FIX / "mmlu_pro.jsonl").read_text())
    cfg = fixture_cfg(tmp_path, benchmarks=("mmlu_pro",), data_files={"mmlu_pro": str(data)})
    replay, _ = write_replay(tmp_path, cfg)
    cfg = fixture_cfg(tmp_path, benchmarks=("mmlu_pro",), data_files={"mmlu_pro": str(data)}, replay_file=str(replay))
    vllm_eval8.run_eval(cfg)
    data.write_text(data.read_text().replace("Which organ produces insulin?", "Which organ makes insulin?"))
    with pytest.raises(vllm_eval8.ResumeMismatch, match="prompt of 'mmlu_pro/73' changed"):
        vllm_eval8.run_eval(cfg)


def test_backend_must_match_config(tmp_path):
    replay, _ = write_replay(tmp_path, fixture_cfg(tmp_path))
    with pytest.raises(ValueError, match="config hash must describe"):
        vllm_eval8.run_eval(fixture_cfg(tmp_path, backend="hf"), backend=CountingReplay(replay))


def test_secrets_never_reach_any_output(tmp_path, monkeypatch):
    hf_token, api_key = "hf_" + "Zq9" * 8, "sk-" + "Yx7" * 8
    monkeypatch.setenv("HF_TOKEN", hf_token)
    monkeypatch.setenv("OPENAI_API_KEY", api_key)
    replay, _ = write_replay(tmp_path, fixture_cfg(tmp_path))
    argv = ["--model", "m", "--tag", "teacher-x", "--backend", "replay", "--replay-file", str(replay),
            "--benchmarks", "mmlu_pro,gpqa", "--results-dir", str(tmp_path / "vllm_eval"), "--grade-workers", "0",
            "--data-file", f"mmlu_pro={DATA['mmlu_pro']}", "--data-file", f"gpqa={DATA['gpqa']}",
            "--served-model-name", hf_token, "--no-progress", f"--hf_token={api_key}"]
    with pytest.raises(SystemExit):  # the stray flag is rejected by argparse ...
        vllm_eval8.main(argv)
    assert vllm_eval8.main(argv[:-1]) == 0  # ... and the run with the token as a value succeeds
    assert results_md.main(["--results-dir", str(tmp_path)]) == 0
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "replay.jsonl"]
    assert any(p.suffix == ".json" for p in files) and any(p.name == "RESULTS.md" for p in files)
    for path in files:
        text = path.read_text(errors="replace")
        assert hf_token not in text and api_key not in text, path


def test_cli_flags_beat_env_beat_defaults():
    parser = vllm_eval8.build_parser()
    env = {"EVAL_TEMPERATURE": "0.2", "EVAL_TOP_K": "5", "EVAL_N": "7,gpqa=198", "EVAL_THINKING": "off",
           "EVAL_DATA_FILES": "gpqa=/d/g.jsonl"}
    args = parser.parse_args(["--model", "m", "--tag", "t", "--top-k", "9", "--n", "mmlu_pro=150",
                              "--benchmarks", "gpqa,mmlu_pro", "--option", "mmmlu.locales=FR_FR,ZH_CN"])
    cfg = vllm_eval8.config_from_args(args, environ=env)
    assert cfg.temperature == 0.2 and cfg.top_k == 9 and cfg.thinking is False and cfg.top_p == 0.95
    assert cfg.n == {"mmlu_pro": 150} and cfg.n_default is None  # --n given: EVAL_N is not merged in
    assert cfg.data_files == {"gpqa": "/d/g.jsonl"} and cfg.benchmarks == ("gpqa", "mmlu_pro")
    assert cfg.bench_options == {"mmmlu": {"locales": ("FR_FR", "ZH_CN")}}
    assert cfg.n_for("mmlu_pro") == 150 and cfg.n_for("gpqa") is None
    cfg = vllm_eval8.config_from_args(parser.parse_args(["--model", "m", "--tag", "t"]), environ=env)
    assert cfg.n_default == 7 and cfg.n_for("gpqa") == 198
    with pytest.raises(ValueError, match="budget"):
        vllm_eval8.config_from_args(parser.parse_args(["--model", "m", "--tag", "t", "--budget", "8k"]), environ={})
    with pytest.raises(ValueError, match="--model"):
        vllm_eval8.config_from_args(parser.parse_args(["--tag", "t"]), environ={})


def test_budget_maps_to_engine_limits():
    cfg = vllm_eval8.EvalConfig(model="m", tag="t", budget="64k")
    assert (cfg.resolved_max_new_tokens(), cfg.resolved_max_model_len(), cfg.resolved_max_num_seqs()) == (
        65536, 73728, 128)
    cfg = vllm_eval8.EvalConfig(model="m", tag="t", budget="32k", max_new_tokens=100)
    assert cfg.resolved_max_new_tokens() == 100 and cfg.resolved_max_model_len() == 40960


def test_eval_env_defaults_equal_evalconfig_defaults():
    """configs/eval.env (what eval.sh reads) and EvalConfig's defaults say the same thing."""
    args = vllm_eval8.build_parser().parse_args(["--model", "m", "--tag", "t", "--default-recipe",
                                                 str(ROOT / "configs" / "eval.env")])
    from_recipe = vllm_eval8.config_from_args(args, environ={})
    assert from_recipe == vllm_eval8.EvalConfig(model="m", tag="t", results_dir=str(ROOT / "results" / "vllm_eval"))


def test_unknown_eval_key_is_named_and_old_names_still_work(capsys):
    args = vllm_eval8.build_parser().parse_args(["--model", "m", "--tag", "t"])
    with pytest.raises(ValueError, match="EVAL_TEMPRATURE"):
        vllm_eval8.config_from_args(args, environ={"EVAL_TEMPRATURE": "0.1"})
    cfg = vllm_eval8.config_from_args(args, environ={"EVAL_OPTIONS": "mmmlu.locales=FR_FR,ZH_CN"})
    assert cfg.bench_options == {"mmmlu": {"locales": ("FR_FR", "ZH_CN")}}
    assert "EVAL_OPTIONS is deprecated; use EVAL_BENCH_OPTIONS" in capsys.readouterr().err


def test_pipeline_passes_arguments_through(tmp_path):
    env = {**os.environ, "EVAL_TEMPERATURE": "0.1"}
    out = subprocess.run(["bash", str(ROOT / "pipelines" / "eval.sh"), "--help"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0 and "--replay-file" in out.stdout
    bad = subprocess.run(["bash", str(ROOT / "pipelines" / "eval.sh"), "--model", "m", "--tag", "t",
                          "--benchmarks", "nosuchbench"], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "unknown benchmark" in bad.stderr


def test_compare_subcommand(tmp_path, capsys):
    replay, _ = write_replay(tmp_path, fixture_cfg(tmp_path))
    vllm_eval8.run_eval(fixture_cfg(tmp_path, tag="a", replay_file=str(replay)))
    vllm_eval8.run_eval(fixture_cfg(tmp_path, tag="b", replay_file=str(replay)))
    d = tmp_path / "vllm_eval"
    assert vllm_eval8.main(["compare", str(d / "a.json"), str(d / "b.json")]) == 0
    assert "+0.00" in capsys.readouterr().out


@pytest.mark.slow
def test_killed_subprocess_resumes_to_the_uninterrupted_result(tmp_path, smollm2_dir):
    """Real generation (hf backend, greedy, SmolLM2): SIGKILL mid-run, rerun, same JSON as a clean run."""
    def argv(results):
        return [sys.executable, "-m", "vllm_eval8", "--model", str(smollm2_dir), "--tag", "kill",
                "--backend", "hf", "--benchmarks", "mmlu_pro", "--data-file", f"mmlu_pro={DATA['mmlu_pro']}",
                "--temperature", "0", "--max-new-tokens", "24",
                "--hf-batch-size", "1", "--grade-workers", "0", "--results-dir", str(results), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1",  # a shared 2-core box: more threads only contend
           "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in ("src/quant", "src/eval", "src/distill"))}
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    subprocess.run(argv(clean), env=env, check=True, capture_output=True, timeout=600)
    proc = subprocess.Popen(argv(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    jsonl, deadline = killed / "kill.jsonl", time.time() + 600
    try:
        while time.time() < deadline and proc.poll() is None:
            if jsonl.exists() and len(jsonl.read_text().splitlines()) >= 1 + 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    done = len(jsonl.read_text().splitlines()) - 1
    assert 2 <= done < 4
    out = subprocess.run(argv(killed), env=env, check=True, capture_output=True, text=True, timeout=600)
    assert f"resuming kill: {done} finished samples reused" in out.stderr
    a = json.loads((clean / "kill.json").read_text())
    b = json.loads((killed / "kill.json").read_text())
    assert b["resumed"]["reused"] == done and b["resumed"]["generated"] == 4 - done
    assert results_schema.without_volatile(a) == results_schema.without_volatile(b)
    assert (clean / "kill.jsonl").read_text() == jsonl.read_text()


def test_code_runs_record_the_sandbox_tier_and_the_weak_sandbox_switch(tmp_path):
    data = {"humaneval": str(FIX / "humaneval.jsonl")}
    base = dict(benchmarks=("humaneval",), data_files=data, bench_options={})
    samples, _ = vllm_eval8.load_all_samples(fixture_cfg(tmp_path, **base))
    replay = tmp_path / "he.jsonl"
    replay.write_text("".join(json.dumps({"id": s.id, "output": "no code here", "finish_reason": "stop"}) + "\n"
                              for s in samples))
    doc = vllm_eval8.run_eval(fixture_cfg(tmp_path, **base, replay_file=str(replay)))
    grading = doc["grading"]
    assert grading["allow_weak_sandbox"] is False and grading["sandbox"] and grading["sandbox_strong"] is True
    assert "sandbox:" in vllm_eval8.format_summary(doc)
    weak_cfg = fixture_cfg(tmp_path, tag="weak", **base, replay_file=str(replay), allow_weak_sandbox=True)
    weak_samples, _ = vllm_eval8.load_all_samples(weak_cfg)
    assert all(s.meta["allow_weak_sandbox"] for s in weak_samples)  # what the grading workers' limits read
    assert vllm_eval8.run_eval(weak_cfg)["grading"]["allow_weak_sandbox"] is True
    args = vllm_eval8.build_parser().parse_args(["--model", "m", "--tag", "t", "--allow-weak-sandbox"])
    assert vllm_eval8.config_from_args(args, environ={}).allow_weak_sandbox is True
    args = vllm_eval8.build_parser().parse_args(["--model", "m", "--tag", "t"])
    assert vllm_eval8.config_from_args(args, environ={"EVAL_ALLOW_WEAK_SANDBOX": "1"}).allow_weak_sandbox is True
    assert vllm_eval8.config_from_args(args, environ={}).allow_weak_sandbox is False


def test_same_layout_other_weights_is_refused(tmp_path):
    """A re-quantized or merged student at the teacher's path has the same file names and sizes; its
    generations must not be reused for the new weights (the OPD arms once were)."""
    ckpt = tmp_path / "student"
    ckpt.mkdir()
    (ckpt / "config.json").write_text('{"model_type": "llama"}')
    weights = ckpt / "model.safetensors"
    weights.write_bytes(bytes(range(256)) * 4096)
    replay, _ = write_replay(tmp_path, fixture_cfg(tmp_path))
    vllm_eval8.run_eval(fixture_cfg(tmp_path, model=str(ckpt), replay_file=str(replay)))
    vllm_eval8.run_eval(fixture_cfg(tmp_path, model=str(ckpt), replay_file=str(replay)))  # same weights: resumes
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte in the middle differs
    weights.write_bytes(bytes(data))
    with pytest.raises(vllm_eval8.ResumeMismatch, match="model_fingerprint"):
        vllm_eval8.run_eval(fixture_cfg(tmp_path, model=str(ckpt), replay_file=str(replay)))


def test_big_weight_files_are_fingerprinted_by_sampled_content(tmp_path, monkeypatch):
    import eval_identity

    monkeypatch.setattr(eval_identity, "FULL_HASH_BYTES", 1 << 16)
    big = tmp_path / "a.safetensors"
    blob = bytearray(os.urandom(1 << 20))
    big.write_bytes(blob)
    copy = tmp_path / "b.safetensors"
    copy.write_bytes(blob)
    fp = eval_identity.sampled_sha256(big, blocks=8, block_bytes=4096)
    assert fp == eval_identity.sampled_sha256(copy, blocks=8, block_bytes=4096)
    span = len(blob) - 4096
    blob[span * 3 // 7 + 100] ^= 0x01  # inside the 4th sampled block
    big.write_bytes(blob)
    assert eval_identity.sampled_sha256(big, blocks=8, block_bytes=4096) != fp
    copy.write_bytes(bytes(blob) + b"\0")  # one byte longer
    assert eval_identity.sampled_sha256(copy, blocks=8, block_bytes=4096) != fp


# ------------------------------------------------------------------ TP / engine args / seeding / --dry-run
def test_eval_dry_run_shows_tp_and_engine_args_in_engine_and_identity():
    out = subprocess.run(["bash", str(ROOT / "pipelines" / "eval.sh"), "--model", "Qwen/Qwen3.5-122B-A10B", "--tag",
                          "teacher", "--dry-run", "--tensor-parallel-size", "4", "--engine-arg",
                          "enable_expert_parallel=true", "--n", "200"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    engine = json.loads(next(x for x in lines if x.startswith("engine args:")).split("LLM(**", 1)[1][:-1])
    assert engine["tensor_parallel_size"] == 4 and engine["enable_expert_parallel"] is True
    ident = json.loads(next(x for x in lines if x.startswith("run identity")).split("): ", 1)[1])
    assert ident["tensor_parallel_size"] == 4 and ident["engine_args"] == {"enable_expert_parallel": True}
    gpqa = next(i for i, x in enumerate(lines) if x.strip().startswith("gpqa"))
    assert "official 86.6" in lines[gpqa + 1] and "cannot validate" in lines[gpqa + 1]  # n=200 cannot reach +-2 pt


def test_tp_defaults_to_the_visible_gpu_count(monkeypatch):
    import eval_config
    import eval_dryrun

    monkeypatch.setattr(eval_config, "visible_gpu_count", lambda: 3)
    parser = vllm_eval8.build_parser()
    cfg = vllm_eval8.config_from_args(parser.parse_args(["--model", "m", "--tag", "t"]), environ={})
    assert cfg.tensor_parallel_size is None and cfg.resolved_tensor_parallel_size() == 3
    assert vllm_eval8.generation_config(cfg)["tensor_parallel_size"] == 3
    assert vllm_eval8.config_for_record(cfg)["tensor_parallel_size"] == 3  # recorded with the results
    assert '"tensor_parallel_size": 3' in eval_dryrun.describe(cfg)
    monkeypatch.setattr(eval_config, "visible_gpu_count", lambda: 0)
    assert cfg.resolved_tensor_parallel_size() == 1  # no GPU: one (CPU) worker
    flag = vllm_eval8.config_from_args(parser.parse_args(["--model", "m", "--tag", "t", "--tensor-parallel-size", "2"]),
                                       environ={})
    assert flag.resolved_tensor_parallel_size() == 2


def test_engine_args_parse_hash_and_refuse_owned_keys():
    parser = vllm_eval8.build_parser()
    base = vllm_eval8.config_from_args(parser.parse_args(["--model", "m", "--tag", "t"]), environ={})
    cfg = vllm_eval8.config_from_args(parser.parse_args(["--model", "m", "--tag", "t"]),
                                      environ={"EVAL_ENGINE_ARGS": "kv_cache_dtype=fp8;max-logprobs=40"})
    assert dict(cfg.engine_args) == {"kv_cache_dtype": "fp8", "max_logprobs": 40}
    import provenance

    assert provenance.sha256_json(vllm_eval8.generation_config(cfg)) != provenance.sha256_json(
        vllm_eval8.generation_config(base))
    assert "engine_args" not in vllm_eval8.generation_config(base)  # runs without them keep their old hash
    with pytest.raises(ValueError, match="--engine-arg tensor_parallel_size: has its own flag"):
        vllm_eval8.config_from_args(parser.parse_args(["--model", "m", "--tag", "t", "--engine-arg",
                                                       "tensor_parallel_size=8"]), environ={})
    with pytest.raises(ValueError, match="KEY=VALUE"):
        vllm_eval8.config_from_args(parser.parse_args(["--model", "m", "--tag", "t", "--engine-arg", "novalue"]),
                                    environ={})
    kwargs = backend_vllm.vllm_engine_kwargs("m", 4, 4096, 0.9, None, "auto", 0, False, cfg.engine_args)
    assert kwargs["kv_cache_dtype"] == "fp8" and "max_num_seqs" not in kwargs


@pytest.mark.parametrize("mode,seeded", [("engine", False), ("request", True)])
def test_seed_mode_decides_per_request_seeds(mode, seeded):
    """engine: no per-request seed, so vLLM keeps its batched sampler (no per-request torch.Generator)."""
    pytest.importorskip("vllm")
    backend = object.__new__(backend_vllm.VllmBackend)  # the sampling params only; no engine is started
    backend.sampling = backend_base.Sampling(temperature=0.6, top_p=0.95, top_k=20, seed=5, max_new_tokens=16)
    backend.per_request_seed = mode == "request"
    sample = type("S", (), {"id": "gpqa/1"})()
    params = backend._params(sample)
    assert (params.seed is not None) == seeded
    if seeded:
        assert params.seed == results_schema.sample_seed(5, "gpqa/1")
