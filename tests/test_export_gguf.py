"""GGUF export of the store's own codes (gguf_export.py): SmolLM2 on the Q4_0 grid (full, 4-bit, group 32) is
written as Q4_0 blocks that gguf-py decodes to exactly the store, llama.cpp runs it, a one-element corruption
is named, and a grid with no GGUF block type stays dense with its reason recorded.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import gguf_fixtures as gf
import ptq_meta
import ptq_store
import quant_save

ROOT = Path(__file__).resolve().parents[1]
VERIFY = ROOT / "src" / "quant" / "verify_export.py"


@pytest.fixture(scope="module")
def q4_0(smollm2_dir, tmp_path_factory):
    gf.llama_cpp_prefix()  # the converter's tree (built once, cached)
    out = tmp_path_factory.mktemp("gguf") / "q4_0"
    meta = quant_save.build({"model": str(smollm2_dir), "out": str(out), "progress": False, "linear_bits": 4.0,
                             "grid": "full", "group": 32, "emit": "dequant,gguf"})
    return out, meta


def test_q4_0_grid_is_written_as_our_blocks_and_verified(q4_0):
    out, meta = q4_0
    rec = meta["exports"]["gguf"]
    assert rec["verified"]["ok"] and rec["verified"]["tensors_checked"] == meta["source"]["tensors"]
    tmap = json.loads((out / "gguf" / "model.gguf.map.json").read_text())
    store = ptq_store.open_store(out)
    quantized = [n for n in store.names() if store.is_quantized(n)]
    assert sorted(r["store"] for r in tmap.values() if r["type"] == "Q4_0") == sorted(quantized)
    assert all(r["dense_because"] == "kept by the recipe" for r in tmap.values() if r["type"] != "Q4_0")
    assert any(r.get("rows") for r in tmap.values())  # llama's q/k rows are in the converter's rope order


def test_llama_cpp_runs_the_export(q4_0, tmp_path):
    out, _ = q4_0
    r = gf.llama_perplexity_runs(out / "gguf" / "model.gguf", tmp_path)
    assert r.returncode == 0 and "Final estimate: PPL" in r.stdout + r.stderr, (r.stdout + r.stderr)[-2000:]


def test_one_corrupted_block_is_named(q4_0, tmp_path):
    out, _ = q4_0
    # first block, first nibble byte: weight 0 of row 0
    copy = gf.corrupt_copy(out / "gguf", tmp_path / "gguf", "blk.2.ffn_down.weight", 2,
                           lambda b: (b & 0xF0) | ((b + 1) & 0x0F))
    r = subprocess.run([sys.executable, str(VERIFY), str(out), str(copy), "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 1 and "model.layers.2.mlp.down_proj.weight" in r.stderr and "1 element(s) differ" in r.stderr, \
        r.stderr


def test_a_converter_value_that_is_not_the_stores_stops_the_export(q4_0, tmp_path):
    """The converter reads the dequantized view; one changed element of a norm (which llama's converter copies
    as is) makes the GGUF differ from the store: the export refuses, naming both tensors, and leaves nothing."""
    import shutil

    import gguf_export
    from safetensors.torch import load_file, save_file

    out, _ = q4_0
    copy = tmp_path / "q4_0"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("gguf"))
    name = "model.norm.weight"
    shard = next(f for f in copy.glob("*.safetensors") if name in load_file(str(f)))
    tensors = load_file(str(shard))
    tensors[name] = tensors[name].clone()
    tensors[name][0] += 1
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(gguf_export.GgufExportError, match=r"output_norm.*model\.norm\.weight.*not be the measured model"):
        gguf_export.write(ptq_store.open_store(copy), ptq_meta.read_meta(copy), copy / "gguf")
    assert not (copy / "gguf").exists() and not (copy / "gguf.partial").exists()


def test_only_known_converter_transforms_may_differ_from_the_store():
    import gguf_export

    assert gguf_export.converter_transformed("qwen35moe", "blk.3.attn_norm.weight")
    assert gguf_export.converter_transformed("qwen35", "blk.0.ssm_out.weight")
    assert not gguf_export.converter_transformed("qwen35moe", "blk.0.ffn_down_exps.weight")
    assert not gguf_export.converter_transformed("llama", "blk.3.attn_norm.weight")


def test_a_grid_without_a_gguf_type_stays_dense_with_its_reason(smollm2_dir, tmp_path):
    out = tmp_path / "int3"
    meta = quant_save.build({"model": str(smollm2_dir), "out": str(out), "progress": False, "linear_bits": 3.0,
                             "group": 32, "emit": "gguf"})
    assert meta["exports"]["gguf"]["verified"]["ok"]
    tmap = json.loads((out / "gguf" / "model.gguf.map.json").read_text())
    dense = [r for r in tmap.values() if r["store"] and ".mlp." in r["store"]]
    assert dense and all(r["type"] in ("BF16", "F32") and "no GGUF block type" in r["dense_because"] for r in dense)
    assert not list(out.glob("*.safetensors"))  # dequant not emitted: the working shards are gone
    assert np.isfinite(meta["store"]["effective_bits_quantized"])


# --------------------------------------------------------------- K-quant grid (gguf:Q4_K), gptq codes
@pytest.fixture(scope="module")
def q4_k(smollm2_dir, tmp_path_factory):
    gf.llama_cpp_prefix()
    root = tmp_path_factory.mktemp("gguf_k")
    calib = root / "calib.txt"
    calib.write_text(gf.CALIB_PROSE * 8)
    out = root / "q4_k"
    meta = quant_save.build({"model": str(smollm2_dir), "out": str(out), "progress": False, "grid": "gguf:Q4_K",
                             "group": 256, "linear_bits": 4.0, "expert_bits": 4.0, "method": "gptq",
                             "calib_file": str(calib), "calib_tokens": 1024, "calib_ctx": 128, "emit": "gguf"})
    return out, meta


def test_q4_k_gptq_codes_are_written_as_q4_k_blocks_and_verified(q4_k):
    out, meta = q4_k
    rec = meta["exports"]["gguf"]
    assert rec["verified"]["ok"] and rec["verified"]["tensors_checked"] == meta["source"]["tensors"]
    tmap = json.loads((out / "gguf" / "model.gguf.map.json").read_text())
    types = {r["store"]: r["type"] for r in tmap.values() if r.get("store")}
    store = ptq_store.open_store(out)
    for name in store.names():
        info = next(iter(store.specs(name).values()))
        if info["kind"] != "quant":
            continue
        if info["shape"][1] % 256 == 0:  # ffn_down (1536 wide): Q4_K
            assert info["grid"] == "gguf:Q4_K" and types[name] == "Q4_K", name
        else:  # 576-wide rows: llama-quantize's fallback, recorded
            assert (info["grid"], info["bits"], info.get("fallback_from")) == ("full", 5.0, "gguf:Q4_K")
            assert types[name] == "Q5_0", name
    assert sum(t == "Q4_K" for t in types.values()) == 30
    assert meta["store"]["effective_bits_quantized"] == pytest.approx(
        (30 * 576 * 1536 * 4.5 + (meta["store"]["quantized_weights"] - 30 * 576 * 1536) * 5.5)
        / meta["store"]["quantized_weights"], rel=1e-12)


def test_llama_cpp_runs_the_q4_k_export(q4_k, tmp_path):
    out, _ = q4_k
    text = tmp_path / "t.txt"
    text.write_text(gf.CALIB_PROSE * 4)
    ppl = gf.llama_cpp_prefix() / "bin" / "llama-perplexity"
    r = subprocess.run([str(ppl), "-m", str(out / "gguf" / "model.gguf"), "-f", str(text), "-c", "128", "--chunks", "2",
                        "-t", "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "Final estimate: PPL" in r.stdout + r.stderr, (r.stdout + r.stderr)[-2000:]


def test_one_corrupted_q4_k_code_is_named(q4_k, tmp_path):
    import gguf

    import store_pack

    out, _ = q4_k
    name = "model.layers.2.mlp.down_proj.weight"
    (info, parts), = ptq_store.open_store(out).entries(name).values()
    sc = store_pack.unpacked_sub(parts, info)[0, :8]  # row 0, super-block 0's eight sub-block scales
    j = int(torch.nonzero(sc).flatten()[0])  # a sub-block whose codes matter (d * sc != 0)
    copy = tmp_path / "gguf"
    copy.mkdir()
    for f in (out / "gguf").iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    t = next(t for t in gguf.GGUFReader(str(copy / "model.gguf")).tensors if t.name == "blk.2.ffn_down.weight")
    raw = bytearray((copy / "model.gguf").read_bytes())
    pos = int(t.data_offset) + 16 + (j // 2) * 32  # after d, dmin, 12 scale bytes: weight 32 j's nibble
    shift = 4 * (j % 2)
    nib = (raw[pos] >> shift) & 0x0F
    raw[pos] = (raw[pos] & (0xFF ^ (0x0F << shift))) | (((nib + 1) & 0x0F) << shift)
    (copy / "model.gguf").write_bytes(bytes(raw))
    r = subprocess.run([sys.executable, str(VERIFY), str(out), str(copy), "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 1 and name in r.stderr and "1 element(s) differ" in r.stderr, r.stderr
