"""The embedded default: this machine as the instance ``local``.

It shows the machine's real CPU, memory and GPUs (nvitop when a driver exists)
and runs jobs as local detached processes. It cannot be created, stopped or
destroyed: those calls raise a ProviderError saying so.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping

from ..config import Field
from ..errors import ProviderError, TransportError
from ..gpu import probe_gpus
from ..localfiles import read_regular
from ..models import Instance
from .base import CommandResult, FileChunk, PortForward, RelayForward, Transport, UnmanagedProvider, detached_launcher

LOCAL = "local"

CONFIG_FIELDS: dict[str, Field] = {
    "enabled": Field(bool, True, "Show this machine as the instance `local`"),
    "price_per_hour": Field((int, float), 0.0, "What an hour of this machine costs, in $ (for cost tracking)",
                            lambda v: None if v >= 0 else "must be 0 or more"),
    "runs_dir": Field(str, "", "Where run directories go on this machine (default: <data dir>/runs)"),
    "max_concurrent": Field(int, 1, "Jobs run at once on this machine (the rest queue, first in first out)",
                            lambda v: None if v >= 1 else "must be 1 or more"),
}


def host_facts() -> dict[str, Any]:
    """This machine's real size: vCPUs, CPU model, memory, GPUs and boot time."""
    import psutil

    cpu_model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpus, note = probe_gpus()
    return {
        "host": os.uname().nodename,
        "vcpus": os.cpu_count() or 0,
        "cpu_model": cpu_model,
        "memory_mib": int(psutil.virtual_memory().total // (1 << 20)),
        "gpus": [dict(g) for g in gpus],
        "gpu_note": note,
        "started_at": datetime.fromtimestamp(psutil.boot_time(), timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
    }


class LocalProvider(UnmanagedProvider):
    type = "local"

    def __init__(self, name: str, options: Mapping[str, object], *, runs_root: Path,
                 facts: Callable[[], dict[str, Any]] = host_facts) -> None:
        super().__init__(name, options)
        self._facts = facts
        self._facts_cache: dict[str, Any] | None = None
        self.runs_root = Path(str(options.get("runs_dir") or runs_root))

    def has_instance(self, instance: str) -> bool:
        """Whether ``instance`` is this machine (known from the config alone)."""
        return instance == LOCAL and bool(self.options.get("enabled", True))

    async def list_instances(self) -> list[Instance]:
        if not self.options.get("enabled", True):
            return []
        return [await self.describe(LOCAL)]

    async def describe(self, instance: str) -> Instance:
        if instance != LOCAL:
            raise ProviderError(f"The {self.name} provider has only the instance `local`, not {instance!r}.")
        if self._facts_cache is None:  # size and GPUs do not change while labdeck runs
            self._facts_cache = await asyncio.to_thread(self._facts)
        f = self._facts_cache
        return Instance(
            id=LOCAL, name=LOCAL, provider=self.name, provider_type=self.type, state="running",
            host=f["host"], vcpus=f["vcpus"], cpu_model=f["cpu_model"], memory_mib=f["memory_mib"],
            gpus=f["gpus"], gpu_note=f["gpu_note"], price_per_hour=float(self.options.get("price_per_hour", 0.0)),
            started_at=f["started_at"],
        )

    def _refuse(self, what: str) -> ProviderError:
        return ProviderError(
            f"`local` is this machine: labdeck cannot {what} it.",
            "Add an SSH host or a cloud provider in the config for instances labdeck manages.",
        )

    def max_concurrent(self, instance: str) -> int:
        return int(self.options.get("max_concurrent", 1))

    def transport(self, instance: str) -> Transport:
        if instance != LOCAL:
            raise ProviderError(f"The {self.name} provider has only the instance `local`, not {instance!r}.")
        return LocalTransport(runs_root=self.runs_root)


def _merged_env(env: Mapping[str, str] | None) -> dict[str, str] | None:
    if not env:
        return None
    merged = dict(os.environ)
    merged.update(env)
    return merged


class LocalTransport(Transport):
    instance = LOCAL

    def __init__(self, runs_root: Path) -> None:
        self._runs_root = Path(runs_root)

    async def runs_root(self) -> str:
        return str(self._runs_root)

    async def run(self, command: str, *, cwd: str | None = None, env: Mapping[str, str] | None = None,
                  timeout: float | None = 60.0, input: bytes | None = None) -> CommandResult:
        try:
            proc = await asyncio.create_subprocess_shell(
                command, cwd=cwd, env=_merged_env(env), start_new_session=True,
                stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )
        except OSError as e:
            raise TransportError(f"Cannot run a command on local ({e.strerror}): {command[:80]}") from None
        try:
            out, err = await asyncio.wait_for(proc.communicate(input), timeout)
        except (asyncio.TimeoutError, asyncio.CancelledError) as e:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            await proc.wait()
            if isinstance(e, asyncio.CancelledError):
                raise
            raise TransportError(f"A command on local took longer than {timeout:g}s and was stopped: {command[:80]}") from None
        return CommandResult(proc.returncode if proc.returncode is not None else -1, out, err)

    async def start_detached(self, command: str, *, cwd: str | None = None, env: Mapping[str, str] | None = None,
                             log_path: str | None = None) -> int:
        proc = await asyncio.create_subprocess_exec(
            *detached_launcher(command, log_path), cwd=cwd, env=_merged_env(env), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        try:
            return int(out.strip())
        except ValueError:
            raise TransportError(f"Could not start a detached process on local: {err.decode(errors='replace').strip()}") from None

    async def read_file(self, path: str, offset: int = 0, max_bytes: int = 1 << 20, *,
                        inside: str | None = None) -> FileChunk:
        def read() -> FileChunk:
            # regular files only, never through a final symlink, never blocking on a FIFO, bounded:
            # a run directory may be a teammate's, and its output.log a link to a file of yours
            data, size = read_regular(path, offset, max_bytes, inside=inside)
            return FileChunk(data, offset, offset + len(data), size)

        try:
            return await asyncio.to_thread(read)
        except FileNotFoundError:
            raise TransportError(f"No file {path} on local.") from None
        except OSError as e:
            raise TransportError(f"Cannot read {path} on local ({e.strerror}).") from None

    async def put_files(self, files: Mapping[str, bytes], *, mode: int = 0o644) -> None:
        def put() -> None:
            for path, content in files.items():
                p = Path(path)
                p.parent.mkdir(parents=True, exist_ok=True)
                tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                # created with its final mode (a 0600 token is never 0644 for a moment), never through a link
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode & 0o777)
                with os.fdopen(fd, "wb") as f:
                    os.fchmod(fd, mode)  # (the umask may have taken bits off; a wider mode is asked for)
                    f.write(content)
                os.replace(tmp, p)

        try:
            await asyncio.to_thread(put)
        except OSError as e:
            raise TransportError(f"Cannot write files on local ({e.strerror}: {e.filename}).") from None

    async def forward_port(self, remote_port: int, *, local_port: int = 0, remote_host: str = "127.0.0.1") -> PortForward:
        async def dial():
            return await asyncio.open_connection(remote_host, remote_port)

        fwd = RelayForward(dial, remote_host, remote_port)
        await fwd.open(local_port)
        return fwd
