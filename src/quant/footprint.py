"""Bit accounting: what a recipe costs once packed, per role, with the scale overhead counted exactly.

Pure arithmetic on shapes and QuantSpecs, shared by the builder's `_ptq_meta.json` and `--dry-run`
so the footprint printed before a 20-hour build is the one recorded after it. A quantized tensor
costs code bits per weight plus, per group, one fp16 scale (and on the asym grid one zero-point at the
code width), where a row of K inputs has ceil(K / group) groups (the tail group has its own scale); a
tensor left alone costs its source dtype's bits. The grid and group decide the cost, never the method
(clip, gptq, ... all write the same codes + scales), so a recipe's effective bits do not change with
the method. The one method-specific extra, AWQ's per-input-channel scale, is `method_overhead_bits`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import quant_spec

# safetensors dtype strings -> bits per element
DTYPE_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8,
              "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U64": 64,
              "U32": 32, "U16": 16, "U8": 8, "BOOL": 8}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})  # quantizable sources (fp8/fp4 need their scales)
GB, GIB = 10**9, 2**30


def dtype_bits(dtype: str) -> int:
    if dtype not in DTYPE_BITS:
        raise ValueError(f"unknown safetensors dtype {dtype!r}; known: {sorted(DTYPE_BITS)}")
    return DTYPE_BITS[dtype]


def code_bits(spec: quant_spec.QuantSpec) -> float:
    """Bits per code: log2(3) for ternary, else the integer width."""
    return spec.code_bits


def n_scale_groups(shape, axis: int, group: int) -> int:
    """Number of scales for a tensor grouped along `axis` (each row: ceil(K / group))."""
    shape = tuple(int(s) for s in shape)
    k = shape[axis % len(shape)]
    rows = math.prod(shape) // k if k else 0
    return rows * math.ceil(k / group)


def packed_bits(shape, axis: int, spec: quant_spec.QuantSpec) -> float:
    """Exact packed size in bits: codes + per group one scale (+ one zero-point on the asym grid)."""
    numel = math.prod(int(s) for s in shape)
    return numel * code_bits(spec) + n_scale_groups(shape, axis, spec.group) * spec.group_overhead_bits


def method_overhead_bits(shape, axis: int, method: str, matrix_ndim: int = 2) -> int:
    """Bits a method stores beyond codes + group scales: AWQ keeps one fp16 scale per input channel of
    each matrix (a fused 3-D expert tensor [E, ..] has E matrices; a real deployment folds it into the
    previous op when it can, a per-expert one on a shared input it cannot). Every other method: 0."""
    if method != "awq":
        return 0
    shape = tuple(int(s) for s in shape)
    matrices = math.prod(shape[:len(shape) - matrix_ndim]) if len(shape) > matrix_ndim else 1
    return matrices * shape[axis % len(shape)] * 16


@dataclass
class RoleTally:
    """Running totals for one role (a local accumulator; `add` returns nothing, `merge` combines)."""

    tensors: int = 0
    params: int = 0
    quantized_tensors: int = 0
    quantized_params: int = 0
    source_bits: float = 0.0
    packed_bits: float = 0.0
    quantized_packed_bits: float = 0.0
    sq_err: float = 0.0
    sq_ref: float = 0.0
    bits: set = field(default_factory=set)

    def add(self, shape, dtype: str, spec: quant_spec.QuantSpec | None, axis: int | None,
            sq_err: float = 0.0, sq_ref: float = 0.0) -> None:
        numel = math.prod(int(s) for s in shape)
        src = numel * dtype_bits(dtype)
        self.tensors += 1
        self.params += numel
        self.source_bits += src
        if spec is None:
            self.packed_bits += src
            self.bits.add(float(dtype_bits(dtype)))
        else:
            self.quantized_tensors += 1
            self.quantized_params += numel
            q_bits = packed_bits(shape, axis, spec)
            self.packed_bits += q_bits
            self.quantized_packed_bits += q_bits
            self.bits.add(float(spec.bits))
            self.sq_err += sq_err
            self.sq_ref += sq_ref

    def merge(self, other: "RoleTally") -> None:
        for name in ("tensors", "params", "quantized_tensors", "quantized_params", "source_bits", "packed_bits",
                     "quantized_packed_bits", "sq_err", "sq_ref"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.bits |= other.bits

    def to_dict(self) -> dict:
        return {"tensors": self.tensors, "params": self.params, "quantized_tensors": self.quantized_tensors,
                "quantized_params": self.quantized_params, "source_bits": self.source_bits,
                "packed_bits": self.packed_bits, "quantized_packed_bits": self.quantized_packed_bits, "sq_err": self.sq_err, "sq_ref": self.sq_ref,
                "bits": sorted(self.bits)}

    @classmethod
    def from_dict(cls, d: dict) -> "RoleTally":
        return cls(**{**{k: d[k] for k in d if k != "bits"}, "bits": set(d["bits"])})


def summarize(tallies: dict[str, RoleTally]) -> dict:
    """Per-role and total footprint: effective bits (scale overhead included), GB/GiB, relative MSE."""
    roles = {}
    for role in sorted(tallies):
        t = tallies[role]
        roles[role] = {
            "tensors": t.tensors, "params": t.params,
            "quantized_tensors": t.quantized_tensors, "quantized_params": t.quantized_params,
            "bits": sorted(t.bits),
            "effective_bits": t.packed_bits / t.params if t.params else 0.0,
            "packed_GiB": t.packed_bits / 8 / GIB,
            "rel_mse": t.sq_err / t.sq_ref if t.sq_ref > 0 else None,
        }
    params = sum(t.params for t in tallies.values())
    qparams = sum(t.quantized_params for t in tallies.values())
    packed = sum(t.packed_bits for t in tallies.values())
    source = sum(t.source_bits for t in tallies.values())
    q_packed = sum(t.quantized_packed_bits for t in tallies.values())
    total = {
        "params": params, "quantized_params": qparams,
        "effective_bits": packed / params if params else 0.0,
        "effective_bits_quantized": q_packed / qparams if qparams else None,
        "packed_bytes": packed / 8, "packed_GB": packed / 8 / GB, "packed_GiB": packed / 8 / GIB,
        "source_bytes": source / 8, "source_GB": source / 8 / GB, "source_GiB": source / 8 / GIB,
        "compression": source / packed if packed else None,
    }
    return {"roles": roles, "total": total}


def human_bytes(n: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def format_table(summary: dict) -> str:
    """Human-readable per-role footprint table (for --dry-run and logs)."""
    lines = [f"{'role':<17}{'tensors':>8}{'params':>16}{'quantized':>16}{'bits':>8}{'eff.bits':>9}{'packed':>12}"]
    for role, r in summary["roles"].items():
        bits = "/".join(f"{b:g}" for b in r["bits"])
        lines.append(f"{role:<17}{r['tensors']:>8}{r['params']:>16,}{r['quantized_params']:>16,}{bits:>8}"
                     f"{r['effective_bits']:>9.3f}{human_bytes(r['packed_GiB'] * GIB):>12}")
    t = summary["total"]
    eq = t["effective_bits_quantized"]
    lines.append(f"{'TOTAL':<17}{'':>8}{t['params']:>16,}{t['quantized_params']:>16,}{'':>8}"
                 f"{t['effective_bits']:>9.3f}{human_bytes(t['packed_bytes']):>12}")
    lines.append(f"packed {t['packed_GB']:.3f} GB = {t['packed_GiB']:.3f} GiB (source {t['source_GB']:.3f} GB, "
                 f"x{t['compression'] or 0:.2f} smaller); quantized weights: "
                 f"{'n/a' if eq is None else f'{eq:.3f}'} bits/weight incl. scales")
    return "\n".join(lines)
