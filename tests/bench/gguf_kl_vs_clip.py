"""Side-by-side fidelity of the deployable GGUF and our int3 clip checkpoint, both against BF16 SmolLM2,
on the same text and the same context length. Prints a markdown table (pasted into docs/GGUF.md) and
writes results/gguf/smollm2_gguf_vs_clip.json.

Rows (every KL is KL(BF16 teacher || student) in nats/token):
  * GGUFs from pipelines/pack_gguf.sh (IQ3_XXS recipe = shipped, Q3_K recipe) -- llama-perplexity
  * int3 / int4 clip checkpoints (quant_save.py, dequantized BF16) -- moe_eval (torch), AND the same weights
    converted to a BF16 GGUF and measured by llama-perplexity, so the two tools are compared on one model
SmolLM2 is dense: the recipe's expert rules do not apply; its attention takes iq4_nl/q4_k, its MLP the
base type (576-wide rows fall back, see the meta JSON), its tied embedding q8_0. A clip checkpoint
quantizes every linear layer AND the tied embedding at the given bits; the diagnostic "BF16 embedding"
rows put the teacher's embedding back, to separate the embedding's share of the error.
Text: CPython's own documentation (pydoc_data.topics, shipped with every Python: offline and
reproducible). Topics are split alternately: odd topics calibrate the imatrix, even topics are evaluated,
so the GGUF is not scored on its calibration text.

    python tests/bench/gguf_kl_vs_clip.py [--ctx 512] [--chunks 16] [--work DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import bench_paths  # tests/bench/ is on the path of a script run from it

ROOT = bench_paths.use_project_modules()

import embedded_model  # noqa: E402
import cache_paths  # noqa: E402
import gguf_source  # noqa: E402
import llamacpp_server  # noqa: E402
import llamacpp_fidelity  # noqa: E402
import provenance  # noqa: E402


def split_texts() -> tuple[str, str]:
    """(calibration text, evaluation text) from pydoc_data.topics, alternating topics."""
    from pydoc_data import topics

    items = [topics.topics[k] for k in sorted(topics.topics)]
    return "\n\n".join(items[1::2]), "\n\n".join(items[0::2])


def with_teacher_embedding(clip: Path, teacher: Path, dst: Path) -> Path:
    """Diagnostic student: the clip's weights with the teacher's BF16 (tied) embedding put back, so a
    clip can be compared with a GGUF that keeps embed/output at q8_0. No _ptq_meta.json (not a build)."""
    from safetensors.torch import load_file, save_file

    if (dst / "model.safetensors").is_file():
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    for f in clip.iterdir():
        if f.name not in ("model.safetensors", "_ptq_meta.json") and not (dst / f.name).exists():
            (dst / f.name).symlink_to(f)
    state = load_file(str(clip / "model.safetensors"))
    embed = [k for k in state if k.endswith("embed_tokens.weight") or k == "lm_head.weight"]
    teacher_state = load_file(str(next(teacher.glob("*.safetensors"))))
    for k in embed:
        state[k] = teacher_state[k]
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def step(msg: str) -> None:
    print(f"[gguf_kl_vs_clip] {msg}", file=sys.stderr, flush=True)


def run(cmd: list, env: dict | None = None) -> str:
    step("+ " + " ".join(map(str, cmd)))
    proc = subprocess.run([str(c) for c in cmd], env={**os.environ, **(env or {})}, cwd=ROOT,
                          stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {cmd[0]}")
    return proc.stdout


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--clip-bits", default="3,4", help="comma list: linear/expert bits of the clip checkpoints")
    ap.add_argument("--no-keep-embed-rows", dest="keep_embed_rows", action="store_false",
                    help="skip the diagnostic rows (clip with the BF16 embedding restored)")
    ap.add_argument("--gguf-types", default="IQ3_XXS,Q3_K_M", help="comma list of pack_gguf BASE_TYPEs")
    ap.add_argument("--imatrix-chunks", type=int, default=32)
    ap.add_argument("--work", default=None, help="scratch dir (default $MOE_LOWBIT_CACHE/bench-gguf-kl)")
    ap.add_argument("--out", default=str(ROOT / "results" / "gguf" / "smollm2_gguf_vs_clip.json"))
    args = ap.parse_args(argv)

    import moe_eval

    cache = cache_paths.cache_root()
    work = Path(args.work) if args.work else cache / "bench-gguf-kl"
    work.mkdir(parents=True, exist_ok=True)
    calib_text, eval_text = split_texts()
    calib, evalf = work / "calib.txt", work / "eval.txt"
    calib.write_text(calib_text, encoding="utf-8")
    evalf.write_text(eval_text, encoding="utf-8")
    teacher = embedded_model.smollm2_bf16_dir()
    prefix = llamacpp_server.default_prefix(ROOT)
    tree = prefix / "llama.cpp"

    # 1. the deployable GGUFs (IQ3 recipe = shipped, Q3_K recipe) and the BF16 GGUF they come from
    gguf_dir = work / "gguf"
    ggufs, gguf_metas = {}, {}
    for base_type in args.gguf_types.split(","):
        run(["bash", "pipelines/pack_gguf.sh"], env={
            "MODEL": "embedded:smollm2", "OUT": str(gguf_dir), "NAME": "smollm2", "BASE_TYPE": base_type,
            "CALIB_FILE": str(calib), "IMATRIX_CHUNKS": str(args.imatrix_chunks), "IMATRIX_CTX": str(args.ctx),
            "THREADS": str(args.threads), "LLAMA_CPP": str(prefix)})
        ggufs[f"gguf_{base_type.lower()}"] = gguf_dir / f"smollm2-{base_type}.gguf"
        gguf_metas[f"gguf_{base_type.lower()}"] = json.loads((gguf_dir / f"smollm2-{base_type}.meta.json").read_text())
    bf16 = gguf_dir / "smollm2-BF16.gguf"

    # 2. our clip checkpoints (dequantized BF16 safetensors) and the same weights as BF16 GGUFs
    clips, clip_metas, clip_ggufs = {}, {}, {}
    for bits in (f"{float(b):g}" for b in args.clip_bits.split(",")):
        name = f"clip_int{bits}"
        clip = work / name
        if not (clip / "_ptq_meta.json").is_file():
            run([sys.executable, "src/quant/quant_save.py", "--model", teacher, "--out", clip, "--expert-bits", bits,
                 "--linear-bits", bits, "--no-progress", "--force"])
        clips[name], clip_metas[name] = clip, json.loads((clip / "_ptq_meta.json").read_text())
        if args.keep_embed_rows:
            diag = f"{name}_bf16embed"
            clips[diag] = with_teacher_embedding(clip, teacher, work / diag)
            clip_metas[diag] = {**clip_metas[name], "diagnostic": "embedding restored to BF16"}
    for name, clip in clips.items():
        clip_ggufs[name] = work / f"{name}-BF16.gguf"
        if not clip_ggufs[name].is_file():
            # the clip carries the embedded model's tokenizer.json: convert through the same BPE view
            src = gguf_source.byte_level_bpe_view(clip, work / f"{name}-bpe-view") \
                if gguf_source.tokenizer_conflict(clip) else clip
            run([sys.executable, tree / "convert_hf_to_gguf.py", src, "--outtype", "bf16", "--outfile", clip_ggufs[name]],
                env={"PYTHONPATH": f"{tree / 'gguf-py'}:{os.environ.get('PYTHONPATH', '')}"})

    # 3. llama-perplexity KL of every student against the BF16 GGUF
    binary = llamacpp_server.find_binary(prefix, "llama-perplexity")
    lp = llamacpp_fidelity.run_fidelity(binary, bf16, {**ggufs, **clip_ggufs}, evalf, args.ctx, args.chunks,
                                        args.threads, work / "kld")
    # 4. the token stream llama-perplexity reads (llama.cpp's tokenizer, server /tokenize; add_bos is false
    # for this vocabulary, so chunk i is tokens [i*ctx, (i+1)*ctx)), compared with transformers'
    n_tok = args.ctx * args.chunks
    hf_ids = moe_eval.load_tokenizer(teacher)(eval_text, add_special_tokens=False)["input_ids"][:n_tok]
    scfg = llamacpp_server.ServerConfig(binary=llamacpp_server.find_binary(prefix), model=bf16, ctx_size=512, threads=1)
    with llamacpp_server.LlamaServer(scfg) as server:
        import urllib.request

        req = urllib.request.Request(server.base_url + "/tokenize", method="POST",
                                     data=json.dumps({"content": eval_text, "add_special": False}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            lc_ids = json.loads(r.read())["tokens"][:n_tok]
    first_diff = next((i for i, (a, b) in enumerate(zip(hf_ids, lc_ids)) if a != b), None)
    same_tokens = {"compared": min(len(hf_ids), len(lc_ids)), "first_difference_at": first_diff,
                   "identical": first_diff is None and len(hf_ids) == len(lc_ids),
                   "moe_eval_windows_from": "llama.cpp token ids (so both tools score the same windows)"}
    step(f"token streams: {same_tokens}")

    # 5. moe_eval KL of the clip checkpoints on exactly those windows (transformers' tokenizer of the
    # embedded checkpoint splits whitespace before digits differently, see docs/GGUF.md)
    import torch

    cfg = moe_eval.FidelityConfig(ctx=args.ctx, max_tokens=n_tok, device="cpu", add_bos=False)
    windows = moe_eval.TokenWindows(torch.tensor(lc_ids, dtype=torch.int64).reshape(args.chunks, args.ctx),
                                    {"kind": "llama.cpp /tokenize", "path": str(evalf),
                                     "sha256": provenance.sha256_file(evalf)})
    me_students = {name: moe_eval.load_hf_model(path, cfg) for name, path in clips.items()}
    me = moe_eval.compare_loaded(moe_eval.load_hf_model(teacher, cfg), me_students, windows, cfg,
                                 teacher_id=moe_eval.model_identity(teacher))
    me["text"] = dict(windows.source, tokens_sha256=windows.sha256, n_windows=args.chunks, ctx=args.ctx,
                      n_scored_tokens=windows.n_scored)

    lp_by = {s["name"]: s for s in lp["students"]}
    me_by = me["students"]
    rows = []
    for name, meta in gguf_metas.items():
        rows.append((f"GGUF {meta['base_type']} ({Path(meta['recipe']['path']).name})",
                     f"{meta['bits_per_weight']:.2f} / {meta['bits_per_weight_without_embed_output']:.2f}",
                     lp_by[name], None))
    for name, meta in clip_metas.items():
        fp = meta["footprint"]
        body = {r: v for r, v in fp["roles"].items() if r not in ("embed", "lm_head")}
        body_params = sum(v["params"] for v in body.values())
        body_bits = sum(v["effective_bits"] * v["params"] for v in body.values()) / body_params
        if meta.get("diagnostic"):
            emb = sum(v["params"] for r, v in fp["roles"].items() if r in ("embed", "lm_head"))
            all_bits = (body_bits * body_params + 16.0 * emb) / (body_params + emb)
            label = f"{name.replace('_bf16embed', '').replace('_', ' ')} g{meta['recipe']['group']}, BF16 embedding (diagnostic)"
        else:
            all_bits = fp["total"]["effective_bits"]
            label = f"{name.replace('_', ' ')} g{meta['recipe']['group']} (embedding too)"
        rows.append((label, f"{all_bits:.2f} / {body_bits:.2f}", lp_by[name], me_by[name]))
    me_clip = next(iter(me_by.values()))

    def kl(s):
        return "-" if s is None else f"{s['kl_mean']:.4f} ± {s['kl_mean_stderr']:.4f}"

    def top1(s):
        return "-" if s is None else f"{100 * s['top1_agree']:.1f}%"

    def ppl(s):
        return "-" if s is None else f"{s['ppl_student']:.3f} / {s['ppl_teacher']:.3f}"

    lines = [f"SmolLM2-135M-Instruct vs its BF16; text: CPython pydoc topics (even-numbered); ctx {args.ctx}; "
             f"the same {args.chunks} windows of {args.ctx} tokens in both tools; llama-perplexity (lp) scores "
             f"{lp['text']['n_scored_tokens']} tokens (2nd half of each window), moe_eval (me) "
             f"{me_clip['n_scored_tokens']} (every position) of the same llama.cpp token ids",
             "",
             "| student | bits/weight (all / without embed+output) | KL llama-perplexity | top-1 (lp) | PPL student / BF16 (lp) | KL moe_eval | top-1 (me) | PPL student / BF16 (me) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, bpw, lps, mes in rows:
        lines.append(f"| {name} | {bpw} | {kl(lps)} | {top1(lps)} | {ppl(lps)} | {kl(mes)} | {top1(mes)} | {ppl(mes)} |")
    table = "\n".join(lines)
    print(table)

    doc = {"schema": "moe-lowbit/gguf-vs-clip/v1", "provenance": provenance.record(argv=sys.argv),
           "table_markdown": table, "token_streams": same_tokens, "llama_perplexity": lp, "moe_eval": me,
           "gguf_meta": {n: {k: m[k] for k in ("base_type", "bits_per_weight", "bits_per_weight_without_embed_output",
                                               "size_gib", "type_counts", "llama_quantize_fallbacks")}
                         for n, m in gguf_metas.items()},
           "clip_ptq_meta": clip_metas}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(provenance.redact(json.dumps(doc, indent=1, default=str)) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
