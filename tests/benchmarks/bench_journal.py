"""Store writes of one running run: journal bytes and fsyncs per minute while a job logs.

A real job on `local` prints a line and logs two metrics every 0.3 s (a training loop that
reports often). labdeck follows it the way the TUI does: the log follower on the run
(``LogFollower.start``) and ``refresh_runs()`` every ``[ui] refresh_seconds`` (2 s). Over
a window of the job's running time (from ``running`` until just before it ends; no launch,
no final transition in it) the benchmark counts:

* bytes appended to the user's journal (``<team_dir>/<user>/journal-*.jsonl``);
* ``os.fsync`` calls of this process (each journal commit is one, ``[store] fsync = true``);
* journal lines (one per changed document per commit).

It also checks that what a reader sees stays current: at the end of the window, the last
line ``Store.runs()`` gives (what the Jobs tab and a teammate's ``labdeck ps`` show) is
within a few steps of the line the job printed last.

Baseline, same run: the same measurement with the follower's status written the way labdeck
wrote it before (every new last line and log offset an ``update_run``, the interim record every
5 s): ``Store.set_status`` is swapped for ``update_run`` and the follower's record interval for 5 s.

Target: journal bytes per minute of one running run ≥ 10× smaller than the baseline.

Run: ``python3 -m tests.benchmarks journal`` (``--quick``: a 6-second window).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from ._common import Verdict, console, finish, new_table, scratch_dir, verdict

NAME = "journal"
WINDOW_S = 60.0
QUICK_WINDOW_S = 6.0
STEP_S = 0.3  # the job prints a line and logs metrics this often
TARGET_RATIO = 10.0

JOB = r'''
import sys, time
try:
    import labdeck
except ImportError:
    labdeck = None
end = time.time() + float(sys.argv[1])
i = 0
while time.time() < end:
    print(f"step {i} loss {1.0 / (i + 1):.5f} (working)", flush=True)
    if labdeck is not None:
        labdeck.log({"loss": 1.0 / (i + 1), "acc": i / (i + 1)}, step=i)
    i += 1
    time.sleep(float(sys.argv[2]))
print("done", flush=True)
'''


@contextmanager
def counting_fsyncs():
    """Count this process's ``os.fsync``/``os.fdatasync`` calls (journal commits, compactions)."""
    real = os.fsync, os.fdatasync
    box = {"n": 0}

    def counted(call):
        def sync(fd):
            box["n"] += 1
            return call(fd)
        return sync

    os.fsync, os.fdatasync = counted(real[0]), counted(real[1])
    try:
        yield box
    finally:
        os.fsync, os.fdatasync = real


def journal_state(store_dir: Path) -> tuple[int, int]:
    """(bytes, lines) of the journal files in ``store_dir``."""
    size = lines = 0
    for p in store_dir.glob("journal-*.jsonl"):
        data = p.read_bytes()
        size += len(data)
        lines += data.count(b"\n")
    return size, lines


async def measure(root: Path, window_s: float, *, legacy: bool) -> dict:
    from backends import follow
    from backends.config import load_config
    from backends.paths import Paths
    from backends.store import Store
    from backends.workstation import Workstation

    home = root / ("legacy" if legacy else "now")
    home.mkdir()
    # no compaction inside the window: every commit stays in the journal, to be counted
    (home / "config.toml").write_text("[store]\ncompact_every = 1000000\n")
    project = home / "project"
    project.mkdir()
    (project / "job.py").write_text(JOB)
    ws = Workstation(load_config(Paths.resolve(home)))
    saved = (Store.set_status, follow.RECORD_EVERY) if hasattr(Store, "set_status") else None
    if legacy and saved is not None:  # the old write pattern: every status change journaled as a run update
        Store.set_status = lambda self, run_id, **fields: self.update_run(run_id, **fields)  # type: ignore[method-assign]
        follow.RECORD_EVERY = follow.SAVE_OFFSET_EVERY
    refresh_s = float(ws.config.get("ui", "refresh_seconds"))
    try:
        run = await ws.launch(f"{sys.executable} -u job.py {window_s + 6:.0f} {STEP_S}", workdir=str(project),
                              sync_code=False, name="journal-bench")
        t0 = time.monotonic()
        while ws.store.find_run(run.id).state != "running":
            if time.monotonic() - t0 > 30:
                raise RuntimeError("the job did not start")
            await ws.refresh_runs()
            await asyncio.sleep(0.05)
        follower = ws.follower.start(run)
        await asyncio.sleep(1.0)  # the follower's first catch-up is not the steady state
        store_dir = ws.store.mine.dir
        with counting_fsyncs() as fsyncs:
            b0, l0 = journal_state(store_dir)
            t_start = time.monotonic()
            while time.monotonic() - t_start < window_s:
                await ws.refresh_runs()  # the TUI's periodic refresh
                await asyncio.sleep(refresh_s)
            elapsed = time.monotonic() - t_start
            b1, l1 = journal_state(store_dir)
            n_fsync = fsyncs["n"]
        await ws.refresh_runs()
        shown = ws.store.find_run(run.id).last_line  # what the Jobs tab and a teammate read
        log = (ws.follower.local_path(run)).read_text(errors="replace").splitlines()
        printed = [line for line in log if line.startswith("step ")]
        lag = None
        if printed and shown.startswith("step "):
            lag = int(printed[-1].split()[1]) - int(shown.split()[1])
        await ws.cancel(run.id)
        follower.cancel()
        try:
            await follower
        except (asyncio.CancelledError, Exception):
            pass
    finally:
        if legacy and saved is not None:
            Store.set_status, follow.RECORD_EVERY = saved  # type: ignore[method-assign]
        await ws.close()
    per_min = 60.0 / elapsed
    return {"legacy": legacy, "window_s": elapsed, "journal_bytes": b1 - b0, "journal_lines": l1 - l0,
            "fsyncs": n_fsync, "bytes_per_min": (b1 - b0) * per_min, "fsyncs_per_min": n_fsync * per_min,
            "lines_per_min": (l1 - l0) * per_min, "last_line_shown": shown, "last_line_lag_steps": lag}


def main(quick: bool = False) -> list[Verdict]:
    window = QUICK_WINDOW_S if quick else WINDOW_S
    t_all = time.perf_counter()
    with scratch_dir("journal") as root:
        base = asyncio.run(measure(root, window, legacy=True))
        now = asyncio.run(measure(root, window, legacy=False))
    elapsed = time.perf_counter() - t_all
    ratio = base["bytes_per_min"] / now["bytes_per_min"] if now["bytes_per_min"] else float("inf")
    table = new_table(f"Journal writes of one running run (a line and 2 metrics every {STEP_S:g} s; {window:g} s window; "
                      f"target: ≥ {TARGET_RATIO:g}× fewer bytes than the baseline)",
                      ["Write pattern", ("bytes/min", "right"), ("fsyncs/min", "right"), ("lines/min", "right"),
                       ("last line lag (steps)", "right"), "Target"])
    met = ratio >= TARGET_RATIO
    for r, label in ((base, "baseline: every status change journaled (as before)"),
                     (now, "labdeck: status in a side file, record on change")):
        table.add_row(label, f"{r['bytes_per_min']:,.0f}", f"{r['fsyncs_per_min']:.1f}", f"{r['lines_per_min']:.1f}",
                      "?" if r["last_line_lag_steps"] is None else str(r["last_line_lag_steps"]),
                      "" if r["legacy"] else f"{ratio:.0f}× fewer bytes {verdict(met)}")
    console.print(table)
    verdicts = [Verdict(NAME, "journal bytes/min of one running run vs before", f"{ratio:.0f}× fewer",
                        f"≥ {TARGET_RATIO:g}×", met)]
    return finish(NAME, {"window_s": window, "baseline": base, "labdeck": now, "ratio_bytes": ratio}, verdicts,
                  elapsed, quick=quick)


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
