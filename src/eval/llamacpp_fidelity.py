"""Fidelity of GGUFs against their BF16 GGUF, measured by llama.cpp itself (llama-perplexity
--kl-divergence-base / --kl-divergence), written in moe_eval's fidelity JSON shape so the two tools'
figures sit in one table.

What llama-perplexity measures, and how it differs from moe_eval (docs/GGUF.md has the caveats):
* the text is cut into chunks of `ctx` tokens; only the SECOND half of each chunk is scored (ctx - 1 -
  ctx/2 tokens per chunk), each position seeing at least ctx/2 tokens of context. moe_eval scores every
  position of its windows, so on the same text and ctx the two score different token sets;
* the base model's log-probs are stored 16-bit-quantized per token in the base file, so KL is computed
  against a slightly rounded teacher;
* it runs the GGUF in llama.cpp's kernels: activation quantization (q8 dot products) is part of what is
  measured, unlike a dequantize-to-torch evaluation.

    python -m llamacpp_fidelity --base out/m-BF16.gguf --student iq3=out/m-IQ3_XXS.gguf \
        --text-file calib.txt --ctx 512 --chunks 16 --out results/fidelity/m-gguf.json
"""
from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

import atomic_io
import provenance

SCHEMA = "moe-lowbit/fidelity/v1"  # the schema moe_eval writes
ROOT = Path(__file__).resolve().parents[2]
_NUM = r"([-+0-9.eE]+|nan|inf)"
_PATTERNS = {
    "kl_mean": rf"Mean\s+KLD:\s*{_NUM}\s*±\s*{_NUM}",
    "ppl_student": rf"Mean PPL\(Q\)\s*:\s*{_NUM}\s*±\s*{_NUM}",
    "ppl_teacher": rf"Mean PPL\(base\)\s*:\s*{_NUM}\s*±\s*{_NUM}",
    "ppl_ratio": rf"Mean PPL\(Q\)/PPL\(base\)\s*:\s*{_NUM}\s*±\s*{_NUM}",
    "top1_agree": rf"Same top p:\s*{_NUM}\s*±\s*{_NUM}\s*%",
    "kl_p99": rf"99\.0%\s+KLD:\s*{_NUM}",
    "kl_max": rf"Maximum KLD:\s*{_NUM}",
    "kl_median": rf"Median\s+KLD:\s*{_NUM}",
}


class FidelityError(RuntimeError):
    pass


MIN_KLD_TOKENS = 100  # llama-perplexity prints its KL summary only from this many scored tokens


def scored_tokens(ctx: int, n_chunks: int) -> int:
    """Tokens llama-perplexity scores: the second half of each chunk."""
    return n_chunks * (ctx - 1 - ctx // 2)


def parse_kld_output(text: str) -> dict:
    """The summary block of `llama-perplexity --kl-divergence` -> numbers (raises if it is missing)."""
    out: dict = {}
    for key, pattern in _PATTERNS.items():
        m = re.search(pattern, text)
        if not m:
            raise FidelityError(f"llama-perplexity output lacks {key!r} (pattern {pattern!r}); last lines:\n"
                                + "\n".join(text.splitlines()[-15:]))
        vals = [float(g) for g in m.groups()]
        out[key] = vals[0]
        if len(vals) > 1:
            out[key + "_stderr"] = vals[1]
    out["top1_agree"] /= 100.0
    out["top1_agree_stderr"] /= 100.0
    chunks = re.search(r"computing over (\d+) chunks, n_ctx=(\d+)", text)
    if chunks:
        out["n_chunks"], out["ctx"] = int(chunks.group(1)), int(chunks.group(2))
    return out


def parse_base_ppl(text: str) -> float | None:
    m = re.search(rf"Final estimate: PPL = {_NUM}", text)
    return float(m.group(1)) if m else None


def student_block(parsed: Mapping, z: float = 1.96) -> dict:
    """moe_eval's per-student fields from parsed llama-perplexity figures (interval = mean +/- z*stderr)."""
    def iv(key):
        se = parsed.get(key + "_stderr")
        return [None, None] if se is None or math.isnan(se) else [parsed[key] - z * se, parsed[key] + z * se]

    return {
        "n_windows": parsed.get("n_chunks"),
        "n_scored_tokens": scored_tokens(parsed["ctx"], parsed["n_chunks"]) if "n_chunks" in parsed else None,
        "ppl_teacher": parsed["ppl_teacher"], "ppl_student": parsed["ppl_student"],
        "ppl_student_interval": iv("ppl_student"), "ppl_teacher_interval": iv("ppl_teacher"),
        "ppl_ratio": parsed["ppl_ratio"], "ppl_ratio_interval": iv("ppl_ratio"),
        "kl_mean": parsed["kl_mean"], "kl_mean_interval": iv("kl_mean"), "kl_mean_stderr": parsed["kl_mean_stderr"],
        "kl_kind": "llama-perplexity (second half of each chunk; base log-probs stored 16-bit)",
        "kl_p99": parsed["kl_p99"], "kl_max": parsed["kl_max"], "kl_median": parsed["kl_median"],
        "top1_agree": parsed["top1_agree"], "top1_agree_interval": iv("top1_agree"),
        "top1_agree_stderr": parsed["top1_agree_stderr"],
    }


def perplexity_base_command(binary: Path, base: Path, text_file: Path, ctx: int, chunks: int, logits: Path,
                            threads: int | None, extra: Sequence[str] = ()) -> list[str]:
    cmd = [str(binary), "-m", str(base), "-f", str(text_file), "-c", str(ctx), "--chunks", str(chunks),
           "--kl-divergence-base", str(logits), "-b", str(ctx)]
    return cmd + (["-t", str(threads)] if threads else []) + list(extra)


def perplexity_kld_command(binary: Path, student: Path, ctx: int, logits: Path, threads: int | None,
                           extra: Sequence[str] = ()) -> list[str]:
    cmd = [str(binary), "-m", str(student), "-c", str(ctx), "--kl-divergence-base", str(logits), "--kl-divergence",
           "-b", str(ctx)]
    return cmd + (["-t", str(threads)] if threads else []) + list(extra)


def _run(cmd: list[str], log: Path) -> str:
    print(f"llamacpp_fidelity: + {' '.join(cmd)}", file=sys.stderr)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    text = proc.stdout + "\n" + proc.stderr
    log.write_text(text)
    if proc.returncode != 0:
        raise FidelityError(f"{Path(cmd[0]).name} failed (exit {proc.returncode}); log {log}; last lines:\n"
                            + "\n".join(text.splitlines()[-15:]))
    return text


def run_fidelity(binary: Path, base: Path, students: Mapping[str, Path], text_file: Path, ctx: int, chunks: int,
                 threads: int | None = None, workdir: Path | None = None, z: float = 1.96,
                 extra_args: Sequence[str] = (), argv=None) -> dict:
    """Base logits once, then KL of every student GGUF against them -> fidelity JSON (moe_eval's shape)."""
    if ctx < 8 or chunks < 1:
        raise ValueError(f"need ctx >= 8 and chunks >= 1, got ctx={ctx}, chunks={chunks}")
    if scored_tokens(ctx, chunks) < MIN_KLD_TOKENS:
        per_chunk = scored_tokens(ctx, 1)
        raise ValueError(f"llama-perplexity reports no KL statistics under {MIN_KLD_TOKENS} scored tokens; ctx {ctx} x "
                         f"{chunks} chunks scores {scored_tokens(ctx, chunks)}: ask for at least "
                         f"{-(-MIN_KLD_TOKENS // per_chunk)} chunks (or a longer ctx)")
    for path in (base, text_file, *students.values()):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path} not found")
    own_tmp = workdir is None
    work = Path(tempfile.mkdtemp(prefix="llamacpp-kld-")) if own_tmp else Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    logits = work / "base_logits.bin"
    commands = []
    try:
        cmd = perplexity_base_command(binary, base, text_file, ctx, chunks, logits, threads, extra_args)
        commands.append(cmd)
        base_out = _run(cmd, work / "base.log")
        out_students = []
        for name, path in students.items():
            cmd = perplexity_kld_command(binary, Path(path), ctx, logits, threads, extra_args)
            commands.append(cmd)
            parsed = parse_kld_output(_run(cmd, work / f"kld-{name}.log"))
            out_students.append({"name": name, "gguf": str(path), "file_bytes": Path(path).stat().st_size,
                                 **student_block(parsed, z)})
    finally:
        if own_tmp:
            for f in work.iterdir():
                f.unlink()
            work.rmdir()
        elif logits.exists():
            logits.unlink()  # n_chunks * ctx/2 * vocab * 2 bytes: large, and cheap to recompute
    n_scored = scored_tokens(ctx, chunks)
    return {
        "schema": SCHEMA,
        "tool": "llama-perplexity",
        "provenance": provenance.record(argv=argv, commands=commands),
        "teacher": {"gguf": str(base), "ppl_base_run": parse_base_ppl(base_out)},
        "text": {"path": str(text_file), "sha256": provenance.sha256_file(Path(text_file)), "ctx": ctx,
                 "n_windows": chunks, "n_scored_tokens": n_scored,
                 "scored_positions": "second half of each chunk (positions ctx/2 .. ctx-2 predict the next token)"},
        "config": {"ctx": ctx, "chunks": chunks, "threads": threads, "z": z, "extra_args": list(extra_args)},
        "interval_method": f"mean +/- {z} x the stderr llama-perplexity prints (over tokens)",
        "students": out_students,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llamacpp_fidelity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the BF16 GGUF (teacher)")
    p.add_argument("--student", action="append", required=True, metavar="NAME=GGUF", help="repeatable")
    p.add_argument("--text-file", required=True)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--chunks", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--llama-cpp", default=None, help="llama.cpp prefix (default: $LLAMA_CPP or the cached build)")
    p.add_argument("--workdir", default=None, help="keep logs here (default: a temp dir, removed)")
    p.add_argument("--out", required=True, help="fidelity JSON path")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    import llamacpp_server

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    students = {}
    for item in args.student:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            print(f"llamacpp_fidelity: --student {item!r} must be NAME=PATH", file=sys.stderr)
            return 2
        students[name] = Path(path)
    try:
        prefix = Path(args.llama_cpp) if args.llama_cpp else llamacpp_server.default_prefix(ROOT)
        binary = llamacpp_server.find_binary(prefix, "llama-perplexity")
        doc = run_fidelity(binary, Path(args.base), students, Path(args.text_file), args.ctx, args.chunks,
                           args.threads, Path(args.workdir) if args.workdir else None, argv=[sys.argv[0], *argv])
    except (FidelityError, FileNotFoundError, ValueError, llamacpp_server.ServerError) as err:
        print(f"llamacpp_fidelity: {err}", file=sys.stderr)
        return 2
    atomic_io.write_text(args.out, provenance.redact(json.dumps(doc, indent=1, default=str)) + "\n")
    for s in doc["students"]:
        print(f"{s['name']}: KL {s['kl_mean']:.5f} ± {s['kl_mean_stderr']:.5f}, top-1 {100 * s['top1_agree']:.2f}%, "
              f"PPL {s['ppl_student']:.3f} vs base {s['ppl_teacher']:.3f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
