"""The `ssh -N -L …` line printed for serving and notebooks, for a teammate to paste on a laptop:
through the jump host as the laptop reaches it when labdeck runs in an SSH session there
(SSH_CONNECTION), or through `[team] jump_host`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from backends.config import load_config
from backends.errors import ConfigError
from backends.paths import Paths
from backends.providers.local import LocalTransport
from backends.providers.ssh import SSHTransport
from backends.serving import laptop_hop, ssh_line
from backends.ssh import HostSpec, KnownHosts, SSHPool

CAME_IN = "198.51.100.7 51234 203.0.113.5 22"  # client_ip client_port server_ip server_port


def config(tmp_path: Path, text: str = ""):
    (tmp_path / "config.toml").write_text(text)
    return load_config(Paths.resolve(tmp_path), env={})


def test_the_hop_is_where_this_ssh_session_came_in(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    assert laptop_hop(cfg, "alice", {"SSH_CONNECTION": CAME_IN}) == ("alice", "203.0.113.5", 22)
    assert laptop_hop(cfg, "alice", {"SSH_CONNECTION": "198.51.100.7 5 203.0.113.5 2222"}) == ("alice", "203.0.113.5", 2222)
    assert laptop_hop(cfg, "alice", {"SSH_CONNECTION": "2001:db8::1 5 2001:db8::2 22"}) == ("alice", "2001:db8::2", 22)
    for outside in ({}, {"SSH_CONNECTION": ""}, {"SSH_CONNECTION": "garbage"},
                    {"SSH_CONNECTION": "1.2.3.4 5 not-an-ip 22"}, {"SSH_CONNECTION": "1.2.3.4 5 203.0.113.5 -1"},
                    {"SSH_CONNECTION": "127.0.0.1 5 127.0.0.1 22"}):  # from this machine itself
        assert laptop_hop(cfg, "alice", outside) is None, outside


def test_the_jump_host_setting_overrides(tmp_path: Path) -> None:
    cfg = config(tmp_path, '[team]\njump_host = "bastion.example.org"\n')
    assert laptop_hop(cfg, "alice", {"SSH_CONNECTION": CAME_IN}) == ("alice", "bastion.example.org", 22)
    assert laptop_hop(cfg, "alice", {}) == ("alice", "bastion.example.org", 22)
    cfg = config(tmp_path, '[team]\njump_host = "ops@bastion.example.org:2200"\n')
    assert laptop_hop(cfg, "alice", {}) == ("ops", "bastion.example.org", 2200)
    for bad in ("-oProxyCommand=touch /tmp/x", "a b", "host:port", "me@"):
        with pytest.raises(ConfigError, match="jump_host"):
            config(tmp_path, f'[team]\njump_host = "{bad}"\n')
    assert ("team.jump_host", "", "default") in config(tmp_path).explain()


def test_the_line_goes_through_the_jump_host_first(tmp_path: Path) -> None:
    pool = SSHPool(KnownHosts(tmp_path / "kh"))
    via = ("alice", "203.0.113.5", 22)
    node = SSHTransport(pool, HostSpec("gpu", "10.0.0.7", "ubuntu", 22, ()), instance="gpu")
    assert ssh_line(node, 8001, 8000, via) == "ssh -N -L 8001:127.0.0.1:8000 -J alice@203.0.113.5 ubuntu@10.0.0.7"
    assert ssh_line(node, 8001, 8000) == "ssh -N -L 8001:127.0.0.1:8000 ubuntu@10.0.0.7"  # outside an SSH session
    chained = SSHTransport(pool, HostSpec("gpu", "10.0.0.7", "ubuntu", 2200, (),
                                          (HostSpec("inner", "198.18.0.1", "ops", 2222, ()),)), instance="gpu")
    assert ssh_line(chained, 8001, 8000, ("alice", "2001:db8::2", 2022)) == (
        "ssh -N -L 8001:127.0.0.1:8000 -J alice@[2001:db8::2]:2022,ops@198.18.0.1:2222 -p 2200 ubuntu@10.0.0.7")
    # a server on the jump host itself: straight there, as the laptop reaches it
    here = LocalTransport(tmp_path)
    assert ssh_line(here, 8001, 8000, via) == "ssh -N -L 8001:127.0.0.1:8000 alice@203.0.113.5"
    assert ssh_line(here, 8001, 8000, ("alice", "bastion", 2222)) == "ssh -N -L 8001:127.0.0.1:8000 -p 2222 alice@bastion"
    assert ssh_line(here, 8001, 8000).endswith(f"127.0.0.1:8000 {os.uname().nodename}")
