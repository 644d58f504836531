"""Reading a checkpoint into a (possibly FSDP-sharded) student, one rank's rows at a time.

Why: at the 122B every rank reading the whole BF16 source and student (~480 GB) is what made the old
trainer unrunnable. Here a rank reads, for every parameter, only the dim-0 rows its FSDP shard owns
(`safe_open(...).get_slice(name)[lo:hi]`), or for per-expert disk tensors of a fused [E, ...] parameter,
only its experts. Disk and memory names differ as `layer_io.memory_slot` describes (transformers 5 fuses
experts in memory). The run's `state.pt` is read with `torch.load(weights_only=True)`: a pickle payload is
refused before anything in it runs.
"""
from __future__ import annotations

import contextlib
import math
import re
from pathlib import Path

import torch

import layer_io
from opd_data import OpdInputError

PARAMETRIZED = ".parametrizations."


def memory_name(param_name: str) -> str | None:
    """The model's own name of a parameter ("x.parametrizations.w.original" -> "x.w"), None for LoRA A/B."""
    if PARAMETRIZED not in param_name:
        return param_name
    owner, rest = param_name.split(PARAMETRIZED, 1)
    attr, _, leaf = rest.partition(".")
    return f"{owner}.{attr}" if leaf == "original" else None


def disk_tensors(ckpt: Path) -> dict[str, Path]:
    """Disk tensor name -> shard file of a safetensors checkpoint (from the headers only)."""
    from safetensors import safe_open

    files = sorted(Path(ckpt).glob("*.safetensors"))
    if not files:
        raise OpdInputError(f"{ckpt} holds no *.safetensors")
    out = {}
    for f in files:
        with safe_open(str(f), "pt") as h:
            out.update({k: f for k in h.keys()})
    return out


def slots_for(disk: dict[str, Path], names) -> dict[str, list]:
    """In-memory parameter name -> [(disk name, layer_io.Slot)] for the names asked."""
    wanted = set(names)
    out: dict[str, list] = {}
    for d in disk:
        slot = layer_io.memory_slot(d, wanted)
        if slot is not None:
            out.setdefault(slot.name, []).append((d, slot))
    return out


def shard_rows(param: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(local tensor, first global row) of a parameter: an FSDP2 DTensor holds rows [r*c, r*c + local) with
    c = ceil(n / world) (torch.chunk's split of dim 0); a plain tensor holds all rows."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return param.data, 0
    local = param.to_local()
    mesh = param.device_mesh
    n, world = param.shape[0], mesh.size()
    chunk = math.ceil(n / world)
    lo = min(mesh.get_local_rank() * chunk, n)
    if local.shape[0] != min(chunk, n - lo):
        raise RuntimeError(f"unexpected FSDP shard of {tuple(param.shape)}: local {tuple(local.shape)} at row {lo}")
    return local, lo


class RowReader:
    """Reads rows [lo, hi) of in-memory parameters from one checkpoint, keeping shard files open."""

    def __init__(self, ckpt: Path, names, stack: contextlib.ExitStack):
        self.ckpt, self.disk = Path(ckpt), disk_tensors(ckpt)
        self.slots = slots_for(self.disk, names)
        self.stack, self.handles = stack, {}

    def _handle(self, f: Path):
        from safetensors import safe_open

        if f not in self.handles:
            self.handles[f] = self.stack.enter_context(safe_open(str(f), "pt"))
        return self.handles[f]

    def rows(self, name: str, shape: tuple, lo: int, hi: int, dtype: torch.dtype) -> torch.Tensor:
        pieces = self.slots.get(name)
        if not pieces:
            raise OpdInputError(f"{self.ckpt} has no tensor for parameter {name}")
        want = (hi - lo, *shape[1:])
        if len(pieces) == 1 and pieces[0][1].expert is None:
            d = pieces[0][0]
            sl = self._handle(self.disk[d]).get_slice(d)
            if tuple(sl.get_shape()) != tuple(shape):
                raise OpdInputError(f"{self.ckpt}: {d} has shape {sl.get_shape()}, the model expects {list(shape)}")
            return sl[lo:hi].to(dtype) if hi > lo else torch.empty(want, dtype=dtype)
        out = torch.empty(want, dtype=dtype)
        covered = 0
        for d, slot in pieces:
            if slot.expert is None or not lo <= slot.expert < hi:
                continue
            view = layer_io.slot_view(out, layer_io.Slot(name, slot.expert - lo, slot.part))
            t = self._handle(self.disk[d]).get_tensor(d)
            if tuple(t.shape) != tuple(view.shape):
                raise OpdInputError(f"{self.ckpt}: {d} has shape {list(t.shape)}, its slot in {name} is {list(view.shape)}")
            view.copy_(t)
            covered += t.numel()
        if covered != out.numel():
            raise OpdInputError(f"{self.ckpt}: the per-expert tensors cover {covered} of the {out.numel()} values of "
                                f"rows {lo}:{hi} of {name}")
        return out


def load_shards(model: torch.nn.Module, student: Path, source: Path, target_names: set[str]) -> int:
    """Fill every frozen parameter of `model` (already on its device, FSDP-sharded or not) with this rank's
    rows: LoRA targets' originals from the SOURCE checkpoint, everything else from the student.
    Returns the number of bytes read."""
    named = [(n, p) for n, p in model.named_parameters() if memory_name(n) is not None]
    mem = [memory_name(n) for n, _ in named]
    read = 0
    with contextlib.ExitStack() as stack:
        readers = {"student": RowReader(student, [m for m in mem if m not in target_names], stack),
                   "source": RowReader(source, [m for m in mem if m in target_names], stack)}
        for (n, p), m in zip(named, mem):
            local, lo = shard_rows(p)
            r = readers["source" if m in target_names else "student"]
            t = r.rows(m, tuple(p.shape), lo, lo + local.shape[0], local.dtype)
            with torch.no_grad():
                local.copy_(t.to(local.device))
            read += t.numel() * t.element_size()
    return read


def safe_load_state(path: Path) -> dict:
    """A run's state.pt, refusing anything but tensors and plain containers (no code runs on load)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for a payload; anything else: not a state we wrote
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
        first = text.splitlines()[0] if text else e.__class__.__name__
        raise OpdInputError(f"{path} is not a plain tensor state (refused by torch.load(weights_only=True): "
                            f"{first[:200]}); delete it or pass --fresh") from None
