"""Which tensor classes of the embedded SmolLM2 deserve bits: held-out KL of the smoke recipe with one class
raised (q/k/v/o/gate/up/down to --up-bits) or the embedding lowered (--embed-bits), then the combination
that the measured changes predict is best at a footprint budget, built and measured itself.

The base is the recipe's method, grid, group and calibration with uniform linear bits and
--base-role-bits (its BITS_PLAN is this bench's own output, so it is not read back). Every option, the
embedding's included, is a plan entry: the plan file carries everything measured on this one model.

Text: CPython's pydoc topics. The recipe calibrates on the odd-numbered ones (`--calib pydoc-topics`);
every row is scored on the even-numbered ones (--chunks windows of --ctx tokens, the HF tokenizer), so the
choice never sees the smoke's own evaluation sets or its fidelity text. One teacher run, one window set:
every delta is paired over the same windows.

The chosen combination becomes a bits plan (quant_save --bits-plan) at --plan-out, and its recipe line
is printed; the JSON and the docs table say what was predicted and what the build measured.

Writes results/quant_methods/smollm2_sensitivity.json, the plan, and the table between its markers in
docs/QUANTIZE.md (`--report-only` regenerates the table from the JSON).

    python tests/bench/quant_sensitivity.py [--recipe configs/smoke.env] [--up-bits 6] [--embed-bits 6,5]
                                      [--budget-bpw BASE] [--report-only]
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
BENCH = bench_paths.BENCH

import atomic_io  # noqa: E402
import class_alloc  # noqa: E402
import embedded_model  # noqa: E402
import provenance  # noqa: E402
import quant_methods_report as report_mod  # noqa: E402
from recipe_env import recipe_from_env  # noqa: E402

OUT_JSON = ROOT / "results" / "quant_methods" / "smollm2_sensitivity.json"
PLAN_OUT = ROOT / "configs" / "plans" / "smollm2_smoke.json"
DOC = ROOT / "docs" / "QUANTIZE.md"
BEGIN, END = "<!-- quant_sensitivity table: begin (tests/bench/quant_sensitivity.py) -->", "<!-- quant_sensitivity table: end -->"
SCHEMA = "moe-lowbit/quant-sensitivity/v1"
def teacher_classes(teacher: Path) -> dict:
    import gguf_source

    return class_alloc.tensor_classes(gguf_source.checkpoint_tensor_names(teacher))


def option_plan(options: list[str], classes: dict, base: dict, strategy: str, budget: float | None = None) -> dict | None:
    """The bits plan of a set of options named CLASS@BITS (v_proj@6, embed@5): every one is a plan entry, so
    the plan file alone carries what was measured on this model (the recipe's --role-bits stay generic)."""
    if not options:
        return None
    class_bits = {o.split("@")[0]: int(o.split("@")[1]) for o in options}
    return class_alloc.bits_plan(class_alloc.plan_tensors(classes, class_bits), strategy, base["group"], base["grid"],
                                 budget_bpw_all_tensors=budget)


def chosen_plan(options: list[str], classes: dict, base: dict, budget: float) -> dict | None:
    return option_plan(options, classes, base,
                       f"class sensitivity (tests/bench/quant_sensitivity.py): {', '.join(sorted(options))}", budget)


def write_plan(doc: dict, plan_out: Path) -> None:
    """Write the JSON's chosen plan (so `--report-only` regenerates it too) and record its path and hash."""
    c = doc["choice"]
    plan = chosen_plan(c["options"], teacher_classes(embedded_model.smollm2_bf16_dir()), doc["base_options"],
                       c["budget_bpw"])
    c["plan"] = c["plan_sha256"] = None
    if plan is None and plan_out.is_file():
        plan_out.unlink()  # the base won: an older choice's plan must not look current
    if plan is not None:
        atomic_io.write_text(plan_out, json.dumps(plan, indent=1) + "\n")
        out = plan_out.resolve()
        c["plan"] = str(out.relative_to(ROOT)) if out.is_relative_to(ROOT) else str(out)
        c["plan_sha256"] = provenance.sha256_file(out)
    save(doc)


def save(doc: dict) -> None:
    atomic_io.write_text(OUT_JSON, provenance.redact(json.dumps(doc, indent=1, default=str)) + "\n")


def step(msg: str) -> None:
    print(f"[quant_sensitivity] {msg}", file=sys.stderr, flush=True)


def table(doc: dict) -> str:
    t = doc["text"]
    lines = [f"SmolLM2-135M-Instruct vs its BF16. Base: the method, grid, group and calibration of "
             f"`{doc['recipe_path']}` with uniform linear bits and no bits plan ({doc['base_options_text']}); "
             f"{t['n_windows']} held-out windows x {t['ctx']} tokens of the even pydoc topics (one run, "
             f"{doc['measured_utc']}); calibration: the odd topics. KL(teacher || student), nats/token, mean +/- "
             f"1.96 stderr over windows; 'vs base' is paired over the same windows; 'KL per bit' is the KL change "
             f"per added bit per weight of the whole model.",
             "", "| build | bpw (all tensors) | KL | vs base | KL per bit | top-1 |", "|---|---|---|---|---|---|"]
    for name, r in doc["rows"].items():
        lo, hi = r["kl_interval"]
        vs_txt = report_mod.paired_text(r.get("vs_base"))
        single = name != "chosen"  # the combination trades bits both ways: no per-bit figure
        per_bit = f"{r['vs_base']['mean'] / r['delta_bpw']:+.3f}" if single and r.get("delta_bpw") else "-"
        lines.append(f"| {name} | {r['bpw']:.3f} | {r['kl']:.4f} [{lo:.4f}, {hi:.4f}] | {vs_txt} | {per_bit} | "
                     f"{100 * r['top1']:.1f}% |")
    c = doc.get("choice")
    if c:
        lines += ["", f"Budget {c['budget_bpw']:.3f} bpw (all tensors). Chosen: "
                  f"{', '.join(c['options']) or 'none (the base)'}; predicted KL {c['predicted_kl']:.4f} "
                  f"(the single-option deltas added), measured {c['measured_kl']:.4f} at {c['measured_bpw']:.3f} bpw. "
                  + (f"Plan: `{c['plan']}`." if c.get("plan") else "No plan: the base is the choice.")]
    return "\n".join(lines)


def report(doc: dict) -> None:
    text = table(doc)
    print(text)
    report_mod.write_doc_block(DOC, text, BEGIN, END)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", type=Path, default=ROOT / "configs" / "smoke.env", help="base recipe (configs/*.env)")
    ap.add_argument("--base-role-bits", default="embed=8",
                    help="the base build's --role-bits, in place of the recipe's; default embed=8: uniform "
                         "linears, 8-bit embedding")
    ap.add_argument("--up-bits", type=int, default=6, help="bits of a raised class")
    ap.add_argument("--embed-bits", default="6,5", help="comma list: lowered embedding bits to measure ('' = none)")
    ap.add_argument("--classes", default="", help="comma list of classes to raise (default: every linear class)")
    ap.add_argument("--budget-bpw", type=float, default=None, help="footprint budget in bits per weight, all "
                    "tensors (default: the base build's, i.e. the same footprint)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=16, help="held-out windows of --ctx tokens")
    ap.add_argument("--plan-out", type=Path, default=PLAN_OUT, help="where the chosen bits plan is written")
    ap.add_argument("--work", default=None, help="scratch dir (default $MOE_LOWBIT_CACHE/bench-quant-sensitivity)")
    ap.add_argument("--report-only", action="store_true", help="regenerate the docs table and the plan from the JSON")
    args = ap.parse_args(argv)
    if args.report_only:
        doc = json.loads(OUT_JSON.read_text())
        write_plan(doc, args.plan_out)
        report(doc)
        return 0

    import moe_eval  # after argparse: --help stays fast
    import fidelity_text
    import fidelity_cache
    import fidelity_math
    import quant_save
    import build_record

    recipe = {k: v for k, v in recipe_from_env(args.recipe).items() if k != "bits_plan"}  # this bench's output
    base = {**recipe, "role_bits": args.base_role_bits}
    teacher = embedded_model.smollm2_bf16_dir()
    work = Path(args.work) if args.work else embedded_model.default_cache_root().parent / "bench-quant-sensitivity"
    work.mkdir(parents=True, exist_ok=True)
    classes = teacher_classes(teacher)
    raise_classes = [c for c in args.classes.split(",") if c] or [c for c in classes if c != "embed"]
    unknown = sorted(set(raise_classes) - set(classes))
    if unknown:
        raise SystemExit(f"quant_sensitivity: unknown classes {unknown}; this model has {sorted(classes)}")

    import calib_source

    eval_text = calib_source.pydoc_split()[1]  # the recipe's --calib pydoc-topics takes [0]: disjoint
    cfg = moe_eval.FidelityConfig(ctx=args.ctx, max_tokens=args.ctx * args.chunks, device="cpu")
    windows = fidelity_text.text_windows(eval_text, moe_eval.load_tokenizer(teacher), cfg,
                                    {"kind": "pydoc_data.topics, even-numbered (held out)",
                                     "sha256": hashlib.sha256(eval_text.encode()).hexdigest()})
    cache = fidelity_cache.build_teacher_cache(lambda: moe_eval.hf_logits_fn(moe_eval.load_hf_model(teacher, cfg)),
                                         moe_eval.model_identity(teacher), windows, cfg)
    base_text = (f"{base['method']}, grid {base['grid']}, g{base['group']}, linears {base['linear_bits']:g} bit"
                 f"{', act-order' if base['act_order'] else ''}, {base['role_bits'] or 'no role overrides'}, "
                 f"calib {base['calib']} x {base['calib_tokens']}")
    doc = {"schema": SCHEMA, "provenance": provenance.record(argv=sys.argv), "teacher": str(teacher),
           "recipe_path": str(args.recipe.resolve().relative_to(ROOT)) if args.recipe.resolve().is_relative_to(ROOT)
           else str(args.recipe), "base_options": base, "base_options_text": base_text, "up_bits": args.up_bits,
           "measured_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "text": {"tokens_sha256": windows.sha256, "n_windows": int(windows.tokens.shape[0]), "ctx": args.ctx,
                    "n_scored_tokens": windows.n_scored}, "rows": {}, "loadavg_start": list(os.getloadavg())}

    def measure(name: str, opts: dict, plan: dict | None = None) -> dict:
        if plan is not None:
            plan_path = work / f"{name}.plan.json"
            atomic_io.write_text(plan_path, json.dumps(plan, indent=1) + "\n")
            opts = {**opts, "bits_plan": str(plan_path)}
        step(f"build {name} (load {os.getloadavg()[0]:.1f})")
        t0 = time.perf_counter()
        meta = quant_save.build({"model": str(teacher), "out": str(work / name), "progress": False, "force": True,
                                 **opts})
        build_s = time.perf_counter() - t0
        model = moe_eval.load_hf_model(work / name, cfg)
        s = moe_eval.score_student(moe_eval.hf_logits_fn(model), windows, cache, cfg, name)
        del model
        gc.collect()
        row = {"bpw": meta["footprint"]["total"]["effective_bits"], "kl": s["kl_mean"],
               "kl_interval": s["kl_mean_interval"], "top1": s["top1_agree"], "ppl_ratio": s["ppl_ratio"],
               "build_s": build_s, "build_sha256": build_record.output_sha256(meta),
               "kl_per_window": s["per_window"]["kl"], "options": {k: v for k, v in opts.items() if k != "bits_plan"},
               "plan_tensors": len(plan["tensors"]) if plan else 0}
        b = doc["rows"].get("base")
        if b is not None:
            row["vs_base"] = fidelity_math.paired_delta(row["kl_per_window"], b["kl_per_window"])
            row["delta_bpw"] = row["bpw"] - b["bpw"]
        doc["rows"][name] = row
        step(f"{name}: {row['bpw']:.3f} bpw, KL {row['kl']:.4f}, build {build_s:.0f} s")
        save(doc)
        return row

    measure("base", base)
    options = []
    for c in raise_classes:
        name = f"{c}@{args.up_bits}"
        r = measure(name, base, option_plan([name], classes, base, f"one class raised: {name}"))
        options.append(class_alloc.Option(name, c, r["vs_base"]["mean"], r["delta_bpw"]))
    for bits in [int(b) for b in args.embed_bits.split(",") if b]:
        name = f"embed@{bits}"
        r = measure(name, base, option_plan([name], classes, base, f"embedding lowered: {name}"))
        options.append(class_alloc.Option(name, "embed", r["vs_base"]["mean"], r["delta_bpw"]))

    budget = args.budget_bpw if args.budget_bpw is not None else doc["rows"]["base"]["bpw"]
    choice = class_alloc.choose(options, budget - doc["rows"]["base"]["bpw"])
    names = [o.name for o in choice.options]
    r = measure("chosen", base, chosen_plan(names, classes, base, budget)) if names else doc["rows"]["base"]
    doc["choice"] = {"budget_bpw": budget, "options": names,
                     "predicted_kl": doc["rows"]["base"]["kl"] + choice.predicted_delta_kl,
                     "predicted_delta_bpw": choice.delta_bpw, "measured_kl": r["kl"], "measured_bpw": r["bpw"],
                     "role_bits": base["role_bits"]}
    doc["loadavg_end"] = list(os.getloadavg())
    write_plan(doc, args.plan_out)
    report(doc)
    plan_rel = doc["choice"]["plan"]
    print(f"recipe: ROLE_BITS={base['role_bits']}" + (f" BITS_PLAN={plan_rel}" if plan_rel else " (no plan: the base)"))
    print(f"wrote {OUT_JSON} and the table in {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
