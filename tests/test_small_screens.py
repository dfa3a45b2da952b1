"""Every screen usable at 80×24, and the small fixes of issue 17 around it (Pilot tests over the demo state).

The 80×24 snapshots are in tests/test_snapshots.py (test_snapshot_80x24); these check the behaviour
behind them: the focused field of a form is always on screen, `?` is always in the footer, help and
charts fit, the hints name the keys actually bound, the palette finds tab actions."""

from __future__ import annotations

import pytest
from textual.widgets import DataTable, Input, OptionList
from textual.widgets._footer import FooterKey

from tui.forms import LaunchScreen, UpScreen
from tui.screenshots import demo_app, demo_lock, feed_monitor, settle
from tui.widgets import CompareScreen, HelpScreen, compare_value

SMALL = (80, 24)


@pytest.fixture
def demo():
    with demo_lock():
        yield demo_app(with_runs=True)


def notes(app) -> list[str]:
    return [n.message for n in app._notifications]


def on_screen(app, widget) -> bool:
    """The widget is drawn whole inside the terminal and inside every scrolling container around it."""
    region = widget.region
    if not region.area or not app.screen.region.contains_region(region):
        return False
    for ancestor in widget.ancestors:
        if getattr(ancestor, "is_scrollable", False) and ancestor.region.area and \
                not ancestor.region.contains_region(region):
            return False
    return True


async def test_the_footer_shows_help_first_on_every_tab_at_80_columns(demo) -> None:
    app = demo
    async with app.run_test(size=SMALL) as pilot:
        await settle(pilot)
        for tab in "12345":
            await pilot.press(tab)
            await settle(pilot)
            keys = list(app.screen.query(FooterKey))
            assert keys[0].key == "question_mark", [k.key for k in keys]
            assert on_screen(app, keys[0]) and keys[0].region.x < 10


@pytest.mark.parametrize("open_keys, form", [(["2", "n"], LaunchScreen), (["1", "u"], UpScreen)], ids=["run", "cloud"])
async def test_every_field_of_a_form_is_on_screen_when_focused_at_80x24(demo, open_keys, form) -> None:
    """Tab walks every field and button (the checkbox, Start/Launch and Cancel included), and each one is
    scrolled into view as it gets focus; shift+tab walks back up the same way."""
    app = demo
    async with app.run_test(size=SMALL) as pilot:
        await settle(pilot)
        for key in open_keys:
            await pilot.press(key)
            await settle(pilot)
        assert isinstance(app.screen, form)
        seen = []
        for key in ["tab"] * 12 + ["shift+tab"] * 12:
            await pilot.press(key)
            await settle(pilot)
            focused = app.focused
            assert focused is not None and on_screen(app, focused), (key, focused, focused.region)
            seen.append(focused.id)
        assert {"launch-start", "launch-cancel", "launch-sync"} <= set(seen) if form is LaunchScreen \
            else {"up-start", "up-cancel", "up-spot", "up-action"} <= set(seen)
        dialog = app.screen.query_one("#launch-dialog")
        assert dialog.region.right <= SMALL[0] and dialog.region.bottom <= SMALL[1]


async def test_help_fits_at_80x24_and_lineage_help_tells_expand_and_the_filter_syntax(demo) -> None:
    app = demo
    async with app.run_test(size=SMALL) as pilot:
        await settle(pilot)
        await pilot.press("2", "question_mark")
        await settle(pilot)
        assert isinstance(app.screen, HelpScreen)
        dialog = app.screen.query_one("#help-dialog")
        assert dialog.region.right <= SMALL[0] and dialog.region.x >= 0  # both borders on screen
        await pilot.press("escape", "4", "question_mark")
        await settle(pilot)
        rows = [str(c) for t in app.screen.query(DataTable) for r in range(t.row_count) for c in t.get_row_at(r)]
        assert any("Expand" in r for r in rows)
        text = str(app.screen.query_one(".help-notes").render())
        assert "query language" in text and "lr>1e-3 and state:succeeded" in text


async def test_monitor_charts_take_the_width_they_have_at_80_columns(demo) -> None:
    app = demo
    async with app.run_test(size=SMALL) as pilot:
        await settle(pilot)
        feed_monitor(app)
        await pilot.press("3")
        await settle(pilot)
        cpu = app.query_one("#cpu-chart")
        assert cpu.size.width >= 24, cpu.size  # it was 13 next to a 40-column run list
        assert app.query_one("#monitor-runs").size.width <= 24
        # an instance without GPUs: the CPU chart takes the whole row
        inst = app.workstation.monitor.instances[app.query_one("#monitor-view").instance]
        inst.gpu_util.clear()
        app.query_one("#monitor-view").rerender()
        await settle(pilot)
        assert not app.query_one("#gpu-chart").display and cpu.size.width >= 50


async def test_lineage_hints_name_the_keys_actually_bound(demo) -> None:
    app = demo
    async with app.run_test(size=SMALL) as pilot:
        await settle(pilot)
        await pilot.press("4", "c")
        await settle(pilot)
        assert any(n.startswith("Mark two runs with m first") for n in notes(app)), notes(app)
        app.set_keymap({"lineage.mark": "ctrl+k"})
        await pilot.press("c")
        await settle(pilot)
        assert any(n.startswith("Mark two runs with ctrl+k first") for n in notes(app)), notes(app)
        await pilot.press("slash")
        assert "lr>1e-3 and state:succeeded" in app.query_one("#filter-bar", Input).placeholder
        await pilot.press("escape", "2", "slash")
        assert "text to match in any column" in app.query_one("#filter-bar", Input).placeholder


async def test_compare_shows_both_runs_metrics_side_by_side_above_the_fold(demo) -> None:
    assert compare_value(0.997802734375) == "0.9978" and compare_value(3e-4) == "0.0003" and compare_value("adam") == "adam"
    app = demo
    async with app.run_test(size=SMALL) as pilot:
        await settle(pilot)
        await pilot.press("4", "enter", "m", "down", "m", "c")
        await settle(pilot)
        assert isinstance(app.screen, CompareScreen)
        table = app.screen.query_one("#compare-table", DataTable)
        rows = {str(table.get_row_at(r)[0]): [str(c) for c in table.get_row_at(r)[1:]] for r in range(table.row_count)}
        assert rows["metric loss"] == ["0.312", "0.25"] and rows["param lr"] == ["0.1", "0.3"]
        assert on_screen(app, table)  # every row of both runs, with no scrolling


async def test_palette_finds_tab_actions_and_lists_keys_once(demo) -> None:
    app = demo
    async with app.run_test(size=(120, 34)) as pilot:
        await settle(pilot)
        titles = [c.title for c in app.get_system_commands(app.screen)]
        assert "Keys" not in titles and "Quit" in titles
        await pilot.press("2", "ctrl+p", *"serve")
        await settle(pilot)
        await pilot.pause(0.5)
        found = [str(o.prompt) for o in app.screen.query_one("CommandList", OptionList)._options]
        assert any("Jobs: Serve (S)" in f for f in found), found
        await pilot.press("escape")
        await settle(pilot)
        await pilot.press("ctrl+p", *"jobs: new run")  # choosing one runs the tab's action
        await settle(pilot)
        await pilot.pause(0.5)
        await pilot.press("enter")
        await settle(pilot)
        assert isinstance(app.screen, LaunchScreen)


async def test_instances_footer_offers_no_lifecycle_for_local(demo) -> None:
    app = demo
    async with app.run_test(size=(120, 34)) as pilot:
        await settle(pilot)
        await pilot.press("1")
        await settle(pilot)
        table = app.query_one("#instances-table", DataTable)

        def footer() -> set[str]:
            return {k.description for k in app.screen.query(FooterKey)}

        table.move_cursor(row=[k.value for k in table.rows].index("local"))
        await settle(pilot)
        assert not {"Stop", "Start", "Terminate", "Autostop"} & footer() and "Launch" in footer()
        before = len(notes(app))
        await pilot.press("s")  # the key does nothing (it would only be refused)
        await settle(pilot)
        assert len(notes(app)) == before and app.screen is app.screen_stack[0]
        table.move_cursor(row=[k.value for k in table.rows].index("t4-dev"))
        await settle(pilot)
        assert {"Stop", "Start", "Terminate", "Autostop"} <= footer()


async def test_monitor_defaults_to_a_useful_run_and_keeps_its_list_order(demo) -> None:
    from dataclasses import replace

    from tui.tabs.monitor import default_run

    app = demo
    async with app.run_test(size=(120, 34)) as pilot:
        await settle(pilot)
        runs = app.runs
        # after a restart alice has nothing running; her newest run is a cancelled rerun with no metrics:
        # Monitor opens on the newest run that has metrics (bob's running one), not on that
        rerun = next(r for r in runs if r.name == "wider-model (rerun)")
        bare = [replace(r, metrics_summary={}) if r.id == rerun.id else r for r in runs]
        pick = default_run(bare, "alice")
        assert pick is not None and pick.name == "bob-augment" and pick.metrics_summary
        running = replace(rerun, state="running", metrics_summary={})
        assert default_run([running if r.id == rerun.id else r for r in bare], "alice").id == rerun.id  # yours, running
        await pilot.press("3")
        await settle(pilot)
        tab = app.query_one("#monitor-view")
        before = list(tab._listed)
        ol = app.query_one("#monitor-runs", OptionList)
        ol.highlighted = 3
        under = before[3]
        # states change, metrics arrive, a run is overlaid: the order and the cursor's run stay
        changed = [replace(r, state="succeeded") if r.state == "running" else r for r in runs]
        tab.show_runs(changed, {})
        await pilot.press("space")
        await settle(pilot)
        assert tab._listed == before and tab._listed[ol.highlighted] == under
        assert before == sorted(before, reverse=True)  # newest first
