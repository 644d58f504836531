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
The other grids ("full", "asym") and importance-weighted searches (wclip, GPTQ's group scales) run in
`grid_kernel` (one group per iteration, the same lane-order sums as moe_quant.search_grid, so again the
same bytes as the torch path), and GPTQ in `gptq_rows_kernel` (row-parallel: GPTQ never mixes rows).
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


# ------------------------------------------------------------------ every grid, optionally weighted
GRID_SYM, GRID_FULL, GRID_ASYM = 0, 1, 2


@numba.njit(inline="always", cache=True)
def round_to_fp16_signed(x):
    return round_to_fp16(x) if x >= 0 else -round_to_fp16(-x)


@numba.njit(inline="always", cache=True)
def grid_code(x, s, z, use_z, lo, hi):
    """moe_quant.grid_codes for one value (s != 0): round(x / s) (+ zero on the asym grid), clamped to
    [lo, hi] (a zero is added only where torch adds it: -0.0 + 0.0 would turn a -0 code into +0)."""
    q = np.rint(x / s)
    if use_z:
        q = q + z
    q = q if q > lo else lo
    return q if q < hi else hi


@numba.njit(inline="always", cache=True)
def lane_total(acc, n_blocks):
    if n_blocks == 0:
        return np.float32(0.0)
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))


@numba.njit(cache=True)
def best_candidate(vals, imp, weighted, ratios, grid, lo, hi):
    """moe_quant.search_grid for one fp32 group `vals` -> (scale, zero): the same candidates, the same fp32
    ops and lane-order sums, ties to the later candidate. Returns NaN as the scale for a non-finite group."""
    width = vals.shape[0]
    n_r = ratios.shape[0]
    n_blocks = width // LANES
    full = n_blocks * LANES
    zero = np.float32(0.0)
    lo32, hi32 = np.float32(lo), np.float32(hi)
    fam = 2 if (grid == GRID_FULL and n_r > 1) else 1
    use_z = grid == GRID_ASYM
    amax = zero
    vmin = zero
    vmax = zero
    probe = zero
    for i in range(width):
        x = vals[i]
        probe += x * zero
        amax = max(amax, abs(x))
        vmin = x if x < vmin else vmin
        vmax = x if x > vmax else vmax
    if probe != zero:
        return np.float32(np.nan), zero
    best_err = np.float32(np.inf)
    best_s = zero
    best_z = zero
    acc = np.zeros(LANES, np.float32)
    for c in range(fam * n_r - 1, -1, -1):  # the last candidate first; strict '<' keeps later ones on ties
        r = ratios[c % n_r]
        z = zero
        if grid == GRID_SYM:
            s = round_to_fp16(np.float32(amax * r) / hi32)
        elif grid == GRID_FULL:
            den = -lo32 if c < n_r else (hi32 if hi > 0 else np.float32(1.0))
            sign = np.float32(-1.0) if (vmax >= -vmin and vmax > zero) else np.float32(1.0)
            s = sign * round_to_fp16(np.float32(amax * r) / den)
        else:
            span = np.float32(np.float32(vmax - vmin) * r)
            s = round_to_fp16(span / np.float32(hi - lo))
            if s != zero:
                z = np.rint(-np.float32(vmin * r) / s) + lo32
                z = z if z > lo32 else lo32
                z = z if z < hi32 else hi32
        for j in range(LANES):
            acc[j] = zero
        total = zero
        for i in range(width):
            x = vals[i]
            if s != zero:
                d = (grid_code(x, s, z, use_z, lo32, hi32) - z) * s - x
            else:
                d = zero - x
            e = d * d
            if weighted:
                e = e * imp[i]
            if i < full:
                acc[i % LANES] += e
            else:
                if i == full:
                    total = lane_total(acc, n_blocks)
                total += e
        if full == width:
            total = lane_total(acc, n_blocks)
        if total < best_err:
            best_err = total
            best_s = s
            best_z = z
    return best_s, best_z


@numba.njit(parallel=True, cache=True)
def grid_kernel(groups, importance, weighted, ratios, grid, lo, hi, codes, deq, chosen, zeros, err_out, ref_out):
    """moe_quant.search_grid + the result, per group (parallel over groups); bit-identical to the torch path."""
    n_groups, width = groups.shape
    n_blocks = width // LANES
    full = n_blocks * LANES
    zero = np.float32(0.0)
    lo32, hi32 = np.float32(lo), np.float32(hi)
    use_z = grid == GRID_ASYM
    for gi in numba.prange(n_groups):
        best_s, best_z = best_candidate(groups[gi], importance[gi] if weighted else importance[0], weighted,
                                        ratios, grid, lo, hi)
        chosen[gi] = best_s
        zeros[gi] = best_z
        if best_s != best_s:
            continue  # NaN: the caller refuses the tensor
        acc = np.zeros(LANES, np.float32)
        ref = np.zeros(LANES, np.float32)
        e_tot = zero
        r_tot = zero
        for i in range(width):
            x = groups[gi, i]
            q = grid_code(x, best_s, best_z, use_z, lo32, hi32) if best_s != zero else best_z
            codes[gi, i] = np.int8(q)
            v = (q - best_z) * best_s
            deq[gi, i] = v
            d = v - x
            if i < full:
                acc[i % LANES] += d * d
                ref[i % LANES] += x * x
            else:
                if i == full:
                    e_tot = lane_total(acc, n_blocks)
                    r_tot = lane_total(ref, n_blocks)
                e_tot += d * d
                r_tot += x * x
        if full == width:
            e_tot = lane_total(acc, n_blocks)
            r_tot = lane_total(ref, n_blocks)
        err_out[gi] = e_tot
        ref_out[gi] = r_tot


def run_grid_kernel(groups, spec, ratios, codes, deq, chosen, zeros, err, ref, importance=None):
    """Torch tensors in, filled in place (zeros may be None for the sym/full grids)."""
    lo, hi = spec.code_range
    grid = {"sym": GRID_SYM, "full": GRID_FULL, "asym": GRID_ASYM}[spec.grid]
    g = groups.numpy()
    imp = importance.numpy() if importance is not None else np.zeros((1, 1), np.float32)
    z = zeros.numpy() if zeros is not None else np.zeros(g.shape[0], np.float32)
    grid_kernel(g, imp, importance is not None, ratios.numpy(), grid, lo, hi, codes.numpy(), deq.numpy(),
                chosen.numpy(), z, err.numpy(), ref.numpy())


# ---------------------------------------------------------------------------------------------- GPTQ
GPTQ_TILE = 8  # rows that share each row of U while it sits in L1


@numba.njit(parallel=True, cache=True)
def gptq_rows_kernel(W, U, rows_per_expert, imp, group, static, pos_scale, pos_zero, ratios, grid, lo, hi,
                     codes, deq, group_scale, group_zero):
    """GPTQ, row-parallel: rows never mix (only columns of one row are updated), so each tile of rows
    runs the plain column loop: quantize column j, e = (w_j - dq_j) / U[j, j], w_k -= e * U[j, k] for k > j.
    Group scales: `static` -> taken from pos_scale/pos_zero [N, K] (act-order); otherwise searched
    (weighted by imp, as fp32, like moe_quant.search_grid) on the row's current values when the group's
    first column is reached. W is overwritten with the running (error-updated) values."""
    n_rows, k_cols = W.shape
    n_experts = U.shape[0]
    tiles_per_expert = (rows_per_expert + GPTQ_TILE - 1) // GPTQ_TILE
    use_z = grid == GRID_ASYM
    lo32, hi32 = np.float32(lo), np.float32(hi)
    for tile in numba.prange(n_experts * tiles_per_expert):
        ex = tile // tiles_per_expert
        r0 = ex * rows_per_expert + (tile % tiles_per_expert) * GPTQ_TILE
        r1 = min(r0 + GPTQ_TILE, (ex + 1) * rows_per_expert)
        S = np.zeros(GPTQ_TILE, W.dtype)
        Z = np.zeros(GPTQ_TILE, W.dtype)
        E = np.zeros(GPTQ_TILE, W.dtype)
        buf = np.zeros(group, np.float32)
        for j in range(k_cols):
            if static:
                for t in range(r1 - r0):
                    S[t] = pos_scale[r0 + t, j]
                    Z[t] = pos_zero[r0 + t, j]
            elif j % group == 0:
                width = min(group, k_cols - j)
                for t in range(r1 - r0):
                    for i in range(width):
                        buf[i] = np.float32(W[r0 + t, j + i])
                    s, z = best_candidate(buf[:width], imp[ex, j:j + width], True, ratios, grid, lo, hi)
                    S[t] = s
                    Z[t] = z
                    group_scale[r0 + t, j // group] = s
                    group_zero[r0 + t, j // group] = z
            ujj = U[ex, j, j]
            for t in range(r1 - r0):
                x = W[r0 + t, j]
                s = S[t]
                if s != 0:
                    q = np.rint(x / s)
                    if use_z:
                        q = q + Z[t]
                    q = q if q > lo32 else lo32
                    q = q if q < hi32 else hi32
                    dq = (q - Z[t]) * s if use_z else q * s
                else:
                    q = Z[t] if use_z else 0.0
                    dq = 0.0 * s
                codes[r0 + t, j] = np.int8(q)
                deq[r0 + t, j] = dq
                E[t] = (x - dq) / ujj
            # the update on 1-D views indexed from 0, which LLVM vectorizes (the 2-D form W[r, k], k from j + 1,
            # stayed scalar: 5.7x slower here); the same IEEE ops in the same order, so the same bytes
            urow = U[ex, j, j + 1:]
            for t in range(r1 - r0):
                e = E[t]
                wrow = W[r0 + t, j + 1:]
                for k in range(urow.shape[0]):
                    wrow[k] -= e * urow[k]
