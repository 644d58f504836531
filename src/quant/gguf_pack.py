"""The Python side of packing a GGUF with llama.cpp: recipe parsing and validation, the type each tensor
will get (with llama-quantize's shape fallbacks), and the meta JSON read back from the written file.

pipelines/pack_gguf.sh runs the llama.cpp tools; this module decides and checks, so that a typo in a
recipe, a missing imatrix or a dequantized input fails *before* an hour of conversion, and so that the
meta JSON says what the file really holds (types read back with gguf-py, not what we asked for).

The rules below mirror llama.cpp's src/llama-quant.cpp of the pinned version (configs/gguf.env):
  - a recipe rule `PATTERN=TYPE` is a regex searched in the lower-cased tensor name; the first match wins;
  - token_embd / output take --token-embedding-type / --output-tensor-type before any rule;
  - some tensors are never quantized (1-D, norms, expert router ffn_gate_inp, ssm_conv1d, ...): they keep
    the type of the BF16 GGUF (the router: ROUTER_TYPE via gguf_convert.py; SSM scalars F32);
  - a row length (ne[0]) not divisible by the type's block falls back (IQ3_XXS -> IQ4_NL, Q3_K -> Q4_0,
    ...), and to F16 when even the fallback does not divide it.
A test compares these predictions with what llama-quantize actually wrote, so a llama.cpp bump that
changes them is caught.

CLI (used by pack_gguf.sh; every subcommand has --help):
    python -m gguf_pack check-input MODEL_DIR [--force]
    python -m gguf_pack check-tokenizer MODEL_DIR          (and: bpe-view SRC DST, the fix it names)
    python -m gguf_pack converter-flags MODEL_DIR --mtp drop|keep --tree LLAMA_CPP_TREE
    python -m gguf_pack tensor-types --recipe R --gguf BF16.gguf --base-type IQ3_XXS --out types.txt [--imatrix F]
    python -m gguf_pack meta --gguf OUT.gguf --source BF16.gguf --recipe R --base-type T --commands C --out M.json
    python -m gguf_pack fresh FILE --value K=V --file K=PATH --checkpoint K=DIR   (0: reuse; 1: stale, removed)
    python -m gguf_pack record FILE --value K=V ...                              (after FILE is complete)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import atomic_io
import gguf_intermediates

PTQ_META = "_ptq_meta.json"  # written by quant_save.py into dequantized (fake-quant) checkpoints

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
    gguf = gguf_module or _import_gguf()
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
    gguf = gguf_module or _import_gguf()
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


# ------------------------------------------------------------------------------------------------ I/O
def _import_gguf():
    try:
        import gguf
    except ImportError as err:
        raise PackError("gguf-py is not importable; run through pipelines/pack_gguf.sh (it puts the llama.cpp "
                        "tree's gguf-py on PYTHONPATH) or pip install gguf") from err
    return gguf


def read_gguf_tensors(path: Path, gguf_module=None) -> list[TensorInfo]:
    gguf = gguf_module or _import_gguf()
    reader = gguf.GGUFReader(str(path))
    return [TensorInfo(t.name, t.tensor_type.name.lower(), tuple(int(x) for x in t.shape), int(t.n_elements),
                       int(t.n_bytes)) for t in reader.tensors]


def check_input(model_dir: Path, force: bool = False) -> str | None:
    """Refuse a dequantized PTQ checkpoint (quantizing it again stacks two roundings); None when fine."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise PackError(f"MODEL={model_dir} has no config.json; point MODEL at an HF checkpoint directory")
    if (model_dir / PTQ_META).is_file():
        msg = (f"MODEL={model_dir} is a dequantized PTQ checkpoint (it has {PTQ_META}): quantizing it to GGUF "
               "stacks a second rounding on the first. Point MODEL at the original BF16 checkpoint, or set "
               "FORCE=1 to pack it anyway")
        if not force:
            raise PackError(msg)
        return "FORCE=1: " + msg
    return None


def checkpoint_tensor_names(model_dir: Path) -> list[str]:
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return sorted(json.loads(index.read_text())["weight_map"])
    from safetensors import safe_open

    names = []
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            names += list(sf.keys())
    return sorted(names)


def has_mtp(model_dir: Path) -> bool:
    return any(n.startswith(("mtp.", "model.mtp.")) for n in checkpoint_tensor_names(model_dir))


def has_vision(model_dir: Path) -> bool:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return "vision_config" in config


_ASK_MTP = """
import sys
from pathlib import Path
from conversion import ModelBase, ModelType, get_model_architecture, get_model_class
cls = get_model_class(get_model_architecture(ModelBase.load_hparams(Path(sys.argv[1]), False), ModelType.TEXT))
print(int(bool(getattr(cls, "supports_mtp_export", False))))
"""


def converter_supports_mtp(model_dir: Path, tree: Path) -> bool:
    """Whether the converter class of this checkpoint's architecture takes --mtp / --no-mtp (it refuses
    them for others). Asked of the llama.cpp tree itself, so a version bump needs no table update, in a
    child process with the tree's own gguf-py first: in-process, a `gguf` already imported from
    site-packages (an older writer, without the tree's newer architectures) made the question fail."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(tree) / "gguf-py"), str(tree)])}
    proc = subprocess.run([sys.executable, "-c", _ASK_MTP, str(model_dir)], env=env, capture_output=True, text=True)
    if proc.returncode != 0:  # an unsupported architecture fails again, clearly, in the converter itself
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"gguf_pack: could not ask the converter about MTP ({last})", file=sys.stderr)
        return False
    return proc.stdout.strip().splitlines()[-1:] == ["1"]


def converter_flags(model_dir: Path, mtp: str, supports_mtp: bool) -> list[str]:
    """convert_hf_to_gguf flags for the MTP head: 'drop' (default: llama.cpp does not use it in the main
    model) or 'keep' (kept as nextn tensors; needs mtp.* tensors in the checkpoint)."""
    if mtp not in ("drop", "keep"):
        raise PackError(f"MTP must be drop or keep, got {mtp!r}")
    present = has_mtp(model_dir)
    if mtp == "keep" and not present:
        raise PackError(f"MTP=keep but {model_dir} has no mtp.* tensors; use MTP=drop")
    # Families with an MTP option need --no-mtp to drop it, and also when the head is absent (the
    # Qwen3.5/Next converter asserts otherwise); every other family refuses the flag.
    return ["--no-mtp"] if supports_mtp and mtp == "drop" else []


def tokenizer_conflict(model_dir: Path) -> str | None:
    """Why llama.cpp's converter would mistake this tokenizer.json for a SentencePiece vocab, or None.

    A byte-level BPE tokenizer (ByteLevel pre-tokenizer) that also sets `byte_fallback` and an SPM-style
    decoder (as transformers writes when it rebuilds a tokenizer from a GGUF) passes the converter's
    "Llama HF (SentencePiece-like)" test, so the GGUF gets an SPM vocab that llama.cpp cannot tokenize
    with (llama-imatrix aborts with `unordered_map::at`).
    """
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return None
    tok = json.loads(path.read_text(encoding="utf-8"))
    model, pre = tok.get("model") or {}, tok.get("pre_tokenizer") or {}
    pres = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    byte_level = any(p.get("type") == "ByteLevel" for p in pres if isinstance(p, dict))
    if model.get("type") == "BPE" and byte_level and model.get("byte_fallback"):
        return (f"{path}: a byte-level BPE tokenizer with byte_fallback=true and decoder "
                f"{(tok.get('decoder') or {}).get('type')!r}; llama.cpp's converter would write it as a "
                "SentencePiece vocab")
    return None


def byte_level_bpe_view(src: Path, dst: Path) -> Path:
    """A copy of checkpoint `src` (weights symlinked) whose tokenizer.json is plain byte-level BPE:
    byte_fallback off and a ByteLevel decoder. Encodings are unchanged (ByteLevel maps every byte to a
    token, so the fallback never fires); the converter then recognizes it as the BPE vocab it is."""
    src, dst = Path(src).resolve(), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        target = dst / f.name
        if f.name == "tokenizer.json" or target.exists() or target.is_symlink():
            continue
        target.symlink_to(f)
    tok = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    tok["model"]["byte_fallback"] = False
    tok["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    atomic_io.write_text(dst / "tokenizer.json", json.dumps(tok, ensure_ascii=False))
    return dst


def resolve_model(model: str, revision: str | None = None) -> Path:
    """A local checkpoint dir for MODEL: a directory, `embedded:NAME` (smollm2, smollm2-moe), or a hub repo
    id (downloaded)."""
    import embedded_model

    if embedded_model.is_embedded(model):
        try:
            ckpt = embedded_model.resolve(model, log=lambda m: print(m, file=sys.stderr))
        except embedded_model.EmbeddedModelError as e:
            raise PackError(f"MODEL={model!r}: {e}") from e
        if tokenizer_conflict(ckpt):  # transformers' GGUF->tokenizers rebuild; see tokenizer_conflict
            return byte_level_bpe_view(ckpt, ckpt.parent / (ckpt.name + "-bpe-view"))
        return ckpt
    if Path(model).is_dir():
        return Path(model)
    if model.startswith(("/", ".", "~")) or model.count("/") != 1:
        raise PackError(f"MODEL={model!r} is neither an existing directory nor a hub id like Qwen/Qwen3.5-122B-A10B")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model, revision=revision or None))


def calibration_text(dataset: str, n_chars: int) -> str:
    """Plain calibration text from a hub dataset given as name:config:split:field (config may be empty)."""
    parts = dataset.split(":")
    if len(parts) != 4 or not parts[0] or not parts[2] or not parts[3]:
        raise PackError(f"CALIB_DATASET={dataset!r} must be name:config:split:field, "
                        "e.g. Salesforce/wikitext:wikitext-2-raw-v1:train:text (or set CALIB_FILE)")
    name, config, split, field = parts
    from datasets import load_dataset

    rows = load_dataset(name, config or None, split=split, streaming=True)
    out, total = [], 0
    for row in rows:
        text = str(row.get(field) or "")
        if text.strip():
            out.append(text)
            total += len(text)
        if total >= n_chars:
            break
    if total < n_chars // 4:
        raise PackError(f"{dataset}: only {total} characters of text in field {field!r}; need ~{n_chars}")
    return "\n".join(out)


def read_commands(path: Path | None) -> list[dict]:
    if path is None or not Path(path).is_file():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def build_meta(out_gguf: Path, source_gguf: Path, recipe_path: Path, base_type: str, commands_file: Path | None,
               imatrix: Path | None, mmproj: Path | None, quantize_log: Path | None = None,
               extra: Mapping | None = None, argv=None) -> dict:
    """The meta JSON of a packed GGUF: what it holds (read back), what was asked, how it was made."""
    import provenance

    gguf = _import_gguf()
    known = ggml_types(gguf)
    recipe_text = Path(recipe_path).read_text()
    rules = parse_recipe(recipe_text, known, known_tensor_names(gguf), str(recipe_path))
    source = read_gguf_tensors(source_gguf, gguf)
    written = read_gguf_tensors(out_gguf, gguf)
    plan = plan_types(source, rules, known)
    meta = {
        "gguf": str(out_gguf),
        "sha256": provenance.sha256_file(Path(out_gguf)),
        "base_type": base_type,
        **summarize(written, Path(out_gguf).stat().st_size),
        **compare(plan, written),
        "llama_quantize_fallbacks": (quantize_log_fallbacks(Path(quantize_log).read_text(errors="replace"))
                                     if quantize_log and Path(quantize_log).is_file() else None),
        "unused_rules": [asdict(r) for r in unused_rules(rules, plan)],
        "recipe": {"path": str(recipe_path), "sha256": provenance.sha256_json(recipe_text),
                   "text": recipe_text, "rules": [asdict(r) for r in rules]},
        "source_gguf": {"path": str(source_gguf), "n_tensors": len(source),
                        "file_bytes": Path(source_gguf).stat().st_size},
        "imatrix": ({"path": str(imatrix), "sha256": provenance.sha256_file(Path(imatrix))}
                    if imatrix and Path(imatrix).is_file() else None),
        "mmproj": ({"path": str(mmproj), "file_bytes": Path(mmproj).stat().st_size,
                    **{k: v for k, v in summarize(read_gguf_tensors(mmproj, gguf), Path(mmproj).stat().st_size).items()
                       if k in ("type_counts", "n_params")}}
                   if mmproj and Path(mmproj).is_file() else None),
        "commands": read_commands(commands_file),
        "versions": {"gguf_py": getattr(gguf, "__file__", None),
                     "llama_cpp": os.environ.get("LLAMA_CPP_VERSION"),
                     "llama_cpp_build": os.environ.get("LLAMA_CPP_BUILD_INFO")},
        "tensors": [{"name": t.name, "type": t.type, "shape": list(t.shape)} for t in written],
    }
    meta["provenance"] = provenance.record(argv=argv, **(dict(extra) if extra else {}))
    return meta


# ------------------------------------------------------------- intermediate keys (gguf_intermediates.py)
def _key_from_args(args) -> dict:
    def pairs(items, what):
        out = {}
        for item in items or ():
            name, sep, value = item.partition("=")
            if not sep or not name:
                raise PackError(f"--{what} {item!r} must look like NAME=VALUE")
            out[name] = value
        return out

    return gguf_intermediates.intermediate_key(pairs(args.value, "value"), pairs(args.file, "file"),
                                               pairs(args.checkpoint, "checkpoint"))


def _cmd_fresh(args) -> int:
    """Exit 0 when TARGET may be reused; else say why on stderr, remove the stale file, exit 1."""
    why = gguf_intermediates.stale_reason(Path(args.target), _key_from_args(args))
    if why is None:
        return 0
    print(f"gguf_pack: rebuilding: {why}", file=sys.stderr)
    for p in (Path(args.target), Path(args.target + gguf_intermediates.KEY_SUFFIX)):
        p.unlink(missing_ok=True)
    return 1


def _cmd_record(args) -> int:
    if not Path(args.target).is_file():
        raise PackError(f"cannot record inputs of {args.target}: it does not exist")
    gguf_intermediates.record_key(Path(args.target), _key_from_args(args))
    return 0


# ------------------------------------------------------------------------------------------------ CLI
def _cmd_check_input(args) -> int:
    note = check_input(Path(args.model), force=args.force)
    if note:
        print(f"gguf_pack: WARNING {note}", file=sys.stderr)
    return 0


def _cmd_converter_flags(args) -> int:
    supports = converter_supports_mtp(Path(args.model), Path(args.tree)) if args.tree else False
    print(" ".join(converter_flags(Path(args.model), args.mtp, supports)))
    return 0


def _cmd_tensor_types(args) -> int:
    gguf = _import_gguf()
    known = ggml_types(gguf)
    rules = parse_recipe(Path(args.recipe).read_text(), known, known_tensor_names(gguf), args.recipe)
    plan = plan_types(read_gguf_tensors(Path(args.gguf), gguf), rules, known)
    needs = tensors_needing_imatrix(plan, args.base_type)
    if needs and not (args.imatrix and Path(args.imatrix).is_file()):
        names = ", ".join(f"{p.name} ({p.expected or args.base_type.lower()})" for p in needs[:4])
        raise PackError(f"{len(needs)} tensor(s) get a type that requires an importance matrix, e.g. {names}; "
                        f"imatrix {args.imatrix!r} does not exist. Compute one (CALIB_FILE=..., the imatrix step "
                        "of pack_gguf.sh) or pick types that do not need it (e.g. the Q3_K recipe)")
    for r in unused_rules(rules, plan):
        print(f"gguf_pack: note: {args.recipe}:{r.line} {r.pattern}={r.type} applies to no tensor of this model",
              file=sys.stderr)
    for p in plan:
        if p.fallback_reason:
            print(f"gguf_pack: fallback {p.name}: {p.fallback_reason}", file=sys.stderr)
    atomic_io.write_text(args.out, render_tensor_type_file(rules))
    return 0


def _cmd_check_tokenizer(args) -> int:
    why = tokenizer_conflict(Path(args.model))
    if why:
        raise PackError(f"{why}. Fix the checkpoint's tokenizer.json (byte_fallback false, ByteLevel decoder), "
                        f"e.g. python -m gguf_pack bpe-view {args.model} DIR and pack DIR")
    return 0


def _cmd_bpe_view(args) -> int:
    print(byte_level_bpe_view(Path(args.src), Path(args.dst)))
    return 0


def _cmd_resolve_model(args) -> int:
    print(resolve_model(args.model, args.revision))
    return 0


def _cmd_calib_text(args) -> int:
    # ~4 characters per token, 25% spare so llama-imatrix gets its chunks * ctx tokens
    text = calibration_text(args.dataset, int(args.chunks * args.ctx * 4 * 1.25))
    atomic_io.write_text(args.out, text)
    print(f"gguf_pack: {len(text)} characters of calibration text from {args.dataset} -> {args.out}", file=sys.stderr)
    return 0


def _cmd_log_command(args) -> int:
    """Append one command record (JSONL) for the meta JSON; the command line is redacted."""
    import provenance

    cmd = [provenance.redact(a) for a in args.command if a != "--"]
    rec = {"cmd": cmd, "rc": args.rc, "seconds": args.seconds, "status": args.status,
           "end_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with open(args.file, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")
    return 0


def _cmd_meta(args) -> int:
    meta = build_meta(Path(args.gguf), Path(args.source), Path(args.recipe), args.base_type,
                      Path(args.commands) if args.commands else None,
                      Path(args.imatrix) if args.imatrix else None, Path(args.mmproj) if args.mmproj else None,
                      Path(args.quantize_log) if args.quantize_log else None, argv=sys.argv)
    import provenance

    text = provenance.redact(json.dumps(meta, indent=1, default=str))
    atomic_io.write_text(args.out, text + "\n")
    n_fb = len({f["tensor"] for f in meta["fallbacks"] + (meta["llama_quantize_fallbacks"] or [])})
    print(f"gguf_pack: {args.gguf}: {meta['size_gib']:.3f} GiB, {meta['bits_per_weight']:.3f} bpw, "
          f"types {meta['type_counts']}, {n_fb} tensor(s) fell back", file=sys.stderr)
    if meta["prediction_mismatches"]:
        print(f"gguf_pack: WARNING {len(meta['prediction_mismatches'])} tensor(s) differ from the predicted type: "
              f"{meta['prediction_mismatches'][:3]}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gguf_pack", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("check-input", help="refuse a dequantized PTQ checkpoint unless --force")
    s.add_argument("model")
    s.add_argument("--force", action="store_true")
    s.set_defaults(func=_cmd_check_input)
    s = sub.add_parser("check-tokenizer", help="refuse a tokenizer.json the converter would misread")
    s.add_argument("model")
    s.set_defaults(func=_cmd_check_tokenizer)
    s = sub.add_parser("bpe-view", help="copy of a checkpoint (weights symlinked) with a plain byte-level BPE tokenizer.json")
    s.add_argument("src")
    s.add_argument("dst")
    s.set_defaults(func=_cmd_bpe_view)
    s = sub.add_parser("converter-flags", help="print convert_hf_to_gguf flags for this checkpoint")
    s.add_argument("model")
    s.add_argument("--mtp", default="drop", help="drop (default) or keep the MTP head")
    s.add_argument("--tree", default=None, help="the llama.cpp tree whose converter will run")
    s.set_defaults(func=_cmd_converter_flags)
    s = sub.add_parser("tensor-types", help="validate a recipe against a source GGUF, write the stripped rule file")
    s.add_argument("--recipe", required=True)
    s.add_argument("--gguf", required=True, help="the BF16 source GGUF")
    s.add_argument("--base-type", required=True, help="llama-quantize type argument, e.g. IQ3_XXS")
    s.add_argument("--imatrix", default=None)
    s.add_argument("--out", required=True)
    s.set_defaults(func=_cmd_tensor_types)
    s = sub.add_parser("resolve-model", help="print a local checkpoint dir for MODEL (dir, hub id, embedded:NAME)")
    s.add_argument("model")
    s.add_argument("--revision", default=None)
    s.set_defaults(func=_cmd_resolve_model)
    s = sub.add_parser("calib-text", help="write calibration text from a hub dataset name:config:split:field")
    s.add_argument("--dataset", required=True)
    s.add_argument("--chunks", type=int, required=True)
    s.add_argument("--ctx", type=int, required=True)
    s.add_argument("--out", required=True)
    s.set_defaults(func=_cmd_calib_text)
    s = sub.add_parser("log-command", help="append a command record to a JSONL file")
    s.add_argument("--file", required=True)
    s.add_argument("--rc", type=int, required=True)
    s.add_argument("--seconds", type=float, required=True)
    s.add_argument("--status", default="ran", help="ran | reused")
    s.add_argument("command", nargs=argparse.REMAINDER)
    s.set_defaults(func=_cmd_log_command)
    for name, func, text in (("fresh", _cmd_fresh, "exit 0 if TARGET was made from these inputs, else remove it, exit 1"),
                             ("record", _cmd_record, "record the inputs TARGET was made from (TARGET.inputs.json)")):
        s = sub.add_parser(name, help=text)
        s.add_argument("target")
        s.add_argument("--value", action="append", metavar="NAME=VALUE", help="a setting the step depends on")
        s.add_argument("--file", action="append", metavar="NAME=PATH", help="an input file, by content")
        s.add_argument("--checkpoint", action="append", metavar="NAME=DIR", help="a checkpoint, by identity")
        s.set_defaults(func=func)
    s = sub.add_parser("meta", help="read a written GGUF back and write its meta JSON")
    for name in ("--gguf", "--source", "--recipe", "--base-type", "--out"):
        s.add_argument(name, required=True)
    s.add_argument("--commands", default=None, help="JSONL of the commands run (pack_gguf.sh writes it)")
    s.add_argument("--imatrix", default=None)
    s.add_argument("--mmproj", default=None)
    s.add_argument("--quantize-log", default=None, help="llama-quantize's output, for the fallbacks it reported")
    s.set_defaults(func=_cmd_meta)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (RecipeError, PackError, gguf_intermediates.StaleInputError) as err:
        print(f"gguf_pack: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
