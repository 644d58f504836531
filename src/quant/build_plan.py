"""Planning a build: the role, bits and QuantSpec of every tensor, an optional bits plan, and the footprint.

Pure decisions from headers and the recipe; nothing here reads tensor data or writes files, so
`--dry-run` prints exactly the plan (and the footprint) the build will execute.

A bits plan (`--bits-plan PLAN.json`, written by `moe_alloc.py`) overrides the role bits of the tensors it
names: `{"format": "moe-lowbit/bits-plan/1", "strategy": ..., "budget_bits": 3.0, "tensors": {NAME: BITS or
[BITS per expert]}}`. A per-expert list applies to a fused 3-D expert tensor slice by slice (expert 0 at
4 bits, expert 1 at 2 bits), and the footprint counts each slice at its own bits.

A gguf:Q*_K grid on a tensor whose rows 256 does not divide (SmolLM2's 576-wide projections) is planned as the
type llama-quantize itself falls back to (Q3_K -> Q4_0, Q4_K -> Q5_0, Q6_K -> Q8_0: the `full` grid in blocks of
32, which the GGUF export writes exactly); the entry records `fallback_from`, and the build prints one line.
A row that 32 does not divide either is refused, naming the tensor.
"""
from __future__ import annotations

import hashlib
import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import footprint
import model_adapters
import quant_spec
from ckpt_source import BuildError, Source, TensorEntry
from model_adapters import Recipe, Role

BITS_PLAN_FORMAT = "moe-lowbit/bits-plan/1"


@dataclass(frozen=True)
class TensorPlan:
    entry: TensorEntry
    role: model_adapters.TensorRole
    spec: quant_spec.QuantSpec | None  # None: copied byte for byte (or, with slice_specs, the largest slice spec)
    slice_specs: tuple | None = None  # fused 3-D experts under a per-expert plan: one spec (or None = keep) per expert

    @property
    def quantized(self) -> bool:
        return self.spec is not None or (self.slice_specs is not None and any(s is not None for s in self.slice_specs))


@dataclass(frozen=True)
class BitsPlan:
    path: str
    sha256: str
    strategy: str | None
    budget_bits: float | None
    tensors: dict  # name -> float | tuple[float, ...]

    def record(self) -> dict:
        return {"path": self.path, "sha256": self.sha256, "strategy": self.strategy, "budget_bits": self.budget_bits,
                "tensors": len(self.tensors)}


def load_bits_plan(path: str) -> BitsPlan:
    """Parse and validate the plan file's own structure (names are checked against the checkpoint later)."""
    p = Path(path).expanduser()
    try:
        raw = p.read_bytes()
        doc = json.loads(raw)
    except FileNotFoundError:
        raise BuildError(f"--bits-plan {path}: no such file") from None
    except (OSError, ValueError) as e:
        raise BuildError(f"--bits-plan {path}: not readable JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != BITS_PLAN_FORMAT:
        raise BuildError(f"--bits-plan {path}: format must be {BITS_PLAN_FORMAT!r}, got "
                         f"{doc.get('format') if isinstance(doc, dict) else type(doc).__name__!r}")
    tensors = doc.get("tensors")
    if not isinstance(tensors, dict) or not tensors:
        raise BuildError(f"--bits-plan {path}: 'tensors' must be a non-empty object of NAME: BITS or [BITS per expert]")
    parsed = {}
    for name, bits in tensors.items():
        try:
            if isinstance(bits, list):
                parsed[name] = tuple(float(b) for b in bits)
            else:
                parsed[name] = float(bits)
        except (TypeError, ValueError):
            raise BuildError(f"--bits-plan {path}: tensor {name}: bits must be a number or a list of numbers, "
                             f"got {bits!r}") from None
    budget = doc.get("budget_bits")
    return BitsPlan(str(p.resolve()), hashlib.sha256(raw).hexdigest(), doc.get("strategy"),
                    None if budget is None else float(budget), parsed)


def _spec_or_none(recipe: Recipe, bits: float, where: str):
    try:
        spec = recipe.spec(bits)
    except ValueError as e:
        raise BuildError(f"{where}: {e}") from None
    return None if spec.is_identity else spec


def gguf_row_fallback(name: str, k: int, spec: quant_spec.QuantSpec | None) -> quant_spec.QuantSpec | None:
    """`spec`, or for a K-quant whose 256-block does not divide the row of k weights, llama-quantize's fallback type."""
    kt = None if spec is None else spec.k_type
    if kt is None or k % quant_spec.QK_K == 0:
        return spec
    fb = quant_spec.K_FALLBACK[kt.name]
    if k % 32:
        raise BuildError(f"tensor {name}: rows of {k} weights fit neither {kt.name}'s blocks of {quant_spec.QK_K} nor "
                         f"the fallback {fb}'s blocks of 32; give its role another grid")
    return quant_spec.QuantSpec(bits=float(quant_spec.LEGACY_TYPES[fb]), group=32, clip_steps=spec.clip_steps,
                                clip_lo=spec.clip_lo, grid="full", fallback_from=spec.grid)


def plan_source(source: Source, recipe: Recipe, bits_plan: BitsPlan | None = None
                ) -> tuple[model_adapters.BaseAdapter, dict[str, list[TensorPlan]], list[str]]:
    """Role and spec for every tensor; refuses sources it would quantize wrongly (fp8 weights) and plans
    that name tensors the checkpoint lacks or cannot quantize."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapter = model_adapters.adapter_for(source.config)
    for w in caught:
        print(f"quant_save: warning: {w.message}", file=sys.stderr)
    if bits_plan is not None:
        names = {t.name for s in source.shards for t in s.tensors}
        missing = sorted(set(bits_plan.tensors) - names)
        if missing:
            raise BuildError(f"--bits-plan {bits_plan.path} names tensor {missing[0]} which the checkpoint "
                             f"{source.label} lacks ({len(missing)} such name(s))")
    plans: dict[str, list[TensorPlan]] = {}
    unclassified = []
    fallbacks = []
    for shard in source.shards:
        rows = []
        for t in shard.tensors:
            try:
                role = adapter.classify(t.name, t.shape)
            except ValueError as e:
                raise BuildError(str(e)) from None
            is_float = t.dtype in footprint.FLOAT_DTYPES
            if role.quantizable and t.dtype.startswith("F8") and recipe.bits_for(role.role) < 16:
                raise BuildError(f"{t.name} is {t.dtype}: fp8 checkpoints must be dequantized to BF16 first "
                                 f"(their block scales live in separate tensors)")
            spec = recipe.spec_for(role, is_float, len(t.shape))
            slice_specs = None
            if bits_plan is not None and t.name in bits_plan.tensors:
                spec, slice_specs = _planned_spec(t, role, is_float, recipe, bits_plan)
            if role.quantizable and (spec is not None or slice_specs is not None):
                k = int(t.shape[role.axis])
                was = spec
                spec = gguf_row_fallback(t.name, k, spec)
                if slice_specs is not None:
                    slice_specs = tuple(gguf_row_fallback(t.name, k, s) for s in slice_specs)
                if spec is not was:
                    fallbacks.append((t.name, was.grid, spec.bits))
            if role.role == Role.OTHER and is_float and len(t.shape) >= 2:
                unclassified.append(t.name)
            rows.append(TensorPlan(t, role, spec, slice_specs))
        plans[shard.file] = rows
    if fallbacks:
        name, grid, bits = fallbacks[0]
        print(f"quant_save: {len(fallbacks)} tensor(s) have rows the 256-block of {grid} does not divide; they are "
              f"stored as llama.cpp's fallback type (full grid, {bits:g}-bit, blocks of 32), e.g. {name}", file=sys.stderr)
    return adapter, plans, unclassified


def _planned_spec(t: TensorEntry, role, is_float: bool, recipe: Recipe, plan: BitsPlan):
    bits = plan.tensors[t.name]
    where = f"--bits-plan tensor {t.name}"
    if not (role.quantizable and is_float and len(t.shape) >= 2):
        raise BuildError(f"{where}: a {role.role.value} tensor ({t.dtype} {list(t.shape)}) is never quantized")
    if isinstance(bits, tuple):
        if len(t.shape) != 3 or role.role != Role.ROUTED_EXPERT:
            raise BuildError(f"{where}: a per-expert list needs a fused 3-D routed-expert tensor, this one is "
                             f"{role.role.value} {list(t.shape)}")
        if len(bits) != t.shape[0]:
            raise BuildError(f"{where}: {len(bits)} per-expert bits for {t.shape[0]} experts")
        specs = tuple(_spec_or_none(recipe, b, f"{where} expert {i}") for i, b in enumerate(bits))
        if len(set(specs)) == 1:
            return specs[0], None
        widest = max((s for s in specs if s is not None), key=lambda s: float(s.bits), default=None)
        return widest, specs
    return _spec_or_none(recipe, bits, where), None


def tally_tensor(tallies: dict[str, footprint.RoleTally], p: TensorPlan, sq_err: float = 0.0,
                 sq_ref: float = 0.0) -> None:
    """Add one planned tensor to the per-role tallies; per-expert slices are each counted at their own bits."""
    t = p.entry
    role = tallies.setdefault(p.role.role.value, footprint.RoleTally())
    if p.slice_specs is None:
        role.add(t.shape, t.dtype, p.spec, p.role.axis, sq_err, sq_ref)
        return
    part = footprint.RoleTally()
    for spec in p.slice_specs:
        part.add(t.shape[1:], t.dtype, spec, p.role.axis)
    part.tensors, part.quantized_tensors = 1, 1
    part.sq_err, part.sq_ref = sq_err, sq_ref
    role.merge(part)


def tally_plans(plans: dict[str, list[TensorPlan]]) -> dict[str, footprint.RoleTally]:
    tallies: dict[str, footprint.RoleTally] = {}
    for rows in plans.values():
        for p in rows:
            tally_tensor(tallies, p)
    return tallies


def print_dry_run(source: Source, adapter, plans, planned: dict, recipe: Recipe, list_tensors: bool,
                  bits_plan: BitsPlan | None = None) -> None:
    print(f"model: {source.label} ({source.config.get('model_type')}, adapter {adapter.name}"
          f"{', GUESSED from names' if adapter.is_guess else ''}); {len(source.shards)} shard(s)")
    print(f"recipe: {json.dumps(recipe.as_dict())}")
    if bits_plan is not None:
        print(f"bits plan: {json.dumps(bits_plan.record())}")
    examples: dict[str, list[str]] = {}
    for rows in plans.values():
        for p in rows:
            examples.setdefault(p.role.role.value, []).append(p.entry.name)
            if list_tensors:
                if p.slice_specs is not None:
                    bits = "/".join("16" if s is None else f"{s.bits:g}" for s in p.slice_specs) + f" axis {p.role.axis}"
                else:
                    bits = "16 (kept)" if p.spec is None else f"{p.spec.bits:g} axis {p.role.axis}"
                print(f"  {p.role.role.value:<17}{bits:<14}{p.entry.dtype:<6}{list(p.entry.shape)}  {p.entry.name}")
    for role in sorted(examples):
        print(f"  {role:<17} e.g. {', '.join(examples[role][:2])}")
    print(footprint.format_table(planned))
