"""The checkpoint side of a GGUF pack: is this input packable (not a dequantized PTQ build, a tokenizer the
converter reads right), which converter flags it needs (the MTP head), where it lives (a dir, a hub id,
an embedded model), and the calibration text for the imatrix. Each check fails with the fix in its message.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import atomic_io
import ptq_meta
from gguf_types import PackError

PTQ_META = ptq_meta.META_NAME  # written by quant_save.py into dequantized (fake-quant) checkpoints


def check_input(model_dir: Path, force: bool = False) -> str | None:
    """Refuse a dequantized PTQ checkpoint (quantizing it again stacks two roundings); None when fine."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise PackError(f"GGUF_MODEL={model_dir} has no config.json; point --model at an HF checkpoint directory")
    if ptq_meta.has_meta(model_dir):
        msg = (f"GGUF_MODEL={model_dir} is a dequantized PTQ checkpoint (it has {PTQ_META}): quantizing it to GGUF "
               "stacks a second rounding on the first. Point --model at the original BF16 checkpoint, or set "
               "GGUF_FORCE=1 (--force) to pack it anyway")
        if not force:
            raise PackError(msg)
        return "GGUF_FORCE=1: " + msg
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
    import model_ref

    try:
        kind = model_ref.parse(model, revision, what="MODEL").kind
        ckpt = model_ref.resolve(model, revision, what="MODEL", log=lambda m: print(m, file=sys.stderr),
                                 require_config=False)
    except model_ref.ModelRefError as e:
        raise PackError(str(e)) from None
    if kind == "embedded" and tokenizer_conflict(ckpt):  # transformers' GGUF->tokenizers rebuild
        return byte_level_bpe_view(ckpt, ckpt.parent / (ckpt.name + "-bpe-view"))
    return ckpt


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
