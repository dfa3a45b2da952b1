"""TUI start-up: process start → first frame with 10,000 runs in the store, beside an empty Textual App.

Every sample is a fresh ``python3`` process (``_tui_driver.py``), so interpreter
start-up and imports count. The parent takes ``time.perf_counter()`` just before
spawning it and the child reports marks relative to that (CLOCK_MONOTONIC is
shared by all processes). Apps run headless at 160×48.

Modes, interleaved round-robin so noise hits all alike (one discarded warm-up each):

* empty Textual App — the floor: Python + Textual + one frame;
* labdeck, empty store — labdeck's own import/compose cost;
* labdeck, 10k runs — a LABDECK_HOME whose team directory holds 10,000 runs of four
  users (you 4,000, three teammates 2,000 each), seeded with ``put_many`` and compacted;
  default config (start tab: Instances), ``LabdeckApp(Workstation.open(home), live=False)``;
* the same with ``[ui] start_tab = "jobs"``, so the rows a user waits for are on screen.

Reported: first frame (Textual's Ready event) and the time until the Jobs table holds
rows (runs load in a worker after the first frame) and the frame after that.
Target: first frame ≤ 1 s with 10,000 runs.

Run: ``python3 -m tests.benchmarks tui_start``; ``python3 -m tests.benchmarks.bench_tui_start --profile``
profiles one 10k-run start (main thread, cProfile) and prints the top functions.
"""

from __future__ import annotations

import getpass
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from backends.store import UserStore

from ._common import (REPO_ROOT, Verdict, console, finish, fmt_ms, make_run, maybe_parent, new_table, pick_final_state, scratch_dir,
                      summarize, timeline_ms, verdict)

NAME = "tui_start"
DRIVER = Path(__file__).resolve().parent / "_tui_driver.py"
TOTAL_RUNS = 10_000
TEAMMATES = ("alice", "bob", "chen")
REPEATS = 5
TARGET_FIRST_FRAME_S = 1.0
CHILD_TIMEOUT_S = 90

MARKS = ("python", "imported", "built", "first_frame", "rows", "rows_painted")


def seed_team(team: Path, total: int, rng: random.Random) -> dict[str, int]:
    """``total`` runs over four users (you 40 %, three teammates 20 % each), compacted snapshots."""
    me = getpass.getuser()
    users = [me, *TEAMMATES]
    weights = [4, 2, 2, 2]
    times = timeline_ms(rng, total)
    per_user: dict[str, list[tuple[str, dict[str, Any]]]] = {u: [] for u in users}
    lost_left = 3  # a few of your runs lost on `local` (the start-up refresh reads them back)
    for i, ms in enumerate(times):
        user = rng.choices(users, weights=weights)[0]
        recent = i >= total - total // 100
        if user == me:
            if recent and lost_left:
                state, inst = "lost", "local"
                lost_left -= 1
            else:
                state, inst = pick_final_state(rng), None
                if state == "lost":
                    state = "failed"  # keep your lost runs to the three above: each costs the refresh a status read
        else:
            state, inst = ("running" if recent else pick_final_state(rng)), None
        mine = per_user[user]
        run = make_run(rng, user=user, created_ms=ms, state=state, index=i, instance=inst,
                       parent=maybe_parent(rng, [rid for rid, _ in mine[-50:]]))
        mine.append((run.id, run.to_dict()))
    for user, docs in per_user.items():
        st = UserStore(team / user, writable=True)
        st.put_many("runs", docs)
        st.compact()
        st.close()
    return {u: len(d) for u, d in per_user.items()}


def make_home(home: Path, team: Path | None, start_tab: str | None = None) -> Path:
    home.mkdir(parents=True)
    lines = []
    if team is not None:
        lines += ["[store]", f'team_dir = "{team}"', ""]
    if start_tab:
        lines += ["[ui]", f'start_tab = "{start_tab}"', ""]
    if lines:
        (home / "config.toml").write_text("\n".join(lines), encoding="utf-8")
    return home


def spawn(mode: str, home: Path | None, out: Path, profile: Path | None = None) -> dict[str, Any]:
    env = dict(os.environ)
    env.pop("LABDECK_TEAM_DIR", None)  # the home's config decides
    env.pop("LABDECK_HOME", None)
    if home is not None:
        env["LABDECK_HOME"] = str(home)
    if profile is not None:
        env["LABDECK_BENCH_PROFILE"] = str(profile)
    if out.exists():
        out.unlink()
    t0 = time.perf_counter()
    env["LABDECK_BENCH_T0"] = repr(t0)
    # time this checkout, whatever copy of labdeck is installed (the driver's own dir comes first on sys.path)
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, str(DRIVER), mode, str(out)], env=env, cwd=REPO_ROOT,
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=CHILD_TIMEOUT_S)
    wall = time.perf_counter() - t0
    try:
        marks = json.loads(out.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        marks = {"error": f"driver wrote no marks (exit {proc.returncode})"}
    marks["process_wall"] = wall
    if proc.returncode and "error" not in marks:
        marks["error"] = f"driver exit {proc.returncode}"
    if "error" in marks:
        tail = (proc.stderr or b"").decode("utf-8", "replace").strip().splitlines()[-15:]
        marks["stderr_tail"] = "\n".join(tail)
    return marks


def med(samples: list[dict[str, Any]], key: str) -> float | None:
    vals = [s[key] for s in samples if isinstance(s.get(key), (int, float))]
    return statistics.median(vals) if vals else None


def rng_text(samples: list[dict[str, Any]], key: str) -> str:
    vals = [s[key] * 1000 for s in samples if isinstance(s.get(key), (int, float))]
    if not vals:
        return "—"
    return f"{fmt_ms(statistics.median(vals))} [dim]({fmt_ms(min(vals))}–{fmt_ms(max(vals))})[/]"


def main(quick: bool = False) -> list[Verdict]:
    total = TOTAL_RUNS if not quick else 1_000
    repeats = REPEATS if not quick else 2
    rng = random.Random(20240502)
    t_all = time.perf_counter()
    with scratch_dir("tui") as root:
        team = root / "team"
        t = time.perf_counter()
        counts = seed_team(team, total, rng)
        seed_s = time.perf_counter() - t
        snapshot_bytes = sum((team / u / "store.json").stat().st_size for u in counts)
        modes = [
            ("empty", "empty Textual App", "empty", None),
            ("labdeck-empty", "labdeck, empty store", "labdeck-frame", make_home(root / "home-empty", None)),
            ("labdeck-10k", f"labdeck, {total:,} runs, start tab Instances (default)", "labdeck",
             make_home(root / "home-10k", team)),
            ("labdeck-10k-jobs", f"labdeck, {total:,} runs, start tab Jobs", "labdeck",
             make_home(root / "home-10k-jobs", team, "jobs")),
        ]
        samples: dict[str, list[dict[str, Any]]] = {key: [] for key, *_ in modes}
        warmups: dict[str, dict[str, Any]] = {}
        out = root / "marks.json"
        for rep in range(repeats + 1):
            console.print(f"[dim]tui_start: round {rep}/{repeats}{' (warm-up, discarded)' if rep == 0 else ''} …[/]")
            for key, _label, mode, home in modes:
                marks = spawn(mode, home, out)
                if "error" in marks:
                    console.print(f"[red]{key}: {marks['error']}[/]\n{marks.get('stderr_tail', '')}")
                if rep:
                    samples[key].append(marks)
                else:
                    warmups[key] = marks
    elapsed = time.perf_counter() - t_all

    base_ff = med(samples["empty"], "first_frame")
    table = new_table(
        f"TUI start-up, process start → … (median of {repeats} fresh processes, (min–max); ms; "
        f"target: first frame ≤ {TARGET_FIRST_FRAME_S * 1000:.0f} ms with {TOTAL_RUNS:,} runs)",
        ["App", ("python up", "right"), ("imports done", "right"), ("first frame", "right"),
         ("vs empty App", "right"), ("Jobs rows", "right"), ("rows painted", "right"), "Target"],
    )
    verdicts: list[Verdict] = []
    results: dict[str, Any] = {}
    for key, label, mode, _home in modes:
        s = samples[key]
        ff = med(s, "first_frame")
        met = None
        if key.startswith("labdeck-10k") and not quick:
            met = ff is not None and ff <= TARGET_FIRST_FRAME_S
            verdicts.append(Verdict(NAME, f"first frame, {label}", f"{ff * 1000:.0f} ms" if ff else "—",
                                    f"≤ {TARGET_FIRST_FRAME_S * 1000:.0f} ms", met))
        extra = f"+{(ff - base_ff) * 1000:,.0f}" if ff is not None and base_ff is not None and key != "empty" else "baseline"
        table.add_row(label, rng_text(s, "python"), rng_text(s, "imported"), rng_text(s, "first_frame"), extra,
                      rng_text(s, "rows"), rng_text(s, "rows_painted"), verdict(met))
        results[key] = {
            "label": label, "driver_mode": mode,
            **{f"{m}_median_s": med(s, m) for m in (*MARKS, "process_wall")},
            **{f"{m}_ms": summarize([x[m] for x in s if isinstance(x.get(m), (int, float))]) for m in ("first_frame", "rows", "rows_painted")},
            "samples": s, "warmup": warmups.get(key),
        }
    rows = med(samples["labdeck-10k-jobs"], "rows")
    if rows is not None:
        verdicts.append(Verdict(NAME, "time until the Jobs table holds rows (start tab: jobs)", f"{rows * 1000:.0f} ms",
                                "none set (see first frame)", None))
    console.print(table)
    row_counts = {s.get("row_count") for s in samples["labdeck-10k"] + samples["labdeck-10k-jobs"]}
    console.print(f"[dim]store: {', '.join(f'{u} {n:,}' for u, n in counts.items())} runs; snapshots {snapshot_bytes / 1e6:.1f} MB; "
                  f"seeded in {seed_s:.1f} s; Jobs table rows shown: {', '.join(str(r) for r in row_counts)}; "
                  f"headless 160×48; took {elapsed:.0f} s[/]")
    return finish(NAME, {
        "description": "process start to first frame / Jobs rows, fresh processes, headless",
        "params": {"total_runs": total, "repeats": repeats, "users": counts, "snapshot_bytes": snapshot_bytes,
                   "size": [160, 48]},
        "target": {"metric": "first frame with 10k runs (median)", "max_s": TARGET_FIRST_FRAME_S},
        "results": results,
    }, verdicts, elapsed, quick=quick)


def profile(start_tab: str = "jobs", top: int = 30) -> None:
    """One profiled 10k-run start (cProfile, main thread only: the store read runs in a worker thread)."""
    import pstats

    with scratch_dir("tui-profile") as root:
        team = root / "team"
        seed_team(team, TOTAL_RUNS, random.Random(20240502))
        home = make_home(root / "home", team, start_tab)
        spawn("labdeck", home, root / "warm.json")
        prof = root / "start.prof"
        marks = spawn("labdeck", home, root / "marks.json", profile=prof)
        console.print({k: (round(v * 1000, 1) if isinstance(v, float) else v) for k, v in marks.items()})
        stats = pstats.Stats(str(prof))
        stats.sort_stats("cumulative").print_stats(top)
        stats.sort_stats("tottime").print_stats(top)


if __name__ == "__main__":
    if "--profile" in sys.argv:
        profile()
    else:
        main(quick="--quick" in sys.argv)
