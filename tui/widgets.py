"""Shared widgets: confirmation modal, help screen, log viewer, the : and / bars, table sync."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import ModalScreen
from textual.suggester import SuggestFromList
from textual.widgets import Button, DataTable, Input, Label, Static

from backends.errors import LabdeckError

from backends.text import plain, plain_line

from .footer import LabdeckFooter
from .format import safe
from .logview import LogView


class ConfirmScreen(ModalScreen[bool]):
    """Asks before anything destructive: y confirms, n or escape declines."""

    BINDINGS = [
        Binding("y", "answer(True)", "Yes", id="confirm.yes", tooltip="Do it"),
        Binding("n,escape", "answer(False)", "No", id="confirm.no", tooltip="Leave everything as it is"),
    ]

    def __init__(self, question: str, detail: str = "", yes_label: str = "Yes") -> None:
        super().__init__()
        self.question = question
        self.detail = detail
        self.yes_label = yes_label

    def compose(self) -> ComposeResult:
        with Vertical(id="confirm-dialog"):
            yield Label(safe(self.question, lines=True), id="confirm-question")
            if self.detail:
                yield Static(safe(self.detail, lines=True), id="confirm-detail")
            with Horizontal(id="confirm-buttons"):
                yield Button(f"{self.yes_label} (y)", variant="error", id="yes")
                yield Button("No (n)", variant="primary", id="no")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    @on(Button.Pressed)
    def pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, answer: bool) -> None:
        self.dismiss(answer)


class HelpScreen(ModalScreen[None]):
    """The keys of the current tab and of the whole app."""

    BINDINGS = [Binding("escape,q,question_mark,f1", "app.pop_screen", "Close", id="help.close")]

    def __init__(self, title: str, sections: Sequence[tuple[str, Iterable[tuple[str, str, str]]]], notes: str = "") -> None:
        super().__init__()
        self.title_text = title
        self.sections = sections
        self.notes = notes  # a paragraph under the first section (a tab's filter syntax), wrapped to the width

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help-dialog"):
            yield Label(safe(self.title_text), id="help-title")
            for n, (heading, rows) in enumerate(self.sections):
                table = DataTable(show_cursor=False, zebra_stripes=True)
                table.add_columns("key", "does", Text("binding id"))  # the foot says how to remap one
                for key, desc, bid in rows:
                    table.add_row(Text(key, style="bold"), desc, bid)
                yield Label(heading, classes="help-heading")
                yield table
                if n == 0 and self.notes:
                    yield Static(Text(self.notes), classes="help-notes")
            yield Static(Text('Remap any key in the config file, e.g.  [keys]  "jobs.cancel" = "ctrl+k"'), classes="help-foot")


class LineInput(Input):
    """The bottom bar used for `:` commands and `/` filters. Escape leaves it."""

    BINDINGS = [Binding("escape", "leave", "Back", id="bar.leave")]

    class Left(Input.Changed):
        pass

    def action_leave(self) -> None:
        self.post_message(self.Left(self, self.value))


class CommandBar(LineInput):
    COMMANDS = ["instances", "jobs", "monitor", "lineage", "models", "help", "refresh", "run-example", "config", "q", "quit"]

    def __init__(self) -> None:
        super().__init__(placeholder=":command  (jobs, lineage, monitor, models, instances, run-example, help, q)",
                         suggester=SuggestFromList(self.COMMANDS, case_sensitive=False), id="command-bar")


class FilterBar(LineInput):
    def __init__(self) -> None:
        super().__init__(placeholder="/filter: text to match in any column (enter keeps it, escape clears)", id="filter-bar")


class LogScreen(ModalScreen[None]):
    """A run's log in a :class:`~tui.logview.LogView`: follows it while at the end, searches it.

    ``path`` is the local file holding the run's log copy. Without one, the
    screen asks the workstation for the log's tail every second (as before) and
    views it through a private scratch file.
    """

    BINDINGS = [
        Binding("escape,q", "close", "Close", id="log.close", tooltip="Close the search bar, then the log"),
        Binding("G,end", "end", "End", id="log.end", tooltip="Jump to the end and follow"),
        Binding("g,home", "home", "Top", id="log.home", tooltip="Jump to the first line"),
        Binding("slash", "search", "Search", id="log.search", tooltip="Find text in the whole log (ignores case)"),
        Binding("n", "next", "Next", id="log.next", tooltip="Next match"),
        Binding("N", "prev", "Prev", id="log.prev", tooltip="Previous match"),
        Binding("w", "wrap", "Wrap", id="log.wrap", tooltip="Wrap long lines (off: ←/→ or h/l scroll them)"),
        Binding("question_mark,f1", "app.help", "Help", id="log.help", tooltip="The log's keys"),
    ]

    DEFAULT_CSS = """
    LogScreen #log-status {
        height: 1;
        padding: 0 1;
        background: $boost;
        color: $text-muted;
    }
    LogScreen #log-search {
        height: 3;
    }
    """

    AUTO_FOCUS = "#log-body"

    def __init__(self, run_ref: str, title: str, path: str | Path | None = None) -> None:
        super().__init__()
        self.run_ref = run_ref
        self.title_text = title
        self.path = Path(path) if path is not None else None
        self._scratch: Path | None = None  # without a path: the tails read so far
        self._shown = ""

    @property
    def view(self) -> LogView:
        return self._view

    def compose(self) -> ComposeResult:
        if self.path is None and self._scratch is None:
            fd, name = tempfile.mkstemp(prefix="labdeck-log-", suffix=".log")
            os.close(fd)
            self._scratch = Path(name)
        # kept, not queried: on_mount may run before the dialog's children are mounted
        self._view = LogView(self.path or self._scratch, id="log-body")
        self._search = Input(placeholder="search the log (ignores case) · enter finds · escape closes", id="log-search")
        self._search.display = False
        self._status = Static("", id="log-status")
        with Vertical(id="log-dialog"):
            yield Label(safe(self.title_text), id="log-title")
            yield self._view
            yield self._search
            yield self._status
        yield LabdeckFooter()  # ? first: the keys of this screen are one key away at any width

    def on_mount(self) -> None:
        if self._scratch is not None:
            self.load()
            self.set_interval(1.0, self.load)

    def on_unmount(self) -> None:
        if self._scratch is not None:
            self._scratch.unlink(missing_ok=True)

    @work(exclusive=True, exit_on_error=False, group="log")
    async def load(self) -> None:
        """Without a local copy: append what is new in the workstation's tail to the scratch file."""
        text = await self.app.workstation.log_tail(self.run_ref)
        if text == self._shown or self._scratch is None:
            return
        old, self._shown = self._shown, text
        if old and text.startswith(old):
            new, mode = text[len(old):], "a"
        else:
            anchor = old[-2048:]
            i = text.rfind(anchor) if anchor else -1
            new, mode = (text[i + len(anchor):], "a") if i >= 0 else (text, "w")
        with open(self._scratch, mode, encoding="utf-8", errors="replace") as f:
            f.write(new)

    @on(LogView.StatusChanged)
    def status_changed(self, event: LogView.StatusChanged) -> None:
        self._status.update(event.status)

    @on(Input.Submitted, "#log-search")
    def search_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self._hide_search()
        self.view.search(event.value)

    def _hide_search(self) -> None:
        self._search.display = False
        self.view.focus()

    def action_close(self) -> None:
        if self._search.display:
            self._hide_search()
        else:
            self.dismiss()

    def action_search(self) -> None:
        search = self._search
        search.value = self.view.search_query
        search.display = True
        search.focus()

    def action_next(self) -> None:
        self.view.search_next()

    def action_prev(self) -> None:
        self.view.search_previous()

    def action_wrap(self) -> None:
        self.view.wrap = not self.view.wrap

    def action_end(self) -> None:
        self.view.scroll_to_end()

    def action_home(self) -> None:
        self.view.scroll_to_top()


SORT_ARROWS = (" ▲", " ▼")


def _sort_value(v):
    """A cell's sort value, comparable across rows: numbers before text (text ignores case); ``None`` is missing."""
    if isinstance(v, bool):
        return (0, float(v))
    if isinstance(v, (int, float)):
        return (0, float(v)) if v == v else None  # NaN sorts as missing
    if v is None or v == "" or v == "–":
        return None
    return (1, str(v).lower())


class SortTable(DataTable):
    """A row-cursor table with the manners of k9s, lazygit and htop.

    * ``>`` / ``<`` pick the next / previous sort column (after the last comes the tab's own order again), ``I``
      inverts it; the sorted column's header shows ▲ or ▼. Rows sort by the real value the tab gives for each
      cell (seconds, dollars, times), not by the text shown; a missing value sorts last either way.
    * ``g``/Home and ``G``/End jump to the first and last row.
    * Columns fit their content as rows change (they grow and shrink), each up to a maximum; longer text ends
      in "…".

    The sort, the cursor's row and the widths survive every refresh: rows come through :func:`sync_table`.
    """

    BINDINGS = [
        Binding("greater_than_sign", "sort(1)", "Sort", id="table.sort", tooltip="Sort by the next column (then the tab's own order)"),
        Binding("less_than_sign", "sort(-1)", "Sort back", show=False, id="table.sort_back", tooltip="Sort by the previous column"),
        Binding("I", "invert", "Invert", id="table.invert", tooltip="Invert the sort order"),
        Binding("g,home", "first", "First", show=False, id="table.first", tooltip="Jump to the first row"),
        Binding("G,end", "last", "Last", show=False, id="table.last", tooltip="Jump to the last row"),
    ]

    DEFAULT_MAX_WIDTH = 40

    def __init__(self, columns: Sequence[str], *, max_widths: dict[str, int] | None = None,
                 descending: Iterable[str] = (), **kwargs) -> None:
        kwargs.setdefault("cursor_type", "row")
        kwargs.setdefault("zebra_stripes", True)
        super().__init__(**kwargs)
        self.labels = tuple(columns)
        self.max_widths = {c: (max_widths or {}).get(c, self.DEFAULT_MAX_WIDTH) for c in self.labels}
        self.descending_first = set(descending)  # numbers a user wants biggest first (cost, duration)
        self.sort_column: int | None = None  # None: the order the tab gives
        self.sort_reverse = False

    def on_mount(self) -> None:
        self.add_columns(*self.labels)

    # ---- sorting ---------------------------------------------------------
    @property
    def sort_label(self) -> str:
        """"Duration ▼", or "" when the tab's own order is shown."""
        if self.sort_column is None:
            return ""
        return self.labels[self.sort_column] + SORT_ARROWS[self.sort_reverse]

    def order(self, rows: list[tuple[str, Sequence]], values: dict[str, Sequence] | None) -> list[tuple[str, Sequence]]:
        """``rows`` in the chosen sort order (equal values by row key; missing values last, newest first)."""
        col = self.sort_column
        if col is None:
            return rows
        values = values or {}

        def value(row):
            vals = values.get(row[0])
            v = vals[col] if vals is not None and col < len(vals) else row[1][col]
            if vals is None:
                v = v.plain if isinstance(v, Text) else v
            return _sort_value(v)

        keyed = [(value(r), r) for r in rows]
        present = [(v, r) for v, r in keyed if v is not None]
        # ties by row key (ids are time-ordered): the same order whatever order a refresh reads the rows in
        present.sort(key=lambda p: (p[0], p[1][0]), reverse=self.sort_reverse)
        return [r for _, r in present] + sorted((r for v, r in keyed if v is None), key=lambda r: r[0], reverse=True)

    def _resort(self) -> None:
        self._show_arrow()
        self.post_message(self.SortChanged(self))  # the tab redraws its rows (TabView does on this message)

    def _show_arrow(self) -> None:
        for i, (key, column) in enumerate(self.columns.items()):
            label = self.labels[i] + (SORT_ARROWS[self.sort_reverse] if i == self.sort_column else "")
            if column.label.plain != label:
                column.label = Text(label)
        self._fit()

    def action_sort(self, step: int) -> None:
        n = len(self.labels)
        states = [None, *range(n)]
        self.sort_column = states[(states.index(self.sort_column) + step) % len(states)]
        self.sort_reverse = self.sort_column is not None and self.labels[self.sort_column] in self.descending_first
        self._resort()

    def action_invert(self) -> None:
        if self.sort_column is None:
            self.app.notify(f"Press {self.app.get_key_display(Binding('greater_than_sign', ''))} to pick a column to sort by first.",
                            severity="warning", timeout=3)
            return
        self.sort_reverse = not self.sort_reverse
        self._resort()

    def sort_by(self, label: str, reverse: bool = False) -> None:
        """Sort by the column titled ``label`` (tests, and a tab that wants a default)."""
        self.sort_column, self.sort_reverse = self.labels.index(label), reverse
        self._resort()

    class SortChanged(Message):
        """The sort column or its direction changed (tabs redraw their status line)."""

        def __init__(self, table: "SortTable") -> None:
            super().__init__()
            self.table = table

        @property
        def control(self) -> "SortTable":
            return self.table

    # ---- jumping ---------------------------------------------------------
    def action_first(self) -> None:
        if self.row_count:
            self.move_cursor(row=0, animate=False)

    def action_last(self) -> None:
        if self.row_count:
            self.move_cursor(row=self.row_count - 1, animate=False)

    # ---- widths ------------------------------------------------------------
    def cap(self, col: int, value: Text) -> Text:
        """A cell cut to its column's maximum, ending in "…"."""
        limit = self.max_widths.get(self.labels[col], self.DEFAULT_MAX_WIDTH) if col < len(self.labels) else self.DEFAULT_MAX_WIDTH
        if value.cell_len <= limit:
            return value
        cut = value.copy()
        cut.truncate(limit, overflow="ellipsis")
        return cut

    def _fit(self, rows: Iterable[Sequence] | None = None) -> None:
        """Every column as wide as its widest cell or header (up to its maximum): grows and shrinks with the rows.
        ``rows``: the cells on show (they are already cut to the maximums), else read back from the table."""
        columns = list(self.columns.values())
        widths = [c.label.cell_len for c in columns]
        if rows is None:
            rows = (self.get_row(k) for k in self.rows)
        n = len(widths)
        for cells in rows:
            for i, v in enumerate(cells[:n]):
                w = v.cell_len if isinstance(v, Text) else len(str(v))
                if w > widths[i]:
                    widths[i] = w
        changed = False
        for column, w in zip(columns, widths):
            if not column.auto_width or column.content_width != w:
                column.auto_width, column.content_width, changed = True, w, True
        if changed:
            self._update_count += 1  # the table's render caches are keyed on it
            self._require_update_dimensions = True
            self.refresh()


def sync_table(table: DataTable, rows: list[tuple[str, Sequence]], values: dict[str, Sequence] | None = None) -> None:
    """Make ``table`` show ``rows`` (key, cells), touching only what changed and keeping the cursor on its row.

    A ``str`` cell is shown as plain text, never as markup (names, commands and log lines come from
    teammates' stores and hosts: ``[/]`` would crash the table, ``[@click=…]`` would run an action).
    On a :class:`SortTable`, ``values`` (key → one sort value per column: seconds, dollars, None when
    missing) order the rows when a sort column is chosen, cells are cut to their column's maximum, and the
    columns are fitted to what is shown."""
    sortable = isinstance(table, SortTable)
    if sortable:
        rows = table.order(rows, values)
        rows = [(key, tuple(table.cap(i, safe(c)) for i, c in enumerate(cells))) for key, cells in rows]
    else:
        rows = [(key, tuple(safe(c) for c in cells)) for key, cells in rows]
    current = [k.value for k in table.rows]
    keys = [k for k, _ in rows]
    if current == keys:
        for key, cells in rows:
            old = table.get_row(key)
            for col_key, new, prev in zip(table.columns, cells, old):
                if str(new) != str(prev):
                    table.update_cell(key, col_key, new)
    else:
        cursor_key = None
        if table.row_count and 0 <= table.cursor_row < table.row_count:
            cursor_key = current[table.cursor_row]
        table.clear()
        for key, cells in rows:
            table.add_row(*cells, key=key)
        if cursor_key in keys:
            table.move_cursor(row=keys.index(cursor_key), animate=False)
    if sortable:
        table._fit(cells for _, cells in rows)


def matches(filter_text: str, cells: Iterable) -> bool:
    """Case-insensitive: every word of the filter appears in some cell."""
    if not filter_text.strip():
        return True
    hay = " ".join(str(c) for c in cells).lower()
    return all(word in hay for word in filter_text.lower().split())


def error_text(error: BaseException) -> str:
    if isinstance(error, LabdeckError):
        return error.render()
    return f"Unexpected error: {type(error).__name__}: {error}"


class TextPrompt(ModalScreen[str | None]):
    """One line of text (a note, a tag): enter saves, escape cancels."""

    BINDINGS = [Binding("escape", "cancel", "Cancel", id="prompt.cancel")]

    def __init__(self, title: str, placeholder: str = "") -> None:
        super().__init__()
        self.title_text = title
        self.placeholder = placeholder

    def compose(self) -> ComposeResult:
        with Vertical(id="prompt-dialog"):
            yield Label(safe(self.title_text), id="prompt-title")
            yield Input(placeholder=self.placeholder, id="prompt-input")

    def on_mount(self) -> None:
        self.query_one(Input).focus()

    @on(Input.Submitted)
    def submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip() or None)

    def action_cancel(self) -> None:
        self.dismiss(None)


def compare_value(v) -> str:
    """A param or metric value for Compare: floats to 4 significant digits (0.997802734375 → 0.9978),
    anything else as one line of plain text (a teammate wrote it)."""
    if isinstance(v, float):
        return f"{v:.4g}"
    return plain_line(v)[:80]


class CompareScreen(ModalScreen[None]):
    """Two runs side by side: params, metrics, code, and the key metric's curves overlaid."""

    BINDINGS = [Binding("escape,q,c", "app.pop_screen", "Close", id="compare.close"),
                Binding("v", "media", "Media", id="compare.media", tooltip="The two runs' media side by side")]

    def action_media(self) -> None:
        from .mediaview import open_media

        open_media(self.app, self.a, self.b, other_label="compared with")

    def __init__(self, a, b, view, key: str | None) -> None:
        super().__init__()
        self.a, self.b, self.view, self.key = a, b, view, key

    def compose(self) -> ComposeResult:
        from textual_plotext import PlotextPlot

        with Vertical(id="compare-dialog"):
            yield Label(safe(f"{self.a.display_name}  ⟷  {self.b.display_name}"), id="compare-title")
            with Horizontal(id="compare-heads"):  # who ran each, where, what it cost, its command
                yield Static(self._head(self.a, "cyan"), id="compare-a")
                yield Static(self._head(self.b, "dark_orange"), id="compare-b")
            yield self._table()
            yield PlotextPlot(id="compare-chart")
            with VerticalScroll(id="compare-code"):
                yield Static(self._code(), id="compare-diff")

    @staticmethod
    def _head(r, color: str) -> Text:
        t = Text()
        t.append(f"{plain_line(r.display_name)} {r.id[-8:].lower()}\n", style=f"bold {color}")
        t.append(f"{plain_line(r.user)} · {plain_line(r.state)} · {plain_line(r.instance)} · ${r.cost():.2f}\n"
                 f"$ {plain_line(r.command)[:300]}", style="dim")
        return t

    def _table(self) -> DataTable:
        """Metrics, then params, as rows with one column per run: both runs' values side by side, above
        the fold, whatever the number of params; a value that differs is yellow."""
        from backends import lineage as lin

        a, b = self.a, self.b
        table = DataTable(id="compare-table", show_cursor=False, zebra_stripes=True)
        table.add_column("", key="what")
        table.add_column(Text(plain_line(a.display_name)[:40], style="bold cyan"), key="a")
        table.add_column(Text(plain_line(b.display_name)[:40], style="bold dark_orange"), key="b")

        def row(label: str, va, vb) -> None:
            differs = va != vb
            table.add_row(Text(plain_line(label)[:60]), *(Text("–" if v is None else compare_value(v),
                                                                 style="yellow" if differs else "") for v in (va, vb)))

        for n in sorted(set(a.metrics_summary) | set(b.metrics_summary))[:100]:
            row(f"metric {n}", lin.metric_value(a, n), lin.metric_value(b, n))
        for k in sorted(set(a.params) | set(b.params))[:200]:
            row(f"param {k}", a.params.get(k), b.params.get(k))
        if not table.row_count:
            table.add_row(Text("no metrics or params recorded", style="dim"), Text(""), Text(""))
        return table

    def _code(self) -> Text:
        from backends import lineage as lin

        text = lin.code_diff(self.a, self.b, self.app.workstation.store.read_blob)
        t = Text("code " + (f"{plain_line(self.a.display_name)} → {plain_line(self.b.display_name)}\n" if text
                            else ": no recorded difference\n"), style="bold")
        for line in text.splitlines()[:400]:
            t.append(plain_line(line[:200]) + "\n", style="green" if line.startswith("+") else "red" if line.startswith("-") else "")
        return t

    def on_mount(self) -> None:
        import math

        from textual_plotext import PlotextPlot

        chart = self.query_one("#compare-chart", PlotextPlot)
        mon = self.app.workstation.monitor
        plt = chart.plt
        plt.title(f"{self.key} by step" if self.key else "no metrics")
        drawn = False
        for run, color in ((self.a, "cyan"), (self.b, "orange")):
            rm = mon.run(run)
            rm.update()
            s = rm.series.get(self.key) if self.key else None
            if s is None or not len(s):
                continue
            xs, lo, hi = s.view(100)
            pts = [(x, (a + b) / 2) for x, a, b in zip(xs, lo, hi) if not math.isnan((a + b) / 2)]
            if pts:
                plt.plot([p[0] for p in pts], [p[1] for p in pts], label=run.display_name, color=color, marker="braille")
                drawn = True
        chart.display = drawn


class TryModelScreen(ModalScreen[None]):
    """Edit a JSON body, send it to a model server, see the answer and its latency."""

    BINDINGS = [
        Binding("escape", "app.pop_screen", "Close", id="try.close"),
        Binding("ctrl+s", "send", "Send", id="try.send", tooltip="POST the body to /predict"),
    ]

    def __init__(self, name: str, url: str, key: str | None, body: str, deployment_id: str = "") -> None:
        super().__init__()
        self.model_name, self.url, self.key, self.body = name, url, key, body
        self.deployment_id = deployment_id  # its latencies are this deployment's, not a later one's of the same name
        self.latencies: list[float] = []

    def compose(self) -> ComposeResult:
        from textual.widgets import TextArea

        with Vertical(id="try-dialog"):
            yield Label(safe(f"Try {self.model_name} · POST {self.url}/predict · ctrl+s sends, escape closes"), id="try-title")
            yield TextArea(self.body, language=None, id="try-body")
            yield Static("", id="try-answer")

    @work(exclusive=True, exit_on_error=False, group="try")
    async def action_send(self) -> None:
        import asyncio
        import json

        from backends import serving
        from textual.widgets import TextArea

        answer = self.query_one("#try-answer", Static)
        try:
            body = json.loads(self.query_one("#try-body", TextArea).text)
        except ValueError as e:
            answer.update(Text(plain(f"The body is not JSON: {e}"), style="bold red"))
            return
        try:
            status, reply, dt = await asyncio.to_thread(serving.predict, self.url, self.key, body)
        except OSError as e:
            answer.update(Text(plain(f"No answer from {self.url}: {e}"), style="bold red"))
            return
        self.latencies.append(dt * 1000)
        self.app.record_model_latency(self.deployment_id, dt * 1000)
        t = Text()
        t.append(f"{status} ", style="bold green" if status == 200 else "bold red")
        t.append(f"in {dt * 1000:.1f} ms\n")
        t.append(plain(json.dumps(reply, indent=2)[:4000] if not isinstance(reply, str) else reply[:4000]))
        answer.update(t)


class InfoScreen(ModalScreen[None]):
    """Text to read and copy (a deployment's URL, key and ssh line)."""

    BINDINGS = [Binding("escape,enter,q", "app.pop_screen", "Close", id="info.close")]

    def __init__(self, title: str, text: str) -> None:
        super().__init__()
        self.title_text, self.text = title, text

    def compose(self) -> ComposeResult:
        with Vertical(id="info-dialog"):
            yield Label(safe(self.title_text), id="info-title")
            yield Static(safe(self.text, lines=True), id="info-text")
