"""Calibrated quantization methods: choose codes + scales on the shared grid (`moe_quant`), given the input
second moment H of each linear.

Every method returns a `moe_quant.QuantResult` on exactly the grid/group a `QuantSpec` names, so a
recipe's effective bits (`footprint.py`) do not change with the method:

* `clip`  - the seed's per-group MSE clip search (`moe_quant.quantize_tensor`); ignores H.
* `rtn`   - absmax round-to-nearest (the same search with one candidate); ignores H.
* `wclip` - the clip search with each weight's squared error weighted by diag(H) of its input
            channel: llama.cpp's imatrix objective.
* `gptq`  - error-compensated rounding in H's metric (`gptq.py`).
* `awq`   - a per-input-channel scale s = rms(x)^alpha, searched over alpha on tr(dW H dW^T); the weight
            is quantized as W*s and the dequantized weight is Q(W*s)/s, so names, shapes and dtypes stay
            the source's.

H is the mean of x x^T over the tokens that reached the weight (fp32): [in, in] for a 2-D weight,
[E, in, in] for a fused 3-D expert tensor, whose experts are processed together (batched Cholesky,
solves and matmuls; no Python loop over experts). An expert that saw no token (H == 0) is quantized as
clip would (identity metric), never NaN. Same inputs on the same device -> the same bytes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

import gptq
import moe_quant
from moe_quant import QuantResult, QuantSpec

METHODS = ("clip", "rtn", "wclip", "gptq", "awq")
NEEDS_HESSIAN = frozenset({"wclip", "gptq", "awq"})
AWQ_INNER = ("clip", "wclip")


@dataclass(frozen=True)
class MethodSpec:
    """Which method picks the codes, and its knobs (defaults are the measured choices)."""

    name: str = "clip"
    damp: float = 0.01  # gptq/wclip: add damp * mean(diag H) to the diagonal
    act_order: bool = False  # gptq: columns by decreasing diag(H); group scales then come from the original W
    block: int = 128  # gptq: lazy-batch block (rounded up to a multiple of the group)
    awq_grid: int = 20  # awq: alpha in {0, 1/n, ..., (n-1)/n}; alpha = 0 is clip itself
    awq_inner: str = "wclip"  # awq: how W*s is quantized: "clip" (plain MSE) or "wclip" (diag(H)/s^2 weighted)
    guard: bool = True  # wclip/gptq: per expert, keep clip's codes where they score better on H (awq has alpha=0)

    def __post_init__(self):
        if self.name not in METHODS:
            raise ValueError(f"unknown method {self.name!r}; known methods: {', '.join(METHODS)}")
        if not (isinstance(self.damp, (int, float)) and math.isfinite(self.damp) and self.damp >= 0):
            raise ValueError(f"damp must be a finite number >= 0, got {self.damp!r}")
        if not isinstance(self.block, int) or self.block <= 0:
            raise ValueError(f"block must be a positive integer, got {self.block!r}")
        if not isinstance(self.awq_grid, int) or self.awq_grid < 1:
            raise ValueError(f"awq_grid must be an integer >= 1, got {self.awq_grid!r}")
        if self.awq_inner not in AWQ_INNER:
            raise ValueError(f"awq_inner must be one of {', '.join(AWQ_INNER)}, got {self.awq_inner!r}")

    @property
    def needs_hessian(self) -> bool:
        return self.name in NEEDS_HESSIAN

    def as_dict(self) -> dict:
        return {"name": self.name, "damp": float(self.damp), "act_order": bool(self.act_order),
                "block": self.block, "awq_grid": self.awq_grid, "awq_inner": self.awq_inner, "guard": bool(self.guard)}


# ----------------------------------------------------------------------------------- layout helpers
def _as_batched(w: torch.Tensor, axis: int) -> tuple[torch.Tensor, int]:
    """2-D [out, in] or 3-D [E, ..] with contraction `axis` -> ([B, R, K] view, normalized axis)."""
    if w.ndim not in (2, 3):
        raise ValueError(f"expected a 2-D linear weight or a 3-D fused expert tensor, got shape {tuple(w.shape)}")
    axis = axis % w.ndim
    if w.ndim == 3 and axis == 0:
        raise ValueError("axis 0 of a 3-D expert tensor is the expert axis, not a contraction axis")
    moved = w.movedim(axis, -1)
    return (moved if w.ndim == 3 else moved.unsqueeze(0)), axis


def _from_batched(t: torch.Tensor, w_ndim: int, axis: int) -> torch.Tensor:
    return (t if w_ndim == 3 else t.squeeze(0)).movedim(-1, axis)


def check_hessian(hessian: torch.Tensor | None, w: torch.Tensor, axis: int, method: str) -> torch.Tensor:
    """The H for `w` as fp32 [B, K, K] on w's device; a clear error for a missing/mis-shaped/non-finite one."""
    if hessian is None:
        raise ValueError(f"method {method!r} needs the input second moment H (hessian=None was given)")
    axis = axis % w.ndim
    k = w.shape[axis]
    want = (k, k) if w.ndim == 2 else (w.shape[0], k, k)
    if tuple(hessian.shape) != want:
        raise ValueError(f"hessian shape {tuple(hessian.shape)} does not match weight {tuple(w.shape)} "
                         f"(contraction axis {axis}): expected {want}")
    h = hessian.to(device=w.device, dtype=torch.float32)
    if not bool(torch.isfinite(h).all()):
        raise ValueError(f"hessian for weight {tuple(w.shape)} holds NaN/Inf")
    return h if w.ndim == 3 else h.unsqueeze(0)


def channel_importance(h: torch.Tensor, damp: float) -> torch.Tensor:
    """[B, K, K] -> [B, K] diag(H) + damp * mean(diag H); uniform (ones) where H is all zero (no tokens),
    so an expert without statistics is quantized exactly as clip quantizes it."""
    d = h.diagonal(dim1=-2, dim2=-1).clamp(min=0.0)
    mean = d.mean(dim=-1, keepdim=True)
    out = d + damp * mean
    return torch.where(mean > 0, out, torch.ones_like(out))


def _check_weight(w: torch.Tensor) -> None:
    if not w.is_floating_point():
        raise ValueError(f"only floating-point tensors can be quantized, got {w.dtype}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"weight of shape {tuple(w.shape)} holds NaN/Inf; it cannot be quantized")


# ----------------------------------------------------------------------------------------- methods
@torch.no_grad()
def quantize_with_method(w: torch.Tensor, spec: QuantSpec, method: MethodSpec, axis: int = -1,
                         hessian: torch.Tensor | None = None, use_kernel: bool = True) -> QuantResult:
    """Quantize `w` (2-D, or 3-D [E, ..] with contraction `axis`) on `spec`'s grid with `method`.

    dequant has w's shape and dtype; codes/scales (/zeros) are in the contraction-axis-last layout of
    `moe_quant.quantize_tensor` (codes moved back to w's layout). use_kernel=False forces the
    device-generic torch code on CPU (what runs on a GPU).
    """
    return quantize_with_baseline(w, spec, method, axis, hessian, use_kernel)[0]


@torch.no_grad()
def quantize_with_baseline(w: torch.Tensor, spec: QuantSpec, method: MethodSpec, axis: int = -1,
                           hessian: torch.Tensor | None = None, use_kernel: bool = True):
    """`quantize_with_method`, plus what its clip guard computed on the way, so a caller that reports the
    result against clip need not quantize with clip and multiply by H again: (result, clip's result,
    (tr(dW H dW^T) per expert [B] of the result, the same of clip's), both fp32) - or (result, None, None)
    when no guard ran (clip, rtn, awq, guard=False)."""
    if not isinstance(method, MethodSpec):
        raise TypeError(f"method must be a MethodSpec, got {type(method).__name__}")
    if spec.is_identity:
        raise ValueError("bits=16 means 'leave untouched': the caller should not quantize this tensor")
    if method.name == "clip":
        return moe_quant.quantize_tensor(w, spec, axis, use_kernel=use_kernel), None, None
    if method.name == "rtn":
        return moe_quant.quantize_tensor(w, replace(spec, clip_steps=0), axis, use_kernel=use_kernel), None, None
    _check_weight(w)
    wb, axis = _as_batched(w, axis)
    h = check_hessian(hessian, w, axis, method.name)
    if method.name == "awq" and spec.k_type is not None:
        raise ValueError(f"awq on grid {spec.grid}: its per-input-channel scale has no slot in a GGUF block, so the "
                         f"file could not hold the measured weights; use gptq or wclip on gguf grids")
    if method.name == "awq":
        return awq(w, spec, method, axis, h, use_kernel), None, None
    if method.name == "wclip":
        imp = channel_importance(h, method.damp)  # [B, K]
        res = moe_quant.quantize_tensor(w, spec, axis, use_kernel=use_kernel,
                                        importance=imp[:, None, :] if w.ndim == 3 else imp[0])
    elif spec.k_type is not None:
        res = _finish_k(w, axis, *gptq.gptq_k_grid(wb, h, spec, damp=method.damp, act_order=method.act_order,
                                                         block=method.block))
    else:
        res = _finish(w, axis, *gptq.gptq_batched(wb, h, spec, damp=method.damp, act_order=method.act_order,
                                                  block=method.block, use_kernel=use_kernel))
    if not method.guard:
        return res, None, None
    clip = moe_quant.quantize_tensor(w, spec, axis, use_kernel=use_kernel)
    mine = batched_proxy(wb, _as_batched(res.dequant, axis)[0], h)
    theirs = batched_proxy(wb, _as_batched(clip.dequant, axis)[0], h)
    kept = keep_better_than_clip(w, axis, h, res, clip, proxies=(mine, theirs))
    return kept, clip, (torch.where(theirs < mine, theirs, mine), theirs)


def keep_better_than_clip(w: torch.Tensor, axis: int, h: torch.Tensor, res: QuantResult, clip: QuantResult,
                          proxies: tuple | None = None) -> QuantResult:
    """Per expert (per tensor for 2-D), clip's codes where they score lower on tr(dW H dW^T).

    diag(H) weighting (wclip) ignores the cross terms of H, so on rare tensors it loses to clip in the
    full metric (1 of 210 SmolLM2 linears at int3); this keeps every method at least as good as the
    seed's on the calibration statistics. Both candidates are on the same grid, so nothing else changes.
    """
    wb, axis = _as_batched(w, axis)
    if proxies is None:
        proxies = (batched_proxy(wb, _as_batched(res.dequant, axis)[0], h),
                   batched_proxy(wb, _as_batched(clip.dequant, axis)[0], h))
    mine, theirs = proxies
    use_clip = theirs < mine  # [B]
    if not bool(use_clip.any()):
        return res
    lead = (lambda t: t if w.ndim == 3 else t.unsqueeze(0))
    unlead = (lambda t: t if w.ndim == 3 else t.squeeze(0))
    pick3 = use_clip[:, None, None]
    deq = torch.where(pick3, _as_batched(clip.dequant, axis)[0], _as_batched(res.dequant, axis)[0])
    codes = torch.where(pick3, _as_batched(clip.codes, axis)[0], _as_batched(res.codes, axis)[0])

    def pick(field: str):  # per-group (per super-block) tensors [*lead, n]: the same expert choice
        a, b = getattr(clip, field), getattr(res, field)
        return None if b is None else unlead(torch.where(pick3, lead(a), lead(b)))
    return QuantResult(_from_batched(deq, w.ndim, axis).contiguous(), _from_batched(codes, w.ndim, axis).contiguous(),
                       pick("scales"), sum_sq_fp64(deq, wb), res.sq_ref, pick("zeros"), None, pick("dmin"),
                       pick("sub_scales"), pick("sub_mins"))


def sum_sq_fp64(a: torch.Tensor, b: torch.Tensor | None = None, rows: int = 4096) -> float:
    """sum((a - b)^2) (or sum(a^2)) in fp64, over blocks of `rows` rows of the last two dims, so no fp64 copy of
    a whole tensor is made (the 122B's lm_head is [248320, 3072]: 6.1 GB per fp64 copy)."""
    total = 0.0
    a3 = a.reshape(-1, a.shape[-2], a.shape[-1]) if a.ndim >= 2 else a.reshape(1, 1, -1)
    b3 = None if b is None else b.reshape(a3.shape)
    for r0 in range(0, a3.shape[1], rows):
        d = a3[:, r0:r0 + rows].double()
        if b3 is not None:
            d = d - b3[:, r0:r0 + rows].double()
        total += float((d * d).sum())
    return total


def _finish(w: torch.Tensor, axis: int, codes, scales, zeros, deq, in_scale=None) -> QuantResult:
    """Batched [B, R, K] results -> a QuantResult in w's layout and dtype (sums in fp64, fixed order)."""
    wb, _ = _as_batched(w, axis)
    sq_err = sum_sq_fp64(deq, wb)
    sq_ref = sum_sq_fp64(wb)
    dequant = _from_batched(deq.to(w.dtype), w.ndim, axis)
    codes = _from_batched(codes, w.ndim, axis)
    lead = (lambda t: t if w.ndim == 3 else t.squeeze(0))
    return QuantResult(dequant.contiguous(), codes.contiguous(), lead(scales), sq_err, sq_ref,
                       None if zeros is None else lead(zeros), None if in_scale is None else lead(in_scale))


def _finish_k(w: torch.Tensor, axis: int, codes, params, deq) -> QuantResult:
    """gptq_k_grid's [B, R, K] result -> a QuantResult in w's layout (the K grid's parts [*lead, n] like scales)."""
    B, R, _ = codes.shape
    unlead = (lambda t: t if w.ndim == 3 else t.squeeze(0))

    def shaped(t, dtype):
        return None if t is None else unlead(t.reshape(B, R, -1).to(dtype))
    res = _finish(w, axis, codes, params.d.reshape(B, R, -1).to(torch.float16), None, deq)
    return res._replace(dmin=shaped(params.dmin, torch.float16), sub_scales=shaped(params.sc, torch.int16),
                        sub_mins=shaped(params.m, torch.int16))


def awq(w: torch.Tensor, spec: QuantSpec, method: MethodSpec, axis: int, h: torch.Tensor,
        use_kernel: bool = True) -> QuantResult:
    """Per-input-channel scale search (AWQ) on tr(dW H dW^T), per expert for a 3-D tensor.

    s = rms(x)^alpha, normalized so sqrt(max * min) = 1; alpha = 0 (s = 1) is clip, so the chosen alpha is
    never worse than clip in H's metric. Ties keep the smaller alpha.
    """
    wb, _ = _as_batched(w, axis)
    b, r, k = wb.shape
    wf = wb.float()
    rms = h.diagonal(dim1=-2, dim2=-1).clamp(min=0.0).sqrt()  # [B, K]
    has_stats = rms.amax(dim=-1, keepdim=True) > 0
    floor = rms.amax(dim=-1, keepdim=True) * 1e-4
    rms = torch.where(has_stats, torch.maximum(rms, floor), torch.ones_like(rms))
    best = None
    for step in range(method.awq_grid):
        alpha = step / method.awq_grid
        s = rms.pow(alpha)
        s = s / (s.amax(dim=-1, keepdim=True) * s.amin(dim=-1, keepdim=True)).sqrt()
        s = s.to(torch.float16).float()  # the stored per-channel scale: what dequant divides by
        scaled = wf * s[:, None, :]
        imp = None
        if method.awq_inner == "wclip":
            imp = channel_importance(h, method.damp) / (s * s)
            imp = imp[:, None, :]
        res = moe_quant.quantize_tensor(scaled, spec, -1, importance=imp, use_kernel=use_kernel)
        deq = res.dequant / s[:, None, :]
        loss = batched_proxy(wf, deq, h)  # [B]
        if best is None:
            best = [loss, res.codes, res.scales, res.zeros, deq, s]
            continue
        better = loss < best[0]
        if bool(better.any()):
            sel3 = better[:, None, None]
            best[0] = torch.where(better, loss, best[0])
            best[1] = torch.where(sel3, res.codes, best[1])
            best[2] = torch.where(sel3, res.scales, best[2])
            if res.zeros is not None:
                best[3] = torch.where(sel3, res.zeros, best[3])
            best[4] = torch.where(sel3, deq, best[4])
            best[5] = torch.where(better[:, None], s, best[5])
    _, codes, scales, zeros, deq, s = best
    return _finish(w, axis, codes, scales, zeros, deq, in_scale=s.to(torch.float16))


# ------------------------------------------------------------------------------------- proxy loss
def batched_proxy(w: torch.Tensor, deq: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """[B, R, K] weights, [B, K, K] H -> [B] tr(dW H dW^T) (in fp32; for searches)."""
    d = deq.float() - w.float()
    return ((d @ h) * d).sum(dim=(1, 2))


def proxy_loss(w: torch.Tensor, dequant: torch.Tensor, hessian: torch.Tensor, axis: int = -1) -> float:
    """tr(dW H dW^T) summed over rows (and experts), in fp64: the mean squared output error on the
    calibration tokens that H summarizes."""
    if tuple(dequant.shape) != tuple(w.shape):
        raise ValueError(f"dequant shape {tuple(dequant.shape)} != weight shape {tuple(w.shape)}")
    wb, axis = _as_batched(w, axis)
    db, _ = _as_batched(dequant, axis)
    h = check_hessian(hessian, w, axis, "proxy_loss").double()
    d = db.double() - wb.double()
    return float(((d @ h) * d).sum())


def proxy_loss_per_expert(w: torch.Tensor, dequant: torch.Tensor, hessian: torch.Tensor, axis: int = -1) -> torch.Tensor:
    """[E] fp64 proxy losses of a 3-D expert tensor (one value for a 2-D weight)."""
    wb, axis = _as_batched(w, axis)
    db, _ = _as_batched(dequant, axis)
    h = check_hessian(hessian, w, axis, "proxy_loss").double()
    d = db.double() - wb.double()
    return ((d @ h) * d).sum(dim=(1, 2))


# ------------------------------------------------------------------------- expert-aware statistics
EXPERT_RULES = ("own", "blend", "pooled")  # what blend_expert_hessians reports per expert
BLEND_RULES = ("threshold", "shrink")


def pooled_hessian(h_expert: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
    """Token-weighted mean of per-expert H [E, K, K] (each a mean over its own tokens) -> [K, K].
    All zero when no expert saw a token."""
    n = n_tokens.to(device=h_expert.device, dtype=torch.float64)
    total = float(n.sum())
    if total <= 0:
        return torch.zeros(h_expert.shape[1:], dtype=h_expert.dtype, device=h_expert.device)
    return (torch.einsum("e,eij->ij", n, h_expert.double()) / total).to(h_expert.dtype)


def blend_expert_hessians(h_expert: torch.Tensor, n_tokens, h_pooled: torch.Tensor | None = None,
                          min_tokens: int = 256, rule: str = "threshold") -> tuple[torch.Tensor, list[str]]:
    """Shrink starved experts' statistics toward the layer's pooled ones.

    rule "threshold": an expert with n >= min_tokens keeps its own H ("own"); one with 0 < n < min_tokens
    gets (n * H_e + (min_tokens - n) * H_pooled) / min_tokens ("blend": the pooled statistics fill up to
    min_tokens tokens); one with n = 0 gets H_pooled ("pooled").
    rule "shrink": every expert gets (n * H_e + min_tokens * H_pooled) / (n + min_tokens) (the pooled
    statistics always count as min_tokens prior tokens; "blend", or "pooled" at n = 0).
    `h_pooled` defaults to the token-weighted mean of the experts' own H (`pooled_hessian`); for a gate/up
    projection the layer's MoE-block input statistics are the natural choice. min_tokens = 0 keeps every
    expert's own H. Returns (H [E, K, K], rule applied per expert).
    """
    if h_expert.ndim != 3 or h_expert.shape[1] != h_expert.shape[2]:
        raise ValueError(f"h_expert must be [E, K, K], got {tuple(h_expert.shape)}")
    if rule not in BLEND_RULES:
        raise ValueError(f"unknown blend rule {rule!r}; known: {', '.join(BLEND_RULES)}")
    n = torch.as_tensor(n_tokens, dtype=torch.float64).reshape(-1)
    if n.numel() != h_expert.shape[0]:
        raise ValueError(f"n_tokens has {n.numel()} entries for {h_expert.shape[0]} experts")
    if bool((n < 0).any()):
        raise ValueError("n_tokens must be >= 0")
    if not isinstance(min_tokens, int) or min_tokens < 0:
        raise ValueError(f"min_tokens must be an integer >= 0, got {min_tokens!r}")
    if h_pooled is None:
        h_pooled = pooled_hessian(h_expert, n)
    if tuple(h_pooled.shape) != tuple(h_expert.shape[1:]):
        raise ValueError(f"h_pooled shape {tuple(h_pooled.shape)} != expert H shape {tuple(h_expert.shape[1:])}")
    if min_tokens == 0:
        return h_expert.clone(), ["own"] * h_expert.shape[0]
    if rule == "threshold":
        own_w = (n / min_tokens).clamp(max=1.0)
        rules = ["own" if c >= min_tokens else ("pooled" if c == 0 else "blend") for c in n.tolist()]
    else:
        own_w = n / (n + min_tokens)
        rules = ["pooled" if c == 0 else "blend" for c in n.tolist()]
    own_w = own_w.to(device=h_expert.device, dtype=h_expert.dtype)
    hp = h_pooled.to(device=h_expert.device, dtype=h_expert.dtype)
    out = h_expert * own_w[:, None, None] + hp[None] * (1 - own_w)[:, None, None]
    return out, rules
