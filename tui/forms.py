"""The launch form: run a command on an instance (Jobs tab, `n`)."""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Checkbox, Input, Label, Select, Static

from .format import cell, text as outside_text


@dataclass
class LaunchRequest:
    instance: str
    command: str
    workdir: str
    env: dict[str, str]
    name: str
    sync_code: bool
    secrets: dict[str, str] = field(default_factory=dict)  # name -> value, read from labdeck's environment


def parse_secret_names(text: str, environ=None) -> dict[str, str]:
    """``HF_TOKEN WANDB_API_KEY`` (names only) → their values from labdeck's own environment;
    raises ValueError naming what is wrong (never the value). Only the names are ever recorded."""
    from backends.jobs import check_secret_names

    environ = os.environ if environ is None else environ
    names = list(dict.fromkeys(text.replace(",", " ").split()))
    bad = [n for n in names if "=" in n]
    if bad:
        raise ValueError("names only (the values come from labdeck's environment), not NAME=VALUE")
    try:
        check_secret_names(dict.fromkeys(names, ""))
    except Exception as e:  # LabdeckError: its message names the bad name
        raise ValueError(str(e).rstrip(".")) from None
    missing = [n for n in names if n not in environ]
    if missing:
        raise ValueError(f"{', '.join(missing)} not set in labdeck's environment (export it, then start labdeck)")
    return {n: environ[n] for n in names}


def parse_env(text: str) -> dict[str, str]:
    """``KEY=value OTHER='with spaces'`` → dict; raises ValueError naming the bad item."""
    env: dict[str, str] = {}
    for item in shlex.split(text):
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"{item!r} is not KEY=VALUE")
        env[key] = value
    return env


FORM_CSS = """
#launch-dialog { max-width: 100%; max-height: 100%; height: auto; overflow-y: auto; }
#launch-dialog Checkbox { max-width: 100%; }
"""


class LaunchScreen(ModalScreen[LaunchRequest | None]):
    """Instance, command, working directory, environment, secrets, name; enter or ctrl+s starts it."""

    # fits an 80x24 terminal: never wider or taller than the screen; it scrolls inside instead, and a
    # focused field (Tab, or an error sending focus back) is scrolled into view (FORM_CSS)
    DEFAULT_CSS = FORM_CSS + """
    LaunchScreen #launch-env-row { height: auto; }
    LaunchScreen #launch-env-row > Vertical { width: 1fr; height: auto; }
    """

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
        with VerticalScroll(id="launch-dialog"):
            yield Label("Run a command on an instance", id="launch-title")
            yield Label("Instance")
            yield Select([(cell(i), i) for i in self.instances], value=d["instance"], allow_blank=False, id="launch-instance")
            yield Label("Command")
            yield Input(d["command"], placeholder="python train.py --lr 3e-4", id="launch-command")
            yield Label("Working directory (its git repository, or the directory, is snapshotted and synced)")
            yield Input(d["workdir"], id="launch-workdir")
            with Horizontal(id="launch-env-row"):
                with Vertical():
                    yield Label("Environment (KEY=value …)")
                    yield Input(d["env"], placeholder="CUDA_VISIBLE_DEVICES=0 SEED=1", id="launch-env")
                with Vertical():
                    yield Label("Secrets (names; values from your env)")
                    yield Input("", placeholder="HF_TOKEN WANDB_API_KEY", id="launch-secrets",
                                tooltip="Names of labdeck's environment variables: the job gets their values "
                                        "through a 0600 file; only the names are recorded")
            yield Label("Name (optional)")
            yield Input(d["name"], id="launch-name")
            yield Checkbox("Snapshot and sync the code (off: use the directory as is there)", True, id="launch-sync",
                           tooltip="Off: run in the working directory as it is on the instance, with nothing synced")
            yield Static("", id="launch-error", classes="errors")
            with Horizontal(id="launch-buttons"):
                yield Button("Start (ctrl+s)", variant="primary", id="launch-start")
                yield Button("Cancel (esc)", id="launch-cancel")

    def on_mount(self) -> None:
        self.query_one("#launch-command", Input).focus()

    def _error(self, text: str) -> None:
        self.query_one("#launch-error", Static).update(outside_text(text))  # errors quote names and providers

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
        try:
            secrets = parse_secret_names(self.query_one("#launch-secrets", Input).value)
            overlap = sorted(set(secrets) & set(env))
            if overlap:
                raise ValueError(f"{', '.join(overlap)} also in Environment (kept in the team store): give it only here")
        except ValueError as e:
            self._error(f"Secrets: {e}.")
            self.query_one("#launch-secrets", Input).focus()
            return
        sync = self.query_one("#launch-sync", Checkbox).value
        if sync and not os.path.isdir(os.path.expanduser(workdir)):
            self._error(f"{workdir} is not a directory here (turn off syncing to use a directory on the instance).")
            self.query_one("#launch-workdir", Input).focus()
            return
        self.dismiss(LaunchRequest(str(self.query_one("#launch-instance", Select).value), command,
                                   os.path.expanduser(workdir) if sync else workdir, env,
                                   self.query_one("#launch-name", Input).value.strip(), sync, secrets))

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


@dataclass
class UpRequest:
    provider: str
    name: str
    size: str
    image: str
    spot: bool
    autostop_minutes: float
    autostop_action: str


class UpScreen(ModalScreen[UpRequest | None]):
    """Launch a cloud instance: provider, name, size (GPUs, $/hr), image, spot, autostop (Instances, `u`)."""

    DEFAULT_CSS = FORM_CSS

    BINDINGS = [
        Binding("escape", "cancel", "Cancel", id="up.cancel"),
        Binding("ctrl+s", "submit", "Launch", id="up.submit", tooltip="Launch the instance"),
    ]

    def __init__(self, providers: dict, *, budget_line: str = "", taken: set[str] | None = None) -> None:
        super().__init__()
        self.providers = providers  # name -> CloudProvider
        self.budget_line = budget_line
        self.taken = taken or set()
        self.sizes: dict[str, list] = {}

    def compose(self) -> ComposeResult:
        first = next(iter(self.providers))
        p = self.providers[first]
        with VerticalScroll(id="launch-dialog"):
            yield Label("Launch a cloud instance", id="launch-title")
            yield Label("Provider")
            yield Select([(cell(f"{n} ({q.type}, {q.region})"), n) for n, q in self.providers.items()], value=first,
                         allow_blank=False, id="up-provider")
            yield Label("Name (lowercase letters, digits, '-')")
            yield Input(self._free_name(), id="up-name")
            yield Label("Size")
            yield Select([(cell(p.options["size"]), str(p.options["size"]))], value=str(p.options["size"]),
                         allow_blank=False, id="up-size")
            yield Label("Image ('' = the provider's GPU-ready default)")
            yield Input("", placeholder=str(p.options["image"]), id="up-image")
            with Horizontal(id="up-row"):
                yield Checkbox("Spot (EC2)", False, id="up-spot", tooltip="Cheaper; the provider can take it back")
                yield Label(" Autostop (idle min) ")
                yield Input(f"{float(p.options['autostop_minutes']):g}", id="up-autostop", classes="short")
                yield Select([("stop", "stop"), ("terminate", "terminate")], value=str(p.options["autostop_action"]),
                             allow_blank=False, id="up-action")
            yield Static(Text(self.budget_line), id="up-budget")
            yield Static("", id="launch-error", classes="errors")
            with Horizontal(id="launch-buttons"):
                yield Button("Launch (ctrl+s)", variant="primary", id="up-start")
                yield Button("Cancel (esc)", id="up-cancel")

    def _free_name(self) -> str:
        n = 1
        while f"gpu{n}" in self.taken:
            n += 1
        return f"gpu{n}"

    def on_mount(self) -> None:
        self.query_one("#up-name", Input).focus()
        self.load_sizes(str(self.query_one("#up-provider", Select).value))

    @on(Select.Changed, "#up-provider")
    def provider_changed(self, event: Select.Changed) -> None:
        p = self.providers[str(event.value)]
        self.query_one("#up-image", Input).placeholder = str(p.options["image"])
        self.query_one("#up-autostop", Input).value = f"{float(p.options['autostop_minutes']):g}"
        self.load_sizes(str(event.value))

    @work(group="up-sizes", exclusive=True, exit_on_error=False)
    async def load_sizes(self, provider: str) -> None:
        from backends.errors import LabdeckError

        p = self.providers[provider]
        try:
            sizes = await p.sizes()
        except LabdeckError as e:
            self._error(f"Sizes of {provider}: {e}")
            return
        gpu = [s for s in sizes if s.gpus] or sizes
        gpu.sort(key=lambda s: (s.price_per_hour is None, s.price_per_hour or 0, s.id))
        options = [(cell(f"{s.id} · {s.gpu_summary} · {s.vcpus} vCPU · {s.ram_mib / 1024:.0f} GiB · "
                    + (f"${s.price_per_hour:.3f}/h" if s.price_per_hour is not None else "price ?")), s.id)
                   for s in gpu[:200]]
        sel = self.query_one("#up-size", Select)
        default = str(p.options["size"])
        sel.set_options(options)
        if any(v == default for _, v in options):
            sel.value = default

    def _error(self, text: str) -> None:
        self.query_one("#launch-error", Static).update(outside_text(text))  # errors quote names and providers

    def action_submit(self) -> None:
        from backends.providers.cloud import NAME_RE

        name = self.query_one("#up-name", Input).value.strip()
        if not NAME_RE.match(name):
            self._error("Name: 2-40 lowercase letters, digits and '-', starting with a letter.")
            self.query_one("#up-name", Input).focus()
            return
        if name in self.taken:
            self._error(f"There is already an instance named {name}.")
            return
        try:
            minutes = float(self.query_one("#up-autostop", Input).value or 0)
            if minutes < 0:
                raise ValueError
        except ValueError:
            self._error("Autostop: a number of minutes (0 = never).")
            self.query_one("#up-autostop", Input).focus()
            return
        provider = str(self.query_one("#up-provider", Select).value)
        spot = self.query_one("#up-spot", Checkbox).value
        if spot and self.providers[provider].type != "ec2":
            self._error(f"Spot instances: EC2 only ({provider} is {self.providers[provider].type}).")
            return
        self.dismiss(UpRequest(provider, name, str(self.query_one("#up-size", Select).value),
                               self.query_one("#up-image", Input).value.strip(), spot, minutes,
                               str(self.query_one("#up-action", Select).value)))

    def action_cancel(self) -> None:
        self.dismiss(None)

    @on(Input.Submitted)
    def submitted(self) -> None:
        self.action_submit()

    @on(Button.Pressed, "#up-start")
    def start_pressed(self) -> None:
        self.action_submit()

    @on(Button.Pressed, "#up-cancel")
    def cancel_pressed(self) -> None:
        self.dismiss(None)
