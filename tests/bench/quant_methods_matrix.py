"""Quantization methods on the embedded SmolLM2: file bits per weight against KL(BF16 teacher || student),
our methods (clip, rtn, wclip, gptq, awq at int3/int4 body, embedding at 4/8 bits, groups 128/64/32, grids
sym/full/asym) next to llama.cpp's Q3_K_M, IQ3 recipe, Q4_K_M and Q4_0, every one built and measured in
this run on the same held-out windows.

Text: CPython's pydoc topics (offline, reproducible): odd-numbered topics calibrate (our methods, and the
imatrix of every GGUF: the same first --calib-tokens tokens), even-numbered ones are evaluated. Every
student is scored on the same --chunks windows of --ctx llama.cpp token ids: the GGUFs by llama-perplexity
(2nd half of each window, its own KL), ours by moe_eval (every position) AND, from the same forward, over
llama-perplexity's positions (tests/bench/quant_methods_kl.py): that KL is the one compared. Two of our
checkpoints are also converted to BF16 GGUFs and scored by llama-perplexity, to show both tools agree.
Bits per weight count every tensor (a tied embedding once): ours from `_ptq_meta.json`'s footprint,
GGUFs from their file.

Rows run in `configs()` order (cheap first) and each is written to the JSON as soon as it is scored: a
killed run resumes (complete builds are reused by quant_save, scored rows are kept while the build's
output hash and the windows are unchanged).

Writes results/quant_methods/smollm2_methods.json, results/quant_methods/smollm2_pareto.png and the table
between the markers in docs/QUANTIZE.md (all regenerated from the JSON: `--report-only`).

    python tests/bench/quant_methods_matrix.py [--only NAME,NAME] [--skip-gguf] [--rescore] [--calib-tokens 8192] [--report-only]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import bench_paths  # tests/bench/ is on the path of a script run from it

ROOT = bench_paths.use_project_modules()
BENCH = bench_paths.BENCH

import atomic_io  # noqa: E402
import cache_paths  # noqa: E402
import calib_source  # noqa: E402
import embedded_model  # noqa: E402
import provenance  # noqa: E402
import quant_methods_report as report_mod  # noqa: E402
from recipe_env import recipe_from_env  # noqa: E402

OUT_JSON = ROOT / "results" / "quant_methods" / "smollm2_methods.json"
OUT_PNG = ROOT / "results" / "quant_methods" / "smollm2_pareto.png"
DOC = ROOT / "docs" / "QUANTIZE.md"
SCHEMA = "moe-lowbit/quant-methods/v2"
GGUF_POINTS = ("Q3_K_M", "IQ3_XXS", "Q4_K_M", "Q4_0")  # IQ3_XXS base type = the IQ3 recipe (configs/gguf.env)
SMOKE_RECIPE = ROOT / "configs" / "smoke.env"  # the main job's recipe, measured as one more row
STOCK_MIX = {"Q4_K_M": "q4_k", "Q4_0": "q4_0"}  # packed with llama-quantize's own mix (no recipe rules)
AGREEMENT = ("clip_int4_g128_emb8", "gptq_int4_g128_emb8")  # also scored by llama-perplexity
CALIBRATED = ("wclip", "gptq", "awq")


def _cfg(method: str, bits: int, group: int = 128, emb: int = 8, grid: str = "sym") -> tuple[str, dict]:
    name = f"{method}_int{bits}_g{group}_emb{emb}" + ("" if grid == "sym" else f"_{grid}")
    return name, dict(method=method, linear_bits=float(bits), group=group, grid=grid, role_bits=f"embed={emb}")


def configs() -> list[tuple[str, dict]]:
    """(name, quant_save options) of every build, in run order: what the acceptance needs first (clip and
    gptq at int4/int3 g128, 8-bit embedding; a clip build takes ~40 s, a gptq one many minutes on the
    shared 2-core box), then the uncalibrated rest (cheap), then the rest of the calibrated matrix. The body is every linear (SmolLM2 is dense); the tied embedding is role `embed`."""
    rows = [_cfg("clip", 4), _cfg("clip", 3), _cfg("gptq", 4), _cfg("gptq", 3), _cfg("rtn", 4), _cfg("rtn", 3)]
    for bits in (4, 3):
        rows += [_cfg("clip", bits, group=32), _cfg("clip", bits, group=64), _cfg("clip", bits, emb=4)]
    rows += [_cfg("rtn", bits, emb=4) for bits in (4, 3)]
    rows += [_cfg("clip", bits, grid=grid) for bits in (3, 4) for grid in ("full", "asym")]
    rows += [_cfg(m, bits) for m in ("wclip", "awq") for bits in (4, 3)]
    rows += [_cfg("gptq", bits, group=g) for g in (32, 64) for bits in (4, 3)]
    rows += [_cfg("gptq", 4, emb=4), _cfg("gptq", 3, emb=4)]
    rows += [_cfg("gptq", bits, grid=grid) for bits in (3, 4) for grid in ("full", "asym")]
    rows += [_cfg(m, bits, group=g) for m in ("rtn", "wclip", "awq") for g in (64, 32) for bits in (4, 3)]
    rows += [_cfg(m, bits, emb=4) for m in ("wclip", "awq") for bits in (4, 3)]
    # the shipped smoke recipe, and the same with its plan's embedding back at 8 bits (does it reach Q4_K_M?)
    return rows + [recipe_row(SMOKE_RECIPE),
                   recipe_row(SMOKE_RECIPE, "embed8", plan_overrides={"model.embed_tokens.weight": 8})]


def recipe_row(path: Path, variant: str = "", plan_overrides: dict | None = None) -> tuple[str, dict]:
    """A shipped recipe as one row, with its own group, grid, clip search, role bits and bits plan (the
    calibration stays the bench's: the same text and tokens as every calibrated row and the imatrix), so the
    table places what the main job ships among the matrix and the llama.cpp points. A variant changes some of
    the plan's tensors (`plan_overrides`, recorded in the row's options) and is named
    `recipe_<stem>+<variant>`."""
    r = recipe_from_env(path)
    if r["calib"] != "pydoc-topics" or r["calib_ctx"] != 512:
        raise SystemExit(f"quant_methods: {path} calibrates on {r['calib']} (ctx {r['calib_ctx']}); this bench's "
                         f"calibration text is pydoc-topics at ctx 512")
    opts = {k: r[k] for k in ("method", "linear_bits", "group", "grid", "role_bits", "act_order", "clip_steps",
                              "clip_lo")}
    if r["bits_plan"]:
        opts["bits_plan"] = r["bits_plan"]  # repo-relative, as the recipe writes it (build_one resolves it)
    if plan_overrides:
        if not r["bits_plan"]:
            raise SystemExit(f"quant_methods: {path} has no BITS_PLAN for the variant {variant!r} to change")
        opts["plan_overrides"] = dict(sorted(plan_overrides.items()))
    return f"recipe_{path.stem}" + (f"+{variant}" if variant else ""), opts


def build_plan_file(work: Path, name: str, opts: dict) -> Path | None:
    """The plan a row builds from: the recipe's own file, or (a variant) a copy with its overrides applied."""
    if not opts.get("bits_plan"):
        return None
    plan = ROOT / opts["bits_plan"]
    if not opts.get("plan_overrides"):
        return plan
    doc = json.loads(plan.read_text())
    unknown = sorted(set(opts["plan_overrides"]) - set(doc["tensors"]))
    if unknown:
        raise SystemExit(f"quant_methods: {name}: plan_overrides name tensors {plan} does not plan: {unknown}")
    doc["tensors"] = {**doc["tensors"], **opts["plan_overrides"]}
    doc["strategy"] = f"{doc.get('strategy')}; variant {name}: {opts['plan_overrides']}"
    out = work / f"{name}.plan.json"
    atomic_io.write_text(out, json.dumps(doc, indent=1) + "\n")
    return out


def step(msg: str) -> None:
    print(f"[quant_methods] {msg}", file=sys.stderr, flush=True)


def build_one(teacher: Path, work: Path, name: str, opts: dict, calib_tokens: int) -> tuple[dict, float]:
    """quant_save.build of one row (a complete identical build in its OUT is reused at once)."""
    import quant_save

    calib = {"calib": "pydoc-topics", "calib_tokens": calib_tokens, "calib_ctx": 512} \
        if opts["method"] in CALIBRATED else {}
    plan_file = build_plan_file(work, name, opts)
    plan = {"bits_plan": str(plan_file)} if plan_file else {}
    build_opts = {k: v for k, v in opts.items() if k != "plan_overrides"}
    t0 = time.perf_counter()
    meta = quant_save.build({"model": str(teacher), "out": str(work / name), "progress": False, "force": True,
                             "clip_steps": 16, **build_opts, **calib, **plan})
    return meta, time.perf_counter() - t0


def stock_mix_recipe(work: Path, base: str) -> Path:
    """A recipe that leaves llama-quantize's own mix for `base`: gguf_pack refuses an empty recipe, so its one
    rule names routed experts, which a dense model has none of (gguf_pack notes it applies to nothing)."""
    path = work / f"stock_mix_{base}.txt"
    path.write_text(f"# llama-quantize's own {base} mix: this rule applies to no tensor of a dense model\n"
                    f"ffn_(gate|up|down)_exps={STOCK_MIX[base]}\n")
    return path


def pack_ggufs(work: Path, calib: Path, prefix: Path, imatrix_chunks: int, ctx: int) -> dict:
    """Every llama.cpp point by pipelines/pack_gguf.sh, one imatrix (imatrix_chunks x ctx tokens of calib)."""
    out = {}
    for base in GGUF_POINTS:
        env = {"MODEL": "embedded:smollm2", "OUT": str(work / "gguf"), "NAME": "smollm2", "BASE_TYPE": base,
               "CALIB_FILE": str(calib), "IMATRIX_CHUNKS": str(imatrix_chunks), "IMATRIX_CTX": str(ctx),
               "LLAMA_CPP": str(prefix), "THREADS": str(os.cpu_count())}
        if base in STOCK_MIX:
            env["TENSOR_TYPES"] = str(stock_mix_recipe(work, base))
        step(f"pack {base}")
        t0 = time.perf_counter()
        proc = subprocess.run(["bash", "pipelines/pack_gguf.sh"], env={**os.environ, **env}, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            step(f"pack {base} failed: {proc.stderr.strip().splitlines()[-3:]}")
            continue
        meta = json.loads((work / "gguf" / f"smollm2-{base}.meta.json").read_text())
        out[base] = {"gguf": str(work / "gguf" / f"smollm2-{base}.gguf"), "bits_per_weight": meta["bits_per_weight"],
                     "bits_per_weight_without_embed_output": meta["bits_per_weight_without_embed_output"],
                     "recipe": (meta.get("recipe") or {}).get("path"), "type_counts": meta.get("type_counts"),
                     "llama_quantize_fallbacks": meta.get("llama_quantize_fallbacks"),
                     "pack_s": time.perf_counter() - t0}
    return out


def hf_to_gguf(model_dir: Path, out: Path, prefix: Path, work: Path) -> Path:
    """A checkpoint as a BF16 GGUF with llama.cpp's own converter (through the byte-level BPE view when the
    embedded tokenizer needs it, as pack_gguf does)."""
    import gguf_source

    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tree = prefix / "llama.cpp"
    view = work / f"{model_dir.name}-bpe-view"
    src = gguf_source.byte_level_bpe_view(model_dir, view) if gguf_source.tokenizer_conflict(model_dir) else model_dir
    part = out.with_suffix(".part")
    subprocess.run([sys.executable, str(tree / "convert_hf_to_gguf.py"), str(src), "--outtype", "bf16", "--outfile",
                    str(part)], check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "PYTHONPATH": f"{tree / 'gguf-py'}:{os.environ.get('PYTHONPATH', '')}"})
    part.rename(out)
    return out


def llamacpp_ids(prefix: Path, bf16: Path, text: str, n: int) -> list[int]:
    """The token ids llama-perplexity reads (llama.cpp's tokenizer via llama-server /tokenize; no BOS for
    this vocabulary, so chunk i is ids [i*ctx, (i+1)*ctx))."""
    import urllib.request

    import llamacpp_server

    scfg = llamacpp_server.ServerConfig(binary=llamacpp_server.find_binary(prefix), model=bf16, ctx_size=512, threads=1)
    with llamacpp_server.LlamaServer(scfg) as server:
        req = urllib.request.Request(server.base_url + "/tokenize", method="POST",
                                     data=json.dumps({"content": text, "add_special": False}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.loads(r.read())["tokens"][:n]


def llamacpp_stage(prefix: Path, bf16: Path, ggufs: dict, ours: dict, evalf: Path, ctx: int, chunks: int,
                   work: Path) -> dict:
    """llama-perplexity KL of the GGUFs and of some of our checkpoints (as BF16 GGUFs), one base run."""
    import llamacpp_server
    import llamacpp_fidelity

    students = {b: Path(g["gguf"]) for b, g in ggufs.items()}
    for name, path in ours.items():
        students[f"ours:{name}"] = hf_to_gguf(Path(path), work / "gguf" / f"{name}-BF16.gguf", prefix, work)
    step(f"llama-perplexity: {', '.join(students)}")
    binary = llamacpp_server.find_binary(prefix, "llama-perplexity")
    return llamacpp_fidelity.run_fidelity(binary, bf16, students, evalf, ctx, chunks, os.cpu_count(), work / "kld")


def score_row(student_dir: Path, windows, cache, cfg) -> dict:
    """moe_eval's every-position figures and the KL over llama-perplexity's positions, one forward."""
    import moe_eval
    import fidelity_cache
    import quant_methods_kl

    model = moe_eval.load_hf_model(student_dir, cfg)
    tap = quant_methods_kl.PositionTap(moe_eval.hf_logits_fn(model), windows, cache, cfg,
                                       quant_methods_kl.lp_first_position(cfg.ctx))
    s = moe_eval.score_student(tap, windows, cache, cfg, student_dir.name)
    del model
    gc.collect()
    return {"all": s, "lp": tap.summary(cfg.z)}


def row_record(name: str, opts: dict, meta: dict, wall: float, scores: dict) -> dict:
    import quant_save
    import build_record

    fp = meta["footprint"]
    body = {r: v for r, v in fp["roles"].items() if r not in ("embed", "lm_head")}
    body_params = sum(v["params"] for v in body.values())
    s, lp = scores["all"], scores["lp"]
    calib = meta.get("calibration") or {}
    return {"options": opts, "bpw": fp["total"]["effective_bits"],
            "bpw_body": sum(v["effective_bits"] * v["params"] for v in body.values()) / body_params,
            "kl_lp_positions": lp["kl_mean"], "kl_lp_positions_stderr": lp["kl_mean_stderr"],
            "kl": s["kl_mean"], "kl_stderr": s["kl_mean_stderr"], "top1": s["top1_agree"],
            "ppl_ratio": s["ppl_ratio"], "n_scored_all": s["n_scored_tokens"], "n_scored_lp": lp["n_scored_tokens"],
            "wall_s": meta["timings"]["total_seconds"], "bench_wall_s": wall, "calibration_s": meta["timings"].get("calibration_seconds"),
            "calib_tokens": calib.get("tokens"), "calib_tokens_sha256": calib.get("tokens_sha256"),
            "proxy_total": calib.get("proxy_total"), "proxy_total_clip": calib.get("proxy_total_clip"),
            "methods_applied": meta.get("methods_applied"), "build_sha256": build_record.output_sha256(meta),
            "quantizer_sha256": meta.get("quantizer_sha256"), "git_sha": provenance.git_sha(),
            "measured_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "load_avg": list(os.getloadavg())}


def report(doc: dict) -> None:
    text = report_mod.table(doc)
    print(text)
    report_mod.plot(doc, OUT_PNG)
    report_mod.write_doc_block(DOC, text)


def save(doc: dict, plan: list) -> None:
    doc["not_measured"] = [n for n, _ in plan if n not in doc["ours"]]
    atomic_io.write_text(OUT_JSON, provenance.redact(json.dumps(doc, indent=1, default=str)) + "\n")
    report(doc)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma list of build names (default: all, in configs() order)")
    ap.add_argument("--list", action="store_true", help="print the build names in run order and exit")
    ap.add_argument("--skip-gguf", action="store_true", help="no llama.cpp points (keeps those already in the JSON)")
    ap.add_argument("--rescore", action="store_true",
                    help="score the selected rows again even when their build is unchanged (e.g. rows scored on "
                         "another machine: the build bytes match, the scoring forward's kernels may not)")
    ap.add_argument("--calib-tokens", type=int, default=8192,
                    help="calibration tokens for our methods AND the imatrix (default 8192 = 16 x 512)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=16, help="evaluation windows of --ctx tokens")
    ap.add_argument("--work", default=None, help="scratch dir (default $MOE_LOWBIT_CACHE/bench-quant-methods)")
    ap.add_argument("--report-only", action="store_true", help="regenerate the PNG and the docs table from the JSON")
    args = ap.parse_args(argv)
    plan = configs()
    if args.list:
        print("\n".join(n for n, _ in plan))
        return 0
    if args.report_only:
        report(json.loads(OUT_JSON.read_text()))
        return 0
    names = set(filter(None, args.only.split(",")))
    unknown = names - {n for n, _ in plan}
    if unknown:
        print(f"quant_methods: unknown build names {sorted(unknown)} (see --list)", file=sys.stderr)
        return 2
    if args.ctx != 512 or args.calib_tokens % args.ctx:
        print("quant_methods: --ctx must be 512 (the calibration ctx) and --calib-tokens a multiple of it", file=sys.stderr)
        return 2

    import torch

    import llamacpp_server
    import moe_eval
    import fidelity_cache
    import quant_save
    import build_record

    cache_root = cache_paths.cache_root()
    work = Path(args.work) if args.work else cache_root / "bench-quant-methods"
    work.mkdir(parents=True, exist_ok=True)
    calib_text, eval_text = calib_source.pydoc_split()
    calib, evalf = work / "calib.txt", work / "eval.txt"
    calib.write_text(calib_text, encoding="utf-8")
    evalf.write_text(eval_text, encoding="utf-8")
    teacher = embedded_model.smollm2_bf16_dir()
    prefix = llamacpp_server.default_prefix(ROOT)
    imatrix_chunks = args.calib_tokens // args.ctx

    # 1. llama.cpp points (packed in this run, same calibration text) and the BF16 GGUF whose token ids
    # every student is scored on
    ggufs = {} if args.skip_gguf else pack_ggufs(work, calib, prefix, imatrix_chunks, args.ctx)
    bf16 = work / "gguf" / "smollm2-BF16.gguf"
    if not bf16.is_file():
        hf_to_gguf(teacher, bf16, prefix, work)
    n_tok = args.ctx * args.chunks
    ids = llamacpp_ids(prefix, bf16, eval_text, n_tok)
    if len(ids) < n_tok:
        raise SystemExit(f"quant_methods: the evaluation text has {len(ids)} tokens, fewer than {n_tok}")
    cfg = moe_eval.FidelityConfig(ctx=args.ctx, max_tokens=n_tok, device="cpu", add_bos=False)
    windows = moe_eval.TokenWindows(torch.tensor(ids, dtype=torch.int64).reshape(args.chunks, args.ctx),
                                    {"kind": "llama.cpp /tokenize", "path": str(evalf),
                                     "sha256": provenance.sha256_file(evalf)})
    text = {"kind": "llama.cpp /tokenize", "tokens_sha256": windows.sha256, "n_windows": args.chunks, "ctx": args.ctx,
            "n_scored_all": windows.n_scored, "n_scored_lp": args.chunks * (args.ctx - 1 - args.ctx // 2),
            "eval_text_sha256": provenance.sha256_file(evalf), "calib_text_sha256": provenance.sha256_file(calib)}

    old = json.loads(OUT_JSON.read_text()) if OUT_JSON.is_file() else {}
    same = (old.get("schema") == SCHEMA and old.get("text", {}).get("tokens_sha256") == text["tokens_sha256"]
            and old.get("calib_tokens") == args.calib_tokens)
    doc = {"schema": SCHEMA, "provenance": provenance.record(argv=sys.argv), "calib_tokens": args.calib_tokens,
           "imatrix_chunks": imatrix_chunks, "text": text,
           "measured_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "ours": old.get("ours", {}) if same else {}, "llamacpp": old.get("llamacpp", {}) if same else {},
           "agreement": old.get("agreement", {}) if same else {}, "loadavg_start": list(os.getloadavg())}

    cache = fidelity_cache.build_teacher_cache(lambda: moe_eval.hf_logits_fn(moe_eval.load_hf_model(teacher, cfg)),
                                         moe_eval.model_identity(teacher), windows, cfg)
    lp_done = False

    def run_llamacpp(ours_ready: dict) -> None:
        lp = llamacpp_stage(prefix, bf16, ggufs if not lp_done else {}, ours_ready, evalf, args.ctx, args.chunks, work)
        for s in lp["students"]:
            if s["name"].startswith("ours:"):
                name = s["name"][5:]
                doc["agreement"][name] = {"kl_llama_perplexity": s["kl_mean"],
                                          "kl_llama_perplexity_stderr": s["kl_mean_stderr"],
                                          "kl_moe_eval_lp_positions": doc["ours"][name]["kl_lp_positions"],
                                          "kl_moe_eval_all": doc["ours"][name]["kl"],
                                          "build_sha256": doc["ours"][name]["build_sha256"]}
            else:
                doc["llamacpp"][s["name"]] = {**ggufs[s["name"]], "kl": s["kl_mean"], "kl_stderr": s["kl_mean_stderr"],
                                              "top1": s["top1_agree"], "ppl_ratio": s["ppl_ratio"],
                                              "n_scored": s["n_scored_tokens"],
                                              "measured_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        doc["llamacpp_perplexity_commands"] = lp["provenance"].get("commands")

    for name, opts in plan:
        if names and name not in names:
            continue
        step(f"build {name} (load {os.getloadavg()[0]:.1f})")
        meta, wall = build_one(teacher, work, name, opts, args.calib_tokens)
        prev = doc["ours"].get(name)
        if prev and prev.get("build_sha256") == build_record.output_sha256(meta) and prev.get("options") == opts and not args.rescore:
            step(f"{name}: scored before on these windows, kept")
        else:
            scores = score_row(work / name, windows, cache, cfg)
            doc["ours"][name] = row_record(name, opts, meta, wall, scores)
            doc["agreement"].pop(name, None)  # measured on an older build
            r = doc["ours"][name]
            step(f"{name}: {r['bpw']:.3f} bpw, KL lp-pos {r['kl_lp_positions']:.4f}, all {r['kl']:.4f}, "
                 f"build {wall:.0f} s")
        ready = {n: work / n for n in AGREEMENT if n in doc["ours"] and n not in doc["agreement"]}
        if (ggufs and not lp_done) or (ready and name in AGREEMENT):
            run_llamacpp(ready)
            lp_done = True
        save(doc, plan)
    if ggufs and not lp_done:
        run_llamacpp({})
    doc["loadavg_end"] = list(os.getloadavg())
    save(doc, plan)
    print(f"wrote {OUT_JSON}, {OUT_PNG}, table in {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
