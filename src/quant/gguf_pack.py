"""The CLI that gguf_run.py (pipelines/pack_gguf.sh) calls between llama.cpp's tools, and the meta JSON of a packed GGUF.

gguf_run.py runs the llama.cpp tools; the decisions live in two modules beside this one, so that a typo
in a recipe, a missing imatrix or a dequantized input fails *before* an hour of conversion:
  - gguf_types.py: the recipe language and the type llama-quantize will give each tensor (pure);
  - gguf_source.py: checks and flags for the source checkpoint (PTQ input, tokenizer, MTP, hub/embedded).
The meta JSON says what the file really holds (types read back with gguf-py, not what we asked for).

CLI (used by gguf_run.py; every subcommand has --help):
    python -m gguf_pack check-input MODEL_DIR [--force]
    python -m gguf_pack check-tokenizer MODEL_DIR          (and: bpe-view SRC DST, the fix it names)
    python -m gguf_pack converter-flags MODEL_DIR --mtp drop|keep --tree LLAMA_CPP_TREE
    python -m gguf_pack tensor-types --recipe R --gguf BF16.gguf --base-type IQ3_XXS --out types.txt [--imatrix F]
    python -m gguf_pack meta --gguf OUT.gguf --source BF16.gguf --recipe R --base-type T --commands C --out M.json
    python -m gguf_pack fresh FILE --value K=V --file K=PATH --checkpoint K=DIR   (0: reuse; 1: stale, removed)
    python -m gguf_pack record FILE --value K=V ...                              (after FILE is complete)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Mapping, Sequence

import atomic_io
import gguf_intermediates
import gguf_source
import gguf_types
from gguf_types import PackError, RecipeError, TensorInfo


# ------------------------------------------------------------------------------------------------ I/O
def read_gguf_tensors(path: Path, gguf_module=None) -> list[TensorInfo]:
    gguf = gguf_module or gguf_types.import_gguf()
    reader = gguf.GGUFReader(str(path))
    return [TensorInfo(t.name, t.tensor_type.name.lower(), tuple(int(x) for x in t.shape), int(t.n_elements),
                       int(t.n_bytes)) for t in reader.tensors]


def read_commands(path: Path | None) -> list[dict]:
    if path is None or not Path(path).is_file():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def build_meta(out_gguf: Path, source_gguf: Path, recipe_path: Path, base_type: str, commands_file: Path | None,
               imatrix: Path | None, mmproj: Path | None, quantize_log: Path | None = None,
               extra: Mapping | None = None, argv=None) -> dict:
    """The meta JSON of a packed GGUF: what it holds (read back), what was asked, how it was made."""
    import provenance

    gguf = gguf_types.import_gguf()
    known = gguf_types.ggml_types(gguf)
    recipe_text = Path(recipe_path).read_text()
    rules = gguf_types.parse_recipe(recipe_text, known, gguf_types.known_tensor_names(gguf), str(recipe_path))
    source = read_gguf_tensors(source_gguf, gguf)
    written = read_gguf_tensors(out_gguf, gguf)
    plan = gguf_types.plan_types(source, rules, known)
    meta = {
        "gguf": str(out_gguf),
        "sha256": provenance.sha256_file(Path(out_gguf)),
        "base_type": base_type,
        **gguf_types.summarize(written, Path(out_gguf).stat().st_size),
        **gguf_types.compare(plan, written),
        "llama_quantize_fallbacks": (gguf_types.quantize_log_fallbacks(Path(quantize_log).read_text(errors="replace"))
                                     if quantize_log and Path(quantize_log).is_file() else None),
        "unused_rules": [asdict(r) for r in gguf_types.unused_rules(rules, plan)],
        "recipe": {"path": str(recipe_path), "sha256": provenance.sha256_json(recipe_text),
                   "text": recipe_text, "rules": [asdict(r) for r in rules]},
        "source_gguf": {"path": str(source_gguf), "n_tensors": len(source),
                        "file_bytes": Path(source_gguf).stat().st_size},
        "imatrix": ({"path": str(imatrix), "sha256": provenance.sha256_file(Path(imatrix))}
                    if imatrix and Path(imatrix).is_file() else None),
        "mmproj": ({"path": str(mmproj), "file_bytes": Path(mmproj).stat().st_size,
                    **{k: v for k, v in gguf_types.summarize(read_gguf_tensors(mmproj, gguf),
                                                             Path(mmproj).stat().st_size).items()
                       if k in ("type_counts", "n_params")}}
                   if mmproj and Path(mmproj).is_file() else None),
        "commands": read_commands(commands_file),
        "versions": {"gguf_py": getattr(gguf, "__file__", None),
                     "llama_cpp": os.environ.get("LLAMA_CPP_VERSION"),
                     "llama_cpp_build": os.environ.get("LLAMA_CPP_BUILD_INFO")},
        "tensors": [{"name": t.name, "type": t.type, "shape": list(t.shape)} for t in written],
    }
    meta["provenance"] = provenance.record(argv=argv, **(dict(extra) if extra else {}))
    return meta


# ------------------------------------------------------------- intermediate keys (gguf_intermediates.py)
def _key_from_args(args) -> dict:
    def pairs(items, what):
        out = {}
        for item in items or ():
            name, sep, value = item.partition("=")
            if not sep or not name:
                raise PackError(f"--{what} {item!r} must look like NAME=VALUE")
            out[name] = value
        return out

    return gguf_intermediates.intermediate_key(pairs(args.value, "value"), pairs(args.file, "file"),
                                               pairs(args.checkpoint, "checkpoint"))


def _cmd_fresh(args) -> int:
    """Exit 0 when TARGET may be reused; else say why on stderr, remove the stale file, exit 1."""
    why = gguf_intermediates.stale_reason(Path(args.target), _key_from_args(args))
    if why is None:
        return 0
    print(f"gguf_pack: rebuilding: {why}", file=sys.stderr)
    for p in (Path(args.target), Path(args.target + gguf_intermediates.KEY_SUFFIX)):
        p.unlink(missing_ok=True)
    return 1


def _cmd_record(args) -> int:
    if not Path(args.target).is_file():
        raise PackError(f"cannot record inputs of {args.target}: it does not exist")
    gguf_intermediates.record_key(Path(args.target), _key_from_args(args))
    return 0


# ------------------------------------------------------------------------------------------------ CLI
def _cmd_check_input(args) -> int:
    note = gguf_source.check_input(Path(args.model), force=args.force)
    if note:
        print(f"gguf_pack: WARNING {note}", file=sys.stderr)
    return 0


def _cmd_converter_flags(args) -> int:
    supports = gguf_source.converter_supports_mtp(Path(args.model), Path(args.tree)) if args.tree else False
    print(" ".join(gguf_source.converter_flags(Path(args.model), args.mtp, supports)))
    return 0


def _cmd_tensor_types(args) -> int:
    gguf = gguf_types.import_gguf()
    known = gguf_types.ggml_types(gguf)
    rules = gguf_types.parse_recipe(Path(args.recipe).read_text(), known, gguf_types.known_tensor_names(gguf),
                                    args.recipe)
    plan = gguf_types.plan_types(read_gguf_tensors(Path(args.gguf), gguf), rules, known)
    needs = gguf_types.tensors_needing_imatrix(plan, args.base_type)
    if needs and not (args.imatrix and Path(args.imatrix).is_file()):
        names = ", ".join(f"{p.name} ({p.expected or args.base_type.lower()})" for p in needs[:4])
        raise PackError(f"{len(needs)} tensor(s) get a type that requires an importance matrix, e.g. {names}; "
                        f"imatrix {args.imatrix!r} does not exist. Compute one (CALIB_FILE=..., the imatrix step "
                        "of pack_gguf.sh) or pick types that do not need it (e.g. the Q3_K recipe)")
    for r in gguf_types.unused_rules(rules, plan):
        print(f"gguf_pack: note: {args.recipe}:{r.line} {r.pattern}={r.type} applies to no tensor of this model",
              file=sys.stderr)
    for p in plan:
        if p.fallback_reason:
            print(f"gguf_pack: fallback {p.name}: {p.fallback_reason}", file=sys.stderr)
    atomic_io.write_text(args.out, gguf_types.render_tensor_type_file(rules))
    return 0


def _cmd_check_tokenizer(args) -> int:
    why = gguf_source.tokenizer_conflict(Path(args.model))
    if why:
        raise PackError(f"{why}. Fix the checkpoint's tokenizer.json (byte_fallback false, ByteLevel decoder), "
                        f"e.g. python -m gguf_pack bpe-view {args.model} DIR and pack DIR")
    return 0


def _cmd_bpe_view(args) -> int:
    print(gguf_source.byte_level_bpe_view(Path(args.src), Path(args.dst)))
    return 0


def _cmd_resolve_model(args) -> int:
    print(gguf_source.resolve_model(args.model, args.revision))
    return 0


def _cmd_calib_text(args) -> int:
    # ~4 characters per token, 25% spare so llama-imatrix gets its chunks * ctx tokens
    text = gguf_source.calibration_text(args.dataset, int(args.chunks * args.ctx * 4 * 1.25))
    atomic_io.write_text(args.out, text)
    print(f"gguf_pack: {len(text)} characters of calibration text from {args.dataset} -> {args.out}", file=sys.stderr)
    return 0


def _cmd_log_command(args) -> int:
    """Append one command record (JSONL) for the meta JSON; the command line is redacted."""
    import provenance

    cmd = [provenance.redact(a) for a in args.command if a != "--"]
    rec = {"cmd": cmd, "rc": args.rc, "seconds": args.seconds, "status": args.status,
           "end_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with open(args.file, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")
    return 0


def _cmd_meta(args) -> int:
    meta = build_meta(Path(args.gguf), Path(args.source), Path(args.recipe), args.base_type,
                      Path(args.commands) if args.commands else None,
                      Path(args.imatrix) if args.imatrix else None, Path(args.mmproj) if args.mmproj else None,
                      Path(args.quantize_log) if args.quantize_log else None, argv=sys.argv)
    import provenance

    text = provenance.redact(json.dumps(meta, indent=1, default=str))
    atomic_io.write_text(args.out, text + "\n")
    n_fb = len({f["tensor"] for f in meta["fallbacks"] + (meta["llama_quantize_fallbacks"] or [])})
    print(f"gguf_pack: {args.gguf}: {meta['size_gib']:.3f} GiB, {meta['bits_per_weight']:.3f} bpw, "
          f"types {meta['type_counts']}, {n_fb} tensor(s) fell back", file=sys.stderr)
    if meta["prediction_mismatches"]:
        print(f"gguf_pack: WARNING {len(meta['prediction_mismatches'])} tensor(s) differ from the predicted type: "
              f"{meta['prediction_mismatches'][:3]}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gguf_pack", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("check-input", help="refuse a dequantized PTQ checkpoint unless --force")
    s.add_argument("model")
    s.add_argument("--force", action="store_true")
    s.set_defaults(func=_cmd_check_input)
    s = sub.add_parser("check-tokenizer", help="refuse a tokenizer.json the converter would misread")
    s.add_argument("model")
    s.set_defaults(func=_cmd_check_tokenizer)
    s = sub.add_parser("bpe-view", help="copy of a checkpoint (weights symlinked) with a plain byte-level BPE tokenizer.json")
    s.add_argument("src")
    s.add_argument("dst")
    s.set_defaults(func=_cmd_bpe_view)
    s = sub.add_parser("converter-flags", help="print convert_hf_to_gguf flags for this checkpoint")
    s.add_argument("model")
    s.add_argument("--mtp", default="drop", help="drop (default) or keep the MTP head")
    s.add_argument("--tree", default=None, help="the llama.cpp tree whose converter will run")
    s.set_defaults(func=_cmd_converter_flags)
    s = sub.add_parser("tensor-types", help="validate a recipe against a source GGUF, write the stripped rule file")
    s.add_argument("--recipe", required=True)
    s.add_argument("--gguf", required=True, help="the BF16 source GGUF")
    s.add_argument("--base-type", required=True, help="llama-quantize type argument, e.g. IQ3_XXS")
    s.add_argument("--imatrix", default=None)
    s.add_argument("--out", required=True)
    s.set_defaults(func=_cmd_tensor_types)
    s = sub.add_parser("resolve-model", help="print a local checkpoint dir for MODEL (dir, hub id, embedded:NAME)")
    s.add_argument("model")
    s.add_argument("--revision", default=None)
    s.set_defaults(func=_cmd_resolve_model)
    s = sub.add_parser("calib-text", help="write calibration text from a hub dataset name:config:split:field")
    s.add_argument("--dataset", required=True)
    s.add_argument("--chunks", type=int, required=True)
    s.add_argument("--ctx", type=int, required=True)
    s.add_argument("--out", required=True)
    s.set_defaults(func=_cmd_calib_text)
    s = sub.add_parser("log-command", help="append a command record to a JSONL file")
    s.add_argument("--file", required=True)
    s.add_argument("--rc", type=int, required=True)
    s.add_argument("--seconds", type=float, required=True)
    s.add_argument("--status", default="ran", help="ran | reused")
    s.add_argument("command", nargs=argparse.REMAINDER)
    s.set_defaults(func=_cmd_log_command)
    for name, func, text in (("fresh", _cmd_fresh, "exit 0 if TARGET was made from these inputs, else remove it, exit 1"),
                             ("record", _cmd_record, "record the inputs TARGET was made from (TARGET.inputs.json)")):
        s = sub.add_parser(name, help=text)
        s.add_argument("target")
        s.add_argument("--value", action="append", metavar="NAME=VALUE", help="a setting the step depends on")
        s.add_argument("--file", action="append", metavar="NAME=PATH", help="an input file, by content")
        s.add_argument("--checkpoint", action="append", metavar="NAME=DIR", help="a checkpoint, by identity")
        s.set_defaults(func=func)
    s = sub.add_parser("meta", help="read a written GGUF back and write its meta JSON")
    for name in ("--gguf", "--source", "--recipe", "--base-type", "--out"):
        s.add_argument(name, required=True)
    s.add_argument("--commands", default=None, help="JSONL of the commands run (pack_gguf.sh writes it)")
    s.add_argument("--imatrix", default=None)
    s.add_argument("--mmproj", default=None)
    s.add_argument("--quantize-log", default=None, help="llama-quantize's output, for the fallbacks it reported")
    s.set_defaults(func=_cmd_meta)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (RecipeError, PackError, gguf_intermediates.StaleInputError) as err:
        print(f"gguf_pack: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
