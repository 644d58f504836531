"""Bit accounting: exact scale counts (tail groups included), agreement with the quantizer, totals."""
import math

import pytest
import torch

import footprint
import moe_quant


@pytest.mark.parametrize("shape,axis", [((96, 160), -1), ((4, 160, 192), -2), ((4, 192, 160), -1), ((7, 300), -1)])
def test_scale_count_matches_what_the_quantizer_stores(shape, axis):
    spec = moe_quant.QuantSpec(3.0, group=128, clip_steps=0)
    res = moe_quant.quantize_tensor(torch.randn(shape), spec, axis=axis)
    assert footprint.n_scale_groups(shape, axis, 128) == res.scales.numel()


def test_packed_bits_count_codes_plus_one_fp16_scale_per_group():
    spec = moe_quant.QuantSpec(4.0, group=128)
    # 96 rows of K=160: two groups per row (128 + a 32-wide tail), 16 bits each
    assert footprint.packed_bits((96, 160), -1, spec) == 96 * 160 * 4 + 96 * 2 * 16
    ternary = moe_quant.QuantSpec(1.58, group=64)
    assert footprint.packed_bits((2, 128), -1, ternary) == pytest.approx(256 * math.log2(3) + 4 * 16)
    # a K that is a multiple of the group gives exactly the spec's nominal bits/weight
    assert footprint.packed_bits((8, 256), -1, spec) / (8 * 256) == spec.stored_bits_per_weight


def test_summary_totals_and_effective_bits():
    spec3, spec4 = moe_quant.QuantSpec(3.0), moe_quant.QuantSpec(4.0)
    tallies = {"routed_expert": footprint.RoleTally(), "attention": footprint.RoleTally(), "norm": footprint.RoleTally()}
    tallies["routed_expert"].add((4, 256, 128), "BF16", spec3, -1, sq_err=1.0, sq_ref=100.0)
    tallies["attention"].add((128, 256), "BF16", spec4, -1, sq_err=0.5, sq_ref=10.0)
    tallies["norm"].add((256,), "F32", None, None)
    s = footprint.summarize(tallies)
    expert_bits = 4 * 256 * 128 * 3 + 4 * 256 * 1 * 16
    attn_bits = 128 * 256 * 4 + 128 * 2 * 16
    norm_bits = 256 * 32
    params = 4 * 256 * 128 + 128 * 256 + 256
    assert s["roles"]["routed_expert"]["effective_bits"] == pytest.approx(3.125)
    assert s["roles"]["norm"]["effective_bits"] == 32.0 and s["roles"]["norm"]["quantized_params"] == 0
    assert s["roles"]["attention"]["rel_mse"] == pytest.approx(0.05) and s["roles"]["norm"]["rel_mse"] is None
    t = s["total"]
    assert t["params"] == params and t["quantized_params"] == params - 256
    assert t["packed_bytes"] == pytest.approx((expert_bits + attn_bits + norm_bits) / 8)
    assert t["effective_bits"] == pytest.approx((expert_bits + attn_bits + norm_bits) / params)
    assert t["effective_bits_quantized"] == pytest.approx((expert_bits + attn_bits) / (params - 256))
    assert t["packed_GiB"] == pytest.approx(t["packed_bytes"] / 2**30) and t["packed_GB"] == pytest.approx(t["packed_bytes"] / 1e9)
    assert t["source_bytes"] == (params - 256) * 2 + 256 * 4
    table = footprint.format_table(s)
    assert "routed_expert" in table and "TOTAL" in table and "3.125" in table


def test_tally_roundtrips_through_json_and_merges():
    a, b = footprint.RoleTally(), footprint.RoleTally()
    a.add((16, 128), "BF16", moe_quant.QuantSpec(3.0), -1, 1.0, 2.0)
    b.add((16,), "BF16", None, None)
    again = footprint.RoleTally.from_dict(a.to_dict())
    assert again == a
    again.merge(b)
    assert again.tensors == 2 and again.params == 16 * 128 + 16 and again.bits == {3.0, 16.0}


def test_unknown_dtype_is_named():
    with pytest.raises(ValueError, match="unknown safetensors dtype 'Q9'"):
        footprint.dtype_bits("Q9")


@pytest.mark.parametrize("grid,bits,group,per_group", [("sym", 4, 128, 16), ("sym", 3, 64, 16), ("full", 3, 32, 16),
                                                       ("full", 2, 64, 16), ("asym", 4, 128, 16 + 4),
                                                       ("asym", 2, 32, 16 + 2), ("asym", 8, 64, 16 + 8)])
def test_each_grid_and_group_is_charged_its_exact_overhead(grid, bits, group, per_group):
    spec = moe_quant.QuantSpec(bits, group=group, grid=grid)
    shape = (4, 96, 300)  # 300 inputs: ceil(300 / group) groups per row, the tail with its own scale/zero
    n_groups = 4 * 96 * math.ceil(300 / group)
    assert footprint.packed_bits(shape, -1, spec) == 4 * 96 * 300 * bits + n_groups * per_group
    res = moe_quant.quantize_tensor(torch.randn(shape), spec)
    assert res.scales.numel() == n_groups and (res.zeros is None or res.zeros.numel() == n_groups)
    assert (res.zeros is not None) == (grid == "asym")
    assert spec.stored_bits_per_weight == pytest.approx(bits + per_group / group)


def test_awq_channel_scales_are_the_only_method_overhead():
    assert footprint.method_overhead_bits((96, 300), -1, "gptq") == 0
    assert footprint.method_overhead_bits((96, 300), -1, "awq") == 300 * 16
    assert footprint.method_overhead_bits((8, 300, 96), 1, "awq") == 8 * 300 * 16
