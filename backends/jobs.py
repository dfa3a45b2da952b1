"""Jobs: commands run detached on an instance, in a run directory that holds
everything needed to find them again.

A run directory (``<runs root>/<run id>/``) holds::

    env.sh       the job's environment (exports; 0700, like the directory itself)
    secrets.env  the values of the run's secrets (0600; sent on stdin, sourced and removed as the job starts)
    command.sh   the command (sources env.sh, then secrets.env)
    environment.json  the job's Python (interpreter, version, packages), recorded at start: by the
                 job itself when it imports labdeck (its sys.executable), else by the wrapper
                 with the command's own interpreter (:func:`job_python`, found on the job's PATH)
    run.sh       the wrapper: records pid, start/end time and exit code
    host         ``<host id> <boot id>`` of the host it runs on (:mod:`backends.hostid`), written before
                 ``pid``: the pid is judged alive only there (a home may be shared by several hosts)
    pid          the wrapper's pid == the job's process-group id
    started_at   ended_at   exit_code     (UTC times; exit code written atomically)
    output.log   stdout and stderr, combined
    metrics.jsonl  metric points the job logs ($LABDECK_METRICS_FILE)
    queued       present while the job waited for a slot in the instance's FIFO queue

The queue is this user's on one host: ``<runs root>/.hosts/<host id>/queue`` (jobs; tickets
``<pid> <host id> <boot id>``) and ``.../queue-<kind>`` (notebooks and other services: no slots).
Runs started before per-host state have no ``host`` file and waited in ``<runs root>/.queue``;
they are read back as before (their pid checked alone).

The job runs in its own session with stdin closed, so it survives labdeck, the
SSH connection and the jump host. ``refresh`` reads the run directories back
(in one command per instance) and moves runs through the state machine; a running run's
new last line goes to its status file (:meth:`Store.set_status`), not the journal.
Everything here goes through the Transport contract, so it is the same on
``local`` and on a remote host.
"""

from __future__ import annotations

import asyncio
import base64
import os
import posixpath
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from . import code
from .errors import LabdeckError, StateError
from .hostid import HOST_ID_FN, check_host_id, queue_name
from .lineage import params_from_command
from .models import Edge, Run, RunState, utcnow
from .providers.base import Transport, detached_launcher
from .store import Store

# Is pid $1 alive? (On Linux a zombie is not; elsewhere fall back to kill -0.)
ALIVE_FN = r"""alive() {
  if [ -r "/proc/$1/stat" ]; then [ "$(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)" != Z ]
  elif [ -d /proc/self ]; then return 1
  else kill -0 "$1" 2>/dev/null; fi
}
"""

WRAPPER = r"""#!/bin/sh
# labdeck run wrapper (run {run_id}): waits for a slot in this user's FIFO queue on this host,
# then runs the job and records pid, times and exit code next to its log. The host id and boot
# id come from labdeck's submit command ($LABDECK_HOST_ID, $LABDECK_BOOT_ID: backends/hostid.py);
# a home shared by several hosts (NFS) has one queue per host, and a pid counts as alive only
# with this host's id and boot id beside it.
D={run_dir}
ID={run_id}
HID=$LABDECK_HOST_ID
BOOT=$LABDECK_BOOT_ID
case "$HID" in ????????????????) ;; *) echo "labdeck: no host id given to the wrapper" >> "$D/output.log"; exit 127;; esac
Q={hosts_dir}/$HID/{queue_name}
MAX={max_concurrent}
PY={python}
ENVPY='import json, sys, platform
try:
    import importlib.metadata as m
    pk = sorted({"%s==%s" % (d.metadata["Name"], d.version) for d in m.distributions() if d.metadata["Name"]})
except Exception:
    pk = []
json.dump({"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform(), "packages": pk[:3000], "recorded_by": "command"}, sys.stdout)'
""" + ALIVE_FN + r"""
# where the pid means something: written before the pid (a reader that finds a pid and no
# host file has a run of the layout before per-host state, whose pid was checked alone)
echo "$HID $BOOT" > "$D/host.tmp" && mv "$D/host.tmp" "$D/host"
echo $$ > "$D/pid.tmp" && mv "$D/pid.tmp" "$D/pid"
: >> "$D/metrics.jsonl"  # where labdeck.log() appends metric points (JSON lines)
mkdir -p "$Q" && echo "$$ $HID $BOOT" > "$Q/$ID.tmp" && mv "$Q/$ID.tmp" "$Q/$ID"
# FIFO: run ids sort by creation; start when fewer than MAX live tickets are ahead of ours.
# A ticket is "<pid> <host id> <boot id>": one of another host (a machine id cloned onto a host
# sharing this home) or of another boot of this one is neither counted nor removed here.
while :; do
  ahead=0
  for t in $(ls "$Q" 2>/dev/null | sort); do
    [ "$t" = "$ID" ] && break
    case "$t" in *.tmp) continue;; esac
    p= h= b=
    read p h b 2>/dev/null < "$Q/$t"
    [ "$h" = "$HID" ] && [ "$b" = "$BOOT" ] || continue
    if [ -n "$p" ] && alive "$p"; then ahead=$((ahead+1)); else rm -f "$Q/$t"; fi
  done
  [ "$ahead" -lt "$MAX" ] && break
  [ -e "$D/queued" ] || echo "$ahead" > "$D/queued"  # tells submit not to wait for the start
  sleep 0.5
done
date -u +%Y-%m-%dT%H:%M:%SZ > "$D/started_at.tmp" && mv "$D/started_at.tmp" "$D/started_at"
# SIGTERM/SIGINT/SIGHUP to the process group stop the job; the wrapper stays to record how it ended.
trap ':' TERM INT HUP
if cd {workdir}; then
  # the job's Python environment, for the record (in the background; never delays or breaks the job):
  # the command's interpreter as the job finds it (its env.sh: its PATH, in its directory); linked in
  # only if the job's own `import labdeck` has not recorded its sys.executable first
  ( . "$D/env.sh"; P=$(command -v "$PY") || P=$(command -v python3) || exit 0; T="$D/lib/.environment.json.$$"
    "$P" -c "$ENVPY" > "$T" && ln "$T" "$D/environment.json"; rm -f "$T" ) </dev/null >/dev/null 2>&1 &
  sh "$D/command.sh" >> "$D/output.log" 2>&1 < /dev/null
  code=$?
else
  echo "labdeck: cannot enter the working directory {workdir}" >> "$D/output.log"
  code=127
fi
date -u +%Y-%m-%dT%H:%M:%SZ > "$D/ended_at.tmp" && mv "$D/ended_at.tmp" "$D/ended_at"
echo $code > "$D/exit_code.tmp" && mv "$D/exit_code.tmp" "$D/exit_code"
rm -f "$Q/$ID"
"""

# One command reports every run directory: id, exit code, pid, alive, started, last line (base64),
# where (``here``: its host file names this host; ``other``: another host's; ``-``: no host file, a
# run from before per-host state, whose pid is checked alone). Alive is (host id, boot id, pid).
STATUS_SCRIPT = ALIVE_FN + HOST_ID_FN + r"""
hostids  # (sets HID and BOOT)
for d in "$@"; do
  pid=$(cat "$d/pid" 2>/dev/null)
  alive=0; where=-
  if [ -r "$d/host" ]; then
    h= b=; read h b < "$d/host"
    if [ "$h" = "$HID" ]; then
      where=here
      [ "$b" = "$BOOT" ] && [ -n "$pid" ] && alive "$pid" && alive=1
    else
      where=other
    fi
  else
    [ -n "$pid" ] && alive "$pid" && alive=1
  fi
  ec=$(cat "$d/exit_code" 2>/dev/null)  # read after the liveness check: a job that ended in between has it
  st=$(cat "$d/started_at" 2>/dev/null); en=$(cat "$d/ended_at" 2>/dev/null)
  last=$(tail -c 4096 "$d/output.log" 2>/dev/null | tr '\r' '\n' | grep -av '^[[:space:]]*$' | tail -n 1 | cut -c1-300 | base64 | tr -d '\n')
  [ -d "$d" ] && ex=1 || ex=0
  printf '%s %s %s %s %s %s %s %s %s\n' "$d" "$ex" "${ec:--}" "${pid:--}" "$alive" "${st:--}" "${en:--}" "${last:--}" "$where"
done
"""


@dataclass(frozen=True)
class RunStatus:
    run_dir: str
    exists: bool
    exit_code: int | None
    pid: int | None
    alive: bool
    started_at: str | None
    ended_at: str | None
    last_line: str
    where: str = ""  # "here": the run's host file names the host reached; "other": another host's; "": no host file

    @property
    def elsewhere(self) -> bool:
        """The run directory is another host's (a home shared between hosts): its pid means nothing here."""
        return self.where == "other"


def _opt(v: str) -> str | None:
    return None if v == "-" else v


async def read_statuses(transport: Transport, run_dirs: list[str]) -> dict[str, RunStatus]:
    if not run_dirs:
        return {}
    cmd = "sh -c " + shlex.quote(STATUS_SCRIPT) + " labdeck-status " + " ".join(shlex.quote(d) for d in run_dirs)
    res = await transport.run(cmd, timeout=30)
    out: dict[str, RunStatus] = {}
    for line in res.stdout.decode("utf-8", "replace").splitlines():
        parts = line.split(" ")
        if len(parts) != 9:
            continue
        d, ex, ec, pid, alive, st, en, last, where = parts
        try:
            text = base64.b64decode(last).decode("utf-8", "replace").strip() if last != "-" else ""
        except ValueError:
            text = ""
        out[d] = RunStatus(
            d, ex == "1", int(ec) if _opt(ec) and ec.lstrip("-").isdigit() else None,
            int(pid) if _opt(pid) and pid.isdigit() else None, alive == "1", _opt(st), _opt(en), text,
            where if where in ("here", "other") else "",
        )
    return out


RUNTIME_MODULE = Path(__file__).parent / "runtime" / "labdeck.py"
_PYTHON_NAME = re.compile(r"python[0-9.]*")
_PREFIXES = {"exec", "env", "nohup", "time", "command"}


def job_python(command: str) -> str:
    """The interpreter a command runs, as written: its first word when that is a Python
    (``/opt/venv/bin/python``, ``.venv/bin/python3``, ``python3.11``), past ``NAME=value``
    assignments and ``exec``/``env``/``nohup``/``time``; else ``python3``. The wrapper looks it
    up with the job's own PATH, in its directory. (A command that starts Python some other way,
    e.g. ``torchrun`` or a shell script, is recorded exactly when its script imports labdeck.)"""
    try:
        words = shlex.split(command.strip().splitlines()[0]) if command.strip() else []
    except ValueError:
        return "python3"
    for word in words:
        if word in _PREFIXES or re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", word, re.S) or word.startswith("-"):
            continue  # (`env -i`, `time -p`: their options)
        return word if _PYTHON_NAME.fullmatch(posixpath.basename(word)) else "python3"
    return "python3"
SUBMIT_WAIT_SECONDS = 2.0  # how long submit waits to see the job start (it may be queued behind others)


async def launch(store: Store, transport: Transport, *, instance: str, command: str, workdir: str,
                 runs_root: str, env: Mapping[str, str] | None = None, name: str = "", parent: str | None = None,
                 price_per_hour: float = 0.0, sync_code: bool = True, code_cache: Path | None = None,
                 max_concurrent: int = 1, progress: code.Progress | None = None, kind: str = "parent",
                 instance_info: dict | None = None, run_kind: str = "job", params: dict | None = None,
                 secrets: Mapping[str, str] | None = None) -> Run:
    """Record a run, snapshot and sync its code, and start it detached on the instance.

    With ``sync_code`` (the default) the code around ``workdir`` (its git repository, or the
    directory) is snapshotted, synced incrementally to the instance and copied for this run;
    the job runs in that copy, in the same relative directory. Without it, the job runs in
    ``workdir`` on the instance as it is. Returns the run: ``running`` if it started within
    a moment, else ``queued`` (waiting for a slot in the instance's FIFO queue).

    ``secrets`` (name → value) reach the job's environment through a 0600 file in its 0700 run
    directory, written from stdin (never argv); the record keeps their names only.
    """
    secrets = dict(secrets or {})
    check_secret_names(secrets, env)
    if not command.strip():
        raise LabdeckError("The command is empty.", "Give the command to run, e.g. `python train.py`.")
    if parent:
        parent = store.find_run(parent).id
    run = Run(command=command, instance=instance, name=name, workdir=workdir, env=dict(env or {}),
              parent=parent, price_per_hour=price_per_hour)
    root = runs_root.rstrip("/")
    run.run_dir = f"{root}/{run.id}"
    job_dir = workdir
    snap = None
    if sync_code:
        snap = await asyncio.to_thread(code.snapshot, workdir, code_cache)
        rel = os.path.relpath(os.path.realpath(workdir), snap.root)
        job_dir = posixpath.normpath(f"{run.run_dir}/code/{'' if rel == '.' else rel}")
        run.code = {"commit": snap.commit, "dirty": snap.dirty, "root": str(snap.root), "subdir": "" if rel == "." else rel,
                    "files": len(snap.files), "bytes": snap.total_bytes, "untracked": snap.untracked[:200],
                    "diff_truncated": snap.diff_truncated, "is_git": snap.is_git}
        if snap.diff:
            store.write_blob(f"{run.id}.diff", snap.diff.encode())
            run.code["diff_blob"] = f"{run.id}.diff"
    run.workdir = job_dir
    local_code = (snap.root / run.code["subdir"]) if snap is not None else (Path(workdir) if os.path.isdir(workdir) else None)
    run.params = params_from_command(command, local_code) if params is None else dict(params)
    run.kind = run_kind
    run.instance_info = dict(instance_info or {})
    run.secrets = sorted(secrets)
    store.add(run)
    if parent:
        store.add(Edge(parent=parent, child=run.id, kind=kind))
    try:
        if snap is not None:
            store.transition(run.id, RunState.SYNCING)
            mirror = f"{posixpath.dirname(root)}/code/{snap.project_key(store.user, run.origin_host)}"
            result = await code.sync(snap, transport, mirror, progress)
            await code.materialize(transport, mirror, f"{run.run_dir}/code")
            store.update_run(run.id, code={**run.code, "synced_files": result.uploaded_files,
                                           "synced_bytes": result.uploaded_bytes, "mirror": mirror})
            store.transition(run.id, RunState.QUEUED)
        # one queue per host under the runs root (<root>/.hosts/<host id>/queue: the home may be shared);
        # notebooks and other services do not wait in (or take a slot of) the jobs' FIFO queue
        pid, started, hid = await _submit(transport, run, job_dir, f"{root}/.hosts", queue_name(run_kind),
                                          max_concurrent if run_kind == "job" else 1_000_000, secrets)
    except LabdeckError as e:
        store.transition(run.id, RunState.FAILED, state_reason=f"could not start: {e}", ended_at=utcnow())
        raise
    info = {**run.instance_info, "host_id": hid}
    if started:
        return store.transition(run.id, RunState.RUNNING, pid=pid, started_at=started, instance_info=info)
    return store.update_run(run.id, pid=pid, state_reason=WAITING, instance_info=info)


def check_secret_names(secrets: Mapping[str, str], env: Mapping[str, str] | None = None) -> None:
    """Secret names are shell identifiers, not labdeck's own variables, and not also given as --env."""
    bad = [k for k in secrets if not isinstance(k, str) or not k.isidentifier() or k.startswith("LABDECK_")]
    if bad:
        raise LabdeckError(f"Invalid secret name(s): {', '.join(map(repr, bad))}.",
                           "A secret is named like an environment variable (letters, digits, _), not LABDECK_*.")
    both = sorted(set(secrets) & set(env or {}))
    if both:
        raise LabdeckError(f"{', '.join(both)} given both as --env and as a secret.",
                           "Give a secret only with --secret: --env values are kept in the team store.")


def secrets_file(secrets: Mapping[str, str]) -> bytes:
    """The ``secrets.env`` the job sources: one quoted export per secret."""
    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in secrets.items()).encode()


async def _submit(transport: Transport, run: Run, job_dir: str, hosts_dir: str, queue: str, max_concurrent: int,
                  secrets: Mapping[str, str] | None = None) -> tuple[int, str | None, str]:
    """One round trip: work out the host id, write the run directory, start the wrapper detached
    (the host id and boot id in its environment: it waits in ``<hosts_dir>/<host id>/<queue>``),
    wait briefly to see it start. Returns (pid, started_at or None, host id).

    The run directory is written under ``umask 077`` (the job itself gets the caller's umask back):
    the directory is 0700, its scripts 0700, and the secrets file (read from this command's stdin,
    so no value is ever in an argv) 0600."""
    full_env = {"LABDECK_RUN_ID": run.id, "LABDECK_RUN_DIR": run.run_dir,
                "LABDECK_METRICS_FILE": f"{run.run_dir}/metrics.jsonl", **run.env}
    bad = [k for k in full_env if not k.isidentifier()]
    if bad:
        raise LabdeckError(f"Invalid environment variable name(s): {', '.join(bad)}.")
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in full_env.items())
    # `import labdeck` inside the job: the stdlib-only module, shipped in the run directory, first on the path
    exports += f'export PYTHONPATH={shlex.quote(run.run_dir + "/lib")}"${{PYTHONPATH:+:$PYTHONPATH}}"\n'
    wrapper = WRAPPER
    for key, value in {"run_id": run.id, "run_dir": shlex.quote(run.run_dir), "workdir": shlex.quote(job_dir),
                       "hosts_dir": shlex.quote(hosts_dir), "queue_name": queue, "max_concurrent": str(max(1, int(max_concurrent))),
                       "python": shlex.quote(job_python(run.command))}.items():
        wrapper = wrapper.replace("{" + key + "}", value)  # (not str.format: the shell code has braces)
    d = shlex.quote(run.run_dir)

    def put(name: str, text: str) -> str:
        return f"printf %s {base64.b64encode(text.encode()).decode()} | base64 -d > {d}/{name}"

    launcher = shlex.join(detached_launcher(f"exec sh {run.run_dir}/run.sh", None))
    polls = int(SUBMIT_WAIT_SECONDS / 0.02)
    sec = shlex.quote(run.run_dir + "/secrets.env")
    # the job sources its environment, then its secrets (and removes their file: it has them now)
    command_sh = (f". {shlex.quote(run.run_dir + '/env.sh')}\n"
                  f"if [ -f {sec} ]; then . {sec}; rm -f {sec}; fi\n{run.command}\n")
    take_secrets = f"cat > {sec} && chmod 600 {sec} && " if secrets else ""
    script = (f"{HOST_ID_FN}hostids && H=$HID && LABDECK_HOST_ID=$HID && LABDECK_BOOT_ID=$BOOT && "
              f"export LABDECK_HOST_ID LABDECK_BOOT_ID && "
              f"u=$(umask); umask 077 && mkdir -p {d}/lib && chmod 700 {d} && {take_secrets}"
              f"{put('env.sh', exports)} && {put('command.sh', command_sh)} && "
              f"{put('run.sh', wrapper)} && "
              f"{put('lib/labdeck.py', RUNTIME_MODULE.read_text())} && "
              f"chmod 700 {d}/run.sh {d}/command.sh {d}/env.sh && umask $u && {launcher} && "
              f"i=0; while [ ! -e {d}/started_at ] && [ ! -e {d}/queued ] && [ $i -lt {polls} ]; do sleep 0.02; i=$((i+1)); done; "
              f"cat {d}/started_at 2>/dev/null; echo \"host=$H\"; true")
    res = await transport.run(script, timeout=60, input=secrets_file(secrets) if secrets else None)
    lines = res.text().split()
    hosts = [w[5:] for w in lines if w.startswith("host=")]
    lines = [w for w in lines if not w.startswith("host=")]
    if not res.ok or not lines or not lines[0].isdigit() or not hosts:
        raise LabdeckError(f"Could not start the job on {transport.instance}: "
                           f"{res.stderr.decode(errors='replace').strip()[:300] or res.text()[:300]}")
    return int(lines[0]), (lines[1] if len(lines) > 1 else None), check_host_id(hosts[0], transport.instance)


async def refresh(store: Store, transport: Transport, instance: str, mine: list[Run] | None = None) -> list[Run]:
    """Read back this user's active runs on ``instance`` and move their states. Returns changed runs.

    ``mine``: this user's runs if the caller already loaded them."""
    if mine is None:
        mine, _ = store.runs(team=False)
    active = store.with_status([r for r in mine if r.instance == instance and r.run_dir and r.pid
                                and r.run_state in (RunState.QUEUED, RunState.RUNNING, RunState.LOST)])
    statuses = await read_statuses(transport, [r.run_dir for r in active])
    changed: list[Run] = []
    for run in active:
        st = statuses.get(run.run_dir)
        if st is None:
            continue
        state = run.run_state
        cancelling = run.state_reason == CANCELLING  # (its exit is the cancel's SIGTERM/SIGKILL)
        if not st.exists:
            if state != RunState.LOST:
                changed.append(store.transition(run.id, RunState.LOST, state_reason="run directory is gone from the instance"))
            continue
        if st.elsewhere and st.exit_code is None:
            # its directory (in a home shared between hosts) says it runs on another host than the one
            # `instance` reaches now: its pid cannot be judged from here (and is never signalled from here).
            # A queued run keeps waiting, saying why (lost could not go back to queued: read from its
            # own host again, it would have stayed lost until it started).
            if state == RunState.QUEUED:
                if run.state_reason != ELSEWHERE:
                    changed.append(store.update_run(run.id, state_reason=ELSEWHERE))
            elif state != RunState.LOST:
                changed.append(store.transition(run.id, RunState.LOST, state_reason=ELSEWHERE))
            elif run.state_reason != ELSEWHERE:
                changed.append(store.update_run(run.id, state_reason=ELSEWHERE))
            continue
        if (state == RunState.QUEUED and run.state_reason == ELSEWHERE and st.alive and not st.started_at
                and st.exit_code is None):  # read from its own host again: still waiting there
            run = store.update_run(run.id, state_reason=WAITING)
            changed.append(run)
        if st.started_at and state in (RunState.QUEUED, RunState.LOST) and (st.alive or st.exit_code is not None):
            # it started (or came back): running first, so the final step below is a legal one
            run = store.transition(run.id, RunState.RUNNING, started_at=st.started_at,
                                   state_reason=CANCELLING if cancelling else "")
            state = RunState.RUNNING
            changed.append(run)
        if st.exit_code is not None:
            final = RunState.SUCCEEDED if st.exit_code == 0 else RunState.CANCELLED if cancelling else RunState.FAILED
            reason = ("" if st.exit_code == 0 else "cancelled by " + store.user if cancelling
                      else f"exit code {st.exit_code}")
            changed.append(store.transition(run.id, final, exit_code=st.exit_code, ended_at=st.ended_at or utcnow(),
                                            last_line=st.last_line or run.last_line, state_reason=reason))
        elif not st.alive and st.pid is not None:
            changed.append(store.transition(
                run.id, RunState.CANCELLED if cancelling else RunState.FAILED, ended_at=utcnow(), last_line=st.last_line,
                state_reason="cancelled by " + store.user if cancelling
                else "the job's process ended without an exit code (killed?)"))
        elif st.last_line and st.last_line != run.last_line:
            # a new log line is status, not history: its status file, not a journal commit
            store.set_status(run.id, last_line=st.last_line)
            run.last_line = st.last_line
            changed.append(run)
    return changed


async def kill_group(transport: Transport, pgid: int, grace_seconds: float = 10.0, *, run_dir: str | None = None) -> str:
    """SIGTERM a process group, wait up to ``grace_seconds`` for it to go, then SIGKILL what is left.

    With ``run_dir``, only where that run directory's ``host`` file names this host and boot (a home
    shared between hosts holds other hosts' runs; a pid from before a reboot is someone else's now).
    Returns ``""`` when it signalled (or there was no host file), ``"other host"`` or ``"other boot"``
    when it left the pid alone."""
    # (dash's kill takes no `--`: a negative pid after the signal names the group.)
    # A member "lives" unless it is a zombie: zombies wait for init, not for us.
    alive = (f"awk '{{sub(/^.*\\) /, \"\"); if ($3 == {pgid} && $1 != \"Z\") found = 1}} END {{exit !found}}' "
             f"/proc/[0-9]*/stat 2>/dev/null")
    guard = ""
    if run_dir:
        hf = shlex.quote(run_dir + "/host")
        guard = (f"{HOST_ID_FN}if [ -r {hf} ]; then hostids; h= b=; read h b < {hf}; "
                 f"[ \"$h\" = \"$HID\" ] || {{ echo 'other host'; exit 0; }}; "
                 f"[ \"$b\" = \"$BOOT\" ] || {{ echo 'other boot'; exit 0; }}; fi; ")
    script = (f"{guard}kill -TERM -{pgid} 2>/dev/null || exit 0; i=0; "
              f"while {alive} && [ $i -lt {int(grace_seconds * 10)} ]; do sleep 0.1; i=$((i+1)); done; "
              f"kill -KILL -{pgid} 2>/dev/null; exit 0")
    res = await transport.run(script, timeout=grace_seconds + 30)
    said = res.text().strip()
    return said if said in ("other host", "other boot") else ""


CANCELLING = "cancelling"  # a run's state_reason while labdeck's cancel is ending its processes
WAITING = "waiting for a free slot on the instance"  # a queued run's state_reason
ELSEWHERE = "its run directory belongs to another host than the instance reaches now"
_ENDED = {"succeeded": "has already succeeded", "failed": "has already failed", "cancelled": "is already cancelled",
          "preempted": "was already preempted"}  # "is already succeeded" is not English


def already_ended(state: str) -> str:
    """How a finished run's state reads after its name: "has already succeeded", "is already cancelled"."""
    return _ENDED.get(state, f"has already ended ({state})")


async def cancel(store: Store, transport: Transport, run: Run, *, grace_seconds: float = 10.0) -> Run:
    """SIGTERM the run's process group, SIGKILL it after ``grace_seconds``, mark it cancelled.

    The pid killed is the one in your own store's record of the run: a teammate's record with the
    same id (and a pid of their choosing) is never what acts."""
    if run.user != store.user:
        raise LabdeckError(f"Run {run.display_name} belongs to {run.user}.", "Only its owner can cancel it.")
    run = store.own_run(run.id)
    if not run.run_state.is_active and run.run_state != RunState.LOST:
        raise LabdeckError(f"Run {run.display_name} {already_ended(run.state)}.")
    # Said first, so that whoever sees the job end meanwhile (a refresh, the follower) records it as
    # cancelled, not as failed by the signal, and this transition does not find it already final.
    store.update_run(run.id, state_reason=CANCELLING)
    if run.pid:
        where = await kill_group(transport, int(run.pid), grace_seconds, run_dir=run.run_dir)
        if where == "other host":
            store.update_run(run.id, state_reason=run.state_reason)
            raise LabdeckError(f"Run {run.display_name} runs on another host than the one {run.instance} reaches now "
                               f"(its run directory, in a home several hosts share, says so): nothing was signalled.",
                               "Point the instance back at the host the run was started on, then cancel it.")
    try:
        return store.transition(run.id, RunState.CANCELLED, ended_at=utcnow(), state_reason="cancelled by " + store.user)
    except StateError:
        now = store.own_run(run.id)
        if now.run_state.is_final:
            return now  # recorded as it ended meanwhile
        raise


async def read_log_tail(transport: Transport, run: Run, max_bytes: int = 64 * 1024) -> str:
    """The last ``max_bytes`` of a run's combined log, decoded leniently."""
    path = f"{run.run_dir}/output.log"
    head = await transport.read_file(path, 0, 0, inside=run.run_dir)
    start = max(0, head.size - max_bytes)
    chunk = await transport.read_file(path, start, max_bytes, inside=run.run_dir)
    return chunk.data.decode("utf-8", "replace")



def read_secrets(names, *, environ: Mapping[str, str] | None = None, prompt=None, interactive: bool | None = None) -> dict[str, str]:
    """The values of the secrets ``names``: each from this process's environment variable of that
    name, else asked for without echo when stdin is a terminal, else a clear error. Values are
    never shown, logged or stored."""
    import getpass
    import sys

    environ = os.environ if environ is None else environ
    interactive = sys.stdin.isatty() if interactive is None else interactive
    ask = prompt or (lambda name: getpass.getpass(f"Value of the secret {name} (not shown): "))
    out: dict[str, str] = {}
    for name in names:
        check_secret_names({name: ""})
        if name in environ:
            out[name] = environ[name]
        elif interactive:
            out[name] = ask(name)
        else:
            raise LabdeckError(f"The secret {name} is not set in your environment, and there is no terminal to ask.",
                               f"Set it first (e.g. `read -rs {name}; export {name}`), then run labdeck again.")
    return out
