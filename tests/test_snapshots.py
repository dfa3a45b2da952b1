"""One snapshot per tab (and per screen state worth guarding), from the deterministic demo state.

Refresh after an intended change with:  python3 -m pytest tests/test_snapshots.py --snapshot-update
"""

from __future__ import annotations

import pytest

from tui.screenshots import SHOTS, SIZE, demo_app, demo_lock, pressing


@pytest.mark.parametrize("name, with_runs, keys", SHOTS, ids=[s[0] for s in SHOTS])
def test_snapshot(snap_compare, name: str, with_runs: bool, keys: list[str]) -> None:
    with demo_lock():
        assert snap_compare(demo_app(with_runs=with_runs), run_before=pressing(keys), terminal_size=SIZE)


def _faketime() -> str:
    import os
    import shutil

    path = shutil.which("faketime")
    if path is None:
        if os.environ.get("LABDECK_REQUIRE_RIG") == "1":
            pytest.fail("faketime is not installed (Debian package faketime; .ci/run installs it)")
        pytest.skip("needs faketime (Debian package faketime)")
    return path


@pytest.mark.parametrize("offset", ["+400d", "-400d"])
def test_snapshots_on_another_day(offset: str) -> None:
    """The snapshots with the wall clock moved far away: nothing they show may read the real date."""
    import subprocess
    import sys

    res = subprocess.run([_faketime(), "-f", offset, sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "tests/test_snapshots.py", "-k", "test_snapshot and not another_day"],
                         capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert " passed" in res.stdout and "failed" not in res.stdout


def test_screenshots_are_current_on_any_day(tmp_path) -> None:
    """``python3 -m tui.screenshots`` on another day writes exactly the SVGs in ``screenshots/``."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    res = subprocess.run([_faketime(), "-f", "+400d", sys.executable, "-m", "tui.screenshots", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, cwd=repo, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr[-4000:]
    written = sorted(p.name for p in tmp_path.glob("*.svg"))
    assert written == sorted(p.name for p in (repo / "screenshots").glob("*.svg"))
    stale = [n for n in written if (tmp_path / n).read_bytes() != (repo / "screenshots" / n).read_bytes()]
    assert not stale, f"screenshots/ is not what `python3 -m tui.screenshots` writes now: {stale} (regenerate them)"


SMALL = (80, 24)  # the smallest terminal labdeck is made for: every tab and every form must be usable in it
SMALL_SHOTS = [
    ("welcome", False, []),
    ("instances", True, ["1"]),
    ("jobs", True, ["2"]),
    ("monitor", True, ["3"]),
    ("lineage", True, ["4", "enter", "down"]),
    ("models", True, ["5"]),
    ("help", True, ["2", "question_mark"]),
    ("help-lineage", True, ["4", "question_mark"]),
    ("compare", True, ["4", "enter", "m", "down", "m", "c"]),
    ("run-form", True, ["2", "n"]),
    # Tab through every field to the buttons: the form scrolls so the focused one is on screen
    ("run-form-buttons", True, ["2", "n", *["tab"] * 6]),  # command → … → Start
    ("launch-cloud", True, ["1", "u"]),
    ("launch-cloud-buttons", True, ["1", "u", *["tab"] * 6]),  # name → … → Launch
    ("lineage-filter", True, ["4", "slash"]),
]


@pytest.mark.parametrize("name, with_runs, keys", SMALL_SHOTS, ids=[s[0] for s in SMALL_SHOTS])
def test_snapshot_80x24(snap_compare, monkeypatch, name: str, with_runs: bool, keys: list[str]) -> None:
    monkeypatch.chdir("/")  # the run form's working directory defaults to the current one: the same in every checkout
    with demo_lock():
        assert snap_compare(demo_app(with_runs=with_runs), run_before=pressing(keys), terminal_size=SMALL)
