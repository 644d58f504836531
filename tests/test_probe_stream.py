"""The streamed probe (one layer materialised at a time, the calibration machinery) gives the whole-model
probe's statistics and therefore its bits plan; it holds one layer in memory; a bad grid/levels/budget fails
before any pass."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import embedded_model
import layer_io
import moe_alloc
import moe_probe
import probe_stream
import tiny_models

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory):
    from pydoc_data import topics

    path = tmp_path_factory.mktemp("probe") / "calib.txt"
    path.write_text("\n\n".join(topics.topics[k] for k in sorted(topics.topics)[1::2])[:60_000])
    return path


def _whole_model_probe(model_dir: Path, windows, dtype):
    import transformers

    config = json.loads((model_dir / "config.json").read_text())
    if config.get("vision_config") is not None:
        cls = getattr(transformers, config["architectures"][0])
        model = cls.from_pretrained(str(model_dir), dtype=dtype).eval()
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval()
    return moe_probe.probe_model(model, windows, batch=2)


def _int3_budget(model_dir: Path, group: int = 128) -> float:
    """The effective bits of every expert at 3 bits (reachable whatever the tiny shapes' group overhead)."""
    units = moe_alloc.expert_units(model_dir)
    return sum(u.bits_at(3.0, group, "full") for u in units.values()) / sum(u.params for u in units.values())


def _count_layers_in_memory(monkeypatch):
    """Patch layer_io.materialise to record how many decoder layers hold real weights after each call."""
    seen = []
    real = layer_io.materialise

    def materialise(skel, module, *a, **k):
        real(skel, module, *a, **k)
        seen.append(sum(any(p.device.type != "meta" for p in layer.parameters()) for layer in skel.layers))

    monkeypatch.setattr(layer_io, "materialise", materialise)
    return seen


@pytest.mark.parametrize("which", ["qwen3_5_moe", "embedded:smollm2-moe"])
def test_streamed_probe_equals_whole_model_probe_and_its_plan(tmp_path, calib_text, monkeypatch, which):
    if which.startswith("embedded:"):
        model_dir = embedded_model.resolve(which, log=lambda m: None)
    else:
        model_dir = tiny_models.build_tiny_checkpoint(which, tmp_path / "src", expert_layout="per_expert",
                                                      byte_tokenizer=True, num_hidden_layers=3,
                                                      layer_types=["linear_attention", "full_attention",
                                                                   "linear_attention"])
    from transformers import AutoTokenizer

    windows = moe_probe.calibration_windows(AutoTokenizer.from_pretrained(str(model_dir)), calib_text.read_text(),
                                            256, 64)
    whole = _whole_model_probe(model_dir, windows, torch.float32)
    seen = _count_layers_in_memory(monkeypatch)
    source = moe_probe.resolve_source(str(model_dir))
    streamed = probe_stream.probe_source(source, windows, dtype=torch.float32, batch=2, progress=False)
    assert seen and max(seen) == 1  # one decoder layer in memory at a time
    assert [l["layer"] for l in streamed["layers"]] == [l["layer"] for l in whole["layers"]]
    for a, b in zip(streamed["layers"], whole["layers"]):
        assert a["freq"] == b["freq"] and a["cold"] == b["cold"] and a["coact"] == b["coact"]
        assert a["wmass"] == pytest.approx(b["wmass"], rel=1e-6)
        assert a["asal"] == pytest.approx(b["asal"], rel=1e-6)
        assert a["entropy_norm"] == pytest.approx(b["entropy_norm"], rel=1e-9)
    for strategy in ("asal", "freq", "wmass"):
        plans = [moe_alloc.make_plan(p, model_dir, _int3_budget(model_dir), strategy, [2, 3, 4], 128, "full")
                 for p in (streamed, whole)]
        assert plans[0]["tensors"] == plans[1]["tensors"], strategy
    bf16 = probe_stream.probe_source(source, windows, batch=2, progress=False)  # the default dtype runs too
    assert sum(bf16["layers"][0]["freq"]) == sum(whole["layers"][0]["freq"])


def test_bad_levels_or_budget_fail_before_the_pass(tmp_path, calib_text, monkeypatch, capsys):
    model_dir = tiny_models.build_tiny_checkpoint("qwen3_moe", tmp_path / "src", byte_tokenizer=True)

    def no_pass(*a, **k):
        raise AssertionError("the pass ran")

    monkeypatch.setattr(probe_stream, "probe_source", no_pass)
    base = ["--model", str(model_dir), "--calib-file", str(calib_text), "--out", str(tmp_path / "p.json")]
    assert moe_probe.main(base + ["--levels", "2,3", "--grid", "sym"]) == 2
    assert "symmetric grid" in capsys.readouterr().err
    assert moe_probe.main(base + ["--levels", "2,3,4", "--grid", "full", "--budget", "5"]) == 2
    assert "outside the levels" in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()


def test_quantize_sh_probe_streams_and_builds_with_the_plan(tmp_path, calib_text):
    model_dir = tiny_models.build_tiny_checkpoint("qwen3_5_moe", tmp_path / "src", expert_layout="per_expert",
                                                  byte_tokenizer=True)
    out = tmp_path / "out"
    env = {**os.environ, "MOE_LOWBIT_VENV": sys.prefix, "RECIPE": "configs/smoke.env", "MODEL": str(model_dir),
           "OUT": str(out), "PROBE": "1", "PROBE_CALIB": str(calib_text), "PROBE_TOKENS": "256", "METHOD": "clip",
           "BITS_PLAN": "", "GRID": "full", "ALLOC_LEVELS": "2,3,4", "ROLE_BITS": "",
           "ALLOC_BUDGET": f"{_int3_budget(model_dir, 32):.4f}", "GROUP": "32"}
    bad = subprocess.run(["bash", "pipelines/quantize.sh", "--no-progress"], cwd=ROOT, capture_output=True, text=True,
                         env={**env, "GRID": "sym"}, timeout=600)
    assert bad.returncode != 0 and "symmetric grid" in bad.stderr and "probe:" not in bad.stderr
    good = subprocess.run(["bash", "pipelines/quantize.sh", "--no-progress"], cwd=ROOT, capture_output=True,
                          text=True, env=env, timeout=600)
    assert good.returncode == 0, good.stderr[-2000:]
    probe = json.loads((Path(f"{out}.probe") / "probe.json").read_text())
    assert probe["streamed"] and probe["dtype"] == "bfloat16"
    meta = json.loads((out / "_ptq_meta.json").read_text())
    assert meta["bits_plan"] is not None
