"""The one reader of a quant_save build: its `_ptq_meta.json` (validated), its recipe, and its packed store.

Every consumer (evaluation, smoke, GGUF packer, OPD, merge, exporters, the verifier) reads a build through
here, so what a build is - which keys it must have, where the codes live, how they decode - is said once.

    meta = ptq_meta.read_meta(DIR)          # PtqMeta, or MetaError naming the file and the missing key
    recipe = meta.recipe()                  # model_adapters.Recipe
    store = ptq_meta.open_store(DIR)        # names(), entries(name), decode(name); a truncated file is refused
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import store_pack

META_NAME = "_ptq_meta.json"
META_PREFIX = "moe-lowbit/ptq-meta/"
STORE_DIR = "_ptq_store"


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

    def recipe(self):
        """The build's model_adapters.Recipe (role_bits back to tuples)."""
        try:
            return recipe_of(self.data)
        except MetaError as e:
            raise MetaError(f"{self.path}: {e}") from None

    def get(self, key: str, default=None):
        return self.data.get(key, default)


def recipe_of(meta: dict):
    """The model_adapters.Recipe a meta dict records; MetaError when this code cannot rebuild it."""
    from model_adapters import Recipe

    rec = dict(meta.get("recipe") or {})
    unknown = sorted(set(rec) - set(Recipe.__dataclass_fields__))
    if unknown:
        raise MetaError(f"the recipe has fields {unknown} this model_adapters.Recipe does not know; "
                        f"the grid cannot be promised")
    if "role_bits" in rec:
        rec["role_bits"] = tuple(tuple(x) for x in rec["role_bits"])
    try:
        return Recipe(**rec)
    except (TypeError, ValueError) as e:
        raise MetaError(f"the recipe {rec} is not valid here: {e}") from None


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


# ---------------------------------------------------------------------------------------------- store
class Store:
    """Read access to a build's packed store (`_ptq_store/*.safetensors`): one file per output shard."""

    def __init__(self, build_dir: Path, files: list[Path]):
        self.dir = build_dir
        self.files = files
        self.index: dict[str, tuple[Path, dict[str, dict]]] = {}  # tensor name -> (file, entry key -> spec)
        from safetensors import safe_open

        for f in files:
            try:
                with safe_open(str(f), framework="pt", device="cpu") as st:
                    header = st.metadata()
            except Exception as e:  # safetensors raises its own error types for truncated/garbled files
                raise MetaError(f"store file {f} is unreadable (truncated or not safetensors): {e}") from None
            try:
                entries = store_pack.parse_header_metadata(header)
            except ValueError as e:
                raise MetaError(f"store file {f}: {e}") from None
            for key, info in entries.items():
                name = key.split("#", 1)[0]
                self.index.setdefault(name, (f, {}))[1][key] = info

    def names(self) -> list[str]:
        return sorted(self.index)

    def specs(self, name: str) -> dict[str, dict]:
        return self.index[name][1]

    def entries(self, name: str) -> dict[str, tuple[dict, dict]]:
        """Entry key -> (spec, parts) of tensor `name` (one entry, or one per expert slice `name#E`)."""
        from safetensors import safe_open

        if name not in self.index:
            raise MetaError(f"tensor {name} is not in the store at {self.dir / STORE_DIR}")
        f, specs = self.index[name]
        out = {}
        with safe_open(str(f), framework="pt", device="cpu") as st:
            keys = set(st.keys())
            for key, info in specs.items():
                parts = {p: st.get_tensor(f"{key}.{p}") for p in (*store_pack.PARTS, "raw") if f"{key}.{p}" in keys}
                out[key] = (info, parts)
        return out

    def decode(self, name: str):
        """Tensor `name` exactly as the build's dequantized view holds it (codes x scales, one cast)."""
        import torch

        entries = self.entries(name)
        if name in entries:
            return store_pack.decode(entries[name][1], entries[name][0])
        slices = sorted(entries, key=lambda k: int(k.split("#", 1)[1]))
        return torch.stack([store_pack.decode(entries[k][1], entries[k][0]) for k in slices])

    def is_quantized(self, name: str) -> bool:
        return any(i["kind"] == "quant" for i in self.specs(name).values())

    def quantized_weights(self) -> int:
        return sum(math.prod(i["shape"]) for _, specs in self.index.values() for i in specs.values()
                   if i["kind"] == "quant")


def open_store(build_dir: str | Path, meta: PtqMeta | None = None) -> Store:
    """The build's store; every file the meta records must be there with its recorded size."""
    build_dir = Path(build_dir)
    meta = meta or read_meta(build_dir)
    if not meta.store:
        raise MetaError(f"{meta.path}: this build has no packed store (built before the store existed); rebuild it")
    files = []
    for rel, rec in sorted(meta.store["files"].items()):
        f = build_dir / rel
        if not f.is_file():
            raise MetaError(f"store file {f} is missing")
        if f.stat().st_size != rec["bytes"]:
            raise MetaError(f"store file {f} has {f.stat().st_size} bytes, the meta records {rec['bytes']} (truncated?)")
        files.append(f)
    return Store(build_dir, files)
