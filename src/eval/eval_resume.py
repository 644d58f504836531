"""The per-sample JSONL of a run (<tag>.jsonl): what a killed run resumes from.

Line 1 is a header (schema, config hash, generation config, record order). Every graded sample is
appended and fsynced the moment its grade exists, in whatever order grading finishes ("record_order":
"graded"); a reader keys records by id. When a run completes, the file is rewritten atomically in
sample order ("record_order": "sample"), so two complete runs of the same evaluation are byte-identical.

A line is reused on resume only when it is complete and its prompt hash and config hash match this run.
A reused line keeps its generation; its verdict is graded again when the grade is missing or failed (a
grader crash, no official verdict yet) or was written under another grader fingerprint (eval_fingerprint),
and the truncation rule is always re-applied from its finish_reason. The file is trusted input beyond
that: a hand-edited verdict under the current fingerprint is not detected on resume; `--regrade` (re-grade
every stored generation) is the audit. Outputs with invalid Unicode (a lone surrogate) are stored \\u-escaped.
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Mapping, Sequence

import atomic_io
import results_schema


class ResumeMismatch(RuntimeError):
    """The results JSONL on disk was produced under a different config or prompt; reusing it would lie."""


def header(gen_cfg: dict, cfg_hash: str, record_order: str, fingerprint: str | None = None) -> dict:
    return {"header": {"schema": results_schema.SCHEMA_VERSION, "config_hash": cfg_hash, "generation": gen_cfg,
                       "record_order": record_order, "grader_fingerprint": fingerprint,
                       "note": "graded: lines in grading-completion order (keyed by id); sample: dataset order"}}


def record_line(rec: Mapping) -> str:
    """One JSON line; readable UTF-8 where possible, \\u-escaped when the text is not valid Unicode."""
    line = json.dumps(rec, ensure_ascii=False, default=str, allow_nan=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        line = json.dumps(rec, ensure_ascii=True, default=str, allow_nan=False)
    return line + "\n"


def _config_diff(old: Mapping, new: Mapping) -> str:
    keys = sorted(set(old) | set(new))
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)) or "(unknown)"


def needs_regrade(rec: Mapping, fingerprint: str | None = None) -> bool:
    """A reusable generation whose grade must be redone: the grader failed, no official verdict yet, or
    the verdict was written by other grading code than this run's (fingerprint given)."""
    return (rec.get("grade_status", "ok") == results_schema.GRADER_ERROR or "official_correct" not in rec
            or (fingerprint is not None and rec.get("grader_fingerprint") != fingerprint))


def reapply_truncation(rec: Mapping) -> dict:
    """The record with `correct` derived again from graded_correct and finish_reason: a stored row that
    says a cut-off answer is correct does not survive a resume."""
    correct = bool(rec.get("graded_correct")) and rec.get("finish_reason") != results_schema.TRUNCATED
    return dict(rec) if rec.get("correct") is correct else {**rec, "correct": correct}


def read_header(path: Path) -> dict:
    """The header of a results JSONL; ValueError naming the file when there is none."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            first = json.loads(f.readline() or "null")
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: cannot read its header line: {err}") from None
    if not isinstance(first, dict) or "header" not in first:
        raise ValueError(f"{path}:1: no header line; not a results JSONL written by this harness")
    return first["header"]


def read_resumable(path: Path, samples_by_id: Mapping, gen_cfg: dict, cfg_hash: str) -> tuple[dict, list, int]:
    """(trusted records by id, records of samples not in this run, torn lines skipped).

    Raises ResumeMismatch when the file was written under another generation config, or a sample's
    prompt changed: mixing those with new generations would make the result describe no single setup.
    A later line for the same id wins (a re-graded sample is appended again).
    """
    trusted, others, torn = {}, {}, 0
    if not path.exists():
        return trusted, [], torn
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                torn += 1
                continue
            if isinstance(rec, dict) and "header" in rec:
                old = rec["header"].get("generation", {})
                if rec["header"].get("config_hash") != cfg_hash:
                    raise ResumeMismatch(f"{path} was generated with a different config ({_config_diff(old, gen_cfg)})")
                continue
            if not results_schema.is_complete_record(rec):
                torn += 1
                continue
            if rec["config_hash"] != cfg_hash:
                raise ResumeMismatch(f"{path}: sample {rec['id']!r} was generated with config {rec['config_hash']}, "
                                     f"this run is {cfg_hash}")
            sample = samples_by_id.get(rec["id"])
            if sample is None:
                others[rec["id"]] = rec
            elif rec["prompt_hash"] != results_schema.prompt_hash(sample.messages):
                raise ResumeMismatch(f"{path}: the prompt of {rec['id']!r} changed since it was generated "
                                     "(new dataset revision or prompt builder)")
            else:
                trusted[rec["id"]] = rec
    return trusted, list(others.values()), torn


def rewrite(path: Path, head: Mapping, records: Sequence[Mapping]) -> None:
    """Replace the whole file atomically (readers see the old file or the new one, never a torn one)."""
    with atomic_io.writing(path, "w", encoding="utf-8") as f:
        for rec in (head, *records):
            f.write(record_line(rec))


class SampleLog:
    """Append-only, thread-safe writer of graded samples; each append is flushed and fsynced before it
    returns, so a SIGKILL right after loses nothing that was graded."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._f = open(self.path, "a", encoding="utf-8")
        self._lock = threading.Lock()

    def append(self, records: Sequence[Mapping]) -> None:
        if not records:
            return
        lines = []
        for rec in records:
            try:
                lines.append(record_line(rec))
            except (TypeError, ValueError) as err:
                raise ValueError(f"{self.path}: cannot store sample {rec.get('id')!r}: {err}") from None
        with self._lock:
            if self._f.closed:  # a grade that arrived after the run closed its log (an interrupt): not kept
                return
            self._f.write("".join(lines))
            self._f.flush()
            os.fsync(self._f.fileno())

    def close(self) -> None:
        with self._lock:
            if not self._f.closed:
                self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
