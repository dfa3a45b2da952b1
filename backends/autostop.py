"""Autostop: the instance stops itself when idle, with labdeck closed and no cloud credentials on it.

labdeck ships ``backends/runtime/autostop.py`` (stdlib only, Python 3.8+) to
``~/.labdeck/autostop/<host id>/`` on the instance (one directory per host: a home may be shared by
several hosts, :mod:`backends.hostid`; a daemon of the layout before, in ``~/.labdeck/autostop``, is
stopped when the new one starts), writes its ``config.json`` and starts it detached; from
then on the instance decides by itself (see that module for what "idle" means: no labdeck job
running or queued, every GPU under the threshold, no notebook activity, no ``ssh -L`` forward in
use) and runs the action's command when the idle window has passed. labdeck only reads
``state.json`` back (:func:`read_state`) and turns it into a countdown for the UI (:func:`countdown`).

The default command for both actions is ``sudo -n shutdown -h now`` (falling back to a plain
``shutdown`` where the user may run it). A shutdown from inside the VM *stops* or *terminates* it
according to the instance's shutdown behaviour (EC2: ``InstanceInitiatedShutdownBehavior``, which
labdeck sets at launch from the chosen action); on providers that bill stopped instances, or where
that setting does not exist, pass a provider-specific ``command``. ``action`` is what the UI says
("stops in 12m" / "terminates in 12m").

Everything goes through the :class:`~backends.providers.base.Transport` contract, so the same code
works on ``local`` and through a jump chain.
"""

from __future__ import annotations

import hashlib
import json
import math
import posixpath
import shlex
from datetime import datetime, timezone
from pathlib import Path

from . import clock
from .errors import LabdeckError
from .hostid import HOST_ID_FN, host_id
from .models import parse_time_lenient
from .providers.base import Transport, detached_launcher

AUTOSTOP_DIR = "~/.labdeck/autostop"  # on the instance; "~" is the instance user's home
SCRIPT_SOURCE = (Path(__file__).parent / "runtime" / "autostop.py").read_bytes()
SCRIPT_VERSION = hashlib.sha256(SCRIPT_SOURCE).hexdigest()[:12]  # == the daemon's own "version"
ACTIONS = ("stop", "terminate")
DEFAULT_COMMANDS: dict[str, list[str]] = {
    "stop": ["sh", "-c", "sudo -n shutdown -h now || shutdown -h now"],
    "terminate": ["sh", "-c", "sudo -n shutdown -h now || shutdown -h now"],
}
STALE_FLOOR_SECONDS = 10.0  # "stale" needs at least this much silence (clock skew, a slow read)
START_WAIT_SECONDS = 3.0  # how long ensure() waits for a new daemon's first state


async def autostop_base(transport: Transport) -> str:
    """``AUTOSTOP_DIR`` resolved on the instance (an absolute path): the hosts' directories are in it."""
    home = (await transport.home_dir()).rstrip("/") or "/"
    return posixpath.join(home, AUTOSTOP_DIR[2:])


async def autostop_dir(transport: Transport, hid: str | None = None) -> str:
    """This host's autostop directory, ``<AUTOSTOP_DIR>/<host id>`` (an absolute path)."""
    return posixpath.join(await autostop_base(transport), hid or (await host_id(transport))[0])


def default_command(action: str) -> list[str]:
    if action not in DEFAULT_COMMANDS:
        raise LabdeckError(f"Unknown autostop action {action!r}.", f"Use one of: {', '.join(ACTIONS)}.")
    return list(DEFAULT_COMMANDS[action])


async def ensure(transport: Transport, *, idle_minutes: float, action: str = "stop", command: list[str] | None = None,
                 interval: float = 30, gpu_source: str = "nvidia-smi", python: str = "python3") -> dict:
    """Install the autostop script and its config on the instance and start it unless it runs.

    The running daemon re-reads ``config.json`` every ``interval`` seconds, so calling this again
    with other settings changes them in place (a new script version replaces the old daemon).
    ``idle_minutes <= 0`` installs it disabled. Returns the daemon's state (see
    :func:`read_state`), or, when a new daemon has not written one yet, a fresh-start dict with
    its ``pid`` and ``"starting": True``."""
    if action not in ACTIONS:
        raise LabdeckError(f"Unknown autostop action {action!r}.", f"Use one of: {', '.join(ACTIONS)}.")
    hid, boot = await host_id(transport)
    old = await autostop_base(transport)
    d = await autostop_dir(transport, hid)
    cmd = list(command) if command else default_command(action)
    config = {"idle_minutes": float(idle_minutes), "enabled": idle_minutes > 0, "action": action, "command": cmd,
              "interval": float(interval), "runs_root": await transport.runs_root(), "gpu_threshold": 5,
              "gpu_source": gpu_source, "host_id": hid, "boot_id": boot}
    await transport.put_files({f"{d}/autostop.py": SCRIPT_SOURCE,
                               f"{d}/config.json": (json.dumps(config, indent=1) + "\n").encode()})
    qd = shlex.quote(d)
    launcher = shlex.join(detached_launcher(f"exec {shlex.quote(python)} {shlex.quote(d + '/autostop.py')} --dir {qd}",
                                            f"{d}/daemon.out"))
    polls = int(START_WAIT_SECONDS / 0.05)
    # one round trip: is a daemon of this version running (pid in the lock, alive, not a zombie, really
    # autostop.py)? An older version is replaced. Else start one and wait for its first state.
    script = (
        f"D={qd}; "
        "alive() { [ -n \"$1\" ] && [ -r /proc/$1/stat ] && [ \"$(sed 's/^.*) //' /proc/$1/stat | cut -d' ' -f1)\" != Z ] "
        "&& tr '\\0' ' ' < /proc/$1/cmdline 2>/dev/null | grep -q autostop.py; }; "
        # a daemon of the layout before per-host directories (its --dir is the base): stopped, on this host only
        f"O={shlex.quote(old)}; p=$(cat \"$O/lock\" 2>/dev/null); "
        "if alive \"$p\" && tr '\\0' '\\n' < /proc/$p/cmdline 2>/dev/null | grep -qxF \"$O\"; then kill \"$p\" 2>/dev/null; fi; "
        "p=$(cat \"$D/lock\" 2>/dev/null); "
        f"if alive \"$p\" && [ \"$(cat \"$D/daemon.version\" 2>/dev/null)\" != {SCRIPT_VERSION} ]; then "
        "kill \"$p\" 2>/dev/null; i=0; while alive \"$p\" && [ $i -lt 50 ]; do sleep 0.05; i=$((i+1)); done; fi; "
        "if alive \"$p\"; then echo running \"$p\"; exit 0; fi; "
        f": > \"$D/daemon.out\"; p=$({launcher}); echo started \"$p\"; "
        f"i=0; while [ $i -lt {polls} ] && ! grep -q \"\\\"pid\\\": $p,\" \"$D/state.json\" 2>/dev/null; do "
        "[ -d /proc/$p ] || break; sleep 0.05; i=$((i+1)); done; "
        "[ -d /proc/$p ] || { echo dead; cat \"$D/daemon.out\" 2>/dev/null | tail -c 1500; }"
    )
    res = await transport.run(script, timeout=30)
    words = res.text().split()
    if not res.ok or len(words) < 2 or words[0] not in ("running", "started") or not words[1].isdigit():
        raise LabdeckError(f"Could not start autostop on {transport.instance}: "
                           f"{(res.stderr.decode(errors='replace') or res.text()).strip()[:500]}")
    pid = int(words[1])
    if words[0] == "started" and len(words) > 2 and words[2] == "dead":
        state = await read_state(transport)
        if state is None or state.get("pid") != pid:
            detail = res.text().split("dead", 1)[1].strip()
            raise LabdeckError(f"Autostop exited at once on {transport.instance}: {detail[-500:] or 'no output'}",
                               f"It needs {python} (3.8+) on the instance.")
    state = await read_state(transport)
    if state is not None and state.get("pid") == pid:
        return state
    return {"pid": pid, "starting": True, "enabled": config["enabled"], "idle_minutes": config["idle_minutes"],
            "action": action, "interval": config["interval"], "idle_since": None, "deadline": None, "busy": [],
            "fired_at": None, "updated_at": None}


async def read_state(transport: Transport) -> dict | None:
    """The daemon's ``state.json``: ``pid``, ``version``, ``updated_at``, ``enabled``, ``idle_minutes``,
    ``action``, ``interval``, ``idle_since`` and ``deadline`` (UTC ISO, null while busy), ``busy``
    (reasons, e.g. ``"job 01H…"``, ``"gpu 0: 37%"``, ``"notebook :8888"``, ``"forward :8080"``),
    ``fired_at``, ``error``, ``attempts``, ``forward_check``. None when there is none or it cannot
    be parsed (never raises for its content; a transport failure does raise)."""
    base = await autostop_base(transport)
    # (no host id: no directory; the base itself holds the state of the layout before)
    res = await transport.run(f"{HOST_ID_FN}hostids; [ ${{#HID}} -eq 16 ] && "
                              f"cat {shlex.quote(base)}/\"$HID\"/state.json 2>/dev/null; true", timeout=15)
    try:
        state = json.loads(res.stdout.decode("utf-8", "replace"))
    except ValueError:
        return None
    return state if isinstance(state, dict) else None


async def disable(transport: Transport) -> None:
    """Turn autostop off on the instance (``enabled: false`` in its config: the daemon stays, says
    "off" and never fires; :func:`ensure` turns it on again)."""
    d = await autostop_dir(transport)
    res = await transport.run(f"cat {shlex.quote(d + '/config.json')} 2>/dev/null; true", timeout=15)
    try:
        config = json.loads(res.stdout.decode("utf-8", "replace"))
        if not isinstance(config, dict):
            raise ValueError
    except ValueError:
        if not res.stdout.strip():
            return  # never set up: nothing to turn off
        config = {}
    config["enabled"] = False
    await transport.put_files({f"{d}/config.json": (json.dumps(config, indent=1) + "\n").encode()})


def _span(seconds: float) -> str:
    s = max(0, math.ceil(seconds))
    if s < 60:
        return f"{s}s"
    m = math.ceil(s / 60)
    if m < 60:
        return f"{m}m"
    h, m = divmod(s // 60, 60)
    return f"{h}h{m:02d}m"


def countdown(state: dict | None, now: datetime | float | None = None) -> str:
    """Human text for the UI: ``"stops in 12m"``, ``"terminates in 45s"``, ``"busy: job 01H.."``,
    ``"off"``, ``"stopping…"`` (fired), ``"stop failed, retry in 3m"``, ``"stale"`` (the daemon has
    not written for 3 intervals, and at least 10 s: it died, or the instance is going down).
    ``now``: a datetime or epoch seconds (default: now, UTC)."""
    if not state or not isinstance(state, dict):
        return "off"
    if isinstance(now, (int, float)):
        now = datetime.fromtimestamp(now, timezone.utc)
    now = now or clock.now()
    if now.tzinfo is None:
        now = now.replace(tzinfo=timezone.utc)
    action = state.get("action") or "stop"
    verb = "terminates" if action == "terminate" else "stops"
    if state.get("starting"):
        return "starting"
    if state.get("enabled") is False:
        return "off"
    fired = parse_time_lenient(state.get("fired_at"))
    if fired is not None and not state.get("error"):
        return "terminating…" if action == "terminate" else "stopping…"
    try:
        interval = float(state.get("interval") or 30)
    except (TypeError, ValueError):
        interval = 30.0
    updated = parse_time_lenient(state.get("updated_at"))
    if updated is None or (now - updated).total_seconds() > max(3 * interval, STALE_FLOOR_SECONDS):
        return "stale"
    busy = [str(b) for b in (state.get("busy") or [])]
    if busy:
        return "busy: " + busy[0] + (f" (+{len(busy) - 1})" if len(busy) > 1 else "")
    deadline = parse_time_lenient(state.get("deadline"))
    if deadline is None:
        return "off"
    left = (deadline - now).total_seconds()
    if state.get("error"):
        return f"{'terminate' if action == 'terminate' else 'stop'} failed, retry in {_span(left)}"
    if left <= 0:
        return f"{verb} now"
    return f"{verb} in {_span(left)}"
