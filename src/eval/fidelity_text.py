"""Evaluation text -> token windows: a file or hub dataset cut into non-overlapping windows (BOS first when
the tokenizer has one), or windows sampled from the teacher itself (seeded, cached on disk, since sampling
is a teacher forward too).
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Callable

import torch

import atomic_io
import provenance
from fidelity_config import CACHE_FORMAT_VERSION, FidelityConfig, TextSpec, TokenWindows


def input_device(model: torch.nn.Module) -> torch.device:
    """Where a transformers model wants its input ids (its embedding's device)."""
    return model.get_input_embeddings().weight.device


def read_text(spec: TextSpec) -> tuple[str, dict]:
    """The raw text of a file or hub dataset, and a record of it (the dataset path needs the hub)."""
    if spec.kind == "file":
        path = Path(spec.path)
        if not path.is_file():
            raise FileNotFoundError(f"--text-file {path} does not exist")
        text = path.read_text(encoding="utf-8")
        record = {"kind": "file", "path": str(path)}
    elif spec.kind == "dataset":
        import datasets

        ds = datasets.load_dataset(spec.dataset, spec.dataset_config, split=spec.split)
        if spec.field not in ds.column_names:
            raise ValueError(f"dataset {spec.dataset} has no field {spec.field!r}; columns: {ds.column_names}")
        text = "\n\n".join(ds[spec.field])  # the usual wikitext convention: records joined by a blank line
        record = {"kind": "dataset", "dataset": spec.dataset, "config": spec.dataset_config,
                  "split": spec.split, "field": spec.field, "join": "\\n\\n",
                  "fingerprint": getattr(ds, "_fingerprint", None),
                  "version": str(getattr(ds.info, "version", None))}
    else:
        raise ValueError(f"read_text handles file/dataset text, not {spec.kind!r}")
    if not text.strip():
        raise ValueError(f"the {spec.kind} text is empty")
    record.update(text_sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(), text_chars=len(text))
    return text, record


def windows_from_ids(ids: list[int] | torch.Tensor, cfg: FidelityConfig, bos_id: int | None) -> torch.Tensor:
    """Cut a token stream into [n, ctx] non-overlapping windows, BOS first when given; drop the tail."""
    ids = torch.as_tensor(ids, dtype=torch.int64).reshape(-1)[: cfg.max_tokens]
    per = cfg.ctx - (1 if bos_id is not None else 0)
    n = ids.numel() // per
    if n < 1:
        raise ValueError(f"the text has {ids.numel()} tokens (max_tokens={cfg.max_tokens}), fewer than one "
                         f"window of {per}; lower --ctx or give more text")
    body = ids[: n * per].reshape(n, per)
    if bos_id is None:
        return body
    return torch.cat([torch.full((n, 1), bos_id, dtype=torch.int64), body], dim=1)


def text_windows(text: str, tokenizer, cfg: FidelityConfig, record: dict) -> TokenWindows:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id if cfg.add_bos else None
    tokens = windows_from_ids(ids, cfg, bos)
    src = dict(record, text_tokens=len(ids), bos_id=bos)
    return TokenWindows(tokens, src)


def sample_start_id(tokenizer) -> int:
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise ValueError("teacher-sample needs a BOS or EOS token to start from; this tokenizer has neither")
    return int(start)


@torch.no_grad()
def sample_windows(model: torch.nn.Module, start_id: int, n_windows: int, ctx: int, seed: int,
                   temperature: float = 1.0, batch: int = 8) -> torch.Tensor:
    """[n_windows, ctx] tokens sampled from the model itself: start token, then ctx-1 ancestral samples.

    Window i draws from its own generator seeded (seed, i), so the text does not depend on the batch size.
    """
    out = torch.empty(n_windows, ctx, dtype=torch.int64)
    dev = input_device(model)
    gens = [torch.Generator().manual_seed(seed * 1_000_003 + i) for i in range(n_windows)]
    from tqdm import tqdm

    for b0 in tqdm(range(0, n_windows, batch), desc="teacher-sample", unit="batch", leave=False):
        rows = range(b0, min(b0 + batch, n_windows))
        cur = torch.full((len(rows), 1), start_id, dtype=torch.int64)
        seq = [cur]
        past = None
        for _ in range(ctx - 1):
            o = model(input_ids=cur.to(dev), past_key_values=past, use_cache=True)
            past = o.past_key_values
            probs = torch.softmax(o.logits[:, -1].float() / temperature, dim=-1).cpu()
            cur = torch.stack([torch.multinomial(probs[j], 1, generator=gens[r]) for j, r in enumerate(rows)])
            seq.append(cur)
        out[b0: b0 + len(rows)] = torch.cat(seq, dim=1)
    return out


def teacher_sample_windows(load_teacher: Callable[[], torch.nn.Module], teacher_id: str, tokenizer,
                           spec: TextSpec, cfg: FidelityConfig) -> tuple[TokenWindows, bool]:
    """Teacher-sampled windows, cached on disk (sampling is a teacher forward too). -> (windows, cache hit)."""
    from safetensors.torch import load_file, save

    n_tokens = spec.n_tokens if spec.n_tokens is not None else cfg.max_tokens
    if n_tokens < 1:
        raise ValueError(f"--n-tokens must be >= 1, got {n_tokens}")
    n_windows = math.ceil(n_tokens / (cfg.ctx - 1))
    start = sample_start_id(tokenizer)
    key_fields = {"teacher": teacher_id, "n_windows": n_windows, "ctx": cfg.ctx, "seed": spec.seed,
                  "temperature": spec.temperature, "start_id": start, "dtype": str(cfg.torch_dtype),
                  "device_type": cfg.device_type, "v": CACHE_FORMAT_VERSION}
    key = provenance.sha256_json(key_fields)
    path = cfg.cache_dir() / "teacher_samples" / f"{key[:24]}.safetensors"
    hit = path.is_file()
    if hit:
        tokens = load_file(str(path))["tokens"]
    else:
        tokens = sample_windows(load_teacher(), start, n_windows, cfg.ctx, spec.seed, spec.temperature)
        atomic_io.write_bytes(path, save({"tokens": tokens.contiguous()}, metadata={"key": key}))
    preview = tokenizer.decode(tokens[0, 1:64].tolist())
    src = {"kind": "teacher-sample", "n_tokens_requested": n_tokens, "seed": spec.seed,
           "temperature": spec.temperature, "start_id": start, "sampler": "ancestral, full vocabulary",
           "text_sha256": None, "preview": preview, "sample_cache": str(path), "cache_hit": hit}
    return TokenWindows(tokens, src), hit
