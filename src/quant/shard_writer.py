"""Writing output shards: the source header verbatim, each tensor quantized (or copied) into its offsets.

Same dtypes and shapes => same offsets, so an output shard reuses its source's header bytes and tensors
are streamed into place one at a time: no shard is ever held in RAM. Tensors the calibration pass has
already quantized (true-sequential methods need them before the next layer runs) were written in place into
the shard's `.partial` file by that pass (`InPlaceShards`), so each reaches the disk once; the writer fills in
the rest around them.

Resume: a shard is written to a temp name and renamed, then a record (source signature + recipe + code
hash + calibration identity + output sha256) is written; a rerun reuses a shard only if its record
matches and the file still hashes the same.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
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
                   "calib_source.py", "calib_quant.py", "calib_forward.py", "calib_checkpoint.py", "gguf_grids.py", "gptq.py",
                   "quant_result.py")


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
    """Tensors the calibration pass has already quantized and written in place into the shard's `.partial` file
    (`InPlaceShards`): the writer leaves their bytes where they are and only reads them back for the hash; their
    packed-store entries wait in `store_dir` (one small file per tensor, `InPlaceShards.write_entries`)."""

    def __init__(self, files=None, store_dir: Path | None = None):
        self.files = dict.fromkeys(files or ())
        self.store_dir = store_dir

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def __bool__(self) -> bool:
        return bool(self.files)

    def get_store(self, name: str) -> dict:
        """The store entries the calibration pass saved for `name` (store_pack.to_tensors)."""
        from safetensors import safe_open

        path = entries_path(self.store_dir, name) if self.store_dir is not None else None
        if path is None or not path.is_file():
            raise BuildError(f"{name}: the calibration pass left no store entries ({path}); rerun with --force")
        with safe_open(str(path), framework="pt", device="cpu") as st:
            flat = {k: st.get_tensor(k) for k in st.keys()}
        entries = store_pack.from_tensors(flat, name)
        if not entries:
            raise BuildError(f"{name}: {path} holds no store entries; rerun with --force")
        return entries


def entries_path(store_dir: Path, name: str) -> Path:
    return Path(store_dir) / f"{name}.safetensors"


class InPlaceShards:
    """Writes quantized tensors straight into the output shards' `.partial` files at their offsets (the output
    has the source's header, so a tensor's offsets are known before the shard is written): each calibrated
    tensor reaches the disk once. `verify` re-hashes a tensor's bytes (for a resumed calibration)."""

    def __init__(self, progress: Path, out: Path, source):
        self.progress, self.out = progress, out
        self.where = {t.name: (s, t) for s in source.shards for t in s.tensors}
        self.lock = threading.Lock()

    def partial(self, shard: ShardHeader) -> Path:
        return self.progress / f"{shard.file}.partial"

    def write(self, name: str, t) -> str:
        shard, entry = self.where[name]
        data = tensor_bytes(t.to("cpu"))
        if data.nbytes != entry.end - entry.start:
            raise BuildError(f"{name}: quantized tensor has {data.nbytes} bytes, expected {entry.end - entry.start}")
        path = self.partial(shard)
        with self.lock:
            if not path.is_file():
                with open(path, "wb") as f:
                    f.write(shard.header_bytes)
                    f.truncate(shard.size)  # sparse: only what is written takes space
        with open(path, "r+b") as f:
            f.seek(shard.data_start + entry.start)
            f.write(data)
        return hashlib.sha256(data).hexdigest()

    @property
    def store_dir(self) -> Path:
        return self.progress / "store_parts"

    def write_entries(self, name: str, entries: dict) -> None:
        """The packed-store entries of a calibrated tensor (codes, scales, zeros), kept until its shard is written."""
        from safetensors.torch import save

        atomic_io.write_bytes(entries_path(self.store_dir, name), save(store_pack.to_tensors(entries, with_spec=True)))

    def verify(self, name: str, sha256: str) -> bool:
        shard, entry = self.where[name]
        path = self.partial(shard)
        path = path if path.is_file() else self.out / shard.file
        if not path.is_file() or path.stat().st_size != shard.size:
            return False
        h = hashlib.sha256()
        with open(path, "rb") as f:
            f.seek(shard.data_start + entry.start)
            _copy_range(f, None, entry.end - entry.start, h, name)
        return h.hexdigest() == sha256


def _copy_range(src, dst, n: int, digest, name: str, finite_dtype: str | None = None) -> None:
    """Stream n bytes from src's position into digest (and dst, when given); with `finite_dtype`, a NaN/Inf is
    refused like one in a quantized tensor (the output would carry it)."""
    while n:
        block = src.read(min(COPY_CHUNK, n))
        if not block:
            raise OSError(f"unexpected end of file while reading {name}")
        bad = non_finite_count(finite_dtype, block) if finite_dtype else 0
        if bad:
            raise BuildError(f"{name} holds {bad} NaN/Inf value(s); it is copied unchanged, so the output would "
                             "hold them too: fix the source checkpoint")
        if dst is not None:
            dst.write(block)
        digest.update(block)
        n -= len(block)

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
    in_place = any(p.entry.name in precomputed for p in rows)
    if in_place and not tmp_path.is_file() and out_path.is_file():
        shutil.copyfile(out_path, tmp_path)  # calibrated tensors verified in a finished shard that must be redone
    try:
        with open(shard.path, "rb") as raw, safe_open(str(shard.path), framework="pt", device="cpu") as st, \
                open(tmp_path, "r+b" if in_place else "wb") as out:
            out.write(shard.header_bytes)
            for p in rows:
                t = p.entry
                sq_err = sq_ref = 0.0
                out.seek(shard.data_start + t.start)
                if not p.quantized:
                    raw.seek(shard.data_start + t.start)
                    _copy_range(raw, out, t.end - t.start, digest, f"{t.name} ({shard.file})", t.dtype)
                    raw_t = st.get_tensor(t.name)
                    entries[t.name] = ({**store_pack.raw_spec(raw_t), "role": p.role.role.value}, {"raw": raw_t})
                elif t.name in precomputed:  # already in place: read back for the hash only
                    _copy_range(out, None, t.end - t.start, digest, f"{t.name} of {tmp_path}")
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
            out.truncate(shard.size)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        if not in_place:  # a partial holding calibrated tensors is kept: a rerun verifies and reuses them
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
