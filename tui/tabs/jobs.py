"""Jobs: everyone's runs with state, instance, user, duration and last log line, live."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Static

from backends import clock
from backends.models import Run

from backends.text import plain_line

from ..format import STATE_STYLE, cell, duration, short_id
from ..widgets import SortTable, matches, sync_table
from . import TabView

COLUMNS = ("Run", "Name", "State", "Instance", "User", "Duration", "Last line")
MAX_WIDTHS = {"Run": 8, "Name": 32, "State": 24, "Instance": 20, "User": 16, "Duration": 10, "Last line": 80}
MAX_ROWS = 1000  # the table shows the newest runs; the filter searches all of them


class JobsTab(TabView):
    TAB_ID = "jobs"
    TITLE = "Jobs"
    BINDINGS = [
        Binding("n", "new", "New run", id="jobs.new", tooltip="Run a command on an instance"),
        Binding("l,enter", "logs", "Logs", id="jobs.logs", tooltip="Show the selected run's log, following it"),
        Binding("r", "rerun", "Rerun", id="jobs.rerun", tooltip="Run it again from its code, as a child in lineage"),
        Binding("R", "rerun_changes", "Rerun…", id="jobs.rerun_changes",
                tooltip="Rerun with changes: edit parameters, command, env first"),
        Binding("x,ctrl+d", "cancel", "Cancel", id="jobs.cancel", tooltip="Cancel the selected run (asks first)"),
        Binding("S", "serve", "Serve", id="jobs.serve", tooltip="Serve the selected run's model (litserve)"),
        Binding("N", "notebook", "Notebook", id="jobs.notebook", tooltip="Jupyter in the selected run's code"),
        Binding("i", "info", "Info", id="jobs.info", tooltip="Its details; a notebook's URL and token again"),
        Binding("v", "media", "Media", id="jobs.media", tooltip="The selected run's images, tables, histograms"),
    ]

    def __init__(self) -> None:
        super().__init__(id="jobs-view")
        self.runs: list[Run] = []
        self.errors: dict[str, str] = {}

    def compose(self) -> ComposeResult:
        yield SortTable(COLUMNS, id="jobs-table", max_widths=MAX_WIDTHS, descending=("Run", "Duration"))
        yield Static("", id="jobs-status", classes="status-line")

    def on_mount(self) -> None:
        self.rerender()

    def show_runs(self, runs: list[Run], errors: dict[str, str]) -> None:
        self.runs, self.errors = runs, errors
        self.rerender()

    def host_down(self, r: Run):
        """The health of ``r``'s host when this labdeck cannot reach it and ``r`` is an active run of
        ours (its record is what we last read from there); None otherwise. A teammate's record is
        written by their own labdeck: our link says nothing about it."""
        ws = getattr(self.app, "workstation", None)
        if ws is None or r.user != ws.user or not (r.run_state.is_active or r.state == "lost"):
            return None
        h = ws.health.get(r.instance)
        return None if h.reachable else h

    def cells(self, r: Run) -> tuple:
        down = self.host_down(r)
        last = plain_line((down.text() if down is not None else r.last_line)[:400])  # text, never markup or escapes
        last = last if len(last) <= 80 else last[:79] + "…"
        if down is not None:  # what we last saw, marked as such: not a frozen "running"
            state = cell(f"{r.state}?", style="yellow")
        else:
            state = cell(r.state, style=STATE_STYLE.get(r.state, ""))
        idle = getattr(self.app, "idle", {}).get(r.id)
        if idle is not None:
            state.append(f" ⚠ GPU {idle:.0f}%", style="bold yellow")
        took = duration(r.duration_seconds(clock.now()))
        return (short_id(r.id), cell(r.display_name), state, cell(r.instance),
                cell(r.user), f"{took}?" if down is not None else took, cell(last, style="yellow" if down is not None else ""))

    @staticmethod
    def sort_values(r: Run) -> tuple:
        """What each column sorts by: the id (time-ordered), text, and the duration in seconds."""
        return (r.id, r.display_name, r.state, r.instance, r.user, r.duration_seconds(clock.now()), r.last_line)

    def rerender(self) -> None:
        if not self.is_mounted:
            return
        table = self.query_one(SortTable)
        # match on the raw fields: building cells for 10,000 runs costs more than showing 1,000
        shown = [r for r in self.runs if not self.filter_text or matches(
            self.filter_text, (short_id(r.id), r.display_name, r.state, r.instance, r.user, r.last_line))]
        total = len(shown)
        values = {}
        if table.sort_column is not None:  # the first 1,000 in the chosen order, not the newest 1,000 sorted
            values = {r.id: self.sort_values(r) for r in shown}
            by_id = {r.id: r for r in shown}
            shown = [by_id[k] for k, _ in table.order([(r.id, ()) for r in shown], values)]
        shown = shown[:MAX_ROWS]
        rows = [(r.id, self.cells(r)) for r in shown]
        sync_table(table, rows, values)
        status = Text()
        if not self.runs:
            status.append(f"No runs yet. Press {self.app.key_of('app.run_example')} to run the bundled example on local, "
                          "or from a shell: labdeck run -- python train.py")
        else:
            status.append(f"{total:,} run{'s' if total != 1 else ''}" + (f" match /{self.filter_text}" if self.filter_text else ""))
            if total > len(rows):
                status.append(f" · showing the {'first' if table.sort_label else 'newest'} {len(rows):,}: / to narrow")
            if table.sort_label:
                status.append(f" · sorted by {table.sort_label}")
        for user, err in self.errors.items():
            status.append(f"\n⚠ {plain_line(user)}'s store is unreadable: {plain_line((err.splitlines() or [''])[0])}",
                          style="bold red")
        self.query_one("#jobs-status", Static).update(status)

    def selected(self) -> Run | None:
        table = self.query_one(DataTable)
        if not table.row_count:
            return None
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        return next((r for r in self.runs if r.id == key), None)

    def action_media(self) -> None:
        run = self.selected()
        if run is None:
            self.app.notify("No run selected.", severity="warning")
            return
        from ..mediaview import open_media

        open_media(self.app, run)

    def action_logs(self) -> None:
        run = self.selected()
        if run is None:
            self.app.notify("No run selected.", severity="warning")
            return
        self.app.open_log(run)

    def action_cancel(self) -> None:
        run = self.selected()
        if run is None:
            self.app.notify("No run selected.", severity="warning")
            return
        self.app.confirm_cancel(run)

    def action_new(self) -> None:
        self.app.open_launch_form()

    def action_rerun(self) -> None:
        run = self.selected()
        if run is None:
            self.app.notify("No run selected.", severity="warning")
            return
        self.app.rerun(run)

    def action_rerun_changes(self) -> None:
        run = self.selected()
        if run is None:
            self.app.notify("No run selected.", severity="warning")
            return
        self.app.rerun_with_changes(run)

    def action_serve(self) -> None:
        run = self.selected()
        if run is None:
            self.app.notify("No run selected.", severity="warning")
            return
        self.app.serve_run(run)

    def action_notebook(self) -> None:
        run = self.selected()
        if run is None:
            self.app.notify("No run selected.", severity="warning")
            return
        self.app.open_notebook(run=run)

    def action_info(self) -> None:
        run = self.selected()
        if run is None:
            self.app.notify("No run selected.", severity="warning")
            return
        self.app.show_run_info(run)
