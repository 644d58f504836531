"""Per-layer checkpoints of the calibration pass: a finished layer leaves a marker (its tensors' sha256, their
statistics summary) and the activations after it; its quantized tensors themselves are already in the output
shards' `.partial` files (`shard_writer.InPlaceShards`), written there once, as they were quantized.

A rerun adopts a layer only if its marker's key matches this build and every tensor still hashes the same in
place; the activations after the last adopted layer are where the pass resumes.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

import atomic_io


class LayerCheckpoints:
    def __init__(self, ckpt_dir: Path, key: dict, store):
        self.dir, self.key, self.store = ckpt_dir, key, store

    def paths(self, tag: str) -> tuple[Path, Path]:
        """(marker json, activations after the layer)."""
        return self.dir / f"{tag}.json", self.dir / f"acts-{tag}.safetensors"

    def load(self, tag: str) -> dict | None:
        """The record of a finished layer, only if it belongs to this build and its tensors are intact."""
        marker, _ = self.paths(tag)
        if not marker.is_file():
            return None
        try:
            rec = json.loads(marker.read_text())
        except (OSError, ValueError):
            return None
        if rec.get("key") != self.key or not isinstance(rec.get("tensors"), dict):
            return None
        if not all(self.store.verify(name, sha) for name, sha in rec["tensors"].items()):
            return None
        return rec

    def has_acts(self, tag: str) -> bool:
        return self.paths(tag)[1].is_file()

    def load_acts(self, tag: str) -> torch.Tensor:
        from safetensors.torch import load_file

        return load_file(str(self.paths(tag)[1]))["x"]

    def save(self, tag: str, tensors: dict, stats: dict, experts: dict, acts: torch.Tensor | None) -> None:
        """`tensors`: name -> sha256 of the bytes already written in place."""
        from safetensors.torch import save

        marker, apath = self.paths(tag)
        if acts is not None:
            atomic_io.write_bytes(apath, save({"x": acts.detach().to("cpu").contiguous()}))
        atomic_io.write_json(marker, {"key": self.key, "tensors": dict(sorted(tensors.items())), "stats": stats,
                                      "experts": experts})

    def drop_acts(self, tag: str) -> None:
        self.paths(tag)[1].unlink(missing_ok=True)
