"""SSH through jump hosts with asyncssh: one persistent connection per host.

* **Hosts and chains.** A :class:`HostSpec` says how to reach a host; its
  ``jump`` is a chain of further HostSpecs of any length (or a ProxyCommand).
  Specs come from labdeck's config and from ``~/.ssh/config`` as OpenSSH itself
  resolves it (``ssh -G``, see :mod:`backends.sshconfig`); labdeck's values win.
  Each hop is a real connection object tunnelled through the previous one, so
  every hop uses the same keys and known_hosts (asyncssh's ``tunnel="user@host"``
  string form would not).
* **One connection per host** (:class:`SSHPool`), multiplexing commands, SFTP,
  log tails and port forwards. Keepalives (every :data:`KEEPALIVE_INTERVAL` s of
  silence, :data:`KEEPALIVE_COUNT_MAX` unanswered ones end it) notice a dead link
  within ~3 s, a node behind a live jump host included (its connection is
  tunnelled, with keepalives of its own); the next use reconnects, with a capped
  backoff per host, so a host that is down answers "unreachable" at once and
  never blocks the others. Each connection keeps its health (:meth:`SSHPool.health`:
  down since when, and why) and tells the pool's listeners when it changes.
* **A channel budget per connection** (:class:`ChannelBudget`): OpenSSH's sshd
  allows ``MaxSessions`` (10 by default) session channels per connection: every
  command and the SFTP session is one; port forwards (direct-tcpip) and the
  connections tunnelled through a jump host are not. labdeck opens at most
  ``max_sessions`` (default :data:`MAX_SESSIONS`, per host in the config) at once;
  more work waits its turn, in order. A session the server still refuses
  ("open failed", administratively prohibited) lowers that connection's budget
  and is tried again: it is never an error, nor a sign that the host is down.
* **Host keys, OpenSSH semantics** (:class:`KnownHosts`): an unknown host is
  accepted and recorded in labdeck's own known_hosts (``accept-new``, the
  default) or refused (``strict``); a changed key is always refused, with an
  error naming the host and both fingerprints. Keys in the user's own
  known_hosts (UserKnownHostsFile) are trusted too, under HostKeyAlias when set;
  StrictHostKeyChecking yes refuses unknown keys. Agent forwarding is off.
  Private keys are only ever referenced by path.
"""

from __future__ import annotations

import asyncio
import collections
import fcntl
import logging
import os
import posixpath
import shlex
import stat
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping

from cryptography.utils import CryptographyDeprecationWarning

# cryptography ≥ 43 deprecates DSA, and asyncssh's import names DSA types in five annotations: five
# warnings on stderr before every command's output and the TUI's first frame. Only that category, only
# from asyncssh's modules, is silenced; labdeck never offers or accepts DSA keys itself.
warnings.filterwarnings("ignore", category=CryptographyDeprecationWarning, module=r"asyncssh(\.|$)")

import asyncssh  # noqa: E402

from . import clock
from .errors import TransportError
from .localfiles import MAX_READ, RefusedFile, no_links_below
from .sshconfig import SSHConfig, SSHHost, parse_destination  # noqa: F401 - parse_destination is part of this module's API
from .providers.base import CommandResult, FileChunk, PortForward, RelayForward, Transport, detached_launcher

log = logging.getLogger("labdeck.ssh")

CONNECT_TIMEOUT = 5.0
KEEPALIVE_INTERVAL = 1.0  # a keepalive after each second with nothing from the host ...
KEEPALIVE_COUNT_MAX = 2   # ... and the third unanswered one ends the connection: a dead link shows within ~3 s
MAX_SESSIONS = 8  # session channels open at once per connection (OpenSSH's MaxSessions defaults to 10)
SESSION_RETRIES = 8  # a refused session: the budget shrinks and the call waits for a slot, this many times
REGROW_AFTER = 16  # sessions opened without a refusal before a shrunk budget grows by one again
BACKOFF_FIRST = 0.25
BACKOFF_MAX = 0.5  # after a refusal or an unreachable route: the link may be back in a moment
BACKOFF_SILENT_MAX = 15.0  # after a timeout: each try costs connect_timeout


@dataclass(frozen=True)
class HostSpec:
    """How to reach one host (and through which jump hosts, or which ProxyCommand)."""

    name: str
    hostname: str
    user: str | None = None
    port: int = 22
    identity_files: tuple[str, ...] = ()
    jump: tuple["HostSpec", ...] = ()
    proxy_command: str | None = None          # run as /bin/sh -c "exec ..." (as ssh does), instead of a TCP connect
    host_key_alias: str | None = None         # the name its key is looked up and recorded under
    known_hosts_files: tuple[str, ...] = ()   # the user's own known_hosts (read only): a key there is trusted
    strict: bool = False                      # StrictHostKeyChecking yes: an unknown key is refused
    connect_timeout: float | None = None      # ConnectTimeout (else the provider's)
    keepalive_interval: float | None = None   # ServerAliveInterval (else labdeck's)
    max_sessions: int | None = None           # session channels at once on its connection (else MAX_SESSIONS)
    notes: tuple[str, ...] = ()               # ssh_config options labdeck cannot honour, with file:line
    origin: tuple[tuple[str, str], ...] = ()  # option -> where its value came from

    @property
    def label(self) -> str:
        who = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port != 22 else ""
        chain = "".join(f" via {j.name}" for j in reversed(self.jump))
        proxy = " via ProxyCommand" if self.proxy_command else ""
        return f"{self.name} ({who}{self.hostname}{port}{chain}{proxy})"

    @property
    def key(self) -> str:
        """Identity of the connection (a pool key): the whole chain."""
        chain = "/".join(j.key for j in self.jump)
        proxy = f"|{self.proxy_command}" if self.proxy_command else ""
        return f"{chain}>{self.user or ''}@{self.hostname}:{self.port}[{','.join(self.identity_files)}]{proxy}"

    @property
    def key_name(self) -> tuple[str, int]:
        """(name, port) its host key is kept under: HostKeyAlias (with port 22, as OpenSSH) or the address."""
        return (self.host_key_alias, 22) if self.host_key_alias else (self.hostname, self.port)


# ---- ~/.ssh/config: OpenSSH answers (backends/sshconfig.py) ----------------------------------------

def _is_alias(r: SSHHost) -> bool:
    """Whether ssh_config turns this name into something else (so `host = "gpu1"` means `ssh gpu1`)."""
    return r.hostname != r.arg or bool(r.jump) or bool(r.proxy_command)


def resolve_host(name: str, *, known: Mapping[str, HostSpec] | None = None, ssh_config: SSHConfig | None = None,
                 user: str | None = None, hostname: str | None = None, port: int | None = None,
                 identity_files: tuple[str, ...] = (), jump: tuple[str, ...] | None = None,
                 _depth: int = 0) -> HostSpec:
    """A HostSpec for ``name``: labdeck's explicit values win, and the rest is what ``ssh name`` would use.

    ``name`` may be ``[user@]host[:port]`` or ``ssh://user@host:port``. ``hostname`` is labdeck's
    ``host =``: when ssh_config has it as an alias (a HostName, ProxyJump or ProxyCommand of its
    own), it is resolved as ``ssh HOSTNAME`` would be; otherwise it is the address, with ``name``'s
    Host blocks applying to the rest (``ssh -o HostName=HOSTNAME name``). Each hop of a jump chain is
    resolved the same way; later hops are reached through the earlier ones (their own ProxyJump or
    ProxyCommand is not used, as with ``ssh -J``)."""
    if _depth > 10:
        raise TransportError(f"The jump chain for {name} is longer than 10 hops (a loop?).")
    known = known or {}
    if name in known and hostname is None:
        return known[name]
    cfg = ssh_config or SSHConfig()
    d_user, d_host, d_port = parse_destination(name)
    u, p = user or d_user, port or d_port
    r = None
    if hostname:
        r = cfg.resolve(hostname, user=u, port=p)
        if not _is_alias(r):
            r = cfg.resolve(d_host, user=u, port=p, hostname=hostname)
    else:
        r = cfg.resolve(d_host, user=u, port=p)
    origin = dict(r.origin)
    proxy = r.proxy_command
    if jump is None:
        jump = r.jump
    else:
        proxy = None  # labdeck's jump wins over the config's ProxyJump and ProxyCommand alike
        origin["proxyjump"] = "labdeck config"
    keys = tuple(identity_files) or r.identity_files
    if identity_files:
        origin["identityfile"] = "labdeck config"
    # warm the cache: every hop that ssh_config answers for, at once
    cfg.resolve_many([(h, hu, hp, None) for j in jump if j not in known for hu, h, hp in [parse_destination(j)]])
    chain: list[HostSpec] = []
    for j in jump:
        hop = resolve_host(j, known=known, ssh_config=cfg, _depth=_depth + 1)
        if chain:  # later hops are reached through the earlier ones (their own ProxyJump is not used)
            hop = replace(hop, jump=tuple(chain), proxy_command=None)
        chain = [*hop.jump, hop]
    display = d_host if ("@" in name or ":" in name) else name
    return HostSpec(display, r.hostname, r.user, r.port, tuple(os.path.expanduser(k) for k in keys), tuple(chain),
                    proxy_command=proxy, host_key_alias=r.host_key_alias, known_hosts_files=r.known_hosts_files,
                    strict=r.strict_host_key_checking == "yes", connect_timeout=r.connect_timeout,
                    keepalive_interval=r.server_alive_interval, notes=r.notes, origin=tuple(sorted(origin.items())))


# ---- ciphers -------------------------------------------------------------------

def encryption_algs() -> list[str]:
    """asyncssh's ciphers, AES-GCM first where the CPU has AES instructions.

    asyncssh prefers chacha20-poly1305, which it runs as several calls per packet (~11 µs for a
    300-byte packet here) against one call for AES-GCM (~2 µs). Every byte through a jump chain is
    encrypted once per hop, so for a forwarded model server or a followed log that is most of
    labdeck's CPU per request. Servers pick from the client's list in its order."""
    global _ALGS
    if _ALGS is None:
        from asyncssh.encryption import get_default_encryption_algs

        default = [a.decode() for a in get_default_encryption_algs()]
        try:
            aes_ni = any(line.startswith("flags") and " aes " in line + " "
                         for line in open("/proc/cpuinfo", encoding="utf-8", errors="replace"))
        except OSError:
            aes_ni = False
        gcm = [a for a in ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com") if a in default]
        _ALGS = (gcm + [a for a in default if a not in gcm]) if aes_ni else default
    return list(_ALGS)


_ALGS: list[str] | None = None

_MSG_IGNORE = 2
_EMPTY_STRING = b"\0\0\0\0"  # an SSH string of length 0


def drop_chaff(conn: asyncssh.SSHClientConnection) -> None:
    """Stop ``conn`` sending an empty SSH_MSG_IGNORE before every packet, unless its cipher is CBC.

    asyncssh puts one in front of every packet it sends after key exchange: a countermeasure for
    CBC-mode ciphers (predictable IVs; OpenSSH itself never sends them). With AES-GCM or
    chacha20-poly1305 it protects nothing and costs a whole extra packet: encrypted, written with
    a syscall of its own, carried as a TCP segment and decrypted by every hop. Through a jump host
    one forwarded HTTP request was four writes to the socket (the inner connection's chaff and data,
    each wrapped with the outer connection's chaff) where one does; the jump's and the node's sshd
    handled twice the packets. Set on the connection object only, so it covers every channel of it
    and touches no other asyncssh user in the process."""
    send = type(conn).send_packet
    if not callable(send):
        return

    def send_packet(pkttype, *args, **kw):
        if (pkttype == _MSG_IGNORE and args == (_EMPTY_STRING,)
                and "-cbc" not in str(conn.get_extra_info("send_cipher") or "-cbc")):
            return None
        return send(conn, pkttype, *args, **kw)

    conn.send_packet = send_packet  # type: ignore[method-assign]


# ---- known hosts ------------------------------------------------------------

def _host_entry(hostname: str, port: int) -> str:
    return hostname if port == 22 else f"[{hostname}]:{port}"


class KnownHosts:
    """labdeck's own known_hosts file (OpenSSH format), with accept-new or strict policy."""

    def __init__(self, path: Path, policy: str = "accept-new") -> None:
        if policy not in ("accept-new", "strict"):
            raise TransportError(f"Unknown host key policy {policy!r} (use accept-new or strict).")
        self.path = Path(path)
        self.policy = policy

    def keys_for(self, hostname: str, port: int) -> list[asyncssh.SSHKey]:
        entry = _host_entry(hostname, port)
        out = []
        try:
            lines = self.path.read_text().splitlines()
        except FileNotFoundError:
            return []
        for line in lines:
            parts = line.split()
            if len(parts) >= 3 and not line.startswith("#") and entry in parts[0].split(","):
                try:
                    out.append(asyncssh.import_public_key(f"{parts[1]} {parts[2]}"))
                except (asyncssh.KeyImportError, ValueError):
                    continue
        return out

    def forget(self, hostname: str, port: int = 22) -> None:
        """Drop every key recorded for ``hostname:port`` (a cloud address now given to a new machine)."""
        entry = _host_entry(hostname, port)
        if not self.path.exists():
            return
        fd = os.open(self.path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            lines = self.path.read_text().splitlines(keepends=True)
            kept = [ln for ln in lines if not (ln.split() and entry in ln.split()[0].split(","))]
            if len(kept) != len(lines):
                tmp = self.path.with_suffix(".tmp")
                tmp.write_text("".join(kept))
                tmp.replace(self.path)
        finally:
            os.close(fd)

    def add(self, hostname: str, port: int, key: asyncssh.SSHKey) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = f"{_host_entry(hostname, port)} {key.export_public_key('openssh').decode().strip()}\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, line.encode())
        finally:
            os.close(fd)


def _user_known_keys(spec: HostSpec, addr: str) -> tuple[list[asyncssh.SSHKey], list[asyncssh.SSHKey]]:
    """(trusted, revoked) keys for ``spec`` in the user's own known_hosts files (UserKnownHostsFile,
    GlobalKnownHostsFile from ssh_config), hashed entries included; read, never written."""
    files = [f for f in spec.known_hosts_files if os.path.isfile(f)]
    if not files:
        return [], []
    name, port = spec.key_name
    trusted: list[asyncssh.SSHKey] = []
    revoked: list[asyncssh.SSHKey] = []
    for f in files:
        try:
            kh = asyncssh.read_known_hosts(f)
            res = kh.match(name, "" if spec.host_key_alias else addr, None if port == 22 else port)
        except (OSError, ValueError, asyncssh.Error) as e:
            log.warning("cannot read %s: %s", f, e)
            continue
        trusted += list(res[0])
        revoked += list(res[2])
    return trusted, revoked


class _Silent(TransportError):
    """A host (or a hop on the way) that did not answer at all within the timeout."""


class _Client(asyncssh.SSHClient):
    """Checks the server's host key against labdeck's known_hosts."""

    def __init__(self, spec: HostSpec, known: KnownHosts, on_lost) -> None:
        self.spec = spec
        self.known = known
        self.on_lost = on_lost
        self.problem: str | None = None

    def validate_host_public_key(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
        offered = key.get_fingerprint("sha256")
        kname, kport = self.spec.key_name
        mine = self.known.keys_for(kname, kport)
        theirs, revoked = _user_known_keys(self.spec, addr)
        if any(k == key for k in revoked):
            self.problem = (f"The host key of {self.spec.label} ({offered}) is marked @revoked in "
                            f"{', '.join(self.spec.known_hosts_files)}. Refusing to connect.", "")
            return False
        stored = mine + theirs
        if stored:
            if any(k == key for k in stored):
                return True
            where = self.known.path if mine else ", ".join(self.spec.known_hosts_files)
            self.problem = (
                f"The host key of {self.spec.label} has CHANGED: labdeck knows "
                f"{', '.join(k.get_fingerprint('sha256') for k in stored)}, the host now offers {offered}. "
                f"Refusing to connect: this can be a machine-in-the-middle attack."
            ), (f"If the change is expected (the host was reinstalled), delete the line for "
                f"{_host_entry(kname, kport)} in {where} and connect again.")
            return False
        if self.known.policy == "strict" or self.spec.strict:
            why = "the host key policy is strict" if self.known.policy == "strict" else \
                "StrictHostKeyChecking is yes in ssh_config"
            self.problem = (f"The host key of {self.spec.label} is unknown ({offered}) and {why}.",
                            f"Add the host's key to {self.known.path}, or set host_key_policy = \"accept-new\".")
            return False
        self.known.add(kname, kport, key)
        log.info("accepted new host key for %s: %s", self.spec.label, offered)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.on_lost(self, exc)


class ChannelBudget:
    """At most ``limit`` session channels open at once on one connection, handed out in order.

    A slot is held from before a session is asked for until its channel is closed (for the SFTP
    session: while the connection lives). :meth:`refused` is told when the server turned a session
    down although the budget allowed it: the server allows no more than the sessions of ours that
    were open then (``established``; fewer if it still counts one just closed), so the budget drops
    to that; after :data:`REGROW_AFTER` sessions without a refusal it grows by one again, up to the
    configured maximum."""

    def __init__(self, limit: int) -> None:
        self.max = self.limit = max(1, int(limit))
        self.used = 0  # slots held: sessions open or being opened
        self.established = 0  # sessions the server accepted and that are still open
        self.kept = 0  # of those, the ones open for the life of the connection (SFTP)
        self.refusals = 0
        self.peak = 0  # the most slots held at once (for tests and the benchmark)
        self._ok = 0
        self._waiters: collections.deque[asyncio.Future] = collections.deque()

    async def acquire(self) -> None:
        if self.used < self.limit and not self._waiters:
            self._take()
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut  # release() hands its slot straight to the first waiter
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # given a slot just as it was cancelled: pass it on
            else:
                try:
                    self._waiters.remove(fut)
                except ValueError:
                    pass
            raise

    @property
    def contended(self) -> bool:
        """Whether a slot given back now goes straight to another session."""
        return bool(self._waiters) or self.used >= self.limit

    def _take(self) -> None:
        self.used += 1
        self.peak = max(self.peak, self.used)

    def release(self) -> None:
        self.used = max(0, self.used - 1)
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.used < self.limit:
            fut = self._waiters.popleft()
            if not fut.done():
                self._take()
                fut.set_result(None)

    def opened(self) -> None:
        self.established += 1
        self._ok += 1
        if self.limit < self.max and self._ok >= REGROW_AFTER:
            self.limit += 1
            self._ok = 0
            self._wake()

    def closed(self) -> None:
        self.established = max(0, self.established - 1)

    def refused(self) -> None:
        """The server refused a session while ``established`` of ours were open. One slot beyond the
        long-lived sessions always stays, or commands would wait for ever behind the SFTP session."""
        self.refusals += 1
        self._ok = 0
        self.limit = max(self.kept + 1, min(self.limit, self.established))


async def _keep(chan):
    return chan


async def _caught_up(conn: asyncssh.SSHClientConnection) -> None:
    """One round trip (an OpenSSH keepalive request) after a session closed, before its slot goes
    to the next one waiting. sshd frees a session only after it has read our CHANNEL_CLOSE, in the
    next turn of its loop; a CHANNEL_OPEN read in the same turn still finds the closed one counted
    and is refused ("no more sessions"). Its answer to a request sent after the close means that
    turn is over. asyncssh has no public call for it; without one this waits a moment instead."""
    request = getattr(conn, "_make_global_request", None)
    try:
        if request is None:
            await asyncio.sleep(0.05)
        else:
            await asyncio.wait_for(request(b"keepalive@openssh.com"), 2)
    except (asyncio.TimeoutError, asyncssh.Error, OSError):
        pass


_closing: set[asyncio.Task] = set()


def _close_later(chan, budget: ChannelBudget, limit: float = 300.0) -> None:
    """Close a session left early and give its slot back once the server has closed it too."""
    try:
        chan.close()
    except Exception:  # noqa: BLE001 - a connection already gone
        pass

    async def wait() -> None:
        try:
            await asyncio.wait_for(chan.wait_closed(), limit)
        except BaseException:  # noqa: BLE001 - given back below whatever happened
            pass
        finally:
            budget.closed()
            budget.release()

    try:
        task = asyncio.get_running_loop().create_task(wait())
    except RuntimeError:  # no loop (shutting down): nothing waits for it any more
        budget.closed()
        budget.release()
        return
    _closing.add(task)
    task.add_done_callback(_closing.discard)


def _refused_session(e: BaseException) -> bool:
    """A session channel the server turned down (sshd's MaxSessions, or a session it still counts),
    as opposed to a connection that is gone. OpenSSH answers a session it will not open with
    SSH_OPEN_CONNECT_FAILED and the words "open failed" (and logs "no more sessions"); other servers
    say administratively prohibited or resource shortage."""
    if not isinstance(e, asyncssh.ChannelOpenError):
        return False
    return (e.code in (asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, asyncssh.OPEN_RESOURCE_SHORTAGE)
            or (e.code == asyncssh.OPEN_CONNECT_FAILED and e.reason == "open failed"))


class _Conn:
    """One host's connection, reconnected on demand with a capped backoff, with its health and
    its channel budget."""

    def __init__(self, pool: "SSHPool", spec: HostSpec) -> None:
        self.pool = pool
        self.spec = spec
        self.conn: asyncssh.SSHClientConnection | None = None
        self.sftp: asyncssh.SFTPClient | None = None
        self.lock = asyncio.Lock()
        self.failures = 0
        self.retry_at = 0.0
        self.last_error: TransportError | None = None
        self.generation = 0  # bumps on every new connection (forwards and tails use it)
        self.home: str | None = None  # the user's home there, once asked (every transport to the host shares it)
        self.budget = ChannelBudget(spec.max_sessions or pool.max_sessions)
        self.down_since: float | None = None  # clock.wall() when it was found unreachable; None: fine (or not tried)
        self.down_reason = ""
        self._client: _Client | None = None
        self._connecting: asyncio.Future | None = None
        self._sftp_lock = asyncio.Lock()
        self._closing = False

    # -- health
    def _mark_down(self, reason: str, *, silent_for: float = 0.0) -> None:
        if self.down_since is None or reason != self.down_reason:
            if self.down_since is None:
                self.down_since = clock.wall() - silent_for
            self.down_reason = reason
            self.pool._changed(self)

    def _mark_up(self) -> None:
        if self.down_since is not None:
            self.down_since = None
            self.down_reason = ""
            self.pool._changed(self)

    def _lost(self, client: "_Client | None" = None, exc: BaseException | None = None) -> None:
        if client is not None and client is not self._client:
            return  # an older connection of this host, already replaced
        was = self.conn
        self.conn = None
        self.sftp = None
        self._client = None
        self.budget = ChannelBudget(self.budget.max)  # a new connection: a new budget (slots of the old one are void)
        if was is not None and not self._closing:
            text = str(getattr(exc, "reason", "") or exc or "the connection closed")
            silent = 0.0
            if "keepalive" in text:
                text = "no answer to keepalives"
                # asyncssh gives up after count_max + 1 keepalive intervals without an answer (a
                # healthy link answers each within a round trip): silent since about then
                interval = self.spec.keepalive_interval or self.pool.keepalive_interval
                silent = interval * (self.pool.keepalive_count_max + 1)
            self._mark_down(text, silent_for=silent)

    async def get(self) -> asyncssh.SSHClientConnection:
        if self.conn is not None:
            return self.conn
        # one connect at a time, in a task of its own: a caller whose deadline passes (or that is
        # cancelled) stops waiting, the connect goes on for the next caller
        task = self._connecting
        if task is None or task.done():
            task = self._connecting = asyncio.ensure_future(self._get())
            task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)
        return await asyncio.shield(task)

    async def _get(self) -> asyncssh.SSHClientConnection:
        async with self.lock:
            if self.conn is not None:
                return self.conn
            wait = self.retry_at - time.monotonic()
            if wait > 0 and self.last_error is not None:
                if wait > 0.05:
                    raise self.last_error
                await asyncio.sleep(wait)
            try:
                conn = await self._connect()
            except TransportError as e:
                self.failures += 1
                # a host that answers "no" is asked again soon (it may be back in a moment); one that
                # does not answer at all costs a whole timeout per try, so it is asked less and less often
                if isinstance(e, _Silent):
                    delay = min(BACKOFF_SILENT_MAX, self.pool.connect_timeout * 2 ** (self.failures - 1))
                else:
                    delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (self.failures - 1))
                self.retry_at = time.monotonic() + delay
                self.last_error = e
                self._mark_down((str(e).splitlines() or ["cannot connect"])[0])
                raise
            self.budget = ChannelBudget(self.budget.max)
            try:
                # OpenSSH's sshd turns TCP_NODELAY on only when a session starts on a connection; a jump
                # host that only forwards would otherwise hold small packets ~40 ms for delayed ACKs.
                await self.budget.acquire()
                try:
                    await asyncio.wait_for(conn.run("true", check=False), self.pool.connect_timeout)
                finally:
                    self.budget.release()
            except (asyncio.TimeoutError, asyncssh.Error, OSError):
                pass  # a host that refuses commands (ForceCommand, no shell) still forwards
            self.conn = conn
            self.failures = 0
            self.last_error = None
            self.generation += 1
            self._mark_up()
            return self.conn

    async def session(self, open_session, use_session, what: str, timeout: float | None = None, *, keep: bool = False):
        """Open a session channel with ``await open_session(conn)`` and ``await use_session(chan)``,
        holding a slot of the channel budget from before it is asked for until its channel is
        closed. A session the server refuses shrinks the budget and is asked for again when a slot
        is free. ``timeout`` bounds the wait for a slot (the caller's own deadline). A session left
        early (a timeout, a caller's deadline) is closed, and its slot stays taken until the server
        has closed it too: sshd counts it until then. ``keep``: the session stays open after
        ``use_session`` (SFTP), its slot taken for the life of the connection."""
        for attempt in range(SESSION_RETRIES + 1):
            conn = await self.get()
            budget = self.budget
            try:
                await (asyncio.wait_for(budget.acquire(), timeout) if timeout else budget.acquire())
            except asyncio.TimeoutError:
                raise TransportError(f"{what} on {self.spec.label} waited {timeout:g}s for a free channel "
                                     f"({budget.used} of {budget.limit} in use) and was not started.") from None
            try:
                chan = await open_session(conn)
            except BaseException as e:
                budget.release()
                if isinstance(e, asyncssh.ChannelOpenError) and _refused_session(e) and attempt < SESSION_RETRIES:
                    budget.refused()
                    log.info("%s refused a session (%s) with %d open: budget now %d", self.spec.label, e.reason,
                             budget.established, budget.limit)
                    await asyncio.sleep(0.02 * (attempt + 1))  # a session it is still closing: a moment
                    continue
                raise
            budget.opened()
            done = False
            try:
                result = await use_session(chan)
                done = True
                return result
            finally:
                if done and keep:
                    budget.kept += 1
                elif done:
                    budget.closed()
                    try:
                        if budget.contended:
                            await _caught_up(conn)
                    finally:  # cancelled during the round trip: the slot is still given back
                        budget.release()
                else:
                    _close_later(chan, budget)
        raise AssertionError("unreachable")

    async def hold(self, open_session, what: str):
        """Open a long-lived session (SFTP): its slot stays taken for the life of the connection."""
        return await self.session(open_session, _keep, what, keep=True)

    async def _connect(self) -> asyncssh.SSHClientConnection:
        spec = self.spec
        tunnel = None
        if spec.jump:
            hop = spec.jump[-1]
            tunnel = await self.pool.connection(hop)
        client = _Client(spec, self.pool.known_hosts, self._lost)
        self._client = client
        timeout = spec.connect_timeout or self.pool.connect_timeout
        kwargs = dict(
            host=spec.hostname, port=spec.port, username=spec.user or self.pool.default_user,
            known_hosts=lambda h, a, p: ([], [], []),  # every key goes through _Client.validate_host_public_key
            client_factory=lambda: client, agent_forwarding=False, x11_forwarding=False,
            keepalive_interval=spec.keepalive_interval or self.pool.keepalive_interval,
            keepalive_count_max=self.pool.keepalive_count_max,
            connect_timeout=timeout, login_timeout=timeout,
            config=(),  # ~/.ssh/config was resolved by OpenSSH already (resolve_host, backends/sshconfig.py)
            encryption_algs=encryption_algs(),
        )
        if spec.identity_files:
            keys = []
            for path in spec.identity_files:
                try:
                    keys.append(asyncssh.read_private_key(path))
                except FileNotFoundError:
                    raise TransportError(f"The key file {path} for {spec.label} does not exist.",
                                         "Fix identity_file (or IdentityFile in ~/.ssh/config).") from None
                except (asyncssh.KeyImportError, asyncssh.KeyEncryptionError) as e:
                    raise TransportError(f"Cannot use the key {path} for {spec.label}: {e}.",
                                         "Passphrase-protected keys are used through ssh-agent (SSH_AUTH_SOCK).") from None
            kwargs["client_keys"] = keys
        if tunnel is not None:
            kwargs["tunnel"] = tunnel
        elif spec.proxy_command:
            # as ssh runs it: through the shell, with exec, its stdin/stdout carrying the connection
            kwargs["proxy_command"] = ["/bin/sh", "-c", "exec " + spec.proxy_command]
        try:
            conn = await asyncssh.connect(**kwargs)
            drop_chaff(conn)
            return conn
        except asyncssh.HostKeyNotVerifiable:
            msg, hint = client.problem or (f"The host key of {spec.label} was not accepted.", "")
            raise TransportError(msg, hint) from None
        except asyncssh.PermissionDenied:
            raise TransportError(f"{spec.label} refused the SSH key (permission denied for user {kwargs['username']}).",
                                 "Check the user and identity_file, and that your public key is in the host's authorized_keys.") from None
        except (asyncio.TimeoutError, TimeoutError):
            raise _Silent(f"{spec.label} did not answer within {timeout:g}s.",
                          "Is the host up, and is the network path to it (and its jump hosts) working?") from None
        except asyncssh.ConnectionLost as e:
            if client.problem:
                raise TransportError(*client.problem) from None
            if "Login timeout" in str(e):  # TCP connected, but no SSH conversation in time
                raise _Silent(f"{spec.label} did not answer within {timeout:g}s (no SSH handshake).",
                              "Is sshd running and healthy there (and on its jump hosts)?") from None
            raise TransportError(f"Cannot connect to {spec.label}: {e.reason or e}.") from None
        except (OSError, asyncssh.Error) as e:
            if client.problem:
                raise TransportError(*client.problem) from None
            reason = getattr(e, "strerror", None) or getattr(e, "reason", None) or str(e) or type(e).__name__
            raise TransportError(f"Cannot connect to {spec.label}: {reason}.") from None

    async def sftp_client(self) -> asyncssh.SFTPClient:
        await self.get()
        if self.sftp is None:
            async with self._sftp_lock:  # one SFTP session per connection, however many ask at once
                if self.sftp is None:
                    try:
                        self.sftp = await self.hold(lambda conn: conn.start_sftp_client(), "SFTP")
                    except (asyncssh.Error, OSError) as e:
                        if isinstance(e, (asyncssh.ConnectionLost, asyncssh.DisconnectError)):
                            self._lost(None, e)
                        raise TransportError(f"Cannot open SFTP to {self.spec.label}: {getattr(e, 'reason', '') or e}") from None
        return self.sftp

    async def close(self) -> None:
        if self.conn is not None:
            self._closing = True
            try:
                self.conn.close()
                try:
                    await asyncio.wait_for(self.conn.wait_closed(), 2)
                except (asyncio.TimeoutError, Exception):
                    pass
            finally:
                self._closing = False
            self.conn = None
            self.sftp = None
            self._client = None


class SSHPool:
    """Every SSH connection of one labdeck process, keyed by the host's whole chain."""

    def __init__(self, known_hosts: KnownHosts, *, default_user: str | None = None,
                 connect_timeout: float = CONNECT_TIMEOUT, keepalive_interval: float = KEEPALIVE_INTERVAL,
                 keepalive_count_max: int = KEEPALIVE_COUNT_MAX, max_sessions: int = MAX_SESSIONS) -> None:
        self.known_hosts = known_hosts
        self.default_user = default_user or os.environ.get("USER") or None
        self.connect_timeout = connect_timeout
        self.keepalive_interval = keepalive_interval
        self.keepalive_count_max = keepalive_count_max
        self.max_sessions = max_sessions
        self._conns: dict[str, _Conn] = {}
        self.listeners: list = []  # called with no arguments when a connection's health changes

    def _changed(self, conn: _Conn) -> None:
        for cb in list(self.listeners):
            try:
                cb()
            except Exception:  # noqa: BLE001 - a listener's bug must not break the connection
                log.exception("health listener failed")

    def health(self, spec: HostSpec) -> tuple[float, str] | None:
        """``(down since (clock.wall()), why)`` when ``spec`` cannot be reached now: its own connection
        or one of the jump hosts on the way was lost or could not be made; None when it is fine (or
        was never tried). A jump host that is down is named as the cause."""
        for hop in (*spec.jump, spec):
            c = self._conns.get(hop.key)
            if c is not None and c.down_since is not None:
                why = c.down_reason if hop is spec else f"its jump host {hop.name}: {c.down_reason}"
                return c.down_since, why
        return None

    def handle(self, spec: HostSpec) -> _Conn:
        c = self._conns.get(spec.key)
        if c is None:
            c = self._conns[spec.key] = _Conn(self, spec)
        return c

    async def connection(self, spec: HostSpec) -> asyncssh.SSHClientConnection:
        return await self.handle(spec).get()

    async def close(self) -> None:
        # close the far ends first: nodes, then the jump hosts they tunnel through
        for c in sorted(self._conns.values(), key=lambda c: -len(c.spec.jump)):
            await c.close()


def _prefix(cwd: str | None, env: Mapping[str, str] | None) -> str:
    parts = []
    for k, v in (env or {}).items():
        if not k.isidentifier():
            raise TransportError(f"Invalid environment variable name {k!r}.")
        parts.append(f"export {k}={shlex.quote(v)};")
    if cwd:
        parts.append(f"cd {shlex.quote(cwd)} &&")
    return " ".join(parts) + (" " if parts else "")


SFTP_IN_FLIGHT = 4 << 20  # bytes asked for at once by one read_file (asyncssh's own choice for its reader)


async def read_range(f, offset: int, n: int, block: int) -> bytes:
    """Up to ``n`` bytes of the open SFTP file ``f`` from ``offset``: requests of ``block`` bytes,
    ``SFTP_IN_FLIGHT`` bytes' worth at a time (16 to 128 requests, as asyncssh's reader), awaited by a gather: it
    cancels them when this read is cancelled and retrieves every outcome, so no request's error is
    left on a task nobody awaits (asyncssh's parallel reader leaves its tasks running when the read
    that started them is cancelled: a follower stopped at exit logged SFTPEOFError). ``f`` is opened
    with ``block_size=0``: its read is a single request, which a server may answer short (its own
    limit) or with nothing at the end of the file. The bytes stop at the first short block, so a file
    that grows while the blocks are read never leaves a gap."""
    block = int(block) if block and block > 0 else 64 << 10  # (a server that states no limit)
    window = max(16, min(SFTP_IN_FLIGHT // block, 128))

    async def one(at: int, k: int) -> bytes:
        got = b""
        while len(got) < k:
            part = await f.read(k - len(got), at + len(got))
            if not part:  # the end of the file (asyncssh returns b"" for SFTPEOFError)
                break
            got += part[:k - len(got)]  # (a server that answers more than asked: never past n bytes)
        return got

    out = bytearray()
    end = offset + n
    at = offset
    while at < end:
        spans = []
        while at < end and len(spans) < window:
            spans.append((at, min(block, end - at)))
            at += spans[-1][1]
        tasks = [asyncio.ensure_future(one(a, k)) for a, k in spans]
        try:
            parts = await asyncio.gather(*tasks)
        except BaseException:
            # a gather that raises one block's error leaves the others running (on a handle about to
            # be closed): cancel them and wait for them, so no request outlives this read
            for t in tasks:
                t.cancel()
            await asyncio.wait(tasks)
            raise
        for (_a, k), part in zip(spans, parts):
            out += part
            if len(part) < k:
                return bytes(out)
    return bytes(out)


class SSHTransport(Transport):
    """The Transport contract over one pooled SSH connection."""

    def __init__(self, pool: SSHPool, spec: HostSpec, *, instance: str, runs_dir: str = "~/.labdeck/runs") -> None:
        self.pool = pool
        self.spec = spec
        self.instance = instance
        self._runs_dir = runs_dir

    @property
    def handle(self) -> _Conn:
        return self.pool.handle(self.spec)

    def _fail(self, what: str, e: BaseException) -> TransportError:
        if isinstance(e, (asyncssh.ConnectionLost, asyncssh.DisconnectError, BrokenPipeError)):
            self.handle._lost(None, e)
        reason = getattr(e, "reason", None) or str(e) or type(e).__name__
        return TransportError(f"{what} on {self.spec.label} failed: {reason}")

    async def run(self, command: str, *, cwd: str | None = None, env: Mapping[str, str] | None = None,
                  timeout: float | None = 60.0, input: bytes | None = None) -> CommandResult:
        line = _prefix(cwd, env) + command
        t0 = time.monotonic()

        async def start(conn: asyncssh.SSHClientConnection):
            return await conn.create_process(line, input=input, encoding=None)

        async def finish(proc):
            left = None if timeout is None else max(0.1, timeout - (time.monotonic() - t0))
            return await proc.wait(check=False, timeout=left)

        try:
            res = await self.handle.session(start, finish, "A command", timeout)
        except asyncssh.TimeoutError:
            raise TransportError(f"A command on {self.spec.label} took longer than {timeout:g}s and was stopped: {command[:80]}") from None
        except (asyncssh.Error, OSError) as e:
            raise self._fail("A command", e) from None
        code = res.exit_status if res.exit_status is not None else (128 + 9 if res.exit_signal else -1)
        return CommandResult(code, res.stdout or b"", res.stderr or b"")

    async def start_detached(self, command: str, *, cwd: str | None = None, env: Mapping[str, str] | None = None,
                             log_path: str | None = None) -> int:
        argv = detached_launcher(command, log_path)
        res = await self.run(shlex.join(argv), cwd=cwd, env=env, timeout=30)
        try:
            return int(res.stdout.strip())
        except ValueError:
            raise TransportError(f"Could not start a detached process on {self.spec.label}: "
                                 f"{res.stderr.decode(errors='replace').strip()}") from None

    async def read_file(self, path: str, offset: int = 0, max_bytes: int = 1 << 20, *,
                        inside: str | None = None) -> FileChunk:
        """Regular files only, never through a final symlink, at most ``MAX_READ`` bytes. SFTP has no
        O_NOFOLLOW (nor O_NONBLOCK), so an lstat comes first and a link, a FIFO (its open would hang
        the host's sftp-server) or a device is refused before it is opened. That costs one more
        round trip per read (with ``inside``, the directories' lstats go in the same round trip); a
        swap between the lstat and the open is the window left (the run directory is 0700, so only
        its owner can make one)."""
        if "\0" in path or ".." in path.split("/"):
            raise RefusedFile(f"Refusing to read {path!r} on {self.instance}: a run file's path has no '..'.")
        dirs = no_links_below(path, inside) if inside is not None else []
        sftp = await self.handle.sftp_client()
        try:
            # the lstats of each directory and of the file, asked at once (one round trip, not one per
            # directory: a follower reads every poll), judged in order: a teammate's directory link to
            # one of yours is refused before anything is opened
            got = await asyncio.gather(*(sftp.lstat(p) for p in (*dirs, path)), return_exceptions=True)
            for d, dst in zip(dirs, got):
                if isinstance(dst, BaseException):
                    raise dst
                if stat.S_ISLNK(dst.permissions or 0) or dst.type == asyncssh.FILEXFER_TYPE_SYMLINK:
                    raise RefusedFile(f"Refusing to read {path} on {self.instance}: {d} is a symbolic link.")
            lst = got[-1]
            if isinstance(lst, BaseException):
                raise lst
            if lst.type != asyncssh.FILEXFER_TYPE_REGULAR and not stat.S_ISREG(lst.permissions or 0):
                raise RefusedFile(f"Refusing to read {path} on {self.instance}: "
                                  + ("it is a symbolic link." if stat.S_ISLNK(lst.permissions or 0) else "not a regular file."))
            # block_size=0: each f.read is one request awaited here (see read_range), never asyncssh's
            # parallel reader, whose tasks outlive a cancelled read and log "Task exception was never
            # retrieved" (SFTPEOFError) when the range runs past the end of the file
            async with sftp.open(path, "rb", block_size=0) as f:
                size = (await f.stat()).size or 0
                n = max(0, min(int(max_bytes), MAX_READ))
                data = await read_range(f, offset, n, sftp.limits.max_read_len) if n else b""
        except asyncssh.SFTPNoSuchFile:
            raise TransportError(f"No file {path} on {self.instance}.") from None
        except (asyncssh.Error, OSError) as e:
            raise self._fail(f"Reading {path}", e) from None
        data = data or b""
        return FileChunk(data, offset, offset + len(data), size)

    async def put_files(self, files: Mapping[str, bytes], *, mode: int = 0o644) -> None:
        sftp = await self.handle.sftp_client()
        try:
            for path, content in files.items():
                parent = posixpath.dirname(path)
                if parent:
                    await sftp.makedirs(parent, exist_ok=True)
                tmp = f"{parent}/.{posixpath.basename(path)}.tmp-{os.getpid()}"
                # created with its final mode: a 0600 token is never readable by others for a moment
                async with sftp.open(tmp, "wb", attrs=asyncssh.SFTPAttrs(permissions=mode & 0o777)) as f:
                    await f.write(content)
                await sftp.chmod(tmp, mode)  # (the server's umask may have taken bits off)
                await sftp.posix_rename(tmp, path)
        except (asyncssh.Error, OSError) as e:
            raise self._fail("Writing files", e) from None

    async def forward_port(self, remote_port: int, *, local_port: int = 0, remote_host: str = "127.0.0.1") -> PortForward:
        """A self-healing -L forward: each connection opens a channel on the host's *current*
        connection, so after a dropped link or a sleep the forward works again by itself."""
        await self.handle.get()  # fail now if the host cannot be reached at all

        async def dial():
            conn = await self.handle.get()
            try:
                return await conn.open_connection(remote_host, remote_port)
            except (asyncssh.Error, OSError) as e:
                if isinstance(e, (asyncssh.ConnectionLost, asyncssh.DisconnectError, BrokenPipeError)):
                    self.handle._lost(None, e)
                raise

        fwd = RelayForward(dial, remote_host, remote_port)
        await fwd.open(local_port)
        return fwd

    async def home_dir(self) -> str:
        h = self.handle
        if h.home is None:
            h.home = await super().home_dir()
        return h.home

    async def runs_root(self) -> str:
        d = self._runs_dir
        if d.startswith("~"):
            d = (await self.home_dir()) + d[1:]
        return d
