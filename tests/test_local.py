"""The `local` provider and transport, and jobs on them, with real processes and files."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path

import pytest

from backends import jobs
from backends.errors import LabdeckError, ProviderError, TransportError
from backends.models import RunState
from backends.providers.base import InstanceSpec
from backends.providers.local import LocalProvider, LocalTransport, host_facts
from backends.workstation import Workstation

from .conftest import group_gone, wait_final


def test_local_instance_is_this_machine() -> None:
    facts = host_facts()
    assert facts["vcpus"] == os.cpu_count()
    with open("/proc/meminfo") as f:
        total_kib = int(f.readline().split()[1])
    assert abs(facts["memory_mib"] - total_kib // 1024) <= 1
    assert facts["host"] == socket.gethostname() or facts["host"] == os.uname().nodename
    if not facts["gpus"]:
        assert facts["gpu_note"]  # says why there are none


async def test_provider_contract(tmp_path: Path) -> None:
    p = LocalProvider("local", {"price_per_hour": 0.5}, runs_root=tmp_path)
    [inst] = await p.list_instances()
    assert (inst.name, inst.state, inst.price_per_hour) == ("local", "running", 0.5)
    assert (await p.describe("local")).vcpus == os.cpu_count()
    for call in (p.create(InstanceSpec(name="x")), p.start("local"), p.stop("local"), p.destroy("local")):
        with pytest.raises(ProviderError, match="this machine"):
            await call
    with pytest.raises(ProviderError):
        await p.describe("other")
    assert await LocalProvider("local", {"enabled": False}, runs_root=tmp_path).list_instances() == []


async def test_no_nvml_noise(capfd) -> None:
    from backends.gpu import probe_gpus

    probe_gpus.cache_clear()
    probe_gpus()
    probe_gpus()
    out, err = capfd.readouterr()
    assert "NVML" not in out + err


async def test_transport_run_read_put(tmp_path: Path) -> None:
    t = LocalTransport(tmp_path)
    res = await t.run("echo out; echo err >&2; exit 3", env={"X": "1"})
    assert (res.exit_code, res.stdout, res.stderr) == (3, b"out\n", b"err\n")
    assert (await t.run("printf %s \"$X\"", env={"X": "a b"})).stdout == b"a b"
    assert (await t.run("cat", input=b"hello")).stdout == b"hello"
    with pytest.raises(TransportError, match="longer than"):
        await t.run("sleep 5", timeout=0.2)
    await t.put_files({str(tmp_path / "d" / "f.txt"): b"0123456789"}, mode=0o600)
    assert oct((tmp_path / "d" / "f.txt").stat().st_mode & 0o777) == "0o600"
    chunk = await t.read_file(str(tmp_path / "d" / "f.txt"), 4, 3)
    assert (chunk.data, chunk.offset, chunk.next_offset, chunk.size) == (b"456", 4, 7, 10)
    with pytest.raises(TransportError, match="No file"):
        await t.read_file(str(tmp_path / "missing"))


async def test_detached_process_has_its_own_session(tmp_path: Path) -> None:
    t = LocalTransport(tmp_path)
    pid = await t.start_detached("echo $$ > pid.tmp && mv pid.tmp pid; sleep 30", cwd=str(tmp_path),
                                 log_path=str(tmp_path / "log"))
    try:
        for _ in range(50):
            if (tmp_path / "pid").exists():
                break
            await asyncio.sleep(0.05)
        assert int((tmp_path / "pid").read_text()) == pid
        assert os.getsid(pid) == pid and os.getpgid(pid) == pid
        assert os.getsid(pid) != os.getsid(0)
        assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
    finally:
        os.killpg(pid, 9)


async def test_port_forward_relays(tmp_path: Path) -> None:
    async def echo(reader, writer):
        writer.write(b"echo:" + await reader.read(100))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    fwd = await LocalTransport(tmp_path).forward_port(port)
    try:
        assert fwd.local_port and fwd.local_port != port
        r, w = await asyncio.open_connection("127.0.0.1", fwd.local_port)
        w.write(b"ping")
        await w.drain()
        assert await asyncio.wait_for(r.read(100), 5) == b"echo:ping"
        w.close()
    finally:
        await fwd.close()
        server.close()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", fwd.local_port)


async def test_example_job_runs_to_success(workstation: Workstation) -> None:
    run = await workstation.launch_example()
    assert run.state == "running" and run.pid
    done = await wait_final(workstation, run.id, 60)
    assert done.state == "succeeded" and done.exit_code == 0
    assert done.last_line.startswith("done: final loss=")
    log = await workstation.log_tail(run.id)
    assert "step=300 loss=" in log
    rd = Path(done.run_dir)
    assert (rd / "model.npz").exists()
    assert (rd / "exit_code").read_text().strip() == "0"
    assert int((rd / "pid").read_text()) == done.pid
    assert (rd / "started_at").read_text().strip() and (rd / "ended_at").read_text().strip()


@pytest.mark.parametrize("command, state, code, needle", [
    ("exit 1", "failed", 1, None),
    ("no-such-command-xyz", "failed", 127, "not found"),
    (f"{sys.executable} -c \"import sys; sys.stdout.buffer.write(bytes(range(256)) + b'\\\\nend')\"", "succeeded", 0, "end"),
    (f"{sys.executable} -c \"print('x' * 10_000_000)\"", "succeeded", 0, None),
])
async def test_bad_jobs_end_in_the_right_state(workstation: Workstation, tmp_path: Path, command, state, code, needle) -> None:
    run = await workstation.launch(command, workdir=str(tmp_path))
    done = await wait_final(workstation, run.id)
    assert (done.state, done.exit_code) == (state, code)
    if needle:
        assert needle in done.last_line
    assert len(done.last_line) <= 300
    assert isinstance(await workstation.log_tail(run.id), str)


async def test_env_and_workdir(workstation: Workstation, tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "data.txt").write_text("snapshot me")
    cmd = 'printf "%s|%s|%s|%s" "$A" "$LABDECK_RUN_ID" "$PWD" "$(cat data.txt)"'
    run = await workstation.launch(cmd, workdir=str(tmp_path / "sub"), env={"A": "it's $x"})
    done = await wait_final(workstation, run.id)
    # outside git, the directory itself is the snapshot; the job runs in the run's own copy
    assert run.workdir == f"{run.run_dir}/code"
    assert done.last_line == f"it's $x|{run.id}|{run.run_dir}/code|snapshot me"
    assert done.code["files"] == 1 and done.code["synced_files"] == 1 and not done.code["is_git"]
    # in place, without a snapshot
    run = await workstation.launch(cmd, workdir=str(tmp_path / "sub"), env={"A": "b"}, sync_code=False)
    done = await wait_final(workstation, run.id)
    assert done.last_line == f"b|{run.id}|{tmp_path / 'sub'}|snapshot me"


async def test_missing_workdir_fails_clearly(workstation: Workstation, tmp_path: Path) -> None:
    with pytest.raises(LabdeckError, match="nope is not a directory"):  # caught before anything starts
        await workstation.launch("true", workdir=str(tmp_path / "nope"))
    assert workstation.store.runs()[0] == []
    run = await workstation.launch("true", workdir=str(tmp_path / "nope"), sync_code=False)
    done = await wait_final(workstation, run.id)
    assert done.state == "failed" and "cannot enter the working directory" in done.last_line


async def test_cancel_stops_the_whole_process_group(workstation: Workstation, tmp_path: Path) -> None:
    run = await workstation.launch("sleep 60 & sleep 60; wait", workdir=str(tmp_path))
    await asyncio.sleep(0.3)
    assert os.getpgid(run.pid) == run.pid
    workstation.config.values["jobs"]["cancel_grace_seconds"] = 2.0
    done = await workstation.cancel(run.id)
    assert done.state == "cancelled" and done.ended_at
    assert await group_gone(run.pid) == []
    with pytest.raises(LabdeckError, match="already cancelled"):
        await workstation.cancel(run.id)
    # a later refresh does not resurrect or re-finish it
    await workstation.refresh_runs()
    assert workstation.store.find_run(run.id).state == "cancelled"


async def test_killed_job_is_failed_not_running(workstation: Workstation, tmp_path: Path) -> None:
    run = await workstation.launch("sleep 60", workdir=str(tmp_path))
    await asyncio.sleep(0.2)
    os.killpg(run.pid, 9)  # the wrapper dies too: no exit code is ever written
    done = await wait_final(workstation, run.id)
    assert done.state == "failed" and "without an exit code" in done.state_reason


async def test_vanished_run_dir_is_lost(workstation: Workstation, tmp_path: Path) -> None:
    import shutil

    run = await workstation.launch("sleep 60", workdir=str(tmp_path))
    await asyncio.sleep(0.2)
    os.killpg(run.pid, 9)
    shutil.rmtree(run.run_dir)
    await workstation.refresh_runs()
    assert workstation.store.find_run(run.id).state == RunState.LOST.value


async def test_parent_must_exist(workstation: Workstation, tmp_path: Path) -> None:
    with pytest.raises(LabdeckError, match="No run"):
        await workstation.launch("true", workdir=str(tmp_path), parent="NOPE1234")
    with pytest.raises(LabdeckError, match="empty"):
        await jobs.launch(workstation.store, LocalTransport(tmp_path), instance="local", command="  ",
                          workdir=str(tmp_path), runs_root=str(tmp_path))
    first = await workstation.launch("true", workdir=str(tmp_path), name="first")
    child = await workstation.launch("true", workdir=str(tmp_path), parent="first")
    assert child.parent == first.id



async def test_git_snapshot_records_commit_diff_and_untracked(workstation: Workstation, tmp_path: Path) -> None:
    import subprocess

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    git("config", "user.email", "t@example.com")
    git("config", "user.name", "t")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "train.py").write_text("print('v1')\n")
    (tmp_path / ".gitignore").write_text("data/\n")
    git("add", ".")
    git("commit", "-qm", "v1")
    (tmp_path / "sub" / "train.py").write_text("print('v2')\n")  # uncommitted change
    (tmp_path / "sub" / "new.py").write_text("x = 1\n")  # untracked, not ignored
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "big.bin").write_bytes(b"0" * 1000)  # ignored: does not travel
    run = await workstation.launch("python3 train.py; ls", workdir=str(tmp_path / "sub"))
    done = await wait_final(workstation, run.id)
    assert done.state == "succeeded"
    assert run.workdir == f"{run.run_dir}/code/sub"
    log = await workstation.log_tail(run.id)
    assert "v2" in log and "new.py" in log
    assert not (Path(run.run_dir) / "code" / "data").exists()
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert done.code["commit"] == head and done.code["dirty"] and done.code["untracked"] == ["sub/new.py"]
    diff = workstation.store.read_blob(workstation.user, done.code["diff_blob"]).decode()
    assert "-print('v1')" in diff and "+print('v2')" in diff
    # a second run with one file changed sends only that file
    (tmp_path / "sub" / "new.py").write_text("x = 2\n")
    run2 = await workstation.launch("true", workdir=str(tmp_path / "sub"))
    assert (await wait_final(workstation, run2.id)).code["synced_files"] == 1


async def test_queue_runs_jobs_in_order_with_a_slot_limit(workstation: Workstation, tmp_path: Path) -> None:
    from backends import jobs as jobs_mod
    from backends.providers.local import LocalTransport

    transport = LocalTransport(Path(workstation.config.paths.runs_dir))
    runs = []
    for i in range(3):
        runs.append(await jobs_mod.launch(
            workstation.store, transport, instance="local", command=f"echo start {i} >> {tmp_path}/order; sleep 0.6",
            workdir=str(tmp_path), runs_root=await transport.runs_root(), sync_code=False, max_concurrent=1))
    assert [r.state for r in runs] == ["running", "queued", "queued"]
    for r in runs:
        assert (await wait_final(workstation, r.id)).state == "succeeded"
    assert (tmp_path / "order").read_text().split("\n")[:3] == ["start 0", "start 1", "start 2"]
    started = [workstation.store.find_run(r.id).started_at for r in runs]
    assert started == sorted(started)


async def test_runs_on_an_instance_that_no_longer_exists_become_lost(home: Path, tmp_path: Path) -> None:
    from backends.config import load_config
    from backends.paths import Paths

    ws = Workstation(load_config(Paths.resolve(home)))
    run = await ws.launch("sleep 30", workdir=str(tmp_path), sync_code=False)
    try:
        (home / "config.toml").write_text("[providers.local]\nenabled = false\n")  # the instance is gone
        ws2 = Workstation(load_config(Paths.resolve(home)))
        await ws2.refresh_runs()
        r = ws2.store.find_run(run.id)
        assert r.state == "lost" and "no longer exists" in r.state_reason
    finally:
        os.killpg(run.pid, 9)


def make_venv(where: Path) -> Path:
    """A venv off this interpreter (its packages visible), not on anyone's PATH; its ``bin/python``."""
    import subprocess

    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(where)], check=True,
                   timeout=120)
    return where / "bin" / "python"


def decoy_python3(where: Path, target: str = sys.executable) -> Path:
    """A directory whose ``python3`` is another interpreter (a link: its sys.executable is the link)."""
    where.mkdir()
    (where / "python3").symlink_to(target)
    return where


# waits for the record the wrapper (or the job) writes at its start, so the run's end reads it
WAIT_ENV = ("import json, os, time\n"
            "p = os.environ['LABDECK_RUN_DIR'] + '/environment.json'\n"
            "while not os.path.exists(p) or WANT not in open(p).read():\n"
            "    time.sleep(0.02)\n")


async def test_the_recorded_interpreter_is_the_one_the_command_ran(workstation: Workstation, tmp_path: Path,
                                                                  monkeypatch) -> None:
    """environment.json names the interpreter the job ran, not whatever `python3` is first on labdeck's
    PATH: the command's own first word, found with the job's own PATH; or, when the job imports
    labdeck, its sys.executable (here under `sh -c`, where the command line names no Python)."""
    venv_python = make_venv(tmp_path / "venv")
    decoy = decoy_python3(tmp_path / "decoy")
    monkeypatch.setenv("PATH", f"{decoy}:{os.environ['PATH']}")  # labdeck's PATH: python3 is not the venv's
    job = tmp_path / "job"
    job.mkdir()
    (job / "wait.py").write_text(WAIT_ENV.replace("WANT", "'\"executable\"'"))
    (job / "imports.py").write_text("import labdeck\n" + WAIT_ENV.replace("WANT", "'\"job\"'"))

    # the command's first word, a venv that is on no PATH
    run = await workstation.launch(f"{venv_python} wait.py", workdir=str(job), sync_code=False)
    env = (await wait_final(workstation, run.id)).environment
    assert env["executable"] == str(venv_python) and env["recorded_by"] == "command"
    # `python` found with the job's own PATH (--env), not labdeck's
    run = await workstation.launch("python wait.py", workdir=str(job), sync_code=False,
                                   env={"PATH": f"{venv_python.parent}:{os.environ['PATH']}"})
    assert (await wait_final(workstation, run.id)).environment["executable"] == str(venv_python)
    # the job says itself: `import labdeck` records sys.executable, and the wrapper's guess does not overwrite it
    run = await workstation.launch(f"sh -c 'exec {venv_python} imports.py'", workdir=str(job), sync_code=False)
    done = await wait_final(workstation, run.id)
    assert done.state == "succeeded", done.last_line
    assert done.environment["executable"] == str(venv_python) and done.environment["recorded_by"] == "job"
    assert done.environment["packages"] and "environment.json" not in done.artifacts
    assert not [a for a in done.artifacts if "environment" in a]  # no temp file left behind


def test_job_python_reads_the_commands_interpreter() -> None:
    assert jobs.job_python("/opt/venv/bin/python train.py") == "/opt/venv/bin/python"
    assert jobs.job_python("CUDA_VISIBLE_DEVICES=0 exec .venv/bin/python3.11 -u t.py") == ".venv/bin/python3.11"
    assert jobs.job_python("env -i PATH=/x python t.py --lr 1") == "python"
    for command in ("torchrun t.py", "bash run.sh", "cd x && python t.py", "", "python 'unbalanced", "pythonista"):
        assert jobs.job_python(command) == "python3", command


async def test_new_log_lines_do_not_commit_to_the_journal(workstation: Workstation, tmp_path: Path, monkeypatch) -> None:
    """A running run's new last lines and the follower's log offset go to its status file: the
    journal does not grow while the job logs, yet the Jobs tab (Store.runs) and a teammate see the
    current line; the final transition journals the last line once."""
    from backends import follow
    from backends.store import Store

    monkeypatch.setattr(follow, "SAVE_OFFSET_EVERY", 0.0)  # the follower saves its offset on every read
    monkeypatch.setattr(follow, "RECORD_FIRST", 3600.0, raising=False)
    job = ("for i in 1 2 3 4 5; do echo \"line $i\"; while [ ! -e go$i ]; do sleep 0.02; done; done; echo last")
    run = await workstation.launch(job, workdir=str(tmp_path), sync_code=False)
    task = workstation.follower.start(run)
    store_dir = workstation.store.mine.dir

    async def shows(line: str) -> None:
        for _ in range(500):
            await workstation.refresh_runs()
            if workstation.store.find_run(run.id).last_line == line:
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"never showed {line!r}: {workstation.store.find_run(run.id).last_line!r}")

    await shows("line 1")
    before = {p.name: p.read_bytes() for p in store_dir.glob("journal-*.jsonl")}
    teammate = Store(workstation.config.team_dir, "teammate")
    for i in range(2, 6):
        (tmp_path / f"go{i - 1}").touch()
        await shows(f"line {i}")
        assert teammate.find_run(run.id).last_line == f"line {i}"
    while workstation.follower.offset(run) < len("line 1\nline 2\nline 3\nline 4\nline 5\n"):
        await asyncio.sleep(0.02)
    for _ in range(100):  # the follower's offset in the status file (read over the record)
        if workstation.store.find_run(run.id).log_offset:
            break
        await asyncio.sleep(0.02)
    assert workstation.store.find_run(run.id).log_offset > 0
    assert {p.name: p.read_bytes() for p in store_dir.glob("journal-*.jsonl")} == before  # no commit at all
    (tmp_path / "go5").touch()
    done = await asyncio.wait_for(task, 30)
    assert done.state == "succeeded"
    record = workstation.store.mine.get("runs", run.id)
    assert record["last_line"] == "last" and record["log_offset"] == len("line 1\nline 2\nline 3\nline 4\nline 5\nlast\n")
    assert not (store_dir / "status" / f"{run.id}.json").exists()


async def test_a_refresh_between_the_kill_and_the_record_keeps_it_cancelled(workstation: Workstation, tmp_path: Path,
                                                                           monkeypatch) -> None:
    """The follower or a refresh can see the job end (killed by cancel's signal) before cancel records it:
    the run is cancelled, not failed by the signal, and cancel does not trip over a final state."""
    from backends import jobs

    run = await workstation.launch("sleep 60", workdir=str(tmp_path), sync_code=False)
    real_kill = jobs.kill_group
    seen = []

    async def kill_then_refresh(transport, pgid, grace_seconds=10.0, **kw):
        where = await real_kill(transport, pgid, grace_seconds, **kw)
        seen.extend(await workstation.refresh_runs())  # what a concurrent refresh would record
        return where

    monkeypatch.setattr(jobs, "kill_group", kill_then_refresh)
    done = await workstation.cancel(run.id)
    assert done.state == "cancelled" and done.state_reason.startswith("cancelled by")
    assert [r.state for r in seen if r.id == run.id] == ["cancelled"]  # the refresh saw it end, as cancelled
    assert workstation.store.find_run(run.id).state == "cancelled"


def test_snapshot_skips_a_file_removed_while_it_is_taken(tmp_path: Path, monkeypatch) -> None:
    """`labdeck run` from a shared directory (/tmp) where another program removes a file between
    labdeck's listing and its read: that file is left out, no FileNotFoundError traceback."""
    from backends import code

    (tmp_path / "keep.py").write_text("print(1)\n")
    (tmp_path / "gone.tmp").write_text("scratch\n")
    real = code.HashCache.sha

    def vanishing(self, p, st):
        if p.name == "gone.tmp":
            p.unlink()  # the other program wins the race: open() below meets a missing file
        return real(self, p, st)

    monkeypatch.setattr(code.HashCache, "sha", vanishing)
    snap = code.snapshot(tmp_path)
    assert set(snap.files) == {"keep.py"}
