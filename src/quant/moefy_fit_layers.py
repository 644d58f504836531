"""The sequential fit behind embedded:smollm2-moe's learned pieces (router, shared gate, neuron slots,
scales): torch math on one dense layer at a time. moefy_fit.py is the maintainer's CLI that runs it;
moefy.py assembles the fixture from the shipped pieces.
"""
from __future__ import annotations

import torch

import moefy


class FittedMoeMlp(torch.nn.Module):
    """The qwen2_moe block's math on the dense neuron layout (for the sequential fit only)."""

    def __init__(self, mlp, fit: dict, spec: moefy.MoefySpec):
        super().__init__()
        self.w = tuple(m.weight.detach().float() for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
        self.fit, self.spec = fit, spec

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        acts = moefy.neuron_acts(flat, self.w[0], self.w[1])
        w, ids = moefy.route(flat, self.fit["router"], self.spec.top_k)
        gates = moefy.slot_gates(self.fit["slots"], ids, w, torch.sigmoid(flat @ self.fit["shared_gate"]))
        return moefy.moe_output(acts, self.fit["slots"], gates, self.fit["scale"], self.w[2]).reshape(x.shape)


def fit_layer(x: torch.Tensor, mlp, spec: moefy.MoefySpec) -> tuple[dict, dict]:
    """Pieces and fit figures for one layer from its MLP inputs x [T, H]."""
    wg, wu, wd = (m.weight.detach().float() for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    x = x.detach().float()
    acts = moefy.neuron_acts(x, wg, wu)
    y = acts @ wd.T
    contrib = moefy.contributions(acts, wd)
    shared = moefy.pick_shared(contrib, spec.shared_size)
    routed = torch.ones(acts.shape[1], dtype=torch.bool)
    routed[shared] = False
    routed_idx = routed.nonzero().squeeze(1)
    member = moefy.balanced_kmeans(contrib[:, routed_idx].T, spec.n_experts, spec.copies)
    experts = torch.stack([routed_idx[member[e]] for e in range(spec.n_experts)])
    slots = moefy.Slots(shared, experts)
    # each expert's output and its share of the routed energy -> router targets
    outs = torch.stack([acts[:, experts[e]] @ wd[:, experts[e]].T for e in range(spec.n_experts)], dim=1)
    share = moefy.expert_energy(outs)
    router = moefy.fit_router(x, share)
    w, ids = moefy.route(x, router, spec.top_k)
    oracle = share.topk(spec.top_k, dim=-1).indices
    recall = float((ids[:, :, None] == oracle[:, None, :]).any(-1).float().mean())
    # scales at a constant gate 0.5, then the sigmoid gate regressed on the logit of each token's optimal
    # shared scale, then the scales refitted under that gate
    half = torch.full((x.shape[0],), 0.5)
    gates = moefy.slot_gates(slots, ids, w, half)
    scale = moefy.fit_slot_scales(acts, slots, gates, wd)
    n_s = spec.shared_size
    s_out = (acts[:, shared] * scale[:n_s]) @ wd[:, shared].T
    routed_out = moefy.moe_output(acts, slots, gates, scale, wd) - 0.5 * s_out
    alpha = ((y - routed_out) * s_out).sum(-1) / s_out.pow(2).sum(-1).clamp_min(1e-12)
    target = torch.logit(alpha.clamp(0.02, 0.98))
    gate_vec = torch.linalg.lstsq(x.double(), target.double()[:, None]).solution.squeeze(1).float()
    gates = moefy.slot_gates(slots, ids, w, torch.sigmoid(x @ gate_vec))
    scale = moefy.fit_slot_scales(acts, slots, gates, wd)
    y_hat = moefy.moe_output(acts, slots, gates, scale, wd)
    freq = torch.bincount(ids.flatten(), minlength=spec.n_experts).float()
    stats = {f"router_top{spec.top_k}_recall": recall,
             "rel_err": float((y_hat - y).pow(2).sum() / y.pow(2).sum()),
             "shared_energy": float(contrib[:, shared].pow(2).sum() / contrib.pow(2).sum()),
             "max_over_mean_freq": float(freq.max() / freq.mean()),
             "shared_gate_mean": float(torch.sigmoid(x @ gate_vec).mean()),
             "shared_gate_std": float(torch.sigmoid(x @ gate_vec).std())}
    return {"slots": slots, "router": router, "shared_gate": gate_vec, "scale": scale}, stats


def to_pieces(fit: dict, spec: moefy.MoefySpec) -> dict:
    """One layer's fit -> the shipped tensors (neuron indices per slot, scales, router, gate)."""
    n_s = spec.shared_size
    return {"shared": fit["slots"].shared.to(torch.int16), "experts": fit["slots"].experts.to(torch.int16),
            "shared_scale": fit["scale"][:n_s].float(),
            "expert_scale": fit["scale"][n_s:].reshape(spec.n_experts, spec.expert_size).float(),
            "router": fit["router"].float(), "shared_gate": fit["shared_gate"].float()}


@torch.no_grad()
def fit_model(model, windows: torch.Tensor, spec: moefy.MoefySpec, log=print) -> tuple[dict, list]:
    """Sequential layer-by-layer fit over calibration windows [N, ctx]."""
    from tqdm import tqdm
    from transformers.masking_utils import create_causal_mask

    inner = model.model
    hidden = inner.embed_tokens(windows).float()
    pos = torch.arange(windows.shape[1])[None]
    pe = inner.rotary_emb(hidden, position_ids=pos)
    mask = create_causal_mask(config=model.config, inputs_embeds=hidden, attention_mask=None,
                              past_key_values=None, position_ids=pos)
    pieces, stats = {}, []
    for i, layer in enumerate(tqdm(inner.layers, desc="moefy", unit="layer")):
        h_attn = hidden + layer.self_attn(layer.input_layernorm(hidden), attention_mask=mask,
                                          position_ids=pos, position_embeddings=pe)[0]
        x = layer.post_attention_layernorm(h_attn).reshape(-1, hidden.shape[-1])
        fit, st = fit_layer(x, layer.mlp, spec)
        stats.append({"layer": i, **st})
        for k, v in to_pieces(fit, spec).items():
            pieces[f"layers.{i}.{k}"] = v.contiguous()
        moe = FittedMoeMlp(layer.mlp, fit, spec)
        hidden = h_attn + moe(layer.post_attention_layernorm(h_attn))
    return pieces, stats
