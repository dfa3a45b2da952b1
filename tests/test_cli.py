"""The `labdeck` command, run as a user runs it: a real subprocess, no terminal, clear errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def labdeck(home: Path, *args: str, timeout: float = 60, env: dict | None = None) -> subprocess.CompletedProcess:
    e = {**os.environ, "LABDECK_HOME": str(home), "COLUMNS": "200", **(env or {})}
    e.pop("LABDECK_TEAM_DIR", None)
    return subprocess.run([sys.executable, "-m", "tui.cli", *args], capture_output=True, text=True, env=e,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def test_help(home: Path) -> None:
    res = labdeck(home, "--help")
    assert res.returncode == 0
    for cmd in ("ls", "config", "run", "ps", "logs", "cancel", "store", "example"):
        assert cmd in res.stdout


@pytest.mark.parametrize("args", [("--help",), ("ls",)], ids=["help", "ls"])
def test_quiet_start(home: Path, args: tuple[str, ...]) -> None:
    """Nothing on stderr before (or instead of) the output: cryptography ≥ 43 makes asyncssh's import
    print five DSA deprecation warnings unless labdeck silences them at the source."""
    res = labdeck(home, *args)
    assert res.returncode == 0
    assert res.stderr == ""
    assert res.stdout.strip()


def test_ls_shows_local(home: Path) -> None:
    res = labdeck(home, "ls")
    assert res.returncode == 0, res.stderr
    line = next(l for l in res.stdout.splitlines() if "local" in l)
    assert "running" in line and f"{os.cpu_count()} vCPU" in line


def test_config_prints_values_and_sources(home: Path) -> None:
    (home / "config.toml").write_text("[ui]\nrefresh_seconds = 3\n")
    res = labdeck(home, "config")
    assert res.returncode == 0, res.stderr
    line = next(l for l in res.stdout.splitlines() if "ui.refresh_seconds" in l)
    assert "│ 3 " in line
    flat = "".join(ch for ch in res.stdout if ch not in "│ \n")
    assert "config.toml:2" in flat
    assert "store.team_dir" in res.stdout and "default" in res.stdout


@pytest.mark.parametrize("text, needle", [
    ("[ui]\nbogus = 1\n", "config.toml:2: ui.bogus: unknown key"),
    ("[providers.gpu]\ntype = \"nosuch\"\n", "unknown provider type 'nosuch'"),
    ("[keys]\n\"jobs.nope\" = \"k\"\n", "config.toml:2: keys.jobs.nope: no key binding has this id"),
    ("[[[\n", "invalid TOML"),
])
def test_bad_config_is_one_clear_message(home: Path, text: str, needle: str) -> None:
    (home / "config.toml").write_text(text)
    args = ("config",) if "keys" not in text else ()
    res = labdeck(home, *args)  # with no args: the TUI refuses to start, before any terminal set-up
    assert res.returncode == 1
    assert needle in res.stderr
    assert "Traceback" not in res.stderr + res.stdout


def test_unwritable_store_dir_is_a_clear_error(home: Path, tmp_path: Path) -> None:
    target = tmp_path / "file-not-dir"
    target.write_text("x")
    (home / "config.toml").write_text(f'[store]\nteam_dir = "{target}/team"\n')
    res = labdeck(home, "ps")
    assert res.returncode == 1
    assert "Cannot create the team directory" in res.stderr and "team_dir" in res.stderr
    assert "Traceback" not in res.stderr


def test_corrupt_store_is_named_and_kept(home: Path) -> None:
    assert labdeck(home, "run", "--no-sync", "--workdir", "/tmp", "--", "true").returncode == 0
    store_dir = home / "data" / "team" / os.environ.get("USER", __import__("getpass").getuser())
    (store_dir / "store.json").write_text('{"runs": {broken')
    before = (store_dir / "store.json").read_bytes()
    res = labdeck(home, "ps")
    assert res.returncode == 1 and "is corrupt" in res.stderr and "store move-aside" in res.stderr
    assert (store_dir / "store.json").read_bytes() == before
    moved = labdeck(home, "store", "move-aside", str(store_dir / "store.json"))
    assert moved.returncode == 0, moved.stderr
    assert list(store_dir.glob("store.json.corrupt-*"))[0].read_bytes() == before
    assert labdeck(home, "ps", "-a").returncode == 0


def test_run_ps_logs_cancel(home: Path, tmp_path: Path) -> None:
    res = labdeck(home, "run", "--name", "hello", "--workdir", str(tmp_path), "--env", "WHO=world", "--",
                  "sh", "-c", 'for i in 1 2 3; do echo "hi $WHO $i"; done')
    assert res.returncode == 0, res.stderr
    assert "started" in res.stdout
    logs = labdeck(home, "logs", "hello", "-f", timeout=30)
    assert logs.stdout == "hi world 1\nhi world 2\nhi world 3\n"
    ps = labdeck(home, "ps", "-a")
    assert "hello" in ps.stdout and "succeeded" in ps.stdout

    res = labdeck(home, "run", "--name", "sleeper", "--workdir", str(tmp_path), "--", "sleep", "60")
    assert res.returncode == 0
    assert "running" in labdeck(home, "ps").stdout
    no_tty = labdeck(home, "cancel", "sleeper")
    assert no_tty.returncode == 1 and "--yes" in no_tty.stderr
    done = labdeck(home, "cancel", "sleeper", "--yes")
    assert done.returncode == 0 and "cancelled sleeper" in done.stdout
    assert "cancelled" in labdeck(home, "ps", "-a").stdout


def test_unknown_run_and_instance(home: Path) -> None:
    res = labdeck(home, "logs", "ZZZZ")
    assert res.returncode == 1 and "No run 'ZZZZ'" in res.stderr
    res = labdeck(home, "run", "--on", "gpu-9", "--", "true")
    assert res.returncode == 1 and "No instance 'gpu-9'" in res.stderr


def test_config_shows_where_each_ssh_host_value_came_from(home: Path, tmp_path: Path) -> None:
    """Per SSH host: labdeck's own settings, ssh_config as OpenSSH resolved it (file:line), or OpenSSH's default."""
    import shutil

    if shutil.which("ssh") is None:
        pytest.skip("needs OpenSSH's ssh (the authority on ssh_config)")
    cfg = tmp_path / "ssh_config"
    cfg.write_text("Host gpu-a\n  HostName 198.18.9.9\n  Port 2201\n  User bob\n  ProxyJump bastion\n"
                   "Host bastion\n  HostName 198.18.9.1\nHost gpu-bad\n  IdentityFile ~/.ssh/id_%Q\n")
    (home / "config.toml").write_text(
        f'[providers.lab]\ntype = "ssh"\nssh_config = "{cfg}"\n\n[providers.lab.hosts.gpu1]\nhost = "gpu-a"\n\n'
        '[providers.lab.hosts.gpu2]\nhost = "198.18.9.10"\nuser = "alice"\njump = ["gpu1"]\n\n'
        '[providers.lab.hosts.gpu3]\nhost = "gpu-bad"\n')
    res = labdeck(home, "config")
    assert res.returncode == 0, res.stderr
    text = " ".join(res.stdout.split())
    # a host OpenSSH's answer for cannot be used says why on its own row; the others are all there
    assert "lab.gpu3 │ error │ IdentityFile '~/.ssh/id_%Q' has an unknown token %Q" in text, res.stdout
    rows = {tuple(c.strip() for c in line.split("│")[1:5]) for line in res.stdout.splitlines() if line.count("│") >= 5}
    assert ("lab.gpu1", "hostname", "198.18.9.9", f"{cfg}:2") in rows
    assert ("lab.gpu1", "port", "2201", f"{cfg}:3") in rows
    assert ("lab.gpu1", "proxyjump", "bastion", f"{cfg}:5") in rows
    assert ("lab.gpu2", "user", "alice", "labdeck config") in rows
    assert ("lab.gpu2", "proxyjump", "bastion → gpu1", "labdeck config") in rows
    assert ("lab.gpu2", "port", "22", "OpenSSH default") in rows
