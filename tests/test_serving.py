"""Model servers with a real litserve, on `local`: deploy a run's model, predict with the key,
401 without it, 400 for a bad body (still up), missing model caught before anything starts,
a taken port → the next free one, and stop leaves no process of the group."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from backends import serving
from backends.errors import LabdeckError
from backends.workstation import Workstation

from .conftest import group_gone, wait_final

pytest.importorskip("litserve")


@pytest.fixture
async def trained(workstation: Workstation):
    run = await workstation.launch_example()
    done = await wait_final(workstation, run.id, 90)
    assert done.state == "succeeded" and "model.npz" in done.artifacts
    return done


async def test_deploy_predict_auth_bad_body_and_stop(workstation: Workstation, trained) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    busy = taken.getsockname()[1]
    taken.listen()
    steps: list[str] = []
    try:
        served = await serving.deploy(workstation, trained.id, port=busy, progress=steps.append)
    finally:
        taken.close()
    dep = served.deployment
    try:
        assert dep.port != busy and any("taken" in s for s in steps)  # the next free port
        assert dep.state == "healthy" and dep.url.startswith("http://127.0.0.1:")
        # the key is in a 0600 file of the owner's, not in the team store
        key_file = Path(workstation.config.paths.data_dir) / "keys" / dep.id
        assert oct(key_file.stat().st_mode & 0o777) == "0o600"
        team = Path(workstation.config.team_dir)
        assert not any(served.api_key in p.read_text(errors="ignore") for p in team.rglob("*") if p.is_file())
        status, body, _ = await asyncio.to_thread(serving.predict, dep.url, served.api_key, {"x": [[0.0] * 16, [1.0] * 16]})
        assert status == 200 and len(body["prob"]) == 2 and all(0 <= p <= 1 for p in body["prob"])
        status, _, _ = await asyncio.to_thread(serving.predict, dep.url, None, {"x": [[0.0] * 16]})
        assert status == 401
        status, body, _ = await asyncio.to_thread(serving.predict, dep.url, served.api_key, {"x": [[1, 2]]})
        assert status == 400 and "shape" in str(body)
        status, _, _ = await asyncio.to_thread(serving.predict, dep.url, served.api_key, {"x": [[0.0] * 16]})
        assert status == 200  # still up after the bad body
        assert "ssh -N -L" in served.ssh_line and str(dep.port) in served.ssh_line
        recorded = serving.find(workstation, dep.id)
        assert recorded.state == "healthy" and recorded.run_id == trained.id
        log = (await (await workstation.transport("local")).read_file(dep.log_path, 0, 1 << 20)).data.decode()
        assert served.api_key not in log
    finally:
        await served.forward.close()
        stopped = await serving.stop(workstation, dep.id)
    assert stopped.state == "stopped"
    assert await group_gone(dep.pid) == []  # litserve's workers too


async def test_missing_model_is_caught_before_anything_starts(workstation: Workstation, trained) -> None:
    with pytest.raises(LabdeckError, match="nope.npz of quickstart-example is not on local") as err:
        await serving.deploy(workstation, trained.id, model="nope.npz")
    assert "nothing was started" in err.value.render()
    deps, _ = workstation.store.records("deployments")
    assert deps == []
    with pytest.raises(LabdeckError, match="must be a path inside"):
        await serving.deploy(workstation, trained.id, model="../../etc/passwd")


async def test_models_tab_serve_try_and_stop(workstation: Workstation, trained) -> None:
    from textual.widgets import DataTable, TextArea

    from tui.app import LabdeckApp
    from tui.screenshots import settle
    from tui.widgets import ConfirmScreen, InfoScreen, TryModelScreen

    app = LabdeckApp(workstation, live=False)
    async with app.run_test(size=(140, 40)) as pilot:
        await settle(pilot)
        await pilot.press("2", "S")  # serve the selected (only) run's model
        for _ in range(200):
            await pilot.pause(0.1)
            if isinstance(app.screen, InfoScreen):
                break
        assert isinstance(app.screen, InfoScreen) and "API key" in str(app.screen.query_one("#info-text").render())
        info = app.screen.text
        # the box has what the CLI prints: the curl line, with a body of the model's real width (16), that works
        # as printed while labdeck runs (its forward is open)
        curl = next(line for line in info.splitlines() if line.startswith("try it: curl "))
        assert "one row of 16 features" in info and "ctrl+c" not in info
        import shlex
        import subprocess
        done = await asyncio.to_thread(subprocess.run, shlex.split(curl.removeprefix("try it: ")) + ["-w", "\n%{http_code}"],
                                       capture_output=True, text=True, timeout=30)
        assert done.stdout.rstrip().endswith("200") and '"prob"' in done.stdout, done
        await pilot.press("escape", "5")
        app.load_deployments()
        await settle(pilot)
        table = app.query_one("#models-table", DataTable)
        assert table.row_count == 1 and str(table.get_row_at(0)[2]) == "healthy"
        await pilot.press("t")
        for _ in range(50):
            await pilot.pause(0.1)
            if isinstance(app.screen, TryModelScreen):
                break
        assert isinstance(app.screen, TryModelScreen)
        await pilot.press("ctrl+s")
        for _ in range(100):
            await pilot.pause(0.1)
            if "200" in str(app.screen.query_one("#try-answer").render()):
                break
        answer = str(app.screen.query_one("#try-answer").render())
        assert answer.startswith("200 in") and '"prob"' in answer
        app.screen.query_one("#try-body", TextArea).text = '{"x": [[1, 2]]}'
        await pilot.press("ctrl+s")
        for _ in range(100):
            await pilot.pause(0.1)
            if "400" in str(app.screen.query_one("#try-answer").render()):
                break
        assert "400" in str(app.screen.query_one("#try-answer").render())
        # both latencies count for this deployment (by id: a redeploy under the same name starts afresh)
        assert len(app._model_latency[app.query_one("ModelsTab").deployments[0].id]) == 2
        await pilot.press("escape", "x")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("y")
        await settle(pilot)
        dep = serving.find(workstation, app.query_one("ModelsTab").deployments[0].id)
        assert dep.state == "stopped"
        # x again on the stopped row: said at once, with no "Stop?" asked first
        app.load_deployments()
        await settle(pilot)
        await pilot.press("x")
        await settle(pilot)
        assert not isinstance(app.screen, ConfirmScreen)
        assert any("is already stopped" in str(n.message) for n in app._notifications)
    assert await group_gone(dep.pid) == []


def test_export_k8s_validates_against_the_kubernetes_schemas(home: Path, tmp_path: Path) -> None:
    import kubernetes_validate
    import yaml

    from .test_cli import labdeck

    res = labdeck(home, "example")
    assert res.returncode == 0, res.stderr
    assert labdeck(home, "logs", "quickstart-example", "-f", timeout=90).returncode == 0
    out = tmp_path / "k8s"
    res = labdeck(home, "export", "quickstart-example", "--k8s", str(out), "--image", "reg.example/q:1")
    assert res.returncode == 0, res.stderr
    names = {p.name for p in out.iterdir()}
    assert {"Dockerfile", "deployment.yaml", "service.yaml", "labdeck_serve.py", "model.npz", "requirements.txt"} <= names
    dep = yaml.safe_load((out / "deployment.yaml").read_text())
    svc = yaml.safe_load((out / "service.yaml").read_text())
    for doc in (dep, svc):
        kubernetes_validate.validate(doc, "1.30", strict=True)  # raises on a shape Kubernetes would refuse
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert dep["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert c["image"] == "reg.example/q:1" and c["ports"][0]["containerPort"] == 8000
    assert c["env"][0]["valueFrom"]["secretKeyRef"]["name"].endswith("-api-key")  # the key is never in the manifest
    docker = (out / "Dockerfile").read_text()
    assert "labdeck_serve.py" in docker and "--host" in docker and "0.0.0.0" in docker
    assert any(line.startswith("numpy==") for line in (out / "requirements.txt").read_text().splitlines())


# ---- on a rig node, through the jump host ----------------------------------------------------

@pytest.fixture(scope="session")
def node_site(tmp_path_factory):
    """litserve and numpy for the rig's node users: their Python (/usr/bin/python3, same 3.11 ABI) cannot
    reach this interpreter's packages under /root, so the distributions' files are copied to a shared dir."""
    import shutil

    from .sites import build_site

    site = build_site(["litserve", "numpy"])
    try:
        yield site
    finally:
        shutil.rmtree(site, ignore_errors=True)


async def test_serve_on_a_node_through_the_jump_host(home, fresh_rig, tmp_path, node_site) -> None:
    from .test_ssh import make_ws

    rig = fresh_rig
    ws = make_ws(home, rig)
    try:
        (tmp_path / "p").mkdir()
        (tmp_path / "p" / "train.py").write_text(
            "import os, numpy as np\n"
            "np.savez(os.path.join(os.environ['LABDECK_RUN_DIR'], 'model.npz'), w=np.ones(4), b=np.float32(0))\n")
        run = await ws.launch(f"{rig.python} train.py", instance="node1", workdir=str(tmp_path / "p"),
                              env={"PYTHONPATH": str(node_site)})
        done = await asyncio.wait_for(ws.follower.follow(run.id), 60)
        assert done.state == "succeeded" and done.artifacts == ["model.npz"], ws.follower.local_path(done).read_text()
        served = await serving.deploy(ws, run.id)
        dep = served.deployment
        try:
            status, body, _ = await asyncio.to_thread(serving.predict, dep.url, served.api_key, {"x": [[0, 0, 0, 0]]})
            assert status == 200 and body["prob"] == [0.5]
            status, _, _ = await asyncio.to_thread(serving.predict, dep.url, None, {"x": [[0, 0, 0, 0]]})
            assert status == 401
            status, _, _ = await asyncio.to_thread(serving.predict, dep.url, served.api_key, {"y": 1})
            assert status == 400
            node = rig.host("node1")
            assert f"-J {rig.jump.user}@{rig.jump.addr}" in served.ssh_line and f"{node.user}@{node.addr}" in served.ssh_line
        finally:
            await served.forward.close()
            await serving.stop(ws, dep.id)
        t = await ws.transport("node1")
        left = (await t.run(f"ps -o pid=,stat= -g {dep.pid} | grep -v ' Z' || true")).text().strip()
        assert left == ""
    finally:
        await ws.close()


async def test_serve_the_users_own_litapi(workstation: Workstation, tmp_path: Path) -> None:
    """--api module:Class: a litserve.LitAPI in the run's code, served from the run's code copy."""
    (tmp_path / "serve.py").write_text(
        "import litserve as ls\n"
        "class Echo(ls.LitAPI):\n"
        "    def setup(self, device):\n        self.n = 0\n"
        "    def decode_request(self, request):\n        return request['text']\n"
        "    def predict(self, x):\n        return x.upper()\n"
        "    def encode_response(self, y):\n        return {'echo': y}\n")
    run = await workstation.launch("true", workdir=str(tmp_path), name="echo-run")
    await wait_final(workstation, run.id)
    served = await serving.deploy(workstation, run.id, api="serve:Echo", name="echo")
    try:
        status, body, _ = await asyncio.to_thread(serving.predict, served.deployment.url, served.api_key, {"text": "hi"})
        assert status == 200 and body == {"echo": "HI"}
    finally:
        await served.forward.close()
        await serving.stop(workstation, served.deployment.id)
    assert await group_gone(served.deployment.pid) == []


async def test_a_forward_that_fails_leaves_no_server_running(workstation: Workstation, trained, monkeypatch) -> None:
    """litserve is already started when the forward is opened: if that fails (a dropped link), the
    server is stopped and its record says failed, rather than a server nobody can reach."""
    from backends.errors import TransportError
    from backends.providers.local import LocalTransport

    async def refuse(self, remote_port, *, local_port=0, remote_host="127.0.0.1"):
        raise TransportError("Forwarding failed: the link dropped.")

    monkeypatch.setattr(LocalTransport, "forward_port", refuse)
    with pytest.raises(LabdeckError, match="the link dropped"):
        await serving.deploy(workstation, trained.id)
    deps, _ = workstation.store.records("deployments")
    assert len(deps) == 1 and deps[0].state == "failed" and "link dropped" in deps[0].state_reason
    assert await group_gone(deps[0].pid) == []


async def test_serve_a_run_whose_venv_is_on_no_path(workstation: Workstation, tmp_path: Path, monkeypatch) -> None:
    """The bundled example run with a venv's interpreter that is on no PATH, while `python3` on
    labdeck's PATH is one without litserve: the run's record names the venv's interpreter, and
    serving it uses that (before: "litserve does not import with …python3")."""
    import os
    import subprocess

    from backends.workstation import examples_dir

    from .test_local import decoy_python3, make_venv

    bare = "/usr/bin/python3"
    if not os.path.exists(bare) or subprocess.run([bare, "-c", "import litserve"], capture_output=True).returncode == 0:
        pytest.skip(f"needs a {bare} without litserve")
    venv_python = make_venv(tmp_path / "venv")
    decoy = decoy_python3(tmp_path / "decoy", bare)
    monkeypatch.setenv("PATH", f"{decoy}:{os.environ['PATH']}")
    monkeypatch.setenv("SSH_CONNECTION", "198.51.100.7 50000 203.0.113.5 2222")  # labdeck on a jump host, SSHed into
    run = await workstation.launch(f"{venv_python} train.py --steps 100", workdir=str(examples_dir() / "quickstart"),
                                   name="venv-example")
    done = await wait_final(workstation, run.id, 90)
    assert done.state == "succeeded" and "model.npz" in done.artifacts
    assert done.environment["executable"] == str(venv_python)
    assert "litserve" in " ".join(done.environment["packages"]).lower()  # what `labdeck show` and export report
    served = await serving.deploy(workstation, run.id)
    try:
        status, body, _ = await asyncio.to_thread(serving.predict, served.deployment.url, served.api_key,
                                                  {"x": [[0.0] * 16]})
        assert status == 200 and len(body["prob"]) == 1
        # the line a teammate pastes on a laptop reaches this machine as the laptop did
        assert served.ssh_line == (f"ssh -N -L {served.forward.local_port}:127.0.0.1:{served.deployment.port} "
                                   f"-p 2222 {workstation.user}@203.0.113.5")
        assert Path(f"/proc/{served.deployment.pid}/cmdline").read_bytes().split(b"\0")[0] == str(venv_python).encode()
    finally:
        await served.forward.close()
        await serving.stop(workstation, served.deployment.id)


async def test_serve_detach_prints_lines_that_work_after_labdeck_exits(workstation: Workstation, trained,
                                                                         home: Path) -> None:
    """`labdeck serve RUN --detach`: after labdeck has exited, the printed curl line (run by the real
    curl) gets an answer: it points at no forward labdeck closed, and its body has the model's real
    input width (16 features, read from model.npz's header), not a guess."""
    import json
    import re
    import shlex
    import subprocess

    import os
    import shutil

    from .test_cli import labdeck

    if shutil.which("curl") is None:
        if os.environ.get("LABDECK_REQUIRE_RIG") == "1":
            pytest.fail("curl is not installed (Debian package curl; .ci/run installs it)")
        pytest.skip("needs curl (Debian package curl)")
    res = await asyncio.to_thread(labdeck, home, "serve", trained.id, "--detach", timeout=180)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    curl = next(line for line in out.splitlines() if "curl -s" in line)
    argv = shlex.split(curl.split(":", 1)[1])
    body = json.loads(argv[argv.index("-d") + 1])
    assert body == {"x": [[0.0] * 16]}
    assert "16 features" in out and "ssh -N -L" in out and "URL on the instance:  http://127.0.0.1:" in out
    assert "forward is closed" in out
    dep = serving.find(workstation, trained.name or trained.id[-8:].lower())
    try:
        assert f"127.0.0.1:{dep.port}/predict" in curl  # the server's own port: labdeck's forward is gone
        answer = await asyncio.to_thread(subprocess.run, [*argv, "--max-time", "30"], capture_output=True, text=True,
                                         timeout=60)
        reply = json.loads(answer.stdout)
        assert len(reply["prob"]) == 1 and reply["label"][0] in (0, 1), answer.stdout + answer.stderr
        assert not re.search(r"\[\[0\.1, 0\.2\]\]", out)
    finally:
        await serving.stop(workstation, dep.id)


async def test_input_width_is_read_from_the_file_not_by_loading_it(tmp_path: Path) -> None:
    """.npz, stored or deflated, any member order: w's first axis; a pickle is never opened (None)."""
    import io
    import pickle

    import numpy as np

    from backends.modelshape import example_body, input_width

    async def width(name: str, data: bytes) -> int | None:
        async def read(offset: int, n: int) -> bytes:
            return data[offset:offset + n]
        return await input_width(name, read)

    for save in (np.savez, np.savez_compressed):
        buf = io.BytesIO()
        save(buf, b=np.float32(0.5), w=np.zeros(7, np.float32))
        assert await width("m.npz", buf.getvalue()) == 7
    buf = io.BytesIO()
    np.savez(buf, other=np.zeros(3))  # no w: not the built-in loader's model
    assert await width("m.npz", buf.getvalue()) is None
    assert await width("m.npz", b"PK\x03\x04 not really a zip") is None
    assert await width("model.pkl", pickle.dumps({"w": 1})) is None
    assert example_body(3) == '{"x": [[0.0, 0.0, 0.0]]}' and example_body(None) is None


async def test_input_width_of_a_hostile_npz_is_unknown_and_cheap(tmp_path: Path) -> None:
    """A teammate's .npz: a .npy header length of 4 GiB, Python literals nested past the parser's limits, a
    deflate bomb, a zip of many members, lengths past the file: None, with a bounded number of bounded reads."""
    import struct
    import zlib

    from backends.modelshape import MAX_NPY_HEADER, input_width

    reads: list[int] = []

    async def width(data: bytes) -> int | None:
        async def read(offset: int, n: int) -> bytes:
            reads.append(n)
            return data[offset:offset + n]
        return await input_width("m.npz", read)

    def member(name: bytes, body: bytes, method: int = 0) -> bytes:
        raw = zlib.compressobj(9, zlib.DEFLATED, -15) if method == 8 else None
        data = (raw.compress(body) + raw.flush()) if raw else body
        return (b"PK\x03\x04" + struct.pack("<HHHHHIIIHH", 20, 0, method, 0, 0, 0, len(data), len(body), len(name), 0)
                + name + data)

    def npy(meta: bytes, major: int = 1, n: int | None = None) -> bytes:
        n = len(meta) if n is None else n
        return b"\x93NUMPY" + bytes([major, 0]) + (struct.pack("<H", n) if major == 1 else struct.pack("<I", n)) + meta

    hostile = [
        member(b"w.npy", npy(b"{'shape': (7,)}", 2, 0xFFFFFFFF)),  # a header length of 4 GiB
        member(b"w.npy", npy(b"(" * 60000 + b")" * 60000, 2)),  # nested past the parser's limit
        member(b"w.npy", npy(b"{'shape': (" + b"-" * 60000 + b"1,)}", 2)),
        member(b"w.npy", npy(b"{'shape': (" + b"1+" * 20000 + b"1,)}", 2)),
        member(b"w.npy", npy(b"{'shape': (" + b"9" * 5000 + b",)}", 2)),  # past int()'s digit limit
        member(b"w.npy", bytes(64 << 20), 8),  # a deflate bomb: 64 MiB of zeros, ~64 KiB on disk
        b"".join(member(b"x%d.npy" % i, b"x") for i in range(1000)) + member(b"w.npy", npy(b"{'shape': (7,)}")),
        b"PK\x03\x04" + struct.pack("<HHHHHIIIHH", 20, 0, 0, 0, 0, 0, 0xFFFFFFF0, 0, 0xFFFF, 0xFFFF),
    ]
    for data in hostile:
        reads.clear()
        got = await width(data)
        assert got is None or got == 7  # never a width from a bad header
        assert len(reads) <= 2 * 32 + 1 and max(reads) <= max(MAX_NPY_HEADER + 16, 2 * 0xFFFF)
