"""labdeck's reading of ~/.ssh/config, held against OpenSSH's own answer on the same file.

OpenSSH is the oracle: for every host (and every hop of its jump chain) the expected values come
from running ``ssh`` itself here, never from this file. ``ssh -G`` gives HostName, Port, User,
ProxyJump and the host-key settings; it prints IdentityFile and ProxyCommand unexpanded, so a
second ``ssh -v`` run (its proxy command stubbed, so nothing is dialled) gives the expanded proxy
command ("Executing proxy command: exec ...") and identity files ("identity file X type N") that
ssh really uses. A case is a small config (``{d}`` is its directory, ``{rel}`` a directory under
``~/.ssh`` for relative Includes) and the hosts to ask about.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import urllib.parse
from pathlib import Path

import pytest

from backends.errors import TransportError
from backends.ssh import resolve_host
from backends.sshconfig import SSHConfig

SSH = shutil.which("ssh")
pytestmark = pytest.mark.skipif(SSH is None, reason="OpenSSH's ssh is the oracle and is not installed")

# name: (main config, {relative path: text} more files, hosts)
CASES: dict[str, tuple[str, dict[str, str], list[str]]] = {
    "equals_signs": ("Host gpu1\n  HostName = 10.0.0.3\n  Port = 2201\n  User =bob\n", {}, ["gpu1"]),
    "trailing_comments": ("Host gpu1 # the box\n  HostName c1 # comment\n  Port 2022 # comment\n  User al # x\n",
                          {}, ["gpu1"]),
    "quoted_values": ('Host gpu1\n  HostName "10.0.0.4"\n  IdentityFile "{d}/my key"\n', {"my key": ""}, ["gpu1"]),
    "case_of_keywords": ("host GPU1\n  hostname 10.0.0.1\n  PORT 2201\n\tuser\tTabbed\n", {}, ["gpu1", "GPU1"]),
    "hostname_case": ("Host gpu1\n  HostName GPU1.Example.ORG\n", {}, ["gpu1"]),
    "include_glob_absolute": ("Include {d}/conf.d/*.conf\nHost *\n  User fallback\n",
                              {"conf.d/a.conf": "Host a1\n  HostName 10.1.0.1\n  User = ina\n",
                               "conf.d/b.conf": "Host b1\n  HostName 10.1.0.2\n  Port 2200\n",
                               "conf.d/c.txt": "Host a1\n  HostName 10.1.0.99\n"}, ["a1", "b1", "zz"]),
    "include_relative_to_dot_ssh": ("Include {rel}/*.conf\nHost gpu1\n  Port 2999\n",
                                    {"~/a.conf": "Host gpu1\n  HostName 10.1.1.1\n  User rel\n"}, ["gpu1", "gpu2"]),
    "include_inside_host": ("Host gpu1\n  Include {d}/gpu.conf\nHost *\n  Port 2300\n",
                            {"gpu.conf": "HostName 10.2.0.1\nUser inc\n"}, ["gpu1", "other"]),
    "match_host_after_hostname": ("Host gpu1\n  HostName 10.3.0.1\nMatch host 10.3.0.*\n  User matched\n  Port 2201\n",
                                  {}, ["gpu1", "x"]),
    "match_originalhost": ("Match originalhost gpu*\n  User orig\nHost gpu1\n  HostName 10.0.0.9\n", {}, ["gpu1", "cpu"]),
    "match_user": ("Host gpu1\n  User alice\nMatch user alice\n  Port 2222\nMatch user bob\n  Port 3333\n",
                   {}, ["gpu1", "other"]),
    "match_all": ("Host a\n  HostName 1.1.1.1\nMatch all\n  User everyone\n  Port 2022\n", {}, ["a", "b"]),
    "match_negated": ("Match !host gpu*\n  User notgpu\nHost *\n  User gpuuser\n", {}, ["gpu1", "cpu1"]),
    "match_final_and_canonical": ("Host gpu1\n  HostName 10.0.0.2\nMatch canonical\n  User canon\nMatch final\n"
                                  "  Port 2299\n", {}, ["gpu1"]),
    "tokens_in_hostname": ("Host *.lab\n  HostName %h.example.org\nHost gpu1\n  HostName %h.internal%%x\n",
                           {}, ["a.lab", "gpu1"]),
    "tokens_in_identityfile": ("Host gpu1\n  HostName 10.0.0.5\n  User bob\n  Port 2200\n"
                               "  IdentityFile {d}/id_%h_%r_%p\n  IdentityFile {d}/id_%n_%u\n  IdentityFile {d}/pct%%\n",
                               {"id_10.0.0.5_bob_2200": "", "id_gpu1_" + pwd.getpwuid(os.getuid()).pw_name: "",
                                "pct%": ""}, ["gpu1"]),
    "tokens_home_dir": ("Host gpu1\n  IdentityFile %d/.ssh/labdeck-none-%n\n  IdentityFile ~/labdeck-none\n", {}, ["gpu1"]),
    "proxycommand_w_jump": ("Host jump\n  HostName 10.9.0.1\nHost gpu1\n  HostName 10.0.0.7\n  User bob\n"
                            "  ProxyCommand ssh -W %h:%p jump\n", {}, ["gpu1", "jump"]),
    "proxycommand_tokens": ("Host gpu1\n  HostName 10.0.0.8\n  Port 2201\n  User carol\n"
                            "  ProxyCommand nc -X connect %h %p %r %n %%\n", {}, ["gpu1"]),
    "proxycommand_before_jump": ("Host gpu1\n  ProxyCommand nc %h %p\n  ProxyJump jump\n", {}, ["gpu1"]),
    "proxyjump_before_command": ("Host gpu1\n  ProxyJump jump\n  ProxyCommand nc %h %p\nHost jump\n  Port 2022\n",
                                 {}, ["gpu1"]),
    "proxycommand_none": ("Host gpu1\n  ProxyCommand none\nHost *\n  ProxyCommand nc %h %p\n", {}, ["gpu1", "gpu2"]),
    "proxyjump_url": ("Host gpu1\n  HostName 10.0.0.1\n  ProxyJump ssh://alice@bastion.example.org:2222\n"
                      "Host bastion.example.org\n  User ignored\n  Port 22\n", {}, ["gpu1"]),
    "proxyjump_chain": ("Host b1\n  HostName 10.5.0.1\n  User ops\nHost b2\n  HostName 10.5.0.2\n  ProxyJump b3\n"
                        "Host gpu1\n  ProxyJump b1,ops2@b2:2022,ssh://b1\n", {}, ["gpu1"]),
    "proxyjump_nested": ("Host jump\n  HostName 10.6.0.1\nHost inner\n  HostName 10.6.0.2\n  ProxyJump jump\n"
                         "Host gpu1\n  ProxyJump inner\n", {}, ["gpu1", "inner"]),
    "proxyjump_none_first": ("Host gpu1\n  ProxyJump none\nHost *\n  ProxyJump jump\n", {}, ["gpu1", "gpu2"]),
    "negation": ("Host * !gpu2\n  User most\nHost *\n  User rest\n", {}, ["gpu1", "gpu2"]),
    "first_match_wins": ("Host gpu1\n  Port 2201\nHost gpu*\n  Port 2202\n  User g\nHost *\n  User all\n  Port 2203\n",
                         {}, ["gpu1", "gpu2", "cpu"]),
    "bracket_is_literal": ("Host gpu[12]\n  HostName 10.7.0.1\nHost gpu?\n  HostName 10.7.0.2\n", {}, ["gpu1", "gpu[12]"]),
    "comma_pattern_list": ("Host a,b c\n  HostName 10.8.0.1\n", {}, ["a", "b", "c", "a,b"]),
    "duplicate_identityfiles": ("Host gpu1\n  IdentityFile {d}/k1\n  IdentityFile {d}/k1\n  IdentityFile {d}/k2\n"
                                "Host *\n  IdentityFile {d}/k1\n  IdentityFile {d}/k3\n",
                                {"k1": "", "k2": "", "k3": ""}, ["gpu1"]),
    "host_key_settings": ("Host gpu1\n  HostName 10.0.0.2\n  HostKeyAlias gpukey\n  UserKnownHostsFile {d}/kh_%h {d}/kh2\n"
                          "  StrictHostKeyChecking yes\n  ConnectTimeout 7\n  ServerAliveInterval 15\n", {}, ["gpu1"]),
    "options_before_any_host": ("User early\nPort 2020\nHost gpu1\n  User late\n", {}, ["gpu1"]),
}


def _parse_hop(hop: str) -> tuple[str | None, str, int | None]:
    """The test's own reading of a ProxyJump hop (urllib for the URL form), independent of labdeck's."""
    if hop.startswith("ssh://"):
        u = urllib.parse.urlsplit(hop)
        return u.username, u.hostname or "", u.port
    user, _, rest = hop.rpartition("@")
    host, _, port = rest.partition(":")
    return user or None, host, int(port) if port else None


class Refused(Exception):
    """OpenSSH refuses the destination: labdeck must refuse it too (a clear TransportError)."""


class Oracle:
    """Asks the installed OpenSSH about one config file."""

    def __init__(self, cfg: Path, stub_dir: Path) -> None:
        self.cfg = cfg
        self.env = {**os.environ, "PATH": f"{stub_dir}:{os.environ.get('PATH', '')}"}

    def g(self, host: str, user: str | None = None, port: int | None = None) -> dict[str, list[str]]:
        argv = [SSH, "-G", "-F", str(self.cfg)] + (["-l", user] if user else []) + (["-p", str(port)] if port else [])
        p = subprocess.run([*argv, host], capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL)
        if p.returncode != 0:
            raise Refused(p.stderr)
        out: dict[str, list[str]] = {}
        for line in p.stdout.splitlines():
            k, _, v = line.partition(" ")
            out.setdefault(k, []).append(v)
        return out

    def run_v(self, host: str, g: dict[str, list[str]]) -> tuple[str | None, list[str]]:
        """(the proxy command ssh executes, the identity files it tries): nothing is dialled."""
        extra = [] if "proxycommand" in g else ["-o", "ProxyCommand=false"]
        p = subprocess.run([SSH, "-v", "-F", str(self.cfg), "-o", "BatchMode=yes", *extra, host, "true"],
                           capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL, env=self.env)
        proxy = None
        ids: list[str] = []
        for line in p.stderr.splitlines():
            if m := re.match(r"debug1: Executing proxy command: exec (.*)$", line):
                proxy = m.group(1)
            elif m := re.match(r"debug1: identity file (.*) type -?\d+$", line):
                if not m.group(1).endswith("-cert"):
                    ids.append(m.group(1))
        return (proxy if "proxycommand" in g else None), ids

    def expected(self, host: str, user: str | None = None, port: int | None = None, own_jumps: bool = True) -> dict:
        g = self.g(host, user, port)
        proxy, ids = self.run_v(host, g) if user is None and port is None else (None, [])
        jumps = [] if not own_jumps else [j for j in (g.get("proxyjump") or [""])[0].split(",") if j and j != "none"]
        chain: list[tuple] = []
        for i, hop in enumerate(jumps):
            hu, hh, hp = _parse_hop(hop)
            e = self.expected(hh, hu, hp, own_jumps=(i == 0))  # ssh -J: later hops ignore their own ProxyJump
            chain += e["chain"] + [e["addr"]]
        one = lambda k: (g.get(k) or [None])[0]  # noqa: E731
        return {"addr": (one("hostname"), int(one("port")), one("user")), "chain": chain,
                "proxy": proxy, "ids": [i for i in dict.fromkeys(ids) if os.path.isfile(i)],
                "alias": one("hostkeyalias"), "known": g.get("userknownhostsfile", [""])[0].split(),
                "strict": one("stricthostkeychecking") == "true" or one("stricthostkeychecking") == "yes",
                "timeout": None if one("connecttimeout") == "none" else float(one("connecttimeout")),
                "alive": float(one("serveraliveinterval")) or None}


@pytest.fixture
def stub_dir(tmp_path: Path) -> Path:
    """`ssh` and `nc` that exit at once: a ProxyCommand the oracle runs dials nothing."""
    d = tmp_path / "stub-bin"
    d.mkdir()
    for name in ("ssh", "nc"):
        (d / name).write_text("#!/bin/sh\nexit 1\n")
        (d / name).chmod(0o755)
    return d


@pytest.fixture
def dot_ssh_dir():
    """A directory of our own under ~/.ssh (OpenSSH's home for relative Includes), removed afterwards."""
    dot = Path(pwd.getpwuid(os.getuid()).pw_dir) / ".ssh"
    made_dot = not dot.exists()
    sub = dot / f"labdeck-oracle-{os.getpid()}"
    sub.mkdir(parents=True, exist_ok=True)
    try:
        yield sub
    finally:
        shutil.rmtree(sub, ignore_errors=True)
        if made_dot:
            shutil.rmtree(dot, ignore_errors=True)


def write_case(name: str, d: Path, rel: Path) -> Path:
    main, files, _ = CASES[name]
    fill = lambda t: t.replace("{d}", str(d)).replace("{rel}", rel.name)  # noqa: E731
    for path, text in files.items():
        target = rel / path[2:] if path.startswith("~/") else d / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(fill(text))
    cfg = d / "config"
    cfg.write_text(fill(main))
    return cfg


def labdeck_view(spec) -> dict:
    return {"addr": (spec.hostname, spec.port, spec.user), "chain": [(j.hostname, j.port, j.user) for j in spec.jump],
            "proxy": spec.proxy_command, "ids": list(spec.identity_files), "alias": spec.host_key_alias,
            "known": [f for f in spec.known_hosts_files if not f.startswith("/etc/ssh/")], "strict": spec.strict,
            "timeout": spec.connect_timeout, "alive": spec.keepalive_interval}


def test_there_are_enough_cases() -> None:
    assert len(CASES) >= 25


@pytest.mark.parametrize("case", sorted(CASES))
def test_labdeck_resolves_as_openssh_does(case: str, tmp_path: Path, stub_dir: Path, dot_ssh_dir: Path) -> None:
    cfg = write_case(case, tmp_path, dot_ssh_dir)
    oracle = Oracle(cfg, stub_dir)
    ssh_config = SSHConfig(cfg)
    assert ssh_config.authority == "ssh -G"
    for host in CASES[case][2]:
        try:
            want = oracle.expected(host)
        except Refused:
            with pytest.raises(TransportError):
                resolve_host(host, ssh_config=ssh_config)
            continue
        got = labdeck_view(resolve_host(host, ssh_config=ssh_config))
        assert got == want, f"{case}: {host}"


# asyncssh's own config reader stands in where ssh is absent; where it reads a file differently from
# OpenSSH, that is known here (and the test fails once asyncssh agrees, so the list stays true).
ASYNCSSH_DIFFERS = {
    "trailing_comments",     # asyncssh: "Extra data at end" (OpenSSH ignores a trailing # comment)
    "comma_pattern_list",    # asyncssh splits `Host a,b` into two patterns; OpenSSH reads one
    "proxyjump_none_first",  # OpenSSH refuses `ssh jump` under `Host * / ProxyJump jump` ("jumphost loop")
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_without_ssh_asyncssh_reads_the_same(case: str, tmp_path: Path, stub_dir: Path, dot_ssh_dir: Path) -> None:
    cfg = write_case(case, tmp_path, dot_ssh_dir)
    oracle = Oracle(cfg, stub_dir)
    ssh_config = SSHConfig(cfg, ssh=None)
    assert ssh_config.authority == "asyncssh"
    same = True
    for host in CASES[case][2]:
        try:
            want = oracle.expected(host)
        except Refused:
            want = None
        try:
            got = labdeck_view(resolve_host(host, ssh_config=ssh_config))
        except TransportError:
            same = False
            continue
        # the fallback has no GlobalKnownHostsFile default and no ConnectTimeout/Strict of ssh's; compare what it reads
        if want is None:
            same = False
            continue
        for k in ("known", "strict", "timeout", "alive", "alias"):
            got.pop(k), want.pop(k)
        same = same and got == want
    assert same == (case not in ASYNCSSH_DIFFERS), f"{case}: asyncssh {'agrees' if same else 'differs'}"
