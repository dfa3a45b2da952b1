"""Live monitoring: the agent on each instance, hardware series, and each run's metric series.

Everything arrives as files read from byte offsets (see :mod:`backends.follow`):

* ``~/.labdeck/agent/<host id>/samples.jsonl`` on each instance, written by the agent at 1 Hz
  (started here when missing; it stops by itself when nobody reads). One directory per host
  (:mod:`backends.hostid`): a home shared by several hosts holds one agent of each;
* ``<run dir>/metrics.jsonl`` of each run (``labdeck.log()`` in the training code);
* ``<run dir>/output.log`` (zero-code capture: JSON objects and ``key=value`` numbers).

Local copies live under the cache directory; parsers keep their own offsets into
them, so nothing is parsed twice and a restart re-reads from the copies, not the
network. Series downsample to the chart's width incrementally
(:class:`backends.metrics.Series`), so a refresh costs the same at 1k and 10M points.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import posixpath
import shlex
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import LabdeckError
from .hostid import HOST_ID_FN, check_host_id
from .follow import MissingFile, mirror
from .localfiles import RefusedFile, confined, run_cache_path
from .metrics import LogMetricParser, MetricsFileParser, RunSeries, Series
from .models import Run
from .providers.base import Transport, detached_launcher
from .tbevents import TFEventsParser, event_base, event_run, parse_find_output, remote_find_command

AGENT_SOURCE = (Path(__file__).parent / "runtime" / "agent.py").read_bytes()
AGENT_VERSION = hashlib.sha256(AGENT_SOURCE).hexdigest()[:12]
IDLE_WINDOW = 300.0  # seconds of GPU samples that decide "idle"
IDLE_UTIL = 30.0  # % mean GPU utilization under which a run is flagged
TB_SCAN_EVERY = 5.0  # seconds between looks for new TensorBoard event files in a run directory
UPDATE_SLICE = 1 << 20  # bytes of a local copy parsed per step (~10k lines: tens of ms)


def agents_dir(runs_root: str) -> str:
    """The agents live beside the runs directory (``~/.labdeck/agent`` on SSH hosts), one
    directory per host below it (:func:`agent_dir`)."""
    return posixpath.join(posixpath.dirname(runs_root.rstrip("/")), "agent")


def agent_dir(runs_root: str, host_id: str) -> str:
    """One host's agent: ``<agents dir>/<host id>`` (a home may be shared by several hosts)."""
    return posixpath.join(agents_dir(runs_root), check_host_id(host_id))


async def stop_agent(transport: Transport) -> None:
    """Stop this user's agent on the host the instance reaches (it also stops by itself when nobody reads)."""
    base = shlex.quote(agents_dir(await transport.runs_root()))
    # (no id, no directory: the base's lock is an agent of the layout before, maybe another host's pid)
    await transport.run(f"{HOST_ID_FN}hostids; [ ${{#HID}} -eq 16 ] || exit 0; d={base}/$HID; "
                        f"p=$(cat \"$d/agent.lock\" 2>/dev/null); "
                        f"[ -n \"$p\" ] && kill $p 2>/dev/null; true", timeout=15)


BOOTSTRAP_PACKAGES = "nvitop psutil"


async def ensure_agent(transport: Transport, *, gpu_source: str = "auto", python: str = "python3") -> str:
    """Install (if its version changed) and start (if not running) the agent of the host the
    instance reaches; touch its reader file so it keeps sampling. One round trip (which works out
    the host id: the agent gets its directory and ``--host-id`` from here). Returns the agent
    directory on the instance (``<agents dir>/<host id>``).

    On a GPU host (``nvidia-smi`` present) whose Python lacks nvitop, a private venv
    (``<agent dir>/venv``) gets nvitop and psutil installed once, in the background; the agent
    uses that venv's Python once it can import nvitop (until then it reads GPUs with
    nvidia-smi). Where pip cannot reach an index the attempt fails quietly (see bootstrap.log)
    and is retried after a day."""
    home = await transport.home_dir()
    base = agents_dir(await transport.runs_root())
    # $D: this host's agent directory, worked out on the host (exported: the launchers' shells use it)
    d = "$D"
    qd = '"$D"'
    b64 = base64.b64encode(AGENT_SOURCE).decode()
    venv_py = f"{d}/venv/bin/python"
    launcher = shlex.join(detached_launcher(
        f'exec "$PY" "$D/agent.py" --out "$D" --host-id "$H" --gpu-source {shlex.quote(gpu_source)} '
        f'--disk-path {shlex.quote(home)}', None))
    bootstrap = shlex.join(detached_launcher(
        f'exec >> "$D/bootstrap.log" 2>&1; {python} -m venv "$D/venv" && "$D/venv/bin/pip" install -q '
        f"--disable-pip-version-check --retries 1 --timeout 20 {BOOTSTRAP_PACKAGES}", None))
    script = (
        f"{HOST_ID_FN}hostids; H=$HID; [ ${{#H}} -eq 16 ] || {{ echo 'labdeck: cannot work out the host id "
        f"(it needs sha256sum or shasum there)' >&2; exit 3; }}; "
        f"D={shlex.quote(base)}/$H; export H D; echo \"dir=$D\"; "
        f"mkdir -p {qd} && touch {qd}/reader && "
        # which Python: the private venv once it has nvitop
        f"PY={shlex.quote(python)}; NV=0; if [ -x \"{venv_py}\" ] && \"{venv_py}\" -c 'import nvitop' 2>/dev/null; "
        f"then PY=\"{venv_py}\"; NV=1; fi; export PY; "
        # (cheap tests first: a Python's import of nvitop costs a few hundred ms, and this runs every poll)
        f"if [ $NV = 0 ] && [ {shlex.quote(gpu_source)} = auto ] && command -v nvidia-smi >/dev/null 2>&1 "
        f"&& [ -z \"$(find {qd}/bootstrap.tried -mtime -1 2>/dev/null)\" ] && ! \"$PY\" -c 'import nvitop' 2>/dev/null; "
        f"then touch {qd}/bootstrap.tried; {bootstrap} >/dev/null; fi; "
        # a new agent version, or a better Python: stop the old agent
        f"if [ \"$(cat {qd}/version 2>/dev/null)\" != {AGENT_VERSION} ] || [ \"$(cat {qd}/python 2>/dev/null)\" != \"$PY\" ]; then "
        f"printf %s {b64} | base64 -d > {qd}/agent.py.tmp && mv {qd}/agent.py.tmp {qd}/agent.py && "
        f"echo {AGENT_VERSION} > {qd}/version; echo \"$PY\" > {qd}/python; "
        f"p=$(cat {qd}/agent.lock 2>/dev/null); [ -n \"$p\" ] && kill $p 2>/dev/null; sleep 0.2; fi; "
        f"if command -v flock >/dev/null 2>&1 && ! flock -n {qd}/agent.lock true 2>/dev/null; then echo running; "
        f"else {launcher} >/dev/null && echo started; fi"
    )
    res = await transport.run(script, timeout=30)
    said = [w[4:] for w in res.text().splitlines() if w.startswith("dir=")]
    if not res.ok or not said:
        raise LabdeckError(f"Could not start the monitoring agent on {transport.instance}: "
                           f"{res.stderr.decode(errors='replace').strip()[:200]}")
    d = said[0]
    if posixpath.dirname(d) != base.rstrip("/"):
        raise LabdeckError(f"Could not start the monitoring agent on {transport.instance}: it answered {d[:200]!r}.")
    check_host_id(posixpath.basename(d), transport.instance)
    return d


class _LineFile:
    """Reads complete new lines from a growing local file, keeping its own offset."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.carry = b""

    def read(self, limit: int = -1) -> bytes:
        """New bytes (at most ``limit``); ``pending`` says whether more were left for the next call."""
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                f.seek(self.offset)
                data = f.read(limit)
        except FileNotFoundError:
            return b""
        self.offset += len(data)
        self.pending = self.offset < size
        return data

    pending = False


@dataclass
class InstanceMonitor:
    """One instance's hardware: series of CPU, memory and per-GPU use, and per-run GPU use."""

    name: str
    local_path: Path
    cpu: Series = field(default_factory=Series)
    mem: Series = field(default_factory=Series)
    gpu_util: dict[int, Series] = field(default_factory=dict)
    gpu_mem: dict[int, Series] = field(default_factory=dict)
    last: dict[str, Any] = field(default_factory=dict)
    run_gpu: dict[str, deque] = field(default_factory=dict)  # run -> (t, mean util of its GPUs)
    run_stats: dict[str, dict[str, float]] = field(default_factory=dict)  # run -> lifetime sums for its summary
    warnings: Counter = field(default_factory=Counter)
    n: int = 0
    agent_dir: str = ""
    agent_checked: float = 0.0
    host_id: str = ""  # the host the agent directory is of: a sample that names another host is not this instance's


    def __post_init__(self) -> None:
        self._file = _LineFile(self.local_path)

    def ingest(self) -> int:
        data = self._file.carry + self._file.read()
        lines = data.split(b"\n")
        self._file.carry = lines.pop()
        added = 0
        for line in lines:
            if not line.strip():
                continue
            try:
                s = json.loads(line)
                t = float(s["t"])
            except (ValueError, KeyError, TypeError):
                self.warnings["invalid agent sample"] += 1
                continue
            if self.host_id and s.get("host") not in (None, self.host_id):
                self.warnings["sample of another host"] += 1
                continue
            self.n += 1
            self.cpu.append(self.n, float(s.get("cpu") or 0))
            total = s.get("mem_total") or 0
            self.mem.append(self.n, 100.0 * (s.get("mem_used") or 0) / total if total else 0.0)
            utils: dict[int, float] = {}
            for g in s.get("gpus") or []:
                try:
                    i = int(g["index"])
                    utils[i] = float(g.get("util") or 0)
                    self.gpu_util.setdefault(i, Series()).append(self.n, utils[i])
                    mt = float(g.get("mem_total") or 0)
                    self.gpu_mem.setdefault(i, Series()).append(self.n, 100.0 * float(g.get("mem_used") or 0) / mt if mt else 0.0)
                except (KeyError, TypeError, ValueError):
                    self.warnings["invalid GPU entry"] += 1
            for run, r in (s.get("runs") or {}).items():
                gpus = [i for i in (r.get("gpus") or []) if i in utils]
                st = self.run_stats.setdefault(run, {"cpu_sum": 0.0, "n": 0, "gpu_sum": 0.0, "gpu_n": 0,
                                                     "gpu_mem_max": 0.0, "rss_max": 0.0})
                st["cpu_sum"] += float(r.get("cpu") or 0)
                st["n"] += 1
                st["gpu_mem_max"] = max(st["gpu_mem_max"], float(r.get("gpu_mem") or 0))
                st["rss_max"] = max(st["rss_max"], float(r.get("rss") or 0))
                if gpus:
                    st["gpu_sum"] += sum(utils[i] for i in gpus) / len(gpus)
                    st["gpu_n"] += 1
                    q = self.run_gpu.setdefault(run, deque())
                    q.append((t, sum(utils[i] for i in gpus) / len(gpus)))
                    while q and q[0][0] < t - IDLE_WINDOW:
                        q.popleft()
            self.last = s
            added += 1
        return added

    def run_gpu_mean(self, run_id: str) -> float | None:
        """Mean utilization of the run's GPUs over the last 5 minutes of samples (None: no GPU data)."""
        q = self.run_gpu.get(run_id)
        if not q:
            return None
        return sum(u for _, u in q) / len(q)

    def idle_span(self, run_id: str) -> float:
        q = self.run_gpu.get(run_id)
        return (q[-1][0] - q[0][0]) if q and len(q) > 1 else 0.0


class RunMonitor:
    """One run's metric series, from its metrics file and its log (both local copies)."""

    def __init__(self, run: Run, metrics_path: Path, log_path: Path, pattern: str | None = None) -> None:
        self.run = run
        self.metrics_file = _LineFile(metrics_path)
        self.log_file = _LineFile(log_path)
        self.file_parser = MetricsFileParser()
        self.log_parser = LogMetricParser(pattern)
        self.series = RunSeries()
        self.updated = 0.0
        self.logged_names: set[str] = set()  # names the code logs with labdeck.log(): the log copy of them is ignored
        self.tb: dict[str, tuple[_LineFile, TFEventsParser]] = {}  # remote event file -> (local copy, parser)
        self.tb_checked = 0.0
        self.tb_base: str | None = None  # the TensorBoard base directory (series are keyed by run and tag)

    def update(self, limit: int = -1) -> int:
        """Parse what is new in the local copies: all of it, or at most ``limit`` bytes of each per call
        (``poll_run`` takes a backlog of millions of points in ``UPDATE_SLICE`` slices, so the event loop
        stays responsive and memory bounded); ``backlog`` says whether more is waiting."""
        n = 0
        data = self.metrics_file.read(limit)
        if data:
            pts = self.file_parser.feed(data)
            self.logged_names.update(p.name for p in pts)
            self.series.ingest(pts)
            n += len(pts)
        data = self.log_file.read(limit)
        if data:
            pts = [p for p in self.log_parser.feed(data) if p.name not in self.logged_names]
            self.series.ingest(pts)
            n += len(pts)
        for local, parser in self.tb.values():  # TensorBoard event files
            data = local.read(limit)
            if data:
                pts = parser.feed(data)
                self.series.ingest(pts)
                n += len(pts)
        if n:
            self.updated = time.monotonic()
        return n

    @property
    def backlog(self) -> bool:
        return self.metrics_file.pending or self.log_file.pending or any(f.pending for f, _ in self.tb.values())

    @property
    def warnings(self) -> Counter:
        out = self.series.warnings + self.file_parser.warnings + self.log_parser.warnings
        for _, parser in self.tb.values():
            out += parser.warnings
        return out

    @property
    def config(self) -> dict:
        return self.file_parser.config


class Monitor:
    """The workstation's view of hardware and metrics, fed from local copies of remote files."""

    def __init__(self, workstation, root: Path, pattern: str | None = None, gpu_source: str = "auto") -> None:
        self.ws = workstation
        self.root = root
        self.pattern = pattern
        self.gpu_source = gpu_source
        self.instances: dict[str, InstanceMonitor] = {}
        self.runs: dict[str, RunMonitor] = {}

    def metrics_path(self, run: Run) -> Path:
        """``<root>/metrics/<user>/<id>.jsonl`` from a validated user and id, confined under the root."""
        return run_cache_path(self.root / "metrics", run.user, run.id, ".jsonl")

    def tb_path(self, run: Run, remote: str) -> Path:
        """The local copy of one of a run's TensorBoard event files: named by a hash of its remote
        path (never by the path itself), under ``<root>/tb/<user>/<id>/``, confined."""
        name = hashlib.sha1(remote.encode("utf-8", "surrogateescape")).hexdigest()[:16] + ".tfevents"
        return confined(run_cache_path(self.root / "tb", run.user, run.id, ""), name)

    def instance(self, name: str) -> InstanceMonitor:
        m = self.instances.get(name)
        if m is None:
            m = self.instances[name] = InstanceMonitor(name, self.root / "agent" / f"{name}.jsonl")
        return m

    def run(self, run: Run) -> RunMonitor:
        m = self.runs.get(run.id)
        if m is None:
            m = self.runs[run.id] = RunMonitor(run, self.metrics_path(run), self.ws.follower.local_path(run), self.pattern)
        m.run = run
        return m

    async def poll_instance(self, name: str, transport: Transport | None = None) -> int:
        """Keep the agent running on ``name`` and ingest its new samples. Returns samples added."""
        m = self.instance(name)
        transport = transport or await self.ws.transport(name)
        now = time.monotonic()
        if not m.agent_dir or now - m.agent_checked > 30:
            python = "python3"
            d = await ensure_agent(transport, gpu_source=self.gpu_source, python=python)
            hid = posixpath.basename(d)
            if hid != m.host_id:  # the local copy is of one host's file (the name may reach another host now)
                m.local_path = self.root / "agent" / f"{name}-{hid}.jsonl"
                m._file = _LineFile(m.local_path)
            m.agent_dir, m.host_id = d, hid
            m.agent_checked = now
        try:
            await mirror(transport, f"{m.agent_dir}/samples.jsonl", m.local_path)
        except MissingFile:
            return 0
        except LabdeckError as e:
            if "shrank" not in str(e):
                raise
            m.local_path.unlink(missing_ok=True)  # the agent rotated its file: start the copy again
            m._file = _LineFile(m.local_path)
            await mirror(transport, f"{m.agent_dir}/samples.jsonl", m.local_path)
        return m.ingest()

    async def poll_run(self, run: Run, transport: Transport | None = None) -> int:
        """Fetch the run's new metric lines (and log lines, through the log follower) and ingest them."""
        m = self.run(run)
        transport = transport or await self.ws.transport(run.instance)
        try:
            await mirror(transport, f"{run.run_dir}/metrics.jsonl", m.metrics_file.path, inside=run.run_dir)
        except (MissingFile, RefusedFile):  # none, or a link / FIFO: no metrics from it, never followed
            pass
        if time.monotonic() - m.tb_checked > TB_SCAN_EVERY or run.run_state.is_final:  # TensorBoard event files
            m.tb_checked = time.monotonic()
            try:
                res = await transport.run(remote_find_command(run.run_dir), timeout=30)
                found = parse_find_output(res.text())
                if m.tb_base is None:
                    m.tb_base = event_base(found)  # chosen once: names stay as more files appear
                for remote in found:
                    if remote not in m.tb:
                        m.tb[remote] = (_LineFile(self.tb_path(run, remote)),
                                        TFEventsParser(run=event_run(remote, m.tb_base)))
            except LabdeckError:
                pass
        for remote, (local, _) in list(m.tb.items()):
            try:
                # an event file's path came from `find` in the run directory: no link on the way down
                under = remote.startswith(run.run_dir.rstrip("/") + "/")
                await mirror(transport, remote, local.path, inside=run.run_dir if under else None)
            except LabdeckError:
                continue
        n = m.update(UPDATE_SLICE)
        while m.backlog:  # a job that logged faster than we read: catch up in slices, letting others run
            await asyncio.sleep(0)
            n += m.update(UPDATE_SLICE)
        return n

    def hardware_summary(self, run_id: str) -> dict[str, Any]:
        """Mean GPU utilization of the run's GPUs, peak GPU memory, mean CPU and peak RSS, over what was sampled."""
        out: dict[str, Any] = {}
        for inst in self.instances.values():
            st = inst.run_stats.get(run_id)
            if not st or not st["n"]:
                continue
            out = {"samples": st["n"], "cpu_mean": round(st["cpu_sum"] / st["n"], 1), "rss_max_mib": st["rss_max"]}
            if st["gpu_n"]:
                out["gpu_util_mean"] = round(st["gpu_sum"] / st["gpu_n"], 1)
                out["gpu_mem_max_mib"] = st["gpu_mem_max"]
        return out

    def idle_runs(self) -> dict[str, float]:
        """Runs whose GPUs averaged under 30% over (up to) the last 5 minutes: run id → mean %."""
        out = {}
        for inst in self.instances.values():
            for run_id in inst.run_gpu:
                mean = inst.run_gpu_mean(run_id)
                if mean is not None and mean < IDLE_UTIL and inst.idle_span(run_id) >= 60:
                    out[run_id] = mean
        return out
