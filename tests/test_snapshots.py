"""One snapshot per tab (and per screen state worth guarding), from the deterministic demo state.

Refresh after an intended change with:  python3 -m pytest tests/test_snapshots.py --snapshot-update
"""

from __future__ import annotations

import pytest

from tui.screenshots import SHOTS, SIZE, demo_app, feed_monitor, settle


@pytest.mark.parametrize("name, with_runs, keys", SHOTS, ids=[s[0] for s in SHOTS])
def test_snapshot(snap_compare, name: str, with_runs: bool, keys: list[str]) -> None:
    async def prepare(pilot) -> None:
        await settle(pilot)
        feed_monitor(pilot.app)
        for key in keys:
            await pilot.press(key)
            await settle(pilot)

    assert snap_compare(demo_app(with_runs=with_runs), run_before=prepare, terminal_size=SIZE)
