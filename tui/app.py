"""The labdeck workstation: five tabs over one Workstation (config + store + providers).

Backend calls run in Textual workers (async for transports, threads for
blocking store and /proc reads) and come back as typed Messages; every worker
error goes through :meth:`LabdeckApp.show_error`, so failures are
notifications, never a traceback on screen.
"""

from __future__ import annotations

import asyncio
import logging
import shlex
import time
import traceback
from collections import deque

from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.css.query import NoMatches
from textual.widgets import DataTable, Static, TabbedContent, TabPane
from textual.worker import Worker, WorkerState

from backends import clock
from backends.errors import LabdeckError, StoreCorruptError
from backends.lineage import TeamLineage, annotate
from backends.models import Deployment, Run
from backends.store import move_aside
from backends.text import plain, plain_line
from backends.workstation import Workstation

from .commands import LabdeckCommands
from .format import rerun_plan, use_plan
from .footer import LabdeckFooter
from .forms import LaunchRequest, LaunchScreen
from .messages import DeploymentsLoaded, InstancesLoaded, MonitorUpdated, RunLaunched, RunsLoaded
from .tabs import TabView
from .tabs.instances import InstancesTab
from .tabs.jobs import JobsTab
from .tabs.lineage import LineageTab
from .tabs.models import ModelsTab
from .tabs.monitor import MonitorTab
from .widgets import (CommandBar, ConfirmScreen, FilterBar, HelpScreen, InfoScreen, LineInput, LogScreen, SortTable,
                      TextPrompt, TryModelScreen, error_text)

log = logging.getLogger("labdeck.tui")

TAB_CLASSES: tuple[type[TabView], ...] = (InstancesTab, JobsTab, MonitorTab, LineageTab, ModelsTab)


class LabdeckApp(App[None]):
    TITLE = "labdeck"
    CSS_PATH = "labdeck.tcss"
    COMMANDS = App.COMMANDS | {LabdeckCommands}
    TAB_TITLES = {cls.TAB_ID: cls.TITLE for cls in TAB_CLASSES}
    BINDINGS = [
        Binding("1", "switch_tab('instances')", "Instances", id="app.tab.instances", tooltip="Machines, size, GPUs, cost"),
        Binding("2", "switch_tab('jobs')", "Jobs", id="app.tab.jobs", tooltip="Runs and their logs"),
        Binding("3", "switch_tab('monitor')", "Monitor", id="app.tab.monitor", tooltip="Live CPU/GPU use"),
        Binding("4", "switch_tab('lineage')", "Lineage", id="app.tab.lineage", tooltip="The team's runs as a tree"),
        Binding("5", "switch_tab('models')", "Models", id="app.tab.models", tooltip="Served models"),
        Binding("left_square_bracket", "cycle_tab(-1)", "Prev tab", show=False, id="app.tab.prev"),
        Binding("right_square_bracket", "cycle_tab(1)", "Next tab", show=False, id="app.tab.next"),
        Binding("e", "run_example", "Run example", id="app.run_example", tooltip="Run the bundled example on local"),
        Binding("slash", "filter", "Filter", id="app.filter", tooltip="Filter the list on this tab"),
        Binding("colon", "command", "Command", id="app.command", tooltip=":jobs :lineage :q …"),
        Binding("ctrl+r", "refresh", "Refresh", show=False, id="app.refresh", tooltip="Reload everything now"),
        Binding("question_mark,f1", "help", "Help", id="app.help", tooltip="Keys of this tab"),
        Binding("q", "quit", "Quit", id="app.quit", tooltip="Leave labdeck; jobs keep running"),
    ]

    def __init__(self, workstation: Workstation, *, live: bool = True) -> None:
        super().__init__()
        self.workstation = workstation
        self.live = live  # False: no timers, no agents, no following (tests and screenshots)
        self.idle: dict[str, float] = {}  # run id -> mean GPU % of a run flagged idle
        self.runs: list[Run] = []
        self.startup_error: BaseException | None = None
        self._first_frame_done = False
        self._asked_move_aside: set[str] = set()
        self._runs_shown = False  # the first load posts the stored runs before asking instances
        self._runs_stale = False  # something other than a refresh changed the store (launch, cancel, teammates)
        self._team_reading = False  # a read of the team view under way (_post_team)
        self._team_read_again = False  # asked for meanwhile: read once more when it is done
        self._observer = None
        self._reload_timer = None
        self._forwards: dict = {}  # deployment id -> PortForward held by this TUI
        self.model_urls: dict[str, str] = {}
        self._model_latency: dict[str, deque[float]] = {}
        cfg = workstation.config
        self.theme = cfg.get("ui", "theme") if cfg.get("ui", "theme") in self.available_themes else "textual-dark"
        self.refresh_seconds = float(cfg.get("ui", "refresh_seconds"))

    # ---- layout --------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Static(self.top_line(), id="top-bar")
        with TabbedContent(initial=self.workstation.config.get("ui", "start_tab"), id="tabs"):
            for cls in TAB_CLASSES:
                with TabPane(cls.TITLE, id=cls.TAB_ID):
                    yield cls()
        yield CommandBar()
        yield FilterBar()
        yield LabdeckFooter()

    def get_system_commands(self, screen):
        """Textual's palette commands, less its "Keys" panel: labdeck's own "Show keys" (`?`) lists this
        tab's keys with their binding ids; two entries for one need were confusing."""
        for command in super().get_system_commands(screen):
            if command.title != "Keys":
                yield command

    def top_line(self) -> Text:
        ws = self.workstation
        return Text(f"labdeck · {ws.user} · providers: {', '.join(ws.providers)} · team: {ws.config.team_dir}")

    @property
    def instances_tab(self) -> InstancesTab:
        return self.query_one(InstancesTab)

    @property
    def jobs_tab(self) -> JobsTab:
        return self.query_one(JobsTab)

    def active_tab(self) -> TabView:
        active = self.query_one(TabbedContent).active
        return next(t for t in self.query(TabView) if t.TAB_ID == active)

    def on_mount(self) -> None:
        if self.workstation.config.keys:
            self.set_keymap(dict(self.workstation.config.keys))
        self.query_one(CommandBar).display = False
        self.query_one(FilterBar).display = False
        self.workstation.health.subscribe(self._host_health_changed)
        self.load_instances()
        self.load_runs()
        self.load_deployments()
        if self.live:
            self.set_interval(self.refresh_seconds, self.load_instances)
            self.set_interval(self.refresh_seconds, self.load_runs)
            self.set_interval(max(self.refresh_seconds, 5.0), self.load_deployments)
            self.set_interval(1.0, self.poll_monitor)
            self._watch_team_dir()
        self.poll_monitor()
        self.call_after_refresh(self._mark_ready)

    async def on_unmount(self) -> None:
        if self._observer is not None:
            self._observer.stop()
        for fwd in self._forwards.values():  # model servers keep running; only our forwards close
            await fwd.close()
        await self.workstation.follower.stop_all()  # jobs go on; their logs are caught up on the next start

    def _mark_ready(self) -> None:
        self._first_frame_done = True
        if self._tabs_gone():  # closed before its first frame: this callback runs while the tabs are pruned
            return
        self.active_tab().focus_main()

    def notify(self, message, *, title: str = "", severity="information", timeout: float | None = None,
               markup: bool = False) -> None:
        """Every notification is plain text: the names, errors and hosts' words in them are never markup
        (``[/]`` would crash, ``[@click=…]`` would run an action) nor terminal escapes."""
        if not markup:
            message, title = plain(message), plain_line(title)
        super().notify(message, title=title, severity=severity, timeout=timeout, markup=markup)

    def key_of(self, binding_id: str) -> str:
        """The key(s) bound to ``binding_id`` now (after remapping), for on-screen hints."""
        keymap = self._keymap if hasattr(self, "_keymap") else {}
        if binding_id in keymap:
            return keymap[binding_id].split(",")[0]
        for b in [*self.BINDINGS, *(b for cls in TAB_CLASSES for b in cls.BINDINGS)]:  # the app's and the tabs'
            if isinstance(b, Binding) and b.id == binding_id:
                return self.get_key_display(Binding(b.key.split(",")[0], b.action))
        return "?"

    # ---- workers (backend calls) ---------------------------------------
    @work(exclusive=True, group="instances", exit_on_error=False)
    async def load_instances(self) -> None:
        from backends import clouds

        ws = self.workstation
        listing = await ws.list_instances(on_partial=lambda part: self.post_message(InstancesLoaded(part, partial=True)))
        for e in listing.events:  # before the autostop reads below (a newer refresh may cancel this one)
            self.notify(e, severity="warning", timeout=15)
        for e in ws.background_errors:
            self.notify(e, severity="error", timeout=15)
        ws.background_errors.clear()
        if clouds.cloud_providers(ws):
            await clouds.poll_autostop(ws, listing.instances)
            sp = clouds.enrich(ws, listing.instances, now=clock.now())
            daily = float(ws.config.get("budget", "daily_usd"))
            outside = sum(i.price_per_hour for i in listing.instances
                          if not i.managed and i.state == "running" and i.provider_type not in ("local", "ssh"))
            self.instances_tab.burn_text = (
                f"Burn: you ${sp.burn_user:.2f}/h · team ${sp.burn_team + outside:.2f}/h"
                + (f" (${outside:.2f}/h not launched by labdeck)" if outside else "")
                + f" · today you ${sp.today_user:.2f}" + (f" of ${daily:.2f} budget" if daily else "")
                + f" · team ${sp.today_team:.2f}")
        self.post_message(InstancesLoaded(listing))

    @work(group="runs", exit_on_error=False)
    async def load_runs(self) -> None:
        """Each host's changes are shown as soon as that host answers: every host on its own clock
        (:meth:`backends.workstation.Workstation.refresh_hosts`). Not exclusive: a tick that comes
        while a slow host is still being waited for starts the other hosts' next round anyway (a
        host already being asked is not asked twice), so one dead host never slows the others' rows."""
        ws = self.workstation
        if not self._runs_shown:  # show what the store holds first, then ask the instances
            await self._post_team()
            self._runs_shown = True
        async for _inst, changed in ws.refresh_hosts():
            if changed or self._runs_stale:
                self._runs_stale = False
                await self._post_team()
        if self._runs_stale:
            self._runs_stale = False
            await self._post_team()
        elif ws.health.unreachable():  # "node2 unreachable for 12 s": the count goes on
            self._rerender_health()

    def _host_health_changed(self, name: str) -> None:
        """A host became unreachable (or came back): its runs' rows say so now, not at the next refresh."""
        if self.is_running:
            self.call_later(self._rerender_health)

    def _rerender_health(self) -> None:
        # closing: the call_later queued by a health change still runs while shutdown prunes the tabs'
        # children (a JobsTab whose table is already gone raised NoMatches), so the same check as a round's
        if self._tabs_gone():
            return
        self.jobs_tab.rerender()
        self.instances_tab.rerender()

    async def _post_team(self) -> None:
        """Post a fresh read of the team view, one read at a time. Ticks overlap (``load_runs`` is
        not exclusive) and every host that answers asks for a read: while one is under way, a
        request only marks that another is due, and the reading worker does it once more when it
        is done. One read each would queue up without bound when reads take longer than the ticks
        (a large team store, several hosts), and every worker would wait for its own."""
        if self._team_reading:
            self._team_read_again = True
            return
        self._team_reading = True
        try:
            while True:
                self._team_read_again = False
                self.post_message(await self._read_team())
                if not self._team_read_again:
                    break
        finally:
            self._team_reading = False

    async def _read_team(self) -> RunsLoaded:
        view = await asyncio.to_thread(TeamLineage, self.workstation.store)
        runs = sorted(view.runs.values(), key=lambda r: r.id, reverse=True)
        return RunsLoaded(runs, view.errors, view)

    @work(exclusive=True, group="deployments", exit_on_error=False)
    async def load_deployments(self) -> None:
        deployments, errors = await asyncio.to_thread(self.workstation.store.records, Deployment.TABLE)
        deployments.sort(key=lambda d: d.id, reverse=True)
        tab = self.query_one(ModelsTab)
        if self.live:  # requests served so far, from each live server's own log (ours only: we can read them)
            async def served(d: Deployment) -> None:
                try:
                    t = await self.workstation.transport(d.instance)
                    res = await t.run(f"grep -c 'POST /predict' {shlex.quote(d.log_path)} 2>/dev/null || true", timeout=15)
                    count = int(res.text().strip() or 0)
                except (LabdeckError, ValueError):
                    count = None
                lat = sorted(self._model_latency.get(d.id, ()))
                tab.stats[d.id] = (count, lat[len(lat) // 2] if lat else None)

            await asyncio.gather(*(served(d) for d in deployments  # all at once: one slow host holds up no other
                                   if d.user == self.workstation.user and d.state == "healthy" and d.log_path))
        self.post_message(DeploymentsLoaded(deployments, errors))

    # ---- model servers --------------------------------------------------------
    def record_model_latency(self, deployment_id: str, ms: float) -> None:
        """A "try it" request's latency, by deployment (the newest 1,000: the p50 the Models tab shows)."""
        self._model_latency.setdefault(deployment_id, deque(maxlen=1000)).append(ms)

    def _ask_first(self, run: Run, title: str, plan: list[tuple[str, str]], yes_label: str, then) -> None:
        """Someone else's run: show what would happen (their files, run or loaded as you) and ask."""
        def answer(yes: bool | None) -> None:
            if yes:
                then()

        detail = "\n".join(f"{k}: {v}" for k, v in plan)
        self.push_screen(ConfirmScreen(title, detail, yes_label=yes_label), answer)

    def open_notebook(self, *, instance: str | None = None, run: Run | None = None) -> None:
        if run is not None and run.user != self.workstation.user:
            self._ask_first(run, f"Open {plain_line(run.user)}'s run {plain_line(run.display_name)} in Jupyter as you?",
                            use_plan(run, self.workstation.user, "notebook"), "Open",
                            lambda: self._open_notebook(instance, run))
            return
        self._open_notebook(instance, run)

    @work(group="notebook", exit_on_error=False)
    async def _open_notebook(self, instance: str | None, run: Run | None) -> None:
        from backends import notebooks

        where = run.display_name if run else instance
        self.notify(f"Starting Jupyter for {where}…", timeout=3)
        opened = await notebooks.start(self.workstation, instance=instance, run_ref=run,
                                       progress=lambda m: self.notify(m, timeout=3))
        self._forwards[opened.notebook.id] = opened.forward
        if self.live:
            self._follow_in_background()
        self.reload_runs()
        self.push_screen(InfoScreen(f"Jupyter on {opened.notebook.instance}",
                                    f"Open: {opened.url}\nFrom a laptop: {opened.ssh_line}\n  then open "
                                    f"http://127.0.0.1:{opened.forward.local_port}/?token={opened.token}\n\n"
                                    f"It shows in Jobs (x stops it) and stops by itself when idle."))

    @work(group="info", exit_on_error=False)
    async def show_run_info(self, run: Run) -> None:
        """Jobs `i`: a notebook's URL, token and ssh line (shown once when it started, here again);
        for a job, where it ran and what it ran."""
        from backends import notebooks

        if run.kind == "notebook":
            acc = await notebooks.access(self.workstation, run)
            here = self._forwards.get(acc.notebook.id)
            lines = acc.lines()
            if here is not None and acc.token:
                lines.insert(1, f"Open here: http://127.0.0.1:{here.local_port}/?token={acc.token}")
            self.push_screen(InfoScreen(f"Jupyter on {acc.notebook.instance}", "\n".join(lines)))
            return
        facts = [f"{run.display_name} · {run.id} · {run.user} · {run.state}"
                 + (f" ({run.state_reason})" if run.state_reason else ""),
                 f"on {run.instance} · run directory {run.run_dir or '–'}",
                 f"$ {run.command}"]
        if run.params:
            facts.append("params: " + ", ".join(f"{k}={v}" for k, v in list(run.params.items())[:30]))
        if run.parent:
            facts.append(f"parent: {run.parent}")
        self.push_screen(InfoScreen(f"Run {run.display_name}", "\n".join(facts)))

    def serve_run(self, run: Run, name: str | None = None) -> None:
        if run.user != self.workstation.user:
            self._ask_first(run, f"Serve {plain_line(run.user)}'s run {plain_line(run.display_name)} as you?",
                            use_plan(run, self.workstation.user, "serve"), "Serve", lambda: self._serve(run, name))
            return
        self._serve(run, name)

    @work(group="serve", exit_on_error=False)
    async def _serve(self, run: Run, name: str | None) -> None:
        from backends import serving

        self.notify(f"Deploying {run.display_name} on {run.instance}…", timeout=3)
        served = await serving.deploy(self.workstation, run, name=name,
                                      progress=lambda m: self.notify(m, timeout=2))
        d = served.deployment
        self._forwards[d.id] = served.forward
        self.model_urls[d.id] = d.url
        if self.live:
            self._follow_in_background()
        self.load_deployments()
        lines = [label.strip() + (" " if label.strip() else "") + text
                 for label, text in serving.usage_lines(served, detached=False, local=False)
                 if not text.startswith("forwarding; ctrl+c")]  # the CLI's words; here the forward lives with labdeck
        lines.append("labdeck's forward stays open while labdeck runs; the server keeps running after it "
                     "(Models → x stops it, t tries it).")
        self.push_screen(InfoScreen(f"{d.name} is up", "\n".join(lines)))

    async def _model_url(self, d: Deployment) -> str:
        if d.id not in self.model_urls:
            t = await self.workstation.transport(d.instance)
            fwd = await t.forward_port(int(d.port))
            self._forwards[d.id] = fwd
            self.model_urls[d.id] = f"http://127.0.0.1:{fwd.local_port}"
        return self.model_urls[d.id]

    def try_model(self, d: Deployment) -> None:
        self._try_model(d)

    @work(group="serve", exit_on_error=False)
    async def _try_model(self, d: Deployment) -> None:
        from backends import serving

        if d.state != "healthy":
            self.notify(f"{d.name} is {d.state}.", severity="warning")
            return
        url = await self._model_url(d)
        from backends.modelshape import example_body

        key = serving.api_key(self.workstation, d.id) if d.user == self.workstation.user else None
        width = None
        run = next((r for r in self.runs if r.id == d.run_id), None)
        if run is not None and run.user == d.user and run.run_dir and d.model.endswith(".npz") and "/" not in d.model:
            # the model's real input width, read from its file's header (nothing loaded); unknown: the server's
            # answer to a one-feature row says what it expects
            width = await serving.model_input_width(await self.workstation.transport(d.instance),
                                                    f"{run.run_dir}/{d.model}")
        body = example_body(width) or '{"x": [[0.0]]}'
        self.push_screen(TryModelScreen(d.name, url, key, body, d.id))

    def open_model_log(self, d: Deployment) -> None:
        self._open_model_log(d)

    @work(group="serve", exit_on_error=False)
    async def _open_model_log(self, d: Deployment) -> None:
        from backends.follow import mirror
        from backends.localfiles import run_cache_path

        # the deployment record may be a teammate's: its user and id are checked and the path confined
        local = run_cache_path(self.workstation.config.paths.cache_dir / "serve-logs", d.user, d.id, ".log")
        t = await self.workstation.transport(d.instance)
        await mirror(t, d.log_path, local)
        self.push_screen(LogScreen(d.id, f"model server {d.name} · {d.instance}:{d.port}", path=local))

    def confirm_stop_model(self, d: Deployment) -> None:
        from backends import serving

        try:  # a teammate's, or one already stopped: said at once, not after a "Stop?" that can do nothing
            serving.check_stoppable(self.workstation, d)
        except LabdeckError as e:
            self.show_error(e)
            return

        def answer(yes: bool | None) -> None:
            if yes:
                self._stop_model(d)

        self.push_screen(ConfirmScreen(f"Stop the model server {d.name}?",
                                       f"on {d.instance}:{d.port} · its whole process group", yes_label="Stop"), answer)

    @work(group="serve", exit_on_error=False)
    async def _stop_model(self, d: Deployment) -> None:
        from backends import serving

        await serving.stop(self.workstation, d.id)
        fwd = self._forwards.pop(d.id, None)
        if fwd:
            await fwd.close()
        self.model_urls.pop(d.id, None)
        self.notify(f"Stopped {d.name}.")
        self.load_deployments()

    def redeploy_model(self, d: Deployment) -> None:
        def answer(ref: str | None) -> None:
            if ref:
                self._redeploy(d, ref)

        self.push_screen(TextPrompt(f"Serve which run as {d.name}? (id, suffix or name)", "e.g. a1b2c3d4"), answer)

    @work(group="serve", exit_on_error=False)
    async def _redeploy(self, d: Deployment, ref: str) -> None:
        from backends import serving

        run = self.workstation.store.find_run(ref)
        if d.state in ("starting", "healthy"):
            await serving.stop(self.workstation, d.id)
        self.serve_run(run, name=d.name)

    @work(exclusive=True, group="monitor", exit_on_error=False)
    async def poll_monitor(self) -> None:
        """Agents' samples for the shown instance and every instance running our jobs; metric
        points of the overlaid runs that no follower brings in (finished ones)."""
        mon = self.workstation.monitor
        tab = self.query_one(MonitorTab)
        me = self.workstation.user
        names = {tab.instance} | {r.instance for r in self.runs if r.user == me and r.state == "running"}
        for name in sorted(names):
            try:
                if self.live:
                    await mon.poll_instance(name)
                else:
                    mon.instance(name).ingest()
            except LabdeckError as e:
                if name == tab.instance:
                    log.info("monitor: %s: %s", name, e)
        by_id = {r.id: r for r in self.runs}
        followed = self.workstation.follower.tasks
        for run_id in tab.selected:
            run = by_id.get(run_id)
            if run is None:
                continue
            task = followed.get(run_id)
            if self.live and (task is None or task.done()):
                try:
                    await self.workstation.follower.sync(run)
                except LabdeckError:
                    mon.run(run).update()
            else:
                mon.run(run).update()
        self.post_message(MonitorUpdated(mon.idle_runs()))

    @work(group="launch", exit_on_error=False)
    async def run_example(self) -> None:
        self.notify("Starting the bundled example on local…", timeout=3)
        run = await self.workstation.launch_example()
        self.post_message(RunLaunched(run))

    @work(group="cancel", exit_on_error=False)
    async def cancel_run(self, run: Run) -> None:
        done = await self.workstation.cancel(run.id)
        self.notify(f"Cancelled {done.display_name}.")
        self.reload_runs()

    # ---- messages --------------------------------------------------------
    _BACKEND_ROUNDS = (InstancesLoaded, RunsLoaded, DeploymentsLoaded, MonitorUpdated)

    def _tabs_gone(self) -> bool:
        """True once the app is shutting down: from then on its tabs are being removed, one screen
        child at a time, so a round's handler could find some tabs and not others (NoMatches)."""
        return not self.is_running or not self.query(TabbedContent) or not self.query(ModelsTab)

    def check_message_enabled(self, message) -> bool:
        """A backend round that ends while the app is closing (its tabs already gone) is dropped,
        not shown on a screen that no longer has them (NoMatches at exit)."""
        if isinstance(message, self._BACKEND_ROUNDS) and self._tabs_gone():
            return False
        return super().check_message_enabled(message)

    async def _on_message(self, message) -> None:
        """The same check when a round is handled: one posted just before shutdown began is still in
        the queue when the screens are pruned (CI saw DeploymentsLoaded reach a screen with no
        ModelsTab). Checking at post time alone cannot close that window."""
        if isinstance(message, self._BACKEND_ROUNDS) and self._tabs_gone():
            return
        await super()._on_message(message)

    def on_instances_loaded(self, message: InstancesLoaded) -> None:
        self.instances_tab.show_instances(message.listing)
        if message.partial:
            return
        self.query_one(MonitorTab).show_instances([i.name for i in message.listing.instances if i.state == "running"])

    def on_runs_loaded(self, message: RunsLoaded) -> None:
        if self.live:  # re-attach: follow every active run of ours from the byte its local copy ends at
            me = self.workstation.user
            mine = [r for r in message.runs if r.user == me and r.run_dir and (r.run_state.is_active or r.state == "lost")]
            if any(r.run_state.is_active for r in mine):
                self._follow_in_background()
            for run in mine:  # (where the background follower follows one, this attaches to what it writes)
                self.workstation.follower.start(run)
        self.runs = message.runs
        self.jobs_tab.show_runs(message.runs, message.errors)
        self.query_one(MonitorTab).show_runs(message.runs, self.idle)
        self.query_one(LineageTab).show_lineage(message.view)
        self.instances_tab.show_runs(message.runs)

    def on_deployments_loaded(self, message: DeploymentsLoaded) -> None:
        self.query_one(ModelsTab).show_deployments(message.deployments)
        self.query_one(LineageTab).show_served({d.run_id for d in message.deployments if d.state in ("starting", "healthy")})

    def on_monitor_updated(self, message: MonitorUpdated) -> None:
        changed = message.idle != self.idle
        self.idle = message.idle
        tab = self.query_one(MonitorTab)
        tab.idle = message.idle
        if tab.is_active_tab:
            tab.rerender()
        if changed:
            self.jobs_tab.rerender()

    def on_run_launched(self, message: RunLaunched) -> None:
        run = message.run
        what = "Started" if run.state == "running" else "Queued"
        self.notify(f"{what} {run.display_name} on {run.instance}. Press {self.key_of('app.tab.jobs')} for Jobs.")
        if self.live:
            self._follow_in_background()
            self.workstation.follower.start(run)
        self.reload_runs()

    def _follow_in_background(self) -> None:
        """Your background follower keeps your runs current after this TUI closes (a lock test when it runs)."""
        from backends import daemon

        daemon.ensure_running(self.workstation.config.paths)

    @on(Worker.StateChanged)
    def worker_failed(self, event: Worker.StateChanged) -> None:
        if event.state == WorkerState.ERROR and event.worker.error is not None:
            if isinstance(event.worker.error, NoMatches) and self._tabs_gone():
                return  # a refresh that found its tab already pruned at exit: nothing failed, nothing to show
            self.show_error(event.worker.error)

    # ---- the one error path --------------------------------------------
    def show_error(self, error: BaseException) -> None:
        if isinstance(error, StoreCorruptError):
            self.offer_move_aside(error)
            return
        if not isinstance(error, LabdeckError):
            log.error("unexpected error\n%s", "".join(traceback.format_exception(error)))
        self.notify(error_text(error), title="labdeck", severity="error", timeout=8)

    def offer_move_aside(self, error: StoreCorruptError) -> None:
        path = str(error.path)
        if path in self._asked_move_aside:
            return
        self._asked_move_aside.add(path)

        def answer(yes: bool | None) -> None:
            if yes:
                try:
                    target = move_aside(path)
                except (OSError, LabdeckError) as e:
                    self.notify(f"Could not move {path} aside: {e}", severity="error")
                    return
                self.notify(f"Moved the corrupt store to {target}; a fresh store starts now.")
                self._asked_move_aside.discard(path)
                self._runs_shown = False
                self.load_runs()

        self.push_screen(ConfirmScreen(f"Your store file {path} is corrupt.",
                                       f"{error.message}\n\nMove it aside? It is renamed, not deleted: "
                                       "nothing in it is lost, and a fresh store starts.", yes_label="Move aside"), answer)

    def _handle_exception(self, error: Exception) -> None:
        # Tests (headless) keep Textual's behaviour so bugs fail loudly. A person
        # never gets a traceback: before the first frame the CLI prints one line;
        # after it, the error becomes a notification and goes to the log file.
        if self.is_headless or not self._first_frame_done:
            if not self.is_headless:
                self.startup_error = error
                log.error("error while starting\n%s", "".join(traceback.format_exception(error)))
                self.exit(return_code=1)
                return
            super()._handle_exception(error)
            return
        self.show_error(error)

    # ---- actions -----------------------------------------------------------
    def action_switch_tab(self, tab_id: str) -> None:
        self.query_one(TabbedContent).active = tab_id
        self.active_tab().focus_main()

    def action_cycle_tab(self, step: int) -> None:
        ids = list(self.TAB_TITLES)
        current = ids.index(self.query_one(TabbedContent).active)
        self.action_switch_tab(ids[(current + step) % len(ids)])

    @on(TabbedContent.TabActivated)
    def tab_activated(self, event: TabbedContent.TabActivated) -> None:
        bar = self.query_one(FilterBar)
        bar.display = False
        tab = self.active_tab()
        tab.shown()
        tab.focus_main()

    def action_run_example(self) -> None:
        self.run_example()

    def reload_runs(self) -> None:
        """Reload runs from the store even if no instance reports a change."""
        self._runs_stale = True
        self.load_runs()

    def action_refresh(self) -> None:
        self.load_instances()
        self.reload_runs()
        self.load_deployments()
        self.notify("Refreshing…", timeout=1.5)

    def action_help(self) -> None:
        tab = self.active_tab()
        keymap = getattr(self, "_keymap", {})

        def rows(bindings):
            for b in bindings:
                if isinstance(b, Binding):
                    key = keymap.get(b.id, b.key) if b.id else b.key
                    yield (", ".join(self.get_key_display(Binding(k, b.action)) for k in key.split(",")),
                           b.tooltip or b.description, b.id or "")

        sections = []
        log_open = isinstance(self.screen, LogScreen)
        if log_open:  # the log's own keys first (wrap, sideways scroll, search)
            from .logview import LogView

            sections.append(("Log", list(rows(LogScreen.BINDINGS)) + list(rows(b for b in LogView.BINDINGS if b.id))))
        elif tab.BINDINGS or tab.HELP_NOTES:
            sections.append((f"{tab.TITLE} tab", list(rows(tab.BINDINGS)) + [(k, d, "") for k, d in tab.HELP_NOTES]))
        if tab.query(SortTable) and not log_open:
            sections.append(("The table", list(rows(SortTable.BINDINGS))))
        sections.append(("Everywhere", list(rows(self.BINDINGS)) + [("ctrl+p", "Command palette", "")]))
        self.push_screen(HelpScreen(f"Keys · {'the log' if log_open else tab.TITLE}", sections,
                                    notes="" if log_open else tab.HELP_TEXT))

    def action_filter(self) -> None:
        bar = self.query_one(FilterBar)
        self.query_one(CommandBar).display = False
        bar.value = self.active_tab().filter_text
        bar.placeholder = f"/filter: {self.active_tab().FILTER_HINT} (enter keeps it, escape clears)"
        bar.display = True
        bar.focus()

    def action_command(self) -> None:
        bar = self.query_one(CommandBar)
        self.query_one(FilterBar).display = False
        bar.value = ""
        bar.display = True
        bar.focus()

    @on(FilterBar.Changed, "#filter-bar")
    def filter_changed(self, event: FilterBar.Changed) -> None:
        if not isinstance(event, LineInput.Left):
            self.active_tab().apply_filter(event.value)

    @on(FilterBar.Submitted, "#filter-bar")
    def filter_done(self, event: FilterBar.Submitted) -> None:
        event.input.display = False
        self.active_tab().focus_main()

    @on(LineInput.Left)
    def bar_left(self, event: LineInput.Left) -> None:
        event.stop()
        event.input.display = False
        if event.input.id == "filter-bar":
            self.active_tab().apply_filter("")
        self.active_tab().focus_main()

    @on(CommandBar.Submitted, "#command-bar")
    def command_submitted(self, event: CommandBar.Submitted) -> None:
        event.input.display = False
        self.run_command(event.value)

    def run_command(self, text: str) -> None:
        """k9s-style commands: :jobs, :lineage, :q, … (a unique prefix is enough)."""
        cmd = text.strip().lstrip(":").strip().lower()
        if not cmd:
            self.active_tab().focus_main()
            return
        aliases = {"q": "quit", "q!": "quit", "i": "instances", "j": "jobs", "m": "monitor", "l": "lineage",
                   "runs": "jobs", "ps": "jobs", "?": "help", "example": "run-example"}
        names = CommandBar.COMMANDS
        cmd = aliases.get(cmd, cmd)
        candidates = [n for n in names if n.startswith(cmd)]
        if cmd in names:
            candidates = [cmd]
        if len(candidates) != 1:
            self.notify(f"Unknown command :{text.strip()}" + (f" (did you mean {', '.join(':' + c for c in candidates)}?)" if candidates
                        else " (try :jobs, :lineage, :monitor, :models, :instances, :run-example, :help, :q)"),
                        severity="error")
            self.active_tab().focus_main()
            return
        cmd = candidates[0]
        if cmd in self.TAB_TITLES:
            self.action_switch_tab(cmd)
        elif cmd in ("q", "quit"):
            self.exit()
        elif cmd == "help":
            self.action_help()
        elif cmd == "refresh":
            self.action_refresh()
        elif cmd == "run-example":
            self.action_run_example()
        elif cmd == "config":
            self.notify(f"Settings file: {self.workstation.config.file} · `labdeck config` prints every value and its source.")
        self.active_tab().focus_main() if cmd not in ("help", "q", "quit") else None

    # ---- intents from tabs -------------------------------------------------
    def open_log(self, run: Run) -> None:
        self.show_log(run)

    @work(group="log-open", exit_on_error=False)
    async def show_log(self, run: Run) -> None:
        """Open the run's local log copy, fetching what is missing first; active runs keep following."""
        follower = self.workstation.follower
        try:
            await follower.catch_up(run)
        except LabdeckError as e:
            if not follower.local_path(run).exists():
                raise
            self.notify(f"Showing the log as far as it was fetched: {e}", severity="warning")
        if run.run_state.is_active and run.user == self.workstation.user:
            follower.start(run)
        path = follower.local_path(run)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(exist_ok=True)
        from backends.notebooks import shown_command

        self.push_screen(LogScreen(run.id, f"{run.display_name} · {run.state} · {run.instance} · {shown_command(run)}",
                                   path=path))

    def ask_annotation(self, run: Run, kind: str) -> None:
        """A note or tag on any run; it goes into the current user's own store."""

        def answer(text: str | None) -> None:
            if text:
                try:
                    annotate(self.workstation.store, run.id, kind, text)
                except LabdeckError as e:
                    self.show_error(e)
                    return
                self.notify(f"{'Noted' if kind == 'note' else 'Tagged'} {run.display_name}.")
                self.reload_runs()

        title = f"Note on {run.display_name} (by {self.workstation.user})" if kind == "note" else f"Tag {run.display_name}"
        self.push_screen(TextPrompt(title, "what you learned from this run" if kind == "note" else "best"), answer)

    def show_in_jobs(self, run: Run) -> None:
        self.action_switch_tab("jobs")
        table = self.jobs_tab.query_one(DataTable)
        keys = [k.value for k in table.rows]
        if run.id in keys:
            table.move_cursor(row=keys.index(run.id), animate=False)
        else:
            self.notify(f"{run.display_name} is not among the rows shown in Jobs (use / to find it).", severity="warning")

    def show_in_monitor(self, run: Run) -> None:
        tab = self.query_one(MonitorTab)
        tab.selected = [run.id] + ([run.parent] if run.parent else [])
        self.action_switch_tab("monitor")
        self.poll_monitor()

    # ---- live refresh when teammates' runs change ---------------------------
    def _watch_team_dir(self) -> None:
        """watchdog on the team directory: a teammate's (or another process's) commit reloads runs."""
        try:
            from watchdog.events import FileSystemEventHandler
            from watchdog.observers import Observer
        except ImportError:
            return
        app = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event) -> None:
                path = str(getattr(event, "dest_path", "") or event.src_path)
                if path.endswith((".jsonl", ".json")) and "/." not in path and not event.is_directory:
                    app.call_from_thread(app._team_changed)

        try:
            observer = Observer()
            observer.schedule(Handler(), str(self.workstation.config.team_dir), recursive=True)
            observer.daemon = True
            observer.start()
            self._observer = observer
        except OSError as e:
            log.info("not watching the team directory: %s", e)

    def _team_changed(self) -> None:
        if self._reload_timer is None:  # a burst of commits reloads once
            self._reload_timer = self.set_timer(0.3, self._reload_after_change)

    def _reload_after_change(self) -> None:
        self._reload_timer = None
        self.reload_runs()

    def open_launch_form(self, **defaults) -> None:
        instances = [i.name for i in self.instances_tab.listing.instances if i.state == "running"] or ["local"]

        def answer(req: LaunchRequest | None) -> None:
            if req is not None:
                self.launch(req)

        self.push_screen(LaunchScreen(instances, **defaults), answer)

    @work(group="launch", exit_on_error=False)
    async def launch(self, req: LaunchRequest) -> None:
        last = [0.0]

        def progress(phase: str, done: int, total: int) -> None:
            now = time.monotonic()
            if phase == "uploading" and total and now - last[0] > 0.5:
                last[0] = now
                self.notify(f"Syncing code to {req.instance}: {done / 1e6:.1f} / {total / 1e6:.1f} MB", timeout=2)

        self.notify(f"Starting on {req.instance}…", timeout=2)
        run = await self.workstation.launch(req.command, instance=req.instance, workdir=req.workdir, env=req.env,
                                            name=req.name, sync_code=req.sync_code, progress=progress, secrets=req.secrets)
        self.post_message(RunLaunched(run))

    def _not_a_notebook(self, run: Run) -> bool:
        """A notebook's record is rerun by nobody (its command is labdeck's Jupyter plumbing): say so."""
        if run.kind != "notebook":
            return False
        try:
            self.workstation.rerun_plan(run)
        except LabdeckError as e:
            self.show_error(e)
        return True

    def rerun(self, run: Run) -> None:
        """Your own run reruns at once; someone else's shows what would run, where and from which code, and asks:
        the command, its environment and its code were written by them, and would run as you."""
        if self._not_a_notebook(run):
            return
        if run.user == self.workstation.user:
            self._rerun(run)
            return

        self._ask_first(run, f"Rerun {plain_line(run.user)}'s run {plain_line(run.display_name)} as you?",
                        rerun_plan(run, self.workstation.user), "Rerun", lambda: self._rerun(run))

    def rerun_with_changes(self, run: Run) -> None:
        """`R`: the run's command, instance, environment and parameters in a form; what is started is a child of
        the run (kind "rerun") whose changed parameters lineage shows. Someone else's run is still shown and
        asked about first, with the command and environment that would run."""
        from .rerunform import RerunRequest, RerunScreen

        if self._not_a_notebook(run):
            return

        instances = [i.name for i in self.instances_tab.listing.instances if i.state == "running"]

        def answer(req: RerunRequest | None) -> None:
            if req is None:
                return
            if run.user == self.workstation.user:
                self._rerun(run, req)
                return
            try:
                plan = self.workstation.rerun_plan(run, command=req.command, env=req.env, sets=req.sets)
            except LabdeckError as e:
                self.show_error(e)
                return
            self._ask_first(run, f"Rerun {plain_line(run.user)}'s run {plain_line(run.display_name)} as you, with changes?",
                            rerun_plan(run, self.workstation.user, command=plan.command, env=plan.env), "Rerun",
                            lambda: self._rerun(run, req))

        self.push_screen(RerunScreen(run, instances, self.workstation.rerun_plan), answer)

    @work(group="launch", exit_on_error=False)
    async def _rerun(self, run: Run, req=None) -> None:
        where = req.instance if req is not None else run.instance
        self.notify(f"Rerunning {run.display_name} on {where}…", timeout=2)
        if req is None:
            new = await self.workstation.rerun(run)  # the record shown is the one that runs
        else:
            new = await self.workstation.rerun(run, command=req.command, instance=req.instance, env=req.env,
                                               name=req.name, sets=req.sets)
        self.post_message(RunLaunched(new))

    # ---- clouds ------------------------------------------------------------
    def open_up_form(self) -> None:
        from backends import clouds

        from .forms import UpScreen

        ws = self.workstation
        provs = clouds.cloud_providers(ws)
        if not provs:
            self.notify('No cloud provider is configured: add one, e.g. [providers.aws] type = "ec2" '
                        f"in {ws.config.file}.", severity="warning", timeout=10)
            return
        sp = clouds.current_spend(ws, now=clock.now())
        daily = float(ws.config.get("budget", "daily_usd"))
        line = (f"Today you spent ${sp.today_user:.2f}" + (f" of your ${daily:.2f} budget" if daily else "")
                + f"; you burn ${sp.burn_user:.2f}/h now.")

        def answer(req) -> None:
            if req is not None:
                self.cloud_up(req)

        self.push_screen(UpScreen(provs, budget_line=line, taken={i.name for i in self.instances_tab.listing.instances}),
                         answer)

    @work(group="cloud-up", exit_on_error=False)
    async def cloud_up(self, req) -> None:
        from backends import clouds

        tab = self.instances_tab

        def say(stage: str, detail: str) -> None:
            tab.show_progress(f"⏳ {req.name}: {stage} · {detail}")
            if stage in ("budget",):
                self.notify(detail, severity="warning", timeout=10)

        try:
            inst = await clouds.up(self.workstation, req.provider, req.name, size=req.size, image=req.image,
                                   spot=req.spot, autostop_minutes=req.autostop_minutes,
                                   autostop_action=req.autostop_action, progress=say)
        finally:
            tab.show_progress("")
        self.notify(f"{inst.name} is up at {inst.host} ({inst.size}, ${inst.price_per_hour:.3f}/h).", timeout=8)
        self.load_instances()

    def ask_autostop(self, inst) -> None:
        def answer(text: str | None) -> None:
            if text is None:
                return
            try:
                minutes = float(text)
                if minutes < 0:
                    raise ValueError
            except ValueError:
                self.notify(f"Autostop: {text!r} is not a number of minutes.", severity="warning")
                return
            self.cloud_autostop(inst.name, minutes)

        self.push_screen(TextPrompt(f"Autostop {inst.name} after how many idle minutes? (0 = off; now: {inst.autostop or '?'})",
                                    "e.g. 30"), answer)

    @work(group="cloud-autostop", exit_on_error=False)
    async def cloud_autostop(self, name: str, minutes: float) -> None:
        from backends import clouds

        await clouds.set_autostop(self.workstation, name, minutes)
        self.notify(f"{name}: autostop " + (f"after {minutes:g} idle minutes." if minutes else "off."))
        self.load_instances()

    def confirm_lifecycle(self, verb: str, inst) -> None:
        from backends import clouds

        owner = f" It was launched by {inst.created_by}." if inst.created_by and inst.created_by != self.workstation.user else ""
        force = not inst.managed
        if verb == "start":
            if force:
                self.notify(f"{inst.name} was not launched by labdeck: start it with `labdeck start --force`.",
                            severity="warning")
                return
            self.cloud_lifecycle(verb, inst.name, False)
            return

        def answer(yes: bool | None) -> None:
            if yes:
                self.cloud_lifecycle(verb, inst.name, force)

        detail = (f"{inst.size} · {inst.gpu_summary} · ${inst.price_per_hour:.3f}/h · {inst.provider}.{owner}"
                  + (" It was NOT launched by labdeck." if force else "")
                  + (" Its disk is deleted." if verb == "terminate" else " Its disk is kept.")
                  + (f" {inst.provider_type} bills a stopped machine: terminate it to stop paying."
                     if verb == "stop" and inst.provider_type in clouds.BILLS_WHEN_STOPPED else ""))
        self.push_screen(ConfirmScreen(f"{verb.capitalize()} {inst.name}?", detail, yes_label=verb.capitalize()), answer)

    @work(group="cloud-lifecycle", exit_on_error=False)
    async def cloud_lifecycle(self, verb: str, name: str, force: bool) -> None:
        from backends import clouds

        self.instances_tab.show_progress(f"⏳ {verb} {name}…")
        try:
            fn = {"stop": clouds.stop, "start": clouds.start, "terminate": clouds.terminate}[verb]
            await fn(self.workstation, name, force=force)
        finally:
            self.instances_tab.show_progress("")
        self.notify(f"{name}: {verb} done.")
        self.load_instances()

    def confirm_cancel(self, run: Run) -> None:
        if run.user != self.workstation.user:
            self.notify(f"{run.display_name} belongs to {run.user}; only its owner can cancel it.", severity="warning")
            return
        if not (run.run_state.is_active or run.state == "lost"):
            from backends.jobs import already_ended

            self.notify(f"{run.display_name} {already_ended(run.state)}: there is nothing to cancel.", severity="warning")
            return

        def answer(yes: bool | None) -> None:
            if yes:
                self.cancel_run(run)

        from backends.notebooks import shown_command

        self.push_screen(ConfirmScreen(f"Cancel run {run.display_name}?",
                                       f"{shown_command(run)}\non {run.instance} · SIGTERM to its process group, SIGKILL after "
                                       f"{self.workstation.config.get('jobs', 'cancel_grace_seconds'):g}s",
                                       yes_label="Cancel run"), answer)


def all_binding_ids() -> set[str]:
    """Every remappable binding id (for checking the config's [keys] table)."""
    from .widgets import ConfirmScreen, HelpScreen, LineInput, LogScreen

    ids = set()
    from .forms import UpScreen
    from .widgets import CompareScreen

    from .logview import LogView
    from .mediaview import MediaScreen
    from .rerunform import RerunScreen

    for cls in (LabdeckApp, *TAB_CLASSES, ConfirmScreen, HelpScreen, LineInput, LogScreen, LogView, LaunchScreen, TextPrompt,
                CompareScreen, TryModelScreen, InfoScreen, UpScreen, SortTable, RerunScreen, MediaScreen):
        for b in cls.BINDINGS:
            if isinstance(b, Binding) and b.id:
                ids.add(b.id)
    return ids
