"""What quant_save writes after the shards: the store's record in the meta, then each `--emit` export.

Exports, each under a documented name in OUT and recorded in `_ptq_meta.json["exports"]` with its bytes and
sha256 (and the verifier's verdict):

* `dequant`             OUT itself: the source's shards with dequantized weights (the default; unchanged);
* `compressed-tensors`  OUT/compressed-tensors/: pack-quantized int4/int8 for stock vLLM (export_ct.py);
* `gguf`                OUT/gguf/model.gguf (+ model.gguf.map.json): our codes as Q4_0/Q8_0 blocks (gguf_export.py).
"""
from __future__ import annotations

from pathlib import Path

import store_record
from ckpt_source import BuildError

EMITS = ("dequant", "compressed-tensors", "gguf")
EXPORT_DIRS = {"compressed-tensors": "compressed-tensors", "gguf": "gguf"}


def parse_emit(text) -> tuple[str, ...]:
    """'dequant,gguf' -> ('dequant', 'gguf'); unknown names refused."""
    items = tuple(x.strip() for x in (text.split(",") if isinstance(text, str) else text) if x.strip())
    bad = [x for x in items if x not in EMITS]
    if bad or not items:
        raise BuildError(f"--emit {text!r}: choose a comma list of {', '.join(EMITS)}")
    return tuple(dict.fromkeys(items))


def finish(meta: dict, records: dict, out: Path, emit=("dequant",)) -> dict:
    """meta + the store record + every requested export (written into OUT before the meta marks it complete)."""
    try:
        meta["store"] = store_record.summarize(records, meta["footprint"]["total"])
    except store_record.StoreMismatch as e:
        raise BuildError(str(e)) from None
    meta["footprint"]["total"]["effective_bits_quantized_on_disk"] = meta["store"]["effective_bits_quantized"]
    meta["emit"] = list(emit)
    exports = {}
    for name in emit:
        if name == "dequant":
            exports[name] = store_record.dequant_record(meta)
        else:
            exports[name] = write_export(name, meta, out)
    meta["exports"] = exports
    if "dequant" not in emit:  # the shards were the build's working copy; the store and the exports are the output
        for f in [*meta["shards"], meta.get("index")]:
            if f:
                (out / f).unlink(missing_ok=True)
    return meta


def write_export(name: str, meta: dict, out: Path) -> dict:
    """Write one export of the build in OUT from its store, verify it, and return its record."""
    import ptq_meta
    import ptq_store
    import verify_export

    pm = ptq_meta.parse_meta(meta, out / ptq_meta.META_NAME, require_complete=False)
    store = ptq_store.open_store(out, pm)
    target = out / EXPORT_DIRS[name]
    import export_ct
    import gguf_export

    try:
        files = (export_ct if name == "compressed-tensors" else gguf_export).write(store, pm, target)
        verified = verify_export.verify(store, target, kind=name)
    except (export_ct.CtExportError, gguf_export.GgufExportError, verify_export.VerifyError, ptq_meta.MetaError) as e:
        import shutil

        shutil.rmtree(target, ignore_errors=True)  # nothing half-written or unverified is kept
        raise BuildError(f"--emit {name}: {e}") from None
    return {"name": EXPORT_DIRS[name], **store_record.file_record(files, out), "verified": verified}


def store_intact(out: Path, meta: dict) -> bool:
    """Every store file and export the meta records is there with its size and sha256 (for build reuse)."""
    import provenance

    recorded = dict((meta.get("store") or {}).get("files") or {})
    for name, exp in (meta.get("exports") or {}).items():
        if name != "dequant":
            recorded.update(exp["files"])
    if not (meta.get("store") or {}).get("files"):
        return False
    return all((out / f).is_file() and (out / f).stat().st_size == r["bytes"] and provenance.sha256_file(out / f) == r["sha256"]
               for f, r in recorded.items())


def export_existing(build: Path, name: str) -> dict:
    """The `name` export of a finished build (pack_gguf --from-store): written from its store, verified, and
    recorded in its _ptq_meta.json; a failure is one BuildError line and leaves the meta as it was."""
    import atomic_io
    import ptq_meta

    build = Path(build)
    meta = ptq_meta.read_meta(build)
    if name == "gguf" and not all((build / f).is_file() for f in meta.shards):
        raise BuildError(f"{build} has no dequantized view (built without --emit dequant); llama.cpp's converter "
                         f"reads it for the metadata and tensor order: rebuild with --emit dequant,gguf")
    data = meta.data
    data.setdefault("exports", {})[name] = write_export(name, data, build)
    atomic_io.write_json(ptq_meta.meta_path(build), data)
    return data["exports"][name]
