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
GRIDS = ("sym", "full", "asym")


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
        """Bits stored once per group: the scale, plus the zero-point on the asym grid."""
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
