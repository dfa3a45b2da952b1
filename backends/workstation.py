"""The one object the TUI and the CLI talk to: config + store + providers.

It fans provider calls out concurrently with a per-provider timeout, so a slow
or failing provider never holds back the others; failures come back as
per-provider error texts next to the instances that did answer.
"""

from __future__ import annotations

import asyncio
import json
import math
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import code, jobs, lineage
from .config import Config, load_config
from .errors import LabdeckError, NotFoundError, TransportError
from .health import HOST_DEADLINE, HealthMap
from .follow import LogFollower
from .ids import new_id
from .monitor import UPDATE_SLICE, Monitor
from .models import Edge, Instance, Run, RunState
from .ownership import copy_code, is_own_run
from .paths import Paths
from .providers import Provider, Transport, build_providers
from .store import Store


def examples_dir() -> Path:
    """The bundled example projects (next to the source tree, or inside the wheel)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_examples", here.parent / "examples"):
        if candidate.is_dir():
            return candidate
    raise LabdeckError("The bundled examples are missing from this installation.", "Reinstall labdeck.")




@dataclass
class RerunChanges:
    """A rerun's command and environment after the changes, and each parameter change: (key, old, new, where)
    with ``where`` "command" (rewritten in the command line) or ``LABDECK_PARAMS`` (for labdeck.config())."""

    command: str
    env: dict[str, str]
    params: list[tuple[str, object, object, str]]


@dataclass
class InstanceListing:
    instances: list[Instance]
    errors: dict[str, str] = field(default_factory=dict)  # provider name -> message
    events: list[str] = field(default_factory=list)  # instances stopped by autostop, preempted, gone


class Workstation:
    def __init__(self, config: Config, store: Store | None = None, providers: dict[str, Provider] | None = None) -> None:
        self.config = config
        self.store = store if store is not None else Store.from_config(config)
        self.providers = providers if providers is not None else build_providers(config)
        self._instance_provider: dict[str, str] = {}
        self._listing: asyncio.Future[InstanceListing] | None = None
        self._instances: dict[str, Instance] = {}
        self._partial_callbacks: list = []
        self._last_parts: dict[str, list[Instance]] = {}  # provider -> its instances in the last listing
        self.autostop_states: dict[str, tuple[float, dict]] = {}  # instance -> (monotonic read time, state)
        self._background: set[asyncio.Task] = set()
        self.relaunching: set[str] = set()  # instance records whose preempted runs are being relaunched
        # a listing starts pending relaunches only where they can finish: the TUI and `labdeck ls` (which
        # waits for them); a one-shot command would cancel one half-way when it closes
        self.starts_relaunches = True
        self.background_errors: list[str] = []
        self.health = HealthMap()  # which hosts cannot be reached now, since when, why (backends/health.py)
        self._rounds: dict[str, asyncio.Task] = {}  # instance -> its round of status reads under way
        for p in self.providers.values():
            watch = getattr(p, "watch_health", None)
            if watch is not None:
                watch(self.health)
        self.follower = LogFollower(self, config.paths.cache_dir / "logs")
        self.monitor = Monitor(self, config.paths.cache_dir, pattern=config.get("monitor", "log_pattern") or None,
                               gpu_source=config.get("monitor", "gpu_source"))

    @classmethod
    def open(cls, home: str | None = None) -> "Workstation":
        return cls(load_config(Paths.resolve(home)))

    @property
    def user(self) -> str:
        return self.config.user

    async def list_instances(self, timeout: float = 10.0, on_partial=None) -> InstanceListing:
        """Every provider's instances, asked concurrently. Callers at the same moment share one round.

        ``on_partial(listing)`` is called each time one more provider has answered (or failed), so a
        slow provider never holds back the others on screen."""
        if self._listing is not None and not self._listing.done():
            if on_partial is not None:
                self._partial_callbacks.append(on_partial)
            return await asyncio.shield(self._listing)
        self._partial_callbacks = [on_partial] if on_partial is not None else []
        self._listing = asyncio.ensure_future(self._list_instances(timeout))
        return await asyncio.shield(self._listing)

    async def _list_instances(self, timeout: float) -> InstanceListing:
        from . import clouds

        async def one(name: str, p: Provider) -> tuple[str, list[Instance] | BaseException]:
            try:
                return name, await asyncio.wait_for(p.list_instances(), timeout)
            except Exception as e:  # noqa: BLE001 - reported per provider below
                return name, e

        names = list(self.providers)
        parts: dict[str, list[Instance]] = {}
        listing = InstanceListing([])
        answered: set[str] = set()
        team_records = None  # read once per round, when the first cloud answers
        for fut in asyncio.as_completed([one(n, self.providers[n]) for n in names]):
            name, res = await fut
            if isinstance(res, BaseException):
                if isinstance(res, asyncio.TimeoutError):
                    listing.errors[name] = f"{name}: no answer within {timeout:g}s"
                elif isinstance(res, LabdeckError):
                    listing.errors[name] = str(res) if str(res).startswith(f"{name}:") else f"{name}: {res}"
                else:
                    listing.errors[name] = f"{name}: {type(res).__name__}: {res}"
            else:
                answered.add(name)
                for inst in res:
                    self._instance_provider[inst.name] = name
                    self._instances[inst.name] = inst
                parts[name] = res
            listing.instances = [i for n in names for i in parts.get(n, [])]
            if any(isinstance(self.providers[n], clouds.CloudProvider) for n in parts):
                try:
                    if team_records is None:
                        team_records = clouds.records(self)
                    clouds.enrich(self, listing.instances, team_records=team_records)
                except Exception as e:  # noqa: BLE001 - a bad record must not cost the listing
                    listing.errors["records"] = f"cost and autostop could not be shown: {type(e).__name__}: {e}"
            if self._partial_callbacks:
                # providers that have not answered yet keep what they showed last time, so rows do not
                # vanish and come back (a cursor on them would jump to another instance)
                shown = [i for n in names for i in (parts.get(n, []) if n in parts or n in listing.errors
                                                    else self._last_parts.get(n, []))]
                for cb in list(self._partial_callbacks):
                    cb(InstanceListing(shown, dict(listing.errors)))
        self._last_parts = parts
        if any(isinstance(self.providers[n], clouds.CloudProvider) for n in answered):
            try:
                listing.events = await clouds.reconcile(self, listing, answered)
            except Exception as e:  # noqa: BLE001 - the listing itself stands
                listing.events = [f"updating the instance records failed: {type(e).__name__}: {e}"]
        return listing

    def remember_instance(self, inst: Instance) -> None:
        for name, p in self.providers.items():
            if p.name == inst.provider:
                self._instance_provider[inst.name] = name
        self._instances[inst.name] = inst

    def forget_instance(self, name: str) -> None:
        self._instance_provider.pop(name, None)
        self._instances.pop(name, None)
        self.autostop_states.pop(name, None)

    async def wait_background(self, on_wait=None) -> None:
        """Let background work (a relaunch after a preemption) finish before a CLI command exits."""
        if self._background and on_wait is not None:
            on_wait(len(self._background))
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    def background(self, coro, what: str) -> asyncio.Task:
        """Run ``coro`` in the background; its failure is kept in ``background_errors``."""
        task = asyncio.ensure_future(coro)

        def done(t: asyncio.Task) -> None:
            self._background.discard(t)
            if not t.cancelled() and t.exception() is not None:
                self.background_errors.append(f"{what}: {t.exception()}")

        self._background.add(task)
        task.add_done_callback(done)
        return task

    async def provider_of(self, instance: str) -> Provider:
        listing = None
        if instance not in self._instance_provider:
            # a provider whose instances are in the config (local, the team's SSH hosts) answers by name:
            # `labdeck run --on gpu1` neither resolves nor connects to every other host first
            for pname, p in self.providers.items():
                has = getattr(p, "has_instance", None)
                if has is not None and has(instance):
                    self._instance_provider[instance] = pname
                    break
        if instance not in self._instance_provider:
            listing = await self.list_instances()
        name = self._instance_provider.get(instance)
        if name is None and listing is not None and listing.errors:
            # a provider that failed to answer may hold it: that is not "gone"
            raise LabdeckError(f"Instance {instance!r} was not found, and some providers did not answer: "
                               + "; ".join(listing.errors.values()))
        if name is None:
            known = ", ".join(sorted(self._instance_provider)) or "none"
            raise NotFoundError(f"No instance {instance!r} (known: {known}).", "`labdeck ls` lists instances.")
        return self.providers[name]

    async def transport(self, instance: str) -> Transport:
        return (await self.provider_of(instance)).transport(instance)

    async def launch(self, command: str, *, instance: str = "local", workdir: str | None = None,
                     env: dict[str, str] | None = None, name: str = "", parent: str | None = None,
                     sync_code: bool = True, progress=None, kind: str = "parent", run_kind: str = "job",
                     params: dict | None = None, secrets: dict[str, str] | None = None) -> Run:
        """Start ``command`` on ``instance`` (see :func:`backends.jobs.launch`); ``secrets`` (name →
        value) reach the job through a 0600 file, never the store."""
        provider = await self.provider_of(instance)
        transport = provider.transport(instance)
        inst = self._instances.get(instance)
        if inst is None:
            inst = await provider.describe(instance)
        price = inst.price_per_hour
        info = {"provider": inst.provider, "provider_type": inst.provider_type, "vcpus": inst.vcpus,
                "memory_mib": inst.memory_mib, "gpus": inst.gpu_summary if inst.gpus else "", "host": inst.host}
        max_concurrent = provider.max_concurrent(instance)
        return await jobs.launch(self.store, transport, instance=instance, command=command,
                                 workdir=workdir or str(Path.cwd()), runs_root=await transport.runs_root(),
                                 env=env, name=name, parent=parent, price_per_hour=price, sync_code=sync_code,
                                 code_cache=self.config.paths.cache_dir / "hashes.json",
                                 max_concurrent=max_concurrent, progress=progress, kind=kind, instance_info=info,
                                 run_kind=run_kind, params=params, secrets=secrets)

    async def rerun(self, ref: str | Run, *, command: str | None = None, instance: str | None = None,
                    env: dict[str, str] | None = None, name: str | None = None, sets: dict[str, str] | None = None) -> Run:
        """Run a run's command again, from its recorded code, as a child of it in lineage.

        ``ref`` may be the Run a person was shown and said yes to: that record is what runs, not one
        read again afterwards (its owner could have changed it meanwhile). Someone else's run is
        rerun from a copy of its recorded code on its instance, in a directory of yours: no git
        command runs in their tree (its config can name programs: filters, fsmonitor).

        With changes ("the same, but lr=3e-4"): ``command``, ``instance``, ``env`` and ``name`` replace
        the run's; ``sets`` (key → value) are applied by :func:`backends.lineage.set_params` (in the
        command where the key is written there, else through ``$LABDECK_PARAMS`` for ``labdeck.config()``).
        The new run is a child of the old one (edge kind "rerun"); lineage shows the changed parameters."""
        old = ref if isinstance(ref, Run) else self.store.find_run(ref)
        plan = self.rerun_plan(old, command=command, env=env, sets=sets)
        command, env = plan.command, plan.env
        if name is None or not name.strip():
            name = old.name if old.name.endswith("(rerun)") else f"{old.name or old.id[-8:].lower()} (rerun)"
        instance = instance or old.instance
        transport = await self.transport(old.instance)
        if not is_own_run(self, old, await transport.runs_root()):
            if instance != old.instance:
                raise LabdeckError(f"{old.user}'s run {old.display_name} has its code on {old.instance}, not {instance}.",
                                   f"Rerun it on {old.instance} (its code is copied there, in a directory of yours).")
            dest = f"{(await transport.runs_root()).rstrip('/')}/rerun-{new_id()}"
            workdir = await copy_code(transport, old, dest)
            return await self.launch(command, instance=old.instance, workdir=workdir, env=env, name=name,
                                     parent=old.id, sync_code=False, kind="rerun")
        root = old.code.get("root")
        workdir = str(Path(root) / old.code.get("subdir", "")) if root else old.workdir
        if not Path(workdir).is_dir():
            raise LabdeckError(f"The code directory {workdir} of {old.display_name} is not on this machine.",
                               "Rerun it from the machine it was launched from.")
        if instance != old.instance and not old.code:
            raise LabdeckError(f"{old.display_name} ran in {workdir} on {old.instance} without a code snapshot.",
                               f"Rerun it on {old.instance}, or start a new run on {instance} with labdeck run.")
        return await self.launch(command, instance=instance, workdir=workdir, env=env, name=name,
                                 parent=old.id, sync_code=bool(old.code), kind="rerun")

    def rerun_plan(self, old: Run, *, command: str | None = None, env: dict[str, str] | None = None,
                   sets: dict[str, str] | None = None) -> "RerunChanges":
        """What a rerun of ``old`` with these changes would run: its command and environment, and the parameter
        changes (raises :class:`LabdeckError` for a ``--set`` key that would change nothing)."""
        if old.kind == "notebook":  # its command is labdeck's Jupyter plumbing, with a token of its own
            raise LabdeckError(f"{old.display_name} is a notebook; a notebook is not rerun.",
                               f"Open a new one: labdeck notebook {old.instance} (or N in the TUI).")
        base = old.command if command is None or not command.strip() else command
        env = dict(old.env if isinstance(old.env, dict) else {}) if env is None else dict(env)
        recorded = old.params if isinstance(old.params, dict) else {}
        new_command, env_params, changes = lineage.set_params(base, recorded, dict(sets or {}))
        if env_params:
            try:
                before = json.loads(env.get(lineage.PARAMS_ENV, "") or "{}")
            except (ValueError, TypeError, RecursionError):  # the earlier run's env is a teammate's text
                before = {}
            merged = {**(before if isinstance(before, dict) else {}), **env_params}
            env[lineage.PARAMS_ENV] = json.dumps(merged, sort_keys=True)
        return RerunChanges(new_command, env, changes)

    async def launch_example(self, instance: str = "local") -> Run:
        """Run the bundled quickstart example (numpy logistic regression) on ``instance``."""
        project = examples_dir() / "quickstart"
        python = shlex.quote(sys.executable) if instance == "local" else "python3"
        return await self.launch(f"{python} train.py --steps 300", instance=instance, workdir=str(project),
                                 name="quickstart-example")

    def host_deadline(self, instance: str) -> float:
        """Seconds ``instance`` has to answer one round of status reads (its provider's ``host_deadline``)."""
        name = self._instance_provider.get(instance)
        p = self.providers.get(name) if name else None
        return float(getattr(p, "host_deadline", None) or HOST_DEADLINE)

    async def refresh_hosts(self, *, deadline: float | None = None):
        """Each host's round of status reads, yielded as ``(instance, changed runs)`` as soon as that
        host has answered: every host on its own clock, so one that is slow or gone delays no other.

        A host gets ``deadline`` seconds (else its provider's ``host_deadline``); one that has not
        answered by then is skipped this time (nothing is yielded for it) and shown unreachable in
        :attr:`health` until it answers. Its round goes on in the background (the connection's
        keepalives and timeouts bound it) and what it changed comes with the next call. A host whose
        round is still under way from an earlier call is not asked again meanwhile. Runs on an
        instance that no longer exists in any provider become ``lost``; a run is never moved to
        ``lost`` because its host cannot be reached for a while."""
        mine, _ = await asyncio.to_thread(self.store.runs, team=False)
        instances = sorted({r.instance for r in mine if r.run_state.is_active or r.state == "lost"})
        waits: list[asyncio.Task] = []
        for inst in instances:
            t = self._rounds.get(inst)
            carried: list[Run] = []
            if t is not None and not t.done():
                continue  # still being asked (an earlier call waited its deadline for it)
            if t is not None:
                carried = self._collect_round(inst, t)
            t = self._rounds[inst] = asyncio.ensure_future(self._host_round(inst, mine))
            t.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)
            waits.append(asyncio.ensure_future(self._wait_round(inst, t, carried, deadline)))
        try:
            for fut in asyncio.as_completed(waits):
                yield await fut
        finally:
            for w in waits:  # a caller that stops early: the rounds go on, the waiting stops
                w.cancel()

    async def _wait_round(self, inst: str, t: asyncio.Task, carried: list[Run], deadline: float | None):
        d = deadline if deadline is not None else self.host_deadline(inst)
        try:
            await asyncio.wait_for(asyncio.shield(t), d)
        except asyncio.TimeoutError:
            self.health.mark_down(inst, f"no answer within {d:g}s", source="round")
            return inst, carried
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - collected (and dropped) below
            pass
        return inst, carried + self._collect_round(inst, t)

    def _collect_round(self, inst: str, t: asyncio.Task) -> list[Run]:
        if self._rounds.get(inst) is t:
            del self._rounds[inst]
        if t.cancelled() or t.exception() is not None:
            return []
        return t.result()

    async def _host_round(self, inst: str, mine: list[Run]) -> list[Run]:
        """One host's round: its runs' states read and moved, then what the runs that ended reported."""
        try:
            transport = await self.transport(inst)
        except NotFoundError:
            return [self.store.transition(r.id, RunState.LOST, state_reason=f"the instance {inst} no longer exists")
                    for r in mine if r.instance == inst and r.run_state.is_active]
        except LabdeckError:  # e.g. a stopped cloud instance: nothing to ask this round
            return []
        try:
            changed = await jobs.refresh(self.store, transport, inst, mine)
        except TransportError as e:
            self.health.mark_down(inst, (str(e).splitlines() or ["no answer"])[0], source="round")
            return []
        except LabdeckError:
            return []
        self.health.mark_up(inst, source="round")
        for run in changed:  # a run that just ended: its metrics, environment and artifacts into the record
            if run.run_state.is_final and run.user == self.user and run.id not in self.follower.tasks:
                try:
                    async with self.follower.writing(run) as ours:  # not while another process follows it
                        if ours:
                            await self.monitor.poll_run(run, transport)
                            await self.record_results(run, final=True)
                except LabdeckError:
                    pass
        return changed

    async def refresh_runs(self, only: list[str] | None = None) -> list[Run]:
        """Move this user's active runs on every reachable instance through their states.

        Instances are asked concurrently, each within its own deadline (:meth:`refresh_hosts`); one
        that cannot be reached is skipped this round; runs on an instance that no longer exists in
        any provider become ``lost``. ``only``: just these runs (a follower asking about its own)."""
        if only is None:
            changed: list[Run] = []
            async for _inst, part in self.refresh_hosts():
                changed.extend(part)
            return changed
        # a follower asking about its own run: read just that, not all 10,000
        mine = [Run.from_dict(d) for d in (self.store.mine.get("runs", i) for i in only) if d is not None]
        instances = sorted({r.instance for r in mine if r.run_state.is_active or r.state == "lost"})
        changed = []
        for part in await asyncio.gather(*(self._host_round(i, mine) for i in instances)):
            changed.extend(part)
        return changed

    async def record_results(self, run: Run, *, final: bool = False) -> Run:
        """Write what the run reported into its record: labdeck.config() params, the metrics summary,
        the hardware summary, parents it declared with labdeck.use(); at the end also its Python
        environment and its artifacts. Only the owner's runs are written."""
        if run.user != self.user:
            return run
        rm = self.monitor.run(run)
        rm.update(UPDATE_SLICE)
        while rm.backlog:
            await asyncio.sleep(0)
            rm.update(UPDATE_SLICE)
        fields: dict = {"metrics_summary": _json_safe(rm.series.summary())}
        if rm.config:
            fields["params"] = {**run.params, **_json_safe(lineage.flatten(rm.config))}
        hw = self.monitor.hardware_summary(run.id)
        if hw:
            fields["hardware"] = hw
        for used_run, path in rm.file_parser.uses:
            self._record_use(run, used_run, path)
        if final:
            transport = await self.transport(run.instance)
            try:
                env = await transport.read_file(f"{run.run_dir}/environment.json", 0, 1 << 20)
                fields["environment"] = json.loads(env.data or b"{}")
            except (LabdeckError, ValueError):
                pass
            res = await transport.run(
                f"cd {shlex.quote(run.run_dir)} 2>/dev/null && find . -type f ! -path './code/*' ! -path './lib/*' "
                f"! -name '*.sh' ! -name 'pid' ! -name 'host' ! -name 'exit_code' ! -name '*_at' ! -name 'queued' ! -name 'output.log' "
                f"! -name 'metrics.jsonl' ! -name 'environment.json' 2>/dev/null | head -500", timeout=30)
            fields["artifacts"] = sorted(line[2:] for line in res.text().splitlines() if line.startswith("./"))
        fields = {k: v for k, v in fields.items() if getattr(run, k, None) != v}
        if not fields:  # nothing new: no journal commit
            return run
        return self.store.update_run(run.id, **fields)

    async def code_diff(self, a: Run | None, b: Run, max_bytes: int = 2 << 20) -> str:
        """The code difference from run ``a`` to ``b``. When both ran on the same instance as this
        user, their own copies of the code are compared there (exact, untracked files included);
        otherwise commits (when the repository is here) and each run's recorded uncommitted diff."""
        if (a is not None and a.instance == b.instance and a.user == b.user == self.user and a.code and b.code
                and a.run_dir and b.run_dir):
            try:
                transport = await self.transport(b.instance)
                res = await transport.run(
                    f"diff -ruN --exclude={code.MANIFEST} {shlex.quote(a.run_dir + '/code')} {shlex.quote(b.run_dir + '/code')}"
                    f" | head -c {max_bytes}", timeout=60)
                if res.exit_code in (0, 1) and (res.stdout or res.exit_code == 0):
                    text = res.stdout.decode("utf-8", "replace")
                    return text.replace(a.run_dir + "/code", "a").replace(b.run_dir + "/code", "b")
            except LabdeckError:
                pass
        return lineage.code_diff(a, b, self.store.read_blob)

    def _record_use(self, run: Run, used_ref: str, path: str | None) -> None:
        try:
            used = self.store.find_run(used_ref)
        except LabdeckError:
            return  # a run we cannot see: nothing to link
        edges = [Edge.from_dict(d) for d in self.store.mine.all("edges")]
        if any(e.parent == used.id and e.child == run.id for e in edges):
            return
        runs, _ = self.store.runs()
        try:
            lineage.check_no_cycle(run.id, used.id, lineage.parents_map({r.id: r for r in runs}, edges))
        except LabdeckError:
            return
        self.store.add(Edge(parent=used.id, child=run.id, kind="uses"))
        if not run.parent:
            self.store.update_run(run.id, parent=used.id)

    async def cancel(self, ref: str) -> Run:
        run = self.store.find_run(ref)
        transport = await self.transport(run.instance)
        done = await jobs.cancel(self.store, transport, run,
                                 grace_seconds=float(self.config.get("jobs", "cancel_grace_seconds")))
        if run.kind == "notebook":  # its notebook record follows
            for doc in self.store.mine.all("notebooks"):
                if doc.get("job_id") == run.id and doc.get("state") in ("starting", "running"):
                    self.store.mine.put("notebooks", doc["id"], {**doc, "state": "stopped", "stopped_at": done.ended_at})
        return done

    async def log_tail(self, ref: str, max_bytes: int = 64 * 1024) -> str:
        run = self.store.find_run(ref)
        return await jobs.read_log_tail(await self.transport(run.instance), run, max_bytes)

    async def close(self) -> None:
        for t in [*self._background, *self._rounds.values()]:
            t.cancel()
        await self.follower.stop_all()
        for p in self.providers.values():
            await p.close()
        self.store.close()


def _json_safe(value):
    """Non-finite floats as the strings NaN / Infinity / -Infinity (the store writes strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
