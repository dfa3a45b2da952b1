"""Model serving on a rig node through the jump host: requests/s through labdeck's forward, deploy-to-healthy time.

Runs on the SSH test rig (``tests/rig.py``: real OpenSSH sshd in network namespaces, a jump host
and one node reachable only through it). It needs root; without it the benchmark says so and is
skipped. The node user's Python (``/usr/bin/python3``) gets litserve and numpy from a shared copy of
this interpreter's distributions on ``PYTHONPATH`` (:func:`tests.sites.build_site`: the logic of
``tests/test_serving.py``'s ``node_site`` fixture, plus the extras a requirement names, as pip
installs them: litserve requires ``uvicorn[standard]``, so uvloop and httptools come along). A
small run on node1 writes ``model.npz`` (a 4-feature logistic regression); both parts serve it
with labdeck's ``labdeck_serve.py``, in the same run:

1. **Requests/s and latency through labdeck's forward, beside direct on the node.** One
   ``serving.deploy`` (litserve detached on node1, loopback only, forwarded by labdeck's asyncssh
   connection through the jump host). One load generator (stdlib ``http.client``, ``CLIENTS``
   threads, one keep-alive connection each with TCP_NODELAY as urllib3 and httpx set it, ``POST
   /predict`` with the API key, a short warm-up per client first) drives ``REQUESTS`` requests (a)
   from this machine to ``dep.url``, as a process of its own so it never shares labdeck's event loop
   or GIL, and (b) "direct": the same script run ON node1 as the node user (through labdeck's
   transport) against ``127.0.0.1:<dep.port>`` there, and (c) the reference: the same load from this
   machine through OpenSSH's own C client over the same chain, set up so that every hop turns
   TCP_NODELAY on (:func:`openssh_nodelay_forward`). ``ROUNDS`` rounds, the three paths in every
   order. Target: through labdeck ≥ 0.9× the direct requests/s. The rig's namespaces share this
   machine's CPUs: the load generator, labdeck's forward, both sshd's and litserve all compete for
   the same cores, "direct" included, so a second table gives the CPU each spent per request
   (``/proc`` times of labdeck's process, the jump's and node1's sshd processes, litserve's process
   group, the OpenSSH client processes, the load generator's own ``getrusage``) and what every other
   process on the machine used meanwhile. On a 2-core machine a forwarded request costs the two
   sshd hops' CPU, the forwarder's and more of the load generator's, on the cores litserve needs:
   the OpenSSH row shows what a C client gets there. Diagnostic rows (dim, no target): one client
   (the latency the forward adds to each request), 16 clients, a new connection per request (a new
   SSH channel through both hops each time, as ``serving.predict``'s urllib does), asyncssh's own
   ``forward_local_port`` on labdeck's connection (labdeck's forward is a relay in Python that dials
   a channel per client, so it heals after a reconnect), the line ``deploy`` hands a teammate
   (``ssh -N -L … -J jump``: with no session on either hop OpenSSH leaves Nagle on, and http.client
   writes headers and body separately, so many requests wait ~40 ms for a delayed ACK), and a
   deployment on the test fixture's node site (no uvicorn[standard] extras: uvicorn on plain
   asyncio + h11, whose accepted sockets keep Nagle on: uvicorn binds the listening socket itself
   with proto 0 and asyncio sets TCP_NODELAY only for proto IPPROTO_TCP, so every keep-alive
   request after the first waits ~40 ms for a delayed ACK).
2. **Deploy to healthy, beside litserve's own start.** ``STARTS`` times, alternating:
   ``serving.deploy(...)`` wall time on a warm connection, split by timing the transport calls it
   makes (model file check, litserve import check, free-port check, upload + start + forward, the
   wait for ``/health``), then ``serving.stop``; and on node1 itself, ``labdeck_serve.py --port P
   --model …`` started directly (same python, same ``PYTHONPATH``, ``LIT_SERVER_API_KEY`` set as
   under labdeck) and ``127.0.0.1:P/health`` polled every 20 ms from the node until 200, then the
   server's process group stopped. Medians. Target: deploy ≤ litserve's own start + 1 s.

Run: ``python3 -m tests.benchmarks serving`` (or ``python3 -m tests.benchmarks.bench_serving``).
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ._common import (
    Verdict,
    console,
    finish,
    fmt_ms,
    new_table,
    percentile,
    scratch_dir,
    verdict,
    write_results,
)

NAME = "serving"
REQUESTS = 6000  # per path, split over ROUNDS
ROUNDS = 12  # the three paths in every order, twice: this small machine is noisy; more, shorter rounds average it out
CLIENTS = 4
MANY_CLIENTS = 16  # diagnostic: enough concurrency to hide the forward's per-request latency
WARMUP_PER_CLIENT = 25
DIAG_REQUESTS = 1000  # per diagnostic row
BARE_REQUESTS = 300  # per path, on the fixture's node site (~40 ms a request there)
STARTS = 5
HEALTH_POLL_S = 0.02  # litserve's own start: how often the node polls /health
TARGET_RPS_RATIO = 0.9
TARGET_START_EXTRA_S = 1.0
BODY_X = [[0.0, 0.0, 0.0, 0.0]]  # the model is w = ones(4), b = 0: prob 0.5

# The load generator: stdlib only, so it runs with the node user's /usr/bin/python3 as it is.
# argv: host port total clients mode(keepalive|new) warmup_per_client; the key in $BENCH_API_KEY.
LOADGEN = r'''
import http.client, json, os, resource, socket, sys, threading, time
host, port, total, clients, mode, warm = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], int(sys.argv[6])
body = json.dumps({"x": %s}).encode()
headers = {"Content-Type": "application/json", "X-API-Key": os.environ.get("BENCH_API_KEY", "")}
barrier = threading.Barrier(clients + 1)
lat = [[] for _ in range(clients)]
errors, checked = [], []

def one(conn):
    if conn is None:
        conn = http.client.HTTPConnection(host, port, timeout=30)
        conn.connect()
        # http.client sends the headers and the body in two send()s: with Nagle on, the body waits
        # for the server's delayed ACK (~40 ms a request on a keep-alive connection). urllib3/requests
        # and httpx set TCP_NODELAY; so does this client.
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn.request("POST", "/predict", body, headers)
    r = conn.getresponse()
    data = r.read()
    if r.status != 200:
        conn.close()
        raise RuntimeError("HTTP %%d: %%r" %% (r.status, data[:120]))
    if mode == "new" or r.will_close:
        conn.close()
        conn = None
    return conn, data

def client(i, count):
    conn = None
    for k in range(warm):
        try:
            conn, data = one(conn)
            if k == 0:
                checked.append(json.loads(data).get("prob") == [0.5])
        except Exception as e:
            errors.append("warm-up: " + repr(e))
            conn = None
    barrier.wait()
    mine = lat[i]
    for _ in range(count):
        t = time.perf_counter()
        try:
            conn, _ = one(conn)
        except Exception as e:
            errors.append(repr(e))
            conn = None
            continue
        mine.append(time.perf_counter() - t)
    if conn is not None:
        conn.close()

counts = [total // clients + (1 if i < total %% clients else 0) for i in range(clients)]
threads = [threading.Thread(target=client, args=(i, c)) for i, c in enumerate(counts)]
for t in threads:
    t.start()
barrier.wait()
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
for t in threads:
    t.join()
wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"wall_s": wall, "ok": sum(map(len, lat)), "errors": len(errors), "error_examples": errors[:3],
                  "answers_right": bool(checked) and all(checked),
                  "cpu_s": (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime), "cpu_total_s": r1.ru_utime + r1.ru_stime,
                  "lat_s": [round(x, 6) for xs in lat for x in xs]}))
''' % json.dumps(BODY_X)

# litserve's own start on the node: start labdeck_serve.py in its own session, poll /health from the
# node until 200, stop the process group. argv: python serve_script model log; the key in the env.
STARTER = r'''
import json, os, signal, socket, subprocess, sys, time, urllib.error, urllib.request
python, script, model, log = sys.argv[1:5]
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
req = urllib.request.Request("http://127.0.0.1:%%d/health" %% port, headers={"X-API-Key": os.environ["LIT_SERVER_API_KEY"]})
with open(log, "ab") as logf:
    t0 = time.perf_counter()
    p = subprocess.Popen([python, script, "--port", str(port), "--model", model], start_new_session=True,
                         stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT)
healthy, polls = None, 0
while time.perf_counter() - t0 < 90 and p.poll() is None:
    polls += 1
    try:
        with urllib.request.urlopen(req, timeout=2) as r:
            if r.status == 200:
                healthy = time.perf_counter() - t0
                break
    except (urllib.error.HTTPError, OSError):
        pass
    time.sleep(%s)
t1 = time.perf_counter()
try:
    os.killpg(p.pid, signal.SIGTERM)
except ProcessLookupError:
    pass
killed = False
while True:
    p.poll()
    try:
        os.killpg(p.pid, 0)
    except ProcessLookupError:
        break
    if time.perf_counter() - t1 > 5 and not killed:
        os.killpg(p.pid, signal.SIGKILL)
        killed = True
    time.sleep(0.02)
print(json.dumps({"healthy_s": healthy, "polls": polls, "port": port, "exit": p.wait(),
                  "stop_s": time.perf_counter() - t1, "sigkill": killed}))
''' % HEALTH_POLL_S


# ---- set-up --------------------------------------------------------------------------------
def open_ws(home: Path, rig):
    from backends.config import load_config
    from backends.paths import Paths
    from backends.workstation import Workstation
    from tests.test_ssh import rig_config

    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(rig_config(rig) + f'[store]\nteam_dir = "{home / "team"}"\n')
    return Workstation(load_config(Paths.resolve(home)))


async def train(ws, rig, project: Path, site: Path, name: str):
    """The small run of the test: writes model.npz (w = ones(4), b = 0) into its run directory on node1."""
    project.mkdir(parents=True, exist_ok=True)
    (project / "train.py").write_text(
        "import os, numpy as np\n"
        "np.savez(os.path.join(os.environ['LABDECK_RUN_DIR'], 'model.npz'), w=np.ones(4), b=np.float32(0))\n")
    run = await ws.launch(f"{rig.python} train.py", instance="node1", workdir=str(project), env={"PYTHONPATH": str(site)},
                          name=name)
    done = await asyncio.wait_for(ws.follower.follow(run.id), 90)
    if done.state != "succeeded" or done.artifacts != ["model.npz"]:
        raise RuntimeError(f"training run {done.state}: {ws.follower.local_path(done).read_text()[-2000:]}")
    return done


# ---- CPU accounting ----------------------------------------------------------------------------
COMPONENTS = ("labdeck", "jump sshd", "node sshd", "litserve", "openssh client")


def cpu_snapshot(rig, litserve_pgid: int, ssh_client_pids: tuple[int, ...] = ()) -> dict[str, Any]:
    """CPU seconds so far of: this process (labdeck's asyncssh forward), the jump's and node1's sshd
    processes, litserve's process group, and OpenSSH client processes (with their children: ProxyJump's)."""
    import psutil

    def secs(p) -> float:
        try:
            t = p.cpu_times()
            return t.user + t.system
        except psutil.Error:
            return 0.0

    out = dict.fromkeys(COMPONENTS, 0.0)
    out["labdeck"] = secs(psutil.Process())
    # every process alive now (per-process accounting is exact; /proc/stat's tick sampling is not, for
    # this many sub-millisecond bursts): minus the listed ones, it is what other processes used
    procs: dict[tuple[int, float], float] = {}
    for p in psutil.process_iter():
        try:
            procs[(p.pid, p.create_time())] = secs(p)
        except psutil.Error:
            pass
    out["_procs"] = procs
    for label, host in (("jump sshd", rig.jump), ("node sshd", rig.host("node1"))):
        pid = host.sshd_pid
        if pid is None:
            continue
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
        for p in procs:
            try:
                if p.name() == "sshd":
                    out[label] += secs(p)
            except psutil.Error:
                pass
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == litserve_pgid:
                out["litserve"] += secs(p)
        except (OSError, psutil.Error):
            pass
    for pid in ssh_client_pids:
        try:
            root = psutil.Process(pid)
            out["openssh client"] += sum(secs(p) for p in [root, *root.children(recursive=True)])
        except psutil.Error:
            pass
    return out


# ---- 1. requests/s -------------------------------------------------------------------------------
async def loadgen_local(script: Path, port: int, key: str, n: int, clients: int, mode: str, warm: int) -> dict[str, Any]:
    """The load generator as a process of its own on this machine (never on labdeck's event loop)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), "127.0.0.1", str(port), str(n), str(clients), mode, str(warm),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**os.environ, "BENCH_API_KEY": key})
    out, err = await asyncio.wait_for(proc.communicate(), 300)
    if proc.returncode != 0:
        raise RuntimeError(f"local load generator: rc {proc.returncode}: {err.decode(errors='replace')[-2000:]}")
    return json.loads(out)


async def loadgen_node(transport, python: str, script: str, port: int, key: str, n: int, clients: int, mode: str,
                       warm: int) -> dict[str, Any]:
    """The same load generator on node1, as the node user, against litserve's loopback port there."""
    res = await transport.run(f"{shlex.quote(python)} {shlex.quote(script)} 127.0.0.1 {port} {n} {clients} {mode} {warm}",
                              env={"BENCH_API_KEY": key}, timeout=300)
    if not res.ok:
        raise RuntimeError(f"node load generator: rc {res.exit_code}: {res.stderr.decode(errors='replace')[-2000:]}")
    return json.loads(res.stdout)


async def measured(rig, pgid: int, go: Callable[[], Awaitable[dict[str, Any]]], warm_requests: int,
                   ssh_client_pids: tuple[int, ...] = ()) -> dict[str, Any]:
    """One load run with the components' CPU around it (the warm-up requests are in that CPU too, so the
    per-request figures divide by measured + warm-up requests; the load generator's is its own, measured part)."""
    before, t0 = cpu_snapshot(rig, pgid, ssh_client_pids), time.perf_counter()
    res = await go()
    after, t1 = cpu_snapshot(rig, pgid, ssh_client_pids), time.perf_counter()
    res["component_cpu_s"] = {k: after[k] - before[k] for k in COMPONENTS}
    res["requests_incl_warmup"] = res["ok"] + warm_requests
    res["span_s"] = t1 - t0
    res["ours_cpu_s"] = sum(res["component_cpu_s"].values()) + res["cpu_total_s"]  # + the load generator, all of it
    # processes alive at both snapshots other than the listed ones (the load generator is not: it started after)
    common = before["_procs"].keys() & after["_procs"].keys()
    res["other_cpu_s"] = (sum(after["_procs"][k] - before["_procs"][k] for k in common)
                          - sum(res["component_cpu_s"].values()))
    return res


def combine(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Rounds of one path → req/s over all of them, pooled latencies, CPU ms per request by component."""
    lat = [x for p in parts for x in p["lat_s"]]
    ok = sum(p["ok"] for p in parts)
    wall = sum(p["wall_s"] for p in parts)
    reqs_all = sum(p["requests_incl_warmup"] for p in parts)
    cpu = {k: sum(p["component_cpu_s"][k] for p in parts) * 1000 / reqs_all for k in COMPONENTS}
    cpu["load generator"] = sum(p["cpu_s"] for p in parts) * 1000 / ok if ok else float("nan")
    return {"requests": ok, "errors": sum(p["errors"] for p in parts),
            "error_examples": [e for p in parts for e in p["error_examples"]][:3],
            "answers_right": all(p["answers_right"] for p in parts),
            "wall_s": wall, "rps": ok / wall if wall else 0.0,
            "p50_ms": percentile(lat, 50) * 1000, "p90_ms": percentile(lat, 90) * 1000,
            "p99_ms": percentile(lat, 99) * 1000, "max_ms": max(lat) * 1000 if lat else float("nan"),
            "cpu_ms_per_request": cpu, "cores_busy": sum(cpu.values()) * (ok / wall) / 1000 if wall else 0.0,
            # cores busy over the load runs: the processes above, and every other process on this machine
            "listed_cores_busy": sum(p["ours_cpu_s"] for p in parts) / sum(p["span_s"] for p in parts),
            "other_cores_busy": sum(p["other_cpu_s"] for p in parts) / sum(p["span_s"] for p in parts),
            "rounds": [{"wall_s": p["wall_s"], "rps": p["ok"] / p["wall_s"], "ok": p["ok"]} for p in parts]}


def free_local_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


async def _listening(procs: list[subprocess.Popen], lport: int, what: str) -> None:
    t = time.monotonic()
    while time.monotonic() - t < 15:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{what} exited {p.returncode}: {p.stderr.read().decode(errors='replace')}")
        try:
            socket.create_connection(("127.0.0.1", lport), 0.5).close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise RuntimeError(f"{what} did not listen within 15 s")


def end_procs(procs: list[subprocess.Popen]) -> None:
    for p in reversed(procs):
        if p.poll() is None:
            p.terminate()
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


async def openssh_forward(rig, remote_port: int) -> tuple[list[subprocess.Popen], int]:
    """``ssh -N -L lport:127.0.0.1:remote_port node1`` with the rig's OpenSSH config (ProxyJump jump): the
    line ``deploy`` hands a teammate."""
    lport = free_local_port()
    proc = subprocess.Popen(["ssh", "-F", str(rig.ssh_config_path), "-N", "-o", "ExitOnForwardFailure=yes",
                             "-L", f"{lport}:127.0.0.1:{remote_port}", "node1"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        await _listening([proc], lport, "ssh -N -L")
    except BaseException:
        end_procs([proc])
        raise
    return [proc], lport


async def openssh_nodelay_forward(rig, root: Path, remote_port: int) -> tuple[list[subprocess.Popen], int]:
    """OpenSSH's C client through the same chain with TCP_NODELAY on every hop: the reference path.

    A multiplexing master to the jump host runs a session there (``sleep``), so the master and the
    jump's sshd both turn TCP_NODELAY on for that connection (OpenSSH does so only when a session
    starts); the connection to node1 goes through it (``ProxyCommand ssh -S master -W``) and runs a
    session too, so node1's sshd does the same. Without the sessions (``-N -J``), small packets wait
    for delayed ACKs: see the teammate's-line row."""
    ctl = root / "ld-jump.ctl"
    cfg = str(rig.ssh_config_path)
    procs = [subprocess.Popen(["ssh", "-F", cfg, "-o", "ControlMaster=yes", "-o", f"ControlPath={ctl}", "jump",
                               "sleep", "3600"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)]
    try:
        t = time.monotonic()
        while not ctl.exists():
            if procs[0].poll() is not None or time.monotonic() - t > 15:
                raise RuntimeError(f"ssh master to the jump did not start: {procs[0].stderr.read().decode(errors='replace')}")
            await asyncio.sleep(0.05)
        lport = free_local_port()
        procs.append(subprocess.Popen(
            ["ssh", "-F", cfg, "-o", f"ProxyCommand=ssh -F {cfg} -o ControlPath={ctl} -W %h:%p jump",
             "-o", "ExitOnForwardFailure=yes", "-L", f"{lport}:127.0.0.1:{remote_port}", "node1", "sleep", "3600"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        await _listening(procs, lport, "ssh -L through the jump's master")
    except BaseException:
        end_procs(procs)
        raise
    return procs, lport


PATHS = ("labdeck", "direct", "openssh")
# every order of the three paths, each twice over ROUNDS = 12: each path is first, second and third as often
ORDERS = [("labdeck", "direct", "openssh"), ("openssh", "direct", "labdeck"), ("direct", "openssh", "labdeck"),
          ("labdeck", "openssh", "direct"), ("openssh", "labdeck", "direct"), ("direct", "labdeck", "openssh")]


async def measure_requests(ws, rig, run, root: Path, local_script: Path, node_script: str, quick: bool) -> dict[str, Any]:
    from backends import serving

    n = 300 if quick else REQUESTS
    diag_n = 100 if quick else DIAG_REQUESTS
    warm = 5 if quick else WARMUP_PER_CLIENT
    rounds = len(ORDERS) if quick else ROUNDS
    transport = await ws.transport("node1")
    python = await serving.run_python(transport, ws.store.find_run(run.id))  # the python deploy starts litserve with
    served = await serving.deploy(ws, run.id)
    dep, key = served.deployment, served.api_key
    pgid = dep.pid
    out: dict[str, Any] = {"port": dep.port, "local_port": served.forward.local_port, "requests": n, "clients": CLIENTS,
                           "rounds": rounds, "warmup_per_client": warm, "diag_requests": diag_n,
                           "stack": await uvicorn_stack(transport, run, python)}
    ssh_procs: list[subprocess.Popen] = []

    def via_port(port: int, count: int, clients: int, mode: str, w: int):
        return lambda: loadgen_local(local_script, port, key, count, clients, mode, w)

    def via_labdeck(count: int, clients: int, mode: str, w: int):
        return via_port(served.forward.local_port, count, clients, mode, w)

    def direct(count: int, clients: int, mode: str, w: int):
        return lambda: loadgen_node(transport, python, node_script, dep.port, key, count, clients, mode, w)

    try:
        # main: the three paths in turn, every order
        ref_procs, ref_port = await openssh_nodelay_forward(rig, root, dep.port)
        ssh_procs += ref_procs
        ref_pids = tuple(p.pid for p in ref_procs)
        parts: dict[str, list] = {label: [] for label in PATHS}
        per_round = n // rounds
        for r in range(rounds):
            for label in ORDERS[r % len(ORDERS)]:
                if label == "labdeck":
                    go, pids = via_labdeck(per_round, CLIENTS, "keepalive", warm), ()
                elif label == "direct":
                    go, pids = direct(per_round, CLIENTS, "keepalive", warm), ()
                else:
                    go, pids = via_port(ref_port, per_round, CLIENTS, "keepalive", warm), ref_pids
                parts[label].append(await measured(rig, pgid, go, warm * CLIENTS, pids))
        out["main"] = {label: combine(p) for label, p in parts.items()}

        def rps(x: dict[str, Any]) -> float:
            return x["ok"] / x["wall_s"]

        out["round_ratios"] = [rps(a) / rps(b) for a, b in zip(parts["labdeck"], parts["direct"])]
        out["round_ratios_openssh"] = [rps(a) / rps(b) for a, b in zip(parts["openssh"], parts["direct"])]
        end_procs(ref_procs)
        # diagnostics: one client; more clients; a new connection per request; OpenSSH's forward of the same chain
        diag: dict[str, Any] = {}
        for label, make in (("labdeck", via_labdeck), ("direct", direct)):
            diag[f"1 client, {label}"] = combine([await measured(rig, pgid, make(diag_n, 1, "keepalive", warm), warm)])
        for label, make in (("labdeck", via_labdeck), ("direct", direct)):
            diag[f"{MANY_CLIENTS} clients, {label}"] = combine(
                [await measured(rig, pgid, make(diag_n, MANY_CLIENTS, "keepalive", warm), warm * MANY_CLIENTS)])
        for label, make in (("labdeck", via_labdeck), ("direct", direct)):
            diag[f"new connection per request, {label}"] = combine(
                [await measured(rig, pgid, make(diag_n, CLIENTS, "new", warm), warm * CLIENTS)])
        # asyncssh's own -L listener on the same connection (what labdeck used before its self-healing relay):
        # what the relay's Python pump (a StreamReader/StreamWriter pair per direction) costs
        conn = await transport.handle.get()
        native = await conn.forward_local_port("127.0.0.1", 0, "127.0.0.1", dep.port)
        try:
            for clients in (1, CLIENTS):
                diag[f"asyncssh forward_local_port, {clients} clients"] = combine([await measured(
                    rig, pgid, via_port(native.get_port(), diag_n, clients, "keepalive", warm), warm * clients)])
        finally:
            native.close()
            await native.wait_closed()
        line_procs, lport = await openssh_forward(rig, dep.port)
        ssh_procs += line_procs
        for clients in (1, CLIENTS):
            diag[f"openssh -N -L, {clients} clients"] = combine([await measured(
                rig, pgid, via_port(lport, diag_n, clients, "keepalive", warm), warm * clients,
                tuple(p.pid for p in line_procs))])
        out["diag"] = diag
    finally:
        end_procs(ssh_procs)
        await served.forward.close()
        await serving.stop(ws, dep.id)
    left = (await transport.run(f"ps -o pid=,stat= -g {pgid} | grep -v ' Z' || true")).text().strip()
    out["left_after_stop"] = left
    return out


async def uvicorn_stack(transport, run, python: str) -> str:
    """Which event loop and HTTP parser uvicorn's "auto" picks in the run's environment (its env.sh)."""
    env_sh = shlex.quote(f"{run.run_dir}/env.sh")
    res = await transport.run(f". {env_sh}; {shlex.quote(python)} -c 'import importlib.util as u; "
                              f"print((\"uvloop\" if u.find_spec(\"uvloop\") else \"asyncio\") + \" + \" + "
                              f"(\"httptools\" if u.find_spec(\"httptools\") else \"h11\"))'")
    return res.text().strip() if res.ok else "?"


async def measure_bare(ws, rig, run, local_script: Path, node_script: str, quick: bool) -> dict[str, Any]:
    """The same keep-alive load on a deployment whose node site is the test fixture's (no uvicorn[standard]
    extras: uvicorn on plain asyncio and h11), labdeck then direct."""
    from backends import serving

    n = 80 if quick else BARE_REQUESTS
    warm = 5 if quick else WARMUP_PER_CLIENT
    transport = await ws.transport("node1")
    python = await serving.run_python(transport, ws.store.find_run(run.id))
    served = await serving.deploy(ws, run.id)
    dep, key = served.deployment, served.api_key
    out: dict[str, Any] = {"port": dep.port, "requests": n}
    try:
        out["labdeck"] = combine([await measured(rig, dep.pid, lambda: loadgen_local(
            local_script, served.forward.local_port, key, n, CLIENTS, "keepalive", warm), warm * CLIENTS)])
        out["direct"] = combine([await measured(rig, dep.pid, lambda: loadgen_node(
            transport, python, node_script, dep.port, key, n, CLIENTS, "keepalive", warm), warm * CLIENTS)])
        out["stack"] = await uvicorn_stack(transport, run, python)
    finally:
        await served.forward.close()
        await serving.stop(ws, dep.id)
    return out


# ---- 2. deploy to healthy ------------------------------------------------------------------------
TIMED = ("run", "read_file", "put_files", "start_detached", "forward_port")


def instrument(ws, events: list[tuple[str, float, float]]) -> Callable[[], None]:
    """Time every transport call ``deploy`` makes (the Workstation hands out a new transport object
    each time; this wraps the ones it hands out meanwhile). Returns the undo."""
    orig = ws.transport

    def timed(name, fn):
        async def call(*a, **kw):
            t = time.perf_counter()
            try:
                return await fn(*a, **kw)
            finally:
                events.append((name, t, time.perf_counter()))
        return call

    async def transport(instance):
        t = await orig(instance)
        for name in TIMED:
            setattr(t, name, timed(name, getattr(t, name)))
        return t

    ws.transport = transport

    def undo() -> None:
        del ws.transport  # back to the class's method
    return undo


def deploy_phases(t0: float, t1: float, events: list[tuple[str, float, float]]) -> dict[str, Any]:
    """deploy's wall time split at its transport calls: model file (read_file), litserve import (1st run),
    free port (2nd run), upload + start + forward (… to the end of forward_port), wait for /health (the rest)."""
    det = [(a, b) for n, a, b in events if n == "start_detached"]
    top = [(n, a, b) for n, a, b in sorted(events, key=lambda e: e[1])
           if not (n == "run" and any(a >= da and b <= db for da, db in det))]  # start_detached's own run
    reads = [e for e in top if e[0] == "read_file"]
    runs = [e for e in top if e[0] == "run"]
    fwd = [e for e in top if e[0] == "forward_port"]
    if not (reads and len(runs) >= 2 and fwd):
        raise RuntimeError(f"deploy made unexpected transport calls: {[e[0] for e in top]}")
    model_end, import_end, port_end, fwd_end = reads[0][2], runs[0][2], runs[1][2], fwd[0][2]
    return {"total_s": t1 - t0, "model_file_s": model_end - t0, "import_check_s": import_end - model_end,
            "import_check_cmd_s": runs[0][2] - runs[0][1], "free_port_s": port_end - import_end,
            "upload_start_forward_s": fwd_end - port_end, "wait_health_s": t1 - fwd_end,
            "alive_checks": sum(1 for e in runs if e[1] >= fwd_end)}


async def measure_starts(ws, rig, run, site: Path, node_starter: str, quick: bool) -> dict[str, Any]:
    from backends import serving

    starts = 2 if quick else STARTS
    transport = await ws.transport("node1")
    python = await serving.run_python(transport, ws.store.find_run(run.id))
    serve_script = f"{run.run_dir}/labdeck_serve.py"  # shipped there by the part 1 deploy
    model = f"{run.run_dir}/model.npz"
    log = f"{run.run_dir}/bench-own-start.log"
    deploys, own = [], []
    for i in range(starts):
        for kind in (("labdeck", "own") if i % 2 == 0 else ("own", "labdeck")):
            if kind == "labdeck":
                events: list[tuple[str, float, float]] = []
                undo = instrument(ws, events)
                try:
                    t0 = time.perf_counter()
                    served = await serving.deploy(ws, run.id)
                    t1 = time.perf_counter()
                finally:
                    undo()
                try:
                    deploys.append({**deploy_phases(t0, t1, events), "port": served.deployment.port})
                finally:
                    await served.forward.close()
                    await serving.stop(ws, served.deployment.id)
                left = (await transport.run(f"ps -o pid=,stat= -g {served.deployment.pid} | grep -v ' Z' || true")).text().strip()
                deploys[-1]["left_after_stop"] = left
            else:
                key = "bench-" + os.urandom(12).hex()  # auth on, as under labdeck
                res = await transport.run(
                    f"{shlex.quote(python)} {shlex.quote(node_starter)} {shlex.quote(python)} {shlex.quote(serve_script)} "
                    f"{shlex.quote(model)} {shlex.quote(log)}",
                    env={"PYTHONPATH": str(site), "LIT_SERVER_API_KEY": key}, timeout=180)
                if not res.ok:
                    raise RuntimeError(f"own start: rc {res.exit_code}: {res.stderr.decode(errors='replace')[-2000:]}")
                doc = json.loads(res.stdout)
                if doc["healthy_s"] is None:
                    tail = (await transport.run(f"tail -c 3000 {shlex.quote(log)}")).text()
                    raise RuntimeError(f"litserve did not get healthy on its own: {doc}\n{tail}")
                own.append(doc)
    # litserve's import alone, on the node (what deploy's import check costs, without SSH)
    imp = await transport.run(f"{shlex.quote(python)} -X importtime -c 'import litserve' 2>&1 | tail -1; "
                              f"{shlex.quote(python)} -c 'import time; t=time.perf_counter(); import litserve; "
                              f"print(time.perf_counter()-t)'", env={"PYTHONPATH": str(site)}, timeout=60)
    import_alone = float(imp.text().strip().splitlines()[-1]) if imp.ok else None

    def med(xs: list[float]) -> float:
        return statistics.median(xs)

    keys = ("total_s", "model_file_s", "import_check_s", "free_port_s", "upload_start_forward_s", "wait_health_s")
    return {"starts": starts, "deploys": deploys, "own": own,
            "deploy_median": {k: med([d[k] for d in deploys]) for k in keys},
            "deploy_min": {k: min(d[k] for d in deploys) for k in keys},
            "deploy_max": {k: max(d[k] for d in deploys) for k in keys},
            "alive_checks_median": med([d["alive_checks"] for d in deploys]),
            "own_median_s": med([o["healthy_s"] for o in own]), "own_min_s": min(o["healthy_s"] for o in own),
            "own_max_s": max(o["healthy_s"] for o in own), "own_polls_median": med([o["polls"] for o in own]),
            "own_stop_s_max": max(o["stop_s"] for o in own), "own_sigkill": sum(o["sigkill"] for o in own),
            "litserve_import_on_node_s": import_alone}


# ---- main --------------------------------------------------------------------------------------
async def run_all(rig, root: Path, site: Path, bare_site: Path, quick: bool) -> dict[str, Any]:
    ws = open_ws(root / "home", rig)
    try:
        t = time.perf_counter()
        run = await train(ws, rig, root / "project", site, "bench-serving")
        train_s = time.perf_counter() - t
        bare_run = await train(ws, rig, root / "project-bare", bare_site, "bench-serving-bare")
        transport = await ws.transport("node1")
        home = await transport.home_dir()
        node_loadgen, node_starter = f"{home}/bench_loadgen.py", f"{home}/bench_own_start.py"
        await transport.put_files({node_loadgen: LOADGEN.encode(), node_starter: STARTER.encode()}, mode=0o644)
        local_script = root / "bench_loadgen.py"
        local_script.write_text(LOADGEN)
        console.print("[dim]serving: requests through labdeck's forward, OpenSSH's and direct on node1 …[/]")
        req = await measure_requests(ws, rig, run, root, local_script, node_loadgen, quick)
        console.print("[dim]serving: the same on the test fixture's node site (no uvloop/httptools) …[/]")
        req["bare"] = await measure_bare(ws, rig, bare_run, local_script, node_loadgen, quick)
        console.print("[dim]serving: deploy to healthy vs litserve's own start …[/]")
        starts = await measure_starts(ws, rig, run, site, node_starter, quick)
        await transport.run(f"rm -f {shlex.quote(node_loadgen)} {shlex.quote(node_starter)}")
        return {"train_s": train_s, "requests": req, "starts": starts}
    finally:
        await ws.close()


def dim(text: str) -> str:
    return f"[dim]{text}[/]" if text else ""


def main(quick: bool = False) -> list[Verdict]:
    from tests.rig import Rig, RigUnavailable
    from tests.sites import build_site

    from .bench_remote import no_team_dir_override

    try:
        import litserve  # noqa: F401
    except ImportError as e:
        console.print(f"[bold yellow]bench_serving skipped: litserve does not import here ({e}).[/]\n")
        write_results(NAME, {"skipped": str(e)}, quick=quick)
        return [Verdict(NAME, "all", "skipped", str(e), None)]
    t_all = time.perf_counter()
    # world-readable parent (/tmp): the node users read them
    site = build_site(["litserve", "numpy"])  # as `pip install litserve numpy` has it (extras followed)
    bare_site: Path | None = None
    try:
        with no_team_dir_override(), scratch_dir("serving") as root:
            t = time.perf_counter()
            bare_site = build_site(["litserve", "numpy"], follow_extras=False)  # plain asyncio + h11
            site_s = time.perf_counter() - t
            try:
                rig = Rig.build(1)
            except RigUnavailable as e:
                console.print(f"[bold yellow]bench_serving skipped: the SSH rig is unavailable here ({e}).[/]\n")
                write_results(NAME, {"skipped": str(e)}, quick=quick)
                return [Verdict(NAME, "all", "skipped", str(e), None)]
            try:
                build_s = rig.build_seconds
                res = asyncio.run(run_all(rig, root, site, bare_site, quick))
            finally:
                rig.close()
    finally:
        shutil.rmtree(site, ignore_errors=True)
        if bare_site is not None:
            shutil.rmtree(bare_site, ignore_errors=True)
    elapsed = time.perf_counter() - t_all
    verdicts: list[Verdict] = []

    # ---- 1
    q = res["requests"]
    m = q["main"]
    d_rps = m["direct"]["rps"]
    ratio = m["labdeck"]["rps"] / d_rps if d_rps else 0.0
    met1 = None if quick else ratio >= TARGET_RPS_RATIO and m["labdeck"]["errors"] == 0
    t1 = new_table(
        f"POST /predict on node1 (litserve as `pip install litserve` has it: {q['stack']}): {q['requests']:,} requests "
        f"per path, {q['clients']} clients with keep-alive, {q['rounds']} rounds, the three paths in every order "
        f"(target: through labdeck ≥ {TARGET_RPS_RATIO:g}× direct req/s)",
        ["Path", ("req/s", "right"), ("p50 ms", "right"), ("p99 ms", "right"), ("max ms", "right"), ("vs direct", "right"),
         "Checked", "Target"])
    t1b = new_table(
        "Where the CPU goes (ms of CPU per request, by process; cores busy during the load run: these processes, "
        "and all other processes on this machine)",
        ["Path", ("labdeck", "right"), ("jump sshd", "right"), ("node sshd", "right"), ("litserve", "right"),
         ("load gen", "right"), ("ssh -L", "right"), ("cores: these", "right"), ("other processes", "right")])

    def checked(x: dict[str, Any]) -> str:
        ok = x["errors"] == 0 and x["answers_right"]
        return "all 200, prob 0.5" if ok else f"[red]{x['errors']} errors {x['error_examples']}[/]"

    def row(label: str, x: dict[str, Any], base: float | None, target: str, *, faint: bool = False,
            openssh: bool = False, section: bool = False):
        cells = [label, f"{x['rps']:,.0f}", fmt_ms(x["p50_ms"]), fmt_ms(x["p99_ms"]), fmt_ms(x["max_ms"]),
                 f"{x['rps'] / base:.2f}×" if base else "baseline", checked(x)]
        t1.add_row(*([dim(c) for c in cells] if faint else cells), target, end_section=section)
        c = x["cpu_ms_per_request"]
        cells = [label, *(f"{c[k]:.2f}" for k in ("labdeck", "jump sshd", "node sshd", "litserve", "load generator")),
                 f"{c['openssh client']:.2f}" if openssh else "",
                 f"{x['listed_cores_busy']:.2f}", f"{x['other_cores_busy']:.2f}"]
        t1b.add_row(*([dim(c) for c in cells] if faint else cells), end_section=section)

    row("direct: the load generator on node1 → 127.0.0.1:port", m["direct"], None, "baseline")
    row("labdeck: this machine → dep.url (asyncssh forward via jump)", m["labdeck"], d_rps, verdict(met1))
    row("reference: OpenSSH's C client, same chain, TCP_NODELAY on every hop", m["openssh"], d_rps, "", openssh=True,
        section=True)
    dg = q["diag"]
    one_base = dg["1 client, direct"]["rps"]
    many_base = dg[f"{MANY_CLIENTS} clients, direct"]["rps"]
    new_base = dg["new connection per request, direct"]["rps"]
    row("1 client, direct", dg["1 client, direct"], None, "", faint=True)
    row("1 client, labdeck", dg["1 client, labdeck"], one_base, "", faint=True)
    row(f"{MANY_CLIENTS} clients, direct", dg[f"{MANY_CLIENTS} clients, direct"], None, "", faint=True)
    row(f"{MANY_CLIENTS} clients, labdeck", dg[f"{MANY_CLIENTS} clients, labdeck"], many_base, "", faint=True)
    row("new connection per request, direct", dg["new connection per request, direct"], None, "", faint=True)
    row("new connection per request, labdeck", dg["new connection per request, labdeck"], new_base, "", faint=True)
    for clients, base in ((1, one_base), (q["clients"], d_rps)):
        row(f"asyncssh's own forward_local_port, same connection, {clients} client{'s' if clients > 1 else ''}",
            dg[f"asyncssh forward_local_port, {clients} clients"], base, "", faint=True)
    for clients, base in ((1, one_base), (q["clients"], d_rps)):
        row(f"the teammate's line `ssh -N -L … -J jump`, {clients} client{'s' if clients > 1 else ''}",
            dg[f"openssh -N -L, {clients} clients"], base, "", faint=True, openssh=True, section=clients > 1)
    b = q["bare"]
    row(f"test fixture's node site ({b['stack']}): direct", b["direct"], None, "", faint=True)
    row(f"test fixture's node site ({b['stack']}): labdeck", b["labdeck"], b["direct"]["rps"], "", faint=True)
    console.print(t1)
    added = dg["1 client, labdeck"]["p50_ms"] - dg["1 client, direct"]["p50_ms"]
    rr, ro = q["round_ratios"], q["round_ratios_openssh"]
    console.print(f"[dim]Round by round, labdeck/direct req/s: {', '.join(f'{x:.2f}' for x in rr)} (median "
                  f"{statistics.median(rr):.2f}); OpenSSH/direct: {', '.join(f'{x:.2f}' for x in ro)} (median "
                  f"{statistics.median(ro):.2f}); labdeck/OpenSSH over all rounds: "
                  f"{m['labdeck']['rps'] / m['openssh']['rps']:.2f}×. One client: the forward adds {added:.2f} ms per "
                  f"request at p50. "
                  f"Diagnostic rows: {q['diag_requests']:,} requests each, one run; the fixture's node site: "
                  f"{b['requests']:,}.[/]")
    console.print(t1b)
    console.print(f"[dim]labdeck = this process (the asyncssh forward: both SSH layers, the node connection inside the "
                  f"jump one), jump/node sshd = their sshd processes, litserve = its process group, ssh -L = OpenSSH "
                  f"client processes (the reference: the jump master and the node client with its ProxyCommand), load "
                  f"gen = the load "
                  f"generator's measured part; all but the load generator include the warm-up requests' share. The rig's "
                  f"namespaces share this machine's {os.cpu_count()} CPUs, so 'direct' competes for them too, as does "
                  f"anything else running here ('other processes').[/]")
    if not quick:
        verdicts.append(Verdict(NAME, "req/s through labdeck vs direct",
                                f"{m['labdeck']['rps']:,.0f} vs {d_rps:,.0f} = {ratio:.2f}×",
                                f"≥ {TARGET_RPS_RATIO:g}× direct", met1))

    # ---- 2
    s = res["starts"]
    dm, dmin, dmax = s["deploy_median"], s["deploy_min"], s["deploy_max"]
    own = s["own_median_s"]
    extra = dm["total_s"] - own
    met2 = None if quick else extra <= TARGET_START_EXTRA_S
    t2 = new_table(
        f"Deploy to healthy on node1, warm connection (median of {s['starts']}; target: ≤ litserve's own start + "
        f"{TARGET_START_EXTRA_S:g} s)",
        ["What", ("median ms", "right"), ("min ms", "right"), ("max ms", "right"), ("vs own start", "right"), "Note",
         "Target"])
    t2.add_row(f"litserve's own start on node1 (Popen → /health 200, polled every {HEALTH_POLL_S * 1000:.0f} ms)",
               fmt_ms(own * 1000), fmt_ms(s["own_min_s"] * 1000), fmt_ms(s["own_max_s"] * 1000), "baseline",
               f"median {s['own_polls_median']:.0f} polls; stopped by group in ≤ {s['own_stop_s_max']:.2f} s"
               + (f", [red]{s['own_sigkill']} needed SIGKILL[/]" if s["own_sigkill"] else ""), "")
    left = [d["left_after_stop"] for d in s["deploys"] if d["left_after_stop"]]
    t2.add_row("labdeck serving.deploy(...) → returns healthy", fmt_ms(dm["total_s"] * 1000), fmt_ms(dmin["total_s"] * 1000),
               fmt_ms(dmax["total_s"] * 1000), f"+{extra * 1000:,.0f} ms",
               "stop left nothing" if not left else f"[red]left: {left}[/]", verdict(met2), end_section=True)
    imp = s["litserve_import_on_node_s"]
    for key, label, note in (
            ("model_file_s", "  checks: model file (SFTP stat)", ""),
            ("import_check_s", "  checks: `python -c 'import litserve'`",
             f"the import alone on the node: {imp * 1000:,.0f} ms" if imp is not None else ""),
            ("free_port_s", "  checks: free port (a python -c)", ""),
            ("upload_start_forward_s", "  upload script + key, start detached, open forward", ""),
            ("wait_health_s", "  wait for /health (0.25 s sleeps + a kill -0 each)",
             f"median {s['alive_checks_median']:.0f} alive checks")):
        t2.add_row(dim(label), dim(fmt_ms(dm[key] * 1000)), dim(fmt_ms(dmin[key] * 1000)), dim(fmt_ms(dmax[key] * 1000)),
                   "", dim(note), "")
    console.print(t2)
    if not quick:
        verdicts.append(Verdict(NAME, "deploy to healthy vs litserve's own start",
                                f"{dm['total_s']:.2f} s vs {own:.2f} s = +{extra:.2f} s",
                                f"≤ +{TARGET_START_EXTRA_S:g} s", met2))
    console.print(f"[dim]rig: jump + 1 node built in {build_s:.2f} s; node site (litserve, numpy and their requirements) "
                  f"copied in {site_s:.1f} s; training run {res['train_s']:.1f} s; took {elapsed:.0f} s[/]")
    return finish(NAME, {
        "description": "Model serving on a rig node through the jump host: req/s and latency through labdeck's forward "
                       "vs direct on the node; deploy-to-healthy vs litserve's own start",
        "params": {"requests": q["requests"], "clients": q["clients"], "rounds": q["rounds"],
                   "warmup_per_client": q["warmup_per_client"], "diag_requests": q["diag_requests"], "starts": s["starts"],
                   "health_poll_s": HEALTH_POLL_S, "body": {"x": BODY_X}, "rig_build_s": build_s, "node_site_s": site_s},
        "targets": {"rps_ratio": TARGET_RPS_RATIO, "start_extra_s": TARGET_START_EXTRA_S},
        "results": res,
    }, verdicts, elapsed, quick=quick)


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
