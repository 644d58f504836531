"""The student's fixed grid of every LoRA target, read from its packed store: the ONE reader the trainer and the
merge share. A flat grid (fp16 scales, zero points, code range per group: sym/full/asym, llama.cpp's legacy blocks
and the K types' row fallbacks) becomes a lora_quant.FixedGrid; llama.cpp's two-level K types (d, dmin, 6-bit
sub-scales and sub-mins) an opd_kgrid.KFixedGrid.

Why from the store: the scales a build chose (a clip search, GPTQ's error feedback, a bits plan's per-tensor
bits) are written there exactly (`_ptq_store/`, store_pack), so nothing is searched again, on any rank, and a
calibrated or bits-plan student trains on its own grid. Only the grid's parts are read (no codes):
~1/group of the weights in fp16 (a K type: 2-4 bytes per 256 weights + 6 bits per sub-block). Every rank reads every target's grid, because FSDP2 gathers a whole layer
before its forward and the fake quantizer runs on the gathered weight; the weights themselves are read
per rank, rows only (`opd_ckpt.load_shards`).

Names: LoRA targets are in-memory parameters (transformers 5 fuses experts: `...experts.gate_up_proj`
[E, 2I, H]); the store is keyed by the checkpoint's disk names (`...experts.3.up_proj.weight`, or a fused
disk tensor's expert slices `NAME#3`). `layer_io.memory_slot` maps one onto the other.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

import layer_io
import lora_quant
import opd_data
import opd_kgrid
import ptq_meta
import ptq_store
import quant_spec
import store_pack

GRID_PARTS = ("scales", "zeros", "in_scale", "dmin", "sub_scales", "sub_mins")  # no codes
REBUILD = ("rebuild it with bash pipelines/quantize.sh (or src/quant/quant_save.py) and the same recipe: "
           "a current build writes the packed store OPD reads the grid from")


def open_student_store(student: str | Path) -> ptq_store.Store:
    """The student's packed store; a build without one (older than the store) is refused in one line."""
    try:
        meta = ptq_meta.read_meta(student)
        if not meta.store:
            raise opd_data.OpdInputError(f"student {student} has no packed store ({ptq_meta.STORE_DIR}/): it was "
                                         f"built before the store existed; {REBUILD}")
        return ptq_store.open_store(student, meta)
    except ptq_meta.MetaError as e:
        raise opd_data.OpdInputError(f"student {student}: {e}") from None


def base_is_source(meta: dict) -> bool:
    """Whether W in Q_s(W + BA) is the BF16 source (a round-to-nearest build: clip, rtn, where Q_s(source) is the
    student and the source's position inside each rounding cell is kept) or the student's own decoded weight (a
    calibrated build, gptq/wclip: its codes are not the source's nearest, so only Q_s(student) is the student)."""
    try:
        return not ptq_store.recipe_of(meta).calibrated
    except ptq_meta.MetaError as e:
        raise opd_data.OpdInputError(f"the student's {e}") from None


def entry_slots(store: ptq_store.Store, params) -> dict[str, list[tuple[str, str, layer_io.Slot]]]:
    """In-memory parameter -> [(entry key, store tensor name, slot)] for the parameters in `params`."""
    wanted = set(params)
    out: dict[str, list] = {}
    for name in store.names():
        slot = layer_io.memory_slot(name, wanted)
        if slot is None:
            continue
        for key in store.specs(name):
            s = slot
            if "#" in key:  # expert slice of a fused disk tensor
                if slot.expert is not None:
                    raise opd_data.OpdInputError(f"store entry {key}: an expert slice of a per-expert tensor")
                s = layer_io.Slot(slot.name, int(key.split("#", 1)[1]), slot.part)
            out.setdefault(slot.name, []).append((key, name, s))
    return out


def stored_quantized(store: ptq_store.Store, params) -> set[str]:
    """The in-memory parameters every store entry of which is quantized (bits < 16 for all their slices)."""
    return {p for p, slots in entry_slots(store, params).items()
            if all(store.specs(name)[key]["kind"] == "quant" for key, name, _ in slots)}


def _fill(full: torch.Tensor, slot: layer_io.Slot, value: torch.Tensor | float, what: str) -> None:
    view = layer_io.slot_view(full, slot)
    if isinstance(value, torch.Tensor) and tuple(value.shape) != tuple(view.shape):
        raise lora_quant.LoraTargetError(f"{what}: stored shape {list(value.shape)} does not fit its slot "
                                         f"{list(view.shape)} in {slot.name}")
    view.copy_(value) if isinstance(value, torch.Tensor) else view.fill_(value)


def _flat_grid(store: ptq_store.Store, target, slots, read: dict) -> lora_quant.FixedGrid:
    """The fixed flat grid (fp16 scales, zero points, code range per group) of one target."""
    groups = {store.specs(name)[key]["group"] for key, name, _ in slots}
    if len(groups) != 1:
        raise lora_quant.LoraTargetError(f"tensor {target.name}: its slices were stored with groups {sorted(groups)}; "
                                         f"one fake quantizer needs one group size")
    group = groups.pop()
    shape = (*target.shape[:-1], math.ceil(target.shape[-1] / group))
    scales, lo, hi = (torch.full(shape, math.nan) for _ in range(3))
    zeros = None
    for key, name, slot in slots:
        info, parts = read[name][key]
        _fill(scales, slot, parts["scales"].float(), key)
        _fill(lo, slot, float(info["lo"]), key)
        _fill(hi, slot, float(info["hi"]), key)
        if "zeros" in parts:
            zeros = torch.full(shape, math.nan) if zeros is None else zeros
            _fill(zeros, slot, store_pack.unpacked_zeros(parts, info).float(), key)
    if torch.isnan(scales).any():
        raise lora_quant.LoraTargetError(f"tensor {target.name}: the store's entries cover only part of it "
                                         f"({int(torch.isnan(scales).sum())} groups have no scale)")
    if zeros is not None and torch.isnan(zeros).any():
        raise lora_quant.LoraTargetError(f"tensor {target.name}: some slices have zero points and others not")
    rng = _code_range(lo, hi)
    return lora_quant.FixedGrid(scales.to(torch.float16), zeros, target.axis, target.spec, target.shape, rng,
                                group=group, in_scale=_in_scale(target, slots, read))


def _in_scale(target, slots, read: dict) -> torch.Tensor | None:
    """AWQ's per-input-channel scale of one target as [*lead, P, K] (FixedGrid's layout), or None when no slice
    has one. P = 2 for a fused gate_up whose gate and up halves were stored as two tensors, each with its own."""
    has = {key: "in_scale" in read[name][key][1] for key, name, _ in slots}
    if not any(has.values()):
        return None
    if not all(has.values()):
        missing = next(key for key, h in has.items() if not h)
        raise lora_quant.LoraTargetError(f"tensor {target.name}: some slices have an AWQ input scale and {missing} "
                                         f"has none; one fake quantizer needs it everywhere or nowhere")
    p = 2 if any(slot.part is not None for _, _, slot in slots) else 1
    full = torch.full((*target.shape[:-2], p, target.shape[-1]), math.nan)
    for key, name, slot in slots:
        value = read[name][key][1]["in_scale"].float()
        view = layer_io.slot_view(full, slot)
        if value.numel() != view.numel():
            raise lora_quant.LoraTargetError(f"{key}: stored input scale {list(value.shape)} does not fit its slot "
                                             f"{list(view.shape)} in {slot.name}")
        view.copy_(value.reshape(view.shape))
    if torch.isnan(full).any():
        raise lora_quant.LoraTargetError(f"tensor {target.name}: the store's entries cover only part of its input scale")
    return full


def _code_range(lo: torch.Tensor, hi: torch.Tensor) -> tuple:
    """(lo, hi) as numbers when one range holds everywhere, else the per-group tensors (a bits plan)."""
    if bool((lo == lo.flatten()[0]).all()) and bool((hi == hi.flatten()[0]).all()):
        return float(lo.flatten()[0]), float(hi.flatten()[0])
    return lo, hi


def _k_grid(target, slots, read: dict, types: dict) -> opd_kgrid.KFixedGrid:
    """The fixed K grid (d, sub-scales, dmin, sub-mins, code range per sub-block) of one target; slices of
    several K types are held at the finest sub-block."""
    gran = min(kt.sub for kt in types.values())
    has_min = any(kt.has_min for kt in types.values())
    lead, k = target.shape[:-1], target.shape[-1]
    n_gran = k // gran
    d = torch.full((*lead, k // quant_spec.QK_K), math.nan)
    dmin = torch.zeros_like(d) if has_min else None
    sc = torch.zeros((*lead, n_gran), dtype=torch.int16)
    m = torch.zeros_like(sc) if has_min else None
    lo, hi = (torch.full((*lead, 1), math.nan) for _ in range(2))  # per row: one K type per slice
    for key, name, slot in slots:
        info, parts = read[name][key]
        try:
            kt, d_e, sc_e, dmin_e, m_e = opd_kgrid.entry_params(key, info, parts)
        except opd_kgrid.KGridError as e:
            raise lora_quant.LoraTargetError(f"tensor {target.name}: {e}") from None
        per = kt.sub // gran
        _fill(d, slot, d_e, key)
        _fill(sc, slot, sc_e.repeat_interleave(per, dim=-1), key)
        if m_e is not None:
            _fill(dmin, slot, dmin_e, key)
            _fill(m, slot, m_e.repeat_interleave(per, dim=-1), key)
        _fill(lo, slot, float(kt.lo), key)
        _fill(hi, slot, float(kt.hi), key)
    if torch.isnan(d).any():
        raise lora_quant.LoraTargetError(f"tensor {target.name}: the store's entries cover only part of it "
                                         f"({int(torch.isnan(d).sum())} super-blocks have no scale)")
    return opd_kgrid.KFixedGrid(d, sc, dmin, m, gran, _code_range(lo, hi))


def target_grid(store: ptq_store.Store, target, slots):
    """The fixed grid of one target from its store entries: lora_quant.FixedGrid for the flat grids (sym, full,
    asym, llama.cpp's legacy blocks and the K types' row fallbacks), opd_kgrid.KFixedGrid for the K types. A
    tensor whose slices mix the two, or any layout the grid cannot express, is refused naming the tensor."""
    nd = len(target.shape)
    if target.axis != nd - 1:
        raise lora_quant.LoraTargetError(f"tensor {target.name}: grouped along axis {target.axis}; OPD reads stored "
                                         f"grids grouped along the last (input) axis only")
    read: dict[str, dict] = {}
    for key, name, _ in slots:
        if name not in read:
            read[name] = ptq_store.read_parts(store, name, GRID_PARTS)
        info = read[name][key][0]
        if info["axis"] != len(info["shape"]) - 1:
            raise lora_quant.LoraTargetError(f"store entry {key}: grouped along axis {info['axis']}, not the last")
    try:
        types = {key: opd_kgrid.entry_type(read[name][key][0]) for key, name, _ in slots}
    except opd_kgrid.KGridError as e:
        raise lora_quant.LoraTargetError(f"tensor {target.name}: {e}") from None
    k_types = {key: kt for key, kt in types.items() if kt is not None}
    if not k_types:
        return _flat_grid(store, target, slots, read)
    if len(k_types) != len(types):
        flat = next(key for key, kt in types.items() if kt is None)
        raise lora_quant.LoraTargetError(f"tensor {target.name}: its slices mix llama.cpp K-quant blocks "
                                         f"({next(iter(k_types.values())).name}) and a flat grid ({flat}); one fake "
                                         f"quantizer holds one of the two: give its slices one grid family")
    return _k_grid(target, slots, read, k_types)


def student_grid(store: ptq_store.Store, targets, log=lambda m: None) -> dict:
    """{name: fixed grid (lora_quant.FixedGrid or opd_kgrid.KFixedGrid)} of every target, identical on every rank."""
    slots = entry_slots(store, [t.name for t in targets])
    grids = {}
    for t in targets:
        if t.name not in slots:
            raise lora_quant.LoraTargetError(f"tensor {t.name}: not in the student's store {store.dir}")
        grids[t.name] = target_grid(store, t, slots[t.name])
    kinds = sorted({store.specs(n)[k].get("grid", "?") for t in targets for k, n, _ in slots[t.name]})
    bits = sorted({store.specs(n)[k]["bits"] for t in targets for k, n, _ in slots[t.name]})
    log(f"opd: grid of {len(targets)} targets read from the store (grids {kinds}, bits {bits}); no scale search")
    return grids
