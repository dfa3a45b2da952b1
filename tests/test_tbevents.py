"""backends.tbevents: TensorBoard event files (TFRecord framing, CRC-32C, Event protobufs) without TensorFlow.

The real producer is the test of truth: files written by tensorboardX (the code PyTorch's
``torch.utils.tensorboard`` derives from) must come back point for point. Those tests are
skipped when tensorboardX is not installed; the rest build the bytes by hand with the tiny
protobuf encoder below.
"""

from __future__ import annotations

import math
import os
import random
import struct
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backends.metrics import Point
from backends.tbevents import (EVENT_FILE_GLOB, TFEventsParser, crc32c, masked_crc32c, parse_find_output,
                               remote_find_command)

try:
    import numpy as np
    import tensorboardX
    from tensorboardX import SummaryWriter
    from tensorboardX.proto import summary_pb2, tensor_pb2, tensor_shape_pb2
except ImportError:  # pragma: no cover - depends on the environment
    tensorboardX = None

needs_tbx = pytest.mark.skipif(tensorboardX is None,
                               reason="tensorboardX is not installed (pip install tensorboardX): "
                                      "the real-producer tests need it")


# ---- a tiny protobuf encoder and TFRecord framer -----------------------------------------
def varint(v: int) -> bytes:
    v &= (1 << 64) - 1  # negative int64/int32: ten bytes, two's complement
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def key(field: int, wt: int) -> bytes:
    return varint(field << 3 | wt)


def f_varint(field: int, v: int) -> bytes:
    return key(field, 0) + varint(v)


def f_bytes(field: int, data: bytes | str) -> bytes:
    if isinstance(data, str):
        data = data.encode()
    return key(field, 2) + varint(len(data)) + data


def f_double(field: int, v: float) -> bytes:
    return key(field, 1) + struct.pack("<d", v)


def f_float(field: int, v: float) -> bytes:
    return key(field, 5) + struct.pack("<f", v)


def event(step: int | None, values: list[bytes], wall: float | None = 1714550000.25) -> bytes:
    """An Event with a Summary of these (encoded) Values."""
    out = b""
    if wall is not None:
        out += f_double(1, wall)
    if step is not None:
        out += f_varint(2, step)
    summary = b"".join(f_bytes(1, v) for v in values)
    return out + f_bytes(5, summary)


def simple(tag: str, v: float) -> bytes:
    return f_bytes(1, tag) + f_float(2, v)


def metadata(plugin: str) -> bytes:
    return f_bytes(9, f_bytes(1, f_bytes(1, plugin)))


def shape(*dims: int) -> bytes:
    return f_bytes(2, b"".join(f_bytes(2, f_varint(1, d)) for d in dims))


def tensor_value(tag: str, tensor: bytes, plugin: str | None = "scalars") -> bytes:
    return f_bytes(1, tag) + f_bytes(8, tensor) + (metadata(plugin) if plugin is not None else b"")


def record(data: bytes) -> bytes:
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))


FILE_VERSION = f_double(1, 1714550000.0) + f_bytes(3, "brain.Event:2")


def sample_file() -> tuple[bytes, list[tuple]]:
    """A small event file of assorted records, and the points it holds."""
    recs = [
        FILE_VERSION,
        event(0, [simple("loss", 0.5), simple("acc", 0.25)]),
        event(1, [simple("loss", 0.375)], wall=1714550001.5),
        # a histogram (Value.histo = 5) and an image (Value.image = 4): ignored
        event(1, [f_bytes(1, "w") + f_bytes(5, f_double(1, -1.0) + f_double(2, 1.0)),
                  f_bytes(1, "img") + f_bytes(4, f_varint(1, 2) + f_bytes(4, b"\x89PNG..."))]),
        # a TF2 tensor scalar (float_val, packed)
        event(2, [tensor_value("lr", f_varint(1, 1) + shape() + f_bytes(5, struct.pack("<f", 0.125)))]),
        # a graph_def (Event field 4): ignored
        f_double(1, 1714550002.0) + f_bytes(4, b"\x0a\x03abc" * 20),
        event(300, [simple("loss", -2.0)]),
    ]
    data = b"".join(record(r) for r in recs)
    want = [("loss", 0.0, 0.5, 1714550000.25), ("acc", 0.0, 0.25, 1714550000.25),
            ("loss", 1.0, 0.375, 1714550001.5), ("lr", 2.0, 0.125, 1714550000.25),
            ("loss", 300.0, -2.0, 1714550000.25)]
    return data, want


def pkey(p: Point) -> tuple:
    return (p.name, p.step, p.value, p.t)


def comparable(points: list[tuple]) -> list[tuple]:
    """Points with NaN values made comparable (NaN != NaN)."""
    return [(n, s, repr(v), t) for n, s, v, t in points]


def parse(data: bytes, chunks: list[int] | None = None, **kw) -> tuple[list[tuple], TFEventsParser]:
    p = TFEventsParser(**kw)
    out: list[Point] = []
    if chunks is None:
        out += p.feed(data)
    else:
        prev = 0
        for c in chunks + [len(data)]:
            out += p.feed(data[prev:c])
            prev = max(prev, c)
    out += p.flush()
    for q in out:
        assert isinstance(q, Point) and type(q.step) is int and type(q.value) is float
    return [pkey(q) for q in out], p


# ---- CRC ---------------------------------------------------------------------------------
def test_crc32c_known_vectors() -> None:
    assert crc32c(b"") == 0
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E
    assert crc32c(b"56789", crc32c(b"1234")) == 0xE3069283  # continues
    crc = crc32c(b"123456789")
    assert masked_crc32c(b"123456789") == (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


@needs_tbx
def test_masked_crc_matches_tensorboardx() -> None:
    from tensorboardX.record_writer import masked_crc32c as tbx_masked
    rnd = random.Random(1)
    for n in list(range(20)) + [100, 1000]:
        data = bytes(rnd.randrange(256) for _ in range(n))
        assert masked_crc32c(data) == tbx_masked(data)


# ---- hand-built files --------------------------------------------------------------------
def test_sample_file_points() -> None:
    data, want = sample_file()
    got, p = parse(data)
    assert got == want
    assert not p.warnings
    assert p.records == 7
    assert p.file_version == "brain.Event:2"
    assert p.bytes == len(data)


def test_split_at_every_byte_position_gives_the_same_points() -> None:
    data, want = sample_file()
    for cut in range(len(data) + 1):
        got, p = parse(data, [cut])
        assert got == want, cut
        assert not p.warnings, cut
    got, p = parse(data, list(range(len(data))))  # one byte at a time
    assert got == want and not p.warnings


def test_a_corrupted_data_crc_is_counted_and_the_record_skipped() -> None:
    data, want = sample_file()
    r0 = len(record(FILE_VERSION))
    bad = bytearray(data)
    bad[r0 + 12 + 3] ^= 0x40  # inside the second record's data
    got, p = parse(bytes(bad))
    assert got == want[2:]  # the two points of that record are gone, nothing else
    assert p.warnings == {"record CRC mismatch": 1}
    bad = bytearray(data)
    bad[r0 + len(record(event(0, [simple("loss", 0.5), simple("acc", 0.25)]))) - 1] ^= 1  # its stored CRC
    got, p = parse(bytes(bad))
    assert got == want[2:] and p.warnings == {"record CRC mismatch": 1}


def test_a_corrupted_length_resynchronises_at_the_next_record() -> None:
    data, want = sample_file()
    r0 = len(record(FILE_VERSION))
    for off in (0, 3, 7, 8, 11):  # the length bytes and the header CRC of the second record
        bad = bytearray(data)
        bad[r0 + off] ^= 0x10
        for chunks in (None, [r0 + 5], list(range(0, len(data), 7))):
            got, p = parse(bytes(bad), chunks)
            assert got == want[2:], (off, chunks)
            assert p.warnings == {"record header CRC mismatch": 1}, (off, chunks)
            assert p.skipped_bytes == len(record(event(0, [simple("loss", 0.5), simple("acc", 0.25)])))


def test_any_single_byte_corruption_loses_only_the_record_it_hits() -> None:
    recs = [FILE_VERSION] + [event(i, [simple("loss", i / 8), simple("acc", 1 - i / 8)]) for i in range(6)]
    spans = []
    pos = 0
    for r in recs:
        n = len(record(r))
        spans.append((pos, pos + n))
        pos += n
    data = b"".join(record(r) for r in recs)
    good, _ = parse(data)
    per_rec = [[], *[[("loss", float(i), i / 8, 1714550000.25), ("acc", float(i), 1 - i / 8, 1714550000.25)]
                     for i in range(6)]]
    assert good == [q for pts in per_rec for q in pts]
    rnd = random.Random(7)
    for off in range(len(data)):
        bad = bytearray(data)
        bad[off] ^= rnd.randrange(1, 256)
        hit = next(k for k, (a, b) in enumerate(spans) if a <= off < b)
        want = [q for k, pts in enumerate(per_rec) if k != hit for q in pts]
        for chunks in (None, [off], [off + 1, off + 9]):
            got, p = parse(bytes(bad), chunks)
            assert got == want, (off, chunks)
            assert sum(p.warnings.values()) == 1, (off, p.warnings)


def test_truncated_file_counts_a_truncated_record() -> None:
    data, want = sample_file()
    got, p = parse(data[:-3])
    assert got == want[:-1]
    assert p.warnings == {"truncated record": 1}
    got, p = parse(data[:5])
    assert got == [] and p.warnings == {"truncated record": 1}


def test_absurd_lengths_are_skipped_without_buffering() -> None:
    data, want = sample_file()
    big = record(event(7, [simple("big", 1.0), f_bytes(1, "pad") + f_bytes(4, b"x" * 5000)]))
    whole = record(FILE_VERSION) + big + data
    for chunks in (None, [100], list(range(0, len(whole), 333))):
        got, p = parse(whole, chunks, max_record=1000)
        assert got == want, chunks
        assert p.warnings == {"record too long (skipped)": 1}
        assert len(p._buf) == 0
    # a valid header announcing 2**40 bytes: the rest of the file is passed over
    header = struct.pack("<Q", 1 << 40)
    huge = header + struct.pack("<I", masked_crc32c(header))
    got, p = parse(data + huge + b"\0" * 10_000)
    assert got == want
    assert p.warnings == {"record too long (skipped)": 1, "truncated record": 1}


def test_garbage_before_a_file_and_between_records() -> None:
    data, want = sample_file()
    noise = bytes(random.Random(3).randrange(256) for _ in range(3000)) + bytes(40)
    got, p = parse(noise + data)
    assert got == want and p.warnings == {"record header CRC mismatch": 1}
    r0 = len(record(FILE_VERSION))
    got, p = parse(data[:r0] + b"\0" * 50 + data[r0:], list(range(0, len(data) + 50, 5)))
    assert got == want and p.warnings == {"record header CRC mismatch": 1}
    assert p.skipped_bytes == 50


def test_empty_record_and_empty_event() -> None:
    got, p = parse(record(b"") + record(event(3, [simple("x", 1.0)], wall=None))
                   + record(event(4, [simple("x", 2.0)], wall=0.0)))
    assert got == [("x", 3.0, 1.0, None), ("x", 4.0, 2.0, None)]  # no wall time, or proto3's default 0.0
    assert not p.warnings and p.records == 3


def test_steps_values_and_times_edge_cases() -> None:
    recs = [
        event(-5, [simple("neg", 1.0)]),  # int64 step as a ten-byte varint
        event(2**62 + 1, [simple("big", 2.0)]),
        event(None, [simple("nostep", 3.0)]),  # proto3 default: 0
        event(1, [simple("inf", math.inf), simple("nan", math.nan)]),
        event(1, [simple("t", 4.0)], wall=math.inf),
        event(1, [simple("", 5.0), simple("x" * 300, 6.0), simple("", 7.0)]),
        event(1, [f_bytes(1, b"\xffbad") + f_float(2, 8.0)]),
        event(1, [f_float(2, 9.0) + f_bytes(1, "tag-after-value")]),  # any field order
        # a Summary in two pieces (a message field that occurs twice is merged)
        f_varint(2, 4) + f_bytes(5, f_bytes(1, simple("a", 1.0))) + f_bytes(5, f_bytes(1, simple("b", 2.0))),
        # unknown fields of every wire type are skipped
        f_varint(99, 1) + f_double(98, 1.0) + f_float(97, 1.0) + f_bytes(96, b"zz") + event(5, [
            f_varint(50, 3) + simple("u", 10.0) + f_bytes(51, b"q")]),
    ]
    got, p = parse(b"".join(record(r) for r in recs))
    t = 1714550000.25
    assert got[:3] == [("neg", -5.0, 1.0, t), ("big", 2**62 + 1, 2.0, t), ("nostep", 0.0, 3.0, t)]
    assert got[3][:3] == ("inf", 1.0, math.inf) and got[4][0] == "nan" and math.isnan(got[4][2])
    assert got[5:] == [("t", 1.0, 4.0, None), ("\ufffdbad", 1.0, 8.0, t), ("tag-after-value", 1.0, 9.0, t),
                       ("a", 4.0, 1.0, None), ("b", 4.0, 2.0, None), ("u", 5.0, 10.0, t)]
    assert p.warnings == {"non-finite value": 2, "invalid time": 1, "invalid metric name": 3, "invalid UTF-8": 1}


# ---- TF2 tensor scalars ------------------------------------------------------------------
DT_FLOAT, DT_DOUBLE, DT_INT32, DT_STRING, DT_INT64, DT_BOOL, DT_HALF = 1, 2, 3, 7, 9, 10, 19


def tensor(dtype: int, body: bytes, dims: tuple[int, ...] = ()) -> bytes:
    return f_varint(1, dtype) + shape(*dims) + body


@pytest.mark.parametrize("tensor_bytes, want", [
    (tensor(DT_FLOAT, f_bytes(5, struct.pack("<f", 0.1))), float(struct.unpack("<f", struct.pack("<f", 0.1))[0])),
    (tensor(DT_FLOAT, f_float(5, -3.5)), -3.5),  # float_val not packed
    (tensor(DT_FLOAT, b""), 0.0),  # no values: zeros, as TensorFlow's MakeNdarray
    (f_varint(1, DT_FLOAT) + f_bytes(5, struct.pack("<f", 2.5)), 2.5),  # no tensor_shape: rank 0
    (tensor(DT_FLOAT, f_bytes(4, struct.pack("<f", 0.75))), 0.75),  # tensor_content
    (tensor(DT_DOUBLE, f_bytes(4, struct.pack("<d", 0.1))), 0.1),
    (tensor(DT_DOUBLE, f_bytes(6, struct.pack("<d", 1e-300))), 1e-300),  # double_val packed
    (tensor(DT_DOUBLE, f_double(6, -2.25)), -2.25),  # double_val not packed
    (tensor(DT_INT32, f_bytes(7, varint(-7))), -7.0),  # int_val packed, negative
    (tensor(DT_INT32, f_varint(7, 123)), 123.0),
    (tensor(DT_INT32, f_bytes(4, struct.pack("<i", -9))), -9.0),
    (tensor(DT_INT64, f_varint(10, -(2**40))), -float(2**40)),
    (tensor(DT_INT64, f_bytes(4, struct.pack("<q", 2**50))), float(2**50)),
    (tensor(DT_HALF, f_varint(13, struct.unpack("<H", struct.pack("<e", 1.5))[0])), 1.5),
    (tensor(DT_BOOL, f_varint(11, 1)), 1.0),
    (tensor(DT_FLOAT, f_bytes(5, struct.pack("<f", 4.0)), dims=(1,)), 4.0),  # one element of rank 1
    (tensor(DT_FLOAT, f_bytes(5, struct.pack("<f", 4.0)), dims=(1, 1)), 4.0),
])
def test_tf2_tensor_scalars_decode(tensor_bytes: bytes, want: float) -> None:
    got, p = parse(record(event(12, [tensor_value("m", tensor_bytes)])))
    assert got == [("m", 12.0, want, 1714550000.25)]
    assert not p.warnings


@pytest.mark.parametrize("value", [
    tensor_value("h", tensor(DT_FLOAT, f_bytes(5, struct.pack("<6f", *range(6))), dims=(2, 3)), "histograms"),
    tensor_value("v", tensor(DT_FLOAT, f_bytes(5, struct.pack("<2f", 1, 2)), dims=(2,))),  # two elements
    tensor_value("e", tensor(DT_FLOAT, b"", dims=(0,))),  # no elements
    tensor_value("s", tensor(DT_STRING, f_bytes(8, b"hello"))),  # text
    tensor_value("p", tensor(DT_FLOAT, f_bytes(5, struct.pack("<f", 1.0))), "pr_curves"),  # other plugin
    tensor_value("u", f_varint(1, DT_FLOAT) + f_bytes(2, f_varint(3, 1))),  # unknown rank
    f_bytes(1, "nometa") + metadata("scalars"),  # metadata but no value
])
def test_other_tensors_are_ignored(value: bytes) -> None:
    got, p = parse(record(event(1, [value, simple("keep", 1.0)])))
    assert got == [("keep", 1.0, 1.0, 1714550000.25)]
    assert not p.warnings


def test_a_tags_plugin_is_remembered_from_its_first_value() -> None:
    one = f_bytes(5, struct.pack("<f", 1.0))
    recs = [event(0, [tensor_value("hist1", tensor(DT_FLOAT, one), "histograms"),
                      tensor_value("sc", tensor(DT_FLOAT, one), "scalars")]),
            event(1, [tensor_value("hist1", tensor(DT_FLOAT, one), None),  # metadata only once
                      tensor_value("sc", tensor(DT_FLOAT, one), None)])]
    got, _ = parse(b"".join(record(r) for r in recs))
    assert got == [("sc", 0.0, 1.0, 1714550000.25), ("sc", 1.0, 1.0, 1714550000.25)]


def test_malformed_tensors_and_events_are_counted() -> None:
    recs = [
        event(1, [tensor_value("a", tensor(DT_FLOAT, f_bytes(4, b"\0\0\0")))]),  # content of 3 bytes
        event(1, [tensor_value("b", tensor(DT_FLOAT, f_bytes(5, struct.pack("<2f", 1, 2)), dims=(1,)))]),
        event(1, [tensor_value("c", tensor(DT_FLOAT, f_bytes(6, struct.pack("<d", 1.0))))]),  # wrong field
        event(1, [simple("ok", 1.0)])[:-3],  # cut inside the summary
        f_bytes(5, b"\x0a\x7f"),  # a value longer than its summary
        b"\x0b\x00",  # a group (wire type 3)
        b"\xff" * 11,  # a varint too long
    ]
    got, p = parse(b"".join(record(r) for r in recs) + record(event(2, [simple("after", 2.0)])))
    assert got == [("after", 2.0, 2.0, 1714550000.25)]
    assert p.warnings == {"invalid tensor": 3, "invalid event": 4}


# ---- arbitrary input never raises --------------------------------------------------------
def _cuts(data: bytes, cuts: list[int]) -> list[int]:
    return sorted(min(c, len(data)) for c in cuts)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=3000), st.lists(st.integers(0, 3000), max_size=8))
def test_arbitrary_bytes_never_raise(data: bytes, cuts: list[int]) -> None:
    a, _ = parse(data)
    b, _ = parse(data, _cuts(data, cuts))
    assert comparable(a) == comparable(b)


# protobuf-shaped garbage inside valid records: exercises the decoder rather than the framing
_fields = st.deferred(lambda: st.one_of(
    st.builds(f_varint, st.integers(1, 20), st.integers(-(2**63), 2**64 - 1)),
    st.builds(f_double, st.integers(1, 20), st.floats()),
    st.builds(f_float, st.integers(1, 20), st.floats(width=32)),
    st.builds(f_bytes, st.integers(1, 20), st.binary(max_size=20)),
    st.builds(f_bytes, st.integers(1, 20), _messages),
))
_messages = st.lists(_fields, max_size=6).map(b"".join)
_event_like = st.one_of(
    _messages,
    st.builds(lambda step, vals: event(step, vals), st.integers(-(2**63), 2**63 - 1),
              st.lists(st.one_of(_messages, st.builds(tensor_value, st.just("t"), _messages,
                                                      st.sampled_from([None, "scalars", "x"]))), max_size=4)),
    st.binary(max_size=60),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_event_like, max_size=6), st.lists(st.integers(0, 2000), max_size=5), st.integers(0, 2000),
       st.integers(0, 255))
def test_valid_records_of_arbitrary_protobuf_never_raise(events: list[bytes], cuts: list[int], flip: int,
                                                         xor: int) -> None:
    data = b"".join(record(e) for e in events)
    a, pa = parse(data)
    b, pb = parse(data, _cuts(data, cuts))
    assert comparable(a) == comparable(b) and pa.warnings == pb.warnings
    assert not {"record CRC mismatch", "record header CRC mismatch", "truncated record"} & set(pa.warnings)
    if data:
        bad = bytearray(data)
        bad[flip % len(bad)] ^= xor
        parse(bytes(bad), _cuts(data, cuts))


# ---- finding event files -----------------------------------------------------------------
def run_sh(cmd: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, timeout=30,
                          env={**os.environ, **env})


def test_remote_find_command_lists_non_empty_event_files(tmp_path: Path) -> None:
    run = tmp_path / "my run's dir"
    (run / "loss_main" / "train").mkdir(parents=True)
    files = [run / "events.out.tfevents.1714550000.host.1.0",
             run / "loss_main" / "train" / "events.out.tfevents.1714550001.host.1.1"]
    for f in files:
        f.write_bytes(b"x")
    (run / "events.out.tfevents.empty").write_bytes(b"")  # empty: not listed
    (run / "notes.txt").write_text("hi")
    (run / "events.out.tfevents.dir").mkdir()  # a directory: not listed
    res = run_sh(remote_find_command(str(run)))
    assert res.returncode == 0, res.stderr
    assert parse_find_output(res.stdout) == sorted(str(f) for f in files)
    assert EVENT_FILE_GLOB in remote_find_command("/x")
    # at most `limit`
    assert len(parse_find_output(run_sh(remote_find_command(str(run), limit=1)).stdout)) == 1
    # a directory that does not exist: nothing, and no error
    res = run_sh(remote_find_command(str(tmp_path / "nope")))
    assert res.returncode == 0 and res.stdout == ""
    # ~/ is the remote home
    home = tmp_path / "home"
    (home / "runs" / "r 1").mkdir(parents=True)
    (home / "runs" / "r 1" / "events.out.tfevents.9").write_bytes(b"y")
    res = run_sh(remote_find_command("~/runs/r 1"), HOME=str(home))
    assert parse_find_output(res.stdout) == [str(home / "runs" / "r 1" / "events.out.tfevents.9")]
    # a directory named like an option
    dash = tmp_path / "-name"
    dash.mkdir()
    (dash / "events.out.tfevents.1").write_bytes(b"z")
    res = subprocess.run(["sh", "-c", remote_find_command("-name")], cwd=tmp_path, capture_output=True, text=True)
    assert parse_find_output(res.stdout) == ["./-name/events.out.tfevents.1"]


def test_parse_find_output() -> None:
    text = ("Welcome to the GPU box\r\n/r/events.out.tfevents.1\r\n\n/r/a/events.out.tfevents.2\n"
            "/r/events.out.tfevents.1\n/r/events.out.tfevents.\n/r/other.txt\n  \n")
    assert parse_find_output(text) == ["/r/events.out.tfevents.1", "/r/a/events.out.tfevents.2"]
    assert parse_find_output("") == []


# ---- the real producer: tensorboardX -----------------------------------------------------
def f32(v: float) -> float:
    return float(np.float32(v))


def parse_dir(run: Path, chunk: int | None = None) -> dict[str, tuple[list[tuple], TFEventsParser]]:
    """Each event file under ``run`` (found with the remote find command, run locally) → its points."""
    res = run_sh(remote_find_command(str(run)))
    out = {}
    for path in parse_find_output(res.stdout):
        data = Path(path).read_bytes()
        chunks = None if chunk is None else list(range(chunk, len(data), chunk))
        out[os.path.relpath(os.path.dirname(path), run)] = parse(data, chunks)
    return out


@needs_tbx
def test_tensorboardx_add_scalar_round_trips(tmp_path: Path) -> None:
    rnd = random.Random(5)
    w = SummaryWriter(str(tmp_path))
    want = []
    steps = [0, 1, 2, 3, 127, 128, 129, 16383, 16384, 2**31 + 5, 2**40]
    for step in steps:
        for tag, v in (("train/loss", rnd.uniform(-10, 10)), ("val/acc", rnd.random()),
                       ("tiny", rnd.uniform(-1e-30, 1e-30)), ("huge", rnd.uniform(-3e38, 3e38)),
                       ("zero", 0.0), ("neg", -rnd.expovariate(1.0))):
            wall = 1714550000.0 + step / 7
            w.add_scalar(tag, v, step, walltime=wall)
            want.append((tag, float(step), f32(v), wall))
        w.add_histogram("weights", np.asarray([rnd.gauss(0, 1) for _ in range(100)]), step)  # ignored
    w.add_scalar("numpy", np.float64(0.1), 7, walltime=1.5)
    want.append(("numpy", 7.0, f32(0.1), 1.5))
    w.add_text("notes", "hello", 1)  # a string tensor: ignored
    w.add_pr_curve("pr", np.array([0, 1, 1, 0]), np.array([0.1, 0.9, 0.8, 0.3]), 1)  # float tensor: ignored
    w.close()
    files = parse_dir(tmp_path)
    assert list(files) == ["."]
    got, p = files["."]
    assert got == want
    assert not p.warnings
    assert p.file_version == "brain.Event:2"
    for chunk in (1, 7, 4096):
        assert parse_dir(tmp_path, chunk)["."][0] == want


@needs_tbx
def test_tensorboardx_add_scalars_writes_one_file_per_key(tmp_path: Path) -> None:
    w = SummaryWriter(str(tmp_path))
    want: dict[str, list[tuple]] = {".": [], "run_14h/xsinx": [], "run_14h/xcosx": [], "run_14h/tanx": []}
    for i in range(100):
        vals = {"xsinx": i * np.sin(i / 5), "xcosx": i * np.cos(i / 5), "tanx": np.tan(i / 5)}
        w.add_scalars("run_14h", vals, i, walltime=1000.0 + i)
        for k, v in vals.items():
            want[f"run_14h/{k}"].append(("run_14h", float(i), f32(v), 1000.0 + i))
        w.add_scalar("lr", 0.1 / (i + 1), i, walltime=2000.0 + i)
        want["."].append(("lr", float(i), f32(0.1 / (i + 1)), 2000.0 + i))
        if i % 10 == 0:
            w.add_histogram("h", np.arange(10.0) * i, i)
    w.close()
    got = parse_dir(tmp_path)
    assert sorted(got) == sorted(want)
    for d, pts in want.items():
        assert got[d][0] == pts, d
        assert not got[d][1].warnings


@needs_tbx
def test_tensorboardx_tf2_style_tensor_scalars(tmp_path: Path) -> None:
    """TF2's tf.summary.scalar writes rank-0 tensors with plugin "scalars": written here with the real
    protobuf classes and record writer, in each layout TensorFlow uses."""
    w = SummaryWriter(str(tmp_path))
    fw = w._get_file_writer()
    meta = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))
    rank0 = tensor_shape_pb2.TensorShapeProto()
    want = []
    for step in range(50):
        v = math.sin(step) * 10 ** (step % 7 - 3)
        tensors = {
            "float_val": tensor_pb2.TensorProto(dtype="DT_FLOAT", float_val=[v], tensor_shape=rank0),
            "double_val": tensor_pb2.TensorProto(dtype="DT_DOUBLE", double_val=[v], tensor_shape=rank0),
            "content_f": tensor_pb2.TensorProto(dtype="DT_FLOAT", tensor_content=struct.pack("<f", v),
                                                tensor_shape=rank0),
            "content_d": tensor_pb2.TensorProto(dtype="DT_DOUBLE", tensor_content=struct.pack("<d", v),
                                                tensor_shape=rank0),
            "int_val": tensor_pb2.TensorProto(dtype="DT_INT32", int_val=[-step], tensor_shape=rank0),
        }
        values = [summary_pb2.Summary.Value(tag=t, tensor=x, metadata=meta if step == 0 else None)
                  for t, x in tensors.items()]
        # a TF2 histogram: a [k, 3] float tensor, plugin "histograms"; ignored
        hist = tensor_pb2.TensorProto(dtype="DT_DOUBLE", double_val=[0, 1, 2] * 4, tensor_shape=tensor_shape_pb2
                                      .TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=4),
                                                             tensor_shape_pb2.TensorShapeProto.Dim(size=3)]))
        hmeta = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="histograms"))
        values.append(summary_pb2.Summary.Value(tag="hist", tensor=hist, metadata=hmeta))
        fw.add_summary(summary_pb2.Summary(value=values), step, walltime=500.0 + step)
        t = 500.0 + step
        want += [("float_val", float(step), f32(v), t), ("double_val", float(step), v, t),
                 ("content_f", float(step), f32(v), t), ("content_d", float(step), v, t),
                 ("int_val", float(step), float(-step), t)]
    w.close()
    got, p = parse_dir(tmp_path)["."]
    assert got == want
    assert not p.warnings


@needs_tbx
def test_following_a_file_as_tensorboardx_writes_it(tmp_path: Path) -> None:
    """The file is read while it grows (each read takes what was appended, often mid-record)."""
    w = SummaryWriter(str(tmp_path), flush_secs=3600)
    p = TFEventsParser()
    got: list[tuple] = []
    want: list[tuple] = []
    path = None
    offset = 0
    for i in range(300):
        w.add_scalar("loss", 1 / (i + 1), i, walltime=100.0 + i)
        want.append(("loss", float(i), f32(1 / (i + 1)), 100.0 + i))
        if i % 37 == 0:
            w.flush()
        if path is None:
            found = list(tmp_path.glob(EVENT_FILE_GLOB))
            path = found[0] if found else None
        if path is not None:
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read(random.Random(i).randrange(1, 200))  # a partial read
            offset += len(data)
            got += [pkey(q) for q in p.feed(data)]
    w.close()
    assert path is not None
    with open(path, "rb") as f:
        f.seek(offset)
        got += [pkey(q) for q in p.feed(f.read())]
    p.flush()
    assert got == want
    assert not p.warnings and p.bytes == path.stat().st_size


# ---- speed (printed, not asserted) -------------------------------------------------------
def test_benchmark_100k_scalars(capsys: pytest.CaptureFixture) -> None:
    rnd = random.Random(0)
    data = record(FILE_VERSION) + b"".join(
        record(event(i, [simple("train/loss", rnd.random())], wall=1714550000.0 + i * 0.01)) for i in range(100_000))
    p = TFEventsParser()
    t0 = time.perf_counter()
    n = 0
    for i in range(0, len(data), 1 << 16):  # 64 KiB reads
        n += len(p.feed(data[i:i + (1 << 16)]))
    dt = time.perf_counter() - t0
    assert n == 100_000 and not p.warnings
    with capsys.disabled():
        print(f"\n[tbevents] 100k scalars, {len(data) / 1e6:.1f} MB: {dt:.2f} s, "
              f"{n / dt:,.0f} points/s, {len(data) / dt / 1e6:.1f} MB/s")
