"""Shared widgets: confirmation modal, help screen, log viewer, the : and / bars, table sync."""

from __future__ import annotations

from typing import Iterable, Sequence

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.suggester import SuggestFromList
from textual.widgets import Button, DataTable, Input, Label, Log, Static

from backends.errors import LabdeckError


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
            yield Label(self.question, id="confirm-question")
            if self.detail:
                yield Static(self.detail, id="confirm-detail")
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
            yield Label(self.title_text, id="help-title")
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
    """A run's combined log, following it while the run is active."""

    BINDINGS = [
        Binding("escape,q", "app.pop_screen", "Close", id="log.close"),
        Binding("G,end", "end", "End", id="log.end", tooltip="Jump to the end and follow"),
        Binding("g,home", "home", "Top", id="log.home"),
    ]

    def __init__(self, run_ref: str, title: str) -> None:
        super().__init__()
        self.run_ref = run_ref
        self.title_text = title
        self._shown = ""

    def compose(self) -> ComposeResult:
        with Vertical(id="log-dialog"):
            yield Label(self.title_text, id="log-title")
            yield Log(id="log-body", highlight=False, auto_scroll=True)

    def on_mount(self) -> None:
        self.load()
        self.set_interval(1.0, self.load)

    @work(exclusive=True, exit_on_error=False, group="log")
    async def load(self) -> None:
        text = await self.app.workstation.log_tail(self.run_ref)
        log = self.query_one(Log)
        if text.startswith(self._shown) and self._shown:
            new = text[len(self._shown):]
            if new:
                log.write(new)
        elif text != self._shown:
            log.clear()
            log.write(text)
        self._shown = text

    def action_end(self) -> None:
        log = self.query_one(Log)
        log.auto_scroll = True
        log.scroll_end(animate=False)

    def action_home(self) -> None:
        log = self.query_one(Log)
        log.auto_scroll = False
        log.scroll_home(animate=False)


def sync_table(table: DataTable, rows: list[tuple[str, Sequence]]) -> None:
    """Make ``table`` show ``rows`` (key, cells), touching only what changed and keeping the cursor."""
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
