"""The `labdeck` command. With no subcommand it opens the workstation.

Every error a user can cause (config, store, provider, transport) is printed as
one message plus what to do, with no traceback; unexpected errors print one
line and leave the traceback in the log file.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
import traceback
from datetime import datetime, timezone
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table
from rich.markup import escape
from rich.text import Text

from backends.config import load_config
from backends.errors import LabdeckError
from backends.paths import Paths
from backends.store import move_aside
from backends.workstation import Workstation

from .format import STATE_STYLE, duration, money, short_id, since

console = Console()
err_console = Console(stderr=True)


def _log_file(paths: Paths) -> Path:
    return paths.log_dir / "labdeck.log"


def _setup_logging(paths: Paths) -> None:
    try:
        paths.log_dir.mkdir(parents=True, exist_ok=True)
        handler: logging.Handler = logging.FileHandler(_log_file(paths))
    except OSError:
        handler = logging.NullHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("labdeck")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def fit_table(t: Table, cols: tuple[str, ...], rows: list[tuple[str, ...]], flexible: set[str]) -> Table:
    """Columns not in ``flexible`` keep their full width; the flexible ones fold to fit the terminal."""
    for n, col in enumerate(cols):
        width = max([len(col)] + [len(Text.from_markup(r[n]).plain) for r in rows])
        t.add_column(col, min_width=None if col in flexible else width, overflow="fold")
    for r in rows:
        t.add_row(*r)
    return t


def friendly(fn):
    """Run a command; turn errors into a message and exit code 1 instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LabdeckError as e:
            err_console.print(f"[bold red]error:[/] {e.message}", highlight=False, markup=True)
            if e.hint:
                err_console.print(f"[dim]{e.hint}[/]", highlight=False)
            sys.exit(1)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, SystemExit, KeyboardInterrupt):
            raise
        except Exception as e:  # a bug: one line for the user, the traceback for us
            paths = Paths.resolve()
            logging.getLogger("labdeck").error("unexpected error\n%s", traceback.format_exc())
            err_console.print(f"[bold red]unexpected error:[/] {type(e).__name__}: {e}", highlight=False)
            err_console.print(f"[dim]Details are in {_log_file(paths)}. Please report it.[/]", highlight=False)
            sys.exit(2)

    return wrapper


def _workstation() -> Workstation:
    paths = Paths.resolve()
    _setup_logging(paths)
    return Workstation(load_config(paths))


def _check_keys(ws: Workstation) -> None:
    from .app import all_binding_ids

    known = all_binding_ids()
    for binding_id in ws.config.keys:
        if binding_id not in known:
            raise ws.config.error_at(("keys",), binding_id, f"no key binding has this id (known: {', '.join(sorted(known))})")


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="labdeck")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """labdeck: a keyboard-first workstation for training models on GPUs.

    Run with no command to open the workstation (tabs: Instances, Jobs,
    Monitor, Lineage, Models). LABDECK_HOME moves every file labdeck uses.
    """
    if ctx.invoked_subcommand is None:
        open_tui()


@friendly
def open_tui() -> None:
    from .app import LabdeckApp

    ws = _workstation()
    _check_keys(ws)
    app = LabdeckApp(ws)
    app.run()
    if app.startup_error is not None:
        e = app.startup_error
        msg = e.render() if isinstance(e, LabdeckError) else f"{type(e).__name__}: {e}"
        err_console.print(f"[bold red]error:[/] {msg}", highlight=False)
        err_console.print(f"[dim]Details are in {_log_file(ws.config.paths)}.[/]", highlight=False)
        sys.exit(1)


@cli.command("ls")
@friendly
def ls_cmd() -> None:
    """List the instances of every configured provider."""
    ws = _workstation()
    listing = asyncio.run(ws.list_instances())
    now = datetime.now(timezone.utc)
    t = Table(title="instances", title_justify="left")
    rows = []
    for i in listing.instances:
        rows.append((i.name, i.provider, f"[{STATE_STYLE.get(i.state, '')}]{i.state}[/]",
                  f"{i.latency_ms:.0f} ms" if i.latency_ms is not None else "–", i.size_summary if i.vcpus else "–",
                  i.gpu_summary, money(i.price_per_hour), since(i.started_at, now) if i.state == "running" else "–", i.host))
    cols = ("name", "provider", "state", "ping", "size", "GPUs", "$/hr", "uptime", "host")
    if console.width < 110:  # a narrow terminal: the address is the column to give up
        cols, rows = cols[:-1], [r[:-1] for r in rows]
    console.print(fit_table(t, cols, rows, flexible={"size", "GPUs", "host"}))
    for e in listing.errors.values():
        err_console.print(f"[bold red]⚠[/] {e}", highlight=False)
    for i in listing.instances:
        if i.state == "unreachable":
            err_console.print(f"[bold red]⚠[/] {i.name}: {i.note}", highlight=False)
    if listing.errors:
        sys.exit(1)


@cli.command("config")
@friendly
def config_cmd() -> None:
    """Print the effective configuration and where each value came from."""
    paths = Paths.resolve()
    cfg = load_config(paths)
    t = Table(title=f"labdeck configuration ({cfg.file})", title_justify="left")
    t.add_column("key", style="bold", no_wrap=True)
    t.add_column("value", overflow="fold")
    t.add_column("from", style="dim", overflow="fold")
    for key, value, source in cfg.explain():
        t.add_row(key, value, source)
    console.print(t)


@cli.group("store")
def store_group() -> None:
    """Look after the store files."""


@store_group.command("move-aside")
@click.argument("path", type=click.Path(dir_okay=False))
@friendly
def store_move_aside(path: str) -> None:
    """Rename a corrupt store file (nothing is deleted) so a fresh store can start."""
    target = move_aside(path)
    console.print(f"Moved {path} to {target}. labdeck starts a fresh store; the old file is kept for recovery.")


@cli.command("run", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--on", "instance", default="local", show_default=True, help="Instance to run on")
@click.option("--name", default="", help="A name for the run")
@click.option("--parent", default=None, help="The run this one derives from (id, prefix or name)")
@click.option("--workdir", default=None, help="Working directory on the instance (default: here)")
@click.option("--env", "envs", multiple=True, metavar="KEY=VALUE", help="Environment variable for the job (repeatable)")
@click.option("--no-sync", is_flag=True, help="Run in --workdir as it is on the instance (no code snapshot)")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@friendly
def run_cmd(instance: str, name: str, parent: str | None, workdir: str | None, envs: tuple[str, ...], no_sync: bool,
            command: tuple[str, ...]) -> None:
    """Run COMMAND detached on an instance:  labdeck run -- python train.py --lr 3e-4

    The code around the working directory (its git repository, or the directory) is
    snapshotted, synced to the instance (only what changed travels) and copied for the
    run; the job survives this command, the connection and the jump host."""
    import shlex

    env = {}
    for item in envs:
        if "=" not in item:
            raise LabdeckError(f"--env {item!r} is not KEY=VALUE.")
        k, v = item.split("=", 1)
        env[k] = v
    ws = _workstation()
    cmd = command[0] if len(command) == 1 else shlex.join(command)
    def progress(phase: str, done: int, total: int) -> None:
        if phase == "uploading" and total and sys.stderr.isatty():
            err_console.print(f"syncing code: {done / 1e6:.1f} / {total / 1e6:.1f} MB", end="\r", highlight=False)

    run = asyncio.run(ws.launch(cmd, instance=instance, workdir=workdir, env=env, name=name, parent=parent,
                                sync_code=not no_sync, progress=progress))
    if run.code:
        c = run.code
        console.print(f"code: {c['files']} files"
                      + (f" at {c['commit'][:10]}{' + uncommitted changes' if c['dirty'] else ''}" if c.get("commit") else "")
                      + f"; {c.get('synced_files', 0)} sent ({c.get('synced_bytes', 0) / 1e6:.2f} MB)", highlight=False)
    verb = "started" if run.state == "running" else "queued"
    console.print(f"{verb} [bold]{run.id}[/] ({run.display_name}) on {run.instance}, pid {run.pid}")
    console.print(f"[dim]labdeck logs {short_id(run.id)} -f   ·   labdeck cancel {short_id(run.id)}[/]")


@cli.command("example")
@friendly
def example_cmd() -> None:
    """Run the bundled example project (numpy training) on local."""
    ws = _workstation()
    run = asyncio.run(ws.launch_example())
    console.print(f"started [bold]{run.id}[/] ({run.display_name}) on {run.instance}, pid {run.pid}")


@cli.command("ps")
@click.option("--all", "-a", "show_all", is_flag=True, help="Include finished runs")
@click.option("--mine", is_flag=True, help="Only your runs")
@friendly
def ps_cmd(show_all: bool, mine: bool) -> None:
    """List runs (active ones unless --all)."""
    ws = _workstation()
    asyncio.run(ws.refresh_runs())
    runs, errors = ws.store.runs(team=not mine)
    if not show_all:
        runs = [r for r in runs if r.run_state.is_active or r.state == "lost"]
    t = Table(title_justify="left", title=f"{len(runs)} runs" + ("" if show_all else " active (--all for every run)"))
    rows = [(short_id(r.id), r.display_name, f"[{STATE_STYLE.get(r.state, '')}]{r.state}[/]", r.instance, r.user,
             duration(r.duration_seconds()), escape(r.last_line[:100])) for r in runs]
    console.print(fit_table(t, ("run", "name", "state", "instance", "user", "duration", "last line"), rows,
                            flexible={"name", "last line"}))
    for user, e in errors.items():
        err_console.print(f"[bold red]⚠[/] {user}'s store is unreadable: {e}", highlight=False)


@cli.command("cancel")
@click.argument("run")
@click.option("--yes", "-y", is_flag=True, help="Do not ask")
@friendly
def cancel_cmd(run: str, yes: bool) -> None:
    """Cancel a run: SIGTERM its process group, SIGKILL after the grace period."""
    ws = _workstation()
    r = ws.store.find_run(run)
    if not yes:
        if not sys.stdin.isatty():
            raise LabdeckError(f"Cancelling {r.display_name} needs confirmation.", "Run it in a terminal, or pass --yes.")
        click.confirm(f"Cancel run {r.display_name} ({r.command}) on {r.instance}?", abort=True)
    done = asyncio.run(ws.cancel(r.id))
    console.print(f"cancelled {done.display_name}")


@cli.command("logs")
@click.argument("run")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new output until the run ends")
@friendly
def logs_cmd(run: str, follow: bool) -> None:
    """Print a run's combined stdout/stderr."""
    ws = _workstation()

    async def go() -> None:
        r = ws.store.find_run(run)
        follower = ws.follower
        path = follower.local_path(r)
        out = sys.stdout.buffer
        printed = 0

        def emit() -> None:
            nonlocal printed
            with open(path, "rb") as f:
                f.seek(printed)
                while data := f.read(1 << 20):
                    out.write(data)
                    printed += len(data)
            out.flush()

        if not follow:
            await follower.catch_up(r)
            if path.exists():
                emit()
            return
        task = follower.start(r)
        while not task.done():
            if path.exists():
                emit()
            await asyncio.sleep(0.2)
        task.result()
        if path.exists():
            emit()

    try:
        asyncio.run(go())
    except KeyboardInterrupt:
        pass


@cli.command("top")
@click.option("--once", is_flag=True, help="Print one view and exit (no live refresh)")
@click.option("--interval", default=1.0, show_default=True, help="Seconds between refreshes")
@friendly
def top_cmd(once: bool, interval: float) -> None:
    """A compact live view of every instance's CPU/GPU use and the runs on it, without the full TUI."""
    from rich.live import Live

    ws = _workstation()

    async def gather() -> Table:
        listing = await ws.list_instances()
        await ws.refresh_runs()
        runs, _ = ws.store.runs()
        active = [r for r in runs if r.run_state.is_active]
        t = Table(title=f"labdeck top · {datetime.now().strftime('%H:%M:%S')}", title_justify="left")
        rows: list[tuple[str, ...]] = []
        for inst in listing.instances:
            if inst.state != "running":
                rows.append((inst.name, f"[red]{inst.state}[/]", "", "", "", "", "", "", escape(inst.note.splitlines()[0]) if inst.note else ""))
                continue
            try:
                await ws.monitor.poll_instance(inst.name)
            except LabdeckError as e:
                rows.append((inst.name, "[yellow]no agent[/]", "", "", "", "", "", "", escape(str(e))))
                continue
            m = ws.monitor.instance(inst.name)
            s = m.last or {}
            gpus = " ".join(f"{g['index']}:{g.get('util', 0):.0f}% {g.get('mem_used', 0) / 1024:.0f}G" for g in s.get("gpus") or []) or "–"
            mem = f"{s.get('mem_used', 0) / 1024:.1f}/{s.get('mem_total', 0) / 1024:.0f}G" if s else "…"
            here = [r for r in active if r.instance == inst.name] or [None]
            idle = ws.monitor.idle_runs()
            for k, r in enumerate(here):
                head = (inst.name, f"{s.get('cpu', 0):.0f}%" if s else "…", mem, gpus) if k == 0 else ("", "", "", "")
                if r is None:
                    rows.append((*head, "–", "", "", "", ""))
                    continue
                rs = (s.get("runs") or {}).get(r.id, {})
                latest = ""
                if r.user == ws.user and r.state == "running":
                    try:
                        await ws.follower.catch_up(r)
                        await ws.monitor.poll_run(r)
                    except LabdeckError:
                        pass
                    summ = ws.monitor.run(r).series.summary()
                    latest = "  ".join(f"{k2}={v['last']:.4g}" for k2, v in sorted(summ.items())[:4])
                state = f"[{STATE_STYLE.get(r.state, '')}]{r.state}[/]" + (f" [yellow]⚠ GPU {idle[r.id]:.0f}%[/]" if r.id in idle else "")
                rows.append((*head, f"{r.display_name} ({r.user})", state, f"{rs.get('cpu', 0):.0f}%" if rs else "",
                             f"{rs.get('gpu_mem', 0) / 1024:.1f}G" if rs.get("gpu_mem") else "", escape(latest)))
        return fit_table(t, ("instance", "CPU", "mem", "GPUs", "run", "state", "run CPU", "GPU mem", "latest metrics"),
                         rows, flexible={"GPUs", "run", "latest metrics"})

    async def go() -> None:
        if once:
            await gather()  # the first round starts the agents; their first sample follows
            await asyncio.sleep(min(interval, 1.5))
            console.print(await gather())
            return
        with Live(await gather(), console=console, refresh_per_second=4, screen=False) as live:
            while True:
                await asyncio.sleep(interval)
                live.update(await gather())

    try:
        asyncio.run(go())
    except KeyboardInterrupt:
        pass


def main() -> None:
    cli(prog_name="labdeck")


if __name__ == "__main__":
    main()
