"""The one way this project writes a file that a reader may see half-done: write a unique temp file in the
same directory, fsync it, rename it over the target, fsync the directory.

A reader (a resumed build, a rerun eval, RESULTS.md) then sees either the old file or the whole new one,
never a torn one, even after a SIGKILL or a power cut. The temp name is unique per process and call, so
two writers of the same path never clobber each other's temp file; a failed write leaves nothing behind.

    atomic_io.write_json(path, obj)                 # JSON, sorted keys, trailing newline
    atomic_io.write_text(path, text)
    atomic_io.write_bytes(path, data)
    with atomic_io.writing(path) as f: ...          # stream into it (binary); renamed on success only
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # some filesystems do not open directories; the rename itself is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def writing(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open a temp file beside `path`; on a clean exit fsync it and rename it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with writing(path, "wb") as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    with writing(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_json(path: str | os.PathLike, obj, indent: int | None = 2, sort_keys: bool = True) -> None:
    """JSON with a trailing newline; non-JSON values (Paths, numpy scalars) are written with str()."""
    write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, default=str, ensure_ascii=False) + "\n")
