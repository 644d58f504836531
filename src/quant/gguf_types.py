"""llama.cpp tensor types for a GGUF pack, decided before any tool runs: the ggml type table, the recipe
language (`PATTERN=TYPE` per line), the type llama-quantize will give each tensor (with its shape
fallbacks), and the after-the-fact comparison with what it wrote. Pure: names, shapes and text in,
decisions out (gguf-py is only asked for its type and tensor-name tables).

The rules mirror llama.cpp's src/llama-quant.cpp of the pinned version (configs/gguf.env):
  - a recipe rule `PATTERN=TYPE` is a regex searched in the lower-cased tensor name; the first match wins;
  - token_embd / output take --token-embedding-type / --output-tensor-type before any rule;
  - some tensors are never quantized (1-D, norms, expert router ffn_gate_inp, ssm_conv1d, ...): they keep
    the type of the BF16 GGUF (the router: ROUTER_TYPE via gguf_convert.py; SSM scalars F32);
  - a row length (ne[0]) not divisible by the type's block falls back (IQ3_XXS -> IQ4_NL, Q3_K -> Q4_0,
    ...), and to F16 when even the fallback does not divide it.
A test compares these predictions with what llama-quantize actually wrote, so a llama.cpp bump that
changes them is caught.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

# llama-quantize: types that refuse to quantize without an importance matrix (tensor_requires_imatrix).
IMATRIX_REQUIRED = frozenset({"iq3_xxs", "iq2_xxs", "iq2_xs", "iq2_s", "iq1_m", "iq1_s"})
# llama-quantize ftype (its positional type argument) -> the ggml type its mix gives most tensors.
BASE_DEFAULT_TYPE = {"iq2_m": "iq2_s", "iq3_m": "iq3_s", "iq1_m": "iq1_m", "q2_k_s": "q2_k", "q3_k_s": "q3_k",
                     "q3_k_m": "q3_k", "q3_k_l": "q3_k", "q4_k_s": "q4_k", "q4_k_m": "q4_k", "q5_k_s": "q5_k",
                     "q5_k_m": "q5_k"}
# llama-quantize: shape fallback for a 256-block type whose row length it does not divide.
SHAPE_FALLBACK = {
    **{t: "iq4_nl" for t in ("iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s", "iq4_xs")},
    **{t: "q4_0" for t in ("q2_0", "q2_k", "q3_k", "tq1_0", "tq2_0")},
    "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0",
}
# llama-quantize never quantizes these (tensor_allows_quantization): substrings of the tensor name.
NEVER_QUANTIZED = ("_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
                   "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight",
                   "indexer.q_proj.weight")
NEVER_QUANTIZED_EXACT = ("position_embd.weight", "token_types.weight")
TOKEN_EMBD_NAMES = ("token_embd.weight", "per_layer_token_embd.weight")
OUTPUT_NAMES = ("output.weight",)


class RecipeError(ValueError):
    """A recipe line llama-quantize would reject or silently ignore; the message names line and fix."""


class PackError(RuntimeError):
    """A packing precondition failed (dequantized input, missing imatrix, unusable checkpoint)."""


@dataclass(frozen=True)
class Rule:
    pattern: str
    type: str  # canonical lower-case ggml type name
    line: int


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type: str  # lower-case ggml type name
    shape: tuple  # gguf order: shape[0] = row length (ne[0])
    n_elements: int
    n_bytes: int


@dataclass(frozen=True)
class Planned:
    """What llama-quantize should write for one tensor, and why."""
    name: str
    requested: str | None  # the type asked for (rule / embed / output flag); None = left to BASE_TYPE's mix
    expected: str | None  # after the shape fallback; None when the mix decides
    source: str  # "rule:N" | "token_embedding_type" | "output_tensor_type" | "kept" | "base_mix"
    fallback_reason: str | None = None


# ------------------------------------------------------------------------------------------ ggml types
def ggml_types(gguf_module=None) -> dict[str, tuple[int, int]]:
    """Lower-case ggml type name -> (block size, bytes per block), from the gguf-py in use."""
    gguf = gguf_module or import_gguf()
    return {t.name.lower(): gguf.GGML_QUANT_SIZES[t] for t in gguf.GGMLQuantizationType
            if t in gguf.GGML_QUANT_SIZES}


def canonical_type(name: str, known: Mapping[str, tuple[int, int]]) -> str:
    t = name.strip().lower()
    if t not in known:
        raise RecipeError(f"unknown ggml type {name!r}; valid: {', '.join(sorted(known))}")
    return t


def shape_fallback(type_name: str, row_len: int, known: Mapping[str, tuple[int, int]]) -> tuple[str, str | None]:
    """(type llama-quantize will use, reason or None) for a tensor whose rows hold `row_len` values."""
    block = known[type_name][0]
    if row_len % block == 0:
        return type_name, None
    reason = f"row length {row_len} not divisible by {block} ({type_name})"
    if type_name in SHAPE_FALLBACK:
        new = SHAPE_FALLBACK[type_name]
    elif block <= 32:
        new = type_name
    else:
        raise PackError(f"llama-quantize defines no fallback for {type_name} and a row length of {row_len}")
    if row_len % known[new][0] != 0:
        return "f16", reason + f"; {new} does not fit either -> f16"
    return new, reason + f" -> {new}"


# ------------------------------------------------------------------------------------------- recipes
def known_tensor_names(gguf_module=None) -> list[str]:
    """Every tensor name gguf-py knows (any architecture), block id 0, with and without '.weight'."""
    gguf = gguf_module or import_gguf()
    names = []
    for template in set(gguf.TENSOR_NAMES.values()):
        base = template.format(bid=0, xid=0)
        names += [base, base + ".weight"]
    return sorted(names)


def parse_recipe(text: str, known_types: Mapping[str, tuple[int, int]], known_names: Sequence[str],
                 source: str = "recipe") -> list[Rule]:
    """Rules of a tensor-type recipe: one `PATTERN=TYPE` per line; `#` starts a comment; blank lines skipped.

    Every line is checked the way llama-quantize would read it, plus one check it lacks: a pattern that
    matches no tensor name of any architecture is a typo (llama-quantize would silently ignore it).
    """
    rules = []
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{source}:{n}"
        if len(line.split()) != 1:
            raise RecipeError(f"{where}: {raw.strip()!r} has spaces; write one PATTERN=TYPE per line "
                              "(llama-quantize splits its file on whitespace)")
        pattern, sep, type_name = line.partition("=")
        if not sep or not pattern or not type_name:
            raise RecipeError(f"{where}: {line!r} is not PATTERN=TYPE (e.g. ffn_.*_exps=iq3_xxs)")
        try:
            regex = re.compile(pattern.lower())
        except re.error as err:
            raise RecipeError(f"{where}: pattern {pattern!r} is not a valid regex ({err})") from None
        try:
            t = canonical_type(type_name, known_types)
        except RecipeError as err:
            raise RecipeError(f"{where}: {err}") from None
        if not any(regex.search(name) for name in known_names):
            raise RecipeError(f"{where}: pattern {pattern!r} matches no GGUF tensor name of any architecture; "
                              "a typo? (names look like blk.0.ffn_down_exps.weight, see gguf-py TENSOR_NAMES)")
        rules.append(Rule(pattern.lower(), t, n))
    if not rules:
        raise RecipeError(f"{source}: no PATTERN=TYPE rule found")
    return rules


def render_tensor_type_file(rules: Iterable[Rule]) -> str:
    """The file given to `llama-quantize --tensor-type-file`: rules only, no comments or blank lines."""
    return "".join(f"{r.pattern}={r.type}\n" for r in rules)


# ------------------------------------------------------------------------------------------ planning
def ggml_n_dims(shape: Sequence[int]) -> int:
    """ggml_n_dims: trailing dimensions of size 1 do not count ([2048, 1] is 1-D to ggml)."""
    n = len(shape)
    while n > 1 and int(shape[n - 1]) == 1:
        n -= 1
    return max(n, 1)


def quantizable(name: str, n_dims: int) -> bool:
    """llama-quantize's tensor_allows_quantization (arch-independent part); n_dims as ggml counts them."""
    if n_dims < 2 or not name.endswith("weight"):
        return False
    if name in NEVER_QUANTIZED_EXACT:
        return False
    return not any(part in name for part in NEVER_QUANTIZED)


def plan_types(tensors: Sequence[TensorInfo], rules: Sequence[Rule], known: Mapping[str, tuple[int, int]],
               token_embedding_type: str | None = "q8_0", output_tensor_type: str | None = "q8_0") -> list[Planned]:
    """The type llama-quantize should give each tensor of the source GGUF under `rules`."""
    compiled = [(re.compile(r.pattern), r) for r in rules]
    out = []
    for t in tensors:
        if not quantizable(t.name, ggml_n_dims(t.shape)):
            out.append(Planned(t.name, None, t.type, "kept"))
            continue
        requested, source = None, "base_mix"
        if token_embedding_type and t.name in TOKEN_EMBD_NAMES:
            requested, source = token_embedding_type, "token_embedding_type"
        elif output_tensor_type and t.name in OUTPUT_NAMES:
            requested, source = output_tensor_type, "output_tensor_type"
        else:
            for regex, rule in compiled:
                if regex.search(t.name.lower()):
                    requested, source = rule.type, f"rule:{rule.line}"
                    break
        if requested is None:
            out.append(Planned(t.name, None, None, source))
            continue
        if source.startswith("rule"):
            expected, reason = shape_fallback(requested, int(t.shape[0]), known)
        else:
            expected, reason = requested, None  # llama-quantize returns the embed/output type unchecked
        out.append(Planned(t.name, requested, expected, source, reason))
    return out


def tensors_needing_imatrix(plan: Sequence[Planned], base_type: str) -> list[Planned]:
    """Tensors llama-quantize will refuse to write without --imatrix (explicit types; the base mix too)."""
    base = base_type.lower()
    need = []
    for p in plan:
        if p.name in TOKEN_EMBD_NAMES or p.name in OUTPUT_NAMES or p.source == "kept":
            continue
        effective = p.expected if p.expected is not None else BASE_DEFAULT_TYPE.get(base, base)
        if effective in IMATRIX_REQUIRED:
            need.append(p)
    return need


def unused_rules(rules: Sequence[Rule], plan: Sequence[Planned]) -> list[Rule]:
    """Rules that apply to no tensor of this model (fine for a shared recipe, but worth listing)."""
    used = {p.source for p in plan}
    return [r for r in rules if f"rule:{r.line}" not in used]


def compare(plan: Sequence[Planned], written: Sequence[TensorInfo]) -> dict:
    """Requested vs actual types read back: fallbacks (with reasons) and any prediction that was wrong."""
    by_name = {t.name: t for t in written}
    fallbacks, mismatches, missing = [], [], []
    for p in plan:
        got = by_name.get(p.name)
        if got is None:
            missing.append(p.name)
            continue
        if p.requested is not None and got.type != p.requested:
            fallbacks.append({"tensor": p.name, "requested": p.requested, "actual": got.type,
                              "row_len": int(got.shape[0]), "source": p.source,
                              "reason": p.fallback_reason or "not predicted by gguf_pack"})
        if p.expected is not None and got.type != p.expected:
            mismatches.append({"tensor": p.name, "expected": p.expected, "actual": got.type, "source": p.source})
    return {"fallbacks": fallbacks, "prediction_mismatches": mismatches, "missing_tensors": missing}


_QUANTIZE_FALLBACK = re.compile(
    r"warning: (?P<tensor>\S+)\s+- ncols\s+(?P<ncols>\d+) not divisible by\s+(?P<block>\d+) "
    r"\(required for type\s+(?P<requested>\S+)\) (?:\(WARNING: must use F16 due to unusual shape\) )?"
    r"-> falling back to\s+(?P<actual>\S+)")


def quantize_log_fallbacks(log_text: str) -> list[dict]:
    """The shape fallbacks llama-quantize itself reported (covers tensors left to the base mix too)."""
    return [{"tensor": m["tensor"], "requested": m["requested"].lower(), "actual": m["actual"].lower(),
             "row_len": int(m["ncols"]), "block": int(m["block"])} for m in _QUANTIZE_FALLBACK.finditer(log_text)]


def summarize(written: Sequence[TensorInfo], file_bytes: int) -> dict:
    """Size, bits per weight and per-type counts of a written GGUF."""
    counts: dict[str, int] = {}
    params: dict[str, int] = {}
    for t in written:
        counts[t.type] = counts.get(t.type, 0) + 1
        params[t.type] = params.get(t.type, 0) + t.n_elements
    n_el = sum(t.n_elements for t in written)
    n_bytes = sum(t.n_bytes for t in written)
    body = [t for t in written if t.name not in TOKEN_EMBD_NAMES + OUTPUT_NAMES]
    body_el = sum(t.n_elements for t in body)
    return {"file_bytes": file_bytes, "size_gib": file_bytes / 2**30, "n_tensors": len(written),
            "n_params": n_el, "bits_per_weight": 8.0 * n_bytes / n_el if n_el else None,
            "bits_per_weight_file": 8.0 * file_bytes / n_el if n_el else None,
            "bits_per_weight_without_embed_output": (8.0 * sum(t.n_bytes for t in body) / body_el) if body_el else None,
            "type_counts": dict(sorted(counts.items())), "type_params": dict(sorted(params.items()))}


def import_gguf():
    try:
        import gguf
    except ImportError as err:
        raise PackError("gguf-py is not importable; run through pipelines/pack_gguf.sh (it puts the llama.cpp "
                        "tree's gguf-py on PYTHONPATH) or pip install gguf") from err
    return gguf
