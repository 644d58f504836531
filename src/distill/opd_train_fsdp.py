"""Distil the teacher's scored rollouts into the quantized student: LoRA through the fake-quant (STE),
FSDP2 `fully_shard` under torchrun (gloo on CPU, nccl on GPUs), or one plain process.

    torchrun --nproc_per_node 2 src/distill/opd_train_fsdp.py --student STUDENT --scores SCORES --out RUN \
        [--loss reverse_kl|forward_kl|jsd] [--lora-roles routed_expert[,shared_expert,attention]] \
        [--rank 16 --alpha 32 --lr 1e-4 --batch-seqs 8 --micro-seqs 2 --token-budget N | --steps N] [--fresh]

What a step is: `--batch-seqs` rollouts (a deterministic per-epoch permutation of the scored items,
seeded by --seed), split evenly over the ranks and into micro-batches of `--micro-seqs` (gradient
accumulation). The loss is the sum of per-token divergences over the whole global batch divided by its
token count, so 1 and N processes optimise the same number (FSDP averages gradients over ranks; each
rank's loss is scaled by the world size to undo that). Row i of a rollout's scores is compared with the
student's logits at position P-1+i (see opd_score.py for the alignment).

Set-up (opd_model.py): meta-device student, activation checkpointing per decoder layer, fully_shard per
layer then root, each rank reading only its rows of the safetensors; routed experts' Q(W + BA) built for
the routed experts only and recomputed in backward (lora_experts.py); the loss chunked over tokens and
vocabulary (opd_loss.chunked_token_divergence). Data: opd_batches.py; state/adapter/collectives: opd_dist.py.

Checkpoint/resume: `RUN/state.pt` (LoRA weights, AdamW state, step, loss history, config hash) is written
atomically every --save-every steps and read back with torch.load(weights_only=True); a rerun with the same settings resumes from it and reproduces the
same loss curve; with other settings it stops with "delete RUN or pass --fresh". At the end RUN holds
adapter.safetensors (+ the fixed scales), adapter_config.json, train_log.json and loss.png.
"""
from __future__ import annotations

import argparse
import io
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import atomic_io
import opd_data
import provenance
from opd_data import STATE, OpdInputError

if TYPE_CHECKING:
    import opd_dist
    import torch

TRAIN_LOG = "train_log.json"


@dataclass(frozen=True)
class TrainConfig:
    student: str
    scores: str
    out: str
    source: str | None = None
    loss: str = "reverse_kl"
    beta: float = 0.5
    lora_roles: tuple[str, ...] = opd_data.DEFAULT_LORA_ROLES
    rank: int = 16
    alpha: float = 32.0
    lr: float = 1e-4
    weight_decay: float = 0.0
    batch_seqs: int = 8
    micro_seqs: int = 2
    steps: int | None = None
    token_budget: int | None = None
    seed: int = 0
    save_every: int = 10
    device: str = "cpu"
    dtype: str = "auto"
    rest_floor: float = opd_data.DEFAULT_REST_FLOOR
    shard_frozen: bool | None = None  # None: shard the base weights on GPU, replicate them on CPU
    checkpoint_layers: bool | None = None  # None: on a GPU yes (what the 122B needs), on CPU no (the smoke's speed)
    cpu_offload: bool = False
    token_chunk: int = 1024
    vocab_chunk: int = 32768
    progress: bool = True

    def __post_init__(self):
        if self.loss not in opd_data.LOSSES:
            raise OpdInputError(f"--loss must be one of {opd_data.LOSSES}, got {self.loss!r}")
        for name in ("rank", "batch_seqs", "micro_seqs", "save_every", "token_chunk", "vocab_chunk"):
            if getattr(self, name) < 1:
                raise OpdInputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise OpdInputError(f"--lr must be > 0, got {self.lr}")
        if self.steps is None and self.token_budget is None:
            raise OpdInputError("give --steps N or --token-budget TOKENS")

    def identity(self) -> dict:
        """Settings that decide the loss curve (resume refuses a state made under others)."""
        d = asdict(self)
        for k in ("out", "save_every", "progress", "shard_frozen", "checkpoint_layers", "cpu_offload", "token_chunk",
                  "vocab_chunk"):
            d.pop(k)
        d["lora_roles"] = list(self.lora_roles)
        return d


def plot_losses(path: Path, losses: list[float], title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses, marker="o", ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss per token")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_io.write_bytes(path, buf.getvalue())


# ------------------------------------------------------------------------------------------ train
def micro_loss_sum(model, mb: dict, cfg: TrainConfig, autocast: bool) -> tuple[torch.Tensor, int]:
    """Sum of per-token divergences of a micro-batch (hidden state P-1+i vs the teacher's row i)."""
    import torch
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        div = model(mb["input_ids"], mb["attention_mask"], mb["starts"], mb["teacher"], cfg.loss, cfg.beta,
                    cfg.rest_floor)
    return div.sum(), int(div.shape[0])


def train(cfg: TrainConfig, fresh: bool = False, argv=None, stop_after: int | None = None) -> dict:
    import opd_dist
    if cfg.device == "cpu" and cfg.shard_frozen:
        opd_dist.cpu_allocator_setup(os.environ)  # a sharded CPU run is a memory measurement: RSS = what is held
    dist = opd_dist.Dist(cfg.device)
    try:
        return _train(cfg, dist, fresh, argv, stop_after)
    finally:
        dist.close()


def _train(cfg: TrainConfig, dist: opd_dist.Dist, fresh: bool, argv, stop_after: int | None) -> dict:
    import opd_batches
    import opd_dist
    import opd_model
    import torch
    log = (lambda m: print(m, file=sys.stderr)) if dist.rank == 0 else (lambda m: None)
    meta = opd_data.read_student_meta(cfg.student)
    opd_model.import_model_code(cfg.student)
    rss_base = opd_dist.rss_mib()  # after every import (transformers' model code too), before any load
    source = opd_model.source_dir(meta, cfg.source)
    index, items = opd_batches.load_items(cfg.scores)
    opd_data.check_same_vocab(index["teacher"]["dir"], cfg.student)
    out = Path(cfg.out)
    ident = dict(cfg.identity(), scores_items=len(items),
                 scores_sha=opd_data.config_hash([s["uids"] for s in index["shards"]]))
    state = opd_dist.check_resume(out, ident, fresh)
    if cfg.batch_seqs % dist.world or (cfg.batch_seqs // dist.world) % cfg.micro_seqs:
        raise OpdInputError(f"--batch-seqs {cfg.batch_seqs} must split evenly over {dist.world} ranks and then into "
                            f"micro-batches of --micro-seqs {cfg.micro_seqs}")
    plan = opd_batches.schedule(len(items), [len(it["completion_ids"]) for it in items], cfg.batch_seqs, cfg.seed,
                                cfg.steps, cfg.token_budget)
    out.mkdir(parents=True, exist_ok=True)
    setup = opd_model.Setup(device=dist.device, distributed=dist.enabled,
                            shard_frozen=cfg.shard_frozen if cfg.shard_frozen is not None else dist.device.type == "cuda",
                            checkpoint_layers=(cfg.checkpoint_layers if cfg.checkpoint_layers is not None
                                               else dist.device.type == "cuda"), cpu_offload=cfg.cpu_offload,
                            token_chunk=cfg.token_chunk, vocab_chunk=cfg.vocab_chunk)
    model, targets, mods = opd_model.build_student(cfg.student, source, cfg.lora_roles, cfg.rank, cfg.alpha, cfg.seed,
                                                   opd_model.model_dtype(cfg.device, cfg.dtype), log, setup, dist)
    rss_loaded = opd_dist.rss_mib()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    step0, losses, tokens_done, step_seconds, peak_rss = 0, [], 0, [], []
    if state is not None:
        opd_dist.load_state(state, model, opt, dist)
        step0, losses, tokens_done, step_seconds = state["step"], state["losses"], state["tokens"], state["step_seconds"]
        peak_rss = state.get("peak_rss_mib", [])
        log(f"opd: resuming {out} at step {step0}/{len(plan)}")
    elif fresh and (out / STATE).exists() and dist.rank == 0:
        (out / STATE).unlink()
    del state
    autocast = dist.device.type == "cuda"
    from tqdm import tqdm

    bar = tqdm(total=len(plan), initial=step0, desc=f"opd {cfg.loss}", unit="step", file=sys.stderr,
               dynamic_ncols=True, disable=not cfg.progress or dist.rank != 0)
    t_run, tok_run = time.perf_counter(), 0
    for step in range(step0, len(plan)):
        t0 = time.perf_counter()
        batch = [items[i] for i in plan[step]]
        global_tokens = sum(len(it["completion_ids"]) for it in batch)
        mbs = opd_batches.micro_batches(opd_batches.rank_share(batch, dist.rank, dist.world), cfg.micro_seqs)
        local_sum = 0.0
        opt.zero_grad(set_to_none=True)
        for j, part in enumerate(mbs):
            if dist.enabled:  # accumulate locally; one reduce-scatter per step, after the last micro-batch
                model.set_requires_gradient_sync(j == len(mbs) - 1)
            s, _ = micro_loss_sum(model, opd_batches.collate(part, dist.device), cfg, autocast)
            (s * (dist.world / global_tokens)).backward()
            local_sum += float(s.detach())
        opt.step()
        loss = dist.sum(local_sum) / global_tokens
        losses.append(loss)
        peak_rss.append(dist.gather(opd_dist.peak_rss_mib()))
        tokens_done += global_tokens
        tok_run += global_tokens
        step_seconds.append(time.perf_counter() - t0)
        bar.update(1)
        bar.set_postfix_str(f"loss {loss:.4f}  {tok_run / max(time.perf_counter() - t_run, 1e-9):.0f} tok/s", refresh=False)
        done = step + 1
        if done % cfg.save_every == 0 or done == len(plan):
            opd_dist.save_state(out / STATE, model, opt, dist, {
                "config": ident, "step": done, "losses": losses, "tokens": tokens_done, "step_seconds": step_seconds,
                "peak_rss_mib": peak_rss})
        if stop_after is not None and done >= stop_after:
            break
    bar.close()
    result = {"format": "moe-lowbit/opd-train/1", "config": ident, "world_size": dist.world,
              "steps": len(losses), "planned_steps": len(plan), "tokens_trained": tokens_done, "losses": losses,
              "step_seconds": step_seconds,
              "wall_s_per_step_median": sorted(step_seconds)[len(step_seconds) // 2] if step_seconds else None,
              "tokens_per_s": tokens_done / max(sum(step_seconds), 1e-9) if step_seconds else None,
              "memory": {"rss_after_imports_mib": dist.gather(rss_base), "rss_after_load_mib": dist.gather(rss_loaded),
                         "peak_rss_mib_per_step": peak_rss, "shard_frozen": setup.shard_frozen,
                         "checkpoint_layers": setup.checkpoint_layers},
              "targets": len(targets), "trainable_params": sum(int(math.prod(p.shape)) for p in trainable),
              "device": str(dist.device), "resumed_from_step": step0, "provenance": provenance.record(argv=argv)}
    if len(losses) == len(plan):
        opd_dist.write_adapter(out, model, mods, targets, cfg, dist, {"source_dir": str(source or ""), "recipe": meta["recipe"]})
        if dist.rank == 0:
            atomic_io.write_json(out / TRAIN_LOG, result)
            plot_losses(out / "loss.png", losses, f"OPD {cfg.loss} ({len(targets)} LoRA targets)")
    return result


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="opd_train_fsdp.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    d = TrainConfig("", "", "", steps=1)
    ap.add_argument("--student", required=True, help="quant_save output dir (has _ptq_meta.json)")
    ap.add_argument("--scores", required=True, help="score dir from opd_score.py")
    ap.add_argument("--out", required=True, help="run dir: state.pt, adapter.safetensors, train_log.json")
    ap.add_argument("--source", help="BF16 checkpoint the student was built from (default: its _ptq_meta.json)")
    ap.add_argument("--loss", default=d.loss, choices=opd_data.LOSSES)
    ap.add_argument("--beta", type=float, default=d.beta, help="jsd: weight of the teacher in the mixture")
    ap.add_argument("--lora-roles", default=",".join(d.lora_roles),
                    help=f"comma list of roles to adapt, from {list(opd_data.LORA_ALLOWED_ROLES)}")
    ap.add_argument("--rank", type=int, default=d.rank)
    ap.add_argument("--alpha", type=float, default=d.alpha)
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--weight-decay", type=float, default=d.weight_decay)
    ap.add_argument("--batch-seqs", type=int, default=d.batch_seqs, help="rollouts per optimizer step (global)")
    ap.add_argument("--micro-seqs", type=int, default=d.micro_seqs, help="rollouts per forward (grad accumulation)")
    ap.add_argument("--steps", type=int, help="optimizer steps (at most)")
    ap.add_argument("--token-budget", type=int, help="stop once this many completion tokens were trained")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint every N steps")
    ap.add_argument("--device", default=d.device, help="cpu | cuda (one GPU per rank)")
    ap.add_argument("--dtype", default=d.dtype, help="auto (fp32 on CPU, bf16 + autocast on GPU) | float32 | bfloat16")
    ap.add_argument("--shard-frozen", dest="shard_frozen", action="store_true", default=None,
                    help="FSDP-shard the frozen base weights too (default: on GPU yes, on CPU replicate them)")
    ap.add_argument("--replicate-frozen", dest="shard_frozen", action="store_false",
                    help="keep a full copy of the frozen base weights on every rank; shard only the adapter")
    ap.add_argument("--activation-checkpointing", dest="checkpoint_layers", action="store_true", default=None,
                    help="recompute each decoder layer in backward (default: on a GPU yes, on CPU no)")
    ap.add_argument("--no-activation-checkpointing", dest="checkpoint_layers", action="store_false")
    ap.add_argument("--cpu-offload", action="store_true",
                    help="FSDP2 CPUOffloadPolicy: sharded params, grads and the AdamW step on the host")
    ap.add_argument("--token-chunk", type=int, default=d.token_chunk, help="loss rows per LM-head chunk")
    ap.add_argument("--vocab-chunk", type=int, default=d.vocab_chunk, help="vocabulary slice of the chunked LM head")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    ap.add_argument("--fresh", action="store_true", help="ignore (and overwrite) an existing run in --out")
    ap.add_argument("--stop-after", type=int, help=argparse.SUPPRESS)  # tests: end early as a kill would
    return ap


def main(argv=None) -> int:
    args = vars(build_parser().parse_args(argv))
    import lora_quant

    fresh, stop_after = args.pop("fresh"), args.pop("stop_after")
    args["lora_roles"] = tuple(r.strip() for r in args["lora_roles"].split(",") if r.strip())
    try:
        cfg = TrainConfig(**args)
        result = train(cfg, fresh, argv=sys.argv if argv is None else [sys.argv[0], *argv], stop_after=stop_after)
    except (OpdInputError, lora_quant.LoraTargetError) as e:
        print(f"opd_train_fsdp: error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"opd_train_fsdp: {result['steps']} steps, {result['tokens_trained']} tokens, "
              f"loss {result['losses'][0]:.4f} -> {result['losses'][-1]:.4f} -> {cfg.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
