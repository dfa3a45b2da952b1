"""Models: deployments of runs' models (who, run, instance, URL, state), from everyone's store."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.widgets import DataTable, Static

from backends.models import Deployment

from ..format import STATE_STYLE, short_id, since
from ..widgets import matches, sync_table
from . import TabView

COLUMNS = ("Name", "Run", "State", "Instance", "User", "URL", "Up")


class ModelsTab(TabView):
    TAB_ID = "models"
    TITLE = "Models"

    def __init__(self) -> None:
        super().__init__(id="models-view")
        self.deployments: list[Deployment] = []

    def compose(self) -> ComposeResult:
        yield DataTable(id="models-table", cursor_type="row", zebra_stripes=True)
        yield Static("", id="models-status", classes="status-line")

    def on_mount(self) -> None:
        self.query_one(DataTable).add_columns(*COLUMNS)
        self.rerender()

    def show_deployments(self, deployments: list[Deployment]) -> None:
        self.deployments = deployments
        self.rerender()

    def rerender(self) -> None:
        if not self.is_mounted:
            return
        now = self.app.now()
        rows = []
        for d in self.deployments:
            cells = (d.name, short_id(d.run_id), Text(d.state, style=STATE_STYLE.get(d.state, "")), d.instance, d.user,
                     d.url or "–", since(d.started_at, now) if d.state in ("starting", "healthy") else "–")
            if matches(self.filter_text, cells):
                rows.append((d.id, cells))
        sync_table(self.query_one(DataTable), rows)
        self.query_one("#models-status", Static).update(
            f"{len(rows)} deployments" if self.deployments else
            "No models are served yet. Deployments that anyone on the team records show here, with their URL and state.")
