"""Running one decoder layer over the calibration batches: statistics hooks, early stop, and the attention
outputs recorded in the MLP stage and replayed in the output pass.

Everything is a forward hook or a temporary child module of the layer being run (never a patched
`forward`), removed when the call returns.
"""
from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch
from torch import nn

from calib_accum import ExpertStats, ForwardCache, LinearStats, StageDone, reduce_expert_stats, reduce_linear_stats

ATTENTION_PARTS = ("self_attn", "linear_attn", "attn", "attention", "cross_attn")


def detached_copy(out):
    """A module output (tensor, or tuple/list of tensors and None) copied, so later in-place ops cannot
    change what was recorded."""
    if isinstance(out, torch.Tensor):
        return out.detach().clone()
    if isinstance(out, (tuple, list)):
        return type(out)(detached_copy(o) for o in out)
    return out


class _Replay(nn.Module):
    """Stands in for an attention module: returns what it returned for the same batch in the MLP stage."""

    def __init__(self, outs: list, batch: list):
        super().__init__()
        self.outs, self.batch = outs, batch

    def forward(self, *args, **kwargs):
        return self.outs[self.batch[0]]


@contextmanager
def _replaced_children(layer: nn.Module, replacements: dict):
    """Children of `layer` (name -> module) swapped in for the block, the originals put back after."""
    originals = {n: layer._modules[n] for n in replacements}
    try:
        for n, m in replacements.items():
            layer._modules[n] = m
        yield
    finally:
        for n, m in originals.items():
            layer._modules[n] = m


def install_stat_hooks(model: nn.Module, slot_names: list[str], cache: ForwardCache, keep: bool = False):
    """Forward pre-hooks for the parameters named in `slot_names` (in-memory names, relative to `model`):
    (linear stats by module path, expert stats by module path, hook handles). `keep`: per-batch parts for a
    multi-device reduction (calib_accum)."""
    linear, experts, handles = {}, {}, []
    for pname in slot_names:
        module_path, attr = pname.rsplit(".", 1)
        module = model.get_submodule(module_path)
        if isinstance(module, nn.Linear) and attr == "weight":
            if module_path not in linear:
                linear[module_path] = LinearStats(cache, keep)
                handles.append(module.register_forward_pre_hook(linear[module_path].hook))
        elif attr in ("gate_up_proj", "down_proj") and getattr(module, "gate_up_proj", None) is not None \
                and module.gate_up_proj.ndim == 3 and module_path not in experts:
            experts[module_path] = ExpertStats(module, cache, keep)
            handles.append(module.register_forward_pre_hook(experts[module_path].hook, with_kwargs=True))
    return linear, experts, handles


def attention_children(layer: nn.Module) -> dict:
    return {n: m for n, m in layer.named_children() if n in ATTENTION_PARTS}


def run_layer(layer: nn.Module, x: torch.Tensor, layer_args: list, batch_windows: int, device, dtype,
              cache: ForwardCache | None = None, capture_out: bool = False, stop_after: list | None = None,
              record: dict | None = None, replay: dict | None = None, batches: list | None = None) -> None:
    """Run `layer` over every batch of `x` (rows batch_windows at a time); with `capture_out` its output replaces
    x in place (the next layer's input).

    `stop_after` (modules): a batch stops as soon as all of them have run (the attention stage needs no MLP).
    `record` ({child name: []}) keeps what those attention children return, per batch; with `replay` (the same
    shape) they return the recorded outputs instead of recomputing them. The output pass uses this: between the
    MLP stage and it only the MLP's weights change, so the attention's output is the same bit for bit, and one
    attention pass per layer is saved. `batches`: the batch indices to run (default all; `run_split` gives each
    device its share); `record` then holds their outputs in that order, `replay` is indexed by batch."""
    pending, batch, handles = set(), [0], []
    if stop_after:
        def done(module, args, output):
            pending.discard(id(module))
            if not pending:
                raise StageDone()

        handles = [m.register_forward_hook(done) for m in stop_after]
    for name, outs in (record or {}).items():
        handles.append(layer.get_submodule(name).register_forward_hook(
            lambda m, a, out, outs=outs: outs.append(detached_copy(out))))
    swaps = {name: _Replay(outs, batch) for name, outs in (replay or {}).items()}
    try:
        with _replaced_children(layer, swaps):
            for b in range(len(layer_args)) if batches is None else batches:
                args, kwargs = layer_args[b]
                batch[0] = b
                xb = x[b * batch_windows:(b + 1) * batch_windows].to(device, dtype)
                pending.update(id(m) for m in stop_after or ())
                if cache is not None:
                    cache.clear(b)
                try:
                    with torch.no_grad():
                        y = layer(xb, *args, **kwargs)
                except StageDone:
                    continue
                if isinstance(y, tuple):
                    y = y[0]
                if capture_out:
                    x[b * batch_windows:(b + 1) * batch_windows] = y.to(x.device, x.dtype)
    finally:
        for h in handles:
            h.remove()
        if cache is not None:
            cache.clear()


# ------------------------------------------------------------------------------------- several devices
def replicate(layer: nn.Module, device) -> nn.Module:
    """A copy of a materialised layer on `device` (parameters and buffers moved, never copied twice; on the
    layer's own device they share its storage). Made before any statistics hook is installed."""
    memo = {}
    for t in list(layer.parameters()) + list(layer.buffers()):
        moved = t.detach().to(device)
        memo[id(t)] = nn.Parameter(moved, requires_grad=False) if isinstance(t, nn.Parameter) else moved
    return copy.deepcopy(layer, memo)


def refresh(replica: nn.Module, layer: nn.Module) -> None:
    """Copy the layer's (quantized) weights into a replica that does not share their storage."""
    for (name, p), (rname, r) in zip(layer.named_parameters(), replica.named_parameters()):
        if name != rname:
            raise RuntimeError(f"replica parameter {rname} does not match {name}")
        if r.data_ptr() != p.data_ptr():
            r.data.copy_(p.data)


def to_device(obj, device):
    """Tensors inside (nested tuples / lists / dicts of) forward arguments, on `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def shares(n_batches: int, n_devices: int) -> list[list[int]]:
    """Batch indices per device, round-robin (a fixed split: the same device runs the same batches in every
    pass of a layer, so recorded attention outputs are replayed where they live)."""
    return [list(range(d, n_batches, n_devices)) for d in range(n_devices)]


def _each(fn, devices: list) -> list:
    """fn(d) for every device index, one thread per device, each thread with its device current (kernels that
    launch on the current CUDA device, e.g. Triton's, then run where their tensors are)."""
    def on(d):
        if str(devices[d]).startswith("cuda"):
            with torch.cuda.device(torch.device(devices[d])):
                return fn(d)
        return fn(d)

    if len(devices) == 1:
        return [on(0)]
    with ThreadPoolExecutor(max_workers=len(devices)) as pool:
        return list(pool.map(on, range(len(devices))))


def stats_forward(replicas: list, devices: list, prefix: str, names: list[str], x: torch.Tensor, args_of: list,
                  batch_windows: int, dtype, stop_early: bool, record_children: list | None = None):
    """The statistics pass of one stage over every batch, the batches split across `devices` (replicas[d] on
    devices[d], args_of[d] the per-batch forward arguments there), run in parallel. Returns (linear stats,
    expert stats, recorded attention outputs per child as one list indexed by batch, or None), keyed by the
    full in-memory module path, on devices[0] and bound to replicas[0]'s modules.

    With several devices each replica keeps per-batch parts and they are reduced onto devices[0] in batch
    order (calib_accum.reduce_*), so the statistics are the one-device ones bit for bit when every device
    computes the same products (CPU; GPUs of one model with deterministic kernels)."""
    multi = len(devices) > 1
    rel = [n[len(prefix):] for n in names]
    n_batches = len(args_of[0])
    split = shares(n_batches, len(devices)) if multi else [None]

    def one(d):
        cache = ForwardCache()
        rep = replicas[d]
        linear, experts, handles = install_stat_hooks(rep, rel, cache, keep=multi)
        hooked = [rep.get_submodule(p) for p in list(linear) + list(experts)] if stop_early else None
        record = {n: [] for n in record_children} if record_children else None
        try:
            run_layer(rep, x, args_of[d], batch_windows, devices[d], dtype, cache, stop_after=hooked, record=record,
                      batches=split[d])
        finally:
            for h in handles:
                h.remove()
        return linear, experts, record

    runs = _each(one, devices)
    if not multi:
        linear, experts, record = runs[0]
        recorded = record
    else:
        linear = {p: reduce_linear_stats([r[0][p] for r in runs], devices[0]) for p in runs[0][0]}
        experts = {p: reduce_expert_stats([r[1][p] for r in runs], replicas[0].get_submodule(p), devices[0])
                   for p in runs[0][1]}
        recorded = None
        if record_children and all(len(r[2][n]) == len(s) for r, s in zip(runs, split) for n in record_children):
            recorded = {n: [None] * n_batches for n in record_children}
            for r, s in zip(runs, split):
                for n in record_children:
                    for i, b in enumerate(s):
                        recorded[n][b] = r[2][n][i]
    full = (lambda d: {f"{prefix}{k}": v for k, v in d.items()})
    return full(linear), full(experts), recorded


def output_forward(replicas: list, devices: list, x: torch.Tensor, args_of: list, batch_windows: int, dtype,
                   replay: dict | None = None) -> None:
    """The layer's output over every batch, written into x in place, the batches split across `devices` as in
    `stats_forward` (each batch's rows are written by one device: disjoint slices)."""
    split = shares(len(args_of[0]), len(devices)) if len(devices) > 1 else [None]
    _each(lambda d: run_layer(replicas[d], x, args_of[d], batch_windows, devices[d], dtype, capture_out=True,
                              replay=replay, batches=split[d]), devices)
