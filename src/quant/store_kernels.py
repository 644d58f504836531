"""numba kernel for the store's bit packing (store_pack.pack_codes): 8 codes -> `width` bytes per block, parallel
over blocks. The same little-endian bitstream as the numpy path (tests/test_store.py compares the two)."""
from __future__ import annotations

import numba
import numpy as np


@numba.njit(parallel=True, cache=True)
def pack_blocks(blocks: np.ndarray, width: int, out: np.ndarray) -> None:
    """blocks: uint8 [n_blocks * 8] (codes < 2^width); out: uint8 [n_blocks * width]."""
    n_blocks = blocks.size // 8
    for b in numba.prange(n_blocks):
        word = np.uint64(0)
        for i in range(8):
            word |= np.uint64(blocks[b * 8 + i]) << np.uint64(width * i)
        for j in range(width):
            out[b * width + j] = np.uint8((word >> np.uint64(8 * j)) & np.uint64(0xFF))
