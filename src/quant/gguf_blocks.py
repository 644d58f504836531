"""llama.cpp's block byte layouts for the types we write from our own codes, as pure numpy functions.

Each `pack_*` takes one row-major run of blocks (codes as integers, scales as the stored values) and returns
uint8 [n_blocks, type_size] exactly as ggml lays the block out (checked against gguf-py's dequantizers in
tests/test_gguf_grids.py):

* Q4_0 (18 B / 32): fp16 d, 16 bytes of nibbles: byte j = (q_j + 8) | (q_{j+16} + 8) << 4;
* Q5_0 (22 B / 32): fp16 d, uint32 qh (bit i = bit 4 of q_i + 16), 16 bytes of low nibbles as Q4_0;
* Q8_0 (34 B / 32): fp16 d, 32 int8 codes;
* Q3_K (110 B / 256): hmask[32] (bit i of byte l = bit 2 of u = q + 4 for weight 32 i + l), qs[64] (weight
  128 j + 32 s + l: bits 2s.. of byte 32 j + l, low two bits of u), scales[12] (16 six-bit values sc + 32: low
  nibbles in bytes 0..7, value i at byte i % 8, high nibble when i >= 8; top two bits in byte 8 + i % 4, shift
  2 (i // 4)), fp16 d;
* Q4_K (144 B / 256): fp16 d, fp16 dmin, scales[12] (sc, m for 8 sub-blocks: j < 4 in the low 6 bits of bytes
  j and 4 + j; j >= 4 low nibbles in byte 8 + j - 4 (sc low, m high), top two bits in the top of bytes j - 4
  and j), qs[128] (sub-blocks 2c and 2c + 1 as low and high nibbles of bytes 32 c ..);
* Q5_K (176 B / 256): Q4_K's d, dmin and scales[12], qh[32] (bit i of byte l = bit 4 of the code of weight 32 i + l),
  then Q4_K's qs[128] of the low four bits;
* Q6_K (210 B / 256): ql[128] (weight 128 h + 64 s + l: nibble s of byte 64 h + l, low 4 bits of u = q + 32),
  qh[64] (weight 128 h + 32 s + l: bits 2s.. of byte 32 h + l, top two bits of u), int8 scales[16], fp16 d.
"""
from __future__ import annotations

import numpy as np

TYPE_SIZE = {"Q4_0": 18, "Q5_0": 22, "Q8_0": 34, "Q3_K": 110, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
BLOCK_SIZE = {"Q4_0": 32, "Q5_0": 32, "Q8_0": 32, "Q3_K": 256, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256}


def _f16_bytes(d) -> np.ndarray:
    return np.asarray(d, dtype=np.float16).reshape(-1, 1).view(np.uint8)


def pack_legacy(q: np.ndarray, d: np.ndarray, qtype: str) -> np.ndarray:
    """codes [n, 32] (signed), fp16 d [n] -> Q4_0 / Q5_0 / Q8_0 blocks."""
    q = q.astype(np.int16).reshape(-1, 32)
    head = _f16_bytes(d)
    if qtype == "Q8_0":
        return np.concatenate([head, q.astype(np.int8).view(np.uint8)], axis=1)
    off = 8 if qtype == "Q4_0" else 16
    u = (q + off).astype(np.uint8)
    nib = (u[:, :16] & 0x0F) | ((u[:, 16:] & 0x0F) << 4)
    if qtype == "Q4_0":
        return np.concatenate([head, nib], axis=1)
    qh = np.packbits((u >> 4) & 1, axis=1, bitorder="little")  # 4 bytes = little-endian uint32, bit i = weight i
    return np.concatenate([head, qh, nib], axis=1)


def _six_bit_pairs(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Q4_K's 12 scale bytes from sc, m [n, 8] in 0..63."""
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    out = np.empty((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = (m[:, :4] & 0x3F) | ((m[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    return out


def pack_q4_k(q: np.ndarray, d, dmin, sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    n = q.shape[0]
    u = q.astype(np.uint8).reshape(n, 4, 2, 32)
    qs = (u[:, :, 0] | (u[:, :, 1] << 4)).reshape(n, 128)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _six_bit_pairs(sc, m), qs], axis=1)


def pack_q5_k(q: np.ndarray, d, dmin, sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    n = q.shape[0]
    u = q.astype(np.uint8)
    top = ((u >> 4) & 1).reshape(n, 8, 32)
    qh = np.zeros((n, 32), dtype=np.uint8)
    for i in range(8):
        qh |= top[:, i] << i
    low = (u & 0x0F).reshape(n, 4, 2, 32)
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(n, 128)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _six_bit_pairs(sc, m), qh, qs], axis=1)


def pack_q3_k(q: np.ndarray, d, sc: np.ndarray) -> np.ndarray:
    n = q.shape[0]
    u = (q.astype(np.int16) + 4).astype(np.uint8)  # 0..7
    hbits = ((u >> 2) & 1).reshape(n, 8, 32)
    hmask = np.zeros((n, 32), dtype=np.uint8)
    for i in range(8):
        hmask |= hbits[:, i] << i
    low = (u & 3).reshape(n, 2, 4, 32)
    qs = np.zeros((n, 2, 32), dtype=np.uint8)
    for s in range(4):
        qs |= low[:, :, s] << (2 * s)
    v = (sc.astype(np.int16) + 32).astype(np.uint8)  # 0..63
    scales = np.empty((n, 12), dtype=np.uint8)
    scales[:, 0:8] = (v[:, 0:8] & 0x0F) | ((v[:, 8:16] & 0x0F) << 4)
    hi = (v >> 4).reshape(n, 4, 4)  # [n, i // 4, i % 4]
    scales[:, 8:12] = hi[:, 0] | (hi[:, 1] << 2) | (hi[:, 2] << 4) | (hi[:, 3] << 6)
    return np.concatenate([hmask, qs.reshape(n, 64), scales, _f16_bytes(d)], axis=1)


def pack_q6_k(q: np.ndarray, d, sc: np.ndarray) -> np.ndarray:
    n = q.shape[0]
    u = (q.astype(np.int16) + 32).astype(np.uint8).reshape(n, 2, 2, 64)  # [n, h, s, l]
    ql = ((u[:, :, 0] & 0x0F) | ((u[:, :, 1] & 0x0F) << 4)).reshape(n, 128)
    top = (u.reshape(n, 2, 4, 32) >> 4) & 3  # [n, h, s, l] with weight 128 h + 32 s + l
    qh = (top[:, :, 0] | (top[:, :, 1] << 2) | (top[:, :, 2] << 4) | (top[:, :, 3] << 6)).reshape(n, 64)
    return np.concatenate([ql, qh, sc.astype(np.int8).view(np.uint8), _f16_bytes(d)], axis=1)


def pack_k(qtype: str, q: np.ndarray, d, sc: np.ndarray, dmin=None, m: np.ndarray | None = None) -> np.ndarray:
    """codes [n, 256], fp16 d [n], sub-scales [n, n_sub] (+ Q4_K's dmin, mins) -> blocks [n, type size]."""
    if qtype == "Q4_K":
        return pack_q4_k(q, d, dmin, sc, m)
    if qtype == "Q5_K":
        return pack_q5_k(q, d, dmin, sc, m)
    if qtype == "Q3_K":
        return pack_q3_k(q, d, sc)
    if qtype == "Q6_K":
        return pack_q6_k(q, d, sc)
    raise ValueError(f"no K-quant block layout for {qtype}")
