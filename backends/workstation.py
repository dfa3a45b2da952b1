"""The one object the TUI and the CLI talk to: config + store + providers.

It fans provider calls out concurrently with a per-provider timeout, so a slow
or failing provider never holds back the others; failures come back as
per-provider error texts next to the instances that did answer.
"""

from __future__ import annotations

import asyncio
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import jobs
from .config import Config, load_config
from .errors import LabdeckError, NotFoundError
from .follow import LogFollower
from .monitor import Monitor
from .models import Instance, Run, RunState
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
class InstanceListing:
    instances: list[Instance]
    errors: dict[str, str] = field(default_factory=dict)  # provider name -> message


class Workstation:
    def __init__(self, config: Config, store: Store | None = None, providers: dict[str, Provider] | None = None) -> None:
        self.config = config
        self.store = store if store is not None else Store.from_config(config)
        self.providers = providers if providers is not None else build_providers(config)
        self._instance_provider: dict[str, str] = {}
        self._listing: asyncio.Future[InstanceListing] | None = None
        self._prices: dict[str, float] = {}
        self.follower = LogFollower(self, config.paths.cache_dir / "logs")
        self.monitor = Monitor(self, config.paths.cache_dir, pattern=config.get("monitor", "log_pattern") or None,
                               gpu_source=config.get("monitor", "gpu_source"))

    @classmethod
    def open(cls, home: str | None = None) -> "Workstation":
        return cls(load_config(Paths.resolve(home)))

    @property
    def user(self) -> str:
        return self.config.user

    async def list_instances(self, timeout: float = 10.0) -> InstanceListing:
        """Every provider's instances, asked concurrently. Callers at the same moment share one round."""
        if self._listing is not None and not self._listing.done():
            return await asyncio.shield(self._listing)
        self._listing = asyncio.ensure_future(self._list_instances(timeout))
        return await asyncio.shield(self._listing)

    async def _list_instances(self, timeout: float) -> InstanceListing:
        async def one(name: str, p: Provider) -> list[Instance]:
            return await asyncio.wait_for(p.list_instances(), timeout)

        names = list(self.providers)
        results = await asyncio.gather(*(one(n, self.providers[n]) for n in names), return_exceptions=True)
        listing = InstanceListing([])
        for name, res in zip(names, results):
            if isinstance(res, BaseException):
                if isinstance(res, asyncio.TimeoutError):
                    listing.errors[name] = f"{name}: no answer within {timeout:g}s"
                elif isinstance(res, LabdeckError):
                    listing.errors[name] = f"{name}: {res}"
                else:
                    listing.errors[name] = f"{name}: {type(res).__name__}: {res}"
                continue
            for inst in res:
                self._instance_provider[inst.name] = name
                self._prices[inst.name] = inst.price_per_hour
                listing.instances.append(inst)
        return listing

    async def provider_of(self, instance: str) -> Provider:
        listing = None
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
                     sync_code: bool = True, progress=None, kind: str = "parent") -> Run:
        """Start ``command`` on ``instance`` (see :func:`backends.jobs.launch`)."""
        provider = await self.provider_of(instance)
        transport = provider.transport(instance)
        price = self._prices.get(instance)
        if price is None:
            price = (await provider.describe(instance)).price_per_hour
        max_concurrent = provider.max_concurrent(instance)
        return await jobs.launch(self.store, transport, instance=instance, command=command,
                                 workdir=workdir or str(Path.cwd()), runs_root=await transport.runs_root(),
                                 env=env, name=name, parent=parent, price_per_hour=price, sync_code=sync_code,
                                 code_cache=self.config.paths.cache_dir / "hashes.json",
                                 max_concurrent=max_concurrent, progress=progress, kind=kind)

    async def rerun(self, ref: str) -> Run:
        """Run a run's command again, from its recorded code, as a child of it in lineage."""
        old = self.store.find_run(ref)
        root = old.code.get("root")
        workdir = str(Path(root) / old.code.get("subdir", "")) if root else old.workdir
        if not Path(workdir).is_dir():
            raise LabdeckError(f"The code directory {workdir} of {old.display_name} is not on this machine.",
                               "Rerun it from the machine it was launched from.")
        name = old.name if old.name.endswith("(rerun)") else f"{old.name or old.id[-8:].lower()} (rerun)"
        return await self.launch(old.command, instance=old.instance, workdir=workdir, env=old.env, name=name,
                                 parent=old.id, sync_code=bool(old.code), kind="rerun")

    async def launch_example(self, instance: str = "local") -> Run:
        """Run the bundled quickstart example (numpy logistic regression) on ``instance``."""
        project = examples_dir() / "quickstart"
        python = shlex.quote(sys.executable) if instance == "local" else "python3"
        return await self.launch(f"{python} train.py --steps 300", instance=instance, workdir=str(project),
                                 name="quickstart-example")

    async def refresh_runs(self, only: list[str] | None = None) -> list[Run]:
        """Move this user's active runs on every reachable instance through their states.

        Instances are asked concurrently; one that cannot be reached is skipped this round;
        runs on an instance that no longer exists in any provider become ``lost``."""
        mine, _ = await asyncio.to_thread(self.store.runs, team=False)
        if only is not None:
            mine = [r for r in mine if r.id in only]
        instances = sorted({r.instance for r in mine if r.run_state.is_active or r.state == "lost"})

        async def one(inst: str) -> list[Run]:
            try:
                transport = await self.transport(inst)
            except NotFoundError:
                return [self.store.transition(r.id, RunState.LOST, state_reason=f"the instance {inst} no longer exists")
                        for r in mine if r.instance == inst and r.run_state.is_active]
            try:
                return await jobs.refresh(self.store, transport, inst, mine)
            except LabdeckError:
                return []

        changed: list[Run] = []
        for part in await asyncio.gather(*(one(i) for i in instances)):
            changed.extend(part)
        return changed

    async def cancel(self, ref: str) -> Run:
        run = self.store.find_run(ref)
        transport = await self.transport(run.instance)
        return await jobs.cancel(self.store, transport, run,
                                 grace_seconds=float(self.config.get("jobs", "cancel_grace_seconds")))

    async def log_tail(self, ref: str, max_bytes: int = 64 * 1024) -> str:
        run = self.store.find_run(ref)
        return await jobs.read_log_tail(await self.transport(run.instance), run, max_bytes)

    async def close(self) -> None:
        await self.follower.stop_all()
        for p in self.providers.values():
            await p.close()
        self.store.close()
