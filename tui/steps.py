"""Step axes: tick positions and labels for a chart whose x axis is the training step.

Steps are integers (kept exact from the event file or metrics line to the series); the chart
library would label its axis with floats ("1000.0", "9.2e+18"). :func:`step_ticks` gives a few
round integer ticks over the shown range and their labels as integers ("250", "20k", "1.5M",
or all the digits when no short form is exact).
"""

from __future__ import annotations

import math

__all__ = ["step_ticks", "step_label"]

_SUFFIXES = ((10**18, "E"), (10**15, "P"), (10**12, "T"), (10**9, "G"), (10**6, "M"), (10**3, "k"))


def step_label(step: int) -> str:
    """An integer step, short when that is exact: 20000 → "20k", 1500000 → "1.5M", 1234 → "1234"."""
    step = int(step)
    for div, suf in _SUFFIXES:
        if abs(step) >= div:
            for digits in (0, 1, 2):
                scaled = step * 10**digits
                if scaled % div == 0:
                    q = scaled // div
                    txt = str(q) if not digits else f"{q / 10**digits:.{digits}f}"
                    if len(txt) <= 6:
                        return txt + suf
            break
    return str(step)


def step_ticks(lo: float, hi: float, n: int = 5) -> tuple[list[float], list[str]]:
    """About ``n`` round integer ticks within ``[lo, hi]`` (chart coordinates) and their labels."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [], []
    a, b = math.ceil(min(lo, hi)), math.floor(max(lo, hi))
    if b < a:
        return [], []
    if a == b:
        return [float(a)], [step_label(a)]
    raw = max(1, (b - a) // (n + 1))
    mag = 10 ** (len(str(raw)) - 1)
    # the smallest round step that puts at most n + 1 ticks on the range
    step = next(c for c in (mag, 2 * mag, 5 * mag // 2 or 2, 5 * mag, 10 * mag, 20 * mag, 50 * mag)
                if (b - a) // c + 1 <= n + 1)
    first = -(-a // step) * step
    ticks = list(range(first, b + 1, step))[: n + 2]
    return [float(t) for t in ticks], [step_label(t) for t in ticks]
