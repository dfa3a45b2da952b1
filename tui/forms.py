"""The launch form: run a command on an instance (Jobs tab, `n`)."""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Checkbox, Input, Label, Select, Static


@dataclass
class LaunchRequest:
    instance: str
    command: str
    workdir: str
    env: dict[str, str]
    name: str
    sync_code: bool


def parse_env(text: str) -> dict[str, str]:
    """``KEY=value OTHER='with spaces'`` → dict; raises ValueError naming the bad item."""
    env: dict[str, str] = {}
    for item in shlex.split(text):
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"{item!r} is not KEY=VALUE")
        env[key] = value
    return env


class LaunchScreen(ModalScreen[LaunchRequest | None]):
    """Instance, command, working directory, environment, name; enter or ctrl+s starts it."""

    BINDINGS = [
        Binding("escape", "cancel", "Cancel", id="launch.cancel"),
        Binding("ctrl+s", "submit", "Start", id="launch.submit", tooltip="Start the run"),
    ]

    def __init__(self, instances: list[str], *, instance: str = "local", command: str = "", workdir: str = "",
                 env: str = "", name: str = "") -> None:
        super().__init__()
        self.instances = instances or ["local"]
        self.defaults = dict(instance=instance if instance in self.instances else self.instances[0], command=command,
                             workdir=workdir or os.getcwd(), env=env, name=name)

    def compose(self) -> ComposeResult:
        d = self.defaults
        with Vertical(id="launch-dialog"):
            yield Label("Run a command on an instance", id="launch-title")
            yield Label("Instance")
            yield Select([(i, i) for i in self.instances], value=d["instance"], allow_blank=False, id="launch-instance")
            yield Label("Command")
            yield Input(d["command"], placeholder="python train.py --lr 3e-4", id="launch-command")
            yield Label("Working directory (its git repository, or the directory, is snapshotted and synced)")
            yield Input(d["workdir"], id="launch-workdir")
            yield Label("Environment (KEY=value …)")
            yield Input(d["env"], placeholder="CUDA_VISIBLE_DEVICES=0 SEED=1", id="launch-env")
            yield Label("Name (optional)")
            yield Input(d["name"], id="launch-name")
            yield Checkbox("Snapshot and sync the code (off: run in the directory as it is on the instance)", True,
                           id="launch-sync")
            yield Static("", id="launch-error", classes="errors")
            with Horizontal(id="launch-buttons"):
                yield Button("Start (ctrl+s)", variant="primary", id="launch-start")
                yield Button("Cancel (esc)", id="launch-cancel")

    def on_mount(self) -> None:
        self.query_one("#launch-command", Input).focus()

    def _error(self, text: str) -> None:
        self.query_one("#launch-error", Static).update(text)

    def action_submit(self) -> None:
        command = self.query_one("#launch-command", Input).value.strip()
        workdir = self.query_one("#launch-workdir", Input).value.strip()
        if not command:
            self._error("Give a command to run.")
            self.query_one("#launch-command", Input).focus()
            return
        try:
            env = parse_env(self.query_one("#launch-env", Input).value)
        except ValueError as e:
            self._error(f"Environment: {e}.")
            self.query_one("#launch-env", Input).focus()
            return
        sync = self.query_one("#launch-sync", Checkbox).value
        if sync and not os.path.isdir(os.path.expanduser(workdir)):
            self._error(f"{workdir} is not a directory here (turn off syncing to use a directory on the instance).")
            self.query_one("#launch-workdir", Input).focus()
            return
        self.dismiss(LaunchRequest(str(self.query_one("#launch-instance", Select).value), command,
                                   os.path.expanduser(workdir) if sync else workdir, env,
                                   self.query_one("#launch-name", Input).value.strip(), sync))

    def action_cancel(self) -> None:
        self.dismiss(None)

    @on(Input.Submitted)
    def submitted(self) -> None:
        self.action_submit()

    @on(Button.Pressed, "#launch-start")
    def start_pressed(self) -> None:
        self.action_submit()

    @on(Button.Pressed, "#launch-cancel")
    def cancel_pressed(self) -> None:
        self.dismiss(None)
