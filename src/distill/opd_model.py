"""The trainable student: the quant_save output with LoRA through its own fake-quant grid on chosen roles.

`build_student(...)` loads the SOURCE weights of the LoRA targets (the BF16 checkpoint the student was
built from, named in its _ptq_meta.json), recovers the build's per-group scales by re-running the
recipe on them, checks that this reproduces the student's tensor bit for bit, then loads the student
and puts W = source back under a `QuantLora` parametrization: at B = 0 the forward is the student.
Everything that is not a target keeps the student's (already quantized) values.
"""
from __future__ import annotations

import gc
from pathlib import Path

import torch

import lora_quant
import opd_data


def model_dtype(device: str, dtype: str) -> torch.dtype:
    if dtype == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]


def source_dir(meta: dict, override: str | None) -> Path:
    path = Path(override or meta.get("source", {}).get("path") or "")
    if not override and not (path / "config.json").is_file():
        raise opd_data.OpdInputError(f"the student's source {path} (from its _ptq_meta.json) is not on this machine; "
                                     f"pass --source DIR (the BF16 checkpoint it was quantized from)")
    opd_data.read_config(path, "--source")
    return path


def build_student(student: str | Path, source: str | Path, roles, rank: int, alpha: float, seed: int,
                  dtype: torch.dtype, log=lambda m: None):
    """(model with LoRA attached, targets, name -> QuantLora). Heavy: loads the source once, then the student."""
    from transformers import AutoModelForCausalLM

    meta = opd_data.read_student_meta(student)
    recipe = lora_quant.recipe_from_meta(meta)
    config = opd_data.read_config(student, "student")
    src = AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype)
    targets = lora_quant.choose_targets([(n, tuple(p.shape)) for n, p in src.named_parameters()], config, recipe, roles)
    src_params = dict(src.named_parameters())
    kept = {t.name: src_params[t.name].detach().clone() for t in targets}
    del src, src_params
    gc.collect()
    model = AutoModelForCausalLM.from_pretrained(str(student), dtype=dtype)
    params = dict(model.named_parameters())
    scales, zeros = {}, {}
    for t in targets:
        s, z, dq = lora_quant.build_scales(kept[t.name], t)
        lora_quant.check_base_is_student(t, dq, params[t.name].detach())
        grid = lora_quant.FixedGrid(s, z, t.axis, t.spec, t.shape)  # the training grid at B = 0, too
        lora_quant.check_base_is_student(t, grid.quantize_(kept[t.name].float().clone()), params[t.name].detach())
        scales[t.name], zeros[t.name] = s, z
        with torch.no_grad():
            params[t.name].copy_(kept.pop(t.name))
    log(f"opd: {len(targets)} LoRA targets ({', '.join(sorted({t.role for t in targets}))}); scales recovered and "
        f"checked against the student")
    for p in model.parameters():
        p.requires_grad_(False)
    mods = lora_quant.attach(model, targets, scales, rank, alpha, seed, zeros=zeros)
    return model.eval(), targets, mods


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks to shard one by one (FSDP2 units): the largest ModuleList in the model."""
    best = None
    for m in model.modules():
        if isinstance(m, torch.nn.ModuleList) and (best is None or len(m) > len(best)):
            best = m
    return list(best) if best is not None else []
