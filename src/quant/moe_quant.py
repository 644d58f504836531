"""Group-wise fake-quantization on one shared grid: the math, as pure functions on tensors.

Every function takes a `QuantSpec` (bits, grid, group, clip search) and returns new tensors; nothing here
reads files or keeps state. The builder (`quant_save.py`), the calibrated methods (`quant_methods.py`) and
training (STE) call the same code, so what is evaluated is exactly what would be packed:

* groups of `spec.group` values run along the contraction (input) axis; when that axis is not a
  multiple of the group, the tail group gets its own scale (zero padding changes neither the absmax
  nor the error, so this is exact, never a per-row fallback);
* three grids (`spec.grid`), each charged its exact overhead by `footprint.py`:
  - "sym" (default, the seed's): codes in [-qmax, qmax], qmax = 2^(bits-1) - 1, so 2^bits - 1 levels
    (int3: 7). At bits=2 this would be the ternary {-1, 0, 1} charged as 2 bits, so it is refused:
    use bits=1.58 for ternary, or grid "full"/"asym" for 4 levels;
  - "full": codes in [-2^(bits-1), 2^(bits-1) - 1], all 2^bits levels; the scale may be negative so the
    group's largest-magnitude value can sit on the long (negative) side, as llama.cpp's Q4_0 does;
  - "asym": 2^bits levels with a per-group integer zero-point (stored, and charged, at `bits` bits):
    dequant = (code - zero) * scale. Codes and zeros are stored offset by -2^(bits-1) so they fit int8.
* the scale is rounded to its stored dtype (fp16) *before* it is used, so fake-quant == packed (up to
  the one rounding of dequant to the checkpoint's dtype, bf16: < 2^-8 relative, levels unchanged);
* the scale is chosen per group by an MSE search over clip ratios in [clip_lo, 1.0] (1.0 = absmax is
  always a candidate, so the search can never be worse than absmax); ties go to the later candidate
  (the larger ratio). An optional per-weight importance turns the MSE into a weighted one (wclip, and
  GPTQ's group scales).

The search is the hot loop (16+ candidates x every weight). On CPU it runs in numba kernels
(quant_kernels_cpu.py, parallel over groups); elsewhere, or without numba, a chunked torch loop computes
the same thing, summed in the same fixed order, so both paths write the same bytes.
"""
from __future__ import annotations

import functools
import warnings

import torch

from quant_spec import GRIDS, SUPPORTED_BITS, TERNARY_BITS, QuantSpec, qmax_for_bits  # noqa: F401  (the math's vocabulary)
from quant_result import SUM_LANES, QuantResult, fixed_order_total, lane_sum  # noqa: F401  (every grid's result and sums)

def scale_dtype(spec: QuantSpec) -> torch.dtype:
    """The torch dtype scales are stored in (QuantSpec names it, so the spec itself needs no torch)."""
    return getattr(torch, spec.scale_dtype)


def clip_ratios(spec: QuantSpec) -> torch.Tensor:
    """Candidate clip ratios, ascending, always ending at 1.0 (absmax)."""
    if spec.clip_steps <= 1 or spec.clip_lo >= 1.0:
        return torch.ones(1, dtype=torch.float32)
    return torch.linspace(spec.clip_lo, 1.0, spec.clip_steps, dtype=torch.float32)


def candidate_scales(absmax: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """[G] absmax -> [G, C] scales (sym grid), already rounded to the stored dtype."""
    ratios = clip_ratios(spec).to(absmax.device)
    raw = absmax[:, None] * ratios[None, :] / spec.qmax
    return raw.to(scale_dtype(spec)).to(torch.float32)


def quantize_groups(groups: torch.Tensor, scales: torch.Tensor, qmax: int) -> torch.Tensor:
    """Codes for [G, g] fp32 groups under [G] or [G, 1] scales; a zero scale gives zero codes."""
    s = scales.reshape(-1, 1)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round(groups / safe).clamp_(-qmax, qmax)
    return torch.where(s > 0, q, torch.zeros_like(q))


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


# ------------------------------------------------------------------ every grid, optionally weighted
def grid_candidates(groups: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[G, g] fp32 groups -> candidate (scales [G, C], zeros [G, C] or None), scales rounded to fp16.

    sym: absmax * r / qmax. full: the extreme value goes to the long negative side (the scale is negative
    when the largest magnitude is a positive value, max(w) >= -min(w) > 0); candidates absmax * r / 2^(b-1)
    (the extreme exactly on the extra level at r = 1), plus, when there is a search, absmax * r / qmax
    (the sym candidates, so full's search is never worse than sym's). asym: the range [min(w, 0), max(w, 0)] shrunk by r, zero-point = round(-r * min / scale).
    """
    ratios = clip_ratios(spec).to(groups.device)
    if spec.grid == "sym":
        return candidate_scales(groups.abs().amax(dim=1), spec), None
    lo, hi = spec.code_range
    if spec.grid == "full":
        absmax = groups.abs().amax(dim=1)
        vmin, vmax = groups.amin(dim=1).clamp(max=0.0), groups.amax(dim=1).clamp(min=0.0)
        sign = torch.where((vmax >= -vmin) & (vmax > 0), -1.0, 1.0).to(torch.float32)  # extreme > 0: scale < 0
        mags = [absmax[:, None] * ratios[None, :] / float(-lo)]
        if ratios.numel() > 1:
            mags.append(absmax[:, None] * ratios[None, :] / float(hi if hi > 0 else 1))
        raw = sign[:, None] * torch.cat(mags, dim=1)
        return raw.to(scale_dtype(spec)).to(torch.float32), None
    xmin = groups.amin(dim=1).clamp(max=0.0)
    xmax = groups.amax(dim=1).clamp(min=0.0)
    span = (xmax - xmin)[:, None] * ratios[None, :]
    scales = (span / float(hi - lo)).to(scale_dtype(spec)).to(torch.float32)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    zeros = (torch.round(-(xmin[:, None] * ratios[None, :]) / safe) + lo).clamp_(lo, hi)
    zeros = torch.where(scales > 0, zeros, torch.zeros_like(zeros))
    return scales, zeros


def grid_codes(values: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    """Codes (fp32, within spec.code_range) for values [G, g] (or [G]) under per-row scales/zeros [G] or [G, 1].

    A zero scale (an all-zero group) gives code = zero, i.e. dequant 0.
    """
    lo, hi = spec.code_range
    s = scales if scales.ndim == values.ndim else scales[:, None]
    nonzero = s != 0
    safe = torch.where(nonzero, s, torch.ones_like(s))
    q = torch.round(values / safe)
    if zeros is not None:
        z = zeros if zeros.ndim == values.ndim else zeros[:, None]
        q = q + z
        return torch.where(nonzero, q.clamp_(lo, hi), z.expand_as(q))
    return torch.where(nonzero, q.clamp_(lo, hi), torch.zeros_like(q))


def grid_dequant(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None) -> torch.Tensor:
    s = scales if scales.ndim == codes.ndim else scales[:, None]
    if zeros is None:
        return codes * s
    z = zeros if zeros.ndim == codes.ndim else zeros[:, None]
    return (codes - z) * s


def search_grid(groups: torch.Tensor, spec: QuantSpec, importance: torch.Tensor | None = None):
    """Any grid, optionally importance-weighted: -> (codes fp32 [G, g], scale [G], zero [G] or None).

    The error of a candidate is sum(importance * (dequant - w)^2) over the group (plain MSE without
    importance), summed in lane order; ties go to the later candidate. For the sym grid without
    importance this picks exactly what `search_torch` and the CPU kernel pick.
    """
    cands, zcands = grid_candidates(groups, spec)
    n = cands.shape[1]
    errs = torch.empty(cands.shape, dtype=torch.float32, device=groups.device)
    for c in range(n):
        s = cands[:, c]
        z = None if zcands is None else zcands[:, c]
        d = grid_dequant(grid_codes(groups, s, z, spec), s, z) - groups
        e = d * d
        if importance is not None:
            e = e * importance
        errs[:, c] = lane_sum(e)
    pick = (n - 1) - torch.argmin(errs.flip(1), dim=1)
    s = cands.gather(1, pick[:, None]).squeeze(1)
    z = None if zcands is None else zcands.gather(1, pick[:, None]).squeeze(1)
    return grid_codes(groups, s, z, spec), s, z


@functools.lru_cache(maxsize=1)
def _numba_kernels():
    """The CPU kernels module (quant_kernels_cpu.py), or None where numba is missing (torch path then)."""
    try:
        import quant_kernels_cpu
    except ModuleNotFoundError as e:
        if e.name != "numba":
            raise  # a broken PYTHONPATH must not silently cost a 40x slowdown
        warnings.warn("numba is not installed: CPU quantization uses the (much slower) torch path", stacklevel=3)
        return None
    return quant_kernels_cpu


def quantize_groups_into(groups: torch.Tensor, spec: QuantSpec, codes, deq, chosen, err, ref,
                         use_kernel: bool = True, zeros=None, importance: torch.Tensor | None = None):
    """Fill codes (int8), deq (fp32), chosen scale (and zero-point on the asym grid), and per-group squared
    error / squared norm (fp32, unweighted). `importance` [G, g] weights the search only."""
    on_cpu = use_kernel and groups.device.type == "cpu" and spec.scale_dtype == "float16"
    kernels = _numba_kernels() if on_cpu else None
    if kernels is not None and spec.grid == "sym" and importance is None:
        import numpy as np

        kernels.fused_kernel(groups.numpy(), clip_ratios(spec).numpy(), np.float32(spec.qmax), codes.numpy(),
                             deq.numpy(), chosen.numpy(), err.numpy(), ref.numpy())
        return
    if kernels is not None:
        kernels.run_grid_kernel(groups, spec, clip_ratios(spec), codes, deq, chosen, zeros, err, ref, importance)
        return
    if spec.grid == "sym" and importance is None:
        cands = candidate_scales(groups.abs().amax(dim=1), spec)
        q, s = search_torch(groups, cands, spec.qmax)
        z = None
    else:
        q, s, z = search_grid(groups, spec, importance)
    codes.copy_(q.to(torch.int8))
    chosen.copy_(s)
    if zeros is not None:
        zeros.copy_(z)
    deq.copy_(grid_dequant(q, s, z))
    d = deq - groups
    err.copy_(lane_sum(d * d))
    ref.copy_(lane_sum(groups * groups))


def search_groups(groups: torch.Tensor, spec: QuantSpec, importance: torch.Tensor | None = None,
                  use_kernel: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chosen (scale [G], zero-point [G] or None) for [G, g] fp32 groups: the kernel on CPU, else torch."""
    groups = groups.float().contiguous()
    n = groups.shape[0]
    codes = torch.empty(groups.shape, dtype=torch.int8, device=groups.device)
    deq = torch.empty(groups.shape, dtype=torch.float32, device=groups.device)
    chosen, err, ref = (torch.empty(n, dtype=torch.float32, device=groups.device) for _ in range(3))
    zeros = torch.empty(n, dtype=torch.float32, device=groups.device) if spec.grid == "asym" else None
    imp = None if importance is None else importance.float().contiguous()
    quantize_groups_into(groups, spec, codes, deq, chosen, err, ref, use_kernel, zeros, imp)
    return chosen, zeros


@torch.no_grad()
def quantize_tensor(w: torch.Tensor, spec: QuantSpec, axis: int = -1, use_kernel: bool = True,
                    return_codes: bool = True, importance: torch.Tensor | None = None) -> QuantResult:
    """Fake-quantize `w` with groups along `axis`; also return the int codes and stored scales (and zeros).

    `importance` (optional, >= 0) weights the clip search's squared error per weight (wclip: diag(H) per
    input channel). It is given in the contraction-axis-last layout: broadcastable to
    `w.movedim(axis, -1).shape`, e.g. [in] for a 2-D weight, [E, 1, in] for a 3-D expert tensor.

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
    if spec.k_type is not None:
        import gguf_grids

        return gguf_grids.quantize_tensor(w, spec, axis, clip_ratios(spec), return_codes, importance)
    axis = axis % w.ndim
    moved = w.movedim(axis, -1)
    lead, k = tuple(moved.shape[:-1]), moved.shape[-1]
    rows = moved.reshape(-1, k)  # a view when axis is already last
    n_rows = rows.shape[0]
    groups_per_row = -(-k // spec.group)
    pad = groups_per_row * spec.group - k
    imp_rows = None
    if importance is not None:
        imp = importance.to(device=w.device, dtype=torch.float32)
        try:
            imp_rows = imp.expand(moved.shape).reshape(-1, k)
        except RuntimeError:
            raise ValueError(f"importance of shape {tuple(importance.shape)} does not broadcast to the "
                             f"contraction-axis-last weight {tuple(moved.shape)}") from None

    out_rows = torch.empty((n_rows, k), dtype=w.dtype, device=w.device)
    codes_rows = torch.empty((n_rows, k), dtype=torch.int8, device=w.device) if return_codes else None
    scales = torch.empty((n_rows, groups_per_row), dtype=scale_dtype(spec), device=w.device)
    zeros_rows = torch.empty((n_rows, groups_per_row), dtype=torch.int8, device=w.device) if spec.grid == "asym" else None
    rows_per_chunk = max(1, spec.chunk_groups // groups_per_row)
    sq_err = sq_ref = 0.0
    for r0 in range(0, n_rows, rows_per_chunk):
        r1 = min(n_rows, r0 + rows_per_chunk)
        chunk = rows[r0:r1].float()
        if pad:
            chunk = torch.nn.functional.pad(chunk, (0, pad))
        groups = chunk.reshape(-1, spec.group)
        imp_groups = None
        if imp_rows is not None:
            ic = imp_rows[r0:r1]
            imp_groups = (torch.nn.functional.pad(ic, (0, pad)) if pad else ic).reshape(-1, spec.group).contiguous()
        codes = torch.empty(groups.shape, dtype=torch.int8, device=w.device)
        deq = torch.empty(groups.shape, dtype=torch.float32, device=w.device)
        chosen = torch.empty(groups.shape[0], dtype=torch.float32, device=w.device)
        zero = torch.empty(groups.shape[0], dtype=torch.float32, device=w.device) if zeros_rows is not None else None
        err = torch.empty(groups.shape[0], dtype=torch.float32, device=w.device)
        ref = torch.empty(groups.shape[0], dtype=torch.float32, device=w.device)
        quantize_groups_into(groups, spec, codes, deq, chosen, err, ref, use_kernel, zero, imp_groups)
        sq_err += fixed_order_total(err)
        sq_ref += fixed_order_total(ref)
        limit = torch.finfo(scale_dtype(spec)).max
        if not bool(torch.isfinite(chosen).all()) or float(chosen.abs().max()) > limit or \
                not bool(torch.isfinite(groups).all()):
            raise ValueError(f"rows {r0}..{r1} hold non-finite weights, or |w|max/qmax exceeds the "
                             f"{spec.scale_dtype} scale range ({limit}); this tensor cannot be quantized as asked")
        out_rows[r0:r1] = deq.reshape(r1 - r0, -1)[:, :k]
        if codes_rows is not None:
            codes_rows[r0:r1] = codes.reshape(r1 - r0, -1)[:, :k]
        scales[r0:r1] = chosen.reshape(r1 - r0, groups_per_row)  # exact: candidates are representable
        if zeros_rows is not None:
            zeros_rows[r0:r1] = zero.reshape(r1 - r0, groups_per_row).to(torch.int8)

    def restore(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(*lead, k).movedim(-1, axis)

    codes_out = restore(codes_rows) if codes_rows is not None else torch.empty(0, dtype=torch.int8)
    zeros_out = zeros_rows.reshape(*lead, groups_per_row) if zeros_rows is not None else None
    return QuantResult(restore(out_rows), codes_out, scales.reshape(*lead, groups_per_row), sq_err, sq_ref,
                       zeros_out)


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
