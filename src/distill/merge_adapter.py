"""Merge a trained OPD adapter into the student: new codes Q_s(W + scaling * B A) on the student's STORED grid
(scales, zero points, code range unchanged), written as a NEW packed store plus the exports the student's
build emitted (the dequantized view, GGUF, compressed-tensors: `export_run.finish`, each verified).

Why this way: the store is the product, so the merge writes codes, not a BF16 file. The rounding is plain
round-to-nearest onto the stored scales: exactly the training forward's function (lora_quant.FixedGrid, or
opd_kgrid.KFixedGrid on a K type: the same d, sub-scales and sub-mins, new codes), so
the merged model's logits are the trained ones. W is what training used (opd_grid.base_is_source): the
source for a clip/rtn student, the student's decoded weight for a calibrated one. Only the codes of the
adapted tensors change; scales, zero points and every other entry are copied, so the footprint is the
student's to the byte (checked: effective bits and store bytes equal, else nothing is kept). One tensor is
in memory at a time (one store file's entries, at most): never the whole source, never a temporary copy.

    python src/distill/merge_adapter.py --run RUN_DIR --out MERGED_DIR [--student DIR] [--source DIR]
                                        [--emit dequant,gguf] [--force]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import struct
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import atomic_io
import opd_data
import provenance
from opd_data import OpdInputError

if TYPE_CHECKING:
    import torch

MERGE_RECORD = "_opd_merge.json"
EXPORT_DIRS = ("gguf", "compressed-tensors")


def read_header(path: Path) -> tuple[bytes, dict]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        raw = f.read(n)
    return struct.pack("<Q", n) + raw, {k: v for k, v in json.loads(raw).items() if k != "__metadata__"}


def expert_delta(A: torch.Tensor, B: torch.Tensor, scaling: float, expert: int | None) -> torch.Tensor:
    """scaling * B A of one weight (or one expert of a fused one), fp32: the order lora_delta_into uses."""
    import torch  # here, not at the top: --help must not load it

    if expert is not None:
        A, B = A[expert], B[expert]
    return torch.matmul(B.float(), A.float()).mul_(scaling)


def merged_codes(w: torch.Tensor, delta: torch.Tensor, info: dict, parts: dict, key: str = "") -> torch.Tensor:
    """Packed codes of Q_s(w + delta) on the entry's stored grid (w, delta: the entry's shape, fp32): the flat
    grids through lora_quant.FixedGrid, llama.cpp's K types through opd_kgrid (the same d, sub-scales and
    sub-mins, new codes), each the training forward's own arithmetic."""
    import torch  # here, not at the top: --help must not load it

    import lora_quant
    import moe_quant
    import opd_kgrid
    import store_pack

    try:
        is_k = opd_kgrid.entry_type(info) is not None
        if is_k:  # K grids hold the contraction axis last
            x = opd_kgrid.entry_grid(key, info, parts).codes_(delta.add(w).movedim(info["axis"], -1).contiguous())
    except opd_kgrid.KGridError as e:
        raise OpdInputError(str(e) if key in str(e) else f"store entry {key}: {e}") from None
    if not is_k:
        zeros = store_pack.unpacked_zeros(parts, info)
        spec = moe_quant.QuantSpec(bits=info["bits"], group=info["group"])
        shape = tuple(info["shape"])
        in_scale = parts.get("in_scale")  # AWQ: [*lead, K], one row block
        grid = lora_quant.FixedGrid(parts["scales"], None if zeros is None else zeros.float(), info["axis"], spec,
                                    shape, (float(info["lo"]), float(info["hi"])),
                                    in_scale=None if in_scale is None else in_scale.reshape(*shape[:-2], 1, shape[-1]))
        x = grid.codes_(delta.add(w)).movedim(info["axis"], -1)
    u = (x.to(torch.int16) - int(info["lo"])).to(torch.uint8)
    return torch.from_numpy(store_pack.pack_codes(u.contiguous().numpy(), info["width"]))


class BaseReader:
    """W of one store entry as training saw it: the source's tensor (clip/rtn) or the student's decoded one."""

    def __init__(self, store, source: Path | None):
        self.store, self.source, self.files = store, source, {}
        if source is not None:
            from safetensors import safe_open

            for f in sorted(Path(source).glob("*.safetensors")):
                with safe_open(str(f), "pt") as h:
                    self.files.update({k: f for k in h.keys()})

    def weight(self, name: str, key: str, info: dict, parts: dict) -> torch.Tensor:
        import store_pack

        if self.source is None:
            return store_pack.decode(parts, info).float()  # = the student's dequantized tensor, as trained
        from safetensors import safe_open

        if name not in self.files:
            raise OpdInputError(f"the source {self.source} has no tensor {name}")
        with safe_open(str(self.files[name]), "pt") as h:
            w = h.get_slice(name)[int(key.split("#", 1)[1])] if "#" in key else h.get_tensor(name)
        return w.float()


def merge_store(store, adapter: dict, targets: list, scaling: float, base: BaseReader, out: Path) -> tuple[dict, dict]:
    """Write OUT/_ptq_store/* with the adapted entries' codes re-rounded; (shard records, stats)."""
    import torch  # here, not at the top: --help must not load it

    import layer_io
    import opd_grid
    import shard_writer

    slots = opd_grid.entry_slots(store, [t.name for t in targets])
    by_key = {key: slot for t in targets for key, _, slot in slots.get(t.name, [])}
    missing = [t.name for t in targets if t.name not in slots]
    if missing:
        raise OpdInputError(f"the student's store has no entries for adapted tensor {missing[0]}")
    names_by_file: dict[Path, list[str]] = {}
    for name in store.names():
        names_by_file.setdefault(store.index[name][0], []).append(name)
    records, stats = {}, {"entries": 0, "replaced": 0, "changed": 0, "copied_from_student": 0}
    for f in sorted(names_by_file):
        entries = {}
        for name in names_by_file[f]:
            for key, (info, parts) in store.entries(name).items():
                stats["entries"] += 1
                slot = by_key.get(key)
                if slot is None:
                    entries[key] = (info, parts)
                    stats["copied_from_student"] += 1
                    continue
                A, B = adapter[f"{slot.name}::A"], adapter[f"{slot.name}::B"]
                full = expert_delta(A, B, scaling, slot.expert)
                delta = full if slot.expert is None else layer_io.slot_view(full.unsqueeze(0),
                                                                            layer_io.Slot(slot.name, 0, slot.part))
                w = base.weight(name, key, info, parts)
                if tuple(delta.shape) != tuple(w.shape):
                    raise OpdInputError(f"adapter of {slot.name} gives {list(delta.shape)} for {key}, stored {list(w.shape)}")
                codes = merged_codes(w, delta, info, parts, key)
                stats["replaced"] += 1
                stats["changed"] += int(not torch.equal(codes, parts["codes"]))
                entries[key] = (info, {**parts, "codes": codes})
        rec = shard_writer.write_store(out / f.relative_to(store.dir), entries)
        records[f.name] = {"store": rec}
    return records, stats


def write_dequant(student: Path, meta: dict, out: Path) -> dict:
    """The dequantized view of the NEW store, in the student's exact shard layout (headers reused verbatim);
    returns the shards' new {bytes, sha256} (the meta's `shards[*].output`)."""
    import torch  # here, not at the top: --help must not load it

    import ptq_meta
    import ptq_store

    pm = ptq_meta.parse_meta(meta, out / ptq_meta.META_NAME, require_complete=False)
    store = ptq_store.open_store(out, pm)
    outputs = {}
    for shard in sorted(meta["shards"]):
        header_bytes, header = read_header(student / shard)
        order = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
        h = hashlib.sha256()
        with atomic_io.writing(out / shard, "wb") as dst:
            dst.write(header_bytes)
            h.update(header_bytes)
            for name, info in order:
                t = store.decode(name)
                if list(t.shape) != list(info["shape"]):
                    raise OpdInputError(f"the merged store's {name} is {list(t.shape)}, the student's view {info['shape']}")
                data = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                if len(data) != info["data_offsets"][1] - info["data_offsets"][0]:
                    raise OpdInputError(f"the merged store's {name} has another dtype than the student's view")
                dst.write(data)
                h.update(data)
        outputs[shard] = {"bytes": (out / shard).stat().st_size, "sha256": h.hexdigest()}
    return outputs


def merge(run: str | Path, out: str | Path, student: str | None = None, source: str | None = None,
          force: bool = False, argv=None, emit: tuple[str, ...] | None = None) -> dict:
    import export_run
    import lora_quant
    import opd_grid
    import opd_model
    import opd_train_fsdp  # noqa: F401  (the adapter's format)
    from ckpt_source import BuildError
    from safetensors.torch import load_file

    t0 = time.perf_counter()
    run, out = Path(run), Path(out)
    cfg_path = run / "adapter_config.json"
    if not cfg_path.is_file() or not (run / "adapter.safetensors").is_file():
        raise OpdInputError(f"{run} holds no finished adapter (adapter_config.json + adapter.safetensors); "
                            f"finish opd_train_fsdp.py first")
    adapter_cfg = json.loads(cfg_path.read_text())
    student_dir = Path(student or adapter_cfg["student"])
    meta = opd_data.read_student_meta(student_dir)
    if provenance.sha256_file(student_dir / opd_data.PTQ_META) != adapter_cfg["student_meta_sha256"]:
        raise OpdInputError(f"student {student_dir} is not the one the adapter was trained on (its _ptq_meta.json changed)")
    lora_quant.recipe_from_meta(meta)
    store = opd_grid.open_student_store(student_dir)
    src = opd_model.source_dir(meta, source or adapter_cfg.get("source") or None) if opd_grid.base_is_source(meta) else None
    emit = tuple(emit or meta.get("emit") or ("dequant",))
    if out.exists() and any(out.iterdir()):
        if not force:
            raise OpdInputError(f"--out {out} is not empty; choose an empty directory or pass --force")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        targets = [lora_quant.Target(t["name"], t["role"], tuple(t["shape"]), t["axis"], None)
                   for t in adapter_cfg["targets"]]
        adapter = load_file(str(run / "adapter.safetensors"))
        records, stats = merge_store(store, adapter, targets, adapter_cfg["scaling"], BaseReader(store, src), out)
        for f in student_dir.iterdir():  # config, tokenizer, index: the student's
            if f.is_file() and not f.name.endswith(".safetensors") and f.name not in (opd_data.PTQ_META, MERGE_RECORD):
                shutil.copyfile(f, out / f.name)
        new = {k: v for k, v in meta.items() if k not in ("store", "exports", "opd")}
        new["shards"] = {k: dict(v) for k, v in meta["shards"].items()}
        new["store"] = {"files": {r["store"]["file"]: {"bytes": r["store"]["bytes"], "sha256": r["store"]["sha256"]}
                                  for r in records.values()}}
        if "dequant" in emit:
            for shard, rec in write_dequant(student_dir, new, out).items():
                new["shards"][shard]["output"] = rec
        new = export_run.finish(new, records, out, emit)
        if "dequant" in emit:  # written from the new store above; checked like every other export
            import ptq_meta
            import ptq_store
            import verify_export

            pm = ptq_meta.parse_meta(new, out / ptq_meta.META_NAME, require_complete=False)
            new["exports"]["dequant"]["verified"] = verify_export.verify(ptq_store.open_store(out, pm), out, "dequant")
    except (BuildError, lora_quant.LoraTargetError, OpdInputError, ValueError) as e:  # MetaError, VerifyError too
        shutil.rmtree(out, ignore_errors=True)  # nothing half-written is kept
        raise OpdInputError(f"merge into {out}: {e}") from None
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    before, after = meta["store"], new["store"]
    same_footprint = (before["quantized_bytes"] == after["quantized_bytes"]
                      and before["effective_bits_quantized"] == after["effective_bits_quantized"]
                      and before["bytes"] == after["bytes"])
    if not same_footprint:
        shutil.rmtree(out, ignore_errors=True)
        raise OpdInputError(f"the merged store holds {after['effective_bits_quantized']} bits per weight "
                            f"({after['bytes']} B), the student {before['effective_bits_quantized']} ({before['bytes']} B)")
    record = {"format": "moe-lowbit/opd-merge/2", "run": str(run), "student": str(student_dir),
              "source": str(src or ""), "adapter": {k: adapter_cfg[k] for k in ("rank", "alpha", "roles", "recipe")},
              "targets": len(adapter_cfg["targets"]), "tensors": stats, "rounding": "nearest, stored scales",
              "same_names_shapes_dtypes_shards": True, "emit": list(emit),
              "exports_verified": {k: v.get("verified") for k, v in new.get("exports", {}).items()},
              "footprint_before": {"store_bytes": before["bytes"], "effective_bits": before["effective_bits_quantized"],
                                   **meta["footprint"]["total"]},
              "footprint_after": {"store_bytes": after["bytes"], "effective_bits": after["effective_bits_quantized"],
                                  **new["footprint"]["total"]},
              "same_footprint": same_footprint, "seconds": time.perf_counter() - t0,
              "provenance": provenance.record(argv=argv)}
    atomic_io.write_json(out / MERGE_RECORD, record)
    atomic_io.write_json(out / opd_data.PTQ_META, {**new, "complete": True, "opd": record})  # last: marks it complete
    return record


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="merge_adapter.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="opd_train_fsdp.py run dir (adapter.safetensors + adapter_config.json)")
    ap.add_argument("--out", required=True, help="output build dir (empty or new)")
    ap.add_argument("--student", help="student dir (default: the one recorded in the adapter)")
    ap.add_argument("--source", help="the student's BF16 source, for a clip/rtn student (default: the adapter's)")
    ap.add_argument("--emit", help="exports of the new store, e.g. dequant,gguf (default: the student's)")
    ap.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    args = ap.parse_args(argv)
    import lora_quant

    emit = tuple(x.strip() for x in args.emit.split(",") if x.strip()) if args.emit else None
    try:
        rec = merge(args.run, args.out, args.student, args.source, args.force,
                    argv=sys.argv if argv is None else [sys.argv[0], *argv], emit=emit)
    except (OpdInputError, lora_quant.LoraTargetError) as e:
        print(f"merge_adapter: error: {e}", file=sys.stderr)
        return 2
    t = rec["tensors"]
    print(f"merge_adapter: {t['replaced']} entries re-rounded on the stored grid ({t['changed']} changed), "
          f"{t['copied_from_student']} copied; store {rec['footprint_after']['store_bytes']} B, "
          f"{rec['footprint_after']['effective_bits']:.4f} bits/weight == before: {rec['same_footprint']}; "
          f"exports {rec['emit']} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
