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
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

import atomic_io
import fidelity_math as fm
import provenance

SCHEMA = "moe-lowbit/fidelity/v1"
CACHE_FORMAT_VERSION = 1
CACHE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TEXT_KINDS = ("file", "dataset", "teacher-sample")

# tokens [ctx] int64 -> logits [ctx, V] (any float dtype, any device): what every model is reduced to
LogitsFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class EvalConfig:
    """Every knob of one fidelity run; recorded verbatim in the output JSON."""

    ctx: int = 512
    max_tokens: int = 16384
    device: str = "cpu"  # cpu | cuda | cuda:N | auto (device_map="auto" for models larger than one GPU)
    dtype: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    vocab_chunk: int = 32768
    token_chunk: int = 128
    cache_root: str | None = None  # default: $MOE_LOWBIT_CACHE/fidelity
    cache_dtype: str = "float16"  # dtype of the cached teacher log-probs (full-vocab mode)
    cache_topk: int = 0  # 0: full vocabulary (exact KL); K > 0: top-K + rest bucket (KL lower bound)
    cache_max_gb: float = 16.0  # refuse to write a larger full-vocab teacher cache (fail early, name the fix)
    add_bos: bool = True
    z: float = 1.96

    def __post_init__(self):
        if self.ctx < 2:
            raise ValueError(f"ctx must be >= 2 (a window needs a context and a target), got {self.ctx}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.dtype != "auto" and self.dtype not in MODEL_DTYPES:
            raise ValueError(f"dtype must be auto or one of {sorted(MODEL_DTYPES)}, got {self.dtype!r}")
        if self.cache_dtype not in CACHE_DTYPES:
            raise ValueError(f"cache_dtype must be one of {sorted(CACHE_DTYPES)}, got {self.cache_dtype!r}")
        for name in ("vocab_chunk", "token_chunk"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.cache_topk < 0:
            raise ValueError(f"cache_topk must be >= 0 (0 = full vocabulary), got {self.cache_topk}")

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.float32 if self.device == "cpu" else torch.bfloat16
        return MODEL_DTYPES[self.dtype]

    @property
    def device_type(self) -> str:
        return "cuda" if self.device == "auto" else torch.device(self.device).type

    def cache_dir(self) -> Path:
        if self.cache_root:
            return Path(self.cache_root)
        base = os.environ.get("MOE_LOWBIT_CACHE") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "moe-lowbit")
        return Path(base) / "fidelity"


@dataclass(frozen=True)
class TextSpec:
    """Where the evaluation text comes from."""

    kind: str = "file"  # file | dataset | teacher-sample
    path: str | None = None
    dataset: str | None = None
    dataset_config: str | None = None
    split: str = "test"
    field: str = "text"
    n_tokens: int | None = None  # teacher-sample: tokens to sample (default: cfg.max_tokens)
    seed: int = 0
    temperature: float = 1.0

    def __post_init__(self):
        if self.kind not in TEXT_KINDS:
            raise ValueError(f"text kind must be one of {TEXT_KINDS}, got {self.kind!r}")
        if self.kind == "file" and not self.path:
            raise ValueError("text kind 'file' needs a path (--text-file FILE)")
        if self.kind == "dataset" and not self.dataset:
            raise ValueError("text kind 'dataset' needs a dataset name (--dataset NAME)")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


@dataclass(frozen=True)
class TokenWindows:
    """[n, ctx] token ids plus a record of where they came from."""

    tokens: torch.Tensor
    source: dict = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        return tokens_sha256(self.tokens)

    @property
    def n_scored(self) -> int:
        return int(self.tokens.shape[0] * (self.tokens.shape[1] - 1))


def tokens_sha256(tokens: torch.Tensor) -> str:
    t = tokens.to(torch.int64).contiguous().cpu()
    h = hashlib.sha256(str(tuple(t.shape)).encode())
    h.update(t.numpy().tobytes())
    return h.hexdigest()


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


@torch.no_grad()
def module_identity(model: torch.nn.Module) -> str:
    """Fingerprint of a loaded model: per tensor name/shape/dtype, sum, sum of squares, strided sample.

    Computed where the weights live (no device->host copy of the weights); any realistic change to the
    weights (quantization, a different checkpoint) changes the sums.
    """
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


def load_hf_model(model_dir: str | Path, cfg: EvalConfig) -> torch.nn.Module:
    """A transformers causal LM in eval mode on cfg.device with cfg.dtype."""
    from transformers import AutoModelForCausalLM

    device_map = "auto" if cfg.device == "auto" else cfg.device
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=cfg.torch_dtype, device_map=device_map)
    return model.eval()


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def _input_device(model: torch.nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


def hf_logits_fn(model: torch.nn.Module) -> LogitsFn:
    """Wrap a transformers causal LM as tokens [ctx] -> logits [ctx, V] (no grad, batch of one)."""

    @torch.no_grad()
    def logits_of(tokens: torch.Tensor) -> torch.Tensor:
        ids = tokens.reshape(1, -1).to(_input_device(model))
        return model(input_ids=ids, use_cache=False).logits[0]

    return logits_of


# ------------------------------------------------------------------------------------------------- text

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


def windows_from_ids(ids: list[int] | torch.Tensor, cfg: EvalConfig, bos_id: int | None) -> torch.Tensor:
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


def text_windows(text: str, tokenizer, cfg: EvalConfig, record: dict) -> TokenWindows:
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
    dev = _input_device(model)
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
                           spec: TextSpec, cfg: EvalConfig) -> tuple[TokenWindows, bool]:
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


# ------------------------------------------------------------------------------------ the teacher cache

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


def teacher_cache_key(teacher_id: str, windows: TokenWindows, cfg: EvalConfig) -> tuple[str, dict]:
    fields = {"teacher": teacher_id, "tokens_sha256": windows.sha256, "ctx": cfg.ctx,
              "dtype": str(cfg.torch_dtype), "device_type": cfg.device_type,
              "cache_dtype": cfg.cache_dtype, "cache_topk": cfg.cache_topk, "v": CACHE_FORMAT_VERSION}
    return provenance.sha256_json(fields), fields


def _teacher_window_tensors(logits: torch.Tensor, tokens: torch.Tensor, cfg: EvalConfig) -> dict:
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
            logp = torch.empty(x.shape, dtype=CACHE_DTYPES[cfg.cache_dtype])
            for sl in fm.vocab_slices(x.shape[-1], cfg.vocab_chunk):
                logp[:, sl] = (x[:, sl].float() - lse[:, None]).cpu()
            parts.setdefault("logp", []).append(logp)
    return {k: torch.cat(v).contiguous() for k, v in parts.items()}


def build_teacher_cache(load_teacher_fn: Callable[[], LogitsFn], teacher_id: str, windows: TokenWindows,
                        cfg: EvalConfig) -> TeacherCache:
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


def _check_cache_size(n_windows: int, cfg: EvalConfig, vocab: int) -> None:
    if cfg.cache_topk:
        return
    gb = n_windows * (cfg.ctx - 1) * vocab * CACHE_DTYPES[cfg.cache_dtype].itemsize / 1e9
    if gb > cfg.cache_max_gb:
        raise ValueError(f"a full-vocabulary teacher cache would take {gb:.1f} GB (> --cache-max-gb "
                         f"{cfg.cache_max_gb}); fix: raise --cache-max-gb, lower --max-tokens, or use "
                         f"--cache-topk 64 (KL then becomes a labelled lower bound)")


# ------------------------------------------------------------------------------------ scoring a student

def score_student(logits_fn: LogitsFn, windows: TokenWindows, cache: TeacherCache, cfg: EvalConfig,
                  name: str = "student") -> dict:
    """Per-window mean KL, top-1 agreement and NLLs of one student against the cached teacher."""
    from safetensors import safe_open
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


def summarize(per: dict, token_kl: torch.Tensor, cache: TeacherCache, cfg: EvalConfig) -> dict:
    """Per-window lists -> the reported figures (windows have equal length, so window mean = token mean)."""
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
    return hf_logits_fn(model_or_fn) if isinstance(model_or_fn, torch.nn.Module) else model_or_fn


def compare_loaded(teacher, students: dict, windows: TokenWindows, cfg: EvalConfig,
                   teacher_id: str | None = None) -> dict:
    """Compare already-loaded students with an already-loaded teacher on given windows.

    teacher/students: transformers models or `tokens [ctx] -> logits [ctx, V]` callables (e.g. a GGUF
    runtime). teacher_id: the cache identity; for a module it defaults to its weight fingerprint, a
    callable must be given one (there is nothing to fingerprint).
    """
    if teacher_id is None:
        if not isinstance(teacher, torch.nn.Module):
            raise ValueError("a callable teacher needs an explicit teacher_id (used as its cache identity)")
        teacher_id = module_identity(teacher)
    cache = build_teacher_cache(lambda: _as_logits_fn(teacher), teacher_id, windows, cfg)
    out = {"teacher_cache": _cache_record(cache), "students": {}}
    for name, student in students.items():
        out["students"][name] = score_student(_as_logits_fn(student), windows, cache, cfg, name)
    return out


def _cache_record(cache: TeacherCache) -> dict:
    return {"path": str(cache.path), "key": cache.meta["key"], "hit": cache.hit,
            "computed_windows": cache.computed_windows, "kl_kind": cache.meta["kl_kind"],
            "cache_dtype": cache.meta["cache_dtype"], "cache_topk": cache.meta["cache_topk"],
            "vocab": cache.meta["vocab"]}


def _free(model) -> None:
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def compare_models(teacher_dir: str | Path, student_dirs: list, text: TextSpec, cfg: EvalConfig,
                   teacher_id: str | None = None, argv=None) -> dict:
    """The full run on checkpoint directories -> the result dict (with provenance) the CLI writes.

    The teacher is loaded only if its samples or logits are not cached, and freed before any student
    is loaded; students are loaded one at a time.
    """
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
        ptq = Path(sdir) / "_ptq_meta.json"
        students.append({"dir": str(sdir), "name": Path(sdir).name,
                         "ptq_meta": json.loads(ptq.read_text()) if ptq.is_file() else None, **res})
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
        "teacher_cache": _cache_record(cache),
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
    d = EvalConfig()
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
    cfg = EvalConfig(ctx=args.ctx, max_tokens=args.max_tokens, device=args.device, dtype=args.dtype,
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
