"""Following run logs: a local copy of each run's combined log, fetched from the byte it ends at.

The local copy (``<cache dir>/logs/<user>/<run id>.log``) is the follower's
memory: its size is the offset of the next read, so a follower that is killed
and started again (labdeck restarted, SSH reconnected, jump host back) resumes
exactly where it stopped: nothing lost, nothing shown twice. The offset is also
written now and then (``log_offset``), for the record: to the run's status file while it
runs (:meth:`backends.store.Store.set_status`, no journal commit), to the record at its end.

What the run reported (its metrics summary, hardware, parameters) goes into the record while it
runs at growing intervals (:data:`RECORD_FIRST`, doubling up to :data:`RECORD_EVERY`), and in
full at its end: a run that logs all day adds a record to the journal a minute, not per line.

**One writer per copy.** Several processes of one user can follow the same run: the background
follower (:mod:`backends.daemon`), a TUI, ``labdeck logs -f``. Only the one holding the run's
*lease* writes its local copies: a non-blocking ``flock`` on ``<id>.follow.lock`` beside the log
copy (0600, never through a link). A follower that cannot take it runs *attached*: it watches the
local copy grow (a size poll every :data:`POLL_ATTACHED`), parses what the holder mirrored, calls
``on_data``, and tries the lease again every :data:`LEASE_RETRY` seconds, so it takes over (from
the byte the copy ends at: nothing twice, nothing lost) when the holder dies. One-off reads
(:meth:`LogFollower.catch_up`, :meth:`LogFollower.sync`) take the lease for their duration, or
read only what the holder wrote.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import time
from pathlib import Path
from typing import Callable

from .errors import LabdeckError, StoreError
from .localfiles import RefusedFile, UnsafePath, open_private, open_private_append, run_cache_path
from .models import Run

CHUNK = 4 << 20
POLL_ACTIVE = 0.1  # seconds between reads while the run writes
POLL_IDLE = 0.5  # a job that logs every few seconds still shows within ~0.6 s
RETRY = 0.25  # after a transport error (the connection pool reconnects on the next call)
SAVE_OFFSET_EVERY = 5.0  # the log offset into the status file (not the journal)
RECORD_FIRST = 5.0  # the first interim record of what a run reported (its parameters show early) ...
RECORD_EVERY = 60.0  # ... then at doubling intervals up to this (a journal commit each)
POLL_ATTACHED = 0.2  # attached (another process holds the lease): how often the local copy's size is looked at
FINAL_TRIES = 20  # reads of an ended run's last bytes that may fail (RETRY apart) before the follow ends without them
LEASE_RETRY = 1.0  # attached: how often the lease is tried again (the holder may have died)


class MissingFile(LabdeckError):
    """The remote file does not exist (yet)."""


async def mirror(transport, remote_path: str, local_path: Path, chunk: int = CHUNK, *, limit: int | None = None,
                 inside: str | None = None) -> int:
    """Append to ``local_path`` whatever ``remote_path`` holds beyond the local file's size (with
    ``limit``: up to about that many bytes in the local copy, no more).

    The local size is the offset: a mirror interrupted at any point resumes exactly there.
    Returns the bytes appended; raises MissingFile when the remote file does not exist.
    The copy is created 0600 in 0700 directories and never written through a symlink
    (:func:`backends.localfiles.open_private_append`): a teammate's log in your cache is yours to read.
    A remote path with a ``..`` part is refused: run files are named below their run directory."""
    if ".." in remote_path.split("/"):
        raise RefusedFile(f"Refusing to copy {remote_path!r}: a run file's path has no '..'.")
    with open(open_private_append(local_path), "ab") as out:
        offset = out.seek(0, os.SEEK_END)
        total = 0
        while limit is None or offset < limit:
            try:
                n = chunk if limit is None else min(chunk, limit - offset)
                part = await (transport.read_file(remote_path, offset, n) if inside is None
                              else transport.read_file(remote_path, offset, n, inside=inside))
            except LabdeckError as e:
                if "No file" in str(e):
                    raise MissingFile(str(e)) from None
                raise
            if part.size < offset:
                raise LabdeckError(f"shrank ({part.size} < {offset} bytes): it was truncated or replaced.")
            if not part.data:
                return total
            out.write(part.data)
            out.flush()
            offset += len(part.data)
            total += len(part.data)
            if len(part.data) < chunk:
                return total
        return total


class LogFollower:
    def __init__(self, workstation, root: Path) -> None:
        self.ws = workstation
        self.root = root
        self.tasks: dict[str, asyncio.Task] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._copies: dict[str, asyncio.Task] = {}  # run id -> its checkpoint being copied off
        self._leases: dict[str, int] = {}  # run id -> the fd whose flock is this process's lease on it
        self.attached: set[str] = set()  # runs followed here while another process holds the lease

    def local_path(self, run: Run) -> Path:
        """``<root>/<user>/<id>.log``, built from a validated user name and id and confined under
        the root (:class:`backends.localfiles.UnsafePath` otherwise): the record is a teammate's file."""
        return run_cache_path(self.root, run.user, run.id, ".log")

    def lease_path(self, run: Run) -> Path:
        return run_cache_path(self.root, run.user, run.id, ".follow.lock")

    def offset(self, run: Run) -> int:
        try:
            return self.local_path(run).stat().st_size
        except (FileNotFoundError, UnsafePath):
            return 0

    # ---- the lease: one writer of a run's local copies, across processes ----------------------
    def _try_lease(self, run: Run) -> int | None:
        """The fd holding the run's lease (an exclusive ``flock``), or None when another process holds it."""
        fd = open_private(self.lease_path(run), os.O_RDWR, "the lease file")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None
        return fd

    def holds(self, run_id: str) -> bool:
        """Whether a follow task of this process holds the run's lease."""
        return run_id in self._leases

    @contextlib.asynccontextmanager
    async def writing(self, run: Run):
        """Yields True while this process may write the run's local copies (its follow task holds the
        lease, or the lease was free and is held for the block), False when another process holds it."""
        lock = self._locks.setdefault(run.id, asyncio.Lock())
        async with lock:
            if run.id in self._leases:
                yield True
                return
            fd = self._try_lease(run)
            if fd is None:
                yield False
                return
            try:
                yield True
            finally:
                os.close(fd)

    def _finished_here(self, run: Run, fd: int) -> bool:
        """Whether the lease's last holder followed the run to its end (and recorded it): it wrote
        ``done <bytes>`` into the lease file then, and the copy still has that many bytes. (The
        record's ``log_offset`` cannot tell: the final transition copies the status file's into it.)"""
        try:
            mark = os.pread(fd, 64, 0)
        except OSError:
            return False
        return mark.startswith(b"done ") and mark[5:].strip() == str(self.offset(run)).encode()

    def _mark_finished(self, run: Run) -> None:
        fd = self._leases.get(run.id)
        if fd is None:
            return
        try:
            mark = b"done %d\n" % self.offset(run)
            os.ftruncate(fd, 0)
            os.pwrite(fd, mark, 0)
        except OSError:
            pass

    def _release(self, run_id: str) -> None:
        fd = self._leases.pop(run_id, None)
        if fd is not None:
            os.close(fd)

    # ---- reading ------------------------------------------------------------------------------
    async def _mirror_log(self, run: Run, transport=None) -> int:
        transport = transport or await self.ws.transport(run.instance)
        try:
            # inside: a run directory (a teammate's record names it) that is a link to a directory of
            # yours is refused, as a link or FIFO planted as output.log is
            return await mirror(transport, f"{run.run_dir}/output.log", self.local_path(run), inside=run.run_dir)
        except MissingFile:
            return 0  # not started yet (or never will: its state says why)
        except LabdeckError as e:
            if "shrank" in str(e):
                raise LabdeckError(f"The log of {run.display_name} on {run.instance} {e}") from None
            raise

    async def catch_up(self, run: Run, transport=None) -> int:
        """Fetch whatever the instance has beyond the local copy; returns the bytes appended. While
        another process follows the run, nothing is fetched here: that one keeps the copy current."""
        async with self.writing(run) as mine:
            if not mine:
                return 0
            return await self._mirror_log(run, transport)

    async def sync(self, run: Run, transport=None) -> int:
        """The log's new bytes and the run's new metric points, once. While another process follows
        the run, only what it wrote into the local copies is parsed. Returns what was new."""
        async with self.writing(run) as mine:
            if not mine:
                return self._ingest(run)
            return await self._step(run, transport, checkpoints=False)

    def _ingest(self, run: Run) -> int:
        """Parse what another process mirrored into the local copies (metric points, log lines)."""
        monitor = getattr(self.ws, "monitor", None)
        if monitor is None:
            return 0
        return monitor.run(run).update()

    async def _attach(self, run_id: str, on_data) -> Run | None:
        """Wait for the run's lease, following what its holder writes meanwhile. Returns None once
        the lease is ours; the run, when it ended and its holder finished it (nothing left to do)."""
        store = self.ws.store
        run = store.find_run(run_id)
        fd = self._try_lease(run)
        if fd is not None:
            self._leases[run.id] = fd
            if run.run_state.is_final and self._finished_here(run, fd):
                return run  # another process followed it to its end and recorded it meanwhile
            return None
        self.attached.add(run.id)
        try:
            size = self.offset(run)
            next_try = time.monotonic() + LEASE_RETRY
            while True:
                await asyncio.sleep(POLL_ATTACHED)
                now_size = self.offset(run)
                grew = now_size - size if now_size > size else 0
                size = max(size, now_size)
                n = self._ingest(run) + grew
                if n and on_data:
                    on_data(run, n)
                if time.monotonic() < next_try:
                    continue
                next_try = time.monotonic() + LEASE_RETRY
                run = store.find_run(run_id)
                fd = self._try_lease(run)
                if fd is None:
                    continue
                self._leases[run.id] = fd
                if run.run_state.is_final and self._finished_here(run, fd):
                    n = self._ingest(run)  # its holder followed it to the end and recorded it
                    if n and on_data:
                        on_data(run, n)
                    return run
                return None  # the holder went away: go on from the byte the copy ends at
        finally:
            self.attached.discard(run_id)

    async def follow(self, run_id: str, on_data: Callable[[Run, int], None] | None = None) -> Run:
        """Keep the local copy current until the run ends (and its last bytes are in). Survives
        disconnects. Where another process follows the run, this one attaches to what it writes
        (and takes over if it goes away)."""
        try:
            done = await self._attach(run_id, on_data)
            if done is not None:
                return done
            return await self._follow(run_id, on_data)
        except asyncio.CancelledError:  # stopped (the TUI closing, the follower's SIGTERM): the offset so far
            if run_id in self._leases:
                try:
                    run = self.ws.store.find_run(run_id)
                    if run.user == self.ws.store.user and not run.run_state.is_final:
                        self._save_offset(run, final=False)
                except LabdeckError:
                    pass
            raise
        finally:
            self._release(run_id)

    async def _follow(self, run_id: str, on_data: Callable[[Run, int], None] | None = None) -> Run:
        store = self.ws.store
        last_save = last_record = time.monotonic()
        record_every = min(RECORD_FIRST, RECORD_EVERY)
        delay = POLL_ACTIVE
        gone = 0  # failed reads of a run that has ended (its instance may be gone for good: preempted, lost)
        while True:
            run = store.find_run(run_id)
            try:
                n = await self.step(run)
            except (UnsafePath, RefusedFile):
                raise  # a record naming a path labdeck refuses, a log that is a link: no retry makes it right
            except LabdeckError:
                if run.run_state.is_final:
                    gone += 1
                    if gone >= FINAL_TRIES:  # what it wrote last cannot be read any more: end with what is here
                        return await self._finish(run)
                await asyncio.sleep(RETRY)
                continue
            if n and on_data:
                on_data(run, n)
            if n and time.monotonic() - last_save > SAVE_OFFSET_EVERY and run.user == store.user:
                self._save_offset(run, final=False)
                last_save = time.monotonic()
            if n and time.monotonic() - last_record > record_every and run.user == store.user:
                await self._record(run, final=False)
                last_record = time.monotonic()
                record_every = min(record_every * 2, RECORD_EVERY)
            if run.run_state.is_final:
                try:  # the job may have written its last lines just before it ended
                    n = await self.step(run)
                    if n and on_data:
                        on_data(run, n)
                except (UnsafePath, RefusedFile):
                    raise
                except LabdeckError:
                    gone += 1
                    if gone < FINAL_TRIES:
                        await asyncio.sleep(RETRY)
                        continue
                return await self._finish(run)
            if not n and run.user == store.user:
                try:  # nothing new: is it still running?
                    await self.ws.refresh_runs(only=[run.id])
                except LabdeckError:
                    pass
            delay = POLL_ACTIVE if n else min(POLL_IDLE, delay * 1.5)
            await asyncio.sleep(delay)

    async def _finish(self, run: Run) -> Run:
        copy = self._copies.pop(run.id, None)
        if copy is not None:  # its last checkpoint is in before the follow ends
            await copy
        if run.user == self.ws.store.user:
            run = await self._record(run, final=True)
            self._save_offset(run, final=True)
        self._mark_finished(run)  # last: a follower attached to this one takes the run as done
        return run

    async def step(self, run: Run) -> int:
        """One round of a follow task (which holds the lease): the log's new bytes, then the run's
        new metric points (parsed at once), and a checkpoint it declared copied off."""
        async with self.writing(run) as mine:
            if not mine:  # (a task that lost its lease: never write beside the holder)
                return self._ingest(run)
            return await self._step(run, None, checkpoints=True)

    async def _step(self, run: Run, transport, checkpoints: bool) -> int:
        transport = transport or await self.ws.transport(run.instance)
        n = await self._mirror_log(run, transport)
        monitor = getattr(self.ws, "monitor", None)
        if monitor is not None:
            n += await monitor.poll_run(run, transport)
            if checkpoints:
                self._checkpoint(run, monitor, transport)
        return n

    def _checkpoint(self, run: Run, monitor, transport) -> None:
        """A run on a cloud instance that declared a new checkpoint: copy it off (for a relaunch
        after preemption), in a task of its own, so a copy of up to 2 GiB never holds up the log
        and the metrics; one copy per run at a time."""
        cks = monitor.run(run).file_parser.checkpoints
        ptype = (run.instance_info or {}).get("provider_type")  # recorded at launch
        if not cks or ptype in (None, "local", "ssh") or run.user != self.ws.store.user:
            return
        busy = self._copies.get(run.id)
        if busy is None or busy.done():
            self._copies[run.id] = asyncio.ensure_future(self._copy_checkpoint(run, *cks[-1], transport))

    async def _copy_checkpoint(self, run: Run, path: str, step, transport) -> None:
        from . import clouds

        try:
            rec = await clouds.fetch_checkpoint(self.ws, run, path, step, transport)
        except (LabdeckError, OSError):
            return
        if rec is not None:
            run.checkpoint = rec
            try:
                self.ws.store.update_run(run.id, checkpoint=rec)
            except (StoreError, LabdeckError):
                pass

    async def _record(self, run: Run, final: bool) -> Run:
        record = getattr(self.ws, "record_results", None)
        if record is None:
            return run
        try:
            return await record(run, final=final)
        except (LabdeckError, StoreError):
            return run

    def _save_offset(self, run: Run, final: bool) -> None:
        """The offset followed so far: into the run's status file while it runs, into its record at the end."""
        try:
            if final:
                self.ws.store.update_run(run.id, log_offset=self.offset(run))
            else:
                self.ws.store.set_status(run.id, log_offset=self.offset(run))
        except (StoreError, LabdeckError):
            pass

    def start(self, run: Run, on_data: Callable[[Run, int], None] | None = None) -> asyncio.Task:
        """Follow ``run`` in the background (once per run)."""
        task = self.tasks.get(run.id)
        if task is None or task.done():
            task = self.tasks[run.id] = asyncio.ensure_future(self.follow(run.id, on_data))
        return task

    async def stop_all(self) -> None:
        tasks = [*self.tasks.values(), *self._copies.values()]
        for t in tasks:
            t.cancel()
        for t in tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
        self.tasks.clear()
        self._copies.clear()


def tail_lines(path: Path, n: int = 1) -> list[str]:
    """The last ``n`` non-empty lines of a file, read from its end."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read()
    except FileNotFoundError:
        return []
    lines = [l for l in data.decode("utf-8", "replace").splitlines() if l.strip()]
    return lines[-n:]
