"""Keys of pack_gguf.sh's intermediates (BF16 GGUF, mmproj, calibration text, imatrix): what each was made from.

pack_gguf.sh reuses an intermediate only when the inputs that made it are the inputs of this run, like
quant_save's done records: each one gets a sidecar <file>.inputs.json written after it is complete; a
missing or different sidecar means rebuild. Checkpoints are identified without hashing their weights
(see checkpoint_identity), so a same-named directory with other weights is not mistaken for the old one.
CLI: `python -m gguf_pack fresh|record FILE --value K=V --file K=PATH --checkpoint K=DIR`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import atomic_io


class StaleInputError(RuntimeError):
    """An input named in a key does not exist (or a checkpoint has no files to identify it by)."""


KEY_SUFFIX = ".inputs.json"
KEY_VERSION = 1


def file_identity(path: Path) -> dict:
    """Content identity of a small input file (recipe, calibration text, converter source): its sha256."""
    import provenance

    path = Path(path)
    if not path.is_file():
        raise StaleInputError(f"input {path} does not exist")
    return {"size": path.stat().st_size, "sha256": provenance.sha256_file(path)}


def checkpoint_identity(model_dir: Path) -> dict:
    """Identity of a checkpoint without hashing its weights: resolved path, config/tokenizer hashes, and per
    weight file its size, mtime and safetensors header hash (names, dtypes, shapes, offsets). Two
    checkpoints with the same directory name but other weights differ here."""
    import provenance

    model_dir = Path(model_dir).resolve()
    small = {}
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (model_dir / name).is_file():
            small[name] = provenance.sha256_file(model_dir / name)
    weights = []
    for f in sorted(model_dir.iterdir()):
        if f.suffix not in (".safetensors", ".bin", ".gguf") or not f.is_file():
            continue
        st = f.stat()
        entry = {"name": f.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        if f.suffix == ".safetensors":
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                entry["header_sha256"] = provenance.sha256_json(fh.read(min(n, 100 << 20)).decode("utf-8", "replace"))
        weights.append(entry)
    if not small and not weights:
        raise StaleInputError(f"checkpoint {model_dir} has no config or weight files")
    return {"path": str(model_dir), "files": small, "weights": weights}


def intermediate_key(values: Mapping[str, str], files: Mapping[str, str], checkpoints: Mapping[str, str]) -> dict:
    """Everything an intermediate was made from: plain values, files by content, checkpoints by identity."""
    return {"version": KEY_VERSION, "values": {k: str(v) for k, v in sorted(values.items())},
            "files": {k: file_identity(Path(v)) for k, v in sorted(files.items())},
            "checkpoints": {k: checkpoint_identity(Path(v)) for k, v in sorted(checkpoints.items())}}


def _key_diff(old: Mapping, new: Mapping, prefix: str = "") -> list:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += _key_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {str(a)[:60]} -> {str(b)[:60]}")
    return out


def stale_reason(target: Path, key: Mapping) -> str | None:
    """Why `target` cannot be reused under `key` (missing, no record, different inputs), or None."""
    target = Path(target)
    record = Path(str(target) + KEY_SUFFIX)
    if not target.is_file():
        return f"{target.name} does not exist"
    if not record.is_file():
        return f"{target.name} has no {record.name} (made by an older pack_gguf or by hand)"
    try:
        old = json.loads(record.read_text(encoding="utf-8"))
    except ValueError:
        return f"{record.name} is unreadable"
    if old != json.loads(json.dumps(key)):
        changes = _key_diff(old, json.loads(json.dumps(key)))
        return f"{target.name} was made from other inputs ({'; '.join(changes[:4])})"
    return None


def record_key(target: Path, key: Mapping) -> None:
    atomic_io.write_json(Path(str(target) + KEY_SUFFIX), key)
