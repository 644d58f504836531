"""A per-expert bits plan under a budget in effective bits, from a probe (moe_probe.py) and a ranking.

Budget: effective bits per routed-expert parameter, every scale counted (footprint.packed_bits), over
all routed-expert tensors; the other tensors follow the build recipe and are not in the plan. Levels
(e.g. 2,3,4): the base level is the highest whose uniform cost fits the budget; the top `spread` of the
ranking goes one level up and the bottom `spread` one level down, then single experts move (best-ranked
up / worst-ranked down) until the budget is met within `tol` (0.01 bit).

Rankings (higher = more bits), each normalised within its layer so every layer is ranked on the same
footing: freq (token share), wmass (router-weight mass), asal (activation salience: input norm summed
over routed tokens), wnorm (expert weight norm), composite (mean rank percentile of the four), uniform
(no preference: every layer gets the same number of upgrades, spread 0), random (seeded), inverse
(asal reversed: the control that must lose).

Plan format (consumed by quant_save.py --bits-plan and moe_study.py):
  {"format": "moe-lowbit/bits-plan/1", "strategy": S, "budget_bits": B, "effective_bits": E,
   "group": G, "grid": GRID, "tensors": {"<name>": BITS | [BITS per expert]}}
A fused 3-D expert tensor gets a list (one entry per expert slice); a per-expert 2-D tensor a number.

    python src/quant/moe_alloc.py --probe probe.json --model DIR --budget 3.13 --strategy asal \
        --levels 2,3,4 --out plan.json
"""
from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import atomic_io
import model_ref
import quant_config

FORMAT = "moe-lowbit/bits-plan/1"
STRATEGIES = ("freq", "wmass", "asal", "wnorm", "composite", "uniform", "random", "inverse")
PER_EXPERT = re.compile(r"^(?P<prefix>.*\.layers\.(?P<layer>\d+)\..*experts)\.(?P<expert>\d+)\.(?P<rest>.+)$")
FUSED = re.compile(r"^(?P<prefix>.*\.layers\.(?P<layer>\d+)\..*experts)\.(?P<rest>[^.]+(\.weight)?)$")


class AllocError(ValueError):
    """A clear, user-facing failure (unreachable budget, unknown strategy, probe/model mismatch)."""


@dataclass
class ExpertUnit:
    """One routed expert: the tensors (or fused slices) it owns and their packed cost per level."""

    layer: int
    expert: int
    parts: list = field(default_factory=list)  # (tensor name, shape of the expert's part, axis, fused?)

    @property
    def params(self) -> int:
        return sum(math.prod(shape) for _, shape, _, _ in self.parts)

    def bits_at(self, level: float, group: int, grid: str) -> float:
        import footprint
        import moe_quant

        spec = moe_quant.QuantSpec(bits=level, group=group, grid=grid)
        return sum(footprint.packed_bits(shape, axis, spec) for _, shape, axis, _ in self.parts)


def read_shapes(model_dir: Path) -> dict:
    """{tensor name: (shape, dtype)} from the checkpoint's safetensors headers (no weights read)."""
    import struct

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise AllocError(f"--model {model_dir}: no *.safetensors files")
    out = {}
    for f in files:
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            header = json.loads(fh.read(n))
        for name, info in header.items():
            if name != "__metadata__":
                out[name] = (tuple(info["shape"]), info["dtype"])
    return out


def expert_units(model_dir: Path) -> dict:
    """{(layer, expert): ExpertUnit} for every routed-expert weight the model's adapter names."""
    import footprint
    import model_adapters

    config = json.loads((Path(model_dir) / "config.json").read_text())
    adapter = model_adapters.adapter_for(config)
    units: dict = {}
    for name, (shape, dtype) in sorted(read_shapes(model_dir).items()):
        role = adapter.classify(name, shape)
        if role.role != model_adapters.Role.ROUTED_EXPERT or not role.quantizable:
            continue
        if dtype not in footprint.FLOAT_DTYPES:
            continue
        m = PER_EXPERT.match(name)
        if m:
            key = (int(m["layer"]), int(m["expert"]))
            units.setdefault(key, ExpertUnit(*key)).parts.append((name, shape, role.axis, False))
            continue
        m = FUSED.match(name)
        if not m or len(shape) != 3:
            raise AllocError(f"{name}: a routed-expert tensor of shape {shape} that is neither experts.N.* "
                             f"nor a fused [E, ...] tensor")
        axis = role.axis if role.axis < 0 else role.axis - 1
        for e in range(shape[0]):
            key = (int(m["layer"]), e)
            units.setdefault(key, ExpertUnit(*key)).parts.append((name, shape[1:], axis, True))
    if not units:
        raise AllocError(f"--model {model_dir}: no routed-expert tensors (a dense model has nothing to allocate)")
    return units


def weight_norms(model_dir: Path, units: dict) -> dict:
    """Frobenius norm per expert (fused tensors sliced), read tensor by tensor."""
    from safetensors import safe_open

    want = {}
    for key, u in units.items():
        for name, _, _, fused in u.parts:
            want.setdefault(name, []).append((key, fused))
    norms = {k: 0.0 for k in units}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            for name in fh.keys():
                if name not in want:
                    continue
                t = fh.get_tensor(name).float()
                for key, fused in want[name]:
                    part = t[key[1]] if fused else t
                    norms[key] += float(part.pow(2).sum())
    return {k: math.sqrt(v) for k, v in norms.items()}


def _per_layer_normalised(values: dict) -> dict:
    layers: dict = {}
    for (l, e), v in values.items():
        layers.setdefault(l, []).append(v)
    return {(l, e): v / (sum(layers[l]) / len(layers[l]) or 1.0) for (l, e), v in values.items()}


def _percentiles(values: dict) -> dict:
    order = sorted(values, key=lambda k: (values[k], k))
    n = max(len(order) - 1, 1)
    return {k: i / n for i, k in enumerate(order)}


def scores(strategy: str, probe: dict, units: dict, model_dir: Path, seed: int = 0) -> dict:
    """{(layer, expert): score}, higher = more bits."""
    if strategy not in STRATEGIES:
        raise AllocError(f"unknown strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    by_key = {}
    for layer in probe["layers"]:
        for e in range(layer["n_experts"]):
            by_key[(layer["layer"], e)] = {"freq": layer["freq"][e], "wmass": layer["wmass"][e],
                                           "asal": layer["asal"][e]}
    missing = sorted(set(units) - set(by_key))
    if missing:
        raise AllocError(f"the probe has no statistics for experts {missing[:4]} of the model (probe of a "
                         f"different model?)")
    keys = sorted(units)
    if strategy in ("freq", "wmass", "asal"):
        return _per_layer_normalised({k: by_key[k][strategy] for k in keys})
    if strategy == "inverse":
        return {k: -v for k, v in _per_layer_normalised({k: by_key[k]["asal"] for k in keys}).items()}
    if strategy == "wnorm":
        return _per_layer_normalised(weight_norms(model_dir, {k: units[k] for k in keys}))
    if strategy == "composite":
        parts = [_percentiles(_per_layer_normalised({k: by_key[k][m] for k in keys}))
                 for m in ("freq", "wmass", "asal")]
        parts.append(_percentiles(_per_layer_normalised(weight_norms(model_dir, units))))
        return {k: sum(p[k] for p in parts) / len(parts) for k in keys}
    if strategy == "random":
        rng = random.Random(seed)
        return {k: rng.random() for k in keys}
    # uniform: no preference; the rank interleaves layers so every layer gets the same number of upgrades
    n_layers = len({l for l, _ in keys})
    return {(l, e): -(e * n_layers + l) for l, e in keys}


def allocate(units: dict, score: dict, budget: float, levels: list, group: int, grid: str,
             spread: float = 0.25, tol: float = 0.01) -> tuple[dict, float]:
    """{(layer, expert): level} meeting the budget (effective bits / routed param) within tol."""
    levels = sorted(float(b) for b in levels)
    params = sum(u.params for u in units.values())
    cost = {k: {b: u.bits_at(b, group, grid) for b in levels} for k, u in units.items()}
    uniform = [sum(c[b] for c in cost.values()) / params for b in levels]
    if budget < uniform[0] - tol:
        raise AllocError(f"budget {budget} bits is below the lowest level: every expert at {levels[0]} bits "
                         f"already costs {uniform[0]:.4f} effective bits (scales counted)")
    if budget > uniform[-1] + tol:
        raise AllocError(f"budget {budget} bits is above the highest level: every expert at {levels[-1]} "
                         f"bits costs only {uniform[-1]:.4f} effective bits; add a higher level or lower it")
    base = max(i for i, u in enumerate(uniform) if u <= budget + tol)
    ranked = sorted(units, key=lambda k: (-score[k], k))  # best first
    n = len(ranked)
    idx = {k: base for k in ranked}
    n_move = int(round(spread * n))
    for k in ranked[:n_move]:
        idx[k] = min(base + 1, len(levels) - 1)
    for k in ranked[n - n_move:] if n_move else []:
        idx[k] = max(base - 1, 0)

    def effective() -> float:
        return sum(cost[k][levels[i]] for k, i in idx.items()) / params

    eff = effective()
    while eff > budget + tol / 2:  # downgrade the worst-ranked expert that can go down
        k = next(k for k in reversed(ranked) if idx[k] > 0)
        idx[k] -= 1
        eff = effective()
    while eff < budget - tol / 2:  # upgrade the best-ranked expert that can go up
        k = next((k for k in ranked if idx[k] < len(levels) - 1), None)
        if k is None:
            break
        idx[k] += 1
        if effective() > budget + tol / 2:
            idx[k] -= 1
            break
        eff = effective()
    eff = effective()
    if abs(eff - budget) > tol:
        raise AllocError(f"budget {budget} cannot be met within {tol} bit with levels {levels} "
                         f"(reached {eff:.4f}); add a level or change the budget")
    return {k: levels[i] for k, i in idx.items()}, eff


def plan_tensors(units: dict, bits: dict) -> dict:
    """{(layer, expert): bits} -> the plan's tensor map (lists for fused 3-D tensors)."""
    tensors: dict = {}
    for key in sorted(units):
        for name, shape, _, fused in units[key].parts:
            if fused:
                tensors.setdefault(name, {})[key[1]] = bits[key]
            else:
                tensors[name] = bits[key]
    return {name: ([v[e] for e in sorted(v)] if isinstance(v, dict) else v) for name, v in tensors.items()}


def make_plan(probe: dict, model_dir: Path, budget: float, strategy: str, levels: list, group: int = 128,
              grid: str = "full", spread: float = 0.25, seed: int = 0, tol: float = 0.01,
              units: dict | None = None) -> dict:
    units = units or expert_units(model_dir)
    score = scores(strategy, probe, units, model_dir, seed)
    bits, eff = allocate(units, score, budget, levels, group, grid, 0.0 if strategy == "uniform" else spread, tol)
    hist: dict = {}
    for b in bits.values():
        hist[str(b)] = hist.get(str(b), 0) + 1
    return {"format": FORMAT, "strategy": strategy, "budget_bits": budget, "effective_bits": eff,
            "levels": sorted(float(b) for b in levels), "group": group, "grid": grid, "spread": spread,
            "seed": seed, "experts_per_level": hist, "tensors": plan_tensors(units, bits)}


def validate_plan(plan: dict, shapes: dict) -> None:
    """Raise AllocError unless every plan tensor exists with a matching per-expert list length."""
    if plan.get("format") != FORMAT:
        raise AllocError(f"not a {FORMAT} plan (format={plan.get('format')!r})")
    for name, bits in plan["tensors"].items():
        if name not in shapes:
            raise AllocError(f"the plan names tensor {name!r}, which the checkpoint lacks")
        shape = shapes[name][0]
        if isinstance(bits, list) and (len(shape) != 3 or len(bits) != shape[0]):
            raise AllocError(f"the plan gives {name!r} {len(bits)} per-expert bits but its shape is {shape}")


def plan_effective_bits(plan: dict, shapes: dict, axis_of) -> float:
    """Effective bits of the plan's tensors (scales counted), recomputed from shapes alone."""
    import footprint
    import moe_quant

    total_bits = total_params = 0.0
    for name, bits in plan["tensors"].items():
        shape = shapes[name][0]
        per = bits if isinstance(bits, list) else [bits]
        part = shape[1:] if isinstance(bits, list) else shape
        for b in per:
            spec = moe_quant.QuantSpec(bits=float(b), group=plan["group"], grid=plan["grid"])
            total_bits += footprint.packed_bits(part, axis_of(name, part), spec)
            total_params += math.prod(part)
    return total_bits / total_params


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Per-expert bits plan under an effective-bits budget from a "
                                             "moe_probe.py JSON and a ranking strategy.")
    ap.add_argument("--probe", required=True, type=Path, help="moe_probe.py output JSON")
    ap.add_argument("--model", required=True, help="checkpoint dir or embedded:NAME (tensor names and shapes)")
    ap.add_argument("--budget", required=True, type=float, help="effective bits per routed-expert parameter")
    ap.add_argument("--strategy", required=True, choices=STRATEGIES)
    ap.add_argument("--levels", default="2,3,4", help="comma-separated bit levels")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--grid", default="full", choices=quant_config.GRIDS,
                    help="quant grid the levels are charged for (full: 2^bits levels, so 2 bits is valid)")
    ap.add_argument("--spread", type=float, default=0.25, help="fraction of experts moved up / down a level")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random strategy")
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    try:
        model_dir = model_ref.resolve(args.model, log=lambda m: print(m, file=sys.stderr))
        if not args.probe.is_file():
            raise AllocError(f"--probe {args.probe} does not exist (run moe_probe.py first)")
        probe = json.loads(args.probe.read_text())
        levels = [float(x) for x in args.levels.split(",") if x.strip()]
        plan = make_plan(probe, model_dir, args.budget, args.strategy, levels, args.group, args.grid,
                         args.spread, args.seed)
    except (AllocError, ValueError) as e:  # ModelRefError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    plan["model"] = str(model_dir)
    plan["probe"] = str(args.probe)
    atomic_io.write_json(args.out, plan)
    print(f"{args.strategy}: {plan['effective_bits']:.4f} effective bits (budget {args.budget}), experts per "
          f"level {plan['experts_per_level']} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
