"""Reading a UTF-8 text file so that bad bytes are named by file and line, not by a bare byte offset."""
from __future__ import annotations

from pathlib import Path


class TextDecodeError(ValueError):
    """Bytes that are not UTF-8; the message is "file:line: ..." (one line)."""


def read_utf8(path: str | Path) -> str:
    """The whole file as text. Invalid UTF-8 raises TextDecodeError naming the file, the line, the column
    and the byte, so a data or replay file with one broken line can be fixed without a hex dump."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise TextDecodeError(f"{path}:{line}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {column}: "
                              f"{err.reason})") from None


def utf8_lines(path: str | Path) -> list:
    """Lines split on "\\n" only (a JSON string may hold U+2028), without their newline."""
    text = read_utf8(path)
    lines = text.split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines
