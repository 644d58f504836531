"""pipelines/eval.sh on the image benchmarks, offline, through both engines on the tiny random VLM
(mm_fixtures): the HF processor backend (--backend hf) and llama-server with the converted mmproj
(--backend llamacpp, which starts and stops the server). Both write the common results schema with
per-sample logs. Bad input (a missing image, a corrupt one, images too large for the context) is scored
with its reason through each; a model that cannot see is refused before anything runs, naming it; a
SIGKILLed llama-server run leaves no server behind and resumes to the uninterrupted result.

A random model's answers are noise: these tests check the harness contract, not accuracy."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

import mm_fixtures
import results_schema

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "data" / "mm_smoke"
EVAL_SH = ROOT / "pipelines" / "eval.sh"
MAX_LEN = 1024  # a smoke prompt is ~150-350 tokens; seven 1024-px images are >= 7 x 256 image tokens
PNG_MAGIC_B64 = "iVBORw0KGgo"  # base64 of a PNG header: must never reach a results file

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory, smollm2_dir) -> Path:
    return mm_fixtures.build_tiny_vlm(tmp_path_factory.mktemp("vlm") / "tiny-vlm", smollm2_dir)


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory) -> Path:
    """The smoke set in both schemas with bad rows: MATH-Vision row 1's image missing and row 2's corrupt;
    MMMU-Pro standard row 1 carrying seven 1024x1024 images (too large for a MAX_LEN context)."""
    from PIL import Image

    out = tmp_path_factory.mktemp("mm-bad")
    shutil.copytree(SMOKE / "images", out / "images")
    (out / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 8)
    for k in range(1, 8):
        Image.new("RGB", (1024, 1024), (40 * k, 200 - 20 * k, 90)).save(out / "images" / f"big_{k}.png")
    rows = [json.loads(x) for x in (SMOKE / "math_vision.jsonl").read_text().splitlines()]
    rows[0]["image"] = rows[0]["decoded_image"] = "images/does_not_exist.png"
    rows[1]["image"] = rows[1]["decoded_image"] = "images/corrupt.png"
    (out / "math_vision.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rows = [json.loads(x) for x in (SMOKE / "mmmu_pro_standard.jsonl").read_text().splitlines()]
    rows[0]["question"] = " ".join(f"<image {k}>" for k in range(1, 8)) + " Which panel is the reddest?"
    rows[0].update({f"image_{k}": f"images/big_{k}.png" for k in range(1, 8)})
    (out / "mmmu_pro_standard.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shutil.copy(SMOKE / "mmmu_pro_vision.jsonl", out / "mmmu_pro_vision.jsonl")
    return out


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src" / d) for d in ("quant", "eval", "distill")]
                                                        + [os.environ.get("PYTHONPATH", "")])}


def _common(data: Path, tag: str, results: Path) -> list:
    return ["--tag", tag, "--benchmarks", "mmmu_pro,math_vision",
            "--data-file", f"mmmu_pro={data}/mmmu_pro_{{part}}.jsonl", "--data-file", f"math_vision={data}/math_vision.jsonl",
            "--thinking", "off", "--temperature", "0", "--max-new-tokens", "4", "--max-model-len", str(MAX_LEN),
            "--grade-workers", "0", "--results-dir", str(results), "--no-progress"]


def _eval_sh(*args, check=True) -> subprocess.CompletedProcess:
    done = subprocess.run(["bash", str(EVAL_SH), *map(str, args)], env=_env(), capture_output=True, text=True)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def _records(path: Path) -> list:
    return [json.loads(x) for x in path.read_text().splitlines()[1:]]


def _check_bad_input_scored(results: Path, tag: str) -> dict:
    """Common schema, per-sample log, each bad sample scored wrong with its reason, hashes not bytes."""
    doc = json.loads((results / f"{tag}.json").read_text())
    results_schema.check_result(doc)
    records = {r["id"]: r for r in _records(results / f"{tag}.jsonl")}
    mv, mp = doc["benchmarks"]["math_vision"], doc["benchmarks"]["mmmu_pro"]
    assert (mv["n"], mp["n"]) == (12, 24) and len(records) == 36 and doc["samples_file"] == f"{tag}.jsonl"
    assert mv["n_input_error"] == 2 and mp["n_input_error"] == 1
    bad = {i: r for i, r in records.items() if r.get("input_error")}
    assert set(bad) == {"math_vision/1", "math_vision/2", "mmmu_pro/standard/smoke_count_0"}
    assert "does_not_exist.png does not exist" in bad["math_vision/1"]["input_error"]
    assert "not a decodable image" in bad["math_vision/2"]["input_error"]
    assert "context" in bad["mmmu_pro/standard/smoke_count_0"]["input_error"]
    for r in bad.values():
        assert r["finish_reason"] == "input_error" and not r["correct"] and r["grade_detail"]["input_error"] == r["input_error"]
    good = [r for i, r in records.items() if i not in bad]
    assert all(r["finish_reason"] in ("stop", "length") and len(r["images"][0]["sha256"]) == 64 for r in good)
    prov = doc["provenance"]["datasets"]
    assert prov["math_vision"]["n_images"] == 12 and len(prov["math_vision"]["images_sha256"]) == 64
    assert prov["mmmu_pro"]["n_images"] == 24 + 6  # the bad row holds seven images
    assert prov["mmmu_pro"]["revision"] is None and set(prov["mmmu_pro"]["data_file_sha256"]) == {"standard", "vision"}
    text = (results / f"{tag}.json").read_text() + (results / f"{tag}.jsonl").read_text()
    assert PNG_MAGIC_B64 not in text and "image_data" not in text
    return doc


def _text_only_checkpoint(tmp_path: Path) -> Path:
    model = tmp_path / "text-only-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    return model


# -------------------------------------------------------------------------------------------------- HF
def test_eval_sh_hf_scores_the_smoke_set_and_bad_input_with_reasons(tiny_vlm, bad_data, tmp_path):
    res = tmp_path / "res"
    _eval_sh("--backend", "hf", "--model", tiny_vlm, *_common(bad_data, "hf", res))
    doc = _check_bad_input_scored(res, "hf")
    assert doc["backend"] == "hf" and doc["generation"]["max_model_len"] == MAX_LEN
    big = next(r for r in _records(res / "hf.jsonl") if r["id"] == "mmmu_pro/standard/smoke_count_0")
    assert "of them image tokens" in big["input_error"] and f"context of {MAX_LEN} tokens" in big["input_error"]
    again = _eval_sh("--backend", "hf", "--model", tiny_vlm, *_common(bad_data, "hf", res))  # everything reused
    assert "36 finished samples reused" in again.stderr
    assert json.loads((res / "hf.json").read_text())["benchmarks"] == doc["benchmarks"]


def test_eval_sh_hf_refuses_a_text_only_model_by_name(bad_data, tmp_path):
    model = _text_only_checkpoint(tmp_path)
    done = _eval_sh("--backend", "hf", "--model", model, *_common(bad_data, "t", tmp_path / "r"), check=False)
    assert done.returncode == 2 and f"model {model} is text-only" in done.stderr and "mmmu_pro, math_vision" in done.stderr
    assert not (tmp_path / "r" / "t.jsonl").exists()


# ------------------------------------------------------------------------------------------ llama-server
@pytest.fixture(scope="module")
def ggufs(tiny_vlm):
    return mm_fixtures.tiny_vlm_gguf(tiny_vlm)


def _llamacpp(ggufs, data, tag, results, *extra, mmproj=True) -> list:
    prefix, text_gguf, mmproj_path = ggufs
    args = ["--backend", "llamacpp", "--gguf", text_gguf, "--llama-cpp", prefix, *_common(data, tag, results),
            "--parallel", "1", "--concurrency", "1", "--threads", "2", "--no-probe", *extra]
    return args + (["--mmproj", mmproj_path] if mmproj else [])


def _complete(line: str) -> bool:
    try:
        return "id" in json.loads(line)
    except ValueError:
        return False


def _servers_on(port: int) -> list:
    """Pids of live llama-server processes started with --port PORT (read from /proc, nothing is signalled)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().rsplit(")", 1)[-1].split()[0]
        except (OSError, ValueError, IndexError):
            continue
        if argv and argv[0].endswith(b"llama-server") and state != "Z" and \
                any(a == b"--port" and b == str(port).encode() for a, b in zip(argv, argv[1:])):
            pids.append(int(proc.name))
    return pids


def _server_gone(port: int, timeout_s: float = 15.0) -> bool:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if not _servers_on(port):
            return True
        time.sleep(0.2)
    return False


@pytest.mark.llamacpp
def test_eval_sh_llamacpp_scores_bad_input_and_resumes_after_sigkill(ggufs, bad_data, tmp_path):
    import llamacpp_server as ls

    clean = tmp_path / "clean"
    _eval_sh(*_llamacpp(ggufs, bad_data, "g", clean))
    doc = _check_bad_input_scored(clean, "g")
    assert doc["backend"] == "openai" and doc["llamacpp"]["mmproj"] == str(ggufs[2])
    assert "--mmproj" in doc["llamacpp"]["server_command"] and doc["llamacpp"]["server_exit_code"] is not None
    assert doc["generation"]["mmproj_fingerprint"]["kind"] == "file"  # a resume with another projector is refused
    big = next(r for r in _records(clean / "g.jsonl") if r["id"] == "mmmu_pro/standard/smoke_count_0")
    assert big["input_error"].startswith("the server refused the prompt")

    # kill -9 the whole eval.sh process group mid-run; the server (its own session) dies with its parent
    killed, port = tmp_path / "killed", ls.free_port()
    cmd = ["bash", str(EVAL_SH), *map(str, _llamacpp(ggufs, bad_data, "g", killed, "--port", str(port)))]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    jsonl, deadline = killed / "g.jsonl", time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        # header + the 2 unreadable-image samples (logged before generation) + 1 generated
        if jsonl.is_file() and len(jsonl.read_text().splitlines()) >= 4:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    assert _servers_on(port), "no llama-server found for the run about to be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _server_gone(port), f"llama-server on port {port} survived the SIGKILL of its eval"
    kept = sum(1 for line in jsonl.read_text().splitlines()[1:] if _complete(line))  # a torn last line is dropped
    assert 3 <= kept < 36
    _eval_sh(*_llamacpp(ggufs, bad_data, "g", killed, "--port", str(port)))
    resumed = json.loads((killed / "g.json").read_text())
    assert resumed["resumed"]["reused"] == kept and resumed["resumed"]["generated"] == 36 - kept
    keys = ("id", "output", "finish_reason", "tokens", "correct", "input_error")
    pick = lambda path: [{k: r.get(k) for k in keys} for r in _records(path)]  # noqa: E731
    assert pick(jsonl) == pick(clean / "g.jsonl")
    assert results_schema.without_volatile(resumed)["benchmarks"] == results_schema.without_volatile(doc)["benchmarks"]


@pytest.mark.llamacpp
def test_eval_sh_refuses_image_questions_to_a_server_that_cannot_see(ggufs, bad_data, tmp_path):
    import llamacpp_server as ls

    prefix, text_gguf, _mmproj = ggufs
    res = tmp_path / "r"
    done = _eval_sh(*_llamacpp(ggufs, bad_data, "t", res, mmproj=False), check=False)  # eval.sh starts it: refused before
    assert done.returncode == 2 and f"model {text_gguf} is served text-only (no --mmproj)" in done.stderr
    assert not (res / "t.jsonl").exists()
    cfg = ls.ServerConfig(binary=ls.find_binary(prefix), model=text_gguf, alias="tiny-text", ctx_size=MAX_LEN, threads=2)
    with ls.LlamaServer(cfg) as server:  # a running server without a projector, reached with --base-url
        done = _eval_sh("--backend", "openai", "--base-url", server.base_url + "/v1", "--model", "tiny-text",
                        *_common(bad_data, "t", res), check=False)
    assert done.returncode == 2 and "model tiny-text is text-only" in done.stderr and "modalities.vision=False" in done.stderr
    assert not (res / "t.jsonl").exists()
