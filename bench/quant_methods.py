"""Quantization methods on the embedded SmolLM2: file bits per weight against KL(BF16 teacher || student),
our methods (clip, rtn, wclip, gptq, awq at several bits / groups / embedding bits) next to llama.cpp's
Q3_K_M, IQ3 recipe, Q4_K_M and Q4_0 (each with an imatrix from the same calibration text).

Text: CPython's pydoc topics (offline, reproducible): odd-numbered topics calibrate (our methods and the
imatrix alike), even-numbered ones are evaluated. Every student is scored on the same 16 windows of 512
llama.cpp token ids (the ids `bench/gguf_kl_vs_clip.py` uses): ours by moe_eval (every position, exact
full-vocabulary KL), the GGUFs by llama-perplexity (2nd half of each window, its own KL). Bits per weight
count every tensor (a tied embedding once): ours from `_ptq_meta.json`'s footprint, GGUFs from their file.

Writes results/quant_methods/smollm2_methods.json, results/quant_methods/smollm2_pareto.png and the table
between the markers in docs/QUANTIZE.md (all regenerated from the JSON: `--report-only`).

    python bench/quant_methods.py [--only NAME,NAME] [--skip-gguf] [--calib-tokens 16384] [--report-only]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# this script shares its name with src/quant/quant_methods.py: keep bench/ itself off the import path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
for sub in ("src/quant", "src/eval"):
    sys.path.insert(0, str(ROOT / sub))

import atomic_io  # noqa: E402
import calib_source  # noqa: E402
import embedded_model  # noqa: E402
import provenance  # noqa: E402

OUT_JSON = ROOT / "results" / "quant_methods" / "smollm2_methods.json"
OUT_PNG = ROOT / "results" / "quant_methods" / "smollm2_pareto.png"
DOC = ROOT / "docs" / "QUANTIZE.md"
BEGIN, END = "<!-- quant_methods table: begin (bench/quant_methods.py) -->", "<!-- quant_methods table: end -->"
GGUF_POINTS = ("Q3_K_M", "IQ3_XXS", "Q4_K_M", "Q4_0")  # IQ3_XXS base type = the IQ3 recipe (configs/gguf.env)
LLAMA_REF = ("Q3_K_M", "IQ3_XXS", "Q4_K_M")  # the points the acceptance asks about


def configs() -> list[tuple[str, dict]]:
    """(name, quant_save options) of every build; the body is every linear (SmolLM2 is dense)."""
    rows = []
    for bits in (4, 3):
        for method in ("clip", "rtn", "wclip", "gptq", "awq"):
            rows.append((f"{method}_int{bits}_g128_emb8", dict(method=method, linear_bits=float(bits),
                                                                role_bits="embed=8")))
    for method in ("clip", "gptq"):
        rows.append((f"{method}_int4_g128_emb4", dict(method=method, linear_bits=4.0)))
        for group in (64, 32):
            rows.append((f"{method}_int3_g{group}_emb8", dict(method=method, linear_bits=3.0, group=group,
                                                               role_bits="embed=8")))
    return rows


def step(msg: str) -> None:
    print(f"[quant_methods] {msg}", file=sys.stderr, flush=True)


def build_ours(teacher: Path, work: Path, names, calib_tokens: int) -> dict:
    import calib_stats  # noqa: F401  (every builder module loaded before the first build)
    import quant_save

    metas = {}
    for name, opts in configs():
        if names and name not in names:
            continue
        out = work / name
        t0 = time.perf_counter()
        calib = {"calib": "pydoc-topics", "calib_tokens": calib_tokens, "calib_ctx": 512} \
            if opts["method"] in ("wclip", "gptq", "awq") else {}
        step(f"build {name}")
        meta = quant_save.build({"model": str(teacher), "out": str(out), "progress": False, "force": True,
                                 "clip_steps": 16, **opts, **calib})
        metas[name] = {"meta": meta, "wall_s": time.perf_counter() - t0, "path": str(out), "options": opts}
        step(f"built {name} in {metas[name]['wall_s']:.0f} s "
             f"({meta['footprint']['total']['effective_bits']:.3f} bpw)")
    return metas


def pack_ggufs(work: Path, calib: Path, prefix: Path) -> dict:
    empty = work / "no_overrides.txt"
    empty.write_text("# no per-tensor overrides: llama-quantize's own mix for the base type\n")
    out = {}
    for base in GGUF_POINTS:
        env = {"MODEL": "embedded:smollm2", "OUT": str(work / "gguf"), "NAME": "smollm2", "BASE_TYPE": base,
               "CALIB_FILE": str(calib), "IMATRIX_CHUNKS": "32", "IMATRIX_CTX": "512", "LLAMA_CPP": str(prefix),
               "THREADS": str(os.cpu_count())}
        if base in ("Q4_K_M", "Q4_0"):
            env["TENSOR_TYPES"] = str(empty)
        step(f"pack {base}")
        proc = subprocess.run(["bash", "pipelines/pack_gguf.sh"], env={**os.environ, **env}, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            step(f"pack {base} failed: {proc.stderr.strip().splitlines()[-1:]}")
            continue
        meta = json.loads((work / "gguf" / f"smollm2-{base}.meta.json").read_text())
        out[base] = {"gguf": str(work / "gguf" / f"smollm2-{base}.gguf"), "bits_per_weight": meta["bits_per_weight"],
                     "bits_per_weight_without_embed_output": meta["bits_per_weight_without_embed_output"],
                     "recipe": meta.get("recipe", {}).get("path")}
    return out


def llamacpp_points_from(path: Path) -> dict:
    """llama.cpp points already measured by bench/gguf_kl_vs_clip.py (same text split, same windows, imatrix
    from the same calibration text): reused instead of re-packing when time is short (`--llamacpp-from`)."""
    doc = json.loads(path.read_text())
    lp = {s["name"]: s for s in doc["llama_perplexity"]["students"]}
    out = {}
    for name, meta in doc["gguf_meta"].items():
        s = lp.get(name, {})
        out[meta["base_type"]] = {"gguf": None, "bits_per_weight": meta["bits_per_weight"],
                                  "bits_per_weight_without_embed_output": meta["bits_per_weight_without_embed_output"],
                                  "kl": s.get("kl_mean"), "kl_stderr": s.get("kl_mean_stderr"),
                                  "top1": s.get("top1_agree"), "measured_by": str(path.relative_to(ROOT))}
    return out


def bf16_gguf(teacher: Path, work: Path, prefix: Path) -> Path:
    """The teacher as a BF16 GGUF (llama.cpp's converter), for llama.cpp's token ids of the eval text."""
    import gguf_pack

    out = work / "gguf" / "smollm2-BF16.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tree = prefix / "llama.cpp"
    src = gguf_pack.byte_level_bpe_view(teacher, work / "bpe-view") if gguf_pack.tokenizer_conflict(teacher) else teacher
    subprocess.run([sys.executable, str(tree / "convert_hf_to_gguf.py"), str(src), "--outtype", "bf16", "--outfile",
                    str(out)], check=True, env={**os.environ, "PYTHONPATH": f"{tree / 'gguf-py'}:"
                                                                           f"{os.environ.get('PYTHONPATH', '')}"},
                   stdout=subprocess.DEVNULL)
    return out


def llamacpp_ids(prefix: Path, bf16: Path, text: str, n: int) -> list[int]:
    import urllib.request

    import llama_server

    scfg = llama_server.ServerConfig(binary=llama_server.find_binary(prefix), model=bf16, ctx_size=512, threads=1)
    with llama_server.LlamaServer(scfg) as server:
        req = urllib.request.Request(server.base_url + "/tokenize", method="POST",
                                     data=json.dumps({"content": text, "add_special": False}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.loads(r.read())["tokens"][:n]


def measure(teacher: Path, metas: dict, ggufs: dict, work: Path, evalf: Path, eval_text: str, prefix: Path,
            ctx: int, chunks: int) -> tuple[dict, dict, dict]:
    import torch

    import moe_eval

    n_tok = ctx * chunks
    bf16 = work / "gguf" / "smollm2-BF16.gguf"
    if bf16.is_file():
        ids = llamacpp_ids(prefix, bf16, eval_text, n_tok)
        kind = "llama.cpp /tokenize"
    else:  # no llama.cpp: transformers' ids (the table says so)
        ids = moe_eval.load_tokenizer(teacher)(eval_text, add_special_tokens=False)["input_ids"][:n_tok]
        kind = "transformers tokenizer"
    cfg = moe_eval.EvalConfig(ctx=ctx, max_tokens=n_tok, device="cpu", add_bos=False)
    windows = moe_eval.TokenWindows(torch.tensor(ids, dtype=torch.int64).reshape(chunks, ctx),
                                    {"kind": kind, "path": str(evalf), "sha256": provenance.sha256_file(evalf)})
    students = {name: moe_eval.load_hf_model(m["path"], cfg) for name, m in metas.items()}
    me = moe_eval.compare_loaded(moe_eval.load_hf_model(teacher, cfg), students, windows, cfg,
                                 teacher_id=moe_eval.model_identity(teacher))
    lp = {"students": []}
    if ggufs:
        import llama_server
        import llamacpp_fidelity

        binary = llama_server.find_binary(prefix, "llama-perplexity")
        lp = llamacpp_fidelity.run_fidelity(binary, bf16, {b: Path(g["gguf"]) for b, g in ggufs.items()}, evalf, ctx,
                                            chunks, os.cpu_count(), work / "kld")
    return me, lp, {"kind": kind, "tokens_sha256": windows.sha256, "n_windows": chunks, "ctx": ctx}


def rows_from(doc: dict) -> list[dict]:
    rows = []
    for name, r in doc["ours"].items():
        rows.append({"name": name, "kind": "ours", "method": r["options"]["method"], "bpw": r["bpw"],
                     "bpw_body": r["bpw_body"], "kl": r["kl"], "kl_stderr": r["kl_stderr"], "top1": r["top1"],
                     "wall_s": r["wall_s"], "tool": "moe_eval"})
    for base, r in doc["llamacpp"].items():
        rows.append({"name": f"llama.cpp {base}" + (" (IQ3 recipe)" if base == "IQ3_XXS" else "") +
                     (f" [{r['measured_by']}]" if r.get("measured_by") else ""), "kind": "llamacpp",
                     "method": base, "bpw": r["bits_per_weight"], "bpw_body": r["bits_per_weight_without_embed_output"],
                     "kl": r.get("kl"), "kl_stderr": r.get("kl_stderr"), "top1": r.get("top1"), "wall_s": None,
                     "tool": "llama-perplexity"})
    return sorted(rows, key=lambda r: (r["kind"] != "llamacpp", r["bpw"]))


def answers(rows: list[dict]) -> list[str]:
    """For each llama.cpp reference point: does one of our builds at <= its bpw reach <= its KL?"""
    ours = [r for r in rows if r["kind"] == "ours" and r["kl"] is not None]
    out = []
    for r in rows:
        if r["kind"] != "llamacpp" or r["method"] not in LLAMA_REF or r["kl"] is None:
            continue
        fit = [o for o in ours if o["bpw"] <= r["bpw"]]
        best = min(fit, key=lambda o: o["kl"], default=None)
        if best is None:
            out.append(f"* {r['name']} ({r['bpw']:.2f} bpw, KL {r['kl']:.3f}): none of our builds is that small.")
        elif best["kl"] <= r["kl"]:
            out.append(f"* {r['name']} ({r['bpw']:.2f} bpw, KL {r['kl']:.3f}): **yes**, {best['name']} at "
                       f"{best['bpw']:.2f} bpw reaches KL {best['kl']:.3f}.")
        else:
            out.append(f"* {r['name']} ({r['bpw']:.2f} bpw, KL {r['kl']:.3f}): **no**; our best at <= "
                       f"{r['bpw']:.2f} bpw is {best['name']} ({best['bpw']:.2f} bpw) with KL {best['kl']:.3f}, "
                       f"{best['kl'] / r['kl']:.1f}x its KL.")
    return out


def table(doc: dict) -> str:
    rows = rows_from(doc)
    t = doc["text"]
    lines = [f"SmolLM2-135M-Instruct vs its BF16; {t['n_windows']} windows x {t['ctx']} tokens of the even pydoc "
             f"topics ({t['kind']} ids); calibration: odd pydoc topics, {doc['calib_tokens']} tokens (ours) / the "
             f"same text for the imatrix. KL in nats/token; bpw = file bits per weight, every tensor counted.", "",
             "| student | bpw (all / body) | KL | top-1 | tool | build s |", "|---|---|---|---|---|---|"]
    for r in rows:
        kl = "-" if r["kl"] is None else f"{r['kl']:.4f} ± {r['kl_stderr']:.4f}"
        top1 = "-" if r["top1"] is None else f"{100 * r['top1']:.1f}%"
        wall = "-" if r["wall_s"] is None else f"{r['wall_s']:.0f}"
        lines.append(f"| {r['name']} | {r['bpw']:.2f} / {r['bpw_body']:.2f} | {kl} | {top1} | {r['tool']} | {wall} |")
    if any(r.get("measured_by") for r in doc["llamacpp"].values()):
        lines += ["", "llama.cpp rows were measured by bench/gguf_kl_vs_clip.py (its JSON is named in the row) on 16 "
                      "windows of the same llama.cpp token stream, of which the windows above are the first "
                      f"{t['n_windows']}; their KL is llama-perplexity's (2nd half of each window), ours moe_eval's "
                      "(every position). That bench measured both tools on the same clip checkpoints: they agree "
                      "within ~4%."]
    lines += ["", "Does one of our methods at <= a llama.cpp point's file bpw reach <= its KL?", ""] + answers(rows)
    return "\n".join(lines)


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = rows_from(doc)
    fig, ax = plt.subplots(figsize=(8, 5))
    for method in ("clip", "rtn", "wclip", "gptq", "awq"):
        pts = sorted((r["bpw"], r["kl"]) for r in rows if r["kind"] == "ours" and r["method"] == method
                     and r["kl"] is not None)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
    for r in rows:
        if r["kind"] == "llamacpp" and r["kl"] is not None:
            ax.scatter([r["bpw"]], [r["kl"]], marker="*", s=160, color="black", zorder=5)
            ax.annotate(r["method"], (r["bpw"], r["kl"]), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("file bits per weight (all tensors)")
    ax.set_ylabel("KL(teacher || student), nats/token")
    ax.set_title("SmolLM2-135M: quantization methods vs llama.cpp (held-out pydoc text)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_doc_table(text: str) -> None:
    doc = DOC.read_text()
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in doc and END in doc:
        doc = doc[:doc.index(BEGIN)] + block + doc[doc.index(END) + len(END):]
    else:
        doc = doc.rstrip() + "\n\n" + block + "\n"
    atomic_io.write_text(DOC, doc)


def report(doc: dict) -> None:
    text = table(doc)
    print(text)
    plot(doc, OUT_PNG)
    write_doc_table(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma list of build names (default: all); see configs()")
    ap.add_argument("--skip-gguf", action="store_true", help="no llama.cpp points")
    ap.add_argument("--llamacpp-from", default=None,
                    help="reuse the llama.cpp points of this bench/gguf_kl_vs_clip.py JSON instead of packing")
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--work", default=None, help="scratch dir (default $MOE_LOWBIT_CACHE/bench-quant-methods)")
    ap.add_argument("--report-only", action="store_true", help="regenerate the PNG and the docs table from the JSON")
    args = ap.parse_args(argv)
    if args.report_only:
        report(json.loads(OUT_JSON.read_text()))
        return 0

    import llama_server

    cache = Path(os.environ.get("MOE_LOWBIT_CACHE") or Path.home() / ".cache" / "moe-lowbit")
    work = Path(args.work) if args.work else cache / "bench-quant-methods"
    work.mkdir(parents=True, exist_ok=True)
    calib_text, eval_text = calib_source.pydoc_split()
    calib, evalf = work / "calib.txt", work / "eval.txt"
    calib.write_text(calib_text, encoding="utf-8")
    evalf.write_text(eval_text, encoding="utf-8")
    teacher = embedded_model.smollm2_bf16_dir()
    prefix = llama_server.default_prefix(ROOT)
    names = set(filter(None, args.only.split(",")))

    metas = build_ours(teacher, work, names, args.calib_tokens)
    reused = {}
    if args.llamacpp_from:
        reused = llamacpp_points_from(Path(args.llamacpp_from).resolve())
        bf16_gguf(teacher, work, prefix)
    ggufs = {} if (args.skip_gguf or args.llamacpp_from) else pack_ggufs(work, calib, prefix)
    me, lp, text = measure(teacher, metas, ggufs, work, evalf, eval_text, prefix, args.ctx, args.chunks)
    doc = {"schema": "moe-lowbit/quant-methods/v1", "provenance": provenance.record(argv=sys.argv),
           "calib_tokens": args.calib_tokens, "text": text, "ours": {}, "llamacpp": {}}
    old = json.loads(OUT_JSON.read_text()) if OUT_JSON.is_file() and names else None
    if old and old.get("text", {}).get("tokens_sha256") == text["tokens_sha256"]:
        doc["ours"], doc["llamacpp"] = old.get("ours", {}), old.get("llamacpp", {})  # a partial rerun adds rows
    for name, m in metas.items():
        fp = m["meta"]["footprint"]
        body = {r: v for r, v in fp["roles"].items() if r not in ("embed", "lm_head")}
        body_params = sum(v["params"] for v in body.values())
        s = me["students"][name]
        doc["ours"][name] = {"options": m["options"], "bpw": fp["total"]["effective_bits"],
                             "bpw_body": sum(v["effective_bits"] * v["params"] for v in body.values()) / body_params,
                             "kl": s["kl_mean"], "kl_stderr": s["kl_mean_stderr"], "top1": s["top1_agree"],
                             "wall_s": m["wall_s"], "calibration_s": m["meta"]["timings"].get("calibration_seconds"),
                             "proxy_total": (m["meta"].get("calibration") or {}).get("proxy_total"),
                             "proxy_total_clip": (m["meta"].get("calibration") or {}).get("proxy_total_clip")}
    doc["llamacpp"].update(reused)
    lp_by = {s["name"]: s for s in lp.get("students", [])}
    for base, g in ggufs.items():
        s = lp_by.get(base, {})
        doc["llamacpp"][base] = {**g, "kl": s.get("kl_mean"), "kl_stderr": s.get("kl_mean_stderr"),
                                 "top1": s.get("top1_agree")}
    atomic_io.write_text(OUT_JSON, provenance.redact(json.dumps(doc, indent=1, default=str)) + "\n")
    report(doc)
    print(f"wrote {OUT_JSON}, {OUT_PNG}, table in {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
