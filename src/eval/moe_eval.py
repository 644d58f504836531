"""Fidelity of quantized students against their BF16 teacher: PPL (both), KL(teacher||student), top-1.

How it measures (details and caveats in docs/FIDELITY.md):
* the text is cut into non-overlapping windows of `ctx` tokens (BOS first when the tokenizer has one);
  inside a window every position predicts the next token, so a window scores ctx-1 tokens;
* the teacher runs ONCE per (teacher identity, token hash, ctx, dtype, device type, cache format); its
  per-token log-probs over the FULL vocabulary are cached on disk (fp16 by default, one safetensors file
  per window), together with its exact fp32 NLL and top-1 ids. Every later student is compared against
  the cache, so the teacher is not even loaded on a cache hit. KL is exact over the whole vocabulary;
  only if `--cache-topk K` is asked for (vocabularies too large for disk) is KL a labelled lower bound;
* all vocabulary math runs on [token_chunk, vocab_chunk] slices (fidelity_math), so a 248K vocabulary
  never needs an fp32 copy of a whole logits block;
* intervals are mean +/- z*stderr over windows (the window is the independent unit, not the token).

Modules: fidelity_config.py (FidelityConfig, TextSpec, TokenWindows), fidelity_text.py (text -> windows,
teacher samples), fidelity_cache.py (the on-disk teacher reference); this one loads models, scores
students and is the CLI.

CLI:
  python src/eval/moe_eval.py --teacher DIR --student DIR [--student DIR2 ...] --ctx 512 \
      --max-tokens 16384 --text-file FILE --out results/fidelity/<tag>.json
  (--dataset wikitext --dataset-config wikitext-2-raw-v1 --split test | --text teacher-sample --n-tokens N --seed S)
Python: compare_models(teacher_dir, student_dirs, text_spec, cfg) for directories, compare_loaded(...) for
models already in memory (or any `tokens -> logits` callable, e.g. a GGUF runtime).
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import atomic_io
import provenance
import ptq_meta
from fidelity_config import CACHE_DTYPES, FidelityConfig, LogitsFn, TextSpec, TokenWindows

if TYPE_CHECKING:
    import torch

    from fidelity_cache import TeacherCache

SCHEMA = "moe-lowbit/fidelity/v1"


# ----------------------------------------------------------------------------------------------- models

def _file_fingerprint(path: Path, edge_bytes: int = 8 << 20) -> str:
    """Full sha256 for small files; size + head + tail for big weight files (cheap, still content-based)."""
    size = path.stat().st_size
    if size <= 4 * edge_bytes:
        return provenance.sha256_file(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(edge_bytes))
        f.seek(size - edge_bytes)
        h.update(f.read(edge_bytes))
    return "edges:" + h.hexdigest()


def model_identity(model_dir: str | Path) -> str:
    """Content fingerprint of a checkpoint directory (config, tokenizer, weights) for the cache key."""
    d = Path(model_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"model directory {d} does not exist")
    files = sorted(p for p in d.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"model directory {d} is empty")
    return "dir:" + provenance.sha256_json({p.name: _file_fingerprint(p) for p in files})


def module_identity(model: torch.nn.Module) -> str:
    """Fingerprint of a loaded model: per tensor name/shape/dtype, sum, sum of squares, strided sample.

    Computed where the weights live (no device->host copy of the weights); any realistic change to the
    weights (quantization, a different checkpoint) changes the sums.
    """
    import torch

    with torch.no_grad():
        return _module_identity(model, torch)


def _module_identity(model, torch) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        flat = t.detach().reshape(-1)
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        if flat.numel() and flat.is_floating_point():
            f64 = flat.double()
            sample = flat[:: max(1, flat.numel() // 256)].double().cpu()
            h.update(torch.stack([f64.sum(), (f64 * f64).sum()]).cpu().numpy().tobytes())
            h.update(sample.numpy().tobytes())
        elif flat.numel():
            h.update(flat[:: max(1, flat.numel() // 256)].cpu().numpy().tobytes())
    return "module:" + h.hexdigest()


def load_hf_model(model_dir: str | Path, cfg: FidelityConfig) -> torch.nn.Module:
    """A transformers causal LM in eval mode on cfg.device with cfg.dtype."""
    from transformers import AutoModelForCausalLM

    device_map = "auto" if cfg.device == "auto" else cfg.device
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=cfg.torch_dtype, device_map=device_map)
    return model.eval()


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def hf_logits_fn(model: torch.nn.Module) -> LogitsFn:
    """Wrap a transformers causal LM as tokens [ctx] -> logits [ctx, V] (no grad, batch of one)."""
    import torch

    from fidelity_text import input_device

    @torch.no_grad()
    def logits_of(tokens: torch.Tensor) -> torch.Tensor:
        ids = tokens.reshape(1, -1).to(input_device(model))
        return model(input_ids=ids, use_cache=False).logits[0]

    return logits_of


# ------------------------------------------------------------------------------------ scoring a student

def score_student(logits_fn: LogitsFn, windows: TokenWindows, cache: TeacherCache, cfg: FidelityConfig,
                  name: str = "student") -> dict:
    """Per-window mean KL, top-1 agreement and NLLs of one student against the cached teacher."""
    import torch
    from safetensors import safe_open

    import fidelity_math as fm
    from tqdm import tqdm

    per = {"kl": [], "top1": [], "nll_teacher": [], "nll_student": []}
    token_kl = []
    for i in tqdm(range(windows.tokens.shape[0]), desc=name, unit="window", leave=False):
        tokens = windows.tokens[i]
        logits = logits_fn(tokens)
        if logits.shape[-1] != cache.vocab:
            raise ValueError(f"{name} has a vocabulary of {logits.shape[-1]} logits but the teacher has "
                             f"{cache.vocab}; fidelity needs the same tokenizer/lm_head size")
        pred, targets = logits[:-1], tokens[1:].to(logits.device)
        kl, agree, nll_s = [], [], []
        with safe_open(str(cache.window_file(i)), framework="pt") as f:
            t_nll = f.get_tensor("nll")
            t_arg = f.get_tensor("argmax")
            for a in range(0, pred.shape[0], cfg.token_chunk):
                b = min(a + cfg.token_chunk, pred.shape[0])
                s = pred[a:b]
                lse_s = fm.logsumexp_chunked(s, cfg.vocab_chunk)
                nll_s.append(fm.nll_from_logits(s, targets[a:b], cfg.vocab_chunk, lse_s).cpu())
                agree.append((fm.argmax_ids(s).cpu() == t_arg[a:b]).float())
                if cache.topk:
                    kl.append(fm.kl_topk_lower_bound(
                        f.get_slice("topk_logp")[a:b], f.get_slice("topk_ids")[a:b],
                        f.get_slice("rest_logp")[a:b], s, cfg.vocab_chunk, lse_s).cpu())
                else:
                    t = f.get_slice("logp")[a:b].to(s.device)
                    kl.append(fm.kl_from_logits(t, s, cfg.vocab_chunk, lse_student=lse_s).cpu())
        kl_w = torch.cat(kl)
        token_kl.append(kl_w)
        per["kl"].append(float(kl_w.double().mean()))
        per["top1"].append(float(torch.cat(agree).double().mean()))
        per["nll_teacher"].append(float(t_nll.double().mean()))
        per["nll_student"].append(float(torch.cat(nll_s).double().mean()))
        del logits
    return summarize(per, torch.cat(token_kl), cache, cfg)


def summarize(per: dict, token_kl: torch.Tensor, cache: TeacherCache, cfg: FidelityConfig) -> dict:
    """Per-window lists -> the reported figures (windows have equal length, so window mean = token mean)."""
    import fidelity_math as fm

    z = cfg.z
    nll_t, nll_s = fm.interval_over_windows(per["nll_teacher"], z), fm.interval_over_windows(per["nll_student"], z)
    delta = fm.interval_over_windows([s - t for s, t in zip(per["nll_student"], per["nll_teacher"])], z)
    kl = fm.interval_over_windows(per["kl"], z)
    top1 = fm.interval_over_windows(per["top1"], z)
    ppl_t, ppl_s = fm.ppl_from_nll_interval(nll_t), fm.ppl_from_nll_interval(nll_s)
    sorted_kl = token_kl.double().sort().values
    return {
        "n_windows": len(per["kl"]),
        "n_scored_tokens": int(token_kl.numel()),
        "ppl_teacher": ppl_t["ppl"], "ppl_teacher_interval": [ppl_t["lo"], ppl_t["hi"]],
        "ppl_student": ppl_s["ppl"], "ppl_student_interval": [ppl_s["lo"], ppl_s["hi"]],
        "ppl_ratio": math.exp(delta.mean),
        "ppl_ratio_interval": [None if delta.lo is None else math.exp(delta.lo),
                               None if delta.hi is None else math.exp(delta.hi)],
        "kl_mean": kl.mean, "kl_mean_interval": [kl.lo, kl.hi], "kl_mean_stderr": kl.stderr,
        "kl_kind": cache.meta["kl_kind"],
        "kl_p99": float(sorted_kl[min(len(sorted_kl) - 1, int(0.99 * len(sorted_kl)))]),
        "kl_max": float(sorted_kl[-1]),
        "top1_agree": top1.mean, "top1_agree_interval": [top1.lo, top1.hi], "top1_agree_stderr": top1.stderr,
        "per_window": per,
    }


# ------------------------------------------------------------------------------------------ entry points

def _as_logits_fn(model_or_fn) -> LogitsFn:
    import torch

    return hf_logits_fn(model_or_fn) if isinstance(model_or_fn, torch.nn.Module) else model_or_fn


def compare_loaded(teacher, students: dict, windows: TokenWindows, cfg: FidelityConfig,
                   teacher_id: str | None = None) -> dict:
    """Compare already-loaded students with an already-loaded teacher on given windows.

    teacher/students: transformers models or `tokens [ctx] -> logits [ctx, V]` callables (e.g. a GGUF
    runtime). teacher_id: the cache identity; for a module it defaults to its weight fingerprint, a
    callable must be given one (there is nothing to fingerprint).
    """
    import torch

    from fidelity_cache import build_teacher_cache, cache_record

    if teacher_id is None:
        if not isinstance(teacher, torch.nn.Module):
            raise ValueError("a callable teacher needs an explicit teacher_id (used as its cache identity)")
        teacher_id = module_identity(teacher)
    cache = build_teacher_cache(lambda: _as_logits_fn(teacher), teacher_id, windows, cfg)
    out = {"fidelity_cache": cache_record(cache), "students": {}}
    for name, student in students.items():
        out["students"][name] = score_student(_as_logits_fn(student), windows, cache, cfg, name)
    return out


def _free(model) -> None:
    import torch

    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def compare_models(teacher_dir: str | Path, student_dirs: list, text: TextSpec, cfg: FidelityConfig,
                   teacher_id: str | None = None, argv=None) -> dict:
    """The full run on checkpoint directories -> the result dict (with provenance) the CLI writes.

    The teacher is loaded only if its samples or logits are not cached, and freed before any student
    is loaded; students are loaded one at a time.
    """
    from fidelity_text import read_text, teacher_sample_windows, text_windows
    from fidelity_cache import build_teacher_cache, cache_record

    if not student_dirs:
        raise ValueError("give at least one --student DIR")
    teacher_id = teacher_id or model_identity(teacher_dir)
    tokenizer = load_tokenizer(teacher_dir)
    held: dict = {}

    def teacher_model() -> torch.nn.Module:
        if "model" not in held:
            held["model"] = load_hf_model(teacher_dir, cfg)
        return held["model"]

    if text.kind == "teacher-sample":
        windows, _ = teacher_sample_windows(teacher_model, teacher_id, tokenizer, text, cfg)
    else:
        raw, record = read_text(text)
        windows = text_windows(raw, tokenizer, cfg, record)
    cache = build_teacher_cache(lambda: hf_logits_fn(teacher_model()), teacher_id, windows, cfg)
    if "model" in held:
        _free(held.pop("model"))
    students = []
    for sdir in student_dirs:
        model = load_hf_model(sdir, cfg)
        res = score_student(hf_logits_fn(model), windows, cache, cfg, name=Path(sdir).name)
        _free(model)
        students.append({"dir": str(sdir), "name": Path(sdir).name, "ptq_meta": ptq_meta.read_dict(sdir), **res})
    text_record = dict(windows.source, tokens_sha256=windows.sha256, n_windows=int(windows.tokens.shape[0]),
                       ctx=cfg.ctx, n_scored_tokens=windows.n_scored)
    return {
        "schema": SCHEMA,
        "provenance": provenance.record(argv=argv, teacher_id=teacher_id),
        "teacher": {"dir": str(teacher_dir), "id": teacher_id},
        "text": text_record,
        "config": asdict(cfg),
        "interval_method": f"mean +/- {cfg.z} x stderr over equal-length windows (sample sd, n-1); "
                           f"PPL and PPL ratio: the NLL interval mapped through exp; PPL ratio is paired "
                           f"per window",
        "fidelity_cache": cache_record(cache),
        "students": students,
    }


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Fidelity of quantized students vs their teacher: PPL, KL(teacher||student), top-1 "
                    "agreement, with intervals over windows. The teacher's logits are cached on disk.")
    p.add_argument("--teacher", required=True, help="teacher HF checkpoint dir (the BF16 reference)")
    p.add_argument("--student", action="append", required=True, help="student checkpoint dir (repeatable)")
    p.add_argument("--out", required=True, help="output JSON path, e.g. results/fidelity/<tag>.json")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text-file", help="local UTF-8 text file")
    src.add_argument("--dataset", help="hub dataset name (needs network), e.g. wikitext")
    src.add_argument("--text", choices=["teacher-sample"], help="sample the text from the teacher itself")
    p.add_argument("--dataset-config", help="e.g. wikitext-2-raw-v1")
    p.add_argument("--split", default="test")
    p.add_argument("--field", default="text", help="dataset text column")
    p.add_argument("--n-tokens", type=int, help="teacher-sample: tokens to sample (default: --max-tokens)")
    p.add_argument("--seed", type=int, default=0, help="teacher-sample seed")
    p.add_argument("--temperature", type=float, default=1.0, help="teacher-sample temperature")
    d = FidelityConfig()
    p.add_argument("--ctx", type=int, default=d.ctx, help="window length in tokens")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="read at most this many text tokens")
    p.add_argument("--device", default=d.device, help="cpu | cuda | cuda:N | auto")
    p.add_argument("--dtype", default=d.dtype, help="auto | float32 | bfloat16 | float16")
    p.add_argument("--vocab-chunk", type=int, default=d.vocab_chunk)
    p.add_argument("--token-chunk", type=int, default=d.token_chunk)
    p.add_argument("--cache-root", help="teacher cache root (default $MOE_LOWBIT_CACHE/fidelity)")
    p.add_argument("--cache-dtype", default=d.cache_dtype, choices=sorted(CACHE_DTYPES))
    p.add_argument("--cache-topk", type=int, default=d.cache_topk,
                   help="0: cache the full vocabulary (exact KL); K: top-K + rest (KL lower bound)")
    p.add_argument("--cache-max-gb", type=float, default=d.cache_max_gb)
    p.add_argument("--no-bos", action="store_true", help="do not start each window with BOS")
    p.add_argument("--z", type=float, default=d.z, help="interval half-width in standard errors")
    p.add_argument("--teacher-id", help="override the teacher's cache identity (default: content fingerprint)")
    return p


def main(argv=None) -> int:
    args = build_arg_parser().parse_args(argv)
    cfg = FidelityConfig(ctx=args.ctx, max_tokens=args.max_tokens, device=args.device, dtype=args.dtype,
                     vocab_chunk=args.vocab_chunk, token_chunk=args.token_chunk, cache_root=args.cache_root,
                     cache_dtype=args.cache_dtype, cache_topk=args.cache_topk, cache_max_gb=args.cache_max_gb,
                     add_bos=not args.no_bos, z=args.z)
    if args.text_file:
        text = TextSpec(kind="file", path=args.text_file)
    elif args.dataset:
        text = TextSpec(kind="dataset", dataset=args.dataset, dataset_config=args.dataset_config,
                        split=args.split, field=args.field)
    else:
        text = TextSpec(kind="teacher-sample", n_tokens=args.n_tokens, seed=args.seed,
                        temperature=args.temperature)
    result = compare_models(args.teacher, args.student, text, cfg, teacher_id=args.teacher_id,
                            argv=sys.argv if argv is None else [sys.argv[0], *argv])
    out = Path(args.out)
    atomic_io.write_json(out, result, indent=1, sort_keys=False)
    for s in result["students"]:
        print(f"{s['name']}: ppl {s['ppl_student']:.4f} (teacher {s['ppl_teacher']:.4f})  "
              f"KL {s['kl_mean']:.4g} [{_fmt(s['kl_mean_interval'])}] ({s['kl_kind']})  top1 {s['top1_agree']:.4f}")
    print(out)
    return 0


def _fmt(iv) -> str:
    return "n/a" if iv[0] is None else f"{iv[0]:.4g}, {iv[1]:.4g}"


if __name__ == "__main__":
    sys.exit(main())
