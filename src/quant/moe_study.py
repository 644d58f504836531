"""The students of the allocation study: what a bits plan makes of a MoE's routed experts.

A plan (moe_alloc) says which level each expert takes; StudentBuilder fake-quantizes every layer's fused
expert tensors once per level (moe_quant's own math) and writes a plan into a loaded model by slice copies,
so one model load serves every student. The measurement (teacher cache, KL per student, the report) is
src/eval/fidelity_study.py; this module is the quantization side and imports nothing from eval.
"""
from __future__ import annotations

import time

import torch

import moe_alloc
import moe_quant


class StudyError(RuntimeError):
    pass


def fused_experts(model: torch.nn.Module) -> dict:
    """{layer: experts module with 3-D gate_up_proj [E, 2I, H] and down_proj [E, H, I]} (transformers v5)."""
    out = {}
    for name, mod in model.named_modules():
        if name.endswith("mlp.experts") and hasattr(mod, "gate_up_proj") and hasattr(mod, "down_proj"):
            layer = next(int(p) for p in name.split(".") if p.isdigit())
            out[layer] = mod
    if not out:
        raise StudyError("no fused experts modules (mlp.experts.gate_up_proj) in this model")
    return out


def unit_bits(plan: dict, units: dict) -> dict:
    """Plan tensors -> {(layer, expert): bits}; every part of one expert must have the same bits here."""
    moe_alloc.validate_plan(plan, unit_shapes(units))
    out = {}
    for key, u in units.items():
        seen = set()
        for name, _, _, fused in u.parts:
            b = plan["tensors"].get(name)
            if b is None:
                raise StudyError(f"the plan has no bits for {name}")
            seen.add(float(b[key[1]] if fused else b))
        if len(seen) != 1:
            raise StudyError(f"expert {key}: its tensors have different bits {sorted(seen)} (the in-memory "
                             f"builder quantizes gate/up/down of one expert alike)")
        out[key] = seen.pop()
    return out


def unit_shapes(units: dict) -> dict:
    """{tensor name: (on-disk shape, None)} of the expert tensors (fused ones regain their [E] axis)."""
    shapes, n_fused = {}, {}
    for u in units.values():
        for name, shape, _, fused in u.parts:
            shapes[name] = tuple(shape)
            if fused:
                n_fused[name] = n_fused.get(name, 0) + 1
    return {n: (((n_fused[n],) + s) if n in n_fused else s, None) for n, s in shapes.items()}


class StudentBuilder:
    """Keeps the source expert weights and their fake-quant per level; writes a plan into the model.

    Each layer's fused expert tensors are fake-quantized once per level in one call (groups run along the
    last axis, row by row, so a slice of the layer result equals the slice quantized alone); a plan only
    says which level each expert takes, so building a student is 2 x E slice copies per layer."""

    def __init__(self, model: torch.nn.Module, group: int, grid: str):
        self.experts = fused_experts(model)
        self.source = {l: (m.gate_up_proj.detach().clone(), m.down_proj.detach().clone())
                       for l, m in self.experts.items()}
        self.group, self.grid = group, grid
        self.cache: dict = {}  # (layer, bits) -> (gate_up [E, 2I, H], down [E, H, I]) in the model's dtype

    def layer_at(self, layer: int, bits: float) -> tuple:
        key = (layer, float(bits))
        if key not in self.cache:
            gu, dn = self.source[layer]
            if bits >= 16:
                self.cache[key] = (gu, dn)
            else:
                spec = moe_quant.QuantSpec(bits=float(bits), group=self.group, grid=self.grid)
                # the torch path (bit-identical to the numba kernel): the kernel's OpenMP pool keeps spinning
                # after it returns and made every later forward of this process ~10x slower on 2 cores
                self.cache[key] = tuple(moe_quant.quantize_tensor(t.float(), spec, -1, use_kernel=False,
                                                                  return_codes=False).dequant.to(t.dtype)
                                        for t in (gu, dn))
        return self.cache[key]

    def prepare(self, levels: list) -> float:
        """Fake-quantize every layer at every level up front (progress bar); returns the seconds it took."""
        from tqdm import tqdm

        t0 = time.time()
        for layer in tqdm(sorted(self.source), desc="quantize levels", unit="layer", leave=False):
            for b in levels:
                self.layer_at(layer, b)
        return time.time() - t0

    @torch.no_grad()
    def apply(self, bits: dict) -> None:
        for (layer, expert), b in bits.items():
            gu, dn = self.layer_at(layer, float(b))
            self.experts[layer].gate_up_proj[expert].copy_(gu[expert])
            self.experts[layer].down_proj[expert].copy_(dn[expert])

    @torch.no_grad()
    def restore(self) -> None:
        for l, m in self.experts.items():
            m.gate_up_proj.copy_(self.source[l][0])
            m.down_proj.copy_(self.source[l][1])


def default_budgets(units: dict, group: int, grid: str) -> list[float]:
    """The cost of uniform int3, and the midpoint of uniform int2 and int3 (effective bits, scales counted)."""
    params = sum(u.params for u in units.values())
    cost = {b: sum(u.bits_at(b, group, grid) for u in units.values()) / params for b in (2.0, 3.0)}
    return [round((cost[2.0] + cost[3.0]) / 2, 4), round(cost[3.0], 4)]
