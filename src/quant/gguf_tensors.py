"""llama.cpp's GGUF tensors as the export writes and reads them: which block type a store entry is exactly
(`block_type`), its blocks (`pack_entry`), a dense GGUF tensor as torch (`dense_tensor`) and how the converter's
dense tensor holds the store's values (`converter_order`: in order, rows permuted, or not at all).

Shared by gguf_export (one tensor per store entry) and gguf_experts (the converter's stacked routed experts).
"""
from __future__ import annotations

import numpy as np
import torch

import gguf_blocks
import store_pack

BLOCK = 32


class GgufExportError(ValueError):
    pass


LEGACY_BY_WIDTH = {4: "Q4_0", 5: "Q5_0", 8: "Q8_0"}


def block_type(info: dict) -> tuple[str | None, str]:
    """(GGUF type, '') for an entry whose grid is a GGUF block type exactly, else (None, why not)."""
    if info["kind"] != "quant":
        return None, "kept by the recipe"
    if info["method"] == "awq":
        return None, "awq's per-input-channel scale has no slot in a GGUF block"
    if len(info["shape"]) != 2 or info["axis"] != 1:
        return None, "not a 2-D weight grouped along its rows"
    if "sub" in info:  # a gguf:Q*_K grid: the entry is that type's blocks exactly
        qtype = info["grid"].split(":", 1)[1]
        if info["shape"][1] % gguf_blocks.BLOCK_SIZE[qtype]:
            return None, f"row of {info['shape'][1]} is not a multiple of the {qtype} block"
        return qtype, ""
    if info["grid"] not in ("full", "sym") or info["group"] != BLOCK or info["width"] not in LEGACY_BY_WIDTH:
        return None, (f"grid {info['grid']} {info['bits']:g}-bit group {info['group']} is no GGUF block type (Q4_0/"
                      f"Q5_0/Q8_0 are grid full/sym, 4/5/8 bits, group 32; gguf:Q3_K/Q4_K/Q6_K are their own grids)")
    if info["shape"][1] % BLOCK:
        return None, f"row of {info['shape'][1]} is not a multiple of the block {BLOCK}"
    return LEGACY_BY_WIDTH[info["width"]], ""


def pack_blocks(codes: torch.Tensor, scales: torch.Tensor, qtype: str) -> np.ndarray:
    """codes int [R, K], fp16 scales [R, K/32] -> uint8 [R, K/32 * block bytes] in llama.cpp's block layout."""
    q = codes.reshape(-1, BLOCK).numpy()
    return gguf_blocks.pack_legacy(q, scales.to(torch.float16).numpy().reshape(-1), qtype).reshape(codes.shape[0], -1)


def pack_entry(parts: dict, info: dict, qtype: str, perm: list[int] | None = None) -> np.ndarray:
    """A 2-D store entry (its rows `perm`, in that order; all when None) -> uint8 [rows, row bytes] of `qtype`."""
    rows = slice(None) if perm is None else perm
    codes = store_pack.unpacked_codes(parts, info)[rows]  # `perm` may pick a subset (a fused gate_up's half)
    if "sub" not in info:
        return pack_blocks(codes, parts["scales"][rows], qtype)
    n_sub = info["group"] // info["sub"]  # sub-blocks per super-block
    sub = store_pack.unpacked_sub(parts, info)[rows].reshape(-1, n_sub)
    mins = store_pack.unpacked_sub(parts, info, "sub_mins")
    blocks = gguf_blocks.pack_k(qtype, codes.reshape(-1, info["group"]).numpy(),
                                parts["scales"][rows].numpy().reshape(-1), sub.numpy(),
                                None if "dmin" not in parts else parts["dmin"][rows].numpy().reshape(-1),
                                None if mins is None else mins[rows].reshape(sub.shape).numpy())
    return blocks.reshape(codes.shape[0], -1)


def _row_keys(t: torch.Tensor) -> list[bytes]:
    f = (t.float() + 0.0).contiguous().numpy()  # + 0.0: -0 and +0 are the same row value
    return [row.tobytes() for row in f]


def row_order(gguf_rows: torch.Tensor, store_rows: torch.Tensor) -> list[int] | None:
    """perm with gguf_rows[i] == store_rows[perm[i]], or None when some row has no match."""
    where: dict[bytes, list[int]] = {}
    for i, key in enumerate(_row_keys(store_rows)):
        where.setdefault(key, []).append(i)
    perm = []
    for key in _row_keys(gguf_rows):
        hits = where.get(key)
        if not hits:
            return None
        perm.append(hits.pop() if len(hits) > 1 else hits[0])
    return perm


DENSE_NP = {"BF16": np.uint16, "F32": np.float32, "F16": np.float16}

def dense_tensor(t, index=None) -> torch.Tensor:
    """A dense GGUF tensor (or its slice `index` along the leading axis) as torch, in its own dtype; gguf-py
    gives BF16 data as raw bytes (uint8) or uint16 depending on its version: viewed, never converted."""
    data = np.array(t.data if index is None else t.data[index])
    out = torch.from_numpy(np.ascontiguousarray(data.view(DENSE_NP[t.tensor_type.name])))
    return out.view(torch.bfloat16) if t.tensor_type.name == "BF16" else out


def converter_order(t, shape, want: torch.Tensor) -> list[int] | None:
    """How the converter's dense tensor `t` holds the store's values `want`: [] in order, a 2-D tensor's row
    permutation (gguf rows[i] == store rows[perm[i]]), or None when the values differ (or `t` is not dense)."""
    if t.tensor_type.name not in DENSE_NP:
        return None
    got = dense_tensor(t)
    if got.numel() != want.numel():  # e.g. a vocabulary the converter padded
        return None
    got = got.reshape(shape)
    if torch.equal(got.float(), want.float()):
        return []
    return row_order(got, want) if len(shape) == 2 else None
