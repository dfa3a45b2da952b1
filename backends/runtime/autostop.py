#!/usr/bin/env python3
"""labdeck autostop: runs ON the instance, decides by itself that the instance is idle and stops it.

Paid-for GPUs must not be left running unnoticed, so this needs no labdeck open, no SSH
connection and no cloud credentials on the VM: when the instance has been idle for
``idle_minutes`` it runs ``command`` (by default ``sudo -n shutdown -h now``; on EC2 the
instance's shutdown behaviour, set by labdeck at launch, decides stop vs terminate).

    python3 autostop.py --dir DIR        (labdeck uses ~/.labdeck/autostop/<host id>)

``DIR/config.json`` (re-read every loop, so labdeck can change or disable it live)::

    {"idle_minutes": 30, "action": "stop", "command": ["sudo", "-n", "shutdown", "-h", "now"],
     "interval": 30, "runs_root": "/home/u/.labdeck/runs", "gpu_threshold": 5,
     "gpu_source": "nvidia-smi", "enabled": true, "host_id": "0123456789abcdef", "boot_id": "..."}

``host_id`` / ``boot_id``: this host's, as labdeck worked them out (backends/hostid.py; a home may
be shared by several hosts): only run directories and queue tickets that name both are this
host's (a run directory without a ``host`` file, from before per-host state, counts by its pid).

``idle_minutes`` <= 0 or ``enabled: false`` disables it (the state says so; it never fires).
Deleting config.json makes the loop exit. One instance per DIR (``flock`` on ``DIR/lock``,
which holds its pid); a second start exits 0 at once.

The instance is BUSY while any of these holds (each gives a reason in ``state.json``):

* ``job ID`` / ``job ID (queued)``: a labdeck run directory under ``runs_root`` whose wrapper
  (``pid``) is alive (zombies are dead, as in jobs.py's ALIVE_FN; a pid reused by a process
  that started after the pid file was written is dead too) with no ``exit_code``; or a live
  ticket in the run queue (``runs_root/.hosts/<host id>/queue``; before per-host state
  ``runs_root/.queue``). Runs of other kinds (``queue-<kind>``, ``.queue-<kind>``) count
  too, except notebooks, which Jupyter's own activity judges (below) once their server is found.
* ``gpu N: U%``: a GPU at or above ``gpu_threshold`` % utilization (``nvidia-smi``; ``none``:
  no GPUs; ``fake:FILE``: integers one per line, the tests' stand-in for the driver).
* ``notebook :PORT``: a Jupyter server (``jpserver-*.json`` runtime files) with a kernel
  executing, or activity in the last loop. A notebook's ``last_activity`` also moves the start
  of the idle window, so the countdown runs from the last thing anyone did in it.
* ``forward :PORT``: an ESTABLISHED TCP connection held by an ``sshd``/``sshd-session`` process
  to a loopback address (or to the socket's own address): someone is using an ``ssh -L`` (or
  ``-R``) forward into a service on the instance. The SSH session's own socket (peer = the
  client, not loopback) does not count, so an open labdeck merely being connected keeps nothing
  alive. Socket inodes from /proc/net/tcp{,6} are mapped to processes through /proc/PID/fd.
  An unprivileged user cannot read the fds of its own post-auth sshd (it dropped privileges,
  so the kernel made it non-dumpable): then a loopback connection that no readable process
  owns, whose socket uid is the uid of such an unreadable non-root sshd, is taken to be that
  sshd's (``forward_check: "by-uid"`` in the state; ``"exact"`` when every sshd was readable).

A check that raises counts as busy (``unknown: <check> check failed``): autostop never stops the
instance on a guess, and the state says what is wrong. No config read yet: it never fires.

When idle for the whole window the state gets ``fired_at``, ``DIR/autostop.log`` a line, and
``command`` runs once. If it fails, its output is logged and it is tried again after another
full idle window (never in a tight loop). After a successful fire, new activity re-arms it.
Every loop writes ``DIR/state.json`` atomically; errors in a loop are logged, never fatal.

Standard library only; runs on Python 3.8+.
"""

from __future__ import annotations

import argparse
import fcntl
import glob
import hashlib
import json
import os
import re
import socket
import struct
import subprocess
import sys
import time
import traceback
import urllib.request
from datetime import datetime, timezone

SOURCE_VERSION = ""  # sha256[:12] of this file, set in main()
LOG_MAX = 1 << 20
SSHD_NAMES = ("sshd", "sshd-session")
DEFAULT_COMMAND = ["sh", "-c", "sudo -n shutdown -h now || shutdown -h now"]
COMMAND_TIMEOUT = 300
TCP_ESTABLISHED = "01"
TCP_LISTEN = "0A"
PID_REUSE_SLACK = 120.0


# ---- small helpers -----------------------------------------------------------------

def utc_iso(t):
    """Epoch seconds -> ``2024-05-01T12:00:00.123Z`` (UTC, milliseconds)."""
    dt = datetime.fromtimestamp(t, timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + ".%03dZ" % (dt.microsecond // 1000)


def parse_iso(s):
    """ISO 8601 (``Z``, ``+00:00`` or naive = UTC, optional fraction) -> epoch seconds, or None."""
    if not isinstance(s, str) or not s:
        return None
    s = s.strip()
    if s.endswith("Z") or s.endswith("z"):
        s = s[:-1] + "+00:00"
    if "." in s:  # Python < 3.11 wants exactly 3 or 6 fraction digits
        head, _, rest = s.partition(".")
        frac, tz = rest, ""
        for i, ch in enumerate(rest):
            if ch in "+-":
                frac, tz = rest[:i], rest[i:]
                break
        s = head + "." + (frac + "000000")[:6] + tz
    try:
        dt = datetime.fromisoformat(s)
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


class Log:
    def __init__(self, path):
        self.path = path
        self.seen = {}

    def write(self, msg):
        try:
            if os.path.exists(self.path) and os.path.getsize(self.path) > LOG_MAX:
                os.replace(self.path, self.path + ".1")
            with open(self.path, "a") as f:
                f.write("%s %s\n" % (utc_iso(time.time()), msg.rstrip()))
        except OSError:
            pass

    def once(self, key, msg):
        """Log ``msg`` the first time ``key`` is seen (repeated failures are not logged each loop)."""
        if self.seen.get(key) != msg:
            self.seen[key] = msg
            self.write(msg)


def write_json_atomic(path, data):
    tmp = "%s.tmp-%d" % (path, os.getpid())
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


# ---- processes ---------------------------------------------------------------------

_CLK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_BTIME = None


def boot_time():
    global _BTIME
    if _BTIME is None:
        try:
            with open("/proc/stat") as f:
                for line in f:
                    if line.startswith("btime "):
                        _BTIME = float(line.split()[1])
                        break
        except OSError:
            pass
        if _BTIME is None:
            _BTIME = 0.0
    return _BTIME


def proc_stat_fields(pid):
    """Fields after the ``(comm)`` of /proc/PID/stat (state is [0], pgrp [2], starttime [19]), or None."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            data = f.read()
    except OSError:
        return None
    return data.rsplit(")", 1)[1].split()


def pid_alive(pid, not_after=None):
    """Is ``pid`` alive (a zombie is not)? With ``not_after`` (epoch seconds, e.g. the pid file's
    mtime): a process that started well after it (PID_REUSE_SLACK: clock steps) reused the pid, so the
    one we want is dead (pid files outlive a reboot)."""
    if pid <= 0:
        return False
    if os.path.isdir("/proc/self"):
        st = proc_stat_fields(pid)
        if st is None:
            return False
        if st[0] == "Z":
            return False
        if not_after is not None and boot_time():
            try:
                started = boot_time() + int(st[19]) / float(_CLK)
            except (IndexError, ValueError):
                return True
            if started > not_after + PID_REUSE_SLACK:
                return False
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_pid(path):
    """(pid, mtime) from a pid file or a queue ticket (``<pid> [<host id> <boot id>]``), or (None, None)."""
    try:
        with open(path) as f:
            text = f.read(200).split()
        return int(text[0]), os.stat(path).st_mtime
    except (OSError, ValueError, IndexError):
        return None, None


def read_words(path, n=3):
    """The first ``n`` words of a small file ([] when it cannot be read)."""
    try:
        with open(path) as f:
            return f.read(200).split()[:n]
    except (OSError, UnicodeDecodeError):
        return []


def is_here(words, host_id, boot_id):
    """Whether a ``host`` file's / ticket's (host id, boot id) are this host's. Without ``host_id``
    (a config from before per-host state) everything counts, as it did then."""
    if not host_id or not words:
        return True
    return words[0] == host_id and (len(words) > 1 and words[1] == boot_id)


# ---- jobs --------------------------------------------------------------------------

def job_activity(runs_roots, host_id=None, boot_id=None):
    """Busy reasons from labdeck run directories and queue tickets, plus the alive notebook
    runs: ([reasons], {run wrapper pid (= process group): run id}). With ``host_id``, only this
    host's: its queues (``.hosts/<host id>/queue*``), and run directories whose ``host`` file
    names this host and boot (or that have none: runs from before per-host state)."""
    reasons = []
    notebooks = {}
    for root in runs_roots:
        if not root or not os.path.isdir(root):
            continue
        kinds = {}  # run id -> kind, from the live tickets in queue-<kind>
        queued = []
        qdirs = [(q, os.path.basename(q)[len(".queue"):]) for q in glob.glob(os.path.join(root, ".queue*"))]
        if host_id:
            qdirs += [(q, os.path.basename(q)[len("queue"):])
                      for q in glob.glob(os.path.join(root, ".hosts", host_id, "queue*"))]
        for qdir, suffix in qdirs:
            kind = suffix.lstrip("-") or "job"
            try:
                names = os.listdir(qdir)
            except OSError:
                continue
            for rid in names:
                if rid.endswith(".tmp"):
                    continue
                words = read_words(os.path.join(qdir, rid))
                if len(words) > 1 and not is_here(words[1:], host_id, boot_id):
                    continue  # another host's ticket (or one from before a reboot)
                pid, mtime = read_pid(os.path.join(qdir, rid))
                if pid is not None and pid_alive(pid, mtime):
                    kinds[rid] = kind
                    queued.append(rid)
        try:
            entries = os.listdir(root)
        except OSError:
            entries = []
        seen = set()
        for rid in sorted(entries):
            if rid.startswith("."):
                continue
            d = os.path.join(root, rid)
            if os.path.exists(os.path.join(d, "exit_code")):
                continue
            if not is_here(read_words(os.path.join(d, "host"), 2), host_id, boot_id):
                continue  # another host's run (a home several hosts share), or from before a reboot
            pid, mtime = read_pid(os.path.join(d, "pid"))
            if pid is None or not pid_alive(pid, mtime):
                continue
            seen.add(rid)
            kind = kinds.get(rid, "job")
            started = os.path.exists(os.path.join(d, "started_at"))
            if kind == "notebook":
                notebooks[pid] = rid
            elif kind == "job":
                reasons.append("job %s" % rid if started else "job %s (queued)" % rid)
            else:
                reasons.append("%s %s" % (kind, rid))
        for rid in queued:
            if rid not in seen and kinds.get(rid) == "job" and not rid.startswith("."):
                # a ticket whose run directory we cannot see (another runs root, or being written)
                if not os.path.exists(os.path.join(root, rid, "exit_code")):
                    reasons.append("job %s (queued)" % rid)
    return reasons, notebooks


# ---- GPUs --------------------------------------------------------------------------

def gpu_utilization(source, log):
    """Utilization (%) of every GPU, in index order; [] when there are none or they cannot be read."""
    source = source or "nvidia-smi"
    if source == "none":
        return []
    if source.startswith("fake:"):
        try:
            with open(source[5:]) as f:
                return [float(x) for x in f.read().split() if x.strip()]
        except (OSError, ValueError) as e:
            log.once("gpu", "fake GPU file unreadable: %s" % e)
            return []
    try:
        res = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=30)
    except FileNotFoundError:
        log.once("gpu", "no nvidia-smi on this instance: GPUs are not watched")
        return []
    except (OSError, subprocess.TimeoutExpired) as e:
        log.once("gpu", "nvidia-smi failed: %s" % e)
        return []
    if res.returncode != 0:
        log.once("gpu", "nvidia-smi failed (exit %d): %s" % (res.returncode, res.stdout.decode("utf-8", "replace")[-300:]))
        return []
    out = []
    for line in res.stdout.decode("utf-8", "replace").splitlines():
        line = line.strip()
        try:
            out.append(float(line))
        except ValueError:
            if line:
                out.append(0.0)  # "[N/A]": keep the index, do not count it as busy
    log.seen.pop("gpu", None)
    return out


# ---- notebooks ---------------------------------------------------------------------

def jupyter_runtime_dirs(extra=()):
    dirs = list(extra)
    env = os.environ.get("JUPYTER_RUNTIME_DIR")
    if env:
        dirs.append(env)
    data = os.environ.get("JUPYTER_DATA_DIR")
    if data:
        dirs.append(os.path.join(data, "runtime"))
    xdg = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    dirs.append(os.path.join(xdg, "jupyter", "runtime"))
    dirs.append(os.path.join(os.path.expanduser("~"), "Library", "Jupyter", "runtime"))  # macOS
    out = []
    for d in dirs:
        d = os.path.abspath(os.path.expanduser(d))
        if d not in out and os.path.isdir(d):
            out.append(d)
    return out


_NO_KERNEL_QUERY = set()  # (pid, port) of servers that count our /api/kernels query as activity


def _get_json(url, token, timeout=5):
    req = urllib.request.Request(url, headers={"Authorization": "token %s" % token} if token else {})
    handlers = [urllib.request.ProxyHandler({})]  # loopback: never through an http_proxy from the environment
    if url.startswith("https:"):
        import ssl

        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # the instance's own server, with its own certificate
        handlers.append(urllib.request.HTTPSHandler(context=ctx))
    with urllib.request.build_opener(*handlers).open(req, timeout=timeout) as r:
        return json.loads(r.read().decode("utf-8", "replace"))


def jupyter_servers(runtime_dirs, log):
    """Every live Jupyter server found in the runtime dirs: dicts with port, pid, pgrp,
    last_activity (epoch or None), busy_kernels, ok (its API answered)."""
    out = []
    seen = set()
    for d in runtime_dirs:
        for path in sorted(glob.glob(os.path.join(d, "jpserver-*.json")) + glob.glob(os.path.join(d, "nbserver-*.json"))):
            try:
                with open(path) as f:
                    info = json.load(f)
                pid = int(info.get("pid") or 0)
                port = int(info.get("port") or 0)
            except (OSError, ValueError, TypeError, AttributeError):
                continue
            if not pid or (pid, port) in seen or not pid_alive(pid):
                continue
            seen.add((pid, port))
            st = proc_stat_fields(pid)
            srv = {"pid": pid, "port": port, "pgrp": int(st[2]) if st else None, "last_activity": None,
                   "busy_kernels": 0, "ok": False}
            # "url" is the server's connection URL, base_url included
            url = info.get("url") or "http://127.0.0.1:%d%s" % (port, info.get("base_url") or "/")
            for anyhost in ("0.0.0.0", "[::]"):
                url = url.replace("://%s:" % anyhost, "://127.0.0.1:")
            if not url.endswith("/"):
                url += "/"
            token = info.get("token") or ""
            try:
                # /api/status does not count as activity; it has the kernels' activity in last_activity
                status = _get_json(url + "api/status", token)
                la = srv["last_activity"] = parse_iso(status.get("last_activity"))
                srv["ok"] = True
                key = (pid, port)
                if status.get("kernels") and key not in _NO_KERNEL_QUERY:
                    # a long cell that prints nothing leaves last_activity behind: ask for executing kernels,
                    # without being counted as activity ourselves (jupyter_server 2: no_track_activity)
                    t_call = time.time()
                    try:
                        kernels = _get_json(url + "api/kernels?no_track_activity=1", token)
                        srv["busy_kernels"] = sum(1 for k in kernels if isinstance(k, dict)
                                                  and k.get("execution_state") == "busy")
                        after = parse_iso(_get_json(url + "api/status", token).get("last_activity"))
                        if after is not None and after >= t_call - 1 and (la is None or after > la):
                            _NO_KERNEL_QUERY.add(key)  # an older server: our query kept it "active"; stop asking
                            log.write("Jupyter on :%d counts API queries as activity: watching its "
                                      "last_activity only" % port)
                    except Exception:  # noqa: BLE001
                        pass
                log.seen.pop("jupyter:%d" % port, None)
            except Exception as e:  # noqa: BLE001 - a server that does not answer is judged by its run
                log.once("jupyter:%d" % port, "Jupyter on :%d did not answer /api/status: %s" % (port, e))
            out.append(srv)
    return out


# ---- port forwards -----------------------------------------------------------------

def _addr_v4(hexaddr):
    # the kernel prints the network-order address as one host-order 32-bit word
    return socket.inet_ntop(socket.AF_INET, struct.pack("=I", int(hexaddr, 16)))


def _addr_v6(hexaddr):
    packed = b"".join(struct.pack("=I", int(hexaddr[i:i + 8], 16)) for i in range(0, 32, 8))
    return socket.inet_ntop(socket.AF_INET6, packed)


def parse_proc_net_tcp(text, v6=False):
    """Rows of /proc/net/tcp{,6}: dicts with local, lport, remote, rport, state, uid, inode."""
    rows = []
    for line in text.splitlines()[1:]:
        f = line.split()
        if len(f) < 10:
            continue
        try:
            la, lp = f[1].split(":")
            ra, rp = f[2].split(":")
            conv = _addr_v6 if v6 else _addr_v4
            rows.append({"local": conv(la), "lport": int(lp, 16), "remote": conv(ra), "rport": int(rp, 16),
                         "state": f[3].upper(), "uid": int(f[7]), "inode": int(f[9])})
        except (ValueError, OSError, struct.error):
            continue
    return rows


def is_loopback(addr):
    if addr.startswith("::ffff:"):
        addr = addr[7:]
    return addr.startswith("127.") or addr == "::1"


def read_tcp_tables():
    rows = []
    for path, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        try:
            with open(path) as f:
                rows.extend(parse_proc_net_tcp(f.read(), v6))
        except OSError:
            continue
    return rows


def _socket_inodes(pid):
    """Socket inodes of a process's fds; raises PermissionError when its fds cannot be read."""
    fd_dir = "/proc/%d/fd" % pid
    inodes = set()
    for fd in os.listdir(fd_dir):
        try:
            link = os.readlink(os.path.join(fd_dir, fd))
        except OSError:
            continue
        if link.startswith("socket:["):
            try:
                inodes.add(int(link[8:-1]))
            except ValueError:
                pass
    return inodes


def _proc_uid(pid):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("Uid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def forward_activity(read_tables=read_tcp_tables):
    """(["forward :PORT", ...], check) for loopback connections held by sshd processes.

    ``check``: "exact" (every sshd's fds were readable), "by-uid" (some were not: see the module
    docstring), "none" (there were no candidate connections, nothing else was looked at)."""
    first = read_tables()
    cands = [r for r in first if r["state"] == TCP_ESTABLISHED and r["inode"]
             and ((is_loopback(r["remote"]) and is_loopback(r["local"])) or r["remote"] == r["local"])]
    if not cands:
        return [], "none"
    owner = {}
    sshd = set()
    hidden_sshd_uids = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        try:
            with open("/proc/%d/comm" % pid) as f:
                comm = f.read().strip()
        except OSError:
            continue
        is_sshd = comm in SSHD_NAMES
        try:
            for ino in _socket_inodes(pid):
                owner[ino] = pid
            if is_sshd:
                sshd.add(pid)
        except PermissionError:
            if is_sshd:
                uid = _proc_uid(pid)
                if uid not in (None, 0):
                    hidden_sshd_uids.add(uid)
        except OSError:
            continue
    # only connections present before and after the scan: ones that came or went during it are skipped
    second = {r["inode"]: r for r in read_tables() if r["state"] == TCP_ESTABLISHED}
    listening = set()
    for r in first:
        if r["state"] == TCP_LISTEN:
            listening.add(r["lport"])
    reasons = []
    for r in cands:
        if r["inode"] not in second:
            continue
        pid = owner.get(r["inode"])
        if pid is not None:
            held = pid in sshd
        else:
            held = r["uid"] in hidden_sshd_uids
        if not held:
            continue
        # -L: sshd dialled the service (its peer's port listens); -R: a client dialled sshd's listener
        port = r["rport"] if r["rport"] in listening or r["lport"] not in listening else r["lport"]
        reason = "forward :%d" % port
        if reason not in reasons:
            reasons.append(reason)
    return reasons, ("by-uid" if hidden_sshd_uids else "exact")


# ---- the loop ----------------------------------------------------------------------

def load_config(path):
    with open(path) as f:
        cfg = json.load(f)
    if not isinstance(cfg, dict):
        raise ValueError("config.json is not an object")
    return cfg


class Autostop:
    def __init__(self, d):
        self.dir = d
        self.config_path = os.path.join(d, "config.json")
        self.state_path = os.path.join(d, "state.json")
        self.log = Log(os.path.join(d, "autostop.log"))
        self.cfg = {}
        self.idle_since = None  # monotonic
        self.fired = False  # fired (successfully) during this idle period
        self.fired_at = None  # wall time of the last attempt in this idle period
        self.error = None
        self.attempts = 0
        self.was_busy = None
        self.was_enabled = True
        self.loaded = False  # no config read yet: never fire on defaults

    def window(self):
        try:
            return max(0.0, float(self.cfg.get("idle_minutes", 30)) * 60.0)
        except (TypeError, ValueError):
            return 30 * 60.0

    def interval(self):
        try:
            return max(0.1, float(self.cfg.get("interval", 30)))
        except (TypeError, ValueError):
            return 30.0

    def enabled(self):
        return self.loaded and self.cfg.get("enabled", True) is not False and self.window() > 0

    def _probe(self, name, fn, *args):
        """A check that failed counts as busy (with the reason saying so): never stop on a guess."""
        try:
            out = fn(*args)
            self.log.seen.pop("probe:" + name, None)
            return out, None
        except Exception as e:  # noqa: BLE001
            self.log.once("probe:" + name, "the %s check failed: %s" % (name, traceback.format_exc()))
            return None, "unknown: %s check failed (%s)" % (name, type(e).__name__)

    def busy_reasons(self, now_wall, now_mono):
        """Busy reasons; also moves idle_since forward to notebook activity."""
        reasons = []
        roots = self.cfg.get("runs_roots") or [self.cfg.get("runs_root") or "~/.labdeck/runs"]
        if isinstance(roots, str):
            roots = [roots]
        hid, boot = self.cfg.get("host_id"), self.cfg.get("boot_id")
        found, err = self._probe("jobs", job_activity, [os.path.expanduser(r) for r in roots],
                                 hid if isinstance(hid, str) and re.fullmatch(r"[0-9a-f]{16}", hid) else None,
                                 boot if isinstance(boot, str) else None)
        jobs, notebook_runs = found or ([], {})
        reasons.extend(jobs + ([err] if err else []))
        try:
            threshold = float(self.cfg.get("gpu_threshold", 5))
        except (TypeError, ValueError):
            threshold = 5.0
        utils, err = self._probe("gpu", gpu_utilization, str(self.cfg.get("gpu_source") or "nvidia-smi"), self.log)
        for i, u in enumerate(utils or []):
            if u >= threshold:
                reasons.append("gpu %d: %d%%" % (i, round(u)))
        reasons.extend([err] if err else [])
        extra = self.cfg.get("jupyter_runtime_dirs") or []
        dirs = extra if isinstance(extra, list) else [extra]
        servers, err = self._probe("notebook", lambda: jupyter_servers(jupyter_runtime_dirs(dirs), self.log))
        servers = servers or []
        reasons.extend([err] if err else [])
        judged = set()  # notebook runs whose Jupyter answered: its activity decides
        latest = None
        for s in servers:
            if not s["ok"]:
                continue
            if s["pgrp"] in notebook_runs:
                judged.add(s["pgrp"])
            la = s["last_activity"]
            if la is not None:
                latest = la if latest is None else max(latest, la)
            recent = la is not None and now_wall - la < 2 * self.interval() + 1
            if s["busy_kernels"] or recent:
                reasons.append("notebook :%d" % s["port"])
        for pgid, rid in sorted(notebook_runs.items()):
            if pgid not in judged:
                reasons.append("notebook %s (no status)" % rid)  # safe side: Jupyter stops itself when idle
        found, err = self._probe("forward", self.forward_probe)
        fwd, self.forward_check = found or ([], "failed")
        reasons.extend(fwd + ([err] if err else []))
        if latest is not None and not reasons and self.idle_since is not None:
            la_mono = now_mono - max(0.0, now_wall - latest)
            if la_mono > self.idle_since:  # notebook activity since the idle window started
                self.idle_since = la_mono
        return reasons

    forward_check = "none"
    forward_probe = staticmethod(forward_activity)

    def fire(self, now_wall):
        cmd = self.cfg.get("command") or DEFAULT_COMMAND
        self.fired_at = now_wall
        self.attempts += 1
        self.error = None
        self.write_state(now_wall, time.monotonic(), [])
        self.log.write("idle for %g min: firing %s (%s)" % (self.window() / 60.0, self.cfg.get("action", "stop"),
                                                           json.dumps(cmd)))
        try:
            res = subprocess.run(cmd, shell=isinstance(cmd, str), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, timeout=COMMAND_TIMEOUT)
            out = res.stdout.decode("utf-8", "replace").strip()
            ok = res.returncode == 0
            why = "exit %d" % res.returncode
        except Exception as e:  # noqa: BLE001 - not found, timed out, ...
            out, ok, why = "", False, "%s: %s" % (type(e).__name__, e)
        if ok:
            self.fired = True
            self.log.write("command done" + (": " + out[-2000:] if out else ""))
        else:
            self.error = ("%s: %s" % (why, out[-500:])) if out else why
            self.log.write("command failed (%s); next try after another %g idle minutes%s"
                           % (why, self.window() / 60.0, ("\n" + out[-4000:]) if out else ""))
            self.idle_since = time.monotonic()  # a full window before the next try

    def write_state(self, now_wall, now_mono, busy):
        enabled = self.enabled()
        deadline = None
        idle_since = None
        if enabled and self.idle_since is not None and not busy:
            idle_since = utc_iso(now_wall - (now_mono - self.idle_since))
            deadline = utc_iso(now_wall - (now_mono - self.idle_since) + self.window())
        try:
            idle_minutes = float(self.cfg.get("idle_minutes", 30))
        except (TypeError, ValueError):
            idle_minutes = None
        write_json_atomic(self.state_path, {
            "pid": os.getpid(), "version": SOURCE_VERSION, "updated_at": utc_iso(now_wall), "enabled": enabled,
            "idle_minutes": idle_minutes, "action": self.cfg.get("action", "stop"), "interval": self.interval(),
            "idle_since": idle_since, "deadline": deadline, "busy": busy,
            "fired_at": utc_iso(self.fired_at) if self.fired_at is not None else None,
            "error": self.error, "attempts": self.attempts, "forward_check": self.forward_check,
        })

    def step(self):
        """One loop. Returns False when config.json is gone (time to exit)."""
        if not os.path.exists(self.config_path):
            return False
        try:
            self.cfg = load_config(self.config_path)
            self.loaded = True
            self.log.seen.pop("config", None)
        except (OSError, ValueError) as e:
            if not os.path.exists(self.config_path):
                return False
            self.log.once("config", "config.json unreadable, keeping the last one: %s" % e)
        now_wall, now_mono = time.time(), time.monotonic()
        busy = self.busy_reasons(now_wall, now_mono)
        if busy:
            if self.was_busy is not True:
                self.log.write("busy: " + ", ".join(busy))
            self.idle_since = None
            # activity after a fire that did not take the machine down (or after failed tries): arm again
            self.fired, self.fired_at, self.attempts = False, None, 0
        else:
            if self.was_busy is not False:
                self.log.write("idle")
            if self.idle_since is None or (self.enabled() and not self.was_enabled):
                self.idle_since = now_mono  # (enabling starts a fresh window)
        self.was_busy = bool(busy)
        self.was_enabled = self.enabled()
        if self.enabled() and not busy and not self.fired and now_mono - self.idle_since >= self.window():
            self.fire(now_wall)
            now_wall, now_mono = time.time(), time.monotonic()
        self.write_state(now_wall, now_mono, busy)
        return True

    def run(self):
        self.log.write("autostop started (pid %d, version %s)" % (os.getpid(), SOURCE_VERSION))
        while True:
            try:
                if not self.step():
                    self.log.write("config.json is gone: exiting")
                    try:
                        os.unlink(self.state_path)
                    except OSError:
                        pass
                    return 0
            except Exception:  # noqa: BLE001 - never die from a transient error
                self.log.once("loop", "error in the loop:\n" + traceback.format_exc())
            self.wait(self.interval())

    def wait(self, seconds):
        """Sleep ``seconds``, waking early when config.json changes (labdeck changed the settings:
        the new state should show within a second, not after a whole interval)."""
        def stamp():
            try:
                st = os.stat(self.config_path)
                return (st.st_mtime_ns, st.st_size, st.st_ino)
            except OSError:
                return None

        before = stamp()
        end = time.monotonic() + seconds
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(1.0, left))
            if stamp() != before:
                return


def main(argv=None):
    global SOURCE_VERSION
    ap = argparse.ArgumentParser(description="labdeck autostop: stop this instance when it is idle")
    ap.add_argument("--dir", required=True, help="directory with config.json (state.json, lock and the log go there)")
    args = ap.parse_args(argv)
    d = os.path.abspath(os.path.expanduser(args.dir))
    os.makedirs(d, exist_ok=True)
    lock = open(os.path.join(d, "lock"), "a+")
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return 0  # another one runs
    lock.seek(0)
    lock.truncate()
    lock.write(str(os.getpid()))
    lock.flush()
    try:
        with open(os.path.abspath(__file__), "rb") as f:
            SOURCE_VERSION = hashlib.sha256(f.read()).hexdigest()[:12]
    except OSError:
        SOURCE_VERSION = "unknown"
    try:
        with open(os.path.join(d, "daemon.version"), "w") as f:
            f.write(SOURCE_VERSION + "\n")
    except OSError:
        pass
    return Autostop(d).run()


if __name__ == "__main__":
    sys.exit(main())
