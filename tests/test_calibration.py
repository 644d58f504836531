"""Calibrated builds (gptq / wclip) on tiny MoE checkpoints of five layouts: every routed expert gets
statistics from the tokens routed to it (or a recorded fallback), a zero-token expert quantizes without NaN,
the proxy loss beats clip's, per-expert bits plans, resume after SIGKILL mid-calibration, and one-line errors.
"""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import quant_save
import tiny_models

ROOT = Path(__file__).resolve().parents[1]
QUANT_SAVE = ROOT / "src" / "quant" / "quant_save.py"
FAMILIES = {"qwen3_5_moe": "native", "qwen3_moe": "fused", "mixtral": "native", "deepseek_v3": "native",
            "gpt_oss": "native"}
CALIB = dict(calib_tokens=512, calib_ctx=64)


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    from pydoc_data import topics

    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n\n".join(topics.topics[k] for k in sorted(topics.topics)[1::2])[:200_000])
    return path


def tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def digests(path: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())
            if p.is_file() and p.name != "_ptq_meta.json"}


def build(src, out, calib_file, **kw):
    opts = {"model": str(src), "out": str(out), "progress": False, "method": "gptq", "calib_file": str(calib_file),
            **CALIB, **kw}
    return quant_save.build(opts)


def top_k(config: dict) -> int:
    text = config.get("text_config", config)
    return int(text["num_experts_per_tok"])


@pytest.fixture(scope="module")
def family_builds(tmp_path_factory, calib_file):
    root = tmp_path_factory.mktemp("fam")
    cache = {}

    def get(model_type):
        if model_type not in cache:
            src = tiny_models.build_tiny_checkpoint(model_type, root / f"{model_type}-src",
                                                    expert_layout=FAMILIES[model_type], byte_tokenizer=True)
            meta = build(src, root / f"{model_type}-out", calib_file)
            cache[model_type] = (src, root / f"{model_type}-out", meta)
        return cache[model_type]

    return get


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_every_expert_has_statistics_and_gptq_beats_clip_in_its_metric(family_builds, model_type):
    src, out, meta = family_builds(model_type)
    config = json.loads((src / "config.json").read_text())
    assert meta["method"] == "gptq" and meta["calibration"]["tokens"] == CALIB["calib_tokens"]
    assert meta["experts"], "no routed-expert statistics were recorded"
    for module, rec in meta["experts"].items():
        assert len(rec["tokens"]) == len(rec["rule"]) == len(rec["router_mass"]) > 1
        # the router sends every calibration token to top-k experts: counts are exactly tokens x k
        assert sum(rec["tokens"]) == CALIB["calib_tokens"] * top_k(config), module
        assert all(r in ("own", "blend", "pooled") for r in rec["rule"])
        assert all((r == "own") == (n >= rec["min_tokens"]) for r, n in zip(rec["rule"], rec["tokens"]))
    routed = {n: s for n, s in meta["tensor_stats"].items() if ".experts." in n and "shared" not in n}
    assert routed and all(s["statistics"] == "H" and s["method"] == "gptq" and s["experts"] for s in routed.values())
    with_h = [s for s in meta["tensor_stats"].values() if s.get("proxy") is not None]
    assert len(with_h) >= len(routed)
    for name, s in meta["tensor_stats"].items():
        if s.get("proxy") is not None:
            assert s["proxy"] <= s["proxy_clip"] * (1 + 1e-6), (name, s["proxy"], s["proxy_clip"])
    a, b = tensors(src), tensors(out)
    assert all(torch.isfinite(b[n].float()).all() for n in b)
    assert any(not torch.equal(a[n], b[n]) for n in routed)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_wclip_beats_clip_in_its_own_diag_h_metric_and_in_full_h(tmp_path, calib_file, model_type):
    """wclip minimizes the diag(H)-weighted error (llama.cpp's imatrix objective): it must never lose to clip
    there. Alone it can lose in the full-H proxy (it ignores H's off-diagonal); the clip guard keeps clip's
    codes for such an expert, so the shipped result is never worse than clip's in full H either."""
    src = tiny_models.build_tiny_checkpoint(model_type, tmp_path / "src", byte_tokenizer=True)
    meta = build(src, tmp_path / "out", calib_file, method="wclip")
    stats = [s for s in meta["tensor_stats"].values() if s.get("proxy") is not None]
    assert stats and all(s["method"] == "wclip" for s in stats)
    assert all(s["proxy_diag"] <= s["proxy_diag_clip"] * (1 + 1e-6) for s in stats)
    assert sum(s["proxy_diag"] for s in stats) < 0.99 * sum(s["proxy_diag_clip"] for s in stats)
    assert all(s["proxy"] <= s["proxy_clip"] * (1 + 1e-6) for s in stats)


def test_zero_token_expert_gets_the_pooled_fallback_and_quantizes_finite(tmp_path, calib_file):
    src = tiny_models.build_tiny_checkpoint("gpt_oss", tmp_path / "src", byte_tokenizer=True)
    state = tensors(src)
    state["model.layers.0.mlp.router.bias"][0] = -1e4  # the router never picks expert 0 of layer 0
    tiny_models.write_checkpoint(state, src)
    meta = build(src, tmp_path / "out", calib_file)
    rec = meta["experts"]["model.layers.0.mlp.experts"]
    assert rec["tokens"][0] == 0 and rec["rule"][0] == "pooled"
    out = tensors(tmp_path / "out")
    w, dq = state["model.layers.0.mlp.experts.gate_up_proj"], out["model.layers.0.mlp.experts.gate_up_proj"]
    assert torch.isfinite(dq.float()).all() and not torch.equal(w[0], dq[0])


def test_per_expert_bits_plan_on_fused_experts(tmp_path, calib_file):
    src = tiny_models.build_tiny_checkpoint("qwen3_moe", tmp_path / "src", expert_layout="fused")
    name = "model.layers.0.mlp.experts.down_proj"
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"format": "moe-lowbit/bits-plan/1", "strategy": "test", "budget_bits": 3.5,
                                "tensors": {name: [4, 3, 4, 3]}}))
    meta = quant_save.build({"model": str(src), "out": str(tmp_path / "out"), "progress": False,
                             "bits_plan": str(plan)})
    assert meta["bits_plan"]["strategy"] == "test" and len(meta["bits_plan"]["sha256"]) == 64
    dq = tensors(tmp_path / "out")[name]
    for e, bits in enumerate([4, 3, 4, 3]):
        groups = dq[e].float().reshape(-1, 96)  # axis -1, I = 96 < 128: one group per row
        levels = max(len(torch.unique(row)) for row in groups)
        assert levels <= 2 ** bits - 1 and (bits == 3 or levels > 7), (e, levels)
    # footprint: the planned tensor costs exactly its slices' bits, the rest the recipe's
    plain = quant_save.build({"model": str(src), "out": str(tmp_path / "plain"), "progress": False})
    # experts 0 and 2 of down_proj ([H=160, I=96] each) cost one bit more per weight than the recipe's 3
    delta = meta["footprint"]["total"]["packed_bytes"] - plain["footprint"]["total"]["packed_bytes"]
    assert delta == pytest.approx(2 * 160 * 96 * (4 - 3) / 8)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "moe-lowbit/bits-plan/1", "tensors": {"model.layers.9.nope": 3}}))
    with pytest.raises(quant_save.BuildError, match="names tensor model.layers.9.nope which the checkpoint"):
        quant_save.build({"model": str(src), "out": str(tmp_path / "x"), "bits_plan": str(bad), "progress": False})
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_killed_calibration_resumes_to_byte_identical_output(tmp_path, calib_file):
    src = tiny_models.build_tiny_checkpoint("qwen3_moe", tmp_path / "src", byte_tokenizer=True, num_hidden_layers=5)
    args = ["--model", str(src), "--method", "gptq", "--calib-file", str(calib_file), "--calib-tokens", "1024",
            "--calib-ctx", "64", "--no-progress"]
    ref = tmp_path / "ref"
    assert quant_save.main(args + ["--out", str(ref)]) == 0
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(ROOT / "src" / d) for d in ("quant", "eval", "distill"))}
    proc = subprocess.Popen([sys.executable, str(QUANT_SAVE), *args, "--out", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = out / quant_save.PROGRESS_DIR / "calib" / "layer-00001.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not marker.exists():
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert marker.exists() and not (out / "_ptq_meta.json").exists(), "calibration finished before the kill"
    assert quant_save.main(args + ["--out", str(out)]) == 0
    meta = json.loads((out / "_ptq_meta.json").read_text())
    assert meta["timings"]["resumed_calibration_layers"] >= 2
    assert digests(ref) == digests(out)
    strip = lambda m: {k: v for k, v in m.items() if k not in ("timings", "provenance")}  # noqa: E731
    assert strip(meta) == strip(json.loads((ref / "_ptq_meta.json").read_text()))


def test_a_corrupted_same_size_shard_is_not_reported_complete(tmp_path):
    src = tiny_models.build_tiny_checkpoint("llama", tmp_path / "src")
    out = tmp_path / "out"
    opts = {"model": str(src), "out": str(out), "progress": False, "clip_steps": 2}
    quant_save.build(opts)
    shard = out / "model.safetensors"
    good = hashlib.sha256(shard.read_bytes()).hexdigest()
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x40
    shard.write_bytes(bytes(data))
    with pytest.raises(quant_save.BuildError, match="sha256 no longer matches"):
        quant_save.build(opts)
    quant_save.build({**opts, "force": True})
    assert hashlib.sha256(shard.read_bytes()).hexdigest() == good


@pytest.fixture(scope="module")
def llama_src(tmp_path_factory):
    return tiny_models.build_tiny_checkpoint("llama", tmp_path_factory.mktemp("bad") / "src", byte_tokenizer=True)


@pytest.mark.parametrize("case,args,message", [
    ("calib-missing", ["--method", "gptq", "--calib-file", "{tmp}/nope.txt"], "--calib-file {tmp}/nope.txt: no such file"),
    ("calib-empty", ["--method", "gptq", "--calib-file", "{tmp}/empty.txt"], "the file is empty"),
    ("calib-short", ["--method", "gptq", "--calib-file", "{tmp}/short.txt", "--calib-tokens", "4096"],
     "fewer than the 4096 requested"),
    ("no-calib", ["--method", "awq"], "--method awq needs calibration text"),
    ("method", ["--method", "hqq"], "unknown method 'hqq'"),
    ("grid", ["--grid", "nf4"], "unknown grid 'nf4'"),
    ("role-bits", ["--role-bits", "embedding=8"], "unknown role 'embedding'"),
    ("nan", [], "tensor model.layers.1.mlp.up_proj.weight holds 1 NaN/Inf"),
])
def test_bad_calibration_input_gives_one_error_line(llama_src, tmp_path, capsys, case, args, message):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "short.txt").write_text("a few words only")
    src = llama_src
    if case == "nan":
        src = tmp_path / "nan-src"
        src.mkdir()
        for f in llama_src.iterdir():
            (src / f.name).write_bytes(f.read_bytes())
        state = tensors(src)
        state["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
        tiny_models.write_checkpoint(state, src)
    out = tmp_path / "out"
    argv = ["--model", str(src), "--out", str(out), "--no-progress"] + [a.format(tmp=tmp_path) for a in args]
    rc = quant_save.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0
    assert len(err) == 1 and err[0].startswith("quant_save: error:") and message.format(tmp=tmp_path) in err[0], err
    assert not (out / "_ptq_meta.json").exists()
    assert not list(out.glob("*.safetensors"))


def test_cli_limits_the_shape_keyed_cpu_caches_but_keeps_a_users_value(tmp_path, monkeypatch, capsys):
    """oneDNN's and ideep's caches grow by one entry per routed-expert token count (tests/bench/calib_memory.py): the
    CLI caps them before the first forward, unless the user chose a size."""
    import layer_io

    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "")  # recorded, so teardown restores the original
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY")
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "64")
    assert quant_save.main(["--model", str(tmp_path / "absent"), "--dry-run"]) == 2
    capsys.readouterr()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == layer_io.CPU_SHAPE_CACHE_LIMITS[
        "ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "0"
    assert os.environ["LRU_CACHE_CAPACITY"] == "64"
    layer_io.return_freed_memory()  # glibc's malloc_trim, or a no-op: must not raise
