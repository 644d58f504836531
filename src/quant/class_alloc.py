"""Bits for tensor classes (q/k/v/o/gate/up/down, the embedding) from measured sensitivity, under a budget.

Why classes and not single tensors: a class is a handful of builds to measure (raise one class, score the
held-out KL, see what it bought per bit), and the choice it leads to is one line a user can read and
check. llama.cpp's k-quant mixes make the same kind of choice by hand (attn_v and ffn_down a type higher);
here each option carries its own measured KL change and exact bits, so the choice is made on numbers.

Options are measured one at a time against one base build. The chooser assumes their effects add (it says
so in its output as the *predicted* KL); the bench then builds the chosen combination and reports what it
measured, never the prediction. Options in one `group` exclude each other (embed at 6 or at 5 bits).

Everything here is pure: names in, names out. The bench (tests/bench/quant_sensitivity.py) does the builds.
"""
from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass

from build_plan import BITS_PLAN_FORMAT  # the one format quant_save --bits-plan reads

DENSE_LINEAR = re.compile(r"\.layers\.(?P<layer>\d+)\.(?:self_attn|mlp)\.(?P<cls>[a-z_]+_proj)\.weight$")
EMBEDDING = re.compile(r"(?:^|\.)embed_tokens\.weight$")  # class "embed" (a tied lm_head shares it)
MAX_OPTIONS = 20  # exhaustive search: 2^20 subsets is the most this should ever try


@dataclass(frozen=True)
class Option:
    """One measured change to the base recipe: raise (or lower) one class's bits."""

    name: str  # e.g. "down_proj@6"
    group: str  # options sharing a group exclude each other (e.g. "down_proj", "embed")
    delta_kl: float  # measured KL(option build) - KL(base build), same windows; < 0 is better
    delta_bpw: float  # exact change of the whole model's effective bits per weight (all tensors counted)


@dataclass(frozen=True)
class Choice:
    options: tuple[Option, ...]
    predicted_delta_kl: float
    delta_bpw: float


def linear_classes(names) -> dict[str, list[str]]:
    """Decoder-layer linear weights by class (`q_proj`, ..., `down_proj`), each list in name order."""
    out: dict[str, list[str]] = {}
    for n in names:
        m = DENSE_LINEAR.search(n)
        if m:
            out.setdefault(m.group("cls"), []).append(n)
    if not out:
        raise ValueError("no decoder-layer linear weights named *.layers.N.{self_attn,mlp}.*_proj.weight")
    return {c: sorted(v, key=_layer_then_name) for c, v in sorted(out.items())}


def tensor_classes(names) -> dict[str, list[str]]:
    """`linear_classes` plus the input embedding as class "embed", so a plan can carry its bits: the plan,
    not the recipe's --role-bits, then says everything that was measured on this one model."""
    names = list(names)
    classes = linear_classes(names)
    embed = sorted(n for n in names if EMBEDDING.search(n))
    if embed:
        classes["embed"] = embed
    return dict(sorted(classes.items()))


def _layer_then_name(name: str) -> tuple[int, str]:
    m = DENSE_LINEAR.search(name)
    return (int(m.group("layer")) if m else -1, name)


def choose(options: list[Option], budget_delta_bpw: float) -> Choice:
    """The subset (at most one option per group) with the lowest predicted KL whose bits fit the budget.

    `budget_delta_bpw` is how many bits per weight the combination may add to the base (0: same footprint;
    a donor such as a lower-bit embedding has delta_bpw < 0 and pays for upgrades). Ties: fewer options,
    then fewer bits. The empty choice (the base itself) always fits when the budget is >= 0."""
    if len(options) > MAX_OPTIONS:
        raise ValueError(f"{len(options)} options: at most {MAX_OPTIONS} for an exhaustive choice")
    names = [o.name for o in options]
    if len(set(names)) != len(names):
        raise ValueError(f"option names must be unique, got {names}")
    bad = [o.name for o in options if not (math.isfinite(o.delta_kl) and math.isfinite(o.delta_bpw))]
    if bad:
        raise ValueError(f"options with a non-finite KL or bits change: {bad}")
    groups: dict[str, list[Option]] = {}
    for o in options:
        groups.setdefault(o.group, []).append(o)
    best = None
    for pick in itertools.product(*[[None, *g] for g in groups.values()]):
        chosen = tuple(o for o in pick if o is not None)
        bits = sum(o.delta_bpw for o in chosen)
        if bits > budget_delta_bpw + 1e-9:
            continue
        key = (sum(o.delta_kl for o in chosen), len(chosen), bits)
        if best is None or key < best[0]:
            best = (key, Choice(chosen, key[0], bits))
    if best is None:
        raise ValueError(f"no combination fits a budget of {budget_delta_bpw:+.4f} bits per weight "
                         f"(the base alone adds 0)")
    return best[1]


def plan_tensors(classes: dict[str, list[str]], class_bits: dict[str, float]) -> dict[str, float]:
    """{tensor name: bits} for every tensor of the classes given bits (the others keep the recipe's)."""
    unknown = sorted(set(class_bits) - set(classes))
    if unknown:
        raise ValueError(f"unknown tensor classes {unknown}; known: {sorted(classes)}")
    return {n: float(b) for c, b in sorted(class_bits.items()) for n in classes[c]}


def bits_plan(tensors: dict[str, float], strategy: str, group: int, grid: str,
              budget_bpw_all_tensors: float | None = None) -> dict:
    """A bits-plan document in the format quant_save --bits-plan reads. Its budget is over all tensors
    (bits per weight of the whole model), so it is recorded under its own key: the format's `budget_bits`
    means bits per routed-expert parameter (moe_alloc's plans) and stays empty here. It holds nothing
    known only after the build, so the file a bench builds from is the file it ships."""
    if not tensors:
        raise ValueError("a bits plan needs at least one tensor")
    return {"format": BITS_PLAN_FORMAT, "strategy": strategy, "budget_bits": None,
            "budget_bpw_all_tensors": budget_bpw_all_tensors, "group": group, "grid": grid,
            "tensors": dict(sorted(tensors.items()))}
