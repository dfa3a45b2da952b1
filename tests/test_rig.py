"""The SSH test rig itself: topology, isolation, faults, host keys, and the in-process server."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import subprocess
import time

import asyncssh
import pytest

from tests import rig as rigmod


# ---- the namespace rig (real OpenSSH) ----------------------------------------------


def test_nodes_reachable_only_through_the_jump_host(rig):
    for h in rig.hosts:
        p = rig.ssh(h.name, "echo ok; id -un; echo $HOME")
        assert p.returncode == 0, p.stderr
        assert p.stdout.split("\n")[:3] == ["ok", h.user, str(h.home)]
    assert len({h.home for h in rig.hosts}) == len(rig.hosts)


def test_node_python_runs_for_node_users(rig):
    p = rig.ssh("node1", f"{rig.python} -c 'import sys, os; print(sys.version_info[0], os.getuid())'")
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["3", str(rig.nodes[0].uid)]


def test_no_direct_route_from_root_to_nodes(rig):
    for node in rig.nodes:
        # the covering unreachable route answers at once; nothing leaves via the default route
        route = subprocess.run(["ip", "route", "get", node.addr], capture_output=True, text=True)
        assert route.returncode != 0 or "unreachable" in route.stdout, route.stdout
        t0 = time.monotonic()
        with pytest.raises(OSError):
            socket.create_connection((node.addr, 22), timeout=1).close()
        assert time.monotonic() - t0 < 1.5


def test_jump_host_does_not_forward(rig):
    """Even with a route from root to node1 via the jump host, packets go nowhere."""
    node = rig.nodes[0]
    assert rigmod.sh(["cat", "/proc/sys/net/ipv4/ip_forward"], ns=rig.jump.ns).stdout.strip() == "0"
    subprocess.run(["ip", "route", "add", f"{node.addr}/32", "via", rig.jump.addr, "dev", rig.root_if], check=True)
    try:
        with pytest.raises(OSError):
            socket.create_connection((node.addr, 22), timeout=1).close()
    finally:
        subprocess.run(["ip", "route", "del", f"{node.addr}/32"], check=True)


def test_link_down_and_up(rig):
    assert rig.ssh("jump", "true").returncode == 0
    rig.link_down()
    try:
        t0 = time.monotonic()
        p = rig.ssh("jump", "true", "-o", "ConnectTimeout=2")
        assert p.returncode != 0
        assert time.monotonic() - t0 < 4
        p = rig.ssh("node1", "true", "-o", "ConnectTimeout=2")
        assert p.returncode != 0
    finally:
        rig.link_up()
    assert rig.ssh("jump", "true").returncode == 0
    assert rig.ssh("node1", "true").returncode == 0


def test_node_link_down_cuts_off_only_that_node(rig):
    node1 = rig.nodes[0]
    node1.link_down()
    try:
        assert rig.ssh("node1", "true", "-o", "ConnectTimeout=2").returncode != 0
        assert rig.ssh("node2", "true").returncode == 0
    finally:
        node1.link_up()
    assert rig.ssh("node1", "true").returncode == 0


def test_silent_partition_times_out(rig):
    rig.link_down(both_ends=False)
    try:
        t0 = time.monotonic()
        p = rig.ssh("jump", "true", "-o", "ConnectTimeout=1")
        took = time.monotonic() - t0
        assert p.returncode != 0
        assert 0.8 < took < 3, (took, p.stderr)  # it hung until the timeout rather than failing at once
    finally:
        rig.link_up()
    assert rig.ssh("jump", "true").returncode == 0


def test_regenerate_host_key(rig):
    node = rig.nodes[1]
    assert rig.ssh(node.name, "true").returncode == 0  # the client now knows the current key
    before = node.host_key_fingerprint()
    after = node.regenerate_host_key()
    assert after != before and after == node.host_key_fingerprint()
    p = rig.ssh(node.name, "true")
    assert p.returncode != 0 and "IDENTIFICATION HAS CHANGED" in p.stderr
    rig.reset_known_hosts()
    assert rig.ssh(node.name, "true").returncode == 0
    seen = [ln for ln in rig.known_hosts_path.read_text().splitlines() if ln.startswith(node.addr + " ")]
    assert [rigmod.fingerprint_of(ln.split(None, 1)[1]) for ln in seen] == [after]


def test_restart_and_stop_sshd(rig):
    node = rig.nodes[0]
    pid = node.sshd_pid
    node.restart_sshd()
    assert node.sshd_pid not in (None, pid)
    node.stop_sshd()
    try:
        assert node.sshd_pid is None
        assert rig.ssh(node.name, "true", "-o", "ConnectTimeout=2").returncode != 0
    finally:
        node.start_sshd()
    assert rig.ssh(node.name, "true").returncode == 0


def test_detached_jobs_on_nodes_are_reaped(rig):
    p = rig.ssh("node1", 'setsid sh -c "sleep 0.2" </dev/null >/dev/null 2>&1 & echo $!')
    pid = int(p.stdout)
    deadline = time.monotonic() + 3
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{pid}"), "the job exited but nobody reaped it"


ECHO_ONCE = (
    "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(1); "
    "print(s.getsockname()[1], flush=True); c, _ = s.accept(); c.sendall(c.recv(100)); c.close()"
)


async def test_asyncssh_through_jump_to_node_loopback(rig):
    """labdeck's way in: asyncssh to the jump host, tunnelled to a node, forwarding to the node's 127.0.0.1."""
    def kw(h):
        return {"host": h.addr, "username": h.user, "client_keys": [str(rig.client_key)], "agent_path": None,
                "known_hosts": asyncssh.import_known_hosts(rig.known_hosts_text())}

    async with asyncssh.connect(**kw(rig.jump)) as jump:
        async with asyncssh.connect(**kw(rig.nodes[0]), tunnel=jump) as node:
            proc = await node.create_process(f'{rig.python} -c "{ECHO_ONCE}"')
            port = int(await asyncio.wait_for(proc.stdout.readline(), 10))
            reader, writer = await node.open_connection("127.0.0.1", port)
            writer.write(b"hello")
            assert await asyncio.wait_for(reader.read(100), 10) == b"hello"
            writer.close()
            await proc.wait()


async def test_link_down_stalls_established_connections(rig):
    def kw(h):
        return {"host": h.addr, "username": h.user, "client_keys": [str(rig.client_key)], "agent_path": None,
                "known_hosts": asyncssh.import_known_hosts(rig.known_hosts_text())}

    async with asyncssh.connect(**kw(rig.jump)) as jump:
        async with asyncssh.connect(**kw(rig.nodes[0]), tunnel=jump) as node:
            assert (await node.run("echo before")).stdout == "before\n"
            rig.link_down()
            try:
                with pytest.raises(asyncio.TimeoutError):  # neither an answer nor an error: a stall
                    await asyncio.wait_for(node.run("true"), 1)
            finally:
                rig.link_up()
            assert (await asyncio.wait_for(node.run("echo after"), 10)).stdout == "after\n"


def test_teardown_and_stale_cleanup(ssh_client_key):
    r = rigmod.Rig.build(1, client_key=ssh_client_key)
    names = (r.netns, r.users, r.dir, r.root_if)
    r.close()
    assert not set(names[0]) & set(rigmod.list_netns())
    assert not {e[0] for e in rigmod._passwd_entries()} & set(names[1])
    assert not names[2].exists()
    assert subprocess.run(["ip", "link", "show", names[3]], capture_output=True).returncode != 0
    # a namespace left by a process that is gone
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = rigmod.live_rig_ids()
    free = next(h for h in (f"{i:04x}" for i in random.sample(range(rigmod.MAX_INDEX), 50)) if h not in live)
    ns = f"ld{free}-{dead.pid}-jump"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        removed = rigmod.cleanup_stale()
        assert any(f"ld{free}" in x for x in removed)
        assert ns not in rigmod.list_netns()
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


# ---- the in-process asyncssh server ---------------------------------------------------


async def test_ssh_server_exec(ssh_server):
    async with asyncssh.connect(**ssh_server.connect_kwargs()) as conn:
        r = await conn.run("echo hi")
        assert (r.stdout, r.exit_status) == ("hi\n", 0)
        r = await conn.run("exit 3")
        assert r.exit_status == 3
        r = await conn.run("cat; echo err >&2; pwd", input="in\n")
        assert r.stdout == f"in\n{ssh_server.home}\n" and r.stderr == "err\n"
    assert ssh_server.commands == ["echo hi", "exit 3", "cat; echo err >&2; pwd"]


async def test_ssh_server_sftp_and_forwarding(ssh_server):
    async def echo(reader, writer):
        writer.write(await reader.read(100))
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        async with asyncssh.connect(**ssh_server.connect_kwargs()) as conn:
            async with conn.start_sftp_client() as sftp:
                async with sftp.open("f.txt", "w") as f:
                    await f.write("data")
            assert (ssh_server.home / "f.txt").read_text() == "data"
            reader, writer = await conn.open_connection("127.0.0.1", port)
            writer.write(b"ping")
            assert await reader.read(100) == b"ping"
            writer.close()
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.open_connection("198.51.100.1", 22)  # refused by the server, never dialled
    finally:
        srv.close()
        await srv.wait_closed()


def test_ssh_server_with_openssh_client(ssh_server):
    p = subprocess.run(["ssh", "-F", str(ssh_server.ssh_config_path), "local", "echo hi; exit 3"],
                       capture_output=True, text=True, timeout=20)
    assert (p.stdout, p.returncode) == ("hi\n", 3), p.stderr
