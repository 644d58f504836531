"""LoRA through the student's fake quantizer: W_eff = Q_s(W + B A), with the build's scales s fixed.

Why this shape:
* what is trained is what is shipped. The forward uses the student's own grid as its packed store holds
  it (`opd_grid.student_grid`: the fp16 scales, zero points and code range of every tensor, per-tensor
  bits of a bits plan included, AWQ's input scale, or a llama.cpp K type's d / sub-scales / sub-mins,
  `opd_kgrid`; no scale search is re-run), the same rounding. W is the SOURCE weight for
  a round-to-nearest build (clip/rtn: Q_s(source) is the student) and the student's own decoded weight for
  a calibrated one (gptq/wclip/awq: their codes are not the nearest ones, Q_s(student) is the student).
  `merge_adapter.py` applies exactly this function once more and stores the codes, so the merged
  checkpoint's logits are the training forward's logits;
* the straight-through estimator: forward value = Q_s(W + BA) exactly, gradient = identity through Q,
  so A and B learn from the quantized model's loss;
* targets are chosen by tensor ROLE (`model_adapters.adapter_for(config).classify`), never by family
  name patterns. Fused 3-D experts [E, a, b] get one adapter per expert (A [E, r, b], B [E, a, r]);
  per-expert 2-D weights and other Linears get A [r, in], B [out, r];
* B starts at zero, so at step 0 the model IS the student (checked).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.utils.parametrize as parametrize

import model_adapters
import moe_quant
import opd_data
import ptq_meta
import ptq_store
from model_adapters import Recipe, Role

DEFAULT_ROLES = opd_data.DEFAULT_LORA_ROLES
ALLOWED_ROLES = opd_data.LORA_ALLOWED_ROLES


class LoraTargetError(ValueError):
    """A user-facing problem choosing or checking LoRA targets."""


@dataclass(frozen=True)
class Target:
    """One parameter trained through LoRA: its in-memory name, role, grid axis and quant spec."""

    name: str
    role: str
    shape: tuple[int, ...]
    axis: int
    spec: moe_quant.QuantSpec


def recipe_from_meta(meta: dict) -> Recipe:
    """The student's Recipe from its _ptq_meta.json. Every rounding method and a per-tensor bits plan are
    accepted: the grid, AWQ's input scale included, is read from the packed store (`opd_grid`)."""
    try:
        return ptq_store.recipe_of(meta)
    except ptq_meta.MetaError as e:
        raise LoraTargetError(f"the student's {e}") from None


def choose_targets(named_shapes, config: dict, recipe: Recipe, roles=DEFAULT_ROLES,
                   stored: set | None = None) -> list[Target]:
    """Parameters whose role is in `roles` and that the build quantized (`stored`: the names the packed store
    holds quantized in full, which a bits plan decides per tensor; else the recipe). A LoRA on a BF16 tensor
    would still train, but merging could not keep the footprint: those are left out."""
    bad = sorted(set(roles) - set(ALLOWED_ROLES))
    if bad:
        raise LoraTargetError(f"--lora-roles {bad} not allowed; choose from {list(ALLOWED_ROLES)}")
    adapter = model_adapters.adapter_for(config)
    out = []
    for name, shape in named_shapes:
        tr = adapter.classify(name, shape)
        if tr.role.value not in roles or not tr.quantizable or (stored is not None and name not in stored):
            continue
        spec = recipe.spec_for(tr, True, len(shape))
        if spec is None:
            continue
        out.append(Target(name, tr.role.value, tuple(int(s) for s in shape), tr.axis % len(shape), spec))
    if not out:
        raise LoraTargetError(f"no quantized tensor has a role in {list(roles)} (model_type "
                              f"{config.get('model_type')!r}); a dense model has no routed experts: pass "
                              f"--lora-roles dense_mlp,attention")
    return out


# ---------------------------------------------------------------------------------------- the grid
def _grouped(w: torch.Tensor, axis: int, group: int) -> tuple[torch.Tensor, tuple, int]:
    moved = w.movedim(axis, -1)
    lead, k = tuple(moved.shape[:-1]), moved.shape[-1]
    n_groups = -(-k // group)
    pad = n_groups * group - k
    if pad:
        moved = torch.nn.functional.pad(moved, (0, pad))
    return moved.reshape(*lead, n_groups, group), lead, k


def quantize_fixed(w: torch.Tensor, scales: torch.Tensor, axis: int, spec: moe_quant.QuantSpec,
                   zeros: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 dequantized w on the grid of FIXED `scales` (and zero-points on an asym grid), shaped
    [..lead.., n_groups] as quantize_tensor returns them: the builder's own code/dequant functions,
    without its scale search. A zero scale gives zeros, as in the builder."""
    groups, lead, k = _grouped(w.float(), axis, spec.group)
    flat = groups.reshape(-1, spec.group)
    s = scales.to(device=w.device, dtype=torch.float32).reshape(-1)
    if hasattr(moe_quant, "grid_codes"):  # every grid (sym / full / asym)
        z = None if zeros is None else zeros.to(device=w.device, dtype=torch.float32).reshape(-1)
        deq = moe_quant.grid_dequant(moe_quant.grid_codes(flat, s, z, spec), s, z)
    else:  # older moe_quant: the symmetric grid only
        deq = moe_quant.quantize_groups(flat, s, spec.qmax) * s[:, None]
    return deq.reshape(*lead, -1)[..., :k].movedim(-1, axis)


def build_scales(w: torch.Tensor, target: Target) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(scales, zeros or None, dequant) the builder chooses for source weight w (its own search)."""
    res = moe_quant.quantize_tensor(w, target.spec, target.axis, return_codes=False)
    return res.scales, getattr(res, "zeros", None), res.dequant


# --------------------------------------------------------------------------- the grid, fast path
class FixedGrid:
    """One tensor's build grid, prepared once: Q_s applied IN PLACE on an fp32 tensor of the weight's shape.

    The same arithmetic as `quantize_fixed` (the builder's `grid_codes` / `grid_dequant`, element by
    element: x / s, round half-even, + z, clamp, - z, * s), so the result is bit-identical (test), but
    without its per-call copies: no movedim/pad/reshape copy (the groups along `axis` are views of the
    tensor), no `torch.where` per element, scales as fp32 once. A zero scale (an all-zero source group)
    gives +0 as in the builder. Why it matters: every forward re-quantizes every adapted expert, and
    that elementwise pass over all expert weights costs more than the 135M fixture's matmuls.

    An AWQ student adds its per-input-channel scale s (the store's `in_scale`): Q_s(x) = Q(x * s) / s, the
    store's decode order (codes * scale in fp32, then / s)."""

    PER_GROUP = ("scale", "safe", "zero", "zero_scale", "lo", "hi", "in_scale")

    def __init__(self, scales: torch.Tensor, zeros: torch.Tensor | None, axis: int, spec: moe_quant.QuantSpec,
                 shape: tuple[int, ...], code_range: tuple | None = None, group: int | None = None,
                 in_scale: torch.Tensor | None = None):
        """`code_range`: (lo, hi) as numbers, or as tensors shaped like `scales` when a bits plan gives the
        slices of one weight (experts of a fused tensor) different bits; default: the spec's range. `group`:
        the stored group when it is not the spec's (a K type's row fallback: blocks of 32 under gguf:K).
        `in_scale`: AWQ's input scale as [*lead, P, K] for a [*lead, R, K] weight, one row of scales per P equal
        row blocks (P = 2: a fused gate_up whose halves were two disk tensors with their own s)."""
        self.axis, self.group = axis % len(shape), group or spec.group
        self.in_scale = None
        if in_scale is not None:
            if self.axis != len(shape) - 1 or len(shape) < 2 or tuple(in_scale.shape[:-2]) != tuple(shape[:-2]) \
                    or in_scale.shape[-1] != shape[-1] or shape[-2] % in_scale.shape[-2]:
                raise LoraTargetError(f"an input scale of shape {list(in_scale.shape)} does not fit a weight "
                                      f"{list(shape)} grouped along axis {self.axis}")
            self.in_scale = in_scale.float().unsqueeze(-2).contiguous()  # [*lead, P, 1, K]
        self.lo, self.hi = code_range or getattr(spec, "code_range", (-spec.qmax, spec.qmax))
        k = shape[self.axis]
        self.n_full, self.rem = divmod(k, self.group)
        s = scales.float().reshape(*[d for i, d in enumerate(shape) if i != self.axis], -1)
        if s.shape[-1] != self.n_full + (1 if self.rem else 0):
            raise LoraTargetError(f"scales of shape {list(scales.shape)} do not fit a weight {list(shape)} grouped by "
                                  f"{self.group} along axis {self.axis}")
        self.zero_scale = (s == 0) if bool((s == 0).any()) else None  # all-zero source groups (rare)
        self.scale = s.contiguous()
        self.safe = torch.where(s != 0, s, torch.ones_like(s)).contiguous()
        self.zero = None if zeros is None else zeros.float().reshape(s.shape).contiguous()
        if isinstance(self.lo, torch.Tensor):  # per group, like the scales
            self.lo, self.hi = (t.float().reshape(s.shape).contiguous() for t in (self.lo, self.hi))

    def record(self) -> dict[str, torch.Tensor]:
        """The fixed grid as stored in the adapter file (fp16 scales, zero points when asymmetric, AWQ's input
        scale)."""
        out = {"scales": self.scale.to(torch.float16)}
        if self.zero is not None:
            out["zeros"] = self.zero
        if self.in_scale is not None:
            out["in_scale"] = self.in_scale.squeeze(-2).to(torch.float16)
        return out

    def _row_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """x [*lead, R, K] as [*lead, P, R / P, K] (a view), to meet the input scale [*lead, P, 1, K]."""
        return x.unflatten(-2, (self.in_scale.shape[-3], -1))

    def select(self, e: int) -> "FixedGrid":
        """The grid of expert e of a fused [E, ...] weight (views of this one; axis must not be the expert dim)."""
        if self.axis == 0:
            raise LoraTargetError("a grid along the expert axis cannot be split per expert")
        out = copy.copy(self)
        out.axis = self.axis - 1
        for name in self.PER_GROUP:
            if isinstance(getattr(self, name), torch.Tensor):
                setattr(out, name, getattr(self, name)[e])
        return out

    def to(self, device) -> "FixedGrid":
        for name in self.PER_GROUP:
            if isinstance(getattr(self, name), torch.Tensor):
                setattr(self, name, getattr(self, name).to(device))
        return self

    def _views(self, x: torch.Tensor):
        m = x.movedim(self.axis, -1)
        cut = self.n_full * self.group
        if self.n_full:  # [..., n_full, group] view of the whole groups
            yield m.narrow(-1, 0, cut).unflatten(-1, (self.n_full, self.group)), slice(0, self.n_full)
        if self.rem:  # [..., 1, rem] view of the tail group
            yield m.narrow(-1, cut, self.rem).unsqueeze(-2), slice(self.n_full, self.n_full + 1)

    def _range(self, groups):
        if isinstance(self.lo, torch.Tensor):
            return self.lo[..., groups, None], self.hi[..., groups, None]
        return self.lo, self.hi

    def codes_(self, x: torch.Tensor) -> torch.Tensor:
        """x (fp32, the weight's shape) -> its integer codes on this grid (as floats), in place: the stored
        `codes` of Q_s(x) (dequant = (code - zero) * scale, / in_scale for AWQ)."""
        if self.in_scale is not None:
            self._row_blocks(x).mul_(self.in_scale)
        for view, groups in self._views(x):
            lo, hi = self._range(groups)
            view.div_(self.safe[..., groups, None]).round_()
            if self.zero is not None:
                view.add_(self.zero[..., groups, None])
            view.clamp_(lo, hi)
        return x

    def quantize_(self, x: torch.Tensor) -> torch.Tensor:
        """x (fp32, the weight's shape) -> Q_s(x), in place; returns x."""
        if self.in_scale is not None:
            self._row_blocks(x).mul_(self.in_scale)
        for view, groups in self._views(x):
            lo, hi = self._range(groups)
            view.div_(self.safe[..., groups, None]).round_()
            if self.zero is not None:
                z = self.zero[..., groups, None]
                view.add_(z).clamp_(lo, hi).sub_(z)
            else:
                view.clamp_(lo, hi)
            view.mul_(self.scale[..., groups, None])
            if self.zero_scale is not None:  # code * 0 can be -0.0; the builder writes +0.0 there
                view.masked_fill_(self.zero_scale[..., groups, None], 0.0)
        if self.in_scale is not None:
            self._row_blocks(x).div_(self.in_scale)
        return x


def lora_delta_into(w: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """A new fp32 tensor w + scaling * B A (same order of operations as the merge: (B A) * scaling + w)."""
    x = torch.matmul(B.float(), A.float())
    return x.mul_(scaling).add_(w)


class _QuantLoraFn(torch.autograd.Function):
    """Value: Q_s(W + scaling * B A) rounded to the checkpoint dtype; gradient: straight through Q into
    scaling * B A, i.e. dA = scaling * B^T g, dB = scaling * g A^T (W is frozen: no gradient)."""

    @staticmethod
    def forward(ctx, w, A, B, grid: FixedGrid, scaling: float, store_dtype: torch.dtype):
        with torch.no_grad():
            x = grid.quantize_(lora_delta_into(w, A, B, scaling))
            q = x.to(store_dtype).to(w.dtype)
        ctx.save_for_backward(A, B)
        ctx.scaling = scaling
        return q

    @staticmethod
    def backward(ctx, g):
        A, B = ctx.saved_tensors
        g = g.float()
        dA = torch.matmul(B.float().transpose(-1, -2), g).mul_(ctx.scaling)
        dB = torch.matmul(g, A.float().transpose(-1, -2)).mul_(ctx.scaling)
        return None, dA.to(A.dtype), dB.to(B.dtype), None, None, None


# ------------------------------------------------------------------------------------- LoRA module
def lora_shapes(shape: tuple[int, ...], rank: int) -> tuple[tuple, tuple]:
    """A and B shapes for a 2-D [a, b] or fused 3-D [E, a, b] weight (delta = B @ A has its shape)."""
    if len(shape) == 2:
        return (rank, shape[1]), (shape[0], rank)
    if len(shape) == 3:
        return (shape[0], rank, shape[2]), (shape[0], shape[1], rank)
    raise LoraTargetError(f"LoRA needs a 2-D or fused 3-D weight, got shape {list(shape)}")


def lora_a_init(shape: tuple, generator=None) -> torch.Tensor:
    """Kaiming-like A ~ N(0, 1/fan_in); B starts at 0 so the adapted model starts as the student."""
    return torch.randn(shape, generator=generator) / math.sqrt(shape[-1])


class QuantLora(torch.nn.Module):
    """Parametrization: original W -> Q_s(W + scale * B A) with the straight-through estimator."""

    def __init__(self, target: Target, scales: torch.Tensor, zeros: torch.Tensor | None, rank: int, alpha: float,
                 generator=None, store_dtype: torch.dtype = torch.bfloat16, device=None, code_range: tuple | None = None,
                 grid=None):
        """`grid`: the target's fixed grid as read from the store (opd_grid.target_grid: a FixedGrid or an
        opd_kgrid.KFixedGrid); default: a FixedGrid from `scales`, `zeros` and the target's spec."""
        super().__init__()
        a_shape, b_shape = lora_shapes(target.shape, rank)
        if device is None:
            self.A = torch.nn.Parameter(lora_a_init(a_shape, generator))
            self.B = torch.nn.Parameter(torch.zeros(b_shape))
        else:  # meta: sharded first, filled by init_lora_ on each rank's rows
            self.A = torch.nn.Parameter(torch.empty(a_shape, device=device))
            self.B = torch.nn.Parameter(torch.empty(b_shape, device=device))
        self.axis, self.spec, self.scaling, self.store_dtype = target.axis, target.spec, alpha / rank, store_dtype
        self.grid = grid if grid is not None else FixedGrid(scales, zeros, target.axis, target.spec, target.shape,
                                                            code_range)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.grid.scale.device != w.device:
            self.grid.to(w.device)
        return _QuantLoraFn.apply(w, self.A, self.B, self.grid, self.scaling, self.store_dtype)


def merged_weight(w: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, scales: torch.Tensor,
                  axis: int, spec: moe_quant.QuantSpec, dtype: torch.dtype,
                  zeros: torch.Tensor | None = None) -> torch.Tensor:
    """The weight merge_adapter writes: Q_s(W + scaling * B A), in the checkpoint dtype; the training
    forward's own function (FixedGrid), so merged == trained bit for bit."""
    grid = FixedGrid(scales, zeros, axis, spec, tuple(w.shape))
    return grid.quantize_(lora_delta_into(w.float(), A, B, scaling)).to(dtype)


def attach(model: torch.nn.Module, targets: list[Target], scales: dict | None, rank: int, alpha: float,
           seed: int = 0, store_dtype: torch.dtype = torch.bfloat16, zeros: dict | None = None,
           device=None, code_ranges: dict | None = None, grids: dict | None = None) -> dict[str, QuantLora]:
    """Register a QuantLora on each target parameter (in place); returns name -> module. With device="meta"
    A and B are left empty (the sharded build fills each rank's rows afterwards). `grids`: name -> fixed grid
    read from the store (opd_grid.student_grid); else `scales`, `zeros` and `code_ranges` (name -> (lo, hi))
    with each target's spec."""
    gen = torch.Generator().manual_seed(seed)
    mods = {}
    for t in targets:
        owner_name, _, param = t.name.rpartition(".")
        owner = model.get_submodule(owner_name)
        if grids is not None:
            mod = QuantLora(t, None, None, rank, alpha, gen, store_dtype, device, grid=grids[t.name])
        else:
            mod = QuantLora(t, scales[t.name], (zeros or {}).get(t.name), rank, alpha, gen, store_dtype, device,
                            (code_ranges or {}).get(t.name))
        parametrize.register_parametrization(owner, param, mod, unsafe=True)
        mods[t.name] = mod
    return mods


def check_base_is_student(target: Target, dequant: torch.Tensor, student_w: torch.Tensor,
                          store_dtype: torch.dtype = torch.bfloat16) -> None:
    """The recipe's Q(source) must BE the student's tensor, else these are not the build's scales."""
    if dequant.shape != student_w.shape or not torch.equal(dequant.to(store_dtype), student_w.to(store_dtype)):
        diff = (dequant.float() - student_w.float()).abs().max().item() if dequant.shape == student_w.shape else None
        raise LoraTargetError(f"tensor {target.name}: the recipe re-applied to the source weight does not give the "
                              f"student's tensor (max |diff| {diff}); the student was not built from this source "
                              f"with this recipe, so its scales cannot be recovered")
