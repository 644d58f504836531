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

`--model smollm2-moe` runs the same on the MoE fixture (embedded:smollm2-moe: qwen2_moe, 8 routed experts of
128 wide, top-2, a shared expert; the stacked `*_exps` tensors are our codes too), and adds the row `122B_MIX`:
the shipped 122B recipe's mix (configs/gptq_122b.env on `gguf:K`: Q3_K routed experts, Q4_K the other linears,
Q8_0 embedding and output) against llama.cpp's IQ3_XXS recipe (configs/gguf_tensor_types_iq3.txt, BASE_TYPE
IQ3_XXS), each at its own size (both sizes and bits per weight are in the table). The fixture's contraction
dims (576 hidden, 128 expert, 1024 shared-expert) leave 256-blocks only on the shared expert's down_proj: every
other K-type tensor falls back (ours: Q3_K -> Q4_0, Q4_K -> Q5_0; llama.cpp: its own fallbacks, i-quants ->
IQ4_NL), so this row compares fallbacks more than the 122B's types.

Writes results/gguf/<model>_export_vs_llamacpp.json, results/gguf/<model>_export_vs_llamacpp.png and the table
between the model's markers in docs/GGUF.md (`--report-only` regenerates both from the JSON).

    python tests/bench/gguf_export_vs_llamacpp.py [--model smollm2|smollm2-moe] [--types Q4_0,Q4_K_M,Q3_K_M]
        [--calib-tokens 8192] [--chunks 24]
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
from typing import NamedTuple

from bench_paths import use_project_modules

ROOT = use_project_modules()

import atomic_io  # noqa: E402
import cache_paths  # noqa: E402
import calib_source  # noqa: E402
import embedded_model  # noqa: E402
import provenance  # noqa: E402

DOC = ROOT / "docs" / "GGUF.md"
SCHEMA = "moe-lowbit/gguf-export-vs-llamacpp/v1"
TYPES = ("Q4_0", "Q4_K_M", "Q3_K_M", "122B_MIX")
STOCK = {"Q4_0": "q4_0", "Q4_K_M": "q4_k", "Q3_K_M": "q3_k"}
BITS_OF_TYPE = {"q3_k": 3, "q4_0": 3, "q4_k": 4, "q5_0": 4, "q5_k": 4, "q5_1": 4, "q6_k": 6, "q8_0": 8}  # gguf:K
BITS_OF_LEGACY = {"q4_0": 4, "q4_1": 4, "q8_0": 8}  # the `full` grid in blocks of 32 (Q4_1 has no grid of ours)
MIX_122B = {"recipe": "configs/gptq_122b.env on gguf:K", "grid": "gguf:K", "group": 256, "expert_bits": 3.0,
            "linear_bits": 4.0, "role_bits": "embed=8,lm_head=8"}  # gptq_122b.env's bits, on llama.cpp's K types
IQ3_RECIPE = ROOT / "configs" / "gguf_tensor_types_iq3.txt"


class Model(NamedTuple):
    """One model of the head-to-head: where it comes from, its outputs, its doc table markers."""

    key: str  # smollm2 | smollm2-moe
    embedded: str  # embedded:NAME
    title: str
    arch: str  # gguf.MODEL_ARCH member name (the tensor-name map)
    no_rule: str  # a pack_gguf rule that names no tensor of this model (llama-quantize's own mix decides)
    types: tuple

    @property
    def stem(self) -> str:
        return self.key.replace("-", "_") + "_export_vs_llamacpp"

    @property
    def out_json(self) -> Path:
        return ROOT / "results" / "gguf" / f"{self.stem}.json"

    @property
    def out_png(self) -> Path:
        return ROOT / "results" / "gguf" / f"{self.stem}.png"

    @property
    def markers(self) -> tuple[str, str]:
        tag = "" if self.key == "smollm2" else f" {self.key}"
        return (f"<!-- gguf_export_vs_llamacpp{tag} table: begin (tests/bench/gguf_export_vs_llamacpp.py) -->",
                f"<!-- gguf_export_vs_llamacpp{tag} table: end -->")


MODELS = {
    "smollm2": Model("smollm2", "embedded:smollm2", "SmolLM2-135M-Instruct", "LLAMA", "ffn_(gate|up|down)_exps={t}",
                     TYPES[:3]),
    "smollm2-moe": Model("smollm2-moe", "embedded:smollm2-moe", "SmolLM2-MoE fixture (qwen2_moe, 8 experts, top-2)",
                         "QWEN2MOE", "nextn\\.eh_proj=q8_0", TYPES),
}


def step(msg: str) -> None:
    print(f"[gguf_export_vs_llamacpp {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pack_theirs(model: Model, work: Path, base: str, calib: Path, prefix: Path, chunks: int, ctx: int) -> dict:
    """llama-quantize's own `base` mix through pipelines/pack_gguf.sh (one imatrix, reused across types); the
    122B_MIX row: the shipped IQ3_XXS recipe instead."""
    name = model.key
    if base == "122B_MIX":
        recipe, qtype = IQ3_RECIPE, "IQ3_XXS"
    else:  # pack_gguf needs a rule; this one names no tensor of the model, so llama-quantize's mix decides
        recipe, qtype = work / f"stock_{base}.txt", base
        recipe.write_text(model.no_rule.format(t=STOCK[base]) + "\n")
    env = {"MODEL": model.embedded, "OUT": str(work / "gguf"), "NAME": name, "BASE_TYPE": qtype,
           "CALIB_FILE": str(calib), "IMATRIX_CHUNKS": str(chunks), "IMATRIX_CTX": str(ctx), "LLAMA_CPP": str(prefix),
           "THREADS": str(os.cpu_count()), "TENSOR_TYPES": str(recipe)}
    proc = subprocess.run(["bash", "pipelines/pack_gguf.sh"], env={**os.environ, **env}, cwd=ROOT, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise SystemExit(f"pack_gguf.sh {base} failed: {proc.stderr.strip().splitlines()[-3:]}")
    meta = json.loads((work / "gguf" / f"{name}-{qtype}.meta.json").read_text())
    return {"gguf": str(work / "gguf" / f"{name}-{qtype}.gguf"), "recipe": str(recipe.relative_to(ROOT)) if
            recipe.is_relative_to(ROOT) else recipe.read_text().strip(), "base_type": qtype,
            "types": {t["name"]: t["type"] for t in meta["tensors"]}}


def plan_like(model: Model, types: dict, teacher: Path, work: Path, base: str) -> Path:
    """Our bits plan giving every HF tensor llama.cpp's type for it (through gguf-py's tensor-name map; a routed
    expert's disk tensor through its layer's stacked `*_exps` name). Q4_0: bits on the `full` grid (llama.cpp's
    Q4_0 mix puts a MoE's attn_k/attn_v at Q8_0), else bits on `gguf:K`."""
    import gguf

    import gguf_experts

    cfg = json.loads((teacher / "config.json").read_text())
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, model.arch), cfg["num_hidden_layers"])
    from safetensors import safe_open

    bits_of = BITS_OF_LEGACY if base == "Q4_0" else BITS_OF_TYPE
    plan = {}
    for f in sorted(teacher.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for hf in st.keys():  # noqa: SIM118 (safe_open is no dict)
                m = gguf_experts.PER_EXPERT.match(hf)
                g = names.get_name(f"{m['prefix']}.{m['proj']}.weight" if m else hf, try_suffixes=(".weight", ".bias"))
                t = types.get(g) if g else None  # get_name keeps the suffix it matched
                if t and t.lower() in bits_of and "embed" not in hf:
                    plan[hf] = bits_of[t.lower()]
    out = work / f"plan_{base}.json"
    atomic_io.write_text(out, json.dumps({"format": "moe-lowbit/bits-plan/1", "strategy": f"llama.cpp {base} types",
                                          "tensors": plan}, indent=1, sort_keys=True) + "\n")
    return out


def build_ours(model: Model, teacher: Path, work: Path, base: str, plan: Path | None, calib_tokens: int) -> dict:
    import quant_save

    role_bits = "embed=8" if model.key == "smollm2" else "embed=8,lm_head=8"  # SmolLM2 ties its head to embed
    if base == "Q4_0":
        opts = {"grid": "full", "group": 32, "linear_bits": 4.0, "expert_bits": 4.0, "role_bits": role_bits,
                **({"bits_plan": str(plan)} if plan else {})}
    elif base == "122B_MIX":
        opts = {k: v for k, v in MIX_122B.items() if k != "recipe"}
    else:
        opts = {"grid": "gguf:K", "group": 256, "bits_plan": str(plan), "linear_bits": 4.0, "expert_bits": 4.0,
                "role_bits": role_bits}
    t0 = time.perf_counter()
    meta = quant_save.build({"model": str(teacher), "out": str(work / f"ours_{base}"), "progress": False, "force": True,
                             "method": "gptq", "calib": "pydoc-topics", "calib_tokens": calib_tokens, "calib_ctx": 512,
                             "emit": "gguf", **opts})
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


LABEL = {"122B_MIX": "122B mix (ours) vs IQ3_XXS recipe (llama.cpp)"}


def model_of(doc: dict) -> Model:
    return MODELS[doc.get("model", "smollm2")]  # the first (SmolLM2) JSON predates the field


def report(doc: dict) -> str:
    lines = [f"{model_of(doc).title}, {doc['config']['chunks']} held-out windows of {doc['config']['ctx']} tokens "
             f"(pydoc even topics), calibration {doc['config']['calib_tokens']} tokens (odd topics) for both; "
             f"llama-perplexity KL(BF16 || GGUF), mean ± stderr; paired = ours - llama.cpp over windows, 95% interval",
             "", "| type | ours bpw | llama.cpp bpw | file MB ours / llama.cpp | KLD ours | KLD llama.cpp | "
             "ours / llama.cpp | paired KLD diff | top-1 ours | top-1 llama.cpp | paired top-1 diff |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for base, r in doc["types"].items():
        o, t = r["ours"], r["theirs"]
        lines.append(f"| {LABEL.get(base, base)} | {o['bits_per_weight']:.3f} | {t['bits_per_weight']:.3f} | "
                     f"{o['file_bytes'] / 1e6:.1f} / {t['file_bytes'] / 1e6:.1f} | {o['kl_mean']:.4f} ± "
                     f"{o['kl_mean_stderr']:.4f} | {t['kl_mean']:.4f} ± {t['kl_mean_stderr']:.4f} | {r['kl_ratio']:.2f} | "
                     f"{r['paired_kl']['mean']:+.4f} [{r['paired_kl']['lo']:+.4f}, {r['paired_kl']['hi']:+.4f}] | "
                     f"{100 * o['top1_agree']:.1f}% | {100 * t['top1_agree']:.1f}% | {100 * r['paired_top1']['mean']:+.2f} "
                     f"[{100 * r['paired_top1']['lo']:+.2f}, {100 * r['paired_top1']['hi']:+.2f}] pts |")
    return "\n".join(lines)


def plot(doc: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model = model_of(doc)
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
    ax.set_title(f"{model.title.split(' (')[0]}: same GGUF types, same calibration text", fontsize=10)
    fig.tight_layout()
    model.out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(model.out_png, dpi=120)


def publish(doc: dict) -> None:
    import quant_methods_report as rep

    text = report(doc)
    print(text)
    plot(doc)
    rep.write_doc_block(DOC, text, *model_of(doc).markers)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    ap.add_argument("--types", default=None, help=f"comma list of {', '.join(TYPES)} (default: all the model has; "
                    "122B_MIX on the MoE only)")
    ap.add_argument("--calib-tokens", type=int, default=8192, help="calibration tokens for gptq AND the imatrix")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=24, help="held-out windows of --ctx tokens")
    ap.add_argument("--work", default=None, help="scratch dir (default $MOE_LOWBIT_CACHE/bench-gguf-export[-MODEL])")
    ap.add_argument("--report-only", action="store_true", help="regenerate the PNG and the docs table from the JSON")
    args = ap.parse_args(argv)
    model = MODELS[args.model]
    if args.report_only:
        publish(json.loads(model.out_json.read_text()))
        return 0
    types = [t for t in (args.types or ",".join(model.types)).split(",") if t]
    if set(types) - set(model.types) or args.calib_tokens % args.ctx:
        print(f"gguf_export_vs_llamacpp: --types from {model.types}; --calib-tokens a multiple of --ctx", file=sys.stderr)
        return 2
    import fidelity_math
    import llamacpp_fidelity
    import llamacpp_server
    from quant_methods_matrix import hf_to_gguf

    default_work = "bench-gguf-export" + ("" if model.key == "smollm2" else f"-{model.key}")
    work = Path(args.work) if args.work else cache_paths.cache_root() / default_work
    work.mkdir(parents=True, exist_ok=True)
    calib_text, eval_text = calib_source.pydoc_split()
    calib, evalf = work / "calib.txt", work / "eval.txt"
    calib.write_text(calib_text, encoding="utf-8")
    evalf.write_text(eval_text, encoding="utf-8")
    teacher = embedded_model.resolve(model.embedded, log=lambda m: None)
    prefix = llamacpp_server.default_prefix(ROOT)
    # the MoE's own name: pack_gguf writes <name>-BF16.gguf with its router at ROUTER_TYPE (f16); the base is exact
    bf16 = hf_to_gguf(teacher, work / "gguf" / ("smollm2-BF16.gguf" if model.key == "smollm2" else
                                                 f"{model.key}-teacher-BF16.gguf"), prefix, work)
    students, sides = {}, {}
    for base in types:
        step(f"llama-quantize {base} (imatrix from the calibration text)")
        theirs = pack_theirs(model, work, base, calib, prefix, args.calib_tokens // args.ctx, args.ctx)
        plan = None if base == "122B_MIX" or (base, model.key) == ("Q4_0", "smollm2") else \
            plan_like(model, theirs["types"], teacher, work, base)  # (the SmolLM2 run predates the Q4_0 plan)
        step(f"our gptq codes on {base}'s types")
        ours = build_ours(model, teacher, work, base, plan, args.calib_tokens)
        students[f"ours_{base}"], students[f"theirs_{base}"] = Path(ours["gguf"]), Path(theirs["gguf"])
        sides[base] = {"ours": ours, "theirs": {k: theirs[k] for k in ("gguf", "recipe", "base_type")}}
    step("llama-perplexity: " + ", ".join(students))
    fid = llamacpp_fidelity.run_fidelity(llamacpp_server.find_binary(prefix, "llama-perplexity"), bf16, students, evalf,
                                         args.ctx, args.chunks, os.cpu_count(), work / "kld")
    by_name = {s["name"]: s for s in fid["students"]}
    doc = {"schema": SCHEMA, "model": model.key, "provenance": provenance.record(argv=sys.argv if argv is None else argv),
           "config": {"ctx": args.ctx, "chunks": args.chunks, "calib_tokens": args.calib_tokens,
                      "calib_text": "pydoc topics, odd-numbered", "eval_text": "pydoc topics, even-numbered",
                      "method": "gptq (no act-order), damp 0.01", "mix_122b": MIX_122B},
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
    atomic_io.write_text(model.out_json, provenance.redact(json.dumps(doc, indent=1, default=str)) + "\n")
    publish(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
