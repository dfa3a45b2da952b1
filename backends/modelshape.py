"""What a served model takes as input, read from its saved file without loading it.

``labdeck serve`` prints a curl line for the model; its body must have the model's real input
width (the bundled example's logistic regression takes 16 features). The width is read from the
file's bytes: for ``.npz`` (numpy's zip of ``.npy`` arrays, what the example saves and the built-in
``NpzLogistic`` loader serves: ``x @ w``), the ``w`` member's ``.npy`` header, which is a Python
literal parsed with :func:`ast.literal_eval` (no pickle, nothing imported, nothing run). A pickled
or torch model is not opened: unpickling runs code its author chose, and the file may be a
teammate's. Reads are bounded (a few small ranged reads, whatever the file's size).
"""

from __future__ import annotations

import ast
import json
import struct
import zlib
from typing import Awaitable, Callable

Reader = Callable[[int, int], Awaitable[bytes]]  # (offset, max bytes) -> the bytes there
MAX_MEMBERS = 32
MAX_NPY_HEADER = 1 << 16
WEIGHTS = "w.npy"  # labdeck_serve.NpzLogistic: x @ w + b, so w's first axis is the input width


def npy_shape(head: bytes) -> tuple[int, ...] | None:
    """The shape in a ``.npy`` header (format 1.0, 2.0 or 3.0), or None if ``head`` is not one."""
    if head[:6] != b"\x93NUMPY" or len(head) < 10:
        return None
    major = head[6]
    if major == 1:
        (n,), start = struct.unpack("<H", head[8:10]), 10
    elif major in (2, 3) and len(head) >= 12:
        (n,), start = struct.unpack("<I", head[8:12]), 12
    else:
        return None
    if n > MAX_NPY_HEADER or len(head) < start + n:
        return None
    try:
        meta = ast.literal_eval(head[start:start + n].decode("latin-1").strip())
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    shape = meta.get("shape") if isinstance(meta, dict) else None
    if not isinstance(shape, tuple) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        return None
    return shape


async def npz_member_head(read: Reader, member: str) -> bytes | None:
    """The first bytes (up to a .npy header's worth) of ``member`` in a zip file, walking the local
    file headers from the start (numpy writes sizes there); stored or deflated members."""
    offset = 0
    for _ in range(MAX_MEMBERS):
        head = await read(offset, 30)
        if len(head) < 30 or head[:4] != b"PK\x03\x04":
            return None
        flags, method = struct.unpack("<HH", head[6:10])
        size = struct.unpack("<I", head[18:22])[0]
        nlen, xlen = struct.unpack("<HH", head[26:30])
        rest = await read(offset + 30, nlen + xlen)
        if len(rest) < nlen + xlen:
            return None
        name = rest[:nlen].decode("utf-8", "replace")
        extra = rest[nlen:]
        while size == 0xFFFFFFFF and len(extra) >= 4:  # zip64: the sizes are in the extra field
            tag, ln = struct.unpack("<HH", extra[:4])
            if tag == 1 and ln >= 16:
                size = struct.unpack("<Q", extra[12:20])[0]  # (uncompressed, compressed)
                break
            extra = extra[4 + ln:]
        data_at = offset + 30 + nlen + xlen
        if name == member:
            want = MAX_NPY_HEADER + 16
            if method == 0:
                return await read(data_at, want)
            if method == 8:
                try:
                    return zlib.decompressobj(-15).decompress(await read(data_at, want), want)
                except zlib.error:
                    return None
            return None
        if flags & 0x08 or size == 0xFFFFFFFF:  # sizes only after the data: cannot skip without reading it
            return None
        offset = data_at + size
    return None


async def input_width(model: str, read: Reader) -> int | None:
    """The number of input features the model at path ``model`` takes, or None when it cannot be read
    without running the model's own code (or the file is not what its name says)."""
    if not model.endswith(".npz"):
        return None
    head = await npz_member_head(read, WEIGHTS)
    shape = npy_shape(head or b"")
    if not shape or len(shape) > 2 or not 0 < shape[0] <= 1_000_000:
        return None
    return shape[0]


def example_body(width: int | None) -> str | None:
    """A JSON body of one all-zero row of ``width`` features (None: the width is unknown)."""
    if not width:
        return None
    return json.dumps({"x": [[0.0] * width]})
