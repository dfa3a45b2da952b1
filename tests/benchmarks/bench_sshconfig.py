"""Resolving ~/.ssh/config through OpenSSH (``ssh -G``), beside what a first connect costs anyway.

labdeck asks OpenSSH itself how to reach each host (``backends/sshconfig.py``): one ``ssh -G``
process per destination and per hop, run concurrently, cached per destination and the config
files' mtimes (in process, and on disk between commands). An ``ssh`` provider resolves a host
when it is first used: a one-host command (``labdeck run --on gpu3``) resolves that host and its
jump chain, with the likely jump host prefetched in the same round; a listing resolves them all.

Measured, for an ``ssh`` provider of 50 hosts (a realistic config: the jump host in an
``Include``d snippet, ``Host gpu*`` patterns, a ``Match`` block, ``Key = value`` lines and
comments; every host behind ProxyJump bastion; 10 labdeck entries name an ssh_config alias with
``host =``):

* **cold, one command**: a new provider, nothing cached anywhere, one host used;
* **config just edited**: the same, but the disk cache holds (now stale) answers of the old config;
* **cold, every host**: a new provider, nothing cached, all 50 resolved (``labdeck ls``);
* **warm**: the same provider's ``SSHConfig`` asked again for all 50 (config unchanged: mtimes only);
* **next command**: a new provider in a new process's place, the answers in the on-disk cache
  (``<cache dir>/ssh-G.json``; valid while every file ssh read, ``~/.ssh`` and the ssh binary keep
  their mtimes), for one host and for all 50.

Baseline, same run: labdeck's **first connect** through the jump host on the SSH rig
(``tests/rig.py``: real sshd in network namespaces): a fresh pool, the jump host's and the
node's handshakes, until a first command has run. Target: cold resolution for a command < 10% of
one first connect (judged for one command and for a just-edited config; the cold listing of all 50
is reported beside it). Without the rig (not root), the connect baseline is skipped and no ratio
judged.

Run: ``python3 -m tests.benchmarks sshconfig`` (``--quick``: fewer repetitions).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

from backends.config import Field  # noqa: F401 - the entries' schema is the provider's own
from backends.providers.ssh import HOST_FIELDS, SSHProvider
from backends.ssh import HostSpec, KnownHosts, SSHPool, SSHTransport
from backends.sshconfig import SSHConfig

from ._common import Verdict, console, finish, fmt_ms, new_table, scratch_dir, summarize, verdict

NAME = "sshconfig"
N_HOSTS = 50
REPS = 15
TARGET_RATIO = 0.10


def write_config(d: Path, n: int) -> Path:
    (d / "conf.d").mkdir(parents=True, exist_ok=True)
    (d / "conf.d" / "bastion.conf").write_text(
        "Host bastion\n  HostName = 198.18.0.1\n  User ops # the team's jump host\n  Port 2222\n")
    lines = [f"Include {d}/conf.d/*.conf", ""]
    for i in range(n):
        lines += [f"Host gpu{i}", f"  HostName 10.0.{i // 250}.{i % 250 + 1}", ""]
    lines += ["Match host 10.0.0.*", "  ServerAliveInterval 30", "",
              "Host gpu*", "  ProxyJump bastion", "  User trainer", "  IdentityFile ~/.ssh/id_%h", "",
              "Host *", "  ConnectTimeout 5", "  StrictHostKeyChecking accept-new", ""]
    cfg = d / "config"
    cfg.write_text("\n".join(lines))
    return cfg


def provider_options(cfg: Path, n: int) -> dict[str, Any]:
    base = {k: f.default for k, f in HOST_FIELDS.items()}
    hosts = {}
    for i in range(n):
        h = dict(base)
        if i % 5 == 0:
            hosts[f"box{i}"] = {**h, "host": f"gpu{i}"}  # an ssh_config alias through `host =`
        else:
            hosts[f"gpu{i}"] = h
    return {"ssh_config": str(cfg), "host_key_policy": "accept-new", "connect_timeout": 5.0, "hosts": hosts}


ONE = "gpu3"  # the host a one-host command (`labdeck run --on gpu3`) uses


def time_resolution(cfg: Path, n: int, reps: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"one": [], "changed": [], "all": [], "warm": [], "disk_one": [], "disk_all": []}
    for i in range(reps):
        opts = provider_options(cfg, n)
        pool = SSHPool(KnownHosts(cfg.parent / "known_hosts"))
        cache = cfg.parent.parent / "cache" / f"ssh-G-{i}.json"  # (not beside the config: its folder is stamped)
        # cold, one command: a new provider, nothing cached anywhere, one host used (and its jump host)
        t0 = time.perf_counter()
        p = SSHProvider("lab", opts, pool=pool, ssh_cache=cache)
        spec = p.spec(ONE)
        out["one"].append(time.perf_counter() - t0)
        assert spec.jump and spec.jump[0].port == 2222
        # cold, every host: what a listing (`labdeck ls`, the Instances tab) resolves
        t0 = time.perf_counter()
        p = SSHProvider("lab", opts, pool=pool, ssh_cache=cache.with_name(f"all-{i}.json"))
        specs = p.resolve_all()
        out["all"].append(time.perf_counter() - t0)
        assert len(specs) == n and all(s.jump and s.jump[0].port == 2222 for s in specs.values())
        t0 = time.perf_counter()
        p.ssh_config.resolve_many([(h["host"] or name, None, None, None) for name, h in opts["hosts"].items()])
        out["warm"].append(time.perf_counter() - t0)
        # the next command: a new provider, the answers on disk
        t0 = time.perf_counter()
        again = SSHProvider("lab", opts, pool=pool, ssh_cache=cache.with_name(f"all-{i}.json"))
        again.spec(ONE)
        out["disk_one"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        assert again.resolve_all() == specs
        out["disk_all"].append(time.perf_counter() - t0)
        # the config was just edited: every answer on disk is stale, one host used
        os.utime(cfg, ns=(10**18 + i, 10**18 + i))
        t0 = time.perf_counter()
        changed = SSHProvider("lab", opts, pool=pool, ssh_cache=cache.with_name(f"all-{i}.json")).spec(ONE)
        out["changed"].append(time.perf_counter() - t0)
        assert changed == specs[ONE]
    return out


async def first_connects(rig, root: Path, reps: int) -> list[float]:
    out = []
    jump = HostSpec("jump", rig.jump.addr, rig.jump.user, rig.jump.port, (str(rig.client_key),))
    node = rig.nodes[0]
    spec = HostSpec("node1", node.addr, node.user, node.port, (str(rig.client_key),), (jump,))
    for i in range(reps):
        pool = SSHPool(KnownHosts(root / f"kh{i}"))
        t0 = time.perf_counter()
        res = await SSHTransport(pool, spec, instance="node1").run("true")
        out.append(time.perf_counter() - t0)
        assert res.exit_code == 0
        await pool.close()
    return out


def main(quick: bool = False) -> list[Verdict]:
    t_all = time.perf_counter()
    reps = 3 if quick else REPS
    with scratch_dir("sshconfig") as root:
        cfg = write_config(root / "dot-ssh", N_HOSTS)
        authority = SSHConfig(cfg).authority
        times = time_resolution(cfg, N_HOSTS, reps)
        connect: list[float] = []
        skipped = ""
        try:
            from tests.rig import Rig, RigUnavailable

            try:
                rig = Rig.build(1)
            except RigUnavailable as e:
                skipped = str(e)
            else:
                try:
                    connect = asyncio.run(first_connects(rig, root, reps))
                finally:
                    rig.close()
        except ImportError as e:  # pragma: no cover
            skipped = str(e)
    st = {k: summarize(v) for k, v in times.items()}
    k = summarize(connect) if connect else None
    ratios = {name: (st[name]["p50_ms"] / k["p50_ms"] if k else None) for name in st}
    rows = [("one", f"cold, one command: a new provider, nothing cached, {ONE} + its jump host used"),
            ("changed", f"config just edited (answers on disk stale), {ONE} used"),
            ("all", f"cold, every host: a listing of all {N_HOSTS}, nothing cached"),
            ("warm", f"warm: the same {N_HOSTS} asked again (in process)"),
            ("disk_one", f"next command, answers on disk: {ONE} used"),
            ("disk_all", f"next command, answers on disk: all {N_HOSTS}")]
    t = new_table(f"Resolving hosts of a {N_HOSTS}-host provider through {authority} (each behind ProxyJump, 10 by alias)",
                  ["what", ("p50 ms", "right"), ("p99 ms", "right"), ("n", "right"), ("/ first connect", "right")])
    for key, label in rows:
        r = ratios[key]
        t.add_row(label, fmt_ms(st[key]["p50_ms"]), fmt_ms(st[key]["p99_ms"]), str(st[key]["n"]),
                  f"{r:.1%}" if r is not None else "—")
    if k:
        t.add_row("baseline: labdeck's first connect + command through the jump host (rig)",
                  fmt_ms(k["p50_ms"]), fmt_ms(k["p99_ms"]), str(k["n"]), "100%")
    console.print(t)
    judged = lambda r: None if (quick or r is None) else r < TARGET_RATIO  # noqa: E731
    if k is None:
        console.print(f"[yellow]no connect baseline: the SSH rig is unavailable ({skipped})[/]")
    else:
        console.print(f"cold resolution for one command / first connect = {ratios['one']:.1%} "
                      f"(target < {TARGET_RATIO:.0%}): {verdict(judged(ratios['one']))}")
    fmt = lambda r: f"{r:.1%}" if r is not None else "—"  # noqa: E731
    verdicts = [Verdict(NAME, "cold resolution, one command (host + jump host) / first connect", fmt(ratios["one"]),
                        f"< {TARGET_RATIO:.0%}", judged(ratios["one"])),
                Verdict(NAME, "config just edited, one command / first connect", fmt(ratios["changed"]),
                        f"< {TARGET_RATIO:.0%}", judged(ratios["changed"])),
                Verdict(NAME, f"next command, cached on disk, all {N_HOSTS} / first connect", fmt(ratios["disk_all"]),
                        f"< {TARGET_RATIO:.0%}", judged(ratios["disk_all"])),
                Verdict(NAME, f"cold resolution of all {N_HOSTS} (a listing) / first connect", fmt(ratios["all"]),
                        "(reported)", None)]
    return finish(NAME, {"authority": authority, "hosts": N_HOSTS, **st, "first_connect": k,
                         "ratios": ratios, "rig_skipped": skipped}, verdicts, time.perf_counter() - t_all, quick=quick)


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
