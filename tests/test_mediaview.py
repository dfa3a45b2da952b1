"""The Media view (tui/mediaview.py): real media written by the in-job SDK in real processes, read
over the local transport, driven with Textual's pilot; a halfblock snapshot; the renderers."""

from __future__ import annotations

import getpass
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from rich.text import Text
from textual.app import App
from textual.widgets import DataTable, Static

from backends.media import Pixels
from backends.models import Run
from backends.providers.local import LocalTransport
from tui.mediaview import MediaScreen, MediaSource, confusion_text, halfblock, histogram_text

REPO = Path(__file__).resolve().parents[1]
RUNTIME = REPO / "backends" / "runtime"
CHILD_ID, PARENT_ID = "01HX0000000000000000000002", "01HX0000000000000000000001"

SCRIPT = """
import labdeck
G = {gain}
def img(step):
    # an 8×8 gradient whose colour moves with the step: deterministic
    return [[[min(255, x * 32 * G), min(255, y * 32), (step * 40) % 256] for x in range(8)] for y in range(8)]
for step in {steps}:
    labdeck.log({{"samples": labdeck.Image(img(step), caption="fake <b>[red]{name}[/red]</b>"),
                 "per_class": labdeck.Table(["class", "f1"], [["cat", 0.5 * G], ["[b]dog[/b]", 0.7]]),
                 "confusion": labdeck.Confusion([0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 2 - G % 2], labels=["cat", "dog", "eel"]),
                 "weights": labdeck.Histogram([x * G for x in range(50)], bins=5),
                 "notes": labdeck.Text("[bold]not markup[/bold]\\nline two")}}, step=step)
labdeck.flush()
"""


def make_run(root: Path, rid: str, name: str, gain: int, steps: list[int], parent: str | None = None) -> Run:
    run_dir = root / rid
    run_dir.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LABDECK_")}
    env.update({"PYTHONPATH": str(RUNTIME), "LABDECK_RUN_DIR": str(run_dir),
                "LABDECK_METRICS_FILE": str(run_dir / "metrics.jsonl"), "PYTHONDONTWRITEBYTECODE": "1"})
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(SCRIPT.format(gain=gain, steps=steps, name=name))],
                         env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return Run(command="python train.py", instance="local", id=rid, name=name, user=getpass.getuser(),
               state="succeeded", run_dir=str(run_dir), parent=parent)


@pytest.fixture
def runs(tmp_path: Path) -> tuple[Run, Run, Path]:
    root = tmp_path / "runs"
    parent = make_run(root, PARENT_ID, "baseline", 1, [0, 10, 20])
    child = make_run(root, CHILD_ID, "wider", 2, [0, 10, 15, 30], parent=PARENT_ID)
    return child, parent, tmp_path


class MediaApp(App):
    def __init__(self, run: Run, other: Run | None, root: Path) -> None:
        super().__init__()
        self.args = run, other, root

    def on_mount(self) -> None:
        run, other, root = self.args
        t = LocalTransport(root / "runs")
        srcs = tuple(MediaSource(r, transport=t, cache_root=root / "cache", tb_files=[])
                     for r in ([run] + ([other] if other else [])))
        self.push_screen(MediaScreen(run, other, sources=srcs))


async def settle(pilot) -> None:
    for _ in range(3):
        await pilot.app.workers.wait_for_complete()
        await pilot.pause()


def status(app) -> str:
    return str(app.screen.query_one("#media-status", Static).render())


def body(app, pane: str = "#media-a") -> Text:
    return app.screen.query_one(f"{pane} .media-body", Static).render()


async def test_keys_and_steps_side_by_side(runs) -> None:
    child, parent, root = runs
    app = MediaApp(child, parent, root)
    async with app.run_test(size=(120, 36)) as pilot:
        await settle(pilot)
        assert status(app).startswith("samples · step 30 (4 of 4) · image")
        cap_b = str(app.screen.query_one("#media-b .media-caption", Static).render())
        assert "baseline · step 20 (nearest)" in cap_b  # the parent has no step 30: its nearest
        cap_a = str(app.screen.query_one("#media-a .media-caption", Static).render())
        assert "fake <b>[red]wider[/red]</b>" in cap_a  # shown as text, never as markup
        image = app.screen.query_one("#media-a HalfBlockImage")
        assert image.display and image.strips and "▀" in image.strips[0].text
        await pilot.press("left")
        await settle(pilot)
        assert "step 15 (3 of 4)" in status(app)
        cap_b = str(app.screen.query_one("#media-b .media-caption", Static).render())
        assert "step 10 (nearest)" in cap_b
        await pilot.press("left", "left", "left")  # stops at the first step
        await settle(pilot)
        assert "step 0 (1 of 4)" in status(app)
        await pilot.press("end")
        await settle(pilot)
        assert "step 30 (4 of 4)" in status(app)
        await pilot.press("down")  # the next key: the table
        await settle(pilot)
        assert status(app).startswith("per_class · step 30")
        table = app.screen.query_one("#media-a DataTable", DataTable)
        assert table.display and table.row_count == 2
        assert str(table.get_cell_at((1, 0))) == "[b]dog[/b]"
        assert table.get_cell_at((0, 1)).style == "yellow"  # 1.0 here, 0.5 in the parent: differs
        assert table.get_cell_at((1, 1)).style == ""
        await pilot.press("down")
        await settle(pilot)
        assert status(app).startswith("confusion")
        shown = str(body(app))
        assert "difference (this − other)" in shown and "+1" in shown and "-1" in shown
        await pilot.press("down", "down")
        await settle(pilot)
        assert status(app).startswith("notes") and str(body(app)) == "[bold]not markup[/bold]\nline two"


async def test_a_run_without_media_says_how_to_log_them(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / CHILD_ID
    run_dir.mkdir(parents=True)
    run = Run(command="x", instance="local", id=CHILD_ID, user=getpass.getuser(), state="succeeded",
              run_dir=str(run_dir))
    app = MediaApp(run, None, tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        assert "no media logged yet" in status(app)
        await pilot.press("right", "left", "down")  # nothing to step through: no error
        await settle(pilot)


async def test_a_huge_table_is_shown_in_part(tmp_path: Path) -> None:
    """A job's table of 10,000 rows × 200 columns (10 MB, under the 16 MiB a file may have) was put in
    the DataTable whole: 2 million cells built on the UI's thread."""
    import json

    run_dir = tmp_path / "runs" / CHILD_ID
    (run_dir / "media" / "big").mkdir(parents=True)
    doc = json.dumps({"columns": [f"c{i}" for i in range(200)], "rows": [[1.5] * 200] * 10_000}).encode()
    (run_dir / "media" / "big" / "1.json").write_bytes(doc)
    (run_dir / "media" / "index.jsonl").write_text(json.dumps(
        {"key": "big", "step": 1, "kind": "table", "file": "big/1.json", "size": len(doc)}) + "\n")
    run = Run(command="x", instance="local", id=CHILD_ID, user=getpass.getuser(), state="succeeded",
              run_dir=str(run_dir))
    app = MediaApp(run, None, tmp_path)
    async with app.run_test(size=(120, 36)) as pilot:
        await settle(pilot)
        table = app.screen.query_one("#media-a DataTable", DataTable)
        assert table.display and (table.row_count, len(table.columns)) == (1000, 50)
        cap = str(app.screen.query_one("#media-a .media-caption", Static).render())
        assert "the first 1,000 of 10,000 rows, 50 of 200 columns" in cap


async def test_stepping_through_images_runs_one_decoder_at_a_time(runs, monkeypatch) -> None:
    """Each → cancelled the drawing but not its decode thread: holding → over large PNGs ran up to
    the executor's six decoders at once (~100 MiB each)."""
    import threading
    import time

    import tui.mediaview as mv

    child, parent, root = runs
    lock = threading.Lock()
    busy, most = [0], [0]

    def slow_decode(data: bytes):
        with lock:
            busy[0] += 1
            most[0] = max(most[0], busy[0])
        time.sleep(0.3)
        with lock:
            busy[0] -= 1
        return real(data)
    real = mv.decode_png
    monkeypatch.setattr(mv, "decode_png", slow_decode)
    app = MediaApp(child, None, root)
    async with app.run_test(size=(120, 36)) as pilot:
        for _ in range(3):
            await pilot.press("left")
            await pilot.pause(0.05)
        await settle(pilot)
        await pilot.pause(1.0)
        await settle(pilot)
        assert most[0] == 1
        assert "step 0 (1 of 4)" in status(app)
        image = app.screen.query_one("#media-a HalfBlockImage")
        assert image.display and image.strips


def slider_text(app) -> str:
    from tui.mediaview import StepSlider

    return str(app.screen.query_one(StepSlider).render())


async def test_step_slider_keys_and_clicks(tmp_path: Path) -> None:
    """The slider: its knob sits at the step's place among the logged steps; [ ] and PageUp/PageDown
    move by a tenth of them; a click on the bar goes to the step under it; ←/→ still step."""
    from tui.mediaview import StepSlider

    root = tmp_path / "runs"
    run = make_run(root, CHILD_ID, "long", 1, list(range(0, 210, 10)))  # 21 steps: a tenth is 2
    app = MediaApp(run, None, tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        slider = app.screen.query_one(StepSlider)
        text = slider_text(app)
        assert text.startswith("0 ├") and "┤ 200" in text and text.rstrip().endswith("step 200")
        assert text.index("●") == text.index("┤") - 1  # the last step: the knob at the right end
        for key, want in (("left_square_bracket", 180), ("pageup", 160), ("right_square_bracket", 180),
                          ("pagedown", 200), ("pagedown", 200), ("left", 190)):
            await pilot.press(key)
            await settle(pilot)
            assert f"step {want} (" in status(app), (key, status(app))
            assert slider_text(app).rstrip().endswith(f"step {want}")
        left, bw = slider._bar(slider.content_size.width)
        pad = slider.styles.padding.left
        await pilot.click(StepSlider, offset=(pad + left, 0))  # the bar's first cell: the first step
        await settle(pilot)
        assert "step 0 (1 of 21)" in status(app)
        assert slider_text(app).index("●") == left
        await pilot.click(StepSlider, offset=(pad + left + (bw - 1) // 2, 0))  # the middle: the middle step
        await settle(pilot)
        assert "step 100 (11 of 21)" in status(app), status(app)
        await pilot.click(StepSlider, offset=(pad + left + bw - 1, 0))
        await settle(pilot)
        assert "step 200 (21 of 21)" in status(app)
        await pilot.click(StepSlider, offset=(0, 0))  # the first label, not the bar: nothing
        await settle(pilot)
        assert "step 200 (21 of 21)" in status(app)
        assert slider.region.right <= 80 and slider.region.height == 1
        from tui.app import all_binding_ids

        assert {"media.back", "media.on"} <= all_binding_ids()  # remappable in [keys]


async def test_step_slider_side_by_side_shows_both_steps(runs) -> None:
    child, parent, root = runs
    app = MediaApp(child, parent, root)
    async with app.run_test(size=(120, 36)) as pilot:
        await settle(pilot)
        t = slider_text(app)
        assert "┤ 30" in t and t.rstrip().endswith("step 30 · parent 20 (nearest)")
        bar_end = t.index("┤")
        await pilot.press("home")
        await settle(pilot)
        t = slider_text(app)
        assert t.rstrip().endswith("step 0 · parent 0") and t.index("┤") == bar_end  # the bar keeps its length
        await pilot.press("right_square_bracket")
        await settle(pilot)
        assert slider_text(app).rstrip().endswith("step 10 · parent 10")


def test_media_view_snapshot(snap_compare, runs) -> None:
    child, parent, root = runs

    async def prepare(pilot) -> None:
        await settle(pilot)

    assert snap_compare(MediaApp(child, parent, root), run_before=prepare, terminal_size=(100, 30))


def test_media_view_snapshot_narrow_with_slider(snap_compare, runs) -> None:
    """80×24, one run, a step back from the last: the slider's knob, labels and step fit the width."""
    child, parent, root = runs

    async def prepare(pilot) -> None:
        await settle(pilot)
        await pilot.press("left")
        await settle(pilot)

    assert snap_compare(MediaApp(child, None, root), run_before=prepare, terminal_size=(80, 24))


# ---- renderers ------------------------------------------------------------------------------------
def test_halfblock_draws_two_pixels_a_cell_deterministically() -> None:
    px = Pixels(2, 2, bytes([255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 255]))
    t = halfblock(px, 2, 1, upscale=1)
    assert t.plain == "▀▀"
    styles = [str(s.style) for s in t.spans]
    assert styles == ["#ff0000 on #0000ff", "#00ff00 on #ffffff"]
    big = halfblock(px, 40, 10)  # enlarged at most 4 times
    assert big.plain.split("\n") == ["▀" * 8] * 4
    odd = halfblock(Pixels(1, 3, bytes([9] * 9)), 10, 10, upscale=1)  # an odd height: the last half is black
    assert odd.plain == "▀\n▀" and str(odd.spans[-1].style) == "#090909 on #000000"


def test_histogram_and_confusion_text() -> None:
    h = histogram_text({"edges": [0.0, 1.0, 2.0], "counts": [1.0, 3.0], "n": 4}, 60, 10)
    lines = h.plain.split("\n")
    assert len(lines) == 2 and lines[1].count("█") > lines[0].count("█") and lines[1].endswith(" 3")
    assert "empty" in histogram_text({"edges": [], "counts": [], "n": 0}, 60, 10).plain
    c = confusion_text(["[red]a[/red]", "b"], [[3, 1], [0, 4]], (["[red]a[/red]", "b"], [[2, 2], [0, 4]]))
    assert "[red]a[/red]" in c.plain and "difference" in c.plain and "+1" in c.plain
    assert "classes differ" in confusion_text(["a"], [[1]], (["z"], [[1]])).plain


async def test_v_opens_the_media_of_a_real_run_from_jobs_and_monitor(home: Path, tmp_path: Path) -> None:
    """The whole path: a job logs media through the SDK, the app reads them over the run's transport."""
    from backends.config import load_config
    from backends.paths import Paths
    from backends.workstation import Workstation
    from tests.test_monitor import follow_to_end
    from tui.app import LabdeckApp
    from tui.screenshots import settle as app_settle

    ws = Workstation(load_config(Paths.resolve(home)))
    (tmp_path / "job.py").write_text(
        "import labdeck\n"
        "for s in (1, 2):\n"
        "    labdeck.log({'loss': 1 / s, 'grid': labdeck.Image([[0.0, 1.0], [1.0, 0.0]]),"
        " 'cm': labdeck.Confusion([0, 1], [0, s % 2], labels=['a', 'b'])}, step=s)\n")
    run = await ws.launch(f"{sys.executable} job.py", workdir=str(tmp_path), name="media-job")
    assert (await follow_to_end(ws, run.id)).state == "succeeded"
    app = LabdeckApp(ws, live=False)
    async with app.run_test(size=(120, 34)) as pilot:
        await app_settle(pilot)
        await pilot.press("2")
        await app_settle(pilot)
        await pilot.press("v")
        await settle(pilot)
        assert isinstance(app.screen, MediaScreen)
        assert status(app).startswith("grid · step 2 (2 of 2) · image")
        await pilot.press("down")
        await settle(pilot)
        assert "2 of 2" in status(app) and "cm" in status(app)
        await pilot.press("escape")
        await pilot.press("3")
        await app_settle(pilot)
        await pilot.press("v")
        await settle(pilot)
        assert isinstance(app.screen, MediaScreen) and app.screen.run.id == run.id
        await pilot.press("escape")

        # Lineage: the run beside its parent; Compare: the two runs
        child = await ws.launch(f"{sys.executable} job.py", workdir=str(tmp_path), name="media-child", parent=run.id)
        assert (await follow_to_end(ws, child.id)).state == "succeeded"
        app._runs_stale = True  # the child ended already: have the team's records read again
        app.load_runs()
        await app_settle(pilot)
        await pilot.press("4")
        await app_settle(pilot)
        from tui.tabs.lineage import LineageTab
        from tui.widgets import CompareScreen

        tab = app.query_one(LineageTab)
        tab.current = child.id
        await pilot.press("v")
        await settle(pilot)
        assert isinstance(app.screen, MediaScreen) and app.screen.other.id == run.id
        assert "parent media-job" in str(app.screen.query_one("#media-top").render())
        assert "media-job · step 2" in str(app.screen.query_one("#media-b .media-caption").render())
        await pilot.press("escape")
        app.push_screen(CompareScreen(tab.runs[child.id], tab.runs[run.id], tab.view, None))
        await app_settle(pilot)
        await pilot.press("v")
        await settle(pilot)
        assert isinstance(app.screen, MediaScreen) and app.screen.other.id == run.id
        assert "compared with" in str(app.screen.query_one("#media-top").render())


async def test_tensorboard_media_of_a_real_run_need_no_change_to_the_script(workstation, tmp_path: Path) -> None:
    """A script that logs with tensorboardX only: its images, histograms and text are media keys."""
    pytest.importorskip("tensorboardX")
    from backends.media import decode_png
    from tests.test_monitor import follow_to_end

    (tmp_path / "tbjob.py").write_text(
        "import numpy as np\nfrom tensorboardX import SummaryWriter\n"
        "w = SummaryWriter('tb')\n"
        "for s in (0, 5):\n"
        "    w.add_image('samples', np.full((3, 4, 4), 0.5 + s / 20), s)\n"
        "    w.add_histogram('weights', np.arange(10.0) + s, s)\n"
        "    w.add_text('notes', f'epoch {s}', s)\n"
        "    w.add_scalars('pair', {'train': s, 'val': 2 * s}, s)\n"
        "w.close()\n")
    run = await workstation.launch(f"{sys.executable} tbjob.py", workdir=str(tmp_path), name="tb-media")
    done = await follow_to_end(workstation, run.id)
    assert done.state == "succeeded"
    workstation.monitor.runs.pop(run.id, None)  # as in a later session: nothing mirrored yet
    src = MediaSource(done, workstation)
    await src.refresh()
    idx = src.media.index
    assert sorted(idx.keys()) == ["notes/text_summary", "samples", "weights"]
    e = idx.get("samples", 5)
    assert e.source == "tensorboard" and idx.steps("samples") == [0, 5]
    px = decode_png(await src.load(e))
    assert (px.w, px.h) == (4, 4) and px.rgb[:3] == bytes([191, 191, 191])
    assert await src.load(idx.get("notes/text_summary", 5)) == "epoch 5"
    assert await src.refresh() == 0  # nothing new: the event files are not parsed again


@pytest.mark.parametrize("kind", ["table", "histogram", "confusion", "text"])
async def test_the_media_view_checks_a_teammates_items_off_the_ui_thread(kind, monkeypatch) -> None:
    """The Media view, like the Lineage strip, checks a logged item in a thread (a teammate's 16 MiB
    table took ~0.8 s on the UI thread): one shared backends.media.item_doc serves both."""
    import threading
    from collections import OrderedDict
    from types import SimpleNamespace

    from backends import media
    from backends.media import MediaEntry

    threads = []

    def probe(data):
        threads.append(threading.current_thread())
        return "checked"

    monkeypatch.setattr(media, {"table": "table_doc", "histogram": "histogram_doc", "confusion": "confusion_doc",
                                "text": "text_doc"}[kind], probe)

    class Source:
        run = SimpleNamespace(id="01HX0000000000000000000001")

        async def load(self, entry):
            return b"{}"

    owner = SimpleNamespace(_decoded=OrderedDict())
    assert await MediaScreen._decode(owner, Source(), MediaEntry("k", 1, kind, f"k/1.{kind}", 2)) == "checked"
    assert threads and threads[0] is not threading.main_thread()


async def test_two_refreshes_of_one_source_at_once_mirror_its_index_once(runs) -> None:
    """The Lineage strip hands its kept sources to the Media view (v), whose first refresh can meet
    the strip's own still under way: they take turns, and the local index copy is the run's, once."""
    import asyncio

    child, _, root = runs
    src = MediaSource(child, transport=LocalTransport(root / "runs"), cache_root=root / "cache", tb_files=[])
    got = await asyncio.gather(src.refresh(), src.refresh(), src.refresh())
    remote = (Path(child.run_dir) / "media" / "index.jsonl").read_bytes()
    assert src.media.index_path.read_bytes() == remote
    assert sum(got) == len(remote.splitlines()) and len(src.media.index.steps("samples")) == 4
