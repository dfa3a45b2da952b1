"""Lineage: records, relations, notes and tags, the CLI, the Lineage tab, and a team of two real
Unix users (alice and bob) sharing one team directory."""

from __future__ import annotations

import grp
import json
import os
import pwd
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from textual.widgets import Tree

from backends import lineage as lin
from backends.errors import LabdeckError
from backends.models import Run
from tui.screenshots import _id, demo_app, settle
from tui.widgets import CompareScreen, TextPrompt

REPO = Path(__file__).resolve().parent.parent
SIZE = (120, 34)


def test_params_from_argv_and_config_files(tmp_path: Path) -> None:
    (tmp_path / "cfg.yaml").write_text("optim:\n  lr: 0.01\n  name: adam\nepochs: 5\n")
    (tmp_path / "extra.json").write_text('{"batch": 64, "model": {"depth": 12}}')
    p = lin.params_from_command("python train.py --config cfg.yaml extra.json --lr 3e-4 --fp16 seed=3 --epochs=7",
                                tmp_path)
    assert p == {"optim.lr": 0.01, "optim.name": "adam", "epochs": 7, "batch": 64, "model.depth": 12,
                 "config": "cfg.yaml", "lr": 0.0003, "fp16": True, "seed": 3}


def test_cycles_are_refused_and_paths_found() -> None:
    a, b, c = Run(command="x", instance="l", id="A" * 26), Run(command="x", instance="l", id="B" * 26, parent="A" * 26), \
        Run(command="x", instance="l", id="C" * 26, parent="B" * 26)
    runs = {r.id: r for r in (a, b, c)}
    parents = lin.parents_map(runs, [])
    with pytest.raises(LabdeckError, match="cycle"):
        lin.check_no_cycle(a.id, c.id, parents)
    with pytest.raises(LabdeckError, match="cycle"):
        lin.check_no_cycle(a.id, a.id, parents)
    assert [r.id for r in lin.path_from_baseline(c, runs)] == [a.id, b.id, c.id]
    assert lin.ancestors(c.id, parents) == {a.id, b.id}
    assert lin.params_diff({"lr": 0.1, "x": 1}, {"lr": 0.3, "y": 2}) == [("lr", 0.1, 0.3), ("x", 1, None), ("y", None, 2)]


async def test_lineage_tab_tree_detail_filter_compare_and_notes(tmp_path: Path) -> None:
    app = demo_app(home=tmp_path / "demo")
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("4")
        tree = app.query_one(Tree)
        base = tree.root.children[0]
        assert "loss 0.312" in str(base.label) and "3 derived" in str(base.label)
        await pilot.press("enter")  # open the baseline: its children load now
        await settle(pilot)
        assert [str(n.label).split()[0] for n in base.children] == ["lr-0.3", "lr-0.03", "lr-1.0"]
        assert "(-0.062)" in str(base.children[0].label)  # the change from the parent
        await pilot.press("down")
        detail = str(app.query_one("#lineage-detail").render())
        assert "lr: 0.1 → 0.3" in detail and "parent: baseline" in detail
        # mark two and compare
        await pilot.press("m", "up", "m", "c")
        assert isinstance(app.screen, CompareScreen)
        await pilot.press("escape")
        # a note from the tab goes into alice's own store
        await pilot.press("a")
        assert isinstance(app.screen, TextPrompt)
        await pilot.press(*"try warmup", "enter")
        await settle(pilot)
        notes = [a for a in app.workstation.store.mine.all("annotations") if a["text"] == "try warmup"]
        assert notes and notes[0]["user"] == "alice" and notes[0]["run_id"] == _id(600, 1)
        # the query language, with errors that say where
        await pilot.press("slash", *"tag:best", "enter")
        await settle(pilot)
        assert [str(n.label).split()[0] for n in tree.root.children] == ["wider-model"]
        await pilot.press("slash", "ctrl+u", *"lr>>3", "enter")
        assert "^" in str(app.query_one("#lineage-status").render())
        await pilot.press("slash", "escape")
        # jump to the run in Jobs
        await pilot.press("j")
        assert app.query_one("TabbedContent").active == "jobs"


def test_cli_runs_show_diff_note_tag_report(home: Path, tmp_path: Path) -> None:
    from .test_cli import labdeck

    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "train.py").write_text(
        "import labdeck, sys\nlr = float(sys.argv[2])\n"
        "for i in range(50):\n    labdeck.log({'loss': 1 / (1 + lr * i)}, step=i)\n")
    subprocess.run(["git", "init", "-q", str(tmp_path / "proj")], check=True)
    first = labdeck(home, "run", "--name", "base", "--workdir", str(tmp_path / "proj"), "--", "python3", "train.py", "--lr", "0.1")
    assert first.returncode == 0, first.stderr
    assert labdeck(home, "logs", "base", "-f").returncode == 0
    (tmp_path / "proj" / "train.py").write_text((tmp_path / "proj" / "train.py").read_text() + "# tuned\n")
    second = labdeck(home, "run", "--name", "tuned", "--parent", "base", "--workdir", str(tmp_path / "proj"), "--",
                     "python3", "train.py", "--lr", "0.5")
    assert second.returncode == 0, second.stderr
    assert labdeck(home, "logs", "tuned", "-f").returncode == 0
    runs = labdeck(home, "runs")
    assert "base" in runs.stdout and "tuned" in runs.stdout and "key metric loss" in runs.stdout
    only = labdeck(home, "runs", "lr>0.2")
    assert "tuned" in only.stdout and "base" not in only.stdout.replace("tuned", "")
    bad = labdeck(home, "runs", "lr>>0.2")
    assert bad.returncode == 1 and "^" in bad.stderr + bad.stdout and "Traceback" not in bad.stderr
    assert labdeck(home, "tag", "tuned", "best").returncode == 0
    assert labdeck(home, "note", "tuned", "faster convergence").returncode == 0
    show = labdeck(home, "show", "tuned")
    assert "faster convergence" in show.stdout and "tags best" in show.stdout and "lr" in show.stdout
    diff = labdeck(home, "diff", "base", "tuned")
    assert "0.1" in diff.stdout and "0.5" in diff.stdout and "+# tuned" in diff.stdout
    rep = labdeck(home, "report", "tag:best", "-o", str(tmp_path / "out"))
    assert rep.returncode == 0, rep.stderr
    md = next((tmp_path / "out").glob("*.md")).read_text()
    html = next((tmp_path / "out").glob("*.html")).read_text()
    assert md.index("| 0 (baseline) | base") < md.index("| 1 | tuned") and "lr: 0.1 → 0.5" in md
    assert "faster convergence" in md and "-0.1303" in md
    assert html.count("<svg") >= 1 and "<polyline" in html


# ---- two real Unix users on one jump host -----------------------------------------------

PRELUDE = """
import os, sys, json
import tui.cli, backends.query, backends.lineage, backends.report, backends.monitor, backends.metrics
# This interpreter lives under /root (0700): import everything that is imported lazily before dropping root.
import io, asyncio, rich.table, rich.markup, rich._emoji_codes, rich.live, encodings.idna, concurrent.futures.thread
import backends.providers.ssh, backends.providers.local, backends.code, backends.follow, backends.jobs, tomllib, shlex, base64
import backends.workstation, backends.clouds, tui.clijson, unicodedata  # tui.cli imports these when a command needs them
import psutil, backends.gpu, platformdirs
backends.gpu.probe_gpus()
from rich.console import Console
_c = Console(file=io.StringIO(), width=80)
_c.print(":warning: [bold red]x[/]", rich.table.Table("a"))
asyncio.run(asyncio.sleep(0))
uid, gid, home = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
os.setgroups([]); os.setgid(gid); os.setuid(uid)
os.environ.update(HOME=home, USER=sys.argv[4], LOGNAME=sys.argv[4])
sys.argv = ["labdeck"] + sys.argv[5:]
tui.cli.main()
"""


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    """alice and bob: real Unix users, each with a home, sharing one team directory."""
    if os.geteuid() != 0 or not shutil.which("useradd"):
        pytest.skip("needs root and useradd to create real users")
    base = Path(tempfile.mkdtemp(prefix="ldteam-", dir="/tmp"))
    os.chmod(base, 0o755)
    (base / "team").mkdir()
    os.chmod(base / "team", 0o1777)  # as the admin of a shared jump host sets it up (see README)
    users = {}
    tag = secrets.token_hex(3)
    try:
        for who in ("alice", "bob"):
            name = f"ld{who}{tag}"
            subprocess.run(["useradd", "-M", "-s", "/bin/sh", name], check=True, capture_output=True)
            pw = pwd.getpwnam(name)
            h = base / who
            h.mkdir()
            os.chown(h, pw.pw_uid, pw.pw_gid)
            users[who] = (pw, h)
        yield base, users
    finally:
        for pw, _ in users.values():
            subprocess.run(["pkill", "-KILL", "-u", pw.pw_name], capture_output=True)
            subprocess.run(["userdel", "-f", pw.pw_name], capture_output=True)
            try:
                grp.getgrnam(pw.pw_name)
                subprocess.run(["groupdel", pw.pw_name], capture_output=True)
            except KeyError:
                pass
        shutil.rmtree(base, ignore_errors=True)


def as_user(team, who: str, *args: str) -> subprocess.CompletedProcess:
    base, users = team
    pw, h = users[who]
    env = {**os.environ, "LABDECK_HOME": str(h / "labdeck"), "LABDECK_TEAM_DIR": str(base / "team"), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-c", PRELUDE, str(pw.pw_uid), str(pw.pw_gid), str(h), pw.pw_name, *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def test_two_users_share_a_team_directory(team) -> None:
    base, users = team
    alice, bob = users["alice"][0].pw_name, users["bob"][0].pw_name
    for who, name in (("alice", "a-run"), ("bob", "b-run")):
        res = as_user(team, who, "run", "--name", name, "--no-sync", "--workdir", "/tmp", "--", "echo", f"hi from {who}")
        assert res.returncode == 0, res.stderr
    for who in ("alice", "bob"):
        res = as_user(team, who, "runs")
        assert res.returncode == 0, res.stderr
        assert "a-run" in res.stdout and "b-run" in res.stdout and alice in res.stdout and bob in res.stdout
    # the team directory is sticky and world-writable; each user's files are theirs, readable by all
    assert oct((base / "team").stat().st_mode & 0o7777) == "0o1777"
    for who, name in (("alice", alice), ("bob", bob)):
        d = base / "team" / name
        assert d.stat().st_uid == users[who][0].pw_uid and oct(d.stat().st_mode & 0o777) == "0o755"
        assert oct((d / "store.json").stat().st_mode & 0o777) == "0o644"
    # bob cannot change alice's records: not through labdeck, not by writing her files
    res = as_user(team, "bob", "cancel", "a-run", "--yes")
    assert res.returncode == 1 and "belongs to" in res.stderr
    res = as_user(team, "bob", "store", "move-aside", str(base / "team" / alice / "store.json"))
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert (base / "team" / alice / "store.json").exists()
    # both can note and tag any run; the notes live in each author's own store
    assert as_user(team, "bob", "note", "a-run", "bob was here").returncode == 0
    assert as_user(team, "bob", "tag", "a-run", "reviewed").returncode == 0
    assert as_user(team, "alice", "note", "b-run", "nice").returncode == 0
    shown = as_user(team, "alice", "show", "a-run")
    assert "bob was here" in shown.stdout and bob in shown.stdout and "reviewed" in shown.stdout
    ann = json.loads((base / "team" / bob / "store.json").read_text()).get("annotations", {})
    journal = "".join(p.read_text() for p in (base / "team" / bob).glob("journal-*.jsonl"))
    assert "bob was here" in json.dumps(ann) + journal
    # a teammate's store that is corrupt is reported; the rest still loads
    (base / "team" / bob / "store.json").chmod(0o644)
    os.rename(base / "team" / bob / "store.json", base / "team" / bob / "store.json.bak")
    (base / "team" / bob / "store.json").write_text("{not json")
    try:
        res = as_user(team, "alice", "runs")
        assert res.returncode == 0 and "a-run" in res.stdout and "unreadable" in res.stderr
    finally:
        os.replace(base / "team" / bob / "store.json.bak", base / "team" / bob / "store.json")


async def test_lineage_jumps_and_tag_prompt(tmp_path: Path) -> None:
    from tui.tabs.monitor import MonitorTab
    from tui.widgets import LogScreen

    app = demo_app(home=tmp_path / "demo")
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("4", "t")
        assert isinstance(app.screen, TextPrompt)
        await pilot.press(*"keep", "enter")
        await settle(pilot)
        assert any(a["text"] == "keep" and a["kind"] == "tag" for a in app.workstation.store.mine.all("annotations"))
        (app.workstation.follower.local_path(app.runs[-1])).parent.mkdir(parents=True, exist_ok=True)
        await pilot.press("M")  # chart the highlighted run in Monitor
        await settle(pilot)
        assert app.query_one("TabbedContent").active == "monitor"
        tab = app.query_one(MonitorTab)
        assert tab.selected and tab.selected[0] == _id(600, 1)
        assert tab.instance == "local"
        await pilot.press("i")  # next running instance: the demo's first cloud instance
        assert tab.instance == "a100-sweep"
        await pilot.press("4", "l")  # the log of the highlighted run (its instance copy is absent: still opens)
        await settle(pilot)
        assert isinstance(app.screen, LogScreen) or any("log" in n.message.lower() for n in app._notifications)


async def test_lineage_labels_follow_tags_taken_off_and_marks_keep_the_status_line(tmp_path: Path) -> None:
    """A refresh where only a label's content changed (a tag taken off: same number of annotations)
    redraws the labels; marking a run adds to the status line instead of replacing it."""
    app = demo_app(home=tmp_path / "demo")
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("4", "t", *"keep", "enter")
        await settle(pilot)
        tree = app.query_one(Tree)
        assert "#keep" in str(tree.root.children[0].label)
        lin.untag(app.workstation.store, tree.root.children[0].data, "keep")
        app.reload_runs()
        await settle(pilot)
        assert "#keep" not in str(tree.root.children[0].label)
        await pilot.press("slash", *"user:alice", "enter")
        await settle(pilot)
        status = app.query_one("#lineage-status")
        assert "runs match /user:alice" in str(status.render())
        await pilot.press("m")
        assert "runs match /user:alice" in str(status.render()) and "1 marked" in str(status.render())
        await pilot.press("m")  # unmarked again: the mark's line goes, the filter's stays
        assert "runs match /user:alice" in str(status.render()) and "marked" not in str(status.render())


async def test_the_detail_panes_code_diff_is_computed_once_per_pair(tmp_path: Path, monkeypatch) -> None:
    """Moving the cursor back and forth does not run `git diff` (and read blobs) again each time."""
    calls: list[tuple] = []
    code_diff = lin.code_diff

    def counted(a, b, read_blob):
        calls.append((a.id if a else None, b.id))
        return code_diff(a, b, read_blob)

    monkeypatch.setattr(lin, "code_diff", counted)
    app = demo_app(home=tmp_path / "demo")
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("4", "enter")
        await settle(pilot)
        await pilot.press("down", "up", "down", "up", "down")
        await settle(pilot)
    assert len(calls) >= 2 and len(calls) == len(set(calls))


# ---- the media strip in the detail pane --------------------------------------------------------
async def test_the_detail_pane_shows_a_runs_media_beside_its_parents(workstation, tmp_path: Path) -> None:
    """A real parent and child log media through the SDK; the Lineage detail of the child shows one key
    at its latest step beside the parent's nearest step (read in a worker, only for the run the cursor
    rests on), `n` cycles the key, a run without media shows no strip, a result for a run the cursor
    has left is dropped, and at 80×24 the strip is one line naming the keys."""
    from rich.console import Console

    from tests.test_monitor import follow_to_end
    from tui.app import LabdeckApp
    from tui.tabs.lineage import LineageTab

    (tmp_path / "job.py").write_text(
        "import labdeck, sys\n"
        "g = int(sys.argv[1])\n"
        "for s in ((0, 10, 20) if g == 1 else (0, 15, 30)):\n"
        "    labdeck.log({'loss': 1 / (s + 1), 'grid': labdeck.Image([[0.0, g / 2], [1.0, 0.0]], caption='[red]x'),"
        " 'cm': labdeck.Confusion([0, 1, 1], [0, 1, s % 2 if g == 1 else 1], labels=['cat', 'dog']),"
        " 'per_class': labdeck.Table(['class', 'f1'], [['cat', 0.5 * g], ['dog', 0.7]])}, step=s)\n")
    parent = await workstation.launch(f"{sys.executable} job.py 1", workdir=str(tmp_path), name="base")
    assert (await follow_to_end(workstation, parent.id)).state == "succeeded"
    child = await workstation.launch(f"{sys.executable} job.py 2", workdir=str(tmp_path), name="wide",
                                     parent=parent.id)
    assert (await follow_to_end(workstation, child.id)).state == "succeeded"
    plain = await workstation.launch(f"{sys.executable} -c pass", workdir=str(tmp_path), name="nomedia")
    assert (await follow_to_end(workstation, plain.id)).state == "succeeded"

    def shown(app, wid: str) -> str:
        c = Console(width=200, record=True, file=open(os.devnull, "w"))
        c.print(app.query_one(wid).content)
        return c.export_text()

    app = LabdeckApp(workstation, live=False)
    async with app.run_test(size=(120, 36)) as pilot:
        await settle(pilot)
        await pilot.press("4")
        await settle(pilot)
        tab = app.query_one(LineageTab)
        tree = app.query_one(Tree)

        def select(run_id: str) -> None:
            def find(node):
                for n in node.children:
                    if n.data == run_id:
                        return n
                    n.expand()
                    got = find(n)
                    if got is not None:
                        return got
            tree.move_cursor(find(tree.root))

        async def rest() -> None:
            for _ in range(3):
                await app.workers.wait_for_complete()
                await pilot.pause()

        for r in tree.root.children:
            r.expand()
        await pilot.pause()
        select(child.id)
        await rest()
        assert app.query_one("#lineage-media").display
        head = shown(app, "#lineage-media-head")
        assert "media grid 1/3" in head and "n next" in head and "v view" in head
        a, b = shown(app, "#lineage-media-a"), shown(app, "#lineage-media-b")
        assert "wide · step 30 · [red]x" in a and "▀" in a  # the caption as plain text, the image in half blocks
        assert "base · step 20 (nearest)" in b and "▀" in b
        await pilot.press("n")
        await rest()
        assert "media cm 2/3" in shown(app, "#lineage-media-head")
        a = shown(app, "#lineage-media-a")
        assert "difference (this − other)" in a and "+1" in a and "-1" in a  # cm: the child's dog row vs step 20's
        await pilot.press("n")
        await rest()
        assert "per_class 3/3" in shown(app, "#lineage-media-head") and "1.0" in shown(app, "#lineage-media-a")
        # another run without media: no strip; back on the parent: the key chosen with n is kept
        select(plain.id)
        await rest()
        assert not app.query_one("#lineage-media").display
        select(parent.id)
        await rest()
        assert "media per_class 3/3" in shown(app, "#lineage-media-head")
        assert not app.query_one("#lineage-media-b").display  # a baseline: one side
        # the cursor moves on while a read is under way: what comes back for the old run is dropped
        select(child.id)
        select(plain.id)
        await rest()
        assert tab._media_pair[0] == plain.id and not app.query_one("#lineage-media").display
        # n while a run's read is still under way says so (it said "no media" for a run that has some)
        tab._media_pair, tab._media_shown = (child.id, parent.id), None
        tab.action_media_key()
        await pilot.pause()
        assert any("Still reading this run's media" in str(n.message) for n in app._notifications), [str(n.message) for n in app._notifications]
        assert not any("logged no media" in n.message for n in app._notifications)
        tab._media_pair = None
        # v still opens the full view beside the parent
        select(child.id)
        await rest()
        await pilot.press("v")
        await rest()
        from tui.mediaview import MediaScreen

        assert isinstance(app.screen, MediaScreen) and app.screen.other.id == parent.id
        # with the strip's sources, their indexes already read (not parsed again from the start)
        assert app.screen.src is tab._media_sources[child.id] and app.screen.osrc is tab._media_sources[parent.id]
        assert "grid" in app.screen.keys
        await pilot.press("escape")
        await pilot.resize_terminal(80, 24)
        await rest()
        head = shown(app, "#lineage-media-head")
        assert head.startswith("media (v to view): per_cla") and not app.query_one("#lineage-media-row").display


async def test_the_media_strip_of_an_active_run_follows_its_new_steps(workstation, tmp_path: Path,
                                                                      monkeypatch) -> None:
    """While a run is active its strip is read again (every MEDIA_LIVE_EVERY seconds, shortened here):
    a step logged after the cursor landed on it shows without moving the cursor."""
    import asyncio

    import tui.tabs.lineage as lineage_tab
    from tui.app import LabdeckApp

    monkeypatch.setattr(lineage_tab, "MEDIA_LIVE_EVERY", 0.3)
    go = tmp_path / "go"
    (tmp_path / "job.py").write_text(
        "import labdeck, os, time\n"
        "labdeck.log({'notes': labdeck.Text('first')}, step=1)\n"
        "labdeck.flush()\n"
        f"while not os.path.exists({str(go)!r}):\n"
        "    time.sleep(0.05)\n"
        "labdeck.log({'notes': labdeck.Text('second')}, step=2)\n"
        "labdeck.flush()\n"
        f"while os.path.exists({str(go)!r}):\n"
        "    time.sleep(0.05)\n")
    run = await workstation.launch(f"{sys.executable} job.py", workdir=str(tmp_path), name="live")
    app = LabdeckApp(workstation, live=False)
    try:
        async with app.run_test(size=(120, 36)) as pilot:
            await settle(pilot)
            await pilot.press("4")
            await settle(pilot)

            async def strip_says(word: str) -> bool:
                for _ in range(300):  # at most ~30 s
                    await pilot.pause(0.1)
                    if app.query_one("#lineage-media").display and word in str(app.query_one("#lineage-media-a").content.renderables[1]):
                        return True
                return False

            tree = app.query_one(Tree)
            node = next(n for n in tree.root.children if n.data == run.id)
            tree.move_cursor(node)
            assert await strip_says("first")
            go.write_text("")
            assert await strip_says("second")
    finally:
        go.unlink(missing_ok=True)
        await asyncio.sleep(0)


@pytest.mark.parametrize("counts", [[-100, 1, 3], [1e308] * 30 + [1.0], [-1, -2, -3], [0, 0, 5e-324], [0, -1]])
def test_the_strips_histogram_draws_any_finite_counts(counts) -> None:
    """A teammate's histogram passes validation with any finite counts (negative ones, or sums past
    the float range after rebinning); both sides' drawings (the sparkline of a side narrower than 40
    columns, mediaview's bars otherwise) draw them without raising: they are drawn on the UI thread, on
    every resize, and an IndexError/ValueError/OverflowError/ZeroDivisionError there closed the app."""
    import io

    from rich.console import Console

    from backends.media import MediaEntry, histogram_doc
    from tui.tabs.lineage import LineageTab

    doc = histogram_doc(json.dumps({"edges": list(range(len(counts) + 1)), "counts": counts}).encode())
    entry = MediaEntry("h", 3, "histogram", "h_3.hist.json", 10, None, None, None, None)
    for cols in (10, 20, 39, 40, 60):
        side = LineageTab._media_side(None, None, entry, doc, None, cols, None)
        out = io.StringIO()
        Console(width=cols, file=out, color_system=None).print(side)
        body = out.getvalue().splitlines()[1:]
        if cols < 40:
            assert set(body[0].strip()) <= set("▁▂▃▄▅▆▇█ ") or body[0].startswith("(an empty"), body
        assert any(c > 0 for c in counts) == any("█" in line for line in body), body  # the largest positive bin is full


@pytest.mark.parametrize("kind", ["table", "histogram", "confusion", "text", "image"])
async def test_the_strip_decodes_a_teammates_items_off_the_ui_thread(kind, monkeypatch) -> None:
    """Validating a logged item (up to MAX_ITEM_BYTES: a 16 MiB table took ~0.8 s) runs in a thread, as a
    PNG's decoding did already: the strip's worker runs on the UI's event loop."""
    import threading
    from collections import OrderedDict
    from types import SimpleNamespace

    from backends import media
    from backends.media import MediaEntry
    from tui.tabs.lineage import LineageTab

    name = {"table": "table_doc", "histogram": "histogram_doc", "confusion": "confusion_doc",
            "text": "text_doc", "image": "decode_png"}[kind]
    threads = []

    def probe(data):
        threads.append(threading.current_thread())
        return "decoded"

    monkeypatch.setattr(media, name, probe)

    class Source:
        run = SimpleNamespace(id="01HX0000000000000000000001")

        async def load(self, entry):
            return b"\x89PNG\r\n\x1a\n" if kind == "image" else b"{}"

    owner = SimpleNamespace(_media_docs=OrderedDict())
    entry = MediaEntry("k", 1, kind, f"k/1.{kind}", 2)
    assert await LineageTab._media_doc(owner, Source(), entry) == "decoded"
    assert threads and threads[0] is not threading.main_thread()


def test_the_strips_kept_media_sources_are_bounded_by_their_entries(monkeypatch) -> None:
    """The strip keeps each visited run's media source (its index mirror); a teammate's runs with
    indexes of 200,000 entries each (~90 MB apiece) were kept 32 deep. Past the two newest (the run
    and its parent), the oldest go once the kept indexes hold more than MEDIA_KEEP_ENTRIES."""
    from collections import OrderedDict
    from types import SimpleNamespace

    import tui.mediaview as mediaview
    import tui.tabs.lineage as lineage_tab
    from tui.tabs.lineage import LineageTab

    class Entries:
        def __len__(self) -> int:
            return 150_000

    class Source:
        def __init__(self, run, workstation) -> None:
            self.run, self.media = run, SimpleNamespace(index=Entries())

    monkeypatch.setattr(mediaview, "MediaSource", Source)
    owner = SimpleNamespace(_media_sources=OrderedDict(), app=SimpleNamespace(workstation=None))
    runs = [SimpleNamespace(id=f"01HX00000000000000000000{i:02d}") for i in range(10)]
    for r in runs:
        assert LineageTab._source(owner, r).run is r
    kept = list(owner._media_sources)
    assert kept == [r.id for r in runs[-2:]]  # the newest two stay, whatever they hold
    assert lineage_tab.MEDIA_KEEP_ENTRIES < 2 * 150_000


async def test_the_strips_kept_decoded_items_are_bounded_by_their_size(monkeypatch) -> None:
    """Decoded items are kept for the next visit; 32 images of MAX_PIXELS (48 MB of RGB each) were
    kept. Past the two newest, the oldest go once they hold more than MEDIA_KEEP_BYTES; an item that
    could not be read is kept as its error (and holds nothing)."""
    from collections import OrderedDict
    from types import SimpleNamespace

    from backends import media
    from backends.errors import LabdeckError
    from backends.media import MediaEntry
    from tui.tabs.lineage import LineageTab

    class RGB:
        def __len__(self) -> int:
            return 48 << 20

    monkeypatch.setattr(media, "decode_png", lambda data: SimpleNamespace(w=4096, h=4096, rgb=RGB()))

    class Source:
        run = SimpleNamespace(id="01HX0000000000000000000001")

        async def load(self, entry):
            if entry.step < 0:
                raise LabdeckError("gone")
            return b"\x89PNG\r\n\x1a\n"

    owner = SimpleNamespace(_media_docs=OrderedDict())
    assert isinstance(await LineageTab._media_doc(owner, Source(), MediaEntry("k", -1, "image", "k/-1.png", 2)),
                      LabdeckError)
    for step in range(12):
        assert (await LineageTab._media_doc(owner, Source(), MediaEntry("k", step, "image", f"k/{step}.png", 2))).w == 4096
    held = len(owner._media_docs) * (48 << 20)
    assert held <= 256 << 20 and len(owner._media_docs) >= 2  # (MEDIA_KEEP_BYTES)
    assert list(owner._media_docs)[-1][2] == 11  # the newest stays
