"""The trainable student, set up the way sharded trainers do it (torchtune's distributed LoRA recipe):

  1. the model is built from config.json with every parameter on the meta device (buffers such as rotary
     frequencies are computed for real, `layer_io`), LoRA attached (A, B on meta too);
  2. activation checkpointing per decoder layer (`torch.distributed._composable.checkpoint`: names unchanged);
  3. `fully_shard` per decoder layer, then on the root (the `StudentLoss` wrapper, so the embedding, final
     norm and LM head are the root unit and are gathered while the loss runs);
  4. `to_empty` on the device, then each rank reads from the safetensors only its rows (`opd_ckpt`):
     LoRA targets' W from the SOURCE for a clip/rtn student, from the student for a calibrated one
     (opd_grid.base_is_source), everything else from the student;
  5. A filled from a per-target seeded generator (the same values at any world size), B = 0.

LoRA parameters are SHARDED like everything else in their layer's unit (FSDP2 dim 0: for fused experts
A [E, r, in] that is E/world experts' adapters and their AdamW state per rank); the alternative,
replicating them, saves one all-gather per layer but costs world x their optimizer state.
The frozen base weights are sharded with `shard_frozen` (default on GPU), else replicated (`ignored_params`;
the cheaper choice on CPU/gloo for a model that fits). `cpu_offload` keeps the sharded parameters, their
gradients and the optimizer step on the host (FSDP2 CPUOffloadPolicy).
The grid (scales, zero points, code range) comes from the student's packed store (`opd_grid.student_grid`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

import lora_experts
import lora_quant
import opd_ckpt
import opd_data
import opd_grid
import opd_loss


def model_dtype(device: str, dtype: str) -> torch.dtype:
    if dtype == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]


def source_dir(meta: dict, override: str | None) -> Path | None:
    """The BF16 source W of Q_s(W + BA) comes from (a clip/rtn student); None for a calibrated student, whose
    own decoded weights are W (opd_grid.base_is_source)."""
    if not override and not opd_grid.base_is_source(meta):
        return None
    path = Path(override or meta.get("source", {}).get("path") or "")
    if not override and not (path / "config.json").is_file():
        raise opd_data.OpdInputError(f"the student's source {path} (from its _ptq_meta.json) is not on this machine; "
                                     f"pass --source DIR (the BF16 checkpoint it was quantized from)")
    opd_data.read_config(path, "--source")
    return path


@dataclass(frozen=True)
class Setup:
    """How the student is placed: device, world (1 = no FSDP), and the memory options."""

    device: torch.device = torch.device("cpu")
    distributed: bool = False
    shard_frozen: bool = False
    checkpoint_layers: bool = True
    cpu_offload: bool = False
    token_chunk: int = 1024
    vocab_chunk: int = 32768


class StudentLoss(torch.nn.Module):
    """FSDP root: the causal LM's decoder, then the chunked LM head + top-k/rest divergence per row."""

    def __init__(self, lm: torch.nn.Module, token_chunk: int, vocab_chunk: int):
        super().__init__()
        self.lm, self.token_chunk, self.vocab_chunk = lm, token_chunk, vocab_chunk

    def forward(self, input_ids, attention_mask, starts: list[int], teacher: dict, loss: str, beta: float,
                rest_floor: float) -> torch.Tensor:
        """Per-token divergences [N] of the rows teacher["lengths"] long starting at starts (per sequence)."""
        hidden = self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                       use_cache=False).last_hidden_state
        rows = torch.cat([hidden[b, s:s + n] for b, (s, n) in enumerate(zip(starts, teacher["lengths"]))])
        return opd_loss.chunked_token_divergence(
            rows, self.lm.get_output_embeddings().weight, teacher["topk_ids"], teacher["topk_logp"],
            teacher["rest_logp"], loss, beta, rest_floor, self.token_chunk, self.vocab_chunk)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks to shard one by one (FSDP2 units): the largest ModuleList in the model."""
    best = None
    for m in model.modules():
        if isinstance(m, torch.nn.ModuleList) and (best is None or len(m) > len(best)):
            best = m
    return list(best) if best is not None else []


def skeleton(student: Path, dtype: torch.dtype) -> torch.nn.Module:
    """The causal LM from the student's config.json: parameters on meta, buffers real."""
    import transformers
    from accelerate import init_empty_weights

    cfg = transformers.AutoConfig.from_pretrained(str(student))
    with init_empty_weights(include_buffers=False):  # parameters on meta, computed buffers real
        return transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)


def import_model_code(student: Path) -> None:
    """Import everything a build imports (transformers' modeling module, FSDP, safetensors) without building:
    the trainer's "RSS after imports" baseline is taken after this."""
    import safetensors.torch  # noqa: F401
    import torch.distributed.fsdp  # noqa: F401
    import transformers

    with torch.device("meta"):
        transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(str(student)))


def tied_parameters(root: torch.nn.Module) -> list[list[tuple]]:
    """Groups of (module, attribute) that hold the same Parameter (a tied embedding and LM head)."""
    seen: dict[int, list] = {}
    for mod in root.modules():
        for attr, p in mod._parameters.items():
            if p is not None:
                seen.setdefault(id(p), []).append((mod, attr))
    return [group for group in seen.values() if len(group) > 1]


def init_lora_(mods: dict, targets: list, seed: int) -> None:
    """A of target i from generator (seed, i), B = 0; each rank writes only its own rows."""
    for i, t in enumerate(targets):
        m = mods[t.name]
        full = lora_quant.lora_a_init(tuple(m.A.shape), torch.Generator().manual_seed(seed * 1000003 + i))
        local, lo = opd_ckpt.shard_rows(m.A)
        with torch.no_grad():
            local.copy_(full[lo:lo + local.shape[0]].to(local.device, local.dtype))
            opd_ckpt.shard_rows(m.B)[0].zero_()


def shard(root: StudentLoss, setup: Setup) -> None:
    """Activation checkpointing per decoder layer, then fully_shard per layer and on the root."""
    layers = decoder_layers(root.lm)
    if setup.checkpoint_layers:
        from torch.distributed._composable import checkpoint

        for layer in layers:
            checkpoint(layer)
    if not setup.distributed:
        return
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    ignored = None if setup.shard_frozen else {p for p in root.parameters() if not p.requires_grad}
    policy = CPUOffloadPolicy() if setup.cpu_offload else OffloadPolicy()
    for layer in layers:
        fully_shard(layer, ignored_params=ignored, offload_policy=policy)
    fully_shard(root, ignored_params=ignored, offload_policy=policy)


def build_student(student: str | Path, source: str | Path | None, roles, rank: int, alpha: float, seed: int,
                  dtype: torch.dtype, log=lambda m: None, setup: Setup = Setup(), dist=None):
    """(StudentLoss root, targets, name -> QuantLora). The grid comes from the student's packed store; at B = 0
    the forward is the student's (tests/test_opd_train.py)."""
    student = Path(student)
    meta = opd_data.read_student_meta(student)
    recipe = lora_quant.recipe_from_meta(meta)
    config = opd_data.read_config(student, "student")
    store = opd_grid.open_student_store(student)
    lm = skeleton(student, dtype)
    named = [(n, tuple(p.shape)) for n, p in lm.named_parameters()]
    targets = lora_quant.choose_targets(named, config, recipe, roles,
                                        stored=opd_grid.stored_quantized(store, [n for n, _ in named]))
    grids = opd_grid.student_grid(store, targets, log)
    from_source = {t.name for t in targets} if opd_grid.base_is_source(meta) else set()
    if from_source and source is None:
        raise opd_data.OpdInputError(f"the student {student} was built with method {recipe.method!r}: W of "
                                     f"Q_s(W + BA) is its BF16 source; pass --source DIR")
    for p in lm.parameters():
        p.requires_grad_(False)
    mods = lora_quant.attach(lm, targets, None, rank, alpha, seed, device="meta", grids=grids)
    routed = lora_experts.install_routed(lm, targets)
    root = StudentLoss(lm, setup.token_chunk, setup.vocab_chunk)
    shard(root, setup)
    buffers = {n: b for n, b in root.named_buffers()}
    tied = tied_parameters(root)
    root.to_empty(device=setup.device)
    for (mod0, attr0), *others in tied:  # to_empty gives each module its own tensor: tie them again
        for mod, attr in others:
            mod._parameters[attr] = mod0._parameters[attr0]
    for name, b in buffers.items():  # to_empty left them uninitialized: the computed values go back
        owner, _, attr = name.rpartition(".")
        root.get_submodule(owner)._buffers[attr] = b.to(setup.device)
    nbytes = opd_ckpt.load_shards(lm, student, source, from_source)
    init_lora_(mods, targets, seed)
    log(f"opd: {len(targets)} LoRA targets ({', '.join(sorted({t.role for t in targets}))}), {routed} expert modules "
        f"routed-only; W from the {'source' if from_source else 'student'}; this rank read "
        f"{nbytes / 2**20:.1f} MiB of weights")
    return root.eval(), targets, mods
