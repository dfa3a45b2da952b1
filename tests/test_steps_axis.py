"""Integer step axes for the metric charts (tui/steps.py)."""

from __future__ import annotations

from tui.steps import step_label, step_ticks


def test_step_labels_are_exact_integers() -> None:
    assert [step_label(s) for s in (0, 7, 1234, 20000, 1500000, 2**63 - 1, -3000)] == \
        ["0", "7", "1234", "20k", "1.5M", "9223372036854775807", "-3k"]
    assert step_label(2**53 + 1) == "9007199254740993"  # no short form is exact: all the digits


def test_step_ticks_are_round_integers_within_the_range() -> None:
    pos, labels = step_ticks(8.5, 293.5)
    assert labels == ["50", "100", "150", "200", "250"] and pos == [50.0, 100.0, 150.0, 200.0, 250.0]
    for lo, hi in ((0, 1), (0, 7), (-5, 99999), (3, 3), (0, 2.0**63), (1e6, 1e6 + 3)):
        pos, labels = step_ticks(lo, hi)
        assert pos and all(lo <= p <= hi for p in pos) and len(pos) <= 7
        assert all("." not in lab or lab[-1].isalpha() for lab in labels)  # never "1000.0"
    assert step_ticks(1.2, 1.8) == ([], []) and step_ticks(float("nan"), 1) == ([], [])
