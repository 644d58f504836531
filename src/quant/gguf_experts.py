"""Routed experts of the GGUF export written from the store: llama.cpp's converter stacks each layer's experts
into one 3-D tensor per projection (`blk.N.ffn_{gate,up,down}_exps.weight`, [E, rows, K] in numpy order), so no
store tensor maps onto it one to one; this module finds, for each stacked tensor, the store entries of its experts
in the converter's expert order and writes their blocks.

Where the experts come from in the store:

* per-expert disk tensors (`...experts.E.gate_proj.weight`, qwen2_moe / mixtral style): one 2-D entry each;
* fused disk tensors (`...experts.gate_up_proj` [E, 2I, H], `...experts.down_proj`, Qwen3.5 style): one 3-D
  entry (sliced per expert) or per-expert entries `NAME#E` (a bits plan); the converter splits gate_up into
  its first (gate) and second (up) half of rows.

GGUF blocks run along the contraction axis (the last one), so each expert's rows are independent and the
stacked tensor's blocks are its experts' blocks in order. Expert order and row order are not assumed: each
expert's slice of the converter's BF16 tensor must equal the store's decoded rows (in order, or matched row by
row by content, as the 2-D path does), else the export stops naming the tensor and the expert (nothing could
verify such a stack against the store).
One stacked tensor has one GGUF type, so when its experts' store grids give different block types (a bits plan
giving experts different bits) or one has none, the whole tensor keeps the converter's BF16 (exact, dense) and
the record names the types: re-rounding an expert onto another grid would ship weights nobody measured.
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import NamedTuple

import numpy as np
import torch

import store_pack
from gguf_tensors import DENSE_NP, GgufExportError, block_type, dense_tensor, pack_entry, row_order

PER_EXPERT = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<idx>\d+)\.(?P<proj>gate_proj|up_proj|down_proj|w1|w3|w2)"
                        r"\.weight$")
FUSED = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<proj>gate_up_proj|down_proj)(?:\.weight)?$")


class Piece(NamedTuple):
    """One expert of a stacked GGUF tensor: rows [r0, r1) of store tensor `store` (its slice `lead` when the
    store tensor is a fused [E, R, K] one; None for a per-expert 2-D tensor)."""

    store: str
    lead: int | None
    r0: int
    r1: int


def _fused_pieces(store, name: str, proj: str) -> dict[str, dict[int, Piece]]:
    """merged converter name -> {expert: Piece} for a fused disk tensor (gate_up split in halves of rows)."""
    specs = store.specs(name)
    if name in specs:  # one [E, R, K] entry
        info = specs[name]
        if len(info["shape"]) != 3:
            return {}
        n_exp, rows = info["shape"][0], info["shape"][1]
    else:
        lead = sorted(int(k.split("#", 1)[1]) for k in specs)
        if lead != list(range(len(lead))):
            return {}
        n_exp, rows = len(lead), specs[f"{name}#0"]["shape"][0]
    prefix = FUSED.match(name)["prefix"]
    if proj == "down_proj":
        return {f"{prefix}.down_proj.weight": {e: Piece(name, e, 0, rows) for e in range(n_exp)}}
    half = rows // 2
    return {f"{prefix}.gate_proj.weight": {e: Piece(name, e, 0, half) for e in range(n_exp)},
            f"{prefix}.up_proj.weight": {e: Piece(name, e, half, rows) for e in range(n_exp)}}


def stacked_sources(store, to_gguf) -> dict[str, list[Piece]]:
    """GGUF name of each stacked expert tensor -> its experts' pieces in expert order; `to_gguf(hf_name)` is
    gguf-py's tensor-name map (None when the name maps to nothing). Only complete expert sets 0..E-1 are kept."""
    merged: dict[str, dict[int, Piece]] = defaultdict(dict)
    for name in store.names():
        m = PER_EXPERT.match(name)
        if m:
            info = next(iter(store.specs(name).values()))
            if len(info["shape"]) == 2:
                merged[f"{m['prefix']}.{m['proj']}.weight"][int(m["idx"])] = Piece(name, None, 0, info["shape"][0])
            continue
        m = FUSED.match(name)
        if m:
            for k, v in _fused_pieces(store, name, m["proj"]).items():
                merged[k].update(v)
    out = {}
    for hf, by_exp in merged.items():
        g = to_gguf(hf)
        if g is not None and sorted(by_exp) == list(range(len(by_exp))):
            out[g] = [by_exp[e] for e in range(len(by_exp))]
    return out


def expert_entry(entries: dict, piece: Piece) -> tuple[dict, dict]:
    """(spec, parts) of one expert as a 2-D entry, from store.entries(piece.store)."""
    if piece.lead is None:
        return entries[piece.store]
    key = f"{piece.store}#{piece.lead}"
    if key in entries:
        return entries[key]
    info, parts = entries[piece.store]
    if info["kind"] != "quant":
        raw = parts["raw"][piece.lead].contiguous()
        return store_pack.raw_spec(raw), {"raw": raw}
    return byte_slice(info, parts, piece.lead) or store_pack.slice_leading(info, parts, piece.lead)


def byte_slice(info: dict, parts: dict, i: int) -> tuple[dict, dict] | None:
    """store_pack.slice_leading without unpacking: when each slice's codes (zeros, sub-scales) fill whole bytes of
    the little-endian bitstream, slice i is a byte range of it. slice_leading unpacks the whole [E, R, K] entry per
    call, i.e. E^2 work for a 122B stack of 256 experts. None when a part is not byte-aligned (or ternary)."""
    if info["axis"] != len(info["shape"]) - 1 or not info.get("width"):
        return None
    n_exp = info["shape"][0]
    out = {}
    for part, t in parts.items():
        if part in ("codes", "zeros", *store_pack.SUB_PARTS):
            per, rem = divmod(t.numel(), n_exp)
            if rem:
                return None
            out[part] = t[i * per:(i + 1) * per].contiguous()
        elif part == "in_scale" and t.ndim == 1:  # one AWQ input scale shared by every expert
            out[part] = t.contiguous()
        else:  # scales, dmin, in_scale: [E, ...] tensors
            out[part] = t[i].contiguous()
    rows, k = info["shape"][1], info["shape"][2]
    counts = {"codes": (rows * k, info["width"]), "zeros": (parts["scales"][0].numel(), info["width"]),
              **{p: (rows * k // info["sub"], info.get("sub_width", 0)) for p in store_pack.SUB_PARTS if "sub" in info}}
    for part, t in out.items():
        if part in counts and counts[part][0] * counts[part][1] != 8 * t.numel():
            return None
    return {**info, "shape": info["shape"][1:], "axis": info["axis"] - 1}, out


def _match_rows(gguf_rows: torch.Tensor, store_rows: torch.Tensor) -> list[int] | None:
    """None-or-perm like gguf_tensors.row_order, the identity returned as [] (the common case: one compare)."""
    if torch.equal(gguf_rows.float(), store_rows.float()):
        return []
    return row_order(gguf_rows, store_rows)


def write_stacked(t, pieces: list[Piece], store) -> tuple[np.ndarray | None, dict]:
    """(uint8 blocks [E, R, row bytes] or None, record) for GGUF tensor `t` (the converter's BF16/F32 stack).
    None: keep the converter's tensor; the record then says why in `dense_because`. The record's `experts` lists
    each expert's store source, so the verifier checks every slice; a stack whose slices are not the store's
    stops the export (GgufExportError), since nothing could verify it."""
    n_exp = len(pieces)
    data = np.asarray(t.data)
    if t.tensor_type.name not in DENSE_NP or data.ndim != 3 or data.shape[0] != n_exp:
        raise GgufExportError(f"GGUF tensor {t.name}: the converter's stack of shape {list(data.shape)} "
                              f"({t.tensor_type.name}) does not hold the store's {n_exp} experts as dense slices")
    by_store = defaultdict(list)
    for e, p in enumerate(pieces):
        by_store[p.store].append(e)
    chosen: list = [None] * n_exp
    refs = []
    for name, experts in by_store.items():
        entries = store.entries(name)
        for e in experts:
            p = pieces[e]
            info, parts = expert_entry(entries, p)
            want = store_pack.decode(parts, info)[p.r0:p.r1]
            got = dense_tensor(t, e)  # one expert's slice at a time (a 122B stack is 1.5 GB of BF16)
            perm = _match_rows(got, want) if tuple(want.shape) == tuple(got.shape) else None
            if perm is None:  # the verifier could not hold this stack to the store: stop, never ship it unchecked
                raise GgufExportError(f"GGUF tensor {t.name}: expert {e} ({name} rows {p.r0}:{p.r1}) differs from "
                                      "the converter's slice (another expert, row order or values than the store's)")
            chosen[e] = (info, parts, perm)
    for e, p in enumerate(pieces):
        refs.append({"store": p.store, "lead": p.lead, "row_range": [p.r0, p.r1], "rows": chosen[e][2] or None})
    types = [block_type(info) for info, _, _ in chosen]
    kinds = sorted({q or f"none ({why})" for q, why in types})
    if len(kinds) == 1 and types[0][0] is None:
        return None, {"type": t.tensor_type.name, "dense_because": f"every expert: {types[0][1]}", "experts": refs}
    if len(kinds) != 1:
        why = ("its experts' store grids give no one GGUF type (one tensor holds one type): " +
               "; ".join(f"{k}: experts {[e for e, (q, w) in enumerate(types) if (q or f'none ({w})') == k]}"
                         for k in kinds))
        return None, {"type": t.tensor_type.name, "dense_because": why, "experts": refs}
    qtype = types[0][0]
    blocks = []
    for (info, parts, perm), p in zip(chosen, pieces):
        rows = None  # store rows in the converter's order; None = all, in order
        if perm or (p.r0, p.r1) != (0, info["shape"][0]):
            rows = [p.r0 + i for i in (perm or range(p.r1 - p.r0))]
        blocks.append(pack_entry(parts, info, qtype, rows))
    return np.stack(blocks), {"type": qtype, "experts": refs}


def pieces_by_store(record: dict) -> dict[str, list[tuple[str, int, dict]]]:
    """store tensor name -> [(GGUF name, expert index, piece record)] from an export's tensor map."""
    out = defaultdict(list)
    for g, r in record.items():
        for e, ref in enumerate(r.get("experts") or ()):
            out[ref["store"]].append((g, e, ref))
    return dict(out)


def assemble(shape, pieces: list[tuple[str, int, dict]], expert_rows) -> torch.Tensor:
    """Store tensor of `shape` (fp32) from the GGUF's expert slices: `expert_rows(gguf_name, e)` gives expert e's
    dequantized rows; rows no piece covers stay NaN, so the verifier names them."""
    out = torch.full(tuple(shape), float("nan"), dtype=torch.float32)
    for g, e, ref in pieces:
        rows = expert_rows(g, e)
        r0, r1 = ref["row_range"]
        dst = out if ref["lead"] is None or len(shape) == 2 else out[ref["lead"]]
        if ref["rows"]:
            dst[torch.tensor(ref["rows"]) + r0] = rows
        else:
            dst[r0:r1] = rows
    return out
