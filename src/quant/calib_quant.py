"""Quantizing one stage of a layer with the statistics just collected: each Linear with its H, and the routed
experts a chunk at a time as `[E, R, K]` batches.

Checkpoints store routed experts per expert (`experts.N.gate_proj.weight`, as on the hub); llama.cpp's converter
stacks them before touching them, and so does this: per experts module, per chunk of `expert_chunk` experts,
each projection kind (gate, up, down) is ONE call of the method on the stacked [chunk, R, K] weights under
the chunk's [chunk, K, K] H, and the results are scattered back to the per-expert disk tensors. On CPU that is
bit-identical to one call per disk tensor (`batch_experts=False`): every step of the methods is per expert
(batched Cholesky/solves, row-parallel kernels, per-expert guard). Chunks go round-robin to the devices.

Memory of the expert part is bounded by the chunk, not the layer: H is formed for one chunk of experts at a
time from the rows the router sent them (`calib_accum.ExpertStats`), blended, used and dropped. Per chunk of C
experts on a K x K input: about 4 C K² fp32 (sums / blended, damped H, its Cholesky factor and inverse) plus
about 6 C R K fp32 (weights, error-updated weights, dequant, clip's candidate, the guard's products).
At the 122B's gate/up (K = 3072, R = 1024) and C = 16: 2.4 GB + 1.2 GB.

Every quantized tensor is written once, in place into its output shard (`store.write`), as soon as it exists.
"""
from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

import layer_io
import store_pack
import weight_quant
from calib_accum import ExpertStats, LinearStats, blend_expert_stats

from sizing import CPU_EXPERT_CHUNK  # one source: the sizing model counts the same chunk


@dataclass
class StageContext:
    """What quantizing a stage needs from the pass (no pass object: the functions below stay testable)."""

    skel: layer_io.Skeleton
    slot: dict  # disk name -> layer_io.Slot
    planned: dict  # disk name -> TensorPlan
    read: object  # disk name -> tensor
    recipe: object
    store: object  # shard_writer.InPlaceShards (or anything with write(name, tensor) -> sha256)
    devices: list
    min_tokens: int
    expert_chunk: int = 0  # experts per H chunk and per call; 0 = auto (16 on CPU, E / devices on GPUs)
    batch_experts: bool = True  # False: one call per disk tensor (the unbatched reference)
    sync: object = None  # called before a stage's clock is read (device synchronization)
    seconds: dict = field(default_factory=dict)


def _stat(res, tokens, expert_path, statistics="H", i=None):
    """A tensor's stats record; `i`: the i-th expert of a batched result (its per-slice figures)."""
    keys = ("proxy", "proxy_clip", "proxy_diag", "proxy_diag_clip", "sq_err", "sq_ref")
    per = res.per_slice if i is not None and res.per_slice is not None else {}
    figures = {k: (per[k][i] if k in per else getattr(res, k)) for k in keys}
    return {"method": res.method, "statistics": statistics, "tokens": tokens, **figures, "experts": expert_path}


def _emit(ctx: StageContext, name: str, dq: torch.Tensor, shas: dict, entries: dict) -> None:
    """A quantized tensor into the skeleton (the next stage's inputs), its output shard, and its store entries."""
    layer_io.write_slot(ctx.skel, ctx.slot[name], dq)
    shas[name] = ctx.store.write(name, dq)
    ctx.store.write_entries(name, entries)


def _slice_entries(store: dict, key: str, i: int, name: str) -> dict:
    """Expert i's entry of a stacked call, under its own tensor's name: the call's per-slice entry (`key#i`,
    bits-plan slices) or slice i of its one [E, R, K] entry."""
    if f"{key}#{i}" in store:
        return {name: store[f"{key}#{i}"]}
    return {name: store_pack.slice_leading(*store[key], i)}


def quantize_linears(ctx: StageContext, names, linear: dict[str, LinearStats], shas: dict, stats: dict) -> None:
    for name in names:
        module_path = ctx.slot[name].name.rsplit(".", 1)[0]
        acc = linear.get(module_path)
        h = acc.mean() if acc is not None else None
        w = ctx.read(name).to(ctx.devices[0])
        res = weight_quant.quantize_weight(name, w, ctx.planned[name], ctx.recipe, hessian=h, compare_clip=True)
        _emit(ctx, name, res.dequant, shas, res.store)
        stats[name] = _stat(res, acc.n if acc is not None else 0, None, "H" if h is not None else None)


def expert_rules(counts: list[int], min_tokens: int) -> list[str]:
    if min_tokens == 0:
        return ["own"] * len(counts)
    return ["own" if c >= min_tokens else ("pooled" if c == 0 else "blend") for c in counts]


def _chunk_size(ctx: StageContext, n: int) -> int:
    if ctx.expert_chunk > 0:
        return ctx.expert_chunk
    if ctx.devices[0] == "cpu":
        return CPU_EXPERT_CHUNK
    return -(-n // len(ctx.devices))


def _plan3(plan):
    """The plan of a 2-D per-expert tensor, for its [E, R, K] stack (the contraction axis keeps its place)."""
    return dataclasses.replace(plan, role=dataclasses.replace(plan.role, axis=(plan.role.axis % 2) - 2))


def quantize_experts(ctx: StageContext, path: str, names: list[str], acc: ExpertStats, shas: dict, stats: dict,
                     calls: list) -> dict:
    """Quantize a routed-experts module's disk tensors (per expert, or fused) with chunked, blended H; returns
    its record (tokens, router mass, rule per expert)."""
    counts = acc.counts.tolist()
    n_exp = acc.num
    pooled_in = acc.pooled_in / max(acc.total, 1)
    chunk = _chunk_size(ctx, n_exp)
    pooled_mid = acc.pooled_mid()
    which_of = {"gate_up_proj": "in", "down_proj": "mid"}
    fused = [n for n in names if ctx.slot[n].expert is None]
    for name in fused:  # a fused [E, R, K] disk tensor: H of every expert at once (small models' layout)
        which = which_of[ctx.slot[name].name.rsplit(".", 1)[1]]
        h = _blended(acc, 0, n_exp, which, pooled_in if which == "in" else pooled_mid, ctx.min_tokens)
        res = weight_quant.quantize_weight(name, ctx.read(name).to(ctx.devices[0]), ctx.planned[name], ctx.recipe,
                                           hessian=h.to(ctx.devices[0]), compare_clip=True)
        _emit(ctx, name, res.dequant, shas, res.store)
        stats[name] = _stat(res, acc.total, path)
        calls.append([ctx.slot[name].name.rsplit(".", 1)[1], n_exp, ctx.devices[0]])
    per_expert = [n for n in names if ctx.slot[n].expert is not None]
    chunks = [(e0, min(n_exp, e0 + chunk)) for e0 in range(0, n_exp, chunk)]
    todo = []
    for k, (e0, e1) in enumerate(chunks):
        members = [n for n in per_expert if e0 <= ctx.slot[n].expert < e1]
        if members:
            todo.append((ctx.devices[k % len(ctx.devices)], e0, e1, members))

    def work(dev, e0, e1, members):
        out_stats, out_shas, out_calls = {}, {}, []
        hs = {}
        for which in ("in", "mid"):
            if any(which_of[ctx.slot[n].name.rsplit(".", 1)[1]] == which for n in members):
                hs[which] = _blended(acc, e0, e1, which, pooled_in if which == "in" else pooled_mid,
                                     ctx.min_tokens).to(dev)
        groups: dict = {}
        for n in members:
            s = ctx.slot[n]
            attr = s.name.rsplit(".", 1)[1]
            p = ctx.planned[n]
            groups.setdefault((attr, s.part or "", p.spec, p.role.axis), []).append(n)
        for (attr, part, _, _), group in sorted(groups.items(), key=lambda kv: kv[0][:2]):
            group.sort(key=lambda n: ctx.slot[n].expert)
            h = hs[which_of[attr]]
            idx = [ctx.slot[n].expert - e0 for n in group]
            if ctx.batch_experts:
                _quantize_stack(ctx, dev, group, h, idx, counts, path, out_shas, out_stats)
                out_calls.append([f"{attr}{':' + part if part else ''}", len(group), dev])
            else:
                for n, i in zip(group, idx):
                    res = weight_quant.quantize_weight(n, ctx.read(n).to(dev), ctx.planned[n], ctx.recipe,
                                                       hessian=h[i], compare_clip=True)
                    _emit(ctx, n, res.dequant, out_shas, res.store)
                    out_stats[n] = _stat(res, counts[ctx.slot[n].expert], path)
                    out_calls.append([f"{attr}{':' + part if part else ''}", 1, dev])
        return out_shas, out_stats, out_calls

    if len(ctx.devices) == 1:
        results = [work(*t) for t in todo]
    else:
        with ThreadPoolExecutor(max_workers=len(ctx.devices)) as pool:
            results = list(pool.map(lambda t: work(*t), todo))
    for s, st, c in results:
        shas.update(s)
        stats.update(st)
        calls.extend(c)
    return {"tokens": counts, "router_mass": [round(float(m), 6) for m in acc.mass],
            "rule": expert_rules(counts, ctx.min_tokens), "min_tokens": ctx.min_tokens, "routed_tokens": acc.total,
            "expert_chunk": chunk}


def _blended(acc: ExpertStats, e0: int, e1: int, which: str, pooled, min_tokens: int) -> torch.Tensor:
    h, _ = blend_expert_stats(acc.hessian_sums(e0, e1, which), acc.counts[e0:e1], min_tokens, pooled=pooled)
    return h


def _quantize_stack(ctx, dev, group, h, idx, counts, path, shas, stats) -> None:
    """One call for a projection kind of a chunk: stack, quantize, scatter back per expert."""
    w = torch.stack([ctx.read(n) for n in group]).to(dev)
    hh = h if idx == list(range(h.shape[0])) else h[torch.tensor(idx, device=h.device)]
    res = weight_quant.quantize_weight(group[0], w, _plan3(ctx.planned[group[0]]), ctx.recipe, hessian=hh,
                                       compare_clip=True)
    d = res.dequant.float() - w.float()
    res.per_slice = dict(res.per_slice or {}, sq_err=(d * d).sum(dim=(1, 2)).double().tolist(),
                         sq_ref=(w.float() ** 2).sum(dim=(1, 2)).double().tolist())
    del d
    for i, n in enumerate(group):
        _emit(ctx, n, res.dequant[i], shas, _slice_entries(res.store, group[0], i, n))
        stats[n] = _stat(res, counts[ctx.slot[n].expert], path, i=i)


def quantize_stage(ctx: StageContext, names, linear: dict, experts: dict[str, ExpertStats]):
    """(tensor sha256s, tensor stats, expert records, expert calls) of a stage's tensors, each written in place."""
    shas, stats, records, calls = {}, {}, {}, {}
    by_module: dict = {}
    plain = []
    for name in names:
        module_path = ctx.slot[name].name.rsplit(".", 1)[0]
        if module_path in experts and experts[module_path].ran:
            by_module.setdefault(module_path, []).append(name)
        else:
            plain.append(name)
    t0 = time.perf_counter()
    quantize_linears(ctx, plain, linear, shas, stats)
    _clock(ctx, "quantize_linear", t0)
    t0 = time.perf_counter()
    for path, group in by_module.items():
        calls[path] = []
        records[path] = quantize_experts(ctx, path, group, experts[path], shas, stats, calls[path])
        records[path]["calls"] = _summarize(calls[path])
        experts[path].release()
    _clock(ctx, "quantize_experts", t0)
    return shas, stats, records


def _summarize(calls: list) -> dict:
    """{projection kind: {"calls": n, "batch_sizes": [...]} } for the build record."""
    out: dict = {}
    for kind, size, dev in calls:
        rec = out.setdefault(kind, {"calls": 0, "batch_sizes": [], "devices": []})
        rec["calls"] += 1
        rec["batch_sizes"].append(size)
        if dev not in rec["devices"]:
            rec["devices"].append(dev)
    return out


def _clock(ctx: StageContext, stage: str, t0: float) -> None:
    if ctx.sync is not None:
        ctx.sync()
    ctx.seconds[stage] = ctx.seconds.get(stage, 0.0) + time.perf_counter() - t0
