"""The two contracts every place jobs can run on implements.

``Provider``: list, create, start, stop, destroy and describe instances (GPUs,
vCPUs, RAM, $/hr), and hand out a ``Transport`` to one of them.

``Transport``: run a command, start a detached process, read a file from a
byte offset, put files, forward a port. ``local`` implements it with the
machine's own processes and files; ``ssh`` (through jump hosts) and the cloud
providers implement the same contract, so every feature above works the same
on this machine and on a remote GPU host.

Both are async: SSH is asyncio-native; blocking calls (libcloud, /proc reads)
run in threads inside the implementation.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Mapping

from ..models import Instance


@dataclass(frozen=True)
class InstanceSpec:
    """What to create: provider-specific fields live in ``options``."""

    name: str
    size: str = ""
    region: str = ""
    image: str = ""
    spot: bool = False
    options: Mapping[str, object] | None = None


@dataclass(frozen=True)
class CommandResult:
    exit_code: int
    stdout: bytes
    stderr: bytes

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def text(self) -> str:
        return self.stdout.decode("utf-8", "replace")


@dataclass(frozen=True)
class FileChunk:
    data: bytes
    offset: int  # where ``data`` starts
    next_offset: int  # where the next read should start
    size: int  # size of the file when read


def detached_launcher(command: str, log_path: str | None) -> list[str]:
    """argv that starts ``command`` detached and prints its pid.

    ``setsid`` gives it its own session and process group (pgid == pid); stdin is
    closed; the launching shell exits at once, so the job is nobody's child and
    survives the caller, the connection and the UI. Used by every transport.
    """
    return ["sh", "-c", 'setsid sh -c "$1" </dev/null >>"$2" 2>&1 & echo $!', "labdeck-launch", command,
            log_path or "/dev/null"]


class PortForward(abc.ABC):
    """A listening local port that reaches ``remote_host:remote_port`` on the instance."""

    local_host: str
    local_port: int
    remote_host: str
    remote_port: int

    @abc.abstractmethod
    async def close(self) -> None: ...


class RelayForward(PortForward):
    """A loopback listener that relays each accepted connection to a stream ``dial()`` opens.

    ``dial`` is called per connection, so a forward whose transport reconnected (a dropped link,
    a laptop that slept) works again by itself: the next connection goes over the new one.
    Used by ``local`` (a plain TCP dial) and ``ssh`` (a direct-tcpip channel on the host's
    current connection)."""

    def __init__(self, dial, remote_host: str, remote_port: int) -> None:
        self._dial = dial
        self.local_host = "127.0.0.1"
        self.local_port = 0
        self.remote_host = remote_host
        self.remote_port = remote_port
        self._server = None
        self._tasks: set = set()
        self.connections = 0
        self.failures = 0

    async def open(self, local_port: int = 0) -> None:
        import asyncio

        from ..errors import TransportError

        try:
            self._server = await asyncio.start_server(self._handle, self.local_host, local_port)
        except OSError as e:
            raise TransportError(f"Cannot listen on {self.local_host}:{local_port} ({e.strerror}).") from None
        self.local_port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader, writer) -> None:
        import asyncio

        try:
            r2, w2 = await self._dial()
        except Exception:  # the far side is down right now: this client sees a closed connection
            self.failures += 1
            writer.close()
            return
        self.connections += 1

        async def pipe(src, dst) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError, asyncio.CancelledError, EOFError):
                pass
            except Exception:  # a channel closed under us (the SSH connection dropped)
                pass
            finally:
                try:
                    dst.close()
                except Exception:
                    pass

        for t in (asyncio.ensure_future(pipe(reader, w2)), asyncio.ensure_future(pipe(r2, writer))):
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for t in list(self._tasks):
            t.cancel()


class Transport(abc.ABC):
    """How labdeck reaches into one instance."""

    instance: str

    @abc.abstractmethod
    async def run(self, command: str, *, cwd: str | None = None, env: Mapping[str, str] | None = None,
                  timeout: float | None = 60.0, input: bytes | None = None) -> CommandResult:
        """Run a shell command to completion and return its exit code and output."""

    @abc.abstractmethod
    async def start_detached(self, command: str, *, cwd: str | None = None, env: Mapping[str, str] | None = None,
                             log_path: str | None = None) -> int:
        """Start ``command`` in its own session with stdin closed; it survives this
        process, the connection and the UI. Output goes to ``log_path`` (or is
        discarded). Returns the pid, which is also its process-group id."""

    @abc.abstractmethod
    async def read_file(self, path: str, offset: int = 0, max_bytes: int = 1 << 20, *,
                        inside: str | None = None) -> FileChunk:
        """Read at most ``max_bytes`` from ``path`` starting at byte ``offset``. With ``inside`` (a run
        directory), ``path`` must lie below it and no directory from ``inside`` down to the file may be
        a symbolic link: a teammate's ``media/<key>`` that points at a directory of yours is refused."""

    @abc.abstractmethod
    async def put_files(self, files: Mapping[str, bytes], *, mode: int = 0o644) -> None:
        """Write each ``remote path → content``, creating directories, each file atomically."""

    @abc.abstractmethod
    async def forward_port(self, remote_port: int, *, local_port: int = 0, remote_host: str = "127.0.0.1") -> PortForward:
        """Listen on this machine's loopback and relay each connection to the instance."""

    async def home_dir(self) -> str:
        res = await self.run('printf %s "$HOME"', timeout=15)
        return res.text()

    @abc.abstractmethod
    async def runs_root(self) -> str:
        """Absolute directory on the instance where run directories go."""

    async def close(self) -> None:  # noqa: B027 - optional
        """Release connections. The default holds none."""


class Provider(abc.ABC):
    """A source of instances: this machine, the team's SSH hosts, or a cloud."""

    type: str  # "local", "ssh", "ec2", ...

    def __init__(self, name: str, options: Mapping[str, object]) -> None:
        self.name = name
        self.options = dict(options)

    @abc.abstractmethod
    async def list_instances(self) -> list[Instance]: ...

    @abc.abstractmethod
    async def describe(self, instance: str) -> Instance: ...

    @abc.abstractmethod
    async def create(self, spec: InstanceSpec) -> Instance: ...

    @abc.abstractmethod
    async def start(self, instance: str) -> Instance: ...

    @abc.abstractmethod
    async def stop(self, instance: str) -> Instance: ...

    @abc.abstractmethod
    async def destroy(self, instance: str, *, force: bool = False) -> None: ...

    @abc.abstractmethod
    def transport(self, instance: str) -> Transport: ...

    def max_concurrent(self, instance: str) -> int:
        """Jobs that run at once on ``instance``; later ones wait in its FIFO queue."""
        return 1

    async def close(self) -> None:  # noqa: B027 - optional
        """Release clients and connections."""


class UnmanagedProvider(Provider):
    """Machines labdeck uses but does not own (this machine, the team's SSH hosts): every
    lifecycle call is refused with a message saying why (``_refuse``)."""

    @abc.abstractmethod
    def _refuse(self, what: str) -> Exception: ...

    async def create(self, spec: InstanceSpec) -> Instance:
        raise self._refuse("create")

    async def start(self, instance: str) -> Instance:
        raise self._refuse("start")

    async def stop(self, instance: str) -> Instance:
        raise self._refuse("stop")

    async def destroy(self, instance: str, *, force: bool = False) -> None:
        raise self._refuse("destroy")
