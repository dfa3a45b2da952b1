"""Table manners (sort, g/G, columns that fit) and rerun with changes (`R`, `labdeck rerun --set`)."""

from __future__ import annotations

import asyncio

import dataclasses
import json
import sys
from pathlib import Path

import pytest
from rich.text import Text

from backends import lineage as lin
from backends.config import load_config
from backends.errors import LabdeckError
from backends.lineage import set_params
from backends.paths import Paths
from backends.workstation import Workstation
from tui.app import LabdeckApp
from tui.rerunform import RerunScreen
from tui.screenshots import demo_app, settle
from tui.tabs.jobs import JobsTab
from tui.tabs.lineage import LineageTab
from tui.widgets import ConfirmScreen, HelpScreen, SortTable

from .conftest import wait_final
from .test_cli import labdeck

SIZE = (120, 34)
QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart"


@pytest.fixture
def demo(tmp_path: Path):
    return demo_app(home=tmp_path / "demo")


def keys_of(table: SortTable) -> list[str]:
    return [k.value for k in table.rows]


def labels(table: SortTable) -> list[str]:
    return [c.label.plain for c in table.columns.values()]


def widths(table: SortTable) -> dict[str, int]:
    return {table.labels[i]: c.content_width for i, c in enumerate(table.columns.values())}


# ---- sorting ---------------------------------------------------------------------------
async def test_sort_cycles_inverts_and_survives_a_refresh_with_the_cursor_on_its_row(demo) -> None:
    async with demo.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("2")
        tab = demo.query_one(JobsTab)
        table = demo.query_one("#jobs-table", SortTable)
        newest_first = keys_of(table)
        assert table.sort_column is None and "▲" not in "".join(labels(table))

        await pilot.press(*[">"] * 6)  # Run, Name, State, Instance, User, Duration
        assert labels(table)[5] == "Duration ▼" and table.sort_label == "Duration ▼"
        by_id = {r.id: r for r in tab.runs}
        secs = [tab.sort_values(by_id[k])[5] for k in keys_of(table)]
        known = [s for s in secs if s is not None]
        assert known == sorted(known, reverse=True) and len(known) >= 3  # by seconds, not by the text "2h03m"
        assert all(s is None for s in secs[len(known):])  # queued runs (no duration) last
        assert "sorted by Duration ▼" in str(demo.query_one("#jobs-status").render())

        # the cursor stays on its run when a refresh re-sorts (a row moving under the cursor is a classic)
        table.move_cursor(row=2)
        chosen = keys_of(table)[2]
        order = keys_of(table)
        tab.show_runs(list(reversed(tab.runs)), {})  # a refresh: the same runs, read in another order
        await pilot.pause()
        assert keys_of(table) == order and tab.selected().id == chosen
        tab.show_runs(list(reversed(tab.runs)), {})  # and back to the app's order (newest first)
        await pilot.pause()

        await pilot.press("I")
        assert labels(table)[5] == "Duration ▲"
        secs = [tab.sort_values(by_id[k])[5] for k in keys_of(table)]
        known = [s for s in secs if s is not None]
        assert known == sorted(known) and all(s is None for s in secs[len(known):])  # missing still last
        assert tab.selected().id == chosen

        await pilot.press("<")  # back to User, ascending (text)
        users = [by_id[k].user for k in keys_of(table)]
        assert users == sorted(users) and labels(table)[4] == "User ▲"
        await pilot.press(*[">"] * 3)  # Duration, Last line, then the tab's own order again
        assert table.sort_column is None and keys_of(table) == newest_first
        assert not any("▲" in label or "▼" in label for label in labels(table))

        await pilot.press("I")  # nothing to invert: says how to pick a column
        assert any("to pick a column" in n.message for n in demo._notifications)


async def test_g_G_home_end_jump_to_the_first_and_last_row(demo) -> None:
    async with demo.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("2")
        table = demo.query_one("#jobs-table", SortTable)
        assert table.row_count > 3
        await pilot.press("G")
        assert table.cursor_row == table.row_count - 1
        await pilot.press("g")
        assert table.cursor_row == 0
        await pilot.press("end")
        assert table.cursor_row == table.row_count - 1
        await pilot.press("home")
        assert table.cursor_row == 0
        await pilot.press("1", "G")  # every table: Instances too
        assert demo.query_one("#instances-table", SortTable).cursor_row == demo.query_one(
            "#instances-table", SortTable).row_count - 1


async def test_the_keys_are_in_the_footer_and_in_help(demo) -> None:
    async with demo.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("2")
        shown = {k: ab.binding.description for k, ab in demo.screen.active_bindings.items() if ab.binding.show}
        assert shown.get("greater_than_sign") == "Sort" and shown.get("I") == "Invert" and shown.get("R")
        await pilot.press("question_mark")
        assert isinstance(demo.screen, HelpScreen)
        ids = {str(t.get_row_at(i)[2]) for t in demo.screen.query("DataTable") for i in range(t.row_count)}
        assert {"table.sort", "table.sort_back", "table.invert", "table.first", "table.last", "jobs.rerun_changes"} <= ids


async def test_instances_and_models_sort_by_their_numbers(demo) -> None:
    async with demo.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("5")
        table = demo.query_one("#models-table", SortTable)
        table.sort_by("Up", reverse=True)
        await pilot.pause()
        assert labels(table)[8] == "Up ▼"
        assert table.row_count >= 1


# ---- widths -------------------------------------------------------------------------------
async def test_columns_grow_and_shrink_with_their_content_up_to_a_maximum(demo) -> None:
    async with demo.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("2")
        tab = demo.query_one(JobsTab)
        table = demo.query_one("#jobs-table", SortTable)
        runs = list(tab.runs)
        demo.idle = {}  # no "⚠ GPU 3%" beside a state here
        short = [dataclasses.replace(r, last_line="ok", state="queued" if i else r.state) for i, r in enumerate(runs)]
        tab.show_runs(short, {})
        await pilot.pause()
        assert widths(table)["Last line"] == len("Last line")  # header-wide: every line is "ok"
        # a refresh brings longer text: the column grows (it used to stay as wide as its first rows)
        grown = [dataclasses.replace(short[0], last_line="done: final loss=0.0715 acc=0.9973", state="succeeded"), *short[1:]]
        tab.show_runs(grown, {})
        await pilot.pause()
        assert widths(table)["Last line"] == len("done: final loss=0.0715 acc=0.9973")
        assert widths(table)["State"] == len("succeeded")
        row = table.get_row(grown[0].id)
        assert str(row[6]) == "done: final loss=0.0715 acc=0.9973" and str(row[2]) == "succeeded"
        # longer than the column's maximum: cut, with an ellipsis; the name too
        huge = [dataclasses.replace(grown[0], last_line="x" * 300, name="n" * 100), *grown[1:]]
        tab.show_runs(huge, {})
        await pilot.pause()
        row = table.get_row(huge[0].id)
        assert str(row[6]) == "x" * 79 + "…" and widths(table)["Last line"] == 80
        assert str(row[1]) == "n" * 31 + "…" and widths(table)["Name"] == 32
        # and back: it shrinks again
        tab.show_runs(short, {})
        await pilot.pause()
        assert widths(table)["Last line"] == len("Last line") and widths(table)["State"] < len("succeeded") + 1


def test_outside_text_stays_plain_when_cut() -> None:
    table = SortTable(("A",), max_widths={"A": 5})
    cut = table.cap(0, Text("[red]abcdefgh"))
    assert cut.plain == "[red…" and not cut.spans


# ---- set_params: how a changed parameter reaches the job ------------------------------------------
@pytest.mark.parametrize("command, sets, expected, env", [
    ("python train.py --steps 300 --lr 0.1", {"lr": "3e-4"}, "python train.py --steps 300 --lr 3e-4", {}),
    ("python train.py --lr=0.1 && echo ok", {"lr": "0.2"}, "python train.py --lr=0.2 && echo ok", {}),
    ("python train.py optimizer.lr=0.1 +seed=1", {"optimizer.lr": "1e-3", "seed": "2"},
     "python train.py optimizer.lr=1e-3 +seed=2", {}),
    ("python t.py --name 'a b' --x -1", {"name": "c d", "x": "2"}, "python t.py --name 'c d' --x 2", {}),
    ("python t.py --lr 0.1", {"dim": "8"}, "python t.py --lr 0.1", {"dim": 8}),  # recorded by labdeck.config()
    ("python t.py --lr 0.1", {"lr": "$(rm -rf ~)"}, "python t.py --lr '$(rm -rf ~)'", {}),  # a value is one word
])
def test_set_params(command: str, sets: dict, expected: str, env: dict) -> None:
    new, env_params, changes = set_params(command, {"dim": 16, "lr": 0.1}, sets)
    assert new == expected and env_params == env
    assert [c[0] for c in changes] == list(sets)


@pytest.mark.parametrize("command", [
    """sh -c 'printf "<%s>\\n" --lr 0.1'""",  # the value inside single quotes: sh -c's script
    'sh -c "printf \'<%s>\\\\n\' --lr 0.1"',  # inside double quotes
    """sh -c 'printf "<%s>\\n" --lr=0.1 x'""",
    """printf '<%s>\\n' --lr 0.1""",
])
def test_set_params_value_stays_one_word_inside_a_quoted_script(command: str, tmp_path: Path) -> None:
    """A value with quotes, $(...) and backticks reaches the program as itself where the key sits inside a
    quoted ``sh -c`` script (shlex.quote alone closed the outer quotes: the outer shell ran the $(...))."""
    import subprocess

    value = "a'b\"c $(touch PWNED) `touch PWNED2` \\ d"
    new, _, _ = set_params(command, {}, {"lr": value})
    res = subprocess.run(["sh", "-c", new], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    assert list(tmp_path.iterdir()) == []  # nothing ran
    assert f"<{value}>" in res.stdout or f"<--lr={value}>" in res.stdout


def test_set_params_refuses_a_value_quoted_two_levels_deep() -> None:
    with pytest.raises(LabdeckError, match="quoted in a way"):
        set_params('sh -c "sh -c \'train --lr 0.1\'"', {}, {"lr": "$(id)"})
    many = "echo " + "\"'\"" * 5000 + " --lr 0.1"  # thousands of quoted words before it: read in one pass
    assert set_params(many, {}, {"lr": "2"})[0] == many[:-3] + "2"


def test_rerun_plan_reads_an_earlier_LABDECK_PARAMS_as_untrusted(workstation) -> None:
    """A teammate's run record carries $LABDECK_PARAMS as any string: nested past Python's recursion limit,
    it was a RecursionError traceback from rerun_plan (the CLI, and the R form as you type)."""
    from backends.models import Run

    for bad in ("[" * 100_000 + "]" * 100_000, "{" * 50_000, "not json", "[1]"):
        old = Run(command="python t.py", instance="local", env={lin.PARAMS_ENV: bad}, params={"dim": 16})
        plan = workstation.rerun_plan(old, sets={"dim": "8"})
        assert json.loads(plan.env[lin.PARAMS_ENV]) == {"dim": 8}


def test_a_notebook_is_not_rerun(workstation) -> None:
    """A notebook's record carries labdeck's Jupyter plumbing as its command: `r`/`R`/`labdeck rerun` on
    it would start a second Jupyter as a job. It is refused, saying how to open a new notebook."""
    from backends.models import Run

    nb = Run(command="sh -c 'exec jupyter server …'", instance="local", kind="notebook")
    with pytest.raises(LabdeckError, match="is a notebook; a notebook is not rerun") as err:
        workstation.rerun_plan(nb)
    assert "labdeck notebook local" in err.value.render()
    with pytest.raises(LabdeckError, match="a notebook is not rerun"):
        asyncio.run(workstation.rerun(nb, sets={"lr": "1"}))


def test_set_params_refuses_a_key_that_would_change_nothing() -> None:
    with pytest.raises(LabdeckError, match="neither in the command nor a parameter"):
        set_params("python t.py --lr 0.1", {"lr": 0.1}, {"momentum": "0.9"})
    with pytest.raises(LabdeckError, match="not a parameter name"):
        set_params("python t.py", {}, {"a b": "1"})


# ---- R: rerun with changes from the TUI --------------------------------------------------------
async def test_R_opens_a_prefilled_form_and_starts_a_child_with_the_changed_params(home: Path) -> None:
    ws = Workstation(load_config(Paths.resolve(home)))
    old = await ws.launch(f"{sys.executable} train.py --steps 20 --lr 0.1 --sleep 0", workdir=str(QUICKSTART),
                          name="base", env={"SEED_NOTE": "one"})
    await wait_final(ws, old.id)
    old = ws.store.find_run(old.id)
    assert old.params["dim"] == 16  # recorded by labdeck.config(), not on the command line
    app = LabdeckApp(ws, live=False)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("2", "R")
        screen = app.screen
        assert isinstance(screen, RerunScreen)
        value = lambda sel: screen.query_one(sel).value  # noqa: E731
        assert "lr=0.1" in value("#rerun-params") and "steps=20" in value("#rerun-params")
        assert value("#rerun-command") == old.command and value("#rerun-instance") == "local"
        assert value("#rerun-env") == "SEED_NOTE=one" and value("#rerun-name") == "base (rerun)"
        assert "No changes yet" in str(screen.query_one("#rerun-changes").render())

        params = screen.query_one("#rerun-params")
        params.value = value("#rerun-params").replace("lr=0.1", "lr=3e-4").replace("dim=16", "dim=8")
        await pilot.pause()
        preview = str(screen.query_one("#rerun-changes").render())
        assert "lr: 0.1 → 0.0003  in the command" in preview and "dim: 16 → 8  through $LABDECK_PARAMS" in preview
        params.value += " bogus=1"
        await pilot.pause()
        assert "bogus is neither in the command" in str(screen.query_one("#rerun-changes").render())
        await pilot.press("ctrl+s")
        assert isinstance(app.screen, RerunScreen)  # refused: it would change nothing
        params.value = params.value.replace(" bogus=1", "")
        await pilot.press("ctrl+s")
        await settle(pilot)
        assert not isinstance(app.screen, RerunScreen)
        runs, _ = ws.store.runs()
        new = next(r for r in runs if r.id != old.id)
        await wait_final(ws, new.id)
        app.reload_runs()
        await settle(pilot)
        await pilot.press("4")
        lineage = app.query_one(LineageTab)
        lineage.show_detail(lineage.runs[new.id])  # the child's detail: its params against its parent's
        detail = str(app.query_one("#lineage-detail").render())
        assert "params vs parent" in detail and "lr: 0.1 → 0.0003" in detail and "dim: 16 → 8" in detail

    assert new.parent == old.id and new.name == "base (rerun)"
    assert new.command == f"{sys.executable} train.py --steps 20 --lr 3e-4 --sleep 0"
    assert new.env["SEED_NOTE"] == "one" and json.loads(new.env["LABDECK_PARAMS"]) == {"dim": 8}
    new = ws.store.find_run(new.id)
    assert new.params["dim"] == 8  # the job ran with it: labdeck.config() applied $LABDECK_PARAMS to args
    assert {(k, a, b) for k, a, b in lin.params_diff(old.params, new.params)} == {("lr", 0.1, 0.0003), ("dim", 16, 8)}
    view = lin.TeamLineage(ws.store)
    assert any(e.kind == "rerun" and e.parent == old.id and e.child == new.id for e in view.edges)


async def test_R_on_a_teammates_run_asks_first_with_the_changed_command(demo) -> None:
    async with demo.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("2", "down")  # bob's run
        run = demo.query_one(JobsTab).selected()
        assert run.user != demo.workstation.user
        await pilot.press("R")
        screen = demo.screen
        assert isinstance(screen, RerunScreen)
        screen.query_one("#rerun-command").value = "python train.py --lr 0.5"
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert isinstance(demo.screen, ConfirmScreen)
        detail = str(demo.screen.query_one("#confirm-detail").render())
        assert "python train.py --lr 0.5" in detail and "theirs:" in detail and "with changes" in str(
            demo.screen.query_one("#confirm-question").render())
        before = len(demo.workstation.store.runs()[0])
        await pilot.press("n")
        await settle(pilot)
        assert len(demo.workstation.store.runs()[0]) == before


# ---- the CLI ---------------------------------------------------------------------------------
def test_cli_rerun_set_and_new_command(home: Path) -> None:
    res = labdeck(home, "run", "--name", "base", "--workdir", str(QUICKSTART), "--",
                  sys.executable, "train.py", "--steps", "10", "--lr", "0.1", "--sleep", "0")
    assert res.returncode == 0, res.stderr
    res = labdeck(home, "rerun", "base", "--set", "lr=3e-4", "--set", "steps=12", "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    from .test_cli_output import readme_fields

    assert set(doc) == readme_fields()["rerun"]  # the README's "JSON output" table
    assert doc["command"].endswith("train.py --steps 12 --lr 3e-4 --sleep 0")
    assert {c["key"]: (c["old"], c["new"], c["where"]) for c in doc["changes"]} == {
        "lr": (0.1, 0.0003, "command"), "steps": (10, 12, "command")}
    base = json.loads(labdeck(home, "show", "base", "--json").stdout)
    assert doc["parent"] == base["id"] and doc["name"] == "base (rerun)"

    res = labdeck(home, "rerun", "base", "--", sys.executable, "train.py", "--steps", "5", "--sleep", "0")
    assert res.returncode == 0, res.stderr
    assert "a child of base" in res.stdout and "train.py --steps 5 --sleep 0" in res.stdout

    res = labdeck(home, "rerun", "base", "--set", "momentum=0.9")
    assert res.returncode == 1 and "momentum is neither in the command" in res.stderr and "Traceback" not in res.stderr
    res = labdeck(home, "rerun", "base", "--set", "lr")
    assert res.returncode == 1 and "is not KEY=VALUE" in res.stderr
    res = labdeck(home, "rerun", "base", "--bogus", "1")
    assert res.returncode == 2 and "No such option '--bogus'" in res.stderr and "goes after --" in res.stderr
    ps = json.loads(labdeck(home, "ps", "-a", "--json").stdout)
    assert len(ps) == 3  # nothing refused was started


# ---- snapshots -------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(120, 34), (80, 24)], ids=["120x34", "80x24"])
@pytest.mark.parametrize("name, keys", [
    ("jobs-sorted-by-duration", ["2", *[">"] * 6]),
    ("rerun-form", ["2", "R"]),
], ids=["jobs-sorted", "rerun-form"])
def test_snapshot_tables(snap_compare, name: str, keys: list[str], size: tuple[int, int]) -> None:
    from tui.screenshots import demo_lock, pressing

    with demo_lock():
        assert snap_compare(demo_app(), run_before=pressing(keys), terminal_size=size)


def test_labdeck_config_applies_a_reruns_changes_in_place(tmp_path: Path) -> None:
    """The in-job side of --set for keys not on the command line: $LABDECK_PARAMS, applied by labdeck.config()."""
    import os
    import subprocess

    runtime = Path(__file__).resolve().parents[1] / "backends" / "runtime"
    script = ("import json, labdeck\n"
              "cfg = {'lr': 0.1, 'layers': 3, 'model': {'width': 64, 'act': 'relu'}, 'flag': False, 'a.b': 1}\n"
              "out = labdeck.config(cfg)\n"
              "print(json.dumps([out is cfg, cfg]))\n")
    env = {**os.environ, "PYTHONPATH": str(runtime), "LABDECK_METRICS_FILE": str(tmp_path / "m.jsonl"),
           "LABDECK_PARAMS": json.dumps({"lr": 3, "model.width": "128", "flag": "true", "a.b": 2, "new": "x"})}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 0, res.stderr
    same, cfg = json.loads(res.stdout)
    assert same and cfg == {"lr": 3.0, "layers": 3, "model": {"width": 128, "act": "relu"}, "flag": True, "a.b": 2,
                            "new": "x"}
    recorded = [json.loads(line)["config"] for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert recorded == [cfg]  # what is recorded is what the job got
    env["LABDECK_PARAMS"] = "not json"
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert json.loads(res.stdout)[1]["lr"] == 0.1  # a broken value changes nothing and never raises
    env["LABDECK_PARAMS"] = "[" * 50_000  # nested past the recursion limit
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert json.loads(res.stdout)[1]["lr"] == 0.1
    recorded = [json.loads(line)["config"] for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert len(recorded) == 3 and recorded[-1]["lr"] == 0.1  # the config is still recorded
