"""Code grids on a real-weight MoE: the embedded SmolLM2-MoE fixture (docs/SMOLLM2_MOE.md) built with the
recommended recipe's bits (int3 routed experts, int4 the rest, 8-bit embedding, g128) under each grid
(sym: [-3, 3], 7 levels at 3 bits; full: [-4, 3], all 8; asym: zero point), by gptq and by clip, then scored
against the BF16 fixture on the same held-out windows in one run.

tests/bench/quant_methods_matrix.py measures the grids on dense SmolLM2; this is the check that what it shows holds where
the 3 bits go in the 122B recipe: routed experts that each see a share of the calibration tokens.

Text: CPython's pydoc topics, offline, split as the fixture's fit split them (`moefy_fit.pydoc_topics_text`):
every fifth topic is held out and evaluated, the others calibrate (the fixture was fitted on those too). Not
quant_save's `--calib pydoc-topics` (the odd topics), which overlaps that held-out split. KL differences are
paired over windows (same windows), mean +/- 1.96 stderr.

Writes results/quant_methods/smollm2_moe_grids.json, prints a table and puts it between its markers in
docs/QUANTIZE.md (regenerated from the JSON by `--report-only`).

    python tests/bench/quant_grids_moe.py [--calib-tokens 8192] [--eval-tokens 8192] [--ctx 512] [--methods gptq,clip]
    python tests/bench/quant_grids_moe.py --report-only
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import bench_paths  # tests/bench/ is on the path of a script run from it

ROOT = bench_paths.use_project_modules()

import atomic_io  # noqa: E402
import embedded_model  # noqa: E402
import provenance  # noqa: E402
import quant_methods_report as report_mod  # noqa: E402

OUT_JSON = ROOT / "results" / "quant_methods" / "smollm2_moe_grids.json"
DOC = ROOT / "docs" / "QUANTIZE.md"
BEGIN, END = "<!-- quant_grids_moe table: begin (tests/bench/quant_grids_moe.py) -->", "<!-- quant_grids_moe table: end -->"
SCHEMA = "moe-lowbit/quant-grids-moe/v1"
GRIDS = ("sym", "full", "asym")


def build_options(method: str, grid: str, calib_file: Path, calib_tokens: int, ctx: int) -> dict:
    """quant_save options of one row: the 122B recipe's bits on the fixture."""
    opts = {"method": method, "grid": grid, "expert_bits": 3.0, "linear_bits": 4.0, "role_bits": "embed=8",
            "group": 128, "clip_steps": 16}
    if method != "clip":
        opts.update(calib_file=str(calib_file), calib_tokens=calib_tokens, calib_ctx=ctx)
    return opts


def table(doc: dict) -> str:
    lines = [f"SmolLM2-MoE fixture vs its BF16, {doc['text']['n_windows']} held-out windows x {doc['text']['ctx']} "
             f"tokens (one run, {doc['measured_utc']}); held out: every fifth pydoc topic; calibration: "
             f"{doc['calib_tokens']} tokens of the other topics. KL(teacher || student), nats/token, mean +/- 1.96 "
             f"stderr over windows; 'vs sym' is paired.",
             "", "| build | bpw (all / experts) | KL | vs sym (same method) | top-1 | build s |", "|---|---|---|---|---|---|"]
    for name, r in doc["rows"].items():
        lo, hi = r["kl_interval"]
        vs_txt = report_mod.paired_text(r.get("vs_sym"))
        lines.append(f"| {name} | {r['bpw']:.3f} / {r['bpw_experts']:.3f} | {r['kl']:.4f} [{lo:.4f}, {hi:.4f}] | "
                     f"{vs_txt} | {100 * r['top1']:.1f}% | {r['build_s']:.0f} |")
    return "\n".join(lines)


def report(doc: dict) -> None:
    text = table(doc)
    print(text)
    report_mod.write_doc_block(DOC, text, BEGIN, END)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--methods", default="gptq,clip", help="comma list of quant_save methods")
    ap.add_argument("--work", default=None, help="scratch dir (default $MOE_LOWBIT_CACHE/bench-quant-grids-moe)")
    ap.add_argument("--report-only", action="store_true", help="regenerate the docs table from the JSON")
    args = ap.parse_args(argv)
    if args.report_only:
        report(json.loads(OUT_JSON.read_text()))
        return 0
    methods = [m for m in args.methods.split(",") if m]

    import moe_eval  # after argparse: --help stays fast
    import fidelity_text
    import fidelity_cache
    import fidelity_math
    import moefy_fit
    import quant_save
    import build_record

    work = Path(args.work) if args.work else embedded_model.default_cache_root().parent / "bench-quant-grids-moe"
    work.mkdir(parents=True, exist_ok=True)
    teacher = embedded_model.smollm2_moe_dir()
    cfg = moe_eval.FidelityConfig(ctx=args.ctx, max_tokens=args.eval_tokens, device="cpu")
    tok = moe_eval.load_tokenizer(teacher)
    # disjoint by construction: one split takes the topics with index % 5 == 0, the other the rest
    calib_text, eval_text = moefy_fit.pydoc_topics_text(held_out=False), moefy_fit.pydoc_topics_text(held_out=True)
    calib_file = work / "calib.txt"
    calib_file.write_text(calib_text, encoding="utf-8")
    windows = fidelity_text.text_windows(eval_text, tok, cfg, {"kind": "pydoc_data.topics, every fifth topic (held out)",
                                                          "sha256": hashlib.sha256(eval_text.encode()).hexdigest()})
    cache = fidelity_cache.build_teacher_cache(lambda: moe_eval.hf_logits_fn(moe_eval.load_hf_model(teacher, cfg)),
                                         moe_eval.model_identity(teacher), windows, cfg)
    doc = {"schema": SCHEMA, "provenance": provenance.record(argv=sys.argv), "teacher": str(teacher),
           "calib_tokens": args.calib_tokens, "calib_text_sha256": provenance.sha256_file(calib_file),
           "measured_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "text": {"tokens_sha256": windows.sha256, "n_windows": int(windows.tokens.shape[0]), "ctx": args.ctx,
                    "n_scored_tokens": windows.n_scored}, "rows": {}, "loadavg_start": list(os.getloadavg())}
    for method in methods:
        for grid in GRIDS:
            name = f"{method}_e3_l4_emb8_g128_{grid}"
            print(f"[quant_grids_moe] build {name}", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            meta = quant_save.build({"model": str(teacher), "out": str(work / name), "progress": False, "force": True,
                                     **build_options(method, grid, calib_file, args.calib_tokens, args.ctx)})
            build_s = time.perf_counter() - t0
            model = moe_eval.load_hf_model(work / name, cfg)
            s = moe_eval.score_student(moe_eval.hf_logits_fn(model), windows, cache, cfg, name)
            del model
            gc.collect()
            roles = meta["footprint"]["roles"]
            doc["rows"][name] = {"method": method, "grid": grid, "bpw": meta["footprint"]["total"]["effective_bits"],
                                 "bpw_experts": roles["routed_expert"]["effective_bits"], "kl": s["kl_mean"],
                                 "kl_interval": s["kl_mean_interval"], "top1": s["top1_agree"],
                                 "ppl_ratio": s["ppl_ratio"], "build_s": build_s,
                                 "build_sha256": build_record.output_sha256(meta), "kl_per_window": s["per_window"]["kl"]}
            sym = doc["rows"].get(f"{method}_e3_l4_emb8_g128_sym")
            if grid != "sym" and sym:
                doc["rows"][name]["vs_sym"] = fidelity_math.paired_delta(s["per_window"]["kl"], sym["kl_per_window"])
            print(f"[quant_grids_moe] {name}: {doc['rows'][name]['bpw']:.3f} bpw, KL {s['kl_mean']:.4f}, "
                  f"build {build_s:.0f} s", file=sys.stderr, flush=True)
    doc["loadavg_end"] = list(os.getloadavg())
    atomic_io.write_text(OUT_JSON, provenance.redact(json.dumps(doc, indent=1, default=str)) + "\n")
    report(doc)
    print(f"wrote {OUT_JSON} and the table in {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
