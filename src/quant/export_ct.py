"""compressed-tensors export of the packed store (`--emit compressed-tensors`): pack-quantized W4A16 / W8A16
that stock vLLM serves (and transformers loads), written with the compressed-tensors library.

* every quantized 2-D Linear weight becomes `weight_packed` (int32, the library's packing), `weight_scale`,
  `weight_shape` (and `weight_zero_point` on the asym grid), one config group per (bits, group, symmetric);
  the library re-derives the codes from the store's exact fp32 values (code x scale), so they are the store's;
* `weight_scale` is fp32, each an exact copy of the store's fp16 scale: the library dequantizes in the
  scale's dtype, and only fp32 makes code x scale exact, hence the same final cast as the store (fp16 scales
  would round twice). vLLM casts scales to the model dtype when it loads them (kernel arithmetic);
* int3 (the reference recipe's routed experts) is written as num_bits=3 pack-quantized: stock vLLM's
  compressed-tensors WNA16 scheme takes only 4 and 8 bits and refuses to load it; it needs vLLM's optional
  Humming kernels. Ternary, 2, 5 and 6 bits have no compressed-tensors kernel anywhere: refused;
* embeddings (and an untied lm_head) are written dequantized: vLLM quantizes no embedding. Norms, routers
  and other kept tensors are copied;
* a layout the format cannot hold is refused with the tensor named: a fused 3-D expert tensor, a row that
  the group does not divide, a group vLLM's kernels do not take.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

import atomic_io
import ptq_meta
import ptq_store
import store_pack
from quant_spec import K_TYPES, gguf_type

CT_BITS = (3, 4, 8)
STOCK_VLLM_BITS = (4, 8)
CT_GROUPS = (32, 64, 128)
DENSE_ROLES = ("embed", "lm_head")  # written dequantized


class CtExportError(ValueError):
    pass


def scheme_key(info: dict) -> tuple[int, int, bool]:
    return int(info["bits"]), int(info["group"]), info["grid"] != "asym"


def check_entry(name: str, info: dict) -> None:
    """Refuse (naming the tensor) a quantized weight this format cannot hold."""
    why = None
    k_type = gguf_type(info.get("grid", ""))
    if k_type in K_TYPES:
        why = (f"grid gguf:{k_type} is llama.cpp's two-level block (fp16 d x 6-bit sub-scales per 256), which "
               f"compressed-tensors' one scale per group cannot hold; export it with --emit gguf, or build a "
               f"full/sym grid at group 32/64/128 for this format")
    elif len(info["shape"]) != 2 or not name.endswith(".weight"):
        why = f"shape {info['shape']} is not a 2-D Linear weight (fused 3-D experts: split them into per-expert Linears)"
    elif info["axis"] != 1:
        why = "its groups do not run along the input (last) axis"
    elif info["width"] not in CT_BITS:
        why = f"{info['bits']:g}-bit codes: compressed-tensors kernels take {'/'.join(map(str, CT_BITS))} bits"
    elif info["group"] not in CT_GROUPS:
        why = f"group {info['group']}: vLLM's WNA16 kernels take group {'/'.join(map(str, CT_GROUPS))}"
    elif info["shape"][1] % info["group"]:
        why = f"its row of {info['shape'][1]} is not a multiple of group {info['group']}"
    if why:
        raise CtExportError(f"compressed-tensors cannot hold tensor {name}: {why}")


def quant_args(bits: int, group: int, symmetric: bool):
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy="group", group_size=group)


def plan_export(store: ptq_store.Store) -> dict[str, list[str]]:
    """scheme key -> module names (every check done before anything is written)."""
    groups: dict[tuple, list[str]] = {}
    for name in store.names():
        specs = store.specs(name)
        if name not in specs:  # per-expert slices of a fused tensor
            raise CtExportError(f"compressed-tensors cannot hold tensor {name}: a fused 3-D expert tensor "
                                f"(per-expert bits); split it into per-expert Linears")
        info = specs[name]
        if info["kind"] != "quant" or info.get("role") in DENSE_ROLES:
            continue
        check_entry(name, info)
        groups.setdefault(scheme_key(info), []).append(name[: -len(".weight")])
    return groups


def write(store: ptq_store.Store, meta: ptq_meta.PtqMeta, target: Path) -> list[Path]:
    """Write the export into `target` (replaced atomically: built in a temp dir, then renamed)."""
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.compressors.model_compressors.model_compressor import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme
    from safetensors.torch import save_file

    groups = plan_export(store)
    if any(k[0] not in STOCK_VLLM_BITS for k in groups):
        print("export_ct: note: int3 groups need vLLM's optional Humming kernels; stock vLLM refuses num_bits=3",
              file=sys.stderr)
    schemes = {k: QuantizationScheme(targets=sorted(mods), weights=quant_args(*k)) for k, mods in groups.items()}
    scheme_of = {m: schemes[k] for k, mods in groups.items() for m in mods}
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weight_map = {}
    try:
        by_file: dict[Path, list[str]] = {}
        for name in store.names():
            by_file.setdefault(store.index[name][0], []).append(name)
        for f, names in sorted(by_file.items()):
            state = {}
            for name in names:
                module = name[: -len(".weight")] if name.endswith(".weight") else None
                if module in scheme_of:
                    (info, parts), = store.entries(name).values()
                    sd = {"weight": store_pack.decode(parts, info, torch.float32),
                          "weight_scale": parts["scales"].float()}
                    if "zeros" in parts:
                        sd["weight_zero_point"] = store_pack.unpacked_zeros(parts, info).to(torch.int8)
                    for k, v in PackedQuantizationCompressor.compress(sd, scheme_of[module]).items():
                        state[f"{module}.{k}"] = v.contiguous()
                else:
                    state[name] = store.decode(name).contiguous()
            save_file(state, str(tmp / f.name), metadata={"format": "pt"})
            weight_map.update({k: f.name for k in state})
        if len(by_file) > 1:
            atomic_io.write_json(tmp / "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})
        for side in meta.get("copied_files") or []:
            if (meta.dir / side).is_file() and not side.endswith(".index.json"):
                shutil.copyfile(meta.dir / side, tmp / side)
        qc = QuantizationConfig(config_groups={f"group_{i}": s for i, s in enumerate(schemes.values())},
                                format="pack-quantized", quantization_status="compressed")
        ModelCompressor(quantization_config=qc).update_config(str(tmp))
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sorted(p for p in target.rglob("*") if p.is_file())


def reader(export: Path, store: ptq_store.Store):
    """name -> the export's tensor, decompressed by compressed-tensors' own decompressor, in the store's dtype."""
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors import safe_open

    config = json.loads((export / "config.json").read_text())
    qc = QuantizationConfig.model_validate(config["quantization_config"])
    scheme_of = {t: s for s in qc.config_groups.values() for t in s.targets}
    where = {}
    for f in sorted(export.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            where.update({k: f for k in st.keys()})

    def tensor(key):
        with safe_open(str(where[key]), framework="pt") as st:
            return st.get_tensor(key)

    def get(name: str):
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        dtype = getattr(torch, next(iter(store.specs(name).values()))["dtype"])
        if module in scheme_of:
            sd = {k.split(".")[-1]: tensor(k) for k in where if k.rsplit(".", 1)[0] == module}
            return PackedQuantizationCompressor.decompress(sd, scheme_of[module])["weight"].to(dtype)
        if name not in where:
            raise ptq_store.VerifyError(f"tensor {name} is in the store but not in the export {export}")
        return tensor(name)
    return get
