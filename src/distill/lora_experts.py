"""Routed experts through LoRA + fake-quant, computed for the experts that got tokens only, never kept.

Why: the parametrization in lora_quant.py materializes Q(W + BA) for ALL experts of a layer at every access
(256 x [3, 1024, 3072] at the 122B) and autograd keeps the result for backward. Here the experts module's
forward is replaced (on that instance only) by the same loop transformers runs, but each expert's weight is
Q_s(W_e + s B_e A_e) built inside `_QuantLoraLinear`: computed in the forward for the tokens routed to e,
dropped, and recomputed in the backward. Only x, the (frozen) W_e view and A_e, B_e are saved.
Layout: transformers' fused experts, `gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I] (y = x W^T).
"""
from __future__ import annotations

import types

import torch

import lora_quant


class _QuantLoraLinear(torch.autograd.Function):
    """y = x Q_s(W + s B A)^T; STE: dA = s B^T dW, dB = s dW A^T with dW = g^T x; W frozen."""

    @staticmethod
    def _weight(w, A, B, grid, scaling, store_dtype):
        return grid.quantize_(lora_quant.lora_delta_into(w, A, B, scaling)).to(store_dtype).to(w.dtype)

    @staticmethod
    def forward(ctx, x, w, A, B, grid, scaling: float, store_dtype: torch.dtype):
        with torch.no_grad():
            q = _QuantLoraLinear._weight(w, A, B, grid, scaling, store_dtype)
            y = torch.matmul(x, q.to(x.dtype).transpose(0, 1))
        ctx.save_for_backward(x, w, A, B)
        ctx.grid, ctx.scaling, ctx.store_dtype = grid, scaling, store_dtype
        return y

    @staticmethod
    def backward(ctx, g):
        x, w, A, B = ctx.saved_tensors
        q = _QuantLoraLinear._weight(w, A, B, ctx.grid, ctx.scaling, ctx.store_dtype)
        dx = torch.matmul(g, q.to(g.dtype)) if ctx.needs_input_grad[0] else None
        dw = torch.matmul(g.float().transpose(0, 1), x.float())  # [out, in]
        dA = torch.matmul(B.float().transpose(0, 1), dw).mul_(ctx.scaling)
        dB = torch.matmul(dw, A.float().transpose(0, 1)).mul_(ctx.scaling)
        return dx, None, dA.to(A.dtype), dB.to(B.dtype), None, None, None


def _expert_linear(module, name: str, e: int, x: torch.Tensor) -> torch.Tensor:
    """x @ W_e^T for expert e of fused weight `name`: through QuantLora when it is adapted."""
    params = getattr(module, "parametrizations", None)
    if params is not None and name in params:
        plist = params[name]
        lora = plist[0]
        if lora.grid.scale.device != x.device:
            lora.grid.to(x.device)
        return _QuantLoraLinear.apply(x, plist.original[e], lora.A[e], lora.B[e], lora.grid.select(e), lora.scaling,
                                      lora.store_dtype)
    return torch.nn.functional.linear(x, getattr(module, name)[e])


def routed_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                   top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' eager experts loop (qwen3_moe / qwen3_5_moe), with adapted weights per routed expert."""
    out = torch.zeros_like(hidden_states)
    n_experts = self.parametrizations.gate_up_proj.original.shape[0] if hasattr(self, "parametrizations") and \
        "gate_up_proj" in self.parametrizations else self.gate_up_proj.shape[0]
    with torch.no_grad():
        mask = torch.nn.functional.one_hot(top_k_index, num_classes=n_experts).permute(2, 1, 0)
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()[:, 0].tolist()
    for e in hit:
        pos, tok = torch.where(mask[e])
        x = hidden_states[tok]
        gate, up = _expert_linear(self, "gate_up_proj", e, x).chunk(2, dim=-1)
        h = _expert_linear(self, "down_proj", e, self.act_fn(gate) * up)
        out.index_add_(0, tok, (h * top_k_weights[tok, pos, None]).to(out.dtype))
    return out


def is_fused_experts(module: torch.nn.Module) -> bool:
    """A transformers fused-experts module in the [E, out, in] layout this forward knows."""
    params = getattr(module, "parametrizations", None)
    names = set(params.keys()) if params is not None else set()
    names |= {n for n, _ in module.named_parameters(recurse=False)}
    return {"gate_up_proj", "down_proj"} <= names and hasattr(module, "act_fn") and \
        not getattr(module, "has_bias", False) and type(module).__name__.split("Parametrized")[-1].endswith("Experts")


def install_routed(model: torch.nn.Module, targets: list) -> int:
    """Replace the forward of every fused-experts module holding an adapted weight (axis = last dim, i.e.
    [E, out, in] with groups along `in`); returns how many. Other layouts keep the parametrization."""
    owners = {t.name.rpartition(".")[0] for t in targets if len(t.shape) == 3 and t.axis == 2}
    n = 0
    for name, module in model.named_modules():
        if name in owners and is_fused_experts(module):
            module.forward = types.MethodType(routed_forward, module)
            n += 1
    return n
