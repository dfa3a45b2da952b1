"""The run filter language: ``user:alice lr>1e-3 tag:best state:succeeded metric.val_loss<0.3``.

Grammar (keywords are case-insensitive; ``OR`` binds loosest, ``NOT`` tightest)::

    query   := [or_expr]                      -- empty text matches every run
    or_expr := and_expr (("OR" | "|" | "||") and_expr)*
    and_expr:= unary (["AND"] unary)*         -- terms side by side are ANDed
    unary   := ("NOT" | "-" | "!") unary | atom
    atom    := "(" or_expr ")" | term

Terms:

* ``field:value`` matches text. ``user:`` ``state:`` ``instance:`` ``provider:`` are equality,
  ``name:`` ``cmd:`` ``note:`` substring, ``tag:`` "has that tag" (its own ``Run.tags``, or a "tag"
  annotation that its author has not taken off again), ``id:`` an id prefix or the
  8-character suffix shown in tables, ``commit:`` a commit prefix. All case-insensitive; ``*`` and
  ``?`` are wildcards. ``state:active`` (queued, syncing, running) and ``state:finished`` (final
  states) group states. ``ancestors:RUN`` / ``descendants:RUN`` follow lineage (``Run.parent`` and
  ``Edge`` records) transitively; RUN is an id, an id prefix, the 8-character suffix or a name.
  ``field=value`` means the same as ``field:value`` and ``field!=value`` its negation.
* ``name OP value`` with OP one of ``> >= < <= = == !=`` compares: a parameter (``lr>1e-3``;
  ``params.optimizer.lr`` walks nested dicts, ``params.NAME`` reaches a parameter whose name is
  taken), ``metric.NAME`` (the summary's ``last``; ``metric.NAME.min`` / ``.max`` / ``.best`` /
  ``.last`` / ``.count`` / ``.step``), ``cost`` (dollars, ``$5`` too), ``duration`` (seconds, or
  ``90s`` ``30m`` ``2h`` ``1d`` ``1w`` ``1h30m``), ``gpus`` (count), ``created`` / ``started`` /
  ``ended`` (ISO dates or times, UTC unless an offset is given; a bare date means the whole day:
  ``created>2026-11-01`` is from Nov 2 on). A parameter compared with ``=``/``!=`` against text
  compares text (``optimizer=adam``); spaces around OP are allowed. A run lacking the field
  never matches the comparison (so ``NOT`` of it does).
* a bare word (no operator) is a case-insensitive substring of the name, command, id suffix or user.

Values with spaces go in quotes, ``"like this"`` or ``'like this'`` (backslash escapes a quote);
a quoted bare word is a bare word even when it reads like a keyword (``"or"``) or an operator.

Errors are :class:`FilterError` with a 0-based ``position``; ``err.render(text)`` draws a caret.

API: :func:`parse` gives a :class:`Query` (an immutable AST: ``str(q)`` is canonical text and
``parse(str(q)) == q``); ``q.matches(run, ctx)`` / ``q.predicate(ctx)`` test runs against a
:class:`QueryContext` (runs, annotations and edges, with lazily built indexes cached in it);
:func:`filter_runs` does it all in one call.
"""

from __future__ import annotations

import math
import operator
import re
import unicodedata
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from typing import Any, Callable, ClassVar, Iterable, Mapping

from . import clock
from .errors import LabdeckError
from .models import FINAL_STATES, Annotation, Edge, Run, RunState

__all__ = ["FilterError", "Query", "All", "And", "Or", "Not", "Field", "Compare", "Bare", "QueryContext", "parse",
           "filter_runs", "FIELDS", "METRIC_AGGREGATES"]

Predicate = Callable[[Run], bool]


# ---- errors -----------------------------------------------------------------------------------
class FilterError(LabdeckError, ValueError):
    """A filter that cannot be parsed or resolved. ``position`` is 0-based; ``reason`` is the message
    without the column; ``str(err)`` adds "at column N" (1-based)."""

    def __init__(self, message: str, position: int, hint: str = "") -> None:
        self.reason = message
        self.position = max(0, int(position))
        super().__init__(f"{message} at column {self.position + 1}", hint)

    def render(self, text: str) -> str:
        """Two lines: the filter text, and a caret under ``position`` followed by the reason."""
        shown = "".join(" " if c.isspace() else ("?" if unicodedata.category(c)[0] == "C" else c) for c in text)
        pad = sum(_cell_width(c) for c in shown[:self.position])
        return f"{shown}\n{' ' * pad}^ {self.reason}"


def _cell_width(c: str) -> int:
    if unicodedata.combining(c):
        return 0
    return 2 if unicodedata.east_asian_width(c) in ("W", "F") else 1


# ---- vocabulary -------------------------------------------------------------------------------
FIELDS = ("user", "state", "instance", "provider", "name", "tag", "id", "commit", "cmd", "note", "ancestors",
          "descendants")
_FIELD_ALIASES = {**{f: f for f in FIELDS}, "tags": "tag", "command": "cmd", "notes": "note", "status": "state",
                  "ancestor": "ancestors", "descendant": "descendants"}
_BUILTINS = ("cost", "duration", "gpus", "created", "started", "ended")
METRIC_AGGREGATES = ("last", "min", "max", "best", "count", "step")
_AGG_KEY = {"step": "last_step"}
_KEYWORDS = {"or": "OR", "and": "AND", "not": "NOT"}
_OPS = (">=", "<=", "==", "!=", ">", "<", "=")
_OP_FUNCS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le, "=": operator.eq,
             "!=": operator.ne}
_STATE_GROUPS = {"active": frozenset(s.value for s in RunState if s.is_active),
                 "finished": frozenset(s.value for s in FINAL_STATES)}
_STATES = frozenset(s.value for s in RunState) | frozenset(_STATE_GROUPS)
_DURATION_UNITS = {"ms": 0.001, "s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1, "m": 60, "min": 60,
                   "mins": 60, "minute": 60, "minutes": 60, "h": 3600, "hr": 3600, "hrs": 3600, "hour": 3600,
                   "hours": 3600, "d": 86400, "day": 86400, "days": 86400, "w": 604800, "wk": 604800,
                   "week": 604800, "weeks": 604800}
_MAX_DEPTH = 100  # nested parentheses and NOTs

_NUMBER_RX = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_DURATION_PART_RX = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)([^0-9.]*)")
_SAFE_WORD_RX = re.compile(r"[\w.@#%+,~/*?][\w.@#%+,~/*?\-]*")  # a bare word shown without quotes
_SAFE_VALUE_RX = re.compile(r"[^\s()|\"'<>=!][^\s()|]*")  # a value shown without quotes


# ---- the AST ------------------------------------------------------------------------------------
class Query:
    """A parsed filter. Immutable and hashable; equality ignores source positions."""

    PREC: ClassVar[int] = 4  # OR 1, AND 2, NOT 3, terms 4: a child of lower precedence gets parentheses

    def matches(self, run: Run, ctx: "QueryContext") -> bool:
        """Does ``run`` match? Raises FilterError if a lineage term names no run in ``ctx``."""
        return self.predicate(ctx)(run)

    def predicate(self, ctx: "QueryContext") -> Predicate:
        """A fast ``run -> bool`` for this query and context, compiled once and cached in ``ctx``."""
        hit = ctx._compiled.get(id(self))
        if hit is None or hit[0] is not self:
            if len(ctx._compiled) >= 64:  # a long-lived context fed a new query on each keystroke
                ctx._compiled.clear()
            hit = ctx._compiled[id(self)] = (self, self._compile(ctx))
        return hit[1]

    def _compile(self, ctx: "QueryContext") -> Predicate:
        """Each node type compiles itself; the base class has nothing to match."""
        raise TypeError(f"{type(self).__name__} is an abstract query node")

    def _child(self, q: "Query", prec: int) -> str:
        return f"({q})" if q.PREC < prec else str(q)


@dataclass(frozen=True)
class All(Query):
    """The empty filter: every run matches."""

    def __str__(self) -> str:
        return ""

    def _compile(self, ctx: "QueryContext") -> Predicate:
        return lambda run: True


def _flatten(cls: type, items: Iterable[Query]) -> tuple[Query, ...]:
    out: list[Query] = []
    for q in items:
        out.extend(q.items if isinstance(q, cls) else (q,))  # type: ignore[attr-defined]
    if len(out) < 2:
        raise ValueError(f"{cls.__name__} needs at least two terms")
    return tuple(out)


@dataclass(frozen=True)
class And(Query):
    """Every item matches. Nested Ands are flattened on construction."""

    items: tuple[Query, ...]
    PREC: ClassVar[int] = 2

    def __post_init__(self) -> None:
        object.__setattr__(self, "items", _flatten(And, self.items))

    def __str__(self) -> str:
        return " ".join(self._child(q, 3) for q in self.items)

    def _compile(self, ctx: "QueryContext") -> Predicate:
        preds = tuple(q._compile(ctx) for q in self.items)
        if len(preds) == 2:
            a, b = preds
            return lambda run: a(run) and b(run)
        if len(preds) == 3:
            a, b, c = preds
            return lambda run: a(run) and b(run) and c(run)

        def every(run: Run) -> bool:
            for p in preds:
                if not p(run):
                    return False
            return True
        return every


@dataclass(frozen=True)
class Or(Query):
    """Any item matches. Nested Ors are flattened on construction."""

    items: tuple[Query, ...]
    PREC: ClassVar[int] = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "items", _flatten(Or, self.items))

    def __str__(self) -> str:
        return " OR ".join(self._child(q, 2) for q in self.items)

    def _compile(self, ctx: "QueryContext") -> Predicate:
        preds = tuple(q._compile(ctx) for q in self.items)
        if len(preds) == 2:
            a, b = preds
            return lambda run: a(run) or b(run)

        def any_(run: Run) -> bool:
            for p in preds:
                if p(run):
                    return True
            return False
        return any_


@dataclass(frozen=True)
class Not(Query):
    item: Query
    PREC: ClassVar[int] = 3

    def __str__(self) -> str:
        return "-" + self._child(self.item, 3)

    def _compile(self, ctx: "QueryContext") -> Predicate:
        p = self.item._compile(ctx)
        return lambda run: not p(run)


@dataclass(frozen=True)
class Field(Query):
    """``field:value``: ``field`` is one of FIELDS (canonical name)."""

    field: str
    value: str
    pos: int = field(default=-1, compare=False, repr=False)  # where the value starts in the source

    def __post_init__(self) -> None:
        if self.field not in FIELDS:
            raise ValueError(f"unknown field {self.field!r}")

    def __str__(self) -> str:
        return f"{self.field}:{_quote_value(self.value)}"

    def _compile(self, ctx: "QueryContext") -> Predicate:
        f, v = self.field, self.value
        if f == "user":
            m = _text_matcher(v, "eq")
            return lambda run: m(run.user)
        if f == "state":
            group = _STATE_GROUPS.get(v.lower())
            if group is not None:
                return lambda run: run.state in group
            m = _text_matcher(v, "eq")
            return lambda run: m(run.state)
        if f == "instance":
            m = _text_matcher(v, "eq")
            return lambda run: m(run.instance)
        if f == "provider":
            m = _text_matcher(v, "eq")
            return lambda run: (m(str(run.instance_info.get("provider") or ""))
                                or m(str(run.instance_info.get("provider_type") or "")))
        if f == "name":
            m = _text_matcher(v, "sub")
            return lambda run: m(run.name)
        if f == "cmd":
            m = _text_matcher(v, "sub")
            return lambda run: m(run.command)
        if f == "commit":
            m = _text_matcher(v, "prefix")
            return lambda run: bool(run.code.get("commit")) and m(str(run.code["commit"]))
        if f == "id":
            low = v.lower()
            return lambda run: run.id.lower().startswith(low) or run.id[-8:].lower() == low
        if f == "tag":
            tags_of = ctx.tags_of
            t = _norm_tag(v)
            if _has_glob(t):
                m = _text_matcher(t, "eq")
                return lambda run: any(m(x) for x in tags_of(run))
            annotated = ctx.annotations

            def has_tag(run: Run) -> bool:
                if run.id in annotated:
                    return t in tags_of(run)
                for x in run.tags:  # no annotations: the run's own tags, without building a set
                    if x == t or (t in x.lower() and _norm_tag(x) == t):
                        return True
                return False
            return has_tag
        if f == "note":
            notes_of = ctx._notes_text
            m = _text_matcher(v, "sub")

            def note(run: Run) -> bool:
                text = notes_of(run)
                return bool(text) and m(text)
            return note
        # ancestors / descendants
        try:
            ids = ctx.ancestors(v) if f == "ancestors" else ctx.descendants(v)
        except FilterError as e:
            raise FilterError(f"{e.reason} in {f}:{_quote_value(v)}", self.pos if self.pos >= 0 else 0,
                              e.hint) from None
        return lambda run: run.id in ids


@dataclass(frozen=True)
class Compare(Query):
    """``name OP value``. ``target`` is "param", "metric" or one of cost/duration/gpus/created/started/ended;
    ``name`` is the parameter path or metric name ("" otherwise); ``agg`` the metric aggregate ("" otherwise);
    ``op`` one of > >= < <= = !=. ``value`` is a float, a str (params with = / != only), a ``date`` (a whole
    UTC day) or an aware UTC ``datetime``."""

    target: str
    name: str
    agg: str
    op: str
    value: Any
    pos: int = field(default=-1, compare=False, repr=False)

    def __str__(self) -> str:
        key = self._key()
        # "a!" then "=" would read as "a" "!="
        return f"{key}{' ' if key.endswith('!') else ''}{self.op}{self._value_text()}"

    def _key(self) -> str:
        if self.target == "metric":
            name = self.name
            tail = name.rsplit(".", 1)[1].lower() if "." in name else ""
            # ".last" is the default and left out, unless the name itself ends in an aggregate's word
            if self.agg == "last" and tail not in METRIC_AGGREGATES:
                return f"metric.{name}"
            return f"metric.{name}.{self.agg}"
        if self.target == "param":
            return self.name if _plain_param_name(self.name) else f"params.{self.name}"
        return self.target

    def _value_text(self) -> str:
        v = self.value
        if isinstance(v, str):
            return _quote_value(v) if not _NUMBER_RX.fullmatch(v) else _quote(v)
        if isinstance(v, datetime):
            return v.isoformat().replace("+00:00", "Z")
        if isinstance(v, date):
            return v.isoformat()
        if self.target == "duration":
            return _fmt_duration(v)
        return _fmt_number(v)

    def _compile(self, ctx: "QueryContext") -> Predicate:
        opf = _OP_FUNCS[self.op]
        v = self.value
        t = self.target
        if t == "param":
            name = self.name
            if isinstance(v, str):
                m = _text_matcher(v, "eq")
                neg = self.op == "!="

                def text_param(run: Run) -> bool:
                    x = _param(run.params, name)
                    if x is _MISSING or not isinstance(x, (str, bool, int, float)) and x is not None:
                        return False
                    s = "true" if x is True else "false" if x is False else "none" if x is None else str(x)
                    return m(s) != neg
                return text_param

            def num_param(run: Run) -> bool:
                x = _param(run.params, name)
                if x.__class__ is not float and x.__class__ is not int:
                    x = _as_number(x)
                    if x is None:
                        return False
                return opf(x, v) if x == x else False
            return num_param
        if t == "metric":
            name, key = self.name, _AGG_KEY.get(self.agg, self.agg)

            def metric(run: Run) -> bool:
                s = run.metrics_summary.get(name)
                if s is None:
                    return False
                x = s.get(key)
                if x.__class__ is not float and x.__class__ is not int:
                    x = _as_number(x)
                    if x is None:
                        return False
                return opf(x, v) if x == x else False
            return metric
        if t == "cost":
            dur = ctx._duration

            def cost(run: Run) -> bool:
                d = dur(run)
                return opf(run.price_per_hour * (d or 0.0) / 3600.0, v)
            return cost
        if t == "duration":
            dur = ctx._duration

            def duration(run: Run) -> bool:
                d = dur(run)
                return d is not None and opf(d, v)
            return duration
        if t == "gpus":
            gpus = ctx._gpus

            def gpu_count(run: Run) -> bool:
                n = gpus(run)
                return n is not None and opf(n, v)
            return gpu_count
        # created / started / ended
        time_of = ctx._time_getter(t)
        if isinstance(v, datetime):
            def moment(run: Run) -> bool:
                x = time_of(run)
                return x is not None and opf(x, v)
            return moment

        def day(run: Run) -> bool:
            x = time_of(run)
            return x is not None and opf(x.date(), v)
        return day


@dataclass(frozen=True)
class Bare(Query):
    """A bare word: case-insensitive substring of the run's name, command, id suffix or user."""

    text: str

    def __str__(self) -> str:
        t = self.text
        return t if _SAFE_WORD_RX.fullmatch(t) and t.lower() not in _KEYWORDS else _quote(t)

    def _compile(self, ctx: "QueryContext") -> Predicate:
        hay = ctx._haystack
        if _has_glob(self.text):
            m = _text_matcher(self.text, "sub")
            return lambda run: m(hay(run))
        low = self.text.lower()
        return lambda run: low in hay(run)


# ---- rendering helpers ------------------------------------------------------------------------
def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _quote_value(s: str) -> str:
    return s if _SAFE_VALUE_RX.fullmatch(s) else _quote(s)


def _plain_param_name(name: str) -> bool:
    low = name.lower()
    return not (low in _FIELD_ALIASES or low in _BUILTINS or name[:1] in "-!\"'"
                or low.startswith(("metric.", "metrics.", "params.", "param.")) or low in ("metric", "metrics"))


def _fmt_number(x: float) -> str:
    if x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    return repr(float(x))


def _fmt_duration(sec: float) -> str:
    if not sec.is_integer() or sec <= 0 or sec >= 1e12:
        return _fmt_number(sec)
    rest, out = int(sec), []
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        n, rest = divmod(rest, size)
        if n:
            out.append(f"{n}{unit}")
    return "".join(out)


# ---- matching helpers -------------------------------------------------------------------------
_MISSING = object()


def _param(params: Mapping[str, Any], name: str) -> Any:
    """``params[name]``, else the nested walk ``params[a][b]...`` for a dotted name; _MISSING if neither."""
    x = params.get(name, _MISSING)
    if x is _MISSING and "." in name:
        x = params
        for part in name.split("."):
            if not isinstance(x, Mapping):
                return _MISSING
            x = x.get(part, _MISSING)
            if x is _MISSING:
                return _MISSING
    return x


def _as_number(x: Any) -> float | None:
    """A stored value as a number: ints and floats (not bools), and numeric strings ("1e-3")."""
    if isinstance(x, bool) or x is None or x is _MISSING:
        return None
    if isinstance(x, (int, float)):
        return x
    if isinstance(x, str):
        try:
            return float(x)
        except ValueError:
            return None
    return None


def _has_glob(s: str) -> bool:
    return "*" in s or "?" in s


def _text_matcher(value: str, mode: str) -> Callable[[str], bool]:
    """Case-insensitive ``eq`` / ``sub`` (substring) / ``prefix`` match of ``value``; ``*`` and ``?`` are wildcards."""
    low = value.lower()
    if _has_glob(low):
        # a wildcard never spans the \x00 that separates the fields of a bare word's haystack
        body = "".join("[^\x00]*" if c == "*" else "[^\x00]" if c == "?" else re.escape(c) for c in low)
        rx = re.compile({"eq": f"{body}\\Z", "sub": body, "prefix": body}[mode], re.IGNORECASE | re.DOTALL)
        match = rx.search if mode == "sub" else rx.match
        return lambda s: match(s) is not None
    if mode == "eq":
        return lambda s: s.lower() == low
    if mode == "sub":
        return lambda s: low in s.lower()
    return lambda s: s.lower().startswith(low)


def _norm_tag(t: str) -> str:
    return t.strip().lstrip("#").lower()


_GPU_COUNT_RX = re.compile(r"([0-9]+)\s*[×x]", re.ASCII)


def _gpu_count(run: Run) -> float | None:
    """GPUs of the run's instance: ``instance_info`` "gpu_count", or "gpus" as a number, a list, or the summary
    text ("2× NVIDIA A100 80GB, 1× T4"; text without counts, such as "none", is 0). None if not recorded."""
    info = run.instance_info
    for key in ("gpu_count", "gpus"):
        v = info.get(key)
        if v is None or isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            return float(v)
        if isinstance(v, (list, tuple)):
            return float(len(v))
        if isinstance(v, str) and v.strip():
            return float(sum(int(n) for n in _GPU_COUNT_RX.findall(v)))
    return None


def _to_utc(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        t = datetime.fromisoformat(value)
        return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)
    except (ValueError, TypeError, OverflowError):  # (an offset that takes it past year 1 or 9999)
        return None


# ---- the context ------------------------------------------------------------------------------
@dataclass(eq=False)
class QueryContext:
    """What a query is matched against, beyond the run itself: all runs (for lineage and run references),
    annotations by run id (tags and notes; a flat list is grouped), lineage edges, and ``now`` (for
    durations and costs of runs still going; default: the time of first use). Indexes are built on first
    use and cached here: make a new context when the data changes."""

    runs: dict[str, Run] = field(default_factory=dict)
    annotations: dict[str, list[Annotation]] = field(default_factory=dict)
    edges: list[Edge] = field(default_factory=list)
    now: datetime | None = None
    _compiled: dict[int, tuple[Query, Predicate]] = field(default_factory=dict, init=False, repr=False)
    _tags: dict[str, frozenset[str]] = field(default_factory=dict, init=False, repr=False)
    _notes: dict[str, str] = field(default_factory=dict, init=False, repr=False)
    _hay: dict[str, str] = field(default_factory=dict, init=False, repr=False)
    _times: dict[str, dict[str, datetime | None]] = field(default_factory=dict, init=False, repr=False)
    _gpu: dict[str, float | None] = field(default_factory=dict, init=False, repr=False)
    _parents: dict[str, set[str]] | None = field(default=None, init=False, repr=False)
    _children: dict[str, set[str]] | None = field(default=None, init=False, repr=False)
    _lineage: dict[tuple[str, str], frozenset[str]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.runs, Mapping):
            self.runs = {r.id: r for r in self.runs}
        if not isinstance(self.annotations, Mapping):
            grouped: dict[str, list[Annotation]] = {}
            for a in self.annotations:
                grouped.setdefault(a.run_id, []).append(a)
            self.annotations = grouped
        self.edges = list(self.edges or ())

    def current_time(self) -> datetime:
        if self.now is None:
            self.now = clock.now()
        elif self.now.tzinfo is None:
            self.now = self.now.replace(tzinfo=timezone.utc)
        return self.now

    # tags and notes
    def tags_of(self, run: Run) -> frozenset[str]:
        """The run's tags (:func:`backends.lineage.tags_of`), lowercased for matching."""
        tags = self._tags.get(run.id)
        if tags is None:
            from .lineage import tags_of

            tags = frozenset(_norm_tag(t) for t in tags_of(self.annotations.get(run.id) or [], run.tags))
            self._tags[run.id] = tags
        return tags

    def notes_of(self, run: Run) -> list[str]:
        """Texts of the run's notes (not removed), oldest first."""
        anns = self.annotations.get(run.id) or ()
        notes = [a for a in anns if a.kind == "note" and not a.removed]
        return [a.text for a in sorted(notes, key=lambda a: (a.created_at or "", a.id))]

    def _notes_text(self, run: Run) -> str:
        text = self._notes.get(run.id)
        if text is None:
            text = self._notes[run.id] = "\x00".join(self.notes_of(run)) if run.id in self.annotations else ""
        return text

    def _haystack(self, run: Run) -> str:
        hay = self._hay.get(run.id)
        if hay is None:
            hay = self._hay[run.id] = f"{run.name}\x00{run.command}\x00{run.id[-8:]}\x00{run.user}".lower()
        return hay

    # times, durations, GPUs
    def _time_getter(self, which: str) -> Callable[[Run], datetime | None]:
        attr = {"created": "created_at", "started": "started_at", "ended": "ended_at"}[which]
        cache = self._times.setdefault(attr, {})

        def get(run: Run) -> datetime | None:
            try:
                return cache[run.id]
            except KeyError:
                t = cache[run.id] = _to_utc(getattr(run, attr))
                return t
        return get

    def _duration(self, run: Run) -> float | None:
        start = self._time_getter("started")(run)
        if start is None:
            return None
        end = self._time_getter("ended")(run) or self.current_time()
        return max(0.0, (end - start).total_seconds())

    def _gpus(self, run: Run) -> float | None:
        try:
            return self._gpu[run.id]
        except KeyError:
            n = self._gpu[run.id] = _gpu_count(run)
            return n

    # lineage
    def _graph(self) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
        if self._parents is None or self._children is None:
            parents: dict[str, set[str]] = {}
            children: dict[str, set[str]] = {}
            pairs = [(r.parent, r.id) for r in self.runs.values() if r.parent]
            pairs += [(e.parent, e.child) for e in self.edges]
            for p, c in pairs:
                parents.setdefault(c, set()).add(p)
                children.setdefault(p, set()).add(c)
            self._parents, self._children = parents, children
        return self._parents, self._children

    def resolve(self, ref: str) -> list[str]:
        """Ids of the runs ``ref`` names: an exact id, the 8-character suffix, a name (every run of that name),
        or a unique id prefix. FilterError (position 0) if none or if an id prefix is ambiguous."""
        low = ref.lower()
        for rid in self.runs:
            if rid.lower() == low:
                return [rid]
        found = [rid for rid in self.runs if rid[-8:].lower() == low]
        if not found:
            found = [rid for rid, r in self.runs.items() if r.name and r.name.lower() == low]
        if not found:
            found = [rid for rid in self.runs if rid.lower().startswith(low)]
            if len(found) > 1:
                raise FilterError(f"{ref!r} is the start of {len(found)} run ids", 0, "Give more of the id.")
        if not found:
            raise FilterError(f"no run {ref!r}", 0, "Give a run id, an id prefix, its last 8 characters or its name.")
        return found

    def ancestors(self, ref: str) -> frozenset[str]:
        """Ids of the runs ``ref`` derives from, transitively (through ``Run.parent`` and edges)."""
        return self._walk(ref, up=True)

    def descendants(self, ref: str) -> frozenset[str]:
        """Ids of the runs derived from ``ref``, transitively."""
        return self._walk(ref, up=False)

    def _walk(self, ref: str, *, up: bool) -> frozenset[str]:
        key = ("up" if up else "down", ref.lower())
        hit = self._lineage.get(key)
        if hit is None:
            parents, children = self._graph()
            graph = parents if up else children
            seen: set[str] = set()
            for start in self.resolve(ref):
                stack = list(graph.get(start, ()))
                while stack:
                    n = stack.pop()
                    if n not in seen:
                        seen.add(n)
                        stack.extend(graph.get(n, ()))
            hit = self._lineage[key] = frozenset(seen)
        return hit


# ---- the lexer --------------------------------------------------------------------------------
@dataclass
class _Tok:
    kind: str  # "(" ")" OR AND NOT TERM EOF
    pos: int
    text: str = ""
    term: Query | None = None


class _Lexer:
    def __init__(self, text: str) -> None:
        self.s = text
        self.n = len(text)

    def tokens(self) -> list[_Tok]:
        s, n, i = self.s, self.n, 0
        out: list[_Tok] = []
        while True:
            while i < n and s[i].isspace():
                i += 1
            if i >= n:
                out.append(_Tok("EOF", n))
                return out
            c = s[i]
            if c in "()":
                out.append(_Tok(c, i, c))
                i += 1
            elif c == "|":
                j = i + 2 if s.startswith("||", i) else i + 1
                out.append(_Tok("OR", i, s[i:j]))
                i = j
            elif c in "-!":
                out.append(_Tok("NOT", i, c))
                i += 1
            elif c in "\"'":
                text, j = self._quoted(i)
                self._need_delimiter(j)
                if not text:
                    raise FilterError("empty quotes", i)
                out.append(_Tok("TERM", i, s[i:j], Bare(text)))
                i = j
            else:
                tok, i = self._word(i)
                out.append(tok)

    def _is_delim(self, j: int) -> bool:
        return j >= self.n or self.s[j].isspace() or self.s[j] in "()|"

    def _need_delimiter(self, j: int) -> None:
        if not self._is_delim(j):
            raise FilterError(f"unexpected {self.s[j]!r} after the closing quote (a space is missing?)", j)

    def _quoted(self, i: int) -> tuple[str, int]:
        s, n, q = self.s, self.n, self.s[i]
        buf: list[str] = []
        j = i + 1
        while j < n:
            c = s[j]
            if c == "\\" and j + 1 < n:
                buf.append(s[j + 1])
                j += 2
                continue
            if c == q:
                return "".join(buf), j + 1
            buf.append(c)
            j += 1
        raise FilterError("unterminated quote", i, f"Close it with {q}.")

    def _op_at(self, j: int) -> str | None:
        for op in _OPS:
            if self.s.startswith(op, j):
                return op
        return None

    def _value(self, k: int, after: str) -> tuple[str, int, bool]:
        """The value starting at ``k``: (text, end, quoted). Error if empty."""
        s, n = self.s, self.n
        if k < n and s[k] in "\"'":
            text, end = self._quoted(k)
            self._need_delimiter(end)
            if not text:
                raise FilterError(f"expected a value after {after!r}", k)
            return text, end, True
        j = k
        while j < n and not (s[j].isspace() or s[j] in "()|"):
            j += 1
        if j == k:
            raise FilterError(f"expected a value after {after!r}", k)
        return s[k:j], j, False

    def _word(self, i: int) -> tuple[_Tok, int]:
        s, n = self.s, self.n
        j = i
        while j < n:
            c = s[j]
            if c.isspace() or c in "()|:<>=" or (c == "!" and s.startswith("!=", j)):
                break
            j += 1
        key = s[i:j]
        if j < n and s[j] == ":":
            if not key:
                raise FilterError("expected a field name before ':'", i)
            fname = _FIELD_ALIASES.get(key.lower())
            if fname is None:
                raise self._unknown_field(key, i)
            value, end, _ = self._value(j + 1, f"{key}:")
            return _Tok("TERM", i, s[i:end], self._field(fname, value, j + 1)), end
        op = self._op_at(j) if j < n else None
        op_pos = j
        if op is None:
            if key.lower() in _KEYWORDS:
                return _Tok(_KEYWORDS[key.lower()], i, key), j
            m = j
            while m < n and s[m].isspace():
                m += 1
            op = self._op_at(m) if m < n else None
            if op is None:
                return _Tok("TERM", i, key, Bare(key)), j
            op_pos = m
        if not key:
            raise FilterError(f"expected a field or parameter name before {op!r}", op_pos)
        k = op_pos + len(op)
        while k < n and s[k].isspace():
            k += 1
        value, end, quoted = self._value(k, op)
        return _Tok("TERM", i, s[i:end], self._compare(key, i, op, value, k, quoted)), end

    def _unknown_field(self, key: str, pos: int) -> FilterError:
        low = key.lower()
        if low in _BUILTINS or low.startswith(("metric.", "metrics.", "params.", "param.")):
            return FilterError(f"{key!r} is compared, not matched with ':'", pos,
                               f"Write {key}=VALUE, {key}>VALUE or {key}<VALUE.")
        return FilterError(f"unknown field {key!r}", pos,
                           f"Fields: {', '.join(FIELDS)}. A parameter or metric is compared: {key}=VALUE, "
                           f"metric.NAME<VALUE.")

    def _field(self, fname: str, value: str, pos: int) -> Query:
        if fname == "state" and not _has_glob(value) and value.lower() not in _STATES:
            raise FilterError(f"unknown state {value!r}", pos, f"States: {', '.join(sorted(_STATES))}.")
        return Field(fname, value, pos)

    def _compare(self, key: str, kpos: int, op: str, text: str, vpos: int, quoted: bool) -> Query:
        op = "=" if op == "==" else op
        low = key.lower()
        if low in _FIELD_ALIASES:
            fname = _FIELD_ALIASES[low]
            if op not in ("=", "!="):
                raise FilterError(f"{key!r} is text: {op!r} does not apply", kpos + len(key),
                                  f"Write {key}:VALUE (or params.{key}{op}VALUE for a parameter of that name).")
            term = self._field(fname, text, vpos)
            return Not(term) if op == "!=" else term
        if low in _BUILTINS:
            if low == "duration":
                value: Any = _parse_duration(text, vpos, op)
            elif low in ("created", "started", "ended"):
                value = _parse_when(text, vpos, op)
            else:
                value = _parse_number(text[1:] if low == "cost" and text.startswith("$") else text, vpos, op)
            return Compare(low, "", "", op, value, vpos)
        if low.startswith(("metric.", "metrics.")):
            rest = key.split(".", 1)[1]
            name, agg = rest, "last"
            if "." in rest:
                head, tail = rest.rsplit(".", 1)
                if tail.lower() in METRIC_AGGREGATES and head:
                    name, agg = head, tail.lower()
            if not name:
                raise FilterError(f"expected a metric name after {key!r}", kpos + len(key))
            return Compare("metric", name, agg, op, _parse_number(text, vpos, op), vpos)
        name = key
        if low.startswith(("params.", "param.")):
            name = key.split(".", 1)[1]
            if not name:
                raise FilterError(f"expected a parameter name after {key!r}", kpos + len(key))
        if op in ("=", "!=") and (quoted or not _NUMBER_RX.fullmatch(text)):
            return Compare("param", name, "", op, text, vpos)
        return Compare("param", name, "", op, _parse_number(text, vpos, op), vpos)


def _parse_number(text: str, pos: int, op: str) -> float:
    if not _NUMBER_RX.fullmatch(text):
        raise FilterError(f"expected a number after {op!r}", pos)
    x = float(text)
    if not math.isfinite(x):
        raise FilterError("number out of range", pos)
    return x


def _parse_duration(text: str, pos: int, op: str) -> float:
    if _NUMBER_RX.fullmatch(text):
        return _parse_number(text, pos, op)
    total, k = 0.0, 0
    while k < len(text):
        m = _DURATION_PART_RX.match(text, k)
        if m is None:
            raise FilterError(f"expected a duration like 90, 45s, 30m, 2h or 1h30m after {op!r}", pos + k)
        unit = m.group(2)
        if unit.lower() not in _DURATION_UNITS:
            what = f"unknown duration unit {unit!r}" if unit else f"expected a unit after {m.group(1)!r}"
            raise FilterError(what, pos + m.start(2), "Units: ms, s, m, h, d, w (e.g. 1h30m).")
        total += float(m.group(1)) * _DURATION_UNITS[unit.lower()]
        k = m.end()
    if not math.isfinite(total):
        raise FilterError("duration out of range", pos)
    return total


def _parse_when(text: str, pos: int, op: str) -> date | datetime:
    try:
        return date.fromisoformat(text)
    except ValueError:
        pass
    try:
        t = datetime.fromisoformat(text)
        return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)
    except (ValueError, OverflowError):
        raise FilterError(f"expected a date like 2026-11-01 or a time like 2026-11-01T14:30Z after {op!r}",
                          pos) from None


# ---- the parser -------------------------------------------------------------------------------
class _Parser:
    def __init__(self, tokens: list[_Tok]) -> None:
        self.toks = tokens
        self.i = 0
        self.depth = 0

    def peek(self) -> _Tok:
        return self.toks[self.i]

    def take(self) -> _Tok:
        t = self.toks[self.i]
        self.i += 1
        return t

    def query(self) -> Query:
        t = self.peek()
        if t.kind == "EOF":
            return All()
        q = self.or_expr(None)
        t = self.peek()
        if t.kind == ")":
            raise FilterError("unmatched ')'", t.pos)
        assert t.kind == "EOF", t
        return q

    def expect_term(self, after: _Tok | None) -> None:
        """Raise if the next token cannot start a term."""
        t = self.peek()
        if t.kind in ("TERM", "NOT", "("):
            return
        if after is None:  # at the start of the query or of a group
            if t.kind == ")":
                raise FilterError("unmatched ')'", t.pos)
            raise FilterError(f"{t.text!r} needs a term before it", t.pos)
        if after.kind == "(":
            if t.kind == "EOF":
                raise FilterError("unclosed '('", after.pos)
            if t.kind == ")":
                raise FilterError("empty parentheses", t.pos)
            raise FilterError(f"{t.text!r} needs a term before it", t.pos)
        if t.kind == "EOF":
            raise FilterError(f"{after.text!r} needs a term after it", after.pos)
        shown = t.text or t.kind
        raise FilterError(f"expected a term after {after.text!r}, found {shown!r}", t.pos)

    def or_expr(self, after: _Tok | None) -> Query:
        items = [self.and_expr(after)]
        while self.peek().kind == "OR":
            op = self.take()
            items.append(self.and_expr(op))
        return items[0] if len(items) == 1 else Or(tuple(items))

    def and_expr(self, after: _Tok | None) -> Query:
        items = [self.unary(after)]
        while True:
            t = self.peek()
            if t.kind == "AND":
                items.append(self.unary(self.take()))
            elif t.kind in ("TERM", "NOT", "("):
                items.append(self.unary(None))
            else:
                break
        return items[0] if len(items) == 1 else And(tuple(items))

    def unary(self, after: _Tok | None) -> Query:
        self.expect_term(after)
        nots: list[_Tok] = []
        while self.peek().kind == "NOT":
            nots.append(self.take())
            if self.depth + len(nots) > _MAX_DEPTH:
                raise FilterError("too deeply nested", nots[-1].pos)
            self.expect_term(nots[-1])
        self.depth += len(nots)
        q = self.atom()
        self.depth -= len(nots)
        for _ in nots:
            q = Not(q)
        return q

    def atom(self) -> Query:
        t = self.take()
        if t.kind == "TERM":
            assert t.term is not None
            return t.term
        assert t.kind == "(", t
        self.depth += 1
        if self.depth > _MAX_DEPTH:
            raise FilterError("too deeply nested", t.pos)
        q = self.or_expr(t)
        close = self.peek()
        if close.kind != ")":
            if close.kind == "EOF":
                raise FilterError("unclosed '('", t.pos)
            raise FilterError(f"expected ')' for the '(' at column {t.pos + 1}", close.pos)  # pragma: no cover
        self.take()
        self.depth -= 1
        return q


# ---- entry points -----------------------------------------------------------------------------
def parse(text: str) -> Query:
    """Parse filter text into a Query (All for empty text). Raises FilterError."""
    return _Parser(_Lexer(text).tokens()).query()


def filter_runs(text: str | Query, runs: Iterable[Run] | Mapping[str, Run], annotations: Any = None,
                edges: Iterable[Edge] | None = None, *, now: datetime | None = None) -> list[Run]:
    """The runs (in their given order) that match ``text``. ``annotations``: by run id, or a flat list.
    Raises FilterError for a bad filter or a lineage term that names no run."""
    q = parse(text) if isinstance(text, str) else text
    seq = list(runs.values()) if isinstance(runs, Mapping) else list(runs)
    if isinstance(q, All):
        return seq
    ctx = QueryContext({r.id: r for r in seq} if not isinstance(runs, Mapping) else dict(runs),
                       annotations if annotations is not None else {}, list(edges or ()), now)
    pred = q.predicate(ctx)
    return [r for r in seq if pred(r)]
