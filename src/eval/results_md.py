"""Write results/RESULTS.md from the result JSONs alone (never edit RESULTS.md by hand).

Reads <results-dir>/vllm_eval/*.json (written by vllm_eval8.run_eval) and <results-dir>/fidelity/*.json
(moe_eval.py) and renders:

* a headline table per teacher: teacher / quant / baseline accuracy with Wilson 95 % intervals, and
  each quant / baseline's delta vs the teacher with its paired bootstrap 95 % interval and McNemar p
  (results_compare.py), plus the teacher's validation-gate status per benchmark (results_official.py);
* the fidelity tables (PPL, KL, top-1 vs the teacher), when fidelity JSONs exist;
* the gate table, per-group breakdowns (MMMLU locale, MMLU-Pro category), and one section per run
  with the exact command, git sha and sampling that produced it.

Roles: a result's ``role`` field (vllm_eval8 --role), else its tag prefix (``teacher-*``, ``quant-*``,
``baseline-*``), else an optional ``--roles`` JSON {tag: role} overrides both. A quant/baseline is
compared with the teacher named by its ``reference_tag`` (--reference-tag), or with the only teacher.
Sections appear only for data that exists. The output depends on nothing but the JSONs (no clock).

    python -m results_md --results-dir results             # writes results/RESULTS.md
    python -m results_md --results-dir results --check     # exit 1 if RESULTS.md is stale
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Mapping, Sequence

import atomic_io
import results_compare
import results_official
import results_schema

ROLE_ORDER = ("teacher", "quant", "baseline", "other")
EVAL_SUBDIR = "vllm_eval"


def load_results(results_dir: Path) -> list[dict]:
    """Every results JSON under <results_dir>/vllm_eval, sorted by tag; a malformed one fails loudly."""
    docs = []
    for path in sorted((results_dir / EVAL_SUBDIR).glob("*.json")):
        doc = json.loads(path.read_text(encoding="utf-8"))
        try:
            results_schema.check_result(doc)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
        doc["_path"] = path.resolve()
        docs.append(doc)
    tags = [d["tag"] for d in docs]
    if len(set(tags)) != len(tags):
        raise ValueError(f"duplicate tags among results: {sorted(t for t in set(tags) if tags.count(t) > 1)}")
    return sorted(docs, key=lambda d: d["tag"])


FIDELITY_SUBDIR = "fidelity"


def load_fidelity(results_dir: Path) -> list[dict]:
    """moe_eval fidelity JSONs under <results_dir>/fidelity (teacher-vs-student PPL / KL / top-1)."""
    docs = []
    for path in sorted((results_dir / FIDELITY_SUBDIR).glob("*.json")):
        doc = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(doc, dict) or not isinstance(doc.get("students"), list):
            raise ValueError(f"{path}: not a moe_eval fidelity JSON (no 'students' list)")
        doc["_path"] = path.resolve()
        docs.append(doc)
    return docs


def role_of(doc: Mapping, overrides: Mapping | None = None) -> str:
    if overrides and doc["tag"] in overrides:
        return overrides[doc["tag"]]
    if doc.get("role") in ROLE_ORDER:
        return doc["role"]
    m = re.match(r"(teacher|quant|baseline)(?:[-_.]|$)", doc["tag"])
    return m.group(1) if m else "other"


def _pct(x) -> str:
    return "–" if x is None else f"{x:.1f}"


def _ci(ci) -> str:
    return "" if not ci else f" [{ci[0]:.1f}, {ci[1]:.1f}]"


def _signed_ci(ci) -> str:
    return f" [{ci[0]:+.1f}, {ci[1]:+.1f}]"


def _link(text: str, doc: Mapping, out_dir: Path) -> str:
    return f"[{text}]({Path(os.path.relpath(doc['_path'], out_dir)).as_posix()})"


def _anchor(doc: Mapping) -> str:
    return "run-" + re.sub(r"[^a-z0-9-]", "-", doc["tag"].lower())


def _bench_order(docs: Sequence[Mapping]) -> list[str]:
    seen: list[str] = []
    for doc in docs:
        for bench in doc["benchmarks"]:
            if bench not in seen:
                seen.append(bench)
    return seen


def attach_to_teachers(docs: Sequence[dict], roles: Mapping[str, str]) -> tuple[dict, list]:
    """{teacher tag: [quant/baseline docs]} and the comparands no teacher could be found for."""
    teachers = {d["tag"]: d for d in docs if roles[d["tag"]] == "teacher"}
    groups: dict[str, list] = {tag: [] for tag in teachers}
    unattached = []
    for doc in docs:
        if roles[doc["tag"]] not in ("quant", "baseline"):
            continue
        ref = doc.get("reference_tag")
        if ref in teachers:
            groups[ref].append(doc)
        elif ref is None and len(teachers) == 1:
            groups[next(iter(teachers))].append(doc)
        else:
            unattached.append(doc)
    for members in groups.values():
        members.sort(key=lambda d: (ROLE_ORDER.index(roles[d["tag"]]), d["tag"]))
    return groups, unattached


def _delta_cell(teacher: Mapping, other: Mapping, bench: str, out_dir: Path) -> str:
    if bench not in teacher["benchmarks"] or bench not in other["benchmarks"]:
        return "–"
    try:
        c = results_compare.compare_bench(teacher["benchmarks"][bench], other["benchmarks"][bench], name=bench)
    except results_compare.UnpairedError:
        delta = other["benchmarks"][bench]["acc"] - teacher["benchmarks"][bench]["acc"]
        return f"{_link(f'{delta:+.1f}', other, out_dir)} (unpaired: different samples)"
    delta_text = f"{c['delta']:+.1f}"
    return f"{_link(delta_text, other, out_dir)}{_signed_ci(c['ci95'])} p={c['p_mcnemar']:.2g}"


def _acc_cell(doc: Mapping, bench: str, out_dir: Path) -> str:
    block = doc["benchmarks"].get(bench)
    if block is None:
        return "–"
    return f"{_link(_pct(block['acc']), doc, out_dir)}{_ci(block['ci95'])}"


def _gate_cell(doc: Mapping, bench: str) -> str:
    if bench not in doc["benchmarks"]:
        return "–"
    g = results_official.gate_for_result(doc)[bench]
    return g["status"] if g["official"] is None else f"{g['status']} ({g['official']:.1f})"


def render_headline(teacher: Mapping, members: Sequence[Mapping], roles: Mapping, out_dir: Path) -> list[str]:
    benches = _bench_order([teacher, *members])
    head = ["Benchmark", "n", f"teacher [{teacher['tag']}](#{_anchor(teacher)})", "gate"]
    for doc in members:
        head += [f"{roles[doc['tag']]} [{doc['tag']}](#{_anchor(doc)})", f"Δ {doc['tag']} vs teacher"]
    lines = [f"## Headline: {teacher['tag']}", "",
             "acc in % (truncated = wrong) with Wilson 95% interval; Δ = run − teacher in points with paired "
             "bootstrap 95% interval and exact McNemar p; every number links to its JSON, every column "
             "header to the run's command.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for bench in benches:
        n = teacher["benchmarks"].get(bench, {}).get("n", "–")
        row = [bench, str(n), _acc_cell(teacher, bench, out_dir), _gate_cell(teacher, bench)]
        for doc in members:
            row += [_acc_cell(doc, bench, out_dir), _delta_cell(teacher, doc, bench, out_dir)]
        lines.append("| " + " | ".join(row) + " |")
    if members:
        lines += ["", "Deltas reproduce with:"]
        lines += [f"`python -m vllm_eval8 compare {Path(os.path.relpath(teacher['_path'], out_dir)).as_posix()} "
                  f"{Path(os.path.relpath(d['_path'], out_dir)).as_posix()}` (paths relative to this file)  "
                  for d in members]
    return lines + [""]


def render_gate(docs: Sequence[Mapping], out_dir: Path) -> list[str]:
    """The gate per carded run: the official scorer's accuracy, its interval, the verdict and the n that
    would decide it; the robust accuracy and how often the two scorers disagree, beside it."""
    rows = []
    for doc in docs:
        for bench, g in results_official.gate_for_result(doc).items():
            if g["official"] is not None:
                block = doc["benchmarks"][bench]
                delta = "–" if g["delta"] is None else f"{g['delta']:+.1f}"
                ci = "–" if not g.get("ci95") else "[%.1f, %.1f]" % tuple(g["ci95"])
                need = "–" if g.get("n_needed") is None else str(g["n_needed"])
                differ = "–" if block.get("disagreement") is None else f"{block['disagreement']:.1f}%"
                rows.append(f"| {doc['tag']} | {g['model']} | {bench} | {g['official']:.1f} | "
                            f"{_link(_pct(g['acc']), doc, out_dir)} ({g.get('scorer') or '-'}) | "
                            f"{_pct(block.get('acc_robust', block.get('acc')))} | {differ} | {delta} | {ci} | "
                            f"{need} | {g['status']} |")
    if not rows:
        return []
    return ["## Validation gate", "",
            f"Equivalence rule on the benchmark's official scorer: validated when the whole Wilson 95% interval "
            f"lies within ±{results_official.TOLERANCE_PT:.0f} pt of the model card's number, failed when the card "
            "number lies outside the interval, undecided otherwise; 'n to decide' is the sample count that would "
            "decide it at the observed accuracy. Thinking-off runs and models without a card number are "
            "no-official-number. Rule: src/eval/results_official.py.", "",
            "| run | carded model | benchmark | official | ours (scorer) | robust | scorers differ | Δ | 95% CI "
            "| n to decide | status |",
            "|---|---|---|---|---|---|---|---|---|---|---|", *rows, ""]


def render_groups(docs: Sequence[Mapping], out_dir: Path) -> list[str]:
    lines = []
    for bench in _bench_order(docs):
        having = [d for d in docs if "groups" in d["benchmarks"].get(bench, {})]
        if not having:
            continue
        groups = sorted({g for d in having for g in d["benchmarks"][bench]["groups"]})
        lines += [f"### {bench} by group", "", "| group | " + " | ".join(d["tag"] for d in having) + " |",
                  "|---|" + "---|" * len(having)]
        for g in groups:
            cells = []
            for d in having:
                block = d["benchmarks"][bench]["groups"].get(g)
                cells.append("–" if block is None else f"{_link(_pct(block['acc']), d, out_dir)} (n={block['n']})")
            lines.append(f"| {g} | " + " | ".join(cells) + " |")
        lines.append("| **macro** | " + " | ".join(
            _link(_pct(d["benchmarks"][bench].get("macro_acc")), d, out_dir) for d in having) + " |")
        lines.append("")
    return (["## Per-group breakdown", "", "Macro = unweighted mean of the group accuracies.", "", *lines]
            if lines else [])


def _speed_lines(doc: Mapping) -> list[str]:
    """llama-server throughput, when the run went through llamacpp_eval8 (its `llamacpp` block)."""
    block = doc.get("llamacpp")
    if not isinstance(block, Mapping):
        return []
    run = block.get("throughput_run") or {}
    probe = block.get("probe") or {}

    def f(x):
        return "–" if x is None else f"{x:.1f}"

    vram = block.get("peak_vram_mib")
    vram_text = "–" if vram is None else f"{vram:.0f} MiB"
    return [f"- llama-server: prefill {f(run.get('prefill_tok_s'))} / decode {f(run.get('decode_tok_s'))} tok/s "
            f"over the run; probe decode {f(probe.get('decode_tok_s'))} tok/s; peak VRAM {vram_text}"]


def render_run(doc: Mapping, role: str, out_dir: Path) -> list[str]:
    gen, prov = doc["generation"], doc.get("provenance", {})
    sampling = (f"temperature {gen['temperature']}, top_p {gen['top_p']}, top_k {gen['top_k']}, seed {gen['seed']}"
                if gen["temperature"] > 0 else "greedy")
    jsonl = doc.get("samples_file")
    lines = [f'### <a id="{_anchor(doc)}"></a>{doc["tag"]} ({role})', "",
             f"- model: `{doc['model']}`; backend {doc['backend']}; thinking {'on' if gen['thinking'] else 'off'}; "
             f"budget {gen['budget']} (max new tokens {gen['max_new_tokens']}); {sampling}",
             f"- results: {_link(Path(doc['_path']).name, doc, out_dir)}"
             + (f", per-sample `{jsonl}`" if jsonl else "")
             + f"; config hash `{doc.get('config_hash')}`; git `{prov.get('git_sha', 'unknown')}`",
             f"- command: `{prov.get('command', 'unknown')}`", *_speed_lines(doc), "",
             "| benchmark | n | acc | 95% CI | acc_finished | trunc % | no answer % | tokens mean / median |",
             "|---|---|---|---|---|---|---|---|"]
    for bench, b in doc["benchmarks"].items():
        tok = "–" if b.get("tokens_mean") is None else f"{b['tokens_mean']:.0f} / {b['tokens_median']:.0f}"
        lines.append(f"| {bench} | {b['n']} | {_link(_pct(b['acc']), doc, out_dir)} | {_ci(b['ci95']).strip()} | "
                     f"{_pct(b['acc_finished'])} | {_pct(b['trunc'])} | {_pct(b['no_answer'])} | {tok} |")
    return lines + [""]


def _interval(values, fmt: str) -> str:
    if not values or any(v is None for v in values):
        return ""
    return " [" + ", ".join(format(v, fmt) for v in values) + "]"


def render_fidelity(docs: Sequence[Mapping], out_dir: Path) -> list[str]:
    if not docs:
        return []
    lines = ["## Fidelity vs the teacher", "",
             "From src/eval/moe_eval.py: perplexity of teacher and student on the same token windows, "
             "KL(teacher‖student) per token, top-1 agreement; intervals as stated in each JSON "
             "(`interval_method`).", ""]
    for doc in docs:
        text = doc.get("text") or {}
        lines += [f"### {Path(doc['_path']).stem}", "",
                  f"- teacher `{(doc.get('teacher') or {}).get('dir', '?')}`; {text.get('n_scored_tokens', '?')} "
                  f"scored tokens in {text.get('n_windows', '?')} windows of {text.get('ctx', '?')}; "
                  f"results {_link(Path(doc['_path']).name, doc, out_dir)}",
                  f"- command: `{(doc.get('provenance') or {}).get('command', 'unknown')}`", "",
                  "| student | PPL teacher | PPL student | PPL ratio | KL mean | KL p99 | top-1 agree |",
                  "|---|---|---|---|---|---|---|"]
        for st in doc["students"]:
            def cell(key, fmt, interval_key=None, st=st):
                value = st.get(key)
                if value is None:
                    return "–"
                return _link(format(value, fmt), doc, out_dir) + _interval(st.get(interval_key), fmt)

            lines.append(f"| {st.get('name', '?')} | {cell('ppl_teacher', '.3f', 'ppl_teacher_interval')} | "
                         f"{cell('ppl_student', '.3f', 'ppl_student_interval')} | "
                         f"{cell('ppl_ratio', '.4f', 'ppl_ratio_interval')} | "
                         f"{cell('kl_mean', '.4g', 'kl_mean_interval')} ({st.get('kl_kind', '?')}) | "
                         f"{cell('kl_p99', '.4g')} | {cell('top1_agree', '.4f', 'top1_agree_interval')} |")
        lines.append("")
    return lines


def render(docs: Sequence[dict], out_dir: Path, role_overrides: Mapping | None = None,
           fidelity: Sequence[dict] = ()) -> str:
    roles = {d["tag"]: role_of(d, role_overrides) for d in docs}
    lines = ["# Results", "",
             "Generated by `python -m results_md` (src/eval/results_md.py) from the JSONs under "
             f"`{EVAL_SUBDIR}/` and `{FIDELITY_SUBDIR}/`; do not edit by hand. Protocol: docs/EVAL_PROTOCOL.md.",
             ""]
    if not docs and not fidelity:
        return "\n".join(lines + ["No results yet.", ""])
    groups, unattached = attach_to_teachers(docs, roles)
    for teacher_tag, members in groups.items():
        teacher = next(d for d in docs if d["tag"] == teacher_tag)
        lines += render_headline(teacher, members, roles, out_dir)
    lines += render_fidelity(fidelity, out_dir)
    lines += render_gate(docs, out_dir)
    lines += render_groups(sorted(docs, key=lambda d: (ROLE_ORDER.index(roles[d["tag"]]), d["tag"])), out_dir)
    if unattached:
        lines += ["## Runs without a teacher to compare with", "",
                  "Set --reference-tag (or run exactly one teacher) to get deltas for: "
                  + ", ".join(f"[{d['tag']}](#{_anchor(d)})" for d in unattached), ""]
    if docs:
        lines += ["## Runs", ""]
    for doc in sorted(docs, key=lambda d: (ROLE_ORDER.index(roles[d["tag"]]), d["tag"])):
        lines += render_run(doc, roles[doc["tag"]], out_dir)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="results_md", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-dir", type=Path, default=Path("results"), help="holds vllm_eval/*.json")
    parser.add_argument("--out", type=Path, default=None, help="default: <results-dir>/RESULTS.md")
    parser.add_argument("--roles", type=Path, default=None, help="optional JSON {tag: teacher|quant|baseline}")
    parser.add_argument("--check", action="store_true", help="do not write; exit 1 if the file is stale")
    args = parser.parse_args(argv)
    out = args.out or args.results_dir / "RESULTS.md"
    overrides = json.loads(args.roles.read_text()) if args.roles else None
    if overrides:
        bad = {t: r for t, r in overrides.items() if r not in ROLE_ORDER}
        if bad:
            parser.error(f"--roles has unknown roles {bad}; use one of {ROLE_ORDER}")
    try:
        text = render(load_results(args.results_dir), out.parent.resolve(), overrides,
                      fidelity=load_fidelity(args.results_dir))
    except ValueError as err:
        print(f"results_md: {err}", file=sys.stderr)
        return 2
    if args.check:
        current = out.read_text(encoding="utf-8") if out.exists() else None
        if current != text:
            print(f"results_md: {out} is stale; regenerate it", file=sys.stderr)
            return 1
        return 0
    atomic_io.write_text(out, text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
