"""The background follower: one process per user (and LABDECK_HOME) that follows that user's
active runs to their end with every labdeck closed, then exits by itself.

    python3 -m backends.daemon          (started detached by labdeck itself: :func:`ensure_running`)

What it does, on its own clock (:class:`Daemon`):

* every :data:`TICK` s: reads the user's own active runs (jobs, notebooks: anything with a run
  directory that is queued, syncing or running) and starts a :class:`backends.follow.LogFollower`
  task for each one not followed yet. The follower keeps the local log/metrics copies current, moves
  the run's state (``refresh_runs(only=[id])`` when the log is quiet), records its results at the
  end and copies its checkpoints off a cloud instance. The per-run lease (see backends/follow.py)
  makes this safe beside a TUI of the same user: one of them writes, the other attaches.
* every :data:`FULL_EVERY` s: a full ``refresh_runs()`` (queued runs that started, lost instances).
* every :data:`CLOUD_EVERY` s, when an active run is on a cloud instance: the instance listing,
  which reconciles the instance records (preempted, gone) and relaunches preempted runs from their
  last checkpoint (``starts_relaunches``: this process lives until they are done).
* every :data:`SERVERS_EVERY` s: each of the user's ``healthy`` model servers is checked (its
  process group leader alive on its instance); one whose process is gone is marked ``failed``
  ("the server process ended"), so nobody is pointed at a dead endpoint. A live server keeps the
  follower alive (that check is the only thing it costs).

It exits by itself when nothing has been active for ``grace`` seconds (:data:`GRACE`, or
``LABDECK_DAEMON_GRACE``), on SIGTERM/SIGINT (followers stopped, offsets saved; exit 0), and when
its LABDECK_HOME disappears. It is a singleton by an ``flock`` on ``<state dir>/daemon.lock``
(``<data dir>/daemon``); ``daemon.pid`` (pid, start time) is written after the lock is taken, and
``following.json`` says which runs it follows. Its log is ``daemon.log`` there, rotated at 1 MiB.

It runs in its own session with no controlling terminal (``start_new_session``), so closing the
terminal or logging out does not end it, unless systemd-logind kills every process of the user
at logout (``KillUserProcesses=yes``): :func:`logind_kills_processes` tells, and
``loginctl enable-linger $USER`` keeps it.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import clock
from .errors import LabdeckError
from .localfiles import write_private
from .paths import Paths

TICK = 1.0
FULL_EVERY = 5.0
CLOUD_EVERY = 30.0
SERVERS_EVERY = 10.0
GRACE = 30.0
REFRESH_DEADLINE = 20.0  # a full refresh that takes longer is cut (a dead host must not stall the loop)
LOG_MAX = 1 << 20
NO_DAEMON_ENV = "LABDECK_NO_DAEMON"
GRACE_ENV = "LABDECK_DAEMON_GRACE"
CLOUD_EVERY_ENV = "LABDECK_DAEMON_CLOUD_EVERY"  # (tests: a preemption found sooner)

log = logging.getLogger("labdeck.daemon")


def state_dir(paths: Paths) -> Path:
    return paths.data_dir / "daemon"


@dataclass
class DaemonFiles:
    dir: Path

    @property
    def lock(self) -> Path:
        return self.dir / "daemon.lock"

    @property
    def pid(self) -> Path:
        return self.dir / "daemon.pid"

    @property
    def log(self) -> Path:
        return self.dir / "daemon.log"

    @property
    def out(self) -> Path:
        return self.dir / "daemon.out"  # its stdout/stderr (a crash's traceback)

    @property
    def following(self) -> Path:
        return self.dir / "following.json"

    @classmethod
    def of(cls, paths: Paths) -> "DaemonFiles":
        return cls(state_dir(paths))

    def prepare(self) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(self.dir)
        if not os.path.isdir(self.dir) or os.path.islink(self.dir) or st.st_uid != os.geteuid():
            raise LabdeckError(f"Refusing the follower's directory {self.dir}: not a directory of yours.")
        if st.st_mode & 0o077:
            os.chmod(self.dir, 0o700)


def _open_lock(files: DaemonFiles) -> int:
    files.prepare()
    try:
        return os.open(files.lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise LabdeckError(f"Cannot open {files.lock} ({e.strerror}).") from None


def lock_held(files: DaemonFiles) -> bool:
    """Whether a follower holds the lock now (a non-blocking shared lock fails while one holds it)."""
    try:
        fd = os.open(files.lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def read_pid_file(files: DaemonFiles) -> dict:
    try:
        with open(files.pid, "rb") as f:
            doc = json.loads(f.read(4096) or b"{}")
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def status(paths: Paths) -> dict:
    """``{"running", "pid", "since", "following", "log"}`` of this user's follower (for this LABDECK_HOME)."""
    files = DaemonFiles.of(paths)
    running = lock_held(files)
    doc = read_pid_file(files) if running else {}
    following: list[str] = []
    if running:
        try:
            with open(files.following, "rb") as f:
                got = json.loads(f.read(1 << 20) or b"{}").get("runs", [])
            following = [str(x) for x in got if isinstance(x, str)] if isinstance(got, list) else []
        except (OSError, ValueError, AttributeError):
            pass
    pid = doc.get("pid") if isinstance(doc.get("pid"), int) else None
    since = doc.get("since") if isinstance(doc.get("since"), str) else None
    return {"running": running, "pid": pid, "since": since, "following": following, "log": str(files.log)}


def _is_daemon_pid(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        return b"backends.daemon" in argv and os.stat(f"/proc/{pid}").st_uid == os.geteuid()
    except OSError:
        return False


def stop(paths: Paths, timeout: float = 15.0) -> tuple[bool, str]:
    """SIGTERM the follower, after checking that its lock is held and its pid file names a follower
    process of ours (a stale pid file names nobody, or someone else). (stopped, what happened)."""
    files = DaemonFiles.of(paths)
    if not lock_held(files):
        return False, "The background follower is not running."
    pid = read_pid_file(files).get("pid")
    if not isinstance(pid, int) or pid <= 1 or not _is_daemon_pid(pid):
        return False, (f"The follower's lock is held, but its pid file ({files.pid}) does not name a follower "
                       "process of yours; nothing was signalled.")
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not lock_held(files):
            return True, f"Stopped the background follower (pid {pid})."
        time.sleep(0.05)
    return False, f"The background follower (pid {pid}) did not stop within {timeout:g} s; see {files.log}."


def ensure_running(paths: Paths | None = None, *, force: bool = False) -> int | None:
    """Start this user's background follower unless one runs (or ``LABDECK_NO_DAEMON=1``, unless
    ``force``). Cheap: one non-blocking lock test. The new process has its own session, no
    controlling terminal and / as its directory, so it outlives the terminal and the command that
    started it. Returns the pid started, or None. Never raises: not being able to start it costs
    freshness, not the command."""
    if os.environ.get(NO_DAEMON_ENV) == "1" and not force:
        return None
    paths = paths or Paths.resolve()
    files = DaemonFiles.of(paths)
    try:
        files.prepare()
        if lock_held(files):
            return None
        out_fd = os.open(files.out, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(out_fd).st_size > LOG_MAX:
                os.ftruncate(out_fd, 0)
            env = dict(os.environ)
            if paths.data_dir.name == "data" and paths.cache_dir == paths.data_dir.parent / "cache":
                env["LABDECK_HOME"] = str(paths.data_dir.parent)  # (the home these paths came from)
            here = str(Path(__file__).resolve().parents[1])  # this labdeck, whatever the working directory
            env["PYTHONPATH"] = os.pathsep.join(p for p in [here, os.environ.get("PYTHONPATH", "")] if p)
            import subprocess

            proc = subprocess.Popen([sys.executable, "-m", "backends.daemon"], start_new_session=True,
                                    stdin=subprocess.DEVNULL, stdout=out_fd, stderr=out_fd, close_fds=True,
                                    cwd="/", env=env)
        finally:
            os.close(out_fd)
        return proc.pid
    except (OSError, LabdeckError) as e:
        logging.getLogger("labdeck").warning("could not start the background follower: %s", e)
        return None


def logind_kills_processes(user: str | None = None, etc: Path = Path("/etc/systemd"),
                           linger_dir: Path = Path("/var/lib/systemd/linger")) -> tuple[bool, bool]:
    """(KillUserProcesses=yes in logind.conf or a drop-in, linger on for ``user``). The last
    setting read wins, as logind reads them: logind.conf, then logind.conf.d/*.conf in name order."""
    import getpass

    user = user or getpass.getuser()
    kill = False
    files = [etc / "logind.conf"] + sorted((etc / "logind.conf.d").glob("*.conf")) if (etc / "logind.conf.d").is_dir() \
        else [etc / "logind.conf"]
    for f in files:
        try:
            text = f.read_text(errors="replace")[:1 << 20]
        except OSError:
            continue
        section = ""
        for line in text.splitlines():
            line = line.strip()
            if line.startswith("[") and line.endswith("]"):
                section = line[1:-1].strip()
            elif section == "Login" and "=" in line and not line.startswith(("#", ";")):
                key, value = (p.strip() for p in line.split("=", 1))
                if key == "KillUserProcesses":
                    kill = value.lower() in ("yes", "true", "1", "on")
    linger = bool(user) and "/" not in user and (linger_dir / user).exists()
    return kill, linger


# ---- the process ------------------------------------------------------------------------------


class Daemon:
    def __init__(self, paths: Paths, *, grace: float = GRACE, tick: float = TICK, cloud_every: float = CLOUD_EVERY) -> None:
        self.paths = paths
        self.cloud_every = cloud_every
        self.files = DaemonFiles.of(paths)
        self.grace = grace
        self.tick = tick
        self.stopping = asyncio.Event()
        self.ws = None
        self._lock_fd: int | None = None
        self._lock_ino: tuple[int, int] | None = None
        self._given_up: set[str] = set()  # runs whose follow failed for good (a refused path): not retried
        self._following: list[str] | None = None
        self._states: dict[str, str] = {}  # run id -> the state last logged

    def take_lock(self) -> bool:
        fd = _open_lock(self.files)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._lock_fd = fd
        st = os.fstat(fd)
        self._lock_ino = (st.st_dev, st.st_ino)
        write_private(self.files.pid, json.dumps(
            {"pid": os.getpid(), "since": clock.iso(), "home": str(self.paths.data_dir)}).encode())
        return True

    def home_gone(self) -> bool:
        """The lock file is not the one we hold any more (LABDECK_HOME removed or replaced)."""
        try:
            st = os.stat(self.files.lock)
        except OSError:
            return True
        return (st.st_dev, st.st_ino) != self._lock_ino

    def _write_following(self, ids: list[str]) -> None:
        if ids == self._following:
            return
        self._following = ids
        try:
            write_private(self.files.following, json.dumps({"runs": ids}).encode())
        except OSError:
            pass

    def active_runs(self):
        from .models import Run

        store = self.ws.store
        out = []
        for d in store.mine.all("runs"):
            if d.get("state") in ("queued", "syncing", "running") and d.get("run_dir"):
                try:
                    out.append(Run.from_dict(d))
                except (TypeError, ValueError, LabdeckError):
                    continue
        return out

    def _start_followers(self, active) -> None:
        follower = self.ws.follower
        for run in active:
            if run.id in self._given_up:
                continue
            task = follower.tasks.get(run.id)
            if task is not None and task.done():
                if not task.cancelled() and task.exception() is not None:
                    e = task.exception()
                    from .localfiles import RefusedFile, UnsafePath

                    if isinstance(e, (UnsafePath, RefusedFile)):
                        self._given_up.add(run.id)
                        log.warning("not following %s: %s", run.id, e)
                        continue
                    log.warning("following %s stopped: %s: %s; starting again", run.id, type(e).__name__, e)
            if task is None or task.done():
                log.info("following %s (%s on %s)", run.id, run.display_name, run.instance)
                follower.start(run)

    async def _full_refresh(self) -> None:
        try:
            changed = await asyncio.wait_for(self.ws.refresh_runs(), REFRESH_DEADLINE)
            for r in changed:
                if self._states.get(r.id) != r.state:
                    self._states[r.id] = r.state
                    log.info("%s is %s", r.id, r.state)
        except asyncio.TimeoutError:
            log.warning("a full refresh took over %g s; cut", REFRESH_DEADLINE)
        except LabdeckError as e:
            log.warning("refresh: %s", e)

    async def _clouds(self) -> None:
        try:
            listing = await asyncio.wait_for(self.ws.list_instances(), 60)
            for e in listing.events:
                log.info("instances: %s", e)
            for e in self.ws.background_errors:
                log.warning("%s", e)
            self.ws.background_errors.clear()
        except asyncio.TimeoutError:
            log.warning("the instance listing took over 60 s; cut")
        except LabdeckError as e:
            log.warning("instances: %s", e)

    def live_servers(self) -> list:
        from .models import Deployment

        out = []
        for d in self.ws.store.mine.all(Deployment.TABLE):
            if d.get("state") == "healthy" and isinstance(d.get("pid"), int) and d.get("instance"):
                try:
                    out.append(Deployment.from_dict(d))
                except (TypeError, ValueError, LabdeckError):
                    continue
        return out

    async def _check_servers(self, servers) -> None:
        """A healthy server whose process is gone is marked failed (its process group leader, by pid,
        on its instance; an instance that does not answer is left for the next round)."""
        from .models import Deployment, utcnow

        async def one(dep) -> None:
            try:
                t = await self.ws.transport(dep.instance)
                res = await asyncio.wait_for(t.run(f"kill -0 {int(dep.pid)} 2>/dev/null && echo alive || echo gone",
                                                   timeout=10), 15)
            except (LabdeckError, asyncio.TimeoutError):
                return
            if res.text().strip() != "gone":
                return
            doc = self.ws.store.mine.get(Deployment.TABLE, dep.id)
            if doc is None or doc.get("state") != "healthy":
                return
            self.ws.store.mine.put(Deployment.TABLE, dep.id, {**doc, "state": "failed", "stopped_at": utcnow(),
                                                              "state_reason": "the server process ended"})
            log.info("model server %s (%s): its process ended; marked failed", dep.name, dep.id)

        await asyncio.gather(*(one(d) for d in servers))

    async def run(self) -> int:
        from .config import load_config
        from .workstation import Workstation

        self.ws = ws = Workstation(load_config(self.paths))
        ws.starts_relaunches = True  # this process lives until a relaunch is done
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        last_busy = time.monotonic()
        last_full = last_cloud = last_servers = 0.0
        servers: list = []
        try:
            while not self.stopping.is_set():
                if self.home_gone():
                    log.info("LABDECK_HOME is gone; exiting")
                    break
                now = time.monotonic()
                try:
                    ws.store.mine.refresh()
                    active = self.active_runs()
                except LabdeckError as e:
                    log.warning("reading the store: %s", e)
                    active = []
                self._start_followers(active)
                if now - last_full >= FULL_EVERY:
                    last_full = now
                    await self._full_refresh()
                clouded = [r for r in active if (r.instance_info or {}).get("provider_type") not in (None, "local", "ssh")]
                if clouded and now - last_cloud >= self.cloud_every:
                    last_cloud = now
                    await self._clouds()
                if now - last_servers >= SERVERS_EVERY:
                    last_servers = now
                    try:
                        servers = self.live_servers()
                        if servers:
                            await self._check_servers(servers)
                            servers = self.live_servers()
                    except LabdeckError as e:
                        log.warning("model servers: %s", e)
                followed = sorted(i for i, t in ws.follower.tasks.items() if not t.done())
                self._write_following(followed)
                if active or followed or ws._background or servers:
                    last_busy = time.monotonic()
                elif time.monotonic() - last_busy > self.grace:
                    log.info("nothing active for %g s; exiting", self.grace)
                    break
                try:
                    await asyncio.wait_for(self.stopping.wait(), self.tick)
                except asyncio.TimeoutError:
                    pass
            if self.stopping.is_set():
                log.info("stopping (signal); followers stop, offsets saved")
        finally:
            await ws.close()
            self._write_following([])
        return 0


def _setup_log(files: DaemonFiles) -> None:
    import logging.handlers

    handler = logging.handlers.RotatingFileHandler(files.log, maxBytes=LOG_MAX, backupCount=1)
    handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(levelname)s %(message)s"))
    root = logging.getLogger("labdeck")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    root.propagate = False


def main(argv: list[str] | None = None) -> int:
    paths = Paths.resolve()
    def seconds(env: str, default: float) -> float:
        try:
            v = float(os.environ.get(env) or default)
        except ValueError:
            return default
        return v if v > 0 else default

    d = Daemon(paths, grace=seconds(GRACE_ENV, GRACE), cloud_every=seconds(CLOUD_EVERY_ENV, CLOUD_EVERY))
    try:
        if not d.take_lock():
            return 0  # one runs already
    except (OSError, LabdeckError) as e:
        print(f"labdeck follower: {e}", file=sys.stderr)
        return 1
    _setup_log(d.files)
    log.info("started (pid %d, home %s)", os.getpid(), paths.data_dir)
    try:
        return asyncio.run(d.run())
    except Exception:  # noqa: BLE001 - into its own log, not a terminal it does not have
        log.exception("the follower failed")
        return 1
    finally:
        log.info("exited")


if __name__ == "__main__":
    sys.exit(main())
