"""Properties of the quant math (src/quant/moe_quant.py) that a broken quantizer would violate."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moe_quant as mq

ROOT = Path(__file__).resolve().parents[1]


def weights(*shape, seed=0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    # heavy-ish tails like real weights, so clipping has something to trade off
    w = torch.randn(*shape, generator=g) * 0.02
    w += torch.randn(*shape, generator=g).pow(3) * 0.004
    return w.to(dtype)


@pytest.mark.parametrize("bits", [1.58, 3, 4, 5, 6, 8])
def test_codes_are_symmetric_ints_and_dequant_is_code_times_stored_scale(bits):
    spec = mq.QuantSpec(bits, group=64)
    w = weights(48, 320, seed=1)
    res = mq.quantize_tensor(w, spec)
    qmax = spec.qmax
    assert res.codes.abs().max() <= qmax
    assert res.scales.dtype == torch.float16
    groups = res.codes.reshape(48, 5, 64).float()
    for row in range(48):
        for g in range(5):
            levels = torch.unique(groups[row, g])
            assert len(levels) <= 2 ** math.ceil(bits) - 1
    # dequant is exactly code * (fp16 scale), then rounded once to the output dtype
    expect = (groups * res.scales.float()[..., None]).reshape(48, 320).to(w.dtype)
    assert torch.equal(res.dequant, expect)


def test_level_count_bound_int3():
    res = mq.quantize_tensor(weights(16, 1024), mq.QuantSpec(3))
    per_group = res.codes.reshape(-1, 128)
    assert max(len(torch.unique(g)) for g in per_group) <= 7
    assert set(torch.unique(res.codes).tolist()) <= set(range(-3, 4))


@pytest.mark.parametrize("bits", [1.58, 3, 4, 8])
def test_clip_search_never_worse_than_absmax(bits):
    w = weights(64, 512, seed=int(bits))
    clipped = mq.fake_quant(w, mq.QuantSpec(bits, clip_steps=16))
    absmax = mq.fake_quant(w, mq.QuantSpec(bits, clip_steps=0))
    e_clip, e_abs = mq.quant_error(w, clipped), mq.quant_error(w, absmax)
    assert e_clip <= e_abs * (1 + 1e-6)
    if bits <= 3:  # at low bits the search must actually find something better on tailed weights
        assert e_clip < 0.97 * e_abs


def test_error_decreases_with_bits():
    w = weights(64, 512, seed=3)
    errs = [mq.quant_error(w, mq.fake_quant(w, mq.QuantSpec(b))) for b in (1.58, 3, 4, 5, 6, 8)]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs


def test_absmax_scale_is_fp16_rounded_absmax_over_qmax():
    w = weights(8, 256, seed=4, dtype=torch.float32)
    res = mq.quantize_tensor(w, mq.QuantSpec(4, clip_steps=0))
    expect = (w.reshape(8, 2, 128).abs().amax(-1) / 7).to(torch.float16)
    assert torch.equal(res.scales, expect)


def test_tail_group_gets_its_own_scale():
    # 130 columns at group 128: a big first group must not swamp the two tail values.
    w = torch.cat([torch.full((4, 128), 100.0), torch.tensor([[0.011, -0.013]]).repeat(4, 1)], dim=1)
    res = mq.quantize_tensor(w, mq.QuantSpec(4, group=128, clip_steps=0))
    assert res.scales.shape == (4, 2)
    tail_alone = mq.quantize_tensor(w[:, 128:].contiguous(), mq.QuantSpec(4, group=128, clip_steps=0))
    assert torch.equal(res.dequant[:, 128:], tail_alone.dequant)
    assert (res.dequant[:, 128:] != 0).all()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (torch.equal calls -0.0 and 0.0 equal; a checkpoint's bytes do not)."""
    ints = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
    return a.dtype == b.dtype and torch.equal(a.view(ints.get(a.dtype, a.dtype)), b.view(ints.get(b.dtype, b.dtype)))


@pytest.mark.parametrize("shape,group", [((256, 1000), 128),  # 7 full groups + a tail of 104
                                         ((37, 300), 100),    # group not a multiple of 8 lanes; rows not of 8 groups
                                         ((9, 20), 7)])       # groups narrower than one lane block
def test_kernel_and_torch_reference_are_bit_identical(shape, group):
    w = weights(*shape, seed=5)
    w[3] = 0.0  # an all-zero row: scale 0, codes 0
    w[4, :5] = -0.0
    for bits in (1.58, 3, 4):
        spec = mq.QuantSpec(bits, group=group)
        fast = mq.quantize_tensor(w, spec, use_kernel=True)
        ref = mq.quantize_tensor(w, spec, use_kernel=False)
        assert torch.equal(fast.scales, ref.scales)
        assert torch.equal(fast.codes, ref.codes)
        assert same_bits(fast.dequant, ref.dequant)
        assert (fast.sq_err, fast.sq_ref) == (ref.sq_err, ref.sq_ref)


def test_kernel_fp16_scale_rounding_matches_cast_over_many_magnitudes():
    # magnitudes from fp16-subnormal scales up to large ones
    mags = torch.logspace(-8, 3, 200)
    w = torch.randn(200, 128, generator=torch.Generator().manual_seed(6)) * mags[:, None]
    for steps in (0, 16):
        spec = mq.QuantSpec(4, clip_steps=steps)
        fast = mq.quantize_tensor(w, spec, use_kernel=True)
        ref = mq.quantize_tensor(w, spec, use_kernel=False)
        assert torch.equal(fast.scales, ref.scales)
        assert same_bits(fast.dequant, ref.dequant)
        if steps == 0:  # absmax only: the scale is the fp16 cast of absmax / qmax
            assert torch.equal(fast.scales, (w.abs().amax(1, keepdim=True) / 7).to(torch.float16))


def test_deterministic_and_chunking_invariant():
    w = weights(300, 384, seed=7)
    a = mq.quantize_tensor(w, mq.QuantSpec(3))
    b = mq.quantize_tensor(w, mq.QuantSpec(3))
    c = mq.quantize_tensor(w, mq.QuantSpec(3, chunk_groups=7))  # many tiny chunks, uneven split
    assert torch.equal(a.dequant, b.dequant) and torch.equal(a.codes, b.codes)
    assert torch.equal(a.dequant, c.dequant) and torch.equal(a.scales, c.scales)


def test_axis_argument_groups_along_that_axis():
    w = weights(3, 256, 40, seed=8)  # [E, in, out]: contraction axis -2
    along = mq.quantize_tensor(w, mq.QuantSpec(4), axis=-2)
    manual = mq.quantize_tensor(w.transpose(1, 2).contiguous(), mq.QuantSpec(4), axis=-1)
    assert along.dequant.shape == w.shape
    assert torch.equal(along.dequant, manual.dequant.transpose(1, 2))


def test_ternary_uses_three_levels_and_is_charged_log2_3():
    w = weights(8, 256, seed=9)
    res = mq.quantize_tensor(w, mq.QuantSpec(1.58))
    assert set(torch.unique(res.codes).tolist()) <= {-1, 0, 1}
    assert mq.QuantSpec(1.58).stored_bits_per_weight == pytest.approx(math.log2(3) + 16 / 128)
    assert mq.QuantSpec(3).stored_bits_per_weight == pytest.approx(3.125)
    assert mq.QuantSpec(16).stored_bits_per_weight == 16


def test_two_bits_means_four_levels_never_ternary_charged_as_two():
    with pytest.raises(ValueError, match="bits=2 on the symmetric grid has only 3 levels.*grid='full'"):
        mq.QuantSpec(2)
    with pytest.raises(ValueError, match="ternary"):
        mq.QuantSpec(1.58, grid="full")
    w = weights(64, 256, seed=9)
    for grid in ("full", "asym"):
        spec = mq.QuantSpec(2, grid=grid)
        assert spec.levels == 4 and spec.code_range == (-2, 1)
        res = mq.quantize_tensor(w, spec)
        per_group = res.codes.reshape(-1, 128)
        counts = [len(torch.unique(g)) for g in per_group]
        assert max(counts) == 4, f"{grid}: 2-bit groups should use all 4 levels on tailed weights"
        assert set(torch.unique(res.codes).tolist()) <= {-2, -1, 0, 1}


def test_sixteen_bits_is_identity_and_refused_by_quantize_tensor():
    w = weights(4, 128)
    assert torch.equal(mq.fake_quant(w, mq.QuantSpec(16)), w)
    with pytest.raises(ValueError, match="untouched"):
        mq.quantize_tensor(w, mq.QuantSpec(16))


def test_zero_groups_stay_zero():
    w = torch.zeros(2, 256)
    w[0, :128] = torch.linspace(-1, 1, 128)
    res = mq.quantize_tensor(w, mq.QuantSpec(3))
    assert torch.equal(res.dequant[:, 128:], torch.zeros(2, 128))
    assert res.scales[1].eq(0).all()


def test_ste_forward_is_fake_quant_and_backward_is_identity():
    w = weights(16, 256, dtype=torch.float32).requires_grad_(True)
    spec = mq.QuantSpec(3)
    y = mq.fake_quant_ste(w, spec)
    assert torch.equal(y.detach(), mq.fake_quant(w.detach(), spec))
    (y * torch.arange(256.0)).sum().backward()
    assert torch.equal(w.grad, torch.arange(256.0).expand(16, 256))


@pytest.mark.parametrize("kwargs, message", [
    ({"bits": 7}, "bits must be one of"),
    ({"bits": 3, "group": 0}, "group must be a positive integer"),
    ({"bits": 3, "group": -1}, "group must be a positive integer"),
    ({"bits": 3, "clip_steps": -2}, "clip_steps"),
    ({"bits": 3, "clip_lo": 1.5}, "clip_lo"),
])
def test_bad_spec_fails_with_a_message_naming_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mq.QuantSpec(**kwargs)


def test_non_finite_weights_are_refused():
    w = weights(4, 256, dtype=torch.float32)
    w[2, 5] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        mq.quantize_tensor(w, mq.QuantSpec(4))


def test_integer_tensors_are_refused():
    with pytest.raises(ValueError, match="floating-point"):
        mq.quantize_tensor(torch.ones(4, 128, dtype=torch.int32), mq.QuantSpec(4))


SUMS_SCRIPT = """
import sys, torch, moe_quant as mq
torch.set_num_threads(int(sys.argv[1]))
g = torch.Generator().manual_seed(12)
w = (torch.randn(96, 4096, generator=g) * 0.02).to(torch.bfloat16)
r = mq.quantize_tensor(w, mq.QuantSpec(3), return_codes=False)
print(repr(r.sq_err), repr(r.sq_ref))
"""


def test_reported_error_sums_do_not_depend_on_process_threads_or_kernel_cache(tmp_path):
    """A resumed build mixes shards from several processes: each must report the very same sums (a CI run
    once differed in the 10th digit between the pytest process and a builder subprocess)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src" / "quant")}
    seen = set()
    for threads, cache in ((1, "a"), (2, "a"), (2, "b")):  # "a" twice: compiled once, then loaded from disk
        out = subprocess.run([sys.executable, "-c", SUMS_SCRIPT, str(threads)], capture_output=True, text=True,
                             env={**env, "NUMBA_CACHE_DIR": str(tmp_path / cache), "NUMBA_NUM_THREADS": str(threads)},
                             timeout=300)
        assert out.returncode == 0, out.stderr
        seen.add(out.stdout.strip())
    g = torch.Generator().manual_seed(12)
    w = (torch.randn(96, 4096, generator=g) * 0.02).to(torch.bfloat16)
    here = mq.quantize_tensor(w, mq.QuantSpec(3), return_codes=False)
    seen.add(f"{here.sq_err!r} {here.sq_ref!r}")
    assert len(seen) == 1, seen


@pytest.mark.parametrize("use_kernel", [True, False])
def test_reported_error_sums_match_a_direct_computation(use_kernel):
    w = weights(40, 700, seed=10, dtype=torch.float32)
    res = mq.quantize_tensor(w, mq.QuantSpec(3), use_kernel=use_kernel)
    assert res.sq_err == pytest.approx(mq.quant_error(w, res.dequant), rel=1e-5)
    assert res.sq_ref == pytest.approx(float((w.double() ** 2).sum()), rel=1e-5)


@pytest.mark.parametrize("grid,bits,weighted", [("sym", 3, True), ("full", 2, False), ("full", 4, True),
                                                ("asym", 2, True), ("asym", 8, False)])
def test_every_grid_kernel_and_torch_path_are_bit_identical(grid, bits, weighted):
    w = weights(37, 300, seed=13)
    w[3] = 0.0
    w[4, :5] = -0.0
    w[5, 128:256] = torch.linspace(0.001, 0.002, 128)  # an all-positive group: asym zero-point at the bottom
    imp = torch.rand(300, generator=torch.Generator().manual_seed(3)) ** 4 if weighted else None
    for group in (128, 100, 7):
        spec = mq.QuantSpec(bits, group=group, grid=grid)
        fast = mq.quantize_tensor(w, spec, use_kernel=True, importance=imp)
        ref = mq.quantize_tensor(w, spec, use_kernel=False, importance=imp)
        assert torch.equal(fast.scales, ref.scales)
        assert torch.equal(fast.codes, ref.codes)
        assert (fast.zeros is None) == (grid != "asym") and (fast.zeros is None or torch.equal(fast.zeros, ref.zeros))
        assert same_bits(fast.dequant, ref.dequant)
        assert (fast.sq_err, fast.sq_ref) == (ref.sq_err, ref.sq_ref)


@pytest.mark.parametrize("grid,bits,levels", [("sym", 3, 7), ("sym", 4, 15), ("full", 2, 4), ("full", 3, 8),
                                              ("full", 4, 16), ("asym", 2, 4), ("asym", 3, 8), ("asym", 4, 16)])
def test_levels_per_group_per_grid_and_dequant_is_code_minus_zero_times_scale(grid, bits, levels):
    spec = mq.QuantSpec(bits, group=64, grid=grid)
    assert spec.levels == levels
    w = weights(64, 256, seed=14)
    w[1, 64:128] = w[1, 64:128].abs()  # an all-positive group
    res = mq.quantize_tensor(w, spec)
    lo, hi = spec.code_range
    assert int(res.codes.min()) >= lo and int(res.codes.max()) <= hi
    groups = res.codes.reshape(64, 4, 64).float()
    counts = torch.tensor([[len(torch.unique(groups[r, g])) for g in range(4)] for r in range(64)])
    assert int(counts.max()) == levels, "the grid's levels must all be usable (and never more)"
    zeros = res.zeros.float()[..., None] if res.zeros is not None else 0.0
    expect = ((groups - zeros) * res.scales.float()[..., None]).reshape(64, 256).to(w.dtype)
    assert torch.equal(res.dequant, expect)


def test_full_and_asym_grids_beat_sym_at_equal_code_bits():
    w = weights(128, 512, seed=15)
    sym = mq.quant_error(w, mq.fake_quant(w, mq.QuantSpec(3)))
    full = mq.quant_error(w, mq.fake_quant(w, mq.QuantSpec(3, grid="full")))
    asym = mq.quant_error(w, mq.fake_quant(w, mq.QuantSpec(3, grid="asym")))
    assert full < 0.9 * sym and asym < 0.9 * sym, (sym, full, asym)
