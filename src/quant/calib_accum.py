"""Accumulators of the calibration pass: H = sum x xᵀ per Linear, per routed expert (from the tokens the
router sends it, with token count and router-weight mass), and the blend for starved experts.

Pure tensor arithmetic driven by forward hooks (`calib_stats` installs them); nothing here reads or writes
files.
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


class _StageDone(Exception):
    """Raised inside a layer's forward once every module of the stage being measured has run."""


class LinearStats:
    """Sum of x xᵀ (fp32) over the rows a Linear sees. Linears fed the same tensor (q/k/v, gate/up) share
    one product through `shared` (cleared per batch), so H is computed once per distinct input."""

    def __init__(self, shared: dict | None = None):
        self.h = None
        self.n = 0
        self.shared = {} if shared is None else shared

    def hook(self, module, args):
        x = args[0].detach()
        key = (x.data_ptr(), tuple(x.shape), x._version)
        hit = self.shared.get(key)
        if hit is not None and hit[0] is x:  # the cache holds x, so its address cannot be reused meanwhile
            hh = hit[1]
        else:
            hh = second_moment(x.reshape(-1, x.shape[-1]))
            self.shared[key] = (x, hh)
        self.h = hh.clone() if self.h is None else self.h.add_(hh)
        self.n += x.numel() // x.shape[-1]

    def mean(self):
        return None if self.h is None or self.n == 0 else self.h / self.n


class ExpertStats:
    """Per routed expert: H of its gate/up input and of its down input, from the tokens routed to it."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.num = module.gate_up_proj.shape[0]
        self.transposed = bool(getattr(module, "is_transposed", False))
        self.h_in = self.h_mid = None
        self.pooled_in = None
        self.total = 0
        self.counts = torch.zeros(self.num, dtype=torch.int64)
        self.mass = torch.zeros(self.num, dtype=torch.float64)

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
        x_all = hidden.detach().reshape(-1, hidden.shape[-1]).float()
        d_in = x_all.shape[1]
        if self.h_in is None:
            d_mid = self.module.down_proj.shape[-2] if self.transposed else self.module.down_proj.shape[-1]
            self.h_in = torch.zeros(self.num, d_in, d_in, device=x_all.device)
            self.h_mid = torch.zeros(self.num, d_mid, d_mid, device=x_all.device)
            self.pooled_in = torch.zeros(d_in, d_in, device=x_all.device)
        self.pooled_in += second_moment(hidden.detach().reshape(-1, hidden.shape[-1]))
        self.total += x_all.shape[0]
        idx = idx.reshape(x_all.shape[0], -1)
        weights = weights.reshape(x_all.shape[0], -1)
        with torch.no_grad():
            for e in range(self.num):
                tok, pos = torch.where(idx == e)
                if tok.numel() == 0:
                    continue
                x = x_all[tok]
                self.h_in[e] += second_moment(x)
                mid = self._expert_mid(x, e).float()
                self.h_mid[e] += second_moment(mid)
                self.counts[e] += tok.numel()
                self.mass[e] += float(weights[tok, pos].double().sum())


def blend_expert_stats(h_sum: torch.Tensor, counts: torch.Tensor, min_tokens: int,
                       pooled: torch.Tensor | None = None):
    """Per-expert mean H, shrunk toward the pooled mean below `min_tokens` (quant_methods'
    blend_expert_hessians: the pooled H counts as min_tokens - n prior tokens; 0 tokens -> pooled)."""
    import quant_methods

    n = counts.to(h_sum.device, torch.float32).clamp(min=1.0)
    mean = h_sum / n[:, None, None]
    return quant_methods.blend_expert_hessians(mean, counts, pooled, min_tokens=min_tokens)
