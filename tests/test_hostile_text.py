"""All text from outside is text (issue 14, item 4) and a teammate's run is not rerun unseen (item 3).

A teammate ("mallory", a second user of the same team directory) writes, with the store's own API,
markup, terminal control sequences and invalid UTF-8 into every field of every record kind (runs,
notes, tags, deployments, notebooks, instance records); the host's facts and a run's log carry the
same. Then every tab of the TUI is driven with Pilot and every CLI command that lists or shows is
run: nothing crashes, nothing runs on click, no escape sequence or C1 byte reaches the terminal
unless ``--raw`` asks for it.
"""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest
from rich.text import Text
from textual.widgets import DataTable, Static, Tree

from backends.config import load_config
from backends.errors import LabdeckError
from backends.models import Annotation, Deployment, Notebook, Run
from backends.paths import Paths
from backends.providers.local import LocalProvider
from backends.store import Store
from backends.text import plain, plain_line
from backends.workstation import Workstation
from tui.app import LabdeckApp
from tui.screenshots import _id, settle
from tui.widgets import CompareScreen, ConfirmScreen

SIZE = (160, 40)
CLICK = "[@click=app.simulate_key('r')]x"
MARKUP = ("[/]", CLICK, "[bold red]")
CONTROLS = ("\x1b]52;c;aGVsbG8=\x07", "\x1b[2J", "\x1b[?1049h", "\x9b2J")
BAD_UTF8 = "\udcff\ud800"  # what JSON's "\udcff" escapes give: lone surrogates, not encodable as UTF-8
EVIL = "".join(MARKUP) + "".join(CONTROLS) + BAD_UTF8 + "\u202eevil"
LOG = (b"plain start\n\x1b[31mred\x1b[0m \x1b]52;c;aGVsbG8=\x07clip\n\x1b[2J\x1b[?1049halt \x9b2J\n"
       b"bad utf8 \xff\xfe\xc3(\n[/] [bold red]" + CLICK.encode() + b"\nprogress 1\rprogress 2\n")
TERMINAL_BYTES = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # what must never reach stdout (\t \n are fine)


def evil(tag: str) -> str:
    return f"{tag}:{EVIL}"


# ---- the sanitizer itself ---------------------------------------------------------------------
@pytest.mark.parametrize("raw", [*MARKUP, *CONTROLS, BAD_UTF8, EVIL, LOG, LOG.decode("utf-8", "surrogateescape")])
def test_plain_leaves_no_control_and_encodes(raw) -> None:
    for out in (plain(raw), plain_line(raw)):
        assert not TERMINAL_BYTES.search(out) and "\x1b" not in out
        out.encode("utf-8")  # no lone surrogate left
    assert "\n" not in plain_line(raw)


def test_plain_keeps_text_and_removes_sequences() -> None:
    assert plain("\x1b[32mINFO\x1b[0m done") == "INFO done"
    assert plain("a \x1b]52;c;aGVsbG8=\x07b") == "a b"  # the clipboard write is gone, payload and all
    assert plain("step 1\rstep 2\nnext") == "step 2\nnext"  # a progress bar shows as it ended
    assert plain("[/] [b]x[/b]") == "[/] [b]x[/b]"  # markup is the widgets' business: kept as text
    assert plain(b"ok \xff") == "ok \ufffd"
    assert plain_line("a\nb\tc") == "a b c"


def test_log_viewer_lines_carry_no_escape() -> None:
    from tui.logview import display_text

    for line in LOG.split(b"\n"):
        text, _ = display_text(line)
        assert "\x1b" not in text and not re.search("[\x80-\x9f]", text)


async def jobs_table(app, pilot) -> DataTable:
    """The Jobs tab's table, once everything has loaded."""
    await settle(pilot)
    await pilot.press("2")
    await settle(pilot)
    return app.query_one("#jobs-table", DataTable)


# ---- a team directory with a hostile teammate -------------------------------------------------
HOST_FACTS = {
    "host": evil("host"), "vcpus": 4, "cpu_model": evil("cpu"), "memory_mib": 8192,
    "gpus": [{"index": 0, "name": evil("gpu"), "memory_total_mib": 1024}], "gpu_note": evil("gpu_note"),
    "started_at": "2026-11-24T08:00:00Z",
}


def plant(team_dir: Path, tmp: Path, *, me: str) -> dict[str, Run]:
    """Mallory's records, every text field hostile, written with the store's own API; a run of mine too."""
    mallory = Store(team_dir, "mallory").mine
    code = tmp / "mallory-code"
    code.mkdir(exist_ok=True)
    run_dir = tmp / "mallory-run"
    run_dir.mkdir(exist_ok=True)
    (run_dir / "output.log").write_bytes(LOG)
    (run_dir / "code").mkdir(exist_ok=True)  # the run's recorded code copy: what a rerun of it copies
    (run_dir / "code" / "train.py").write_text("print('hi')\n")
    runs: dict[str, Run] = {}

    def run(n: int, name: str, state: str = "succeeded", **kw) -> Run:
        r = Run(id=_id(100 - n, 500 + n), user="mallory", name=name, command=f"echo {evil('command')}",
                instance="local", state=state, state_reason=evil("reason"), workdir=str(code), run_dir=str(run_dir),
                origin_host=evil("origin"), last_line=evil("last"), env={evil("ENVK"): evil("envv")},
                params={evil("param"): evil("value"), "lr": 0.1}, tags=[evil("tag")],
                metrics_summary={evil("metric"): {"last": evil("m"), "best": 1.0, "min": 0.0, "max": 2.0, "count": 3},
                                 "loss": {"last": 0.5, "best": 0.5, "min": 0.5, "max": 0.5, "count": 1}},
                hardware={evil("hw"): evil("hwv")}, environment={"python": evil("py"), "packages": [evil("pkg")]},
                artifacts=[evil("artifact")],
                code={"root": str(code), "commit": "0" * 40},  # (a commit is checked: not hex, the record is skipped)
                instance_info={"gpus": evil("gpus"), "host": evil("ihost")},
                created_at="2026-11-26T10:00:00Z", started_at="2026-11-26T10:00:00Z", ended_at="2026-11-26T10:05:00Z",
                **kw)
        mallory.put(Run.TABLE, r.id, r.to_dict())
        runs[name] = r
        return r

    for n, name in enumerate((EVIL, *MARKUP, *CONTROLS, BAD_UTF8)):
        run(n, name)
    parent = runs[EVIL]
    run(20, evil("child"), parent=parent.id)
    mine = Run(id=_id(30, 600), user=me, name="mine", command="echo mine", instance="local", state="succeeded",
               workdir=str(code), created_at="2026-11-26T11:00:00Z", started_at="2026-11-26T11:00:00Z",
               ended_at="2026-11-26T11:01:00Z")
    Store(team_dir, me).mine.put(Run.TABLE, mine.id, mine.to_dict())
    runs["mine"] = mine
    for i, target in enumerate((parent, mine)):
        for kind in ("note", "tag"):
            a = Annotation(id=_id(20, 700 + 2 * i + (kind == "tag")), run_id=target.id, kind=kind, text=evil(kind),
                           user="mallory", created_at="2026-11-26T11:10:00Z")
            mallory.put(a.TABLE, a.id, a.to_dict())
    d = Deployment(id=_id(10, 800), run_id=parent.id, instance=evil("dinst"), name=evil("deployment"), user="mallory",
                   state="healthy", port=8000, url=evil("url"), model=evil("model"), log_path=evil("log"),
                   state_reason=evil("dreason"))
    mallory.put(d.TABLE, d.id, d.to_dict())
    nb = Notebook(id=_id(9, 801), instance=evil("nbinst"), user="mallory", root_dir=evil("root"), url=evil("nburl"))
    mallory.put(nb.TABLE, nb.id, nb.to_dict())
    rec = {"id": "aws/" + _id(8, 802), "name": evil("instance"), "provider": evil("prov"), "created_by": "mallory",
           "state": evil("istate"), "size": evil("size"), "region": evil("region"), "price_per_hour": 1.5,
           "created_at": "2026-11-26T09:00:00Z"}
    mallory.put("instances", rec["id"], rec)
    # a teammate's directory with a hostile name whose store cannot be read (invalid UTF-8 in its journal)
    broken = team_dir / "[bold]\x1b[2Jx\x9b"
    broken.mkdir()
    (broken / "journal-0.jsonl").write_bytes(b'{"t": "runs", "id": "X", "d": {"name": "\xff\xfe"}}\n')
    return runs


@pytest.fixture
def team(tmp_path: Path):
    home = tmp_path / "home"
    home.mkdir()
    config = load_config(Paths.resolve(home), env={})
    config.user = "alice"
    runs = plant(config.team_dir, tmp_path, me="alice")
    store = Store(config.team_dir, "alice")
    providers = {"local": LocalProvider("local", config.providers["local"].options, runs_root=config.paths.runs_dir,
                                        facts=lambda: dict(HOST_FACTS))}
    ws = Workstation(config, store=store, providers=providers)
    yield ws, runs
    store.close()


def _no_raw_text(app) -> None:
    """No cell, label or static on screen holds a control character (it would reach the terminal)."""
    for table in app.screen.query(DataTable):
        for row in range(table.row_count):
            for cell in table.get_row_at(row):
                text = cell.plain if isinstance(cell, Text) else str(cell)
                assert not TERMINAL_BYTES.search(text), (table.id, text)
    for w in app.screen.query(Static):
        text = str(w.render())
        assert not TERMINAL_BYTES.search(text), (w.id, text)


async def test_every_tab_shows_hostile_records_as_text(team) -> None:
    ws, runs = team
    app = LabdeckApp(ws, live=False)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        for key in ("1", "2", "3", "4", "5"):
            await pilot.press(key)
            await settle(pilot)
            for _ in range(3):
                await pilot.press("down")
            await settle(pilot)
            _no_raw_text(app)
        # Instances: the host's facts as text
        inst = app.query_one("#instances-table", DataTable)
        row = [c.plain if isinstance(c, Text) else str(c) for c in inst.get_row_at(0)]
        assert any("gpu:[/][@click=" in c for c in row)
        # Jobs: names, users and last lines as text
        await pilot.press("2")
        jobs = app.query_one("#jobs-table", DataTable)
        names = {jobs.get_row_at(i)[1].plain for i in range(jobs.row_count)}
        assert CLICK in names and "[/]" in names and "[bold red]" in names
        assert "store is unreadable" in str(app.query_one("#jobs-status").render())
        # Lineage: open every node, look at each one's detail (params, metrics, notes, tags, code)
        await pilot.press("4")
        tree = app.query_one(Tree)
        for _ in range(tree.last_line + 12):
            await pilot.press("space")  # opens the node, if it has children
            await pilot.press("down")
            await pilot.pause()
        detail = str(app.query_one("#lineage-detail").render())
        assert not TERMINAL_BYTES.search(detail)
        for node_key in ("m", "up", "m", "c"):  # compare two marked runs
            await pilot.press(node_key)
        await settle(pilot)
        assert isinstance(app.screen, CompareScreen)
        _no_raw_text(app)
        await pilot.press("escape")
        # Models: the deployment
        await pilot.press("5")
        models = app.query_one("#models-table", DataTable)
        assert models.get_row_at(0)[0].plain.startswith("deployment:[/][@click=")
        # the palette lists runs by name: plain text
        await pilot.press("ctrl+p")
        await pilot.press(*"Logs")
        await settle(pilot)
        await pilot.press("escape")
        # notifications and errors quoting outside text
        app.notify(EVIL)
        app.show_error(LabdeckError(evil("error"), evil("hint")))
        await settle(pilot)
        assert all(not TERMINAL_BYTES.search(n.message) for n in app._notifications)
        assert any(n.message.startswith("[/][@click=") for n in app._notifications)
        _no_raw_text(app)


async def test_clicking_a_name_runs_nothing(tmp_path: Path) -> None:
    """A teammate's run named ``[@click=app.simulate_key('r')]x``: clicking its name must not rerun anything."""
    home = tmp_path / "home"
    home.mkdir()
    config = load_config(Paths.resolve(home), env={})
    config.user = "alice"
    code = tmp_path / "code"
    code.mkdir()
    r = Run(id=_id(5, 1), user="mallory", name=CLICK, command="echo clicked", instance="local", state="succeeded",
            workdir=str(code), created_at="2026-11-26T11:00:00Z", started_at="2026-11-26T11:00:00Z",
            ended_at="2026-11-26T11:01:00Z")
    Store(config.team_dir, "mallory").mine.put(Run.TABLE, r.id, r.to_dict())
    ws = Workstation(config, store=Store(config.team_dir, "alice"))
    app = LabdeckApp(ws, live=False)
    async with app.run_test(size=SIZE) as pilot:
        table = await jobs_table(app, pilot)
        name = table.get_row_at(0)[1]
        assert isinstance(name, Text) and name.plain == CLICK  # shown as written: no link, no action in it
        cols = list(table.columns.values())
        x = cols[0].get_render_width(table) + 2  # inside the Name cell
        for dx in range(0, 3):
            await pilot.click("#jobs-table", offset=(x + dx, 1))
            await settle(pilot)
        assert not isinstance(app.screen, ConfirmScreen)
        assert not any("Rerunning" in n.message for n in app._notifications)
        assert [x.id for x in ws.store.runs()[0]] == [r.id]


async def test_rerun_of_a_teammates_run_shows_it_and_asks(team) -> None:
    ws, runs = team
    target = runs[EVIL]
    app = LabdeckApp(ws, live=False)
    async with app.run_test(size=SIZE) as pilot:
        table = await jobs_table(app, pilot)
        keys = [k.value for k in table.rows]
        table.move_cursor(row=keys.index(target.id))
        await pilot.press("r")
        await settle(pilot)
        assert isinstance(app.screen, ConfirmScreen)
        shown = str(app.screen.query_one("#confirm-detail").render())
        assert plain(target.command) in shown and "instance: local" in shown and f"{target.run_dir}/code" in shown
        assert "mallory" in str(app.screen.query_one("#confirm-question").render())
        await pilot.press("n")
        await settle(pilot)
        assert len(ws.store.runs(team=False)[0]) == 1  # only "mine": nothing ran
        await pilot.press("r")
        await settle(pilot)
        await pilot.press("y")
        await settle(pilot)
        new = [r for r in ws.store.runs(team=False)[0] if r.parent == target.id]
        assert len(new) == 1 and new[0].command == target.command
        # it ran in a copy of their recorded code, in a directory of ours, not in their tree
        assert new[0].workdir.endswith("/code") and not new[0].workdir.startswith(str(target.workdir))
        assert (Path(new[0].workdir) / "train.py").read_text() == "print('hi')\n"


async def test_rerun_of_your_own_run_does_not_ask(team) -> None:
    ws, runs = team
    app = LabdeckApp(ws, live=False)
    async with app.run_test(size=SIZE) as pilot:
        table = await jobs_table(app, pilot)
        table.move_cursor(row=[k.value for k in table.rows].index(runs["mine"].id))
        await pilot.press("r")
        await settle(pilot)
        assert not isinstance(app.screen, ConfirmScreen)
        assert any(r.parent == runs["mine"].id for r in ws.store.runs(team=False)[0])


# ---- the CLI ---------------------------------------------------------------------------------
def labdeck(home: Path, *args: str, stdin=subprocess.DEVNULL, timeout: float = 60) -> subprocess.CompletedProcess:
    e = {**os.environ, "LABDECK_HOME": str(home), "COLUMNS": "250"}
    e.pop("LABDECK_TEAM_DIR", None)
    return subprocess.run([sys.executable, "-m", "tui.cli", *args], capture_output=True, env=e, timeout=timeout,
                          stdin=stdin)


@pytest.fixture
def cli_team(home: Path, tmp_path: Path):
    import getpass

    config = load_config(Paths.resolve(home))
    me = config.user or getpass.getuser()
    return home, plant(config.team_dir, tmp_path, me=me)


def _clean(res: subprocess.CompletedProcess) -> str:
    for stream in (res.stdout, res.stderr):
        assert b"Traceback" not in stream
        text = stream.decode("utf-8")  # valid UTF-8: invalid input became U+FFFD
        assert not TERMINAL_BYTES.search(text), repr(TERMINAL_BYTES.search(text))
    return res.stdout.decode()


def test_cli_lists_and_shows_hostile_records_as_text(cli_team) -> None:
    home, runs = cli_team
    target = runs[EVIL]
    for args in (("ps", "--all"), ("runs",), ("models",), ("show", target.id), ("show", runs[CLICK].id),
                 ("show", runs[evil("child")].id), ("diff", target.id, runs[evil("child")].id), ("spend",),
                 ("logs", target.id), ("runs", "tag:zzz")):
        res = labdeck(home, *args)
        out = _clean(res)
        assert res.returncode == 0, (args, res.stderr.decode())
        if args[0] in ("ps", "runs") and len(args) < 3 and "tag:zzz" not in args:
            assert "[@click=app.simulate_key('r')]x" in out and "[bold red]" in out  # shown, not parsed
            assert "store is unreadable" in res.stderr.decode()
    out = _clean(labdeck(home, "show", target.id))
    for field in ("reason:", "command", "origin", "param:", "metric:", "hw:", "artifact:", "note:", "tag:", "py:"):
        assert field in out, field
    logs = _clean(labdeck(home, "logs", target.id))
    assert "red clip" in logs and "progress 2" in logs and "\ufffd" in logs


def test_cli_raw_lets_outside_text_through(cli_team) -> None:
    home, runs = cli_team
    res = labdeck(home, "logs", "--raw", runs[EVIL].id)
    assert res.returncode == 0 and res.stdout == LOG  # the log's own bytes
    res = labdeck(home, "show", "--raw", runs["\x1b[2J"].id)
    assert res.returncode == 0 and b"\x1b[2J" in res.stdout


def test_cli_ls_shows_host_facts_as_text(home: Path, monkeypatch) -> None:
    """An SSH host whose nvidia-smi prints markup crashed `labdeck ls`: facts are text."""
    from click.testing import CliRunner

    from tui import cli

    def hostile_workstation(**kw):
        ws = cli._workstation_real(**kw)
        ws.providers["local"] = LocalProvider("local", ws.config.providers["local"].options,
                                              runs_root=ws.config.paths.runs_dir, facts=lambda: dict(HOST_FACTS))
        return ws

    monkeypatch.setattr(cli, "_workstation_real", cli._workstation, raising=False)
    monkeypatch.setattr(cli, "_workstation", hostile_workstation)
    res = CliRunner().invoke(cli.cli, ["ls"], env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    assert "gpu:[/][@click=" in res.output and not TERMINAL_BYTES.search(res.output)


def test_cli_rerun_of_a_teammates_run_asks(cli_team) -> None:
    home, runs = cli_team
    evil_run = runs[EVIL]
    # one that can run (an environment variable named like EVIL is refused by the launcher itself)
    target = Run(**{**evil_run.to_dict(), "id": _id(1, 999), "name": "runnable", "env": {}, "parent": None,
                    "command": "echo rerun-ok '[/]' $'\\e[2J'"})  # (a command with lone surrogates: see the report)
    Store(load_config(Paths.resolve(home)).team_dir, "mallory").mine.put(Run.TABLE, target.id, target.to_dict())

    def children() -> list[str]:
        team_dir = load_config(Paths.resolve(home)).team_dir
        return [d["id"] for d in Store(team_dir, "mallory").team_records("runs")[0] if d.get("parent") == target.id]

    res = labdeck(home, "rerun", target.id)  # no terminal, no --yes: refused, after showing what would run
    err = _clean(res) + res.stderr.decode()
    assert res.returncode == 1 and "needs confirmation" in err and "--yes" in err
    assert plain_line(target.command)[:40] in err.replace("\n", " ") and "instance" in err
    primary, secondary = pty.openpty()  # a terminal that answers "no"
    os.write(primary, b"n\n")
    try:
        res = labdeck(home, "rerun", target.id, stdin=secondary)
    finally:
        os.close(secondary)
        os.close(primary)
    assert res.returncode != 0 and b"Abort" in res.stderr
    assert not children()
    res = labdeck(home, "rerun", "--yes", target.id)
    assert res.returncode == 0, res.stderr.decode()
    _clean(res)
    assert len(children()) == 1
