"""The log viewer: tui.logview.LogView through LogScreen, driven with Textual's Pilot on real files."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path
from typing import Callable

import pytest
from textual.app import App, ComposeResult
from textual.widgets import Input, Static

from tui.logview import CAP_CHARS, LineIndex, LogView, display_text
from tui.widgets import LogScreen

SIZE = (120, 40)


class LogApp(App[None]):
    """A tiny app that shows one LogScreen."""

    def __init__(self, path: Path | None, workstation: object | None = None) -> None:
        super().__init__()
        self.path = path
        self.workstation = workstation

    def compose(self) -> ComposeResult:
        yield Static("base screen")

    def on_mount(self) -> None:
        self.push_screen(LogScreen(run_ref="x", title="t", path=self.path))


async def wait_for(pilot, cond: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout

    def holds() -> bool:
        try:
            return bool(cond())
        except IndexError:  # the view is between two indexings (no lines for a moment)
            return False

    while not holds():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.02)
    await pilot.pause()


def view_of(app: App) -> LogView:
    assert isinstance(app.screen, LogScreen)
    return app.screen.query_one(LogView)


def status(app: App) -> str:
    return str(app.screen.query_one("#log-status", Static).render())


def screen_text(app: App) -> str:
    """What the LogView shows right now, one string per visible row."""
    view = view_of(app)
    return "\n".join(view.render_line(y).text for y in range(view.scrollable_content_region.height))


def write_lines(path: Path, lines: list[str], mode: str = "w") -> None:
    with open(path, mode, encoding="utf-8") as f:
        f.writelines(line + "\n" for line in lines)


# ---- the index on its own --------------------------------------------------------
@pytest.mark.parametrize("block", [1, 7, 64, 65536])
def test_line_index_matches_splitlines(block: int) -> None:
    rng = random.Random(block)
    data = b"".join(rng.choice([b"", b"a", b"bb" * rng.randrange(40), b"\xff\xfe", b"x" * 300]) + b"\n"
                    for _ in range(400)) + b"partial last line"
    read = lambda off, n: data[off:off + n]  # noqa: E731
    idx = LineIndex(0, block=block)
    pos = 0
    while pos < len(data):  # fed in odd pieces, like a growing file
        n = rng.randrange(1, 200)
        idx.feed(data[pos:pos + n], pos)
        pos += n
    lines = data.split(b"\n")
    assert idx.line_count == len(lines) and idx.newlines == len(lines) - 1
    start = 0
    for n, line in enumerate(lines):
        assert idx.line_span(n, read) == (start, start + len(line))
        assert idx.line_of_offset(start, read) == n
        assert idx.line_of_offset(start + len(line), read) == n  # its newline
        start += len(line) + 1


def test_line_index_from_a_tail_base_and_empty() -> None:
    data = b"one\ntwo\nthree\n"
    read = lambda off, n: data[off:off + n]  # noqa: E731
    empty = LineIndex(0)
    assert empty.line_count == 0 and empty.line_of_offset(0, read) == 0
    idx = LineIndex(4, block=3)
    idx.feed(data[4:], 4)
    assert idx.line_count == 2 and not idx.complete
    assert idx.line_span(1, read) == (8, 13)
    full = LineIndex(0)
    full.feed(data, 0)
    assert full.lines_before(4, read) == 1 and full.line_count == 3


def test_display_text_is_safe() -> None:
    assert display_text(b"\x1b[31mred\x1b[0m\tx") == ("red     x", False)
    assert display_text(b"\x1b]0;title\x07shown") == ("shown", False)
    assert display_text(b"10%\r50%\r100% done\r") == ("100% done", False)
    text, cut = display_text(b"bad \xff\xfe end")
    assert text == "bad \ufffd\ufffd end" and not cut
    assert display_text(b"nul\x00bell\x07") == ("nul\u2400bell\u2407", False)
    text, cut = display_text(b"y" * (CAP_CHARS + 5))
    assert len(text) == CAP_CHARS and cut
    assert display_text(b"abc", full_length=10_000_000)[1]


# ---- the screen --------------------------------------------------------------------
async def test_lines_appear_and_follow_appends(tmp_path: Path) -> None:
    log = tmp_path / "run.log"
    write_lines(log, [f"line {i}" for i in range(100)])
    app = LogApp(log)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: view_of(app).line_count == 100, what="100 lines")
        view = view_of(app)
        assert view.indexed and view.following
        assert view.lines[0] == "line 0" and view.lines[-1] == "line 99"
        assert "line 99" in screen_text(app)  # the end is on screen
        assert "line 100 of 100" not in status(app) and "of 100" in status(app) and "following" in status(app)

        write_lines(log, [f"appended {i}" for i in range(50)], mode="a")
        await wait_for(pilot, lambda: view_of(app).line_count == 150, what="appended lines")
        await pilot.pause(0.05)
        assert view.scroll_y == view.max_scroll_y
        assert "appended 49" in screen_text(app)

        # a line written in two parts shows as one, growing
        with open(log, "a") as f:
            f.write("half")
        await wait_for(pilot, lambda: view.line_count == 151, what="partial line")
        with open(log, "a") as f:
            f.write(" and the rest\n")
        await wait_for(pilot, lambda: view.lines[-1] == "half and the rest", what="the completed line")


async def test_scrolling_up_pauses_and_end_resumes(tmp_path: Path) -> None:
    log = tmp_path / "run.log"
    write_lines(log, [f"line {i}" for i in range(500)])
    app = LogApp(log)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: view_of(app).line_count == 500, what="lines")
        view = view_of(app)
        await pilot.pause(0.05)
        bottom = view.scroll_y
        assert bottom == view.max_scroll_y > 0
        await pilot.press("pageup")
        await pilot.pause()
        assert not view.following and view.scroll_y < bottom
        assert "paused" in status(app)
        held = view.scroll_y
        write_lines(log, [f"more {i}" for i in range(100)], mode="a")
        await wait_for(pilot, lambda: view.line_count == 600, what="more lines")
        assert view.scroll_y == held  # not dragged to the end

        await pilot.press("g")
        assert view.scroll_y == 0 and not view.following
        assert "line 0" in screen_text(app).splitlines()[0]

        await pilot.press("G")
        await pilot.pause()
        assert view.following and view.scroll_y == view.max_scroll_y
        write_lines(log, ["the very end"], mode="a")
        await wait_for(pilot, lambda: view.line_count == 601, what="one more")
        await pilot.pause(0.05)
        assert "the very end" in screen_text(app)

        await pilot.press("home")
        assert view.scroll_y == 0
        await pilot.press("end")
        assert view.following


def make_big_log(path: Path, mb: int) -> list[int]:
    """~``mb`` MB of repeated training-log lines; needles at lines 10 and 5,000 (returned)."""
    rng = random.Random(7)
    block = "".join(f"2024-05-01 12:{i % 60:02d}:00 epoch {i % 10}/10 step {i} loss {rng.random():.4f} "
                    f"acc {rng.random():.3f} lr 1.0e-04 {rng.randrange(100, 900)} samples/s\n" for i in range(10_000))
    head = [f"header line {i}" for i in range(10)] + ["here is the NEEDLE-xyz you want"]
    head += [f"filler {i}" for i in range(4_988)] + ["and a second needle-XYZ here"]
    data = block.encode()
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in head)
    with open(path, "ab") as f:
        for _ in range(mb * (1 << 20) // len(data)):
            f.write(data)
    return [10, 4_999]


async def test_search_finds_a_line_near_the_start_of_a_large_file(tmp_path: Path) -> None:
    log = tmp_path / "big.log"
    needles = make_big_log(log, 64)
    size = log.stat().st_size
    assert size > 60 << 20
    app = LogApp(log)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: view_of(app).line_count > 0, what="the tail")
        view = view_of(app)
        assert view.following
        await wait_for(pilot, lambda: view.indexed, timeout=10, what="the full index")
        assert view.lines[needles[0]] == "here is the NEEDLE-xyz you want"

        t = time.monotonic()
        await pilot.press("slash")
        search = app.screen.query_one("#log-search", Input)
        assert search.display and search.has_focus
        await pilot.press(*"needle-xyz")
        await pilot.press("enter")
        await wait_for(pilot, lambda: view.match_line is not None or view.search_state == "not found",
                       timeout=10, what="a match")
        assert time.monotonic() - t < 8
        assert view.match_line == needles[0] and not search.display
        assert not view.following
        assert view.scroll_y <= needles[0] < view.scroll_y + view.scrollable_content_region.height
        assert "NEEDLE-xyz" in screen_text(app)
        await wait_for(pilot, lambda: view.match_total is not None, timeout=10, what="the match count")
        assert (view.match_ordinal, view.match_total) == (1, 2)
        assert "match 1 of 2" in status(app) and f"line {needles[0] + 1:,}" in status(app)

        await pilot.press("n")
        await wait_for(pilot, lambda: view.match_line == needles[1], timeout=10, what="the next match")
        await wait_for(pilot, lambda: view.match_ordinal == 2, timeout=10, what="match 2")
        assert "match 2 of 2" in status(app)

        await pilot.press("N")
        await wait_for(pilot, lambda: view.match_line == needles[0], timeout=10, what="the previous match")

        await pilot.press("n", "n")  # past the last match: wraps to the first
        await wait_for(pilot, lambda: view.match_line == needles[0] and view.match_wrapped, timeout=10,
                       what="a wrapped match")

        await pilot.press("slash")
        search.value = ""
        await pilot.press(*"no such text anywhere", "enter")
        await wait_for(pilot, lambda: view.search_state == "not found", timeout=10, what="not found")
        assert view.match_line is None
        assert "not found" in status(app)


async def test_tail_shows_before_indexing_and_keeps_position_after(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "big.log"
    write_lines(log, [f"row {i:06d}" for i in range(200_000)])  # 2.2 MB
    gate = threading.Event()  # holds the whole-file scan until the test has looked at the tail
    feed = LineIndex.feed

    def gated_feed(self: LineIndex, data: bytes, offset: int) -> None:
        if self.base == 0:
            gate.wait(10)
        feed(self, data, offset)

    monkeypatch.setattr(LineIndex, "feed", gated_feed)
    app = App()
    try:
        async with app.run_test(size=SIZE) as pilot:
            view = LogView(log, tail_bytes=100_000)
            await app.mount(view)
            await wait_for(pilot, lambda: view.line_count > 0, what="the tail")
            assert not view.indexed and view.following
            assert 0 < view.line_count < 200_000 and view.lines[-1] == "row 199999"
            assert "of the last" in view.status.plain and "indexing" in view.status.plain
            view.focus()
            await pilot.press("pageup")  # paused on some tail line
            await pilot.pause()
            assert not view.following
            shown = view.lines[view.top_line]
            gate.set()
            await wait_for(pilot, lambda: view.indexed, timeout=10, what="the full index")
            await pilot.pause()
            assert view.line_count == 200_000 and view.lines[0] == "row 000000"
            assert view.lines[view.top_line] == shown  # renumbered, not moved
            assert view.status.plain.startswith(f"line {int(shown.split()[1]) + 1:,} of 200,000")
    finally:
        gate.set()


async def test_invalid_utf8_escapes_and_a_10mb_line_render(tmp_path: Path) -> None:
    log = tmp_path / "odd.log"
    huge = b"x" * (10 << 20)
    log.write_bytes(b"first\n" + b"bad \xff\xfe\xc3\x28 bytes\n" + huge + b"\n" + b"\x1b[1;31mred\x1b[0m\tok\r\n"
                    + b"last\n")
    app = LogApp(log)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: view_of(app).line_count == 5, what="five lines")
        view = view_of(app)
        assert view.lines[1].startswith("bad \ufffd\ufffd\ufffd(")
        assert view.lines[3] == "red     ok"
        big = view.lines[2]
        assert big.startswith("x" * CAP_CHARS) and "line cut" in big and len(big) < CAP_CHARS + 200
        t = time.monotonic()
        await pilot.press("g")
        await pilot.pause(0.05)
        assert "xxxxx" in screen_text(app)
        await pilot.press("right", "right")
        await pilot.pause(0.05)
        assert view.scroll_x == 2 and screen_text(app).startswith("rst")
        await pilot.press("left", "left", "end")
        await pilot.pause(0.05)
        assert time.monotonic() - t < 3
        assert "last" in screen_text(app)


async def test_escape_closes_search_then_screen(tmp_path: Path) -> None:
    log = tmp_path / "run.log"
    write_lines(log, ["a", "b"])
    app = LogApp(log)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: view_of(app).line_count == 2, what="lines")
        await pilot.press("slash")
        search = app.screen.query_one("#log-search", Input)
        assert search.display
        await pilot.press("q", "n")  # typed into the search, not closing or searching
        assert search.value == "qn" and isinstance(app.screen, LogScreen)
        await pilot.press("escape")
        assert not search.display and isinstance(app.screen, LogScreen)
        await pilot.press("escape")
        await pilot.pause()
        assert not isinstance(app.screen, LogScreen)


async def test_missing_file_then_created_then_truncated(tmp_path: Path) -> None:
    log = tmp_path / "later.log"
    app = LogApp(log)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: "waiting for" in status(app), what="a waiting status")
        write_lines(log, ["born"])
        await wait_for(pilot, lambda: view_of(app).line_count == 1, what="the file's line")
        write_lines(log, [f"long {i}" for i in range(30)])
        await wait_for(pilot, lambda: view_of(app).line_count == 30, what="rewritten")
        log.write_text("short\n")  # truncated: indexed afresh
        await wait_for(pilot, lambda: view_of(app).line_count == 1 and view_of(app).lines[0] == "short",
                       what="the truncated file")


class FakeWorkstation:
    def __init__(self) -> None:
        self.text = "hello\n"

    async def log_tail(self, ref: str, max_bytes: int = 64 * 1024) -> str:
        assert ref == "x"
        return self.text[-max_bytes:]


async def test_without_a_path_the_workstation_tail_is_followed() -> None:
    ws = FakeWorkstation()
    app = LogApp(None, workstation=ws)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: "hello" in "\n".join(view_of(app).lines), what="the tail")
        ws.text += "world\n"
        await wait_for(pilot, lambda: list(view_of(app).lines) == ["hello", "world"], what="the new line")
        ws.text = "".join(f"{i}\n" for i in range(30_000))[-64 * 1024:]  # the window slid: rewritten
        await wait_for(pilot, lambda: len(view_of(app).lines) > 0 and view_of(app).lines[-1] == "29999", what="the slid window")
        scratch = app.screen._scratch
        assert scratch is not None and scratch.exists()
        await pilot.press("escape")
        await pilot.pause()
        assert not scratch.exists()


def test_binding_ids() -> None:
    ids = {b.id for b in LogScreen.BINDINGS}
    assert ids == {"log.close", "log.end", "log.home", "log.search", "log.next", "log.prev", "log.wrap", "log.help"}
    assert all(b.tooltip for b in LogScreen.BINDINGS)


# ---- wrap and horizontal scroll ---------------------------------------------------------
async def test_wrap_toggles_and_long_lines_scroll_sideways_without_it(tmp_path: Path) -> None:
    path = tmp_path / "run.log"
    long = "".join(f"{i:03d}," for i in range(100))  # 400 characters, 100 numbered pieces
    write_lines(path, ["first line", long, "short", "last line"])
    app = LogApp(path)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: view_of(app).line_count == 4, what="the file")
        view = view_of(app)
        width = view.scrollable_content_region.width
        rows = screen_text(app).splitlines()
        assert rows[1].rstrip() == long[:width]  # cut at the edge, not wrapped
        shown = {key: ab.binding.description for key, ab in app.screen.active_bindings.items() if ab.binding.show}
        assert shown.get("w") == "Wrap" and shown.get("left") == "Pan"  # both are in the footer
        await pilot.press("right", "right", "l")
        await pilot.pause()
        assert view.scroll_x == 3
        assert screen_text(app).splitlines()[1].startswith(long[3:13])
        assert "column 4" in status(app)
        await pilot.press("h")
        await pilot.pause()
        assert view.scroll_x == 2

        await pilot.press("w")
        await wait_for(pilot, lambda: view.wrap, what="wrap on")
        assert view.scroll_x == 0 and view.virtual_size.width == 0  # nothing to scroll sideways
        rows = [r.rstrip() for r in screen_text(app).splitlines()]
        pieces = [long[i:i + width] for i in range(0, len(long), width)]
        expected = ["first line", *pieces, "short", "last line"]
        assert len(pieces) > 1 and rows[:len(expected)] == expected
        assert "wrap" in status(app)

        await pilot.press("w")
        await wait_for(pilot, lambda: not view.wrap, what="wrap off")
        assert screen_text(app).splitlines()[1].rstrip() == long[:width]


async def test_wrap_keeps_the_end_in_view_while_following(tmp_path: Path) -> None:
    path = tmp_path / "run.log"
    height = SIZE[1]
    write_lines(path, [f"line {i}" for i in range(200)] + ["x" * 1000, "THE END"])
    app = LogApp(path)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: view_of(app).line_count == 202, what="the file")
        view = view_of(app)
        await pilot.press("w")
        await wait_for(pilot, lambda: view.wrap, what="wrap on")
        rows = [r.rstrip() for r in screen_text(app).splitlines()]
        assert rows[-1] == "THE END" and view.following  # the last line's rows end on the last screen row
        assert rows[-2].startswith("x")
        await pilot.press("g")
        await pilot.pause()
        assert screen_text(app).splitlines()[0].rstrip() == "line 0" and not view.following
        assert height  # the view is shorter than the file: scrolling happened
