"""The smoke's report: the table printed at the end, read back from the JSON files the steps wrote (so the
numbers on screen are the numbers on disk), and the check that no number is missing."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping

from smoke_plan import (
    STEPS)


# --------------------------------------------------------------------------------------- the table
def load_outputs(summary_path: Path) -> dict:
    """The summary and every JSON it names, read back from disk (the table is printed from these)."""
    summary = json.loads(Path(summary_path).read_text(encoding="utf-8"))
    base = Path(summary_path).parent.parent
    docs = {"summary": summary}
    for key in ("teacher_eval", "quant_eval", "fidelity"):
        docs[key] = json.loads((base / summary["files"][key]).read_text(encoding="utf-8"))
    return docs


def _f(x, fmt: str) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def _role_bits(recipe: Mapping) -> str:
    rb = recipe.get("role_bits") or {}
    return (", " + ",".join(f"{k}={v:g}" for k, v in sorted(rb.items()))) if rb else ""


def _bits_plan(quant: Mapping) -> str:
    record, skipped = quant.get("bits_plan"), quant.get("bits_plan_skipped")
    if record:
        return f", bits plan {Path(record['path']).name} ({record['tensors']} tensors)"
    if skipped:
        return f", bits plan {Path(skipped['path']).name} not applied (made for another model)"
    return ""


def render_table(docs: Mapping) -> str:
    """Pure: the smoke table, every number formatted from the JSON dicts in `docs`."""
    s, t, q, fid = docs["summary"], docs["teacher_eval"], docs["quant_eval"], docs["fidelity"]
    st = fid["students"][0]
    fp = s["quant"]["footprint_total"]
    recipe = s["quant"]["recipe"] or {}
    lines = [f"SMOKE {s['kind']}  mode={s['mode']}  data={s['data']}  teacher={s['teacher']['spec']}",
             f"  why: {'; '.join(s['reasons'])}",
             f"  quant: {t['tag']} -> {q['tag']}  (method {recipe.get('method', 'clip')}"
             f"{', act-order' if recipe.get('act_order') else ''}, grid {recipe.get('grid', 'sym')}, "
             f"linear {recipe.get('linear_bits')} bit, experts "
             f"{recipe.get('expert_bits')} bit, group {recipe.get('group')}, clip steps {recipe.get('clip_steps')}"
             f"{_role_bits(recipe)}{_bits_plan(s['quant'])}; {s['quant']['build']})"]
    if s["random_weights"]:
        lines.append("  NOTE: RANDOM-WEIGHT MoE: only the plumbing is meaningful; no accuracy claim is made")
    lines += ["",
              f"{'benchmark':<10} {'n':>4} | {'teacher acc':>11} {'95% CI':>14} {'trunc':>6} | {'quant acc':>9} "
              f"{'95% CI':>14} {'trunc':>6} | {'delta':>7} {'paired 95% CI':>16} {'McNemar p':>9}"]
    for bench, c in s["comparison"]["benchmarks"].items():
        tb, qb = t["benchmarks"][bench], q["benchmarks"][bench]
        tci = "[%s, %s]" % (_f(tb["ci95"][0], ".1f"), _f(tb["ci95"][1], ".1f"))
        qci = "[%s, %s]" % (_f(qb["ci95"][0], ".1f"), _f(qb["ci95"][1], ".1f"))
        dci = "[%s, %s]" % (_f(c["ci95"][0], "+.1f"), _f(c["ci95"][1], "+.1f"))
        lines.append(f"{bench:<10} {tb['n']:>4} | {_f(tb['acc'], '.1f'):>11} {tci:>14} {_f(tb['trunc'], '.1f'):>6} | "
                     f"{_f(qb['acc'], '.1f'):>9} {qci:>14} {_f(qb['trunc'], '.1f'):>6} | {_f(c['delta'], '+.1f'):>7} "
                     f"{dci:>16} {_f(c['p_mcnemar'], '.3g'):>9}")
    ppl_iv = st["ppl_ratio_interval"]
    kl_iv = st["kl_mean_interval"]
    lines += ["",
              f"fidelity ({fid['text']['kind']}, {fid['text']['n_scored_tokens']} tokens, ctx {fid['text']['ctx']}): "
              f"PPL teacher {_f(st['ppl_teacher'], '.3f')} quant {_f(st['ppl_student'], '.3f')} "
              f"(ratio {_f(st['ppl_ratio'], '.4f')} [{_f(ppl_iv[0], '.4f')}, {_f(ppl_iv[1], '.4f')}]); "
              f"KL {_f(st['kl_mean'], '.5f')} [{_f(kl_iv[0], '.5f')}, {_f(kl_iv[1], '.5f')}] ({st['kl_kind']}); "
              f"top-1 {_f(st['top1_agree'], '.4f')}",
              f"footprint: effective bits {_f(fp['effective_bits'], '.3f')} (quantized tensors "
              f"{_f(fp['effective_bits_quantized'], '.3f')}); packed {_f(fp['packed_bytes'] / 2**20, '.1f')} MiB vs "
              f"source {_f(fp['source_bytes'] / 2**20, '.1f')} MiB (x{_f(fp['compression'], '.2f')})",
              "wall s: " + ", ".join(f"{k} {_f(v, '.1f')}" for k, v in s["timings_s"].items())]
    roles = s["quant"].get("footprint_roles") or {}
    if roles:
        lines.insert(-1, "per role: " + "; ".join(
            f"{role} {'/'.join(f'{b:g}' for b in r['bits'])} bit (eff {_f(r['effective_bits'], '.3f')}, rel MSE "
            f"{_f(r['rel_mse'], '.4f')})" for role, r in roles.items()))
    return "\n".join(lines)


def missing_numbers(docs: Mapping) -> list[str]:
    """Every number the table needs that a step failed to produce (None / NaN / absent)."""
    missing = []

    def need(value, what):
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            missing.append(what)

    s, st = docs["summary"], docs["fidelity"]["students"][0] if docs["fidelity"].get("students") else {}
    for bench, c in s["comparison"]["benchmarks"].items():
        for role, doc in (("teacher", docs["teacher_eval"]), ("quant", docs["quant_eval"])):
            block = doc["benchmarks"].get(bench, {})
            for key in ("acc", "trunc"):
                need(block.get(key), f"{role} {bench} {key}")
        need(c.get("delta"), f"{bench} delta")
        for i, v in enumerate(c.get("ci95") or [None, None]):
            need(v, f"{bench} paired interval[{i}]")
    for key in ("ppl_teacher", "ppl_student", "kl_mean", "top1_agree"):
        need(st.get(key), f"fidelity {key}")
    for key in ("effective_bits", "packed_bytes"):
        need(s["quant"]["footprint_total"].get(key), f"footprint {key}")
    for step in STEPS:
        need(s["timings_s"].get(step), f"wall time of {step}")
    return missing
