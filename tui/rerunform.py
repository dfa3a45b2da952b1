"""Rerun with changes (`R` in Jobs and Lineage): the run's command, instance, environment and parameters,
prefilled and editable; the new run is a child of the old one in lineage, its changed parameters the diff.

How a changed parameter reaches the job is :func:`backends.lineage.set_params`'s rule (the same as
``labdeck rerun RUN --set k=v``): rewritten in the command where the command line has it, else given to
``labdeck.config()`` through ``$LABDECK_PARAMS``. The form shows, as you type, what will change and how.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Select, Static

from backends.errors import LabdeckError
from backends.lineage import PARAM_NAME, PARAMS_ENV
from backends.models import Run
from backends.text import plain, plain_line

from .format import cell, short_id, text as outside_text
from .forms import parse_env




@dataclass
class RerunRequest:
    """What the form asks for: ``command`` None keeps the run's; ``sets`` are the changed parameters."""

    instance: str
    command: str | None
    env: dict[str, str]
    name: str
    sets: dict[str, str] = field(default_factory=dict)


def param_text(value) -> str:
    """A recorded parameter as the form shows it (and reads it back): 0.1, 300, true, adam, 'two words'."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return plain_line(value)


def params_line(params: dict) -> str:
    """``lr=0.1 steps=300 …``: the run's scalar parameters, as one editable line."""
    items = []
    for k, v in sorted(params.items(), key=lambda kv: str(kv[0])):
        if isinstance(v, (dict, list)) or not isinstance(k, str) or not PARAM_NAME.fullmatch(k):
            continue  # a teammate's odd key ("a b", "x;y") could not be --set anyway
        items.append(f"{plain_line(k)}={shlex.quote(param_text(v))}")
    return " ".join(items)


def parse_params(text: str) -> dict[str, str]:
    """``lr=3e-4 model.layers=12`` → {key: value}; raises ValueError naming the bad item."""
    out: dict[str, str] = {}
    for item in shlex.split(text):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{item!r} is not KEY=VALUE")
        out[key] = value
    return out


def env_line(env: dict) -> str:
    return " ".join(f"{k}={shlex.quote(str(v))}" for k, v in sorted(env.items(), key=str) if k != PARAMS_ENV)


class RerunScreen(ModalScreen[RerunRequest | None]):
    """The run's command, instance, parameters, environment and name, prefilled; ctrl+s starts the child."""

    DEFAULT_CSS = """
    RerunScreen { align: center middle; }
    RerunScreen #rerun-dialog {
        width: 90; max-width: 100%; height: auto; max-height: 100%;
        padding: 1 2; border: thick $accent; background: $surface;
    }
    RerunScreen #rerun-title { text-style: bold; margin-bottom: 1; }
    RerunScreen #rerun-changes { height: auto; margin-top: 1; color: $text; }
    RerunScreen #rerun-buttons { height: auto; align: right middle; margin-top: 1; }
    RerunScreen #rerun-buttons Button { margin-left: 2; }
    """

    BINDINGS = [
        Binding("escape", "cancel", "Cancel", id="rerun.cancel"),
        Binding("ctrl+s", "submit", "Start", id="rerun.submit", tooltip="Start the rerun with these changes"),
    ]

    def __init__(self, run: Run, instances: list[str], plan) -> None:
        """``plan(run, command=, env=, sets=)``: the workstation's :meth:`~backends.workstation.Workstation.rerun_plan`."""
        super().__init__()
        self.run = run
        self.plan = plan
        self.instances = list(dict.fromkeys([run.instance, *instances]))
        self.params = run.params if isinstance(run.params, dict) else {}
        self.env = run.env if isinstance(run.env, dict) else {}
        self.shown_params = params_line(self.params)

    def compose(self) -> ComposeResult:
        r = self.run
        with VerticalScroll(id="rerun-dialog"):
            yield Label(Text(f"Rerun {plain_line(r.display_name)} {short_id(r.id)} with changes: a child of it in lineage"),
                        id="rerun-title")
            yield Label("Parameters (change a value: lr=3e-4)")
            yield Input(self.shown_params, placeholder="lr=3e-4 batch_size=64", id="rerun-params",
                        tooltip="A key written in the command is rewritten there; one recorded by labdeck.config() "
                                "reaches the job in $LABDECK_PARAMS")
            yield Label("Command")
            yield Input(plain(r.command).replace("\n", " "), id="rerun-command")
            yield Label("Instance")
            yield Select([(cell(i), i) for i in self.instances], value=r.instance, allow_blank=False, id="rerun-instance")
            yield Label("Environment (KEY=value …)")
            yield Input(env_line(self.env), placeholder="none yet: KEY=value …", id="rerun-env")
            yield Label("Name")
            yield Input(plain_line(r.name if r.name.endswith("(rerun)") else f"{r.name or short_id(r.id)} (rerun)"),
                        id="rerun-name")
            yield Static("", id="rerun-changes")
            with Horizontal(id="rerun-buttons"):
                yield Button("Start (ctrl+s)", variant="primary", id="rerun-start")
                yield Button("Cancel (esc)", id="rerun-cancel")

    def on_mount(self) -> None:
        self.query_one("#rerun-params", Input).focus()
        self.show_changes()

    # ---- reading the form ----------------------------------------------------
    def request(self) -> RerunRequest:
        """The form as a request; raises ValueError (bad KEY=VALUE) or LabdeckError (a key that changes nothing)."""
        return self._read()[0]

    def _read(self):
        """(the request, its plan): the plan refuses a key that would change nothing."""
        try:
            given = parse_params(self.query_one("#rerun-params", Input).value)
        except ValueError as e:
            raise ValueError(f"Parameters: {e}.") from None
        before = parse_params(self.shown_params)
        sets = {k: v for k, v in given.items() if before.get(k) != v}
        try:
            env = parse_env(self.query_one("#rerun-env", Input).value)
        except ValueError as e:
            raise ValueError(f"Environment: {e}.") from None
        if PARAMS_ENV in self.env:  # a rerun of a rerun keeps the earlier changes made through labdeck.config()
            env.setdefault(PARAMS_ENV, self.env[PARAMS_ENV])
        command = self.query_one("#rerun-command", Input).value.strip()
        if not command:
            raise ValueError("Give a command to run.")
        unchanged = command == plain(self.run.command).replace("\n", " ")
        req = RerunRequest(str(self.query_one("#rerun-instance", Select).value), None if unchanged else command, env,
                           self.query_one("#rerun-name", Input).value.strip(), sets)
        return req, self.plan(self.run, command=req.command, env=req.env, sets=req.sets)

    def _show_error(self, e: Exception) -> None:
        self.query_one("#rerun-changes", Static).update(
            outside_text(e.render() if isinstance(e, LabdeckError) else str(e), style="bold red"))

    def show_changes(self) -> None:
        out = Text()
        try:
            req, plan = self._read()
        except (ValueError, LabdeckError) as e:
            self._show_error(e)
            return
        if not plan.params and req.command is None and req.instance == self.run.instance and req.env == self.env:
            out.append("No changes yet: the same command, environment and instance (a plain rerun).", style="dim")
        for k, old, new, where in plan.params:
            out.append(f"{plain_line(k)}: {plain_line(param_text(old))} → {plain_line(param_text(new))}", style="yellow")
            out.append("  in the command\n" if where == "command" else f"  through ${where} (for labdeck.config())\n",
                       style="dim")
        if plan.command != self.run.command:
            out.append("$ " + plain(plan.command), style="dim")
        self.query_one("#rerun-changes", Static).update(out)

    @on(Input.Changed)
    @on(Select.Changed)
    def changed(self) -> None:
        self.show_changes()

    # ---- actions ----------------------------------------------------------------
    def action_submit(self) -> None:
        try:
            req = self.request()
        except (ValueError, LabdeckError) as e:
            self._show_error(e)
            return
        self.dismiss(req)

    def action_cancel(self) -> None:
        self.dismiss(None)

    @on(Input.Submitted)
    def submitted(self) -> None:
        self.action_submit()

    @on(Button.Pressed, "#rerun-start")
    def start_pressed(self) -> None:
        self.action_submit()

    @on(Button.Pressed, "#rerun-cancel")
    def cancel_pressed(self) -> None:
        self.dismiss(None)
