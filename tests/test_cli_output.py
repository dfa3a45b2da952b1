"""The CLI as scripts and pipes use it (issue 17): `run` refuses an option it does not know, `--json`
on every listing with the field names the README documents, a closed pipe is a quiet exit, piped
tables are one line per row, and the commands that need no SSH, cloud or TUI do not import them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_cli import labdeck

REPO = Path(__file__).resolve().parent.parent


def _env(home: Path, **extra: str) -> dict[str, str]:
    e = {**os.environ, "LABDECK_HOME": str(home), **extra}
    e.pop("LABDECK_TEAM_DIR", None)
    return e


def _run(home: Path, tmp_path: Path, name: str, *command: str) -> str:
    res = labdeck(home, "run", "--no-sync", "--workdir", str(tmp_path), "--name", name, "--", *command)
    assert res.returncode == 0, res.stderr
    run_id = re.search(r"started (\w{26}) ", res.stdout).group(1)
    assert labdeck(home, "logs", run_id, "-f").returncode == 0  # ended
    return run_id


def readme_fields() -> dict[str, set[str]]:
    """The README's table of --json fields: command → the field names it lists (`ps`, `runs` …)."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Scripting the CLI: JSON output"):]
    out: dict[str, set[str]] = {}
    for line in section.splitlines():
        m = re.match(r"\| `(\w+)` \| (.*) \|$", line)
        if m:
            # top-level names only: drop what is inside parentheses (sub-fields, notes)
            depth, top = 0, []
            for ch in m.group(2):
                depth += ch == "("
                if not depth:
                    top.append(ch)
                depth -= ch == ")"
            out[m.group(1)] = set(re.findall(r"`(\w+)`", "".join(top)))
    for cmd, base in (("runs", "ps"), ("show", "runs"), ("rerun", "ps")):  # "the `ps` fields, and …"
        out[cmd] = (out[cmd] - {base}) | out[base]
    return out


# ---- run: an unknown option is refused, the command is what follows ------------------------------
def test_an_unknown_run_option_starts_nothing(home: Path, tmp_path: Path) -> None:
    res = labdeck(home, "run", "--bogus", "2", "--on", "gpu1", "--", "python", "train.py")
    assert res.returncode == 2
    assert "No such option '--bogus'." in res.stderr and "after --" in res.stderr
    assert json.loads(labdeck(home, "ps", "-a", "--json").stdout) == []  # nothing started, nowhere
    # the command starts at `--` or at the first word that is not an option; its own options are its own
    res = labdeck(home, "run", "--no-sync", "--workdir", str(tmp_path), "--name", "plain", "echo", "hi", "--lr", "3")
    assert res.returncode == 0, res.stderr
    res = labdeck(home, "run", "--no-sync", "--workdir", str(tmp_path), "--name", "dashed", "--", "echo", "--on", "x")
    assert res.returncode == 0, res.stderr
    shown = {r["name"]: r for r in json.loads(labdeck(home, "ps", "-a", "--json").stdout)}
    assert shown["plain"]["command"] == "echo hi --lr 3" and shown["plain"]["instance"] == "local"
    assert shown["dashed"]["command"] == "echo --on x"


# ---- --json ---------------------------------------------------------------------------------------
def test_json_listings_have_the_documented_fields(home: Path, tmp_path: Path) -> None:
    documented = readme_fields()
    assert set(documented) == {"ps", "runs", "show", "ls", "models", "sizes", "spend", "rerun"}  # rerun: tests/test_tables.py
    run_id = _run(home, tmp_path, "first", "sh", "-c", "echo 'loss=0.5'")
    for cmd, args in (("ps", ("ps", "-a")), ("runs", ("runs",)), ("show", ("show", "first")), ("ls", ("ls",)),
                      ("models", ("models",)), ("spend", ("spend",))):
        res = labdeck(home, *args, "--json")
        assert res.returncode == 0, (cmd, res.stderr)
        doc = json.loads(res.stdout)  # one document, nothing else on stdout (no Rich, no colour)
        assert "\x1b" not in res.stdout and res.stdout.isascii()
        if cmd in ("show", "spend"):
            assert isinstance(doc, dict)
            assert set(doc) == documented[cmd], cmd
        else:
            assert isinstance(doc, list), cmd
            for item in doc:
                assert set(item) == documented[cmd], cmd
    ps = json.loads(labdeck(home, "ps", "-a", "--json").stdout)
    assert [(r["id"], r["name"], r["state"], r["instance"], r["exit_code"]) for r in ps] == \
        [(run_id, "first", "succeeded", "local", 0)]
    assert isinstance(ps[0]["duration_seconds"], float) and ps[0]["last_line"] == "loss=0.5"
    local = json.loads(labdeck(home, "ls", "--json").stdout)
    assert [(i["name"], i["state"], i["vcpus"]) for i in local] == [("local", "running", os.cpu_count())]
    assert json.loads(labdeck(home, "models", "--json").stdout) == []
    spend = json.loads(labdeck(home, "spend", "--json").stdout)
    assert spend["instances"] == [] and spend["burn_per_hour"] == 0 and spend["daily_budget_usd"] is None


def test_json_carries_a_teammates_hostile_text_as_data(home: Path, tmp_path: Path) -> None:
    """Every text field of mallory's records is markup, escape sequences, bidi overrides and lone
    surrogates: in JSON they are values, escaped, exactly as written; nothing reaches the terminal."""
    from backends.config import load_config
    from backends.paths import Paths
    from tests.test_hostile_text import EVIL, evil, plant

    config = load_config(Paths.resolve(home))
    runs = plant(config.team_dir, tmp_path, me=config.user or __import__("getpass").getuser())
    target = runs[EVIL]
    for args in (("ps", "-a"), ("runs",), ("show", target.id), ("models",), ("spend",)):
        res = subprocess.run([sys.executable, "-m", "tui.cli", *args, "--json"], capture_output=True, env=_env(home),
                             timeout=60, stdin=subprocess.DEVNULL)
        assert res.returncode == 0, (args, res.stderr)
        assert all(b == 0x0A or 0x20 <= b < 0x7F for b in res.stdout), args  # ASCII, no control byte
        doc = json.loads(res.stdout)
        if args[0] == "show":
            assert doc["name"] == EVIL and doc["command"] == target.command and doc["last_line"] == evil("last")
            assert doc["params"] == target.params and doc["notes"][0]["text"] == evil("note")
            assert doc["instance_info"] == target.instance_info and evil("tag") in doc["tags"]
        if args[0] == "models":
            assert doc[0]["name"] == evil("deployment") and doc[0]["url"] == evil("url")


# ---- pipes ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("args", [("logs", "chatty"), ("ps", "-a"), ("ps", "-a", "--json"), ("runs",),
                                  ("show", "chatty"), ("--help",)], ids=lambda a: " ".join(a))
def test_a_closed_pipe_is_a_quiet_exit(home: Path, tmp_path: Path, args: tuple[str, ...]) -> None:
    """`labdeck logs X | head`: the reader is gone before labdeck writes (the read end is closed
    first, so this is deterministic); labdeck exits 141 (as killed by SIGPIPE), saying nothing."""
    _run(home, tmp_path, "chatty", "seq", "1", "20000")
    p = subprocess.Popen([sys.executable, "-m", "tui.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=_env(home, COLUMNS="200"), stdin=subprocess.DEVNULL)
    p.stdout.close()
    err = p.stderr.read()
    assert p.wait(timeout=60) == 141, err
    assert err == b""  # no "unexpected error: BrokenPipeError … Please report it", no "Exception ignored"


def test_a_piped_table_is_one_line_per_row(home: Path, tmp_path: Path) -> None:
    """At 80 columns a long last line used to fold into rows many lines tall: piped, each row is one line."""
    long_line = "epoch 1 " + "x" * 150 + " end"
    for name in ("a", "b"):
        _run(home, tmp_path, name, "echo", long_line)
    res = labdeck(home, "ps", "-a", env={"COLUMNS": "80"})
    assert res.returncode == 0, res.stderr
    rows = [line for line in res.stdout.splitlines() if line.startswith("│")]
    assert len(rows) == 2 and all(long_line[:100] in row for row in rows), res.stdout


# ---- what the commands say ------------------------------------------------------------------------
def test_show_prints_the_instance_as_fields_and_titles_count_in_english(home: Path, tmp_path: Path) -> None:
    _run(home, tmp_path, "solo", "true")
    show = labdeck(home, "show", "solo")
    line = next(l for l in show.stdout.splitlines() if l.startswith("instance "))
    assert line.startswith("instance local · provider local · ") and f"{os.cpu_count()} vCPU" in line
    assert "{" not in line and "'" not in line  # not a Python dict
    ps = labdeck(home, "ps", "-a")
    assert ps.stdout.splitlines()[0].strip() == "1 run" and "1 runs" not in ps.stdout
    assert labdeck(home, "runs").stdout.splitlines()[0].startswith("1 run ")
    res = labdeck(home, "cancel", "solo", "--yes")
    assert res.returncode == 1 and "Run solo has already succeeded." in res.stderr


def test_a_repeated_name_says_which_run_it_picked(home: Path, tmp_path: Path) -> None:
    old = _run(home, tmp_path, "twice", "echo", "old")
    new = _run(home, tmp_path, "twice", "echo", "new")
    res = labdeck(home, "logs", "twice")
    assert res.stdout == "new\n"
    assert "newest of 2 runs" in res.stderr and old[-8:].lower() in res.stderr and new[-8:].lower() in res.stderr
    assert labdeck(home, "logs", old).stderr == ""  # an id is never ambiguous


def test_a_name_two_users_share_is_listed_not_guessed(home: Path, tmp_path: Path) -> None:
    from backends.config import load_config
    from backends.models import Run
    from backends.paths import Paths
    from backends.store import Store

    mine = _run(home, tmp_path, "shared", "true")
    theirs = Run(command="true", instance="local", user="mallory", name="shared", state="succeeded")
    Store(load_config(Paths.resolve(home)).team_dir, "mallory").mine.put(Run.TABLE, theirs.id, theirs.to_dict())
    res = labdeck(home, "show", "shared")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    first, hint = res.stderr.splitlines()[:2]
    assert first.startswith("error: 'shared' matches 2 runs of mallory, ") and f"mallory/{theirs.id}" in first
    assert mine in first and "user/name" in hint
    assert json.loads(labdeck(home, "show", "mallory/shared", "--json").stdout)["id"] == theirs.id


def test_a_report_file_name_is_a_slug(home: Path, tmp_path: Path) -> None:
    run_id = _run(home, tmp_path, "Wider model (rerun)", "true")
    res = labdeck(home, "report", run_id, "-o", str(tmp_path / "out"))
    assert res.returncode == 0, res.stderr
    stem = f"labdeck-report-wider-model-rerun-{run_id[-8:].lower()}"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"{stem}.html", f"{stem}.md"]


def test_a_missing_provider_says_what_to_give(home: Path) -> None:
    for args in (("sizes",), ("up", "x"), ("catalog", "--refresh")):
        res = labdeck(home, *args)
        assert res.returncode == 1 and "Missing argument" not in res.stderr, args
        assert "No cloud provider is configured" in res.stderr, args
        assert "[providers.NAME] with type = ec2 | digitalocean | linode | openstack" in res.stderr, args


# ---- start-up: nothing heavy for commands that do not need it -------------------------------------
@pytest.mark.parametrize("args", [("--version",), ("--help",), ("ps",), ("runs",), ("ps", "--json")],
                         ids=lambda a: " ".join(a))
def test_light_commands_do_not_import_ssh_cloud_or_tui(home: Path, args: tuple[str, ...]) -> None:
    """`labdeck --version` took 0.5 s because every start imported asyncssh and libcloud (and the
    Textual app is only for `labdeck` alone): which modules a start imports is checked, not its time."""
    res = subprocess.run([sys.executable, "-X", "importtime", "-m", "tui.cli", *args], capture_output=True, text=True,
                         env=_env(home), timeout=60, stdin=subprocess.DEVNULL, cwd=REPO)
    assert res.returncode == 0, res.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in res.stderr.splitlines() if line.startswith("import time:")}
    assert "tui.cliutil" in imported  # the check sees labdeck's own imports
    heavy = sorted(m for m in imported if m.split(".")[0] in ("asyncssh", "libcloud", "textual"))
    assert heavy == [], heavy
