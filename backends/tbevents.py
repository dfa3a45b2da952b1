"""TensorBoard event files (``events.out.tfevents.*``) read without TensorFlow or protobuf.

An event file is a sequence of TFRecords::

    uint64 length (little-endian)
    uint32 masked CRC-32C of the 8 length bytes
    byte   data[length]            (a serialized ``tensorflow.Event``)
    uint32 masked CRC-32C of data

:class:`TFEventsParser` is fed the file's bytes in whatever chunks they arrive
(a record may be split anywhere; the partial record waits for the next chunk,
so a file that is still being written can be followed by feeding what was
appended) and returns the scalar :class:`~backends.metrics.Point` s of the
records that chunk completed. It decodes, with a small hand-written protobuf
wire-format reader, only what scalars need::

    Event:        wall_time = 1 (double), step = 2 (int64), summary = 5 (Summary)
    Summary:      value = 1 (repeated Value)
    Value:        tag = 1 (string), simple_value = 2 (float),
                  tensor = 8 (TensorProto), metadata = 9 (plugin_data = 1 → plugin_name = 1)
    TensorProto:  dtype = 1, tensor_shape = 2 (dim = 2 → size = 1), tensor_content = 4,
                  float_val = 5, double_val = 6, int_val = 7, int64_val = 10, half_val = 13

That covers ``tf.summary.scalar`` (TF2 writes a rank-0 tensor with plugin
"scalars"), TF1's summaries and PyTorch's / tensorboardX's ``add_scalar``
(``simple_value``). Everything else (file_version, graphs, histograms, images,
text, audio, PR curves, …) is skipped by its wire type without being decoded; a
tensor value counts as a scalar only when it is numeric, holds exactly one
element, and its tag's plugin (from this value's metadata or an earlier one of
the same tag) is "scalars" or unknown.

Never raises on bad input. Counted in ``warnings`` (by kind):

* "record header CRC mismatch": the length cannot be trusted; the parser scans
  forward for the next position whose 12 header bytes carry a valid CRC (of a
  length up to ``max_record``) and resumes there (one count per
  resynchronisation; the bytes passed over are added to ``skipped_bytes``);
* "record CRC mismatch": the (CRC-checked) length is right but the data is
  not: that record is skipped;
* "record too long (skipped)": a length over ``max_record`` (16 MiB): the
  record is passed over as it streams in, never buffered;
* "truncated record": :meth:`flush` found a partial record at the end;
* "invalid event": a record whose protobuf is malformed (no points from it);
* "invalid metric name" (empty tag or over 256 characters), "invalid UTF-8"
  (the tag is decoded with replacement characters), "invalid tensor"
  (a scalar tensor whose values do not fit its dtype), "invalid time"
  (a non-finite wall time: the point gets ``t=None``, as it does when the
  event has no wall time, or 0.0, proto3's default);
* counted but KEPT, as in :mod:`backends.metrics`: "non-finite value".

Series are keyed by (TensorBoard run, tag), as TensorBoard keys them: the run is the event
file's directory relative to the run's TensorBoard base directory (:func:`event_base`, the
shallowest directory holding an event file when they are first found; :func:`event_run`), so
``add_scalars("pair", {"train": …, "val": …})``, which writes tag "pair" into the
subdirectories ``pair/train/`` and ``pair/val/``, gives two series, "pair/train/pair" and
"pair/val/pair" (:func:`series_name`), never one that mixes them. Files in the base
directory keep their bare tags. Steps stay integers (int64, exactly: 2**53 + 1 and
2**63 − 1 are not rounded through a float).

Also :data:`EVENT_FILE_GLOB`, :func:`remote_find_command` (a POSIX shell command
listing a run directory's event files) and :func:`parse_find_output`.

Stdlib only.
"""

from __future__ import annotations

import math
import posixpath
import re
import shlex
import struct
from collections import Counter
from dataclasses import dataclass

from .metrics import MAX_NAME_LEN, Point

__all__ = [
    "TFEventsParser", "EVENT_FILE_GLOB", "remote_find_command", "parse_find_output",
    "crc32c", "masked_crc32c", "series_name", "event_base", "event_run", "TBMedia",
]

#: The file names TensorFlow, PyTorch and tensorboardX give event files.
EVENT_FILE_GLOB = "events.out.tfevents.*"
_EVENT_FILE_PREFIX = "events.out.tfevents."

_isfinite = math.isfinite
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_HEADER = struct.Struct("<QI")
_F32 = struct.Struct("<f")
_F64 = struct.Struct("<d")
_ZERO4 = b"\x00\x00\x00\x00"
_NONZERO = re.compile(rb"[^\x00]").search
_MASK64 = (1 << 64) - 1


# ---- CRC-32C (Castagnoli), as TFRecord uses it --------------------------------------------
def _make_table() -> tuple[int, ...]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


_TABLE = _make_table()


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC-32C (Castagnoli, reflected polynomial 0x82F63B78) of ``data``, continuing from ``crc``."""
    t = _TABLE
    crc ^= 0xFFFFFFFF
    for b in data:
        crc = t[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes | bytearray | memoryview) -> int:
    """TensorFlow's masked CRC-32C: ``((crc >> 15) | (crc << 17)) + 0xa282ead8`` mod 2**32."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# ---- protobuf wire format ----------------------------------------------------------------
class _Malformed(Exception):
    pass


def _varint(b: bytes, i: int) -> tuple[int, int]:
    """The varint at ``b[i]`` (as an unsigned 64-bit value) and the index after it."""
    x = b[i]
    i += 1
    if x < 0x80:
        return x, i
    x &= 0x7F
    shift = 7
    while True:
        c = b[i]
        i += 1
        x |= (c & 0x7F) << shift
        if c < 0x80:
            return x & _MASK64, i
        shift += 7
        if shift >= 70:
            raise _Malformed("varint too long")


def _skip(b: bytes, i: int, wt: int, end: int | None = None) -> int:
    """The index after a field of wire type ``wt`` whose value starts at ``b[i]``
    (_Malformed if it passes ``end``, by default the end of ``b``)."""
    if wt == 0:
        _, i = _varint(b, i)
    elif wt == 2:
        n, i = _varint(b, i)
        i += n
    elif wt == 1:
        i += 8
    elif wt == 5:
        i += 4
    else:  # groups (3/4) are not used by these messages; 6/7 do not exist
        raise _Malformed(f"wire type {wt}")
    if i > (len(b) if end is None else end):
        raise _Malformed("field past the end")
    return i


def _key(b: bytes, i: int) -> tuple[int, int]:
    k = b[i]
    if k < 0x80:
        return k, i + 1
    return _varint(b, i)


def _bytes_field(b: bytes, i: int) -> tuple[int, int]:
    """(start, end) of the length-delimited value at ``b[i]``."""
    n, i = _varint(b, i)
    j = i + n
    if j > len(b):
        raise _Malformed("field past the end")
    return i, j


def _packed_varints(b: bytes, i: int, j: int) -> list[int]:
    out = []
    while i < j:
        v, i = _varint(b, i)
        out.append(v)
    if i != j:
        raise _Malformed("packed varints overrun")
    return out


def _signed(v: int, bits: int) -> int:
    """An unsigned varint value as a two's-complement integer of ``bits`` bits."""
    v &= (1 << bits) - 1
    return v - (1 << bits) if v >> (bits - 1) else v


# TensorFlow DataType numbers
_DT_FLOAT, _DT_DOUBLE, _DT_INT32, _DT_UINT8, _DT_INT16, _DT_INT8 = 1, 2, 3, 4, 5, 6
_DT_INT64, _DT_BOOL, _DT_BFLOAT16, _DT_UINT16, _DT_HALF, _DT_UINT32, _DT_UINT64 = 9, 10, 14, 17, 19, 22, 23
#: tensor_content layouts of the numeric dtypes
_CONTENT = {
    _DT_FLOAT: struct.Struct("<f"), _DT_DOUBLE: struct.Struct("<d"), _DT_INT32: struct.Struct("<i"),
    _DT_UINT8: struct.Struct("<B"), _DT_INT16: struct.Struct("<h"), _DT_INT8: struct.Struct("<b"),
    _DT_INT64: struct.Struct("<q"), _DT_BOOL: struct.Struct("<?"), _DT_UINT16: struct.Struct("<H"),
    _DT_HALF: struct.Struct("<e"), _DT_UINT32: struct.Struct("<I"), _DT_UINT64: struct.Struct("<Q"),
    _DT_BFLOAT16: struct.Struct("<H"),  # bit pattern: the upper half of a float32
}
#: the TensorProto field holding each numeric dtype's values: float_val 5, double_val 6,
#: int_val 7, int64_val 10, bool_val 11, half_val 13 (bit patterns), uint32_val 16, uint64_val 17
_VAL_FIELD = {
    _DT_FLOAT: 5, _DT_DOUBLE: 6, _DT_INT32: 7, _DT_UINT8: 7, _DT_INT16: 7, _DT_INT8: 7, _DT_UINT16: 7,
    _DT_INT64: 10, _DT_BOOL: 11, _DT_HALF: 13, _DT_BFLOAT16: 13, _DT_UINT32: 16, _DT_UINT64: 17,
}
_VAL_FIELDS = frozenset(_VAL_FIELD.values())


def _bf16(bits: int) -> float:
    return _F32.unpack(_U32.pack((bits & 0xFFFF) << 16))[0]


def _half(bits: int) -> float:
    return struct.unpack("<e", struct.pack("<H", bits & 0xFFFF))[0]


def _tensor_scalar(b: bytes) -> float | None:
    """The value of a one-element numeric TensorProto; None for anything else.

    Raises _Malformed (and the like) for a broken message or values that do not fit the dtype."""
    n = len(b)
    i = 0
    dtype = 0
    numel = 1
    content = None
    vals: list = []  # (field number, value) of the *_val fields, in order
    while i < n:
        k, i = _key(b, i)
        f = k >> 3
        wt = k & 7
        if k == 0x08:
            dtype, i = _varint(b, i)
        elif k == 0x12:  # tensor_shape
            s, e = _bytes_field(b, i)
            i = e
            numel = _numel(b[s:e])
        elif k == 0x22:  # tensor_content
            s, e = _bytes_field(b, i)
            i = e
            content = b[s:e]
        elif f in _VAL_FIELDS and wt == 2:  # packed
            s, e = _bytes_field(b, i)
            i = e
            if f == 5:
                if (e - s) % 4:
                    raise _Malformed("packed floats")
                vals += [(5, v) for v in struct.unpack_from(f"<{(e - s) // 4}f", b, s)]
            elif f == 6:
                if (e - s) % 8:
                    raise _Malformed("packed doubles")
                vals += [(6, v) for v in struct.unpack_from(f"<{(e - s) // 8}d", b, s)]
            else:
                vals += [(f, v) for v in _packed_varints(b, s, e)]
        elif k == 0x2D:  # float_val, unpacked
            if i + 4 > n:
                raise _Malformed("float past the end")
            vals.append((5, _F32.unpack_from(b, i)[0]))
            i += 4
        elif k == 0x31:  # double_val, unpacked
            if i + 8 > n:
                raise _Malformed("double past the end")
            vals.append((6, _F64.unpack_from(b, i)[0]))
            i += 8
        elif wt == 0 and f in _VAL_FIELDS and f > 6:
            v, i = _varint(b, i)
            vals.append((f, v))
        else:
            i = _skip(b, i, wt)
    if numel != 1 or dtype not in _CONTENT:
        return None
    if content:
        st = _CONTENT[dtype]
        if len(content) != st.size:
            raise _Malformed("tensor_content size")
        v = st.unpack(content)[0]
        return _bf16(v) if dtype == _DT_BFLOAT16 else float(v)
    want = _VAL_FIELD[dtype]
    mine = [v for fn, v in vals if fn == want]
    if not mine:
        if vals:  # values, but in another dtype's field
            raise _Malformed("tensor values do not match the dtype")
        return 0.0  # as TensorFlow's MakeNdarray: no values means zeros
    if len(mine) > 1:
        raise _Malformed("too many values for one element")
    v = mine[0]
    if want == 7:
        return float(_signed(v, 32))
    if want == 10:
        return float(_signed(v, 64))
    if want == 13:
        return _half(v) if dtype == _DT_HALF else _bf16(v)
    if want == 11:
        return 1.0 if v else 0.0
    return float(v)


def _dims(b: bytes) -> list[int] | None:
    """The dim sizes of a TensorShapeProto (None when its rank is unknown)."""
    n = len(b)
    i = 0
    dims: list[int] = []
    while i < n:
        k, i = _key(b, i)
        if k == 0x12:  # dim
            s, e = _bytes_field(b, i)
            i = e
            size = 0  # proto3 default
            j = s
            while j < e:
                dk, j = _key(b, j)
                if dk == 0x08:
                    size, j = _varint(b, j)
                    size = _signed(size, 64)
                else:
                    j = _skip(b, j, dk & 7)
            if j != e:
                raise _Malformed("dim overrun")
            dims.append(size)
        elif k == 0x18:  # unknown_rank
            v, i = _varint(b, i)
            if v:
                return None
        else:
            i = _skip(b, i, k & 7)
    return dims


def _numel(b: bytes) -> int:
    """The element count of a TensorShapeProto (-1 when unknown)."""
    dims = _dims(b)
    if dims is None:
        return -1
    numel = 1
    for size in dims:
        if size < 0:
            return -1
        numel = min(numel * size, 1 << 64)
    return numel


def _plugin_name(b: bytes) -> str:
    """SummaryMetadata.plugin_data.plugin_name ("" when absent)."""
    name = ""
    n = len(b)
    i = 0
    while i < n:
        k, i = _key(b, i)
        if k == 0x0A:  # plugin_data
            s, e = _bytes_field(b, i)
            i = e
            j = s
            while j < e:
                pk, j = _key(b, j)
                if pk == 0x0A:
                    ps, pe = _bytes_field(b, j)
                    j = pe
                    if pe > e:
                        raise _Malformed("plugin name overrun")
                    name = b[ps:pe].decode("utf-8", "replace")
                else:
                    j = _skip(b, j, pk & 7)
            if j != e:
                raise _Malformed("plugin data overrun")
        else:
            i = _skip(b, i, k & 7)
    return name


# ---- media: images, histograms, text --------------------------------------------------------
MAX_HISTOGRAM_BUCKETS = 100_000  # as backends.media.histogram_doc: more are never drawn, so never kept
@dataclass(slots=True)
class TBMedia:
    """An image (``data``: {"png"/"encoded": bytes, "w", "h", "channels"}), a histogram ({"edges",
    "counts", "n", "min", "max", "sum"}, TensorBoard's buckets: ``edges`` has one more item than
    ``counts``) or a text ({"text": str}) read from an event file."""

    name: str
    step: int
    kind: str
    data: dict
    t: float | None = None

    @property
    def size(self) -> int:
        d = self.data
        if self.kind == "image":
            return len(d["encoded"]) + 64
        if self.kind == "text":
            return len(d["text"]) + 64
        return 64 * len(d["counts"]) + 64  # two lists of Python floats: ~64 bytes a bucket


def _image_proto(b: bytes) -> dict:
    """Summary.Image: height = 1, width = 2, colorspace = 3, encoded_image_string = 4."""
    out = {"h": 0, "w": 0, "channels": 0, "encoded": b""}
    n = len(b)
    i = 0
    while i < n:
        k, i = _key(b, i)
        if k in (0x08, 0x10, 0x18):
            v, i = _varint(b, i)
            out[{0x08: "h", 0x10: "w", 0x18: "channels"}[k]] = _signed(v, 32)
        elif k == 0x22:
            s, i = _bytes_field(b, i)
            out["encoded"] = bytes(b[s:i])
        else:
            i = _skip(b, i, k & 7)
    return out


def _doubles(b: bytes, i: int, k: int, into: list) -> int:
    if k & 7 == 2:  # packed
        s, e = _bytes_field(b, i)
        if (e - s) % 8:
            raise _Malformed("packed doubles")
        into += struct.unpack_from(f"<{(e - s) // 8}d", b, s)
        return e
    if i + 8 > len(b):
        raise _Malformed("double past the end")
    into.append(_F64.unpack_from(b, i)[0])
    return i + 8


def _histo_proto(b: bytes) -> dict:
    """HistogramProto: min = 1, max = 2, num = 3, sum = 4, sum_squares = 5, bucket_limit = 6,
    bucket = 7. TensorBoard's bucket i holds (limit[i-1], limit[i]]; the first starts at min."""
    vals = {1: 0.0, 2: 0.0, 3: 0.0, 4: 0.0, 5: 0.0}
    limits: list[float] = []
    counts: list[float] = []
    n = len(b)
    i = 0
    while i < n:
        k, i = _key(b, i)
        f = k >> 3
        if f in vals and k & 7 == 1:
            if i + 8 > n:
                raise _Malformed("double past the end")
            vals[f] = _F64.unpack_from(b, i)[0]
            i += 8
        elif f == 6 and k & 7 in (1, 2):
            i = _doubles(b, i, k, limits)
        elif f == 7 and k & 7 in (1, 2):
            i = _doubles(b, i, k, counts)
        else:
            i = _skip(b, i, k & 7)
    if len(limits) != len(counts):
        raise _Malformed("histogram limits and buckets differ in number")
    lo, hi = vals[1], vals[2]
    edges = [lo] + [x if _isfinite(x) else hi for x in limits]  # as written (the last is often DBL_MAX)
    return {"edges": edges, "counts": counts, "n": vals[3], "min": lo, "max": hi, "sum": vals[4]}


def _tensor_fields(b: bytes) -> tuple[int, list[int], bytes | None, list[bytes], list[float]]:
    """(dtype, dims, tensor_content, string_val, double_val) of a TensorProto."""
    n = len(b)
    i = 0
    dtype = 0
    dims: list[int] = []
    content = None
    strings: list[bytes] = []
    doubles: list[float] = []
    while i < n:
        k, i = _key(b, i)
        if k == 0x08:
            dtype, i = _varint(b, i)
        elif k == 0x12:  # tensor_shape
            s, i = _bytes_field(b, i)
            dims = _dims(b[s:i]) or []
        elif k == 0x22:
            s, i = _bytes_field(b, i)
            content = bytes(b[s:i])
        elif k == 0x42:
            s, i = _bytes_field(b, i)
            strings.append(bytes(b[s:i]))
        elif k >> 3 == 6 and k & 7 in (1, 2):
            i = _doubles(b, i, k, doubles)
        else:
            i = _skip(b, i, k & 7)
    return dtype, dims, content, strings, doubles


def _images_tensor(b: bytes) -> dict | None:
    """TF2's image summary: a DT_STRING tensor [width, height, encoded image, …]; the first image."""
    dtype, _, _, strings, _ = _tensor_fields(b)
    if dtype != 7 or len(strings) < 3:
        return None
    try:
        w, h = int(strings[0]), int(strings[1])
    except ValueError:
        w = h = 0
    return {"w": w, "h": h, "channels": 0, "encoded": strings[2]}


def _histograms_tensor(b: bytes) -> dict | None:
    """TF2's histogram summary: a DT_DOUBLE (or DT_FLOAT) k×3 tensor of (left, right, count)."""
    dtype, dims, content, _, doubles = _tensor_fields(b)
    if dtype not in (_DT_DOUBLE, _DT_FLOAT) or len(dims) != 2 or dims[1] != 3:
        return None
    if content:
        fmt = "d" if dtype == _DT_DOUBLE else "f"
        if len(content) % struct.calcsize(fmt):
            raise _Malformed("tensor_content size")
        vals = list(struct.unpack(f"<{len(content) // struct.calcsize(fmt)}{fmt}", content))
    else:
        vals = doubles
    if len(vals) != dims[0] * 3:
        raise _Malformed("histogram tensor size")
    rows = [vals[i:i + 3] for i in range(0, len(vals), 3)]
    if not rows:
        return {"edges": [], "counts": [], "n": 0.0, "min": 0.0, "max": 0.0, "sum": 0.0}
    edges = [rows[0][0]] + [r[1] for r in rows]
    counts = [r[2] for r in rows]
    return {"edges": edges, "counts": counts, "n": sum(counts), "min": rows[0][0], "max": rows[-1][1], "sum": 0.0}


def _string_tensor(b: bytes) -> dict | None:
    """The text of a DT_STRING TensorProto (string_val = 8; several are joined by newlines)."""
    dtype, _, _, strings, _ = _tensor_fields(b)
    if dtype != 7:
        return None
    return {"text": "\n".join(x.decode("utf-8", "replace") for x in strings)}


#: the TF2 summary plugins whose tensors are media: plugin -> (media kind, reader of the TensorProto)
_TENSOR_MEDIA = {"text": ("text", _string_tensor), "images": ("image", _images_tensor),
                 "histograms": ("histogram", _histograms_tensor)}


# ---- the parser --------------------------------------------------------------------------
class TFEventsParser:
    """Scalar points from one TensorBoard event file, fed in byte chunks (see the module docstring).

    ``feed(data)`` returns the points of the records ``data`` completed;
    ``flush()`` (once the file is complete) counts a partial last record.
    ``records``: valid records read; ``bytes``: bytes fed (the offset to resume
    a remote read from); ``skipped_bytes``: bytes passed over while resynchronising
    or skipping records; ``file_version``: the file's "brain.Event:N" when seen.
    """

    _MAX_TAGS = 50_000  # remembered decoded tags / tag plugins (beyond: decoded each time)

    def __init__(self, *, max_record: int = 16 << 20, run: str = "", media: bool = False,
                 max_media: int = 5000, max_media_bytes: int = 256 << 20) -> None:
        self.max_record = max_record
        #: with ``media=True``: the images, histograms and text of the file (:class:`TBMedia`), oldest
        #: first, at most ``max_media`` items and ``max_media_bytes`` bytes (past that the oldest go)
        self.media: list[TBMedia] | None = [] if media else None
        self.media_bytes = 0
        self.max_media = max_media
        self.max_media_bytes = max_media_bytes
        self.run = run  # the TensorBoard "run" (subdirectory) of this file: "" for the base directory
        self.warnings: Counter = Counter()
        self.records = 0
        self.bytes = 0
        self.skipped_bytes = 0
        self.file_version: str | None = None
        self._buf = bytearray()
        self._skip = 0  # bytes still to pass over of a record too long to keep
        self._resync = False  # scanning for the next valid header
        self._hcrc: dict[int, int] = {}  # length → masked CRC of its 8 bytes
        self._scan_crc: dict[int, int] = {}  # the same, for the candidates of a resynchronisation
        self._tags: dict[bytes, str | None] = {}  # tag bytes → name (None: invalid)
        self._plugins: dict[bytes, str] = {}  # tag bytes → plugin name from its metadata

    # -- framing
    def feed(self, data: bytes | bytearray | memoryview) -> list[Point]:
        out: list[Point] = []
        n = len(data)
        if not n:
            return out
        self.bytes += n
        if self._skip:
            if n <= self._skip:
                self._skip -= n
                self.skipped_bytes += n
                return out
            data = memoryview(data)[self._skip:]
            self.skipped_bytes += self._skip
            self._skip = 0
        buf = self._buf
        buf += data
        end = len(buf)
        pos = 0
        hcrc = self._hcrc
        unpack_header = _HEADER.unpack_from
        unpack_u32 = _U32.unpack_from
        while True:
            if self._resync:
                pos = self._scan(buf, pos, end)
                if self._resync:
                    break
            if end - pos < 12:
                break
            length, crc = unpack_header(buf, pos)
            want = hcrc.get(length)
            if want is None:
                want = masked_crc32c(buf[pos:pos + 8])
                if len(hcrc) < 4096:
                    hcrc[length] = want
            if crc != want:
                self.warnings["record header CRC mismatch"] += 1
                self._resync = True
                self.skipped_bytes += 1
                pos += 1
                continue
            if length > self.max_record:
                self.warnings["record too long (skipped)"] += 1
                total = 16 + length
                have = end - pos
                if have >= total:
                    pos += total
                    self.skipped_bytes += total
                    continue
                self._skip = total - have
                self.skipped_bytes += have
                pos = end
                break
            stop = pos + 12 + length
            if stop + 4 > end:
                break
            rec = bytes(buf[pos + 12:stop])
            crc = unpack_u32(buf, stop)[0]
            if crc != masked_crc32c(rec):
                self.warnings["record CRC mismatch"] += 1
                self.skipped_bytes += stop + 4 - pos
                pos = stop + 4
                continue
            pos = stop + 4
            self.records += 1
            self._event(rec, out)
        if pos:
            del buf[:pos]
        return out

    def flush(self) -> list[Point]:
        """End of the file: a partial record left over is counted ("truncated record")."""
        if self._skip or (self._buf and not self._resync):
            self.warnings["truncated record"] += 1
        self.skipped_bytes += len(self._buf)
        self._buf.clear()
        self._skip = 0
        self._resync = False
        return []

    def _scan(self, buf: bytearray, pos: int, end: int) -> int:
        """The next position ≥ ``pos`` whose 12 bytes are a valid header of a record of at most
        ``max_record`` bytes (and ``_resync`` cleared), or where to continue scanning once more
        bytes arrive.

        Such a length is under 2**32, so the header's bytes 4..7 are zero: candidates are found
        with ``bytearray.find`` and only those are checked."""
        start = pos
        find = buf.find
        seen = self._scan_crc  # candidates repeat in regular data (arrays of small numbers, say)
        limit = self.max_record
        while True:
            j = find(_ZERO4, pos + 4)
            if j < 0:
                pos = max(pos, end - 11)
                break
            i = j - 4
            if i + 12 > end:
                pos = i
                break
            length = _U64.unpack_from(buf, i)[0]
            if length > limit:
                want = -1
            else:
                want = seen.get(length)
                if want is None:
                    if len(seen) >= 65536:
                        seen.clear()
                    want = seen[length] = masked_crc32c(buf[i:i + 8])
            if _U32.unpack_from(buf, i + 8)[0] == want:
                self._resync = False
                pos = i
                break
            # Inside a run of zeros (a zero-filled tail after a crash, say) no header can start
            # while 12 zero bytes follow: the masked CRC of a zero length is not zero.
            m = _NONZERO(buf, j + 4)
            pos = max(i + 1, (m.start() if m else end) - 11)
        self.skipped_bytes += pos - start
        return pos

    # -- protobuf
    def _event(self, rec: bytes, out: list[Point]) -> None:
        try:
            pts = self._decode_event(rec)
        except (_Malformed, IndexError, ValueError, struct.error, OverflowError, UnicodeError):
            self.warnings["invalid event"] += 1
            return
        if pts:
            out += pts

    def _decode_event(self, b: bytes) -> list[Point] | None:
        n = len(b)
        i = 0
        wall = None
        step = 0
        summaries = None
        while i < n:
            k = b[i]
            if k < 0x80:
                i += 1
            else:
                k, i = _varint(b, i)
            if k == 0x09:  # wall_time
                if i + 8 > n:
                    raise _Malformed("double past the end")
                wall = _F64.unpack_from(b, i)[0]
                i += 8
            elif k == 0x10:  # step
                step = b[i]
                if step < 0x80:
                    i += 1
                else:
                    step, i = _varint(b, i)
            elif k == 0x2A:  # summary
                s, i = _bytes_field(b, i)
                if summaries is None:
                    summaries = [(s, i)]
                else:
                    summaries.append((s, i))
            elif k == 0x1A:  # file_version
                s, i = _bytes_field(b, i)
                self.file_version = b[s:i].decode("utf-8", "replace")
            else:
                i = _skip(b, i, k & 7, n)
        if i != n:
            raise _Malformed("event overrun")
        if summaries is None:
            return None
        if step >> 63:
            step -= 1 << 64
        if wall is not None and not (_isfinite(wall) and wall):
            if wall:
                self.warnings["invalid time"] += 1
            wall = None  # 0.0 is proto3's "not set"
        pts: list[Point] = []
        for i, end in summaries:  # Summary: value = 1 (repeated)
            while i < end:
                k = b[i]
                if k < 0x80:
                    i += 1
                else:
                    k, i = _varint(b, i)
                if k == 0x0A:
                    ln = b[i]
                    if ln < 0x80:
                        i += 1
                    else:
                        ln, i = _varint(b, i)
                    s = i
                    i += ln
                    if i > end:
                        raise _Malformed("value past the end")
                    self._decode_value(b, s, i, step, wall, pts)
                else:
                    i = _skip(b, i, k & 7, end)
            if i != end:
                raise _Malformed("summary overrun")
        return pts

    def _decode_value(self, b: bytes, i: int, end: int, step: int, wall: float | None,
                      pts: list[Point]) -> None:
        tag = b""
        simple = None
        tensor = None
        plugin = None
        other = None  # (key, start, end) of an image or histogram, when media are collected
        while i < end:
            k = b[i]
            if k < 0x80:
                i += 1
            else:
                k, i = _varint(b, i)
            if k == 0x15:  # simple_value
                if i + 4 > end:
                    raise _Malformed("float past the end")
                simple = _F32.unpack_from(b, i)[0]
                tensor = None  # a oneof: the last one wins
                i += 4
                continue
            if k & 7 != 2:
                i = _skip(b, i, k & 7, end)
                continue
            ln = b[i]
            if ln < 0x80:
                i += 1
            else:
                ln, i = _varint(b, i)
            s = i
            i += ln
            if i > end:
                raise _Malformed("field past the end")
            if k == 0x0A:  # tag
                tag = b[s:i]
            elif k == 0x42:  # tensor
                tensor = (s, i)
                simple = None
            elif k == 0x4A:  # metadata
                plugin = _plugin_name(b[s:i])
            elif k in (0x1A, 0x22, 0x2A, 0x32):  # histogram, image, histo, audio (the oneof value)
                simple = tensor = None
                if self.media is not None and k in (0x22, 0x2A):
                    other = (k, s, i)
        if i != end:
            raise _Malformed("value overrun")
        if plugin is not None and tag:
            plugins = self._plugins
            if plugins.get(tag) != plugin and (tag in plugins or len(plugins) < self._MAX_TAGS):
                plugins[tag] = plugin
        if self.media is not None:
            if other is not None:
                self._media_value(tag, step, wall, other[0], b[other[1]:other[2]])
                return
            if tensor is not None:
                kind = plugin or self._plugins.get(tag) or ""
                if kind in _TENSOR_MEDIA:
                    self._media_value(tag, step, wall, kind, b[tensor[0]:tensor[1]])
                    return
        if simple is not None:
            value = simple
        elif tensor is not None:
            if plugin is None:
                plugin = self._plugins.get(tag)
            if plugin and plugin != "scalars":
                return
            try:
                v = _tensor_scalar(b[tensor[0]:tensor[1]])
            except (_Malformed, IndexError, ValueError, struct.error, OverflowError):
                self.warnings["invalid tensor"] += 1
                return
            if v is None:
                return
            value = v
        else:
            return
        name = self._tags.get(tag)
        if name is None:
            name = self._name(tag)
            if name is None:
                return
        if not _isfinite(value):
            self.warnings["non-finite value"] += 1
        pts.append(Point(name, step, value, wall))

    def _media_value(self, tag: bytes, step: int, wall: float | None, k: int | str, body: bytes) -> None:
        """Collect an image (Value.image), a histogram (Value.histo), or a tensor of a plugin of
        :data:`_TENSOR_MEDIA` (``k`` is then the plugin's name)."""
        name = self._tags.get(tag) or self._name(tag)
        if name is None:
            return
        try:
            if k == 0x22:
                item = TBMedia(name, step, "image", _image_proto(body), wall)
            elif k == 0x2A:
                item = TBMedia(name, step, "histogram", _histo_proto(body), wall)
            else:
                kind, read = _TENSOR_MEDIA[k]
                doc = read(body)
                if doc is None:
                    return
                item = TBMedia(name, step, kind, doc, wall)
        except (_Malformed, IndexError, ValueError, struct.error, OverflowError):
            self.warnings["invalid media"] += 1
            return
        media = self.media
        assert media is not None
        size = item.size
        if size > self.max_media_bytes or (item.kind == "histogram" and len(item.data["counts"]) > MAX_HISTOGRAM_BUCKETS):
            self.warnings["media item too large (skipped)"] += 1
            return
        media.append(item)
        self.media_bytes += size
        while self.media_bytes > self.max_media_bytes or len(media) > self.max_media:
            old = media.pop(0)  # the oldest go first: a bound, and said in the warnings
            self.media_bytes -= old.size
            self.warnings["media dropped (over the cap)"] += 1

    def _name(self, tag: bytes) -> str | None:
        """The metric name of a tag not yet in ``_tags`` (or an invalid one: None, counted)."""
        tags = self._tags
        if tag in tags:  # known invalid
            self.warnings["invalid metric name"] += 1
            return None
        try:
            name = tag.decode()
        except UnicodeDecodeError:
            self.warnings["invalid UTF-8"] += 1
            name = tag.decode("utf-8", "replace")
        if name and self.run:
            name = series_name(self.run, name)
        if not name or len(name) > MAX_NAME_LEN:
            self.warnings["invalid metric name"] += 1
            name = None
        if len(tags) < self._MAX_TAGS:
            tags[tag] = name
        return name


# ---- TensorBoard runs ---------------------------------------------------------------------
def series_name(run: str, tag: str) -> str:
    """The metric name of ``tag`` in TensorBoard run ``run``: the bare tag for the base run
    ("" or "."), else ``run/tag`` (what TensorBoard shows as the run and the chart's tag)."""
    return tag if run in ("", ".") else f"{run}/{tag}"


def _dirname(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else "."


def event_base(paths: list[str]) -> str | None:
    """The TensorBoard base directory of a run's event files: the shallowest directory holding
    one (the first in sorted order among equals); None when there are none. Chosen once, when
    event files are first found, so names do not change as more files appear."""
    dirs = sorted({_dirname(p) for p in paths}, key=lambda d: (d.rstrip("/").count("/"), d))
    return dirs[0] if dirs else None


def event_run(path: str, base: str | None) -> str:
    """The TensorBoard run of the event file ``path`` relative to ``base`` (see :func:`event_base`):
    "" for a file in ``base`` itself, else the relative directory ("pair/train"; "../other"
    for a directory outside ``base``, kept apart rather than merged)."""
    d = _dirname(path)
    if base is None or d == base:
        return ""
    if d.startswith(base.rstrip("/") + "/"):
        return d[len(base.rstrip("/")) + 1:]
    return posixpath.relpath(d, base)


# ---- finding event files on an instance --------------------------------------------------
def remote_find_command(run_dir: str, *, limit: int = 100) -> str:
    """A POSIX shell command printing the paths of the non-empty event files under
    ``run_dir`` (recursively; ``add_scalars`` writes into subdirectories), one a line,
    sorted, at most ``limit``. Prints nothing (and exits 0) when there are none or the
    directory does not exist. A leading ``~/`` is expanded by the remote shell."""
    if run_dir == "~" or run_dir.startswith("~/"):
        rest = run_dir[2:]
        d = '"$HOME"' + ("/" + shlex.quote(rest) if rest else "")
    else:
        if run_dir.startswith("-"):
            run_dir = "./" + run_dir  # not an option to find
        d = shlex.quote(run_dir or ".")
    limit = max(1, int(limit))
    return (f"find {d} -type f -name {shlex.quote(EVENT_FILE_GLOB)} -size +0 2>/dev/null"
            f" | LC_ALL=C sort | head -n {limit}")


def parse_find_output(text: str) -> list[str]:
    """The event file paths in the output of :func:`remote_find_command` (in order, no
    duplicates; lines that are not event file paths, e.g. a login banner, are left out)."""
    out: list[str] = []
    seen: set[str] = set()
    for line in text.splitlines():
        p = line.rstrip("\r")
        if not p.strip():
            continue
        base = p.rsplit("/", 1)[-1]
        if not base.startswith(_EVENT_FILE_PREFIX) or len(base) == len(_EVENT_FILE_PREFIX):
            continue
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out
