"""Model servers: a run's model behind litserve on its instance, forwarded to here.

``deploy`` checks everything it can before starting anything (the model file exists, litserve
imports on the instance), picks a free port from the one asked for upward, generates an API
key, starts litserve detached in its own session (stopped by process group: SIGTERM to its main
process alone orphans the workers), bound to the instance's loopback, forwards it through the SSH
chain, waits for ``/health`` with progress, and records the deployment. The key is shown to
the owner and kept in a 0600 file of theirs, never in the team store or a log.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import re
import secrets
import shlex
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import LabdeckError, NotFoundError
from .jobs import kill_group
from .models import Deployment, Run, utcnow
from .ownership import copy_code, copy_file, is_own_run, own_python, safe_rel
from .providers.base import PortForward, Transport

SERVE_SCRIPT = (Path(__file__).parent / "runtime" / "labdeck_serve.py").read_text()
HEALTH_TIMEOUT = 90.0
MODEL_SUFFIXES = (".npz", ".pkl", ".pickle", ".joblib", ".pt", ".pth")


@dataclass
class Served:
    deployment: Deployment
    api_key: str
    forward: PortForward
    ssh_line: str
    input_width: int | None = None  # features per row the model takes, read from its file (None: unknown)
    remote_port: int = 0  # the server's port on its instance


async def model_input_width(transport: Transport, path: str) -> int | None:
    """The input width of the model file at ``path`` on the instance, read from its bytes
    (:mod:`backends.modelshape`: nothing loaded or run); None when that cannot be known."""
    from .modelshape import input_width

    async def read(offset: int, n: int) -> bytes:
        return (await transport.read_file(path, offset, n)).data or b""

    try:
        return await input_width(path, read)
    except LabdeckError:
        return None


async def run_python(transport: Transport, run: Run) -> str:
    """The interpreter one of your runs ran with: its record's ``environment.executable`` (what the
    job's ``import labdeck`` or its command's own interpreter recorded); for a run still going, the
    ``environment.json`` in its run directory; else your own (:func:`own_python`). Only for your
    own runs: someone else's record names a program of their choosing."""
    exe = (run.environment or {}).get("executable")
    if not exe and run.run_dir:
        try:
            raw = await transport.read_file(f"{run.run_dir}/environment.json", 0, 1 << 20)
            exe = json.loads(raw.data or b"{}").get("executable")
        except (LabdeckError, ValueError, AttributeError):
            exe = None
    return exe if isinstance(exe, str) and exe.startswith("/") else own_python(run.instance)


def pick_model(run: Run, model: str | None, api: str | None) -> tuple[str | None, str | None]:
    if api:
        return None, api
    if model:
        return model, None
    candidates = [a for a in run.artifacts if a.endswith(MODEL_SUFFIXES)]
    if not candidates:
        raise LabdeckError(f"{run.display_name} has no model artifact labdeck can serve "
                           f"(recorded artifacts: {', '.join(run.artifacts) or 'none'}).",
                           "Give --model PATH (inside the run directory) or --api module:Class (a litserve.LitAPI in the run's code).")
    return candidates[0], None


async def deploy(ws, run_ref: str | Run, *, instance: str | None = None, port: int = 8000, name: str | None = None,
                 model: str | None = None, api: str | None = None, local_port: int = 0,
                 progress: Callable[[str], None] | None = None) -> Served:
    say = progress or (lambda _m: None)
    run = run_ref if isinstance(run_ref, Run) else ws.store.find_run(run_ref)  # a Run: the record the user saw
    target = instance or run.instance
    if target != run.instance:
        raise LabdeckError(f"{run.display_name}'s files are on {run.instance}, not {target}.",
                           "Serving on another instance needs its artifacts there; serve it on its own instance.")
    transport: Transport = await ws.transport(target)
    model, api = pick_model(run, model, api)
    if model:
        model = safe_rel(model, "--model")
    own = is_own_run(ws, run, await transport.runs_root())
    dep = Deployment(run_id=run.id, instance=target, name=name or (run.name or run.id[-8:].lower()), port=0,
                     model=model or api or "", user=ws.user)
    if own:  # your run: its own environment (env.sh: PYTHONPATH, CUDA_VISIBLE_DEVICES, …) and interpreter
        home_dir, workdir, python = run.run_dir, (run.workdir if api else run.run_dir), await run_python(transport, run)
        source_env = f"[ -f {shlex.quote(run.run_dir + '/env.sh')} ] && . {shlex.quote(run.run_dir + '/env.sh')}; "
    else:  # someone else's: a directory of yours with copies of its code and model, your interpreter, none of their env
        home_dir = f"{(await transport.runs_root()).rstrip('/')}/{dep.id}"
        workdir, python, source_env = home_dir, own_python(target), ""
    # everything that can be checked before starting anything
    if model:
        try:
            await transport.read_file(f"{run.run_dir}/{model}", 0, 0)
        except LabdeckError:
            raise LabdeckError(f"The model file {model} of {run.display_name} is not on {target} ({run.run_dir}/{model}).",
                               "Check the artifact's name with `labdeck show RUN`; nothing was started.") from None
    if not own:
        say(f"{run.display_name} is {run.user}'s run: serving copies of its files from {home_dir}, with {python}")
        if api:
            workdir = await copy_code(transport, run, home_dir)
        if model:
            model_path = await copy_file(transport, run, model, home_dir)
    check = await transport.run(f"{source_env}{shlex.quote(python)} -c 'import litserve'", timeout=60)
    if not check.ok:
        raise LabdeckError(f"litserve does not import with {python} on {target}.",
                           "Install it there (pip install litserve) in the run's environment; nothing was started.")
    remote_port = await free_port(transport, python, port)
    if remote_port != port:
        say(f"port {port} is taken on {target}: using {remote_port}")
    key = secrets.token_urlsafe(24)
    dep.port = remote_port
    dep.log_path = f"{home_dir}/serve-{dep.id}.log"
    envfile = f"{home_dir}/.serve-{dep.id}.env"
    await transport.put_files({f"{home_dir}/labdeck_serve.py": SERVE_SCRIPT.encode(),
                               envfile: f"export LIT_SERVER_API_KEY={shlex.quote(key)}\n".encode()}, mode=0o600)
    if model:
        model_path = f"{run.run_dir}/{model}" if own else model_path
    target_arg = f"--api {shlex.quote(api)}" if api else f"--model {shlex.quote(model_path)}"
    # (your own run: its environment first), then the key
    command = (f"{source_env}. {shlex.quote(envfile)}; rm -f {shlex.quote(envfile)}; "
               f"exec {shlex.quote(python)} {shlex.quote(home_dir + '/labdeck_serve.py')} --port {remote_port} {target_arg}")
    say(f"starting litserve on {target}:{remote_port}")
    dep.pid = await transport.start_detached(command, cwd=workdir, log_path=dep.log_path)
    ws.store.add(dep)
    save_secret(ws, dep.id, key)
    forward: PortForward | None = None
    try:
        forward = await transport.forward_port(remote_port, local_port=local_port)
        dep.url = f"http://127.0.0.1:{forward.local_port}"
        await _wait_healthy(transport, dep, forward, say, key)
    except LabdeckError as e:  # the forward or the server failed: nothing keeps running, the record says why
        if forward is not None:
            await forward.close()
        with contextlib.suppress(LabdeckError):
            await _kill_group(transport, dep.pid)
        ws.store.mine.put(Deployment.TABLE, dep.id, {**dep.to_dict(), "state": "failed", "state_reason": str(e),
                                                     "stopped_at": utcnow()})
        raise
    dep.state = "healthy"
    ws.store.mine.put(Deployment.TABLE, dep.id, dep.to_dict())
    width = await model_input_width(transport, model_path) if model else None
    return Served(dep, key, forward, ssh_line(transport, forward.local_port, remote_port, laptop_hop(ws.config, ws.user)),
                  width, remote_port)


async def free_port(transport: Transport, python: str, port: int) -> int:
    """The first port from ``port`` up that nothing listens on at the instance's loopback."""
    free = await transport.run(
        f"{shlex.quote(python)} -c 'import socket,sys\n"
        f"for p in range({int(port)}, {int(port) + 100}):\n"
        f"    s = socket.socket()\n"
        f"    try:\n        s.bind((\"127.0.0.1\", p)); print(p); sys.exit(0)\n"
        f"    except OSError: pass\n    finally: s.close()\nsys.exit(1)'", timeout=30)
    if not free.ok:
        raise LabdeckError(f"No free port from {port} to {port + 99} on {transport.instance}.")
    return int(free.text().strip())


async def _wait_healthy(transport: Transport, dep: Deployment, forward: PortForward, say, key: str) -> None:
    t0 = time.monotonic()
    last = -1
    while time.monotonic() - t0 < HEALTH_TIMEOUT:
        try:
            code = await asyncio.to_thread(http_status, f"http://127.0.0.1:{forward.local_port}/health",
                                           {"X-API-Key": key} if key else None)
            if code == 200:
                return
        except OSError:
            pass
        alive = await transport.run(f"kill -0 {dep.pid} 2>/dev/null && echo yes || echo no", timeout=15)
        if alive.text().strip() == "no":
            tail = await _log_tail(transport, dep.log_path)
            raise LabdeckError(f"The model server stopped while starting:\n{tail}")
        waited = int(time.monotonic() - t0)
        if waited != last and waited % 2 == 0:
            say(f"waiting for /health ({waited}s)")
            last = waited
        await asyncio.sleep(0.25)
    raise LabdeckError(f"The model server was not healthy within {HEALTH_TIMEOUT:g}s; see {dep.log_path}.")


def http_status(url: str, headers: dict[str, str] | None = None, timeout: float = 2) -> int:
    """The HTTP status of a GET (4xx/5xx included); OSError when nothing answers."""
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


async def _log_tail(transport: Transport, path: str, n: int = 4000) -> str:
    try:
        head = await transport.read_file(path, 0, 0)
        chunk = await transport.read_file(path, max(0, head.size - n), n)
        return chunk.data.decode("utf-8", "replace").strip()
    except LabdeckError:
        return "(no log)"


async def _kill_group(transport: Transport, pid: int | None, grace: float = 5.0) -> None:
    if pid:
        await kill_group(transport, pid, grace)


def check_stoppable(ws, dep: Deployment) -> None:
    """Raises :class:`LabdeckError` for a deployment that ``ws``'s user cannot stop: someone else's,
    or one already stopped or failed (asked before a confirmation, and again by :func:`stop`)."""
    if dep.user != ws.user:
        raise LabdeckError(f"The deployment {dep.name} belongs to {dep.user}.", "Only its owner can stop it.")
    if dep.state in ("stopped", "failed"):
        raise LabdeckError(f"The deployment {dep.name} " + ("has already failed." if dep.state == "failed" else "is already stopped."))


async def stop(ws, ref: str) -> Deployment:
    """Stop a deployment of yours: SIGTERM to litserve's process group, SIGKILL after a grace period."""
    dep = find(ws, ref)
    check_stoppable(ws, dep)
    transport = await ws.transport(dep.instance)
    await _kill_group(transport, dep.pid)
    ws.store.mine.put(Deployment.TABLE, dep.id, {**dep.to_dict(), "state": "stopped", "stopped_at": utcnow()})
    secret_path(ws, dep.id).unlink(missing_ok=True)
    return find(ws, dep.id)


def find(ws, ref: str) -> Deployment:
    deps, _ = ws.store.records(Deployment.TABLE)
    exact = [d for d in deps if d.id == ref.upper() or d.name == ref]
    live = [d for d in exact if d.state in ("starting", "healthy")]
    if live or exact:
        return (live or sorted(exact, key=lambda d: d.id))[-1]
    by_suffix = [d for d in deps if len(ref) >= 4 and d.id.lower().endswith(ref.lower())]
    if len(by_suffix) == 1:
        return by_suffix[0]
    raise NotFoundError(f"No deployment {ref!r}.", "`labdeck models` lists them.")


def secret_path(ws, name: str) -> Path:
    """Where a secret of the owner's (an API key, a notebook token) is kept: 0600, never in the team store."""
    return Path(ws.config.paths.data_dir) / "keys" / name


def save_secret(ws, name: str, value: str) -> None:
    p = secret_path(ws, name)
    p.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value)


def read_secret(ws, name: str) -> str | None:
    try:
        return secret_path(ws, name).read_text().strip()
    except FileNotFoundError:
        return None


async def is_this_machine(ws, instance: str) -> bool:
    """Whether ``instance`` is the machine labdeck runs on (its loopback is ours): ``local``."""
    transport = await ws.transport(instance)
    return getattr(transport, "spec", None) is None


def usage_lines(served: Served, *, detached: bool, local: bool) -> list[tuple[str, str]]:
    """What ``labdeck serve`` prints, as (markup label, plain text) pairs: the URL, the key, the
    teammate's ``ssh -L`` line and a curl line whose body has the model's real input width.
    Detached, labdeck's own forward is about to close, so no line points at it: on this machine the
    curl goes to the server's own port; elsewhere it goes to the port the ``ssh -L`` line opens."""
    d = served.deployment
    local_port = served.forward.local_port
    if detached:
        url = f"http://127.0.0.1:{served.remote_port}" if local else f"http://127.0.0.1:{local_port}"
    else:
        url = d.url
    body = None
    if served.input_width:
        from .modelshape import example_body

        body = example_body(served.input_width)
    out: list[tuple[str, str]] = [
        ("", f"{d.name} is up on {d.instance}, port {served.remote_port} (model {d.model or '?'})"),
        ("URL on the instance:  ", f"http://127.0.0.1:{served.remote_port}/predict")]
    if not detached:
        out.append(("URL here (labdeck's forward, while this runs):  ", f"{d.url}/predict"))
    out.append(("API key (shown once here; kept in a 0600 file of yours):  ", served.api_key))
    out.append(("from a laptop:  ", served.ssh_line))
    out.append(("  then, where that ssh line runs:  ", f"http://127.0.0.1:{local_port}/predict"))
    data = body if body is not None else '{"x": [[...]]}'
    out.append(("try it here:  " if detached and local else "try it:  ", f"curl -s -H 'X-API-Key: {served.api_key}' -H 'Content-Type: application/json' "
                             f"-d '{data}' {url}/predict"))
    if body is None:
        out.append(("", "  (the body's width is not known: labdeck reads it only from an .npz model, never by "
                        "loading a pickled one; put one row of the model's features in x)"))
    else:
        out.append(("", f"  (one row of {served.input_width} features, the width read from {d.model})"))
    if detached:
        out.append(("", f"labdeck's forward is closed; the server keeps running (labdeck unserve {d.name})"))
    else:
        out.append(("", "forwarding; ctrl+c closes the forward (the server keeps running)"))
    return out


def api_key(ws, dep_id: str) -> str | None:
    return read_secret(ws, dep_id)


def _hop_text(user: str | None, host: str, port: int) -> str:
    """One ``-J`` hop: ``user@host:port`` (an IPv6 address in brackets, as -J needs it)."""
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"{user + '@' if user else ''}{shown}{':' + str(port) if port != 22 else ''}"


def laptop_hop(config, user: str, environ=None) -> tuple[str, str, int] | None:
    """How a laptop reaches the machine labdeck runs on, as (user, host, port), when labdeck runs
    in an SSH session (on a jump host): ``[team] jump_host`` if set, else the address and port
    this session came in on (``SSH_CONNECTION``: ``client_ip client_port server_ip server_port``),
    as ``user``. None outside an SSH session: the laptop is this machine, or on its network."""
    environ = os.environ if environ is None else environ
    try:
        configured = config.get("team", "jump_host") if config is not None else ""
    except KeyError:
        configured = ""
    if configured:
        who, at, rest = configured.rpartition("@")
        host, port = rest, 22
        m = re.fullmatch(r"(\[[^]]+\]|[^:]+)(?::([0-9]+))?", rest)
        if m:
            host, port = m.group(1).strip("[]"), int(m.group(2) or 22)
        return (who if at else user), host, port
    parts = (environ.get("SSH_CONNECTION") or "").split()
    if len(parts) != 4:
        return None
    try:
        address = ipaddress.ip_address(parts[2].split("%")[0])
        port = int(parts[3])
    except ValueError:
        return None
    if address.is_loopback or not 0 < port < 65536:
        return None  # a session from this machine itself says nothing about laptops
    return user, str(address), port


def ssh_line(transport: Transport, local_port: int, remote_port: int,
             via: tuple[str, str, int] | None = None) -> str:
    """The command a teammate runs on a laptop to reach the server through the same chain.

    ``via`` (:func:`laptop_hop`): labdeck itself runs on a machine the laptop reaches over SSH
    (a jump host), so the line starts there: ``-J user@that-address`` before the host's own chain,
    or straight to that machine when the server runs on it.

    Plain OpenSSH, so it works anywhere. Through a jump host it is slower than labdeck's own forward:
    with no session on the jump connection (``-J`` cannot run one) OpenSSH leaves Nagle's algorithm
    on there, and a client that writes headers and body separately waits ~40 ms for a delayed ACK on
    some requests (measured on the rig: p50 1.2 ms, p99 45 ms, one client; tests/benchmarks/bench_serving.py)."""
    forward = f"ssh -N -L {local_port}:127.0.0.1:{remote_port}"
    spec = getattr(transport, "spec", None)  # SSH hosts and cloud instances: the host and its jump chain
    if spec is None:  # this machine (or a jump host itself): forward to it directly
        if via is None:
            return f"{forward} {os.uname().nodename}"
        user, host, port = via
        return f"{forward}{f' -p {port}' if port != 22 else ''} {user + '@' if user else ''}{host}"
    hops = ([_hop_text(*via)] if via is not None else []) + [_hop_text(j.user, j.hostname, j.port) for j in spec.jump]
    dest = f"{spec.user + '@' if spec.user else ''}{spec.hostname}"
    port = f" -p {spec.port}" if spec.port != 22 else ""
    return forward + (f" -J {','.join(hops)}" if hops else "") + f"{port} {dest}"


def predict(url: str, key: str | None, body: dict, timeout: float = 30) -> tuple[int, dict | str, float]:
    """POST a JSON body to ``url``/predict; (status, parsed body or text, seconds)."""
    data = json.dumps(body).encode()
    req = urllib.request.Request(f"{url}/predict", data=data, method="POST",
                                 headers={"Content-Type": "application/json", **({"X-API-Key": key} if key else {})})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    dt = time.perf_counter() - t0
    try:
        return status, json.loads(raw), dt
    except ValueError:
        return status, raw.decode("utf-8", "replace"), dt
