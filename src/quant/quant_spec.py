"""What one tensor's quantization is (bits, grid, group, clip search, scale dtype), without the math:
torch-free, so configs, plans, the footprint and `--help` can use it without loading torch. The math on
tensors is moe_quant.py; docs/QUANTIZE.md says why the grids are what they are.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

SCALE_BITS = {"float16": 16, "bfloat16": 16, "float32": 32}
SUPPORTED_BITS = (1.58, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 16.0)
TERNARY_BITS = 1.58
FLAT_GRIDS = ("sym", "full", "asym")
QK_K = 256


@dataclass(frozen=True)
class KType:
    """One of llama.cpp's two-level K-quant blocks (super-block of QK_K weights; gguf_grids.py has the math)."""

    name: str
    bits: int
    sub: int  # weights per sub-block
    lo: int  # code range
    hi: int
    sc_lo: int  # sub-scale range (Q4_K's mins: 0..sc_hi too)
    sc_hi: int
    sc_width: int  # bits a stored sub-scale (and min) takes
    has_min: bool

    @property
    def n_sub(self) -> int:
        return QK_K // self.sub

    @property
    def overhead_bits(self) -> int:
        """Bits per super-block beside the codes: fp16 d (+ fp16 dmin), the sub-scales (+ the mins)."""
        per = self.n_sub * self.sc_width
        return 16 + per + ((16 + per) if self.has_min else 0)


K_TYPES = {
    "Q3_K": KType("Q3_K", 3, 16, -4, 3, -32, 31, 6, False),
    "Q4_K": KType("Q4_K", 4, 32, 0, 15, 0, 63, 6, True),
    "Q5_K": KType("Q5_K", 5, 32, 0, 31, 0, 63, 6, True),
    "Q6_K": KType("Q6_K", 6, 16, -32, 31, -128, 127, 8, False),
}
# llama.cpp's legacy 32-blocks ARE the `full` grid at group 32 (d * q, codes [-2^(b-1), 2^(b-1) - 1]): aliases
LEGACY_TYPES = {"Q4_0": 4, "Q5_0": 5, "Q8_0": 8}
# a row that 256 does not divide -> llama-quantize's own fallback type, a legacy block (gguf_types.SHAPE_FALLBACK);
# Q5_K's is Q5_1 there (d * q + m, no grid of ours): Q5_0 here, the same 5-bit codes without the offset
K_FALLBACK = {"Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_0", "Q6_K": "Q8_0"}
GGUF_PREFIX = "gguf:"
# "gguf:K": the K-quant family, the type picked by each tensor's bits, so roles (--role-bits) and a bits plan mix
# types as llama.cpp's Q*_K_M recipes do; nominal group 256 (a Q8_0 tensor is then stored in its blocks of 32)
K_FAMILY = GGUF_PREFIX + "K"
K_FAMILY_TYPES = {3: "Q3_K", 4: "Q4_K", 5: "Q5_K", 6: "Q6_K", 8: "Q8_0"}
GRIDS = FLAT_GRIDS + tuple(GGUF_PREFIX + t for t in (*LEGACY_TYPES, *K_TYPES)) + (K_FAMILY,)


def gguf_type(grid: str) -> str | None:
    """'gguf:Q4_K' -> 'Q4_K'; None for a flat grid."""
    return grid[len(GGUF_PREFIX):] if grid.startswith(GGUF_PREFIX) else None


def gguf_bits_group(grid: str) -> tuple[int, int]:
    """The (bits, group) a gguf:TYPE grid implies."""
    t = gguf_type(grid)
    if grid == K_FAMILY:
        return 0, QK_K
    return (K_TYPES[t].bits, QK_K) if t in K_TYPES else (LEGACY_TYPES[t], 32)


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized. bits=16 means: leave it untouched."""

    bits: float
    group: int = 128
    clip_steps: int = 16
    clip_lo: float = 0.65
    scale_dtype: str = "float16"  # the stored scale dtype, by torch name
    chunk_groups: int = 1 << 15  # groups per work chunk: bounds the fp32 temporaries (~40 MiB at g128)
    grid: str = "sym"
    fallback_from: str = ""  # e.g. "gguf:Q4_K": this spec replaces that grid for a row 256 does not divide

    def __post_init__(self):
        bits = float(self.bits)
        if not any(math.isclose(bits, b) for b in SUPPORTED_BITS):
            raise ValueError(f"bits must be one of {list(SUPPORTED_BITS)}, got {self.bits}")
        if self.grid not in GRIDS:
            raise ValueError(f"unknown grid {self.grid!r}; known grids: {', '.join(GRIDS)}")
        if not isinstance(self.group, int) or self.group <= 0:
            raise ValueError(f"group must be a positive integer, got {self.group!r}")
        if not isinstance(self.clip_steps, int) or self.clip_steps < 0:
            raise ValueError(f"clip_steps must be an integer >= 0 (0 = absmax), got {self.clip_steps!r}")
        if not 0.0 < self.clip_lo <= 1.0:
            raise ValueError(f"clip_lo must be in (0, 1], got {self.clip_lo}")
        if self.chunk_groups <= 0:
            raise ValueError(f"chunk_groups must be > 0, got {self.chunk_groups}")
        if self.is_identity:
            return
        if self.grid == K_FAMILY:
            if bits not in K_FAMILY_TYPES or self.group != QK_K:
                raise ValueError(f"grid {K_FAMILY} picks llama.cpp's type by bits ("
                                 f"{', '.join(f'{b} {t}' for b, t in K_FAMILY_TYPES.items())}) with group {QK_K}; "
                                 f"got bits={bits:g}, group={self.group}")
            t = K_FAMILY_TYPES[int(bits)]
            object.__setattr__(self, "grid", GGUF_PREFIX + t)
            if t in LEGACY_TYPES:
                object.__setattr__(self, "group", 32)
        if gguf_type(self.grid):
            self._check_gguf(bits)
            if gguf_type(self.grid) in LEGACY_TYPES:
                object.__setattr__(self, "grid", "full")  # the same grid exactly; the exporter writes it as TYPE
                return
        if math.isclose(bits, TERNARY_BITS) and self.grid != "sym":
            raise ValueError(f"bits=1.58 is the ternary grid {{-1, 0, 1}} (grid 'sym'); grid {self.grid!r} "
                             f"has 2^bits levels: use bits=2 with it")
        if bits == 2.0 and self.grid == "sym":
            raise ValueError("bits=2 on the symmetric grid has only 3 levels ({-1, 0, 1}: ternary, worth "
                             "log2(3) bits): use grid='full' or grid='asym' for 4 levels, or bits=1.58 for ternary")
        if self.scale_dtype not in SCALE_BITS:
            raise ValueError(f"scale_dtype must be one of {sorted(SCALE_BITS)}, got {self.scale_dtype!r}")
        if self.grid != "sym" and self.scale_dtype != "float16":
            raise ValueError(f"grid {self.grid!r} stores fp16 scales; got scale_dtype {self.scale_dtype}")

    def _check_gguf(self, bits: float) -> None:
        want_bits, want_group = gguf_bits_group(self.grid)
        if bits != want_bits or self.group != want_group:
            raise ValueError(f"grid {self.grid} is llama.cpp's {gguf_type(self.grid)} block: {want_bits}-bit codes in "
                             f"blocks of {want_group}; got bits={bits:g}, group={self.group} (set the bits of every "
                             f"role on this grid to {want_bits} and --group {want_group})")
        if self.scale_dtype != "float16":
            raise ValueError(f"grid {self.grid} stores fp16 scales; got scale_dtype {self.scale_dtype}")

    @property
    def k_type(self) -> KType | None:
        """The K-quant block of a gguf:Q*_K grid, else None."""
        return K_TYPES.get(gguf_type(self.grid) or "")

    @property
    def is_identity(self) -> bool:
        return float(self.bits) >= 16.0

    @property
    def qmax(self) -> int:
        """Largest positive code (sym: also the largest magnitude)."""
        return qmax_for_bits(self.bits)

    @property
    def code_range(self) -> tuple[int, int]:
        """(lowest, highest) stored code: sym [-qmax, qmax]; full and asym [-2^(b-1), 2^(b-1) - 1]."""
        if self.grid == "sym":
            return -self.qmax, self.qmax
        if self.k_type:
            return self.k_type.lo, self.k_type.hi
        half = 2 ** (int(self.bits) - 1)
        return -half, half - 1

    @property
    def levels(self) -> int:
        """Distinct codes a group can use: sym 2^b - 1 (ternary 3), full and asym 2^b."""
        lo, hi = self.code_range
        return hi - lo + 1

    @property
    def code_bits(self) -> float:
        """Bits a packer spends per code: log2(3) for ternary, else the integer width."""
        return math.log2(3) if math.isclose(float(self.bits), TERNARY_BITS) else float(self.bits)

    @property
    def zero_bits(self) -> int:
        """Bits per group for the zero-point (asym: an integer code, stored at the code width)."""
        return int(self.bits) if self.grid == "asym" else 0

    @property
    def group_overhead_bits(self) -> int:
        """Bits stored once per group: the scale, plus the zero-point on the asym grid (a K-quant: per super-block
        its fp16 d (and dmin) and the 6/8-bit sub-scales (and mins))."""
        if self.k_type:
            return self.k_type.overhead_bits
        return SCALE_BITS[self.scale_dtype] + self.zero_bits

    @property
    def stored_bits_per_weight(self) -> float:
        """Bits a packer spends per weight, scale and zero-point overhead included (what the footprint counts)."""
        if self.is_identity:
            return 16.0
        return self.code_bits + self.group_overhead_bits / self.group


def qmax_for_bits(bits: float) -> int:
    """Largest positive code: int3 -> 3 (sym: 7 levels), int4 -> 7; ternary and int2 -> 1."""
    bits = float(bits)
    if math.isclose(bits, TERNARY_BITS) or bits == 2.0:
        return 1
    return 2 ** (int(bits) - 1) - 1
