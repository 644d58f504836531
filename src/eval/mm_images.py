"""Images of multimodal samples: decode what a dataset row holds, hash it, and turn a sample's messages
into what each engine reads.

A multimodal `Sample` keeps its messages engine-neutral and free of pixels: an image part is
``{"type": "image", "image_sha256": HEX}`` (so the prompt hash covers the image bytes, and nothing in a
results file embeds them). The bytes ride along in ``sample.meta["image_data"]`` (never written; the
grading pool gets a copy without them) and their provenance (sha256, size, format) in
``sample.meta["images"]``. An image that cannot be read does not stop the run: the sample carries
``meta["input_error"]`` and is scored wrong with that reason.
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import re
from pathlib import Path

IMAGE_PART = "image"


class ImageError(ValueError):
    """An image that cannot be used; the message names the row's field and what is wrong."""


def image_bytes(value, field: str, base_dir: str | None) -> bytes:
    """Raw encoded bytes of one image cell, whatever the row holds: a PIL image (hub rows, decoded by
    `datasets`), {"bytes": ..., "path": ...} (parquet exports; bytes may be base64 text), or a path
    (relative to the data file's folder)."""
    if value is None:
        raise ImageError(f"{field}: no image in this row")
    if hasattr(value, "save") and hasattr(value, "size"):  # PIL.Image: re-encode losslessly, deterministically
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return buf.getvalue()
    if isinstance(value, dict):
        raw = value.get("bytes")
        if raw:
            return base64.b64decode(raw, validate=False) if isinstance(raw, str) else bytes(raw)
        value = value.get("path")
        if not value:
            raise ImageError(f"{field}: image object has neither bytes nor path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        path = Path(value)
        if not path.is_absolute() and base_dir:
            path = Path(base_dir) / path
        if not path.is_file():
            raise ImageError(f"{field}: image file {path} does not exist")
        return path.read_bytes()
    raise ImageError(f"{field}: unsupported image value of type {type(value).__name__}")


def describe(data: bytes, field: str) -> dict:
    """Provenance of one image (sha256, bytes, format, size); raises ImageError if PIL cannot decode it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # verify() misses truncated pixel data; a full decode does not
            fmt, (w, h) = im.format, im.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        # PIL's message names the BytesIO object by its memory address: dropped, so the reason is the same in
        # every run (a resumed run's JSONL equals an uninterrupted one's) and names the bytes instead
        detail = re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", str(err))[:120]
        raise ImageError(f"{field}: not a decodable image ({type(err).__name__}: {detail}; {len(data)} bytes, "
                         f"sha256 {hashlib.sha256(data).hexdigest()[:16]})") from None
    return {"field": field, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
            "format": fmt, "width": w, "height": h}


def load_images(cells: list, base_dir: str | None) -> tuple[list, list, str | None]:
    """(provenance list, bytes list, first error or None) of a row's (field, value) image cells."""
    infos, blobs, errors = [], [], []
    for field, value in cells:
        try:
            data = image_bytes(value, field, base_dir)
            infos.append(describe(data, field))
            blobs.append(data)
        except ImageError as err:
            errors.append(str(err))
            infos.append({"field": field, "sha256": None, "error": str(err)})
    return infos, blobs, ("; ".join(errors) if errors else None)


def user_content(segments: list) -> tuple:
    """One user message from [("text", str) | ("image", sha256)] in display order."""
    parts = []
    for kind, value in segments:
        if kind == "text":
            if value:
                parts.append({"type": "text", "text": value})
        else:
            parts.append({"type": IMAGE_PART, "image_sha256": value})
    return ({"role": "user", "content": parts},)


def has_images(sample) -> bool:
    return bool(sample.meta.get("images")) if isinstance(sample.meta, dict) else False


def without_pixels(sample):
    """The sample without its image bytes (what the grading pool pickles; graders never look at pixels)."""
    if not isinstance(sample.meta, dict) or "image_data" not in sample.meta:
        return sample
    return dataclasses.replace(sample, meta={k: v for k, v in sample.meta.items() if k != "image_data"})


def _by_sha(sample) -> dict:
    infos, blobs = sample.meta.get("images") or [], sample.meta.get("image_data") or ()
    ok = [i for i in infos if i.get("sha256")]
    return {info["sha256"]: (info, blob) for info, blob in zip(ok, blobs)}


def openai_messages(sample) -> list:
    """Messages for an OpenAI-compatible server or vLLM's chat API: each image part becomes an
    ``image_url`` with a base64 data URI (how llama-server --mmproj and `vllm serve` take images)."""
    table = _by_sha(sample)
    out = []
    for msg in sample.messages:
        content = msg.get("content")
        if not isinstance(content, list):
            out.append(dict(msg))
            continue
        parts = []
        for part in content:
            if part.get("type") == IMAGE_PART:
                info, blob = table[part["image_sha256"]]
                mime = f"image/{(info.get('format') or 'png').lower()}"
                url = f"data:{mime};base64,{base64.b64encode(blob).decode('ascii')}"
                parts.append({"type": "image_url", "image_url": {"url": url}})
            else:
                parts.append(dict(part))
        out.append({**msg, "content": parts})
    return out


def hf_messages(sample) -> tuple[list, list]:
    """(messages for processor.apply_chat_template with bare {"type": "image"} parts, PIL images in the
    same order): the family's chat template decides where its image tokens go."""
    from PIL import Image

    table = _by_sha(sample)
    msgs, images = [], []
    for msg in sample.messages:
        content = msg.get("content")
        if not isinstance(content, list):
            msgs.append(dict(msg))
            continue
        parts = []
        for part in content:
            if part.get("type") == IMAGE_PART:
                _info, blob = table[part["image_sha256"]]
                images.append(Image.open(io.BytesIO(blob)).convert("RGB"))
                parts.append({"type": "image"})
            else:
                parts.append(dict(part))
        msgs.append({**msg, "content": parts})
    return msgs, images
