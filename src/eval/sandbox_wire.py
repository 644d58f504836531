"""Plain data across a pipe between two sandboxed processes: built-in types only, exact types only.

The candidate's process answers calls with values encoded here, and the test process decodes them. Only
None, bool, int, float, str, bytes, list, tuple, dict and set cross, checked with `type(x) is ...`, so an
object whose __eq__ always says True, an int subclass or anything with behaviour of its own cannot reach
the test's comparisons: the decoder builds fresh built-in values from bytes. Anything else is a WireError
(a failed call). Decoding never runs code and never recurses deeper than MAX_DEPTH.

This file is also run inside the sandbox (the launcher execs its source), so it imports nothing but struct.
Frame: 4-byte big-endian length, then one encoded value.
"""
import struct

MAX_DEPTH = 100
MAX_FRAME = 64 << 20
_LEN = struct.Struct(">I")
_FLOAT = struct.Struct(">d")


class WireError(ValueError):
    """A value that cannot cross, or bytes that are not a value."""


def _encode(value, out: bytearray, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise WireError(f"nested deeper than {MAX_DEPTH}")
    kind = type(value)
    if value is None:
        out += b"N"
    elif kind is bool:
        out += b"T" if value else b"F"
    elif kind is int:
        raw = value.to_bytes((value.bit_length() + 8) // 8 or 1, "big", signed=True)
        out += b"I" + _LEN.pack(len(raw)) + raw
    elif kind is float:
        out += b"D" + _FLOAT.pack(value)
    elif kind is str:
        raw = value.encode("utf-8", "surrogatepass")
        out += b"S" + _LEN.pack(len(raw)) + raw
    elif kind is bytes:
        out += b"B" + _LEN.pack(len(value)) + value
    elif kind in (list, tuple, set):
        out += {list: b"L", tuple: b"U", set: b"E"}[kind] + _LEN.pack(len(value))
        for item in value:
            _encode(item, out, depth + 1)
    elif kind is dict:
        out += b"M" + _LEN.pack(len(value))
        for key, item in value.items():
            _encode(key, out, depth + 1)
            _encode(item, out, depth + 1)
    else:
        raise WireError(f"a {kind.__name__} cannot cross (built-in plain types only)")
    if len(out) > MAX_FRAME:
        raise WireError(f"value larger than {MAX_FRAME} bytes")


def encode(value) -> bytes:
    out = bytearray()
    try:
        _encode(value, out, 0)
    except RecursionError:
        raise WireError("nested too deeply") from None
    return bytes(out)


def _decode(data: bytes, pos: int, depth: int):
    if depth > MAX_DEPTH:
        raise WireError(f"nested deeper than {MAX_DEPTH}")
    if pos >= len(data):
        raise WireError("truncated value")
    tag = data[pos:pos + 1]
    pos += 1
    if tag == b"N":
        return None, pos
    if tag in (b"T", b"F"):
        return tag == b"T", pos
    if tag == b"D":
        if pos + 8 > len(data):
            raise WireError("truncated float")
        return _FLOAT.unpack_from(data, pos)[0], pos + 8
    if pos + 4 > len(data):
        raise WireError("truncated length")
    (n,) = _LEN.unpack_from(data, pos)
    pos += 4
    if tag in (b"I", b"S", b"B"):
        if pos + n > len(data):
            raise WireError("truncated payload")
        raw = data[pos:pos + n]
        if tag == b"I":
            return int.from_bytes(raw, "big", signed=True), pos + n
        if tag == b"B":
            return bytes(raw), pos + n
        try:
            return raw.decode("utf-8", "surrogatepass"), pos + n
        except UnicodeDecodeError:
            raise WireError("invalid string bytes") from None
    if n > len(data) - pos:  # every item takes at least one byte: a lying count cannot allocate
        raise WireError("count larger than the frame")
    if tag in (b"L", b"U", b"E"):
        items = []
        for _ in range(n):
            item, pos = _decode(data, pos, depth + 1)
            items.append(item)
        try:
            return ({b"L": list, b"U": tuple, b"E": set}[tag])(items), pos
        except TypeError:
            raise WireError("unhashable set member") from None
    if tag == b"M":
        out = {}
        for _ in range(n):
            key, pos = _decode(data, pos, depth + 1)
            item, pos = _decode(data, pos, depth + 1)
            try:
                out[key] = item
            except TypeError:
                raise WireError("unhashable dict key") from None
        return out, pos
    raise WireError(f"unknown tag {tag!r}")


def decode(data: bytes):
    value, end = _decode(bytes(data), 0, 0)
    if end != len(data):
        raise WireError("trailing bytes after the value")
    return value


def write_frame(fd: int, payload: bytes, write=None) -> None:
    write = write or __import__("posix").write
    view = memoryview(_LEN.pack(len(payload)) + payload)
    while view:
        view = view[write(fd, view):]


def read_exact(fd: int, n: int, read=None) -> bytes | None:
    """n bytes, or None at end of file before the first; WireError on a frame cut short."""
    read = read or __import__("posix").read
    chunks, got = [], 0
    while got < n:
        chunk = read(fd, min(n - got, 1 << 20))
        if not chunk:
            if got == 0:
                return None
            raise WireError("frame cut short")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def read_frame(fd: int, read=None) -> bytes | None:
    head = read_exact(fd, 4, read)
    if head is None:
        return None
    (n,) = _LEN.unpack(head)
    if n > MAX_FRAME:
        raise WireError(f"frame of {n} bytes is over the {MAX_FRAME} limit")
    body = read_exact(fd, n, read)
    if body is None and n:
        raise WireError("frame cut short")
    return body or b""
