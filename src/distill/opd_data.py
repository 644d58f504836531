"""OPD's files and the checks on them: prompt sets, resumable JSONL with a header, student/teacher checks.

One rollout file is a JSONL whose first line is a header (the generation config, its hash and
provenance) and whose other lines are one prompt each, with all its samples. It is appended one prompt
batch at a time (flushed and fsynced), so a killed run resumes at the first missing prompt; a partial
last line is dropped on resume. A file made under another config is never mixed in: the run stops with
"delete X or pass --fresh". A `<file>.complete.json` written atomically at the end is what tells readers
the file is whole.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import atomic_io
import provenance
import ptq_meta
from model_adapters import Role


def _text(path: Path) -> str:
    """The file as UTF-8; bad bytes are a one-line error naming file:line (eval_text)."""
    import eval_text

    try:
        return eval_text.read_utf8(path)
    except eval_text.TextDecodeError as err:
        raise OpdInputError(str(err)) from None

PROMPT_FIELDS = ("messages", "prompt", "problem", "question", "instruction", "text")
STATE = "state.pt"  # the trainer's resumable state file (weights_only torch.save)
DEFAULT_LORA_ROLES = (Role.ROUTED_EXPERT.value,)  # where a 3-bit student loses most
LORA_ALLOWED_ROLES = tuple(r.value for r in (Role.ROUTED_EXPERT, Role.SHARED_EXPERT, Role.ATTENTION,
                                            Role.LINEAR_ATTENTION, Role.DENSE_MLP))
LOSSES = ("reverse_kl", "forward_kl", "jsd")  # opd_loss's objectives (named here so --help needs no torch)
DEFAULT_REST_FLOOR = -24 * 0.6931471805599453  # log(2^-24): the rest bucket's floor (opd_loss), fp32 resolution
PTQ_META = ptq_meta.META_NAME


class OpdInputError(ValueError):
    """Bad input for an OPD step: one line, exit 2."""


def config_hash(cfg: dict) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_diff(old: dict, new: dict) -> str:
    keys = sorted(set(old) | set(new))
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)) or "(none)"


# -------------------------------------------------------------------------------------------- prompts
def _messages(rec: dict, where: str) -> list[dict]:
    for f in PROMPT_FIELDS:
        if f in rec and rec[f]:
            v = rec[f]
            if f == "messages":
                if not isinstance(v, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in v):
                    raise OpdInputError(f"{where}: 'messages' must be a list of {{role, content}} objects")
                return v
            return [{"role": "user", "content": str(v)}]
    raise OpdInputError(f"{where}: no prompt field (one of {list(PROMPT_FIELDS)})")


def load_prompts(path: str | None = None, dataset: str | None = None, split: str = "train",
                 field: str | None = None, limit: int | None = None) -> list[dict]:
    """[{id, messages}] from a JSONL file (one object per line) or a hub dataset (needs network)."""
    rows: list[dict] = []
    if path:
        p = Path(path)
        if not p.is_file():
            raise OpdInputError(f"--prompts {path}: no such file")
        for i, line in enumerate(_text(p).splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise OpdInputError(f"{path}:{i}: not JSON ({e})") from None
            if not isinstance(rec, dict):
                raise OpdInputError(f"{path}:{i}: expected a JSON object")
            rec = {field: rec[field]} if field and field in rec else rec
            rows.append({"id": str(rec.get("id", rec.get("unique_id", f"{p.stem}-{i}"))),
                         "messages": _messages(rec, f"{path}:{i}")})
    elif dataset:
        import datasets

        ds = datasets.load_dataset(dataset, split=split)
        for i, rec in enumerate(ds):
            rec = {field: rec[field]} if field else dict(rec)
            rows.append({"id": f"{dataset}:{split}:{i}", "messages": _messages(rec, f"{dataset}[{i}]")})
            if limit and len(rows) >= limit:
                break
    else:
        raise OpdInputError("no prompts: pass --prompts FILE.jsonl or --dataset NAME")
    if limit:
        rows = rows[:limit]
    if not rows:
        raise OpdInputError(f"no prompts in {path or dataset}")
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise OpdInputError(f"duplicate prompt ids in {path or dataset}, e.g. "
                            f"{sorted({x for x in ids if ids.count(x) > 1})[:3]}")
    return rows


# -------------------------------------------------------------------------------------- resumable JSONL
@dataclass
class ResumableJsonl:
    """Header line + records, appended and fsynced; resumes only under the same config hash."""

    path: Path
    header: dict

    def open(self, fresh: bool) -> dict:
        """Existing records by key (empty when new or fresh); refuses a file made under another config."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        done: dict = {}
        complete = complete_marker(self.path)
        if fresh:
            self.path.unlink(missing_ok=True)
            complete.unlink(missing_ok=True)
        if self.path.exists():
            lines = _text(self.path).split("\n")
            try:
                head = json.loads(lines[0])["header"]
            except (ValueError, KeyError, IndexError):
                raise OpdInputError(f"{self.path} has no readable header; delete {self.path} or pass --fresh") from None
            if head.get("config_hash") != self.header["config_hash"]:
                raise OpdInputError(f"{self.path} was made with other settings ({config_diff(head['config'], self.header['config'])}); "
                                    f"delete {self.path} or pass --fresh")
            good = [lines[0]]
            for line in lines[1:]:
                try:
                    rec = json.loads(line)
                except ValueError:
                    break  # a partial last line from a killed run
                done[rec["key"]] = rec
                good.append(line)
            atomic_io.write_text(self.path, "\n".join(good) + "\n")
        else:
            complete.unlink(missing_ok=True)
            atomic_io.write_text(self.path, json.dumps({"header": self.header}) + "\n")
        return done

    def append(self, records: list[dict]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
            f.flush()
            os.fsync(f.fileno())


def complete_marker(path: Path) -> Path:
    return path.with_name(path.name + ".complete.json")


def read_rollouts(path: str | Path, allow_partial: bool = False) -> tuple[dict, list[dict]]:
    """(header, records) of a rollout JSONL; refuses an incomplete file unless allow_partial."""
    p = Path(path)
    if not p.is_file():
        raise OpdInputError(f"rollouts {p}: no such file (run opd_gen.py first)")
    if not allow_partial and not complete_marker(p).is_file():
        raise OpdInputError(f"rollouts {p} is incomplete (no {complete_marker(p).name}); rerun opd_gen.py to finish it")
    lines = [x for x in _text(p).split("\n") if x.strip()]
    header = json.loads(lines[0])["header"]
    records = []
    for line in lines[1:]:
        try:
            records.append(json.loads(line))
        except ValueError:
            break
    return header, records


def flatten_samples(records: list[dict], finished_only: bool = False) -> list[dict]:
    """One item per (prompt, sample) in file order: {uid, prompt_ids, completion_ids, finish_reason}."""
    items = []
    for rec in records:
        for j, s in enumerate(rec["samples"]):
            if finished_only and s["finish_reason"] != "stop":
                continue
            if not s["completion_ids"]:
                continue
            items.append({"uid": f"{rec['key']}#{j}", "prompt_ids": rec["prompt_ids"],
                          "completion_ids": s["completion_ids"], "finish_reason": s["finish_reason"]})
    return items


# -------------------------------------------------------------------------------------- model checks
def read_config(model_dir: str | Path, what: str) -> dict:
    p = Path(model_dir) / "config.json"
    if not p.is_file():
        raise OpdInputError(f"{what} {model_dir}: no config.json (not a HF checkpoint directory)")
    return json.loads(p.read_text())


def text_config(cfg: dict) -> dict:
    return cfg.get("text_config") or cfg


def read_student_meta(student_dir: str | Path) -> dict:
    """The student's _ptq_meta.json; a student must be a complete quant_save output."""
    try:
        return ptq_meta.read_meta(student_dir).data
    except ptq_meta.MetaError as e:
        raise OpdInputError(f"student {student_dir}: {e}") from None


def tokenizer_fingerprint(model_dir: str | Path) -> str:
    """Hash of the vocabulary (token -> id) as the tokenizer sees it."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return hashlib.sha256(json.dumps(sorted(tok.get_vocab().items())).encode()).hexdigest()[:16]


def check_same_vocab(teacher_dir: str | Path, student_dir: str | Path) -> None:
    """Teacher log-probs index the student's vocabulary: both must have the same vocab size and tokenizer."""
    vt = text_config(read_config(teacher_dir, "teacher")).get("vocab_size")
    vs = text_config(read_config(student_dir, "student")).get("vocab_size")
    if vt != vs:
        raise OpdInputError(f"teacher {teacher_dir} has vocab_size {vt} but student {student_dir} has {vs}: "
                            f"top-k ids would index different tokens")
    ft, fs = tokenizer_fingerprint(teacher_dir), tokenizer_fingerprint(student_dir)
    if ft != fs:
        raise OpdInputError(f"teacher {teacher_dir} and student {student_dir} have different tokenizers "
                            f"(vocab hash {ft} vs {fs})")


def header_for(kind: str, cfg: dict, argv=None) -> dict:
    return {"kind": kind, "config": cfg, "config_hash": config_hash(cfg), "provenance": provenance.record(argv=argv)}


def padded_batch(items: list[dict]):
    """Right-padded prompt+completion ids and their attention mask: the one layout the scorer and the
    trainer share, so the teacher's row t and the student's row t see the same tokens."""
    import torch

    seqs = [it["prompt_ids"] + it["completion_ids"] for it in items]
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, :len(s)] = torch.tensor(s)
        mask[b, :len(s)] = 1
    return ids, mask


def parse_engine_args(items) -> dict:
    """`--engine-arg KEY=VALUE` (repeatable) -> vLLM LLM(**kwargs): values as JSON when they parse (numbers,
    true/false, lists, objects), else strings. A new vLLM knob costs no code (lm-eval's model_args)."""
    out = {}
    for item in items or ():
        key, sep, raw = str(item).partition("=")
        if not sep or not key.strip():
            raise OpdInputError(f"--engine-arg must be KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(raw)
        except ValueError:
            out[key.strip()] = raw
    return out


def engine_kwargs(base: dict, engine_args: dict, tensor_parallel_size: int, enforce_eager: bool | None) -> dict:
    """vLLM LLM kwargs: ours, then --tensor-parallel-size, --enforce-eager, then --engine-arg (which wins).
    enforce_eager None: CUDA graphs on a GPU, eager on CPU (no graphs exist there; compiling only slows start)."""
    if enforce_eager is None:
        import torch

        enforce_eager = not torch.cuda.is_available()
    return {**base, "tensor_parallel_size": tensor_parallel_size, "enforce_eager": enforce_eager, **engine_args}


def shutdown_engine(llm) -> None:
    """Free the engine's GPUs/workers now (not at interpreter exit): the next step needs the cards."""
    engine = getattr(llm, "llm_engine", None)
    for obj in (engine, getattr(engine, "engine_core", None)):
        fn = getattr(obj, "shutdown", None)
        if fn is not None:
            fn()
            return
