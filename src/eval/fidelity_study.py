"""The allocation study's runner: strategies x budgets on one MoE, KL(teacher || student) on held-out text.

One process, one model load: the BF16 source is loaded once, the teacher's log-probs on the held-out
windows are cached once (moe_eval's teacher cache), every layer's experts are fake-quantized once per
level (moe_study.StudentBuilder, moe_quant's own math) and every student is assembled from those slices
in place (a plan only picks each expert's level), scored against the cache (moe_eval.score_student,
windows run `batch` at a time), and the next student overwrites the same expert parameters. Teacher and
students run in the same dtype (bf16 decoder, fp32 output head by default). Only routed experts are
quantized (the rest stays at source precision) so the figures isolate the allocation.

This is measurement, so it lives in the eval layer; what a student *is* (plans -> expert levels) is
quantization and stays in src/quant/moe_study.py.

Text: the probe runs on the calibration split of CPython's pydoc_data topics (the text the fixture's
router was fitted on); KL is measured on the held-out split (disjoint topics) - moefy_fit.pydoc_topics_text.

    python src/eval/fidelity_study.py [--model embedded:smollm2-moe] [--strategies uniform,asal,...]
        [--budgets 2.634,3.134] [--eval-tokens 4096] [--dtype bfloat16] [--batch 4] [--out-dir results/moe_study]
Writes <out-dir>/study.json, probe.json, pareto.png, FINDINGS.md and refreshes the generated table in
docs/MOE_FINDINGS.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import atomic_io
import moe_alloc
import quant_config

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parents[2]
FORMAT = "moe-lowbit/moe-study/1"
DEFAULT_STRATEGIES = ("uniform", "asal", "composite", "freq", "wmass", "wnorm", "random", "inverse")
DOC_BEGIN, DOC_END = "<!-- BEGIN GENERATED: moe_study -->", "<!-- END GENERATED: moe_study -->"


def batched_logits_fn(model: torch.nn.Module, all_tokens: torch.Tensor, batch: int):
    """tokens [ctx] -> logits [ctx, V], like moe_eval.hf_logits_fn, but run `batch` windows of `all_tokens`
    [n, ctx] per forward: a call for window i (matched by content) computes windows i..i+batch-1 at once
    and serves the following calls from that block. Any other input gets a forward of its own."""
    import torch

    dev = model.get_input_embeddings().weight.device
    held: dict = {"start": -1, "logits": None}

    @torch.no_grad()
    def logits_of(tokens: torch.Tensor) -> torch.Tensor:
        start, block = held["start"], held["logits"]
        for i in range(start, start + (0 if block is None else block.shape[0])):
            if torch.equal(tokens, all_tokens[i]):
                return block[i - start]
        hits = [i for i in range(all_tokens.shape[0]) if torch.equal(tokens, all_tokens[i])]
        if not hits:
            return model(input_ids=tokens.reshape(1, -1).to(dev), use_cache=False).logits[0]
        held["logits"] = None  # free the old block before the next forward
        i = hits[0]
        held["start"], held["logits"] = i, model(input_ids=all_tokens[i: i + batch].to(dev), use_cache=False).logits
        return held["logits"][0]

    return logits_of


def fp32_logits_head(model: torch.nn.Module) -> None:
    """Keep the output head in fp32 on a bf16/fp16 model: the logits (and so every KL) are then not rounded
    to 8 mantissa bits; the decoder runs in the low precision, the head casts its input up."""
    import torch

    head = model.get_output_embeddings()
    if head is None or head.weight.dtype == torch.float32 or head.weight is model.get_input_embeddings().weight:
        return  # tied: the embedding would change dtype too
    head.float()
    head.register_forward_pre_hook(lambda mod, args: tuple(a.float() for a in args))


def run_study(model_spec: str, strategies: list, budgets: list | None, levels: list, eval_tokens: int,
              probe_tokens: int, ctx: int, group: int = 128, grid: str = "full", seed: int = 0,
              cache_root: str | None = None, log=print, dtype: str = "bfloat16", batch: int = 4) -> dict:
    """Probe, teacher cache, one fake-quant per layer and level, then every (budget, strategy) student."""
    import fidelity_config
    import moe_eval
    import fidelity_text
    import fidelity_cache
    import moe_probe
    import model_ref
    import moe_study
    import moefy_fit
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t_start = time.time()
    model_dir = model_ref.resolve(model_spec, log=log)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=fidelity_config.torch_dtype(dtype)).eval()
    fp32_logits_head(model)
    t_load = time.time() - t_start
    # probe on the calibration split
    calib = moe_probe.calibration_windows(tok, moefy_fit.pydoc_topics_text(held_out=False), probe_tokens, ctx)
    t0 = time.time()
    probe = moe_probe.probe_model(model, calib, batch)
    t_probe = time.time() - t0
    # teacher cache on the held-out split (the source model in the same dtype as every student)
    cfg = moe_eval.FidelityConfig(ctx=ctx, max_tokens=eval_tokens, cache_root=cache_root, dtype=dtype)
    held = moefy_fit.pydoc_topics_text(held_out=True)
    windows = fidelity_text.text_windows(held, tok, cfg, {"kind": "pydoc_data.topics held-out split"})
    teacher_id = moe_eval.model_identity(model_dir) + f":{dtype}:fp32-head"
    logits_fn = batched_logits_fn(model, windows.tokens, batch)
    t0 = time.time()
    cache = fidelity_cache.build_teacher_cache(lambda: logits_fn, teacher_id, windows, cfg)
    t_teacher = time.time() - t0
    units = moe_alloc.expert_units(model_dir)
    budgets = budgets or moe_study.default_budgets(units, group, grid)
    builder = moe_study.StudentBuilder(model, group, grid)
    t_quant = builder.prepare(levels)
    rows = []
    for budget in budgets:
        for strategy in strategies:
            t0 = time.time()
            plan = moe_alloc.make_plan(probe, model_dir, budget, strategy, levels, group, grid, seed=seed,
                                       units=units)
            bits = moe_study.unit_bits(plan, units)
            t_build0 = time.time()
            builder.apply(bits)
            t_build = time.time() - t_build0
            t_score0 = time.time()
            res = moe_eval.score_student(logits_fn, windows, cache, cfg, name=f"{strategy}@{budget}")
            rows.append({"strategy": strategy, "budget_bits": budget, "effective_bits": plan["effective_bits"],
                         "experts_per_level": plan["experts_per_level"],
                         "kl_mean": res["kl_mean"], "kl_mean_interval": res["kl_mean_interval"],
                         "top1_agree": res["top1_agree"], "top1_agree_interval": res["top1_agree_interval"],
                         "ppl_ratio": res["ppl_ratio"], "ppl_ratio_interval": res["ppl_ratio_interval"],
                         "kl_per_window": res["per_window"]["kl"],
                         "seconds": round(time.time() - t0, 2), "build_seconds": round(t_build, 3),
                         "score_seconds": round(time.time() - t_score0, 2)})
            log(f"{strategy:>9} @ {budget}: eff {plan['effective_bits']:.4f}  KL {res['kl_mean']:.4f} "
                f"[{res['kl_mean_interval'][0]:.4f}, {res['kl_mean_interval'][1]:.4f}]  ({rows[-1]['seconds']} s)")
    builder.restore()
    import provenance

    n = max(len(rows), 1)
    return {"format": FORMAT, "model": str(model_dir), "model_spec": model_spec, "levels": levels,
            "group": group, "grid": grid, "budgets": budgets, "strategies": strategies, "seed": seed,
            "dtype": dtype, "logits_head": "fp32", "batch": batch,
            "quantized": "routed experts only (everything else at source precision)",
            "eval_text": dict(windows.source, tokens_sha256=windows.sha256, n_windows=int(windows.tokens.shape[0]),
                              ctx=ctx, n_scored_tokens=windows.n_scored),
            "probe_text": {"kind": "pydoc_data.topics calibration split", "tokens": int(calib.numel())},
            "fidelity_cache": {"hit": cache.hit, "computed_windows": cache.computed_windows},
            "timing_s": {"load": round(t_load, 1), "probe": round(t_probe, 1), "teacher": round(t_teacher, 1),
                         "quantize_levels": round(t_quant, 1), "total": round(time.time() - t_start, 1),
                         "per_student_mean": round(sum(r["seconds"] for r in rows) / n, 2),
                         "per_student_build_mean": round(sum(r["build_seconds"] for r in rows) / n, 3),
                         "load_average": load_average()},
            "probe_summary": probe["summary"], "provenance": provenance.record(),
            "results": rows, "_probe": probe}


def load_average() -> list | None:
    """1/5/15-minute load average of the box when the study ended (the timings are read next to it)."""
    import os

    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def findings_table(study: dict) -> str:
    """Markdown: one row per (budget, strategy), sorted by KL within each budget; paired deltas vs uniform."""
    import fidelity_math

    lines = [f"Model `{study['model_spec']}`; KL(teacher || student) over {study['eval_text']['n_scored_tokens']} "
             f"held-out tokens ({study['eval_text']['n_windows']} windows of {study['eval_text']['ctx']}); "
             f"intervals: mean +/- 1.96 stderr over windows; levels {study['levels']}, g{study['group']} "
             f"grid {study['grid']}; {study['quantized']}. Source: `results/moe_study/study.json`.", "",
             "| budget (eff. bits) | strategy | eff. bits | experts at 2/3/4 | KL | KL 95% CI | KL - uniform (paired) "
             "| top-1 agree | PPL ratio |", "|---|---|---|---|---|---|---|---|---|"]
    for budget in study["budgets"]:
        rows = sorted((r for r in study["results"] if r["budget_bits"] == budget), key=lambda r: r["kl_mean"])
        uni = next((r for r in rows if r["strategy"] == "uniform"), None)
        for r in rows:
            lv = "/".join(str(r["experts_per_level"].get(str(float(b)), 0)) for b in study["levels"])
            delta = "-"
            if uni is not None and r is not uni:
                d = fidelity_math.paired_delta(r["kl_per_window"], uni["kl_per_window"])
                delta = f"{d['mean']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]"
            lo, hi = r["kl_mean_interval"]
            lines.append(f"| {budget} | {r['strategy']} | {r['effective_bits']:.4f} | {lv} | {r['kl_mean']:.4f} | "
                         f"[{lo:.4f}, {hi:.4f}] | {delta} | {r['top1_agree']:.4f} | {r['ppl_ratio']:.4f} |")
    lines.append("")
    for budget in study["budgets"]:
        rows = sorted((r for r in study["results"] if r["budget_bits"] == budget), key=lambda r: r["kl_mean"])
        order = " < ".join(r["strategy"] for r in rows)
        lines.append(f"* budget {budget}: KL ordering (lowest first) {order}.")
        by = {r["strategy"]: r for r in rows}
        if "asal" in by and "inverse" in by:
            d = fidelity_math.paired_delta(by["inverse"]["kl_per_window"], by["asal"]["kl_per_window"])
            verdict = ("inverse is worse than asal" if d["lo"] is not None and d["lo"] > 0 else
                       "inverse vs asal not separated at 95 %")
            lines.append(f"  KL(inverse) - KL(asal), paired over windows: {d['mean']:+.4f} "
                         f"[{d['lo']:+.4f}, {d['hi']:+.4f}]: {verdict}.")
    t = study["timing_s"]
    extra = (f", levels quantized once {t['quantize_levels']} s" if "quantize_levels" in t else "")
    la = f"; load average at the end {t['load_average']}" if t.get("load_average") else ""
    lines += ["", f"Wall time: total {t['total']} s (load {t['load']}, probe {t['probe']}, teacher {t['teacher']} "
                  f"once{extra}), {t['per_student_mean']} s per student"
                  + (f" (assembly {t['per_student_build_mean']} s of it)" if "per_student_build_mean" in t else "")
                  + f", {len(study['results'])} students{la}."]
    return "\n".join(lines) + "\n"


def pareto_plot(study: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for s in study["strategies"]:
        rows = sorted((r for r in study["results"] if r["strategy"] == s), key=lambda r: r["effective_bits"])
        xs = [r["effective_bits"] for r in rows]
        ys = [r["kl_mean"] for r in rows]
        err = [[r["kl_mean"] - r["kl_mean_interval"][0] for r in rows],
               [r["kl_mean_interval"][1] - r["kl_mean"] for r in rows]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=s)
    ax.set_xlabel("effective bits per routed-expert weight (scales counted)")
    ax.set_ylabel("KL(teacher || student), nats/token")
    ax.set_yscale("log")
    ax.set_title(f"{study['model_spec']}: allocation strategies")
    ax.legend(fontsize=7)
    with atomic_io.writing(path) as fh:
        fig.savefig(fh, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def refresh_doc(doc: Path, table: str) -> None:
    """Replace the generated block of docs/MOE_FINDINGS.md with the table (the rest is prose)."""
    if not doc.is_file():
        return
    text = doc.read_text()
    if DOC_BEGIN not in text or DOC_END not in text:
        return
    head, rest = text.split(DOC_BEGIN, 1)
    _, tail = rest.split(DOC_END, 1)
    atomic_io.write_text(doc, f"{head}{DOC_BEGIN}\n{table}{DOC_END}{tail}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Allocation study: strategies x budgets, KL vs the BF16 teacher "
                                             "on held-out text, one model load, teacher logits cached once.")
    ap.add_argument("--model", default="embedded:smollm2-moe", help="MoE checkpoint dir or embedded:NAME")
    ap.add_argument("--strategies", default=",".join(DEFAULT_STRATEGIES))
    ap.add_argument("--budgets", default="", help="effective bits, comma-separated (default: midpoint of "
                                                  "uniform int2/int3 and uniform int3)")
    ap.add_argument("--levels", default="2,3,4")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--grid", default="full", choices=quant_config.GRIDS)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--probe-tokens", type=int, default=8192)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                    help="decoder dtype of teacher and students alike (the output head stays fp32); bf16 ran this "
                         "model's forward ~1.7x faster on this box's CPU (AVX512-BF16)")
    ap.add_argument("--batch", type=int, default=4, help="windows per forward")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: on a shared 2-core box one thread ran this model's forward "
                         "5-13x faster than two; 0 = torch's default)")
    ap.add_argument("--cache-root", default=None, help="teacher cache root (default $MOE_LOWBIT_CACHE/fidelity)")
    ap.add_argument("--out-dir", type=Path, default=REPO / "results" / "moe_study")
    ap.add_argument("--doc", type=Path, default=REPO / "docs" / "MOE_FINDINGS.md",
                    help="doc whose generated block is refreshed ('' to skip)")
    ap.add_argument("--render", type=Path, default=None,
                    help="re-render FINDINGS.md, pareto.png and the doc block from an existing study.json")
    args = ap.parse_args(argv)
    import torch

    import moe_study

    if args.threads > 0:  # once, by the entry point
        torch.set_num_threads(args.threads)
    if args.render:
        study = json.loads(args.render.read_text())
        write_reports(study, args.render.parent, args.doc)
        return 0
    strategies = [s for s in args.strategies.split(",") if s]
    bad = [s for s in strategies if s not in moe_alloc.STRATEGIES]
    if bad:
        print(f"error: unknown strategies {bad}; known: {', '.join(moe_alloc.STRATEGIES)}", file=sys.stderr)
        return 2
    budgets = [float(b) for b in args.budgets.split(",") if b.strip()] or None
    try:
        study = run_study(args.model, strategies, budgets, [float(x) for x in args.levels.split(",")],
                          args.eval_tokens, args.probe_tokens, args.ctx, args.group, args.grid, args.seed,
                          args.cache_root, log=lambda m: print(m, file=sys.stderr), dtype=args.dtype,
                          batch=args.batch)
    except (moe_study.StudyError, moe_alloc.AllocError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    probe = study.pop("_probe")
    out = args.out_dir
    atomic_io.write_json(out / "probe.json", {"format": "moe-lowbit/probe/1", "model": study["model"], **probe})
    atomic_io.write_json(out / "study.json", study)
    import moe_probe

    moe_probe.plot({"layers": probe["layers"]}, out, "probe")
    write_reports(study, out, args.doc)
    return 0


def write_reports(study: dict, out: Path, doc: Path | None) -> None:
    """FINDINGS.md, pareto.png and the doc's generated block, all from the study dict (i.e. study.json)."""
    table = findings_table(study)
    atomic_io.write_text(out / "FINDINGS.md", "# MoE allocation study (generated by fidelity_study.py)\n\n" + table)
    pareto_plot(study, out / "pareto.png")
    if doc and str(doc):
        refresh_doc(Path(doc), table)
    print(table)


if __name__ == "__main__":
    sys.exit(main())
