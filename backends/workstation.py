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
from .models import Instance, Run
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
                listing.instances.append(inst)
        return listing

    async def provider_of(self, instance: str) -> Provider:
        if instance not in self._instance_provider:
            await self.list_instances()
        name = self._instance_provider.get(instance)
        if name is None:
            known = ", ".join(sorted(self._instance_provider)) or "none"
            raise NotFoundError(f"No instance {instance!r} (known: {known}).", "`labdeck ls` lists instances.")
        return self.providers[name]

    async def transport(self, instance: str) -> Transport:
        return (await self.provider_of(instance)).transport(instance)

    async def launch(self, command: str, *, instance: str = "local", workdir: str | None = None,
                     env: dict[str, str] | None = None, name: str = "", parent: str | None = None) -> Run:
        provider = await self.provider_of(instance)
        inst = await provider.describe(instance)
        transport = provider.transport(instance)
        return await jobs.launch(self.store, transport, instance=instance, command=command,
                                 workdir=workdir or str(Path.cwd()), runs_root=await transport.runs_root(),
                                 env=env, name=name, parent=parent, price_per_hour=inst.price_per_hour)

    async def launch_example(self, instance: str = "local") -> Run:
        """Run the bundled quickstart example (numpy logistic regression) on ``instance``."""
        project = examples_dir() / "quickstart"
        python = shlex.quote(sys.executable) if instance == "local" else "python3"
        return await self.launch(f"{python} train.py --steps 300", instance=instance, workdir=str(project),
                                 name="quickstart-example")

    async def refresh_runs(self) -> list[Run]:
        """Move this user's active runs on every reachable instance through their states.

        Instances are asked concurrently; one that cannot be reached is skipped this round."""
        mine, _ = await asyncio.to_thread(self.store.runs, team=False)
        instances = sorted({r.instance for r in mine if r.run_state.is_active or r.state == "lost"})

        async def one(inst: str) -> list[Run]:
            try:
                transport = await self.transport(inst)
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
        for p in self.providers.values():
            await p.close()
        self.store.close()
