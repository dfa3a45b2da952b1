"""The team directory is untrusted input (issue 14): what one user writes there cannot make another
user's labdeck list it as someone else's, act on it as theirs, hang, run out of memory, crash, or
write through a link.

Real Unix users: ``mallory`` writes hostile records and files (with the store's own API, as her,
and by hand), ``alice`` reads them (also as a real user; root plays a third viewer where the
viewer's identity does not matter). Every case runs the reader in a subprocess with a timeout and a
memory limit, so the code as it was (which blocked on a FIFO and read /dev/zero without end) fails
the test instead of hanging it.
"""

from __future__ import annotations

import fcntl
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from backends import ids
from backends.models import Run
from backends.store import SNAPSHOT

from .teammates import remove_user

REPO = Path(__file__).resolve().parents[1]
T0 = 1_700_000_000_000


def ulid_at(ms: int, rand: int = 0) -> str:
    value = (ms << 80) | rand
    return "".join(ids._ALPHABET[(value >> (5 * i)) & 31] for i in reversed(range(26)))


# ---- real users -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def people():
    """Two real unprivileged users. The attacker's name sorts first: a store read in name order
    met her records before the victim's."""
    if os.geteuid() != 0 or not shutil.which("useradd"):
        pytest.skip("needs root and useradd to create real users")
    tag = os.getpid() % 10000
    names = {"mallory": f"ldt{tag}a", "alice": f"ldt{tag}b"}
    made = []
    try:
        for who, name in names.items():
            subprocess.run(["userdel", "-f", name], capture_output=True)  # a leftover of a killed run
            subprocess.run(["useradd", "-M", "-N", "-s", "/usr/sbin/nologin", name], check=True, capture_output=True)
            made.append(name)
        yield {who: pwd.getpwnam(name) for who, name in names.items()}
    finally:
        for name in made:
            remove_user(name)


def shared_team(shared_dir: Path) -> Path:
    """The team directory as an administrator makes it: install -d -m 1777 -o root."""
    team = shared_dir / "team"
    team.mkdir()
    os.chmod(team, 0o1777)
    return team


_PRELUDE = """
import json, os, sys, resource, asyncio
from pathlib import Path
import backends.store as S
import backends.jobs as J
from backends.errors import LabdeckError, StoreError, NotFoundError
from backends.models import Run
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))  # the old code read /dev/zero until memory ran out
uid, gid, me, team = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
if uid >= 0:
    os.setgroups([]); os.setgid(gid); os.setuid(uid)
out = {}
def err(e):
    return {"type": type(e).__name__, "message": str(e), "hint": getattr(e, "hint", "")}
"""


def as_user(pw, team: Path, code: str, *, timeout: float = 30) -> dict:
    """Run ``code`` as ``pw`` (None: root, as the viewer ``viewer``) with ``team``; it fills ``out``."""
    uid, gid, me = (pw.pw_uid, pw.pw_gid, pw.pw_name) if pw is not None else (-1, -1, "viewer")
    script = _PRELUDE + textwrap.dedent(code) + "\nprint(json.dumps(out))\n"
    try:
        proc = subprocess.run([sys.executable, "-c", script, str(uid), str(gid), me, str(team)], cwd=REPO,
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        pytest.fail(f"reading the team directory hung for {timeout} s")
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_runs(pw, team: Path, docs: list[dict]) -> None:
    """``pw`` puts these documents into their own store with the store's API (as themselves)."""
    as_user(pw, team, f"""
        st = S.Store(team, me)
        for d in {docs!r}:
            st.mine.put("runs", d["id"], d)
    """)


def run_doc(k: int, **kw) -> dict:
    d = Run(command=f"python train.py --k {k}", instance="local", id=ulid_at(T0 + k, 7), name=f"r{k}").to_dict()
    del d["user"]  # (this process's user: the writer's store says whose it is)
    d.update(kw)
    return d


# Open the store as the user; a StoreError (the team or own directory refused) goes into out["error"].
OPEN_OWN_STORE = """
    try:
        S.Store(team, me)
    except StoreError as e:
        out["error"] = err(e)
"""

LIST = """
    st = S.Store(team, me)
    runs, errors = st.runs()
    out["runs"] = [[r.user, r.id, r.name] for r in runs]
    out["errors"] = errors
"""


# ---- impersonation ----------------------------------------------------------------------------


def test_a_record_claiming_another_user_is_refused_not_listed_as_theirs(people, shared_dir) -> None:
    team = shared_team(shared_dir)
    alice, mallory = people["alice"].pw_name, people["mallory"].pw_name
    write_runs(people["alice"], team, [run_doc(1, name="mine")])
    write_runs(people["mallory"], team, [run_doc(2, name="forged", user=alice), run_doc(3, name="honest")])
    out = as_user(people["alice"], team, LIST)
    assert sorted(map(tuple, out["runs"])) == sorted([(alice, ulid_at(T0 + 1, 7), "mine"),
                                                      (mallory, ulid_at(T0 + 3, 7), "honest")])
    err = out["errors"][mallory]
    assert "\n" not in err and "claims to be" in err and ulid_at(T0 + 2, 7) in err


def test_a_directory_named_for_someone_else_is_skipped(people, shared_dir) -> None:
    """mallory makes team/<alice's name> before alice ever ran labdeck, and team/<a third name>:
    neither is read as that user's store (root views, as a third user)."""
    team = shared_team(shared_dir)
    alice, mallory = people["alice"], people["mallory"]
    for name in (alice.pw_name, "carol"):
        as_user(mallory, team, f"""
            us = S.UserStore(team / {name!r}, writable=False)
            os.mkdir(team / {name!r}, 0o755)
            fd = os.open(team / {name!r} / "store.json", os.O_WRONLY | os.O_CREAT, 0o644)
            os.write(fd, json.dumps({{"runs": {{d["id"]: d for d in [{run_doc(5, name="planted")!r}]}}}}).encode())
        """)
    out = as_user(None, team, LIST)
    assert out["runs"] == []
    for name in (alice.pw_name, "carol"):
        assert f"belongs to {mallory.pw_name}, not to {name}" in out["errors"][name]


def test_cancel_kills_only_the_pid_in_your_own_record(people, shared_dir) -> None:
    """mallory copies the id of alice's running run into her store, with a pid of another process
    group of alice's: alice's cancel (by id, by name, or with mallory's Run object in hand) signals
    the pid of alice's own record only."""
    team = shared_team(shared_dir)
    alice, mallory = people["alice"], people["mallory"]
    rid = ulid_at(T0 + 9, 9)
    write_runs(alice, team, [run_doc(9, id=rid, name="train", state="running", pid=424242)])
    write_runs(mallory, team, [run_doc(9, id=rid, name="train", state="running", pid=31337, user=alice.pw_name)])
    out = as_user(alice, team, f"""
        class Fake:
            instance = "local"
            def __init__(self): self.scripts = []
            async def run(self, script, timeout=None):
                from backends.providers.base import CommandResult
                self.scripts.append(script)
                return CommandResult(0, b"", b"")
        st = S.Store(team, me)
        out["by_id"] = [st.find_run({rid!r}).pid, st.find_run({rid.lower()[-8:]!r}).pid, st.find_run("train").pid]
        forged = Run.from_dict({run_doc(9, id=rid, name="train", state="running", pid=31337, user=alice.pw_name)!r})
        t = Fake()
        asyncio.run(J.cancel(st, t, forged, grace_seconds=0))
        out["scripts"] = t.scripts
        out["state"] = st.own_run({rid!r}).state
    """)
    assert out["by_id"] == [424242, 424242, 424242]
    assert len(out["scripts"]) == 1 and "-424242" in out["scripts"][0] and "31337" not in out["scripts"][0]
    assert out["state"] == "cancelled"


def test_a_name_several_users_have_asks_which(people, shared_dir) -> None:
    team = shared_team(shared_dir)
    alice, mallory = people["alice"], people["mallory"]
    a_id, m_id = ulid_at(T0 + 20, 1), ulid_at(T0 + 21, 2)  # mallory's is newer
    write_runs(alice, team, [run_doc(20, id=a_id, name="sweep")])
    write_runs(mallory, team, [run_doc(21, id=m_id, name="sweep")])
    out = as_user(alice, team, f"""
        st = S.Store(team, me)
        try:
            st.find_run("sweep")
        except NotFoundError as e:
            out["ambiguous"] = err(e)
        try:
            st.find_run({os.path.commonprefix([a_id, m_id])!r})
        except NotFoundError as e:
            out["prefix"] = err(e)
        out["picked"] = [st.find_run(f"{{me}}/sweep").id, st.find_run({mallory.pw_name + '/sweep'!r}).id,
                         st.find_run({mallory.pw_name + '/' + m_id[-6:]!r}).id]
    """)
    e = out["ambiguous"]
    assert e["type"] == "AmbiguousError"
    assert f"{alice.pw_name}/{a_id}" in e["message"] and f"{mallory.pw_name}/{m_id}" in e["message"]
    assert "user/name" in e["hint"]
    assert out["prefix"]["type"] == "AmbiguousError" and "matches 2 runs" in out["prefix"]["message"]
    assert out["picked"] == [a_id, m_id, m_id]


# ---- hostile files ------------------------------------------------------------------------------


def _as_mallory_file(path: Path, mallory) -> None:
    os.lchown(path, mallory.pw_uid, mallory.pw_gid)


HOSTILE = ["missing-fields", "wrong-types", "bad-id", "deep-nesting", "fifo-snapshot", "dev-zero-journal",
           "directory-snapshot", "oversize-journal", "invalid-utf8", "fifo-lock"]


@pytest.mark.parametrize("kind", HOSTILE)
def test_hostile_files_of_a_teammate_are_one_error_line(people, shared_dir, kind: str) -> None:
    """Whatever mallory's files hold, alice's own runs are listed, mallory's store (or the bad
    record) is skipped with one line, and nothing blocks, eats memory or raises."""
    team = shared_team(shared_dir)
    alice, mallory = people["alice"], people["mallory"]
    write_runs(alice, team, [run_doc(1, name="mine")])
    write_runs(mallory, team, [run_doc(2, name="fine")])
    d = team / mallory.pw_name
    cap_patch = ""
    if kind == "missing-fields":
        write_runs(mallory, team, [{"id": ulid_at(T0 + 3, 3), "name": "no command"}])
    elif kind == "wrong-types":
        write_runs(mallory, team, [run_doc(3, name=["x"]), run_doc(4, state=5), run_doc(5, tags=[{}]),
                                   run_doc(6, started_at="not a time"), run_doc(7, pid=10 ** 30),
                                   run_doc(8, code={"commit": "--output=/tmp/x"})])
    elif kind == "bad-id":
        write_runs(mallory, team, [run_doc(3, id="../../../etc/x"), run_doc(4, id="[/]")])
    elif kind == "deep-nesting":
        # (padded: not denser than real records, so it is the parser's depth that refuses it)
        (d / SNAPSHOT).write_bytes(b'{"runs": {"a": ' + b"[" + b" " * 20 * 200_000 + b"[" * 200_000
                                   + b"]" * 200_000 + b" " * 20 * 200_000 + b"]" + b"}}")
    elif kind == "fifo-snapshot":
        (d / SNAPSHOT).unlink()
        os.mkfifo(d / SNAPSHOT, 0o644)
    elif kind == "dev-zero-journal":
        os.symlink("/dev/zero", d / "journal-1.jsonl")
    elif kind == "directory-snapshot":
        (d / SNAPSHOT).unlink()
        (d / SNAPSHOT).mkdir()
    elif kind == "oversize-journal":
        line = json.dumps({"t": "runs", "id": ulid_at(T0 + 4, 4), "d": run_doc(4)}).encode() + b"\n"
        (d / "journal-1.jsonl").write_bytes(line * ((2 << 20) // len(line) + 1))
        cap_patch = "S.TEAMMATE_FILE_CAP = 1 << 20"
    elif kind == "invalid-utf8":
        (d / SNAPSHOT).write_bytes(b'{"_meta": {"1": {"gen": 1, "schema": 1}}, "runs": {"a": {"name": "\xff\xfe"}}}')
    elif kind == "fifo-lock":
        (d / ".lock").unlink()
        os.mkfifo(d / ".lock", 0o644)
    for p in d.iterdir():
        _as_mallory_file(p, mallory)
    out = as_user(alice, team, cap_patch + "\n" + textwrap.dedent(LIST), timeout=20)
    names = {r[2]: r[0] for r in out["runs"]}
    assert names.get("mine") == alice.pw_name
    if kind == "fifo-lock":  # a lock that is not a file guards nothing: the store is read past it
        assert names.get("fine") == mallory.pw_name and out["errors"] == {}
        return
    err = out["errors"].get(mallory.pw_name, "")
    assert err and "\n" not in err and "Traceback" not in err
    if kind in ("missing-fields", "wrong-types", "bad-id"):
        assert names.get("fine") == mallory.pw_name  # only the bad records are skipped
        assert set(names) == {"mine", "fine"}
        assert "records skipped" in err and "[/]" not in err  # (ids shown escaped: no markup reaches a console)
    else:
        assert set(names) == {"mine"}
        assert str(d) in err
        expect = {"deep-nesting": "nested too deeply", "fifo-snapshot": "not a regular file",
                  "dev-zero-journal": "symbolic link", "directory-snapshot": "not a regular file",
                  "oversize-journal": "more than", "invalid-utf8": "utf-8"}[kind]
        assert expect in err.lower() if kind == "invalid-utf8" else expect in err


def test_a_lock_held_for_ever_does_not_hang_the_reader(people, shared_dir) -> None:
    team = shared_team(shared_dir)
    alice, mallory = people["alice"], people["mallory"]
    write_runs(mallory, team, [run_doc(2, name="fine")])
    fd = os.open(team / mallory.pw_name / ".lock", os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as mallory's labdeck could, for ever
        out = as_user(alice, team, LIST, timeout=20)
    finally:
        os.close(fd)
    assert [r[2] for r in out["runs"]] == ["fine"] and out["errors"] == {}


def test_a_teammates_blob_is_read_only_inside_their_directory(people, shared_dir) -> None:
    team = shared_team(shared_dir)
    alice, mallory = people["alice"], people["mallory"]
    write_runs(mallory, team, [run_doc(2)])
    secret = shared_dir / "secret"
    secret.write_text("alice's secret")
    blobs = team / mallory.pw_name / "blobs"
    blobs.mkdir()
    os.symlink(secret, blobs / "link.diff")
    os.mkfifo(blobs / "fifo.diff")
    (blobs / "ok.diff").write_text("+ a line")
    for p in (blobs, *blobs.iterdir()):
        _as_mallory_file(p, mallory)
    out = as_user(alice, team, f"""
        st = S.Store(team, me)
        m = {mallory.pw_name!r}
        out["ok"] = st.read_blob(m, "ok.diff").decode()
        out["escape"] = st.read_blob(m, "../../secret")
        out["user_escape"] = st.read_blob("..", "secret")
        for name in ("link.diff", "fifo.diff"):
            try:
                out[name] = repr(st.read_blob(m, name))
            except StoreError as e:
                out[name] = err(e)["type"]
    """, timeout=20)
    assert out["ok"] == "+ a line"
    assert out["escape"] is None and out["user_escape"] is None
    assert out["link.diff"] == "StoreError" and out["fifo.diff"] == "StoreError"


# ---- the directories themselves -----------------------------------------------------------------


def test_a_team_directory_someone_else_owns_is_refused(people, shared_dir) -> None:
    team = shared_dir / "team"
    team.mkdir()
    os.chmod(team, 0o1777)
    os.chown(team, people["mallory"].pw_uid, -1)  # the first user to run labdeck made it
    out = as_user(people["alice"], team, OPEN_OWN_STORE)
    e = out["error"]
    assert f"belongs to {people['mallory'].pw_name}" in e["message"]
    assert f"install -d -m 1777 -o root {team}" in e["hint"]
    assert not (team / people["alice"].pw_name).exists()


def test_a_team_directory_that_is_not_sticky_is_refused(people, shared_dir) -> None:
    team = shared_dir / "team"
    team.mkdir()
    os.chmod(team, 0o777)
    out = as_user(people["alice"], team, OPEN_OWN_STORE)
    assert "not sticky" in out["error"]["message"] and "install -d -m 1777 -o root" in out["error"]["hint"]
    assert not (team / people["alice"].pw_name).exists()


def test_your_directory_made_by_someone_else_is_a_clear_error(people, shared_dir) -> None:
    team = shared_team(shared_dir)
    alice, mallory = people["alice"], people["mallory"]
    as_user(mallory, team, f"os.mkdir(team / {alice.pw_name!r}, 0o777)")
    out = as_user(alice, team, OPEN_OWN_STORE)
    e = out["error"]
    assert f"belongs to {mallory.pw_name}, not to you" in e["message"] and str(team / alice.pw_name) in e["message"]
    assert "sudo mv" in e["hint"] and "team_dir" in e["hint"]


def test_your_directory_as_a_link_is_never_followed(people, shared_dir) -> None:
    """mallory points team/<alice> at alice's ~/.ssh: alice's labdeck refuses it, and neither
    chmods the target nor creates anything in it."""
    team = shared_team(shared_dir)
    alice, mallory = people["alice"], people["mallory"]
    ssh = shared_dir / "alice-home" / ".ssh"
    ssh.mkdir(parents=True)
    for p in (ssh.parent, ssh):
        os.chown(p, alice.pw_uid, alice.pw_gid)
    os.chmod(ssh.parent, 0o755)
    os.chmod(ssh, 0o700)
    as_user(mallory, team, f"os.symlink({str(ssh)!r}, team / {alice.pw_name!r})")
    out = as_user(alice, team, OPEN_OWN_STORE)
    e = out["error"]
    assert "symbolic link" in e["message"] and mallory.pw_name in e["message"]
    assert stat.S_IMODE(ssh.stat().st_mode) == 0o700 and list(ssh.iterdir()) == []


def test_a_teammate_directory_that_is_a_link_is_skipped(people, shared_dir) -> None:
    """mallory replaces her directory by a link to alice's: alice's runs are not listed again as
    mallory's, and the link is one warning."""
    team = shared_team(shared_dir)
    alice, mallory = people["alice"], people["mallory"]
    write_runs(alice, team, [run_doc(1, name="mine")])
    as_user(mallory, team, f"os.symlink(team / {alice.pw_name!r}, team / me)")
    out = as_user(None, team, LIST)
    assert out["runs"] == [[alice.pw_name, ulid_at(T0 + 1, 7), "mine"]]
    assert "symbolic link" in out["errors"][mallory.pw_name]


# ---- the grammar ----------------------------------------------------------------------------------


def test_id_and_user_name_grammar() -> None:
    good = ids.new_id()
    assert ids.is_stored_id(good) and not ids.is_stored_id(good.lower()) and not ids.is_stored_id("8" + good[1:])
    for bad in ("", "../x", "[/]", good + "0", 5, None):
        assert not ids.is_stored_id(bad)
    for name in ("alice", "_svc", "john.doe", "a-b_c9"):
        assert ids.is_user_name(name)
    for name in ("", ".", "..", "-x", "a/b", "/etc", "[/]", "a\x1b[2J", "x" * 33, "ålice", 7):
        assert not ids.is_user_name(name)
    assert ids.describe("[/]\x1b]52;c;x\x07") == "'\\x5b/\\x5d\\x1b\\x5d52;c;x\\x07'"


@pytest.mark.parametrize("field, value, why", [
    ("created_at", "0001-01-01T00:00:00+14:00", "created_at is not a time"),
    ("ended_at", "9999-12-31T23:59:59-14:00", "ended_at is not a time"),
    ("environment", {"packages": 5}, "environment.packages is not a list of names"),
    ("environment", {"executable": ["x"]}, "environment.executable is not a path"),
    ("code", {"root": 5, "commit": "ab12"}, "code.root is not a path"),
    ("code", {"subdir": ["a"]}, "code.subdir is not a path"),
])
def test_fields_that_crashed_commands_are_checked(field: str, value, why: str) -> None:
    """Values that passed the first checks and then crashed `show`, every time filter and reports
    (OverflowError converting to UTC, TypeError on len() / Path())."""
    from backends.ids import new_id
    from backends.models import Run, record_problem
    from backends.query import filter_runs

    doc = {**Run(id=new_id(), user="bob", command="x", instance="local").to_dict(), field: value}
    assert record_problem(Run, doc) == why
    if field.endswith("_at"):  # your own store is not checked: the filter still does not crash on it
        assert filter_runs(f"{field[:-3]}>2026-01-01", [Run.from_dict(doc)], {}, []) == []
