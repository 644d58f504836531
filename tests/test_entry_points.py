"""Every entry point answers --help without importing torch (tests/bench/bench_help.py prints how fast), and
every pipeline answers --help."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INTERNAL = {"sandbox_launcher"}  # started by the sandbox with a JSON argument, never by a person
PROBE = """
import contextlib, io, runpy, sys
path = sys.argv[1]
sys.argv = [path, "--help"]
out = io.StringIO()
try:
    with contextlib.redirect_stdout(out):
        runpy.run_path(path, run_name="__main__")
    code = 0
except SystemExit as e:
    code = e.code or 0
heavy = sorted(m for m in ("torch", "transformers", "vllm", "numba") if m in sys.modules)
print(code, "usage:" in out.getvalue(), ",".join(heavy) or "-")
"""


def cli_modules() -> list:
    return sorted(p for p in (ROOT / "src").glob("*/*.py")
                  if 'if __name__ == "__main__":' in p.read_text(encoding="utf-8") and p.stem not in INTERNAL
                  and "argparse" in p.read_text(encoding="utf-8"))


def env() -> dict:
    sep = os.pathsep
    path = sep.join(str(ROOT / "src" / d) for d in ("quant", "eval", "distill"))
    return {**os.environ, "PYTHONPATH": path + sep + os.environ.get("PYTHONPATH", "")}


def test_the_list_of_entry_points_is_not_empty():
    names = {p.stem for p in cli_modules()}
    assert {"quant_save", "vllm_eval8", "moe_eval", "moe_probe", "opd_train_fsdp", "smoke"} <= names


@pytest.mark.parametrize("path", cli_modules(), ids=lambda p: p.stem)
def test_help_answers_without_torch(path):
    res = subprocess.run([sys.executable, "-c", PROBE, str(path)], capture_output=True, text=True, env=env(),
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    code, usage, heavy = res.stdout.split()
    assert code == "0" and usage == "True", res.stdout + res.stderr[-2000:]
    assert heavy == "-", f"{path.name} --help imported {heavy}: import it where the work starts"


@pytest.mark.parametrize("script", sorted((ROOT / "pipelines").glob("*.sh")), ids=lambda p: p.name)
def test_pipeline_help_answers(script):
    if script.name in ("setup_venv.sh", "test.sh"):
        pytest.skip("setup_venv.sh prints the venv path; test.sh --help is pytest's")
    res = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, env=env(), timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip(), f"{script.name} --help printed nothing"
