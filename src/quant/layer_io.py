"""A model skeleton with no weights, and one decoder layer at a time materialised from the shards.

The skeleton is the transformers model built from config.json with every *parameter* on the meta device
(buffers such as rotary frequencies are real: they are computed, not loaded), so memory is flat in depth.
`materialise` loads one module's parameters from the source shards (in the compute dtype) and `release`
puts them back on meta.

On-disk names and in-memory names differ in one systematic way in transformers 5: MoE checkpoints store
routed experts per expert (`mlp.experts.N.gate_proj.weight`, mixtral `block_sparse_moe.experts.N.w1`) while
the module holds them fused ([E, 2I, H] `gate_up_proj` = cat(gate, up), [E, H, I] `down_proj`). `memory_slot`
maps a disk name to (in-memory name, expert index, gate/up half), so a disk tensor can be loaded into, and
its statistics read from, the fused module.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from ckpt_source import BuildError

PER_EXPERT = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<idx>\d+)\.(?P<proj>gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$")
PART = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": None, "w2": None}


@dataclass(frozen=True)
class Slot:
    """Where a disk tensor lives in memory: a parameter, optionally one expert's slice (and gate/up half)."""

    name: str
    expert: int | None = None
    part: str | None = None  # "gate" | "up" (first / second half of a fused gate_up_proj) | None


def memory_slot(disk_name: str, params: dict) -> Slot | None:
    """The in-memory slot of a disk tensor in a skeleton with parameter names `params`, or None."""
    if disk_name in params:
        return Slot(disk_name)
    renamed = disk_name.replace(".block_sparse_moe.", ".mlp.")  # mixtral's legacy module name
    if renamed in params:
        return Slot(renamed)
    m = PER_EXPERT.match(renamed)
    if not m:
        return None
    fused = f"{m['prefix']}.{'down_proj' if PART[m['proj']] is None else 'gate_up_proj'}"
    if fused in params:
        return Slot(fused, int(m["idx"]), PART[m["proj"]])
    return None


def slot_view(param: torch.Tensor, slot: Slot) -> torch.Tensor:
    """The part of an in-memory parameter a disk tensor occupies (a view, so it can be written)."""
    t = param if slot.expert is None else param[slot.expert]
    if slot.part is not None:
        half = t.shape[0] // 2
        t = t[:half] if slot.part == "gate" else t[half:]
    return t


@dataclass
class Skeleton:
    model: nn.Module
    text_model: nn.Module  # holds embed_tokens / layers / norm
    layers: nn.ModuleList
    layers_prefix: str  # qualified name of the ModuleList, e.g. "model.layers"
    params: dict  # qualified parameter name -> (module, attribute)

    def layer_prefix(self, i: int) -> str:
        return f"{self.layers_prefix}.{i}."

    def qualified(self, module: nn.Module) -> str:
        for name, m in self.model.named_modules():
            if m is module:
                return name
        raise KeyError("module not in the skeleton")


def build_skeleton(root, config: dict) -> Skeleton:
    import transformers
    from accelerate import init_empty_weights

    model_type = config.get("model_type")
    try:
        cfg = transformers.AutoConfig.from_pretrained(root)
        with init_empty_weights(include_buffers=False):  # parameters on meta, computed buffers real
            if config.get("vision_config") is not None:
                arch = (config.get("architectures") or [None])[0]
                cls = getattr(transformers, arch, None) if arch else None
                if cls is None:
                    raise BuildError(f"calibration: no transformers class {arch!r} for the multimodal {model_type}")
                model = cls._from_config(cfg, dtype=torch.float32)
            else:
                model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    except BuildError:
        raise
    except Exception as e:
        raise BuildError(f"calibration: transformers cannot build model_type {model_type!r} ({e.__class__.__name__}: "
                         f"{e}); use --method clip or rtn, which need no forward pass") from None
    model.eval()
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and n.endswith("layers")
             and "visual" not in n and "vision" not in n and not n.startswith("mtp")]
    if not found:
        raise BuildError(f"calibration: no decoder `layers` list in the {model_type} model")
    layers_prefix, layers = min(found, key=lambda x: len(x[0]))
    text_model = model.get_submodule(layers_prefix.rsplit(".", 1)[0]) if "." in layers_prefix else model
    params = {}
    for mname, module in model.named_modules():
        for pname in module._parameters:
            params[f"{mname}.{pname}" if mname else pname] = (module, pname)
    return Skeleton(model, text_model, layers, layers_prefix, params)


def _compose(slots_of: dict, name: str, shape, dtype, device, read) -> torch.Tensor:
    """Build one in-memory parameter from the disk tensors mapped to it (`slots_of[name]` = [(disk, slot)])."""
    pieces = slots_of.get(name)
    if not pieces:
        raise BuildError(f"calibration: the checkpoint has no tensor for parameter {name}")
    if len(pieces) == 1 and pieces[0][1].expert is None:
        t = read(pieces[0][0]).to(device=device, dtype=dtype)
        if tuple(t.shape) != tuple(shape):
            raise BuildError(f"calibration: {pieces[0][0]} has shape {list(t.shape)}, the model expects {list(shape)}")
        return t
    out = torch.empty(shape, dtype=dtype, device=device)
    covered = 0
    for disk, slot in pieces:
        view = slot_view(out, slot)
        t = read(disk)
        if tuple(t.shape) != tuple(view.shape):
            raise BuildError(f"calibration: {disk} has shape {list(t.shape)}, its slot in {name} is {list(view.shape)}")
        view.copy_(t.to(device=device, dtype=dtype))
        covered += t.numel()
    if covered != out.numel():
        raise BuildError(f"calibration: the per-expert tensors cover {covered} of the {out.numel()} values of {name}")
    return out


def materialise(skel: Skeleton, module: nn.Module, slots_of: dict, read, device, dtype) -> None:
    """Load every parameter of `module` (a layer, the embedding, the final norm) from the shards."""
    prefix = skel.qualified(module)
    for pname, p in list(module.named_parameters()):
        full = f"{prefix}.{pname}" if prefix else pname
        owner, attr = skel.params[full]
        t = _compose(slots_of, full, p.shape, dtype, device, read)
        owner._parameters[attr] = nn.Parameter(t, requires_grad=False)


def release(module: nn.Module) -> None:
    """Back to meta: the layer's memory is freed."""
    for m in module.modules():
        for attr, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[attr] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                                   requires_grad=False)


def return_freed_memory() -> None:
    """Hand the pages of freed blocks back to the OS (glibc `malloc_trim`; a no-op elsewhere).

    A released layer's blocks are free but glibc keeps them in its heaps, fragmented between small live
    allocations, so a process's peak RSS wanders up by tens of MiB per layer without it (measured by
    tests/bench/calib_memory.py)."""
    import ctypes

    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # the symbols already loaded: libc's, on glibc
    if trim is not None:
        trim(0)


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc mallopt parameters (malloc.h)


def reuse_freed_memory() -> bool:
    """Have glibc serve large blocks from its heap and keep freed ones for reuse (no mmap per block, no
    automatic trim); True when it took. A batched expert chunk allocates GB-sized temporaries per call; mmap'd,
    each is page-faulted and zeroed anew by the kernel: a [16, 3072, 1024] gptq call took 2.1M minor faults and
    4-6 s of system time against 0.4M and 2.3 s this way, the same bytes (tests/bench/bench_real_layer.py slice).
    `return_freed_memory` still hands the pages back after each layer. Process-wide: only an entry point calls
    it (quant_save's main on CPU), never library code."""
    import ctypes

    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))


# oneDNN's primitive cache and ideep's computation cache are keyed by shapes. Routed experts see a different
# token count per expert per layer, so on CPU both caches fill with one entry per (expert count, weight
# shape), each holding scratch buffers: about 27 MiB more per layer of the tiny MoE of tests/bench/calib_memory.py,
# and up to 1024 entries each. A calibration pass runs every shape once, so caching buys nothing there.
CPU_SHAPE_CACHE_LIMITS = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0", "LRU_CACHE_CAPACITY": "1"}


def limit_cpu_shape_caches(environ) -> None:
    """Set the cache limits above in `environ` (os.environ), keeping any value the user set. They are read when
    the first primitive is created, so call this before the first forward of the process."""
    for key, value in CPU_SHAPE_CACHE_LIMITS.items():
        environ.setdefault(key, value)


def write_slot(skel: Skeleton, slot: Slot, value: torch.Tensor) -> None:
    """Put a (quantized) disk tensor into its in-memory place."""
    owner, attr = skel.params[slot.name]
    view = slot_view(owner._parameters[attr].data, slot)
    view.copy_(value.to(view.dtype))


class _Stop(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for a decoder layer: records the arguments the model passes it, returns its input."""

    def __init__(self, inner: nn.Module, store: list, last: bool):
        super().__init__()
        self.inner = inner
        self.store = store
        self.last = last

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)

    def forward(self, hidden_states, *args, **kwargs):
        self.store.append((hidden_states, args, kwargs))
        if self.last:
            raise _Stop()
        return hidden_states


def catch_layer_inputs(skel: Skeleton, input_ids: torch.Tensor) -> tuple[torch.Tensor, list]:
    """Run the text model up to its first layer: (layer-0 input hidden states, per-layer (args, kwargs)).

    The embedding must be materialised; the layers are replaced by catchers (identity), so the attention
    masks, position ids and rotary embeddings each layer receives are recorded whatever the family."""
    stores = [[] for _ in skel.layers]
    originals = list(skel.layers)
    n = len(originals)
    for i, layer in enumerate(originals):
        skel.layers[i] = _Catcher(layer, stores[i], last=(i == n - 1))
    try:
        with torch.no_grad():
            skel.text_model(input_ids=input_ids, use_cache=False)
    except _Stop:
        pass
    finally:
        for i, layer in enumerate(originals):
            skel.layers[i] = layer
    hidden = stores[0][0][0]
    per_layer = [(s[0][1], s[0][2]) for s in stores]
    return hidden, per_layer


def slot_map(disk_names, skel: Skeleton) -> tuple[dict, dict]:
    """(disk name -> Slot, in-memory parameter name -> [(disk name, Slot)] in expert/part order) for the disk
    tensors that have a place in the skeleton."""
    slot, slots_of = {}, {}
    for name in disk_names:
        s = memory_slot(name, skel.params)
        if s is not None:
            slot[name] = s
            slots_of.setdefault(s.name, []).append((name, s))
    for pieces in slots_of.values():
        pieces.sort(key=lambda x: (x[1].expert or 0, x[1].part or ""))
    return slot, slots_of


def first_layer_inputs(skel: Skeleton, ids: torch.Tensor, batch: int, slots_of: dict, read, device, dtype):
    """(layer-0 inputs [n, T, H] on the CPU in `dtype`, per batch the per-layer forward arguments, the final norm
    modules still materialised). The embedding is loaded for this and released after it (the 122B's is 1.5 GB);
    only the final norm stays, for the head's statistics."""
    top = [m for n, m in skel.text_model.named_children() if n != skel.layers_prefix.rsplit(".", 1)[-1]]
    with_params = [m for m in top if any(True for _ in m.parameters())]
    for m in with_params:
        materialise(skel, m, slots_of, read, device, dtype)
    xs, layer_args = [], []
    for b0 in range(0, ids.shape[0], batch):
        hidden, per_layer = catch_layer_inputs(skel, ids[b0:b0 + batch].to(device))
        xs.append(hidden.to("cpu"))
        layer_args.append(per_layer)
    norms = [m for m in with_params if "norm" in type(m).__name__.lower()]
    for m in with_params:
        if m not in norms:
            release(m)
    return torch.cat(xs).to(dtype), layer_args, norms
