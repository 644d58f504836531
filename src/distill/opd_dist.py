"""The trainer's process plumbing: rank/world, the run's state file (tensors only), the adapter, memory.

Checkpoint/resume: `RUN/state.pt` (LoRA weights, AdamW state, step, loss history, config) is written
atomically by rank 0 from full state dicts, and read back with `torch.load(weights_only=True)`
(`opd_ckpt.safe_load_state`): a planted pickle payload is refused before anything in it runs.
"""
from __future__ import annotations

import io
import os
import resource
from pathlib import Path

import torch

import atomic_io
import opd_ckpt
import opd_data
import provenance
from opd_data import OpdInputError

STATE = opd_data.STATE
ADAPTER = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


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

    def gather(self, obj) -> list:
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self):
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def close(self):
        if self.enabled:
            import torch.distributed as dist

            dist.destroy_process_group()


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def cpu_allocator_setup(environ) -> None:
    """On CPU, make freed memory go back to the OS so a rank's RSS is what it holds, not what it once held:
    blocks >= 64 KiB are mmapped (glibc's default threshold drifts up to 32 MiB after big frees, and FSDP frees
    every gathered layer after use), and oneDNN keeps no per-shape primitive cache (routed experts see a new
    token count per expert per layer: `layer_io.limit_cpu_shape_caches`). Call once, before the first forward."""
    import ctypes

    import layer_io

    layer_io.limit_cpu_shape_caches(environ)
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, 64 * 1024)


def rss_mib() -> float:
    """Resident set size of this process now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _sd_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True, **kw)


def save_state(path: Path, model, opt, dist: Dist, extra: dict) -> None:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    msd = get_model_state_dict(model, options=_sd_options())
    osd = get_optimizer_state_dict(model, opt, options=_sd_options())
    if dist.rank == 0:
        buf = io.BytesIO()
        torch.save({"model": msd, "optim": osd, **extra}, buf)
        atomic_io.write_bytes(path, buf.getvalue())
    dist.barrier()


def load_state(state: dict, model, opt, dist: Dist) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    opts = _sd_options(broadcast_from_rank0=dist.enabled, strict=False)
    set_model_state_dict(model, state["model"], options=opts)
    set_optimizer_state_dict(model, opt, state["optim"], options=opts)


def check_resume(out: Path, ident: dict, fresh: bool) -> dict | None:
    """The (safely loaded) state to resume from, None to start; refuses a state made with other settings."""
    path = out / STATE
    if fresh or not path.is_file():
        return None
    state = opd_ckpt.safe_load_state(path)
    if state.get("config") != ident:
        raise OpdInputError(f"{path} was trained with other settings ({opd_data.config_diff(state.get('config') or {}, ident)}); "
                            f"delete {out} or pass --fresh")
    return state


def write_adapter(out: Path, model, mods: dict, targets, cfg, dist: Dist, meta: dict) -> None:
    """Full (unsharded) A, B and the fixed scales of every target, + a config naming the student and recipe."""
    from safetensors.torch import save
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    msd = get_model_state_dict(model, options=_sd_options())
    if dist.rank != 0:
        return
    tensors = {}
    for t in targets:
        owner, _, param = t.name.rpartition(".")
        prefix = f"lm.{owner}.parametrizations.{param}.0"  # the root is opd_model.StudentLoss
        tensors[f"{t.name}::A"] = msd[f"{prefix}.A"].float().contiguous()
        tensors[f"{t.name}::B"] = msd[f"{prefix}.B"].float().contiguous()
        for part, v in mods[t.name].grid.record().items():  # fp16 scales (+ zeros; a K grid's d, sub-scales, mins)
            tensors[f"{t.name}::{part}"] = v.contiguous()
    atomic_io.write_bytes(out / ADAPTER, save(tensors))
    atomic_io.write_json(out / ADAPTER_CONFIG, {
        "format": "moe-lowbit/opd-adapter/1", "student": str(Path(cfg.student).resolve()),
        "student_meta_sha256": provenance.sha256_file(Path(cfg.student) / opd_data.PTQ_META),
        "source": meta["source_dir"], "recipe": meta["recipe"], "rank": cfg.rank, "alpha": cfg.alpha,
        "scaling": cfg.alpha / cfg.rank, "roles": list(cfg.lora_roles),
        "targets": [{"name": t.name, "role": t.role, "shape": list(t.shape), "axis": t.axis, "bits": t.spec.bits,
                     "group": t.spec.group} for t in targets]})
