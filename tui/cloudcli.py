"""Cloud commands: up, stop, start, down, sizes, catalog, spend (registered on the `labdeck` group).

``backends.clouds`` (and through it asyncssh) is imported by each command when it runs, not here:
this module is imported by every `labdeck` start, `--version` and `ps` included."""

from __future__ import annotations

import asyncio
import sys
import time

import click
from rich.table import Table

from backends.errors import LabdeckError

from backends.text import plain_line

from .cliutil import _workstation, console, err_console, esc, fit_table, friendly, print_json
from .format import money, plural

JSON = click.option("--json", "as_json", is_flag=True,
                    help="Print one JSON document (field names in the README's \"JSON output\" section) instead of a table")
CLOUD_TYPES = "ec2 | digitalocean | linode | openstack"


def _provider(ws, given: str | None, usage: str):
    """The cloud provider a command names, or an error that says what to give: the configured cloud
    providers, or how to configure one when there is none."""
    from backends import clouds

    if given:
        return clouds.cloud_provider(ws, given)
    names = sorted(clouds.cloud_providers(ws))
    if not names:
        raise LabdeckError("No cloud provider is configured.",
                           f"Add [providers.NAME] with type = {CLOUD_TYPES} to {ws.config.file} "
                           "(see README, \"Cloud GPU instances\").")
    raise LabdeckError(f"Which cloud provider? Give one: {usage.format(provider=names[0])}",
                       f"Configured cloud providers: {', '.join(names)}.")


def _progress():
    t0 = time.monotonic()

    def say(stage: str, detail: str) -> None:
        style = "yellow" if stage in ("budget", "cleanup") else "cyan"
        console.print(f"[dim]{time.monotonic() - t0:6.1f}s[/] [{style}]{stage:>12}[/] {esc(detail)}", highlight=False)

    return say


@click.command("up")
@click.argument("name")
@click.option("--provider", "-p", default=None, help="Cloud provider (a [providers.NAME] of type ec2, digitalocean, linode, openstack)")
@click.option("--size", default="", help="Size, e.g. g5.xlarge (default: the provider's `size`)")
@click.option("--image", default="", help="Image id, slug or name (default: the provider's GPU-ready image)")
@click.option("--spot", is_flag=True, help="A spot instance (EC2): cheaper, can be taken back by the provider")
@click.option("--autostop", "autostop_minutes", type=float, default=None, help="Idle minutes before it stops itself (0 = never)")
@click.option("--autostop-action", type=click.Choice(["stop", "terminate"]), default=None)
@click.option("--over-budget", is_flag=True, help="Launch even if it passes your daily budget")
@friendly
def up_cmd(name: str, provider: str | None, size: str, image: str, spot: bool, autostop_minutes: float | None,
           autostop_action: str | None, over_budget: bool) -> None:
    """Launch a cloud instance NAME, wait for SSH, bootstrap it (agent, autostop)."""
    from backends import clouds

    ws = _workstation()
    provider = _provider(ws, provider, f"labdeck up {name} --provider {{provider}}").name

    async def go():
        try:
            return await clouds.up(ws, provider, name, size=size, image=image, spot=spot,
                                   autostop_minutes=autostop_minutes, autostop_action=autostop_action,
                                   progress=_progress(), force_budget=over_budget)
        finally:
            await ws.close()

    inst = asyncio.run(go())
    console.print(f"[green]✓[/] {esc(inst.name)} is running at {esc(inst.host)} ({esc(inst.size)}, {money(inst.price_per_hour)}/h). "
                  f"Run on it: labdeck run --on {esc(inst.name)} -- python train.py", highlight=False)


def _lifecycle(verb: str, name: str, force: bool, yes: bool, fn) -> None:
    ws = _workstation()

    async def go():
        try:
            listing = await ws.list_instances()
            inst = next((i for i in listing.instances if i.name == name), None)
            if inst is None:
                raise LabdeckError(f"No instance {name!r}.", "`labdeck ls` lists instances.")
            if not yes:
                owner = f" (launched by {inst.created_by})" if inst.created_by and inst.created_by != ws.user else ""
                outside = "" if inst.managed else " It was NOT launched by labdeck."
                if not sys.stdin.isatty():
                    raise LabdeckError(f"Refusing to {verb} {name} without confirmation (no terminal to ask on).",
                                       "Add --yes.")
                if not click.confirm(plain_line(f"{verb.capitalize()} {name}{owner}, {inst.size} at "
                                                f"{money(inst.price_per_hour)}/h?{outside}")):
                    raise click.Abort()
            return await fn(ws, name, force=force)
        finally:
            await ws.close()

    return asyncio.run(go())


@click.command("stop")
@click.argument("name")
@click.option("--force", is_flag=True, help="Also an instance labdeck did not launch")
@click.option("--yes", "-y", is_flag=True, help="Do not ask")
@friendly
def stop_cmd(name: str, force: bool, yes: bool) -> None:
    """Stop a cloud instance (its disk stays; most providers stop billing compute)."""
    from backends import clouds

    inst = _lifecycle("stop", name, force, yes, clouds.stop)
    console.print(f"{esc(name)}: {esc(inst.state)}")
    if inst.provider_type in clouds.BILLS_WHEN_STOPPED:
        err_console.print(f"[yellow]note:[/] {esc(inst.provider_type)} keeps billing a stopped machine; "
                          f"`labdeck down {esc(name)}` stops the meter.", highlight=False)


@click.command("start")
@click.argument("name")
@click.option("--force", is_flag=True, help="Also an instance labdeck did not launch")
@friendly
def start_cmd(name: str, force: bool) -> None:
    """Start a stopped cloud instance."""
    from backends import clouds

    inst = _lifecycle("start", name, force, True, clouds.start)
    console.print(f"{esc(name)}: {esc(inst.state)}")


@click.command("down")
@click.argument("name")
@click.option("--force", is_flag=True, help="Also an instance labdeck did not launch")
@click.option("--yes", "-y", is_flag=True, help="Do not ask")
@friendly
def down_cmd(name: str, force: bool, yes: bool) -> None:
    """Terminate a cloud instance (its disk is deleted) and the firewall labdeck made for it."""
    from backends import clouds

    _lifecycle("terminate", name, force, yes, clouds.terminate)
    console.print(f"{esc(name)}: terminated")


@click.command("sizes")
@click.argument("provider", required=False)
@click.option("--gpu", is_flag=True, help="Only sizes with GPUs")
@click.option("--refresh", is_flag=True, help="Ask the provider again (and update your catalog file)")
@JSON
@friendly
def sizes_cmd(provider: str | None, gpu: bool, refresh: bool, as_json: bool) -> None:
    """Sizes a cloud PROVIDER offers: GPUs, vCPUs, RAM, $/hr and where the price comes from."""
    ws = _workstation()
    p = _provider(ws, provider, "labdeck sizes {provider}")

    async def go():
        try:
            return await p.sizes(refresh=refresh)
        finally:
            await ws.close()

    sizes = asyncio.run(go())
    if refresh:
        path = p.catalog.write_user(p.type, sizes, p.region)
        (err_console if as_json else console).print(f"[dim]catalog updated: {esc(path)}[/]")
    if as_json:
        from .clijson import size

        shown = sorted((s for s in sizes if s.gpus or not gpu), key=lambda s: (not s.gpus, s.id))
        print_json([size(s, p.name, p.region) for s in shown])
        return
    rows = [(esc(s.id), esc(s.gpu_summary), esc(s.vcpus or "–"), f"{s.ram_mib / 1024:.0f} GiB" if s.ram_mib else "–",
             money(s.price_per_hour) if s.price_per_hour is not None else "?", esc(s.price_source))
            for s in sizes if s.gpus or not gpu]
    rows.sort(key=lambda r: (r[1] == "no GPU", r[0]))
    console.print(fit_table(Table(title=f"{esc(p.name)} sizes in {esc(p.region)}", title_justify="left"),
                            ("size", "GPUs", "vCPUs", "RAM", "$/hr", "price from"), rows, flexible={"price from"}))


@click.command("catalog")
@click.option("--refresh", is_flag=True, required=True, help="Ask every cloud provider for its sizes and prices")
@friendly
def catalog_cmd(refresh: bool) -> None:
    """Refresh the size catalog (GPUs, vCPUs, RAM, $/hr) from every configured cloud provider."""
    from backends import clouds

    ws = _workstation()
    provs = clouds.cloud_providers(ws)
    if not provs:
        _provider(ws, None, "")  # says how to configure one

    async def go():
        try:
            return await asyncio.gather(*(p.sizes(refresh=True) for p in provs.values()), return_exceptions=True)
        finally:
            await ws.close()

    failed = False
    for (name, p), res in zip(provs.items(), asyncio.run(go())):
        if isinstance(res, BaseException):
            failed = True
            err_console.print(f"[bold red]⚠[/] {esc(name)}: {esc(str(res))}", highlight=False)
            continue
        path = p.catalog.write_user(p.type, res, p.region)
        console.print(f"{esc(name)}: {plural(len(res), 'size')} → {esc(path)}")
    if failed:
        sys.exit(1)


@click.command("spend")
@JSON
@friendly
def spend_cmd(as_json: bool) -> None:
    """Burn rate ($/hr now), today's spend and your daily budget."""
    from backends import clouds
    from backends.catalog import spend

    ws = _workstation()
    everyone = clouds.records(ws)  # read once: the spend and the table below
    sp = spend(everyone, ws.user)
    daily = float(ws.config.get("budget", "daily_usd"))
    if as_json:
        from . import clijson

        recs = sorted(everyone, key=lambda r: str(r.get("created_at", "")), reverse=True)
        print_json(clijson.spend(sp, ws.user, daily, recs))
        return
    console.print(f"you: {money(sp.burn_user)}/h now, ${sp.today_user:.2f} today"
                  + (f" of ${daily:.2f} budget" if daily else " (no daily budget: \\[budget] daily_usd)"), highlight=False)
    console.print(f"team: {money(sp.burn_team)}/h now, ${sp.today_team:.2f} today", highlight=False)
    recs = sorted(everyone, key=lambda r: r.get("created_at", ""), reverse=True)[:20]
    if recs:
        rows = [(esc(r.get("name", "")), esc(r.get("created_by", "")), esc(r.get("provider", "")), esc(r.get("state", "")),
                 money(r.get("price_per_hour") or 0), f"${sp.cost_so_far.get(r.get('id', ''), 0):.2f}")
                for r in recs]
        console.print(fit_table(Table(title="instances labdeck launched", title_justify="left"),
                                ("name", "owner", "provider", "state", "$/hr", "cost"), rows, flexible=set()))


@click.command("autostop")
@click.argument("name")
@click.argument("minutes", type=float)
@click.option("--action", type=click.Choice(["stop", "terminate"]), default=None)
@friendly
def autostop_cmd(name: str, minutes: float, action: str | None) -> None:
    """Set an instance's autostop: MINUTES idle before it stops itself (0 = off)."""
    from backends import clouds

    ws = _workstation()

    async def go():
        try:
            await ws.list_instances()
            return await clouds.set_autostop(ws, name, minutes, action)
        finally:
            await ws.close()

    asyncio.run(go())
    console.print(f"{esc(name)}: autostop " + (f"after {minutes:g} idle minutes" if minutes > 0 else "off"), highlight=False)


COMMANDS = [autostop_cmd, up_cmd, stop_cmd, start_cmd, down_cmd, sizes_cmd, catalog_cmd, spend_cmd]
