"""Which hosts this labdeck can reach now, and since when it cannot reach the others.

Fed from several places, each a *source* with its own say: the SSH pool (a connection lost,
keepalives unanswered, a connect that failed, a jump host down on the way: ``ssh``), the
instance listing (a host that did not answer its round within its deadline: ``listing``) and the
status reads of runs (``round``). A host is unreachable while any source says so, since the
earliest of them; each source clears only its own word. Listeners hear of every change, so a
screen can show it at once instead of at its next refresh.

Nothing here changes a run's record: a run on a host that cannot be reached is shown as
such (``running?``), not moved to ``lost`` because a link flapped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from . import clock

#: Seconds a host has to answer one round (the listing, status reads) before it is shown unreachable;
#: a provider may set its own (``host_deadline``).
HOST_DEADLINE = 3.0


@dataclass(frozen=True)
class HostHealth:
    name: str
    reachable: bool = True
    since: float | None = None  # clock.wall() when it was found unreachable
    reason: str = ""

    def text(self, now: float | None = None) -> str:
        """``node2 unreachable for 12 s: no answer to keepalives`` (plain text; the reason is the
        host's or the network's words and is shown as text only)."""
        if self.reachable:
            return f"{self.name} reachable"
        now = clock.wall() if now is None else now
        secs = max(0, int(now - (self.since if self.since is not None else now)))
        span = f"{secs} s" if secs < 120 else f"{secs // 60} min"
        return f"{self.name} unreachable for {span}" + (f": {self.reason}" if self.reason else "")


class HealthMap:
    def __init__(self) -> None:
        self._down: dict[str, dict[str, tuple[float, str]]] = {}  # host -> source -> (since, reason)
        self._listeners: list[Callable[[str], None]] = []
        self.changes = 0  # bumps on every change (a screen compares it to what it showed)

    def subscribe(self, callback: Callable[[str], None]) -> None:
        self._listeners.append(callback)

    def unsubscribe(self, callback: Callable[[str], None]) -> None:
        try:
            self._listeners.remove(callback)
        except ValueError:
            pass

    def _notify(self, name: str) -> None:
        self.changes += 1
        for cb in list(self._listeners):
            cb(name)

    def mark_down(self, name: str, reason: str, *, since: float | None = None, source: str = "round") -> None:
        srcs = self._down.setdefault(name, {})
        old = srcs.get(source)
        was_down = self.get(name).reachable is False
        if old is not None and old[1] == reason:
            return
        srcs[source] = (old[0] if old is not None else (since if since is not None else clock.wall()), reason)
        if not was_down or self.get(name).reason != reason or old is None:
            self._notify(name)

    def mark_up(self, name: str, *, source: str = "round") -> None:
        srcs = self._down.get(name)
        if not srcs or source not in srcs:
            return
        del srcs[source]
        if not srcs:
            del self._down[name]
        self._notify(name)

    def get(self, name: str) -> HostHealth:
        srcs = self._down.get(name)
        if not srcs:
            return HostHealth(name)
        since, reason = min(srcs.values(), key=lambda v: v[0])
        return HostHealth(name, False, since, reason)

    def unreachable(self) -> dict[str, HostHealth]:
        return {n: self.get(n) for n in self._down}

    def is_down(self, name: str) -> bool:
        return name in self._down
