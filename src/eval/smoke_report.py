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
    docs["rows"] = {r["key"]: json.loads((base / r["eval"]).read_text(encoding="utf-8"))
                    for r in summary.get("rows") or [] if r.get("eval")}
    gguf = summary.get("gguf") or {}
    if gguf.get("fidelity"):
        docs["gguf_fidelity"] = json.loads((base / gguf["fidelity"]).read_text(encoding="utf-8"))
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
    if s.get("rows") or s.get("gguf"):
        lines[-1:-1] = ["", *render_rows(docs)]
    roles = s["quant"].get("footprint_roles") or {}
    if roles:
        lines.insert(-1, "per role: " + "; ".join(
            f"{role} {'/'.join(f'{b:g}' for b in r['bits'])} bit (eff {_f(r['effective_bits'], '.3f')}, rel MSE "
            f"{_f(r['rel_mse'], '.4f')})" for role, r in roles.items()))
    return "\n".join(lines)


def _mib(x) -> str:
    return _f(x / 2**20 if x is not None else None, ".1f") + " MiB"


def render_rows(docs: Mapping) -> list[str]:
    """Pure: every evaluated model of the run, one row each (accuracy and delta vs the teacher on the same
    samples, KL on the fidelity text, vLLM gen tok/s), then the per-sample agreement of the shipped export with
    its dequantized view, the exports' verdicts and the GGUF's llama-perplexity scores."""
    s, t, fid = docs["summary"], docs["teacher_eval"], docs["fidelity"]
    benches = list(s["comparison"]["benchmarks"])
    students = fid.get("students") or []
    tok = s.get("gen_tok_s") or {}

    def cells(doc, comparison):
        out = []
        for b in benches:
            acc = doc["benchmarks"][b]["acc"] if doc else None
            delta = comparison["benchmarks"][b]["delta"] if comparison else None
            out.append(f"{_f(acc, '.1f'):>5} {('(' + _f(delta, '+.1f') + ')') if comparison else '':>7}")
        return " ".join(out)

    def kl(i):
        return _f(students[i]["kl_mean"], ".5f") if i is not None and i < len(students) else "-"

    head = f"{'model (same samples: acc (delta vs teacher))':<52} " + " ".join(f"{b:>13}" for b in benches)
    lines = [head + f" {'KL':>8} {'gen tok/s':>9}",
             f"{'teacher BF16':<52} {cells(t, None)} {'-':>8} {_f(tok.get('teacher'), '.1f'):>9}",
             f"{'quant, dequantized view (the SMOKE OK gates)':<52} {cells(docs['quant_eval'], s['comparison'])} "
             f"{kl(0):>8} {_f(tok.get('quant'), '.1f'):>9}"]
    notes = []
    for r in s.get("rows") or []:
        doc = docs.get("rows", {}).get(r["key"])
        eb = (r.get("footprint_total") or {}).get("effective_bits")
        label = f"{r['label']}, {_f(eb, '.2f')} bpw"
        if r.get("error"):
            lines.append(f"{label[:52]:<52} {'NOT SERVED: falls back to the dequantized view above':>{14 * len(benches)}}")
            notes.append(f"{r['label']}: vLLM could not serve it: {r['error']}")
            continue
        lines.append(f"{label[:52]:<52} {cells(doc, r['comparison'])} {kl(r.get('fidelity_student')):>8} "
                     f"{_f(r.get('gen_tok_s'), '.1f'):>9}")
        ag = r.get("agreement")
        if ag:
            differ = ", ".join(f"{d['id']} {d['answer_a']!s}->{d['answer_b']!s}" for d in ag["differ"][:6])
            more = f" (+{len(ag['differ']) - 6} more)" if len(ag["differ"]) > 6 else ""
            notes.append(f"{r['key']} vs {ag['with']}: same answer {ag['same_answer']}/{ag['n']}, same text "
                         f"{ag['same_text']}/{ag['n']}, same verdict {ag['same_verdict']}/{ag['n']}"
                         + (f"; answers differ: {differ}{more}" if differ else "") + f"; {ag['why']} (for scale: "
                         f"teacher vs {ag['with']}, other weights, same answer {ag.get('teacher_vs_pair_same_answer')}"
                         f"/{ag['n']})")
        ex = r.get("export")
        if ex:
            v = ex.get("verified") or {}
            notes.append(f"{r['key']} export {ex['dir']}/: {_mib(ex['bytes'])}, verify_export "
                         f"{'PASS' if v.get('ok') else 'FAIL'} ({v.get('tensors_checked')}/{v.get('tensors_in_store')} "
                         f"tensors bit-exact)")
    g = s.get("gguf")
    if g:
        v = g.get("verified") or {}
        types = ", ".join(f"{k} {n}" for k, n in g["types"].items())
        notes.append(f"GGUF {Path(g['file']).name} of the int4 store: {_mib(g['bytes'])} ({types} tensors), "
                     f"verify_export {'PASS' if v.get('ok') else 'FAIL'} ({v.get('tensors_checked')}/"
                     f"{v.get('tensors_in_store')} tensors bit-exact); BF16 GGUF {_mib(g.get('base_bytes'))}")
        gf = docs.get("gguf_fidelity")
        if gf:
            st = gf["students"][0]
            iv = st.get("kl_mean_interval") or [None, None]
            notes.append(f"GGUF vs BF16 GGUF in llama-perplexity ({gf['text'].get('n_scored_tokens')} tokens, ctx "
                         f"{gf['text'].get('ctx')}, held-out fidelity text): KLD {_f(st['kl_mean'], '.5f')} "
                         f"[{_f(iv[0], '.5f')}, {_f(iv[1], '.5f')}], PPL ratio {_f(st.get('ppl_ratio'), '.4f')}, "
                         f"top-1 {_f(st.get('top1_agree'), '.4f')}")
        elif g.get("skipped"):
            notes.append(f"GGUF not scored: {g['skipped']}")
    notes.append("KL: moe_eval on the fidelity text, each build's weights in torch (an export holds its view's "
                 "weights, verified); gen tok/s: generated tokens / generation wall of vLLM's batched greedy run")
    return lines + [f"  {n}" for n in notes]


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
    for step in s.get("steps") or STEPS:
        need(s["timings_s"].get(step), f"wall time of {step}")
    for r in s.get("rows") or []:
        if r.get("error") and r.get("may_fall_back"):
            continue  # shown as not served, with its error line
        doc = (docs.get("rows") or {}).get(r["key"])
        if doc is None:
            missing.append(f"{r['key']} evaluation")
            continue
        for bench in s["comparison"]["benchmarks"]:
            need((doc["benchmarks"].get(bench) or {}).get("acc"), f"{r['key']} {bench} acc")
        need(r.get("gen_tok_s"), f"{r['key']} gen tok/s")
        if r.get("export") and not (r["export"].get("verified") or {}).get("ok"):
            missing.append(f"{r['key']} export verification")
    g = s.get("gguf")
    if g and not g.get("skipped"):
        st = ((docs.get("gguf_fidelity") or {}).get("students") or [{}])[0]
        need(st.get("kl_mean"), "GGUF KLD")
    return missing
