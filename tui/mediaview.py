"""The Media view: a run's images, tables, histograms, confusion matrices and text, step by step.

Opened with ``v`` on a run in Jobs, Monitor (the highlighted run) and Lineage (beside its parent,
when it has one), and from Compare (the two runs side by side). Keys: ``↑``/``↓`` pick a key in
the list, ``←``/``→`` step back and forth through its steps (``home``/``end``: first and last,
``[``/``]`` or ``pageup``/``pagedown``: a tenth of the steps; a click on the step slider
(:class:`StepSlider`): the step under it), ``r`` refreshes, ``escape`` closes. The other run's pane shows the same key at the same step, or
the nearest one it has; tables and confusion matrices show what differs.

Drawing, all deterministic:

* images: Unicode half blocks (``▀``, the upper pixel as the foreground, the lower as the
  background), nearest-neighbour scaled to the pane (:func:`halfblock`) from PNGs decoded with
  :func:`backends.media.decode_png`; or, when :mod:`tui.termimage` chose Kitty graphics or Sixel
  before the app ran (``[ui] images``), textual-image's widget fed the same decoded pixels;
* tables: a ``DataTable`` (cells that differ from the other run's table in yellow);
* histograms: horizontal bars over equal bins (:func:`histogram_text`);
* confusion matrices: a heat map of row-normalised counts, and the difference to the other run
  (:func:`confusion_text`);
* text: as plain text.

Everything that came from the run (keys, captions, table cells, labels, text) is shown as plain
text (:mod:`tui.format`), never as markup. Media are fetched only when shown
(:class:`backends.media.RunMedia`); decoded images and drawn panes are cached, so stepping back
to a step seen before costs a dictionary lookup.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import Any

from rich.color import Color
from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual import events
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.strip import Strip
from textual.widget import Widget
from textual.widgets import DataTable, Label, OptionList, Static
from textual.widgets.option_list import Option

from backends.errors import LabdeckError
from backends.media import (MediaEntry, MediaError, Pixels, RunMedia, decode_png, item_doc, TensorBoardMedia,
                            rebin_histogram)
from backends.text import plain_line

from . import termimage
from .footer import LabdeckFooter
from .format import cell, safe, text
from .steps import step_label

__all__ = ["MediaScreen", "MediaSource", "HalfBlockImage", "StepSlider", "halfblock", "halfblock_strips",
           "histogram_text", "confusion_text", "open_media"]

#: The most of a logged table the view shows (table_doc keeps up to 10,000 × 200 cells: seconds of
#: DataTable work on the UI's thread and hundreds of MiB).
MAX_TABLE_ROWS, MAX_TABLE_COLS = 1000, 50

_STYLE_CACHE: dict[tuple[int, int, int, int, int, int], Style] = {}


def _style(top: tuple[int, int, int], bottom: tuple[int, int, int]) -> Style:
    k = top + bottom
    s = _STYLE_CACHE.get(k)
    if s is None:
        if len(_STYLE_CACHE) > 65536:
            _STYLE_CACHE.clear()
        s = _STYLE_CACHE[k] = Style(color=Color.from_rgb(*top), bgcolor=Color.from_rgb(*bottom))
    return s


def _halfblock_runs(px: Pixels, cols: int, rows: int, upscale: int) -> list[list[tuple[int, Style]]]:
    """Per terminal line, runs of (cells, style) of ``▀`` half blocks (see :func:`halfblock`)."""
    cols, rows = max(1, cols), max(1, rows)
    scale = min(cols / px.w, 2 * rows / px.h, float(upscale))
    ow = max(1, min(cols, int(px.w * scale)))
    oh = max(1, min(2 * rows, int(px.h * scale)))
    xs = [min(px.w - 1, int((x + 0.5) * px.w / ow)) for x in range(ow)]
    ys = [min(px.h - 1, int((y + 0.5) * px.h / oh)) for y in range(oh)]
    rgb = px.rgb
    stride = px.w * 3
    lines: list[list[tuple[int, Style]]] = []
    for r in range(0, oh, 2):
        line: list[tuple[int, Style]] = []
        lines.append(line)
        top_row = ys[r] * stride
        bot_row = ys[r + 1] * stride if r + 1 < oh else None
        run_style = None
        run_len = 0
        for x in xs:
            i = top_row + 3 * x
            top = (rgb[i], rgb[i + 1], rgb[i + 2])
            if bot_row is None:
                bottom = (0, 0, 0)
            else:
                j = bot_row + 3 * x
                bottom = (rgb[j], rgb[j + 1], rgb[j + 2])
            st = _style(top, bottom)
            if st is run_style:
                run_len += 1
                continue
            if run_len:
                line.append((run_len, run_style))
            run_style, run_len = st, 1
        if run_len:
            line.append((run_len, run_style))
    return lines


def halfblock(px: Pixels, cols: int, rows: int, *, upscale: int = 4) -> Text:
    """``px`` drawn in at most ``cols`` × ``rows`` cells with ``▀`` half blocks (two pixels a cell:
    the upper one the foreground, the lower one the background), nearest-neighbour scaled to fit,
    aspect kept, enlarged at most ``upscale`` times."""
    out = Text(no_wrap=True, end="")
    lines = _halfblock_runs(px, cols, rows, upscale)
    for i, line in enumerate(lines):
        for n, st in line:
            out.append("▀" * n, st)
        if i < len(lines) - 1:
            out.append("\n")
    return out


def halfblock_strips(px: Pixels, cols: int, rows: int, *, upscale: int = 4) -> list[Strip]:
    """The same drawing as :func:`halfblock`, as Textual strips (one per line) for :class:`HalfBlockImage`."""
    return [Strip([Segment("▀" * n, st) for n, st in line], sum(n for n, _ in line))
            for line in _halfblock_runs(px, cols, rows, upscale)]


class HalfBlockImage(Widget):
    """An image drawn with the Line API from precomputed strips: a step change to an image drawn
    before is a list swap and a repaint, with no layout and no markup parsing."""

    DEFAULT_CSS = "HalfBlockImage { height: 1fr; width: 1fr; }"

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.strips: list[Strip] = []

    def show(self, strips: list[Strip]) -> None:
        self.strips = strips
        self.refresh()

    def render_line(self, y: int) -> Strip:
        if y < len(self.strips):
            return self.strips[y]
        return Strip.blank(0)


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    return f"{v:.3g}" if 1e-3 <= a < 1e5 else f"{v:.2e}"


def histogram_text(doc: dict, cols: int, rows: int) -> Text:
    """Horizontal bars: the histogram rebinned to at most ``rows`` (≤ 40) equal bins over its
    occupied range (:func:`backends.media.rebin_histogram`)."""
    out = Text(end="")
    lo, hi, bins = rebin_histogram(doc, min(rows, 40))
    # a teammate's counts are any finite numbers: a negative one gets no bar, a bin summed past the float
    # range (inf) a full one (max(bins) ≤ 0, inf/inf or inf as a length raised on the UI thread)
    top = max((c for c in bins if c > 0), default=0)
    if not top:
        out.append("(an empty histogram)", style="dim")
        return out
    width = (hi - lo) / len(bins)
    bar_w = max(4, cols - 33)
    for k, c in enumerate(bins):
        a = lo + k * width
        b = lo + (k + 1) * width
        out.append(f"{_fmt(a):>10} – {_fmt(b):<9} ", style="dim")
        out.append("█" * (0 if not c > 0 else bar_w if c >= top else int(round(c / top * bar_w))), style="cyan")
        out.append(f" {c:g}\n" if k < len(bins) - 1 else f" {c:g}")
    return out


def table_cells(doc, other, rows: int, cols: int) -> tuple[list[Text], list[list[Text]]]:
    """A logged table's header and first ``rows`` × ``cols`` cells as plain text (a teammate wrote
    them); with ``other`` (the other run's table, same columns), a cell that differs is yellow."""
    names, body = doc
    onames, obody = other if other is not None else (None, None)
    compare = onames == names and obody is not None
    return [cell(c) for c in names[:cols]], [
        [cell("–" if v is None else v, "yellow" if compare and (ri >= len(obody) or obody[ri][ci] != v) else "")
         for ci, v in enumerate(r[:cols])]
        for ri, r in enumerate(body[:rows])]


_HEAT = [(24, 24, 32), (30, 50, 90), (40, 80, 140), (50, 120, 180), (70, 160, 200), (120, 200, 200),
         (190, 230, 180), (250, 250, 160)]


def confusion_text(labels: list[str], m: list[list[int]], other: tuple[list[str], list[list[int]]] | None = None,
                   *, cols: int = 80) -> Text:
    """A heat map of the matrix (rows: true class, columns: predicted; shade: the row's share), and
    when ``other`` has the same labels, the difference (this − other) in green/red."""
    n = len(labels)
    out = Text(end="")
    if not n:
        out.append("(no classes)", style="dim")
        return out
    widest = max([len(str(v)) for r in m for v in r] + [len(plain_line(x)) for x in labels])
    cw = max(5, min(12, widest + 2))
    lw = min(16, max(len(plain_line(x)) for x in labels) + 1)
    shown = max(1, min(n, (cols - lw - 2) // cw))

    def head() -> None:
        out.append(" " * lw + "│", style="dim")
        for j in range(shown):
            out.append(plain_line(labels[j])[:cw - 1].rjust(cw - 1) + " ", style="bold")
        out.append("  (predicted →)" if shown == n else f"  … {n - shown} more", style="dim")
        out.append("\n")

    head()
    for i in range(n):
        out.append(plain_line(labels[i])[:lw - 1].ljust(lw), style="bold")
        out.append("│", style="dim")
        total = sum(m[i]) or 1
        for j in range(shown):
            share = m[i][j] / total
            bg = _HEAT[min(len(_HEAT) - 1, int(share * (len(_HEAT) - 1) + 0.5))]
            fg = (0, 0, 0) if share > 0.6 else (230, 230, 230)
            st = Style(color=Color.from_rgb(*fg), bgcolor=Color.from_rgb(*bg), bold=(i == j))
            out.append(str(m[i][j]).rjust(cw - 1) + " ", st)
        out.append("\n" if i < n - 1 else "")
    if other is not None:
        olabels, om = other
        out.append("\n\n")
        if olabels != labels:
            out.append("the other run's classes differ: no difference shown", style="dim")
            return out
        out.append("difference (this − other)\n", style="bold")
        head()
        for i in range(n):
            out.append(plain_line(labels[i])[:lw - 1].ljust(lw), style="bold")
            out.append("│", style="dim")
            for j in range(shown):
                d = m[i][j] - om[i][j]
                good = (d > 0) == (i == j)
                st = "dim" if d == 0 else ("green" if good else "red")
                out.append((f"{d:+d}" if d else "·").rjust(cw - 1) + " ", style=st)
            out.append("\n" if i < n - 1 else "")
    return out


# ---- the step slider ----------------------------------------------------------------------------
class StepSlider(Widget):
    """One line: the first logged step, a bar with the current step's place among the logged steps
    (by order, so every step has its own place however unevenly they were logged), the last step,
    and the current step (and the other run's, side by side). A click on the bar jumps there."""

    DEFAULT_CSS = "StepSlider { height: 1; width: 1fr; padding: 0 1; }"

    class Jump(Message):
        """A click on the bar: go to the ``index``-th logged step."""

        def __init__(self, index: int) -> None:
            super().__init__()
            self.index = index

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.n = 0
        self.index = 0
        self.first = self.last = ""
        self.note = Text()
        self.reserve = 0

    def set(self, steps: list[int], index: int, note: Text, reserve: int = 0) -> None:
        """Show ``steps[index]`` among ``steps``; ``note`` (the current step, the other run's) after
        the bar, in ``reserve`` cells at least, so the bar keeps its length from step to step."""
        self.n, self.index = len(steps), index
        self.first = step_label(steps[0]) if steps else ""
        self.last = step_label(steps[-1]) if steps else ""
        self.note, self.reserve = note, reserve
        self.refresh()

    def _bar(self, width: int) -> tuple[int, int]:
        """(where the bar starts, its width) in a content line of ``width`` cells."""
        note = min(max(self.note.cell_len, self.reserve), max(0, width // 2 - 8))
        left = len(self.first) + 2  # "0 ├"
        bar = width - left - (len(self.last) + 2) - (note + 2 if note else 0)
        return left, max(3, bar)

    def render(self) -> Text:
        out = Text(no_wrap=True, overflow="ellipsis", end="")
        if not self.n:
            return out
        width = self.content_size.width
        left, bw = self._bar(width)
        at = 0 if self.n == 1 else round(self.index * (bw - 1) / (self.n - 1))
        out.append(self.first + " ", style="dim")
        out.append("├", style="dim")
        out.append("━" * at, style="bold cyan")
        out.append("●", style="bold")
        out.append("─" * (bw - at - 1), style="dim")
        out.append("┤ ", style="dim")
        out.append(self.last, style="dim")
        if self.note.cell_len:
            out.append("  ")
            note = self.note.copy()
            note.truncate(max(0, width - out.cell_len), overflow="ellipsis")
            out.append_text(note)
        return out

    def index_at(self, x: int) -> int | None:
        """The step index under content column ``x`` (None: not on the bar)."""
        if self.n < 1:
            return None
        left, bw = self._bar(self.content_size.width)
        if not left - 1 <= x <= left + bw:  # the ends (├ ┤) count as the first and last step
            return None
        pos = min(bw - 1, max(0, x - left))
        return 0 if self.n == 1 or bw <= 1 else round(pos * (self.n - 1) / (bw - 1))

    def on_click(self, event: events.Click) -> None:
        off = event.get_content_offset(self)
        if off is None:
            return
        i = self.index_at(off.x)
        if i is not None:
            event.stop()
            self.post_message(self.Jump(i))


# ---- where a run's media come from -----------------------------------------------------------
class MediaSource:
    """One run's media for the view: the labdeck index over the run's transport, plus the
    TensorBoard media of the event files the monitor mirrors. ``transport`` and ``tb_files`` may
    be given (tests); by default they come from the workstation."""

    def __init__(self, run, workstation=None, *, transport=None, cache_root=None, tb_files=None) -> None:
        from pathlib import Path

        self.run = run
        self.ws = workstation
        self._transport = transport
        root = Path(cache_root) if cache_root is not None else Path(workstation.config.paths.data_dir) / "media"
        self.media = RunMedia(run, root)
        self._tb_files = tb_files
        self._tb = TensorBoardMedia()  # reads only what the event files gained
        self.note = ""
        # one refresh at a time: the Lineage strip hands its kept sources to the Media view (v), and two
        # mirrors of one index file, or two threads feeding one event parser, would read bytes twice
        self._refreshing = asyncio.Lock()

    async def transport(self):
        if self._transport is None:
            self._transport = await self.ws.transport(self.run.instance)
        return self._transport

    async def refresh(self) -> int:
        async with self._refreshing:
            return await self._refresh()

    async def _refresh(self) -> int:
        n = 0
        try:
            transport = await self.transport()
            n += await self.media.refresh(transport)
            if self._tb_files is None and self.ws is not None and self.run.id not in self.ws.monitor.runs:
                # not followed in this session: mirror its TensorBoard event files (and metrics) once
                await self.ws.monitor.poll_run(self.run, transport)
        except LabdeckError as e:
            self.note = f"media: {e}"
        n += await asyncio.to_thread(self._tensorboard)
        return n

    def _tensorboard(self) -> int:
        files = self._tb_files
        if files is None and self.ws is not None:
            from backends.tbevents import event_run

            rm = getattr(self.ws.monitor, "runs", {}).get(self.run.id)
            files = []
            if rm is not None:
                for remote, (local, _) in list(rm.tb.items()):
                    files.append((local.path, event_run(remote, getattr(rm, "tb_base", None))))
        entries = self._tb.update(files or ())
        self.media.add_tensorboard(entries)
        return len(entries)

    async def load(self, entry: MediaEntry) -> bytes | Any:
        if entry.inline is not None:
            return entry.inline
        got = self.media.cached(entry)
        if got is not None:
            return got
        return await self.media.load(await self.transport(), entry)


# ---- the screen -------------------------------------------------------------------------------
class MediaPane(Vertical):
    """One run's side: a caption line, and the item drawn (a Static, or a DataTable for tables)."""

    def __init__(self, pid: str, images: str = "halfblock") -> None:
        super().__init__(id=pid, classes="media-pane")
        self.images = images
        self.graphics: Widget | None = None  # textual-image's Kitty/Sixel widget (images != "halfblock")

    def compose(self) -> ComposeResult:
        yield Static("", classes="media-caption")
        with VerticalScroll(classes="media-scroll"):
            yield Static("", classes="media-body")
        if self.images != "halfblock":
            self.graphics = termimage.widget_class(self.images)(classes="media-graphics")
            yield self.graphics
        yield HalfBlockImage(classes="media-image")
        yield DataTable(classes="media-table", zebra_stripes=True, cursor_type="row")

    def on_mount(self) -> None:
        self.query_one(DataTable).display = False
        self.query_one(HalfBlockImage).display = False
        if self.graphics is not None:
            self.graphics.display = False

    def showing(self, which: str) -> None:
        """Make ``which`` ("text", "image", "graphics" or "table") the visible part (a layout only
        when it changes)."""
        parts = [(self.query_one(VerticalScroll), "text"), (self.query_one(HalfBlockImage), "image"),
                 (self.query_one(DataTable), "table")]
        if self.graphics is not None:
            parts.append((self.graphics, "graphics"))
        for w, name in parts:
            want = name == which
            if w.display != want:
                w.display = want


class MediaScreen(Screen[None]):
    """A run's media (and, beside it, another run's: its parent, or the run it is compared with)."""

    DEFAULT_CSS = """
    MediaScreen #media-top { height: 1; padding: 0 1; background: $boost; }
    MediaScreen #media-status { height: 1; padding: 0 1; }
    MediaScreen #media-slider { height: 1; }
    MediaScreen #media-keys { width: 26; max-width: 25%; height: 1fr; }
    MediaScreen #media-panes { height: 1fr; }
    MediaScreen .media-pane { width: 1fr; height: 1fr; padding: 0 1; }
    MediaScreen .media-caption { height: 1; color: $text-muted; }
    MediaScreen .media-scroll { height: 1fr; }
    MediaScreen .media-table { height: 1fr; }
    """

    BINDINGS = [
        Binding("escape,q", "app.pop_screen", "Close", id="media.close"),
        Binding("left", "step(-1)", "Step back", id="media.prev", tooltip="The previous step of this key"),
        Binding("right", "step(1)", "Step on", id="media.next", tooltip="The next step of this key"),
        Binding("home", "edge(0)", "First", show=False, id="media.first", priority=True),
        Binding("end", "edge(1)", "Last", show=False, id="media.last", priority=True),
        Binding("left_square_bracket,pageup", "jump(-1)", "Back 10%", show=False, id="media.back", priority=True,
                tooltip="About a tenth of the logged steps back"),
        Binding("right_square_bracket,pagedown", "jump(1)", "On 10%", show=False, id="media.on", priority=True,
                tooltip="About a tenth of the logged steps on"),
        Binding("r", "reload", "Refresh", id="media.refresh", tooltip="Look for new media now"),
    ]

    def __init__(self, run, other=None, *, workstation=None, sources: tuple | None = None,
                 other_label: str = "parent", images: str | None = None) -> None:
        super().__init__()
        # how images are drawn: termimage.setup() chose it before the app ran (half blocks in tests)
        self.images = images if images is not None else termimage.MODE
        self._graphics: OrderedDict[tuple, Any] = OrderedDict()  # (run id, key, step, w, h) -> (PIL image, cells)
        self.run, self.other = run, other
        self.other_label = other_label
        if sources is not None:
            self.src, self.osrc = sources[0], (sources[1] if len(sources) > 1 else None)
        else:
            self.src = MediaSource(run, workstation)
            self.osrc = MediaSource(other, workstation) if other is not None else None
        self.keys: list[str] = []
        self.key: str | None = None
        self.step_i = -1  # index into the key's steps; -1: the last
        self._decoded: OrderedDict[tuple, Any] = OrderedDict()  # (run id, key, step) -> decoded item
        self._drawn: OrderedDict[tuple, Any] = OrderedDict()  # (run id, key, step, w, h) -> renderable
        self._loading = 0
        self._decoding: asyncio.Future | None = None  # the PNG decode running in a thread

    def compose(self) -> ComposeResult:
        title = Text("Media · ", style="bold")
        title.append(plain_line(self.run.display_name))
        title.append(f" {self.run.id[-8:].lower()}", style="dim")
        if self.other is not None:
            title.append(f"   ⟷   {self.other_label} ", style="dim")
            title.append(plain_line(self.other.display_name))
            title.append(f" {self.other.id[-8:].lower()}", style="dim")
        yield Label(safe(title), id="media-top")
        yield Static("looking for media…", id="media-status")
        yield StepSlider(id="media-slider")
        with Horizontal():
            yield OptionList(id="media-keys")
            with Horizontal(id="media-panes"):
                yield MediaPane("media-a", self.images)
                if self.other is not None:
                    yield MediaPane("media-b", self.images)
        yield LabdeckFooter()  # ? first: the keys of this screen are one key away at any width

    def on_mount(self) -> None:
        self.query_one("#media-keys", OptionList).focus()
        self.reload()
        if self.run.run_state.is_active:
            self.set_interval(5.0, self.reload)

    # -- data
    def action_reload(self) -> None:
        self.reload()

    @work(group="media-refresh", exclusive=True, exit_on_error=False)
    async def reload(self) -> None:
        notes = []
        for s in (self.src, self.osrc):
            if s is None:
                continue
            await s.refresh()
            if s.note:
                notes.append(s.note)
        keys = self.src.media.index.keys()
        if self.osrc is not None:
            keys += [k for k in self.osrc.media.index.keys() if k not in keys]
        if keys != self.keys:
            self.keys = keys
            ol = self.query_one("#media-keys", OptionList)
            ol.clear_options()
            ol.add_options([Option(cell(k), id=str(i)) for i, k in enumerate(keys)])
            if self.key not in keys:
                self.key = keys[0] if keys else None
                self.step_i = -1
            if self.key is not None:
                ol.highlighted = keys.index(self.key)
        if not keys:
            msg = "no media logged yet: labdeck.log({'samples': labdeck.Image(array)}) or TensorBoard images"
            self.query_one("#media-status", Static).update(text(msg + (f" ({'; '.join(notes)})" if notes else "")))
            return
        await self.show()

    def steps(self) -> list[int]:
        idx = self.src.media.index
        s = idx.steps(self.key) if self.key else []
        if not s and self.osrc is not None and self.key:
            s = self.osrc.media.index.steps(self.key)
        return s

    def current_step(self) -> int | None:
        s = self.steps()
        if not s:
            return None
        i = self.step_i if 0 <= self.step_i < len(s) else len(s) - 1
        return s[i]

    def on_resize(self) -> None:
        if self.key is not None:  # drawn again for the new size (the drawings are cached by size)
            self.run_worker(self.show(), group="media-show", exclusive=True, exit_on_error=False)

    # -- keys
    def on_option_list_option_highlighted(self, event: OptionList.OptionHighlighted) -> None:
        if event.option_list.id != "media-keys" or event.option.id is None:
            return
        k = self.keys[int(event.option.id)]
        if k != self.key:
            cur = self.current_step()
            self.key = k
            s = self.steps()
            # keep the step where the new key has it (or the nearest)
            from backends.media import nearest_step

            near = nearest_step(s, cur) if cur is not None else None
            self.step_i = s.index(near) if near is not None else -1
            self.run_worker(self.show(), group="media-show", exclusive=True, exit_on_error=False)

    def action_step(self, delta: int) -> None:
        s = self.steps()
        if not s:
            return
        i = self.step_i if 0 <= self.step_i < len(s) else len(s) - 1
        self.step_i = min(len(s) - 1, max(0, i + delta))
        self.run_worker(self.show(), group="media-show", exclusive=True, exit_on_error=False)

    def action_edge(self, last: int) -> None:
        s = self.steps()
        if s:
            self.step_i = len(s) - 1 if last else 0
            self.run_worker(self.show(), group="media-show", exclusive=True, exit_on_error=False)

    def action_jump(self, direction: int) -> None:
        """About a tenth of the logged steps back or on (at least one)."""
        self.action_step(direction * max(1, round(len(self.steps()) / 10)))

    def on_step_slider_jump(self, event: StepSlider.Jump) -> None:
        s = self.steps()
        if s:
            self.step_i = min(len(s) - 1, max(0, event.index))
            self.run_worker(self.show(), group="media-show", exclusive=True, exit_on_error=False)

    # -- drawing
    async def show(self) -> None:
        step = self.current_step()
        s = self.steps()
        if self.key is None or step is None:
            return
        i = s.index(step)
        entry = self.src.media.index.get(self.key, step)
        st = Text()
        st.append(plain_line(self.key), style="bold")
        st.append(f" · step {step} ({i + 1} of {len(s)})")
        kind = entry.kind if entry else None
        if entry is None and self.osrc is not None:
            o = self.osrc.media.index.get(self.key, step)
            kind = o.kind if o else None
        if kind:
            st.append(f" · {kind}", style="dim")
        if entry is not None and entry.source == "tensorboard":
            st.append(" · from TensorBoard", style="dim")
        st.append("   ←/→ step · [/] 10% · ↑/↓ key", style="dim")
        self.query_one("#media-status", Static).update(safe(st), layout=False)
        oentry = other_doc = None
        if self.osrc is not None:
            oentry = self.osrc.media.index.nearest(self.key, step)
        note = Text()
        note.append(f"step {step}", style="bold")
        if self.osrc is not None:
            note.append(f" · {self.other_label} ", style="dim")
            if oentry is None:
                note.append("none", style="dim")
            else:
                note.append(f"{oentry.step}", style="bold")
                if oentry.step != step:
                    note.append(" (nearest)", style="yellow")
        widest = max(len(str(s[0])), len(str(s[-1])))
        reserve = 5 + widest  # "step N"
        if self.osrc is not None:
            osteps = self.osrc.media.index.steps(self.key)
            reserve += 3 + len(self.other_label) + 1 + max([len(str(x)) for x in osteps] or [4]) + len(" (nearest)")
        self.query_one(StepSlider).set(s, i, note, reserve)
        if self.osrc is not None:
            other_doc = await self._decode(self.osrc, oentry) if oentry is not None else None
        doc = await self._decode(self.src, entry) if entry is not None else None
        same = entry is not None and oentry is not None and entry.kind == oentry.kind
        ok = not isinstance(doc, LabdeckError) and not isinstance(other_doc, LabdeckError)
        await self._paint("#media-a", self.run, entry, doc, other_doc if same and ok else None, None)
        if self.osrc is not None:
            await self._paint("#media-b", self.other, oentry, other_doc, doc if same and ok else None, step)

    async def _decode(self, src: MediaSource, entry: MediaEntry) -> Any:
        k = (src.run.id, entry.key, entry.step, entry.file)
        got = self._decoded.get(k)
        if got is not None:
            self._decoded.move_to_end(k)
            return got
        try:
            data = await src.load(entry)
            if entry.kind == "image":
                if not isinstance(data, bytes) or data[:8] != b"\x89PNG\r\n\x1a\n":
                    raise MediaError("Not a PNG (JPEG and GIF are listed, not drawn, here).")
                got = await self._decode_png(k, data)
            else:  # in a thread: a teammate's 16 MiB table took ~0.8 s to check on the UI thread
                got = await asyncio.to_thread(item_doc, entry.kind, data)
        except LabdeckError as e:
            got = e
        self._decoded[k] = got
        while len(self._decoded) > 256:
            self._decoded.popitem(last=False)
        return got

    async def _decode_png(self, k: tuple, data: bytes) -> Any:
        """One PNG decoded at a time, in a thread. Stepping on cancels the drawing, not the thread: a
        decode already running is waited for (and its result kept) before the next starts, so holding
        → does not pile up decoders of ~100 MiB each."""
        while self._decoding is not None and not self._decoding.done():
            await asyncio.wait({self._decoding})
        fut = self._decoding = asyncio.ensure_future(asyncio.to_thread(decode_png, data))

        def keep(f: asyncio.Future) -> None:  # kept even when the drawing that asked has moved on
            e = None if f.cancelled() else f.exception()
            if not f.cancelled() and (e is None or isinstance(e, LabdeckError)):
                self._decoded[k] = e or f.result()
        fut.add_done_callback(keep)
        return await asyncio.shield(fut)

    async def _paint(self, pane_id: str, run, entry: MediaEntry | None, doc: Any, other: Any,
                     wanted: int | None) -> None:
        pane = self.query_one(pane_id, MediaPane)
        caption = pane.query_one(".media-caption", Static)
        body = pane.query_one(".media-body", Static)
        cap = Text(no_wrap=True, overflow="ellipsis")
        if self.other is not None:
            cap.append(plain_line(run.display_name), style="bold")
            cap.append(" · ")
        if entry is None:
            cap.append("nothing at this key", style="dim")
            caption.update(safe(cap), layout=False)
            pane.showing("text")
            body.update("")
            return
        cap.append(f"step {entry.step}")
        if wanted is not None and entry.step != wanted:
            cap.append(" (nearest)", style="yellow")
        if entry.caption:
            cap.append(" · " + plain_line(entry.caption))
        caption.update(safe(cap), layout=False)
        if isinstance(doc, LabdeckError):
            pane.showing("text")
            body.update(text(f"cannot show it: {doc}"))
            return
        w = max(10, pane.size.width - 2)
        h = max(4, pane.size.height - 2)
        if entry.kind == "table":
            table = pane.query_one(DataTable)
            cols, rows = doc
            if len(rows) > MAX_TABLE_ROWS or len(cols) > MAX_TABLE_COLS:  # built on the UI's thread: bounded
                cap.append(f" · the first {min(len(rows), MAX_TABLE_ROWS):,} of {len(rows):,} rows, "
                           f"{min(len(cols), MAX_TABLE_COLS)} of {len(cols)} columns", style="dim")
                caption.update(safe(cap), layout=False)
            pane.showing("table")
            table.clear(columns=True)
            head, cells = table_cells(doc, other, MAX_TABLE_ROWS, MAX_TABLE_COLS)
            table.add_columns(*head)
            for row in cells:
                table.add_row(*row)
            return
        if entry.kind == "image" and pane.graphics is not None:
            await self._paint_graphics(pane, (run.id, entry.key, entry.step, entry.file, w, h), doc, w, h)
            return
        key = (run.id, entry.key, entry.step, entry.file, w, h, id(other) if entry.kind == "confusion" else 0)
        r = self._drawn.get(key)
        if r is None:
            if entry.kind == "image":
                r = halfblock_strips(doc, w, h)
            elif entry.kind == "histogram":
                r = histogram_text(doc, w, h)
            elif entry.kind == "confusion":
                r = confusion_text(doc[0], doc[1], other if pane_id == "#media-a" else None, cols=w)
            else:
                r = text(doc)
            self._drawn[key] = r
            while len(self._drawn) > 128:
                self._drawn.popitem(last=False)
        else:
            self._drawn.move_to_end(key)
        if entry.kind == "image":
            pane.showing("image")
            pane.query_one(HalfBlockImage).show(r)
        else:
            pane.showing("text")
            body.update(r)


    async def _paint_graphics(self, pane: MediaPane, key: tuple, px: Pixels, w: int, h: int) -> None:
        """The image through Kitty's graphics protocol or Sixel (textual-image's widget), from a
        Pillow image of the decoded pixels scaled to at most the pane (and 4× the image)."""
        got = self._graphics.get(key)
        if got is None:
            if self.images == "kitty":  # a wide image on a wide terminal: no more cells than placeholders can number
                w, h = min(w, termimage.KITTY_MAX_CELLS), min(h, termimage.KITTY_MAX_CELLS)
            pw, ph, cols, rows = termimage.target_size(px.w, px.h, w, h, termimage.CELL or (10, 20))
            got = (await asyncio.to_thread(termimage.pil_image, px, pw, ph), cols, rows)
            self._graphics[key] = got
            while len(self._graphics) > 16:  # a pane-sized RGB image each: a few MiB
                self._graphics.popitem(last=False)
        else:
            self._graphics.move_to_end(key)
        im, cols, rows = got
        g = pane.graphics
        pane.showing("graphics")
        g.styles.width, g.styles.height = cols, rows
        if g.image is not im:
            g.image = im


def open_media(app, run, other=None, *, other_label: str = "parent", sources: tuple | None = None) -> None:
    """Push the Media view for ``run`` (beside ``other`` when given); a record labdeck refuses to
    build a cache path from (a malformed user or id in a teammate's store) is a notification.
    ``sources``: the runs' :class:`MediaSource` already read (the Lineage strip's), else new ones."""
    try:
        screen = MediaScreen(run, other, workstation=app.workstation, other_label=other_label, sources=sources)
    except LabdeckError as e:
        app.notify(f"Cannot show the media of {plain_line(run.display_name)}: {e}", severity="error")
        return
    app.push_screen(screen)
