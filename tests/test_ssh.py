"""SSH through a real jump host: the transport, the ssh provider, host keys, jobs and faults.

Runs on the rig (tests/rig.py): real OpenSSH sshd in network namespaces, a jump host
and two nodes reachable only through it. Job output is followed into labdeck's local
copy of each log; the fault tests check that copy is complete and has no duplicate.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from backends.config import load_config
from backends.errors import LabdeckError, ProviderError
from backends.paths import Paths
from backends.workstation import Workstation

from .conftest import wait_final


def rig_config(rig, *, policy: str = "accept-new", extra: str = "", connect_timeout: float = 3.0) -> str:
    return rig.labdeck_config(policy=policy, extra=extra, connect_timeout=connect_timeout)


def make_ws(home: Path, rig, **kw) -> Workstation:
    (home / "config.toml").write_text(rig_config(rig, **kw))
    return Workstation(load_config(Paths.resolve(home)))


@pytest.fixture
async def ws(home, fresh_rig):
    w = make_ws(home, fresh_rig)
    yield w
    await w.close()


async def test_instances_through_the_jump_host(ws, rig) -> None:
    listing = await ws.list_instances()
    by_name = {i.name: i for i in listing.instances}
    assert set(by_name) == {"local", "node1", "node2"}  # the jump host is not an instance
    for n in ("node1", "node2"):
        inst = by_name[n]
        assert inst.state == "running", inst.note
        assert inst.latency_ms is not None and 0 < inst.latency_ms < 1000
        assert inst.vcpus == os.cpu_count() and inst.memory_mib > 0 and inst.started_at
        assert inst.price_per_hour == 2.5 and inst.gpu_note == "no NVIDIA GPU"
    known = (ws.config.paths.data_dir / "known_hosts").read_text()
    for h in rig.hosts:  # accept-new recorded every hop's key
        assert h.addr in known
    # one connection per host, shared: a second round opens nothing new
    pool = ws.providers["lab"].pool
    gens = {k: c.generation for k, c in pool._conns.items()}
    await ws.list_instances()
    assert {k: c.generation for k, c in pool._conns.items()} == gens and len(gens) == 3


async def test_transport_contract_over_ssh(ws, rig, tmp_path) -> None:
    t = await ws.transport("node1")
    node = rig.host("node1")
    res = await t.run("echo out; echo err >&2; printf %s \"$X\"; exit 3", env={"X": "a b"})
    assert (res.exit_code, res.stdout, res.stderr) == (3, b"out\na b", b"err\n")
    assert (await t.run("pwd", cwd="/tmp")).stdout == b"/tmp\n"
    assert (await t.run("cat", input=b"stdin!")).stdout == b"stdin!"
    assert await t.home_dir() == str(node.home)
    target = f"{node.home}/dir/f.bin"
    await t.put_files({target: bytes(range(256)) * 4}, mode=0o600)
    chunk = await t.read_file(target, 250, 10)
    assert (chunk.data, chunk.next_offset, chunk.size) == (bytes(range(250, 256)) + bytes(range(4)), 260, 1024)
    with pytest.raises(LabdeckError, match="No file"):
        await t.read_file(f"{node.home}/missing")
    # detached: own session, survives the connection
    pid = await t.start_detached(f"{rig.python} -m http.server 18765 --bind 127.0.0.1", cwd=str(node.home))
    sid = (await t.run(f"ps -o sid= -p {pid}")).text().strip()
    assert sid == str(pid)
    fwd = None
    try:
        for _ in range(50):
            if (await t.run("python3 -c \"import socket; socket.create_connection(('127.0.0.1', 18765), 1)\"")).ok:
                break
            await asyncio.sleep(0.1)
        fwd = await t.forward_port(18765)
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(f"http://127.0.0.1:{fwd.local_port}/", timeout=5).read())
        assert b"Directory listing" in body
    finally:
        if fwd:
            await fwd.close()
        await t.run(f"kill -TERM -{pid}")


async def test_job_through_the_jump_host_with_code_sync(ws, rig, tmp_path) -> None:
    proj = tmp_path / "proj"
    (proj / "src").mkdir(parents=True)
    (proj / "src" / "train.py").write_text("import sys\nprint('hello from', sys.argv[1])\n")
    (proj / "data.txt").write_text("x" * 1000)
    subprocess.run(["git", "init", "-q", str(proj)], check=True)  # the repo is the snapshot, src/ the workdir
    run = await ws.launch(f"{rig.python} train.py node", instance="node1", workdir=str(proj / "src"))
    node = rig.host("node1")
    assert run.run_dir.startswith(f"{node.home}/.labdeck/runs/")
    done = await wait_final(ws, run.id)
    assert done.state == "succeeded", done.state_reason
    assert done.code["synced_files"] == 2 and done.price_per_hour == 2.5
    await ws.follower.catch_up(done)
    assert ws.follower.local_path(done).read_text() == "hello from node\n"
    # unchanged code does not travel again; one changed file does
    run2 = await ws.launch(f"{rig.python} train.py again", instance="node1", workdir=str(proj / "src"))
    assert ws.store.find_run(run2.id).code["synced_files"] == 0
    (proj / "data.txt").write_text("y" * 1000)
    run3 = await ws.launch("true", instance="node1", workdir=str(proj / "src"))
    assert ws.store.find_run(run3.id).code["synced_files"] == 1
    for r in (run2, run3):
        assert (await wait_final(ws, r.id)).state == "succeeded"


async def test_cancel_on_a_node_stops_the_process_group(ws, rig, tmp_path) -> None:
    run = await ws.launch("sleep 300 & sleep 300; wait", instance="node2", workdir=str(rig.host("node2").home),
                          sync_code=False)
    assert run.state == "running"
    t = await ws.transport("node2")
    assert int((await t.run(f"ps -o pid= -g {run.pid} | wc -l")).text()) >= 4  # wrapper, sh, 2× sleep (+ env probe)
    ws.config.values["jobs"]["cancel_grace_seconds"] = 2.0
    done = await ws.cancel(run.id)
    assert done.state == "cancelled"
    left = (await t.run(f"ps -o pid=,stat= -g {run.pid} | grep -v ' Z' || true")).text().strip()
    assert left == ""


@pytest.mark.parametrize("command, state, code, needle", [
    ("exit 1", "failed", 1, None),
    ("no-such-command-xyz", "failed", 127, "not found"),
    ("printf 'ok\\n\\377\\376 not utf-8\\n'", "succeeded", 0, "not utf-8"),
    ("head -c 10000000 /dev/zero | tr '\\0' x; echo", "succeeded", 0, None),
])
async def test_bad_jobs_on_a_node(ws, rig, tmp_path, command, state, code, needle) -> None:
    run = await ws.launch(command, instance="node1", workdir=str(rig.host("node1").home), sync_code=False)
    done = await wait_final(ws, run.id)
    assert (done.state, done.exit_code) == (state, code)
    if needle:
        assert needle in done.last_line
    await ws.follower.catch_up(done)
    assert ws.follower.local_path(done).stat().st_size == (0 if command == "exit 1" else
                                                          (await (await ws.transport("node1")).read_file(f"{done.run_dir}/output.log", 0, 0)).size)


async def test_changed_host_key_is_refused_with_both_fingerprints(home, fresh_rig) -> None:
    rig = fresh_rig
    ws = make_ws(home, rig)
    assert {i.name: i.state for i in (await ws.list_instances()).instances}["node2"] == "running"
    await ws.close()
    node = rig.host("node2")
    old_fp = node.host_key_fingerprint()
    new_fp = node.regenerate_host_key()
    ws = make_ws(home, rig)
    try:
        inst = {i.name: i for i in (await ws.list_instances()).instances}["node2"]
        assert inst.state == "unreachable"
        assert "CHANGED" in inst.note and old_fp in inst.note and new_fp in inst.note
        assert str(ws.config.paths.data_dir / "known_hosts") in inst.note  # says what to do
        with pytest.raises(LabdeckError, match="CHANGED"):
            await (await ws.transport("node2")).run("true")
    finally:
        await ws.close()


async def test_strict_policy_refuses_unknown_hosts(home, fresh_rig) -> None:
    ws = make_ws(home, fresh_rig, policy="strict")
    try:
        inst = {i.name: i for i in (await ws.list_instances()).instances}["node1"]
        assert inst.state == "unreachable" and "unknown" in inst.note and "strict" in inst.note
    finally:
        await ws.close()


async def test_a_down_host_does_not_block_the_others(ws, rig) -> None:
    await ws.list_instances()
    rig.host("node2").stop_sshd(kill_sessions=True)
    t0 = time.monotonic()
    listing = await ws.list_instances()
    elapsed = time.monotonic() - t0
    states = {i.name: i.state for i in listing.instances}
    assert states["node1"] == "running" and states["node2"] == "unreachable"
    assert elapsed < 4.0
    note = next(i.note for i in listing.instances if i.name == "node2")
    assert "node2" in note
    # while it is down, asking again answers at once from the backoff
    t0 = time.monotonic()
    await ws.list_instances()
    assert time.monotonic() - t0 < 4.0


async def test_provider_refuses_lifecycle_calls(ws) -> None:
    p = ws.providers["lab"]
    for call in (p.start("node1"), p.stop("node1"), p.destroy("node1")):
        with pytest.raises(ProviderError, match="own machines"):
            await call


# ---- faults: the job goes on, the followed log is complete with no duplicate --------------

WRITER = "import time\nfor i in range({n}):\n    print(f'line {{i}}', flush=True)\n    time.sleep({pause})\n"


def check_log(path: Path, n: int) -> None:
    lines = path.read_text().splitlines()
    assert lines == [f"line {i}" for i in range(n)], (len(lines), lines[:3], lines[-3:])


async def start_writer(ws, rig, tmp_path, n: int, pause: float):
    (tmp_path / "w").mkdir(exist_ok=True)
    (tmp_path / "w" / "writer.py").write_text(WRITER.format(n=n, pause=pause))
    return await ws.launch(f"{rig.python} writer.py", instance="node1", workdir=str(tmp_path / "w"))


async def test_link_to_the_jump_host_down_for_10s(ws, rig, tmp_path) -> None:
    n = 100_000
    run = await start_writer(ws, rig, tmp_path, n, 0.00015)
    seen: list[float] = []
    first = asyncio.Event()

    def on_data(r, k) -> None:
        seen.append(time.monotonic())
        first.set()

    task = ws.follower.start(run, on_data)
    await asyncio.wait_for(first.wait(), 30)  # the follower has data before the fault (not: 1.5 s have passed)
    rig.link_down()
    await asyncio.sleep(10)
    rig.link_up()
    back = time.monotonic()
    done = await asyncio.wait_for(task, 120)
    resumed = min(t for t in seen if t > back)
    assert resumed - back <= 2.0, f"reconnected {resumed - back:.2f}s after the link came back"
    assert done.state == "succeeded"
    check_log(ws.follower.local_path(done), n)


async def test_sshd_restarted_mid_job(ws, rig, tmp_path) -> None:
    n = 20_000
    run = await start_writer(ws, rig, tmp_path, n, 0.0002)
    first = asyncio.Event()
    task = ws.follower.start(run, lambda r, k: first.set())
    await asyncio.wait_for(first.wait(), 30)  # connected and following (not: 1 s has passed)
    node = rig.host("node1")
    node.restart_sshd()
    assert node.drop_ssh_sessions() >= 1  # labdeck's connection drops; the job runs on
    done = await asyncio.wait_for(task, 90)
    assert done.state == "succeeded"
    check_log(ws.follower.local_path(done), n)


async def test_labdeck_killed_and_started_again_mid_job(home, fresh_rig, tmp_path) -> None:
    rig = fresh_rig
    ws = make_ws(home, rig)
    n = 30_000
    run = await start_writer(ws, rig, tmp_path, n, 0.0002)
    await ws.close()
    env = {**os.environ, "LABDECK_HOME": str(home)}
    proc = subprocess.Popen([sys.executable, "-m", "tui.cli", "logs", run.id, "-f"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    local = ws.follower.local_path(run)
    try:
        for _ in range(150):  # until it has followed part of the log
            if local.exists() and local.stat().st_size > 1000:
                break
            await asyncio.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)  # labdeck dies mid-job, mid-follow
        proc.wait()
    assert ws.store.find_run(run.id).state == "running"  # the job did not notice
    ws2 = make_ws(home, rig)  # "started again": a new process's view
    try:
        partial = ws2.follower.offset(ws2.store.find_run(run.id))
        assert partial > 0
        done = await asyncio.wait_for(ws2.follower.follow(run.id), 90)  # re-attach from the stored offset
        assert done.state == "succeeded"
        check_log(ws2.follower.local_path(done), n)
    finally:
        await ws2.close()


async def test_a_forward_heals_after_the_link_comes_back(ws, rig) -> None:
    """The link to the jump host down for 10 s: the same forward works again within 2 s after."""
    import urllib.error

    t = await ws.transport("node1")
    node = rig.host("node1")
    pid = await t.start_detached(f"{rig.python} -m http.server 18766 --bind 127.0.0.1", cwd=str(node.home))
    fwd = None
    try:
        for _ in range(50):
            if (await t.run("python3 -c \"import socket; socket.create_connection(('127.0.0.1', 18766), 1)\"")).ok:
                break
            await asyncio.sleep(0.1)
        fwd = await t.forward_port(18766)
        url = f"http://127.0.0.1:{fwd.local_port}/"

        def get() -> bool:
            try:
                return b"Directory listing" in urllib.request.urlopen(url, timeout=1.5).read()
            except (OSError, urllib.error.URLError):
                return False

        assert await asyncio.to_thread(get)
        rig.link_down()
        await asyncio.sleep(10)
        rig.link_up()
        back = time.monotonic()
        while not await asyncio.to_thread(get):
            assert time.monotonic() - back < 10, "the forward never came back"
            await asyncio.sleep(0.1)
        assert time.monotonic() - back <= 2.0, f"the forward came back {time.monotonic() - back:.2f}s after the link"
    finally:
        if fwd:
            await fwd.close()
        await (await ws.transport("node1")).run(f"kill -TERM -{pid}")


def rig_ssh_config(rig, d: Path) -> Path:
    """A user's ~/.ssh/config for the rig: the jump host in an Included snippet, node1 behind a
    ProxyCommand (``ssh -W %h:%p bastion``, OpenSSH's own client as the pipe), node2 behind ProxyJump."""
    (d / "jump.d").mkdir(parents=True)
    cfg = d / "config"
    (d / "jump.d" / "bastion.conf").write_text(
        f"Host bastion\n  HostName {rig.jump.addr}\n  Port = {rig.jump.port}\n  User {rig.jump.user} # ops\n")
    n1, n2 = rig.nodes[:2]
    cfg.write_text(
        f"Include {d}/jump.d/*.conf\n\n"
        f"Host gpu-a\n  HostName {n1.addr}\n  User {n1.user}\n  Port {n1.port}\n"
        f"  ProxyCommand ssh -F {cfg} -W %h:%p bastion\n\n"
        f"Host gpu-b\n  HostName {n2.addr}\n  User {n2.user}\n  Port {n2.port}\n  ProxyJump bastion\n\n"
        f"Host *\n  IdentityFile {rig.client_key}\n  IdentitiesOnly yes\n  UserKnownHostsFile {d}/known_hosts\n"
        f"  GlobalKnownHostsFile /dev/null\n  StrictHostKeyChecking accept-new\n  BatchMode yes\n  ConnectTimeout 5\n")
    return cfg


async def test_proxycommand_and_an_included_jump_host(home, fresh_rig, tmp_path) -> None:
    """labdeck hosts named by ssh_config aliases (``host = "gpu-a"``): one reached through a ProxyCommand
    running OpenSSH's ``ssh -W``, one through a jump host defined in an Included file."""
    rig = fresh_rig
    cfg = rig_ssh_config(rig, tmp_path / "dot-ssh")
    (home / "config.toml").write_text(
        f'[providers.lab]\ntype = "ssh"\nssh_config = "{cfg}"\nconnect_timeout = 5\n\n'
        f'[providers.lab.hosts.a]\nhost = "gpu-a"\n\n[providers.lab.hosts.b]\nhost = "gpu-b"\n')
    ws = Workstation(load_config(Paths.resolve(home)))
    n1, n2 = rig.nodes[:2]
    try:
        specs = ws.providers["lab"].specs
        assert specs["a"].proxy_command == f"ssh -F {cfg} -W {n1.addr}:{n1.port} bastion"
        assert specs["a"].jump == ()
        assert [(j.hostname, j.user) for j in specs["b"].jump] == [(rig.jump.addr, rig.jump.user)]
        assert dict(specs["b"].jump[0].origin)["hostname"] == f"{tmp_path / 'dot-ssh' / 'jump.d' / 'bastion.conf'}:2"
        for name, node in (("a", n1), ("b", n2)):
            t = await ws.transport(name)
            res = await t.run("id -un; hostname -I")
            assert res.exit_code == 0, res.stderr
            assert res.stdout.decode().split()[0] == node.user
        # (the nodes have no route from here but through the jump host: a direct connect could not have worked)
    finally:
        await ws.close()


async def test_reads_past_the_end_and_cancelled_reads_leave_no_request_behind(ws, rig, monkeypatch) -> None:
    """read_file asks in blocks (several windows of them for a large range) and returns the file's
    bytes, however far past its end the range goes. A read cancelled while its requests are in flight
    (a follower stopped at exit) leaves none running on its own: asyncssh's parallel reader did, and
    each one's SFTPEOFError was logged as "Task exception was never retrieved" (CI)."""
    import gc

    import asyncssh

    t = await ws.transport("node1")
    node = rig.host("node1")
    target = f"{node.home}/big.bin"
    content = os.urandom(5 << 20)  # more blocks than one window holds
    await t.put_files({target: content}, mode=0o600)
    whole = await t.read_file(target, 0, 8 << 20)
    assert (whole.data == content, whole.size, whole.next_offset) == (True, len(content), len(content))
    tail = await t.read_file(target, len(content) - 100, 8 << 20)
    assert tail.data == content[-100:]
    assert (await t.read_file(target, len(content) + 10, 1 << 20)).data == b""

    loop = asyncio.get_running_loop()
    unretrieved: list[dict] = []
    loop.set_exception_handler(lambda _loop, ctx: unretrieved.append(ctx))
    gate, started, in_flight = asyncio.Event(), asyncio.Event(), [0]
    real_read = asyncssh.sftp.SFTPClientHandler.read

    async def held_read(self, handle, offset, length):  # the server's answer comes after the cancel
        in_flight[0] += 1
        started.set()
        try:
            await gate.wait()
            return await real_read(self, handle, offset, length)
        finally:
            in_flight[0] -= 1

    monkeypatch.setattr(asyncssh.sftp.SFTPClientHandler, "read", held_read)
    try:
        reading = asyncio.ensure_future(t.read_file(target, len(content) + 10, 4 << 20))  # all past the end
        await asyncio.wait_for(started.wait(), 60)
        reading.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reading
        gate.set()
        deadline = time.monotonic() + 60
        while in_flight[0] and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert in_flight[0] == 0
        del reading
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    assert not unretrieved, [c.get("message") for c in unretrieved]
    monkeypatch.undo()
    assert (await t.read_file(target, 0, 10)).data == content[:10]  # the session still serves reads
