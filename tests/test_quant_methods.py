"""Calibrated methods (src/quant/quant_methods.py, gptq.py): properties a wrong implementation would break."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gptq
import moe_quant as mq
import quant_methods as qm

ROOT = Path(__file__).resolve().parents[1]


def weights(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * 0.02
    w += torch.randn(*shape, generator=g).pow(3) * 0.004
    return w.to(dtype)


def correlated_hessian(k, n=2048, seed=0, outliers=4):
    """Input second moment of correlated activations with a few loud channels (like real LLM inputs)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)
    x = torch.randn(n, k, generator=g) @ mix * (torch.rand(k, generator=g) * 2 + 0.1)
    x[:, :outliers] *= 15
    return x.T @ x / n


# --------------------------------------------------------------------------------- GPTQ reference
def reference_gptq(w, h, spec, damp=0.01, act_order=False):
    """Textbook GPTQ, one column at a time, no blocks, fp64; group scales by the weighted grid search."""
    W = w.double().clone()
    H = h.double().clone()
    K = W.shape[1]
    d = H.diagonal()
    mean = float(d.mean())
    d[d <= 0] = mean
    H += damp * mean * torch.eye(K, dtype=torch.float64)
    imp = H.diagonal().clone()
    if act_order:
        perm = torch.argsort(-imp, stable=True)
        pre = mq.quantize_tensor(W.float(), spec, importance=imp.float())
        scale_of = lambda col: pre.scales[:, perm[col] // spec.group].double()  # noqa: E731
        zero_of = lambda col: None if pre.zeros is None else pre.zeros[:, perm[col] // spec.group].double()  # noqa: E731
        W, H, imp = W[:, perm], H[perm][:, perm], imp[perm]
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    codes = torch.zeros_like(W)
    for j in range(K):
        if act_order:
            s, z = scale_of(j), zero_of(j)
        elif j % spec.group == 0:
            width = min(spec.group, K - j)
            _, s, z = mq.search_grid(W[:, j:j + width].float(), spec, imp[j:j + width].float().expand(W.shape[0], width))
            s, z = s.double(), (None if z is None else z.double())
        q = mq.grid_codes(W[:, j], s, z, spec)
        codes[:, j] = q
        err = (W[:, j] - mq.grid_dequant(q, s, z)) / U[j, j]
        W[:, j + 1:] -= err[:, None] * U[j, j + 1:]
    if act_order:
        codes = codes[:, torch.argsort(perm)]
    return codes.to(torch.int8)


@pytest.mark.parametrize("grid,bits,group,act_order", [("sym", 3, 64, False), ("asym", 2, 32, False),
                                                       ("full", 4, 64, True), ("sym", 4, 48, True)])
@pytest.mark.parametrize("use_kernel", [True, False])
def test_gptq_equals_a_per_column_reference(grid, bits, group, act_order, use_kernel):
    w = weights(24, 200, seed=1, dtype=torch.float64)  # 200 = 3 groups of 64 + a tail of 8
    h = correlated_hessian(200, seed=2)
    h[7] = 0.0
    h[:, 7] = 0.0  # a channel no token reached
    spec = mq.QuantSpec(bits, group=group, grid=grid)
    ref = reference_gptq(w, h, spec, act_order=act_order)
    codes, scales, zeros, deq = gptq.gptq_batched(w[None], h[None], spec, act_order=act_order, use_kernel=use_kernel)
    assert torch.equal(codes[0], ref)
    assert (zeros is None) == (grid != "asym")
    # dequant is exactly (code - zero) * the stored fp16 scale of the code's group
    gidx = torch.arange(200) // group
    z = zeros[0].double()[:, gidx] if zeros is not None else 0.0
    assert torch.equal(deq[0], (codes[0].double() - z) * scales[0].double()[:, gidx])


# ------------------------------------------------------------------------------ proxy loss vs clip
def smollm2_layer(ckpt: Path) -> torch.Tensor:
    """One real SmolLM2 down_proj [576, 1536] (bf16) from the embedded checkpoint."""
    from safetensors import safe_open

    with safe_open(str(sorted(ckpt.glob("*.safetensors"))[0]), framework="pt") as f:
        return f.get_tensor("model.layers.7.mlp.down_proj.weight")


CASES = [(mq.QuantSpec(4), "rand"), (mq.QuantSpec(3, group=64, grid="full"), "rand"),
         (mq.QuantSpec(2, group=32, grid="asym"), "rand"), (mq.QuantSpec(3), "smollm2")]


@pytest.mark.parametrize("spec,layer", CASES, ids=[f"{s.grid}{s.bits:g}g{s.group}-{l}" for s, l in CASES])
def test_calibrated_methods_never_lose_to_clip_in_the_h_metric(spec, layer, request):
    w = smollm2_layer(request.getfixturevalue("smollm2_dir")) if layer == "smollm2" else weights(96, 384, seed=3, dtype=torch.bfloat16)
    h = correlated_hessian(w.shape[1], n=1024, seed=4)
    clip = qm.proxy_loss(w, mq.quantize_tensor(w, spec).dequant, h)
    losses = {}
    for name in ("wclip", "gptq", "awq"):
        res = qm.quantize_with_method(w, spec, qm.MethodSpec(name, awq_grid=5), hessian=h)
        losses[name] = qm.proxy_loss(w, res.dequant, h)
    assert losses["wclip"] <= clip and losses["gptq"] <= clip and losses["awq"] <= clip * (1 + 1e-6), (clip, losses)
    assert losses["gptq"] < 0.8 * clip, (clip, losses)  # error compensation must actually pay off here


def test_proxy_loss_is_the_trace_formula_for_2d_and_3d():
    w = weights(3, 40, 64, seed=5, dtype=torch.float64)
    dq = w + weights(3, 40, 64, seed=6, dtype=torch.float64) * 0.1
    h = torch.stack([correlated_hessian(64, n=256, seed=s).double() for s in range(3)])
    direct = sum(float(torch.trace((dq[e] - w[e]) @ h[e] @ (dq[e] - w[e]).T)) for e in range(3))
    assert qm.proxy_loss(w, dq, h) == pytest.approx(direct, rel=1e-12)
    assert qm.proxy_loss(w[1], dq[1], h[1]) == pytest.approx(float(torch.trace((dq[1] - w[1]) @ h[1] @ (dq[1] - w[1]).T)), rel=1e-12)
    # contraction axis 1 of an [E, in, out] tensor
    wt, dqt = w.transpose(1, 2).contiguous(), dq.transpose(1, 2).contiguous()
    assert qm.proxy_loss(wt, dqt, h, axis=1) == pytest.approx(direct, rel=1e-12)


# --------------------------------------------------------------------------------- fused experts
def expert_setup(e=4, rows=32, k=160, seed=7, dtype=torch.float32):
    w = weights(e, rows, k, seed=seed, dtype=dtype)
    h = torch.stack([correlated_hessian(k, n=512, seed=seed + i) for i in range(e)])
    return w, h


@pytest.mark.parametrize("name,use_kernel", [("gptq", True), ("gptq", False), ("wclip", True), ("awq", True)])
def test_batched_experts_equal_the_per_expert_loop(name, use_kernel):
    dtype = torch.float64 if not use_kernel else torch.float32  # bmm and mm may round differently in fp32
    w, h = expert_setup(dtype=dtype)
    h[2, 5] = 0.0
    h[2, :, 5] = 0.0
    spec = mq.QuantSpec(4, group=64, grid="asym")
    method = qm.MethodSpec(name, awq_grid=6)
    if name == "gptq":
        batched = gptq.gptq_batched(w, h, spec, use_kernel=use_kernel)
        for e in range(w.shape[0]):
            one = gptq.gptq_batched(w[e:e + 1], h[e:e + 1], spec, use_kernel=use_kernel)
            assert torch.equal(batched[0][e], one[0][0]) and torch.equal(batched[1][e], one[1][0])
            assert torch.equal(batched[2][e], one[2][0])
        return
    batched = qm.quantize_with_method(w, spec, method, hessian=h)
    for e in range(w.shape[0]):
        one = qm.quantize_with_method(w[e], spec, method, hessian=h[e])
        assert torch.equal(batched.dequant[e], one.dequant) and torch.equal(batched.codes[e], one.codes)


@pytest.mark.parametrize("name", ["clip", "rtn", "wclip", "gptq", "awq"])
def test_an_expert_without_tokens_quantizes_like_clip_without_nan(name):
    w, h = expert_setup(dtype=torch.bfloat16)
    h[1] = 0.0  # expert 1 saw no calibration token
    h[2, 9] = 0.0
    h[2, :, 9] = 0.0  # expert 2 never saw input channel 9
    spec = mq.QuantSpec(3)
    res = qm.quantize_with_method(w, spec, qm.MethodSpec(name, awq_grid=4), hessian=h)
    assert bool(torch.isfinite(res.dequant.float()).all())
    assert res.dequant.shape == w.shape and res.dequant.dtype == w.dtype
    if name != "rtn":
        clip_one = mq.quantize_tensor(w[1], spec)
        assert torch.equal(res.dequant[1], clip_one.dequant), "no statistics must mean: exactly what clip does"


def test_awq_keeps_shape_dtype_and_folds_its_scale_into_the_dequant():
    w = weights(3, 96, 64, seed=8, dtype=torch.bfloat16)  # [E, in, out]: contraction axis 1
    h = torch.stack([correlated_hessian(96, n=512, seed=9 + i) for i in range(3)])
    spec = mq.QuantSpec(4, group=32)
    res = qm.quantize_with_method(w, spec, qm.MethodSpec("awq", awq_grid=10), axis=1, hessian=h)
    assert res.dequant.shape == w.shape and res.dequant.dtype == torch.bfloat16
    assert res.in_scale.shape == (3, 96) and res.in_scale.dtype == torch.float16
    assert not torch.equal(res.in_scale, torch.ones_like(res.in_scale)), "loud channels should get a scale"
    # dequant = (codes * group scale) / s, in the contraction-axis-last layout
    gidx = torch.arange(96) // 32
    codes_last = res.codes.transpose(1, 2).float()
    expect = codes_last * res.scales.float()[..., gidx] / res.in_scale.float()[:, None, :]
    assert torch.equal(res.dequant, expect.transpose(1, 2).to(torch.bfloat16))
    clip = qm.proxy_loss(w, mq.quantize_tensor(w, spec, axis=1).dequant, h, axis=1)
    assert qm.proxy_loss(w, res.dequant, h, axis=1) < clip


# ------------------------------------------------------------------------------------ determinism
DETERMINISM_SCRIPT = """
import hashlib, sys, torch, moe_quant as mq, quant_methods as qm
torch.set_num_threads(int(sys.argv[1]))
g = torch.Generator().manual_seed(11)
w = (torch.randn(2, 64, 256, generator=g) * 0.02).to(torch.bfloat16)
x = torch.randn(2, 1024, 256, generator=g) @ torch.randn(256, 256, generator=g) / 16
h = x.transpose(1, 2) @ x / 1024
out = []
for m in ("gptq", "wclip", "awq"):
    r = qm.quantize_with_method(w, mq.QuantSpec(3, grid="asym"), qm.MethodSpec(m, act_order=True, awq_grid=4), hessian=h)
    out.append(hashlib.sha256(r.dequant.view(torch.int16).numpy().tobytes()).hexdigest()[:16])
print(" ".join(out))
"""


def test_same_inputs_same_bytes_in_any_process_and_thread_count(capsys, monkeypatch):
    """A killed build is rerun by another process, maybe with other thread counts: same bytes."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(ROOT / "src" / p) for p in ("quant", "eval"))}
    out = subprocess.run([sys.executable, "-c", DETERMINISM_SCRIPT, "1"], capture_output=True, text=True,
                         env={**env, "NUMBA_NUM_THREADS": "1"}, timeout=300)
    assert out.returncode == 0, out.stderr
    threads = torch.get_num_threads()
    monkeypatch.setattr(sys, "argv", ["-c", "2"])
    try:
        exec(compile(DETERMINISM_SCRIPT, "<determinism>", "exec"), {})
    finally:
        torch.set_num_threads(threads)
    here = capsys.readouterr().out.strip()
    assert out.stdout.strip() == here and len(here.split()) == 3


# ------------------------------------------------------------------------------ expert statistics
def test_blend_expert_hessians_rules_and_values():
    k = 8
    h = torch.stack([torch.eye(k) * (i + 1) for i in range(4)])
    n = [1000, 64, 0, 256]
    blended, rules = qm.blend_expert_hessians(h, n, min_tokens=256)
    assert rules == ["own", "blend", "pooled", "own"]
    pooled = (1000 * h[0] + 64 * h[1] + 256 * h[3]) / 1320
    assert torch.allclose(qm.pooled_hessian(h, torch.tensor(n)), pooled)
    assert torch.equal(blended[0], h[0]) and torch.equal(blended[3], h[3])
    assert torch.allclose(blended[2], pooled)
    assert torch.allclose(blended[1], (64 * h[1] + 192 * pooled) / 256)
    same, rules0 = qm.blend_expert_hessians(h, n, min_tokens=0)
    assert torch.equal(same, h) and rules0 == ["own"] * 4
    custom, _ = qm.blend_expert_hessians(h, n, h_pooled=torch.eye(k) * 7, min_tokens=256)
    assert torch.allclose(custom[2], torch.eye(k) * 7)
    shrunk, rules_s = qm.blend_expert_hessians(h, n, min_tokens=256, rule="shrink")
    assert rules_s == ["blend", "blend", "pooled", "blend"]
    assert torch.allclose(shrunk[0], (1000 * h[0] + 256 * pooled) / 1256) and torch.allclose(shrunk[2], pooled)
    with pytest.raises(ValueError, match="unknown blend rule"):
        qm.blend_expert_hessians(h, n, rule="magic")


# ---------------------------------------------------------------------------------------- errors
def test_bad_input_fails_with_a_message_naming_the_problem():
    with pytest.raises(ValueError, match=r"unknown method 'gptqq'; known methods: clip, rtn, wclip, gptq, awq"):
        qm.MethodSpec("gptqq")
    with pytest.raises(ValueError, match="unknown grid 'nf4'"):
        mq.QuantSpec(4, grid="nf4")
    w = weights(16, 64)
    with pytest.raises(ValueError, match="needs the input second moment"):
        qm.quantize_with_method(w, mq.QuantSpec(4), qm.MethodSpec("gptq"))
    with pytest.raises(ValueError, match=r"hessian shape \(32, 32\) does not match"):
        qm.quantize_with_method(w, mq.QuantSpec(4), qm.MethodSpec("wclip"), hessian=torch.eye(32))
    bad = w.clone()
    bad[3, 4] = float("inf")
    with pytest.raises(ValueError, match="NaN/Inf"):
        qm.quantize_with_method(bad, mq.QuantSpec(4), qm.MethodSpec("gptq"), hessian=torch.eye(64))
    with pytest.raises(ValueError, match="damp"):
        qm.MethodSpec("gptq", damp=-1)


def test_the_clip_guard_takes_clip_per_expert_only_where_clip_scores_better():
    w, h = expert_setup(e=3, dtype=torch.bfloat16)
    spec = mq.QuantSpec(3)
    raw = qm.quantize_with_method(w, spec, qm.MethodSpec("wclip", guard=False), hessian=h)
    clip = mq.quantize_tensor(w, spec)
    # make expert 0's statistics disagree with its diagonal: wclip's per-channel weights are then wrong
    h_bad = h.clone()
    h_bad[0] = h[0] + torch.ones_like(h[0]) * float(h[0].diagonal().mean()) * 5
    raw_bad = qm.quantize_with_method(w, spec, qm.MethodSpec("wclip", guard=False), hessian=h_bad)
    guarded = qm.quantize_with_method(w, spec, qm.MethodSpec("wclip"), hessian=h_bad)
    per_raw = qm.proxy_loss_per_expert(w, raw_bad.dequant, h_bad)
    per_clip = qm.proxy_loss_per_expert(w, clip.dequant, h_bad)
    per_guard = qm.proxy_loss_per_expert(w, guarded.dequant, h_bad)
    assert per_clip[0] < per_raw[0] and per_clip[1] > per_raw[1], "the setup must exercise both picks"
    assert torch.all(per_guard <= torch.minimum(per_raw, per_clip))
    for e in range(3):
        want = clip if per_clip[e] < per_raw[e] else raw_bad
        assert torch.equal(guarded.dequant[e], want.dequant[e]) and torch.equal(guarded.scales[e], want.scales[e])
    assert torch.equal(guarded.dequant[1:], raw.dequant[1:])
