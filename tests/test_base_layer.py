"""The base layer: one cache-root rule, one model resolver, one step runner (tests/test_architecture.py
checks that nothing else re-implements them and that the base imports nothing above it)."""
import os
import sys
import time
from pathlib import Path

import pytest

import cache_paths
import model_ref
import step_runner


def test_cache_root_rule_order():
    assert cache_paths.cache_root({"MOE_LOWBIT_CACHE": "/a", "XDG_CACHE_HOME": "/x", "HOME": "/h"}) == Path("/a")
    assert cache_paths.cache_root({"XDG_CACHE_HOME": "/x", "HOME": "/h"}) == Path("/x/moe-lowbit")
    assert cache_paths.cache_root({"HOME": "/h"}) == Path("/h/.cache/moe-lowbit")
    assert cache_paths.cache_dir("fidelity", {"MOE_LOWBIT_CACHE": "/a"}) == Path("/a/fidelity")
    assert cache_paths.scratch_root({"MOE_LOWBIT_CACHE": "/a"}) == Path("/a/scratch")
    assert cache_paths.scratch_root({"MOE_LOWBIT_SCRATCH": "/s", "MOE_LOWBIT_CACHE": "/a"}) == Path("/s")
    assert cache_paths.models_root({}) == cache_paths.REPO_ROOT / "models"
    assert cache_paths.models_root({"MOE_LOWBIT_MODELS": "/m"}) == Path("/m")


def test_cache_root_matches_env_sh(tmp_path):
    """env.sh and cache_paths agree, so the shell and Python find the same venv and caches."""
    import subprocess

    env = {"HOME": str(tmp_path), "PATH": os.environ["PATH"], "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    out = subprocess.run(["bash", "-c", f'source "{cache_paths.REPO_ROOT}/env.sh"; echo "$MOE_LOWBIT_CACHE"; '
                          'echo "$MOE_LOWBIT_SCRATCH"; echo "$MOE_LOWBIT_MODELS"'],
                         env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out == [str(cache_paths.cache_root(env)), str(cache_paths.scratch_root(env)), str(cache_paths.models_root(env))]


def test_model_ref_parse(tmp_path):
    (tmp_path / "ckpt").mkdir()
    assert model_ref.parse(str(tmp_path / "ckpt")).kind == "dir"
    assert model_ref.parse("Qwen/Qwen3.5-122B-A10B", revision="abc").kind == "hub"
    assert model_ref.parse("Qwen/Qwen3.5-122B-A10B", revision="abc").revision == "abc"
    assert model_ref.parse("embedded:smollm2").kind == "embedded"
    assert model_ref.parse("embedded:smollm2").name == "smollm2"
    for bad in ("", "./nope", "/no/such/dir", "a/b/c", "~/x"):
        with pytest.raises(model_ref.ModelRefError):
            model_ref.parse(bad)
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(model_ref.ModelRefError, match="is a file"):
        model_ref.parse(str(f))


def test_model_ref_resolve_dir_needs_config(tmp_path):
    with pytest.raises(model_ref.ModelRefError, match="no config.json"):
        model_ref.resolve(str(tmp_path), what="MODEL")
    (tmp_path / "config.json").write_text("{}")
    assert model_ref.resolve(str(tmp_path)) == tmp_path.resolve()


def test_model_ref_unknown_embedded_names_the_known_ones():
    with pytest.raises(model_ref.ModelRefError, match="embedded:smollm2"):
        model_ref.resolve("embedded:no-such-model")


def test_hub_download_uses_the_one_allow_list(monkeypatch, tmp_path):
    """A hub id never downloads a whole repo: every resolver passes the same allow-list."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    calls = []

    def fake_snapshot(repo, revision=None, allow_patterns=None):
        calls.append((repo, revision, tuple(allow_patterns)))
        (tmp_path / "config.json").write_text("{}")
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    assert model_ref.resolve("org/model", revision="r1") == tmp_path.resolve()
    model_ref.hub_snapshot(model_ref.parse("org/model"), headers_only=True)
    assert calls == [("org/model", "r1", model_ref.HUB_ALLOW_PATTERNS),
                     ("org/model", None, model_ref.HUB_HEADER_PATTERNS)]

    def failing(*a, **k):
        raise OSError("401 Unauthorized hf_SECRETSECRETSECRET")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", failing)
    with pytest.raises(model_ref.ModelRefError, match="hub download failed") as e:
        model_ref.resolve("org/model")
    assert "SECRETSECRET" not in str(e.value)


def test_step_runner_returns_tail_and_logs(tmp_path):
    log = tmp_path / "logs" / "s.log"
    tail = step_runner.run_step("s", [sys.executable, "-c", "print('a'); print('b')"], tmp_path, 30, log_file=log)
    assert tail == ["a", "b"] and log.read_text() == "a\nb\n"


def test_step_runner_failure_quotes_the_error_line(tmp_path):
    code = "import sys; print('noise'); print('error: bad tensor x'); print('more'); sys.exit(3)"
    with pytest.raises(step_runner.StepFailed) as e:
        step_runner.run_step("s", [sys.executable, "-c", code], tmp_path, 30)
    assert e.value.rc == 3 and not e.value.timed_out
    assert "error: bad tensor x" in str(e.value) and "noise" not in str(e.value)


def test_step_runner_timeout_kills_the_whole_group(tmp_path):
    """A grandchild (an engine core) dies with the step: nothing is left running after a timeout."""
    pidfile = tmp_path / "grandchild.pid"
    code = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            f"open({str(pidfile)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    t0 = time.time()
    with pytest.raises(step_runner.StepFailed) as e:
        step_runner.run_step("s", [sys.executable, "-c", code], tmp_path, 2)
    assert e.value.timed_out and time.time() - t0 < 30
    pid = int(pidfile.read_text())
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"grandchild {pid} survived the step's timeout")
