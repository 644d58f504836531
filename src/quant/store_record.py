"""The packed store's part of `_ptq_meta.json`: the real bytes on disk, cross-checked against the computed
footprint, and the record of every export (name, bytes, sha256).

The effective bits a build reports are 8 x (bytes of codes + scales + zero points) / quantized weights,
summed from the store files as written; AWQ's per-input-channel scales (a method overhead the footprint
does not charge) are reported beside it. `footprint.py`'s arithmetic is kept as the cross-check; the two differ only by packing granularity (< 1 byte per entry, and ternary codes
packed 5 per byte: 1.6 bits against log2(3) = 1.585), so a gap above `AGREE_BITS` is a bug and stops the build.
"""
from __future__ import annotations

import hashlib
import json

import store_pack

AGREE_BITS = 0.02  # |on disk - computed| effective bits (quantized tensors) allowed
QUANT_PARTS = ("codes", "scales", "zeros", "dmin", "sub_scales", "sub_mins")  # what the grid costs (K-quants: d, dmin, sub-scales, mins; AWQ's in_scale is counted beside it)


class StoreMismatch(ValueError):
    pass


def summarize(records: dict, footprint_total: dict) -> dict:
    """records: shard file -> the shard writer's record (with its 'store'); -> meta['store']."""
    files, payload, weights = {}, {p: 0 for p in (*store_pack.PARTS, "raw")}, 0
    for shard in sorted(records):
        st = records[shard]["store"]
        files[st["file"]] = {"bytes": st["bytes"], "sha256": st["sha256"]}
        for part, n in st["payload_bytes"].items():
            payload[part] = payload.get(part, 0) + n
        weights += st["quantized_weights"]
    q_bytes = sum(payload[p] for p in QUANT_PARTS)
    on_disk = 8 * q_bytes / weights if weights else None
    computed = footprint_total.get("effective_bits_quantized")
    agree = on_disk is None or computed is None or abs(on_disk - computed) <= AGREE_BITS
    if not agree:
        raise StoreMismatch(f"the store holds {on_disk:.4f} bits per quantized weight, the footprint computes "
                            f"{computed:.4f}: the packing and the accounting disagree")
    return {"format": store_pack.STORE_FORMAT, "files": files, "bytes": sum(f["bytes"] for f in files.values()),
            "payload_bytes": payload, "quantized_weights": weights, "quantized_bytes": q_bytes,
            "effective_bits_quantized": on_disk, "computed_effective_bits_quantized": computed,
            "method_overhead_bits_quantized": 8 * payload["in_scale"] / weights if weights else None,
            "agree_within_bits": AGREE_BITS}


def file_record(paths, root) -> dict:
    """{relative path: {bytes, sha256}} plus totals for a set of files under root (an export)."""
    files = {}
    for p in sorted(paths):
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
        files[str(p.relative_to(root))] = {"bytes": p.stat().st_size, "sha256": h.hexdigest()}
    return {"files": files, "bytes": sum(f["bytes"] for f in files.values()),
            "sha256": hashlib.sha256(json.dumps({k: v["sha256"] for k, v in files.items()},
                                                sort_keys=True).encode()).hexdigest()}


def dequant_record(meta: dict) -> dict:
    """The dequantized view (the build's top-level shards and index) as an export record."""
    files = {f: {"bytes": r["output"]["bytes"], "sha256": r["output"]["sha256"]} for f, r in sorted(meta["shards"].items())}
    return {"name": ".", "format": "safetensors (dequantized, the source's names/shapes/dtypes)", "files": files,
            "bytes": sum(f["bytes"] for f in files.values()),
            "sha256": hashlib.sha256(json.dumps({k: v["sha256"] for k, v in files.items()},
                                                sort_keys=True).encode()).hexdigest()}
