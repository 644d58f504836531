"""Fidelity math as pure functions: log-normalizers, NLL, KL(teacher||student), top-1, intervals.

Everything works on [T, V] logit slices and walks the vocabulary in slices of `vocab_chunk`, so the
fp32 temporaries are [T, vocab_chunk] however large V is (a 248K vocabulary at T=64 and 32K slices
costs ~8 MiB per temporary, not 64 MiB per upcast copy of the whole row block).

"Logits" here means any unnormalized log-scores: raw model logits and cached log-probabilities are
treated alike, because every function renormalizes with its own log-sum-exp. That is what makes a
cache of rounded (fp16) teacher log-probs safe: rounding perturbs the distribution a little, but it
is renormalized, so KL(teacher||teacher) stays >= 0 and only second-order small.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import torch


def _check_chunk(vocab_chunk: int) -> None:
    if not isinstance(vocab_chunk, int) or vocab_chunk <= 0:
        raise ValueError(f"vocab_chunk must be a positive integer, got {vocab_chunk!r}")


def vocab_slices(vocab: int, vocab_chunk: int):
    """Consecutive slices of width vocab_chunk covering [0, vocab)."""
    _check_chunk(vocab_chunk)
    for start in range(0, vocab, vocab_chunk):
        yield slice(start, min(start + vocab_chunk, vocab))


def logsumexp_chunked(logits: torch.Tensor, vocab_chunk: int,
                      exclude_ids: torch.Tensor | None = None) -> torch.Tensor:
    """[T, V] -> [T] fp32 log-sum-exp, streaming over vocab slices (running max + rescaled sum).

    exclude_ids [T, K]: entries left out of the sum (the 'rest' mass of a top-K cache), masked slice by
    slice so no full-width copy is made.
    """
    t = logits.shape[0]
    run_max = torch.full((t,), -math.inf, dtype=torch.float32, device=logits.device)
    run_sum = torch.zeros(t, dtype=torch.float32, device=logits.device)
    for sl in vocab_slices(logits.shape[-1], vocab_chunk):
        part = logits[:, sl].float()
        if exclude_ids is not None:
            part = part.masked_fill(_slice_mask(exclude_ids.to(logits.device), sl, part.shape[1]), -math.inf)
        new_max = torch.maximum(run_max, part.amax(dim=1))
        # a row that is -inf so far (or entirely) keeps a finite shift of 0 so exp() gives 0, not NaN
        shift = torch.where(torch.isfinite(new_max), new_max, torch.zeros_like(new_max))
        run_sum = run_sum * torch.exp(run_max - shift) + torch.exp(part - shift[:, None]).sum(dim=1)
        run_max = new_max
    shift = torch.where(torch.isfinite(run_max), run_max, torch.zeros_like(run_max))
    return torch.log(run_sum) + shift


def _slice_mask(ids: torch.Tensor, sl: slice, width: int) -> torch.Tensor:
    """[T, width] bool: which columns of vocab slice `sl` appear in the per-row ids [T, K]."""
    local = ids.long() - sl.start
    inside = (local >= 0) & (local < width)
    hits = torch.zeros(ids.shape[0], width, dtype=torch.int32, device=ids.device)
    hits.scatter_add_(1, local.clamp(0, width - 1), inside.to(torch.int32))
    return hits > 0


def nll_from_logits(logits: torch.Tensor, targets: torch.Tensor, vocab_chunk: int,
                    lse: torch.Tensor | None = None) -> torch.Tensor:
    """[T, V] logits, [T] target ids -> [T] fp32 negative log-likelihood of the targets."""
    if lse is None:
        lse = logsumexp_chunked(logits, vocab_chunk)
    picked = logits.gather(1, targets.to(logits.device).long()[:, None]).squeeze(1).float()
    return lse - picked


def kl_from_logits(teacher: torch.Tensor, student: torch.Tensor, vocab_chunk: int,
                   lse_teacher: torch.Tensor | None = None,
                   lse_student: torch.Tensor | None = None) -> torch.Tensor:
    """[T, V] x [T, V] -> [T] fp32 KL(softmax(teacher) || softmax(student)), exact over the full vocab.

    Two passes over vocab slices: the normalizers, then sum_v p_v (log p_v - log q_v). Terms with
    p_v = 0 contribute 0 (so -inf teacher entries are fine); q_v = 0 where p_v > 0 gives +inf, as it should.
    """
    if teacher.shape != student.shape or teacher.ndim != 2:
        raise ValueError(f"teacher and student must be matching [T, V] tensors, got {tuple(teacher.shape)} "
                         f"and {tuple(student.shape)}")
    if lse_teacher is None:
        lse_teacher = logsumexp_chunked(teacher, vocab_chunk)
    if lse_student is None:
        lse_student = logsumexp_chunked(student, vocab_chunk)
    total = torch.zeros(teacher.shape[0], dtype=torch.float64, device=teacher.device)
    for sl in vocab_slices(teacher.shape[-1], vocab_chunk):
        logp = teacher[:, sl].float() - lse_teacher[:, None]
        logq = student[:, sl].float().to(teacher.device) - lse_student.to(teacher.device)[:, None]
        p = torch.exp(logp)
        term = torch.where(p > 0, p * (logp - logq), torch.zeros_like(p))
        total += term.sum(dim=1, dtype=torch.float64)
    return total.float()


def rest_log_mass(logits: torch.Tensor, ids: torch.Tensor, vocab_chunk: int,
                  lse: torch.Tensor | None = None) -> torch.Tensor:
    """[T] fp32 log of the probability mass OUTSIDE the ids [T, K] (-inf when the ids cover everything)."""
    if lse is None:
        lse = logsumexp_chunked(logits, vocab_chunk)
    return logsumexp_chunked(logits, vocab_chunk, exclude_ids=ids) - lse


def kl_topk_lower_bound(teacher_topk_logp: torch.Tensor, teacher_topk_ids: torch.Tensor,
                        teacher_rest_logp: torch.Tensor, student: torch.Tensor, vocab_chunk: int,
                        lse_student: torch.Tensor | None = None) -> torch.Tensor:
    """[T] KL between the two distributions COARSENED to {top-K teacher tokens} + one 'rest' bucket.

    By the log-sum inequality merging outcomes never increases KL, so this is a LOWER BOUND on the full
    KL, equal to it when the rest carries no teacher mass or when student/teacher ratios are constant on
    the rest. Used only when a full-vocabulary teacher cache would not fit on disk.
    """
    if lse_student is None:
        lse_student = logsumexp_chunked(student, vocab_chunk)
    dev = student.device
    ids = teacher_topk_ids.to(dev).long()
    logp = teacher_topk_logp.to(dev).double()
    logq = student.gather(1, ids).double() - lse_student.double()[:, None]
    p = torch.exp(logp)
    head = torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(dim=1)
    logr_p = teacher_rest_logp.to(dev).double()
    logr_q = rest_log_mass(student, ids, vocab_chunk, lse_student).double()
    r_p = torch.exp(logr_p)
    tail = torch.where(r_p > 0, r_p * (logr_p - logr_q), torch.zeros_like(r_p))
    return (head + tail).float()


def argmax_ids(logits: torch.Tensor) -> torch.Tensor:
    """[T, V] -> [T] int64 top-1 ids (first index on ties, the same rule for teacher and student)."""
    return logits.argmax(dim=-1)


@dataclass(frozen=True)
class Interval:
    """Mean of per-window values with a normal-approximation interval (windows are the unit of sampling)."""

    mean: float
    stderr: float | None
    lo: float | None
    hi: float | None
    n: int

    def as_dict(self) -> dict:
        return {"mean": self.mean, "stderr": self.stderr, "lo": self.lo, "hi": self.hi, "n": self.n}


def interval_over_windows(values, z: float = 1.96) -> Interval:
    """mean +/- z * s / sqrt(n) with s the sample standard deviation (n-1) of the per-window values.

    Tokens inside one window are correlated, so the window (not the token) is the independent unit.
    Fewer than 2 windows: no interval (None), never a fake zero-width one.
    """
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("interval_over_windows needs at least one value, got none")
    if z <= 0:
        raise ValueError(f"z must be > 0, got {z}")
    mean = statistics.fmean(vals)
    if len(vals) < 2:
        return Interval(mean, None, None, None, len(vals))
    se = statistics.stdev(vals) / math.sqrt(len(vals))
    return Interval(mean, se, mean - z * se, mean + z * se, len(vals))


def ppl_from_nll_interval(nll: Interval) -> dict:
    """Perplexity exp(mean NLL) with the NLL interval mapped through exp (exp is monotone)."""
    return {"ppl": math.exp(nll.mean),
            "lo": None if nll.lo is None else math.exp(nll.lo),
            "hi": None if nll.hi is None else math.exp(nll.hi)}


def paired_delta(a: list, b: list, z: float = 1.96) -> dict:
    """Mean and interval of per-window KL(a) - KL(b) (same windows, so paired)."""
    d = interval_over_windows([x - y for x, y in zip(a, b)], z)
    return {"mean": d.mean, "lo": d.lo, "hi": d.hi}
