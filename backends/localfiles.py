"""Local files whose names come from records: validated parts, confined under a root, no symlinks.

A record in the team directory is a file a teammate wrote, so its ``user`` and ``id`` are
untrusted text. Every local path labdeck derives from them (the log copy, the metrics copy,
TensorBoard copies) is built here: each part must match its grammar, the result must stay
under its root after resolving, and files are opened with ``O_NOFOLLOW`` and private modes,
so a record can neither steer a write outside the cache nor make labdeck write through a link.
Reads of run files on this machine (:func:`read_regular`) open regular files only, never
through a symlink and never blocking on a FIFO, and read a bounded amount.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from pathlib import Path

from .errors import LabdeckError, TransportError
from .ids import describe, is_id, is_user_name

MAX_READ = 64 << 20  # the most one read_file call returns, whatever the caller asks


class UnsafePath(LabdeckError):
    """A record names a local path labdeck refuses to build (bad user or id, or it leaves its root)."""


class RefusedFile(TransportError):
    """A run file that is a symlink, not a regular file, or named with ``..``: refused, not read."""


def confined(root: Path, *parts: str) -> Path:
    """``root / parts...``, refused unless the result, resolved, is still under ``root`` resolved.

    The parts were checked by the caller's grammar already; this is the second lock: whatever a
    part holds (``..``, an absolute path, a link planted in the tree), nothing lands outside."""
    for p in parts:
        if not p or "/" in p or "\0" in p or p in (".", ".."):
            raise UnsafePath(f"Refusing the local path part {p!r}: not a plain file name.")
    base = Path(root).resolve()
    path = base.joinpath(*parts)
    if not path.resolve().is_relative_to(base):
        raise UnsafePath(f"Refusing {path}: it is outside {base}.")
    return path


def run_cache_path(root: Path, user: str, run_id: str, suffix: str) -> Path:
    """``<root>/<user>/<run id><suffix>``, from a validated user name and id only."""
    if not is_user_name(user):
        raise UnsafePath(f"Refusing a run whose user is {describe(user)}: not a user name.")
    if not isinstance(run_id, str) or not is_id(run_id):
        raise UnsafePath(f"Refusing a run whose id is {describe(run_id)}: not a labdeck id.")
    return confined(root, user, run_id.upper() + suffix)


def private_dirs(path: Path) -> None:
    """Create ``path``'s missing parents 0700 (a cache of teammates' files is for you only)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)


def open_private(path: Path, flags: int, what: str = "the local copy") -> int:
    """An fd on ``path`` opened with ``flags`` (plus O_CREAT), created 0600 in 0700 directories, never
    through a symlink; only a regular file of ours. A looser mode (older labdeck) is tightened to 0600."""
    private_dirs(path)
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise UnsafePath(f"Cannot open {what} {path} ({e.strerror}); it may be a link.") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        os.close(fd)
        raise UnsafePath(f"Refusing {what} {path}: not a regular file of yours.")
    if st.st_mode & 0o077:
        os.fchmod(fd, 0o600)
    return fd


def open_private_append(path: Path) -> int:
    """An O_APPEND fd on ``path`` (see :func:`open_private`)."""
    return open_private(path, os.O_WRONLY | os.O_APPEND)


def write_private(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically: a 0600 temporary file beside it (named for this
    process and thread, opened without following a link), then a rename. Never half-written."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600), "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def no_links_below(path: str, inside: str) -> list[str]:
    """The directories from ``inside`` down to ``path``'s parent (``inside`` included), for the caller
    to lstat (here :func:`_check_dirs`; over SFTP ``SSHTransport.read_file``) and refuse a symbolic
    link among. A ``path`` that is not below ``inside`` raises :class:`RefusedFile`."""
    base = inside.rstrip("/") or "/"
    if not path.startswith(base + "/") or ".." in path.split("/"):
        raise RefusedFile(f"Refusing to read {path!r}: it is not inside {base!r}.")
    dirs = [base]
    for part in path[len(base) + 1:].split("/")[:-1]:
        if part in ("", "."):
            continue
        dirs.append(f"{dirs[-1]}/{part}")
    return dirs


def _check_dirs(path: str, inside: str) -> None:
    for d in no_links_below(path, inside):
        st = os.lstat(d)  # (a directory that is not there: FileNotFoundError, "no file" to the caller)
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
            raise RefusedFile(f"Refusing to read {path}: {d} is "
                              + ("a symbolic link." if stat.S_ISLNK(st.st_mode) else "not a directory."))


def read_regular(path: str, offset: int = 0, max_bytes: int = 1 << 20, *, inside: str | None = None) -> tuple[bytes, int]:
    """(at most ``max_bytes`` from ``offset``, size) of a regular file, opened without following a
    final symlink and without blocking (a FIFO planted as ``output.log`` is refused, not waited on).

    ``..`` in the path is refused too: a run file is named below its run directory, never above."""
    if "\0" in path or ".." in path.split("/"):
        raise RefusedFile(f"Refusing to read {path!r}: a run file's path has no '..'.")
    if inside is not None:
        _check_dirs(path, inside)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as e:
        if e.errno == errno.ELOOP:  # the last component is a symlink
            raise RefusedFile(f"Refusing to read {path}: it is a symbolic link.") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RefusedFile(f"Refusing to read {path}: not a regular file.")
        n = max(0, min(int(max_bytes), MAX_READ))
        data = os.pread(fd, n, max(0, int(offset))) if n else b""
        return data, st.st_size
    finally:
        os.close(fd)
