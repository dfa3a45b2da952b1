"""SSH test rig: real OpenSSH servers in network namespaces, plus an in-process asyncssh server.

Two things live here, as plain functions and classes (the pytest fixtures are in
``tests/rig_fixtures.py``):

* :class:`Rig` -- a jump host and N nodes (default 2), each a network namespace
  running its own ``/usr/sbin/sshd`` as a dedicated Unix user::

      root ns (tests, labdeck)  <--veth-->  jump ns  <--veth-->  node1 ns
                                                      <--veth-->  node2 ns

  The root namespace reaches only the jump host; the jump namespace does not
  forward, and each node is linked only to the jump host, so a node is
  reachable only by SSH-ing through the jump host (ProxyJump / direct-tcpip).

  Every rig takes a free /28 out of 198.18.0.0/15 (its index is the 4 hex digits
  of its id), so concurrent rigs never share an address::

      base+0/30   root  base+1   <->  jump base+2
      base+4k/30  jump  base+4k+1 <-> node k base+4k+2     (k = 1..3)

  The root namespace also gets an ``unreachable base/28`` route: traffic for a
  node address (or for the jump host while its link is down) fails at once
  instead of leaving through the default route.

  Names: id ``ld<hex>``; namespaces ``ld<hex>-<pid>-jump`` / ``-node<k>`` (pid =
  the creating process); interfaces ``ld<hex>r0`` (root end), ``ld<hex>j<k>`` and
  ``ld<hex>n<k>``; users ``ldj<hex>`` and ``ldn<k><hex>``; files under
  ``/tmp/ldrig-<hex>-<pid>``; a state file ``/run/labdeck-rig/ld<hex>.json``.
  :func:`cleanup_stale` removes whatever a dead process left behind.

* :class:`LocalSSHServer` -- a fast asyncssh server on 127.0.0.1 (random port),
  in a background thread with its own event loop (so sync and async tests can
  both use it). Exec/shell requests run through a real ``/bin/sh`` (as the
  current user, with ``$HOME`` and the working directory set to its own home
  dir); SFTP is served with relative paths resolved against that home; direct
  and remote TCP forwarding are allowed to loopback addresses only.

Everything here needs root only for :class:`Rig`; :class:`LocalSSHServer` runs anywhere.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import contextlib
import hashlib
import ipaddress
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

SSHD = "/usr/sbin/sshd"
SSH = shutil.which("ssh") or "/usr/bin/ssh"
SSH_KEYGEN = shutil.which("ssh-keygen") or "/usr/bin/ssh-keygen"
IP = shutil.which("ip") or "/usr/sbin/ip"
STATE_DIR = Path("/run/labdeck-rig")
TMP_ROOT = Path(tempfile.gettempdir())
ADDR_SPACE = ipaddress.ip_network("198.18.0.0/15")
BLOCK_PREFIX = 28  # one /28 per rig: 4 /30 links (root-jump + up to 3 nodes)
MAX_INDEX = ADDR_SPACE.num_addresses >> (32 - BLOCK_PREFIX)  # 8192 blocks
MAX_NODES = 3
NETNS_RE = re.compile(r"^ld([0-9a-f]{4})-(\d+)-(jump|node\d+)$")
USER_RE = re.compile(r"^ld(?:j|n\d)([0-9a-f]{4})$")
DIR_RE = re.compile(r"^ldrig-([0-9a-f]{4})-(\d+)$")
ROOT_IF_RE = re.compile(r"^ld([0-9a-f]{4})r0$")


# Runs (as root, in the host's namespace) ahead of sshd: becomes a child subreaper, starts
# sshd with its own stdout/stderr (the log), prints sshd's pid on its stdout and closes it,
# then reaps every child and adopted orphan until none is left.
REAPER = r"""
import ctypes, os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
if ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
    sys.exit("labdeck rig reaper: prctl(PR_SET_CHILD_SUBREAPER) failed")
pid = os.fork()
if pid == 0:
    try:
        os.dup2(2, 1)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.execv(sys.argv[1], sys.argv[1:])
    finally:
        os._exit(127)
os.write(1, b"%d\n" % pid)
fd = os.open(os.devnull, os.O_WRONLY)
os.dup2(fd, 1)
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
    except InterruptedError:
        pass
"""


class RigUnavailable(RuntimeError):
    """The rig cannot be built here (not root, no sshd, no ``ip netns``, ...)."""


# ---- small helpers -----------------------------------------------------------


def sh(argv: Sequence[str], *, ns: str | None = None, check: bool = True, timeout: float = 15,
       input: str | None = None) -> subprocess.CompletedProcess:
    """Run ``argv`` (inside namespace ``ns`` if given), capturing text output."""
    if ns is not None:
        argv = [IP, "netns", "exec", ns, *argv]
    p = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, input=input,
                       stdin=None if input is not None else subprocess.DEVNULL)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} -> rc {p.returncode}: {(p.stderr or p.stdout).strip()}")
    return p


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    pre = ["-n", ns] if ns else []
    return sh([IP, *pre, *args], check=check)


def proc_starttime(pid: int) -> int | None:
    """Start time (clock ticks since boot) of ``pid``, or None if gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def pid_alive(pid: int, starttime: int | None = None) -> bool:
    """True when ``pid`` is a live (non-zombie) process, and (if given) started at ``starttime``."""
    st = proc_starttime(pid)
    return st is not None and (starttime is None or st == starttime)


def _proc_uid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def pids_of_uids(uids: Iterable[int]) -> list[int]:
    """Live processes whose real uid is in ``uids`` (zombies left out)."""
    want = set(uids)
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _proc_uid(int(entry)) in want and pid_alive(int(entry)):
            out.append(int(entry))
    return out


def kill_pids(pids: Iterable[int], sig: int = signal.SIGKILL, wait: float = 2.0) -> None:
    """Signal each pid (never our own) and wait until none is alive any more.

    Zombies count as dead: PID 1 on some VMs reaps orphans slowly or never,
    so waiting for the /proc entry to vanish could take forever.
    """
    me = os.getpid()
    pids = [p for p in pids if p != me and p > 1]
    for p in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, sig)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.01)


def _ppid_state(pid: int) -> tuple[int, str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), fields[0]


def _wait_reaped(pids: Iterable[int], reapers: Iterable[int], timeout: float = 1.0) -> None:
    """Wait until none of ``pids`` is a zombie still waiting for one of ``reapers`` to reap it
    (so that killing the reapers next does not hand it to PID 1)."""
    reapers = set(reapers)
    pids = list(pids)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pending = [p for p in pids if (ps := _ppid_state(p)) is not None and ps[0] in reapers]
        if not pending:
            return
        time.sleep(0.01)


def readable_by_others(path: str | os.PathLike) -> bool:
    """Whether a user other than the owner (not in its group) could execute ``path``:
    every directory on the way (after resolving links) o+x, the file o+rx."""
    p = Path(os.path.realpath(path))
    try:
        if (p.stat().st_mode & 0o005) != 0o005:
            return False
        for d in p.parents:
            if not d.stat().st_mode & 0o001:
                return False
    except OSError:
        return False
    return True


def node_python() -> str:
    """A python3 that the rig's unprivileged node users can run.

    ``sys.executable`` if other users can reach it, else ``/usr/bin/python3``
    (e.g. when the interpreter lives under a 0700 ``/root/.pyenv``). The rig
    never loosens permissions on the caller's directories.
    """
    for cand in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        if cand and os.path.exists(cand) and readable_by_others(cand):
            return cand
    raise RigUnavailable(f"no python3 that other users can run ({sys.executable} is not reachable)")


def fingerprint_of(public_key_line: str) -> str:
    """OpenSSH SHA256 fingerprint ("SHA256:...") of an ``algo base64 [comment]`` line."""
    blob = base64.b64decode(public_key_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def keygen(path: Path, comment: str = "") -> Path:
    """An ed25519 keypair at ``path`` / ``path.pub`` (OpenSSH format, no passphrase)."""
    for p in (path, path.with_name(path.name + ".pub")):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    sh([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", comment or path.name, "-f", str(path)])
    return path


def check_prerequisites() -> None:
    """Raise :class:`RigUnavailable` saying why the rig cannot be built here."""
    if sys.platform != "linux":
        raise RigUnavailable("network namespaces need Linux")
    if os.geteuid() != 0:
        raise RigUnavailable("the SSH rig needs root (network namespaces, sshd, useradd)")
    for tool in (SSHD, SSH, SSH_KEYGEN, IP, "useradd", "userdel", "runuser"):
        if not shutil.which(tool) and not os.access(tool, os.X_OK):
            raise RigUnavailable(f"{tool} not found")
    p = subprocess.run([IP, "netns", "list"], capture_output=True, text=True)
    if p.returncode != 0:
        raise RigUnavailable(f"`ip netns` unusable: {p.stderr.strip()}")
    node_python()


# ---- leftovers from crashed runs ----------------------------------------------


def _block(index: int) -> ipaddress.IPv4Network:
    base = int(ADDR_SPACE.network_address) + index * (1 << (32 - BLOCK_PREFIX))
    return ipaddress.ip_network((base, BLOCK_PREFIX))


def _read_state(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def live_rig_ids() -> set[str]:
    """Hex ids of rigs whose creating process is still alive (by state file or netns name)."""
    live: set[str] = set()
    if STATE_DIR.is_dir():
        for f in STATE_DIR.glob("ld*.json"):
            st = _read_state(f)
            if st and pid_alive(st["pid"], st.get("starttime")):
                live.add(st["id"])
    for ns in list_netns():
        m = NETNS_RE.match(ns)
        if m and m.group(1) not in live:
            st = _read_state(STATE_DIR / f"ld{m.group(1)}.json")
            if st is None and pid_alive(int(m.group(2))):
                live.add(m.group(1))
    return live


def list_netns() -> list[str]:
    p = subprocess.run([IP, "netns", "list"], capture_output=True, text=True)
    return [line.split()[0] for line in p.stdout.splitlines() if line.strip()]


def _passwd_entries() -> list[list[str]]:
    with open("/etc/passwd") as f:
        return [line.rstrip("\n").split(":") for line in f if line.count(":") >= 6]


def _userdel(name: str) -> None:
    # -f: do not refuse because of processes (zombies included) still owned by the user.
    for _ in range(20):
        p = subprocess.run(["userdel", "-f", name], capture_output=True, text=True)
        if p.returncode in (0, 6):  # 6: no such user
            return
        if "lock" not in p.stderr:
            raise RuntimeError(f"userdel {name}: {p.stderr.strip()}")
        time.sleep(0.05)
    raise RuntimeError(f"userdel {name}: /etc/passwd stays locked")


def _teardown_id(hexid: str, *, netns: Iterable[str] = (), users: Iterable[str] = (),
                 dirs: Iterable[str] = (), reapers: Iterable[int] = (), errors: list[str]) -> None:
    """Remove everything belonging to rig ``ld<hexid>``: processes, namespaces, links, route, users, files."""
    netns = list(netns)
    users = list(users)
    uids = []
    for entry in _passwd_entries():
        if entry[0] in users:
            uids.append(int(entry[2]))
    # 1. every process inside our namespaces or owned by our users
    victims: set[int] = set()
    for ns in netns:
        p = subprocess.run([IP, "netns", "pids", ns], capture_output=True, text=True)
        victims.update(int(x) for x in p.stdout.split() if x.isdigit())
    victims.update(pids_of_uids(uids))
    # the subreapers last, so that they reap the others (PID 1 may not)
    reapers = set(reapers)
    kill_pids(victims - reapers)
    _wait_reaped(victims - reapers, reapers)
    kill_pids(victims & reapers)
    # 2. links, route, namespaces
    _ip("link", "del", f"ld{hexid}r0", check=False)
    block = _block(int(hexid, 16))
    _ip("route", "del", "unreachable", str(block), check=False)
    for ns in netns:
        p = _ip("netns", "del", ns, check=False)
        if p.returncode != 0 and ns in list_netns():
            errors.append(f"ip netns del {ns}: {p.stderr.strip()}")
    # 3. users and files
    for u in users:
        try:
            _userdel(u)
        except RuntimeError as e:
            errors.append(str(e))
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        (STATE_DIR / f"ld{hexid}.json").unlink()


def cleanup_stale() -> list[str]:
    """Remove rigs left behind by processes that died without tearing them down.

    A rig is stale when the process that created it (the pid in its namespace
    names and state file, with its start time when recorded) is gone. Returns a
    description of what was removed. Safe to run while other rigs are live.
    """
    if os.geteuid() != 0:
        return []
    live = live_rig_ids()
    stale: dict[str, dict[str, set[str]]] = {}

    def slot(h: str) -> dict[str, set[str]]:
        return stale.setdefault(h, {"netns": set(), "users": set(), "dirs": set(), "reapers": set()})

    if STATE_DIR.is_dir():
        for f in STATE_DIR.glob("ld*.json"):
            st = _read_state(f)
            h = st["id"] if st else f.stem[2:]
            if h in live:
                continue
            s = slot(h)
            if st:
                s["reapers"].update(st.get("reaper_pids", []))
                s["netns"].update(st.get("netns", []))
                s["users"].update(st.get("users", []))
                if st.get("dir"):
                    s["dirs"].add(st["dir"])
    for ns in list_netns():
        m = NETNS_RE.match(ns)
        if m and m.group(1) not in live:
            slot(m.group(1))["netns"].add(ns)
    for entry in _passwd_entries():
        m = USER_RE.match(entry[0])
        if m and m.group(1) not in live and entry[5].startswith(str(TMP_ROOT / "ldrig-")):
            slot(m.group(1))["users"].add(entry[0])
    for d in TMP_ROOT.glob("ldrig-*"):
        m = DIR_RE.match(d.name)
        if m and m.group(1) not in live and not pid_alive(int(m.group(2))):
            slot(m.group(1))["dirs"].add(str(d))
    p = _ip("-o", "link", "show", check=False)
    for line in p.stdout.splitlines():
        parts = line.split(":")
        if len(parts) > 1:
            m = ROOT_IF_RE.match(parts[1].strip().split("@")[0])
            if m and m.group(1) not in live:
                slot(m.group(1))
    removed: list[str] = []
    errors: list[str] = []
    for h, s in stale.items():
        _teardown_id(h, netns=s["netns"], users=s["users"], dirs=s["dirs"], reapers=s["reapers"], errors=errors)
        removed.append(f"ld{h}: netns={sorted(s['netns'])} users={sorted(s['users'])} dirs={sorted(s['dirs'])}")
    if errors:
        warnings.warn("labdeck rig: stale cleanup: " + "; ".join(errors))
    return removed


# ---- the rig -------------------------------------------------------------------


@dataclass
class Host:
    """One namespace with its sshd and its Unix user (the jump host or a node)."""

    rig: "Rig"
    name: str  # "jump", "node1", ...
    ns: str
    addr: str  # the address its sshd listens on
    user: str
    uid: int
    home: Path
    dir: Path  # sshd config, host key, log
    port: int = 22
    max_sessions: int = 64  # sshd's MaxSessions (see set_max_sessions)
    reapers: list[subprocess.Popen] = field(default_factory=list, repr=False)
    _sshd: tuple[int, int | None] | None = field(default=None, repr=False)  # (pid, starttime)

    # -- files
    @property
    def host_key_path(self) -> Path:
        return self.dir / "ssh_host_ed25519_key"

    @property
    def sshd_config_path(self) -> Path:
        return self.dir / "sshd_config"

    @property
    def sshd_log_path(self) -> Path:
        return self.dir / "sshd.log"

    def host_public_key(self) -> str:
        """``ssh-ed25519 AAAA...`` of the current host key."""
        algo, b64 = self.host_key_path.with_name(self.host_key_path.name + ".pub").read_text().split()[:2]
        return f"{algo} {b64}"

    def host_key_fingerprint(self) -> str:
        """SHA256 fingerprint of the current host key, as ``ssh-keygen -l`` prints it."""
        return fingerprint_of(self.host_public_key())

    def known_hosts_line(self) -> str:
        host = self.addr if self.port == 22 else f"[{self.addr}]:{self.port}"
        return f"{host} {self.host_public_key()}"

    def sshd_log(self) -> str:
        try:
            return self.sshd_log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- sshd
    @property
    def sshd_pid(self) -> int | None:
        """Pid of the listening sshd, None when it is not running."""
        if self._sshd is not None and pid_alive(*self._sshd):
            return self._sshd[0]
        return None

    @property
    def reaper_pids(self) -> list[int]:
        self.reapers = [r for r in self.reapers if r.poll() is None]
        return [r.pid for r in self.reapers]

    def write_sshd_config(self) -> None:
        self.sshd_config_path.write_text(
            f"""# labdeck test rig: {self.name} ({self.ns})
ListenAddress {self.addr}:{self.port}
HostKey {self.host_key_path}
PidFile none
StrictModes no
UsePAM no
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
AllowUsers {self.user}
AuthorizedKeysFile .ssh/authorized_keys
AllowTcpForwarding yes
AllowAgentForwarding no
AllowStreamLocalForwarding no
X11Forwarding no
PermitTunnel no
GatewayPorts no
PrintMotd no
PrintLastLog no
UseDNS no
MaxStartups 64:30:128
MaxSessions {self.max_sessions}
LoginGraceTime 20
LogLevel VERBOSE
Subsystem sftp internal-sftp
"""
        )

    def start_sshd(self, timeout: float = 5.0) -> None:
        """Start sshd (``-D -e``, output appended to :attr:`sshd_log_path`) and wait until it listens.

        sshd runs under a small subreaper (:data:`REAPER`, as ``<rig dir>/reaper.py``) in the namespace, so
        the processes it and the user's sessions orphan (``setsid ... &`` jobs)
        are reaped when they exit instead of lingering as zombies under a PID 1
        that does not reap.
        """
        if self.sshd_pid is not None:
            return
        self.write_sshd_config()
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        offset = self.sshd_log_path.stat().st_size if self.sshd_log_path.exists() else 0
        with open(self.sshd_log_path, "ab") as log:
            log.write(f"---- {time.strftime('%H:%M:%S')} starting sshd for {self.name}\n".encode())
            log.flush()
            reaper = subprocess.Popen(
                [IP, "netns", "exec", self.ns, sys.executable, "-I", "-S", str(self.rig.dir / "reaper.py"),
                 SSHD, "-D", "-e", "-f", str(self.sshd_config_path)],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, start_new_session=True, close_fds=True,
            )
        self.reapers.append(reaper)
        line = reaper.stdout.readline()
        reaper.stdout.close()
        if not line.strip().isdigit():
            reaper.wait(2)
            raise RuntimeError(f"sshd for {self.name} did not start:\n{self.sshd_log()[-2000:]}")
        pid = int(line)
        started = proc_starttime(pid)
        if started is None:  # already gone: never keep a pid that could be reused
            raise RuntimeError(f"sshd for {self.name} exited at once:\n{self.sshd_log()[-2000:]}")
        self._sshd = (pid, started)
        self.rig._record_state()
        self._wait_listening(offset, timeout)

    def _wait_listening(self, offset: int, timeout: float) -> None:
        needle = f"Server listening on {self.addr} port {self.port}".encode()
        deadline = time.monotonic() + timeout
        while True:
            with open(self.sshd_log_path, "rb") as f:
                f.seek(offset)
                if needle in f.read():
                    return
            if self.sshd_pid is None or time.monotonic() > deadline:
                tail = self.sshd_log()[-2000:]
                self.stop_sshd()
                raise RuntimeError(f"sshd for {self.name} did not start:\n{tail}")
            time.sleep(0.005)

    def stop_sshd(self, *, kill_sessions: bool = False) -> None:
        """Stop the listening sshd (by its pid): new connections are refused.

        Established sessions (per-connection sshd children) keep running, as
        when a real sshd restarts, unless ``kill_sessions``: then every process
        of this host's user is killed too.
        """
        pid = self.sshd_pid
        if pid is not None:
            kill_pids([pid], signal.SIGTERM, wait=2.0)
            if self.sshd_pid is not None:
                kill_pids([pid], signal.SIGKILL, wait=2.0)
        self._sshd = None
        if kill_sessions:
            self.kill_user_processes()
        self.reaper_pids  # noqa: B018 - reap subreapers that are done

    def set_max_sessions(self, n: int) -> None:
        """sshd's ``MaxSessions`` (the rig's default is 64; OpenSSH's own is 10), with a restart of the
        listening sshd so new connections get it; :meth:`Rig.reset` puts 64 back."""
        if n != self.max_sessions:
            self.max_sessions = n
            self.restart_sshd(kill_sessions=True)

    def restart_sshd(self, *, kill_sessions: bool = False) -> None:
        self.stop_sshd(kill_sessions=kill_sessions)
        self.start_sshd()

    def regenerate_host_key(self, *, restart: bool = True) -> str:
        """A new host key (and an sshd restart, so it is used); returns the new fingerprint."""
        keygen(self.host_key_path, f"{self.name}@labdeck-rig")
        if restart:
            self.restart_sshd()
        return self.host_key_fingerprint()

    # -- its link
    @property
    def index(self) -> int:
        """0 for the jump host, k for node k."""
        return 0 if self.name == "jump" else int(self.name[4:])

    def link_down(self, *, both_ends: bool = True) -> None:
        """Cut this host's uplink: the root<->jump link for the jump host (:meth:`Rig.link_down`),
        the jump<->node link for a node (then only that node is cut off)."""
        if self.index == 0:
            self.rig.link_down(both_ends=both_ends)
            return
        _ip("link", "set", f"{self.rig.id}n{self.index}", "down", ns=self.ns)
        if both_ends:
            _ip("link", "set", f"{self.rig.id}j{self.index}", "down", ns=self.rig.jump.ns)

    def link_up(self) -> None:
        if self.index == 0:
            self.rig.link_up()
            return
        _ip("link", "set", f"{self.rig.id}j{self.index}", "up", ns=self.rig.jump.ns)
        _ip("link", "set", f"{self.rig.id}n{self.index}", "up", ns=self.ns)

    # -- the host's user
    def kill_user_processes(self) -> None:
        kill_pids(pids_of_uids([self.uid]))

    def drop_ssh_sessions(self) -> int:
        """Kill only this host's per-connection sshd processes (the user's side of each session):
        every SSH connection to the host drops, while the user's jobs keep running."""
        pids = []
        for pid in pids_of_uids([self.uid]):
            try:
                with open(f"/proc/{pid}/comm") as f:
                    if f.read().strip() == "sshd":
                        pids.append(pid)
            except OSError:
                continue
        kill_pids(pids)
        return len(pids)

    def run_as_user(self, command: str, *, timeout: float = 15, check: bool = False) -> subprocess.CompletedProcess:
        """Run ``/bin/sh -c command`` inside the namespace as the host's user (no SSH involved)."""
        env = f"HOME={self.home}"
        return sh(["runuser", "-u", self.user, "--", "env", "-i", env, f"USER={self.user}", f"LOGNAME={self.user}",
                   "PATH=/usr/local/bin:/usr/bin:/bin", "/bin/sh", "-c", f"cd && {command}"],
                  ns=self.ns, timeout=timeout, check=check)

    def reset_home(self) -> None:
        """Empty the home directory, keeping ``.ssh``."""
        for child in self.home.iterdir():
            if child.name == ".ssh":
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)


class Rig:
    """A jump host and nodes in network namespaces, each with a real sshd. Build with :meth:`build`."""

    shared_home = False  # SharedHomeRig: every node logs in as one Unix user with one home directory

    def __init__(self, index: int, n_nodes: int) -> None:
        if not 1 <= n_nodes <= MAX_NODES:
            raise ValueError(f"1..{MAX_NODES} nodes")
        self.index = index
        self.hex = f"{index:04x}"
        self.id = f"ld{self.hex}"
        self.pid = os.getpid()
        self.starttime = proc_starttime(self.pid)
        self.block = _block(index)
        self.dir = TMP_ROOT / f"ldrig-{self.hex}-{self.pid}"
        self.keys_dir = self.dir / "keys"
        self.client_key = self.keys_dir / "id_ed25519"
        self.known_hosts_path = self.dir / "known_hosts"
        self.ssh_config_path = self.dir / "ssh_config"
        self.python = node_python()
        self.root_if = f"{self.id}r0"
        self.jump_if = f"{self.id}j0"
        self.n_nodes = n_nodes
        self.jump: Host
        self.nodes: list[Host] = []
        self.netns: list[str] = []
        self.users: list[str] = []
        self.build_seconds = 0.0
        self._link_up = True
        self._closed = False

    # -- addresses
    def _a(self, offset: int) -> str:
        return str(self.block.network_address + offset)

    @property
    def root_addr(self) -> str:
        return self._a(1)

    @property
    def hosts(self) -> list[Host]:
        return [self.jump, *self.nodes]

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(name)

    # -- build
    @classmethod
    def build(cls, n_nodes: int = 2, *, client_key: str | os.PathLike | None = None,
              cleanup_leftovers: bool = True) -> "Rig":
        """Build a rig; on any failure, whatever was made is removed and the error raised.

        ``client_key``: an existing private key (its ``.pub`` beside it) to
        authorize instead of generating one; it is copied into :attr:`keys_dir`.
        """
        check_prerequisites()
        if cleanup_leftovers:
            cleanup_stale()
        t0 = time.monotonic()
        rig = cls._reserve(n_nodes)
        try:
            rig._build(client_key)
        except BaseException:
            rig.close()
            raise
        rig.build_seconds = time.monotonic() - t0
        atexit.register(rig.close)
        return rig

    @classmethod
    def _reserve(cls, n_nodes: int) -> "Rig":
        STATE_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        taken_ns = {m.group(1) for m in map(NETNS_RE.match, list_netns()) if m}
        used_addrs = _ip("-4", "-o", "addr", "show").stdout + _ip("-4", "route", "show", "table", "all").stdout
        for index in random.sample(range(MAX_INDEX), 64):
            h = f"{index:04x}"
            block = _block(index)
            if h in taken_ns or str(block) in used_addrs or any(
                    re.search(rf"\b{re.escape(str(a))}/", used_addrs) for a in block):
                continue
            rig = cls(index, n_nodes)
            # claim the id: the state file appears complete and only if nobody else has it
            tmp = rig._write_state_tmp()
            try:
                os.link(tmp, STATE_DIR / f"{rig.id}.json")
            except FileExistsError:
                continue
            finally:
                tmp.unlink()
            return rig
        raise RigUnavailable("no free rig index in 198.18.0.0/15")

    def _write_state_tmp(self) -> Path:
        state = {
            "id": self.hex, "pid": self.pid, "starttime": self.starttime, "dir": str(self.dir),
            "netns": self.netns, "users": self.users,
            "sshd_pids": [h.sshd_pid for h in self._hosts_so_far() if h.sshd_pid],
            "reaper_pids": [p for h in self._hosts_so_far() for p in h.reaper_pids],
        }
        tmp = STATE_DIR / f".{self.id}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(state))
        return tmp

    def _record_state(self) -> None:
        os.replace(self._write_state_tmp(), STATE_DIR / f"{self.id}.json")

    def _hosts_so_far(self) -> list[Host]:
        return ([self.jump] if hasattr(self, "jump") else []) + getattr(self, "nodes", [])

    def _build(self, client_key: str | os.PathLike | None) -> None:
        self.dir.mkdir(mode=0o755)
        os.chmod(self.dir, 0o755)  # node users must traverse to their homes (mkdir obeys umask)
        self.keys_dir.mkdir(mode=0o700)
        (self.dir / "home").mkdir(mode=0o755)
        os.chmod(self.dir / "home", 0o755)
        if client_key is not None:
            shutil.copyfile(client_key, self.client_key)
            os.chmod(self.client_key, 0o600)
            shutil.copyfile(f"{client_key}.pub", f"{self.client_key}.pub")
        else:
            keygen(self.client_key, f"client@{self.id}")
        pub = Path(f"{self.client_key}.pub").read_text().strip() + "\n"
        self.known_hosts_path.write_text("")
        (self.dir / "reaper.py").write_text(REAPER)

        # namespaces and links
        specs = [("jump", f"ldj{self.hex}", self._a(2))] + [
            (f"node{k}", f"ldn{k}{self.hex}", self._a(4 * k + 2)) for k in range(1, self.n_nodes + 1)]
        for name, _, _ in specs:
            ns = f"{self.id}-{self.pid}-{name}"
            self.netns.append(ns)
            self._record_state()
            _ip("netns", "add", ns)
            _ip("link", "set", "lo", "up", ns=ns)
        jns = self.netns[0]
        sh(["sh", "-c", "echo 0 > /proc/sys/net/ipv4/ip_forward && echo 0 > /proc/sys/net/ipv4/conf/all/forwarding"],
           ns=jns)
        _ip("link", "add", self.root_if, "type", "veth", "peer", "name", self.jump_if, "netns", jns)
        _ip("addr", "add", f"{self._a(1)}/30", "dev", self.root_if)
        _ip("addr", "add", f"{self._a(2)}/30", "dev", self.jump_if, ns=jns)
        _ip("link", "set", self.root_if, "up")
        _ip("link", "set", self.jump_if, "up", ns=jns)
        # anything else in our block (node addresses; the jump host while its link is down)
        # fails here at once, and never leaves through the root namespace's default route
        _ip("route", "add", "unreachable", str(self.block))
        for k in range(1, self.n_nodes + 1):
            nns = self.netns[k]
            jif, nif = f"{self.id}j{k}", f"{self.id}n{k}"
            _ip("link", "add", jif, "netns", jns, "type", "veth", "peer", "name", nif, "netns", nns)
            _ip("addr", "add", f"{self._a(4 * k + 1)}/30", "dev", jif, ns=jns)
            _ip("addr", "add", f"{self._a(4 * k + 2)}/30", "dev", nif, ns=nns)
            _ip("link", "set", jif, "up", ns=jns)
            _ip("link", "set", nif, "up", ns=nns)

        # users, homes, host keys
        hosts = []
        for (name, user, addr), ns in zip(specs, self.netns):
            first = next((h for h in hosts if h.name == "node1"), None) if self.shared_home else None
            if first is not None:  # one home on every node (NFS): node1's user, uid and home directory
                hdir = self.dir / "sshd" / name
                hdir.mkdir(parents=True, mode=0o700)
                h = Host(rig=self, name=name, ns=ns, addr=addr, user=first.user, uid=first.uid, home=first.home, dir=hdir)
                keygen(h.host_key_path, f"{name}@{self.id}")
                hosts.append(h)
                continue
            home = self.dir / "home" / name
            home.mkdir(mode=0o755)
            self.users.append(user)
            self._record_state()
            _useradd(user, home)
            uid, gid = next((int(e[2]), int(e[3])) for e in _passwd_entries() if e[0] == user)
            ssh_dir = home / ".ssh"
            ssh_dir.mkdir(mode=0o700)
            (ssh_dir / "authorized_keys").write_text(pub)
            os.chmod(ssh_dir / "authorized_keys", 0o600)
            for p in (home, ssh_dir, ssh_dir / "authorized_keys"):
                os.chown(p, uid, gid)
            hdir = self.dir / "sshd" / name
            hdir.mkdir(parents=True, mode=0o700)
            h = Host(rig=self, name=name, ns=ns, addr=addr, user=user, uid=uid, home=home, dir=hdir)
            keygen(h.host_key_path, f"{name}@{self.id}")
            hosts.append(h)
        self.jump, self.nodes = hosts[0], hosts[1:]
        self.write_ssh_config()
        for h in self.hosts:
            h.start_sshd()

    # -- client side
    def ssh_config_text(self) -> str:
        """OpenSSH client config: ``Host jump``, ``node1``, ... (nodes via ProxyJump jump)."""
        common = (f"    IdentityFile {self.client_key}\n"
                  f"    IdentitiesOnly yes\n"
                  f"    UserKnownHostsFile {self.known_hosts_path}\n"
                  f"    GlobalKnownHostsFile /dev/null\n"
                  f"    StrictHostKeyChecking accept-new\n"
                  f"    BatchMode yes\n"
                  f"    ConnectTimeout 5\n"
                  f"    ForwardAgent no\n"
                  f"    ControlMaster no\n"
                  f"    LogLevel ERROR\n")
        out = []
        for h in self.hosts:
            out.append(f"Host {h.name}\n    HostName {h.addr}\n    User {h.user}\n    Port {h.port}\n" + common
                       + ("" if h is self.jump else f"    ProxyJump {self.jump.name}\n"))
        return "\n".join(out)

    def labdeck_config(self, *, key: str | Path | None = None, policy: str | None = "accept-new",
                       connect_timeout: float = 3.0, node_settings: str = "price_per_hour = 2.5\nmax_concurrent = 2\n",
                       extra: str = "") -> str:
        """labdeck's ``[providers.lab]`` (ssh) for this rig: the jump host unlisted, every node through
        it, all with identity ``key`` (the rig's client key by default); ``node_settings`` go under each
        node; ``policy`` None leaves host_key_policy at labdeck's default."""
        key = str(key or self.client_key)
        text = ('[providers.lab]\ntype = "ssh"\nssh_config = ""\n'
                + (f'host_key_policy = "{policy}"\n' if policy else "")
                + f"connect_timeout = {connect_timeout}\n\n"
                f'[providers.lab.hosts.jump]\nhost = "{self.jump.addr}"\nuser = "{self.jump.user}"\n'
                f'identity_file = "{key}"\nlisted = false\n\n')
        for n in self.nodes:
            text += (f'[providers.lab.hosts.{n.name}]\nhost = "{n.addr}"\nuser = "{n.user}"\nidentity_file = "{key}"\n'
                     f'jump = ["jump"]\n{node_settings}\n')
        return text + extra

    def write_ssh_config(self) -> Path:
        self.ssh_config_path.write_text(self.ssh_config_text())
        return self.ssh_config_path

    def ssh(self, host: str, command: str, *options: str, timeout: float = 20) -> subprocess.CompletedProcess:
        """``ssh -F ssh_config [options] host command`` with the OpenSSH client."""
        return subprocess.run([SSH, "-F", str(self.ssh_config_path), *options, host, command],
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def reset_known_hosts(self) -> None:
        """Forget the host keys the OpenSSH client recorded (e.g. after :meth:`Host.regenerate_host_key`)."""
        self.known_hosts_path.write_text("")

    def known_hosts_text(self) -> str:
        """known_hosts lines with every host's current key (to pre-seed a client's known_hosts)."""
        return "".join(h.known_hosts_line() + "\n" for h in self.hosts)

    # -- faults
    def link_down(self, *, both_ends: bool = True) -> None:
        """Cut the root<->jump link.

        ``both_ends`` (default): both veth ends down; the root namespace loses
        its route, so new connections fail at once (EHOSTUNREACH) and
        established ones stall. ``both_ends=False``: only the jump end goes
        down; the root end keeps its route without carrier, so packets vanish
        and new connections hang until their timeout (a silent partition).
        """
        if both_ends:
            _ip("link", "set", self.root_if, "down")
        _ip("link", "set", self.jump_if, "down", ns=self.netns[0])
        self._link_up = False

    def link_up(self) -> None:
        _ip("link", "set", self.jump_if, "up", ns=self.netns[0])
        _ip("link", "set", self.root_if, "up")
        self._link_up = True
        # the kernel restores the connected route with the link; wait for it (normally immediate)
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            if "unreachable" not in _ip("route", "get", self.jump.addr, check=False).stdout:
                break
            time.sleep(0.01)

    @property
    def link_is_up(self) -> bool:
        return self._link_up

    def reset(self) -> None:
        """Back to a usable state between tests: link up, every sshd running, user processes
        killed (which drops SSH sessions), homes emptied (``.ssh`` kept), client known_hosts reset."""
        if not self._link_up:
            self.link_up()
        for h in self.nodes:
            h.link_up()
        for h in self.hosts:
            if h.max_sessions != 64:
                h.max_sessions = 64
                h.stop_sshd()
            h.kill_user_processes()
            h.reset_home()
            h.start_sshd()
        self.reset_known_hosts()

    # -- teardown
    def close(self) -> None:
        """Tear everything down (idempotent; errors are collected and warned, never raised)."""
        if self._closed or os.getpid() != self.pid:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)
        errors: list[str] = []
        hosts = getattr(self, "nodes", []) + ([self.jump] if hasattr(self, "jump") else [])
        for h in hosts:
            try:
                h.stop_sshd()
            except Exception as e:  # noqa: BLE001
                errors.append(f"stop sshd {h.name}: {e}")
        try:
            _teardown_id(self.hex, netns=self.netns, users=self.users, dirs=[str(self.dir)], errors=errors,
                         reapers=[p for h in hosts for p in h.reaper_pids])
        except Exception as e:  # noqa: BLE001
            errors.append(str(e))
        for h in hosts:
            for r in h.reapers:
                try:
                    r.wait(2)
                except subprocess.TimeoutExpired:
                    r.kill()
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        r.wait(1)
        if errors:
            warnings.warn(f"labdeck rig {self.id} teardown: " + "; ".join(errors))

    def __enter__(self) -> "Rig":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Rig {self.id} {self.block} jump={getattr(self, 'jump', None) and self.jump.addr}>"


def _useradd(user: str, home: Path) -> None:
    # -N: primary group "users" (no per-user group to clean up); -p '*': no password but
    # not locked (a "!" password makes sshd refuse the account when UsePAM is off)
    argv = ["useradd", "-M", "-N", "-d", str(home), "-s", "/bin/sh", "-p", "*", user]
    for _ in range(20):
        p = subprocess.run(argv, capture_output=True, text=True)
        if p.returncode == 0:
            return
        if "lock" not in p.stderr:
            raise RuntimeError(f"useradd {user}: {p.stderr.strip()}")
        time.sleep(0.05)
    raise RuntimeError(f"useradd {user}: /etc/passwd stays locked")


class SharedHomeRig(Rig):
    """A :class:`Rig` whose nodes share one Unix user and one home directory (node1's), as a lab's
    NFS-mounted home: each node is still its own namespace with its own sshd and host key, and
    the processes of every node are that one user's (killing the user's processes, or dropping
    its SSH sessions, does it on every node). The jump host keeps its own user."""

    shared_home = True


def build_rig(n_nodes: int = 2, **kwargs) -> Rig:
    return Rig.build(n_nodes, **kwargs)


# ---- in-process asyncssh server --------------------------------------------------

_LOOPBACK_NAMES = {"localhost", "ip6-localhost"}


def is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def write_client_key(path: Path) -> Path:
    """An ed25519 keypair (OpenSSH format) at ``path`` / ``path.pub``, made with asyncssh (no ssh-keygen needed)."""
    import asyncssh

    key = asyncssh.generate_private_key("ssh-ed25519", comment="labdeck-tests")
    path.parent.mkdir(parents=True, exist_ok=True)
    key.write_private_key(str(path))
    os.chmod(path, 0o600)
    key.write_public_key(f"{path}.pub")
    return path


class LocalSSHServer:
    """asyncssh server on 127.0.0.1 in a background thread; see the module docstring.

    Attributes: ``host``, ``port``, ``user`` (any name is accepted; this is the
    one to use), ``home``, ``client_key`` (path), ``known_hosts_path``,
    ``ssh_config_path`` (``Host local``), ``commands`` (every exec command
    received, in order), ``forwards`` (``(host, port)`` of direct-tcpip opens).
    """

    def __init__(self, home: Path, client_key: Path, *, host: str = "127.0.0.1", port: int = 0,
                 encryption_algs: Sequence[str] | None = None) -> None:
        import asyncssh

        self.home = Path(home)
        self.home.mkdir(parents=True, exist_ok=True)
        self.client_key = Path(client_key)
        self.host = host
        self.port = port
        self.user = _current_user()
        self.commands: list[str | None] = []
        self.forwards: list[tuple[str, int]] = []
        self.ignored = 0  # SSH_MSG_IGNORE packets received from clients (asyncssh's CBC countermeasure)
        self.encryption_algs = list(encryption_algs) if encryption_algs else None
        self.host_key = asyncssh.generate_private_key("ssh-ed25519")
        self._authorized = asyncssh.import_authorized_keys(Path(f"{client_key}.pub").read_text())
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._listener = None
        self._pgids: set[int] = set()
        self.known_hosts_path = self.home.parent / f"{self.home.name}.known_hosts"
        self.ssh_config_path = self.home.parent / f"{self.home.name}.ssh_config"

    # -- lifecycle
    def start(self) -> "LocalSSHServer":
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        def main() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.call_soon(ready.set)
            self._loop.run_forever()

        self._thread = threading.Thread(target=main, name="labdeck-test-sshd", daemon=True)
        self._thread.start()
        ready.wait(5)
        self._listener = self._call(self._listen(), 10)
        self.port = self._listener.get_port()
        self.known_hosts_path.write_text(f"[{self.host}]:{self.port} {self.host_public_key()}\n")
        self.ssh_config_path.write_text(self.ssh_config_text())
        return self

    def _call(self, coro, timeout: float):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _listen(self):
        import asyncssh
        from asyncssh.constants import MSG_IGNORE

        server = self

        class _Server(asyncssh.SSHServer):
            def connection_made(self, conn) -> None:
                handlers = type(conn)._packet_handlers
                original = handlers[MSG_IGNORE]

                def counted(c, *args):
                    server.ignored += 1
                    return original(c, *args)

                conn._packet_handlers = {**handlers, MSG_IGNORE: counted}

            def connection_requested(self, dest_host, dest_port, orig_host, orig_port):
                server.forwards.append((dest_host, dest_port))
                return is_loopback(dest_host)  # tests may only reach loopback

            def server_requested(self, listen_host, listen_port):
                return is_loopback(listen_host)

        class _SFTP(asyncssh.SFTPServer):
            """Relative paths are relative to the server's home, as with sshd."""

            def map_path(self, path: bytes) -> bytes:
                return path if path.startswith(b"/") else os.path.join(bytes(server.home), path)

        return await asyncssh.listen(
            self.host, self.port, server_factory=_Server, server_host_keys=[self.host_key],
            authorized_client_keys=self._authorized, process_factory=self._handle,
            sftp_factory=lambda chan: _SFTP(chan), encoding=None, line_editor=False,
            agent_forwarding=False, x11_forwarding=False, allow_scp=False,
            **({"encryption_algs": self.encryption_algs} if self.encryption_algs else {}),
        )

    def close(self) -> None:
        if self._loop is None:
            return
        loop, self._loop = self._loop, None

        async def shutdown():
            if self._listener is not None:
                self._listener.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._listener.wait_closed(), 2)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(5)
        # shells still running (a client went away mid-command): end their process groups
        for pg in list(self._pgids):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pg, signal.SIGKILL)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(5)
        with contextlib.suppress(Exception):
            loop.close()

    def __enter__(self) -> "LocalSSHServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- sessions
    async def _handle(self, process) -> None:
        cmd = process.command
        if process.subsystem:
            process.stderr.write(f"subsystem {process.subsystem} not supported\n".encode())
            process.exit(1)
            return
        self.commands.append(cmd)
        env = {"HOME": str(self.home), "USER": self.user, "LOGNAME": self.user, "SHELL": "/bin/sh",
               "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin")}
        env.update({k: v for k, v in (process.env or {}).items()
                    if isinstance(k, str) and (k == "LANG" or k.startswith("LC_"))})
        argv = ["/bin/sh", "-c", cmd] if cmd is not None else ["/bin/sh"]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, cwd=self.home, env=env, start_new_session=True)
        except OSError as e:
            process.stderr.write(f"cannot run /bin/sh: {e}\n".encode())
            process.exit(127)
            return
        self._pgids.add(proc.pid)

        async def pump_in() -> None:
            try:
                while data := await process.stdin.read(65536):
                    proc.stdin.write(data)
                    await proc.stdin.drain()
            except (OSError, asyncio.CancelledError):
                pass
            except Exception:  # noqa: BLE001 - channel errors: treat as EOF
                pass
            finally:
                with contextlib.suppress(Exception):
                    proc.stdin.close()

        async def pump_out(src, dst) -> None:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()

        async def run_to_end() -> int:
            await asyncio.gather(pump_out(proc.stdout, process.stdout), pump_out(proc.stderr, process.stderr))
            return await proc.wait()

        stdin_task = asyncio.ensure_future(pump_in())
        work = asyncio.ensure_future(run_to_end())
        closed = asyncio.ensure_future(process.channel.wait_closed())
        try:
            await asyncio.wait({work, closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stdin_task.cancel()
            closed.cancel()
        if work.done() and work.exception() is None:
            rc = work.result()
            self._pgids.discard(proc.pid)
            with contextlib.suppress(Exception):
                if rc < 0:
                    process.exit_with_signal(signal.Signals(-rc).name[3:])
                else:
                    process.exit(rc)
            return
        # the client went away mid-command: hang up on the command's process group
        work.cancel()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGHUP)
        try:
            await asyncio.wait_for(proc.wait(), 2)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        self._pgids.discard(proc.pid)

    # -- client side
    def host_public_key(self) -> str:
        algo, b64 = self.host_key.export_public_key("openssh").decode().split()[:2]
        return f"{algo} {b64}"

    def host_key_fingerprint(self) -> str:
        return self.host_key.get_fingerprint("sha256")

    def connect_kwargs(self) -> dict:
        """Keyword arguments for ``asyncssh.connect``."""
        return {"host": self.host, "port": self.port, "username": self.user,
                "client_keys": [str(self.client_key)], "known_hosts": str(self.known_hosts_path),
                "agent_path": None}

    def ssh_config_text(self, name: str = "local") -> str:
        return (f"Host {name}\n    HostName {self.host}\n    Port {self.port}\n    User {self.user}\n"
                f"    IdentityFile {self.client_key}\n    IdentitiesOnly yes\n"
                f"    UserKnownHostsFile {self.known_hosts_path}\n    GlobalKnownHostsFile /dev/null\n"
                f"    StrictHostKeyChecking yes\n    BatchMode yes\n    LogLevel ERROR\n")


def _current_user() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return os.environ.get("USER", "user")
