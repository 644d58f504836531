"""Reading a source checkpoint without loading it: safetensors headers, the index, the hub, side files.

Everything here is validated up front (offsets contiguous, sizes matching, every indexed shard present,
no tensor in two shards), so a truncated download or a corrupt header ends the build with one line
before any output exists. Tensor data is only read later, one tensor at a time (`load_tensor`).
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import footprint
import model_ref
import provenance

INDEX_NAME = "model.safetensors.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".ckpt", ".onnx")
MAX_HEADER_BYTES = 100 << 20


class BuildError(RuntimeError):
    """A user-facing failure: printed as one line, exit code 2."""


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
    """Local dir, or a hub id (model_ref's allow-list; configs + remote headers only for --dry-run)."""
    try:
        ref = model_ref.parse(model, revision)
        if ref.kind != "hub":
            root = model_ref.resolve(model, revision, require_config=False)
            return root, model_ref.snapshot_revision(root), None
        root = model_ref.hub_snapshot(ref, headers_only=headers_only).resolve()
    except model_ref.ModelRefError as e:
        raise BuildError(str(e)) from None
    if not headers_only:
        return root, root.name, None
    import huggingface_hub

    try:
        meta = huggingface_hub.get_safetensors_metadata(model, revision=revision)
    except Exception as e:  # network, auth: one line
        raise BuildError(f"--model {model}: remote headers unreadable: {provenance.redact(str(e)).splitlines()[0]}") from None
    return root, root.name, [meta]


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
    check_shapes_against_config(shards, config)
    return Source(model, root, rev, config, shards, weight_map is not None)


def _config_ints(config, out: set) -> set:
    for value in (config.values() if isinstance(config, dict) else config if isinstance(config, list) else ()):
        if isinstance(value, bool):
            continue
        if isinstance(value, int) and value > 0:
            out.add(value)
        elif isinstance(value, (dict, list)):
            _config_ints(value, out)
    return out


def check_shapes_against_config(shards, config: dict) -> None:
    """Header shapes that contradict config.json are refused before any tensor is read (a corrupt header
    would otherwise end in a MemoryError, or in a model that does not match its config): the embedding
    and LM head must be [vocab_size, hidden_size], a layer index must be below num_hidden_layers, and no
    dimension may exceed twice the largest size the config names (fused tensors stay within that)."""
    text = config.get("text_config") or config
    vocab, hidden, layers = (text.get(k) or config.get(k) for k in ("vocab_size", "hidden_size", "num_hidden_layers"))
    bound = 2 * max(_config_ints(config, set()) | {1})
    for s in shards:
        for t in s.tensors:
            why = None
            if vocab and hidden and re.search(r"(^|\.)(embed_tokens|lm_head)\.weight$", t.name) and \
                    not t.name.startswith(("visual.", "model.visual.", "mtp.")) and tuple(t.shape) != (vocab, hidden):
                why = f"expected [vocab_size={vocab}, hidden_size={hidden}]"
            elif layers and (m := re.search(r"(?:^|\.)layers\.(\d+)\.", t.name)) and int(m.group(1)) >= layers \
                    and not re.search(r"visual|vision|audio|mtp", t.name):  # towers count their own layers
                why = f"layer {m.group(1)} but num_hidden_layers={layers}"
            elif any(d > bound for d in t.shape):
                why = f"a dimension above {bound}, twice the largest size in config.json"
            if why:
                raise BuildError(f"{s.file}: tensor {t.name} has shape {list(t.shape)}, which contradicts "
                                 f"config.json ({why})")


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


def side_files(root: Path) -> list[Path]:
    """Config, tokenizer, processor, chat template, generation config, license: every non-weight file.
    Skipped: hidden files and `_*` files (tool metadata such as a manifest of the *source's* hashes)."""
    return sorted(p for p in root.iterdir()
                  if p.is_file() and not p.name.startswith((".", "_")) and p.name != INDEX_NAME
                  and not p.name.endswith(WEIGHT_SUFFIXES))


def check_out_dir(out: Path, source_root: Path) -> None:
    """Never write the input: refuse OUT equal to, inside, or containing the source directory."""
    out_r, src_r = out.resolve(), source_root.resolve()
    if out_r == src_r or src_r in out_r.parents:
        raise BuildError(f"--out {out} is inside the input {source_root}; choose a directory outside it")
    if out_r in src_r.parents:
        raise BuildError(f"--out {out} contains the input {source_root}; choose a directory outside it")


def tensor_locations(source: Source) -> dict[str, tuple[ShardHeader, TensorEntry]]:
    """name -> (shard, entry) for every tensor of the source."""
    return {t.name: (s, t) for s in source.shards for t in s.tensors}


def load_tensor(shard: ShardHeader, name: str, device: str = "cpu"):
    """One tensor's data (only that tensor is read)."""
    from safetensors import safe_open

    with safe_open(str(shard.path), framework="pt", device="cpu") as st:
        t = st.get_tensor(name)
    return t.to(device) if device != "cpu" else t
