"""What every grid's quantizer returns (`QuantResult`) and the fixed-order sums its reported errors use: shared
by the plain grids (moe_quant.py) and llama.cpp's K grids (gguf_grids.py), so neither imports the other's math."""
from __future__ import annotations

from typing import NamedTuple

import torch


class QuantResult(NamedTuple):
    dequant: torch.Tensor  # same shape/dtype as the input
    codes: torch.Tensor  # int8, same shape as the input (empty when return_codes=False)
    scales: torch.Tensor  # scale_dtype: the input's other axes, then n_groups last
    sq_err: float = 0.0  # sum of (dequant_fp32 - w)^2, before rounding to the output dtype (fp32 per group, fp64 total)
    sq_ref: float = 0.0  # sum of w^2: sq_err / sq_ref is the relative error the builder reports
    zeros: torch.Tensor | None = None  # asym grid: int8 zero-points shaped like scales; dequant = (code - zero) * scale
    in_scale: torch.Tensor | None = None  # awq: per-input-channel scale s; dequant = ((code - zero) * scale) / s
    # gguf:Q*_K grids (gguf_grids.py): scales is the fp16 super-block d [*lead, n_super]; the 256-blocks' sub-scales
    # (and Q4_K's fp16 dmin and 6-bit mins) are [*lead, n_super * n_sub] int16; dequant = (d * sc) * q - dmin * m
    dmin: torch.Tensor | None = None
    sub_scales: torch.Tensor | None = None
    sub_mins: torch.Tensor | None = None


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


def fixed_order_total(per_group: torch.Tensor) -> float:
    """fp64 total of per-group fp32 sums, in an order that depends on nothing but the values (numpy's
    pairwise sum; torch's CPU reduction splits by thread count and SIMD width)."""
    return float(per_group.detach().to("cpu", torch.float64).numpy().sum())
