"""Images through real engines on a tiny random qwen3_5_moe VLM (mm_fixtures): the HF processor backend, the
quantized checkpoint, and llama-server with the converted mmproj. A random model's answers are noise;
these tests check plumbing and the harness contract (schema, resume, input errors), not accuracy."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import bench_registry
import mm_eval
import mm_fixtures
import results_schema
import vllm_eval8

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "data" / "mm_smoke"
MATHV = str(SMOKE / "math_vision.jsonl")
MMMU = str(SMOKE / "mmmu_pro_{part}.jsonl")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory, smollm2_dir) -> Path:
    return mm_fixtures.build_tiny_vlm(tmp_path_factory.mktemp("vlm") / "tiny-vlm", smollm2_dir)


@pytest.fixture(scope="module")
def backend(tiny_vlm):
    import backend_base
    import backend_hf
    import backend_openai

    sampling = backend_base.Sampling(temperature=0.0, max_new_tokens=4, thinking=False)
    b = backend_hf.HfVisionBackend(str(tiny_vlm), sampling)
    yield b
    b.close()


def _args(model, tag, results, *extra):
    return ["--model", str(model), "--tag", tag, "--backend", "hf", "--benchmarks", "math_vision",
            "--data-file", f"math_vision={MATHV}", "--thinking", "off", "--temperature", "0",
            "--max-new-tokens", "4", "--grade-workers", "0", "--results-dir", str(results), "--no-progress", *extra]


def test_images_reach_the_model(backend):
    import torch

    a, b = bench_registry.load_samples("math_vision", data_file=MATHV, n=None)[:2]
    enc, n_images = backend.inputs(a)
    assert n_images == 1 and enc["pixel_values"].numel() > 0 and enc["pixel_values"].abs().sum() > 0
    n_image_tokens = int((enc["input_ids"] == backend.image_token_id).sum())
    assert n_image_tokens == int(enc["image_grid_thw"].prod()) // 4 > 0  # 2x2 merge
    # same prompt, the other sample's image (same 192x192 size, so same token layout)
    swapped = type(a)(a.id, a.bench, a.messages, a.gold, {**a.meta, "image_data": b.meta["image_data"],
                                                          "images": [{**b.meta["images"][0], "sha256": a.meta["images"][0]["sha256"]}]})
    enc_b, _ = backend.inputs(swapped)
    assert torch.equal(enc["input_ids"], enc_b["input_ids"]) and not torch.equal(enc["pixel_values"], enc_b["pixel_values"])
    with torch.no_grad():
        la = backend.model(**enc).logits[0, -1]
        lb = backend.model(**enc_b).logits[0, -1]
    assert (la - lb).abs().max() > 1e-4


def test_image_too_large_for_the_context_is_an_input_error(backend, tmp_path):
    from PIL import Image

    rows = [json.loads(line) for line in Path(MATHV).read_text().splitlines()][:2]
    Image.new("RGB", (1024, 1024), (200, 30, 30)).save(tmp_path / "big.png")
    rows[1]["image"] = rows[1]["decoded_image"] = str(tmp_path / "big.png")
    (tmp_path / "mv.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    small, big = bench_registry.load_samples("math_vision", data_file=str(tmp_path / "mv.jsonl"))
    fits = int(backend.inputs(small)[0]["input_ids"].shape[1])
    backend.max_context, old = fits + 8, backend.max_context
    try:
        gens = dict(backend.stream([small, big]))
    finally:
        backend.max_context = old
    assert gens[0]["finish_reason"] in ("stop", "length") and "input_error" not in gens[0]
    assert gens[1]["finish_reason"] == "input_error" and "too large for this context" in gens[1]["input_error"]
    assert "256 of them image tokens" in gens[1]["input_error"]


def test_hf_eval_is_killed_and_resumes_to_the_clean_result(tiny_vlm, backend, tmp_path):
    clean = tmp_path / "clean"
    cfg = vllm_eval8.config_from_args(vllm_eval8.build_parser("").parse_args(_args(tiny_vlm, "mv", clean, "--n", "8")))
    backend.sampling = type(backend.sampling)(temperature=0.0, max_new_tokens=4, thinking=False)
    ref = vllm_eval8.run_eval(cfg, backend=backend)
    results_schema.check_result(ref)
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src" / d) for d in ("quant", "eval", "distill")]
                                                       + [os.environ.get("PYTHONPATH", "")])}
    cmd = ["bash", str(ROOT / "pipelines" / "eval.sh"), *_args(tiny_vlm, "mv", killed, "--n", "8")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    jsonl = killed / "mv.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:
        if jsonl.is_file() and len(jsonl.read_text().splitlines()) >= 2:  # header + 1 graded sample
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = len(jsonl.read_text().splitlines()) - 1
    assert 1 <= kept < 8  # 8 samples: the kill lands mid-run even on an idle box
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads((killed / "mv.json").read_text())
    assert doc["resumed"]["reused"] == kept and doc["resumed"]["generated"] == 8 - kept
    assert results_schema.without_volatile(doc)["benchmarks"] == results_schema.without_volatile(ref)["benchmarks"]
    lines = lambda p: [json.loads(x) for x in p.read_text().splitlines()[1:]]  # noqa: E731
    assert lines(jsonl) == lines(clean / "mv.jsonl")


def test_quantized_checkpoint_keeps_the_vision_tower_and_its_eval_runs(tiny_vlm, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "quant"
    proc = subprocess.run([sys.executable, str(ROOT / "src" / "quant" / "quant_save.py"), "--model", str(tiny_vlm),
                           "--out", str(out), "--no-progress"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    src, dst = load_file(tiny_vlm / "model.safetensors"), load_file(out / "model.safetensors")
    vision = [k for k in src if ".visual." in k or k.startswith(("visual.", "model.visual."))]
    assert vision and all(src[k].dtype == dst[k].dtype and src[k].equal(dst[k]) for k in vision)
    experts = [k for k in src if "experts" in k]
    assert experts and any(not src[k].equal(dst[k]) for k in experts)  # the text experts were quantized
    assert vllm_eval8.main(_args(out, "q", tmp_path / "res", "--n", "2", "--benchmarks", "math_vision")) == 0
    doc = json.loads((tmp_path / "res" / "q.json").read_text())
    assert doc["benchmarks"]["math_vision"]["n"] == 2 and doc["benchmarks"]["math_vision"]["dataset"]["n_images"] == 2


@pytest.mark.llamacpp
def test_mmproj_gguf_loads_in_llama_server_and_answers_image_questions(tiny_vlm, tmp_path):
    import backend_base
    import backend_openai
    import llamacpp_server as ls
    import llamacpp_eval8

    prefix, text_gguf, mmproj = mm_fixtures.tiny_vlm_gguf(tiny_vlm)
    samples = bench_registry.load_samples("math_vision", data_file=MATHV, n=1)
    cfg = ls.ServerConfig(binary=ls.find_binary(prefix), model=text_gguf, mmproj=mmproj, ctx_size=2048, threads=2)
    with ls.LlamaServer(cfg) as server:
        sees, why = mm_eval.server_sees_images(server.base_url + "/v1")
        assert sees is True, why
        client = backend_openai.OpenAIBackend("tiny", backend_base.Sampling(temperature=0.0, max_new_tokens=2,
                                                                            thinking=False), server.base_url + "/v1")
        with_image = client._post(client.request_body(samples[0]))
        text_only = {**client.request_body(samples[0])}
        text_only["messages"] = [{"role": "user", "content": [p for p in text_only["messages"][0]["content"]
                                                              if p["type"] == "text"]}]
        without = client._post(text_only)
    grid = 144  # 192x192 at patch 8, 2x2 merge
    assert with_image["usage"]["prompt_tokens"] - without["usage"]["prompt_tokens"] >= grid
    res = tmp_path / "res"
    base = ["--gguf", str(text_gguf), "--llama-cpp", str(prefix), "--tag", "g", "--benchmarks", "mmmu_pro,math_vision",
            "--data-file", f"mmmu_pro={MMMU}", "--data-file", f"math_vision={MATHV}", "--n", "1", "--thinking", "off",
            "--temperature", "0", "--max-new-tokens", "4", "--max-model-len", "2048", "--grade-workers", "0",
            "--threads", "2", "--results-dir", str(res), "--no-progress", "--no-probe"]
    assert llamacpp_eval8.main(base) == 2 and not (res / "g.jsonl").exists()  # no --mmproj: refused up front
    assert llamacpp_eval8.main([*base, "--mmproj", str(mmproj)]) == 0
    doc = json.loads((res / "g.json").read_text())
    results_schema.check_result(doc)
    assert {b: doc["benchmarks"][b]["n"] for b in doc["benchmarks"]} == {"mmmu_pro": 2, "math_vision": 1}
    assert doc["llamacpp"]["mmproj"] == str(mmproj)
    records = [json.loads(x) for x in (res / "g.jsonl").read_text().splitlines()[1:]]
    assert all(r["tokens"] > 0 and r["images"][0]["sha256"] for r in records)
