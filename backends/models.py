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
from .ids import is_stored_id, is_user_name, new_id


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


_FIELD_NAMES: dict[type, frozenset[str]] = {}


# ---- checking records read from someone else's files ------------------------------------------
#
# A teammate's store is a file another user writes: any field may hold anything JSON can. Before a
# record of theirs is built (and later shown, compared, formatted, used in a path), its fields are
# checked against the dataclass: the declared JSON type, one level into lists and dicts, times that
# parse (with a zone: naive and aware times cannot be subtracted), ids and user names by their
# grammar (backends/ids.py), a run's state from the state machine. Cheap enough for 10,000 runs.

_INT_BOUND = 1 << 63  # larger ints overflow float() (a price, a duration) and C-level formatting
_NONE = type(None)
_TYPES: dict[str, tuple[type, ...]] = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,),
                                       "dict": (dict,), "list": (list,), "None": (_NONE,)}
_HEX = frozenset("0123456789abcdefABCDEF")
# what to check beyond the JSON type (JSON gives exact types: a set lookup of type(value) is enough)
_LIST_STR, _LIST_DICT, _DICT_STR, _DICT_DICT, _ID, _ID_REF, _USER, _TIME = range(1, 9)
_ELEMENT_RULES = {"list[str]": _LIST_STR, "list[dict": _LIST_DICT, "dict[str, str]": _DICT_STR, "dict[str, dict": _DICT_DICT}


def _rule_of(annotation: str) -> tuple[frozenset[type] | None, int]:
    """(the JSON types allowed, or None for any; element rule) of an annotation as written (``dict[str, str] | None``)."""
    allowed: set[type] = set()
    rule = 0
    for part in annotation.split("|"):
        part = part.strip()
        base = part.split("[", 1)[0]
        if base not in _TYPES:
            return None, 0  # Any and the like: anything JSON holds
        allowed.update(_TYPES[base])
        for prefix, r in _ELEMENT_RULES.items():
            if part.startswith(prefix):
                rule = r
    return frozenset(allowed), rule


def _time_ok(value: Any) -> bool:
    if value is None or value == "":
        return True
    if type(value) is not str or len(value) > 40:
        return False
    try:
        t = parse_time(value)
        # and it must be a time UTC can hold: "0001-01-01T00:00+14:00" parses, then overflows in every
        # comparison with a UTC time (filters, reports)
        return t is not None and t.tzinfo is not None and t.astimezone(timezone.utc) is not None
    except (ValueError, TypeError, OverflowError):
        return False


def _check(spec: dict[str, tuple[frozenset[type] | None, int]], required: tuple[str, ...], data: Any) -> str | None:
    """The first problem of ``data`` against ``spec`` (field -> (types, rule)), or None."""
    if type(data) is not dict:
        return "not an object"
    for name in required:
        if name not in data:
            return f"{name} is missing"
    for name, value in data.items():
        rule = spec.get(name)
        if rule is None:
            continue  # a field this labdeck does not read
        allowed, r = rule
        t = type(value)
        if allowed is not None and t not in allowed:
            return f"{name} is a {t.__name__}"
        if t is int and not -_INT_BOUND < value < _INT_BOUND:
            return f"{name} is out of range"
        if not r:
            continue
        if r == _TIME:
            if not _time_ok(value):
                return f"{name} is not a time"
        elif r == _ID:
            if not is_stored_id(value):
                return f"{name} is not an id"
        elif r == _ID_REF:
            if value and not is_stored_id(value):
                return f"{name} is not an id"
        elif r == _USER:
            if not is_user_name(value):
                return f"{name} is not a user name"
        elif value:
            if r == _LIST_STR:
                ok = all(type(x) is str for x in value)
            elif r == _LIST_DICT:
                ok = all(type(x) is dict for x in value)
            elif r == _DICT_STR:
                ok = all(type(x) is str for x in value.values())
            else:
                ok = all(type(x) is dict for x in value.values())
            if not ok:
                return f"{name} holds an item of the wrong type"
    return None


def _spec_of(fields: list[tuple[str, str]], id_fields: tuple[str, ...]) -> dict[str, tuple[frozenset[type] | None, int]]:
    spec = {}
    for name, annotation in fields:
        allowed, rule = _rule_of(annotation)
        if name == "id":
            rule = _ID
        elif name in id_fields:
            rule = _ID_REF
        elif name in ("user", "created_by"):
            rule = _USER
        elif name.endswith("_at") or name == "running_since":
            rule = _TIME
        spec[name] = (allowed, rule)
    return spec


_SPECS: dict[type, tuple[dict[str, tuple[frozenset[type] | None, int]], tuple[str, ...]]] = {}


def record_problem(cls: type, data: Any) -> str | None:
    """Why ``data`` (read from someone else's store) cannot be a ``cls`` record, or None if it can.

    The message names fields, never echoes values (they are the untrusted part)."""
    spec = _SPECS.get(cls)
    if spec is None:
        fields = dataclasses.fields(cls)
        spec = _SPECS[cls] = (
            _spec_of([(f.name, str(f.type)) for f in fields], cls.ID_FIELDS),
            tuple(f.name for f in fields
                  if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING))  # type: ignore[misc]
    return _check(*spec, data) or cls.extra_problem(data)


class Record:
    """Mixin: dict round-trip that ignores unknown keys (newer writers) and fills defaults."""

    TABLE: ClassVar[str]
    # fields that hold another record's id (checked like ``id`` when read from someone else's store)
    ID_FIELDS: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def extra_problem(cls, data: dict[str, Any]) -> str | None:
        """A record type's own checks beyond the field types (see :func:`record_problem`)."""
        return None

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

    ID_FIELDS: ClassVar[tuple[str, ...]] = ("parent",)

    @classmethod
    def extra_problem(cls, data: dict[str, Any]) -> str | None:
        if data.get("state", RunState.QUEUED.value) not in _RUN_STATES:
            return "state is not a run state"
        code = data.get("code") or {}
        commit = code.get("commit")
        if commit not in (None, "") and not (isinstance(commit, str) and 4 <= len(commit) <= 64 and set(commit) <= _HEX):
            return "code.commit is not a commit hash"  # it is handed to git: never an option
        for key in ("root", "subdir"):
            if code.get(key) is not None and not isinstance(code.get(key), str):
                return f"code.{key} is not a path"
        env = data.get("environment") or {}
        if not isinstance(env, dict):
            return "environment is not a mapping"
        if env.get("executable") is not None and not isinstance(env.get("executable"), str):
            return "environment.executable is not a path"
        pkgs = env.get("packages")
        if pkgs is not None and not (isinstance(pkgs, list) and all(isinstance(x, str) for x in pkgs)):
            return "environment.packages is not a list of names"
        blob = code.get("diff_blob")
        if blob not in (None, "") and not (isinstance(blob, str) and blob.endswith(".diff") and is_stored_id(blob[:-5])):
            return "code.diff_blob is not a blob name"  # it names a file under the owner's blobs/
        return None

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

    ID_FIELDS: ClassVar[tuple[str, ...]] = ("run_id",)


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

    ID_FIELDS: ClassVar[tuple[str, ...]] = ("run_id", "job_id")


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

    ID_FIELDS: ClassVar[tuple[str, ...]] = ("parent", "child")


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

    ID_FIELDS: ClassVar[tuple[str, ...]] = ("run_id",)


RECORD_TYPES: dict[str, type[Record]] = {t.TABLE: t for t in (Instance, Run, Deployment, Notebook, Edge, Annotation)}
_RUN_STATES = frozenset(s.value for s in RunState)

# The ``instances`` table holds labdeck's cloud records (backends/clouds.py), not Instance dataclasses:
# their fields, as record_problem checks them (any other field is not read as more than text).
_CLOUD_SPEC = _spec_of([
    ("id", "str"), ("name", "str"), ("provider", "str"), ("provider_type", "str"), ("size", "str"),
    ("region", "str"), ("spot", "bool"), ("image", "str"), ("price_per_hour", "float | None"),
    ("price_source", "str"), ("created_by", "str"), ("created_at", "str | None"), ("state", "str"),
    ("desired", "str"), ("running_since", "str | None"), ("billed", "list | None"),
    ("autostop_minutes", "float | None"), ("autostop_action", "str"), ("note", "str"), ("cloud_id", "str"),
    ("relaunch_runs", "list[str] | None"), ("preempted_at", "str | None"), ("ended_at", "str | None")], ())


def cloud_record_problem(data: Any) -> str | None:
    """:func:`record_problem` for a cloud instance record (table ``instances``)."""
    problem = _check(_CLOUD_SPEC, ("id",), data)
    if problem:
        return problem
    for pair in data.get("billed") or ():
        if not (type(pair) is list and len(pair) == 2 and all(t and _time_ok(t) for t in pair)):
            return "billed holds a bad interval"
    return None


def record_problem_in(table: str, data: Any) -> str | None:
    """Why a document of ``table`` read from someone else's store cannot be used (None: it can)."""
    if table == Instance.TABLE:
        return cloud_record_problem(data)
    cls = RECORD_TYPES.get(table)
    return None if cls is None else record_problem(cls, data)
