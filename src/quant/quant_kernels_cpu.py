"""The fused CPU quantization kernel (numba), kept apart so numba can cache it on disk.

Per tile of 8 groups while it sits in L1: absmax -> candidate scales rounded to fp16 -> error of each
candidate -> codes and dequant for the best. Every op is the IEEE fp32 op of the torch path in moe_quant
(`candidate_scales`, `quantize_groups`, `lane_sum`) and every sum runs in one written order (element i
of a group -> lane i % 8, lanes accumulated block by block, combined pairwise, the tail last), with no
fast-math. So the kernel and the torch path pick the same scales, write the same bytes and report the
same error sums, whichever process or CPU runs them. (A reassociated, fast-math sum once vectorized
differently in a freshly compiled kernel and in one loaded from numba's disk cache, so the reported error,
and on a near-tie the pick, depended on which process quantized a shard.)

Speed without reassociation comes from the layout: a tile is transposed so that the 8 lanes of 8 groups
are 64 independent accumulators side by side, which LLVM vectorizes as plain elementwise code.
Importing this module needs numba; moe_quant falls back to its torch path when the import fails.
"""
import math

import numba
import numpy as np

LANES = 8  # moe_quant.SUM_LANES: the torch path sums in the same lanes
TILE = 8  # groups quantized together (their lanes side by side)
W = LANES * TILE


@numba.njit(inline="always", cache=True)
def round_to_fp16(x):
    # Round-to-nearest-even onto the fp16 grid for 0 <= x <= 65504 (same result as a cast to fp16).
    if x == 0.0:
        return np.float32(0.0)
    if x < np.float32(6.103515625e-05):  # fp16 subnormal range: quantum 2^-24
        return np.float32(np.rint(x * np.float32(16777216.0)) * np.float32(5.9604644775390625e-08))
    m, e = math.frexp(x)  # x = m * 2^e, m in [0.5, 1): fp16 keeps 11 significant bits (all exact in fp64)
    return np.float32(math.ldexp(np.rint(m * 2048.0) / 2048.0, e))


@numba.njit(inline="always", cache=True)
def quant_sq_err(x, s, qmax):
    """(clamp(round(x / s)) * s - x)^2 for s > 0, with selects (not min/max) so LLVM can vectorize it."""
    q = np.rint(x / s)
    q = q if q > -qmax else -qmax
    q = q if q < qmax else qmax
    d = q * s - x
    return d * d


@numba.njit(inline="always", cache=True)
def combine_lanes(acc, t):
    """Pairwise sum of group t's 8 lane accumulators (acc[j * TILE + t])."""
    return (((acc[t] + acc[TILE + t]) + (acc[2 * TILE + t] + acc[3 * TILE + t]))
            + ((acc[4 * TILE + t] + acc[5 * TILE + t]) + (acc[6 * TILE + t] + acc[7 * TILE + t])))


@numba.njit(parallel=True, cache=True)
def fused_kernel(groups, ratios, qmax, codes, deq, chosen, err_out, ref_out):
    n_groups, width = groups.shape
    n_cand = ratios.shape[0]
    n_blocks = width // LANES
    full = n_blocks * LANES
    zero = np.float32(0.0)
    one = np.float32(1.0)
    for tile in numba.prange((n_groups + TILE - 1) // TILE):
        g0 = tile * TILE
        n_t = min(TILE, n_groups - g0)
        # buf[b * W + j * TILE + t] = element b * 8 + j of group g0 + t (zeros for missing groups)
        buf = np.zeros(n_blocks * W, np.float32)
        amax = np.zeros(TILE, np.float32)
        usable = np.zeros(TILE, np.bool_)
        for t in range(n_t):
            m = zero
            probe = zero  # becomes NaN if the group holds a NaN or an inf (x * 0)
            for i in range(width):
                x = groups[g0 + t, i]
                m = max(m, abs(x))
                probe += x * zero
            amax[t] = m
            usable[t] = probe == zero
            if not usable[t]:
                chosen[g0 + t] = np.float32(np.nan)  # the caller refuses the tensor
            for b in range(n_blocks):
                for j in range(LANES):
                    x = groups[g0 + t, b * LANES + j]
                    buf[b * W + j * TILE + t] = x if usable[t] else zero
        acc = np.zeros(W, np.float32)
        for b in range(n_blocks):
            for k in range(W):
                x = buf[b * W + k]
                acc[k] += x * x
        for t in range(n_t):
            r = combine_lanes(acc, t)
            for i in range(full, width):
                x = groups[g0 + t, i]
                r += x * x
            ref_out[g0 + t] = r
        best_err = np.full(TILE, np.inf, np.float32)
        best_s = np.zeros(TILE, np.float32)
        s_t = np.zeros(TILE, np.float32)
        s_lane = np.ones(W, np.float32)  # the scale each accumulator divides by (1 where the scale is 0)
        for c in range(n_cand - 1, -1, -1):  # absmax first; strict '<' keeps the larger ratio on ties
            for t in range(n_t):
                s_t[t] = round_to_fp16(np.float32(amax[t] * ratios[c]) / qmax) if usable[t] else zero
                safe = s_t[t] if s_t[t] > zero else one  # scale 0 <=> an all-zero group: codes and error are 0
                for j in range(LANES):
                    s_lane[j * TILE + t] = safe
            for k in range(W):
                acc[k] = zero
            for b in range(n_blocks):
                for k in range(W):
                    acc[k] += quant_sq_err(buf[b * W + k], s_lane[k], qmax)
            for t in range(n_t):
                if not usable[t]:
                    continue
                err = combine_lanes(acc, t)
                safe = s_lane[t]
                for i in range(full, width):
                    err += quant_sq_err(groups[g0 + t, i], safe, qmax)
                if err < best_err[t]:
                    best_err[t] = err
                    best_s[t] = s_t[t]
        for t in range(n_t):
            if not usable[t]:
                continue
            g = g0 + t
            s = best_s[t]
            chosen[g] = s
            err_out[g] = best_err[t]
            for i in range(width):
                q = min(max(np.rint(groups[g, i] / s), -qmax), qmax) if s > zero else zero
                codes[g, i] = np.int8(q)
                deq[g, i] = q * s
