"""The store under real processes: concurrent writers and readers, and writers
killed with SIGKILL at random moments (mid-append, mid-compaction).

Every process a test starts is killed by its PID and reaped when the test ends,
whether it passed or not.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from backends.store import SNAPSHOT, Store, UserStore

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def spawn():
    """Start ``python -c script args...``; every process is SIGKILLed (by PID) and reaped at teardown."""
    procs: list[subprocess.Popen] = []

    def _spawn(script: str, *args: str, stdout=subprocess.PIPE, stderr=subprocess.PIPE) -> subprocess.Popen:
        p = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(script), *map(str, args)],
            cwd=REPO, stdout=stdout, stderr=stderr, text=stdout is subprocess.PIPE,
        )
        procs.append(p)
        return p

    yield _spawn
    for p in procs:
        if p.poll() is None:
            try:
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            p.wait(timeout=10)
        finally:
            for f in (p.stdout, p.stderr):
                if f is not None:
                    f.close()


def _wait_for(pred, timeout: float, what: str, procs=()) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        for p in procs:
            if p.poll() is not None:
                out, err = p.communicate()
                pytest.fail(f"{what}: process {p.pid} exited with {p.returncode}\n{out}\n{err}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)


# ---- 2. several processes at once -------------------------------------------------

WRITER = """
    import os, sys, time
    from backends.store import Store
    from backends.models import Run
    team, tag, n, every, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    st = Store(team, "alice", compact_every=every)
    print("ready", flush=True)
    while not os.path.exists(go):
        time.sleep(0.002)

    def inc(doc):
        doc = doc or {"n": 0, "by": {}}
        doc["n"] += 1
        doc["by"][tag] = doc["by"].get(tag, 0) + 1
        return doc

    for i in range(n):
        st.add(Run(command="true", instance="local", name=f"{tag}-{i}"))
        st.mine.mutate("counters", "shared", inc)
    st.close()
    print("done", flush=True)
"""

READER = """
    import json, os, sys, traceback
    from backends.store import Store
    team, stop, total = sys.argv[1], sys.argv[2], int(sys.argv[3])
    teammate = Store(team, "reader")      # reads alice's store read-only, as a teammate
    owner = Store(team, "alice")          # and as another process of alice herself
    reads, last_n, last_runs, seen = 0, 0, 0, set()
    while True:
        stopping = os.path.exists(stop)
        counters, errors = teammate.team_records("counters")
        assert errors == {}, errors
        n = max((c["n"] for c in counters), default=0)
        runs, errors = teammate.runs()
        assert errors == {}, errors
        mine = owner.mine.get("counters", "shared")
        own_n = mine["n"] if mine else 0
        own_runs = len(owner.runs(team=False)[0])
        # counter read first, runs after: every increment follows its insert, so
        # there are never fewer runs than the counter said, and nothing goes backwards
        assert len(runs) >= n, (len(runs), n)
        assert n >= last_n and len(runs) >= last_runs, (n, last_n, len(runs), last_runs)
        assert own_n >= n and own_runs >= len(runs), (own_n, n, own_runs, len(runs))
        assert n <= total and len(runs) <= total
        last_n, last_runs = n, len(runs)
        seen.add(n)
        reads += 1
        if stopping:
            break
    print(json.dumps({"reads": reads, "last_n": last_n, "distinct": len(seen)}), flush=True)
"""


def test_concurrent_writers_lose_nothing(tmp_path: Path, spawn) -> None:
    team = tmp_path / "team"
    n_writers, n_each = 4, 200
    total = n_writers * n_each
    Store(team, "alice").close()
    go, stop = tmp_path / "go", tmp_path / "stop"

    writers = [spawn(WRITER, team, f"w{w}", n_each, 100, go) for w in range(n_writers)]
    for w in writers:
        line = w.stdout.readline()
        assert line.strip() == "ready", (line, w.stderr.read() if w.poll() is not None else "")
    reader = spawn(READER, team, stop, total)
    go.touch()  # all writers start together (compaction every 100 entries: ~16 under contention)

    for w in writers:
        out, err = w.communicate(timeout=120)
        assert w.returncode == 0, f"writer failed:\n{out}\n{err}"
        assert out.split() == ["done"]
    stop.touch()
    out, err = reader.communicate(timeout=60)
    assert reader.returncode == 0, f"reader saw an error:\n{out}\n{err}"
    stats = json.loads(out.strip().splitlines()[-1])
    assert stats["reads"] >= 3
    assert stats["last_n"] == total
    assert stats["distinct"] >= 2, "the reader should have run while writers were writing"

    st = Store(team, "alice")
    runs, errors = st.runs()
    assert errors == {}
    names = [r.name for r in runs]
    assert len(names) == total and set(names) == {f"w{w}-{i}" for w in range(n_writers) for i in range(n_each)}
    assert len({r.id for r in runs}) == total
    counter = st.mine.get("counters", "shared")
    assert counter["n"] == total, f"lost updates: {total - counter['n']}"
    assert counter["by"] == {f"w{w}": n_each for w in range(n_writers)}
    # the files are clean: one snapshot, at most the current journal, no temp files
    d = team / "alice"
    leftovers = {p.name for p in d.iterdir()} - {SNAPSHOT, ".lock", st.mine.journal_path().name}
    assert leftovers == set()
    st.close()


# ---- 3. SIGKILL mid-write --------------------------------------------------------

KILLED_WRITER = """
    import os, sys
    from pathlib import Path
    from backends.store import UserStore
    directory, tag, every = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    st = UserStore(directory, writable=True, compact_every=every)
    pad = "x" * 400  # a bigger snapshot: compactions take longer, so kills land in them
    i = 0
    while True:
        doc_id = f"{tag}-{i:06d}"
        st.put("seq", doc_id, {"tag": tag, "i": i, "pad": pad})
        os.write(1, (doc_id + "\\n").encode())  # only after the commit returned
        i += 1
"""


def test_sigkill_mid_write_loses_no_acknowledged_commit(tmp_path: Path, spawn) -> None:
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    d = tmp_path / "team" / "alice"
    rounds = 15
    acknowledged: dict[str, list[int]] = {}

    for rnd in range(rounds):
        tag = f"r{rnd:02d}"
        out_path = tmp_path / f"{tag}.out"
        err_path = tmp_path / f"{tag}.err"
        every = 50 if rnd % 2 == 0 else 4  # odd rounds compact almost every commit
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            p = spawn(KILLED_WRITER, d, tag, every, stdout=out, stderr=err)
        _wait_for(lambda: out_path.stat().st_size > 0, 30, f"round {rnd}: first commit (seed {seed})", [p])
        time.sleep(rng.uniform(0.02, 0.2))
        if p.poll() is not None:
            pytest.fail(f"round {rnd}: writer died by itself (seed {seed}):\n{err_path.read_text()}")
        os.kill(p.pid, signal.SIGKILL)
        assert p.wait(timeout=10) == -signal.SIGKILL
        raw = out_path.read_bytes()
        lines = raw.split(b"\n")[:-1]  # a line cut short by the kill is not counted
        acknowledged[tag] = [int(x.decode().split("-")[1]) for x in lines]
        assert acknowledged[tag] == list(range(len(lines)))

    # the store opens fine and holds every acknowledged commit, each round without holes
    temps = sorted(p.name for p in d.iterdir() if p.name.startswith(f".{SNAPSHOT}.tmp-"))
    st = UserStore(d, writable=True, compact_every=50)
    docs = st.all("seq")
    by_tag: dict[str, set[int]] = {}
    for doc in docs:
        assert doc["pad"] == "x" * 400
        by_tag.setdefault(doc["tag"], set()).add(doc["i"])
    for tag, acked in acknowledged.items():
        have = by_tag.get(tag, set())
        missing = set(acked) - have
        assert not missing, f"{tag}: acknowledged commits lost: {sorted(missing)[:10]} (seed {seed})"
        assert have == set(range(len(have))), f"{tag}: a hole in the committed sequence (seed {seed})"
        assert len(have) <= len(acked) + 1  # at most the one committed but not yet reported

    # a new reader agrees with the writer
    assert sorted((x["tag"], x["i"]) for x in UserStore(d, writable=False).all("seq")) == sorted(
        (x["tag"], x["i"]) for x in docs
    )

    # junk is bounded (at most one temp file per killed process) and gets cleaned up
    print(f"seed {seed}: {len(temps)} kills landed mid-compaction (temp files left)")
    assert len(temps) <= rounds, temps
    st.put("seq", "final", {"tag": "final", "i": 0, "pad": "x" * 400})
    for p in d.glob("journal-*.jsonl"):
        raw = p.read_bytes()
        if p == st.journal_path():
            assert raw.endswith(b"\n")  # the torn tail (if any) was trimmed by the commit
        for line in raw.splitlines()[: None if raw.endswith(b"\n") else -1]:
            json.loads(line)
    old = time.time() - 3600
    for name in temps:
        if (d / name).exists():
            os.utime(d / name, (old, old))  # as if the crash was long ago
    st.compact()
    names = {p.name for p in d.iterdir()}
    assert names <= {SNAPSHOT, ".lock", st.journal_path().name}, names
    assert len(st.all("seq")) == len(docs) + 1
    st.close()
