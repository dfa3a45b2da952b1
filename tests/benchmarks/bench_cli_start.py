"""CLI start-up: `labdeck --version`, `--help`, `ps` and `runs`, each a fresh process, beside `python3 -c pass`.

Each sample is the wall time of a whole process (``subprocess.run``, output to /dev/null), so the
interpreter's start, labdeck's imports and the command's own work all count. Commands run in a fresh
LABDECK_HOME with the default config (the instance `local`) and 200 runs of yours in the store.
Modes are interleaved round-robin (one discarded warm-up round) so noise hits all alike.

Two columns per command:

* as run here: the environment as it is (where PYTHONDONTWRITEBYTECODE is set, as on the machines
  these issues are worked on, every module is compiled from source at each start);
* with bytecode: PYTHONDONTWRITEBYTECODE unset and a private PYTHONPYCACHEPREFIX, which is what an
  installed labdeck sees (its .pyc files written once).

Also reported, from one ``-X importtime`` start of each command: whether asyncssh, libcloud or
textual were imported (none of them should be: these commands need no SSH, cloud or TUI).
Target: each command under 250 ms (as run here).

Run: ``python3 -m tests.benchmarks cli_start`` (``--quick``: 2 rounds).
"""

from __future__ import annotations

import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ._common import REPO_ROOT, Verdict, console, finish, fmt_ms, make_run, new_table, scratch_dir, summarize, timeline_ms, verdict

NAME = "cli_start"
REPEATS = 15
TARGET_S = 0.25
RUNS = 200
COMMANDS: tuple[tuple[str, ...], ...] = (("--version",), ("--help",), ("ps",), ("runs",))
HEAVY = ("asyncssh", "libcloud", "textual")


def make_home(home: Path, runs: int) -> Path:
    """A LABDECK_HOME with the default config and ``runs`` finished runs of yours."""
    import getpass

    from backends.store import UserStore

    home.mkdir(parents=True)
    rng = random.Random(20261205)
    me = getpass.getuser()
    docs = [(r.id, r.to_dict()) for r in (make_run(rng, user=me, created_ms=ms, state="succeeded", index=i)
                                          for i, ms in enumerate(timeline_ms(rng, runs)))]
    if docs:
        st = UserStore(home / "data" / "team" / me, writable=True)
        st.put_many("runs", docs)
        st.close()
    return home


def heavy_imports(args: tuple[str, ...], env: dict[str, str]) -> list[str]:
    """The top-level packages of HEAVY that one start of ``labdeck ARGS`` imports."""
    res = subprocess.run([sys.executable, "-X", "importtime", "-m", "tui.cli", *args], cwd=REPO_ROOT, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL, timeout=60)
    names = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in res.stderr.splitlines() if line.startswith("import time:")}
    return sorted(names & set(HEAVY))


def main(quick: bool = False) -> list[Verdict]:
    repeats = 2 if quick else REPEATS
    t_all = time.perf_counter()
    with scratch_dir("cli") as root:
        home = make_home(root / "home", 20 if quick else RUNS)
        base = {**os.environ, "LABDECK_HOME": str(home)}
        base.pop("LABDECK_TEAM_DIR", None)
        cached = {k: v for k, v in base.items() if k != "PYTHONDONTWRITEBYTECODE"}
        cached["PYTHONPYCACHEPREFIX"] = str(root / "pyc")
        envs = {"as_run": base, "bytecode": cached}
        modes: list[tuple[str, list[str]]] = [("python3 -c pass", [sys.executable, "-c", "pass"])]
        modes += [(f"labdeck {' '.join(c)}", [sys.executable, "-m", "tui.cli", *c]) for c in COMMANDS]
        samples: dict[tuple[str, str], list[float]] = {(m, e): [] for m, _ in modes for e in envs}
        failed: dict[str, str] = {}
        for rep in range(repeats + 1):
            console.print(f"[dim]cli_start: round {rep}/{repeats}{' (warm-up, discarded)' if rep == 0 else ''} …[/]")
            for label, argv in modes:
                for ename, env in envs.items():
                    t0 = time.perf_counter()
                    res = subprocess.run(argv, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                         stdin=subprocess.DEVNULL, timeout=60)
                    wall = time.perf_counter() - t0
                    if res.returncode != 0:
                        failed[label] = res.stderr.decode(errors="replace")[-400:]
                    if rep:
                        samples[(label, ename)].append(wall)
        imported = {" ".join(c): heavy_imports(c, base) for c in COMMANDS}
    elapsed = time.perf_counter() - t_all

    med = {k: statistics.median(v) for k, v in samples.items()}
    floor = med[("python3 -c pass", "as_run")]
    dwb = bool(os.environ.get("PYTHONDONTWRITEBYTECODE"))
    table = new_table(
        f"CLI start-up, whole process (median of {repeats} fresh processes, (min); ms; target: < {TARGET_S * 1000:.0f} ms)",
        ["command", ("as run here", "right"), ("− python -c pass", "right"), ("with bytecode", "right"),
         "asyncssh/libcloud/textual imported", "Target"])
    verdicts: list[Verdict] = []
    results: dict[str, Any] = {}
    for label, _argv in modes:
        a, b = samples[(label, "as_run")], samples[(label, "bytecode")]
        cmd = label.removeprefix("labdeck ")
        met = None
        if label != "python3 -c pass" and not quick:
            met = med[(label, "as_run")] < TARGET_S and label not in failed
            verdicts.append(Verdict(NAME, label, f"{med[(label, 'as_run')] * 1000:.0f} ms", f"< {TARGET_S * 1000:.0f} ms", met))
        heavy = imported.get(cmd)
        table.add_row(label, f"{fmt_ms(med[(label, 'as_run')] * 1000)} ({fmt_ms(min(a) * 1000)})",
                      "baseline" if label == "python3 -c pass" else f"+{fmt_ms((med[(label, 'as_run')] - floor) * 1000)}",
                      f"{fmt_ms(med[(label, 'bytecode')] * 1000)} ({fmt_ms(min(b) * 1000)})",
                      "—" if heavy is None else (", ".join(heavy) or "none"), verdict(met))
        results[label] = {"as_run_ms": summarize(a), "bytecode_ms": summarize(b), "heavy_imports": heavy,
                          "failed": failed.get(label)}
    console.print(table)
    for label, err in failed.items():
        console.print(f"[red]{label} failed:[/] {err}", highlight=False)
    console.print(f"[dim]PYTHONDONTWRITEBYTECODE {'set' if dwb else 'unset'} here; {RUNS if not quick else 20} runs in the "
                  f"store; took {elapsed:.0f} s[/]")
    return finish(NAME, {
        "description": "labdeck --version/--help/ps/runs start, whole fresh processes, beside python3 -c pass",
        "params": {"repeats": repeats, "runs_in_store": RUNS if not quick else 20, "pythondontwritebytecode": dwb},
        "target": {"metric": "median wall time of each command (as run here)", "max_s": TARGET_S},
        "results": results,
    }, verdicts, elapsed, quick=quick)


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
