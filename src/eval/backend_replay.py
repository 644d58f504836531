"""Replay: the generations of an earlier run (its <tag>.jsonl), graded again with today's code, no engine."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Mapping

from backend_base import Backend


class ReplayMissing(ValueError):
    """The replay file lacks generations this run asks for (a different --n, benchmark set or data)."""


class ReplayBackend(Backend):
    """Re-grade saved generations (a JSONL of {id, output, finish_reason[, tokens]}) without a model.

    Used after an extractor fix, or to check that two backends grade identically. Lines without an
    ``id`` (the runner's header line) and lines that do not parse (a torn last line) are skipped.
    """

    name = "replay"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"replay file {self.path} does not exist; pass the <tag>.jsonl of an earlier run")
        self.generations: dict[str, dict] = {}
        import eval_text

        for n, line in enumerate(eval_text.utf8_lines(self.path), start=1):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(rec, Mapping) or "id" not in rec:
                continue
            if not isinstance(rec.get("output"), str) or not isinstance(rec.get("finish_reason"), str):
                raise ValueError(f"{self.path}:{n}: record {rec.get('id')!r} lacks a string output/finish_reason")
            gen = {"output": rec["output"], "finish_reason": rec["finish_reason"],
                   "tokens": int(rec.get("tokens") or 0)}
            if rec.get("reasoning") is not None:
                gen["reasoning"] = rec["reasoning"]
            self.generations[str(rec["id"])] = gen
        self.sha256 = hashlib.sha256(self.path.read_bytes()).hexdigest()

    def stream(self, samples):
        missing = [s.id for s in samples if s.id not in self.generations]
        if missing:
            raise ReplayMissing(f"replay file {self.path} has no generation for {len(missing)} of {len(samples)} "
                                f"samples (first: {missing[:3]}); replay the same benchmarks/--n/--data-file as "
                                "the original run")
        for i, sample in enumerate(samples):
            yield i, dict(self.generations[sample.id])

    def identity(self):
        return {"backend": self.name, "replay_sha256": self.sha256}
