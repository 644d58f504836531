"""Fit the learned pieces of embedded:smollm2-moe (the script that produced data/smollm2_moe/pieces.safetensors).

Run once by a maintainer; a fresh machine only assembles (embedded_model.py), it never refits. The fit is
sequential: layer i is fitted on the MLP inputs that the already-MoEfied layers 0..i-1 produce, with the
dense layer's own MLP output on those inputs as the target, so each layer corrects for the drift above it.

Calibration text: the Python reference-manual topics shipped in CPython's stdlib (pydoc_data.topics),
the topics whose sorted index is not a multiple of 5 (the others are held out, see moefy_eval.py);
data/smoke/fidelity.txt is never seen here.

    python src/eval/moefy_fit.py [--dense embedded:smollm2] [--tokens 16384] [--ctx 256]
        [--out data/smollm2_moe/pieces.safetensors]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import atomic_io
import moefy
import provenance

REPO = Path(__file__).resolve().parents[2]
SAMPLE_SEED = 1234  # moe_eval's teacher-sample text defaults to seed 0: never the same windows
DEFAULT_OUT = REPO / "data" / "smollm2_moe" / "pieces.safetensors"


def pydoc_topics_text(held_out: bool) -> str:
    """Calibration (held_out=False) or held-out (True) text from CPython's pydoc_data topics."""
    import pydoc_data.topics as topics

    keys = sorted(topics.topics)
    chosen = [k for i, k in enumerate(keys) if (i % 5 == 0) == held_out]
    return "\n\n".join(topics.topics[k] for k in chosen)


def calibration_windows(tokenizer, text: str, n_tokens: int, ctx: int) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    per = ctx - 1
    n = min(len(ids) // per, max(1, n_tokens // ctx))
    body = torch.tensor(ids[: n * per]).reshape(n, per)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return torch.cat([torch.full((n, 1), bos), body], dim=1)


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Fit the router, shared gate, neuron permutation and scales of "
                                             "embedded:smollm2-moe from the dense SmolLM2 (maintainers only; "
                                             "the fixture build reuses the shipped result).")
    ap.add_argument("--dense", default="embedded:smollm2", help="dense checkpoint dir or embedded:NAME")
    ap.add_argument("--tokens", type=int, default=8192, help="calibration tokens")
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--n-experts", type=int, default=8)
    ap.add_argument("--expert-size", type=int, default=128)
    ap.add_argument("--shared-size", type=int, default=1024)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--copies", type=int, default=2, help="experts each non-shared neuron sits in")
    ap.add_argument("--sample-windows", type=int, default=0,
                    help="extra calibration windows sampled from the dense model (seed %d, T=0.8)" % 1234)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    from safetensors.torch import save

    import model_ref
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dense = model_ref.resolve(args.dense, what="--dense")
    spec = moefy.MoefySpec(args.n_experts, args.expert_size, args.shared_size, args.top_k, args.copies)
    cfg = json.loads((Path(dense) / "config.json").read_text())
    spec.check(int(cfg["intermediate_size"]))
    torch.manual_seed(0)
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(str(dense))
    model = AutoModelForCausalLM.from_pretrained(str(dense), dtype=torch.float32).eval()
    windows = calibration_windows(tok, pydoc_topics_text(held_out=False), args.tokens, args.ctx)
    if args.sample_windows:
        import fidelity_text  # the dense model's own text, so the fit also sees its general distribution

        sampled = fidelity_text.sample_windows(model, int(windows[0, 0]), args.sample_windows, args.ctx,
                                               seed=SAMPLE_SEED, temperature=0.8)
        windows = torch.cat([windows, sampled])
    pieces, stats = fit_model(model, windows, spec)
    meta = {"format": moefy.PIECES_FORMAT, "spec": moefy.spec_json(spec),
            "calibration": json.dumps({"text": "pydoc_data.topics, sorted index % 5 != 0",
                                       "sampled_windows": args.sample_windows, "sample_seed": SAMPLE_SEED,
                                       "windows": int(windows.shape[0]), "ctx": args.ctx,
                                       "python": sys.version.split()[0]}),
            "dense_config_sha": provenance.sha256_json(cfg)}
    atomic_io.write_bytes(args.out, save(pieces, metadata=meta))
    report = {"spec": json.loads(meta["spec"]), "calibration": json.loads(meta["calibration"]),
              "fit_seconds": round(time.time() - t0, 1), "layers": stats}
    atomic_io.write_json(args.out.with_name("fit_report.json"), report)
    mean = lambda k: sum(s[k] for s in stats) / len(stats)  # noqa: E731
    print(f"fitted {len(stats)} layers in {report['fit_seconds']} s: mean rel_err {mean('rel_err'):.4f}, "
          f"router recall {mean(f'router_top{spec.top_k}_recall'):.3f} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
