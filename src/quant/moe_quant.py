"""Group-wise symmetric fake-quantization: the math, as pure functions on tensors.

Every function takes a `QuantSpec` (bits, group, clip search) and returns new tensors; nothing here
reads files or keeps state. The builder (`quant_save.py`) and training (STE) call the same code, so
what is evaluated is exactly what would be packed:

* groups of `spec.group` values run along the contraction (input) axis; when that axis is not a
  multiple of the group, the tail group gets its own scale (zero padding changes neither the absmax
  nor the error, so this is exact, never a per-row fallback);
* symmetric codes in [-qmax, qmax] with qmax = 2^(bits-1) - 1, i.e. at most 2^bits - 1 levels;
* the scale is rounded to its stored dtype (fp16) *before* it is used, so fake-quant == packed (up to
  the one rounding of code*scale to the checkpoint's dtype, bf16: < 2^-8 relative, levels unchanged);
* the scale is chosen per group by an MSE search over clip ratios in [clip_lo, 1.0] (1.0 = absmax is
  always a candidate, so the search can never be worse than absmax); ties go to the larger ratio.

The search is the hot loop (16 candidates x every weight). On CPU it runs in a numba kernel
(parallel over groups); elsewhere, or without numba, a chunked torch loop computes the same thing.
"""
from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch

SUPPORTED_BITS = (1.58, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 16.0)
TERNARY_BITS = 1.58


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized. bits=16 means: leave it untouched."""

    bits: float
    group: int = 128
    clip_steps: int = 16
    clip_lo: float = 0.65
    scale_dtype: torch.dtype = torch.float16
    chunk_groups: int = 1 << 15  # groups per work chunk: bounds the fp32 temporaries (~40 MiB at g128)

    def __post_init__(self):
        bits = float(self.bits)
        if not any(math.isclose(bits, b) for b in SUPPORTED_BITS):
            raise ValueError(f"bits must be one of {list(SUPPORTED_BITS)}, got {self.bits}")
        if not isinstance(self.group, int) or self.group <= 0:
            raise ValueError(f"group must be a positive integer, got {self.group!r}")
        if not isinstance(self.clip_steps, int) or self.clip_steps < 0:
            raise ValueError(f"clip_steps must be an integer >= 0 (0 = absmax), got {self.clip_steps!r}")
        if not 0.0 < self.clip_lo <= 1.0:
            raise ValueError(f"clip_lo must be in (0, 1], got {self.clip_lo}")
        if self.chunk_groups <= 0:
            raise ValueError(f"chunk_groups must be > 0, got {self.chunk_groups}")

    @property
    def is_identity(self) -> bool:
        return float(self.bits) >= 16.0

    @property
    def qmax(self) -> int:
        return qmax_for_bits(self.bits)

    @property
    def stored_bits_per_weight(self) -> float:
        """Bits a packer spends per weight, scale overhead included (what the footprint counts)."""
        if self.is_identity:
            return 16.0
        code_bits = math.log2(3) if math.isclose(float(self.bits), TERNARY_BITS) else float(self.bits)
        scale_bits = torch.finfo(self.scale_dtype).bits
        return code_bits + scale_bits / self.group


class QuantResult(NamedTuple):
    dequant: torch.Tensor  # same shape/dtype as the input
    codes: torch.Tensor  # int8, same shape as the input (empty when return_codes=False)
    scales: torch.Tensor  # scale_dtype: the input's other axes, then n_groups last
    sq_err: float = 0.0  # sum of (code*scale - w)^2, before rounding to the output dtype (fp32 per group, fp64 total)
    sq_ref: float = 0.0  # sum of w^2: sq_err / sq_ref is the relative error the builder reports


def qmax_for_bits(bits: float) -> int:
    """Largest code magnitude: int3 -> 3 (7 levels), int4 -> 7; ternary and int2 -> 1 ({-1, 0, 1})."""
    bits = float(bits)
    if math.isclose(bits, TERNARY_BITS) or bits == 2.0:
        return 1
    return 2 ** (int(bits) - 1) - 1


def clip_ratios(spec: QuantSpec) -> torch.Tensor:
    """Candidate clip ratios, ascending, always ending at 1.0 (absmax)."""
    if spec.clip_steps <= 1 or spec.clip_lo >= 1.0:
        return torch.ones(1, dtype=torch.float32)
    return torch.linspace(spec.clip_lo, 1.0, spec.clip_steps, dtype=torch.float32)


def candidate_scales(absmax: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """[G] absmax -> [G, C] scales, already rounded to the stored dtype."""
    ratios = clip_ratios(spec).to(absmax.device)
    raw = absmax[:, None] * ratios[None, :] / spec.qmax
    return raw.to(spec.scale_dtype).to(torch.float32)


def quantize_groups(groups: torch.Tensor, scales: torch.Tensor, qmax: int) -> torch.Tensor:
    """Codes for [G, g] fp32 groups under [G] or [G, 1] scales; a zero scale gives zero codes."""
    s = scales.reshape(-1, 1)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round(groups / safe).clamp_(-qmax, qmax)
    return torch.where(s > 0, q, torch.zeros_like(q))


SUM_LANES = 8  # quant_kernels_cpu.LANES: the CPU kernel sums in the same lanes


def lane_sum(v: torch.Tensor) -> torch.Tensor:
    """Row sums of [G, g] fp32 in one fixed order (the CPU kernel's): element i goes to lane i % 8, lanes
    accumulate block by block, combine pairwise, then the tail (g % 8) adds in order.

    A plain `.sum(1)` is associated however this machine's SIMD kernels like, so picks and reported errors
    would differ between CPUs and between the two paths; every add here is a separate elementwise op.
    """
    full = v.shape[1] - v.shape[1] % SUM_LANES
    acc = torch.zeros(v.shape[0], dtype=v.dtype, device=v.device)
    if full:
        blocks = v[:, :full].reshape(v.shape[0], -1, SUM_LANES)
        lane = blocks[:, 0, :].clone()
        for b in range(1, blocks.shape[1]):
            lane += blocks[:, b, :]
        acc = ((lane[:, 0] + lane[:, 1]) + (lane[:, 2] + lane[:, 3])) + \
              ((lane[:, 4] + lane[:, 5]) + (lane[:, 6] + lane[:, 7]))
    for i in range(full, v.shape[1]):
        acc = acc + v[:, i]
    return acc


def group_errors(groups: torch.Tensor, scales: torch.Tensor, qmax: int) -> torch.Tensor:
    """[G, g] groups, [G, C] candidate scales -> [G, C] squared error (fp32, summed like the CPU kernel)."""
    errs = torch.empty(scales.shape, dtype=torch.float32, device=groups.device)
    for c in range(scales.shape[1]):
        s = scales[:, c]
        d = quantize_groups(groups, s, qmax) * s[:, None] - groups
        errs[:, c] = lane_sum(d * d)
    return errs


def search_torch(groups: torch.Tensor, scales: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference search: (codes fp32 [G, g], chosen scale [G]); ties go to the larger ratio (later column)."""
    n = scales.shape[1]
    pick = (n - 1) - torch.argmin(group_errors(groups, scales, qmax).flip(1), dim=1)
    s = scales.gather(1, pick[:, None]).squeeze(1)
    return quantize_groups(groups, s, qmax), s


@functools.lru_cache(maxsize=1)
def _numba_kernel():
    """The fused CPU kernel (quant_kernels_cpu.py), or None where numba is missing (torch path then)."""
    try:
        import quant_kernels_cpu
    except ModuleNotFoundError as e:
        if e.name != "numba":
            raise  # a broken PYTHONPATH must not silently cost a 40x slowdown
        warnings.warn("numba is not installed: CPU quantization uses the (much slower) torch path", stacklevel=3)
        return None
    return quant_kernels_cpu.fused_kernel


def quantize_groups_into(groups: torch.Tensor, spec: QuantSpec, codes, deq, chosen, err, ref,
                         use_kernel: bool = True):
    """Fill codes (int8), deq (fp32), chosen scale, and per-group squared error / squared norm (fp32)."""
    kernel = _numba_kernel() if (use_kernel and groups.device.type == "cpu" and spec.scale_dtype == torch.float16) else None
    if kernel is not None:
        import numpy as np

        kernel(groups.numpy(), clip_ratios(spec).numpy(), np.float32(spec.qmax), codes.numpy(), deq.numpy(),
               chosen.numpy(), err.numpy(), ref.numpy())
        return
    cands = candidate_scales(groups.abs().amax(dim=1), spec)
    q, s = search_torch(groups, cands, spec.qmax)
    codes.copy_(q.to(torch.int8))
    chosen.copy_(s)
    deq.copy_(q * s[:, None])
    d = deq - groups
    err.copy_(lane_sum(d * d))
    ref.copy_(lane_sum(groups * groups))


def fixed_order_total(per_group: torch.Tensor) -> float:
    """fp64 total of per-group fp32 sums, in an order that depends on nothing but the values (numpy's
    pairwise sum; torch's CPU reduction splits by thread count and SIMD width)."""
    return float(per_group.detach().to("cpu", torch.float64).numpy().sum())


@torch.no_grad()
def quantize_tensor(w: torch.Tensor, spec: QuantSpec, axis: int = -1, use_kernel: bool = True,
                    return_codes: bool = True) -> QuantResult:
    """Fake-quantize `w` with groups along `axis`; also return the int codes and stored scales.

    Works through the rows of the (contraction-axis-last) view in chunks of about `spec.chunk_groups`
    groups, writing each chunk straight into the output, so the fp32 temporaries stay bounded and peak
    memory is ~ input + output whatever the tensor size.
    """
    if w.ndim < 1 or w.numel() == 0:
        raise ValueError(f"cannot quantize a tensor of shape {tuple(w.shape)}")
    if spec.is_identity:
        raise ValueError("bits=16 means 'leave untouched': the caller should not quantize this tensor")
    if not w.is_floating_point():
        raise ValueError(f"only floating-point tensors can be quantized, got {w.dtype}")
    axis = axis % w.ndim
    moved = w.movedim(axis, -1)
    lead, k = tuple(moved.shape[:-1]), moved.shape[-1]
    rows = moved.reshape(-1, k)  # a view when axis is already last
    n_rows = rows.shape[0]
    groups_per_row = -(-k // spec.group)
    pad = groups_per_row * spec.group - k

    out_rows = torch.empty((n_rows, k), dtype=w.dtype, device=w.device)
    codes_rows = torch.empty((n_rows, k), dtype=torch.int8, device=w.device) if return_codes else None
    scales = torch.empty((n_rows, groups_per_row), dtype=spec.scale_dtype, device=w.device)
    rows_per_chunk = max(1, spec.chunk_groups // groups_per_row)
    sq_err = sq_ref = 0.0
    for r0 in range(0, n_rows, rows_per_chunk):
        r1 = min(n_rows, r0 + rows_per_chunk)
        chunk = rows[r0:r1].float()
        if pad:
            chunk = torch.nn.functional.pad(chunk, (0, pad))
        groups = chunk.reshape(-1, spec.group)
        codes = torch.empty(groups.shape, dtype=torch.int8, device=w.device)
        deq = torch.empty(groups.shape, dtype=torch.float32, device=w.device)
        chosen = torch.empty(groups.shape[0], dtype=torch.float32, device=w.device)
        err = torch.empty(groups.shape[0], dtype=torch.float32, device=w.device)
        ref = torch.empty(groups.shape[0], dtype=torch.float32, device=w.device)
        quantize_groups_into(groups, spec, codes, deq, chosen, err, ref, use_kernel)
        sq_err += fixed_order_total(err)
        sq_ref += fixed_order_total(ref)
        limit = torch.finfo(spec.scale_dtype).max
        if not bool(torch.isfinite(chosen).all()) or float(chosen.max()) > limit:
            raise ValueError(f"rows {r0}..{r1} hold non-finite weights, or |w|max/qmax exceeds the "
                             f"{spec.scale_dtype} scale range ({limit}); this tensor cannot be quantized as asked")
        out_rows[r0:r1] = deq.reshape(r1 - r0, -1)[:, :k]
        if codes_rows is not None:
            codes_rows[r0:r1] = codes.reshape(r1 - r0, -1)[:, :k]
        scales[r0:r1] = chosen.reshape(r1 - r0, groups_per_row)  # exact: candidates are representable

    def restore(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(*lead, k).movedim(-1, axis)

    codes_out = restore(codes_rows) if codes_rows is not None else torch.empty(0, dtype=torch.int8)
    return QuantResult(restore(out_rows), codes_out, scales.reshape(*lead, groups_per_row), sq_err, sq_ref)


def fake_quant(w: torch.Tensor, spec: QuantSpec, axis: int = -1) -> torch.Tensor:
    """Dequantized copy of `w` (same shape and dtype); identity for bits=16."""
    if spec.is_identity:
        return w.clone()
    return quantize_tensor(w, spec, axis, return_codes=False).dequant


def fake_quant_ste(w: torch.Tensor, spec: QuantSpec, axis: int = -1) -> torch.Tensor:
    """Straight-through estimator: forward = fake_quant(w), backward = identity (for LoRA/OPD training)."""
    if spec.is_identity:
        return w
    dq = fake_quant(w.detach(), spec, axis)
    return w + (dq - w).detach()


def quant_error(w: torch.Tensor, dequant: torch.Tensor) -> float:
    """Sum of squared error in float64 (the quantity the clip search minimizes)."""
    return float(((dequant.double() - w.double()) ** 2).sum())
