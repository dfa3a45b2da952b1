"""Tests of the metadata store (backends/store.py) that run in this process,
plus the permission checks that need a second, real, unprivileged Unix user.

The multi-process tests (concurrent writers, SIGKILL mid-write) are in
test_store_processes.py.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import secrets
import shutil
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from tinydb import Query

import backends.store as store_mod
from backends.errors import NotFoundError, StateError, StoreCorruptError, StoreError
from backends.ids import id_time_ms, is_id
from backends.models import Run, RunState
from backends.store import SNAPSHOT, Store, move_aside

REPO = Path(__file__).resolve().parents[1]
T0 = 1_700_000_000_000  # a fixed ms timestamp for deterministic run ids


# ---- helpers ------------------------------------------------------------------


_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def ulid_at(ms: int) -> str:
    """A ULID for time ``ms`` (new_id() never goes back in time within a process,
    so it cannot make ids for chosen, earlier times)."""
    value = (ms << 80) | int.from_bytes(os.urandom(10), "big")
    return "".join(_CROCKFORD[(value >> (5 * i)) & 31] for i in reversed(range(26)))


def make_run(k: int, name: str = "", **kw) -> Run:
    """A run whose id sorts by ``k`` (k ms after T0)."""
    return Run(command=f"python train.py --k {k}", instance="local", id=ulid_at(T0 + k), name=name, **kw)


def files_of(directory: Path) -> dict[str, bytes]:
    """Every regular file in ``directory`` (not recursive) with its bytes."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def journals(directory: Path) -> list[Path]:
    return sorted(directory.glob("journal-*.jsonl"))


def journal_lines(path: Path) -> list[dict]:
    """Every line of a journal, each of which must be complete, valid JSON."""
    raw = path.read_bytes()
    assert raw == b"" or raw.endswith(b"\n"), f"{path} has a torn tail: {raw[-60:]!r}"
    return [json.loads(line) for line in raw.splitlines()]


def snapshot_meta(directory: Path) -> dict:
    return json.loads((directory / SNAPSHOT).read_bytes())["_meta"]["1"]


@pytest.fixture
def team(tmp_path: Path) -> Path:
    return tmp_path / "team"


# ---- 1. basics ----------------------------------------------------------------


def test_put_get_mutate_delete(team: Path) -> None:
    st = Store(team, "alice")
    us = st.mine
    assert us.get("things", "a") is None
    assert us.all("things") == []

    us.put("things", "a", {"x": 1, "tags": ["t"]})
    us.put("things", "b", {"x": 2})
    assert us.get("things", "a") == {"x": 1, "tags": ["t"]}
    assert sorted(d["x"] for d in us.all("things")) == [1, 2]

    # get() hands out a copy: changing it does not change the store
    got = us.get("things", "a")
    got["x"] = 99
    assert us.get("things", "a")["x"] == 1

    # put replaces the whole document
    us.put("things", "a", {"y": 5})
    assert us.get("things", "a") == {"y": 5}

    # mutate is read-modify-write; its return value is the new document
    seen = []

    def inc(doc):
        seen.append(dict(doc))
        doc["y"] += 1
        return doc

    assert us.mutate("things", "a", inc) == {"y": 6}
    assert seen == [{"y": 5}]
    assert us.get("things", "a") == {"y": 6}
    # mutate on a missing doc gets None and can create it
    assert us.mutate("things", "c", lambda d: {"created": d is None}) == {"created": True}
    assert us.get("things", "c") == {"created": True}

    # returning None deletes; deleting a missing document is a no-op that commits nothing
    assert us.mutate("things", "b", lambda d: None) is None
    assert us.get("things", "b") is None
    before = files_of(us.dir)
    assert us.mutate("things", "nope", lambda d: None) is None
    assert files_of(us.dir) == before

    # put_many: one commit, many documents
    us.put_many("bulk", [(f"k{i}", {"i": i}) for i in range(5)])
    assert sorted(d["i"] for d in us.all("bulk")) == list(range(5))

    # search goes through TinyDB's query API
    assert us.search("bulk", Query().i >= 3) == [{"i": 3}, {"i": 4}]

    # everything is on disk: a brand-new store object sees the same state
    st.close()
    again = Store(team, "alice").mine
    assert again.get("things", "a") == {"y": 6}
    assert again.get("things", "b") is None
    assert again.get("things", "c") == {"created": True}
    assert sorted(d["i"] for d in again.all("bulk")) == list(range(5))
    again.close()


def test_search_sees_other_writers(team: Path) -> None:
    """Each query hits the live data: a second store object (standing in for another
    process) that commits must be visible to the next search of the first one."""
    a = Store(team, "alice").mine
    b = Store(team, "alice").mine
    a.put("things", "1", {"color": "red", "n": 1})
    assert a.search("things", Query().color == "red") == [{"color": "red", "n": 1}]
    b.put("things", "2", {"color": "red", "n": 2})
    b.mutate("things", "1", lambda d: {"color": "blue", "n": 1})
    assert a.search("things", Query().color == "red") == [{"color": "red", "n": 2}]
    assert a.search("things", Query().color == "blue") == [{"color": "blue", "n": 1}]
    b.put("things", "3", {"color": "blue", "n": 3})
    assert sorted(d["n"] for d in a.search("things", Query().color == "blue")) == [1, 3]
    a.close()
    b.close()


def test_add_and_transition(team: Path) -> None:
    st = Store(team, "alice")
    run = st.add(make_run(1, name="base"))
    assert st.find_run(run.id).state == RunState.QUEUED.value

    r = st.transition(run.id, RunState.RUNNING, pid=4242, started_at="2024-01-01T00:00:00.000Z")
    assert r.state == "running" and r.pid == 4242
    r = st.transition(run.id, "succeeded", exit_code=0)
    assert r.state == "succeeded" and r.exit_code == 0

    # persisted, not only in memory
    fresh = Store(team, "alice")
    stored = fresh.find_run(run.id)
    assert (stored.state, stored.pid, stored.exit_code) == ("succeeded", 4242, 0)

    # an illegal transition raises and changes nothing, in memory or on disk
    before_files = files_of(st.mine.dir)
    before_doc = st.mine.get("runs", run.id)
    with pytest.raises(StateError, match="cannot go from succeeded to running"):
        st.transition(run.id, RunState.RUNNING, pid=1)
    assert st.mine.get("runs", run.id) == before_doc
    assert fresh.mine.get("runs", run.id) == before_doc
    assert files_of(st.mine.dir) == before_files

    # queued -> succeeded skips running: also illegal
    other = st.add(make_run(2))
    with pytest.raises(StateError):
        st.transition(other.id, "succeeded")
    assert st.find_run(other.id).state == "queued"

    with pytest.raises(NotFoundError):
        st.transition(ulid_at(T0 + 999), "running")
    with pytest.raises(StoreError, match="transition"):
        st.update_run(other.id, state="running")
    assert st.update_run(other.id, last_line="epoch 1").last_line == "epoch 1"
    assert st.find_run(other.id).state == "queued"
    st.close()
    fresh.close()


def test_find_run(team: Path) -> None:
    st = Store(team, "alice")
    r1 = st.add(make_run(1, name="sweep"))
    r2 = st.add(make_run(2, name="sweep"))  # same name, newer
    r3 = st.add(make_run(40_000_000, name="other"))  # a different ms prefix

    assert st.find_run(r1.id).id == r1.id
    assert st.find_run(r1.id.lower()).id == r1.id  # case-insensitive
    # suffix (>= 4 characters), any case
    assert st.find_run(r2.id[-6:].lower()).id == r2.id
    # unique prefix
    common = os.path.commonprefix([r1.id, r2.id, r3.id])
    prefix3 = r3.id[: len(common) + 1]
    assert not r1.id.startswith(prefix3) and not r2.id.startswith(prefix3)
    assert st.find_run(prefix3).id == r3.id
    # ambiguous prefix
    with pytest.raises(NotFoundError, match="matches 3 runs"):
        st.find_run(common)
    # by exact name: the newest of that name
    assert st.find_run("sweep").id == r2.id
    assert st.find_run("other").id == r3.id
    # a suffix shorter than 4 characters is not a suffix match
    short = r3.id[-3:]
    if not any(r.id.startswith(short) for r in (r1, r2, r3)):
        with pytest.raises(NotFoundError):
            st.find_run(short)
    with pytest.raises(NotFoundError, match="No run"):
        st.find_run("no-such-run")
    st.close()


def test_runs_sorted_newest_first_across_the_team(team: Path) -> None:
    alice = Store(team, "alice")
    bob = Store(team, "bob")
    ks = [5, 1, 9, 3]
    for k in ks[:2]:
        alice.add(make_run(k, name=f"a{k}"))
    for k in ks[2:]:
        bob.add(make_run(k, name=f"b{k}"))
    runs, errors = alice.runs()
    assert errors == {}
    assert all(is_id(r.id) for r in runs)
    assert [id_time_ms(r.id) - T0 for r in runs] == [9, 5, 3, 1]
    assert [r.name for r in runs] == ["b9", "a5", "b3", "a1"]
    assert [r.id for r in runs] == sorted((r.id for r in runs), reverse=True)
    mine, _ = alice.runs(team=False)
    assert [r.name for r in mine] == ["a5", "a1"]
    # teammates' runs are found too, and are read-only to alice
    assert alice.find_run("b9").name == "b9"
    with pytest.raises(StoreError, match="read-only"):
        alice._store_of("bob").put("runs", "x", {"command": "x", "instance": "y"})
    assert {r.name for r in bob.runs(team=False)[0]} == {"b9", "b3"}
    alice.close()
    bob.close()


# ---- 3. torn writes and crashed compactions -----------------------------------


def test_torn_journal_tail_is_ignored_and_trimmed(team: Path) -> None:
    st = Store(team, "alice", compact_every=10_000)
    for i in range(3):
        st.mine.put("docs", f"d{i}", {"i": i})
    st.close()
    [jpath] = journals(team / "alice")
    good = jpath.read_bytes()
    assert good.endswith(b"\n")
    torn = b'{"t":"docs","id":"torn","d":{"i":'
    jpath.write_bytes(good + torn)  # a writer died mid-append

    # readers (the owner and a teammate) ignore the unacknowledged tail
    owner = Store(team, "alice", compact_every=10_000)
    assert sorted(d["i"] for d in owner.mine.all("docs")) == [0, 1, 2]
    mate = Store(team, "bob")
    assert owner.mine.get("docs", "torn") is None
    assert len(mate._store_of("alice").all("docs")) == 3
    assert jpath.read_bytes() == good + torn  # reading never writes

    # the next commit trims it and appends after the last complete line
    owner.mine.put("docs", "d3", {"i": 3})
    lines = journal_lines(jpath)
    assert [entry["id"] for entry in lines][-1] == "d3"
    assert all(entry["id"] != "torn" for entry in lines)
    assert jpath.read_bytes().startswith(good)
    assert sorted(d["i"] for d in mate._store_of("alice").all("docs")) == [0, 1, 2, 3]
    assert sorted(d["i"] for d in Store(team, "alice").mine.all("docs")) == [0, 1, 2, 3]
    owner.close()
    mate.close()


def test_crash_before_snapshot_replace_keeps_old_state(team: Path) -> None:
    """A compaction killed before os.replace leaves the old snapshot + journal and a temp
    file; the store is intact, and the temp file is cleaned up once it is stale."""
    st = Store(team, "alice", compact_every=10_000)
    d = st.mine.dir
    st.mine.put_many("docs", [(f"d{i}", {"i": i}) for i in range(3)])
    st.mine.compact()
    st.mine.put("docs", "d3", {"i": 3})
    st.close()
    tmp = d / f".{SNAPSHOT}.tmp-999999-1"
    tmp.write_bytes(b'{"_meta":{"1":{"schema":1,"ge')  # half-written new snapshot
    again = Store(team, "alice", compact_every=10_000)
    assert sorted(x["i"] for x in again.mine.all("docs")) == [0, 1, 2, 3]
    again.mine.compact()
    assert tmp.exists()  # too young to be sure its writer is dead
    old = time.time() - 3600
    os.utime(tmp, (old, old))
    again.mine.compact()
    assert not tmp.exists()
    assert sorted(x["i"] for x in again.mine.all("docs")) == [0, 1, 2, 3]
    again.close()


def test_crash_after_snapshot_replace_ignores_stale_journal(team: Path) -> None:
    """A compaction killed after os.replace but before deleting the old journal: the new
    snapshot already holds everything; the old journal must not be replayed again."""
    st = Store(team, "alice", compact_every=10_000)
    d = st.mine.dir
    st.mine.put("docs", "a", {"v": 1})
    st.mine.put("docs", "b", {"v": 1})
    st.mine.compact()
    gen = snapshot_meta(d)["gen"]
    st.mine.put("docs", "a", {"v": 2})
    st.mine.mutate("docs", "b", lambda _d: None)
    old_journal = st.mine.journal_path()
    saved = old_journal.read_bytes()
    st.mine.compact()  # new snapshot gen+1, old journal removed
    assert snapshot_meta(d)["gen"] == gen + 1
    assert not old_journal.exists()
    st.close()
    old_journal.write_bytes(saved)  # as if the crash came before the unlink
    again = Store(team, "alice", compact_every=10_000)
    assert again.mine.all("docs") == [{"v": 2}]
    again.mine.put("docs", "c", {"v": 3})
    again.mine.compact()
    assert not old_journal.exists()  # cleaned up by the next compaction
    assert sorted(x["v"] for x in Store(team, "alice").mine.all("docs")) == [2, 3]
    again.close()


# ---- 4. corruption --------------------------------------------------------------


def test_garbage_snapshot_raises_and_is_left_alone(team: Path) -> None:
    st = Store(team, "alice", compact_every=10_000)
    st.add(make_run(1))
    st.mine.compact()
    st.close()
    snap = team / "alice" / SNAPSHOT
    garbage = b'{"runs": {"01H": {"command": "x"'  # cut short
    snap.write_bytes(garbage)
    before = files_of(snap.parent)

    st = Store(team, "alice")
    with pytest.raises(StoreCorruptError) as ei:
        st.runs()
    assert str(snap) in str(ei.value)
    assert Path(ei.value.path) == snap
    assert "move-aside" in ei.value.hint
    # a write is refused too, and nothing was changed by either
    with pytest.raises(StoreCorruptError):
        st.add(make_run(2))
    with pytest.raises(StoreCorruptError):
        st.mine.compact()
    assert files_of(snap.parent) == before

    for bad in (b"[1, 2, 3]", b'{"runs": [1]}', b'{"runs": {"x": 5}}', b'{"_meta": {"1": "x"}}',
                b'{"_meta": {"1": {"gen": "two"}}}', b"\xff\xfe not utf-8", b""):
        snap.write_bytes(bad)
        with pytest.raises(StoreCorruptError, match="store.json"):
            Store(team, "alice").mine.all("runs")
        assert snap.read_bytes() == bad
    st.close()


def test_corrupt_journal_line_raises_naming_file_and_line(team: Path) -> None:
    st = Store(team, "alice", compact_every=10_000)
    for i in range(5):
        st.mine.put("docs", f"d{i}", {"i": i})
    st.close()
    [jpath] = journals(team / "alice")
    lines = jpath.read_bytes().splitlines(keepends=True)
    assert len(lines) >= 4
    lines[2] = b'{"t":"docs","id":"d2","d":{"i":2}}}garbage\n'
    jpath.write_bytes(b"".join(lines))
    before = files_of(jpath.parent)

    for reader in (Store(team, "alice").mine, Store(team, "bob")._store_of("alice")):
        with pytest.raises(StoreCorruptError) as ei:
            reader.all("docs")
        assert Path(ei.value.path) == jpath
        assert "line 3" in str(ei.value)
        assert str(jpath) in str(ei.value)
    with pytest.raises(StoreCorruptError):
        Store(team, "alice").mine.put("docs", "new", {"i": 9})
    # valid JSON that is not a journal entry is corruption too
    for bad in (b'["not", "an", "entry"]', b'{"t":"docs","id":"d2","d":5}', b'{"t":["docs"],"id":"d2","d":{}}',
                b'{"t":"docs","id":{"x":1},"d":null}', b'{"t":"docs","id":"d2"}'):
        lines[2] = bad + b"\n"
        jpath.write_bytes(b"".join(lines))
        with pytest.raises(StoreCorruptError, match="line 3"):
            Store(team, "alice").mine.all("docs")
        _, errors = Store(team, "bob").team_records("docs")
        assert set(errors) == {"alice"} and "line 3" in errors["alice"]
    jpath.write_bytes(before[jpath.name])
    assert files_of(jpath.parent) == before


def test_move_aside_corrupt_snapshot_then_fresh_store(team: Path) -> None:
    """The TUI flow: the same Store object hits the corruption, the file is moved aside,
    and that object (and any new one) carries on with a fresh, consistent store."""
    st = Store(team, "alice", compact_every=3)
    d = st.mine.dir
    for i in range(5):
        st.mine.put("docs", f"old{i}", {"era": "old", "i": i})  # compactions, then a journal on top
    old_gen = snapshot_meta(d)["gen"]
    old_journal = st.mine.journal_path(old_gen)
    assert old_gen >= 1 and old_journal.exists()
    snap = d / SNAPSHOT
    snap.write_bytes(b"\x00\x00 disk trouble")
    with pytest.raises(StoreCorruptError):
        st.mine.all("docs")
    old_files = files_of(d)

    target = move_aside(snap)
    assert target.parent == d and target.name.startswith(f"{SNAPSHOT}.corrupt-")
    assert target.read_bytes() == old_files[SNAPSHOT]
    assert not snap.exists()

    # the same object and a new one both start from an empty store
    assert st.mine.all("docs") == []
    n_new = 3 * (old_gen + 2)  # the fresh store's generations pass the old store's
    for i in range(n_new):
        st.mine.put("docs", f"new{i}", {"era": "new", "i": i})
    expected = {("new", i) for i in range(n_new)}
    fresh = Store(team, "alice")
    for us in (st.mine, fresh.mine):
        assert {(x["era"], x["i"]) for x in us.all("docs")} == expected
    assert snapshot_meta(d)["gen"] > old_gen
    # nothing that belonged to the corrupt store was deleted: its journal is kept
    kept = b"".join(p.read_bytes() for p in d.iterdir() if ".corrupt-" in p.name)
    assert old_files[old_journal.name] in kept
    st.close()
    fresh.close()


def test_move_aside_corrupt_journal_long_lived_store(team: Path) -> None:
    st = Store(team, "alice", compact_every=10_000)
    d = st.mine.dir
    for i in range(3):
        st.mine.put("docs", f"d{i}", {"i": i})
    assert len(st.mine.all("docs")) == 3
    jpath = st.mine.journal_path()
    bad_line = len(jpath.read_bytes().splitlines()) + 1
    # the journal gets damaged past the point this process has read
    with open(jpath, "ab") as f:
        f.write(b"\x00\x00\x00garbage\n" + b'{"t":"docs","id":"d9","d":{"i":9}}\n')
    with pytest.raises(StoreCorruptError, match=f"line {bad_line}:"):
        st.mine.all("docs")
    damaged = jpath.read_bytes()

    target = move_aside(jpath)
    assert target.read_bytes() == damaged
    assert not jpath.exists()

    # the same object goes on, consistent with what is on disk
    st.mine.put("docs", "after", {"i": 100})
    assert target.read_bytes() == damaged, "the moved-aside file must never be written"
    fresh = Store(team, "alice")
    on_disk = sorted(x["i"] for x in fresh.mine.all("docs"))
    assert 100 in on_disk and 9 not in on_disk
    assert sorted(x["i"] for x in st.mine.all("docs")) == on_disk
    for p in journals(d):
        journal_lines(p)  # every line parses
    # and after more writes and a compaction, both still agree
    st.mine.put("docs", "after2", {"i": 101})
    st.mine.compact()
    assert Store(team, "alice").mine.all("docs") == st.mine.all("docs")
    assert target.read_bytes() == damaged, "compaction must not delete a moved-aside journal"
    st.close()
    fresh.close()


def test_move_aside_journal_keeps_every_process_consistent(team: Path) -> None:
    """Two more long-lived processes when a journal is moved aside: one that had read
    the whole journal before it rotted in place (it never saw an error), and one
    that failed half-way through it. Both must drop what was only in that journal,
    agree with a fresh reader, and never write into or past the end of a journal."""
    st = Store(team, "alice", compact_every=10_000)
    for i in range(5):
        st.mine.put("docs", f"d{i}", {"i": i})
    jpath = st.mine.journal_path()
    in_journal = {json.loads(x)["d"]["i"] for x in jpath.read_bytes().splitlines()}
    assert len(in_journal) >= 3
    read_all = Store(team, "alice")
    assert len(read_all.mine.all("docs")) == 5  # has read the whole journal
    lines = jpath.read_bytes().splitlines(keepends=True)
    lines[2] = b"#" * (len(lines[2]) - 1) + b"\n"  # rots in place: same file, same size
    jpath.write_bytes(b"".join(lines))
    half_way = Store(team, "alice")
    with pytest.raises(StoreCorruptError, match="line 3"):
        half_way.mine.all("docs")  # applied lines 1-2, then failed
    damaged = jpath.read_bytes()

    target = move_aside(jpath)
    expected = sorted(set(range(5)) - in_journal)
    for who in (read_all, half_way):
        assert sorted(x["i"] for x in who.mine.all("docs")) == expected
    read_all.mine.put("docs", "x", {"i": 100})
    half_way.mine.put("docs", "y", {"i": 101})
    expected += [100, 101]
    for who in (read_all, half_way, st, Store(team, "alice")):
        assert sorted(x["i"] for x in who.mine.all("docs")) == expected
    assert target.read_bytes() == damaged
    for p in journals(team / "alice"):
        assert b"\x00" not in p.read_bytes()
        journal_lines(p)
    for s in (st, read_all, half_way):
        s.close()


def test_move_aside_twice_in_a_row_keeps_both(team: Path) -> None:
    st = Store(team, "alice", compact_every=1)
    st.mine.put("docs", "a", {"i": 1})
    snap = st.mine.snapshot_path
    snap.write_bytes(b"first corrupt")
    t1 = move_aside(snap)
    st.mine.put("docs", "b", {"i": 2})
    snap.write_bytes(b"second corrupt")
    t2 = move_aside(snap)
    assert t1 != t2
    assert t1.read_bytes() == b"first corrupt"
    assert t2.read_bytes() == b"second corrupt"
    with pytest.raises(StoreError, match="does not exist"):
        move_aside(snap)
    st.close()


def test_team_records_isolate_a_teammates_corruption(team: Path) -> None:
    for user, k in (("alice", 1), ("bob", 2), ("carol", 3)):
        s = Store(team, user, compact_every=1)
        s.add(make_run(k, name=user))
        s.close()
    (team / "bob" / SNAPSHOT).write_bytes(b"{{{")

    alice = Store(team, "alice")
    runs, errors = alice.runs()
    assert sorted(r.name for r in runs) == ["alice", "carol"]
    assert set(errors) == {"bob"}
    assert "corrupt" in errors["bob"] and str(team / "bob" / SNAPSHOT) in errors["bob"]
    docs, errors = alice.team_records("runs")
    assert set(errors) == {"bob"} and len(docs) == 2
    # valid JSON with a nonsense _meta record is corruption too, not a crash of the team view
    (team / "bob" / SNAPSHOT).write_bytes(b'{"_meta": {"1": ["gen", 3]}, "runs": {}}')
    runs, errors = alice.runs()
    assert sorted(r.name for r in runs) == ["alice", "carol"] and "corrupt" in errors["bob"]

    # a teammate whose store was written by a newer labdeck is also just reported
    carol_snap = team / "carol" / SNAPSHOT
    data = json.loads(carol_snap.read_bytes())
    data["_meta"]["1"]["schema"] = store_mod.SCHEMA_VERSION + 1
    carol_snap.write_text(json.dumps(data))
    runs, errors = alice.runs()
    assert [r.name for r in runs] == ["alice"] and set(errors) == {"bob", "carol"}

    # your own corrupt store is not a footnote: it raises
    bob = Store(team, "bob")
    with pytest.raises(StoreCorruptError):
        bob.runs()
    with pytest.raises(StoreCorruptError):
        bob.find_run("alice")
    alice.close()
    bob.close()


# ---- 5. schema ------------------------------------------------------------------


def test_newer_schema_is_refused(team: Path) -> None:
    st = Store(team, "alice", compact_every=1)
    st.add(make_run(1))
    snap = st.mine.snapshot_path
    data = json.loads(snap.read_bytes())
    data["_meta"]["1"]["schema"] = store_mod.SCHEMA_VERSION + 1
    snap.write_text(json.dumps(data))
    before = files_of(snap.parent)
    with pytest.raises(StoreError, match="newer labdeck") as ei:
        Store(team, "alice").runs()
    assert not isinstance(ei.value, StoreCorruptError)
    assert str(snap) in str(ei.value)
    with pytest.raises(StoreError, match="newer labdeck"):
        st.add(make_run(2))
    assert files_of(snap.parent) == before
    st.close()


# (ids as labdeck writes them: a teammate's record with another id is skipped as hostile)
R1, R2, R3, R9 = (ulid_at(T0 + k) for k in (1, 2, 3, 9))


def _old_doc(i: str) -> dict:
    return {"command": i, "instance": "local", "id": i, "cmd_old": True}


def _write_schema1_store(team: Path, layout: str) -> tuple[Path, set[str]]:
    """A schema-1 store of alice: ``compacted`` (snapshot + journal), ``few-commits``
    (just two puts, as most small stores are) or ``legacy`` (a bare journal-0, the
    layout stores had before their first commit wrote a snapshot)."""
    d = team / "alice"
    if layout == "legacy":
        Store(team, "alice").close()
        lines = [{"t": "runs", "id": i, "d": _old_doc(i)} for i in (R1, R2)]
        (d / "journal-0.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        return d, {R1, R2}
    st = Store(team, "alice", compact_every=10_000)
    st.mine.put("runs", R1, _old_doc(R1))
    st.mine.put("runs", R2, _old_doc(R2))
    if layout == "compacted":
        st.mine.compact()
        st.mine.put("runs", R3, _old_doc(R3))
    st.close()
    return d, ({R1, R2, R3} if layout == "compacted" else {R1, R2})


def _v1_to_v2(tables):
    out = {}
    for name, docs in tables.items():
        out[name] = {}
        for doc_id, doc in docs.items():
            doc = dict(doc)
            doc.pop("cmd_old", None)
            doc["migrated"] = True
            out[name][doc_id] = doc
    return out


@pytest.mark.parametrize("layout", ["compacted", "few-commits", "legacy"])
def test_migration_applied_and_persisted(team: Path, monkeypatch: pytest.MonkeyPatch, layout: str) -> None:
    d, ids = _write_schema1_store(team, layout)
    if (d / SNAPSHOT).exists():
        assert snapshot_meta(d)["schema"] == 1

    monkeypatch.setattr(store_mod, "SCHEMA_VERSION", 2)
    monkeypatch.setitem(store_mod.MIGRATIONS, 1, _v1_to_v2)

    # a teammate reading the old store sees it migrated, and writes nothing
    before = files_of(d)
    mate = Store(team, "bob")
    docs, errors = mate.team_records("runs")
    assert errors == {}
    assert {x["id"] for x in docs} == ids
    assert all(x.get("migrated") and "cmd_old" not in x for x in docs)
    assert files_of(d) == before

    # the owner migrates and persists the migrated form
    owner = Store(team, "alice")
    runs, _ = owner.runs(team=False)
    assert {r.id for r in runs} == ids
    assert all(owner.mine.get("runs", i)["migrated"] for i in ids)
    assert snapshot_meta(d)["schema"] == 2
    raw = json.loads((d / SNAPSHOT).read_bytes())
    assert set(raw["runs"]) == ids and all(doc["migrated"] for doc in raw["runs"].values())

    # writes after the migration are not migrated twice, and a new reader agrees
    calls = []
    monkeypatch.setitem(store_mod.MIGRATIONS, 1, lambda t: calls.append(1) or _v1_to_v2(t))
    owner.mine.put("runs", R9, {"command": "z", "instance": "local", "id": R9, "migrated": "new"})
    fresh = Store(team, "alice")
    assert fresh.mine.get("runs", R9)["migrated"] == "new"
    assert {x["id"] for x in fresh.mine.all("runs")} == ids | {R9}
    assert calls == []
    owner.close()
    fresh.close()
    mate.close()


def test_new_store_records_its_schema(team: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A store written at schema N is never migrated as an older one, even before its
    first compaction (a bare journal cannot say which schema wrote it)."""
    monkeypatch.setattr(store_mod, "SCHEMA_VERSION", 2)
    calls = []
    monkeypatch.setitem(store_mod.MIGRATIONS, 1, lambda t: calls.append(1) or _v1_to_v2(t))
    st = Store(team, "carol", compact_every=10_000)
    st.mine.put("runs", "n1", {"command": "a", "instance": "local", "id": "n1", "cmd_old": "kept"})
    st.mine.put("runs", "n2", {"command": "b", "instance": "local", "id": "n2", "cmd_old": "kept"})
    st.close()
    assert snapshot_meta(team / "carol")["schema"] == 2
    for reader in (Store(team, "carol").mine, Store(team, "dave")._store_of("carol")):
        assert sorted(x["cmd_old"] for x in reader.all("runs")) == ["kept", "kept"]
    assert calls == []


def test_missing_migration_is_a_clear_error(team: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d, _ = _write_schema1_store(team, "compacted")
    monkeypatch.setattr(store_mod, "SCHEMA_VERSION", 3)
    monkeypatch.setitem(store_mod.MIGRATIONS, 1, _v1_to_v2)
    monkeypatch.delitem(store_mod.MIGRATIONS, 2, raising=False)
    before = files_of(d)
    with pytest.raises(StoreError, match="No migration from store schema 2"):
        Store(team, "alice").runs()
    assert files_of(d) == before


# ---- 6. permissions -------------------------------------------------------------


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_modes_after_writing(tmp_path: Path, umask: int) -> None:
    team = tmp_path / "new" / "team"
    old = os.umask(umask)
    try:
        st = Store(team, "alice", compact_every=3)
        for i in range(5):  # journal appends and compactions
            st.add(make_run(i))
        while not journals(team / "alice"):  # end with something in a journal
            st.mine.put("docs", "x", {"a": 1})
        st.close()
    finally:
        os.umask(old)
    assert _mode(team) == 0o1777
    d = team / "alice"
    assert _mode(d) == 0o755
    names = {p.name for p in d.iterdir()}
    assert {SNAPSHOT, ".lock"} <= names and any(n.startswith("journal-") for n in names)
    for p in d.iterdir():
        assert _mode(p) == 0o644, f"{p.name} is {oct(_mode(p))}"


def test_existing_team_dir_is_not_rechmodded(tmp_path: Path) -> None:
    team = tmp_path / "team"
    team.mkdir(mode=0o755)
    os.chmod(team, 0o750)
    Store(team, "alice").add(make_run(1))
    assert _mode(team) == 0o750
    assert _mode(team / "alice") == 0o755


# -- a real second Unix user (tests run as root in CI, where permission checks are bypassed)


@pytest.fixture(scope="module")
def other_user():
    """A real unprivileged Unix user, deleted again however the tests end."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create a second Unix user")
    if not shutil.which("useradd") or not shutil.which("userdel"):
        pytest.skip("useradd/userdel not available")
    name = f"ldtest_{secrets.token_hex(4)}"
    subprocess.run(["useradd", "-M", "-s", "/usr/sbin/nologin", name], check=True, capture_output=True)
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", "-f", name], capture_output=True)
        try:
            grp.getgrnam(name)
        except KeyError:
            pass
        else:
            subprocess.run(["groupdel", name], capture_output=True)
        try:
            pwd.getpwnam(name)
        except KeyError:
            pass
        else:  # pragma: no cover - cleanup failed, say so loudly
            raise RuntimeError(f"could not delete test user {name}")


_PRELUDE = """
import json, os, sys, traceback
from pathlib import Path
import backends.store as S
from backends.errors import StoreError
uid, gid = int(sys.argv[1]), int(sys.argv[2])
if uid >= 0:
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
assert os.geteuid() != 0, "still root: permission checks would be bypassed"
team = Path(sys.argv[3])

def err(e):
    return {"type": type(e).__name__, "message": str(e), "hint": getattr(e, "hint", ""),
            "cause": repr(e.__cause__), "suppressed": e.__suppress_context__}

out = {}
"""


def run_as(user, code: str, team: Path) -> dict:
    """Run ``code`` in a subprocess as ``user`` (a pwd entry; None: as this non-root
    user); the modules are imported first, then privileges are dropped. ``code`` fills
    the dict ``out``, which comes back."""
    uid, gid = (user.pw_uid, user.pw_gid) if user is not None else (-1, -1)
    script = _PRELUDE + textwrap.dedent(code) + "\nprint(json.dumps(out))\n"
    proc = subprocess.run(
        [sys.executable, "-c", script, str(uid), str(gid), str(team)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _unprivileged(request):
    if os.geteuid() == 0:
        return request.getfixturevalue("other_user")
    return None  # not root: permission checks apply to us already


def test_unwritable_store_directory_is_a_clear_error(shared_dir: Path, request) -> None:
    user = _unprivileged(request)
    ro = shared_dir / "ro"
    ro.mkdir()
    os.chmod(ro, 0o555)
    root_team = shared_dir / "rootteam"  # exists, but not writable by other users
    root_team.mkdir()
    os.chmod(root_team, 0o755)
    out = run_as(user, """
        for key, t in (("create_team", team / "ro" / "team"), ("create_user_dir", team / "rootteam")):
            try:
                S.Store(t, "someone")
            except StoreError as e:
                out[key] = err(e)
            else:
                out[key] = None
    """, shared_dir)

    e = out["create_team"]
    assert e is not None, "creating a team dir under a read-only dir must fail"
    assert e["type"] == "StoreError"
    assert str(ro / "team") in e["message"] and "Permission denied" in e["message"]
    assert "team_dir" in e["hint"]
    assert e["cause"] == "None" and e["suppressed"] is True  # shown without a traceback
    assert not (ro / "team").exists()

    e = out["create_user_dir"]
    assert e is not None
    assert e["type"] == "StoreError"
    assert str(root_team / "someone") in e["message"] and "not writable" in e["message"]
    assert e["cause"] == "None" and e["suppressed"] is True
    assert not (root_team / "someone").exists()


def test_teammate_can_read_but_not_write(shared_dir: Path, other_user) -> None:
    team = shared_dir / "team"
    alice = Store(team, "alice", compact_every=3)
    runs = [alice.add(make_run(k, name=f"r{k}")) for k in range(5)]  # snapshot + journal
    alice.close()
    assert _mode(team) == 0o1777
    adir = team / "alice"
    before = files_of(adir)
    assert any(n.startswith("journal-") for n in before) and SNAPSHOT in before

    me = other_user.pw_name
    out = run_as(other_user, f"""
        me = {me!r}
        st = S.Store(team, me)
        runs, errors = st.runs()
        out["runs"] = sorted(r.id for r in runs)
        out["errors"] = errors
        out["my_dir_mode"] = oct(os.stat(team / me).st_mode & 0o7777)
        out["my_dir_owner"] = os.stat(team / me).st_uid
        out["their_run"] = st.add(S.Run(command="mine", instance="local", name="theirs")).id
        for key, make in (("open_store_writable", lambda: S.Store(team, "alice")),
                          ("open_userstore_writable", lambda: S.UserStore(team / "alice", writable=True))):
            try:
                make()
            except StoreError as e:
                out[key] = err(e)
            else:
                out[key] = None
        try:
            st._store_of("alice").put("runs", "x", {{"command": "x", "instance": "y"}})
        except StoreError as e:
            out["put_via_readonly"] = err(e)
        denied = {{}}
        for name in sorted(os.listdir(team / "alice")):
            p = team / "alice" / name
            try:
                with open(p, "ab") as f:
                    f.write(b"x")
                denied[name] = False
            except PermissionError:
                denied[name] = True
        for what, fn in (("create", lambda: open(team / "alice" / "journal-99.jsonl", "wb")),
                         ("unlink", lambda: os.unlink(team / "alice" / "store.json")),
                         ("rename_dir", lambda: os.rename(team / "alice", team / "stolen"))):
            try:
                fn()
                denied[what] = False
            except PermissionError:
                denied[what] = True
        out["denied"] = denied
    """, team)

    assert out["errors"] == {}
    assert set(out["runs"]) == {r.id for r in runs}
    assert out["my_dir_mode"] == "0o755" and out["my_dir_owner"] == other_user.pw_uid
    for key in ("open_store_writable", "open_userstore_writable"):
        e = out[key]
        assert e is not None, f"{key}: opening someone else's store writable must fail"
        assert e["type"] == "StoreError" and str(adir) in e["message"]
        assert e["cause"] == "None"
    assert "read-only" in out["put_via_readonly"]["message"]
    assert out["denied"] and all(out["denied"].values()), out["denied"]
    # alice's files are exactly as they were, and still hers alone
    assert files_of(adir) == before
    assert {p.stat().st_uid for p in adir.iterdir()} == {0}
    alice = Store(team, "alice")
    assert {r.id for r in alice.runs(team=False)[0]} == {r.id for r in runs}
    # and alice sees the teammate's store through the team view, read-only
    team_runs, errors = alice.runs()
    assert errors == {} and {r.id for r in team_runs} == {r.id for r in runs} | {out["their_run"]}
    assert alice.find_run("theirs").id == out["their_run"]
    alice.close()


# ---- status files: an active run's fast-changing fields, out of the journal -------------------


def test_status_is_read_over_the_record_without_a_journal_commit(team: Path) -> None:
    st = Store(team, "alice")
    run = st.add(make_run(1, name="r"))
    st.transition(run.id, RunState.RUNNING)
    before = [p.read_bytes() for p in journals(team / "alice")]
    for i in range(50):
        st.set_status(run.id, last_line=f"step {i}", log_offset=i * 100)
    assert [p.read_bytes() for p in journals(team / "alice")] == before  # not one commit
    shown = st.find_run(run.id)
    assert (shown.last_line, shown.log_offset) == ("step 49", 4900)
    assert st.runs(team=False)[0][0].last_line == "step 49"
    assert st.mine.get("runs", run.id)["last_line"] == ""  # the record itself is unchanged
    st.set_status(run.id, last_line="step 50")  # one field: the other one stays
    assert st.find_run(run.id).log_offset == 4900
    status = team / "alice" / "status" / f"{run.id}.json"
    assert _mode(status) == 0o644 and _mode(status.parent) == 0o755
    assert [p.name for p in status.parent.iterdir()] == [status.name]  # no temp file left
    # a teammate reads it too
    bob = Store(team, "bob")
    assert bob.find_run(run.id).last_line == "step 50"
    # the final transition puts what it said into the record, once, and ends the file
    done = st.transition(run.id, RunState.SUCCEEDED, exit_code=0)
    assert (done.last_line, done.log_offset) == ("step 50", 4900)
    assert st.mine.get("runs", run.id)["last_line"] == "step 50" and not status.exists()
    assert bob.find_run(run.id).last_line == "step 50"
    with pytest.raises(StoreError):
        st.set_status(run.id, state="succeeded")  # only the status fields
    with pytest.raises(StoreError):
        st.set_status(run.id, log_offset="12")


def test_a_teammates_bad_status_file_is_ignored(team: Path) -> None:
    """A status file is a teammate's: a link, a FIFO, an oversized file, a field of the wrong
    type or an unknown one is not believed; a final run's leftover file is not read over its record."""
    carol = Store(team, "carol")
    runs = [carol.add(make_run(k, name=f"c{k}", state="running", last_line="from the record")) for k in range(6)]
    d = team / "carol" / "status"
    d.mkdir()
    secret = team.parent / "secret.json"
    secret.write_text(json.dumps({"last_line": "read through a link"}))
    (d / f"{runs[0].id}.json").symlink_to(secret)
    os.mkfifo(d / f"{runs[1].id}.json")
    (d / f"{runs[2].id}.json").write_text(json.dumps({"last_line": "x" * (store_mod.STATUS_CAP + 10)}))
    (d / f"{runs[3].id}.json").write_text(json.dumps({"last_line": ["a"], "log_offset": True, "state": "failed"}))
    (d / f"{runs[4].id}.json").write_text(json.dumps({"last_line": "current", "log_offset": 7}))
    carol.transition(runs[5].id, RunState.SUCCEEDED)
    (d / f"{runs[5].id}.json").write_text(json.dumps({"last_line": "stale"}))
    seen = {r.id: r for r in Store(team, "dave").runs()[0]}
    assert [seen[r.id].last_line for r in runs] == ["from the record"] * 4 + ["current", "from the record"]
    assert seen[runs[4].id].log_offset == 7 and seen[runs[3].id].state == "running"


def test_a_teammate_sees_the_current_last_line_as_another_user(shared_dir: Path, other_user) -> None:
    team = shared_dir / "team"
    alice = Store(team, "alice")
    run = alice.add(make_run(1, name="r", state="running"))
    old = os.umask(0o077)  # a private umask does not hide the status from the team
    try:
        alice.set_status(run.id, last_line="epoch 3 loss 0.1")
    finally:
        os.umask(old)
    out = run_as(other_user, f"""
        st = S.Store(team, {other_user.pw_name!r})
        out["line"] = st.find_run({run.id!r}).last_line
    """, team)
    assert out["line"] == "epoch 3 loss 0.1"
