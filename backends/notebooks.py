"""Cloud notebooks: Jupyter on an instance, reached through the SSH chain, tracked like a run.

``start`` opens JupyterLab (or jupyter-server when Lab is not installed; bootstrapped into a
private venv on the instance when neither is) in a run's own code copy or the user's workspace,
with a fresh token, bound to the instance's loopback. The server is a Run of kind ``notebook``
(Jobs tab, cost, cancel = stop by process group) that does not take a job's queue slot. Jupyter
culls its own idle kernels and shuts itself down after ``idle_minutes`` without activity, so
this works with labdeck closed; ``status`` reads ``/api/status`` (last activity, kernels,
connections), which is what "idle" means for a notebook (and for autostop later). The forward
heals itself after a dropped link (see :class:`backends.providers.base.RelayForward`). The token
is kept in a 0600 file of the owner's, never in the team store or a log.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import shlex
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Callable

from .errors import LabdeckError, NotFoundError
from .models import Notebook, Run, utcnow
from .providers.base import PortForward, Transport
from .ownership import copy_code, is_own_run, own_python
from .serving import free_port, http_status, laptop_hop, run_python, save_secret, secret_path, ssh_line

BOOTSTRAP_TIMEOUT = 900.0
START_TIMEOUT = 120.0
PORT_TRIES = 3
_PORT_TAKEN = re.compile(r"port \d+ is not available|is already in use")


class _PortTaken(Exception):
    """Jupyter exited because its port was taken after labdeck found it free."""


@dataclass
class Opened:
    notebook: Notebook
    run: Run
    token: str
    forward: PortForward
    url: str  # with the token
    ssh_line: str


async def _jupyter(transport: Transport, python: str, venv: str, say, env=None) -> tuple[str, str]:
    """(python, module) of a Jupyter on the instance: JupyterLab, else jupyter-server; else bootstrap a venv."""
    for py in (python, f"{venv}/bin/python"):
        res = await transport.run(env=env, command=
            f"{shlex.quote(py)} -c 'import jupyterlab' 2>/dev/null && echo jupyterlab || "
            f"{{ {shlex.quote(py)} -c 'import jupyter_server' 2>/dev/null && echo jupyter_server; }} || true", timeout=60)
        mod = res.text().strip()
        if mod:
            return py, mod
    say(f"Jupyter is not installed on {transport.instance}: installing jupyter-server and ipykernel into {venv}")
    res = await transport.run(
        f"{shlex.quote(python)} -m venv {shlex.quote(venv)} && {shlex.quote(venv)}/bin/pip install -q "
        f"--disable-pip-version-check --retries 1 --timeout 20 jupyter-server ipykernel 2>&1 | tail -5",
        timeout=BOOTSTRAP_TIMEOUT)
    check = await transport.run(f"{shlex.quote(venv)}/bin/python -c 'import jupyter_server' 2>/dev/null && echo ok || true",
                                timeout=60)
    if check.text().strip() != "ok":
        raise LabdeckError(
            f"Jupyter is not installed on {transport.instance}, and installing it failed:\n{res.text().strip()[-600:]}",
            "Install jupyterlab (or jupyter-server and ipykernel) there, for the Python your runs use; nothing was started.")
    return f"{venv}/bin/python", "jupyter_server"


async def start(ws, *, instance: str | None = None, run_ref: str | Run | None = None, workdir: str | None = None,
                port: int = 8888, idle_minutes: float = 120.0, local_port: int = 0,
                env: dict[str, str] | None = None, progress: Callable[[str], None] | None = None) -> Opened:
    say = progress or (lambda _m: None)
    run = run_ref if isinstance(run_ref, Run) or run_ref is None else ws.store.find_run(run_ref)
    target = instance or (run.instance if run else "local")
    if run is not None and run.instance != target:
        raise LabdeckError(f"{run.display_name}'s code is on {run.instance}, not {target}.")
    transport = await ws.transport(target)
    runs_root = await transport.runs_root()
    base = os.path.dirname(runs_root.rstrip("/"))
    nb = Notebook(instance=target, run_id=run.id if run else None, root_dir="", port=0, user=ws.user)
    if run is not None and not is_own_run(ws, run, runs_root):
        # someone else's run: a copy of its code in a directory of yours, your interpreter, none of
        # their environment (the record's executable and env are theirs to write)
        say(f"{run.display_name} is {run.user}'s run: opening a copy of its code, with your Python")
        mine = f"{base}/notebooks/{nb.id}"
        root = await copy_code(transport, run, mine)
        python = own_python(target)
        # Jupyter starts in an empty directory of yours, not in their code: `python -m` puts the
        # working directory first on sys.path, so a `jupyter_server/` or `asyncio.py` in their code
        # would run as you before any notebook opens. PYTHONSAFEPATH (3.11+) keeps it off as well.
        cwd = f"{mine}/start"
        made = await transport.run(f"umask 077 && mkdir -p {shlex.quote(cwd)}", timeout=60)
        if not made.ok:
            raise LabdeckError(f"Could not make {cwd} on {target}: {made.text().strip()[:200]}")
        env = {**(env or {}), "PYTHONSAFEPATH": "1"}
    else:
        root = (run.workdir if run is not None else workdir) or await transport.home_dir()
        python = await run_python(transport, run) if run is not None else own_python(target)
        env = dict(env or (run.env if run is not None else {}) or {})  # a run's notebook sees the run's environment
        cwd = root
    py, module = await _jupyter(transport, python, f"{base}/venv", say, env or None)
    token = secrets.token_hex(24)
    idle = max(60, int(idle_minutes * 60))
    name = f"notebook {run.display_name if run else os.path.basename(root.rstrip('/')) or '~'}"
    nb.root_dir = root
    jport = port
    # A port found free can be taken before Jupyter binds it (a teammate starting one at the same
    # moment on a shared host): Jupyter then exits at once saying so, and the next free port is tried.
    for attempt in range(PORT_TRIES):
        jport = await free_port(transport, py, jport if attempt == 0 else jport + 1)
        nb.port = jport
        tokenfile = f"{base}/notebooks/.{nb.id}.env"
        await transport.put_files({tokenfile: f"export JUPYTER_TOKEN={token}\n".encode()}, mode=0o600)
        command = (f". {shlex.quote(tokenfile)}; rm -f {shlex.quote(tokenfile)}; exec {shlex.quote(py)} -m {module} "
                   f"--ServerApp.ip=127.0.0.1 --ServerApp.port={jport} --ServerApp.port_retries=0 "
                   f"--ServerApp.open_browser=False --ServerApp.root_dir={shlex.quote(root)} --ServerApp.allow_root=True "
                   f"--ServerApp.shutdown_no_activity_timeout={idle} --MappingKernelManager.cull_idle_timeout={idle} "
                   f"--MappingKernelManager.cull_interval=60")
        say(f"starting {module} on {target}:{jport}")
        job = await ws.launch(command, instance=target, workdir=cwd, sync_code=False, run_kind="notebook", env=env,
                              name=name, parent=run.id if run else None, params={"jupyter": module, "root_dir": root})
        nb.job_id = job.id
        ws.store.add(nb)
        if attempt == 0:
            save_secret(ws, f"notebook-{nb.id}", token)
        forward: PortForward | None = None
        try:
            forward = await transport.forward_port(jport, local_port=local_port)
            nb.url = f"http://127.0.0.1:{forward.local_port}"
            t0 = time.monotonic()
            while True:
                try:
                    if await asyncio.to_thread(http_status, f"{nb.url}/api/status",
                                               {"Authorization": f"token {token}"}, 3) == 200:
                        break
                except OSError:
                    pass
                await ws.refresh_runs(only=[job.id])
                j = ws.store.find_run(job.id)
                if j.run_state.is_final or time.monotonic() - t0 > START_TIMEOUT:
                    tail = await ws.log_tail(job.id, 2000)
                    if j.run_state.is_final and attempt + 1 < PORT_TRIES and _PORT_TAKEN.search(tail):
                        raise _PortTaken()
                    raise LabdeckError(f"Jupyter did not start on {target}:\n{tail.strip()[-1500:]}")
                await asyncio.sleep(0.3)
        except (LabdeckError, _PortTaken) as e:  # the forward or Jupyter failed: nothing keeps running
            if forward is not None:
                await forward.close()
            with contextlib.suppress(LabdeckError):
                if not ws.store.find_run(job.id).run_state.is_final:
                    await ws.cancel(job.id)
            if isinstance(e, _PortTaken):
                say(f"port {jport} was taken meanwhile on {target}; trying the next free one")
                continue
            ws.store.mine.put(Notebook.TABLE, nb.id, {**nb.to_dict(), "state": "failed", "stopped_at": utcnow()})
            raise
        break
    nb.state = "running"
    ws.store.mine.put(Notebook.TABLE, nb.id, nb.to_dict())
    return Opened(nb, ws.store.find_run(job.id), token, forward, f"{nb.url}/?token={token}",
                  ssh_line(transport, forward.local_port, jport, laptop_hop(ws.config, ws.user)))


def status(url: str, token: str) -> dict:
    """Jupyter's own view of activity: ``last_activity``, ``kernels``, ``connections``, ``started``."""
    req = urllib.request.Request(f"{url}/api/status", headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


async def stop(ws, ref: str) -> Notebook:
    """Stop a notebook (its server's process group) and mark it stopped."""
    nb = find(ws, ref)
    job = ws.store.find_run(nb.job_id)
    if job.run_state.is_active or job.state == "lost":
        await ws.cancel(job.id)
    ws.store.mine.put(Notebook.TABLE, nb.id, {**nb.to_dict(), "state": "stopped", "stopped_at": utcnow()})
    secret_path(ws, f"notebook-{nb.id}").unlink(missing_ok=True)
    return find(ws, nb.id)


def find(ws, ref: str) -> Notebook:
    nbs, _ = ws.store.records(Notebook.TABLE)
    for nb in nbs:
        if nb.id == ref.upper() or nb.job_id == ref.upper() or (len(ref) >= 4 and (
                nb.id.lower().endswith(ref.lower()) or nb.job_id.lower().endswith(ref.lower()))):
            return nb
    raise NotFoundError(f"No notebook {ref!r}.", "`labdeck ps` lists notebooks among the runs.")


def shown_command(run: Run) -> str:
    """What to show as a run's command: for a notebook, the Jupyter it runs and where (``jupyter lab
    in ~/proj, port 8888``), not the shell plumbing that loads its token; a job's own command as is."""
    if run.kind != "notebook":
        return run.command
    module = str((run.params or {}).get("jupyter") or "")
    root = str((run.params or {}).get("root_dir") or run.workdir or "")
    port = re.search(r"--ServerApp\.port=(\d+)", run.command)
    what = {"jupyterlab": "jupyter lab", "jupyter_server": "jupyter server"}.get(module, "jupyter")
    return f"{what} in {root}" + (f", port {port.group(1)}" if port else "")


@dataclass
class Access:
    """How to reach a notebook again after the modal that first showed it: kept for its owner."""

    notebook: Notebook
    job: Run
    token: str | None  # None: not yours (the token is in a 0600 file of its owner's), or already stopped
    ssh_line: str  # forwards the same port number on the laptop
    laptop_url: str  # after the ssh line, on the laptop
    instance_url: str  # on the instance itself
    mine: bool = True

    def to_dict(self) -> dict:
        return {"notebook": self.notebook.id, "run": self.job.id, "name": self.job.display_name,
                "state": self.job.state, "instance": self.notebook.instance, "user": self.notebook.user,
                "root_dir": self.notebook.root_dir, "port": self.notebook.port, "token": self.token,
                "instance_url": self.instance_url, "laptop_url": self.laptop_url, "ssh_line": self.ssh_line}

    def lines(self) -> list[str]:
        job, nb = self.job, self.notebook
        out = [f"{job.display_name} · {job.state} · {nb.instance}:{nb.port} · {shown_command(job)}"]
        if not job.run_state.is_active:
            out.append(f"It is {job.state}: start another with N (Jobs or Instances) or `labdeck notebook`.")
        if self.token is None and not self.mine:
            out.append(f"The token is {nb.user}'s: only they can show it (it is in a 0600 file of theirs).")
        elif self.token is None:
            out.append("No token is kept for it any more (it was stopped).")
        else:
            out.append(f"Token: {self.token}")
        out.append(f"On {nb.instance}: {self.instance_url}")
        out.append(f"From a laptop: {self.ssh_line}")
        out.append(f"  then open {self.laptop_url}")
        return out


def find_for(ws, ref: str) -> Notebook:
    """A notebook by its id, its server run's id or suffix, or that run's name (``notebook proj``)."""
    try:
        return find(ws, ref)
    except NotFoundError:
        pass
    run = ws.store.find_run(ref)  # a name or a prefix; raises NotFoundError saying what is there
    nbs, _ = ws.store.records(Notebook.TABLE)
    for nb in nbs:
        if nb.job_id == run.id:
            return nb
    raise NotFoundError(f"{run.display_name} is not a notebook.", "`labdeck ps -a` lists notebooks (kind notebook).")


async def access(ws, ref: str | Run) -> Access:
    """The token, URLs and ``ssh -L`` line of a notebook (by reference, or its server's Run)."""
    from .serving import read_secret

    nb = find_for(ws, ref.id if isinstance(ref, Run) else ref)
    job = ws.store.find_run(nb.job_id)
    token = read_secret(ws, f"notebook-{nb.id}") if nb.user == ws.user else None
    port = int(nb.port or 0)
    query = f"/?token={token}" if token else "/"
    transport = await ws.transport(nb.instance)
    return Access(nb, job, token, ssh_line(transport, port, port, laptop_hop(ws.config, ws.user)),
                  f"http://127.0.0.1:{port}{query}", f"http://127.0.0.1:{port}{query}", nb.user == ws.user)
