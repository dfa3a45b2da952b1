"""Code snapshots and incremental sync to an instance.

**Snapshot.** Inside a git repository: every tracked file as it is in the work
tree plus every untracked file that .gitignore does not exclude, with the HEAD
commit and ``git diff HEAD`` recorded. Outside one: the directory tree, minus
``.git``, ``__pycache__``, virtualenvs and ``node_modules``. Files are hashed
(sha256), with a cache keyed by (path, size, mtime) so an unchanged tree is not
read again.

**Sync.** Each instance keeps a mirror per project
(``<runs root>/../code/<project key>/``) with a manifest of what it holds.
Only files whose hash differs from the manifest travel, as tar batches over the
transport's one connection; removed files are deleted; then the run gets its
own copy (``<run dir>/code``), so later syncs never change a running job's code.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import shlex
import stat
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .errors import LabdeckError
from .providers.base import Transport

MANIFEST = ".labdeck-manifest.json"
SKIP_DIRS = {".git", "__pycache__", ".venv", "venv", "node_modules", ".mypy_cache", ".pytest_cache", ".hypothesis"}
MAX_FILES = 50_000
BATCH_BYTES = 8 << 20
MAX_DIFF_BYTES = 1 << 20

Progress = Callable[[str, int, int], None]  # (phase, done, total)


@dataclass
class Snapshot:
    root: Path  # the repository (or directory) root
    files: dict[str, tuple[str, int]]  # relative posix path -> (sha256, mode)
    sizes: dict[str, int]
    commit: str | None = None
    dirty: bool = False
    diff: str = ""
    diff_truncated: bool = False
    untracked: list[str] = field(default_factory=list)
    is_git: bool = False

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes.values())

    def project_key(self, user: str, host: str) -> str:
        return hashlib.sha1(f"{user}@{host}:{self.root}".encode()).hexdigest()[:16]


# A repository's own config can name programs that git runs: an external diff or textconv driver,
# an fsmonitor hook, a pager, a transport for a lazy fetch of a partial clone. labdeck runs git to
# read, in your trees and (for lineage diffs) in trees a teammate's record names, so every call
# turns those off; command-line ``-c`` wins over any config file. (Clean/smudge filters run only
# for work-tree files: labdeck never asks git about the work tree of a tree it does not own.)
GIT_SAFE = ("-c", "core.fsmonitor=false", "-c", "core.pager=cat", "-c", "protocol.allow=never",
            "-c", "diff.external=", "-c", "core.hooksPath=/dev/null")


def git(root: str | Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``git -C root ARGS`` with :data:`GIT_SAFE`; ``diff`` also without external drivers or textconv."""
    if args and args[0] == "diff":
        args = ("diff", "--no-ext-diff", "--no-textconv", *args[1:])
    return subprocess.run(["git", *GIT_SAFE, "-C", str(root), *args], capture_output=True, check=check,
                          stdin=subprocess.DEVNULL)


class HashCache:
    """sha256 per file, reused while (size, mtime) are unchanged."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.data: dict[str, list] = {}
        self.changed = False
        if path and path.exists():
            try:
                self.data = json.loads(path.read_text())
            except (OSError, ValueError):
                self.data = {}

    def sha(self, p: Path, st: os.stat_result) -> str:
        key = str(p)
        hit = self.data.get(key)
        if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            return hit[2]
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        digest = h.hexdigest()
        self.data[key] = [st.st_size, st.st_mtime_ns, digest]
        self.changed = True
        return digest

    def save(self) -> None:
        if self.path and self.changed:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data))
            os.replace(tmp, self.path)


def snapshot(directory: str | os.PathLike, cache_path: Path | None = None) -> Snapshot:
    """Snapshot the code around ``directory`` (its git repository, or the directory itself)."""
    directory = Path(directory).resolve()
    if not directory.is_dir():
        raise LabdeckError(f"{directory} is not a directory.")
    cache = HashCache(cache_path)
    top = git(directory, "rev-parse", "--show-toplevel", check=False)
    if top.returncode == 0:
        root = Path(top.stdout.decode().strip())
        listed = git(root, "ls-files", "-z", "--cached", "--others", "--exclude-standard").stdout.decode("utf-8", "surrogateescape")
        names = sorted({n for n in listed.split("\0") if n})
        untracked = [n for n in git(root, "ls-files", "-z", "--others", "--exclude-standard").stdout.decode(
            "utf-8", "surrogateescape").split("\0") if n]
        head = git(root, "rev-parse", "HEAD", check=False)
        commit = head.stdout.decode().strip() if head.returncode == 0 else None
        diff_bytes = git(root, "diff", "HEAD", check=False).stdout if commit else b""
        snap = Snapshot(root, {}, {}, commit=commit, untracked=untracked, is_git=True)
        snap.dirty = bool(diff_bytes) or bool(untracked)
        if len(diff_bytes) > MAX_DIFF_BYTES:
            diff_bytes = diff_bytes[:MAX_DIFF_BYTES]
            snap.diff_truncated = True
        snap.diff = diff_bytes.decode("utf-8", "replace")
    else:
        root = directory
        names = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.endswith(".egg-info"))
            rel = os.path.relpath(dirpath, root)
            for f in filenames:
                names.append(f if rel == "." else f"{rel}/{f}".replace(os.sep, "/"))
            if len(names) > MAX_FILES:
                break
        snap = Snapshot(root, {}, {})
    if len(names) > MAX_FILES:
        raise LabdeckError(f"{root} holds more than {MAX_FILES:,} files: too many to snapshot for a run.",
                           "Run from the project's own directory, or add the data to .gitignore.")
    for name in names:
        p = root / name
        try:
            st = p.lstat()  # one stat per file: regular files only (no symlinks, sockets, dirs)
        except FileNotFoundError:  # deleted in the work tree but still in the index
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        try:
            digest = cache.sha(p, st)
        except (FileNotFoundError, NotADirectoryError):  # removed while the snapshot was taken (a shared /tmp)
            continue
        except PermissionError:  # another user's file in the directory: it could not be copied either
            continue
        snap.files[name] = (digest, st.st_mode & 0o777)
        snap.sizes[name] = st.st_size
    cache.save()
    return snap


async def _read_all(transport: Transport, path: str) -> bytes | None:
    try:
        chunk = await transport.read_file(path, 0, 8 << 20)
    except LabdeckError:
        return None
    data = bytearray(chunk.data)
    offset = chunk.next_offset
    while offset < chunk.size:
        nxt = await transport.read_file(path, offset, 8 << 20)
        if not nxt.data:
            break
        data += nxt.data
        offset = nxt.next_offset
    return bytes(data)


@dataclass
class SyncResult:
    mirror: str
    uploaded_files: int
    uploaded_bytes: int
    deleted_files: int
    unchanged_files: int


async def sync(snap: Snapshot, transport: Transport, mirror: str, progress: Progress | None = None) -> SyncResult:
    """Make ``mirror`` on the instance hold exactly the snapshot's files, sending only what changed."""
    report = progress or (lambda phase, done, total: None)
    report("comparing", 0, len(snap.files))
    raw = await _read_all(transport, posixpath.join(mirror, MANIFEST))
    remote: dict[str, list] = {}
    if raw:
        try:
            remote = json.loads(raw)
        except ValueError:
            remote = {}  # a damaged manifest: send everything again
    changed = [n for n, (sha, mode) in snap.files.items() if remote.get(n) != [sha, mode]]
    deleted = [n for n in remote if n not in snap.files]
    total = sum(snap.sizes[n] for n in changed)
    sent = 0
    qm = shlex.quote(mirror)
    await _check(transport, f"mkdir -p {qm}", "create the code mirror")
    batch: list[str] = []
    batch_bytes = 0

    async def flush() -> None:
        nonlocal sent, batch, batch_bytes
        if not batch:
            return
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for n in batch:
                try:
                    info = tar.gettarinfo(str(snap.root / n), arcname=n)
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    with open(snap.root / n, "rb") as f:
                        tar.addfile(info, f)
                except OSError as e:
                    raise LabdeckError(f"{n} changed while its code was being copied ({e.strerror or e}).",
                                       "Start the run again; run from the project's own directory, "
                                       "not a shared one such as /tmp.") from None
        await _check(transport, f"tar -x -f - -C {qm} --no-same-owner -m", "unpack files into the code mirror",
                     input=buf.getvalue())
        sent += batch_bytes
        report("uploading", sent, total)
        batch, batch_bytes = [], 0

    report("uploading", 0, total)
    for n in changed:
        batch.append(n)
        batch_bytes += snap.sizes[n]
        if batch_bytes >= BATCH_BYTES:
            await flush()
    await flush()
    if deleted:
        listing = "\0".join(deleted).encode("utf-8", "surrogateescape") + b"\0"
        await _check(transport, f"cd {qm} && xargs -0 rm -f --", "remove deleted files from the code mirror", input=listing)
    if changed or deleted or raw is None:
        manifest = {n: [sha, mode] for n, (sha, mode) in snap.files.items()}
        await transport.put_files({posixpath.join(mirror, MANIFEST): json.dumps(manifest).encode()})
    report("done", total, total)
    return SyncResult(mirror, len(changed), total, len(deleted), len(snap.files) - len(changed))


async def materialize(transport: Transport, mirror: str, code_dir: str) -> None:
    """Give a run its own copy of the mirror, so later syncs never touch a running job's code."""
    await _check(transport, f"mkdir -p {shlex.quote(code_dir)} && cp -a {shlex.quote(mirror)}/. {shlex.quote(code_dir)}/ "
                            f"&& rm -f {shlex.quote(code_dir)}/{MANIFEST}", "copy the code for the run")


async def _check(transport: Transport, command: str, what: str, input: bytes | None = None) -> None:
    res = await transport.run(command, input=input, timeout=600)
    if not res.ok:
        raise LabdeckError(f"Could not {what} on {transport.instance}: {res.stderr.decode(errors='replace').strip()[:300]}")
