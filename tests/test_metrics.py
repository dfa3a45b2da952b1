"""backends.metrics: metric-file and log parsers, downsampled series, run series, clock skew."""

from __future__ import annotations

import json
import math
import time
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backends.metrics import (DEFAULT_LOG_PATTERN, LogMetricParser, MetricsFileParser, Point, RunSeries, Series,
                              SkewEstimator, lower_is_better)


def key(p: Point) -> tuple:
    """A comparable form of a point (NaN != NaN)."""
    return (p.name, p.step, repr(p.value), p.t)


def keys(points: list[Point]) -> list[tuple]:
    return [key(p) for p in points]


def feed_all(parser, chunks: list[bytes]) -> list[Point]:
    out: list[Point] = []
    for c in chunks:
        out += parser.feed(c)
    return out + parser.flush()


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    cuts = sorted({min(max(c, 0), len(data)) for c in cuts})
    out, prev = [], 0
    for c in cuts:
        out.append(data[prev:c])
        prev = c
    out.append(data[prev:])
    return out


def line(obj) -> bytes:
    return json.dumps(obj).encode() + b"\n"


# ---- MetricsFileParser --------------------------------------------------------------------
def test_metrics_file_points_config_and_uses() -> None:
    p = MetricsFileParser()
    data = (line({"t": 100.5, "s": 1, "m": {"loss": 0.31, "acc": 0.9}})
            + line({"t": 101, "config": {"lr": 0.1, "model": {"layers": 12}}})
            + line({"t": 102, "config": {"model": {"heads": 8}, "lr": 0.2}})
            + line({"t": 103, "use": {"run": "01HXRUN", "path": "ckpt.pt"}})
            + line({"t": 104, "s": 2, "m": {"loss": 0.25}}))
    pts = p.feed(data)
    assert keys(pts) == keys([Point("loss", 1.0, 0.31, 100.5), Point("acc", 1.0, 0.9, 100.5),
                              Point("loss", 2.0, 0.25, 104.0)])
    assert p.config == {"lr": 0.2, "model": {"layers": 12, "heads": 8}}
    assert p.uses == [("01HXRUN", "ckpt.pt")]
    assert not p.warnings


def test_metrics_file_partial_lines_and_split_utf8() -> None:
    data = line({"s": 3, "m": {"välid/lössé": 1.5, "日本": 2}})
    p = MetricsFileParser()
    out = []
    for i in range(len(data)):  # one byte at a time: splits every multi-byte character
        out += p.feed(data[i:i + 1])
    assert keys(out) == keys([Point("välid/lössé", 3.0, 1.5, None), Point("日本", 3.0, 2.0, None)])
    assert not p.warnings


def test_metrics_file_bad_lines_are_counted_not_raised() -> None:
    p = MetricsFileParser()
    data = (b'{"s": 1, "m": {"loss": 0.5\n'  # truncated JSON
            + b"garbage\n"
            + b"[1, 2]\n"
            + line({"t": 1, "hello": 1})
            + line({"s": 2, "m": {"loss": "high", "ok": True, "nested": {"a": 1}, "fine": 1}})
            + line({"s": "two", "m": {"loss": 1}})
            + line({"m": {"loss": 1.0}})
            + line({"m": {"loss": 2.0}})
            + line({"s": 3, "m": {"": 1, "x" * 300: 2}})
            + line({"s": 4, "m": [1, 2]})
            + line({"config": [1]})
            + line({"use": {"path": "x"}})
            + line({"t": "noon", "s": 5, "m": {"a": 1}})
            + b'{"s": 6, "m": {"big": 1' + b"0" * 400 + b"}}\n"
            + b"\n   \n")
    pts = p.feed(data)
    assert keys(pts) == keys([Point("fine", 2.0, 1.0, None), Point("loss", 0.0, 1.0, None),
                              Point("loss", 1.0, 2.0, None), Point("a", 5.0, 1.0, None)])
    assert p.warnings == Counter({"invalid JSON line": 2, "not a JSON object": 1, "unknown line": 1,
                                  "non-numeric value": 3, "invalid step": 1, "missing step": 2,
                                  "invalid metric name": 2, "invalid metrics": 1, "invalid config line": 1,
                                  "invalid use line": 1, "invalid time": 1, "value out of range": 1})


def test_metrics_file_non_finite_values_are_kept_and_counted() -> None:
    p = MetricsFileParser()
    data = (line({"s": 1, "m": {"loss": "NaN", "a": "Infinity", "b": "-Infinity"}})
            + b'{"s": 2, "m": {"loss": NaN, "a": Infinity, "b": -Infinity}}\n')
    pts = p.feed(data)
    assert [(q.name, q.step) for q in pts] == [("loss", 1.0), ("a", 1.0), ("b", 1.0), ("loss", 2.0), ("a", 2.0), ("b", 2.0)]
    vals = [q.value for q in pts]
    assert math.isnan(vals[0]) and vals[1] == math.inf and vals[2] == -math.inf
    assert math.isnan(vals[3]) and vals[4] == math.inf and vals[5] == -math.inf
    assert p.warnings == Counter({"non-finite value": 6})


def test_metrics_file_last_line_without_newline_and_truncated_tail() -> None:
    p = MetricsFileParser()
    assert p.feed(b'{"s": 1, "m": {"loss": 1}}') == []  # waits for its newline
    assert keys(p.flush()) == keys([Point("loss", 1.0, 1.0, None)])
    p.feed(b'{"s": 2, "m": {"lo')  # the writer died mid-line
    assert p.flush() == []
    assert p.warnings["invalid JSON line"] == 1


def test_metrics_file_long_line_bom_and_bad_utf8() -> None:
    p = MetricsFileParser(max_line=100)
    data = (b"\xef\xbb\xbf" + line({"s": 1, "m": {"a": 1}})
            + line({"s": 2, "config": {"x": "y" * 200}})
            + b'{"s": 3, "m": {"b\xff": 2}}\n')
    pts = p.feed(data[:50]) + p.feed(data[50:])
    assert keys(pts) == keys([Point("a", 1.0, 1.0, None), Point("b\ufffd", 3.0, 2.0, None)])
    assert p.warnings == Counter({"line too long": 1, "invalid UTF-8": 1})
    assert p.config == {}


def test_metrics_file_deeply_nested_json_does_not_raise() -> None:
    p = MetricsFileParser()
    assert p.feed(b"[" * 100_000 + b"\n" + b'{"config": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5001 + b"\n") == []
    assert p.warnings["invalid JSON line"] + p.warnings["invalid config line"] >= 1


# ---- LogMetricParser -----------------------------------------------------------------------
def parse_log(text: str, pattern: str | None = None) -> tuple[list[tuple[str, float, float]], Counter]:
    p = LogMetricParser(pattern)
    pts = p.feed(text.encode()) + p.flush()
    return [(q.name, q.step, q.value) for q in pts], p.warnings


def test_log_key_value_pairs_and_step() -> None:
    pts, w = parse_log("[2024-05-01 12:30:01,123] INFO step=10 loss=0.5 val/loss: 1e-3 train.acc = 0.75 lr-0=-2.5E+2\n")
    assert pts == [("loss", 10, 0.5), ("val/loss", 10, 0.001), ("train.acc", 10, 0.75), ("lr-0", 10, -250.0)]
    assert not w


def test_log_step_preference_and_auto_counter() -> None:
    pts, _ = parse_log("epoch=1 iter=7 loss=1\nloss=2 acc: 0.5\nloss=3\nEpoch: 2 loss=4\n")
    assert pts == [("epoch", 7, 1.0), ("loss", 7, 1.0),  # iter wins over epoch; epoch stays a metric
                   ("loss", 0, 2.0), ("acc", 0, 0.5),  # no step: each metric's own counter
                   ("loss", 1, 3.0), ("loss", 2, 4.0)]


def test_log_json_objects_and_python_dict_reprs() -> None:
    pts, _ = parse_log('{"step": 5, "loss": 0.1, "msg": "hi", "ok": true, "acc": "NaN", "n": {"a": 1}}\n'
                       "{'loss': 0.4, 'learning_rate': 5e-05, 'epoch': 0.1}\n"
                       "  {not json: 1}  \n")
    assert pts[0] == ("loss", 5, 0.1)
    assert pts[1][:2] == ("acc", 5) and math.isnan(pts[1][2])
    assert pts[2:4] == [("loss", 0.1, 0.4), ("learning_rate", 0.1, 5e-05)]
    assert pts[4:] == [("json", 0, 1.0)]  # not JSON: read as key: value text


@pytest.mark.parametrize("text", [
    "12:30:01 started",
    "2024-05-01T12:30:01Z started",
    "see http://x and https://example.com:8443/path?a=1",
    "connecting to localhost:8080",
    "a=b mode=train name=resnet50",
    "date=2024-01-01 time=12:30:01 version=1.2.3 size=10MB took=0.5s frac=3/10",
    "python train.py --lr=0.001 --batch-size=32",
    "x=1e y=.e5 z=--1 w=1..2 v=0x10",
    "ETA: 0:01:23",
    "x=info y=nano z=infinityx",
])
def test_log_not_fooled(text: str) -> None:
    pts, _ = parse_log(text + "\n")
    assert pts == []


def test_log_non_finite_values_counted_and_kept() -> None:
    pts, w = parse_log("step=1 loss=nan grad=inf neg=-Infinity ok=1\n")
    assert [(n, s) for n, s, _ in pts] == [("loss", 1), ("grad", 1), ("neg", 1), ("ok", 1)]
    assert math.isnan(pts[0][2]) and pts[1][2] == math.inf and pts[2][2] == -math.inf
    assert w == Counter({"non-finite value": 3})


def test_log_progress_bar_redraws_and_crlf() -> None:
    pts, _ = parse_log(" 45%|####  | 450/1000 [00:10<00:12, 45.00it/s, loss=0.123]\r"
                       " 46%|####  | 460/1000 [00:10<00:12, 45.00it/s, loss=0.120]\r\nacc=1\r\n")
    assert pts == [("loss", 0, 0.123), ("loss", 1, 0.120), ("acc", 0, 1.0)]


def test_log_huge_line_is_capped() -> None:
    p = LogMetricParser()
    t = time.perf_counter()
    pts = p.feed(b"loss=1 " + b"x" * 10_000_000)
    pts += p.feed(b"y" * 5_000_000 + b" acc=2\nloss=3\n")
    assert time.perf_counter() - t < 2.0
    assert [(q.name, q.value) for q in pts] == [("loss", 1.0), ("loss", 3.0)]  # acc=2 was past 64 KiB
    assert p.warnings == Counter({"line too long (truncated)": 1})


def test_user_pattern() -> None:
    pts, w = parse_log("metric loss -> 0.5 @3 | acc -> 0.7 | bad -> x1\nloss -> 0.4\n",
                       r"(?P<key>\w+) -> (?P<value>\S+)(?: @(?P<step>\d+))?")
    assert pts == [("loss", 3, 0.5), ("acc", 3, 0.7), ("loss", 0, 0.4)]
    assert w == Counter({"non-numeric value": 1})
    # step-like keys still give the step when the pattern has no step group
    pts, _ = parse_log("step|4 loss|2\n", r"(?P<key>[a-z]+)\|(?P<value>\d+)")
    assert pts == [("loss", 4, 2.0)]


@pytest.mark.parametrize("pattern, message", [
    ("(?P<key>\\w+)=(?P<value>[0-9.]+", "does not compile"),
    ("(?P<key>\\w+)=([0-9.]+)", "missing: value"),
    ("(\\w+)=([0-9.]+)", "missing: key, value"),
    ("(?P<key>\\w*)=?(?P<value>\\d*)", "matches the empty string"),
])
def test_user_pattern_validation(pattern: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LogMetricParser(pattern)


def test_user_pattern_must_be_str() -> None:
    with pytest.raises(ValueError):
        LogMetricParser(b"(?P<key>a)(?P<value>1)")  # type: ignore[arg-type]


def test_default_pattern_is_public_and_usable_as_a_user_pattern() -> None:
    a, _ = parse_log("step=2 loss=0.5 acc: 1\n")
    b, _ = parse_log("step=2 loss=0.5 acc: 1\n", DEFAULT_LOG_PATTERN)
    assert a == b


# ---- parser properties ---------------------------------------------------------------------
names = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\n\r"), min_size=1, max_size=8)
values = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(-10**6, 10**6),
                   st.sampled_from(["NaN", "Infinity", "-Infinity", "x"]), st.booleans())
metric_lines = st.builds(lambda s, t, m: line({"t": t, "s": s, "m": m}), st.integers(-5, 10**6) | st.floats(0, 1e6),
                         st.floats(0, 2e9), st.dictionaries(names, values, max_size=4))
other_lines = st.sampled_from([b'{"s": 1, "m": {"loss": 0.5\n', b"garbage \xff\xfe\n", b"\n", b"[1]\n",
                               line({"config": {"lr": 1}}), line({"use": {"run": "R", "path": None}}),
                               b'{"s": 9, "m": {"nan": NaN}}\r\n', "{\"m\": {\"é\": 1}}\n".encode()])
streams = st.lists(st.one_of(metric_lines, other_lines), max_size=30).map(b"".join)


def state(p) -> tuple:
    return dict(p.warnings), getattr(p, "config", None), getattr(p, "uses", None)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams, st.lists(st.integers(0, 5000), max_size=12), st.booleans())
def test_metrics_file_chunking_does_not_matter(data: bytes, cuts: list[int], tail: bool) -> None:
    if tail:
        data += b'{"s": 1, "m": {"z": 2}}'  # a last line without its newline
    whole = MetricsFileParser(max_line=200)
    a = feed_all(whole, [data])
    split = MetricsFileParser(max_line=200)
    b = feed_all(split, split_at(data, cuts))
    assert keys(a) == keys(b)
    assert state(whole) == state(split)


log_lines = st.one_of(
    st.builds(lambda s, k, v, sep: f"step={s} {k}{sep}{v} other text\n".encode(), st.integers(0, 10**6),
              st.sampled_from(["loss", "val/loss", "train.acc", "lr-0", "é"]), st.floats(allow_nan=True),
              st.sampled_from(["=", ": ", " = "])),
    st.builds(lambda d: (json.dumps(d) + "\n").encode(),
              st.dictionaries(st.sampled_from(["step", "epoch", "loss", "acc", "msg"]), values, max_size=4)),
    st.sampled_from([b"12:30:01 loss=1 http://x a=b\r", b"x" * 150 + b" loss=2\n", b"\xff\xfe loss=3 \xe2\x82\n",
                     "größe=1 ✓ acc: 0.5\n".encode(), b"\r\n"]),
    st.text(max_size=40).map(lambda s: s.encode()),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(log_lines, max_size=30).map(b"".join), st.lists(st.integers(0, 5000), max_size=12),
       st.sampled_from([None, r"(?P<key>[a-z]+)=(?P<value>\S+)(?: s(?P<step>\d+))?"]))
def test_log_chunking_does_not_matter(data: bytes, cuts: list[int], pattern: str | None) -> None:
    whole = LogMetricParser(pattern, max_line=100)
    a = feed_all(whole, [data])
    split = LogMetricParser(pattern, max_line=100)
    b = feed_all(split, split_at(data, cuts))
    assert keys(a) == keys(b)
    assert state(whole) == state(split)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000), st.lists(st.integers(0, 2000), max_size=8))
def test_parsers_never_raise_on_arbitrary_bytes(data: bytes, cuts: list[int]) -> None:
    for make in (MetricsFileParser, LogMetricParser, lambda: LogMetricParser(r"(?P<key>\w+)(?P<value>.)")):
        p = make()
        for chunk in split_at(data, cuts):
            for q in p.feed(chunk):
                assert isinstance(q, Point) and isinstance(q.value, float) and isinstance(q.step, float)
        p.flush()
        p2 = make()
        assert keys(feed_all(p2, [data])) is not None


# ---- Series ----------------------------------------------------------------------------------
def finite(vals) -> list[float]:
    return [v for v in vals if math.isfinite(v)]


steps_st = st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=False, allow_infinity=False),
                     st.floats(-1e3, 1e3, allow_nan=False))
points_st = st.lists(st.tuples(steps_st, st.floats(allow_nan=True, allow_infinity=True)), max_size=300)


@settings(max_examples=300, deadline=None)
@given(points_st, st.integers(1, 300), st.sampled_from([4, 16, 2048]))
def test_view_min_max_equal_true_min_max(points: list[tuple[float, float]], width: int, buckets: int) -> None:
    s = Series(buckets=buckets, recent=64)
    for step, v in points:
        s.append(step, v)
    assert len(s) == len(points)
    vals = finite(v for _, v in points)
    x, lo, hi = s.view(width)
    assert len(x) == len(lo) == len(hi) <= width
    assert len(s.view(10**9)[0]) <= buckets
    if vals:
        assert min(lo) == min(vals) == s.min
        assert max(hi) == max(vals) == s.max
        assert all(a <= b for a, b in zip(lo, hi))
    else:
        assert x == [] and math.isnan(s.min) and math.isnan(s.max)
    assert s.nonfinite == len(points) - len(vals)
    # log scale: only positive values
    x, lo, hi = s.view(width, log_y=True)
    pos = [v for v in vals if v > 0]
    assert len(x) <= width
    if pos:
        assert min(lo) == min(pos) and max(hi) == max(pos)
    else:
        assert x == []
    # smoothing: one line, within the finite range
    x, lo, hi = s.view(width, smoothing=0.9)
    assert lo == hi and len(x) <= width
    if vals:
        assert all(min(vals) - 1e-9 * abs(min(vals)) <= y <= max(vals) + 1e-9 * abs(max(vals)) for y in lo)
    # the recent view: the last 64 points exactly
    x, lo, hi = s.view(width, recent=True)
    rec = finite(v for _, v in points[-64:])
    assert len(x) <= width
    if rec:
        assert min(lo) == min(rec) and max(hi) == max(rec)


@settings(max_examples=200, deadline=None)
@given(points_st, st.lists(st.integers(0, 300), max_size=6))
def test_extend_equals_append(points: list[tuple[float, float]], cuts: list[int]) -> None:
    a = Series(buckets=16, recent=32)
    for step, v in points:
        a.append(float(step), v)  # float steps both ways (int steps are kept exact: see below)
    b = Series(buckets=16, recent=32)
    prev = 0
    for c in sorted(set(min(c, len(points)) for c in cuts)) + [len(points)]:
        chunk = points[prev:c]
        b.extend([float(p[0]) for p in chunk], [p[1] for p in chunk])
        prev = c
    assert len(a) == len(b) and a.nonfinite == b.nonfinite
    assert repr(a.first_nonfinite_step) == repr(b.first_nonfinite_step)
    assert a.warnings == b.warnings
    assert repr(a.recent_points()) == repr(b.recent_points())
    assert a.bucket_width == b.bucket_width
    for w in (1, 7, 100):
        assert a.view(w) == b.view(w)


def test_integer_steps_stay_exact_in_append_and_extend() -> None:
    """Steps past 2**53 are not rounded through a float: 2**53 + 1 and 2**63 - 1 come back as given."""
    big = [2**53 + 1, 2**53 + 3, 2**63 - 1]
    a = Series(buckets=16, recent=8)
    for st_ in big:
        a.append(st_, 1.0)
    a.append(2**63 - 1, math.nan)
    b = Series(buckets=16, recent=8)
    import numpy as np
    b.extend(np.array(big + [2**63 - 1], dtype=np.int64), [1.0, 1.0, 1.0, math.nan])
    for s in (a, b):
        steps, _ = s.recent_points()
        assert steps == big + [2**63 - 1] and all(type(x) is int for x in steps)
        assert s.last_step == 2**63 - 1 and type(s.last_step) is int
        assert s.first_nonfinite_step == 2**63 - 1 and type(s.first_nonfinite_step) is int
    rs = RunSeries()
    rs.ingest([Point("x", 2**53 + 1, 0.5)])
    assert rs.summary()["x"]["last_step"] == 2**53 + 1
    # the metrics file and log text give exact ints too; whole-number floats become ints
    mp = MetricsFileParser()
    pts = mp.feed(b'{"s": 9007199254740993, "m": {"a": 1}}\n{"s": 3.0, "m": {"a": 2}}\n{"s": 2.5, "m": {"a": 3}}\n')
    assert [(p.step, type(p.step)) for p in pts] == [(2**53 + 1, int), (3, int), (2.5, float)]
    lp = LogMetricParser()
    pts = lp.feed(b"step=9223372036854775807 loss=0.5\n{\"step\": 9007199254740993, \"acc\": 1}\n")
    assert [(p.name, p.step) for p in pts] == [("loss", 2**63 - 1), ("acc", 2**53 + 1)]
    assert all(type(p.step) is int for p in pts)


def test_series_constant_cost_and_bounded_buckets() -> None:
    s = Series()
    n = 1_000_000
    s.extend(range(n), [math.sin(i / 1000) for i in range(n)])
    x, lo, hi = s.view(120)
    assert len(x) == 120 and min(lo) == pytest.approx(-1) and max(hi) == pytest.approx(1)
    assert len(s.view(10**6)[0]) <= 2048
    assert len(s) == n and s.bucket_width == 512
    assert x[0] < x[-1] and 0 <= x[0] < 10_000 and n - 10_000 < x[-1] < n
    steps, vals = s.recent_points()
    assert len(steps) == 4096 and steps[-1] == n - 1


def test_series_steps_out_of_order_repeated_and_below_the_start() -> None:
    s = Series(buckets=8)
    for st_, v in [(100, 1.0), (101, 2.0), (101, 3.0), (50, -1.0), (-20, 5.0), (1000, 0.5), (70, 9.0)]:
        s.append(st_, v)
    assert s.warnings["step out of order"] == 3
    assert s.min == -1.0 and s.max == 9.0 and len(s) == 7
    x, lo, hi = s.view(100)
    assert min(lo) == -1.0 and max(hi) == 9.0
    assert x[0] < 0 < 1000 <= x[-1] + s.bucket_width  # the range reaches below the first step


def test_series_same_step_only_then_more() -> None:
    s = Series()
    for v in (3.0, 1.0, 2.0):
        s.append(5, v)
    assert s.bucket_width is None
    assert s.view(10) == ([5.0], [1.0], [3.0])
    s.append(6, 10.0)
    assert s.bucket_width == 1.0
    x, lo, hi = s.view(10)
    assert (x, lo, hi) == ([5.5, 6.5], [1.0, 10.0], [3.0, 10.0])


def test_series_nan_and_inf() -> None:
    s = Series()
    s.append(1, 1.0)
    s.append(2, 0.5)
    s.append(3, math.inf)
    s.append(4, math.nan)
    s.append(math.nan, 1.0)  # a non-finite step is dropped
    assert len(s) == 4 and s.nonfinite == 2 and s.first_nonfinite_step == 3.0
    assert math.isnan(s.last) and s.last_step == 4.0
    assert s.min == 0.5 and s.max == 1.0
    assert s.warnings["non-finite step"] == 1
    x, lo, hi = s.view(50)
    assert min(lo) == 0.5 and max(hi) == 1.0


def test_series_smoothing_like_tensorboard() -> None:
    s = Series()
    vals = [1.0, 0.0, 1.0, 0.0]
    for i, v in enumerate(vals):
        s.append(i, v)
    _, sm, _ = s.view(4, smoothing=0.5)
    # TensorBoard: last = last * w + (1 - w) * v, divided by 1 - w**n
    expect, last = [], 0.0
    for n, v in enumerate(vals, 1):
        last = last * 0.5 + 0.5 * v
        expect.append(last / (1 - 0.5 ** n))
    assert sm == pytest.approx(expect)
    assert s.view(4, smoothing=0.0)[1] == vals


def test_series_log_view_drops_non_positive() -> None:
    s = Series(buckets=4)
    for i, v in enumerate([-1.0, 0.0, 0.5, 2.0, -3.0, 4.0, 0.0, 0.0]):
        s.append(i, v)
    x, lo, hi = s.view(4, log_y=True)
    assert all(v > 0 for v in lo + hi)
    assert min(lo) == 0.5 and max(hi) == 4.0


# ---- RunSeries -------------------------------------------------------------------------------
def test_run_series_names_mid_run_and_summary() -> None:
    r = RunSeries()
    r.ingest([Point("train/loss", i, 1.0 / (i + 1), 1000.0 + i) for i in range(100)])
    r.ingest([Point("val/acc", 50, 0.5, None), Point("val/acc", 99, 0.8, None), Point("val/acc", 75, 0.9, None)])
    r.ingest([Point("perplexity", 1, 9.0), Point("perplexity", 2, 7.0), Point("error_rate", 1, 0.2),
              Point("error_rate", 2, math.nan)])
    assert r.names() == ["train/loss", "val/acc", "perplexity", "error_rate"]
    assert len(r.series("val/acc")) == 3 and "val/acc" in r and r.get("nope") is None
    with pytest.raises(KeyError):
        r.series("nope")
    summ = r.summary()
    assert summ["train/loss"] == {"last": 0.01, "last_step": 99.0, "min": 0.01, "max": 1.0, "best": 0.01, "count": 100}
    assert summ["val/acc"]["best"] == 0.9 and summ["val/acc"]["last"] == 0.9
    assert summ["perplexity"]["best"] == 7.0
    assert math.isnan(summ["error_rate"]["last"]) and summ["error_rate"]["best"] == 0.2
    assert r.last_t == 1099.0
    assert r.warnings["step out of order"] == 1
    x, lo, hi = r.series("val/acc").view(120)
    assert min(lo) == 0.5 and max(hi) == 0.9


def test_run_series_ten_thousand_names() -> None:
    r = RunSeries()
    t = time.perf_counter()
    for step in range(3):
        r.ingest([Point(f"layer{i}/grad_norm", step, i + step) for i in range(10_000)])
    assert time.perf_counter() - t < 10
    assert len(r) == 10_000 and not r.warnings
    assert len(r.series("layer9999/grad_norm")) == 3
    assert len(r.summary()) == 10_000


def test_run_series_name_cap() -> None:
    r = RunSeries(max_names=5)
    kept = r.ingest([Point(f"m{i}", 0, 1.0) for i in range(8)] + [Point("m0", 1, 2.0)])
    assert kept == 6 and len(r) == 5
    assert r.warnings["metric name dropped (too many names)"] == 3


def test_lower_is_better() -> None:
    assert lower_is_better("val/Loss") and lower_is_better("test_error") and lower_is_better("perplexity")
    assert not lower_is_better("acc") and not lower_is_better("bleu")


def test_parser_to_series_end_to_end() -> None:
    p = MetricsFileParser()
    r = RunSeries()
    lines = b"".join(line({"t": 1e9 + i, "s": i, "m": {"loss": 2.0 / (i + 1), "acc": i / 1000}}) for i in range(1000))
    for i in range(0, len(lines), 777):
        r.ingest(p.feed(lines[i:i + 777]))
    assert r.names() == ["loss", "acc"] and len(r.series("loss")) == 1000
    assert r.summary()["acc"]["best"] == 0.999


# ---- SkewEstimator ---------------------------------------------------------------------------
def test_skew_estimator() -> None:
    e = SkewEstimator(window=4)
    assert e.offset is None and e.delay(1.0, 2.0) is None and e.to_local(5.0) == 5.0
    for remote, delay in [(100.0, 0.5), (101.0, 0.2), (102.0, 1.0)]:
        e.add(remote, remote + 30.0 + delay)  # the instance's clock is 30 s behind ours
    assert e.offset == pytest.approx(30.2)
    assert e.to_local(103.0) == pytest.approx(133.2)
    assert e.delay(103.0, 134.0) == pytest.approx(0.8)
    e.add(math.nan, 1.0)
    assert e.offset == pytest.approx(30.2)
