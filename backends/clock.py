"""The one clock seam: every shown or computed "now" in labdeck comes from here.

Cost so far, burn rate, budgets, durations, autostop countdowns, "2 min ago",
billing intervals, preemption times and the times stamped on records all read
:func:`now` (or :func:`iso`, :func:`wall`), never ``datetime.now()`` or
``time.time()`` on their own. Tests and the deterministic demo
(``tui.screenshots``) pin it with :func:`pinned` / :func:`pin`, so what they show
does not depend on the day the suite runs.

Not read from here, on purpose:
- intervals and timeouts (``time.monotonic()``): they measure elapsed time, not the date;
- file modification times compared with the wall clock (stale-lock checks): the file
  system stamps mtimes with the real clock, so the comparison must use it too;
- the stdlib-only programs that labdeck copies to instances (``backends/runtime/``):
  they stamp what the host's own clock says, which is the point of them.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Callable, Iterator

_lock = threading.Lock()
_source: Callable[[], datetime] | None = None


def now() -> datetime:
    """The current time, timezone-aware UTC."""
    src = _source
    if src is None:
        return datetime.now(timezone.utc)
    t = src()
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def wall() -> float:
    """:func:`now` as epoch seconds (what ``time.time()`` would say)."""
    if _source is None:
        return time.time()
    return now().timestamp()


def iso(t: datetime | None = None) -> str:
    """The stored form of a time: UTC ISO-8601 with milliseconds and a ``Z`` (default: :func:`now`)."""
    t = now() if t is None else t
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return t.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def pin(at: datetime | Callable[[], datetime] | None) -> None:
    """Make :func:`now` return ``at`` (a fixed time, or a function giving one); ``None`` restores the
    real clock. Prefer :func:`pinned`, which restores what was there before."""
    global _source
    with _lock:
        if at is None or callable(at):
            _source = at
        else:
            fixed = at if at.tzinfo else at.replace(tzinfo=timezone.utc)
            _source = lambda: fixed  # noqa: E731


def pinned_source() -> Callable[[], datetime] | None:
    return _source


@contextmanager
def pinned(at: datetime | Callable[[], datetime]) -> Iterator["Manual"]:
    """Pin the clock for the ``with`` block. Yields a :class:`Manual` clock starting at ``at`` (when
    ``at`` is a datetime) that the block may advance."""
    before = _source
    manual = Manual(at) if isinstance(at, datetime) else None
    pin(manual.now if manual is not None else at)
    try:
        yield manual  # type: ignore[misc]
    finally:
        pin(before)


class Manual:
    """A clock that moves only when told to (``advance``), for tests."""

    def __init__(self, start: datetime) -> None:
        self._t = start if start.tzinfo else start.replace(tzinfo=timezone.utc)
        self._lock = threading.Lock()

    def now(self) -> datetime:
        with self._lock:
            return self._t

    def advance(self, seconds: float) -> datetime:
        with self._lock:
            self._t += timedelta(seconds=seconds)
            return self._t

    def set(self, t: datetime) -> None:
        with self._lock:
            self._t = t if t.tzinfo else t.replace(tzinfo=timezone.utc)
