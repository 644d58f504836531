"""KL of a student on llama-perplexity's positions, from the same forward moe_eval scores.

llama-perplexity scores only the second half of each chunk (the logits at positions ctx/2 .. ctx-2, each
predicting the next token); moe_eval scores every position. To put our checkpoints and the GGUFs on the
same token set, `PositionTap` wraps a student's logits function: moe_eval's `score_student` calls it once
per window, in window order, and the tap also computes the KL over the positions from `first` on, against
the same cached teacher log-probs (moe_eval's cache, full vocabulary). One forward gives both figures.
"""
from __future__ import annotations

import torch

import bench_paths  # tests/bench/ is on the path of a script run from it

bench_paths.use_project_modules()

import fidelity_math as fm  # noqa: E402


def lp_first_position(ctx: int) -> int:
    """Index (into moe_eval's ctx-1 predictions) of the first position llama-perplexity scores."""
    return ctx // 2


class PositionTap:
    """A logits function that also records the per-window mean KL over predictions [first:]."""

    def __init__(self, logits_fn, windows, cache, cfg, first: int):
        if not 0 <= first < windows.tokens.shape[1] - 1:
            raise ValueError(f"first position {first} is outside the {windows.tokens.shape[1] - 1} predictions "
                             f"of a window")
        self.logits_fn, self.windows, self.cache, self.cfg, self.first = logits_fn, windows, cache, cfg, first
        self.kl: list[float] = []
        self.n_tokens = 0

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        from safetensors import safe_open

        i = len(self.kl)
        if i >= self.windows.tokens.shape[0] or not torch.equal(tokens.cpu(), self.windows.tokens[i]):
            raise RuntimeError(f"PositionTap: call {i} is not window {i} of the evaluation windows")
        logits = self.logits_fn(tokens)
        pred = logits[:-1][self.first:]
        with safe_open(str(self.cache.window_file(i)), framework="pt") as f:
            parts = []
            for a in range(0, pred.shape[0], self.cfg.token_chunk):
                b = min(a + self.cfg.token_chunk, pred.shape[0])
                teacher = f.get_slice("logp")[self.first + a:self.first + b].to(pred.device)
                parts.append(fm.kl_from_logits(teacher, pred[a:b], self.cfg.vocab_chunk).cpu())
        kl = torch.cat(parts)
        self.kl.append(float(kl.double().mean()))
        self.n_tokens += int(kl.numel())
        return logits

    def summary(self, z: float = 1.96) -> dict:
        """Mean over windows (equal lengths: the token mean) with its stderr, like moe_eval's."""
        iv = fm.interval_over_windows(self.kl, z)
        return {"kl_mean": iv.mean, "kl_mean_stderr": iv.stderr, "kl_mean_interval": [iv.lo, iv.hi],
                "n_windows": len(self.kl), "n_scored_tokens": self.n_tokens, "first_position": self.first,
                "per_window_kl": list(self.kl)}
