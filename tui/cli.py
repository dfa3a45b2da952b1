"""The `labdeck` command. With no subcommand it opens the workstation.

Every error a user can cause (config, store, provider, transport) is printed as
one message plus what to do, with no traceback; unexpected errors print one
line and leave the traceback in the log file.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.table import Table
from rich.text import Text

from backends import clock
from backends.errors import LabdeckError
from backends.paths import Paths
from backends.text import plain, plain_line

from .format import duration, money, plural, short_id, since, slug, state_markup

from .cliutil import (PIPE_CLOSED_STATUS, _log_file, _setup_logging, _store, _workstation, console, err_console,  # noqa: F401
                      esc, fit_table, friendly, pipe_closed, print_json, raw_output)

if TYPE_CHECKING:
    from backends.workstation import Workstation

RAW = click.option("--raw", is_flag=True, help="Print text from teammates, hosts and logs as it is (control "
                                                "characters and escape sequences included)")
JSON = click.option("--json", "as_json", is_flag=True,
                    help="Print one JSON document (field names in the README's \"JSON output\" section) instead of a table")


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

    ws = _workstation(starts_relaunches=True)
    _check_keys(ws)
    from . import termimage

    # before Textual takes the terminal: textual-image asks it for its cell size and graphics on import
    termimage.setup(ws.config.get("ui", "images"))
    app = LabdeckApp(ws)
    app.run()
    if app.startup_error is not None:
        e = app.startup_error
        msg = e.render() if isinstance(e, LabdeckError) else f"{type(e).__name__}: {e}"
        err_console.print(f"[bold red]error:[/] {esc(msg, lines=True)}", highlight=False)
        err_console.print(f"[dim]Details are in {esc(_log_file(ws.config.paths))}.[/]", highlight=False)
        sys.exit(1)


@cli.command("ls")
@JSON
@friendly
def ls_cmd(as_json: bool) -> None:
    """List the instances of every configured provider."""
    from backends import clouds

    ws = _workstation(starts_relaunches=True)

    async def listing_and_relaunches():
        try:
            listing = await ws.list_instances()
            await ws.wait_background(lambda n: err_console.print(
                f"[yellow]•[/] waiting for {plural(n, 'relaunch', 'relaunches')} after a preemption "
                "(Ctrl-C leaves them for next time)…", highlight=False))
            sp = None
            if clouded:  # the autostop countdowns, over the same connections (one event loop)
                await clouds.poll_autostop(ws, listing.instances, max_age=0)
                sp = clouds.enrich(ws, listing.instances)
            return listing, sp
        finally:
            await ws.close()

    clouded = bool(clouds.cloud_providers(ws))
    listing, sp = asyncio.run(listing_and_relaunches())
    for e in ws.background_errors:
        err_console.print(f"[bold red]⚠[/] {esc(e, lines=True)}", highlight=False)
    now = clock.now()
    if as_json:
        from backends.models import parse_time_lenient

        from . import clijson

        def uptime(i) -> float | None:
            t0 = parse_time_lenient(i.started_at) if i.state == "running" else None
            return round((now - t0).total_seconds(), 3) if t0 else None

        print_json([clijson.instance(i, uptime(i)) for i in listing.instances])
    else:
        _print_instances(ws, listing, sp, clouded, now)
    for e in listing.events:
        err_console.print(f"[yellow]•[/] {esc(e, lines=True)}", highlight=False)
    for e in listing.errors.values():
        err_console.print(f"[bold red]⚠[/] {esc(e, lines=True)}", highlight=False)
    for i in listing.instances:
        if i.state == "unreachable":
            err_console.print(f"[bold red]⚠[/] {esc(i.name)}: {esc(i.note, lines=True)}", highlight=False)
    if listing.errors:
        sys.exit(1)


def _print_instances(ws: Workstation, listing, sp, clouded: bool, now) -> None:
    t = Table(title="instances", title_justify="left")
    rows = []
    for i in listing.instances:
        row = (esc(i.name), esc(i.provider), state_markup(i.state),
               f"{i.latency_ms:.0f} ms" if i.latency_ms is not None else "–",
               esc((i.size + (" spot" if i.spot else "")) if i.size else (i.size_summary if i.vcpus else "–")),
               esc(i.gpu_summary), money(i.price_per_hour), since(i.started_at, now) if i.state == "running" else "–",
               esc(i.host))
        if clouded:
            row += (f"${i.cost:.2f}" if i.cost is not None else "–", esc(i.autostop or "–"), esc(i.created_by or "–"))
        rows.append(row)
    cols = ("name", "provider", "state", "ping", "size", "GPUs", "$/hr", "uptime", "host")
    if clouded:
        cols += ("cost", "autostop", "owner")
    if console.width < 110:  # a narrow terminal: the address is the column to give up
        drop = cols.index("host")
        cols, rows = cols[:drop] + cols[drop + 1:], [r[:drop] + r[drop + 1:] for r in rows]
    console.print(fit_table(t, cols, rows, flexible={"size", "GPUs", "host"}))
    if sp is not None:
        daily = float(ws.config.get("budget", "daily_usd"))
        console.print(f"[dim]burn: you {money(sp.burn_user)}/h · team {money(sp.burn_team)}/h · today you "
                      f"${sp.today_user:.2f}{f' of ${daily:.2f}' if daily else ''}[/]", highlight=False)


@cli.command("config")
@friendly
def config_cmd() -> None:
    """Print the effective configuration and where each value came from."""
    from backends.config import load_config

    paths = Paths.resolve()
    cfg = load_config(paths)
    t = Table(title=f"labdeck configuration ({cfg.file})", title_justify="left")
    t.add_column("key", style="bold", no_wrap=True)
    t.add_column("value", overflow="fold")
    t.add_column("from", style="dim", overflow="fold")
    for key, value, source in cfg.explain():
        t.add_row(Text(key), Text(str(value)), Text(str(source)))  # a value may hold [ ]: text, not markup
    console.print(t)
    _print_ssh_hosts(cfg)


def _print_ssh_hosts(cfg) -> None:
    """Per SSH host, what labdeck will connect with and where each value came from: labdeck's own
    config, or ssh_config as OpenSSH resolved it (file:line), or OpenSSH's default."""
    from backends.providers import build_providers

    try:
        providers = build_providers(cfg)
    except LabdeckError as e:
        err_console.print(f"ssh hosts: {esc(e.render())}", highlight=False)
        return
    rows = []
    for pname, prov in providers.items():
        resolve_all = getattr(prov, "resolve_all", None)  # (every host's ssh -G at once; each error on its row)
        for hname, spec in sorted((resolve_all() if resolve_all else {}).items()):
            if isinstance(spec, LabdeckError):
                rows.append((f"{pname}.{hname}", "error", spec.render(), ""))
                continue
            origin = dict(spec.origin)
            chain = " → ".join(h.name for h in spec.jump)
            for key, value in (("hostname", spec.hostname), ("port", spec.port), ("user", spec.user),
                               ("identityfile", ", ".join(spec.identity_files)), ("proxyjump", chain),
                               ("proxycommand", spec.proxy_command or "")):
                if value in ("", None) and key in ("identityfile", "proxyjump", "proxycommand"):
                    continue
                rows.append((f"{pname}.{hname}", key, str(value), origin.get(key, "OpenSSH default")))
            rows += [(f"{pname}.{hname}", "note", n, "") for n in spec.notes]
    if not rows:
        return
    t = Table(title="ssh hosts (as labdeck connects to them)", title_justify="left")
    t.add_column("host", style="bold", no_wrap=True)
    t.add_column("option", no_wrap=True)
    t.add_column("value", overflow="fold")
    t.add_column("from", style="dim", overflow="fold")
    for row in rows:
        t.add_row(*(Text(plain_line(c)) for c in row))
    console.print(t)


@cli.group("store")
def store_group() -> None:
    """Look after the store files."""


@store_group.command("move-aside")
@click.argument("path", type=click.Path(dir_okay=False))
@friendly
def store_move_aside(path: str) -> None:
    """Rename a corrupt store file (nothing is deleted) so a fresh store can start."""
    from backends.store import move_aside

    target = move_aside(path)
    console.print(f"Moved {esc(path)} to {esc(target)}. labdeck starts a fresh store; the old file is kept for recovery.")


class _CommandAfterDashes(click.Command):
    """A command whose own options come first and a command line after ``--`` (`run`, `rerun`): an
    option labdeck does not know is refused, saying where the command goes (a typo of --on must not
    launch the whole line on local). ``HINT`` is the sentence added to click's message."""

    HINT = ""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.NoSuchOption as e:
            e.message = e.message.rstrip(".") + ". " + self.HINT
            raise


class _RunCommand(_CommandAfterDashes):
    HINT = ("labdeck run's own options come first, and the command goes after -- "
            "(labdeck run --on gpu1 -- python train.py --lr 3e-4).")


@cli.command("run", cls=_RunCommand, context_settings={"allow_interspersed_args": False})
@click.option("--on", "instance", default="local", show_default=True, help="Instance to run on")
@click.option("--name", default="", help="A name for the run")
@click.option("--parent", default=None, help="The run this one derives from (id, prefix or name)")
@click.option("--workdir", default=None, help="Working directory on the instance (default: here)")
@click.option("--env", "envs", multiple=True, metavar="KEY=VALUE",
              help="Environment variable for the job (repeatable; kept in the team store: not for secrets)")
@click.option("--secret", "secret_names", multiple=True, metavar="NAME",
              help="Pass your environment variable NAME to the job as a secret (asked for when unset; repeatable); "
                   "only its name is recorded")
@click.option("--no-sync", is_flag=True, help="Run in --workdir as it is on the instance (no code snapshot)")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@friendly
def run_cmd(instance: str, name: str, parent: str | None, workdir: str | None, envs: tuple[str, ...],
            secret_names: tuple[str, ...], no_sync: bool, command: tuple[str, ...]) -> None:
    """Run COMMAND detached on an instance:  labdeck run --on gpu1 -- python train.py --lr 3e-4

    labdeck's options end at `--` (or at the first word that is not an option: `labdeck run python
    train.py --lr 3e-4` works too); everything after is the command, options included. An unknown
    option before that is refused.

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
    from backends.jobs import read_secrets

    secrets = read_secrets(dict.fromkeys(secret_names))  # before anything starts: a missing one stops here
    ws = _workstation()
    cmd = command[0] if len(command) == 1 else shlex.join(command)
    def progress(phase: str, done: int, total: int) -> None:
        if phase == "uploading" and total and sys.stderr.isatty():
            err_console.print(f"syncing code: {done / 1e6:.1f} / {total / 1e6:.1f} MB", end="\r", highlight=False)

    run = asyncio.run(ws.launch(cmd, instance=instance, workdir=workdir, env=env, name=name, parent=parent,
                                sync_code=not no_sync, progress=progress, secrets=secrets))
    if run.code:
        c = run.code
        console.print(f"code: {plural(c['files'], 'file')}"
                      + (f" at {c['commit'][:10]}{' + uncommitted changes' if c['dirty'] else ''}" if c.get("commit") else "")
                      + f"; {c.get('synced_files', 0)} sent ({c.get('synced_bytes', 0) / 1e6:.2f} MB)", highlight=False)
    _follow_in_background(ws)
    verb = "started" if run.state == "running" else "queued"
    console.print(f"{verb} [bold]{esc(run.id)}[/] ({esc(run.display_name)}) on {esc(run.instance)}, pid {run.pid}")
    console.print(f"[dim]labdeck logs {short_id(run.id)} -f   ·   labdeck cancel {short_id(run.id)}[/]")


@cli.command("example")
@friendly
def example_cmd() -> None:
    """Run the bundled example project (numpy training) on local."""
    ws = _workstation()
    run = asyncio.run(ws.launch_example())
    _follow_in_background(ws)
    console.print(f"started [bold]{esc(run.id)}[/] ({esc(run.display_name)}) on {esc(run.instance)}, pid {run.pid}")


@cli.command("ps")
@click.option("--all", "-a", "show_all", is_flag=True, help="Include finished runs")
@click.option("--mine", is_flag=True, help="Only your runs")
@RAW
@JSON
@friendly
def ps_cmd(show_all: bool, mine: bool, raw: bool, as_json: bool) -> None:
    """List runs (active ones unless --all)."""
    raw_output(raw)
    ws = _workstation()
    asyncio.run(ws.refresh_runs())
    runs, errors = ws.store.runs(team=not mine)
    if not show_all:
        runs = [r for r in runs if r.run_state.is_active or r.state == "lost"]
    if as_json:
        from .clijson import run_summary

        print_json([run_summary(r) for r in runs])
    else:
        t = Table(title_justify="left", title=plural(len(runs), "run") + ("" if show_all else " active (--all for every run)"))
        rows = [(esc(short_id(r.id)), esc(r.display_name), state_markup(r.state), esc(r.instance), esc(r.user),
                 duration(r.duration_seconds()), esc(r.last_line[:100])) for r in runs]
        console.print(fit_table(t, ("run", "name", "state", "instance", "user", "duration", "last line"), rows,
                                flexible={"name", "last line"}))
    for user, e in errors.items():
        err_console.print(f"[bold red]⚠[/] {esc(user)}'s store is unreadable: {esc(e, lines=True)}", highlight=False)


@cli.command("cancel")
@click.argument("run")
@click.option("--yes", "-y", is_flag=True, help="Do not ask")
@friendly
def cancel_cmd(run: str, yes: bool) -> None:
    """Cancel a run: SIGTERM its process group, SIGKILL after the grace period."""
    ws = _workstation()
    r = _find_run(ws, run)
    if not yes:
        if not sys.stdin.isatty():
            raise LabdeckError(f"Cancelling {r.display_name} needs confirmation.", "Run it in a terminal, or pass --yes.")
        from backends.notebooks import shown_command

        click.confirm(plain_line(f"Cancel run {r.display_name} ({shown_command(r)}) on {r.instance}?"), abort=True)
    done = asyncio.run(ws.cancel(r.id))
    console.print(f"cancelled {esc(done.display_name)}")


def _ask_first(r, what: str, plan: list[tuple[str, str]], doing: str, question: str, yes: bool) -> None:
    """Show what acting on someone else's run would do (to stderr) and ask; refuse with no terminal
    unless --yes. Their files would be run or loaded as you."""
    err_console.print(f"[bold]{esc(r.user)}'s run {esc(r.display_name)}[/] {what}:", highlight=False)
    for label, value in plan:
        err_console.print(f"  {label:<12} {esc(value, lines=True)}", highlight=False)
    if not yes:
        if not sys.stdin.isatty():
            raise LabdeckError(f"{doing} {r.user}'s run {r.display_name} needs confirmation.",
                               "Read what it would do above; run it in a terminal, or pass --yes.")
        click.confirm(question, abort=True, err=True)


class _RerunCommand(_CommandAfterDashes):
    HINT = "A new command goes after -- (labdeck rerun RUN -- python train.py --lr 3e-4); a parameter: --set lr=3e-4."


@cli.command("rerun", cls=_RerunCommand)
@click.argument("run")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Change a parameter (repeatable): rewritten in the command where it is written there "
                   "(--lr 0.1, --lr=0.1, lr=0.1), else given to labdeck.config() through $LABDECK_PARAMS")
@click.option("--on", "instance", default=None, help="Another instance (default: the run's)")
@click.option("--env", "envs", multiple=True, metavar="KEY=VALUE",
              help="Set an environment variable for the job (repeatable; the run's others are kept)")
@click.option("--name", default=None, help="A name for the new run (default: the run's, with \"(rerun)\")")
@click.option("--yes", "-y", is_flag=True, help="Do not ask (someone else's run is otherwise shown and asked about first)")
@JSON
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@friendly
def rerun_cmd(run: str, sets: tuple[str, ...], instance: str | None, envs: tuple[str, ...], name: str | None,
              yes: bool, as_json: bool, command: tuple[str, ...]) -> None:
    """Run a run again, from its recorded code, as a child of it in lineage; with changes if asked.

    \b
      labdeck rerun a1b2c3d4                       the same again
      labdeck rerun a1b2c3d4 --set lr=3e-4         the same, but lr=3e-4
      labdeck rerun a1b2c3d4 -- python train.py --lr 3e-4 --steps 900

    --set rewrites the value where the command line has it (--lr 0.1, --lr=0.1 or lr=0.1; nothing else
    in the command changes). A key the run recorded only through labdeck.config() (or a config file)
    reaches the job in $LABDECK_PARAMS, which labdeck.config() applies to the dict it is given. Any
    other key is refused: it would change nothing. Lineage shows the changes as the child's diff.

    A teammate's run is shown first (command, instance, code, environment): they wrote it, and it
    would run as you. It runs only after you say yes, or with --yes."""
    import shlex

    from .format import rerun_plan

    changes: dict[str, str] = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise LabdeckError(f"--set {item!r} is not KEY=VALUE.", "e.g. --set lr=3e-4")
        changes[key.strip()] = value
    ws = _workstation()
    r = _find_run(ws, run)
    env = dict(r.env if isinstance(r.env, dict) else {})
    for item in envs:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise LabdeckError(f"--env {item!r} is not KEY=VALUE.")
        env[key] = value
    cmd = None if not command else command[0] if len(command) == 1 else shlex.join(command)
    plan = ws.rerun_plan(r, command=cmd, env=env, sets=changes)  # a --set that changes nothing stops here
    if r.user != ws.user:
        _ask_first(r, "would run as you", rerun_plan(r, ws.user, command=plan.command, env=plan.env),
                   "Rerunning", "Rerun it as you?", yes)
    new = asyncio.run(ws.rerun(r, command=cmd, instance=instance, env=env, name=name, sets=changes))
    _follow_in_background(ws)
    if as_json:
        from .clijson import run_summary

        print_json({**run_summary(new), "changes": [{"key": k, "old": o, "new": n, "where": w}
                                                    for k, o, n, w in plan.params]})
        return
    for k, o, n, w in plan.params:
        where = "in the command" if w == "command" else f"through ${w} (for labdeck.config())"
        console.print(f"{esc(k)}: {esc(str(o))} → {esc(str(n))}  [dim]{where}[/]", highlight=False)
    if cmd is not None or plan.command != r.command:
        console.print(f"[dim]$ {esc(plan.command)}[/]", highlight=False)
    verb = "started" if new.state == "running" else "queued"
    console.print(f"{verb} [bold]{esc(new.id)}[/] ({esc(new.display_name)}) on {esc(new.instance)}, pid {new.pid}, "
                  f"a child of {esc(r.display_name)}")


@cli.command("logs")
@click.argument("run")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new output until the run ends")
@click.option("--raw", is_flag=True, help="The log's bytes as they are (escape sequences and invalid UTF-8 included)")
@friendly
def logs_cmd(run: str, follow: bool, raw: bool) -> None:
    """Print a run's combined stdout/stderr.

    Without --raw, lines are printed as plain text: terminal escape sequences (colours, clear
    screen, clipboard writes) are removed, a carriage-return rewritten line shows as it ended,
    invalid UTF-8 becomes U+FFFD. A line still being written is printed once it ends."""
    ws = _workstation()

    async def go() -> None:
        r = _find_run(ws, run)
        follower = ws.follower
        path = follower.local_path(r)
        out = sys.stdout.buffer
        printed = 0
        pending = b""  # the start of a line not ended yet (without --raw)

        def emit(final: bool = False) -> None:
            nonlocal printed, pending
            with open(path, "rb") as f:
                f.seek(printed)
                while data := f.read(1 << 20):
                    printed += len(data)
                    if raw:
                        out.write(data)
                        continue
                    pending += data
                    cut = pending.rfind(b"\n") + 1 if len(pending) <= LOG_LINE_CAP else len(pending)
                    if cut:
                        out.write(plain(pending[:cut]).encode("utf-8"))
                        pending = pending[cut:]
            if final and pending:
                out.write(plain(pending).encode("utf-8"))
                pending = b""
            out.flush()

        if not follow:
            await follower.catch_up(r)
            if path.exists():
                emit(final=True)
            return
        task = follower.start(r)
        while not task.done():
            if path.exists():
                emit()
            await asyncio.sleep(0.2)
        task.result()
        if path.exists():
            emit(final=True)

    try:
        asyncio.run(go())
    except KeyboardInterrupt:
        pass


LOG_LINE_CAP = 4 << 20  # a line longer than this is printed in pieces (it is not held in memory whole)


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
        t = Table(title=f"labdeck top · {clock.now().astimezone().strftime('%H:%M:%S')}", title_justify="left")
        rows: list[tuple[str, ...]] = []
        for inst in listing.instances:
            if inst.state != "running":
                rows.append((esc(inst.name), f"[red]{esc(inst.state)}[/]", "", "", "", "", "", "",
                             esc(inst.note.splitlines()[0]) if inst.note else ""))
                continue
            try:
                await ws.monitor.poll_instance(inst.name)
            except LabdeckError as e:
                rows.append((esc(inst.name), "[yellow]no agent[/]", "", "", "", "", "", "", esc(str(e))))
                continue
            m = ws.monitor.instance(inst.name)
            s = m.last or {}
            gpus = esc(" ".join(f"{g['index']}:{g.get('util', 0):.0f}% {g.get('mem_used', 0) / 1024:.0f}G" for g in s.get("gpus") or []) or "–")
            mem = f"{s.get('mem_used', 0) / 1024:.1f}/{s.get('mem_total', 0) / 1024:.0f}G" if s else "…"
            here = [r for r in active if r.instance == inst.name] or [None]
            idle = ws.monitor.idle_runs()
            for k, r in enumerate(here):
                head = (esc(inst.name), f"{s.get('cpu', 0):.0f}%" if s else "…", mem, gpus) if k == 0 else ("", "", "", "")
                if r is None:
                    rows.append((*head, "–", "", "", "", ""))
                    continue
                rs = (s.get("runs") or {}).get(r.id, {})
                latest = ""
                if r.user == ws.user and r.state == "running":
                    try:
                        await ws.follower.sync(r)
                    except LabdeckError:
                        pass
                    summ = ws.monitor.run(r).series.summary()
                    latest = "  ".join(f"{esc(k2)}={_fmt(v['last'])}" for k2, v in sorted(summ.items())[:4])
                state = state_markup(r.state) + (f" [yellow]⚠ GPU {idle[r.id]:.0f}%[/]" if r.id in idle else "")
                rows.append((*head, esc(f"{r.display_name} ({r.user})"), state, f"{rs.get('cpu', 0):.0f}%" if rs else "",
                             f"{rs.get('gpu_mem', 0) / 1024:.1f}G" if rs.get("gpu_mem") else "", latest))
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


def _find_run(ws: Workstation, ref: str):
    """The run ``ref`` names (:meth:`backends.store.Store.find_run`: a name several users have, or an id
    prefix several runs share, is an error listing them). A name that several runs of one user have
    means the newest of them; that is said on stderr, with the others' ids, so it is never silent."""
    r = ws.store.find_run(ref)
    if r.name and ref in (r.name, f"{r.user}/{r.name}"):
        runs, _ = ws.store.runs(team=r.user != ws.user)
        same = sorted((x for x in runs if x.user == r.user and x.name == r.name), key=lambda x: x.id, reverse=True)
        if len(same) > 1:
            others = ", ".join(short_id(x.id) for x in same if x.id != r.id)
            err_console.print(f"[dim]{esc(ref)}: the newest of {len(same)} runs of that name ({esc(short_id(r.id))}); "
                              f"the other{'s' if len(same) > 2 else ''}: {esc(others)}[/]", highlight=False)
    return r


REFRESH_DEADLINE = 3.0  # a command that shows or acts on a run asks its host this long at most


def _refreshed(ws: Workstation, r):
    """``r`` as it is now: one of your active runs is asked about on its instance first (its state,
    and its results when it just ended), for :data:`REFRESH_DEADLINE` s at most, so `show` or
    `serve` right after a job ended sees it ended even with no follower running. Anything else (a
    finished run, a teammate's: their follower keeps it) is returned as it is, as is ``r`` when
    the host does not answer in time."""
    from backends.models import RunState

    if r.user != ws.user or not r.run_dir or not (r.run_state.is_active or r.state == RunState.LOST.value):
        return r

    async def go() -> None:
        try:
            await _refresh_one(ws, r)
        finally:  # the connections belong to this event loop; the command's next one opens its own
            for p in ws.providers.values():
                try:
                    await p.close()
                except Exception:  # noqa: BLE001 - closing is best effort
                    pass

    asyncio.run(go())
    try:
        return ws.store.with_status([ws.store.own_run(r.id)])[0]
    except LabdeckError:
        return r


async def _refresh_one(ws: Workstation, r) -> None:
    """``refresh_runs(only=[r])`` cut at :data:`REFRESH_DEADLINE` (a host that does not answer)."""
    try:
        await asyncio.wait_for(ws.refresh_runs(only=[r.id]), REFRESH_DEADLINE)
    except (asyncio.TimeoutError, LabdeckError):
        pass


def _follow_in_background(ws: Workstation) -> None:
    """Make sure your background follower runs (it keeps your runs' state, logs and results current
    with labdeck closed, and exits when nothing is active); LABDECK_NO_DAEMON=1 turns this off."""
    import os

    if os.environ.get("LABDECK_NO_DAEMON") == "1":
        return
    from backends import daemon

    daemon.ensure_running(ws.config.paths)


def _parse_filter(text: str):
    """The query, or a LabdeckError that draws a caret under the problem."""
    from backends.query import FilterError, parse

    try:
        return parse(text)
    except FilterError as e:
        raise LabdeckError("invalid filter:\n" + e.render(text),
                           "Terms: user:NAME state:S tag:T name:X lr>1e-3 metric.loss<0.3 ancestors:RUN, with OR, NOT, ( ).") from None


def _lineage(store):
    from backends.lineage import TeamLineage

    return TeamLineage(store)


def _fmt(v) -> str:
    """A param or metric value for markup: a number formatted, anything else escaped text (whoever ran the run
    wrote it)."""
    if isinstance(v, float):
        return f"{v:.4g}"
    return esc(v)


@cli.command("runs")
@click.argument("filter_text", required=False, default="", metavar="[FILTER]")
@click.option("--limit", default=50, show_default=True, help="Rows to print (newest first)")
@RAW
@JSON
@friendly
def runs_cmd(filter_text: str, limit: int, raw: bool, as_json: bool) -> None:
    """The team's runs as a table, optionally filtered:

    labdeck runs 'user:alice lr>1e-3 tag:best state:succeeded metric.val_loss<0.3'"""
    from backends import lineage as lin
    from backends.query import QueryContext

    raw_output(raw)
    tl = _lineage(_store())  # records only: no providers, transports or monitor to set up
    runs = sorted(tl.runs.values(), key=lambda r: r.id, reverse=True)
    if filter_text.strip():
        q = _parse_filter(filter_text)
        ctx = QueryContext(runs=tl.runs, annotations=tl.annotations, edges=tl.edges)
        runs = [r for r in runs if q.matches(r, ctx)]
    if as_json:
        from .clijson import run_with_lineage

        print_json([run_with_lineage(r, tl) for r in runs[:limit]])
        _unreadable(tl.errors)
        return
    key = lin.key_metric(list(tl.runs.values()))
    t = Table(title=plural(len(runs), "run") + (f" matching {esc(filter_text)}" if filter_text else "")
              + (f" · key metric {esc(key)}" if key else ""), title_justify="left")
    rows = []
    for r in runs[:limit]:
        v = lin.metric_value(r, key)
        parent = tl.parent_of(r)
        pv = lin.metric_value(parent, key) if parent else None
        delta = f" ({v - pv:+.3g})" if v is not None and pv is not None else ""
        rows.append((esc(short_id(r.id)), esc(r.display_name), esc(r.user), state_markup(r.state),
                     (f"{_fmt(v)}{delta}" if v is not None else "–"), f"${r.cost():.2f}" if r.price_per_hour else "–",
                     esc(", ".join(tl.tags(r.id))), esc(short_id(r.parent)) if r.parent else "–"))
    console.print(fit_table(t, ("run", "name", "user", "state", esc(key or "metric"), "cost", "tags", "parent"), rows,
                            flexible={"name", "tags"}))
    _unreadable(tl.errors)


def _unreadable(errors: dict[str, str]) -> None:
    """One line on stderr per teammate whose store could not be read."""
    for user, e in errors.items():
        err_console.print(f"[bold red]⚠[/] {esc(user)}'s store is unreadable: {esc((e.splitlines() or [''])[0])}",
                          highlight=False)


@cli.command("show")
@click.argument("run")
@RAW
@JSON
@friendly
def show_cmd(run: str, raw: bool, as_json: bool) -> None:
    """Everything a run recorded: who, where, code, params, metrics, hardware, notes, lineage."""
    raw_output(raw)
    ws = _workstation()
    r = _refreshed(ws, _find_run(ws, run))
    tl = _lineage(ws.store)
    if as_json:
        from .clijson import run_detail

        print_json(run_detail(r, tl))
        return
    lines = [f"[bold]{esc(r.display_name)}[/]  {esc(r.id)}",
             f"user {esc(r.user)} on {esc(r.origin_host)} · state {esc(r.state)}" + (f" ({esc(r.state_reason)})" if r.state_reason else ""),
             "instance " + " · ".join(_instance_facts(r)),
             f"command  {esc(r.command, lines=True)}",
             f"created {esc(r.created_at)} · started {esc(r.started_at or '–')} · ended {esc(r.ended_at or '–')} · "
             f"duration {duration(r.duration_seconds())} · cost ${r.cost():.4f} (${r.price_per_hour:g}/h)"]
    if r.code:
        c = r.code
        files = c.get("files", 0)
        lines.append(f"code {esc(files)} file{'' if files == 1 else 's'} from {esc(str(c.get('root', '')))}"
                     + (f" at {esc(str(c['commit'])[:12])}" if c.get("commit") else "") + (" + uncommitted changes" if c.get("dirty") else "")
                     + (f" · diff: labdeck diff {short_id(r.parent)} {short_id(r.id)}" if r.parent else ""))
    parent = tl.parent_of(r)
    lines.append("parents  " + (", ".join(f"{esc(short_id(p))} ({esc(tl.runs[p].display_name) if p in tl.runs else '?'})"
                                          for p in sorted(tl.parents.get(r.id, ()))) or "– (a baseline)"))
    kids = tl.children.get(r.id, [])
    lines.append("derived  " + (", ".join(f"{esc(short_id(k))} ({esc(tl.runs[k].display_name)})" for k in kids if k in tl.runs) or "–"))
    console.print("\n".join(lines), highlight=False)
    if r.params:
        t = Table(title="params", title_justify="left")
        rows = [(esc(k), _fmt(v), _fmt(parent.params.get(k, "–")) if parent else "") for k, v in sorted(r.params.items(), key=str)]
        console.print(fit_table(t, ("param", "value", "parent"), rows, flexible={"value", "parent"}))
    if r.metrics_summary:
        t = Table(title="metrics", title_justify="left")
        rows = [(esc(k), _fmt(v.get("last")), _fmt(v.get("best")), _fmt(v.get("min")), _fmt(v.get("max")), _fmt(v.get("count")))
                for k, v in sorted(r.metrics_summary.items(), key=str) if isinstance(v, dict)]
        console.print(fit_table(t, ("metric", "last", "best", "min", "max", "points"), rows, flexible=set()))
    if r.hardware:
        console.print("hardware " + ", ".join(f"{esc(k)}={_fmt(v)}" for k, v in r.hardware.items()), highlight=False)
    if r.environment:
        packages = r.environment.get("packages")
        console.print(f"environment python {esc(r.environment.get('python'))} · "
                      f"{plural(len(packages) if isinstance(packages, list) else 0, 'package')}", highlight=False)
    if r.artifacts:
        listing = asyncio.run(ws.list_instances())
        here = any(i.name == r.instance and i.state == "running" for i in listing.instances)
        where = f"{esc(r.instance)}:{esc(r.run_dir)}/ (labdeck fetch {esc(short_id(r.id))})" if here else \
            f"unavailable: the instance {esc(r.instance)} is gone or unreachable"
        console.print(f"artifacts ({where}) " + ", ".join(esc(a) for a in r.artifacts[:20]), highlight=False)
    tags = tl.tags(r.id)
    if tags:
        console.print("tags " + ", ".join(esc(t) for t in tags), highlight=False)
    for n in tl.notes(r.id):
        console.print(f"[dim]{esc(n.created_at[:16])} {esc(n.user)}:[/] {esc(n.text, lines=True)}", highlight=False)


def _instance_facts(r) -> list[str]:
    """What the run recorded about its instance, as markup pieces: "gpu1", "provider do (digitalocean)",
    "8 vCPU", "32 GiB", "1× H100", "host 10.0.0.5"; anything else it recorded as "key value"."""
    info = dict(r.instance_info) if isinstance(r.instance_info, dict) else {}
    out = [esc(r.instance)]
    provider, ptype = info.pop("provider", None), info.pop("provider_type", None)
    if provider:
        out.append(f"provider {esc(provider)}" + (f" ({esc(ptype)})" if ptype and ptype != provider else ""))
    vcpus, mem = info.pop("vcpus", None), info.pop("memory_mib", None)
    if vcpus:
        out.append(f"{esc(vcpus)} vCPU")
    if isinstance(mem, (int, float)) and not isinstance(mem, bool) and mem > 0:
        out.append(f"{mem / 1024:.0f} GiB")
    gpus = info.pop("gpus", None)
    out.append(esc(gpus) if gpus else "no GPU")
    host = info.pop("host", None)
    if host:
        out.append(f"host {esc(host)}")
    out += [f"{esc(k)} {esc(v)}" for k, v in sorted(info.items(), key=str) if v not in (None, "", [], {})]
    return out


@cli.command("fetch")
@click.argument("run")
@click.argument("paths", nargs=-1)
@click.option("--out", "-o", "out_dir", default=".", show_default=True, type=click.Path(file_okay=False))
@friendly
def fetch_cmd(run: str, paths: tuple[str, ...], out_dir: str) -> None:
    """Copy a run's artifacts (all, or the PATHS named) from its instance to OUT."""
    ws = _workstation()
    r = _refreshed(ws, _find_run(ws, run))
    wanted = list(paths) or r.artifacts
    if not wanted:
        raise LabdeckError(f"{r.display_name} recorded no artifacts.", "Name a path inside its run directory.")

    async def go() -> list[Path]:
        try:
            transport = await ws.transport(r.instance)
        except LabdeckError as e:
            raise LabdeckError(f"The artifacts of {r.display_name} are unavailable: {e}") from None
        done = []
        for rel in wanted:
            if rel.startswith("/") or ".." in Path(rel).parts:
                raise LabdeckError(f"{rel!r} is not a path inside the run directory.")
            target = Path(out_dir) / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.part")
            offset = 0
            with open(tmp, "wb") as f:
                while True:
                    chunk = await transport.read_file(f"{r.run_dir}/{rel}", offset, 8 << 20, inside=r.run_dir)
                    f.write(chunk.data)
                    offset = chunk.next_offset
                    if not chunk.data or offset >= chunk.size:
                        break
            tmp.replace(target)
            done.append(target)
        return done

    for p in asyncio.run(go()):
        console.print(f"{esc(p)} ({plural(p.stat().st_size, 'byte')})", highlight=False)


@cli.command("media")
@click.argument("run")
@click.argument("key", required=False)
@JSON
@friendly
def media_cmd(run: str, key: str | None, as_json: bool) -> None:
    """A run's logged media (labdeck.Image/Table/Histogram/Confusion/Text, and TensorBoard images,
    histograms and text): each key with its kind and steps, or every step of KEY. The TUI's Media
    view (v on a run) shows them."""
    from backends.media import load_run_media

    ws = _workstation()
    r = _find_run(ws, run)

    async def go():
        try:
            transport = await ws.transport(r.instance)
        except LabdeckError as e:
            raise LabdeckError(f"The media of {r.display_name} are unavailable: {e}") from None
        return await load_run_media(ws.monitor, r, transport, Path(ws.config.paths.data_dir) / "media")

    idx = asyncio.run(go()).index
    if key is not None:
        steps = idx.steps(key)
        if not steps:
            raise LabdeckError(f"{r.display_name} has logged no media under {key!r}.",
                               f"`labdeck media {short_id(r.id)}` lists its keys.")
        items = [idx.get(key, s) for s in steps]
        if as_json:
            print_json([{"key": e.key, "step": e.step, "kind": e.kind, "source": e.source, "file": e.file,
                         "size": e.size, "caption": e.caption, "width": e.w, "height": e.h} for e in items])
            return
        t = Table(title=f"{esc(key)} of {esc(r.display_name)}", title_justify="left")
        rows = [(str(e.step), e.kind, e.source, "–" if not e.size else plural(e.size, "byte"),
                 f"{e.w}×{e.h}" if e.w and e.h else "", esc(e.caption or "")) for e in items]
        console.print(fit_table(t, ("step", "kind", "source", "size", "pixels", "caption"), rows,
                                flexible={"caption"}))
        return
    keys = idx.keys()
    docs = []
    for k in keys:
        steps = idx.steps(k)
        last = idx.get(k, steps[-1])
        docs.append({"key": k, "kind": last.kind, "source": last.source, "count": len(steps),
                     "first_step": steps[0], "last_step": steps[-1]})
    if as_json:
        print_json(docs)
        return
    if not docs:
        console.print(f"{esc(r.display_name)} has logged no media (labdeck.log({{'samples': labdeck.Image(array)}}) "
                      "or TensorBoard images).", highlight=False)
        return
    t = Table(title=f"media of {esc(r.display_name)}", title_justify="left")
    rows = [(esc(d["key"]), d["kind"], d["source"], str(d["count"]), str(d["first_step"]), str(d["last_step"]))
            for d in docs]
    console.print(fit_table(t, ("key", "kind", "source", "steps", "first", "last"), rows, flexible={"key"}))


@cli.command("diff")
@click.argument("run_a")
@click.argument("run_b")
@RAW
@friendly
def diff_cmd(run_a: str, run_b: str, raw: bool) -> None:
    """Compare two runs: params, command, metrics and code."""
    from backends import lineage as lin

    raw_output(raw)
    ws = _workstation()
    a, b = _find_run(ws, run_a), _find_run(ws, run_b)
    a, b = _refreshed(ws, a), _refreshed(ws, b)
    console.print(f"[bold]{esc(a.display_name)}[/] {esc(short_id(a.id))} → [bold]{esc(b.display_name)}[/] {esc(short_id(b.id))}")
    if a.command != b.command:
        console.print(f"command: {esc(a.command)}\n      → {esc(b.command)}", highlight=False)
    changes = lin.params_diff(a.params, b.params)
    if changes:
        t = Table(title="params", title_justify="left")
        console.print(fit_table(t, ("param", esc(run_a), esc(run_b)), [(esc(k), _fmt(x) if x is not None else "–",
                                                                        _fmt(y) if y is not None else "–") for k, x, y in changes],
                                flexible=set()))
    else:
        console.print("params: the same")
    names = sorted(set(a.metrics_summary) | set(b.metrics_summary))
    if names:
        rows = []
        for n in names:
            x, y = lin.metric_value(a, n), lin.metric_value(b, n)
            rows.append((esc(n), _fmt(x) if x is not None else "–", _fmt(y) if y is not None else "–",
                         f"{y - x:+.4g}" if x is not None and y is not None else ""))
        console.print(fit_table(Table(title="metrics (last)", title_justify="left"), ("metric", esc(run_a), esc(run_b), "Δ"), rows,
                                flexible=set()))
    text = asyncio.run(ws.code_diff(a, b))
    console.print(Text(text if raw else plain(text)) if text else "code: no recorded difference")


@cli.command("note")
@click.argument("run")
@click.argument("text")
@friendly
def note_cmd(run: str, text: str) -> None:
    """Add a note to any run (yours or a teammate's); it is kept in your own store."""
    from backends.lineage import annotate

    ws = _workstation()
    a = annotate(ws.store, run, "note", text)
    console.print(f"noted on {esc(short_id(a.run_id))} by {esc(a.user)}")


@cli.command("tag")
@click.argument("run")
@click.argument("tags", nargs=-1, required=True)
@click.option("--remove", "-r", is_flag=True, help="Take your tag(s) off instead")
@friendly
def tag_cmd(run: str, tags: tuple[str, ...], remove: bool) -> None:
    """Tag any run (e.g. `labdeck tag RUN best`); --remove takes your tag off."""
    from backends.lineage import annotate, untag

    ws = _workstation()
    for tag in tags:
        if remove:
            untag(ws.store, run, tag)
        else:
            annotate(ws.store, run, "tag", tag)
    console.print(("removed " if remove else "tagged ") + ", ".join(tags))


@cli.command("report")
@click.argument("target")
@click.option("--out", "-o", "out_dir", default=".", show_default=True, type=click.Path(file_okay=False),
              help="Directory for the .md and .html files")
@click.option("--metric", default=None, help="Key metric (default: the project's loss)")
@click.option("--media", "media_keys", multiple=True, metavar="KEY[@STEP]",
              help="Embed this logged media key for every run of the path; repeatable. KEY: each run's latest "
                   "step (or --media-step's); KEY@STEP: each run's latest step at or below STEP (its earliest "
                   "if it has none); KEY@latest: the latest, also for a key that holds an '@'")
@click.option("--media-step", type=int, default=None, metavar="STEP",
              help="The step for every --media KEY given without @STEP (at or below it, as KEY@STEP)")
@friendly
def report_cmd(target: str, out_dir: str, metric: str | None, media_keys: tuple[str, ...],
               media_step: int | None) -> None:
    """Write the path from the baseline to a run (or to the best run a filter matches) as
    Markdown and as a self-contained HTML page with the metric plots as SVG (and, with --media,
    the chosen images, tables, confusion matrices and histograms of each run, each labelled with
    the step it was logged at)."""
    from backends.media import MediaError, parse_media_choice

    choices: list[tuple[str, int | None]] = []
    for text in media_keys:
        try:
            key, at = parse_media_choice(text)
        except MediaError as e:
            raise click.BadParameter(str(e), param_hint="'--media'") from None
        choices.append((key, at if at is not None or text.endswith("@latest") else media_step))
    if media_step is not None and not media_keys:
        raise click.UsageError("--media-step chooses the step of --media keys; name one with --media KEY.")
    from backends import lineage as lin
    from backends.errors import AmbiguousError, NotFoundError
    from backends.metrics import lower_is_better
    from backends.query import QueryContext
    from backends.report import build_report, write_report

    ws = _workstation()
    tl = _lineage(ws.store)
    try:
        run = _find_run(ws, target)
    except AmbiguousError:
        raise  # a name or prefix of several runs: the error lists them (it is not a filter)
    except NotFoundError:
        q = _parse_filter(target)
        ctx = QueryContext(runs=tl.runs, annotations=tl.annotations, edges=tl.edges)
        matched = [r for r in tl.runs.values() if q.matches(r, ctx)]
        if not matched:
            raise LabdeckError(f"No run matches {target!r}.", "`labdeck runs FILTER` shows what a filter matches.")
        key = metric or lin.key_metric(matched)
        scored = [r for r in matched if lin.metric_value(r, key, "best") is not None]
        lower = key is not None and lower_is_better(key)
        run = (min if lower else max)(scored, key=lambda r: lin.metric_value(r, key, "best")) if scored else \
            max(matched, key=lambda r: r.id)
    if _refreshed(ws, run) is not run:  # it was active: the path as it is now
        tl = _lineage(ws.store)
        run = tl.runs.get(run.id, run)
    path = lin.path_from_baseline(run, tl.runs)
    series: dict[str, dict] = {}
    for r in path:
        rm = ws.monitor.run(r)
        rm.update()
        per = {}
        for name in rm.series.names():
            xs, lo, hi = rm.series.series(name).view(1000)
            per[name] = (xs, [(x + y) / 2 for x, y in zip(lo, hi)])
        if per:
            series[r.id] = per
    async def all_diffs() -> dict[str, str]:
        return {r.id: await ws.code_diff(prev, r) for prev, r in zip([None, *path[:-1]], path)}

    diffs = asyncio.run(all_diffs())
    media = None
    if media_keys:
        from backends.media import report_media

        async def transport_of(r):
            return await ws.transport(r.instance)

        media, problems = asyncio.run(report_media(path, choices, transport_of,
                                                   Path(ws.config.paths.data_dir) / "media"))
        for p in problems:
            err_console.print(f"media left out: {esc(p)}", highlight=False)
        if not media:
            err_console.print(f"no run of the path has logged {', '.join(esc(k) for k, _ in choices)}", highlight=False)
    md, html = build_report(path, series=series, code_diffs=diffs, annotations={r.id: tl.annotations.get(r.id, []) for r in path},
                            key_metric=metric, media=media)
    base = "-".join(p for p in ("labdeck-report", slug(run.name), short_id(run.id)) if p)
    md_path, html_path = write_report(Path(out_dir), base, md, html)
    console.print(f"{plural(len(path), 'run')} from {esc(path[0].display_name)} to {esc(run.display_name)}:\n  {esc(md_path)}\n  {esc(html_path)}")


@cli.command("serve")
@click.argument("run")
@click.option("--on", "instance", default=None, help="Instance (default: the run's own)")
@click.option("--port", default=8000, show_default=True, help="Port on the instance (the next free one if taken)")
@click.option("--name", default=None, help="Deployment name (default: the run's name)")
@click.option("--model", default=None, help="Model file inside the run directory (default: the run's model artifact)")
@click.option("--api", default=None, metavar="MODULE:CLASS", help="Your litserve.LitAPI in the run's code instead")
@click.option("--detach", is_flag=True, help="Return at once; reach the server with the printed ssh -L line")
@click.option("--yes", "-y", is_flag=True, help="Do not ask (someone else's run is otherwise shown and asked about first)")
@friendly
def serve_cmd(run: str, instance: str | None, port: int, name: str | None, model: str | None, api: str | None,
              detach: bool, yes: bool) -> None:
    """Put a run's model behind litserve on its instance, forwarded here, with an API key.

    On a teammate's run labdeck serves copies of its files with your Python, and asks first:
    loading a pickled model runs code."""
    from backends import serving

    from .format import use_plan

    ws = _workstation()
    r = _refreshed(ws, ws.store.find_run(run))
    if r.user != ws.user:
        _ask_first(r, "would be served by you", use_plan(r, ws.user, "serve"), "Serving", "Serve it as you?", yes)

    async def go() -> None:
        served = await serving.deploy(ws, r, instance=instance, port=port, name=name, model=model, api=api,
                                      progress=lambda m: err_console.print(f"[dim]{esc(m)}[/]", highlight=False))
        _follow_in_background(ws)
        d = served.deployment
        lines = serving.usage_lines(served, detached=detach, local=await serving.is_this_machine(ws, d.instance))
        for label, text in lines:
            console.print(f"{label}{esc(text)}" if label else esc(text), highlight=False, soft_wrap=True)
        if detach:
            await served.forward.close()
            return
        try:
            while True:
                await asyncio.sleep(3600)
        finally:
            await served.forward.close()

    try:
        asyncio.run(go())
    except KeyboardInterrupt:
        pass


@cli.command("notebook")
@click.option("--on", "instance", default=None, help="Instance (default: the run's, else local)")
@click.option("--run", "run_ref", default=None, help="Open this run's own code copy")
@click.option("--dir", "workdir", default=None, help="Directory on the instance (default: your home there)")
@click.option("--port", default=8888, show_default=True, help="Port on the instance (the next free one if taken)")
@click.option("--idle", default=120.0, show_default=True, help="Minutes without activity after which Jupyter stops itself")
@click.option("--detach", is_flag=True, help="Return at once; reach it with the printed ssh -L line")
@click.option("--yes", "-y", is_flag=True, help="Do not ask (someone else's run is otherwise shown and asked about first)")
@click.option("--show", "show", default=None, metavar="NOTEBOOK",
              help="Start nothing: show a notebook's URL, token and ssh line again (its run's id, suffix or name)")
@JSON
@friendly
def notebook_cmd(instance: str | None, run_ref: str | None, workdir: str | None, port: int, idle: float, detach: bool,
                 yes: bool, show: str | None, as_json: bool) -> None:
    """JupyterLab (or jupyter-server) on an instance, through the SSH chain, with a fresh token.

    --show NOTEBOOK prints how to reach one that is running again (with --json: one object)."""
    from backends import notebooks

    from .format import use_plan

    ws = _workstation()
    if show is not None:
        acc = asyncio.run(notebooks.access(ws, show))
        if as_json:
            print_json(acc.to_dict())
        else:
            for line in acc.lines():
                console.print(esc(line), highlight=False, soft_wrap=True)
        return
    if as_json:
        raise click.UsageError("--json goes with --show (starting a notebook prints lines to read, not JSON)")
    r = ws.store.find_run(run_ref) if run_ref else None
    if r is not None and r.user != ws.user:
        _ask_first(r, "would be opened by you", use_plan(r, ws.user, "notebook"), "Opening a notebook on",
                   "Open it as you?", yes)

    async def go() -> None:
        opened = await notebooks.start(ws, instance=instance, run_ref=r, workdir=workdir, port=port, idle_minutes=idle,
                                       progress=lambda m: err_console.print(f"[dim]{esc(m)}[/]", highlight=False))
        _follow_in_background(ws)
        nb = opened.notebook
        console.print(f"[bold]notebook[/] on {esc(nb.instance)} in {esc(nb.root_dir)}: {esc(opened.url)}", highlight=False)
        console.print(f"from a laptop:  {esc(opened.ssh_line)}   then open http://127.0.0.1:{opened.forward.local_port}/?token={opened.token}",
                      highlight=False)
        console.print(f"[dim]stop it: labdeck cancel {short_id(nb.job_id)} (it also stops itself after {idle:g} idle minutes)[/]")
        if detach:
            await opened.forward.close()
            return
        console.print("[dim]forwarding (it heals after a dropped link); ctrl+c closes the forward, Jupyter keeps running[/]")
        try:
            while True:
                await asyncio.sleep(3600)
        finally:
            await opened.forward.close()

    try:
        asyncio.run(go())
    except KeyboardInterrupt:
        pass


@cli.command("models")
@JSON
@friendly
def models_cmd(as_json: bool) -> None:
    """The team's model deployments."""
    from backends.models import Deployment

    deps, errors = _store().records(Deployment.TABLE)
    if as_json:
        from .clijson import deployment

        print_json([deployment(d) for d in sorted(deps, key=lambda d: d.id, reverse=True)])
        _unreadable(errors)
        return
    rows = [(esc(d.name), esc(short_id(d.id)), esc(short_id(str(d.run_id))), state_markup(d.state), esc(d.instance),
             esc(d.port or "–"), esc(d.user), esc(d.model)) for d in sorted(deps, key=lambda d: d.id, reverse=True)]
    console.print(fit_table(Table(title=plural(len(rows), "deployment"), title_justify="left"),
                            ("name", "id", "run", "state", "instance", "port", "user", "model"), rows, flexible={"model"}))
    _unreadable(errors)


@cli.command("unserve")
@click.argument("deployment")
@click.option("--yes", "-y", is_flag=True, help="Do not ask")
@friendly
def unserve_cmd(deployment: str, yes: bool) -> None:
    """Stop a deployment: SIGTERM to litserve's process group, SIGKILL after a grace period."""
    from backends import serving

    ws = _workstation()
    dep = serving.find(ws, deployment)
    if not yes:
        if not sys.stdin.isatty():
            raise LabdeckError(f"Stopping {dep.name} needs confirmation.", "Run it in a terminal, or pass --yes.")
        click.confirm(plain_line(f"Stop the model server {dep.name} on {dep.instance}?"), abort=True)
    done = asyncio.run(serving.stop(ws, dep.id))
    console.print(f"stopped {esc(done.name)}")


@cli.command("export")
@click.argument("run")
@click.option("--k8s", "k8s_dir", required=True, type=click.Path(file_okay=False),
              help="Directory for the Dockerfile and Kubernetes manifests")
@click.option("--model", default=None, help="Model file inside the run directory (default: the run's model artifact)")
@click.option("--image", default=None, help="Image name for the manifests")
@click.option("--port", default=8000, show_default=True)
@friendly
def export_cmd(run: str, k8s_dir: str, model: str | None, image: str | None, port: int) -> None:
    """Write a Dockerfile and a Kubernetes Deployment + Service for the same model server."""
    from backends.export import export_k8s
    from backends.serving import pick_model

    ws = _workstation()
    r = _refreshed(ws, _find_run(ws, run))
    model, _ = pick_model(r, model, None)

    async def fetch() -> bytes:
        t = await ws.transport(r.instance)
        out, offset = bytearray(), 0
        while True:
            chunk = await t.read_file(f"{r.run_dir}/{model}", offset, 8 << 20)
            out += chunk.data
            offset = chunk.next_offset
            if not chunk.data or offset >= chunk.size:
                return bytes(out)

    try:
        data = asyncio.run(fetch())
    except LabdeckError as e:
        raise LabdeckError(f"Cannot fetch {model} of {r.display_name}: {e}", "Is its instance reachable?") from None
    for p in export_k8s(r, k8s_dir, data, model=model, image=image, port=port):
        console.print(esc(p), highlight=False)


@cli.group("daemon")
def daemon_group() -> None:
    """Your background follower: it follows your active runs, servers and notebooks with labdeck
    closed (state, logs, metrics, results, preemption) and exits when nothing is active. labdeck
    starts it by itself (LABDECK_NO_DAEMON=1 turns that off)."""


@daemon_group.command("status")
@JSON
@friendly
def daemon_status(as_json: bool) -> None:
    """Whether it runs: pid, since when, the runs it follows, its log file."""
    from backends import daemon

    st = daemon.status(Paths.resolve())
    if as_json:
        print_json(st)
        return
    if not st["running"]:
        console.print(f"not running · log {esc(st['log'])}", highlight=False)
        return
    console.print(f"running · pid {st['pid'] or '?'} · since {esc(st['since'] or '?')} · following "
                  + (plural(len(st["following"]), "run") + ": " + ", ".join(esc(short_id(i)) for i in st["following"])
                     if st["following"] else "nothing now") + f" · log {esc(st['log'])}", highlight=False)


@daemon_group.command("start")
@friendly
def daemon_start() -> None:
    """Start it now (even with LABDECK_NO_DAEMON=1); nothing happens when it runs already."""
    from backends import daemon

    pid = daemon.ensure_running(Paths.resolve(), force=True)
    console.print(f"started (pid {pid})" if pid else "already running", highlight=False)


@daemon_group.command("stop")
@friendly
def daemon_stop() -> None:
    """Stop it (SIGTERM; it saves where each log is and exits). Your jobs go on."""
    from backends import daemon

    stopped, what = daemon.stop(Paths.resolve())
    if not stopped and "not running" not in what:
        raise LabdeckError(what)
    console.print(esc(what), highlight=False)


@cli.command("doctor")
@friendly
def doctor_cmd() -> None:
    """Check what keeps labdeck working with every terminal closed: your background follower, and
    whether logging out would end it (systemd-logind KillUserProcesses)."""
    import getpass

    from backends import daemon

    paths = Paths.resolve()
    st = daemon.status(paths)
    ok = "[green]✓[/]"
    warn = "[yellow]![/]"
    console.print(f"{ok if st['running'] else '·'} background follower: "
                  + (f"running (pid {st['pid']}, following {plural(len(st['following']), 'run')})" if st["running"]
                     else "not running (it starts with your next run, and exits when nothing is active)"), highlight=False)
    user = getpass.getuser()
    kill, linger = daemon.logind_kills_processes(user)
    if kill and not linger:
        console.print(f"{warn} systemd-logind ends every process of yours when you log out (KillUserProcesses=yes), "
                      "the background follower too: your runs keep going, but teammates see them 'running' until "
                      "you open labdeck again.\n  Keep it:  loginctl enable-linger " + esc(user), highlight=False)
    elif kill:
        console.print(f"{ok} KillUserProcesses=yes, but linger is on for {esc(user)}: the follower outlives your logout",
                      highlight=False)
    else:
        console.print(f"{ok} logging out leaves the follower running (systemd-logind KillUserProcesses is off)",
                      highlight=False)
    from . import termimage

    class WouldAsk(Exception):
        pass

    def would_ask() -> str | None:
        raise WouldAsk

    from backends.config import load_config

    setting = load_config(paths).get("ui", "images")
    try:
        mode, why = termimage.choose(setting, os.environ, tty=sys.stdout.isatty() and sys.stdin.isatty(), probe=would_ask)
    except WouldAsk:
        mode, why = "Kitty or Sixel if the terminal answers textual-image's probe at start", "a terminal known to draw images"
    console.print(f"· Media view images here: {esc(mode)} ({esc(why)}; \\[ui] images = {esc(setting)})", highlight=False)


from .cloudcli import COMMANDS as _CLOUD_COMMANDS  # noqa: E402

for _command in _CLOUD_COMMANDS:  # up, stop, start, down, sizes, catalog, spend
    cli.add_command(_command)


def main() -> None:
    try:
        cli(prog_name="labdeck")
    except SystemExit:
        # click's own output (--help, a usage error) met a closed pipe: it exits 1; say it as commands do
        if isinstance(sys.stdout, click.utils.PacifyFlushWrapper):
            sys.exit(PIPE_CLOSED_STATUS)
        try:
            sys.stdout.flush()  # what a command printed before sys.exit (e.g. `ls` with errors)
        except BrokenPipeError:
            pipe_closed()
        raise


if __name__ == "__main__":
    main()
