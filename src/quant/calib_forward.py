"""Running one decoder layer over the calibration batches: statistics hooks, early stop, and the attention
outputs recorded in the MLP stage and replayed in the output pass.

Everything is a forward hook or a temporary child module of the layer being run (never a patched
`forward`), removed when the call returns.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from calib_accum import ExpertStats, ForwardCache, LinearStats, StageDone

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


def install_stat_hooks(model: nn.Module, slot_names: list[str], cache: ForwardCache):
    """Forward pre-hooks for the parameters named in `slot_names` (in-memory names): (linear stats by module path,
    expert stats by module path, hook handles)."""
    linear, experts, handles = {}, {}, []
    for pname in slot_names:
        module_path, attr = pname.rsplit(".", 1)
        module = model.get_submodule(module_path)
        if isinstance(module, nn.Linear) and attr == "weight":
            if module_path not in linear:
                linear[module_path] = LinearStats(cache)
                handles.append(module.register_forward_pre_hook(linear[module_path].hook))
        elif attr in ("gate_up_proj", "down_proj") and getattr(module, "gate_up_proj", None) is not None \
                and module.gate_up_proj.ndim == 3 and module_path not in experts:
            experts[module_path] = ExpertStats(module)
            handles.append(module.register_forward_pre_hook(experts[module_path].hook, with_kwargs=True))
    return linear, experts, handles


def attention_children(layer: nn.Module) -> dict:
    return {n: m for n, m in layer.named_children() if n in ATTENTION_PARTS}


def run_layer(layer: nn.Module, x: torch.Tensor, layer_args: list, batch_windows: int, device, dtype,
              cache: ForwardCache | None = None, capture_out: bool = False, stop_after: list | None = None,
              record: dict | None = None, replay: dict | None = None) -> None:
    """Run `layer` over every batch of `x` (rows batch_windows at a time); with `capture_out` its output replaces
    x in place (the next layer's input).

    `stop_after` (modules): a batch stops as soon as all of them have run (the attention stage needs no MLP).
    `record` ({child name: []}) keeps what those attention children return, per batch; with `replay` (the same
    shape) they return the recorded outputs instead of recomputing them. The output pass uses this: between the
    MLP stage and it only the MLP's weights change, so the attention's output is the same bit for bit, and one
    attention pass per layer is saved."""
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
            for b, (args, kwargs) in enumerate(layer_args):
                batch[0] = b
                xb = x[b * batch_windows:(b + 1) * batch_windows].to(device, dtype)
                pending.update(id(m) for m in stop_after or ())
                if cache is not None:
                    cache.clear()
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
