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

import opd_data

LOSSES = opd_data.LOSSES
# log of the smallest teacher rest mass we trust: an fp32 sum of k probabilities is exact to ~k * 2^-24.
DEFAULT_REST_FLOOR = opd_data.DEFAULT_REST_FLOOR


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


def bucket_divergence(s: torch.Tensor, t: torch.Tensor, loss: str = "reverse_kl", beta: float = 0.5) -> torch.Tensor:
    """Per-token divergence [N] between student buckets s and teacher buckets t ([N, k+1] log-probs).

    reverse_kl: KL(student || teacher), the on-policy objective (mode seeking, what the student samples);
    forward_kl: KL(teacher || student), the off-policy / supervised objective (mass covering);
    jsd: generalised Jensen-Shannon with weight beta on the teacher,
         beta * KL(T || M) + (1 - beta) * KL(S || M), M = beta * T + (1 - beta) * S (TRL GKD's beta).
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if loss == "reverse_kl":
        return _kl(s, t)
    if loss == "forward_kl":
        return _kl(t, s)
    if not 0.0 < beta < 1.0:
        raise ValueError(f"jsd beta must be in (0, 1), got {beta}")
    m = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log(1.0 - beta)]), dim=0)
    return beta * _kl(t, m) + (1.0 - beta) * _kl(s, m)


def token_divergence(student_logits: torch.Tensor, topk_ids: torch.Tensor, teacher_logp: torch.Tensor,
                     teacher_rest: torch.Tensor, loss: str = "reverse_kl", beta: float = 0.5,
                     rest_floor: float = DEFAULT_REST_FLOOR) -> torch.Tensor:
    """Per-token divergence [N] from full [N, V] student logits (the reference the chunked path must equal)."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    return bucket_divergence(student_buckets(student_logits, topk_ids),
                             teacher_buckets(teacher_logp, teacher_rest, rest_floor), loss, beta)


# ------------------------------------------------------------------------------ chunked LM head + buckets
def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    return torch.matmul(hidden, weight[lo:hi].transpose(0, 1)).float()


def _ids_in(ids: torch.Tensor, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row, column in the chunk, position in top-k) of every top-k id inside vocab slice [lo, hi)."""
    rows, pos = ((ids >= lo) & (ids < hi)).nonzero(as_tuple=True)
    return rows, ids[rows, pos] - lo, pos


class _ChunkedBuckets(torch.autograd.Function):
    """hidden [N, H] @ lm_head [V, H]^T folded onto the k+1 buckets without a [N, V] tensor: the vocabulary is
    walked in slices of `vocab_chunk` in the forward AND again in the backward (logits are recomputed, never
    kept). Backward, with p = softmax(z), P_r the rest mass and g the bucket gradient:
    dz_j = -p_j * sum(g) + g_rest * [j not in top-k] * p_j / P_r + g_top[i] * [j == id_i].
    The LM head is frozen (LoRA never adapts it): no gradient for the weight."""

    @staticmethod
    def forward(ctx, hidden, weight, ids, vocab_chunk: int):
        n, k, vocab = hidden.shape[0], ids.shape[1], weight.shape[0]
        top = torch.empty(n, k, dtype=torch.float32, device=hidden.device)
        lse_parts, rest_parts = [], []
        with torch.no_grad():
            for lo in range(0, vocab, vocab_chunk):
                hi = min(lo + vocab_chunk, vocab)
                z = _chunk_logits(hidden, weight, lo, hi)
                lse_parts.append(torch.logsumexp(z, -1))
                rows, cols, pos = _ids_in(ids, lo, hi)
                top[rows, pos] = z[rows, cols]
                z[rows, cols] = float("-inf")
                rest_parts.append(torch.logsumexp(z, -1))
            lse = torch.logsumexp(torch.stack(lse_parts, -1), -1)
            rest = torch.logsumexp(torch.stack(rest_parts, -1), -1)
        ctx.save_for_backward(hidden, weight, ids, lse, rest)
        ctx.vocab_chunk = vocab_chunk
        return torch.cat([top - lse[:, None], (rest - lse)[:, None]], -1)

    @staticmethod
    def backward(ctx, g):
        hidden, weight, ids, lse, rest = ctx.saved_tensors
        k, vocab = ids.shape[1], weight.shape[0]
        g = g.float()
        g_sum, g_rest, g_top = g.sum(-1, keepdim=True), g[:, k:], g[:, :k]
        dh = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        for lo in range(0, vocab, ctx.vocab_chunk):
            hi = min(lo + ctx.vocab_chunk, vocab)
            z = _chunk_logits(hidden, weight, lo, hi)
            rows, cols, pos = _ids_in(ids, lo, hi)
            p = torch.exp(z - lse[:, None])
            z[rows, cols] = float("-inf")
            dz = torch.exp(z - rest[:, None]).mul_(g_rest).sub_(p.mul_(g_sum))
            dz.index_put_((rows, cols), g_top[rows, pos], accumulate=True)
            dh.add_(torch.matmul(dz.to(weight.dtype), weight[lo:hi]))  # the dtype an unchunked head's backward uses
        return dh.to(hidden.dtype), None, None, None


def chunked_token_divergence(hidden: torch.Tensor, lm_head: torch.Tensor, topk_ids: torch.Tensor,
                             teacher_logp: torch.Tensor, teacher_rest: torch.Tensor, loss: str = "reverse_kl",
                             beta: float = 0.5, rest_floor: float = DEFAULT_REST_FLOOR, token_chunk: int = 1024,
                             vocab_chunk: int = 32768) -> torch.Tensor:
    """`token_divergence(hidden @ lm_head.T, ...)` without ever holding [N, V]: tokens in chunks of
    `token_chunk`, the vocabulary in slices of `vocab_chunk` (fp32 temporaries [token_chunk, vocab_chunk],
    whatever V is). Gradients flow into `hidden` only; the LM head must be frozen."""
    if token_chunk < 1 or vocab_chunk < 1:
        raise ValueError(f"token_chunk and vocab_chunk must be >= 1, got {token_chunk}, {vocab_chunk}")
    if lm_head.requires_grad:
        raise ValueError("chunked_token_divergence: the LM head must be frozen (no LoRA on lm_head)")
    t_all = teacher_buckets(teacher_logp, teacher_rest, rest_floor)
    out = []
    for lo in range(0, hidden.shape[0], token_chunk):
        hi = min(lo + token_chunk, hidden.shape[0])
        s = _ChunkedBuckets.apply(hidden[lo:hi], lm_head, topk_ids[lo:hi].long(), vocab_chunk)
        out.append(bucket_divergence(s, t_all[lo:hi], loss, beta))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def masked_token_sum(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of per-token values where mask is true (the caller divides by the global token count)."""
    return (per_token * mask.to(per_token.dtype)).sum()
