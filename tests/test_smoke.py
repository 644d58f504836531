"""The smoke orchestrator (src/eval/smoke.py) and its pipelines.

Fast tests: planning (pure), the config file vs the defaults, the table vs the JSONs it is printed from,
and the bad inputs through the real pipeline (missing model, no hub without fallback, full / unwritable
disk, corrupt caches) - each must fail early with a message naming the fix and exit != 0.
Slow tests really run pipelines/smoke.sh and smoke_moe.sh in a reduced mode (real vLLM on CPU).
"""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import smoke

ROOT = Path(__file__).resolve().parents[1]
SMOKE_SH = ROOT / "pipelines" / "smoke.sh"
SMOKE_MOE_SH = ROOT / "pipelines" / "smoke_moe.sh"


def run_pipeline(script: Path, env_extra: dict, timeout: int = 120, args=()) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMOKE_", "EVAL_"))}
    env.update({"VLLM_CPU_KVCACHE_SPACE": "1", **env_extra})
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=ROOT)


def facts(**kw) -> smoke.Facts:
    base = dict(cuda=False, hub_offline_env=False, hub_reachable=None, hub_detail="", model_exists=False)
    return smoke.Facts(**{**base, **kw})


# ------------------------------------------------------------------------------------------- planning
def test_config_file_defaults_equal_smokeconfig_defaults():
    """configs/smoke_eval.env and SmokeConfig must say the same thing, or the pipeline and the module disagree."""
    import tool_config

    recipe = tool_config.read_recipe(ROOT / "configs" / "smoke_eval.env")
    assert "SMOKE_MODEL" in recipe and "SMOKE_N" in recipe
    args = smoke.build_parser().parse_args(["--recipe", str(ROOT / "configs" / "smoke_eval.env")])
    bare = tool_config.resolve(smoke.TOOL, args, {})  # the smoke's own knobs, before the quant recipe fills in
    assert bare == smoke.SmokeConfig()


def test_smoke_quant_knobs_come_from_the_quant_recipe_that_quantize_sh_reads():
    import quant_config

    cfg = smoke.config_from_args(smoke.build_parser().parse_args(["--default-recipe", "configs/smoke_eval.env"]), {})
    q = quant_config.from_recipe(ROOT / "configs" / "smoke.env", environ={})
    assert (cfg.method, cfg.grid, cfg.group, cfg.act_order, cfg.calib_tokens) == (q.method, q.grid, q.group,
                                                                                  q.act_order, q.calib_tokens)
    assert cfg.bits_plan == "configs/plans/smollm2_smoke.json"  # as written: the quant name spells it
    env = {"SMOKE_GROUP": "64", "METHOD": "rtn"}  # the smoke's own name, and the old quant name (pipeline only)
    cfg = smoke.config_from_args(smoke.build_parser().parse_args(["--default-recipe", "configs/smoke_eval.env"]), env)
    assert (cfg.group, cfg.method, cfg.grid) == (64, "rtn", "full")
    with pytest.raises(smoke.SmokeError, match="SMOKE_BOGUS"):
        smoke.config_from_args(smoke.build_parser().parse_args([]), {"SMOKE_BOGUS": "1"})


def test_offline_box_falls_back_to_embedded_model_and_shipped_data():
    plan = smoke.plan_smoke(smoke.SmokeConfig(), facts(cuda=False))
    assert plan.teacher_spec == smoke.EMBEDDED and plan.mode == "offline" and not plan.use_hub_data
    assert plan.device == "cpu" and plan.max_new_tokens == smoke.SmokeConfig().max_new_tokens
    assert "no CUDA GPU" in plan.reasons[0]


def test_gpu_box_with_hub_runs_the_hub_model_on_hub_data():
    plan = smoke.plan_smoke(smoke.SmokeConfig(), facts(cuda=True, hub_reachable=True))
    assert plan.teacher_spec == "Qwen/Qwen3.5-2B" and plan.mode == "hub" and plan.use_hub_data
    assert plan.n == smoke.SmokeConfig().hub_n and plan.device == "cuda"


@pytest.mark.parametrize("fact", [dict(cuda=True, hub_offline_env=True),
                                  dict(cuda=True, hub_reachable=False, hub_detail="timed out")])
def test_gpu_box_without_hub_falls_back(fact):
    plan = smoke.plan_smoke(smoke.SmokeConfig(), facts(**fact))
    assert plan.teacher_spec == smoke.EMBEDDED and not plan.use_hub_data


def test_moe_offline_defaults_to_the_real_weight_moe_fixture():
    cfg = smoke.SmokeConfig(kind="moe", model="allenai/OLMoE-1B-7B-0924-Instruct", fallback_model=smoke.EMBEDDED_MOE)
    plan = smoke.plan_smoke(cfg, facts())
    assert plan.teacher_spec == smoke.EMBEDDED_MOE and not plan.random_weights
    assert smoke.tags_for(plan, cfg)["quant"].startswith("smoke_moe_smollm2-135m-moe_e3l4")
    with pytest.raises(smoke.SmokeError, match="does not fit"):
        smoke.plan_smoke(smoke.SmokeConfig(kind="dense", fallback_model=smoke.EMBEDDED_MOE),
                         facts())


def test_moe_offline_uses_random_tiny_moe_and_says_so():
    cfg = smoke.SmokeConfig(kind="moe", model="allenai/OLMoE-1B-7B-0924-Instruct", fallback_model=smoke.TINY_MOE)
    plan = smoke.plan_smoke(cfg, facts())
    assert plan.teacher_spec == smoke.TINY_MOE and plan.random_weights
    assert smoke.tags_for(plan, cfg)["quant"].startswith("smoke_moe_tiny-qwen3-moe-random_e3l4")


def test_kind_and_fallback_must_agree():
    with pytest.raises(smoke.SmokeError, match="SMOKE_KIND=moe"):
        smoke.plan_smoke(smoke.SmokeConfig(kind="moe"), facts())


def test_no_hub_without_fallback_names_every_reason_and_the_fix():
    cfg = smoke.SmokeConfig(offline_fallback=False)
    with pytest.raises(smoke.SmokeError) as err:
        smoke.plan_smoke(cfg, facts(cuda=False, hub_offline_env=True))
    msg = str(err.value)
    assert "no CUDA GPU" in msg and "HF_HUB_OFFLINE" in msg and "SMOKE_OFFLINE_FALLBACK" in msg


def test_local_checkpoint_dir_is_used_as_is(tmp_path):
    plan = smoke.plan_smoke(smoke.SmokeConfig(model=str(tmp_path)), facts(model_exists=True))
    assert plan.mode == "local" and plan.teacher_spec == str(tmp_path)
    assert plan.slug.startswith("test-local-checkpoint") and "_" not in plan.slug  # "_" separates tag parts


@pytest.mark.parametrize("bad", ["/nonexistent", "./nope", "not a model"])
def test_missing_model_path_is_refused(bad):
    with pytest.raises(smoke.SmokeError, match="no such checkpoint directory"):
        smoke.plan_smoke(smoke.SmokeConfig(model=bad), facts())


def test_bad_config_values_are_named():
    with pytest.raises(smoke.SmokeError, match="SMOKE_N"):
        smoke.SmokeConfig(n=0)
    with pytest.raises(smoke.SmokeError, match="SMOKE_TP"):
        smoke.config_from_args(smoke.build_parser().parse_args([]), environ={"SMOKE_TP": "two"})


def test_child_env_drops_eval_knobs_and_goes_offline(monkeypatch):
    monkeypatch.setenv("EVAL_N", "5")
    plan = smoke.plan_smoke(smoke.SmokeConfig(), facts())
    env = smoke.child_env(plan)
    assert "EVAL_N" not in env and env["HF_HUB_OFFLINE"] == "1"
    assert str(ROOT / "src" / "eval") in env["PYTHONPATH"].split(os.pathsep)


def test_explain_failure_adds_the_fix_for_a_full_disk():
    msg = smoke.explain_failure(["loading", "OSError: [Errno 28] No space left on device: '/x/model.safetensors'"])
    assert "No space left" in msg and "disk is full" in msg


# ------------------------------------------------------------------------------- table == JSON files
def _docs(acc_t=62.5, acc_q=50.0, kl=0.0123):
    def block(acc, n=8):
        correct = round(acc * n / 100)
        return {"n": n, "acc": acc, "ci95": [acc - 20.0, acc + 15.0], "trunc": 12.5,
                "paired": {"ids": [f"s{i}" for i in range(n)], "correct": [1] * correct + [0] * (n - correct)}}

    summary = {"kind": "dense", "mode": "offline", "data": "offline", "reasons": ["why"], "random_weights": False,
               "teacher": {"spec": smoke.EMBEDDED}, "quant": {"build": "built", "recipe": {"linear_bits": 4.0},
                                                             "footprint_total": {"effective_bits": 4.139,
                                                                                 "effective_bits_quantized": 4.136,
                                                                                 "packed_bytes": 69598848.0,
                                                                                 "source_bytes": 269030016.0,
                                                                                 "compression": 3.8654}},
               "comparison": {"benchmarks": {"math500": {"delta": acc_q - acc_t, "ci95": [-25.0, 0.0],
                                                         "p_mcnemar": 1.0}}},
               "timings_s": {s: 1.5 for s in smoke.STEPS} | {"total": 12.0}}
    fid = {"text": {"kind": "teacher-sample", "n_scored_tokens": 2040, "ctx": 256},
           "students": [{"ppl_teacher": 3.21, "ppl_student": 3.4, "ppl_ratio": 1.06, "ppl_ratio_interval": [1.02, 1.1],
                         "kl_mean": kl, "kl_mean_interval": [0.01, 0.015], "kl_kind": "exact", "top1_agree": 0.9}]}
    return {"summary": summary, "teacher_eval": {"tag": "t", "benchmarks": {"math500": block(acc_t)}},
            "quant_eval": {"tag": "q", "benchmarks": {"math500": block(acc_q)}}, "fidelity": fid}


def test_table_prints_the_json_numbers():
    docs = _docs()
    table = smoke.render_table(docs)
    row = next(line for line in table.splitlines() if line.startswith("math500"))
    assert re.findall(r"[-+]?\d+\.\d+", row)[:2] == ["62.5", "42.5"]
    assert "-12.5" in row and "[-25.0, +0.0]" in row
    assert "KL 0.01230" in table and "effective bits 4.139" in table and "x3.87" in table
    changed = smoke.render_table(_docs(acc_t=75.0, kl=0.5))
    assert "75.0" in changed and "KL 0.50000" in changed  # the table follows the JSON, nothing is fixed


def test_recipe_slug_names_every_departure_from_the_seed_recipe():
    """Two recipes never share a quant name (and so a results file); the seed's recipe keeps its short name."""
    seed = smoke.SmokeConfig(group=32, clip_steps=8)
    assert smoke.recipe_slug(seed, "dense") == "w4g32c8"
    variants = [dict(method="gptq"), dict(method="gptq", act_order=True), dict(grid="full"), dict(role_bits="embed=5"),
                dict(role_bits="embed=8"), dict(bits_plan="configs/plans/a.json"), dict(bits_plan="configs/plans/b.json"),
                dict(bits_plan="other/a.json"), dict(clip_lo=0.7), dict(calib_tokens=4096), dict(mtp_bits=8.0)]
    slugs = [smoke.recipe_slug(smoke.SmokeConfig(group=32, clip_steps=8, **v), "dense") for v in variants]
    assert len(set(slugs)) == len(slugs) and all(s.startswith("w4g32c8-") for s in slugs)
    assert slugs[1] == "w4g32c8-gptq-ao" and slugs[5].startswith("w4g32c8-plan-a-")
    assert smoke.recipe_slug(smoke.SmokeConfig(), "moe") == "e3l4g128c8"  # the MoE smoke's seed recipe


def test_a_bits_plan_for_another_model_is_not_applied(tmp_path):
    """The recipe's SmolLM2 plan on another teacher: the smoke builds with the uniform bits and says so."""
    from smoke_preflight import bits_plan_misfit
    from tiny_models import build_tiny_checkpoint

    ckpt = build_tiny_checkpoint("llama", tmp_path / "tiny")
    own = tmp_path / "own.json"
    own.write_text(json.dumps({"tensors": {"model.layers.0.self_attn.v_proj.weight": 6}}))
    assert bits_plan_misfit(own, ckpt) is None
    why = bits_plan_misfit(ROOT / "configs" / "plans" / "smollm2_smoke.json", ckpt)
    assert why and "tensor(s) the teacher tiny lacks" in why and "model.layers.10." in why
    assert bits_plan_misfit(tmp_path / "absent.json", ckpt) is None  # left to quant_save's own error
    docs = _docs()
    docs["summary"]["quant"]["bits_plan_skipped"] = {"path": "configs/plans/smollm2_smoke.json", "why": why}
    assert "bits plan smollm2_smoke.json not applied (made for another model)" in smoke.render_table(docs)


def test_bits_plan_reaches_quant_save_and_the_table(tmp_path):
    """SMOKE's --bits-plan is passed to quant_save (repo-relative paths resolved) and named in the table."""
    import smoke_steps

    cfg = smoke.SmokeConfig(method="gptq", calib="pydoc-topics", bits_plan="configs/plans/x.json")
    cmd = [str(c) for c in smoke_steps.quantize_cmd(Path("/t"), Path("/q"), cfg, "cpu", force=False)]
    assert cmd[cmd.index("--bits-plan") + 1] == str(ROOT / "configs" / "plans" / "x.json")
    absolute = smoke.SmokeConfig(bits_plan=str(tmp_path / "p.json"))
    cmd = [str(c) for c in smoke_steps.quantize_cmd(Path("/t"), Path("/q"), absolute, "cpu", force=False)]
    assert cmd[cmd.index("--bits-plan") + 1] == str(tmp_path / "p.json")
    assert "--bits-plan" not in smoke_steps.quantize_cmd(Path("/t"), Path("/q"), smoke.SmokeConfig(), "cpu", False)
    docs = _docs()
    assert "bits plan" not in smoke.render_table(docs)
    docs["summary"]["quant"]["bits_plan"] = {"path": "/r/configs/plans/x.json", "tensors": 60}
    assert "bits plan x.json (60 tensors)" in smoke.render_table(docs)


def test_missing_or_nan_numbers_block_smoke_ok():
    docs = _docs()
    assert smoke.missing_numbers(docs) == []
    docs["fidelity"]["students"][0]["kl_mean"] = float("nan")
    docs["teacher_eval"]["benchmarks"]["math500"]["acc"] = None
    del docs["summary"]["timings_s"]["fidelity"]
    missing = smoke.missing_numbers(docs)
    assert "fidelity kl_mean" in missing and "teacher math500 acc" in missing and "wall time of fidelity" in missing


# -------------------------------------------------------------------------- bad inputs, real pipeline
def test_pipeline_missing_model_fails_early_with_the_fix():
    res = run_pipeline(SMOKE_SH, {"SMOKE_MODEL": "/nonexistent"})
    assert res.returncode == 2, res.stderr[-2000:]
    assert "SMOKE FAILED at step resolve" in res.stderr and "SMOKE_MODEL=/nonexistent" in res.stderr
    assert "fix:" in res.stderr and "SMOKE OK" not in res.stdout


def test_pipeline_unreachable_hub_without_fallback_fails_with_the_fix():
    res = run_pipeline(SMOKE_SH, {"SMOKE_OFFLINE_FALLBACK": "0", "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Qwen/Qwen3.5-2B needs a GPU and the hub" in res.stderr and "HF_HUB_OFFLINE is set" in res.stderr
    assert "SMOKE_OFFLINE_FALLBACK" in res.stderr


def test_pipeline_help_lists_the_knobs():
    res = run_pipeline(SMOKE_SH, {}, args=["--help"])
    assert res.returncode == 0 and "--offline-fallback" in res.stdout and "SMOKE_N" in res.stdout


def test_pipeline_unwritable_results_dir_fails_in_preflight(tmp_path, smollm2_dir):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    res = run_pipeline(SMOKE_SH, {"SMOKE_RESULTS_DIR": str(blocker / "results"), "SMOKE_WORK_DIR": str(tmp_path / "w")})
    assert res.returncode == 2, res.stderr[-2000:]
    assert "SMOKE FAILED at step preflight" in res.stderr and "SMOKE_RESULTS_DIR" in res.stderr


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 1 MiB tmpfs (needs root); the only honest way to get a real ENOSPC without filling a real disk."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_pipeline_small_disk_for_quant_output_is_refused_before_work(tmp_path, tiny_tmpfs, smollm2_dir):
    res = run_pipeline(SMOKE_SH, {"SMOKE_WORK_DIR": str(tiny_tmpfs), "SMOKE_RESULTS_DIR": str(tmp_path / "r")})
    assert res.returncode == 2, res.stderr[-2000:]
    assert "SMOKE FAILED at step preflight" in res.stderr and "MiB are free" in res.stderr
    assert "SMOKE_WORK_DIR" in res.stderr and not list(tiny_tmpfs.iterdir())


def test_pipeline_full_disk_for_results_reports_enospc(tmp_path, tiny_tmpfs, smollm2_dir):
    with open(tiny_tmpfs / "filler", "wb") as f:  # fill it: the next write gets a real ENOSPC
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    res = run_pipeline(SMOKE_SH, {"SMOKE_RESULTS_DIR": str(tiny_tmpfs / "results"), "SMOKE_WORK_DIR": str(tmp_path / "w")})
    assert res.returncode == 2, res.stderr[-2000:]
    assert "SMOKE FAILED at step preflight" in res.stderr and "disk is full" in res.stderr


def test_corrupt_quant_output_is_rebuilt_not_reused(tmp_path):
    """quant_save reuses a complete build by recipe; the smoke also checks its bytes before trusting it."""
    import provenance
    import quant_save
    import tiny_models

    src = tiny_models.build_tiny_checkpoint("llama", tmp_path / "src")
    out = tmp_path / "out"
    build = {"model": str(src), "out": str(out), "linear_bits": 4.0, "clip_steps": 2, "progress": False,
             "force": True}  # the smoke always passes --force for its own output dir
    quant_save.build(build)
    assert smoke.verify_quant_output(out) is None and smoke.invalidate_broken_quant(out, print) is None
    shard = next(out.glob("*.safetensors"))
    good = provenance.sha256_file(shard)
    shard.write_bytes(shard.read_bytes()[:1000])
    assert "does not match" in smoke.verify_quant_output(out)
    logs = []
    assert smoke.invalidate_broken_quant(out, logs.append) and "rebuilding" in logs[0]
    quant_save.build(build)
    assert smoke.verify_quant_output(out) is None and provenance.sha256_file(shard) == good
    assert smoke.verify_quant_output(tmp_path / "never_built") is None


@pytest.mark.slow
def test_corrupt_cached_conversion_is_rebuilt_not_reused(tmp_path, smollm2_dir, monkeypatch):
    """Truncate the cached BF16 conversion: the smoke's resolve step must rebuild it, never load it."""
    import embedded_model

    cache = tmp_path / "cache"
    copy = cache / "embedded" / smollm2_dir.name
    shutil.copytree(smollm2_dir, copy)
    weights = copy / "model.safetensors"
    good_size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(good_size // 3)
    monkeypatch.setenv("MOE_LOWBIT_CACHE", str(cache))
    logs = []
    plan = smoke.plan_smoke(smoke.SmokeConfig(), facts())
    got = smoke.resolve_teacher(plan, logs.append)
    assert got == copy and any("broken" in m and "rebuilding" in m for m in logs)
    assert embedded_model.verify_checkpoint(got) is None and (got / "model.safetensors").stat().st_size == good_size


@pytest.mark.slow
def test_tiny_moe_cache_is_verified_and_rebuilt(tmp_path, smollm2_dir):
    import smoke_models

    first = smoke_models.tiny_moe_dir(smollm2_dir, tmp_path, log=lambda m: None)
    cfg = json.loads((first / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_moe" and cfg["vocab_size"] == json.loads(
        (smollm2_dir / "config.json").read_text())["vocab_size"]
    assert smoke_models.verify(first) is None and (first / "tokenizer.json").is_file()
    weights = next(first.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    logs = []
    again = smoke_models.tiny_moe_dir(smollm2_dir, tmp_path, log=logs.append)
    assert again == first and smoke_models.verify(again) is None and any("broken" in m for m in logs)


# ------------------------------------------------------------------------------ the real pipelines
def _table_rows(stdout: str) -> dict:
    return {line.split()[0]: line for line in stdout.splitlines()
            if line and line.split()[0] in ("mmlu_pro", "math500")}


def _assert_table_matches_json(stdout: str, results: Path, summary: dict):
    teacher = json.loads((results / summary["files"]["teacher_eval"]).read_text())
    quant = json.loads((results / summary["files"]["quant_eval"]).read_text())
    fid = json.loads((results / summary["files"]["fidelity"]).read_text())["students"][0]
    rows = _table_rows(stdout)
    assert set(rows) == set(teacher["benchmarks"]) == set(quant["benchmarks"])
    for bench, row in rows.items():
        t, q, c = teacher["benchmarks"][bench], quant["benchmarks"][bench], summary["comparison"]["benchmarks"][bench]
        expected = [str(t["n"]), f"{t['acc']:.1f}", f"{t['ci95'][0]:.1f}", f"{t['ci95'][1]:.1f}", f"{t['trunc']:.1f}",
                    f"{q['acc']:.1f}", f"{q['ci95'][0]:.1f}", f"{q['ci95'][1]:.1f}", f"{q['trunc']:.1f}",
                    f"{c['delta']:+.1f}", f"{c['ci95'][0]:+.1f}", f"{c['ci95'][1]:+.1f}"]
        assert re.findall(r"[-+]?\d+(?:\.\d+)?", row[len(bench):])[:len(expected)] == expected, row
    assert f"PPL teacher {fid['ppl_teacher']:.3f} quant {fid['ppl_student']:.3f}" in stdout
    assert f"KL {fid['kl_mean']:.5f}" in stdout and f"top-1 {fid['top1_agree']:.4f}" in stdout
    assert f"effective bits {summary['quant']['footprint_total']['effective_bits']:.3f}" in stdout
    for step in smoke.STEPS:
        assert f"{step} {summary['timings_s'][step]:.1f}" in stdout
    return teacher, quant


def _assert_results_md_cites(results: Path, summary: dict, teacher: dict, quant: dict):
    md = (results / "RESULTS.md").read_text()
    assert f"## Headline: {teacher['tag']}" in md
    for bench in teacher["benchmarks"]:
        assert f"[{teacher['benchmarks'][bench]['acc']:.1f}](vllm_eval/{teacher['tag']}.json)" in md
        assert f"[{quant['benchmarks'][bench]['acc']:.1f}](vllm_eval/{quant['tag']}.json)" in md
        c = summary["comparison"]["benchmarks"][bench]
        assert (f"[{c['delta']:+.1f}](vllm_eval/{quant['tag']}.json) [{c['ci95'][0]:+.1f}, {c['ci95'][1]:+.1f}]"
                in md)


@pytest.mark.slow
@pytest.mark.vllm
def test_smoke_pipeline_reduced_end_to_end(tmp_path, smollm2_dir):
    results = tmp_path / "results"
    # 4 fidelity windows of 64: llama-perplexity's KL summary needs >= 100 scored tokens (the GGUF row)
    res = run_pipeline(SMOKE_SH, {"SMOKE_N": "3", "SMOKE_MAX_NEW_TOKENS": "24", "SMOKE_FIDELITY_TOKENS": "256",
                                  "SMOKE_FIDELITY_CTX": "64", "SMOKE_RESULTS_DIR": str(results),
                                  "SMOKE_WORK_DIR": str(tmp_path / "work"),
                                  "CALIB_TOKENS": "2048"},  # smoke.env's gptq recipe, on fewer calibration tokens
                       timeout=1500)
    assert res.returncode == 0, res.stderr[-4000:]
    assert res.stdout.rstrip().endswith("SMOKE OK")
    summary = json.loads((results / "smoke" / "smoke_smollm2-135m-instruct.json").read_text())
    assert summary["mode"] == "offline" and summary["teacher"]["spec"] == smoke.EMBEDDED
    assert summary["quant"]["recipe"]["linear_bits"] == 4.0 and summary["quant"]["recipe"]["clip_steps"] == 8
    plan = summary["quant"]["bits_plan"]  # smoke.env's BITS_PLAN reached the build, byte for byte
    assert plan["sha256"] == hashlib.sha256((ROOT / "configs" / "plans" / "smollm2_smoke.json").read_bytes()).hexdigest()
    assert f"bits plan smollm2_smoke.json ({plan['tensors']} tensors)" in res.stdout
    teacher, quant = _assert_table_matches_json(res.stdout, results, summary)
    assert teacher["generation"]["max_new_tokens"] == 24 and not teacher["generation"]["thinking"]
    assert all(b["n"] == 3 for b in teacher["benchmarks"].values())
    assert teacher["benchmarks"]["mmlu_pro"]["dataset"]["source"]["sources"][0]["data_file"].endswith(
        "configs/data/smoke/mmlu_pro_easy.jsonl")
    _assert_results_md_cites(results, summary, teacher, quant)
    from test_smoke_ship import assert_rows_match_json  # the int4 store's view, CT export and GGUF rows

    assert [r["key"] for r in summary["rows"]] == ["ship-dequant", "ship-ct"] and not summary["rows"][1]["error"]
    assert_rows_match_json(summary, results / "smoke" / "smoke_smollm2-135m-instruct.json", res.stdout)


@pytest.mark.slow
@pytest.mark.vllm
def test_smoke_moe_pipeline_reduced_end_to_end(tmp_path, smollm2_dir):
    results = tmp_path / "results"
    # 4 fidelity windows of 64: the MoE smoke scores its GGUF too, and llama-perplexity needs >= 100 scored tokens
    res = run_pipeline(SMOKE_MOE_SH, {"SMOKE_FALLBACK_MODEL": "tiny:qwen3_moe",  # the plumbing fixture
                                      "SMOKE_N": "2", "SMOKE_MAX_NEW_TOKENS": "8", "SMOKE_FIDELITY_TOKENS": "256",
                                      "SMOKE_FIDELITY_CTX": "64", "SMOKE_RESULTS_DIR": str(results),
                                      "SMOKE_WORK_DIR": str(tmp_path / "work"), "CALIB_TOKENS": "2048",
                                      # the plumbing run: the export / comparison rows are the dense test's
                                      "SMOKE_SHIP_EXPORTS": "", "SMOKE_COMPARE_RECIPE": ""}, timeout=1500)
    assert res.returncode == 0, res.stderr[-4000:]
    assert res.stdout.rstrip().endswith("SMOKE OK") and "RANDOM-WEIGHT MoE" in res.stdout
    summary = json.loads((results / "smoke" / "smoke_moe_tiny-qwen3-moe-random.json").read_text())
    assert summary["random_weights"] and summary["quant"]["recipe"]["expert_bits"] == 3.0
    experts = summary["quant"]["footprint_roles"]["routed_expert"]
    assert experts["bits"] == [3.0] and experts["params"] > 0 and "routed_expert 3 bit" in res.stdout
    _assert_table_matches_json(res.stdout, results, summary)


def test_hub_check_is_bounded_and_reports_why(monkeypatch):
    import socket
    import threading
    import time

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)  # accepts the connection, never answers: only the deadline can end the check
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    t0 = time.perf_counter()
    ok, detail = smoke.hub_reachable(1.0)
    assert not ok and time.perf_counter() - t0 < 3.0 and "127.0.0.1" in detail
    server.close()
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: refused at once
    assert smoke.hub_reachable(1.0)[0] is False
    import http.server

    httpd = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)  # answers 501
    threading.Thread(target=httpd.handle_request, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{httpd.server_address[1]}")
    assert smoke.hub_reachable(2.0)[0] is True  # any HTTP answer means the hub host is reachable
    httpd.server_close()


def test_pipeline_names_a_failing_step_with_the_childs_own_error(tmp_path, smollm2_dir):
    """A checkpoint dir without weights passes resolve/preflight; quant_save refuses it and the smoke says so."""
    ckpt = tmp_path / "no_weights"
    ckpt.mkdir()
    shutil.copyfile(smollm2_dir / "config.json", ckpt / "config.json")
    res = run_pipeline(SMOKE_SH, {"SMOKE_MODEL": str(ckpt), "SMOKE_RESULTS_DIR": str(tmp_path / "r"),
                                  "SMOKE_WORK_DIR": str(tmp_path / "w")})
    assert res.returncode == 1, res.stderr[-2000:]
    assert "SMOKE FAILED at step quantize" in res.stderr and "no *.safetensors files" in res.stderr
    assert "SMOKE OK" not in res.stdout and not (tmp_path / "r" / "smoke").exists()


def test_tiny_moe_cache_that_cannot_be_written_is_one_clear_error(tmp_path, smollm2_dir):
    import smoke_models

    blocker = tmp_path / "cache-is-a-file"
    blocker.write_text("not a directory")
    with pytest.raises(smoke_models.SmokeModelError, match="could not write the tiny random-weight qwen3_moe.*fix: check that "
                                                           "MOE_LOWBIT_CACHE is writable"):
        smoke_models.tiny_moe_dir(smollm2_dir, blocker, log=lambda m: None)


def test_cache_write_hint_names_the_full_disk():
    import errno

    import verified_cache

    assert "free some disk space" in verified_cache.write_failure_hint(OSError(errno.ENOSPC, "No space left"))
    assert "writable" in verified_cache.write_failure_hint(PermissionError(errno.EACCES, "denied"))
