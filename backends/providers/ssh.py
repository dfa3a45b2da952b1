"""The `ssh` provider: the team's own machines, reached over SSH (through jump hosts).

    [providers.lab]
    type = "ssh"
    ssh_config = "~/.ssh/config"        # resolved by OpenSSH itself (ssh -G): HostName, User, Port, IdentityFile,
                                        # ProxyJump, ProxyCommand, host-key settings, Include, Match, tokens
    host_key_policy = "accept-new"      # or "strict"

    [providers.lab.hosts.gpu1]
    host = "10.0.0.7"                   # default: the name, resolved through ~/.ssh/config (an alias there works too)
    user = "alice"
    jump = ["bastion"]                  # a chain of any length: names here, ~/.ssh/config aliases, user@host:port
    identity_file = "~/.ssh/id_ed25519"
    price_per_hour = 2.5
    tags = { gpu = "A100" }

    [providers.lab.hosts.bastion]
    host = "bastion.example.com"
    listed = false                      # a jump host only, not an instance

These machines exist outside labdeck: it describes them (reachability, latency,
CPUs, memory, GPUs, uptime) but never creates, stops or destroys them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Mapping

from .. import clock
from ..config import Field
from ..errors import LabdeckError, ProviderError
from ..health import HOST_DEADLINE
from ..models import Instance
from ..ssh import MAX_SESSIONS, HostSpec, KnownHosts, SSHConfig, SSHPool, SSHTransport, parse_destination, resolve_host
from .base import Transport, UnmanagedProvider


DESCRIBE_WAIT = 0.8  # seconds a listing waits for a host it starts connecting to
RESOLVE_THREADS = 8  # hosts whose ssh_config answers are being resolved at once (ssh -G processes)


def _non_negative(v: Any) -> str | None:
    return None if v >= 0 else "must be 0 or more"


def _port(v: Any) -> str | None:
    return None if 0 < v < 65536 else "must be a port number (1-65535)"


def _str_list(v: Any) -> str | None:
    return None if all(isinstance(x, str) and x for x in v) else "must be a list of host names"


def _str_map(v: Any) -> str | None:
    return None if all(isinstance(x, str) for x in v.values()) else "must map names to strings"


HOST_FIELDS: dict[str, Field] = {
    "host": Field(str, "", "HostName or address (default: the entry's name, through ~/.ssh/config)"),
    "user": Field(str, "", "Login user (default: ~/.ssh/config, else your user)"),
    "port": Field(int, 0, "SSH port (default: ~/.ssh/config, else 22)", lambda v: None if v == 0 else _port(v)),
    "identity_file": Field(str, "", "Private key file (referenced, never copied)"),
    "jump": Field(list, [], "Jump hosts, first to last", _str_list),
    "tags": Field(dict, {}, "Free-form labels", _str_map),
    "price_per_hour": Field((int, float), 0.0, "What an hour of this machine costs, in $", _non_negative),
    "runs_dir": Field(str, "~/.labdeck/runs", "Where run directories go on the host"),
    "max_concurrent": Field(int, 1, "Jobs run at once on this host (the rest queue)", lambda v: None if v >= 1 else "must be 1 or more"),
    "listed": Field(bool, True, "Show as an instance (false: only a jump host)"),
    "max_sessions": Field(int, MAX_SESSIONS, "Commands and SFTP open at once on the connection to this host; keep it "
                          "below its sshd's MaxSessions (10 unless changed). More work waits its turn",
                          lambda v: None if v >= 1 else "must be 1 or more"),
}

CONFIG_FIELDS: dict[str, Field] = {
    "ssh_config": Field(str, "~/.ssh/config", "OpenSSH client config to read host settings from ('' for none)"),
    "host_key_policy": Field(str, "accept-new", "Unknown host keys: accept-new (recorded) or strict (refused)",
                             lambda v: None if v in ("accept-new", "strict") else "must be accept-new or strict"),
    "connect_timeout": Field((int, float), 5.0, "Seconds to wait for a host (and each jump) to answer",
                             lambda v: None if v > 0 else "must be greater than 0"),
    "host_deadline": Field((int, float), HOST_DEADLINE, "Seconds a host has to answer one round (listing, status "
                           "reads); one that does not is skipped that round and shown unreachable",
                           lambda v: None if v > 0 else "must be greater than 0"),
    "hosts": Field(dict, {}, "The machines, one [providers.NAME.hosts.HOST] table each", entries=HOST_FIELDS),
}

FACTS_SCRIPT = r"""
nproc 2>/dev/null || getconf _NPROCESSORS_ONLN
awk '/^MemTotal/ {print int($2/1024)}' /proc/meminfo 2>/dev/null || echo 0
cut -d' ' -f1 /proc/uptime 2>/dev/null || echo 0
grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//' ; echo
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader,nounits 2>/dev/null
true
"""


def parse_facts(text: str, now: datetime) -> dict[str, Any]:
    lines = text.splitlines()
    vcpus = int(lines[0]) if lines and lines[0].strip().isdigit() else 0
    mem = int(lines[1]) if len(lines) > 1 and lines[1].strip().isdigit() else 0
    try:
        up = float(lines[2]) if len(lines) > 2 else 0.0
    except ValueError:
        up = 0.0
    cpu = lines[3].strip() if len(lines) > 3 else ""
    gpus = []
    for line in lines[5:]:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3 and parts[0].isdigit():
            try:
                gpus.append({"index": int(parts[0]), "name": parts[1], "memory_total_mib": int(float(parts[2]))})
            except ValueError:
                continue
    started = (now - timedelta(seconds=up)).isoformat(timespec="seconds").replace("+00:00", "Z") if up else None
    return {"vcpus": vcpus, "memory_mib": mem, "cpu_model": cpu, "gpus": gpus, "started_at": started,
            "gpu_note": "" if gpus else "no NVIDIA GPU"}


class SSHProvider(UnmanagedProvider):
    type = "ssh"

    def __init__(self, name: str, options: Mapping[str, object], *, pool: SSHPool | None = None,
                 known_hosts_path: Path | None = None, ssh_config: SSHConfig | None = None,
                 ssh_cache: Path | None = None) -> None:
        super().__init__(name, options)
        hosts: dict[str, dict[str, Any]] = dict(options.get("hosts") or {})  # type: ignore[arg-type]
        self.hosts = hosts
        self.ssh_config = ssh_config if ssh_config is not None else SSHConfig.load(options.get("ssh_config") or None,
                                                                                   cache_file=ssh_cache)
        if pool is None:
            known = KnownHosts(known_hosts_path or Path("~/.labdeck/known_hosts").expanduser(),
                               str(options.get("host_key_policy", "accept-new")))
            pool = SSHPool(known, connect_timeout=float(options.get("connect_timeout", 5.0)))  # type: ignore[arg-type]
        self.pool = pool
        self.host_deadline = float(options.get("host_deadline", HOST_DEADLINE))  # type: ignore[arg-type]
        # Host specs are built on first use, each from its own ssh -G answers (and its jump chain's):
        # `labdeck run --on gpu1` resolves gpu1 and its hops, not every host of the provider.
        self._specs: dict[str, HostSpec] = {}
        self.specs: Mapping[str, HostSpec] = _Specs(self)
        self._check_jump_loops()
        self._facts: dict[str, tuple[int, dict[str, Any]]] = {}  # host -> (connection generation, facts)
        self._connecting: dict[str, asyncio.Future] = {}
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    def spec(self, hname: str) -> HostSpec:
        """How to reach host ``hname`` (any entry, listed or a jump host only): resolved on first use.

        Raises TransportError where OpenSSH cannot resolve it (a broken ssh_config, a timeout)."""
        hit = self._specs.get(hname)
        if hit is None:
            if hname not in self.hosts:
                raise ProviderError(f"The {self.name} provider has no host {hname!r}.")
            with self.ssh_config.batch():  # (the disk cache is written once, with the whole chain)
                hit = self._specs[hname] = self._spec(hname)
        return hit

    def _spec(self, hname: str) -> HostSpec:
        if hname in self._specs:
            return self._specs[hname]
        h = self.hosts[hname]
        jumps = [j for j in h["jump"] if j in self.hosts]
        self._warm([hname, *jumps])  # this host and its labdeck-named hops, asked at once
        known = {j: self.spec(j) for j in jumps}
        spec = resolve_host(hname, known=known, ssh_config=self.ssh_config, user=h["user"] or None,
                            hostname=h["host"] or None, port=h["port"] or None,
                            identity_files=(h["identity_file"],) if h["identity_file"] else (),
                            jump=tuple(h["jump"]) if h["jump"] else None)
        if h.get("max_sessions") and int(h["max_sessions"]) != MAX_SESSIONS:  # its own channel budget
            spec = replace(spec, max_sessions=int(h["max_sessions"]))
        return spec

    def _check_jump_loops(self) -> None:
        """A chain of labdeck entries that loops is a config error, found without asking ssh."""
        def walk(hname: str, seen: tuple[str, ...]) -> None:
            if hname in seen:
                raise ProviderError(f"The jump chain of {seen[0]} in provider {self.name} loops: "
                                    f"{' → '.join(seen + (hname,))}.")
            for j in self.hosts[hname]["jump"]:
                if j in self.hosts:
                    walk(j, seen + (hname,))

        for hname in self.hosts:
            walk(hname, ())

    def _warm(self, names: list[str]) -> None:
        """Ask ssh_config about these hosts at once (``ssh -G`` runs concurrently), before their specs
        are built one by one from the cache: first each ``host =`` (is it an alias?), then each entry,
        then the ProxyJump hops the answers name."""
        cfg = self.ssh_config
        todo = [n for n in dict.fromkeys(names) if n not in self._specs]
        if cfg.authority == "none" or not todo:
            return
        hosts = [(hn, self.hosts[hn]) for hn in todo]
        ask = lambda hn, h, hostname: (hn, h["user"] or None, h["port"] or None, hostname)  # noqa: E731
        try:
            first = cfg.resolve_many([ask(h["host"] or hn, h, None) for hn, h in hosts], prefetch=True)
            second = cfg.resolve_many([ask(hn, h, h["host"]) for (hn, h), r in zip(hosts, first)
                                       if h["host"] and r.hostname == r.arg and not r.jump and not r.proxy_command])
            hops = {j for (hn, h), r in zip(hosts, first) if not h["jump"] for j in r.jump}
            hops |= {j for r in second for j in r.jump}
            cfg.resolve_many([(host, user, port, None) for j in sorted(hops)
                              for user, host, port in [parse_destination(j)]])
        except LabdeckError:
            return  # each host's own resolution reports it (a listing shows it on that host's row)

    def resolve_all(self, names: list[str] | None = None) -> dict[str, HostSpec | LabdeckError]:
        """Every host's spec (or why it has none), resolved concurrently: for listings and `labdeck config`."""
        names = list(self.hosts) if names is None else names
        out: dict[str, HostSpec | LabdeckError] = {}
        with self.ssh_config.batch():
            self._warm([*names, *(j for n in names for j in self.hosts[n]["jump"] if j in self.hosts)])
            for n in names:
                try:
                    out[n] = self.spec(n)
                except LabdeckError as e:
                    out[n] = e
        return out

    def has_instance(self, instance: str) -> bool:
        """Whether ``instance`` is one of this provider's listed hosts (known from the config alone)."""
        h = self.hosts.get(instance)
        return h is not None and bool(h["listed"])

    def _host(self, instance: str) -> dict[str, Any]:
        h = self.hosts.get(instance)
        if h is None or not h["listed"]:
            raise ProviderError(f"The {self.name} provider has no host {instance!r}.")
        return h

    async def list_instances(self) -> list[Instance]:
        """Every listed host, described concurrently. Specs not resolved yet are resolved each in a
        thread of their own, so a host whose answer is cached (or comes first) starts connecting at
        once instead of waiting for ssh -G on the other hosts."""
        names = [n for n, h in self.hosts.items() if h["listed"]]
        if all(n in self._specs for n in names):
            return list(await asyncio.gather(*(self.describe(n) for n in names)))
        with self.ssh_config.batch():  # (the disk cache is written once, when all are resolved)
            return list(await asyncio.gather(*(self.describe(n) for n in names)))

    async def _resolved(self, instance: str) -> HostSpec:
        """``spec(instance)`` without blocking the event loop on ssh -G."""
        hit = self._specs.get(instance)
        if hit is not None:
            return hit
        loop = asyncio.get_running_loop()
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(RESOLVE_THREADS, thread_name_prefix="ssh-G")
        return await loop.run_in_executor(self._executor, self.spec, instance)

    def watch_health(self, health) -> None:
        """Keep ``health`` (a :class:`backends.health.HealthMap`) told which hosts the pool cannot reach
        (a lost connection, keepalives unanswered, a failed connect, a jump host down on the way)."""
        def sync() -> None:
            for name, spec in list(self._specs.items()):  # (a host never resolved has no connection)
                if not self.hosts[name]["listed"]:
                    continue
                down = self.pool.health(spec)
                if down is None:
                    health.mark_up(name, source="ssh")
                else:
                    health.mark_down(name, down[1], since=down[0], source="ssh")

        self.pool.listeners.append(sync)
        self._health = health

    async def describe(self, instance: str) -> Instance:
        """Never raises for an unreachable host: it comes back with state ``unreachable`` and why
        (a host OpenSSH cannot resolve, too), within the provider's ``host_deadline`` (a host that
        does not answer in time is skipped)."""
        try:
            return await asyncio.wait_for(self._describe(instance), self.host_deadline)
        except asyncio.TimeoutError:
            h = self._host(instance)
            spec = self._specs.get(instance)
            inst = Instance(id=f"{self.name}/{instance}", name=instance, provider=self.name, provider_type=self.type,
                            host=spec.hostname if spec else (h["host"] or instance),
                            price_per_hour=float(h["price_per_hour"]), tags=dict(h["tags"]))
            inst.state = "unreachable"
            inst.note = f"{spec.label if spec else instance} did not answer within {self.host_deadline:g}s"
            health = getattr(self, "_health", None)
            if health is not None:
                health.mark_down(instance, f"no answer within {self.host_deadline:g}s", source="listing")
            self._apply_cached(inst, instance)
            return inst

    async def _describe(self, instance: str) -> Instance:
        h = self._host(instance)
        inst = Instance(id=f"{self.name}/{instance}", name=instance, provider=self.name, provider_type=self.type,
                        host=h["host"] or instance, price_per_hour=float(h["price_per_hour"]), tags=dict(h["tags"]))
        try:
            spec = await self._resolved(instance)
        except LabdeckError as e:
            inst.state = "unreachable"
            inst.note = e.render()
            self._apply_cached(inst, instance)
            return inst
        inst.host = spec.hostname
        transport = self.transport(instance)
        handle = self.pool.handle(spec)
        try:
            if handle.conn is None:
                # connect in the background; a host that takes longer than DESCRIBE_WAIT shows as
                # "connecting" now, and the listing of every other host is not held up by it
                task = self._connecting.get(instance)
                wait = 0.05  # a connect already under way from an earlier listing: do not wait on it again
                if task is None or task.done():
                    task = self._connecting[instance] = asyncio.ensure_future(handle.get())
                    task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)
                    wait = DESCRIBE_WAIT
                try:
                    await asyncio.wait_for(asyncio.shield(task), wait)
                except asyncio.TimeoutError:
                    inst.state = "connecting"
                    inst.note = f"no answer yet from {spec.label} (still trying, up to {self.pool.connect_timeout:g}s)"
                    self._apply_cached(inst, instance)
                    return inst
            t0 = time.perf_counter()
            await transport.run("true", timeout=self.pool.connect_timeout * 2)
            cached = self._facts.get(instance)
            if cached is None or cached[0] != handle.generation:
                t0 = time.perf_counter()  # the first call paid for connecting; time a second one
                await transport.run("true", timeout=self.pool.connect_timeout * 2)
                latency = time.perf_counter() - t0
                res = await transport.run(FACTS_SCRIPT, timeout=self.pool.connect_timeout * 2)
                self._facts[instance] = (handle.generation, parse_facts(res.text(), clock.now()))
            else:
                latency = time.perf_counter() - t0
        except LabdeckError as e:
            inst.state = "unreachable"
            inst.note = e.render()
            self._apply_cached(inst, instance)
            return inst
        for k, v in self._facts[instance][1].items():
            setattr(inst, k, v)
        health = getattr(self, "_health", None)
        if health is not None:
            health.mark_up(instance, source="listing")
        inst.state = "running"
        inst.latency_ms = latency * 1000
        if spec.notes and not inst.note:
            inst.note = " ".join(spec.notes)
        return inst

    def _apply_cached(self, inst: Instance, instance: str) -> None:
        cached = self._facts.get(instance)
        if cached:
            for k, v in cached[1].items():
                setattr(inst, k, v)

    def _refuse(self, what: str) -> ProviderError:
        return ProviderError(f"The {self.name} hosts are your team's own machines: labdeck does not {what} them.",
                             "Add or remove hosts in the config ([providers." + self.name + ".hosts.NAME]).")

    def transport(self, instance: str) -> Transport:
        h = self._host(instance)
        return SSHTransport(self.pool, self.spec(instance), instance=instance, runs_dir=h["runs_dir"])

    def max_concurrent(self, instance: str) -> int:
        return int(self._host(instance)["max_concurrent"])

    async def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False)
        await self.pool.close()


class _Specs(Mapping[str, HostSpec]):
    """``provider.specs``: every host's spec, each resolved when first asked for; iterating over the
    values resolves the rest concurrently (the first error is raised: ``resolve_all`` gives each)."""

    def __init__(self, provider: SSHProvider) -> None:
        self._p = provider

    def __getitem__(self, name: str) -> HostSpec:
        if name not in self._p.hosts:
            raise KeyError(name)
        return self._p.spec(name)

    def __contains__(self, name: object) -> bool:  # (from the config alone: Mapping's would resolve it, and raise)
        return name in self._p.hosts

    def __iter__(self):
        return iter(self._p.hosts)

    def __len__(self) -> int:
        return len(self._p.hosts)

    def _all(self) -> dict[str, HostSpec]:
        got = self._p.resolve_all()
        for v in got.values():
            if isinstance(v, LabdeckError):
                raise v
        return got  # type: ignore[return-value]

    def items(self):  # type: ignore[override]
        return self._all().items()

    def values(self):  # type: ignore[override]
        return self._all().values()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self.items()) == dict(other.items())
