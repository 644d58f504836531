"""OPD on llama.cpp's K grids (opd_kgrid, opd_grid, merge_adapter.merged_codes): the fixed grid built from a K store
entry's parts gives back the store's decode bit for bit (Q(student) == student) and its codes, a zero adapter keeps
every code, a nonzero one moves codes but stays on the stored d / sub-scales / sub-mins, mixed K types in one tensor
are held at the finest sub-block, and planted wrong parts are refused in one line naming the entry.

Entries come from the builder itself (moe_quant.quantize_tensor on a gguf:Q*_K spec, store_pack.encode), with an
all-zero sub-block, an all-zero row (d = 0) and an outlier; tests/test_opd_kgrid_store.py runs a whole K-grid
student through train, merge and the GGUF export's verifier.
"""
import pytest
import torch

import layer_io
import lora_quant
import merge_adapter
import moe_quant
import opd_grid
import opd_kgrid
import store_pack
from quant_spec import K_TYPES, QuantSpec

TYPES = sorted(K_TYPES)


def weight(shape, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.rand(*shape[:-1], 1, generator=g) * 0.05
    w[..., 0, :16] = 0.0  # an all-zero sub-block
    w[..., 2, :] = 0.0  # an all-zero row: d = 0
    w[..., 1, 5] = 0.9  # an outlier
    return w.to(torch.bfloat16)


def entry(qtype: str, shape=(6, 512), seed=0, method="clip"):
    """(info, parts, bf16 decode) of one K store entry built by the builder."""
    w = weight(shape, seed)
    spec = QuantSpec(bits=K_TYPES[qtype].bits, group=256, grid="gguf:" + qtype)
    res = moe_quant.quantize_tensor(w, spec, axis=len(shape) - 1)
    info = store_pack.entry_spec(spec, len(shape) - 1, shape, w.dtype, method)
    parts = store_pack.encode(res, info)
    return info, parts, w


@pytest.mark.parametrize("qtype", TYPES)
def test_fixed_k_grid_is_the_store_bit_for_bit(qtype):
    info, parts, w = entry(qtype)
    grid = opd_kgrid.entry_grid("t", info, parts)
    student32 = store_pack.decode(parts, info, torch.float32)
    student = store_pack.decode(parts, info)
    # Q(student) == student: from the exact fp32 values and from the bf16 view training loads
    assert torch.equal(grid.quantize_(student32.clone()).view(torch.int32), student32.view(torch.int32))
    assert torch.equal(grid.quantize_(student.float()).to(torch.bfloat16).view(torch.int16), student.view(torch.int16))
    # the codes it assigns are the stored ones
    assert torch.equal(grid.codes_(student.float()).to(torch.int16), store_pack.unpacked_codes(parts, info))
    # round-to-nearest of the source under the fixed grid is the builder's own result (a clip student)
    assert torch.equal(grid.quantize_(w.float()).to(torch.bfloat16).view(torch.int16), student.view(torch.int16))
    # a perturbed weight is rounded onto the same grid: its codes decode through the store to Q(x) exactly
    x = w.float() + torch.randn(w.shape, generator=torch.Generator().manual_seed(1)) * 0.01
    codes = grid.codes_(x.clone())
    kt = K_TYPES[qtype]
    assert int(codes.min()) >= kt.lo and int(codes.max()) <= kt.hi
    new = dict(parts, codes=merge_adapter.merged_codes(x, torch.zeros_like(x), info, parts, "t"))
    assert not torch.equal(new["codes"], parts["codes"])
    assert torch.equal(store_pack.decode(new, info, torch.float32).view(torch.int32), grid.quantize_(x.clone()).view(torch.int32))


@pytest.mark.parametrize("qtype", ["Q3_K", "Q4_K"])
def test_merge_with_a_zero_adapter_keeps_every_code_and_a_nonzero_one_stays_on_grid(qtype):
    info, parts, _ = entry(qtype, shape=(2, 8, 512), seed=3)  # an expert slice layout [E, out, in]
    w = store_pack.decode(parts, info).float()  # W of a calibrated student: its own bf16 view
    zero = merge_adapter.merged_codes(w, torch.zeros_like(w), info, parts, "t")
    assert torch.equal(zero, parts["codes"])
    delta = torch.randn(w.shape, generator=torch.Generator().manual_seed(4)) * 0.02
    moved = dict(parts, codes=merge_adapter.merged_codes(w, delta, info, parts, "t"))
    assert not torch.equal(moved["codes"], parts["codes"])
    dec = store_pack.decode(moved, info, torch.float32)
    grid = opd_kgrid.entry_grid("t", info, parts)
    assert torch.equal(dec.view(torch.int32), grid.quantize_(w + delta).view(torch.int32))
    # on the grid: every value is (d * sc) * q - dmin * m with the STORED d, sc, dmin, m (re-quantizing is a no-op)
    assert torch.equal(grid.quantize_(dec.clone()).view(torch.int32), dec.view(torch.int32))


def test_the_ste_forward_on_a_k_grid_is_what_the_merge_writes():
    info, parts, _ = entry("Q3_K", shape=(3, 8, 256), seed=5)
    grid = opd_kgrid.entry_grid("t", info, parts)
    w = store_pack.decode(parts, info).float()
    target = lora_quant.Target("x", "routed_expert", tuple(w.shape), 2, QuantSpec(bits=3, group=256, grid="gguf:Q3_K"))
    mod = lora_quant.QuantLora(target, None, None, rank=2, alpha=4.0, generator=torch.Generator().manual_seed(0), grid=grid)
    assert torch.equal(mod(w).view(torch.int32), w.view(torch.int32))  # B = 0: the student
    with torch.no_grad():
        mod.B.normal_(0, 0.05)
    out = mod(w)
    delta = torch.matmul(mod.B.detach(), mod.A.detach()) * mod.scaling
    merged = dict(parts, codes=merge_adapter.merged_codes(w, delta, info, parts, "t"))
    assert torch.equal(out.to(torch.bfloat16).view(torch.int16), store_pack.decode(merged, info).view(torch.int16))
    (out * torch.randn_like(out)).sum().backward()
    assert mod.A.grad.abs().sum() > 0 and mod.B.grad.abs().sum() > 0
    e = grid.select(1)  # the routed path's per-expert view
    assert torch.equal(e.quantize_(w[1].clone()).to(torch.bfloat16).view(torch.int16),
                       w[1].to(torch.bfloat16).view(torch.int16))


class FakeStore:
    """The two calls target_grid makes on ptq_store.Store, over in-memory entries."""

    def __init__(self, entries: dict):
        self.entries = entries

    def specs(self, name):
        return {k: v[0] for k, v in self.entries[name].items()}


def grid_of(entries: dict, target, monkeypatch):
    store = FakeStore(entries)
    slots = [(key, name, layer_io.Slot(target.name, int(key.split("#")[1]) if "#" in key else None))
             for name, ents in entries.items() for key in ents]
    monkeypatch.setattr(opd_grid.ptq_store, "read_parts", lambda st, name, parts: st.entries[name])
    return opd_grid.target_grid(store, target, slots)


def test_a_tensor_mixing_k_types_is_held_at_the_finest_sub_block(monkeypatch):
    e3, e4 = entry("Q3_K", (8, 512), seed=6), entry("Q4_K", (8, 512), seed=7)
    target = lora_quant.Target("m.experts.w", "routed_expert", (2, 8, 512), 2, QuantSpec(bits=3, group=256, grid="gguf:K"))
    grid = grid_of({"m.experts.w": {"m.experts.w#0": e3[:2], "m.experts.w#1": e4[:2]}}, target, monkeypatch)
    assert isinstance(grid, opd_kgrid.KFixedGrid) and grid.gran == 16 and isinstance(grid.hi, torch.Tensor)
    assert grid.hi.shape == (2, 8, 1) and grid.hi[0].unique().tolist() == [3.0] and grid.hi[1].unique().tolist() == [15.0]
    student = torch.stack([store_pack.decode(e[1], e[0], torch.float32) for e in (e3, e4)])
    assert torch.equal(grid.quantize_(student.clone()).view(torch.int32), student.view(torch.int32))


def test_planted_wrong_parts_and_mixed_families_are_refused_naming_the_tensor(monkeypatch):
    info, parts, _ = entry("Q4_K")
    target = lora_quant.Target("m.w", "attention", (6, 512), 1, QuantSpec(bits=4, group=256, grid="gguf:Q4_K"))
    for what, bad_info, bad_parts in [
            ("missing \\['dmin'\\]", info, {k: v for k, v in parts.items() if k != "dmin"}),
            ("part scales is torch.float16 \\[6, 1\\]", info, dict(parts, scales=parts["scales"][:, :1].contiguous())),
            ("packed codes hold", info, dict(parts, sub_scales=parts["sub_scales"][:-1].contiguous())),
            ("says \\{'sub': 16\\}", dict(info, sub=16), parts),
            ("non-finite", info, dict(parts, scales=torch.full_like(parts["scales"], float("inf"))))]:
        with pytest.raises(lora_quant.LoraTargetError, match=f"tensor m.w: store entry m.w: .*{what}"):
            grid_of({"m.w": {"m.w": (bad_info, bad_parts)}}, target, monkeypatch)
        with pytest.raises(merge_adapter.OpdInputError, match=f"store entry m.w: .*{what}"):
            merge_adapter.merged_codes(torch.zeros(6, 512), torch.zeros(6, 512), bad_info, bad_parts, "m.w")
    flat_spec = QuantSpec(bits=4, group=32, grid="full")
    w = weight((8, 512), 8)
    res = moe_quant.quantize_tensor(w, flat_spec, axis=1)
    flat_info = store_pack.entry_spec(flat_spec, 1, (8, 512), w.dtype, "clip")
    flat = (flat_info, store_pack.encode(res, flat_info))
    e3 = entry("Q3_K", (8, 512), seed=6)
    mixed = lora_quant.Target("m.experts.w", "routed_expert", (2, 8, 512), 2, QuantSpec(bits=3, group=256, grid="gguf:K"))
    with pytest.raises(lora_quant.LoraTargetError, match="tensor m.experts.w: its slices mix llama.cpp K-quant"):
        grid_of({"m.experts.w": {"m.experts.w#0": e3[:2], "m.experts.w#1": flat}}, mixed, monkeypatch)


def test_a_k_types_row_fallback_keeps_its_own_group_under_the_k_spec(monkeypatch):
    # gguf:K's fallback (Q4_0: full grid, blocks of 32) inside a target whose recipe spec says group 256
    spec = QuantSpec(bits=4, group=32, grid="full", fallback_from="gguf:Q3_K")
    w = weight((8, 576), 9)
    res = moe_quant.quantize_tensor(w, spec, axis=1)
    info = store_pack.entry_spec(spec, 1, (8, 576), w.dtype, "gptq")
    parts = store_pack.encode(res, info)
    target = lora_quant.Target("m.w", "routed_expert", (8, 576), 1, QuantSpec(bits=3, group=256, grid="gguf:K"))
    grid = grid_of({"m.w": {"m.w": (info, parts)}}, target, monkeypatch)
    assert isinstance(grid, lora_quant.FixedGrid) and grid.group == 32
    student = store_pack.decode(parts, info)
    assert torch.equal(grid.quantize_(student.float()).to(torch.bfloat16), student)


@pytest.mark.parametrize("qtype", TYPES)
def test_the_memory_model_counts_the_bytes_a_k_grid_holds(qtype):
    """opd_memory.grid_bytes (the dry run's per-rank grid figure) against the tensors a built KFixedGrid keeps."""
    import opd_memory

    info, parts, _ = entry(qtype, (6, 512))
    grid = opd_kgrid.entry_grid("m.w", info, parts)
    held = sum(t.numel() * t.element_size() for t in (grid.d, grid.sc, grid.dmin, grid.m) if t is not None)
    target = lora_quant.Target("m.w", "attention", (6, 512), 1, QuantSpec(bits=K_TYPES[qtype].bits, group=256,
                                                                          grid="gguf:" + qtype))
    assert opd_memory.grid_bytes(target, 256) == held
