"""Cloud instances as labdeck keeps them: launch, lifecycle, billing, preemption.

Each instance labdeck launches has a record in its owner's store (table ``instances``, keyed by
its ``labdeck-id`` tag)::

    name, provider, provider_type, size, region, spot, image, price_per_hour, created_by, created_at,
    state      what labdeck last saw: pending | running | stopped | terminated | preempted | failed
    desired    what labdeck (or its user) last asked for: running | stopped | terminated
    running_since, billed   the open billed interval and the closed ones ([start, end] pairs)
    autostop_minutes, autostop_action, note

The billing record is what the cost so far, today's spend, the burn rate and the daily budget are
computed from (:mod:`backends.catalog`). An instance labdeck finds stopped or gone while it
``desired`` it running was stopped by something else: autostop (its state file says it fired),
or the provider (spot reclaim, maintenance). The provider's doing makes its runs ``preempted``;
with ``spot_relaunch`` on, a new instance of the same spec is launched and each run is started
again there, as a ``resume`` child in lineage, from the last checkpoint labdeck copied off.
"""

from __future__ import annotations

import asyncio
import shlex
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from . import clock
from . import autostop
from .catalog import Spend, check_budget, close_interval, spend
from .errors import LabdeckError, ProviderError
from .ids import new_id
from .models import Instance, Run, RunState, parse_time_lenient, utcnow
from .providers import InstanceSpec
from .providers.cloud import CloudProvider

TABLE = "instances"
CHECKPOINT_MAX = 2 << 30  # bytes of one checkpoint labdeck copies off an instance (and puts on the new one)

BOOTSTRAP = r"""set -e
mkdir -p {runs}
command -v python3 >/dev/null 2>&1 || {{ echo "no python3 on the image" >&2; exit 3; }}
python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 8) else 4)' || {{ echo "python3 is older than 3.8" >&2; exit 4; }}
python3 -c 'import sys; print(sys.version.split()[0])'
nvidia-smi -L 2>/dev/null || echo "no NVIDIA driver"
"""

Progress = Callable[[str, str], None]


class BudgetExceeded(LabdeckError):
    pass


def cloud_providers(ws) -> dict[str, CloudProvider]:
    return {n: p for n, p in ws.providers.items() if isinstance(p, CloudProvider)}


def cloud_provider(ws, name: str) -> CloudProvider:
    p = ws.providers.get(name)
    if not isinstance(p, CloudProvider):
        names = ", ".join(cloud_providers(ws)) or "none configured"
        raise LabdeckError(f"{name!r} is not a cloud provider (cloud providers: {names}).",
                           'Add one to the config, e.g. [providers.aws] type = "ec2".')
    return p


def records(ws, *, team: bool = True) -> list[dict[str, Any]]:
    if team:
        docs, _ = ws.store.team_records(TABLE)
        return docs
    return ws.store.mine.all(TABLE)


def _latest_live(recs: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    live = [r for r in recs if r.get("name") == name and r.get("state") not in ("terminated", "failed")]
    return max(live, key=lambda r: r.get("created_at", ""), default=None)


def my_record(ws, name: str) -> dict[str, Any] | None:
    return _latest_live(records(ws, team=False), name)


def current_spend(ws, now: datetime | None = None) -> Spend:
    return spend(records(ws), ws.user, now)


def _put(ws, rec: dict[str, Any]) -> dict[str, Any]:
    ws.store.mine.put(TABLE, rec["id"], rec)
    return rec


def _mutate(ws, rec_id: str, **fields: Any) -> dict[str, Any] | None:
    def change(doc):
        return None if doc is None else {**doc, **fields}

    return ws.store.mine.mutate(TABLE, rec_id, change)


# providers that bill a stopped (powered-off) machine as if it ran: only terminating it stops the meter
BILLS_WHEN_STOPPED = frozenset({"digitalocean", "linode"})


def billed(provider_type: str, state: str) -> bool:
    return state in ("running", "pending", "stopping") or (state == "stopped" and provider_type in BILLS_WHEN_STOPPED)


def _set_running(rec: dict[str, Any], running: bool, at: str) -> dict[str, Any]:
    if running and not rec.get("running_since"):
        return {**rec, "running_since": at}
    if not running and rec.get("running_since"):
        return close_interval(rec, at)
    return rec


# ---- launch ---------------------------------------------------------------------------------

async def up(ws, provider: str, name: str, *, size: str = "", image: str = "", spot: bool = False,
             autostop_minutes: float | None = None, autostop_action: str | None = None,
             progress: Progress | None = None, force_budget: bool = False) -> Instance:
    """Launch an instance, bootstrap it (runs dir, Python check, agent, autostop) and record it.

    Refused when the user's daily budget would be passed within the hour; a failure at any step
    leaves nothing behind at the provider (see :meth:`CloudProvider.create`)."""
    say = progress or (lambda stage, detail: None)
    p = cloud_provider(ws, provider)
    size = size or str(p.options["size"])
    await p.sizes()
    info = p.size_info(size)
    price = info.price_per_hour or 0.0
    daily = float(ws.config.get("budget", "daily_usd"))
    check = check_budget(current_spend(ws), daily, price, float(ws.config.get("budget", "warn_fraction")))
    if not check.ok and not force_budget:
        raise BudgetExceeded(check.message, "Stop instances you are not using, raise [budget] daily_usd, "
                                            "or launch with --over-budget.")
    if check.warn:
        say("budget", check.message)
    if info.price_per_hour is None:
        say("budget", f"no price known for {size}: it does not count toward the budget")
    listing = await ws.list_instances()
    if any(i.name == name for i in listing.instances):
        raise ProviderError(f"There is already an instance named {name}.", "Choose another name.")
    minutes = float(p.options["autostop_minutes"] if autostop_minutes is None else autostop_minutes)
    action = str(autostop_action or p.options["autostop_action"])
    if spot and action == "stop":
        action = "terminate"  # a one-time spot instance cannot be stopped, only terminated
    labdeck_id = new_id()
    rec: dict[str, Any] = {
        "id": labdeck_id, "name": name, "provider": p.name, "provider_type": p.type, "size": size,
        "region": p.region, "spot": spot, "image": image or str(p.options["image"]), "price_per_hour": price,
        "price_source": info.price_source, "gpus": info.gpu_summary, "created_by": ws.user, "created_at": utcnow(),
        "state": "pending", "desired": "running", "running_since": None, "billed": [], "autostop_minutes": minutes,
        "autostop_action": action, "note": "", "cloud_id": "",
    }

    def on_created(inst: Instance) -> None:  # billed from the moment the provider accepted it
        rec.update(cloud_id=inst.cloud_id, running_since=utcnow())
        _put(ws, rec)

    spec = InstanceSpec(name=name, size=size, region=p.region, image=image, spot=spot,
                        options={"autostop_action": action})
    try:
        inst = await p.create(spec, progress=say, user=ws.user, labdeck_id=labdeck_id, on_created=on_created,
                              bootstrap=lambda transport: bootstrap(ws, p, transport, minutes, action, say))
    except BaseException as e:
        if rec.get("cloud_id"):
            done = {**close_interval(rec, utcnow()), "state": "failed", "desired": "terminated",
                    "note": str(e)[:500]}
            _put(ws, done)
        raise
    _put(ws, {**rec, "state": "running", "host": inst.host})
    ws.remember_instance(inst)
    say("ready", f"{name} is up at {inst.host}: {info.gpu_summary}, ${price:.3f}/h"
                 + (f", stops itself after {minutes:g} idle minutes" if minutes else ", autostop off"))
    return inst


async def bootstrap(ws, p: CloudProvider, transport, minutes: float, action: str, say: Progress) -> None:
    from .monitor import ensure_agent

    say("bootstrap", "runs directory, Python")
    runs = await transport.runs_root()
    res = await transport.run(BOOTSTRAP.format(runs=shlex.quote(runs)), timeout=60)
    if not res.ok:
        raise ProviderError(f"Bootstrap on {transport.instance} failed: "
                            f"{res.stderr.decode('utf-8', 'replace').strip()[:300] or 'exit ' + str(res.exit_code)}",
                            "Use an image with python3 (3.8 or newer), or set `image` in the provider's config.")
    lines = res.text().splitlines()
    say("bootstrap", f"python {lines[0] if lines else '?'}; {lines[1] if len(lines) > 1 else ''}; starting the agent")
    await ensure_agent(transport, gpu_source=ws.config.get("monitor", "gpu_source"))
    if minutes > 0:
        say("bootstrap", f"autostop: {action} after {minutes:g} idle minutes")
        await autostop.ensure(transport, idle_minutes=minutes, action=action, gpu_source=_autostop_gpu_source(ws))


def _autostop_gpu_source(ws) -> str:
    """How the daemon reads GPU use: nvidia-smi wherever the monitor would find GPUs (the daemon is
    stdlib-only), or what `[monitor] gpu_source` says otherwise ("none", a fake's path)."""
    src = ws.config.get("monitor", "gpu_source")
    return "nvidia-smi" if src in ("auto", "nvitop", "nvidia-smi") else src


# ---- lifecycle ------------------------------------------------------------------------------

async def _provider_of(ws, name: str) -> CloudProvider:
    p = await ws.provider_of(name)
    if not isinstance(p, CloudProvider):
        raise LabdeckError(f"{name} is on the {p.name} provider ({p.type}): labdeck does not start, stop or terminate it.")
    return p


def _want(ws, rec: dict[str, Any] | None, desired: str) -> None:
    """Say what labdeck is about to ask for BEFORE asking: a listing that lands while the provider
    works on it must not take labdeck's own stop or terminate for a preemption."""
    if rec is not None and rec.get("created_by") == ws.user:
        _mutate(ws, rec["id"], desired=desired)


async def stop(ws, name: str, *, force: bool = False) -> Instance:
    p = await _provider_of(ws, name)
    rec = my_record(ws, name) or _team_record(ws, name)
    _want(ws, rec, "stopped")
    ws.autostop_states.pop(name, None)
    try:
        inst = await p.stop(name, force=force)
    except BaseException:
        _want(ws, rec, (rec or {}).get("desired", "running"))  # it did not happen: back to what it was
        raise
    _after(ws, rec, desired="stopped", state=inst.state, running=billed(p.type, "stopped"))
    ws.remember_instance(inst)
    return inst


async def start(ws, name: str, *, force: bool = False, progress: Progress | None = None) -> Instance:
    """Start it, wait for SSH, and start its autostop again (the daemon does not survive a stop)."""
    p = await _provider_of(ws, name)
    rec = my_record(ws, name) or _team_record(ws, name)
    _want(ws, rec, "running")
    ws.autostop_states.pop(name, None)
    inst = await p.start(name, force=force, progress=progress)
    _after(ws, rec, desired="running", state=inst.state, running=True)
    ws.remember_instance(inst)
    if rec and float(rec.get("autostop_minutes") or 0) > 0 and inst.state == "running":
        await autostop.ensure(p.transport(name), idle_minutes=float(rec["autostop_minutes"]),
                              action=str(rec.get("autostop_action") or "stop"), gpu_source=_autostop_gpu_source(ws))
    return inst


async def terminate(ws, name: str, *, force: bool = False) -> None:
    p = await _provider_of(ws, name)
    rec = my_record(ws, name) or _team_record(ws, name)
    _want(ws, rec, "terminated")
    try:
        await p.destroy(name, force=force)
    except BaseException:
        if name in p._nodes:  # the provider did not take it: back to what it was
            _want(ws, rec, (rec or {}).get("desired", "running"))
            raise
        _after(ws, rec, desired="terminated", state="terminated", running=False)  # gone; only its firewall stayed
        ws.forget_instance(name)
        raise
    _after(ws, rec, desired="terminated", state="terminated", running=False)
    ws.forget_instance(name)


async def set_autostop(ws, name: str, minutes: float, action: str | None = None) -> dict | None:
    """Change an instance's autostop (0 = off) on the instance itself, and in its record."""
    p = await _provider_of(ws, name)
    if not p.owns(name):
        raise ProviderError(f"{name} was not launched by labdeck: it has no labdeck autostop.")
    transport = p.transport(name)
    rec = my_record(ws, name) or _team_record(ws, name)
    was = (rec or {}).get("autostop_action") or str(p.options["autostop_action"])
    if action and action != was and p.type == "ec2":
        # EC2 decides stop or terminate on shutdown by an attribute set at launch
        raise ProviderError(f"{name} was launched to {was} on shutdown; EC2 keeps that for the instance's life.",
                            "Change the idle minutes only, or launch a new instance with the other action.")
    action = action or was
    if minutes <= 0:
        await autostop.disable(transport)
        state = None
    else:
        state = await autostop.ensure(transport, idle_minutes=minutes, action=action, gpu_source=_autostop_gpu_source(ws))
    if rec is not None and rec.get("created_by") == ws.user:
        _mutate(ws, rec["id"], autostop_minutes=minutes, autostop_action=action)
    ws.autostop_states.pop(name, None)
    return state


def _team_record(ws, name: str) -> dict[str, Any] | None:
    return _latest_live(records(ws), name)


def _after(ws, rec: dict[str, Any] | None, *, desired: str, state: str, running: bool) -> None:
    """Record a lifecycle change in the owner's record (only the owner writes their records: a
    teammate stopping someone's instance changes the provider, and the owner's labdeck sees it)."""
    if rec is None or rec.get("created_by") != ws.user:
        return
    now = utcnow()
    def change(doc):
        if doc is None:
            return None
        new = _set_running({**doc, "desired": desired, "state": state}, running, now)
        if state == "terminated":
            new["ended_at"] = now
        return new

    ws.store.mine.mutate(TABLE, rec["id"], change)


# ---- reconcile: billing, autostop, preemption -----------------------------------------------

def enrich(ws, instances: list[Instance], now: datetime | None = None,
           team_records: list[dict[str, Any]] | None = None) -> Spend:
    """Cost so far and the autostop countdown onto listed cloud instances; returns the spend they
    were computed from. ``team_records``: the team's instance records, when the caller has them."""
    recs = {r["id"]: r for r in (records(ws) if team_records is None else team_records)}
    sp = spend(recs.values(), ws.user, now)
    by_name = {r.get("name"): r for r in recs.values() if r.get("state") not in ("terminated", "failed")}
    for inst in instances:
        rec = recs.get(inst.labdeck_id) or by_name.get(inst.name)
        if rec is not None:
            inst.cost = sp.cost_so_far.get(rec.get("id", ""), 0.0)
        st = ws.autostop_states.get(inst.name)
        if st is not None and inst.state == "running":
            inst.autostop = autostop.countdown(st[1], now)
        elif rec is not None and inst.state == "running" and float(rec.get("autostop_minutes") or 0) <= 0:
            inst.autostop = "off"
    return sp


async def poll_autostop(ws, instances: list[Instance], max_age: float = 10.0) -> None:
    """Read the autostop state of running labdeck instances (at most every ``max_age`` s each)."""
    now = time.monotonic()

    async def one(inst: Instance) -> None:
        try:
            transport = await ws.transport(inst.name)
            state = await asyncio.wait_for(autostop.read_state(transport), 10)
        except (LabdeckError, asyncio.TimeoutError):
            return
        if state is not None:
            ws.autostop_states[inst.name] = (time.monotonic(), state)

    due = [i for i in instances if i.managed and i.state == "running"
           and now - ws.autostop_states.get(i.name, (0.0, None))[0] > max_age]
    await asyncio.gather(*(one(i) for i in due))


async def reconcile(ws, listing, answered: set[str]) -> list[str]:
    """Bring this user's instance records in line with what the providers that answered say.

    Returns one line per event (stopped by autostop, preempted, gone), for the TUI and the CLI."""
    events: list[str] = []
    seen = {i.labdeck_id: i for i in listing.instances if i.labdeck_id}
    now = utcnow()
    now_dt = clock.now()
    for rec in records(ws, team=False):
        p = ws.providers.get(rec.get("provider", ""))
        if rec.get("provider") not in answered or not isinstance(p, CloudProvider):
            continue
        if rec.get("relaunch") == "pending" and rec["id"] not in ws.relaunching and ws.starts_relaunches:
            _start_relaunch(ws, rec)
        if rec.get("state") in ("terminated", "failed", "preempted"):
            continue
        if rec.get("region") and rec["region"] != p.region or rec.get("name") in p._creating:
            continue  # another region than this provider lists now, or a launch still under way
        inst = seen.get(rec["id"])
        state = inst.state if inst is not None else "terminated"
        if inst is not None and state in ("pending", "stopping", "unknown"):
            continue
        created = parse_time_lenient(rec.get("created_at"))
        if inst is None and p.type == "ec2" and rec["id"] not in p.terminated_ids and created \
                and (now_dt - created).total_seconds() < 60:
            continue  # EC2 may not list a brand-new instance for a few seconds (eventual consistency)
        meter = billed(rec.get("provider_type", ""), state)
        if meter == bool(rec.get("running_since")) and state == rec.get("state"):
            continue
        fired = _autostop_fired(ws, rec)
        inside = rec["id"] in p.shut_down_inside  # the provider says the VM shut itself down
        if not fired and inside and rec.get("autostop_minutes"):
            fired = p.shut_down_inside[rec["id"]] or now  # autostop's doing, while labdeck was not looking
        at = fired or now
        if state != "running" and rec.get("desired") == "running":
            if fired and state == "stopped" and rec.get("autostop_action") == "terminate":
                # the VM could only power itself off (no credentials on it); labdeck finishes the job
                _mutate(ws, rec["id"], desired="terminated")
                try:
                    await p.destroy(rec["name"])
                except LabdeckError as e:
                    events.append(f"{rec['name']}: autostop powered it off but terminating it failed: {e}")
                else:
                    _mutate_billing(ws, rec["id"], state="terminated", meter=False, at=fired, ended_at=now,
                                    note=f"autostop powered it off at {fired}; labdeck terminated it")
                    events.append(f"{rec['name']}: idle, powered off by autostop and terminated by labdeck")
                    continue
            if fired:
                verb = "stopped" if state == "stopped" else "terminated"
                _mutate_billing(ws, rec["id"], state=state, meter=meter, at=at, desired=verb,
                                note=f"autostop {verb} it at {fired}", **({"ended_at": at} if verb == "terminated" else {}))
                events.append(f"{rec['name']}: {verb} by autostop after {rec.get('autostop_minutes'):g} idle minutes")
                continue
            if inside:  # someone's poweroff on the VM (no autostop there): not the provider's doing
                _mutate_billing(ws, rec["id"], state=state, meter=meter, at=now, desired=state,
                                note=f"shut down from inside the instance by {now}",
                                **({"ended_at": now} if state == "terminated" else {}))
                events.append(f"{rec['name']}: {state}, shut down from inside the instance (not by labdeck)")
                continue
            done = _mutate_billing(ws, rec["id"], state="preempted", meter=billed(rec.get("provider_type", ""), state),
                                   at=now, only_if_desired="running", desired="terminated" if inst is None else "stopped",
                                   preempted_at=now, note=f"{'removed' if inst is None else state} by the provider at {now}")
            if done is None:
                continue  # labdeck itself asked for this meanwhile
            events.append(f"{rec['name']}: {'gone' if inst is None else state} — taken by the provider")
            events.extend(await _preempted(ws, done))
            continue
        _mutate_billing(ws, rec["id"], state=state, meter=meter, at=at, **({"ended_at": at} if state == "terminated" else {}))
    return events


def _mutate_billing(ws, rec_id: str, *, state: str, meter: bool, at: str, only_if_desired: str | None = None,
                    **fields: Any) -> dict[str, Any] | None:
    """Change a record from its current stored version (not a copy read before an await)."""
    result: dict[str, Any] = {}

    def change(doc):
        if doc is None or (only_if_desired and doc.get("desired") != only_if_desired):
            return doc
        new = _set_running({**doc, **fields, "state": state}, meter, at)
        result["doc"] = new
        return new

    ws.store.mine.mutate(TABLE, rec_id, change)
    return result.get("doc")


def _autostop_fired(ws, rec: dict[str, Any]) -> str | None:
    """When autostop fired on this instance, if it did during its current run (an older state file
    left from before a stop and start does not count)."""
    st = ws.autostop_states.get(rec.get("name", ""))
    fired = (st[1] or {}).get("fired_at") if st else None
    since = rec.get("running_since")
    if fired and since and (parse_time_lenient(fired) or clock.now()) < (parse_time_lenient(since) or clock.now()):
        return None
    return fired


async def _preempted(ws, rec: dict[str, Any]) -> list[str]:
    """The runs of a preempted instance become ``preempted``; relaunched when the provider says so."""
    events = []
    runs, _ = ws.store.runs(team=False)
    hit = [r for r in runs if r.instance == rec["name"] and r.created_at >= (rec.get("created_at") or "")
           and (r.run_state.is_active or r.state == "lost")]
    done = []
    for r in hit:
        try:
            if r.state in ("queued", "syncing"):  # waiting on the instance: it is lost with it
                ws.store.transition(r.id, RunState.LOST, state_reason=f"the instance {rec['name']} was taken by the provider")
            done.append(ws.store.transition(r.id, RunState.PREEMPTED, ended_at=rec.get("preempted_at") or utcnow(),
                                            state_reason=f"the instance {rec['name']} was taken by the provider"))
        except LabdeckError:
            continue
    if done:
        events.append(f"{rec['name']}: {len(done)} run(s) preempted")
    p = ws.providers.get(rec.get("provider", ""))
    if done and isinstance(p, CloudProvider) and p.options.get("spot_relaunch"):
        rec = _mutate(ws, rec["id"], relaunch="pending", relaunch_runs=[r.id for r in done]) or rec
        _start_relaunch(ws, rec)
        events.append(f"{rec['name']}: relaunching {len(done)} run(s) on a new instance")
    return events


def _start_relaunch(ws, rec: dict[str, Any]) -> None:
    """Relaunch in the background; the record says ``relaunch: pending`` until it is done, so a
    labdeck that closes first picks it up again next time."""
    async def go() -> None:
        try:
            runs = [ws.store.find_run(i) for i in rec.get("relaunch_runs") or []]
            out = await relaunch(ws, rec, runs)
        except LabdeckError as e:
            _mutate(ws, rec["id"], relaunch=f"failed: {e}"[:300])
            raise
        finally:
            ws.relaunching.discard(rec["id"])
        _mutate(ws, rec["id"], relaunch="done: " + ", ".join(r.id for r in out))

    ws.relaunching.add(rec["id"])
    ws.background(go(), f"relaunch after {rec['name']} was preempted")


async def relaunch(ws, rec: dict[str, Any], runs: list[Run], progress: Progress | None = None) -> list[Run]:
    """A new instance like ``rec``; each run started again there from its last checkpoint, as a child."""
    base = rec["name"].rsplit("-r", 1)[0] if rec["name"].rsplit("-r", 1)[-1].isdigit() else rec["name"]
    n = 1
    names = {r.get("name") for r in records(ws)}
    while f"{base}-r{n}" in names:
        n += 1
    name = f"{base}-r{n}"
    await up(ws, rec["provider"], name, size=rec.get("size", ""), image=rec.get("image", ""),
             spot=bool(rec.get("spot")), autostop_minutes=rec.get("autostop_minutes"),
             autostop_action=rec.get("autostop_action"), progress=progress)
    out = []
    for run in runs:
        out.append(await resume(ws, run, name))
    return out


async def resume(ws, run: Run, instance: str) -> Run:
    """Start ``run`` again on ``instance`` as a ``resume`` child, with its last checkpoint (if any).

    Only your own runs: a resume runs the record's command with its environment, as you."""
    if run.user != ws.user:
        raise LabdeckError(f"{run.display_name} is {run.user}'s run: only its owner resumes it.",
                           "Rerun it instead (labdeck shows the command and asks first).")
    env = dict(run.env)
    ck = run.checkpoint or {}
    local = Path(ck.get("local", "")) if ck.get("local") else None
    if local is not None and local.exists():
        transport = await ws.transport(instance)
        root = await transport.runs_root()
        dest = f"{root}/resume/{run.id}/{Path(ck['path']).name}"
        await transport.put_files({dest: await asyncio.to_thread(local.read_bytes)})
        env["LABDECK_RESUME_FROM"] = dest
    root = run.code.get("root")
    workdir = str(Path(root) / run.code.get("subdir", "")) if root else run.workdir
    name = run.name.split(" (resumed")[0] if run.name else run.id[-8:].lower()
    return await ws.launch(run.command, instance=instance, workdir=workdir, env=env, name=f"{name} (resumed)",
                           parent=run.id, sync_code=bool(run.code) and Path(workdir).is_dir(), kind="resume")


async def fetch_checkpoint(ws, run: Run, path: str, step: Any, transport) -> dict[str, Any] | None:
    """Copy a run's declared checkpoint off the instance (atomically, the latest only)."""
    if run.checkpoint.get("path") == path and run.checkpoint.get("step") == step and (
            run.checkpoint.get("local") or run.checkpoint.get("too_big")):
        return None
    dest_dir = ws.config.paths.cache_dir / "checkpoints" / run.id
    dest_dir.mkdir(parents=True, exist_ok=True)
    tmp = dest_dir / ".partial"
    offset = 0
    with open(tmp, "wb") as out:
        while True:
            part = await transport.read_file(path, offset, 4 << 20)
            if not part.data:
                break
            out.write(part.data)
            offset += len(part.data)
            if offset > CHECKPOINT_MAX:  # recorded, so it is not fetched again at every step
                tmp.unlink(missing_ok=True)
                return {**run.checkpoint, "path": path, "step": step, "too_big": True, "local": "",
                        "note": f"over {CHECKPOINT_MAX >> 30} GiB: not copied off the instance"}
            if part.next_offset >= part.size:
                break
    final = dest_dir / Path(path).name
    tmp.replace(final)
    for old in dest_dir.iterdir():
        if old != final:
            old.unlink(missing_ok=True)
    return {"path": path, "step": step, "local": str(final), "bytes": offset, "at": utcnow()}


__all__ = ["up", "stop", "start", "terminate", "reconcile", "enrich", "poll_autostop", "relaunch", "resume",
           "fetch_checkpoint", "records", "current_spend", "BudgetExceeded", "cloud_providers", "cloud_provider"]
