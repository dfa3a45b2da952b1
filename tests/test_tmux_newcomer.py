"""The README's first ten minutes, in a real terminal: tmux at 80×24 runs `labdeck` on a fresh
LABDECK_HOME, and the test types what the Quickstart says (`e`, `2`, `l`, `?`, `q`), reading the
screen (``tmux capture-pane``) at each step. Each wait is for text on screen, with a deadline."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from backends import clock

REPO = Path(__file__).resolve().parent.parent


def _tmux() -> str:
    path = shutil.which("tmux")
    if path is None:
        if os.environ.get("LABDECK_REQUIRE_RIG") == "1":
            pytest.fail("tmux is not installed (Debian package tmux)")
        pytest.skip("needs tmux (Debian package tmux)")
    return path


class Terminal:
    """One tmux server of our own (its own socket), one 80×24 window."""

    def __init__(self, tmux: str, socket: str) -> None:
        self.tmux, self.socket = tmux, socket

    def __call__(self, *args: str, check: bool = True) -> str:
        res = subprocess.run([self.tmux, "-L", self.socket, *args], capture_output=True, text=True, timeout=30,
                             stdin=subprocess.DEVNULL)
        if check and res.returncode:
            raise AssertionError(f"tmux {' '.join(args)}: {res.stderr}")
        return res.stdout

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "newcomer")

    def wait_for(self, *texts: str, deadline: float = 60.0) -> str:
        """The screen once every one of ``texts`` is on it (fails with the last screen after ``deadline`` s)."""
        end = clock.now().timestamp() + deadline
        shown = ""
        while clock.now().timestamp() < end:
            shown = self.screen()
            if all(t in shown for t in texts):
                return shown
            time.sleep(0.1)
        raise AssertionError(f"not on screen after {deadline:g}s: {texts}\n--- screen ---\n{shown}")

    def keys(self, *keys: str) -> None:
        self("send-keys", "-t", "newcomer", *keys)


def test_the_readme_newcomer_path_at_80x24(workstation, home: Path) -> None:
    tmux = _tmux()
    term = Terminal(tmux, f"labdeck-newcomer-{os.getpid()}")
    env = f"LABDECK_HOME={home} PYTHONPATH={REPO} TERM=xterm-256color"
    try:
        term("-f", "/dev/null", "new-session", "-d", "-s", "newcomer", "-x", "80", "-y", "24",
             f"cd {REPO} && env {env} {sys.executable} -m tui.cli; echo labdeck-exited-$?; sleep 30")
        # the first screen: the welcome, and `?` in the footer
        first = term.wait_for("Welcome to labdeck", "e   run the bundled example", "? Help")
        assert first.splitlines()[-1].lstrip().startswith("? Help")
        # `e` runs the bundled example; `2` shows it in Jobs
        term.keys("e")
        term.wait_for("Started quickstart-example")
        term.keys("2")
        jobs = term.wait_for("quickstart-ex", "local", "1 run")
        assert "No runs yet" not in jobs
        # `l` opens its log, following it
        term.keys("l")
        log = term.wait_for("training logistic regression", "step=")
        assert "quickstart-example" in log
        term.keys("q")  # closes the log (escape does too)
        term.wait_for("1 run", "? Help")
        # `?` every key of the tab, inside the screen (both borders drawn)
        term.keys("?")
        helped = term.wait_for("Keys · Jobs", "jobs.new", "binding id")
        rows = [line for line in helped.splitlines() if "jobs.new" in line]
        assert rows and rows[0].rstrip().endswith("█"), helped  # the right border is on screen
        term.keys("q")  # closes help
        term.wait_for("1 run", "? Help")
        term.keys("q")  # quits labdeck; the job keeps running
        term.wait_for("labdeck-exited-0")
    finally:
        term("kill-server", check=False)
    [run] = workstation.store.runs(team=False)[0]
    assert run.name == "quickstart-example"
