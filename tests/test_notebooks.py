"""Cloud notebooks with a real jupyter-server: through the forward with the token, 403 without,
a kernel runs print(6*7) through the forward, tracked as a run, stop leaves no process."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from backends import notebooks, serving
from backends.errors import LabdeckError
from backends.workstation import Workstation

from .conftest import group_gone

pytest.importorskip("jupyter_server")
pytest.importorskip("ipykernel")


async def run_in_kernel(url: str, token: str, code: str) -> str:
    import websockets

    def post(path: str) -> dict:
        req = urllib.request.Request(f"{url}{path}", data=b"{}", method="POST",
                                     headers={"Authorization": f"token {token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    kernel = await asyncio.to_thread(post, "/api/kernels")
    ws_url = url.replace("http://", "ws://") + f"/api/kernels/{kernel['id']}/channels?token={token}"
    session = uuid.uuid4().hex
    msg_id = uuid.uuid4().hex
    msg = {"header": {"msg_id": msg_id, "username": "test", "session": session, "msg_type": "execute_request",
                      "version": "5.3", "date": ""},
           "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
           "content": {"code": code, "silent": False, "store_history": False, "user_expressions": {},
                       "allow_stdin": False, "stop_on_error": True}}
    # The output is complete when the kernel says it is idle again for this request (iopub), and the
    # request has its execute_reply (shell). The two channels are not ordered with each other: under
    # load the reply can come before the stream output, so the reply alone is not the end.
    out = []
    replied = idle = False
    async with websockets.connect(ws_url, max_size=None) as sock:
        await sock.send(json.dumps(msg))
        async with asyncio.timeout(60):
            while not (replied and idle):
                reply = json.loads(await sock.recv())
                if (reply.get("parent_header") or {}).get("msg_id") != msg_id:
                    continue
                kind = reply.get("msg_type")
                if kind == "stream":
                    out.append(reply["content"]["text"])
                elif kind == "execute_reply":
                    replied = True
                elif kind == "status" and reply["content"].get("execution_state") == "idle":
                    idle = True
    return "".join(out)


def code_of(url: str, token: str | None) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"token {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


async def test_notebook_on_local(workstation: Workstation, tmp_path: Path) -> None:
    (tmp_path / "ws").mkdir()
    opened = await notebooks.start(workstation, workdir=str(tmp_path / "ws"), port=18888)
    nb = opened.notebook
    try:
        assert nb.state == "running" and opened.url.endswith(f"?token={opened.token}")
        assert await asyncio.to_thread(code_of, f"{nb.url}/api/status", opened.token) == 200
        assert await asyncio.to_thread(code_of, f"{nb.url}/api/status", None) == 403
        st = await asyncio.to_thread(notebooks.status, nb.url, opened.token)
        assert "last_activity" in st and st["kernels"] == 0
        assert (await run_in_kernel(nb.url, opened.token, "print(6*7)")).strip() == "42"
        assert (await asyncio.to_thread(notebooks.status, nb.url, opened.token))["kernels"] == 1
        # tracked like a run: in the Jobs list, with who/where/when, not taking a job slot
        job = workstation.store.find_run(nb.job_id)
        assert job.kind == "notebook" and job.state == "running" and job.name.startswith("notebook ")
        assert opened.token not in json.dumps(job.to_dict()) and opened.token not in job.command
        other = await workstation.launch("true", workdir=str(tmp_path), sync_code=False)
        assert other.state == "running"  # not queued behind the notebook
    finally:
        await opened.forward.close()
        stopped = await notebooks.stop(workstation, nb.id)
    assert stopped.state == "stopped" and workstation.store.find_run(nb.job_id).state == "cancelled"
    assert await group_gone(opened.run.pid) == []  # the kernel too


async def test_no_jupyter_and_no_index_is_a_clear_message(workstation: Workstation, tmp_path: Path, monkeypatch) -> None:
    """A Python without Jupyter, and pip cannot reach an index: a clear message, nothing left running."""
    import os
    import subprocess

    system_python = "/usr/bin/python3"
    if not os.path.exists(system_python) or subprocess.run([system_python, "-c", "import jupyter_server"]).returncode == 0:
        pytest.skip("needs a Python without Jupyter at /usr/bin/python3")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no machine-wide mirror or find-links
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.setattr("sys.executable", system_python)
    with pytest.raises(LabdeckError, match="installing it failed") as err:
        await notebooks.start(workstation, workdir=str(tmp_path))
    assert "nothing was started" in err.value.render()
    assert workstation.store.runs()[0] == []


@pytest.fixture(scope="session")
def jupyter_site():
    import shutil

    from .sites import build_site

    site = build_site(["jupyter_server", "ipykernel"])
    try:
        yield site
    finally:
        shutil.rmtree(site, ignore_errors=True)


async def test_notebook_on_a_node_through_the_jump_host(home, fresh_rig, tmp_path, jupyter_site) -> None:
    """Reachable through the forward with the token, 403 without; the link to the jump host downed for
    10 s → the same forward works again within 2 s; a kernel runs print(6*7); stop leaves no process."""
    import time

    from .test_ssh import make_ws

    rig = fresh_rig
    ws = make_ws(home, rig)
    node = rig.host("node1")
    try:
        opened = await notebooks.start(ws, instance="node1", workdir=str(node.home), port=18889,
                                       env={"PYTHONPATH": str(jupyter_site)})
        nb = opened.notebook
        try:
            assert await asyncio.to_thread(code_of, f"{nb.url}/api/status", opened.token) == 200
            assert await asyncio.to_thread(code_of, f"{nb.url}/api/status", None) == 403
            assert f"-J {rig.jump.user}@{rig.jump.addr}" in opened.ssh_line
            rig.link_down()
            await asyncio.sleep(10)
            rig.link_up()
            back = time.monotonic()
            while True:
                try:
                    if await asyncio.to_thread(code_of, f"{nb.url}/api/status", opened.token) == 200:
                        break
                except OSError:
                    pass
                assert time.monotonic() - back < 10, "the forward never came back"
                await asyncio.sleep(0.1)
            assert time.monotonic() - back <= 2.0, f"back after {time.monotonic() - back:.2f}s"
            assert (await run_in_kernel(nb.url, opened.token, "print(6*7)")).strip() == "42"
        finally:
            await opened.forward.close()
            await notebooks.stop(ws, nb.id)
        t = await ws.transport("node1")
        left = (await t.run(f"ps -o pid=,stat= -g {opened.run.pid} | grep -v ' Z' || true")).text().strip()
        assert left == ""
    finally:
        await ws.close()


async def test_one_key_from_instances_and_stop_from_jobs(workstation: Workstation) -> None:
    from textual.widgets import DataTable

    from tui.app import LabdeckApp
    from tui.screenshots import settle
    from tui.widgets import ConfirmScreen, InfoScreen

    app = LabdeckApp(workstation, live=False)
    async with app.run_test(size=(140, 40)) as pilot:
        await settle(pilot)
        await pilot.press("1", "N")  # Jupyter on the selected instance (local)
        await settle(pilot)  # the worker that starts Jupyter has ended (however long it took), and shown its screen
        assert isinstance(app.screen, InfoScreen) and "?token=" in str(app.screen.query_one("#info-text").render())
        [nb] = workstation.store.records("notebooks")[0]
        assert nb.state == "running"
        await pilot.press("escape", "2")
        app.reload_runs()
        await settle(pilot)
        table = app.query_one("#jobs-table", DataTable)
        assert str(table.get_row_at(0)[1]).startswith("notebook")
        # shown again from Jobs (`i`), and from the CLI after the modal is gone: the same token, a URL that answers
        token = serving.read_secret(workstation, f"notebook-{nb.id}")
        await pilot.press("i")
        await settle(pilot)
        assert isinstance(app.screen, InfoScreen)
        info = str(app.screen.query_one("#info-text").render())
        assert f"Token: {token}" in info and "ssh -N -L" in info and f"127.0.0.1:{nb.port}/?token={token}" in info
        await pilot.press("escape")
        from .test_cli import labdeck

        shown = await asyncio.to_thread(labdeck, workstation.config.paths.config_file.parent, "notebook", "--show", nb.job_id[-8:].lower(),
                                        "--json")
        assert shown.returncode == 0, shown.stderr
        doc = json.loads(shown.stdout)
        assert doc["token"] == token and doc["state"] == "running" and doc["port"] == nb.port
        assert code_of(f"http://127.0.0.1:{nb.port}", token) == 200  # the instance URL works (this is local)
        text = await asyncio.to_thread(labdeck, workstation.config.paths.config_file.parent, "notebook", "--show", nb.job_id)
        assert text.returncode == 0 and f"Token: {token}" in text.stdout and "then open http://127.0.0.1:" in text.stdout
        # cancelling names the Jupyter it stops, not the shell lines that load its token
        await pilot.press("x")
        assert isinstance(app.screen, ConfirmScreen)
        detail = str(app.screen.query_one("#confirm-detail").render())
        assert detail.startswith("jupyter ") and "rm -f" not in detail and ".env" not in detail, detail
        workstation.config.values["jobs"]["cancel_grace_seconds"] = 3.0
        await pilot.press("y")
        await settle(pilot)
    [nb] = workstation.store.records("notebooks")[0]
    assert nb.state == "stopped"
    job = workstation.store.find_run(nb.job_id)
    assert job.state == "cancelled" and await group_gone(job.pid) == []


async def test_a_port_taken_after_it_was_found_free_is_retried(workstation: Workstation, tmp_path: Path, monkeypatch) -> None:
    """On a shared host a teammate's Jupyter can take the port between labdeck's check and Jupyter's bind:
    Jupyter exits saying so, and labdeck tries the next free port instead of failing."""
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    taken_port = taken.getsockname()[1]
    real, asked = notebooks.free_port, []

    async def racy_free_port(transport, python, port):
        asked.append(port)
        return taken_port if len(asked) == 1 else await real(transport, python, port)

    monkeypatch.setattr(notebooks, "free_port", racy_free_port)
    (tmp_path / "ws").mkdir()
    try:
        opened = await notebooks.start(workstation, workdir=str(tmp_path / "ws"), port=18950)
    finally:
        taken.close()
    try:
        assert opened.notebook.port != taken_port and len(asked) == 2
        assert await asyncio.to_thread(code_of, f"{opened.notebook.url}/api/status", opened.token) == 200
    finally:
        await opened.forward.close()
        await notebooks.stop(workstation, opened.notebook.id)
