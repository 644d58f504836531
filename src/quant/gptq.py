"""GPTQ on the shared grid, batched over the experts of a fused tensor: error-compensated rounding in H's metric.

Columns (input channels) are quantized one at a time; the rounding error of column j, divided by the
j-th diagonal of U = chol(H^-1) (upper), is pushed onto the columns not yet quantized along U's row j,
so their later rounding compensates it (Frantar et al., 2022). Work is done in blocks of columns: inside
a block every update is applied at once, to the columns beyond it as one matmul at the block's end
("lazy batch"), which is the same arithmetic reordered.

Groups are static: group k is always columns [k*g, (k+1)*g), so codes + scales pack exactly like clip's.
Without act-order a group's scale (and zero-point) is chosen when its first column is reached, by the
grid's clip search on the group's current (error-updated) values weighted by diag(H). With act-order the
columns go by decreasing diag(H) and every group's scale is fixed beforehand by the same weighted search
on the original weights (a group's columns are then scattered through the order).

Everything runs on [B, R, K] (B experts, R output rows, K inputs) with batched Cholesky and matmuls, on
whatever device the weight is on. Damping adds damp * mean(diag H) to the diagonal; an input channel no
token reached (H_jj = 0) gets the mean diagonal so it couples to nothing; an expert that saw no token at
all (H = 0) uses the identity, which makes GPTQ exactly the grid's plain clip search. A Cholesky that
still fails gets 10x more damping, up to 4 times, then an error naming the expert.
"""
from __future__ import annotations

import math

import torch

import moe_quant
from moe_quant import QuantSpec

DAMP_RETRIES = 4


def prepare_hessian(h: torch.Tensor, damp: float, dtype: torch.dtype) -> torch.Tensor:
    """[B, K, K] -> damped, fully usable H in `dtype` (zero-token experts -> identity; dead channels -> mean)."""
    H = h.to(dtype).clone()
    b, k, _ = H.shape
    diag = H.diagonal(dim1=-2, dim2=-1)
    mean = diag.clamp(min=0).mean(dim=-1)  # [B]
    empty = mean <= 0
    if bool(empty.any()):
        H[empty] = torch.eye(k, dtype=dtype, device=H.device)
        mean = torch.where(empty, torch.ones_like(mean), mean)
        diag = H.diagonal(dim1=-2, dim2=-1)
    dead = diag <= 0
    if bool(dead.any()):
        diag.copy_(torch.where(dead, mean[:, None].expand_as(diag), diag))
    diag.add_(damp * mean[:, None])
    return H


def upper_inverse_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """U, upper triangular, with U^T U = H^-1, batched; experts whose factorization fails get more damping.

    One Cholesky and one triangular solve: with J the reversal permutation and J H J = L L^T, H = V V^T for
    the upper V = J L J, so H^-1 = V^-T V^-1 and U = V^-1 = J L^-1 J. (cholesky_inverse + a second
    Cholesky costs ~8x more on CPU.)
    """
    k = H.shape[-1]
    mean = H.diagonal(dim1=-2, dim2=-1).mean(dim=-1)
    eye = torch.eye(k, dtype=H.dtype, device=H.device)
    extra = max(damp, 1e-4)
    for attempt in range(DAMP_RETRIES + 1):
        L, info = torch.linalg.cholesky_ex(H.flip(-2, -1))  # J H J (a flip copies; fancy indexing is 4x slower)
        bad = info != 0
        if not bool(bad.any()):
            U = _lower_inverse(L, eye).flip(-2, -1)
            if bool(torch.isfinite(U).all()):
                return U
            bad = ~torch.isfinite(U).flatten(1).all(dim=1)
        if attempt == DAMP_RETRIES:
            raise ValueError(f"GPTQ: H is not positive definite for expert(s) {torch.nonzero(bad).flatten().tolist()[:8]} "
                             f"even with extra damping; check the calibration statistics")
        extra *= 10
        H = torch.where(bad[:, None, None], H + (extra * mean)[:, None, None] * eye, H)
    raise AssertionError("unreachable")


def _lower_inverse(L: torch.Tensor, eye: torch.Tensor, cols: int = 512) -> torch.Tensor:
    """L^-1 for lower-triangular [B, K, K] L, `cols` columns at a time: the columns c0.. of L^-1 are zero above
    row c0, so each block solves only L[c0:, c0:] (K^3/3 flops in all instead of the K^3 of one solve against
    the whole identity; 1.8x faster at K = 3072 on CPU; the same fp32 bits as the one solve at K = 64..3072 here)."""
    k = L.shape[-1]
    out = torch.zeros_like(L)
    for c0 in range(0, k, cols):
        c1 = min(k, c0 + cols)
        out[:, c0:, c0:c1] = torch.linalg.solve_triangular(L[:, c0:, c0:], eye[c0:, c0:c1].expand(L.shape[0], -1, -1),
                                                          upper=False)
    return out


def _search(values: torch.Tensor, importance: torch.Tensor, spec: QuantSpec, use_kernel: bool = True):
    """Weighted grid search on [N, w] fp32 groups -> (scale [N], zero [N] or None), both fp32."""
    return moe_quant.search_groups(values, spec, importance, use_kernel)


@torch.no_grad()
def gptq_batched(w: torch.Tensor, h: torch.Tensor, spec: QuantSpec, damp: float = 0.01, act_order: bool = False,
                 block: int = 128, use_kernel: bool = True):
    """GPTQ for [B, R, K] weights under [B, K, K] fp32 H.

    On CPU (with numba, unless use_kernel=False) the row-parallel kernel runs the same column loop without
    lazy batches; elsewhere the batched torch loop below. Returns (codes int8 [B, R, K], scales fp16 [B, R, n_groups], zeros int8 [B, R, n_groups] or None,
    dequant [B, R, K] in the compute dtype: fp64 for fp64 weights, else fp32).
    """
    B, R, K = w.shape
    g = spec.group
    n_groups = -(-K // g)
    cd = torch.float64 if w.dtype == torch.float64 else torch.float32
    dev = w.device
    W = w.to(cd).clone()
    H = prepare_hessian(h, damp, cd)
    imp = H.diagonal(dim1=-2, dim2=-1).clone()  # [B, K]: the group searches' weights (damped diag)
    asym = spec.grid == "asym"

    perm = None
    if act_order:
        # static groups: every scale from the original weights, chosen before any column moves
        pre = moe_quant.quantize_tensor(W.float(), spec, -1, importance=imp.float()[:, None, :], return_codes=False,
                                        use_kernel=use_kernel)
        group_scale = pre.scales.to(cd)
        group_zero = pre.zeros.to(cd) if asym else None
        perm = torch.argsort(-imp, dim=-1, stable=True)  # [B, K]
        W = W.gather(-1, perm[:, None, :].expand(B, R, K))
        H = H.gather(-1, perm[:, None, :].expand(B, K, K)).gather(-2, perm[:, :, None].expand(B, K, K))
        gidx = (perm // g)[:, None, :].expand(B, R, K)
        pos_scale = group_scale.gather(-1, gidx)  # [B, R, K]: the scale each permuted column uses
        pos_zero = group_zero.gather(-1, gidx) if asym else None
    else:
        group_scale = torch.zeros((B, R, n_groups), dtype=cd, device=dev)
        group_zero = torch.zeros((B, R, n_groups), dtype=cd, device=dev) if asym else None

    U = upper_inverse_cholesky(H, damp)
    del H
    kernels = moe_quant._numba_kernels() if (use_kernel and dev.type == "cpu") else None
    if kernels is not None:
        codes, deq = _gptq_cpu_kernel(kernels, W, U, imp, spec, group_scale, group_zero,
                                      pos_scale if act_order else None, pos_zero if act_order else None)
        return _unpermute_and_pack(codes, deq, perm, group_scale, group_zero, spec)
    codes = torch.empty((B, R, K), dtype=cd, device=dev)
    deq = torch.empty((B, R, K), dtype=cd, device=dev)
    lo, hi = spec.code_range
    bs = g * max(1, math.ceil(block / g))  # blocks hold whole groups: a group is entered at its block's start
    S = Z = None
    for j0 in range(0, K, bs):
        j1 = min(K, j0 + bs)
        n = j1 - j0
        Wb = W[..., j0:j1].clone()
        Ub = U[:, j0:j1, j0:j1]
        Err = torch.empty((B, R, n), dtype=cd, device=dev)
        diag_u = Ub.diagonal(dim1=-2, dim2=-1)  # [B, n]
        for i in range(n):
            col = j0 + i
            if act_order:
                S = pos_scale[..., col]
                Z = pos_zero[..., col] if asym else None
            elif col % g == 0:
                width = min(g, K - col)
                vals = Wb[..., i:i + width].reshape(B * R, width)
                wts = imp[:, None, col:col + width].expand(B, R, width).reshape(B * R, width)
                s, z = _search(vals, wts, spec, use_kernel)
                S = s.to(cd).view(B, R)
                group_scale[..., col // g] = S
                if asym:
                    Z = z.to(cd).view(B, R)
                    group_zero[..., col // g] = Z
            x = Wb[..., i]
            nonzero = S != 0
            q = torch.round(x / torch.where(nonzero, S, torch.ones_like(S)))
            if asym:
                q = torch.where(nonzero, (q + Z).clamp_(lo, hi), Z)
                dq = (q - Z) * S
            else:
                q = torch.where(nonzero, q.clamp_(lo, hi), torch.zeros_like(q))
                dq = q * S
            codes[..., col] = q
            deq[..., col] = dq
            e = (x - dq) / diag_u[:, None, i]
            Err[..., i] = e
            if i + 1 < n:
                Wb[..., i + 1:] -= e[..., None] * Ub[:, None, i, i + 1:]
        if j1 < K:
            W[..., j1:] -= Err @ U[:, j0:j1, j1:]

    return _unpermute_and_pack(codes, deq, perm, group_scale, group_zero, spec)


def _unpermute_and_pack(codes, deq, perm, group_scale, group_zero, spec: QuantSpec):
    if perm is not None:
        inv = torch.argsort(perm, dim=-1)[:, None, :].expand(codes.shape)
        codes = codes.gather(-1, inv)
        deq = deq.gather(-1, inv)
    zeros8 = group_zero.to(torch.int8) if group_zero is not None else None
    return codes.to(torch.int8), group_scale.to(moe_quant.scale_dtype(spec)), zeros8, deq


def _gptq_cpu_kernel(kernels, W, U, imp, spec: QuantSpec, group_scale, group_zero, pos_scale, pos_zero):
    """The numba row-parallel kernel (quant_kernels_cpu.gptq_rows_kernel): same method, no per-column
    Python overhead. Fills group_scale/group_zero [B, R, n_groups] in place unless the scales are static."""
    import numpy as np

    B, R, K = W.shape
    cd = W.dtype
    lo, hi = spec.code_range
    grid = {"sym": kernels.GRID_SYM, "full": kernels.GRID_FULL, "asym": kernels.GRID_ASYM}[spec.grid]
    w_rows = W.reshape(B * R, K).contiguous()
    codes = torch.empty((B * R, K), dtype=torch.int8)
    deq = torch.empty((B * R, K), dtype=cd)
    n_groups = group_scale.shape[-1]
    gs = torch.zeros((B * R, n_groups), dtype=torch.float32)
    gz = torch.zeros((B * R, n_groups), dtype=torch.float32)
    static = pos_scale is not None
    dummy = torch.zeros((1, 1), dtype=cd)
    ps = pos_scale.reshape(B * R, K).contiguous() if static else dummy
    pz = (pos_zero.reshape(B * R, K).contiguous() if pos_zero is not None else torch.zeros_like(ps)) if static else dummy
    kernels.gptq_rows_kernel(w_rows.numpy(), U.contiguous().numpy(), R, imp.float().contiguous().numpy(), spec.group,
                             static, ps.numpy(), pz.numpy(), moe_quant.clip_ratios(spec).numpy(), grid, lo, hi,
                             codes.numpy(), deq.numpy(), gs.numpy(), gz.numpy())
    if not static:
        group_scale.copy_(gs.view(B, R, n_groups))
        if group_zero is not None:
            group_zero.copy_(gz.view(B, R, n_groups))
    return codes.view(B, R, K).to(cd), deq.view(B, R, K)


@torch.no_grad()
def gptq_k_grid(w: torch.Tensor, h: torch.Tensor, spec: QuantSpec, damp: float = 0.01, act_order: bool = False,
                block: int = 128):
    """GPTQ onto a gguf:Q*_K grid for [B, R, K] weights under [B, K, K] H.

    The two-level scales are fixed first, by the type's weighted search (gguf_grids.search) on the original
    weights with the damped diag(H) as importance; then the columns are rounded one by one onto that fixed grid
    (each value's (d * sc, dmin * m)) with GPTQ's error feedback, in blocks of `block` columns (lazy batch), in
    decreasing diag(H) order with act_order. Returns (codes int8 [B, R, K], gguf_grids.KParams over the flat
    super-blocks, dequant fp32 [B, R, K] recomputed from the codes in gguf-py's arithmetic).
    """
    import gguf_grids

    kt = spec.k_type
    B, R, K = w.shape
    if K % gguf_grids.QK_K:
        raise ValueError(f"rows of {K} weights are not a multiple of the {kt.name} super-block {gguf_grids.QK_K}")
    cd = torch.float64 if w.dtype == torch.float64 else torch.float32
    W = w.to(cd).clone()
    H = prepare_hessian(h, damp, cd)
    imp = H.diagonal(dim1=-2, dim2=-1).clone()  # [B, K]
    x = W.float().reshape(-1, gguf_grids.QK_K)
    wts = imp.float()[:, None, :].expand(B, R, K).reshape(-1, gguf_grids.QK_K)
    params = gguf_grids.search(x, kt, moe_quant.clip_ratios(spec).to(w.device), wts)
    scale, off = gguf_grids.per_value(params, kt)
    S = scale.reshape(B, R, K).to(cd)
    M = off.reshape(B, R, K).to(cd) if off is not None else None
    perm = None
    if act_order:
        perm = torch.argsort(-imp, dim=-1, stable=True)
        idx = perm[:, None, :].expand(B, R, K)
        W, S = W.gather(-1, idx), S.gather(-1, idx)
        M = M.gather(-1, idx) if M is not None else None
        H = H.gather(-1, perm[:, None, :].expand(B, K, K)).gather(-2, perm[:, :, None].expand(B, K, K))
    U = upper_inverse_cholesky(H, damp)
    del H
    codes = torch.empty((B, R, K), dtype=cd, device=w.device)
    for j0 in range(0, K, block):
        j1 = min(K, j0 + block)
        n = j1 - j0
        Wb = W[..., j0:j1].clone()
        Ub = U[:, j0:j1, j0:j1]
        Err = torch.empty((B, R, n), dtype=cd, device=w.device)
        diag_u = Ub.diagonal(dim1=-2, dim2=-1)
        for i in range(n):
            col = j0 + i
            xcol = Wb[..., i]
            s, o = S[..., col], (M[..., col] if M is not None else None)
            q = gguf_grids.assign_codes(xcol, s, o, kt)
            codes[..., col] = q
            e = (xcol - gguf_grids.dequant(q, s, o)) / diag_u[:, None, i]
            Err[..., i] = e
            if i + 1 < n:
                Wb[..., i + 1:] -= e[..., None] * Ub[:, None, i, i + 1:]
        if j1 < K:
            W[..., j1:] -= Err @ U[:, j0:j1, j1:]
    if perm is not None:
        codes = codes.gather(-1, torch.argsort(perm, dim=-1)[:, None, :].expand(B, R, K))
    codes = codes.float()
    deq = gguf_grids.decode(codes.reshape(-1, gguf_grids.QK_K), params, kt).reshape(B, R, K)
    return codes.to(torch.int8), params, deq
