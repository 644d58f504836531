"""Multimodal benchmarks without a model: the rendered smoke set, loading in both schemas, bad images scored
with their reason, image hashes (never bytes) in results, grading, the text-only refusal, and the
image_url parts sent to servers. The tiny-VLM tests are in test_mm_tiny_vlm.py."""
from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest

import bench_registry
import backend_base
import backend_hf
import backend_openai
import backend_vllm
import mm_eval
import mm_images
import mm_smoke_data
import vllm_eval8

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "data" / "mm_smoke"
MMMU_FILE = str(SMOKE / "mmmu_pro_{part}.jsonl")
MATHV_FILE = str(SMOKE / "math_vision.jsonl")


def test_shipped_smoke_set_is_what_the_generator_renders(tmp_path):
    mm_smoke_data.write(tmp_path)
    for path in sorted(SMOKE.rglob("*")):
        if path.is_file():
            assert (tmp_path / path.relative_to(SMOKE)).read_bytes() == path.read_bytes(), path


def test_smoke_answers_follow_from_the_rendering():
    from PIL import Image

    items = mm_smoke_data.items()
    count = next(it for it in items if it["kind"] == "count")
    im = count["figure"].convert("RGB")
    color = next(c for c in mm_smoke_data.COLORS if c in count["question"])
    step = im.width // 4
    centres = [im.getpixel((x * step + step // 2, y * step + step // 2)) for x in range(4) for y in range(4)]
    assert sum(1 for px in centres if px == mm_smoke_data.COLORS[color]) == count["answer"]
    geo = next(it for it in items if it["kind"] == "geometry")
    a, b, c = next(t for t in mm_smoke_data.TRIPLES if t[2] == geo["answer"])
    assert a * a + b * b == c * c
    assert isinstance(Image.open(SMOKE / "images" / "bar_0.png"), Image.Image)


def test_both_schemas_load_with_images_in_place():
    mmmu = bench_registry.load_samples("mmmu_pro", data_file=MMMU_FILE)
    assert {s.group for s in mmmu} == {"standard", "vision"} and len(mmmu) == 24
    std = next(s for s in mmmu if s.group == "standard")
    parts = std.messages[0]["content"]
    kinds = [p["type"] for p in parts]
    assert kinds == ["text", "image", "text"]  # the image sits where the question's <image 1> marker was
    assert "<image 1>" not in json.dumps(parts) and std.meta["n_options"] == 10
    assert parts[1]["image_sha256"] == std.meta["images"][0]["sha256"]
    vision = next(s for s in mmmu if s.group == "vision")
    assert [p["type"] for p in vision.messages[0]["content"]] == ["image", "text"]
    mv = bench_registry.load_samples("math_vision", data_file=MATHV_FILE)
    types = {s.meta["answer_type"] for s in mv}
    assert types == {"choice", "free_form"}
    assert all(s.meta["images"][0]["width"] == 192 and not s.meta["input_error"] for s in mv)


def _bad_copy(tmp_path: Path) -> Path:
    """The MATH-Vision smoke file with row 1's image missing and row 2's image corrupt."""
    shutil.copytree(SMOKE / "images", tmp_path / "images")
    rows = [json.loads(line) for line in (SMOKE / "math_vision.jsonl").read_text().splitlines()]
    rows[0]["image"] = rows[0]["decoded_image"] = "images/does_not_exist.png"
    (tmp_path / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    rows[1]["image"] = rows[1]["decoded_image"] = "images/corrupt.png"
    path = tmp_path / "math_vision.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_bad_images_become_samples_with_a_reason(tmp_path):
    samples = bench_registry.load_samples("math_vision", data_file=str(_bad_copy(tmp_path)))
    assert "does_not_exist.png does not exist" in samples[0].meta["input_error"]
    assert "not a decodable image" in samples[1].meta["input_error"]
    assert samples[2].meta["input_error"] is None


def _replay_file(path: Path, samples, answer_of) -> Path:
    path.write_text("".join(json.dumps({"id": s.id, "output": answer_of(s), "finish_reason": "stop", "tokens": 5}) + "\n"
                            for s in samples))
    return path


def test_replay_run_scores_bad_inputs_with_reason_and_never_writes_pixels(tmp_path):
    data = _bad_copy(tmp_path)
    samples = bench_registry.load_samples("math_vision", data_file=str(data))

    def answer(s):
        return f"The answer is \\boxed{{{s.gold}}}."

    replay = _replay_file(tmp_path / "gen.jsonl", samples, answer)
    out = tmp_path / "res"
    argv = ["--model", "replayed", "--tag", "mv", "--backend", "replay", "--replay-file", str(replay),
            "--benchmarks", "math_vision", "--data-file", f"math_vision={data}", "--results-dir", str(out),
            "--grade-workers", "0", "--no-progress"]
    assert vllm_eval8.main(argv) == 0
    doc = json.loads((out / "mv.json").read_text())
    block = doc["benchmarks"]["math_vision"]
    assert block["n"] == 12 and block["correct"] == 10 and block["n_input_error"] == 2
    assert block["n_finished"] == 10 and block["acc_finished"] == 100.0
    assert block["dataset"]["n_images"] == 12 and len(block["dataset"]["images_sha256"]) == 64
    records = [json.loads(line) for line in (out / "mv.jsonl").read_text().splitlines()[1:]]
    bad = {r["id"]: r for r in records if r.get("input_error")}
    assert len(bad) == 2 and all(r["finish_reason"] == "input_error" and not r["correct"] for r in bad.values())
    assert all(r["grade_detail"]["input_error"] == r["input_error"] for r in bad.values())
    good = next(r for r in records if not r.get("input_error"))
    assert len(good["images"][0]["sha256"]) == 64 and "image_data" not in json.dumps(good)
    raw = (SMOKE / "images" / "count_0.png").read_bytes()
    text = (out / "mv.jsonl").read_text() + (out / "mv.json").read_text()
    assert base64.b64encode(raw[:48]).decode()[:40] not in text and "iVBORw0KGgo" not in text
    # resume: everything reused, same results
    assert vllm_eval8.main(argv) == 0
    again = json.loads((out / "mv.json").read_text())
    assert again["resumed"]["reused"] == 12 and again["benchmarks"] == doc["benchmarks"]


def test_mmmu_pro_official_cascade_and_robust_grader_agree_on_answer_lines():
    s = next(x for x in bench_registry.load_samples("mmmu_pro", data_file=MMMU_FILE) if x.group == "standard")
    wrong = next(letter for letter in "ABCDEFGHIJ" if letter != s.gold)
    robust, official = bench_registry.grade_both(s, f"Let me count.\nAnswer: {s.gold}")
    assert robust.correct and official.correct
    robust, official = bench_registry.grade_both(s, f"Answer: {wrong}")
    assert not robust.correct and not official.correct
    _, official = bench_registry.grade_both(s, "no idea")
    assert official.detail.get("guess_options") == 10  # MMMU's random-option fallback, seeded per run


def test_math_vision_grades_by_answer_type():
    mv = bench_registry.load_samples("math_vision", data_file=MATHV_FILE)
    choice = next(s for s in mv if s.meta["answer_type"] == "choice")
    free = next(s for s in mv if s.meta["answer_type"] == "free_form")
    assert bench_registry.grade_output(choice, f"so \\boxed{{{choice.gold}}}").correct
    assert bench_registry.grade_output(free, f"\\boxed{{{free.gold}.0}}").correct  # a value, not a string
    assert not bench_registry.grade_output(free, f"\\boxed{{{int(free.gold) + 1}}}").correct
    robust, official = bench_registry.grade_both(free, f"so it is $\\boxed{{{free.gold}}}$")
    assert robust.correct and official.correct


def test_text_only_model_is_refused_up_front_naming_it(tmp_path):
    model = tmp_path / "text-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    argv = ["--model", str(model), "--tag", "t", "--backend", "hf", "--benchmarks", "math_vision",
            "--data-file", f"math_vision={MATHV_FILE}", "--results-dir", str(tmp_path / "r"), "--no-progress"]
    cfg = vllm_eval8.config_from_args(vllm_eval8.build_parser("").parse_args(argv))
    samples = bench_registry.load_samples("math_vision", data_file=MATHV_FILE)
    with pytest.raises(ValueError, match=f"model {model} is text-only.*model_type='llama'.*math_vision"):
        mm_eval.refuse_text_only(cfg, samples)
    assert vllm_eval8.main(argv) == 2 and not (tmp_path / "r" / "t.jsonl").exists()  # nothing generated


def test_servers_get_base64_image_url_parts_of_the_exact_bytes():
    s = bench_registry.load_samples("mmmu_pro", data_file=MMMU_FILE, settings="standard")[0]
    msgs = backend_base.chat_messages(s)
    part = next(p for p in msgs[0]["content"] if p["type"] == "image_url")
    head, b64 = part["image_url"]["url"].split(",", 1)
    assert head == "data:image/png;base64"
    import hashlib

    assert hashlib.sha256(base64.b64decode(b64)).hexdigest() == s.meta["images"][0]["sha256"]
    backend = backend_openai.OpenAIBackend("m", backend_base.Sampling(), base_url="http://127.0.0.1:9/v1")
    assert backend.request_body(s)["messages"] == msgs
    light = mm_images.without_pixels(s)
    assert "image_data" not in light.meta and light.messages == s.messages


def test_context_error_names_sizes():
    assert backend_hf.context_error(100, 64, 200) is None
    msg = backend_hf.context_error(300, 256, 200)
    assert "300 tokens" in msg and "256 of them image tokens" in msg and "200" in msg


class _FakeEngine:
    """Stands in for vLLM's engine loop: every enqueued request finishes on the next step."""

    def __init__(self):
        self.pending, self.aborted = [], []

    def has_unfinished_requests(self):
        return bool(self.pending)

    def step(self):
        from types import SimpleNamespace

        done, self.pending = self.pending, []
        return [SimpleNamespace(finished=True, request_id=rid.split("-")[0],
                                outputs=[SimpleNamespace(text=f"Answer: {rid}", finish_reason="stop", token_ids=[1, 2])])
                for rid in done]

    def abort_request(self, ids, internal=True):
        self.aborted.extend(ids)


class _FakeLLM:
    def __init__(self, too_long: str):
        self.too_long, self.llm_engine, self.seen = too_long, _FakeEngine(), []

    def enqueue_chat(self, conversations, params, use_tqdm=False, chat_template_kwargs=None):
        ids = []
        for conv in conversations:
            url = next(p["image_url"]["url"] for p in conv[0]["content"] if p["type"] == "image_url")
            if self.too_long in url:
                raise ValueError("The decoder prompt (length 5000) is longer than the maximum model length of 1024")
            self.seen.append(conv)
            ids.append(f"{len(self.seen) - 1}-x")
        self.llm_engine.pending.extend(ids)
        return ids


@pytest.mark.slow  # importing vllm (SamplingParams) takes ~20 s on this box; no engine is started
def test_vllm_backend_sends_image_parts_and_refuses_only_the_prompt_that_does_not_fit():
    samples = bench_registry.load_samples("math_vision", data_file=MATHV_FILE, n=3)
    b64 = backend_base.chat_messages(samples[1])[0]["content"][0]["image_url"]["url"].split(",", 1)[1]
    backend = object.__new__(backend_vllm.VllmBackend)
    backend.sampling, backend._prep_s = backend_base.Sampling(temperature=0.0, max_new_tokens=4), 0.0
    backend.llm = _FakeLLM(too_long=b64[-40:])
    gens = dict(backend.stream(samples))
    assert sorted(gens) == [0, 1, 2]
    assert gens[1]["finish_reason"] == "input_error" and "longer than the maximum model length" in gens[1]["input_error"]
    assert gens[0]["finish_reason"] == gens[2]["finish_reason"] == "stop" and gens[0]["output"] != gens[2]["output"]
    assert len(backend.llm.seen) == 2 and all(c[0]["content"][0]["type"] == "image_url" for c in backend.llm.seen)
