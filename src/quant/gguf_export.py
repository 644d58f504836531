"""GGUF export of the store's own codes (`--emit gguf`): the blocks llama.cpp runs are the codes we measured.

These store grids are llama.cpp block types exactly, so their codes and scales go into the file unchanged
(byte layouts: gguf_blocks.py):

* `--grid full` (or `sym`, or the alias `gguf:Q4_0`) at 4 bits, group 32 -> Q4_0 (fp16 d, codes [-8, 7]); at 5
  bits -> Q5_0 (codes [-16, 15]); at 8 bits -> Q8_0 (int8 codes): all decode d * q in fp32, as the store does;
* `gguf:Q3_K`, `gguf:Q4_K`, `gguf:Q6_K` (or `gguf:K`, the type picked by bits) -> those types' 256-blocks: the
  store keeps the codes, the fp16 d (and dmin) and the integer sub-scales (and mins), decoded in gguf-py's
  order (gguf_grids.py), so the GGUF equals the store after the same cast.

The metadata, the tokenizer, the tensor names, the tensor order and the converter's row permutations (e.g.
llama's q/k rope order) come from llama.cpp's own converter: `gguf_convert` writes a BF16 GGUF of the
dequantized view, and this module replaces each tensor it can by its blocks, copying everything else
(GGUF names -> store names by gguf-py's TensorNameMap; rows matched by content, which the converter only
permutes). The converter's stacked routed experts (`*_exps`, [E, rows, K]) are written from the store's
per-expert entries by gguf_experts.py. A tensor with no exact GGUF type (another grid or group, a row that 32
does not divide, experts of one stack on different types) keeps the converter's BF16/F32: exact too, but dense;
each such tensor is listed in the record with its reason. i-quants are not written from the store: see
docs/GGUF.md.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

import ptq_meta

import gguf_experts
import ptq_store
from gguf_tensors import DENSE_NP, GgufExportError, block_type, converter_order, dense_tensor, pack_entry

GGUF_NAME = "model.gguf"
MAP_NAME = "model.gguf.map.json"


# GGUF tensors that llama.cpp's converter writes as a function of the checkpoint's values, per architecture
# (Qwen3.5 / Qwen3-Next: RMSNorm weights + 1, ssm_a = -exp(A_log), ssm_conv1d reshaped with its V channels
# reordered, ssm_out's columns reordered by V head). Only these may differ from the store: they are kept dense and
# recorded as unverifiable; any other difference stops the export (the file would not be the measured model).
_QWEN35_TRANSFORMED = ("attn_norm", "post_attention_norm", "attn_q_norm", "attn_k_norm", "ssm_norm", "output_norm",
                       "ssm_a", "ssm_conv1d", "ssm_out")
CONVERTER_TRANSFORMED = {"qwen35": _QWEN35_TRANSFORMED, "qwen35moe": _QWEN35_TRANSFORMED,
                         "qwen3next": _QWEN35_TRANSFORMED}


def converter_transformed(arch_name: str, gguf_name: str) -> bool:
    """Whether the converter writes GGUF tensor `gguf_name` of `arch_name` transformed (CONVERTER_TRANSFORMED)."""
    base = gguf_name.rsplit(".", 1)[0] if gguf_name.endswith((".weight", ".bias")) else gguf_name
    return base.rsplit(".", 1)[-1] in CONVERTER_TRANSFORMED.get(arch_name, ())


def llama_tree() -> Path:
    tree = os.environ.get("MOE_LOWBIT_LLAMA_TREE")
    if not tree:
        prefix = subprocess.run(["bash", str(Path(__file__).resolve().parents[2] / "pipelines/install_llamacpp.sh")],
                                check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        tree = str(Path(prefix) / "llama.cpp") if (Path(prefix) / "llama.cpp").is_dir() else prefix
    return Path(tree)


def converter_cmd(model_dir: Path, out: Path) -> list[str]:
    """llama.cpp's converter to a BF16 GGUF. The router is kept BF16 like every other dense weight: the store's
    router is BF16, and F16 would round its values below fp16's normal floor (the verifier caught it on the MoE
    fixture's router). MTP dropped as pack_gguf's default (Qwen3.5's converter asserts without --no-mtp)."""
    import gguf_source

    tree = llama_tree()
    mtp = gguf_source.converter_flags(model_dir, "drop", gguf_source.converter_supports_mtp(model_dir, tree))
    return [sys.executable, "-m", "gguf_convert", "--tree", str(tree), "--router-type", "bf16", "--",
            str(model_dir), "--outtype", "bf16", "--outfile", str(out), *mtp]


def convert_bf16(model_dir: Path, out: Path) -> None:
    """The converter's BF16 GGUF of the dequantized view (`converter_cmd`)."""
    cmd = converter_cmd(model_dir, out)
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise GgufExportError(f"llama.cpp's converter failed on {model_dir}: {res.stderr.strip().splitlines()[-1:]}")


def converter_name(hf_name: str) -> str:
    """The name the converter maps through gguf-py's TensorNameMap: it drops `language_model.` first (a
    multimodal checkpoint such as Qwen3.5's `model.language_model.layers.N...`; ModelBase.filter_tensors)."""
    return hf_name.replace("language_model.", "")


def _copy_fields(reader, writer) -> None:
    import gguf

    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)


def write(store: ptq_store.Store, meta: ptq_meta.PtqMeta, target: Path) -> list[Path]:
    """OUT/gguf/model.gguf (+ its tensor map) from the store, through the converter's BF16 GGUF of the view."""
    import gguf

    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        bf16 = tmp / "bf16.gguf"
        import gguf_source

        view = meta.dir  # the converter's tokenizer test needs the same fix as pack_gguf.sh (gguf_source)
        if gguf_source.tokenizer_conflict(view):
            view = gguf_source.byte_level_bpe_view(view, tmp / "bpe-view")
        convert_bf16(view, bf16)
        reader = gguf.GGUFReader(str(bf16))
        arch_name = reader.fields["general.architecture"].contents()
        arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
        n_blocks = int(reader.fields[f"{arch_name}.block_count"].contents())
        names = gguf.get_tensor_name_map(arch, n_blocks)
        to_store = {}
        for name in store.names():
            g = names.get_name(converter_name(name), try_suffixes=(".weight", ".bias"))
            if g is not None:
                to_store.setdefault(g, name)
        stacked = gguf_experts.stacked_sources(store, lambda hf: names.get_name(converter_name(hf),
                                                                                try_suffixes=(".weight",)))
        writer = gguf.GGUFWriter(str(tmp / GGUF_NAME), arch_name)
        _copy_fields(reader, writer)
        record = {}
        for t in reader.tensors:
            if t.name in stacked:  # the converter's stack of routed experts (gguf_experts.py)
                blocks, rec = gguf_experts.write_stacked(t, stacked[t.name], store)
                if blocks is None:
                    writer.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
                else:
                    writer.add_tensor(t.name, blocks, raw_dtype=getattr(gguf.GGMLQuantizationType, rec["type"]))
                record[t.name] = {"store": None, **rec}
                continue
            hf = to_store.get(t.name)
            hf = hf if hf and hf in store.specs(hf) else None  # a store tensor held as one entry
            qtype, why, perm = None, "no one-to-one store tensor (stacked or renamed by the converter)", None
            if hf:
                qtype, why = block_type(store.specs(hf)[hf])
                shape = store.specs(hf)[hf]["shape"]
                perm = converter_order(t, shape, store.decode(hf))
                if perm is None and t.tensor_type.name in DENSE_NP and np.prod(t.shape) != np.prod(shape):
                    hf, qtype, why = None, None, (f"the converter changed its shape ({list(map(int, t.shape))} "
                                                  f"against the store's {shape}, e.g. a padded vocabulary)")
                elif perm is None and not converter_transformed(arch_name, t.name):
                    raise GgufExportError(f"GGUF tensor {t.name} (store tensor {hf}): llama.cpp's converter wrote "
                                          f"values that differ from the store's, and {arch_name}'s converter is not "
                                          f"known to transform it; the file would not be the measured model")
                elif perm is None:  # a known converter transform: the verifier cannot hold it to the store
                    hf, qtype, why = None, None, (f"the converter transforms this tensor on {arch_name} (e.g. norm "
                                                  "weight + 1, a column reorder): not the store's values")
            rows = None if not perm or perm == sorted(perm) else perm
            if qtype:
                (info, parts), = store.entries(hf).values()
                writer.add_tensor(t.name, pack_entry(parts, info, qtype, perm or None),
                                  raw_dtype=getattr(gguf.GGMLQuantizationType, qtype))
                record[t.name] = {"store": hf, "type": qtype, "rows": rows}
            else:
                writer.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)  # shape from the byte shape
                record[t.name] = {"store": hf, "type": t.tensor_type.name, "dense_because": why, "rows": rows}
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        bf16.unlink()
        shutil.rmtree(tmp / "bpe-view", ignore_errors=True)
        (tmp / MAP_NAME).write_text(json.dumps(record, indent=0, sort_keys=True) + "\n")
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [target / GGUF_NAME, target / MAP_NAME]


def reader(export: Path, store: ptq_store.Store):
    """name -> the GGUF's tensor for store tensor `name`, dequantized by gguf-py, rows back in store order (a
    routed expert: its slices of the stacked `*_exps` tensors); None for a store tensor the GGUF does not hold."""
    import gguf

    path = export / GGUF_NAME if export.is_dir() else export
    record = json.loads((path.parent / MAP_NAME).read_text())
    by_store = {r["store"]: (g, r) for g, r in record.items() if r.get("store")}
    experts = gguf_experts.pieces_by_store(record)
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}

    def dequantized(t, rows=None) -> torch.Tensor:
        if t.tensor_type.name in DENSE_NP:
            return dense_tensor(t, rows).float()
        data = np.array(t.data if rows is None else t.data[rows])
        return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(data, t.tensor_type), dtype=np.float32))

    def get(name: str):
        specs = store.specs(name)
        info = next(iter(specs.values()))
        if name in experts:  # routed experts: slices of the stacked tensors, back in the store's layout
            shape = info["shape"] if name in specs else [len(specs), *info["shape"]]
            out = gguf_experts.assemble(shape, experts[name], lambda g, e: dequantized(tensors[g], e))
            return out.to(getattr(torch, info["dtype"]))
        if name not in by_store:
            return None
        g, r = by_store[name]
        out = dequantized(tensors[g]).reshape(info["shape"])
        if r.get("rows") is not None:
            inv = torch.empty(len(r["rows"]), dtype=torch.long)
            inv[torch.tensor(r["rows"])] = torch.arange(len(r["rows"]))
            out = out[inv]
        return out.to(getattr(torch, info["dtype"]))
    return get
