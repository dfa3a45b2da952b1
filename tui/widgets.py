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
from textual.screen import ModalScreen
from textual.suggester import SuggestFromList
from textual.widgets import Button, DataTable, Footer, Input, Label, Static

from backends.errors import LabdeckError

from backends.text import plain, plain_line

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

    def __init__(self, title: str, sections: Sequence[tuple[str, Iterable[tuple[str, str, str]]]]) -> None:
        super().__init__()
        self.title_text = title
        self.sections = sections

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help-dialog"):
            yield Label(safe(self.title_text), id="help-title")
            for heading, rows in self.sections:
                table = DataTable(show_cursor=False, zebra_stripes=True)
                table.add_columns("key", "does", Text("binding id (remap under [keys])"))
                for key, desc, bid in rows:
                    table.add_row(Text(key, style="bold"), desc, bid)
                yield Label(heading, classes="help-heading")
                yield table
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
        yield Footer()

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

    def action_end(self) -> None:
        self.view.scroll_to_end()

    def action_home(self) -> None:
        self.view.scroll_to_top()


def sync_table(table: DataTable, rows: list[tuple[str, Sequence]]) -> None:
    """Make ``table`` show ``rows`` (key, cells), touching only what changed and keeping the cursor.

    A ``str`` cell is shown as plain text, never as markup (names, commands and log lines come from
    teammates' stores and hosts: ``[/]`` would crash the table, ``[@click=…]`` would run an action)."""
    rows = [(key, tuple(safe(c) for c in cells)) for key, cells in rows]
    current = [k.value for k in table.rows]
    keys = [k for k, _ in rows]
    if current == keys:
        for key, cells in rows:
            old = table.get_row(key)
            for col_key, new, prev in zip(table.columns, cells, old):
                if str(new) != str(prev):
                    table.update_cell(key, col_key, new)
        return
    cursor_key = None
    if table.row_count and 0 <= table.cursor_row < table.row_count:
        cursor_key = current[table.cursor_row]
    table.clear()
    for key, cells in rows:
        table.add_row(*cells, key=key)
    if cursor_key in keys:
        table.move_cursor(row=keys.index(cursor_key), animate=False)


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
            with Horizontal(id="compare-columns"):
                yield VerticalScroll(Static(self._column(self.a, self.b), id="compare-a"))
                yield VerticalScroll(Static(self._column(self.b, self.a), id="compare-b"))
            yield PlotextPlot(id="compare-chart")
            with VerticalScroll(id="compare-code"):
                yield Static(self._code(), id="compare-diff")

    def _column(self, r, other) -> Text:
        from backends import lineage as lin

        t = Text()
        t.append(f"{plain_line(r.display_name)} {r.id[-8:].lower()}\n", style="bold")
        t.append(f"{plain_line(r.user)} · {plain_line(r.state)} · {plain_line(r.instance)} · ${r.cost():.2f}\n"
                 f"$ {plain(r.command)}\n\n", style="dim")
        t.append("params\n", style="bold")
        for k in sorted(set(r.params) | set(other.params)):
            v = r.params.get(k, "–")
            differs = r.params.get(k) != other.params.get(k)
            t.append(f"  {plain_line(k)} = {plain_line(v)}\n", style="yellow" if differs else "")
        t.append("\nmetrics (last)\n", style="bold")
        for n in sorted(set(r.metrics_summary) | set(other.metrics_summary)):
            v = lin.metric_value(r, n)
            o = lin.metric_value(other, n)
            t.append(f"  {plain_line(n)} = {v if v is not None else '–'}\n",
                     style="" if v is None or o is None or v == o else "yellow")
        return t

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
