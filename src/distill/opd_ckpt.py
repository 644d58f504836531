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


DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


def disk_tensors(ckpt: Path) -> dict[str, tuple]:
    """Disk tensor name -> (shard path, byte offset of its data, TensorEntry), from the headers only."""
    import ckpt_source

    files = sorted(Path(ckpt).glob("*.safetensors"))
    if not files:
        raise OpdInputError(f"{ckpt} holds no *.safetensors")
    out = {}
    for f in files:
        try:
            h = ckpt_source.read_shard_header(f)
        except ckpt_source.BuildError as e:
            raise OpdInputError(str(e)) from None
        out.update({t.name: (f, h.data_start + t.start, t) for t in h.tensors})
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
    """Reads rows [lo, hi) of in-memory parameters from one checkpoint with plain positioned reads (no mmap:
    the file's pages then never count in this rank's RSS), keeping shard files open."""

    def __init__(self, ckpt: Path, names, stack: contextlib.ExitStack):
        self.ckpt, self.disk = Path(ckpt), disk_tensors(ckpt)
        self.slots = slots_for(self.disk, names)
        self.stack, self.handles = stack, {}

    def _read(self, disk_name: str, lo: int, hi: int) -> torch.Tensor:
        """Rows [lo, hi) of a disk tensor (dim 0 rows are contiguous in a safetensors file)."""
        path, start, entry = self.disk[disk_name]
        if entry.dtype not in DTYPES:
            raise OpdInputError(f"{path}: {disk_name} has dtype {entry.dtype} this reader does not know")
        dtype = DTYPES[entry.dtype]
        row = math.prod(entry.shape[1:]) * torch.empty(0, dtype=dtype).element_size()
        out = torch.empty((hi - lo) * row, dtype=torch.uint8)
        if path not in self.handles:
            self.handles[path] = self.stack.enter_context(open(path, "rb", buffering=0))
        f = self.handles[path]
        f.seek(start + lo * row)
        if out.numel() and f.readinto(out.numpy()) != out.numel():
            raise OpdInputError(f"{path}: short read of {disk_name} rows {lo}:{hi} (truncated file?)")
        return out.view(dtype).reshape(hi - lo, *entry.shape[1:])

    def rows(self, name: str, shape: tuple, lo: int, hi: int, dtype: torch.dtype) -> torch.Tensor:
        pieces = self.slots.get(name)
        if not pieces:
            raise OpdInputError(f"{self.ckpt} has no tensor for parameter {name}")
        want = (hi - lo, *shape[1:])
        if len(pieces) == 1 and pieces[0][1].expert is None:
            d = pieces[0][0]
            disk_shape = self.disk[d][2].shape
            if tuple(disk_shape) != tuple(shape):
                raise OpdInputError(f"{self.ckpt}: {d} has shape {list(disk_shape)}, the model expects {list(shape)}")
            return self._read(d, lo, hi).to(dtype)
        out = torch.empty(want, dtype=dtype)
        covered = 0
        for d, slot in pieces:
            if slot.expert is None or not lo <= slot.expert < hi:
                continue
            view = layer_io.slot_view(out, layer_io.Slot(name, slot.expert - lo, slot.part))
            disk_shape = tuple(self.disk[d][2].shape)
            if disk_shape != tuple(view.shape):
                raise OpdInputError(f"{self.ckpt}: {d} has shape {list(disk_shape)}, its slot in {name} is {list(view.shape)}")
            view.copy_(self._read(d, 0, disk_shape[0]))
            covered += view.numel()
        if covered != out.numel():
            raise OpdInputError(f"{self.ckpt}: the per-expert tensors cover {covered} of the {out.numel()} values of "
                                f"rows {lo}:{hi} of {name}")
        return out


def load_shards(model: torch.nn.Module, student: Path, source: Path, target_names: set[str]) -> int:
    """Fill every frozen parameter of `model` (already on its device, FSDP-sharded or not) with this rank's
    rows: the parameters in `target_names` (LoRA targets whose W is the source's) from the SOURCE checkpoint,
    everything else from the student.
    Returns the number of bytes read."""
    named = [(n, p) for n, p in model.named_parameters() if memory_name(n) is not None]
    mem = [memory_name(n) for n, _ in named]
    read = 0
    with contextlib.ExitStack() as stack:
        readers = {"student": RowReader(student, [m for m in mem if m not in target_names], stack)}
        if target_names:
            readers["source"] = RowReader(source, [m for m in mem if m in target_names], stack)
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
