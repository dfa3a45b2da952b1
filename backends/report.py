"""Stakeholder reports of a run's lineage: one Markdown file and one self-contained HTML page.

A report follows a *path*: the chain of runs from a baseline (``path[0]``) to a
target run (``path[-1]``). For each step it says what changed against the step
before (parameters, command, code commit and the code diff), what came out
(metric summaries, hardware use), what people wrote about it (notes and tags)
and what it left behind (artifacts). Costs are the instance's hourly price ×
the run's duration.

:func:`build_report` returns ``(markdown, html)``:

* the HTML page is one file with no scripts and no network resources: a small
  inline ``<style>``, hand-written inline SVG line charts (one per metric, the
  key metric first, every run of the path overlaid) and a Content-Security-Policy
  that forbids everything else. Every user-provided string is escaped.
* the Markdown embeds nothing binary; it has a text sparkline (``▁▂▃▄▅▆▇█``) per
  metric and run, and says that the line charts are in the HTML.

:func:`write_report` writes both files atomically (a temp file in the same
directory, fsynced, then ``os.replace``).

Nothing here touches the store or the network; the caller gathers the runs,
their (downsampled) metric series, code diffs and annotations.
"""

from __future__ import annotations

import html as _html
import json
import math
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from . import clock
from .errors import LabdeckError
from .metrics import lower_is_better
from .models import Annotation, Run, parse_time

__all__ = [
    "build_report", "write_report", "pick_key_metric",
    "DIFF_MAX_LINES", "MAX_CHARTS", "SPARK_CHARS",
]

#: Lines of a step's code diff shown before the "… N more lines" note.
DIFF_MAX_LINES = 200
#: Characters of one diff line shown (minified files have very long lines).
DIFF_MAX_LINE_CHARS = 400
#: Line charts in the HTML (the key metric first).
MAX_CHARTS = 6
#: Artifacts listed per step.
MAX_ARTIFACTS = 100
#: Characters of one parameter value shown.
PARAM_VALUE_MAX = 160
#: Width of the Markdown sparklines, in characters.
SPARK_WIDTH = 24
SPARK_CHARS = "▁▂▃▄▅▆▇█"

#: Line colours of the runs in the charts (Tableau 10), in path order.
PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
           "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac")

SeriesMap = Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]]


# ---------------------------------------------------------------- small formatting helpers

# characters not allowed in HTML text (C0 controls but tab/newline, DEL, C1 controls, lone surrogates)
_BAD_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


def _clean(s: Any) -> str:
    """``s`` as text with normalized newlines and no characters HTML or UTF-8 cannot carry."""
    t = s if isinstance(s, str) else str(s)
    if "\r" in t:
        t = t.replace("\r\n", "\n").replace("\r", "\n")
    return _BAD_CHARS.sub("\ufffd", t)


def _h(s: Any) -> str:
    """HTML-escaped text (safe in element content and in quoted attributes)."""
    return _html.escape(_clean(s), quote=True)


def _num(x: Any) -> float | None:
    """``x`` as a float (NaN and ±inf kept) or None if it is not a number."""
    if x is None or isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        try:
            return float(x)
        except OverflowError:
            return math.inf if x > 0 else -math.inf
    if isinstance(x, str):
        try:
            return float(x)
        except ValueError:
            return None
    return None


def _fmt_num(x: Any) -> str:
    v = _num(x)
    if v is None:
        return "—"
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if isinstance(x, int) and not isinstance(x, bool) and abs(x) < 10**15:
        return str(x)
    return f"{v:.5g}"


def _fmt_delta(delta: float | None, base: float | None) -> str:
    if delta is None or not math.isfinite(delta):
        return "—"
    out = f"{delta:+.4g}"
    if base is not None and math.isfinite(base) and base != 0:
        out += f" ({delta / abs(base) * 100:+.1f}%)"
    return out


def _fmt_duration(sec: float | None) -> str:
    if sec is None:
        return "—"
    s = int(round(sec))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600:02d}h"


def _fmt_cost(c: float) -> str:
    if 0 < c < 0.005:
        return "<$0.01"
    return f"${c:,.2f}"


def _fmt_price(p: Any) -> str:
    v = _num(p)
    return f"${v:,.2f}/h" if v is not None and math.isfinite(v) else "—"


_LABEL_WORDS = {"gpu": "GPU", "cpu": "CPU", "rss": "RSS", "mib": "MiB", "gib": "GiB", "mem": "memory",
                "util": "utilization", "pct": "%", "max": "peak"}


def _hw_label(key: str) -> str:
    words = [_LABEL_WORDS.get(w.lower(), w) for w in re.split(r"[_\s]+", str(key)) if w]
    text = " ".join(words)
    return text[:1].upper() + text[1:]


def _fmt_time(iso: str | None) -> str:
    if not iso:
        return "—"
    try:
        t = parse_time(iso)
    except (ValueError, TypeError):
        return _clean(iso)
    if t is None:
        return "—"
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    try:
        return t.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    except OverflowError:  # an offset that takes it past year 1 or 9999
        return _clean(iso)


def _fmt_param(v: Any) -> str:
    if isinstance(v, str):
        out = v if v and not any(c in v for c in "\n\r\t") else json.dumps(v)
    elif v is None or isinstance(v, bool):
        out = json.dumps(v)
    elif isinstance(v, float):
        out = repr(v)
    elif isinstance(v, int):
        out = str(v)
    elif isinstance(v, (list, tuple, dict)):
        try:
            out = json.dumps(v, sort_keys=True, default=str, ensure_ascii=False)
        except (TypeError, ValueError):
            out = str(v)
    else:
        out = str(v)
    if len(out) > PARAM_VALUE_MAX:
        out = out[:PARAM_VALUE_MAX] + f"… (+{len(out) - PARAM_VALUE_MAX} chars)"
    return out


def _short_id(run: Run) -> str:
    return run.id[-8:].lower()


def _short_commit(code: Mapping[str, Any]) -> str:
    if not code:
        return "not recorded"
    commit = str(code.get("commit") or "")
    out = commit[:7] if commit else "no commit"
    if code.get("dirty"):
        out += " (dirty)"
    return out


def _join_names(names: Sequence[str]) -> str:
    if len(names) <= 1:
        return "".join(names)
    return ", ".join(names[:-1]) + " and " + names[-1]


def _duration(run: Run, now: datetime) -> float | None:
    try:
        return run.duration_seconds(now)
    except (ValueError, TypeError):
        return None


def _cost(run: Run, now: datetime) -> float:
    try:
        c = run.cost(now)
    except (ValueError, TypeError):
        return 0.0
    return c if math.isfinite(c) else 0.0


def _gpus_text(run: Run) -> str:
    g = (run.instance_info or {}).get("gpus")
    if isinstance(g, list):
        counts: dict[str, int] = {}
        for item in g:
            name = str(item.get("name", "GPU")) if isinstance(item, Mapping) else str(item)
            counts[name] = counts.get(name, 0) + 1
        g = ", ".join(f"{n}× {name}" for name, n in counts.items())
    g = str(g or "").strip()
    return f"{run.instance} · {g}" if g else str(run.instance)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _finite_points(data: Any) -> list[tuple[float, float]]:
    """``(steps, values)`` as finite (x, y) pairs; anything else (NaN, inf, None, junk) skipped."""
    if not data:
        return []
    try:
        steps, values = data
    except (TypeError, ValueError):
        return []
    pts: list[tuple[float, float]] = []
    isfinite = math.isfinite
    for s, v in zip(steps, values):
        x, y = _num(s), _num(v)
        if x is not None and y is not None and isfinite(x) and isfinite(y):
            pts.append((x, y))
    return pts


# ---------------------------------------------------------------- the report's content, format-free

@dataclass
class _Change:
    kind: str  # changed | added | removed
    key: str
    old: str | None = None
    new: str | None = None


@dataclass
class _Note:
    user: str
    date: str
    text: str


@dataclass
class _Step:
    index: int
    run: Run
    prev: Run | None
    duration: float | None
    cost: float
    key_value: float | None
    key_delta: float | None
    key_prev: float | None
    params: list[_Change] = field(default_factory=list)
    params_all: list[tuple[str, str]] = field(default_factory=list)  # the baseline's parameters
    command_changed: bool = False
    code_text: str = ""
    diff_state: str = "none"  # none (baseline) | missing | empty | lines
    diff_lines: list[str] = field(default_factory=list)
    diff_more: int = 0
    metrics: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    hardware: list[tuple[str, str]] = field(default_factory=list)
    notes: list[_Note] = field(default_factory=list)
    tags: list[tuple[str, list[str]]] = field(default_factory=list)  # tag, who put it on
    artifacts: list[str] = field(default_factory=list)
    artifacts_more: int = 0


@dataclass
class _Chart:
    metric: str
    is_key: bool
    runs: list[tuple[Run, list[tuple[float, float]]]]


def pick_key_metric(path: Sequence[Run], series: SeriesMap | None = None, key_metric: str | None = None) -> str | None:
    """The report's key metric: ``key_metric`` if given, else the first metric of the target's
    ``metrics_summary`` whose name contains "loss", else its first metric; failing that, the same
    rule over every run's summaries and then over the series; None when there are no metrics."""
    if key_metric:
        return key_metric
    candidates: list[list[str]] = [list((path[-1].metrics_summary or {}).keys())] if path else []
    names: list[str] = []
    for r in path:
        names.extend(n for n in (r.metrics_summary or {}) if n not in names)
    for r in path:
        names.extend(n for n in ((series or {}).get(r.id) or {}) if n not in names)
    candidates.append(names)
    for cand in candidates:
        if cand:
            return next((n for n in cand if "loss" in n.lower()), cand[0])
    return None


def _key_value(run: Run, key: str | None, series: SeriesMap) -> float | None:
    """The run's key metric: its summary's last value, else the last finite point of its series."""
    if not key:
        return None
    s = (run.metrics_summary or {}).get(key)
    if isinstance(s, Mapping):
        v = _num(s.get("last"))
        if v is not None:
            return v
    pts = _finite_points(((series or {}).get(run.id) or {}).get(key))
    return pts[-1][1] if pts else None


def _truncate_diff(text: str, max_lines: int = DIFF_MAX_LINES) -> tuple[list[str], int]:
    """The first ``max_lines`` lines of ``text`` (long lines cut) and how many lines follow.

    Works in time proportional to what is shown plus one ``count`` over the rest."""
    lines: list[str] = []
    pos, n = 0, len(text)
    while len(lines) < max_lines and pos < n:
        j = text.find("\n", pos)
        if j < 0:
            j = n
        line = _clean(text[pos:j].rstrip("\r"))
        if len(line) > DIFF_MAX_LINE_CHARS:
            line = line[:DIFF_MAX_LINE_CHARS] + f" … (+{len(line) - DIFF_MAX_LINE_CHARS} chars)"
        lines.append(line)
        pos = j + 1
    more = 0
    if pos < n:
        more = text.count("\n", pos) + (0 if text.endswith("\n") else 1)
    return lines, more


def _params_diff(prev: Mapping[str, Any], cur: Mapping[str, Any]) -> list[_Change]:
    a, b = _flatten(prev or {}), _flatten(cur or {})
    changed, added, removed = [], [], []
    for k in sorted(set(a) | set(b)):
        if k in a and k in b:
            old, new = _fmt_param(a[k]), _fmt_param(b[k])
            if old != new:
                changed.append(_Change("changed", k, old, new))
        elif k in b:
            added.append(_Change("added", k, None, _fmt_param(b[k])))
        else:
            removed.append(_Change("removed", k, _fmt_param(a[k]), None))
    return changed + added + removed


def _hardware_items(hw: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The run's hardware summary as (label, value): mean GPU utilization first."""
    items: list[tuple[str, str]] = []
    rest: list[tuple[str, str]] = []
    util_done = False
    for k, v in (hw or {}).items():
        low = str(k).lower()
        if not util_done and "gpu" in low and "util" in low and _num(v) is not None:
            util_done = True
            items.append(("Mean GPU util", f"{_num(v):.0f}%"))
            continue
        label = _hw_label(k)
        if isinstance(v, (Mapping, list, tuple)):
            val = _fmt_param(v)
        elif _num(v) is not None:
            val = _fmt_num(v)
            if ("util" in low or low.endswith("pct") or "percent" in low) and math.isfinite(_num(v) or 0.0):
                val = f"{_num(v):.0f}%"
        else:
            val = _clean(v)
        rest.append((label, val))
    return items + rest


def _metric_order(names: Iterable[str], key: str | None) -> list[str]:
    """Metric names sorted alphabetically, the key metric first."""
    return sorted(set(names), key=lambda n: (n != key, n.lower(), n))


def _build_steps(path: Sequence[Run], key: str | None, series: SeriesMap, code_diffs: Mapping[str, str],
                 annotations: Mapping[str, Sequence[Annotation]], now: datetime) -> list[_Step]:
    steps: list[_Step] = []
    prev_val: float | None = None
    for i, run in enumerate(path):
        prev = path[i - 1] if i else None
        val = _key_value(run, key, series)
        delta = None
        if prev is not None and val is not None and prev_val is not None:
            delta = val - prev_val
        st = _Step(i, run, prev, _duration(run, now), _cost(run, now), val, delta, prev_val if prev else None)
        prev_val = val
        # what changed
        if prev is None:
            st.params_all = [(k, _fmt_param(v)) for k, v in sorted(_flatten(run.params or {}).items())]
        else:
            st.params = _params_diff(prev.params or {}, run.params or {})
            st.command_changed = (prev.command or "") != (run.command or "")
        if prev is None:
            st.code_text = _short_commit(run.code or {})
        else:
            a, b = _short_commit(prev.code or {}), _short_commit(run.code or {})
            st.code_text = f"unchanged ({b})" if a == b else f"{a} → {b}"
            diff = code_diffs.get(run.id) if code_diffs else None
            if diff is None:
                st.diff_state = "missing"
            elif not diff.strip():
                st.diff_state = "empty"
            else:
                st.diff_state = "lines"
                st.diff_lines, st.diff_more = _truncate_diff(diff)
        # metrics and hardware
        summ = run.metrics_summary or {}
        st.metrics = [(n, summ[n] if isinstance(summ[n], Mapping) else {"last": summ[n]})
                      for n in _metric_order(summ, key)]
        st.hardware = _hardware_items(run.hardware or {})
        # notes and tags
        anns = [a for a in ((annotations or {}).get(run.id) or []) if not getattr(a, "removed", False)]
        anns.sort(key=lambda a: str(a.created_at or ""))
        tags: dict[str, list[str]] = {}
        for t in run.tags or []:
            tags.setdefault(str(t), [])
        for a in anns:
            if a.kind == "tag":
                who = tags.setdefault(_clean(a.text).strip(), [])
                if a.user and a.user not in who:
                    who.append(a.user)
            else:
                st.notes.append(_Note(_clean(a.user or "unknown"), _fmt_time(a.created_at), _clean(a.text)))
        st.tags = [(t, who) for t, who in tags.items() if t]
        arts = [str(p) for p in (run.artifacts or [])]
        st.artifacts, st.artifacts_more = arts[:MAX_ARTIFACTS], max(0, len(arts) - MAX_ARTIFACTS)
        steps.append(st)
    return steps


def _chart_metrics(path: Sequence[Run], key: str | None, series: SeriesMap) -> list[str]:
    names: list[str] = []
    if key:
        names.append(key)
    ordered_runs = [path[-1], *path[:-1]]
    for r in ordered_runs:
        names.extend(n for n in (r.metrics_summary or {}) if n not in names)
    for r in ordered_runs:
        names.extend(n for n in ((series or {}).get(r.id) or {}) if n not in names)
    return names


# ---------------------------------------------------------------- inline text, rendered two ways

class _Md:
    """Inline Markdown: user text escaped so it renders as itself."""

    _ESC = re.compile(r"([\\`*\[\]<>|])|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])|&(?=#?\w+;)")

    @classmethod
    def text(cls, s: Any) -> str:
        t = _clean(s).replace("\n", " ")

        def rep(m: re.Match) -> str:
            return "\\" + m.group(0)
        return cls._ESC.sub(rep, t)

    @classmethod
    def block(cls, s: Any, indent: str = "  ") -> str:
        """Multi-line text inside a list item: continuation lines indented, block markers escaped."""
        out = []
        for i, line in enumerate(_clean(s).split("\n")):
            esc = cls.text(line)
            if i:
                stripped = esc.lstrip()
                if re.match(r"[#+\-=~]|\d+[.)]", stripped):
                    m = re.match(r"\d+", stripped)
                    stripped = (stripped[:m.end()] + "\\" + stripped[m.end():]) if m else "\\" + stripped
                esc = indent + stripped if stripped else ""
            out.append(esc)
        return "\n".join(out)

    @staticmethod
    def code(s: Any) -> str:
        t = _clean(s).replace("\n", " ")
        if not t:
            return '`""`'
        runs = re.findall(r"`+", t)
        ticks = "`" * (max((len(r) for r in runs), default=0) + 1)
        pad = " " if t.startswith("`") or t.endswith("`") else ""
        return f"{ticks}{pad}{t}{pad}{ticks}"

    @classmethod
    def strong(cls, s: Any) -> str:
        return f"**{cls.text(s)}**"


class _Html:
    @staticmethod
    def text(s: Any) -> str:
        return _h(s)

    @staticmethod
    def code(s: Any) -> str:
        return f"<code>{_h(s)}</code>"

    @staticmethod
    def strong(s: Any) -> str:
        return f"<strong>{_h(s)}</strong>"


def _summary(f: type, path: Sequence[Run], steps: list[_Step], key: str | None,
             annotations: Mapping[str, Sequence[Annotation]]) -> str:
    base, target = path[0], path[-1]
    n = len(path) - 1
    parts: list[str] = []
    if n == 0:
        parts.append(f"This report covers a single run, {f.strong(target.display_name)} ({f.code(_short_id(target))}), "
                     f"which is its own baseline.")
    else:
        parts.append(f"Target run {f.strong(target.display_name)} ({f.code(_short_id(target))}) is "
                     f"{n} step{'s' if n != 1 else ''} from the baseline {f.strong(base.display_name)} "
                     f"({f.code(_short_id(base))}).")
    if target.state != "succeeded":
        parts.append(f"The target run is {f.text(target.state)}.")
    users: list[str] = []
    for r in path:
        if r.user and r.user not in users:
            users.append(r.user)
    if users:
        parts.append(f"Worked on by {_join_names([f.text(u) for u in users])}.")
    note_users: list[str] = []
    for r in path:
        for a in (annotations or {}).get(r.id) or []:
            if not a.removed and a.user and a.user not in users and a.user not in note_users:
                note_users.append(a.user)
    if note_users:
        parts.append(f"Notes and tags also from {_join_names([f.text(u) for u in note_users])}.")
    total = sum(s.cost for s in steps)
    secs = sum(s.duration or 0.0 for s in steps)
    parts.append(f"The path's {len(path)} run{'s' if len(path) != 1 else ''} cost {f.strong(_fmt_cost(total))} in total "
                 f"({_fmt_duration(secs)} of compute at the instances' hourly prices).")
    if key is None:
        parts.append("No metrics were recorded.")
    else:
        bv, tv = steps[0].key_value, steps[-1].key_value
        if n == 0:
            parts.append(f"Key metric {f.code(key)} (last value): {f.strong(_fmt_num(tv))}.")
        else:
            change = ""
            if bv is not None and tv is not None and math.isfinite(bv) and math.isfinite(tv):
                d = tv - bv
                verdict = "unchanged" if d == 0 else (
                    "better" if (d < 0) == lower_is_better(key) else "worse")
                pct = f", {d / abs(bv) * 100:+.1f}%" if bv != 0 else ""
                change = f" ({d:+.4g}{pct}: {verdict})"
            parts.append(f"Key metric {f.code(key)} (last value): {_fmt_num(bv)} → "
                         f"{f.strong(_fmt_num(tv))}{change}.")
    return " ".join(parts)


# ---------------------------------------------------------------- Markdown

def _sparkline(pts: list[tuple[float, float]], width: int = SPARK_WIDTH) -> str:
    if not pts:
        return ""
    ys = [y for _, y in pts]
    if len(ys) > width:  # bucket means
        buckets = []
        for i in range(width):
            a, b = i * len(ys) // width, (i + 1) * len(ys) // width
            chunk = ys[a:max(b, a + 1)]
            buckets.append(sum(chunk) / len(chunk))
        ys = buckets
    lo, hi = min(ys), max(ys)
    if not math.isfinite(hi - lo) or hi == lo:
        return SPARK_CHARS[3] * len(ys)
    k = len(SPARK_CHARS) - 1
    return "".join(SPARK_CHARS[min(k, max(0, int(round((y - lo) / (hi - lo) * k))))] for y in ys)


def _md_table(header: list[str], rows: list[list[str]], align: list[str] | None = None) -> list[str]:
    align = align or ["l"] * len(header)
    sep = ["---:" if a == "r" else "---" for a in align]
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _fence(lines: list[str]) -> str:
    longest = max((len(m) for line in lines for m in re.findall(r"`+", line)), default=0)
    return "`" * max(3, longest + 1)


def _render_md(title: str, generated: str, path: Sequence[Run], steps: list[_Step], key: str | None,
               charts: list[_Chart], more_metrics: list[str], summary: str,
               media: Mapping[str, Sequence[Any]] | None = None) -> str:
    M = _Md
    out: list[str] = [f"# {M.text(title)}", "", f"_Generated {generated} by labdeck._", "", summary, ""]

    # the path
    out += ["## Path", ""]
    kh = M.text(key) if key else "Key metric"
    rows = []
    for s in steps:
        r = s.run
        rows.append([str(s.index) + (" (baseline)" if s.index == 0 and len(steps) > 1 else ""),
                     f"{M.text(r.display_name)} ({M.code(_short_id(r))})", M.text(r.user), M.text(r.state),
                     M.text(_gpus_text(r)), _fmt_duration(s.duration), _fmt_cost(s.cost),
                     _fmt_num(s.key_value) if key else "—",
                     "baseline" if s.prev is None else _fmt_delta(s.key_delta, s.key_prev)])
    rows.append(["", "**Total**", "", "", "", _fmt_duration(sum(s.duration or 0 for s in steps)),
                 f"**{_fmt_cost(sum(s.cost for s in steps))}**", "", ""])
    out += _md_table(["#", "Run", "User", "State", "Instance / GPUs", "Duration", "Cost", kh, "Δ vs previous"],
                     rows, ["r", "l", "l", "l", "l", "r", "r", "r", "r"])
    out.append("")

    # metrics over steps
    out += ["## Metrics over steps", ""]
    if not charts:
        out += ["No metrics were recorded for these runs.", ""]
    else:
        out += ["_Line charts of these metrics (every run of the path overlaid) are in the HTML version "
                "of this report; the sparklines below run from the first step to the last._", ""]
        rows = []
        for c in charts:
            for r, pts in c.runs:
                spark = _sparkline(pts)
                rows.append([M.code(c.metric) + (" (key)" if c.is_key else ""),
                             f"{M.text(r.display_name)} ({M.code(_short_id(r))})",
                             spark if spark else "no data", str(len(pts)),
                             _fmt_num(pts[0][1]) if pts else "—", _fmt_num(pts[-1][1]) if pts else "—"])
        out += _md_table(["Metric", "Run", "Trend", "Points", "First", "Last"], rows,
                         ["l", "l", "l", "r", "r", "r"])
        out.append("")
        if more_metrics:
            out += [f"Also recorded, not charted: {', '.join(M.code(m) for m in more_metrics)}.", ""]

    # steps
    out += ["## Steps", ""]
    for s in steps:
        r = s.run
        label = "baseline" if s.index == 0 and len(steps) > 1 else ("target" if s.index == len(steps) - 1
                                                                     and len(steps) > 1 else "")
        head = f"### Step {s.index}" + (f" ({label})" if label else "") + \
            f": {M.text(r.display_name)} ({M.code(_short_id(r))})"
        out += [head, ""]
        state = M.text(r.state) + (f" — {M.text(r.state_reason)}" if r.state_reason else "")
        if r.exit_code is not None:
            state += f" (exit code {r.exit_code})"
        out += [f"- User: {M.text(r.user)}", f"- State: {state}",
                f"- Instance: {M.text(_gpus_text(r))}",
                f"- Started: {_fmt_time(r.started_at)} · ended: {_fmt_time(r.ended_at)} · "
                f"duration: {_fmt_duration(s.duration)}",
                f"- Cost: {_fmt_cost(s.cost)} (at {_fmt_price(r.price_per_hour)})", ""]

        out += ["#### What changed", ""]
        if s.prev is None:
            out.append(f"- Baseline{' of this report' if len(steps) > 1 else ''}; nothing to compare with.")
            if s.params_all:
                out.append("- Parameters:")
                out += [f"  - {M.code(f'{k}: {v}')}" for k, v in s.params_all]
            else:
                out.append("- Parameters: none recorded")
            out.append(f"- Command: {M.code(r.command)}")
            out.append(f"- Code commit: {M.code(s.code_text)}")
        else:
            if s.params:
                out.append("- Parameters:")
                for c in s.params:
                    if c.kind == "changed":
                        out.append(f"  - changed {M.code(f'{c.key}: {c.old} → {c.new}')}")
                    elif c.kind == "added":
                        out.append(f"  - added {M.code(f'{c.key}: {c.new}')}")
                    else:
                        out.append(f"  - removed {M.code(f'{c.key}: {c.old}')}")
            else:
                out.append("- Parameters: no changes")
            if s.command_changed:
                out.append(f"- Command: {M.code(s.prev.command)} → {M.code(r.command)}")
            else:
                out.append(f"- Command: unchanged ({M.code(r.command)})")
            out.append(f"- Code commit: {M.code(s.code_text)}")
            if s.diff_state == "missing":
                out.append("- Code diff: not available")
            elif s.diff_state == "empty":
                out.append("- Code diff: no code changes")
            else:
                out += ["- Code diff:", ""]
                fence = _fence(s.diff_lines)
                out += [f"{fence}diff", *s.diff_lines, fence]
                if s.diff_more:
                    out += ["", f"_… {s.diff_more} more lines (diff cut at {DIFF_MAX_LINES} lines)_"]
        out.append("")

        out += ["#### Metrics", ""]
        if s.metrics:
            rows = [[M.code(n) + (" (key)" if n == key else ""), _fmt_num(m.get("last")), _fmt_num(m.get("best")),
                     _fmt_num(m.get("min")), _fmt_num(m.get("max")), _fmt_num(m.get("count"))]
                    for n, m in s.metrics]
            out += _md_table(["Metric", "Last", "Best", "Min", "Max", "Points"], rows,
                             ["l", "r", "r", "r", "r", "r"])
        else:
            out.append("No metrics recorded.")
        out.append("")

        if media and media.get(s.run.id):
            out += ["#### Media", ""]
            out += _media_md(media[s.run.id])
            out.append("")

        out += ["#### Hardware", ""]
        if s.hardware:
            out += [f"- {M.text(k)}: {M.text(v)}" for k, v in s.hardware]
        else:
            out.append("No hardware summary recorded.")
        out.append("")

        out += ["#### Notes", ""]
        if s.notes:
            out += [f"- {M.strong(n.user)} · {n.date}: {M.block(n.text)}" for n in s.notes]
        else:
            out.append("No notes.")
        out.append("")
        if s.tags:
            tags = []
            for t, who in s.tags:
                tags.append(M.code(t) + (f" ({', '.join(M.text(w) for w in who)})" if who else ""))
            out += [f"Tags: {', '.join(tags)}", ""]

        out += ["#### Artifacts", ""]
        if s.artifacts:
            out += [f"- {M.code(a)}" for a in s.artifacts]
            if s.artifacts_more:
                out.append(f"- … {s.artifacts_more} more")
        else:
            out.append("No artifacts recorded.")
        out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


# ---------------------------------------------------------------- SVG charts

def _nice_step(span: float, n: int = 5) -> float:
    raw = span / n
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag * (1 + 1e-9):
            return m * mag
    return 10 * mag


def _axis(lo: float, hi: float) -> tuple[float, float, list[float], float]:
    """A nice domain around [lo, hi] and its ticks; constant data gets a band around its value."""
    if hi == lo:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    span = hi - lo
    if not math.isfinite(span) or span <= 0:
        return lo, hi, [lo, hi], span if math.isfinite(span) and span > 0 else 1.0
    step = _nice_step(span)
    a, b = math.floor(lo / step) * step, math.ceil(hi / step) * step
    count = int(round((b - a) / step))
    if not math.isfinite(a) or not math.isfinite(b) or count > 20 or b <= a:
        return lo, hi, [lo, hi], span
    return a, b, [a + i * step for i in range(count + 1)], step


def _tick_label(v: float, step: float) -> str:
    if abs(v) < abs(step) * 1e-9:
        v = 0.0
    if v == 0:
        return "0"
    av = abs(v)
    if av >= 1e6 and step >= 1e5:
        return f"{v / 1e6:.4g}M"
    if av >= 1e4 and step >= 1e3:
        return f"{v / 1e3:.4g}k"
    if av < 1e-3 or av >= 1e9 or step < 1e-5:
        return f"{v:.3g}"
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    if decimals and abs(round(step * 10 ** decimals) - step * 10 ** decimals) > 1e-6:
        decimals += 1  # steps like 2.5 × 10^k
    return f"{v:.{decimals}f}"


def _svg_chart(chart: _Chart, index: int, path: Sequence[Run]) -> str:
    W, ML, MR, MT, PH = 640, 72, 20, 34, 220
    PW = W - ML - MR
    cols, col_w = 2, (W - ML - MR) // 2
    rows = (len(chart.runs) + cols - 1) // cols
    legend_top = MT + PH + 44
    H = legend_top + rows * 18 + 6
    n_runs = len(path)
    o: list[str] = []
    tid = f"chart-{index}-title"
    o.append(f'<svg class="chart" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" '
             f'aria-labelledby="{tid}">')
    o.append(f'<title id="{tid}">{_h(chart.metric)} by step, {n_runs} run{"s" if n_runs != 1 else ""}</title>')
    keymark = '<tspan class="keymark" dx="6">(key metric)</tspan>' if chart.is_key else ""
    o.append(f'<text class="ctitle" x="{ML}" y="20">{_h(chart.metric)}{keymark}</text>')
    o.append(f'<rect class="plot" x="{ML}" y="{MT}" width="{PW}" height="{PH}"/>')

    pts_all = [p for _, pts in chart.runs for p in pts]
    if not pts_all:
        o.append(f'<text class="nodata" x="{ML + PW / 2:.1f}" y="{MT + PH / 2:.1f}" text-anchor="middle">no data</text>')
    else:
        xs = [p[0] for p in pts_all]
        ys = [p[1] for p in pts_all]
        x0, x1, xt, xstep = _axis(min(xs), max(xs))
        y0, y1, yt, ystep = _axis(min(ys), max(ys))

        def sx(x: float) -> float:
            return ML + (x - x0) / (x1 - x0) * PW

        def sy(y: float) -> float:
            return MT + PH - (y - y0) / (y1 - y0) * PH

        for t in yt:
            y = sy(t)
            o.append(f'<line class="grid" x1="{ML}" y1="{y:.1f}" x2="{ML + PW}" y2="{y:.1f}"/>')
            o.append(f'<text class="tick" x="{ML - 6}" y="{y + 4:.1f}" text-anchor="end">{_h(_tick_label(t, ystep))}</text>')
        for t in xt:
            x = sx(t)
            o.append(f'<line class="tickmark" x1="{x:.1f}" y1="{MT + PH}" x2="{x:.1f}" y2="{MT + PH + 5}"/>')
            o.append(f'<text class="tick" x="{x:.1f}" y="{MT + PH + 18}" text-anchor="middle">'
                     f'{_h(_tick_label(t, xstep))}</text>')
        o.append(f'<line class="axis" x1="{ML}" y1="{MT + PH}" x2="{ML + PW}" y2="{MT + PH}"/>')
        o.append(f'<line class="axis" x1="{ML}" y1="{MT}" x2="{ML}" y2="{MT + PH}"/>')
        for i, (run, pts) in enumerate(chart.runs):
            color = PALETTE[i % len(PALETTE)]
            width = "2.6" if i == len(chart.runs) - 1 else "1.6"
            dash = ' stroke-dasharray="6 3"' if i == 0 and len(chart.runs) > 1 else ""
            tip = f"<title>{_h(run.display_name)} ({_h(_short_id(run))})</title>"
            if len(pts) == 1:
                x, y = pts[0]
                o.append(f'<circle class="point" cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3.5" fill="{color}">{tip}</circle>')
            elif pts:
                coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
                o.append(f'<polyline class="series" fill="none" stroke="{color}" stroke-width="{width}"'
                         f'{dash} stroke-linejoin="round" points="{coords}">{tip}</polyline>')
    o.append(f'<text class="alabel" x="{ML + PW / 2:.1f}" y="{MT + PH + 34}" text-anchor="middle">step</text>')
    o.append(f'<text class="alabel" transform="rotate(-90)" x="{-(MT + PH / 2):.1f}" y="14" '
             f'text-anchor="middle">{_h(chart.metric)}</text>')
    # legend
    o.append('<g class="legend">')
    for i, (run, pts) in enumerate(chart.runs):
        color = PALETTE[i % len(PALETTE)]
        lx = ML + (i % cols) * col_w
        ly = legend_top + (i // cols) * 18
        dash = ' stroke-dasharray="6 3"' if i == 0 and len(chart.runs) > 1 else ""
        name = run.display_name
        if len(name) > 30:
            name = name[:29] + "…"
        role = " · baseline" if i == 0 and len(chart.runs) > 1 else (
            " · target" if i == len(chart.runs) - 1 and len(chart.runs) > 1 else "")
        o.append(f'<line x1="{lx}" y1="{ly - 4}" x2="{lx + 22}" y2="{ly - 4}" stroke="{color}" stroke-width="3"{dash}/>')
        o.append(f'<text class="ltext" x="{lx + 28}" y="{ly}">{i}. {_h(name)} ({_h(_short_id(run))}){role}'
                 f'{" — no data" if not pts else ""}</text>')
    o.append("</g>")
    o.append("</svg>")
    return "".join(o)


# ---------------------------------------------------------------- HTML

_CSS = """
:root{--fg:#1f2933;--muted:#616e7c;--line:#d9dee3;--bg:#fff;--soft:#f5f7fa;--accent:#2f5d8a}
*{box-sizing:border-box}
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);background:var(--bg);
max-width:1100px;margin:0 auto;padding:24px}
h1{font-size:1.7em;margin:0 0 4px}h2{margin-top:2em;border-bottom:1px solid var(--line);padding-bottom:4px}
h3{margin-top:1.8em}h4{margin:1.2em 0 .4em;color:var(--accent)}
.meta{color:var(--muted);margin:0}.summary{font-size:1.05em;background:var(--soft);padding:12px 16px;border-radius:6px}
table{border-collapse:collapse;margin:8px 0;font-size:.93em}th,td{border:1px solid var(--line);padding:4px 8px;
text-align:left;vertical-align:top}th{background:var(--soft)}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.total td{font-weight:600}
code,pre{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.9em}
code{background:var(--soft);padding:0 3px;border-radius:3px}
pre.diff{background:#fafbfc;border:1px solid var(--line);padding:8px;overflow-x:auto;line-height:1.35}
pre.diff .add{color:#116329;background:#e6ffec}pre.diff .del{color:#82071e;background:#ffebe9}
pre.diff .hunk{color:#0550ae}pre.diff .meta{color:#6e7781;font-weight:600}
.more{color:var(--muted);font-style:italic}
.charts{display:flex;flex-wrap:wrap;gap:16px}
svg.chart{max-width:100%;height:auto;border:1px solid var(--line);border-radius:6px;background:#fff}
svg .plot{fill:#fcfcfd;stroke:none}svg .grid{stroke:#e4e7eb;stroke-width:1}svg .axis,svg .tickmark{stroke:#7b8794}
svg text{font-family:system-ui,sans-serif;fill:var(--fg)}svg .tick{font-size:11px;fill:var(--muted)}
svg .ctitle{font-size:14px;font-weight:600}svg .keymark{font-weight:400;fill:var(--muted)}
svg .alabel{font-size:12px;fill:var(--muted)}svg .ltext{font-size:12px}svg .nodata{font-size:14px;fill:var(--muted)}
ul.changes li .kind{display:inline-block;min-width:4.5em;color:var(--muted)}
.tag{display:inline-block;background:#e8eef5;border-radius:10px;padding:0 8px;margin:0 4px 4px 0}
.note{margin:0 0 8px}.note .who{font-weight:600}.note .text{white-space:pre-wrap}
footer{margin-top:3em;color:var(--muted);font-size:.85em}
div.media{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}figure.media{margin:0}
figure.media img{min-width:128px;max-width:320px;image-rendering:pixelated;border:1px solid var(--line)}
figure.media figcaption{color:var(--muted);font-size:.85em}pre.mtext{white-space:pre-wrap;max-width:60em}
@media print{body{max-width:none}svg.chart{break-inside:avoid}}
"""


def _diff_html(lines: list[str]) -> str:
    out = []
    for line in lines:
        if line.startswith(("+++", "---", "diff ", "index ", "Binary files", "new file", "deleted file",
                            "similarity", "rename ", "old mode", "new mode", "GIT binary patch")):
            cls = "meta"
        elif line.startswith("@@"):
            cls = "hunk"
        elif line.startswith("+"):
            cls = "add"
        elif line.startswith("-"):
            cls = "del"
        else:
            cls = ""
        out.append(f'<span class="{cls}">{_h(line)}</span>' if cls else _h(line))
    return "\n".join(out)


# ---------------------------------------------------------------- media (images, tables, matrices)

#: Largest image embedded (bytes of the file); larger ones are named, not embedded.
MEDIA_MAX_IMAGE_BYTES = 2 << 20
#: Rows and columns of a logged table shown.
MEDIA_MAX_ROWS, MEDIA_MAX_COLS = 50, 20
#: Classes of a confusion matrix drawn.
MEDIA_MAX_CLASSES = 40
#: Characters of a logged text shown.
MEDIA_MAX_TEXT = 4000


def _media_label(m: Any) -> str:
    """``key · step N`` with the step the item really has; when the report asked for another step
    (``--media KEY@STEP``), which one and how this one relates to it."""
    cap = f" · {m.caption}" if m.caption else ""
    return f"{m.key} · step {m.step}{_asked_note(m)}{cap}"


def _asked_note(m: Any) -> str:
    asked = getattr(m, "asked", None)
    if asked is None or asked == m.step:
        return ""
    return (f" (nearest at or before {asked})" if m.step < asked
            else f" (its earliest; none at or before {asked})")


def _heat(share: float) -> str:
    """A blue scale for a share 0..1 of a confusion matrix's row."""
    share = min(1.0, max(0.0, share))
    r, g, b = (int(247 - share * (247 - 8)), int(251 - share * (251 - 69)), int(255 - share * (255 - 148)))
    return f"rgb({r},{g},{b})"


def _confusion_svg(labels: list[str], m: list[list[int]], title: str) -> str:
    n = min(len(labels), MEDIA_MAX_CLASSES)
    cell, left, top = 34, 110, 34
    w, h = left + n * cell + 10, top + n * cell + 30
    o = [f'<svg class="confusion" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
         f'viewBox="0 0 {w} {h}" role="img" aria-label="{_h(title)}">']
    o.append(f'<text class="alabel" x="{left}" y="14">predicted →</text>')
    o.append(f'<text class="alabel" x="4" y="{top - 8}">true ↓</text>')
    for j in range(n):
        o.append(f'<text class="tick" x="{left + j * cell + cell / 2}" y="{top - 6}" text-anchor="middle">'
                 f'{_h(labels[j][:6])}</text>')
    for i in range(n):
        total = sum(m[i]) or 1
        o.append(f'<text class="tick" x="{left - 6}" y="{top + i * cell + cell / 2 + 4}" text-anchor="end">'
                 f'{_h(labels[i][:14])}</text>')
        for j in range(n):
            share = m[i][j] / total
            o.append(f'<rect x="{left + j * cell}" y="{top + i * cell}" width="{cell}" height="{cell}" '
                     f'fill="{_heat(share)}" stroke="#fff"/>')
            o.append(f'<text x="{left + j * cell + cell / 2}" y="{top + i * cell + cell / 2 + 4}" '
                     f'text-anchor="middle" font-size="11" fill="{"#fff" if share > 0.55 else "#1f2933"}">'
                     f'{m[i][j]}</text>')
    if n < len(labels):
        o.append(f'<text class="tick" x="{left}" y="{h - 8}">… {len(labels) - n} more classes not drawn</text>')
    o.append("</svg>")
    return "".join(o)


def _histogram_svg(doc: dict, title: str) -> str:
    from .media import rebin_histogram

    lo, hi, bins = rebin_histogram(doc, 40)
    w, h, pad = 420, 150, 24
    o = [f'<svg class="histogram" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
         f'viewBox="0 0 {w} {h}" role="img" aria-label="{_h(title)}">']
    if bins and max(bins) > 0:
        top = max(bins)
        bw = (w - 2 * pad) / len(bins)
        for k, c in enumerate(bins):
            bh = (h - 2 * pad) * c / top
            o.append(f'<rect x="{pad + k * bw:.1f}" y="{h - pad - bh:.1f}" width="{max(bw - 1, 0.5):.1f}" '
                     f'height="{bh:.1f}" fill="#4e79a7"/>')
        o.append(f'<text class="tick" x="{pad}" y="{h - 6}">{_h(_fmt_num(lo))}</text>')
        o.append(f'<text class="tick" x="{w - pad}" y="{h - 6}" text-anchor="end">{_h(_fmt_num(hi))}</text>')
        o.append(f'<text class="tick" x="{pad}" y="14">max {_h(_fmt_num(top))} per bin</text>')
    else:
        o.append(f'<text class="nodata" x="{pad}" y="{h / 2}">empty</text>')
    o.append("</svg>")
    return "".join(o)


def _media_html(items: Sequence[Any]) -> list[str]:
    import base64

    from .media import image_mime

    o: list[str] = ['<div class="media">']
    for m in items:
        label = _media_label(m)
        o.append('<figure class="media">')
        if m.kind == "image":
            mime = image_mime(m.data) if isinstance(m.data, bytes) else None
            if mime is None:
                o.append("<p>Not an image labdeck embeds.</p>")
            elif len(m.data) > MEDIA_MAX_IMAGE_BYTES:
                o.append(f"<p>An image of {len(m.data):,} bytes: too large to embed.</p>")
            else:
                o.append(f'<img src="data:{mime};base64,{base64.b64encode(m.data).decode("ascii")}" '
                         f'alt="{_h(label)}">')
        elif m.kind == "table":
            cols, rows = m.data
            o.append('<table class="mtable"><thead><tr>'
                     + "".join(f"<th>{_h(c)}</th>" for c in cols[:MEDIA_MAX_COLS]) + "</tr></thead><tbody>")
            for r in rows[:MEDIA_MAX_ROWS]:
                o.append("<tr>" + "".join(
                    f'<td{" class=num" if isinstance(v, (int, float)) and not isinstance(v, bool) else ""}>'
                    f'{_h("–" if v is None else _fmt_num(v) if isinstance(v, float) else v)}</td>'
                    for v in r[:MEDIA_MAX_COLS]) + "</tr>")
            o.append("</tbody></table>")
            if len(rows) > MEDIA_MAX_ROWS or len(cols) > MEDIA_MAX_COLS:
                o.append(f'<p class="more">… {len(rows)} rows × {len(cols)} columns in all</p>')
        elif m.kind == "confusion":
            o.append(_confusion_svg(m.data[0], m.data[1], label))
        elif m.kind == "histogram":
            o.append(_histogram_svg(m.data, label))
        else:
            t = m.data if isinstance(m.data, str) else str(m.data)
            o.append(f'<pre class="mtext">{_h(t[:MEDIA_MAX_TEXT])}</pre>'
                     + (f'<p class="more">… {len(t) - MEDIA_MAX_TEXT:,} more characters</p>'
                        if len(t) > MEDIA_MAX_TEXT else ""))
        o.append(f"<figcaption>{_h(label)}</figcaption></figure>")
    o.append("</div>")
    return o


def _media_md(items: Sequence[Any]) -> list[str]:
    M = _Md
    out: list[str] = []
    for m in items:
        out.append(f"- {M.code(m.key)} at step {m.step}{_asked_note(m)}"
                   + (f": {M.text(m.caption)}" if m.caption else ""))
        if m.kind == "image":
            out.append("  (an image: embedded in the HTML report)")
        elif m.kind == "table":
            cols, rows = m.data
            out.append("")
            out += ["  " + line for line in _md_table(
                [M.text(c) for c in cols[:MEDIA_MAX_COLS]],
                [[M.text("–" if v is None else _fmt_num(v) if isinstance(v, float) else v) for v in r[:MEDIA_MAX_COLS]]
                 for r in rows[:MEDIA_MAX_ROWS]])]
            out.append("")
        elif m.kind == "confusion":
            labels, mat = m.data
            n = min(len(labels), MEDIA_MAX_CLASSES)
            out.append("")
            out += ["  " + line for line in _md_table(
                ["true ↓ / predicted →"] + [M.text(x) for x in labels[:n]],
                [[M.text(labels[i])] + [str(v) for v in mat[i][:n]] for i in range(n)], ["l"] + ["r"] * n)]
            out.append("")
        elif m.kind == "histogram":
            from .media import rebin_histogram

            lo, hi, bins = rebin_histogram(m.data, SPARK_WIDTH)
            out.append(f"  {_sparkline(list(enumerate(bins)))} over {_fmt_num(lo)} … {_fmt_num(hi)}" if bins
                       else "  (empty)")
        else:
            t = (m.data if isinstance(m.data, str) else str(m.data))[:MEDIA_MAX_TEXT]
            lines = _clean(t).split("\n")
            fence = _fence(lines)
            out += ["", "  " + fence, *["  " + x for x in lines], "  " + fence, ""]
    return out


def _render_html(title: str, generated: str, path: Sequence[Run], steps: list[_Step], key: str | None,
                 charts: list[_Chart], more_metrics: list[str], summary: str,
                 media: Mapping[str, Sequence[Any]] | None = None) -> str:
    H = _Html
    o: list[str] = []
    o.append("<!DOCTYPE html>")
    o.append('<html lang="en">')
    o.append("<head>")
    o.append('<meta charset="utf-8">')
    o.append("<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
             "style-src 'unsafe-inline'; img-src data:\">")
    o.append('<meta name="viewport" content="width=device-width, initial-scale=1">')
    o.append('<meta name="generator" content="labdeck">')
    o.append(f"<title>{_h(title)}</title>")
    o.append(f"<style>{_CSS}</style>")
    o.append("</head>")
    o.append("<body>")
    o.append(f'<header><h1>{_h(title)}</h1><p class="meta">Generated {_h(generated)} by labdeck.</p></header>')
    o.append(f'<section id="summary"><p class="summary">{summary}</p></section>')

    # the path
    o.append('<section id="path"><h2>Path</h2><table class="path"><thead><tr>')
    for hd in ["#", "Run", "User", "State", "Instance / GPUs", "Duration", "Cost", key or "Key metric", "Δ vs previous"]:
        o.append(f"<th>{_h(hd)}</th>")
    o.append("</tr></thead><tbody>")
    for s in steps:
        r = s.run
        o.append("<tr>"
                 f'<td class="num">{s.index}</td>'
                 f'<td><a href="#step-{s.index}">{_h(r.display_name)}</a> {H.code(_short_id(r))}</td>'
                 f"<td>{_h(r.user)}</td><td>{_h(r.state)}</td><td>{_h(_gpus_text(r))}</td>"
                 f'<td class="num">{_h(_fmt_duration(s.duration))}</td><td class="num">{_h(_fmt_cost(s.cost))}</td>'
                 f'<td class="num">{_h(_fmt_num(s.key_value) if key else "—")}</td>'
                 f'<td class="num">{"baseline" if s.prev is None else _h(_fmt_delta(s.key_delta, s.key_prev))}</td>'
                 "</tr>")
    o.append('<tr class="total"><td></td><td>Total</td><td></td><td></td><td></td>'
             f'<td class="num">{_h(_fmt_duration(sum(s.duration or 0 for s in steps)))}</td>'
             f'<td class="num">{_h(_fmt_cost(sum(s.cost for s in steps)))}</td><td></td><td></td></tr>')
    o.append("</tbody></table></section>")

    # charts
    o.append('<section id="charts"><h2>Metrics over steps</h2>')
    if not charts:
        o.append("<p>No metrics were recorded for these runs.</p>")
    else:
        o.append('<div class="charts">')
        for i, c in enumerate(charts):
            o.append(_svg_chart(c, i, path))
        o.append("</div>")
        if more_metrics:
            o.append(f"<p>Also recorded, not charted: {', '.join(H.code(m) for m in more_metrics)}.</p>")
    o.append("</section>")

    # steps
    o.append('<section id="steps"><h2>Steps</h2>')
    for s in steps:
        r = s.run
        label = "baseline" if s.index == 0 and len(steps) > 1 else ("target" if s.index == len(steps) - 1
                                                                     and len(steps) > 1 else "")
        o.append(f'<section class="step" id="step-{s.index}">')
        o.append(f"<h3>Step {s.index}{f' ({label})' if label else ''}: {_h(r.display_name)} {H.code(_short_id(r))}</h3>")
        state = _h(r.state) + (f" — {_h(r.state_reason)}" if r.state_reason else "")
        if r.exit_code is not None:
            state += f" (exit code {_h(r.exit_code)})"
        o.append("<ul>"
                 f"<li>User: {_h(r.user)}</li><li>State: {state}</li><li>Instance: {_h(_gpus_text(r))}</li>"
                 f"<li>Started: {_h(_fmt_time(r.started_at))} · ended: {_h(_fmt_time(r.ended_at))} · "
                 f"duration: {_h(_fmt_duration(s.duration))}</li>"
                 f"<li>Cost: {_h(_fmt_cost(s.cost))} (at {_h(_fmt_price(r.price_per_hour))})</li></ul>")

        o.append("<h4>What changed</h4><ul class=\"changes\">")
        if s.prev is None:
            o.append(f"<li>Baseline{' of this report' if len(steps) > 1 else ''}; nothing to compare with.</li>")
            if s.params_all:
                o.append("<li>Parameters:<ul>" + "".join(
                    f"<li>{H.code(k)}: {H.code(v)}</li>" for k, v in s.params_all) + "</ul></li>")
            else:
                o.append("<li>Parameters: none recorded</li>")
            o.append(f"<li>Command: {H.code(r.command)}</li><li>Code commit: {H.code(s.code_text)}</li></ul>")
        else:
            if s.params:
                items = []
                for c in s.params:
                    if c.kind == "changed":
                        items.append(f'<li><span class="kind">changed</span> {H.code(c.key)}: '
                                     f'{H.code(c.old)} → {H.code(c.new)}</li>')
                    elif c.kind == "added":
                        items.append(f'<li><span class="kind">added</span> {H.code(c.key)}: {H.code(c.new)}</li>')
                    else:
                        items.append(f'<li><span class="kind">removed</span> {H.code(c.key)}: {H.code(c.old)}</li>')
                o.append("<li>Parameters:<ul>" + "".join(items) + "</ul></li>")
            else:
                o.append("<li>Parameters: no changes</li>")
            if s.command_changed:
                o.append(f"<li>Command: {H.code(s.prev.command)} → {H.code(r.command)}</li>")
            else:
                o.append(f"<li>Command: unchanged ({H.code(r.command)})</li>")
            o.append(f"<li>Code commit: {H.code(s.code_text)}</li>")
            if s.diff_state == "missing":
                o.append("<li>Code diff: not available</li></ul>")
            elif s.diff_state == "empty":
                o.append("<li>Code diff: no code changes</li></ul>")
            else:
                o.append("<li>Code diff:</li></ul>")
                o.append(f'<pre class="diff">{_diff_html(s.diff_lines)}</pre>')
                if s.diff_more:
                    o.append(f'<p class="more">… {s.diff_more} more lines (diff cut at {DIFF_MAX_LINES} lines)</p>')

        o.append("<h4>Metrics</h4>")
        if s.metrics:
            o.append('<table class="metrics"><thead><tr><th>Metric</th><th>Last</th><th>Best</th><th>Min</th>'
                     "<th>Max</th><th>Points</th></tr></thead><tbody>")
            for n, m in s.metrics:
                o.append(f"<tr><td>{H.code(n)}{' (key)' if n == key else ''}</td>" + "".join(
                    f'<td class="num">{_h(_fmt_num(m.get(f)))}</td>' for f in ("last", "best", "min", "max", "count"))
                    + "</tr>")
            o.append("</tbody></table>")
        else:
            o.append("<p>No metrics recorded.</p>")

        if media and media.get(r.id):
            o.append("<h4>Media</h4>")
            o += _media_html(media[r.id])

        o.append("<h4>Hardware</h4>")
        if s.hardware:
            o.append("<ul>" + "".join(f"<li>{_h(k)}: {_h(v)}</li>" for k, v in s.hardware) + "</ul>")
        else:
            o.append("<p>No hardware summary recorded.</p>")

        o.append("<h4>Notes</h4>")
        if s.notes:
            for n in s.notes:
                o.append(f'<div class="note"><span class="who">{_h(n.user)}</span> · '
                         f'<span class="date">{_h(n.date)}</span>: <span class="text">{_h(n.text)}</span></div>')
        else:
            o.append("<p>No notes.</p>")
        if s.tags:
            o.append("<p>Tags: " + "".join(
                f'<span class="tag">{_h(t)}{" (" + _h(", ".join(who)) + ")" if who else ""}</span>'
                for t, who in s.tags) + "</p>")

        o.append("<h4>Artifacts</h4>")
        if s.artifacts:
            o.append("<ul>" + "".join(f"<li>{H.code(a)}</li>" for a in s.artifacts)
                     + (f"<li>… {s.artifacts_more} more</li>" if s.artifacts_more else "") + "</ul>")
        else:
            o.append("<p>No artifacts recorded.</p>")
        o.append("</section>")
    o.append("</section>")
    o.append("<footer>Costs are each instance's hourly price × the run's duration. "
             "This page is self-contained: no scripts, no network resources.</footer>")
    o.append("</body>")
    o.append("</html>")
    return "\n".join(o) + "\n"


# ---------------------------------------------------------------- public API

def build_report(path: list[Run], *, series: SeriesMap, code_diffs: Mapping[str, str],
                 annotations: Mapping[str, Sequence[Annotation]], key_metric: str | None = None,
                 title: str | None = None, now: datetime | None = None,
                 media: Mapping[str, Sequence[Any]] | None = None) -> tuple[str, str]:
    """A report of the lineage ``path`` (baseline ``path[0]`` … target ``path[-1]``): ``(markdown, html)``.

    ``series[run_id][metric] = (steps, values)``, already downsampled (a run or metric may be
    missing; NaN and ±inf are skipped). ``code_diffs[run_id]``: the unified diff of that run's
    code against the previous run of the path (the baseline's is not shown; missing means "not
    available", empty means "no code changes"; cut at :data:`DIFF_MAX_LINES` lines per step).
    ``annotations[run_id]``: notes and tags (removed ones are skipped). ``key_metric``: see
    :func:`pick_key_metric`. ``now``: the time running runs' durations and costs are measured to,
    and the report's "generated" time (default: the current time). ``media[run_id]``: the
    :class:`backends.media.ReportMedia` chosen for that run (images inline as data URIs, tables as
    HTML tables, confusion matrices and histograms as SVG, all text escaped; in the Markdown:
    tables, sparklines and a note that the images are in the HTML).
    """
    if not path:
        raise ValueError("build_report needs a path of at least one run")
    series = series or {}
    code_diffs = code_diffs or {}
    annotations = annotations or {}
    if now is None:
        now = clock.now()
    elif now.tzinfo is None:
        now = now.replace(tzinfo=timezone.utc)
    target = path[-1]
    key = pick_key_metric(path, series, key_metric)
    steps = _build_steps(path, key, series, code_diffs, annotations, now)
    title = _clean(title) if title else f"Lineage report: {target.display_name}"
    generated = now.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    names = _chart_metrics(path, key, series)
    charts = [_Chart(m, m == key, [(r, _finite_points(((series.get(r.id) or {}).get(m)))) for r in path])
              for m in names[:MAX_CHARTS]]
    more = names[MAX_CHARTS:]

    md = _render_md(title, generated, path, steps, key, charts, more, _summary(_Md, path, steps, key, annotations),
                    media)
    page = _render_html(title, generated, path, steps, key, charts, more,
                        _summary(_Html, path, steps, key, annotations), media)
    return md, page


def _atomic_write(target: Path, text: str) -> None:
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            data = text.encode("utf-8", errors="replace")
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise


def write_report(out_dir: Path, basename: str, markdown: str, html: str) -> tuple[Path, Path]:
    """Write ``<basename>.md`` and ``<basename>.html`` in ``out_dir`` (created if needed), each
    atomically: a reader sees the old file or the new one, never half of one. Returns both paths."""
    if not basename or basename in (".", "..") or "/" in basename or "\\" in basename or "\x00" in basename:
        raise LabdeckError(f"Bad report name {basename!r}.", "Use a plain file name without a directory.")
    out_dir = Path(out_dir)
    md_path, html_path = out_dir / f"{basename}.md", out_dir / f"{basename}.html"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(md_path, markdown)
        _atomic_write(html_path, html)
    except OSError as e:
        raise LabdeckError(f"Cannot write the report in {out_dir} ({e.strerror or e}).",
                           "Check that the directory is writable and the disk has space.") from None
    return md_path, html_path
