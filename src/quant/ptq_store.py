"""Read access to a build's packed store (`_ptq_store/*.safetensors`, one file per output shard) and the
recipe its `_ptq_meta.json` records: the quant-layer half of the reader (ptq_meta, in the base layer, reads
and validates the meta itself).

    meta = ptq_meta.read_meta(DIR)
    store = ptq_store.open_store(DIR, meta)   # names(), entries(name), decode(name); a truncated file is refused
"""
from __future__ import annotations

import math
from pathlib import Path

import ptq_meta
import store_pack
from ptq_meta import STORE_DIR, MetaError, PtqMeta, VerifyError  # noqa: F401


def recipe_of(meta: dict):
    """The model_adapters.Recipe a meta dict records; MetaError when this code cannot rebuild it."""
    from model_adapters import Recipe

    rec = dict(meta.get("recipe") or {})
    unknown = sorted(set(rec) - set(Recipe.__dataclass_fields__))
    if unknown:
        raise MetaError(f"the recipe has fields {unknown} this model_adapters.Recipe does not know; "
                        f"the grid cannot be promised")
    if isinstance(rec.get("role_bits"), list):  # JSON pairs; a {role: bits} dict is Recipe's own form
        rec["role_bits"] = tuple(tuple(x) for x in rec["role_bits"])
    try:
        return Recipe(**rec)
    except (TypeError, ValueError) as e:
        raise MetaError(f"the recipe {rec} is not valid here: {e}") from None



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
        return read_parts(self, name, (*store_pack.PARTS, "raw"))

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
    meta = meta or ptq_meta.read_meta(build_dir)
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


def read_parts(store: Store, name: str, parts=("scales", "zeros")) -> dict[str, tuple[dict, dict]]:
    """Entry key -> (spec, {part: tensor}) of tensor `name`, reading only the parts asked (OPD reads the grid,
    scales and zero points, without the codes)."""
    from safetensors import safe_open

    if name not in store.index:
        raise MetaError(f"tensor {name} is not in the store at {store.dir / STORE_DIR}")
    f, specs = store.index[name]
    out = {}
    with safe_open(str(f), framework="pt", device="cpu") as st:
        keys = set(st.keys())
        for key, info in specs.items():
            out[key] = (info, {p: st.get_tensor(f"{key}.{p}") for p in parts if f"{key}.{p}" in keys})
    return out
