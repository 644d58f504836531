"""One planned tensor in, its fake-quantized copy out: the method dispatch shared by the streaming shard writer
and the calibration pass.

* `clip` without statistics is the seed's path (`moe_quant.quantize_tensor`), byte for byte;
* every other method goes through `quant_methods.quantize_with_method` with the tensor's Hessian proxy
  H = E[x xᵀ] ([in, in], or [E, in, in] for fused experts); a calibrated method with no statistics for a
  tensor (an untied embedding is a lookup, not a product) falls back to clip, and says so;
* fused 3-D experts under a per-expert bits plan are quantized slice by slice, each at its own bits;
* a weight holding NaN/Inf is refused with its name (the quantizer would otherwise spread it over a group).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import moe_quant
import store_pack
from build_plan import TensorPlan
from ckpt_source import BuildError
from model_adapters import Recipe


@dataclass
class WeightResult:
    dequant: torch.Tensor
    sq_err: float
    sq_ref: float
    method: str  # the method actually applied ("clip" when a calibrated method had no statistics)
    proxy: float | None = None  # tr(dW H dWᵀ) of the result, when H is known
    proxy_clip: float | None = None  # the same for plain clip, for comparison
    proxy_diag: float | None = None  # tr(dW diag(H) dWᵀ): wclip's (llama.cpp imatrix's) own objective
    proxy_diag_clip: float | None = None
    # the packed store's entries: key (the tensor name, `name#E` per expert slice) -> (entry spec, part tensors)
    store: dict | None = None
    per_slice: dict | None = None  # 3-D weights with H: the proxies above per expert (lists), for batched callers


def check_finite(name: str, w: torch.Tensor) -> None:
    if not bool(torch.isfinite(w).all()):
        bad = int((~torch.isfinite(w)).sum())
        raise BuildError(f"tensor {name} holds {bad} NaN/Inf value(s); fix the checkpoint (it cannot be quantized)")


def _sq(a: torch.Tensor) -> float:
    flat = a.float().reshape(-1, a.shape[-1]) if a.ndim else a.float().reshape(1, 1)
    return moe_quant.fixed_order_total((flat * flat).sum(dim=1))


def _method_spec(recipe: Recipe, method: str):
    import quant_methods

    return quant_methods.MethodSpec(name=method, damp=recipe.damp, act_order=recipe.act_order)


def _quantize_one(w, spec, axis, method, recipe, hessian):
    """(dequant, sq_err, sq_ref, baseline, store parts) of one tensor (2-D, or 3-D fused experts) with one spec;
    baseline is (clip's dequant, per-expert proxy of the result, of clip) when the method's clip guard computed them."""
    info = store_pack.entry_spec(spec, axis, tuple(w.shape), w.dtype, method)
    if method == "clip" and hessian is None:
        res = moe_quant.quantize_tensor(w, spec, axis=axis, return_codes=True)
        return res.dequant, res.sq_err, res.sq_ref, None, (info, store_pack.encode(res, info))
    import quant_methods

    res, clip, proxies = quant_methods.quantize_with_baseline(w, spec, _method_spec(recipe, method), axis=axis,
                                                              hessian=hessian)
    dq = res.dequant
    sq_ref = res.sq_ref if res.sq_ref else _sq(w)
    sq_err = res.sq_err if res.sq_ref else _sq(dq.float() - w.float())
    return dq, sq_err, sq_ref, (None if clip is None else (clip.dequant, *proxies)), (info, store_pack.encode(res, info))


def _proxies(w, dq, hessian, axis, full_per_expert: torch.Tensor | None = None):
    """(tr(dW H dWᵀ), tr(dW diag(H) dWᵀ)) summed over rows (and experts), and the same per expert ([B] fp64);
    fp32 products, fp64 totals. `full_per_expert`: the [B] fp32 tr(dW H dWᵀ) already computed (by the clip
    guard), the same numbers."""
    d = (dq.float() - w.float()).movedim(axis % w.ndim, -1)
    if d.ndim == 2:
        d = d.unsqueeze(0)
    h = hessian.to(d.device, torch.float32)
    h = h if h.ndim == 3 else h.unsqueeze(0)
    if full_per_expert is None:
        full_per_expert = ((d @ h) * d).sum(dim=(1, 2))
    diag_per_expert = ((d * d) * h.diagonal(dim1=-2, dim2=-1)[:, None, :]).sum(dim=(1, 2)).double()
    full_per_expert = full_per_expert.double()
    return float(full_per_expert.sum()), float(diag_per_expert.sum()), full_per_expert, diag_per_expert


def quantize_weight(name: str, w: torch.Tensor, plan: TensorPlan, recipe: Recipe, hessian: torch.Tensor | None = None,
                    compare_clip: bool = False) -> WeightResult:
    """Quantize `w` as `plan` says, with `recipe.method` (clip when the method needs H and there is none)."""
    check_finite(name, w)
    method = recipe.method
    if recipe.calibrated and hessian is None:
        method = "clip"
    axis = plan.role.axis
    baseline = None
    try:
        if plan.slice_specs is None:
            dq, sq_err, sq_ref, baseline, entry = _quantize_one(w, plan.spec, axis, method, recipe, hessian)
            store = {name: entry}
        else:
            dq = torch.empty_like(w)
            sq_err = sq_ref = 0.0
            store = {}
            for e, spec in enumerate(plan.slice_specs):
                if spec is None:
                    dq[e] = w[e]
                    store[f"{name}#{e}"] = (store_pack.raw_spec(w[e]), {"raw": w[e].cpu().contiguous()})
                    continue
                h = hessian[e] if hessian is not None and hessian.ndim == 3 else hessian
                d, a, b, _, entry = _quantize_one(w[e], spec, axis, method, recipe, h)
                dq[e] = d
                store[f"{name}#{e}"] = entry
                sq_err, sq_ref = sq_err + a, sq_ref + b
    except ValueError as e:
        raise BuildError(f"tensor {name}: {e}") from None
    for info, _ in store.values():
        info["role"] = plan.role.role.value  # exporters pick formats by role (an embedding is no Linear)
    result = WeightResult(dq, sq_err, sq_ref, method, store=store)
    if hessian is not None:
        result.proxy, result.proxy_diag, full, diag = _proxies(w, dq, hessian, axis,
                                                               None if baseline is None else baseline[1])
        per = {"proxy": full, "proxy_diag": diag}
        if compare_clip:
            if method == "clip":
                result.proxy_clip, result.proxy_diag_clip = result.proxy, result.proxy_diag
                per.update(proxy_clip=full, proxy_diag_clip=diag)
            else:
                if baseline is not None:  # the guard already quantized with clip and scored it on H
                    clip_dq, clip_full = baseline[0], baseline[2]
                else:
                    clip_dq, clip_full = (moe_quant.quantize_tensor(w, plan.spec, axis=axis, return_codes=False).dequant
                                          if plan.slice_specs is None else _sliced_clip(w, plan)), None
                result.proxy_clip, result.proxy_diag_clip, cf, cd = _proxies(w, clip_dq, hessian, axis, clip_full)
                per.update(proxy_clip=cf, proxy_diag_clip=cd)
        if w.ndim == 3:
            result.per_slice = {k: v.tolist() for k, v in per.items()}
    return result


def _sliced_clip(w, plan: TensorPlan) -> torch.Tensor:
    out = torch.empty_like(w)
    for e, spec in enumerate(plan.slice_specs):
        out[e] = w[e] if spec is None else moe_quant.quantize_tensor(w[e], spec, axis=plan.role.axis,
                                                                     return_codes=False).dequant
    return out
