"""Instances: every configured provider's machines with state, size, GPUs, $/hr and uptime, live."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Static

from backends import clock
from backends.models import Instance, Run, parse_time
from backends.workstation import InstanceListing

from ..format import STATE_STYLE, cell, money, safe, since, text as outside_text
from ..widgets import SortTable, matches, sync_table
from . import TabView

COLUMNS = ("Name", "Provider", "State", "Ping", "Size", "GPUs", "$/hr", "Cost", "Autostop", "Owner", "Uptime", "Host")
MAX_WIDTHS = {"Name": 24, "Provider": 16, "Size": 24, "GPUs": 24, "Autostop": 16, "Owner": 16, "Host": 32}


def _age(iso, now) -> float | None:
    t = parse_time(iso)
    return (now - t).total_seconds() if t else None


def short_autostop(text: str) -> Text:
    """The autostop countdown, short enough for its column: "in 12m", "busy", "off", "stopping…"."""
    if not text:
        return Text("–")
    text = cell(text).plain  # written by the instance's autostop daemon: text only
    for verb in ("stops in ", "terminates in "):
        if text.startswith(verb):
            return Text(("✕ " if verb.startswith("term") else "") + "in " + text[len(verb):], style="yellow")
    if "failed" in text:
        return Text("failed", style="bold red")  # the daemon could not stop it: look at the instance
    if text.startswith("busy"):
        return Text("busy", style="green")
    return Text(text, style="red" if text in ("stale", "stopping…", "terminating…") else "dim")


class InstancesTab(TabView):
    TAB_ID = "instances"
    TITLE = "Instances"
    BINDINGS = [
        Binding("N", "notebook", "Notebook", id="instances.notebook", tooltip="Jupyter on the selected instance"),
        Binding("u", "up", "Launch", id="instances.up", tooltip="Launch a cloud GPU instance"),
        Binding("s", "stop", "Stop", id="instances.stop", tooltip="Stop the selected cloud instance"),
        Binding("o", "start", "Start", id="instances.start", tooltip="Start the selected stopped instance"),
        Binding("D", "terminate", "Terminate", id="instances.terminate", tooltip="Terminate the selected cloud instance"),
        Binding("a", "autostop", "Autostop", id="instances.autostop", tooltip="Idle minutes before it stops itself"),
    ]

    LIFECYCLE_ACTIONS = ("stop", "start", "terminate", "autostop")

    def refuses_lifecycle(self, inst: Instance | None) -> bool:
        """Whether the selected instance's provider refuses stop/start/terminate/autostop (``local``, the
        team's SSH hosts: an UnmanagedProvider): the footer then does not offer them."""
        from backends.providers.base import UnmanagedProvider

        if inst is None:
            return False
        provider = self.app.workstation.providers.get(inst.provider)
        return isinstance(provider, UnmanagedProvider) if provider is not None else inst.provider_type in ("local", "ssh")

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in self.LIFECYCLE_ACTIONS and self.is_mounted and self.refuses_lifecycle(self.selected()):
            return False  # hidden from the footer, and the key does nothing (it would only be refused)
        return True

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self.refresh_bindings()  # the footer's stop/start/… follow the selected instance

    def action_autostop(self) -> None:
        inst = self.selected()
        if inst is None or not inst.managed or inst.state != "running":
            self.app.notify("Select a running instance labdeck launched.", severity="warning")
            return
        self.app.ask_autostop(inst)

    def selected(self) -> Instance | None:
        table = self.query_one(DataTable)
        if not table.row_count:
            return None
        name = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        return next((i for i in self.listing.instances if i.name == name), None)

    def action_notebook(self) -> None:
        inst = self.selected()
        if inst is not None:
            self.app.open_notebook(instance=inst.name)

    def action_up(self) -> None:
        self.app.open_up_form()

    def _lifecycle(self, verb: str) -> None:
        inst = self.selected()
        if inst is None:
            self.app.notify("No instance selected.", severity="warning")
            return
        if inst.provider_type in ("local", "ssh"):
            self.app.notify(f"{inst.name} is one of the team's own machines: labdeck does not {verb} it.",
                            severity="warning")
            return
        self.app.confirm_lifecycle(verb, inst)

    def action_stop(self) -> None:
        self._lifecycle("stop")

    def action_start(self) -> None:
        self._lifecycle("start")

    def action_terminate(self) -> None:
        self._lifecycle("terminate")

    def __init__(self) -> None:
        super().__init__(id="instances-view")
        self.listing = InstanceListing([])
        self.runs: list[Run] = []
        self.loaded = False
        self.burn_text = ""

    def show_progress(self, text: str) -> None:
        if self.is_mounted:
            w = self.query_one("#instances-progress", Static)
            w.update(safe(text))  # names and stages a provider reported
            w.display = bool(text)

    def compose(self) -> ComposeResult:
        yield Static("", id="instances-burn")
        yield SortTable(COLUMNS, id="instances-table", max_widths=MAX_WIDTHS, descending=("$/hr", "Cost", "Uptime"))
        yield Static("", id="instances-progress")
        yield Static("", id="instances-errors", classes="errors")
        yield Static("Looking for instances…", id="welcome", classes="welcome")

    def show_instances(self, listing: InstanceListing) -> None:
        self.listing = listing
        self.loaded = True
        self.rerender()
        self.refresh_bindings()  # the selected row may now be (or no longer be) an instance that refuses stop/start

    def show_runs(self, runs: list[Run]) -> None:
        self.runs = runs
        self.rerender()

    def row(self, inst: Instance) -> tuple:
        now = clock.now()
        return (
            cell(inst.name, style="bold"), cell(inst.provider), cell(inst.state, style=STATE_STYLE.get(inst.state, "")),
            f"{inst.latency_ms:.0f} ms" if inst.latency_ms is not None else "–",
            (inst.size + (" spot" if inst.spot else "")) if inst.size else (inst.size_summary if inst.vcpus else "–"),
            inst.gpu_summary, money(inst.price_per_hour),
            f"${inst.cost:.2f}" if inst.cost is not None else "–", short_autostop(inst.autostop),
            cell(inst.created_by or "–", style="" if inst.managed or inst.provider_type in ("local", "ssh") else "dim"),
            since(inst.started_at, now) if inst.state == "running" else "–", cell(inst.host),
        )

    @staticmethod
    def sort_values(inst: Instance) -> tuple:
        """What each column sorts by: milliseconds, dollars, seconds up; text for the rest."""
        now = clock.now()
        return (inst.name, inst.provider, inst.state, inst.latency_ms, inst.size or inst.size_summary,
                len(inst.gpus) if isinstance(inst.gpus, list) and inst.gpus else None, inst.price_per_hour or None,
                inst.cost, inst.autostop, inst.created_by, _age(inst.started_at, now) if inst.state == "running" else None,
                inst.host)

    def rerender(self) -> None:
        if not self.is_mounted:
            return
        rows = [(i.name, self.row(i)) for i in self.listing.instances]
        rows = [(k, cells) for k, cells in rows if matches(self.filter_text, cells)]
        values = {i.name: self.sort_values(i) for i in self.listing.instances}
        sync_table(self.query_one(SortTable), rows, values)
        problems = list(self.listing.errors.values()) + list(getattr(self.listing, "events", [])) + [
            f"{i.name}: {i.note.splitlines()[0]}" for i in self.listing.instances if i.state == "unreachable" and i.note]
        burn = self.query_one("#instances-burn", Static)
        burn.update(Text(self.burn_text))
        burn.display = bool(self.burn_text)
        errors = self.query_one("#instances-errors", Static)
        errors.update(outside_text("\n".join(f"⚠ {e}" for e in problems)))  # hosts' and providers' words
        errors.display = bool(problems)
        self.query_one("#welcome", Static).update(self.welcome_text())

    def welcome_text(self) -> Text:
        if not self.loaded:
            return Text("Looking for instances…")
        keys = self.app.key_of
        if not self.runs:
            t = Text()
            t.append("Welcome to labdeck.\n", style="bold")
            t.append("`local` is this machine: jobs run here with no cloud account.\n\n")
            t.append(f" {keys('app.run_example')} ", style="reverse")
            t.append("  run the bundled example (a small numpy training job) on local\n")
            t.append(f" {keys('app.tab.jobs')} ", style="reverse")
            t.append("  then watch it in Jobs;  ")
            t.append(f" {keys('app.help')} ", style="reverse")
            t.append("  every key;  ")
            t.append(" : ", style="reverse")
            t.append("  commands\n\n")
            t.append(f"From a shell: labdeck run -- python train.py   ·   settings: {self.app.workstation.config.file}")
            return t
        running = sum(1 for r in self.runs if r.state == "running")
        return Text(f"{len(self.runs):,} runs in the team's history, {running} running now · "
                    f"{keys('app.tab.jobs')} Jobs · {keys('app.run_example')} run the example again")
