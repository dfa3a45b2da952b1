"""The metadata store: TinyDB, made safe for many processes and many users.

TinyDB has no locking and rewrites its whole JSON file on every write; two
processes writing one file lose documents, and an update at 10k documents costs
tens of milliseconds. labdeck keeps TinyDB's query API and JSON format, under a
storage of its own:

* **Per-user file sets.** Each Unix user writes only ``<team_dir>/<user>/``:
  ``store.json`` (a TinyDB-format snapshot), ``journal-<gen>.jsonl`` (commits
  since that snapshot) and ``.lock``. Directories are 0755 and files 0644, so
  every teammate can read everything and nobody can write another's records.
  The team directory itself is created sticky and world-writable (like /tmp),
  so each user can add their own directory and nobody can remove another's.
* **Cross-process lock.** Every read takes ``flock(LOCK_SH)`` and every write
  ``flock(LOCK_EX)`` on ``.lock``, then catches up with what other processes
  committed (a ``stat`` when nothing changed).
* **Commits are appends.** A write appends one JSON line per changed document
  to the journal (``fsync`` by default) instead of rewriting the file, so it
  costs the same at 100 and 10,000 runs. A line cut short by a crash has no
  newline and is ignored (it was never acknowledged) and trimmed by the next
  writer.
* **Compaction is atomic.** Every ``compact_every`` entries the whole state is
  written to a temp file, fsynced and ``os.replace``-d over ``store.json``
  with the next generation number; only then is the old journal removed. A
  crash at any point leaves either the old snapshot + journal or the new one.
* **Corruption is never hidden.** A snapshot or a complete journal line that
  does not parse raises :class:`StoreCorruptError` naming the file; nothing is
  truncated. :func:`move_aside` renames it so a fresh store can start.
* **Schema version + migrations.** ``_meta`` holds the schema version; older
  stores are migrated by the functions in :data:`MIGRATIONS` when loaded.

Metric points never go here: they are append-only per-run JSONL files.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from tinydb import TinyDB
from tinydb.storages import Storage
from tinydb.table import Table

from .errors import NotFoundError, StoreCorruptError, StoreError
from .models import RECORD_TYPES, Record, Run, RunState, check_transition, utcnow

SCHEMA_VERSION = 1
META = "_meta"
SNAPSHOT = "store.json"
LOCK = ".lock"

# from_version -> function(tables) -> tables at from_version + 1
MIGRATIONS: dict[int, Callable[[dict[str, dict[str, Any]]], dict[str, dict[str, Any]]]] = {}


def migration(from_version: int):
    """Register a migration of the raw tables from ``from_version`` to ``from_version + 1``."""

    def deco(fn):
        MIGRATIONS[from_version] = fn
        return fn

    return deco


class _NeedExclusive(Exception):
    """Raised inside the store when a read under the shared lock finds an old schema to persist."""


class _StrTable(Table):
    document_id_class = str  # our ids are ULID strings
    default_query_cache_capacity = 0  # other processes change the data under us

    def __init__(self, storage: Storage, name: str, cache_size: int = 0, persist_empty: bool = False) -> None:
        # Table.__init__'s default cache_size was bound when Table was defined (10), so
        # the class attribute above does not reach it: pass 0 explicitly.
        super().__init__(storage, name, cache_size=0, persist_empty=persist_empty)


class _JournalStorage(Storage):
    """TinyDB storage over a :class:`UserStore`: reads hand TinyDB the live
    in-memory tables; writes become journal appends of the documents named in
    ``pending`` (or a full snapshot when a write did not say what it changed)."""

    def __init__(self, owner: "UserStore") -> None:
        self.owner = owner

    def read(self) -> dict[str, dict[str, Any]] | None:
        return self.owner._data

    def write(self, data: dict[str, dict[str, Any]]) -> None:
        self.owner._commit(data)

    def close(self) -> None:
        pass


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def ensure_team_dir(team_dir: Path) -> None:
    """Create the team directory (sticky, world-writable, like /tmp) if missing."""
    if team_dir.is_dir():
        return
    try:
        team_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(team_dir, 0o1777)
    except OSError as e:
        raise StoreError(
            f"Cannot create the team directory {team_dir} ({e.strerror}).",
            "Set [store] team_dir in the config (or LABDECK_TEAM_DIR) to a directory you can write.",
        ) from None


class UserStore:
    """One user's store files. Writable only by their owner; readable by all."""

    def __init__(self, directory: Path, *, writable: bool, fsync: bool = True, compact_every: int = 2000) -> None:
        self.dir = Path(directory)
        self.user = self.dir.name
        self.writable = writable
        self.fsync = fsync
        self.compact_every = compact_every
        self._data: dict[str, dict[str, Any]] = {}
        self._gen = 0
        self._schema = SCHEMA_VERSION
        self._snap_key: tuple | None = ("unloaded",)
        self._journal_offset = 0
        self._journal_entries = 0
        self._journal_ino: int | None = None  # the journal file the first _journal_offset bytes came from
        self._journal_fd: int | None = None
        self._journal_fd_gen = -1
        self._pending: list[tuple[str, str]] | None = None
        self._lock_fd: int | None = None
        self._mutex = threading.RLock()  # threads of one process share the in-memory state
        self._depth = 0
        self._exclusive = False
        if writable:
            self._prepare_dir()
        self.db = TinyDB(storage=_JournalStorage, owner=self)
        self.db.table_class = _StrTable

    # ---- files -------------------------------------------------------------
    @property
    def snapshot_path(self) -> Path:
        return self.dir / SNAPSHOT

    def journal_path(self, gen: int | None = None) -> Path:
        return self.dir / f"journal-{self._gen if gen is None else gen}.jsonl"

    def _prepare_dir(self) -> None:
        ensure_team_dir(self.dir.parent)
        try:
            self.dir.mkdir(mode=0o755, exist_ok=True)
            os.chmod(self.dir, 0o755)
            fd = os.open(self.dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
            os.fchmod(fd, 0o644)
            os.close(fd)
        except OSError as e:
            raise StoreError(
                f"The store directory {self.dir} is not writable ({e.strerror}).",
                "Fix its permissions, or set [store] team_dir (or LABDECK_TEAM_DIR) to a directory you can write.",
            ) from None
        if not os.access(self.dir, os.W_OK):
            raise StoreError(
                f"The store directory {self.dir} is not writable.",
                "Fix its permissions, or set [store] team_dir (or LABDECK_TEAM_DIR) to a directory you can write.",
            )

    @contextmanager
    def _locked(self, exclusive: bool) -> Iterator[None]:
        """Process-wide lock (flock) + thread lock, then catch up with other writers."""
        with self._mutex:
            if self._depth:  # re-entrant within one thread
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            if exclusive and not self.writable:
                raise StoreError(f"The store of {self.user} is read-only to you.", "Each user writes only their own store.")
            fd = None
            try:
                fd = os.open(self.dir / LOCK, os.O_RDWR if self.writable else os.O_RDONLY)
            except FileNotFoundError:
                if exclusive:
                    raise
            except PermissionError as e:
                raise StoreError(f"Cannot open {self.dir / LOCK} ({e.strerror}).", "Check the team directory's permissions.") from None
            try:
                if fd is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
                self._depth = 1
                self._exclusive = exclusive
                try:
                    self._catch_up()
                except _NeedExclusive:
                    # an old schema on disk: migrate and persist it under the exclusive lock only
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    self._exclusive = True
                    self._snap_key = ("reload",)
                    self._catch_up()
                yield
            finally:
                self._depth = 0
                self._exclusive = False
                if fd is not None:
                    os.close(fd)  # releases the flock

    # ---- reading -----------------------------------------------------------
    def _catch_up(self) -> None:
        try:
            st = os.stat(self.snapshot_path)
            key: tuple | None = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            key = None
        except PermissionError:
            raise StoreError(f"Cannot read {self.snapshot_path} (permission denied).", "Ask its owner to make it readable (0644).") from None
        if key != self._snap_key:
            self._load_snapshot(key)
        self._replay_journal()

    def _load_snapshot(self, key: tuple | None) -> None:
        if key is None:
            # A journal with no snapshot was written before stores got a snapshot on their
            # first commit (see _commit), i.e. at schema 1.
            legacy = self.journal_path(0).exists()
            self._data, self._gen, self._schema = {}, 0, 1 if legacy else SCHEMA_VERSION
        else:
            try:
                raw = self.snapshot_path.read_bytes()
                data = json.loads(raw)
            except PermissionError:
                raise StoreError(f"Cannot read {self.snapshot_path} (permission denied).", "Ask its owner to make it readable (0644).") from None
            except (ValueError, UnicodeDecodeError) as e:
                raise StoreCorruptError(self.snapshot_path, str(e)) from None
            if not isinstance(data, dict) or not all(
                isinstance(t, dict) and all(isinstance(d, dict) for d in t.values()) for t in data.values()
            ):
                raise StoreCorruptError(self.snapshot_path, "not a TinyDB table mapping")
            meta = data.pop(META, {}).get("1", {})
            try:
                self._gen = int(meta.get("gen", 0))
                self._schema = int(meta.get("schema", 0))
            except (TypeError, ValueError):
                raise StoreCorruptError(self.snapshot_path, f"bad {META} record") from None
            if self._schema > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.snapshot_path} was written by a newer labdeck (schema {self._schema}; this one reads up to {SCHEMA_VERSION}).",
                    "Upgrade labdeck (pip install -U labdeck).",
                )
            self._data = data
        self._snap_key = key
        self._journal_offset = 0
        self._journal_entries = 0
        self._journal_ino = None

    def _replay_journal(self) -> None:
        path = self.journal_path()
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                ino = st.st_ino
                if self._journal_offset and (ino != self._journal_ino or st.st_size < self._journal_offset):
                    chunk = None  # not the file we read before (moved aside or replaced)
                else:
                    f.seek(self._journal_offset)
                    chunk = f.read()
        except FileNotFoundError:
            ino, chunk = None, (None if self._journal_offset else b"")
        except PermissionError:
            raise StoreError(f"Cannot read {path} (permission denied).", "Ask its owner to make it readable (0644).") from None
        if chunk is None:
            # What we applied from the journal is no longer on disk: start over from the snapshot.
            self._load_snapshot(self._snap_key)
            self._replay_journal()
            return
        self._journal_ino = ino
        if chunk:
            end = chunk.rfind(b"\n") + 1  # a tail without newline is a torn, unacknowledged write
            if end:
                start_line = None
                for i, line in enumerate(chunk[:end].splitlines()):
                    try:
                        entry = json.loads(line)
                        table, doc_id, doc = entry["t"], entry["id"], entry["d"]
                        if not (isinstance(table, str) and isinstance(doc_id, str) and (doc is None or isinstance(doc, dict))):
                            raise TypeError("not a journal entry")
                    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
                        self._snap_key = ("unloaded",)  # lines before this one were applied: reload next time
                        if start_line is None:
                            with open(path, "rb") as f:
                                start_line = f.read(self._journal_offset).count(b"\n")
                        raise StoreCorruptError(path, f"line {start_line + i + 1}: {e}") from None
                    tab = self._data.setdefault(table, {})
                    if doc is None:
                        tab.pop(doc_id, None)
                    else:
                        tab[doc_id] = doc
                    self._journal_entries += 1
                self._journal_offset += end
        if self._schema < SCHEMA_VERSION:
            self._migrate()

    def _migrate(self) -> None:
        version = self._schema
        data = self._data
        while version < SCHEMA_VERSION:
            step = MIGRATIONS.get(version)
            if step is None:
                raise StoreError(f"No migration from store schema {version} in {self.snapshot_path}.", "Upgrade labdeck.")
            data = step(data)
            version += 1
        if self.writable and self._depth and not self._exclusive:
            raise _NeedExclusive()
        self._data, self._schema = data, version
        if self.writable and self._depth:
            self._compact()  # persist the migrated form atomically

    # ---- writing -----------------------------------------------------------
    def _commit(self, data: dict[str, dict[str, Any]]) -> None:
        if not self.writable:
            raise StoreError(f"The store of {self.user} is read-only to you.", "Each user writes only their own store.")
        pending, self._pending = self._pending, None
        if pending is None or self._snap_key is None:
            # No snapshot yet: write one, so that the store on disk always says its schema
            # (a bare journal would be replayed unmigrated by a later labdeck).
            self._compact()
            return
        buf = b"".join(
            json.dumps({"t": t, "id": i, "d": data.get(t, {}).get(i)}, separators=(",", ":"), allow_nan=False).encode() + b"\n"
            for t, i in pending
        )
        fd = self._journal()
        try:
            size = os.fstat(fd).st_size
            if size != self._journal_offset:  # torn tail of a crashed writer (we caught up under the lock)
                os.ftruncate(fd, self._journal_offset)
            os.lseek(fd, self._journal_offset, os.SEEK_SET)
            _write_all(fd, buf)
            if self.fsync:
                os.fdatasync(fd)
        except OSError as e:
            raise StoreError(f"Cannot write {self.journal_path()} ({e.strerror}).", "Check free disk space and permissions.") from None
        self._journal_offset += len(buf)
        self._journal_entries += len(pending)
        if self._journal_entries >= self.compact_every:
            self._compact()

    def _journal(self) -> int:
        stale = (
            self._journal_fd is not None
            and (self._journal_fd_gen != self._gen or os.fstat(self._journal_fd).st_ino != self._journal_ino)
        )  # another generation, or the file was moved aside since we opened it
        if self._journal_fd is None or stale:
            if self._journal_fd is not None:
                os.close(self._journal_fd)
                self._journal_fd = None
            try:
                fd = os.open(self.journal_path(), os.O_RDWR | os.O_CREAT, 0o644)
                os.fchmod(fd, 0o644)  # not left to the umask: teammates must be able to read it
            except OSError as e:
                raise StoreError(f"Cannot open {self.journal_path()} ({e.strerror}).", "Check the store directory's permissions.") from None
            self._journal_fd, self._journal_fd_gen = fd, self._gen
            self._journal_ino = os.fstat(fd).st_ino
        return self._journal_fd

    def _compact(self) -> None:
        """Write the whole state as the next snapshot generation, atomically."""
        gen = self._gen + 1
        doc = {META: {"1": {"schema": self._schema, "gen": gen, "written_at": utcnow()}}}
        doc.update(self._data)
        tmp = self.dir / f".{SNAPSHOT}.tmp-{os.getpid()}-{threading.get_ident()}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.fchmod(fd, 0o644)
                _write_all(fd, json.dumps(doc, separators=(",", ":"), allow_nan=False).encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.snapshot_path)
            _fsync_dir(self.dir)
        except OSError as e:
            try:
                tmp.unlink()
            except OSError:
                pass
            raise StoreError(f"Cannot write {self.snapshot_path} ({e.strerror}).", "Check free disk space and permissions.") from None
        self._gen = gen
        st = os.stat(self.snapshot_path)
        self._snap_key = (st.st_ino, st.st_mtime_ns, st.st_size)
        self._journal_offset = 0
        self._journal_entries = 0
        self._journal_ino = None
        for p in self.dir.iterdir():  # old journals and temp files of crashed compactions
            name = p.name
            # (journal-N.jsonl only: journal-N.jsonl.corrupt-* files were moved aside and are kept)
            stale_journal = name.startswith("journal-") and name.endswith(".jsonl") and name != self.journal_path().name
            stale_tmp = name.startswith(f".{SNAPSHOT}.tmp-") and p != tmp
            if stale_journal or (stale_tmp and _older_than(p, 60)):
                try:
                    p.unlink()
                except OSError:
                    pass

    # ---- the API the rest of labdeck uses ----------------------------------
    def table(self, name: str) -> Table:
        return self.db.table(name)

    def all(self, table: str) -> list[dict[str, Any]]:
        with self._locked(False):
            return [dict(d) for d in self._data.get(table, {}).values()]

    def get(self, table: str, doc_id: str) -> dict[str, Any] | None:
        with self._locked(False):
            doc = self._data.get(table, {}).get(doc_id)
            return dict(doc) if doc is not None else None

    def search(self, table: str, cond) -> list[dict[str, Any]]:
        with self._locked(False):
            return [dict(d) for d in self.table(table).search(cond)]

    def put(self, table: str, doc_id: str, doc: dict[str, Any]) -> None:
        """Insert or replace one document."""
        self.mutate(table, doc_id, lambda _old: doc)

    def mutate(self, table: str, doc_id: str, fn: Callable[[dict[str, Any] | None], dict[str, Any] | None]) -> dict[str, Any] | None:
        """Read-modify-write one document under the exclusive lock.

        ``fn`` gets the current document (or None) and returns the new one
        (or None to delete). The change is committed before this returns; if
        the commit fails, memory is left as it was.
        """
        with self._locked(True):
            current = self._data.get(table, {}).get(doc_id)
            new = fn(dict(current) if current is not None else None)
            if new is None and current is None:
                return None
            self._apply(table, [(doc_id, None if new is None else dict(new))])
            return new

    def put_many(self, table: str, docs: Iterable[tuple[str, dict[str, Any]]]) -> None:
        """Insert or replace many documents in one commit."""
        docs = [(i, dict(d)) for i, d in docs]
        with self._locked(True):
            self._apply(table, docs)

    def _apply(self, table: str, docs: list[tuple[str, dict[str, Any] | None]]) -> None:
        """Change documents in memory and commit them through TinyDB's storage (a journal append).

        This touches only the changed documents: TinyDB's own ``Table._update_table``
        rebuilds the whole table dict twice per write, which at 10,000 runs costs
        more than the commit itself."""
        tab = self._data.setdefault(table, {})
        before = [(i, tab.get(i)) for i, _ in docs]
        for i, d in docs:
            if d is None:
                tab.pop(i, None)
            else:
                tab[i] = d
        self._pending = [(table, i) for i, _ in docs]
        try:
            self.db.storage.write(self._data)
        except BaseException:
            for i, old in before:  # the commit did not happen: neither does the change
                if old is None:
                    tab.pop(i, None)
                else:
                    tab[i] = old
            raise
        finally:
            self._pending = None

    def compact(self) -> None:
        with self._locked(True):
            self._compact()

    def refresh(self) -> None:
        """Catch up with other processes now (reads do this by themselves)."""
        with self._locked(False):
            pass

    def close(self) -> None:
        if self._journal_fd is not None:
            os.close(self._journal_fd)
            self._journal_fd = None


def _older_than(p: Path, seconds: float) -> bool:
    try:
        return time.time() - p.stat().st_mtime > seconds
    except OSError:
        return False


def move_aside(path: str | os.PathLike) -> Path:
    """Rename a corrupt store file to ``<name>.corrupt-<UTC time>``; returns the new path.

    Moving a snapshot aside moves its journals aside too: they only make sense on top
    of it, and left in place a fresh store would replay (or delete) them once it
    reached their generation number.
    """
    p = Path(path)
    if not p.exists():
        raise StoreError(f"{p} does not exist.")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    try:
        lock_fd: int | None = os.open(p.parent / LOCK, os.O_RDWR)
    except OSError:
        lock_fd = None
    try:
        if lock_fd is not None:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)  # no writer of this store runs meanwhile
        target = _aside_name(p, stamp)
        os.rename(p, target)
        if p.name == SNAPSHOT:
            for j in sorted(p.parent.glob("journal-*.jsonl")):
                os.rename(j, _aside_name(j, stamp))
    except PermissionError:
        raise StoreError(f"Cannot move {p} aside: it is not yours (permission denied).",
                         "Only the owner of a store can move its files; ask them.") from None
    except OSError as e:
        raise StoreError(f"Cannot move {p} aside ({e.strerror}).") from None
    finally:
        if lock_fd is not None:
            os.close(lock_fd)
    return target


def _aside_name(p: Path, stamp: str) -> Path:
    """``<name>.corrupt-<stamp>``, never an existing file (a second move in one second must not replace the first)."""
    target = p.with_name(f"{p.name}.corrupt-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = p.with_name(f"{p.name}.corrupt-{stamp}-{n}")
    return target


class Store:
    """The store labdeck uses: this user's writable file set + read-only views of teammates'."""

    def __init__(self, team_dir: str | os.PathLike, user: str, *, fsync: bool = True, compact_every: int = 2000) -> None:
        self.team_dir = Path(team_dir).expanduser()
        self.user = user
        self._fsync = fsync
        self._compact_every = compact_every
        self.mine = UserStore(self.team_dir / user, writable=True, fsync=fsync, compact_every=compact_every)
        self._others: dict[str, UserStore] = {}

    @classmethod
    def from_config(cls, config) -> "Store":
        return cls(config.team_dir, config.user, fsync=config.get("store", "fsync"), compact_every=config.get("store", "compact_every"))

    # ---- team --------------------------------------------------------------
    def users(self) -> list[str]:
        try:
            names = sorted(p.name for p in self.team_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:
            names = []
        if self.user not in names:
            names.append(self.user)
        return names

    def _store_of(self, user: str) -> UserStore:
        if user == self.user:
            return self.mine
        st = self._others.get(user)
        if st is None:
            st = self._others[user] = UserStore(self.team_dir / user, writable=False)
        return st

    def team_records(self, table: str) -> tuple[list[dict[str, Any]], dict[str, str]]:
        """All users' documents of ``table`` and, per user whose store failed, the error."""
        out: list[dict[str, Any]] = []
        errors: dict[str, str] = {}
        for user in self.users():
            try:
                out.extend(self._store_of(user).all(table))
            except StoreError as e:
                if user == self.user:
                    raise  # your own store failing is not a footnote: the caller must show it
                errors[user] = e.render()
        return out, errors

    # ---- runs --------------------------------------------------------------
    def add(self, record: Record) -> Record:
        self.mine.put(record.TABLE, record.id, record.to_dict())
        return record

    def runs(self, *, team: bool = True) -> tuple[list[Run], dict[str, str]]:
        if team:
            docs, errors = self.team_records("runs")
        else:
            docs, errors = self.mine.all("runs"), {}
        runs = [Run.from_dict(d) for d in docs]
        runs.sort(key=lambda r: r.id, reverse=True)
        return runs, errors

    def find_run(self, ref: str) -> Run:
        """A run by full id, unique id prefix or suffix (case-insensitive), or exact name (newest)."""
        runs, _ = self.runs()
        ref_u = ref.upper()
        exact = [r for r in runs if r.id == ref_u]
        if exact:
            return exact[0]
        matches = [r for r in runs if r.id.startswith(ref_u) or (len(ref) >= 4 and r.id.endswith(ref_u))]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise NotFoundError(f"{ref!r} matches {len(matches)} runs.", "Give more characters of the id.")
        named = [r for r in runs if r.name == ref]
        if named:
            return named[0]
        raise NotFoundError(f"No run {ref!r}.", "`labdeck ps` lists runs.")

    def transition(self, run_id: str, new_state: RunState | str, **fields: Any) -> Run:
        """Move one of this user's runs to ``new_state`` (checked by the state machine), atomically."""

        def change(doc: dict[str, Any] | None) -> dict[str, Any]:
            if doc is None:
                raise NotFoundError(f"No run {run_id} in your store.", "Only your own runs can change state.")
            state = check_transition(doc["state"], new_state)
            doc.update(fields)
            doc["state"] = state.value
            return doc

        return Run.from_dict(self.mine.mutate("runs", run_id, change))

    def update_run(self, run_id: str, **fields: Any) -> Run:
        def change(doc: dict[str, Any] | None) -> dict[str, Any]:
            if doc is None:
                raise NotFoundError(f"No run {run_id} in your store.")
            if "state" in fields:
                raise StoreError("Use transition() to change a run's state.")
            doc.update(fields)
            return doc

        return Run.from_dict(self.mine.mutate("runs", run_id, change))

    def records(self, table: str, *, team: bool = True) -> tuple[list[Record], dict[str, str]]:
        cls = RECORD_TYPES[table]
        docs, errors = self.team_records(table) if team else (self.mine.all(table), {})
        return [cls.from_dict(d) for d in docs], errors

    # ---- blobs: larger per-run texts (code diffs) kept beside the store, readable by the team ----
    def write_blob(self, name: str, data: bytes) -> Path:
        """Write ``<team_dir>/<user>/blobs/<name>`` atomically (0644)."""
        if "/" in name or name.startswith("."):
            raise StoreError(f"Bad blob name {name!r}.")
        d = self.mine.dir / "blobs"
        try:
            d.mkdir(mode=0o755, exist_ok=True)
            os.chmod(d, 0o755)
            tmp = d / f".{name}.tmp-{os.getpid()}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.fchmod(fd, 0o644)
                _write_all(fd, data)
            finally:
                os.close(fd)
            os.replace(tmp, d / name)
        except OSError as e:
            raise StoreError(f"Cannot write {d / name} ({e.strerror}).", "Check free disk space and permissions.") from None
        return d / name

    def read_blob(self, user: str, name: str) -> bytes | None:
        try:
            return (self.team_dir / user / "blobs" / name).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StoreError(f"Cannot read {user}'s {name} ({e.strerror}).") from None

    def close(self) -> None:
        self.mine.close()
        for st in self._others.values():
            st.close()

