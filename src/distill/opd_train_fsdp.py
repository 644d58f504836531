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

Checkpoint/resume: `RUN/state.pt` (LoRA weights, AdamW state, step, loss history, config hash) is written
atomically every --save-every steps; a rerun with the same settings resumes from it and reproduces the
same loss curve; with other settings it stops with "delete RUN or pass --fresh". At the end RUN holds
adapter.safetensors (+ the fixed scales), adapter_config.json, train_log.json and loss.png.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.utils.parametrize as parametrize

import atomic_io
import lora_quant
import opd_data
import opd_loss
import opd_model
import opd_score
import provenance
from opd_data import OpdInputError

STATE = "state.pt"
ADAPTER = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
TRAIN_LOG = "train_log.json"


@dataclass(frozen=True)
class TrainConfig:
    student: str
    scores: str
    out: str
    source: str | None = None
    loss: str = "reverse_kl"
    beta: float = 0.5
    lora_roles: tuple[str, ...] = lora_quant.DEFAULT_ROLES
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
    rest_floor: float = opd_loss.DEFAULT_REST_FLOOR
    shard_frozen: bool | None = None  # None: shard the base weights on GPU, replicate them on CPU
    progress: bool = True

    def __post_init__(self):
        if self.loss not in opd_loss.LOSSES:
            raise OpdInputError(f"--loss must be one of {opd_loss.LOSSES}, got {self.loss!r}")
        for name in ("rank", "batch_seqs", "micro_seqs", "save_every"):
            if getattr(self, name) < 1:
                raise OpdInputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise OpdInputError(f"--lr must be > 0, got {self.lr}")
        if self.steps is None and self.token_budget is None:
            raise OpdInputError("give --steps N or --token-budget TOKENS")

    def identity(self) -> dict:
        """Settings that decide the loss curve (resume refuses a state made under others)."""
        d = asdict(self)
        for k in ("out", "save_every", "progress", "shard_frozen"):
            d.pop(k)
        d["lora_roles"] = list(self.lora_roles)
        return d


# ---------------------------------------------------------------------------------------- data
def load_items(scores_dir: str) -> tuple[dict, list[dict]]:
    """Scored rollouts: token ids from the rollout files the scores name, teacher rows from the shards."""
    index, by_uid = opd_score.load_scores(scores_dir)
    items = []
    for src in index["rollouts"]:
        _, records = opd_data.read_rollouts(src["file"])
        for it in opd_data.flatten_samples(records, index.get("finished_only", False)):
            if it["uid"] in by_uid:
                rows = by_uid[it["uid"]]
                if rows["topk_ids"].shape[0] != len(it["completion_ids"]):
                    raise OpdInputError(f"scores for {it['uid']} have {rows['topk_ids'].shape[0]} rows but the rollout "
                                        f"has {len(it['completion_ids'])} tokens: {src['file']} changed after scoring")
                items.append({**it, **rows})
    if not items:
        raise OpdInputError(f"no scored rollouts in {scores_dir}")
    return index, items


def schedule(n_items: int, lengths: list[int], batch: int, seed: int, steps: int | None,
             token_budget: int | None) -> list[list[int]]:
    """Item indices of every step: epochs of seeded permutations, cut into batches; stops at --steps or
    once the tokens trained reach --token-budget (whichever comes first)."""
    out, tokens, epoch, stream = [], 0, 0, []
    while True:
        if steps is not None and len(out) >= steps:
            return out
        if token_budget is not None and tokens >= token_budget:
            return out
        while len(stream) < batch:
            g = torch.Generator().manual_seed(seed * 1000003 + epoch)
            stream += torch.randperm(n_items, generator=g).tolist()
            epoch += 1
        step, stream = stream[:batch], stream[batch:]
        out.append(step)
        tokens += sum(lengths[i] for i in step)


def collate(batch: list[dict]) -> dict:
    """Right-padded input ids + for each item the (row positions, teacher rows), and the window of
    positions whose logits the loss reads: from the earliest P-1 to the latest P-1+C of the batch."""
    ids, mask = opd_data.padded_batch(batch)
    first = min(len(it["prompt_ids"]) - 1 for it in batch)
    last = max(len(it["prompt_ids"]) - 1 + len(it["completion_ids"]) for it in batch)
    return {"input_ids": ids, "attention_mask": mask, "items": batch, "window": (first, last)}


def micro_batches(mine: list[dict], micro: int) -> list[list[dict]]:
    """This rank's rollouts cut into micro-batches of `micro`, longest first, so each pads to a similar width."""
    order = sorted(mine, key=lambda it: -(len(it["prompt_ids"]) + len(it["completion_ids"])))
    return [order[i:i + micro] for i in range(0, len(order), micro)]


def rank_share(batch: list[dict], rank: int, world: int) -> list[dict]:
    """Deal the step's rollouts to the ranks by length (longest to rank 0, next to rank 1, ...): each rank
    gets about the same number of tokens; the global loss (a sum over all of them) is unchanged."""
    order = sorted(range(len(batch)), key=lambda i: (-(len(batch[i]["prompt_ids"]) + len(batch[i]["completion_ids"])), i))
    return [batch[i] for i in order[rank::world]]


def batch_loss_sum(model, mb: dict, cfg: TrainConfig, device, autocast: bool) -> tuple[torch.Tensor, int]:
    """Sum of per-token divergences of a micro-batch (the student's row P-1+i vs the teacher's row i).
    Only the window of positions that predict a completion token goes through the LM head and the loss
    (`logits_to_keep`): the prompt rows would cost a [tokens, vocab] matmul and softmax for nothing."""
    first, last = mb["window"]
    keep = torch.arange(first, last, device=device)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        logits = model(input_ids=mb["input_ids"].to(device), attention_mask=mb["attention_mask"].to(device),
                       use_cache=False, logits_to_keep=keep).logits
    if logits.shape[1] != last - first:
        raise RuntimeError(f"the model ignored logits_to_keep (got {logits.shape[1]} positions, asked {last - first})")
    total, n = None, 0
    for b, it in enumerate(mb["items"]):
        rows = opd_score.completion_rows(logits[b], len(it["prompt_ids"]) - first, len(it["completion_ids"]))
        div = opd_loss.token_divergence(rows, it["topk_ids"].to(device), it["topk_logp"].to(device),
                                        it["rest_logp"].to(device), cfg.loss, cfg.beta, cfg.rest_floor)
        total = div.sum() if total is None else total + div.sum()
        n += div.shape[0]
    return total, n


# ---------------------------------------------------------------------------------------- dist
class Dist:
    """rank/world and the few collectives the loop needs; a plain process is world 1 without FSDP."""

    def __init__(self, device: str):
        self.enabled = "WORLD_SIZE" in os.environ
        if self.enabled:
            import torch.distributed as dist

            backend = "nccl" if device.startswith("cuda") else "gloo"
            dist.init_process_group(backend)
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
        else:
            self.rank, self.world = 0, 1
        local = int(os.environ.get("LOCAL_RANK", 0))
        self.device = torch.device(f"cuda:{local}" if device == "cuda" else device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    def sum(self, x: float) -> float:
        if not self.enabled:
            return x
        import torch.distributed as dist

        t = torch.tensor([x], dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return float(t.item())

    def barrier(self):
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def close(self):
        if self.enabled:
            import torch.distributed as dist

            dist.destroy_process_group()


def shard_model(model, dist: Dist, shard_frozen: bool):
    """FSDP2: one `fully_shard` unit per decoder layer, then the root. The LoRA parameters are always
    sharded; the frozen base weights too when shard_frozen (what a model larger than one device needs),
    else every rank keeps a full copy and only the adapter is communicated (on CPU/gloo, all-gathering
    the frozen weights twice per micro-batch costs far more than the compute)."""
    if not dist.enabled:
        return model
    from torch.distributed.fsdp import fully_shard

    ignored = None if shard_frozen else {p for p in model.parameters() if not p.requires_grad}
    for layer in opd_model.decoder_layers(model):
        fully_shard(layer, ignored_params=ignored)
    fully_shard(model, ignored_params=ignored)
    return model


# ---------------------------------------------------------------------------------- checkpoints
def _sd_options(dist: Dist, **kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True, **kw)


def save_state(path: Path, model, opt, dist: Dist, extra: dict) -> None:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    msd = get_model_state_dict(model, options=_sd_options(dist))
    osd = get_optimizer_state_dict(model, opt, options=_sd_options(dist))
    if dist.rank == 0:
        buf = io.BytesIO()
        torch.save({"model": msd, "optim": osd, **extra}, buf)
        atomic_io.write_bytes(path, buf.getvalue())
    dist.barrier()


def read_state(path: Path) -> dict:
    """The state file as plain data: weights_only unpickling, so a planted file cannot run code; anything
    else is a one-line error naming the file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, a torn zip, a foreign format: all mean "not ours"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise OpdInputError(f"{path}: not a training state written by this tool ({first}); delete it or pass --fresh") from None
    if not isinstance(state, dict):
        raise OpdInputError(f"{path}: not a training state written by this tool; delete it or pass --fresh")
    return state


def load_state(path: Path, model, opt, dist: Dist) -> dict:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = read_state(path)
    opts = _sd_options(dist, broadcast_from_rank0=dist.enabled, strict=False)
    set_model_state_dict(model, state["model"], options=opts)
    set_optimizer_state_dict(model, opt, state["optim"], options=opts)
    return state


def check_resume(out: Path, ident: dict, fresh: bool) -> Path | None:
    """The state file to resume from, None to start; refuses a state made with other settings."""
    path = out / STATE
    if fresh or not path.is_file():
        return None
    state = read_state(path)
    if state.get("config") != ident:
        raise OpdInputError(f"{path} was trained with other settings ({opd_data.config_diff(state.get('config') or {}, ident)}); "
                            f"delete {out} or pass --fresh")
    return path


def write_adapter(out: Path, model, mods: dict, targets, cfg: TrainConfig, dist: Dist, meta: dict) -> None:
    """Full (unsharded) A, B and the fixed scales of every target, + a config naming the student and recipe."""
    from safetensors.torch import save
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    msd = get_model_state_dict(model, options=_sd_options(dist))
    if dist.rank != 0:
        return
    tensors = {}
    for t in targets:
        owner, _, param = t.name.rpartition(".")
        prefix = f"{owner}.parametrizations.{param}.0"
        tensors[f"{t.name}::A"] = msd[f"{prefix}.A"].float().contiguous()
        tensors[f"{t.name}::B"] = msd[f"{prefix}.B"].float().contiguous()
        tensors[f"{t.name}::scales"] = mods[t.name].scales.contiguous()
        if mods[t.name].zeros is not None:
            tensors[f"{t.name}::zeros"] = mods[t.name].zeros.contiguous()
    atomic_io.write_bytes(out / ADAPTER, save(tensors))
    atomic_io.write_json(out / ADAPTER_CONFIG, {
        "format": "moe-lowbit/opd-adapter/1", "student": str(Path(cfg.student).resolve()),
        "student_meta_sha256": provenance.sha256_file(Path(cfg.student) / opd_data.PTQ_META),
        "source": meta["source_dir"], "recipe": meta["recipe"], "rank": cfg.rank, "alpha": cfg.alpha,
        "scaling": cfg.alpha / cfg.rank, "roles": list(cfg.lora_roles),
        "targets": [{"name": t.name, "role": t.role, "shape": list(t.shape), "axis": t.axis, "bits": t.spec.bits,
                     "group": t.spec.group} for t in targets]})


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
def train(cfg: TrainConfig, fresh: bool = False, argv=None, stop_after: int | None = None) -> dict:
    dist = Dist(cfg.device)
    try:
        return _train(cfg, dist, fresh, argv, stop_after)
    finally:
        dist.close()


def _train(cfg: TrainConfig, dist: Dist, fresh: bool, argv, stop_after: int | None) -> dict:
    log = (lambda m: print(m, file=sys.stderr)) if dist.rank == 0 else (lambda m: None)
    meta = opd_data.read_student_meta(cfg.student)
    source = opd_model.source_dir(meta, cfg.source)
    index, items = load_items(cfg.scores)
    opd_data.check_same_vocab(index["teacher"]["dir"], cfg.student)
    out = Path(cfg.out)
    ident = dict(cfg.identity(), scores_items=len(items),
                 scores_sha=opd_data.config_hash([s["uids"] for s in index["shards"]]))
    resume_from = check_resume(out, ident, fresh)
    if cfg.batch_seqs % dist.world or (cfg.batch_seqs // dist.world) % cfg.micro_seqs:
        raise OpdInputError(f"--batch-seqs {cfg.batch_seqs} must split evenly over {dist.world} ranks and then into "
                            f"micro-batches of --micro-seqs {cfg.micro_seqs}")
    plan = schedule(len(items), [len(it["completion_ids"]) for it in items], cfg.batch_seqs, cfg.seed, cfg.steps,
                    cfg.token_budget)
    out.mkdir(parents=True, exist_ok=True)
    dtype = opd_model.model_dtype(cfg.device, cfg.dtype)
    model, targets, mods = opd_model.build_student(cfg.student, source, cfg.lora_roles, cfg.rank, cfg.alpha, cfg.seed,
                                                   dtype, log)
    model.to(dist.device)
    model = shard_model(model, dist, cfg.shard_frozen if cfg.shard_frozen is not None else dist.device.type == "cuda")
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    step0, losses, tokens_done, step_seconds = 0, [], 0, []
    if resume_from is not None:
        state = load_state(resume_from, model, opt, dist)
        step0, losses, tokens_done, step_seconds = state["step"], state["losses"], state["tokens"], state["step_seconds"]
        log(f"opd: resuming {out} at step {step0}/{len(plan)}")
    elif fresh and (out / STATE).exists() and dist.rank == 0:
        (out / STATE).unlink()
    autocast = dist.device.type == "cuda"
    from tqdm import tqdm

    bar = tqdm(total=len(plan), initial=step0, desc=f"opd {cfg.loss}", unit="step", file=sys.stderr,
               dynamic_ncols=True, disable=not cfg.progress or dist.rank != 0)
    t_run, tok_run = time.perf_counter(), 0
    for step in range(step0, len(plan)):
        t0 = time.perf_counter()
        batch = [items[i] for i in plan[step]]
        global_tokens = sum(len(it["completion_ids"]) for it in batch)
        mbs = micro_batches(rank_share(batch, dist.rank, dist.world), cfg.micro_seqs)
        local_sum = 0.0
        opt.zero_grad(set_to_none=True)
        for j, part in enumerate(mbs):
            if dist.enabled:  # accumulate locally; one reduce-scatter per step, after the last micro-batch
                model.set_requires_gradient_sync(j == len(mbs) - 1)
            mb = collate(part)
            with parametrize.cached():  # Q(W + BA) once per forward, however often the experts index it
                s, _ = batch_loss_sum(model, mb, cfg, dist.device, autocast)
            (s * (dist.world / global_tokens)).backward()
            local_sum += float(s.detach())
        opt.step()
        loss = dist.sum(local_sum) / global_tokens
        losses.append(loss)
        tokens_done += global_tokens
        tok_run += global_tokens
        step_seconds.append(time.perf_counter() - t0)
        bar.update(1)
        bar.set_postfix_str(f"loss {loss:.4f}  {tok_run / max(time.perf_counter() - t_run, 1e-9):.0f} tok/s", refresh=False)
        done = step + 1
        if done % cfg.save_every == 0 or done == len(plan):
            save_state(out / STATE, model, opt, dist, {"config": ident, "step": done, "losses": losses,
                                                       "tokens": tokens_done, "step_seconds": step_seconds})
        if stop_after is not None and done >= stop_after:
            break
    bar.close()
    result = {"format": "moe-lowbit/opd-train/1", "config": ident, "world_size": dist.world,
              "steps": len(losses), "planned_steps": len(plan), "tokens_trained": tokens_done, "losses": losses,
              "step_seconds": step_seconds,
              "wall_s_per_step_median": sorted(step_seconds)[len(step_seconds) // 2] if step_seconds else None,
              "tokens_per_s": tokens_done / max(sum(step_seconds), 1e-9) if step_seconds else None,
              "targets": len(targets), "trainable_params": sum(int(math.prod(p.shape)) for p in trainable),
              "device": str(dist.device), "resumed_from_step": step0, "provenance": provenance.record(argv=argv)}
    if len(losses) == len(plan):
        write_adapter(out, model, mods, targets, cfg, dist, {"source_dir": str(source), "recipe": meta["recipe"]})
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
    ap.add_argument("--loss", default=d.loss, choices=opd_loss.LOSSES)
    ap.add_argument("--beta", type=float, default=d.beta, help="jsd: weight of the teacher in the mixture")
    ap.add_argument("--lora-roles", default=",".join(d.lora_roles),
                    help=f"comma list of roles to adapt, from {list(lora_quant.ALLOWED_ROLES)}")
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
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    ap.add_argument("--fresh", action="store_true", help="ignore (and overwrite) an existing run in --out")
    ap.add_argument("--stop-after", type=int, help=argparse.SUPPRESS)  # tests: end early as a kill would
    return ap


def main(argv=None) -> int:
    args = vars(build_parser().parse_args(argv))
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
