"""tests/bench/gpu_check.sh --cpu: the prepared GPU check runs here at reduced size and writes one JSON that the
sizing model can read as a cost table (the GPU run is the same script without --cpu)."""
import json
import math
import subprocess
from pathlib import Path

import pytest

import sizing

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_cpu_mode_writes_one_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    res = subprocess.run(["bash", str(ROOT / "tests" / "bench" / "gpu_check.sh"), "--cpu", "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads(out.read_text())
    parts = doc["parts"]
    assert set(parts) == {"clip", "gptq", "gdn_forward", "fsdp2_step"}
    assert all(p["status"] == "ok" for p in parts.values()), {k: p.get("error") for k, p in parts.items()}
    assert parts["clip"]["GB_per_s"] > 0
    for kind in ("gate_up", "down"):  # the batched call and the per-expert loop give the same codes on CPU
        assert parts["gptq"][kind]["codes_equal_fraction"] == 1.0
    assert parts["gdn_forward"]["fla"] or "not installed" in parts["gdn_forward"]["status_note"]
    fsdp = parts["fsdp2_step"]
    assert fsdp["backend"] == "gloo" and fsdp["steps"] == 2 and all(math.isfinite(x) for x in fsdp["losses"])
    costs = sizing.load_costs(str(out))  # the JSON is a cost table for --costs
    assert costs.gptq_gflops == pytest.approx(doc["costs"]["gptq_gflops"]) and "MEASURED" in costs.source
