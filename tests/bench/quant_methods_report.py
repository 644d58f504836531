"""The report of tests/bench/quant_methods_matrix.py, regenerated from its JSON: the table and the generated findings
(between the markers in docs/QUANTIZE.md) and the Pareto PNG. Pure functions of the JSON document except
`plot` and `write_doc_block`, which write the files.

KL used for every comparison ("KL lp-pos"): over llama-perplexity's positions (2nd half of each window),
ours from moe_eval's forward (tests/bench/quant_methods_kl.py), the GGUFs from llama-perplexity, so both sides
score the same tokens. moe_eval's every-position KL is shown beside it for our rows.
"""
from __future__ import annotations

from pathlib import Path

BEGIN, END = "<!-- quant_methods table: begin (tests/bench/quant_methods_matrix.py) -->", "<!-- quant_methods table: end -->"
LLAMA_REF = ("Q3_K_M", "IQ3_XXS", "Q4_K_M")  # the llama.cpp points the acceptance asks about
METHODS = ("clip", "rtn", "wclip", "gptq", "awq")
RECIPE_PREFIX = "recipe_"  # a shipped recipe's row (tests/bench/quant_methods.recipe_row): a point, not on a method line


def is_recipe(row: dict) -> bool:
    return row["name"].startswith(RECIPE_PREFIX)


def llama_label(base: str) -> str:
    return f"llama.cpp {base}" + (" (IQ3 recipe)" if base == "IQ3_XXS" else "")


def rows_from(doc: dict) -> list[dict]:
    """One row per student: ours (kind "ours") and llama.cpp's (kind "llamacpp"), sorted by kind then bpw."""
    rows = []
    for name, r in doc.get("ours", {}).items():
        rows.append({"name": name, "kind": "ours", "method": r["options"]["method"], "bpw": r["bpw"],
                     "bpw_body": r["bpw_body"], "kl": r["kl_lp_positions"], "kl_stderr": r["kl_lp_positions_stderr"],
                     "kl_all": r["kl"], "kl_all_stderr": r["kl_stderr"], "top1": r["top1"], "wall_s": r["wall_s"],
                     "options": r["options"]})
    for base, r in doc.get("llamacpp", {}).items():
        rows.append({"name": llama_label(base), "kind": "llamacpp", "method": base, "bpw": r["bits_per_weight"],
                     "bpw_body": r["bits_per_weight_without_embed_output"], "kl": r.get("kl"),
                     "kl_stderr": r.get("kl_stderr"), "kl_all": None, "kl_all_stderr": None, "top1": r.get("top1"),
                     "wall_s": r.get("wall_s"), "options": {}})
    return sorted(rows, key=lambda r: (r["kind"] != "llamacpp", r["bpw"], r["name"]))


def answer(ref: dict, ours: list[dict]) -> dict:
    """Does one of `ours` at <= ref's bpw reach <= ref's KL? The best such build, and if none: by how much
    (KL ratio of the best that fits; the smallest of ours that does reach ref's KL, if any)."""
    measured = [o for o in ours if o["kl"] is not None]
    fit = [o for o in measured if o["bpw"] <= ref["bpw"]]
    best = min(fit, key=lambda o: (o["kl"], o["bpw"]), default=None)
    reach = [o for o in measured if o["kl"] <= ref["kl"]]
    smallest = min(reach, key=lambda o: (o["bpw"], o["kl"]), default=None)
    return {"ref": ref["name"], "yes": best is not None and best["kl"] <= ref["kl"], "best": best,
            "kl_ratio": None if best is None else best["kl"] / ref["kl"], "smallest_reaching": smallest}


def answer_line(ref: dict, a: dict) -> str:
    head = f"* {ref['name']} ({ref['bpw']:.2f} bpw, KL {ref['kl']:.4f}): "
    b, s = a["best"], a["smallest_reaching"]
    if b is None:
        return head + "none of our measured builds is that small."
    if a["yes"]:
        return head + f"**yes**: {b['name']} at {b['bpw']:.2f} bpw has KL {b['kl']:.4f} ({a['kl_ratio']:.2f}x)."
    tail = (f"; the smallest of ours that reaches its KL is {s['name']} at {s['bpw']:.2f} bpw "
            f"(+{s['bpw'] - ref['bpw']:.2f} bpw)" if s else "; none of our builds reaches its KL at any size measured")
    return head + f"**no**: our best at <= {ref['bpw']:.2f} bpw is {b['name']} ({b['bpw']:.2f} bpw), KL {b['kl']:.4f}, " \
                  f"{a['kl_ratio']:.2f}x its KL" + tail + "."


def _find(ours: list[dict], **opts) -> dict | None:
    hits = [o for o in ours if all(o["options"].get(k, DEFAULTS.get(k)) == v for k, v in opts.items())]
    return hits[0] if hits else None


DEFAULTS = {"group": 128, "grid": "sym", "role_bits": None}


def findings(rows: list[dict]) -> list[str]:
    """Generated lines: the acceptance figures, and the effect of calibration, group size, embedding bits."""
    ours = [r for r in rows if r["kind"] == "ours" and r["kl"] is not None]
    out = []
    for bits in (4.0, 3.0):
        g128 = [o for o in ours if o["options"].get("linear_bits") == bits and o["options"].get("role_bits") == "embed=8"
                and o["options"].get("group", 128) == 128 and o["options"].get("grid", "sym") == "sym"]
        clip = next((o for o in g128 if o["method"] == "clip"), None)
        best = min((o for o in g128 if o["method"] != "clip"), key=lambda o: o["kl"], default=None)
        if clip and best:
            ratio = clip["kl"] / best["kl"]
            target = (f"target KL <= 0.25: {'holds' if best['kl'] <= 0.25 else 'not reached'}" if bits == 4.0 else
                      f"target >= 3x lower than clip: {'holds' if ratio >= 3 else 'not reached'}")
            out.append(f"* int{bits:g} g128 sym body, 8-bit embedding: best {best['name']} KL {best['kl']:.4f} "
                       f"(every position {best['kl_all']:.4f}) vs clip {clip['kl']:.4f} ({clip['kl_all']:.4f}): "
                       f"{ratio:.1f}x lower; {target}.")
    for method in METHODS:
        for bits in (4.0, 3.0):
            pts = [(g, _find(ours, method=method, linear_bits=bits, role_bits="embed=8", group=g, grid="sym"))
                   for g in (128, 64, 32)]
            pts = [(g, o) for g, o in pts if o]
            if len(pts) > 1:
                out.append(f"* {method} int{bits:g}, groups: " + ", ".join(
                    f"g{g} {o['bpw']:.2f} bpw KL {o['kl']:.4f}" for g, o in pts) + ".")
    for method in METHODS:
        for bits in (4.0, 3.0):
            e8 = _find(ours, method=method, linear_bits=bits, role_bits="embed=8", group=128, grid="sym")
            e4 = _find(ours, method=method, linear_bits=bits, role_bits="embed=4",
                       group=128, grid="sym")
            if e8 and e4:
                out.append(f"* {method} int{bits:g} g128, embedding 4 vs 8 bits: {e4['bpw']:.2f} bpw KL {e4['kl']:.4f} "
                           f"vs {e8['bpw']:.2f} bpw KL {e8['kl']:.4f} ({e4['kl'] / e8['kl']:.1f}x).")
    for method in METHODS:
        for bits in (4.0, 3.0):
            pts = [(grid, _find(ours, method=method, linear_bits=bits, role_bits="embed=8", group=128, grid=grid))
                   for grid in ("sym", "full", "asym")]
            pts = [(g, o) for g, o in pts if o]
            if len(pts) > 1:
                out.append(f"* {method} int{bits:g} g128, grids: " + ", ".join(
                    f"{g} {o['bpw']:.2f} bpw KL {o['kl']:.4f}" for g, o in pts) + ".")
    return out


def gguf_types(doc: dict) -> list[str]:
    """Per GGUF: its tensor-type counts and the fallbacks llama-quantize made (requested -> actual)."""
    out = []
    for base, r in sorted(doc.get("llamacpp", {}).items()):
        counts = r.get("type_counts") or {}
        if not counts:
            continue
        falls: dict[str, int] = {}
        for f in r.get("llama_quantize_fallbacks") or []:
            key = f"{f.get('requested')}->{f.get('actual')}"
            falls[key] = falls.get(key, 0) + 1
        text = f"{base}: " + ", ".join(f"{t} {n}" for t, n in sorted(counts.items(), key=lambda kv: -kv[1]))
        if falls:
            fb = r.get("llama_quantize_fallbacks")
            rows_len = sorted({f.get("row_len") for f in fb if f.get("row_len")})
            blocks = sorted({f.get("block") for f in fb if f.get("block")})
            text += (f" (fallbacks, row length {'/'.join(map(str, rows_len))} not a multiple of the block "
                     f"{'/'.join(map(str, blocks))}: ") + ", ".join(
                f"{k} x{n}" for k, n in sorted(falls.items(), key=lambda kv: -kv[1])) + ")"
        out.append(text)
    return out


def _kl(v, se) -> str:
    return "-" if v is None else (f"{v:.4f}" if se is None else f"{v:.4f} ± {se:.4f}")


def table(doc: dict) -> str:
    rows = rows_from(doc)
    t = doc["text"]
    when = sorted(r["measured_utc"] for r in doc.get("ours", {}).values() if r.get("measured_utc"))
    runs = (f"last run {doc.get('measured_utc', '?')}; our rows measured "
            f"{when[0]} to {when[-1]}, kept across runs on the same windows (a row rebuilt with changed bytes is "
            f"scored again)" if when
            else f"one run ({doc.get('measured_utc', '?')})")
    lines = [f"SmolLM2-135M-Instruct vs its BF16, {runs}: {t['n_windows']} windows "
             f"x {t['ctx']} tokens of the even pydoc topics ({t['kind']} ids, the same windows for both tools); "
             f"calibration: the odd pydoc topics, {doc['calib_tokens']} tokens, for our methods and for the imatrix "
             f"({doc.get('imatrix_chunks', '?')} chunks x {t['ctx']}). KL(teacher || student) in nats/token. "
             f"**KL lp-pos** is over llama-perplexity's positions (2nd half of each window, "
             f"{t.get('n_scored_lp', '?')} tokens): ours from moe_eval's forward, the GGUFs from llama-perplexity; "
             f"this is the KL compared below. **KL all** is moe_eval's every position ({t.get('n_scored_all', '?')} "
             f"tokens). ± is the stderr (ours over windows, llama-perplexity's over tokens). bpw = file bits per "
             f"weight, every tensor counted (a tied embedding once); body = without embedding/output.", "",
             "| student | bpw (all / body) | KL lp-pos | KL all | top-1 | build s |", "|---|---|---|---|---|---|"]
    for r in rows:
        top1 = "-" if r["top1"] is None else f"{100 * r['top1']:.1f}%"
        wall = "-" if r["wall_s"] is None else f"{r['wall_s']:.0f}"
        lines.append(f"| {r['name']} | {r['bpw']:.2f} / {r['bpw_body']:.2f} | {_kl(r['kl'], r['kl_stderr'])} | "
                     f"{_kl(r['kl_all'], r['kl_all_stderr'])} | {top1} | {wall} |")
    recipes = [r for r in rows if r["kind"] == "ours" and is_recipe(r)]
    if recipes:
        lines += ["", "Shipped recipes, measured as rows (their own options; the bench's calibration): " + "; ".join(
            f"{r['name']} = `configs/{r['name'][len(RECIPE_PREFIX):].split('+')[0]}.env`: " + ", ".join(
                f"{k} {v}" for k, v in r["options"].items()) for r in recipes) + "."]
    agree = doc.get("agreement") or {}
    if agree:
        lines += ["", "Both tools on the same checkpoint (ours converted to a BF16 GGUF and scored by llama-perplexity "
                      "in this run, on the same windows): "
                  + "; ".join(f"{n}: llama-perplexity {a['kl_llama_perplexity']:.4f} vs moe_eval (same positions) "
                              f"{a['kl_moe_eval_lp_positions']:.4f} ({a['kl_llama_perplexity'] / a['kl_moe_eval_lp_positions']:.2f}x)"
                              for n, a in sorted(agree.items())) + "."]
    types = gguf_types(doc)
    if types:
        lines += ["", "llama.cpp tensor types, read back from each GGUF (pack_gguf's meta): " + "; ".join(types) + "."]
    refs = [r for r in rows if r["kind"] == "llamacpp" and r["method"] in LLAMA_REF and r["kl"] is not None]
    ours = [r for r in rows if r["kind"] == "ours"]
    lines += ["", "Does one of our methods at <= a llama.cpp point's file bpw reach <= its KL (lp-pos)?", ""]
    lines += [answer_line(ref, answer(ref, ours)) for ref in refs] or ["* no llama.cpp point measured in this run."]
    found = findings(rows)
    if found:
        lines += ["", "What the matrix shows (generated from the same JSON):", ""] + found
    missing = doc.get("not_measured") or []
    if missing:
        lines += ["", f"Not measured in this run ({len(missing)}): " + ", ".join(missing) + "."]
    return "\n".join(lines)


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = rows_from(doc)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True)
    for ax, bits in zip(axes, (3.0, 4.0)):
        for i, method in enumerate(METHODS):
            pts = sorted((r["bpw"], r["kl"], r["name"]) for r in rows if r["kind"] == "ours" and r["method"] == method
                         and r["kl"] is not None and r["options"].get("linear_bits") == bits and not is_recipe(r))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=f"C{i}", label=method)
                for x, y, name in pts:
                    short = name.replace(f"{method}_int{bits:g}_", "")
                    ax.annotate(short, (x, y), textcoords="offset points", xytext=(4, -9), fontsize=6, color=f"C{i}")
        for r in rows:
            if r["kind"] == "ours" and is_recipe(r) and r["kl"] is not None and r["options"].get("linear_bits") == bits:
                ax.scatter([r["bpw"]], [r["kl"]], marker="D", s=70, color="crimson", zorder=6)
                ax.annotate(r["name"][len(RECIPE_PREFIX):] + " recipe", (r["bpw"], r["kl"]), textcoords="offset points",
                            xytext=(6, -12), fontsize=8, color="crimson")
            if r["kind"] == "llamacpp" and r["kl"] is not None:
                ax.scatter([r["bpw"]], [r["kl"]], marker="*", s=170, color="black", zorder=5)
                ax.annotate(r["method"] + (" (IQ3 recipe)" if r["method"] == "IQ3_XXS" else ""), (r["bpw"], r["kl"]),
                            textcoords="offset points", xytext=(6, 4), fontsize=8)
        ax.set_yscale("log")
        ax.set_xlabel("file bits per weight (every tensor)")
        ax.set_title(f"ours at int{bits:g} body", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=8)
    axes[0].set_ylabel("KL(BF16 || student), nats/token, llama-perplexity positions")
    fig.suptitle("SmolLM2-135M on held-out pydoc text: our methods vs llama.cpp (same windows, same positions)\n"
                 "lines: our methods (labels: group / embedding / grid); diamonds: shipped recipes; stars: llama.cpp",
                 fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def replace_block(doc_text: str, block_body: str, begin: str = BEGIN, end: str = END) -> str:
    """The document with the text between the markers replaced (markers appended if absent)."""
    block = f"{begin}\n{block_body}\n{end}"
    if begin in doc_text and end in doc_text:
        return doc_text[:doc_text.index(begin)] + block + doc_text[doc_text.index(end) + len(end):]
    return doc_text.rstrip() + "\n\n" + block + "\n"


def write_doc_block(doc_path: Path, block_body: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace one bench's generated block in a docs file, atomically (every bench's table goes this way)."""
    import atomic_io

    atomic_io.write_text(doc_path, replace_block(doc_path.read_text(), block_body, begin, end))


def paired_text(vs: dict | None) -> str:
    """A paired difference (fidelity_math.paired_delta) as `+mean [lo, hi]`, or "-" for the reference row."""
    return "-" if not vs else f"{vs['mean']:+.4f} [{vs['lo']:+.4f}, {vs['hi']:+.4f}]"
