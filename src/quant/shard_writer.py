"""Writing output shards: the source header verbatim, each tensor quantized (or copied) into its offsets.

Same dtypes and shapes => same offsets, so an output shard reuses its source's header bytes and tensors
are streamed into place one at a time: no shard is ever held in RAM. Tensors the calibration pass has
already quantized (true-sequential methods need them before the next layer runs) are copied from its
per-layer files instead of being quantized again.

Resume: a shard is written to a temp name and renamed, then a record (source signature + recipe + code
hash + calibration identity + output sha256) is written; a rerun reuses a shard only if its record
matches and the file still hashes the same.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import atomic_io
import build_plan
import footprint
import provenance
import store_pack
import weight_quant
from build_plan import TensorPlan
from ckpt_source import BuildError, ShardHeader
from model_adapters import Recipe

COPY_CHUNK = 64 << 20
# Float dtypes copied byte for byte -> (unsigned view, exponent mask): all exponent bits set = NaN or Inf.
NON_FINITE_MASKS = {"BF16": ("<u2", 0x7F80), "F16": ("<u2", 0x7C00), "F32": ("<u4", 0x7F800000),
                    "F64": ("<u8", 0x7FF0000000000000)}
# Files whose source text decides the output bytes: a change invalidates resumed shards and calibration.
STORE_DIR = "_ptq_store"  # OUT/_ptq_store/<shard file>: the packed codes + scales (store_pack.py)
QUANTIZER_FILES = ("store_pack.py", "moe_quant.py", "quant_kernels_cpu.py", "quant_methods.py", "model_adapters.py", "footprint.py",
                   "build_plan.py", "weight_quant.py", "shard_writer.py", "calib_stats.py", "calib_accum.py", "layer_io.py",
                   "calib_source.py")


def quantizer_sha256() -> str:
    here = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for name in QUANTIZER_FILES:
        f = here / name
        h.update(f.read_bytes() if f.is_file() else b"<absent>")
    return h.hexdigest()


def tensor_bytes(t) -> memoryview:
    import torch

    flat = t.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


class Precomputed:
    """Tensors already quantized by the calibration pass: name -> safetensors file holding its dequantized copy."""

    def __init__(self, files: dict[str, Path] | None = None):
        self.files = dict(files or {})

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str):
        from safetensors import safe_open

        with safe_open(str(self.files[name]), framework="pt", device="cpu") as st:
            return st.get_tensor(name)

    def get_store(self, name: str) -> dict:
        """The store entries the calibration pass saved beside the dequantized copy (store_pack.to_tensors)."""
        from safetensors import safe_open

        with safe_open(str(self.files[name]), framework="pt", device="cpu") as st:
            flat = {k: st.get_tensor(k) for k in st.keys() if store_pack.belongs_to(k, name)}
        entries = store_pack.from_tensors(flat, name)
        if not entries:
            raise BuildError(f"{name}: the calibration file {self.files[name]} holds no store entries (written by "
                             f"an older builder); rerun with --force")
        return entries


def write_store(path: Path, entries: dict) -> dict:
    """One store shard (atomic): entries -> safetensors with the entry specs in its header; returns its record."""
    from safetensors.torch import save

    data = save(store_pack.to_tensors(entries), metadata=store_pack.header_metadata({k: i for k, (i, _) in entries.items()}))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_io.write_bytes(path, data)
    payload = {p: 0 for p in (*store_pack.PARTS, "raw")}
    weights = 0
    for info, parts in entries.values():
        for part, n in store_pack.payload_bytes(parts).items():
            payload[part] += n
        if info["kind"] == "quant":
            weights += math.prod(info["shape"])
    return {"file": f"{STORE_DIR}/{path.name}", "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "payload_bytes": payload, "quantized_weights": weights}


def non_finite_count(dtype: str, block: bytes) -> int:
    """NaN/Inf values in a block of raw little-endian floats (0 for non-float dtypes); integer ops on a
    zero-copy view, so checking a copied tensor costs a fraction of copying it."""
    import numpy as np

    if dtype not in NON_FINITE_MASKS:
        return 0
    view, mask = NON_FINITE_MASKS[dtype]
    bits = np.frombuffer(block, dtype=view)
    return int(np.count_nonzero((bits & np.array(mask, dtype=view)) == mask))


def quantize_shard(shard: ShardHeader, rows: list[TensorPlan], out_path: Path, tmp_path: Path, device: str,
                   on_bytes=lambda n: None, recipe: Recipe | None = None, precomputed: Precomputed | None = None,
                   stats: dict | None = None) -> dict:
    """Stream one shard; atomic rename. `stats` (name -> tensor stats) receives what the writer quantized."""
    from safetensors import safe_open

    recipe = recipe or Recipe()
    precomputed = precomputed or Precomputed()
    tallies: dict[str, footprint.RoleTally] = {}
    entries: dict = {}
    digest = hashlib.sha256(shard.header_bytes)
    t0 = time.perf_counter()
    try:
        with open(shard.path, "rb") as raw, safe_open(str(shard.path), framework="pt", device="cpu") as st, \
                open(tmp_path, "wb") as out:
            out.write(shard.header_bytes)
            for p in rows:
                t = p.entry
                sq_err = sq_ref = 0.0
                if not p.quantized:
                    raw.seek(shard.data_start + t.start)
                    remaining = t.end - t.start
                    while remaining:
                        block = raw.read(min(COPY_CHUNK, remaining))
                        if not block:
                            raise OSError(f"unexpected end of file in {shard.file} while reading {t.name}")
                        bad = non_finite_count(t.dtype, block)
                        if bad:  # refused like a quantized tensor holding NaN/Inf: the output would carry it
                            raise BuildError(f"{t.name} ({shard.file}) holds {bad} NaN/Inf value(s); it is copied "
                                             "unchanged, so the output would hold them too: fix the source checkpoint")
                        out.write(block)
                        digest.update(block)
                        remaining -= len(block)
                    raw_t = st.get_tensor(t.name)
                    entries[t.name] = ({**store_pack.raw_spec(raw_t), "role": p.role.role.value}, {"raw": raw_t})
                else:
                    if t.name in precomputed:
                        dq = precomputed.get(t.name)
                        entries.update(precomputed.get_store(t.name))
                    else:
                        w = st.get_tensor(t.name).to(device)
                        res = weight_quant.quantize_weight(t.name, w, p, recipe)
                        dq, sq_err, sq_ref = res.dequant, res.sq_err, res.sq_ref
                        entries.update(res.store)
                        if stats is not None:
                            stats[t.name] = {"method": res.method, "statistics": None}
                        del w, res
                    data = tensor_bytes(dq.to("cpu"))
                    if data.nbytes != t.end - t.start:
                        raise BuildError(f"{t.name}: quantized tensor has {data.nbytes} bytes, expected {t.end - t.start}")
                    out.write(data)
                    digest.update(data)
                    del dq, data
                build_plan.tally_tensor(tallies, p, sq_err, sq_ref)
                on_bytes(t.end - t.start)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    if tmp_path.stat().st_size != shard.size:
        raise BuildError(f"{shard.file}: wrote {tmp_path.stat().st_size} bytes, source has {shard.size}")
    os.replace(tmp_path, out_path)
    store = write_store(out_path.parent / STORE_DIR / shard.file, entries)
    del entries
    seconds = time.perf_counter() - t0
    return {"output": {"bytes": shard.size, "sha256": digest.hexdigest()}, "store": store,
            "tallies": {k: v.to_dict() for k, v in sorted(tallies.items())},
            "timing": {"seconds": seconds, "MB_per_s": shard.size / 1e6 / max(seconds, 1e-9)}}


def shard_record_key(shard: ShardHeader, recipe: Recipe, quantizer: str, calib_id: str | None = None,
                     plan_sha: str | None = None) -> dict:
    key = {"source": shard.signature(), "recipe": recipe.as_dict(), "quantizer_sha256": quantizer}
    if calib_id is not None:
        key["calibration"] = calib_id
    if plan_sha is not None:
        key["bits_plan_sha256"] = plan_sha
    return key


def load_done_record(progress: Path, out: Path, shard: ShardHeader, key: dict) -> dict | None:
    """A completed shard's record, only if it matches this source + recipe + code and the file hashes the same."""
    marker = progress / f"{shard.file}.done.json"
    target = out / shard.file
    if not (marker.is_file() and target.is_file()):
        return None
    try:
        record = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    if record.get("key") != key or target.stat().st_size != record["output"]["bytes"]:
        return None
    if provenance.sha256_file(target) != record["output"]["sha256"]:
        return None
    store = record.get("store")
    if store is None or not store_intact(out, store):
        return None
    return record


def store_intact(out: Path, store: dict) -> bool:
    path = out / store["file"]
    return path.is_file() and path.stat().st_size == store["bytes"] and provenance.sha256_file(path) == store["sha256"]


def run_shards(todo, plans, out: Path, progress: Path, devices: list[str], records: dict, show: bool,
               recipe: Recipe, precomputed: Precomputed | None = None, writer=None) -> None:
    """Quantize the shards still to do; with several GPUs, shard i goes to device i % n (one thread each).
    `writer` is `quantize_shard` unless a test swaps it."""
    from tqdm import tqdm

    writer = writer or quantize_shard
    total = sum(shard.size for shard, _ in todo)
    lock = threading.Lock()
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc="quantize", disable=not show or not todo,
               file=sys.stderr, dynamic_ncols=True)

    def on_bytes(n):
        with lock:
            bar.update(n)

    def work(device: str, items):
        for shard, key in items:
            stats: dict = {}
            result = writer(shard, plans[shard.file], out / shard.file, progress / f"{shard.file}.partial", device,
                            on_bytes, recipe=recipe, precomputed=precomputed, stats=stats)
            record = {"key": key, **result, "tensor_stats": stats}
            atomic_io.write_json(progress / f"{shard.file}.done.json", record)
            with lock:
                records[shard.file] = record
                bar.set_postfix_str(shard.file, refresh=False)

    try:
        if len(devices) == 1:
            work(devices[0], todo)
        else:
            with ThreadPoolExecutor(max_workers=len(devices)) as pool:
                futures = [pool.submit(work, d, todo[i::len(devices)]) for i, d in enumerate(devices)]
                for f in futures:
                    f.result()
    finally:
        bar.close()
