"""Which host a file under a (possibly shared) home belongs to.

Labs mount one home directory on every node (NFS), so ``~/.labdeck/runs`` is the same directory
on all of them. Everything in it that describes *one machine's* processes is therefore keyed by a
**host id**, and a pid is only ever judged alive as ``(host id, boot id, pid)``:

* queues: ``<runs root>/.hosts/<host id>/queue`` (jobs) and ``.../queue-<kind>`` (notebooks, ...);
  a ticket holds ``<pid> <host id> <boot id>``;
* a run directory's ``host`` file (``<host id> <boot id>``, written by the wrapper before ``pid``):
  its pid is checked only where both match;
* the monitoring agent: ``~/.labdeck/agent/<host id>/``; autostop: ``~/.labdeck/autostop/<host id>/``.

The host id is computed *on the host* by one shell function (:data:`HOST_ID_FN`), and passed to
the programs labdeck starts there (the wrapper's ``HID``, the agent's ``--out``, autostop's
``config.json``): none of them works it out for itself. It is the first 16 hex digits of the
SHA-256 of the machine id (``/etc/machine-id``), the network-namespace and pid-namespace inodes
of the shell (``/proc/$$/ns/{net,pid}``), and only where none of those exists, the host name:

* not the name labdeck reaches the host by (two aliases of one host are one host);
* stable for as long as the machine (or container) is up, and across reboots;
* distinct for containers and namespaces on one kernel (they share a machine id but not their
  namespaces; the test rig's nodes are network namespaces of one machine);
* a machine id cloned across VM images gives two hosts one id (the same directories, as before
  this change), but never a wrong liveness answer: the boot id (``/proc/sys/kernel/random/boot_id``,
  random per kernel boot) is part of every liveness check, and also makes a pid file that outlived
  a reboot dead.

(The alternative, the SSH host key labdeck verified, costs no round trip but is shared by every
container of an image that baked its keys in, differs per sshd on one machine, and does not exist
for ``local``; a pid namespace is what a pid means something in, and that is what is hashed here.)
"""

from __future__ import annotations

import posixpath
import re
import shlex

from .errors import LabdeckError
from .providers.base import Transport

# Defines `hostids` (sets HID, this host's id, and BOOT, this kernel's boot id -- in the calling
# shell: no command substitution, few processes, as it runs in every status read) and `hostid`
# (prints HID). The namespace inodes are the shell's own (/proc/$$).
HOST_ID_FN = r"""hostids() {
  _hm=; read -r _hm 2>/dev/null < /etc/machine-id || read -r _hm 2>/dev/null < /var/lib/dbus/machine-id
  _hn=$(stat -L -c %i /proc/$$/ns/net /proc/$$/ns/pid 2>/dev/null)
  [ -n "$_hm$_hn" ] || _hm=$(uname -n)
  HID=$(printf '%s\n%s\n' "$_hm" "$_hn" | { sha256sum 2>/dev/null || shasum -a 256; })
  HID=${HID%"${HID#????????????????}"}
  BOOT=; read -r BOOT 2>/dev/null < /proc/sys/kernel/random/boot_id || BOOT=$(sysctl -n kern.boottime 2>/dev/null)
  case $BOOT in *[!0-9a-zA-Z-]*) BOOT=$(printf %s "$BOOT" | tr -dc 0-9);; esac
  [ -n "$BOOT" ] && [ ${#BOOT} -le 64 ] || BOOT=unknown
}
hostid() { hostids; printf '%s\n' "$HID"; }
"""

_ID = re.compile(r"[0-9a-f]{16}")
_BOOT = re.compile(r"[0-9A-Za-z-]{1,64}")


def check_host_id(text: str, instance: str = "the instance") -> str:
    """``text`` if it is a host id (16 hex digits), else a clear error (it goes into paths)."""
    text = text.strip()
    if not _ID.fullmatch(text):
        raise LabdeckError(f"Could not work out the host id of {instance} (got {text[:40]!r}).",
                           "labdeck needs sha256sum (or shasum) and /bin/sh there.")
    return text


def check_boot_id(text: str) -> str:
    text = text.strip()
    return text if _BOOT.fullmatch(text) else "unknown"


async def host_id(transport: Transport) -> tuple[str, str]:
    """(host id, boot id) of the host ``transport`` reaches: one round trip."""
    res = await transport.run("sh -c " + shlex.quote(HOST_ID_FN + 'hostids; printf "%s\\n%s\\n" "$HID" "$BOOT"'), timeout=30)
    lines = res.text().split()
    if not res.ok or len(lines) < 2:
        raise LabdeckError(f"Could not work out the host id of {transport.instance}: "
                           f"{(res.stderr.decode(errors='replace') or res.text()).strip()[:200]}")
    return check_host_id(lines[0], transport.instance), check_boot_id(lines[1])


def host_state_dir(runs_root: str, hid: str) -> str:
    """Where one host's queues live under a runs root: ``<runs root>/.hosts/<host id>``."""
    return posixpath.join(runs_root.rstrip("/") or "/", ".hosts", check_host_id(hid))


def queue_name(run_kind: str) -> str:
    """``queue`` for jobs (the FIFO with slots); ``queue-<kind>`` for services, which take no slot."""
    return "queue" if run_kind == "job" else f"queue-{run_kind}"
