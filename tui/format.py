"""Small text formatters shared by the tabs and the CLI."""

from __future__ import annotations

from datetime import datetime

from backends.models import parse_time

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
    return f"${per_hour:,.3f}" if per_hour else "–"


def short_id(run_id: str) -> str:
    return run_id[-8:].lower()


def state_markup(state: str) -> str:
    """A state as rich markup, coloured when it has a colour (and never an empty tag)."""
    from rich.markup import escape

    style = STATE_STYLE.get(state)
    return f"[{style}]{escape(state)}[/]" if style else escape(state)
