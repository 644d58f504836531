"""The head-to-head (issue 20, Deliver 6): at the same GGUF types, our gptq codes written into the file
(`--emit gguf`) against `llama-quantize` with an imatrix from the same calibration text, on SmolLM2.

Text: CPython's pydoc topics (offline): odd-numbered topics calibrate (our gptq's H AND the imatrix: the same
first --calib-tokens tokens at ctx 512), even-numbered ones are evaluated: --chunks windows of 512 tokens,
disjoint from the calibration. Both GGUFs of a type are scored by llama-perplexity against one BF16 base
(KL over the second half of every window, top-1 agreement); the paired interval of ours - theirs is over the
windows (per-window means recovered from llama-perplexity's running means; every window scores the same number
of tokens).

Types (the same per-tensor types on both sides, read from llama.cpp's file):
* Q4_0: llama-quantize's Q4_0 mix (Q4_0 everywhere, token_embd Q8_0) vs ours on the exact `full` 4-bit grid in
  blocks of 32 with the embedding at 8 bits (Q8_0);
* Q4_K_M and Q3_K_M: llama-quantize's own mixes; ours on `gguf:K` with a bits plan that gives every tensor
  llama.cpp's type (q3_k 3, q4_k 4, q6_k 6; their 576-wide fallbacks q4_0/q5_0/q8_0 are ours too). Q3_K_M's
  few q5_k/q5_1 tensors (no grid of ours) get our Q4_K (its fallback Q5_0): fewer bytes on our side; both
  sides' real bits per weight are in the table.

Writes results/gguf/smollm2_export_vs_llamacpp.json, results/gguf/smollm2_export_vs_llamacpp.png and the table
between the markers in docs/GGUF.md (`--report-only` regenerates both from the JSON).

    python tests/bench/gguf_export_vs_llamacpp.py [--types Q4_0,Q4_K_M,Q3_K_M] [--calib-tokens 8192] [--chunks 24]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCH = Path(__file__).resolve().parent
for sub in ("src/quant", "src/eval"):
    sys.path.insert(0, str(ROOT / sub))
sys.path.append(str(BENCH))

import atomic_io  # noqa: E402
import cache_paths  # noqa: E402
import calib_source  # noqa: E402
import embedded_model  # noqa: E402
import provenance  # noqa: E402

OUT_JSON = ROOT / "results" / "gguf" / "smollm2_export_vs_llamacpp.json"
OUT_PNG = ROOT / "results" / "gguf" / "smollm2_export_vs_llamacpp.png"
DOC = ROOT / "docs" / "GGUF.md"
BEGIN, END = ("<!-- gguf_export_vs_llamacpp table: begin (tests/bench/gguf_export_vs_llamacpp.py) -->",
              "<!-- gguf_export_vs_llamacpp table: end -->")
SCHEMA = "moe-lowbit/gguf-export-vs-llamacpp/v1"
TYPES = ("Q4_0", "Q4_K_M", "Q3_K_M")
STOCK = {"Q4_0": "q4_0", "Q4_K_M": "q4_k", "Q3_K_M": "q3_k"}
BITS_OF_TYPE = {"q3_k": 3, "q4_0": 3, "q4_k": 4, "q5_0": 4, "q5_k": 4, "q5_1": 4, "q6_k": 6, "q8_0": 8}


def step(msg: str) -> None:
    print(f"[gguf_export_vs_llamacpp {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pack_theirs(work: Path, base: str, calib: Path, prefix: Path, chunks: int, ctx: int) -> dict:
    """llama-quantize's own `base` mix through pipelines/pack_gguf.sh (one imatrix, reused across types)."""
    recipe = work / f"stock_{base}.txt"  # pack_gguf needs a rule; this one names experts, which SmolLM2 has none of
    recipe.write_text(f"ffn_(gate|up|down)_exps={STOCK[base]}\n")
    env = {"MODEL": "embedded:smollm2", "OUT": str(work / "gguf"), "NAME": "smollm2", "BASE_TYPE": base,
           "CALIB_FILE": str(calib), "IMATRIX_CHUNKS": str(chunks), "IMATRIX_CTX": str(ctx), "LLAMA_CPP": str(prefix),
           "THREADS": str(os.cpu_count()), "TENSOR_TYPES": str(recipe)}
    proc = subprocess.run(["bash", "pipelines/pack_gguf.sh"], env={**os.environ, **env}, cwd=ROOT, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise SystemExit(f"pack_gguf.sh {base} failed: {proc.stderr.strip().splitlines()[-3:]}")
    meta = json.loads((work / "gguf" / f"smollm2-{base}.meta.json").read_text())
    return {"gguf": str(work / "gguf" / f"smollm2-{base}.gguf"), "types": {t["name"]: t["type"] for t in meta["tensors"]}}


def plan_like(types: dict, teacher: Path, work: Path, base: str) -> Path:
    """Our bits plan giving every HF tensor llama.cpp's type for it (through gguf-py's tensor-name map)."""
    import gguf

    cfg = json.loads((teacher / "config.json").read_text())
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg["num_hidden_layers"])
    from safetensors import safe_open

    plan = {}
    for f in sorted(teacher.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for hf in st.keys():  # noqa: SIM118 (safe_open is no dict)
                g = names.get_name(hf, try_suffixes=(".weight", ".bias"))
                t = types.get(g) if g else None  # get_name keeps the suffix it matched
                if t and t.lower() in BITS_OF_TYPE and "embed" not in hf:
                    plan[hf] = BITS_OF_TYPE[t.lower()]
    out = work / f"plan_{base}.json"
    atomic_io.write_text(out, json.dumps({"format": "moe-lowbit/bits-plan/1", "strategy": f"llama.cpp {base} types",
                                          "tensors": plan}, indent=1, sort_keys=True) + "\n")
    return out


def build_ours(teacher: Path, work: Path, base: str, plan: Path | None, calib_tokens: int) -> dict:
    import quant_save

    opts = {"grid": "full", "group": 32} if base == "Q4_0" else {"grid": "gguf:K", "group": 256, "bits_plan": str(plan)}
    t0 = time.perf_counter()
    meta = quant_save.build({"model": str(teacher), "out": str(work / f"ours_{base}"), "progress": False, "force": True,
                             "method": "gptq", "linear_bits": 4.0, "expert_bits": 4.0, "role_bits": "embed=8",
                             "calib": "pydoc-topics", "calib_tokens": calib_tokens, "calib_ctx": 512, "emit": "gguf",
                             **opts})
    return {"gguf": str(work / f"ours_{base}" / "gguf" / "model.gguf"), "options": opts,
            "verified": meta["exports"]["gguf"]["verified"], "build_s": time.perf_counter() - t0}


def file_bits(path: Path) -> dict:
    import gguf

    r = gguf.GGUFReader(str(path))
    nbytes = sum(int(t.n_bytes) for t in r.tensors)
    n = sum(int(t.n_elements) for t in r.tensors)
    types: dict = {}
    for t in r.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return {"file_bytes": path.stat().st_size, "tensor_bytes": nbytes, "bits_per_weight": 8 * nbytes / n,
            "type_counts": dict(sorted(types.items()))}


_V = r"[-+\w.]+"  # a number, or nan for the first window's uncertainty
_PM = r"\s*±\s*"
ROW = re.compile(rf"^ *(\d+)\s+{_V}{_PM}{_V}\s+{_V}{_PM}{_V}\s+([-\d.]+){_PM}{_V}\s+{_V}{_PM}{_V} %\s+([-\d.]+){_PM}{_V} %",
                 re.M)


def per_window(log: Path) -> tuple[list, list]:
    """(KL, top-1 fraction) of every window, from llama-perplexity's running means (equal tokens per window)."""
    rows = [(int(a), float(b), float(c) / 100) for a, b, c in ROW.findall(log.read_text())]
    kl, top = [], []
    for i, (n, m, t) in enumerate(rows):
        prev_m, prev_t = (rows[i - 1][1], rows[i - 1][2]) if i else (0.0, 0.0)
        kl.append(n * m - (n - 1) * prev_m)
        top.append(n * t - (n - 1) * prev_t)
    return kl, top


def report(doc: dict) -> str:
    lines = [f"SmolLM2-135M-Instruct, {doc['config']['chunks']} held-out windows of {doc['config']['ctx']} tokens "
             f"(pydoc even topics), calibration {doc['config']['calib_tokens']} tokens (odd topics) for both; "
             f"llama-perplexity KL(BF16 || GGUF), mean ± stderr; paired = ours - llama.cpp over windows, 95% interval",
             "", "| type | ours bpw | llama.cpp bpw | KLD ours | KLD llama.cpp | ours / llama.cpp | paired KLD diff | "
             "top-1 ours | top-1 llama.cpp | paired top-1 diff |", "|---|---|---|---|---|---|---|---|---|---|"]
    for base, r in doc["types"].items():
        o, t = r["ours"], r["theirs"]
        lines.append(f"| {base} | {o['bits_per_weight']:.3f} | {t['bits_per_weight']:.3f} | {o['kl_mean']:.4f} ± "
                     f"{o['kl_mean_stderr']:.4f} | {t['kl_mean']:.4f} ± {t['kl_mean_stderr']:.4f} | {r['kl_ratio']:.2f} | "
                     f"{r['paired_kl']['mean']:+.4f} [{r['paired_kl']['lo']:+.4f}, {r['paired_kl']['hi']:+.4f}] | "
                     f"{100 * o['top1_agree']:.1f}% | {100 * t['top1_agree']:.1f}% | {100 * r['paired_top1']['mean']:+.2f} "
                     f"[{100 * r['paired_top1']['lo']:+.2f}, {100 * r['paired_top1']['hi']:+.2f}] pts |")
    return "\n".join(lines)


def plot(doc: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for side, mark in (("ours", "o"), ("theirs", "s")):
        xs = [r[side]["bits_per_weight"] for r in doc["types"].values()]
        ys = [r[side]["kl_mean"] for r in doc["types"].values()]
        ax.plot(xs, ys, mark, label="our gptq codes" if side == "ours" else "llama-quantize + imatrix")
        for (base, r), x, y in zip(doc["types"].items(), xs, ys):
            ax.annotate(base, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("bits per weight (all tensors, from the file)")
    ax.set_ylabel("KL(BF16 || GGUF), llama-perplexity")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("SmolLM2: same GGUF types, same calibration text")
    fig.tight_layout()
    OUT_PNG.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT_PNG, dpi=120)


def publish(doc: dict) -> None:
    import quant_methods_report as rep

    text = report(doc)
    print(text)
    plot(doc)
    rep.write_doc_block(DOC, text, BEGIN, END)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", default=",".join(TYPES), help=f"comma list of {', '.join(TYPES)}")
    ap.add_argument("--calib-tokens", type=int, default=8192, help="calibration tokens for gptq AND the imatrix")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=24, help="held-out windows of --ctx tokens")
    ap.add_argument("--work", default=None, help="scratch dir (default $MOE_LOWBIT_CACHE/bench-gguf-export)")
    ap.add_argument("--report-only", action="store_true", help="regenerate the PNG and the docs table from the JSON")
    args = ap.parse_args(argv)
    if args.report_only:
        publish(json.loads(OUT_JSON.read_text()))
        return 0
    types = [t for t in args.types.split(",") if t]
    if set(types) - set(TYPES) or args.calib_tokens % args.ctx:
        print(f"gguf_export_vs_llamacpp: --types from {TYPES}; --calib-tokens a multiple of --ctx", file=sys.stderr)
        return 2
    import fidelity_math
    import llamacpp_fidelity
    import llamacpp_server
    from quant_methods_matrix import hf_to_gguf

    work = Path(args.work) if args.work else cache_paths.cache_root() / "bench-gguf-export"
    work.mkdir(parents=True, exist_ok=True)
    calib_text, eval_text = calib_source.pydoc_split()
    calib, evalf = work / "calib.txt", work / "eval.txt"
    calib.write_text(calib_text, encoding="utf-8")
    evalf.write_text(eval_text, encoding="utf-8")
    teacher = embedded_model.smollm2_bf16_dir()
    prefix = llamacpp_server.default_prefix(ROOT)
    bf16 = hf_to_gguf(teacher, work / "gguf" / "smollm2-BF16.gguf", prefix, work)
    students, sides = {}, {}
    for base in types:
        step(f"llama-quantize {base} (imatrix from the calibration text)")
        theirs = pack_theirs(work, base, calib, prefix, args.calib_tokens // args.ctx, args.ctx)
        plan = None if base == "Q4_0" else plan_like(theirs["types"], teacher, work, base)
        step(f"our gptq codes on {base}'s types")
        ours = build_ours(teacher, work, base, plan, args.calib_tokens)
        students[f"ours_{base}"], students[f"theirs_{base}"] = Path(ours["gguf"]), Path(theirs["gguf"])
        sides[base] = {"ours": ours, "theirs": {"gguf": theirs["gguf"]}}
    step("llama-perplexity: " + ", ".join(students))
    fid = llamacpp_fidelity.run_fidelity(llamacpp_server.find_binary(prefix, "llama-perplexity"), bf16, students, evalf,
                                         args.ctx, args.chunks, os.cpu_count(), work / "kld")
    by_name = {s["name"]: s for s in fid["students"]}
    doc = {"schema": SCHEMA, "provenance": provenance.record(argv=sys.argv if argv is None else argv),
           "config": {"ctx": args.ctx, "chunks": args.chunks, "calib_tokens": args.calib_tokens,
                      "calib_text": "pydoc topics, odd-numbered", "eval_text": "pydoc topics, even-numbered",
                      "method": "gptq (no act-order), damp 0.01"},
           "teacher_gguf": str(bf16), "fidelity": {k: fid[k] for k in ("text", "config", "interval_method")},
           "types": {}}
    for base in types:
        row = {}
        for side in ("ours", "theirs"):
            name = f"{side}_{base}"
            s = by_name[name]
            kl, top = per_window(work / "kld" / f"kld-{name}.log")
            row[side] = {**sides[base][side], **file_bits(students[name]), "kl_mean": s["kl_mean"],
                         "kl_mean_stderr": s["kl_mean_stderr"], "top1_agree": s["top1_agree"], "kl_p99": s["kl_p99"],
                         "ppl_ratio": s["ppl_ratio"], "per_window_kl": kl, "per_window_top1": top}
        row["kl_ratio"] = row["ours"]["kl_mean"] / row["theirs"]["kl_mean"]
        row["paired_kl"] = fidelity_math.paired_delta(row["ours"]["per_window_kl"], row["theirs"]["per_window_kl"])
        row["paired_top1"] = fidelity_math.paired_delta(row["ours"]["per_window_top1"], row["theirs"]["per_window_top1"])
        doc["types"][base] = row
    atomic_io.write_text(OUT_JSON, provenance.redact(json.dumps(doc, indent=1, default=str)) + "\n")
    publish(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
