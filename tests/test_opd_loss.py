"""opd_loss: the top-k + rest divergences against hand computation; lora_quant's fixed grid against the builder."""
import math

import pytest
import torch

import lora_quant
import moe_quant
import opd_loss


def _logsoftmax(xs):
    m = max(xs)
    lse = m + math.log(sum(math.exp(x - m) for x in xs))
    return [x - lse for x in xs]


def test_reverse_kl_two_tokens_by_hand():
    # vocab 4, k = 2. Teacher full distributions (so its rest mass is exact), student logits.
    teacher = [[0.5, 0.3, 0.15, 0.05], [0.1, 0.6, 0.2, 0.1]]
    student_logits = [[1.0, 0.2, -0.5, 0.1], [0.0, 0.0, 1.5, -1.0]]
    topk = [[0, 1], [1, 2]]
    expected = []
    for t, s_logits, ids in zip(teacher, student_logits, topk):
        s = [math.exp(x) for x in _logsoftmax(s_logits)]
        t_b = [t[i] for i in ids] + [1.0 - sum(t[i] for i in ids)]
        s_b = [s[i] for i in ids] + [1.0 - sum(s[i] for i in ids)]
        expected.append(sum(p * math.log(p / q) for p, q in zip(s_b, t_b)))
    t_logp = torch.tensor([[math.log(t[i]) for i in ids] for t, ids in zip(teacher, topk)])
    t_rest = torch.tensor([math.log(1.0 - sum(t[i] for i in ids)) for t, ids in zip(teacher, topk)])
    got = opd_loss.token_divergence(torch.tensor(student_logits), torch.tensor(topk), t_logp, t_rest, "reverse_kl")
    assert got.tolist() == pytest.approx(expected, rel=1e-5)
    # and the mean loss the trainer optimises is their token mean
    mask = torch.ones(2, dtype=torch.bool)
    assert float(opd_loss.masked_token_sum(got, mask) / 2) == pytest.approx(sum(expected) / 2, rel=1e-5)


def test_forward_kl_and_jsd_by_hand():
    t_b = [0.7, 0.2, 0.1]
    s_logits = torch.tensor([[2.0, 0.5, -1.0, -1.0]])  # ids 0, 1 = top-k; rest = ids 2, 3
    s = [math.exp(x) for x in _logsoftmax(s_logits[0].tolist())]
    s_b = [s[0], s[1], s[2] + s[3]]
    args = (s_logits, torch.tensor([[0, 1]]), torch.tensor([[math.log(0.7), math.log(0.2)]]),
            torch.tensor([math.log(0.1)]))
    fkl = sum(p * math.log(p / q) for p, q in zip(t_b, s_b))
    assert float(opd_loss.token_divergence(*args, loss="forward_kl")) == pytest.approx(fkl, rel=1e-5)
    beta = 0.3
    m = [beta * p + (1 - beta) * q for p, q in zip(t_b, s_b)]
    jsd = beta * sum(p * math.log(p / x) for p, x in zip(t_b, m)) + \
        (1 - beta) * sum(q * math.log(q / x) for q, x in zip(s_b, m))
    assert float(opd_loss.token_divergence(*args, loss="jsd", beta=beta)) == pytest.approx(jsd, rel=1e-5)


def test_rest_bucket_is_the_teachers_real_tail_not_a_tiny_constant():
    # Student == teacher on the full vocabulary: every divergence is 0, although 40 % of the mass is
    # outside the top-2 (a renormalised top-k would charge that mass against log(1e-12)).
    logits = torch.tensor([[1.0, 0.5, 0.8, 0.7, 0.1]])
    logp = torch.log_softmax(logits, -1)
    top_lp, top_ids = logp.topk(2, -1)
    rest = torch.logsumexp(logp.scatter(-1, top_ids, float("-inf")), -1)
    for loss in opd_loss.LOSSES:
        assert float(opd_loss.token_divergence(logits, top_ids, top_lp, rest, loss)) == pytest.approx(0.0, abs=1e-6)
    # a teacher rest of exactly 0 mass is floored at the documented resolution, so the loss stays finite
    zero_rest = torch.tensor([float("-inf")])
    val = opd_loss.token_divergence(logits, top_ids, top_lp, zero_rest, "reverse_kl")
    assert math.isfinite(float(val)) and float(val) > 0


def test_fixed_grid_reproduces_the_builder_and_ste_gradients_flow():
    torch.manual_seed(0)
    spec = moe_quant.QuantSpec(bits=3.0, group=128, clip_steps=4)
    for shape in [(24, 160), (3, 20, 200)]:  # 160/200 = tail groups; 3-D = fused experts
        w = (torch.randn(shape) * 0.05).to(torch.bfloat16)
        target = lora_quant.Target("x", "routed_expert", shape, len(shape) - 1, spec)
        s, z, dq = lora_quant.build_scales(w, target)
        assert torch.equal(lora_quant.quantize_fixed(w, s, target.axis, spec, z).to(torch.bfloat16), dq)
        mod = lora_quant.QuantLora(target, s, z, rank=4, alpha=8.0, generator=torch.Generator().manual_seed(0))
        assert torch.equal(mod(w), dq)  # B = 0: the forward IS the student's weight
        with torch.no_grad():
            mod.B.normal_(0, 0.05)
        out = mod(w.float())
        merged = lora_quant.merged_weight(w, mod.A.detach(), mod.B.detach(), mod.scaling, s, target.axis, spec,
                                          torch.bfloat16, z)
        assert torch.equal(out.to(torch.bfloat16), merged)  # training value == what merge writes
        assert not torch.equal(merged, dq)  # the adapter moved some weights across grid points
        (out * torch.randn_like(out)).sum().backward()
        assert mod.A.grad is not None and mod.A.grad.abs().sum() > 0
        assert mod.B.grad is not None and mod.B.grad.abs().sum() > 0


@pytest.mark.parametrize("grid", ["sym", "asym"])
def test_fast_fixed_grid_is_the_reference_grid_bit_for_bit_and_its_ste_gradient_is_autograds(grid):
    # The training forward's in-place FixedGrid must give exactly quantize_fixed (the builder's own code
    # functions), on whole and tail groups, along the last axis or axis 0, with an all-zero group.
    torch.manual_seed(1)
    spec = moe_quant.QuantSpec(bits=3.0, group=64, clip_steps=4, grid=grid)
    for shape, axis in [((3, 40, 200), 2), ((96, 30), 0), ((24, 128), 1)]:
        w = (torch.randn(shape) * 0.05).to(torch.bfloat16).float()
        w.select(axis, 0).zero_()  # with group 64 this zeroes part of a group only ...
        if axis == len(shape) - 1:
            w[..., :64] = 0.0  # ... and here whole groups: zero scales
        target = lora_quant.Target("x", "routed_expert", shape, axis, spec)
        s, z, dq = lora_quant.build_scales(w, target)
        grid_fast = lora_quant.FixedGrid(s, z, axis, spec, shape)
        delta = torch.randn(shape) * 0.02
        ref = lora_quant.quantize_fixed(w + delta, s, axis, spec, z)
        fast = grid_fast.quantize_(w + delta)
        assert torch.equal(ref.view(torch.int32), fast.view(torch.int32))  # same bits, +0.0 included
        # the STE gradient into A and B is autograd's through delta = scaling * B A
        mod = lora_quant.QuantLora(target, s, z, rank=3, alpha=6.0, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            mod.B.normal_(0, 0.05)
        r = torch.randn(shape)
        (mod(w) * r).sum().backward()
        A, B = mod.A.detach().clone().requires_grad_(), mod.B.detach().clone().requires_grad_()
        ((torch.matmul(B, A) * mod.scaling) * r).sum().backward()
        assert torch.allclose(mod.A.grad, A.grad, rtol=1e-5, atol=1e-7)
        assert torch.allclose(mod.B.grad, B.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loss", opd_loss.LOSSES)
def test_chunked_head_loss_and_gradient_equal_the_full_logits_path(loss):
    # uneven token and vocab chunks (tails), top-k ids that fall in several vocab slices
    torch.manual_seed(3)
    n, hidden, vocab, k = 29, 12, 701, 6
    h = torch.randn(n, hidden, requires_grad=True)
    w = torch.randn(vocab, hidden) * 0.4
    ids = torch.rand(n, vocab).argsort(-1)[:, :k]
    t = torch.log_softmax(torch.randn(n, vocab) * 2, -1)
    t_top, t_rest = t.gather(-1, ids), torch.logsumexp(t.scatter(-1, ids, float("-inf")), -1)
    g = torch.randn(n)
    ref = opd_loss.token_divergence(h @ w.T, ids, t_top, t_rest, loss, 0.3)
    (ref * g).sum().backward()
    grad_ref, h.grad = h.grad.clone(), None
    got = opd_loss.chunked_token_divergence(h, w, ids, t_top, t_rest, loss, 0.3, token_chunk=8, vocab_chunk=97)
    (got * g).sum().backward()
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-6)
    assert torch.allclose(h.grad, grad_ref, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="frozen"):
        opd_loss.chunked_token_divergence(h, w.requires_grad_(), ids, t_top, t_rest, loss)


def test_routed_expert_linear_recomputes_the_quantized_weight_and_matches_the_parametrization():
    import lora_experts

    torch.manual_seed(4)
    spec = moe_quant.QuantSpec(bits=3.0, group=32, clip_steps=4)
    shape = (4, 24, 64)
    w = (torch.randn(shape) * 0.05).to(torch.bfloat16).float()
    target = lora_quant.Target("x", "routed_expert", shape, 2, spec)
    s, z, _ = lora_quant.build_scales(w, target)
    mod = lora_quant.QuantLora(target, s, z, rank=3, alpha=6.0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mod.B.normal_(0, 0.05)
    x = torch.randn(5, 64, requires_grad=True)
    full = mod(w)  # every expert, the parametrization's value
    e = 2
    ref = x @ full[e].T
    got = lora_experts._QuantLoraLinear.apply(x, w[e], mod.A[e], mod.B[e], mod.grid.select(e), mod.scaling,
                                              mod.store_dtype)
    assert torch.equal(got, ref)
    r = torch.randn_like(got)
    (ref * r).sum().backward()
    ga, gb, gx = mod.A.grad.clone(), mod.B.grad.clone(), x.grad.clone()
    mod.A.grad = mod.B.grad = x.grad = None
    (got * r).sum().backward()
    assert torch.allclose(mod.A.grad, ga, rtol=1e-5, atol=1e-7) and torch.allclose(mod.B.grad, gb, rtol=1e-5, atol=1e-7)
    assert torch.allclose(x.grad, gx, rtol=1e-5, atol=1e-6)
    assert mod.A.grad[:e].abs().sum() == 0 and mod.A.grad[e].abs().sum() > 0  # only the routed expert learns
