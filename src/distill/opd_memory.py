"""Peak memory per rank of every OPD step, from the model's config, the world size and the options.

Pure arithmetic on an inventory of the student (parameter counts read from the model built on the meta
device, so the counts are transformers' own, never a hand formula). What it counts, per GPU:

* train (FSDP2): frozen weights / world (or all of them with --replicate-frozen; none with --cpu-offload),
  + the unsharded units in flight (the root unit = embedding, head, norm; two decoder layers: the one
  computing and the one prefetched), + the grid (fp32 scale and divisor + the fp16 copy per group; a K
  type's fp32 d + int8 sub-scales, `grid_bytes`; replicated: the fake-quant runs on the unsharded weight), + LoRA A/B fp32 with grad and two AdamW
  moments / world, + activations (one [tokens, hidden] checkpoint per layer with AC, or every layer's
  working set without), + one layer's recompute working set (the largest routed expert's fp32
  W + sBA and its bf16 Q, attention/MLP intermediates), + the chunked loss ([token_chunk, vocab_chunk]
  fp32 x 3), + a fixed CUDA/NCCL context;
* gen / score (vLLM): BF16 weights / TP; vLLM gives the KV cache what is left up to
  gpu_memory_utilization, so the peak IS that fraction of the card when the weights fit;
* merge: host RAM, streaming one tensor at a time (largest target in fp32, x 3).
"""
from __future__ import annotations

from dataclasses import dataclass

GIB = 2 ** 30
CUDA_CONTEXT_GIB = 3.0  # CUDA context + NCCL buffers + allocator slack per process (measured order on H100)


@dataclass(frozen=True)
class Inventory:
    """Parameter counts of the student, by what the memory model needs."""

    total: int
    root: int  # parameters outside the decoder layers (embedding, head, final norm)
    largest_layer: int
    n_layers: int
    hidden: int
    vocab: int
    target_numels: tuple  # numel of every LoRA target
    target_groups: int  # grid groups over all targets
    lora_params: int
    largest_expert: int  # numel of the largest single-expert slice of a fused target (0: none)
    moe_tokens_factor: int = 8  # experts per token (top-k): the routed MLP working set
    grid_bytes: int | None = None  # resident bytes of every target's fixed grid (None: target_groups x 10)


@dataclass(frozen=True)
class Options:
    world: int = 4
    tp: int = 4
    gpu_gib: float = 80.0
    gpu_memory_utilization: float = 0.9
    weight_bytes: int = 2
    shard_frozen: bool = True
    cpu_offload: bool = False
    checkpoint_layers: bool = True
    micro_tokens: int = 8192  # tokens per micro-batch per rank (micro_seqs x sequence length)
    token_chunk: int = 1024
    vocab_chunk: int = 32768
    moe_intermediate: int = 1024


def inventory(lm, targets, rank: int, group_of=lambda t: t.spec.group) -> Inventory:
    """Counts from a (meta) causal LM and its LoRA targets (lora_quant.Target)."""
    import math

    import lora_quant
    import opd_model

    layers = opd_model.decoder_layers(lm)
    per_layer = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    total = sum(p.numel() for p in lm.parameters())
    cfg = getattr(lm.config, "text_config", lm.config)
    lora = 0
    for t in targets:
        a, b = lora_quant.lora_shapes(t.shape, rank)
        lora += math.prod(a) + math.prod(b)
    groups = sum(math.prod(t.shape) // t.shape[t.axis] * -(-t.shape[t.axis] // group_of(t)) for t in targets)
    expert = max((math.prod(t.shape[1:]) for t in targets if len(t.shape) == 3), default=0)
    grid = sum(grid_bytes(t, group_of(t)) for t in targets)
    return Inventory(total=total, root=total - sum(per_layer), largest_layer=max(per_layer, default=0),
                     n_layers=len(layers), hidden=cfg.hidden_size, vocab=cfg.vocab_size,
                     target_numels=tuple(math.prod(t.shape) for t in targets), target_groups=groups,
                     lora_params=lora, largest_expert=expert,
                     moe_tokens_factor=getattr(cfg, "num_experts_per_tok", 1) or 1, grid_bytes=grid)


def grid_bytes(t, group: int) -> int:
    """Resident bytes of one target's fixed grid: a flat grid's fp32 scale and divisor + the fp16 copy per group
    (lora_quant.FixedGrid); a K type's fp32 d (and dmin) per 256 weights + int8 sub-scales (and mins)
    (opd_kgrid.KFixedGrid, S = d * sc formed per call); a row 256 does not divide: the fallback's blocks of 32."""
    import math

    kt = getattr(t.spec, "k_type", None)
    k = t.shape[t.axis]
    rows = math.prod(t.shape) // k
    if kt is None or k % 256:
        g = 32 if kt is not None else group
        return rows * -(-k // g) * (4 + 4 + 2)
    return rows * k // 256 * (4 + kt.n_sub) * (2 if kt.has_min else 1)


def train_peak(inv: Inventory, o: Options) -> dict:
    """GiB per rank of the FSDP2 training step, by part."""
    wb = o.weight_bytes
    frozen = inv.total * wb
    parts = {"frozen_weights": 0.0 if o.cpu_offload else (frozen / o.world if o.shard_frozen else frozen)}
    parts["unsharded_units"] = (inv.root + 2 * inv.largest_layer) * wb if o.shard_frozen or o.cpu_offload else 0.0
    parts["grid"] = inv.target_groups * (4 + 4 + 2) if inv.grid_bytes is None else inv.grid_bytes
    parts["lora_adamw"] = 0.0 if o.cpu_offload else inv.lora_params * 4 * 4 / o.world
    act_layer = o.micro_tokens * inv.hidden * wb
    work = o.micro_tokens * (inv.hidden * 12 + inv.moe_tokens_factor * o.moe_intermediate * 4) * wb \
        + inv.largest_expert * (4 + wb)
    parts["activations"] = inv.n_layers * act_layer + work if o.checkpoint_layers else inv.n_layers * (act_layer + work)
    parts["loss"] = min(o.token_chunk, o.micro_tokens) * min(o.vocab_chunk, inv.vocab) * 4 * 3 + \
        o.micro_tokens * inv.hidden * 4
    parts["cuda_context"] = CUDA_CONTEXT_GIB * GIB
    out = {k: v / GIB for k, v in parts.items()}
    out["total"] = sum(out.values())
    return out


def vllm_peak(params: int, o: Options, what: str) -> dict:
    weights = params * o.weight_bytes / o.tp / GIB
    cap = o.gpu_gib * o.gpu_memory_utilization
    return {"weights": weights, "kv_cache_and_activations": max(cap - weights, 0.0), "total": max(cap, weights),
            "note": f"{what}: weights / TP {o.tp}; vLLM fills up to gpu_memory_utilization {o.gpu_memory_utilization}"}


def merge_peak_host(inv: Inventory) -> dict:
    largest = max(inv.target_numels, default=0)
    return {"total": largest * 4 * 3 / GIB, "note": "host RAM: one target at a time, fp32 W, BA and Q"}


def plan(inv: Inventory, o: Options) -> dict:
    """Every step's peak per rank (GiB) and whether it fits the card."""
    steps = {"gen-student": vllm_peak(inv.total, o, "student rollouts"),
             "score": vllm_peak(inv.total, o, "teacher prompt_logprobs"),
             "train": train_peak(inv, o), "merge": merge_peak_host(inv)}
    for name in ("gen-student", "score", "train"):
        steps[name]["fits"] = steps[name]["total"] <= o.gpu_gib and \
            (name == "train" or steps[name]["weights"] < o.gpu_gib * o.gpu_memory_utilization)
    return steps


def format_plan(steps: dict, o: Options) -> str:
    lines = [f"peak memory per rank, {o.world} ranks x {o.gpu_gib:.0f} GiB (TP {o.tp} for vLLM steps):"]
    for name, s in steps.items():
        extra = "  ".join(f"{k} {v:.2f}" for k, v in s.items() if isinstance(v, float) and k != "total")
        fits = "" if "fits" not in s else ("  fits" if s["fits"] else "  DOES NOT FIT")
        lines.append(f"  {name:<12} {s['total']:8.2f} GiB{fits}   ({extra})")
    return "\n".join(lines)


def suggest(inv: Inventory, o: Options) -> str | None:
    """The first option that makes the training step fit, or None when it already does."""
    from dataclasses import replace

    if train_peak(inv, o)["total"] <= o.gpu_gib:
        return None
    for name, change in (("--shard-frozen", {"shard_frozen": True}), ("activation checkpointing", {"checkpoint_layers": True}),
                         ("--cpu-offload", {"cpu_offload": True})):
        if train_peak(inv, replace(o, **change))["total"] <= o.gpu_gib:
            return name
    return "a smaller micro-batch (OPD_MICRO_SEQS) or shorter rollouts"


def inventory_from_config(config: dict, roles, recipe, rank: int) -> Inventory:
    """Build the causal LM of a config.json dict on the meta device (no memory) and count it."""
    import torch
    import transformers

    import lora_quant

    cfg = transformers.AutoConfig.for_model(**config)
    with torch.device("meta"):
        lm = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    targets = lora_quant.choose_targets([(n, tuple(p.shape)) for n, p in lm.named_parameters()], config, recipe, roles)
    return inventory(lm, targets, rank)
