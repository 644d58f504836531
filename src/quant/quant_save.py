"""The streaming PTQ builder: a HF checkpoint in, the same checkpoint with fake-quantized weights out.

The output has exactly the source's tensor names, shapes, dtypes and shard files, so anything that
loads the BF16 teacher (transformers, vLLM, the GGUF packer) loads the student unchanged, and the
evaluation measures precisely the weights a packer would store.

Why it is shaped this way:
* memory ~ the largest tensor: one shard at a time, one tensor at a time (safetensors `safe_open`);
  each output shard reuses its source's header bytes verbatim (same dtypes and shapes => same
  offsets) and tensors are streamed into place, so no shard is ever held in RAM;
* roles decide bits (`model_adapters`), the math is `moe_quant`, the accounting is `footprint`;
* resumable and honest about completeness: every shard is written to a temp name and renamed, then
  a per-shard record (source shard size/mtime/header hash + recipe + quantizer code hash + output
  hash) is written; a rerun reuses a shard only if its record matches and the file still hashes the
  same. `_ptq_meta.json` is written last, so its presence means "complete".

    python src/quant/quant_save.py --model DIR_OR_HUB_ID --out DIR [--expert-bits 3 --linear-bits 4 ...]
    python src/quant/quant_save.py --model DIR --dry-run        # roles, bits, footprint; writes nothing
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import struct
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import footprint
import model_adapters
import moe_quant
import provenance
from model_adapters import Recipe, Role

META_NAME = "_ptq_meta.json"
META_FORMAT = "moe-lowbit/ptq-meta/1"
PROGRESS_DIR = ".ptq_progress"
INDEX_NAME = "model.safetensors.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".ckpt", ".onnx")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
COPY_CHUNK = 64 << 20
MAX_HEADER_BYTES = 100 << 20
# Files whose source text decides the output bytes: a change invalidates resumed shards.
QUANTIZER_FILES = ("moe_quant.py", "quant_kernels_cpu.py", "model_adapters.py", "footprint.py", "quant_save.py")


class BuildError(RuntimeError):
    """A user-facing failure: printed as one line, exit code 2."""


@dataclass(frozen=True)
class BuildConfig:
    model: str
    out: str | None = None
    expert_bits: float = 3.0
    linear_bits: float = 4.0
    mtp_bits: float = 16.0
    group: int = 128
    clip_steps: int = 16
    clip_lo: float = 0.65
    device: str = "cpu"
    revision: str | None = None
    dry_run: bool = False
    list_tensors: bool = False
    force: bool = False
    progress: bool = True

    def recipe(self) -> Recipe:
        return Recipe(expert_bits=self.expert_bits, linear_bits=self.linear_bits, mtp_bits=self.mtp_bits,
                      group=self.group, clip_steps=self.clip_steps, clip_lo=self.clip_lo)


# ------------------------------------------------------------------------------------ source side
@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # byte offsets relative to the data section
    end: int


@dataclass(frozen=True)
class ShardHeader:
    file: str
    path: Path | None
    size: int
    mtime_ns: int
    header_sha256: str
    header_bytes: bytes | None  # the 8-byte length + JSON header, copied verbatim into the output
    tensors: tuple[TensorEntry, ...]  # in data-offset order

    @property
    def data_start(self) -> int:
        return len(self.header_bytes) if self.header_bytes is not None else 0

    def signature(self) -> dict:
        return {"file": self.file, "size": self.size, "mtime_ns": self.mtime_ns, "header_sha256": self.header_sha256}


@dataclass(frozen=True)
class Source:
    label: str  # what the user passed
    root: Path
    revision: str | None
    config: dict
    shards: tuple[ShardHeader, ...]
    has_index: bool

    def fingerprint(self) -> str:
        """Hash of config + shard headers + sizes: changes whenever the weights' layout or files do."""
        h = hashlib.sha256((self.root / "config.json").read_bytes() if (self.root / "config.json").exists() else b"")
        for s in self.shards:
            h.update(json.dumps([s.file, s.size, s.header_sha256]).encode())
        return h.hexdigest()


def read_shard_header(path: Path) -> ShardHeader:
    """Parse and validate a safetensors header without reading tensor data."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise ValueError("file shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", raw_len)
            if n <= 0 or n > MAX_HEADER_BYTES or 8 + n > size:
                raise ValueError(f"header length {n} does not fit the file size {size}")
            header_json = f.read(n)
        header = json.loads(header_json)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise BuildError(f"unreadable shard {path}: {e}") from None
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = (int(x) for x in info["data_offsets"])
            entries.append(TensorEntry(name, str(info["dtype"]), tuple(int(s) for s in info["shape"]), start, end))
        except (KeyError, TypeError, ValueError) as e:
            raise BuildError(f"unreadable shard {path}: bad header entry for {name!r} ({e})") from None
    entries.sort(key=lambda t: (t.start, t.end))
    pos = 0
    for t in entries:
        try:
            expected = math.prod(t.shape) * footprint.dtype_bits(t.dtype) // 8
        except ValueError as e:
            raise BuildError(f"unreadable shard {path}: tensor {t.name}: {e}") from None
        if t.start != pos or t.end - t.start != expected:
            raise BuildError(f"unreadable shard {path}: tensor {t.name} has offsets [{t.start}, {t.end}) but "
                             f"{expected} bytes were expected at {pos} (corrupt or non-contiguous header)")
        pos = t.end
    if 8 + n + pos != size:
        raise BuildError(f"unreadable shard {path}: data ends at byte {8 + n + pos} but the file has {size} bytes "
                         f"(truncated or padded download?)")
    raw = raw_len + header_json
    return ShardHeader(path.name, path, size, path.stat().st_mtime_ns, hashlib.sha256(raw).hexdigest(), raw,
                       tuple(entries))


def resolve_model(model: str, revision: str | None, headers_only: bool) -> tuple[Path, str | None, list | None]:
    """Local dir, or a hub id fetched with huggingface_hub (headers only for --dry-run)."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise BuildError(f"--model {model}: is a file; pass the checkpoint directory")
        root = path.resolve()
        # a hub cache snapshot dir (models--org--name/snapshots/<commit>) names its revision
        in_hub_cache = root.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", root.name)
        return root, root.name if in_hub_cache else None, None
    if not HUB_ID.match(model):
        raise BuildError(f"--model {model}: no such directory, and not a hub id of the form owner/name")
    try:
        import huggingface_hub
    except ImportError:
        raise BuildError("--model is a hub id but huggingface_hub is not installed (pip install huggingface_hub)") from None
    try:
        if headers_only:  # a dry run of a 200 GB model should not download it: configs + remote headers
            root = Path(huggingface_hub.snapshot_download(model, revision=revision, allow_patterns=["*.json"]))
            meta = huggingface_hub.get_safetensors_metadata(model, revision=revision)
            return root.resolve(), root.name, [meta]
        root = Path(huggingface_hub.snapshot_download(
            model, revision=revision,
            allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken", "*.py", "LICENSE*"]))
    except Exception as e:  # network, auth, missing repo: all end the run with one line
        raise BuildError(f"--model {model}: hub download failed: {provenance.redact(str(e)).splitlines()[0]}") from None
    return root.resolve(), root.name, None


def open_source(model: str, revision: str | None = None, headers_only: bool = False) -> Source:
    root, rev, remote = resolve_model(model, revision, headers_only)
    config_path = root / "config.json"
    if not config_path.is_file():
        raise BuildError(f"missing config.json in {root} (is --model a Hugging Face checkpoint directory?)")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise BuildError(f"unreadable config.json in {root}: {e}") from None
    if remote is not None:
        return Source(model, root, rev, config, _remote_headers(remote[0]), (root / INDEX_NAME).exists())
    index_path = root / INDEX_NAME
    if index_path.exists():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise BuildError(f"unreadable {index_path}: {e}") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (root / f).is_file()]
        if missing:
            raise BuildError(f"{INDEX_NAME} in {root} names shard files that are missing: {missing[:3]}")
    else:
        weight_map = None
        files = sorted(p.name for p in root.glob("*.safetensors"))
        if not files:
            raise BuildError(f"no *.safetensors files in {root} (only safetensors checkpoints are supported)")
        if len(files) > 1:
            raise BuildError(f"{len(files)} safetensors files in {root} but no {INDEX_NAME}; cannot tell which are "
                             f"the model's shards")
    shards = tuple(read_shard_header(root / f) for f in files)
    _check_names(shards, weight_map, root)
    return Source(model, root, rev, config, shards, weight_map is not None)


def _remote_headers(meta) -> tuple[ShardHeader, ...]:
    shards = []
    for file, fmeta in sorted(meta.files_metadata.items()):
        entries = sorted((TensorEntry(name, t.dtype, tuple(t.shape), *t.data_offsets) for name, t in fmeta.tensors.items()),
                         key=lambda t: t.start)
        shards.append(ShardHeader(file, None, 0, 0, "", None, tuple(entries)))
    return tuple(shards)


def _check_names(shards, weight_map: dict | None, root: Path) -> None:
    seen: dict[str, str] = {}
    for s in shards:
        for t in s.tensors:
            if t.name in seen:
                raise BuildError(f"tensor {t.name} appears in two shards ({seen[t.name]}, {s.file}) in {root}")
            seen[t.name] = s.file
    if weight_map is not None and seen != weight_map:
        bad = sorted(set(seen.items()) ^ set(weight_map.items()))[:3]
        raise BuildError(f"{INDEX_NAME} in {root} disagrees with the shard headers, e.g. {bad}")


# ------------------------------------------------------------------------------------------ plan
@dataclass(frozen=True)
class TensorPlan:
    entry: TensorEntry
    role: model_adapters.TensorRole
    spec: moe_quant.QuantSpec | None  # None: copied byte for byte


def plan_source(source: Source, recipe: Recipe) -> tuple[model_adapters.BaseAdapter, dict[str, list[TensorPlan]], list[str]]:
    """Role and spec for every tensor; refuses sources it would quantize wrongly (fp8 weights)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapter = model_adapters.adapter_for(source.config)
    for w in caught:
        print(f"quant_save: warning: {w.message}", file=sys.stderr)
    plans: dict[str, list[TensorPlan]] = {}
    unclassified = []
    for shard in source.shards:
        rows = []
        for t in shard.tensors:
            try:
                role = adapter.classify(t.name, t.shape)
            except ValueError as e:
                raise BuildError(str(e)) from None
            is_float = t.dtype in footprint.FLOAT_DTYPES
            if role.quantizable and t.dtype.startswith("F8") and recipe.bits_for(role.role) < 16:
                raise BuildError(f"{t.name} is {t.dtype}: fp8 checkpoints must be dequantized to BF16 first "
                                 f"(their block scales live in separate tensors)")
            spec = recipe.spec_for(role, is_float, len(t.shape))
            if role.role == Role.OTHER and is_float and len(t.shape) >= 2:
                unclassified.append(t.name)
            rows.append(TensorPlan(t, role, spec))
        plans[shard.file] = rows
    return adapter, plans, unclassified


def tally_plans(plans: dict[str, list[TensorPlan]]) -> dict[str, footprint.RoleTally]:
    tallies: dict[str, footprint.RoleTally] = {}
    for rows in plans.values():
        for p in rows:
            tallies.setdefault(p.role.role.value, footprint.RoleTally()).add(p.entry.shape, p.entry.dtype, p.spec,
                                                                             p.role.axis)
    return tallies


# ----------------------------------------------------------------------------------------- output
def quantizer_sha256() -> str:
    here = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for name in QUANTIZER_FILES:
        h.update((here / name).read_bytes())
    return h.hexdigest()


def check_out_dir(out: Path, source_root: Path) -> None:
    """Never write the input: refuse OUT equal to, inside, or containing the source directory."""
    out_r, src_r = out.resolve(), source_root.resolve()
    if out_r == src_r or src_r in out_r.parents:
        raise BuildError(f"--out {out} is inside the input {source_root}; choose a directory outside it")
    if out_r in src_r.parents:
        raise BuildError(f"--out {out} contains the input {source_root}; choose a directory outside it")


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _tensor_bytes(t) -> memoryview:
    import torch

    flat = t.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def quantize_shard(shard: ShardHeader, rows: list[TensorPlan], out_path: Path, tmp_path: Path, device: str,
                   on_bytes=lambda n: None) -> dict:
    """Stream one shard: header verbatim, each tensor quantized (or copied) into its offsets; atomic rename."""
    from safetensors import safe_open

    tallies: dict[str, footprint.RoleTally] = {}
    digest = hashlib.sha256(shard.header_bytes)
    t0 = time.perf_counter()
    try:
        with open(shard.path, "rb") as raw, safe_open(str(shard.path), framework="pt", device="cpu") as st, \
                open(tmp_path, "wb") as out:
            out.write(shard.header_bytes)
            for p in rows:
                t = p.entry
                if p.spec is None:
                    raw.seek(shard.data_start + t.start)
                    remaining = t.end - t.start
                    while remaining:
                        block = raw.read(min(COPY_CHUNK, remaining))
                        if not block:
                            raise OSError(f"unexpected end of file in {shard.file} while reading {t.name}")
                        out.write(block)
                        digest.update(block)
                        remaining -= len(block)
                    sq_err = sq_ref = 0.0
                else:
                    w = st.get_tensor(t.name).to(device)
                    res = moe_quant.quantize_tensor(w, p.spec, axis=p.role.axis, return_codes=False)
                    dq, sq_err, sq_ref = res.dequant, res.sq_err, res.sq_ref  # sums come from the kernel's pass
                    data = _tensor_bytes(dq.to("cpu"))
                    if data.nbytes != t.end - t.start:
                        raise BuildError(f"{t.name}: quantized tensor has {data.nbytes} bytes, expected {t.end - t.start}")
                    out.write(data)
                    digest.update(data)
                    del w, dq, data, res
                tallies.setdefault(p.role.role.value, footprint.RoleTally()).add(
                    t.shape, t.dtype, p.spec, p.role.axis, sq_err, sq_ref)
                on_bytes(t.end - t.start)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    if tmp_path.stat().st_size != shard.size:
        raise BuildError(f"{shard.file}: wrote {tmp_path.stat().st_size} bytes, source has {shard.size}")
    os.replace(tmp_path, out_path)
    seconds = time.perf_counter() - t0
    return {"output": {"bytes": shard.size, "sha256": digest.hexdigest()},
            "tallies": {k: v.to_dict() for k, v in sorted(tallies.items())},
            "timing": {"seconds": seconds, "MB_per_s": shard.size / 1e6 / max(seconds, 1e-9)}}


def shard_record_key(shard: ShardHeader, recipe: Recipe, quantizer: str) -> dict:
    return {"source": shard.signature(), "recipe": recipe.as_dict(), "quantizer_sha256": quantizer}


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
    return record


def resolve_devices(device: str) -> list[str]:
    """cpu | cuda (every visible GPU; shards are split across them) | cuda:N."""
    if device == "cpu":
        return ["cpu"]
    if not re.fullmatch(r"cuda(:\d+)?", device):
        raise BuildError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    import torch

    if not torch.cuda.is_available():
        raise BuildError(f"--device {device}: CUDA is not available here; use --device cpu")
    if device == "cuda":
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if int(device.split(":")[1]) >= torch.cuda.device_count():
        raise BuildError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible")
    return [device]


def side_files(root: Path) -> list[Path]:
    """Config, tokenizer, processor, chat template, generation config, license: every non-weight file.
    Skipped: hidden files and `_*` files (tool metadata such as a manifest of the *source's* hashes)."""
    return sorted(p for p in root.iterdir()
                  if p.is_file() and not p.name.startswith((".", "_")) and p.name != INDEX_NAME
                  and not p.name.endswith(WEIGHT_SUFFIXES))


# ------------------------------------------------------------------------------------------ build
def as_config(args) -> BuildConfig:
    """Accepts a BuildConfig, an argparse Namespace or a dict (for bench scripts)."""
    if isinstance(args, BuildConfig):
        return args
    data = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    fields = {f.name for f in dataclasses.fields(BuildConfig)}
    unknown = set(data) - fields
    if unknown:
        raise BuildError(f"unknown build options {sorted(unknown)}; known: {sorted(fields)}")
    return BuildConfig(**data)


def build(args) -> dict:
    """Quantize `cfg.model` into `cfg.out` (or just plan it, for dry runs); returns the meta dict."""
    cfg = as_config(args)
    t_start = time.perf_counter()
    try:
        recipe = cfg.recipe()
    except ValueError as e:
        raise BuildError(str(e)) from None
    if not cfg.dry_run and not cfg.out:
        raise BuildError("--out is required (or pass --dry-run)")
    out = Path(cfg.out).expanduser() if cfg.out else None
    if out is not None and Path(cfg.model).expanduser().exists():
        check_out_dir(out, Path(cfg.model).expanduser())  # before any download or read
    devices = ["cpu"] if cfg.dry_run else resolve_devices(cfg.device)
    source = open_source(cfg.model, cfg.revision, headers_only=cfg.dry_run and not Path(cfg.model).exists())
    if out is not None:
        check_out_dir(out, source.root)
    adapter, plans, unclassified = plan_source(source, recipe)
    planned = footprint.summarize(tally_plans(plans))
    if unclassified:
        print(f"quant_save: warning: {len(unclassified)} floating matrices have no role and stay unquantized, "
              f"e.g. {unclassified[:3]}", file=sys.stderr)
    if cfg.dry_run:
        print_dry_run(source, adapter, plans, planned, recipe, cfg.list_tensors)
        return {"dry_run": True, "recipe": recipe.as_dict(), "adapter": adapter.name, "footprint": planned,
                "unclassified": unclassified}

    quantizer = quantizer_sha256()
    fingerprint = source.fingerprint()
    existing = _existing_build(out, source, recipe, quantizer, fingerprint, cfg.force)
    if existing is not None:
        print(f"quant_save: {out} already holds this build (complete); nothing to do", file=sys.stderr)
        return existing
    progress = out / PROGRESS_DIR
    progress.mkdir(parents=True, exist_ok=True)  # marks OUT as ours (an interrupted build resumes here)

    records: dict[str, dict] = {}
    resumed: list[str] = []
    todo = []
    for shard in source.shards:
        key = shard_record_key(shard, recipe, quantizer)
        rec = load_done_record(progress, out, shard, key)
        if rec is None:
            todo.append((shard, key))
        else:
            records[shard.file] = rec
            resumed.append(shard.file)
    if resumed:
        print(f"quant_save: resuming: {len(resumed)}/{len(source.shards)} shards already done", file=sys.stderr)
    _run_shards(todo, plans, out, progress, devices, records, cfg.progress)

    copied = []
    for f in side_files(source.root):
        tmp = out / (f.name + ".tmp")
        shutil.copyfile(f, tmp)
        os.replace(tmp, out / f.name)
        copied.append(f.name)
    if source.has_index:
        weight_map = {t.name: s.file for s in source.shards for t in s.tensors}
        total = sum(t.end - t.start for s in source.shards for t in s.tensors)
        _write_json_atomic(out / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})

    tallies: dict[str, footprint.RoleTally] = {}
    for shard in source.shards:
        for role, d in records[shard.file]["tallies"].items():
            tallies.setdefault(role, footprint.RoleTally()).merge(footprint.RoleTally.from_dict(d))
    done_bytes = sum(records[s.file]["output"]["bytes"] for s, _ in todo)
    seconds = time.perf_counter() - t_start
    meta = {
        "format": META_FORMAT,
        "complete": True,
        "source": {"model": source.label, "path": str(source.root), "revision": source.revision,
                   "model_type": source.config.get("model_type"), "fingerprint_sha256": fingerprint,
                   "shards": len(source.shards), "tensors": sum(len(s.tensors) for s in source.shards),
                   "bytes": sum(s.size for s in source.shards)},
        "adapter": {"name": adapter.name, "guessed": adapter.is_guess},
        "recipe": recipe.as_dict(),
        "quantizer_sha256": quantizer,
        "footprint": footprint.summarize(tallies),
        "unclassified": unclassified,
        "shards": {s.file: {"source": s.signature(), "output": records[s.file]["output"]} for s in source.shards},
        "index": INDEX_NAME if source.has_index else None,
        "copied_files": copied,
        "timings": {"total_seconds": seconds, "quantized_MB_per_s": done_bytes / 1e6 / max(seconds, 1e-9),
                    "resumed_shards": resumed, "devices": devices,
                    "shards": {f: r.get("timing") for f, r in records.items() if f not in resumed}},
        "provenance": provenance.record(),
    }
    _write_json_atomic(out / META_NAME, meta)
    shutil.rmtree(progress, ignore_errors=True)
    print(footprint.format_table(meta["footprint"]), file=sys.stderr)
    print(f"quant_save: wrote {out} in {seconds:.1f} s", file=sys.stderr)
    return meta


def _existing_build(out: Path, source: Source, recipe: Recipe, quantizer: str, fingerprint: str, force: bool):
    """The meta of a complete identical build in OUT; refuses to overwrite anything else without --force."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise BuildError(f"--out {out} exists and is not a directory")
    meta_path = out / META_NAME
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            meta = {}
        same = (meta.get("recipe") == recipe.as_dict() and meta.get("quantizer_sha256") == quantizer
                and meta.get("source", {}).get("fingerprint_sha256") == fingerprint)
        shards = meta.get("shards", {})
        intact = all((out / s.file).is_file() and (out / s.file).stat().st_size == shards.get(s.file, {}).get(
            "output", {}).get("bytes") for s in source.shards)
        if same and intact:
            return meta
        if not force:
            what = ("this build, but some shard files are missing or changed" if same else
                    "a complete build of a different source/recipe/quantizer")
            raise BuildError(f"--out {out} holds {what}; pass --force to rebuild it or choose another --out")
        meta_path.unlink()  # from here on OUT no longer looks complete
        return None
    if any(out.iterdir()) and not (out / PROGRESS_DIR).is_dir() and not force:
        raise BuildError(f"--out {out} is not empty and holds no quant_save build; choose an empty directory "
                         f"(or pass --force to write into it)")
    return None


def _run_shards(todo, plans, out: Path, progress: Path, devices: list[str], records: dict, show: bool) -> None:
    """Quantize the shards still to do; with several GPUs, shard i goes to device i % n (one thread each)."""
    from tqdm import tqdm

    total = sum(shard.size for shard, _ in todo)
    lock = threading.Lock()
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc="quantize", disable=not show or not todo,
               file=sys.stderr, dynamic_ncols=True)

    def on_bytes(n):
        with lock:
            bar.update(n)

    def work(device: str, items):
        for shard, key in items:
            result = quantize_shard(shard, plans[shard.file], out / shard.file,
                                    progress / f"{shard.file}.partial", device, on_bytes)
            record = {"key": key, **result}
            _write_json_atomic(progress / f"{shard.file}.done.json", record)
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


def print_dry_run(source: Source, adapter, plans, planned: dict, recipe: Recipe, list_tensors: bool) -> None:
    print(f"model: {source.label} ({source.config.get('model_type')}, adapter {adapter.name}"
          f"{', GUESSED from names' if adapter.is_guess else ''}); {len(source.shards)} shard(s)")
    print(f"recipe: {json.dumps(recipe.as_dict())}")
    examples: dict[str, list[str]] = {}
    for rows in plans.values():
        for p in rows:
            examples.setdefault(p.role.role.value, []).append(p.entry.name)
            if list_tensors:
                bits = "16 (kept)" if p.spec is None else f"{p.spec.bits:g} axis {p.role.axis}"
                print(f"  {p.role.role.value:<17}{bits:<14}{p.entry.dtype:<6}{list(p.entry.shape)}  {p.entry.name}")
    for role in sorted(examples):
        print(f"  {role:<17} e.g. {', '.join(examples[role][:2])}")
    print(footprint.format_table(planned))


# -------------------------------------------------------------------------------------------- CLI
def parse_args(argv=None) -> BuildConfig:
    ap = argparse.ArgumentParser(
        prog="quant_save.py",
        description="Fake-quantize a HF safetensors checkpoint by tensor role (routed experts at --expert-bits, "
                    "other linears at --linear-bits, routers/norms/vision kept), streaming one tensor at a time. "
                    "The output keeps the source's names, shapes, dtypes and shards.")
    ap.add_argument("--model", required=True, help="local checkpoint dir, or a hub id (owner/name)")
    ap.add_argument("--out", help="output dir (must not be inside the input); required unless --dry-run")
    ap.add_argument("--expert-bits", type=float, default=3.0, help="bits for routed experts (default 3)")
    ap.add_argument("--linear-bits", type=float, default=4.0,
                    help="bits for attention, linear attention, shared experts, dense MLP, embed, lm_head (default 4)")
    ap.add_argument("--mtp-bits", type=float, default=16.0, help="bits for multi-token-prediction weights (default 16)")
    ap.add_argument("--group", type=int, default=128, help="quantization group size along the input axis")
    ap.add_argument("--clip-steps", type=int, default=16, help="clip-ratio candidates in the MSE search (0 = absmax)")
    ap.add_argument("--clip-lo", type=float, default=0.65, help="smallest clip ratio searched")
    ap.add_argument("--device", default="cpu", help="cpu | cuda (all GPUs split the shards) | cuda:N")
    ap.add_argument("--revision", help="hub revision (branch, tag or commit) when --model is a hub id")
    ap.add_argument("--dry-run", action="store_true", help="print roles, bits and footprint; write nothing")
    ap.add_argument("--list-tensors", action="store_true", help="with --dry-run: one line per tensor")
    ap.add_argument("--force", action="store_true", help="overwrite an OUT holding another build or other files")
    ap.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bar")
    return BuildConfig(**vars(ap.parse_args(argv)))


def main(argv=None) -> int:
    try:
        build(parse_args(argv))
    except BuildError as e:
        print(f"quant_save: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permissions, a shard vanishing mid-run
        print(f"quant_save: error: {e.__class__.__name__}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("quant_save: interrupted; rerun the same command to resume from the completed shards", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
