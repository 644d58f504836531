"""The router probe's pass, streamed like calibration: a weightless skeleton, one decoder layer materialised
at a time from the shards (in bf16 by default, on the given device), the router hooks of `moe_probe` on that
layer, its output the next layer's input. Memory is one layer plus the activations, whatever the depth, so
the 122B is probed with the memory of one of its layers.

The statistics are taken over the BF16 teacher (not the true-sequential quantized stream of calibration):
the bits plan they feed must exist before the build. The layer outputs are the whole model's, computed the
same way (the family's own masks, positions and rotary embeddings, recorded by `layer_io`'s catchers), so the
figures equal a whole-model probe's in the same dtype.
"""
from __future__ import annotations

import sys

import torch

import calib_forward
import layer_io
import probe_stats
from ckpt_source import Source, load_tensor, tensor_locations


def _top_k(config: dict) -> int:
    text = config.get("text_config") or config
    return int(text.get("num_experts_per_tok") or 0)


@torch.no_grad()
def probe_source(source: Source, windows: torch.Tensor, device: str = "cpu", dtype: torch.dtype = torch.bfloat16,
                 batch: int = 4, progress: bool = True) -> dict:
    """{"layers": [...], "summary": {...}} of `moe_probe`, from a layer-by-layer pass over `source`."""
    from tqdm import tqdm

    skel = layer_io.build_skeleton(source.root, source.config)
    if not probe_stats.find_routers(skel.model):
        raise probe_stats.ProbeError(f"{source.label}: {source.config.get('model_type')} has no routed experts (no "
                                   f"top-k router modules); the probe needs a Mixture-of-Experts model")
    where = tensor_locations(source)
    _, slots_of = layer_io.slot_map(where, skel)

    def read(name):
        return load_tensor(where[name][0], name)

    x, layer_args, norms = layer_io.first_layer_inputs(skel, windows, batch, slots_of, read, device, dtype)
    for m in norms:
        layer_io.release(m)
    acc = {}
    for i in tqdm(range(len(skel.layers)), desc="probe", unit="layer", file=sys.stderr, disable=not progress):
        layer = skel.layers[i]
        layer_io.materialise(skel, layer, slots_of, read, device, dtype)
        layer_acc, handles = probe_stats.attach(layer, layer_index=i, required=False)
        try:
            calib_forward.run_layer(layer, x, [la[i] for la in layer_args], batch, device, dtype, capture_out=True)
        finally:
            for h in handles:
                h.remove()
        acc.update(layer_acc)
        layer_io.release(layer)
        layer_io.return_freed_memory()
    top_k = _top_k(source.config)
    layers = [{"layer": layer, **probe_stats.layer_stats(a, top_k)} for layer, a in sorted(acc.items())]
    return {"layers": layers, "summary": probe_stats.summarize(layers)}
