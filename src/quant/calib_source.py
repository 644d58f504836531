"""Calibration text -> token windows, with a record of where they came from (and their hashes).

Three sources, exactly one per build:
* `--calib-file PATH`: a UTF-8 text file;
* `--calib-dataset ID[:split[:field]]` (or ID:config:split:field): a hub dataset through `datasets`;
* `--calib teacher-sample`: text sampled from the source model itself (seeded; the record says so), for
  when no in-domain text exists;
* `--calib pydoc-topics`: the odd-numbered topics of CPython's own documentation (`pydoc_data`, shipped
  with every Python: offline and reproducible); the bench evaluates on the even-numbered ones.
The text is tokenized with the checkpoint's own tokenizer (no special tokens), cut into `tokens // ctx`
windows of `ctx` tokens. Too little text is an error, never a silently smaller calibration set.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from ckpt_source import BuildError

TEACHER_SAMPLE = "teacher-sample"
PYDOC_TOPICS = "pydoc-topics"  # the odd-numbered topics of CPython's pydoc_data (offline; even ones are eval text)
NAMED_SOURCES = (TEACHER_SAMPLE, PYDOC_TOPICS)


def pydoc_split() -> tuple[str, str]:
    """(calibration, evaluation) text from pydoc_data.topics: odd topics calibrate, even ones evaluate."""
    from pydoc_data import topics

    items = [topics.topics[k] for k in sorted(topics.topics)]
    return "\n\n".join(items[1::2]), "\n\n".join(items[0::2])


@dataclass(frozen=True)
class CalibRequest:
    file: str | None = None
    dataset: str | None = None
    kind: str | None = None  # "teacher-sample"
    tokens: int = 32768
    ctx: int = 512
    seed: int = 0

    def __post_init__(self):
        given = [x for x in (self.file, self.dataset, self.kind) if x]
        if len(given) > 1:
            raise BuildError("give one calibration source: --calib-file, --calib-dataset or --calib teacher-sample")
        if self.kind and self.kind not in NAMED_SOURCES:
            raise BuildError(f"--calib {self.kind!r}: named sources are {', '.join(NAMED_SOURCES)} "
                             f"(use --calib-file PATH or --calib-dataset ID for text)")
        if self.ctx < 2 or self.tokens < self.ctx:
            raise BuildError(f"--calib-tokens {self.tokens} / --calib-ctx {self.ctx}: need ctx >= 2 and tokens >= ctx")

    @property
    def given(self) -> bool:
        return bool(self.file or self.dataset or self.kind)

    def describe(self) -> str:
        return self.file or self.dataset or self.kind or "none"


@dataclass(frozen=True)
class CalibWindows:
    ids: "object"  # torch.LongTensor [n_windows, ctx]
    record: dict  # kind, path/id, text sha256, token ids sha256, tokens, ctx, windows

    @property
    def identity(self) -> str:
        """What decides the statistics: the token ids and the window shape."""
        return f"{self.record['tokens_sha256']}:{self.record['ctx']}:{self.record['windows']}"


def _read_file(path: str) -> tuple[str, dict]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise BuildError(f"--calib-file {path}: no such file")
    try:
        raw = p.read_bytes()
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BuildError(f"--calib-file {path}: not UTF-8 text ({e})") from None
    if not text.strip():
        raise BuildError(f"--calib-file {path}: the file is empty")
    return text, {"kind": "file", "path": str(p.resolve()), "sha256": hashlib.sha256(raw).hexdigest()}


def _read_dataset(spec: str) -> tuple[str, dict]:
    parts = spec.split(":")
    if len(parts) > 4 or not parts[0]:
        raise BuildError(f"--calib-dataset {spec!r}: expected ID[:split[:field]] or ID:config:split:field")
    config = None
    if len(parts) == 4:
        ds_id, config, split, field = parts
    else:
        ds_id, split, field = (parts + ["train", "text"][len(parts) - 1:])[:3]
    try:
        import datasets
    except ImportError:
        raise BuildError("--calib-dataset needs the `datasets` package (pip install datasets), or pass "
                         "--calib-file") from None
    try:
        ds = datasets.load_dataset(ds_id, config, split=split)
    except Exception as e:  # network, missing repo, bad split: one line
        raise BuildError(f"--calib-dataset {spec}: could not load it: {str(e).splitlines()[0] if str(e) else e!r}") from None
    if field not in ds.column_names:
        raise BuildError(f"--calib-dataset {spec}: no field {field!r}; fields: {ds.column_names}")
    text = "\n\n".join(str(x) for x in ds[field] if x)
    if not text.strip():
        raise BuildError(f"--calib-dataset {spec}: field {field!r} holds no text")
    fingerprint = getattr(ds, "_fingerprint", None)
    return text, {"kind": "dataset", "id": ds_id, "config": config, "split": split, "field": field,
                  "fingerprint": fingerprint, "sha256": hashlib.sha256(text.encode()).hexdigest()}


def _sample_teacher(model_dir: Path, n_windows: int, ctx: int, seed: int):
    """Windows sampled from the source model (temperature 1, seeded): the whole model is loaded, so this is
    for checkpoints that fit in memory; larger ones should pass a text file sampled once on a GPU box."""
    import torch
    import transformers

    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    except Exception as e:
        raise BuildError(f"--calib teacher-sample: cannot load {model_dir} to sample from it: {e}") from None
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    start = tok.bos_token_id if tok.bos_token_id is not None else (tok.eos_token_id or 0)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    rows = []
    with torch.no_grad():
        for _ in range(n_windows):
            ids = torch.tensor([[start]])
            out = model.generate(ids, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=ctx,
                                 min_new_tokens=ctx, pad_token_id=start)
            rows.append(out[0, 1:ctx + 1])
    del gen
    ids = torch.stack(rows)
    return ids, {"kind": TEACHER_SAMPLE, "model": str(model_dir), "seed": seed, "temperature": 1.0}


def load_windows(req: CalibRequest, model_dir: Path) -> CalibWindows:
    """Token windows [tokens // ctx, ctx] for the request, or a one-line BuildError."""
    import torch

    n_windows = req.tokens // req.ctx
    if req.kind == TEACHER_SAMPLE:
        ids, record = _sample_teacher(model_dir, n_windows, req.ctx, req.seed)
    else:
        if req.kind == PYDOC_TOPICS:
            text = pydoc_split()[0]
            record = {"kind": PYDOC_TOPICS, "sha256": hashlib.sha256(text.encode()).hexdigest()}
        else:
            text, record = _read_file(req.file) if req.file else _read_dataset(req.dataset)
        try:
            import transformers

            tok = transformers.AutoTokenizer.from_pretrained(model_dir)
        except Exception as e:
            raise BuildError(f"calibration: cannot load the tokenizer of {model_dir}: {e}") from None
        all_ids = tok(text, add_special_tokens=False)["input_ids"]
        need = n_windows * req.ctx
        if len(all_ids) < need:
            raise BuildError(f"calibration text {req.describe()} has {len(all_ids)} tokens, fewer than the "
                             f"{need} requested (--calib-tokens {req.tokens}, --calib-ctx {req.ctx}); give more text "
                             f"or lower --calib-tokens")
        ids = torch.tensor(all_ids[:need], dtype=torch.int64).reshape(n_windows, req.ctx)
    record.update(tokens=int(ids.numel()), ctx=req.ctx, windows=int(ids.shape[0]),
                  tokens_sha256=hashlib.sha256(ids.numpy().tobytes()).hexdigest())
    return CalibWindows(ids, record)
