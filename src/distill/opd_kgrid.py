"""OPD's fake quantizer on llama.cpp's two-level K grids (gguf:Q3_K / Q4_K / Q5_K / Q6_K, and gguf:K's mix),
with the build's super-block scales, sub-scales and sub-mins FIXED: only the codes move.

Per sub-block j of a super-block the store decodes (gguf_grids.decode, gguf-py's order, fp32):

    Q4_K / Q5_K:  w = (d * sc_j) * q - (dmin * m_j)      q in [0, 15] / [0, 31]
    Q3_K / Q6_K:  w = (d * sc_j) * q                     q in [-4, 3] / [-32, 31], signed sc_j

so with the effective scale S_j = d * sc_j and offset O_j = dmin * m_j (gguf_grids.effective's products) the
fixed-grid rounding is gguf_grids.assign_codes + dequant, element for element: (x + O) / S, round half-even,
clamp to the type's codes, + 0.0 (a rounded -0 is the stored code 0), * S, - O; a sub-block with S = 0 decodes
to 0 - O whatever its code (its code is 0). Q(student) is therefore the store's decode bit for bit (test).

Why the parts are held compactly (fp32 d per super-block, int8 sc/m per sub-block) and S, O are formed per
call: the grid is replicated on every rank (the fake quantizer runs on the gathered weight), and fp32 S and
its divisor per 16 weights would be 0.5 byte per weight, ~55 GiB per rank at the 122B; int8 sub-scales are
1/16 byte. Forming S for the tensor at hand is one multiply per 16 weights, next to ~7 passes over the
weights themselves. A tensor whose slices mix K types (a bits plan on gguf:K) is held at the finest sub-block
(16): a 32-wide sub-block's scale is repeated, which changes no product.
"""
from __future__ import annotations

import copy

import torch

import store_pack
from quant_spec import K_TYPES, QK_K, KType, gguf_type


class KGridError(ValueError):
    """A K-grid store entry this fake quantizer cannot express (one line, naming the entry)."""


def entry_type(info: dict) -> KType | None:
    """The K type of a store entry, None for a flat-grid entry (sym/full/asym, legacy blocks, fallbacks)."""
    if "sub" not in info:
        return None
    t = gguf_type(info.get("grid", "")) or ""
    if t not in K_TYPES:
        raise KGridError(f"grid {info.get('grid')!r} has sub-blocks but is no K type this code knows "
                         f"({', '.join(K_TYPES)})")
    return K_TYPES[t]


def entry_params(key: str, info: dict, parts: dict):
    """(KType, d fp32 [*lead, n_super], sc int16 [*lead, n_sub_total], dmin or None, m or None) of one K entry,
    contraction axis last; every part checked against the type (a planted or damaged part is refused)."""
    kt = entry_type(info)
    shape, axis = list(info["shape"]), int(info["axis"])
    lead, k = shape[:axis] + shape[axis + 1:], shape[axis]
    want = {"group": QK_K, "sub": kt.sub, "lo": kt.lo, "hi": kt.hi, "sub_width": kt.sc_width, "sub_lo": kt.sc_lo}
    bad = {f: info.get(f) for f, v in want.items() if info.get(f) != v}
    if bad:
        raise KGridError(f"store entry {key}: {kt.name} needs {want}, the entry says {bad}")
    if k % QK_K:
        raise KGridError(f"store entry {key}: rows of {k} weights on {kt.name}'s {QK_K}-blocks")
    n_super = k // QK_K
    need = ("scales", "sub_scales") + (("dmin", "sub_mins") if kt.has_min else ())
    extra = ("dmin", "sub_mins") if not kt.has_min else ()
    missing = [p for p in need if p not in parts]
    unexpected = [p for p in extra if p in parts]
    if missing or unexpected:
        raise KGridError(f"store entry {key}: {kt.name} parts {list(need)}; missing {missing}, not expected {unexpected}")
    for p in ("scales", "dmin") if kt.has_min else ("scales",):
        t = parts[p]
        if t.dtype != torch.float16 or list(t.shape) != [*lead, n_super]:
            raise KGridError(f"store entry {key}: part {p} is {t.dtype} {list(t.shape)}, {kt.name} stores float16 "
                             f"{[*lead, n_super]}")
        if not bool(torch.isfinite(t).all()):
            raise KGridError(f"store entry {key}: part {p} holds non-finite super-block scales")
    try:
        sc = store_pack.unpacked_sub(parts, info)
        m = store_pack.unpacked_sub(parts, info, "sub_mins")
    except ValueError as e:
        raise KGridError(f"store entry {key}: {e}") from None
    d = parts["scales"].float()
    dmin = parts["dmin"].float() if kt.has_min else None
    return kt, d, sc, dmin, m


class KFixedGrid:
    """One tensor's fixed K grid (contraction axis last): `quantize_` is Q(x) as the store decodes it, `codes_`
    the codes the store would hold (module docstring). Interface of lora_quant.FixedGrid (select, to, scale)."""

    PER_GROUP = ("d", "sc", "dmin", "m", "lo", "hi")

    def __init__(self, d: torch.Tensor, sc: torch.Tensor, dmin: torch.Tensor | None, m: torch.Tensor | None,
                 gran: int, code_range: tuple):
        """d, dmin: fp32 [*lead, n_super]; sc, m: integer [*lead, n_super * QK_K / gran]; code_range: (lo, hi)
        numbers, or per-row tensors [*lead, 1] when slices (experts) of one weight have different K types: one
        value per row, not per sub-block (fp32 per 16 weights would be 0.5 B per weight on every rank)."""
        if sc.shape[-1] * gran != d.shape[-1] * QK_K or sc.shape[:-1] != d.shape[:-1]:
            raise KGridError(f"sub-scales {list(sc.shape)} at {gran} weights do not fit super-blocks {list(d.shape)}")
        self.gran = gran
        self.d = d.float().contiguous()
        self.sc = sc.to(torch.int8).contiguous()
        self.dmin = None if dmin is None else dmin.float().contiguous()
        self.m = None if m is None else m.to(torch.int8).contiguous()
        self.lo, self.hi = code_range
        if isinstance(self.lo, torch.Tensor):
            self.lo, self.hi = (t.float().reshape(*sc.shape[:-1], 1).contiguous() for t in (self.lo, self.hi))

    @property
    def scale(self) -> torch.Tensor:  # the tensor callers check the device of (lora_experts, QuantLora)
        return self.d

    def record(self) -> dict[str, torch.Tensor]:
        """The fixed grid as stored in the adapter file: fp16 d (`scales`), dmin, int8 sub-scales and mins."""
        out = {"scales": self.d.to(torch.float16), "sub_scales": self.sc}
        if self.dmin is not None:
            out.update(dmin=self.dmin.to(torch.float16), sub_mins=self.m)
        return out

    def select(self, e: int) -> "KFixedGrid":
        """Expert e of a fused [E, out, in] weight (views)."""
        out = copy.copy(self)
        for name in self.PER_GROUP:
            if isinstance(getattr(self, name), torch.Tensor):
                setattr(out, name, getattr(self, name)[e])
        return out

    def to(self, device) -> "KFixedGrid":
        for name in self.PER_GROUP:
            if isinstance(getattr(self, name), torch.Tensor):
                setattr(self, name, getattr(self, name).to(device))
        return self

    def effective(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(S, O) per sub-block [*lead, n_sub] fp32: d * sc and dmin * m, gguf_grids.effective's products."""
        per = self.sc.shape[-1] // self.d.shape[-1]
        s = self.d.repeat_interleave(per, dim=-1) * self.sc.float()
        o = None if self.m is None else self.dmin.repeat_interleave(per, dim=-1) * self.m.float()
        return s, o

    def _codes(self, x: torch.Tensor):
        """x -> its codes in place (floats); returns (sub-block view, S, O, zero-scale mask or None)."""
        if x.shape[-1] != self.sc.shape[-1] * self.gran or x.shape[:-1] != self.sc.shape[:-1]:
            raise KGridError(f"a weight {list(x.shape)} does not fit this grid's sub-scales {list(self.sc.shape)} "
                             f"x {self.gran}")
        s, o = self.effective()
        zero = s == 0
        safe = torch.where(zero, torch.ones_like(s), s)
        v = x.unflatten(-1, (s.shape[-1], self.gran))
        if o is not None:
            v.add_(o[..., None])
        lo, hi = (self.lo[..., None], self.hi[..., None]) if isinstance(self.lo, torch.Tensor) else (self.lo, self.hi)
        v.div_(safe[..., None]).round_().clamp_(lo, hi).add_(0.0)  # + 0.0: a rounded -0 is the stored code 0
        return v, s, o, (zero if bool(zero.any()) else None)

    def codes_(self, x: torch.Tensor) -> torch.Tensor:
        """x (fp32, contraction axis last) -> its codes on this grid, in place (a zero-scale sub-block: 0)."""
        v, _, _, zero = self._codes(x)
        if zero is not None:
            v.masked_fill_(zero[..., None], 0.0)
        return x

    def quantize_(self, x: torch.Tensor) -> torch.Tensor:
        """x (fp32, contraction axis last) -> Q(x) in place, the store's decode of its codes; returns x."""
        v, s, o, zero = self._codes(x)
        v.mul_(s[..., None])
        if o is not None:
            v.sub_(o[..., None])
        if zero is not None:  # code 0: (0 * 0) - O
            fill = torch.zeros_like(s) if o is None else torch.zeros_like(s) - o
            v.copy_(torch.where(zero[..., None], fill[..., None], v))
        return x


def entry_grid(key: str, info: dict, parts: dict) -> KFixedGrid:
    """The fixed grid of one K store entry, its contraction axis last (the merge's grid)."""
    kt, d, sc, dmin, m = entry_params(key, info, parts)
    return KFixedGrid(d, sc, dmin, m, kt.sub, (kt.lo, kt.hi))
