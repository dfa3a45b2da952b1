"""The domain model: Instance, Run, Deployment, Notebook, and the run state machine.

Records are plain dataclasses that round-trip through dicts (the store keeps
dicts). Stored times are UTC ISO-8601 strings; durations are measured with a
monotonic clock where they are measured at all.

The run state machine lives here and nowhere else::

    queued → syncing → queued (waiting on the instance) → running → succeeded | failed | cancelled | lost | preempted

``lost`` is not final: an instance that comes back can show a run still
running or finished.
"""

from __future__ import annotations

import dataclasses
import enum
import getpass
import socket
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, ClassVar

from . import clock
from .errors import StateError
from .ids import new_id


def utcnow() -> str:
    """Now, in the stored form (from the one clock seam, :mod:`backends.clock`)."""
    return clock.iso()


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def parse_time_lenient(value: Any) -> datetime | None:
    """:func:`parse_time` for what another program wrote (a state file, a provider's record): None
    for anything that is not an ISO time, UTC when it names no zone."""
    if not isinstance(value, str):
        return None
    try:
        t = parse_time(value)
    except ValueError:
        return None
    return t if t is None or t.tzinfo else t.replace(tzinfo=timezone.utc)


class RunState(str, enum.Enum):
    QUEUED = "queued"
    SYNCING = "syncing"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    LOST = "lost"
    PREEMPTED = "preempted"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATES

    @property
    def is_active(self) -> bool:
        return self in (RunState.QUEUED, RunState.SYNCING, RunState.RUNNING)


FINAL_STATES = frozenset({RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED, RunState.PREEMPTED})

TRANSITIONS: dict[RunState, frozenset[RunState]] = {
    RunState.QUEUED: frozenset({RunState.SYNCING, RunState.RUNNING, RunState.CANCELLED, RunState.FAILED, RunState.LOST}),
    # syncing → queued: the code is on the instance, the job waits there for a free slot
    RunState.SYNCING: frozenset({RunState.QUEUED, RunState.RUNNING, RunState.FAILED, RunState.CANCELLED, RunState.LOST}),
    RunState.RUNNING: frozenset({RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED, RunState.LOST, RunState.PREEMPTED}),
    RunState.LOST: frozenset({RunState.RUNNING, RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED, RunState.PREEMPTED}),
    RunState.SUCCEEDED: frozenset(),
    RunState.FAILED: frozenset(),
    RunState.CANCELLED: frozenset(),
    RunState.PREEMPTED: frozenset(),
}


def check_transition(current: RunState | str, new: RunState | str) -> RunState:
    """Return ``new`` as a RunState if ``current → new`` is allowed, else raise StateError."""
    cur, nxt = RunState(current), RunState(new)
    if nxt not in TRANSITIONS[cur]:
        allowed = ", ".join(sorted(s.value for s in TRANSITIONS[cur])) or "none: it is final"
        raise StateError(f"A run cannot go from {cur.value} to {nxt.value} (allowed from {cur.value}: {allowed}).")
    return nxt


class Record:
    """Mixin: dict round-trip that ignores unknown keys (newer writers) and fills defaults."""

    TABLE: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, enum.Enum):
                d[k] = v.value
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        names = _FIELD_NAMES.get(cls)
        if names is None:
            names = _FIELD_NAMES[cls] = frozenset(f.name for f in dataclasses.fields(cls))
        return cls(**{k: v for k, v in data.items() if k in names})


_FIELD_NAMES: dict[type, frozenset[str]] = {}


@dataclass
class GPU:
    index: int
    name: str
    memory_total_mib: int

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GPU":
        return cls(int(d["index"]), str(d["name"]), int(d["memory_total_mib"]))


@dataclass
class Instance(Record):
    """A machine jobs can run on, as a provider describes it right now."""

    TABLE: ClassVar[str] = "instances"
    name: str
    provider: str
    provider_type: str
    state: str = "unknown"  # running | stopped | pending | terminated | unreachable | unknown
    id: str = field(default_factory=new_id)
    host: str = ""
    vcpus: int = 0
    cpu_model: str = ""
    memory_mib: int = 0
    gpus: list[dict[str, Any]] = field(default_factory=list)
    gpu_note: str = ""  # e.g. "no NVIDIA driver"
    price_per_hour: float = 0.0
    started_at: str | None = None  # UTC ISO time the machine came up
    created_by: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    latency_ms: float | None = None  # round trip of a command on the open connection
    note: str = ""  # why it is unreachable, and similar
    # clouds: what labdeck knows about an instance it can launch, stop and terminate
    size: str = ""
    region: str = ""
    spot: bool = False
    managed: bool = False  # launched by labdeck (tagged): stop/start/terminate without --force
    labdeck_id: str = ""
    cloud_id: str = ""
    price_source: str = ""  # provider API | libcloud pricing | catalog | config | unknown
    cost: float | None = None  # $ over its life so far (labdeck's billing record of it)
    autostop: str = ""  # the on-instance countdown, e.g. "stops in 12m"

    @property
    def gpu_summary(self) -> str:
        if not self.gpus:
            return self.gpu_note or "none"
        names: dict[str, int] = {}
        for g in self.gpus:
            names[g["name"]] = names.get(g["name"], 0) + 1
        return ", ".join(f"{n}× {name}" for name, n in names.items())

    @property
    def size_summary(self) -> str:
        mem = self.memory_mib / 1024
        return f"{self.vcpus} vCPU · {mem:.0f} GiB"


@dataclass
class Run(Record):
    """One job: a command run detached on an instance, in its own run directory."""

    TABLE: ClassVar[str] = "runs"
    command: str
    instance: str
    id: str = field(default_factory=new_id)
    name: str = ""
    user: str = field(default_factory=getpass.getuser)
    origin_host: str = field(default_factory=socket.gethostname)
    state: str = RunState.QUEUED.value
    state_reason: str = ""
    workdir: str = ""
    run_dir: str = ""
    env: dict[str, str] = field(default_factory=dict)
    parent: str | None = None
    pid: int | None = None
    exit_code: int | None = None
    created_at: str = field(default_factory=utcnow)
    started_at: str | None = None
    ended_at: str | None = None
    price_per_hour: float = 0.0
    log_offset: int = 0  # bytes of the log already followed (re-attach resumes here)
    last_line: str = ""
    tags: list[str] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    kind: str = "job"  # "job", or "notebook" for a Jupyter server tracked like a run
    # code snapshot: commit, dirty, root, files, bytes, diff_blob, diff_truncated, untracked, synced_files, synced_bytes
    code: dict[str, Any] = field(default_factory=dict)
    # what the instance was: provider, provider_type, vcpus, memory_mib, gpus (summary text), host
    instance_info: dict[str, Any] = field(default_factory=dict)
    # per metric: last, last_step, min, max, best, count (written as the run is followed and when it ends)
    metrics_summary: dict[str, dict[str, Any]] = field(default_factory=dict)
    # mean GPU utilization of the run's GPUs, peak GPU memory, mean CPU (from the agent)
    hardware: dict[str, Any] = field(default_factory=dict)
    # python version and installed packages on the instance, recorded at start
    environment: dict[str, Any] = field(default_factory=dict)
    artifacts: list[str] = field(default_factory=list)  # paths on the instance, relative to the run directory
    # the latest checkpoint the run declared (labdeck.checkpoint): path on the instance, step, and the
    # local copy labdeck keeps so a preempted run can be relaunched from it
    checkpoint: dict[str, Any] = field(default_factory=dict)
    secrets: list[str] = field(default_factory=list)  # names of the secrets the job got (never their values)

    def cost(self, now: datetime | None = None) -> float:
        """$ spent: the instance's hourly price × the run's duration so far."""
        return self.price_per_hour * (self.duration_seconds(now) or 0.0) / 3600.0

    @property
    def run_state(self) -> RunState:
        return RunState(self.state)

    def duration_seconds(self, now: datetime | None = None) -> float | None:
        start = parse_time(self.started_at)
        if start is None:
            return None
        end = parse_time(self.ended_at) or now or clock.now()
        return max(0.0, (end - start).total_seconds())

    @property
    def display_name(self) -> str:
        return self.name or self.id[-8:].lower()


@dataclass
class Deployment(Record):
    """A run's model served behind an endpoint."""

    TABLE: ClassVar[str] = "deployments"
    run_id: str
    instance: str
    name: str
    id: str = field(default_factory=new_id)
    user: str = field(default_factory=getpass.getuser)
    state: str = "starting"  # starting | healthy | stopped | failed
    port: int | None = None  # on the instance's loopback
    url: str = ""  # through the forward, on the machine that deployed it
    started_at: str = field(default_factory=utcnow)
    stopped_at: str | None = None
    pid: int | None = None  # litserve's main process == its process group
    model: str = ""  # the artifact served (relative to the run directory), or the user's API module:Class
    log_path: str = ""
    state_reason: str = ""


@dataclass
class Notebook(Record):
    """A Jupyter server on an instance, tracked like a run."""

    TABLE: ClassVar[str] = "notebooks"
    instance: str
    id: str = field(default_factory=new_id)
    user: str = field(default_factory=getpass.getuser)
    run_id: str | None = None  # the run whose code it opened (None: the user's workspace)
    job_id: str = ""  # the Run record of the Jupyter server itself (Jobs tab, cost, stop)
    root_dir: str = ""
    state: str = "starting"  # starting | running | stopped | failed
    port: int | None = None
    url: str = ""  # through the forward of the labdeck that started it (without the token)
    started_at: str = field(default_factory=utcnow)
    stopped_at: str | None = None


@dataclass
class Edge(Record):
    """A lineage edge: ``child`` was derived from ``parent`` (``kind``: parent, rerun, uses)."""

    TABLE: ClassVar[str] = "edges"
    parent: str
    child: str
    kind: str = "parent"
    id: str = field(default_factory=new_id)
    user: str = field(default_factory=getpass.getuser)
    created_at: str = field(default_factory=utcnow)


@dataclass
class Annotation(Record):
    """A note or a tag on any run, by anyone: kept in the author's own store (so nobody edits
    another's records, and everyone can annotate every run)."""

    TABLE: ClassVar[str] = "annotations"
    run_id: str
    kind: str  # "note" | "tag"
    text: str
    id: str = field(default_factory=new_id)
    user: str = field(default_factory=getpass.getuser)
    created_at: str = field(default_factory=utcnow)
    removed: bool = False  # a tag taken off again


RECORD_TYPES: dict[str, type[Record]] = {t.TABLE: t for t in (Instance, Run, Deployment, Notebook, Edge, Annotation)}
