"""Shared homes (issue 15, item 4): a home directory mounted on every node (NFS) holds one queue,
one agent and one set of liveness files per host, keyed by a host id (backends/hostid.py); a pid
is judged alive as (host id, boot id, pid).

The keying first, on `local` with the real wrapper (tickets and host files of "another host" are
planted beside real ones); then the rig with one Unix user and one home on both nodes
(:class:`tests.rig.SharedHomeRig`): its nodes are network namespaces of one machine, so they share
the machine id, the kernel (boot id), the pid namespace and the filesystem -- the case that a
pid or a machine id alone gets wrong.
"""

from __future__ import annotations

import asyncio
import os
import posixpath
import shlex
import subprocess
import time
from pathlib import Path

import pytest

from backends import jobs
from backends.config import load_config
from backends.errors import LabdeckError
from backends.hostid import HOST_ID_FN, check_boot_id, check_host_id, host_id, host_state_dir, queue_name
from backends.monitor import agents_dir, stop_agent
from backends.paths import Paths
from backends.workstation import Workstation

from .conftest import node_host_id, wait_final
from .test_ssh import rig_config


async def _until(predicate, timeout: float, what: str, poll: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = await predicate()
        if got:
            return got
        await asyncio.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


def _hold(release: Path, limit_s: int = 60) -> str:
    """A job that runs until ``release`` exists (at most ``limit_s``)."""
    r = shlex.quote(str(release))
    return f"i=0; while [ ! -e {r} ] && [ $i -lt {limit_s * 10} ]; do sleep 0.1; i=$((i+1)); done"


# ---- the keying, on local ----------------------------------------------------------------------


def test_host_ids_are_checked_before_they_become_paths() -> None:
    assert check_host_id(" 0123456789abcdef\n") == "0123456789abcdef"
    for bad in ("", "../../etc", "0123456789ABCDEF", "0123456789abcde", "0123456789abcdef0", "0123456789abcdeg"):
        with pytest.raises(LabdeckError, match="host id"):
            check_host_id(bad, "node9")
    assert check_boot_id("574a4270-ca5e-49f7-9f88-aa5aa51d2ed1\n") == "574a4270-ca5e-49f7-9f88-aa5aa51d2ed1"
    assert check_boot_id("a b") == check_boot_id("x" * 65) == "unknown"
    assert host_state_dir("/h/u/.labdeck/runs/", "0123456789abcdef") == "/h/u/.labdeck/runs/.hosts/0123456789abcdef"
    assert (queue_name("job"), queue_name("notebook")) == ("queue", "queue-notebook")
    assert posixpath.basename(agents_dir("/h/u/.labdeck/runs")) == "agent"


def test_the_id_changes_with_the_namespaces_not_with_the_name() -> None:
    """Computed from the machine id and the net and pid namespaces: the same in two shells of one
    host, different in another network namespace of the same machine (unshare -n, as root)."""
    one = subprocess.run(["sh", "-c", HOST_ID_FN + "hostids; echo $HID $BOOT"], capture_output=True, text=True, check=True).stdout
    two = subprocess.run(["sh", "-c", HOST_ID_FN + "hostids; echo $HID $BOOT"], capture_output=True, text=True, check=True).stdout
    assert one == two and check_host_id(one.split()[0]) and check_boot_id(one.split()[1]) != "unknown"
    if os.geteuid() != 0 or not Path("/usr/bin/unshare").exists():
        pytest.skip("another network namespace needs root and unshare")
    other = subprocess.run(["unshare", "-n", "sh", "-c", HOST_ID_FN + "hostids; echo $HID $BOOT"], capture_output=True, text=True)
    if other.returncode != 0:
        pytest.skip(f"unshare -n: {other.stderr.strip()}")
    assert other.stdout.split()[0] != one.split()[0]  # another namespace: another host
    assert other.stdout.split()[1] == one.split()[1]  # (one kernel: one boot id)


async def test_queue_tickets_and_host_files_are_keyed_by_host(workstation: Workstation, tmp_path: Path) -> None:
    ws = workstation
    t = await ws.transport("local")
    hid, boot = await host_id(t)
    root = await t.runs_root()
    queue = Path(host_state_dir(root, hid)) / queue_name("job")
    queue.mkdir(parents=True)
    sleeper = subprocess.Popen(["sleep", "60"], start_new_session=True)  # a live pid, "on another host"
    try:
        # a live pid in a ticket that names another host (or another boot of this one) keeps no slot busy:
        # with max_concurrent=1 the run starts at once
        (queue / "00000000000000000000000001").write_text(f"{sleeper.pid} {'f' * 16} {boot}\n")
        (queue / "00000000000000000000000002").write_text(f"{sleeper.pid} {hid} another-boot\n")
        run = await ws.launch(_hold(tmp_path / "go"), workdir=str(tmp_path), sync_code=False)
        assert run.state == "running", run.state_reason
        assert run.instance_info["host_id"] == hid
        # ... and neither is removed (they are not this host's to judge)
        assert sorted(p.name for p in queue.iterdir()) == ["00000000000000000000000001", "00000000000000000000000002",
                                                            run.id]
        host_file = Path(run.run_dir, "host").read_text().split()
        assert host_file == [hid, boot] and (queue / run.id).read_text().split() == [str(run.pid), hid, boot]
        # the same live pid with this host's id and boot is a slot taken: the next run waits
        (queue / "00000000000000000000000003").write_text(f"{sleeper.pid} {hid} {boot}\n")
        (tmp_path / "go").touch()
        assert (await wait_final(ws, run.id)).state == "succeeded"
        run2 = await ws.launch("true", workdir=str(tmp_path), sync_code=False)
        assert run2.state == "queued"
        sleeper.kill()
        sleeper.wait()
        assert (await wait_final(ws, run2.id)).state == "succeeded"
        assert not (queue / "00000000000000000000000003").exists()  # this host's dead ticket: removed
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()


async def test_status_judges_a_pid_only_on_its_own_host_and_boot(workstation: Workstation, tmp_path: Path) -> None:
    ws = workstation
    t = await ws.transport("local")
    hid, boot = await host_id(t)
    run = await ws.launch(_hold(tmp_path / "go"), workdir=str(tmp_path), sync_code=False)
    assert run.state == "running"
    host = Path(run.run_dir, "host")
    try:
        st = (await jobs.read_statuses(t, [run.run_dir]))[run.run_dir]
        assert (st.where, st.alive, st.pid) == ("here", True, run.pid)
        # another host's run directory (a home several hosts share): its pid means nothing here,
        # even though a process with that pid is alive on this machine
        host.write_text(f"{'e' * 16} {boot}\n")
        st = (await jobs.read_statuses(t, [run.run_dir]))[run.run_dir]
        assert (st.where, st.alive, st.elsewhere) == ("other", False, True) and os.path.exists(f"/proc/{run.pid}")
        await ws.refresh_runs()
        lost = ws.store.find_run(run.id)
        assert lost.state == "lost" and lost.state_reason == jobs.ELSEWHERE
        with pytest.raises(LabdeckError, match="another host"):  # cancel signals nothing there
            await ws.cancel(run.id)
        assert os.path.exists(f"/proc/{run.pid}") and ws.store.find_run(run.id).state_reason == jobs.ELSEWHERE
        # this host, but a pid file from before a reboot: dead (whatever has that pid now)
        host.write_text(f"{hid} 00000000-0000-0000-0000-000000000000\n")
        st = (await jobs.read_statuses(t, [run.run_dir]))[run.run_dir]
        assert (st.where, st.alive) == ("here", False)
        # a run directory from before per-host state (no host file): its pid is checked alone, as then
        host.unlink()
        st = (await jobs.read_statuses(t, [run.run_dir]))[run.run_dir]
        assert (st.where, st.alive) == ("", True)
        await ws.refresh_runs()
        assert ws.store.find_run(run.id).state == "running"  # back from lost: it is alive
        (tmp_path / "go").touch()
        assert (await wait_final(ws, run.id)).state == "succeeded"
    finally:
        (tmp_path / "go").touch()


async def test_a_queued_run_read_through_another_host_stays_queued(workstation: Workstation, tmp_path: Path) -> None:
    """A run waiting in its host's queue, read through an instance name that reaches another host of
    the shared home (an alias of several login nodes, say), cannot be judged from there: it keeps
    waiting (queued, saying why), and read from its own host again it says it waits for a slot. It
    did go lost, and lost cannot go back to queued: it stayed lost, with that reason, until it started."""
    ws = workstation
    t = await ws.transport("local")
    hid, boot = await host_id(t)
    queue = Path(host_state_dir(await t.runs_root(), hid)) / queue_name("job")
    queue.mkdir(parents=True)
    sleeper = subprocess.Popen(["sleep", "60"], start_new_session=True)  # holds the one slot
    try:
        (queue / "00000000000000000000000001").write_text(f"{sleeper.pid} {hid} {boot}\n")
        run = await ws.launch("true", workdir=str(tmp_path), sync_code=False)
        assert run.state == "queued"
        host = Path(run.run_dir, "host")
        host.write_text(f"{'e' * 16} {boot}\n")  # as the other host reads it: not its own
        await ws.refresh_runs()
        seen = ws.store.find_run(run.id)
        assert (seen.state, seen.state_reason) == ("queued", jobs.ELSEWHERE)
        host.write_text(f"{hid} {boot}\n")  # its own host again
        await ws.refresh_runs()
        seen = ws.store.find_run(run.id)
        assert (seen.state, seen.state_reason) == ("queued", jobs.WAITING)
        sleeper.kill()
        sleeper.wait()
        assert (await wait_final(ws, run.id)).state == "succeeded"
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()


async def test_a_host_without_an_id_gets_no_agent_and_no_kill(workstation: Workstation, tmp_path: Path,
                                                             monkeypatch) -> None:
    """Where the host id cannot be worked out (no sha256sum nor shasum), the agent's directory would
    be the agents' base, whose lock (an agent of the layout before, maybe another host's in a shared
    home) names a pid that is not ours to kill: labdeck says so and signals nothing."""
    from backends.autostop import autostop_base, read_state
    from backends.monitor import ensure_agent

    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # (autostop lives in the home on `local` too)
    t = await workstation.transport("local")
    old_autostop = Path(await autostop_base(t))
    assert old_autostop.is_relative_to(tmp_path)  # the autostop state of the layout before: not this host's
    old_autostop.mkdir(parents=True)
    (old_autostop / "state.json").write_text('{"pid": 1, "enabled": true}\n')
    base = Path(agents_dir(await t.runs_root()))
    base.mkdir(parents=True)
    bin_dir = tmp_path / "bin"  # this PATH has every program but the two hash ones
    bin_dir.mkdir()
    for d in os.environ["PATH"].split(":"):
        if os.path.isdir(d):
            for name in os.listdir(d):
                if name not in ("sha256sum", "shasum") and not (bin_dir / name).exists():
                    (bin_dir / name).symlink_to(os.path.join(d, name))
    sleeper = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        (base / "agent.lock").write_text(f"{sleeper.pid}\n")
        with monkeypatch.context() as m:
            m.setenv("PATH", str(bin_dir))
            await stop_agent(t)
            with pytest.raises(LabdeckError, match="host id"):
                await ensure_agent(t)
            assert await read_state(t) is None
        assert sleeper.poll() is None  # not signalled
        assert not (base / "agent.py").exists() and not (base / "reader").exists()  # nothing set up there
    finally:
        sleeper.kill()
        sleeper.wait()


# ---- one home on two nodes (the rig) ------------------------------------------------------------


def _ws(home: Path, rig) -> Workstation:
    text = rig_config(rig).replace("max_concurrent = 2", "max_concurrent = 1")
    (home / "config.toml").write_text(text)
    return Workstation(load_config(Paths.resolve(home)))


@pytest.fixture
async def shared(home, shared_home_rig):
    rig = shared_home_rig
    ws = _ws(home, rig)
    try:
        yield ws, rig
    finally:
        for n in rig.nodes:
            try:
                await stop_agent(await ws.transport(n.name))
            except LabdeckError:
                pass
        await ws.close()
        rig.reset()


async def test_two_nodes_one_home_run_at_once_and_keep_their_own_queues(shared, tmp_path: Path) -> None:
    ws, rig = shared
    n1, n2 = rig.host("node1"), rig.host("node2")
    assert n1.home == n2.home and n1.user == n2.user  # one home, one Unix user
    t1, t2 = await ws.transport("node1"), await ws.transport("node2")
    (h1, b1), (h2, b2) = await host_id(t1), await host_id(t2)
    assert h1 != h2 and b1 == b2  # one machine (one kernel), two hosts
    assert (h1, h2) == (node_host_id(n1), node_host_id(n2))  # what each node works out for itself
    release = n1.home / "release"  # (the one home: both nodes see it)
    hold = _hold(release)
    a = await ws.launch(hold, instance="node1", workdir=str(n1.home), sync_code=False)
    b = await ws.launch(hold, instance="node2", workdir=str(n2.home), sync_code=False)
    try:
        # neither waits in the other's queue (max_concurrent = 1 on each)
        assert (a.state, b.state) == ("running", "running"), (a.state_reason, b.state_reason)
        assert a.run_dir.startswith(f"{n1.home}/.labdeck/runs/") and b.run_dir.startswith(f"{n1.home}/.labdeck/runs/")
        runs = n1.home / ".labdeck" / "runs"
        assert sorted(p.name for p in (runs / ".hosts").iterdir()) == sorted([h1, h2])
        assert [p.name for p in (runs / ".hosts" / h1 / "queue").iterdir()] == [a.id]
        assert [p.name for p in (runs / ".hosts" / h2 / "queue").iterdir()] == [b.id]
        # a's pid is alive (and, in the rig, visible from node2: one pid namespace) -- on node1 only
        assert os.path.exists(f"/proc/{a.pid}")
        st = (await jobs.read_statuses(t2, [a.run_dir]))[a.run_dir]
        assert (st.where, st.alive) == ("other", False)
        st = (await jobs.read_statuses(t1, [a.run_dir]))[a.run_dir]
        assert (st.where, st.alive) == ("here", True)
        # each host's own queue still holds its slots: a second run on node1 waits for a
        c = await ws.launch("true", instance="node1", workdir=str(n1.home), sync_code=False)
        assert c.state == "queued"
        await ws.refresh_runs()
        assert {r.id: r.state for r in (ws.store.find_run(x.id) for x in (a, b, c))} == \
            {a.id: "running", b.id: "running", c.id: "queued"}
    finally:
        release.touch()
    for r in (a, b, c):
        assert (await wait_final(ws, r.id)).state == "succeeded"


async def test_each_nodes_monitor_shows_its_own_samples(shared) -> None:
    ws, rig = shared
    n1 = rig.host("node1")
    (h1, _), (h2, _) = await host_id(await ws.transport("node1")), await host_id(await ws.transport("node2"))

    async def both_sampled():
        for name in ("node1", "node2"):
            await ws.monitor.poll_instance(name)
        return all(ws.monitor.instance(n).n >= 2 for n in ("node1", "node2"))

    await _until(both_sampled, 30, "two samples from each node's agent", poll=0.5)
    m1, m2 = ws.monitor.instance("node1"), ws.monitor.instance("node2")
    assert (m1.host_id, m2.host_id) == (h1, h2)
    assert m1.agent_dir == f"{n1.home}/.labdeck/agent/{h1}" and m2.agent_dir == f"{n1.home}/.labdeck/agent/{h2}"
    assert m1.last["host"] == h1 and m2.last["host"] == h2  # each its own agent's samples
    assert not m1.warnings and not m2.warnings
    # two agents, one per node, each holding its own lock
    pids = {(n1.home / ".labdeck" / "agent" / h / "agent.lock").read_text().strip() for h in (h1, h2)}
    assert len(pids) == 2 and all(p.isdigit() and os.path.exists(f"/proc/{p}") for p in pids)
    # a line that names another host (a copy gone wrong) is not taken as this node's
    m1.ingest()
    before = m1.n
    with open(m1.local_path, "a") as f:
        f.write('{"t": %f, "cpu": 1, "host": "%s"}\n' % (time.time(), h2))
    m1.ingest()
    assert m1.n == before and m1.warnings["sample of another host"] == 1
