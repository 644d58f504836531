"""The teacher's reference, computed once per (teacher identity, token hash, ctx, dtype, device type, cache
format) and kept on disk: per-token log-probs over the full vocabulary (fp16 by default) or top-K + the
rest, its exact fp32 NLL and top-1 ids, one safetensors file per window (written atomically, so an
interrupted build resumes). A fully cached teacher is never even loaded.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

import atomic_io
import fidelity_math as fm
import provenance
from fidelity_config import CACHE_FORMAT_VERSION, FidelityConfig, LogitsFn, TokenWindows, torch_dtype


@dataclass
class TeacherCache:
    """Per-window teacher reference on disk: full-vocab log-probs (or top-K + rest), exact NLL and top-1."""

    path: Path
    meta: dict
    hit: bool = False  # True when nothing had to be computed
    computed_windows: int = 0  # teacher forwards run while building it

    @property
    def topk(self) -> int:
        return int(self.meta["cache_topk"])

    @property
    def vocab(self) -> int:
        return int(self.meta["vocab"])

    def window_file(self, i: int) -> Path:
        return self.path / f"window_{i:05d}.safetensors"


def teacher_cache_key(teacher_id: str, windows: TokenWindows, cfg: FidelityConfig) -> tuple[str, dict]:
    fields = {"teacher": teacher_id, "tokens_sha256": windows.sha256, "ctx": cfg.ctx,
              "dtype": str(cfg.torch_dtype), "device_type": cfg.device_type,
              "cache_dtype": cfg.cache_dtype, "cache_topk": cfg.cache_topk, "v": CACHE_FORMAT_VERSION}
    return provenance.sha256_json(fields), fields


def _teacher_window_tensors(logits: torch.Tensor, tokens: torch.Tensor, cfg: FidelityConfig) -> dict:
    """The cached reference for one window, computed in token slices (bounded fp32 temporaries)."""
    pred, targets = logits[:-1], tokens[1:].to(logits.device)
    parts: dict[str, list] = {}
    for a in range(0, pred.shape[0], cfg.token_chunk):
        x, y = pred[a: a + cfg.token_chunk], targets[a: a + cfg.token_chunk]
        lse = fm.logsumexp_chunked(x, cfg.vocab_chunk)
        parts.setdefault("nll", []).append(fm.nll_from_logits(x, y, cfg.vocab_chunk, lse).cpu())
        parts.setdefault("argmax", []).append(fm.argmax_ids(x).cpu())
        if cfg.cache_topk:
            k = min(cfg.cache_topk, x.shape[-1])
            ids = x.topk(k, dim=-1).indices  # selected in the model dtype: no fp32 copy of the block
            parts.setdefault("topk_logp", []).append((x.gather(1, ids).float() - lse[:, None]).cpu())
            parts.setdefault("topk_ids", []).append(ids.to(torch.int32).cpu())
            parts.setdefault("rest_logp", []).append(fm.rest_log_mass(x, ids, cfg.vocab_chunk, lse).cpu())
        else:
            logp = torch.empty(x.shape, dtype=torch_dtype(cfg.cache_dtype))
            for sl in fm.vocab_slices(x.shape[-1], cfg.vocab_chunk):
                logp[:, sl] = (x[:, sl].float() - lse[:, None]).cpu()
            parts.setdefault("logp", []).append(logp)
    return {k: torch.cat(v).contiguous() for k, v in parts.items()}


def build_teacher_cache(load_teacher_fn: Callable[[], LogitsFn], teacher_id: str, windows: TokenWindows,
                        cfg: FidelityConfig) -> TeacherCache:
    """Reuse the cached teacher reference for these windows, or compute the missing windows once.

    `load_teacher_fn` is only called on a miss, so a fully cached teacher is never loaded. Windows are
    written atomically one file each, so an interrupted build resumes where it stopped.
    """
    from safetensors.torch import save
    from tqdm import tqdm

    key, fields = teacher_cache_key(teacher_id, windows, cfg)
    path = cfg.cache_dir() / "teacher_logits" / key[:24]
    meta_path = path / "meta.json"
    n = windows.tokens.shape[0]
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        cache = TeacherCache(path, meta)
        if meta.get("key") == key and meta.get("complete") and all(cache.window_file(i).is_file() for i in range(n)):
            cache.hit = True
            return cache
    path.mkdir(parents=True, exist_ok=True)
    logits_fn = None
    meta = dict(fields, key=key, n_windows=n, complete=False, vocab=None,
                kl_kind="topk_lower_bound" if cfg.cache_topk else "exact",
                created_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    cache = TeacherCache(path, meta)
    for i in tqdm(range(n), desc="teacher", unit="window", leave=False):
        out = cache.window_file(i)
        if out.is_file():
            if meta["vocab"] is None:
                from safetensors import safe_open

                with safe_open(str(out), framework="pt") as f:
                    meta["vocab"] = int(f.metadata()["vocab"])
            continue
        if logits_fn is None:
            logits_fn = load_teacher_fn()
        logits = logits_fn(windows.tokens[i])
        cache.computed_windows += 1
        vocab = int(logits.shape[-1])
        if meta["vocab"] is None:
            meta["vocab"] = vocab
            _check_cache_size(n, cfg, vocab)
        tensors = _teacher_window_tensors(logits, windows.tokens[i], cfg)
        atomic_io.write_bytes(out, save(tensors, metadata={"key": key, "vocab": str(vocab)}))
        del logits
    meta["complete"] = True
    atomic_io.write_json(meta_path, meta, indent=1, sort_keys=False)
    return cache


def _check_cache_size(n_windows: int, cfg: FidelityConfig, vocab: int) -> None:
    if cfg.cache_topk:
        return
    gb = n_windows * (cfg.ctx - 1) * vocab * torch_dtype(cfg.cache_dtype).itemsize / 1e9
    if gb > cfg.cache_max_gb:
        raise ValueError(f"a full-vocabulary teacher cache would take {gb:.1f} GB (> --cache-max-gb "
                         f"{cfg.cache_max_gb}); fix: raise --cache-max-gb, lower --max-tokens, or use "
                         f"--cache-topk 64 (KL then becomes a labelled lower bound)")


def cache_record(cache: TeacherCache) -> dict:
    return {"path": str(cache.path), "key": cache.meta["key"], "hit": cache.hit,
            "computed_windows": cache.computed_windows, "kl_kind": cache.meta["kl_kind"],
            "cache_dtype": cache.meta["cache_dtype"], "cache_topk": cache.meta["cache_topk"],
            "vocab": cache.meta["vocab"]}
