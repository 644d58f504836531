"""Bit-exact check of an export against the packed store it was written from.

    python src/quant/verify_export.py STORE EXPORT [--kind dequant|compressed-tensors|gguf]

STORE is a quant_save output dir (its `_ptq_meta.json` and `_ptq_store/`); EXPORT is what a user deploys:
the dequantized view (STORE itself, or a copy), a compressed-tensors dir, a GGUF file. The export is read
back with the reader its consumers use (safetensors; compressed-tensors' own decompressor; gguf-py's
dequantization) and every tensor the store holds must equal the store's decoded tensor after the same final
cast, element for element (bit for bit but for the sign of zero, which an integer code lacks). The first
difference is named (tensor, index, both values) and the exit status is 1; a
pass is written into the store's `_ptq_meta.json` under the export's record (`verified`). Unreadable
input: one line, exit 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import ptq_meta

from ptq_meta import VerifyError  # noqa: F401  (raised by the readers too)

if TYPE_CHECKING:
    import torch

    from ptq_store import Store




def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype and every element equal (==). The one bit pattern this allows to differ is the sign of
    zero: the quantizer's round() keeps it (-0.0 * scale), an integer code has none; NaN cannot occur (refused)."""
    import torch

    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a, b)


def first_difference(name: str, want: torch.Tensor, got: torch.Tensor) -> str:
    if tuple(want.shape) != tuple(got.shape):
        return f"tensor {name}: shape {tuple(got.shape)} in the export, {tuple(want.shape)} in the store"
    if want.dtype != got.dtype:
        return f"tensor {name}: dtype {got.dtype} in the export, {want.dtype} in the store"
    diff = want != got
    idx = tuple(int(i) for i in diff.nonzero()[0])
    n = int(diff.sum())
    return (f"tensor {name}: {n} element(s) differ, first at {list(idx)}: export {got[idx].item()!r}, "
            f"store {want[idx].item()!r}")


def detect_kind(export: Path) -> str:
    if (export.is_file() and export.suffix == ".gguf") or (export / "model.gguf").is_file():
        return "gguf"
    if export.is_dir() and (export / "config.json").is_file():
        import json

        qc = json.loads((export / "config.json").read_text()).get("quantization_config") or {}
        return "compressed-tensors" if qc.get("quant_method") == "compressed-tensors" else "dequant"
    raise VerifyError(f"{export}: neither a .gguf file nor a checkpoint directory with a config.json")


def export_tensors(export: Path, kind: str, store: Store):
    """name -> callable giving the export's tensor for that store name, in the store's dtype."""
    if kind == "dequant":
        return _safetensors_reader(export)
    if kind == "compressed-tensors":
        import export_ct

        return export_ct.reader(export, store)
    import gguf_export

    return gguf_export.reader(export, store)


def _safetensors_reader(export: Path):
    from safetensors import safe_open

    where = {}
    for f in sorted(export.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                where[k] = f

    def get(name: str):
        if name not in where:
            raise VerifyError(f"tensor {name} is in the store but not in the export {export}")
        with safe_open(str(where[name]), framework="pt") as st:
            return st.get_tensor(name)
    return get


def verify(store: Store, export: Path, kind: str | None = None, progress: bool = False) -> dict:
    """Compare every store tensor with the export's; VerifyError at the first mismatch, else a record."""
    export = Path(export)
    kind = kind or detect_kind(export)
    get = export_tensors(export, kind, store)
    names = store.names()
    checked = 0
    from tqdm import tqdm

    for name in tqdm(names, desc="verify", disable=not progress, file=sys.stderr):
        want = store.decode(name)
        got = get(name)
        if got is None:  # the format does not carry this tensor (reported by the reader's record)
            continue
        if not same_values(want, got):
            raise VerifyError(first_difference(name, want, got))
        checked += 1
    return {"ok": True, "kind": kind, "tensors_checked": checked, "tensors_in_store": len(names),
            "rule": "every element equal after the store's final cast (+0 == -0)"}


def record_result(store_dir: Path, export: Path, result: dict) -> bool:
    """Write `result` into the store's meta under the export it names (when the meta records that export)."""
    import atomic_io

    meta = ptq_meta.read_meta(store_dir).data
    exports = list((meta.get("exports") or {}).values())
    where = export.resolve() if export.is_dir() else export.resolve().parent  # a GGUF file: its export dir
    for rec in exports:
        if (store_dir / rec.get("name", ".")).resolve() == where:
            rec["verified"] = result
            atomic_io.write_json(ptq_meta.meta_path(store_dir), meta)
            return True
    return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="verify_export.py", description="Check bit for bit that an export (dequantized "
                                 "view, compressed-tensors dir, GGUF file) decodes to the packed store it came from.")
    ap.add_argument("store", help="quant_save output dir (has _ptq_meta.json and _ptq_store/)")
    ap.add_argument("export", help="the export: a checkpoint dir or a .gguf file")
    ap.add_argument("--kind", choices=("dequant", "compressed-tensors", "gguf"), help="default: detected")
    ap.add_argument("--no-record", action="store_true", help="do not write the verdict into the store's meta")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    args = ap.parse_args(argv)
    try:
        import ptq_store

        store = ptq_store.open_store(args.store)
        result = verify(store, Path(args.export), args.kind, args.progress)
    except VerifyError as e:
        print(f"verify_export: FAIL: {e}", file=sys.stderr)
        return 1
    except (ptq_meta.MetaError, OSError, ValueError) as e:
        print(f"verify_export: error: {e}", file=sys.stderr)
        return 2
    recorded = False if args.no_record else record_result(Path(args.store), Path(args.export), result)
    print(f"verify_export: OK: {result['tensors_checked']} tensors of {args.export} equal the store bit for bit"
          f"{' (recorded in the meta)' if recorded else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
