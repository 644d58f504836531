"""llama.cpp's K-quant grids (gguf_grids.py, gguf_blocks.py) and their store entries: every type's blocks decode in
gguf-py to exactly what the store decodes, codes and sub-scales stay on the type's grid, the bytes are the type's
bits per weight, gptq onto the fixed K scales beats round-to-nearest on the H proxy, and the recipe-level errors
(contradicting bits/group, awq, a row no block divides) are one clear line."""
import numpy as np
import pytest
import torch

import build_plan
import gguf_blocks
import gguf_tensors
import moe_quant
import quant_methods as qm
import store_pack
from ckpt_source import BuildError
from quant_spec import K_TYPES, QuantSpec

gguf = pytest.importorskip("gguf")
BPW = {"Q3_K": 3.4375, "Q4_K": 4.5, "Q5_K": 5.5, "Q6_K": 6.5625}


def spec_of(t: str) -> QuantSpec:
    return QuantSpec(bits=K_TYPES[t].bits, group=256, grid="gguf:" + t)


def weight(rows: int, k: int, seed: int = 0, dtype=torch.bfloat16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, k, generator=g) * torch.rand(rows, 1, generator=g) * 0.05
    w[0, :16] = 0.0  # an all-zero sub-block
    if rows > 2:
        w[2] = 0.0  # an all-zero row (d = 0)
        w[1, 5] = 0.9  # an outlier
    return w.to(dtype)


def gguf_py_dequant(parts: dict, info: dict, qtype: str) -> np.ndarray:
    blocks = gguf_tensors.pack_entry(parts, info, qtype)
    assert blocks.shape[1] == info["shape"][1] // 256 * gguf_blocks.TYPE_SIZE[qtype]
    return gguf.quants.dequantize(blocks, getattr(gguf.GGMLQuantizationType, qtype))


@pytest.mark.parametrize("qtype", sorted(K_TYPES))
@pytest.mark.parametrize("rows,k", [(7, 512), (1, 256), (13, 768)])
def test_store_entry_equals_gguf_py_bit_for_bit(qtype, rows, k):
    w = weight(rows, k)
    spec = spec_of(qtype)
    kt = spec.k_type
    res = moe_quant.quantize_tensor(w, spec, axis=1)
    info = store_pack.entry_spec(spec, 1, tuple(w.shape), w.dtype, "clip")
    parts = store_pack.encode(res, info)
    dec = store_pack.decode(parts, info)
    assert torch.equal(dec.view(torch.int16), res.dequant.view(torch.int16))  # the view is the store, bit for bit
    ref = torch.from_numpy(gguf_py_dequant(parts, info, qtype).reshape(rows, k))
    fp32 = store_pack.decode(parts, info, torch.float32)
    assert torch.equal((ref + 0.0).view(torch.int32), (fp32 + 0.0).view(torch.int32))  # exact in fp32 already
    assert int(res.codes.min()) >= kt.lo and int(res.codes.max()) <= kt.hi
    sub = store_pack.unpacked_sub(parts, info)
    assert torch.equal(sub, res.sub_scales) and int(sub.min()) >= kt.sc_lo and int(sub.max()) <= kt.sc_hi
    if kt.has_min:
        assert int(res.sub_mins.min()) >= 0 and int(res.sub_mins.max()) <= kt.sc_hi
    bits = 8 * sum(store_pack.payload_bytes(parts).values()) / w.numel()
    assert bits == BPW[qtype] == spec.stored_bits_per_weight


def test_quantized_error_is_the_types_order():
    w = weight(64, 512, seed=3, dtype=torch.float32)
    res = {t: moe_quant.quantize_tensor(w, spec_of(t)) for t in K_TYPES}
    rel = {t: r.sq_err / r.sq_ref for t, r in res.items()}
    assert rel["Q6_K"] < rel["Q5_K"] < rel["Q4_K"] < rel["Q3_K"] < 0.05


def test_search_never_loses_to_plain_absmax():
    """clip's weighted search (16 ratios) against rtn (absmax only) on the same K grid: never worse in MSE."""
    w = weight(32, 512, seed=5, dtype=torch.float32)
    for t in K_TYPES:
        clip = moe_quant.quantize_tensor(w, spec_of(t))
        rtn = moe_quant.quantize_tensor(w, QuantSpec(bits=K_TYPES[t].bits, group=256, grid="gguf:" + t, clip_steps=0))
        assert clip.sq_err <= rtn.sq_err * 1.001, t


def correlated_hessian(k: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(k) + 0.3 * torch.randn(k, k, generator=g) / k ** 0.5
    x = torch.randn(4096, k, generator=g) * torch.linspace(0.2, 3.0, k) @ mix
    return x.T @ x / x.shape[0]


@pytest.mark.parametrize("qtype", sorted(K_TYPES))
def test_gptq_on_fixed_k_scales_beats_rtn_on_the_proxy(qtype):
    k = 512
    h = correlated_hessian(k)
    w = weight(48, k, seed=7, dtype=torch.float32)
    spec = spec_of(qtype)
    loss = {}
    for name in ("rtn", "gptq"):
        res = qm.quantize_with_method(w, spec, qm.MethodSpec(name, guard=False), hessian=h)
        loss[name] = qm.proxy_loss(w, res.dequant, h)
        info = store_pack.entry_spec(spec, 1, tuple(w.shape), w.dtype, name)
        assert torch.equal(store_pack.decode(store_pack.encode(res, info), info), res.dequant)
        assert int(res.codes.min()) >= spec.k_type.lo and int(res.codes.max()) <= spec.k_type.hi
    assert loss["gptq"] < 0.95 * loss["rtn"], loss


def test_fused_experts_slice_and_row_blocks_join():
    w = torch.randn(3, 4, 512) * 0.02
    spec = spec_of("Q4_K")
    res = moe_quant.quantize_tensor(w, spec, axis=2)
    info = store_pack.entry_spec(spec, 2, tuple(w.shape), w.dtype, "clip")
    parts = store_pack.encode(res, info)
    for e in range(3):
        i_e, p_e = store_pack.slice_leading(info, parts, e)
        assert torch.equal(store_pack.decode(p_e, i_e), res.dequant[e])
    blocks = []
    for r0 in (0, 2):
        sub = moe_quant.quantize_tensor(w[0, r0:r0 + 2], spec, axis=1)
        i_b = store_pack.entry_spec(spec, 1, (2, 512), w.dtype, "clip")
        blocks.append((i_b, store_pack.encode(sub, i_b)))
    i_j, p_j = store_pack.concat_rows("x", blocks)
    assert torch.equal(store_pack.decode(p_j, i_j), res.dequant[0])


def test_bits_or_group_contradicting_the_type_is_one_line():
    with pytest.raises(ValueError, match=r"gguf:Q4_K is llama.cpp's Q4_K block: 4-bit codes in blocks of 256; got bits=3"):
        QuantSpec(bits=3, group=256, grid="gguf:Q4_K")
    with pytest.raises(ValueError, match="group=128"):
        QuantSpec(bits=6, group=128, grid="gguf:Q6_K")
    with pytest.raises(ValueError, match="picks llama.cpp's type by bits"):
        QuantSpec(bits=2, group=256, grid="gguf:K")
    assert QuantSpec(bits=3, group=256, grid="gguf:K").grid == "gguf:Q3_K"
    q8 = QuantSpec(bits=8, group=256, grid="gguf:K")
    assert (q8.grid, q8.group) == ("full", 32)  # Q8_0 is the full grid in blocks of 32 exactly
    assert QuantSpec(bits=4, group=32, grid="gguf:Q4_0").grid == "full"


def test_awq_is_refused_on_k_grids():
    w = torch.randn(4, 256)
    with pytest.raises(ValueError, match="awq on grid gguf:Q4_K.*no slot in a GGUF block"):
        qm.quantize_with_method(w, spec_of("Q4_K"), qm.MethodSpec("awq"), hessian=torch.eye(256))


def test_rows_no_k_block_divides_fall_back_or_are_refused():
    fb = build_plan.gguf_row_fallback("model.layers.0.self_attn.q_proj.weight", 576, spec_of("Q4_K"))
    assert (fb.grid, fb.bits, fb.group, fb.fallback_from) == ("full", 5.0, 32, "gguf:Q4_K")  # llama-quantize: Q5_0
    assert build_plan.gguf_row_fallback("x", 576, spec_of("Q3_K")).bits == 4.0
    assert build_plan.gguf_row_fallback("x", 576, spec_of("Q6_K")).bits == 8.0
    assert build_plan.gguf_row_fallback("x", 576, spec_of("Q5_K")).bits == 5.0
    assert build_plan.gguf_row_fallback("x", 512, spec_of("Q4_K")) == spec_of("Q4_K")
    with pytest.raises(BuildError, match="tensor odd.weight: rows of 100 weights fit neither Q4_K"):
        build_plan.gguf_row_fallback("odd.weight", 100, spec_of("Q4_K"))
    info = store_pack.entry_spec(fb, 1, (4, 576), torch.bfloat16, "clip")
    assert info["fallback_from"] == "gguf:Q4_K" and gguf_tensors.block_type(info) == ("Q5_0", "")


def test_q5_0_blocks_equal_gguf_py():
    w = weight(5, 96, seed=11)
    spec = QuantSpec(bits=5, group=32, grid="gguf:Q5_0")
    res = moe_quant.quantize_tensor(w, spec, axis=1)
    info = store_pack.entry_spec(spec, 1, tuple(w.shape), w.dtype, "clip")
    parts = store_pack.encode(res, info)
    ref = gguf.quants.dequantize(gguf_tensors.pack_entry(parts, info, "Q5_0"), gguf.GGMLQuantizationType.Q5_0)
    ours = (res.dequant + 0.0).view(torch.int16)  # + 0.0: the verifier's rule, +0 == -0
    assert torch.equal((torch.from_numpy(ref.reshape(5, 96)).to(w.dtype) + 0.0).view(torch.int16), ours)
