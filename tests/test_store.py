"""The packed store (store_pack / ptq_meta / verify_export): codes pack and unpack losslessly at every width,
every build decodes from the store to exactly its dequantized view (every grid, a per-expert bits plan,
every calibrated method), the meta's effective bits are the bytes in the store files, and a corrupted
export or a truncated store is refused with the tensor or file named.
"""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import ptq_meta

import ptq_store
import quant_save
import store_pack
import tiny_models
import verify_export

ROOT = Path(__file__).resolve().parents[1]
VERIFY = ROOT / "src" / "quant" / "verify_export.py"


@pytest.mark.parametrize("width", [0, 2, 3, 4, 5, 6, 8])
def test_pack_roundtrip_every_width(width):
    rng = np.random.default_rng(width)
    for n in (1, 7, 8, 41, 1000, 12345):
        u = rng.integers(0, 3 if width == 0 else 2 ** width, size=n).astype(np.uint8)
        packed = store_pack.pack_codes(u, width)
        assert packed.size == store_pack.packed_nbytes(n, width)
        assert np.array_equal(packed, store_pack.pack_codes(u, width, use_kernel=False))  # kernel == numpy
        assert np.array_equal(store_pack.unpack_codes(packed, n, width), u)


def test_pack_is_chunk_invariant(monkeypatch):
    u = np.random.default_rng(0).integers(0, 8, size=1000).astype(np.uint8)
    whole = store_pack.pack_codes(u, 3)
    monkeypatch.setattr(store_pack, "CHUNK_CODES", 40)
    assert np.array_equal(store_pack.pack_codes(u, 3), whole)


def test_unpack_refuses_wrong_length():
    with pytest.raises(ValueError, match="need"):
        store_pack.unpack_codes(np.zeros(3, np.uint8), 16, 3)


@pytest.fixture(scope="module")
def src_ckpt(tmp_path_factory):
    return tiny_models.build_tiny_checkpoint("qwen3_moe", tmp_path_factory.mktemp("store") / "src",
                                             expert_layout="fused", max_shard_size="400KB", byte_tokenizer=True)


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    from pydoc_data import topics

    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n\n".join(topics.topics[k] for k in sorted(topics.topics)[1::2])[:100_000])
    return path


def build(src, out, **kw):
    return quant_save.build({"model": str(src), "out": str(out), "progress": False, "expert_bits": 3.0,
                             "linear_bits": 4.0, **kw})


def check_store_matches_dequant(out: Path, meta: dict) -> None:
    store = ptq_store.open_store(out)
    res = verify_export.verify(store, out, "dequant")
    assert res["tensors_checked"] == res["tensors_in_store"] == meta["source"]["tensors"]
    # effective bits = 8 x (codes + scales + zeros bytes) / quantized weights, from the files themselves
    q_bytes, weights = 0, 0
    for f in sorted((out / ptq_meta.STORE_DIR).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            specs = store_pack.parse_header_metadata(st.metadata())
            for key in st.keys():
                if store_pack.split_key(key)[1] in ("codes", "scales", "zeros"):
                    t = st.get_tensor(key)
                    q_bytes += t.numel() * t.element_size()
            weights += sum(math.prod(i["shape"]) for i in specs.values() if i["kind"] == "quant")
    assert meta["store"]["quantized_bytes"] == q_bytes and meta["store"]["quantized_weights"] == weights
    assert meta["store"]["effective_bits_quantized"] == pytest.approx(8 * q_bytes / weights, rel=1e-12)
    assert abs(meta["store"]["effective_bits_quantized"] - meta["footprint"]["total"]["effective_bits_quantized"]) \
        <= meta["store"]["agree_within_bits"]
    assert sum(r["bytes"] for r in meta["store"]["files"].values()) == \
        sum(f.stat().st_size for f in (out / ptq_meta.STORE_DIR).iterdir())


@pytest.mark.parametrize("grid,bits", [("sym", 3.0), ("full", 4.0), ("asym", 2.0), ("sym", 1.58)])
def test_store_decodes_to_the_dequantized_view(src_ckpt, tmp_path, grid, bits):
    meta = build(src_ckpt, tmp_path / "out", grid=grid, expert_bits=bits, group=32)
    check_store_matches_dequant(tmp_path / "out", meta)
    store = ptq_store.open_store(tmp_path / "out")
    experts = [store.specs(n) for n in store.names() if ".experts." in n]
    assert experts and all(s["width"] == (0 if bits == 1.58 else int(bits)) and s["grid"] == grid
                           for specs in experts for s in specs.values())


@pytest.mark.parametrize("method", ["gptq", "wclip", "awq"])
def test_calibrated_store_decodes_to_the_dequantized_view(src_ckpt, tmp_path, calib_file, method):
    meta = build(src_ckpt, tmp_path / "out", method=method, calib_file=str(calib_file), calib_tokens=256, calib_ctx=64)
    assert meta["methods_applied"].get(method)
    check_store_matches_dequant(tmp_path / "out", meta)


def test_bits_plan_slices_decode(src_ckpt, tmp_path):
    import build_plan

    plan_path = tmp_path / "plan.json"
    store_names = {}
    meta0 = build(src_ckpt, tmp_path / "base")
    for name in ptq_store.open_store(tmp_path / "base").names():
        if ".experts." in name:
            store_names[name] = ptq_store.open_store(tmp_path / "base").specs(name)[name]["shape"][0]
    name, n_exp = sorted(store_names.items())[0]
    plan = {"format": build_plan.BITS_PLAN_FORMAT, "tensors": {name: [4.0 if e == 0 else 2.0 for e in range(n_exp)]}}
    plan_path.write_text(json.dumps(plan))
    meta = build(src_ckpt, tmp_path / "out", bits_plan=str(plan_path), grid="full")
    specs = ptq_store.open_store(tmp_path / "out").specs(name)
    assert len(specs) == n_exp and {s["bits"] for s in specs.values()} == {2.0, 4.0}
    check_store_matches_dequant(tmp_path / "out", meta)
    assert meta0["store"]["quantized_bytes"] != meta["store"]["quantized_bytes"]


def test_corrupted_export_is_named_and_truncated_store_refused(src_ckpt, tmp_path):
    out = tmp_path / "out"
    build(src_ckpt, out)
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in out.iterdir():
        if f.is_file():
            (copy / f.name).write_bytes(f.read_bytes())
    # flip one element of one quantized tensor in the copy
    from safetensors.torch import load_file, save_file

    shard = sorted(copy.glob("*.safetensors"))[1]
    state = load_file(str(shard))
    victim = sorted(k for k in state if ".experts." in k)[0]
    state[victim].view(-1)[5] += 1.0
    with safe_open(str(shard), "pt") as st:
        md = st.metadata()
    save_file(state, str(shard), metadata=md)
    r = subprocess.run([sys.executable, str(VERIFY), str(out), str(copy), "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 1 and victim in r.stderr and "1 element(s) differ" in r.stderr, r.stderr
    ok = subprocess.run([sys.executable, str(VERIFY), str(out), str(out), "--no-progress"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert ptq_meta.read_meta(out).data["exports"]["dequant"]["verified"]["ok"] is True
    # a truncated store file: one line, exit 2, nothing written
    f = sorted((out / ptq_meta.STORE_DIR).iterdir())[0]
    f.write_bytes(f.read_bytes()[:-10])
    before = ptq_meta.meta_path(out).read_bytes()
    r = subprocess.run([sys.executable, str(VERIFY), str(out), str(out), "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 2 and "truncated" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert ptq_meta.meta_path(out).read_bytes() == before


def test_meta_reader_validates(tmp_path):
    with pytest.raises(ptq_meta.MetaError, match="not a quant_save build"):
        ptq_meta.read_meta(tmp_path)
    ptq_meta.meta_path(tmp_path).write_text(json.dumps({"format": "moe-lowbit/ptq-meta/2", "complete": True,
                                                        "recipe": {}, "shards": {"a": {"output": {}}}, "footprint": {}}))
    with pytest.raises(ptq_meta.MetaError, match="shard 'a'"):
        ptq_meta.read_meta(tmp_path)
    ptq_meta.meta_path(tmp_path).write_text(json.dumps({"format": "x"}))
    with pytest.raises(ptq_meta.MetaError, match="format"):
        ptq_meta.read_meta(tmp_path)


def test_decode_is_exact_on_random_tensors():
    """encode(quantize_tensor) -> decode reproduces dequant for 2-D and 3-D, any axis, tail groups."""
    import moe_quant

    gen = torch.Generator().manual_seed(0)
    for shape, axis in (((24, 100), -1), ((3, 40, 24), -2), ((3, 24, 40), -1)):
        w = torch.randn(*shape, generator=gen).bfloat16()
        for grid, bits in (("sym", 3.0), ("asym", 4.0), ("full", 2.0)):
            spec = moe_quant.QuantSpec(bits=bits, group=32, grid=grid)
            res = moe_quant.quantize_tensor(w, spec, axis=axis)
            info = store_pack.entry_spec(spec, axis, shape, w.dtype, "clip")
            dec = store_pack.decode(store_pack.encode(res, info), info)
            assert torch.equal(dec, res.dequant), (shape, axis, grid)
