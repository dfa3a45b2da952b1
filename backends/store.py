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
* **A teammate's files are untrusted input.** Another user writes them, so
  nothing in them is believed: a record's owner is the owner of the directory it
  was read from (a directory must belong to the user it is named for, or to root
  or you), records are checked field by field (:func:`models.record_problem`)
  and one that fails is skipped and reported; files are opened without
  following links and without blocking, must be regular files under a size cap
  (:data:`TEAMMATE_FILE_CAP`), and a lock a teammate holds is waited on for a
  moment only. What fails is one line in the per-user errors, never an
  exception that hides everyone's runs. The team directory itself must be
  sticky and belong to root or you (:func:`check_team_dir`).

Metric points never go here: they are append-only per-run JSONL files. Nor does a running
run's fast-changing status (its last log line, the log offset followed so far): that is one small
file per active run, ``<team_dir>/<user>/status/<run id>.json``, replaced atomically without an
fsync and read over the record by :meth:`Store.runs` while the run is not final. The journal grows
with state changes, not with log lines; the final transition journals the last line once.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import pwd
import stat
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from tinydb import TinyDB
from tinydb.storages import Storage
from tinydb.table import Table

from .errors import AmbiguousError, NotFoundError, StoreCorruptError, StoreError
from .ids import describe, is_stored_id, is_user_name
from .models import RECORD_TYPES, Record, Run, RunState, check_transition, record_problem_in, utcnow

SCHEMA_VERSION = 1
META = "_meta"
SNAPSHOT = "store.json"
LOCK = ".lock"
BLOBS = "blobs"
STATUS = "status"
# The fast-changing fields of an active run that live in its status file, not in the journal.
STATUS_FIELDS: dict[str, type] = {"last_line": str, "log_offset": int}
STATUS_CAP = 16 << 10  # a status file holds a 300-character line and a number

# Reading a teammate's store costs at most this much per file (a snapshot, a journal) before parsing;
# a larger file is skipped with an error line. (10,000 runs of a busy user are about 20 MiB.)
TEAMMATE_FILE_CAP = 64 << 20
BLOB_CAP = 8 << 20  # a code diff blob (code.MAX_DIFF_BYTES is 1 MiB)
# How long a read waits for a teammate's writer to release their lock before reading without it
# (their snapshot is replaced atomically and a torn journal tail is ignored, so that is safe).
LOCK_WAIT_SECONDS = 0.25
# Which field of a record names its owner; it is set from the directory the record was read from.
OWNER_FIELD = {"runs": "user", "deployments": "user", "notebooks": "user", "edges": "user", "annotations": "user",
               "instances": "created_by"}

_O_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)

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


_names: dict[int, str] = {}


def user_of_uid(uid: int) -> str:
    """The login name of ``uid`` (``uid N`` when it has none)."""
    name = _names.get(uid)
    if name is None:
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = f"uid {uid}"
        _names[uid] = name
    return name


def _trusted_uid(uid: int) -> bool:
    """Root and you could write anything of yours anyway: what they own is taken at its name."""
    return uid in (0, os.geteuid())


def check_team_dir(team_dir: Path, st: os.stat_result) -> None:
    """Refuse a team directory in which others could rename or replace your store: one not owned
    by root or you, or writable by others without the sticky bit (raises StoreError)."""
    make = f"sudo install -d -m 1777 -o root {team_dir}"
    if not stat.S_ISDIR(st.st_mode):
        raise StoreError(f"The team directory {team_dir} is not a directory.",
                         f"Create it as a shared directory: {make}")
    if not _trusted_uid(st.st_uid):
        raise StoreError(
            f"The team directory {team_dir} belongs to {user_of_uid(st.st_uid)}, who could rename or replace "
            "everyone's store in it; labdeck does not use it.",
            f"Have it owned by root: {make} (an administrator moves the stores into it), "
            "or set [store] team_dir (or LABDECK_TEAM_DIR) to another directory.")
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise StoreError(
            f"The team directory {team_dir} is writable by others but not sticky: anyone could rename or "
            "remove everyone's store in it; labdeck does not use it.",
            f"Make it sticky (chmod +t {team_dir}), or create it right: {make}")


def ensure_team_dir(team_dir: Path) -> None:
    """Create the team directory (sticky, world-writable, like /tmp) if missing; check it if not.

    (The path itself may be a link: it is your own configuration. Each user's directory in it is not.)"""
    try:
        st = os.stat(team_dir)
    except (FileNotFoundError, NotADirectoryError):  # (a file on the way: creating it says so)
        try:
            team_dir.mkdir(parents=True, exist_ok=True)
            os.chmod(team_dir, 0o1777)
        except OSError as e:
            raise StoreError(
                f"Cannot create the team directory {team_dir} ({e.strerror}).",
                "Set [store] team_dir in the config (or LABDECK_TEAM_DIR) to a directory you can write.",
            ) from None
        return
    except OSError as e:
        raise StoreError(f"Cannot use the team directory {team_dir} ({e.strerror}).",
                         "Set [store] team_dir in the config (or LABDECK_TEAM_DIR) to a directory you can read.") from None
    check_team_dir(team_dir, st)


def _open_regular(name: str | Path, *, dir_fd: int | None = None, cap: int | None = None, shown: Path) -> int | None:
    """Open a store file for reading without following a link or blocking (a FIFO, a device):
    the fd of a regular file of at most ``cap`` bytes, or None if it does not exist.
    Anything else is a StoreCorruptError naming ``shown`` (the file as the user knows it)."""
    try:
        fd = os.open(name, _O_READ, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except PermissionError:
        raise StoreError(f"Cannot read {shown} (permission denied).", "Ask its owner to make it readable (0644).") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise StoreCorruptError(shown, "it is a symbolic link, which labdeck does not follow") from None
        raise StoreError(f"Cannot read {shown} ({e.strerror}).") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StoreCorruptError(shown, "it is not a regular file")
        if cap is not None and st.st_size > cap:
            raise StoreCorruptError(shown, f"{st.st_size:,} bytes, more than the {cap:,} labdeck reads of a teammate's file")
    except BaseException:
        os.close(fd)
        raise
    return fd


DENSE = "far more JSON objects and lists than records have: a file that would cost its readers memory"


def _too_dense(raw: bytes) -> bool:
    """More JSON containers than a store of real records holds. Parsed, each costs Python ~60–200
    bytes while an empty one costs 2–3 bytes of file: a 30 MB file of ``{},`` took 825 MB to read.
    Real records run one container per ~60 bytes (a 2 KB run has ~30); the bound allows one per 16."""
    return raw.count(b"{") + raw.count(b"[") > len(raw) // 16 + 10_000


def _read_fd(fd: int, offset: int, cap: int | None, shown: Path) -> bytes:
    """The bytes of ``fd`` from ``offset`` to its end (at most ``cap`` in all: it may grow meanwhile)."""
    chunks = []
    limit = None if cap is None else max(0, cap - offset) + 1
    got = 0
    while True:
        want = 8 << 20 if limit is None else min(8 << 20, limit - got)
        if want <= 0:
            raise StoreCorruptError(shown, f"more than the {cap:,} bytes labdeck reads of a teammate's file")
        b = os.pread(fd, want, offset + got)
        if not b:
            return b"".join(chunks)
        chunks.append(b)
        got += len(b)


class UserStore:
    """One user's store files. Writable only by their owner; readable by all.

    A read-only store is someone else's: its files are read through a descriptor of its
    directory (``owner_uid``: who must still own it), under :data:`TEAMMATE_FILE_CAP`, and
    their lock is waited on for :data:`LOCK_WAIT_SECONDS` at most."""

    def __init__(self, directory: Path, *, writable: bool, fsync: bool = True, compact_every: int = 2000,
                 owner_uid: int | None = None, cap: int | None = None) -> None:
        self.dir = Path(directory)
        self.user = self.dir.name
        self.writable = writable
        self.fsync = fsync
        self.compact_every = compact_every
        self.owner_uid = owner_uid
        self.cap = None if writable else (TEAMMATE_FILE_CAP if cap is None else cap)
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
        self._dir_fd: int | None = None  # while a read-only store is read: its directory, opened without following links
        self._verdicts: dict[str, dict[str, tuple[dict[str, Any], str | None]]] = {}  # see checked()
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
        """Create your directory, or check that the one there is really yours (a directory, not a
        link, owned by you): someone may have made ``team/<you>`` first, or pointed it elsewhere."""
        ensure_team_dir(self.dir.parent)
        not_writable = "Fix its permissions, or set [store] team_dir (or LABDECK_TEAM_DIR) to a directory you can write."
        try:
            self.dir.mkdir(mode=0o755)
        except FileExistsError:
            pass
        except OSError as e:
            raise StoreError(f"The store directory {self.dir} is not writable ({e.strerror}).", not_writable) from None
        try:
            dfd = os.open(self.dir, _O_DIR)
        except OSError as e:
            self._refuse_dir(e)
        try:
            st = os.fstat(dfd)
            if st.st_uid != os.geteuid():
                owner = user_of_uid(st.st_uid)
                raise StoreError(
                    f"{self.dir} belongs to {owner}, not to you: labdeck keeps your store only in a directory of "
                    "your own, and does not use this one.",
                    f"Ask {owner} or an administrator to remove or rename it (sudo mv {self.dir} {self.dir}.old); "
                    "labdeck then creates yours. Or set [store] team_dir (or LABDECK_TEAM_DIR) to another directory.")
            os.fchmod(dfd, 0o755)
            fd = os.open(LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644, dir_fd=dfd)
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise StoreError(f"{self.dir / LOCK} is not a regular file.", "Remove it; labdeck creates it again.")
                os.fchmod(fd, 0o644)
            finally:
                os.close(fd)
        except OSError as e:
            raise StoreError(f"The store directory {self.dir} is not writable ({e.strerror}).", not_writable) from None
        finally:
            os.close(dfd)
        if not os.access(self.dir, os.W_OK):
            raise StoreError(f"The store directory {self.dir} is not writable.", not_writable)

    def _refuse_dir(self, e: OSError) -> None:
        """Your directory could not be opened as one: say what is there, whose it is, and what to do."""
        try:
            st = os.lstat(self.dir)
            owner = user_of_uid(st.st_uid)
            what = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a directory"
        except OSError:
            owner, what = "", e.strerror or "not usable"
        if owner:
            raise StoreError(
                f"{self.dir} is {what} (made by {owner}), not your store directory: labdeck does not use it.",
                f"Ask {owner} or an administrator to remove it (sudo rm {self.dir}); labdeck then creates yours. "
                "Or set [store] team_dir (or LABDECK_TEAM_DIR) to another directory.") from None
        raise StoreError(f"The store directory {self.dir} cannot be used ({what}).",
                         "Set [store] team_dir (or LABDECK_TEAM_DIR) to another directory.") from None

    def _open_dir(self) -> None:
        """A read-only store: open its directory (no link followed) and check it is still its owner's."""
        try:
            fd = os.open(self.dir, _O_DIR)
        except FileNotFoundError:
            return  # nothing written yet (or gone): an empty store
        except OSError as e:
            reason = "it is not a directory" if e.errno in (errno.ELOOP, errno.ENOTDIR) else e.strerror
            raise StoreError(f"Cannot read {self.dir} ({reason}).") from None
        st = os.fstat(fd)
        if self.owner_uid is not None and st.st_uid != self.owner_uid:
            os.close(fd)
            raise StoreError(f"{self.dir} changed owner (now {user_of_uid(st.st_uid)}): not read.")
        self._dir_fd = fd

    def _file(self, name: str, shown: Path) -> int | None:
        """A store file opened for reading (see :func:`_open_regular`); None if missing."""
        if self.writable:
            return _open_regular(self.dir / name, shown=shown)
        if self._dir_fd is None:
            return None
        return _open_regular(name, dir_fd=self._dir_fd, cap=self.cap, shown=shown)

    def _lock_fd_for_read(self) -> int | None:
        """A teammate's ``.lock`` for flock, or None: missing, or not a regular file (then it guards
        nothing honest and is read past)."""
        try:
            fd = os.open(LOCK, _O_READ, dir_fd=self._dir_fd) if self._dir_fd is not None else None
        except OSError:
            return None
        if fd is not None and not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return None
        return fd

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
                if self.writable:
                    try:
                        fd = os.open(self.dir / LOCK, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
                    except FileNotFoundError:
                        if exclusive:
                            raise
                    except PermissionError as e:
                        raise StoreError(f"Cannot open {self.dir / LOCK} ({e.strerror}).", "Check the team directory's permissions.") from None
                    if fd is not None:
                        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
                else:
                    self._open_dir()
                    fd = self._lock_fd_for_read()
                    if fd is not None and not _flock_shared_briefly(fd):
                        os.close(fd)  # a writer holds it (or a teammate keeps it): read without it
                        fd = None
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
                except RecursionError:
                    self._snap_key = ("unloaded",)
                    raise StoreCorruptError(self.dir, "nested too deeply") from None
                yield
            finally:
                self._depth = 0
                self._exclusive = False
                if fd is not None:
                    os.close(fd)  # releases the flock
                if self._dir_fd is not None:
                    os.close(self._dir_fd)
                    self._dir_fd = None

    # ---- reading -----------------------------------------------------------
    def _catch_up(self) -> None:
        fd = self._file(SNAPSHOT, self.snapshot_path)
        try:
            if fd is None:
                key: tuple | None = None
            else:
                st = os.fstat(fd)
                key = (st.st_ino, st.st_mtime_ns, st.st_size)
            if key != self._snap_key:
                self._load_snapshot(key, fd)
        finally:
            if fd is not None:
                os.close(fd)
        self._replay_journal()

    def _exists(self, name: str) -> bool:
        try:
            os.stat(name if self._dir_fd is not None else self.dir / name, dir_fd=self._dir_fd, follow_symlinks=False)
            return True
        except OSError:
            return False

    def _load_snapshot(self, key: tuple | None, fd: int | None = None) -> None:
        if key is None:
            # A journal with no snapshot was written before stores got a snapshot on their
            # first commit (see _commit), i.e. at schema 1.
            legacy = self._exists(self.journal_path(0).name)
            self._data, self._gen, self._schema = {}, 0, 1 if legacy else SCHEMA_VERSION
        else:
            own_fd = fd is None
            if own_fd:
                fd = self._file(SNAPSHOT, self.snapshot_path)
                if fd is None:
                    raise StoreError(f"{self.snapshot_path} vanished while it was read.", "Try again.")
            try:
                raw = _read_fd(fd, 0, self.cap, self.snapshot_path)
                if self.cap is not None and _too_dense(raw):
                    raise StoreCorruptError(self.snapshot_path, DENSE)
                data = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as e:
                raise StoreCorruptError(self.snapshot_path, str(e)) from None
            except RecursionError:
                raise StoreCorruptError(self.snapshot_path, "nested too deeply") from None
            finally:
                if own_fd:
                    os.close(fd)
            if not isinstance(data, dict) or not all(
                isinstance(t, dict) and all(isinstance(d, dict) for d in t.values()) for t in data.values()
            ):
                raise StoreCorruptError(self.snapshot_path, "not a TinyDB table mapping")
            meta = data.pop(META, {}).get("1", {})
            try:
                self._gen = int(meta.get("gen", 0))
                self._schema = int(meta.get("schema", 0))
            except (TypeError, ValueError, AttributeError):
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
        fd = self._file(path.name, path)
        try:
            if fd is None:
                ino, chunk = None, (None if self._journal_offset else b"")
            else:
                st = os.fstat(fd)
                ino = st.st_ino
                if self._journal_offset and (ino != self._journal_ino or st.st_size < self._journal_offset):
                    chunk = None  # not the file we read before (moved aside or replaced)
                else:
                    chunk = _read_fd(fd, self._journal_offset, self.cap, path)
            if chunk is None:
                # What we applied from the journal is no longer on disk: start over from the snapshot.
                self._load_snapshot(self._snap_key)
                if fd is not None:
                    os.close(fd)
                    fd = None
                self._replay_journal()
                return
            self._journal_ino = ino
            if chunk:
                self._apply_journal(chunk, fd, path)
        finally:
            if fd is not None:
                os.close(fd)
        if self._schema < SCHEMA_VERSION:
            self._migrate()

    def _apply_journal(self, chunk: bytes, fd: int | None, path: Path) -> None:
        end = chunk.rfind(b"\n") + 1  # a tail without newline is a torn, unacknowledged write
        if not end:
            return
        if self.cap is not None and _too_dense(chunk[:end]):
            raise StoreCorruptError(path, DENSE)
        for i, line in enumerate(chunk[:end].splitlines()):
            try:
                entry = json.loads(line)
                table, doc_id, doc = entry["t"], entry["id"], entry["d"]
                if not (isinstance(table, str) and isinstance(doc_id, str) and (doc is None or isinstance(doc, dict))):
                    raise TypeError("not a journal entry")
            except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError) as e:
                self._snap_key = ("unloaded",)  # lines before this one were applied: reload next time
                start_line = os.pread(fd, self._journal_offset, 0).count(b"\n") if fd is not None else 0
                detail = "nested too deeply" if isinstance(e, RecursionError) else str(e)
                raise StoreCorruptError(path, f"line {start_line + i + 1}: {detail}") from None
            tab = self._data.setdefault(table, {})
            if doc is None:
                tab.pop(doc_id, None)
            else:
                tab[doc_id] = doc
            self._journal_entries += 1
        self._journal_offset += end

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

    def checked(self, table: str, check: Callable[[str, dict[str, Any]], str | None]
                ) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
        """Copies of the documents of ``table`` that ``check(key, doc)`` finds no problem with, and
        ``(key, problem)`` of those it does. A document is checked once: the verdict is kept until
        the document itself is replaced (so a refresh of 10,000 unchanged runs checks none)."""
        with self._locked(False):
            tab = self._data.get(table, {})
            old = self._verdicts.get(table, {})
            verdicts: dict[str, tuple[dict[str, Any], str | None]] = {}
            good: list[dict[str, Any]] = []
            bad: list[tuple[str, str]] = []
            for key, doc in tab.items():
                seen = old.get(key)
                problem = seen[1] if seen is not None and seen[0] is doc else check(key, doc)
                verdicts[key] = (doc, problem)
                if problem is None:
                    good.append(dict(doc))
                else:
                    bad.append((key, problem))
            self._verdicts[table] = verdicts
            return good, bad

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


def _flock_shared_briefly(fd: int) -> bool:
    """flock(LOCK_SH) on a teammate's lock, waiting :data:`LOCK_WAIT_SECONDS` at most (their
    writer holds it for a commit; a hostile teammate may hold it for ever)."""
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        except OSError:
            return False


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
    """The store labdeck uses: this user's writable file set + read-only views of teammates'.

    Who owns a record is where it was read from: ``<team_dir>/<user>/`` must belong to ``user``
    (or to root, or to you), and every record read from it is ``user``'s (its ``user`` field is set
    so; a record of an untrusted directory that claims someone else is skipped and reported)."""

    def __init__(self, team_dir: str | os.PathLike, user: str, *, fsync: bool = True, compact_every: int = 2000) -> None:
        self.team_dir = Path(team_dir).expanduser()
        if not is_user_name(user):
            raise StoreError(f"The user name {describe(user)} cannot name a store directory.",
                             "labdeck takes it from your login (LOGNAME / USER): letters, digits, _ . - only.")
        self.user = user
        self._fsync = fsync
        self._compact_every = compact_every
        self.mine = UserStore(self.team_dir / user, writable=True, fsync=fsync, compact_every=compact_every)
        self._others: dict[str, UserStore] = {}

    @classmethod
    def from_config(cls, config) -> "Store":
        return cls(config.team_dir, config.user, fsync=config.get("store", "fsync"), compact_every=config.get("store", "compact_every"))

    # ---- team --------------------------------------------------------------
    def _teammate_problem(self, name: str, st: os.stat_result) -> str | None:
        """Why ``<team_dir>/<name>`` (lstat ``st``) is not read as ``name``'s store, or None."""
        where = f"{self.team_dir}/{name if is_user_name(name) else describe(name)}"
        if stat.S_ISLNK(st.st_mode):
            return f"{where} is a symbolic link (made by {user_of_uid(st.st_uid)}), not a store: skipped."
        if not stat.S_ISDIR(st.st_mode):
            return f"{where} is not a directory: skipped."
        if not is_user_name(name):
            return f"{where} is not named for a user: skipped."
        if not _trusted_uid(st.st_uid) and user_of_uid(st.st_uid) != name:
            return (f"{where} belongs to {user_of_uid(st.st_uid)}, not to {name}: skipped (its records would pass "
                    f"for {name}'s).")
        if st.st_mode & 0o022:
            return (f"{where} is writable by others (mode {stat.S_IMODE(st.st_mode):o}): anyone could put records in "
                    f"it that pass for {name}'s; skipped until {name} runs chmod go-w on it.")
        return None

    def _teammates(self) -> tuple[dict[str, int], dict[str, str]]:
        """Teammates whose directories pass the checks (name -> owner uid), and one warning for
        each directory that does not (keyed by its name, made printable)."""
        ok: dict[str, int] = {}
        skipped: dict[str, str] = {}
        try:
            entries = list(os.scandir(self.team_dir))
        except OSError:
            return ok, skipped
        for e in entries:
            name = e.name
            if name.startswith(".") or name == self.user:
                continue
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                continue  # a stray file is nobody's store
            problem = self._teammate_problem(name, st)
            if problem:
                skipped[name if is_user_name(name) else describe(name)] = problem
            else:
                ok[name] = st.st_uid
        return dict(sorted(ok.items())), skipped

    def users(self) -> list[str]:
        """You and every teammate whose directory passes the checks."""
        return sorted({*self._teammates()[0], self.user})

    def _store_of(self, user: str, uid: int | None = None) -> UserStore:
        if user == self.user:
            return self.mine
        if uid is None:  # (callers that did not just list the team directory)
            try:
                st = os.lstat(self.team_dir / user) if is_user_name(user) else None
            except OSError:
                st = None
            problem = "no such user" if st is None else self._teammate_problem(user, st)
            if problem:
                raise StoreError(f"{describe(user)}: {problem}" if st is None else problem)
            uid = st.st_uid  # type: ignore[union-attr]
        st_ = self._others.get(user)
        if st_ is None or st_.owner_uid != uid:
            st_ = self._others[user] = UserStore(self.team_dir / user, writable=False, owner_uid=uid)
        return st_

    def _own(self, table: str, docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Your own documents, each saying it is yours (whatever an older labdeck wrote in it)."""
        field = OWNER_FIELD.get(table)
        if field:
            for d in docs:
                d[field] = self.user
        return docs

    def team_records(self, table: str) -> tuple[list[dict[str, Any]], dict[str, str]]:
        """All users' documents of ``table`` and, per user, one line on what was not read:
        their store failing, their directory failing the checks, or their records that did
        (:func:`models.record_problem_in`; a record claiming another owner among them)."""
        out: list[dict[str, Any]] = []
        teammates, errors = self._teammates()
        field = OWNER_FIELD.get(table)
        # Ids are unique across users (ULIDs), so a teammate's record with an id already read is a copy,
        # not a record of its own: yours are read first and win, then teammates' in name order.
        seen: set[str] = set()
        for user in [self.user, *sorted(u for u in teammates if u != self.user)]:
            if user == self.user:  # your own store failing is not a footnote: it raises, for the caller to show
                mine = self._own(table, self.mine.all(table))
                seen.update(d["id"] for d in mine if isinstance(d.get("id"), str))
                out.extend(mine)
                continue
            uid = teammates[user]
            claims_checked = not _trusted_uid(uid)  # what root or you wrote is yours to believe

            def check(key: str, d: dict[str, Any], user: str = user, claims_checked: bool = claims_checked) -> str | None:
                problem = record_problem_in(table, d)
                if problem is None and d["id"] != key:
                    problem = "it is stored under another id"
                if problem is None and claims_checked and d.get(field, user) != user:
                    problem = f"it claims to be {d[field]}'s"
                return problem

            try:
                if field is None:  # a table of no record type: as stored
                    out.extend(self._store_of(user, uid).all(table))
                    continue
                good, bad = self._store_of(user, uid).checked(table, check)
            except StoreError as e:
                errors[user] = _one_line(e)
                continue
            for d in good:
                d[field] = user
            bad += [(d["id"], "another record has this id (yours, or a teammate's read first)")
                    for d in good if d["id"] in seen]
            good = [d for d in good if d["id"] not in seen]
            seen.update(d["id"] for d in good)
            out.extend(good)
            if bad:
                errors[user] = _skipped_line(user, table, bad)
        return out, errors

    # ---- runs --------------------------------------------------------------
    def add(self, record: Record) -> Record:
        field = OWNER_FIELD.get(record.TABLE)
        if field and hasattr(record, field):
            setattr(record, field, self.user)  # what it says matches where it is (readers check that)
        self.mine.put(record.TABLE, record.id, record.to_dict())
        return record

    def runs(self, *, team: bool = True) -> tuple[list[Run], dict[str, str]]:
        if team:
            docs, errors = self.team_records("runs")
        else:
            docs, errors = self._own("runs", self.mine.all("runs")), {}
        runs = self.with_status([Run.from_dict(d) for d in docs])
        runs.sort(key=lambda r: r.id, reverse=True)
        return runs, errors

    def own_run(self, run_id: str) -> Run:
        """One of your runs, read from your own store only: what acts on a run (cancel, kill its
        processes) uses this record, never a teammate's copy of the same id."""
        doc = self.mine.get("runs", run_id)
        if doc is None:
            raise NotFoundError(f"No run {describe(run_id)} in your store.", "Only your own runs can be changed.")
        return Run.from_dict(self._own("runs", [doc])[0])

    def find_run(self, ref: str) -> Run:
        """A run by ``[user/]ref``: full id, unique id prefix or suffix (case-insensitive), or exact name
        (the newest of that name).

        An id of yours wins over a teammate's record of the same id. A prefix that matches several
        runs, or a name that runs of several users have, raises :class:`AmbiguousError` naming them
        (``user/id name``): prefix the user, or give the id, to pick one."""
        owner, _, rest = ref.partition("/")
        qualified = bool(rest) and is_user_name(owner) and owner in self.users()
        if qualified:
            ref = rest
            runs, _ = self.runs(team=owner != self.user)
            runs = [r for r in runs if r.user == owner]
        else:
            runs, _ = self.runs()
        ref_u = ref.upper()
        exact = [r for r in runs if r.id == ref_u]
        if exact:
            mine = [r for r in exact if r.user == self.user]
            if mine or len(exact) == 1:
                return (mine or exact)[0]
            raise _ambiguous(ref, exact, "Give it as user/id.")
        matches = [r for r in runs if r.id.startswith(ref_u) or (len(ref) >= 4 and r.id.endswith(ref_u))]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise _ambiguous(ref, matches, "Give more characters of the id" + ("." if qualified else ", or user/id."))
        named = [r for r in runs if r.name == ref]
        if named:
            if len({r.user for r in named}) == 1:
                return named[0]
            raise _ambiguous(ref, named, "Give it as user/name (the newest of that user's runs of that name), or the id.")
        raise NotFoundError(f"No run {describe(ref)}" + (f" of {owner}." if qualified else "."), "`labdeck ps` lists runs.")

    def transition(self, run_id: str, new_state: RunState | str, **fields: Any) -> Run:
        """Move one of this user's runs to ``new_state`` (checked by the state machine), atomically.

        A final state ends the run's status file: what it said is in the record from then on
        (the caller passes the last line with the final transition; a status field it does not
        pass is carried into the record here)."""
        try:
            final = RunState(new_state).is_final
        except ValueError:
            final = False  # (check_transition below says what is wrong with it)
        status = self._read_status(self.user, [run_id]).get(run_id, {}) if final else {}

        def change(doc: dict[str, Any] | None) -> dict[str, Any]:
            if doc is None:
                raise NotFoundError(f"No run {run_id} in your store.", "Only your own runs can change state.")
            state = check_transition(doc["state"], new_state)
            doc.update(status)
            doc.update(fields)
            doc["state"] = state.value
            return doc

        run = Run.from_dict(self._own("runs", [self.mine.mutate("runs", run_id, change)])[0])
        if final:
            try:
                os.unlink(self.mine.dir / STATUS / f"{run_id}.json")
            except OSError:
                pass
        return run

    def update_run(self, run_id: str, **fields: Any) -> Run:
        def change(doc: dict[str, Any] | None) -> dict[str, Any]:
            if doc is None:
                raise NotFoundError(f"No run {run_id} in your store.")
            if "state" in fields:
                raise StoreError("Use transition() to change a run's state.")
            doc.update(fields)
            return doc

        return Run.from_dict(self._own("runs", [self.mine.mutate("runs", run_id, change)])[0])

    # ---- status: an active run's fast-changing fields, beside the journal ------------------
    def set_status(self, run_id: str, **fields: Any) -> None:
        """Record fast-changing status of one of your active runs (:data:`STATUS_FIELDS`: its last
        log line, the log offset followed) in ``<your dir>/status/<id>.json``, not in the journal.

        The file is replaced atomically (readers see the old or the new one, never half) and not
        fsynced: it is current news, not history; after a crash the record's last journaled value
        shows until the next poll. Two writers of the same run (the TUI and a CLI command) may
        drop each other's field for one poll; each writes again on its next one."""
        bad = sorted(k for k, v in fields.items() if not isinstance(v, STATUS_FIELDS.get(k, ())) or isinstance(v, bool))
        if bad or not is_stored_id(run_id):
            raise StoreError(f"Not a run status: {describe(run_id)} {', '.join(map(describe, bad))}.")
        doc = {**self._read_status(self.user, [run_id]).get(run_id, {}), **fields}
        d = self.mine.dir / STATUS
        tmp = d / f".{run_id}.tmp-{os.getpid()}"
        try:
            try:
                d.mkdir(mode=0o755)
                os.chmod(d, 0o755)  # (past the umask: teammates read it)
            except FileExistsError:
                pass
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                os.fchmod(fd, 0o644)
                _write_all(fd, json.dumps(doc, separators=(",", ":")).encode())
            finally:
                os.close(fd)
            os.replace(tmp, d / f"{run_id}.json")
        except OSError as e:
            raise StoreError(f"Cannot write {d / run_id}.json ({e.strerror}).", "Check free disk space and permissions.") from None

    def with_status(self, runs: list[Run]) -> list[Run]:
        """``runs`` with each non-final run's status file (its owner's) read over its record.

        A teammate's file is read like the rest of their store: their checked directory, no link
        followed, a regular file under :data:`STATUS_CAP`, only the known fields of the right
        types. A file that fails any of that is ignored: the record's own value shows."""
        by_user: dict[str, list[str]] = {}
        for r in runs:
            if not r.run_state.is_final:
                by_user.setdefault(r.user, []).append(r.id)
        found: dict[tuple[str, str], dict[str, Any]] = {}
        for user, ids in by_user.items():
            for run_id, doc in self._read_status(user, ids).items():
                found[(user, run_id)] = doc
        for r in runs:
            doc = found.get((r.user, r.id))
            if doc:
                for k, v in doc.items():
                    setattr(r, k, v)
        return runs

    def _read_status(self, user: str, ids: list[str]) -> dict[str, dict[str, Any]]:
        """The status files of ``user``'s runs ``ids`` that exist and pass the checks."""
        if not is_user_name(user):
            return {}
        try:
            if user != self.user:
                owner = self._store_of(user).owner_uid  # the directory passes the checks
            else:
                owner = os.geteuid()
            dfd = os.open(self.team_dir / user, _O_DIR)
        except (OSError, StoreError):
            return {}
        out: dict[str, dict[str, Any]] = {}
        try:
            st = os.fstat(dfd)
            if owner is not None and st.st_uid != owner:
                return {}
            try:
                sfd = os.open(STATUS, _O_DIR, dir_fd=dfd)
            except OSError:
                return {}
            try:
                if os.fstat(sfd).st_uid != st.st_uid:
                    return {}
                for run_id in ids:
                    if not is_stored_id(run_id):
                        continue
                    shown = self.team_dir / user / STATUS / f"{run_id}.json"
                    try:
                        fd = _open_regular(f"{run_id}.json", dir_fd=sfd, cap=STATUS_CAP, shown=shown)
                        if fd is None:
                            continue
                        try:
                            doc = json.loads(_read_fd(fd, 0, STATUS_CAP, shown))
                        finally:
                            os.close(fd)
                    except (StoreError, ValueError, OSError):
                        continue
                    if isinstance(doc, dict):
                        good = {k: v for k, v in doc.items() if k in STATUS_FIELDS and isinstance(v, STATUS_FIELDS[k])
                                and not isinstance(v, bool)}
                        if isinstance(good.get("last_line"), str):
                            good["last_line"] = good["last_line"][:1000]
                        if good:
                            out[run_id] = good
            finally:
                os.close(sfd)
        finally:
            os.close(dfd)
        return out

    def records(self, table: str, *, team: bool = True) -> tuple[list[Record], dict[str, str]]:
        cls = RECORD_TYPES[table]
        docs, errors = self.team_records(table) if team else (self._own(table, self.mine.all(table)), {})
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
        """``<team_dir>/<user>/blobs/<name>``, or None if there is none. ``user`` and ``name`` come
        from a record: only a valid user's directory that passes the checks, a plain name, no link
        followed on the way, a regular file of at most :data:`BLOB_CAP` bytes."""
        if not is_user_name(user) or not isinstance(name, str) or "/" in name or "\0" in name or name.startswith("."):
            return None
        if user != self.user:
            try:
                self._store_of(user)  # the directory passes the checks
            except StoreError:
                return None
        shown = self.team_dir / user / BLOBS / name
        try:
            dfd = os.open(self.team_dir / user, _O_DIR)
            try:
                bfd = os.open(BLOBS, _O_DIR, dir_fd=dfd)
            finally:
                os.close(dfd)
            try:
                fd = _open_regular(name, dir_fd=bfd, cap=BLOB_CAP, shown=shown)
            finally:
                os.close(bfd)
        except FileNotFoundError:
            return None
        except StoreCorruptError as e:
            raise StoreError(f"Cannot read {user}'s {name}: {e.message.split('(', 1)[-1].rsplit(')', 1)[0]}.") from None
        except OSError as e:
            raise StoreError(f"Cannot read {user}'s {name} ({e.strerror}).") from None
        if fd is None:
            return None
        try:
            return _read_fd(fd, 0, BLOB_CAP, shown)
        except StoreCorruptError:
            raise StoreError(f"Cannot read {user}'s {name}: larger than {BLOB_CAP:,} bytes.") from None
        finally:
            os.close(fd)

    def close(self) -> None:
        self.mine.close()
        for st in self._others.values():
            st.close()


def _one_line(e: StoreError) -> str:
    """A teammate's store error as one line (the move-aside hint is for its owner, not for you)."""
    return e.message if isinstance(e, StoreCorruptError) or not e.hint else f"{e.message} {e.hint}"


def _skipped_line(user: str, table: str, bad: list[tuple[str, str]]) -> str:
    """One line on the records of ``user``'s ``table`` that were not read, and why (the first few)."""
    shown = "; ".join(f"{key if is_stored_id(key) else describe(key)}: {why}" for key, why in bad[:3])
    more = f"; and {len(bad) - 3} more" if len(bad) > 3 else ""
    return f"{len(bad)} of {user}'s {table} records skipped ({shown}{more})."


def _ambiguous(ref: str, runs: list[Run], how: str) -> AmbiguousError:
    """Which runs ``ref`` matches, as ``user/id (name)``, and how to pick one."""
    listed = ", ".join(f"{r.user}/{r.id} ({describe(r.name, 30) if r.name else 'no name'})" for r in runs[:6])
    more = f" and {len(runs) - 6} more" if len(runs) > 6 else ""
    users = sorted({r.user for r in runs})
    whose = f" of {', '.join(users)}" if len(users) > 1 else ""
    return AmbiguousError(f"{describe(ref)} matches {len(runs)} runs{whose}: {listed}{more}.", how)
