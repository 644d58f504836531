"""The packed store's tensor layout: integer codes bit-packed, scales, zero points, as pure functions.

One quantized tensor (or one expert slice of a fused tensor quantized at its own bits) is one *entry*:

* `KEY.codes`    uint8: the codes of the contraction-axis-last view `[*lead, K]`, offset to `code - lo`
                  (>= 0) and packed little-endian as one bitstream: 8 codes in `b` bytes for b-bit codes
                  (2..8), ternary 5 codes per byte (base 3, 1.6 bits); only the stream's tail is padded;
* `KEY.scales`   fp16 `[*lead, ceil(K / group)]`, exactly the scales the quantizer used;
* `KEY.zeros`    uint8, the asym grid's zero points packed like the codes (offset by `-lo`);
* `KEY.in_scale` fp16 `[*lead[:-1], K]`, AWQ's per-input-channel scale (dequant divides by it);
* `KEY.raw`      a tensor the recipe leaves alone (norms, routers, bits=16), verbatim.

A `gguf:Q*_K` grid (llama.cpp's two-level blocks, gguf_grids.py) stores `scales` as the fp16 super-block d
`[*lead, K / 256]`, `KEY.dmin` (Q4_K) the same shape, and `KEY.sub_scales` / `KEY.sub_mins` (Q4_K) the integer
sub-block scales offset by `-sub_lo` and packed at `sub_width` bits (6; Q6_K's int8: 8), so the bytes are
exactly llama.cpp's: 4.5 / 3.4375 / 6.5625 bits per weight for Q4_K / Q3_K / Q6_K.

`entry_spec` is the JSON-able description (bits, code range, grid, group, axis, shape, dtype) that makes
an entry decodable alone. `decode` recomputes exactly the quantizer's arithmetic - `(code [- zero]) *
scale` in fp32 (`/ in_scale` for AWQ), then one cast to the checkpoint dtype - so the store and the
dequantized view agree bit for bit (tests/test_store.py). Packing works in chunks: bounded memory on a
122B expert tensor.
"""
from __future__ import annotations

import json
import math

import numpy as np
import torch

STORE_FORMAT = "moe-lowbit/store/1"
PARTS = ("codes", "scales", "zeros", "in_scale", "dmin", "sub_scales", "sub_mins")
SUB_PARTS = ("sub_scales", "sub_mins")  # a K-quant's integer sub-block scales, packed like codes
TERNARY_PER_BYTE = 5
CHUNK_CODES = 40 << 19  # codes packed per step (a multiple of 40: whole 8-code and 5-trit blocks)


def code_width(bits: float) -> int:
    """Integer bits per packed code; 0 marks ternary (5 per byte)."""
    return 0 if math.isclose(float(bits), 1.58) else int(bits)


def packed_nbytes(n: int, width: int) -> int:
    """Bytes of n packed codes at `width` bits (0 = ternary)."""
    if width == 0:
        return -(-n // TERNARY_PER_BYTE)
    return -(-n * width // 8)


def _kernels():
    try:
        import store_kernels
    except ModuleNotFoundError as e:
        if e.name != "numba":
            raise
        return None
    return store_kernels


def pack_codes(u: np.ndarray, width: int, use_kernel: bool = True) -> np.ndarray:
    """uint8 values (< 2^width, or < 3 for ternary) -> one little-endian bitstream (uint8). The numba kernel
    (parallel) when available for widths 1..7, else numpy; both write the same bytes."""
    flat = np.ascontiguousarray(u, dtype=np.uint8).reshape(-1)
    kernels = _kernels() if use_kernel and 0 < width < 8 else None
    if kernels is not None:
        blocks = flat
        if flat.size % 8:
            blocks = np.zeros(-(-flat.size // 8) * 8, dtype=np.uint8)
            blocks[:flat.size] = flat
        out = np.empty(blocks.size // 8 * width, dtype=np.uint8)
        kernels.pack_blocks(blocks, width, out)
        return out[:packed_nbytes(flat.size, width)]
    out = np.empty(packed_nbytes(flat.size, width), dtype=np.uint8)
    pos = 0
    for c0 in range(0, flat.size, CHUNK_CODES):
        chunk = flat[c0:c0 + CHUNK_CODES]
        packed = _pack_chunk(chunk, width)
        out[pos:pos + packed.size] = packed
        pos += packed.size
    return out


def _pack_chunk(chunk: np.ndarray, width: int) -> np.ndarray:
    n = chunk.size
    if width == 0:
        blocks = np.zeros(-(-n // TERNARY_PER_BYTE) * TERNARY_PER_BYTE, dtype=np.uint8)
        blocks[:n] = chunk
        b = blocks.reshape(-1, TERNARY_PER_BYTE)
        out = b[:, 4] * np.uint8(81)
        for i, p in ((3, 27), (2, 9), (1, 3), (0, 1)):
            out += b[:, i] * np.uint8(p)
        return out
    if width == 8:
        return chunk.copy()
    blocks = np.zeros(-(-n // 8) * 8, dtype=np.uint8)
    blocks[:n] = chunk
    if width in (1, 2, 4):  # whole codes per byte: no word arithmetic
        per = 8 // width
        b = blocks.reshape(-1, per)
        out = b[:, 0].copy()
        for i in range(1, per):
            out |= b[:, i] << np.uint8(width * i)
        return out[:packed_nbytes(n, width)]
    b = blocks.reshape(-1, 8)
    wide = np.uint32 if width * 8 <= 32 else np.uint64
    word = b[:, 0].astype(wide)
    for i in range(1, 8):
        word |= b[:, i].astype(wide) << wide(width * i)
    nbytes = word.dtype.itemsize
    return word.view(np.uint8).reshape(-1, nbytes)[:, :width].reshape(-1)[:packed_nbytes(n, width)]


def unpack_codes(packed: np.ndarray, n: int, width: int) -> np.ndarray:
    """Inverse of `pack_codes`: the first n values (uint8)."""
    packed = np.ascontiguousarray(packed, dtype=np.uint8).reshape(-1)
    if packed.size != packed_nbytes(n, width):
        raise ValueError(f"packed codes hold {packed.size} bytes, {n} codes at width {width} need "
                         f"{packed_nbytes(n, width)}")
    if width == 0:
        b = packed.astype(np.int16)
        trits = np.stack([(b // p) % 3 for p in (1, 3, 9, 27, 81)], axis=1)
        return trits.reshape(-1)[:n].astype(np.uint8)
    if width == 8:
        return packed.copy()
    rows = -(-n // 8)
    padded = np.zeros(rows * width, dtype=np.uint8)
    padded[:packed.size] = packed
    words = np.zeros((rows, 8), dtype=np.uint8)
    words[:, :width] = padded.reshape(rows, width)
    word = words.view(np.uint64).reshape(-1)
    mask = np.uint64((1 << width) - 1)
    vals = np.stack([(word >> np.uint64(width * i)) & mask for i in range(8)], axis=1)
    return vals.reshape(-1)[:n].astype(np.uint8)


# ------------------------------------------------------------------------------------------- entries
def entry_spec(spec, axis: int, shape, dtype: torch.dtype, method: str) -> dict:
    """What an entry's decoder needs, JSON-able (spec: a moe_quant.QuantSpec)."""
    lo, hi = spec.code_range
    info = {"kind": "quant", "bits": float(spec.bits), "width": code_width(spec.bits), "lo": lo, "hi": hi,
            "grid": spec.grid, "group": spec.group, "axis": axis % len(shape), "shape": list(shape),
            "dtype": str(dtype).replace("torch.", ""), "method": method}
    kt = getattr(spec, "k_type", None)
    if kt is not None:
        info.update(sub=kt.sub, sub_width=kt.sc_width, sub_lo=kt.sc_lo)
    if getattr(spec, "fallback_from", ""):
        info["fallback_from"] = spec.fallback_from
    return info


def raw_spec(t: torch.Tensor) -> dict:
    return {"kind": "raw", "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}


def _moved_shape(info: dict) -> tuple[list[int], int]:
    shape, axis = list(info["shape"]), info["axis"]
    k = shape[axis]
    lead = shape[:axis] + shape[axis + 1:]
    return lead, k


def encode(result, info: dict) -> dict[str, torch.Tensor]:
    """A moe_quant.QuantResult (codes in the weight's layout, scales contraction-axis-last) -> part tensors."""
    lo, width = info["lo"], info["width"]
    moved = result.codes.movedim(info["axis"], -1).cpu().contiguous().numpy()
    u = moved.view(np.uint8) + np.uint8(-lo % 256)  # code - lo, in [0, 2^b): exact modulo 256
    parts = {"codes": torch.from_numpy(pack_codes(u, width)),
             "scales": result.scales.to(torch.float16).cpu().contiguous()}
    if result.zeros is not None:
        zu = result.zeros.cpu().contiguous().numpy().view(np.uint8) + np.uint8(-lo % 256)
        parts["zeros"] = torch.from_numpy(pack_codes(zu, width))
    if result.in_scale is not None:
        parts["in_scale"] = result.in_scale.to(torch.float16).cpu().contiguous()
    if "sub" in info:
        off = np.uint8(-info["sub_lo"] % 256)
        if result.dmin is not None:
            parts["dmin"] = result.dmin.to(torch.float16).cpu().contiguous()
        for part, t in (("sub_scales", result.sub_scales), ("sub_mins", result.sub_mins)):
            if t is not None:
                u = t.cpu().to(torch.int16).contiguous().numpy().astype(np.uint8) + off
                parts[part] = torch.from_numpy(pack_codes(u, info["sub_width"]))
    return parts


def unpacked_sub(parts: dict, info: dict, part: str = "sub_scales") -> torch.Tensor | None:
    """A K-quant entry's integer sub-scales (or mins) [*lead, n_super * n_sub], int16; None when absent."""
    if part not in parts:
        return None
    n = parts["scales"].numel() * (info["group"] // info["sub"])
    u = unpack_codes(parts[part].numpy(), n, info["sub_width"])
    return torch.from_numpy(u.astype(np.int16)).reshape(*parts["scales"].shape[:-1], -1) + info["sub_lo"]


def unpacked_codes(parts: dict, info: dict) -> torch.Tensor:
    """int16 codes in the contraction-axis-last layout `[*lead, K]`."""
    lead, k = _moved_shape(info)
    n = math.prod(lead) * k
    u = unpack_codes(parts["codes"].numpy(), n, info["width"])
    return torch.from_numpy(u.astype(np.int16)).reshape(*lead, k) + info["lo"]


def unpacked_zeros(parts: dict, info: dict) -> torch.Tensor | None:
    if "zeros" not in parts:
        return None
    n = parts["scales"].numel()
    u = unpack_codes(parts["zeros"].numpy(), n, info["width"])
    return torch.from_numpy(u.astype(np.int16)).reshape(parts["scales"].shape) + info["lo"]


def decode(parts: dict, info: dict, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The entry's tensor in the checkpoint's shape and dtype: the quantizer's own arithmetic, then one cast
    (`dtype=torch.float32`: the exact fp32 values before that cast, for exporters)."""
    dtype = dtype or getattr(torch, info["dtype"])
    if info["kind"] == "raw":
        return parts["raw"]
    lead, k = _moved_shape(info)
    if "sub" in info:
        import gguf_grids
        from quant_spec import K_TYPES, gguf_type

        kt = K_TYPES[gguf_type(info["grid"])]
        p = gguf_grids.params_of(parts["scales"], unpacked_sub(parts, info), parts.get("dmin"),
                                 unpacked_sub(parts, info, "sub_mins"), kt)
        deq = gguf_grids.decode(unpacked_codes(parts, info).reshape(-1, info["group"]), p, kt).reshape(*lead, k)
        return deq.to(dtype).movedim(-1, info["axis"]).contiguous()
    g = info["group"]
    n_groups = -(-k // g)
    codes = unpacked_codes(parts, info).float().reshape(-1, k)
    if n_groups * g != k:
        codes = torch.nn.functional.pad(codes, (0, n_groups * g - k))
    q = codes.reshape(-1, g)
    s = parts["scales"].float().reshape(-1, 1)
    zeros = unpacked_zeros(parts, info)
    deq = q * s if zeros is None else (q - zeros.float().reshape(-1, 1)) * s
    deq = deq.reshape(-1, n_groups * g)[:, :k].reshape(*lead, k)
    if "in_scale" in parts:
        deq = deq / parts["in_scale"].float().reshape(*lead[:-1], 1, k)
    return deq.to(dtype).movedim(-1, info["axis"]).contiguous()


def payload_bytes(parts: dict) -> dict[str, int]:
    """Bytes of each stored part of an entry (the raw part counted separately: it is not quantized)."""
    return {p: int(t.numel() * t.element_size()) for p, t in parts.items()}


def split_key(key: str) -> tuple[str, str]:
    """'model.layers.0.mlp.down_proj.weight.codes' -> (entry key, part)."""
    entry, _, part = key.rpartition(".")
    return entry, part


HEADER_KEY = "moe_lowbit_store"


def header_metadata(entries: dict[str, dict]) -> dict[str, str]:
    """The safetensors header metadata: ONE key (safetensors keeps metadata in a hash map, so several keys
    would be written in a random order and the same store would hash differently run to run)."""
    return {HEADER_KEY: json.dumps({"format": STORE_FORMAT, "entries": entries}, sort_keys=True)}


def parse_header_metadata(md: dict | None) -> dict[str, dict]:
    """entries of a store file's header; ValueError when the file is not a store."""
    doc = json.loads((md or {}).get(HEADER_KEY, "{}"))
    if doc.get("format") != STORE_FORMAT:
        raise ValueError(f"format {doc.get('format')!r}, expected {STORE_FORMAT}")
    return doc["entries"]


def to_tensors(entries: dict[str, tuple[dict, dict]], with_spec: bool = False) -> dict[str, torch.Tensor]:
    """Entries -> flat `KEY.PART` tensors (with `KEY.spec`, the entry spec as JSON bytes, for files that have
    no header metadata of their own: the calibration pass's per-layer files)."""
    out = {}
    for key, (info, parts) in entries.items():
        for part, t in parts.items():
            out[f"{key}.{part}"] = t.contiguous()
        if with_spec:
            out[f"{key}.spec"] = torch.frombuffer(bytearray(json.dumps(info, sort_keys=True).encode()), dtype=torch.uint8)
    return out


def belongs_to(key: str, name: str) -> bool:
    """Whether flat key `KEY.PART` is part of tensor `name`'s entries (`name` itself or `name#E`)."""
    entry, _ = split_key(key)
    return entry == name or entry.startswith(name + "#")


def from_tensors(tensors: dict[str, torch.Tensor], name: str) -> dict[str, tuple[dict, dict]]:
    """The entries of tensor `name` from flat tensors written with `with_spec=True`."""
    entries: dict[str, tuple[dict, dict]] = {}
    for key, t in tensors.items():
        if not belongs_to(key, name):
            continue
        entry, part = split_key(key)
        info, parts = entries.setdefault(entry, ({}, {}))
        if part == "spec":
            info.update(json.loads(bytes(t.numpy().tobytes()).decode()))
        else:
            parts[part] = t
    return entries


def concat_rows(name: str, blocks: list[tuple[dict, dict]]) -> tuple[dict, dict]:
    """One entry from row blocks of a 2-D tensor quantized block by block (a head too large for one call):
    codes and zeros concatenate byte-wise when every block's packing ends on a byte, scales along the rows."""
    infos = [i for i, _ in blocks]
    first = dict(infos[0])
    if first.get("kind") != "quant" or len(first["shape"]) != 2 or first["axis"] != 1:
        raise ValueError(f"{name}: only 2-D row blocks quantized along their columns can be joined")
    parts: dict = {}
    for part in ("codes", "zeros"):
        got = [p.get(part) for _, p in blocks]
        if any(g is None for g in got):
            continue
        per_row = [(i["shape"][1] if part == "codes" else g.numel() * 8 // max(i["width"] * i["shape"][0], 1))
                   for i, g in zip(infos, got)]
        if any((r * i["width"]) % 8 for r, i in zip(per_row, infos)):
            raise ValueError(f"{name}: {part} of a row block do not end on a byte; it cannot be stored in blocks")
        parts[part] = torch.cat(got)
    for part in SUB_PARTS:  # whole super-blocks per row: 8 or 16 six-bit values, a whole number of bytes
        if all(part in p for _, p in blocks):
            parts[part] = torch.cat([p[part] for _, p in blocks])
    if all("dmin" in p for _, p in blocks):
        parts["dmin"] = torch.cat([p["dmin"] for _, p in blocks])
    parts["scales"] = torch.cat([p["scales"] for _, p in blocks])
    if any("in_scale" in p for _, p in blocks):
        raise ValueError(f"{name}: a per-channel input scale (awq) differs between row blocks; quantize it whole")
    first["shape"] = [sum(i["shape"][0] for i in infos), first["shape"][1]]
    return first, parts


def slice_leading(info: dict, parts: dict, i: int) -> tuple[dict, dict]:
    """Slice i of an entry along its leading axis (expert i of a stacked [E, R, K] call) as an entry of its own:
    codes and zeros unpacked, sliced and packed again, scales (and a per-expert input scale) indexed."""
    if info.get("kind") != "quant" or info["axis"] == 0:
        raise ValueError("only a quantized entry whose leading axis is not its contraction axis can be sliced")
    lead, k = _moved_shape(info)
    per = math.prod(lead[1:]) * k
    out_info = {**info, "shape": info["shape"][1:], "axis": info["axis"] - 1}
    codes = unpack_codes(parts["codes"].numpy(), math.prod(lead) * k, info["width"])[i * per:(i + 1) * per]
    out = {"codes": torch.from_numpy(pack_codes(codes, info["width"])), "scales": parts["scales"][i].contiguous()}
    if "zeros" in parts:
        n = parts["scales"].numel()
        per_z = n // parts["scales"].shape[0]
        z = unpack_codes(parts["zeros"].numpy(), n, info["width"])[i * per_z:(i + 1) * per_z]
        out["zeros"] = torch.from_numpy(pack_codes(z, info["width"]))
    if "in_scale" in parts:
        s_in = parts["in_scale"]
        out["in_scale"] = (s_in[i] if s_in.ndim > 1 else s_in).contiguous()
    if "dmin" in parts:
        out["dmin"] = parts["dmin"][i].contiguous()
    for part in SUB_PARTS:
        if part in parts:
            sub = unpacked_sub(parts, info, part)[i] - info["sub_lo"]
            out[part] = torch.from_numpy(pack_codes(sub.numpy().astype(np.uint8), info["sub_width"]))
    return out_info, out
