"""The one reader of a quant_save build's `_ptq_meta.json` (base layer): validated into a frozen dataclass.

Every consumer (evaluation, smoke, GGUF packer, OPD, merge, exporters, the verifier) reads a build through
here, so which keys a complete build must have is said once; ptq_store.py reads its codes and its recipe.

    meta = ptq_meta.read_meta(DIR)          # PtqMeta, or MetaError naming the file and the missing key
    recipe = ptq_store.recipe_of(meta.data)   # model_adapters.Recipe
    store = ptq_store.open_store(DIR)        # names(), entries(name), decode(name); a truncated file is refused
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


META_NAME = "_ptq_meta.json"
META_PREFIX = "moe-lowbit/ptq-meta/"
STORE_DIR = "_ptq_store"


class VerifyError(ValueError):
    """An export of a build that does not decode to its store (message: tensor and first differing element)."""


class MetaError(ValueError):
    """A build directory whose meta or store cannot be used (the message names the file and why)."""


@dataclass(frozen=True)
class PtqMeta:
    """A validated `_ptq_meta.json`. `data` is the full dict (read-only by convention); the fields are the keys
    every consumer relies on."""

    path: Path
    data: dict
    format: str
    complete: bool
    recipe_dict: dict
    shards: dict
    footprint: dict
    store: dict | None

    @property
    def dir(self) -> Path:
        return self.path.parent

    def get(self, key: str, default=None):
        return self.data.get(key, default)


def meta_path(build_dir: str | Path) -> Path:
    return Path(build_dir) / META_NAME


def has_meta(build_dir: str | Path) -> bool:
    return meta_path(build_dir).is_file()


def parse_meta(data, path: Path, require_complete: bool = True) -> PtqMeta:
    """Validate a meta dict (pure): the keys consumers index must be there with the right types."""
    if not isinstance(data, dict):
        raise MetaError(f"{path}: not a JSON object")
    fmt = data.get("format")
    if not isinstance(fmt, str) or not fmt.startswith(META_PREFIX):
        raise MetaError(f"{path}: format {fmt!r} is not {META_PREFIX}N (not a quant_save build)")
    if require_complete and data.get("complete") is not True:
        raise MetaError(f"{path}: does not say complete; rerun quant_save to finish the build")
    for key, kind in (("recipe", dict), ("shards", dict), ("footprint", dict)):
        if not isinstance(data.get(key), kind):
            raise MetaError(f"{path}: key {key!r} is missing or not a {kind.__name__}")
    for name, rec in data["shards"].items():
        out = rec.get("output") if isinstance(rec, dict) else None
        if not isinstance(out, dict) or not isinstance(out.get("bytes"), int) or not isinstance(out.get("sha256"), str):
            raise MetaError(f"{path}: shard {name!r} has no output bytes/sha256 record")
    if "total" not in data["footprint"]:
        raise MetaError(f"{path}: footprint has no 'total'")
    store = data.get("store")
    if store is not None and not (isinstance(store, dict) and isinstance(store.get("files"), dict)):
        raise MetaError(f"{path}: key 'store' has no 'files' record")
    return PtqMeta(path, data, fmt, bool(data.get("complete")), data["recipe"], data["shards"], data["footprint"], store)


def read_meta(build_dir: str | Path, require_complete: bool = True) -> PtqMeta:
    """The build's meta, validated; MetaError (one line) when absent, unreadable or incomplete."""
    path = meta_path(build_dir)
    if not path.is_file():
        raise MetaError(f"{build_dir} has no {META_NAME}: it is not a quant_save build (build it with "
                        f"bash pipelines/quantize.sh or src/quant/quant_save.py)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise MetaError(f"{path}: unreadable ({e.__class__.__name__}: {e})") from None
    return parse_meta(data, path, require_complete)


def read_dict(build_dir: str | Path) -> dict | None:
    """The meta as a plain dict when the directory has one (any state), else None (for reports)."""
    return read_meta(build_dir, require_complete=False).data if has_meta(build_dir) else None
