"""Remote work through a jump host: submit latency, incremental code sync, status refresh of 20 hosts.

Everything runs on the SSH test rig (``tests/rig.py``): real OpenSSH sshd in network
namespaces, a jump host and three nodes reachable only through it. It needs root;
without it the benchmark says so and is skipped. One rig serves all three parts, in
one run, each beside a baseline measured in the same run:

1. **Submit latency on a warm node.** ``Workstation.launch("sleep 1", instance="node1")``
   with ``sync_code=False``, and with code sync of an unchanged 20-file git project,
   timed from the call until it returns the run in state ``running`` (it returns
   ``running`` only once the wrapper on the node wrote ``started_at``; every sample is
   checked). "Warm": the Workstation's connection pool is already connected (one
   untimed launch of each kind first). ``max_concurrent`` is raised to 64 so no launch
   waits in the node's FIFO queue behind the earlier ``sleep 1`` jobs. Baseline: a fresh
   OpenSSH ``ssh -F <rig ssh_config> node1 true`` (ProxyJump through the jump host),
   the same number of times, interleaved round-robin with the launches.
   Target: labdeck p50 ≤ 0.5× the fresh ssh p50.
2. **Incremental sync of a 5,000-file tree after one file changed** (200 dirs × 25
   files of 1–4 KB, deterministic, not a git repository). A first full sync, then per
   repetition one different file grows by a line and is synced with
   ``backends.code.snapshot`` (with the hash cache, as ``launch`` does) +
   ``backends.code.sync`` over the Workstation's transport for node1, beside
   ``rsync -a -e "ssh -F <rig ssh_config>" SRC/ node1:DEST/`` after the same change
   (a fresh ssh through the jump host each time, as rsync is used). Medians of 5.
   Every remote copy of the changed file is checked against the local one each time.
3. **Status refresh of 20 hosts, some down.** ``Rig.build`` caps a rig at 3 nodes (one
   /28 of addresses each), so 20 ``[providers.lab.hosts.*]`` entries point at the three
   node addresses, each with its own copy of the client key: labdeck's pool keys a
   connection by (jump chain, user, address, port, key files), so every entry is its
   own SSH connection (its own handshake, its own sshd session process), all tunnelled
   through one jump-host connection, as with a real bastion. 15 entries → node1 (up),
   4 → node3 with sshd stopped (connection refused, at once), 1 → node2 cut off
   silently: ``Host.link_down(both_ends=False)`` plus a permanent neighbour entry on the
   jump host, so the SYNs vanish and the connect has to time out (without that entry
   the jump host's ARP gives up after ~3 s with "No route to host").
   ``connect_timeout`` is labdeck's default, 5 s. Measured: ``Workstation.list_instances()``
   wall time, the first (cold: connecting) and warm ones (connections established),
   spaced 0.6 s apart, which is past labdeck's 0.5 s reconnect-backoff cap, as the
   TUI's 2 s refresh interval is; plus a few taken at once after a warm one, while the
   down hosts are still in their backoff. The same for the 19 hosts without the silent
   one (a second Workstation). Baselines: 20 fresh OpenSSH ``ssh … true`` in parallel
   (ConnectTimeout 5), and SkyPilot's ``sky status`` at 2–23 s (published, not measured
   here). Target: ≤ 1 s.

Diagnostic rows (dim, no target), parts 1 and 2: a second Workstation, its own pool and
code mirror, used in turn with the first (same launches, same file changes), whose
connection to the jump host has run one command on the jump host itself. OpenSSH's sshd
turns TCP_NODELAY on for a connection only when a session (exec/shell) starts on it
(``ssh_packet_set_interactive``); a jump host that only forwards keeps Nagle's algorithm
on, and small replies through it can wait for the client's delayed ACK (~40 ms on Linux).
labdeck's pool now runs a no-op command on every connection it opens, the jump host's
included (``backends/ssh.py``), so these rows are a control: they should match labdeck's.

Run: ``python3 -m tests.benchmarks remote`` (or ``python3 -m tests.benchmarks.bench_remote``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import posixpath
import random
import shutil
import socket
import statistics
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from backends import code
from backends.config import load_config
from backends.paths import Paths
from backends.ssh import BACKOFF_MAX, SSHTransport
from backends.workstation import Workstation

from ._common import Verdict, console, finish, fmt_ms, new_table, scratch_dir, summarize, verdict, write_results

NAME = "remote"
N_NODES = 3  # Rig.build's maximum (tests.rig.MAX_NODES)
CONNECT_TIMEOUT_S = 5.0  # labdeck's default ([providers.NAME] connect_timeout)
MAX_CONCURRENT = 64  # so the measured launches never queue behind the earlier `sleep 1` jobs
LAUNCH_COMMAND = "sleep 1"
LAUNCHES = 30
PROJECT_FILES = 20
TREE_DIRS, TREE_FILES_PER_DIR = 200, 25  # 5,000 files
SYNC_REPS = 5
HOSTS_UP, HOSTS_REFUSED = 15, 4  # + 1 silent = 20
REFRESHES = 10
REFRESH_GAP_S = 0.6  # > BACKOFF_MAX: a down host is tried again, as at the TUI's 2 s refresh
IN_BACKOFF = 3  # refreshes right after a warm one (the down hosts still in their backoff)
SSH_ROUNDS = 3  # rounds of 20 parallel fresh ssh
TARGET_SUBMIT_RATIO = 0.5
TARGET_REFRESH_S = 1.0
SKY_STATUS_S = (2.0, 23.0)  # SkyPilot `sky status`, the anchor


# ---- set-up ---------------------------------------------------------------------------
@contextmanager
def no_team_dir_override() -> Iterator[None]:
    """LABDECK_TEAM_DIR would put the benchmark's stores into a real team directory: unset it meanwhile."""
    saved = os.environ.pop("LABDECK_TEAM_DIR", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["LABDECK_TEAM_DIR"] = saved


def lab_config(rig, hosts: dict[str, tuple[Any, Path]], *, max_concurrent: int = 2) -> str:
    """``[providers.lab]`` (ssh, connect_timeout 5 s) with the jump host unlisted and ``hosts``:
    name → (rig node, identity file), each through the jump host."""
    text = (f'[providers.lab]\ntype = "ssh"\nssh_config = ""\nconnect_timeout = {CONNECT_TIMEOUT_S}\n\n'
            f'[providers.lab.hosts.jump]\nhost = "{rig.jump.addr}"\nuser = "{rig.jump.user}"\n'
            f'identity_file = "{rig.client_key}"\nlisted = false\n\n')
    for name, (node, key) in hosts.items():
        text += (f'[providers.lab.hosts.{name}]\nhost = "{node.addr}"\nuser = "{node.user}"\nidentity_file = "{key}"\n'
                 f'jump = ["jump"]\nprice_per_hour = 2.5\nmax_concurrent = {max_concurrent}\n\n')
    return text


def open_ws(home: Path, config_text: str) -> Workstation:
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(config_text + f'[store]\nteam_dir = "{home / "team"}"\n')
    return Workstation(load_config(Paths.resolve(home)))


def fresh_ssh(config: Path, host: str) -> float:
    """One fresh OpenSSH ``ssh -F config host true``; seconds, or an error."""
    t = time.perf_counter()
    p = subprocess.run(["ssh", "-F", str(config), host, "true"], capture_output=True, text=True, timeout=30,
                       stdin=subprocess.DEVNULL)
    dt = time.perf_counter() - t
    if p.returncode != 0:
        raise RuntimeError(f"ssh {host} true: rc {p.returncode}: {p.stderr.strip()}")
    return dt


def make_project(root: Path, n: int) -> Path:
    """A small git project (``n`` files, one commit), for launches with code sync."""
    rng = random.Random(7)
    for i in range(n):
        sub = ("src", "configs", "scripts", "tests")[i % 4]
        p = root / sub / f"file{i:02d}.py"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("".join(f"x_{j} = {rng.random():.6f}\n" for j in range(rng.randrange(20, 120))))
    git = ["git", "-C", str(root), "-c", "user.name=bench", "-c", "user.email=bench@example.com"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "bench project"], check=True)
    return root


def make_tree(root: Path, dirs: int, per_dir: int) -> list[str]:
    """``dirs × per_dir`` small text files of 1–4 KB (deterministic); their relative paths."""
    rng = random.Random(20240503)
    names = []
    for d in range(dirs):
        pkg = root / f"pkg{d:03d}"
        pkg.mkdir(parents=True)
        for f in range(per_dir):
            size = rng.randrange(1024, 4096)
            line = f"# pkg{d:03d}/mod{f:02d}: " + "".join(rng.choice("abcdefghij ") for _ in range(60)) + "\n"
            (pkg / f"mod{f:02d}.py").write_text((line * (size // len(line) + 1))[:size])
            names.append(f"pkg{d:03d}/mod{f:02d}.py")
    return names


# ---- 1. submit latency ---------------------------------------------------------------------
KINDS = ("nosync", "sync")


async def measure_submit(wss: dict[str, Workstation], rig, project: Path, launches: int) -> dict[str, Any]:
    """Fresh ssh and each Workstation's two launch kinds, round-robin, ``launches`` times."""
    workdir = str(rig.host("node1").home)  # exists on the node (sync_code=False runs there as it is)

    async def launch(ws: Workstation, kind: str) -> tuple[float, str]:
        t = time.perf_counter()
        run = await ws.launch(LAUNCH_COMMAND, instance="node1", workdir=str(project) if kind == "sync" else workdir,
                              sync_code=kind == "sync", name="bench-submit")
        return time.perf_counter() - t, run.state

    # warm-up, not measured: connects each pool (jump + node1), caches the instance listing,
    # records the host keys (labdeck's and OpenSSH's), fills the hash cache and the code mirror
    warm = {f"{label}/{kind}": (await launch(ws, kind))[0] for label, ws in wss.items() for kind in KINDS}
    fresh_ssh(rig.ssh_config_path, "node1")
    ssh: list[float] = []
    samples = {label: {kind: [] for kind in KINDS} for label in wss}
    states = {label: {kind: [] for kind in KINDS} for label in wss}
    for _ in range(launches):  # round-robin, so machine noise hits all alike
        ssh.append(fresh_ssh(rig.ssh_config_path, "node1"))
        for label, ws in wss.items():
            for kind in KINDS:
                dt, state = await launch(ws, kind)
                samples[label][kind].append(dt)
                states[label][kind].append(state)
    out: dict[str, Any] = {"command": LAUNCH_COMMAND, "launches": launches, "project_files": PROJECT_FILES,
                           "warmup_ms": {k: round(v * 1000, 3) for k, v in warm.items()}, "ssh": summarize(ssh)}
    for label, ws in wss.items():
        runs, _ = ws.store.runs(team=False)
        synced = [r.code.get("synced_files") or 0 for r in sorted(runs, key=lambda r: r.id)
                  if r.code and r.name == "bench-submit"][-launches:]  # the measured ones (ULIDs sort by creation)
        out[label] = {kind: {**summarize(samples[label][kind]),
                             "not_running": sum(st != "running" for st in states[label][kind])} for kind in KINDS}
        out[label]["sync"]["files_uploaded"] = sum(synced)
    return out


async def jump_session(ws: Workstation) -> None:
    """Run one command on the jump host itself, through the pool's connection to it (diagnostic only).

    OpenSSH's sshd turns TCP_NODELAY on for a client's connection only when a session
    (exec/shell) starts on it (``ssh_packet_set_interactive``); a jump host that only ever
    forwards (direct-tcpip, which is all labdeck asks of it) keeps Nagle's algorithm on that
    socket, and small packets back to labdeck then wait for the client's delayed ACK (~40 ms
    on Linux). labdeck's pool does the same at connect now, so this is a second one (a control)."""
    provider = ws.providers["lab"]
    await SSHTransport(provider.pool, provider.specs["jump"], instance="jump").run("true")


# ---- 2. incremental sync ---------------------------------------------------------------------
def rsync(src: Path, config: Path, dest: str) -> float:
    t = time.perf_counter()
    p = subprocess.run(["rsync", "-a", "-e", f"ssh -F {config}", f"{src}/", f"node1:{dest}/"], capture_output=True,
                       text=True, timeout=300, stdin=subprocess.DEVNULL)
    dt = time.perf_counter() - t
    if p.returncode != 0:
        raise RuntimeError(f"rsync: rc {p.returncode}: {p.stderr.strip()}")
    return dt


async def timed_sync(ws: Workstation, tree: Path, mirror: str) -> tuple[float, float, code.SyncResult]:
    """``code.snapshot`` (with the Workstation's hash cache, as launch does) + ``code.sync``: their seconds and result."""
    transport = await ws.transport("node1")
    cache = ws.config.paths.cache_dir / "hashes.json"
    t0 = time.perf_counter()
    snap = await asyncio.to_thread(code.snapshot, tree, cache)
    t1 = time.perf_counter()
    res = await code.sync(snap, transport, mirror)
    return t1 - t0, time.perf_counter() - t1, res


async def measure_sync(wss: dict[str, Workstation], rig, tree: Path, names: list[str], reps: int) -> dict[str, Any]:
    """A first full sync per Workstation (each to its own mirror) and rsync; then ``reps`` times: one file changed,
    synced by each Workstation and by rsync, every copy checked against the local file."""
    has_rsync = shutil.which("rsync") is not None
    rsync_dest = "rsync-tree" if has_rsync else None  # relative: under the node user's home
    out: dict[str, Any] = {"files": len(names), "bytes": sum((tree / n).stat().st_size for n in names),
                           "rsync": "rsync" if has_rsync else None, "full": {}, "reps": []}
    mirrors = {}
    for label, ws in wss.items():
        transport = await ws.transport("node1")
        runs_root = await transport.runs_root()
        key = code.Snapshot(tree.resolve(), {}, {}).project_key(ws.user, socket.gethostname())
        mirrors[label] = f"{posixpath.dirname(runs_root)}/code/{key}-{label}"  # launch's mirror path, one per pool
        snap_s, sync_s, res = await timed_sync(ws, tree, mirrors[label])
        out["full"][label] = {"snapshot_s": snap_s, "sync_s": sync_s, "total_s": snap_s + sync_s,
                              "uploaded_files": res.uploaded_files, "uploaded_bytes": res.uploaded_bytes}
    out["full"]["rsync_s"] = rsync(tree, rig.ssh_config_path, rsync_dest) if rsync_dest else None
    check_ws = next(iter(wss.values()))
    for i, name in enumerate(random.Random(11).sample(names, reps)):  # a different file each repetition
        with open(tree / name, "a") as f:  # new size and mtime
            f.write(f"# changed in repetition {i}\n")
        rep: dict[str, Any] = {"file": name}
        for label, ws in wss.items():
            snap_s, sync_s, res = await timed_sync(ws, tree, mirrors[label])
            rep[label] = {"snapshot_s": snap_s, "sync_s": sync_s, "total_s": snap_s + sync_s,
                          "uploaded_files": res.uploaded_files, "deleted_files": res.deleted_files}
        rep["rsync_s"] = rsync(tree, rig.ssh_config_path, rsync_dest) if rsync_dest else None
        copies = [f"{m}/{name}" for m in mirrors.values()] + ([f"{rsync_dest}/{name}"] if rsync_dest else [])
        check = await (await check_ws.transport("node1")).run("sha256sum " + " ".join(copies))
        remote = [line.split()[0] for line in check.text().splitlines()]
        local = hashlib.sha256((tree / name).read_bytes()).hexdigest()
        rep["correct"] = (len(remote) == len(copies) and all(h == local for h in remote)
                          and all(rep[label]["uploaded_files"] == 1 and rep[label]["deleted_files"] == 0 for label in wss))
        out["reps"].append(rep)
    out["median"] = {label: {k: statistics.median(r[label][k] for r in out["reps"])
                             for k in ("snapshot_s", "sync_s", "total_s")} for label in wss}
    out["median"]["rsync_s"] = statistics.median(r["rsync_s"] for r in out["reps"]) if rsync_dest else None
    out["correct"] = all(r["correct"] for r in out["reps"])
    out["mirrors"] = mirrors
    return out


# ---- 3. status refresh -------------------------------------------------------------------------
def silence(rig, node) -> None:
    """Cut ``node`` off without a word: its end of the jump link goes down, and the jump host keeps a
    permanent neighbour entry for it, so SYNs leave into a link without carrier and vanish (no ARP
    failure, no ICMP): a connect through the jump host hangs until its timeout."""
    from tests.rig import _ip

    nif, jif = f"{rig.id}n{node.index}", f"{rig.id}j{node.index}"
    mac = json.loads(_ip("-j", "link", "show", nif, ns=node.ns).stdout)[0]["address"]
    node.link_down(both_ends=False)
    _ip("neigh", "replace", node.addr, "lladdr", mac, "nud", "permanent", "dev", jif, ns=rig.jump.ns)


def fleet(rig, keys_dir: Path, *, with_silent: bool) -> dict[str, tuple[Any, Path, str]]:
    """20 host entries (19 without the silent one): name → (node, key copy, role)."""
    roles = ["up"] * HOSTS_UP + ["refused"] * HOSTS_REFUSED + (["silent"] if with_silent else [])
    random.Random(3).shuffle(roles)  # down hosts spread through the list, as in life
    node_of = {"up": rig.host("node1"), "refused": rig.host("node3"), "silent": rig.host("node2")}
    out = {}
    for i, role in enumerate(roles):
        key = keys_dir / f"id_gpu{i + 1:02d}"
        if not key.exists():
            shutil.copyfile(rig.client_key, key)
            os.chmod(key, 0o600)
        out[f"gpu{i + 1:02d}"] = (node_of[role], key, role)
    return out


def fleet_ssh_config(rig, hosts: dict[str, tuple[Any, Path, str]], path: Path) -> Path:
    """The rig's OpenSSH config plus one ``Host gpuNN`` block per entry (ProxyJump jump, ConnectTimeout 5)."""
    text = rig.ssh_config_text()
    for name, (node, key, _) in hosts.items():
        text += (f"\nHost {name}\n    HostName {node.addr}\n    User {node.user}\n    Port 22\n"
                 f"    IdentityFile {key}\n    IdentitiesOnly yes\n    UserKnownHostsFile {rig.known_hosts_path}\n"
                 f"    GlobalKnownHostsFile /dev/null\n    StrictHostKeyChecking accept-new\n    BatchMode yes\n"
                 f"    ConnectTimeout {CONNECT_TIMEOUT_S:g}\n    ControlMaster no\n    LogLevel ERROR\n"
                 f"    ProxyJump jump\n")
    path.write_text(text)
    return path


def parallel_ssh(config: Path, hosts: dict[str, tuple[Any, Path, str]]) -> dict[str, Any]:
    """All hosts at once, ``ssh -F config NAME true``: wall time until all have answered, and until the non-silent have."""
    t = time.perf_counter()
    procs = {name: subprocess.Popen(["ssh", "-F", str(config), name, "true"], stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for name in hosts}
    done: dict[str, tuple[float, int]] = {}
    while len(done) < len(procs):
        for name, p in procs.items():
            if name not in done and p.poll() is not None:
                done[name] = (time.perf_counter() - t, p.returncode)
        if time.perf_counter() - t > 60:  # ConnectTimeout bounds them all; never hang the benchmark
            for name, p in procs.items():
                if name not in done:
                    p.kill()
                    p.wait()
                    done[name] = (time.perf_counter() - t, -9)
        time.sleep(0.002)
    ok = {name: rc == 0 for name, (_, rc) in done.items()}
    return {"all_s": max(dt for dt, _ in done.values()),
            "non_silent_s": max((dt for n, (dt, _) in done.items() if hosts[n][2] != "silent"), default=0.0),
            "answered_ok": sum(ok.values()),
            "roles_right": all(ok[n] == (hosts[n][2] == "up") for n in hosts)}


async def measure_refresh(ws: Workstation, hosts: dict[str, tuple[Any, Path, str]], refreshes: int) -> dict[str, Any]:
    provider = ws.providers["lab"]
    per_host: dict[str, float] = {}
    describe = provider.describe

    async def timed_describe(instance: str):  # per-host time of the cold round (where the time goes)
        t = time.perf_counter()
        try:
            return await describe(instance)
        finally:
            per_host.setdefault(instance, time.perf_counter() - t)

    provider.describe = timed_describe  # type: ignore[method-assign]

    async def refresh() -> tuple[float, dict[str, str]]:
        t = time.perf_counter()
        listing = await ws.list_instances()
        dt = time.perf_counter() - t
        return dt, {i.name: i.state for i in listing.instances if i.provider == "lab"}

    cold_s, states = await refresh()
    roles = {name: role for name, (_, _, role) in hosts.items()}
    right = all((states.get(n) == "running") == (r == "up") for n, r in roles.items()) and len(states) == len(hosts)
    warm, backoff = [], []
    for _ in range(refreshes):
        await asyncio.sleep(REFRESH_GAP_S)
        dt, st = await refresh()
        warm.append(dt)
        # up hosts stay running; the others are "connecting" (the silent one, while its first connect is pending),
        # then "unreachable"
        right = right and all((st.get(n) == "running") == (r == "up") for n, r in roles.items())
    for _ in range(IN_BACKOFF):  # at once after the last: the down hosts are still in their backoff
        dt, st = await refresh()
        backoff.append(dt)
    del provider.describe  # back to the class's method

    def worst(role: str) -> float | None:
        xs = [dt for n, dt in per_host.items() if roles.get(n) == role]
        return max(xs) * 1000 if xs else None

    return {"hosts": len(hosts), "roles": {r: sum(v == r for v in roles.values()) for r in ("up", "refused", "silent")},
            "cold_ms": cold_s * 1000, "warm": summarize(warm), "in_backoff": summarize(backoff),
            "cold_per_host_worst_ms": {r: worst(r) for r in ("up", "refused", "silent")},
            "states_right": right}


# ---- main --------------------------------------------------------------------------------------
async def run_all(rig, root: Path, quick: bool) -> dict[str, Any]:
    launches = 5 if quick else LAUNCHES
    reps = 2 if quick else SYNC_REPS
    dirs = 20 if quick else TREE_DIRS
    refreshes = 3 if quick else REFRESHES
    rounds = 1 if quick else SSH_ROUNDS
    out: dict[str, Any] = {}

    # parts 1 and 2: two Workstations on node1, used in turn: labdeck as it is, and (diagnostic)
    # one whose connection to the jump host has had a session, so the jump's sshd set TCP_NODELAY on it
    project = make_project(root / "project", PROJECT_FILES)
    t = time.perf_counter()
    names = make_tree(root / "tree", dirs, TREE_FILES_PER_DIR)
    tree_write_s = time.perf_counter() - t
    config = lab_config(rig, {n.name: (n, rig.client_key) for n in rig.nodes}, max_concurrent=MAX_CONCURRENT)
    wss = {"labdeck": open_ws(root / "home-1", config), "nodelay": open_ws(root / "home-1-nodelay", config)}
    try:
        await jump_session(wss["nodelay"])
        console.print(f"[dim]remote: submit latency, {launches} × 5 …[/]")
        out["submit"] = await measure_submit(wss, rig, project, launches)
        console.print(f"[dim]remote: sync of {len(names):,} files, {reps} incremental repetitions …[/]")
        out["sync"] = await measure_sync(wss, rig, root / "tree", names, reps)
        out["sync"]["tree_write_s"] = tree_write_s
    finally:
        for ws in wss.values():
            await ws.close()

    # part 3: 20 entries, 4 refused, 1 silent
    console.print(f"[dim]remote: status refresh of 20 hosts, {refreshes} warm refreshes each …[/]")
    rig.host("node3").stop_sshd(kill_sessions=True)
    silence(rig, rig.host("node2"))
    keys = root / "keys"
    keys.mkdir()
    out["refresh"] = {}
    for label, with_silent in (("no_silent", False), ("with_silent", True)):
        hosts = fleet(rig, keys, with_silent=with_silent)
        ws = open_ws(root / f"home-{label}", lab_config(rig, {n: (node, key) for n, (node, key, _) in hosts.items()}))
        try:
            out["refresh"][label] = await measure_refresh(ws, hosts, refreshes)
        finally:
            await ws.close()
    hosts = fleet(rig, keys, with_silent=True)
    config = fleet_ssh_config(rig, hosts, root / "fleet_ssh_config")
    fresh_ssh(config, next(n for n, h in hosts.items() if h[2] == "up"))  # warm-up (binary, page cache)
    ssh_rounds = [parallel_ssh(config, hosts) for _ in range(rounds)]
    out["refresh"]["openssh_parallel"] = {
        "rounds": ssh_rounds,
        "all_p50_ms": statistics.median(r["all_s"] for r in ssh_rounds) * 1000,
        "non_silent_p50_ms": statistics.median(r["non_silent_s"] for r in ssh_rounds) * 1000,
        "roles_right": all(r["roles_right"] for r in ssh_rounds),
    }
    return out


DIAG = "diagnostic, jump with TCP_NODELAY"


def dim(text: str) -> str:
    return f"[dim]{text}[/]" if text else ""


def submit_checked(kind: str, st: dict[str, Any]) -> str:
    text = "all running" if st["not_running"] == 0 else f"[red]{st['not_running']} not running[/]"
    return text + (f", {st['files_uploaded']} files sent" if kind == "sync" else "")


def main(quick: bool = False) -> list[Verdict]:
    from tests.rig import Rig, RigUnavailable

    t_all = time.perf_counter()
    with no_team_dir_override(), scratch_dir("remote") as root:
        try:
            rig = Rig.build(N_NODES)
        except RigUnavailable as e:
            console.print(f"[bold yellow]bench_remote skipped: the SSH rig is unavailable here ({e}).[/]\n")
            write_results(NAME, {"skipped": str(e)}, quick=quick)
            return [Verdict(NAME, "all", "skipped", str(e), None)]
        try:
            build_s = rig.build_seconds
            res = asyncio.run(run_all(rig, root, quick))
        finally:
            rig.close()
    elapsed = time.perf_counter() - t_all
    verdicts: list[Verdict] = []

    # ---- 1
    s = res["submit"]
    ssh50 = s["ssh"]["p50_ms"]
    t1 = new_table(
        f"Submit on a warm node, through the jump host (`{LAUNCH_COMMAND}` until `running`; {s['launches']} each, "
        f"round-robin; target: labdeck p50 ≤ {TARGET_SUBMIT_RATIO:g}× fresh ssh)",
        ["What", ("p50 ms", "right"), ("p99 ms", "right"), ("min ms", "right"), ("max ms", "right"),
         ("p50 / ssh", "right"), "Checked", "Target"])
    t1.add_row("fresh OpenSSH `ssh node1 true` (ProxyJump)", fmt_ms(ssh50), fmt_ms(s["ssh"]["p99_ms"]),
               fmt_ms(s["ssh"]["min_ms"]), fmt_ms(s["ssh"]["max_ms"]), "baseline", "rc 0", "", end_section=True)
    for label in ("labdeck", "nodelay"):
        for kind in KINDS:
            st = s[label][kind]
            ratio = st["p50_ms"] / ssh50
            what = "sync_code=False" if kind == "nosync" else f"code sync ({s['project_files']} files, unchanged)"
            if label == "labdeck":
                met = None if quick else (ratio <= TARGET_SUBMIT_RATIO and st["not_running"] == 0)
                t1.add_row(f"labdeck launch, {what}", fmt_ms(st["p50_ms"]), fmt_ms(st["p99_ms"]), fmt_ms(st["min_ms"]),
                           fmt_ms(st["max_ms"]), f"{ratio:.2f}×", submit_checked(kind, st), verdict(met))
                if met is not None:
                    verdicts.append(Verdict(NAME, f"submit p50, {what}", f"{st['p50_ms']:.0f} ms = {ratio:.2f}× ssh "
                                            f"({ssh50:.0f} ms)", f"≤ {TARGET_SUBMIT_RATIO:g}× fresh ssh", met))
            else:
                t1.add_row(dim(f"{DIAG}: {what}"), *(dim(fmt_ms(st[k])) for k in ("p50_ms", "p99_ms", "min_ms", "max_ms")),
                           dim(f"{ratio:.2f}×"), dim(submit_checked(kind, st)), "")
    console.print(t1)

    # ---- 2
    y = res["sync"]
    full, med, rs = y["full"], y["median"], y["median"]["rsync_s"]

    def ms(v: float | None) -> str:
        return fmt_ms(v * 1000) if v is not None else "—"

    def vs(total: float, base: float | None) -> str:
        return f"{total / base:.2f}×" if base else ""

    t2 = new_table(
        f"Sync of {y['files']:,} files ({y['bytes'] / 1e6:.1f} MB) to node1 through the jump host (incremental: "
        f"one file changed, median of {len(y['reps'])}, a different file each time, all three after the same change)",
        ["What", ("snapshot ms", "right"), ("sync ms", "right"), ("total ms", "right"), ("vs rsync", "right"), "Checked"])
    no_rsync = "[yellow]rsync not installed: skipped[/]"
    f = full["labdeck"]
    t2.add_row("labdeck first full sync (hash all, send all)", ms(f["snapshot_s"]), ms(f["sync_s"]), ms(f["total_s"]),
               vs(f["total_s"], full["rsync_s"]), f"{f['uploaded_files']:,} files sent")
    f = full["nodelay"]
    t2.add_row(dim(f"{DIAG}: first full sync"), dim(ms(f["snapshot_s"])), dim(ms(f["sync_s"])), dim(ms(f["total_s"])),
               dim(vs(f["total_s"], full["rsync_s"])), dim(f"{f['uploaded_files']:,} files sent"))
    t2.add_row("rsync -a, first full copy (ssh via ProxyJump)", "", "", ms(full["rsync_s"]) if y["rsync"] else no_rsync,
               "baseline" if y["rsync"] else "", "", end_section=True)
    m = med["labdeck"]
    ok = "1 file sent each time; " + ("every copy matches" if y["correct"] else "[red]MISMATCH[/]")
    t2.add_row("labdeck snapshot + sync, one file changed", ms(m["snapshot_s"]), ms(m["sync_s"]), ms(m["total_s"]),
               vs(m["total_s"], rs), ok)
    m = med["nodelay"]
    t2.add_row(dim(f"{DIAG}: one file changed"), dim(ms(m["snapshot_s"])), dim(ms(m["sync_s"])), dim(ms(m["total_s"])),
               dim(vs(m["total_s"], rs)), "")
    t2.add_row("rsync -a, same change", "", "", ms(rs) if y["rsync"] else no_rsync, "baseline" if y["rsync"] else "", "")
    console.print(t2)
    if not quick:
        m = med["labdeck"]
        verdicts.append(Verdict(NAME, f"incremental sync, {y['files']:,} files, 1 changed",
                                f"{m['total_s'] * 1000:.0f} ms" + (f" = {m['total_s'] / rs:.2f}× rsync ({rs * 1000:.0f} ms)"
                                                                    if rs else ""), "— (beside rsync -a)", None))

    # ---- 3
    r = res["refresh"]
    ws_, ssh_ = r["with_silent"], r["openssh_parallel"]
    t3 = new_table(
        f"Status refresh: Workstation.list_instances(), hosts through one jump host (connect_timeout "
        f"{CONNECT_TIMEOUT_S:g} s, labdeck's default; target ≤ {TARGET_REFRESH_S:g} s)",
        ["Hosts", "Refresh", ("p50 ms", "right"), ("max ms", "right"), "Where the time goes", "Target"])
    for key, label in (("with_silent", "20: 15 up, 4 refused, 1 silent"), ("no_silent", "19: 15 up, 4 refused")):
        x = r[key]
        worst = x["cold_per_host_worst_ms"]
        where = (f"slowest: up {fmt_ms(worst['up'])}, refused {fmt_ms(worst['refused'])}"
                 + (f", silent {fmt_ms(worst['silent'])} (the timeout)" if worst["silent"] is not None else ""))
        met_cold = None if quick else x["cold_ms"] <= TARGET_REFRESH_S * 1000
        met_warm = None if quick else x["warm"]["p50_ms"] <= TARGET_REFRESH_S * 1000
        states = "" if x["states_right"] else " [red](states WRONG)[/]"
        t3.add_row(label, "cold (connecting)", fmt_ms(x["cold_ms"]), "", where + states, verdict(met_cold))
        warm_where = ("the silent host: a new connect, timing out, every time" if key == "with_silent"
                      else "up: one `true` each; refused: a new connect each")
        t3.add_row("", f"warm, {x['warm']['n']}× {REFRESH_GAP_S:g} s apart", fmt_ms(x["warm"]["p50_ms"]),
                   fmt_ms(x["warm"]["max_ms"]), warm_where, verdict(met_warm))
        t3.add_row("", f"warm, {x['in_backoff']['n']}× at once after one", fmt_ms(x["in_backoff"]["p50_ms"]),
                   fmt_ms(x["in_backoff"]["max_ms"]), f"down hosts still in their ≤ {BACKOFF_MAX:g} s backoff", "",
                   end_section=True)
        if not quick:
            verdicts.append(Verdict(NAME, f"refresh {label}, cold", f"{x['cold_ms']:.0f} ms", f"≤ {TARGET_REFRESH_S:g} s", met_cold))
            verdicts.append(Verdict(NAME, f"refresh {label}, warm p50", f"{x['warm']['p50_ms']:.0f} ms",
                                    f"≤ {TARGET_REFRESH_S:g} s", met_warm))
    t3.add_row("20, same", f"OpenSSH: 20 fresh `ssh … true` at once ({len(ssh_['rounds'])}×)", fmt_ms(ssh_["all_p50_ms"]),
               "", f"the 19 non-silent done after {fmt_ms(ssh_['non_silent_p50_ms'])} (ConnectTimeout 5)"
               + ("" if ssh_["roles_right"] else " [red](answers WRONG)[/]"), "baseline")
    t3.add_row("", "SkyPilot `sky status`", f"{SKY_STATUS_S[0] * 1000:,.0f}–{SKY_STATUS_S[1] * 1000:,.0f}",
               "", "published figure, not measured here", "anchor")
    console.print(t3)
    console.print(f"[dim]rig: jump + {N_NODES} nodes (Rig.build caps at 3) built in {build_s:.2f} s; the 20 entries point at "
                  f"node1 (up), node3 (sshd stopped) and node2 (silent), one key copy each, so one connection each; "
                  f"{y['files']:,}-file tree written in {y['tree_write_s']:.1f} s; took {elapsed:.0f} s[/]")
    return finish(NAME, {
        "description": "Remote work through the rig's jump host: submit latency vs fresh ssh, incremental sync vs rsync, "
                       "status refresh of 20 hosts with some down",
        "params": {"launches": s["launches"], "launch_command": LAUNCH_COMMAND, "max_concurrent": MAX_CONCURRENT,
                   "project_files": PROJECT_FILES, "tree_files": y["files"], "sync_reps": len(y["reps"]),
                   "refreshes": ws_["warm"]["n"], "refresh_gap_s": REFRESH_GAP_S, "in_backoff": IN_BACKOFF,
                   "connect_timeout_s": CONNECT_TIMEOUT_S, "backoff_max_s": BACKOFF_MAX, "rig_nodes": N_NODES,
                   "rig_build_s": build_s, "hosts_up": HOSTS_UP, "hosts_refused": HOSTS_REFUSED, "hosts_silent": 1},
        "targets": {"submit_p50_vs_ssh": TARGET_SUBMIT_RATIO, "refresh_s": TARGET_REFRESH_S},
        "anchors": {"sky_status_s": list(SKY_STATUS_S)},
        "results": res,
    }, verdicts, elapsed, quick=quick)


if __name__ == "__main__":
    import sys

    main(quick="--quick" in sys.argv)
