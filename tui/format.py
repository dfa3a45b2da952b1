"""Small text formatters shared by the tabs and the CLI."""

from __future__ import annotations

import re
from datetime import datetime

from rich.text import Text

from backends.models import parse_time
from backends.text import plain, plain_line

STATE_STYLE = {
    "queued": "grey70", "syncing": "cyan", "running": "bold green", "succeeded": "green",
    "failed": "bold red", "cancelled": "yellow", "lost": "magenta", "preempted": "magenta",
    "unreachable": "bold red", "connecting": "yellow", "healthy": "bold green", "starting": "cyan", "stopped": "yellow", "pending": "cyan", "terminated": "grey50",
}


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600:02d}h"


def since(iso: str | None, now: datetime) -> str:
    t = parse_time(iso)
    return duration((now - t).total_seconds()) if t else "–"


def money(per_hour: float) -> str:
    """$/h; a price that is not a number (a hand-edited or hostile record) shows as "?"."""
    if not per_hour:
        return "–"
    try:
        return f"${float(per_hour):,.3f}"
    except (TypeError, ValueError, OverflowError):
        return "?"


def plural(n: int, word: str, words: str | None = None) -> str:
    """"1 run", "2 runs", "0 runs" (``words`` for an irregular plural, e.g. "1 match", "2 matches")."""
    return f"{n:,} {word if n == 1 else (words or word + 's')}"


def slug(value, limit: int = 48) -> str:
    """A file-name piece from outside text: lower-case ASCII letters, digits, ``.`` ``_`` and single
    ``-`` ("Wider model (rerun)" → "wider-model-rerun"); "" when nothing of it is left."""
    import unicodedata

    ascii_ = unicodedata.normalize("NFKD", plain_line(value)).encode("ascii", "ignore").decode()  # é → e
    s = re.sub(r"[^a-z0-9._]+", "-", ascii_.lower())
    return re.sub(r"-{2,}", "-", s)[:limit].strip("-._")


def short_id(run_id: str) -> str:
    return run_id[-8:].lower()


def state_markup(state: str) -> str:
    """A state as rich markup, coloured when it has a colour (and never an empty tag)."""
    from rich.markup import escape

    style = STATE_STYLE.get(state) if isinstance(state, str) else None
    shown = escape(plain_line(state))  # a state is read from a record: text, never markup
    return f"[{style}]{shown}[/]" if style else shown


# ---- text from outside: never markup, never a terminal control (see backends.text) ----
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff\u202a-\u202e\u2066-\u2069]")


def cell(value, style: str = "") -> Text:
    """One line of outside text (a name, a user, a last log line) for a table cell or a label: plain
    ``Text``, so ``[/]`` or ``[@click=…]`` is shown, not parsed, and escapes are gone."""
    return Text(plain_line(value), style=style, end="")


def text(value, style: str = "") -> Text:
    """Outside text of several lines (a command, a note, an error) as plain ``Text``."""
    return Text(plain(value), style=style, end="")


def safe(value, *, lines: bool = False) -> Text:
    """What a widget gets shown: a ``str`` is outside text (never markup; one line unless ``lines``); a
    ``Text`` built by labdeck keeps its styles, with any control character left in it replaced one for
    one (spans stay put)."""
    if not isinstance(value, Text):
        return text(value) if lines else cell(value)
    if _UNSAFE.search(value.plain) is None:
        return value
    t = value.copy()
    t.plain = _UNSAFE.sub("\ufffd", value.plain)
    return t


def _recorded_code(run) -> str:
    """Where a run's recorded code is on its instance: what :func:`backends.ownership.copy_code` copies."""
    return f"{run.run_dir}/code" if isinstance(run.code, dict) and run.code else (run.workdir or "–")


def use_plan(run, me: str, action: str) -> list[tuple[str, str]]:
    """What serving (``action="serve"``) or opening a notebook on someone else's ``run`` would do, as
    (label, plain text) lines, shown before it happens: their files, loaded or run by your Python."""
    where = _recorded_code(run)
    lines = [("run", f"{plain_line(run.user)}'s {plain_line(run.display_name)} on {plain_line(run.instance)}")]
    if action == "serve":
        arts = [a for a in (run.artifacts if isinstance(run.artifacts, list) else []) if isinstance(a, str)]
        lines.append(("model", plain_line(", ".join(arts[:3]) or "the run's model artifact")
                      + " — copied into a directory of yours; a .pkl/.joblib/.pt file runs code when it is loaded"))
    else:
        lines.append(("code", f"a copy of {plain_line(where)}, made into a directory of yours; "
                              "cells you run there execute it"))
    lines.append(("runs as", f"you ({plain_line(me)}), with your Python, none of their environment"))
    return lines


def rerun_plan(run, me: str, *, command: str | None = None, env: dict | None = None) -> list[tuple[str, str]]:
    """What a rerun of someone else's ``run`` would do, as (label, plain text) lines: the TUI and the CLI
    show these before rerunning it (their command, environment and code would run as ``me``); ``command``
    and ``env``: a rerun with changes (the command and environment that would run instead of theirs).
    Mirrors :meth:`backends.workstation.Workstation.rerun`: a copy of the run's recorded code on its
    instance, in a directory of yours."""
    code = run.code if isinstance(run.code, dict) else {}
    where = _recorded_code(run)
    source = (f"a copy of {where} on {run.instance}, made into a directory of yours"
              + (f" (recorded at commit {str(code['commit'])[:12]}" + (" + uncommitted changes)" if code.get("dirty") else ")")
                 if code.get("commit") else ""))
    changed = command is not None and command != run.command
    lines = [("command", plain(command if changed else run.command) + (f"   (theirs: {plain(run.command)})" if changed else "")),
             ("instance", plain_line(run.instance)),
             ("code", plain_line(source)), ("owner", f"{plain_line(run.user)} (it runs as you, {plain_line(me)})")]
    env = env if env is not None else run.env if isinstance(run.env, dict) else {}
    if env:
        lines.append(("environment", plain_line(" ".join(f"{k}={v}" for k, v in sorted(env.items(), key=str)))))
    return lines
