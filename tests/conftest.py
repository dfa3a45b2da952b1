from __future__ import annotations

pytest_plugins = ["tests.rig_fixtures"]

import asyncio
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest

from backends import clock as _clock
from backends.config import load_config
from backends.paths import Paths
from backends.workstation import Workstation


@pytest.fixture(autouse=True)
def _real_clock_after_each_test():
    """Whatever a test (or the demo state it built) pinned, the next test starts on the real clock."""
    before = _clock.pinned_source()
    yield
    _clock.pin(before)


@pytest.fixture(autouse=True)
def _no_background_follower(monkeypatch: pytest.MonkeyPatch):
    """No test starts a background follower (backends/daemon.py) by the way: commands that start work
    would otherwise leave one per test home. tests/test_daemon.py unsets this where it tests one."""
    monkeypatch.setenv("LABDECK_NO_DAEMON", "1")


@pytest.fixture
def home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private LABDECK_HOME: config, store, caches and run dirs all live under it.

    It is not inside ``tmp_path``, so tests can use ``tmp_path`` as a project to snapshot."""
    h = tmp_path_factory.mktemp("labdeck-home")
    monkeypatch.setenv("LABDECK_HOME", str(h))
    monkeypatch.delenv("LABDECK_TEAM_DIR", raising=False)
    monkeypatch.delenv("SSH_CONNECTION", raising=False)  # (the teammate's line: as if not in an SSH session)
    yield h
    stop_local_agent(h)


def stop_local_agent(home: Path) -> None:
    """End the monitoring agent a test started on `local` under ``home`` (it would otherwise wait
    10 minutes for a reader before leaving by itself): every process whose command line runs that
    home's agent.py. Looked for twice, as one may have been starting (detached) when the test ended."""
    import time

    if not (home / "data" / "agent").exists():
        return  # no agent was ever started here
    needle = str(home / "data" / "agent").encode() + b"/"  # <agents dir>/<host id>/agent.py
    for attempt in range(2):
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmd = (proc / "cmdline").read_bytes()
                if needle in cmd and b"/agent.py\0" in cmd:
                    os.kill(int(proc.name), signal.SIGTERM)
            except (OSError, ProcessLookupError):
                continue
        if attempt == 0:
            time.sleep(0.3)


@pytest.fixture
def workstation(home: Path):
    ws = Workstation(load_config(Paths.resolve(home)))
    yield ws
    # end any job a test left running (by the pid its run recorded)
    runs, _ = ws.store.runs(team=False)
    for r in runs:
        if r.pid and r.run_state.is_active:
            try:
                os.killpg(r.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    ws.store.close()


def live_group_members(pgid: int) -> list[int]:
    """Pids of processes in group ``pgid`` that are not zombies (zombies wait for init to reap them)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(entry))
    return out


async def group_gone(pgid: int, timeout: float = 20.0) -> list[int]:
    """The live members of process group ``pgid`` once none is left, or those still there after
    ``timeout`` s. A member SIGKILLed at the end of a grace period is only gone when its exit is done
    (its memory freed), which on a busy machine can take longer than a fixed sleep before the check."""
    deadline = time.monotonic() + timeout
    while (alive := live_group_members(pgid)) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return alive


async def until(pred, timeout: float, what: str, poll: float = 0.05):
    """What ``pred()`` returns once it is true, polled on the event loop for at most ``timeout`` s;
    past that an AssertionError saying what was waited for."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        await asyncio.sleep(poll)
    raise AssertionError(f"not within {timeout:g}s: {what}")


async def wait_final(ws, run_id: str, timeout: float = 60.0, poll: float = 0.1):
    """Refresh until the run reaches a final state; the run (or an AssertionError naming it)."""
    import asyncio
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await ws.refresh_runs()
        run = ws.store.find_run(run_id)
        if run.run_state.is_final:
            return run
        await asyncio.sleep(poll)
    raise AssertionError(f"run {run_id} did not finish: {ws.store.find_run(run_id)}")


@pytest.fixture
def keypair(tmp_path: Path) -> Path:
    """A fresh ed25519 key pair (the private key's path; ``.pub`` beside it), e.g. to import to a cloud."""
    import subprocess

    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "id")], check=True)
    return tmp_path / "id"


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """AWS credentials in the environment, for the moto server (tests/ec2shim.py)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDLABDECKTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.delenv("AWS_PROFILE", raising=False)


def provider_toml(name: str, values: dict) -> str:
    """A ``[providers.NAME]`` table from Python values (JSON literals are TOML literals here)."""
    import json

    return f"[providers.{name}]\n" + "".join(
        f"{k} = {('true' if v else 'false') if isinstance(v, bool) else json.dumps(v)}\n" for k, v in values.items())


@pytest.fixture
def shared_dir():
    """A directory every user can traverse (pytest's tmp_path lives under a 0700 dir)."""
    d = Path(tempfile.mkdtemp(prefix="ldtest-store-", dir="/tmp"))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        for p in d.rglob("*"):  # make sure a read-only dir cannot stop the cleanup
            if p.is_dir() and not p.is_symlink():
                os.chmod(p, 0o755)
        shutil.rmtree(d, ignore_errors=True)
        assert not d.exists()


def node_host_id(node) -> str:
    """The host id (backends/hostid.py) of a rig host, as worked out there by its own user, without SSH."""
    from backends.hostid import HOST_ID_FN, check_host_id

    res = node.run_as_user(HOST_ID_FN + "hostid", check=True)
    return check_host_id(res.stdout.strip(), node.name)
