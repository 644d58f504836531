"""The smoke's rows beyond teacher vs quant: what a user deploys, measured in the same run.

* the shipped int4 store (`ship_config`): the smoke recipe's method, grid, calibration and role bits with every
  quantized linear at 4 bits in groups of SMOKE_SHIP_GROUP and no bits plan, because compressed-tensors
  W4A16 holds only that (its kernels take 4 and 8 bits; the dense recipe's plan has 6-bit v/k/down_proj).
  quant_save writes its dequantized view, its compressed-tensors export and its GGUF, and verifies each export
  bit-exact against the store. vLLM serves the view (BF16 GEMMs) and the export (WNA16 int4 kernels): the same
  weights, so where their per-sample answers differ, the cause is kernel arithmetic (`agreement`);
* the GGUF of the same store (Q4_0/Q8_0 of our codes) scored by llama-perplexity against the teacher's BF16 GGUF;
* an optional comparison recipe (SMOKE_COMPARE_RECIPE; the MoE smoke: the reference clip) built and evaluated
  as its own row.

Pure functions (rows, agreement, throughput) first; the file reads and the commands after.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from smoke_plan import QUANT_KNOBS, REPO_ROOT, SmokeConfig, SmokeError, recipe_slug

CT_DIR = "compressed-tensors"  # export_run.EXPORT_DIRS: where quant_save writes each export inside the build
GGUF_FILE = "gguf/model.gguf"
KERNEL_WHY = ("both serve the same store, verified bit-exact, so a difference is kernel arithmetic: vLLM casts the "
              "export's scales to bf16 and runs int4 WNA16 GEMMs, the view holds bf16(code x fp16 scale) for BF16 "
              "GEMMs; greedy decoding of a 135M model turns such small logit differences into other tokens")


@dataclass(frozen=True)
class Row:
    """One extra row of the smoke table: a model dir vLLM serves, and where it came from."""

    key: str  # ship-dequant | ship-ct | compare
    label: str
    build: str  # the quant_save output dir
    model: str  # the dir vLLM loads
    tag: str
    served_as: str
    paired_with: str | None = None  # the row whose per-sample answers this one is checked against
    may_fall_back: bool = False  # a failure to serve is shown (error line + note) instead of failing the smoke


# ----------------------------------------------------------------------------------------- pure parts
def ship_config(cfg: SmokeConfig) -> SmokeConfig:
    """The shipped int4 store's recipe (see the module docstring)."""
    return dataclasses.replace(cfg, expert_bits=4.0, linear_bits=4.0, group=cfg.ship_group, bits_plan="")


def ship_emit(cfg: SmokeConfig) -> str:
    """quant_save --emit for the ship store: the view (vLLM's dequantized row, and llama.cpp's converter reads it
    for the GGUF's metadata) plus the requested exports."""
    return ",".join(["dequant", *cfg.ship_exports])


def plan_rows(cfg: SmokeConfig, compare_cfg: SmokeConfig | None, work: Path, slug: str, base_tag: str) -> list[Row]:
    """Pure: the extra rows of this run, in table order."""
    rows = []
    if cfg.ship_exports:
        scfg = ship_config(cfg)
        name = recipe_slug(scfg, cfg.kind) + "-ship"
        build = work / f"{slug}_{name}"
        rows.append(Row("ship-dequant", "int4 store: dequantized view", str(build), str(build),
                        f"{base_tag}_{name}", "dequantized BF16 safetensors"))
        if "compressed-tensors" in cfg.ship_exports:
            rows.append(Row("ship-ct", "int4 store: compressed-tensors W4A16", str(build),
                            str(build / CT_DIR), f"{base_tag}_{name}-ct", "compressed-tensors pack-quantized",
                            paired_with="ship-dequant", may_fall_back=cfg.kind == "moe"))
    if compare_cfg is not None:
        name = recipe_slug(compare_cfg, cfg.kind)
        build = work / f"{slug}_{name}"
        rows.append(Row("compare", f"comparison: {Path(cfg.compare_recipe).stem} ({compare_cfg.method})",
                        str(build), str(build), f"{base_tag}_{name}", "dequantized BF16 safetensors"))
    return rows


def agreement(a: Sequence[Mapping], b: Sequence[Mapping]) -> dict:
    """Per-sample comparison of two evaluations of the same samples (vllm_eval8's jsonl records): how many give
    the same text, the same extracted answer, the same verdict; and every sample whose answer differs."""
    by_id = {s["id"]: s for s in b}
    common = [s for s in a if s["id"] in by_id]
    if not common:
        raise ValueError("the two evaluations share no sample ids")
    differ = []
    same_text = same_answer = same_verdict = 0
    for s in common:
        t = by_id[s["id"]]
        same_text += s.get("output") == t.get("output")
        same_answer += s.get("extracted") == t.get("extracted")
        same_verdict += bool(s.get("correct")) == bool(t.get("correct"))
        if s.get("extracted") != t.get("extracted"):
            out_a, out_b = s.get("output") or "", t.get("output") or ""
            at = next((i for i, (x, y) in enumerate(zip(out_a, out_b)) if x != y), min(len(out_a), len(out_b)))
            differ.append({"id": s["id"], "bench": s.get("bench"), "answer_a": s.get("extracted"),
                           "answer_b": t.get("extracted"), "correct_a": bool(s.get("correct")),
                           "correct_b": bool(t.get("correct")), "text_differs_at_char": at})
    return {"n": len(common), "same_text": same_text, "same_answer": same_answer, "same_verdict": same_verdict,
            "differ": differ}


def gen_tok_s(doc: Mapping, samples: Sequence[Mapping]) -> float | None:
    """Generated tokens per second of generation wall (vLLM's batched greedy run; init and grading excluded)."""
    gen_s = (doc.get("timing") or {}).get("generate_s")
    tokens = sum(int(s.get("tokens") or 0) for s in samples)
    return tokens / gen_s if gen_s and tokens else None


def gguf_types(map_doc: Mapping) -> dict:
    """{GGUF type: tensor count} of the export's tensor map (tensors kept dense included, with their reason)."""
    counts: dict = {}
    for entry in map_doc.values():  # gguf_export's map: GGUF tensor name -> {type, store, rows, dense_because}
        counts[str(entry["type"])] = counts.get(str(entry["type"]), 0) + 1
    return dict(sorted(counts.items()))


# -------------------------------------------------------------------------------------------- I/O
def read_samples(path: Path) -> list[dict]:
    """The per-sample records of a vllm_eval8 jsonl (the header line skipped)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            rec = json.loads(line)
            if "id" in rec:
                out.append(rec)
    return out


def compare_config(cfg: SmokeConfig, recipe: str, environ: Mapping[str, str] | None = None) -> SmokeConfig:
    """The smoke config with every quant knob from `recipe` (a configs/*.env quant recipe), the seed's default
    for a knob it does not set: the comparison row is that recipe, not a blend with the smoke's own."""
    import quant_config
    import tool_config

    path = Path(recipe) if Path(recipe).is_absolute() else REPO_ROOT / recipe
    if not path.is_file():
        raise SmokeError(f"SMOKE_COMPARE_RECIPE={recipe}: no such file; fix: a configs/*.env quant recipe, or empty")
    try:
        values = tool_config.read_recipe(path, environ if environ is not None else {})
        known = {f.name.upper() for f in dataclasses.fields(quant_config.QuantConfig)}
        unknown = sorted(k for k in values if k not in known)
        if unknown:
            raise SmokeError(f"{recipe}:{values[unknown[0]][1]}: unknown quant key(s) {unknown}")
        fields = {f.name: f for f in dataclasses.fields(SmokeConfig)}
        seed = SmokeConfig()
        knobs = {k: getattr(seed, k) for k in QUANT_KNOBS}
        knobs.update({k: tool_config.convert(fields[k], values[k.upper()][0], f"{recipe} {k.upper()}")
                      for k in QUANT_KNOBS if k.upper() in values})
    except (tool_config.ConfigError, ValueError) as e:
        raise SmokeError(str(e)) from None
    return dataclasses.replace(cfg, **knobs)


def gguf_base_cmd(teacher_dir: Path, out: Path) -> list:
    """llama.cpp's converter on the teacher: the BF16 GGUF the shipped GGUF is scored against (same converter,
    same router type as gguf_export's own conversion of the view)."""
    import gguf_export

    return gguf_export.converter_cmd(teacher_dir, out)


def gguf_fidelity_cmd(base: Path, student: Path, text_file: Path, ctx: int, chunks: int, out: Path) -> list:
    """llamacpp_fidelity on the fidelity text (held out: calibration is pydoc text), `chunks` windows of `ctx`:
    moe_eval's window count on the same text, so llama-perplexity is never asked for more than the text holds
    (it would silently score fewer, and the record would count the asked-for ones)."""
    return [sys.executable, "-m", "llamacpp_fidelity", "--base", base, "--student", f"ours={student}",
            "--text-file", text_file, "--ctx", ctx, "--chunks", chunks, "--out", out]


def export_record(meta: Mapping, name: str) -> dict:
    """What the table says about one export of a build: bytes, and the verifier's verdict from its meta."""
    rec = (meta.get("exports") or {}).get(name)
    if not rec:
        raise SmokeError(f"the ship build's _ptq_meta.json records no {name} export (quant_save --emit {name} "
                         f"did not run)", step="quantize-ship")
    files = rec.get("files") or {}
    return {"bytes": sum(int(f.get("bytes") or 0) for f in files.values()), "verified": rec.get("verified"),
            "dir": rec.get("name")}


def row_records(rows: Sequence[Row], docs: Mapping, errors: Mapping, metas: Mapping, teacher_doc: Mapping,
                fid_doc: Mapping, eval_dir: Path, results: Path) -> list[dict]:
    """Each extra row as the summary records it: its eval (or the error that stopped vLLM serving it), the paired
    comparison with the teacher, the per-sample agreement with its pair, gen tok/s, its fidelity student and the
    export's bytes and verdict."""
    import os

    import results_compare

    students = {s["dir"]: i for i, s in enumerate(fid_doc.get("students") or [])}
    samples = {r.key: read_samples(eval_dir / f"{r.tag}.jsonl") for r in rows if r.key in docs}
    teacher = read_samples(eval_dir / f"{teacher_doc['tag']}.jsonl")
    out = []
    for r in rows:
        doc, meta = docs.get(r.key), metas.get(r.build) or {}
        rec = {**dataclasses.asdict(r), "eval": os.path.relpath(eval_dir / f"{r.tag}.json", results) if doc else None,
               "error": errors.get(r.key), "recipe": meta.get("recipe"),
               "footprint_total": (meta.get("footprint") or {}).get("total"),
               # moe_eval scores a build's weights in torch; the export's are the view's (verified), so it has none
               "fidelity_student": None if r.key == "ship-ct" else students.get(r.build), "comparison": None, "agreement": None, "gen_tok_s": None,
               "export": export_record(meta, "compressed-tensors") if r.key == "ship-ct" else None}
        if doc:
            try:
                rec["comparison"] = results_compare.compare_results(teacher_doc, doc)
            except (results_compare.UnpairedError, ValueError) as e:
                raise SmokeError(f"teacher and {r.label} cannot be paired: {e}", step="compare", code=1) from None
            rec["gen_tok_s"] = gen_tok_s(doc, samples[r.key])
            if r.paired_with in samples:
                scale = agreement(teacher, samples[r.paired_with])  # what a change of weights does, for scale
                rec["agreement"] = {"with": r.paired_with, **agreement(samples[r.paired_with], samples[r.key]),
                                    "why": KERNEL_WHY, "teacher_vs_pair_same_answer": scale["same_answer"]}
        out.append(rec)
    return out


def run_gguf_fidelity(teacher_dir: Path, build: Path, meta: Mapping, cfg: SmokeConfig, fid_doc: Mapping, work: Path,
                      out: Path, results: Path, run, log) -> dict:
    """The ship build's GGUF against the teacher's BF16 GGUF (converted once per teacher, cached in the work dir)
    in llama-perplexity; returns the summary's `gguf` record."""
    import os

    text = Path(fid_doc["text"].get("path") or "")  # the file moe_eval scored (none for a teacher sample)
    record = {**export_record(meta, "gguf"), "file": str(build / GGUF_FILE)}
    map_path = build / (GGUF_FILE + ".map.json")
    record["types"] = gguf_types(json.loads(map_path.read_text(encoding="utf-8")))
    if fid_doc["text"].get("kind") != "file" or not text.is_file():
        why = f"the fidelity text is {fid_doc['text'].get('kind')}, not a file llama-perplexity can read"
        log(f"[smoke] gguf-fidelity: {why}; the GGUF is not scored")
        return {**record, "fidelity": None, "skipped": why}
    base = work / "gguf" / f"{teacher_dir.name}.BF16.gguf"
    if not base.is_file():
        base.parent.mkdir(parents=True, exist_ok=True)
        partial = base.with_name(base.name + ".partial")
        partial.unlink(missing_ok=True)
        import gguf_source

        source = teacher_dir  # the tokenizer fix gguf_export applies to the view, so both GGUFs tokenize alike
        if gguf_source.tokenizer_conflict(teacher_dir):
            source = gguf_source.byte_level_bpe_view(teacher_dir, base.parent / (teacher_dir.name + "-bpe-view"))
        run("gguf-base", gguf_base_cmd(source, partial))
        os.replace(partial, base)  # only a finished conversion is reused
    windows = fid_doc["text"]
    run("gguf-fidelity", gguf_fidelity_cmd(base, build / GGUF_FILE, text, windows["ctx"], windows["n_windows"], out))
    if not out.is_file():
        raise SmokeError(f"llamacpp_fidelity wrote no {out}", step="gguf-fidelity", code=1)
    return {**record, "base": str(base), "base_bytes": base.stat().st_size,
            "fidelity": os.path.relpath(out, results), "skipped": None}
