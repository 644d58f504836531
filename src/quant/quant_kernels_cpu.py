"""The fused CPU quantization kernel (numba), kept apart so numba can cache it on disk.

One pass per group while it sits in L1: absmax -> candidate scales rounded to fp16 -> error of each
candidate -> codes and dequant for the best. The elementwise ops are the same IEEE fp32 ops as the torch
path in moe_quant (`candidate_scales`, `quantize_groups`), so for the same pick codes and dequant are
bit-identical; only the error sums are reassociated (vectorized), which can flip a pick between two
candidates whose errors agree to ~1e-7 relative. Importing this module needs numba; moe_quant falls back
to its torch path when the import fails.
"""
import math

import numba
import numpy as np


@numba.njit(inline="always", fastmath={"nsz"}, cache=True)
def round_to_fp16(x):
    # Round-to-nearest-even onto the fp16 grid for 0 <= x <= 65504 (same result as a cast to fp16).
    if x == 0.0:
        return np.float32(0.0)
    if x < np.float32(6.103515625e-05):  # fp16 subnormal range: quantum 2^-24
        return np.float32(np.rint(x * np.float32(16777216.0)) * np.float32(5.9604644775390625e-08))
    m, e = math.frexp(x)  # x = m * 2^e, m in [0.5, 1): fp16 keeps 11 significant bits (all exact in fp64)
    return np.float32(math.ldexp(np.rint(m * 2048.0) / 2048.0, e))


@numba.njit(parallel=True, fastmath={"reassoc", "nsz"}, cache=True)
def fused_kernel(groups, ratios, qmax, codes, deq, chosen, err_out, ref_out):
    n_groups, width = groups.shape
    n_cand = ratios.shape[0]
    zero = np.float32(0.0)
    for g in numba.prange(n_groups):
        amax = zero
        ref = zero
        probe = zero  # becomes NaN if the group holds a NaN or an inf (x * 0)
        for i in range(width):
            x = groups[g, i]
            amax = max(amax, abs(x))
            ref += x * x
            probe += x * zero
        ref_out[g] = ref
        if probe != zero:
            chosen[g] = np.float32(np.nan)  # the caller refuses the tensor
            continue
        best_err = np.float32(np.inf)
        best_s = zero
        for c in range(n_cand - 1, -1, -1):  # absmax first; strict '<' keeps the larger ratio on ties
            s = round_to_fp16(np.float32(amax * ratios[c]) / qmax)
            err = zero
            if s > zero:
                for i in range(width):
                    x = groups[g, i]
                    q = min(max(np.rint(x / s), -qmax), qmax)
                    d = q * s - x
                    err += d * d
            else:
                for i in range(width):
                    x = groups[g, i]
                    err += x * x
            if err < best_err:
                best_err = err
                best_s = s
        chosen[g] = best_s
        err_out[g] = best_err
        for i in range(width):
            q = min(max(np.rint(groups[g, i] / best_s), -qmax), qmax) if best_s > zero else zero
            codes[g, i] = np.int8(q)
            deq[g, i] = q * best_s

