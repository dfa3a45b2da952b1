"""Jobs: commands run detached on an instance, in a run directory that holds
everything needed to find them again.

A run directory (``<runs root>/<run id>/``) holds::

    command.sh   the command, with its environment exported
    run.sh       the wrapper: records pid, start/end time and exit code
    pid          the wrapper's pid == the job's process-group id
    started_at   ended_at   exit_code     (UTC times; exit code written atomically)
    output.log   stdout and stderr, combined

The job runs in its own session with stdin closed, so it survives labdeck, the
SSH connection and the jump host. ``refresh`` reads the run directories back
(in one command per instance) and moves runs through the state machine.
Everything here goes through the Transport contract, so it is the same on
``local`` and on a remote host.
"""

from __future__ import annotations

import base64
import shlex
from dataclasses import dataclass
from typing import Mapping

from .errors import LabdeckError
from .models import Run, RunState, utcnow
from .providers.base import Transport
from .store import Store

WRAPPER = """#!/bin/sh
# labdeck run wrapper (run {run_id}); records pid, times and exit code.
D={run_dir}
echo $$ > "$D/pid.tmp" && mv "$D/pid.tmp" "$D/pid"
date -u +%Y-%m-%dT%H:%M:%SZ > "$D/started_at.tmp" && mv "$D/started_at.tmp" "$D/started_at"
# SIGTERM/SIGINT/SIGHUP to the process group stop the job; the wrapper stays to record how it ended.
trap ':' TERM INT HUP
if cd {workdir}; then
  sh "$D/command.sh" >> "$D/output.log" 2>&1 < /dev/null
  code=$?
else
  echo "labdeck: cannot enter the working directory {workdir}" >> "$D/output.log"
  code=127
fi
date -u +%Y-%m-%dT%H:%M:%SZ > "$D/ended_at.tmp" && mv "$D/ended_at.tmp" "$D/ended_at"
echo $code > "$D/exit_code.tmp" && mv "$D/exit_code.tmp" "$D/exit_code"
"""

# One command reports every run directory: id, exit code, pid, alive, started, last line (base64).
STATUS_SCRIPT = r"""
for d in "$@"; do
  pid=$(cat "$d/pid" 2>/dev/null)
  alive=0
  if [ -n "$pid" ] && [ -r "/proc/$pid/stat" ]; then
    # a zombie is not alive (on Linux, read the state; elsewhere, fall back to kill -0)
    [ "$(sed 's/^.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1)" != Z ] && alive=1
  elif [ -n "$pid" ] && [ ! -d /proc/self ] && kill -0 "$pid" 2>/dev/null; then
    alive=1
  fi
  ec=$(cat "$d/exit_code" 2>/dev/null)  # read after the liveness check: a job that ended in between has it
  st=$(cat "$d/started_at" 2>/dev/null); en=$(cat "$d/ended_at" 2>/dev/null)
  last=$(tail -c 4096 "$d/output.log" 2>/dev/null | tr '\r' '\n' | grep -av '^[[:space:]]*$' | tail -n 1 | cut -c1-300 | base64 | tr -d '\n')
  [ -d "$d" ] && ex=1 || ex=0
  printf '%s %s %s %s %s %s %s %s\n' "$d" "$ex" "${ec:--}" "${pid:--}" "$alive" "${st:--}" "${en:--}" "${last:--}"
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
        if len(parts) != 8:
            continue
        d, ex, ec, pid, alive, st, en, last = parts
        try:
            text = base64.b64decode(last).decode("utf-8", "replace").strip() if last != "-" else ""
        except ValueError:
            text = ""
        out[d] = RunStatus(
            d, ex == "1", int(ec) if _opt(ec) and ec.lstrip("-").isdigit() else None,
            int(pid) if _opt(pid) and pid.isdigit() else None, alive == "1", _opt(st), _opt(en), text,
        )
    return out


async def launch(store: Store, transport: Transport, *, instance: str, command: str, workdir: str,
                 runs_root: str, env: Mapping[str, str] | None = None, name: str = "", parent: str | None = None,
                 price_per_hour: float = 0.0) -> Run:
    """Record a run, write its run directory and start it detached. Returns the running run."""
    if not command.strip():
        raise LabdeckError("The command is empty.", "Give the command to run, e.g. `python train.py`.")
    if parent:
        parent = store.find_run(parent).id
    run = Run(command=command, instance=instance, name=name, workdir=workdir, env=dict(env or {}),
              parent=parent, price_per_hour=price_per_hour)
    run.run_dir = f"{runs_root.rstrip('/')}/{run.id}"
    store.add(run)
    full_env = {"LABDECK_RUN_ID": run.id, "LABDECK_RUN_DIR": run.run_dir, **run.env}
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in full_env.items() if k.isidentifier())
    try:
        await transport.put_files({
            f"{run.run_dir}/command.sh": (exports + command + "\n").encode(),
            f"{run.run_dir}/run.sh": WRAPPER.format(run_id=run.id, run_dir=shlex.quote(run.run_dir),
                                                    workdir=shlex.quote(workdir)).encode(),
        }, mode=0o755)
        pid = await transport.start_detached(f"exec sh {shlex.quote(run.run_dir + '/run.sh')}", cwd=None)
    except LabdeckError as e:
        store.transition(run.id, RunState.FAILED, state_reason=f"could not start: {e}", ended_at=utcnow())
        raise
    return store.transition(run.id, RunState.RUNNING, pid=pid, started_at=utcnow())


async def refresh(store: Store, transport: Transport, instance: str, mine: list[Run] | None = None) -> list[Run]:
    """Read back this user's active runs on ``instance`` and move their states. Returns changed runs.

    ``mine``: this user's runs if the caller already loaded them."""
    if mine is None:
        mine, _ = store.runs(team=False)
    active = [r for r in mine if r.instance == instance and r.run_state in (RunState.RUNNING, RunState.LOST) and r.run_dir]
    statuses = await read_statuses(transport, [r.run_dir for r in active])
    changed: list[Run] = []
    for run in active:
        st = statuses.get(run.run_dir)
        if st is None:
            continue
        if st.exit_code is not None:
            state = RunState.SUCCEEDED if st.exit_code == 0 else RunState.FAILED
            reason = "" if st.exit_code == 0 else f"exit code {st.exit_code}"
            if run.state == RunState.CANCELLED.value:
                continue
            changed.append(store.transition(run.id, state, exit_code=st.exit_code, ended_at=st.ended_at or utcnow(),
                                            last_line=st.last_line or run.last_line, state_reason=reason))
        elif not st.exists:
            if run.state != RunState.LOST.value:
                changed.append(store.transition(run.id, RunState.LOST, state_reason="run directory is gone from the instance"))
        elif not st.alive and st.pid is not None:
            changed.append(store.transition(run.id, RunState.FAILED, ended_at=utcnow(), last_line=st.last_line,
                                            state_reason="the job's process ended without an exit code (killed?)"))
        elif st.last_line and st.last_line != run.last_line:
            changed.append(store.update_run(run.id, last_line=st.last_line))
    return changed


async def cancel(store: Store, transport: Transport, run: Run, *, grace_seconds: float = 10.0) -> Run:
    """SIGTERM the run's process group, SIGKILL it after ``grace_seconds``, mark it cancelled."""
    if run.user != store.user:
        raise LabdeckError(f"Run {run.display_name} belongs to {run.user}.", "Only its owner can cancel it.")
    if not run.run_state.is_active and run.run_state != RunState.LOST:
        raise LabdeckError(f"Run {run.display_name} is already {run.state}.")
    if run.pid:
        pg = int(run.pid)
        # (dash's kill takes no `--`: a negative pid after the signal names the group.)
        # A member "lives" unless it is a zombie: zombies wait for init, not for us.
        alive = (f"awk '{{sub(/^.*\\) /, \"\"); if ($3 == {pg} && $1 != \"Z\") found = 1}} END {{exit !found}}' "
                 f"/proc/[0-9]*/stat 2>/dev/null")
        script = (f"kill -TERM -{pg} 2>/dev/null || exit 0; i=0; "
                  f"while {alive} && [ $i -lt {int(grace_seconds * 10)} ]; do sleep 0.1; i=$((i+1)); done; "
                  f"kill -KILL -{pg} 2>/dev/null; exit 0")
        await transport.run(script, timeout=grace_seconds + 30)
    return store.transition(run.id, RunState.CANCELLED, ended_at=utcnow(), state_reason="cancelled by " + store.user)


async def read_log_tail(transport: Transport, run: Run, max_bytes: int = 64 * 1024) -> str:
    """The last ``max_bytes`` of a run's combined log, decoded leniently."""
    path = f"{run.run_dir}/output.log"
    head = await transport.read_file(path, 0, 0)
    start = max(0, head.size - max_bytes)
    chunk = await transport.read_file(path, start, max_bytes)
    return chunk.data.decode("utf-8", "replace")

