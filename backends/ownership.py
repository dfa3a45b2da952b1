"""Acting on someone else's run (serve, notebook) with only your own files.

A teammate's run directory holds files they wrote: ``env.sh`` (sourced, it runs their shell code
as you), the ``environment.executable`` their record names (any program), their code (which
they can change after you looked). So on a run that is not yours, labdeck copies the run's
recorded code into a directory of yours, picks the interpreter itself and sources nothing of
theirs. A run is yours when its record says so *and* its run directory is where your labdeck
puts your runs on that instance: a record claiming your name cannot point you at their files.
"""

from __future__ import annotations

import posixpath
import shlex
import sys

from .errors import LabdeckError
from .models import Run
from .providers.base import Transport


def is_own_run(ws, run: Run, runs_root: str) -> bool:
    """The run is this user's and lives in this user's runs directory on the instance."""
    return run.user == ws.user and bool(run.run_dir) and run.run_dir == f"{runs_root.rstrip('/')}/{run.id}"


def own_python(instance: str) -> str:
    """Your interpreter, not one a record names: this labdeck's Python here, ``python3`` on a host."""
    return sys.executable if instance == "local" else "python3"


def safe_rel(path: str, what: str) -> str:
    """A path inside a run directory: relative, no ``..``, no NUL."""
    if not path or path.startswith("/") or "\0" in path or ".." in path.split("/"):
        raise LabdeckError(f"{what} {path!r} must be a path inside the run directory.")
    return posixpath.normpath(path)


def _run_dir(run: Run) -> str:
    d = run.run_dir or ""
    if not d.startswith("/") or "\0" in d or ".." in d.split("/"):
        raise LabdeckError(f"The record of {run.display_name} names no usable run directory ({d!r}).")
    return d.rstrip("/")


async def copy_code(transport: Transport, run: Run, dest: str) -> str:
    """Copy the run's recorded code (its run directory's ``code`` copy; a run without a snapshot:
    its working directory) into ``dest``/code, a directory of yours (0700). Returns the directory
    the run's command ran in, inside the copy. Symbolic links are copied as links, not followed."""
    subdir = run.code.get("subdir", "") if run.code else ""
    if subdir:
        subdir = safe_rel(str(subdir), "The code directory")
    src = f"{_run_dir(run)}/code" if run.code else (run.workdir or "")
    if not src.startswith("/") or ".." in src.split("/"):
        raise LabdeckError(f"{run.display_name} has no code copy labdeck can use ({src!r}).")
    q, qd = shlex.quote(src), shlex.quote(f"{dest}/code")
    res = await transport.run(f"umask 077 && [ -d {q} ] && mkdir -p {qd} && chmod 700 {shlex.quote(dest)} "
                              f"&& cp -R -P -- {q}/. {qd}/ && rm -f {qd}/.labdeck-manifest.json", timeout=600)
    if not res.ok:
        raise LabdeckError(f"Could not copy the code of {run.display_name} ({run.user}'s run) on {transport.instance}: "
                           f"{res.stderr.decode(errors='replace').strip()[:300] or 'it is not readable to you'}.",
                           "Its owner can serve it, or share the code with you; nothing was started.")
    return posixpath.normpath(f"{dest}/code/{subdir}") if subdir else f"{dest}/code"


async def copy_file(transport: Transport, run: Run, rel: str, dest_dir: str) -> str:
    """Copy one regular file of the run directory (not a link, not a FIFO) into ``dest_dir`` (0700)."""
    rel = safe_rel(rel, "The file")
    src = shlex.quote(f"{_run_dir(run)}/{rel}")
    out = f"{dest_dir}/{posixpath.basename(rel)}"
    res = await transport.run(f"umask 077 && mkdir -p {shlex.quote(dest_dir)} && [ -f {src} ] && [ ! -L {src} ] "
                              f"&& cp -- {src} {shlex.quote(out)}", timeout=600)
    if not res.ok:
        raise LabdeckError(f"Could not copy {rel} of {run.display_name} ({run.user}'s run) on {transport.instance}: "
                           "it is missing, not a regular file, or not readable to you.", "Nothing was started.")
    return out
