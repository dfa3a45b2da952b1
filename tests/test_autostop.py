"""Autostop on the instance: the daemon decides by itself (labdeck closed) that node1 is idle and fires.

The rig tests run the real script (stdlib only, under the node user's system Python) on rig node1
through the jump host, with a 3-second idle window and a command that appends to a marker file in
the node user's home instead of shutting the machine down. GPUs are faked only at the driver
boundary (``fake:FILE``); Jupyter is faked only as an HTTP server answering ``/api/status``.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import ClassVar

import pytest

from backends import autostop
from backends.runtime import autostop as daemon

from . import rig as rigmod
from .conftest import node_host_id, until
from .test_ssh import make_ws

WINDOW_MIN = 0.05  # 3 s
WINDOW = WINDOW_MIN * 60
INTERVAL = 0.3


# ---- helpers -----------------------------------------------------------------------

def _dir(node) -> Path:
    """The node's autostop directory: ``~/.labdeck/autostop/<host id>`` (the id as the node works it out)."""
    return node.home / ".labdeck" / "autostop" / node_host_id(node)


def _state(node) -> dict | None:
    try:
        s = json.loads((_dir(node) / "state.json").read_text())
    except (OSError, ValueError):
        return None
    return s if isinstance(s, dict) else None


def _marker(node) -> Path:
    return node.home / "autostop-fired"


def _marker_command(node) -> list[str]:
    return ["sh", "-c", f"date +%s >> {_marker(node)}"]


def _daemons(uid: int) -> list[int]:
    """Live autostop processes of ``uid``."""
    out = []
    for e in os.listdir("/proc"):
        if not e.isdigit():
            continue
        try:
            if os.stat(f"/proc/{e}").st_uid != uid:
                continue
            with open(f"/proc/{e}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{e}/stat") as f:
                st = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if b"autostop.py" in cmd and st != "Z":
            out.append(int(e))
    return out


async def _ensure(ws, rig, node, **kw):
    t = await ws.transport(node.name)
    args = dict(idle_minutes=WINDOW_MIN, interval=INTERVAL, command=_marker_command(node), gpu_source="none",
                python=rig.python)
    args.update(kw)
    return t, await autostop.ensure(t, **args)


# ---- on the rig --------------------------------------------------------------------

async def test_idle_instance_fires_once_after_the_window_with_labdeck_closed(home, fresh_rig) -> None:
    rig, node = fresh_rig, fresh_rig.host("node1")
    ws = make_ws(home, rig)
    t0 = time.monotonic()
    _, st = await _ensure(ws, rig, node)
    assert st["pid"] and st["enabled"] is True and st["action"] == "stop"
    assert "starting" not in st and st["version"] == autostop.SCRIPT_VERSION  # the daemon's own first state
    await ws.close()  # labdeck's side is gone from here on

    await asyncio.sleep(WINDOW / 2)
    s = _state(node)
    assert not _marker(node).exists()
    assert s["busy"] == [] and s["deadline"] and s["fired_at"] is None and s["forward_check"] == "none"
    assert autostop.countdown(s).startswith("stops in ")
    await until(_marker(node).exists, 10, "the command to fire")
    assert time.monotonic() - t0 >= WINDOW - 0.2  # not before the window
    await asyncio.sleep(5 * INTERVAL)  # several more idle loops: it fired once
    assert len(_marker(node).read_text().split()) == 1
    s = _state(node)
    assert s["fired_at"] and s["error"] is None and autostop.countdown(s) == "stopping…"
    assert "firing stop" in (_dir(node) / "autostop.log").read_text()

    ws2 = make_ws(home, rig)  # a fresh connection reads the same state back
    try:
        s2 = await autostop.read_state(await ws2.transport("node1"))
        assert s2["pid"] == st["pid"] and s2["fired_at"] == s["fired_at"]
    finally:
        await ws2.close()


async def test_a_running_job_keeps_it_busy_until_it_ends(home, fresh_rig) -> None:
    rig, node = fresh_rig, fresh_rig.host("node1")
    ws = make_ws(home, rig)
    run = await ws.launch("sleep 4", instance="node1", workdir=str(node.home), sync_code=False)
    t0 = time.monotonic()
    await _ensure(ws, rig, node)
    await ws.close()

    s = await until(lambda: (x := _state(node)) and f"job {run.id}" in x["busy"] and x, 5, "the job to show as busy")
    assert s["deadline"] is None and autostop.countdown(s) == f"busy: job {run.id}"
    await asyncio.sleep(max(0.0, WINDOW + 0.5 - (time.monotonic() - t0)))
    assert not _marker(node).exists(), "fired while the job was running"
    assert f"job {run.id}" in _state(node)["busy"]
    await until(lambda: (x := _state(node)) and not x["busy"], 6, "the job to end")
    t_idle = time.monotonic()
    await until(_marker(node).exists, 10, "the command to fire after the job")
    assert time.monotonic() - t_idle >= WINDOW - 0.5
    assert (node.home / ".labdeck" / "runs" / run.id / "exit_code").read_text().strip() == "0"


SERVER = ("import socket, threading\n"
          "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
          "s.bind(('127.0.0.1', {port})); s.listen(8)\n"
          "def serve(c):\n"
          "    c.sendall(b'hi')\n"
          "    while c.recv(1024): pass\n"
          "    c.close()\n"
          "while True:\n"
          "    c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()\n")


async def test_a_port_forward_in_use_keeps_it_busy(home, fresh_rig) -> None:
    rig, node = fresh_rig, fresh_rig.host("node1")
    port = 18765
    ws = make_ws(home, rig)
    fwd = writer = None
    try:
        t = await ws.transport("node1")
        await t.put_files({f"{node.home}/srv.py": SERVER.replace("{port}", str(port)).encode()})
        await t.start_detached(f"exec {rig.python} srv.py", cwd=str(node.home), log_path=f"{node.home}/srv.log")
        fwd = await t.forward_port(port)

        async def connect():
            for _ in range(50):
                r, w = await asyncio.open_connection("127.0.0.1", fwd.local_port)
                try:
                    if await asyncio.wait_for(r.readexactly(2), 2) == b"hi":
                        return r, w
                except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
                    pass
                w.close()
                await asyncio.sleep(0.1)
            raise AssertionError("the node's server never answered through the forward")

        _, writer = await connect()  # held open across the whole window
        t0 = time.monotonic()
        await _ensure(ws, rig, node)
        s = await until(lambda: (x := _state(node)) and x["busy"] and x, 5, "the forward to show as busy")
        assert s["busy"] == [f"forward :{port}"], s["busy"]
        # the node user cannot read its own sshd's fds (privileges dropped: not dumpable), so the daemon
        # matched the socket's uid; root reads them and maps the socket to the sshd process exactly
        assert s["forward_check"] == "by-uid"
        probe = "import sys; sys.path.insert(0, sys.argv[1]); import autostop; print(autostop.forward_activity())"
        res = rigmod.sh([rig.python, "-c", probe, str(_dir(node))], ns=node.ns)
        assert res.stdout.strip() == str(([f"forward :{port}"], "exact"))
        await asyncio.sleep(max(0.0, WINDOW + 1.0 - (time.monotonic() - t0)))
        assert not _marker(node).exists(), "fired while a forward was in use"
        assert _state(node)["busy"] == [f"forward :{port}"]
        # the connection ends; labdeck's own SSH session stays connected, and does not count
        writer.close()
        writer = None
        await until(lambda: (x := _state(node)) and not x["busy"], 5, "the forward to go quiet")
        t_idle = time.monotonic()
        await until(_marker(node).exists, 10, "the command to fire after the forward closed")
        assert time.monotonic() - t_idle >= WINDOW - 0.5
        assert "forward" in (_dir(node) / "autostop.log").read_text()
    finally:
        if writer is not None:
            writer.close()
        if fwd is not None:
            await fwd.close()
        await ws.close()


async def test_gpu_utilization_over_the_threshold_keeps_it_busy(home, fresh_rig) -> None:
    rig, node = fresh_rig, fresh_rig.host("node1")
    fake = node.home / "fake-gpus.txt"
    ws = make_ws(home, rig)
    t, _ = await _ensure(ws, rig, node, gpu_source=f"fake:{fake}", command=_marker_command(node))
    await t.put_files({str(fake): b"2\n37\n"})
    t0 = time.monotonic()
    await ws.close()

    s = await until(lambda: (x := _state(node)) and x["busy"] and x, 5, "the GPU to show as busy")
    assert s["busy"] == ["gpu 1: 37%"] and autostop.countdown(s) == "busy: gpu 1: 37%"
    await asyncio.sleep(max(0.0, WINDOW + 0.5 - (time.monotonic() - t0)))
    assert not _marker(node).exists(), "fired while a GPU was busy"
    tmp = fake.with_suffix(".tmp")
    tmp.write_text("2\n3\n")
    tmp.replace(fake)
    await until(lambda: (x := _state(node)) and not x["busy"], 5, "the GPUs to go idle")
    t_idle = time.monotonic()
    await until(_marker(node).exists, 10, "the command to fire with idle GPUs")
    assert time.monotonic() - t_idle >= WINDOW - 0.5


async def test_garbage_state_single_daemon_disable_and_exit(home, fresh_rig) -> None:
    rig, node = fresh_rig, fresh_rig.host("node1")
    ws = make_ws(home, rig)
    try:
        t, st = await _ensure(ws, rig, node)
        pid = st["pid"]
        assert _daemons(node.uid) == [pid]
        # garbage in state.json (the daemon held still, so it cannot rewrite it under us)
        os.kill(pid, 19)  # SIGSTOP
        try:
            (_dir(node) / "state.json").write_text("{not json")
            assert await autostop.read_state(t) is None
            (_dir(node) / "state.json").write_text("[1, 2]")
            assert await autostop.read_state(t) is None
        finally:
            os.kill(pid, 18)  # SIGCONT
        st2 = await autostop.ensure(t, idle_minutes=WINDOW_MIN, interval=INTERVAL, command=_marker_command(node),
                                    gpu_source="none", python=rig.python)
        assert st2["pid"] == pid and _daemons(node.uid) == [pid]
        # a second start by hand exits at once (the lock), leaving the one daemon
        rel = _dir(node).relative_to(node.home)
        res = node.run_as_user(f"{rig.python} {rel}/autostop.py --dir {rel}; echo rc=$?")
        assert "rc=0" in res.stdout and _daemons(node.uid) == [pid]
        # another script version running: ensure() replaces it, still one daemon
        (_dir(node) / "daemon.version").write_text("0ld\n")
        st3 = await autostop.ensure(t, idle_minutes=WINDOW_MIN, interval=INTERVAL, command=_marker_command(node),
                                    gpu_source="none", python=rig.python)
        pid = st3["pid"]
        assert pid != st["pid"] and _daemons(node.uid) == [pid] and st3["version"] == autostop.SCRIPT_VERSION
        # off: says so, never fires
        await autostop.disable(t)
        s = await until(lambda: (x := _state(node)) and x["enabled"] is False and x, 3, "the daemon to turn off")
        assert autostop.countdown(s) == "off" and s["deadline"] is None
        await asyncio.sleep(WINDOW + 0.5)
        assert not _marker(node).exists() and _daemons(node.uid) == [pid]
        # config.json gone: the loop ends by itself and takes its state with it
        (_dir(node) / "config.json").unlink()
        await until(lambda: not _daemons(node.uid), 3, "the daemon to exit")
        assert await autostop.read_state(t) is None and autostop.countdown(None) == "off"
    finally:
        await ws.close()



async def test_a_daemon_of_the_layout_before_is_replaced_not_doubled(home, fresh_rig) -> None:
    """A daemon started by an older labdeck in ~/.labdeck/autostop (one directory for every host
    sharing the home) is stopped when this host's own is ensured: never two deciding at once."""
    rig, node = fresh_rig, fresh_rig.host("node1")
    ws = make_ws(home, rig)
    try:
        old = node.home / ".labdeck" / "autostop"
        old.mkdir(parents=True)
        (old / "autostop.py").write_bytes(autostop.SCRIPT_SOURCE)
        (old / "config.json").write_text(json.dumps({"idle_minutes": 60, "enabled": False, "interval": INTERVAL,
                                                     "runs_root": str(node.home / ".labdeck" / "runs"),
                                                     "gpu_source": "none", "command": ["true"]}))
        for p in (node.home / ".labdeck", old, old / "autostop.py", old / "config.json"):
            os.chown(p, node.uid, -1)
        node.run_as_user(f"setsid {rig.python} .labdeck/autostop/autostop.py --dir \"$HOME/.labdeck/autostop\" "
                         "</dev/null >/dev/null 2>&1 &", check=True)
        (old_pid,) = await until(lambda: _daemons(node.uid), 5, "the old-layout daemon")
        t, st = await _ensure(ws, rig, node)
        await until(lambda: _daemons(node.uid) == [st["pid"]], 5, "the old daemon to stop, leaving the new one")
        assert st["pid"] != old_pid and (_dir(node) / "config.json").exists()
    finally:
        await ws.close()


# ---- the daemon's parts, in this process -------------------------------------------

def test_countdown_texts() -> None:
    now = datetime(2025, 1, 1, 12, 0, 0, tzinfo=timezone.utc)

    def iso(dt):
        return dt.strftime("%Y-%m-%dT%H:%M:%SZ")

    base = {"enabled": True, "action": "stop", "interval": 30, "updated_at": iso(now), "busy": [],
            "deadline": iso(now + timedelta(minutes=12)), "fired_at": None, "error": None}
    assert autostop.countdown(base, now) == "stops in 12m"
    assert autostop.countdown({**base, "action": "terminate", "deadline": iso(now + timedelta(seconds=45))}, now) \
        == "terminates in 45s"
    assert autostop.countdown({**base, "deadline": iso(now + timedelta(minutes=75))}, now) == "stops in 1h15m"
    assert autostop.countdown({**base, "busy": ["job 01HX", "gpu 0: 37%"], "deadline": None}, now) == "busy: job 01HX (+1)"
    assert autostop.countdown({**base, "enabled": False}, now) == "off"
    assert autostop.countdown(None, now) == "off"
    assert autostop.countdown({**base, "fired_at": iso(now)}, now) == "stopping…"
    assert autostop.countdown({**base, "updated_at": iso(now - timedelta(seconds=91))}, now) == "stale"
    assert autostop.countdown({**base, "fired_at": iso(now), "error": "exit 1"}, now) == "stop failed, retry in 12m"
    assert autostop.countdown(base, now.timestamp()) == "stops in 12m"


def test_proc_net_tcp_rows_and_loopback() -> None:
    v4 = ("  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
          "   3: 0100007F:87BE 0100007F:46A0 01 00000000:00000000 00:00000000 00000000  1002        0 826777 1\n")
    (r,) = daemon.parse_proc_net_tcp(v4)
    assert (r["local"], r["lport"], r["remote"], r["rport"], r["state"], r["uid"], r["inode"]) == \
        ("127.0.0.1", 34750, "127.0.0.1", 18080, "01", 1002, 826777)
    v6 = ("  sl  local_address                         remote_address                        st tx rx tr tm retr uid to inode\n"
          "   0: 00000000000000000000000001000000:1F90 00000000000000000000000001000000:9C40 01 0:0 0:0 0 0 0 1000 0 4242 1\n"
          "   1: 0000000000000000FFFF00000100007F:1F90 0000000000000000FFFF00000100007F:9C40 01 0:0 0:0 0 0 0 1000 0 4243 1\n")
    a, b = daemon.parse_proc_net_tcp(v6, v6=True)
    assert a["local"] == "::1" and a["lport"] == 8080 and daemon.is_loopback(a["remote"])
    assert b["local"] == "::ffff:127.0.0.1" and daemon.is_loopback(b["local"]) and not daemon.is_loopback("10.0.0.5")


def test_job_dirs_tickets_and_reused_pids(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    run = root / "01JOB"
    run.mkdir(parents=True)
    (run / "pid").write_text(str(os.getpid()))
    (run / "started_at").write_text("x")
    assert daemon.job_activity([str(root)]) == (["job 01JOB"], {})
    os.utime(run / "pid", (time.time() - 86400, time.time() - 86400))  # our pid, but a process from "before a reboot"
    assert daemon.job_activity([str(root)]) == ([], {})
    os.utime(run / "pid")
    (root / ".queue-notebook").mkdir()
    (root / ".queue-notebook" / "01JOB").write_text(str(os.getpid()))
    assert daemon.job_activity([str(root)]) == ([], {os.getpid(): "01JOB"})  # a notebook: Jupyter decides
    (root / ".queue-notebook" / "01JOB").unlink()
    (run / "exit_code").write_text("0")
    (root / ".queue").mkdir()
    (root / ".queue" / "01WAIT").write_text(str(os.getpid()))
    assert daemon.job_activity([str(root)]) == (["job 01WAIT (queued)"], {})


def test_only_this_hosts_runs_and_tickets_count_in_a_shared_home(tmp_path: Path) -> None:
    """A home several hosts share: run directories and per-host queues of other hosts (or of an
    earlier boot) keep nothing busy, even with a pid that is alive here."""
    me, boot, other = "0123456789abcdef", "boot-1", "fedcba9876543210"
    root = tmp_path / "runs"
    mine, theirs, old = root / "01MINE", root / "01THEIRS", root / "01OLD"
    for d in (mine, theirs, old):
        d.mkdir(parents=True)
        (d / "pid").write_text(str(os.getpid()))
        (d / "started_at").write_text("x")
    (mine / "host").write_text(f"{me} {boot}\n")
    (theirs / "host").write_text(f"{other} {boot}\n")
    # (01OLD: no host file, a run from before per-host state: its pid alone, as before)
    assert daemon.job_activity([str(root)], me, boot) == (["job 01MINE", "job 01OLD"], {})
    assert daemon.job_activity([str(root)], me, "boot-2") == (["job 01OLD"], {})  # after a reboot
    assert daemon.job_activity([str(root)]) == (["job 01MINE", "job 01OLD", "job 01THEIRS"], {})  # an old config
    for d in (mine, theirs, old):
        (d / "exit_code").write_text("0")
    q_me, q_other = root / ".hosts" / me, root / ".hosts" / other
    for q in (q_me, q_other):
        (q / "queue").mkdir(parents=True)
        (q / "queue-notebook").mkdir()
    (q_me / "queue" / "01WAIT").write_text(f"{os.getpid()} {me} {boot}\n")
    (q_me / "queue" / "01ELSE").write_text(f"{os.getpid()} {other} {boot}\n")  # in my queue, but not mine
    (q_other / "queue" / "01THEIRQ").write_text(f"{os.getpid()} {other} {boot}\n")
    nb = root / "01NB"
    nb.mkdir()
    (nb / "pid").write_text(str(os.getpid()))
    (nb / "host").write_text(f"{me} {boot}\n")
    (q_me / "queue-notebook" / "01NB").write_text(f"{os.getpid()} {me} {boot}\n")
    assert daemon.job_activity([str(root)], me, boot) == (["job 01WAIT (queued)"], {os.getpid(): "01NB"})


class _FakeJupyter(http.server.BaseHTTPRequestHandler):
    last_activity = ""
    kernels: ClassVar[list] = []

    def do_GET(self):
        if self.headers.get("Authorization") != "token tok":
            self.send_response(403)
            self.end_headers()
            return
        body = {"/api/status": {"last_activity": self.last_activity, "kernels": len(self.kernels), "connections": 0},
                "/api/kernels": self.kernels}.get(self.path.split("?")[0])
        self.send_response(200 if body is not None else 404)
        self.end_headers()
        self.wfile.write(json.dumps(body).encode())

    def log_message(self, *a):
        pass


@pytest.fixture
def quiet_host(monkeypatch, tmp_path):
    """The daemon's parts run in this process: keep this machine's own Jupyter servers and SSH forwards out."""
    monkeypatch.delenv("JUPYTER_RUNTIME_DIR", raising=False)
    monkeypatch.delenv("JUPYTER_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(daemon.Autostop, "forward_probe", staticmethod(lambda: ([], "none")))


def test_notebook_activity_from_jupyter_status(tmp_path: Path, quiet_host) -> None:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeJupyter)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        port = srv.server_address[1]
        rt = tmp_path / "runtime"
        rt.mkdir()
        (rt / f"jpserver-{os.getpid()}.json").write_text(json.dumps(
            {"pid": os.getpid(), "port": port, "url": f"http://127.0.0.1:{port}/", "token": "tok", "base_url": "/"}))
        (rt / "jpserver-1.json").write_text("{garbage")
        d = tmp_path / "as"
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"idle_minutes": 10, "interval": 1, "gpu_source": "none",
                                                   "runs_root": str(tmp_path / "none"), "jupyter_runtime_dirs": [str(rt)]}))
        a = daemon.Autostop(str(d))
        _FakeJupyter.last_activity = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        assert a.step() and f"notebook :{port}" in _state_at(d)["busy"]
        _FakeJupyter.last_activity = "2020-01-01T00:00:00.123Z"
        assert a.step() and not any(b.startswith("notebook") for b in _state_at(d)["busy"])
        _FakeJupyter.kernels = [{"id": "k", "execution_state": "busy"}]
        assert a.step() and f"notebook :{port}" in _state_at(d)["busy"]
    finally:
        _FakeJupyter.kernels = []
        srv.shutdown()


def _state_at(d: Path) -> dict:
    return json.loads((d / "state.json").read_text())


def test_failed_command_is_retried_after_a_full_window_not_in_a_loop(tmp_path: Path, quiet_host) -> None:
    d = tmp_path / "as"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"idle_minutes": 0.01, "interval": 0.1, "gpu_source": "none",
                                               "runs_root": str(tmp_path / "none"), "jupyter_runtime_dirs": [],
                                               "command": ["sh", "-c", f"echo no >> {tmp_path}/tries; echo nope; exit 3"]}))
    a = daemon.Autostop(str(d))
    t0 = time.monotonic()
    while time.monotonic() - t0 < 1.5:
        a.step()
        time.sleep(0.05)
    tries = (tmp_path / "tries").read_text().split()
    assert 1 <= len(tries) <= 3  # a 0.6 s window in 1.5 s: at most one retry per window
    s = _state_at(d)
    assert s["fired_at"] and s["error"].startswith("exit 3") and "nope" in s["error"]
    assert autostop.countdown(s).startswith("stop failed, retry in")
    assert "command failed (exit 3)" in (d / "autostop.log").read_text()


def test_a_check_that_fails_counts_as_busy(tmp_path: Path, quiet_host, monkeypatch) -> None:
    def broken():
        raise RuntimeError("no /proc")

    monkeypatch.setattr(daemon.Autostop, "forward_probe", staticmethod(broken))
    d = tmp_path / "as"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"idle_minutes": 0.001, "interval": 0.1, "gpu_source": "none",
                                               "runs_root": str(tmp_path / "none"),
                                               "command": ["sh", "-c", f"touch {tmp_path}/fired"]}))
    a = daemon.Autostop(str(d))
    for _ in range(3):
        assert a.step()
        time.sleep(0.1)
    s = _state_at(d)
    assert s["busy"] == ["unknown: forward check failed (RuntimeError)"] and s["forward_check"] == "failed"
    assert not (tmp_path / "fired").exists() and "no /proc" in (d / "autostop.log").read_text()
