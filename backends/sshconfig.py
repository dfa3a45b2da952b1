"""``~/.ssh/config`` means what OpenSSH says it means.

labdeck has no parser of its own for OpenSSH's client config: every rule of it (``Key = value``,
comments, ``Include`` with globs and ``~/.ssh``-relative paths, ``Match``, ``%`` tokens,
first-obtained-value-wins, negated patterns, ``Host gpu[12]`` as a literal) is OpenSSH's to
decide, and a second implementation drifts from it.

* **Where ``ssh`` is installed** (every jump host has it) each destination is resolved with
  ``ssh -G -F CONFIG [-l USER] [-p PORT] HOST``: OpenSSH's own answer, taken as it is. Results are
  cached per destination and the mtimes of the files (and their directories, for Include globs)
  it read; many hosts are resolved concurrently, each with a timeout.
* **Where it is not**, asyncssh's config support (it has Include, Match and tokens) answers
  instead.
* ``ssh -G`` expands tokens in HostName, User and UserKnownHostsFile but prints IdentityFile and
  ProxyCommand as written: those are expanded here with the tokens OpenSSH gives them.
* An option that changes what ``ssh`` would do but that labdeck cannot honour (agent
  forwarding, LocalForward, ControlMaster, other ciphers...) is reported once, with the file and
  line it came from, and labdeck connects without it: never silently.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import getpass
import hashlib
import json
import logging
import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from .errors import TransportError
from .localfiles import write_private

log = logging.getLogger("labdeck.sshconfig")

RESOLVE_TIMEOUT = 5.0
FAILED_FOR = 30.0  # seconds an ssh -G failure answers for itself (while the config file and ssh are unchanged)
MAX_CONFIG_READ = 1 << 20  # bytes of one config file scanned for where an option came from
MAX_WORKERS = 16

# Options labdeck reads, by ssh -G's lower-case key
USED = ("hostname", "port", "user", "identityfile", "proxyjump", "proxycommand", "userknownhostsfile",
        "globalknownhostsfile", "stricthostkeychecking", "hostkeyalias", "connecttimeout", "serveraliveinterval",
        "serveralivecountmax", "identitiesonly")

# Options that change what `ssh` does but that labdeck does not do: reported (once) where the config
# sets them to anything but OpenSSH's default, never silently dropped.
UNHONOURED = {
    "forwardagent": "labdeck never forwards the agent",
    "forwardx11": "labdeck opens no X11 forwarding",
    "localforward": "labdeck opens no forwards from ssh_config",
    "remoteforward": "labdeck opens no forwards from ssh_config",
    "dynamicforward": "labdeck opens no forwards from ssh_config",
    "controlmaster": "labdeck keeps its own one connection per host",
    "controlpath": "labdeck keeps its own one connection per host",
    "controlpersist": "labdeck keeps its own one connection per host",
    "proxyusefdpass": "labdeck reads the proxy command's stdout",
    "certificatefile": "labdeck offers keys, not certificates",
    "pkcs11provider": "labdeck offers key files and the agent only",
    "securitykeyprovider": "labdeck offers key files and the agent only",
    "identityagent": "labdeck uses SSH_AUTH_SOCK",
    "remotecommand": "labdeck runs its own commands",
    "localcommand": "labdeck runs no local command",
    "ciphers": "labdeck uses asyncssh's ciphers",
    "kexalgorithms": "labdeck uses asyncssh's key exchanges",
    "macs": "labdeck uses asyncssh's MACs",
    "hostkeyalgorithms": "labdeck uses asyncssh's host key algorithms",
    "pubkeyacceptedalgorithms": "labdeck uses asyncssh's signature algorithms",
    "addressfamily": "labdeck lets the resolver choose",
    "bindaddress": "labdeck binds no local address",
    "bindinterface": "labdeck binds no local interface",
    "sendenv": "labdeck passes environment variables per command",
    "setenv": "labdeck passes environment variables per command",
    "connectionattempts": "labdeck tries once per connect (with its own backoff)",
}
STRICT_OFF = ("no", "false", "off")

_reported: set[tuple[str, str]] = set()
_reported_lock = threading.Lock()


@dataclass(frozen=True)
class SSHHost:
    """One destination as OpenSSH would reach it (labdeck's own settings are applied later)."""

    arg: str                                   # what was asked: an alias, a name, an address
    hostname: str
    port: int = 22
    user: str | None = None
    identity_files: tuple[str, ...] = ()       # existing files only, ~ and tokens expanded, no duplicates
    jump: tuple[str, ...] = ()                 # ProxyJump hops, first to last, as [user@]host[:port]
    proxy_command: str | None = None           # tokens expanded; run as /bin/sh -c "exec ..." like ssh
    known_hosts_files: tuple[str, ...] = ()    # UserKnownHostsFile + GlobalKnownHostsFile (read, never written)
    strict_host_key_checking: str | None = None
    host_key_alias: str | None = None
    connect_timeout: float | None = None
    server_alive_interval: float | None = None
    identities_only: bool = False
    origin: Mapping[str, str] = field(default_factory=dict)  # option -> "file:line"
    notes: tuple[str, ...] = ()                # options labdeck cannot honour, each naming its file:line


# ---- destinations ---------------------------------------------------------------------------------

def parse_destination(dest: str) -> tuple[str | None, str, int | None]:
    """``[user@]host[:port]``, ``[user@][v6]:port`` or ``ssh://[user@]host[:port]`` → (user, host, port)."""
    d = dest.strip()
    if d.lower().startswith("ssh://"):
        d = d[6:].rstrip("/")
    user = None
    if "@" in d:
        user, d = d.rsplit("@", 1)
    port = None
    try:
        if d.startswith("["):
            host, _, rest = d[1:].partition("]")
            if rest.startswith(":"):
                port = int(rest[1:])
        elif d.count(":") == 1:
            host, p = d.split(":")
            port = int(p)
        else:
            host = d
    except ValueError:
        raise TransportError(f"{dest!r} is not a destination: the port is not a number.",
                             "Use user@host:port or ssh://user@host:port.") from None
    if not host:
        raise TransportError(f"{dest!r} is not a destination: it names no host.")
    return user or None, host, port


def split_jumps(value: str | None) -> tuple[str, ...]:
    """ProxyJump's value (``none``, or a comma-separated chain) → the hops, first to last."""
    if not value or value.strip().lower() == "none":
        return ()
    return tuple(j.strip() for j in value.split(",") if j.strip())


# ---- tokens ---------------------------------------------------------------------------------------

# what each option accepts, from ssh_config(5) of OpenSSH 9.2
IDENTITY_TOKENS = set("%CdhijkLlnpru")
PROXY_TOKENS = set("%hnpr")


def expand_tokens(value: str, tokens: Mapping[str, str], allowed: Iterable[str], what: str) -> str:
    """OpenSSH's percent_expand: ``%x`` for each allowed ``x``; any other ``%x`` is an error (as in ssh)."""
    allowed = set(allowed)

    def sub(m: re.Match) -> str:
        k = m.group(1)
        if k not in allowed or (k != "%" and k not in tokens):
            raise TransportError(f"{what} {value!r} has an unknown token %{k}.",
                                 f"{what} accepts {', '.join('%' + t for t in sorted(allowed))}.")
        return "%" if k == "%" else tokens[k]

    if value.endswith("%") and not value.endswith("%%"):
        raise TransportError(f"{what} {value!r} ends in a lone %.")
    return re.sub(r"%(.)", sub, value)


def _local() -> tuple[str, str, str]:
    """(local user, home, uid) as OpenSSH takes them: from the password database, not $HOME."""
    try:
        pw = pwd.getpwuid(os.getuid())
        return pw.pw_name, pw.pw_dir, str(pw.pw_uid)
    except KeyError:
        return getpass.getuser(), os.path.expanduser("~"), str(os.getuid())


def host_tokens(arg: str, hostname: str, port: int, user: str | None, jump: str = "", alias: str = "") -> dict[str, str]:
    luser, home, uid = _local()
    lhost = socket.gethostname()
    ruser = user or luser
    return {"h": hostname, "p": str(port), "r": ruser, "n": arg, "u": luser, "d": home, "i": uid,
            "l": lhost, "L": lhost.split(".")[0], "j": jump, "k": alias or hostname,
            "C": hashlib.sha1(f"{lhost}{hostname}{port}{ruser}{jump}".encode()).hexdigest()}


def expand_home(path: str, home: str) -> str:
    if path == "~" or path.startswith("~/"):
        return home + path[1:]
    return os.path.expanduser(path)


# ---- the resolver ---------------------------------------------------------------------------------

class SSHConfig:
    """One OpenSSH client config file, resolved by OpenSSH (``ssh -G``) or else by asyncssh.

    ``SSHConfig()`` (or a path of ``""``) is no config at all: every destination is taken literally."""

    def __init__(self, path: str | os.PathLike | None = None, *, ssh: str | None = "auto",
                 timeout: float = RESOLVE_TIMEOUT, cache_file: str | os.PathLike | None = None) -> None:
        self.path = str(Path(path).expanduser().absolute()) if path else None
        self.ssh = shutil.which("ssh") if ssh == "auto" else ssh
        self.timeout = timeout
        self._cache: dict[tuple, tuple[dict[str, float | None], SSHHost]] = {}
        self._lock = threading.Lock()
        self._baseline: dict[str, list[str]] | None = None
        self._baseline_lock = threading.Lock()
        # Answers kept between labdeck processes (a file of yours, 0600), valid while the stamps hold:
        # the mtimes of every file and folder ssh read, ~/.ssh (a new key there) and the ssh binary.
        self._disk_path = Path(cache_file) if cache_file and self.ssh and self.path else None
        self._disk: dict[str, dict] | None = None
        self._disk_dirty = False
        self._inflight: dict[tuple, threading.Event] = {}  # requests being resolved now (by another thread)
        self._held = 0                                      # batches open: the disk cache is written when the last ends
        # requests OpenSSH failed on (a timeout, a config error): (stamps, when, message, hint). One
        # command asks about a host several times (a prefetch round, its spec, a host jumping through
        # it, a thread that waited for another's answer): without this, each would wait a timeout again.
        self._failed: dict[tuple, tuple[dict[str, float | None], float, str, str]] = {}

    @classmethod
    def load(cls, path: str | os.PathLike | None, *, cache_file: str | os.PathLike | None = None) -> "SSHConfig":
        return cls(path or None, cache_file=cache_file)

    @property
    def authority(self) -> str:
        """Who answers: "ssh -G" (OpenSSH), "asyncssh", or "none"."""
        if not self.path:
            return "none"
        return "ssh -G" if self.ssh else "asyncssh"

    # -- public

    def resolve(self, arg: str, *, user: str | None = None, port: int | None = None,
                hostname: str | None = None) -> SSHHost:
        """``arg`` as ``ssh [-l user] [-p port] [-o HostName=hostname] arg`` would reach it."""
        return self.resolve_many([(arg, user, port, hostname)])[0]

    def resolve_many(self, requests: Iterable[tuple[str, str | None, int | None, str | None]],
                     prefetch: bool = False) -> list[SSHHost]:
        """Several destinations at once: the uncached ones are resolved concurrently (and OpenSSH's
        defaults, which every answer is compared with, beside them: not one process after another).
        A destination another thread is resolving now is waited for, not asked twice.

        ``prefetch``: also ask, in the same round, for the jump hosts these destinations probably go
        through (see :meth:`likely_hops`), so that a destination and its first hop cost one round of
        ``ssh -G`` rather than two. Only a guess of what to ask: every answer used is OpenSSH's, and a
        wrong guess costs one process (its failure is ignored)."""
        reqs = list(requests)
        out: list[SSHHost | None] = [None] * len(reqs)
        todo = []
        for i, r in enumerate(reqs):
            hit = self._cached(r)
            if hit is not None:
                out[i] = hit
            elif r not in (reqs[j] for j in todo):
                todo.append(i)
        if todo:
            jobs = [lambda i=i: self._resolve_shared(reqs[i]) for i in todo]
            if (self.path and self.ssh and self._baseline is None and mentions_any([self.path], UNHONOURED)
                    and self._baseline_from_disk() is None):
                jobs.append(self.baseline)  # (needed: see _unhonoured; an Included file naming one asks later)
            if prefetch and self.path:
                asked = {reqs[i] for i in todo}
                for hop in self.likely_hops([reqs[i] for i in todo]):
                    if hop not in asked and self._cached(hop) is None:
                        jobs.append(lambda hop=hop: self._try(hop))
            if len(jobs) == 1:
                out[todo[0]] = jobs[0]()
            else:
                with concurrent.futures.ThreadPoolExecutor(min(MAX_WORKERS, len(jobs))) as ex:
                    futs = [ex.submit(j) for j in jobs]
                    for i, f in zip(todo, futs):
                        out[i] = f.result()
                    for f in futs[len(todo):]:
                        f.result()
            for i, r in enumerate(reqs):  # (a request asked twice in one call)
                if out[i] is None:
                    out[i] = self._cached(r) or self._resolve_shared(r)
            self._save_disk()
        return out  # type: ignore[return-value]

    def _try(self, req: tuple) -> None:
        try:
            self._resolve_shared(req)
        except TransportError:
            pass

    def likely_hops(self, reqs: list[tuple], limit: int = 3) -> list[tuple]:
        """Jump hosts worth asking about beside ``reqs`` before their answers are in: the hops an
        earlier answer for the same request named (the on-disk cache, even where the config changed
        since), else the ProxyJump values written in the config file itself, when there are at most
        ``limit`` of them. Nothing here decides how a host is reached: it only picks what to prefetch."""
        hops: list[str] = []
        for req in reqs:
            old = self._from_disk(req)
            if old is not None:
                hops += old[1].jump[:1]
        if not hops and self.path:
            try:
                with open(self.path, "rb") as f:
                    text = f.read(MAX_CONFIG_READ).decode("utf-8", "replace")
            except OSError:
                text = ""
            found = list(dict.fromkeys(m.group(1) for m in _PROXYJUMP.finditer(text)))
            if len(found) <= limit:
                hops = [split_jumps(v)[0] for v in found if split_jumps(v)]
        out = []
        for hop in dict.fromkeys(hops):
            if "%" in hop:
                continue
            try:
                user, host, port = parse_destination(hop)
            except TransportError:
                continue
            if not host.startswith("-"):
                out.append((host, user, port, None))
        return out[:limit]

    @contextlib.contextmanager
    def batch(self):
        """Resolutions inside write the on-disk cache once, at the end (many threads resolving one
        host each, as a listing does, would otherwise rewrite it once per host)."""
        with self._lock:
            self._held += 1
        try:
            yield self
        finally:
            with self._lock:
                self._held -= 1
            self._save_disk()

    def _resolve_shared(self, req: tuple) -> SSHHost:
        """``_resolve_now``, once per request however many threads ask for it at the same time."""
        with self._lock:
            ev = self._inflight.get(req)
            mine = ev is None
            if mine:
                ev = self._inflight[req] = threading.Event()
        if not mine:
            ev.wait(self.timeout + 1)
            hit = self._cached(req)
            if hit is not None:
                return hit
            return self._resolve_now(req)  # it failed there: fail here with the same error
        try:
            return self._resolve_now(req)
        finally:
            with self._lock:
                self._inflight.pop(req, None)
            ev.set()

    # -- cache

    def _cached(self, req: tuple) -> SSHHost | None:
        with self._lock:
            hit = self._cache.get(req)
        if hit is None:
            hit = self._from_disk(req)
            if hit is None:
                return None
        stamps, host = hit
        if any(_mtime(p) != m for p, m in stamps.items()):
            return None
        with self._lock:
            self._cache[req] = hit
        return host

    def _disk_key(self, req: tuple) -> str:
        return json.dumps([self.ssh, self.path, *req])

    def _from_disk(self, req: tuple) -> tuple[dict[str, float | None], SSHHost] | None:
        if self._disk_path is None:
            return None
        with self._lock:
            if self._disk is None:
                self._disk = _read_cache(self._disk_path)
            entry = self._disk.get(self._disk_key(req))
        if not isinstance(entry, dict):
            return None
        try:
            d = dict(entry["host"])
            host = SSHHost(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
            return dict(entry["stamps"]), host
        except (KeyError, TypeError, ValueError):
            return None

    def _save_disk(self) -> None:
        if self._disk_path is None or not self._disk_dirty:
            return
        with self._lock:
            if self._held or not self._disk_dirty:
                return
            entries = dict(list((self._disk or {}).items())[-DISK_ENTRIES:])
            self._disk_dirty = False
        try:
            self._disk_path.parent.mkdir(parents=True, exist_ok=True)
            write_private(self._disk_path, json.dumps(entries).encode())  # (dumps: the C encoder)
        except OSError as e:  # a cache: losing it costs time, never correctness
            log.debug("cannot write the ssh -G cache %s: %s", self._disk_path, e)

    def _resolve_now(self, req: tuple) -> SSHHost:
        with self._lock:
            failed = self._failed.get(req)
        if failed is not None:
            stamps, when, message, hint = failed
            if time.monotonic() - when < FAILED_FOR and self._failure_stamps() == stamps:
                raise TransportError(message, hint)
        try:
            host = self._resolve_uncached(req)
        except TransportError as e:
            with self._lock:
                self._failed[req] = (self._failure_stamps(), time.monotonic(), e.message, e.hint)
            raise
        with self._lock:
            self._failed.pop(req, None)
        return host

    def _failure_stamps(self) -> dict[str, float | None]:
        """What a remembered failure is valid for: the config file, its folder and the ssh binary
        (a change of an Included file only is seen when FAILED_FOR has passed)."""
        paths = [self.path, os.path.dirname(self.path)] if self.path else []
        return {p: _mtime(p) for p in [*paths, *([self.ssh] if self.ssh else [])]}

    def _resolve_uncached(self, req: tuple) -> SSHHost:
        arg, user, port, hostname = req
        if not self.path:
            host, files = SSHHost(arg, hostname or arg, port or 22, user), []
        elif self.ssh:
            host, files = self._by_openssh(arg, user, port, hostname)
        else:
            host, files = self._by_asyncssh(arg, user, port, hostname)
        stamps: dict[str, float | None] = {}
        for f in files:
            stamps[f] = _mtime(f)
            stamps[os.path.dirname(f)] = _mtime(os.path.dirname(f))
        if self._disk_path is not None:  # (what a later process must also check before reusing it)
            for d in {os.path.expanduser("~/.ssh"), *(os.path.dirname(k) for k in host.identity_files)}:
                stamps[d] = _mtime(d)
            stamps[self.ssh] = _mtime(self.ssh)
        with self._lock:
            self._cache[req] = (stamps, host)
            if self._disk_path is not None:
                if self._disk is None:
                    self._disk = _read_cache(self._disk_path)
                self._disk.pop(self._disk_key(req), None)
                self._disk[self._disk_key(req)] = {"stamps": stamps, "host": dataclasses.asdict(host)}
                self._disk_dirty = True
        return host

    # -- OpenSSH

    def _run_ssh(self, argv: list[str], what: str) -> subprocess.CompletedProcess:
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=self.timeout, stdin=subprocess.DEVNULL,
                               errors="replace")
        except subprocess.TimeoutExpired:
            raise TransportError(f"`ssh -G` did not answer within {self.timeout:g}s for {what}.",
                                 f"Check {self.path} (a Match exec that hangs?).") from None
        except OSError as e:
            raise TransportError(f"Cannot run {self.ssh} to read {self.path}: {e.strerror}.") from None
        return p

    def _by_openssh(self, arg: str, user: str | None, port: int | None, hostname: str | None):
        # a config file that does not exist (yet) is an empty one, as for ssh itself without ~/.ssh/config
        present = os.path.exists(self.path)
        argv = [self.ssh, "-G", "-vvv", "-F", self.path if present else "/dev/null"]
        if user:
            argv += ["-l", user]
        if port:
            argv += ["-p", str(port)]
        if hostname:
            argv += ["-o", f"HostName={hostname}"]
        if arg.startswith("-"):
            raise TransportError(f"{arg!r} is not a host name.")
        p = self._run_ssh([*argv, arg], arg)
        if p.returncode != 0:
            why = " ".join(ln for ln in p.stderr.splitlines()
                           if not ln.startswith(("debug", "OpenSSH_", "Pseudo-terminal")))[:300]
            raise TransportError(f"OpenSSH cannot resolve {arg} with {self.path}: {why or 'exit ' + str(p.returncode)}",
                                 "`ssh -G -F " + self.path + " " + arg + "` shows the same error.")
        opts = parse_g(p.stdout)
        files, origin = provenance(p.stderr, self.path) if present else ([self.path], {})
        if hostname:
            origin["hostname"] = "labdeck config"
        if user:
            origin["user"] = "labdeck config"
        if port:
            origin["port"] = "labdeck config"
        notes = self._unhonoured(opts, origin, files if present else [])
        return self._from_options(arg, opts, origin, notes), files

    def baseline(self) -> dict[str, list[str]]:
        """OpenSSH's defaults (an empty config): what "the config changed this" is measured against."""
        with self._baseline_lock:  # (asked beside the first resolutions: one process, whoever comes first)
            if self._baseline is None:
                self._baseline = self._baseline_from_disk()
            if self._baseline is None:
                p = self._run_ssh([self.ssh, "-G", "-F", "/dev/null", "labdeck-baseline.invalid"], "the defaults")
                self._baseline = parse_g(p.stdout)
                if self._disk_path is not None and p.returncode == 0:  # (kept while the ssh binary is the same)
                    with self._lock:
                        if self._disk is None:
                            self._disk = _read_cache(self._disk_path)
                        self._disk[self._baseline_key()] = {"stamps": {self.ssh: _mtime(self.ssh)},
                                                            "defaults": self._baseline}
                        self._disk_dirty = True
        return self._baseline

    def _baseline_key(self) -> str:
        return json.dumps([self.ssh, "defaults"])

    def _baseline_from_disk(self) -> dict[str, list[str]] | None:
        """OpenSSH's defaults as an earlier process asked them (they do not depend on any config)."""
        if self._disk_path is None:
            return None
        with self._lock:
            if self._disk is None:
                self._disk = _read_cache(self._disk_path)
            entry = self._disk.get(self._baseline_key())
        try:
            if entry["stamps"] != {self.ssh: _mtime(self.ssh)}:
                return None
            d = entry["defaults"]
            if isinstance(d, dict) and all(isinstance(v, list) and all(isinstance(x, str) for x in v)
                                           for v in d.values()):
                return d
        except (KeyError, TypeError):
            pass
        return None

    def _unhonoured(self, opts: dict[str, list[str]], origin: Mapping[str, str], files: list[str]) -> tuple[str, ...]:
        notes = []
        # An option no file ssh read names has OpenSSH's default: only when one does is the answer
        # compared with the defaults (one more ssh -G, kept on disk), so most configs never ask them.
        if mentions_any(files, UNHONOURED):
            base = self.baseline()
            for key, why in UNHONOURED.items():
                if key in opts and opts[key] != base.get(key):
                    notes.append(self._note(key, " ".join(opts[key]), why, origin))
        shk = (opts.get("stricthostkeychecking") or [""])[0].lower()
        if shk in STRICT_OFF:
            notes.append(self._note("stricthostkeychecking", shk,
                                    "labdeck always refuses a changed host key (and records new ones)", origin))
        return tuple(notes)

    def _note(self, key: str, value: str, why: str, origin: Mapping[str, str]) -> str:
        where = origin.get(key) or self.path or "ssh config"
        msg = f"{where}: {_CANON.get(key, key)} {value} is not honoured: {why}."
        with _reported_lock:
            if (where, key) not in _reported:
                _reported.add((where, key))
                log.warning("%s", msg)
        return msg

    def _from_options(self, arg: str, opts: dict[str, list[str]], origin: Mapping[str, str],
                      notes: tuple[str, ...]) -> SSHHost:
        def one(k: str) -> str | None:
            v = opts.get(k)
            return " ".join(v) if v else None

        hostname = one("hostname") or arg
        port = int(one("port") or 22)
        user = one("user")
        jump_text = one("proxyjump")
        jumps = split_jumps(jump_text)
        pc = one("proxycommand")
        pc = None if not pc or pc.lower() == "none" else pc
        alias = one("hostkeyalias")
        tokens = host_tokens(arg, hostname, port, user, jump_text or "", alias or "")
        home = _local()[1]
        ids: list[str] = []
        for raw in opts.get("identityfile", []):
            if raw.lower() == "none":
                continue
            path = expand_home(expand_tokens(raw, tokens, IDENTITY_TOKENS, "IdentityFile"), home)
            if path not in ids and os.path.isfile(path):
                ids.append(path)
        if pc:
            pc = expand_tokens(pc, tokens, PROXY_TOKENS, "ProxyCommand")
        kh = [expand_home(f, home) for k in ("userknownhostsfile", "globalknownhostsfile")
              for f in opts.get(k, []) if f.lower() != "none"]
        return SSHHost(
            arg=arg, hostname=hostname, port=port, user=user, identity_files=tuple(ids), jump=jumps,
            proxy_command=pc, known_hosts_files=tuple(kh),
            strict_host_key_checking=_STRICT.get((one("stricthostkeychecking") or "").lower()),
            host_key_alias=alias, connect_timeout=_seconds(one("connecttimeout")),
            server_alive_interval=_seconds(one("serveraliveinterval")),
            identities_only=(one("identitiesonly") or "").lower() in ("yes", "true"),
            origin=dict(origin), notes=notes)

    # -- asyncssh (no ssh installed)

    def _by_asyncssh(self, arg: str, user: str | None, port: int | None, hostname: str | None):
        from asyncssh.config import SSHClientConfig

        luser = _local()[0]
        paths = [self.path] if os.path.exists(self.path) else []
        try:
            cfg = SSHClientConfig.load(None, paths, False, False, False, luser, user or (), arg, port or ())
            if cfg.has_match_final():  # ssh reads the file a second time when a Match final/canonical is in it
                cfg = SSHClientConfig.load(None, paths, False, True, True, luser, user or (), arg, port or ())
        except (ValueError, OSError) as e:
            raise TransportError(f"Cannot read the SSH config {self.path}: {e}",
                                 "Without OpenSSH installed, asyncssh reads it; `ssh -G` would say more.") from None
        opts: dict[str, list[str]] = {}
        for key in ("Hostname", "Port", "User", "ProxyJump", "ProxyCommand", "HostKeyAlias", "ConnectTimeout",
                    "ServerAliveInterval", "IdentitiesOnly", "StrictHostKeyChecking"):
            v = cfg.get(key)
            if v is not None and v != ():
                opts[key.lower()] = [("yes" if v else "no") if isinstance(v, bool) else str(v)]
        if hostname:
            opts["hostname"] = [hostname]
        opts["hostname"] = [opts.get("hostname", [arg])[0].lower()]  # as ssh does
        # ProxyJump and ProxyCommand exclude each other: the first one given wins (asyncssh keeps both;
        # its options dict keeps the order they were read in)
        order = [k.lower() for k in getattr(cfg, "_options", {})]
        if "proxyjump" in order and "proxycommand" in order:
            opts.pop("proxycommand" if order.index("proxyjump") < order.index("proxycommand") else "proxyjump", None)
        first = split_jumps((opts.get("proxyjump") or [""])[0])
        if first and parse_destination(first[0])[1] == arg:  # `Host *` with ProxyJump bastion, asked for bastion
            opts.pop("proxyjump")
        for key in ("IdentityFile", "UserKnownHostsFile", "GlobalKnownHostsFile"):
            v = cfg.get(key)
            if v:
                opts[key.lower()] = [str(x) for x in (v if isinstance(v, (list, tuple)) else [v])]
        opts.setdefault("user", [user or luser])  # what ssh logs in as when nothing says otherwise
        if "userknownhostsfile" not in opts:
            opts["userknownhostsfile"] = ["~/.ssh/known_hosts", "~/.ssh/known_hosts2"]
        # asyncssh expanded IdentityFile and ProxyCommand already: only a literal % is left to keep
        opts = {k: [x.replace("%", "%%") if k in ("identityfile", "proxycommand") else x for x in v]
                for k, v in opts.items()}
        notes = []
        for key in ("ForwardAgent", "CertificateFile", "PKCS11Provider", "IdentityAgent", "RemoteCommand",
                    "Ciphers", "KexAlgorithms", "MACs", "HostKeyAlgorithms", "SendEnv", "SetEnv", "BindAddress"):
            v = cfg.get(key)
            if v not in (None, (), [], False):
                notes.append(self._note(key.lower(), str(v), UNHONOURED.get(key.lower(), "not supported"), {}))
        files = [self.path]
        return self._from_options(arg, opts, {}, tuple(notes)), files


# ssh -G prints StrictHostKeyChecking yes/no as true/false
_STRICT = {"yes": "yes", "true": "yes", "no": "no", "false": "no", "off": "no", "accept-new": "accept-new", "ask": "ask"}

_CANON = {k.lower(): k for k in (
    "ForwardAgent", "ForwardX11", "LocalForward", "RemoteForward", "DynamicForward", "ControlMaster", "ControlPath",
    "ControlPersist", "ProxyUseFdpass", "CertificateFile", "PKCS11Provider", "SecurityKeyProvider", "IdentityAgent",
    "RemoteCommand", "LocalCommand", "Ciphers", "KexAlgorithms", "MACs", "HostKeyAlgorithms",
    "PubkeyAcceptedAlgorithms", "AddressFamily", "BindAddress", "BindInterface", "SendEnv", "SetEnv",
    "ConnectionAttempts", "StrictHostKeyChecking", "HostName", "User", "Port", "IdentityFile", "ProxyJump",
    "ProxyCommand", "UserKnownHostsFile", "GlobalKnownHostsFile", "HostKeyAlias", "ConnectTimeout",
    "ServerAliveInterval", "ServerAliveCountMax", "IdentitiesOnly")}


def option_name(key: str) -> str:
    """ssh -G's lower-case key → the option's name as ssh_config(5) spells it."""
    return _CANON.get(key, key)


def _seconds(v: str | None) -> float | None:
    if not v or v.lower() == "none":
        return None
    try:
        s = float(v)
    except ValueError:
        return None
    return s if s > 0 else None


DISK_ENTRIES = 2000  # answers kept in the on-disk cache (the newest)


def _read_cache(path: Path) -> dict[str, dict]:
    """The on-disk ``ssh -G`` cache: only a regular file of yours, else empty."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return {}
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_size > 16 << 20:
            return {}
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = json.loads(f.read())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError, RecursionError):
        return {}
    finally:
        os.close(fd)


def _mtime(p: str) -> float | None:
    try:
        return os.stat(p).st_mtime_ns
    except OSError:
        return None


def parse_g(text: str) -> dict[str, list[str]]:
    """``ssh -G`` output → {key: [value, ...]} (repeated keys such as identityfile collect)."""
    opts: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if not key:
            continue
        if key in ("userknownhostsfile", "globalknownhostsfile"):
            opts[key] = value.split()
        else:
            opts.setdefault(key, []).append(value)
    return opts


_PROXYJUMP = re.compile(r"^[ \t]*ProxyJump(?:[ \t]*=[ \t]*|[ \t]+)([^\s#]+)", re.IGNORECASE | re.MULTILINE)
_READING = re.compile(r"^debug1: Reading configuration data (.+)$")
_INCLUDING = re.compile(r"^debug3: (.+) line (\d+): Including file (.+) depth \d+$")
_APPLYING = re.compile(r"^debug1: (.+) line (\d+): Applying options for ")
_KEYWORD = re.compile(r'^\s*"?([A-Za-z]+)"?\s*(?:=|\s|$)')  # (OpenSSH takes a quoted keyword too)


def mentions_any(files: Iterable[str], keys: Iterable[str]) -> bool:
    """Whether any of ``files`` has a line whose keyword is one of ``keys`` (lower-case), in any
    block, commented-out lines aside. A superset of what can apply (no rule of the grammar decided
    here): False means none of these options can be set by these files."""
    keys = set(keys)
    for path in files:
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_CONFIG_READ + 1)
        except OSError:
            return True  # cannot tell: ask
        if len(data) > MAX_CONFIG_READ:
            return True
        for raw in data.decode("utf-8", "replace").splitlines():
            m = _ANY_KEYWORD.match(raw)
            if m and m.group(1).lower() in keys:
                return True
    return False


_ANY_KEYWORD = re.compile(r'^\s*"?([A-Za-z0-9]+)"?\s*(?:=|\s|$)')


def provenance(log_text: str, main: str) -> tuple[list[str], dict[str, str]]:
    """Which files ``ssh -G -vvv`` read, and for each option the ``file:line`` that set it.

    OpenSSH says which files it read (Include, in order), which Host blocks applied (file and line)
    and which Match blocks matched (in order, without a line): the files are walked along that log,
    and the first line of an option inside an applying block is where its value came from. No rule of
    the config's grammar is decided here: only where to point a user."""
    lines = log_text.splitlines()
    files = [m.group(1) for ln in lines if (m := _READING.match(ln))]
    includes: dict[tuple[str, int], list[str]] = {}
    applied: set[tuple[str, int]] = set()
    matches: list[bool] = []
    for i, ln in enumerate(lines):
        if m := _INCLUDING.match(ln):
            includes.setdefault((m.group(1), int(m.group(2))), []).append(m.group(3))
        elif m := _APPLYING.match(ln):
            applied.add((m.group(1), int(m.group(2))))
        elif ln.startswith("debug2: checking match for"):
            nxt = next((x for x in lines[i + 1:] if x.startswith(("debug2:", "debug1:"))), "")
            matches.append(nxt.startswith("debug2: match found"))
    origin: dict[str, str] = {}
    state = {"match": 0}

    def walk(path: str, active: bool, depth: int) -> None:
        if depth > 16:
            return
        try:
            with open(path, "rb") as f:
                text = f.read(MAX_CONFIG_READ).decode("utf-8", "replace")
        except OSError:
            return
        for n, raw in enumerate(text.splitlines(), 1):
            m = _KEYWORD.match(raw)
            if not m or raw.lstrip().startswith("#"):
                continue
            key = m.group(1).lower()
            if key == "host":
                active = (path, n) in applied
            elif key == "match":
                i = state["match"]
                state["match"] += 1
                active = matches[i] if i < len(matches) else False
            elif key == "include":
                for inc in includes.get((path, n), []):
                    walk(inc, active, depth + 1)
            elif active and key not in origin:
                origin[key] = f"{path}:{n}"

    walk(main, True, 0)
    return files or [main], origin
