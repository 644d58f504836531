"""The OPD pipeline's step commands and config checks: which module, which flags, which interpreter.

Two environments, one command: training (torchrun + FSDP2) runs in the train venv's python
(OPD_TRAIN_PYTHON, from MOE_LOWBIT_TRAIN_VENV), every vLLM step (rollouts, scoring, eval) and the rest in
the eval venv's (OPD_EVAL_PYTHON, from MOE_LOWBIT_VENV); both default to this interpreter.
vLLM steps get --tensor-parallel-size, --enforce-eager (auto: CUDA graphs on a GPU, eager on CPU) and
every --engine-arg KEY=VALUE, the flags eval uses.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from quant_spec import GRIDS  # torch-free

REPO_ROOT = Path(__file__).resolve().parents[2]

ON_OFF_AUTO = ("auto", "on", "off")
CHOICES = {"loss": ("reverse_kl", "forward_kl", "jsd"), "offpolicy_loss": ("reverse_kl", "forward_kl", "jsd"),
           "device": ("cpu", "cuda"), "enforce_eager": ON_OFF_AUTO, "score_backend": ("auto", "hf", "vllm"),
           "shard_frozen": ON_OFF_AUTO, "method": ("clip", "rtn", "gptq", "wclip", "awq"), "grid": GRIDS}
POSITIVE = ("n", "max_new_tokens", "k", "rank", "batch_seqs", "micro_seqs", "token_budget", "nproc", "group",
            "clip_steps", "calib_tokens", "calib_ctx", "eval_max_new_tokens", "fidelity_ctx", "fidelity_tokens", "step_timeout_s",
            "tensor_parallel_size")


def config_problems(cfg) -> list[str]:
    """Every bad value at once (the run is refused before step 1, naming all of them)."""
    bad = [f"OPD_{k.upper()}={getattr(cfg, k)!r} must be one of {list(v)}" for k, v in CHOICES.items()
           if getattr(cfg, k) not in v]
    bad += [f"OPD_{k.upper()}={getattr(cfg, k)!r} must be >= 1" for k in POSITIVE if getattr(cfg, k) < 1]
    if cfg.lr <= 0 or cfg.alpha <= 0 or cfg.temperature < 0:
        bad.append(f"OPD_LR, OPD_ALPHA must be > 0 and OPD_TEMPERATURE >= 0 (got {cfg.lr}, {cfg.alpha}, {cfg.temperature})")
    if cfg.batch_seqs % cfg.nproc or (cfg.batch_seqs // cfg.nproc) % cfg.micro_seqs:
        bad.append(f"OPD_BATCH_SEQS={cfg.batch_seqs} must split evenly over OPD_NPROC={cfg.nproc} ranks and then into "
                   f"micro-batches of OPD_MICRO_SEQS={cfg.micro_seqs}")
    for item in cfg.engine_arg.split():
        if "=" not in item or item.startswith("="):
            bad.append(f"OPD_ENGINE_ARG item {item!r} is not KEY=VALUE")
    for name in ("prompts", "fidelity_text"):
        path = Path(getattr(cfg, name))
        if not (path if path.is_absolute() else REPO_ROOT / path).is_file():
            bad.append(f"OPD_{name.upper()}={getattr(cfg, name)!r}: no such file")
    for name in ("train_python", "eval_python"):
        if getattr(cfg, name) and not os.access(getattr(cfg, name), os.X_OK):
            bad.append(f"OPD_{name.upper()}={getattr(cfg, name)!r} is not an executable interpreter")
    return bad


def python_for(cfg, step: str) -> str:
    """The interpreter a step runs in: FSDP2 training in the train venv, everything else in the eval venv."""
    return (cfg.train_python if step == "train" else cfg.eval_python) or sys.executable


def vllm_flags(cfg) -> list:
    flags = ["--tensor-parallel-size", cfg.tensor_parallel_size]
    if cfg.enforce_eager == "on" or (cfg.enforce_eager == "auto" and cfg.device == "cpu"):
        flags.append("--enforce-eager")
    for item in cfg.engine_arg.split():
        flags += ["--engine-arg", item]
    return flags


def torchrun(cfg) -> list:
    return [python_for(cfg, "train"), "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", cfg.nproc]


def gen_cmd(cfg, model, out) -> list:
    cmd = [python_for(cfg, "gen"), REPO_ROOT / "src/distill/opd_gen.py", "--model", model, "--prompts",
           REPO_ROOT / cfg.prompts, "--out", out, "--n", cfg.n, "--temperature", cfg.temperature,
           "--max-new-tokens", cfg.max_new_tokens, "--seed", cfg.seed, *vllm_flags(cfg)]
    return cmd + (["--finished-only"] if cfg.finished_only else [])


def score_cmd(cfg, teacher, student, rollouts, out) -> list:
    backend = cfg.score_backend if cfg.score_backend != "auto" else ("vllm" if cfg.device == "cuda" else "hf")
    cmd = [python_for(cfg, "score"), REPO_ROOT / "src/distill/opd_score.py", "--teacher", teacher, "--student", student,
           "--rollouts", rollouts, "--out", out, "--k", cfg.k, "--backend", backend, "--device", cfg.device]
    return cmd + (vllm_flags(cfg) if backend == "vllm" else [])


def train_cmd(cfg, student, scores, out, loss) -> list:
    shard = {"on": ["--shard-frozen"], "off": ["--replicate-frozen"], "auto": []}[cfg.shard_frozen]
    return torchrun(cfg) + [REPO_ROOT / "src/distill/opd_train_fsdp.py", "--student", student, "--scores", scores,
                            "--out", out, "--loss", loss, "--lora-roles", cfg.lora_roles, "--rank", cfg.rank,
                            "--alpha", cfg.alpha, "--lr", cfg.lr, "--batch-seqs", cfg.batch_seqs,
                            "--micro-seqs", cfg.micro_seqs, "--token-budget", cfg.token_budget, "--seed", cfg.seed,
                            "--device", cfg.device, "--save-every", "2", *shard,
                            *(["--cpu-offload"] if cfg.cpu_offload else [])]


def eval_cmd(cfg, model, tag, results: Path, reference: str | None) -> list:
    cmd = [python_for(cfg, "eval"), "-m", "vllm_eval8", "--model", model, "--tag", tag, "--role", "quant", "--backend", "vllm",
           "--benchmarks", cfg.benchmarks, "--thinking", "off", "--temperature", "0", "--seed", "0", "--data-seed", "0",
           "--max-new-tokens", cfg.eval_max_new_tokens, "--max-model-len", cfg.eval_max_new_tokens + 1024,
           "--dtype", "auto", "--results-dir", results / "vllm_eval", "--no-progress", "--restart"]
    if cfg.device == "cpu":
        cmd += ["--enforce-eager", "on"]
    if cfg.eval_n:
        cmd += ["--n", cfg.eval_n]
    for item in cfg.data_files.split(","):
        if item.strip():
            bench, path = item.split("=", 1)
            cmd += ["--data-file", f"{bench}={REPO_ROOT / path}"]
    return cmd + (["--reference-tag", reference] if reference else [])


def memory_plan(cfg, teacher_dir: Path, student_dir: Path | None) -> str:
    """`distill.sh --dry-run`: every step's peak memory per rank from the student's config (built on the meta
    device), the world size and the options; names the option that makes training fit when it does not."""
    import lora_quant
    import opd_data
    import opd_memory
    from model_adapters import Recipe

    src = student_dir if student_dir is not None else teacher_dir
    config = opd_data.text_config(opd_data.read_config(src, "student"))
    recipe = (lora_quant.recipe_from_meta(opd_data.read_student_meta(student_dir)) if student_dir is not None else
              Recipe(expert_bits=cfg.expert_bits, linear_bits=cfg.linear_bits, group=cfg.group,
                     clip_steps=cfg.clip_steps, clip_lo=cfg.clip_lo))
    inv = opd_memory.inventory_from_config(config, tuple(cfg.lora_roles.split(",")), recipe, cfg.rank)
    shard = {"on": True, "off": False}.get(cfg.shard_frozen, cfg.device == "cuda")
    o = opd_memory.Options(world=cfg.nproc, tp=cfg.tensor_parallel_size, gpu_gib=cfg.gpu_gib, shard_frozen=shard,
                           cpu_offload=cfg.cpu_offload, micro_tokens=cfg.micro_seqs * (cfg.max_new_tokens + 1024),
                           moe_intermediate=config.get("moe_intermediate_size") or 0)
    fix = opd_memory.suggest(inv, o)
    return "\n".join([f"dry run: {inv.total / 1e9:.2f}B parameters ({inv.n_layers} layers, vocab {inv.vocab}), "
                      f"{len(inv.target_numels)} LoRA targets, rank {cfg.rank}; micro-batch {o.micro_tokens} tokens "
                      f"(OPD_MICRO_SEQS x (OPD_MAX_NEW_TOKENS + 1024 prompt tokens))",
                      opd_memory.format_plan(opd_memory.plan(inv, o), o),
                      "training fits" if fix is None else f"training does not fit: try {fix}"])
