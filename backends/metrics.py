"""Metric series: turning the bytes of a run into metric points, and keeping series cheap to chart.

Two sources of points, both fed raw bytes in whatever chunks they arrive
(a chunk may end mid-line or mid-UTF-8-character; the partial line waits for
the next chunk, and ``flush()`` takes it at the end of the stream):

* :class:`MetricsFileParser` — ``metrics.jsonl``, written by ``labdeck.log()``
  inside the job, one JSON object a line::

      {"t": 1714550000.1, "s": 120, "m": {"loss": 0.31, "acc": 0.9}}
      {"t": 1714550000.2, "config": {"lr": 3e-4, "model": {"layers": 12}}}
      {"t": 1714550000.3, "use": {"run": "01HX...", "path": "ckpt.pt"}}

* :class:`LogMetricParser` — zero-code capture from the run's output: JSON
  objects, and ``key=value`` / ``key: value`` numbers (or a project's own regex).

Neither parser ever raises on bad input: a bad line or value is skipped and
counted in the parser's ``warnings`` :class:`collections.Counter`, by kind.
Non-finite values (``NaN``, ``Infinity``, ``-Infinity``, and the JSON strings
``"NaN"``, ``"Infinity"``, ``"-Infinity"`` the in-job module writes for them)
are KEPT as ``float('nan')``/``±inf`` points, and counted ("non-finite value"),
so a run whose loss diverged shows it: :class:`Series` counts them, remembers
where the first one arrived (``first_nonfinite_step``) and reports the last
value as it came, while its min/max/chart use the finite values only.

Points go into a :class:`RunSeries` (all metrics of one run), one :class:`Series`
per metric name. A Series keeps a fixed number of min/max buckets over its step
range, merged pairwise as the range grows, so appending is O(1) and a chart
refresh (:meth:`Series.view`) costs the same at 1k and at 10M points; plus the
exact last few thousand points for a "recent" view.

Order is by step, never by the instance's wall time ``t`` (its clock may be
skewed); :class:`SkewEstimator` estimates that skew for latency displays.

Stdlib only, except :meth:`Series.extend` (bulk append), which uses numpy.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

__all__ = [
    "Point", "MetricsFileParser", "LogMetricParser", "Series", "RunSeries", "SkewEstimator",
    "DEFAULT_LOG_PATTERN", "STEP_KEYS", "lower_is_better",
]

_isfinite = math.isfinite
_floor = math.floor
_INF = math.inf
_NAN = math.nan

#: Longest metric name kept (longer ones are skipped and counted).
MAX_NAME_LEN = 256
#: Keys that give a log line (or JSON log object) its step, most preferred first.
STEP_KEYS = ("step", "global_step", "iter", "iteration", "epoch")
_STEP_RANK: dict[str, int] = {}
for _i, _k in enumerate(STEP_KEYS):
    for _v in (_k, _k.capitalize(), _k.upper()):
        _STEP_RANK[_v] = _i
#: The strings the in-job module writes for non-finite floats (and Python's own spellings).
_NONFINITE = {"NaN": _NAN, "Infinity": _INF, "-Infinity": -_INF, "nan": _NAN, "inf": _INF, "-inf": -_INF}
_LOWER_IS_BETTER = ("loss", "err", "perplexity")


@dataclass(slots=True)
class Point:
    """One metric value at one step. ``t``: the instance's wall time when known (never used for order)."""

    name: str
    step: int | float  # an int whenever the source gave a whole number (exact: int64 steps stay exact)
    value: float
    t: float | None = None


def lower_is_better(name: str) -> bool:
    """Whether a metric's best value is its minimum: names containing "loss", "err" or "perplexity"."""
    n = name.lower()
    return any(w in n for w in _LOWER_IS_BETTER)


def _finite_number(x: Any) -> float | None:
    """``x`` as a finite float if it is a JSON number (not a bool), else None."""
    tx = type(x)
    if tx is float or tx is int:
        try:
            f = float(x)
        except OverflowError:
            return None
        return f if _isfinite(f) else None
    return None


_INT_TEXT = re.compile(r"[-+]?[0-9]+\Z")


def _as_step(x: Any) -> int | float | None:
    """A step from a JSON value: an int stays an int (exact, whatever its size); a float that is a
    whole number becomes that int; another finite float stays a float; anything else is None."""
    tx = type(x)
    if tx is int:
        return x
    if tx is float:
        if not _isfinite(x):
            return None
        return int(x) if x.is_integer() else x
    return None


def _step_text(text: str) -> int | float | None:
    """A step from log text: digits give an exact int, another finite number a float (or the int
    it equals), anything else None."""
    if _INT_TEXT.match(text):
        return int(text)
    try:
        x = float(text)
    except ValueError:
        return None
    return _as_step(x)


# ---- splitting a byte stream into lines -------------------------------------------------
class _Lines:
    """Complete lines from byte chunks; keeps the partial last line between calls.

    A line longer than ``cap`` bytes is kept as its first ``cap + 1`` bytes (the
    rest is dropped as it arrives, so a 10 MB line without a newline costs no
    more than ``cap``): the caller sees ``len(line) > cap`` and uses ``line[:cap]``.
    The result is the same whatever the chunking.
    """

    __slots__ = ("cap", "_buf")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._buf = bytearray()

    def split(self, data: bytes) -> list[bytes]:
        if not data:
            return []
        lines = data.split(b"\n")
        tail = lines.pop()
        if not lines:  # no newline in this chunk
            self._keep(tail)
            return []
        if self._buf:
            room = self.cap + 1 - len(self._buf)
            lines[0] = bytes(self._buf) + lines[0][:max(room, 0)]
            self._buf.clear()
        self._keep(tail)
        return lines

    def flush(self) -> bytes:
        line = bytes(self._buf)
        self._buf.clear()
        return line

    def _keep(self, piece: bytes) -> None:
        room = self.cap + 1 - len(self._buf)
        if room > 0 and piece:
            self._buf += piece[:room]


# ---- the metrics file -------------------------------------------------------------------
def _merge(dst: dict, src: dict) -> None:
    for k, v in src.items():
        old = dst.get(k)
        if type(v) is dict and type(old) is dict:
            _merge(old, v)
        else:
            dst[k] = v


class MetricsFileParser:
    """Parses ``metrics.jsonl`` (see the module docstring) from byte chunks.

    ``feed(data)`` returns the points of the lines completed by ``data``;
    ``flush()`` those of a last line without a newline (call it once the file
    is complete). Also collected: ``config`` (all ``config`` lines merged,
    nested objects merged key by key, later values winning) and ``uses``
    (``(run, path)`` of each ``use`` line, in order).

    Never raises on bad input. Counted in ``warnings`` (and skipped):
    "invalid JSON line" (truncated or garbage), "not a JSON object",
    "unknown line" (none of m/config/use), "line too long" (over ``max_line``
    bytes), "invalid UTF-8" (decoded with replacement characters, then parsed),
    "invalid step" (a step that is not a finite number: the line's metrics are
    dropped), "non-numeric value", "value out of range" (an integer beyond a
    float), "invalid metric name" (empty or over 256 characters), "invalid
    metrics", "invalid config line", "invalid use line", "invalid time" (the
    point gets ``t=None``). Counted but KEPT: "non-finite value" (NaN/±inf
    points, so a diverged loss shows) and "missing step" (the metric's own
    counter 0, 1, 2, … is used).
    """

    def __init__(self, *, max_line: int = 4 << 20) -> None:
        self.config: dict[str, Any] = {}
        self.uses: list[tuple[str, str | None]] = []
        self.checkpoints: list[tuple[str, Any]] = []  # (absolute path on the instance, step)
        self.warnings: Counter = Counter()
        self.lines = 0  # complete non-empty lines seen
        self.max_line = max_line
        self._lines = _Lines(max_line)
        self._auto: dict[str, int] = {}

    def feed(self, data: bytes) -> list[Point]:
        out: list[Point] = []
        for line in self._lines.split(data):
            self._line(line, out)
        return out

    def flush(self) -> list[Point]:
        out: list[Point] = []
        self._line(self._lines.flush(), out)
        return out

    def _line(self, line: bytes, out: list[Point]) -> None:
        if len(line) > self.max_line:
            self.lines += 1
            self.warnings["line too long"] += 1
            return
        line = line.strip()
        if not line:
            return
        self.lines += 1
        if line[:3] == b"\xef\xbb\xbf":  # a BOM
            line = line[3:]
        try:
            text = line.decode()
        except UnicodeDecodeError:
            self.warnings["invalid UTF-8"] += 1
            text = line.decode("utf-8", "replace")
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError):
            self.warnings["invalid JSON line"] += 1
            return
        if type(obj) is not dict:
            self.warnings["not a JSON object"] += 1
            return
        known = False
        m = obj.get("m")
        if m is not None:
            known = True
            self._metrics(obj, m, out)
        c = obj.get("config")
        if c is not None:
            known = True
            if type(c) is dict:
                try:
                    _merge(self.config, c)
                except RecursionError:
                    self.warnings["invalid config line"] += 1
            else:
                self.warnings["invalid config line"] += 1
        u = obj.get("use")
        if u is not None:
            known = True
            run = u.get("run") if type(u) is dict else None
            path = u.get("path") if type(u) is dict else None
            if type(run) is str and run and (path is None or type(path) is str):
                self.uses.append((run, path))
            else:
                self.warnings["invalid use line"] += 1
        ck = obj.get("checkpoint")
        if ck is not None:
            known = True
            path = ck.get("path") if type(ck) is dict else None
            if type(path) is str and path:
                self.checkpoints.append((path, ck.get("step")))
            else:
                self.warnings["invalid checkpoint line"] += 1
        if not known:
            self.warnings["unknown line"] += 1

    def _metrics(self, obj: dict, m: Any, out: list[Point]) -> None:
        w = self.warnings
        if type(m) is not dict:
            w["invalid metrics"] += 1
            return
        t = obj.get("t")
        if t is not None:
            t = _finite_number(t)
            if t is None:
                w["invalid time"] += 1
        s = obj.get("s")
        step: int | float | None = None
        if s is not None:
            step = _as_step(s)
            if step is None:
                w["invalid step"] += 1
                return
        for name, v in m.items():
            tv = type(v)
            if tv is float:
                value = v
                if not _isfinite(value):
                    w["non-finite value"] += 1
            elif tv is int:
                try:
                    value = float(v)
                except OverflowError:
                    w["value out of range"] += 1
                    continue
            elif tv is str and v in _NONFINITE:
                value = _NONFINITE[v]
                w["non-finite value"] += 1
            else:
                w["non-numeric value"] += 1
                continue
            if not name or len(name) > MAX_NAME_LEN:
                w["invalid metric name"] += 1
                continue
            if step is None:
                n = self._auto.get(name, 0)
                self._auto[name] = n + 1
                w["missing step"] += 1
                out.append(Point(name, n, value, t))
            else:
                out.append(Point(name, step, value, t))


# ---- zero-code capture from log text ----------------------------------------------------
_NUMBER = r"[-+]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|(?i:nan|inf(?:inity)?))"
#: The default ``key=value`` / ``key: value`` pattern. A key starts with a letter or
#: ``_`` and may hold dots, slashes and dashes (``val/loss``, ``train.acc``, ``lr-0``);
#: it may be quoted (Python dict reprs: ``{'loss': 0.4}``) and must not be glued to
#: the text before it (``--lr=…``, ``x/y=…``, ``host:…`` and ``?a=1&b=2`` in URLs are not keys). With
#: ``:`` a space must follow (``loss: 0.5``; ``localhost:8080`` is no metric). The value
#: is a number (int, float, scientific, optional sign, nan/inf), optionally quoted,
#: and must end there: ``12:30:01``, ``2024-01-01``, ``1.2.3``, ``10MB``, ``0.5s`` and
#: ``3/10`` are not numbers.
DEFAULT_LOG_PATTERN = (
    r"(?<![\w./\-?&])['\"]?(?P<key>[A-Za-z_][\w./\-]*)['\"]?"
    r"(?:[ \t]*=[ \t]*|[ \t]*:[ \t]+)"
    r"['\"]?(?P<value>" + _NUMBER + r")['\"]?(?![\w.:/\-])"
)
_DEFAULT_RX = re.compile(DEFAULT_LOG_PATTERN, re.ASCII)


class LogMetricParser:
    """Metric points from a run's log text ("zero-code capture"), fed in byte chunks.

    Per line (``\\n`` or ``\\r`` ends one, so each progress-bar redraw counts):

    a. a line that is a JSON object (after stripping) → each numeric top-level
       value (and the strings "NaN"/"Infinity"/"-Infinity") is a metric; other
       values are ignored;
    b. otherwise every match of the pattern (default :data:`DEFAULT_LOG_PATTERN`:
       ``key=value`` and ``key: value`` with a numeric value) is a metric.

    The step is the value of a ``step``/``global_step``/``iter``/``iteration``/
    ``epoch`` key on the same line (that order of preference, any of lower,
    Capitalized or UPPER case; the key used as the step is not itself a metric),
    or the first non-empty ``step`` group of a user pattern; without one, each
    metric's own counter (0, 1, 2, … per name).

    ``pattern``: a project's own regex (``str``) with named groups ``key`` and
    ``value`` and optionally ``step``; checked here: ValueError if it does not
    compile, lacks a group or matches the empty string. Lines that are JSON
    objects are still read as in (a).

    Only the first ``max_line`` bytes (64 KiB) of a line are parsed ("line too
    long (truncated)" is counted). Never raises on bad input; also counted:
    "non-numeric value" (a user pattern's value that is no number), "invalid
    metric name" (empty or over 256 characters), "invalid step"; counted and
    KEPT: "non-finite value".
    """

    def __init__(self, pattern: str | None = None, *, max_line: int = 64 << 10) -> None:
        if pattern is None:
            self._rx = _DEFAULT_RX
            self._ki, self._vi, self._si = 0, 1, -1
            self._default = True
        else:
            if not isinstance(pattern, str):
                raise ValueError(f"metric pattern must be a string, not {type(pattern).__name__}")
            try:
                rx = re.compile(pattern)
            except (re.error, RecursionError, OverflowError) as e:
                raise ValueError(f"metric pattern {pattern!r} does not compile: {e}") from None
            missing = [g for g in ("key", "value") if g not in rx.groupindex]
            if missing:
                raise ValueError(f"metric pattern {pattern!r} needs the named groups (?P<key>…) and (?P<value>…); "
                                 f"missing: {', '.join(missing)}")
            if rx.fullmatch("") is not None:
                raise ValueError(f"metric pattern {pattern!r} matches the empty string")
            self._rx = rx
            self._ki = rx.groupindex["key"] - 1
            self._vi = rx.groupindex["value"] - 1
            self._si = rx.groupindex["step"] - 1 if "step" in rx.groupindex else -1
            self._default = False
        self.pattern = self._rx.pattern
        self.warnings: Counter = Counter()
        self.max_line = max_line
        self._lines = _Lines(max_line)
        self._auto: dict[str, int] = {}

    def feed(self, data: bytes) -> list[Point]:
        out: list[Point] = []
        if b"\r" in data:
            data = data.replace(b"\r", b"\n")
        for line in self._lines.split(data):
            self._line(line, out)
        return out

    def flush(self) -> list[Point]:
        out: list[Point] = []
        self._line(self._lines.flush(), out)
        return out

    def _line(self, line: bytes, out: list[Point]) -> None:
        if len(line) > self.max_line:
            self.warnings["line too long (truncated)"] += 1
            line = line[:self.max_line]
        if self._default and b"=" not in line and b":" not in line:
            return
        text = line.decode("utf-8", "replace")
        s = text.strip()
        if s[:1] == "{" and s[-1:] == "}":
            try:
                obj = json.loads(s)
            except (ValueError, RecursionError):
                obj = None
            if type(obj) is dict:
                self._json(obj, out)
                return
        found = self._rx.findall(text)
        if found:
            self._pairs(found, out)

    def _emit(self, items: list[tuple[str, float]], step: int | float | None, out: list[Point]) -> None:
        w = self.warnings
        auto = self._auto
        for k, x in items:
            if not k or len(k) > MAX_NAME_LEN:
                w["invalid metric name"] += 1
                continue
            if not _isfinite(x):
                w["non-finite value"] += 1
            if step is None:
                n = auto.get(k, 0)
                auto[k] = n + 1
                out.append(Point(k, n, x, None))
            else:
                out.append(Point(k, step, x, None))

    def _pairs(self, found: list, out: list[Point]) -> None:
        ki, vi, si = self._ki, self._vi, self._si
        items: list[tuple[str, float]] = []
        step: int | float | None = None
        rank = 99
        step_at = -1
        for m in found:
            k = m[ki]
            try:
                x = float(m[vi])
            except ValueError:
                self.warnings["non-numeric value"] += 1
                continue
            r = _STEP_RANK.get(k)
            if r is not None:
                if not _isfinite(x):
                    self.warnings["invalid step"] += 1
                    continue
                if r < rank:
                    step, rank, step_at = _step_text(m[vi]), r, len(items)
            items.append((k, x))
        if si >= 0:
            for m in found:
                sv = m[si]
                if sv:
                    x = _step_text(sv)
                    if x is not None:
                        step, step_at = x, -1
                    else:
                        self.warnings["invalid step"] += 1
                    break
        if step_at >= 0:
            del items[step_at]
        self._emit(items, step, out)

    def _json(self, obj: dict, out: list[Point]) -> None:
        step: int | float | None = None
        skey = None
        rank = 99
        for k, v in obj.items():
            r = _STEP_RANK.get(k)
            if r is not None and r < rank:
                x = _as_step(v)
                if x is not None:
                    step, rank, skey = x, r, k
        items: list[tuple[str, float]] = []
        for k, v in obj.items():
            if k == skey:
                continue
            tv = type(v)
            if tv is float or tv is int:
                try:
                    items.append((k, float(v)))
                except OverflowError:
                    self.warnings["value out of range"] += 1
            elif tv is str and v in _NONFINITE:
                items.append((k, _NONFINITE[v]))
        self._emit(items, step, out)


# ---- series -----------------------------------------------------------------------------
def _clamp_mean(mean: float, lo: float, hi: float) -> float:
    """A column's mean kept within its min..max (a sum of huge values may have overflowed)."""
    if mean < lo:
        return lo
    if mean > hi:
        return hi
    if mean != mean:
        mid = lo * 0.5 + hi * 0.5
        return mid if _isfinite(mid) else lo
    return mean


class Series:
    """One metric's points, downsampled incrementally to a fixed number of min/max buckets.

    The step axis is cut into at most ``buckets`` (2,048) buckets of one width,
    a power of two, aligned to multiples of it (bucket ``k`` holds steps in
    ``[k·w, (k+1)·w)``). The width is set when the second distinct step arrives
    (the largest power of two not above the distance between the two first
    steps); when a step falls outside what ``buckets`` buckets can span, buckets
    merge pairwise (the width doubles) as many times as needed: above the range
    or BELOW it (a step smaller than the first one, a negative step) alike, so
    no point is ever clamped or dropped. Memory and the cost of :meth:`view` are
    therefore bounded whatever was appended (1k or 10M points), and a series
    with few points stays small (buckets are allocated as the range grows).

    Each bucket keeps min, max, sum and count of its finite values, and the
    minimum of its positive values (for log-scale views). Steps may come out of
    order or repeat: a point lands in its bucket ("step out of order" is counted
    in ``warnings``). NaN and ±inf values are counted (``nonfinite``,
    ``first_nonfinite_step``) and kept among the recent points and as ``last``,
    but excluded from the buckets (min, max, means). A non-finite step is
    dropped and counted ("non-finite step"); ``len()`` counts the points kept.

    The exact last ``recent`` (4,096) points are kept too, for a zoomed view
    (``view(..., recent=True)``) and :meth:`recent_points`.
    """

    __slots__ = ("buckets", "warnings", "nonfinite", "first_nonfinite_step", "_n", "_w", "_k0", "_s0",
                 "_mn", "_mx", "_sm", "_ct", "_mp", "_rs", "_rv", "_last_step", "_last_value")

    def __init__(self, buckets: int = 2048, recent: int = 4096, warnings: Counter | None = None) -> None:
        if buckets < 4:
            raise ValueError("a Series needs at least 4 buckets")
        self.buckets = buckets
        self.warnings: Counter = warnings if warnings is not None else Counter()
        self.nonfinite = 0
        self.first_nonfinite_step: int | float | None = None
        self._n = 0
        self._w: float | None = None  # bucket width; None until a second distinct step
        self._k0 = 0  # bucket index of _mn[0] (steps [k0·w, (k0+1)·w))
        self._s0: float | None = None  # the first finite point's step
        self._mn: list[float] = []
        self._mx: list[float] = []
        self._sm: list[float] = []
        self._ct: list[int] = []
        self._mp: list[float] = []  # min of positive values
        self._rs: deque[int | float] = deque(maxlen=recent)
        self._rv: deque[float] = deque(maxlen=recent)
        self._last_step = -_INF
        self._last_value = _NAN

    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        return f"<Series {self._n} points, {len(self._mn)} buckets of width {self._w}>"

    # -- appending
    def append(self, step: int | float, value: float) -> None:
        """Add one point: O(1) amortized (a merge of all buckets now and then, ever rarer).

        An int step is kept exact (``last_step``, ``recent_points``, ``first_nonfinite_step``);
        only the bucketing uses it as a float."""
        exact = step
        ts = type(step)
        if ts is not float:
            try:
                step = float(step)
            except (OverflowError, TypeError, ValueError):
                step = _NAN
            if ts is not int:
                exact = step
        if step - step != 0.0:  # NaN or ±inf
            self.warnings["non-finite step"] += 1
            return
        if type(value) is not float:
            try:
                value = float(value)
            except OverflowError:
                value = _INF if value > 0 else -_INF
        self._n += 1
        self._rs.append(exact)
        self._rv.append(value)
        if exact < self._last_step:
            self.warnings["step out of order"] += 1
        self._last_step = exact
        self._last_value = value
        if value - value != 0.0:
            self.nonfinite += 1
            if self.first_nonfinite_step is None:
                self.first_nonfinite_step = exact
            return
        w = self._w
        if w is None:
            if self._s0 is None:
                self._start(step)
            if step == self._s0:
                j = 0
            else:
                self._establish(step)
                j = self._place(step)
        else:
            try:
                k = _floor(step / w)
                if not k and step < 0.0:  # a tiny negative step whose quotient underflowed to -0.0
                    k = -1
                j = k - self._k0
            except OverflowError:
                j = -1
            if j < 0 or j >= len(self._mn):
                j = self._place(step)
        if value < self._mn[j]:
            self._mn[j] = value
        if value > self._mx[j]:
            self._mx[j] = value
        self._sm[j] += value
        self._ct[j] += 1
        if 0.0 < value < self._mp[j]:
            self._mp[j] = value

    def extend(self, steps: Sequence[float], values: Sequence[float]) -> None:
        """Append many points at once (numpy): the same result as appending them in order, much faster."""
        import numpy as np

        raw = np.asarray(steps).ravel()
        s = raw.astype(float)
        v = np.asarray(values, dtype=float).ravel()
        if s.shape != v.shape:
            raise ValueError(f"extend: {s.size} steps but {v.size} values")
        exact = raw if raw.dtype.kind in "iu" else s  # integer steps are kept exact beside the buckets
        ok = np.isfinite(s)
        if not ok.all():
            self.warnings["non-finite step"] += int(s.size - np.count_nonzero(ok))
            s, v, exact = s[ok], v[ok], exact[ok]
        if not s.size:
            return
        self._n += int(s.size)
        r = self._rs.maxlen or 0
        if r:
            self._rs.extend(exact[-r:].tolist())
            self._rv.extend(v[-r:].tolist())
        back = int(np.count_nonzero(s[1:] < s[:-1])) + (1 if exact[0].item() < self._last_step else 0)
        if back:
            self.warnings["step out of order"] += back
        self._last_step = exact[-1].item()
        self._last_value = float(v[-1])
        fin = np.isfinite(v)
        if not fin.all():
            bad = ~fin
            self.nonfinite += int(np.count_nonzero(bad))
            if self.first_nonfinite_step is None:
                self.first_nonfinite_step = exact[bad][0].item()
            s, v = s[fin], v[fin]
        if not s.size:
            return
        if self._w is None:
            if self._s0 is None:
                self._start(float(s[0]))
            same = s == self._s0
            if same.any():
                vs = v[same]
                self._merge_into(0, float(vs.min()), float(vs.max()), float(vs.sum()), int(vs.size),
                                 float(vs[vs > 0].min()) if (vs > 0).any() else _INF)
                s, v = s[~same], v[~same]
            if not s.size:
                return
            self._establish(float(s[0]))
        lo, hi = float(s.min()), float(s.max())
        self._place(lo)
        self._place(hi)
        w, k0 = self._w, self._k0
        assert w is not None
        klo, khi = math.floor(lo / w), math.floor(hi / w)
        if max(abs(klo), abs(khi), abs(k0)) > 2 ** 52:  # beyond exact float integers: go point by point
            for a, b in zip(s.tolist(), v.tolist()):
                self._add_finite(a, b)
            return
        k = np.floor(s / w)
        k[(k == 0) & (s < 0)] = -1  # tiny negative steps whose quotient underflowed to -0.0
        j = (k - float(k0)).astype(np.intp)
        nb = len(self._mn)
        np.clip(j, 0, nb - 1, out=j)
        mn = np.array(self._mn)
        np.minimum.at(mn, j, v)
        mx = np.array(self._mx)
        np.maximum.at(mx, j, v)
        sm = np.array(self._sm) + np.bincount(j, weights=v, minlength=nb)
        ct = np.array(self._ct, dtype=np.int64) + np.bincount(j, minlength=nb)
        mp = np.array(self._mp)
        pos = v > 0
        np.minimum.at(mp, j[pos], v[pos])
        self._mn, self._mx, self._sm, self._ct, self._mp = mn.tolist(), mx.tolist(), sm.tolist(), ct.tolist(), mp.tolist()

    def _add_finite(self, step: float, value: float) -> None:
        if self._w is None and step == self._s0:
            j = 0
        else:
            if self._w is None:
                self._establish(step)
            j = self._place(step)
        self._merge_into(j, value, value, value, 1, value if value > 0 else _INF)

    def _merge_into(self, j: int, mn: float, mx: float, sm: float, ct: int, mp: float) -> None:
        if mn < self._mn[j]:
            self._mn[j] = mn
        if mx > self._mx[j]:
            self._mx[j] = mx
        self._sm[j] += sm
        self._ct[j] += ct
        if mp < self._mp[j]:
            self._mp[j] = mp

    def _start(self, step: float) -> None:
        """The first finite point: one bucket, width still unknown."""
        self._s0 = step
        self._mn, self._mx, self._sm, self._ct, self._mp = [_INF], [-_INF], [0.0], [0], [_INF]

    def _establish(self, step: float) -> None:
        """A second distinct step: the width is the largest power of two ≤ their distance."""
        s0 = self._s0
        assert s0 is not None
        d = abs(step - s0)
        if _isfinite(d):
            w = math.ldexp(1.0, math.frexp(d)[1] - 1)
        else:
            w = math.ldexp(1.0, 1023)
        self._w = w
        k = _floor(s0 / w)
        self._k0 = -1 if not k and s0 < 0.0 else k

    def _place(self, step: float) -> int:
        """The list index of ``step``'s bucket, merging and growing the buckets as needed."""
        w = self._w
        assert w is not None
        lo = self._k0
        hi = lo + len(self._mn) - 1
        B = self.buckets
        m = 0
        while True:
            q = step / math.ldexp(w, m)
            if _isfinite(q):
                k = _floor(q)
                if not k and step < 0.0:
                    k = -1
                if max(hi >> m, k) - min(lo >> m, k) < B:
                    break
            m += 1
        if m:
            self._merge(m)
        k0 = self._k0
        n = len(self._mn)
        if k < k0:
            add = k0 - k
            self._mn[0:0] = [_INF] * add
            self._mx[0:0] = [-_INF] * add
            self._sm[0:0] = [0.0] * add
            self._ct[0:0] = [0] * add
            self._mp[0:0] = [_INF] * add
            self._k0 = k
            return 0
        if k >= k0 + n:
            add = k - k0 - n + 1
            self._mn += [_INF] * add
            self._mx += [-_INF] * add
            self._sm += [0.0] * add
            self._ct += [0] * add
            self._mp += [_INF] * add
        return k - k0

    def _merge(self, m: int) -> None:
        """Merge buckets 2**m at a time (the width grows 2**m-fold)."""
        assert self._w is not None
        k0 = self._k0
        n = len(self._mn)
        nk0 = k0 >> m
        nn = ((k0 + n - 1) >> m) - nk0 + 1
        mn, mx, sm, ct, mp = [_INF] * nn, [-_INF] * nn, [0.0] * nn, [0] * nn, [_INF] * nn
        omn, omx, osm, oct_, omp = self._mn, self._mx, self._sm, self._ct, self._mp
        for j in range(n):
            c = oct_[j]
            if not c:
                continue
            t = ((k0 + j) >> m) - nk0
            if omn[j] < mn[t]:
                mn[t] = omn[j]
            if omx[j] > mx[t]:
                mx[t] = omx[j]
            sm[t] += osm[j]
            ct[t] += c
            if omp[j] < mp[t]:
                mp[t] = omp[j]
        self._mn, self._mx, self._sm, self._ct, self._mp = mn, mx, sm, ct, mp
        self._w = math.ldexp(self._w, m)
        self._k0 = nk0

    # -- reading
    @property
    def bucket_width(self) -> float | None:
        """The width of a bucket in steps (None while every point has had the same step)."""
        return self._w

    @property
    def last(self) -> float:
        """The last value appended, as it came (NaN/inf included); NaN when empty."""
        return self._last_value

    @property
    def last_step(self) -> int | float | None:
        return self._last_step if self._n else None

    @property
    def min(self) -> float:
        """The smallest finite value (NaN when there is none)."""
        v = min(self._mn, default=_INF)
        return v if v != _INF else _NAN

    @property
    def max(self) -> float:
        """The largest finite value (NaN when there is none)."""
        v = max(self._mx, default=-_INF)
        return v if v != -_INF else _NAN

    def recent_points(self) -> tuple[list[float], list[float]]:
        """The last (up to ``recent``) points as appended: steps and values (NaN/inf included)."""
        return list(self._rs), list(self._rv)

    def view(self, width: int, *, log_y: bool = False, smoothing: float = 0.0,
             recent: bool = False) -> tuple[list[float], list[float], list[float]]:
        """The series for a chart ``width`` columns wide: ``(x, y_min, y_max)``.

        Each column aggregates the buckets falling in it (``recent=True``: the
        exact recent points instead, over their own step range); ``x`` is the
        column's centre step, ``y_min``/``y_max`` the min and max of its finite
        values. Columns without values are left out, so there are at most
        ``width`` of each (fewer when the series has fewer buckets). The cost
        depends on ``width`` and ``buckets``, never on the number of points.

        ``log_y``: non-positive values are dropped (``y_min`` is the smallest
        positive value of the column; columns with none are left out); the
        values stay linear, the caller sets the log scale.

        ``smoothing`` (0..0.99, TensorBoard's EMA weight, with its de-biasing):
        the column means are smoothed, and returned as both ``y_min`` and
        ``y_max`` (a single line; call again with 0 for the raw min/max band).
        """
        if width < 1:
            return [], [], []
        if recent:
            cols = self._recent_columns(width, log_y)
        else:
            cols = self._bucket_columns(width, log_y)
        xs, lo, hi, means = cols
        if smoothing and smoothing > 0 and means:
            a = min(float(smoothing), 0.999)
            b = 1.0 - a
            acc = 0.0
            wgt = 1.0
            sm = []
            lo_all, hi_all = min(means), max(means)  # rounding must not take the line outside its values
            for v in means:
                acc = acc * a + b * v
                wgt *= a
                y = acc / (1.0 - wgt)
                sm.append(lo_all if not y >= lo_all else hi_all if y > hi_all else y)
            return xs, sm, list(sm)
        return xs, lo, hi

    def _bucket_columns(self, width: int, log_y: bool):
        mn, mx, sm, ct = self._mn, self._mx, self._sm, self._ct
        low = self._mp if log_y else mn
        n = len(mn)
        xs: list[float] = []
        ylo: list[float] = []
        yhi: list[float] = []
        means: list[float] = []
        if not n:
            return xs, ylo, yhi, means
        w = self._w
        k0 = self._k0
        cols = min(width, n)
        for c in range(cols):
            a = c * n // cols
            b = (c + 1) * n // cols
            if b - a == 1:
                cnt = ct[a]
                if not cnt:
                    continue
                y0, y1, tot = low[a], mx[a], sm[a]
            else:
                cnt = sum(ct[a:b])
                if not cnt:
                    continue
                y0, y1, tot = min(low[a:b]), max(mx[a:b]), sum(sm[a:b])
            if log_y and (y0 == _INF or y1 <= 0.0):
                continue
            mean = _clamp_mean(tot / cnt, y0, y1)
            if w is None:
                x = self._s0
            else:
                try:
                    x = (2 * k0 + a + b) / 2 * w
                except OverflowError:
                    x = _INF if k0 > 0 else -_INF
            xs.append(x)
            ylo.append(y0)
            yhi.append(y1)
            means.append(mean)
        return xs, ylo, yhi, means

    def _recent_columns(self, width: int, log_y: bool):
        pts = [(s, v) for s, v in zip(self._rs, self._rv) if _isfinite(v) and (v > 0.0 or not log_y)]
        xs: list[float] = []
        ylo: list[float] = []
        yhi: list[float] = []
        means: list[float] = []
        if not pts:
            return xs, ylo, yhi, means
        s0 = min(s for s, _ in pts)
        s1 = max(s for s, _ in pts)
        half = not _isfinite(s1 - s0)  # a span beyond a float: work in halves
        span = (s1 * 0.5 - s0 * 0.5) if half else (s1 - s0)
        cols = width if span > 0 else 1
        lo = [_INF] * cols
        hi = [-_INF] * cols
        tot = [0.0] * cols
        cnt = [0] * cols
        for s, v in pts:
            if cols == 1:
                c = 0
            else:
                d = (s * 0.5 - s0 * 0.5) if half else (s - s0)
                c = int(d / span * cols)
                if c >= cols:
                    c = cols - 1
            if v < lo[c]:
                lo[c] = v
            if v > hi[c]:
                hi[c] = v
            tot[c] += v
            cnt[c] += 1
        for c in range(cols):
            if not cnt[c]:
                continue
            if cols == 1:
                x = s0 if span == 0 else s0 + (s1 - s0) * 0.5
            else:
                f = (c + 0.5) / cols
                x = (s0 * 0.5 + span * f) * 2 if half else s0 + span * f
            mean = _clamp_mean(tot[c] / cnt[c], lo[c], hi[c])
            xs.append(x)
            ylo.append(lo[c])
            yhi.append(hi[c])
            means.append(mean)
        return xs, ylo, yhi, means


class RunSeries:
    """All metric series of one run, by name.

    ``ingest(points)`` appends each point to its metric's :class:`Series`
    (created on first sight, whenever in the run that is). At most
    ``max_names`` (20,000) distinct names: points of further new names are
    dropped and counted ("metric name dropped (too many names)"). ``warnings``
    is shared with the series ("step out of order", "non-finite step").
    """

    def __init__(self, *, max_names: int = 20_000, buckets: int = 2048, recent: int = 4096) -> None:
        self.max_names = max_names
        self.buckets = buckets
        self.recent = recent
        self.warnings: Counter = Counter()
        self.points = 0  # points ingested (dropped ones included)
        self.last_t: float | None = None  # the instance's wall time of the latest point that had one
        self._series: dict[str, Series] = {}

    def ingest(self, points: Iterable[Point]) -> int:
        """Append the points; returns how many were kept."""
        get = self._series.get
        kept = 0
        n = 0
        last_t = None
        for p in points:
            n += 1
            s = get(p.name)
            if s is None:
                if len(self._series) >= self.max_names:
                    self.warnings["metric name dropped (too many names)"] += 1
                    continue
                s = self._series[p.name] = Series(self.buckets, self.recent, self.warnings)
            before = s._n
            s.append(p.step, p.value)
            kept += s._n - before
            if p.t is not None:
                last_t = p.t
        self.points += n
        if last_t is not None:
            self.last_t = last_t
        return kept

    def names(self) -> list[str]:
        """Metric names in the order they first appeared."""
        return list(self._series)

    def series(self, name: str) -> Series:
        """The series of ``name`` (KeyError if the run has none)."""
        return self._series[name]

    def get(self, name: str) -> Series | None:
        return self._series.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._series

    def __len__(self) -> int:
        return len(self._series)

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per metric: ``last`` (as it came, NaN included), ``last_step``, ``min``/``max`` (finite
        values; NaN if none), ``best`` (``min`` for names with "loss", "err" or "perplexity", else
        ``max``) and ``count`` (points appended)."""
        out: dict[str, dict[str, Any]] = {}
        for name, s in self._series.items():
            lo, hi = s.min, s.max
            out[name] = {"last": s.last, "last_step": s.last_step, "min": lo, "max": hi,
                         "best": lo if lower_is_better(name) else hi, "count": len(s)}
        return out


class SkewEstimator:
    """How far an instance's clock is from ours, from ``(remote time, local receive time)`` pairs.

    ``offset`` is the smallest ``local − remote`` over the last ``window``
    pairs: the clock offset plus the quickest delivery seen (the two cannot be
    told apart without a round trip). ``to_local(t)`` maps an instance time onto
    the local clock that way, and ``delay(remote, local)`` is how much later than
    the quickest delivery a point arrived — a lower bound of its real latency,
    which is what a "metrics are N s behind" display needs. None until a pair.
    """

    __slots__ = ("_d",)

    def __init__(self, window: int = 64) -> None:
        self._d: deque[float] = deque(maxlen=window)

    def add(self, remote_t: float, local_t: float) -> None:
        d = local_t - remote_t
        if _isfinite(d):
            self._d.append(d)

    @property
    def offset(self) -> float | None:
        return min(self._d) if self._d else None

    def to_local(self, remote_t: float) -> float:
        off = self.offset
        return remote_t + off if off is not None else remote_t

    def delay(self, remote_t: float, local_t: float) -> float | None:
        off = self.offset
        return None if off is None else max(0.0, local_t - remote_t - off)
