"""A deterministic demo state, and the command that regenerates ``screenshots/``.

    python -m tui.screenshots            # writes screenshots/*.svg

The same demo state feeds the snapshot tests: a fixed clock, fixed machine
facts for ``local``, a fixed CPU/memory series, and a team of two users
(alice, the one at the keyboard, and bob) whose runs form a small lineage.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import re
import shutil
import sys
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator

from backends import clock
from backends.config import load_config
from backends.ids import _encode
from backends.lineage import params_from_command
from backends.models import Annotation, Deployment, Run, RunState
from backends.paths import Paths
from backends.providers.local import LocalProvider
from backends.store import Store
from backends.workstation import Workstation

NOW = datetime(2026, 11, 26, 12, 0, 0, tzinfo=timezone.utc)
DEMO_HOME = Path("/tmp/labdeck-demo")
SIZE = (120, 34)

FACTS = {
    "host": "jump-1", "vcpus": 16, "cpu_model": "AMD EPYC 7R13", "memory_mib": 64 * 1024,
    "gpus": [{"index": 0, "name": "NVIDIA A100 80GB", "memory_total_mib": 81920}], "gpu_note": "",
    "started_at": "2026-11-24T08:00:00Z",
}


@contextmanager
def demo_lock() -> Iterator[None]:
    """Hold the demo home for as long as an app built on it runs. ``demo_workstation`` deletes and
    rebuilds ``DEMO_HOME`` (its path is shown on screen, so it is the same for everyone); two processes
    using it at once (two copies of the suite, or the suite and ``python3 -m tui.screenshots``) would
    tear each other's state down mid-test without this lock."""
    DEMO_HOME.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(str(DEMO_HOME) + ".lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _iso(t: datetime) -> str:
    return t.isoformat(timespec="seconds").replace("+00:00", "Z")


def _id(minutes_ago: float, n: int) -> str:
    ms = int((NOW - timedelta(minutes=minutes_ago)).timestamp() * 1000)
    return _encode(ms, 10) + _encode(int.from_bytes(hashlib.sha256(str(n).encode()).digest()[:10], "big"), 16)


def demo_runs() -> list[Run]:
    """A baseline, a learning-rate sweep derived from it, a rerun, and bob's runs."""
    out: list[Run] = []

    def run(user, n, minutes_ago, name, state, command, parent=None, minutes=12.0, last="", exit_code=None, reason=""):
        start = NOW - timedelta(minutes=minutes_ago)
        r = Run(id=_id(minutes_ago, n), user=user, origin_host="jump-1", name=name, command=command, instance="local",
                state=state, workdir="/home/alice/proj", run_dir=f"/tmp/labdeck-demo/runs/{n}", parent=parent,
                created_at=_iso(start), started_at=None if state == "queued" else _iso(start),
                ended_at=None if state in ("running", "queued") else _iso(start + timedelta(minutes=minutes)),
                exit_code=exit_code, last_line=last, state_reason=reason, price_per_hour=2.5,
                params=params_from_command(command),
                instance_info={"provider": "local", "provider_type": "local", "vcpus": 16, "memory_mib": 65536,
                               "gpus": "1× NVIDIA A100 80GB", "host": "jump-1"})
        m = re.search(r"loss=([0-9.]+) acc=([0-9.]+)", last)
        if m:
            loss, acc = float(m.group(1)), float(m.group(2))
            r.metrics_summary = {"loss": {"last": loss, "best": loss, "min": loss, "max": 0.69, "count": 300, "last_step": 300},
                                 "acc": {"last": acc, "best": acc, "min": 0.5, "max": acc, "count": 300, "last_step": 300}}
        out.append(r)
        return r

    base = run("alice", 1, 600, "baseline", "succeeded", "python train.py --lr 0.1", minutes=14,
               last="done: final loss=0.3120 acc=0.8811", exit_code=0)
    for i, lr in enumerate(("0.3", "0.03", "1.0")):
        ok = lr != "1.0"
        run("alice", 10 + i, 480 - 30 * i, f"lr-{lr}", "succeeded" if ok else "failed", f"python train.py --lr {lr}",
            parent=base.id, minutes=13 + i, exit_code=0 if ok else 1, reason="" if ok else "exit code 1",
            last=f"done: final loss={0.25 - 0.04 * i:.4f} acc={0.90 + 0.01 * i:.4f}" if ok else "FloatingPointError: loss is nan")
    best = out[1]
    wide = run("alice", 20, 240, "wider-model", "succeeded", "python train.py --lr 0.3 --dim 64", parent=best.id,
               minutes=25, exit_code=0, last="done: final loss=0.1870 acc=0.9340")
    run("alice", 21, 95, "wider-model (rerun)", "cancelled", "python train.py --lr 0.3 --dim 64", parent=wide.id,
        minutes=3, reason="cancelled by alice", last="step=140 loss=0.2410 acc=0.9120")
    run("bob", 30, 300, "bob-baseline", "succeeded", "python train.py --lr 0.05 --seed 1", minutes=15,
        exit_code=0, last="done: final loss=0.2950 acc=0.8890")
    run("bob", 31, 18, "bob-augment", "running", "python train.py --lr 0.05 --seed 1 --augment", parent=_id(300, 30),
        last="step=1840 loss=0.2011 acc=0.9270")
    run("bob", 32, 2, "bob-queued", RunState.QUEUED.value, "python train.py --lr 0.01")
    return out


def demo_workstation(home: Path = DEMO_HOME, *, with_runs: bool = True) -> Workstation:
    """A workstation over a fresh, seeded LABDECK_HOME (deleted and rebuilt each call)."""
    if home.exists():
        shutil.rmtree(home)
    home.mkdir(parents=True)
    paths = Paths.resolve(home)
    config = load_config(paths, env={})
    config.user = "alice"
    store = Store(config.team_dir, "alice")
    if with_runs:
        by_user: dict[str, list[Run]] = {}
        for r in demo_runs():
            by_user.setdefault(r.user, []).append(r)
        for user, runs in by_user.items():
            st = store.mine if user == "alice" else Store(config.team_dir, user).mine
            st.put_many("runs", [(r.id, r.to_dict()) for r in runs])
        notes = [Annotation(id=_id(100, 90), run_id=_id(240, 20), kind="note", user="alice",
                            text="wider model beats the lr sweep; next: longer schedule", created_at="2026-11-26T10:05:00Z"),
                 Annotation(id=_id(99, 91), run_id=_id(240, 20), kind="tag", user="alice", text="best",
                            created_at="2026-11-26T10:06:00Z"),
                 Annotation(id=_id(98, 92), run_id=_id(240, 20), kind="note", user="bob",
                            text="reproduced on my data: same loss within 0.01", created_at="2026-11-26T10:30:00Z")]
        for a in notes:
            (store.mine if a.user == "alice" else Store(config.team_dir, a.user).mine).put(a.TABLE, a.id, a.to_dict())
        deps = [Deployment(id=_id(60, 93), run_id=_id(240, 20), instance="local", name="wider-model", user="alice",
                           state="healthy", port=8000, model="model.npz", started_at="2026-11-26T11:00:00Z"),
                Deployment(id=_id(50, 94), run_id=_id(300, 30), instance="local", name="bob-baseline", user="bob",
                           state="stopped", port=8001, model="model.npz", started_at="2026-11-26T10:10:00Z",
                           stopped_at="2026-11-26T11:20:00Z")]
        for d in deps:
            (store.mine if d.user == "alice" else Store(config.team_dir, d.user).mine).put(d.TABLE, d.id, d.to_dict())
    providers = {"local": LocalProvider("local", config.providers["local"].options, runs_root=paths.runs_dir,
                                        facts=lambda: dict(FACTS))}
    if with_runs:
        providers["aws"] = DemoCloud("aws", ptype="ec2", pool=None)  # type: ignore[arg-type]
        for rec in demo_cloud_records():
            (store.mine if rec["created_by"] == "alice" else Store(config.team_dir, rec["created_by"]).mine).put(
                "instances", rec["id"], rec)
    ws = Workstation(config, store=store, providers=providers)
    ws.autostop_states.update(demo_autostop())
    return ws


def _cloud_opts(ptype: str) -> dict:
    from backends.providers.cloud import config_fields

    return {k: f.default for k, f in config_fields(ptype).items()}


def demo_cloud_instances() -> list:
    from backends.models import Instance

    def inst(name, size, gpus, gpu, vcpus, ram, price, owner, lid, state="running", spot=False, started=None):
        return Instance(id=lid or f"aws/i-{name}", name=name, provider="aws", provider_type="ec2", state=state,
                        host="10.20.0.%d" % (len(name) + 10) if state == "running" else "", vcpus=vcpus,
                        memory_mib=ram * 1024, gpus=[{"index": i, "name": gpu, "memory_total_mib": 0} for i in range(gpus)],
                        price_per_hour=price, started_at=started, created_by=owner, size=size, region="us-east-1",
                        spot=spot, managed=bool(lid), labdeck_id=lid, cloud_id=f"i-0{abs(hash(name)) % 10**8:08d}",
                        price_source="libcloud pricing",
                        note="" if lid else "made outside labdeck: listed, never changed unless forced")

    return [inst("a100-sweep", "p4d.24xlarge", 8, "A100", 96, 1152, 32.7726, "alice", _id(130, 95),
                 started=_iso(NOW - timedelta(minutes=130))),
            inst("t4-dev", "g4dn.xlarge", 1, "T4", 4, 16, 0.526, "alice", _id(50, 96), spot=True,
                 started=_iso(NOW - timedelta(minutes=50))),
            inst("bob-l4", "g6.xlarge", 1, "L4", 4, 16, 0.8048, "bob", _id(300, 97), state="stopped"),
            inst("legacy-box", "p3.2xlarge", 1, "V100", 8, 61, 3.06, "", "", started=_iso(NOW - timedelta(days=3)))]


def demo_cloud_records() -> list[dict]:
    out = []
    for i in demo_cloud_instances():
        if not i.labdeck_id:
            continue
        running = i.state == "running"
        start = NOW - timedelta(minutes={"a100-sweep": 130, "t4-dev": 50, "bob-l4": 300}[i.name])
        out.append({"id": i.labdeck_id, "name": i.name, "provider": "aws", "provider_type": "ec2", "size": i.size,
                    "region": "us-east-1", "spot": i.spot, "price_per_hour": i.price_per_hour, "created_by": i.created_by,
                    "created_at": _iso(start), "state": i.state, "desired": i.state,
                    "running_since": _iso(start) if running else None,
                    "billed": [] if running else [[_iso(start), _iso(start + timedelta(minutes=95))]],
                    "autostop_minutes": 30, "autostop_action": "stop", "cloud_id": i.cloud_id})
    return out


def demo_autostop() -> dict:
    import time

    return {"a100-sweep": (time.monotonic() + 3600, {"enabled": True, "idle_since": None, "deadline": None,
                                                    "busy": ["job 01KMZ0"], "interval": 30,
                                                    "updated_at": _iso(NOW - timedelta(seconds=5))}),
            "t4-dev": (time.monotonic() + 3600, {"enabled": True, "idle_since": _iso(NOW - timedelta(minutes=18)),
                                                "deadline": _iso(NOW + timedelta(minutes=12)), "action": "stop",
                                                "busy": [], "interval": 30, "updated_at": _iso(NOW - timedelta(seconds=5))})}


def DemoCloud(name: str, *, ptype: str, pool=None):
    """The screenshots' EC2 account: fixed instances, no API calls, no SSH (a demo state, like ``FACTS``)."""
    from backends.catalog import Catalog
    from backends.errors import ProviderError
    from backends.providers.cloud import CloudProvider

    class _Demo(CloudProvider):
        async def list_instances(self):
            out = demo_cloud_instances()
            self._instances = {inst.name: inst for inst in out}
            return out

        def transport(self, instance):
            raise ProviderError("demo instances have no SSH")

        async def close(self):
            pass

    return _Demo(name, _cloud_opts(ptype), ptype=ptype, pool=pool, catalog=Catalog.load(), env={})


def demo_samples(n: int = 120) -> list[dict]:
    """Agent samples: CPU and memory as a job ramps up, runs and settles; one GPU busy for a while,
    then nearly idle under bob's augmentation run (so it gets flagged)."""
    out = []
    bob = _id(18, 31)
    for i in range(n):
        cpu = 8.0 if i < 15 else (85.0 + 10 * ((i * 7) % 5) / 5 if i < 35 else 22.0)
        mem = 9000 + (i * 90 if i < 35 else 3150)
        util = 0.0 if i < 15 else (92.0 - (i % 4) if i < 35 else 9.0 + (i % 3))
        out.append({"t": 1_795_700_000 + i, "cpu": cpu, "ncpu": 16, "mem_used": int(mem), "mem_total": 64 * 1024,
                    "load1": 1.7, "gpus": [{"index": 0, "name": "NVIDIA A100 80GB", "util": util, "mem_used": 41000,
                                            "mem_total": 81920, "temp": 58, "power": 212.0}],
                    "runs": {bob: {"cpu": cpu, "rss": 3000, "procs": 3, "gpu_mem": 40000, "gpus": [0]}}})
    return out


def demo_metrics(run_id: str, steps: int, final_loss: float, seed: int) -> bytes:
    """A loss/accuracy curve in the format labdeck.log() writes."""
    import json
    import math

    lines = []
    for s in range(1, steps + 1):
        wobble = 0.015 * math.sin(s * (0.7 + seed * 0.13))
        loss = final_loss + (0.69 - final_loss) * math.exp(-s / (steps / 5)) + wobble
        acc = 1.0 - loss * 0.4
        lines.append(json.dumps({"t": 1_795_700_000 + s, "s": s, "m": {"loss": round(loss, 4), "acc": round(acc, 4)}}))
    return ("\n".join(lines) + "\n").encode()


def write_demo_monitoring(ws: Workstation) -> None:
    """Local copies, as if the agent and the runs had been followed: samples of `local`, three loss curves."""
    cache = ws.config.paths.cache_dir
    agent = cache / "agent" / "local.jsonl"
    agent.parent.mkdir(parents=True, exist_ok=True)
    import json

    agent.write_text("".join(json.dumps(s) + "\n" for s in demo_samples()))
    for n, steps, final, seed in ((1, 300, 0.31, 1), (10, 300, 0.25, 2), (20, 300, 0.187, 3)):
        path = cache / "metrics" / "alice" / f"{_id({1: 600, 10: 480, 20: 240}[n], n)}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(demo_metrics("", steps, final, seed))


def demo_app(*, with_runs: bool = True, home: Path = DEMO_HOME):
    from .app import LabdeckApp

    ws = demo_workstation(home, with_runs=with_runs)
    if with_runs:
        write_demo_monitoring(ws)
    clock.pin(NOW)  # cost so far, durations and countdowns are measured to the demo's time
    return LabdeckApp(ws, live=False)


async def settle(pilot) -> None:
    """Wait until the workers have loaded everything and the screen has caught up."""
    from textual.worker import WorkerFailed

    app = pilot.app
    for _ in range(2):
        try:
            await app.workers.wait_for_complete()
        except WorkerFailed:
            pass  # the app shows worker errors itself (see LabdeckApp.show_error)
        await pilot.pause()


def feed_monitor(app) -> None:
    """Overlay the baseline, its best child and the wider model in the Monitor tab."""
    from .tabs.monitor import MonitorTab

    tab = app.query_one(MonitorTab)
    if app.runs:
        tab.selected = [_id(600, 1), _id(480, 10), _id(240, 20)]
        app.poll_monitor()


def pressing(keys):
    """A ``run_before`` for a snapshot (and what :func:`take` does): load, overlay the Monitor's runs,
    then each key in turn, settling after each."""
    async def prepare(pilot) -> None:
        await settle(pilot)
        feed_monitor(pilot.app)
        for key in keys:
            await pilot.press(key)
            await settle(pilot)

    return prepare


SHOTS = [
    ("welcome", False, []),
    ("instances", True, ["1"]),
    ("jobs", True, ["2"]),
    ("monitor", True, ["3"]),
    ("lineage", True, ["4", "enter", "down", "enter", "down"]),
    ("models", True, ["5"]),
    ("launch-cloud", True, ["1", "u", "tab", "tab"]),
    ("jobs-filtered", True, ["2", "slash", *"bob"]),
    ("help", True, ["2", "question_mark"]),
]


async def take(outdir: Path) -> list[Path]:
    outdir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, with_runs, keys in SHOTS:
        with demo_lock():
            app = demo_app(with_runs=with_runs)
            async with app.run_test(size=SIZE) as pilot:
                await pressing(keys)(pilot)
                path = outdir / f"{name}.svg"
                app.save_screenshot(path.name, str(outdir))
                written.append(path)
    return written


def main() -> None:
    outdir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "screenshots"
    for p in asyncio.run(take(outdir)):
        print(p)


if __name__ == "__main__":
    main()
