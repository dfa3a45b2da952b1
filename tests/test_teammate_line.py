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


# ---- in the rig: labdeck on the jump host, the line pasted on the "laptop" (the root namespace) -----

@pytest.fixture(scope="module")
def shared_site():
    """labdeck's CLI dependencies, litserve and numpy, readable by the rig's users (see tests/sites.py)."""
    import shutil

    pytest.importorskip("litserve")
    from .sites import build_site

    site = build_site(["asyncssh", "click", "rich", "psutil", "platformdirs", "tinydb", "watchdog", "litserve", "numpy"])
    try:
        yield site
    finally:
        shutil.rmtree(site, ignore_errors=True)


def _own(path: Path, uid: int, gid: int) -> None:
    for p in [path, *path.rglob("*")]:
        os.chown(p, uid, gid)


def test_the_printed_line_pasted_on_the_laptop_reaches_the_model(fresh_rig, shared_site, tmp_path: Path) -> None:
    """Item 6 end to end. The rig's root namespace is the laptop: it reaches the jump host, and the
    nodes only through it. labdeck runs on the jump host, as the jump host's user, in a real SSH
    session from the laptop (so SSH_CONNECTION is what that sshd set); the jump host reaches node1
    directly. `labdeck serve --detach` prints the line; the laptop runs exactly that line with
    OpenSSH (the rig's key and known_hosts given as extra options only) and gets the model's answer
    on the forwarded port."""
    import json
    import pwd
    import re
    import shlex
    import subprocess
    import time

    from backends import serving

    from .rig import SSH, readable_by_others

    rig = fresh_rig
    repo = Path(__file__).resolve().parents[1]
    if not (readable_by_others(repo / "tui") and os.stat(repo / "tui" / "cli.py").st_mode & 0o004):
        pytest.skip(f"the jump host's user cannot read labdeck's code at {repo}")
    jump, node = rig.jump, rig.host("node1")
    home = jump.home
    # labdeck's own config on the jump host: node1 reached directly (this is where its sshd answers)
    (home / "ld").mkdir()
    key = home / "ld" / "node_key"  # (in ld/, which the rig's reset empties; ~/.ssh is kept)
    key.write_bytes(Path(rig.client_key).read_bytes())
    key.chmod(0o600)
    (home / "ld" / "config.toml").write_text(
        f'[providers.lab]\ntype = "ssh"\nssh_config = ""\nconnect_timeout = 5\n\n'
        f'[providers.lab.hosts.node1]\nhost = "{node.addr}"\nuser = "{node.user}"\nport = {node.port}\n'
        f'identity_file = "{key}"\n')
    (home / "proj").mkdir()
    (home / "proj" / "train.py").write_text(
        "import os, numpy as np\n"
        "np.savez(os.path.join(os.environ['LABDECK_RUN_DIR'], 'model.npz'), w=np.ones(4), b=np.float32(0))\n")
    gid = pwd.getpwnam(jump.user).pw_gid
    for p in (home / "ld", home / "proj"):
        _own(p, jump.uid, gid)

    labdeck = (f"export LABDECK_HOME=$HOME/ld PYTHONPATH={shlex.quote(f'{repo}:{shared_site}')}; "
               f"{shlex.quote(rig.python)} -m tui.cli")

    def on_jump(command: str, timeout: float) -> str:
        """A labdeck command in a real SSH session on the jump host, from the laptop."""
        p = rig.ssh("jump", f"{labdeck} {command}", timeout=timeout)
        assert p.returncode == 0, f"labdeck {command}: exit {p.returncode}\n{p.stdout}\n{p.stderr}"
        return p.stdout

    came_in = rig.ssh("jump", "echo $SSH_CONNECTION").stdout.split()
    assert came_in[2:] == [jump.addr, str(jump.port)]  # what laptop_hop reads: the address the laptop used

    on_jump(f"run --on node1 --name laptop-model --workdir proj --env PYTHONPATH={shared_site} -- {rig.python} train.py", 90)
    on_jump("logs laptop-model -f", 90)  # returns when the run has ended
    shown = json.loads(on_jump("show laptop-model --json", 30))
    assert shown["state"] == "succeeded", shown
    out = on_jump("serve laptop-model --detach", 120)
    line = re.search(r"^from a laptop:  (ssh .*)$", out, re.M)
    api_key = re.search(r"^API key \(.*\):\s+(\S+)$", out, re.M)
    assert line and api_key, out
    line = line.group(1).strip()
    hop = f"{jump.user}@{jump.addr}" + (f":{jump.port}" if jump.port != 22 else "")
    assert f" -J {hop} " in line and line.endswith(f"{node.user}@{node.addr}"), line
    local_port = int(re.match(r"ssh -N -L (\d+):127\.0\.0\.1:\d+ ", line).group(1))

    # the laptop: the printed line as it is, after `ssh`, only the rig's key and known_hosts added
    known = tmp_path / "laptop_known_hosts"
    known.write_text(rig.known_hosts_text())
    laptop_config = tmp_path / "laptop_ssh_config"  # (-J runs a second ssh: it gets -F, not -i or -o)
    laptop_config.write_text(f"Host *\n    IdentityFile {rig.client_key}\n    IdentitiesOnly yes\n"
                             f"    UserKnownHostsFile {known}\n    GlobalKnownHostsFile /dev/null\n"
                             f"    StrictHostKeyChecking yes\n    BatchMode yes\n    ConnectTimeout 5\n")
    print(f"pasted on the laptop: {line}")
    pasted = shlex.split(line)
    assert pasted[0] == "ssh"
    argv = [SSH, "-F", str(laptop_config), "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes", *pasted[1:]]
    log = (tmp_path / "laptop-ssh.log").open("wb")
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        answer = None
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"ssh exited {proc.returncode}: {(tmp_path / 'laptop-ssh.log').read_text()}"
            try:
                answer = serving.predict(f"http://127.0.0.1:{local_port}", api_key.group(1), {"x": [[0, 0, 0, 0]]},
                                         timeout=10)
                break
            except OSError:  # the forward is not listening yet
                time.sleep(0.1)
        assert answer is not None, f"nothing on 127.0.0.1:{local_port} within 30 s: {(tmp_path / 'laptop-ssh.log').read_text()}"
        status, body, _ = answer
        assert status == 200 and body["prob"] == [0.5], (status, body)
        status, _, _ = serving.predict(f"http://127.0.0.1:{local_port}", None, {"x": [[0, 0, 0, 0]]}, timeout=10)
        assert status == 401  # it is the model server, with its key
    finally:
        os.kill(proc.pid, 15)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, 9)
            proc.wait(5)
        log.close()
    on_jump("unserve laptop-model --yes", 60)
    left = node.run_as_user("pgrep -u \"$(id -u)\" -f '[l]abdeck_serve' || true").stdout.strip()
    assert left == "", left  # the server on node1 is gone
