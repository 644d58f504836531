"""llama.cpp's two-level K-quant grids (Q3_K, Q4_K, Q5_K, Q6_K) as pure math on tensors: fix the scales by a weighted
search on the type's own rules, assign codes under fixed scales, decode in gguf-py's arithmetic order.

A K-quant super-block holds 256 weights of one row, cut into sub-blocks (Q4_K: 8 of 32; Q3_K, Q6_K: 16 of 16):

* Q4_K: fp16 d and dmin, per sub-block a 6-bit scale sc and a 6-bit min m (0..63), codes q in 0..15;
        w = (d * sc) * q - (dmin * m);   Q5_K: the same with codes in 0..31;
* Q3_K: fp16 d, per sub-block a 6-bit signed scale sc in -32..31, codes q in -4..3;  w = (d * sc) * q;
* Q6_K: fp16 d, per sub-block an int8 scale sc in -128..127, codes q in -32..31;   w = (d * sc) * q.

Every product is fp32 in exactly that order (gguf-py's `dequantize_blocks`), so the store's decode and gguf-py's
dequantization of the written blocks agree bit for bit. The search, per super-block, all rows at once:

1. each sub-block gets its best real scale (and offset for Q4_K) from the clip-ratio candidates of the spec,
   scored by the importance-weighted squared error (importance = diag(H) for the calibrated methods, uniform
   for clip/rtn); the symmetric types put the sub-block's extreme value on the long negative side (-4, -32),
   as the `full` grid does;
2. the super-block scale d (and dmin) is the largest sub-block scale (offset) over the sub-scale range, tried
   at a few shrink factors (SUPER_STEPS), each rounded to fp16; the integer sub-scales are then rounded, the
   codes assigned, and the candidate with the lowest weighted error of the whole super-block kept (ties: the
   earlier, i.e. the unshrunk one).

Rows must be a multiple of 256 (the build plan falls back to a legacy 32-block type otherwise: `K_FALLBACK`).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from quant_result import QuantResult, fixed_order_total, lane_sum
from quant_spec import K_FALLBACK, K_TYPES, QK_K, KType  # noqa: F401  (the types' table lives with QuantSpec)

SUPER_STEPS = (1.0, 0.96, 0.92, 0.88, 0.84)


class KParams(NamedTuple):
    """Fixed scales of S super-blocks: d [S] (fp16 values in fp32), sc [S, n_sub] (int, fp32), dmin, m (Q4_K)."""

    d: torch.Tensor
    sc: torch.Tensor
    dmin: torch.Tensor | None = None
    m: torch.Tensor | None = None


def _sum_rows(v: torch.Tensor) -> torch.Tensor:
    """Sum over the last axis in one fixed order (quant_result.lane_sum), any leading shape."""
    return lane_sum(v.reshape(-1, v.shape[-1])).reshape(v.shape[:-1])


def effective(p: KParams) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per sub-block (d * sc, dmin * m) in fp32, gguf-py's products: [S, n_sub] each."""
    scale = p.d[:, None] * p.sc
    off = None if p.m is None else p.dmin[:, None] * p.m
    return scale, off


def assign_codes(x: torch.Tensor, scale: torch.Tensor, off: torch.Tensor | None, kt: KType) -> torch.Tensor:
    """Nearest codes (fp32, in [lo, hi]) for values x under per-value scales (and offsets), same shape;
    a zero scale gives code 0 (Q4_K: the value is then -offset whatever the code)."""
    nonzero = scale != 0
    safe = torch.where(nonzero, scale, torch.ones_like(scale))
    num = x if off is None else x + off
    q = torch.round(num / safe).clamp_(kt.lo, kt.hi) + 0.0  # + 0.0: a rounded -0 is the stored integer 0
    return torch.where(nonzero, q, torch.zeros_like(q))


def dequant(q: torch.Tensor, scale: torch.Tensor, off: torch.Tensor | None) -> torch.Tensor:
    """(d * sc) * q [- dmin * m]: the arithmetic of gguf-py and llama.cpp's reference dequantizer."""
    out = scale * q
    return out if off is None else out - off


def _sub_candidates(xs: torch.Tensor, kt: KType, ratios: torch.Tensor):
    """[S, n_sub, sub] -> candidate (scale, offset or None), each [S, n_sub, C], real-valued."""
    if kt.has_min:
        xmin = xs.amin(dim=-1).clamp(max=0.0)
        xmax = xs.amax(dim=-1).clamp(min=xmin)
        span = (xmax - xmin)[..., None] * ratios
        return span / float(kt.hi - kt.lo), -xmin[..., None] * ratios
    absmax = xs.abs().amax(dim=-1)
    vmax = xs.amax(dim=-1)
    sign = torch.where((vmax >= absmax) & (vmax > 0), -1.0, 1.0)
    mags = [absmax[..., None] * ratios / float(-kt.lo)]
    if ratios.numel() > 1:
        mags.append(absmax[..., None] * ratios / float(kt.hi))
    return sign[..., None] * torch.cat(mags, dim=-1), None


def _weighted_err(x, imp, q, scale, off):
    d = dequant(q, scale, off) - x
    e = d * d
    return _sum_rows(e if imp is None else e * imp)


def _refit(xs, imp, s, o, err, kt: KType):
    """One weighted least-squares refit of each sub-block's real scale (and Q4_K offset) to the codes its best
    candidate gave, kept where it lowers the weighted error (llama.cpp's make_q*_quants refit the same way)."""
    x = xs
    w = torch.ones_like(x) if imp is None else imp
    q = assign_codes(x, s[..., None].expand_as(x), None if o is None else o[..., None].expand_as(x), kt)
    a, d = _sum_rows(w * q * q), _sum_rows(w * q * x)
    if o is None:
        ok = a > 0
        s2 = torch.where(ok, d / torch.where(ok, a, torch.ones_like(a)), s)
        o2 = None
    else:
        b, c, e = _sum_rows(w * q), _sum_rows(w), _sum_rows(w * x)
        det = a * c - b * b
        ok = det > 0
        safe = torch.where(ok, det, torch.ones_like(det))
        s2 = (c * d - b * e) / safe
        o2 = (b * d - a * e) / safe
        ok = ok & (s2 > 0) & (o2 >= 0)
        s2, o2 = torch.where(ok, s2, s), torch.where(ok, o2, o)
    q2 = assign_codes(x, s2[..., None].expand_as(x), None if o2 is None else o2[..., None].expand_as(x), kt)
    err2 = _weighted_err(x, imp, q2, s2[..., None], None if o2 is None else o2[..., None])
    better = ok & (err2 < err)
    return torch.where(better, s2, s), (None if o is None else torch.where(better, o2, o))


def search(x: torch.Tensor, kt: KType, ratios: torch.Tensor, importance: torch.Tensor | None = None) -> KParams:
    """[S, 256] fp32 super-blocks (optional [S, 256] importance >= 0) -> the fixed scales (module docstring)."""
    S = x.shape[0]
    xs = x.reshape(S, kt.n_sub, kt.sub)
    imp = None if importance is None else importance.reshape(S, kt.n_sub, kt.sub)
    cs, co = _sub_candidates(xs, kt, ratios)
    best_err = best_s = best_o = None
    for c in range(cs.shape[-1]):  # C ~ 16-32 candidates; everything inside is [S, n_sub, sub]
        s = cs[..., c:c + 1]
        o = None if co is None else co[..., c:c + 1]
        err = _weighted_err(xs, imp, assign_codes(xs, s.expand_as(xs), None if o is None else o.expand_as(xs), kt), s, o)
        if best_err is None:
            best_err, best_s, best_o = err, s[..., 0], None if o is None else o[..., 0]
            continue
        better = err <= best_err  # ties: the later (larger) ratio, as the flat grids' search
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s[..., 0], best_s)
        if o is not None:
            best_o = torch.where(better, o[..., 0], best_o)
    best_s, best_o = _refit(xs, imp, best_s, best_o, best_err, kt)
    smax = best_s.abs().amax(dim=-1)  # [S]
    sc_top = float(kt.sc_hi)
    omax = None if best_o is None else best_o.amax(dim=-1)
    best = None
    for f in SUPER_STEPS:
        d = (smax * f / sc_top).to(torch.float16).to(torch.float32)
        sc = torch.round(best_s / torch.where(d > 0, d, torch.ones_like(d))[:, None]).clamp_(kt.sc_lo, kt.sc_hi)
        sc = torch.where(d[:, None] > 0, sc + 0.0, torch.zeros_like(sc))  # + 0.0: the stored integer 0, never -0
        dmin = m = None
        if omax is not None:
            dmin = (omax * f / sc_top).to(torch.float16).to(torch.float32)
            m = torch.round(best_o / torch.where(dmin > 0, dmin, torch.ones_like(dmin))[:, None]).clamp_(0, kt.sc_hi)
            m = torch.where(dmin[:, None] > 0, m + 0.0, torch.zeros_like(m))
        p = KParams(d, sc, dmin, m)
        scale, off = effective(p)
        q = assign_codes(xs, scale[..., None].expand_as(xs), None if off is None else off[..., None].expand_as(xs), kt)
        err = _sum_rows(_weighted_err(xs, imp, q, scale[..., None], None if off is None else off[..., None]))
        if best is None:
            best = [err, p]
            continue
        better = err < best[0]
        best[0] = torch.where(better, err, best[0])
        old = best[1]
        best[1] = KParams(torch.where(better, d, old.d), torch.where(better[:, None], sc, old.sc),
                          None if dmin is None else torch.where(better, dmin, old.dmin),
                          None if m is None else torch.where(better[:, None], m, old.m))
    return best[1]


def per_value(p: KParams, kt: KType) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The effective scale (and offset) of every value: [S, 256] each."""
    scale, off = effective(p)
    rep = (lambda t: t.repeat_interleave(kt.sub, dim=-1))
    return rep(scale), None if off is None else rep(off)


def quantize_blocks(x: torch.Tensor, kt: KType, ratios: torch.Tensor, importance: torch.Tensor | None = None):
    """[S, 256] -> (codes fp32 [S, 256], KParams, dequant fp32 [S, 256]): search, then nearest codes."""
    p = search(x, kt, ratios, importance)
    scale, off = per_value(p, kt)
    q = assign_codes(x, scale, off, kt)
    return q, p, dequant(q, scale, off)


def decode(q: torch.Tensor, p: KParams, kt: KType) -> torch.Tensor:
    """codes [S, 256] + scales -> fp32 values, gguf-py's arithmetic."""
    scale, off = per_value(p, kt)
    return dequant(q.float(), scale, off)


@torch.no_grad()
def quantize_tensor(w: torch.Tensor, spec, axis: int, ratios: torch.Tensor, return_codes: bool = True,
                    importance: torch.Tensor | None = None):
    """moe_quant.quantize_tensor for a gguf:Q*_K spec: super-blocks of 256 along `axis`, rows in chunks of about
    `spec.chunk_groups` super-blocks (bounded fp32 temporaries), every row of a chunk at once."""
    kt = spec.k_type
    axis = axis % w.ndim
    moved = w.movedim(axis, -1)
    lead, k = tuple(moved.shape[:-1]), moved.shape[-1]
    if k % QK_K:
        raise ValueError(f"rows of {k} weights are not a multiple of the {kt.name} super-block {QK_K} (the build "
                         f"plan stores such a tensor as {K_FALLBACK[kt.name]})")
    rows = moved.reshape(-1, k)
    n_rows, nsb = rows.shape[0], k // QK_K
    imp_rows = None
    if importance is not None:
        try:
            imp_rows = importance.to(device=w.device, dtype=torch.float32).expand(moved.shape).reshape(-1, k)
        except RuntimeError:
            raise ValueError(f"importance of shape {tuple(importance.shape)} does not broadcast to the "
                             f"contraction-axis-last weight {tuple(moved.shape)}") from None
    out = torch.empty((n_rows, k), dtype=w.dtype, device=w.device)
    codes = torch.empty((n_rows, k), dtype=torch.int8, device=w.device) if return_codes else None
    d = torch.empty((n_rows, nsb), dtype=torch.float16, device=w.device)
    sc = torch.empty((n_rows, nsb * kt.n_sub), dtype=torch.int16, device=w.device)
    dmin = torch.empty_like(d) if kt.has_min else None
    m = torch.empty_like(sc) if kt.has_min else None
    step = max(1, spec.chunk_groups // nsb)
    sq_err = sq_ref = 0.0
    for r0 in range(0, n_rows, step):
        r1 = min(n_rows, r0 + step)
        x = rows[r0:r1].float().reshape(-1, QK_K)
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"rows {r0}..{r1} hold non-finite weights; this tensor cannot be quantized")
        imp = None if imp_rows is None else imp_rows[r0:r1].reshape(-1, QK_K)
        q, p, deq = quantize_blocks(x, kt, ratios, imp)
        if not bool(torch.isfinite(p.d).all()) or (p.dmin is not None and not bool(torch.isfinite(p.dmin).all())):
            raise ValueError(f"rows {r0}..{r1}: a super-block scale exceeds fp16's range; this tensor cannot be "
                             f"stored as {kt.name}")
        diff = deq - x
        sq_err += fixed_order_total(lane_sum(diff * diff))
        sq_ref += fixed_order_total(lane_sum(x * x))
        out[r0:r1] = deq.reshape(r1 - r0, k)
        if codes is not None:
            codes[r0:r1] = q.reshape(r1 - r0, k).to(torch.int8)
        d[r0:r1] = p.d.reshape(r1 - r0, nsb).to(torch.float16)
        sc[r0:r1] = p.sc.reshape(r1 - r0, -1).to(torch.int16)
        if kt.has_min:
            dmin[r0:r1] = p.dmin.reshape(r1 - r0, nsb).to(torch.float16)
            m[r0:r1] = p.m.reshape(r1 - r0, -1).to(torch.int16)

    def restore(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(*lead, k).movedim(-1, axis)

    def lead_shape(t):
        return None if t is None else t.reshape(*lead, t.shape[-1])

    return QuantResult(restore(out), restore(codes) if codes is not None else torch.empty(0, dtype=torch.int8),
                                 lead_shape(d), sq_err, sq_ref, None, None, lead_shape(dmin), lead_shape(sc),
                                 lead_shape(m))


def params_of(scales: torch.Tensor, sub_scales: torch.Tensor, dmin: torch.Tensor | None, sub_mins: torch.Tensor | None,
              kt: KType) -> KParams:
    """Stored parts (any leading shape) -> KParams over the flat super-blocks, in the search's fp32 form."""
    return KParams(scales.float().reshape(-1), sub_scales.float().reshape(-1, kt.n_sub),
                   None if dmin is None else dmin.float().reshape(-1),
                   None if sub_mins is None else sub_mins.float().reshape(-1, kt.n_sub))
