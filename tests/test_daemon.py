"""The background follower (backends/daemon.py) and the per-run lease (backends/follow.py), with
real processes: the daemon is a real `python -m backends.daemon` started detached, `labdeck` runs in
subprocesses, and the teammate tests use real Unix users sharing one team directory, locally and
through the SSH rig's jump host (issue 15: alice starts a run and exits; bob's `labdeck ps -a`
shows it `succeeded` within 5 s of the job's end)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from backends import daemon
from backends.config import load_config
from backends.paths import Paths
from backends.store import Store

from .teammates import REPO, Unavailable, kill_user_processes, make_team, real_users, wait_for


@pytest.fixture
def with_daemon(home: Path, monkeypatch: pytest.MonkeyPatch):
    """LABDECK_NO_DAEMON unset (conftest sets it for every other test); whatever follower a test
    started under ``home`` is stopped afterwards."""
    monkeypatch.delenv("LABDECK_NO_DAEMON", raising=False)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    paths = Paths.resolve(home)
    yield paths
    st = daemon.status(paths)
    if st["running"] and st["pid"]:
        try:
            os.kill(st["pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass


def cli(*args: str, timeout: float = 60, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tui.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, env={**os.environ, "COLUMNS": "200", **(env or {})})


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def following(paths: Paths, run_id: str) -> bool:
    return run_id in daemon.status(paths)["following"]


async def launch(ws, tmp_path: Path, script: str, name: str = ""):
    return await ws.launch(script, instance="local", workdir=str(tmp_path), sync_code=False, name=name)


async def test_one_follower_status_stop_and_a_stale_pid_file(with_daemon, workstation, tmp_path, monkeypatch) -> None:
    paths = with_daemon
    run = await launch(workstation, tmp_path, "echo started; sleep 60")
    pid = daemon.ensure_running(paths)
    assert pid
    wait_for(lambda: following(paths, run.id), 30, what="the follower to follow the run")
    assert daemon.ensure_running(paths) is None  # it runs: nothing started
    second = subprocess.run([sys.executable, "-m", "backends.daemon"], cwd="/", capture_output=True, timeout=30,
                            env={**os.environ})
    assert second.returncode == 0 and alive(pid)  # a second one sees the lock and leaves
    st = json.loads(cli("daemon", "status", "--json").stdout)
    assert st["running"] and st["pid"] == pid and st["following"] == [run.id]
    assert st["log"] == str(paths.data_dir / "daemon" / "daemon.log") and Path(st["log"]).exists()
    assert "following 1 run" in cli("daemon", "status").stdout
    assert cli("daemon", "stop", "--now").returncode == 2  # unknown options refused
    # the follower copied the log; stopping it saves where it got to (the status file, not the journal)
    wait_for(lambda: workstation.follower.offset(run) == len(b"started\n"), 30, what="the log copy")
    res = cli("daemon", "stop")
    assert res.returncode == 0 and f"Stopped the background follower (pid {pid})" in res.stdout, res
    assert not daemon.lock_held(daemon.DaemonFiles.of(paths))
    wait_for(lambda: not alive(pid), 10, what="the follower to exit")
    assert workstation.store.with_status([workstation.store.own_run(run.id)])[0].log_offset == len(b"started\n")
    assert workstation.store.own_run(run.id).state == "running"  # the job goes on
    # a pid file left behind names a process that is not a follower: nothing is signalled
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        (paths.data_dir / "daemon" / "daemon.pid").write_text(json.dumps({"pid": bystander.pid}))
        res = cli("daemon", "stop")
        assert res.returncode == 0 and "not running" in res.stdout
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


async def test_it_exits_when_nothing_is_active_and_when_its_home_goes(with_daemon, monkeypatch, tmp_path) -> None:
    paths = with_daemon
    monkeypatch.setenv("LABDECK_DAEMON_GRACE", "1")
    pid = daemon.ensure_running(paths)
    assert pid and wait_for(lambda: daemon.lock_held(daemon.DaemonFiles.of(paths)), 20, what="the lock")
    wait_for(lambda: not alive(pid), 30, what="an idle follower to exit by itself")
    log = (paths.data_dir / "daemon" / "daemon.log").read_text()
    assert "nothing active for 1 s; exiting" in log
    # a home removed under a running follower (a test's tmp dir): it leaves instead of spinning
    other = tmp_path / "gone-home"
    monkeypatch.setenv("LABDECK_HOME", str(other))
    monkeypatch.setenv("LABDECK_DAEMON_GRACE", "600")
    ws_paths = Paths.resolve(other)
    from backends.workstation import Workstation

    ws = Workstation(load_config(ws_paths))
    run = await launch(ws, tmp_path, "sleep 60")
    try:
        pid = daemon.ensure_running(ws_paths)
        wait_for(lambda: following(ws_paths, run.id), 30, what="the follower to follow the run")
        import shutil

        shutil.rmtree(other)
        wait_for(lambda: not alive(pid), 15, what="the follower to notice its home is gone")
    finally:
        os.killpg(run.pid, signal.SIGKILL)
        ws.store.close()


async def test_an_attached_follower_takes_over_when_the_holder_dies(with_daemon, workstation, tmp_path) -> None:
    """A TUI-style in-process follower beside the background one: it attaches (never writes), sees
    the bytes arrive, takes the lease when the holder is killed, and the copy is the log, once."""
    paths = with_daemon
    ws = workstation
    n = 150
    run = await launch(ws, tmp_path, f"for i in $(seq 1 {n}); do echo line $i; sleep 0.03; done")
    pid = daemon.ensure_running(paths)
    wait_for(lambda: following(paths, run.id), 30, what="the follower to follow the run")
    seen = []
    task = ws.follower.start(run, lambda r, k: seen.append(k))
    for _ in range(100):
        await asyncio.sleep(0.05)
        if seen:
            break
    assert run.id in ws.follower.attached and not ws.follower.holds(run.id)
    assert seen, "the attached follower saw no bytes arrive"
    assert await ws.follower.catch_up(run) == 0  # a one-off read while the holder follows: nothing written here
    os.kill(pid, signal.SIGKILL)
    for _ in range(100):
        await asyncio.sleep(0.05)
        if ws.follower.holds(run.id) or task.done():
            break
    assert ws.follower.holds(run.id) or task.done()
    done = await asyncio.wait_for(task, 90)
    assert done.state == "succeeded"
    copy = ws.follower.local_path(run).read_bytes()
    assert copy == Path(run.run_dir, "output.log").read_bytes()
    assert copy == b"".join(b"line %d\n" % i for i in range(1, n + 1))
    assert ws.store.own_run(run.id).log_offset == len(copy)


def test_it_outlives_the_session_that_started_it(with_daemon, home, tmp_path, monkeypatch) -> None:
    """`labdeck run` from a shell in its own session; the whole session is killed (the terminal
    closed); the follower, in a session of its own, follows the job to its end and records it."""
    paths = with_daemon
    monkeypatch.setenv("LABDECK_DAEMON_GRACE", "2")
    starter = subprocess.Popen(["sh", "-c", f'"$0" -m tui.cli run --no-sync --workdir {tmp_path} -- '
                                            f"'sleep 2; echo finished' && exec sleep 120", sys.executable],
                               cwd=REPO, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        store = Store.from_config(load_config(paths))
        run = wait_for(lambda: next(iter(store.runs(team=False)[0]), None), 60, what="the run record")
        wait_for(lambda: following(paths, run.id), 30, what="the follower to follow the run")
        pid = daemon.status(paths)["pid"]
        assert os.getsid(pid) == pid != os.getsid(starter.pid)  # its own session
    finally:
        os.killpg(starter.pid, signal.SIGKILL)
        starter.wait()
    assert alive(pid)

    def ended():  # read from the store as it is: nobody else refreshes it
        r = Store.from_config(load_config(paths)).own_run(run.id)
        return r if r.state == "succeeded" and r.log_offset else None

    r = wait_for(ended, 60, what="the follower to record the end")
    assert r.exit_code == 0 and r.log_offset == len(b"finished\n") and r.ended_at
    wait_for(lambda: not alive(pid), 30, what="the follower to leave once nothing is active")


# ---- teammates: real users on the jump host ------------------------------------------------------


@pytest.fixture
def team(shared_dir):
    try:
        with real_users("alice", "bob") as users:
            yield make_team(shared_dir, users)
    except Unavailable as e:
        if os.environ.get("LABDECK_REQUIRE_RIG") == "1":  # CI: real teammates are part of what it checks
            pytest.fail(f"real teammates cannot be made here: {e}")
        pytest.skip(str(e))


def ended_at_mtime(run_dir: str) -> float:
    """When the job ended, by the node's own stamp (the runner writes ended_at as the command exits)."""
    return os.stat(Path(run_dir) / "ended_at").st_mtime


def teammate_sees_it(alice, bob, argv: list[str], budget: float = 5.0) -> dict:
    """alice runs ``argv`` (`labdeck run …`) and her process exits; bob polls `labdeck ps -a --json`
    until her run is succeeded. Returns timings (s after the job's end stamp)."""
    res = alice.labdeck("run", *argv, timeout=90)
    assert res.returncode == 0, res.stderr
    run_id = res.stdout.split()[1]
    found = {}
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        ps = bob.labdeck("ps", "-a", "--json", timeout=60)
        t_seen = time.time()
        assert ps.returncode == 0, ps.stderr
        rows = {r["id"]: r for r in json.loads(ps.stdout)}
        row = rows.get(run_id)
        if row and row["state"] == "succeeded":
            found = row
            break
    assert found, f"bob never saw {run_id} succeeded"
    # the job's end by its own stamp on the instance (alice's run dir: readable by root)
    shown = bob.labdeck("show", run_id, "--json")
    assert shown.returncode == 0, shown.stderr
    lag = t_seen - ended_at_mtime(json.loads(shown.stdout)["run_dir"])
    assert found["user"] == alice.name and found.get("exit_code", 0) == 0
    assert lag <= budget, f"bob saw it {lag:.2f} s after the job ended (budget {budget} s)"
    print(f"bob saw {run_id} succeeded {lag:.2f} s after the job ended")
    return {"run": run_id, "lag": lag}


def test_a_teammate_sees_succeeded_with_no_labdeck_of_the_owner_open_local(team, tmp_path) -> None:
    alice, bob = team["alice"], team["bob"]
    alice.extra_env["LABDECK_DAEMON_GRACE"] = "3"
    teammate_sees_it(alice, bob, ["--no-sync", "--workdir", str(alice.home), "--", "sleep 2"])
    assert not any(p for p in _procs_of(alice.pw.pw_uid) if b"tui.cli" in p), "a labdeck of alice's was still open"


def _procs_of(uid: int) -> list[bytes]:
    out = []
    for e in os.listdir("/proc"):
        if e.isdigit():
            try:
                if os.stat(f"/proc/{e}").st_uid == uid:
                    out.append(Path(f"/proc/{e}/cmdline").read_bytes())
            except OSError:
                pass
    return out


def rig_config_for(alice, rig) -> str:
    """alice's labdeck config reaching the rig's nodes through its jump host, with her own copy of
    the client key (0600, hers)."""
    key = alice.home / "id_ed25519"
    key.write_bytes(Path(rig.client_key).read_bytes())
    os.chown(key, alice.pw.pw_uid, alice.pw.pw_gid)
    os.chmod(key, 0o600)
    text = rig.labdeck_config(key=key, node_settings="")
    cfg = alice.home / "config.toml"
    cfg.write_text(text)
    os.chown(cfg, alice.pw.pw_uid, alice.pw.pw_gid)
    return text


def test_a_teammate_sees_succeeded_through_the_jump_host(team, fresh_rig) -> None:
    """The issue's test: alice `labdeck run --on node1 …` on the jump host and exits; bob's
    `labdeck ps -a` shows it succeeded within 5 s of the job's end on the node."""
    alice, bob = team["alice"], team["bob"]
    alice.extra_env["LABDECK_DAEMON_GRACE"] = "3"
    rig_config_for(alice, fresh_rig)
    node = fresh_rig.host("node1")
    got = teammate_sees_it(alice, bob, ["--on", "node1", "--no-sync", "--workdir", str(node.home), "--", "sleep 2"])
    log = (alice.home / "data" / "daemon" / "daemon.log").read_text()
    assert f"following {got['run']}" in log
    kill_user_processes(alice.pw.pw_uid)


def test_a_dead_model_server_is_marked_failed_and_then_it_leaves(with_daemon, workstation, monkeypatch) -> None:
    """A `healthy` deployment whose server process is gone: the follower marks it failed (nobody is
    sent to a dead endpoint) and, nothing else being active, exits."""
    from backends.models import Deployment

    paths = with_daemon
    monkeypatch.setenv("LABDECK_DAEMON_GRACE", "1")
    gone = subprocess.Popen(["true"])
    gone.wait()
    live = subprocess.Popen(["sleep", "60"])
    try:
        dead = workstation.store.add(Deployment(run_id="01M94000000000000000000000", instance="local", name="dead",
                                                state="healthy", pid=gone.pid, port=8000))
        up = workstation.store.add(Deployment(run_id="01M94000000000000000000001", instance="local", name="up",
                                              state="healthy", pid=live.pid, port=8001))
        pid = daemon.ensure_running(paths)

        def state(dep):
            return Store.from_config(load_config(paths)).mine.get(Deployment.TABLE, dep.id)

        doc = wait_for(lambda: state(dead) if state(dead)["state"] != "healthy" else None, 30, what="the check")
        assert doc["state"] == "failed" and doc["state_reason"] == "the server process ended" and doc["stopped_at"]
        assert state(up)["state"] == "healthy" and alive(pid)  # a live server keeps it (and is left alone)
        live.kill()
        live.wait()
        wait_for(lambda: state(up)["state"] == "failed", 30, what="the second server's end")
        wait_for(lambda: not alive(pid), 30, what="the follower to leave")
    finally:
        live.kill()
        live.wait()


def test_doctor_reads_logind_the_way_logind_does(tmp_path) -> None:
    etc, linger = tmp_path / "systemd", tmp_path / "linger"
    (etc / "logind.conf.d").mkdir(parents=True)
    linger.mkdir()
    assert daemon.logind_kills_processes("alice", etc, linger) == (False, False)  # nothing there: the default (no)
    (etc / "logind.conf").write_text("[Login]\n#KillUserProcesses=yes\nKillUserProcesses=yes\n")
    assert daemon.logind_kills_processes("alice", etc, linger) == (True, False)
    (etc / "logind.conf.d" / "50-keep.conf").write_text("[Login]\nKillUserProcesses=no\n")
    assert daemon.logind_kills_processes("alice", etc, linger) == (False, False)  # a drop-in overrides
    (etc / "logind.conf.d" / "90-kill.conf").write_text("[Other]\nKillUserProcesses=no\n[Login]\nKillUserProcesses=1\n")
    assert daemon.logind_kills_processes("alice", etc, linger) == (True, False)  # the last one, in [Login], wins
    (linger / "alice").touch()
    assert daemon.logind_kills_processes("alice", etc, linger) == (True, True)
    assert daemon.logind_kills_processes("../alice", etc, linger)[1] is False


def test_doctor_says_how_to_keep_the_follower(monkeypatch, home) -> None:
    monkeypatch.setattr(daemon, "logind_kills_processes", lambda user=None: (True, False))
    from click.testing import CliRunner

    from tui.cli import cli as labdeck

    res = CliRunner().invoke(labdeck, ["doctor"])
    assert res.exit_code == 0, res.output
    assert "KillUserProcesses=yes" in res.output and "loginctl enable-linger" in res.output
    assert "background follower: not running" in res.output
    # and how the Media view will draw images here, with the setting ([ui] shown, not eaten as markup)
    assert "Media view images here: halfblock (stdout is not a terminal; [ui] images = auto)" in res.output


def test_show_asks_about_an_active_run_first_and_a_silent_host_costs_it_3_s(home, workstation, tmp_path) -> None:
    """With no follower running: `show` right after a job ended says it ended (no `ps` needed);
    a host that accepts the connection and never answers holds `show` up for the deadline only."""
    import socket

    from backends.models import Run

    run = asyncio.run(launch(workstation, tmp_path, "echo bye"))
    wait_for(lambda: Path(run.run_dir, "ended_at").exists(), 30, what="the job's end")
    assert workstation.store.own_run(run.id).state == "running"  # nobody has looked yet
    res = cli("show", run.id, "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["state"] == "succeeded" and doc["exit_code"] == 0
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        (home / "config.toml").write_text(
            f'[providers.lab]\ntype = "ssh"\nssh_config = ""\nconnect_timeout = 30\n\n'
            f'[providers.lab.hosts.silent]\nhost = "127.0.0.1"\nport = {silent.getsockname()[1]}\nuser = "nobody"\n')
        stuck = workstation.store.add(Run(command="train", instance="silent", run_dir="/home/nobody/.labdeck/runs/x", pid=4242,
                                          state="running", name="stuck"))
        t0 = time.monotonic()
        res = cli("show", stuck.id, "--json")
        took = time.monotonic() - t0
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["state"] == "running"
        baseline = time.monotonic()
        cli("show", run.id, "--json")  # the same command on a finished run: nothing to ask
        startup = time.monotonic() - baseline
        assert took < startup + 3 + 2, (took, startup)  # the 3 s deadline (and the connections' closing)
        # where the host is known and its status read itself hangs (30 s connect timeout), the deadline cuts it
        from backends.workstation import Workstation
        from tui.cli import _refresh_one

        ws = Workstation(load_config(Paths.resolve(home)))

        async def known_then_refreshed() -> float:
            await ws.list_instances()
            t0 = time.monotonic()
            await _refresh_one(ws, ws.store.own_run(stuck.id))
            return time.monotonic() - t0

        took = asyncio.run(known_then_refreshed())
        assert ws.store.own_run(stuck.id).state == "running" and 2.9 <= took < 8, took
        ws.store.close()
    finally:
        silent.close()


async def test_the_tui_starts_the_follower_and_hands_its_runs_over_when_it_closes(with_daemon, workstation, tmp_path,
                                                                                   monkeypatch) -> None:
    """A live TUI with an active run of yours starts the background follower; one of the two writes
    the run's log copy, the other attaches; after the TUI closes the follower finishes the run alone."""
    from tui.app import LabdeckApp

    paths = with_daemon
    monkeypatch.setenv("LABDECK_DAEMON_GRACE", "2")
    run = await launch(workstation, tmp_path, "for i in $(seq 1 30); do echo tick $i; sleep 0.1; done; sleep 1")
    app = LabdeckApp(workstation, live=True)
    async with app.run_test(size=(120, 36)) as pilot:
        for _ in range(300):
            await pilot.pause(0.05)
            if daemon.status(paths)["running"] and run.id in workstation.follower.tasks:
                break
        assert daemon.status(paths)["running"], "the TUI did not start the background follower"
        task = workstation.follower.tasks[run.id]
        assert not task.done() and (workstation.follower.holds(run.id) or run.id in workstation.follower.attached)
    pid = daemon.status(paths)["pid"]

    def ended():  # followed to its end: the log copy's size is in the record
        r = Store.from_config(load_config(paths)).own_run(run.id)
        return r if r.state == "succeeded" and r.log_offset == workstation.follower.offset(r) else None

    r = wait_for(ended, 60, what="the follower to finish the run after the TUI closed")
    copy = workstation.follower.local_path(r).read_bytes()
    assert copy == b"".join(b"tick %d\n" % i for i in range(1, 31)) and r.log_offset == len(copy)
    wait_for(lambda: not alive(pid), 30, what="the follower to leave")


async def test_a_spot_preemption_is_found_and_relaunched_by_the_follower_alone(with_daemon, home, fresh_rig, aws_env,
                                                                               tmp_path, monkeypatch) -> None:
    """The spot instance is taken back while no labdeck is open: the background follower, which
    copied the checkpoint off as it was declared, finds the preemption, relaunches the run from it
    on a new instance and follows the child to its end."""
    from backends import clouds
    from tests.ec2shim import EC2Shim

    from .test_cloud_ec2 import TRAIN, cloud_config

    paths = with_daemon
    monkeypatch.setenv("LABDECK_DAEMON_CLOUD_EVERY", "1")
    monkeypatch.setenv("LABDECK_DAEMON_GRACE", "2")
    rig = fresh_rig
    with EC2Shim((rig.host("node1").addr, rig.host("node2").addr)) as shim:
        ws = cloud_config(home, shim, rig=rig, names={"gpu1": "node1", "gpu1-r1": "node2"},
                          spot_relaunch=True, autostop_minutes=0)
        try:
            inst = await clouds.up(ws, "aws", "gpu1", size="g4dn.xlarge", spot=True)
            proj = tmp_path / "proj"
            proj.mkdir()
            (proj / "train.py").write_text(TRAIN)
            run = await ws.launch(f"{rig.python} train.py", instance="gpu1", workdir=str(proj), name="spotty")
        finally:
            await ws.close()  # nothing of labdeck's is open from here on but the follower
        pid = daemon.ensure_running(paths)
        assert pid

        def mine():
            return Store.from_config(load_config(paths)).runs(team=False)[0]

        def checkpointed():
            r = next(r for r in mine() if r.id == run.id)
            return r if r.checkpoint.get("local") and (r.checkpoint.get("step") or 0) >= 10 else None

        run = wait_for(checkpointed, 60, what="the follower to copy a checkpoint off the instance")
        shim.boto3().terminate_instances(InstanceIds=[inst.cloud_id])

        def child_done():
            runs = mine()
            child = next((r for r in runs if r.parent == run.id), None)
            return child if child is not None and child.state == "succeeded" else None

        child = wait_for(child_done, 120, poll=0.2, what="the relaunched run to finish")
        assert next(r for r in mine() if r.id == run.id).state == "preempted"
        assert child.instance == "gpu1-r1" and child.name == "spotty (resumed)"
        log = (paths.data_dir / "daemon" / "daemon.log").read_text()
        assert "taken by the provider" in log and f"following {child.id}" in log
        wait_for(lambda: not alive(pid), 60, what="the follower to leave")
