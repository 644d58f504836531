"""MoEfication: turn a dense SwiGLU MLP into a qwen2_moe block (shared expert + routed experts + router).

Why: the project's claims are about routed experts, and an offline box has no real MoE. Splitting a real
model's MLP neurons into experts gives a real-weight MoE whose routing statistics mean something.

The recipe (measured in docs/SMOLLM2_MOE.md):
* neuron contribution m_j(x) = |act_j(x)| * ||W_down[:, j]||;
* the shared expert takes the neurons with the largest mean squared contribution (always on);
* the other neurons are cut into equal-size experts by balanced k-means on their per-token contribution
  patterns (neurons that fire on the same tokens share an expert, so a token's energy sits in few experts);
* the router is a softmax regression from the MLP input onto each expert's share of output energy, so
  its top-k picks the experts that matter for that token and its weights are energy shares;
* one scale per neuron (folded into W_down's column) is fitted by least squares so that the MoE output
  (gate weights, routing weights and dropped experts included) best matches the dense output.

Pure tensor math here; moefy_fit.py collects activations and saves the learned pieces, assemble_* below
turns a dense state dict plus those pieces into a qwen2_moe checkpoint (no fitting at build time).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

PIECES_FORMAT = "moe-lowbit/moefy-pieces/1"


@dataclass(frozen=True)
class MoefySpec:
    """Shape of the MoE made from one dense MLP (all sizes in neurons)."""

    n_experts: int = 8
    expert_size: int = 128
    shared_size: int = 1024
    top_k: int = 2
    copies: int = 2  # experts each non-shared neuron sits in

    def check(self, intermediate: int) -> None:
        routed = intermediate - self.shared_size
        if routed <= 0 or routed * self.copies != self.n_experts * self.expert_size:
            raise ValueError(f"{intermediate - self.shared_size} non-shared neurons x {self.copies} copies != "
                             f"{self.n_experts} experts x {self.expert_size} (dense intermediate {intermediate})")
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"top_k {self.top_k} must be in 1..{self.n_experts}")


def neuron_acts(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU intermediate activations [T, I] of MLP inputs x [T, H]."""
    return F.silu(x @ w_gate.T) * (x @ w_up.T)


def contributions(acts: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """|act_j| * ||W_down[:, j]||: how much neuron j moves the output on each token, [T, I]."""
    return acts.abs() * w_down.norm(dim=0)


def pick_shared(contrib: torch.Tensor, shared_size: int) -> torch.Tensor:
    """Indices of the `shared_size` neurons with the largest mean squared contribution (sorted)."""
    energy = contrib.pow(2).mean(dim=0)
    return energy.topk(shared_size).indices.sort().values


def _greedy_assign(sim: torch.Tensor, copies: int, cap: int) -> torch.Tensor:
    """Membership [C, N]: each row i joins its `copies` most similar distinct clusters, each cluster
    holding exactly `cap` rows (greedy on similarity, then swaps to place any row left short)."""
    n, c = sim.shape
    member = torch.zeros(c, n, dtype=torch.bool)
    fill, count = [0] * c, [0] * n
    for flat in sim.flatten().argsort(descending=True).tolist():
        i, k = divmod(flat, c)
        if count[i] < copies and fill[k] < cap:
            member[k, i] = True
            fill[k] += 1
            count[i] += 1
    for i in range(n):
        while count[i] < copies:
            room = [k for k in range(c) if fill[k] < cap]
            k = next((k for k in room if not member[k, i]), None)
            if k is None:  # the only cluster with room holds i already: swap i with a row j elsewhere
                k = room[0]
                k2 = next(k2 for k2 in range(c) if not member[k2, i] and
                          any(member[k2, j] and not member[k, j] for j in range(n)))
                j = next(j for j in range(n) if member[k2, j] and not member[k, j])
                member[k2, j], member[k, j] = False, True
                fill[k] += 1
                k = k2
                fill[k] -= 1
            member[k, i] = True
            fill[k] += 1
            count[i] += 1
    return member


def balanced_kmeans(features: torch.Tensor, n_clusters: int, copies: int = 1, iters: int = 15,
                    seed: int = 0) -> torch.Tensor:
    """Cluster rows of `features` [N, D] (cosine) into n_clusters of exactly N * copies / n_clusters rows,
    each row in `copies` distinct clusters. Returns membership [C, N] (bool).

    Equal sizes make every expert whole g128 groups; copies=2 lets a neuron that fires with two
    groups of neurons sit in both experts, so a token's top-k covers more of its energy."""
    n = features.shape[0]
    if (n * copies) % n_clusters or copies > n_clusters:
        raise ValueError(f"{n} neurons x {copies} copies do not split into {n_clusters} equal experts")
    cap = n * copies // n_clusters
    f = F.normalize(features.float(), dim=1)
    g = torch.Generator().manual_seed(seed)
    centroids = f[torch.randperm(n, generator=g)[:n_clusters]].clone()
    member = None
    for _ in range(iters):
        new = _greedy_assign(f @ centroids.T, copies, cap)
        if member is not None and torch.equal(new, member):
            break
        member = new
        centroids = F.normalize(torch.stack([f[member[c]].mean(0) for c in range(n_clusters)]), dim=1)
    return member


def expert_energy(expert_out: torch.Tensor) -> torch.Tensor:
    """Per-token share of routed output energy per expert, from expert outputs [T, E, H] -> [T, E]."""
    e = expert_out.pow(2).sum(-1)
    return e / e.sum(-1, keepdim=True).clamp_min(1e-20)


def fit_router(x: torch.Tensor, target_share: torch.Tensor, steps: int = 300, lr: float = 0.05,
               weight_decay: float = 1e-4) -> torch.Tensor:
    """Softmax regression x [T, H] -> expert energy shares [T, E]; returns router weight [E, H].

    Cross-entropy against the soft targets: the router's top-k is then the experts carrying most of a
    token's output, and its probabilities are those experts' shares."""
    h, e = x.shape[1], target_share.shape[1]
    w = torch.zeros(e, h, requires_grad=True)
    opt = torch.optim.Adam([w], lr=lr)
    xf, tf = x.detach().float(), target_share.detach().float()
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            logp = F.log_softmax(xf @ w.T, dim=-1)
            loss = -(tf * logp).sum(-1).mean() + weight_decay * w.pow(2).sum()
            loss.backward()
            opt.step()
    return w.detach()


def route(x: torch.Tensor, router: torch.Tensor, top_k: int, norm_topk: bool = True):
    """qwen2_moe routing: softmax over experts, top-k, renormalised -> (weights [T, k], ids [T, k])."""
    probs = torch.softmax((x @ router.T).float(), dim=-1)
    w, ids = probs.topk(top_k, dim=-1)
    if norm_topk:
        w = w / w.sum(-1, keepdim=True)
    return w, ids


@dataclass(frozen=True)
class Slots:
    """Which dense neuron fills each slot of the MoE: shared [S] then experts [E, es] (a neuron may sit
    in two experts). Every slot has its own down-proj scale."""

    shared: torch.Tensor
    experts: torch.Tensor

    @property
    def neurons(self) -> torch.Tensor:
        return torch.cat([self.shared, self.experts.flatten()])


def slot_gates(slots: Slots, ids: torch.Tensor, weights: torch.Tensor, shared_gate: torch.Tensor) -> torch.Tensor:
    """Per token and slot, the factor the MoE block applies to that slot's output [T, S + E*es]: the shared
    gate on shared slots, the routing weight on a selected expert's slots, 0 on a dropped expert's."""
    t, (n_exp, es) = ids.shape[0], slots.experts.shape
    per_expert = torch.zeros(t, n_exp)
    per_expert.scatter_(1, ids, weights.float())
    return torch.cat([shared_gate.reshape(t, 1).expand(t, slots.shared.numel()),
                      per_expert.repeat_interleave(es, dim=1)], dim=1)


def fit_slot_scales(acts: torch.Tensor, slots: Slots, gates: torch.Tensor, w_down: torch.Tensor,
                    ridge: float = 1e-3) -> torch.Tensor:
    """Scales s per slot minimising || sum_j act_j W_j - sum_slots s gate act_n(slot) W_n(slot) ||^2.

    Closed form: (B^T B) o (W_s^T W_s) s = ((B^T A) o (W_s^T W)) 1 with B = gate * act per slot, so the
    cost is [slots, slots] Gram matrices, never a [T*H, slots] design matrix."""
    n = slots.neurons
    a = acts.float()
    b = gates.float() * a[:, n]
    wd = w_down.float()
    ws = wd[:, n]
    lhs = ((b.T @ b) * (ws.T @ ws)).double()  # fp32 products (T-long sums), fp64 solve
    rhs = ((b.T @ a) * (ws.T @ wd)).sum(1).double()
    lhs += ridge * lhs.diagonal().mean() * torch.eye(lhs.shape[0], dtype=lhs.dtype)
    return torch.linalg.solve(lhs, rhs).float()


def moe_output(acts: torch.Tensor, slots: Slots, gates: torch.Tensor, scale: torch.Tensor,
               w_down: torch.Tensor) -> torch.Tensor:
    """The MoE block's output [T, H] written on the dense neurons (same math as qwen2_moe)."""
    n = slots.neurons
    return (gates * acts[:, n] * scale) @ w_down[:, n].T


# ------------------------------------------------------------------------------------------ assembly

def qwen2_moe_config(dense_cfg: dict, spec: MoefySpec) -> dict:
    """The qwen2_moe config.json for a MoEfied llama-style dense config (every field each loader reads)."""
    keep = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
            "max_position_embeddings", "rms_norm_eps", "hidden_act", "bos_token_id", "eos_token_id",
            "pad_token_id", "tie_word_embeddings", "rope_parameters", "initializer_range")
    cfg = {k: dense_cfg[k] for k in keep if k in dense_cfg}
    rope = dense_cfg.get("rope_parameters") or {"rope_theta": dense_cfg.get("rope_theta", 10000.0),
                                               "rope_type": "default"}
    cfg.update(architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe", rope_parameters=rope,
               rope_theta=rope.get("rope_theta"),
               intermediate_size=dense_cfg["intermediate_size"], moe_intermediate_size=spec.expert_size,
               shared_expert_intermediate_size=spec.shared_size, num_experts=spec.n_experts,
               num_experts_per_tok=spec.top_k, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
               qkv_bias=True, use_sliding_window=False, sliding_window=None, max_window_layers=0,
               attention_dropout=0.0, output_router_logits=False, router_aux_loss_coef=0.0,
               dtype="bfloat16", use_cache=True, tie_word_embeddings=False)
    head_dim = dense_cfg.get("head_dim", dense_cfg["hidden_size"] // dense_cfg["num_attention_heads"])
    if head_dim * dense_cfg["num_attention_heads"] != dense_cfg["hidden_size"]:
        raise ValueError("qwen2_moe derives head_dim = hidden / heads; this dense model's head_dim differs")
    return cfg


def assemble_state_dict(dense: dict, pieces: dict, spec: MoefySpec, n_layers: int) -> dict:
    """Dense llama-style tensors + learned pieces -> qwen2_moe tensors (per-expert 2-D layout, the one
    Qwen1.5-MoE ships and every loader reads). Attention gains zero q/k/v biases (qwen2 has them)."""
    out = {name: t for name, t in dense.items() if ".mlp." not in name}
    for i in range(n_layers):
        p, m = f"model.layers.{i}.", f"model.layers.{i}.mlp."
        for proj in ("q_proj", "k_proj", "v_proj"):
            w = dense[p + f"self_attn.{proj}.weight"]
            out[p + f"self_attn.{proj}.bias"] = torch.zeros(w.shape[0], dtype=w.dtype)
        wg, wu, wd = (dense[m + f"{k}_proj.weight"] for k in ("gate", "up", "down"))
        shared, experts = pieces[f"layers.{i}.shared"].long(), pieces[f"layers.{i}.experts"].long()
        s_scale, e_scale = pieces[f"layers.{i}.shared_scale"].float(), pieces[f"layers.{i}.expert_scale"].float()
        if experts.shape != (spec.n_experts, spec.expert_size) or shared.numel() != spec.shared_size:
            raise ValueError(f"pieces for layer {i} do not match the spec {spec}")

        def block(prefix, idx, scale):
            out[prefix + "gate_proj.weight"] = wg[idx].contiguous()
            out[prefix + "up_proj.weight"] = wu[idx].contiguous()
            out[prefix + "down_proj.weight"] = (wd.float()[:, idx] * scale).to(wd.dtype).contiguous()

        block(m + "shared_expert.", shared, s_scale)
        for e in range(spec.n_experts):
            block(m + f"experts.{e}.", experts[e], e_scale[e])
        out[m + "shared_expert_gate.weight"] = pieces[f"layers.{i}.shared_gate"].to(wd.dtype).reshape(1, -1)
        out[m + "gate.weight"] = pieces[f"layers.{i}.router"].to(wd.dtype).contiguous()
    return out


def load_pieces(path: Path) -> tuple[dict, MoefySpec, dict]:
    """The shipped learned pieces (safetensors) -> (tensors, spec, metadata)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != PIECES_FORMAT:
        raise ValueError(f"{path}: not a {PIECES_FORMAT} file (format={meta.get('format')!r})")
    spec = MoefySpec(**json.loads(meta["spec"]))
    return tensors, spec, meta


def spec_json(spec: MoefySpec) -> str:
    return json.dumps(asdict(spec), sort_keys=True)
