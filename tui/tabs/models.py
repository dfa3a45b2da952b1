"""Models: deployments of runs' models — state, run, instance, URL, requests, latency — and a
"try it" panel. `t` tries the selected one (edit the JSON body, send, see the answer and its
latency), `l` its server log, `x` stops it (asks first), `r` redeploys another run under the same
name. Runs are deployed from Jobs or Lineage with `S`.
"""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Static

from backends import clock
from backends.models import Deployment, parse_time

from ..format import STATE_STYLE, cell, plural, short_id, since
from ..widgets import SortTable, matches, sync_table
from . import TabView

COLUMNS = ("Name", "Run", "State", "Instance", "User", "URL here", "Requests", "p50", "Up")
MAX_WIDTHS = {"Name": 24, "Run": 8, "Instance": 20, "User": 16, "URL here": 32}


class ModelsTab(TabView):
    TAB_ID = "models"
    TITLE = "Models"
    BINDINGS = [
        Binding("t", "try_it", "Try it", id="models.try", tooltip="Send a request to the selected model"),
        Binding("l", "log", "Server log", id="models.log", tooltip="The model server's log"),
        Binding("x,ctrl+d", "stop", "Stop", id="models.stop", tooltip="Stop the selected deployment (asks first)"),
        Binding("r", "redeploy", "Redeploy", id="models.redeploy", tooltip="Serve another run under this name"),
    ]

    def __init__(self) -> None:
        super().__init__(id="models-view")
        self.deployments: list[Deployment] = []
        self.stats: dict[str, tuple[int | None, float | None]] = {}  # id -> (requests, p50 ms)

    def compose(self) -> ComposeResult:
        yield SortTable(COLUMNS, id="models-table", max_widths=MAX_WIDTHS, descending=("Requests", "p50", "Up"))
        yield Static("", id="models-status", classes="status-line")

    def on_mount(self) -> None:
        self.rerender()

    def show_deployments(self, deployments: list[Deployment]) -> None:
        self.deployments = deployments
        self.rerender()

    def rerender(self) -> None:
        if not self.is_mounted:
            return
        now = clock.now()
        urls = getattr(self.app, "model_urls", {})
        rows = []
        values = {}
        for d in self.deployments:
            reqs, p50 = self.stats.get(d.id, (None, None))
            cells = (cell(d.name), cell(short_id(str(d.run_id))), cell(d.state, style=STATE_STYLE.get(d.state, "")),
                     cell(d.instance), cell(d.user), cell(urls.get(d.id, "–")), "–" if reqs is None else str(reqs), "–" if p50 is None else f"{p50:.0f} ms",
                     since(d.started_at, now) if d.state in ("starting", "healthy") else "–")
            if matches(self.filter_text, cells):
                rows.append((d.id, cells))
                up = parse_time(d.started_at) if d.state in ("starting", "healthy") else None
                values[d.id] = (d.name, str(d.run_id), d.state, d.instance, d.user, urls.get(d.id), reqs, p50,
                                (now - up).total_seconds() if up else None)
        sync_table(self.query_one(SortTable), rows, values)
        self.query_one("#models-status", Static).update(Text(
            f"{plural(len(rows), 'deployment')} · t try it · l log · x stop · r redeploy" if self.deployments else
            "No models are served yet. Select a finished run in Jobs or Lineage and press S to serve its model "
            "(or: labdeck serve RUN)."))

    def selected(self) -> Deployment | None:
        table = self.query_one(DataTable)
        if not table.row_count:
            return None
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        return next((d for d in self.deployments if d.id == key), None)

    def _need(self) -> Deployment | None:
        d = self.selected()
        if d is None:
            self.app.notify("No deployment selected.", severity="warning")
        return d

    def action_try_it(self) -> None:
        d = self._need()
        if d:
            self.app.try_model(d)

    def action_log(self) -> None:
        d = self._need()
        if d:
            self.app.open_model_log(d)

    def action_stop(self) -> None:
        d = self._need()
        if d:
            self.app.confirm_stop_model(d)

    def action_redeploy(self) -> None:
        d = self._need()
        if d:
            self.app.redeploy_model(d)
