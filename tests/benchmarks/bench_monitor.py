"""Live monitoring on a node behind a jump host: labdeck.log() → chart data latency, sustained ingest, agent CPU.

Everything runs on the SSH test rig (``tests/rig.py``): real OpenSSH sshd in network
namespaces, a jump host and a node reachable only through it. It needs root; without it
the benchmark says so and is skipped. One rig serves all three parts, in one run. The
node is a network namespace of this machine: it shares this machine's clock (no skew
correction is needed or applied) and its filesystem (so the benchmark can watch the
node's ``metrics.jsonl`` directly, for the latency breakdown). Jobs run with the rig's
``/usr/bin/python3`` (``rig.python``) on node1, code synced by ``Workstation.launch``.

1. **Latency from ``labdeck.log()`` in the job to the point in labdeck's chart data.** The
   job logs ``{"sent": time.time()}`` every 50 ms (300 points, on an absolute schedule).
   labdeck follows the run as the TUI does (``ws.follower.start(run)``: each round mirrors
   ``output.log``, then ``Monitor.poll_run`` mirrors ``metrics.jsonl`` and parses the new
   lines into ``monitor.runs[run].series``; 0.1 s between rounds). A 5 ms asyncio poller
   on ``series.series("sent")`` notes the local time each point first appears; latency =
   that time − the point's value. Breakdown of each point's latency, from three extra
   timestamps: when its line appeared in the node's file (a 1 ms watcher thread on the
   file: labdeck.log's 0.1 s flush), when the follower's SFTP read that brought it in
   started and ended (``SSHTransport.read_file`` wrapped, in this process only).
   Targets: p99 ≤ 1 s, p50 ≤ 200 ms. Anchors (published behaviour, not measured):
   W&B uploads at most every 15 s, TensorBoard reloads every 5 s, trackio polls every 1 s.
   Diagnostics (no target): one SFTP request's round trip (``stat``) through the jump host,
   and a job that logs one point every 2–4 s (10 points, run during part 3), where the
   follower backs off between empty rounds (×1.5, up to 1 s).
2. **Sustained ingest per run.** A job logs ``{"sent": time.time(), "i": i}`` (2 metrics a
   call) in a tight loop for 10 s, then flushes and records its own start/end times and CPU
   (in ``$LABDECK_RUN_DIR/flood-stats.json``, read from this machine's filesystem).
   The follower (as above) must keep up: points/s produced by the job, points/s in the
   series (all points / time from the job's start until the last is in), and the lag at
   the end (from the job's final flush to all points in the series); also the largest lag
   seen while it ran (now − the ``sent`` of the newest point in the series), and where the
   CPU went (job, node and jump sshd, labdeck's process; the follower's time split into
   SFTP reads, ``MetricsFileParser.feed`` and ``RunSeries.ingest``; the longest single
   ``RunMonitor.update``, during which the event loop is blocked; labdeck's peak RSS). The
   job shares this machine's 2 cores with labdeck and both sshds, and a tight loop
   produces several times what one Python process can parse, so that row measures the
   reader's capacity (its verdict: capacity ≥ the target rate). A second job paced at
   100,000 points/s (2× the target) checks keeping up. Target: ≥ 50,000 points/s per run
   ingested without falling behind (lag at the end ≤ 1 s).
3. **Agent CPU at 1 Hz.** ``backends.monitor.ensure_agent`` on node1 and on ``local``
   (both at once); after ~30 s the samples (``samples.jsonl``) are read back: CPU % of one
   core from ``agent_cpu_s`` between the second and the last sample (the first includes the
   interpreter's start), cross-checked with utime+stime of the agent's pid (from its
   ``agent.lock``) in ``/proc/<pid>/stat`` over about the same window. Target ≤ 1 % of one core.
   The agents are stopped afterwards (``stop_agent``).

Chart refresh (``Series.view`` + plotext at 1k/100k/10M points) is bench_series.py's.

Run: ``python3 -m tests.benchmarks monitor`` (or ``python3 -m tests.benchmarks.bench_monitor``).
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from backends.config import load_config
from backends.metrics import MetricsFileParser, RunSeries
from backends.monitor import RunMonitor, ensure_agent, stop_agent
from backends.paths import Paths
from backends.ssh import SSHTransport
from backends.workstation import Workstation

from ._common import Verdict, console, finish, fmt_ms, new_table, percentile, scratch_dir, summarize, verdict, write_results
from .bench_remote import no_team_dir_override

NAME = "monitor"
LAT_POINTS, LAT_PERIOD_S = 300, 0.05
SLOW_GAPS_S = (2.0, 3.0, 4.0, 2.5, 3.5)  # diagnostic: a job that logs every few seconds (during part 3)
SLOW_POINTS = 10
SERIES_POLL_S = 0.005
FILE_POLL_S = 0.001
FLOOD_S = 10.0
PACED_PPS = 100_000
AGENT_S = 30.0
SFTP_RTTS = 30
TARGET_P99_MS, TARGET_P50_MS = 1000.0, 200.0
TARGET_PPS = 50_000
TARGET_LAG_S = 1.0
TARGET_AGENT_PCT = 1.0
ANCHORS = (("W&B", "uploads at most every 15 s", 15_000.0), ("TensorBoard", "reloads event files every 5 s", 5_000.0),
           ("trackio", "polls every 1 s", 1_000.0))

LATENCY_JOB = """\
import sys, time
import labdeck
n, gaps = int(sys.argv[1]), [float(x) for x in sys.argv[2].split(",")]  # seconds between points, cycled
t = time.time() + 0.2
for i in range(n):
    d = t - time.time()
    if d > 0:
        time.sleep(d)
    labdeck.log({"sent": time.time()}, step=i)
    t += gaps[i % len(gaps)]
"""

FLOOD_JOB = """\
import json, os, sys, time
import labdeck
seconds, rate = float(sys.argv[1]), float(sys.argv[2])  # rate: points/s, 0 = as fast as it can
log, now = labdeck.log, time.time
i = 0
t0 = now()
end = t0 + seconds
if rate <= 0:
    while True:
        for _ in range(1000):
            log({"sent": now(), "i": i}, step=i)
            i += 1
        if now() >= end:
            break
else:
    batch = 100  # calls per batch (2 points each): paced on an absolute schedule
    every = 2 * batch / rate
    k = 0
    while True:
        d = t0 + k * every - now()
        if d > 0:
            time.sleep(d)
        for _ in range(batch):
            log({"sent": now(), "i": i}, step=i)
            i += 1
        k += 1
        if now() >= end:
            break
t_logged = now()
ok = labdeck.flush(60)
t_flushed = now()
cpu = os.times()
out = os.path.join(os.environ["LABDECK_RUN_DIR"], "flood-stats.json")
with open(out + ".tmp", "w") as f:
    json.dump({"calls": i, "points": 2 * i, "t0": t0, "t_logged": t_logged, "t_flushed": t_flushed, "flush_ok": ok,
               "cpu_s": cpu.user + cpu.system, "lost": labdeck.lost}, f)
os.replace(out + ".tmp", out)
"""


# ---- instrumentation (this process only; backends/ is not changed) -------------------------------
class Probe:
    """Times every ``SSHTransport.read_file``, follower round and ``RunMonitor.update`` while installed."""

    def __init__(self, ws: Workstation) -> None:
        self.ws = ws
        self.reads: list[tuple[str, float, float, int]] = []  # (path, start, end, bytes)
        self.steps: list[tuple[float, float, int]] = []  # (start, end, n)
        self.updates: list[tuple[float, float, int]] = []
        self.feed_s = 0.0  # MetricsFileParser.feed: bytes → points
        self.ingest_s = 0.0  # RunSeries.ingest: points → series

    @contextmanager
    def installed(self) -> Iterator["Probe"]:
        orig_read, orig_update = SSHTransport.read_file, RunMonitor.update
        orig_feed, orig_ingest = MetricsFileParser.feed, RunSeries.ingest
        follower = self.ws.follower
        orig_step = follower.step
        probe = self

        async def read_file(self, path: str, offset: int = 0, max_bytes: int = 1 << 20, *, inside=None):
            t = time.time()
            part = await orig_read(self, path, offset, max_bytes, inside=inside)
            probe.reads.append((path, t, time.time(), len(part.data)))
            return part

        def update(self, *args, **kwargs) -> int:
            t = time.time()
            n = orig_update(self, *args, **kwargs)
            probe.updates.append((t, time.time(), n))
            return n

        def feed(self, data: bytes):
            t = time.perf_counter()
            try:
                return orig_feed(self, data)
            finally:
                probe.feed_s += time.perf_counter() - t

        def ingest(self, points):
            t = time.perf_counter()
            try:
                return orig_ingest(self, points)
            finally:
                probe.ingest_s += time.perf_counter() - t

        async def step(run):
            t = time.time()
            n = await orig_step(run)
            probe.steps.append((t, time.time(), n))
            return n

        SSHTransport.read_file = read_file  # type: ignore[method-assign]
        RunMonitor.update = update  # type: ignore[method-assign]
        follower.step = step  # type: ignore[method-assign]
        MetricsFileParser.feed = feed  # type: ignore[method-assign]
        RunSeries.ingest = ingest  # type: ignore[method-assign]
        try:
            yield self
        finally:
            SSHTransport.read_file = orig_read  # type: ignore[method-assign]
            RunMonitor.update = orig_update  # type: ignore[method-assign]
            MetricsFileParser.feed = orig_feed  # type: ignore[method-assign]
            RunSeries.ingest = orig_ingest  # type: ignore[method-assign]
            del follower.step

    def clear(self) -> None:
        self.reads.clear()
        self.steps.clear()
        self.updates.clear()


class FileWatcher(threading.Thread):
    """Notes the local time each line of the node's metrics file first appears (the node's files are on
    this machine's filesystem): the step of each ``{"t","s","m"}`` line → time seen."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True, name="bench-file-watcher")
        self.path = path
        self.seen: dict[float, float] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        offset, carry = 0, b""
        while not self._halt.is_set():
            try:
                with open(self.path, "rb") as f:
                    f.seek(offset)
                    data = f.read()
            except FileNotFoundError:
                data = b""
            if data:
                now = time.time()
                offset += len(data)
                lines = (carry + data).split(b"\n")
                carry = lines.pop()
                for line in lines:
                    try:
                        self.seen.setdefault(float(json.loads(line)["s"]), now)
                    except (ValueError, KeyError, TypeError):
                        pass
            time.sleep(FILE_POLL_S)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


def proc_ticks(uids: set[int]) -> dict[int, int]:
    """pid → utime+stime (clock ticks) of every process of ``uids``."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if os.stat(f"/proc/{name}").st_uid not in uids:
                continue
            with open(f"/proc/{name}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
            out[int(name)] = int(rest[11]) + int(rest[12])
        except (OSError, IndexError, ValueError):
            continue
    return out


def ticks_delta_s(before: dict[int, int], after: dict[int, int]) -> float:
    clk = os.sysconf("SC_CLK_TCK")
    return sum(t - before.get(pid, 0) for pid, t in after.items()) / clk


# ---- set-up ---------------------------------------------------------------------------------------
def open_ws(home: Path, rig) -> Workstation:
    from tests.test_ssh import rig_config

    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(rig_config(rig) + f'[store]\nteam_dir = "{home / "team"}"\n')
    return Workstation(load_config(Paths.resolve(home)))


def write_project(root: Path) -> Path:
    proj = root / "project"
    proj.mkdir(parents=True, exist_ok=True)
    (proj / "latency.py").write_text(LATENCY_JOB)
    (proj / "flood.py").write_text(FLOOD_JOB)
    return proj


async def wait_done(ws: Workstation, run_id: str, task: asyncio.Task | None, timeout: float) -> str:
    """Wait for the follower to see the run end (it returns then), at most ``timeout`` s; the run's state.
    (A follower still running after that is stopped by ``Workstation.close``.)"""
    if task is not None:
        try:
            run = await asyncio.wait_for(asyncio.shield(task), timeout)
            return run.state
        except asyncio.TimeoutError:
            pass
    await ws.refresh_runs(only=[run_id])
    return ws.store.find_run(run_id).state


async def kill_active(ws: Workstation) -> None:
    runs, _ = ws.store.runs(team=False)
    for r in runs:
        if r.pid and r.run_state.is_active:
            try:
                t = await ws.transport(r.instance)
                await t.run(f"kill -KILL -{r.pid} 2>/dev/null; true", timeout=10)
            except Exception:  # noqa: BLE001 - best effort: the rig's teardown kills the node users' processes anyway
                pass


# ---- 1. latency -----------------------------------------------------------------------------------
async def measure_latency(ws: Workstation, rig, proj: Path, n: int,
                          gaps: tuple[float, ...] = (LAT_PERIOD_S,)) -> dict[str, Any]:
    probe = Probe(ws)
    run = await ws.launch(f"{rig.python} latency.py {n} {','.join(map(str, gaps))}", instance="node1",
                          workdir=str(proj), name="bench-latency")
    metrics_file = Path(run.run_dir) / "metrics.jsonl"
    watcher = FileWatcher(metrics_file)
    watcher.start()
    seen: dict[float, tuple[float, float]] = {}  # step → (sent, local time first seen in the series)
    with probe.installed():
        task = ws.follower.start(run)
        deadline = time.monotonic() + sum(gaps[i % len(gaps)] for i in range(n)) + 30
        count = 0
        while len(seen) < n and time.monotonic() < deadline:
            await asyncio.sleep(SERIES_POLL_S)
            rm = ws.monitor.runs.get(run.id)
            s = rm.series.get("sent") if rm is not None else None
            if s is None or len(s) == count:
                continue
            now = time.time()
            new = len(s) - count
            steps, values = s.recent_points()
            for st, v in zip(steps[-new:], values[-new:]):
                seen.setdefault(st, (v, now))
            count = len(s)
        state = await wait_done(ws, run.id, task, 20)
    watcher.stop()

    metric_reads = [(a, b, nb) for p, a, b, nb in probe.reads if p.endswith("/metrics.jsonl")]
    log_reads = [(a, b, nb) for p, a, b, nb in probe.reads if p.endswith("/output.log")]
    lat, flush, wait, sftp, after = [], [], [], [], []
    for st in sorted(seen):
        sent, t_seen = seen[st]
        lat.append(t_seen - sent)
        t_file = watcher.seen.get(st)
        r = next((r for r in reversed(metric_reads) if r[1] <= t_seen), None)  # the read that brought it in
        if t_file is None or r is None:
            continue
        flush.append(t_file - sent)
        wait.append(r[0] - t_file)
        sftp.append(r[1] - r[0])
        after.append(t_seen - r[1])
    steps = probe.steps
    periods = [b[0] - a[0] for a, b in zip(steps, steps[1:])]
    return {
        "run": run.id, "state": state, "points": n, "gaps_s": list(gaps), "received": len(seen),
        "first_point_ms": lat[0] * 1000 if lat else None,
        "latency": summarize(lat),
        "latency_after_first": summarize(lat[1:]),
        "breakdown": {"flush": summarize(flush), "wait_for_round": summarize(wait), "sftp_read": summarize(sftp),
                      "ingest_and_detect": summarize(after)},
        "rounds": {"n": len(steps), "step": summarize([b - a for a, b, _ in steps]), "period": summarize(periods)},
        "reads": {"metrics": summarize([b - a for a, b, _ in metric_reads]),
                  "output_log": summarize([b - a for a, b, _ in log_reads])},
        "file_lines_seen": len(watcher.seen),
    }


async def sftp_rtt(ws: Workstation, run_dir: str, n: int) -> dict[str, Any]:
    """One SFTP request (stat) through the jump host, ``n`` times: the round trip each read_file pays 4 times."""
    t = await ws.transport("node1")
    sftp = await t.handle.sftp_client()
    out = []
    for _ in range(n):
        a = time.perf_counter()
        await sftp.stat(f"{run_dir}/metrics.jsonl")
        out.append(time.perf_counter() - a)
    return summarize(out)


# ---- 2. sustained ingest ----------------------------------------------------------------------------
async def measure_flood(ws: Workstation, rig, proj: Path, seconds: float, rate: float) -> dict[str, Any]:
    probe = Probe(ws)
    uids = {rig.host("node1").uid, rig.jump.uid}
    ticks0 = proc_ticks(uids)
    cpu0 = time.process_time()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run = await ws.launch(f"{rig.python} flood.py {seconds} {rate}", instance="node1", workdir=str(proj),
                          name=f"bench-ingest-{'max' if rate <= 0 else int(rate)}")
    stats_path = Path(run.run_dir) / "flood-stats.json"  # the node's files are on this machine's filesystem
    timeline: list[tuple[float, int, float]] = []  # (local time, points in the series, newest 'sent' in it)
    stats = None
    complete_at = None
    with probe.installed():
        task = ws.follower.start(run)
        deadline = time.monotonic() + seconds + 120
        while time.monotonic() < deadline:
            await asyncio.sleep(0.02)
            now = time.time()
            rm = ws.monitor.runs.get(run.id)
            a = rm.series.get("sent") if rm is not None else None
            b = rm.series.get("i") if rm is not None else None
            n = (len(a) if a is not None else 0) + (len(b) if b is not None else 0)
            timeline.append((now, n, a.last if a is not None and len(a) else float("nan")))
            if stats is None and stats_path.exists():
                stats = json.loads(stats_path.read_text())
            if stats is not None and n >= stats["points"]:
                complete_at = now
                break
        state = await wait_done(ws, run.id, task, 20)
    cpu_self = time.process_time() - cpu0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ticks1 = proc_ticks(uids)
    node_uid = rig.host("node1").uid
    sshd_node = ticks_delta_s(ticks0, {p: t for p, t in ticks1.items() if _uid_of(p) == node_uid and _is_sshd(p)})
    sshd_jump = ticks_delta_s(ticks0, {p: t for p, t in ticks1.items() if _uid_of(p) == rig.jump.uid and _is_sshd(p)})
    if stats is None:
        raise RuntimeError(f"the ingest job wrote no stats (state {state})")
    t0, t_end = stats["t0"], stats["t_flushed"]
    produced_pps = stats["points"] / (stats["t_logged"] - t0)
    lags = [now - sent for now, _, sent in timeline if sent == sent and now <= t_end]
    first_in = next((now for now, n, _ in timeline if n), None)
    ingested = timeline[-1][1]
    end = complete_at or timeline[-1][0]
    in_by_end = max((n for now, n, _ in timeline if now <= t_end), default=0)
    metric_reads = [(b - a, nb) for p, a, b, nb in probe.reads if p.endswith("/metrics.jsonl")]
    return {
        "run": run.id, "state": state, "rate_asked_pps": rate, "seconds": seconds, "job": stats,
        "produced_pps": produced_pps,
        "ingested_points": ingested, "complete": complete_at is not None,
        "ingested_pps": ingested / (end - t0),
        "in_series_at_job_end": in_by_end,
        "lag_end_s": (end - t_end) if complete_at else None,
        "lag_max_s": max(lags) if lags else None,
        "first_in_s": (first_in - t0) if first_in else None,
        "cpu_s": {"job": stats["cpu_s"], "labdeck_process": cpu_self, "sshd_node": sshd_node, "sshd_jump": sshd_jump,
                  "follower_sftp_reads": sum(d for d, _ in metric_reads)
                  + sum(b - a for p, a, b, _ in probe.reads if p.endswith("/output.log")),
                  "parse_ingest": sum(b - a for a, b, _ in probe.updates),
                  "parse": probe.feed_s, "ingest": probe.ingest_s},
        "longest_update_s": max((b - a for a, b, _ in probe.updates), default=0.0),  # the event loop blocked meanwhile
        "wall_s": end - t0,
        "labdeck_max_rss_mb": {"before": rss0 / 1024, "after": rss1 / 1024},
        "rounds": len(probe.steps),
        "metrics_bytes": sum(nb for _, nb in metric_reads),
        "sftp_mb_per_s": (sum(nb for _, nb in metric_reads) / 1e6 / sum(d for d, _ in metric_reads)) if metric_reads else None,
    }


def _uid_of(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def _is_sshd(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip().startswith("sshd")
    except OSError:
        return False


# ---- 3. agent CPU -------------------------------------------------------------------------------------
PROC_SNAPSHOT = ("p=$(cat {d}/agent.lock 2>/dev/null); echo \"$p\"; cat /proc/$p/stat; cut -d' ' -f1 /proc/uptime; "
                 "getconf CLK_TCK; ls -d /proc/[0-9]* | wc -l; ps -U $(id -u) -o pid= | wc -l")


async def proc_snapshot(t, d: str) -> dict[str, Any]:
    res = await t.run(PROC_SNAPSHOT.format(d=d), timeout=15)
    lines = res.text().splitlines()
    rest = lines[1].rsplit(")", 1)[1].split()
    return {"pid": int(lines[0]), "ticks": int(rest[11]) + int(rest[12]), "uptime": float(lines[2]),
            "clk": int(lines[3]), "procs_total": int(lines[4]), "procs_user": int(lines[5])}


async def read_samples(t, d: str) -> list[dict[str, Any]]:
    data = b""
    while True:
        part = await t.read_file(f"{d}/samples.jsonl", len(data), 1 << 20)
        if not part.data:
            break
        data += part.data
    return [json.loads(x) for x in data.splitlines() if x.strip()]


async def measure_agent(t, seconds: float) -> dict[str, Any]:
    d = await ensure_agent(t)
    for _ in range(100):  # the first sample: the interpreter has started
        try:
            if await read_samples(t, d):
                break
        except Exception:  # noqa: BLE001 - not there yet
            pass
        await asyncio.sleep(0.1)
    snap0 = await proc_snapshot(t, d)
    first = len(await read_samples(t, d))
    await asyncio.sleep(seconds)
    snap1 = await proc_snapshot(t, d)
    samples = await read_samples(t, d)
    await stop_agent(t)
    window = samples[max(first - 1, 1):]  # from the sample before snap0 (at least the second) to the last
    if len(window) < 2:
        raise RuntimeError(f"too few agent samples on {t.instance}: {len(samples)}")
    per = [100 * (b["agent_cpu_s"] - a["agent_cpu_s"]) / (b["t"] - a["t"]) for a, b in zip(window, window[1:])]
    mean = 100 * (window[-1]["agent_cpu_s"] - window[0]["agent_cpu_s"]) / (window[-1]["t"] - window[0]["t"])
    proc = 100 * (snap1["ticks"] - snap0["ticks"]) / snap0["clk"] / (snap1["uptime"] - snap0["uptime"])
    gaps = [b["t"] - a["t"] for a, b in zip(samples, samples[1:])]
    return {"instance": t.instance, "agent_dir": d, "pid": snap0["pid"], "samples": len(samples),
            "window_samples": len(window), "window_s": window[-1]["t"] - window[0]["t"],
            "startup_cpu_s": samples[0]["agent_cpu_s"], "cpu_pct_mean": mean, "cpu_pct_per_sample_p50": percentile(per, 50),
            "cpu_pct_per_sample_max": max(per), "cpu_pct_proc": proc, "proc_window_s": snap1["uptime"] - snap0["uptime"],
            "interval_s_mean": sum(gaps) / len(gaps) if gaps else None, "procs_total": snap1["procs_total"],
            "procs_user": snap1["procs_user"], "gpu_source": samples[-1].get("gpu_source")}


# ---- main -------------------------------------------------------------------------------------------
async def run_all(rig, root: Path, quick: bool) -> dict[str, Any]:
    n_lat = 40 if quick else LAT_POINTS
    flood_s = 3.0 if quick else FLOOD_S
    agent_s = 6.0 if quick else AGENT_S
    proj = write_project(root)
    out: dict[str, Any] = {}
    ws = open_ws(root / "home", rig)
    try:
        await ws.list_instances()
        console.print(f"[dim]monitor: latency, {n_lat} points every {LAT_PERIOD_S * 1000:.0f} ms …[/]")
        out["latency"] = await measure_latency(ws, rig, proj, n_lat)
        run = ws.store.find_run(out["latency"]["run"])
        out["sftp_rtt"] = await sftp_rtt(ws, run.run_dir, SFTP_RTTS)
        console.print(f"[dim]monitor: sustained ingest, {flood_s:g} s as fast as it can, then paced at "
                      f"{PACED_PPS:,} points/s …[/]")
        out["ingest_max"] = await measure_flood(ws, rig, proj, flood_s, 0)
        out["ingest_paced"] = await measure_flood(ws, rig, proj, flood_s, PACED_PPS)
        console.print(f"[dim]monitor: agent CPU on node1 and local, {agent_s:g} s; meanwhile latency of a job logging "
                      f"every {min(SLOW_GAPS_S):g}–{max(SLOW_GAPS_S):g} s …[/]")
        t_node, t_local = await ws.transport("node1"), await ws.transport("local")
        try:  # meanwhile (diagnostic): a job that logs one point every few seconds, followed the same way
            *agents, out["latency_slow"] = await asyncio.gather(
                measure_agent(t_node, agent_s), measure_agent(t_local, agent_s),
                measure_latency(ws, rig, proj, 3 if quick else SLOW_POINTS, SLOW_GAPS_S))
            out["agent"] = agents
        finally:
            for t in (t_node, t_local):
                try:
                    await stop_agent(t)
                except Exception:  # noqa: BLE001
                    pass
    finally:
        await kill_active(ws)
        await ws.close()
    return out


def dim(text: str) -> str:
    return f"[dim]{text}[/]" if text else ""


def count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1_000_000 else f"{n:,}"


def row_ms(st: dict[str, Any]) -> list[str]:
    return [fmt_ms(st["p50_ms"]), fmt_ms(st["p99_ms"]), fmt_ms(st["mean_ms"]), fmt_ms(st["max_ms"])]


def main(quick: bool = False) -> list[Verdict]:
    from tests.rig import Rig, RigUnavailable

    t_all = time.perf_counter()
    with no_team_dir_override(), scratch_dir("monitor") as root:
        try:
            rig = Rig.build(1)
        except RigUnavailable as e:
            console.print(f"[bold yellow]bench_monitor skipped: the SSH rig is unavailable here ({e}).[/]\n")
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
    L = res["latency"]
    lat = L["latency"]
    t1 = new_table(
        f"labdeck.log() in a job on node1 → point in labdeck's chart data (series), through the jump host; "
        f"{L['received']}/{L['points']} points, one every {L['gaps_s'][0] * 1000:g} ms; targets p50 ≤ {TARGET_P50_MS:g} ms, "
        f"p99 ≤ {TARGET_P99_MS:g} ms",
        ["What", ("p50 ms", "right"), ("p99 ms", "right"), ("mean ms", "right"), ("max ms", "right"), "Target"])
    met50 = None if quick else lat["p50_ms"] <= TARGET_P50_MS
    met99 = None if quick else lat["p99_ms"] <= TARGET_P99_MS
    both = None if quick else (met50 and met99 and L["received"] == L["points"])
    t1.add_row("labdeck: log() → in monitor.runs[run].series (all points)", *row_ms(lat), verdict(both))
    t1.add_row(dim("  same, all but the first point"), *(dim(x) for x in row_ms(L["latency_after_first"])), "")
    t1.add_row(dim("  the first point (the follower had backed off while the job started)"),
               dim(fmt_ms(L["first_point_ms"])), "", "", "", "", end_section=True)
    b = L["breakdown"]
    for key, label in (("flush", "  where: log() → line in the node's file (labdeck.log flushes every 0.1 s)"),
                       ("wait_for_round", "  where: in the file → the follower's next read starts (rounds 0.1 s apart)"),
                       ("sftp_read", "  where: SFTP read of metrics.jsonl (open, fstat, read, close)"),
                       ("ingest_and_detect", "  where: parse + ingest, and this benchmark's 5 ms poll")):
        t1.add_row(dim(label), *(dim(x) for x in row_ms(b[key])), "")
    r = L["rounds"]
    t1.add_row(dim(f"  follower round: output.log + metrics.jsonl + ingest ({r['n']} rounds)"),
               *(dim(x) for x in row_ms(r["step"])), "")
    t1.add_row(dim("  follower: start of one round → start of the next"), *(dim(x) for x in row_ms(r["period"])), "")
    t1.add_row(dim("  SFTP read of output.log (empty: the job prints nothing)"),
               *(dim(x) for x in row_ms(L["reads"]["output_log"])), "")
    t1.add_row(dim(f"  one SFTP request (stat) through the jump host, {res['sftp_rtt']['n']}×"),
               *(dim(x) for x in row_ms(res["sftp_rtt"])), "", end_section=True)
    S = res["latency_slow"]
    t1.add_row(dim(f"diagnostic, a job logging every {min(SLOW_GAPS_S):g}–{max(SLOW_GAPS_S):g} s: log() → series "
                   f"({S['received']} points)"), *(dim(x) for x in row_ms(S["latency"])), "")
    t1.add_row(dim("  where: in the file → the follower's next read (it backs off to 1 s between empty rounds)"),
               *(dim(x) for x in row_ms(S["breakdown"]["wait_for_round"])), "")
    t1.add_row(dim("  follower: start of one round → start of the next"), *(dim(x) for x in row_ms(S["rounds"]["period"])),
               "", end_section=True)
    for who, what, ms in ANCHORS:
        t1.add_row(f"{who}: {what}", f"up to {ms:,.0f}", "", "", "", "anchor (published)")
    console.print(t1)
    if not quick:
        verdicts.append(Verdict(NAME, "log() → chart data, p50", f"{lat['p50_ms']:.0f} ms", f"≤ {TARGET_P50_MS:g} ms", met50))
        verdicts.append(Verdict(NAME, "log() → chart data, p99", f"{lat['p99_ms']:.0f} ms", f"≤ {TARGET_P99_MS:g} ms", met99))

    # ---- 2
    t2 = new_table(
        f"Sustained ingest of one run on node1 through the jump host (log({{'sent': time.time(), 'i': i}}): 2 points a "
        f"call; the job, both sshds and labdeck share this machine's {os.cpu_count()} cores); target ≥ {TARGET_PPS:,} "
        f"points/s into the series without falling behind (lag at the end ≤ {TARGET_LAG_S:g} s)",
        ["Job", ("produced pts/s", "right"), ("ingested pts/s", "right"), ("points in series", "right"),
         ("in series at job end", "right"), ("lag at end s", "right"), ("max lag s", "right"),
         ("CPU s: job / labdeck / sshd node / jump", "right"), "Target"])
    notes = []
    for key, label in (("ingest_max", "tight loop, as fast as it can"), ("ingest_paced", f"paced at {PACED_PPS:,} points/s")):
        x = res[key]
        c = x["cpu_s"]
        kept = x["complete"] and x["lag_end_s"] is not None and x["lag_end_s"] <= TARGET_LAG_S
        if key == "ingest_max":  # the producer outruns any one Python reader: this row measures the reader's capacity
            met = None if quick else x["ingested_pps"] >= TARGET_PPS
            what = f"capacity: {x['ingested_pps']:,.0f} points/s" + ("" if kept else " (falls behind a faster job)")
        else:
            met = None if quick else (kept and x["ingested_pps"] >= TARGET_PPS)
            what = "kept up" if kept else "FELL BEHIND"
        lag = f"{x['lag_end_s']:.2f}" if x["lag_end_s"] is not None else "[red]incomplete[/]"
        t2.add_row(f"{label} ({x['seconds']:g} s)", f"{x['produced_pps']:,.0f}", f"{x['ingested_pps']:,.0f}",
                   f"{count(x['ingested_points'])} / {count(x['job']['points'])}",
                   f"{100 * x['in_series_at_job_end'] / max(x['job']['points'], 1):.0f} %", lag,
                   f"{x['lag_max_s']:.2f}" if x["lag_max_s"] is not None else "—",
                   f"{c['job']:.1f} / {c['labdeck_process']:.1f} / {c['sshd_node']:.1f} / {c['sshd_jump']:.1f}",
                   verdict(met) + (" [dim](capacity)[/]" if key == "ingest_max" and met is not None else ""))
        notes.append(f"{label}: {x['rounds']} follower rounds; SFTP reads {c['follower_sftp_reads']:.1f} s "
                     f"({x['metrics_bytes'] / 1e6:.0f} MB of metrics.jsonl, {x['sftp_mb_per_s'] or 0:.0f} MB/s while "
                     f"reading); parse + ingest {c['parse_ingest']:.1f} s (MetricsFileParser.feed {c['parse']:.1f} s, "
                     f"RunSeries.ingest {c['ingest']:.1f} s), the longest one {x['longest_update_s'] * 1000:,.0f} ms "
                     f"(the event loop is blocked meanwhile); labdeck's peak RSS {x['labdeck_max_rss_mb']['after']:,.0f} MB "
                     f"(before: {x['labdeck_max_rss_mb']['before']:,.0f} MB)")
        if not quick:
            target = (f"capacity ≥ {TARGET_PPS:,} points/s" if key == "ingest_max"
                      else f"≥ {TARGET_PPS:,} points/s, lag ≤ {TARGET_LAG_S:g} s")
            verdicts.append(Verdict(NAME, f"ingest, {label}", f"{what}, lag at end {lag} s", target, met))
    console.print(t2)
    for n in notes:
        console.print(f"[dim]{n}[/]")

    # ---- 3
    t3 = new_table(
        f"Monitoring agent at 1 Hz, CPU % of one core (target ≤ {TARGET_AGENT_PCT:g} %)",
        ["Instance", ("samples", "right"), ("window s", "right"), ("CPU % (agent_cpu_s)", "right"),
         ("CPU % (/proc/pid/stat)", "right"), ("per-sample p50 / max %", "right"), ("processes: all / its user", "right"),
         ("start-up CPU s", "right"), "Target"])
    for a in res["agent"]:
        met = None if quick else max(a["cpu_pct_mean"], a["cpu_pct_proc"]) <= TARGET_AGENT_PCT
        t3.add_row(f"{a['instance']} (gpu source: {a['gpu_source']})", str(a["samples"]), f"{a['window_s']:.1f}",
                   f"{a['cpu_pct_mean']:.2f}", f"{a['cpu_pct_proc']:.2f}",
                   f"{a['cpu_pct_per_sample_p50']:.1f} / {a['cpu_pct_per_sample_max']:.1f}",
                   f"{a['procs_total']} / {a['procs_user']}", f"{a['startup_cpu_s']:.2f}", verdict(met))
        if not quick:
            verdicts.append(Verdict(NAME, f"agent CPU on {a['instance']}", f"{a['cpu_pct_mean']:.2f} % "
                                    f"(/proc: {a['cpu_pct_proc']:.2f} %)", f"≤ {TARGET_AGENT_PCT:g} % of a core", met))
    console.print(t3)
    console.print(f"[dim]rig: jump + 1 node built in {build_s:.2f} s; the node shares this machine's clock (no skew "
                  f"correction); per-sample agent CPU is quantized to the kernel's 10 ms ticks (1 % of a 1 s "
                  f"interval); chart refresh is bench_series's; took {elapsed:.0f} s[/]")
    return finish(NAME, {
        "description": "labdeck.log() → series latency, sustained ingest and agent CPU on the rig, through its jump host",
        "params": {"latency_points": L["points"], "latency_period_s": LAT_PERIOD_S, "slow_gaps_s": list(SLOW_GAPS_S), "series_poll_s": SERIES_POLL_S,
                   "file_poll_s": FILE_POLL_S, "flood_s": res["ingest_max"]["seconds"], "paced_pps": PACED_PPS,
                   "agent_s": AGENT_S if not quick else None, "rig_build_s": build_s, "python": rig.python},
        "targets": {"p50_ms": TARGET_P50_MS, "p99_ms": TARGET_P99_MS, "ingest_pps": TARGET_PPS, "lag_end_s": TARGET_LAG_S,
                    "agent_cpu_pct": TARGET_AGENT_PCT},
        "anchors": {who: {"what": what, "ms": ms} for who, what, ms in ANCHORS},
        "results": res,
    }, verdicts, elapsed, quick=quick)


if __name__ == "__main__":
    import sys

    main(quick="--quick" in sys.argv)
