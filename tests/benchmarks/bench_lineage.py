"""Lineage tab at 10,000 runs beside 100: opening it, filtering it, and the memory it takes.

Each size is a LABDECK_HOME whose team directory holds that many runs of five users (you
and alice, bob, chen, dana; you 30 %, each teammate 17.5 %), seeded with ``put_many`` and
compacted, one store per user. Runs are realistic (``_common.make_run``: ~10 params such
as lr, batch_size, optimizer, seed, precision) with a metrics summary (``loss``, ``val_loss``,
``acc``: last/min/max/best/count/last_step; a derived run's metrics follow its parent's).
About 30 % of runs derive from an earlier run (¾ their own user's, ¼ a teammate's) in chains
up to 8 deep (``Run.parent`` plus its ``Edge`` record in the child's store; a few extra "uses"
edges). Tags (some taken off again) and notes are ``Annotation`` records in their authors'
stores. Your own runs are all finished, so the app's start-up refresh asks no instance.

Every sample is a fresh ``python3`` process (``_lineage_driver.py``) running
``LabdeckApp(Workstation.open(home), live=False)`` headless at 160×48:

* **switch** (default start tab, Instances): once the runs are loaded and the app is idle,
  a Textual Pilot presses ``4``; timed: press → ``LineageTab.rerender`` done (the tree holds
  its roots) → the next frame. Then ``LineageTab.apply_filter(FILTER)`` → frame (and
  clearing it again), alternating, several times per process; then FILTER typed into the
  ``/`` bar key by key (Key events sent as Pilot sends them, without Pilot's own ~80 ms idle
  waits; every key re-filters, as in the app): key → rerender → frame; then enter.
  "Frame" is the screen refresh after the change (``call_after_refresh``); the tab's 0.3 s
  underline animation, which Pilot waits for, is shown apart.
* **start** (``[ui] start_tab = "lineage"``): process start → first frame → the rerender
  that puts roots in the tree → the frame after it.
* **memory**: the process's RSS with the runs loaded and the tab shown, and its peak
  (``ru_maxrss``) at the end of a switch process (after filtering and typing) and when
  the start process has drawn the tree.

Targets at 10,000 runs (medians): press 4 → tree drawn ≤ 500 ms; filter → tree redrawn
≤ 100 ms; peak RSS ≤ 300 MB. Sizes interleave round-robin (one discarded warm-up round).

Anchors (other tools, as reported by their users; not measured here): MLflow's UI breaks
above ~1,700 runs (mlflow#627); Aim takes over a minute for 50 runs (aim#2753);
TensorBoard is sluggish at ~250 runs.

Run: ``python3 -m tests.benchmarks lineage``; ``python3 -m tests.benchmarks.bench_lineage --profile``
profiles the switch and the filter at 10,000 runs (cProfile, main thread, measured windows
only) and prints where the time goes. A missed target triggers the same profile at the end
of a normal run.
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
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from backends.models import Annotation, Edge
from backends.store import UserStore

from ._common import (REPO_ROOT, Verdict, console, finish, fmt_ms, iso, make_run, new_table, pick_final_state, scratch_dir,
                      summarize, timeline_ms, verdict)

NAME = "lineage"
DRIVER = Path(__file__).resolve().parent / "_lineage_driver.py"
SIZES = (100, 10_000)
TEAMMATES = ("alice", "bob", "chen", "dana")
USER_WEIGHTS = (30, 17.5, 17.5, 17.5, 17.5)  # you first
DERIVED_SHARE = 0.30
MAX_DEPTH = 8
FILTER = "user:alice lr>1e-3 metric.val_loss<0.5"
TAGS = ("best", "keep", "paper", "broken", "baseline-v2")
NOTES = ("diverged after warmup", "good baseline", "rerun with bf16", "use for the paper", "lr too high?",
         "loss spikes at step 40k", "compare with the lion run")
REPEATS = 5
FILTER_REPEATS = 8
TARGET_SWITCH_MS = 500.0
TARGET_FILTER_MS = 100.0
TARGET_RSS_MB = 300.0
CHILD_TIMEOUT_S = 120
ANCHORS = (
    ("MLflow UI", "breaks above ~1,700 runs", "mlflow#627"),
    ("Aim", "over a minute to show 50 runs", "aim#2753"),
    ("TensorBoard", "sluggish at ~250 runs", "users' reports"),
)


# ---- the team's runs --------------------------------------------------------------------------
def _metrics(rng: random.Random, parent_val: float | None) -> dict[str, dict[str, Any]]:
    """loss / val_loss / acc summaries; a derived run's val_loss moves a little from its parent's."""
    val = parent_val * rng.uniform(0.75, 1.12) if parent_val is not None else rng.uniform(0.15, 2.5)
    val = max(0.02, val)
    count = rng.randrange(50, 50_000)
    out: dict[str, dict[str, Any]] = {}
    for name, last in (("val_loss", val), ("loss", val * rng.uniform(0.6, 0.95)),
                       ("acc", min(0.995, max(0.05, 1.0 - val / 3 + rng.uniform(-0.05, 0.05))))):
        lower_better = name != "acc"
        spread = abs(last) * rng.uniform(0.05, 0.5)
        lo, hi = (last - spread * 0.2, last + spread * 3) if lower_better else (last - spread * 3, last + spread * 0.2)
        out[name] = {"last": round(last, 5), "last_step": count * 10, "min": round(lo, 5), "max": round(hi, 5),
                     "best": round(lo if lower_better else hi, 5), "count": count}
    return out


def seed_team(team: Path, total: int, rng: random.Random) -> dict[str, Any]:
    """``total`` runs of five users, derived runs, edges and annotations; one compacted store per user."""
    me = getpass.getuser()
    users = [me, *(t for t in TEAMMATES if t != me)][:5]
    times = timeline_ms(rng, total, end_ms=int(time.time() * 1000) - 3_600_000)
    runs: dict[str, list[tuple[str, dict[str, Any]]]] = {u: [] for u in users}
    recent: dict[str, list[str]] = {u: [] for u in users}  # each user's run ids, oldest first
    depth: dict[str, int] = {}
    val_of: dict[str, float | None] = {}
    created: dict[str, str] = {}
    owner_of: dict[str, str] = {}
    edges: dict[str, list[tuple[str, dict[str, Any]]]] = {u: [] for u in users}
    all_ids: list[str] = []
    derived = cross_user = 0
    for i, ms in enumerate(times):
        user = rng.choices(users, weights=USER_WEIGHTS[:len(users)])[0]
        parent = None
        if rng.random() < DERIVED_SHARE:
            owner = user if rng.random() < 0.75 else rng.choice([u for u in users if u != user])
            cands = [rid for rid in recent[owner][-40:] if depth[rid] < MAX_DEPTH]
            if cands:  # favour extending a line of experiments over branching off a baseline
                parent = rng.choices(cands, weights=[1 + 0.5 * depth[c] for c in cands])[0]
        recent_run = i >= total - max(1, total // 100)
        if user == me:
            state = pick_final_state(rng)
            state = "failed" if state == "lost" else state  # yours all final: the start-up refresh asks no instance
        else:
            state = "running" if recent_run and rng.random() < 0.5 else pick_final_state(rng)
        run = make_run(rng, user=user, created_ms=ms, state=state, index=i, parent=parent)
        if state == "running":
            run.started_at = iso(ms + 30_000)
        if run.started_at:
            run.metrics_summary = _metrics(rng, val_of.get(parent) if parent else None)
        run.instance_info = {"provider": rng.choice(("lambda", "aws", "local")), "provider_type": "ssh",
                             "gpus": rng.choice(("8× NVIDIA A100 80GB", "1× NVIDIA H100 80GB", "none")), "vcpus": 32}
        run.code = {"commit": f"{rng.getrandbits(160):040x}", "dirty": rng.random() < 0.2, "root": f"/home/{user}/src"}
        depth[run.id] = depth[parent] + 1 if parent else 0
        val_of[run.id] = run.metrics_summary.get("val_loss", {}).get("last") if run.metrics_summary else (
            val_of.get(parent) if parent else None)
        created[run.id] = run.created_at
        owner_of[run.id] = user
        if parent:
            derived += 1
            cross_user += owner_of[parent] != user
            e = Edge(parent, run.id, kind=rng.choice(("parent", "parent", "rerun")), user=user, created_at=run.created_at)
            edges[user].append((e.id, e.to_dict()))
        if all_ids and rng.random() < 0.03:  # an artifact of an older run loaded with labdeck.use()
            src = rng.choice(all_ids[-500:])
            e = Edge(src, run.id, kind="uses", user=user, created_at=run.created_at)
            edges[user].append((e.id, e.to_dict()))
        runs[user].append((run.id, run.to_dict()))
        recent[user].append(run.id)
        all_ids.append(run.id)

    notes: dict[str, list[tuple[str, dict[str, Any]]]] = {u: [] for u in users}
    n_tags = n_notes = n_removed = 0
    for rid in all_ids:
        r = rng.random()
        if r > 0.25:
            continue
        t0 = datetime.fromisoformat(created[rid].replace("Z", "+00:00"))
        for k in range(rng.randrange(1, 3)):
            author = rng.choice(users)
            when = iso(int((t0 + timedelta(hours=k + 1)).timestamp() * 1000))
            a = Annotation(rid, "tag", rng.choice(TAGS), user=author, created_at=when,
                           removed=rng.random() < 0.1)
            notes[author].append((a.id, a.to_dict()))
            n_tags += 1
            n_removed += a.removed
        if rng.random() < 0.4:
            author = rng.choice(users)
            a = Annotation(rid, "note", rng.choice(NOTES), user=author, created_at=created[rid])
            notes[author].append((a.id, a.to_dict()))
            n_notes += 1

    for user in users:
        st = UserStore(team / user, writable=True)
        st.put_many("runs", runs[user])
        if edges[user]:
            st.put_many("edges", edges[user])
        if notes[user]:
            st.put_many("annotations", notes[user])
        st.compact()
        st.close()
    depths = list(depth.values())
    hist = {d: depths.count(d) for d in range(MAX_DEPTH + 1)}
    return {
        "users": {u: len(runs[u]) for u in users},
        "derived": derived,
        "derived_from_teammate": cross_user,
        "max_depth": max(depths),
        "depth_histogram": hist,
        "edges": sum(len(v) for v in edges.values()),
        "tags": n_tags, "tags_removed": n_removed, "notes": n_notes,
        "snapshot_bytes": sum((team / u / "store.json").stat().st_size for u in users),
    }


def make_home(home: Path, team: Path, start_tab: str | None = None) -> Path:
    home.mkdir(parents=True)
    lines = ["[store]", f'team_dir = "{team}"', ""]
    if start_tab:
        lines += ["[ui]", f'start_tab = "{start_tab}"', ""]
    (home / "config.toml").write_text("\n".join(lines), encoding="utf-8")
    return home


# ---- child processes ------------------------------------------------------------------------
def spawn(mode: str, home: Path, out: Path, *, filters: int = FILTER_REPEATS, type_filter: bool = True,
          profile: Path | None = None) -> dict[str, Any]:
    env = dict(os.environ)
    env.pop("LABDECK_TEAM_DIR", None)  # the home's config decides
    env["LABDECK_HOME"] = str(home)
    env["LABDECK_BENCH_FILTER"] = FILTER
    env["LABDECK_BENCH_FILTERS"] = str(filters)
    env["LABDECK_BENCH_TYPE"] = "1" if type_filter else "0"
    if profile is not None:
        env["LABDECK_BENCH_PROFILE"] = str(profile)
    else:
        env.pop("LABDECK_BENCH_PROFILE", None)
    if out.exists():
        out.unlink()
    t0 = time.perf_counter()
    env["LABDECK_BENCH_T0"] = repr(t0)
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


# ---- statistics over processes --------------------------------------------------------------
def vals(samples: list[dict[str, Any]], key: str) -> list[float]:
    return [s[key] for s in samples if isinstance(s.get(key), (int, float)) and not isinstance(s.get(key), bool)]


def med(samples: list[dict[str, Any]], key: str) -> float | None:
    v = vals(samples, key)
    return statistics.median(v) if v else None


def ms_text(v: list[float]) -> str:
    """median (min–max) of seconds, in ms."""
    if not v:
        return "—"
    ms = [x * 1000 for x in v]
    return f"{fmt_ms(statistics.median(ms))} [dim]({fmt_ms(min(ms))}–{fmt_ms(max(ms))})[/]"


def mb_text(v: list[float]) -> str:
    if not v:
        return "—"
    mb = [x / 1e6 for x in v]
    return f"{statistics.median(mb):.0f} [dim]({min(mb):.0f}–{max(mb):.0f})[/]"


def distinct(samples: list[dict[str, Any]], key: str) -> list[Any]:
    """The different values of a mark over the processes that have it."""
    return sorted({s[key] for s in samples if s.get(key) is not None}, key=str)


def gc_pair(ms: list[float]) -> str:
    return f"{statistics.median(ms):.1f} / {max(ms):.0f}" if ms else "—"


def pooled(samples: list[dict[str, Any]], key: str, field: str | None = None) -> list[float]:
    """Every in-process sample of a list-valued mark, over all processes."""
    out: list[float] = []
    for s in samples:
        for x in s.get(key) or []:
            out.append(x[field] if field else x)
    return out


# ---- profile --------------------------------------------------------------------------------
def profile_top(path: Path, windows: int, top: int = 18) -> list[dict[str, Any]]:
    """The functions with the most cumulative time in a profile, per measured window (ms)."""
    import pstats

    st = pstats.Stats(str(path))
    rows = []
    for (file, line, fn), (cc, nc, tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        rows.append({"where": f"{_short(file)}:{line}:{fn}", "calls": nc // max(1, windows),
                     "cum_ms": ct * 1000 / max(1, windows), "self_ms": tt * 1000 / max(1, windows)})
    total = max((r["cum_ms"] for r in rows), default=0.0)
    by_cum = sorted(rows, key=lambda r: -r["cum_ms"])
    by_self = sorted(rows, key=lambda r: -r["self_ms"])
    return [{"total_ms": total}] + [dict(r, rank="cum") for r in by_cum[:top]] + [dict(r, rank="self") for r in by_self[:top]]


def _short(file: str) -> str:
    for marker in ("site-packages/", str(REPO_ROOT) + "/"):
        if marker in file:
            return file.split(marker, 1)[1]
    return file


def run_profile(home: Path, start_home: Path, root: Path, filters: int = 5) -> dict[str, list[dict[str, Any]]]:
    """One warm-up, then one profiled switch process (press 4; ``filters`` filter applications) and one
    profiled start-on-Lineage process (the runs arrive → the tree is painted)."""
    prefix = root / "lineage.prof"
    spawn("switch", home, root / "warm.json", filters=1, type_filter=False)
    marks = spawn("switch", home, root / "prof.json", filters=filters, type_filter=False, profile=prefix)
    marks_start = spawn("start", start_home, root / "prof-start.json", profile=prefix)
    out: dict[str, list[dict[str, Any]]] = {}
    for m, what, windows in ((marks, "switch", 1), (marks, "filter", filters), (marks_start, "start", 1)):
        if "error" in m:
            console.print(f"[red]profile run ({what}): {m['error']}[/]\n{m.get('stderr_tail', '')}")
            continue
        out[what] = profile_top(Path(f"{prefix}.{what}"), windows)
    titles = {"switch": "press 4 → frame (incl. the 0.3 s tab underline animation Pilot waits for)",
              "filter": "apply_filter → frame, per application",
              "start": "start on Lineage: the runs arrive → the tree is painted"}
    for what, rows in out.items():
        t = new_table(f"cProfile at the largest size, {titles[what]} (main thread, measured window only; ms; "
                      f"profiling inflates times; GC pauses land in whichever function allocates)",
                      ["By", "file:line:function", ("calls", "right"), ("cumulative ms", "right"), ("self ms", "right")])
        for r in rows[1:]:
            t.add_row(r["rank"], r["where"], f"{r['calls']:,}", fmt_ms(r["cum_ms"]), fmt_ms(r["self_ms"]))
        console.print(t)
    return out


# ---- main -----------------------------------------------------------------------------------
def main(quick: bool = False, force_profile: bool = False) -> list[Verdict]:
    sizes = SIZES if not quick else (100, 1_000)
    repeats = REPEATS if not quick else 1
    filters = FILTER_REPEATS if not quick else 3
    big = sizes[-1]
    rng = random.Random(20261115)
    t_all = time.perf_counter()
    with scratch_dir("lineage") as root:
        corpora: dict[int, dict[str, Any]] = {}
        homes: dict[tuple[int, str], Path] = {}
        for n in sizes:
            t = time.perf_counter()
            team = root / f"team-{n}"
            corpora[n] = seed_team(team, n, rng)
            corpora[n]["seed_s"] = time.perf_counter() - t
            homes[(n, "switch")] = make_home(root / f"home-{n}-switch", team)
            homes[(n, "start")] = make_home(root / f"home-{n}-start", team, "lineage")
            console.print(f"[dim]lineage: seeded {n:,} runs in {corpora[n]['seed_s']:.1f} s[/]")
        samples: dict[tuple[int, str], list[dict[str, Any]]] = {k: [] for k in homes}
        out = root / "marks.json"
        for rep in range(repeats + 1):
            console.print(f"[dim]lineage: round {rep}/{repeats}{' (warm-up, discarded)' if rep == 0 else ''} …[/]")
            for (n, mode), home in homes.items():
                marks = spawn(mode, home, out, filters=filters if rep else 1, type_filter=bool(rep))
                if "error" in marks:
                    console.print(f"[red]{n:,} {mode}: {marks['error']}[/]\n{marks.get('stderr_tail', '')}"
                                  f"{marks.get('traceback', '')}")
                if rep:
                    samples[(n, mode)].append(marks)
        elapsed = time.perf_counter() - t_all

        # ---- tables ----
        verdicts: list[Verdict] = []
        results: dict[str, Any] = {}

        def target(n: int, value: float | None, limit: float) -> bool | None:
            if n != big or quick or value is None:
                return None
            return value <= limit

        t1 = new_table(
            f"(1) Lineage tab opens: press 4 (app started on Instances, runs loaded, idle) → … (median of {repeats} "
            f"fresh processes (min–max); ms; target: first frame with the tree ≤ {TARGET_SWITCH_MS:g} ms at {big:,} runs)",
            [("Runs", "right"), ("roots", "right"), ("rerender starts", "right"), ("rerender alone", "right"),
             ("rerender done", "right"), ("first frame with the tree", "right"), ("GC in window", "right"),
             ("Pilot returns (tab underline animation done)", "right"), "Target"])
        for n in sizes:
            s = samples[(n, "switch")]
            drawn = med(s, "switch_frame_after_rerender")
            met = target(n, drawn, TARGET_SWITCH_MS / 1000)
            if met is not None:
                verdicts.append(Verdict(NAME, f"press 4 → first frame with the Lineage tree @ {n:,} runs",
                                        f"{drawn * 1000:.0f} ms", f"≤ {TARGET_SWITCH_MS:g} ms", met))
            roots = distinct(s, "roots")
            gc_ms = vals(s, "switch_gc_ms")
            gc_text = (f"{statistics.median(gc_ms):.0f} [dim]({min(gc_ms):.0f}–{max(gc_ms):.0f}; "
                       f"{sum(vals(s, 'switch_gc_full')):.0f} full in {len(s)})[/]") if gc_ms else "—"
            t1.add_row(f"{n:,}", ", ".join(str(r) for r in roots), ms_text(vals(s, "switch_rerender_start")),
                       ms_text(vals(s, "switch_rerender_only")), ms_text(vals(s, "switch_rerendered")),
                       ms_text(vals(s, "switch_frame_after_rerender")), gc_text, ms_text(vals(s, "switch_painted")),
                       verdict(met))
        console.print(t1)

        t1b = new_table(
            f"(1b) Start on the Lineage tab (\\[ui] start_tab = \"lineage\"): process start → … (median of {repeats} "
            f"fresh processes (min–max); ms; no target set)",
            [("Runs", "right"), ("imports done", "right"), ("first frame", "right"),
             ("runs arrive (store read in a thread)", "right"), ("tree rerender done", "right"),
             ("tree painted", "right"), ("GC, arrive → painted", "right"), ("roots", "right")])
        for n in sizes:
            s = samples[(n, "start")]
            gc_ms = vals(s, "draw_gc_ms")
            t1b.add_row(f"{n:,}", ms_text(vals(s, "imported")), ms_text(vals(s, "first_frame")),
                        ms_text(vals(s, "runs_arrived")), ms_text(vals(s, "tree_rerendered")),
                        ms_text(vals(s, "tree_painted")),
                        f"{statistics.median(gc_ms):.0f} [dim]({min(gc_ms):.0f}–{max(gc_ms):.0f})[/]" if gc_ms else "—",
                        ", ".join(str(r) for r in distinct(s, "roots")))
            if n == big and not quick:
                v = med(s, "tree_painted")
                verdicts.append(Verdict(NAME, f"process start → Lineage tree painted (start tab lineage) @ {n:,} runs",
                                        f"{v * 1000:.0f} ms" if v else "—", "none set", None))
        console.print(t1b)

        t2 = new_table(
            f"(2) A filter applies: LineageTab.apply_filter({FILTER!r}) → … ({filters} per process × {repeats} "
            f"processes, pooled; ms; target: tree redrawn p50 ≤ {TARGET_FILTER_MS:g} ms at {big:,} runs)",
            [("Runs", "right"), "What", ("matches", "right"), ("rerender done p50", "right"), ("next frame p50", "right"),
             ("p99", "right"), ("max", "right"), ("GC ms p50 / max", "right"), "Target"])
        for n in sizes:
            s = samples[(n, "switch")]
            f_call, f_paint = summarize(pooled(s, "filter", "call")), summarize(pooled(s, "filter", "painted"))
            c_call, c_paint = summarize(pooled(s, "clear", "call")), summarize(pooled(s, "clear", "painted"))
            keys = summarize(pooled(s, "typed_keys", "painted"))
            keys_gc = pooled(s, "typed_keys", "gc_ms")
            met = target(n, f_paint["p50_ms"] / 1000, TARGET_FILTER_MS / 1000)
            if met is not None:
                verdicts.append(Verdict(NAME, f"apply_filter → tree redrawn p50 @ {n:,} runs", f"{f_paint['p50_ms']:.1f} ms",
                                        f"≤ {TARGET_FILTER_MS:g} ms", met))
            status = next((x.get("filter_status") for x in s if x.get("filter_status")), "")
            matched = status.split(" runs match")[0] if " runs match" in status else "?"
            f_gc, c_gc = pooled(s, "filter", "gc_ms"), pooled(s, "clear", "gc_ms")
            t2.add_row(f"{n:,}", "apply_filter(FILTER)", matched, fmt_ms(f_call["p50_ms"]), fmt_ms(f_paint["p50_ms"]),
                       fmt_ms(f_paint["p99_ms"]), fmt_ms(f_paint["max_ms"]), gc_pair(f_gc), verdict(met))
            t2.add_row("", "[dim]apply_filter(\"\"): back to all roots[/]", "", fmt_ms(c_call["p50_ms"]),
                       fmt_ms(c_paint["p50_ms"]), fmt_ms(c_paint["p99_ms"]), fmt_ms(c_paint["max_ms"]), gc_pair(c_gc), "")
            t2.add_row("", f"[dim]typed in the / bar: key → frame ({len(FILTER)} keys, each re-filters; pooled)[/]", "",
                       fmt_ms(summarize(pooled(s, "typed_keys", "rerendered"))["p50_ms"]), fmt_ms(keys["p50_ms"]),
                       fmt_ms(keys["p99_ms"]), fmt_ms(keys["max_ms"]), gc_pair(keys_gc), "")
            t2.add_row("", "[dim]… the whole filter typed (sum over its keys, median process)[/]", "", "",
                       fmt_ms(statistics.median([sum(k["painted"] for k in x.get("typed_keys") or []) * 1000 for x in s])
                              if s else None), "", "", "", "", end_section=True)
        console.print(t2)

        t3 = new_table(
            f"(3) Memory: RSS of the process (MB = 10⁶ bytes; median of {repeats} (min–max); "
            f"target: peak ≤ {TARGET_RSS_MB:g} MB at {big:,} runs)",
            [("Runs", "right"), ("runs loaded (Instances shown)", "right"), ("Lineage shown", "right"),
             ("after filtering", "right"), ("peak, switch process", "right"), ("peak, start on Lineage", "right"),
             ("KB per run vs 100", "right"), "Target"])
        base_peak = None
        for n in sizes:
            s, st = samples[(n, "switch")], samples[(n, "start")]
            peak = med(s, "rss_peak")
            peak_start = med(st, "rss_peak")
            worst = max(x for x in (peak, peak_start) if x is not None) if (peak or peak_start) else None
            met = target(n, worst / 1e6 if worst else None, TARGET_RSS_MB)
            if met is not None:
                verdicts.append(Verdict(NAME, f"peak RSS, Lineage shown @ {n:,} runs", f"{worst / 1e6:.0f} MB",
                                        f"≤ {TARGET_RSS_MB:g} MB", met))
            per_run = ""
            if base_peak is not None and peak is not None:
                per_run = f"{(peak - base_peak) / 1e3 / (n - sizes[0]):.1f}"
            if n == sizes[0]:
                base_peak = peak
            t3.add_row(f"{n:,}", mb_text(vals(s, "rss_loaded")), mb_text(vals(s, "rss_shown")),
                       mb_text(vals(s, "rss_filtered")), mb_text(vals(s, "rss_peak")), mb_text(vals(st, "rss_peak")),
                       per_run, verdict(met))
        console.print(t3)

        ta = new_table("Anchors: other tools at scale (reported by their users; not measured here)",
                       ["Tool", "Reported", "Source"])
        for a in ANCHORS:
            ta.add_row(*a)
        ta.add_row("labdeck Lineage tab (this run)",
                   f"{big:,} runs: press 4 → tree {fmt_ms((med(samples[(big, 'switch')], 'switch_frame_after_rerender') or float('nan')) * 1000)} ms, "
                   f"filter → tree {fmt_ms(summarize(pooled(samples[(big, 'switch')], 'filter', 'painted'))['p50_ms'])} ms, "
                   f"peak RSS {((med(samples[(big, 'switch')], 'rss_peak') or 0) / 1e6):.0f} MB", "tables above")
        console.print(ta)
        for n in sizes:
            c = corpora[n]
            console.print(f"[dim]{n:,} runs: {', '.join(f'{u} {k:,}' for u, k in c['users'].items())}; "
                          f"{c['derived']:,} derived ({c['derived_from_teammate']:,} from a teammate's run; max depth {c['max_depth']}; by depth {c['depth_histogram']}); "
                          f"{c['edges']:,} edges; {c['tags']:,} tags ({c['tags_removed']} taken off), {c['notes']:,} notes; "
                          f"snapshots {c['snapshot_bytes'] / 1e6:.1f} MB; seeded in {c['seed_s']:.1f} s[/]")
        s_big = samples[(big, "switch")]
        console.print(f"[dim]runs in the view: {distinct(s_big, 'runs_in_view')}; tab drawn lazily before "
                      f"the press: {distinct(s_big, 'dirty_before_press')}; filter status: "
                      f"{next((x.get('filter_status') for x in s_big if x.get('filter_status')), '')!r}; typed filter "
                      f"ended as {next((x.get('typed_filter_text') for x in s_big if 'typed_filter_text' in x), None)!r}; "
                      f"labdeck imported from {distinct(s_big, 'labdeck_from')}; "
                      f"headless 160×48; took {elapsed:.0f} s[/]")

        failed = {f"{n:,} {mode}": sum("error" in x for x in s) for (n, mode), s in samples.items() if any("error" in x for x in s)}
        if failed:
            console.print(f"[bold red]processes that failed (left out of the medians): {failed}[/]")
        missed = [v for v in verdicts if v.met is False]
        prof: dict[str, Any] = {}
        if missed or force_profile:
            console.print(f"[yellow]profiling at {big:,} runs"
                          f"{' (missed: ' + '; '.join(v.metric for v in missed) + ')' if missed else ''} …[/]")
            prof = run_profile(homes[(big, "switch")], homes[(big, "start")], root)

        for (n, mode), s in samples.items():
            results[f"{n}-{mode}"] = {
                "runs": n, "mode": mode,
                **{f"{k}_median_s": med(s, k) for k in ("imported", "first_frame", "tree_rerendered", "tree_painted",
                                                        "switch_rerender_start", "switch_rerender_only",
                                                        "switch_rerendered", "switch_frame_after_rerender", "switch_painted",
                                                        "runs_arrived",
                                                        "process_wall")},
                **{f"{k}_median_bytes": med(s, k) for k in ("rss_loaded", "rss_shown", "rss_filtered", "rss_end", "rss_peak")},
                "filter_painted_ms": summarize(pooled(s, "filter", "painted")) if mode == "switch" else None,
                "filter_call_ms": summarize(pooled(s, "filter", "call")) if mode == "switch" else None,
                "clear_painted_ms": summarize(pooled(s, "clear", "painted")) if mode == "switch" else None,
                "typed_key_painted_ms": summarize(pooled(s, "typed_keys", "painted")) if mode == "switch" else None,
                "samples": s,
            }
    return finish(NAME, {
        "description": "Lineage tab: press 4 → tree drawn, apply_filter → tree redrawn, RSS; fresh processes, headless",
        "params": {"sizes": list(sizes), "repeats": repeats, "filters_per_process": filters, "filter": FILTER,
                   "size": [160, 48], "corpora": {str(n): c for n, c in corpora.items()}},
        "targets": {"switch_frame_after_rerender_max_ms": TARGET_SWITCH_MS, "filter_painted_p50_max_ms": TARGET_FILTER_MS,
                    "peak_rss_max_mb": TARGET_RSS_MB, "at_runs": big},
        "anchors": [dict(zip(("tool", "reported", "source"), a)) for a in ANCHORS],
        "results": results,
        "profile": prof,
    }, verdicts, elapsed, quick=quick)


def profile() -> None:
    with scratch_dir("lineage-profile") as root:
        team = root / "team"
        seed_team(team, SIZES[-1], random.Random(20261115))
        run_profile(make_home(root / "home", team), make_home(root / "home-start", team, "lineage"), root)


if __name__ == "__main__":
    if "--profile" in sys.argv:
        profile()
    else:
        main(quick="--quick" in sys.argv)
