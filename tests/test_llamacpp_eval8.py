"""Tests for src/eval/llamacpp_server.py and src/eval/llamacpp_eval8.py.

Lifecycle tests use tests/fake_llama_server.py (the real server's command line and endpoints, with
failures on demand) so they take seconds: a crash at startup, a server that never gets healthy (and has a
child), a port in use, Ctrl-C / SIGTERM of the owning process, a server killed mid-eval. Each checks the
error message AND that no server process is left. The `llamacpp` test answers a fixture benchmark with
the real llama-server on the packed SmolLM2 GGUF.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import bench8_loaders
import gguf_fixtures as gf
import llamacpp_server as ls
import llamacpp_eval8
import results_schema

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "bench"
FAKE = ROOT / "tests" / "fake_llama_server.py"


# --------------------------------------------------------------------------------------------- helpers
@pytest.fixture
def fake_prefix(tmp_path):
    """A llama.cpp 'install prefix' whose bin/llama-server is the fake server."""
    bin_dir = tmp_path / "prefix" / "bin"
    bin_dir.mkdir(parents=True)
    exe = bin_dir / "llama-server"
    exe.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE}" "$@"\n')
    exe.chmod(0o755)
    return tmp_path / "prefix"


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF fake")
    return path


def gone(pid: int, wait_s: float = 10.0) -> bool:
    """True once no live process has this pid (zombies count as gone)."""
    deadline = time.time() + wait_s
    while time.time() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state == "Z":
            return True
        time.sleep(0.1)
    return False


def read_pids(path: Path, wait_s: float = 15.0) -> tuple[int, int]:
    deadline = time.time() + wait_s
    while time.time() < deadline:
        if path.is_file() and path.read_text().strip():
            a, b = path.read_text().split()
            return int(a), int(b)
        time.sleep(0.05)
    raise AssertionError(f"fake server never wrote {path}")


def cfg_for(prefix, model, **kw):
    return ls.ServerConfig(binary=prefix / "bin" / "llama-server", model=model, **kw)


# ------------------------------------------------------------------------------------------ pure parts
def test_server_command_passes_offload_and_mmproj_through(tmp_path):
    cfg = ls.ServerConfig(binary=Path("/x/llama-server"), model=Path("/m.gguf"), mmproj=Path("/p.gguf"),
                          ctx_size=8192, parallel=2, n_cpu_moe=20, override_tensor=("exps=CPU", "blk\\.1\\.=CUDA0"),
                          n_gpu_layers="all", extra_args=("--flash-attn", "on"), alias="q")
    cmd = ls.server_command(cfg, 5555)
    assert cmd[:3] == ["/x/llama-server", "-m", "/m.gguf"]
    pairs = {cmd[i]: cmd[i + 1] for i in range(1, len(cmd) - 1) if cmd[i].startswith("-")}
    assert pairs["--host"] == "127.0.0.1" and pairs["--port"] == "5555" and pairs["--mmproj"] == "/p.gguf"
    assert pairs["--n-cpu-moe"] == "20" and pairs["-ngl"] == "all" and pairs["-c"] == "8192" and pairs["-np"] == "2"
    assert [cmd[i + 1] for i, a in enumerate(cmd) if a == "--override-tensor"] == ["exps=CPU", "blk\\.1\\.=CUDA0"]
    assert cmd[-2:] == ["--flash-attn", "on"] and "--metrics" in cmd


@pytest.mark.parametrize("kw,needle", [({"host": "0.0.0.0"}, "loopback"), ({"port": 70000}, "port must be"),
                                       ({"override_tensor": ("exps",)}, "PATTERN=BUFFER_TYPE")])
def test_server_config_rejects_bad_values(kw, needle):
    with pytest.raises(ValueError, match=needle):
        ls.ServerConfig(binary=Path("b"), model=Path("m"), **kw)


def test_prometheus_parsing_and_throughput():
    text = ("# HELP llamacpp:prompt_tokens_total n\nllamacpp:prompt_tokens_total 300\n"
            "llamacpp:prompt_seconds_total 0.5\nllamacpp:tokens_predicted_total 50\n"
            "llamacpp:tokens_predicted_seconds_total 2\nllamacpp:x{a=\"b\"} 3\n")
    import llamacpp_metrics as lm

    m = lm.parse_prometheus(text)
    assert m == {"prompt_tokens_total": 300, "prompt_seconds_total": 0.5, "tokens_predicted_total": 50,
                 "tokens_predicted_seconds_total": 2}
    t = lm.throughput(m)
    assert t["prefill_tok_s"] == 600 and t["decode_tok_s"] == 25
    assert lm.throughput({})["decode_tok_s"] is None


# ----------------------------------------------------------------------------------------- lifecycle
def test_port_in_use_is_refused_before_spawning(fake_prefix, model_file, tmp_path, monkeypatch):
    pids = tmp_path / "pids"
    monkeypatch.setenv("FAKE_PIDS", str(pids))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ls.PortInUse, match=f"port {port} .* in use.*--port 0"):
            with ls.LlamaServer(cfg_for(fake_prefix, model_file, port=port)):
                pass
    assert not pids.exists()  # nothing was started


def test_server_that_crashes_at_startup_reports_its_log(fake_prefix, model_file, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "crash")
    server = ls.LlamaServer(cfg_for(fake_prefix, model_file))
    with pytest.raises(ls.ServerError, match="exited with code 3 during startup(.|\n)*failed to load model"):
        with server:
            pass
    assert server.proc.poll() == 3


def test_never_healthy_server_is_killed_with_its_children(fake_prefix, model_file, tmp_path, monkeypatch):
    pids = tmp_path / "pids"
    monkeypatch.setenv("FAKE_MODE", "hang")
    monkeypatch.setenv("FAKE_PIDS", str(pids))
    t0 = time.time()
    with pytest.raises(ls.ServerError, match="not healthy after 3s"):
        with ls.LlamaServer(cfg_for(fake_prefix, model_file, startup_timeout_s=3)):
            pass
    assert time.time() - t0 < 30
    server_pid, child_pid = read_pids(pids)
    assert gone(server_pid) and gone(child_pid)


def test_missing_binary_or_model_is_a_clear_error(fake_prefix, model_file, tmp_path):
    with pytest.raises(ls.ServerError, match="install_llamacpp.sh"):
        ls.LlamaServer(ls.ServerConfig(binary=tmp_path / "nope", model=model_file)).start()
    with pytest.raises(ls.ServerError, match="pack_gguf.sh"):
        ls.LlamaServer(cfg_for(fake_prefix, tmp_path / "nope.gguf")).start()


def test_server_serves_and_stops(fake_prefix, model_file, tmp_path, monkeypatch):
    pids = tmp_path / "pids"
    monkeypatch.setenv("FAKE_PIDS", str(pids))
    with ls.LlamaServer(cfg_for(fake_prefix, model_file)) as server:
        assert server.health() == "ok" and server.alive()
        assert server.probe("hello", 8)["predicted_per_second"] == 100
        assert server.version() == "version: 0 (fake)"
        pid = server.proc.pid
    assert gone(pid) and not server.alive()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


SCRIPT = """
import sys, time
from pathlib import Path
sys.path.insert(0, {src!r})
import llamacpp_server as ls
cfg = ls.ServerConfig(binary=Path({binary!r}), model=Path({model!r}))
with ls.LlamaServer(cfg) as server:
    print("READY", server.proc.pid, flush=True)
    time.sleep(120)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["ctrl-c", "sigterm", "kill-9"])
def test_signal_to_the_owner_stops_the_server(fake_prefix, model_file, sig):
    """SIGKILL reaches no handler: the server dies with its owner through PR_SET_PDEATHSIG instead."""
    code = SCRIPT.format(src=str(ROOT / "src" / "eval"), binary=str(fake_prefix / "bin" / "llama-server"),
                         model=str(model_file))
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = owner.stdout.readline()
        assert line.startswith("READY"), owner.stderr.read()
        server_pid = int(line.split()[1])
        owner.send_signal(sig)
        owner.wait(timeout=30)
        assert owner.returncode != 0
        assert gone(server_pid), f"server {server_pid} survived {sig.name} of its owner"
    finally:
        if owner.poll() is None:
            owner.kill()


# ------------------------------------------------------------------------------ the eval (fake server)
def eval_args(tmp_path, prefix, model, *extra):
    return ["--gguf", str(model), "--llama-cpp", str(prefix), "--tag", "fake", "--benchmarks", "mmlu_pro",
            "--data-file", f"mmlu_pro={FIX / 'mmlu_pro.jsonl'}", "--n", "4", "--thinking", "off",
            "--temperature", "0", "--max-new-tokens", "32", "--max-model-len", "2048", "--grade-workers", "0",
            "--results-dir", str(tmp_path / "res"), "--no-progress", *extra]


def test_eval_through_the_server_writes_the_harness_schema(fake_prefix, model_file, tmp_path, capsys):
    assert llamacpp_eval8.main(eval_args(tmp_path, fake_prefix, model_file, "--n-cpu-moe", "3")) == 0
    doc = json.loads((tmp_path / "res" / "fake.json").read_text())
    results_schema.check_result(doc)
    assert doc["backend"] == "openai" and doc["model_path"] == str(model_file)
    samples = bench8_loaders.load_samples("mmlu_pro", n=4, data_file=str(FIX / "mmlu_pro.jsonl"), seed=0)
    expected = 100.0 * sum(s.gold == "A" for s in samples) / len(samples)  # the fake always answers (A)
    assert doc["benchmarks"]["mmlu_pro"]["n"] == 4 and doc["benchmarks"]["mmlu_pro"]["acc"] == pytest.approx(expected)
    block = doc["llamacpp"]
    assert block["throughput_run"]["prefill_tok_s"] == pytest.approx(1000)
    assert block["throughput_run"]["decode_tok_s"] == pytest.approx(100)
    assert block["probe"]["decode_tok_s"] == 100 and block["offload"]["n_cpu_moe"] == 3
    assert "--n-cpu-moe" in block["server_command"] and block["server_exit_code"] is not None
    assert block["peak_vram_mib"] is None or block["gpu"]
    assert "decode 100.0 tok/s" in capsys.readouterr().out


def test_server_killed_mid_eval_is_a_clear_error_and_resumable(fake_prefix, model_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_MODE", "die_on_chat")
    pids = tmp_path / "pids"
    monkeypatch.setenv("FAKE_PIDS", str(pids))
    rc = llamacpp_eval8.main(eval_args(tmp_path, fake_prefix, model_file, "--max-retries", "1"))
    err = capsys.readouterr().err
    assert rc == 2 and "llama-server died during the eval" in err and "rerun resumes" in err
    assert gone(read_pids(pids)[0])
    assert not (tmp_path / "res" / "fake.json").exists()


def test_backend_other_than_openai_is_refused(fake_prefix, model_file, tmp_path, capsys):
    assert llamacpp_eval8.main(eval_args(tmp_path, fake_prefix, model_file, "--backend", "vllm")) == 2
    assert "always openai" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the real server (slow)
def server_processes_for(model: Path) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except (FileNotFoundError, PermissionError, ProcessLookupError, NotADirectoryError):
            continue
        if cmd and cmd[0].endswith(b"llama-server") and str(model).encode() in cmd:
            pids.append(int(proc.name))
    return pids


@pytest.mark.slow
@pytest.mark.llamacpp
def test_real_llama_server_answers_a_fixture_benchmark(smollm2_dir, tmp_path, capsys):
    prefix = gf.llama_cpp_prefix()
    out, _ = gf.packed("smollm2", smollm2_dir, prefix)
    gguf = out / "smollm2-IQ3_XXS.gguf"
    args = ["--gguf", str(gguf), "--llama-cpp", str(prefix), "--tag", "smollm2-iq3", "--benchmarks", "mmlu_pro",
            "--data-file", f"mmlu_pro={FIX / 'mmlu_pro.jsonl'}", "--n", "2", "--thinking", "off", "--temperature", "0",
            "--max-new-tokens", "24", "--max-model-len", "2048", "--grade-workers", "0", "--threads", "2",
            "--results-dir", str(tmp_path / "res"), "--no-progress"]
    assert llamacpp_eval8.main(args) == 0
    doc = json.loads((tmp_path / "res" / "smollm2-iq3.json").read_text())
    results_schema.check_result(doc)
    assert doc["benchmarks"]["mmlu_pro"]["n"] == 2 and doc["generation"]["backend"] == "openai"
    records = [json.loads(line) for line in (tmp_path / "res" / "smollm2-iq3.jsonl").read_text().splitlines()[1:]]
    assert len(records) == 2 and all(r["tokens"] > 0 for r in records)
    block = doc["llamacpp"]
    assert block["throughput_run"]["decode_tok_s"] > 0 and block["throughput_run"]["prefill_tok_s"] > 0
    assert block["probe"]["decode_tok_s"] > 0 and block["probe"]["predicted_tokens"] == llamacpp_eval8.PROBE_TOKENS
    assert block["server_version"] and block["server_exit_code"] is not None
    assert server_processes_for(gguf) == []
    print(llamacpp_eval8.format_speed(block))


@pytest.mark.slow
@pytest.mark.llamacpp
def test_tiny_qwen35_moe_gguf_runs_in_llama_server(smollm2_dir, tmp_path):
    prefix = gf.llama_cpp_prefix()
    model = gf.build_tiny_qwen35_moe(tmp_path / "tiny-qwen35-moe", smollm2_dir)
    out, _ = gf.packed("tiny-qwen35-moe", model, prefix)
    cfg = ls.ServerConfig(binary=ls.find_binary(prefix), model=out / "tiny-qwen35-moe-IQ3_XXS.gguf",
                          ctx_size=512, threads=2, n_cpu_moe=1)
    with ls.LlamaServer(cfg) as server:
        timings = server.probe("Hello there, how are", 8)
        assert timings["predicted_n"] == 8 and timings["predicted_per_second"] > 0
    assert not server.alive()


@pytest.mark.slow
@pytest.mark.llamacpp
def test_real_server_killed_mid_eval_is_a_clear_error(smollm2_dir, tmp_path, monkeypatch, capsys):
    prefix = gf.llama_cpp_prefix()
    out, _ = gf.packed("smollm2", smollm2_dir, prefix)
    gguf = out / "smollm2-IQ3_XXS.gguf"
    real_run_eval = llamacpp_eval8.eval_run.run_eval

    def kill_then_eval(cfg, argv=None):  # the server dies (SIGKILL, as the OOM killer would) before any answer
        pids = server_processes_for(gguf)
        assert len(pids) == 1
        os.kill(pids[0], signal.SIGKILL)
        return real_run_eval(cfg, argv=argv)

    monkeypatch.setattr(llamacpp_eval8.eval_run, "run_eval", kill_then_eval)
    args = ["--gguf", str(gguf), "--llama-cpp", str(prefix), "--tag", "killed", "--benchmarks", "mmlu_pro",
            "--data-file", f"mmlu_pro={FIX / 'mmlu_pro.jsonl'}", "--n", "2", "--thinking", "off", "--max-new-tokens", "8",
            "--max-model-len", "2048", "--max-retries", "1", "--grade-workers", "0", "--results-dir", str(tmp_path / "res"),
            "--no-progress"]
    assert llamacpp_eval8.main(args) == 2
    err = capsys.readouterr().err
    assert "llama-server died during the eval (exit code -9)" in err
    assert server_processes_for(gguf) == []


def test_eval_sh_backend_llamacpp_starts_the_server_and_writes_the_schema(fake_prefix, model_file, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src" / "eval"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(["bash", str(ROOT / "pipelines" / "eval.sh"), "--backend", "llamacpp",
                           *eval_args(tmp_path, fake_prefix, model_file)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads((tmp_path / "res" / "fake.json").read_text())
    results_schema.check_result(doc)
    assert doc["backend"] == "openai" and doc["llamacpp"]["server_command"][0].endswith("llama-server")
    assert "llama-server:" in done.stdout  # llamacpp_eval8's speed line, not vllm_eval8's summary alone
    helped = subprocess.run(["bash", str(ROOT / "pipelines" / "eval.sh"), "--help"], capture_output=True, text=True,
                            env={**env, "EVAL_BACKEND": "llamacpp"})
    assert helped.returncode == 0 and "--mmproj" in helped.stdout  # EVAL_BACKEND=llamacpp picks the same entry
