"""Distillation losses over the teacher's top-k plus one "rest" bucket: pure functions on tensors.

The teacher is stored as its top-k log-probs (log-softmax over the FULL vocabulary, not renormalised)
and the log of the mass it puts on every other token (`rest`). The student's full-vocabulary
distribution is folded onto the same k+1 buckets: its log-prob of each of the teacher's top-k ids, and
the log of all its remaining mass. Every divergence below is then exact on that (k+1)-bucket
partition of the vocabulary (a lower bound of the full-vocabulary divergence, by the data-processing
inequality), and no bucket is ever given a made-up probability:

* the tail is explicit. Student mass outside the teacher's top-k is compared with the teacher's real
  rest mass, not with log(1e-12) as a renormalised top-k would do;
* a teacher rest mass of exactly 0 (a scorer that only saw the top-k, all its mass in the top-k) is
  floored at `rest_floor` (a log-mass, documented in docs/OPD.md), the resolution of an fp32 sum of
  k probabilities, never at an arbitrary tiny constant.

Shapes: tokens are rows. teacher_logp [N, k], teacher_rest [N], student_logits [N, V], topk_ids [N, k].
"""
from __future__ import annotations

import math

import torch

LOSSES = ("reverse_kl", "forward_kl", "jsd")
# log of the smallest teacher rest mass we trust: an fp32 sum of k probabilities is exact to ~k * 2^-24.
DEFAULT_REST_FLOOR = math.log(2.0 ** -24)


def student_buckets(student_logits: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """[N, V] logits, [N, k] ids -> [N, k+1] log-probs: the k teacher ids, then the student's rest mass."""
    logits = student_logits.float()
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    top = logits.gather(-1, topk_ids.long()) - lse
    masked = logits.scatter(-1, topk_ids.long(), float("-inf"))
    rest = torch.logsumexp(masked, dim=-1, keepdim=True) - lse
    return torch.cat([top, rest], dim=-1)


def teacher_buckets(teacher_logp: torch.Tensor, teacher_rest: torch.Tensor,
                    rest_floor: float = DEFAULT_REST_FLOOR) -> torch.Tensor:
    """[N, k] top-k log-probs + [N] rest log-mass -> [N, k+1] log-probs (rest floored, see module doc)."""
    rest = torch.clamp(teacher_rest.float(), min=rest_floor)
    return torch.cat([teacher_logp.float(), rest[:, None]], dim=-1)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Row-wise KL(p || q) of [N, B] log-probs; a bucket with p == 0 contributes 0 (p log p -> 0)."""
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    return terms.sum(-1)


def token_divergence(student_logits: torch.Tensor, topk_ids: torch.Tensor, teacher_logp: torch.Tensor,
                     teacher_rest: torch.Tensor, loss: str = "reverse_kl", beta: float = 0.5,
                     rest_floor: float = DEFAULT_REST_FLOOR) -> torch.Tensor:
    """Per-token divergence [N] between the student and the teacher on the k+1 buckets.

    reverse_kl: KL(student || teacher), the on-policy objective (mode seeking, what the student samples);
    forward_kl: KL(teacher || student), the off-policy / supervised objective (mass covering);
    jsd: generalised Jensen-Shannon with weight beta on the teacher,
         beta * KL(T || M) + (1 - beta) * KL(S || M), M = beta * T + (1 - beta) * S (TRL GKD's beta).
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    s = student_buckets(student_logits, topk_ids)
    t = teacher_buckets(teacher_logp, teacher_rest, rest_floor)
    if loss == "reverse_kl":
        return _kl(s, t)
    if loss == "forward_kl":
        return _kl(t, s)
    if not 0.0 < beta < 1.0:
        raise ValueError(f"jsd beta must be in (0, 1), got {beta}")
    m = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log(1.0 - beta)]), dim=0)
    return beta * _kl(t, m) + (1.0 - beta) * _kl(s, m)


def masked_token_sum(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of per-token values where mask is true (the caller divides by the global token count)."""
    return (per_token * mask.to(per_token.dtype)).sum()
