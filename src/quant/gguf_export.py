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

import gguf_blocks
import gguf_experts
import ptq_store
import store_pack

BLOCK = 32
GGUF_NAME = "model.gguf"
MAP_NAME = "model.gguf.map.json"


class GgufExportError(ValueError):
    pass


LEGACY_BY_WIDTH = {4: "Q4_0", 5: "Q5_0", 8: "Q8_0"}


def block_type(info: dict) -> tuple[str | None, str]:
    """(GGUF type, '') for an entry whose grid is a GGUF block type exactly, else (None, why not)."""
    if info["kind"] != "quant":
        return None, "kept by the recipe"
    if info["method"] == "awq":
        return None, "awq's per-input-channel scale has no slot in a GGUF block"
    if len(info["shape"]) != 2 or info["axis"] != 1:
        return None, "not a 2-D weight grouped along its rows"
    if "sub" in info:  # a gguf:Q*_K grid: the entry is that type's blocks exactly
        qtype = info["grid"].split(":", 1)[1]
        if info["shape"][1] % gguf_blocks.BLOCK_SIZE[qtype]:
            return None, f"row of {info['shape'][1]} is not a multiple of the {qtype} block"
        return qtype, ""
    if info["grid"] not in ("full", "sym") or info["group"] != BLOCK or info["width"] not in LEGACY_BY_WIDTH:
        return None, (f"grid {info['grid']} {info['bits']:g}-bit group {info['group']} is no GGUF block type (Q4_0/"
                      f"Q5_0/Q8_0 are grid full/sym, 4/5/8 bits, group 32; gguf:Q3_K/Q4_K/Q6_K are their own grids)")
    if info["shape"][1] % BLOCK:
        return None, f"row of {info['shape'][1]} is not a multiple of the block {BLOCK}"
    return LEGACY_BY_WIDTH[info["width"]], ""


def pack_blocks(codes: torch.Tensor, scales: torch.Tensor, qtype: str) -> np.ndarray:
    """codes int [R, K], fp16 scales [R, K/32] -> uint8 [R, K/32 * block bytes] in llama.cpp's block layout."""
    q = codes.reshape(-1, BLOCK).numpy()
    return gguf_blocks.pack_legacy(q, scales.to(torch.float16).numpy().reshape(-1), qtype).reshape(codes.shape[0], -1)


def pack_entry(parts: dict, info: dict, qtype: str, perm: list[int] | None = None) -> np.ndarray:
    """A 2-D store entry (its rows `perm`, in that order; all when None) -> uint8 [rows, row bytes] of `qtype`."""
    rows = slice(None) if perm is None else perm
    codes = store_pack.unpacked_codes(parts, info)[rows]  # `perm` may pick a subset (a fused gate_up's half)
    if "sub" not in info:
        return pack_blocks(codes, parts["scales"][rows], qtype)
    n_sub = info["group"] // info["sub"]  # sub-blocks per super-block
    sub = store_pack.unpacked_sub(parts, info)[rows].reshape(-1, n_sub)
    mins = store_pack.unpacked_sub(parts, info, "sub_mins")
    blocks = gguf_blocks.pack_k(qtype, codes.reshape(-1, info["group"]).numpy(),
                                parts["scales"][rows].numpy().reshape(-1), sub.numpy(),
                                None if "dmin" not in parts else parts["dmin"][rows].numpy().reshape(-1),
                                None if mins is None else mins[rows].reshape(sub.shape).numpy())
    return blocks.reshape(codes.shape[0], -1)


def _row_keys(t: torch.Tensor) -> list[bytes]:
    f = (t.float() + 0.0).contiguous().numpy()  # + 0.0: -0 and +0 are the same row value
    return [row.tobytes() for row in f]


def row_order(gguf_rows: torch.Tensor, store_rows: torch.Tensor) -> list[int] | None:
    """perm with gguf_rows[i] == store_rows[perm[i]], or None when some row has no match."""
    where: dict[bytes, list[int]] = {}
    for i, key in enumerate(_row_keys(store_rows)):
        where.setdefault(key, []).append(i)
    perm = []
    for key in _row_keys(gguf_rows):
        hits = where.get(key)
        if not hits:
            return None
        perm.append(hits.pop() if len(hits) > 1 else hits[0])
    return perm


DENSE_NP = {"BF16": np.uint16, "F32": np.float32, "F16": np.float16}


def dense_tensor(t, index=None) -> torch.Tensor:
    """A dense GGUF tensor (or its slice `index` along the leading axis) as torch, in its own dtype; gguf-py
    gives BF16 data as raw bytes (uint8) or uint16 depending on its version: viewed, never converted."""
    data = np.array(t.data if index is None else t.data[index])
    out = torch.from_numpy(np.ascontiguousarray(data.view(DENSE_NP[t.tensor_type.name])))
    return out.view(torch.bfloat16) if t.tensor_type.name == "BF16" else out


def converter_order(t, shape, want: torch.Tensor) -> list[int] | None:
    """How the converter's dense tensor `t` holds the store's values `want`: [] in order, a 2-D tensor's row
    permutation (gguf rows[i] == store rows[perm[i]]), or None when the values differ (or `t` is not dense)."""
    if t.tensor_type.name not in DENSE_NP:
        return None
    got = dense_tensor(t)
    if got.numel() != want.numel():  # e.g. a vocabulary the converter padded
        return None
    got = got.reshape(shape)
    if torch.equal(got.float(), want.float()):
        return []
    return row_order(got, want) if len(shape) == 2 else None


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
                perm = converter_order(t, store.specs(hf)[hf]["shape"], store.decode(hf))
                if perm is None:  # not the store's values: the verifier cannot hold it to the store
                    hf, qtype, why = None, None, ("values differ from the store's (the converter transforms this "
                                                  "tensor, e.g. Qwen3.5's norm weight + 1 or a column reorder)")
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
        data = np.array(t.data if rows is None else t.data[rows])
        if t.tensor_type.name == "BF16":
            return torch.from_numpy(data.view(np.uint16).astype(np.int16)).view(torch.bfloat16).float()
        if t.tensor_type.name == "F32":
            return torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
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
