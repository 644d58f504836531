"""Accumulators of the calibration pass: H = sum x xᵀ per Linear; per routed expert the rows the router sends
it (with token count and router-weight mass), turned into H a chunk of experts at a time; the blend for
starved experts.

Pure tensor arithmetic driven by forward hooks (`calib_forward` installs them); nothing here reads or writes
files.

Why routed experts keep rows, not H: a layer of the 122B has 256 experts of [3072, 3072] + [1024, 1024] fp32
H, 10.7 GB, while the rows the router sends them are tokens x top-k x (3072 bf16 + 1024 fp32): 0.34 GB at
4096 tokens, 2.7 GB at 32768. H is then formed for `expert_chunk` experts at a time, just before they are
quantized, by the same products in the same order as a running sum would have used (bit-identical).
"""
from __future__ import annotations

import torch
from torch import nn


def second_moment(x: torch.Tensor) -> torch.Tensor:
    """xᵀx in fp32. bf16 activations are multiplied in bf16 (fp32 accumulation inside the kernel, 5x faster
    than fp32 on AVX512-BF16 CPUs) in blocks of 1024 rows, each block's sum rounded once to bf16 (2^-9
    relative) and accumulated in fp32: H's error stays far below GPTQ's 1% damping."""
    if x.dtype != torch.bfloat16:
        xf = x.float()
        return xf.T @ xf
    out = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
    for r0 in range(0, x.shape[0], 1024):
        xb = x[r0:r0 + 1024]
        out += (xb.T @ xb).float()
    return out


class StageDone(Exception):
    """Raised inside a layer's forward once every module of the stage being measured has run."""


class ForwardCache:
    """x xᵀ of the tensors seen in the current batch, so Linears fed the same tensor (q/k/v, gate/up) compute
    it once. The pass clears it before each batch (`clear`); the cache holds x, so its address cannot be
    reused while an entry is alive."""

    def __init__(self):
        self.entries: dict = {}
        self.batch = 0  # the calibration batch being run (run_layer sets it): the key of kept per-batch parts

    def clear(self, batch: int | None = None) -> None:
        self.entries.clear()
        if batch is not None:
            self.batch = batch

    def second_moment(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.data_ptr(), tuple(x.shape), x._version)
        hit = self.entries.get(key)
        if hit is not None and hit[0] is x:
            return hit[1]
        hh = second_moment(x.reshape(-1, x.shape[-1]))
        self.entries[key] = (x, hh)
        return hh


class LinearStats:
    """Sum of x xᵀ (fp32) over the rows a Linear sees (a forward pre-hook).

    `keep`: a replica's stats on one of several devices keep each call's x xᵀ with its batch index instead of
    the running sum, so `reduce_linear_stats` can add them in the one-device order (the same bits)."""

    def __init__(self, cache: ForwardCache | None = None, keep: bool = False):
        self.h = None
        self.n = 0
        self.cache = cache or ForwardCache()
        self.parts: list | None = [] if keep else None  # (batch, x xᵀ) per call

    def hook(self, module, args):
        x = args[0].detach()
        hh = self.cache.second_moment(x)
        if self.parts is not None:
            self.parts.append((self.cache.batch, hh))
        else:
            self.h = hh.clone() if self.h is None else self.h.add_(hh)
        self.n += x.numel() // x.shape[-1]

    def mean(self):
        return None if self.h is None or self.n == 0 else self.h / self.n


class ExpertStats:
    """Per routed expert: the gate/up input rows and down input rows from the tokens routed to it, per batch.

    One host sync per batch (the per-expert counts), none per expert. `keep` (a replica on one of several
    devices): the pooled input's x xᵀ and the router mass are kept per call with the batch index (`cache.batch`)
    for `reduce_expert_stats`, instead of summed."""

    def __init__(self, module: nn.Module, cache: ForwardCache | None = None, keep: bool = False):
        self.module = module
        self.cache = cache
        self.parts: list | None = [] if keep else None  # (batch, pooled x xᵀ, router mass) per call
        self.batch_ids: list = []  # the batch of each entry of self.batches
        self.num = module.gate_up_proj.shape[0]
        self.transposed = bool(getattr(module, "is_transposed", False))
        self.batches: list = []  # per batch: (counts list, rows_in per expert, rows_mid per expert)
        self.pooled_in = None
        self.total = 0
        self.counts = torch.zeros(self.num, dtype=torch.int64)
        self.mass = torch.zeros(self.num, dtype=torch.float64)

    @property
    def ran(self) -> bool:
        return self.pooled_in is not None

    def _expert_mid(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """The down projection's input for expert e, computed the way transformers' experts module does
        (`is_transposed`: x @ W as gpt_oss stores it; `has_bias`; `_apply_gate`: the family's gating)."""
        m = self.module
        w = m.gate_up_proj[e].float()
        gu = x @ w if self.transposed else nn.functional.linear(x, w)
        if getattr(m, "has_bias", False) and getattr(m, "gate_up_proj_bias", None) is not None:
            gu = gu + m.gate_up_proj_bias[e].float()
        if hasattr(m, "_apply_gate"):
            return m._apply_gate(gu)
        gate, up = gu.chunk(2, dim=-1)
        return m.act_fn(gate) * up

    def hook(self, module, args, kwargs):
        vals = list(args) + [v for v in kwargs.values() if isinstance(v, torch.Tensor)]
        hidden, idx, weights = vals[0], vals[1], vals[2]
        x = hidden.detach().reshape(-1, hidden.shape[-1])
        n = x.shape[0]
        if self.pooled_in is None:
            self.pooled_in = torch.zeros(x.shape[1], x.shape[1], device=x.device)
        if self.parts is None:
            self.pooled_in += second_moment(x)
        self.total += n
        flat = idx.reshape(n, -1).reshape(-1)
        k = flat.numel() // n
        order = torch.argsort(flat, stable=True)  # by expert; within an expert, tokens in ascending order
        experts_sorted = flat[order]
        counts = torch.bincount(experts_sorted, minlength=self.num)
        c = counts.tolist()  # the one host sync of the batch
        rows = x[order // k]
        picked = weights.reshape(-1)[order].double()
        with torch.no_grad():
            mass = torch.zeros(self.num, dtype=torch.float64, device=picked.device).index_add_(
                0, experts_sorted, picked).cpu()
            if self.parts is None:
                self.mass += mass
            else:
                self.parts.append((self.cache.batch if self.cache is not None else 0, second_moment(x), mass))
            self.counts += counts.cpu()
            rows_in = list(rows.split(c))
            rows_mid = [self._expert_mid(r.float(), e).float() if c[e] else None for e, r in enumerate(rows_in)]
        self.batches.append((c, rows_in, rows_mid))
        self.batch_ids.append(self.cache.batch if self.cache is not None else len(self.batch_ids))

    def hessian_sums(self, e0: int, e1: int, which: str) -> torch.Tensor:
        """[e1 - e0, K, K] fp32 sums of x xᵀ for experts e0..e1-1 ("in": gate/up input, "mid": down input),
        batch by batch in the order they ran (as a running sum would add them)."""
        proj = self.module.gate_up_proj if which == "in" else self.module.down_proj
        d = proj.shape[-2] if self.transposed else proj.shape[-1]
        dev = self.pooled_in.device
        out = torch.zeros(e1 - e0, d, d, dtype=torch.float32, device=dev)
        for c, rows_in, rows_mid in self.batches:
            rows = rows_in if which == "in" else rows_mid
            for e in range(e0, e1):
                if c[e]:
                    out[e - e0] += second_moment(rows[e].float())
        return out

    def pooled_mid(self, chunk: int = 16) -> torch.Tensor:
        """Token-weighted mean of the experts' own down-input H (= the sum of every routed row's x xᵀ over the
        routed rows): formed `chunk` experts at a time, added expert by expert in fp64 (the same bits whatever
        the chunk)."""
        acc = None
        for e0 in range(0, self.num, chunk):
            part = self.hessian_sums(e0, min(self.num, e0 + chunk), "mid")
            for j in range(part.shape[0]):
                acc = part[j].double() if acc is None else acc + part[j].double()
        total = float(self.counts.sum())
        return (acc / total).float() if total > 0 else torch.zeros_like(acc, dtype=torch.float32)

    def release(self) -> None:
        self.batches, self.batch_ids, self.parts = [], [], (None if self.parts is None else [])


def reduce_linear_stats(replicas: list[LinearStats], device) -> LinearStats:
    """One Linear's stats from its replicas on several devices (each with `keep`), onto `device`: every call's
    x xᵀ added in batch order, exactly as the one-device running sum adds them (the same fp32 bits)."""
    parts = sorted(((b, rank, i, hh) for rank, r in enumerate(replicas) for i, (b, hh) in enumerate(r.parts)),
                   key=lambda p: p[:3])
    out = LinearStats()
    for _, _, _, hh in parts:
        hh = hh.to(device)
        out.h = hh.clone() if out.h is None else out.h.add_(hh)
    out.n = sum(r.n for r in replicas)
    return out


def reduce_expert_stats(replicas: list[ExpertStats], module: nn.Module, device) -> ExpertStats:
    """One experts module's stats from its replicas (each with `keep`), onto `device` and the primary `module`:
    routed rows in batch order, the pooled H and the router mass summed in batch order (the one-device bits;
    counts and totals are integers)."""
    out = ExpertStats(module)
    ran = [r for r in replicas if r.ran]
    if not ran:
        return out
    rows = sorted(((b, rank, i) for rank, r in enumerate(replicas) for i, b in enumerate(r.batch_ids)))
    for _, rank, i in rows:
        c, rows_in, rows_mid = replicas[rank].batches[i]
        out.batches.append((c, [t.to(device) for t in rows_in],
                            [None if t is None else t.to(device) for t in rows_mid]))
        out.batch_ids.append(len(out.batch_ids))
    k = ran[0].pooled_in.shape[0]
    out.pooled_in = torch.zeros(k, k, device=device)
    for _, _, _, sm, mass in sorted(((b, rank, i, sm, m) for rank, r in enumerate(replicas)
                                     for i, (b, sm, m) in enumerate(r.parts)), key=lambda p: p[:3]):
        out.pooled_in += sm.to(device)
        out.mass += mass
    for r in replicas:
        out.counts += r.counts
        out.total += r.total
    return out


def blend_expert_stats(h_sum: torch.Tensor, counts: torch.Tensor, min_tokens: int,
                       pooled: torch.Tensor | None = None):
    """Per-expert mean H, shrunk toward the pooled mean below `min_tokens` (quant_methods'
    blend_expert_hessians: the pooled H counts as min_tokens - n prior tokens; 0 tokens -> pooled).
    Per expert elementwise, so a chunk of experts blends exactly as the whole layer would."""
    import quant_methods

    n = counts.to(h_sum.device, torch.float32).clamp(min=1.0)
    h_sum.div_(n[:, None, None])  # in place: one [chunk, K, K] buffer, not several
    return quant_methods.blend_expert_hessians(h_sum, counts, pooled, min_tokens=min_tokens)
