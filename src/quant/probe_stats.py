"""Router statistics of one MoE layer at a time (frequency, weight mass, activation salience, entropy, cold
experts, co-activation): the accumulator and hooks that the whole-model probe (moe_probe) and the streamed
probe (probe_stream) both attach, and the per-layer figures they report."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

COLD_FRACTION = 0.1


class ProbeError(RuntimeError):
    """A clear, user-facing failure (dense model, bad calibration text)."""


@dataclass
class LayerAccumulator:
    """Per-layer running sums, all on the model's device."""

    freq: torch.Tensor  # [E] top-k hits
    wmass: torch.Tensor  # [E] sum of routing weights
    asal: torch.Tensor  # [E] sum of ||x|| over routed tokens
    coact: torch.Tensor  # [E, E] tokens routing to both
    token_entropy: torch.Tensor  # [] sum over tokens of the router's softmax entropy
    tokens: torch.Tensor  # [] tokens seen

    @classmethod
    def zeros(cls, n_experts: int, device) -> "LayerAccumulator":
        import torch
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)  # noqa: E731
        return cls(z(n_experts), z(n_experts), z(n_experts), z(n_experts, n_experts), z(()), z(()))

    def add(self, x: torch.Tensor, logits: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> None:
        """One router call: x [T, H], logits [T, E], weights/ids [T, k]."""
        import torch
        e = self.freq.numel()
        flat_ids = ids.reshape(-1)
        self.freq += torch.bincount(flat_ids, minlength=e).to(self.freq.dtype)
        self.wmass.index_add_(0, flat_ids, weights.reshape(-1).to(self.wmass.dtype))
        norms = x.float().norm(dim=-1).to(self.asal.dtype)
        self.asal.index_add_(0, flat_ids, norms.repeat_interleave(ids.shape[1]))
        hit = torch.zeros(ids.shape[0], e, dtype=torch.float32, device=ids.device)
        hit.scatter_(1, ids, 1.0)
        self.coact += (hit.T @ hit).to(self.coact.dtype)
        logp = torch.log_softmax(logits.float(), dim=-1)
        self.token_entropy += -(logp.exp() * logp).sum().to(self.token_entropy.dtype)
        self.tokens += ids.shape[0]


def find_routers(model: torch.nn.Module) -> list[tuple[int, str, torch.nn.Module]]:
    """(layer index, module name, router) for every top-k router (transformers' *TopKRouter: a `gate`
    whose forward returns (logits, weights, indices))."""
    found = []
    for name, mod in model.named_modules():
        if type(mod).__name__.endswith("TopKRouter") or (name.endswith(".gate") and hasattr(mod, "top_k")):
            parts = name.split(".")
            layer = next((int(p) for p in parts if p.isdigit()), len(found))
            found.append((layer, name, mod))
    return found


def attach(model: torch.nn.Module, layer_index: int | None = None, required: bool = True) -> tuple[dict, list]:
    """Hooks on every router -> ({layer: LayerAccumulator}, handles). `layer_index`: `model` is that one decoder
    layer (the streamed pass); `required`: a model without routers is an error (else: no hooks)."""
    routers = [(layer if layer_index is None else layer_index, n, m) for layer, n, m in find_routers(model)]
    if not routers and required:
        raise ProbeError(f"{type(model).__name__} has no routed experts (no top-k router modules); the probe "
                         f"needs a Mixture-of-Experts model")
    acc, handles = {}, []
    for layer, name, mod in routers:
        n_exp = int(getattr(mod, "num_experts", 0) or mod.weight.shape[0])
        dev = mod.weight.device
        acc[layer] = LayerAccumulator.zeros(n_exp, dev)

        def hook(module, inputs, output, a=acc[layer]):
            logits, weights, ids = output[0], output[1], output[2]
            x = inputs[0].reshape(-1, inputs[0].shape[-1])
            a.add(x, logits.reshape(x.shape[0], -1), weights.reshape(x.shape[0], -1),
                  ids.reshape(x.shape[0], -1))

        handles.append(mod.register_forward_hook(hook))
    return acc, handles


def layer_stats(a: LayerAccumulator, top_k: int) -> dict:
    """The host-side figures of one layer (called once, after the pass)."""
    import torch
    freq = a.freq.cpu()
    e = freq.numel()
    share = freq / freq.sum().clamp_min(1)
    nz = share[share > 0]
    entropy = float(-(nz * nz.log()).sum() / math.log(e)) if e > 1 else 0.0
    mean = float(share.mean())
    tokens = float(a.tokens.cpu())
    return {
        "tokens": int(tokens), "n_experts": e, "top_k": top_k,
        "freq": [int(v) for v in freq.tolist()],
        "share": share.tolist(),
        "wmass": a.wmass.cpu().tolist(),
        "asal": a.asal.cpu().tolist(),
        "asal_mean": (a.asal.cpu() / freq.clamp_min(1)).tolist(),
        "coact": a.coact.cpu().to(torch.int64).tolist(),
        "entropy_norm": entropy,
        "token_entropy_norm": float(a.token_entropy.cpu()) / max(tokens, 1) / math.log(e) if e > 1 else 0.0,
        "max_over_mean": float(share.max()) / mean if mean else 0.0,
        "cold": [i for i, s in enumerate(share.tolist()) if s < COLD_FRACTION * mean],
    }


def summarize(layers: list[dict]) -> dict:
    ent = [l["entropy_norm"] for l in layers]
    mm = [l["max_over_mean"] for l in layers]
    return {"n_layers": len(layers), "entropy_norm_mean": sum(ent) / len(ent), "entropy_norm_min": min(ent),
            "max_over_mean_mean": sum(mm) / len(mm), "max_over_mean_max": max(mm),
            "cold_experts": sum(len(l["cold"]) for l in layers),
            "experts_without_tokens": sum(1 for l in layers for f in l["freq"] if f == 0),
            "total_experts": sum(l["n_experts"] for l in layers)}
