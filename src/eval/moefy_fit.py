"""Fit the learned pieces of embedded:smollm2-moe (the script that produced configs/data/smollm2_moe/pieces.safetensors).

Run once by a maintainer; a fresh machine only assembles (embedded_model.py), it never refits. The fit is
sequential: layer i is fitted on the MLP inputs that the already-MoEfied layers 0..i-1 produce, with the
dense layer's own MLP output on those inputs as the target, so each layer corrects for the drift above it.

Calibration text: the Python reference-manual topics shipped in CPython's stdlib (pydoc_data.topics),
the topics whose sorted index is not a multiple of 5 (the others are held out, see moefy_eval.py);
configs/data/smoke/fidelity.txt is never seen here.

    python src/eval/moefy_fit.py [--dense embedded:smollm2] [--tokens 16384] [--ctx 256]
        [--out configs/data/smollm2_moe/pieces.safetensors]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import atomic_io
import provenance

REPO = Path(__file__).resolve().parents[2]
SAMPLE_SEED = 1234  # moe_eval's teacher-sample text defaults to seed 0: never the same windows
DEFAULT_OUT = REPO / "configs" / "data" / "smollm2_moe" / "pieces.safetensors"


def pydoc_topics_text(held_out: bool) -> str:
    """Calibration (held_out=False) or held-out (True) text from CPython's pydoc_data topics."""
    import pydoc_data.topics as topics

    keys = sorted(topics.topics)
    chosen = [k for i, k in enumerate(keys) if (i % 5 == 0) == held_out]
    return "\n\n".join(topics.topics[k] for k in chosen)


def calibration_windows(tokenizer, text: str, n_tokens: int, ctx: int):
    """[n, ctx] token windows (BOS first) of `text`, at most n_tokens."""
    import torch

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    per = ctx - 1
    n = min(len(ids) // per, max(1, n_tokens // ctx))
    body = torch.tensor(ids[: n * per]).reshape(n, per)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return torch.cat([torch.full((n, 1), bos), body], dim=1)


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
    import torch
    from safetensors.torch import save
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import model_ref
    import moefy
    from moefy_fit_layers import fit_model

    dense = model_ref.resolve(args.dense, what="--dense")
    spec = moefy.MoefySpec(args.n_experts, args.expert_size, args.shared_size, args.top_k, args.copies)
    cfg = json.loads((Path(dense) / "config.json").read_text())
    spec.check(int(cfg["intermediate_size"]))
    torch.manual_seed(0)
    torch.set_num_threads(1)  # once, here: the router fit's 300 tiny steps per layer spend 15x the math on
    # thread hand-offs on a shared box
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
