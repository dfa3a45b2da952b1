"""Resolving ~/.ssh/config through OpenSSH (``ssh -G``), beside what a first connect costs anyway.

labdeck asks OpenSSH itself how to reach each host (``backends/sshconfig.py``): one ``ssh -G``
process per destination and per hop, run concurrently, cached per destination and the config
files' mtimes. That is paid when an ``ssh`` provider is built (every CLI command, the TUI's start).

Measured, for an ``ssh`` provider of 50 hosts (a realistic config: the jump host in an
``Include``d snippet, ``Host gpu*`` patterns, a ``Match`` block, ``Key = value`` lines and
comments; every host behind ProxyJump bastion; 10 labdeck entries name an ssh_config alias with
``host =``):

* **cold**: a new provider, nothing cached (the first command after the config changed);
* **warm**: the same provider's ``SSHConfig`` asked again for all 50 (config unchanged: mtimes only);
* **next command**: a new provider in a new process's place, the answers in the on-disk cache
  (``<cache dir>/ssh-G.json``; valid while every file ssh read, ``~/.ssh`` and the ssh binary keep
  their mtimes): what every later ``labdeck`` command pays.

Baseline, same run: labdeck's **first connect** through the jump host on the SSH rig
(``tests/rig.py``: real sshd in network namespaces): a fresh pool, the jump host's and the
node's handshakes, until a first command has run. Target: cold resolution of 50 hosts < 10% of one
first connect. Without the rig (not root), the connect baseline is skipped and the ratio not judged.

Run: ``python3 -m tests.benchmarks sshconfig`` (``--quick``: fewer repetitions).
"""

from __future__ import annotations

import asyncio
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


def time_resolution(cfg: Path, n: int, reps: int) -> tuple[list[float], list[float], list[float]]:
    cold, warm, disk = [], [], []
    for i in range(reps):
        opts = provider_options(cfg, n)
        pool = SSHPool(KnownHosts(cfg.parent / "known_hosts"))
        cache = cfg.parent.parent / "cache" / f"ssh-G-{i}.json"  # (not beside the config: its folder is stamped)
        t0 = time.perf_counter()
        p = SSHProvider("lab", opts, pool=pool, ssh_cache=cache)
        cold.append(time.perf_counter() - t0)
        assert len(p.specs) == n and all(s.jump and s.jump[0].port == 2222 for s in p.specs.values())
        t0 = time.perf_counter()
        p.ssh_config.resolve_many([(h["host"] or name, None, None, None) for name, h in opts["hosts"].items()])
        warm.append(time.perf_counter() - t0)
        t0 = time.perf_counter()  # the next labdeck command: a new provider, the answers on disk
        again = SSHProvider("lab", opts, pool=pool, ssh_cache=cache)
        disk.append(time.perf_counter() - t0)
        assert again.specs == p.specs
    return cold, warm, disk


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
        cold, warm, disk = time_resolution(cfg, N_HOSTS, reps)
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
    c, w, dk = summarize(cold), summarize(warm), summarize(disk)
    k = summarize(connect) if connect else None
    ratio = c["p50_ms"] / k["p50_ms"] if k else None
    met = None if (quick or ratio is None) else ratio < TARGET_RATIO
    t = new_table(f"Resolving {N_HOSTS} hosts through {authority} (each behind ProxyJump, 10 by alias)",
                  ["what", ("p50 ms", "right"), ("p99 ms", "right"), ("n", "right")])
    t.add_row(f"cold: a new ssh provider of {N_HOSTS} hosts", fmt_ms(c["p50_ms"]), fmt_ms(c["p99_ms"]), str(c["n"]))
    t.add_row(f"warm: the same {N_HOSTS} asked again", fmt_ms(w["p50_ms"]), fmt_ms(w["p99_ms"]), str(w["n"]))
    t.add_row("next command: a new provider, answers cached on disk", fmt_ms(dk["p50_ms"]), fmt_ms(dk["p99_ms"]),
              str(dk["n"]))
    if k:
        t.add_row("baseline: labdeck's first connect + command through the jump host (rig)",
                  fmt_ms(k["p50_ms"]), fmt_ms(k["p99_ms"]), str(k["n"]))
    console.print(t)
    disk_ratio = dk["p50_ms"] / k["p50_ms"] if k else None
    if ratio is not None:
        console.print(f"cold resolution / first connect = {ratio:.1%} (target < {TARGET_RATIO:.0%}): {verdict(met)}")
        console.print(f"next command (cached on disk) / first connect = {disk_ratio:.1%}")
    else:
        console.print(f"[yellow]no connect baseline: the SSH rig is unavailable ({skipped})[/]")
    verdicts = [Verdict(NAME, f"cold resolution of {N_HOSTS} / first connect",
                        f"{ratio:.1%}" if ratio is not None else "—", f"< {TARGET_RATIO:.0%}", met),
                Verdict(NAME, f"resolution of {N_HOSTS}, cached on disk / first connect",
                        f"{disk_ratio:.1%}" if disk_ratio is not None else "—", f"< {TARGET_RATIO:.0%}",
                        None if (quick or disk_ratio is None) else disk_ratio < TARGET_RATIO)]
    return finish(NAME, {"authority": authority, "hosts": N_HOSTS, "cold": c, "warm": w, "disk": dk, "first_connect": k,
                         "ratio": ratio, "disk_ratio": disk_ratio, "rig_skipped": skipped}, verdicts, time.perf_counter() - t_all, quick=quick)


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
