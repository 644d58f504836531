"""What one fidelity run is: its knobs (FidelityConfig), where its text comes from (TextSpec) and the token
windows every model is scored on (TokenWindows). Shared by the text, teacher-cache and scoring modules;
moe_eval.py is the entry point that ties them together.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import cache_paths

if TYPE_CHECKING:
    import torch

CACHE_FORMAT_VERSION = 1
CACHE_DTYPES = ("bfloat16", "float16", "float32")  # by torch name: this module loads no torch (--help)
MODEL_DTYPES = ("bfloat16", "float16", "float32")
TEXT_KINDS = ("file", "dataset", "teacher-sample")

# tokens [ctx] int64 -> logits [ctx, V] (any float dtype, any device): what every model is reduced to
LogitsFn = Callable[["torch.Tensor"], "torch.Tensor"]


def torch_dtype(name: str):
    """The torch dtype a name in CACHE_DTYPES / MODEL_DTYPES stands for."""
    import torch

    return getattr(torch, name)


@dataclass(frozen=True)
class FidelityConfig:
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
    def torch_dtype(self):
        if self.dtype == "auto":
            return torch_dtype("float32" if self.device == "cpu" else "bfloat16")
        return torch_dtype(self.dtype)

    @property
    def device_type(self) -> str:
        return "cuda" if self.device == "auto" else self.device.split(":")[0]

    def cache_dir(self) -> Path:
        if self.cache_root:
            return Path(self.cache_root)
        return cache_paths.cache_dir("fidelity")


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


def tokens_sha256(tokens) -> str:
    import torch

    t = tokens.to(torch.int64).contiguous().cpu()
    h = hashlib.sha256(str(tuple(t.shape)).encode())
    h.update(t.numpy().tobytes())
    return h.hexdigest()
