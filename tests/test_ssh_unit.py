"""Fast SSH-layer tests: ~/.ssh/config resolution, jump chains, host-key policy, and the
transport against an in-process asyncssh server on loopback (no namespaces needed)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from backends.errors import TransportError
from backends.ssh import (
    HostSpec,
    KnownHosts,
    SSHConfig,
    SSHPool,
    SSHTransport,
    encryption_algs,
    parse_destination,
    resolve_host,
)
from tests.rig import LocalSSHServer

SSH_CONFIG = """
Host bastion
    HostName bastion.example.org
    User ops
    Port 2222
    IdentityFile KEYDIR/ops_key
    IdentityFile KEYDIR/absent_key

Host inner
    HostName 10.1.0.5
    ProxyJump bastion

Host gpu-*
    User trainer
    ProxyJump bastion,inner

Host gpu-7
    HostName 10.2.0.7
    User ignored-first-wins-elsewhere

Host *
    User default-user
"""


def cfg(tmp_path: Path) -> SSHConfig:
    p = tmp_path / "config"
    p.write_text(SSH_CONFIG.replace("KEYDIR", str(tmp_path)))
    (tmp_path / "ops_key").write_text("")
    return SSHConfig.load(p)


def test_destinations() -> None:
    assert parse_destination("a@h:2200") == ("a", "h", 2200)
    assert parse_destination("h") == (None, "h", None)
    assert parse_destination("u@[::1]:22") == ("u", "::1", 22)


def test_ssh_config_first_value_wins_and_chains(tmp_path: Path) -> None:
    c = cfg(tmp_path)
    spec = resolve_host("gpu-7", ssh_config=c)
    assert (spec.hostname, spec.user, spec.port) == ("10.2.0.7", "trainer", 22)  # gpu-* came first for User
    assert [h.name for h in spec.jump] == ["bastion", "inner"]
    bastion, inner = spec.jump
    assert (bastion.hostname, bastion.user, bastion.port) == ("bastion.example.org", "ops", 2222)
    assert bastion.identity_files == (str(tmp_path / "ops_key"),)  # only keys that exist, as ssh offers them
    assert inner.jump == (bastion,)  # each hop goes through the ones before it
    assert "via inner via bastion" in spec.label


def test_explicit_values_win_and_unknown_hosts_use_defaults(tmp_path: Path) -> None:
    c = cfg(tmp_path)
    spec = resolve_host("box", ssh_config=c, hostname="192.0.2.9", port=2200, jump=("ops@bastion.example.org:2222",))
    assert (spec.hostname, spec.port, spec.user) == ("192.0.2.9", 2200, "default-user")
    assert spec.jump[0].user == "ops" and spec.jump[0].port == 2222
    plain = resolve_host("other", ssh_config=SSHConfig())
    assert (plain.hostname, plain.user, plain.port, plain.jump) == ("other", None, 22, ())


def test_jump_loop_is_an_error(tmp_path: Path) -> None:
    p = tmp_path / "c"
    p.write_text("Host a\n ProxyJump b\nHost b\n ProxyJump a\n")
    with pytest.raises(TransportError, match="longer than 10 hops"):
        resolve_host("a", ssh_config=SSHConfig.load(p))


def spec_for(server, key: str) -> HostSpec:
    return HostSpec("test", server.host, server.user, server.port, (key,))


async def test_transport_on_the_in_process_server(ssh_server, ssh_client_key, tmp_path: Path) -> None:
    pool = SSHPool(KnownHosts(tmp_path / "known_hosts"))
    t = SSHTransport(pool, spec_for(ssh_server, str(ssh_client_key)), instance="test")
    try:
        res = await t.run("echo hi; exit 4")
        assert (res.exit_code, res.stdout) == (4, b"hi\n")
        await t.put_files({f"{ssh_server.home}/a/b.txt": b"hello"})
        assert (await t.read_file(f"{ssh_server.home}/a/b.txt", 1, 3)).data == b"ell"
        assert ssh_server.host_key_fingerprint() in (tmp_path / "known_hosts").read_text() or \
            ssh_server.host_public_key().split()[1] in (tmp_path / "known_hosts").read_text()
        assert await t.runs_root() == f"{ssh_server.home}/.labdeck/runs"
    finally:
        await pool.close()


async def test_known_hosts_policies(ssh_server, ssh_client_key, tmp_path: Path) -> None:
    spec = spec_for(ssh_server, str(ssh_client_key))
    strict = SSHPool(KnownHosts(tmp_path / "kh", "strict"))
    with pytest.raises(TransportError, match="unknown .* strict"):
        await strict.connection(spec)
    await strict.close()
    # a different key on record for this host:port → refused, naming both fingerprints
    import asyncssh

    other = asyncssh.generate_private_key("ssh-ed25519")
    KnownHosts(tmp_path / "kh").add(ssh_server.host, ssh_server.port, other)
    pool = SSHPool(KnownHosts(tmp_path / "kh", "accept-new"))
    with pytest.raises(TransportError) as err:
        await pool.connection(spec)
    assert "CHANGED" in err.value.message and other.get_fingerprint() in err.value.message
    assert str(tmp_path / "kh") in err.value.hint
    await pool.close()


async def test_missing_key_file_and_refused_key(ssh_server, tmp_path: Path) -> None:
    pool = SSHPool(KnownHosts(tmp_path / "kh"))
    with pytest.raises(TransportError, match="does not exist"):
        await pool.connection(HostSpec("t", ssh_server.host, ssh_server.user, ssh_server.port, (str(tmp_path / "nokey"),)))
    import asyncssh

    stranger = tmp_path / "stranger"
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(stranger))
    with pytest.raises(TransportError, match="refused the SSH key"):
        await pool.connection(HostSpec("t2", ssh_server.host, ssh_server.user, ssh_server.port, (str(stranger),)))
    await pool.close()


async def test_unreachable_port_fails_fast_and_backs_off(tmp_path: Path, ssh_client_key) -> None:
    import socket
    import time

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    pool = SSHPool(KnownHosts(tmp_path / "kh"), connect_timeout=2)
    spec = HostSpec("gone", "127.0.0.1", "u", port, (str(ssh_client_key),))
    with pytest.raises(TransportError, match="Cannot connect to gone"):
        await pool.connection(spec)
    t0 = time.monotonic()
    with pytest.raises(TransportError):  # inside the backoff window: answered at once
        await pool.connection(spec)
    assert time.monotonic() - t0 < 0.5
    await pool.close()


async def test_a_silent_host_shows_connecting_and_holds_nobody_up(ssh_server, ssh_client_key, home: Path) -> None:
    """A host that accepts TCP but never speaks SSH: the listing answers within ~1 s anyway."""
    import asyncio
    import time

    from backends.config import load_config
    from backends.paths import Paths
    from backends.workstation import Workstation

    async def silent(reader, writer):
        await asyncio.sleep(30)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    (home / "config.toml").write_text(
        f'[providers.lab]\ntype = "ssh"\nssh_config = ""\nconnect_timeout = 3\n\n'
        f'[providers.lab.hosts.ok]\nhost = "{ssh_server.host}"\nport = {ssh_server.port}\nuser = "{ssh_server.user}"\n'
        f'identity_file = "{ssh_client_key}"\n\n'
        f'[providers.lab.hosts.silent]\nhost = "127.0.0.1"\nport = {port}\nuser = "x"\nidentity_file = "{ssh_client_key}"\n')
    ws = Workstation(load_config(Paths.resolve(home)))
    try:
        t0 = time.monotonic()
        states = {i.name: i for i in (await ws.list_instances()).instances}
        assert time.monotonic() - t0 < 2.0
        assert states["ok"].state == "running" and states["silent"].state == "connecting"
        assert "still trying" in states["silent"].note
        await asyncio.sleep(3.2)  # the connect times out in the background
        states = {i.name: i for i in (await ws.list_instances()).instances}
        assert states["silent"].state == "unreachable" and "did not answer within 3s" in states["silent"].note
        t0 = time.monotonic()  # now it is in its (longer) backoff: answered at once
        states = {i.name: i for i in (await ws.list_instances()).instances}
        assert time.monotonic() - t0 < 0.5 and states["silent"].state == "unreachable"
    finally:
        await ws.close()
        server.close()


async def _traffic(t: SSHTransport, server) -> None:
    """A command, a file read and a forwarded echo: every kind of packet a session sends."""
    res = await t.run("echo hi")
    assert res.stdout == b"hi\n"
    (server.home / "f.txt").write_bytes(b"data")
    assert (await t.read_file(f"{server.home}/f.txt")).data == b"data"

    async def echo(reader, writer):
        while data := await reader.read(1024):
            writer.write(data)
        writer.close()

    srv = await asyncio.start_server(echo, "127.0.0.1", 0)
    fwd = await t.forward_port(srv.sockets[0].getsockname()[1])
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", fwd.local_port)
        for i in range(20):
            writer.write(b"ping %d\n" % i)
            assert await reader.readline() == b"ping %d\n" % i
        writer.close()
    finally:
        await fwd.close()
        srv.close()


async def test_no_ignore_packet_before_every_packet_with_aead_ciphers(ssh_server, ssh_client_key, tmp_path: Path) -> None:
    """asyncssh sends an empty SSH_MSG_IGNORE before every packet (a CBC countermeasure): with the
    AEAD ciphers labdeck negotiates that doubled the packets of every forwarded request."""
    pool = SSHPool(KnownHosts(tmp_path / "known_hosts"))
    t = SSHTransport(pool, spec_for(ssh_server, str(ssh_client_key)), instance="test")
    try:
        conn = await pool.connection(t.spec)
        assert conn.get_extra_info("send_cipher") in encryption_algs()[:2]
        assert "-cbc" not in conn.get_extra_info("send_cipher")
        before = ssh_server.ignored  # those sent while logging in, before labdeck had the connection
        await _traffic(t, ssh_server)
        assert ssh_server.ignored == before
    finally:
        await pool.close()


async def test_cbc_connections_keep_the_ignore_packets(tmp_path: Path, ssh_client_key, monkeypatch) -> None:
    """With a CBC cipher (a server that offers nothing else) the countermeasure stays on."""
    monkeypatch.setattr("backends.ssh._ALGS", ["aes128-cbc"])
    server = LocalSSHServer(tmp_path / "cbc-home", ssh_client_key, encryption_algs=["aes128-cbc"]).start()
    pool = SSHPool(KnownHosts(tmp_path / "known_hosts"))
    t = SSHTransport(pool, spec_for(server, str(ssh_client_key)), instance="cbc")
    try:
        conn = await pool.connection(t.spec)
        assert conn.get_extra_info("send_cipher") == "aes128-cbc"
        before = server.ignored
        await _traffic(t, server)
        assert server.ignored > before + 20  # one before every packet
    finally:
        await pool.close()
        server.close()


def test_the_teammates_ssh_line_follows_the_transports_chain(tmp_path: Path) -> None:
    """From the transport itself, so SSH hosts and cloud instances (both SSHTransport) get their own
    host and jump chain; a transport without one (this machine) gets this machine's name."""
    from backends.providers.local import LocalTransport
    from backends.serving import ssh_line

    jump = HostSpec("bastion", "198.18.0.1", "ops", 2222, ())
    node = HostSpec("gpu", "10.0.0.7", "ubuntu", 22, (), (jump,))
    t = SSHTransport(SSHPool(KnownHosts(tmp_path / "kh")), node, instance="gpu")
    assert ssh_line(t, 8001, 8000) == "ssh -N -L 8001:127.0.0.1:8000 -J ops@198.18.0.1:2222 ubuntu@10.0.0.7"
    direct = SSHTransport(SSHPool(KnownHosts(tmp_path / "kh")), HostSpec("h", "10.0.0.8", None, 2200, ()), instance="h")
    assert ssh_line(direct, 8001, 8000) == "ssh -N -L 8001:127.0.0.1:8000 -p 2200 10.0.0.8"
    assert ssh_line(LocalTransport(tmp_path), 8001, 8000).endswith(f"127.0.0.1:8000 {os.uname().nodename}")


async def test_the_home_directory_is_asked_once_per_host(ssh_server, ssh_client_key, tmp_path: Path) -> None:
    """Providers hand out a new transport per call (a cloud instance's each time): the home
    directory, which every autostop read and runs_root need, is still asked of the host only once."""
    pool = SSHPool(KnownHosts(tmp_path / "known_hosts"))
    spec = spec_for(ssh_server, str(ssh_client_key))
    try:
        homes = [await SSHTransport(pool, spec, instance="test").home_dir() for _ in range(3)]
        assert homes == [str(ssh_server.home)] * 3
        assert sum('"$HOME"' in (c or "") for c in ssh_server.commands) == 1
    finally:
        await pool.close()


def test_a_missing_ssh_config_is_an_empty_one(tmp_path: Path) -> None:
    spec = resolve_host("gpu1", ssh_config=SSHConfig(tmp_path / "no-such-config"))
    assert (spec.hostname, spec.port, spec.jump, spec.proxy_command) == ("gpu1", 22, (), None)


def test_an_option_labdeck_cannot_honour_is_reported_once_with_its_line(tmp_path: Path) -> None:
    p = tmp_path / "config"
    p.write_text("Host gpu1\n  HostName 10.0.0.1\n\nHost *\n  ForwardAgent yes\n  LocalForward 8080 localhost:80\n"
                 "  StrictHostKeyChecking no\n")
    import logging

    cfg = SSHConfig(p)
    # a handler on the logger itself: an earlier test may have set up labdeck's logging (propagate off),
    # which hides records from caplog's root handler
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("labdeck.sshconfig")
    logger.addHandler(handler)
    try:
        a = resolve_host("gpu1", ssh_config=cfg)
        b = resolve_host("gpu2", ssh_config=cfg)
    finally:
        logger.removeHandler(handler)
    notes = " ".join(a.notes)
    if cfg.authority == "ssh -G":
        assert f"{p}:5: ForwardAgent yes is not honoured" in notes
        assert f"{p}:6: LocalForward" in notes and f"{p}:7: StrictHostKeyChecking" in notes
    assert b.notes == a.notes
    warned = [r.getMessage() for r in records]
    assert len(warned) == len(set(warned)) == 3  # once each, not once per host


def test_ssh_g_answers_are_reused_by_the_next_process_until_a_file_changes(tmp_path, tmp_path_factory,
                                                                             monkeypatch) -> None:
    """The on-disk cache: a new SSHConfig (the next labdeck command) runs no ssh -G while every file ssh
    read keeps its mtime; an edit to the config (or a file it Includes) makes it ask OpenSSH again."""
    import os
    import shutil
    import subprocess as sp

    import backends.sshconfig as sc
    from backends.sshconfig import SSHConfig

    if shutil.which("ssh") is None:
        pytest.skip("needs OpenSSH's ssh")
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "jump").write_text("Host bastion\n  HostName 198.18.7.1\n")
    cfg = tmp_path / "config"
    cfg.write_text(f"Include {tmp_path}/conf.d/*\nHost gpu\n  HostName 198.18.7.2\n  ProxyJump bastion\n")
    cache = tmp_path_factory.mktemp("cache") / "ssh-G.json"  # (not in the config's folder: ssh's folders are stamped)
    calls = []
    real = sp.run
    # (resolutions only: ssh -G -vvv; the defaults baseline is asked once per process when needed)
    monkeypatch.setattr(sc.subprocess, "run",
                        lambda argv, **kw: ("-vvv" in argv and calls.append(argv)) or real(argv, **kw))
    first = SSHConfig(cfg, cache_file=cache).resolve_many([("gpu", None, None, None), ("bastion", None, None, None)])
    assert len(calls) == 2 and oct(cache.stat().st_mode & 0o777) == "0o600"
    calls.clear()
    again = SSHConfig(cfg, cache_file=cache).resolve_many([("gpu", None, None, None), ("bastion", None, None, None)])
    assert again == first and calls == []
    (tmp_path / "conf.d" / "jump").write_text("Host bastion\n  HostName 198.18.7.9\n")
    os.utime(tmp_path / "conf.d" / "jump", ns=(1, 1))  # a different mtime whatever the clock's resolution
    changed = SSHConfig(cfg, cache_file=cache).resolve("bastion")
    assert changed.hostname == "198.18.7.9" and len(calls) == 1


def test_a_command_on_one_host_resolves_that_host_and_its_chain_only(tmp_path, tmp_path_factory,
                                                                     monkeypatch) -> None:
    """An ssh provider of many hosts asks OpenSSH nothing until a host is used; then only about that
    host and its jump chain (the jump host prefetched beside it: one round of ssh -G, not two). A
    listing resolves the rest, each host's answer as exact as one asked alone."""
    import shutil
    import subprocess as sp

    import backends.sshconfig as sc
    from backends.providers.ssh import HOST_FIELDS, SSHProvider

    if shutil.which("ssh") is None:
        pytest.skip("needs OpenSSH's ssh")
    conf = tmp_path / "config"
    conf.write_text("Host bastion\n  HostName 198.18.7.1\n  Port 2222\n"
                    + "".join(f"Host gpu{i}\n  HostName 198.18.8.{i + 1}\n" for i in range(12))
                    + "Host gpu*\n  ProxyJump bastion\n")
    hosts = {f"gpu{i}": {k: f.default for k, f in HOST_FIELDS.items()} for i in range(12)}
    opts = {"ssh_config": str(conf), "host_key_policy": "accept-new", "connect_timeout": 5.0, "hosts": hosts}
    cache = tmp_path_factory.mktemp("cache") / "ssh-G.json"
    asked: list[str] = []
    real = sp.run
    monkeypatch.setattr(sc.subprocess, "run",
                        lambda argv, **kw: ("-vvv" in argv and asked.append(argv[-1])) or real(argv, **kw))
    p = SSHProvider("lab", opts, pool=SSHPool(KnownHosts(tmp_path / "kh")), ssh_cache=cache)
    assert asked == []  # building the provider (every command does) asks nothing
    spec = p.spec("gpu3")
    assert sorted(asked) == ["bastion", "gpu3"]
    assert (spec.hostname, [(j.hostname, j.port) for j in spec.jump]) == ("198.18.8.4", [("198.18.7.1", 2222)])
    everything = p.resolve_all()
    assert sorted(asked) == sorted(["bastion", *hosts])  # each once: gpu3 and bastion are not asked again
    alone = {n: resolve_host(n, ssh_config=SSHConfig(conf)) for n in hosts}
    assert everything == alone
    asked.clear()  # the next command: every answer from the on-disk cache
    again = SSHProvider("lab", opts, pool=SSHPool(KnownHosts(tmp_path / "kh")), ssh_cache=cache)
    assert again.resolve_all() == alone and asked == []


async def test_a_host_openssh_cannot_resolve_is_one_unreachable_row(tmp_path) -> None:
    """A host whose ssh_config answer labdeck cannot use is listed as unreachable, saying why; the
    provider, the other hosts and the listing are not held up by it."""
    import shutil

    from backends.providers.ssh import HOST_FIELDS, SSHProvider

    if shutil.which("ssh") is None:
        pytest.skip("needs OpenSSH's ssh")
    conf = tmp_path / "config"
    conf.write_text("Host bad\n  IdentityFile ~/.ssh/id_%Q\n")
    base = {k: f.default for k, f in HOST_FIELDS.items()}
    opts = {"ssh_config": str(conf), "host_key_policy": "accept-new", "connect_timeout": 5.0,
            "hosts": {"bad": dict(base)}}
    p = SSHProvider("lab", opts, pool=SSHPool(KnownHosts(tmp_path / "kh")))
    try:
        (inst,) = await p.list_instances()
        assert inst.state == "unreachable" and "unknown token %Q" in inst.note
        with pytest.raises(TransportError, match="unknown token %Q"):
            p.transport("bad")
        assert "bad" in p.specs and "nope" not in p.specs  # (membership asks the config, not OpenSSH)
    finally:
        await p.close()


def test_the_defaults_are_asked_only_where_a_file_names_an_option_labdeck_cannot_honour(tmp_path, monkeypatch) -> None:
    """OpenSSH's defaults (what a not-honoured option is compared with) cost one more ssh -G: asked only
    where a file ssh read names such an option, an Included one too, and then it is still reported."""
    import shutil
    import subprocess as sp

    import backends.sshconfig as sc

    if shutil.which("ssh") is None:
        pytest.skip("needs OpenSSH's ssh")
    defaults = []
    real = sp.run
    monkeypatch.setattr(sc.subprocess, "run",
                        lambda argv, **kw: ("/dev/null" in argv and defaults.append(argv)) or real(argv, **kw))
    plain = tmp_path / "plain"
    plain.write_text("Host gpu\n  HostName 198.18.7.2\n  User bob\n")
    assert SSHConfig(plain).resolve("gpu").notes == () and defaults == []
    (tmp_path / "extra.conf").write_text('Host gpu\n  "ForwardAgent" yes\n')  # (a quoted keyword: OpenSSH takes it)
    included = tmp_path / "included"
    included.write_text(f"Include {tmp_path}/extra.conf\nHost gpu\n  HostName 198.18.7.2\n")
    notes = SSHConfig(included).resolve("gpu").notes
    assert len(defaults) == 1 and any(f"{tmp_path}/extra.conf:2: ForwardAgent yes" in n for n in notes), notes


def test_a_host_whose_ssh_g_hangs_costs_one_timeout_not_one_per_asker(tmp_path, monkeypatch) -> None:
    """ssh -G that does not answer (a config read from a hung mount, say) is asked once: the spec's
    prefetch round, its own resolution, a host that jumps through it and a thread that waited for it
    get the same error, not a timeout each; a change of the config file asks again."""
    import shutil
    import subprocess as sp
    import threading

    import backends.sshconfig as sc
    from backends.providers.ssh import HOST_FIELDS, SSHProvider

    real_ssh = shutil.which("ssh")
    if real_ssh is None:
        pytest.skip("needs OpenSSH's ssh")
    fake = tmp_path / "ssh"  # OpenSSH's own ssh, except that it hangs for the host "slow"
    fake.write_text(f'#!/bin/sh\nfor a; do last=$a; done\n[ "$last" = slow ] && exec sleep 30\nexec {real_ssh} "$@"\n')
    fake.chmod(0o755)
    conf = tmp_path / "config"
    conf.write_text("Host slow\n  HostName 198.18.9.1\nHost fast\n  HostName 198.18.9.2\n")
    base = {k: f.default for k, f in HOST_FIELDS.items()}
    opts = {"ssh_config": str(conf), "host_key_policy": "accept-new", "connect_timeout": 5.0,
            "hosts": {"slow": dict(base), "fast": dict(base), "viaslow": {**base, "jump": ["slow"]}}}
    asked: list[str] = []
    real = sp.run
    monkeypatch.setattr(sc.subprocess, "run", lambda argv, **kw: (asked.append(argv[-1]), real(argv, **kw))[1])
    p = SSHProvider("lab", opts, pool=SSHPool(KnownHosts(tmp_path / "kh")))
    p.ssh_config.ssh, p.ssh_config.timeout = str(fake), 0.5
    with pytest.raises(TransportError, match="did not answer"):
        p.spec("slow")
    assert asked.count("slow") == 1, asked
    errors: list[Exception] = []

    def ask() -> None:
        try:
            p.spec("slow")
        except TransportError as e:
            errors.append(e)

    threads = [threading.Thread(target=ask) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    with pytest.raises(TransportError, match="did not answer"):
        p.spec("viaslow")
    assert len(errors) == 3 and asked.count("slow") == 1, asked
    assert p.spec("fast").hostname == "198.18.9.2"
    os.utime(conf, ns=(1, 1))  # the config changed: asked again
    with pytest.raises(TransportError, match="did not answer"):
        p.spec("slow")
    assert asked.count("slow") == 2, asked


# ---- read_range: the SFTP read path's own block requests -------------------------------------
class _HeldFile:
    """An open SFTP file as read_range sees it: ``read(size, offset)`` answers from ``data`` (at
    most ``answer`` bytes), fails at ``fail_at``, and holds every other block until released.
    ``in_flight`` counts the requests not answered yet."""

    def __init__(self, data: bytes, *, answer: int | None = None, fail_at: int | None = None,
                 hold: bool = False) -> None:
        self.data, self.answer, self.fail_at, self.hold = data, answer, fail_at, hold
        self.in_flight = 0
        self.release = asyncio.Event()

    async def read(self, size: int, offset: int) -> bytes:
        import asyncssh

        self.in_flight += 1
        try:
            await asyncio.sleep(0)
            if offset == self.fail_at:
                raise asyncssh.SFTPFailure("I/O error")
            if self.hold:
                await self.release.wait()
            return self.data[offset:offset + (self.answer or size)]
        finally:
            self.in_flight -= 1


async def test_read_range_leaves_no_request_behind_when_one_block_fails() -> None:
    """One block's error (an I/O error on the host) is raised, and the other blocks of its wave are
    cancelled and awaited before it is: none goes on reading a file read_file has closed."""
    import asyncssh

    from backends.ssh import read_range

    f = _HeldFile(bytes(1000), fail_at=300, hold=True)
    with pytest.raises(asyncssh.SFTPFailure):
        await read_range(f, 0, 1000, 100)
    assert f.in_flight == 0


async def test_read_range_returns_at_most_n_bytes_whatever_a_server_answers() -> None:
    """A server answering more than a block asked (or short, its own limit) still gives exactly the
    bytes of [offset, offset + n), in order, stopping at the end of the file."""
    from backends.ssh import read_range

    data = bytes(range(256)) * 40  # 10240 bytes
    assert await read_range(_HeldFile(data, answer=7), 100, 5000, 1024) == data[100:5100]  # short answers
    over = _HeldFile(data)

    async def too_much(size: int, offset: int) -> bytes:
        return data[offset:offset + size + 50]

    over.read = too_much
    assert await read_range(over, 100, 5000, 1024) == data[100:5100]
    assert await read_range(over, 10000, 5000, 1024) == data[10000:]
