"""A cache directory that is either complete and checksummed, or not used at all.

Built in a temp dir beside its final name, a manifest of per-file sha256 written last, then renamed into
place; every reuse re-checks the manifest. The embedded SmolLM2 conversion and the smoke's tiny MoE both
use it, so a half-written or corrupted entry is rebuilt, never trusted.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

import provenance

MANIFEST = "_manifest.json"


def verify_dir(entry: Path, format_version: int) -> str | None:
    """None if `entry` matches its manifest, else the reason it cannot be trusted."""
    path = entry / MANIFEST
    if not path.is_file():
        return f"no {MANIFEST} (build never finished)"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return f"unreadable manifest: {e}"
    if manifest.get("format_version") != format_version:
        return f"format version {manifest.get('format_version')} != {format_version}"
    for name, digest in manifest.get("files", {}).items():
        f = entry / name
        if not f.is_file():
            return f"missing file {name}"
        if provenance.sha256_file(f) != digest:
            return f"checksum mismatch in {name}"
    return None


def write_failure_hint(error: OSError) -> str:
    """The fix to print when a cache entry could not be written (a full disk or an unwritable cache root)."""
    if error.errno == errno.ENOSPC:
        return "free some disk space or set MOE_LOWBIT_CACHE to a larger disk"
    return "check that MOE_LOWBIT_CACHE is writable"


def build_dir(final: Path, build, format_version: int, extra: dict | None = None) -> Path:
    """Run `build(tmp_dir)`, checksum what it wrote, and atomically rename it to `final`.

    OSError (disk full, permissions) propagates for the caller to name the fix; nothing is left behind.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=final.parent))
    try:
        build(tmp)
        files = {p.name: provenance.sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = {"format_version": format_version, **(extra or {}), "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        for p in tmp.iterdir():
            p.chmod(0o644)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared read-only
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def cached_or_built(final: Path, build, format_version: int, extra: dict, what: str, log, error: type,
                    force: bool = False) -> Path:
    """`final` when its manifest still verifies, else rebuilt (`build(tmp_dir)`), saying which and why.
    A write failure is raised as `error` with the fix; nothing half-written is left."""
    if final.exists() and not force:
        problem = verify_dir(final, format_version)
        if problem is None:
            return final
        log(f"{what} at {final} is broken ({problem}); rebuilding it")
    log(f"building {what} in {final} (once)")
    try:
        return build_dir(final, build, format_version, extra)
    except OSError as e:
        raise error(f"could not write {what} under {final.parent}: {e}; fix: {write_failure_hint(e)}") from e
